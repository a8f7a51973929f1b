//! Metric handles of the runtime, built from an explicit recorder so tests can use a fresh one.
//!
//! [`Metrics`] is the factory: `Metrics::global()` uses the process's installed recorder (the
//! Prometheus exporter of the binary), `Metrics::with_recorder(..)` a recorder of the caller's
//! (a test's), `Metrics::noop()` none. Names come from [`proxytune_schemas::MetricName`].

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Recorder};
use proxytune_schemas::MetricName;

/// Builds metric handles against one recorder.
#[derive(Clone, Default)]
pub struct Metrics {
    recorder: Option<Arc<dyn Recorder + Send + Sync>>,
    noop: bool,
    /// Added to every metric as `job_id` (the daemon's jobs share one process).
    job_id: Option<String>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("local", &self.recorder.is_some()).field("noop", &self.noop).finish()
    }
}

impl Metrics {
    /// Handles on the globally installed recorder.
    pub fn global() -> Self {
        Metrics::default()
    }

    /// Handles on `recorder` (e.g. a fresh Prometheus recorder in a test).
    pub fn with_recorder(recorder: Arc<dyn Recorder + Send + Sync>) -> Self {
        Metrics { recorder: Some(recorder), noop: false, job_id: None }
    }

    /// Handles that record nothing.
    pub fn noop() -> Self {
        Metrics { recorder: None, noop: true, job_id: None }
    }

    /// The same recorder, with `job_id = job` on every metric built from it.
    pub fn for_job(&self, job: &str) -> Self {
        Metrics { job_id: Some(job.to_string()), ..self.clone() }
    }

    fn labels(&self, labels: &[(&'static str, String)]) -> Vec<metrics::Label> {
        let job = self.job_id.iter().map(|j| metrics::Label::new("job_id", j.clone()));
        labels.iter().map(|(k, v)| metrics::Label::new(*k, v.clone())).chain(job).collect()
    }

    fn build<T>(&self, make: impl FnOnce() -> T, noop: impl FnOnce() -> T) -> T {
        if self.noop {
            return noop();
        }
        match &self.recorder {
            Some(recorder) => metrics::with_local_recorder(recorder.as_ref(), make),
            None => make(),
        }
    }

    /// A counter with one label.
    pub fn counter(&self, name: MetricName, label: &'static str, value: &str) -> Counter {
        self.counter_labels(name, &[(label, value.to_string())])
    }

    /// A counter with labels.
    pub fn counter_labels(&self, name: MetricName, labels: &[(&'static str, String)]) -> Counter {
        let labels = self.labels(labels);
        self.build(|| metrics::counter!(name.as_str(), labels), Counter::noop)
    }

    /// A gauge with one label.
    pub fn gauge(&self, name: MetricName, label: &'static str, value: &str) -> Gauge {
        self.gauge_labels(name, &[(label, value.to_string())])
    }

    /// A gauge with labels.
    pub fn gauge_labels(&self, name: MetricName, labels: &[(&'static str, String)]) -> Gauge {
        let labels = self.labels(labels);
        self.build(|| metrics::gauge!(name.as_str(), labels), Gauge::noop)
    }

    /// A histogram with one label.
    pub fn histogram(&self, name: MetricName, label: &'static str, value: &str) -> Histogram {
        let labels = self.labels(&[(label, value.to_string())]);
        self.build(|| metrics::histogram!(name.as_str(), labels), Histogram::noop)
    }

    /// Registers every metric's help text with the recorder.
    pub fn describe_all(&self) {
        if self.noop {
            return;
        }
        let describe = || {
            for m in MetricName::ALL {
                match m.kind() {
                    proxytune_schemas::metrics::MetricKind::Counter => {
                        metrics::describe_counter!(m.as_str(), m.help())
                    }
                    proxytune_schemas::metrics::MetricKind::Gauge => {
                        metrics::describe_gauge!(m.as_str(), m.help())
                    }
                    proxytune_schemas::metrics::MetricKind::Histogram => {
                        metrics::describe_histogram!(m.as_str(), metrics::Unit::Seconds, m.help())
                    }
                }
            }
        };
        match &self.recorder {
            Some(recorder) => metrics::with_local_recorder(recorder.as_ref(), describe),
            None => describe(),
        }
    }

    /// The handles of one actor.
    pub fn actor(&self, actor: &str) -> ActorMetrics {
        ActorMetrics {
            received_rows: self.counter(MetricName::ActorReceivedRows, "actor", actor),
            sent_rows: self.counter(MetricName::ActorSentRows, "actor", actor),
            batches: self.counter(MetricName::ActorBatches, "actor", actor),
            batch_seconds: self.histogram(MetricName::ActorBatchDuration, "actor", actor),
            actor: actor.to_string(),
            metrics: self.clone(),
        }
    }

    /// The handles of one trainer: `model` labels them (`supervisor`, `student`), `terms` names
    /// its loss terms in the order [`TrainMeters::record`] takes them.
    pub fn trainer(&self, model: &str, terms: &[&str]) -> TrainMeters {
        let labels = |term: &str| [("model", model.to_string()), ("term", term.to_string())];
        TrainMeters {
            losses: terms.iter().map(|t| self.gauge_labels(MetricName::TrainLoss, &labels(t))).collect(),
            learning_rate: self.gauge(MetricName::TrainLearningRate, "model", model),
            steps: self.counter(MetricName::TrainSteps, "model", model),
            step_seconds: self.histogram(MetricName::TrainStepDuration, "model", model),
        }
    }

    /// The handles of one edge.
    pub fn edge(&self, edge: &str) -> EdgeMetrics {
        EdgeMetrics {
            queued_rows: self.gauge(MetricName::ChannelQueuedRows, "edge", edge),
            capacity_rows: self.gauge(MetricName::ChannelCapacityRows, "edge", edge),
            blocked_seconds: self.histogram(MetricName::ChannelBlockedDuration, "edge", edge),
            undelivered_rows: self.counter(MetricName::ChannelUndeliveredRows, "edge", edge),
        }
    }
}

/// Metric handles of one actor.
#[derive(Clone)]
pub struct ActorMetrics {
    /// Rows received.
    pub received_rows: Counter,
    /// Rows sent.
    pub sent_rows: Counter,
    /// Batches processed.
    pub batches: Counter,
    /// Seconds per batch.
    pub batch_seconds: Histogram,
    actor: String,
    metrics: Metrics,
}

impl ActorMetrics {
    /// Counts one error of this actor at `stage` with `error_type` (a fixed label, never error text).
    pub fn error(&self, stage: &'static str, error_type: &'static str) {
        self.metrics
            .counter_labels(
                MetricName::ActorErrors,
                &[("actor", self.actor.clone()), ("stage", stage.into()), ("error_type", error_type.into())],
            )
            .increment(1);
    }
}

/// Metric handles of one edge.
#[derive(Clone)]
pub struct EdgeMetrics {
    /// Rows queued now.
    pub queued_rows: Gauge,
    /// Capacity in rows.
    pub capacity_rows: Gauge,
    /// Seconds each blocked send waited.
    pub blocked_seconds: Histogram,
    /// Rows never taken by the receiver.
    pub undelivered_rows: Counter,
}

/// Metric handles of one trainer.
#[derive(Clone)]
pub struct TrainMeters {
    losses: Vec<Gauge>,
    learning_rate: Gauge,
    steps: Counter,
    step_seconds: Histogram,
}

impl TrainMeters {
    /// Records one optimiser step: its loss terms (in the order given at creation), learning rate
    /// and duration.
    pub fn record(&self, losses: &[f64], learning_rate: f64, seconds: f64) {
        for (gauge, value) in self.losses.iter().zip(losses) {
            gauge.set(*value);
        }
        self.learning_rate.set(learning_rate);
        self.steps.increment(1);
        self.step_seconds.record(seconds);
    }
}
