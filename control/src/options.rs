//! Node-level settings that change how Kubernetes objects translate.
//!
//! Why one struct: the manifest source, the Kubernetes watcher and the
//! `table` command must all translate identically, so everything that is not
//! inside an object (which node we are, which proxy name is ours) travels
//! together and is handed to [`crate::ClusterState::new`] once.

use std::net::IpAddr;

use ipnet::IpNet;

/// The default `service.kubernetes.io/service-proxy-name` value we answer to.
pub const DEFAULT_PROXY_NAME: &str = "lightpath";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// This node's name: endpoints whose `nodeName` equals it are local, and
    /// only the Node object of that name is read (zone, addresses).
    pub node_name: String,
    /// Services labelled `service.kubernetes.io/service-proxy-name` with this
    /// value are ours; other values are skipped (as kube-proxy skips any).
    pub proxy_name: String,
    /// Hybrid mode beside kube-proxy: take ONLY services labelled with our
    /// proxy name.
    pub labelled_only: bool,
    /// Extra NodePort addresses, added to the Node's InternalIP/ExternalIP.
    pub node_ips: Vec<IpAddr>,
    /// Which sources count as the cluster's pods (kube-proxy's local
    /// traffic detector).
    pub detect_local: DetectLocal,
}

/// kube-proxy's local traffic detector (`--detect-local-mode`,
/// `--cluster-cidr`): which sources are "local", meaning pods of the
/// cluster, as opposed to node processes and off-cluster clients.
///
/// Where it matters:
/// * **ClusterIP traffic from a source that is not local is masqueraded**
///   (kube-proxy: "masquerade off-cluster traffic to a service VIP"). Such a
///   client, for example one that reaches the Service range through a static
///   or BGP route to any node, has its connection bridged into the Service
///   here. An endpoint on another node would answer its address directly,
///   not through this node. Local clients keep their address. Per family,
///   as kube-proxy has a detector per family: a family with no network here
///   keeps every source.
/// * **The `externalTrafficPolicy: Local` short-circuit**: a local source
///   reaching an external frontend is served from the cluster set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DetectLocal {
    /// No detector: kube-proxy without `--cluster-cidr`. ClusterIP traffic
    /// keeps its source whatever it is. The short-circuit still applies to
    /// this Node's `spec.podCIDRs`, as it does to node processes.
    #[default]
    Unset,
    /// `NodeCIDR`: this Node's `spec.podCIDRs`. ClusterIP traffic from pods
    /// of other nodes is handled on their own node, so these are the only
    /// pods this node sees. While the Node has no pod CIDR, this acts as
    /// [`DetectLocal::Unset`].
    NodeCidr,
    /// `ClusterCIDR`: these networks (`--cluster-cidr`). For CNIs whose pod
    /// addresses are not the Nodes' `spec.podCIDRs` (their own IPAM).
    ClusterCidr(Vec<IpNet>),
}

impl Default for Options {
    fn default() -> Self {
        Options {
            node_name: String::new(),
            proxy_name: DEFAULT_PROXY_NAME.to_string(),
            labelled_only: false,
            node_ips: Vec::new(),
            detect_local: DetectLocal::Unset,
        }
    }
}
