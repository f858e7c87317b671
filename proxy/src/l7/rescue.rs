//! Every proxy-generated error response, decided in one function.
//!
//! Why one place (linkerd2-proxy's `ServerRescue`): the status a client sees
//! for a failure is part of the contract (502 vs 503 vs 504 decides whether
//! clients and meshes retry), so it is reviewed here rather than scattered
//! through the stack. Each response carries a short plain-text body and an
//! `x-lightpath-error` header saying which failure it was; overflow also
//! carries `x-lightpath-overflow: true` (Envoy's `x-envoy-overloaded`).
//!
//! Malformed requests (400) and oversized headers (431) are answered by
//! hyper's HTTP/1 parser before a request exists; those statuses are listed
//! in [`ProxyError::status`] for the errors the proxy itself detects.

use std::io;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::Body;

/// Which circuit-breaker limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Pending,
    Connections,
    /// The wait-for-an-endpoint queue is full.
    Queue,
}

impl Limit {
    fn as_str(self) -> &'static str {
        match self {
            Limit::Requests => "max-requests",
            Limit::Pending => "max-pending-requests",
            Limit::Connections => "max-connections",
            Limit::Queue => "queue-capacity",
        }
    }
}

/// Which timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    Connect,
    PerTry,
    Request,
}

/// A request the proxy answers itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no endpoints")]
    NoEndpoints,
    /// Waited in the queue for the whole queue timeout; none appeared.
    #[error("no endpoints: none became available within {}ms (fail-fast)", .0.as_millis())]
    FailFast(std::time::Duration),
    #[error("circuit breaker overflow ({})", .0.as_str())]
    Overflow(Limit),
    #[error("connect to endpoint failed: {0}")]
    Connect(#[source] io::Error),
    #[error("upstream error: {0}")]
    Upstream(#[source] hyper::Error),
    #[error("{0:?} timeout")]
    Timeout(Timeout),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request headers too large")]
    HeadersTooLarge,
}

impl ProxyError {
    /// The one mapping from failure to status code.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoEndpoints | ProxyError::FailFast(_) | ProxyError::Overflow(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Connect(e) if e.kind() == io::ErrorKind::TimedOut => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Connect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    /// Short machine-readable name, for the `x-lightpath-error` header.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoEndpoints | ProxyError::FailFast(_) => "no-endpoints",
            ProxyError::Overflow(_) => "overflow",
            ProxyError::Connect(e) if e.kind() == io::ErrorKind::TimedOut => "connect-timeout",
            ProxyError::Connect(_) => "connect-failed",
            ProxyError::Upstream(_) => "upstream-error",
            ProxyError::Timeout(Timeout::Connect) => "connect-timeout",
            ProxyError::Timeout(Timeout::PerTry) => "per-try-timeout",
            ProxyError::Timeout(Timeout::Request) => "request-timeout",
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::HeadersTooLarge => "headers-too-large",
        }
    }

    /// The response sent to the client.
    pub fn to_response(&self) -> Response<Body> {
        let body = format!("lightpath: {self}\n");
        let mut resp = Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert("x-lightpath-error", HeaderValue::from_static(self.kind()));
        if matches!(self, ProxyError::Overflow(_)) {
            h.insert("x-lightpath-overflow", HeaderValue::from_static("true"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let timed_out = io::Error::from(io::ErrorKind::TimedOut);
        let cases: Vec<(ProxyError, u16, &str)> = vec![
            (ProxyError::NoEndpoints, 503, "no-endpoints"),
            (ProxyError::Overflow(Limit::Requests), 503, "overflow"),
            (ProxyError::Overflow(Limit::Queue), 503, "overflow"),
            (
                ProxyError::FailFast(std::time::Duration::from_secs(1)),
                503,
                "no-endpoints",
            ),
            (ProxyError::Connect(refused), 502, "connect-failed"),
            (ProxyError::Connect(timed_out), 504, "connect-timeout"),
            (ProxyError::Timeout(Timeout::PerTry), 504, "per-try-timeout"),
            (
                ProxyError::Timeout(Timeout::Request),
                504,
                "request-timeout",
            ),
            (ProxyError::BadRequest("x"), 400, "bad-request"),
            (ProxyError::HeadersTooLarge, 431, "headers-too-large"),
        ];
        for (e, status, kind) in cases {
            let r = e.to_response();
            assert_eq!(r.status().as_u16(), status, "{e}");
            assert_eq!(r.headers()["x-lightpath-error"], kind);
            assert_eq!(
                r.headers().contains_key("x-lightpath-overflow"),
                matches!(e, ProxyError::Overflow(_))
            );
        }
    }
}
