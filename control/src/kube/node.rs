//! Whether this node should still receive load-balancer traffic, from its
//! Node object (KEP-3836).
//!
//! Why it is separate from the table: eligibility does not change where a
//! packet goes, only what kube-proxy's `/healthz` answers, so a taint must
//! not rebuild (or even re-version) the forwarding table. Cloud load
//! balancers probe `/healthz` for `externalTrafficPolicy: Cluster` services;
//! a node the cluster autoscaler is about to remove, or one being deleted,
//! must fail that probe so the balancer drains it first, while `/livez`
//! (the kubelet's liveness probe) keeps passing so the proxy is not
//! restarted for it. The rule is kube-proxy's `ProxyHealthServer.SyncNode`
//! (pkg/proxy/healthcheck/proxy_health.go): not eligible iff the Node has a
//! deletion timestamp or a taint with key `ToBeDeletedByClusterAutoscaler`.

use k8s_openapi::api::core::v1::Node;

/// The taint the cluster autoscaler puts on a node before removing it.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// This node's eligibility for load-balancer traffic.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum NodeEligibility {
    /// No Node seen yet, or nothing against it. kube-proxy, too, counts a
    /// node as eligible while starting up, until an event says otherwise.
    #[default]
    Eligible,
    /// `metadata.deletionTimestamp` is set.
    BeingDeleted,
    /// Tainted `ToBeDeletedByClusterAutoscaler`.
    ToBeDeletedByClusterAutoscaler,
}

impl NodeEligibility {
    pub fn is_eligible(self) -> bool {
        self == NodeEligibility::Eligible
    }

    /// kube-proxy's `SyncNode` rule for one Node object.
    pub fn of(node: &Node) -> NodeEligibility {
        if node.metadata.deletion_timestamp.is_some() {
            return NodeEligibility::BeingDeleted;
        }
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        if tainted {
            NodeEligibility::ToBeDeletedByClusterAutoscaler
        } else {
            NodeEligibility::Eligible
        }
    }
}

impl std::fmt::Display for NodeEligibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeEligibility::Eligible => "eligible",
            NodeEligibility::BeingDeleted => "being deleted (deletionTimestamp set)",
            NodeEligibility::ToBeDeletedByClusterAutoscaler => {
                "tainted ToBeDeletedByClusterAutoscaler"
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn node(taints: &[&str], deleting: bool) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("node-a".into());
        if deleting {
            n.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        }
        n.spec = Some(NodeSpec {
            taints: Some(
                taints
                    .iter()
                    .map(|k| Taint {
                        key: k.to_string(),
                        effect: "NoSchedule".into(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        });
        n
    }

    #[test]
    fn kube_proxy_sync_node_rule() {
        assert_eq!(
            NodeEligibility::of(&Node::default()),
            NodeEligibility::Eligible
        );
        assert_eq!(
            NodeEligibility::of(&node(&["node.kubernetes.io/unschedulable"], false)),
            NodeEligibility::Eligible
        );
        assert_eq!(
            NodeEligibility::of(&node(&["x", TO_BE_DELETED_TAINT], false)),
            NodeEligibility::ToBeDeletedByClusterAutoscaler
        );
        // The deletion timestamp wins, as in kube-proxy (checked first).
        assert_eq!(
            NodeEligibility::of(&node(&[TO_BE_DELETED_TAINT], true)),
            NodeEligibility::BeingDeleted
        );
        assert!(!NodeEligibility::BeingDeleted.is_eligible());
        assert!(NodeEligibility::default().is_eligible());
    }
}
