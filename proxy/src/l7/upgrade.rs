//! `Upgrade` (WebSocket) and `CONNECT`: forwarded as HTTP, then a byte relay.
//!
//! Why a separate path: after a `101 Switching Protocols` (or a 2xx answer
//! to CONNECT) the connection is no longer HTTP, so it cannot be pooled,
//! retried or balanced per request. The request goes on a fresh HTTP/1.1
//! connection (upgrades are an HTTP/1.1 mechanism, whatever the service's
//! mode); if the endpoint agrees, both upgraded streams are spliced until
//! either side closes. A connect failure is retried on another endpoint (the
//! request was never sent); nothing after that is.

use std::net::SocketAddr;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::body::{Done, Tracked};
use super::headers;
use super::proxy::{pick, upstream_request, Conn};
use super::rescue::ProxyError;
use super::upstream::{FailKind, GaugeGuard, SendFailure};
use super::Body;

pub(crate) async fn proxy(
    ctx: &Conn,
    mut req: Request<Incoming>,
    request_slot: GaugeGuard,
) -> Result<(Response<Body>, u32), (ProxyError, u32)> {
    let shared = &ctx.svc.shared;
    let s = &ctx.svc.settings;
    let is_connect = req.method() == Method::CONNECT;
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    headers::prepare_request(&mut parts.headers, ctx.forwarded(), !is_connect);
    let mut body = Some(body.boxed_unsync());
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last = ProxyError::NoEndpoints;
    while (tried.len() as u32) < s.max_attempts {
        let Some(mut pick) = pick(ctx, &parts.headers, &tried) else {
            break;
        };
        tried.push(pick.addr());
        let Some(b) = body.take() else { break };
        let upstream = upstream_request(&parts.method, &parts.uri, &parts.headers, false, b);
        let pool = shared.pools.get(pick.addr(), ctx.source_for(pick.addr()));
        match pool
            .send_upgrade(upstream, &shared.connect, &shared.limits, &shared.pools)
            .await
        {
            Ok(mut resp) => {
                pick.record_success();
                let status = resp.status();
                let switched = status == StatusCode::SWITCHING_PROTOCOLS
                    || (is_connect && status.is_success());
                headers::prepare_response(resp.headers_mut(), switched && !is_connect);
                let attempts = tried.len() as u32;
                if !switched {
                    let done = Done {
                        pick,
                        checkin: None,
                    };
                    return Ok((resp.map(|b| Tracked::new(b, done).boxed_unsync()), attempts));
                }
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let peer = ctx.peer();
                let service = ctx.svc.port.name.clone();
                tokio::spawn(async move {
                    // The in-flight slot and request slot last as long as the tunnel.
                    let _hold = (pick, request_slot);
                    let (c, u) = match tokio::join!(client_upgrade, upstream_upgrade) {
                        (Ok(c), Ok(u)) => (c, u),
                        (c, u) => {
                            tracing::debug!(%peer, %service, client_ok = c.is_ok(), upstream_ok = u.is_ok(), "upgrade failed");
                            return;
                        }
                    };
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    match tokio::io::copy_bidirectional(&mut c, &mut u).await {
                        Ok((tx, rx)) => tracing::debug!(%peer, %service, tx, rx, "tunnel closed"),
                        Err(e) => tracing::debug!(%peer, %service, error = %e, "tunnel ended"),
                    }
                });
                let resp = resp.map(|_| {
                    http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed_unsync()
                });
                return Ok((resp, attempts));
            }
            Err(SendFailure { kind, request }) => {
                pick.record_failure();
                match kind {
                    FailKind::Overflow(l) => {
                        shared.metrics.breaker_overflows.increment(1);
                        return Err((ProxyError::Overflow(l), tried.len() as u32));
                    }
                    FailKind::Connect(e) => last = ProxyError::Connect(e),
                    FailKind::Http(e) => last = ProxyError::Upstream(e),
                }
                match request {
                    Some(r) => body = Some(r.into_body()),
                    None => break,
                }
            }
        }
    }
    Err((last, tried.len() as u32))
}
