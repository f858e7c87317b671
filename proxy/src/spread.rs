//! Spreading accepted connections evenly over the data threads.
//!
//! Why: each data thread owns SO_REUSEPORT listeners, and the kernel picks
//! the listener of a new connection by a hash of its addresses. Many short
//! connections even out that way; a few long-lived ones often do not. With
//! two threads, an HTTP/2 client's 4 connections all land on one thread one
//! time in 8, and 3 of 4 do half the time; that thread then carries the
//! client on one core while the other idles (the benchmark's h2 case showed
//! a 5 % / 88 % split of the proxy's CPU). haproxy hands every accepted
//! connection to its least-loaded thread, and Envoy offers the same as
//! `exact_balance`.
//!
//! Here a thread that accepts a connection while it serves clearly more
//! than the least-loaded thread hands the socket over: the socket leaves
//! this thread's reactor, travels over a channel, and joins the other
//! thread's reactor. That costs two `epoll_ctl` calls and one cross-thread
//! wake-up, paid only on imbalance. Balanced threads pay, per connection,
//! one relaxed load per thread, and at open and again at close an atomic add
//! on the count, one on its gauge and one on the counts' `Arc`.
//!
//! "Clearly more" means more than the least-loaded count plus a quarter of
//! it, and only while that count is below [`SPREAD_BELOW`] (8). A thread
//! that is the only one to accept still reaches exact balance up to 4
//! connections per thread (counts differ by at most one), and the others
//! get at least 8 each. Beyond that the hash is left alone: it spreads many
//! connections evenly enough (100 over two threads land within 40/60 in
//! 95 % of cases), and many short connections churn the counts, so
//! hand-overs would be frequent and buy nothing. In the new-connection
//! benchmark (32 connections at a time, about 16 per thread) spreading at
//! every count cost about 5 % more CPU per connection; below 8 it costs
//! nothing measurable (BENCHMARKS.md, "Connections per data thread").
//!
//! Each thread's count is exported as `lightpath_data_thread_connections`
//! (label `thread`), so an operator can see the balance.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

/// One thread's open-connection count, on a cache line of its own (each is
/// written by connection opens and closes of its thread, and read by every
/// thread's accepts), and its exported gauge.
#[derive(Debug)]
#[repr(align(128))]
struct Count {
    n: AtomicUsize,
    gauge: metrics::Gauge,
}

impl Count {
    fn add(&self) {
        self.n.fetch_add(1, Ordering::Relaxed);
        self.gauge.increment(1.0);
    }

    fn sub(&self) {
        self.n.fetch_sub(1, Ordering::Relaxed);
        self.gauge.decrement(1.0);
    }

    fn get(&self) -> usize {
        self.n.load(Ordering::Relaxed)
    }
}

/// The open-connection counts of the data threads and a channel into each.
#[derive(Debug)]
pub struct Spread<T> {
    counts: Arc<[Count]>,
    inboxes: Box<[mpsc::UnboundedSender<T>]>,
}

/// A connection counted on thread [`Open::lane`] for as long as it lives.
#[derive(Debug)]
pub struct Open {
    counts: Arc<[Count]>,
    lane: usize,
}

impl Open {
    /// The thread this connection is counted on.
    pub fn lane(&self) -> usize {
        self.lane
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.counts[self.lane].sub();
    }
}

/// Connections are handed over only while the least-loaded thread has fewer
/// than this many.
pub const SPREAD_BELOW: usize = 8;

impl<T> Spread<T> {
    /// State for `threads` data threads, and the receiving end of each
    /// thread's channel (index = thread).
    pub fn new(threads: usize) -> (Arc<Spread<T>>, Vec<mpsc::UnboundedReceiver<T>>) {
        let threads = threads.max(1);
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..threads).map(|_| mpsc::unbounded_channel()).unzip();
        let counts: Arc<[Count]> = (0..threads)
            .map(|i| {
                let gauge = metrics::gauge!(
                    crate::metrics::names::DATA_THREAD_CONNECTIONS,
                    "thread" => i.to_string()
                );
                gauge.set(0.0);
                Count {
                    n: AtomicUsize::new(0),
                    gauge,
                }
            })
            .collect();
        let spread = Spread {
            counts,
            inboxes: inboxes.into_boxed_slice(),
        };
        (Arc::new(spread), receivers)
    }

    /// Where a connection that thread `me` accepted is served, counted
    /// there from now on: `me`, or the least-loaded thread when `me` serves
    /// clearly more (see the module comment).
    pub fn place(&self, me: usize) -> Open {
        let me = me.min(self.counts.len() - 1);
        let mine = self.counts[me].get();
        let (least, min) = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.get()))
            .min_by_key(|&(_, n)| n)
            .unwrap_or((me, mine));
        let lane = if min < SPREAD_BELOW && mine > min + min / 4 {
            least
        } else {
            me
        };
        self.open_on(lane)
    }

    /// A connection counted on thread `lane`.
    pub fn open_on(&self, lane: usize) -> Open {
        let lane = lane.min(self.counts.len() - 1);
        self.counts[lane].add();
        Open {
            counts: self.counts.clone(),
            lane,
        }
    }

    /// Sends `item` to thread `to`; gives it back when that thread no
    /// longer takes any (it stopped accepting at the drain).
    pub fn send(&self, to: usize, item: T) -> Result<(), T> {
        match self.inboxes.get(to) {
            Some(tx) => tx.send(item).map_err(|e| e.0),
            None => Err(item),
        }
    }

    /// Open connections per thread.
    pub fn counts(&self) -> Vec<usize> {
        self.counts.iter().map(Count::get).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection accepted by thread 0 (the worst hash): the others
    /// are handed over until the counts differ by at most one, up to 4 per
    /// thread; beyond that by at most a quarter plus one, until the other
    /// thread has `SPREAD_BELOW`.
    #[test]
    fn one_accepting_thread_still_balances() {
        let (s, _rx) = Spread::<()>::new(2);
        let mut open = Vec::new();
        for n in 1..=8 {
            open.push(s.place(0));
            let c = s.counts();
            assert_eq!(c.iter().sum::<usize>(), n);
            assert!(c[0].abs_diff(c[1]) <= 1, "after {n}: {c:?}");
        }
        for n in 9..=100 {
            open.push(s.place(0));
            let c = s.counts();
            assert!(c[0] <= c[1] + c[1] / 4 + 1, "after {n}: {c:?}");
            if c[1] == SPREAD_BELOW {
                break;
            }
        }
        for _ in 0..10 {
            open.push(s.place(0));
        }
        let c = s.counts();
        assert_eq!(c[1], SPREAD_BELOW, "no hand-over at {c:?}");
        drop(open);
        assert_eq!(s.counts(), vec![0, 0], "closing uncounts");
    }

    /// Balanced threads keep what they accept.
    #[test]
    fn balanced_threads_keep_their_connections() {
        let (s, _rx) = Spread::<()>::new(3);
        let open: Vec<Open> = (0..30).map(|i| s.place(i % 3)).collect();
        assert!(open.iter().enumerate().all(|(i, o)| o.lane() == i % 3));
        assert_eq!(s.counts(), vec![10, 10, 10]);
    }

    /// A thread whose channel is closed gives the item back.
    #[test]
    fn a_closed_inbox_gives_the_item_back() {
        let (s, mut rx) = Spread::<u32>::new(2);
        assert_eq!(s.send(1, 7), Ok(()));
        assert_eq!(rx[1].try_recv().ok(), Some(7));
        rx[1].close();
        assert_eq!(s.send(1, 8), Err(8));
        assert_eq!(s.send(5, 9), Err(9), "no such thread");
    }
}
