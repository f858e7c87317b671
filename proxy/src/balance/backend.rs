//! One endpoint as the balancer sees it: its address, load statistics and
//! readiness.
//!
//! Why the state lives here and not in the balancer: everything that judges
//! an endpoint (the L4 relay's connect results, L7 outlier ejection, circuit
//! breakers, active health checks) holds an `Arc<Backend>` and writes to it
//! directly, and the p2c pick reads it; nobody needs a lock over the whole
//! endpoint set. When a table update keeps an endpoint, the same `Backend`
//! moves into the new set, so its latency history and in-flight count survive
//! the update; when the endpoint leaves, established connections still hold it
//! and finish undisturbed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::ewma::PeakEwma;

#[derive(Debug)]
pub struct Backend {
    addr: SocketAddr,
    ewma: PeakEwma,
    in_flight: AtomicUsize,
    /// Cleared by ejection / breakers / health checks; p2c skips not-ready
    /// backends while any other is ready.
    ready: AtomicBool,
    consecutive_failures: AtomicU32,
    /// Times outlier detection ejected this backend (the ejection time grows
    /// with it; see `outlier`).
    ejections: AtomicU32,
    picks: AtomicU64,
    failures: AtomicU64,
}

impl Backend {
    pub(crate) fn new(addr: SocketAddr, default_rtt: Duration, decay: Duration) -> Self {
        Backend {
            addr,
            ewma: PeakEwma::new(default_rtt, decay, Instant::now()),
            in_flight: AtomicUsize::new(0),
            ready: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            picks: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections (L4) or requests (L7) currently holding a [`super::Pick`]
    /// of this backend.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether p2c may choose this backend (see [`super::Balancer::eject`]).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Failures recorded since the last success (input for outlier ejection).
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Times outlier detection has ejected this backend.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Counts one more ejection; returns the new count.
    pub(crate) fn count_ejection(&self) -> u32 {
        self.ejections.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Forgets the consecutive failures (at readmission, so one more
    /// failure does not eject again at once).
    pub(crate) fn clear_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Total picks and failures since the backend was first seen.
    pub fn picks(&self) -> u64 {
        self.picks.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The current peak-EWMA latency estimate.
    pub fn rtt_estimate(&self) -> Duration {
        Duration::from_nanos(self.ewma.estimate_ns(Instant::now()) as u64)
    }

    /// The current estimate in nanoseconds (no rounding).
    pub(crate) fn estimate_ns(&self, now: Instant) -> f64 {
        self.ewma.estimate_ns(now)
    }

    /// p2c cost: latency estimate × (in-flight + 1). The `+ 1` makes an idle
    /// backend's cost its latency rather than zero.
    pub(crate) fn cost(&self, now: Instant) -> f64 {
        self.ewma.estimate_ns(now) * (self.in_flight() as f64 + 1.0)
    }

    pub(crate) fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.picks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finish(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn succeeded(&self, latency: Duration, now: Instant) {
        self.ewma.observe(latency, now);
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    pub(crate) fn failed(&self, penalty: Duration, now: Instant) {
        self.ewma.observe(penalty, now);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Test and bench hook: feed a latency sample without a connection.
    pub fn observe_latency(&self, latency: Duration) {
        self.ewma.observe(latency, Instant::now());
    }
}
