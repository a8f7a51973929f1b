//! Every metric proxytune exports, named in one place (Prometheus conventions:
//! `proxytune_<subsystem>_<name>_<unit>[_total]`, base units, `_total` on counters,
//! low-cardinality labels only). Dashboards in `grafana/` and the tests refer to these names.

/// A metric: its name, kind, help text and labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricName {
    /// Rows an actor received on its inputs. Labels: `actor`.
    ActorReceivedRows,
    /// Rows an actor sent on its outputs. Labels: `actor`.
    ActorSentRows,
    /// Batches an actor processed. Labels: `actor`.
    ActorBatches,
    /// Seconds an actor spent in one `process_batch` (or one `produce` of a source). Labels: `actor`.
    ActorBatchDuration,
    /// Errors raised by an actor. Labels: `actor`, `stage` (start, batch, signal, close), `error_type`.
    ActorErrors,
    /// Rows queued on an edge right now. Labels: `edge`.
    ChannelQueuedRows,
    /// Row capacity of an edge. Labels: `edge`.
    ChannelCapacityRows,
    /// Seconds each blocked send waited on a full edge (`_sum` is the total blocked time).
    /// Labels: `edge`.
    ChannelBlockedDuration,
    /// Rows that left a source but were not delivered to their sink (shutdown, failure).
    /// Labels: `edge`.
    ChannelUndeliveredRows,
    /// Rows written to a corpus table. Labels: `table`.
    CorpusWrittenRows,
    /// Rows skipped by a corpus table because their key was already stored. Labels: `table`.
    CorpusSkippedRows,
    /// Current version of a corpus table. Labels: `table`.
    CorpusVersion,
    /// Proxies the Filter kept.
    FilterAcceptedRows,
    /// Proxies the Filter rejected. Labels: `reason`.
    FilterRejectedRows,
    /// Scores the Filter computed. Labels: `metric` (`dino`, `clip_i`, `clip_t`, `feat_i`, `dup`).
    FilterScore,
    /// Fragments of a corpus table. Labels: `table`.
    CorpusFragments,
    /// The last optimiser step's loss. Labels: `model` (`supervisor`, `student`), `term`.
    TrainLoss,
    /// The learning rate of the last optimiser step. Labels: `model`.
    TrainLearningRate,
    /// Optimiser steps taken. Labels: `model`.
    TrainSteps,
    /// Seconds one optimiser step took (forward, backward, update). Labels: `model`.
    TrainStepDuration,
    /// Images a sampler generated. Labels: `kind` (`proxy`, `class_prior`, `validation`).
    GeneratedImages,
    /// The latest DreamBench evaluation score of a model. Labels: `model`, `metric`.
    EvalScore,
}

/// Prometheus metric kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic counter (`_total`).
    Counter,
    /// Gauge.
    Gauge,
    /// Histogram (rendered with buckets).
    Histogram,
}

impl MetricName {
    /// Every metric, for compliance tests and dashboards.
    pub const ALL: [MetricName; 22] = [
        MetricName::ActorReceivedRows,
        MetricName::ActorSentRows,
        MetricName::ActorBatches,
        MetricName::ActorBatchDuration,
        MetricName::ActorErrors,
        MetricName::ChannelQueuedRows,
        MetricName::ChannelCapacityRows,
        MetricName::ChannelBlockedDuration,
        MetricName::ChannelUndeliveredRows,
        MetricName::CorpusWrittenRows,
        MetricName::CorpusSkippedRows,
        MetricName::CorpusVersion,
        MetricName::CorpusFragments,
        MetricName::FilterAcceptedRows,
        MetricName::FilterRejectedRows,
        MetricName::FilterScore,
        MetricName::TrainLoss,
        MetricName::TrainLearningRate,
        MetricName::TrainSteps,
        MetricName::TrainStepDuration,
        MetricName::GeneratedImages,
        MetricName::EvalScore,
    ];

    /// The exported name.
    pub const fn as_str(self) -> &'static str {
        match self {
            MetricName::ActorReceivedRows => "proxytune_actor_received_rows_total",
            MetricName::ActorSentRows => "proxytune_actor_sent_rows_total",
            MetricName::ActorBatches => "proxytune_actor_batches_total",
            MetricName::ActorBatchDuration => "proxytune_actor_batch_duration_seconds",
            MetricName::ActorErrors => "proxytune_actor_errors_total",
            MetricName::ChannelQueuedRows => "proxytune_channel_queued_rows",
            MetricName::ChannelCapacityRows => "proxytune_channel_capacity_rows",
            MetricName::ChannelBlockedDuration => "proxytune_channel_blocked_duration_seconds",
            MetricName::ChannelUndeliveredRows => "proxytune_channel_undelivered_rows_total",
            MetricName::CorpusWrittenRows => "proxytune_corpus_written_rows_total",
            MetricName::CorpusSkippedRows => "proxytune_corpus_skipped_rows_total",
            MetricName::CorpusVersion => "proxytune_corpus_version",
            MetricName::CorpusFragments => "proxytune_corpus_fragments",
            MetricName::FilterAcceptedRows => "proxytune_filter_accepted_rows_total",
            MetricName::FilterRejectedRows => "proxytune_filter_rejected_rows_total",
            MetricName::FilterScore => "proxytune_filter_score",
            MetricName::TrainLoss => "proxytune_train_loss",
            MetricName::TrainLearningRate => "proxytune_train_learning_rate",
            MetricName::TrainSteps => "proxytune_train_steps_total",
            MetricName::TrainStepDuration => "proxytune_train_step_duration_seconds",
            MetricName::GeneratedImages => "proxytune_generated_images_total",
            MetricName::EvalScore => "proxytune_eval_score",
        }
    }

    /// The metric's kind.
    pub const fn kind(self) -> MetricKind {
        match self {
            MetricName::ActorBatchDuration
            | MetricName::ChannelBlockedDuration
            | MetricName::FilterScore
            | MetricName::TrainStepDuration => MetricKind::Histogram,
            MetricName::ChannelQueuedRows
            | MetricName::ChannelCapacityRows
            | MetricName::CorpusVersion
            | MetricName::CorpusFragments
            | MetricName::TrainLoss
            | MetricName::TrainLearningRate
            | MetricName::EvalScore => MetricKind::Gauge,
            _ => MetricKind::Counter,
        }
    }

    /// One-line help text.
    pub const fn help(self) -> &'static str {
        match self {
            MetricName::ActorReceivedRows => "Rows an actor received on its inputs.",
            MetricName::ActorSentRows => "Rows an actor sent on its outputs.",
            MetricName::ActorBatches => "Batches an actor processed.",
            MetricName::ActorBatchDuration => "Seconds an actor spent processing one batch.",
            MetricName::ActorErrors => "Errors raised by an actor, by lifecycle stage and error type.",
            MetricName::ChannelQueuedRows => "Rows queued on an edge.",
            MetricName::ChannelCapacityRows => "Row capacity of an edge.",
            MetricName::ChannelBlockedDuration => "Seconds a send waited on a full edge.",
            MetricName::ChannelUndeliveredRows => "Rows sent on an edge that its receiver never took.",
            MetricName::CorpusWrittenRows => "Rows written to a corpus table.",
            MetricName::CorpusSkippedRows => "Rows skipped by a corpus table because their key was stored.",
            MetricName::CorpusVersion => "Current version of a corpus table.",
            MetricName::CorpusFragments => "Fragments of a corpus table.",
            MetricName::FilterAcceptedRows => "Proxies the Filter kept.",
            MetricName::FilterRejectedRows => "Proxies the Filter rejected, by reason.",
            MetricName::FilterScore => "Scores the Filter computed (cosine similarities), by metric.",
            MetricName::TrainLoss => "Loss of the last optimiser step, by model and loss term.",
            MetricName::TrainLearningRate => "Learning rate of the last optimiser step, by model.",
            MetricName::TrainSteps => "Optimiser steps taken, by model.",
            MetricName::TrainStepDuration => "Seconds one optimiser step took, by model.",
            MetricName::GeneratedImages => "Images a diffusion sampler generated, by kind.",
            MetricName::EvalScore => "Latest DreamBench evaluation score, by model and metric.",
        }
    }
}

/// Histogram buckets for cosine-similarity scores.
pub const SCORE_BUCKETS: [f64; 12] = [-0.5, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Histogram buckets for per-batch durations, in seconds (1 ms .. 60 s).
pub const DURATION_BUCKETS_SECONDS: [f64; 12] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 60.0];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for m in MetricName::ALL {
            let name = m.as_str();
            assert!(seen.insert(name), "{name} twice");
            assert!(name.starts_with("proxytune_"), "{name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{name}");
            assert_eq!(m.kind() == MetricKind::Counter, name.ends_with("_total"), "{name}");
            assert!(!m.help().is_empty());
        }
    }
}
