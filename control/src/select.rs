//! Endpoint selection: kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go).
//!
//! Why its own module: this is the rule set most likely to be subtly wrong,
//! so it is a pure function over plain candidates, tested case by case
//! against kube-proxy's TestCategorizeEndpoints.
//!
//! One deliberate representational difference: kube-proxy leaves the cluster
//! set nil when a service never uses it (iTP=Local without external
//! access). We always compute both sets. The sets a frontend actually uses
//! are identical, and "cluster set non-empty" then equals kube-proxy's
//! `hasAnyEndpoints` (any Ready or Serving∧Terminating endpoint anywhere),
//! which is what [`crate::ServicePort::verdict_for`] needs to choose DROP
//! over REJECT.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::model::{Endpoint, EndpointState};

/// An endpoint after the slice→port join and dedupe, before selection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `nodeName` equals ours.
    pub local: bool,
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    pub zone_hints: Vec<Arc<str>>,
    pub node_hints: Vec<Arc<str>>,
}

impl Candidate {
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }

    fn endpoint(&self, state: EndpointState) -> Endpoint {
        Endpoint {
            addr: self.addr,
            state,
            node_name: self.node_name.clone(),
            zone: self.zone.clone(),
        }
    }
}

/// The topology mode chosen from hints (`topologyModeFromHints`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TopologyMode {
    /// No topology filtering.
    None,
    PreferSameNode,
    PreferSameZone,
}

fn has(hints: &[Arc<str>], name: &str) -> bool {
    hints.iter().any(|h| &**h == name)
}

/// Node hints win if every Ready endpoint has one and one names us; then zone
/// hints under the same rule; else no topology. Only Ready endpoints count.
pub fn topology_mode(cands: &[Candidate], node_name: &str, zone: &str) -> TopologyMode {
    let mut any_ready = false;
    let (mut all_node, mut for_node) = (true, false);
    let (mut all_zone, mut for_zone) = (true, false);
    for c in cands.iter().filter(|c| c.ready) {
        any_ready = true;
        if c.node_hints.is_empty() {
            all_node = false;
        } else if has(&c.node_hints, node_name) {
            for_node = true;
        }
        if c.zone_hints.is_empty() {
            all_zone = false;
        } else if has(&c.zone_hints, zone) {
            for_zone = true;
        }
    }
    if !any_ready {
        TopologyMode::None
    } else if all_node && for_node {
        TopologyMode::PreferSameNode
    } else if all_zone && for_zone {
        TopologyMode::PreferSameZone
    } else {
        TopologyMode::None
    }
}

fn available(c: &Candidate, mode: TopologyMode, node_name: &str, zone: &str) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => has(&c.node_hints, node_name),
        TopologyMode::PreferSameZone => has(&c.zone_hints, zone),
    }
}

/// The two endpoint sets of one service port on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sets {
    pub cluster: Vec<Endpoint>,
    pub local: Vec<Endpoint>,
}

/// kube-proxy's `CategorizeEndpoints`. `zone` is our Node's
/// `topology.kubernetes.io/zone` ("" when unlabelled).
pub fn categorize(cands: &[Candidate], node_name: &str, zone: &str) -> Sets {
    let mode = topology_mode(cands, node_name, zone);
    let mut cluster: Vec<Endpoint> = cands
        .iter()
        .filter(|c| c.ready && available(c, mode, node_name, zone))
        .map(|c| c.endpoint(EndpointState::Ready))
        .collect();
    if cluster.is_empty() {
        // No Ready endpoint anywhere (topology was already ignored if none
        // matched us), so fall back to Serving∧Terminating, topology-blind.
        cluster = cands
            .iter()
            .filter(|c| c.serving_terminating())
            .map(|c| c.endpoint(EndpointState::ServingTerminating))
            .collect();
    }

    let mut local: Vec<Endpoint> = cands
        .iter()
        .filter(|c| c.local && c.ready)
        .map(|c| c.endpoint(EndpointState::Ready))
        .collect();
    if local.is_empty() {
        local = cands
            .iter()
            .filter(|c| c.local && !c.ready && c.serving_terminating())
            .map(|c| c.endpoint(EndpointState::ServingTerminating))
            .collect();
    }
    Sets { cluster, local }
}
