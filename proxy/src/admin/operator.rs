//! The operator side of `lightpath run`: its flags, and the glue that keeps
//! readiness, kube-proxy's health clock and the node metrics in step with
//! what the data plane is doing.
//!
//! Why it lives here and not in `run.rs`: `run` is about the data path; this
//! keeps its edits to a handful of calls (start, "rules applied", "serving",
//! "draining") while the semantics stay next to the servers that report them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control::kube::{InitialSync, NodeEligibility};
use control::TableRx;
use tokio::sync::watch;

use super::{AdminConfig, AdminError, AdminHandle, AdminState, BalancerDump};
use crate::defaults;
use crate::health::{ProxyHealth, DEFAULT_HEALTH_TIMEOUT};
use crate::lifecycle::{BlockReady, Readiness};
use crate::telemetry::{LogFormat, TelemetryConfig};

/// Flags for the operator servers and logs (flattened into `run`'s).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct OperatorArgs {
    /// Admin API (/ready, /healthz, /metrics, /config_dump, /endpoints).
    /// Keep it on loopback: it shows the whole table.
    #[arg(long, env = "LIGHTPATH_ADMIN_ADDR", default_value = defaults::ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// /metrics alone, for Prometheus.
    #[arg(long, env = "LIGHTPATH_METRICS_ADDR", default_value = defaults::METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// kube-proxy's health server (/healthz, /livez) plus /readyz.
    #[arg(long, env = "LIGHTPATH_HEALTH_ADDR", default_value = defaults::HEALTH_ADDR)]
    pub health_addr: SocketAddr,
    /// Seconds a table change may wait unapplied before /healthz fails
    /// (kube-proxy: twice its 30 s sync period).
    #[arg(long, env = "LIGHTPATH_HEALTH_TIMEOUT", default_value_t = DEFAULT_HEALTH_TIMEOUT.as_secs())]
    pub health_timeout: u64,
    /// Do not serve healthCheckNodePorts (LoadBalancer, eTP=Local).
    #[arg(long, env = "LIGHTPATH_NO_SERVICE_HEALTH")]
    pub no_service_health: bool,
    /// Log format: text or json.
    #[arg(long, env = "LIGHTPATH_LOG_FORMAT", default_value = "text", value_parser = parse_format)]
    #[serde(serialize_with = "ser_format")]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG when absent.
    #[arg(long, env = "LIGHTPATH_LOG")]
    pub log: Option<String>,
    /// Per-connection access log lines (target `lightpath::access`).
    #[arg(long, env = "LIGHTPATH_ACCESS_LOG")]
    pub access_log: bool,
}

fn parse_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
        .map_err(|e: crate::telemetry::TelemetryError| e.to_string())
}

fn ser_format<S: serde::Serializer>(f: &LogFormat, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match f {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    })
}

impl OperatorArgs {
    pub fn telemetry(&self) -> TelemetryConfig {
        TelemetryConfig {
            format: self.log_format,
            filter: self.log.clone(),
            access_log: self.access_log,
        }
    }

    pub fn admin_config(&self) -> AdminConfig {
        AdminConfig {
            admin_addr: Some(self.admin_addr),
            metrics_addr: Some(self.metrics_addr),
            health_addr: Some(self.health_addr),
            service_health: !self.no_service_health,
            service_health_ips: Vec::new(),
        }
    }
}

/// Start of `run`: logs, the metrics recorder, then the file-descriptor
/// limit (logged either way).
///
/// The recorder must exist before any source starts: the Kubernetes watcher
/// registers its `lightpath_kube_*` handles when its task starts, and a
/// handle registered before the recorder is installed goes to the no-op
/// recorder for good (those series were missing from every scrape).
pub fn init_process(args: &OperatorArgs) {
    if let Err(e) = crate::telemetry::init(&args.telemetry()) {
        eprintln!("lightpath: logging: {e}");
    }
    if let Err(e) = crate::metrics::install() {
        // `Operator::start` reports it again, as a start-up error.
        tracing::error!(error = %e, "installing the metrics recorder");
    }
    match crate::lifecycle::raise_nofile_limit() {
        Ok(n) => tracing::info!(nofile = n, "RLIMIT_NOFILE raised"),
        Err(e) => tracing::warn!(error = %e, "could not raise RLIMIT_NOFILE"),
    }
}

/// The running operator servers and the start-up steps still pending.
pub struct Operator {
    pub readiness: Readiness,
    pub health: ProxyHealth,
    balancers: Arc<std::sync::OnceLock<Arc<dyn BalancerDump>>>,
    rules: Option<BlockReady>,
    serving: Option<BlockReady>,
    _handle: AdminHandle,
}

impl Operator {
    /// Starts the servers on their own runtime thread; `/ready` waits for
    /// "redirect rules" and "listeners serving" until they are reported.
    /// `settings` is shown verbatim in `/config_dump`.
    pub fn start(
        args: &OperatorArgs,
        table: TableRx,
        settings: serde_json::Value,
    ) -> Result<Operator, AdminError> {
        let readiness = Readiness::new();
        let rules = Some(readiness.register_task("redirect rules"));
        let serving = Some(readiness.register_task("listeners serving"));
        let health = ProxyHealth::new(Duration::from_secs(args.health_timeout));
        let mut state = AdminState::new(table, readiness.clone(), health.clone());
        state.settings = settings;
        state.data_plane = tokio::runtime::Handle::try_current().ok();
        let balancers = Arc::clone(&state.late_balancers);
        let handle = super::spawn(args.admin_config(), state)?;
        Ok(Operator {
            readiness,
            health,
            balancers,
            rules,
            serving,
            _handle: handle,
        })
    }

    /// The kernel rules reflect the first table (or there are none to
    /// program): kube-proxy's first "Updated".
    pub fn rules_applied(&mut self) {
        self.health.updated_all();
        self.rules = None;
    }

    /// The data plane serves; its balancers back `/config_dump`.
    pub fn serving(&mut self, balancers: Arc<dyn BalancerDump>) {
        let _ = self.balancers.set(balancers);
        self.serving = None;
    }

    /// SIGTERM: not ready from now on.
    pub fn draining(&self) {
        self.readiness.start_draining();
    }

    /// The Kubernetes source's progress and our Node's state: `/ready` waits
    /// for "initial sync of <resource>" per watch still on its first list,
    /// and `/healthz` follows the Node's eligibility (see [`Self::follow_node`]).
    /// Guards are registered before this returns, so no probe can see
    /// "ready" between the call and the task's first look.
    pub fn follow_kube(
        &self,
        mut sync: watch::Receiver<InitialSync>,
        node: watch::Receiver<NodeEligibility>,
    ) {
        let resources = ["services", "endpointslices", "nodes"];
        let mut guards: Vec<(&'static str, BlockReady)> = resources
            .iter()
            .map(|r| {
                (
                    *r,
                    self.readiness
                        .register_task(&format!("initial sync of {r}")),
                )
            })
            .collect();
        tokio::spawn(async move {
            loop {
                let pending = sync.borrow_and_update().pending();
                guards.retain(|(r, _)| pending.contains(r));
                // Done, or the source is gone (then `run` fails anyway).
                if guards.is_empty() || sync.changed().await.is_err() {
                    return;
                }
            }
        });
        self.follow_node(node);
    }

    /// `/healthz` follows our Node's eligibility (KEP-3836: not while it is
    /// being deleted or tainted `ToBeDeletedByClusterAutoscaler`); `/livez`
    /// does not. From either source (the Node watch or a Node manifest).
    pub fn follow_node(&self, mut node: watch::Receiver<NodeEligibility>) {
        let health = self.health.clone();
        tokio::spawn(async move {
            loop {
                let eligibility = *node.borrow_and_update();
                health.set_node_eligible(eligibility.is_eligible());
                if node.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Without kernel rules (`--no-redirect`) a table is applied as soon as
    /// the balancers see it: mark every change updated at once.
    pub fn follow_without_rules(&self, mut table: TableRx) -> tokio::task::JoinHandle<()> {
        let health = self.health.clone();
        tokio::spawn(async move {
            while table.changed().await.is_ok() {
                table.borrow_and_update();
                health.updated_all();
            }
        })
    }
}

/// One kernel update's outcome, for `follow_table`: metrics and the health
/// clock. `queued` before the update, then this.
pub fn rules_update_result(health: &ProxyHealth, took: Duration, ok: bool) {
    crate::metrics::node().redirect_applied(took, ok);
    if ok {
        health.updated_all();
    }
}
