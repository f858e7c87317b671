//! One Service (plus its EndpointSlices and our Node) → its table rows.
//!
//! Why per service: the incremental store recomputes exactly the services
//! whose objects changed, so translation must be a pure function of one
//! service's inputs. It follows kube-proxy's servicechangetracker /
//! serviceport.go (which frontends exist, per family) and
//! endpointslicecache.go (the slice→port join and dedupe).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::model::{
    Endpoint, Family, Frontend, FrontendKey, FrontendKind, ServicePort, ServicePortName,
};
use crate::objects::{NodeInfo, PortInfo, ServiceInfo, SliceInfo};
use crate::options::{DetectLocal, Options};
use crate::select::{categorize, Candidate};

/// What translation needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCtx {
    pub name: String,
    /// Our Node's zone label, "" when unknown.
    pub zone: String,
    /// NodePort addresses: the Node's InternalIP/ExternalIP plus
    /// `Options::node_ips`, deduplicated.
    pub ips: Vec<IpAddr>,
    /// The sources that count as pods ([`crate::options::DetectLocal`]):
    /// the `--cluster-cidr` networks in ClusterCIDR mode, otherwise the
    /// Node's `spec.podCIDRs`.
    pub local_pod_cidrs: Arc<[IpNet]>,
    /// A detector is configured (and has networks): ClusterIP traffic from
    /// other sources is masqueraded.
    pub masquerade_off_cluster: bool,
}

impl NodeCtx {
    pub fn new(opts: &Options, node: Option<&NodeInfo>) -> Self {
        let mut ips: Vec<IpAddr> = node.map(|n| n.addresses.clone()).unwrap_or_default();
        for ip in &opts.node_ips {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
        let node_pods: Vec<IpNet> = node.map(|n| n.pod_cidrs.clone()).unwrap_or_default();
        let (local_pod_cidrs, masquerade_off_cluster): (Arc<[IpNet]>, bool) =
            match &opts.detect_local {
                DetectLocal::Unset => (node_pods.into(), false),
                DetectLocal::NodeCidr => {
                    let detect = !node_pods.is_empty();
                    (node_pods.into(), detect)
                }
                DetectLocal::ClusterCidr(nets) => (nets.clone().into(), !nets.is_empty()),
            };
        NodeCtx {
            name: opts.node_name.clone(),
            zone: node
                .and_then(|n| n.zone.as_deref())
                .unwrap_or("")
                .to_string(),
            ips,
            local_pod_cidrs,
            masquerade_off_cluster,
        }
    }
}

/// The endpoints for one service port of one family: the join of every
/// slice port with the same name and protocol, using that slice's port
/// number; deduplicated on ip:port, a non-terminating copy replacing a
/// terminating one (kube-proxy's addEndpoints). Slices are visited in name
/// order so the result never depends on arrival order.
fn candidates(
    port: &PortInfo,
    family: Family,
    slices: &[&SliceInfo],
    node: &NodeCtx,
) -> Vec<Candidate> {
    let mut set: BTreeMap<SocketAddr, Candidate> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.family == Some(family)) {
        for sp in slice
            .ports
            .iter()
            .filter(|sp| sp.name == port.name && sp.protocol == port.protocol)
        {
            for ep in &slice.endpoints {
                let addr = SocketAddr::new(ep.ip, sp.port);
                if set.contains_key(&addr) && ep.terminating {
                    continue;
                }
                let local =
                    !node.name.is_empty() && ep.node_name.as_deref() == Some(node.name.as_str());
                set.insert(
                    addr,
                    Candidate {
                        addr,
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                        local,
                        node_name: ep.node_name.clone(),
                        zone: ep.zone.clone(),
                        zone_hints: ep.zone_hints.clone(),
                        node_hints: ep.node_hints.clone(),
                    },
                );
            }
        }
    }
    set.into_values().collect()
}

/// kube-proxy's LoadBalancer firewall for one family: that family's
/// `loadBalancerSourceRanges`, plus the LoadBalancer IPs themselves when a
/// range holds one of this node's addresses (a VIP bound on the node makes
/// node-to-VIP traffic arrive from the VIP; kube-proxy compares its primary
/// node IP). `None` when no range is of this family: that family is open to
/// every source, even if the other family has ranges (kube-proxy's
/// `usesFWChain`). Nested and adjacent ranges are merged, so the kernel's
/// interval set never sees two overlapping elements for one frontend.
fn lb_firewall(
    ranges: &[IpNet],
    family: Family,
    lb_ips: &[IpAddr],
    node_ips: &[IpAddr],
) -> Option<Arc<[IpNet]>> {
    let mut nets: Vec<IpNet> = ranges
        .iter()
        .filter(|n| Family::of(&n.addr()) == family)
        .copied()
        .collect();
    if nets.is_empty() || lb_ips.is_empty() {
        return None;
    }
    if nets
        .iter()
        .any(|n| node_ips.iter().any(|ip| n.contains(ip)))
    {
        nets.extend(lb_ips.iter().map(|ip| IpNet::from(*ip)));
    }
    Some(IpNet::aggregate(&nets).into())
}

/// Every frontend of `svc` on this node. `slices` are the service's
/// EndpointSlices sorted by name.
pub fn translate(svc: &ServiceInfo, slices: &[&SliceInfo], node: &NodeCtx) -> Vec<Frontend> {
    let mut out = Vec::new();
    for family in Family::BOTH {
        // No ClusterIP of this family: the service does not exist in it.
        let Some(cluster_ip) = svc.cluster_ip(family) else {
            continue;
        };
        let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter()
                .copied()
                .filter(|ip| Family::of(ip) == family)
                .collect()
        };
        let external_ips = of_family(&svc.external_ips);
        let lb_ips = of_family(&svc.lb_ips);
        let node_ips = of_family(&node.ips);
        let firewall = lb_firewall(&svc.source_ranges, family, &lb_ips, &node_ips);

        for port in &svc.ports {
            let sets = categorize(
                &candidates(port, family, slices, node),
                &node.name,
                &node.zone,
            );
            // serviceport.go ExternallyAccessible: per port and family.
            let externally_accessible =
                port.node_port.is_some() || !lb_ips.is_empty() || !external_ips.is_empty();
            let cluster_endpoints: Arc<[Endpoint]> = sets.cluster.into();
            // When every endpoint is on this node the two sets are equal:
            // share one allocation instead of holding each endpoint twice.
            let local_endpoints = if sets.local[..] == cluster_endpoints[..] {
                cluster_endpoints.clone()
            } else {
                sets.local.into()
            };
            let sp = Arc::new(ServicePort {
                name: ServicePortName {
                    namespace: svc.key.namespace.clone(),
                    name: svc.key.name.clone(),
                    port: port.name.clone(),
                },
                family,
                protocol: port.protocol,
                mode: port.mode,
                affinity: svc.affinity,
                cluster_endpoints,
                local_endpoints,
                internal_local: svc.internal_local,
                external_local: svc.external_policy_local && externally_accessible,
                health_check_node_port: svc.health_check_node_port,
                load_balancer_source_ranges: firewall.clone(),
                // Only where it changes anything: the external frontends of
                // a Local-policy service, and every ClusterIP under a
                // detector.
                local_pod_cidrs: if node.masquerade_off_cluster
                    || (svc.external_policy_local && externally_accessible)
                {
                    node.local_pod_cidrs.clone()
                } else {
                    Arc::from(Vec::new())
                },
                masquerade_off_cluster: node.masquerade_off_cluster,
                annotations: svc.annotations.clone(),
            });
            let mut push = |ip: IpAddr, p: u16, kind: FrontendKind| {
                out.push(Frontend {
                    key: FrontendKey::new(SocketAddr::new(ip, p), port.protocol),
                    kind,
                    service: sp.clone(),
                });
            };
            push(cluster_ip, port.port, FrontendKind::ClusterIp);
            for ip in &external_ips {
                push(*ip, port.port, FrontendKind::ExternalIp);
            }
            for ip in &lb_ips {
                push(*ip, port.port, FrontendKind::LoadBalancer);
            }
            if let Some(np) = port.node_port {
                for ip in &node_ips {
                    push(*ip, np, FrontendKind::NodePort);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{parse_service, parse_slice};
    use crate::synth;

    fn rows(slice: k8s_openapi::api::discovery::v1::EndpointSlice, node: &str) -> Vec<Frontend> {
        let opts = Options {
            node_name: node.into(),
            ..Options::default()
        };
        let svc = parse_service(&synth::service(1), &opts).unwrap().unwrap();
        let slice = parse_slice(&slice).unwrap();
        translate(&svc, &[&slice], &NodeCtx::new(&opts, None))
    }

    #[test]
    fn local_set_shares_the_cluster_set_when_equal() {
        // One endpoint, on node-1 (synth puts endpoint k on node-{k % 20}).
        let all_local = rows(synth::slice(1, 1, 0), "node-1");
        let sp = &all_local[0].service;
        assert_eq!(sp.cluster_endpoints.len(), 1);
        assert!(Arc::ptr_eq(&sp.cluster_endpoints, &sp.local_endpoints));

        // Three endpoints on three nodes: the local set is one of them.
        let mixed = rows(synth::slice(1, 3, 0), "node-3");
        let sp = &mixed[0].service;
        assert_eq!(sp.cluster_endpoints.len(), 3);
        assert_eq!(sp.local_endpoints.len(), 1);
        assert_eq!(sp.local_endpoints[0].node_name.as_deref(), Some("node-3"));
    }
}
