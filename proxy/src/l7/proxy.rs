//! One proxied request, from the client's request head to the upstream
//! response head (the body then streams through [`super::body::Tracked`]).
//!
//! Why a plain loop instead of `tower::retry::Retry` over a generic stack:
//! the decisions depend on facts only this loop has together: whether the
//! request was sent at all (then any method may be retried), whether its
//! body was buffered, which endpoints were tried, and which limit refused.
//! The policy pieces are tower's and the shared balancer's: the retry
//! budget is `tower::retry::budget::TpsBudget`, endpoints come from the
//! peak-EWMA p2c balancer (or the Ketama ring), failures feed its outlier
//! ejection.
//!
//! Order per request: `max-requests` slot (else 503 overflow) → budget
//! deposit → header rewrite → body: buffered when its length is known and
//! within the cap (any method: a refused stream may be replayed), otherwise
//! streamed → attempts: pick an endpoint not tried
//! yet, send within the per-try timeout; retry on another endpoint when the
//! failure is retryable, attempts remain, a `max-retries` slot is free and
//! the budget allows; never wait for a slot. The whole loop runs within the
//! request timeout (to the response head only).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use tokio::time::Instant;
use tower::retry::budget::Budget as _;

use super::body::{Done, Tracked};
use super::headers;
use super::rescue::{Limit, ProxyError, Timeout};
use super::settings::{Balance, HashOn};
use super::upstream::{FailKind, GaugeGuard, SendFailure};
use super::{Body, Service};
use crate::balance::{Balancer, Pick, Scope};

/// One client connection's fixed context.
#[derive(Debug)]
pub struct ClientConn {
    pub l7: Arc<super::L7>,
    pub balancer: Arc<Balancer>,
    pub scope: Scope,
    pub peer: SocketAddr,
}

/// One request's context: the connection's, plus the service state current
/// when the request arrived (so endpoint and annotation changes reach
/// long-lived keep-alive connections too).
#[derive(Debug)]
pub struct Conn {
    pub svc: Arc<Service>,
    pub balancer: Arc<Balancer>,
    pub scope: Scope,
    pub peer: SocketAddr,
}

/// Serves one request; never fails (errors become responses via rescue).
pub async fn handle(conn: Arc<ClientConn>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let mut svc = conn.l7.service(&conn.balancer.service());
    if !conn.balancer.has_endpoints(conn.scope) {
        // The set is empty: wait (bounded) for an update, then use the
        // service state that came with it.
        let s = &svc.settings;
        let queued = &svc.shared.limits.queued;
        let waited = super::queue::wait_for_endpoint(
            &conn.balancer,
            conn.scope,
            queued,
            s.queue_capacity,
            s.queue_timeout,
        )
        .await;
        if let Err(e) = waited {
            tracing::debug!(service = %svc.port.name, peer = %conn.peer, error = %e, "request failed");
            if matches!(e, ProxyError::Overflow(_)) {
                svc.shared.metrics.breaker_overflows.increment(1);
            }
            let mut resp = e.to_response();
            headers::set_attempts(resp.headers_mut(), 0);
            svc.shared
                .metrics
                .http_response(resp.status().as_u16(), started.elapsed());
            return resp;
        }
        svc = conn.l7.service(&conn.balancer.service());
    }
    let ctx = Conn {
        svc,
        balancer: conn.balancer.clone(),
        scope: conn.scope,
        peer: conn.peer,
    };
    let (mut resp, attempts) = match proxy(&ctx, req, started).await {
        Ok(r) => r,
        Err((e, attempts)) => {
            tracing::debug!(service = %ctx.svc.port.name, peer = %ctx.peer, error = %e, attempts, "request failed");
            (e.to_response(), attempts)
        }
    };
    headers::set_attempts(resp.headers_mut(), attempts);
    ctx.svc
        .shared
        .metrics
        .http_response(resp.status().as_u16(), started.elapsed());
    resp
}

/// Methods safe to send twice (RFC 9110 §9.2.2).
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The request body across attempts.
enum Replay {
    /// Buffered: every attempt gets a copy.
    Buffered(Bytes),
    /// Streamed: only the first send gets it; it comes back if that send
    /// never happened.
    Stream(Option<Body>),
}

type Failed = (ProxyError, u32);

async fn proxy(
    ctx: &Conn,
    req: Request<Incoming>,
    started: Instant,
) -> Result<(Response<Body>, u32), Failed> {
    let shared = &ctx.svc.shared;
    let s = &ctx.svc.settings;
    let Some(request_slot) = shared.limits.requests.try_acquire(s.max_requests) else {
        shared.metrics.breaker_overflows.increment(1);
        return Err((ProxyError::Overflow(Limit::Requests), 0));
    };
    shared.budget.deposit();
    let work = async {
        if req.method() == Method::CONNECT || headers::is_upgrade(req.headers()) {
            return super::upgrade::proxy(ctx, req, request_slot).await;
        }
        forward(ctx, req, request_slot).await
    };
    match s.request_timeout {
        None => work.await,
        Some(t) => match tokio::time::timeout_at(started + t, work).await {
            Ok(r) => r,
            Err(_) => Err((ProxyError::Timeout(Timeout::Request), 0)),
        },
    }
}

/// The request head for one attempt, rewritten for the endpoint's protocol.
pub(crate) fn upstream_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    http2: bool,
    body: Body,
) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.headers_mut() = headers.clone();
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if http2 {
        // HTTP/2 carries the authority in :authority; take it from Host.
        let authority = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| uri.authority().map(|a| a.to_string()));
        req.headers_mut().remove(http::header::HOST);
        let built = match authority {
            Some(a) => Uri::builder()
                .scheme("http")
                .authority(a.as_str())
                .path_and_query(path)
                .build()
                .ok(),
            None => None,
        };
        *req.uri_mut() = built.unwrap_or_else(|| uri.clone());
        *req.version_mut() = Version::HTTP_2;
    } else {
        if !req.headers().contains_key(http::header::HOST) {
            // An HTTP/2 client sent :authority; HTTP/1.1 needs Host.
            if let Some(v) = uri
                .authority()
                .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert(http::header::HOST, v);
            }
        }
        *req.uri_mut() = if method == Method::CONNECT {
            uri.clone()
        } else {
            path.parse().unwrap_or_else(|_| Uri::from_static("/"))
        };
        *req.version_mut() = Version::HTTP_11;
    }
    req
}

/// Picks an endpoint for an attempt, never one in `tried`.
pub(crate) fn pick(ctx: &Conn, headers: &HeaderMap, tried: &[SocketAddr]) -> Option<Pick> {
    match (&ctx.svc.settings.balance, &ctx.svc.ring) {
        (Balance::RingHash(on), Some(ring)) => {
            let ip;
            let key: &[u8] = match on {
                HashOn::Header(name) => match headers.get(name) {
                    Some(v) => v.as_bytes(),
                    None => {
                        ip = ctx.peer.ip().to_string();
                        ip.as_bytes()
                    }
                },
                HashOn::ClientIp => {
                    ip = ctx.peer.ip().to_string();
                    ip.as_bytes()
                }
            };
            let bal = &ctx.balancer;
            let addr = ring.pick(ctx.scope, key, tried, |a| {
                bal.backend(a).map(|b| b.is_ready()).unwrap_or(false)
            })?;
            bal.pick_endpoint(ctx.scope, addr)
        }
        _ => ctx.balancer.pick(ctx.scope, ctx.peer.ip(), tried),
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

/// Records a failed attempt on the endpoint and lets outlier detection act.
fn failed(ctx: &Conn, pick: &mut Pick) {
    pick.record_failure();
    // Counts the ejection metric itself.
    ctx.balancer
        .report_failure(pick.backend(), &ctx.svc.shared.outlier);
}

async fn forward(
    ctx: &Conn,
    req: Request<Incoming>,
    request_slot: GaugeGuard,
) -> Result<(Response<Body>, u32), Failed> {
    let svc = &ctx.svc;
    let s = &svc.settings;
    let shared = &svc.shared;
    let http2 = shared.http2();
    let (mut parts, body) = req.into_parts();
    headers::prepare_request(&mut parts.headers, ctx.peer.ip(), false);
    // Buffered when it fits: then a request that was refused unprocessed
    // (HTTP/2 REFUSED_STREAM) can go again whatever its method. Which
    // failures a buffered request retries after it *was* processed depends
    // on the method (`idempotent`).
    let idempotent = is_idempotent(&parts.method);
    let replayable = s.max_attempts > 1
        && (body.is_end_stream()
            || body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= s.retry_buffer_bytes as u64));
    let mut replay = if replayable {
        match Limited::new(body, s.retry_buffer_bytes).collect().await {
            Ok(c) => Replay::Buffered(c.to_bytes()),
            Err(_) => return Err((ProxyError::BadRequest("request body could not be read"), 0)),
        }
    } else {
        Replay::Stream(Some(body.boxed_unsync()))
    };

    let mut tried: Vec<SocketAddr> = Vec::with_capacity(s.max_attempts as usize);
    let mut attempts: u32 = 0;
    let mut retry_slot: Option<GaugeGuard> = None;
    let mut last: Option<ProxyError> = None;
    // A retryable 5xx kept in case no retry is allowed after all.
    let mut held: Option<Response<Body>> = None;
    loop {
        if attempts > 0 {
            // Gates for a retry, in order; none of them waits.
            if attempts >= s.max_attempts {
                break;
            }
            if retry_slot.is_none() {
                match shared.limits.retries.try_acquire(s.max_retries) {
                    Some(g) => retry_slot = Some(g),
                    None => {
                        shared.metrics.http_retry_overflows.increment(1);
                        break;
                    }
                }
            }
            if !shared.budget.withdraw() {
                shared.metrics.http_retry_budget_exhausted.increment(1);
                break;
            }
            shared.metrics.http_retries.increment(1);
        }
        let Some(mut pick) = pick(ctx, &parts.headers, &tried) else {
            if tried.is_empty() {
                last = Some(ProxyError::NoEndpoints);
            }
            break;
        };
        tried.push(pick.addr());
        attempts += 1;
        let body = match &mut replay {
            Replay::Buffered(b) => Full::new(b.clone())
                .map_err(|never| match never {})
                .boxed_unsync(),
            Replay::Stream(slot) => match slot.take() {
                Some(b) => b,
                // The stream went to an earlier attempt: cannot resend.
                None => break,
            },
        };
        let upstream = upstream_request(&parts.method, &parts.uri, &parts.headers, http2, body);
        let pool = shared.pools.get(pick.addr());
        let send = pool.send(upstream, &shared.connect, &shared.limits);
        let result = match s.per_try_timeout {
            None => Ok(send.await),
            Some(t) => tokio::time::timeout(t, send).await,
        };
        match result {
            Err(_) => {
                failed(ctx, &mut pick);
                last = Some(ProxyError::Timeout(Timeout::PerTry));
                if idempotent && matches!(replay, Replay::Buffered(_)) && s.retry_on.per_try_timeout
                {
                    continue;
                }
                break;
            }
            Ok(Ok((mut resp, checkin))) => {
                let status = resp.status();
                if status.is_server_error() {
                    failed(ctx, &mut pick);
                } else {
                    pick.record_success();
                }
                headers::prepare_response(resp.headers_mut(), false);
                let retry = s.retry_on.status(status.as_u16())
                    && idempotent
                    && matches!(replay, Replay::Buffered(_))
                    && attempts < s.max_attempts;
                let done = Done { pick, checkin };
                let resp = resp.map(|b| Tracked::new(b, done).boxed_unsync());
                if retry {
                    held = Some(resp);
                    continue;
                }
                return Ok((attach(resp, request_slot, retry_slot), attempts));
            }
            Ok(Err(SendFailure { kind, request })) => {
                let unsent = request.is_some();
                if let (Some(r), Replay::Stream(slot)) = (request, &mut replay) {
                    // Never sent: the streamed body can go to the next endpoint.
                    *slot = Some(r.into_body());
                }
                match kind {
                    FailKind::Overflow(limit) => {
                        shared.metrics.breaker_overflows.increment(1);
                        return Err((ProxyError::Overflow(limit), attempts));
                    }
                    FailKind::Connect(e) => {
                        failed(ctx, &mut pick);
                        let retry = s.retry_on.connect_failure;
                        last = Some(ProxyError::Connect(e));
                        if retry {
                            continue;
                        }
                        break;
                    }
                    FailKind::Http(e) => {
                        failed(ctx, &mut pick);
                        let buffered = matches!(replay, Replay::Buffered(_));
                        // Unsent: the body (streamed or not) is still ours.
                        // Refused: the endpoint did not process it. Reset
                        // before any response byte: it may have, so only an
                        // idempotent request goes again.
                        let retry = unsent
                            || (buffered && is_refused_stream(&e) && s.retry_on.refused_stream)
                            || (buffered && idempotent && s.retry_on.reset);
                        last = Some(ProxyError::Upstream(e));
                        if retry {
                            continue;
                        }
                        break;
                    }
                }
            }
        }
    }
    match held {
        // A retryable 5xx whose retries were refused or failed too: the
        // client gets the endpoint's own response rather than ours.
        Some(resp) => Ok((attach(resp, request_slot, retry_slot), attempts)),
        None => Err((last.unwrap_or(ProxyError::NoEndpoints), attempts)),
    }
}

/// Holds the request's limit slots until the response body ends.
fn attach(
    resp: Response<Body>,
    request_slot: GaugeGuard,
    retry_slot: Option<GaugeGuard>,
) -> Response<Body> {
    resp.map(|b| {
        Guarded {
            inner: b,
            _slots: (request_slot, retry_slot),
        }
        .boxed_unsync()
    })
}

/// A body that keeps some guards alive until it is dropped.
struct Guarded<G> {
    inner: Body,
    _slots: G,
}

impl<G: Unpin> hyper::body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
