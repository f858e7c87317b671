//! The response body as it streams back to the client, carrying the
//! request's resources until the last frame, and driving the upstream
//! HTTP/1.1 connection it comes from.
//!
//! Why: a request is not over when its headers arrive. The balancer's
//! in-flight slot (the `Pick`), the `max-requests` slot and, for HTTP/1.1,
//! the pooled connection all belong to the request until its body has been
//! read to the end; the `max-requests` and `max-retries` slots until the
//! body is dropped (`proxy::attach` hands them over, so the response body is
//! one boxed layer, not two). Frames (data and trailers) pass through
//! untouched, so bodies stream without buffering and gRPC trailers reach the
//! client.
//!
//! An HTTP/1.1 upstream connection has no task of its own (see
//! `super::upstream`): its body only moves when the connection is polled, so
//! polling this body polls the connection, with the client connection's
//! waker. When the body ends the connection goes back to the pool; a body
//! that ends early (client gone, upstream error) or is dropped half-way
//! closes its connection instead.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

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

    /// The next frame from the inner body, driving the connection when it
    /// has none buffered. While the connection is open only driving it can
    /// fill the body, and the connection holds `cx`'s waker, so the body
    /// itself is polled without one (a second waker would wake this task
    /// from its own poll).
    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(checkin) = self.done.as_mut().and_then(|d| d.checkin.as_mut()) else {
            return Pin::new(&mut self.inner).poll_frame(cx);
        };
        let mut quiet = Context::from_waker(Waker::noop());
        if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_frame(&mut quiet) {
            checkin.quiet();
            return Poll::Ready(r);
        }
        if checkin.drive(cx).is_ready() {
            // The connection ended: what it delivered is in the body's
            // channel, and the body now ends (or fails) on its own.
            if let Some(d) = self.done.as_mut() {
                d.checkin = None;
            }
            return Pin::new(&mut self.inner).poll_frame(cx);
        }
        let r = Pin::new(&mut self.inner).poll_frame(&mut quiet);
        if r.is_ready() {
            // Got what it polled for: no wake-up for this task until the
            // next drive (`upstream::Gate`).
            checkin.quiet();
        }
        r
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = std::task::ready!(self.poll_inner(cx));
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
