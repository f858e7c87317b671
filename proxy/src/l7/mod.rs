//! The L7 HTTP data plane: HTTP/1.1 and prior-knowledge h2c served on the
//! redirected connection, each request balanced, retried and bounded on its
//! own.
//!
//! Why per request: Lightpath's benchmark showed per-request balancing and
//! retries are what cut tail latency and turn a failing backend into zero
//! client errors; a connection-level relay cannot do either. The stack is a
//! few concrete steps rather than a deep generic tower stack, so each policy
//! is readable in one place:
//! * [`settings`]: per-service configuration from annotations, defaults in
//!   one place;
//! * [`proxy`]: one request: limits, header rewriting, body replay buffer;
//! * [`retry`]: attempts on distinct endpoints as `tower::retry::Retry` with
//!   a budgeted policy, timeouts, outlier reporting into the balancer;
//! * [`budget`]: the service-wide retry budget (tower's semantics, no lock
//!   per request);
//! * [`upstream`]: per-endpoint pooled HTTP/1.1 or HTTP/2 connections;
//! * [`queue`]: where a request waits (bounded, fail-fast) while its
//!   service has no endpoint;
//! * [`rescue`]: every proxy-generated status in one function;
//! * [`upgrade`]: WebSocket / CONNECT tunnels after 101 / 2xx.
//!
//! Per-service state ([`Service`]: settings, retry budget, breaker counters,
//! pools, ring) is built once per service-port snapshot and shared by every
//! connection through a lock-free map, like the balancers.

pub mod body;
pub mod budget;
pub mod headers;
pub mod health;
pub mod proxy;
pub mod queue;
pub mod rescue;
pub mod retry;
pub mod ring;
pub mod settings;
pub mod upgrade;
pub mod upstream;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use control::{Family, Frontend, Mode, ServicePort, ServicePortName, Table};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;

use crate::balance::{Balancer, Balancers, OutlierConfig, Scope, Synced};
use crate::drain;
use crate::l4::connect::ConnectConfig;
use crate::metrics::ServiceMetrics;

use budget::RetryBudget;
use ring::Ring;
use settings::{Balance, Settings};
use upstream::{ConnectSettings, Limits, Pools};

/// The body type on both sides of the proxy: streamed frames, boxed once.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Largest request head accepted (HTTP/1.1 read buffer; HTTP/2 header list).
/// Envoy's default is 60 KiB; larger heads get 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Time a client has to send a complete request head on a new or idle
/// keep-alive connection (slowloris bound).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often idle upstream connections are swept ([`L7::sweep_idle`]): an
/// idle connection is closed at most this long after its idle timeout, or
/// after its peer closed it.
pub const IDLE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Persistent (as the balancers' map): a sync that changes one port's state
/// copies no other port's entry.
type Services = imbl::HashMap<ServicePortName, Arc<Service>>;

/// Process-wide L7 state: one [`Service`] per service port and family.
pub struct L7 {
    /// Indexed by [`control::Family::index`]: the two rows of a dual-stack
    /// service port have their own endpoints, so their own state (its pools
    /// hold only that family's endpoints). Sharing one by name, each
    /// family's request rebuilt the state and closed the other's idle
    /// connections.
    services: [ArcSwap<Services>; 2],
    write: Mutex<Synced>,
    /// Shared state replaced (annotations changed) or dropped (service port
    /// removed) that may still be alive: a client connection keeps the
    /// state of its last request until its next one, and with it that
    /// state's idle upstream connections, which the sweep must still close.
    /// Pruned by the sweep once dead. Each keeps its metric handles, so
    /// the sweep can still report a removed service port's connections as
    /// they close, down to 0.
    retired: Mutex<Vec<(std::sync::Weak<Shared>, Arc<ServiceMetrics>)>>,
    /// How upstream sockets are made (SO_MARK, congestion control): the L4
    /// relay's settings, which each service's connect settings start from.
    upstream: ConnectConfig,
    server: auto::Builder<TokioExecutor>,
}

impl std::fmt::Debug for L7 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L7")
            .field(
                "services",
                &self.services.iter().map(|m| m.load().len()).sum::<usize>(),
            )
            .field("mark", &self.upstream.mark)
            .finish()
    }
}

/// Per-service-port L7 state. Rebuilt when the service port changes; the
/// parts that must survive an endpoint change (budget, breaker counters,
/// pools, metrics) are shared while the annotations stay the same.
#[derive(Debug)]
pub struct Service {
    pub port: Arc<ServicePort>,
    pub settings: Arc<Settings>,
    pub shared: Arc<Shared>,
    pub ring: Option<Ring>,
}

#[derive(Debug)]
pub struct Shared {
    pub budget: RetryBudget,
    pub limits: Limits,
    pub pools: Pools,
    pub metrics: Arc<ServiceMetrics>,
    pub outlier: OutlierConfig,
    pub connect: ConnectSettings,
    mode: Mode,
    /// Whether this state's health-check task was started.
    health_started: AtomicBool,
}

impl Shared {
    /// Whether endpoints speak prior-knowledge HTTP/2 (`Mode::H2c`).
    pub fn http2(&self) -> bool {
        self.mode == Mode::H2c
    }
}

impl L7 {
    pub fn new(upstream: &ConnectConfig) -> Self {
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            // Flattened writes: head and a small body go out in one `write`
            // from one buffer; vectored writes only pay off for large bodies,
            // which the proxy streams chunk by chunk either way.
            .writev(false)
            .max_buf_size(MAX_HEADER_BYTES)
            .header_read_timeout(HEADER_READ_TIMEOUT);
        server
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32);
        L7 {
            services: [
                ArcSwap::from_pointee(Services::new()),
                ArcSwap::from_pointee(Services::new()),
            ],
            write: Mutex::new(Synced::default()),
            retired: Mutex::new(Vec::new()),
            upstream: upstream.clone(),
            server,
        }
    }

    /// The L7 state for exactly this snapshot of `port`.
    pub fn service(&self, port: &Arc<ServicePort>) -> Arc<Service> {
        let slot = &self.services[port.family.index()];
        if let Some(s) = slot.load().get(&port.name) {
            if Arc::ptr_eq(&s.port, port) {
                return s.clone();
            }
        }
        let mut w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let cur = slot.load_full();
        let old = cur.get(&port.name);
        // Only a name no sync has seen is a stray: a replaced state's port
        // is in the table synced last, so its removal will be in a diff.
        w.stray |= old.is_none();
        let (svc, built) = self.state_for(port, old);
        if built {
            let mut next = (*cur).clone();
            next.insert(port.name.clone(), svc.clone());
            slot.store(Arc::new(next));
        }
        svc
    }

    /// The state for `port`, given `old`, the current state of its name:
    /// `old` itself when it is for this very snapshot, otherwise a new state
    /// (`true`), and then `old`'s shared part is retired if it was not
    /// reused. Called under the writer lock.
    fn state_for(
        &self,
        port: &Arc<ServicePort>,
        old: Option<&Arc<Service>>,
    ) -> (Arc<Service>, bool) {
        if let Some(s) = old.filter(|s| Arc::ptr_eq(&s.port, port)) {
            return (s.clone(), false);
        }
        let svc = Arc::new(self.build(port, old));
        if let Some(old) = old.filter(|o| !Arc::ptr_eq(&o.shared, &svc.shared)) {
            self.retire(&old.shared);
        }
        (svc, true)
    }

    fn build(&self, port: &Arc<ServicePort>, old: Option<&Arc<Service>>) -> Service {
        let reuse =
            old.filter(|o| o.port.annotations == port.annotations && o.shared.mode == port.mode);
        let (settings, shared) = match reuse {
            Some(o) => (o.settings.clone(), o.shared.clone()),
            None => {
                let (settings, errors) = Settings::from_annotations(&port.name, &port.annotations);
                for e in &errors {
                    tracing::warn!(service = %e.service, key = e.key, value = %e.value, reason = %e.reason, "invalid annotation, using the default");
                }
                let shared = Shared {
                    budget: RetryBudget::new(
                        Duration::from_secs(10),
                        settings.retry_budget_min_per_sec,
                        settings.retry_budget_ratio,
                    ),
                    limits: Limits::default(),
                    pools: Pools::new(port.mode == Mode::H2c, settings.idle_timeout),
                    metrics: crate::metrics::service(&port.name),
                    outlier: OutlierConfig {
                        consecutive: settings.eject_consecutive,
                        base_time: settings.eject_base_time,
                        max_time: settings.eject_max_time,
                        max_percent: settings.max_ejection_percent,
                    },
                    connect: ConnectSettings {
                        // One endpoint per attempt (the retry policy picks
                        // the next), from the node's address.
                        connect: ConnectConfig {
                            timeout: settings.connect_timeout,
                            attempts: 1,
                            keep_client_source: false,
                            ..self.upstream.clone()
                        },
                        max_connections: settings.max_connections,
                        max_pending: settings.max_pending,
                    },
                    mode: port.mode,
                    health_started: AtomicBool::new(false),
                };
                (Arc::new(settings), Arc::new(shared))
            }
        };
        // Idle connections to endpoints that left are closed.
        shared.pools.retain(|a| {
            port.cluster_endpoints.iter().any(|e| e.addr == *a)
                || port.local_endpoints.iter().any(|e| e.addr == *a)
        });
        let ring = match &settings.balance {
            Balance::RingHash(_) => Some(Ring::new(port)),
            Balance::P2cEwma => None,
        };
        Service {
            port: port.clone(),
            settings,
            shared,
            ring,
        }
    }

    /// Brings the L7 state in line with `table`: builds the state of every
    /// HTTP service port (so annotation errors are reported when the
    /// service changes, not at its first request), starts health-check
    /// tasks, and drops the state of service ports that left or are no
    /// longer HTTP.
    ///
    /// Visits only the ports that differ from the table synced last
    /// ([`Table::port_diff`]; visiting every port per table version cost
    /// 21 ms at 10,000 services), and publishes each family's map once per
    /// call at most (its copy is O(1): a persistent map). A table older
    /// than the one synced last is ignored.
    pub fn sync(&self, table: &Arc<Table>, balancers: &Balancers) {
        let mut started = Vec::new();
        {
            let mut w = self.write.lock().unwrap_or_else(|e| e.into_inner());
            if table.version < w.table.version {
                return;
            }
            let cur = self.services.each_ref().map(|m| m.load_full());
            let mut next: [Option<Services>; 2] = [None, None];
            // The map of family `i`, copied on first write.
            fn edit<'a>(
                next: &'a mut [Option<Services>; 2],
                cur: &[Arc<Services>; 2],
                i: usize,
            ) -> &'a mut Services {
                next[i].get_or_insert_with(|| (*cur[i]).clone())
            }
            let rebuild = std::mem::take(&mut w.stray);
            let diff;
            let (changed, removed): (Vec<&Arc<ServicePort>>, Vec<&Arc<ServicePort>>) = if rebuild {
                (
                    table.frontends.values().map(|f| &f.service).collect(),
                    Vec::new(),
                )
            } else {
                diff = table.port_diff(&w.table);
                (diff.changed, diff.removed)
            };
            for port in changed {
                let i = port.family.index();
                if !port.mode.is_l7() {
                    if cur[i].contains_key(&port.name) {
                        if let Some(old) = edit(&mut next, &cur, i).remove(&port.name) {
                            self.retire(&old.shared);
                        }
                    }
                    continue;
                }
                // (A port with several frontends, when every row is visited.)
                let done = next[i].as_ref().and_then(|m| m.get(&port.name));
                if done.is_some_and(|s| Arc::ptr_eq(&s.port, port)) {
                    continue;
                }
                // Replacing a state retires it (`state_for`).
                let (svc, built) = self.state_for(port, cur[i].get(&port.name));
                if svc.settings.health_check.is_some() {
                    started.push(svc.clone());
                }
                if built {
                    edit(&mut next, &cur, i).insert(port.name.clone(), svc);
                }
            }
            for port in removed {
                let i = port.family.index();
                if cur[i].contains_key(&port.name) {
                    if let Some(old) = edit(&mut next, &cur, i).remove(&port.name) {
                        self.retire(&old.shared);
                    }
                }
            }
            if rebuild {
                // What no row names: a state a request created for a port
                // that came and went between two syncs.
                let named: HashSet<(Family, &ServicePortName)> = table
                    .frontends
                    .values()
                    .map(|f| (f.service.family, &f.service.name))
                    .collect();
                for (i, family) in Family::BOTH.into_iter().enumerate() {
                    for (name, old) in cur[i].iter() {
                        if !named.contains(&(family, name)) {
                            edit(&mut next, &cur, i).remove(name);
                            self.retire(&old.shared);
                        }
                    }
                }
            }
            for (slot, map) in self.services.iter().zip(next) {
                if let Some(map) = map {
                    slot.store(Arc::new(map));
                }
            }
            w.table = table.clone();
        }
        for svc in started {
            let Some(hc) = &svc.settings.health_check else {
                continue;
            };
            if !svc.shared.health_started.swap(true, Ordering::AcqRel) {
                let bal = balancers.for_service(&svc.port);
                health::spawn(
                    &bal,
                    &svc.shared,
                    hc.clone(),
                    svc.settings.max_ejection_percent,
                );
            }
        }
    }

    /// Keeps `shared` in the sweep while anything still holds it.
    fn retire(&self, shared: &Arc<Shared>) {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((Arc::downgrade(shared), shared.metrics.clone()));
    }

    /// Closes idle upstream connections that expired or that their peer
    /// closed, in every service (see `upstream`'s module doc), then samples
    /// each used service's open upstream connections into its
    /// `lightpath_http_upstream_connections` gauge. The table sync task
    /// calls it every [`IDLE_SWEEP_INTERVAL`]. How many were closed.
    ///
    /// A service port that left the table is sampled from its retired
    /// states: what they still hold open, and 0 once they are gone, so its
    /// series does not keep the last value it had while it was served.
    pub fn sweep_idle(&self) -> usize {
        let mut closed = 0;
        let services = self.services.each_ref().map(|m| m.load());
        for s in services.iter().flat_map(|m| m.values()) {
            closed += s.shared.pools.sweep();
            // Only once the service's series exist (its first use); the
            // sweep never registers them.
            if s.shared.metrics.is_registered() {
                let open = s.shared.limits.connections.get();
                s.shared.metrics.http_upstream_connections.set(open as f64);
            }
        }
        // Retired states: swept while alive, forgotten once dropped (after
        // this sweep reported them). Upgraded outside the lock, so the last
        // reference never drops under it.
        let retired: Vec<(Option<Arc<Shared>>, Arc<ServiceMetrics>)> = {
            let mut r = self.retired.lock().unwrap_or_else(|e| e.into_inner());
            let all = r.iter().map(|(w, m)| (w.upgrade(), m.clone())).collect();
            r.retain(|(w, _)| w.strong_count() > 0);
            all
        };
        let mut removed: HashMap<&ServicePortName, (&Arc<ServiceMetrics>, usize)> = HashMap::new();
        for (shared, metrics) in &retired {
            let open = match shared {
                Some(shared) => {
                    closed += shared.pools.sweep();
                    shared.limits.connections.get()
                }
                None => 0,
            };
            // A name still served is reported by its current state above.
            if metrics.is_registered() && !services.iter().any(|m| m.contains_key(&metrics.name)) {
                removed.entry(&metrics.name).or_insert((metrics, 0)).1 += open;
            }
        }
        for (metrics, open) in removed.into_values() {
            metrics.http_upstream_connections.set(open as f64);
        }
        closed
    }

    /// Serves HTTP on one redirected connection until the client closes it
    /// or the drain deadline passes. On the drain signal, HTTP/1.1 finishes
    /// the request in progress and closes; HTTP/2 sends GOAWAY. `(scope,
    /// source)`: the endpoint set and upstream source the accept path chose
    /// for this client.
    #[allow(clippy::too_many_arguments)]
    pub async fn serve_connection(
        self: &Arc<Self>,
        sock: TcpStream,
        peer: SocketAddr,
        frontend: &Frontend,
        balancer: Arc<Balancer>,
        (scope, source): (Scope, crate::l4::Source),
        drain: &drain::Watch,
    ) {
        let _ = sock.set_nodelay(true);
        let port = &frontend.service;
        // Creates (or refreshes) the service's L7 state before the first
        // request, so annotation errors are logged once, at the edge.
        let svc = self.service(port);
        let ctx = Arc::new(proxy::ClientConn {
            l7: self.clone(),
            svc: ArcSwap::new(svc),
            balancer,
            scope,
            peer,
            source,
            forwarded: headers::ClientAddr::new(peer.ip()),
        });
        let svc = service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(proxy::handle(ctx, req).await) }
        });
        let conn = self
            .server
            .serve_connection_with_upgrades(TokioIo::new(sock), svc);
        tokio::pin!(conn);
        // The drain signal is polled only when it fired (see `crate::rare`), not at
        // every wake-up of the connection.
        let signaled = std::pin::pin!(drain.signaled());
        let mut signaled = crate::rare::Rare::new(signaled);
        let first = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            signaled.poll_rare(cx).map(|()| None)
        })
        .await;
        let result = match first {
            Some(r) => r,
            None => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = drain.forced() => return,
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, service = %port.name, error = %e, "http connection ended with error");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use control::{Endpoint, Frontend, FrontendKind, Protocol, Table};

    use super::*;
    use crate::balance::BalanceConfig;

    /// The two rows of a dual-stack HTTP service port keep one state each,
    /// whichever family a request comes on, and a sync keeps both: keyed by
    /// name alone, each family's request replaced the other's state (and
    /// closed its idle upstream connections).
    #[tokio::test]
    async fn each_family_of_a_dual_stack_port_keeps_its_own_state() {
        let l7 = L7::new(&ConnectConfig::default());
        let port = |ip: IpAddr| {
            Arc::new(ServicePort::new(
                ServicePortName::new("t", "web", "http"),
                Protocol::Tcp,
                Mode::Http,
                Arc::from([Endpoint::ready(SocketAddr::new(ip, 8080))]),
            ))
        };
        let (v4, v6) = (port([10, 1, 0, 1].into()), port("fd00::1".parse().unwrap()));
        let (s4, s6) = (l7.service(&v4), l7.service(&v6));
        assert!(!Arc::ptr_eq(&s4.shared, &s6.shared));
        for _ in 0..3 {
            assert!(Arc::ptr_eq(&l7.service(&v4), &s4), "IPv4 state rebuilt");
            assert!(Arc::ptr_eq(&l7.service(&v6), &s6), "IPv6 state rebuilt");
        }
        let row = |ip: IpAddr, p: &Arc<ServicePort>| {
            Frontend::new(SocketAddr::new(ip, 80), FrontendKind::ClusterIp, p.clone())
        };
        let table = Table::new(
            1,
            [
                row([10, 96, 0, 1].into(), &v4),
                row("fd00:96::1".parse().unwrap(), &v6),
            ],
        );
        l7.sync(&Arc::new(table), &Balancers::new(BalanceConfig::default()));
        assert!(Arc::ptr_eq(&l7.service(&v4), &s4));
        assert!(Arc::ptr_eq(&l7.service(&v6), &s6));
    }

    /// `sync` visits only what changed since the table it synced last, and
    /// still ends exact: a changed port gets a state for its new row (its
    /// shared part kept), a port no longer HTTP or gone is dropped, a port
    /// that became HTTP gets one, a state a request created for a port no
    /// synced table has is dropped by the next sync, and an older table
    /// changes nothing.
    #[tokio::test]
    async fn sync_follows_each_change_and_ends_exact() {
        let l7 = L7::new(&ConnectConfig::default());
        let bal = Balancers::new(BalanceConfig::default());
        let port = |name: &str, mode: Mode, ep: u8| {
            Arc::new(ServicePort::new(
                ServicePortName::new("t", name, "http"),
                Protocol::Tcp,
                mode,
                Arc::from([Endpoint::ready(SocketAddr::from(([10, 1, 0, ep], 8080)))]),
            ))
        };
        let table = |version: u64, ports: &[&Arc<ServicePort>]| {
            let rows = ports.iter().enumerate().map(|(i, p)| {
                let addr = SocketAddr::from(([10, 96, 0, i as u8], 80));
                Frontend::new(addr, FrontendKind::ClusterIp, (*p).clone())
            });
            Arc::new(Table::new(version, rows))
        };
        let names = |l7: &L7| {
            let mut v: Vec<String> = l7.services[0]
                .load()
                .values()
                .map(|s| format!("{}@{}", s.port.name.name, s.port.cluster_endpoints[0].addr))
                .collect();
            v.sort();
            v
        };
        let (a, b, c) = (
            port("a", Mode::Http, 1),
            port("b", Mode::Http, 2),
            port("c", Mode::L4, 3),
        );
        l7.sync(&table(1, &[&a, &b, &c]), &bal);
        assert_eq!(names(&l7), ["a@10.1.0.1:8080", "b@10.1.0.2:8080"]);
        let shared_a = l7.service(&a).shared.clone();
        let (a2, b2, c2) = (
            port("a", Mode::Http, 9),
            port("b", Mode::L4, 2),
            port("c", Mode::Http, 3),
        );
        l7.sync(&table(2, &[&a2, &b2, &c2]), &bal);
        assert_eq!(names(&l7), ["a@10.1.0.9:8080", "c@10.1.0.3:8080"]);
        assert!(
            Arc::ptr_eq(&l7.service(&a2).shared, &shared_a),
            "shared part rebuilt"
        );
        l7.sync(&table(3, &[&b2, &c2]), &bal);
        assert_eq!(names(&l7), ["c@10.1.0.3:8080"]);
        // A request with a newer row of a synced port replaces its state
        // without making the next sync visit every row.
        let c3 = port("c", Mode::Http, 7);
        l7.service(&c3);
        assert!(
            !l7.write.lock().unwrap().stray,
            "a replaced state is no stray"
        );
        assert_eq!(names(&l7), ["c@10.1.0.7:8080"]);
        l7.service(&c2);
        l7.service(&port("d", Mode::Http, 4));
        assert!(l7.write.lock().unwrap().stray);
        assert_eq!(names(&l7).len(), 2);
        l7.sync(&table(4, &[&b2, &c2]), &bal);
        assert_eq!(names(&l7), ["c@10.1.0.3:8080"]);
        l7.sync(&table(2, &[&a2, &b2, &c2]), &bal);
        assert_eq!(names(&l7), ["c@10.1.0.3:8080"], "an older table applied");
    }
}
