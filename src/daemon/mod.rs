//! `proxytune daemon --config <file>`: proxytune as a long-running service. Clients submit jobs
//! over a JSON HTTP API: tune jobs (a world subject, or photos uploaded in the request or in a
//! folder under the configured roots) and replay jobs (a stored corpus version and a filter). Jobs
//! queue and run `concurrency` at a time (one job's failure does not stop the others), each with
//! its own corpus, checkpoints and report under `<data_dir>/jobs/<id>/`; `/metrics` and a small
//! HTML status page are served beside the API. A restarted daemon queues its unfinished jobs
//! again, and they resume from their checkpoints and corpus; SIGTERM or Ctrl-C stops it gracefully
//! (running jobs drain and are queued again). An evaluation of a job's latest student checkpoint can
//! be asked for at any time.
//!
//! Security: the daemon binds loopback by default; binding any other address needs a bearer token
//! (config `token` or `PROXYTUNE_TOKEN`), which every request must then carry. Request bodies and
//! photos are size-limited, photos' count, sizes and formats checked, names, class nouns and
//! identifiers validated, paths confined to the configured `roots`, and unknown fields refused,
//! all before anything is queued.
//!
//! Routes (see `openapi.yaml`): `GET /` (status page), `GET /metrics`, `GET /jobs`, `POST /jobs`,
//! `GET /jobs/{id}`, `POST /jobs/{id}/pause|resume|cancel|evaluate`, `GET /jobs/{id}/report`,
//! `GET /jobs/{id}/files/{path}`.

mod http;
pub mod jobs;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::Deserialize;

use jobs::{JobSpec, JobState, JobStore};

use crate::job::pipeline::{JobCommand, JobProgress, ProgressHandle};

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
    /// Address to serve on (loopback by default; port 0 picks a free port, which is logged).
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
    /// Folders that job specs may name (subject photos, corpora); none: paths are refused.
    #[serde(default)]
    pub roots: Vec<PathBuf>,
    /// Largest photo accepted in an upload, in bytes (decoded).
    #[serde(default = "default_max_photo")]
    pub max_photo_bytes: usize,
    /// Upper bounds on what one job may ask for, checked at submission.
    #[serde(default)]
    pub limits: JobLimits,
    /// Host names clients may reach the daemon by, besides its bind address, `localhost` and
    /// loopback addresses (`name` or `name:port`). Any other `Host` header is refused (403), which
    /// defeats DNS rebinding; state-changing requests must also come from such an origin.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Connections served at once; one more is answered 503 and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers, and again its body.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_seconds: u64,
    /// Jobs that may wait in the queue; one more submission is answered 429.
    #[serde(default = "default_max_queued")]
    pub max_queued_jobs: usize,
    /// Requests one client address may make per second (a burst of twice that); more are
    /// answered 429 with `Retry-After`.
    #[serde(default = "default_max_rate")]
    pub max_requests_per_second: f64,
    /// Retention: ended jobs kept (the newest by end); older ones are deleted as `DELETE` does,
    /// when a job ends and at start. None: all.
    #[serde(default)]
    pub keep_jobs: Option<usize>,
    /// Retention: days an ended job is kept. None: forever.
    #[serde(default)]
    pub keep_days: Option<f64>,
    /// A metric series not updated for this many seconds leaves `/metrics` (an ended job's
    /// series stop being exported; a running job updates its own). 0: never.
    #[serde(default = "default_metrics_idle")]
    pub metrics_idle_seconds: u64,
    /// A graceful stop waits this long for running jobs to drain, then exits anyway (code 1):
    /// jobs still draining resume from their last checkpoints at the next start, as after a crash.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_seconds: u64,
    /// When a job succeeds, its corpus keeps its newest version of each table (tagged `job-end`)
    /// and its tagged ones, and the other versions are removed ([`proxytune_actors::corpus::Corpus::tidy`]).
    #[serde(default = "yes")]
    pub tidy_corpora: bool,
    /// Let two jobs, or a job and evaluate-now, put their models on one GPU (off: a queued job
    /// waits until no running or paused job uses its GPUs, and evaluate-now is refused, 409).
    #[serde(default)]
    pub share_gpu: bool,
}

fn yes() -> bool {
    true
}

/// Upper bounds on one job's budgets: a submission over one is refused (400) with the limit
/// named, before anything is planned or stored.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobLimits {
    /// Images one job may generate: proxies, class priors and evaluation samples together.
    pub max_images: u64,
    /// Optimiser steps of either trainer, and denoising steps of one sample.
    pub max_steps: u64,
    /// Pixels of one subject photo (width × height, read from its header before it is decoded):
    /// the default takes a 12-megapixel phone photo (4032 × 3024) and refuses 4096 × 4096.
    pub max_photo_pixels: u64,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits { max_images: 100_000, max_steps: 100_000, max_photo_pixels: 16_000_000 }
    }
}

impl JobLimits {
    /// Checks `images` (what, count) and `steps` (what, count) against the limits.
    fn check(&self, images: &[(&str, u128)], steps: &[(&str, u64)]) -> anyhow::Result<()> {
        let total: u128 = images.iter().map(|(_, n)| *n).sum();
        if total > u128::from(self.max_images) {
            let parts: Vec<String> = images.iter().map(|(what, n)| format!("{what} {n}")).collect();
            anyhow::bail!(
                "the job would generate {total} images ({}), over the daemon's limits.max_images ({})",
                parts.join(", "),
                self.max_images
            );
        }
        for (what, n) in steps {
            anyhow::ensure!(
                *n <= self.max_steps,
                "{what} is {n}, over the daemon's limits.max_steps ({})",
                self.max_steps
            );
        }
        Ok(())
    }
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
    16 * 1024 * 1024
}
fn default_max_photo() -> usize {
    4 * 1024 * 1024
}
fn default_device() -> String {
    "auto".into()
}
fn default_max_connections() -> usize {
    256
}
fn default_request_timeout() -> u64 {
    30
}
fn default_max_queued() -> usize {
    1000
}
fn default_max_rate() -> f64 {
    1000.0
}
fn default_metrics_idle() -> u64 {
    86_400
}

fn default_shutdown_timeout() -> u64 {
    300
}

impl DaemonConfig {
    /// Reads and checks a config file; refuses a non-loopback bind without a token.
    pub fn read(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
        let mut config: DaemonConfig =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        anyhow::ensure!(
            config.token.as_deref() != Some(""),
            "{}: `token` is empty; give a secret or remove the line",
            path.display()
        );
        if config.token.is_none() {
            config.token = std::env::var("PROXYTUNE_TOKEN").ok().filter(|t| !t.is_empty());
        }
        anyhow::ensure!(config.max_connections > 0, "{}: max_connections must be at least 1", path.display());
        anyhow::ensure!(config.max_queued_jobs > 0, "{}: max_queued_jobs must be at least 1", path.display());
        anyhow::ensure!(
            config.keep_days.is_none_or(|d| d.is_finite() && d >= 0.0),
            "{}: keep_days must be a number of days, at least 0",
            path.display()
        );
        anyhow::ensure!(
            config.max_requests_per_second.is_finite() && config.max_requests_per_second > 0.0,
            "{}: max_requests_per_second must be a positive number",
            path.display()
        );
        anyhow::ensure!(
            config.request_timeout_seconds > 0,
            "{}: request_timeout_seconds must be at least 1",
            path.display()
        );
        if !config.bind.ip().is_loopback() && config.token.is_none() {
            anyhow::bail!(
                "{}: bind {} is not loopback, so a bearer token is required (`token` or PROXYTUNE_TOKEN)",
                path.display(),
                config.bind
            );
        }
        anyhow::ensure!(config.concurrency > 0, "{}: concurrency must be at least 1", path.display());
        for root in &mut config.roots {
            *root = root
                .canonicalize()
                .with_context(|| format!("{}: root {} does not exist", path.display(), root.display()))?;
        }
        Ok(config)
    }
}

/// What the server and the runner share.
pub struct Shared {
    config: DaemonConfig,
    /// Each client address's request budget: (tokens, when last counted).
    rates: Mutex<HashMap<std::net::IpAddr, (f64, std::time::Instant)>>,
    /// The address bound (the config's, with the port the system gave for port 0).
    addr: SocketAddr,
    store: Mutex<JobStore>,
    controls: Mutex<HashMap<String, tokio::sync::watch::Sender<JobCommand>>>,
    progress: Mutex<HashMap<String, ProgressHandle>>,
    evaluating: Mutex<std::collections::HashSet<String>>,
    /// Jobs stopped by the daemon's shutdown (queued again, not cancelled); set once it began.
    interrupted: Mutex<Option<std::collections::HashSet<String>>>,
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

    /// `path` from a job spec's `what` field, confined to the configured roots: a relative path
    /// is looked up under each root in turn, an absolute one must lie inside one (after symbolic
    /// links and `..` are resolved).
    fn confine(&self, what: &str, path: &Path) -> anyhow::Result<PathBuf> {
        let roots = &self.config.roots;
        anyhow::ensure!(
            !roots.is_empty(),
            "{what} `{}`: the daemon's config names no roots, so paths are refused",
            path.display()
        );
        let candidates: Vec<PathBuf> = if path.is_absolute() {
            vec![path.to_path_buf()]
        } else {
            roots.iter().map(|r| r.join(path)).collect()
        };
        for candidate in candidates {
            let Ok(real) = candidate.canonicalize() else { continue };
            if roots.iter().any(|r| real.starts_with(r)) {
                return Ok(real);
            }
            anyhow::bail!("{what} `{}` is outside the daemon's roots", path.display());
        }
        anyhow::bail!("{what} `{}`: not found under the daemon's roots", path.display())
    }

    /// A tune job's checks and queuing (see [`Shared::submit`]); it decodes and stores photos, so
    /// it runs off the async workers.
    fn submit_tune(&self, mut tune: jobs::TuneSpec) -> anyhow::Result<jobs::Job> {
        // The world plan has 16 prompts; the evaluation samples 3 models on 25 prompts.
        let prompts = tune.eval_prompts.unwrap_or(25).min(25) as u128;
        self.config.limits.check(
            &[
                ("proxies", 16 * u128::from(tune.proxies_per_prompt)),
                ("class priors", tune.class_priors as u128),
                ("evaluation samples", 3 * prompts * tune.eval_images as u128),
            ],
            &[("supervisor_steps", tune.supervisor_steps), ("student_steps", tune.student_steps)],
        )?;
        tune.models = tune.models.as_deref().map(|m| self.confine("models", m)).transpose()?;
        let uploads = std::mem::take(&mut tune.images); // kept in the job's folder, not its record
        let max = self.config.photo_limits();
        let photos = match (uploads.is_empty(), &tune.folder) {
            (true, None) => Vec::new(),
            (false, None) => decode_uploads(&uploads, max)?,
            (true, Some(folder)) => read_folder(&self.confine("folder", folder)?, max)?,
            (false, Some(_)) => {
                anyhow::bail!("give the subject's photos as `images` or as a `folder`, not both")
            }
        };
        let source = if uploads.is_empty() { "folder" } else { "images" };
        if tune.folder.is_some() || !uploads.is_empty() {
            anyhow::ensure!(tune.class_noun.is_some(), "`class_noun` is needed with `{source}`");
            crate::subject::check_photo_count(photos.len()).with_context(|| format!("`{source}`"))?;
        }
        let world = self.config.world.clone();
        let record = JobSpec::Tune(tune.clone());
        self.stage_and_submit(&photos, record, |staged, _| {
            let args = tune.demo_args(PathBuf::new(), staged.map(Path::to_path_buf), world, "cpu".into());
            crate::demo::check_settings(&args).map(drop)
        })
    }

    /// Deletes the ended jobs retention (`keep_jobs`, `keep_days`) no longer keeps; one a queued
    /// or running replay reads stays until that replay ends. File work: call it off the async
    /// workers.
    fn apply_retention(&self) {
        let (keep_jobs, keep_days) = (self.config.keep_jobs, self.config.keep_days);
        if keep_jobs.is_none() && keep_days.is_none() {
            return;
        }
        let expired = {
            let store = self.store();
            jobs::expired(&store.list(), keep_jobs, keep_days, proxytune_schemas::now_us())
        };
        for id in expired {
            match self.delete(&id) {
                Ok(CommandOutcome::Applied) => tracing::info!(job = %id, "retention deleted the job"),
                Ok(CommandOutcome::Refused(why)) => {
                    tracing::info!(job = %id, %why, "retention keeps the job for now")
                }
                Ok(CommandOutcome::NoJob) => {}
                Err(e) => {
                    tracing::error!(job = %id, error = %format!("{e:#}"), "retention cannot delete the job")
                }
            }
        }
    }

    /// Tidies succeeded job `id`'s corpus (when it has one), unless a queued or running replay
    /// reads it (its pinned version must stay). File work: call it off the async workers.
    fn tidy_corpus(&self, id: &str) {
        let corpus = {
            let store = self.store();
            if let Some(reader) = replay_reading(&store, id) {
                tracing::info!(job = %id, replay = %reader.id, "the corpus stays untidied: a replay reads it");
                return;
            }
            store.dir(id).join("corpus")
        };
        if !corpus.join(proxytune_actors::corpus::MARKER_FILE).is_file() {
            return;
        }
        let tidied = tokio::runtime::Handle::current()
            .block_on(async { proxytune_actors::corpus::Corpus::open(&corpus)?.tidy("job-end").await });
        match tidied {
            Ok(tables) => {
                let versions: u64 = tables.iter().map(|t| t.versions_removed).sum();
                let bytes: u64 = tables.iter().map(|t| t.bytes_removed).sum();
                tracing::info!(job = %id, versions_removed = versions, bytes_removed = bytes, "tidied the job's corpus: each table keeps its newest version (tagged job-end) and its tagged ones");
            }
            Err(e) => tracing::error!(job = %id, error = %format!("{e:#}"), "cannot tidy the job's corpus"),
        }
    }

    /// Refuses a submission when `max_queued_jobs` jobs already wait (checked under the store's
    /// lock, with the insert).
    fn queue_has_room(&self, store: &JobStore) -> anyhow::Result<()> {
        let queued = store.list().iter().filter(|j| j.state == JobState::Queued).count();
        if queued >= self.config.max_queued_jobs {
            return Err(Busy(format!(
                "{queued} jobs wait in the queue, the daemon's max_queued_jobs; submit again when one has started"
            ))
            .into());
        }
        Ok(())
    }

    /// Writes `photos` (when any) into a staging folder, runs `check` on it (given the staged
    /// photos folder and a scratch folder) with every other setting, without the store's lock,
    /// then queues `record`, moving the photos into the job's `photos/` (its `input`). The staging
    /// folder is removed either way.
    fn stage_and_submit(
        &self,
        photos: &[(String, &'static str, Vec<u8>)],
        record: JobSpec,
        check: impl FnOnce(Option<&Path>, &Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<jobs::Job> {
        static STAGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = STAGED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let staging = self.config.data_dir.join("staging").join(format!("{}-{n}", std::process::id()));
        let input = (!photos.is_empty()).then(|| staging.join("photos"));
        let staged = || -> anyhow::Result<()> {
            if let Some(dir) = &input {
                std::fs::create_dir_all(dir)
                    .map_err(|e| jobs::stored(e, format!("cannot create {}", dir.display())))?;
                for (k, (name, ext, bytes)) in photos.iter().enumerate() {
                    std::fs::write(dir.join(format!("{k:02}.{ext}")), bytes)
                        .map_err(|e| jobs::stored(e, format!("cannot store photo `{name}`")))?;
                }
            }
            check(input.as_deref(), &staging.join("scratch"))
        };
        let result = staged().and_then(|()| {
            let mut store = self.store();
            self.queue_has_room(&store)?;
            store.submit(record, |dir| {
                let Some(staged) = &input else { return Ok(None) };
                let photos = dir.join("photos");
                std::fs::rename(staged, &photos).map_err(|e| {
                    jobs::stored(e, format!("cannot move the photos to {}", photos.display()))
                })?;
                Ok(Some(photos))
            })
        });
        std::fs::remove_dir_all(&staging).ok();
        result
    }

    /// A spec job's checks and queuing: every path confined to the roots, the photos (uploaded
    /// or from a folder) staged and checked, then the whole spec checked as `proxytune run
    /// --check` does (every problem named in one answer).
    fn submit_run(&self, mut run: jobs::RunSpec) -> anyhow::Result<jobs::Job> {
        use crate::job::spec::PromptSource;
        let spec = &mut run.spec;
        if let PromptSource::File(f) = &spec.subject.prompts {
            spec.subject.prompts = PromptSource::File(self.confine("spec.subject.prompts", f)?);
        }
        // DreamBench has 25 templates; a template file is counted once it is confined and read.
        let templates = match &spec.subject.prompts {
            PromptSource::DreamBench => 25,
            PromptSource::File(f) => {
                crate::job::prompts::read_template_file(f).map_err(anyhow::Error::msg)?.len() as u128
            }
        };
        let eval_prompts = spec.evaluation.prompts.map_or(templates, |p| (p as u128).min(templates));
        self.config.limits.check(
            &[
                ("proxies", (templates + 1) * u128::from(spec.proxies.per_prompt)),
                ("class images", spec.supervisor.dreambooth.class_images as u128),
                ("evaluation samples", 3 * eval_prompts * spec.evaluation.images_per_prompt as u128),
            ],
            &[
                ("spec.supervisor.dreambooth.steps", spec.supervisor.dreambooth.steps),
                ("spec.student.steps", spec.student.steps),
                ("spec.supervisor.steps", u64::from(spec.supervisor.steps)),
            ],
        )?;
        anyhow::ensure!(
            spec.output.as_os_str().is_empty(),
            "spec.output: the daemon writes a job into its own folder; leave `output` out"
        );
        spec.supervisor.path = self.confine("spec.supervisor.path", &spec.supervisor.path)?;
        spec.student.path = self.confine("spec.student.path", &spec.student.path)?;
        if let Some(p) = &spec.student.vq_path {
            spec.student.vq_path = Some(self.confine("spec.student.vq_path", p)?);
        }
        for (what, path) in [
            ("spec.evaluation.dino", &mut spec.evaluation.dino),
            ("spec.evaluation.clip", &mut spec.evaluation.clip),
        ] {
            if let Some(p) = path {
                *p = self.confine(what, p)?;
            }
        }
        let uploads = std::mem::take(&mut run.images); // kept in the job's folder, not its record
        let max = self.config.photo_limits();
        let photos = match (uploads.is_empty(), spec.subject.photos.as_os_str().is_empty()) {
            (false, true) => decode_uploads(&uploads, max)?,
            (true, false) => read_folder(&self.confine("spec.subject.photos", &spec.subject.photos)?, max)?,
            (false, false) => {
                anyhow::bail!("give the subject's photos as `images` or as `spec.subject.photos`, not both")
            }
            (true, true) => anyhow::bail!(
                "the subject's photos are missing: upload `images` or name `spec.subject.photos`"
            ),
        };
        crate::subject::check_photo_count(photos.len()).context("the subject's photos")?;
        let mut record = run.clone();
        record.spec.subject.photos = PathBuf::new(); // the job's own photos/, set when it runs
        self.stage_and_submit(&photos, JobSpec::Run(Box::new(record)), |staged, scratch| {
            let mut checked = run.spec.clone();
            checked.subject.photos = staged.map(Path::to_path_buf).unwrap_or_default();
            checked.output = scratch.to_path_buf();
            let report = crate::job::check::check(&checked);
            anyhow::ensure!(
                report.problems.is_empty(),
                "the spec has {} problem(s): {}",
                report.problems.len(),
                report.problems.join("; ")
            );
            Ok(())
        })
    }

    /// Validates a spec and queues it: a tune job's subject (world subject, uploaded photos or a
    /// folder under the roots), its class noun, identifier and budgets; a replay job's corpus,
    /// version (pinned now) and selection. Uploads are stored in the job's `photos/` folder.
    async fn submit(self: &Arc<Self>, spec: JobSpec) -> anyhow::Result<jobs::Job> {
        let job = match spec {
            JobSpec::Tune(tune) => {
                let shared = self.clone();
                tokio::task::spawn_blocking(move || shared.submit_tune(tune))
                    .await
                    .context("the submission's thread panicked")??
            }
            JobSpec::Run(run) => {
                let shared = self.clone();
                tokio::task::spawn_blocking(move || shared.submit_run(*run))
                    .await
                    .context("the submission's thread panicked")??
            }
            JobSpec::Replay(mut replay) => {
                let prompts = replay.eval_prompts.unwrap_or(25).min(25) as u128;
                self.config.limits.check(
                    &[("evaluation samples", prompts * replay.eval_images as u128)],
                    &[("student_steps", replay.student_steps)],
                )?;
                replay.models = replay.models.as_deref().map(|m| self.confine("models", m)).transpose()?;
                let corpus = match (&replay.source_job, &replay.corpus) {
                    (Some(source), None) => {
                        let store = self.store();
                        let job = store
                            .get(source)
                            .with_context(|| format!("source_job `{source}`: no such job"))?;
                        anyhow::ensure!(
                            matches!(job.spec, JobSpec::Tune(_)),
                            "source_job `{source}` is a replay; replay the tune job it replayed"
                        );
                        store.dir(source).join("corpus")
                    }
                    (None, Some(path)) => self.confine("corpus", path)?,
                    _ => anyhow::bail!(
                        "a replay names its corpus by `source_job` or by `corpus` (one of them)"
                    ),
                };
                let args = replay.replay_args(
                    corpus.clone(),
                    PathBuf::new(),
                    self.config.world.clone(),
                    "cpu".into(),
                );
                let (version, _, _) = crate::replay::check(&args).await?;
                replay.version = Some(jobs::VersionSpec::Number(version));
                let mut store = self.store();
                self.queue_has_room(&store)?;
                store.submit(JobSpec::Replay(replay), |_| Ok(Some(corpus)))?
            }
        };
        self.wake.notify_one();
        Ok(job)
    }

    /// Tells job `id` to pause, resume or cancel. The controls' and the store's locks are held
    /// together, in the order the runner takes them when it starts or ends a job, so a job's
    /// recorded state and its pipeline's command change as one: a command never lands between the
    /// runner's reading and writing of a job.
    fn command(&self, id: &str, command: JobCommand) -> anyhow::Result<CommandOutcome> {
        let controls = self.controls.lock().expect("control lock");
        let mut store = self.store();
        let Some(job) = store.get(id).cloned() else { return Ok(CommandOutcome::NoJob) };
        let send = |c: JobCommand| {
            if let Some(tx) = controls.get(id) {
                let _ = tx.send(c);
            }
        };
        let stage = self.progress(id).map(|p| p.stage).unwrap_or_default();
        let now = proxytune_schemas::now_us();
        let refused = |why: String| Ok(CommandOutcome::Refused(why));
        let next = match (command, job.state) {
            (JobCommand::Cancel, JobState::Queued) => Some(JobState::Cancelled),
            (JobCommand::Cancel, JobState::Running | JobState::Paused) => {
                // A client's cancel stays a cancel, even while the daemon shuts down.
                if let Some(interrupted) = self.interrupted.lock().expect("interrupted lock").as_mut() {
                    interrupted.remove(id);
                }
                send(JobCommand::Cancel);
                None
            }
            (JobCommand::Pause, JobState::Running)
                if matches!(stage.as_str(), "evaluating" | "reporting") =>
            {
                return refused(format!(
                    "job `{id}` is {stage}: a pause holds tuning, generation and training, which have ended"
                ));
            }
            (JobCommand::Pause, JobState::Running) => {
                send(JobCommand::Pause);
                Some(JobState::Paused)
            }
            (JobCommand::Run, JobState::Paused) => {
                send(JobCommand::Run);
                Some(JobState::Running)
            }
            (command, state) => {
                return refused(format!("job `{id}` is {}: cannot {} it", state.as_str(), command.verb()));
            }
        };
        if let Some(state) = next {
            store.update(id, |j| {
                j.state = state;
                if state == JobState::Cancelled {
                    j.finished_at_us = Some(now);
                }
            })?;
        }
        Ok(CommandOutcome::Applied)
    }

    /// Deletes ended job `id`: its record under the locks, then its files outside them (an empty
    /// folder with a `DELETED` note stays, so its number is never given again). Refused while it
    /// is queued or running, and while a queued or running replay reads its corpus. File work:
    /// call it off the async workers.
    fn delete(&self, id: &str) -> anyhow::Result<CommandOutcome> {
        let _controls = self.controls.lock().expect("control lock");
        let mut store = self.store();
        let Some(job) = store.get(id).cloned() else { return Ok(CommandOutcome::NoJob) };
        if !matches!(job.state, JobState::Succeeded | JobState::Failed | JobState::Cancelled) {
            return Ok(CommandOutcome::Refused(format!(
                "job `{id}` is {}: cancel it first, then delete it",
                job.state.as_str()
            )));
        }
        if let Some(reader) = replay_reading(&store, id) {
            return Ok(CommandOutcome::Refused(format!(
                "job `{}` ({}) replays `{id}`'s corpus: delete it when that job has ended",
                reader.id,
                reader.state.as_str()
            )));
        }
        let dir = store.forget(id)?;
        self.progress.lock().expect("progress lock").remove(id);
        self.evaluating.lock().expect("evaluating lock").remove(id);
        drop(store);
        drop(_controls);
        jobs::clear_deleted(&dir)?;
        Ok(CommandOutcome::Applied)
    }
}

/// The refusal when `eval_device` is a CUDA device one of the `running` jobs (id, the devices
/// its stages use) is using.
fn gpu_conflict(eval_device: &str, running: &[(String, Vec<String>)]) -> Option<String> {
    if !eval_device.starts_with("cuda") {
        return None;
    }
    let users: Vec<&str> = running
        .iter()
        .filter(|(_, devices)| devices.iter().any(|d| d == eval_device))
        .map(|(id, _)| id.as_str())
        .collect();
    (!users.is_empty()).then(|| {
        format!(
            "job `{}` runs on {eval_device}: evaluating now would put a second set of models on that GPU (the daemon's share_gpu = true allows it)",
            users.join("`, `")
        )
    })
}

/// The first of `queued` (id, devices; oldest first) that uses no CUDA device one of `running`
/// uses; the first of all when `share_gpu`.
fn first_startable<'a>(
    queued: &'a [(String, Vec<String>)],
    running: &[(String, Vec<String>)],
    share_gpu: bool,
) -> Option<&'a str> {
    let busy = |d: &String| d.starts_with("cuda") && running.iter().any(|(_, used)| used.contains(d));
    queued.iter().find(|(_, devices)| share_gpu || !devices.iter().any(busy)).map(|(id, _)| id.as_str())
}

/// A queued or running replay reading job `id`'s corpus, if any.
fn replay_reading(store: &JobStore, id: &str) -> Option<jobs::Job> {
    let corpus = store.dir(id).join("corpus");
    store
        .list()
        .into_iter()
        .find(|j| {
            matches!(j.state, JobState::Queued | JobState::Running | JobState::Paused)
                && j.input.as_ref().is_some_and(|input| input.starts_with(&corpus))
        })
        .cloned()
}

/// The daemon is busy (its queue is full): the client may try again later (429).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Busy(String);

/// What came of a client's command on a job.
pub enum CommandOutcome {
    /// Done.
    Applied,
    /// No such job.
    NoJob,
    /// Not in the job's state; the message says why.
    Refused(String),
}

/// Why an evaluation cannot start now.
pub enum EvaluateRefusal {
    /// No such job.
    NoJob,
    /// Not now (no checkpoint yet, one in flight); the message says why.
    NotNow(String),
}

impl Shared {
    /// Why evaluate-now must not load its models now: a running job uses the CUDA device the
    /// evaluation would (unless `share_gpu`). Every stage of a world job runs on the daemon's
    /// device; a spec job on the devices its spec names.
    fn gpu_in_use_by_others(&self) -> Option<String> {
        if self.config.share_gpu {
            return None;
        }
        let eval = crate::job::plan::device_name(&self.config.device).ok()?;
        let running = self.running_devices(&self.store());
        gpu_conflict(&eval, &running)
    }

    /// The devices job `job`'s stages use, resolved (`auto` is the GPU where there is one): a
    /// world job's all run on the daemon's device, a spec job's on the devices its spec names.
    fn devices_of(&self, job: &jobs::Job) -> Vec<String> {
        let devices = match &job.spec {
            JobSpec::Run(r) => {
                let d = &r.spec.devices;
                vec![d.supervisor.clone(), d.student.clone(), d.scorers.clone()]
            }
            _ => vec![self.config.device.clone()],
        };
        devices.iter().filter_map(|d| crate::job::plan::device_name(d).ok()).collect()
    }

    /// Every running or paused job with the devices it uses.
    fn running_devices(&self, store: &JobStore) -> Vec<(String, Vec<String>)> {
        store
            .list()
            .into_iter()
            .filter(|j| j.state == JobState::Running || j.state == JobState::Paused)
            .map(|j| (j.id.clone(), self.devices_of(j)))
            .collect()
    }

    /// The oldest queued job that may start now: with `share_gpu` off, one whose GPUs no running
    /// or paused job uses (a later job on another device may start before it).
    fn next_startable(&self, store: &JobStore) -> Option<String> {
        let running = self.running_devices(store);
        let queued: Vec<(String, Vec<String>)> =
            store.queued().into_iter().map(|j| (j.id.clone(), self.devices_of(j))).collect();
        first_startable(&queued, &running, self.config.share_gpu).map(str::to_string)
    }

    /// Starts an evaluation of job `id`'s newest student checkpoint (side by side with the tuned
    /// supervisor once its adapter is exported): the adapters are copied first (the trainer prunes
    /// old checkpoints), then the evaluation runs beside the job on a blocking thread. The scores on
    /// the subject's prompts go to `<job>/evaluations/<n>/evaluation.json` (with sample grids) and
    /// to `proxytune_eval_score{model="student_checkpoint"|"supervisor"}`. Returns `n`.
    fn evaluate_now(self: &Arc<Self>, id: &str) -> Result<u64, EvaluateRefusal> {
        let Some(job) = self.store().get(id).cloned() else { return Err(EvaluateRefusal::NoJob) };
        if matches!(job.spec, JobSpec::Run(_)) {
            return Err(EvaluateRefusal::NotNow(format!(
                "job `{id}` is a spec job: evaluate-now serves jobs on the world models; a spec job is evaluated when it ends"
            )));
        }
        if let Some(why) = self.gpu_in_use_by_others() {
            return Err(EvaluateRefusal::NotNow(why));
        }
        let dir = self.store().dir(id);
        let checkpoint = proxytune_models::checkpoint::latest(&dir.join("student/checkpoints"))
            .ok()
            .flatten()
            .ok_or_else(|| EvaluateRefusal::NotNow(format!("job `{id}` has no student checkpoint yet")))?;
        if !self.evaluating.lock().expect("evaluating lock").insert(id.to_string()) {
            return Err(EvaluateRefusal::NotNow(format!("an evaluation of job `{id}` is running")));
        }
        let evaluations = dir.join("evaluations");
        let n = evaluation_numbers(&evaluations).last().copied().unwrap_or(0) + 1;
        let out = evaluations.join(format!("{n:03}"));
        // The trainer prunes old checkpoints: copy the one evaluated first.
        let copied = out.join("checkpoint");
        let copy_checkpoint = || -> std::io::Result<()> {
            std::fs::create_dir_all(&copied)?;
            for file in ["adapter_model.safetensors", proxytune_models::lora::CONFIG_FILE, "state.json"] {
                std::fs::copy(checkpoint.join(file), copied.join(file))?;
            }
            Ok(())
        };
        // The tuned supervisor too, side by side, once its adapter is exported.
        let exported = dir.join("supervisor").join(proxytune_models::diffusion::dreambooth::LORA_FILE);
        let supervisor = (matches!(job.spec, JobSpec::Tune(_)) && exported.is_file())
            .then(|| copied.join(proxytune_models::diffusion::dreambooth::LORA_FILE));
        let copy = || -> std::io::Result<()> {
            copy_checkpoint()?;
            if let Some(to) = &supervisor {
                std::fs::copy(&exported, to)?;
            }
            Ok(())
        };
        if let Err(e) = copy() {
            self.evaluating.lock().expect("evaluating lock").remove(id);
            std::fs::remove_dir_all(&out).ok();
            return Err(EvaluateRefusal::NotNow(format!("cannot copy {}: {e}", checkpoint.display())));
        }
        let corpus = match &job.spec {
            JobSpec::Tune(_) | JobSpec::Run(_) => dir.join("corpus"),
            JobSpec::Replay(_) => job.input.clone().unwrap_or_default(),
        };
        let (eval_images, eval_prompts, models, student) = match &job.spec {
            JobSpec::Tune(t) => (t.eval_images, t.eval_prompts, t.models.clone(), t.student),
            JobSpec::Replay(r) => (r.eval_images, r.eval_prompts, r.models.clone(), r.student),
            JobSpec::Run(_) => unreachable!("refused above"),
        };
        let world = models.unwrap_or_else(|| self.config.world.clone());
        let shared = self.clone();
        let id = id.to_string();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let result = evaluate_checkpoint(
                &world,
                student,
                &shared.config.device,
                &handle,
                &id,
                &corpus,
                &copied,
                supervisor.as_deref(),
                &out,
                eval_images,
                eval_prompts,
            );
            if let Err(e) = &result {
                tracing::error!(job = %id, error = %format!("{e:#}"), "evaluation failed");
                let failed = serde_json::json!({ "checkpoint": checkpoint.display().to_string(), "error": format!("{e:#}") });
                std::fs::create_dir_all(&out).ok();
                std::fs::write(out.join("evaluation.json"), failed.to_string()).ok();
            }
            shared.evaluating.lock().expect("evaluating lock").remove(&id);
        });
        Ok(n)
    }

    /// The newest evaluation of job `id` (`evaluations/<n>/evaluation.json`), if any.
    fn latest_evaluation(&self, id: &str) -> Option<serde_json::Value> {
        let dir = self.store().dir(id).join("evaluations");
        let n = *evaluation_numbers(&dir).last()?;
        let text = std::fs::read_to_string(dir.join(format!("{n:03}")).join("evaluation.json")).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// The numbers of the evaluations under `dir` (`001`, `002`, …), ascending.
pub(super) fn evaluation_numbers(dir: &Path) -> Vec<u64> {
    let mut numbers: Vec<u64> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    numbers.sort_unstable();
    numbers
}

/// One evaluation of a student checkpoint on the subject stored in `corpus`.
#[allow(clippy::too_many_arguments)]
fn evaluate_checkpoint(
    world: &Path,
    student: crate::world_models::WorldStudent,
    device: &str,
    handle: &tokio::runtime::Handle,
    id: &str,
    corpus: &Path,
    checkpoint: &Path,
    supervisor: Option<&Path>,
    out: &Path,
    eval_images: usize,
    eval_prompts: Option<usize>,
) -> anyhow::Result<()> {
    use proxytune_actors::world::{World, CLASSES};
    let t0 = std::time::Instant::now();
    let references: Vec<proxytune_schemas::ReferenceImage> = handle.block_on(async {
        let corpus = proxytune_actors::corpus::Corpus::open(corpus)?;
        anyhow::Ok(corpus.table::<proxytune_schemas::ReferenceImage>().await?.read_rows(None).await?)
    })?;
    let subject = crate::subject::JobSubject::stored(&World::new(7, CLASSES.len()), &references)?;
    let device = crate::job::plan::device_name(device)?;
    std::fs::create_dir_all(out)?;
    let spec = crate::world_models::EvalSpec {
        world_dir: world,
        out_dir: out,
        device: &device,
        images_per_prompt: eval_images,
        max_prompts: eval_prompts,
    };
    let adapter = checkpoint.join("adapter_model.safetensors");
    let mut models: Vec<(String, crate::job::evaluate::ModelLoader)> = Vec::new();
    if let Some(lora) = supervisor {
        let device = &device;
        models.push((
            "supervisor (DreamBooth-LoRA)".into(),
            Box::new(move || crate::world_models::supervisor(world, lora, device)),
        ));
    }
    let device_ref = &device;
    models.push((
        "student checkpoint".into(),
        Box::new(move || crate::world_models::student(world, student, Some(&adapter), device_ref)),
    ));
    let scores = crate::world_models::evaluate(&spec, &subject, models)?;
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("state.json"))?)?;
    let metrics = proxytune_actors::runtime::Metrics::global().for_job(id);
    for (i, (label, s)) in scores.iter().enumerate() {
        let model = if label.starts_with("supervisor") { "supervisor" } else { "student_checkpoint" };
        crate::report::record_scores(&metrics, model, s);
        let mut samples: Vec<&proxytune_schemas::EvalSample> = s.images.iter().collect();
        samples.sort_by_key(|e| (e.prompt_index, e.sample_index));
        let images: Vec<_> = samples.iter().filter_map(|e| crate::report::decode(&e.image_png)).collect();
        let name =
            if i + 1 == scores.len() { "samples.png".to_string() } else { format!("samples_{model}.png") };
        crate::report::save_grid(&images, eval_images, &out.join(name))?;
    }
    let report = serde_json::json!({
        "checkpoint": checkpoint.display().to_string(),
        "step": state["step"],
        "subject": subject.name,
        "seconds": t0.elapsed().as_secs_f64(),
        "models": scores.iter().map(|(label, s)| serde_json::json!({"label": label, "scores": s})).collect::<Vec<_>>(),
    });
    std::fs::write(out.join("evaluation.json"), serde_json::to_string_pretty(&report)?)?;
    tracing::info!(job = %id, checkpoint = %checkpoint.display(), "evaluation written");
    Ok(())
}

/// Starts queued jobs while slots are free; each job runs on its own task.
async fn runner(shared: Arc<Shared>) {
    loop {
        let picked = {
            // Under the controls' lock, then the store's (the order commands take them): a
            // shutdown either sees this job's control or stops it here, and a cancel lands either
            // before the job is picked (it is not started) or after it is running.
            let mut controls = shared.controls.lock().expect("control lock");
            if shared.interrupted.lock().expect("interrupted lock").is_some() {
                return; // shutting down: nothing new starts
            }
            let mut store = shared.store();
            let next =
                (controls.len() < shared.config.concurrency).then(|| shared.next_startable(&store)).flatten();
            next.map(|id| {
                let started = store.update(&id, |j| {
                    j.state = JobState::Running;
                    j.attempts += 1;
                    j.started_at_us = Some(proxytune_schemas::now_us());
                });
                if let Err(e) = started {
                    tracing::error!(job = %id, error = %e, "cannot record the job's start");
                }
                let (tx, rx) = tokio::sync::watch::channel(JobCommand::Run);
                controls.insert(id.clone(), tx);
                (store.get(&id).cloned().expect("the job just picked"), rx)
            })
        };
        let Some((job, rx)) = picked else {
            shared.wake.notified().await;
            continue;
        };
        let progress = ProgressHandle::default();
        shared.progress.lock().expect("progress lock").insert(job.id.clone(), progress.clone());
        let shared2 = shared.clone();
        tokio::spawn(async move {
            let out = shared2.store().dir(&job.id);
            let (world, device) = (shared2.config.world.clone(), shared2.config.device.clone());
            tracing::info!(job = %job.id, what = %job.spec.label(), "job starts");
            // The job's own synchronous work (model loading, evaluation) runs on a blocking
            // thread, so the API's async workers stay free.
            let handle = tokio::runtime::Handle::current();
            let id = job.id.clone();
            let job_id = id.clone();
            let result = tokio::task::spawn_blocking(move || match &job.spec {
                JobSpec::Tune(tune) => {
                    let args = tune.demo_args(out, job.input.clone(), world, device);
                    handle.block_on(crate::demo::execute(&args, rx, Some(&job_id), &progress))
                }
                JobSpec::Run(run) => {
                    let mut spec = run.spec.clone();
                    spec.output = out;
                    spec.subject.photos = job.input.clone().unwrap_or_default();
                    let plan = crate::job::plan::resolve(&spec, &job_id)?;
                    let evaluator = crate::job::evaluate::SpecEvaluator;
                    handle.block_on(crate::job::execute::execute(
                        &plan,
                        &evaluator,
                        rx,
                        Some(&job_id),
                        &progress,
                    ))
                }
                JobSpec::Replay(replay) => {
                    let corpus = job.input.clone().unwrap_or_default();
                    let args = replay.replay_args(corpus, out, world, device);
                    handle.block_on(crate::replay::execute(&args, rx, Some(&job_id), &progress))
                }
            })
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the job's thread panicked: {e}")));
            let interrupted = shared2
                .interrupted
                .lock()
                .expect("interrupted lock")
                .as_ref()
                .is_some_and(|i| i.contains(&id));
            let (state, error) = match result {
                Ok(0) => (JobState::Succeeded, None),
                _ if interrupted => (JobState::Queued, None), // stopped by the shutdown: resumes
                Ok(130) => (JobState::Cancelled, None),
                Ok(code) => (JobState::Failed, Some(format!("ended with code {code}"))),
                Err(e) => (JobState::Failed, Some(format!("{e:#}"))),
            };
            // Tidied before its success is recorded: a client that sees `succeeded` sees the
            // tidied corpus.
            if state == JobState::Succeeded && shared2.config.tidy_corpora {
                let tidied = shared2.clone();
                let id = id.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || tidied.tidy_corpus(&id)).await {
                    tracing::error!(error = %e, "the corpus tidy's thread panicked");
                }
            }
            tracing::info!(job = %id, ?state, error = ?error, "job ends");
            // Its end recorded and its control dropped as one, under the commands' locks.
            {
                let mut controls = shared2.controls.lock().expect("control lock");
                if let Err(e) = shared2.store().update(&id, |j| {
                    j.state = state;
                    j.error = error;
                    j.finished_at_us = Some(proxytune_schemas::now_us());
                }) {
                    tracing::error!(job = %id, error = %e, "cannot record the job's end");
                }
                controls.remove(&id);
            }
            let retained = shared2.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || retained.apply_retention()).await {
                tracing::error!(error = %e, "retention's thread panicked");
            }
            shared2.wake.notify_one();
        });
    }
}

/// Runs the daemon until the process is stopped.
pub async fn run(args: DaemonArgs) -> anyhow::Result<i32> {
    let config = DaemonConfig::read(&args.config)?;
    let _lock = jobs::DataDirLock::take(&config.data_dir)?;
    // Staging folders are a submission's scratch; one left by a crash holds nothing queued.
    let staging = config.data_dir.join("staging");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("cannot sweep {}", staging.display()))?;
    }
    let store = JobStore::open(&config.data_dir)?;
    let idle = (config.metrics_idle_seconds > 0)
        .then(|| std::time::Duration::from_secs(config.metrics_idle_seconds));
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&proxytune_schemas::metrics::DURATION_BUCKETS_SECONDS)?
        .idle_timeout(metrics_util::MetricKindMask::ALL, idle)
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
    // The address bound (port 0 in the config picks a free one): clients and tests read it here.
    let addr = listener.local_addr().context("cannot read the listening address")?;
    tracing::info!("proxytune daemon listening on http://{addr} (data in {})", config.data_dir.display());
    let shared = Arc::new(Shared {
        config,
        rates: Mutex::new(HashMap::new()),
        addr,
        store: Mutex::new(store),
        controls: Mutex::new(HashMap::new()),
        progress: Mutex::new(HashMap::new()),
        evaluating: Mutex::new(Default::default()),
        interrupted: Mutex::new(None),
        wake: tokio::sync::Notify::new(),
        metrics,
    });
    let retained = shared.clone();
    tokio::task::spawn_blocking(move || retained.apply_retention())
        .await
        .context("retention's thread panicked")?;
    tokio::spawn(runner(shared.clone()));
    shared.wake.notify_one();
    tokio::select! {
        served = http::serve(listener, shared.clone()) => served,
        () = stop_signal() => {
            let limit = std::time::Duration::from_secs(shared.config.shutdown_timeout_seconds);
            if tokio::time::timeout(limit, shared.shut_down()).await.is_ok() {
                return Ok(0);
            }
            let draining: Vec<String> = shared.controls.lock().expect("control lock").keys().cloned().collect();
            tracing::warn!(
                jobs = ?draining,
                "shutdown_timeout_seconds ({}) passed with jobs still draining; exiting now: they resume from their last checkpoints at the next start",
                shared.config.shutdown_timeout_seconds
            );
            // Not returning: dropping the runtime would wait for the jobs' blocking work. Nor
            // `exit`: its C++ static destructors would run under libtorch threads still working
            // (a crash, not an exit code).
            use std::io::Write;
            let _ = std::io::stderr().flush();
            // SAFETY: `_exit` ends the process at once; nothing of ours needs to run after it (the
            // records are written crash-safely, and the data-dir lock is the kernel's).
            unsafe { libc::_exit(1) }
        }
    }
}

/// SIGTERM or SIGINT.
async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the daemon gracefully");
            std::future::pending::<()>().await;
            unreachable!()
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

impl Shared {
    /// A graceful stop: no new job starts; running jobs drain (their committed rows stay, their
    /// trainers checkpoint) and are queued again, to resume when the daemon next starts.
    async fn shut_down(&self) {
        let running: Vec<String> = {
            let controls = self.controls.lock().expect("control lock");
            let running: Vec<String> = controls
                .iter()
                .filter(|(_, tx)| *tx.borrow() != JobCommand::Cancel) // a client's cancel stays a cancel
                .map(|(id, _)| id.clone())
                .collect();
            *self.interrupted.lock().expect("interrupted lock") = Some(running.iter().cloned().collect());
            for id in &running {
                let _ = controls[id].send(JobCommand::Cancel);
            }
            running
        };
        tracing::info!(jobs = ?running, "stopping: running jobs drain and will resume at the next start");
        self.wake.notify_one();
        while !self.controls.lock().expect("control lock").is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        tracing::info!("stopped");
    }
}

/// What one photo may be: its bytes (`max_photo_bytes`) and pixels (`limits.max_photo_pixels`).
#[derive(Clone, Copy, Debug)]
struct PhotoLimits {
    bytes: usize,
    pixels: u64,
}

impl DaemonConfig {
    fn photo_limits(&self) -> PhotoLimits {
        PhotoLimits { bytes: self.max_photo_bytes, pixels: self.limits.max_photo_pixels }
    }
}

/// A photo's checks: at most `limits.bytes`, PNG or JPEG by content, sides in the accepted range
/// and at most `limits.pixels` (both read from the header first), decodable. Returns its
/// extension.
fn check_photo(name: &str, bytes: &[u8], limits: PhotoLimits) -> anyhow::Result<&'static str> {
    let max_bytes = limits.bytes;
    anyhow::ensure!(bytes.len() <= max_bytes, "photo `{name}`: larger than {max_bytes} bytes");
    let ext = match image::guess_format(bytes) {
        Ok(image::ImageFormat::Png) => "png",
        Ok(image::ImageFormat::Jpeg) => "jpg",
        _ => anyhow::bail!("photo `{name}`: not a PNG or JPEG file"),
    };
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    let (w, h) = reader.into_dimensions().with_context(|| format!("photo `{name}`: unreadable"))?;
    crate::subject::check_photo_size(name, w, h)?;
    let pixels = u64::from(w) * u64::from(h);
    anyhow::ensure!(
        pixels <= limits.pixels,
        "photo `{name}`: {w}x{h} is {pixels} pixels, over the daemon's limits.max_photo_pixels ({})",
        limits.pixels
    );
    image::load_from_memory(bytes).with_context(|| format!("photo `{name}`: cannot be decoded"))?;
    Ok(ext)
}

/// Decodes uploaded photos: base64 of at most `limits.bytes` each, checked by [`check_photo`].
/// Returns (name, extension, bytes).
fn decode_uploads(
    uploads: &[jobs::Upload],
    limits: PhotoLimits,
) -> anyhow::Result<Vec<(String, &'static str, Vec<u8>)>> {
    use base64::Engine;
    // Counted before anything is decoded.
    crate::subject::check_photo_count(uploads.len()).context("`images`")?;
    uploads
        .iter()
        .map(|u| {
            let name = &u.name;
            anyhow::ensure!(
                (1..=100).contains(&name.chars().count())
                    && !name.chars().any(|c| c.is_control() || c == '/' || c == '\\'),
                "photo name `{}`: use 1 to 100 characters, no slashes or control characters",
                name.escape_debug()
            );
            let max_bytes = limits.bytes;
            anyhow::ensure!(
                u.data_base64.len() <= max_bytes.div_ceil(3) * 4 + 4,
                "photo `{name}`: larger than {max_bytes} bytes"
            );
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(u.data_base64.trim())
                .with_context(|| format!("photo `{name}`: data_base64 is not base64"))?;
            let ext = check_photo(name, &bytes, limits)?;
            Ok((name.clone(), ext, bytes))
        })
        .collect()
}

/// Reads the photos of a subject folder (already confined to the roots): its `.png`, `.jpg` and
/// `.jpeg` files in name order, each a regular file (a symbolic link could lead outside the
/// roots) checked by [`check_photo`]. Returns (name, extension, bytes).
fn read_folder(dir: &Path, limits: PhotoLimits) -> anyhow::Result<Vec<(String, &'static str, Vec<u8>)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("folder `{}`", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
            matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    // Counted before anything is read.
    crate::subject::check_photo_count(files.len()).with_context(|| format!("folder `{}`", dir.display()))?;
    files
        .iter()
        .map(|path| {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let meta = std::fs::symlink_metadata(path)?;
            anyhow::ensure!(meta.is_file(), "folder `{}`: `{name}` is not a regular file", dir.display());
            let max_bytes = limits.bytes;
            anyhow::ensure!(meta.len() <= max_bytes as u64, "photo `{name}`: larger than {max_bytes} bytes");
            let bytes = std::fs::read(path).with_context(|| format!("photo `{name}`"))?;
            let ext = check_photo(&name, &bytes, limits)?;
            Ok((name, ext, bytes))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluate_now_stays_off_a_gpu_a_running_job_uses() {
        let running = vec![
            ("job-1".to_string(), vec!["cuda:0".to_string(), "cuda:1".to_string()]),
            ("job-2".to_string(), vec!["cpu".to_string()]),
        ];
        let why = gpu_conflict("cuda:1", &running).unwrap();
        assert!(why.contains("job `job-1` runs on cuda:1") && why.contains("share_gpu"), "{why}");
        assert!(gpu_conflict("cuda:2", &running).is_none(), "another GPU");
        assert!(gpu_conflict("cpu", &running).is_none(), "the CPU is shared");
        assert!(gpu_conflict("cuda:0", &[]).is_none(), "nothing running");
    }

    #[test]
    fn a_queued_job_waits_while_its_gpu_runs_another_job() {
        let devices = |d: &[&str]| d.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let running = vec![("job-1".to_string(), devices(&["cuda:0", "cpu"]))];
        let queued = vec![
            ("job-2".to_string(), devices(&["cuda:0"])),
            ("job-3".to_string(), devices(&["cpu", "cuda:1"])),
            ("job-4".to_string(), devices(&["cpu"])),
        ];
        assert_eq!(first_startable(&queued, &running, false), Some("job-3"), "job-2 waits for cuda:0");
        assert_eq!(first_startable(&queued, &running, true), Some("job-2"), "share_gpu: in order");
        assert_eq!(first_startable(&queued[..1], &running, false), None);
        assert_eq!(first_startable(&queued[..1], &[], false), Some("job-2"));
        let cpu_running = vec![("job-1".to_string(), devices(&["cpu"]))];
        assert_eq!(first_startable(&queued, &cpu_running, false), Some("job-2"), "the CPU is shared");
    }

    #[test]
    fn the_readme_daemon_config_is_a_valid_config_with_the_defaults_it_shows() {
        let readme = include_str!("../../README.md");
        let block = readme.split("# daemon.toml\n").nth(1).unwrap().split("```").next().unwrap();
        let config: DaemonConfig = toml::from_str(block).unwrap();
        let defaults: DaemonConfig = toml::from_str("bind = \"127.0.0.1:8640\"\ndata_dir = \"d\"").unwrap();
        assert_eq!(config.shutdown_timeout_seconds, defaults.shutdown_timeout_seconds);
        assert_eq!(config.metrics_idle_seconds, defaults.metrics_idle_seconds);
        assert_eq!(config.max_connections, defaults.max_connections);
        assert_eq!(config.request_timeout_seconds, defaults.request_timeout_seconds);
        assert_eq!(config.max_queued_jobs, defaults.max_queued_jobs);
        assert_eq!(config.limits, defaults.limits);
        assert_eq!(config.tidy_corpora, defaults.tidy_corpora);
        assert_eq!(config.share_gpu, defaults.share_gpu);
    }
}
