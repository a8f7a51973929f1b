//! The control plane: one actix [`JobSupervisor`] per job owns its pipeline's lifecycle. It starts
//! the pipeline (every stage actor) when the actor starts and supervises it to its end, answers
//! status queries, pauses, resumes and cancels, and hands the final [`PipelineReport`] to whoever
//! waits for it. A pipeline that cannot start ends the job as failed, naming the reason.

use actix::prelude::*;
use serde::Serialize;

use super::control::RunState;
use super::pipeline::{JobOutcome, Pipeline, PipelineHandle, PipelineReport, PipelineStatus};

/// Supervises one job's pipeline.
pub struct JobSupervisor {
    job_id: String,
    pipeline: Option<Pipeline>,
    handle: Option<PipelineHandle>,
    report: Option<PipelineReport>,
    waiters: Vec<tokio::sync::oneshot::Sender<PipelineReport>>,
}

impl JobSupervisor {
    /// A supervisor for a built (not yet started) pipeline; it starts it when the actor starts.
    pub fn new(job_id: impl Into<String>, pipeline: Pipeline) -> Self {
        JobSupervisor {
            job_id: job_id.into(),
            pipeline: Some(pipeline),
            handle: None,
            report: None,
            waiters: Vec::new(),
        }
    }

    fn finish(&mut self, report: PipelineReport) {
        tracing::info!(job = %self.job_id, outcome = ?report.outcome, "Job ended.");
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(report.clone());
        }
        self.report = Some(report);
    }
}

impl Actor for JobSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(pipeline) = self.pipeline.take() else {
            return;
        };
        match pipeline.start(&tokio::runtime::Handle::current()) {
            Ok(running) => {
                self.handle = Some(running.handle());
                ctx.spawn(running.wait().into_actor(self).map(|report, act, _| act.finish(report)));
            }
            Err(error) => self.finish(PipelineReport {
                outcome: JobOutcome::Failed {
                    actor: "pipeline".into(),
                    stage: "start".into(),
                    message: error.to_string(),
                },
                tasks: Vec::new(),
                edges: Vec::new(),
            }),
        }
    }
}

/// Pause the job's sources. Replies whether the state changed.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Pause;

/// Resume paused sources. Replies whether the state changed.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Resume;

/// Cancel the job: sources stop and the pipeline drains. Replies whether the state changed.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Cancel;

/// Query the job's status.
#[derive(Message)]
#[rtype(result = "JobStatus")]
pub struct GetStatus;

/// Wait for the job's end and get its report.
#[derive(Message)]
#[rtype(result = "Option<PipelineReport>")]
pub struct WaitDone;

/// A job's status.
#[derive(Clone, Debug, Serialize, MessageResponse)]
pub struct JobStatus {
    /// Job id.
    pub job_id: String,
    /// Live status of the pipeline.
    pub pipeline: PipelineStatus,
    /// The outcome, once ended.
    pub outcome: Option<JobOutcome>,
}

impl Handler<Pause> for JobSupervisor {
    type Result = bool;
    fn handle(&mut self, _: Pause, _: &mut Self::Context) -> bool {
        self.handle.as_ref().is_some_and(|h| h.control().pause())
    }
}

impl Handler<Resume> for JobSupervisor {
    type Result = bool;
    fn handle(&mut self, _: Resume, _: &mut Self::Context) -> bool {
        self.handle.as_ref().is_some_and(|h| h.control().resume())
    }
}

impl Handler<Cancel> for JobSupervisor {
    type Result = bool;
    fn handle(&mut self, _: Cancel, _: &mut Self::Context) -> bool {
        self.handle.as_ref().is_some_and(|h| h.control().cancel())
    }
}

impl Handler<GetStatus> for JobSupervisor {
    type Result = JobStatus;
    fn handle(&mut self, _: GetStatus, _: &mut Self::Context) -> JobStatus {
        let pipeline = match &self.handle {
            Some(handle) => handle.status(),
            None => PipelineStatus {
                state: RunState::Aborting,
                parked: false,
                tasks: Vec::new(),
                edges: Vec::new(),
            },
        };
        JobStatus {
            job_id: self.job_id.clone(),
            pipeline,
            outcome: self.report.as_ref().map(|r| r.outcome.clone()),
        }
    }
}

impl Handler<WaitDone> for JobSupervisor {
    type Result = ResponseFuture<Option<PipelineReport>>;
    fn handle(&mut self, _: WaitDone, _: &mut Self::Context) -> Self::Result {
        if let Some(report) = &self.report {
            let report = report.clone();
            return Box::pin(async move { Some(report) });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters.push(tx);
        Box::pin(async move { rx.await.ok() })
    }
}
