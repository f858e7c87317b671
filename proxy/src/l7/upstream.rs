//! Upstream HTTP connections, pooled per endpoint.
//!
//! Why a small pool of our own instead of hyper-util's legacy `Client`: the
//! retry logic must know whether a request was *sent*. Here connecting is a
//! separate step that never touches the request, and hyper's
//! `try_send_request` hands the request back when a pooled connection turned
//! out not to be usable, so a request that never left the proxy can always
//! be retried on another endpoint, whatever its method and body.
//!
//! * HTTP/1.1: a connection is not a task of its own. The pool keeps hyper's
//!   connection future together with its `SendRequest` ([`H1`]), and the
//!   request's own task drives it: polled while the request is sent and the
//!   response head awaited ([`EndpointPool::send`]), then by the response
//!   body as the client reads it (`super::body::Tracked`). Why: a spawned
//!   connection task costs every request a channel hop each way and two more
//!   task wake-ups (request to the connection task, response head and body
//!   chunks back), which was a measurable share of the proxy's CPU per
//!   request (BENCHMARKS.md, "L7 per-request cost").
//! * Idle connections are kept per endpoint for a short idle timeout. Nothing
//!   polls an idle connection, so before reuse it is polled once: one whose
//!   peer closed (or that is not ready for a request) is dropped and the
//!   next one (or a new one) is used. A connection goes back to the pool
//!   only once its response body was read to the end; one whose body is
//!   dropped early is closed.
//! * Thread affinity: a connection's socket is registered with the runtime
//!   of the data thread that opened it, so driving it from another thread
//!   costs cross-thread wake-ups (an eventfd write and an epoll wakeup each
//!   way). A request therefore takes an idle connection opened on its own
//!   thread, and opens one when there is none; another thread's idle
//!   connection is used only when `max-connections` allows no new one.
//! * A pool is per endpoint *and source*: where lightpath keeps the client's
//!   address as the upstream source (`crate::l4::Source`), each client
//!   address has pools of its own, since a connection carries one source.
//!   Those pools are forgotten once they hold no connection and no request
//!   uses them ([`Pools::sweep`]), so client churn does not grow the map.
//! * Upgrades and CONNECT get a connection of their own that runs in a
//!   spawned task (it becomes the tunnel and outlives the request).
//! * HTTP/2 (`Mode::H2c`): one multiplexed connection per endpoint and data
//!   thread ([`H2Slot`]), run by a task spawned on that thread, replaced
//!   when it closes. Why per thread, as Envoy keeps a pool per worker: a
//!   stream's request and response each cross from the request's task to
//!   the connection's task, and with one connection per endpoint, half the
//!   requests on two data threads made both crossings between threads (an
//!   eventfd write and an epoll wake-up each way), and every request took
//!   the one lock (BENCHMARKS.md, "Session 14"). At `max-connections`
//!   another thread's open connection is used rather than none. Once no
//!   request has started on a connection for the idle timeout, the sweep
//!   lets it go: the pool drops its handle, hyper sends GOAWAY and closes
//!   it when its last stream ends, and the next request opens a new one.
//!   Without it an HTTP/2 connection lived as long as the backend kept it,
//!   and every client address that ever used a kept-source pool held one
//!   open for good.
//! * Every connection counts against the service's `max-connections` for as
//!   long as it is open (pooled idle ones included: the slot lives in
//!   [`H1`]); every request waiting for a new connection counts against
//!   `max-pending-requests`.
//! * Idle connections are swept ([`Pools::sweep`], every second from the
//!   table sync task): expired ones, and ones whose peer closed them, are
//!   closed even when the service sees no more requests. Without it a quiet
//!   service kept its idle sockets open past the idle timeout, in
//!   CLOSE_WAIT once the backend closed its end, and holding their
//!   `max-connections` slots.
//! * An idle connection never makes a request fail: at the
//!   `max-connections` limit, the service's least recently used idle
//!   connection (of any endpoint) is closed to make room
//!   ([`Pools::reclaim`]). Without it, idle connections to an endpoint that
//!   outlier ejection keeps out of rotation held slots that requests to the
//!   healthy endpoints needed, and those got 503 "overflow".

use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
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
    /// For [`connect_one`]: timeout, mark, congestion control.
    pub connect: ConnectConfig,
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

impl SendFailure {
    /// No connection for `request`, which is handed back unsent.
    fn unsent(kind: FailKind, request: Request<Body>) -> Self {
        SendFailure {
            kind,
            request: Some(request),
        }
    }
}

impl From<TrySendError<Request<Body>>> for SendFailure {
    /// hyper's failed send: the request comes back when it never left.
    fn from(mut e: TrySendError<Request<Body>>) -> Self {
        let request = e.take_message();
        SendFailure {
            kind: FailKind::Http(e.into_error()),
            request,
        }
    }
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

/// The upstream socket as hyper sees it.
type Io = TokioIo<tokio::net::TcpStream>;

/// A pooled HTTP/1.1 connection: the request handle, the connection future
/// the request's task drives (see the module doc), the thread whose runtime
/// its socket is registered with, and its `max-connections` slot. Boxed
/// where it moves (pool, response body), so a move is a pointer copy.
pub struct H1 {
    sender: http1::SendRequest<Body>,
    conn: http1::Connection<Io, Body>,
    /// The waker the connection is polled with (see [`Gate`]).
    gate: Arc<Gate>,
    waker: Waker,
    tag: u32,
    _slot: GaugeGuard,
}

/// The waker a connection is always polled with: it passes a wake-up on to
/// the task driving the connection *now*, and drops it while nobody waits.
///
/// Why: hyper keeps the wakers it was last polled with (the request queue,
/// the response body channel's sender side), and some fire after the task
/// already has what it waited for: taking the last body chunk wakes the
/// connection "because there is room again". With the task's own waker that
/// is a spurious poll of the whole client connection per request; with a
/// spawned connection task it was a spurious poll of that task. The gate is
/// armed by each [`H1::drive`] and disarmed ([`H1::quiet`]) when the driver
/// got what it polled for, so those late wake-ups go nowhere. One allocation
/// per connection, none per request.
#[derive(Debug, Default)]
struct Gate(futures::task::AtomicWaker);

impl std::task::Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.0.wake();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake();
    }
}

impl std::fmt::Debug for H1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1").field("tag", &self.tag).finish()
    }
}

impl H1 {
    /// Drives the connection with the caller's waker. `Ready` means it has
    /// ended (closed or failed) and must be dropped.
    pub fn drive(&mut self, cx: &mut Context<'_>, addr: SocketAddr) -> Poll<()> {
        self.gate.0.register(cx.waker());
        let mut gated = Context::from_waker(&self.waker);
        match Pin::new(&mut self.conn).poll(&mut gated) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                if let Err(e) = r {
                    tracing::debug!(endpoint = %addr, error = %e, "upstream connection ended");
                }
                Poll::Ready(())
            }
        }
    }

    /// Polls the connection once without asking to be woken (nothing waits
    /// on an idle connection): lets it finish the last exchange and notice a
    /// peer that closed. Whether it can take a request now.
    fn settle(&mut self, addr: SocketAddr) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let open = self.drive(&mut cx, addr).is_pending();
        self.quiet();
        open && self.sender.is_ready()
    }

    /// The driver has what it polled for: later wake-ups from inside the
    /// connection are dropped until the next [`H1::drive`] (see [`Gate`]).
    pub fn quiet(&self) {
        drop(self.gate.0.take());
    }

    fn new(
        sender: http1::SendRequest<Body>,
        conn: http1::Connection<Io, Body>,
        tag: u32,
        slot: GaugeGuard,
    ) -> Box<H1> {
        let gate = Arc::new(Gate::default());
        Box::new(H1 {
            sender,
            conn,
            waker: Waker::from(gate.clone()),
            gate,
            tag,
            _slot: slot,
        })
    }
}

/// An idle pooled HTTP/1.1 connection.
#[derive(Debug)]
struct Idle {
    conn: Box<H1>,
    since: Instant,
}

/// An HTTP/1.1 connection in use by one response: driven by its body, and
/// returned to its pool once the body is done.
#[derive(Debug)]
pub struct Checkin {
    pool: Arc<EndpointPool>,
    conn: Box<H1>,
}

impl Checkin {
    /// Drives the connection (see [`H1::drive`]).
    pub fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.conn.drive(cx, self.pool.addr)
    }

    /// See [`H1::quiet`].
    pub fn quiet(&self) {
        self.conn.quiet();
    }

    /// The response is done: the connection goes back to the pool if it is
    /// still open and ready for another request, and is closed otherwise.
    /// The poll that read the end of the body usually left it ready (hyper
    /// asks for the next request as soon as it is idle); only when it did
    /// not is it polled once more. A peer that closes it meanwhile is
    /// noticed at checkout.
    pub fn finish(mut self) {
        self.conn.quiet();
        if self.conn.sender.is_ready() || self.conn.settle(self.pool.addr) {
            self.pool.checkin(self.conn);
        }
    }
}

/// The connections of one endpoint.
#[derive(Debug)]
pub struct EndpointPool {
    addr: SocketAddr,
    /// The source its connections come from; `None`: the node's own.
    source: Option<IpAddr>,
    idle_timeout: Duration,
    /// Idle connections by the thread that opened them (see [`Shard`]).
    idle: [Shard; SHARDS],
    /// HTTP/2 connections by the thread that opened them; empty: an
    /// HTTP/1.1 pool. A slot is made when its thread first sends to the
    /// endpoint, so an endpoint only some threads use costs a pointer per
    /// other CPU, not a cache line.
    h2: Box<[OnceLock<Box<H2Slot>>]>,
}

/// An HTTP/2 connection, and when a request last started on it (set under
/// the lock each request takes anyway).
#[derive(Debug)]
struct H2 {
    sender: http2::SendRequest<Body>,
    used: Instant,
}

/// The HTTP/2 connection of the data threads whose tag is `i` modulo the
/// number of slots ([`h2_slots`]: one per CPU, so one per data thread as
/// `lightpath run` starts them), and the lock that lets one connect at a
/// time. Allocated alone on a cache line of its own, as [`Shard`] is kept.
#[derive(Debug, Default)]
#[repr(align(128))]
struct H2Slot {
    conn: Mutex<Option<H2>>,
    connect: tokio::sync::Mutex<()>,
}

impl H2Slot {
    /// Its connection, if it has one that is still open, marked as used now.
    fn open(&self) -> Option<http2::SendRequest<Body>> {
        let mut h2 = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let c = h2.as_mut().filter(|c| !c.sender.is_closed())?;
        c.used = Instant::now();
        Some(c.sender.clone())
    }
}

/// HTTP/2 slots per endpoint: the CPUs lightpath may run on, which is how
/// many data threads it starts unless told otherwise.
fn h2_slots() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The idle connections of the threads whose tag is `i` modulo [`SHARDS`],
/// oldest first (checked in in time order; taken from the back).
///
/// Why per thread: a request checks a connection out and back in under this
/// lock, on every request. With one list per endpoint, both data threads
/// took the same mutex, and its cache line moved between the cores twice
/// per request. A thread now only locks its own list (on a cache line of its
/// own), except when it borrows another thread's connection at the
/// `max-connections` limit.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(Mutex<Vec<Idle>>);

/// Idle lists per endpoint: one per data thread on machines with up to this
/// many (threads beyond share lists; a connection keeps its thread's tag).
const SHARDS: usize = 4;

/// Most idle HTTP/1.1 connections kept per endpoint and list.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

impl EndpointPool {
    /// A pool with `h2_slots` HTTP/2 connection slots; with 0, an HTTP/1.1
    /// pool.
    fn new(
        addr: SocketAddr,
        source: Option<IpAddr>,
        h2_slots: usize,
        idle_timeout: Duration,
    ) -> Self {
        EndpointPool {
            addr,
            source,
            idle_timeout,
            idle: Default::default(),
            h2: (0..h2_slots).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Nothing uses this pool: no idle or HTTP/2 connection, and no
    /// reference but the one this is called through (the map's).
    fn is_unused(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) == 1
            && self.idle_len() == 0
            && self
                .h2_made()
                .all(|s| s.conn.lock().unwrap_or_else(|e| e.into_inner()).is_none())
    }

    /// The HTTP/2 slots made so far.
    fn h2_made(&self) -> impl Iterator<Item = &H2Slot> {
        self.h2.iter().filter_map(|s| s.get().map(|b| &**b))
    }

    /// Idle HTTP/1.1 connections currently pooled.
    pub fn idle_len(&self) -> usize {
        self.idle
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// The idle list of thread `tag`.
    fn shard(&self, tag: u32) -> &Mutex<Vec<Idle>> {
        &self.idle[tag as usize % SHARDS].0
    }

    /// Pools a connection that [`H1::settle`] found ready.
    fn checkin(&self, conn: Box<H1>) {
        let now = Instant::now();
        let mut idle = self
            .shard(conn.tag)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Only when the oldest has expired (or the list is full) is the
        // whole list swept; closed ones are otherwise dropped at checkout.
        let stale = |i: &Idle| now.saturating_duration_since(i.since) >= self.idle_timeout;
        if idle.first().is_some_and(stale) || idle.len() >= MAX_IDLE_PER_ENDPOINT {
            idle.retain(|i| !stale(i));
        }
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push(Idle { conn, since: now });
        }
    }

    /// The most recently used unexpired idle connection of thread `tag` (any
    /// thread's with `None`); LIFO keeps the set of warm connections small.
    /// Expired ones met on the way are dropped; whether the one returned is
    /// still open is for the caller to check ([`H1::settle`], outside the
    /// lock).
    fn checkout(&self, tag: Option<u32>) -> Option<Box<H1>> {
        let now = Instant::now();
        match tag {
            Some(t) => self.checkout_from(self.shard(t), tag, now),
            None => self
                .idle
                .iter()
                .find_map(|s| self.checkout_from(&s.0, None, now)),
        }
    }

    fn checkout_from(
        &self,
        list: &Mutex<Vec<Idle>>,
        tag: Option<u32>,
        now: Instant,
    ) -> Option<Box<H1>> {
        let mut idle = list.lock().unwrap_or_else(|e| e.into_inner());
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let e = &idle[i];
            if now.saturating_duration_since(e.since) >= self.idle_timeout {
                idle.remove(i);
                continue;
            }
            if tag.is_none_or(|t| t == e.conn.tag) {
                return Some(idle.remove(i).conn);
            }
        }
        None
    }

    /// Takes out of the idle lists the connections that expired, that their
    /// peer closed, or that cannot take a request (each polled once, without
    /// a waker, as at checkout); and the HTTP/2 connection, if it closed or
    /// no request started on it for the idle timeout. The caller drops them
    /// outside the locks.
    fn sweep_into(&self, now: Instant, out: &mut Vec<Idle>, h2_out: &mut Vec<H2>) {
        for slot in self.h2_made() {
            let mut h2 = slot.conn.lock().unwrap_or_else(|e| e.into_inner());
            if h2.as_ref().is_some_and(|c| {
                c.sender.is_closed() || now.saturating_duration_since(c.used) >= self.idle_timeout
            }) {
                h2_out.extend(h2.take());
            }
        }
        for shard in &self.idle {
            let mut idle = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            if idle.is_empty() {
                continue;
            }
            let gone = idle.extract_if(.., |i| {
                now.saturating_duration_since(i.since) >= self.idle_timeout
                    || !i.conn.settle(self.addr)
            });
            out.extend(gone);
        }
    }

    /// When this endpoint's least recently used idle connection was pooled,
    /// and its list.
    fn oldest_idle(&self) -> Option<(Instant, &Mutex<Vec<Idle>>)> {
        self.idle
            .iter()
            .filter_map(|s| {
                let since = s.0.lock().unwrap_or_else(|e| e.into_inner()).first()?.since;
                Some((since, &s.0))
            })
            .min_by_key(|(since, _)| *since)
    }

    /// Sends `req` to this endpoint. HTTP/1.1 responses come with the
    /// [`Checkin`] that the response body drives and finishes.
    /// `pools` are the service's (this one among them): at the
    /// `max-connections` limit an idle connection of theirs makes room.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
        cs: &ConnectSettings,
        limits: &Limits,
        pools: &Pools,
    ) -> Result<(Response<Incoming>, Option<Checkin>), SendFailure> {
        if !self.h2.is_empty() {
            return self.send_h2(req, cs, limits, pools).await;
        }
        // HTTP/1.1: pooled connections of this thread first, then a new
        // one; another thread's only when no new one is allowed. One that
        // turns out closed or not ready is dropped; one that fails before
        // the request left hands it back.
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
            if !conn.settle(self.addr) {
                continue;
            }
            match self.exchange(conn, req).await.map_err(SendFailure::from) {
                Ok(r) => return Ok(r),
                Err(SendFailure {
                    request: Some(r), ..
                }) => req = r,
                Err(sent) => return Err(sent),
            }
        }
        let conn = match self.connect_h1(cs, limits, pools, tag).await {
            Ok(c) => c,
            Err(kind) => return Err(SendFailure::unsent(kind, req)),
        };
        Ok(self.exchange(conn, req).await?)
    }

    /// One HTTP/1.1 request on `conn`, driven in this task up to the response
    /// head. The connection comes back with the response unless it ended.
    async fn exchange(
        self: &Arc<Self>,
        mut conn: Box<H1>,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, Option<Checkin>), TrySendError<Request<Body>>> {
        let mut response = std::pin::pin!(conn.sender.try_send_request(req));
        let mut open = Some(conn);
        let addr = self.addr;
        let result = std::future::poll_fn(|cx| {
            if let Some(c) = open.as_mut() {
                if c.drive(cx, addr).is_ready() {
                    // Dropping the connection hands a request it never
                    // started back through the response future.
                    open = None;
                }
            }
            // While the connection is open, only driving it can complete
            // the response future, and the connection wakes this task: no
            // second waker (it would wake the task from its own poll).
            match open {
                Some(_) => response
                    .as_mut()
                    .poll(&mut Context::from_waker(Waker::noop())),
                None => response.as_mut().poll(cx),
            }
        })
        .await;
        if let Some(c) = open.as_ref() {
            c.quiet();
        }
        let result = result?;
        let checkin = open.map(|conn| Checkin {
            pool: self.clone(),
            conn,
        });
        Ok((result, checkin))
    }

    /// Any thread's open HTTP/2 connection to this endpoint, marked as used.
    fn open_h2_any(&self) -> Option<http2::SendRequest<Body>> {
        self.h2_made().find_map(H2Slot::open)
    }

    /// The HTTP/2 connection of this thread's slot, opened if there is none
    /// (one connect at a time per slot: concurrent first requests share the
    /// connection the first one makes). At `max-connections`, another
    /// thread's open connection, if there is one.
    async fn h2_sender(
        &self,
        cs: &ConnectSettings,
        limits: &Limits,
        pools: &Pools,
    ) -> Result<http2::SendRequest<Body>, FailKind> {
        let slot = self.h2[thread_tag() as usize % self.h2.len()].get_or_init(Box::default);
        if let Some(s) = slot.open() {
            return Ok(s);
        }
        let _connecting = slot.connect.lock().await;
        if let Some(s) = slot.open() {
            return Ok(s);
        }
        if limits.connections.get() >= cs.max_connections {
            if let Some(s) = self.open_h2_any() {
                return Ok(s);
            }
        }
        match self.connect_h2(cs, limits, pools).await {
            Ok(s) => {
                *slot.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(H2 {
                    sender: s.clone(),
                    used: Instant::now(),
                });
                Ok(s)
            }
            // Another thread's connection may have taken the last slot
            // since the check above.
            Err(FailKind::Overflow(Limit::Connections)) => self
                .open_h2_any()
                .ok_or(FailKind::Overflow(Limit::Connections)),
            Err(kind) => Err(kind),
        }
    }

    async fn send_h2(
        self: &Arc<Self>,
        req: Request<Body>,
        cs: &ConnectSettings,
        limits: &Limits,
        pools: &Pools,
    ) -> Result<(Response<Incoming>, Option<Checkin>), SendFailure> {
        let mut sender = match self.h2_sender(cs, limits, pools).await {
            Ok(s) => s,
            Err(kind) => return Err(SendFailure::unsent(kind, req)),
        };
        Ok((sender.try_send_request(req).await?, None))
    }

    /// Sends an `Upgrade` or `CONNECT` request on a new HTTP/1.1 connection
    /// that is never pooled (it becomes the tunnel, so it runs in a task of
    /// its own and outlives the request).
    pub async fn send_upgrade(
        self: &Arc<Self>,
        req: Request<Body>,
        cs: &ConnectSettings,
        limits: &Limits,
        pools: &Pools,
    ) -> Result<Response<Incoming>, SendFailure> {
        let mut sender = match self.connect_upgrade(cs, limits, pools).await {
            Ok(s) => s,
            Err(kind) => return Err(SendFailure::unsent(kind, req)),
        };
        Ok(sender.try_send_request(req).await?)
    }

    async fn tcp(
        &self,
        cs: &ConnectSettings,
        limits: &Limits,
        pools: &Pools,
    ) -> Result<(Io, GaugeGuard), FailKind> {
        let Some(_pending) = limits.pending.try_acquire(cs.max_pending) else {
            return Err(FailKind::Overflow(Limit::Pending));
        };
        let conn_slot = match limits.connections.try_acquire(cs.max_connections) {
            Some(slot) => slot,
            // At the limit an idle connection makes room (see the module
            // doc); another request may take the freed slot first.
            None if pools.reclaim() => limits
                .connections
                .try_acquire(cs.max_connections)
                .ok_or(FailKind::Overflow(Limit::Connections))?,
            None => return Err(FailKind::Overflow(Limit::Connections)),
        };
        // `connect_one` (not `attempt`): pooled connections live long, so
        // they get TCP keepalive at once. TCP_NODELAY is set before the
        // connect (`redirect::sockopt::upstream_connect`).
        let stream = connect_one(self.addr, self.source, &cs.connect)
            .await
            .map_err(FailKind::Connect)?;
        Ok((TokioIo::new(stream), conn_slot))
    }

    fn h1_builder() -> http1::Builder {
        let mut b = http1::Builder::new();
        // Small messages: one flattened `write` instead of a `writev` of
        // head and body (see `L7::new`).
        b.writev(false);
        b
    }

    /// A new pooled HTTP/1.1 connection, opened on thread `tag`, driven by
    /// whoever uses it (no task of its own).
    async fn connect_h1(
        &self,
        cs: &ConnectSettings,
        limits: &Limits,
        pools: &Pools,
        tag: u32,
    ) -> Result<Box<H1>, FailKind> {
        let (io, slot) = self.tcp(cs, limits, pools).await?;
        let (sender, conn) = Self::h1_builder()
            .handshake(io)
            .await
            .map_err(FailKind::Http)?;
        Ok(H1::new(sender, conn, tag, slot))
    }

    /// A new HTTP/1.1 connection for an upgrade, run by a task of its own.
    async fn connect_upgrade(
        &self,
        cs: &ConnectSettings,
        limits: &Limits,
        pools: &Pools,
    ) -> Result<http1::SendRequest<Body>, FailKind> {
        let (io, slot) = self.tcp(cs, limits, pools).await?;
        let (sender, conn) = Self::h1_builder()
            .handshake(io)
            .await
            .map_err(FailKind::Http)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
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
        pools: &Pools,
    ) -> Result<http2::SendRequest<Body>, FailKind> {
        let (io, slot) = self.tcp(cs, limits, pools).await?;
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

/// A pool's key: the endpoint, and the source its connections come from
/// (`None`: the node's own).
type PoolKey = (SocketAddr, Option<IpAddr>);

/// The endpoint pools of one service port. Lookups are lock-free; a pool
/// is created under a writer lock the first time an endpoint is used from
/// a source.
#[derive(Debug)]
pub struct Pools {
    /// HTTP/2 slots per endpoint pool; 0 for HTTP/1.1.
    h2_slots: usize,
    idle_timeout: Duration,
    map: ArcSwap<HashMap<PoolKey, Arc<EndpointPool>>>,
    write: Mutex<()>,
}

impl Pools {
    pub fn new(http2: bool, idle_timeout: Duration) -> Self {
        Self::with_h2_slots(if http2 { h2_slots() } else { 0 }, idle_timeout)
    }

    /// Pools whose endpoints have `h2_slots` HTTP/2 connection slots (0:
    /// HTTP/1.1). Tests choose the number, so that two threads' tags fall
    /// into different slots whatever tags they were given.
    fn with_h2_slots(h2_slots: usize, idle_timeout: Duration) -> Self {
        Pools {
            h2_slots,
            idle_timeout,
            map: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(()),
        }
    }

    /// The pool of connections to `addr` from `source` (`None`: the
    /// node's address).
    pub fn get(&self, addr: SocketAddr, source: Option<IpAddr>) -> Arc<EndpointPool> {
        let key = (addr, source);
        if let Some(p) = self.map.load().get(&key) {
            return p.clone();
        }
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.map.load_full();
        if let Some(p) = cur.get(&key) {
            return p.clone();
        }
        let p = Arc::new(EndpointPool::new(
            addr,
            source,
            self.h2_slots,
            self.idle_timeout,
        ));
        let mut next = (*cur).clone();
        next.insert(key, p.clone());
        self.map.store(Arc::new(next));
        p
    }

    /// Drops the pools (and so the idle connections) of endpoints that left,
    /// from every source.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.retain_pools(|(addr, _), _| keep(addr));
    }

    /// Keeps the pools `keep` says yes to (under the writer lock).
    fn retain_pools(&self, keep: impl Fn(&PoolKey, &Arc<EndpointPool>) -> bool) {
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.map.load_full();
        if cur.iter().all(|(k, p)| keep(k, p)) {
            return;
        }
        let next: HashMap<_, _> = cur
            .iter()
            .filter(|(k, p)| keep(k, p))
            .map(|(k, p)| (*k, p.clone()))
            .collect();
        self.map.store(Arc::new(next));
    }

    /// Closes the idle connections of every endpoint that expired, that
    /// their peer closed, or that cannot take a request, and lets idle
    /// HTTP/2 connections go (see the module doc). How many. Then
    /// forgets the client-source pools left unused: no idle connection, no
    /// HTTP/2 connection, and no reference but the map's (a request or a
    /// connection in use holds one).
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let (mut gone, mut gone_h2) = (Vec::new(), Vec::new());
        let mut unused = false;
        for pool in self.map.load().values() {
            pool.sweep_into(now, &mut gone, &mut gone_h2);
            unused |= pool.source.is_some() && pool.is_unused();
        }
        let n = gone.len() + gone_h2.len();
        drop(gone);
        drop(gone_h2);
        if n > 0 {
            tracing::debug!(closed = n, "idle upstream connections swept");
        }
        if unused {
            self.retain_pools(|(_, source), p| source.is_none() || !p.is_unused());
        }
        n
    }

    /// Pools in the map (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.load().len()
    }

    /// At the `max-connections` limit: frees a slot by closing idle
    /// connections, the expired and closed ones first, otherwise the one
    /// unused the longest (of any endpoint). Whether one was closed.
    pub fn reclaim(&self) -> bool {
        if self.sweep() > 0 {
            return true;
        }
        let map = self.map.load();
        let Some((_, list)) = map
            .values()
            .filter_map(|p| p.oldest_idle())
            .min_by_key(|(since, _)| *since)
        else {
            return false;
        };
        let mut idle = list.lock().unwrap_or_else(|e| e.into_inner());
        if idle.is_empty() {
            return false;
        }
        let oldest = idle.remove(0);
        drop(idle);
        drop(oldest);
        true
    }
}

#[cfg(test)]
mod tests {
    //! Pooled HTTP/1.1 connections driven by the request, through real
    //! loopback sockets: each side runs its own current-thread runtime, as
    //! the data threads do.

    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Body as _;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn unused_client_source_pools_are_forgotten_by_the_sweep() {
        let pools = Pools::new(false, Duration::from_secs(4));
        let ep: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let held = pools.get(ep, Some("10.0.1.2".parse().unwrap()));
        drop(pools.get(ep, Some("10.0.1.3".parse().unwrap())));
        drop(pools.get(ep, None));
        assert_eq!(pools.len(), 3);
        pools.sweep();
        // In use (a request holds it): kept. Unused: forgotten. The
        // node-source pool: kept (one per endpoint, bounded by the table).
        assert_eq!(pools.len(), 2);
        assert!(Arc::ptr_eq(
            &held,
            &pools.get(ep, Some("10.0.1.2".parse().unwrap()))
        ));
        drop(held);
        pools.sweep();
        assert_eq!(pools.len(), 1);
        // Asked again, a client's pool is made again.
        drop(pools.get(ep, Some("10.0.1.3".parse().unwrap())));
        assert_eq!(pools.len(), 2);
    }

    /// A runtime like a data thread's.
    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// How the test backend answers each request head.
    #[derive(Clone, Copy, PartialEq)]
    enum Reply {
        /// `ok`, keep-alive.
        Ok,
        /// `ok`, then the backend closes the connection 30 ms later (no
        /// `Connection: close`: the proxy learns it from the FIN).
        OkThenClose,
        /// A 1 MB body of which only 1 KiB is sent; then it waits for the
        /// proxy to close.
        Half,
    }

    struct Backend {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        /// Connections the proxy closed (the backend read EOF).
        peer_closed: Arc<AtomicUsize>,
    }

    fn backend(reply: Reply) -> Backend {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let peer_closed = Arc::new(AtomicUsize::new(0));
        let (acc, closed) = (accepted.clone(), peer_closed.clone());
        std::thread::spawn(move || {
            let rt = current_thread();
            rt.block_on(async move {
                l.set_nonblocking(true).unwrap();
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                while let Ok((mut s, _)) = l.accept().await {
                    acc.fetch_add(1, Ordering::SeqCst);
                    let closed = closed.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 4096];
                        let mut have = Vec::new();
                        loop {
                            let n = match s.read(&mut buf).await {
                                Ok(0) | Err(_) => {
                                    closed.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                                Ok(n) => n,
                            };
                            have.extend_from_slice(&buf[..n]);
                            while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                                have.drain(..end + 4);
                                let r: Vec<u8> = match reply {
                                    Reply::Ok | Reply::OkThenClose => {
                                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
                                    }
                                    Reply::Half => {
                                        let mut r =
                                            b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n"
                                                .to_vec();
                                        r.extend_from_slice(&[b'x'; 1024]);
                                        r
                                    }
                                };
                                if s.write_all(&r).await.is_err() {
                                    return;
                                }
                                if reply == Reply::OkThenClose {
                                    // Once the proxy has pooled the connection.
                                    tokio::time::sleep(Duration::from_millis(30)).await;
                                    return;
                                }
                            }
                        }
                    });
                }
            });
        });
        Backend {
            addr,
            accepted,
            peer_closed,
        }
    }

    fn request() -> Request<Body> {
        let mut r = Request::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
        *r.uri_mut() = "/".parse().unwrap();
        r.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("b"));
        r
    }

    /// What a service's requests share: its endpoints' pools, its limits
    /// and its connect settings (as `super::super::Shared` holds them).
    struct Svc {
        pools: Pools,
        limits: Limits,
        cs: ConnectSettings,
    }

    impl Svc {
        /// HTTP/1.1 pools whose idle connections expire after
        /// `idle_timeout`, and settings allowing `max_connections`.
        fn new(idle_timeout: Duration, max_connections: usize) -> Arc<Svc> {
            Self::with(Pools::new(false, idle_timeout), max_connections)
        }

        /// A service with `pools`, allowing `max_connections`.
        fn with(pools: Pools, max_connections: usize) -> Arc<Svc> {
            Arc::new(Svc {
                pools,
                limits: Limits::default(),
                cs: ConnectSettings {
                    connect: ConnectConfig {
                        timeout: Duration::from_secs(2),
                        attempts: 1,
                        ..ConnectConfig::default()
                    },
                    max_connections,
                    max_pending: 16,
                },
            })
        }

        async fn send(
            &self,
            pool: &Arc<EndpointPool>,
        ) -> Result<(Response<Incoming>, Option<Checkin>), SendFailure> {
            pool.send(request(), &self.cs, &self.limits, &self.pools)
                .await
        }

        fn connections(&self) -> usize {
            self.limits.connections.get()
        }
    }

    /// A backend answering with `reply`, its pool, and a service whose idle
    /// connections outlive any test, allowing `max_connections`.
    fn fixture(reply: Reply, max_connections: usize) -> (Backend, Arc<EndpointPool>, Arc<Svc>) {
        let b = backend(reply);
        let svc = Svc::new(Duration::from_secs(30), max_connections);
        let pool = svc.pools.get(b.addr, None);
        (b, pool, svc)
    }

    /// The next frame of `body`, driving its connection as
    /// `super::super::body::Tracked` does.
    async fn next_frame(body: &mut Incoming, checkin: &mut Option<Checkin>) -> Option<Bytes> {
        let f = std::future::poll_fn(|cx| {
            if let Poll::Ready(f) = Pin::new(&mut *body).poll_frame(cx) {
                return Poll::Ready(f);
            }
            if let Some(c) = checkin.as_mut() {
                if c.drive(cx).is_ready() {
                    *checkin = None;
                }
            }
            Pin::new(&mut *body).poll_frame(cx)
        });
        let f = tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("a body frame within 5 s")?;
        f.expect("body frame").into_data().ok()
    }

    /// One request from the calling thread's runtime; the response body is
    /// read to the end and the connection checked in.
    async fn send_one(pool: &Arc<EndpointPool>, svc: &Svc) {
        let (resp, mut checkin) = tokio::time::timeout(Duration::from_secs(5), svc.send(pool))
            .await
            .expect("response within 5 s")
            .expect("response");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while !body.is_end_stream() {
            let Some(b) = next_frame(&mut body, &mut checkin).await else {
                break;
            };
            got.extend_from_slice(&b);
        }
        assert_eq!(&got[..], b"ok");
        checkin.expect("HTTP/1.1 checkin").finish();
    }

    /// Sequential keep-alive requests go out on one connection: the one
    /// poll at check-in leaves it ready for the next request.
    #[test]
    fn sequential_requests_reuse_one_connection() {
        let (b, pool, svc) = fixture(Reply::Ok, 16);
        current_thread().block_on(async {
            for _ in 0..20 {
                send_one(&pool, &svc).await;
            }
        });
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_len(), 1);
    }

    /// A pooled connection the backend closed while idle is dropped at
    /// checkout (nothing polled it meanwhile), and the request goes out on
    /// a fresh connection without an error.
    #[test]
    fn an_idle_connection_the_backend_closed_is_replaced() {
        let (b, pool, svc) = fixture(Reply::OkThenClose, 16);
        current_thread().block_on(async {
            for round in 1..=3 {
                send_one(&pool, &svc).await;
                assert_eq!(pool.idle_len(), 1, "round {round}: pooled");
                // The backend closes 30 ms after its response.
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        assert_eq!(b.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(svc.connections(), 1, "the closed ones released their slots");
    }

    /// A response whose body is dropped half-way does not go back to the
    /// pool: its connection is closed and its `max-connections` slot freed.
    #[test]
    fn a_body_dropped_half_way_closes_its_connection() {
        let (b, pool, svc) = fixture(Reply::Half, 16);
        current_thread().block_on(async {
            let (resp, mut checkin) = svc.send(&pool).await.expect("response");
            let mut body = resp.into_body();
            let first = next_frame(&mut body, &mut checkin).await.expect("a chunk");
            assert!(!first.is_empty());
            assert!(!body.is_end_stream());
            assert_eq!(svc.connections(), 1);
            drop(body);
            drop(checkin);
            assert_eq!(pool.idle_len(), 0);
            assert_eq!(svc.connections(), 0);
            let deadline = Instant::now() + Duration::from_secs(5);
            while b.peer_closed.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert_eq!(
            b.peer_closed.load(Ordering::SeqCst),
            1,
            "the backend saw the close"
        );
    }

    /// `max-connections` counts connections in use and idle pooled ones: at
    /// a limit of 1, a second request while the first response is still
    /// streaming is refused; once that connection is back in the pool, the
    /// next request takes it.
    #[test]
    fn max_connections_counts_pooled_connections() {
        let (b, pool, svc) = fixture(Reply::Ok, 1);
        current_thread().block_on(async {
            let (resp, checkin) = svc.send(&pool).await.expect("response");
            let refused = svc.send(&pool).await;
            match refused {
                Err(SendFailure {
                    kind: FailKind::Overflow(Limit::Connections),
                    request: Some(_),
                }) => {}
                other => panic!("expected a connections overflow, got {other:?}"),
            }
            let mut checkin = checkin;
            let mut body = resp.into_body();
            while !body.is_end_stream() {
                if next_frame(&mut body, &mut checkin).await.is_none() {
                    break;
                }
            }
            checkin.expect("checkin").finish();
            assert_eq!(pool.idle_len(), 1);
            assert_eq!(svc.connections(), 1, "the idle pooled one counts");
            send_one(&pool, &svc).await;
        });
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    }

    /// With `max-connections` 1 and the one connection idle in the pool but
    /// opened on another thread, a request must take that connection rather
    /// than be refused: affinity is a preference, never a limit.
    #[test]
    fn at_the_connection_limit_another_threads_idle_connection_is_used() {
        let (b, pool, svc) = fixture(Reply::Ok, 1);
        // Thread A opens the connection and keeps its runtime (whose I/O
        // driver the connection's socket is registered with) running until
        // the test is done.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (opened_tx, opened_rx) = std::sync::mpsc::channel::<()>();
        let a = {
            let (pool, svc) = (pool.clone(), svc.clone());
            std::thread::spawn(move || {
                let rt = current_thread();
                rt.block_on(async move {
                    send_one(&pool, &svc).await;
                    opened_tx.send(()).unwrap();
                    let wait = tokio::task::spawn_blocking(move || done_rx.recv());
                    let _ = wait.await;
                });
            })
        };
        opened_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("thread A got its response");
        assert_eq!(pool.idle_len(), 1);
        assert_eq!(svc.connections(), 1);
        // Thread B (this one): at the limit, so it borrows A's connection.
        let rt = current_thread();
        rt.block_on(send_one(&pool, &svc));
        assert_eq!(svc.connections(), 1, "no second connection opened");
        assert_eq!(pool.idle_len(), 1, "the borrowed connection went back");
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
        done_tx.send(()).unwrap();
        a.join().unwrap();
    }

    /// An h2c backend whose every response body is the number of the
    /// connection it came on (1, 2, ...).
    fn h2_backend() -> Backend {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = accepted.clone();
        std::thread::spawn(move || {
            current_thread().block_on(async move {
                l.set_nonblocking(true).unwrap();
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                while let Ok((s, _)) = l.accept().await {
                    let n = acc.fetch_add(1, Ordering::SeqCst) + 1;
                    let svc = hyper::service::service_fn(move |_req| async move {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from(n.to_string()),
                        )))
                    });
                    tokio::spawn(
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(s), svc),
                    );
                }
            });
        });
        Backend {
            addr,
            accepted,
            peer_closed: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A backend for h2c, its pool, and a service allowing
    /// `max_connections` whose pools have more HTTP/2 slots than the test
    /// process has threads, so that each thread has a slot of its own.
    fn h2_fixture(max_connections: usize) -> (Backend, Arc<EndpointPool>, Arc<Svc>) {
        let b = h2_backend();
        let svc = Svc::with(
            Pools::with_h2_slots(1024, Duration::from_secs(30)),
            max_connections,
        );
        let pool = svc.pools.get(b.addr, None);
        (b, pool, svc)
    }

    /// One HTTP/2 request from the calling thread's runtime: the number of
    /// the backend connection that answered it.
    async fn send_h2_one(pool: &Arc<EndpointPool>, svc: &Svc) -> String {
        let mut req = request();
        *req.uri_mut() = "http://b/".parse().unwrap();
        let sent = pool.send(req, &svc.cs, &svc.limits, &svc.pools);
        let (resp, checkin) = tokio::time::timeout(Duration::from_secs(5), sent)
            .await
            .expect("response within 5 s")
            .expect("response");
        assert!(checkin.is_none(), "HTTP/2 connections are not checked in");
        let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
            .await
            .expect("body within 5 s")
            .expect("body")
            .to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Thread A sends `n` HTTP/2 requests on its own runtime and reports
    /// the connections that answered, then keeps its runtime (which runs
    /// its connection's task) until `done` is sent.
    fn h2_thread(
        pool: &Arc<EndpointPool>,
        svc: &Arc<Svc>,
        n: usize,
    ) -> (
        std::thread::JoinHandle<()>,
        Vec<String>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (got_tx, got_rx) = std::sync::mpsc::channel::<Vec<String>>();
        let (pool, svc) = (pool.clone(), svc.clone());
        let a = std::thread::spawn(move || {
            current_thread().block_on(async move {
                let mut got = Vec::new();
                for _ in 0..n {
                    got.push(send_h2_one(&pool, &svc).await);
                }
                got_tx.send(got).unwrap();
                let wait = tokio::task::spawn_blocking(move || done_rx.recv());
                let _ = wait.await;
            });
        });
        let got = got_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("thread A got its responses");
        (a, got, done_tx)
    }

    /// Each thread sends its HTTP/2 requests on a connection of its own
    /// (one per endpoint and thread), opened once and reused, so no
    /// request crosses to another thread's runtime.
    #[test]
    fn each_thread_has_its_own_http2_connection() {
        let (b, pool, svc) = h2_fixture(16);
        let (a, on_a, done) = h2_thread(&pool, &svc, 3);
        // Thread B (this one) keeps its runtime, and so its connection's
        // task, until the counts are checked.
        let rt = current_thread();
        let on_b: Vec<String> = rt.block_on(async {
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(send_h2_one(&pool, &svc).await);
            }
            got
        });
        assert!(on_a.iter().all(|c| *c == on_a[0]), "thread A: {on_a:?}");
        assert!(on_b.iter().all(|c| *c == on_b[0]), "thread B: {on_b:?}");
        assert_ne!(on_a[0], on_b[0], "one connection per thread");
        assert_eq!(
            pool.h2_made().count(),
            2,
            "slots only for the threads that sent"
        );
        assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(svc.connections(), 2);
        done.send(()).unwrap();
        a.join().unwrap();
    }

    /// With `max-connections` 1 and thread A's HTTP/2 connection holding
    /// the slot, thread B's request goes out on A's connection rather than
    /// being refused: per-thread connections are a preference, never a
    /// limit.
    #[test]
    fn at_the_connection_limit_another_threads_http2_connection_is_used() {
        let (b, pool, svc) = h2_fixture(1);
        let (a, on_a, done) = h2_thread(&pool, &svc, 1);
        let rt = current_thread();
        let on_b = rt.block_on(send_h2_one(&pool, &svc));
        assert_eq!(on_b, on_a[0], "B borrowed A's connection");
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(svc.connections(), 1);
        done.send(()).unwrap();
        a.join().unwrap();
    }

    /// Waits (up to 5 s) until `b` has seen `n` connections closed by the
    /// proxy.
    async fn closed_by_proxy(b: &Backend, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.peer_closed.load(Ordering::SeqCst) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        b.peer_closed.load(Ordering::SeqCst)
    }

    /// The sweep closes an idle connection once its idle timeout passed,
    /// though no request came to the service since: its socket is closed
    /// (the backend reads EOF) and its `max-connections` slot freed.
    #[test]
    fn the_sweep_closes_an_expired_idle_connection() {
        let b = backend(Reply::Ok);
        let svc = Svc::new(Duration::from_secs(1), 16);
        let pool = svc.pools.get(b.addr, None);
        current_thread().block_on(async {
            send_one(&pool, &svc).await;
            assert_eq!(svc.pools.sweep(), 0, "not expired yet");
            assert_eq!((pool.idle_len(), svc.connections()), (1, 1));
            tokio::time::sleep(Duration::from_millis(1100)).await;
            assert_eq!(svc.pools.sweep(), 1);
            assert_eq!((pool.idle_len(), svc.connections()), (0, 0));
            assert_eq!(closed_by_proxy(&b, 1).await, 1, "the backend saw the close");
        });
    }

    /// An idle connection that its backend closed is closed by the sweep
    /// long before it expires (no socket left in CLOSE_WAIT, no slot held).
    #[test]
    fn the_sweep_closes_an_idle_connection_its_backend_closed() {
        let (b, pool, svc) = fixture(Reply::OkThenClose, 16);
        current_thread().block_on(async {
            send_one(&pool, &svc).await;
            assert_eq!(pool.idle_len(), 1);
            // The backend closes 30 ms after its response; the connection
            // expires in 30 s.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut swept = 0;
            while swept == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
                swept = svc.pools.sweep();
            }
            assert_eq!(swept, 1);
            assert_eq!((pool.idle_len(), svc.connections()), (0, 0));
        });
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    }

    /// At the `max-connections` limit, an idle connection to another
    /// endpoint is closed to make room: a request to endpoint B is served,
    /// not refused, while A's idle connection holds the only slot.
    #[test]
    fn at_the_connection_limit_another_endpoints_idle_connection_makes_room() {
        let (a, b) = (backend(Reply::Ok), backend(Reply::Ok));
        let svc = Svc::new(Duration::from_secs(30), 1);
        let (pool_a, pool_b) = (svc.pools.get(a.addr, None), svc.pools.get(b.addr, None));
        current_thread().block_on(async {
            send_one(&pool_a, &svc).await;
            assert_eq!((pool_a.idle_len(), svc.connections()), (1, 1));
            send_one(&pool_b, &svc).await;
            assert_eq!(pool_a.idle_len(), 0, "A's idle connection made room");
            assert_eq!((pool_b.idle_len(), svc.connections()), (1, 1));
            assert_eq!(closed_by_proxy(&a, 1).await, 1, "A saw the close");
            // And back: B's idle connection makes room for A.
            send_one(&pool_a, &svc).await;
            assert_eq!((pool_b.idle_len(), svc.connections()), (0, 1));
            assert_eq!(closed_by_proxy(&b, 1).await, 1, "B saw the close");
        });
        assert_eq!(a.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    }

    /// The least recently used idle connection is the one closed at the
    /// limit, and a connection in use is never taken: with A idle longer
    /// than B and a third request at the limit, A's goes; with none idle,
    /// the request is refused.
    #[test]
    fn at_the_connection_limit_the_least_recently_used_idle_connection_goes() {
        let (a, b, c) = (backend(Reply::Ok), backend(Reply::Ok), backend(Reply::Ok));
        let svc = Svc::new(Duration::from_secs(30), 2);
        let pools = [a.addr, b.addr, c.addr].map(|addr| svc.pools.get(addr, None));
        current_thread().block_on(async {
            send_one(&pools[0], &svc).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            send_one(&pools[1], &svc).await;
            let (resp, _held) = svc.send(&pools[2]).await.expect("C answers");
            assert_eq!(resp.status(), 200);
            assert_eq!(pools.each_ref().map(|p| p.idle_len()), [0, 1, 0]);
            assert_eq!(closed_by_proxy(&a, 1).await, 1, "A's, the older, went");
            // B's idle one makes room for the next; C's is in use (its
            // response is held), so a third new connection is refused.
            let (_resp, _held2) = svc.send(&pools[0]).await.expect("A answers");
            match svc.send(&pools[1]).await {
                Err(SendFailure {
                    kind: FailKind::Overflow(Limit::Connections),
                    request: Some(_),
                }) => {}
                other => panic!("expected a connections overflow, got {other:?}"),
            }
            assert_eq!(svc.connections(), 2);
            assert_eq!(c.peer_closed.load(Ordering::SeqCst), 0, "C's is open");
        });
    }
}
