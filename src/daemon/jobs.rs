//! Jobs and their store. A job is a **tune** job (a subject, world or photos, taught end to end
//! on the world models: the demo's typed settings), a **run** job (a job spec over the user's own
//! models, as `proxytune run` takes it) or a **replay** job (a fresh student trained on a stored corpus
//! version, no generation). Its spec and state live in the data directory as `jobs/<id>/job.json`,
//! written atomically (temp file + rename) on every transition, beside the job's own corpus,
//! checkpoints, uploaded photos and report. A plain-file store: one small JSON document per job,
//! readable by hand, nothing to migrate, and the job's heavy data already lives in its Lance corpus
//! next to it. On open, jobs that were queued, running or paused are queued again: their pipeline
//! resumes from its checkpoints and corpus.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::demo::DemoArgs;
use crate::replay::ReplayArgs;

/// What a client submits (`kind` is `tune` when absent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    /// Teach a subject: tune the supervisor, generate and filter proxies, train the student,
    /// evaluate.
    Tune(TuneSpec),
    /// Train a fresh student on a stored corpus version and evaluate it.
    Replay(ReplaySpec),
    /// A job from a job spec (the structure of `proxytune run`'s TOML, as JSON): the user's own
    /// supervisor and student folders under the daemon's roots.
    Run(Box<RunSpec>),
}

/// A spec job: the spec, with the subject's photos uploaded or in a folder under the roots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// The job spec. Its `output` is the job's folder (leave it out); its `subject.photos` is a
    /// folder under the roots unless `images` are uploaded; every model folder must lie under the
    /// roots.
    pub spec: crate::job::spec::JobSpec,
    /// The subject's photos (3–6 PNG or JPEG), uploaded in the request. Not kept in `job.json`:
    /// they are stored in the job's `photos/` folder.
    #[serde(default, skip_serializing)]
    pub images: Vec<Upload>,
}

/// A photo in a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upload {
    /// Its file name (for messages and the stored reference's `source`).
    pub name: String,
    /// The PNG or JPEG file, base64.
    pub data_base64: String,
}

/// A tune job: a subject and budgets (every field but `subject` optional).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneSpec {
    /// A world subject (`teapot_0`, `dog_2`, …), or the name of the subject of `images` or
    /// `folder`.
    pub subject: String,
    /// The subject's photos (3–6 PNG or JPEG), uploaded in the request. Not kept in `job.json`:
    /// they are stored in the job's `photos/` folder.
    #[serde(default, skip_serializing)]
    pub images: Vec<Upload>,
    /// Or a folder of the subject's photos, under one of the daemon's `roots` (copied into the
    /// job's `photos/` folder at submission).
    #[serde(default)]
    pub folder: Option<PathBuf>,
    /// The class noun of the photos' subject (one of the world's classes).
    #[serde(default)]
    pub class_noun: Option<String>,
    /// The subject's identifier in prompts.
    #[serde(default = "d_identifier")]
    pub identifier: String,
    /// The pretrained models (a folder with `clip`, `dino`, `supervisor`, `student`) under one of
    /// the daemon's roots; the daemon's `world` when absent. Resolved at submission.
    #[serde(default)]
    pub models: Option<PathBuf>,
    /// Class-prior images.
    #[serde(default = "d_priors")]
    pub class_priors: usize,
    /// Supervisor DreamBooth-LoRA steps.
    #[serde(default = "d_supervisor_steps")]
    pub supervisor_steps: u64,
    /// Proxies per prompt (16 prompts).
    #[serde(default = "d_proxies")]
    pub proxies_per_prompt: u32,
    /// Student LoRA steps.
    #[serde(default = "d_student_steps")]
    pub student_steps: u64,
    /// Kept proxies before the student's first step.
    #[serde(default = "d_min_rows")]
    pub student_min_rows: usize,
    /// Evaluation images per prompt.
    #[serde(default = "d_eval_images")]
    pub eval_images: usize,
    /// Evaluate only the first this many prompts.
    #[serde(default)]
    pub eval_prompts: Option<usize>,
    /// Filter threshold on world-DINO fidelity.
    #[serde(default)]
    pub min_fidelity: Option<f32>,
    /// Checkpoint the supervisor's and the student's training every this many steps.
    #[serde(default = "d_checkpoint_every")]
    pub checkpoint_every: u64,
    /// The world student to teach (`chameleon` or `llamagen`).
    #[serde(default)]
    pub student: crate::world_models::WorldStudent,
    /// Baselines trained and evaluated beside the Proxy-Tuned student (`direct-lora`,
    /// `direct-lora-augmented`); none by default.
    #[serde(default)]
    pub baselines: Vec<crate::job::spec::Baseline>,
}

/// A corpus version: its number or a tag.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VersionSpec {
    /// A version number.
    Number(u64),
    /// A tag.
    Tag(String),
}

/// A replay job: which corpus version, which rows, how long to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaySpec {
    /// The job whose corpus is replayed (`job-3`) …
    #[serde(default)]
    pub source_job: Option<String>,
    /// … or a corpus folder under one of the daemon's `roots`.
    #[serde(default)]
    pub corpus: Option<PathBuf>,
    /// The proxies table version; the newest at submission when absent (then pinned).
    #[serde(default)]
    pub version: Option<VersionSpec>,
    /// Re-filter: keep proxies whose stored world-DINO fidelity is at least this.
    #[serde(default)]
    pub min_fidelity: Option<f32>,
    /// Re-filter: keep proxies whose stored CLIP-T is at least this.
    #[serde(default)]
    pub min_prompt_adherence: Option<f32>,
    /// The pretrained models the student and scorers come from, under one of the daemon's roots;
    /// the daemon's `world` when absent. Resolved at submission.
    #[serde(default)]
    pub models: Option<PathBuf>,
    /// Student LoRA steps.
    #[serde(default = "d_replay_steps")]
    pub student_steps: u64,
    /// Evaluation images per prompt.
    #[serde(default = "d_eval_images")]
    pub eval_images: usize,
    /// Evaluate only the first this many prompts.
    #[serde(default)]
    pub eval_prompts: Option<usize>,
    /// The world student the replayed corpus' job taught (`chameleon` or `llamagen`).
    #[serde(default)]
    pub student: crate::world_models::WorldStudent,
}

fn d_identifier() -> String {
    proxytune_actors::world::IDENTIFIER.into()
}
fn d_priors() -> usize {
    48
}
fn d_supervisor_steps() -> u64 {
    400
}
fn d_proxies() -> u32 {
    24
}
fn d_student_steps() -> u64 {
    1500
}
fn d_replay_steps() -> u64 {
    400
}
fn d_min_rows() -> usize {
    16
}
fn d_eval_images() -> usize {
    4
}
fn d_checkpoint_every() -> u64 {
    100
}

/// A typed spec read from a body that also names its `kind`: the spec's own fields go to `T`
/// (which refuses unknown ones) and the `kind` key, already read, is skipped.
struct Tagged<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Tagged<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(SkipKind(deserializer)).map(Tagged)
    }
}

/// A deserializer whose maps and structs lose their `kind` entry; everything else is passed on.
struct SkipKind<D>(D);

impl<'de, D: serde::Deserializer<'de>> serde::Deserializer<'de> for SkipKind<D> {
    type Error = D::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(SkipKindVisitor(visitor))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_struct(name, fields, SkipKindVisitor(visitor))
    }

    fn deserialize_map<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(SkipKindVisitor(visitor))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct enum identifier ignored_any
    }
}

/// Passes every map it is given on without its `kind` entry.
struct SkipKindVisitor<V>(V);

impl<'de, V: serde::de::Visitor<'de>> serde::de::Visitor<'de> for SkipKindVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        self.0.expecting(f)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(SkipKindMap(map))
    }
}

/// A map without its `kind` entry. Keys are read as strings (JSON's are), so each is checked
/// before the spec's own field visitor sees it.
struct SkipKindMap<A>(A);

impl<'de, A: serde::de::MapAccess<'de>> serde::de::MapAccess<'de> for SkipKindMap<A> {
    type Error = A::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        use serde::de::IntoDeserializer;
        loop {
            let Some(key) = self.0.next_key::<String>()? else { return Ok(None) };
            if key == "kind" {
                self.0.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            let key: serde::de::value::StringDeserializer<A::Error> = key.into_deserializer();
            return seed.deserialize(key).map(Some);
        }
    }

    fn next_value_seed<S: serde::de::DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.0.next_value_seed(seed)
    }
}

impl JobSpec {
    /// A spec from a request body: JSON, `kind` defaulting to `tune`. The body is read twice,
    /// never into a generic JSON value: once for `kind` alone (every other field skipped as it
    /// is scanned), then straight into that kind's typed spec, which refuses the first unknown
    /// field, wrong type or missing field where it stands.
    pub fn parse(body: &[u8]) -> anyhow::Result<Self> {
        /// The body's `kind`; every other field is skipped, not stored.
        #[derive(Deserialize)]
        struct Kind {
            #[serde(default)]
            kind: Option<String>,
        }
        let Kind { kind } = serde_json::from_slice(body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                anyhow::anyhow!("not a JSON object with a string `kind`: {e}")
            }
            _ => anyhow::anyhow!("not JSON: {e}"),
        })?;
        Ok(match kind.as_deref().unwrap_or("tune") {
            "tune" => JobSpec::Tune(serde_json::from_slice::<Tagged<TuneSpec>>(body)?.0),
            "replay" => JobSpec::Replay(serde_json::from_slice::<Tagged<ReplaySpec>>(body)?.0),
            "run" => JobSpec::Run(Box::new(serde_json::from_slice::<Tagged<RunSpec>>(body)?.0)),
            other => {
                anyhow::bail!("unknown `kind` `{}`: use `tune`, `replay` or `run`", other.escape_debug())
            }
        })
    }

    /// Where the job's report is, under its folder.
    pub fn report_path(&self) -> &'static str {
        match self {
            JobSpec::Tune(_) | JobSpec::Run(_) => "report/report.json",
            JobSpec::Replay(_) => "report.json",
        }
    }

    /// What the status page shows as the job's subject or source.
    pub fn label(&self) -> String {
        match self {
            JobSpec::Tune(t) => t.subject.clone(),
            JobSpec::Run(r) => r.spec.subject.name.clone(),
            JobSpec::Replay(r) => match (&r.source_job, &r.corpus) {
                (Some(job), _) => format!("replay of {job}"),
                (None, Some(c)) => format!("replay of {}", c.display()),
                _ => "replay".into(),
            },
        }
    }
}

impl TuneSpec {
    /// The demo settings of this job, writing under `out`, its photos (if any) in `photos`.
    pub fn demo_args(
        &self,
        out: PathBuf,
        photos: Option<PathBuf>,
        world: PathBuf,
        device: String,
    ) -> DemoArgs {
        DemoArgs {
            out,
            world: self.models.clone().unwrap_or(world),
            subject: self.subject.clone(),
            photos,
            class_noun: self.class_noun.clone(),
            identifier: self.identifier.clone(),
            world_seed: 7,
            references: 5,
            class_priors: self.class_priors,
            supervisor_steps: self.supervisor_steps,
            proxies_per_prompt: self.proxies_per_prompt,
            student: self.student,
            student_steps: self.student_steps,
            student_min_rows: self.student_min_rows,
            eval_images: self.eval_images,
            eval_prompts: self.eval_prompts,
            min_fidelity: self.min_fidelity,
            max_duplicate_cosine: 0.995,
            metrics_port: 0,
            no_metrics: true, // the daemon serves its own /metrics
            linger_seconds: 0,
            device,
            cpu_threads: None,
            no_baselines: self.baselines.is_empty(),
            baselines: self.baselines.clone(),
            checkpoint_every: self.checkpoint_every,
        }
    }
}

impl ReplaySpec {
    /// The replay settings of this job on `corpus`, writing under `out`.
    pub fn replay_args(&self, corpus: PathBuf, out: PathBuf, world: PathBuf, device: String) -> ReplayArgs {
        ReplayArgs {
            corpus,
            version: self.version.as_ref().map(|v| match v {
                VersionSpec::Number(n) => n.to_string(),
                VersionSpec::Tag(t) => t.clone(),
            }),
            min_fidelity: self.min_fidelity,
            min_prompt_adherence: self.min_prompt_adherence,
            no_filter: false,
            first: None,
            out,
            world: self.models.clone().unwrap_or(world),
            world_seed: 7,
            student: self.student,
            student_steps: self.student_steps,
            eval_images: self.eval_images,
            eval_prompts: self.eval_prompts,
            device,
        }
    }
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a slot.
    Queued,
    /// Its pipeline runs.
    Running,
    /// Its pipeline holds between batches until resumed.
    Paused,
    /// Finished; its report is ready.
    Succeeded,
    /// Stopped by an error (kept in `error`).
    Failed,
    /// Cancelled by a client; its corpus keeps every committed row.
    Cancelled,
}

impl JobState {
    /// Its name in the API and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A job's record (`job.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Its id (`job-<n>`).
    pub id: String,
    /// What was submitted.
    pub spec: JobSpec,
    /// The folder the spec's input resolved to at submission: the subject's photos (uploads are
    /// stored in the job's `photos/`) or the replayed corpus.
    #[serde(default)]
    pub input: Option<PathBuf>,
    /// Where it is.
    pub state: JobState,
    /// Why it failed.
    pub error: Option<String>,
    /// Times it was started (more than 1 after a restart).
    pub attempts: u32,
    /// When it was submitted, started, finished (µs since the epoch).
    pub submitted_at_us: i64,
    /// Last start.
    pub started_at_us: Option<i64>,
    /// End.
    pub finished_at_us: Option<i64>,
}

/// The jobs of a data directory.
#[derive(Debug)]
pub struct JobStore {
    root: PathBuf,
    jobs: BTreeMap<String, Job>,
    next: u64,
}

impl JobStore {
    /// Opens (or creates) `<data_dir>/jobs`; unfinished jobs are queued again. A record that
    /// cannot be read is set aside (`job.json.unreadable`, with the reason logged) and its folder
    /// kept; no job folder is ever reused for a new job.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let root = data_dir.join("jobs");
        std::fs::create_dir_all(&root)
            .with_context(|| format!("data_dir: cannot create {}", root.display()))?;
        let mut jobs = BTreeMap::new();
        let mut next = 1;
        for entry in std::fs::read_dir(&root).with_context(|| format!("cannot list {}", root.display()))? {
            let dir = entry?.path();
            // Every `job-N` folder takes its number, whether or not its record is readable.
            let number = dir.file_name().and_then(|n| n.to_str()?.strip_prefix("job-")?.parse::<u64>().ok());
            if let Some(n) = number {
                next = next.max(n + 1);
            }
            let path = dir.join("job.json");
            if !path.is_file() {
                continue;
            }
            let read = std::fs::read_to_string(&path)
                .map_err(anyhow::Error::from)
                .and_then(|text| Ok(serde_json::from_str::<Job>(&text)?));
            let mut job = match read {
                Ok(job) => job,
                Err(e) => {
                    let aside = dir.join("job.json.unreadable");
                    tracing::error!(record = %path.display(), error = %e, aside = %aside.display(),
                        "a job record cannot be read: set aside, its folder kept, the daemon starts without it");
                    std::fs::rename(&path, &aside)
                        .with_context(|| format!("cannot set {} aside", path.display()))?;
                    continue;
                }
            };
            if let Some(n) = job.id.strip_prefix("job-").and_then(|n| n.parse::<u64>().ok()) {
                next = next.max(n + 1);
            }
            if matches!(job.state, JobState::Running | JobState::Paused) {
                job.state = JobState::Queued;
            }
            jobs.insert(job.id.clone(), job);
        }
        let store = JobStore { root, jobs, next };
        let requeued: Vec<Job> =
            store.jobs.values().filter(|j| j.state == JobState::Queued).cloned().collect();
        for job in requeued {
            store.save(&job)?;
        }
        Ok(store)
    }

    /// The folder of job `id` (its corpus, checkpoints, report).
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Adds a queued job; `prepare` gets its new folder first (to store uploads) and returns the
    /// job's input folder. When it fails, the job is not added.
    pub fn submit(
        &mut self,
        spec: JobSpec,
        prepare: impl FnOnce(&Path) -> anyhow::Result<Option<PathBuf>>,
    ) -> anyhow::Result<Job> {
        // A folder that exists is never reused or removed (a submission the daemon died during, a
        // record set aside): the new job takes the next free number.
        while self.dir(&format!("job-{}", self.next)).exists() {
            self.next += 1;
        }
        let id = format!("job-{}", self.next);
        let dir = self.dir(&id);
        std::fs::create_dir(&dir).map_err(|e| stored(e, format!("cannot create {}", dir.display())))?;
        let input = match prepare(&dir) {
            Ok(input) => input,
            Err(e) => {
                std::fs::remove_dir_all(&dir).ok();
                return Err(e);
            }
        };
        self.next += 1;
        let job = Job {
            id: id.clone(),
            spec,
            input,
            state: JobState::Queued,
            error: None,
            attempts: 0,
            submitted_at_us: proxytune_schemas::now_us(),
            started_at_us: None,
            finished_at_us: None,
        };
        self.save(&job)?;
        self.jobs.insert(id, job.clone());
        Ok(job)
    }

    /// Forgets job `id`: removes its record (file and entry) and returns its folder, for
    /// [`clear_deleted`] to empty outside the store's lock. The record goes first: a crash before
    /// the folder is emptied leaves a folder without a record, which is never reused.
    pub fn forget(&mut self, id: &str) -> anyhow::Result<PathBuf> {
        let dir = self.dir(id);
        std::fs::remove_file(dir.join("job.json"))
            .map_err(|e| stored(e, format!("cannot remove {id}'s record")))?;
        self.jobs.remove(id);
        Ok(dir)
    }

    /// Every job, by id.
    pub fn list(&self) -> Vec<&Job> {
        self.jobs.values().collect()
    }

    /// Job `id`.
    pub fn get(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id)
    }

    /// The queued jobs, oldest first.
    pub fn queued(&self) -> Vec<&Job> {
        let mut queued: Vec<&Job> = self.jobs.values().filter(|j| j.state == JobState::Queued).collect();
        queued.sort_by_key(|j| j.submitted_at_us);
        queued
    }

    /// Applies `change` to job `id` and persists it.
    pub fn update(&mut self, id: &str, change: impl FnOnce(&mut Job)) -> anyhow::Result<Job> {
        let job = self.jobs.get_mut(id).with_context(|| format!("no job {id}"))?;
        change(job);
        let job = job.clone();
        self.save(&job)?;
        Ok(job)
    }

    /// Writes job `job`'s record crash-safely: a temporary file, flushed to disk, renamed over the
    /// record, the folder flushed (a crash leaves the old record or the new one, never a torn one).
    fn save(&self, job: &Job) -> anyhow::Result<()> {
        let dir = self.dir(&job.id);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            std::fs::create_dir_all(&dir)?;
            let tmp = dir.join("job.json.tmp");
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&serde_json::to_vec_pretty(job).map_err(std::io::Error::other)?)?;
            file.sync_all()?;
            std::fs::rename(&tmp, dir.join("job.json"))?;
            std::fs::File::open(&dir)?.sync_all()
        };
        write().map_err(|e| stored(e, format!("cannot write {}'s record in {}", job.id, dir.display())))
    }
}

/// Empties a forgotten job's folder (its corpus, checkpoints, photos, report) and leaves a
/// `DELETED` note, so its number is never given to another job.
pub fn clear_deleted(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| stored(e, format!("cannot list {}", dir.display())))? {
        let path = entry.map_err(|e| stored(e, format!("cannot list {}", dir.display())))?.path();
        let removed =
            if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.map_err(|e| stored(e, format!("cannot remove {}", path.display())))?;
    }
    let note = format!("deleted at {} µs since the epoch\n", proxytune_schemas::now_us());
    std::fs::write(dir.join("DELETED"), note)
        .map_err(|e| stored(e, format!("cannot write {}", dir.display())))
}

/// The daemon could not store something (disk full, permissions): a server-side failure (500),
/// not a fault of the request.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct StorageFailure {
    what: String,
    source: std::io::Error,
}

/// An I/O error while storing, marked as the daemon's failure.
pub fn stored(source: std::io::Error, what: String) -> anyhow::Error {
    StorageFailure { what, source }.into()
}

/// Holds `<data_dir>/daemon.lock` for the daemon's lifetime: a second daemon on the same data
/// directory is refused, naming the first's pid.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    /// Takes the lock (the lock is the operating system's: it goes with the process, even after
    /// `kill -9`).
    pub fn take(data_dir: &Path) -> anyhow::Result<Self> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("data_dir: cannot create {}", data_dir.display()))?;
        let path = data_dir.join("daemon.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                file.read_to_string(&mut pid).ok();
                anyhow::bail!(
                    "data_dir {} is in use by another proxytune daemon (pid {}, in {})",
                    data_dir.display(),
                    pid.trim(),
                    path.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(DataDirLock { _file: file })
    }
}

/// The ended jobs retention removes, oldest end first: beyond the newest `keep_jobs` ended ones,
/// and those that ended more than `keep_days` before `now_us`. Queued and running jobs are never
/// chosen.
pub fn expired(jobs: &[&Job], keep_jobs: Option<usize>, keep_days: Option<f64>, now_us: i64) -> Vec<String> {
    let mut ended: Vec<&Job> = jobs
        .iter()
        .copied()
        .filter(|j| matches!(j.state, JobState::Succeeded | JobState::Failed | JobState::Cancelled))
        .collect();
    // Newest end first; a job without an end time counts as ending at its submission.
    ended.sort_by_key(|j| std::cmp::Reverse(j.finished_at_us.unwrap_or(j.submitted_at_us)));
    let max_age_us = keep_days.map(|d| (d * 86_400e6) as i64);
    let mut out: Vec<(i64, String)> = ended
        .iter()
        .enumerate()
        .filter(|(rank, j)| {
            let too_many = keep_jobs.is_some_and(|k| *rank >= k);
            let too_old =
                max_age_us.is_some_and(|age| now_us - j.finished_at_us.unwrap_or(j.submitted_at_us) > age);
            too_many || too_old
        })
        .map(|(_, j)| (j.finished_at_us.unwrap_or(j.submitted_at_us), j.id.clone()))
        .collect();
    out.sort();
    out.into_iter().map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_picks_ended_jobs_beyond_the_count_or_the_age_oldest_first() {
        let spec = JobSpec::parse(br#"{"subject": "dog_2"}"#).unwrap();
        let job = |id: &str, state: JobState, ended_days_ago: Option<f64>| Job {
            id: id.into(),
            spec: spec.clone(),
            input: None,
            state,
            error: None,
            attempts: 1,
            submitted_at_us: 0,
            started_at_us: None,
            finished_at_us: ended_days_ago.map(|d| 100 * 86_400_000_000 - (d * 86_400e6) as i64),
        };
        let now = 100 * 86_400_000_000;
        let jobs = [
            job("job-1", JobState::Succeeded, Some(10.0)),
            job("job-2", JobState::Failed, Some(5.0)),
            job("job-3", JobState::Running, None),
            job("job-4", JobState::Cancelled, Some(1.0)),
            job("job-5", JobState::Queued, None),
        ];
        let all: Vec<&Job> = jobs.iter().collect();
        assert_eq!(expired(&all, None, None, now), Vec::<String>::new(), "no retention: keep all");
        assert_eq!(expired(&all, Some(1), None, now), ["job-1", "job-2"], "the newest ended one stays");
        assert_eq!(expired(&all, Some(0), None, now), ["job-1", "job-2", "job-4"], "never a live one");
        assert_eq!(expired(&all, None, Some(3.0), now), ["job-1", "job-2"]);
        assert_eq!(expired(&all, Some(2), Some(7.0), now), ["job-1"]);
    }

    #[test]
    fn jobs_persist_and_unfinished_ones_are_queued_again() {
        let dir = tempfile::tempdir().unwrap();
        let spec = JobSpec::parse(br#"{"subject": "dog_2", "student_steps": 10}"#).unwrap();
        let JobSpec::Tune(tune) = &spec else { panic!("a tune job by default") };
        assert_eq!((tune.student_steps, tune.class_priors), (10, 48));
        let mut store = JobStore::open(dir.path()).unwrap();
        let a = store.submit(spec.clone(), |_| Ok(None)).unwrap();
        assert!(store.submit(spec.clone(), |_| anyhow::bail!("bad upload")).is_err());
        let b = store.submit(spec, |_| Ok(None)).unwrap();
        assert_eq!(b.id, "job-2", "a refused job takes no id");
        store.update(&a.id, |j| j.state = JobState::Running).unwrap();
        store.update(&b.id, |j| j.state = JobState::Succeeded).unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&a.id).unwrap().state, JobState::Queued, "a running job is queued again");
        assert_eq!(store.get(&b.id).unwrap().state, JobState::Succeeded);
        let mut store = store;
        assert_eq!(store.submit(store.get(&a.id).unwrap().spec.clone(), |_| Ok(None)).unwrap().id, "job-3");
        assert!(JobSpec::parse(br#"{"subject": "dog_2", "colour": 1}"#).is_err());
        let replay = JobSpec::parse(br#"{"kind": "replay", "source_job": "job-1", "version": 4}"#).unwrap();
        let JobSpec::Replay(r) = replay else { panic!("a replay job") };
        assert_eq!(r.version, Some(VersionSpec::Number(4)));
        assert!(JobSpec::parse(br#"{"kind": "replay", "subject": "dog_2"}"#).is_err());
    }

    #[test]
    fn bodies_are_read_into_their_kinds_typed_spec() {
        let err = |body: &str| format!("{:#}", JobSpec::parse(body.as_bytes()).unwrap_err());
        // `kind` anywhere in the body, or absent.
        let a = JobSpec::parse(br#"{"subject": "dog_2", "kind": "tune", "class_priors": 8}"#).unwrap();
        let b = JobSpec::parse(br#"{"class_priors": 8, "subject": "dog_2"}"#).unwrap();
        assert_eq!(a, b);
        let replay =
            JobSpec::parse(br#"{"version": "v1", "kind": "replay", "source_job": "job-1"}"#).unwrap();
        assert_eq!(replay.label(), "replay of job-1");
        // Refused where it stands: the unknown field's key, before its value is read.
        let junk = format!(r#"{{"colour": [{}0], "subject": "dog_2"}}"#, "0,".repeat(10_000));
        let message = err(&junk);
        assert!(
            message.contains("unknown field `colour`") && message.contains("line 1 column 9"),
            "{message}"
        );
        // Only the top level's `kind` is the job's: one inside a run job's spec is an unknown field.
        let nested = r#"{"kind": "run", "spec": {"kind": "tune"}}"#;
        assert!(err(nested).contains("unknown field `kind`"), "{}", err(nested));
        assert!(err(r#"{"kind": "tuning"}"#).contains("unknown `kind` `tuning`"));
        assert!(err(r#"{"kind": ["tune"]}"#).contains("a string `kind`"));
        assert!(err(r#"{"subject": "dog_2""#).contains("not JSON"));
        assert!(err(r#"{"subject": 2}"#).contains("invalid type: integer `2`, expected a string"));
        // The stored form (the tag written by the enum) reads back through the same parser.
        let stored = serde_json::to_vec(&a).unwrap();
        assert_eq!(JobSpec::parse(&stored).unwrap(), a);
    }
}
