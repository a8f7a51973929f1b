//! The streaming pipeline of a job, built from its [`StagePlan`]:
//!
//! ```text
//! class_prior_sampler ─┬─> class_prior_writer
//!                      └─> supervisor_tuner ─┬─> supervisor_writer
//!                                            └─> proxy_generator ─> filter ─> proxy_writer ─> tokenize ─┬─> vq_writer
//!                                                                                                      ├─> ar_trainer
//!                                            (LlamaGen: each prompt's caption states, port 1) ────────┴─> caption_writer ─> ar_trainer
//! ```
//!
//! The supervisor is DreamBooth-tuned while the untuned model's class priors stream in (from the
//! copy the tuner trains, with its adapters off, when the two can share one); the proxy
//! generator samples its plan with the adapter batch by batch; the Filter scores every proxy and
//! records why it rejects one; the proxy writer commits every few rows to the Lance corpus and
//! forwards only committed rows; the student trains on their VQ tokens while generation goes on.
//! A resumed job passes its stored rows on first, so it continues exactly. Progress bars per stage
//! on a terminal, the job's progress for the daemon, and pause / resume / cancel ([`steer`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use proxytune_actors::corpus::writer::{LanceWriter, LanceWriterConfig, WriterStats};
use proxytune_actors::corpus::{Corpus, Scan};
use proxytune_actors::runtime::{
    JobOutcome, Metrics, Pipeline, PipelineConfig, PipelineReport, RunningPipeline,
};
use proxytune_actors::stages::ar_trainer::{ArTrainerActor, ArTrainerStats};
use proxytune_actors::stages::class_prior_sampler::ClassPriorSampler;
use proxytune_actors::stages::diffusion_sampling::SharedSupervisor;
use proxytune_actors::stages::filter::Filter;
use proxytune_actors::stages::intake::encode_png;
use proxytune_actors::stages::proxy_generator::ProxyGenerator;
use proxytune_actors::stages::supervisor_tuner::{SupervisorTuner, SupervisorTunerStats};
use proxytune_actors::stages::tokenize::Tokenize;
use proxytune_schemas::{CaptionStates, ClassPriorImage, Proxy, ReferenceImage, Supervisor, Table, VqTokens};

use super::plan::StagePlan;

/// Progress bars per stage, fed from the actors' shared statistics.
pub(crate) struct Progress {
    bars: Vec<(ProgressBar, Box<dyn Fn() -> u64 + Send>)>,
}

impl Progress {
    fn bar(
        multi: &MultiProgress,
        name: &str,
        total: u64,
        read: Box<dyn Fn() -> u64 + Send>,
    ) -> (ProgressBar, Box<dyn Fn() -> u64 + Send>) {
        let bar = multi.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos}/{len} {elapsed:>4} {per_sec}")
                .expect("template parses")
                .progress_chars("=> "),
        );
        bar.set_prefix(name.to_string());
        (bar, read)
    }

    fn tick(&self) {
        for (bar, read) in &self.bars {
            bar.set_position(read());
        }
    }

    fn finish(&self) {
        self.tick();
        for (bar, _) in &self.bars {
            bar.finish();
        }
    }
}

fn written(stats: &Arc<Mutex<WriterStats>>) -> Box<dyn Fn() -> u64 + Send> {
    let stats = stats.clone();
    Box::new(move || stats.lock().map(|s| s.received_rows).unwrap_or(0))
}

/// Where a job is, for its status: the stage and every stage's counts.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct JobProgress {
    /// `starting`, `tuning supervisor`, `generating proxies`, `training student`, `evaluating`,
    /// `reporting`, `done`, `cancelled`.
    pub stage: String,
    /// Class-prior images sampled (this run) and planned.
    pub class_priors: u64,
    pub class_priors_planned: u64,
    /// Supervisor optimiser steps taken (restored ones included) and planned.
    pub supervisor_steps: u64,
    pub supervisor_steps_planned: u64,
    /// Whether the tuned supervisor is ready (its adapter exported).
    pub supervisor_ready: bool,
    /// Proxies in the corpus (stored before this run plus written by it) and planned.
    pub proxies_stored: u64,
    pub proxies_planned: u64,
    /// Kept proxies the student has received.
    pub student_rows: u64,
    /// Student optimiser steps taken (restored ones included) and planned.
    pub student_steps: u64,
    pub student_steps_planned: u64,
    /// The proxies table's version.
    pub corpus_version: Option<u64>,
    /// Paused, and no source or generator is mid-unit: nothing is generated until it resumes.
    pub parked: bool,
}

impl Default for JobProgress {
    fn default() -> Self {
        JobProgress {
            stage: "starting".into(),
            class_priors: 0,
            class_priors_planned: 0,
            supervisor_steps: 0,
            supervisor_steps_planned: 0,
            supervisor_ready: false,
            proxies_stored: 0,
            proxies_planned: 0,
            student_rows: 0,
            student_steps: 0,
            student_steps_planned: 0,
            corpus_version: None,
            parked: false,
        }
    }
}

/// A job's progress, shared with whoever watches it (the daemon's status routes).
pub type ProgressHandle = Arc<Mutex<JobProgress>>;

pub(crate) fn set_stage(progress: &ProgressHandle, stage: &str) {
    progress.lock().expect("progress lock").stage = stage.to_string();
}

/// What the pipeline run left behind.
pub(crate) struct Run {
    /// How the pipeline ended.
    pub outcome: JobOutcome,
    /// When it started (µs since the epoch).
    pub started_at_us: i64,
    /// Its wall time.
    pub seconds: f64,
    /// What the student did.
    pub trainer: ArTrainerStats,
    /// What the supervisor's tuning did in this run.
    pub tuner: SupervisorTunerStats,
    /// When each commit of proxies landed and the proxies written by then.
    pub proxy_commits: Vec<(i64, u64)>,
    /// The proxies table's version at the end.
    pub proxies_version: Option<u64>,
    /// The VQ table's version at the end.
    pub vq_version: Option<u64>,
    /// The first task's error, when one failed.
    pub error: Option<String>,
    /// Each actor's busy seconds (its own calls, not its waits).
    pub busy_seconds: std::collections::BTreeMap<String, f64>,
}

/// Runs the pipeline of `plan` to its end (or its cancel), writing into `corpus`.
pub(crate) async fn pipeline(
    plan: &StagePlan,
    corpus: &Corpus,
    metrics: Metrics,
    commands: tokio::sync::watch::Receiver<JobCommand>,
    job_progress: &ProgressHandle,
) -> anyhow::Result<Run> {
    let subject = &plan.subject;
    let reference_rows: Vec<ReferenceImage> = subject
        .references
        .iter()
        .enumerate()
        .map(|(i, img)| ReferenceImage {
            job_id: plan.job_id.clone(),
            subject: subject.name.clone(),
            class_noun: subject.class_noun.clone(),
            image_index: i as u32,
            source: subject.sources[i].clone(),
            image_png: encode_png(img),
            width: img.width(),
            height: img.height(),
            created_at_us: proxytune_schemas::now_us(),
        })
        .collect();
    corpus.table::<ReferenceImage>().await?.append_rows(&reference_rows).await?;

    let mut priors = ClassPriorSampler::new(plan.class_priors.clone(), &metrics);
    let mut tuner = SupervisorTuner::new(plan.tuner.clone(), subject.references.clone(), &metrics)?;
    // One supervisor copy for the class priors and the tuning where they can share it.
    if plan.class_priors.num_images > 0 {
        match SharedSupervisor::for_stages(&plan.class_priors, &plan.tuner) {
            Ok(shared) => {
                eprintln!("proxytune: the class-prior sampler and the tuner share one supervisor copy");
                priors = priors.sharing(shared.clone());
                tuner = tuner.sharing(shared);
            }
            Err(why) => eprintln!("proxytune: the class-prior sampler loads its own supervisor copy: {why}"),
        }
    }
    let tuner_stats = tuner.stats();
    // A resumed job: the proxies stored already are not sampled again; the kept ones are what
    // new proxies are checked for duplicates against, and the proxy writer passes them on first
    // (in commit order), so the student sees the sequence of an uninterrupted run.
    // Metadata only: the kept ones' images are streamed into the Filter below, a batch at a time.
    let proxy_table = corpus.table::<Proxy>().await?;
    let stored: Vec<Proxy> = proxy_table.read_rows_light(None).await?;
    if !stored.is_empty() {
        eprintln!("proxytune: resuming with {} proxies stored", stored.len());
    }
    let mut generator_config = plan.generator.clone();
    generator_config.stored_seeds = stored.iter().map(|p| p.seed).collect();
    let planned = generator_config.plan.items().len() as u64;
    let generator = ProxyGenerator::new(generator_config, &metrics)?;
    let scorer_device = proxytune_models::device::parse_device(&plan.scorer_device)?;
    let (embedders, prompt_scorer) = plan.scorers.load(scorer_device)?;
    let mut filter =
        Filter::new(plan.filter.clone(), embedders, prompt_scorer, reference_rows, scorer_device, &metrics)?;
    let kept_scan = Scan { filter: Some("keep = true".into()), batch_size: Some(32), ..Default::default() };
    let mut kept_stream = proxy_table.scan(&kept_scan).await?;
    while let Some(batch) = kept_stream.try_next().await? {
        filter.remember_kept(&Proxy::from_batch(&batch)?)?;
    }
    // Prompts whose caption states the corpus holds are not encoded again: the caption writer
    // passes the stored ones to the trainer first.
    let stored_captions: Vec<String> = match &plan.tokenize.caption_encoder_id {
        Some(id) => corpus
            .table::<CaptionStates>()
            .await?
            .read_rows(Some(&format!("encoder_id = '{}'", id.replace('\'', "''"))))
            .await?
            .into_iter()
            .map(|c| c.prompt)
            .collect(),
        None => Vec::new(),
    };
    if !stored_captions.is_empty() {
        eprintln!("proxytune: {} prompts' caption states are stored already", stored_captions.len());
    }
    let tokenize = Tokenize::new(plan.tokenize.clone()).with_stored_captions(stored_captions);
    let (trainer, trainer_stats) = ArTrainerActor::new(plan.trainer.clone(), &metrics)?;
    let commit = |rows: usize, forward: bool| LanceWriterConfig {
        commit_every_rows: rows,
        forward_committed: forward,
        replay_stored: forward,
    };
    let (prior_writer, prior_stats) =
        LanceWriter::<ClassPriorImage>::new(corpus.clone(), commit(16, false), &metrics);
    let (supervisor_writer, supervisor_stats) =
        LanceWriter::<Supervisor>::new(corpus.clone(), commit(1, false), &metrics);
    let (proxy_writer, proxy_stats) = LanceWriter::<Proxy>::new(corpus.clone(), commit(8, true), &metrics);
    let (vq_writer, vq_stats) = LanceWriter::<VqTokens>::new(corpus.clone(), commit(32, false), &metrics);
    let caption_writer = plan
        .tokenize
        .caption_encoder_id
        .is_some()
        .then(|| LanceWriter::<CaptionStates>::new(corpus.clone(), commit(1, true), &metrics).0);

    let mut p = Pipeline::new(PipelineConfig::default(), metrics);
    let priors = p.source("class_prior_sampler", priors);
    let tuner = p.operator("supervisor_tuner", tuner);
    let generator = p.operator("proxy_generator", generator);
    let filter = p.operator("filter", filter);
    let tokenize = p.operator("tokenize", tokenize);
    let trainer = p.operator("ar_trainer", trainer);
    let prior_sink = p.async_operator("class_prior_writer", prior_writer);
    let supervisor_sink = p.async_operator("supervisor_writer", supervisor_writer);
    let proxy_sink = p.async_operator("proxy_writer", proxy_writer);
    let vq_sink = p.async_operator("vq_writer", vq_writer);
    p.connect(priors, tuner).connect(priors, prior_sink);
    p.connect(tuner, generator).connect(tuner, supervisor_sink);
    p.connect(generator, filter).connect(filter, proxy_sink);
    p.connect(proxy_sink, tokenize);
    p.connect(tokenize, vq_sink).connect(tokenize, trainer);
    // A student that conditions on caption states (LlamaGen) gets each prompt's on its input 1,
    // from the caption writer: the stored ones first, then each new one once committed. The
    // corpus stores them once per prompt.
    if let Some(caption_writer) = caption_writer {
        let caption_sink = p.async_operator("caption_writer", caption_writer);
        p.connect_port(tokenize, 1, caption_sink).connect(caption_sink, trainer);
    }

    let multi = MultiProgress::new();
    let steps = trainer_stats.clone();
    let progress = Progress {
        bars: vec![
            Progress::bar(&multi, "class priors", plan.class_priors.num_images as u64, written(&prior_stats)),
            Progress::bar(&multi, "supervisor ready", 1, written(&supervisor_stats)),
            Progress::bar(&multi, "proxies filtered", planned, written(&proxy_stats)),
            Progress::bar(&multi, "kept, tokenized", planned, written(&vq_stats)),
            Progress::bar(
                &multi,
                "student steps",
                plan.trainer.train.max_train_steps,
                Box::new(move || steps.lock().map(|s| s.steps).unwrap_or(0)),
            ),
        ],
    };
    let update = {
        let (priors, supervisor, proxies) =
            (prior_stats.clone(), supervisor_stats.clone(), proxy_stats.clone());
        let (student, tuner) = (trainer_stats.clone(), tuner_stats.clone());
        let job_progress = job_progress.clone();
        let (priors_planned, supervisor_planned, student_planned) = (
            plan.class_priors.num_images as u64,
            plan.tuner.dreambooth.max_train_steps,
            plan.trainer.train.max_train_steps,
        );
        move || {
            // The counters only: the stats also hold per-commit and per-step logs that grow
            // with the job, and this runs every 250 ms.
            let (proxies_stored, proxies_version) = {
                let w = proxies.lock().expect("writer stats");
                (w.replayed_rows + w.written_rows, w.version)
            };
            let (student_rows, student_steps) = {
                let s = student.lock().expect("trainer stats");
                (s.rows_received as u64, s.steps)
            };
            let mut p = job_progress.lock().expect("progress lock");
            p.class_priors = priors.lock().expect("writer stats").received_rows;
            p.class_priors_planned = priors_planned;
            p.supervisor_steps = tuner.lock().expect("tuner stats").steps;
            p.supervisor_steps_planned = supervisor_planned;
            p.supervisor_ready = supervisor.lock().expect("writer stats").received_rows > 0;
            p.proxies_stored = proxies_stored;
            p.proxies_planned = planned;
            p.student_rows = student_rows;
            p.student_steps = student_steps;
            p.student_steps_planned = student_planned;
            p.corpus_version = proxies_version;
            p.stage = if !p.supervisor_ready {
                "tuning supervisor"
            } else if p.proxies_stored < planned {
                "generating proxies"
            } else {
                "training student"
            }
            .into();
        }
    };
    let started = Instant::now();
    let started_at_us = proxytune_schemas::now_us();
    let running = p.start(&tokio::runtime::Handle::current())?;
    let control = running.handle().control().clone();
    let report = steer(running, commands, || {
        progress.tick();
        update();
        job_progress.lock().expect("progress lock").parked = control.parked();
    })
    .await;
    progress.finish();
    update();
    job_progress.lock().expect("progress lock").parked = false;
    let error = report.tasks.iter().find_map(|t| t.error.clone().map(|e| format!("{}: {e}", t.name)));
    let trainer = trainer_stats.lock().expect("trainer stats").clone();
    let tuner = tuner_stats.lock().expect("tuner stats").clone();
    let (proxies_version, proxy_commits) = {
        let proxies = proxy_stats.lock().expect("writer stats");
        (proxies.version, proxies.commit_log.clone())
    };
    let vq_version = vq_stats.lock().expect("writer stats").version;
    let busy_seconds = report.tasks.iter().map(|t| (t.name.clone(), t.busy_seconds)).collect();
    Ok(Run {
        outcome: report.outcome,
        started_at_us,
        seconds: started.elapsed().as_secs_f64(),
        trainer,
        tuner,
        proxy_commits,
        proxies_version,
        vq_version,
        error,
        busy_seconds,
    })
}

/// Waits for a started pipeline while applying `commands` to it (pause, resume; a cancel drains
/// it) and calling `tick` every 250 ms.
pub(crate) async fn steer(
    running: RunningPipeline,
    mut commands: tokio::sync::watch::Receiver<JobCommand>,
    mut tick: impl FnMut(),
) -> PipelineReport {
    let handle = running.handle();
    tokio::spawn(async move {
        while commands.changed().await.is_ok() {
            let command = *commands.borrow_and_update();
            let control = handle.control();
            match command {
                JobCommand::Run => {
                    control.resume();
                }
                JobCommand::Pause => {
                    tracing::info!("Paused: sources and actors hold between batches.");
                    control.pause();
                }
                JobCommand::Cancel => {
                    tracing::info!("Cancelled: draining (the corpus keeps every committed row).");
                    control.cancel();
                    return;
                }
            }
        }
    });
    let wait = running.wait();
    tokio::pin!(wait);
    loop {
        tokio::select! {
            report = &mut wait => return report,
            _ = tokio::time::sleep(Duration::from_millis(250)) => tick(),
        }
    }
}

/// What a running job is told: run (or resume), pause, cancel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobCommand {
    /// Run (resume after a pause).
    Run,
    /// Hold every actor between batches.
    Pause,
    /// Drain and stop.
    Cancel,
}

impl JobCommand {
    /// Its verb in the daemon's routes (`/jobs/{id}/resume`, …).
    pub fn verb(self) -> &'static str {
        match self {
            JobCommand::Run => "resume",
            JobCommand::Pause => "pause",
            JobCommand::Cancel => "cancel",
        }
    }

    /// The command a route's verb names.
    pub fn from_verb(verb: &str) -> Option<Self> {
        [JobCommand::Run, JobCommand::Pause, JobCommand::Cancel].into_iter().find(|c| c.verb() == verb)
    }
}
