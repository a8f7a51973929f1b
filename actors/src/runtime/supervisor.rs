//! The control plane: one actix [`JobSupervisor`] per job owns its pipeline's lifecycle. It starts
//! supervising the pipeline when the actor starts, answers status queries, pauses, resumes and
//! cancels, and hands the final [`PipelineReport`] to whoever waits for it.

use actix::prelude::*;
use serde::Serialize;

use super::pipeline::{JobOutcome, PipelineHandle, PipelineReport, PipelineStatus, RunningPipeline};

/// Supervises one job's pipeline.
pub struct JobSupervisor {
    job_id: String,
    handle: PipelineHandle,
    pipeline: Option<RunningPipeline>,
    report: Option<PipelineReport>,
    waiters: Vec<tokio::sync::oneshot::Sender<PipelineReport>>,
}

impl JobSupervisor {
    /// Wraps a started pipeline; supervision begins when the actor starts.
    pub fn new(job_id: impl Into<String>, pipeline: RunningPipeline) -> Self {
        JobSupervisor {
            job_id: job_id.into(),
            handle: pipeline.handle(),
            pipeline: Some(pipeline),
            report: None,
            waiters: Vec::new(),
        }
    }
}

impl Actor for JobSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(pipeline) = self.pipeline.take() else {
            return;
        };
        let job = self.job_id.clone();
        ctx.spawn(pipeline.wait().into_actor(self).map(move |report, act, _| {
            tracing::info!(job, outcome = ?report.outcome, "Job ended.");
            for waiter in act.waiters.drain(..) {
                let _ = waiter.send(report.clone());
            }
            act.report = Some(report);
        }));
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
        self.handle.control().pause()
    }
}

impl Handler<Resume> for JobSupervisor {
    type Result = bool;
    fn handle(&mut self, _: Resume, _: &mut Self::Context) -> bool {
        self.handle.control().resume()
    }
}

impl Handler<Cancel> for JobSupervisor {
    type Result = bool;
    fn handle(&mut self, _: Cancel, _: &mut Self::Context) -> bool {
        self.handle.control().cancel()
    }
}

impl Handler<GetStatus> for JobSupervisor {
    type Result = JobStatus;
    fn handle(&mut self, _: GetStatus, _: &mut Self::Context) -> JobStatus {
        JobStatus {
            job_id: self.job_id.clone(),
            pipeline: self.handle.status(),
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
