//! The service-wide retry budget: tower's `TpsBudget` semantics without its
//! per-request lock and clock read.
//!
//! Why our own: every request deposits into its service's budget, from both
//! data threads. tower 0.5.3's `TpsBudget::deposit` takes the budget's
//! `Mutex` and reads the clock on every call, only to find (all but once a
//! second) that the current window has not ended; the mutex's cache line then
//! moves between the two cores on every request. Here the window check is one
//! atomic load against the time the caller already has (the request's start),
//! and the lock is taken only to roll the window over. Deposits, withdrawals,
//! the reserve and the window arithmetic are tower's, line for line, and a
//! test runs random operation sequences against `TpsBudget` itself.
//!
//! Semantics (tower's): each request deposits `deposit_amount`, each retry
//! withdraws `withdraw_amount`; the balance is the deposits of the last `ttl`
//! (kept in 10 slots of `ttl / 10`) minus withdrawals, plus a reserve of
//! `min_per_sec × ttl` retries, so a service with little traffic can still
//! retry.

use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Slots the TTL window is split into (tower's value).
const SLOTS: usize = 10;

#[derive(Debug)]
pub struct RetryBudget {
    /// Time origin of `gen_at`.
    base: Instant,
    /// Start of the current slot, in nanoseconds since `base`: read without
    /// the lock to decide whether the window must roll over.
    gen_at: AtomicU64,
    /// The current slot's index; only touched under the lock.
    gen_index: Mutex<usize>,
    reserve: isize,
    slots: [AtomicIsize; SLOTS],
    window: Duration,
    /// Deposits and withdrawals of the current slot.
    writer: AtomicIsize,
    deposit_amount: isize,
    withdraw_amount: isize,
}

impl RetryBudget {
    /// Same arguments and limits as `tower::retry::budget::TpsBudget::new`:
    /// `ttl` 1–60 s, `retry_percent` 0–1000, `min_per_sec` below `i32::MAX`.
    /// Out-of-range values are clamped (tower asserts; the settings parser
    /// already bounds them).
    pub fn new(ttl: Duration, min_per_sec: u32, retry_percent: f32) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let retry_percent = if retry_percent.is_nan() {
            0.0
        } else {
            retry_percent.clamp(0.0, 1000.0)
        };
        let min_per_sec = min_per_sec.min(i32::MAX as u32 - 1);
        let (deposit_amount, withdraw_amount) = if retry_percent == 0.0 {
            (0, 1)
        } else if retry_percent <= 1.0 {
            (1, (1.0 / retry_percent) as isize)
        } else {
            (1000, (1000.0 / retry_percent) as isize)
        };
        let reserve = (min_per_sec as isize)
            .saturating_mul(ttl.as_secs() as isize)
            .saturating_mul(withdraw_amount);
        RetryBudget {
            base: Instant::now(),
            gen_at: AtomicU64::new(0),
            gen_index: Mutex::new(0),
            reserve,
            slots: Default::default(),
            window: ttl / SLOTS as u32,
            writer: AtomicIsize::new(0),
            deposit_amount,
            withdraw_amount,
        }
    }

    /// One request's deposit, `now` being about the time of the request.
    pub fn deposit_at(&self, now: Instant) {
        self.expire(now);
        self.writer.fetch_add(self.deposit_amount, Ordering::SeqCst);
    }

    /// Takes one retry's worth from the budget; false when it is exhausted.
    pub fn withdraw(&self) -> bool {
        self.expire(Instant::now());
        if self.sum() >= self.withdraw_amount {
            self.writer
                .fetch_add(-self.withdraw_amount, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    fn nanos_since_base(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Rolls the window over when the current slot has ended (tower's
    /// `expire`, with the "not yet" answer found without the lock).
    fn expire(&self, now: Instant) {
        let now_ns = self.nanos_since_base(now);
        let window_ns = u64::try_from(self.window.as_nanos()).unwrap_or(u64::MAX);
        if now_ns.saturating_sub(self.gen_at.load(Ordering::Acquire)) < window_ns {
            return;
        }
        let mut index = self.gen_index.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread may have rolled it over meanwhile.
        let gen_at = self.gen_at.load(Ordering::Acquire);
        let mut diff = Duration::from_nanos(now_ns.saturating_sub(gen_at));
        if diff < self.window {
            return;
        }
        let to_commit = self.writer.swap(0, Ordering::SeqCst);
        self.slots[*index].store(to_commit, Ordering::SeqCst);
        let mut idx = (*index + 1) % SLOTS;
        while diff > self.window {
            self.slots[idx].store(0, Ordering::SeqCst);
            diff -= self.window;
            idx = (idx + 1) % SLOTS;
        }
        *index = idx;
        // tower stores `now` (never earlier than the previous start).
        self.gen_at.store(now_ns.max(gen_at), Ordering::Release);
    }

    fn sum(&self) -> isize {
        let current = self.writer.load(Ordering::SeqCst);
        let windowed: isize = self
            .slots
            .iter()
            .map(|s| s.load(Ordering::SeqCst))
            .fold(0, isize::saturating_add);
        current
            .saturating_add(windowed)
            .saturating_add(self.reserve)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use tower::retry::budget::{Budget, TpsBudget};

    /// Random deposits, withdrawals and clock advances (within a slot, across
    /// slots, across the whole TTL) give tower's answers, withdrawal by
    /// withdrawal, for several budget shapes.
    #[tokio::test(start_paused = true)]
    async fn same_answers_as_tower_tps_budget() {
        let mut rng = rand::rng();
        for (ttl, min, pct) in [
            (10, 10, 0.2f32),
            (10, 0, 0.2),
            (1, 1, 0.5),
            (5, 2, 0.0),
            (10, 3, 2.5),
            (60, 0, 1.0),
        ] {
            let ttl = Duration::from_secs(ttl);
            let ours = RetryBudget::new(ttl, min, pct);
            let theirs = TpsBudget::new(ttl, min, pct);
            let (mut granted, mut refused) = (0, 0);
            for step in 0..20_000 {
                // Mostly withdrawals, so every shape runs dry now and then.
                match rng.random_range(0..1000) {
                    0..=199 => {
                        ours.deposit_at(Instant::now());
                        theirs.deposit();
                    }
                    200..=989 => {
                        let (a, b) = (ours.withdraw(), theirs.withdraw());
                        assert_eq!(a, b, "withdrawal at step {step} ({ttl:?}, {min}, {pct})");
                        if a {
                            granted += 1;
                        } else {
                            refused += 1;
                        }
                    }
                    990..=998 => {
                        let ms = rng.random_range(1..400);
                        tokio::time::advance(Duration::from_millis(ms)).await;
                    }
                    _ => {
                        let s = rng.random_range(1..=ttl.as_secs() + 2);
                        tokio::time::advance(Duration::from_secs(s)).await;
                    }
                }
            }
            // Both outcomes were exercised, so the comparison meant something.
            assert!(
                granted > 0 && refused > 0,
                "{granted} / {refused} for {pct}"
            );
        }
    }

    /// The documented numbers: 20 % of requests plus a reserve of
    /// min-per-second × TTL, and deposits age out after the TTL.
    #[tokio::test(start_paused = true)]
    async fn ratio_reserve_and_ttl() {
        let b = RetryBudget::new(Duration::from_secs(10), 1, 0.2);
        // Reserve: 1 per second over 10 s = 10 retries with no traffic.
        let mut n = 0;
        while b.withdraw() {
            n += 1;
            assert!(n <= 10, "reserve exceeded");
        }
        assert_eq!(n, 10);
        // 100 requests buy 20 retries.
        for _ in 0..100 {
            b.deposit_at(Instant::now());
        }
        let mut n = 0;
        while b.withdraw() {
            n += 1;
            assert!(n <= 20);
        }
        assert_eq!(n, 20);
        // Deposits older than the TTL no longer count (withdrawals age out
        // with them, so the reserve is whole again).
        for _ in 0..100 {
            b.deposit_at(Instant::now());
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        let mut n = 0;
        while b.withdraw() {
            n += 1;
            assert!(n <= 10);
        }
        assert_eq!(n, 10);
    }

    /// Deposits from two threads at once are all counted.
    #[test]
    fn concurrent_deposits_all_count() {
        let b = std::sync::Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 1.0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        b.deposit_at(Instant::now());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let mut n = 0;
        while b.withdraw() && n < 30_000 {
            n += 1;
        }
        // 1.0: one retry per request; none aged out within the test.
        assert_eq!(n, 20_000);
    }
}
