//! The streaming runtime, proven with synthetic actors: backpressure accounting, overlap, bounded
//! queues, failure, cancellation with drain into Lance, deadlines, barrier alignment, fan-out,
//! and the actix supervisor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use proxytune_actors::corpus::writer::{LanceWriter, LanceWriterConfig};
use proxytune_actors::corpus::Corpus;
use proxytune_actors::runtime::supervisor::{Cancel, GetStatus, JobSupervisor, Pause, Resume, WaitDone};
use proxytune_actors::runtime::synthetic::{Discard, PassThrough, SyntheticConfig, SyntheticProxies};
use proxytune_actors::runtime::{
    Context, EdgeStats, JobOutcome, Metrics, Operator, Output, Pipeline, PipelineConfig, PipelineHandle,
    RunState, Signal,
};
use proxytune_actors::Error;
use proxytune_schemas::{Proxy, Table};

pub fn config(capacity_rows: usize) -> PipelineConfig {
    PipelineConfig {
        edge_capacity_rows: capacity_rows.try_into().unwrap(),
        graceful_shutdown_limit_secs: 20,
        ..Default::default()
    }
}

pub fn synthetic(
    batch_rows: usize,
    batches: Option<u64>,
    interval_ms: u64,
) -> (SyntheticProxies, Arc<AtomicU64>) {
    SyntheticProxies::new(SyntheticConfig {
        batch_rows,
        batches,
        payload_bytes: 256,
        interval_ms,
        ..Default::default()
    })
}

/// A sink that takes `quota` rows normally, then blocks inside `process_batch` until released.
struct GatedSink {
    quota: usize,
    taken: Arc<AtomicU64>,
    gate: flume::Receiver<()>,
}

impl Operator for GatedSink {
    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        _: &mut Context,
        _: &mut Output,
    ) -> proxytune_actors::Result<()> {
        let before = self.taken.fetch_add(batch.num_rows() as u64, Ordering::SeqCst) as usize;
        if before >= self.quota {
            let _ = self.gate.recv();
        }
        Ok(())
    }
}

/// Records what it sees, with timestamps.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(Instant, String)>>>);

impl Log {
    fn push(&self, s: String) {
        self.0.lock().unwrap().push((Instant::now(), s));
    }
    fn entries(&self) -> Vec<(Instant, String)> {
        self.0.lock().unwrap().clone()
    }
}

struct Recording {
    log: Log,
    forward: bool,
    fail_on_batch: Option<usize>,
    panic_on_batch: Option<usize>,
    seen: usize,
}

impl Recording {
    fn new(log: Log) -> Self {
        Recording { log, forward: true, fail_on_batch: None, panic_on_batch: None, seen: 0 }
    }

    fn sink(log: Log) -> Self {
        Recording { forward: false, ..Recording::new(log) }
    }
}

impl Operator for Recording {
    fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        _: &mut Context,
        out: &mut Output,
    ) -> proxytune_actors::Result<()> {
        self.seen += 1;
        if self.fail_on_batch == Some(self.seen) {
            return Err(Error::Operator { message: format!("synthetic failure on batch {}", self.seen) });
        }
        if self.panic_on_batch == Some(self.seen) {
            panic!("synthetic panic on batch {}", self.seen);
        }
        let first_seed = Proxy::from_batch(&batch).unwrap()[0].seed;
        self.log.push(format!("data {input} {first_seed} {}", batch.num_rows()));
        if self.forward {
            out.emit(batch);
        }
        Ok(())
    }

    fn on_signal(&mut self, signal: Signal, _: &mut Context, _: &mut Output) -> proxytune_actors::Result<()> {
        self.log.push(format!("signal {signal:?}"));
        Ok(())
    }

    fn on_close(&mut self, _: &mut Context, _: &mut Output) -> proxytune_actors::Result<()> {
        self.log.push("close".into());
        Ok(())
    }
}

/// Waits until `f` holds (polling), panicking after `secs`.
pub async fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every edge is full with its sender blocked on it (nothing can move until the sink
/// is released) and returns the edges then; panics with the edges after `secs`.
async fn blocked_full(handle: &PipelineHandle, secs: u64) -> Vec<EdgeStats> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let edges = handle.status().edges;
        if edges.iter().all(|e| e.queued_rows == e.capacity_rows && e.blocked_senders == 1) {
            return edges;
        }
        assert!(Instant::now() < deadline, "the pipeline never filled and blocked: {edges:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_bounds_what_the_source_pulls() {
    for with_middle in [false, true] {
        let (source, produced) = synthetic(256, None, 0);
        let (release, gate) = flume::unbounded();
        let taken = Arc::new(AtomicU64::new(0));
        let mut p = Pipeline::new(config(1024), Metrics::noop());
        let src = p.source("gen", source);
        let sink = p.operator("sink", GatedSink { quota: 2048, taken: taken.clone(), gate });
        if with_middle {
            let mid = p.operator("mid", PassThrough::default());
            p.connect(src, mid).connect(mid, sink);
        } else {
            p.connect(src, sink);
        }
        let running = p.start(&tokio::runtime::Handle::current()).unwrap();
        let handle = running.handle();
        let waiter = tokio::spawn(running.wait());
        eventually(60, "the sink reaches its quota", || taken.load(Ordering::SeqCst) > 2048).await;
        let edges = blocked_full(&handle, 60).await;
        let sink_took: u64 = edges.iter().find(|e| e.name.ends_with("->sink")).unwrap().received_rows;
        let capacities: u64 = edges.iter().map(|e| e.capacity_rows as u64).sum();
        // The middle stage holds one batch it cannot send.
        let in_hand = if with_middle { 256 } else { 0 };
        let pulled = edges.iter().find(|e| e.name.starts_with("gen->")).unwrap().sent_rows;
        assert_eq!(sink_took, 2048 + 256, "the sink took its quota and holds one more batch");
        // Rows that left the source = what the sink took + what the edges hold + the batch the
        // middle stage holds while it is blocked sending. No more.
        assert_eq!(pulled, sink_took + capacities + in_hand);
        // The source itself has built one more batch and is blocked sending it.
        assert_eq!(produced.load(Ordering::SeqCst), pulled + 256);
        for e in &edges {
            assert_eq!(e.queued_rows, e.capacity_rows, "edge {} is full", e.name);
            assert!(e.max_queued_rows <= e.capacity_rows, "edge {} overfilled", e.name);
        }

        handle.control().cancel();
        drop(release);
        let report = tokio::time::timeout(Duration::from_secs(120), waiter).await.unwrap().unwrap();
        assert_eq!(report.outcome, JobOutcome::Cancelled);
        assert_eq!(report.undelivered_rows(), 0);
        for e in &report.edges {
            assert!(e.blocked_ns > 0, "edge {} records the time its sender was blocked", e.name);
        }
        let sink_edge = report.edges.iter().find(|e| e.name.ends_with("->sink")).unwrap();
        assert_eq!(sink_edge.received_rows, sink_edge.sent_rows, "everything queued was delivered");
        assert_eq!(
            report.edges[0].sent_rows,
            produced.load(Ordering::SeqCst),
            "the blocked batch went out too"
        );
    }
}

/// Notes, for every batch it takes, how many rows the source had produced by then.
struct Watching {
    produced: Arc<AtomicU64>,
    seen_at: Arc<Mutex<Vec<u64>>>,
}

impl Operator for Watching {
    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        _: &mut Context,
        out: &mut Output,
    ) -> proxytune_actors::Result<()> {
        self.seen_at.lock().unwrap().push(self.produced.load(Ordering::SeqCst));
        out.emit(batch);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_starts_before_the_producer_ends() {
    // 10 batches of 8 rows through an edge of 16 rows: the source cannot get ahead of the
    // consumer by more than the edge and the batch in its hand, however the threads are scheduled.
    let (source, produced) = synthetic(8, Some(10), 0);
    let seen_at = Arc::new(Mutex::new(Vec::new()));
    let mut p = Pipeline::new(config(16), Metrics::noop());
    let src = p.source("gen", source);
    let watch = p.operator("consumer", Watching { produced: produced.clone(), seen_at: seen_at.clone() });
    let sink = p.operator("sink", Discard);
    p.connect(src, watch).connect(watch, sink);
    let report = p.start(&tokio::runtime::Handle::current()).unwrap().wait().await;
    assert_eq!(report.outcome, JobOutcome::Succeeded);
    let seen_at = seen_at.lock().unwrap().clone();
    assert_eq!(seen_at.len(), 10);
    // Batch k (0-based) is taken when the source has produced at most k + 1 batches plus the
    // edge's two: the first when at most 4 of the 10 exist.
    for (k, &rows) in seen_at.iter().enumerate() {
        assert!(rows <= 8 * (k as u64 + 4), "batch {k} taken when {rows} rows were produced: {seen_at:?}");
    }
    assert!(seen_at[0] < 80, "the consumer started before the producer ended: {seen_at:?}");
}

/// Each actor's busy seconds count its own calls, not its waits: a stage that works 5 ms on each
/// of 20 batches is busy at least 0.1 s, and no actor is busy longer than the job's wall time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_actor_reports_the_time_it_spent_in_its_own_calls() {
    let (source, _) = synthetic(8, Some(20), 0);
    let mut p = Pipeline::new(config(16), Metrics::noop());
    let src = p.source("gen", source);
    let mid = p.operator("work", PassThrough { work_ms: 5 });
    let sink = p.operator("sink", Discard);
    p.connect(src, mid).connect(mid, sink);
    let started = Instant::now();
    let report = p.start(&tokio::runtime::Handle::current()).unwrap().wait().await;
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(report.outcome, JobOutcome::Succeeded);
    let work = report.tasks.iter().find(|t| t.name == "work").unwrap().busy_seconds;
    assert!(work >= 0.1, "{:?}", report.tasks);
    assert!(report.tasks.iter().all(|t| t.busy_seconds <= wall), "{wall} s: {:?}", report.tasks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_stay_bounded_whatever_the_volume() {
    let mut peaks = Vec::new();
    for batches in [10u64, 1000] {
        let (source, produced) = synthetic(64, Some(batches), 0);
        let mut p = Pipeline::new(config(256), Metrics::noop());
        let src = p.source("gen", source);
        let mid = p.operator("mid", PassThrough::default());
        let sink = p.operator("sink", Discard);
        p.connect(src, mid).connect(mid, sink);
        let report = p.start(&tokio::runtime::Handle::current()).unwrap().wait().await;
        assert_eq!(report.outcome, JobOutcome::Succeeded);
        assert_eq!(produced.load(Ordering::SeqCst), batches * 64);
        let peak: usize = report.edges.iter().map(|e| e.max_queued_rows).sum();
        assert!(report.edges.iter().all(|e| e.max_queued_rows <= 256), "{:?}", report.edges);
        assert!(report.edges.iter().all(|e| e.received_rows == batches * 64));
        peaks.push(peak);
    }
    // 100x the rows, and the rows held in the queues never exceed the same bound.
    assert!(peaks[1] <= 512 && peaks[0] <= 512, "peaks {peaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_stage_fails_the_job_by_name_and_stops_the_rest() {
    for panic in [false, true] {
        let (source, _) = synthetic(16, None, 1);
        let log = Log::default();
        let mut failing = Recording::new(log.clone());
        if panic {
            failing.panic_on_batch = Some(3);
        } else {
            failing.fail_on_batch = Some(3);
        }
        let mut p = Pipeline::new(config(64), Metrics::noop());
        let src = p.source("gen", source);
        let mid = p.operator("flaky", failing);
        let sink = p.operator("sink", Recording::sink(log.clone()));
        p.connect(src, mid).connect(mid, sink);
        let report = tokio::time::timeout(
            Duration::from_secs(120),
            p.start(&tokio::runtime::Handle::current()).unwrap().wait(),
        )
        .await
        .expect("a failure must not hang the job");
        match &report.outcome {
            JobOutcome::Failed { actor, stage, message } => {
                assert_eq!(actor, "flaky");
                if panic {
                    assert_eq!(stage, "panic");
                    assert!(message.contains("synthetic panic on batch 3"), "{message}");
                } else {
                    assert_eq!(stage, "batch");
                    assert!(message.contains("synthetic failure on batch 3"), "{message}");
                }
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        assert_eq!(report.outcome.exit_code(), 1);
        let state = |name: &str| report.tasks.iter().find(|t| t.name == name).unwrap().state.clone();
        assert!(["finished", "downstream_closed"].contains(&state("gen").as_str()), "{}", state("gen"));
        assert_eq!(state("sink"), "finished", "downstream drains and closes");
        assert!(log.entries().iter().any(|(_, s)| s == "close"), "the sink ran on_close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_drains_every_row_into_lance() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path()).unwrap();
    let (source, produced) = synthetic(32, None, 2);
    let (writer, stats) = LanceWriter::<Proxy>::new(
        corpus.clone(),
        LanceWriterConfig { commit_every_rows: 200, ..Default::default() },
        &Metrics::noop(),
    );
    let mut p = Pipeline::new(config(128), Metrics::noop());
    let src = p.source("gen", source);
    let mid = p.operator("work", PassThrough { work_ms: 3 });
    let sink = p.async_operator("lance_writer", writer);
    p.connect(src, mid).connect(mid, sink);
    let running = p.start(&tokio::runtime::Handle::current()).unwrap();
    let handle = running.handle();
    let waiter = tokio::spawn(running.wait());
    eventually(120, "a few commits", || stats.lock().unwrap().commits >= 2).await;
    handle.control().cancel();
    let report = tokio::time::timeout(Duration::from_secs(120), waiter).await.unwrap().unwrap();
    assert_eq!(report.outcome, JobOutcome::Cancelled);
    assert_eq!(report.outcome.exit_code(), 130);

    let left_source = produced.load(Ordering::SeqCst);
    let undelivered = report.undelivered_rows();
    let table = corpus.table::<Proxy>().await.unwrap();
    let stored = table.count_rows(None).await.unwrap() as u64;
    assert!(left_source > 200);
    assert_eq!(stored + undelivered, left_source, "every row is stored or reported undelivered");
    assert_eq!(undelivered, 0, "a clean cancel delivers everything");
    assert_eq!(stats.lock().unwrap().written_rows, stored);
}

/// An operator stuck for a long time per batch.
struct Stuck;

impl Operator for Stuck {
    fn process_batch(
        &mut self,
        _: usize,
        _: RecordBatch,
        _: &mut Context,
        _: &mut Output,
    ) -> proxytune_actors::Result<()> {
        std::thread::sleep(Duration::from_millis(2500));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_cannot_drain_hits_the_deadline() {
    let (source, _) = synthetic(8, None, 0);
    let mut cfg = config(16);
    cfg.graceful_shutdown_limit_secs = 1;
    let mut p = Pipeline::new(cfg, Metrics::noop());
    let src = p.source("gen", source);
    let stuck = p.operator("stuck", Stuck);
    p.connect(src, stuck);
    let running = p.start(&tokio::runtime::Handle::current()).unwrap();
    let handle = running.handle();
    let waiter = tokio::spawn(running.wait());
    eventually(60, "the stuck stage takes a batch", || handle.status().edges[0].received_rows > 0).await;
    let cancelled = Instant::now();
    handle.control().cancel();
    let report = tokio::time::timeout(Duration::from_secs(120), waiter).await.unwrap().unwrap();
    assert_eq!(report.outcome, JobOutcome::DeadlineExceeded);
    assert_eq!(report.outcome.exit_code(), 124);
    // Draining would take the 8 queued batches x 2.5 s = 20 s; the 1 s deadline aborts long before.
    assert!(cancelled.elapsed() < Duration::from_secs(15), "aborted soon after the deadline");
    assert!(report.undelivered_rows() > 0, "queued rows are reported, not lost silently");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barriers_are_aligned_across_inputs_and_fan_out_copies() {
    let log = Log::default();
    let mut p = Pipeline::new(config(64), Metrics::noop());
    let fast = p.source(
        "fast",
        SyntheticProxies::new(SyntheticConfig {
            batch_rows: 4,
            batches: Some(4),
            barrier_every_batches: 2,
            payload_bytes: 16,
            ..Default::default()
        })
        .0,
    );
    let slow = p.source(
        "slow",
        SyntheticProxies::new(SyntheticConfig {
            batch_rows: 4,
            batches: Some(4),
            barrier_every_batches: 2,
            interval_ms: 40,
            payload_bytes: 16,
            ..Default::default()
        })
        .0,
    );
    let merge = p.operator("merge", Recording::new(log.clone()));
    let a = p.operator("a", Recording::new(Log::default()));
    let b = p.operator("b", Recording::new(Log::default()));
    let (end_a, end_b) = (p.operator("end_a", Discard), p.operator("end_b", Discard));
    p.connect(fast, merge).connect(slow, merge);
    p.connect(merge, a).connect(merge, b).connect(a, end_a).connect(b, end_b);
    let report = p.start(&tokio::runtime::Handle::current()).unwrap().wait().await;
    assert_eq!(report.outcome, JobOutcome::Succeeded);

    let entries: Vec<String> = log.entries().into_iter().map(|(_, s)| s).collect();
    let barrier1 = entries.iter().position(|s| s == "signal Barrier { epoch: 1 }").expect("barrier 1");
    let barrier2 = entries.iter().position(|s| s == "signal Barrier { epoch: 2 }").expect("barrier 2");
    assert_eq!(
        entries.iter().filter(|s| s.starts_with("signal Barrier")).count(),
        2,
        "one barrier per epoch: {entries:?}"
    );
    // Batches 0-1 (seeds 0, 4) of both inputs come before barrier 1, batches 2-3 (seeds 8, 12) after.
    for (i, s) in entries.iter().enumerate() {
        if let Some(rest) = s.strip_prefix("data ") {
            let seed: u64 = rest.split(' ').nth(1).unwrap().parse().unwrap();
            assert_eq!(i < barrier1, seed < 8, "{s} at {i}, barrier at {barrier1}: {entries:?}");
            assert!(i < barrier2);
        }
    }
    // Fan-out: both branches received all 32 rows.
    for name in ["merge->a", "merge->b"] {
        assert_eq!(report.edges.iter().find(|e| e.name == name).unwrap().received_rows, 32);
    }
}

#[test]
fn bad_graphs_are_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut p = Pipeline::new(config(8), Metrics::noop());
    p.operator("lonely", Discard);
    let err = p.start(rt.handle()).err().unwrap().to_string();
    assert!(err.contains("actor `lonely` has no input"), "{err}");

    let mut p = Pipeline::new(config(8), Metrics::noop());
    let a = p.source("x", synthetic(1, Some(1), 0).0);
    let b = p.operator("x", Discard);
    p.connect(a, b);
    let err = p.start(rt.handle()).err().unwrap().to_string();
    assert!(err.contains("two actors are named `x`"), "{err}");

    let bad: Result<PipelineConfig, _> = toml::from_str("edge_capacity_rows = 0");
    assert!(bad.is_err(), "a zero capacity is refused");
    let bad: Result<PipelineConfig, _> = toml::from_str("edge_capacty_rows = 5");
    assert!(bad.unwrap_err().to_string().contains("unknown field"), "unknown keys are refused");
}

#[test]
fn the_actix_supervisor_pauses_resumes_reports_and_cancels() {
    let system = actix::System::new();
    system.block_on(async {
        let (source, produced) = synthetic(8, Some(400), 2);
        let mut p = Pipeline::new(config(32), Metrics::noop());
        let src = p.source("gen", source);
        let sink = p.operator("sink", Discard);
        p.connect(src, sink);
        let supervisor = actix::Actor::start(JobSupervisor::new("job-1", p));

        eventually(120, "some rows", || produced.load(Ordering::SeqCst) > 40).await;
        assert!(supervisor.send(Pause).await.unwrap());
        // The batch in flight finishes, then the pipeline is parked.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !supervisor.send(GetStatus).await.unwrap().pipeline.parked {
            assert!(Instant::now() < deadline, "the paused pipeline never parked");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Parked, the source produces nothing over a window (a slow machine only makes the window
        // less searching, never the check wrong).
        let at_pause = produced.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(produced.load(Ordering::SeqCst), at_pause, "a paused source produces nothing");
        let status = supervisor.send(GetStatus).await.unwrap();
        assert_eq!(status.job_id, "job-1");
        assert_eq!(status.pipeline.state, RunState::Paused);
        assert!(status.pipeline.parked);
        assert!(status.outcome.is_none());

        assert!(supervisor.send(Resume).await.unwrap());
        eventually(120, "production resumes", || produced.load(Ordering::SeqCst) > at_pause).await;
        assert!(supervisor.send(Cancel).await.unwrap());
        let report = supervisor.send(WaitDone).await.unwrap().unwrap();
        assert_eq!(report.outcome, JobOutcome::Cancelled);
        let status = supervisor.send(GetStatus).await.unwrap();
        assert_eq!(status.outcome, Some(JobOutcome::Cancelled));
        assert!(status.pipeline.tasks.iter().all(|t| t.state == "finished"), "{:?}", status.pipeline.tasks);

        // A pipeline that cannot start fails its job with the reason, and the supervisor says so.
        let mut bad = Pipeline::new(config(8), Metrics::noop());
        bad.operator("orphan", Discard);
        let supervisor = actix::Actor::start(JobSupervisor::new("job-2", bad));
        let report = supervisor.send(WaitDone).await.unwrap().unwrap();
        match report.outcome {
            JobOutcome::Failed { actor, stage, message } => {
                assert_eq!((actor.as_str(), stage.as_str()), ("pipeline", "start"));
                assert!(message.contains("`orphan` has no input"), "{message}");
            }
            other => panic!("expected a failed start, got {other:?}"),
        }
        assert!(!supervisor.send(Cancel).await.unwrap());
    });
}

/// Collects every batch it receives, as rows, in arrival order.
struct Collect(Arc<Mutex<Vec<Vec<Proxy>>>>);

impl Operator for Collect {
    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        _: &mut Context,
        _: &mut Output,
    ) -> proxytune_actors::Result<()> {
        self.0.lock().unwrap().push(Proxy::from_batch(&batch)?);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_corpus_version_replays_through_the_pipeline() {
    use proxytune_actors::corpus::reader::{CorpusReader, CorpusReaderConfig};
    use proxytune_actors::corpus::VersionRef;

    let dir = tempfile::tempdir().unwrap();
    let source = Corpus::open_or_create(dir.path().join("a")).unwrap();
    let mut table = source.table::<Proxy>().await.unwrap();
    for v in 0..3u64 {
        table.append_rows(&crate::support::proxies("j", v * 40..v * 40 + 40)).await.unwrap();
    }
    table.tag("run-1", 2).await.unwrap();

    // The replay target already holds some of the rows: the writer forwards only the new ones.
    let target = Corpus::open_or_create(dir.path().join("b")).unwrap();
    target.table::<Proxy>().await.unwrap().append_rows(&crate::support::proxies("j", 0..10)).await.unwrap();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let reader = CorpusReader::<Proxy>::new(
        source.clone(),
        CorpusReaderConfig {
            version: Some(VersionRef::Tag("run-1".into())),
            filter: Some("keep = true".into()),
            batch_rows: 16,
            limit_rows: None,
        },
    );
    let (writer, stats) = LanceWriter::<Proxy>::new(
        target.clone(),
        LanceWriterConfig { commit_every_rows: 32, forward_committed: true, replay_stored: false },
        &Metrics::noop(),
    );
    let mut p = Pipeline::new(config(64), Metrics::noop());
    let src = p.async_source("corpus_reader", reader);
    let sink = p.async_operator("lance_writer", writer);
    let after = p.operator("trainer", Collect(seen.clone()));
    p.connect(src, sink).connect(sink, after);
    let report = p.start(&tokio::runtime::Handle::current()).unwrap().wait().await;
    assert_eq!(report.outcome, JobOutcome::Succeeded);

    let kept_in_v2: Vec<u64> = (0..80).filter(|s| s % 3 != 0).collect();
    let stored = target.table::<Proxy>().await.unwrap();
    let expected_total = kept_in_v2.iter().filter(|&&s| s >= 10).count() + 10;
    assert_eq!(stored.count_rows(None).await.unwrap(), expected_total);
    let mut forwarded: Vec<u64> = seen.lock().unwrap().iter().flatten().map(|p| p.seed).collect();
    forwarded.sort();
    let new_rows: Vec<u64> = kept_in_v2.into_iter().filter(|&s| s >= 10).collect();
    assert_eq!(forwarded, new_rows, "downstream sees exactly the rows that were written");
    let stats = stats.lock().unwrap().clone();
    assert_eq!(stats.written_rows as usize, new_rows.len());
    assert_eq!(stats.skipped_rows, 6, "seeds 1,2,4,5,7,8 were already stored");
}

/// A reader with a row limit passes on the first rows in storage order and stops, cutting the
/// batch it ends in (a data-scaling ablation's first N proxies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_with_a_row_limit_passes_the_first_rows_in_storage_order() {
    use proxytune_actors::corpus::reader::{CorpusReader, CorpusReaderConfig};
    let dir = tempfile::tempdir().unwrap();
    let source = Corpus::open_or_create(dir.path().join("source")).unwrap();
    let mut table = source.table::<Proxy>().await.unwrap();
    table.append_rows(&crate::support::proxies("j", 30..50)).await.unwrap();
    table.append_rows(&crate::support::proxies("j", 0..30)).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reader = CorpusReader::<Proxy>::new(
        source,
        CorpusReaderConfig { version: None, filter: None, batch_rows: 8, limit_rows: Some(21) },
    );
    let mut p = Pipeline::new(config(64), Metrics::noop());
    let src = p.async_source("corpus_reader", reader);
    let after = p.operator("trainer", Collect(seen.clone()));
    p.connect(src, after);
    let report = p.start(&tokio::runtime::Handle::current()).unwrap().wait().await;
    assert_eq!(report.outcome, JobOutcome::Succeeded);
    let seeds: Vec<u64> = seen.lock().unwrap().iter().flatten().map(|p| p.seed).collect();
    let want: Vec<u64> = (30..50).chain(0..1).collect();
    assert_eq!(seeds, want, "the first commit's 20 rows, then the second's first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_passes_stored_rows_on_first_in_small_batches_then_the_new_ones() {
    use proxytune_actors::corpus::reader::{CorpusReader, CorpusReaderConfig};

    let dir = tempfile::tempdir().unwrap();
    // The job's corpus holds 50 rows from before a restart (two commits).
    let target = Corpus::open_or_create(dir.path().join("job")).unwrap();
    let mut stored = target.table::<Proxy>().await.unwrap();
    stored.append_rows(&crate::support::proxies("j", 0..30)).await.unwrap();
    stored.append_rows(&crate::support::proxies("j", 30..50)).await.unwrap();
    // The restarted producer sends rows 40..60: ten stored already, ten new.
    let source = Corpus::open_or_create(dir.path().join("source")).unwrap();
    source.table::<Proxy>().await.unwrap().append_rows(&crate::support::proxies("j", 40..60)).await.unwrap();

    let batches = Arc::new(Mutex::new(Vec::new()));
    let reader = CorpusReader::<Proxy>::new(
        source,
        CorpusReaderConfig { version: None, filter: None, batch_rows: 8, limit_rows: None },
    );
    let (writer, stats) = LanceWriter::<Proxy>::new(
        target.clone(),
        LanceWriterConfig { commit_every_rows: 8, forward_committed: true, replay_stored: true },
        &Metrics::noop(),
    );
    let mut p = Pipeline::new(config(64), Metrics::noop());
    let src = p.async_source("corpus_reader", reader);
    let sink = p.async_operator("lance_writer", writer);
    let after = p.operator("trainer", Collect(batches.clone()));
    p.connect(src, sink).connect(sink, after);
    let report = p.start(&tokio::runtime::Handle::current()).unwrap().wait().await;
    assert_eq!(report.outcome, JobOutcome::Succeeded);

    let batches: Vec<Vec<u64>> =
        batches.lock().unwrap().iter().map(|b| b.iter().map(|p| p.seed).collect()).collect();
    let seeds: Vec<u64> = batches.iter().flatten().copied().collect();
    assert_eq!(
        seeds,
        (0..60).collect::<Vec<_>>(),
        "the stored rows in commit order, then the new ones, each once"
    );
    let replayed: Vec<&Vec<u64>> = batches.iter().take_while(|b| b[0] < 50).collect();
    assert_eq!(replayed.iter().map(|b| b.len()).sum::<usize>(), 50);
    assert!(replayed.iter().all(|b| b.len() <= 16), "stored rows pass on in small batches: {batches:?}");
    let stats = stats.lock().unwrap().clone();
    assert_eq!((stats.replayed_rows, stats.written_rows, stats.skipped_rows), (50, 10, 10));
}

/// Turns each input batch into `units` output batches of pending work; unit `k + 1` only runs
/// once the downstream sink acknowledged unit `k`'s batch (so buffering would fail it).
struct Expander {
    units: usize,
    pending: usize,
    acks: flume::Receiver<()>,
    template: Option<RecordBatch>,
}

impl Operator for Expander {
    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        _: &mut Context,
        _: &mut Output,
    ) -> proxytune_actors::Result<()> {
        self.template = Some(batch);
        self.pending += self.units;
        Ok(())
    }

    fn has_pending_work(&self) -> bool {
        self.pending > 0
    }

    fn do_pending_work(&mut self, _: &mut Context, out: &mut Output) -> proxytune_actors::Result<()> {
        if self.pending < self.units {
            self.acks.recv_timeout(Duration::from_secs(120)).map_err(|_| Error::Operator {
                message: "the previous unit's batch never reached the sink".into(),
            })?;
        }
        out.emit(self.template.clone().unwrap());
        self.pending -= 1;
        Ok(())
    }
}

struct Acking(flume::Sender<()>, Arc<AtomicU64>);

impl Operator for Acking {
    fn process_batch(
        &mut self,
        _: usize,
        _: RecordBatch,
        _: &mut Context,
        _: &mut Output,
    ) -> proxytune_actors::Result<()> {
        self.1.fetch_add(1, Ordering::SeqCst);
        let _ = self.0.send(());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_work_streams_one_unit_at_a_time() {
    let (source, _) = synthetic(4, Some(2), 0);
    let (ack_tx, ack_rx) = flume::unbounded();
    let seen = Arc::new(AtomicU64::new(0));
    let mut p = Pipeline::new(config(64), Metrics::noop());
    let src = p.source("gen", source);
    let expand = p.operator("expand", Expander { units: 3, pending: 0, acks: ack_rx, template: None });
    let sink = p.operator("sink", Acking(ack_tx, seen.clone()));
    p.connect(src, expand).connect(expand, sink);
    let report = p.start(&tokio::runtime::Handle::current()).unwrap().wait().await;
    assert_eq!(report.outcome, JobOutcome::Succeeded, "{report:?}");
    assert_eq!(seen.load(Ordering::SeqCst), 6, "3 units for each of 2 input batches");
}
