//! The actor traits and what the runner hands them: a [`Context`] and an [`Output`] collector.
//!
//! An actor's logic never touches channels: it reads its input batch, writes into `out`, and the
//! runner sends what it collected (blocking on backpressure). So a unit test drives an actor with
//! a plain `Output` and no runtime. Four shapes:
//!
//! | trait | inputs | runs on |
//! |---|---|---|
//! | [`Source`] | none; `produce` is called until it returns [`Produced::Done`] or the job stops | its own OS thread |
//! | [`Operator`] | one or more; `process_batch` per batch | its own OS thread (CPU/GPU work) |
//! | [`AsyncSource`] | none | a tokio task (I/O) |
//! | [`AsyncOperator`] | one or more | a tokio task (I/O) |

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;

use super::control::Control;
use super::message::Signal;
use super::metrics::ActorMetrics;
use crate::error::Result;

/// What an actor sees of the runtime.
pub struct Context {
    actor: String,
    control: Control,
    /// This actor's metric handles (for actor-specific metrics on top of the runner's).
    pub metrics: ActorMetrics,
    busy_ns: Arc<AtomicU64>,
}

impl Context {
    /// Creates a context (the runner does this; tests can too).
    pub fn new(actor: impl Into<String>, control: Control, metrics: ActorMetrics) -> Self {
        Context { actor: actor.into(), control, metrics, busy_ns: Arc::default() }
    }

    /// A context for unit tests: a fresh control and no-op metrics.
    pub fn for_tests(actor: &str) -> Self {
        Context::new(actor, Control::new(), super::metrics::Metrics::noop().actor(actor))
    }

    /// The actor's name.
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// The job's control (state, pause, cancel).
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// True once the job is cancelled or aborted: a source should stop producing.
    pub fn stop_requested(&self) -> bool {
        self.control.stop_requested()
    }

    /// Adds `d` to the time the actor spent in its own calls (the runner times each one:
    /// start, every batch, signal and unit of pending work, close).
    pub(crate) fn add_busy(&self, d: Duration) {
        self.busy_ns.fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    /// The actor's busy time so far, readable from other threads while it runs.
    pub(crate) fn busy(&self) -> Arc<AtomicU64> {
        self.busy_ns.clone()
    }
}

/// One item an actor emitted.
#[derive(Clone, Debug)]
pub enum Emitted {
    /// A batch for output port `port`.
    Data {
        /// Output port (0 for single-output actors).
        port: usize,
        /// The batch.
        batch: RecordBatch,
    },
    /// A signal for every output.
    Signal(Signal),
}

/// Collects what an actor emits during one call, in order.
#[derive(Debug, Default)]
pub struct Output {
    items: Vec<Emitted>,
}

impl Output {
    /// Emits a batch on port 0. Empty batches carry nothing and are dropped here.
    pub fn emit(&mut self, batch: RecordBatch) {
        self.emit_to(0, batch);
    }

    /// Emits a batch on `port`.
    pub fn emit_to(&mut self, port: usize, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.items.push(Emitted::Data { port, batch });
        }
    }

    /// Emits a signal on every output (e.g. a source's checkpoint barrier).
    pub fn signal(&mut self, signal: Signal) {
        self.items.push(Emitted::Signal(signal));
    }

    /// Takes everything collected so far.
    pub fn take(&mut self) -> Vec<Emitted> {
        std::mem::take(&mut self.items)
    }

    /// The batches collected so far (for tests).
    pub fn batches(&self) -> Vec<&RecordBatch> {
        self.items
            .iter()
            .filter_map(|e| match e {
                Emitted::Data { batch, .. } => Some(batch),
                Emitted::Signal(_) => None,
            })
            .collect()
    }

    /// Rows collected so far.
    pub fn rows(&self) -> usize {
        self.batches().iter().map(|b| b.num_rows()).sum()
    }
}

/// Whether a source has more to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Produced {
    /// Call `produce` again.
    More,
    /// The source is exhausted.
    Done,
}

/// A source on its own thread.
pub trait Source: Send + 'static {
    /// Called once before the first `produce`.
    fn on_start(&mut self, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        Ok(())
    }
    /// Produces the next batch(es) into `out`.
    fn produce(&mut self, ctx: &mut Context, out: &mut Output) -> Result<Produced>;
    /// Called once after the last `produce` (also when the job was cancelled).
    fn on_close(&mut self, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        Ok(())
    }
}

/// A transform or sink on its own thread.
pub trait Operator: Send + 'static {
    /// Called once before the first batch.
    fn on_start(&mut self, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        Ok(())
    }
    /// Processes one batch from input `input`.
    fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        ctx: &mut Context,
        out: &mut Output,
    ) -> Result<()>;
    /// Handles a signal (barriers arrive aligned across inputs). The runner forwards it afterwards.
    fn on_signal(&mut self, _signal: Signal, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        Ok(())
    }
    /// Whether the operator has work of its own before it reads its next input (e.g. a sampler
    /// given a plan by one input row). While true, the runner calls
    /// [`do_pending_work`](Operator::do_pending_work) and sends its output after every call.
    fn has_pending_work(&self) -> bool {
        false
    }
    /// Does one unit of pending work (one sampled batch, say) into `out`. Not called while the job
    /// is paused, nor once it is stopping.
    fn do_pending_work(&mut self, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        Ok(())
    }
    /// Called once when every input has ended: flush, commit, checkpoint.
    fn on_close(&mut self, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        Ok(())
    }
}

/// A source on a tokio task.
pub trait AsyncSource: Send + 'static {
    /// Called once before the first `produce`.
    fn on_start(&mut self, _ctx: &mut Context, _out: &mut Output) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
    /// Produces the next batch(es) into `out`.
    fn produce(
        &mut self,
        ctx: &mut Context,
        out: &mut Output,
    ) -> impl Future<Output = Result<Produced>> + Send;
    /// Called once after the last `produce`.
    fn on_close(&mut self, _ctx: &mut Context, _out: &mut Output) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}

/// A transform or sink on a tokio task.
pub trait AsyncOperator: Send + 'static {
    /// Called once before the first batch.
    fn on_start(&mut self, _ctx: &mut Context, _out: &mut Output) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
    /// Processes one batch from input `input`.
    fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        ctx: &mut Context,
        out: &mut Output,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Handles a signal (barriers arrive aligned across inputs).
    fn on_signal(
        &mut self,
        _signal: Signal,
        _ctx: &mut Context,
        _out: &mut Output,
    ) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
    /// Called once when every input has ended.
    fn on_close(&mut self, _ctx: &mut Context, _out: &mut Output) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
    /// Whether work of its own is waiting (e.g. stored rows to pass on at start). The runner does
    /// all of it, one [`do_pending_work`](Self::do_pending_work) at a time, each call's output sent
    /// (under backpressure) before the next, and before it takes another input.
    fn has_pending_work(&self) -> bool {
        false
    }
    /// One unit of that work.
    fn do_pending_work(
        &mut self,
        _ctx: &mut Context,
        _out: &mut Output,
    ) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}
