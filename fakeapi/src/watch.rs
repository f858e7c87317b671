//! The watch response: newline-delimited JSON `WatchEvent`s streamed from
//! the store's history, with bookmarks, server-side timeout and 410 Gone.
//!
//! Why a pull stream over the history instead of a per-client channel: a
//! slow or newly resumed client reads from its own cursor, so it can never
//! miss or reorder a change, and an expired cursor turns into exactly the
//! ERROR event the real API server sends.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::resource::Kind;
use crate::server::Shared;
use crate::store::{ApiError, EventType, Filter};

/// What a client asked for in a `?watch=true` request.
pub struct WatchRequest {
    pub kind: Kind,
    pub filter: Filter,
    /// `None` for "" / "0": start with synthetic ADDED events for everything.
    pub resource_version: Option<u64>,
    pub send_initial_events: bool,
    pub bookmarks: bool,
    pub timeout: Duration,
}

struct State {
    shared: Arc<Shared>,
    req: WatchRequest,
    cursor: u64,
    epoch: u64,
    rx: tokio::sync::watch::Receiver<crate::server::Tick>,
    pending: VecDeque<Bytes>,
    deadline: Instant,
    next_bookmark: Instant,
    done: bool,
}

fn line(ty: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": ty, "object": object})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn error_line(err: &ApiError) -> Bytes {
    line("ERROR", &err.status())
}

fn bookmark(kind: Kind, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        &json!({"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": meta}),
    )
}

/// Copies `obj` with its resourceVersion replaced (a DELETED event for an
/// object that left the selector carries the event's resourceVersion).
fn restamp(obj: &Value, rv: u64) -> Value {
    let mut o = obj.clone();
    o["metadata"]["resourceVersion"] = json!(rv.to_string());
    o
}

impl State {
    /// Moves every change after the cursor into `pending`.
    fn collect(&mut self) {
        let tick = *self.rx.borrow_and_update();
        if tick.epoch != self.epoch {
            self.pending.push_back(error_line(&ApiError::gone(
                "The resourceVersion for the provided watch is too old.",
            )));
            self.done = true;
            return;
        }
        let (changes, now_rv) = {
            let store = self.shared.lock();
            (store.changes_since(self.cursor), store.resource_version())
        };
        let changes = match changes {
            Ok(c) => c,
            Err(e) => {
                self.pending.push_back(error_line(&e));
                self.done = true;
                return;
            }
        };
        self.cursor = self.cursor.max(now_rv);
        let kind = self.req.kind;
        for ch in changes.iter().filter(|c| c.kind == kind) {
            let cur = self.req.filter.matches(kind, &ch.object);
            let prev = ch
                .prev
                .as_ref()
                .is_some_and(|p| self.req.filter.matches(kind, p));
            match ch.ty {
                EventType::Added if cur => self.pending.push_back(line("ADDED", &ch.object)),
                EventType::Modified if cur && prev => {
                    self.pending.push_back(line("MODIFIED", &ch.object))
                }
                EventType::Modified if cur => self.pending.push_back(line("ADDED", &ch.object)),
                EventType::Modified if prev => {
                    if let Some(p) = &ch.prev {
                        self.pending.push_back(line("DELETED", &restamp(p, ch.rv)));
                    }
                }
                EventType::Deleted if prev => self.pending.push_back(line("DELETED", &ch.object)),
                _ => {}
            }
        }
    }
}

/// Starts a watch. The first events (initial state, or 410 for an expired
/// resourceVersion) are computed here so they reflect the moment of the
/// request.
pub fn stream(
    shared: Arc<Shared>,
    req: WatchRequest,
) -> impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    let mut rx = shared.tick.subscribe();
    let epoch = rx.borrow_and_update().epoch;
    let now = Instant::now();
    let mut st = State {
        deadline: now + req.timeout,
        next_bookmark: now + shared.bookmark_interval,
        shared: shared.clone(),
        cursor: 0,
        epoch,
        rx,
        pending: VecDeque::new(),
        done: false,
        req,
    };
    {
        let store = shared.lock();
        let now_rv = store.resource_version();
        match st.req.resource_version {
            Some(rv) if !st.req.send_initial_events => {
                let expired = shared.expired[crate::server::idx(st.req.kind)]
                    .load(std::sync::atomic::Ordering::Acquire);
                if rv < store.compacted() || expired {
                    st.pending.push_back(error_line(&ApiError::gone(format!(
                        "too old resource version: {rv} ({})",
                        store.compacted()
                    ))));
                    st.done = true;
                }
                st.cursor = rv;
            }
            _ => {
                for obj in store.matching(st.req.kind, &st.req.filter) {
                    st.pending.push_back(line("ADDED", &obj));
                }
                if st.req.send_initial_events {
                    st.pending.push_back(bookmark(st.req.kind, now_rv, true));
                }
                st.cursor = now_rv;
            }
        }
    }
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.pending.pop_front() {
                return Some((Ok(Frame::data(b)), st));
            }
            if st.done {
                return None;
            }
            st.collect();
            if !st.pending.is_empty() || st.done {
                continue;
            }
            tokio::select! {
                changed = st.rx.changed() => {
                    if changed.is_err() {
                        st.done = true;
                    }
                }
                _ = tokio::time::sleep_until(st.deadline) => st.done = true,
                _ = tokio::time::sleep_until(st.next_bookmark), if st.req.bookmarks => {
                    st.pending.push_back(bookmark(st.req.kind, st.cursor, false));
                    st.next_bookmark = Instant::now() + st.shared.bookmark_interval;
                }
            }
        }
    })
}
