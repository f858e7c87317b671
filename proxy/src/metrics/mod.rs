//! Prometheus metrics: the process-wide recorder, the metric names, and the
//! per-service-port and per-node handle sets.
//!
//! Why handles registered once per service port ([`ServiceMetrics`]): looking
//! a metric up by name and label set hashes and compares strings, and the
//! recorder takes a lock to find or create the series. Doing that per
//! connection or per request would put the metrics registry on the hot path.
//! Instead the balancer for a service port holds an `Arc<ServiceMetrics>`
//! whose fields are plain atomic handles: counting a connection is one atomic
//! add, with no allocation and no hashing.
//!
//! Why the `metrics` facade with a globally installed recorder: other parts of
//! the process (the Kubernetes watcher in `control`) emit through the same
//! facade without depending on this crate. [`install`] is idempotent so tests
//! and the binary can both call it.
//!
//! Label cardinality is bounded by construction: service-port metrics carry
//! only `namespace`, `service`, `port` (plus a fixed `class` for HTTP status
//! classes); node metrics carry a fixed `state` at most. Never client
//! addresses or paths.

mod handles;
mod node;
mod service;
pub mod udp;

pub use node::{node, NodeMetrics, TableCounter, TableStats};
pub use service::{service, ServiceMetrics, StatusClass, TcpConnection};

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Every metric lightpath exports, named per Prometheus conventions.
pub mod names {
    // Per service port (labels: namespace, service, port).
    pub const TCP_OPENED: &str = "lightpath_tcp_connections_opened_total";
    pub const TCP_CLOSED: &str = "lightpath_tcp_connections_closed_total";
    pub const TCP_ACTIVE: &str = "lightpath_tcp_connections_active";
    pub const TCP_FAILED: &str = "lightpath_tcp_connections_failed_total";
    pub const TCP_RX_BYTES: &str = "lightpath_tcp_received_bytes_total";
    pub const TCP_TX_BYTES: &str = "lightpath_tcp_sent_bytes_total";
    pub const CONNECT_DURATION: &str = "lightpath_upstream_connect_duration_seconds";
    pub const CONNECT_FAILURES: &str = "lightpath_upstream_connect_failures_total";
    /// Extra label `class`: 1xx..5xx.
    pub const HTTP_REQUESTS: &str = "lightpath_http_requests_total";
    pub const HTTP_REQUEST_DURATION: &str = "lightpath_http_request_duration_seconds";
    pub const HTTP_RETRIES: &str = "lightpath_http_retries_total";
    pub const HTTP_RETRY_OVERFLOWS: &str = "lightpath_http_retry_overflows_total";
    pub const HTTP_RETRY_BUDGET_EXHAUSTED: &str = "lightpath_http_retry_budget_exhausted_total";
    pub const BREAKER_OVERFLOWS: &str = "lightpath_breaker_overflows_total";
    pub const HTTP_UPSTREAM_CONNECTIONS: &str = "lightpath_http_upstream_connections";
    pub const EJECTIONS: &str = "lightpath_endpoint_ejections_total";
    pub const READMISSIONS: &str = "lightpath_endpoint_readmissions_total";

    // Per node.
    /// Label `state`: ready, serving_terminating (in the table), ejected
    /// (skipped by the balancers right now).
    pub const ENDPOINTS: &str = "lightpath_endpoints";
    pub const TABLE_FRONTENDS: &str = "lightpath_table_frontends";
    pub const TABLE_SERVICE_PORTS: &str = "lightpath_table_service_ports";
    pub const CONFIG_VERSION: &str = "lightpath_config_version";
    pub const TABLE_UPDATED: &str = "lightpath_table_last_update_timestamp_seconds";
    pub const SYNC_AGE: &str = "lightpath_table_sync_age_seconds";
    pub const REDIRECT_APPLY_DURATION: &str = "lightpath_redirect_apply_duration_seconds";
    pub const REDIRECT_APPLY_FAILURES: &str = "lightpath_redirect_apply_failures_total";
    /// Label `thread`: the data thread's index.
    pub const DATA_THREAD_CONNECTIONS: &str = "lightpath_data_thread_connections";
    pub const TOKIO_WORKERS: &str = "lightpath_tokio_workers";
    pub const TOKIO_ALIVE_TASKS: &str = "lightpath_tokio_alive_tasks";
    pub const TOKIO_GLOBAL_QUEUE_DEPTH: &str = "lightpath_tokio_global_queue_depth";
    pub const TOKIO_BUSY: &str = "lightpath_tokio_worker_busy_seconds";
    pub const TOKIO_PARKS: &str = "lightpath_tokio_worker_parks_total";
    /// Prefix of the process gauges (`..._cpu_seconds_total`, `..._open_fds`,
    /// `..._resident_memory_bytes`, ...), filled from /proc by `metrics-process`.
    pub const PROCESS_PREFIX: &str = "lightpath_";
}

/// Histogram buckets (seconds) for every `_seconds` histogram: 0.5 ms
/// (a loopback connect) to 10 s (a slow HTTP request), roughly ×2.5 apart.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often histogram samples are folded into buckets when nobody scrapes,
/// so an unscraped process does not accumulate raw samples.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum MetricsError {
    #[error("installing the Prometheus recorder: {0}")]
    Install(String),
}

static HANDLE: OnceLock<Result<PrometheusHandle, MetricsError>> = OnceLock::new();

/// Installs the Prometheus recorder as the global `metrics` recorder (once per
/// process) and returns the handle that renders the text exposition.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    HANDLE.get_or_init(build_and_install).clone()
}

fn build_and_install() -> Result<PrometheusHandle, MetricsError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(|e| MetricsError::Install(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError::Install(e.to_string()))?;
    describe();
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("lightpath-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        })
        .map_err(|e| MetricsError::Install(format!("spawning the upkeep thread: {e}")))?;
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    use names::*;
    describe_counter!(TCP_OPENED, "TCP connections accepted for the service port.");
    describe_counter!(TCP_CLOSED, "TCP connections finished (either side closed).");
    describe_gauge!(TCP_ACTIVE, "TCP connections currently open.");
    describe_counter!(
        TCP_FAILED,
        "Accepted connections that never reached an endpoint."
    );
    describe_counter!(TCP_RX_BYTES, Unit::Bytes, "Bytes received from clients.");
    describe_counter!(TCP_TX_BYTES, Unit::Bytes, "Bytes sent to clients.");
    describe_histogram!(
        CONNECT_DURATION,
        Unit::Seconds,
        "Time to establish an upstream connection to an endpoint."
    );
    describe_counter!(CONNECT_FAILURES, "Failed upstream connection attempts.");
    describe_counter!(HTTP_REQUESTS, "HTTP responses sent, by status class.");
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request duration, request start to response headers."
    );
    describe_counter!(HTTP_RETRIES, "HTTP retries attempted.");
    describe_counter!(
        HTTP_RETRY_OVERFLOWS,
        "HTTP retries skipped because the request could not be replayed."
    );
    describe_counter!(
        HTTP_RETRY_BUDGET_EXHAUSTED,
        "HTTP retries skipped because the retry budget was spent."
    );
    describe_counter!(BREAKER_OVERFLOWS, "Requests refused by an open breaker.");
    describe_gauge!(
        HTTP_UPSTREAM_CONNECTIONS,
        "HTTP upstream connections open, in use or idle in the pool (what max-connections bounds); sampled every second."
    );
    describe_counter!(EJECTIONS, "Endpoints ejected by outlier detection.");
    describe_counter!(READMISSIONS, "Ejected endpoints readmitted.");
    describe_gauge!(
        ENDPOINTS,
        "Endpoints in the table, by state (counted once per service port)."
    );
    describe_gauge!(TABLE_FRONTENDS, "Frontend addresses in the table.");
    describe_gauge!(TABLE_SERVICE_PORTS, "Service ports in the table.");
    describe_gauge!(CONFIG_VERSION, "Version of the table being served.");
    describe_gauge!(
        TABLE_UPDATED,
        Unit::Seconds,
        "Unix time the served table last changed."
    );
    describe_gauge!(
        SYNC_AGE,
        Unit::Seconds,
        "Seconds since the data plane last applied a table (kube-proxy's healthz clock)."
    );
    describe_histogram!(
        REDIRECT_APPLY_DURATION,
        Unit::Seconds,
        "Time to apply one nftables transaction."
    );
    describe_counter!(
        REDIRECT_APPLY_FAILURES,
        "nftables transactions that failed."
    );
    describe_gauge!(
        DATA_THREAD_CONNECTIONS,
        "TCP connections open on each data thread (connections are handed to the least-loaded thread when the counts drift apart)."
    );
    describe_gauge!(TOKIO_WORKERS, "Data-plane runtime worker threads.");
    describe_gauge!(TOKIO_ALIVE_TASKS, "Data-plane runtime tasks alive.");
    describe_gauge!(
        TOKIO_GLOBAL_QUEUE_DEPTH,
        "Tasks waiting in the data-plane runtime's global queue."
    );
    describe_gauge!(
        TOKIO_BUSY,
        Unit::Seconds,
        "Cumulative time data-plane workers spent busy (rate() gives busy workers)."
    );
    describe_counter!(TOKIO_PARKS, "Times data-plane workers parked.");
}
