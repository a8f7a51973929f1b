//! The pipeline builder and a running pipeline.
//!
//! [`Pipeline`] turns named actors and their connections into a graph: it creates every edge
//! (capacities from one [`PipelineConfig`]), names every task, and starts sync actors on their own
//! OS threads and async actors on tokio. Actors never create channels.
//!
//! [`RunningPipeline::wait`] supervises the tasks: the first failure cancels the job (sources stop,
//! the rest drains and closes), a cancelled job that has not drained within
//! `graceful_shutdown_limit_secs` is aborted, and the [`PipelineReport`] says how it ended.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};

use super::control::{Control, RunState};
use super::edge::{edge, EdgeProbe, EdgeReceiver, EdgeSender, EdgeStats};
use super::metrics::Metrics;
use super::operator::{AsyncOperator, AsyncSource, Context, Operator, Source};
use super::runner::{self, TaskOutcome, Wiring};
use crate::error::{Error, Result};

fn default_capacity() -> NonZeroUsize {
    NonZeroUsize::new(1024).expect("non-zero")
}

fn default_shutdown_secs() -> u64 {
    30
}

/// Capacities and shutdown limits of a pipeline: the one place edge bounds are set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Row capacity of every edge unless overridden.
    #[serde(default = "default_capacity")]
    pub edge_capacity_rows: NonZeroUsize,
    /// Per-edge capacity overrides, by edge name (`from->to`).
    #[serde(default)]
    pub edge_capacity_overrides: BTreeMap<String, NonZeroUsize>,
    /// Seconds a cancelled job may take to drain before every actor is aborted.
    #[serde(default = "default_shutdown_secs")]
    pub graceful_shutdown_limit_secs: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            edge_capacity_rows: default_capacity(),
            edge_capacity_overrides: BTreeMap::new(),
            graceful_shutdown_limit_secs: default_shutdown_secs(),
        }
    }
}

/// A node of the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(usize);

type ThreadLaunch = Box<dyn FnOnce(Wiring, Context) -> TaskOutcome + Send>;
type TaskLaunch = Box<dyn FnOnce(Wiring, Context) -> BoxFuture<'static, TaskOutcome> + Send>;

enum Launch {
    Thread(ThreadLaunch),
    Task(TaskLaunch),
}

struct Node {
    name: String,
    source: bool,
    launch: Launch,
}

struct Connection {
    from: NodeId,
    port: usize,
    to: NodeId,
}

/// Builds a pipeline graph.
pub struct Pipeline {
    config: PipelineConfig,
    metrics: Metrics,
    nodes: Vec<Node>,
    connections: Vec<Connection>,
}

impl Pipeline {
    /// An empty graph.
    pub fn new(config: PipelineConfig, metrics: Metrics) -> Self {
        Pipeline { config, metrics, nodes: Vec::new(), connections: Vec::new() }
    }

    fn add(&mut self, name: &str, source: bool, launch: Launch) -> NodeId {
        self.nodes.push(Node { name: name.to_string(), source, launch });
        NodeId(self.nodes.len() - 1)
    }

    /// Adds a [`Source`] (runs on its own thread).
    pub fn source<S: Source>(&mut self, name: &str, source: S) -> NodeId {
        self.add(name, true, Launch::Thread(Box::new(move |w, c| runner::run_source(source, w, c))))
    }

    /// Adds an [`Operator`] (runs on its own thread).
    pub fn operator<O: Operator>(&mut self, name: &str, op: O) -> NodeId {
        self.add(name, false, Launch::Thread(Box::new(move |w, c| runner::run_operator(op, w, c))))
    }

    /// Adds an [`AsyncSource`] (runs on tokio).
    pub fn async_source<S: AsyncSource>(&mut self, name: &str, source: S) -> NodeId {
        self.add(
            name,
            true,
            Launch::Task(Box::new(move |w, c| Box::pin(runner::run_async_source(source, w, c)))),
        )
    }

    /// Adds an [`AsyncOperator`] (runs on tokio).
    pub fn async_operator<O: AsyncOperator>(&mut self, name: &str, op: O) -> NodeId {
        self.add(
            name,
            false,
            Launch::Task(Box::new(move |w, c| Box::pin(runner::run_async_operator(op, w, c)))),
        )
    }

    /// Connects output port 0 of `from` to the next input of `to`.
    pub fn connect(&mut self, from: NodeId, to: NodeId) -> &mut Self {
        self.connect_port(from, 0, to)
    }

    /// Connects output port `port` of `from` to the next input of `to`. Inputs are numbered in
    /// the order of the calls; connecting one port to several nodes fans out.
    pub fn connect_port(&mut self, from: NodeId, port: usize, to: NodeId) -> &mut Self {
        self.connections.push(Connection { from, port, to });
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |message: String| Error::Pipeline { message };
        let mut names = HashSet::new();
        for node in &self.nodes {
            if !names.insert(node.name.as_str()) {
                return Err(bad(format!("two actors are named `{}`", node.name)));
            }
        }
        let mut inputs = vec![0usize; self.nodes.len()];
        for c in &self.connections {
            if c.from.0 >= self.nodes.len() || c.to.0 >= self.nodes.len() {
                return Err(bad("a connection names an actor of another pipeline".into()));
            }
            inputs[c.to.0] += 1;
        }
        for (node, n) in self.nodes.iter().zip(&inputs) {
            if node.source && *n > 0 {
                return Err(bad(format!("source `{}` cannot have inputs", node.name)));
            }
            if !node.source && *n == 0 {
                return Err(bad(format!("actor `{}` has no input", node.name)));
            }
        }
        // Kahn's algorithm: a cycle would deadlock on backpressure.
        let mut indegree = inputs.clone();
        let mut ready: Vec<usize> = (0..self.nodes.len()).filter(|&i| indegree[i] == 0).collect();
        let mut seen = 0;
        while let Some(i) = ready.pop() {
            seen += 1;
            for c in self.connections.iter().filter(|c| c.from.0 == i) {
                indegree[c.to.0] -= 1;
                if indegree[c.to.0] == 0 {
                    ready.push(c.to.0);
                }
            }
        }
        if seen != self.nodes.len() {
            return Err(bad("the graph has a cycle".into()));
        }
        Ok(())
    }

    /// Creates every edge and starts every actor. Async actors are spawned on `runtime`.
    pub fn start(self, runtime: &tokio::runtime::Handle) -> Result<RunningPipeline> {
        self.validate()?;
        let control = Control::new();
        let n = self.nodes.len();
        let mut inputs: Vec<Vec<EdgeReceiver>> = (0..n).map(|_| Vec::new()).collect();
        let mut outputs: Vec<Vec<Vec<EdgeSender>>> = (0..n).map(|_| Vec::new()).collect();
        let mut probes = Vec::new();
        let mut counts: HashMap<(usize, usize), usize> = HashMap::new();
        for c in &self.connections {
            let (from, to) = (&self.nodes[c.from.0].name, &self.nodes[c.to.0].name);
            let k = counts.entry((c.from.0, c.to.0)).or_default();
            *k += 1;
            let name = if *k == 1 { format!("{from}->{to}") } else { format!("{from}->{to}#{k}") };
            let capacity =
                self.config.edge_capacity_overrides.get(&name).unwrap_or(&self.config.edge_capacity_rows);
            let (tx, rx) = edge(name.clone(), capacity.get(), self.metrics.edge(&name));
            probes.push(tx.probe());
            inputs[c.to.0].push(rx);
            let ports = &mut outputs[c.from.0];
            if ports.len() <= c.port {
                ports.resize_with(c.port + 1, Vec::new);
            }
            ports[c.port].push(tx);
        }
        self.metrics.describe_all();
        let states = Arc::new(Mutex::new(vec![None; n]));
        let mut tasks = Vec::with_capacity(n);
        let mut busy = Vec::with_capacity(n);
        for (i, ((node, inputs), outputs)) in self.nodes.into_iter().zip(inputs).zip(outputs).enumerate() {
            let wiring = Wiring { inputs, outputs };
            let ctx = Context::new(node.name.clone(), control.clone(), self.metrics.actor(&node.name));
            busy.push(ctx.busy());
            let waiter: BoxFuture<'static, TaskOutcome> = match node.launch {
                Launch::Thread(f) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    std::thread::Builder::new()
                        .name(format!("actor-{}", node.name))
                        .spawn(move || {
                            let _ = tx.send(runner::catch(move || f(wiring, ctx)));
                        })
                        .map_err(|e| Error::Pipeline { message: format!("cannot start a thread: {e}") })?;
                    Box::pin(async move {
                        rx.await
                            .unwrap_or(TaskOutcome::Panicked { message: "the actor thread vanished".into() })
                    })
                }
                Launch::Task(f) => {
                    let handle = runtime.spawn(runner::catch_async(f(wiring, ctx)));
                    Box::pin(async move {
                        handle.await.unwrap_or_else(|e| TaskOutcome::Panicked { message: e.to_string() })
                    })
                }
            };
            tasks.push((i, node.name, waiter));
        }
        let names = tasks.iter().map(|(_, name, _)| name.clone()).collect();
        Ok(RunningPipeline {
            handle: PipelineHandle { control, probes, names, states, busy },
            shutdown_limit: Duration::from_secs(self.config.graceful_shutdown_limit_secs),
            tasks: tasks.into_iter().map(|(i, _, w)| (i, w)).collect(),
        })
    }
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobOutcome {
    /// Every actor finished.
    Succeeded,
    /// Cancelled and drained cleanly within the deadline.
    Cancelled,
    /// An actor failed (the first failure; the others were stopped).
    Failed {
        /// The failing actor.
        actor: String,
        /// Its lifecycle stage.
        stage: String,
        /// The error.
        message: String,
    },
    /// Cancelled, but the pipeline did not drain within the deadline and was aborted.
    DeadlineExceeded,
}

impl JobOutcome {
    /// The process exit code for this outcome: 0, 130 (cancelled), 1 (failed), 124 (deadline).
    pub fn exit_code(&self) -> i32 {
        match self {
            JobOutcome::Succeeded => 0,
            JobOutcome::Cancelled => 130,
            JobOutcome::Failed { .. } => 1,
            JobOutcome::DeadlineExceeded => 124,
        }
    }
}

/// One actor in a report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskReport {
    /// Actor name.
    pub name: String,
    /// How it ended (`running` while it runs).
    pub state: String,
    /// The error, when it failed.
    pub error: Option<String>,
    /// Seconds the actor spent in its own calls (start, batches, signals, pending work, close),
    /// not waiting for input or for room downstream.
    pub busy_seconds: f64,
}

/// The status of a running pipeline.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineStatus {
    /// Run state.
    pub state: RunState,
    /// Paused, and no source or generator is mid-unit: nothing is produced until it resumes.
    pub parked: bool,
    /// Every actor.
    pub tasks: Vec<TaskReport>,
    /// Every edge's accounting.
    pub edges: Vec<EdgeStats>,
}

/// How a pipeline ended, with every actor and edge.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineReport {
    /// The job's outcome.
    pub outcome: JobOutcome,
    /// Every actor.
    pub tasks: Vec<TaskReport>,
    /// Every edge's final accounting.
    pub edges: Vec<EdgeStats>,
}

impl PipelineReport {
    /// Rows left undelivered on all edges.
    pub fn undelivered_rows(&self) -> u64 {
        self.edges.iter().map(|e| e.undelivered_rows).sum()
    }
}

/// A clonable handle on a running pipeline: control and status.
#[derive(Clone)]
pub struct PipelineHandle {
    control: Control,
    probes: Vec<EdgeProbe>,
    names: Vec<String>,
    states: Arc<Mutex<Vec<Option<TaskReport>>>>,
    busy: Vec<Arc<std::sync::atomic::AtomicU64>>,
}

impl PipelineHandle {
    /// The job's control.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Actor `i`'s busy seconds so far.
    fn busy_seconds(&self, i: usize) -> f64 {
        self.busy[i].load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9
    }

    /// A snapshot of the run state, actors and edges.
    pub fn status(&self) -> PipelineStatus {
        let states = self.states.lock().expect("states lock");
        let tasks = self
            .names
            .iter()
            .zip(states.iter())
            .enumerate()
            .map(|(i, (name, s))| {
                s.clone().unwrap_or(TaskReport {
                    name: name.clone(),
                    state: "running".into(),
                    error: None,
                    busy_seconds: self.busy_seconds(i),
                })
            })
            .collect();
        PipelineStatus {
            state: self.control.state(),
            parked: self.control.parked(),
            tasks,
            edges: self.probes.iter().map(EdgeProbe::stats).collect(),
        }
    }
}

/// A started pipeline. Call [`RunningPipeline::wait`] to supervise it to its end.
pub struct RunningPipeline {
    handle: PipelineHandle,
    shutdown_limit: Duration,
    tasks: Vec<(usize, BoxFuture<'static, TaskOutcome>)>,
}

impl RunningPipeline {
    /// A handle for control and status.
    pub fn handle(&self) -> PipelineHandle {
        self.handle.clone()
    }

    /// Supervises every task to its end and reports how the job ended.
    pub async fn wait(self) -> PipelineReport {
        let RunningPipeline { handle, shutdown_limit, tasks } = self;
        let control = handle.control.clone();
        let mut pending: FuturesUnordered<_> =
            tasks.into_iter().map(|(i, fut)| async move { (i, fut.await) }).collect();
        let mut first_failure: Option<JobOutcome> = None;
        let mut deadline: Option<Instant> = None;
        let mut aborted = false;
        let mut cancelled_by_user = false;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while !pending.is_empty() {
            tokio::select! {
                Some((i, outcome)) = pending.next() => {
                    let error = match &outcome {
                        TaskOutcome::Failed { error, .. } => Some(error.to_string()),
                        TaskOutcome::Panicked { message } => Some(format!("panicked: {message}")),
                        TaskOutcome::DownstreamClosed { edge } => Some(format!("stopped: edge {edge} closed")),
                        _ => None,
                    };
                    if first_failure.is_none() {
                        let stage = match &outcome {
                            TaskOutcome::Failed { stage, .. } => Some(*stage),
                            TaskOutcome::Panicked { .. } => Some("panic"),
                            _ => None,
                        };
                        if let Some(stage) = stage {
                            first_failure = Some(JobOutcome::Failed {
                                actor: handle.names[i].clone(),
                                stage: stage.into(),
                                message: error.clone().unwrap_or_default(),
                            });
                            tracing::warn!(actor = %handle.names[i], "Actor failed; cancelling the job.");
                            control.cancel();
                        }
                    }
                    handle.states.lock().expect("states lock")[i] =
                        Some(TaskReport {
                            name: handle.names[i].clone(),
                            state: outcome.label().into(),
                            error,
                            busy_seconds: handle.busy_seconds(i),
                        });
                }
                _ = tick.tick() => {}
            }
            if control.stop_requested() && deadline.is_none() {
                if first_failure.is_none() {
                    cancelled_by_user = true;
                }
                deadline = Some(Instant::now() + shutdown_limit);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) && !aborted {
                tracing::warn!(limit_secs = shutdown_limit.as_secs(), "Shutdown deadline passed; aborting.");
                aborted = true;
                control.abort();
            }
        }
        let outcome = match first_failure {
            Some(failure) => failure,
            None if aborted => JobOutcome::DeadlineExceeded,
            None if cancelled_by_user => JobOutcome::Cancelled,
            None => JobOutcome::Succeeded,
        };
        let status = handle.status();
        PipelineReport { outcome, tasks: status.tasks, edges: status.edges }
    }
}
