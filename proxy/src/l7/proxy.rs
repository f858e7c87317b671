//! One proxied request, from the client's request head to the upstream
//! response head (the body then streams through [`super::body::Tracked`]).
//!
//! Order per request: `max-requests` slot (else 503 overflow) → retry
//! budget deposit → header rewrite → body: buffered when its length is
//! known and within the cap (any method: a refused stream may be replayed),
//! otherwise streamed → attempts through `tower::retry::Retry` with
//! [`super::retry::RetryPolicy`]: each on an endpoint not tried yet (the
//! peak-EWMA p2c balancer or the Ketama ring), within the per-try timeout,
//! failures feeding outlier ejection. The whole request runs within the
//! request timeout (to the response head only).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};
use tokio::time::Instant;

use super::body::Tracked;
use super::headers;
use super::rescue::{Limit, ProxyError, Timeout};
use super::retry::{Attempt, Attempts, Head, Replay, RetryPolicy};
use super::settings::{Balance, HashOn};
use super::upstream::GaugeGuard;
use super::{Body, Service};
use crate::balance::{Balancer, Pick, Scope};

/// One client connection's fixed context.
#[derive(Debug)]
pub struct ClientConn {
    pub l7: Arc<super::L7>,
    /// The service state the last request used: reused while the balancer
    /// still serves the same service-port snapshot (a pointer compare
    /// instead of a map lookup per request).
    pub svc: arc_swap::ArcSwap<Service>,
    pub balancer: Arc<Balancer>,
    pub scope: Scope,
    pub peer: SocketAddr,
    /// Whether upstream connections keep the peer's address as source.
    pub source: crate::l4::Source,
    /// The peer's address as `X-Forwarded-For` has it, formatted once.
    pub forwarded: headers::ClientAddr,
}

/// One request's context: the connection's, plus the service state current
/// when the request arrived (so endpoint and annotation changes reach
/// long-lived keep-alive connections too).
#[derive(Debug)]
pub struct Conn {
    pub svc: Arc<Service>,
    /// The connection's context, moved in (not the shared balancer's `Arc`
    /// cloned: its count is written by every request of both data threads).
    client: Arc<ClientConn>,
}

impl Conn {
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.client.balancer
    }

    pub fn scope(&self) -> Scope {
        self.client.scope
    }

    pub fn peer(&self) -> SocketAddr {
        self.client.peer
    }

    /// The source of upstream connections to `endpoint` for this client
    /// (`None`: the node's address); see [`crate::l4::Source`].
    pub fn source_for(&self, endpoint: SocketAddr) -> Option<std::net::IpAddr> {
        self.client
            .source
            .for_endpoint(self.client.peer.ip(), endpoint)
    }

    /// The client's address for `X-Forwarded-For`.
    pub fn forwarded(&self) -> &headers::ClientAddr {
        &self.client.forwarded
    }
}

/// Serves one request; never fails (errors become responses via rescue).
pub async fn handle(conn: Arc<ClientConn>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let mut svc = current(&conn);
    if !conn.balancer.has_endpoints(conn.scope) {
        // The set is empty: wait (bounded) for an update, then use the
        // service state that came with it.
        let s = &svc.settings;
        let queued = &svc.shared.limits.queued;
        // Boxed: a rare path, kept out of every request's future (which
        // hyper moves into place per request).
        let waited = Box::pin(super::queue::wait_for_endpoint(
            &conn.balancer,
            conn.scope,
            queued,
            s.queue_capacity,
            s.queue_timeout,
        ))
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
        svc = current(&conn);
    }
    let ctx = Conn { svc, client: conn };
    let access = crate::telemetry::access_log_enabled()
        .then(|| (req.method().clone(), req.uri().path().to_owned()));
    let (mut resp, attempts) = match proxy(&ctx, req, started).await {
        Ok(r) => r,
        Err((e, attempts)) => {
            tracing::debug!(service = %ctx.svc.port.name, peer = %ctx.peer(), error = %e, attempts, "request failed");
            (e.to_response(), attempts)
        }
    };
    headers::set_attempts(resp.headers_mut(), attempts);
    ctx.svc
        .shared
        .metrics
        .http_response(resp.status().as_u16(), started.elapsed());
    if let Some((method, path)) = access {
        tracing::info!(
            target: crate::telemetry::ACCESS_LOG, peer = %ctx.peer(), service = %ctx.svc.port.name,
            %method, path, status = resp.status().as_u16(), attempts,
            duration_ms = started.elapsed().as_secs_f64() * 1e3, "http"
        );
    }
    resp
}

/// The L7 state for the balancer's current snapshot of the service port.
fn current(conn: &ClientConn) -> Arc<Service> {
    let cached = conn.svc.load();
    // Compared in place: no reference count of the shared snapshot touched.
    if conn.balancer.is_current(&cached.port) {
        return Arc::clone(&cached);
    }
    let port = conn.balancer.service();
    let svc = conn.l7.service(&port);
    conn.svc.store(svc.clone());
    svc
}

/// Methods safe to send twice (RFC 9110 §9.2.2).
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
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
    shared.budget.deposit_at(started);
    let work = async {
        if req.method() == Method::CONNECT || headers::is_upgrade(req.headers()) {
            // Boxed: rare, and its future would size every request's.
            return Box::pin(super::upgrade::proxy(ctx, req, request_slot)).await;
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
        *req.uri_mut() =
            if method == Method::CONNECT || (uri.scheme().is_none() && uri.authority().is_none()) {
                // Already origin-form (`/path?query`, what HTTP/1.1 clients
                // send): shared, not parsed again.
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
                        ip = ctx.peer().ip().to_string();
                        ip.as_bytes()
                    }
                },
                HashOn::ClientIp => {
                    ip = ctx.peer().ip().to_string();
                    ip.as_bytes()
                }
            };
            let bal = ctx.balancer();
            let addr = ring.pick(ctx.scope(), key, tried, |a| {
                bal.backend(a).map(|b| b.is_ready()).unwrap_or(false)
            })?;
            bal.pick_endpoint(ctx.scope(), addr)
        }
        _ => ctx.balancer().pick(ctx.scope(), ctx.peer().ip(), tried),
    }
}

async fn forward(
    ctx: &Conn,
    req: Request<Incoming>,
    request_slot: GaugeGuard,
) -> Result<(Response<Body>, u32), Failed> {
    let s = &ctx.svc.settings;
    let (mut parts, body) = req.into_parts();
    headers::prepare_request(&mut parts.headers, ctx.forwarded(), false);
    // Buffered when it fits: then a request that was refused unprocessed
    // (HTTP/2 REFUSED_STREAM) can go again whatever its method. Which
    // failures a buffered request retries after it *was* processed depends
    // on the method (see `retry::RetryPolicy`).
    let replayable = s.max_attempts > 1
        && (body.is_end_stream()
            || body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= s.retry_buffer_bytes as u64));
    let replay = if replayable && body.is_end_stream() {
        // No body (GET and the like): nothing to read, no collect future.
        Replay::Buffered(Bytes::new())
    } else if replayable {
        match Limited::new(body, s.retry_buffer_bytes).collect().await {
            Ok(c) => Replay::Buffered(c.to_bytes()),
            Err(_) => return Err((ProxyError::BadRequest("request body could not be read"), 0)),
        }
    } else {
        Replay::Stream(Some(body.boxed_unsync()))
    };
    let policy = RetryPolicy::new(ctx, &parts.method);
    let attempt = Attempt {
        head: Arc::new(Head {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
        }),
        body: replay,
        tried: Vec::new(),
    };
    let mut retrying = tower::retry::Retry::new(policy, Attempts { ctx });
    // Always ready (limits are checked per attempt, never waited for).
    if let Err(f) = std::future::poll_fn(|cx| tower::Service::poll_ready(&mut retrying, cx)).await {
        return Err((f.error, f.attempts));
    }
    match tower::Service::call(&mut retrying, attempt).await {
        Ok(sent) => Ok((
            attach(sent.response, request_slot, sent.retry_slot),
            sent.attempts,
        )),
        Err(f) => Err((f.error, f.attempts)),
    }
}

/// Holds the request's limit slots until the response body is dropped.
fn attach(
    resp: Response<Tracked>,
    request_slot: GaugeGuard,
    retry_slot: Option<GaugeGuard>,
) -> Response<Body> {
    resp.map(|mut b| {
        b.hold((request_slot, retry_slot));
        b.boxed_unsync()
    })
}
