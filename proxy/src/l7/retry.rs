//! Retries as `tower::retry::Retry`: a [`RetryPolicy`] over an
//! [`Attempts`] service that sends one attempt to one endpoint.
//!
//! Why tower's layer: retrying is a policy over a service, and tower's
//! `Retry` is the shared, reviewed mechanism for it (clone the request
//! before each call, ask the policy after each result). What makes an HTTP
//! proxy's policy special is carried in the types instead of a hand-written
//! loop:
//! * the request ([`Attempt`]) holds the head behind an `Arc` (cloning it
//!   for a retry costs a reference count), the body as [`Replay`], and the
//!   endpoints already tried, so each retry goes to another endpoint;
//! * a streamed body cannot be cloned: the retained copy holds no body, and
//!   when an attempt fails *before* sending, hyper hands the request back
//!   and the policy puts its body into the retained copy; the request goes
//!   again whatever its method;
//! * every result says what happened ([`Outcome`]), so the policy decides
//!   from facts: never sent, refused unprocessed (HTTP/2 REFUSED_STREAM),
//!   reset after sending, per-try timeout, retryable 5xx;
//! * the policy value lives for one request and carries its state: the
//!   `max-retries` slot (held until the response body ends), the retryable
//!   5xx kept in case no retry is allowed after all, the error to report if
//!   a retry finds no endpoint left.
//!
//! Gates for a retry, in order, none of which waits (linkerd: never queue a
//! retry): attempts left (`max-attempts`), a `max-retries` slot, the
//! retry budget (`super::budget`, tower's `TpsBudget` semantics). The
//! policy's future is `Ready`: no backoff, because each retry goes to a
//! different endpoint.

use std::future::{ready, Future, Ready};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

use super::body::{Done, Tracked};
use super::headers;
use super::proxy::{pick, upstream_request, Conn};
use super::rescue::{ProxyError, Timeout};
use super::upstream::{FailKind, GaugeGuard, SendFailure};
use super::Body;

/// The request head, shared by every attempt.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

/// The request body across attempts.
pub enum Replay {
    /// Buffered: every attempt gets a copy.
    Buffered(Bytes),
    /// Streamed: only one send gets it; it comes back if that send never
    /// happened.
    Stream(Option<Body>),
}

impl Replay {
    fn is_buffered(&self) -> bool {
        matches!(self, Replay::Buffered(_))
    }

    /// Whether another attempt has a body to send.
    fn available(&self) -> bool {
        !matches!(self, Replay::Stream(None))
    }
}

/// One request as the retry layer sees it.
pub struct Attempt {
    pub head: Arc<Head>,
    pub body: Replay,
    /// Endpoints already tried (the policy adds each attempt's).
    pub tried: Vec<SocketAddr>,
}

/// A response from an endpoint.
pub struct Sent {
    pub response: Response<Tracked>,
    pub endpoint: SocketAddr,
    /// Attempts made, this one included.
    pub attempts: u32,
    /// A 5xx the service's `retry-on` lists.
    pub retryable_status: bool,
    /// The `max-retries` slot, handed over by the policy at the end.
    pub retry_slot: Option<GaugeGuard>,
}

/// What went wrong with one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No endpoint left to try.
    NoEndpoint,
    /// A circuit-breaker limit refused a new connection (never retried:
    /// the limit is service-wide).
    Overflow,
    /// Connecting failed; the request was not sent.
    Connect,
    /// The connection failed before the request left; it came back.
    Unsent,
    /// HTTP/2 REFUSED_STREAM: sent, but not processed.
    Refused,
    /// Failed after the request was (maybe partly) sent.
    Reset,
    /// No response head within the per-try timeout.
    PerTryTimeout,
}

/// A failed attempt.
pub struct Failed {
    pub error: ProxyError,
    pub outcome: Outcome,
    /// The endpoint tried, if one was picked.
    pub endpoint: Option<SocketAddr>,
    /// Attempts made, this one included if an endpoint was picked.
    pub attempts: u32,
    /// The body of a request that was never sent.
    pub unsent_body: Option<Body>,
}

type AttemptResult = Result<Sent, Failed>;

/// Sends one [`Attempt`] to an endpoint not tried yet.
#[derive(Clone, Copy)]
pub struct Attempts<'a> {
    pub ctx: &'a Conn,
}

impl<'a> tower::Service<Attempt> for Attempts<'a> {
    type Response = Sent;
    type Error = Failed;
    type Future = Pin<Box<dyn Future<Output = AttemptResult> + Send + 'a>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        // Limits are checked per attempt and never waited for.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        Box::pin(send(self.ctx, attempt))
    }
}

async fn send(ctx: &Conn, attempt: Attempt) -> AttemptResult {
    let shared = &ctx.svc.shared;
    let s = &ctx.svc.settings;
    let Attempt { head, body, tried } = attempt;
    let before = tried.len() as u32;
    let Some(mut pick) = pick(ctx, &head.headers, &tried) else {
        return Err(Failed {
            error: ProxyError::NoEndpoints,
            outcome: Outcome::NoEndpoint,
            endpoint: None,
            attempts: before,
            unsent_body: match body {
                Replay::Stream(b) => b,
                Replay::Buffered(_) => None,
            },
        });
    };
    let endpoint = pick.addr();
    let attempts = before + 1;
    let body = match body {
        // Empty is zero-sized: boxing it allocates nothing.
        Replay::Buffered(b) if b.is_empty() => {
            Empty::new().map_err(|never| match never {}).boxed_unsync()
        }
        Replay::Buffered(b) => Full::new(b).map_err(|never| match never {}).boxed_unsync(),
        Replay::Stream(Some(b)) => b,
        // The policy never retries without a body; be safe anyway.
        Replay::Stream(None) => {
            return Err(Failed {
                error: ProxyError::NoEndpoints,
                outcome: Outcome::NoEndpoint,
                endpoint: None,
                attempts: before,
                unsent_body: None,
            })
        }
    };
    let req = upstream_request(&head.method, &head.uri, &head.headers, shared.http2(), body);
    let pool = shared.pools.get(endpoint, ctx.source_for(endpoint));
    let sending = pool.send(req, &shared.connect, &shared.limits, &shared.pools);
    let result = match s.per_try_timeout {
        None => Ok(sending.await),
        Some(t) => tokio::time::timeout(t, sending).await,
    };
    let failed = |pick: &mut crate::balance::Pick| {
        pick.record_failure();
        // Counts the ejection metric itself.
        ctx.balancer()
            .report_failure(pick.backend(), &ctx.svc.shared.outlier);
    };
    match result {
        Err(_) => {
            failed(&mut pick);
            Err(Failed {
                error: ProxyError::Timeout(Timeout::PerTry),
                outcome: Outcome::PerTryTimeout,
                endpoint: Some(endpoint),
                attempts,
                unsent_body: None,
            })
        }
        Ok(Ok((mut resp, checkin))) => {
            let status = resp.status();
            if status.is_server_error() {
                failed(&mut pick);
            } else {
                pick.record_success();
            }
            headers::prepare_response(resp.headers_mut(), false);
            let done = Done { pick, checkin };
            Ok(Sent {
                response: resp.map(|b: Incoming| Tracked::new(b, done)),
                endpoint,
                attempts,
                retryable_status: s.retry_on.status(status.as_u16()),
                retry_slot: None,
            })
        }
        Ok(Err(SendFailure { kind, request })) => {
            let unsent_body = request.map(|r| r.into_body());
            let (error, outcome) = match kind {
                FailKind::Overflow(limit) => {
                    // A service-wide limit, not the endpoint's fault.
                    shared.metrics.breaker_overflows.increment(1);
                    (ProxyError::Overflow(limit), Outcome::Overflow)
                }
                FailKind::Connect(e) => {
                    failed(&mut pick);
                    (ProxyError::Connect(e), Outcome::Connect)
                }
                FailKind::Http(e) => {
                    failed(&mut pick);
                    let outcome = if unsent_body.is_some() {
                        Outcome::Unsent
                    } else if is_refused_stream(&e) {
                        Outcome::Refused
                    } else {
                        Outcome::Reset
                    };
                    (ProxyError::Upstream(e), outcome)
                }
            };
            Err(Failed {
                error,
                outcome,
                endpoint: Some(endpoint),
                attempts,
                unsent_body,
            })
        }
    }
}

/// Whether an HTTP error means the endpoint refused the stream (HTTP/2
/// REFUSED_STREAM: not processed, safe to retry for any method).
fn is_refused_stream(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        src = s.source();
    }
    false
}

/// The retry policy of one request (see the module doc).
pub struct RetryPolicy<'a> {
    ctx: &'a Conn,
    idempotent: bool,
    retry_slot: Option<GaugeGuard>,
    /// A retryable 5xx kept in case no retry is allowed after all. Boxed
    /// (only a retried request fills it in): `Retry` keeps the policy twice
    /// and moves it with every request's future, so its size is copied on
    /// every request.
    held: Option<Box<Sent>>,
    /// The last real failure, reported if a retry then finds no endpoint.
    last: Option<Box<Failed>>,
}

impl<'a> RetryPolicy<'a> {
    pub fn new(ctx: &'a Conn, method: &Method) -> Self {
        RetryPolicy {
            ctx,
            idempotent: super::proxy::is_idempotent(method),
            retry_slot: None,
            held: None,
            last: None,
        }
    }

    /// Whether a failure of this kind may be retried, before the gates.
    fn retryable(&self, outcome: Outcome, body: &Replay) -> bool {
        let on = &self.ctx.svc.settings.retry_on;
        let buffered = body.is_buffered();
        match outcome {
            Outcome::NoEndpoint | Outcome::Overflow => false,
            Outcome::Connect => on.connect_failure,
            // The body (streamed or not) is still ours.
            Outcome::Unsent => true,
            Outcome::Refused => buffered && on.refused_stream,
            // The endpoint may have processed it.
            Outcome::Reset => buffered && self.idempotent && on.reset,
            Outcome::PerTryTimeout => buffered && self.idempotent && on.per_try_timeout,
        }
    }

    /// The gates, in order; none waits. `made` = attempts so far.
    fn admit(&mut self, made: u32) -> bool {
        let shared = &self.ctx.svc.shared;
        let s = &self.ctx.svc.settings;
        if made >= s.max_attempts {
            return false;
        }
        if self.retry_slot.is_none() {
            match shared.limits.retries.try_acquire(s.max_retries) {
                Some(g) => self.retry_slot = Some(g),
                None => {
                    shared.metrics.http_retry_overflows.increment(1);
                    return false;
                }
            }
        }
        if !shared.budget.withdraw() {
            shared.metrics.http_retry_budget_exhausted.increment(1);
            return false;
        }
        shared.metrics.http_retries.increment(1);
        true
    }

    /// The final result: a held 5xx beats a later failure; a retry that
    /// found no endpoint reports the failure before it; the `max-retries`
    /// slot rides along with a response.
    fn finish(&mut self, result: &mut AttemptResult) {
        let made = match result {
            Ok(s) => s.attempts,
            Err(f) => f.attempts,
        };
        if result.is_err() {
            if let Some(held) = self.held.take() {
                *result = Ok(*held);
            } else if let (Err(f), Some(last)) = (&*result, self.last.take()) {
                if f.outcome == Outcome::NoEndpoint {
                    *result = Err(*last);
                }
            }
        }
        match result {
            Ok(s) => {
                s.attempts = made;
                s.retry_slot = self.retry_slot.take();
            }
            Err(f) => f.attempts = made,
        }
    }
}

/// `Retry` clones its policy into every call's future, so a clone is the
/// policy of a new request: same settings, no state carried over.
impl Clone for RetryPolicy<'_> {
    fn clone(&self) -> Self {
        RetryPolicy {
            ctx: self.ctx,
            idempotent: self.idempotent,
            retry_slot: None,
            held: None,
            last: None,
        }
    }
}

impl<'a> tower::retry::Policy<Attempt, Sent, Failed> for RetryPolicy<'a> {
    type Future = Ready<()>;

    fn retry(&mut self, req: &mut Attempt, result: &mut AttemptResult) -> Option<Ready<()>> {
        let (endpoint, made, may) = match result {
            Ok(sent) => (
                Some(sent.endpoint),
                sent.attempts,
                sent.retryable_status && self.idempotent && req.body.is_buffered(),
            ),
            Err(f) => {
                if let Some(b) = f.unsent_body.take() {
                    // Never sent: the streamed body can go to the next endpoint.
                    req.body = Replay::Stream(Some(b));
                }
                (f.endpoint, f.attempts, self.retryable(f.outcome, &req.body))
            }
        };
        if !(may && req.body.available() && self.admit(made)) {
            self.finish(result);
            return None;
        }
        // Only a request that goes again needs the list (no allocation on
        // the common path).
        if let Some(a) = endpoint {
            req.tried.push(a);
        }
        // Retrying: keep what this attempt produced in case the retries
        // cannot do better. The placeholder is discarded by `Retry`.
        let placeholder = Err(Failed {
            error: ProxyError::NoEndpoints,
            outcome: Outcome::NoEndpoint,
            endpoint: None,
            attempts: made,
            unsent_body: None,
        });
        match std::mem::replace(result, placeholder) {
            Ok(sent) => self.held = Some(Box::new(sent)),
            Err(f) => self.last = Some(Box::new(f)),
        }
        Some(ready(()))
    }

    fn clone_request(&mut self, req: &Attempt) -> Option<Attempt> {
        Some(Attempt {
            head: req.head.clone(),
            body: match &req.body {
                Replay::Buffered(b) => Replay::Buffered(b.clone()),
                // Filled from the failure if the attempt was never sent.
                Replay::Stream(_) => Replay::Stream(None),
            },
            tried: req.tried.clone(),
        })
    }
}
