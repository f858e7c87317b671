//! kube-proxy's health contract, answered exactly as kube-proxy answers it.
//!
//! Why exact: the consumers are not ours. The kubelet probes `:10256/healthz`
//! or `/livez`; cloud load balancers probe `:10256/healthz` for
//! `externalTrafficPolicy: Cluster` services and each service's
//! `healthCheckNodePort` for `externalTrafficPolicy: Local` ones, and some of
//! them read the JSON body or the `X-Load-Balancing-Endpoint-Weight` header.
//! Following kubernetes/kubernetes `pkg/proxy/healthcheck`:
//!
//! * the proxy is healthy unless a table change has been waiting longer than
//!   the health timeout without being applied to the data plane (per IP
//!   family: `queued_update` when a change arrives, `updated` once applied);
//!   it is healthy while starting up;
//! * `/healthz` additionally requires the node to be eligible (not being
//!   deleted, not tainted `ToBeDeletedByClusterAutoscaler`), `/livez` does not;
//! * a health-check node port answers 200 iff the service has at least one
//!   *ready* endpoint on this node (serving-but-terminating ones do not count,
//!   so a load balancer drains the node) and the proxy is healthy; local
//!   endpoints are counted by distinct IP across the service's ports.
//!
//! lightpath adds `/readyz` on the same server: the process's own readiness
//! (start-up finished, not draining), for the DaemonSet's readiness probe.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use control::{EndpointState, Table};
use http::{HeaderValue, Request, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::web::{self, Handler, Resp};
use crate::lifecycle::Readiness;

/// kube-proxy's default: twice its 30 s sync period.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// Go's zero `time.Time`, which kube-proxy prints before its first sync.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub const BOTH: [IpFamily; 2] = [IpFamily::IPv4, IpFamily::IPv6];
}

/// The proxier's sync clock and the node's eligibility. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ProxyHealth {
    inner: Arc<Mutex<HealthInner>>,
    timeout: Duration,
}

#[derive(Debug)]
struct HealthInner {
    last_updated: BTreeMap<IpFamily, SystemTime>,
    oldest_pending: BTreeMap<IpFamily, Instant>,
    node_eligible: bool,
}

/// kube-proxy's `ProxierHealth`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProxierHealth {
    #[serde(rename = "lastUpdated")]
    pub last_updated: String,
    pub healthy: bool,
}

/// kube-proxy's `ProxyHealth` JSON, field for field and in its order.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HealthReport {
    #[serde(rename = "lastUpdated")]
    pub last_updated: String,
    #[serde(rename = "currentTime")]
    pub current_time: String,
    #[serde(rename = "nodeEligible", skip_serializing_if = "Option::is_none")]
    pub node_eligible: Option<bool>,
    pub healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub status: BTreeMap<IpFamily, ProxierHealth>,
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Self {
        ProxyHealth {
            inner: Arc::new(Mutex::new(HealthInner {
                last_updated: BTreeMap::new(),
                oldest_pending: BTreeMap::new(),
                // Eligible while starting up, as kube-proxy before it has seen
                // its Node; a Node source sets it from the Node object.
                node_eligible: true,
            })),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A table change arrived for `family` and is not yet applied.
    pub fn queued_update(&self, family: IpFamily) {
        self.lock()
            .oldest_pending
            .entry(family)
            .or_insert_with(Instant::now);
    }

    /// The data plane for `family` now reflects the latest table.
    pub fn updated(&self, family: IpFamily) {
        let mut inner = self.lock();
        inner.oldest_pending.remove(&family);
        inner.last_updated.insert(family, SystemTime::now());
        drop(inner);
        crate::metrics::node().mark_synced();
    }

    /// `queued_update` for both families.
    pub fn queued_update_all(&self) {
        IpFamily::BOTH.iter().for_each(|f| self.queued_update(*f));
    }

    /// `updated` for both families.
    pub fn updated_all(&self) {
        IpFamily::BOTH.iter().for_each(|f| self.updated(*f));
    }

    /// From the Node object: false while it is being deleted or is tainted
    /// `ToBeDeletedByClusterAutoscaler`.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    /// kube-proxy's `Health()`: unhealthy iff some family has had an update
    /// queued for longer than the timeout.
    pub fn report(&self) -> HealthReport {
        let inner = self.lock();
        let now = SystemTime::now();
        let mut healthy = true;
        let mut status = BTreeMap::new();
        let mut newest: Option<SystemTime> = None;
        for (family, at) in &inner.last_updated {
            newest = newest.max(Some(*at));
            let late = inner
                .oldest_pending
                .get(family)
                .is_some_and(|queued| queued.elapsed() >= self.timeout);
            if late {
                healthy = false;
            }
            status.insert(
                *family,
                ProxierHealth {
                    last_updated: go_time(Some(*at)),
                    healthy: !late,
                },
            );
        }
        HealthReport {
            last_updated: go_time(newest),
            current_time: go_time(Some(now)),
            node_eligible: None,
            healthy,
            status,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.report().healthy
    }
}

/// RFC 3339 with as many fractional digits as needed, as Go's `time.Time`
/// marshals to JSON (UTC).
fn go_time(t: Option<SystemTime>) -> String {
    match t.and_then(|t| jiff::Timestamp::try_from(t).ok()) {
        Some(ts) => ts.to_string(),
        None => GO_ZERO_TIME.to_string(),
    }
}

/// Headers kube-proxy sets on every health response.
fn kube_proxy_response(status: StatusCode, body: Vec<u8>) -> Resp {
    let mut r = web::json_bytes(status, body);
    r.headers_mut().insert(
        "X-Content-Type-Options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn health_body(mut report: HealthReport, healthy: bool) -> Resp {
    if healthy {
        // kube-proxy: a healthy answer reports lastUpdated as "now".
        report.last_updated = report.current_time.clone();
    }
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    match serde_json::to_vec(&report) {
        Ok(body) => kube_proxy_response(status, body),
        Err(e) => web::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `/healthz`: healthy and the node is eligible.
pub fn healthz(health: &ProxyHealth) -> Resp {
    let mut report = health.report();
    let eligible = health.node_eligible();
    report.node_eligible = Some(eligible);
    let healthy = report.healthy && eligible;
    health_body(report, healthy)
}

/// `/livez`: healthy, whatever the node's state.
pub fn livez(health: &ProxyHealth) -> Resp {
    let report = health.report();
    let healthy = report.healthy;
    health_body(report, healthy)
}

/// `/readyz` (and the admin API's `/ready`): start-up finished and not draining.
pub fn readyz(readiness: &Readiness) -> Resp {
    let status = readiness.status();
    let code = if status.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    #[derive(Serialize)]
    struct Body<'a> {
        ready: bool,
        draining: bool,
        waiting_for: &'a [String],
        /// One line for a human reading a failed probe.
        reason: String,
    }
    let reason = if status.draining {
        "shutting down: draining connections".to_string()
    } else if status.ready {
        "ready".to_string()
    } else {
        format!("waiting for {}", status.waiting_for.join(", "))
    };
    web::json(
        code,
        &Body {
            ready: status.ready,
            draining: status.draining,
            waiting_for: &status.waiting_for,
            reason,
        },
    )
}

/// The handler of the proxy health server (default `0.0.0.0:10256`).
pub fn proxy_health_handler(health: ProxyHealth, readiness: Readiness) -> Handler {
    Arc::new(move |req: &Request<Incoming>| match req.uri().path() {
        "/healthz" => healthz(&health),
        "/livez" => livez(&health),
        "/readyz" => readyz(&readiness),
        _ => web::text(StatusCode::NOT_FOUND, "404 page not found\n"),
    })
}

/// `namespace/name` of a Service (health-check node ports are per Service,
/// not per port).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the table says about one health-checked Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealthSpec {
    pub port: u16,
    /// Distinct IPs of this node's *ready* endpoints, across all ports.
    pub local_ready_endpoints: usize,
}

/// kube-proxy's `SyncServices` + `SyncEndpoints` inputs, from one table.
pub fn health_checked_services(table: &Table) -> BTreeMap<NamespacedName, ServiceHealthSpec> {
    let mut ports: BTreeMap<NamespacedName, u16> = BTreeMap::new();
    let mut ips: BTreeMap<NamespacedName, BTreeSet<IpAddr>> = BTreeMap::new();
    for fe in table.frontends.values() {
        let svc = &fe.service;
        let Some(port) = svc.health_check_node_port else {
            continue;
        };
        let nsn = NamespacedName {
            namespace: svc.name.namespace.clone(),
            name: svc.name.name.clone(),
        };
        ports.insert(nsn.clone(), port);
        let set = ips.entry(nsn).or_default();
        set.extend(
            svc.local_endpoints
                .iter()
                .filter(|ep| ep.state == EndpointState::Ready)
                .map(|ep| ep.addr.ip()),
        );
    }
    ports
        .into_iter()
        .map(|(nsn, port)| {
            let local_ready_endpoints = ips.get(&nsn).map_or(0, BTreeSet::len);
            (
                nsn,
                ServiceHealthSpec {
                    port,
                    local_ready_endpoints,
                },
            )
        })
        .collect()
}

/// kube-proxy's per-service health-check response.
pub fn service_health_response(nsn: &NamespacedName, count: usize, proxy_healthy: bool) -> Resp {
    let code = if count != 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // kube-proxy prints this exact shape (tab-indented, no trailing newline).
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        json_string(&nsn.namespace),
        json_string(&nsn.name),
        count,
        proxy_healthy
    );
    let mut r = kube_proxy_response(code, body.into_bytes());
    r.headers_mut().insert(
        "X-Load-Balancing-Endpoint-Weight",
        HeaderValue::from(count as u64),
    );
    r
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

struct Instance {
    port: u16,
    count: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The health-check node port listeners, opened and closed to follow the
/// table. Runs on the admin runtime.
pub struct ServiceHealthServers {
    bind_ips: Vec<IpAddr>,
    health: ProxyHealth,
    services: BTreeMap<NamespacedName, Instance>,
    shutdown: watch::Receiver<bool>,
}

impl ServiceHealthServers {
    /// `bind_ips`: where to listen (kube-proxy: every node IP, i.e. 0.0.0.0
    /// unless `--nodeport-addresses` narrows it).
    pub fn new(
        bind_ips: Vec<IpAddr>,
        health: ProxyHealth,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let bind_ips = if bind_ips.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            bind_ips
        };
        ServiceHealthServers {
            bind_ips,
            health,
            services: BTreeMap::new(),
            shutdown,
        }
    }

    /// Opens, closes and updates listeners to match `table`. A port that
    /// cannot be bound is logged and retried on the next sync. Must run inside
    /// a tokio runtime.
    pub fn sync(&mut self, table: &Table) {
        let wanted = health_checked_services(table);
        self.services.retain(|nsn, inst| {
            let keep = wanted.get(nsn).is_some_and(|s| s.port == inst.port);
            if !keep {
                tracing::info!(service = %nsn, port = inst.port, "closing health-check node port");
            }
            keep
        });
        for (nsn, spec) in wanted {
            if let Some(inst) = self.services.get(&nsn) {
                inst.count.store(
                    spec.local_ready_endpoints,
                    std::sync::atomic::Ordering::Relaxed,
                );
                continue;
            }
            match self.open(&nsn, &spec) {
                Ok(inst) => {
                    tracing::info!(service = %nsn, port = spec.port, "opened health-check node port");
                    self.services.insert(nsn, inst);
                }
                Err(e) => tracing::error!(
                    service = %nsn,
                    port = spec.port,
                    error = %e,
                    "failed to start health-check node port; retrying on the next table change"
                ),
            }
        }
    }

    fn open(&self, nsn: &NamespacedName, spec: &ServiceHealthSpec) -> std::io::Result<Instance> {
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(
            spec.local_ready_endpoints,
        ));
        let handler: Handler = {
            let count = Arc::clone(&count);
            let health = self.health.clone();
            let nsn = nsn.clone();
            Arc::new(move |_req: &Request<Incoming>| {
                let n = count.load(std::sync::atomic::Ordering::Relaxed);
                service_health_response(&nsn, n, health.is_healthy())
            })
        };
        let mut inst = Instance {
            port: spec.port,
            count,
            tasks: Vec::new(),
        };
        for ip in &self.bind_ips {
            // On error `inst` drops and aborts the listeners opened so far.
            let std_listener = web::bind(SocketAddr::new(*ip, spec.port))?;
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            inst.tasks.push(tokio::spawn(web::serve(
                listener,
                Arc::clone(&handler),
                self.shutdown.clone(),
            )));
        }
        Ok(inst)
    }

    /// `(service, port, local ready endpoints)` for every open listener.
    pub fn listening(&self) -> Vec<(NamespacedName, u16, usize)> {
        self.services
            .iter()
            .map(|(nsn, inst)| {
                (
                    nsn.clone(),
                    inst.port,
                    inst.count.load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_while_starting_and_after_updates() {
        let h = ProxyHealth::new(Duration::from_millis(50));
        let r = h.report();
        assert!(r.healthy);
        assert_eq!(r.last_updated, GO_ZERO_TIME);
        assert!(r.status.is_empty());
        h.queued_update(IpFamily::IPv4);
        // Queued but never updated before: no lastUpdated entry, still healthy
        // (kube-proxy only judges families that have synced once).
        std::thread::sleep(Duration::from_millis(60));
        assert!(h.is_healthy());
        h.updated(IpFamily::IPv4);
        assert!(h.is_healthy());
        h.queued_update(IpFamily::IPv4);
        assert!(h.is_healthy(), "queued but not late yet");
        std::thread::sleep(Duration::from_millis(60));
        let r = h.report();
        assert!(!r.healthy);
        assert!(!r.status[&IpFamily::IPv4].healthy);
        h.updated(IpFamily::IPv4);
        assert!(h.is_healthy());
    }

    #[test]
    fn report_json_has_kube_proxy_shape() {
        let h = ProxyHealth::new(DEFAULT_HEALTH_TIMEOUT);
        h.updated(IpFamily::IPv4);
        let mut r = h.report();
        r.node_eligible = Some(true);
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "currentTime",
                "healthy",
                "lastUpdated",
                "nodeEligible",
                "status"
            ]
        );
        assert!(v["status"]["IPv4"]["healthy"].as_bool().unwrap());
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.starts_with("{\"lastUpdated\":"), "{text}");
        let now = v["currentTime"].as_str().unwrap();
        assert!(now.ends_with('Z'), "{now}");
        now.parse::<jiff::Timestamp>().expect("RFC 3339");
    }
}
