//! Graceful drain: one signal, watched by every accept loop and connection.
//!
//! Why one primitive (the shape of istio/ztunnel's `drain.rs`): shutting a
//! proxy down cleanly has three steps that every component must agree on —
//! stop taking new work, let in-flight work finish until a deadline, then cut
//! whatever is left — and the owner of the deadline must know when everyone
//! is done. A [`Watch`] is cloned into every task that carries work; the drain
//! is complete when all clones are dropped. The [`Signal`] side drives the
//! steps and reports whether the deadline had to force anything.
//!
//! Built on `tokio::sync::watch`: `Sender::closed()` resolves exactly when the
//! last receiver is dropped, which is the "all work done" condition, with no
//! separate counter to keep in sync.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    /// Stop accepting; let existing work finish.
    Draining,
    /// The deadline passed: abort what is left now.
    Forced,
}

/// Owned by whoever decides to shut down (`lightpath run` on SIGTERM).
#[derive(Debug)]
pub struct Signal {
    tx: watch::Sender<Phase>,
    /// One strong count per [`Watch`] (the receiver count also includes the
    /// short-lived clones inside `signaled()`/`forced()` futures).
    holders: Arc<()>,
}

/// Held by every accept loop and connection task; cheap to clone.
#[derive(Debug, Clone)]
pub struct Watch {
    rx: watch::Receiver<Phase>,
    _holder: Arc<()>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every watcher finished before the deadline.
    Graceful,
    /// The deadline passed with `remaining` watchers still held; they were
    /// told to abort.
    Forced { remaining: usize },
}

/// A new signal and its first watcher.
pub fn channel() -> (Signal, Watch) {
    let (tx, rx) = watch::channel(Phase::Running);
    let holders = Arc::new(());
    let watch = Watch {
        rx,
        _holder: holders.clone(),
    };
    (Signal { tx, holders }, watch)
}

/// After forcing, how long to wait for aborted tasks to drop their watchers
/// before returning anyway (aborting is immediate; this only covers tasks
/// that are between two polls).
const FORCE_GRACE: Duration = Duration::from_secs(1);

impl Signal {
    /// Starts the drain now, without waiting for it (what [`Signal::drain`]
    /// does first): a caller can see the listeners close before it reports
    /// draining. Starting twice is harmless.
    pub fn start(&self) {
        self.tx.send_if_modified(|p| {
            if *p < Phase::Draining {
                *p = Phase::Draining;
                true
            } else {
                false
            }
        });
    }

    /// Starts the drain: watchers see [`Watch::signaled`] at once; after
    /// `deadline` those still running see [`Watch::forced`]. Resolves when
    /// every watcher is dropped (or shortly after forcing).
    pub async fn drain(self, deadline: Duration) -> Drained {
        self.start();
        if tokio::time::timeout(deadline, self.tx.closed())
            .await
            .is_ok()
        {
            return Drained::Graceful;
        }
        let remaining = self.watchers();
        tracing::warn!(
            remaining,
            ?deadline,
            "drain deadline passed, aborting remaining connections"
        );
        self.tx.send_replace(Phase::Forced);
        let _ = tokio::time::timeout(FORCE_GRACE, self.tx.closed()).await;
        Drained::Forced { remaining }
    }

    /// Watchers still held.
    pub fn watchers(&self) -> usize {
        Arc::strong_count(&self.holders) - 1
    }
}

impl Watch {
    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow() >= Phase::Draining
    }

    /// Resolves once a drain has started (at once if it already has).
    pub async fn signaled(&self) {
        self.reached(Phase::Draining).await
    }

    /// Resolves once the drain deadline has passed: abort now.
    pub async fn forced(&self) {
        self.reached(Phase::Forced).await
    }

    async fn reached(&self, phase: Phase) {
        let mut rx = self.rx.clone();
        // An error means the Signal was dropped without draining: treat it as
        // "never", so dropping a Signal by accident cannot cut connections.
        if rx.wait_for(|p| *p >= phase).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn graceful_when_work_finishes_in_time() {
        let (signal, watch) = channel();
        let w = watch.clone();
        let task = tokio::spawn(async move {
            w.signaled().await;
            // Finish some in-flight work, then release.
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(w);
        });
        drop(watch);
        assert_eq!(
            signal.drain(Duration::from_secs(5)).await,
            Drained::Graceful
        );
        task.await.expect("task");
    }

    #[tokio::test(start_paused = true)]
    async fn forced_after_deadline() {
        let (signal, watch) = channel();
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let w = watch.clone();
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => false,
                    _ = w.forced() => true,
                }
            }));
        }
        assert!(!watch.is_draining());
        let start = tokio::time::Instant::now();
        let w2 = watch.clone();
        drop(watch);
        let d = tokio::spawn(signal.drain(Duration::from_secs(10)));
        tokio::task::yield_now().await;
        assert!(w2.is_draining());
        drop(w2);
        let out = d.await.expect("drain");
        assert_eq!(out, Drained::Forced { remaining: 3 });
        assert!(start.elapsed() >= Duration::from_secs(10));
        assert!(start.elapsed() < Duration::from_secs(12));
        for t in tasks {
            assert!(t.await.expect("task"), "task saw forced()");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_signal_never_forces() {
        let (signal, watch) = channel();
        drop(signal);
        let r = tokio::time::timeout(Duration::from_secs(60), watch.forced()).await;
        assert!(r.is_err());
        assert!(!watch.is_draining());
    }
}
