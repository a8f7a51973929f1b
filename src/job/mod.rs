//! The job: the product's entry point. A [`spec::JobSpec`] names the user's photos, their
//! supervisor (a diffusers folder) and student (a Chameleon / Lumina-mGPT folder) and every stage's
//! settings; it is checked without loading a weight ([`check`]), resolved once into each stage's
//! config ([`plan`]) and run as one streaming pipeline ([`pipeline`], [`execute`]), then evaluated
//! ([`evaluate`]) and reported. `proxytune run`, the demo (the world preset) and the daemon run
//! their jobs through here.
//!
//! Component map:
//! - [`spec`]: the typed spec (TOML here, the same structure as JSON), published defaults.
//! - [`check`]: `run --check`: configs, tokenizers, weight files and their shapes from the
//!   safetensors headers, the identifier, resolutions, photos; every problem named.
//! - [`prompts`]: DreamBench's prompt templates (vendored) and template files.
//! - [`plan`]: the spec resolved into each stage's config ([`plan::StagePlan`]); scorer sources.
//! - [`pipeline`]: the streaming pipeline of a plan, progress, pause / resume / cancel.
//! - [`execute`]: pipeline, evaluation and report of one job.
//! - [`direct`]: the `direct-lora` baseline, the student trained on the references alone.
//! - [`evaluate`]: the DreamBench protocol on the job's own one-subject bench.

pub mod check;
pub mod direct;
pub mod evaluate;
pub mod execute;
pub mod pipeline;
pub mod plan;
pub mod prompts;
pub mod spec;

use std::path::PathBuf;

use pipeline::{JobCommand, ProgressHandle};

/// Arguments of `proxytune run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The job spec (TOML; see the README's "Job spec" section).
    pub spec: PathBuf,
    /// Only check the spec, its models, tokenizers, photos and resolutions without loading a
    /// weight: print what each stage will load, list every problem, and exit (0: no problems,
    /// 1: some).
    #[arg(long)]
    pub check: bool,
}

/// Runs `proxytune run`: the check, then (without `--check`) the job, Ctrl-C draining it; returns
/// the exit code (0 done, 1 problems found, 130 cancelled).
pub async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let spec = spec::JobSpec::read(&args.spec)?;
    // The check builds the small models and the plan decodes photos: torch and file work, kept off
    // the async runtime.
    let (spec, report) = tokio::task::spawn_blocking(move || {
        let report = check::check(&spec);
        (spec, report)
    })
    .await?;
    print!("{}", report.render());
    if !report.problems.is_empty() {
        return Ok(1);
    }
    if args.check {
        return Ok(0);
    }
    std::fs::create_dir_all(&spec.output)
        .map_err(|e| anyhow::anyhow!("output {}: cannot create it: {e}", spec.output.display()))?;
    let metrics_port = spec.metrics_port;
    let plan = tokio::task::spawn_blocking(move || plan::resolve(&spec, "run")).await??;
    if let Some(port) = metrics_port {
        crate::metrics_server::install(port).await?;
    }
    let (cancel, commands) = tokio::sync::watch::channel(JobCommand::Run);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = cancel.send(JobCommand::Cancel);
        }
    });
    execute::execute(&plan, &evaluate::SpecEvaluator, commands, None, &ProgressHandle::default()).await
}
