//! `proxytune demo`: the whole mission on the toy world, end to end, with the pretrained world
//! models in `models/world`.
//!
//! It renders one world subject's references (or reads a folder of photos of an object of a world
//! class, `--photos`), then runs the streaming pipeline:
//!
//! ```text
//! class_prior_sampler ─┬─> class_prior_writer
//!                      └─> supervisor_tuner ─┬─> supervisor_writer
//!                                            └─> proxy_generator ─> filter ─> proxy_writer ─> tokenize ─┬─> vq_writer
//!                                                                                                      └─> ar_trainer
//! ```
//!
//! The supervisor is DreamBooth-LoRA-tuned while the untuned model's class priors stream in; the
//! proxy generator samples its plan with the adapter batch by batch; the Filter scores every proxy
//! (world DINO, world CLIP-I and CLIP-T) and records why it rejects one; the proxy writer commits
//! every few rows to the Lance corpus and forwards only committed rows; the student's LoRA trains
//! on their VQ tokens while generation goes on. Then the untuned student, the tuned supervisor and
//! the tuned student are evaluated on the subject's 25 prompts with the same seeds, and
//! `report/index.html` (with `report.json` and image grids) is written. `/metrics` is served while
//! it runs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use proxytune_actors::ar_trainer::{ArTrainerActor, ArTrainerStats};
use proxytune_actors::class_prior_sampler::{ClassPriorConfig, ClassPriorSampler};
use proxytune_actors::corpus::Corpus;
use proxytune_actors::dreambench::Generator;
use proxytune_actors::filter::{Filter, FilterConfig, ImageMetric, PromptScorer};
use proxytune_actors::intake::encode_png;
use proxytune_actors::lance_writer::{LanceWriter, LanceWriterConfig, WriterStats};
use proxytune_actors::proxy_generator::{PromptPlan, ProxyGenerator, ProxyGeneratorConfig};
use proxytune_actors::runtime::{
    JobOutcome, Metrics, Pipeline, PipelineConfig, PipelineReport, RunningPipeline,
};
use proxytune_actors::supervisor_tuner::{SupervisorTuner, SupervisorTunerConfig};
use proxytune_actors::tokenize::Tokenize;
use proxytune_actors::world::{World, CLASSES, IDENTIFIER};
use proxytune_models::diffusion::dreambooth::DreamBoothConfig;
use proxytune_models::lora::LoraConfig;
use proxytune_models::scorers::ImageEmbedder;
use proxytune_schemas::{ClassPriorImage, EvalSample, Proxy, ReferenceImage, Supervisor, VqTokens};

use crate::report::{decode, html, record_scores, save_grid, throughput};
use crate::subject::JobSubject;
use crate::world_models::{
    device_name, evaluate, scorers, student, student_trainer_config, supervisor, supervisor_sampling,
    tokenize_config, EvalSpec, SIZE,
};

/// Arguments of `proxytune demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Output folder: corpus/, supervisor/, student/, report/.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// The pretrained world models (`tools/dev world`).
    #[arg(long, default_value = "models/world")]
    pub world: PathBuf,
    /// The world subject (`teapot_0`, `backpack_1`, `dog_2`, `cat_3`, `vase_4`, `sneaker_5`,
    /// `clock_6`, `robot_toy_7`), or the name of the subject of `--photos`.
    #[arg(long, default_value = "dog_2")]
    pub subject: String,
    /// Teach the subject from this folder of 3–6 photos (PNG or JPEG) instead of a world subject.
    #[arg(long, requires = "class_noun")]
    pub photos: Option<PathBuf>,
    /// The class noun of `--photos`' subject (one of the world's classes).
    #[arg(long)]
    pub class_noun: Option<String>,
    /// The rare-token identifier of the subject in prompts.
    #[arg(long, default_value = IDENTIFIER)]
    pub identifier: String,
    /// World seed (the pretrained models were trained on world 7).
    #[arg(long, default_value_t = 7)]
    pub world_seed: u64,
    /// Reference renders of the subject (4–6).
    #[arg(long, default_value_t = 5)]
    pub references: usize,
    /// Class-prior images the untuned supervisor samples for prior preservation.
    #[arg(long, default_value_t = 48)]
    pub class_priors: usize,
    /// DreamBooth-LoRA optimiser steps of the supervisor.
    #[arg(long, default_value_t = 400)]
    pub supervisor_steps: u64,
    /// Proxies per prompt (16 prompts: the subject prompt, 10 contexts, 5 property edits).
    #[arg(long, default_value_t = 24)]
    pub proxies_per_prompt: u32,
    /// LoRA optimiser steps of the student.
    #[arg(long, default_value_t = 1500)]
    pub student_steps: u64,
    /// Kept proxies the student waits for before its first step.
    #[arg(long, default_value_t = 16)]
    pub student_min_rows: usize,
    /// Evaluation images per prompt (DreamBench: 4).
    #[arg(long, default_value_t = 4)]
    pub eval_images: usize,
    /// Evaluate only the first this many of the subject's 25 prompts.
    #[arg(long)]
    pub eval_prompts: Option<usize>,
    /// Reject proxies whose world-DINO fidelity to the references is below this (the paper
    /// filters nothing; the world DINO also scores contexts, so a high threshold drops whole
    /// contexts — see `proxytune replay` to compare).
    #[arg(long)]
    pub min_fidelity: Option<f32>,
    /// Reject a proxy whose DINO cosine to an already-kept one is above this.
    #[arg(long, default_value_t = 0.995)]
    pub max_duplicate_cosine: f32,
    /// Serve Prometheus `/metrics` on this loopback port while it runs (0: do not serve).
    #[arg(long, default_value_t = 9464)]
    pub metrics_port: u16,
    /// Keep serving `/metrics` this many seconds after the report is written (for a last scrape).
    #[arg(long, default_value_t = 0)]
    pub linger_seconds: u64,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Checkpoint the supervisor's and the student's training every this many steps (a restarted
    /// job resumes from the newest).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
}

const JOB: &str = "demo";

/// Every check that can fail before work starts: the subject, budgets, folders, the models.
pub(crate) fn check_settings(args: &DemoArgs) -> anyhow::Result<JobSubject> {
    let world = World::new(args.world_seed, CLASSES.len());
    crate::subject::check_identifier(&args.identifier).context("--identifier")?;
    let subject = match (&args.photos, &args.class_noun) {
        (Some(dir), Some(class)) => JobSubject::folder(&world, &args.subject, class, dir)
            .with_context(|| format!("--photos {}", dir.display()))?,
        (Some(_), None) => anyhow::bail!("--photos needs --class-noun"),
        (None, class) => {
            let s = JobSubject::world(&world, &args.subject, args.references).context("--subject")?;
            if let Some(c) = class.as_deref().filter(|c| *c != s.class_noun()) {
                anyhow::bail!("--class-noun `{c}`: world subject `{}` is a {}", s.name, s.class_noun());
            }
            s
        }
    };
    anyhow::ensure!(
        (4..=6).contains(&args.references),
        "--references must be 4 to 6, got {}",
        args.references
    );
    for (name, value) in [
        ("--class-priors", args.class_priors as u64),
        ("--supervisor-steps", args.supervisor_steps),
        ("--checkpoint-every", args.checkpoint_every),
        ("--proxies-per-prompt", args.proxies_per_prompt as u64),
        ("--student-steps", args.student_steps),
        ("--student-min-rows", args.student_min_rows as u64),
        ("--eval-images", args.eval_images as u64),
    ] {
        anyhow::ensure!(value > 0, "{name} is 0: a budget must be positive");
    }
    if args.eval_prompts == Some(0) {
        anyhow::bail!("--eval-prompts is 0: a budget must be positive");
    }
    crate::world_models::check_models(&args.world, &["clip", "dino", "supervisor", "student"])?;
    Ok(subject)
}

/// [`check_settings`], then the output folder: creatable, writable, and its `corpus/` a corpus or
/// nothing.
pub(crate) fn check(args: &DemoArgs) -> anyhow::Result<JobSubject> {
    let subject = check_settings(args)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out {}: cannot create it", args.out.display()))?;
    let probe = args.out.join(".writable");
    std::fs::write(&probe, b"").with_context(|| format!("--out {}: not writable", args.out.display()))?;
    std::fs::remove_file(&probe).ok();
    Corpus::open_or_create(args.out.join("corpus"))
        .with_context(|| format!("{}: cannot hold the demo's corpus", args.out.join("corpus").display()))?;
    Ok(subject)
}

/// The proxy plan: the subject prompt, one phrasing of each context, the five edits. (The
/// evaluation also uses the contexts' second phrasings, which no proxy prompt has.)
fn plan(subject: &JobSubject, class: &str, images_per_prompt: u32) -> PromptPlan {
    let contexts = subject.prompts.iter().filter(|p| p.phrasing == 0 || p.edit.is_some());
    PromptPlan {
        subject_prompts: vec![format!("a {IDENTIFIER} {class}")],
        context_prompts: contexts.map(|p| p.caption(Some(IDENTIFIER))).collect(),
        images_per_prompt,
        first_seed: 1_000_000,
    }
}

/// Progress bars per stage, fed from the actors' shared statistics.
struct Progress {
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
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
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
}

/// A job's progress, shared with whoever watches it (the daemon's status routes).
pub type ProgressHandle = Arc<Mutex<JobProgress>>;

fn set_stage(progress: &ProgressHandle, stage: &str) {
    progress.lock().expect("progress lock").stage = stage.to_string();
}

/// What the pipeline run left behind.
struct Run {
    outcome: JobOutcome,
    seconds: f64,
    trainer: ArTrainerStats,
    proxies_version: Option<u64>,
    vq_version: Option<u64>,
    error: Option<String>,
}

async fn pipeline(
    args: &DemoArgs,
    subject: &JobSubject,
    corpus: &Corpus,
    metrics: Metrics,
    commands: tokio::sync::watch::Receiver<JobCommand>,
    job_progress: &ProgressHandle,
) -> anyhow::Result<Run> {
    let class = subject.class_noun();
    let model_dir = args.world.join("supervisor");
    let device = proxytune_models::device::parse_device(&args.device)?;
    let device_name = device_name(&args.device)?;
    let references = subject.references.clone();
    let reference_rows: Vec<ReferenceImage> = references
        .iter()
        .enumerate()
        .map(|(i, img)| ReferenceImage {
            job_id: JOB.into(),
            subject: subject.name.clone(),
            class_noun: class.into(),
            image_index: i as u32,
            source: subject.sources[i].clone(),
            image_png: encode_png(img),
            width: SIZE,
            height: SIZE,
            created_at_us: proxytune_schemas::now_us(),
        })
        .collect();
    corpus.table::<ReferenceImage>().await?.append_rows(&reference_rows).await?;

    let sampling = supervisor_sampling();
    let priors = ClassPriorSampler::new(
        ClassPriorConfig {
            job_id: JOB.into(),
            class_noun: class.into(),
            class_prompt: format!("a {class}"),
            model_dir: model_dir.clone(),
            model_id: "world-sd".into(),
            device: device_name.clone(),
            num_images: args.class_priors,
            first_seed: 0,
            sampling: sampling.clone(),
        },
        &metrics,
    );
    let tuner = SupervisorTuner::new(
        SupervisorTunerConfig {
            job_id: JOB.into(),
            subject: subject.name.clone(),
            class_noun: class.into(),
            model_dir: model_dir.clone(),
            model_id: "world-sd".into(),
            device: device_name.clone(),
            lora: Some(LoraConfig::attention(8, 8.0)),
            dreambooth: DreamBoothConfig {
                instance_prompt: format!("a {IDENTIFIER} {class}"),
                class_prompt: format!("a {class}"),
                learning_rate: 1e-3,
                max_train_steps: args.supervisor_steps,
                train_batch_size: 4,
                num_class_images: args.class_priors,
                lr_warmup_steps: 20,
                checkpoint_every: args.checkpoint_every,
                ..Default::default()
            },
            resolution: SIZE,
            output_dir: args.out.join("supervisor"),
        },
        references.clone(),
        &metrics,
    )?;
    let tuner_steps = tuner.steps();
    // A resumed job: the proxies stored already are not sampled again; the kept ones are what
    // new proxies are checked for duplicates against, and the proxy writer passes them on first
    // (in commit order), so the student sees the sequence of an uninterrupted run.
    let stored: Vec<Proxy> = corpus.table::<Proxy>().await?.read_rows(None).await?;
    if !stored.is_empty() {
        eprintln!("proxytune demo: resuming with {} proxies stored", stored.len());
    }
    let stored_kept: Vec<Proxy> = stored.iter().filter(|p| p.keep == Some(true)).cloned().collect();
    let proxy_plan = plan(subject, class, args.proxies_per_prompt);
    let planned = proxy_plan.items().len() as u64;
    let generator = ProxyGenerator::new(
        ProxyGeneratorConfig {
            job_id: JOB.into(),
            subject: subject.name.clone(),
            model_dir: model_dir.clone(),
            device: device_name.clone(),
            plan: proxy_plan,
            sampling,
            stored_seeds: stored.iter().map(|p| p.seed).collect(),
        },
        &metrics,
    )?;
    let (dino, clip) = scorers(&args.world, device)?;
    let (_, clip_t) = scorers(&args.world, device)?;
    let embedders: Vec<(ImageMetric, Box<dyn ImageEmbedder + Send>)> =
        vec![(ImageMetric::Dino, Box::new(dino)), (ImageMetric::ClipI, Box::new(clip))];
    let mut filter = Filter::new(
        FilterConfig {
            min_fidelity: args.min_fidelity,
            fidelity_metric: Some(ImageMetric::Dino),
            min_prompt_adherence: None,
            max_duplicate_cosine: Some(args.max_duplicate_cosine),
            identifier: Some(IDENTIFIER.into()),
        },
        embedders,
        Some(Box::new(clip_t) as Box<dyn PromptScorer>),
        reference_rows,
        device,
        &metrics,
    )?;
    filter.remember_kept(&stored_kept)?;
    let tokenize = Tokenize::new(tokenize_config(&args.world, &device_name, true));
    let (trainer, trainer_stats) = ArTrainerActor::new(
        student_trainer_config(
            &args.world,
            &device_name,
            &args.out.join("student"),
            args.student_steps,
            args.student_min_rows,
            None,
            args.checkpoint_every,
        )?,
        &metrics,
    )?;
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

    let multi = MultiProgress::new();
    let steps = trainer_stats.clone();
    let progress = Progress {
        bars: vec![
            Progress::bar(&multi, "class priors", args.class_priors as u64, written(&prior_stats)),
            Progress::bar(&multi, "supervisor ready", 1, written(&supervisor_stats)),
            Progress::bar(&multi, "proxies filtered", planned, written(&proxy_stats)),
            Progress::bar(&multi, "kept, tokenized", planned, written(&vq_stats)),
            Progress::bar(
                &multi,
                "student steps",
                args.student_steps,
                Box::new(move || steps.lock().map(|s| s.steps).unwrap_or(0)),
            ),
        ],
    };
    let update = {
        let (priors, supervisor, proxies) =
            (prior_stats.clone(), supervisor_stats.clone(), proxy_stats.clone());
        let student = trainer_stats.clone();
        let job_progress = job_progress.clone();
        let (priors_planned, supervisor_planned, student_planned) =
            (args.class_priors as u64, args.supervisor_steps, args.student_steps);
        move || {
            let proxies = proxies.lock().expect("writer stats").clone();
            let student = student.lock().expect("trainer stats").clone();
            let mut p = job_progress.lock().expect("progress lock");
            p.class_priors = priors.lock().expect("writer stats").received_rows;
            p.class_priors_planned = priors_planned;
            p.supervisor_steps = tuner_steps.load(std::sync::atomic::Ordering::Relaxed);
            p.supervisor_steps_planned = supervisor_planned;
            p.supervisor_ready = supervisor.lock().expect("writer stats").received_rows > 0;
            p.proxies_stored = proxies.replayed_rows + proxies.written_rows;
            p.proxies_planned = planned;
            p.student_rows = student.rows_received as u64;
            p.student_steps = student.steps;
            p.student_steps_planned = student_planned;
            p.corpus_version = proxies.version;
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
    let running = p.start(&tokio::runtime::Handle::current())?;
    let report = steer(running, commands, || {
        progress.tick();
        update();
    })
    .await;
    progress.finish();
    update();
    let error = report.tasks.iter().find_map(|t| t.error.clone().map(|e| format!("{}: {e}", t.name)));
    let trainer = trainer_stats.lock().expect("trainer stats").clone();
    let proxies_version = proxy_stats.lock().expect("writer stats").version;
    let vq_version = vq_stats.lock().expect("writer stats").version;
    Ok(Run {
        outcome: report.outcome,
        seconds: started.elapsed().as_secs_f64(),
        trainer,
        proxies_version,
        vq_version,
        error,
    })
}

fn demo_models(args: &DemoArgs, device: &str) -> anyhow::Result<Vec<(String, Box<dyn Generator>)>> {
    let adapter = args.out.join("supervisor").join(proxytune_models::diffusion::dreambooth::LORA_FILE);
    Ok(vec![
        ("student (untuned)".into(), student(&args.world, None, device)?),
        ("supervisor (DreamBooth-LoRA)".into(), supervisor(&args.world, &adapter, device)?),
        (
            "student (Proxy-Tuned LoRA)".into(),
            student(&args.world, Some(&args.out.join("student/adapter_model.safetensors")), device)?,
        ),
    ])
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

/// Runs the demo from the command line (Ctrl-C cancels); returns the process exit code.
pub async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    check_settings(&args)?; // the folders are checked by `execute`, still before any work
    if args.metrics_port != 0 {
        crate::metrics_server::install(args.metrics_port)?;
    }
    let (cancel, commands) = tokio::sync::watch::channel(JobCommand::Run);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = cancel.send(JobCommand::Cancel);
        }
    });
    let code = execute(&args, commands, None, &ProgressHandle::default()).await?;
    if code == 0 && args.metrics_port != 0 && args.linger_seconds > 0 {
        tokio::time::sleep(Duration::from_secs(args.linger_seconds)).await;
    }
    Ok(code)
}

/// One demo job: the pipeline, the evaluation and the report under `args.out`, with the global
/// metrics recorder (with `job_id` on every series when given), steered by `commands` (pause,
/// resume, cancel: a cancel drains it). Returns the exit code (0 done, 130 cancelled).
pub async fn execute(
    args: &DemoArgs,
    commands: tokio::sync::watch::Receiver<JobCommand>,
    job_id: Option<&str>,
    progress: &ProgressHandle,
) -> anyhow::Result<i32> {
    let args = args.clone();
    let subject = check(&args)?;
    let class = subject.class_noun();
    let metrics = match job_id {
        Some(id) => Metrics::global().for_job(id),
        None => Metrics::global(),
    };
    metrics.describe_all();
    let corpus = Corpus::open_or_create(args.out.join("corpus"))?;
    let report_dir = args.out.join("report");
    std::fs::create_dir_all(&report_dir)?;
    eprintln!("proxytune demo: subject {} (a {class}), output {}", subject.name, args.out.display());
    let t0 = Instant::now();
    set_stage(progress, "starting");
    let run = pipeline(&args, &subject, &corpus, metrics.clone(), commands, progress).await?;
    if run.outcome == JobOutcome::Cancelled {
        set_stage(progress, "cancelled");
        eprintln!(
            "proxytune demo: cancelled; the corpus at {} keeps every committed row (`proxytune corpus info`)",
            corpus.root().display()
        );
        return Ok(run.outcome.exit_code());
    }
    if run.outcome != JobOutcome::Succeeded {
        anyhow::bail!(
            "the pipeline ended {:?}{}; the corpus at {} keeps every committed row",
            run.outcome,
            run.error.map(|e| format!(" ({e})")).unwrap_or_default(),
            corpus.root().display()
        );
    }

    // What the corpus holds now.
    let proxies: Vec<Proxy> = corpus.table::<Proxy>().await?.read_rows(None).await?;
    let priors: Vec<ClassPriorImage> = corpus.table::<ClassPriorImage>().await?.read_rows(None).await?;
    let vq_rows: Vec<VqTokens> = corpus.table::<VqTokens>().await?.read_rows(None).await?;
    let supervisors: Vec<Supervisor> = corpus.table::<Supervisor>().await?.read_rows(None).await?;
    let kept: Vec<&Proxy> = proxies.iter().filter(|p| p.keep == Some(true)).collect();
    let rejected: Vec<&Proxy> = proxies.iter().filter(|p| p.keep == Some(false)).collect();
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for p in &rejected {
        *reasons.entry(p.reject_reason.map(|r| r.as_str().to_string()).unwrap_or_default()).or_default() += 1;
    }
    let first_proxy_us = proxies.iter().map(|p| p.generated_at_us).min().unwrap_or(0);
    let last_proxy_us = proxies.iter().map(|p| p.generated_at_us).max().unwrap_or(0);
    let first_step_us = run.trainer.step_started_us.first().copied();
    let last_step_us = run.trainer.step_started_us.last().copied();
    let steps_before_last_proxy = run.trainer.step_started_us.iter().filter(|&&t| t < last_proxy_us).count();

    set_stage(progress, "evaluating");
    let t_eval = Instant::now();
    let device = device_name(&args.device)?;
    let spec = EvalSpec {
        world_dir: &args.world,
        out_dir: &args.out,
        device: &device,
        images_per_prompt: args.eval_images,
        max_prompts: args.eval_prompts,
    };
    let scores = evaluate(&spec, &subject, demo_models(&args, &device)?)?;
    let eval_seconds = t_eval.elapsed().as_secs_f64();

    set_stage(progress, "reporting");
    // Grids.
    save_grid(&subject.references, subject.references.len(), &report_dir.join("references.png"))?;
    let kept_imgs: Vec<_> = kept.iter().take(48).filter_map(|p| decode(&p.image_png)).collect();
    let rejected_imgs: Vec<_> = rejected.iter().take(48).filter_map(|p| decode(&p.image_png)).collect();
    let has_kept = save_grid(&kept_imgs, 12, &report_dir.join("proxies_kept.png"))?;
    let has_rejected = save_grid(&rejected_imgs, 12, &report_dir.join("proxies_rejected.png"))?;
    for (i, (_, s)) in scores.iter().enumerate() {
        let mut samples: Vec<&EvalSample> = s.images.iter().collect();
        samples.sort_by_key(|e| (e.prompt_index, e.sample_index));
        let imgs: Vec<_> = samples.iter().filter_map(|e| decode(&e.image_png)).collect();
        save_grid(&imgs, args.eval_images * 5, &report_dir.join(format!("samples_{i}.png")))?;
    }

    let seconds = |a: i64, b: i64| (b - a) as f64 / 1e6;
    let generation_seconds = seconds(first_proxy_us, last_proxy_us).max(1e-9);
    let report = serde_json::json!({
        "subject": subject.name, "class": class, "identifier": IDENTIFIER,
        "world_models": args.world.display().to_string(),
        "outcome": format!("{:?}", run.outcome),
        "stages": {
            "class_priors": throughput(priors.iter().map(|r| r.created_at_us)),
            "supervisor": {
                "steps": supervisors.first().map(|s| s.train_steps),
                "ready_at_us": supervisors.first().map(|s| s.created_at_us),
                "final_loss": supervisors.first().and_then(|s| s.final_loss),
                "steps_per_second": supervisors.first().map(|s| s.train_steps as f64
                    / seconds(priors.iter().map(|r| r.created_at_us).min().unwrap_or(s.created_at_us), s.created_at_us).max(1e-9)),
            },
            "filter": throughput(proxies.iter().filter_map(|p| p.filtered_at_us)),
            "proxies": { "rows": proxies.len(), "kept": kept.len(), "rejected": rejected.len(),
                         "reject_reasons": reasons,
                         "first_generated_at_us": first_proxy_us, "last_generated_at_us": last_proxy_us,
                         "per_second": proxies.len() as f64 / generation_seconds },
            "vq_tokens": throughput(vq_rows.iter().map(|r| r.created_at_us)),
            "student": { "steps": run.trainer.steps, "rows_received": run.trainer.rows_received,
                         "first_step_at_us": first_step_us, "last_step_at_us": last_step_us,
                         "steps_before_last_proxy": steps_before_last_proxy,
                         "losses": run.trainer.losses,
                         "steps_per_second": run.trainer.step_started_us.len() as f64
                             / seconds(first_step_us.unwrap_or(0), last_step_us.unwrap_or(0)).max(1e-9) },
        },
        "corpus": { "path": corpus.root().display().to_string(), "proxies_version": run.proxies_version,
                    "vq_tokens_version": run.vq_version, "rows_trained_on": run.trainer.rows_received },
        "pipeline_seconds": run.seconds,
        "evaluation_seconds": eval_seconds,
        "total_seconds": t0.elapsed().as_secs_f64(),
        "evaluation": { "images_per_prompt": args.eval_images,
                        "prompts": args.eval_prompts.unwrap_or(25).min(25),
                        "models": scores.iter().map(|(label, s)| serde_json::json!({"label": label, "scores": s})).collect::<Vec<_>>() },
    });
    std::fs::write(report_dir.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(report_dir.join("index.html"), html(&report, &scores, has_kept, has_rejected))?;
    for (i, (_, s)) in scores.iter().enumerate() {
        let model = ["student_untuned", "supervisor", "student"].get(i).copied().unwrap_or("model");
        record_scores(&metrics, model, s);
    }
    set_stage(progress, "done");
    eprintln!("report: {}", report_dir.join("index.html").display());
    println!("{}", serde_json::to_string_pretty(&report["evaluation"])?);
    Ok(0)
}
