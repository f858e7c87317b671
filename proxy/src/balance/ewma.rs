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
//! from the time of the last sample, so the hot path's cost comparisons take
//! the endpoint's tiny mutex only to copy two numbers, and the result does not
//! depend on how often someone happened to read it.
//!
//! Time comes from `tokio::time::Instant` so tests can pause and advance it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The estimate and when it was last sampled.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rtt_ns: f64,
    at: Instant,
}

#[derive(Debug)]
pub(crate) struct PeakEwma {
    decay_ns: f64,
    last: Mutex<Sample>,
}

impl PeakEwma {
    /// A new estimate starting at `default_rtt` (which must not be zero, or a
    /// new endpoint would look free and take every connection).
    pub(crate) fn new(default_rtt: Duration, decay: Duration, now: Instant) -> Self {
        PeakEwma {
            decay_ns: nanos(decay).max(1.0),
            last: Mutex::new(Sample {
                rtt_ns: nanos(default_rtt).max(1.0),
                at: now,
            }),
        }
    }

    fn sample(&self) -> Sample {
        // A poisoned lock only means another thread panicked mid-copy of two
        // plain numbers; the data is still usable.
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The estimate at `now`, in nanoseconds, decayed since the last sample.
    pub(crate) fn estimate_ns(&self, now: Instant) -> f64 {
        let s = self.sample();
        s.rtt_ns * self.weight(s.at, now)
    }

    /// Records one latency observation taken at `now`.
    pub(crate) fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = nanos(rtt);
        let mut s = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let w = self.weight(s.at, now);
        let decayed = s.rtt_ns * w;
        s.rtt_ns = if rtt > decayed {
            // Peak: the worst recent latency is the estimate from now on.
            rtt
        } else {
            // Move towards the observation, the further the older the estimate.
            s.rtt_ns * w + rtt * (1.0 - w)
        };
        if s.at < now {
            s.at = now;
        }
    }

    /// `e^(-elapsed/decay)`: the weight the old estimate keeps after `elapsed`.
    fn weight(&self, at: Instant, now: Instant) -> f64 {
        let elapsed = nanos(now.saturating_duration_since(at));
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

    #[tokio::test(start_paused = true)]
    async fn zero_default_is_never_free() {
        let e = PeakEwma::new(Duration::ZERO, Duration::from_secs(10), Instant::now());
        assert!(e.estimate_ns(Instant::now()) > 0.0);
    }
}
