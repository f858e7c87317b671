//! Kubernetes objects → validated, minimal facts.
//!
//! Why a separate step: an object is validated once, when it arrives, into a
//! small struct holding only what translation needs. Bad input is rejected
//! here with the field named ([`ObjectError`]) so the previous good version
//! keeps serving, and translation (re-run on every endpoint change) never
//! has to handle malformed data or touch the large k8s-openapi structs.
//!
//! Skipping rules follow kube-proxy: `ShouldSkipService` (headless,
//! ExternalName) plus its informer label selector
//! (`!service.kubernetes.io/headless`, `service.kubernetes.io/service-proxy-name`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::error::ObjectError;
use crate::model::{Affinity, Family, Mode, Protocol};
use crate::options::Options;

pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// Annotations with this prefix are copied into `ServicePort::annotations`.
pub const ANNOTATION_PREFIX: &str = "lightpath.io/";
/// `tcp`, `http` or `h2c`: overrides the detected mode of every port.
pub const ANNOTATION_PROTOCOL: &str = "lightpath.io/protocol";
/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);
/// The API server's upper bound for that timeout (one day).
const MAX_AFFINITY_TIMEOUT_SECS: i32 = 86400;

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        ObjKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a valid Service produces no frontends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    Headless,
    ExternalName,
    /// Labelled for another proxy (the label's value).
    OtherProxy(String),
    /// `labelled_only` mode and the service is not labelled with our name.
    NotLabelled,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::Headless => f.write_str("headless (clusterIP None)"),
            Skip::ExternalName => f.write_str("type ExternalName"),
            Skip::OtherProxy(p) => write!(f, "{LABEL_SERVICE_PROXY_NAME}={p} is another proxy"),
            Skip::NotLabelled => write!(
                f,
                "not labelled {LABEL_SERVICE_PROXY_NAME} (labelled-only mode)"
            ),
        }
    }
}

/// One `spec.ports[]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// Empty for a single unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
    pub mode: Mode,
}

/// The facts of a proxied Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub key: ObjKey,
    /// `spec.clusterIPs` (or `spec.clusterIP`), in order.
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` with `ipMode` unset or `VIP`.
    pub lb_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`, both families, as networks (host
    /// bits cleared, as kube-proxy's sloppy CIDR parse does).
    pub source_ranges: Vec<IpNet>,
    pub ports: Vec<PortInfo>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// kube-proxy's `ExternalPolicyLocal`: externally accessible by type
    /// (NodePort, LoadBalancer, ClusterIP with externalIPs) and
    /// `externalTrafficPolicy: Local`.
    pub external_policy_local: bool,
    pub affinity: Affinity,
    /// Only for `type: LoadBalancer` with `externalTrafficPolicy: Local`.
    pub health_check_node_port: Option<u16>,
    pub annotations: BTreeMap<String, String>,
}

impl ServiceInfo {
    /// kube-proxy's `GetClusterIPByFamily`: the first ClusterIP of `family`.
    pub fn cluster_ip(&self, family: Family) -> Option<IpAddr> {
        self.cluster_ips
            .iter()
            .copied()
            .find(|ip| Family::of(ip) == family)
    }
}

/// One `ports[]` entry of an EndpointSlice, kept only when kube-proxy would
/// use it (named, non-zero port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One `endpoints[]` entry (its first address, as kube-proxy uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    /// `hints.forZones[].name`; empty = no zone hints.
    pub zone_hints: Vec<Arc<str>>,
    /// `hints.forNodes[].name`; empty = no node hints.
    pub node_hints: Vec<Arc<str>>,
}

/// The facts of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub key: ObjKey,
    /// The `kubernetes.io/service-name` label; `None` = the slice is ignored.
    pub service: Option<String>,
    /// `None` for `addressType: FQDN`, which kube-proxy does not proxy.
    pub family: Option<Family>,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointInfo>,
}

impl SliceInfo {
    pub fn service_key(&self) -> Option<ObjKey> {
        self.service
            .as_ref()
            .map(|s| ObjKey::new(&self.key.namespace, s))
    }
}

/// The facts of our Node.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<Arc<str>>,
    /// `status.addresses` of type InternalIP / ExternalIP.
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs` (or `spec.podCIDR`): this node's pods, whose traffic
    /// kube-proxy short-circuits like the node's own (its NodeCIDR local
    /// detection).
    pub pod_cidrs: Vec<IpNet>,
}

fn namespace_of(ns: &Option<String>) -> &str {
    match ns.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => "default",
    }
}

fn required_name<'a>(
    kind: &'static str,
    namespace: &str,
    name: &'a Option<String>,
) -> Result<&'a str, ObjectError> {
    match name.as_deref() {
        Some(n) if !n.is_empty() => Ok(n),
        _ => Err(ObjectError::new(
            kind,
            namespace,
            "<unnamed>",
            "metadata.name",
            "missing",
        )),
    }
}

/// `TCP`/`UDP`/`SCTP`; unset means TCP (the API server's default).
pub fn parse_protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(format!(
            "unknown protocol {other:?} (want TCP, UDP or SCTP)"
        )),
    }
}

fn parse_port(v: i32) -> Result<u16, String> {
    match u16::try_from(v) {
        // k8s-openapi reads a missing required port as 0.
        Ok(0) => Err("missing or 0 (want 1-65535)".to_string()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("port {v} out of range 1-65535")),
    }
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse::<IpAddr>()
        .map_err(|_| format!("invalid IP address {s:?}"))
}

/// A list field that replaced a singular one (`spec.clusterIPs` and
/// `spec.clusterIP`, `spec.podCIDRs` and `spec.podCIDR`): the list's entries
/// when it has any, else the single value when set and not empty; each with
/// its field path for errors (`spec.clusterIPs[1]`, `spec.clusterIP`).
fn list_or_single<'a>(
    (list_field, list): (&str, Option<&'a [String]>),
    (single_field, single): (&str, Option<&'a str>),
) -> Vec<(String, &'a str)> {
    match list {
        Some(v) if !v.is_empty() => v
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("{list_field}[{i}]"), s.as_str()))
            .collect(),
        _ => single
            .filter(|s| !s.is_empty())
            .map(|s| (single_field.to_string(), s))
            .into_iter()
            .collect(),
    }
}

/// A CIDR as kube-proxy's `ParseCIDRSloppy` takes it: host bits allowed
/// and cleared.
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("invalid CIDR {s:?} (want e.g. 203.0.113.0/24 or 2001:db8::/64)"))
}

/// How a port is carried, from the forcing annotation, `appProtocol`, or
/// the port-name prefix (Istio's `<protocol>[-suffix]` convention).
pub fn detect_mode(
    forced: Option<Mode>,
    protocol: Protocol,
    app_protocol: Option<&str>,
    name: &str,
) -> Mode {
    if protocol != Protocol::Tcp {
        return Mode::L4;
    }
    if let Some(m) = forced {
        return m;
    }
    if let Some(ap) = app_protocol {
        return match ap.to_ascii_lowercase().as_str() {
            "http" | "kubernetes.io/ws" | "http1" | "grpc-web" => Mode::Http,
            "kubernetes.io/h2c" | "h2c" | "http2" | "grpc" => Mode::H2c,
            _ => Mode::L4,
        };
    }
    let lower = name.to_ascii_lowercase();
    if lower == "grpc-web" || lower.starts_with("grpc-web-") {
        return Mode::Http;
    }
    match lower.split('-').next().unwrap_or("") {
        "http" => Mode::Http,
        "http2" | "grpc" | "h2c" => Mode::H2c,
        _ => Mode::L4,
    }
}

/// Validates a Service. `Ok(Err(skip))` is a valid Service we do not proxy.
pub fn parse_service(
    svc: &Service,
    opts: &Options,
) -> Result<Result<ServiceInfo, Skip>, ObjectError> {
    const KIND: &str = "Service";
    let ns = namespace_of(&svc.metadata.namespace);
    let name = required_name(KIND, ns, &svc.metadata.name)?;
    let err = |field: String, msg: String| ObjectError::new(KIND, ns, name, field, msg);

    let labels = svc.metadata.labels.as_ref();
    let proxy_label = labels.and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME));
    match proxy_label {
        Some(p) if *p != opts.proxy_name => return Ok(Err(Skip::OtherProxy(p.clone()))),
        None if opts.labelled_only => return Ok(Err(Skip::NotLabelled)),
        _ => {}
    }
    if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        return Ok(Err(Skip::Headless));
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Err(err("spec".into(), "missing".into()));
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    match svc_type {
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        "ExternalName" => return Ok(Err(Skip::ExternalName)),
        other => {
            return Err(err(
                "spec.type".into(),
                format!(
                "unknown type {other:?} (want ClusterIP, NodePort, LoadBalancer or ExternalName)"
            ),
            ))
        }
    }

    // kube-proxy's IsServiceIPSet looks at spec.clusterIP; clusterIPs[0]
    // mirrors it on any API server that fills clusterIPs.
    let raw_ips = list_or_single(
        ("spec.clusterIPs", spec.cluster_ips.as_deref()),
        ("spec.clusterIP", spec.cluster_ip.as_deref()),
    );
    if raw_ips
        .first()
        .is_none_or(|(_, ip)| ip.is_empty() || *ip == "None")
        || spec.cluster_ip.as_deref() == Some("None")
    {
        return Ok(Err(Skip::Headless));
    }
    let mut cluster_ips = Vec::with_capacity(raw_ips.len());
    for (field, raw) in raw_ips {
        cluster_ips.push(parse_ip(raw).map_err(|m| err(field, m))?);
    }

    let mut external_ips = Vec::new();
    for (i, raw) in spec.external_ips.iter().flatten().enumerate() {
        external_ips.push(parse_ip(raw).map_err(|m| err(format!("spec.externalIPs[{i}]"), m))?);
    }

    let mut lb_ips = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let vip = match ing.ip_mode.as_deref() {
            None | Some("VIP") => true,
            Some("Proxy") => false,
            Some(other) => {
                return Err(err(
                    format!("status.loadBalancer.ingress[{i}].ipMode"),
                    format!("unknown ipMode {other:?} (want VIP or Proxy)"),
                ))
            }
        };
        let Some(raw) = ing.ip.as_deref().filter(|s| !s.is_empty()) else {
            continue; // hostname-only ingress: nothing to capture
        };
        let ip =
            parse_ip(raw).map_err(|m| err(format!("status.loadBalancer.ingress[{i}].ip"), m))?;
        if vip {
            lb_ips.push(ip);
        }
    }

    let mut source_ranges = Vec::new();
    for (i, raw) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        // kube-proxy trims (API validation let padded values through) and
        // skips empty entries.
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let net =
            parse_cidr(raw).map_err(|m| err(format!("spec.loadBalancerSourceRanges[{i}]"), m))?;
        source_ranges.push(net);
    }

    let annotations: BTreeMap<String, String> = svc
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let forced = match annotations
        .get(ANNOTATION_PROTOCOL)
        .map(|v| v.trim().to_ascii_lowercase())
    {
        None => None,
        Some(v) => Some(match v.as_str() {
            "tcp" => Mode::L4,
            "http" => Mode::Http,
            "h2c" => Mode::H2c,
            _ => {
                return Err(err(
                    format!("metadata.annotations[{ANNOTATION_PROTOCOL}]"),
                    format!("unknown protocol {v:?} (want tcp, http or h2c)"),
                ))
            }
        }),
    };

    let mut ports: Vec<PortInfo> = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = parse_port(p.port).map_err(|m| err(format!("spec.ports[{i}].port"), m))?;
        let protocol = parse_protocol(p.protocol.as_deref())
            .map_err(|m| err(format!("spec.ports[{i}].protocol"), m))?;
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => {
                Some(parse_port(n).map_err(|m| err(format!("spec.ports[{i}].nodePort"), m))?)
            }
        };
        let pname = p.name.clone().unwrap_or_default();
        if ports.iter().any(|q| q.name == pname) {
            return Err(err(
                format!("spec.ports[{i}].name"),
                format!("duplicate port name {pname:?}"),
            ));
        }
        let mode = detect_mode(forced, protocol, p.app_protocol.as_deref(), &pname);
        ports.push(PortInfo {
            name: pname,
            protocol,
            port,
            node_port,
            mode,
        });
    }

    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(err(
                "spec.internalTrafficPolicy".into(),
                format!("unknown policy {other:?} (want Cluster or Local)"),
            ))
        }
    };
    let etp_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(err(
                "spec.externalTrafficPolicy".into(),
                format!("unknown policy {other:?} (want Cluster or Local)"),
            ))
        }
    };
    // apiservice.ExternallyAccessible: by type, not by port.
    let externally_accessible = matches!(svc_type, "NodePort" | "LoadBalancer")
        || (svc_type == "ClusterIP" && !external_ips.is_empty());
    let external_policy_local = externally_accessible && etp_local;

    let affinity = match spec.session_affinity.as_deref() {
        None | Some("None") => Affinity::None,
        Some("ClientIP") => {
            let secs = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            let timeout = match secs {
                None => DEFAULT_AFFINITY_TIMEOUT,
                Some(s) if (1..=MAX_AFFINITY_TIMEOUT_SECS).contains(&s) => {
                    Duration::from_secs(s as u64)
                }
                Some(s) => {
                    return Err(err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        format!("{s} out of range 1-{MAX_AFFINITY_TIMEOUT_SECS}"),
                    ))
                }
            };
            Affinity::ClientIp { timeout }
        }
        Some(other) => {
            return Err(err(
                "spec.sessionAffinity".into(),
                format!("unknown affinity {other:?} (want None or ClientIP)"),
            ))
        }
    };

    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(n) => {
            let p = parse_port(n).map_err(|m| err("spec.healthCheckNodePort".into(), m))?;
            (svc_type == "LoadBalancer" && etp_local).then_some(p)
        }
    };

    Ok(Ok(ServiceInfo {
        key: ObjKey::new(ns, name),
        cluster_ips,
        external_ips,
        lb_ips,
        source_ranges,
        ports,
        internal_local,
        external_policy_local,
        affinity,
        health_check_node_port,
        annotations,
    }))
}

/// Validates an EndpointSlice. Parts kube-proxy ignores (ports without a
/// name or number, endpoints without addresses) are dropped, not errors.
pub fn parse_slice(slice: &EndpointSlice) -> Result<SliceInfo, ObjectError> {
    const KIND: &str = "EndpointSlice";
    let ns = namespace_of(&slice.metadata.namespace);
    let name = required_name(KIND, ns, &slice.metadata.name)?;
    let err = |field: String, msg: String| ObjectError::new(KIND, ns, name, field, msg);

    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .filter(|s| !s.is_empty())
        .cloned();
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(Family::V4),
        "IPv6" => Some(Family::V6),
        "FQDN" => None,
        "" => {
            return Err(err(
                "addressType".into(),
                "missing (want IPv4, IPv6 or FQDN)".into(),
            ))
        }
        other => {
            return Err(err(
                "addressType".into(),
                format!("unknown address type {other:?} (want IPv4, IPv6 or FQDN)"),
            ))
        }
    };

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let protocol = parse_protocol(p.protocol.as_deref())
            .map_err(|m| err(format!("ports[{i}].protocol"), m))?;
        let port = match p.port {
            None | Some(0) => continue, // kube-proxy: "Ignoring invalid endpoint port"
            Some(n) => parse_port(n).map_err(|m| err(format!("ports[{i}].port"), m))?,
        };
        let Some(pname) = p.name.clone() else {
            continue; // kube-proxy: "Ignoring port with nil name"
        };
        ports.push(SlicePort {
            name: pname,
            protocol,
            port,
        });
    }

    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    if let Some(family) = family {
        for (i, ep) in slice.endpoints.iter().enumerate() {
            let Some(raw) = ep.addresses.first() else {
                continue; // kube-proxy: "Ignoring invalid endpoint port with empty address"
            };
            let ip = match raw.parse::<IpAddr>() {
                Ok(ip) if Family::of(&ip) == family => ip,
                _ => {
                    return Err(err(
                        format!("endpoints[{i}].addresses[0]"),
                        format!("invalid {} address {raw:?}", family.name()),
                    ))
                }
            };
            let c = ep.conditions.as_ref();
            let hints = ep.hints.as_ref();
            endpoints.push(EndpointInfo {
                ip,
                ready: c.and_then(|c| c.ready).unwrap_or(true),
                serving: c.and_then(|c| c.serving).unwrap_or(true),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                node_name: ep.node_name.as_deref().map(Arc::from),
                zone: ep.zone.as_deref().map(Arc::from),
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| Arc::from(z.name.as_str()))
                    .collect(),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| Arc::from(n.name.as_str()))
                    .collect(),
            });
        }
    }

    Ok(SliceInfo {
        key: ObjKey::new(ns, name),
        service,
        family,
        ports,
        endpoints,
    })
}

/// Validates a Node (only ever called for our own node).
pub fn parse_node(node: &Node) -> Result<NodeInfo, ObjectError> {
    const KIND: &str = "Node";
    let name = required_name(KIND, "", &node.metadata.name)?;
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
        .filter(|z| !z.is_empty())
        .map(|z| Arc::from(z.as_str()));
    let mut addresses = Vec::new();
    let addrs = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in addrs.into_iter().flatten().enumerate() {
        if a.type_ == "InternalIP" || a.type_ == "ExternalIP" {
            let ip = parse_ip(&a.address).map_err(|m| {
                ObjectError::new(KIND, "", name, format!("status.addresses[{i}].address"), m)
            })?;
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
    }
    let spec = node.spec.as_ref();
    let raw = list_or_single(
        ("spec.podCIDRs", spec.and_then(|s| s.pod_cidrs.as_deref())),
        ("spec.podCIDR", spec.and_then(|s| s.pod_cidr.as_deref())),
    );
    let mut pod_cidrs = Vec::with_capacity(raw.len());
    for (field, c) in raw {
        pod_cidrs
            .push(parse_cidr(c.trim()).map_err(|m| ObjectError::new(KIND, "", name, field, m))?);
    }
    Ok(NodeInfo {
        name: name.to_string(),
        zone,
        addresses,
        pod_cidrs,
    })
}
