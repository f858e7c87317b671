//! The response body as it streams back to the client, carrying the
//! request's resources until the last frame.
//!
//! Why: a request is not over when its headers arrive. The balancer's
//! in-flight slot (the `Pick`), the `max-requests` slot and, for HTTP/1.1,
//! the pooled connection all belong to the request until its body has been
//! read to the end; the `max-requests` and `max-retries` slots until the
//! body is dropped (`proxy::attach` hands them over, so the response body is
//! one boxed layer, not two). Frames (data and trailers) pass through untouched, so
//! bodies stream without buffering and gRPC trailers reach the client. A
//! body that ends early (client gone, upstream error) drops its connection
//! instead of returning it to the pool.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::upstream::{Checkin, GaugeGuard};
use crate::balance::Pick;

/// What a finished response releases.
#[derive(Debug)]
pub struct Done {
    pub pick: Pick,
    pub checkin: Option<Checkin>,
}

/// The request's limit slots: `max-requests`, and `max-retries` when the
/// request was retried.
pub type Slots = (GaugeGuard, Option<GaugeGuard>);

#[derive(Debug)]
pub struct Tracked {
    inner: Incoming,
    done: Option<Done>,
    /// Released when the body is dropped.
    slots: Option<Slots>,
}

impl Tracked {
    pub fn new(inner: Incoming, done: Done) -> Self {
        let mut t = Tracked {
            inner,
            done: Some(done),
            slots: None,
        };
        // Empty bodies (HEAD, 204, 304) may never be polled.
        if t.inner.is_end_stream() {
            t.finish();
        }
        t
    }

    /// Keeps the request's limit slots until the body is dropped.
    pub fn hold(&mut self, slots: Slots) {
        self.slots = Some(slots);
    }

    fn finish(&mut self) {
        if let Some(d) = self.done.take() {
            if let Some(c) = d.checkin {
                c.finish();
            }
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &r {
            None => self.finish(),
            Some(Err(_)) => {
                // Dropping the checkin closes the broken connection.
                self.done = None;
            }
            Some(Ok(_)) => {
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
