//! `proxytune daemon --config <file>`: proxytune as a long-running service. Clients submit world
//! subjects as jobs over a JSON HTTP API; jobs queue and run `concurrency` at a time (one job's
//! failure does not stop the others), each with its own corpus, checkpoints and report under
//! `<data_dir>/jobs/<id>/`; `/metrics` and a small HTML status page are served beside the API.
//! A restarted daemon queues its unfinished jobs again, and they resume from their checkpoints and
//! corpus.
//!
//! Security: the daemon binds loopback by default; binding any other address needs a bearer token
//! (config `token` or `PROXYTUNE_TOKEN`), which every request must then carry. Request bodies are
//! size-limited and job specs validated (unknown fields refused, the subject and budgets checked)
//! before anything is queued.
//!
//! Routes: `GET /` (status page), `GET /metrics`, `GET /jobs`, `POST /jobs`, `GET /jobs/{id}`,
//! `POST /jobs/{id}/pause`, `POST /jobs/{id}/resume`, `POST /jobs/{id}/cancel`,
//! `GET /jobs/{id}/report`.

mod http;
pub mod jobs;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::Deserialize;

use jobs::{JobSpec, JobState, JobStore};

use crate::demo::{JobCommand, JobProgress, ProgressHandle};

/// Arguments of `proxytune daemon`.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// The daemon's config (TOML).
    #[arg(long)]
    config: PathBuf,
}

/// The daemon's config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Address to serve on (loopback by default).
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Where jobs, corpora and reports live.
    pub data_dir: PathBuf,
    /// Bearer token every request must carry (required off loopback; `PROXYTUNE_TOKEN` also sets it).
    #[serde(default)]
    pub token: Option<String>,
    /// Jobs running at once.
    #[serde(default = "one")]
    pub concurrency: usize,
    /// The pretrained world models.
    #[serde(default = "default_world")]
    pub world: PathBuf,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Device of the jobs: auto, cpu, cuda, cuda:N.
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_bind() -> SocketAddr {
    ([127, 0, 0, 1], 8640).into()
}
fn one() -> usize {
    1
}
fn default_world() -> PathBuf {
    PathBuf::from("models/world")
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_device() -> String {
    "auto".into()
}

impl DaemonConfig {
    /// Reads and checks a config file; refuses a non-loopback bind without a token.
    pub fn read(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
        let mut config: DaemonConfig =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        if config.token.is_none() {
            config.token = std::env::var("PROXYTUNE_TOKEN").ok().filter(|t| !t.is_empty());
        }
        if !config.bind.ip().is_loopback() && config.token.is_none() {
            anyhow::bail!(
                "{}: bind {} is not loopback, so a bearer token is required (`token` or PROXYTUNE_TOKEN)",
                path.display(),
                config.bind
            );
        }
        anyhow::ensure!(config.concurrency > 0, "{}: concurrency must be at least 1", path.display());
        Ok(config)
    }
}

/// What the server and the runner share.
pub struct Shared {
    config: DaemonConfig,
    store: Mutex<JobStore>,
    controls: Mutex<HashMap<String, tokio::sync::watch::Sender<JobCommand>>>,
    progress: Mutex<HashMap<String, ProgressHandle>>,
    wake: tokio::sync::Notify,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

impl Shared {
    fn store(&self) -> std::sync::MutexGuard<'_, JobStore> {
        self.store.lock().expect("job store lock")
    }

    /// The progress of job `id` in this daemon's lifetime (its last run's, once it ended).
    fn progress(&self, id: &str) -> Option<JobProgress> {
        let handle = self.progress.lock().expect("progress lock").get(id).cloned();
        handle.map(|h| h.lock().expect("progress lock").clone())
    }

    /// Validates a spec (the subject exists, budgets are positive) and queues it.
    fn submit(&self, spec: JobSpec) -> anyhow::Result<jobs::Job> {
        crate::demo::check_settings(&spec.demo_args(
            PathBuf::new(),
            self.config.world.clone(),
            "cpu".into(),
        ))?;
        let job = self.store().submit(spec)?;
        self.wake.notify_one();
        Ok(job)
    }

    /// Tells job `id` to pause, resume or cancel. `None`: no such job; `Some(false)`: not in a
    /// state where the command applies (a finished job, pausing a queued one, …).
    fn command(&self, id: &str, command: JobCommand) -> anyhow::Result<Option<bool>> {
        let Some(job) = self.store().get(id).cloned() else { return Ok(None) };
        let send = |c: JobCommand| {
            if let Some(tx) = self.controls.lock().expect("control lock").get(id) {
                let _ = tx.send(c);
            }
        };
        let now = proxytune_schemas::now_us();
        let next = match (command, job.state) {
            (JobCommand::Cancel, JobState::Queued) => Some(JobState::Cancelled),
            (JobCommand::Cancel, JobState::Running | JobState::Paused) => {
                send(JobCommand::Cancel);
                None
            }
            (JobCommand::Pause, JobState::Running) => {
                send(JobCommand::Pause);
                Some(JobState::Paused)
            }
            (JobCommand::Run, JobState::Paused) => {
                send(JobCommand::Run);
                Some(JobState::Running)
            }
            _ => return Ok(Some(false)),
        };
        if let Some(state) = next {
            self.store().update(id, |j| {
                j.state = state;
                if state == JobState::Cancelled {
                    j.finished_at_us = Some(now);
                }
            })?;
        }
        Ok(Some(true))
    }
}

/// Starts queued jobs while slots are free; each job runs on its own task.
async fn runner(shared: Arc<Shared>) {
    loop {
        let running = shared.controls.lock().expect("cancel lock").len();
        let next =
            (running < shared.config.concurrency).then(|| shared.store().next_queued().cloned()).flatten();
        let Some(job) = next else {
            shared.wake.notified().await;
            continue;
        };
        let (tx, rx) = tokio::sync::watch::channel(JobCommand::Run);
        shared.controls.lock().expect("cancel lock").insert(job.id.clone(), tx);
        let started = shared.store().update(&job.id, |j| {
            j.state = JobState::Running;
            j.attempts += 1;
            j.started_at_us = Some(proxytune_schemas::now_us());
        });
        if let Err(e) = started {
            tracing::error!(job = %job.id, error = %e, "cannot record the job's start");
        }
        let progress = ProgressHandle::default();
        shared.progress.lock().expect("progress lock").insert(job.id.clone(), progress.clone());
        let shared2 = shared.clone();
        tokio::spawn(async move {
            let out = shared2.store().dir(&job.id);
            let args = job.spec.demo_args(out, shared2.config.world.clone(), shared2.config.device.clone());
            tracing::info!(job = %job.id, subject = %job.spec.subject, "job starts");
            // The job's own synchronous work (model loading, evaluation) runs on a blocking
            // thread, so the API's async workers stay free.
            let handle = tokio::runtime::Handle::current();
            let id = job.id.clone();
            let result = tokio::task::spawn_blocking(move || {
                handle.block_on(crate::demo::execute(&args, rx, Some(&id), &progress))
            })
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the job's thread panicked: {e}")));
            let (state, error) = match result {
                Ok(0) => (JobState::Succeeded, None),
                Ok(130) => (JobState::Cancelled, None),
                Ok(code) => (JobState::Failed, Some(format!("ended with code {code}"))),
                Err(e) => (JobState::Failed, Some(format!("{e:#}"))),
            };
            tracing::info!(job = %job.id, ?state, error = ?error, "job ends");
            if let Err(e) = shared2.store().update(&job.id, |j| {
                j.state = state;
                j.error = error;
                j.finished_at_us = Some(proxytune_schemas::now_us());
            }) {
                tracing::error!(job = %job.id, error = %e, "cannot record the job's end");
            }
            shared2.controls.lock().expect("cancel lock").remove(&job.id);
            shared2.wake.notify_one();
        });
    }
}

/// Runs the daemon until the process is stopped.
pub async fn run(args: DaemonArgs) -> anyhow::Result<i32> {
    let config = DaemonConfig::read(&args.config)?;
    let store = JobStore::open(&config.data_dir)?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&proxytune_schemas::metrics::DURATION_BUCKETS_SECONDS)?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
    tracing::info!(bind = %config.bind, data_dir = %config.data_dir.display(), "proxytune daemon serving");
    let shared = Arc::new(Shared {
        config,
        store: Mutex::new(store),
        controls: Mutex::new(HashMap::new()),
        progress: Mutex::new(HashMap::new()),
        wake: tokio::sync::Notify::new(),
        metrics,
    });
    tokio::spawn(runner(shared.clone()));
    shared.wake.notify_one();
    http::serve(listener, shared).await
}
