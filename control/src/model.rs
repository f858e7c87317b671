//! The forwarding table: what this node does with a packet addressed to a
//! Service frontend.
//!
//! Why a separate, dependency-free model: the data plane asks one question per
//! connection ("for this destination, which endpoints, and what if none?") and
//! must answer it without locks or allocation. Sources (manifest files, the
//! Kubernetes watcher) and the translation that mirrors kube-proxy produce a
//! [`Table`]; the data plane only ever reads an immutable `Arc<Table>`
//! snapshot. Every per-service-port fact is computed once, at translation
//! time, so the hot path is a hash lookup plus a slice read.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

/// Transport protocol of a frontend. SCTP is modelled so that translation can
/// say "not carried" instead of silently mis-handling it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// The lookup key: the original destination of a redirected connection.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FrontendKey {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl FrontendKey {
    pub fn new(addr: SocketAddr, protocol: Protocol) -> Self {
        // Normalise v4-mapped v6 addresses so a dual-stack listener finds v4 keys.
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            ip => ip,
        };
        FrontendKey {
            ip,
            port: addr.port(),
            protocol,
        }
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.socket_addr(), self.protocol)
    }
}

/// How a frontend address was derived from the Service. Decides which traffic
/// policy applies: ClusterIP uses `internalTrafficPolicy`, all others
/// `externalTrafficPolicy`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

impl FrontendKind {
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

/// How the data plane carries a service port.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Opaque TCP (or UDP datagram) relay.
    L4,
    /// HTTP, HTTP/1.1 to the endpoint.
    Http,
    /// HTTP, prior-knowledge HTTP/2 to the endpoint (h2c, gRPC).
    H2c,
}

impl Mode {
    pub fn is_l7(self) -> bool {
        !matches!(self, Mode::L4)
    }
}

/// An IP address family. Families never cross: a v4 ClusterIP only ever
/// gets endpoints from `addressType: IPv4` slices.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Family {
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    /// Its position in [`Family::BOTH`], for per-family arrays.
    pub fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    /// As the API spells it (`IPv4`, `IPv6`).
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// `namespace/name:port-name`, kube-proxy's ServicePortName.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The port's name; empty for a single unnamed port.
    pub port: String,
}

impl ServicePortName {
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        port: impl Into<String>,
    ) -> Self {
        ServicePortName {
            namespace: namespace.into(),
            name: name.into(),
            port: port.into(),
        }
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// `spec.sessionAffinity`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Affinity {
    None,
    ClientIp {
        #[serde(with = "secs")]
        timeout: Duration,
    },
}

/// Why an endpoint is in a set: it is Ready, or it is the Serving∧Terminating
/// fallback used only when no endpoint of that set is Ready.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum EndpointState {
    Ready,
    ServingTerminating,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub state: EndpointState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<Arc<str>>,
}

impl Endpoint {
    /// A Ready endpoint with no node or zone (a manifest endpoint without
    /// topology, or a static backend).
    pub fn ready(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            state: EndpointState::Ready,
            node_name: None,
            zone: None,
        }
    }
}

/// What the kernel does with a connection to a frontend whose endpoint set is
/// empty. kube-proxy: no endpoints at all → REJECT; endpoints exist but none
/// usable under a Local traffic policy → DROP.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Reject,
    Drop,
}

/// Everything about one service port, computed once per translation and
/// shared by all its frontends.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicePort {
    pub name: ServicePortName,
    /// The family of its frontends and endpoints. A dual-stack Service
    /// port is two `ServicePort`s with one name, as kube-proxy runs one
    /// proxier per family: the data plane keys its per-port state (the
    /// balancer, the L7 state) by name *and* family, so the two never share
    /// an endpoint set.
    pub family: Family,
    pub protocol: Protocol,
    pub mode: Mode,
    pub affinity: Affinity,
    /// Endpoints for cluster-wide policy, after Ready→Serving∧Terminating
    /// fallback and topology hints.
    pub cluster_endpoints: Arc<[Endpoint]>,
    /// Endpoints on this node, after Ready→Serving∧Terminating fallback (never
    /// topology-filtered).
    pub local_endpoints: Arc<[Endpoint]>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` on an externally reachable port.
    pub external_local: bool,
    /// `spec.healthCheckNodePort`, for LoadBalancer + eTP=Local services.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    /// The sources allowed to reach this port's LoadBalancer frontends, from
    /// `spec.loadBalancerSourceRanges` (this family's ranges, merged; see
    /// `translate`). `None`: any source. No other frontend kind is filtered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer_source_ranges: Option<Arc<[IpNet]>>,
    /// The sources that count as pods (kube-proxy's local traffic
    /// detector, [`crate::options::DetectLocal`]: this Node's pod CIDRs, or
    /// `--cluster-cidr`), where they change anything (empty otherwise):
    /// * for an `externalTrafficPolicy: Local` service's external
    ///   frontends, pods reach them through the cluster set, as node
    ///   processes do (kube-proxy's short-circuit);
    /// * under [`Self::masquerade_off_cluster`], ClusterIP traffic from
    ///   other sources is masqueraded.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub local_pod_cidrs: Arc<[IpNet]>,
    /// A local traffic detector is configured: ClusterIP traffic from a
    /// source outside [`Self::local_pod_cidrs`] reaches the endpoint from
    /// the node's address (kube-proxy masquerades off-cluster traffic to a
    /// service VIP, whose reply would otherwise not come back this way).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub masquerade_off_cluster: bool,
    /// The Service's `lightpath.io/*` annotations, parsed by the data plane.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ServicePort {
    /// A service port with kube-proxy's defaults for everything else: the
    /// family of its first endpoint (IPv4 when it has none), no
    /// session affinity, both traffic policies Cluster (so no local set), no
    /// health-check node port, no annotations. Set the other public fields
    /// with struct update syntax (`ServicePort { affinity, ..ServicePort::new(..) }`).
    pub fn new(
        name: ServicePortName,
        protocol: Protocol,
        mode: Mode,
        cluster_endpoints: Arc<[Endpoint]>,
    ) -> Self {
        ServicePort {
            name,
            family: cluster_endpoints
                .first()
                .map_or(Family::V4, |e| Family::of(&e.addr.ip())),
            protocol,
            mode,
            affinity: Affinity::None,
            cluster_endpoints,
            local_endpoints: Arc::from(Vec::new()),
            internal_local: false,
            external_local: false,
            health_check_node_port: None,
            load_balancer_source_ranges: None,
            local_pod_cidrs: Arc::from(Vec::new()),
            masquerade_off_cluster: false,
            annotations: BTreeMap::new(),
        }
    }

    /// Under a local traffic detector, the networks whose clients keep
    /// their address on this port's ClusterIP frontends of one family
    /// (`v4`); every other client of that family is masqueraded. `None`:
    /// every client is kept, because there is no detector, or it has no
    /// network of this family (kube-proxy has a detector per family, a no-op
    /// where it has no CIDR). The data path (`l4::Source`) and `lightpath
    /// table` both read it here.
    pub fn kept_cluster_ip_sources(
        &self,
        v4: bool,
    ) -> Option<impl Iterator<Item = &IpNet> + Clone> {
        if !self.masquerade_off_cluster {
            return None;
        }
        let nets = self
            .local_pod_cidrs
            .iter()
            .filter(move |n| n.addr().is_ipv4() == v4);
        nets.clone().next()?;
        Some(nets)
    }

    /// Whether any endpoint at all (cluster or local) could take traffic.
    pub fn has_endpoints(&self) -> bool {
        !self.cluster_endpoints.is_empty() || !self.local_endpoints.is_empty()
    }

    /// The endpoint set used for traffic arriving at a frontend of `kind`.
    pub fn endpoints_for(&self, kind: FrontendKind) -> &Arc<[Endpoint]> {
        let local = if kind.is_external() {
            self.external_local
        } else {
            self.internal_local
        };
        if local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }

    /// Like [`Self::endpoints_for`], but for a connection whose source is on
    /// this node (a local pod or the host itself). kube-proxy short-circuits
    /// such traffic to an external frontend (NodePort, externalIP, LB IP) of
    /// an `externalTrafficPolicy: Local` service to the cluster set, "as if
    /// it went out to the load balancer and came back in".
    pub fn endpoints_for_client(
        &self,
        kind: FrontendKind,
        client_on_node: bool,
    ) -> &Arc<[Endpoint]> {
        if client_on_node && kind.is_external() && self.external_local {
            &self.cluster_endpoints
        } else {
            self.endpoints_for(kind)
        }
    }

    /// Like [`Self::verdict_for`], for a client on this node (see
    /// [`Self::endpoints_for_client`]): a node process reaching an external
    /// frontend of an `externalTrafficPolicy: Local` service is served from
    /// the cluster set, so it is forwarded even with no local endpoint.
    pub fn verdict_for_client(&self, kind: FrontendKind, client_on_node: bool) -> Option<Verdict> {
        if !self.endpoints_for_client(kind, client_on_node).is_empty() {
            None
        } else if self.has_endpoints() {
            Some(Verdict::Drop)
        } else {
            Some(Verdict::Reject)
        }
    }

    /// `None` when the set for `kind` has endpoints, else what the kernel does.
    ///
    /// Matches kube-proxy's nftables proxier: no usable endpoint anywhere →
    /// REJECT; usable endpoints exist but the policy-selected set is empty
    /// (Local policy, none on this node) → DROP. "Usable anywhere" is
    /// [`Self::has_endpoints`], exact because translation always fills the
    /// cluster set (Ready, else Serving∧Terminating).
    pub fn verdict_for(&self, kind: FrontendKind) -> Option<Verdict> {
        if !self.endpoints_for(kind).is_empty() {
            None
        } else if self.has_endpoints() {
            Some(Verdict::Drop)
        } else {
            Some(Verdict::Reject)
        }
    }
}

/// One row of the table: a frontend address and the service port behind it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Frontend {
    pub key: FrontendKey,
    pub kind: FrontendKind,
    pub service: Arc<ServicePort>,
}

impl Frontend {
    /// A frontend at `addr` for `service`, keyed by the service port's own
    /// protocol, as translation keys every frontend.
    pub fn new(addr: SocketAddr, kind: FrontendKind, service: Arc<ServicePort>) -> Self {
        Frontend {
            key: FrontendKey::new(addr, service.protocol),
            kind,
            service,
        }
    }

    pub fn endpoints(&self) -> &Arc<[Endpoint]> {
        self.service.endpoints_for(self.kind)
    }

    /// See [`ServicePort::endpoints_for_client`].
    pub fn endpoints_for_client(&self, client_on_node: bool) -> &Arc<[Endpoint]> {
        self.service.endpoints_for_client(self.kind, client_on_node)
    }

    pub fn verdict(&self) -> Option<Verdict> {
        self.service.verdict_for(self.kind)
    }

    /// What the kernel does for a client on this node (a node process or a
    /// host-network pod); see [`ServicePort::verdict_for_client`].
    pub fn node_verdict(&self) -> Option<Verdict> {
        self.service.verdict_for_client(self.kind, true)
    }

    /// The sources the kernel lets through to this frontend (`None`: any):
    /// `spec.loadBalancerSourceRanges` applies to LoadBalancer IPs only, as
    /// in kube-proxy (NodePorts, externalIPs and ClusterIPs stay open).
    pub fn allowed_sources(&self) -> Option<&Arc<[IpNet]>> {
        match self.kind {
            FrontendKind::LoadBalancer => self.service.load_balancer_source_ranges.as_ref(),
            _ => None,
        }
    }
}

/// An immutable snapshot of every frontend on this node. Cloning is O(1)
/// (persistent map), so an incremental update shares all untouched entries
/// with the previous snapshot.
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// Increases by one with every published change.
    pub version: u64,
    pub frontends: imbl::HashMap<FrontendKey, Frontend>,
}

impl Table {
    /// A snapshot at `version` holding `frontends` (a later frontend with the
    /// same key replaces an earlier one): for fixed tables such as test
    /// fixtures and benches; sources publish through `control::state`.
    pub fn new(version: u64, frontends: impl IntoIterator<Item = Frontend>) -> Self {
        Table {
            version,
            frontends: frontends.into_iter().map(|f| (f.key, f)).collect(),
        }
    }

    /// The hot-path lookup.
    #[inline]
    pub fn lookup(&self, key: &FrontendKey) -> Option<&Frontend> {
        self.frontends.get(key)
    }

    pub fn len(&self) -> usize {
        self.frontends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
    }

    /// Frontends in a stable order (for printing and diffing).
    pub fn sorted(&self) -> Vec<&Frontend> {
        let mut v: Vec<&Frontend> = self.frontends.values().collect();
        v.sort_by_key(|f| f.key);
        v
    }
}

mod secs {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}
