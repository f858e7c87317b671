//! Upstream HTTP connections, pooled per endpoint.
//!
//! Why a small pool of our own instead of hyper-util's legacy `Client`: the
//! retry logic must know whether a request was *sent*. Here connecting is a
//! separate step that never touches the request, and hyper's
//! `try_send_request` hands the request back when a pooled connection turned
//! out not to be usable, so a request that never left the proxy can always
//! be retried on another endpoint, whatever its method and body.
//!
//! * HTTP/1.1: idle connections are kept per endpoint for a short idle
//!   timeout; before reuse a connection must be open and ready (hyper knows
//!   when the peer closed it), otherwise it is dropped and the next one (or a
//!   new one) is used. A connection goes back to the pool only once its
//!   response body was read to the end.
//! * Thread affinity: each connection's task runs on the data thread that
//!   opened it, so a request on another thread would wake that thread twice
//!   (request over, response back: an eventfd write and an epoll wakeup
//!   each way). A request therefore takes an idle connection opened on its
//!   own thread, and opens one when there is none; another thread's idle
//!   connection is used only when `max-connections` allows no new one.
//! * HTTP/2 (`Mode::H2c`): one multiplexed connection per endpoint, replaced
//!   when it closes.
//! * Every connection counts against the service's `max-connections` for as
//!   long as its task runs; every request waiting for a new connection
//!   counts against `max-pending-requests`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::FutureExt as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use super::rescue::Limit;
use super::Body;
use crate::l4::connect::{connect_one, ConnectConfig};

/// A bounded counter: `try_acquire` fails at the limit, the guard releases.
#[derive(Debug, Default)]
pub struct Gauge(AtomicUsize);

impl Gauge {
    pub fn try_acquire(self: &Arc<Self>, limit: usize) -> Option<GaugeGuard> {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            if cur >= limit {
                return None;
            }
            match self
                .0
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(GaugeGuard(self.clone())),
                Err(now) => cur = now,
            }
        }
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct GaugeGuard(Arc<Gauge>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a connection attempt needs from the service.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    pub timeout: Duration,
    pub mark: u32,
    pub max_connections: usize,
    pub max_pending: usize,
}

/// Why a request did not get a response from an endpoint.
#[derive(Debug)]
pub enum FailKind {
    /// No connection could be made; the request was not sent.
    Connect(io::Error),
    /// A limit refused a new connection; the request was not sent.
    Overflow(Limit),
    /// The HTTP exchange failed.
    Http(hyper::Error),
}

/// A failed send. `request` is the request itself when it was never
/// (even partly) sent, so it can go to another endpoint unchanged.
#[derive(Debug)]
pub struct SendFailure {
    pub kind: FailKind,
    pub request: Option<Request<Body>>,
}

/// The thread a task runs on, as a small number (see the module doc:
/// thread affinity).
fn thread_tag() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    thread_local! {
        static TAG: u32 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TAG.with(|t| *t)
}

/// An HTTP/1.1 connection and the thread its task runs on.
#[derive(Debug)]
struct H1 {
    sender: http1::SendRequest<Body>,
    tag: u32,
}

/// An idle pooled HTTP/1.1 connection.
#[derive(Debug)]
struct Idle {
    conn: H1,
    since: Instant,
}

/// Returns an HTTP/1.1 connection to its pool once its response is done.
#[derive(Debug)]
pub struct Checkin {
    pool: Arc<EndpointPool>,
    conn: H1,
}

impl Checkin {
    pub fn finish(self) {
        self.pool.checkin(self.conn);
    }
}

/// The connections of one endpoint.
#[derive(Debug)]
pub struct EndpointPool {
    addr: SocketAddr,
    http2: bool,
    idle_timeout: Duration,
    /// Oldest first (checked in in time order; taken from the back).
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    h2_connect: tokio::sync::Mutex<()>,
}

/// How long a pooled connection may take to become ready before it is
/// dropped in favour of another.
const READY_WAIT: Duration = Duration::from_millis(50);

/// Most idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

impl EndpointPool {
    fn new(addr: SocketAddr, http2: bool, idle_timeout: Duration) -> Self {
        EndpointPool {
            addr,
            http2,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_connect: tokio::sync::Mutex::new(()),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Idle HTTP/1.1 connections currently pooled.
    pub fn idle_len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn checkin(&self, conn: H1) {
        if conn.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Only when the oldest has expired (or the list is full) is the
        // whole list swept; closed ones are otherwise skipped at checkout.
        let stale = |i: &Idle| {
            i.conn.sender.is_closed() || now.saturating_duration_since(i.since) >= self.idle_timeout
        };
        if idle.first().is_some_and(stale) || idle.len() >= MAX_IDLE_PER_ENDPOINT {
            idle.retain(|i| !stale(i));
        }
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push(Idle { conn, since: now });
        }
    }

    /// The most recently used open idle connection of thread `tag` (any
    /// thread's with `None`); LIFO keeps the set of warm connections small.
    /// Closed and expired ones met on the way are dropped.
    fn checkout(&self, tag: Option<u32>) -> Option<H1> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let e = &idle[i];
            if e.conn.sender.is_closed()
                || now.saturating_duration_since(e.since) >= self.idle_timeout
            {
                idle.remove(i);
                continue;
            }
            if tag.is_none_or(|t| t == e.conn.tag) {
                return Some(idle.remove(i).conn);
            }
        }
        None
    }

    /// Sends `req` to this endpoint. HTTP/1.1 responses come with the
    /// [`Checkin`] to call once the body is done.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
        cs: &ConnectSettings,
        limits: &Limits,
    ) -> Result<(Response<Incoming>, Option<Checkin>), SendFailure> {
        if self.http2 {
            let existing = self
                .h2
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .filter(|s| !s.is_closed())
                .cloned();
            let mut sender = match existing {
                Some(s) => s,
                None => {
                    // One connect at a time per endpoint: concurrent first
                    // requests share the connection the first one makes.
                    let _connecting = self.h2_connect.lock().await;
                    let again = self
                        .h2
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .filter(|s| !s.is_closed())
                        .cloned();
                    match again {
                        Some(s) => s,
                        None => {
                            let s = match self.connect_h2(cs, limits).await {
                                Ok(s) => s,
                                Err(kind) => {
                                    return Err(SendFailure {
                                        kind,
                                        request: Some(req),
                                    })
                                }
                            };
                            *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.clone());
                            s
                        }
                    }
                }
            };
            return match sender.try_send_request(req).await {
                Ok(resp) => Ok((resp, None)),
                Err(mut e) => {
                    let request = e.take_message();
                    Err(SendFailure {
                        kind: FailKind::Http(e.into_error()),
                        request,
                    })
                }
            };
        }
        // HTTP/1.1: pooled connections of this thread first, then a new
        // one; another thread's only when no new one is allowed. One that
        // turns out not ready hands the request back and is dropped.
        let tag = thread_tag();
        let mut scope = Some(tag);
        loop {
            let Some(mut conn) = self.checkout(scope) else {
                if scope.is_some() && limits.connections.get() >= cs.max_connections {
                    scope = None;
                    continue;
                }
                break;
            };
            // A connection checked in the moment its response ended may not
            // have signalled readiness yet; an open idle one does so at once.
            // Polled once first: a ready one needs no timer.
            let now = std::future::poll_fn(|cx| conn.sender.poll_ready(cx)).now_or_never();
            let ready = match now {
                Some(r) => r.is_ok(),
                None => matches!(
                    tokio::time::timeout(READY_WAIT, conn.sender.ready()).await,
                    Ok(Ok(()))
                ),
            };
            if !ready {
                continue;
            }
            match conn.sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((
                        resp,
                        Some(Checkin {
                            pool: self.clone(),
                            conn,
                        }),
                    ));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => {
                        return Err(SendFailure {
                            kind: FailKind::Http(e.into_error()),
                            request: None,
                        })
                    }
                },
            }
        }
        let mut sender = match self.connect_h1(cs, limits, false).await {
            Ok(s) => s,
            Err(kind) => {
                return Err(SendFailure {
                    kind,
                    request: Some(req),
                })
            }
        };
        match sender.try_send_request(req).await {
            Ok(resp) => Ok((
                resp,
                Some(Checkin {
                    pool: self.clone(),
                    conn: H1 { sender, tag },
                }),
            )),
            Err(mut e) => {
                let request = e.take_message();
                Err(SendFailure {
                    kind: FailKind::Http(e.into_error()),
                    request,
                })
            }
        }
    }

    /// Sends an `Upgrade` or `CONNECT` request on a new HTTP/1.1 connection
    /// that is never pooled (it becomes the tunnel).
    pub async fn send_upgrade(
        self: &Arc<Self>,
        req: Request<Body>,
        cs: &ConnectSettings,
        limits: &Limits,
    ) -> Result<Response<Incoming>, SendFailure> {
        let mut sender = match self.connect_h1(cs, limits, true).await {
            Ok(s) => s,
            Err(kind) => {
                return Err(SendFailure {
                    kind,
                    request: Some(req),
                })
            }
        };
        sender.try_send_request(req).await.map_err(|mut e| {
            let request = e.take_message();
            SendFailure {
                kind: FailKind::Http(e.into_error()),
                request,
            }
        })
    }

    async fn tcp(
        &self,
        cs: &ConnectSettings,
        limits: &Limits,
    ) -> Result<(TokioIo<tokio::net::TcpStream>, GaugeGuard), FailKind> {
        let Some(_pending) = limits.pending.try_acquire(cs.max_pending) else {
            return Err(FailKind::Overflow(Limit::Pending));
        };
        let Some(conn_slot) = limits.connections.try_acquire(cs.max_connections) else {
            return Err(FailKind::Overflow(Limit::Connections));
        };
        let cfg = ConnectConfig {
            timeout: cs.timeout,
            attempts: 1,
            mark: cs.mark,
        };
        let stream = connect_one(self.addr, &cfg)
            .await
            .map_err(FailKind::Connect)?;
        let _ = stream.set_nodelay(true);
        Ok((TokioIo::new(stream), conn_slot))
    }

    async fn connect_h1(
        &self,
        cs: &ConnectSettings,
        limits: &Limits,
        upgrades: bool,
    ) -> Result<http1::SendRequest<Body>, FailKind> {
        let (io, slot) = self.tcp(cs, limits).await?;
        let (sender, conn) = http1::Builder::new()
            // Small messages: one flattened `write` instead of a `writev`
            // of head and body (see `L7::new`).
            .writev(false)
            .handshake(io)
            .await
            .map_err(FailKind::Http)?;
        let addr = self.addr;
        tokio::spawn(async move {
            let r = if upgrades {
                conn.with_upgrades().await
            } else {
                conn.await
            };
            if let Err(e) = r {
                tracing::debug!(endpoint = %addr, error = %e, "upstream connection ended");
            }
            drop(slot);
        });
        Ok(sender)
    }

    async fn connect_h2(
        &self,
        cs: &ConnectSettings,
        limits: &Limits,
    ) -> Result<http2::SendRequest<Body>, FailKind> {
        let (io, slot) = self.tcp(cs, limits).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(io)
            .await
            .map_err(FailKind::Http)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream h2 connection ended");
            }
            drop(slot);
        });
        Ok(sender)
    }
}

/// The service-wide counters behind the circuit-breaker limits.
#[derive(Debug, Default)]
pub struct Limits {
    pub requests: Arc<Gauge>,
    pub pending: Arc<Gauge>,
    pub connections: Arc<Gauge>,
    pub retries: Arc<Gauge>,
    /// Requests waiting in the fail-fast queue (see `super::queue`).
    pub queued: Arc<Gauge>,
}

/// The endpoint pools of one service port. Lookups are lock-free; a pool
/// is created under a writer lock the first time an endpoint is used.
#[derive(Debug)]
pub struct Pools {
    http2: bool,
    idle_timeout: Duration,
    map: ArcSwap<HashMap<SocketAddr, Arc<EndpointPool>>>,
    write: Mutex<()>,
}

impl Pools {
    pub fn new(http2: bool, idle_timeout: Duration) -> Self {
        Pools {
            http2,
            idle_timeout,
            map: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(()),
        }
    }

    pub fn get(&self, addr: SocketAddr) -> Arc<EndpointPool> {
        if let Some(p) = self.map.load().get(&addr) {
            return p.clone();
        }
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.map.load_full();
        if let Some(p) = cur.get(&addr) {
            return p.clone();
        }
        let p = Arc::new(EndpointPool::new(addr, self.http2, self.idle_timeout));
        let mut next = (*cur).clone();
        next.insert(addr, p.clone());
        self.map.store(Arc::new(next));
        p
    }

    /// Drops the pools (and so the idle connections) of endpoints that left.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.map.load_full();
        if cur.keys().all(&keep) {
            return;
        }
        let next: HashMap<_, _> = cur
            .iter()
            .filter(|(a, _)| keep(a))
            .map(|(a, p)| (*a, p.clone()))
            .collect();
        self.map.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    //! Thread affinity of pooled HTTP/1.1 connections, through real loopback
    //! sockets: each side runs its own current-thread runtime, as the data
    //! threads do.

    use super::*;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A runtime like a data thread's.
    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A keep-alive backend answering every request head with `ok`.
    fn backend() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let rt = current_thread();
            rt.block_on(async move {
                l.set_nonblocking(true).unwrap();
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                while let Ok((mut s, _)) = l.accept().await {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 4096];
                        let mut have = Vec::new();
                        loop {
                            let Ok(n) = s.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            have.extend_from_slice(&buf[..n]);
                            while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                                have.drain(..end + 4);
                                let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                                if s.write_all(r).await.is_err() {
                                    return;
                                }
                            }
                        }
                    });
                }
            });
        });
        addr
    }

    fn request() -> Request<Body> {
        let mut r = Request::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
        *r.uri_mut() = "/".parse().unwrap();
        r.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("b"));
        r
    }

    /// One request from the calling thread's runtime; the
    /// response body is read to the end and the connection checked in.
    async fn send_one(pool: &Arc<EndpointPool>, cs: &ConnectSettings, limits: &Limits) {
        let (resp, checkin) =
            tokio::time::timeout(Duration::from_secs(5), pool.send(request(), cs, limits))
                .await
                .expect("response within 5 s")
                .expect("response");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
        checkin.expect("HTTP/1.1 checkin").finish();
    }

    /// With `max-connections` 1 and the one connection idle in the pool but
    /// opened on another thread, a request must take that connection rather
    /// than be refused: affinity is a preference, never a limit.
    #[test]
    fn at_the_connection_limit_another_threads_idle_connection_is_used() {
        let addr = backend();
        let pool = Arc::new(EndpointPool::new(addr, false, Duration::from_secs(30)));
        let limits = Arc::new(Limits::default());
        let cs = ConnectSettings {
            timeout: Duration::from_secs(2),
            mark: 0,
            max_connections: 1,
            max_pending: 16,
        };
        // Thread A opens the connection and keeps its runtime (which drives
        // the connection's task) running until the test is done.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (opened_tx, opened_rx) = std::sync::mpsc::channel::<()>();
        let a = {
            let (pool, limits, cs) = (pool.clone(), limits.clone(), cs.clone());
            std::thread::spawn(move || {
                let rt = current_thread();
                rt.block_on(async move {
                    send_one(&pool, &cs, &limits).await;
                    opened_tx.send(()).unwrap();
                    // Keep driving the connection task until told to stop.
                    let wait = tokio::task::spawn_blocking(move || done_rx.recv());
                    let _ = wait.await;
                });
            })
        };
        opened_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("thread A got its response");
        assert_eq!(pool.idle_len(), 1);
        assert_eq!(limits.connections.get(), 1);
        // Thread B (this one): at the limit, so it borrows A's connection.
        let rt = current_thread();
        rt.block_on(send_one(&pool, &cs, &limits));
        assert_eq!(limits.connections.get(), 1, "no second connection opened");
        assert_eq!(pool.idle_len(), 1, "the borrowed connection went back");
        done_tx.send(()).unwrap();
        a.join().unwrap();
    }
}
