//! `proxytune loadgen`: a long-running synthetic pipeline into a real Lance corpus, with `/metrics`
//! and Ctrl-C handling. It drives the runtime, the corpus writer and the metrics exactly as a job
//! does, without models — for diagnostics, dashboards and soak tests.
//!
//! Ctrl-C (SIGINT) or SIGTERM cancels: the source stops, every queued row is written and
//! committed, and the process exits with the outcome's code (0 done, 130 cancelled, 1 failed,
//! 124 shutdown deadline exceeded). A second signal aborts at once.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use proxytune_actors::corpus::writer::{LanceWriter, LanceWriterConfig};
use proxytune_actors::corpus::Corpus;
use proxytune_actors::runtime::synthetic::{PassThrough, SyntheticConfig, SyntheticProxies};
use proxytune_actors::runtime::{Metrics, Pipeline, PipelineConfig};
use proxytune_schemas::Proxy;
use serde::Serialize;

/// Arguments of `proxytune loadgen`.
#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    /// Corpus directory to write into (created if missing).
    #[arg(long)]
    corpus: PathBuf,
    /// Job id written into every row (rows are keyed by it, so a rerun with the same id writes nothing new).
    #[arg(long, default_value = "loadgen")]
    job_id: String,
    /// Batches to produce; runs until cancelled when absent.
    #[arg(long)]
    batches: Option<u64>,
    /// Rows per batch.
    #[arg(long, default_value_t = 64)]
    batch_rows: usize,
    /// PNG payload bytes per row.
    #[arg(long, default_value_t = 4096)]
    payload_bytes: usize,
    /// Pause between source batches.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// Simulated compute per batch in the middle stage.
    #[arg(long, default_value_t = 0)]
    work_ms: u64,
    /// Emit a checkpoint barrier (the writer commits) every this many batches; 0 never.
    #[arg(long, default_value_t = 8)]
    barrier_every_batches: u64,
    /// Pipeline config (TOML: edge capacities, shutdown limit); defaults when absent.
    #[arg(long)]
    pipeline_config: Option<PathBuf>,
    /// Serve Prometheus `/metrics` on this loopback port (0: a free port, logged).
    #[arg(long)]
    metrics_port: Option<u16>,
}

#[derive(Debug, Serialize)]
struct LoadgenReport {
    outcome: proxytune_actors::runtime::JobOutcome,
    produced_rows: u64,
    written_rows: u64,
    skipped_rows: u64,
    undelivered_rows: u64,
    corpus_version: Option<u64>,
    tasks: Vec<proxytune_actors::runtime::pipeline::TaskReport>,
}

/// Runs the load generator; returns the process exit code.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<i32> {
    let config: PipelineConfig = match &args.pipeline_config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => PipelineConfig::default(),
    };
    if let Some(port) = args.metrics_port {
        crate::metrics_server::install(port).await?;
    }
    let metrics = Metrics::global();
    let corpus = Corpus::open_or_create(&args.corpus)?;
    let (source, produced) = SyntheticProxies::new(SyntheticConfig {
        job_id: args.job_id.clone(),
        batch_rows: args.batch_rows,
        batches: args.batches,
        payload_bytes: args.payload_bytes,
        interval_ms: args.interval_ms,
        barrier_every_batches: args.barrier_every_batches,
    });
    let (writer, stats) = LanceWriter::<Proxy>::new(corpus, LanceWriterConfig::default(), &metrics);
    let mut p = Pipeline::new(config, metrics);
    let src = p.source("loadgen", source);
    let work = p.operator("work", PassThrough { work_ms: args.work_ms });
    let sink = p.async_operator("lance_writer", writer);
    p.connect(src, work).connect(work, sink);
    let running = p.start(&tokio::runtime::Handle::current())?;
    let handle = running.handle();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        for round in 0.. {
            tokio::select! {
                r = tokio::signal::ctrl_c() => if r.is_err() { return },
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
            }
            if round == 0 {
                tracing::info!("Signal received: draining (send it again to abort).");
                handle.control().cancel();
            } else {
                tracing::warn!("Second signal: aborting.");
                handle.control().abort();
                return;
            }
        }
    });
    tracing::info!(corpus = %args.corpus.display(), "Load generator running.");
    let report = running.wait().await;
    let stats = stats.lock().expect("writer stats").clone();
    let out = LoadgenReport {
        outcome: report.outcome.clone(),
        produced_rows: produced.load(Ordering::SeqCst),
        written_rows: stats.written_rows,
        skipped_rows: stats.skipped_rows,
        undelivered_rows: report.undelivered_rows(),
        corpus_version: stats.version,
        tasks: report.tasks,
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(report.outcome.exit_code())
}
