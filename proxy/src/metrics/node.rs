//! Per-node gauges: what the table holds, how fresh it is, what the kernel
//! side costs, and how the process and its data-plane runtime are doing.
//!
//! Table figures are computed when a new snapshot is observed (control path,
//! on the admin runtime); clocks, /proc figures and runtime figures are
//! refreshed just before each scrape renders, so they are as fresh as the
//! scrape and cost nothing between scrapes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use control::{EndpointState, Family, ServicePort, ServicePortName, Table};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use super::names;

#[derive(Debug)]
pub struct NodeMetrics {
    endpoints_ready: Gauge,
    endpoints_terminating: Gauge,
    endpoints_ejected: Gauge,
    frontends: Gauge,
    service_ports: Gauge,
    version: Gauge,
    table_updated: Gauge,
    sync_age: Gauge,
    redirect_duration: Histogram,
    redirect_failures: Counter,
    tokio_workers: Gauge,
    tokio_alive: Gauge,
    tokio_queue: Gauge,
    tokio_busy: Gauge,
    tokio_parks: Counter,
    process: metrics_process::Collector,
    last_sync: Mutex<Option<Instant>>,
}

/// The process-wide node metrics (installs the recorder on first use).
pub fn node() -> &'static NodeMetrics {
    static NODE: OnceLock<NodeMetrics> = OnceLock::new();
    NODE.get_or_init(|| {
        super::handles::ensure_recorder();
        NodeMetrics::register()
    })
}

/// Table figures, computed once per snapshot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableStats {
    pub frontends: usize,
    pub service_ports: usize,
    pub endpoints_ready: usize,
    pub endpoints_serving_terminating: usize,
}

/// Keeps [`TableStats`] from one snapshot to the next by recounting only the
/// service ports that changed ([`Table::port_diff`]): recounting every
/// endpoint of every port per table version cost 13 ms at 10,000 services.
#[derive(Debug, Default)]
pub struct TableCounter {
    table: Arc<Table>,
    /// Each service port's (ready, serving-terminating) endpoints.
    ports: HashMap<(Family, ServicePortName), (usize, usize)>,
    ready: usize,
    terminating: usize,
}

impl TableCounter {
    /// The figures of `table`. Counts each service port once per family (a
    /// port's frontends share one row), and each endpoint once per port
    /// across its cluster and local sets.
    pub fn update(&mut self, table: &Arc<Table>) -> TableStats {
        let diff = table.port_diff(&self.table);
        for p in diff.removed {
            if let Some((r, t)) = self.ports.remove(&(p.family, p.name.clone())) {
                self.ready -= r;
                self.terminating -= t;
            }
        }
        for p in diff.changed {
            let counts = endpoint_counts(p);
            self.ready += counts.0;
            self.terminating += counts.1;
            if let Some((r, t)) = self.ports.insert((p.family, p.name.clone()), counts) {
                self.ready -= r;
                self.terminating -= t;
            }
        }
        self.table = table.clone();
        TableStats {
            frontends: table.len(),
            service_ports: self.ports.len(),
            endpoints_ready: self.ready,
            endpoints_serving_terminating: self.terminating,
        }
    }
}

/// A port's distinct endpoints: (ready, serving-terminating).
fn endpoint_counts(port: &ServicePort) -> (usize, usize) {
    let mut states: HashMap<SocketAddr, EndpointState> = HashMap::new();
    for ep in port
        .cluster_endpoints
        .iter()
        .chain(port.local_endpoints.iter())
    {
        states.insert(ep.addr, ep.state);
    }
    let ready = states
        .values()
        .filter(|s| **s == EndpointState::Ready)
        .count();
    (ready, states.len() - ready)
}

impl NodeMetrics {
    fn register() -> Self {
        let process = metrics_process::Collector::new(names::PROCESS_PREFIX);
        process.describe();
        NodeMetrics {
            endpoints_ready: gauge!(names::ENDPOINTS, "state" => "ready"),
            endpoints_terminating: gauge!(names::ENDPOINTS, "state" => "serving_terminating"),
            endpoints_ejected: gauge!(names::ENDPOINTS, "state" => "ejected"),
            frontends: gauge!(names::TABLE_FRONTENDS),
            service_ports: gauge!(names::TABLE_SERVICE_PORTS),
            version: gauge!(names::CONFIG_VERSION),
            table_updated: gauge!(names::TABLE_UPDATED),
            sync_age: gauge!(names::SYNC_AGE),
            redirect_duration: histogram!(names::REDIRECT_APPLY_DURATION),
            redirect_failures: counter!(names::REDIRECT_APPLY_FAILURES),
            tokio_workers: gauge!(names::TOKIO_WORKERS),
            tokio_alive: gauge!(names::TOKIO_ALIVE_TASKS),
            tokio_queue: gauge!(names::TOKIO_GLOBAL_QUEUE_DEPTH),
            tokio_busy: gauge!(names::TOKIO_BUSY),
            tokio_parks: counter!(names::TOKIO_PARKS),
            process,
            last_sync: Mutex::new(None),
        }
    }

    /// Records a new table snapshot, counted by `counter`.
    pub fn observe_table(&self, table: &Arc<Table>, counter: &mut TableCounter) -> TableStats {
        let stats = counter.update(table);
        self.frontends.set(stats.frontends as f64);
        self.service_ports.set(stats.service_ports as f64);
        self.endpoints_ready.set(stats.endpoints_ready as f64);
        self.endpoints_terminating
            .set(stats.endpoints_serving_terminating as f64);
        self.version.set(table.version as f64);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.table_updated.set(now.as_secs_f64());
        stats
    }

    /// Endpoints the balancers currently skip (outlier ejection, breakers).
    pub fn set_ejected(&self, n: usize) {
        self.endpoints_ejected.set(n as f64);
    }

    /// The data plane applied the current table (kube-proxy's "Updated").
    pub fn mark_synced(&self) {
        *self.last_sync.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// One nftables transaction and whether it succeeded.
    pub fn redirect_applied(&self, took: Duration, ok: bool) {
        self.redirect_duration.record(took.as_secs_f64());
        if !ok {
            self.redirect_failures.increment(1);
        }
    }

    /// Refreshes the clock, /proc and runtime gauges; call before rendering.
    pub fn refresh(&self, data_plane: Option<&tokio::runtime::Handle>) {
        let last = *self.last_sync.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = last {
            self.sync_age.set(at.elapsed().as_secs_f64());
        }
        self.process.collect();
        if let Some(rt) = data_plane {
            let m = rt.metrics();
            let workers = m.num_workers();
            self.tokio_workers.set(workers as f64);
            self.tokio_alive.set(m.num_alive_tasks() as f64);
            self.tokio_queue.set(m.global_queue_depth() as f64);
            let mut busy = Duration::ZERO;
            let mut parks = 0u64;
            for w in 0..workers {
                busy += m.worker_total_busy_duration(w);
                parks += m.worker_park_count(w);
            }
            self.tokio_busy.set(busy.as_secs_f64());
            self.tokio_parks.absolute(parks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::synth;

    /// Counted change by change, the figures are those of a count from
    /// scratch, through endpoints that change state, services that come
    /// and go, and a table that jumps several versions.
    #[test]
    fn counting_changes_matches_counting_everything() {
        let (first, later) = synth::churned(50, 4, 30);
        let mut counter = TableCounter::default();
        let scratch = |t: &Arc<Table>| TableCounter::default().update(t);
        let stats = counter.update(&first);
        assert_eq!(stats, scratch(&first));
        assert_eq!((stats.service_ports, stats.endpoints_ready), (50, 200));
        let mut last = stats;
        for (i, t) in later.iter().enumerate() {
            last = counter.update(t);
            assert_eq!(last, scratch(t), "table {i} after the first");
        }
        assert!(last.service_ports < 50, "services were removed: {last:?}");
        assert!(last.endpoints_serving_terminating > 0, "{last:?}");
    }
}
