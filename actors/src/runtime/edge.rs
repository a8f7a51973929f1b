//! Edges: bounded channels of [`Msg`] whose bound is in **rows**, not messages.
//!
//! A data message of `n` rows may enter an edge when the rows already queued plus `n` fit the
//! capacity, or when the edge is empty (so a batch larger than the capacity still moves, alone).
//! Otherwise the sender blocks — a thread on a condvar, a task on a notify — until the receiver
//! takes rows off. Signals take no capacity. Nothing is dropped: when the receiver goes away, the
//! rows still queued are counted as undelivered, blocked senders wake with
//! [`EdgeClosed`], and the message they were sending is handed back.
//!
//! Every edge keeps exact accounting ([`EdgeStats`]) and exports its queued rows, capacity, blocked
//! time and undelivered rows as metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::message::Msg;
use super::metrics::EdgeMetrics;

/// The receiver of an edge is gone; the message that could not be sent is returned.
#[derive(Debug)]
pub struct EdgeClosed(pub Msg);

#[derive(Debug)]
struct State {
    queued_rows: usize,
    receiver_alive: bool,
    /// Senders waiting for room now.
    waiting_senders: usize,
}

#[derive(Debug, Default)]
struct Counters {
    sent_rows: AtomicU64,
    received_rows: AtomicU64,
    undelivered_rows: AtomicU64,
    blocked_ns: AtomicU64,
    max_queued_rows: AtomicU64,
}

struct Shared {
    name: String,
    capacity_rows: usize,
    state: Mutex<State>,
    space: Condvar,
    space_async: tokio::sync::Notify,
    counters: Counters,
    metrics: EdgeMetrics,
}

/// A snapshot of an edge's accounting.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EdgeStats {
    /// Edge name (`from->to`).
    pub name: String,
    /// Capacity in rows.
    pub capacity_rows: usize,
    /// Rows queued now.
    pub queued_rows: usize,
    /// Most rows ever queued at once.
    pub max_queued_rows: usize,
    /// Rows that entered the edge.
    pub sent_rows: u64,
    /// Rows the receiver took.
    pub received_rows: u64,
    /// Rows queued when the receiver went away.
    pub undelivered_rows: u64,
    /// Nanoseconds senders spent blocked (counted when each wait ends).
    pub blocked_ns: u64,
    /// Senders waiting for room now.
    pub blocked_senders: usize,
}

/// Creates an edge named `name` holding at most `capacity_rows` rows.
pub fn edge(
    name: impl Into<String>,
    capacity_rows: usize,
    metrics: EdgeMetrics,
) -> (EdgeSender, EdgeReceiver) {
    let (tx, rx) = flume::unbounded();
    metrics.capacity_rows.set(capacity_rows as f64);
    let shared = Arc::new(Shared {
        name: name.into(),
        capacity_rows: capacity_rows.max(1),
        state: Mutex::new(State { queued_rows: 0, receiver_alive: true, waiting_senders: 0 }),
        space: Condvar::new(),
        space_async: tokio::sync::Notify::new(),
        counters: Counters::default(),
        metrics,
    });
    (EdgeSender { tx, shared: shared.clone() }, EdgeReceiver { rx, shared })
}

/// A handle on an edge's accounting that outlives both ends.
#[derive(Clone)]
pub struct EdgeProbe(Arc<Shared>);

impl EdgeProbe {
    /// The current accounting.
    pub fn stats(&self) -> EdgeStats {
        let s = &self.0;
        let (queued, waiting) = {
            let state = s.state.lock().expect("edge lock");
            (state.queued_rows, state.waiting_senders)
        };
        EdgeStats {
            name: s.name.clone(),
            capacity_rows: s.capacity_rows,
            queued_rows: queued,
            max_queued_rows: s.counters.max_queued_rows.load(Ordering::Relaxed) as usize,
            sent_rows: s.counters.sent_rows.load(Ordering::Relaxed),
            received_rows: s.counters.received_rows.load(Ordering::Relaxed),
            undelivered_rows: s.counters.undelivered_rows.load(Ordering::Relaxed),
            blocked_ns: s.counters.blocked_ns.load(Ordering::Relaxed),
            blocked_senders: waiting,
        }
    }
}

impl Shared {
    fn fits(&self, state: &State, rows: usize) -> bool {
        rows == 0 || state.queued_rows == 0 || state.queued_rows + rows <= self.capacity_rows
    }

    /// Books `rows` into the queue (the caller holds the lock and checked `fits`).
    fn admit(&self, state: &mut State, rows: usize) {
        state.queued_rows += rows;
        self.counters.sent_rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.counters.max_queued_rows.fetch_max(state.queued_rows as u64, Ordering::Relaxed);
        self.metrics.queued_rows.set(state.queued_rows as f64);
    }

    fn blocked(&self, waited: Duration) {
        self.counters.blocked_ns.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        self.metrics.blocked_seconds.record(waited.as_secs_f64());
    }

    /// Counts rows a sender could not hand over because the receiver is gone.
    fn refused(&self, rows: usize) {
        if rows > 0 {
            self.counters.undelivered_rows.fetch_add(rows as u64, Ordering::Relaxed);
            self.metrics.undelivered_rows.increment(rows as u64);
        }
    }

    fn unsend(&self, rows: usize) {
        let mut state = self.state.lock().expect("edge lock");
        state.queued_rows -= rows;
        self.counters.sent_rows.fetch_sub(rows as u64, Ordering::Relaxed);
        self.metrics.queued_rows.set(state.queued_rows as f64);
    }
}

/// The sending end. Cloning it adds a sender; the edge ends when every sender is dropped.
#[derive(Clone)]
pub struct EdgeSender {
    tx: flume::Sender<Msg>,
    shared: Arc<Shared>,
}

impl EdgeSender {
    /// The edge's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// A probe on the edge's accounting.
    pub fn probe(&self) -> EdgeProbe {
        EdgeProbe(self.shared.clone())
    }

    /// Sends from a thread, blocking while the edge is full.
    pub fn send_blocking(&self, msg: Msg) -> Result<(), EdgeClosed> {
        let rows = msg.rows();
        let s = &self.shared;
        let mut state = s.state.lock().expect("edge lock");
        if !s.fits(&state, rows) && state.receiver_alive {
            let started = Instant::now();
            state.waiting_senders += 1;
            while !s.fits(&state, rows) && state.receiver_alive {
                state = s.space.wait(state).expect("edge lock");
            }
            state.waiting_senders -= 1;
            s.blocked(started.elapsed());
        }
        if !state.receiver_alive {
            s.refused(rows);
            return Err(EdgeClosed(msg));
        }
        s.admit(&mut state, rows);
        drop(state);
        self.tx.send(msg).map_err(|e| {
            s.unsend(rows);
            s.refused(rows);
            EdgeClosed(e.into_inner())
        })
    }

    /// Sends from a task, waiting (not blocking the thread) while the edge is full.
    pub async fn send_async(&self, msg: Msg) -> Result<(), EdgeClosed> {
        let rows = msg.rows();
        let s = &self.shared;
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let notified = s.space_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = s.state.lock().expect("edge lock");
                if !state.receiver_alive {
                    s.refused(rows);
                    return Err(EdgeClosed(msg));
                }
                if s.fits(&state, rows) {
                    s.admit(&mut state, rows);
                    break;
                }
                if waiting.is_none() {
                    state.waiting_senders += 1;
                    waiting = Some(Waiting { shared: s, started: Instant::now() });
                }
            }
            notified.await;
        }
        drop(waiting);
        self.tx.send_async(msg).await.map_err(|e| {
            s.unsend(rows);
            s.refused(rows);
            EdgeClosed(e.into_inner())
        })
    }
}

/// An async sender's wait for room: counted in `waiting_senders` while it lives, its time booked
/// when it ends (also when the sending future is dropped mid-wait).
struct Waiting<'a> {
    shared: &'a Shared,
    started: Instant,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.shared.state.lock().expect("edge lock").waiting_senders -= 1;
        self.shared.blocked(self.started.elapsed());
    }
}

/// The receiving end. Dropping it closes the edge for its senders.
pub struct EdgeReceiver {
    rx: flume::Receiver<Msg>,
    shared: Arc<Shared>,
}

impl EdgeReceiver {
    /// The edge's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// A probe on the edge's accounting.
    pub fn probe(&self) -> EdgeProbe {
        EdgeProbe(self.shared.clone())
    }

    pub(crate) fn flume(&self) -> &flume::Receiver<Msg> {
        &self.rx
    }

    /// Books a message taken off the channel.
    pub(crate) fn took(&self, msg: &Msg) {
        let rows = msg.rows();
        if rows == 0 {
            return;
        }
        let s = &self.shared;
        let mut state = s.state.lock().expect("edge lock");
        state.queued_rows -= rows;
        s.counters.received_rows.fetch_add(rows as u64, Ordering::Relaxed);
        s.metrics.queued_rows.set(state.queued_rows as f64);
        drop(state);
        s.space.notify_all();
        s.space_async.notify_waiters();
    }

    /// Receives on a thread, blocking; `None` once every sender is gone and the queue is empty.
    pub fn recv_blocking(&self) -> Option<Msg> {
        let msg = self.rx.recv().ok()?;
        self.took(&msg);
        Some(msg)
    }

    /// Receives on a task; `None` once every sender is gone and the queue is empty.
    pub async fn recv_async(&self) -> Option<Msg> {
        let msg = self.rx.recv_async().await.ok()?;
        self.took(&msg);
        Some(msg)
    }
}

impl Drop for EdgeReceiver {
    fn drop(&mut self) {
        let s = &self.shared;
        let mut state = s.state.lock().expect("edge lock");
        state.receiver_alive = false;
        // Whatever is still queued will never be delivered: count it, never lose it silently.
        let undelivered = state.queued_rows;
        if undelivered > 0 {
            s.counters.undelivered_rows.fetch_add(undelivered as u64, Ordering::Relaxed);
            s.metrics.undelivered_rows.increment(undelivered as u64);
        }
        drop(state);
        s.space.notify_all();
        s.space_async.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int32Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};

    use super::*;
    use crate::runtime::message::Signal;
    use crate::runtime::metrics::Metrics;

    fn batch(rows: usize) -> Msg {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
        let col = Arc::new(Int32Array::from_iter_values(0..rows as i32));
        Msg::Data(RecordBatch::try_new(schema, vec![col]).unwrap())
    }

    #[test]
    fn capacity_is_counted_in_rows() {
        let (tx, rx) = edge("a->b", 10, Metrics::noop().edge("a->b"));
        tx.send_blocking(batch(4)).unwrap();
        tx.send_blocking(batch(6)).unwrap();
        tx.send_blocking(Msg::Signal(Signal::Flush)).unwrap(); // signals take no room
        let probe = tx.probe();
        assert_eq!(probe.stats().queued_rows, 10);
        // A 1-row batch does not fit now: the sender blocks until the receiver takes rows.
        let spawned = Instant::now();
        let sender = std::thread::spawn(move || {
            tx.send_blocking(batch(1)).unwrap();
            tx
        });
        while probe.stats().blocked_senders == 0 {
            assert!(spawned.elapsed() < Duration::from_secs(60), "the sender never blocked");
            std::thread::yield_now();
        }
        // Blocked from before `seen` until after the receive below.
        let seen = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!sender.is_finished(), "a full edge blocks the sender");
        assert_eq!(probe.stats().sent_rows, 10, "nothing more entered the full edge");
        assert_eq!(rx.recv_blocking().unwrap().rows(), 4);
        let at_least = seen.elapsed();
        let tx = sender.join().unwrap();
        let at_most = spawned.elapsed();
        let stats = probe.stats();
        assert_eq!((stats.queued_rows, stats.sent_rows, stats.received_rows), (7, 11, 4));
        assert_eq!(stats.blocked_senders, 0);
        let blocked = Duration::from_nanos(stats.blocked_ns);
        assert!(
            at_least <= blocked && blocked <= at_most,
            "blocked {blocked:?}, within [{at_least:?}, {at_most:?}]"
        );
        // A batch bigger than the capacity moves alone once the edge is empty.
        drop(tx);
        for _ in 0..3 {
            rx.recv_blocking().unwrap();
        }
        assert!(rx.recv_blocking().is_none(), "all senders gone: end of data");
    }

    #[test]
    fn oversized_batches_pass_alone() {
        let (tx, rx) = edge("big", 3, Metrics::noop().edge("big"));
        tx.send_blocking(batch(8)).unwrap();
        assert_eq!(tx.probe().stats().max_queued_rows, 8);
        assert_eq!(rx.recv_blocking().unwrap().rows(), 8);
    }

    #[test]
    fn a_dropped_receiver_wakes_senders_and_counts_undelivered_rows() {
        let (tx, rx) = edge("x", 5, Metrics::noop().edge("x"));
        tx.send_blocking(batch(5)).unwrap();
        let probe = tx.probe();
        let sender = std::thread::spawn(move || tx.send_blocking(batch(2)));
        std::thread::sleep(Duration::from_millis(20));
        drop(rx);
        let err = sender.join().unwrap().unwrap_err();
        assert_eq!(err.0.rows(), 2, "the unsent message is handed back");
        let stats = probe.stats();
        // 5 queued rows were never taken, and the 2 the sender could not hand over are counted too.
        assert_eq!((stats.sent_rows, stats.undelivered_rows), (5, 7));
    }

    #[tokio::test]
    async fn async_senders_wait_for_room() {
        let (tx, rx) = edge("t", 4, Metrics::noop().edge("t"));
        tx.send_async(batch(4)).await.unwrap();
        let probe = tx.probe();
        let task = tokio::spawn(async move { tx.send_async(batch(4)).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!task.is_finished());
        assert_eq!(rx.recv_async().await.unwrap().rows(), 4);
        task.await.unwrap().unwrap();
        assert_eq!(rx.recv_async().await.unwrap().rows(), 4);
        assert!(rx.recv_async().await.is_none());
        let stats = probe.stats();
        assert_eq!((stats.sent_rows, stats.received_rows, stats.max_queued_rows), (8, 8, 4));
    }
}
