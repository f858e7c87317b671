//! Process lifecycle: file-descriptor limit at start, readiness while
//! starting, and the turn to "not ready" the moment a shutdown is requested.
//!
//! Why readiness is a set of named guards (the shape of ztunnel's
//! `readiness.rs`) rather than one boolean: an operator looking at a node that
//! never became ready needs to know *what* it is still waiting for ("initial
//! table", "redirect rules"), not just that it is waiting. Each start-up task
//! holds a [`BlockReady`] and drops it when done; `/ready` lists what is left.
//!
//! Why draining is a separate, sticky flag: on SIGTERM the kubelet and cloud
//! load balancers must stop sending new work *at once*, while in-flight
//! connections are still being drained. Once set it is never cleared in this
//! process; a replacement process takes over instead.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the new soft
/// limit. A proxy holds two descriptors per connection; the common default
/// soft limit of 1024 caps it at ~500 connections.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Shared readiness state. Cheap to clone; every clone sees the same state.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Task name → how many guards of that name are alive.
    pending: Mutex<BTreeMap<String, usize>>,
    draining: AtomicBool,
}

/// What `/ready` reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReadyStatus {
    pub ready: bool,
    pub draining: bool,
    /// Names of the start-up tasks still running, sorted.
    pub waiting_for: Vec<String>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a start-up task; readiness is blocked until the returned
    /// guard is dropped.
    pub fn register_task(&self, name: &str) -> BlockReady {
        let mut pending = lock(&self.inner.pending);
        *pending.entry(name.to_string()).or_insert(0) += 1;
        BlockReady {
            parent: self.clone(),
            name: name.to_string(),
            started: Instant::now(),
        }
    }

    /// Names of the tasks still blocking readiness, sorted.
    pub fn pending(&self) -> Vec<String> {
        lock(&self.inner.pending).keys().cloned().collect()
    }

    /// Marks the process as shutting down: not ready from now on.
    pub fn start_draining(&self) {
        if !self.inner.draining.swap(true, Ordering::SeqCst) {
            tracing::info!("shutdown requested: reporting not ready");
        }
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        self.status().ready
    }

    pub fn status(&self) -> ReadyStatus {
        let waiting_for = self.pending();
        let draining = self.is_draining();
        ReadyStatus {
            ready: waiting_for.is_empty() && !draining,
            draining,
            waiting_for,
        }
    }

    fn release(&self, name: &str) -> usize {
        let mut pending = lock(&self.inner.pending);
        if let Some(n) = pending.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                pending.remove(name);
            }
        }
        pending.len()
    }
}

/// Blocks readiness until dropped.
#[derive(Debug)]
pub struct BlockReady {
    parent: Readiness,
    name: String,
    started: Instant,
}

impl BlockReady {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Registers another task on the same readiness state.
    pub fn subtask(&self, name: &str) -> BlockReady {
        self.parent.register_task(name)
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        let left = self.parent.release(&self.name);
        let took = self.started.elapsed();
        if left == 0 {
            tracing::info!(task = %self.name, ?took, "start-up task complete; ready");
        } else {
            tracing::info!(task = %self.name, ?took, left, "start-up task complete");
        }
    }
}

/// The readiness map is only touched on start-up and by `/ready` probes; a
/// poisoned lock (a panic while holding it) must not take the probes down too.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Resolves on the first SIGTERM or SIGINT, after marking `readiness` as
/// draining so probes fail before the caller even starts to drain.
pub async fn shutdown_signal(readiness: Readiness) -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    readiness.start_draining();
    tracing::info!(signal = which, "shutdown signal received");
    Ok(which)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_guard_is_dropped() {
        let r = Readiness::new();
        assert!(r.is_ready(), "nothing registered yet");
        let table = r.register_task("initial table");
        let rules = table.subtask("redirect rules");
        assert_eq!(
            r.status(),
            ReadyStatus {
                ready: false,
                draining: false,
                waiting_for: vec!["initial table".into(), "redirect rules".into()],
            }
        );
        drop(table);
        assert_eq!(r.pending(), vec!["redirect rules".to_string()]);
        assert!(!r.is_ready());
        drop(rules);
        assert!(r.is_ready());
    }

    #[test]
    fn same_name_twice_needs_both_dropped() {
        let r = Readiness::new();
        let a = r.register_task("listener");
        let b = r.register_task("listener");
        drop(a);
        assert_eq!(r.pending(), vec!["listener".to_string()]);
        drop(b);
        assert!(r.is_ready());
    }

    #[test]
    fn draining_is_sticky_and_overrides_ready() {
        let r = Readiness::new();
        assert!(r.is_ready());
        r.start_draining();
        r.start_draining();
        let s = r.status();
        assert!(!s.ready && s.draining && s.waiting_for.is_empty());
    }

    #[test]
    fn nofile_limit_is_raised_to_at_least_what_it_was() {
        let (soft_before, hard) = rlimit::Resource::NOFILE.get().expect("getrlimit");
        let now = raise_nofile_limit().expect("raise RLIMIT_NOFILE");
        assert!(now >= soft_before, "{now} < {soft_before}");
        assert!(now <= hard, "{now} > hard {hard}");
        let (soft_after, _) = rlimit::Resource::NOFILE.get().expect("getrlimit");
        assert_eq!(soft_after, now);
    }
}
