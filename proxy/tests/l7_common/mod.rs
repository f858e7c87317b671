//! Loopback fixtures for the L7 tests: HTTP service ports served on plain
//! 127.0.0.1 frontends (`support/loopback.rs`, shared with the L4 tests),
//! in-process hyper backends with scriptable behaviour, and hyper clients.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use control::{Affinity, Mode, ServicePort, ServicePortName};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lightpath::server::ServerConfig;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[path = "../support/loopback.rs"]
mod loopback;

use loopback::service_port;
pub use loopback::Served;

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

pub type BBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(b: impl Into<Bytes>) -> BBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub fn service(
    name: &str,
    eps: &[SocketAddr],
    mode: Mode,
    annotations: &[(&str, &str)],
) -> Arc<ServicePort> {
    let name = ServicePortName {
        namespace: "l7".into(),
        name: name.into(),
        port: "http".into(),
    };
    let annotations = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<BTreeMap<_, _>>();
    service_port(name, mode, Affinity::None, eps, annotations)
}

/// A running lightpath server with one loopback frontend; the server, its
/// table sender and drain signal are the [`Served`] it derefs to.
pub struct Proxy {
    pub addr: SocketAddr,
    served: Served,
}

impl Proxy {
    pub async fn start(svc: Arc<ServicePort>) -> Proxy {
        Self::start_with(svc, ServerConfig::default()).await
    }

    pub async fn start_with(svc: Arc<ServicePort>, cfg: ServerConfig) -> Proxy {
        let served = Served::start(1, cfg, |a| vec![(a[0], svc)]).await;
        Proxy {
            addr: served.addrs[0],
            served,
        }
    }

    pub fn publish(&self, svc: Arc<ServicePort>) {
        self.served.publish(vec![(self.addr, svc)]);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl std::ops::Deref for Proxy {
    type Target = Served;
    fn deref(&self) -> &Served {
        &self.served
    }
}

impl std::ops::DerefMut for Proxy {
    fn deref_mut(&mut self) -> &mut Served {
        &mut self.served
    }
}

type Handler = Arc<
    dyn Fn(usize, Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<BBody>> + Send>>
        + Send
        + Sync,
>;

/// An in-process hyper backend (HTTP/1.1 and h2c) on loopback.
pub struct Backend {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    /// Connections open now (accepted and not yet closed by either side).
    pub open: Arc<AtomicUsize>,
    kill: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Backend {
    /// `handler(n, req)` answers the backend's n-th request (0-based).
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(usize, Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<BBody>> + Send + 'static,
    {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), handler).await
    }

    pub async fn start_on<F, Fut>(addr: SocketAddr, handler: F) -> Backend
    where
        F: Fn(usize, Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<BBody>> + Send + 'static,
    {
        let h: Handler = Arc::new(move |n, r| Box::pin(handler(n, r)));
        let l = TcpListener::bind(addr).await.expect("bind backend");
        let addr = l.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (kill, killed) = watch::channel(false);
        let (rq, cn, op) = (requests.clone(), connections.clone(), open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                cn.fetch_add(1, Ordering::SeqCst);
                op.fetch_add(1, Ordering::SeqCst);
                let (h, rq, op, mut killed) = (h.clone(), rq.clone(), op.clone(), killed.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let n = rq.fetch_add(1, Ordering::SeqCst);
                        let fut = h(n, req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(s), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = killed.wait_for(|k| *k) => {}
                    }
                    op.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Backend {
            addr,
            requests,
            connections,
            open,
            kill,
            task,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits (up to [`WAIT`]) until every connection to this backend has
    /// closed, and returns how long that took; `what` names the connections
    /// in the failure message.
    pub async fn all_closed(&self, what: &str) -> Duration {
        let start = tokio::time::Instant::now();
        while self.open() > 0 {
            assert!(
                start.elapsed() < WAIT,
                "{} {what} still open after {:?}",
                self.open(),
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start.elapsed()
    }

    /// Stops accepting and closes every open connection.
    pub fn kill(&self) {
        self.task.abort();
        let _ = self.kill.send(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A backend answering 200 with `id` as the body.
pub async fn ok_backend(id: &'static str) -> Backend {
    Backend::start(move |_, _| async move { Response::new(full(id)) }).await
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, BBody>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// GET `url`; returns status, headers and body.
pub async fn get(c: &HttpClient, url: &str) -> (u16, http::HeaderMap, Bytes) {
    send(c, Request::get(url).body(full("")).expect("request")).await
}

pub async fn send(c: &HttpClient, req: Request<BBody>) -> (u16, http::HeaderMap, Bytes) {
    let resp = tokio::time::timeout(WAIT, c.request(req))
        .await
        .expect("response in time")
        .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (status, headers, body)
}

/// Resident set size of this process, in bytes.
pub fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS")
}

/// Reads one HTTP/1.1 response off a raw connection: its head, lowercased
/// (for header checks), and its content-length body. Bytes read past the
/// response stay in `buf` for the next call.
pub async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                return (head, body);
            }
        }
        let mut tmp = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut tmp))
            .await
            .expect("response in time")
            .expect("read");
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&tmp[..n]);
    }
}
