//! Peak-EWMA latency estimate for one endpoint.
//!
//! Why peak-EWMA (Finagle's, as in tower's `load::PeakEwma` and
//! linkerd2-proxy's balancer): a plain moving average reacts slowly to an
//! endpoint that suddenly got slow, so a balancer keeps feeding it. Here a
//! sample above the current estimate *replaces* it at once (the peak), and
//! lower samples only pull it down gradually over the decay window. Between
//! samples the estimate decays towards zero, so an endpoint that was slow a
//! while ago, or that nobody has tried, is tried again instead of being
//! starved forever.
//!
//! Unlike tower, reading the estimate does not write it: the decay is computed
//! from the time of the last sample, so the result does not depend on how
//! often someone happened to read it.
//!
//! Why a sequence lock and not a mutex: every L7 request reads two endpoints'
//! estimates (the p2c comparison) and writes one (its latency), from both
//! data threads, on the same few endpoints. With a mutex each read was a
//! lock and an unlock, two atomic writes to a cache line the other core had
//! just written. Here a read is three loads that retry if a write was under
//! way (and fall back to the writers' lock after a bounded number of tries);
//! writes are serialised by the mutex and publish through the sequence
//! number.
//!
//! Time comes from `tokio::time::Instant` so tests can pause and advance it.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Optimistic reads before a reader waits for the writers' lock (a writer
/// holds it for a few nanoseconds unless its thread was preempted).
const READ_TRIES: usize = 64;

#[derive(Debug)]
pub(crate) struct PeakEwma {
    decay_ns: f64,
    /// Origin of `at_ns`.
    base: Instant,
    /// Even: `rtt_bits`/`at_ns` are consistent; odd: a write is under way.
    seq: AtomicU64,
    /// The estimate (`f64` bits, nanoseconds) and when it was last sampled
    /// (nanoseconds since `base`).
    rtt_bits: AtomicU64,
    at_ns: AtomicU64,
    /// Serialises writers (and readers that found writes under way too often).
    write: Mutex<()>,
}

impl PeakEwma {
    /// A new estimate starting at `default_rtt` (which must not be zero, or a
    /// new endpoint would look free and take every connection).
    pub(crate) fn new(default_rtt: Duration, decay: Duration, now: Instant) -> Self {
        PeakEwma {
            decay_ns: nanos(decay).max(1.0),
            base: now,
            seq: AtomicU64::new(0),
            rtt_bits: AtomicU64::new(nanos(default_rtt).max(1.0).to_bits()),
            at_ns: AtomicU64::new(0),
            write: Mutex::new(()),
        }
    }

    fn since_base(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The last sample: `(estimate ns, sampled at ns since base)`.
    fn sample(&self) -> (f64, u64) {
        for _ in 0..READ_TRIES {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let rtt = self.rtt_bits.load(Ordering::Relaxed);
                let at = self.at_ns.load(Ordering::Relaxed);
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == s1 {
                    return (f64::from_bits(rtt), at);
                }
            }
            std::hint::spin_loop();
        }
        // A poisoned lock only means another thread panicked mid-update of
        // two plain numbers; the data is still usable.
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        (
            f64::from_bits(self.rtt_bits.load(Ordering::Relaxed)),
            self.at_ns.load(Ordering::Relaxed),
        )
    }

    /// The estimate at `now`, in nanoseconds, decayed since the last sample.
    pub(crate) fn estimate_ns(&self, now: Instant) -> f64 {
        let (rtt, at) = self.sample();
        rtt * self.weight(at, self.since_base(now))
    }

    /// Records one latency observation taken at `now`.
    pub(crate) fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = nanos(rtt);
        let now = self.since_base(now);
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let old = f64::from_bits(self.rtt_bits.load(Ordering::Relaxed));
        let at = self.at_ns.load(Ordering::Relaxed);
        let w = self.weight(at, now);
        let decayed = old * w;
        let next = if rtt > decayed {
            // Peak: the worst recent latency is the estimate from now on.
            rtt
        } else {
            // Move towards the observation, the further the older the estimate.
            decayed + rtt * (1.0 - w)
        };
        // Publish: odd while the pair changes, even again after.
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.rtt_bits.store(next.to_bits(), Ordering::Relaxed);
        self.at_ns.store(at.max(now), Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// `e^(-elapsed/decay)`: the weight the old estimate keeps after the time
    /// from `at` to `now` (both nanoseconds since `base`).
    fn weight(&self, at: u64, now: u64) -> f64 {
        let elapsed = now.saturating_sub(at) as f64;
        (-elapsed / self.decay_ns).exp()
    }
}

/// Duration → nanoseconds as f64 (lossy only beyond centuries).
pub(crate) fn nanos(d: Duration) -> f64 {
    d.as_secs() as f64 * 1e9 + f64::from(d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1e6;

    #[tokio::test(start_paused = true)]
    async fn default_rtt_decays_towards_zero() {
        let e = PeakEwma::new(
            Duration::from_millis(30),
            Duration::from_secs(10),
            Instant::now(),
        );
        assert_eq!(e.estimate_ns(Instant::now()), 30.0 * MS);
        tokio::time::advance(Duration::from_secs(10)).await;
        let est = e.estimate_ns(Instant::now());
        // e^-1 of 30 ms.
        assert!(
            (est - 30.0 * MS / std::f64::consts::E).abs() < 0.01 * MS,
            "{est}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn peak_replaces_then_decays() {
        let e = PeakEwma::new(
            Duration::from_millis(30),
            Duration::from_secs(10),
            Instant::now(),
        );
        e.observe(Duration::from_millis(200), Instant::now());
        assert_eq!(e.estimate_ns(Instant::now()), 200.0 * MS);
        // A low sample right away barely moves the estimate...
        e.observe(Duration::from_millis(1), Instant::now());
        assert!(e.estimate_ns(Instant::now()) > 199.0 * MS);
        // ...but after several decay periods of fast samples it is fast again.
        for _ in 0..60 {
            tokio::time::advance(Duration::from_secs(1)).await;
            e.observe(Duration::from_millis(1), Instant::now());
        }
        let est = e.estimate_ns(Instant::now());
        assert!(est < 2.0 * MS, "{est}");
    }

    /// Readers racing a writer see only estimates that were written, in
    /// the order they were written (the clock is not advanced, so no decay:
    /// each rising sample replaces the estimate).
    #[test]
    fn readers_see_whole_writes_in_order() {
        let now = Instant::now();
        let e = std::sync::Arc::new(PeakEwma::new(
            Duration::from_nanos(1),
            Duration::from_secs(10),
            now,
        ));
        let w = {
            let e = e.clone();
            std::thread::spawn(move || {
                for i in 2..200_000u64 {
                    e.observe(Duration::from_nanos(i), now);
                }
            })
        };
        let mut last = 0.0f64;
        let mut reads = 0;
        while !w.is_finished() || reads == 0 {
            let v = e.estimate_ns(now);
            assert!(v >= last, "went back from {last} to {v}");
            assert_eq!(v, v.trunc(), "a whole sample, not a blend: {v}");
            last = v;
            reads += 1;
            assert!(reads < 100_000_000, "bounded");
        }
        w.join().expect("writer");
        assert_eq!(e.estimate_ns(now), 199_999.0);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_default_is_never_free() {
        let e = PeakEwma::new(Duration::ZERO, Duration::from_secs(10), Instant::now());
        assert!(e.estimate_ns(Instant::now()) > 0.0);
    }
}
