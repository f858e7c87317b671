//! Node-level settings that change how Kubernetes objects translate.
//!
//! Why one struct: the manifest source, the Kubernetes watcher and the
//! `table` command must all translate identically, so everything that is not
//! inside an object (which node we are, which proxy name is ours) travels
//! together and is handed to [`crate::ClusterState::new`] once.

use std::net::IpAddr;

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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            node_name: String::new(),
            proxy_name: DEFAULT_PROXY_NAME.to_string(),
            labelled_only: false,
            node_ips: Vec::new(),
        }
    }
}
