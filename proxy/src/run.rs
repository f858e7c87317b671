//! `lightpath run`: the node data path as one process.
//!
//! Why the steps come in this order:
//! 1. The table is loaded first: invalid manifests stop the start before the
//!    kernel is touched, so a bad deploy never replaces working rules. The
//!    Kubernetes source is waited for until every watch has listed once; the
//!    operator servers already run meanwhile (`/ready` names the watches
//!    still syncing, `/livez` answers), and a signal then exits untouched.
//! 2. The transparent listeners are bound before the rules are installed, so
//!    the first redirected SYN already finds a socket.
//! 3. The rules are reconciled from scratch (whatever a crashed run left is
//!    replaced atomically), then follow every table snapshot as a diff.
//! 4. On SIGTERM/SIGINT the listeners close at once (new connections then
//!    meet the kernel's fallback reject and fail fast), established
//!    connections drain until the deadline, and the rules stay (default:
//!    fail closed, the next lightpath picks up where this one stopped) or are
//!    removed (`--remove-rules-on-exit`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use control::{Options, Protocol, Table, TableRx, Verdict};
use redirect::{Action, Frontend, Redirector, Rule};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::defaults;
use crate::drain;
use crate::server::{self, ServerConfig};

/// After a failed kernel update, try again this soon even if the table does
/// not change (a transient `nft` failure must not leave stale rules until the
/// next cluster change).
const REDIRECT_RETRY: Duration = Duration::from_secs(1);

#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct RunArgs {
    /// Manifest files (Services, EndpointSlices, Nodes) to serve; re-read
    /// when they change.
    #[arg(long, env = "LIGHTPATH_MANIFESTS", num_args = 1.., value_delimiter = ',')]
    pub manifests: Vec<PathBuf>,
    /// Without --manifests, the Kubernetes API is watched: through this
    /// kubeconfig, else KUBECONFIG / ~/.kube/config, else the in-cluster
    /// service account.
    #[arg(long, env = "LIGHTPATH_KUBECONFIG", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (endpoint locality, NodePort addresses).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// IPv4 transparent listener that TPROXY delivers to.
    #[arg(long, env = "LIGHTPATH_LISTEN", default_value = defaults::PROXY_ADDR)]
    pub listen: SocketAddr,
    /// IPv6 transparent listener.
    #[arg(long, env = "LIGHTPATH_LISTEN_V6", default_value = defaults::PROXY_ADDR_V6)]
    pub listen_v6: SocketAddr,
    /// Serve IPv4 only (IPv6 frontends are then refused by the rules).
    #[arg(long, env = "LIGHTPATH_NO_IPV6")]
    pub no_ipv6: bool,
    /// Do not program nftables or policy routing (someone else steers the
    /// traffic, e.g. REDIRECT rules; the original destination then comes from
    /// SO_ORIGINAL_DST).
    #[arg(long, env = "LIGHTPATH_NO_REDIRECT")]
    pub no_redirect: bool,
    /// Connect to endpoints from the node's address always, like
    /// kube-proxy's --masquerade-all. By default the client's address is
    /// kept where kube-proxy keeps it (ClusterIP traffic, and external
    /// traffic to externalTrafficPolicy: Local services), so endpoints and
    /// their NetworkPolicies see the real client. Implied by --no-redirect
    /// (the reply rule is lightpath's own).
    #[arg(long, env = "LIGHTPATH_MASQUERADE_ALL")]
    pub masquerade_all: bool,
    /// On exit keep the rules, so connections to services fail fast until a
    /// new lightpath starts (fail closed). The default.
    #[arg(
        long,
        env = "LIGHTPATH_KEEP_RULES_ON_EXIT",
        overrides_with = "remove_rules_on_exit"
    )]
    pub keep_rules_on_exit: bool,
    /// On exit remove the rules and policy routing.
    #[arg(
        long,
        env = "LIGHTPATH_REMOVE_RULES_ON_EXIT",
        overrides_with = "keep_rules_on_exit"
    )]
    pub remove_rules_on_exit: bool,
    /// Seconds established connections get to finish after SIGTERM.
    #[arg(long, env = "LIGHTPATH_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
    /// How often manifest files are checked for changes, in milliseconds.
    #[arg(long, env = "LIGHTPATH_MANIFEST_POLL_MS", default_value_t = 500)]
    pub manifest_poll_ms: u64,
    /// Our `service.kubernetes.io/service-proxy-name`.
    #[arg(long, env = "LIGHTPATH_PROXY_NAME", default_value = defaults::PROXY_NAME)]
    pub proxy_name: String,
    /// Hybrid mode: serve only services labelled with our proxy name.
    #[arg(long, env = "LIGHTPATH_LABELLED_ONLY")]
    pub labelled_only: bool,
    /// Extra node addresses NodePorts are served on.
    #[arg(long = "node-ip", env = "LIGHTPATH_NODE_IPS", value_delimiter = ',')]
    pub node_ips: Vec<IpAddr>,
    /// kube-proxy's local traffic detector.
    #[command(flatten)]
    pub detect_local: crate::detect_local::DetectLocalArgs,
    /// Admin API, metrics, health server and logs.
    #[command(flatten)]
    pub operator: crate::admin::OperatorArgs,
    /// UDP flow table.
    #[command(flatten)]
    pub udp: crate::udp::UdpArgs,
    /// TCP data-plane threads, each one event loop with its own SO_REUSEPORT
    /// listeners that owns its connections end to end (default: one per
    /// CPU); 0 = connections share the main runtime's worker threads.
    /// One loop per core measured 1.06-1.09x haproxy-tcp on keep-alive
    /// against 0.90x for the shared work-stealing runtime (BENCHMARKS.md).
    #[arg(long, env = "LIGHTPATH_DATA_THREADS")]
    pub data_threads: Option<usize>,
    /// TCP congestion control algorithm of lightpath's own TCP sockets, the
    /// accepted client connections and the upstream ones (e.g. `cubic`);
    /// default: the node's (`net.ipv4.tcp_congestion_control`). A relayed
    /// connection is two TCP connections where kube-proxy's DNAT leaves
    /// one: under BBR without an fq qdisc (veth), lightpath's legs are
    /// paced by a kernel timer, which cost a bulk transfer a quarter of its
    /// rate in the load benchmark (BENCHMARKS.md).
    #[arg(long, env = "LIGHTPATH_TCP_CONGESTION", value_parser = parse_congestion)]
    pub tcp_congestion: Option<String>,
}

/// A congestion control algorithm's name as the kernel spells them: at most
/// 15 bytes (`TCP_CA_NAME_MAX` with its NUL) of letters, digits, `_` and
/// `-`. Whether the kernel has it is checked on the listener at start.
fn parse_congestion(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() < 16
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a congestion control name (1-15 letters, digits, '_' or '-', e.g. cubic)"
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("kubernetes: {0}")]
    Kube(#[from] control::kube::ClientError),
    #[error("kubernetes source stopped before its initial sync")]
    KubeStopped,
    #[error("--node-name (or NODE_NAME) must not be empty")]
    NoNodeName,
    #[error(transparent)]
    DetectLocal(#[from] crate::detect_local::DetectLocalError),
    #[error("manifests: {0}")]
    Manifests(#[from] control::ManifestError),
    #[error("cannot bind the transparent listener {addr} (needs CAP_NET_ADMIN): {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("--tcp-congestion {name}: {source} (this kernel offers: {available})")]
    Congestion {
        name: String,
        available: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--listen {0}: must be an IPv4 address")]
    ListenFamily(SocketAddr),
    #[error("installing the redirect rules: {0}")]
    Redirect(#[from] redirect::Error),
    #[error("signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

/// Runs until SIGTERM/SIGINT; returns after the drain.
pub fn main(args: RunArgs) -> Result<(), RunError> {
    crate::admin::operator::init_process(&args.operator);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?
        .block_on(run(args))
}

/// The redirect configuration for these flags.
pub fn redirect_config(
    listen: SocketAddr,
    listen_v6: Option<SocketAddr>,
    keep_client_source: bool,
) -> Result<redirect::Config, RunError> {
    let SocketAddr::V4(listener_v4) = listen else {
        return Err(RunError::ListenFamily(listen));
    };
    let listener_v6 = match listen_v6 {
        Some(SocketAddr::V6(a)) => Some(a),
        _ => None,
    };
    Ok(redirect::Config {
        table: defaults::NFT_TABLE.to_string(),
        listener_v4,
        listener_v6,
        mark: defaults::TPROXY_MARK,
        upstream_mark: defaults::UPSTREAM_MARK,
        route_table: defaults::ROUTE_TABLE,
        keep_client_source,
    })
}

/// What the kernel must do for each TCP and UDP frontend of `table`. SCTP is
/// not carried yet and is left to the node's own routing.
pub fn kernel_frontends(table: &Table) -> redirect::nft::Frontends {
    table.frontends.values().filter_map(kernel_rule).collect()
}

/// The kernel's changes from `older` to `table`: the rules of the rows that
/// changed, and none for the rows that went. O(rows) pointer comparisons
/// ([`Table::row_diff`]) plus O(changed rows) rules, where building and
/// comparing every rule cost 6 ms per table version at 10,000 services.
pub fn kernel_changes(table: &Table, older: &Table) -> redirect::nft::Changes {
    let diff = table.row_diff(older);
    let gone = diff
        .removed
        .iter()
        .filter_map(|f| Some((kernel_key(f)?, None)));
    let changed = diff
        .changed
        .iter()
        .filter_map(|f| kernel_rule(f).map(|(fe, rule)| (fe, Some(rule))));
    gone.chain(changed).collect()
}

fn kernel_key(f: &control::Frontend) -> Option<Frontend> {
    match f.key.protocol {
        Protocol::Tcp => Some(Frontend::tcp(f.key.ip, f.key.port)),
        Protocol::Udp => Some(Frontend::udp(f.key.ip, f.key.port)),
        Protocol::Sctp => None,
    }
}

/// One row's kernel rule; `None` for SCTP.
fn kernel_rule(f: &control::Frontend) -> Option<(Frontend, Rule)> {
    let fe = kernel_key(f)?;
    let action = |v| match v {
        None => Action::Proxy,
        Some(Verdict::Reject) => Action::Reject,
        Some(Verdict::Drop) => Action::Drop,
    };
    let rule = match f.allowed_sources() {
        None => Rule::from(action(f.verdict())),
        Some(nets) => Rule::only(action(f.verdict()), nets.clone()),
    };
    // The pods short-circuited to the cluster set: only an external
    // frontend of a Local-policy service has any (the same networks
    // on every ClusterIP under a detector change nothing here).
    let pods = if f.service.external_local {
        f.service.local_pod_cidrs.clone()
    } else {
        Arc::from(Vec::new())
    };
    Some((fe, rule.for_node(action(f.node_verdict()), pods)))
}

/// The Kubernetes source, once every watch's initial list is in the table:
/// rules are never programmed from a partial view of the cluster. The
/// operator servers start first, so `/ready` says what a slow sync is still
/// waiting for and `/livez` answers throughout. `None` if a signal came first.
async fn kube_table(
    args: &RunArgs,
    opts: Options,
    settings: serde_json::Value,
    signals: &mut Signals,
) -> Result<Option<Source>, RunError> {
    let client = control::kube::client(args.kubeconfig.as_deref()).await?;
    let source = control::kube::watch_cluster(client, opts);
    let ops = crate::admin::Operator::start(&args.operator, source.table.clone(), settings)?;
    ops.follow_kube(source.initial_sync.clone(), source.node.clone());
    tracing::info!("waiting for the initial Kubernetes lists");
    let mut ready = source.ready.clone();
    tokio::select! {
        r = ready.wait_for(|r| *r) => {
            r.map_err(|_| RunError::KubeStopped)?;
        }
        why = signals.recv() => {
            ops.draining();
            tracing::info!(signal = why, "stopped before the initial sync; no rules were touched");
            return Ok(None);
        }
    }
    Ok(Some((source.table, source.task, ops)))
}

type Source = (TableRx, tokio::task::JoinHandle<()>, crate::admin::Operator);

/// SIGTERM and SIGINT, registered once at start.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, RunError> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(RunError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(RunError::Signal)?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

async fn run(args: RunArgs) -> Result<(), RunError> {
    if args.node_name.trim().is_empty() {
        return Err(RunError::NoNodeName);
    }
    let opts = Options {
        node_name: args.node_name.clone(),
        proxy_name: args.proxy_name.clone(),
        labelled_only: args.labelled_only,
        node_ips: args.node_ips.clone(),
        detect_local: args.detect_local.detector()?,
    };
    let mut signals = Signals::new()?;
    let settings = serde_json::to_value(&args).unwrap_or_default();
    let (table, _source, mut ops) = if args.manifests.is_empty() {
        match kube_table(&args, opts, settings, &mut signals).await? {
            Some(source) => source,
            None => return Ok(()),
        }
    } else {
        let (table, node, task) = control::manifest::watch_manifests_and_node(
            args.manifests.clone(),
            opts,
            Duration::from_millis(args.manifest_poll_ms),
        )?;
        let ops = crate::admin::Operator::start(&args.operator, table.clone(), settings)?;
        ops.follow_node(node);
        (table, task, ops)
    };
    tracing::info!(frontends = table.borrow().len(), "table loaded");

    let (listeners, v6) = bind_listeners(&args)?;
    let udp_addrs: Vec<SocketAddr> = std::iter::once(args.listen).chain(v6).collect();
    let udp = crate::udp::bind(&udp_addrs, args.no_redirect)
        .map_err(|(addr, source)| RunError::Listen { addr, source })?;

    let rules = if args.no_redirect {
        None
    } else {
        let cfg = redirect_config(args.listen, v6, !args.masquerade_all)?;
        let from: Arc<Table> = table.borrow().clone();
        let initial = kernel_frontends(&from);
        let count = initial.len();
        let r = tokio::task::block_in_place(|| Redirector::install(cfg, initial))?;
        tracing::info!(frontends = count, "redirect rules installed");
        Some((r, from))
    };
    ops.rules_applied();
    if args.no_redirect {
        ops.follow_without_rules(table.clone());
    }

    let mut server_cfg = ServerConfig::default();
    if !args.no_redirect {
        server_cfg.relay.connect.mark = defaults::UPSTREAM_MARK;
        server_cfg.relay.connect.keep_client_source = !args.masquerade_all;
    }
    server_cfg.relay.connect.congestion = args.tcp_congestion.as_deref().map(Arc::from);
    let (drain_signal, drain_watch) = drain::channel();
    let (stop_rules_tx, stop_rules_rx) = tokio::sync::watch::channel(false);
    let rules_task = rules.map(|(r, from)| {
        tokio::spawn(follow_table(
            r,
            from,
            table.clone(),
            stop_rules_rx,
            ops.health.clone(),
        ))
    });
    let server = server::Server::new(table.clone(), server_cfg);
    let listeners_open = server.listeners_open();
    ops.serving(server.balancers().clone());
    let udp_cfg = args.udp.flow_config(
        defaults::UPSTREAM_MARK,
        !args.no_redirect && !args.masquerade_all,
    );
    let mut udp = udp.start(udp_cfg, table.clone(), server.balancers().clone());
    let data_threads = args
        .data_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut serve_task = if data_threads > 0 {
        let sets = data_listener_sets(&args, listeners, data_threads)?;
        tracing::info!(threads = sets.len(), "data-plane threads");
        tokio::spawn(async move { server.run_threaded(sets, drain_watch).await })
    } else {
        tokio::spawn(async move { server.run(listeners, drain_watch).await })
    };

    let why = tokio::select! {
        why = signals.recv() => why,
        r = &mut serve_task => {
            // The server only returns on its own for a listener error.
            let _ = stop_rules_tx.send(true);
            return match r {
                Ok(r) => r.map_err(RunError::from),
                Err(e) => Err(RunError::Runtime(std::io::Error::other(e))),
            };
        }
    };
    // Listeners first, then readiness: a client that saw `/ready` turn is
    // never accepted afterwards. Each accept loop closes its listener on its
    // own thread within moments of the signal (bounded wait all the same).
    drain_signal.start();
    for _ in 0..1000 {
        if listeners_open.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    ops.draining();
    udp.stop_receiving();
    let deadline = Duration::from_secs(args.drain_timeout);
    tracing::info!(
        signal = why,
        ?deadline,
        "shutting down: no new connections, draining"
    );
    let drained = drain_signal.drain(deadline).await;
    let _ = serve_task.await;
    tracing::info!(?drained, "drained");

    let _ = stop_rules_tx.send(true);
    if let Some(task) = rules_task {
        if let Ok(r) = task.await {
            if args.remove_rules_on_exit {
                tokio::task::block_in_place(|| r.remove())?;
                tracing::info!("redirect rules removed");
            } else {
                tracing::info!(
                    "redirect rules kept: service connections fail fast until lightpath is back"
                );
            }
        }
    }
    drop(table);
    Ok(())
}

/// Binds the v4 listener and, unless disabled or unsupported on this host,
/// the v6 one. Returns the v6 address actually bound.
fn bind_listeners(args: &RunArgs) -> Result<(Vec<TcpListener>, Option<SocketAddr>), RunError> {
    let congestion = args.tcp_congestion.as_deref();
    let mut out = vec![bind_one(args.listen, args.no_redirect, congestion)?];
    let mut v6 = None;
    if !args.no_ipv6 {
        match bind_one(args.listen_v6, args.no_redirect, congestion) {
            Ok(l) => {
                out.push(l);
                v6 = Some(args.listen_v6);
            }
            // No IPv6 on this host (EADDRNOTAVAIL/EAFNOSUPPORT): serve v4 only;
            // the rules then refuse IPv6 frontends.
            Err(RunError::Listen { addr, source })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::Unsupported
                ) =>
            {
                tracing::warn!(%addr, error = %source, "IPv6 unavailable, serving IPv4 only");
            }
            Err(e) => return Err(e),
        }
    }
    Ok((out, v6))
}

/// `threads` sets of listeners for [`server::Server::run_threaded`]:
/// `first` (already bound) plus more bound to the same addresses through
/// SO_REUSEPORT. A set that cannot be bound (a plain listener without
/// SO_REUSEPORT) leaves fewer threads, never none.
fn data_listener_sets(
    args: &RunArgs,
    first: Vec<TcpListener>,
    threads: usize,
) -> Result<Vec<Vec<std::net::TcpListener>>, RunError> {
    let to_std = |set: Vec<TcpListener>| -> Result<Vec<std::net::TcpListener>, RunError> {
        set.into_iter()
            .map(|l| {
                let addr = l.local_addr().unwrap_or(args.listen);
                l.into_std()
                    .map_err(|source| RunError::Listen { addr, source })
            })
            .collect()
    };
    let mut sets = vec![to_std(first)?];
    while sets.len() < threads {
        match bind_listeners(args) {
            Ok((set, _)) => sets.push(to_std(set)?),
            Err(e) => {
                tracing::warn!(error = %e, threads = sets.len(), "no more data-plane listeners");
                break;
            }
        }
    }
    Ok(sets)
}

/// One listener on `addr`: transparent and marked under our rules, plain
/// without them (`no_redirect`), with `congestion` for its connections.
fn bind_one(
    addr: SocketAddr,
    no_redirect: bool,
    congestion: Option<&str>,
) -> Result<TcpListener, RunError> {
    let std_listener = match redirect::sockopt::transparent_listener(addr) {
        // Every accepted socket inherits the listener's SO_MARK (the kernel
        // copies it into the request sock), so the proxy's replies to
        // clients leave by the output chain's first rule, like its upstream
        // packets, instead of a service-map lookup per packet. One
        // setsockopt per listener, none per connection.
        Ok(l) if !no_redirect => {
            redirect::sockopt::set_mark(&l, defaults::UPSTREAM_MARK)
                .map_err(|source| RunError::Listen { addr, source })?;
            l
        }
        Ok(l) => l,
        // Without our rules, someone else steers traffic (REDIRECT): a plain
        // listener works and needs no privilege.
        Err(e) if no_redirect && e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(%addr, "no CAP_NET_ADMIN: plain listener (original destination from SO_ORIGINAL_DST)");
            let l = std::net::TcpListener::bind(addr)
                .map_err(|source| RunError::Listen { addr, source })?;
            l.set_nonblocking(true)
                .map_err(|source| RunError::Listen { addr, source })?;
            l
        }
        Err(source) => return Err(RunError::Listen { addr, source }),
    };
    if let Some(name) = congestion {
        // Accepted sockets inherit it: one setsockopt per listener.
        redirect::sockopt::set_congestion(&std_listener, name).map_err(|source| {
            RunError::Congestion {
                name: name.to_string(),
                available: available_congestion(),
                source,
            }
        })?;
    }
    TcpListener::from_std(std_listener).map_err(|source| RunError::Listen { addr, source })
}

/// The kernel's `net.ipv4.tcp_available_congestion_control`, for the error
/// that names an algorithm it lacks.
fn available_congestion() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unknown: {e}"))
}

/// Applies every table snapshot to the kernel as a diff until told to stop;
/// returns the redirector so the caller can keep or remove the rules.
/// `installed`: the table the rules were installed from; each snapshot's
/// changes are taken against the last one applied (after a failure, the
/// next attempt still carries the failed changes).
async fn follow_table(
    mut rules: Redirector,
    mut installed: Arc<Table>,
    mut table: TableRx,
    mut stop: tokio::sync::watch::Receiver<bool>,
    health: crate::health::ProxyHealth,
) -> Redirector {
    let mut failed = false;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return rules,
            r = table.changed() => {
                if r.is_err() {
                    // The source ended; the last rules stay until we are stopped.
                    let _ = stop.changed().await;
                    return rules;
                }
            }
            _ = tokio::time::sleep(REDIRECT_RETRY), if failed => {}
        }
        let snapshot: Arc<Table> = table.borrow_and_update().clone();
        health.queued_update_all();
        let started = std::time::Instant::now();
        let changes = kernel_changes(&snapshot, &installed);
        // `nft` and `ip` are short blocking subprocesses; this task owns the
        // redirector, so it simply yields its worker thread meanwhile.
        let result = tokio::task::block_in_place(|| rules.apply(changes));
        match result {
            Ok(stats) => {
                installed = snapshot.clone();
                crate::admin::operator::rules_update_result(&health, started.elapsed(), true);
                failed = false;
                if stats.changed > 0 {
                    tracing::info!(version = snapshot.version, changed = stats.changed, full_reload = stats.full_reload, elapsed = ?stats.elapsed, "redirect rules updated");
                }
            }
            Err(e) => {
                crate::admin::operator::rules_update_result(&health, started.elapsed(), false);
                failed = true;
                tracing::error!(version = snapshot.version, error = %e, "redirect update failed; retrying");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table's kernel changes, applied to the rules of the table before
    /// it, give the rules of the table itself: through endpoints that move,
    /// services left without endpoints (their verdict turns to reject),
    /// deleted and re-added (`synth::churn_step`), and versions skipped.
    #[test]
    fn kernel_changes_turn_the_older_rules_into_the_newer() {
        let (first, later) = control::synth::churned(20, 3, 24);
        let mut older = &first;
        let mut rules = kernel_frontends(older);
        let mut touched = 0;
        for (i, table) in later.iter().enumerate() {
            let changes = kernel_changes(table, older);
            touched += changes.len();
            redirect::nft::patch(&mut rules, changes);
            assert_eq!(rules, kernel_frontends(table), "table {i} after the first");
            older = table;
        }
        assert!(touched > 0 && touched < 24 * 20, "{touched} changes");
        assert!(rules.len() < 20, "services were deleted");
    }

    #[test]
    fn listen_must_be_v4() {
        let e = redirect_config("[::1]:15001".parse().unwrap(), None, true).unwrap_err();
        assert!(e.to_string().contains("--listen [::1]:15001"), "{e}");
        let c = redirect_config(
            defaults::PROXY_ADDR.parse().unwrap(),
            Some(defaults::PROXY_ADDR_V6.parse().unwrap()),
            true,
        )
        .unwrap();
        assert_eq!(c.table, "lightpath");
        assert_eq!(c.mark, 1);
        assert_eq!(c.upstream_mark, 2);
        assert!(c.listener_v6.is_some());
    }

    /// A listener from [`bind_one`] on a loopback port and one connection it
    /// accepted, with the client's end (kept open).
    async fn bound_and_accepted(
        no_redirect: bool,
        congestion: Option<&str>,
    ) -> (TcpListener, tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = bind_one("127.0.0.1:0".parse().unwrap(), no_redirect, congestion).unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        (l, s, c)
    }

    #[tokio::test]
    async fn accepted_connections_carry_the_upstream_mark() {
        if !crate::sandbox::require_root(
            "accepted_connections_carry_the_upstream_mark",
            "transparent listeners and SO_MARK",
        ) {
            return;
        }
        fn mark(fd: &impl std::os::fd::AsFd) -> u32 {
            socket2::SockRef::from(fd).mark().unwrap()
        }
        // With our rules: the listener and every accepted socket are marked.
        let (l, s, _c) = bound_and_accepted(false, None).await;
        assert_eq!(mark(&l), defaults::UPSTREAM_MARK);
        assert_eq!(mark(&s), defaults::UPSTREAM_MARK);
        // Without them (--no-redirect), nothing is marked.
        let (_l, s, _c) = bound_and_accepted(true, None).await;
        assert_eq!(mark(&s), 0);
    }

    /// `--tcp-congestion`: set on the listener, so every accepted socket has
    /// it, with or without our rules (and without the flag, the node's
    /// default, which is not `reno` on any usual kernel); a name the kernel
    /// lacks fails the start, naming the flag and what the kernel offers.
    #[tokio::test]
    async fn accepted_connections_use_the_chosen_congestion_control() {
        if !crate::sandbox::require_root(
            "accepted_connections_use_the_chosen_congestion_control",
            "transparent listeners",
        ) {
            return;
        }
        let cc = |s: &tokio::net::TcpStream| redirect::sockopt::congestion(s).unwrap();
        for no_redirect in [false, true] {
            let (_l, s, _c) = bound_and_accepted(no_redirect, Some("reno")).await;
            assert_eq!(cc(&s), "reno");
            let (_l, s, _c) = bound_and_accepted(no_redirect, None).await;
            assert_ne!(
                cc(&s),
                "reno",
                "the node's default must differ for this test"
            );
        }
        let e = bind_one("127.0.0.1:0".parse().unwrap(), false, Some("no-such-cc")).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("--tcp-congestion no-such-cc: "), "{text}");
        assert!(text.contains("this kernel offers: "), "{text}");
    }

    #[test]
    fn congestion_names_are_checked_before_the_kernel_sees_them() {
        assert_eq!(parse_congestion("cubic"), Ok("cubic".to_string()));
        assert_eq!(parse_congestion("bbr"), Ok("bbr".to_string()));
        for bad in ["", "cubic bbr", "a-name-of-16-byt", "bbr\0"] {
            let e = parse_congestion(bad).unwrap_err();
            assert!(e.contains("not a congestion control name"), "{bad:?}: {e}");
        }
    }
}
