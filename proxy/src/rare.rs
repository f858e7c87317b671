//! A future that rarely completes (the drain signal, the idle timer),
//! polled only when its own wake-up fired.
//!
//! Why: a connection's task waits on its sockets and on such futures, and is
//! woken about twice per request, always by a socket. `select!` polls every
//! branch every time, and polling a waiting drain future takes the lock of
//! the drain channel's notify list, which every connection of both data
//! threads shares (a cache line that moves between the cores on every
//! request); a timer re-checks its entry. [`Rare`] polls its future with a
//! waker of its own that records the wake-up: the future is polled on the
//! first poll and after it woke, and otherwise costs one atomic swap. Used
//! by the L7 connection (drain signal) and the L4 copy (idle timer and
//! forced drain).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// See the module doc. `F` is `Unpin`: pass a `pin!`ned or boxed future.
pub struct Rare<F> {
    fut: F,
    flag: Arc<Flag>,
    waker: Waker,
}

struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> Rare<F> {
    pub fn new(fut: F) -> Self {
        let flag = Arc::new(Flag {
            // Polled on the first poll.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Rare {
            fut,
            waker: Waker::from(flag.clone()),
            flag,
        }
    }

    /// Polls the inner future if it was woken since its last poll (or was
    /// never polled); `Pending` otherwise. The task is woken when the inner
    /// future's waker fires.
    pub fn poll_rare(&mut self, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut own = Context::from_waker(&self.waker);
        Pin::new(&mut self.fut).poll(&mut own)
    }
}

impl<F: Future + Unpin> Future for Rare<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // `Rare` is `Unpin` (so is its future).
        self.get_mut().poll_rare(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `open` is set (and it was woken).
    struct Counted {
        polls: Arc<AtomicUsize>,
        open: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Counted {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn polled_first_then_only_after_its_wake_up() {
        let polls = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicBool::new(false));
        let slot = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let mut rare = Rare::new(Counted {
            polls: polls.clone(),
            open: open.clone(),
            waker: slot.clone(),
        });
        let task_woken = Arc::new(AtomicUsize::new(0));
        struct Task(Arc<AtomicUsize>);
        impl Wake for Task {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let task = Waker::from(Arc::new(Task(task_woken.clone())));
        let mut cx = Context::from_waker(&task);
        assert!(rare.poll_rare(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // The task woken by something else: the inner future is not polled.
        for _ in 0..5 {
            assert!(rare.poll_rare(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Its own wake-up reaches the task, and the next poll polls it.
        open.store(true, Ordering::SeqCst);
        slot.lock().unwrap().take().expect("waker").wake();
        assert_eq!(task_woken.load(Ordering::SeqCst), 1);
        assert!(rare.poll_rare(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    /// With the drain watch it guards: a drain started while the connection
    /// is busy is seen.
    #[tokio::test]
    async fn sees_a_drain_signal() {
        let (signal, watch) = crate::drain::channel();
        let w = watch.clone();
        let mut rare = Rare::new(Box::pin(async move { w.signaled().await }));
        let first = std::future::poll_fn(|cx| Poll::Ready(rare.poll_rare(cx).is_pending())).await;
        assert!(first);
        let d = tokio::spawn(signal.drain(std::time::Duration::from_secs(5)));
        tokio::time::timeout(std::time::Duration::from_secs(5), &mut rare)
            .await
            .expect("drain seen within 5 s");
        drop(rare);
        drop(watch);
        d.await.expect("drain task");
    }
}
