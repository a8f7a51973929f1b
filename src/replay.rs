//! `proxytune replay`: trains a fresh student from a stored corpus version — no generation — and
//! evaluates it. The proxies of the pinned version are streamed from Lance (the Filter's decisions
//! as stored, or new thresholds applied to the stored scores), VQ-tokenized and fed to the
//! student's trainer; the report names the version and the rows it trained on. A LlamaGen
//! student's caption states come from the corpus' `captions` table, not from its T5 again.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use proxytune_actors::corpus::reader::{CorpusReader, CorpusReaderConfig};
use proxytune_actors::corpus::{Corpus, VersionRef};
use proxytune_actors::runtime::{JobOutcome, Metrics, Pipeline, PipelineConfig};
use proxytune_actors::stages::ar_trainer::ArTrainerActor;
use proxytune_actors::stages::tokenize::Tokenize;
use proxytune_actors::world::{World, CLASSES};
use proxytune_schemas::{CaptionStates, Proxy, ReferenceImage, Table};

use crate::job::direct::Once;
use crate::job::pipeline::{steer, JobCommand, ProgressHandle};
use crate::job::plan::device_name;
use crate::subject::JobSubject;
use crate::world_models::{
    evaluate, student, student_trainer_config, tokenize_config, EvalSpec, WorldStudent,
};

/// Arguments of `proxytune replay`.
#[derive(Clone, Debug, clap::Args)]
pub struct ReplayArgs {
    /// The corpus (e.g. `out/demo/corpus`).
    #[arg(long)]
    pub corpus: PathBuf,
    /// The proxies table version (number or tag); the newest when absent.
    #[arg(long)]
    pub version: Option<String>,
    /// Re-filter: keep proxies whose stored world-DINO fidelity is at least this.
    #[arg(long)]
    pub min_fidelity: Option<f32>,
    /// Re-filter: keep proxies whose stored CLIP-T is at least this.
    #[arg(long)]
    pub min_prompt_adherence: Option<f32>,
    /// Ignore the Filter: train on every stored proxy, the rejected ones included.
    #[arg(long, conflicts_with_all = ["min_fidelity", "min_prompt_adherence"])]
    pub no_filter: bool,
    /// Train on the first this many selected proxies only, in the order the job stored them.
    #[arg(long)]
    pub first: Option<usize>,
    /// Output folder (student/, report.json).
    #[arg(long, default_value = "out/replay")]
    pub out: PathBuf,
    /// The pretrained world models.
    #[arg(long, default_value = "models/world")]
    pub world: PathBuf,
    /// World seed of the corpus' subject.
    #[arg(long, default_value_t = 7)]
    pub world_seed: u64,
    /// The world student to train: the Lumina-mGPT-style Chameleon or the LlamaGen-style one.
    #[arg(long, value_enum, default_value_t = WorldStudent::Chameleon)]
    pub student: WorldStudent,
    /// Student LoRA optimiser steps.
    #[arg(long, default_value_t = 400)]
    pub student_steps: u64,
    /// Evaluation images per prompt.
    #[arg(long, default_value_t = 4)]
    pub eval_images: usize,
    /// Evaluate only the first this many prompts.
    #[arg(long)]
    pub eval_prompts: Option<usize>,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// The Lance filter selecting the proxies to train on.
fn selection(args: &ReplayArgs) -> String {
    if args.no_filter {
        return "true".into();
    }
    if args.min_fidelity.is_none() && args.min_prompt_adherence.is_none() {
        return "keep = true".into();
    }
    // New thresholds replace the stored fidelity/adherence decisions; duplicates stay rejected.
    let mut terms = vec!["(reject_reason IS NULL OR reject_reason <> 'near_duplicate')".to_string()];
    if let Some(f) = args.min_fidelity {
        terms.push(format!("score_dino >= {f}"));
    }
    if let Some(a) = args.min_prompt_adherence {
        terms.push(format!("score_clip_t >= {a}"));
    }
    terms.join(" AND ")
}

/// Runs a replay from the command line (Ctrl-C cancels); returns the process exit code.
pub async fn run(args: ReplayArgs) -> anyhow::Result<i32> {
    let (cancel, commands) = tokio::sync::watch::channel(JobCommand::Run);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = cancel.send(JobCommand::Cancel);
        }
    });
    execute(&args, commands, None, &ProgressHandle::default()).await
}

/// Checks a replay's settings and its corpus before any work: returns the pinned version, the
/// selection and the number of rows it selects.
pub(crate) async fn check(args: &ReplayArgs) -> anyhow::Result<(u64, String, usize)> {
    anyhow::ensure!(
        args.student_steps > 0 && args.eval_images > 0,
        "--student-steps and --eval-images must be positive"
    );
    anyhow::ensure!(args.eval_prompts != Some(0), "--eval-prompts is 0: a budget must be positive");
    crate::world_models::check_models(&args.world, &["clip", "dino", args.student.folder()])?;
    let corpus = Corpus::open(&args.corpus)?;
    let version_ref: Option<VersionRef> = args.version.as_deref().map(|v| v.parse().expect("infallible"));
    let table = corpus.table::<Proxy>().await?;
    let table = match &version_ref {
        Some(v) => table.checkout(v).await?,
        None => table,
    };
    let version =
        table.version().with_context(|| format!("{}: the proxies table is empty", args.corpus.display()))?;
    anyhow::ensure!(args.first != Some(0), "--first is 0: a replay needs rows to train on");
    let filter = selection(args);
    let rows = table.count_rows(Some(&filter)).await?;
    anyhow::ensure!(rows > 0, "{} version {version}: no proxy passes `{filter}`", args.corpus.display());
    Ok((version, filter, args.first.map_or(rows, |n| n.min(rows))))
}

/// One replay: trains a fresh student on the selected rows of the pinned version under
/// `args.out`, evaluates it and writes `report.json`; steered by `commands` (a cancel drains it).
/// Returns the exit code (0 done, 130 cancelled).
pub async fn execute(
    args: &ReplayArgs,
    commands: tokio::sync::watch::Receiver<JobCommand>,
    job_id: Option<&str>,
    progress: &ProgressHandle,
) -> anyhow::Result<i32> {
    let (version, filter, rows) = check(args).await?;
    let corpus = Corpus::open(&args.corpus)?;
    let table = corpus.table::<Proxy>().await?.checkout(&VersionRef::Number(version)).await?;
    // Metadata only: the subject check needs no image.
    let sample: Vec<Proxy> = table.read_rows_light(Some(&filter)).await?;
    let subject_name = sample[0].subject.clone();
    crate::subject::check_name(&subject_name)
        .with_context(|| format!("{}: the subject", args.corpus.display()))?;
    anyhow::ensure!(
        sample.iter().all(|p| p.subject == subject_name),
        "{}: the selected proxies are of several subjects; a replay trains one",
        args.corpus.display()
    );
    let world = World::new(args.world_seed, CLASSES.len());
    let references: Vec<ReferenceImage> = corpus
        .table::<ReferenceImage>()
        .await?
        .read_rows(Some(&format!("subject = '{}'", subject_name.replace('\'', "''"))))
        .await?;
    let subject = JobSubject::stored(&world, &references)
        .with_context(|| format!("{}: the subject `{subject_name}`", args.corpus.display()))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out {}: cannot create it", args.out.display()))?;
    let device = device_name(&args.device)?;
    let started = Instant::now();

    let reader = CorpusReader::<Proxy>::new(
        corpus.clone(),
        CorpusReaderConfig {
            version: Some(VersionRef::Number(version)),
            filter: Some(filter.clone()),
            batch_rows: 32,
            limit_rows: args.first,
        },
    );
    let metrics = match job_id {
        Some(id) => Metrics::global().for_job(id),
        None => Metrics::global(),
    };
    metrics.describe_all();
    let (trainer, stats) = ArTrainerActor::new(
        student_trainer_config(
            &args.world,
            args.student,
            &device,
            &args.out.join("student"),
            args.student_steps,
            rows.min(16),
            Some(version),
            100,
        )?,
        &metrics,
    )?;
    let mut p = Pipeline::new(PipelineConfig::default(), metrics.clone());
    let src = p.async_source("corpus_reader", reader);
    let tokenize = tokenize_config(&args.world, args.student, &device, false)?;
    // The caption states the corpus stores (LlamaGen) go to the trainer as they are; only a prompt
    // without them is encoded.
    let stored_captions: Vec<CaptionStates> = match &tokenize.caption_encoder_id {
        Some(id) => {
            let filter = format!("encoder_id = '{}'", id.replace('\'', "''"));
            corpus.table::<CaptionStates>().await?.read_rows(Some(&filter)).await?
        }
        None => Vec::new(),
    };
    let captions = tokenize.caption_encoder_id.is_some();
    let tokenize =
        Tokenize::new(tokenize).with_stored_captions(stored_captions.iter().map(|c| c.prompt.clone()));
    let encoded = tokenize.captions_encoded();
    let tok = p.operator("tokenize", tokenize);
    let train = p.operator("ar_trainer", trainer);
    p.connect(src, tok).connect(tok, train);
    if captions {
        // Each prompt's caption states, on the trainer's second input: the stored ones, and any
        // the tokenize step had to encode.
        p.connect_port(tok, 1, train);
        if !stored_captions.is_empty() {
            let stored = p.source("caption_reader", Once(Some(CaptionStates::to_batch(&stored_captions)?)));
            p.connect(stored, train);
        }
    }
    {
        let mut p = progress.lock().expect("progress lock");
        p.stage = "training student".into();
        p.student_steps_planned = args.student_steps;
        p.proxies_stored = rows as u64;
        p.corpus_version = Some(version);
    }
    let running = p.start(&tokio::runtime::Handle::current())?;
    let report = steer(running, commands, || {
        let s = stats.lock().expect("trainer stats").clone();
        let mut p = progress.lock().expect("progress lock");
        p.student_steps = s.steps;
        p.student_rows = s.rows_received as u64;
    })
    .await;
    let trained = stats.lock().expect("trainer stats").clone();
    {
        let mut p = progress.lock().expect("progress lock");
        p.student_steps = trained.steps;
        p.student_rows = trained.rows_received as u64;
    }
    if report.outcome == JobOutcome::Cancelled {
        progress.lock().expect("progress lock").stage = "cancelled".into();
        return Ok(report.outcome.exit_code());
    }
    if report.outcome != JobOutcome::Succeeded {
        let error = report.tasks.iter().find_map(|t| t.error.clone().map(|e| format!("{}: {e}", t.name)));
        anyhow::bail!("the replay ended {:?} {}", report.outcome, error.unwrap_or_default());
    }
    let train_seconds = started.elapsed().as_secs_f64();
    progress.lock().expect("progress lock").stage = "evaluating".into();
    let spec = EvalSpec {
        world_dir: &args.world,
        out_dir: &args.out,
        device: &device,
        images_per_prompt: args.eval_images,
        max_prompts: args.eval_prompts,
    };
    let adapter = args.out.join("student/adapter_model.safetensors");
    let scores = evaluate(
        &spec,
        &subject,
        vec![(
            "student (replayed)".into(),
            Box::new(|| student(&args.world, args.student, Some(&adapter), &device)),
        )],
    )?;
    for (_, s) in &scores {
        crate::report::record_scores(&metrics, "student", s);
    }
    let out = serde_json::json!({
        "corpus": args.corpus.display().to_string(),
        "proxies_version": version,
        "selection": filter,
        "first": args.first,
        "captions_reused": stored_captions.len(),
        "captions_encoded": encoded.load(std::sync::atomic::Ordering::Relaxed),
        "rows_selected": rows,
        "rows_trained_on": trained.rows_received,
        "student_steps": trained.steps,
        "train_seconds": train_seconds,
        "subject": subject.name,
        "evaluation": scores.iter().map(|(label, s)| serde_json::json!({"label": label, "scores": s})).collect::<Vec<_>>(),
    });
    std::fs::write(args.out.join("report.json"), serde_json::to_string_pretty(&out)?)?;
    progress.lock().expect("progress lock").stage = "done".into();
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}
