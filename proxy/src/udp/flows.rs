//! The flow table: one entry per (client, original destination) pair.
//!
//! Why a table of its own, separate from the listener: it holds every piece
//! of per-flow state (the endpoint, the connected upstream socket, the reply
//! task, the idle clock) and enforces the two bounds that keep a UDP proxy
//! alive under a flood of distinct clients: idle expiry and a hard cap, the
//! oldest flow giving way to a new one.
//!
//! The lock is per table and held only for map operations (never across an
//! await or a send); an existing flow's datagrams cost one hash lookup.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::balance::{Balancer, Pick, Scope};

/// Flow-table settings.
#[derive(Debug, Clone)]
pub struct FlowConfig {
    /// Most flows at once; beyond it the oldest flow is evicted.
    pub max_flows: usize,
    /// Idle time after which a flow that never saw a reply expires
    /// (conntrack's `nf_conntrack_udp_timeout`: 30 s).
    pub unreplied_timeout: Duration,
    /// Idle time after which a flow that saw replies expires
    /// (`nf_conntrack_udp_timeout_stream`: 120 s).
    pub stream_timeout: Duration,
    /// SO_MARK for upstream sockets, so the rules never capture them (0: none).
    pub upstream_mark: u32,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            max_flows: 65_536,
            unreplied_timeout: Duration::from_secs(30),
            stream_timeout: Duration::from_secs(120),
            upstream_mark: 0,
        }
    }
}

/// A flow's identity: who sent, and to which service address.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
}

/// Counters of one flow table (all monotonic except `active`).
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

struct Flow {
    id: u64,
    upstream: Arc<UdpSocket>,
    balancer: Arc<Balancer>,
    /// Holds the endpoint's in-flight slot while the flow lives, so p2c
    /// spreads flows, not just first datagrams.
    pick: Pick,
    activity: Arc<Activity>,
    task: tokio::task::AbortHandle,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The idle clock a flow shares with its reply task.
struct Activity {
    /// Milliseconds since the table's epoch of the last datagram either way.
    last_ms: AtomicU64,
    replied: AtomicBool,
}

#[derive(Default)]
struct Inner {
    flows: HashMap<FlowKey, Flow>,
    /// Creation order (flow id → key), for oldest-first eviction.
    order: BTreeMap<u64, FlowKey>,
    next_id: u64,
}

impl Inner {
    fn remove(&mut self, key: &FlowKey) -> Option<Flow> {
        let flow = self.flows.remove(key)?;
        self.order.remove(&flow.id);
        Some(flow)
    }
}

/// Every UDP flow of one listener.
pub struct FlowTable {
    cfg: FlowConfig,
    epoch: Instant,
    inner: Mutex<Inner>,
    stats: FlowStats,
}

impl FlowTable {
    pub fn new(cfg: FlowConfig) -> Arc<Self> {
        Arc::new(FlowTable {
            cfg,
            epoch: Instant::now(),
            inner: Mutex::new(Inner::default()),
            stats: FlowStats::default(),
        })
    }

    pub fn config(&self) -> &FlowConfig {
        &self.cfg
    }

    /// Flows alive now.
    pub fn len(&self) -> usize {
        self.lock().flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> &FlowStats {
        &self.stats
    }

    /// The endpoint of `key`'s flow, if it exists.
    pub fn endpoint(&self, key: &FlowKey) -> Option<SocketAddr> {
        self.lock().flows.get(key).map(|f| f.pick.addr())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the data plane down with it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Relays one client datagram: through the flow's upstream socket when
    /// the flow exists, else after picking an endpoint from `balancer`'s
    /// `scope` set and starting the flow, whose replies are sent to the
    /// client from `reply` (a socket bound to `key.orig_dst`). Returns the
    /// endpoint used.
    pub async fn forward(
        self: &Arc<Self>,
        key: FlowKey,
        balancer: &Arc<Balancer>,
        scope: Scope,
        payload: &[u8],
        reply: &Arc<UdpSocket>,
    ) -> Result<SocketAddr, UdpError> {
        let existing = {
            let inner = self.lock();
            inner.flows.get(&key).map(|f| {
                f.activity.last_ms.store(self.now_ms(), Ordering::Relaxed);
                (f.upstream.clone(), f.pick.addr())
            })
        };
        let (upstream, endpoint) = match existing {
            Some(found) => found,
            None => self.open(key, balancer, scope, reply)?,
        };
        match upstream.send(payload).await {
            Ok(n) => {
                self.stats.datagrams_up.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                Ok(endpoint)
            }
            Err(source) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                Err(UdpError::Upstream { endpoint, source })
            }
        }
    }

    fn open(
        self: &Arc<Self>,
        key: FlowKey,
        balancer: &Arc<Balancer>,
        scope: Scope,
        reply: &Arc<UdpSocket>,
    ) -> Result<(Arc<UdpSocket>, SocketAddr), UdpError> {
        let Some(pick) = balancer.pick(scope, key.client.ip(), &[]) else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(UdpError::NoEndpoint {
                service: balancer.name().to_string(),
            });
        };
        let endpoint = pick.addr();
        let upstream = Arc::new(
            connect_upstream(endpoint, self.cfg.upstream_mark)
                .map_err(|source| UdpError::Upstream { endpoint, source })?,
        );
        let activity = Arc::new(Activity {
            last_ms: AtomicU64::new(self.now_ms()),
            replied: AtomicBool::new(false),
        });
        let mut inner = self.lock();
        if let Some(f) = inner.flows.get(&key) {
            // Another task opened it meanwhile: use that one.
            return Ok((f.upstream.clone(), f.pick.addr()));
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let task = tokio::spawn(relay_replies(
            Arc::downgrade(self),
            key,
            id,
            upstream.clone(),
            reply.clone(),
            activity.clone(),
        ))
        .abort_handle();
        inner.flows.insert(
            key,
            Flow {
                id,
                upstream: upstream.clone(),
                balancer: balancer.clone(),
                pick,
                activity,
                task,
            },
        );
        inner.order.insert(id, key);
        let mut evicted = Vec::new();
        while inner.flows.len() > self.cfg.max_flows.max(1) {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            if let Some(f) = inner.flows.remove(&oldest) {
                evicted.push(f);
            }
        }
        drop(inner);
        self.stats.created.fetch_add(1, Ordering::Relaxed);
        self.stats
            .evicted_cap
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        Ok((upstream, endpoint))
    }

    /// Evicts every flow whose endpoint is no longer in its balancer's set
    /// (call after the balancers applied a new table snapshot). Returns how
    /// many were evicted.
    pub fn evict_missing(&self) -> usize {
        let mut inner = self.lock();
        let gone: Vec<FlowKey> = inner
            .flows
            .iter()
            .filter(|(_, f)| f.balancer.backend(f.pick.addr()).is_none())
            .map(|(k, _)| *k)
            .collect();
        let evicted: Vec<Flow> = gone.iter().filter_map(|k| inner.remove(k)).collect();
        drop(inner);
        self.stats
            .evicted_endpoint
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        evicted.len()
    }

    /// Removes flow `id` at `key` if it has been idle for its timeout.
    fn expire(&self, key: &FlowKey, id: u64) -> bool {
        let mut inner = self.lock();
        if inner.flows.get(key).is_some_and(|f| f.id == id) {
            let flow = inner.remove(key);
            drop(inner);
            drop(flow);
            self.stats.expired.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

/// A connected, non-blocking UDP socket to `endpoint`, SO_MARK'ed.
fn connect_upstream(endpoint: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(endpoint),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if mark != 0 {
        redirect::sockopt::set_mark(&sock, mark)?;
    }
    sock.set_nonblocking(true)?;
    sock.connect(&endpoint.into())?;
    UdpSocket::from_std(sock.into())
}

/// Relays replies from `upstream` to the client until the flow idles out.
async fn relay_replies(
    table: Weak<FlowTable>,
    key: FlowKey,
    id: u64,
    upstream: Arc<UdpSocket>,
    reply: Arc<UdpSocket>,
    activity: Arc<Activity>,
) {
    loop {
        let Some(t) = table.upgrade() else { return };
        let timeout = if activity.replied.load(Ordering::Relaxed) {
            t.cfg.stream_timeout
        } else {
            t.cfg.unreplied_timeout
        };
        let last = Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
        let deadline = t.epoch + last + timeout;
        drop(t);
        tokio::select! {
            r = upstream.readable() => {
                let Some(t) = table.upgrade() else { return };
                if let Err(e) = r {
                    tracing::debug!(client = %key.client, error = %e, "udp upstream not readable");
                    return;
                }
                // Allocated per wake-up, not per flow: 65,536 idle flows must
                // not hold 4 GiB of buffers.
                let mut buf = vec![0u8; 65_536];
                match upstream.try_recv(&mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Ok(n) => {
                        activity.last_ms.store(t.now_ms(), Ordering::Relaxed);
                        activity.replied.store(true, Ordering::Relaxed);
                        match reply.send_to(&buf[..n], key.client).await {
                            Ok(_) => {
                                t.stats.datagrams_down.fetch_add(1, Ordering::Relaxed);
                                t.stats.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(e) => {
                                t.stats.dropped.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(client = %key.client, error = %e, "udp reply not sent");
                            }
                        }
                    }
                    // ICMP errors (port unreachable) surface here; the flow
                    // stays until it idles out, like conntrack's entry.
                    Err(e) => {
                        t.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(client = %key.client, error = %e, "udp upstream error");
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let Some(t) = table.upgrade() else { return };
                let last = Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
                if Instant::now() >= t.epoch + last + timeout && t.expire(&key, id) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
