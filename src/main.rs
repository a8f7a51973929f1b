//! The `proxytune` command line.
//!
//! Component map:
//! - [`job`]: the product's job: spec, check, stage plan, pipeline, evaluation (`proxytune run`).
//! - [`daemon`]: the long-running service: jobs over an HTTP API, persistence, `/metrics`.
//! - [`demo`]: the embedded demo — the whole mission on the toy world, end to end.
//! - [`replay`]: a fresh student from a stored corpus version (no generation), evaluated.
//! - [`ablate`]: the data-scaling and Filter ablations as replays of one corpus version.
//! - [`smoke`]: a development check (hidden): DreamBench references into a Lance corpus, an
//!   idempotent re-import, a filtered streaming scan, a few tch training steps.
//! - [`bench`]: benchmarks that print side-by-side ratios (`runtime`, `unet`, `ar`, `load` in
//!   [`bench_load`], `real-size` in [`bench_real`], `soak` in [`bench_soak`], `sample` in
//!   [`bench_sample`], `pipeline` in [`bench_pipeline`]).
//! - [`evaluate`]: DreamBench evaluation (the real-images row; supervisor and student).
//! - [`grafana_cmd`]: the Grafana dashboards as code, rendered to `grafana/dashboards`.
//! - [`loadgen`]: a synthetic pipeline into a real corpus, with `/metrics` and Ctrl-C drain.
//! - [`metrics_server`]: the Prometheus exporter on loopback.
//! - [`corpus_cmd`]: inspect a corpus (tables, rows, versions, fragments, tags).
//! - [`pretrain`]: pretraining the toy world's models (CLIP, DINO, supervisor, student).
//! - [`world_models`]: the world's models as the demo and replay use them, and the world's evaluation.
//! - [`report`]: the demo's report (grids, throughput, HTML).
//! - [`world_cmd`]: the toy world (export subjects as a DreamBench-layout folder).

mod ablate;
mod bench;
mod bench_load;
mod bench_pipeline;
mod bench_real;
mod bench_sample;
mod bench_soak;
mod corpus_cmd;
mod daemon;
mod demo;
mod evaluate;
mod grafana_cmd;
mod job;
mod loadgen;
mod metrics_server;
mod plots;
mod pretrain;
mod replay;
mod report;
mod smoke;
mod subject;
mod world_cmd;
mod world_models;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Teach autoregressive image models new subjects by Proxy-Tuning.
#[derive(Debug, Parser)]
#[command(name = "proxytune", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// See the whole method work with no downloads: the world preset of a job (one toy-world
    /// subject, the committed world models) through the streaming pipeline, the evaluation of
    /// supervisor and student, and report/index.html.
    Demo(Box<demo::DemoArgs>),
    /// Run a job from its spec (TOML: your photos, a diffusers supervisor folder, a Chameleon /
    /// Lumina-mGPT or LlamaGen student, every stage's settings): the streaming pipeline, the evaluation
    /// and report/index.html; `--check` checks the spec without loading a weight.
    Run(job::RunArgs),
    /// Run as a long-lived service: jobs from specs (run), on the world models (tune) and from
    /// stored corpora (replay) over a JSON HTTP API, queued, persisted and resumed, with /metrics
    /// and a status page.
    Daemon(daemon::DaemonArgs),
    /// Train a fresh student from a stored corpus version (optionally re-filtered), no
    /// generation, and evaluate it.
    Replay(Box<replay::ReplayArgs>),
    /// The paper's ablations as replays of a stored corpus version, no generation: the student on
    /// the first N kept proxies for several N (the data-scaling curve, plotted), and with the
    /// Filter's decisions against without them.
    Ablate(Box<ablate::AblateArgs>),
    /// Development check of the corpus and libtorch: imports DreamBench references into a Lance
    /// corpus (twice: the second writes nothing), scans it, trains a tiny network a few steps.
    #[command(hide = true)]
    Smoke(smoke::SmokeArgs),
    /// Load generator for the streaming runtime: a synthetic pipeline into a Lance corpus until
    /// done or Ctrl-C (drains, then exits 0 done, 130 cancelled, 1 failed, 124 deadline).
    #[command(hide = true)]
    Loadgen(loadgen::LoadgenArgs),
    /// Measure speed and memory side by side in one run (runtime, UNet, AR student, loading).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Score models on DreamBench: the real-images row, or supervisor and student side by side.
    Evaluate {
        #[command(subcommand)]
        command: evaluate::EvaluateCommand,
    },
    /// Inspect a stored corpus: tables, rows, versions, fragments, tags.
    Corpus {
        #[command(subcommand)]
        command: corpus_cmd::CorpusCommand,
    },
    /// Pretrain the toy world's models (CLIP, DINO, supervisor, student) from scratch.
    Pretrain {
        #[command(subcommand)]
        command: pretrain::PretrainCommand,
    },
    /// Render or check the Grafana dashboards (as code in grafana/src).
    Grafana {
        #[command(subcommand)]
        command: grafana_cmd::GrafanaCommand,
    },
    /// Export toy-world subjects as a DreamBench-layout folder.
    World {
        #[command(subcommand)]
        command: world_cmd::WorldCommand,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                "info,lance=warn,lance_core=warn,lance_file=warn,lance_io=warn",
            )
        }))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let code = match cli.command {
        Command::Demo(args) => runtime.block_on(demo::run(*args)),
        Command::Run(args) => runtime.block_on(job::run(args)),
        Command::Daemon(args) => runtime.block_on(daemon::run(args)),
        Command::Replay(args) => runtime.block_on(replay::run(*args)),
        Command::Ablate(args) => runtime.block_on(ablate::run(*args)),
        Command::Smoke(args) => runtime.block_on(smoke::run(args)).map(|()| 0),
        Command::Corpus { command } => runtime.block_on(corpus_cmd::run(command)).map(|()| 0),
        Command::Bench { command: bench::BenchCommand::Unet(args) } => bench::unet(args).map(|()| 0),
        Command::Bench { command: bench::BenchCommand::Ar(args) } => bench::ar(args).map(|()| 0),
        Command::Bench { command: bench::BenchCommand::Load(args) } => bench_load::run(args).map(|()| 0),
        Command::Bench { command: bench::BenchCommand::RealSize(args) } => bench_real::run(args).map(|()| 0),
        Command::Bench { command: bench::BenchCommand::Soak(args) } => bench_soak::run(args).map(|()| 0),
        Command::Bench { command: bench::BenchCommand::Sample(args) } => bench_sample::run(args).map(|()| 0),
        Command::Bench { command: bench::BenchCommand::Pipeline(args) } => {
            bench_pipeline::run(args).map(|()| 0)
        }
        Command::Bench { command: bench::BenchCommand::Runtime(args) } => {
            runtime.block_on(bench::runtime(args)).map(|()| 0)
        }
        Command::Loadgen(args) => runtime.block_on(loadgen::run(args)),
        Command::Evaluate { command } => evaluate::run(command).map(|()| 0),
        Command::Grafana { command } => grafana_cmd::run(command).map(|()| 0),
        Command::World { command } => world_cmd::run(command).map(|()| 0),
        Command::Pretrain { command } => pretrain::run(command).map(|()| 0),
    }?;
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    std::process::exit(code)
}

/// The DreamBench copy vendored in the repository (`actors/dreambench`).
fn default_dreambench() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("actors/dreambench")
}
