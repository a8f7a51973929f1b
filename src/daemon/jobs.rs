//! Jobs and their store. A job is a world subject with its budgets (the demo's typed settings);
//! its spec and state live in the data directory as `jobs/<id>/job.json`, written atomically
//! (temp file + rename) on every transition, beside the job's own corpus, checkpoints and report.
//! A plain-file store: one small JSON document per job, readable by hand, nothing to migrate, and
//! the job's heavy data already lives in its Lance corpus next to it. On open, jobs that were
//! queued, running or paused are queued again: their pipeline resumes from its checkpoints and corpus.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::demo::DemoArgs;

/// What a client submits: a world subject and budgets (every field but `subject` optional).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// World subject (`teapot_0`, `dog_2`, …).
    pub subject: String,
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
}

fn d_checkpoint_every() -> u64 {
    100
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
fn d_min_rows() -> usize {
    16
}
fn d_eval_images() -> usize {
    4
}

impl JobSpec {
    /// The demo settings of this job, writing under `out`.
    pub fn demo_args(&self, out: PathBuf, world: PathBuf, device: String) -> DemoArgs {
        DemoArgs {
            out,
            world,
            subject: self.subject.clone(),
            world_seed: 7,
            references: 5,
            class_priors: self.class_priors,
            supervisor_steps: self.supervisor_steps,
            proxies_per_prompt: self.proxies_per_prompt,
            student_steps: self.student_steps,
            student_min_rows: self.student_min_rows,
            eval_images: self.eval_images,
            eval_prompts: self.eval_prompts,
            min_fidelity: self.min_fidelity,
            max_duplicate_cosine: 0.995,
            metrics_port: 0,
            linger_seconds: 0,
            device,
            checkpoint_every: self.checkpoint_every,
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

/// A job's record (`job.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Its id (`job-<n>`).
    pub id: String,
    /// What was submitted.
    pub spec: JobSpec,
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
    /// Opens (or creates) `<data_dir>/jobs`; unfinished jobs are queued again.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let root = data_dir.join("jobs");
        std::fs::create_dir_all(&root)
            .with_context(|| format!("data_dir: cannot create {}", root.display()))?;
        let mut jobs = BTreeMap::new();
        let mut next = 1;
        for entry in std::fs::read_dir(&root)? {
            let path = entry?.path().join("job.json");
            if !path.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let mut job: Job = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a job record", path.display()))?;
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

    /// Adds a queued job.
    pub fn submit(&mut self, spec: JobSpec) -> anyhow::Result<Job> {
        let id = format!("job-{}", self.next);
        self.next += 1;
        let job = Job {
            id: id.clone(),
            spec,
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

    /// Every job, by id.
    pub fn list(&self) -> Vec<&Job> {
        self.jobs.values().collect()
    }

    /// Job `id`.
    pub fn get(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id)
    }

    /// The oldest queued job.
    pub fn next_queued(&self) -> Option<&Job> {
        self.jobs.values().filter(|j| j.state == JobState::Queued).min_by_key(|j| j.submitted_at_us)
    }

    /// Applies `change` to job `id` and persists it.
    pub fn update(&mut self, id: &str, change: impl FnOnce(&mut Job)) -> anyhow::Result<Job> {
        let job = self.jobs.get_mut(id).with_context(|| format!("no job {id}"))?;
        change(job);
        let job = job.clone();
        self.save(&job)?;
        Ok(job)
    }

    fn save(&self, job: &Job) -> anyhow::Result<()> {
        let dir = self.dir(&job.id);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join("job.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(job)?)?;
        std::fs::rename(&tmp, dir.join("job.json"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_persist_and_unfinished_ones_are_queued_again() {
        let dir = tempfile::tempdir().unwrap();
        let spec: JobSpec = serde_json::from_str(r#"{"subject": "dog_2", "student_steps": 10}"#).unwrap();
        assert_eq!((spec.student_steps, spec.class_priors), (10, 48));
        let mut store = JobStore::open(dir.path()).unwrap();
        let a = store.submit(spec.clone()).unwrap();
        let b = store.submit(spec).unwrap();
        store.update(&a.id, |j| j.state = JobState::Running).unwrap();
        store.update(&b.id, |j| j.state = JobState::Succeeded).unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&a.id).unwrap().state, JobState::Queued, "a running job is queued again");
        assert_eq!(store.get(&b.id).unwrap().state, JobState::Succeeded);
        let mut store = store;
        assert_eq!(store.submit(store.get(&a.id).unwrap().spec.clone()).unwrap().id, "job-3");
        assert!(serde_json::from_str::<JobSpec>(r#"{"subject": "dog_2", "colour": 1}"#).is_err());
    }
}
