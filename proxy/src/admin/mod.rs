//! The operator-facing servers: the admin API (loopback), `/metrics` for
//! Prometheus, kube-proxy's health server and the health-check node ports,
//! all on one small runtime thread of their own.
//!
//! Why a separate runtime: a data plane under overload (every worker busy
//! relaying bytes) must still answer the kubelet's probes and Prometheus's
//! scrapes promptly, or the node gets marked unhealthy exactly when someone
//! needs to look at it; and a slow scrape must never steal a data-plane
//! worker. One current-thread runtime is plenty for a few requests a second.
//!
//! Why the admin API is loopback-only by default: `/config_dump` shows every
//! service and endpoint on the node. `/metrics` alone is exposed on the node
//! network for Prometheus (`0.0.0.0:15090`), and the health server
//! (`0.0.0.0:10256`) for the kubelet and cloud load balancers.

mod balancers;
pub mod dump;
pub mod operator;
mod routes;
pub mod web;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use control::TableRx;
use tokio::sync::watch;

use crate::defaults;
use crate::health::{ProxyHealth, ServiceHealthServers};
use crate::lifecycle::Readiness;

pub use dump::{BalancerDump, BalancerState, EndpointBalancerState};
pub use operator::{Operator, OperatorArgs};

/// Where each operator server listens; `None` turns that server off.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    /// Serve `healthCheckNodePort`s for LoadBalancer + eTP=Local services.
    pub service_health: bool,
    /// Addresses the health-check node ports bind (empty: all, `0.0.0.0`).
    pub service_health_ips: Vec<IpAddr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        let parse = |s: &str| s.parse::<SocketAddr>().ok();
        AdminConfig {
            admin_addr: parse(defaults::ADMIN_ADDR),
            metrics_addr: parse(defaults::METRICS_ADDR),
            health_addr: parse(defaults::HEALTH_ADDR),
            service_health: true,
            service_health_ips: Vec::new(),
        }
    }
}

/// What the operator servers read. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    pub table: TableRx,
    pub readiness: Readiness,
    pub health: ProxyHealth,
    /// Per-endpoint balancer state for `/config_dump` and `/endpoints`.
    pub balancers: Option<Arc<dyn BalancerDump>>,
    /// The same, for a data plane created after the servers started (set once).
    pub late_balancers: Arc<std::sync::OnceLock<Arc<dyn BalancerDump>>>,
    /// The active settings, shown verbatim in `/config_dump`.
    pub settings: serde_json::Value,
    /// The data-plane runtime, for the `lightpath_tokio_*` gauges.
    pub data_plane: Option<tokio::runtime::Handle>,
}

impl AdminState {
    /// A state with no balancers, empty settings and no runtime figures.
    pub fn new(table: TableRx, readiness: Readiness, health: ProxyHealth) -> Self {
        AdminState {
            table,
            readiness,
            health,
            balancers: None,
            late_balancers: Default::default(),
            settings: serde_json::Value::Null,
            data_plane: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("starting the admin runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// The running servers. Dropping it stops them.
pub struct AdminHandle {
    admin_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    health_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminHandle {
    /// The bound admin address (useful with port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// Stops every server and waits for the runtime thread to exit.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("admin runtime thread panicked");
            }
        }
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn bind(
    what: &'static str,
    addr: Option<SocketAddr>,
) -> Result<Option<std::net::TcpListener>, AdminError> {
    addr.map(|addr| web::bind(addr).map_err(|source| AdminError::Bind { what, addr, source }))
        .transpose()
}

fn local(l: &Option<std::net::TcpListener>) -> Option<SocketAddr> {
    l.as_ref().and_then(|l| l.local_addr().ok())
}

/// Binds every configured listener (errors come back here, before anything
/// runs) and starts serving on a dedicated thread with its own runtime.
pub fn spawn(cfg: AdminConfig, state: AdminState) -> Result<AdminHandle, AdminError> {
    let prometheus = crate::metrics::install()?;
    let admin = bind("admin", cfg.admin_addr)?;
    let metrics = bind("metrics", cfg.metrics_addr)?;
    let health = bind("health", cfg.health_addr)?;
    let (admin_addr, metrics_addr, health_addr) = (local(&admin), local(&metrics), local(&health));
    let (stop, stopped) = watch::channel(false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("lightpath-admin")
        .build()
        .map_err(AdminError::Runtime)?;
    let thread = std::thread::Builder::new()
        .name("lightpath-admin".into())
        .spawn(move || {
            rt.block_on(run(
                cfg,
                state,
                prometheus,
                [admin, metrics, health],
                stopped,
            ));
            // Connection tasks still open get a moment, then are dropped.
            rt.shutdown_timeout(Duration::from_secs(1));
        })
        .map_err(AdminError::Runtime)?;
    if let Some(a) = admin_addr {
        tracing::info!(addr = %a, "admin API listening");
    }
    if let Some(a) = metrics_addr {
        tracing::info!(addr = %a, "metrics listening");
    }
    if let Some(a) = health_addr {
        tracing::info!(addr = %a, "health server listening");
    }
    Ok(AdminHandle {
        admin_addr,
        metrics_addr,
        health_addr,
        stop,
        thread: Some(thread),
    })
}

async fn run(
    cfg: AdminConfig,
    state: AdminState,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
    [admin, metrics, health]: [Option<std::net::TcpListener>; 3],
    mut stopped: watch::Receiver<bool>,
) {
    let handlers = [
        (
            admin,
            routes::admin_handler(state.clone(), prometheus.clone()),
        ),
        (
            metrics,
            routes::metrics_only_handler(state.clone(), prometheus),
        ),
        (
            health,
            crate::health::proxy_health_handler(state.health.clone(), state.readiness.clone()),
        ),
    ];
    for (listener, handler) in handlers {
        let Some(listener) = listener else { continue };
        match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => {
                tokio::spawn(web::serve(l, handler, stopped.clone()));
            }
            Err(e) => tracing::error!(error = %e, "registering an operator listener"),
        }
    }

    // Follow the table: node gauges and health-check node ports.
    let mut hc = cfg.service_health.then(|| {
        ServiceHealthServers::new(
            cfg.service_health_ips.clone(),
            state.health.clone(),
            stopped.clone(),
        )
    });
    let mut table = state.table.clone();
    let mut counter = crate::metrics::TableCounter::default();
    loop {
        let current = table.borrow_and_update().clone();
        crate::metrics::node().observe_table(&current, &mut counter);
        if let Some(hc) = hc.as_mut() {
            hc.sync(&current);
        }
        let source_gone = tokio::select! {
            changed = table.changed() => changed.is_err(),
            _ = stopped.wait_for(|s| *s) => break,
        };
        if source_gone {
            // Keep serving the last table until stopped.
            let _ = stopped.wait_for(|s| *s).await;
            break;
        }
    }
}
