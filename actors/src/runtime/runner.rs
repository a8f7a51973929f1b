//! The generic runners: they own the loop, the channels and the per-actor metrics, and call the
//! actor's hooks. One runner per trait shape; sync ones run on a dedicated OS thread, async ones
//! on a tokio task. Inputs are merged with barrier alignment; outputs are sent with backpressure.

use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use futures::FutureExt;

use super::control::Control;
use super::edge::{EdgeReceiver, EdgeSender};
use super::message::{Msg, Signal};
use super::operator::{AsyncOperator, AsyncSource, Context, Emitted, Operator, Output, Produced, Source};
use crate::error::Error;

/// How one actor's task ended.
#[derive(Debug)]
pub enum TaskOutcome {
    /// Ran to the end of its input (or, for a source, to exhaustion or cancellation) and closed.
    Finished,
    /// Stopped because a downstream edge closed (its receiver failed or aborted).
    DownstreamClosed {
        /// The closed edge.
        edge: String,
    },
    /// Stopped by an abort (deadline passed, or a fatal failure elsewhere).
    Aborted,
    /// The actor returned an error.
    Failed {
        /// Lifecycle stage: `start`, `batch`, `signal`, `close`.
        stage: &'static str,
        /// The error.
        error: Error,
    },
    /// The actor panicked.
    Panicked {
        /// The panic message.
        message: String,
    },
}

impl TaskOutcome {
    /// A short label for status reports.
    pub fn label(&self) -> &'static str {
        match self {
            TaskOutcome::Finished => "finished",
            TaskOutcome::DownstreamClosed { .. } => "downstream_closed",
            TaskOutcome::Aborted => "aborted",
            TaskOutcome::Failed { .. } => "failed",
            TaskOutcome::Panicked { .. } => "panicked",
        }
    }
}

/// The channels of one actor: its inputs, and its outputs per port (several edges per port =
/// fan-out: each gets every batch).
pub struct Wiring {
    /// Input edges, by input index.
    pub inputs: Vec<EdgeReceiver>,
    /// Output edges, by port.
    pub outputs: Vec<Vec<EdgeSender>>,
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Runs `f` catching a panic into [`TaskOutcome::Panicked`].
pub(crate) fn catch(f: impl FnOnce() -> TaskOutcome) -> TaskOutcome {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|p| TaskOutcome::Panicked { message: panic_message(p) })
}

/// Like [`catch`], for futures.
pub(crate) async fn catch_async(f: impl std::future::Future<Output = TaskOutcome>) -> TaskOutcome {
    std::panic::AssertUnwindSafe(f)
        .catch_unwind()
        .await
        .unwrap_or_else(|p| TaskOutcome::Panicked { message: panic_message(p) })
}

fn failed(ctx: &Context, stage: &'static str, error: Error) -> TaskOutcome {
    ctx.metrics.error(stage, error.kind());
    tracing::warn!(actor = ctx.actor(), stage, %error, "Actor failed.");
    TaskOutcome::Failed { stage, error }
}

// ---------------------------------------------------------------------------------------------
// Outputs

struct Outputs {
    ports: Vec<Vec<EdgeSender>>,
}

enum SendError {
    Closed(String),
    Unconnected(usize),
}

impl Outputs {
    fn targets(&self, item: &Emitted) -> Result<Vec<(&EdgeSender, Msg)>, SendError> {
        match item {
            Emitted::Data { port, batch } => {
                let edges =
                    self.ports.get(*port).filter(|e| !e.is_empty()).ok_or(SendError::Unconnected(*port))?;
                Ok(edges.iter().map(|e| (e, Msg::Data(batch.clone()))).collect())
            }
            Emitted::Signal(s) => Ok(self.ports.iter().flatten().map(|e| (e, Msg::Signal(*s))).collect()),
        }
    }

    fn send_blocking(&self, out: &mut Output, ctx: &Context) -> Result<(), SendError> {
        for item in out.take() {
            for (edge, msg) in self.targets(&item)? {
                let rows = msg.rows();
                edge.send_blocking(msg).map_err(|_| SendError::Closed(edge.name().to_string()))?;
                ctx.metrics.sent_rows.increment(rows as u64);
            }
        }
        Ok(())
    }

    async fn send_async(&self, out: &mut Output, ctx: &Context) -> Result<(), SendError> {
        for item in out.take() {
            for (edge, msg) in self.targets(&item)? {
                let rows = msg.rows();
                edge.send_async(msg).await.map_err(|_| SendError::Closed(edge.name().to_string()))?;
                ctx.metrics.sent_rows.increment(rows as u64);
            }
        }
        Ok(())
    }
}

fn send_outcome(ctx: &Context, error: SendError) -> TaskOutcome {
    match error {
        SendError::Closed(edge) => TaskOutcome::DownstreamClosed { edge },
        SendError::Unconnected(port) => failed(
            ctx,
            "batch",
            Error::Operator { message: format!("emitted on output port {port}, which is not connected") },
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs with barrier alignment

enum Next {
    Data(usize, RecordBatch),
    Signal(Signal),
    Closed,
    Aborted,
}

struct Inputs {
    receivers: Vec<Option<EdgeReceiver>>,
    at_barrier: Vec<Option<u64>>,
}

impl Inputs {
    fn new(receivers: Vec<EdgeReceiver>) -> Self {
        let n = receivers.len();
        Inputs { receivers: receivers.into_iter().map(Some).collect(), at_barrier: vec![None; n] }
    }

    /// Inputs that may be read now: open, and not holding at a barrier.
    fn readable(&self) -> impl Iterator<Item = (usize, &EdgeReceiver)> {
        self.receivers
            .iter()
            .enumerate()
            .filter(|(i, _)| self.at_barrier[*i].is_none())
            .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
    }

    fn all_closed(&self) -> bool {
        self.receivers.iter().all(Option::is_none)
    }

    /// An aligned barrier, once every open input holds one.
    fn barrier_complete(&mut self) -> Option<Next> {
        let open: Vec<usize> = (0..self.receivers.len()).filter(|&i| self.receivers[i].is_some()).collect();
        if open.is_empty() || open.iter().any(|&i| self.at_barrier[i].is_none()) {
            return None;
        }
        let epoch = open.iter().filter_map(|&i| self.at_barrier[i]).max().unwrap_or(0);
        self.at_barrier.iter_mut().for_each(|b| *b = None);
        Some(Next::Signal(Signal::Barrier { epoch }))
    }

    fn close(&mut self, i: usize) -> Option<Next> {
        self.receivers[i] = None;
        self.at_barrier[i] = None;
        if self.all_closed() {
            return Some(Next::Closed);
        }
        if self.at_barrier.iter().any(Option::is_some) {
            return self.barrier_complete();
        }
        None
    }

    fn accept(&mut self, i: usize, msg: Option<Msg>) -> Option<Next> {
        match msg {
            Some(Msg::Data(batch)) => Some(Next::Data(i, batch)),
            Some(Msg::Signal(Signal::Barrier { epoch })) => {
                self.at_barrier[i] = Some(epoch);
                self.barrier_complete()
            }
            Some(Msg::Signal(Signal::Flush)) => Some(Next::Signal(Signal::Flush)),
            Some(Msg::Signal(Signal::EndOfData)) | None => self.close(i),
        }
    }

    fn next_blocking(&mut self, control: &Control) -> Next {
        loop {
            if self.all_closed() {
                return Next::Closed;
            }
            if control.aborting() {
                return Next::Aborted;
            }
            let mut selector = flume::Selector::new();
            for (i, rx) in self.readable() {
                selector = selector.recv(rx.flume(), move |r| (i, r.ok()));
            }
            let Ok((i, msg)) = selector.wait_timeout(Duration::from_millis(100)) else {
                continue;
            };
            if let (Some(m), Some(rx)) = (&msg, &self.receivers[i]) {
                rx.took(m);
            }
            if let Some(next) = self.accept(i, msg) {
                return next;
            }
        }
    }

    async fn next_async(&mut self, control: &Control) -> Next {
        loop {
            if self.all_closed() {
                return Next::Closed;
            }
            let recvs: Vec<_> = self
                .readable()
                .map(|(i, rx)| async move { (i, rx.flume().recv_async().await.ok()) }.boxed())
                .collect();
            let (i, msg) = tokio::select! {
                biased;
                _ = control.aborted() => return Next::Aborted,
                ((i, msg), _, _) = futures::future::select_all(recvs) => (i, msg),
            };
            if let (Some(m), Some(rx)) = (&msg, &self.receivers[i]) {
                rx.took(m);
            }
            if let Some(next) = self.accept(i, msg) {
                return next;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The four runners

/// Runs one of the actor's calls, timed into its busy time; a failure ends the task.
macro_rules! step {
    ($ctx:expr, $stage:literal, $call:expr) => {
        let started = Instant::now();
        let result = $call;
        $ctx.add_busy(started.elapsed());
        if let Err(error) = result {
            return failed(&$ctx, $stage, error);
        }
    };
}

/// Runs a [`Source`] to completion on the calling thread.
pub fn run_source<S: Source>(mut source: S, wiring: Wiring, mut ctx: Context) -> TaskOutcome {
    let outputs = Outputs { ports: wiring.outputs };
    let mut out = Output::default();
    step!(ctx, "start", source.on_start(&mut ctx, &mut out));
    if let Err(e) = outputs.send_blocking(&mut out, &ctx) {
        return send_outcome(&ctx, e);
    }
    let control = ctx.control().clone();
    loop {
        if control.wait_while_paused_blocking() != super::control::RunState::Running {
            break;
        }
        let Some(_unit) = control.begin_unit() else { continue };
        let started = Instant::now();
        let produced = source.produce(&mut ctx, &mut out);
        ctx.add_busy(started.elapsed());
        let produced = match produced {
            Ok(p) => p,
            Err(error) => return failed(&ctx, "batch", error),
        };
        ctx.metrics.batch_seconds.record(started.elapsed().as_secs_f64());
        ctx.metrics.batches.increment(1);
        if let Err(e) = outputs.send_blocking(&mut out, &ctx) {
            return send_outcome(&ctx, e);
        }
        if produced == Produced::Done {
            break;
        }
    }
    if control.aborting() {
        return TaskOutcome::Aborted;
    }
    step!(ctx, "close", source.on_close(&mut ctx, &mut out));
    out.signal(Signal::EndOfData);
    match outputs.send_blocking(&mut out, &ctx) {
        Ok(()) => TaskOutcome::Finished,
        Err(e) => send_outcome(&ctx, e),
    }
}

/// Runs an [`Operator`] to the end of its inputs on the calling thread.
pub fn run_operator<O: Operator>(mut op: O, wiring: Wiring, mut ctx: Context) -> TaskOutcome {
    let outputs = Outputs { ports: wiring.outputs };
    let mut inputs = Inputs::new(wiring.inputs);
    let mut out = Output::default();
    step!(ctx, "start", op.on_start(&mut ctx, &mut out));
    let control = ctx.control().clone();
    loop {
        if let Err(e) = outputs.send_blocking(&mut out, &ctx) {
            return send_outcome(&ctx, e);
        }
        // Work the operator set itself (a generator's plan): one unit at a time, each unit's
        // output sent before the next, until it is done or the job stops.
        while op.has_pending_work() {
            if control.wait_while_paused_blocking() != super::control::RunState::Running {
                break;
            }
            let Some(_unit) = control.begin_unit() else { continue };
            let started = Instant::now();
            step!(ctx, "batch", op.do_pending_work(&mut ctx, &mut out));
            ctx.metrics.batch_seconds.record(started.elapsed().as_secs_f64());
            ctx.metrics.batches.increment(1);
            if let Err(e) = outputs.send_blocking(&mut out, &ctx) {
                return send_outcome(&ctx, e);
            }
        }
        match inputs.next_blocking(&control) {
            Next::Data(i, batch) => {
                ctx.metrics.received_rows.increment(batch.num_rows() as u64);
                let started = Instant::now();
                step!(ctx, "batch", op.process_batch(i, batch, &mut ctx, &mut out));
                ctx.metrics.batch_seconds.record(started.elapsed().as_secs_f64());
                ctx.metrics.batches.increment(1);
            }
            Next::Signal(signal) => {
                step!(ctx, "signal", op.on_signal(signal, &mut ctx, &mut out));
                out.signal(signal);
            }
            Next::Closed => break,
            Next::Aborted => return TaskOutcome::Aborted,
        }
    }
    step!(ctx, "close", op.on_close(&mut ctx, &mut out));
    out.signal(Signal::EndOfData);
    match outputs.send_blocking(&mut out, &ctx) {
        Ok(()) => TaskOutcome::Finished,
        Err(e) => send_outcome(&ctx, e),
    }
}

/// [`step!`] for an async actor's calls.
macro_rules! step_async {
    ($ctx:expr, $stage:literal, $call:expr) => {
        let started = Instant::now();
        let result = $call.await;
        $ctx.add_busy(started.elapsed());
        if let Err(error) = result {
            return failed(&$ctx, $stage, error);
        }
    };
}

/// Runs an [`AsyncSource`] to completion.
pub async fn run_async_source<S: AsyncSource>(
    mut source: S,
    wiring: Wiring,
    mut ctx: Context,
) -> TaskOutcome {
    let outputs = Outputs { ports: wiring.outputs };
    let mut out = Output::default();
    step_async!(ctx, "start", source.on_start(&mut ctx, &mut out));
    if let Err(e) = outputs.send_async(&mut out, &ctx).await {
        return send_outcome(&ctx, e);
    }
    let control = ctx.control().clone();
    loop {
        if control.wait_while_paused().await != super::control::RunState::Running {
            break;
        }
        let Some(_unit) = control.begin_unit() else { continue };
        let started = Instant::now();
        let produced = source.produce(&mut ctx, &mut out).await;
        ctx.add_busy(started.elapsed());
        let produced = match produced {
            Ok(p) => p,
            Err(error) => return failed(&ctx, "batch", error),
        };
        ctx.metrics.batch_seconds.record(started.elapsed().as_secs_f64());
        ctx.metrics.batches.increment(1);
        if let Err(e) = outputs.send_async(&mut out, &ctx).await {
            return send_outcome(&ctx, e);
        }
        if produced == Produced::Done {
            break;
        }
    }
    if control.aborting() {
        return TaskOutcome::Aborted;
    }
    step_async!(ctx, "close", source.on_close(&mut ctx, &mut out));
    out.signal(Signal::EndOfData);
    match outputs.send_async(&mut out, &ctx).await {
        Ok(()) => TaskOutcome::Finished,
        Err(e) => send_outcome(&ctx, e),
    }
}

/// Runs an [`AsyncOperator`] to the end of its inputs.
pub async fn run_async_operator<O: AsyncOperator>(
    mut op: O,
    wiring: Wiring,
    mut ctx: Context,
) -> TaskOutcome {
    let outputs = Outputs { ports: wiring.outputs };
    let mut inputs = Inputs::new(wiring.inputs);
    let mut out = Output::default();
    step_async!(ctx, "start", op.on_start(&mut ctx, &mut out));
    let control = ctx.control().clone();
    loop {
        if let Err(e) = outputs.send_async(&mut out, &ctx).await {
            return send_outcome(&ctx, e);
        }
        if op.has_pending_work() {
            step_async!(ctx, "pending work", op.do_pending_work(&mut ctx, &mut out));
            continue;
        }
        match inputs.next_async(&control).await {
            Next::Data(i, batch) => {
                ctx.metrics.received_rows.increment(batch.num_rows() as u64);
                let started = Instant::now();
                step_async!(ctx, "batch", op.process_batch(i, batch, &mut ctx, &mut out));
                ctx.metrics.batch_seconds.record(started.elapsed().as_secs_f64());
                ctx.metrics.batches.increment(1);
            }
            Next::Signal(signal) => {
                step_async!(ctx, "signal", op.on_signal(signal, &mut ctx, &mut out));
                out.signal(signal);
            }
            Next::Closed => break,
            Next::Aborted => return TaskOutcome::Aborted,
        }
    }
    step_async!(ctx, "close", op.on_close(&mut ctx, &mut out));
    out.signal(Signal::EndOfData);
    match outputs.send_async(&mut out, &ctx).await {
        Ok(()) => TaskOutcome::Finished,
        Err(e) => send_outcome(&ctx, e),
    }
}
