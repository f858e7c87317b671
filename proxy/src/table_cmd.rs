//! `lightpath table`: print what this node would do with every Service
//! frontend, resolved from manifest files.
//!
//! Why: it answers the operator's question "what will this node do with that
//! service?" without running anything — the same translation `run` uses,
//! printed. `--json` is a stable shape (documented in the README under
//! "lightpath table") built from its own structs here, so internal model
//! changes never silently change what tools read.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;

use control::{Affinity, Endpoint, EndpointState, Frontend, FrontendKind, Options, Table, Verdict};
use serde::Serialize;

/// The schema tag of `--json` output; bumped on any incompatible change.
pub const JSON_SCHEMA: &str = "lightpath.table/v1";

#[derive(clap::Args, Debug, Clone)]
pub struct TableArgs {
    /// Manifest files: YAML or JSON, multi-document, `List` kinds allowed.
    #[arg(long, required = true, num_args = 1.., value_delimiter = ',', env = "LIGHTPATH_MANIFESTS")]
    pub manifests: Vec<PathBuf>,
    /// This node's name (endpoint locality, NodePort addresses, zone).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Print the stable JSON shape instead of text.
    #[arg(long)]
    pub json: bool,
    /// Our `service.kubernetes.io/service-proxy-name`.
    #[arg(long, env = "LIGHTPATH_PROXY_NAME", default_value = control::options::DEFAULT_PROXY_NAME)]
    pub proxy_name: String,
    /// Take only Services labelled with our proxy name (beside kube-proxy).
    #[arg(long, env = "LIGHTPATH_LABELLED_ONLY")]
    pub labelled_only: bool,
    /// Extra NodePort addresses besides the Node's InternalIP/ExternalIP.
    #[arg(long = "node-ip", value_delimiter = ',', env = "LIGHTPATH_NODE_IPS")]
    pub node_ips: Vec<IpAddr>,
    /// kube-proxy's local traffic detector, as `lightpath run` takes it.
    #[command(flatten)]
    pub detect_local: crate::detect_local::DetectLocalArgs,
}

impl TableArgs {
    pub fn options(&self) -> Result<Options, crate::detect_local::DetectLocalError> {
        Ok(Options {
            node_name: self.node_name.clone(),
            proxy_name: self.proxy_name.clone(),
            labelled_only: self.labelled_only,
            node_ips: self.node_ips.clone(),
            detect_local: self.detect_local.detector()?,
        })
    }
}

/// Loads the manifests and prints the table to stdout.
pub fn main(args: TableArgs) -> anyhow::Result<()> {
    let table = control::load_manifests(&args.manifests, &args.options()?)?;
    let out = if args.json {
        let mut s = serde_json::to_string_pretty(&json_view(&table, &args.node_name))?;
        s.push('\n');
        s
    } else {
        render_text(&table, &args.node_name)
    };
    std::io::stdout().lock().write_all(out.as_bytes())?;
    Ok(())
}

fn kind_name(k: FrontendKind) -> &'static str {
    match k {
        FrontendKind::ClusterIp => "clusterIP",
        FrontendKind::ExternalIp => "externalIP",
        FrontendKind::LoadBalancer => "loadBalancer",
        FrontendKind::NodePort => "nodePort",
    }
}

fn state_name(s: EndpointState) -> &'static str {
    match s {
        EndpointState::Ready => "ready",
        EndpointState::ServingTerminating => "serving-terminating",
    }
}

fn verdict_name(v: Option<Verdict>) -> &'static str {
    match v {
        None => "forward",
        Some(Verdict::Reject) => "reject",
        Some(Verdict::Drop) => "drop",
    }
}

fn uses_local(f: &Frontend) -> bool {
    if f.kind.is_external() {
        f.service.external_local
    } else {
        f.service.internal_local
    }
}

fn affinity_text(a: &Affinity) -> String {
    match a {
        Affinity::None => "none".into(),
        Affinity::ClientIp { timeout } => format!("clientIP/{}s", timeout.as_secs()),
    }
}

fn set_text(eps: &[Endpoint]) -> String {
    if eps.is_empty() {
        return "-".into();
    }
    eps.iter()
        .map(|e| format!("{} {}", e.addr, state_name(e.state)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human-readable table: one block per frontend, sorted by address.
pub fn render_text(table: &Table, node: &str) -> String {
    let mut s = format!(
        "node {node}: {} frontends (table version {})\n",
        table.len(),
        table.version
    );
    for f in table.sorted() {
        let sp = &f.service;
        s.push_str(&format!(
            "\n{}  {}  {}  mode={}  affinity={}  policy={}\n",
            f.key,
            kind_name(f.kind),
            sp.name,
            mode_name(sp.mode),
            affinity_text(&sp.affinity),
            if uses_local(f) { "Local" } else { "Cluster" },
        ));
        s.push_str(&format!(
            "    cluster  {}\n",
            set_text(&sp.cluster_endpoints)
        ));
        s.push_str(&format!("    local    {}\n", set_text(&sp.local_endpoints)));
        if !sp.annotations.is_empty() {
            let a: Vec<String> = sp
                .annotations
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            s.push_str(&format!("    annot.   {}\n", a.join(", ")));
        }
        if let Some(nets) = f.allowed_sources() {
            let n: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
            s.push_str(&format!("    sources  {} (others dropped)\n", n.join(", ")));
        }
        if let Some(nets) = kept_sources(f) {
            s.push_str(&format!(
                "    source   kept for {} (others masqueraded)\n",
                nets.join(", ")
            ));
        }
        let why = match f.verdict() {
            None => format!("({} endpoints)", f.endpoints().len()),
            Some(Verdict::Reject) => "(no usable endpoints anywhere)".into(),
            Some(Verdict::Drop) => "(Local policy, no endpoint on this node)".into(),
        };
        s.push_str(&format!(
            "    verdict  {} {why}\n",
            verdict_name(f.verdict())
        ));
        if f.node_verdict() != f.verdict() {
            s.push_str(&format!(
                "    node     {} (clients on this node use the cluster set)\n",
                verdict_name(f.node_verdict())
            ));
        }
    }
    s
}

/// Under a local traffic detector, the sources a ClusterIP frontend leaves
/// unchanged; every other client is masqueraded
/// (`ServicePort::kept_cluster_ip_sources`).
fn kept_sources(f: &Frontend) -> Option<Vec<String>> {
    if f.kind != FrontendKind::ClusterIp {
        return None;
    }
    let nets = f.service.kept_cluster_ip_sources(f.key.ip.is_ipv4())?;
    Some(nets.map(|n| n.to_string()).collect())
}

fn mode_name(m: control::Mode) -> &'static str {
    match m {
        control::Mode::L4 => "l4",
        control::Mode::Http => "http",
        control::Mode::H2c => "h2c",
    }
}

/// `--json` top level.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct JsonTable {
    pub schema: &'static str,
    pub node_name: String,
    pub version: u64,
    pub frontends: Vec<JsonFrontend>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct JsonFrontend {
    /// `ip:port/PROTO`
    pub frontend: String,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// clusterIP | externalIP | loadBalancer | nodePort
    pub kind: &'static str,
    /// `namespace/name[:port]`
    pub service: String,
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    /// l4 | http | h2c
    pub mode: &'static str,
    pub affinity: JsonAffinity,
    /// The policy applying to this frontend: Cluster | Local
    pub traffic_policy: &'static str,
    /// The set this frontend uses (cluster or local per policy).
    pub endpoints: Vec<JsonEndpoint>,
    pub cluster_endpoints: Vec<JsonEndpoint>,
    pub local_endpoints: Vec<JsonEndpoint>,
    /// forward | reject | drop
    pub verdict: &'static str,
    /// The verdict for clients on this node, when it differs (an external
    /// frontend of a Local-policy service: they use the cluster set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_verdict: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    /// The only sources the kernel lets through (`loadBalancerSourceRanges`,
    /// LoadBalancer frontends only); absent: any source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_sources: Option<Vec<String>>,
    /// ClusterIP frontends under a local traffic detector (`--cluster-cidr`,
    /// `--detect-local-mode`): the only clients whose address the endpoint
    /// sees; the others are masqueraded. Absent: every client is kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_sources: Option<Vec<String>>,
    pub annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct JsonAffinity {
    /// None | ClientIP
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct JsonEndpoint {
    /// `ip:port`
    pub address: String,
    /// ready | serving-terminating
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

fn json_eps(eps: &[Endpoint]) -> Vec<JsonEndpoint> {
    eps.iter()
        .map(|e| JsonEndpoint {
            address: e.addr.to_string(),
            state: state_name(e.state),
            node_name: e.node_name.as_deref().map(str::to_string),
            zone: e.zone.as_deref().map(str::to_string),
        })
        .collect()
}

/// The `--json` document.
pub fn json_view(table: &Table, node: &str) -> JsonTable {
    let frontends = table
        .sorted()
        .into_iter()
        .map(|f| {
            let sp = &f.service;
            JsonFrontend {
                frontend: f.key.to_string(),
                ip: f.key.ip,
                port: f.key.port,
                protocol: f.key.protocol.to_string(),
                kind: kind_name(f.kind),
                service: sp.name.to_string(),
                namespace: sp.name.namespace.clone(),
                name: sp.name.name.clone(),
                port_name: sp.name.port.clone(),
                mode: mode_name(sp.mode),
                affinity: match sp.affinity {
                    Affinity::None => JsonAffinity {
                        kind: "None",
                        timeout_seconds: None,
                    },
                    Affinity::ClientIp { timeout } => JsonAffinity {
                        kind: "ClientIP",
                        timeout_seconds: Some(timeout.as_secs()),
                    },
                },
                traffic_policy: if uses_local(f) { "Local" } else { "Cluster" },
                endpoints: json_eps(f.endpoints()),
                cluster_endpoints: json_eps(&sp.cluster_endpoints),
                local_endpoints: json_eps(&sp.local_endpoints),
                verdict: verdict_name(f.verdict()),
                node_verdict: (f.node_verdict() != f.verdict())
                    .then(|| verdict_name(f.node_verdict())),
                health_check_node_port: sp.health_check_node_port,
                allowed_sources: f
                    .allowed_sources()
                    .map(|nets| nets.iter().map(|n| n.to_string()).collect()),
                kept_sources: kept_sources(f),
                annotations: sp.annotations.clone(),
            }
        })
        .collect();
    JsonTable {
        schema: JSON_SCHEMA,
        node_name: node.to_string(),
        version: table.version,
        frontends,
    }
}
