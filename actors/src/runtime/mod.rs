//! The streaming actor runtime: bounded Arrow channels, actor runners, the pipeline builder and the
//! actix job supervisor.
//!
//! - [`message`]: [`Msg`] = data batch or in-band [`Signal`] (barrier, flush, end of data).
//! - [`edge`]: row-bounded channels with backpressure and exact accounting.
//! - [`operator`]: the actor traits ([`Source`], [`Operator`], [`AsyncSource`], [`AsyncOperator`]),
//!   [`Context`] and the [`Output`] collector.
//! - [`runner`]: the generic loops (input merge with barrier alignment, sending with backpressure,
//!   per-actor metrics, task outcomes).
//! - [`control`]: the job's run state (running, paused, draining, aborting).
//! - [`pipeline`]: the builder ([`Pipeline`]) and supervision of a run ([`RunningPipeline`]).
//! - [`supervisor`]: the actix [`supervisor::JobSupervisor`] (pause, resume, cancel, status).
//! - [`metrics`]: metric handles from an explicit recorder.

pub mod control;
pub mod edge;
pub mod message;
pub mod metrics;
pub mod operator;
pub mod pipeline;
pub mod runner;
pub mod supervisor;
pub mod synthetic;

pub use control::{Control, RunState};
pub use edge::{EdgeReceiver, EdgeSender, EdgeStats};
pub use message::{Msg, Signal};
pub use metrics::Metrics;
pub use operator::{AsyncOperator, AsyncSource, Context, Emitted, Operator, Output, Produced, Source};
pub use pipeline::{JobOutcome, Pipeline, PipelineConfig, PipelineHandle, PipelineReport, RunningPipeline};
pub use runner::TaskOutcome;
