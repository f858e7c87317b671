//! Per-service-port load balancing: peak-EWMA power of two choices.
//!
//! Why p2c over peak-EWMA (the linkerd2-proxy / Finagle design): kube-proxy
//! picks endpoints uniformly at random, so one slow or overloaded pod gets the
//! same share as a healthy one. Comparing two random endpoints by
//! `latency estimate × (in-flight + 1)` steers load away from slow or busy
//! endpoints at O(1) per pick, without the herding a global "least loaded"
//! choice causes when every proxy sees the same numbers.
//!
//! Shape, shared by the L4 relay and the L7 stack:
//! * [`Balancers`]: the registry, one [`Balancer`] per [`ServicePortName`],
//!   synchronised from each new table snapshot.
//! * [`Balancer::pick`]: lock-free read of the current endpoint set
//!   (arc-swap), two random ready candidates, the cheaper wins; ClientIP
//!   affinity first when the service asks for it.
//! * [`Pick`]: holds the chosen [`Backend`] with an in-flight slot; the caller
//!   reports the latency (L4: connect time; L7: time to first response
//!   frame) or a failure; dropping it frees the slot.
//! * Readiness: [`Balancer::eject`] / [`Balancer::readmit`] mark a backend
//!   not-ready (outlier ejection, breakers, health checks), bounded by a
//!   maximum ejected share so a bad signal cannot empty the set.
//!
//! Defaults follow linkerd2-proxy: the first endpoints of a service start at
//! 30 ms (never zero, or they would look free and take every new
//! connection), and the estimate decays over 10 s. An endpoint added to a
//! running set starts at its ready peers' mean estimate instead (Finagle's
//! Aperture), so it is neither flooded nor starved (see `initial_rtt`).

mod affinity;
mod backend;
mod ewma;
mod outlier;
mod registry;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use control::{Affinity, Endpoint, Frontend, ServicePort, ServicePortName};
use rand::Rng;
use tokio::time::Instant;

use affinity::AffinityMap;
pub use backend::Backend;
pub use outlier::OutlierConfig;
pub use registry::Balancers;
pub(crate) use registry::Synced;

/// Balancer settings. One value for the whole process; per-service overrides
/// (annotations) are the L7 layer's business.
#[derive(Debug, Clone)]
pub struct BalanceConfig {
    /// Latency assumed for an endpoint before its first sample. linkerd2-proxy
    /// uses 30 ms: high enough that a brand-new endpoint is not flooded before
    /// it has proven itself, low enough that it is tried soon.
    pub default_rtt: Duration,
    /// Decay window of the peak-EWMA estimate (linkerd2-proxy: 10 s).
    pub decay: Duration,
    /// The latency sample recorded for a failed attempt (refused or timed-out
    /// connect). Equal to the default connect timeout: a failed endpoint then
    /// looks as bad as the slowest possible success and is avoided while the
    /// peak decays, but is tried again later without any special recovery code.
    pub failure_penalty: Duration,
    /// At most this share (percent) of a set may be ejected at once; at least
    /// one endpoint may always be ejected. Envoy defaults to 10 %, which for
    /// the 2–5 pod services that dominate Kubernetes means "one"; 50 % keeps
    /// that for small sets while letting a large set shed a failing zone.
    pub max_ejection_percent: u8,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
            failure_penalty: Duration::from_secs(1),
            max_ejection_percent: 50,
        }
    }
}

/// Which of a service port's two endpoint sets a frontend uses.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `cluster_endpoints`: traffic policy Cluster.
    Cluster,
    /// `local_endpoints`: traffic policy Local for this kind of frontend.
    Local,
}

impl Scope {
    /// The scope for a connection from `client`: [`Scope::of`], except that
    /// a client on this node (one of its addresses, or in its pod CIDRs)
    /// reaching an external frontend of an `externalTrafficPolicy: Local`
    /// service is served from the cluster set (kube-proxy's short-circuit; mirrors
    /// `ServicePort::endpoints_for_client`). The node's addresses are only
    /// consulted for such frontends.
    pub fn for_client(frontend: &Frontend, client: std::net::IpAddr) -> Scope {
        let svc = &frontend.service;
        let on_node = || {
            let ip = client.to_canonical();
            crate::local_addrs::is_local(ip) || svc.local_pod_cidrs.iter().any(|n| n.contains(&ip))
        };
        if frontend.kind.is_external() && svc.external_local && on_node() {
            Scope::Cluster
        } else {
            Scope::of(frontend)
        }
    }

    /// The service port's endpoint set of this scope.
    pub fn endpoints(self, service: &control::ServicePort) -> &[control::Endpoint] {
        match self {
            Scope::Cluster => &service.cluster_endpoints,
            Scope::Local => &service.local_endpoints,
        }
    }

    /// The scope the model uses for `frontend` (mirrors
    /// `ServicePort::endpoints_for`).
    pub fn of(frontend: &Frontend) -> Scope {
        let svc = &frontend.service;
        let local = if frontend.kind.is_external() {
            svc.external_local
        } else {
            svc.internal_local
        };
        if local {
            Scope::Local
        } else {
            Scope::Cluster
        }
    }
}

/// Why an ejection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EjectError {
    #[error("{service}: endpoint {addr} is not in the endpoint set")]
    Unknown {
        service: ServicePortName,
        addr: SocketAddr,
    },
    #[error("{service}: ejecting {addr} would exceed the maximum ejected share ({ejected} of {total} already ejected)")]
    LimitReached {
        service: ServicePortName,
        addr: SocketAddr,
        ejected: usize,
        total: usize,
    },
}

/// One endpoint set as published to the hot path.
#[derive(Debug)]
struct State {
    service: Arc<ServicePort>,
    /// Version of the newest table `service` is known to be in (0 when
    /// unknown), so an update from an older snapshot never replaces a newer
    /// one. Raised in place when a newer table brings the same row (a sync
    /// that visits every row, or a port listed for a new frontend), so the
    /// same row never costs a new state.
    version: AtomicU64,
    cluster: Box<[Arc<Backend>]>,
    local: Box<[Arc<Backend>]>,
}

impl State {
    fn set(&self, scope: Scope) -> &[Arc<Backend>] {
        match scope {
            Scope::Cluster => &self.cluster,
            Scope::Local => &self.local,
        }
    }
}

/// The balancer of one service port.
#[derive(Debug)]
pub struct Balancer {
    name: ServicePortName,
    cfg: BalanceConfig,
    state: ArcSwap<State>,
    /// Created on first use by a ClientIP service; separate maps per scope so
    /// a Local frontend never inherits a Cluster-only endpoint.
    affinity: [AffinityMap; 2],
    /// Serialises ejection decisions (never taken by `pick`).
    eject_lock: Mutex<()>,
    /// This service port's metric handles, registered once.
    metrics: Arc<crate::metrics::ServiceMetrics>,
    /// Woken whenever a new endpoint set is published, for requests waiting
    /// for an endpoint (see [`Balancer::wait_for_endpoints`]).
    changed: tokio::sync::Notify,
}

impl Balancer {
    /// A balancer for `service`'s current endpoints.
    pub fn new(service: &Arc<ServicePort>, cfg: BalanceConfig) -> Self {
        let state = build_state(service, 0, &HashMap::new(), &cfg);
        Balancer {
            name: service.name.clone(),
            cfg,
            state: ArcSwap::from_pointee(state),
            affinity: [AffinityMap::new(), AffinityMap::new()],
            eject_lock: Mutex::new(()),
            metrics: crate::metrics::service(&service.name),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub fn name(&self) -> &ServicePortName {
        &self.name
    }

    /// The service port's metric handles (no lookup: a field).
    pub fn metrics(&self) -> &Arc<crate::metrics::ServiceMetrics> {
        &self.metrics
    }

    /// The service port this balancer last applied.
    pub fn service(&self) -> Arc<ServicePort> {
        self.state.load().service.clone()
    }

    /// Whether `service` is exactly the snapshot already applied (pointer
    /// equality: the model shares unchanged `Arc<ServicePort>`s).
    pub fn is_current(&self, service: &Arc<ServicePort>) -> bool {
        Arc::ptr_eq(&self.state.load().service, service)
    }

    /// Applies a new snapshot of the service port: backends that stay keep
    /// their statistics, new ones start at the default RTT, removed ones are
    /// simply no longer picked (connections holding them are untouched).
    ///
    /// Unversioned: applies `service` whenever it differs from the current
    /// one. Prefer [`Balancer::apply`] when the table version is known.
    pub fn update(&self, service: &Arc<ServicePort>) {
        self.apply_inner(service, None);
    }

    /// Like [`Balancer::update`], but ignores `service` when it comes from an
    /// older table than the one already applied: a connection task still
    /// holding an older snapshot cannot roll the endpoint set back.
    /// Returns whether the endpoint set is now `service`'s.
    pub fn apply(&self, service: &Arc<ServicePort>, table_version: u64) -> bool {
        self.apply_inner(service, Some(table_version))
    }

    fn apply_inner(&self, service: &Arc<ServicePort>, version: Option<u64>) -> bool {
        // The row already applied (tables share unchanged rows): only its
        // version is raised, without a new state and its swap.
        //
        // Raising the version of a state about to be replaced is harmless:
        // the row of every table from the one that brought `service` to
        // `version` is this same `Arc` (the state holds it alive, so its
        // address is not reused), so a replacing row comes from an older
        // table, which the swap below refuses, or a newer one.
        let cur = self.state.load();
        if Arc::ptr_eq(&cur.service, service) {
            let Some(v) = version else { return true };
            let have = cur.version.load(Ordering::Acquire);
            if v > have {
                cur.version.fetch_max(v, Ordering::AcqRel);
            }
            return v >= have;
        }
        drop(cur);
        let mut applied = true;
        let mut replaced = false;
        self.state.rcu(|old| {
            applied = true;
            replaced = false;
            let have = old.version.load(Ordering::Acquire);
            let v = version.unwrap_or(have);
            if v < have {
                applied = false;
                return old.clone();
            }
            if Arc::ptr_eq(&old.service, service) {
                old.version.fetch_max(v, Ordering::AcqRel);
                return old.clone();
            }
            let mut known: HashMap<SocketAddr, Arc<Backend>> = HashMap::new();
            for b in old.cluster.iter().chain(old.local.iter()) {
                known.insert(b.addr(), b.clone());
            }
            replaced = true;
            Arc::new(build_state(service, v, &known, &self.cfg))
        });
        if replaced {
            self.changed.notify_waiters();
        }
        applied
    }

    /// Whether `scope`'s set has any endpoint (O(1)).
    pub fn has_endpoints(&self, scope: Scope) -> bool {
        !self.state.load().set(scope).is_empty()
    }

    /// Resolves once `scope`'s set has an endpoint (at once if it has one).
    /// Woken by every published update, so it never polls; the caller
    /// bounds the wait (the L7 fail-fast queue).
    pub async fn wait_for_endpoints(&self, scope: Scope) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so an update between the check
            // and the await still wakes us.
            notified.as_mut().enable();
            if self.has_endpoints(scope) {
                return;
            }
            notified.await;
        }
    }

    /// The backends currently in `scope`'s set.
    pub fn backends(&self, scope: Scope) -> Vec<Arc<Backend>> {
        self.state.load().set(scope).to_vec()
    }

    /// The backend for `addr` in either set.
    pub fn backend(&self, addr: SocketAddr) -> Option<Arc<Backend>> {
        let st = self.state.load();
        st.cluster
            .iter()
            .chain(st.local.iter())
            .find(|b| b.addr() == addr)
            .cloned()
    }

    /// Chooses an endpoint of `scope`'s set for a connection or request from
    /// `client`, never one in `exclude` (the endpoints already tried).
    ///
    /// Not-ready backends are skipped while any other is usable; if every
    /// remaining backend is not ready, one of them is still returned (an
    /// ejection signal must never turn into a total outage). `None` only when
    /// the set minus `exclude` is empty.
    pub fn pick(&self, scope: Scope, client: IpAddr, exclude: &[SocketAddr]) -> Option<Pick> {
        let st = self.state.load();
        let set = st.set(scope);
        if set.is_empty() {
            return None;
        }
        let now = Instant::now();
        let sticky = match st.service.affinity {
            Affinity::ClientIp { timeout } => Some(timeout),
            Affinity::None => None,
        };
        let map = &self.affinity[scope as usize];
        if let Some(timeout) = sticky {
            if let Some(addr) = map.get(client, timeout, now) {
                let hit = set
                    .iter()
                    .find(|b| b.addr() == addr && b.is_ready() && !exclude.contains(&addr));
                if let Some(b) = hit {
                    map.set(client, addr, timeout, now);
                    return Some(Pick::new(b.clone(), now, self.cfg.failure_penalty));
                }
            }
        }
        let chosen = p2c(set, exclude, now)?;
        if let Some(timeout) = sticky {
            map.set(client, chosen.addr(), timeout, now);
        }
        Some(Pick::new(chosen.clone(), now, self.cfg.failure_penalty))
    }

    /// A [`Pick`] of the specific endpoint `addr` in `scope`'s set, for
    /// policies that choose the endpoint themselves (L7 ring-hash); `None`
    /// when `addr` is not in the set.
    pub fn pick_endpoint(&self, scope: Scope, addr: SocketAddr) -> Option<Pick> {
        let st = self.state.load();
        let b = st.set(scope).iter().find(|b| b.addr() == addr)?;
        Some(Pick::new(
            b.clone(),
            Instant::now(),
            self.cfg.failure_penalty,
        ))
    }

    /// Marks `addr` not-ready so p2c skips it, unless that would put more
    /// than `max_ejection_percent` of its set (at least one endpoint) out.
    pub fn eject(&self, addr: SocketAddr) -> Result<(), EjectError> {
        self.eject_within(addr, self.cfg.max_ejection_percent)
            .map(|_| ())
    }

    /// [`Self::eject`] with a per-service maximum ejected share (percent).
    /// `Ok(true)` when this call ejected `addr`, `Ok(false)` when it was
    /// already ejected.
    pub fn eject_within(&self, addr: SocketAddr, max_percent: u8) -> Result<bool, EjectError> {
        let _g = self.eject_lock.lock().unwrap_or_else(|e| e.into_inner());
        let st = self.state.load();
        let mut found = None;
        let mut worst = (0usize, 0usize);
        for set in [&st.cluster, &st.local] {
            if let Some(b) = set.iter().find(|b| b.addr() == addr) {
                if !b.is_ready() {
                    return Ok(false);
                }
                found = Some(b.clone());
                let ejected = set.iter().filter(|b| !b.is_ready()).count();
                let allowed = (set.len() * usize::from(max_percent) / 100).max(1);
                if ejected + 1 > allowed {
                    worst = (ejected, set.len());
                }
            }
        }
        let Some(b) = found else {
            return Err(EjectError::Unknown {
                service: self.name.clone(),
                addr,
            });
        };
        if worst.1 > 0 {
            return Err(EjectError::LimitReached {
                service: self.name.clone(),
                addr,
                ejected: worst.0,
                total: worst.1,
            });
        }
        b.set_ready(false);
        self.metrics.ejections.increment(1);
        Ok(true)
    }

    /// Marks `addr` ready again. Returns false when it is not in the set.
    pub fn readmit(&self, addr: SocketAddr) -> bool {
        match self.backend(addr) {
            Some(b) => {
                if !b.is_ready() {
                    self.metrics.readmissions.increment(1);
                }
                b.set_ready(true);
                true
            }
            None => false,
        }
    }
}

fn build_state(
    service: &Arc<ServicePort>,
    version: u64,
    known: &HashMap<SocketAddr, Arc<Backend>>,
    cfg: &BalanceConfig,
) -> State {
    let seed = initial_rtt(service, known, cfg.default_rtt);
    let mut fresh: HashMap<SocketAddr, Arc<Backend>> = HashMap::new();
    let mut get = |ep: &Endpoint| -> Arc<Backend> {
        if let Some(b) = known.get(&ep.addr).or_else(|| fresh.get(&ep.addr)) {
            return b.clone();
        }
        let b = Arc::new(Backend::new(ep.addr, seed, cfg.decay));
        fresh.insert(ep.addr, b.clone());
        b
    };
    let cluster: Box<[Arc<Backend>]> = service.cluster_endpoints.iter().map(&mut get).collect();
    let local: Box<[Arc<Backend>]> = service.local_endpoints.iter().map(&mut get).collect();
    State {
        service: service.clone(),
        version: AtomicU64::new(version),
        cluster,
        local,
    }
}

/// The latency estimate a new endpoint starts with: the mean current
/// estimate of the ready endpoints that stay in the set (Finagle's Aperture
/// seeds newcomers from their peers), or `default_rtt` when there are none
/// (a brand-new service).
///
/// Why not always the default: the estimate of a backend nobody picks only
/// decays (10 s window), so a newcomer at 30 ms among 1 ms peers loses every
/// p2c comparison under light sequential load for tens of seconds. Starting
/// at its peers' mean it is compared on equal terms at once, and in-flight
/// counts keep it from being flooded. Never below 1 µs, so it cannot look
/// free.
fn initial_rtt(
    service: &ServicePort,
    known: &HashMap<SocketAddr, Arc<Backend>>,
    default_rtt: Duration,
) -> Duration {
    let now = Instant::now();
    let mut seen: Vec<SocketAddr> = Vec::new();
    let (mut sum, mut n) = (0.0f64, 0u32);
    let eps = service
        .cluster_endpoints
        .iter()
        .chain(service.local_endpoints.iter());
    for ep in eps {
        let Some(b) = known.get(&ep.addr) else {
            continue;
        };
        if !b.is_ready() || seen.contains(&ep.addr) {
            continue;
        }
        seen.push(ep.addr);
        sum += b.estimate_ns(now);
        n += 1;
    }
    if n == 0 {
        return default_rtt;
    }
    let mean = sum / f64::from(n);
    if !mean.is_finite() {
        return default_rtt;
    }
    Duration::from_nanos(mean.max(1_000.0) as u64)
}

/// Random draws before the pick falls back to scanning for usable backends.
/// With most backends usable, two draws almost always suffice.
const SAMPLE_TRIES: usize = 8;

/// Power of two choices over the usable backends of `set`.
fn p2c<'a>(
    set: &'a [Arc<Backend>],
    exclude: &[SocketAddr],
    now: Instant,
) -> Option<&'a Arc<Backend>> {
    let usable = |b: &Arc<Backend>| b.is_ready() && !exclude.contains(&b.addr());
    let mut rng = rand::rng();
    let n = set.len();
    if n == 1 {
        let b = &set[0];
        return (!exclude.contains(&b.addr())).then_some(b);
    }
    // Fast path: draw until two distinct usable backends are found.
    let (mut a, mut b) = (None, None);
    for _ in 0..SAMPLE_TRIES {
        let i = rng.random_range(0..n);
        if !usable(&set[i]) {
            continue;
        }
        match a {
            None => a = Some(i),
            Some(first) if first != i => {
                b = Some(i);
                break;
            }
            Some(_) => {}
        }
    }
    let (i, j) = match (a, b) {
        (Some(i), Some(j)) => (i, j),
        _ => {
            // Slow path (many excluded or ejected): list the candidates.
            let mut cands: Vec<usize> = (0..n).filter(|&i| usable(&set[i])).collect();
            if cands.is_empty() {
                // Everything left is ejected: ignore readiness rather than fail.
                cands = (0..n)
                    .filter(|&i| !exclude.contains(&set[i].addr()))
                    .collect();
            }
            match cands.len() {
                0 => return None,
                1 => return Some(&set[cands[0]]),
                len => {
                    let x = rng.random_range(0..len);
                    let mut y = rng.random_range(0..len - 1);
                    if y >= x {
                        y += 1;
                    }
                    (cands[x], cands[y])
                }
            }
        }
    };
    let (ci, cj) = (set[i].cost(now), set[j].cost(now));
    // Ties (equal estimates, equal load) go to whichever was drawn first,
    // which is itself random.
    Some(if cj < ci { &set[j] } else { &set[i] })
}

/// A chosen backend with its in-flight slot. Report the outcome with
/// [`Pick::record_success`] (latency = time since the pick) or
/// [`Pick::record_failure`]; dropping the `Pick` frees the slot. For L4 the
/// pick lives as long as the connection, so in-flight counts open
/// connections; for L7 it lives as long as the request.
#[derive(Debug)]
pub struct Pick {
    backend: Arc<Backend>,
    started: Instant,
    penalty: Duration,
    recorded: bool,
}

impl Pick {
    fn new(backend: Arc<Backend>, now: Instant, penalty: Duration) -> Self {
        backend.start();
        Pick {
            backend,
            started: now,
            penalty,
            recorded: false,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.backend.addr()
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Records the time since the pick as a latency sample (once).
    pub fn record_success(&mut self) {
        if !self.recorded {
            self.recorded = true;
            let now = Instant::now();
            self.backend
                .succeeded(now.saturating_duration_since(self.started), now);
        }
    }

    /// Records a failed attempt: a penalty latency sample and one more
    /// consecutive failure (once).
    pub fn record_failure(&mut self) {
        if !self.recorded {
            self.recorded = true;
            self.backend.failed(self.penalty, Instant::now());
        }
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.backend.finish();
    }
}

#[cfg(test)]
mod tests;
