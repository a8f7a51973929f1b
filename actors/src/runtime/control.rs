//! The job's run state, shared by every actor of a pipeline: running, paused, draining (cancelled:
//! sources stop, everything downstream finishes its input) and aborting (everyone stops now).

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The run state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Running.
    Running,
    /// Sources are paused (downstream finishes what is queued, then idles).
    Paused,
    /// Cancelled: sources stop and the pipeline drains.
    Draining,
    /// Every actor stops after its current call (deadline passed or fatal failure).
    Aborting,
}

impl RunState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => RunState::Running,
            1 => RunState::Paused,
            2 => RunState::Draining,
            _ => RunState::Aborting,
        }
    }
}

struct Shared {
    state: AtomicU8,
    /// Self-driven work units (a source's batch, an operator's own pending work) in progress.
    units: AtomicUsize,
    lock: Mutex<()>,
    changed: Condvar,
    changed_async: tokio::sync::Notify,
}

/// A cheap, clonable handle on a job's run state.
#[derive(Clone)]
pub struct Control(Arc<Shared>);

impl Default for Control {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Control({:?})", self.state())
    }
}

impl Control {
    /// A running state.
    pub fn new() -> Self {
        Control(Arc::new(Shared {
            state: AtomicU8::new(0),
            units: AtomicUsize::new(0),
            lock: Mutex::new(()),
            changed: Condvar::new(),
            changed_async: tokio::sync::Notify::new(),
        }))
    }

    /// The current state.
    pub fn state(&self) -> RunState {
        RunState::from_u8(self.0.state.load(Ordering::SeqCst))
    }

    fn set(&self, next: RunState, allowed: impl Fn(RunState) -> bool) -> bool {
        let _guard = self.0.lock.lock().expect("control lock");
        let current = self.state();
        if !allowed(current) {
            return false;
        }
        self.0.state.store(next as u8, Ordering::SeqCst);
        self.0.changed.notify_all();
        self.0.changed_async.notify_waiters();
        true
    }

    /// Pauses the sources (only while running).
    pub fn pause(&self) -> bool {
        self.set(RunState::Paused, |s| s == RunState::Running)
    }

    /// Resumes paused sources.
    pub fn resume(&self) -> bool {
        self.set(RunState::Running, |s| s == RunState::Paused)
    }

    /// Cancels: sources stop and the pipeline drains.
    pub fn cancel(&self) -> bool {
        self.set(RunState::Draining, |s| matches!(s, RunState::Running | RunState::Paused))
    }

    /// Aborts: every actor stops after its current call.
    pub fn abort(&self) -> bool {
        self.set(RunState::Aborting, |s| s != RunState::Aborting)
    }

    /// True when sources should stop.
    pub fn stop_requested(&self) -> bool {
        matches!(self.state(), RunState::Draining | RunState::Aborting)
    }

    /// True when every actor should stop.
    pub fn aborting(&self) -> bool {
        self.state() == RunState::Aborting
    }

    /// Starts a self-driven unit of work (a source's batch, a generator's pending work) when the
    /// job runs; `None` when a pause (or a stop) came first, so the caller waits again. While the
    /// guard lives the job is not [`parked`](Self::parked).
    pub fn begin_unit(&self) -> Option<UnitGuard> {
        self.0.units.fetch_add(1, Ordering::SeqCst);
        let guard = UnitGuard(self.0.clone());
        // Checked after counting the unit: a pause that lands first is seen here, so a `parked`
        // answer can never precede a unit that then runs.
        (self.state() == RunState::Running).then_some(guard)
    }

    /// True once the job is paused and no self-driven unit of work is in progress: nothing is
    /// being generated until it resumes (downstream may still finish what is queued).
    pub fn parked(&self) -> bool {
        self.state() == RunState::Paused && self.0.units.load(Ordering::SeqCst) == 0
    }

    /// Blocks the calling thread while paused; returns the state that ended the wait.
    pub fn wait_while_paused_blocking(&self) -> RunState {
        let mut guard = self.0.lock.lock().expect("control lock");
        while self.state() == RunState::Paused {
            guard = self.0.changed.wait_timeout(guard, Duration::from_millis(100)).expect("control lock").0;
        }
        self.state()
    }

    /// Waits (async) while paused; returns the state that ended the wait.
    pub async fn wait_while_paused(&self) -> RunState {
        loop {
            let notified = self.0.changed_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state() != RunState::Paused {
                return self.state();
            }
            notified.await;
        }
    }

    /// Resolves once the state is [`RunState::Aborting`].
    pub async fn aborted(&self) {
        loop {
            let notified = self.0.changed_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.aborting() {
                return;
            }
            notified.await;
        }
    }
}

/// A unit of self-driven work in progress (see [`Control::begin_unit`]).
pub struct UnitGuard(Arc<Shared>);

impl Drop for UnitGuard {
    fn drop(&mut self) {
        self.0.units.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parked_means_paused_with_no_unit_in_progress() {
        let c = Control::new();
        let unit = c.begin_unit().expect("running");
        assert!(c.pause());
        assert!(!c.parked(), "a unit started before the pause still runs");
        drop(unit);
        assert!(c.parked());
        assert!(c.begin_unit().is_none(), "no unit starts while paused");
        assert!(c.parked(), "a refused unit does not count");
        assert!(c.resume());
        assert!(!c.parked());
    }
}
