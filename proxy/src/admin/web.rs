//! The one tiny HTTP/1.1 server every operator listener uses (admin API,
//! `/metrics`, kube-proxy's health server, health-check node ports).
//!
//! Why not the exporter's own listener or a web framework: all of these
//! answer GETs from in-memory state, so a synchronous handler over hyper's
//! connection driver is enough, and one implementation means one place for the
//! limits that matter on ports open to the node network: a cap on concurrent
//! connections, a header read timeout (a slowloris client must not pin a
//! task), and SO_REUSEPORT so a replacement process can bind the same ports
//! during a rolling update.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub type Resp = Response<Full<Bytes>>;

/// A synchronous request handler: everything served here is in memory.
pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Resp + Send + Sync>;

/// Concurrent connections per listener; probes and scrapes need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds a listening socket with SO_REUSEADDR and SO_REUSEPORT (so a second
/// lightpath process can take over during a rolling update).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// Serves `handler` on `listener` until `shutdown` turns true (or its sender
/// is dropped). Connections already accepted finish their current request.
pub async fn serve(listener: TcpListener, handler: Handler, mut shutdown: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&limit).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, _peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "operator listener accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = route_method(&req, &handler);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "operator connection ended with an error");
            }
        });
    }
}

fn route_method(req: &Request<Incoming>, handler: &Handler) -> Resp {
    match *req.method() {
        Method::GET => handler(req),
        Method::HEAD => {
            let full = handler(req);
            let (parts, _) = full.into_parts();
            Response::from_parts(parts, Full::new(Bytes::new()))
        }
        _ => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    respond(status, "text/plain; charset=utf-8", body.into())
}

/// A JSON response from an already-serialised body.
pub fn json_bytes(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    respond(status, "application/json", body.into())
}

/// A JSON response, pretty-printed for people reading it with curl.
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Resp {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            json_bytes(status, body)
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("serialising the response: {e}\n"),
        ),
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
