//! The flow table: one entry per (client, original destination) pair.
//!
//! Why a table of its own, separate from the listener: it holds every piece
//! of per-flow state (the endpoint, the connected upstream socket, the reply
//! task, the idle clock) and enforces the two bounds that keep a UDP proxy
//! alive under a flood of distinct clients: idle expiry and a hard cap, the
//! oldest flow giving way to a new one.
//!
//! Why no table-wide lock on the datagram path: every datagram of an
//! existing flow is one lookup in a sharded concurrent map ([`DashMap`]):
//! a read lock on one of its shards, shared with every other reader, plus an
//! atomic store of the flow's last-seen time. Datagrams never wait for each
//! other; one waits only while a flow in the same shard is being created or
//! removed (a short write on that shard alone).
//!
//! The eviction order (creation order with CLOCK's second chance, which is
//! what makes "the oldest idle flow goes first" cheap) is a single ordered
//! structure, so it keeps a lock of its own; that lock is taken only when a
//! flow is created or removed (new flow, cap eviction, idle expiry, endpoint
//! eviction), never for a datagram of an existing flow. Every insertion and
//! removal happens under it, which keeps the cap exact: a new flow first
//! evicts down to `max_flows - 1`, then goes in, so the table never holds
//! more than `max_flows`. No lock is ever held across an await or a send.
//! Every flow carries its service port's UDP metric handles, taken once when
//! the flow is created.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use control::{FrontendKey, Protocol, Table};
use dashmap::DashMap;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::balance::{Balancer, Balancers, Pick, Scope};
use crate::l4::Source;
use crate::metrics::udp::{Eviction, UdpMetrics};

/// Flow-table settings.
#[derive(Debug, Clone)]
pub struct FlowConfig {
    /// Most flows at once; beyond it the oldest flow (by creation) is
    /// evicted.
    pub max_flows: usize,
    /// Idle time after which a flow that never saw a reply expires
    /// (conntrack's `nf_conntrack_udp_timeout`: 30 s).
    pub unreplied_timeout: Duration,
    /// Idle time after which a flow that saw replies expires
    /// (`nf_conntrack_udp_timeout_stream`: 120 s).
    pub stream_timeout: Duration,
    /// SO_MARK for upstream sockets, so the rules never capture them (0: none).
    pub upstream_mark: u32,
    /// Flows to endpoints come from the client's address where kube-proxy
    /// would not masquerade (see `crate::l4::Source`); only with the
    /// nftables reply rule that brings the answers back.
    pub keep_client_source: bool,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            max_flows: 65_536,
            unreplied_timeout: Duration::from_secs(30),
            stream_timeout: Duration::from_secs(120),
            upstream_mark: 0,
            keep_client_source: false,
        }
    }
}

/// A flow's identity: who sent, and to which service address.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
}

/// Counters of one flow table, all monotonic ([`FlowTable::len`] is the
/// live count). The Prometheus series are per service port; these are the
/// table's totals.
#[derive(Debug, Default)]
pub struct FlowStats {
    pub created: AtomicU64,
    pub expired: AtomicU64,
    /// Evicted because the table was full (oldest first).
    pub evicted_cap: AtomicU64,
    /// Evicted because their endpoint left the set.
    pub evicted_endpoint: AtomicU64,
    /// Datagrams not relayed (no endpoint, socket errors).
    pub dropped: AtomicU64,
    pub datagrams_up: AtomicU64,
    pub bytes_up: AtomicU64,
    pub datagrams_down: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// Why a datagram could not be relayed.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("{service}: no endpoint to send to")]
    NoEndpoint { service: String },
    #[error("upstream socket to {endpoint}: {source}")]
    Upstream {
        endpoint: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// What the datagram path needs of a flow, shared with its reply task.
struct Shared {
    upstream: UdpSocket,
    endpoint: SocketAddr,
    metrics: Arc<UdpMetrics>,
    /// Milliseconds since the table's epoch of the last datagram either way.
    last_ms: AtomicU64,
    replied: AtomicBool,
}

struct Flow {
    /// Identity (the reply task's handle on its flow); never changes.
    id: u64,
    /// Position in the eviction order; moves to the back on a second chance.
    order: u64,
    /// `last_ms` when the flow took that position: activity after it earns
    /// the flow a second chance.
    ordered_ms: u64,
    shared: Arc<Shared>,
    balancer: Arc<Balancer>,
    scope: Scope,
    task: tokio::task::AbortHandle,
}

impl Drop for Flow {
    fn drop(&mut self) {
        // The reply task owns the endpoint's in-flight slot; aborting it
        // frees the slot and closes the upstream socket.
        self.task.abort();
        self.shared.metrics.flows_active.decrement(1.0);
    }
}

/// The eviction order; its lock serialises flow creation and removal only.
#[derive(Default)]
struct Order {
    /// Position → key: creation order, except that a flow active since it
    /// took its position goes to the back once instead of being evicted
    /// (CLOCK's second chance).
    by_pos: BTreeMap<u64, FlowKey>,
    next_id: u64,
}

/// Second chances given per eviction at most: when every flow is busy, the
/// oldest still goes, and a new flow never costs more than a few steps.
const SECOND_CHANCES: usize = 16;

impl Order {
    fn next(&mut self) -> u64 {
        let n = self.next_id;
        self.next_id += 1;
        n
    }
}

/// Every UDP flow of one node.
pub struct FlowTable {
    cfg: FlowConfig,
    epoch: Instant,
    flows: DashMap<FlowKey, Flow>,
    /// Flows in `flows`, changed only under `order` (removals before the
    /// insertion they make room for), so reading it never sees more than
    /// the cap; the map's own `len` sums its shards one by one and can.
    live: AtomicUsize,
    order: Mutex<Order>,
    stats: FlowStats,
}

impl FlowTable {
    pub fn new(cfg: FlowConfig) -> Arc<Self> {
        Arc::new(FlowTable {
            cfg,
            epoch: Instant::now(),
            flows: DashMap::new(),
            live: AtomicUsize::new(0),
            order: Mutex::new(Order::default()),
            stats: FlowStats::default(),
        })
    }

    pub fn config(&self) -> &FlowConfig {
        &self.cfg
    }

    /// Flows alive now.
    pub fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether flows may keep the client's address as source.
    pub fn keeps_client_source(&self) -> bool {
        self.cfg.keep_client_source
    }

    pub fn stats(&self) -> &FlowStats {
        &self.stats
    }

    /// The endpoint of `key`'s flow, if it exists.
    pub fn endpoint(&self, key: &FlowKey) -> Option<SocketAddr> {
        self.flows.get(key).map(|f| f.shared.endpoint)
    }

    /// The creation/removal lock (see the module doc); never taken for a
    /// datagram of an existing flow.
    fn order(&self) -> MutexGuard<'_, Order> {
        // A panic elsewhere must not take the data plane down with it.
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes flow `id` at `key` (not one re-created meanwhile under the
    /// same key) with its eviction position. Caller holds `order`.
    fn remove_locked(&self, order: &mut Order, key: &FlowKey, id: u64) -> Option<Flow> {
        let (_, flow) = self.flows.remove_if(key, |_, f| f.id == id)?;
        self.live.fetch_sub(1, Ordering::Relaxed);
        order.by_pos.remove(&flow.order);
        Some(flow)
    }

    /// Evicts flows until at most `cap` remain: the oldest idle ones, so a
    /// flood of one-datagram clients never pushes out a busy stream. Caller
    /// holds `order`; the evicted flows are dropped by the caller, after it
    /// lets go of the lock.
    fn evict_to(&self, order: &mut Order, cap: usize) -> Vec<Flow> {
        let mut evicted = Vec::new();
        let mut chances = 0;
        while self.len() > cap {
            let Some((_, oldest)) = order.by_pos.pop_first() else {
                break;
            };
            let position = order.next();
            // The shard guard ends with this block, before any removal.
            let second_chance = match self.flows.get_mut(&oldest) {
                None => continue,
                Some(mut f) => {
                    let last = f.shared.last_ms.load(Ordering::Relaxed);
                    if last > f.ordered_ms && chances < SECOND_CHANCES {
                        chances += 1;
                        f.order = position;
                        f.ordered_ms = last;
                        true
                    } else {
                        false
                    }
                }
            };
            if second_chance {
                order.by_pos.insert(position, oldest);
            } else {
                if let Some((_, f)) = self.flows.remove(&oldest) {
                    self.live.fetch_sub(1, Ordering::Relaxed);
                    evicted.push(f);
                }
            }
        }
        evicted
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Relays one client datagram through `key`'s existing flow. `None` when
    /// there is no such flow: the caller then looks the frontend up and calls
    /// [`FlowTable::forward`]. The hot path: one sharded-map lookup, no
    /// table-wide lock, no table or balancer access.
    pub fn relay(&self, key: &FlowKey, payload: &[u8]) -> Option<Result<SocketAddr, UdpError>> {
        let shared = {
            // A read guard on one shard, released before the send.
            let f = self.flows.get(key)?;
            f.shared.last_ms.store(self.now_ms(), Ordering::Relaxed);
            f.shared.clone()
        };
        Some(self.send_up(&shared, payload))
    }

    /// Relays one client datagram: through the flow's upstream socket when
    /// the flow exists, else after picking an endpoint from `balancer`'s
    /// `scope` set and starting the flow, whose replies are sent to the
    /// client from `reply` (a socket bound to `key.orig_dst`). Returns the
    /// endpoint used. Never waits: a datagram that does not fit the socket
    /// buffer is dropped (and counted), as the kernel would.
    pub fn forward(
        self: &Arc<Self>,
        key: FlowKey,
        balancer: &Arc<Balancer>,
        route: impl FnOnce() -> (Scope, Source),
        payload: &[u8],
        reply: &Arc<UdpSocket>,
    ) -> Result<SocketAddr, UdpError> {
        if let Some(r) = self.relay(&key, payload) {
            return r;
        }
        // Scope and source matter only to a new flow: asked for here, not
        // per datagram.
        let shared = self.open(key, balancer, route(), reply)?;
        self.send_up(&shared, payload)
    }

    fn send_up(&self, shared: &Shared, payload: &[u8]) -> Result<SocketAddr, UdpError> {
        match send_now(&shared.upstream, payload, None) {
            Ok(n) => {
                self.stats.datagrams_up.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                shared.metrics.received(n);
                Ok(shared.endpoint)
            }
            Err(source) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                shared.metrics.dropped.increment(1);
                Err(UdpError::Upstream {
                    endpoint: shared.endpoint,
                    source,
                })
            }
        }
    }

    fn open(
        self: &Arc<Self>,
        key: FlowKey,
        balancer: &Arc<Balancer>,
        (scope, source): (Scope, Source),
        reply: &Arc<UdpSocket>,
    ) -> Result<Arc<Shared>, UdpError> {
        // Registered once per service port; this is a flow's only lookup.
        let metrics = crate::metrics::udp::udp(balancer.name());
        let Some(pick) = balancer.pick(scope, key.client.ip(), &[]) else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            metrics.dropped.increment(1);
            return Err(UdpError::NoEndpoint {
                service: balancer.name().to_string(),
            });
        };
        let endpoint = pick.addr();
        let from = source.for_endpoint(key.client.ip(), endpoint);
        let upstream = match connect_upstream(endpoint, self.cfg.upstream_mark, from) {
            Ok(u) => u,
            Err(source) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                metrics.dropped.increment(1);
                return Err(UdpError::Upstream { endpoint, source });
            }
        };
        let shared = Arc::new(Shared {
            upstream,
            endpoint,
            metrics,
            last_ms: AtomicU64::new(self.now_ms()),
            replied: AtomicBool::new(false),
        });
        let mut order = self.order();
        if let Some(f) = self.flows.get(&key) {
            // Another task opened it meanwhile: use that one.
            return Ok(f.shared.clone());
        }
        // Room first, then the new flow: the table never exceeds the cap,
        // and the newcomer is never its own eviction candidate.
        let evicted = self.evict_to(&mut order, self.cfg.max_flows.max(1) - 1);
        let id = order.next();
        let task = tokio::spawn(relay_replies(
            Arc::downgrade(self),
            key,
            id,
            shared.clone(),
            pick,
            reply.clone(),
        ))
        .abort_handle();
        shared.metrics.flows_active.increment(1.0);
        shared.metrics.flows_created.increment(1);
        self.flows.insert(
            key,
            Flow {
                id,
                order: id,
                ordered_ms: shared.last_ms.load(Ordering::Relaxed),
                shared: shared.clone(),
                balancer: balancer.clone(),
                scope,
                task,
            },
        );
        self.live.fetch_add(1, Ordering::Relaxed);
        order.by_pos.insert(id, key);
        drop(order);
        self.stats.created.fetch_add(1, Ordering::Relaxed);
        self.stats
            .evicted_cap
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        for f in &evicted {
            f.shared.metrics.evicted(Eviction::Cap, 1);
        }
        Ok(shared)
    }

    /// Evicts every flow whose endpoint is no longer in its balancer's set
    /// (call after the balancers applied a new table snapshot). Returns how
    /// many were evicted. See [`FlowTable::evict_stale`] for the variant that
    /// also follows the table.
    pub fn evict_missing(&self) -> usize {
        // Decide outside every lock: the datagram path must not wait on a
        // balancer scan.
        let flows: Vec<(FlowKey, u64, SocketAddr, Arc<Balancer>, Scope)> = self
            .flows
            .iter()
            .map(|f| {
                (
                    *f.key(),
                    f.id,
                    f.shared.endpoint,
                    f.balancer.clone(),
                    f.scope,
                )
            })
            .collect();
        let gone: Vec<(FlowKey, u64)> = flows
            .into_iter()
            .filter(|(_, _, endpoint, balancer, scope)| {
                balancer
                    .backends(*scope)
                    .iter()
                    .all(|b| b.addr() != *endpoint)
            })
            .map(|(key, id, ..)| (key, id))
            .collect();
        self.remove_endpoint_evicted(&gone)
    }

    /// Brings the flows in line with a new table snapshot: a flow whose
    /// frontend is gone, whose frontend now belongs to another service port,
    /// or whose endpoint left its set is evicted at once, so the client's
    /// next datagram picks a live endpoint (kube-proxy's conntrack cleanup
    /// for UDP). The flows' balancers are brought to `table` first.
    /// Returns how many flows were evicted.
    pub fn evict_stale(&self, table: &Table, balancers: &Balancers) -> usize {
        // Decide outside every lock: the datagram path must not wait on a
        // scan of every flow (the iteration holds one shard at a time).
        let flows: Vec<(FlowKey, u64, SocketAddr, Arc<Balancer>)> = self
            .flows
            .iter()
            .map(|f| (*f.key(), f.id, f.shared.endpoint, f.balancer.clone()))
            .collect();
        if flows.is_empty() {
            return 0;
        }
        // One endpoint set per (service port, scope), not per flow.
        let mut sets: HashMap<(FrontendKey, Scope), Option<HashSet<SocketAddr>>> = HashMap::new();
        let mut stale = Vec::new();
        for (key, id, endpoint, balancer) in flows {
            let fk = FrontendKey::new(key.orig_dst, Protocol::Udp);
            let live = match table.lookup(&fk) {
                Some(fe) if fe.service.name == *balancer.name() => {
                    let scope = Scope::for_client(fe, key.client.ip());
                    sets.entry((fk, scope))
                        .or_insert_with(|| {
                            let b = balancers.for_service_at(&fe.service, table.version);
                            Some(b.backends(scope).iter().map(|b| b.addr()).collect())
                        })
                        .as_ref()
                        .is_some_and(|s| s.contains(&endpoint))
                }
                _ => false,
            };
            if !live {
                stale.push((key, id));
            }
        }
        self.remove_endpoint_evicted(&stale)
    }

    /// Removes the flows `(key, id)` (each only if it is still that flow,
    /// not one re-created meanwhile under its key) as endpoint evictions.
    fn remove_endpoint_evicted(&self, gone: &[(FlowKey, u64)]) -> usize {
        if gone.is_empty() {
            return 0;
        }
        let evicted: Vec<Flow> = {
            let mut order = self.order();
            gone.iter()
                .filter_map(|(k, id)| self.remove_locked(&mut order, k, *id))
                .collect()
        };
        self.count_endpoint_evictions(&evicted);
        evicted.len()
    }

    fn count_endpoint_evictions(&self, evicted: &[Flow]) {
        self.stats
            .evicted_endpoint
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        for f in evicted {
            f.shared.metrics.evicted(Eviction::Endpoint, 1);
        }
    }

    /// Removes flow `id` at `key` if it has been idle for its timeout.
    fn expire(&self, key: &FlowKey, id: u64) -> bool {
        let flow = self.remove_locked(&mut self.order(), key, id);
        match flow {
            Some(f) => {
                f.shared.metrics.flows_expired.increment(1);
                drop(f);
                self.stats.expired.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// A connected, non-blocking UDP socket to `endpoint`, SO_MARK'ed, bound
/// to the client's address `from` when given (see
/// [`redirect::sockopt::transparent_bind`]).
fn connect_upstream(
    endpoint: SocketAddr,
    mark: u32,
    from: Option<IpAddr>,
) -> io::Result<UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(endpoint),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if mark != 0 {
        redirect::sockopt::set_mark(&sock, mark)?;
    }
    if let Some(ip) = from {
        redirect::sockopt::transparent_bind(&sock, ip, endpoint)?;
    }
    sock.set_nonblocking(true)?;
    sock.connect(&endpoint.into())?;
    UdpSocket::from_std(sock.into())
}

/// Sends one datagram straight away, without waiting: a full socket buffer
/// is an error (the datagram is dropped, as the kernel itself would). The
/// syscall is made directly rather than through tokio's `try_send`, which
/// refuses until the reactor has once reported the socket writable: the
/// first datagram of every new flow would be lost.
fn send_now(sock: &UdpSocket, payload: &[u8], to: Option<SocketAddr>) -> io::Result<usize> {
    let s = socket2::SockRef::from(sock);
    match to {
        Some(to) => s.send_to(payload, &to.into()),
        None => s.send(payload),
    }
}

/// Largest UDP payload: replies are read into a buffer of this size.
const MAX_DATAGRAM: usize = 65_536;

thread_local! {
    // One receive buffer per worker thread, not per flow: 65,536 idle flows
    // must not hold 4 GiB of buffers, and a reply must not cost an
    // allocation. Never borrowed across an await.
    static REPLY_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_DATAGRAM]);
}

/// Relays replies from the flow's upstream socket to the client until the
/// flow idles out (or is evicted: the task is then aborted). Owns the
/// endpoint's in-flight slot; the first reply's delay is the endpoint's
/// latency sample.
async fn relay_replies(
    table: Weak<FlowTable>,
    key: FlowKey,
    id: u64,
    shared: Arc<Shared>,
    mut pick: Pick,
    reply: Arc<UdpSocket>,
) {
    loop {
        let Some(t) = table.upgrade() else { return };
        let timeout = if shared.replied.load(Ordering::Relaxed) {
            t.cfg.stream_timeout
        } else {
            t.cfg.unreplied_timeout
        };
        let last = Duration::from_millis(shared.last_ms.load(Ordering::Relaxed));
        let deadline = t.epoch + last + timeout;
        drop(t);
        tokio::select! {
            r = shared.upstream.readable() => {
                let Some(t) = table.upgrade() else { return };
                if let Err(e) = r {
                    tracing::debug!(client = %key.client, error = %e, "udp upstream not readable");
                    return;
                }
                // Everything queued, without yielding in between (bounded:
                // the socket's receive buffer holds a few hundred datagrams).
                for _ in 0..256 {
                    let got = REPLY_BUF.with_borrow_mut(|buf| match shared.upstream.try_recv(buf) {
                        Ok(n) => Ok(Some((n, send_now(&reply, &buf[..n], Some(key.client))))),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                        Err(e) => Err(e),
                    });
                    match got {
                        Ok(None) => break,
                        Ok(Some((n, sent))) => {
                            shared.last_ms.store(t.now_ms(), Ordering::Relaxed);
                            shared.replied.store(true, Ordering::Relaxed);
                            pick.record_success();
                            match sent {
                                Ok(_) => {
                                    t.stats.datagrams_down.fetch_add(1, Ordering::Relaxed);
                                    t.stats.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
                                    shared.metrics.sent(n);
                                }
                                Err(e) => {
                                    t.stats.dropped.fetch_add(1, Ordering::Relaxed);
                                    shared.metrics.dropped.increment(1);
                                    tracing::debug!(client = %key.client, error = %e, "udp reply not sent");
                                }
                            }
                        }
                        // ICMP errors (port unreachable) surface here; the
                        // flow stays until it idles out, like conntrack's
                        // entry.
                        Err(e) => {
                            t.stats.dropped.fetch_add(1, Ordering::Relaxed);
                            shared.metrics.dropped.increment(1);
                            tracing::debug!(client = %key.client, error = %e, "udp upstream error");
                            break;
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let Some(t) = table.upgrade() else { return };
                let last = Duration::from_millis(shared.last_ms.load(Ordering::Relaxed));
                if Instant::now() >= t.epoch + last + timeout && t.expire(&key, id) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
