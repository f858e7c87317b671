//! kube-proxy's TestCategorizeEndpoints (pkg/proxy/topology_test.go), ported
//! case by case to `select::categorize` + `ServicePort::{endpoints_for,
//! verdict_for}`.
//!
//! kube-proxy returns nil for a set the service never uses; we always compute
//! both, so a `None` expectation below means "not used by any frontend" and
//! is checked as such. `has_any` is kube-proxy's `hasAnyEndpoints`, which we
//! check against `ServicePort::has_endpoints` (it drives DROP vs REJECT).
//! Cases about the removed `service.kubernetes.io/topology-mode` annotation
//! and the removed feature gates are folded into their GA behaviour (hints
//! are honoured whenever present; terminating fallback always on).

use std::net::SocketAddr;
use std::sync::Arc;

use control::select::{categorize, topology_mode, Candidate, TopologyMode};
use control::{FrontendKind, Mode, Protocol, ServicePort, ServicePortName, Verdict};

const NODE: &str = "node-a";

struct E {
    addr: &'static str,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    zones: &'static [&'static str],
    nodes: &'static [&'static str],
}

const fn ready(addr: &'static str) -> E {
    E {
        addr,
        ready: true,
        serving: true,
        terminating: false,
        local: false,
        zones: &[],
        nodes: &[],
    }
}

impl E {
    const fn local(mut self) -> Self {
        self.local = true;
        self
    }
    const fn zones(mut self, z: &'static [&'static str]) -> Self {
        self.zones = z;
        self
    }
    const fn nodes(mut self, n: &'static [&'static str]) -> Self {
        self.nodes = n;
        self
    }
    const fn unready(mut self) -> Self {
        self.ready = false;
        self.serving = false;
        self
    }
    const fn serving_terminating(mut self) -> Self {
        self.ready = false;
        self.serving = true;
        self.terminating = true;
        self
    }
    fn cand(&self) -> Candidate {
        Candidate {
            addr: self.addr.parse::<SocketAddr>().unwrap(),
            ready: self.ready,
            serving: self.serving,
            terminating: self.terminating,
            local: self.local,
            node_name: self.local.then(|| Arc::from(NODE)),
            zone: None,
            zone_hints: self.zones.iter().map(|z| Arc::from(*z)).collect(),
            node_hints: self.nodes.iter().map(|n| Arc::from(*n)).collect(),
        }
    }
}

struct Case {
    name: &'static str,
    zone: &'static str,
    internal_local: bool,
    external_local: bool,
    /// NodePort / externalIP / LB present.
    externally_accessible: bool,
    eps: Vec<E>,
    cluster: Option<&'static [&'static str]>,
    local: Option<&'static [&'static str]>,
    has_any: bool,
}

fn run(c: &Case) {
    let cands: Vec<Candidate> = c.eps.iter().map(E::cand).collect();
    let sets = categorize(&cands, NODE, c.zone);
    let sp = ServicePort {
        local_endpoints: sets.local.clone().into(),
        internal_local: c.internal_local,
        external_local: c.external_local && c.externally_accessible,
        ..ServicePort::new(
            ServicePortName::new("ns", "svc", ""),
            Protocol::Tcp,
            Mode::L4,
            sets.cluster.clone().into(),
        )
    };
    let got = |eps: &[control::Endpoint]| {
        let mut v: Vec<String> = eps.iter().map(|e| e.addr.to_string()).collect();
        v.sort();
        v
    };
    let want = |w: &[&str]| {
        let mut v: Vec<String> = w.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    // serviceport.go UsesClusterEndpoints / UsesLocalEndpoints. The cluster
    // set of an eTP=Local service also serves node-originated traffic to
    // its external frontends (kube-proxy's short circuit).
    let mut kinds = vec![FrontendKind::ClusterIp];
    if c.externally_accessible {
        kinds.push(FrontendKind::NodePort);
    }
    let uses_cluster = !c.internal_local || c.externally_accessible;
    let uses_local = c.internal_local || (c.external_local && c.externally_accessible);
    if c.externally_accessible {
        assert_eq!(
            addrs_of(sp.endpoints_for_client(FrontendKind::NodePort, true)),
            addrs_of(&sp.cluster_endpoints),
            "{}: node-originated traffic to an external frontend uses the cluster set",
            c.name
        );
    }
    match c.cluster {
        Some(w) => {
            assert!(uses_cluster, "{}: cluster set expected in use", c.name);
            assert_eq!(got(&sets.cluster), want(w), "{}: cluster endpoints", c.name);
        }
        None => assert!(!uses_cluster, "{}: cluster set must be unused", c.name),
    }
    match c.local {
        Some(w) => {
            assert!(uses_local, "{}: local set expected in use", c.name);
            assert_eq!(got(&sets.local), want(w), "{}: local endpoints", c.name);
        }
        None => assert!(!uses_local, "{}: local set must be unused", c.name),
    }
    assert_eq!(sp.has_endpoints(), c.has_any, "{}: hasAnyEndpoints", c.name);
    // The verdicts follow from the sets: empty used set → DROP if any
    // endpoint exists anywhere, else REJECT.
    for k in kinds {
        let set = sp.endpoints_for(k);
        let want = if !set.is_empty() {
            None
        } else if c.has_any {
            Some(Verdict::Drop)
        } else {
            Some(Verdict::Reject)
        };
        assert_eq!(sp.verdict_for(k), want, "{}: verdict for {k:?}", c.name);
    }
}

fn addrs_of(eps: &[control::Endpoint]) -> Vec<String> {
    eps.iter().map(|e| e.addr.to_string()).collect()
}

fn base(name: &'static str) -> Case {
    Case {
        name,
        zone: "",
        internal_local: false,
        external_local: false,
        externally_accessible: false,
        eps: vec![],
        cluster: Some(&[]),
        local: None,
        has_any: false,
    }
}

#[test]
fn categorize_endpoints_cases() {
    let cases = vec![
        Case {
            zone: "zone-a",
            eps: vec![
                ready("10.1.2.3:80").zones(&["zone-a"]),
                ready("10.1.2.4:80").zones(&["zone-b"]),
                ready("10.1.2.5:80").zones(&["zone-c"]),
                ready("10.1.2.6:80").zones(&["zone-a"]),
            ],
            cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
            has_any: true,
            ..base("hints enabled: zone hints filter to our zone")
        },
        Case {
            zone: "zone-a",
            external_local: true,
            externally_accessible: true,
            eps: vec![
                ready("10.1.2.3:80").zones(&["zone-a"]).local(),
                ready("10.1.2.4:80").zones(&["zone-b"]).local(),
                ready("10.1.2.5:80").zones(&["zone-c"]),
                ready("10.1.2.6:80").zones(&["zone-a"]),
            ],
            cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
            local: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
            has_any: true,
            ..base("externalTrafficPolicy: Local, topology ignored for Local endpoints")
        },
        Case {
            zone: "zone-a",
            internal_local: true,
            externally_accessible: true,
            eps: vec![
                ready("10.1.2.3:80").zones(&["zone-a"]).local(),
                ready("10.1.2.4:80").zones(&["zone-b"]).local(),
                ready("10.1.2.5:80").zones(&["zone-c"]),
                ready("10.1.2.6:80").zones(&["zone-a"]),
            ],
            cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
            local: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
            has_any: true,
            ..base("internalTrafficPolicy: Local, topology ignored for Local endpoints")
        },
        Case {
            zone: "",
            eps: vec![ready("10.1.2.3:80").zones(&["zone-a"])],
            cluster: Some(&["10.1.2.3:80"]),
            has_any: true,
            ..base("empty node labels / empty zone label: no filtering")
        },
        Case {
            zone: "zone-b",
            eps: vec![ready("10.1.2.3:80").zones(&["zone-a"])],
            cluster: Some(&["10.1.2.3:80"]),
            has_any: true,
            ..base("node in different zone, no endpoint filtering")
        },
        Case {
            zone: "zone-a",
            eps: vec![
                ready("10.1.2.3:80").zones(&["zone-a"]),
                ready("10.1.2.4:80").zones(&["zone-b"]),
                ready("10.1.2.5:80").zones(&["zone-c"]),
                ready("10.1.2.6:80").zones(&["zone-a"]).unready(),
            ],
            cluster: Some(&["10.1.2.3:80"]),
            has_any: true,
            ..base("unready endpoint")
        },
        Case {
            zone: "zone-a",
            eps: vec![
                ready("10.1.2.3:80").zones(&["zone-a"]).unready(),
                ready("10.1.2.4:80").zones(&["zone-b"]),
                ready("10.1.2.5:80").zones(&["zone-c"]),
                ready("10.1.2.6:80").zones(&["zone-a"]).unready(),
            ],
            cluster: Some(&["10.1.2.4:80", "10.1.2.5:80"]),
            has_any: true,
            ..base("only unready endpoints in same zone (should not filter)")
        },
        Case {
            zone: "zone-a",
            eps: vec![
                ready("10.1.2.3:80").zones(&["zone-a"]),
                ready("10.1.2.4:80").zones(&["zone-b"]),
                ready("10.1.2.5:80"),
                ready("10.1.2.6:80").zones(&["zone-a"]),
            ],
            cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"]),
            has_any: true,
            ..base("missing hints, no filtering applied")
        },
        Case {
            zone: "zone-c",
            eps: vec![
                ready("10.1.2.3:80").zones(&["zone-a", "zone-b", "zone-c"]),
                ready("10.1.2.4:80").zones(&["zone-b", "zone-c"]),
                ready("10.1.2.5:80").zones(&["zone-b", "zone-d"]),
                ready("10.1.2.6:80").zones(&["zone-c"]),
            ],
            cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
            has_any: true,
            ..base(
                "multiple hints per endpoint, filtering includes any endpoint with zone included",
            )
        },
        Case {
            zone: "zone-a",
            external_local: true,
            externally_accessible: true,
            eps: vec![
                ready("10.0.0.0:80").zones(&["zone-a"]).local(),
                ready("10.0.0.1:80").zones(&["zone-b"]).local(),
                ready("10.0.0.2:80").zones(&["zone-a"]),
                ready("10.0.0.3:80").zones(&["zone-b"]),
            ],
            cluster: Some(&["10.0.0.0:80", "10.0.0.2:80"]),
            local: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            has_any: true,
            ..base("conflicting topology and localness require merging allEndpoints")
        },
        // --- PreferSameNode (node hints), newer kube-proxy ---
        Case {
            zone: "zone-a",
            eps: vec![
                ready("10.0.0.1:80").zones(&["zone-a"]).nodes(&[NODE]),
                ready("10.0.0.2:80").zones(&["zone-a"]).nodes(&["node-b"]),
                ready("10.0.0.3:80").zones(&["zone-b"]).nodes(&["node-c"]),
            ],
            cluster: Some(&["10.0.0.1:80"]),
            has_any: true,
            ..base("node hints: every endpoint hinted, one for us → PreferSameNode")
        },
        Case {
            zone: "zone-a",
            eps: vec![
                ready("10.0.0.1:80").zones(&["zone-a"]).nodes(&["node-b"]),
                ready("10.0.0.2:80").zones(&["zone-a"]).nodes(&["node-b"]),
                ready("10.0.0.3:80").zones(&["zone-b"]).nodes(&["node-c"]),
            ],
            cluster: Some(&["10.0.0.1:80", "10.0.0.2:80"]),
            has_any: true,
            ..base("node hints name no endpoint for us → fall back to zone hints")
        },
        Case {
            zone: "zone-a",
            eps: vec![
                ready("10.0.0.1:80").zones(&["zone-a"]).nodes(&[NODE]),
                ready("10.0.0.2:80").zones(&["zone-a"]),
                ready("10.0.0.3:80").zones(&["zone-b"]).nodes(&["node-c"]),
            ],
            cluster: Some(&["10.0.0.1:80", "10.0.0.2:80"]),
            has_any: true,
            ..base("one endpoint lacks a node hint → zone hints")
        },
        Case {
            zone: "zone-a",
            eps: vec![
                ready("10.0.0.1:80").nodes(&[NODE]),
                ready("10.0.0.2:80").nodes(&["node-b"]),
                ready("10.0.0.3:80").nodes(&["node-c"]).unready(),
            ],
            cluster: Some(&["10.0.0.1:80"]),
            has_any: true,
            ..base("unready endpoints without matching hints do not block PreferSameNode")
        },
        // --- traffic policy ---
        Case {
            internal_local: true,
            eps: vec![],
            cluster: None,
            local: Some(&[]),
            has_any: false,
            ..base("internalTrafficPolicy: Local, with empty endpoints")
        },
        Case {
            internal_local: true,
            eps: vec![ready("10.0.0.0:80"), ready("10.0.0.1:80")],
            cluster: None,
            local: Some(&[]),
            has_any: true,
            ..base("internalTrafficPolicy: Local, but all endpoints are remote")
        },
        Case {
            internal_local: true,
            eps: vec![ready("10.0.0.0:80").local(), ready("10.0.0.1:80").local()],
            cluster: None,
            local: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            has_any: true,
            ..base("internalTrafficPolicy: Local, all endpoints are local")
        },
        Case {
            internal_local: true,
            eps: vec![ready("10.0.0.0:80").local(), ready("10.0.0.1:80")],
            cluster: None,
            local: Some(&["10.0.0.0:80"]),
            has_any: true,
            ..base("internalTrafficPolicy: Local, some endpoints are local")
        },
        Case {
            eps: vec![
                ready("10.0.0.0:80").unready(),
                ready("10.0.0.1:80").unready(),
            ],
            cluster: Some(&[]),
            has_any: false,
            ..base("Cluster traffic policy, endpoints not Ready")
        },
        Case {
            eps: vec![ready("10.0.0.0:80").unready(), ready("10.0.0.1:80")],
            cluster: Some(&["10.0.0.1:80"]),
            has_any: true,
            ..base("Cluster traffic policy, some endpoints are Ready")
        },
        Case {
            eps: vec![
                ready("10.0.0.0:80").serving_terminating().local(),
                ready("10.0.0.1:80").serving_terminating(),
            ],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            has_any: true,
            ..base("Cluster traffic policy, all endpoints are terminating")
        },
        Case {
            internal_local: true,
            external_local: true,
            externally_accessible: true,
            eps: vec![ready("10.0.0.0:80").local(), ready("10.0.0.1:80")],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            local: Some(&["10.0.0.0:80"]),
            has_any: true,
            ..base("iTP: Local, eTP: Local, some endpoints local")
        },
        Case {
            internal_local: true,
            externally_accessible: true,
            eps: vec![ready("10.0.0.0:80").local(), ready("10.0.0.1:80")],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            local: Some(&["10.0.0.0:80"]),
            has_any: true,
            ..base("iTP: Local, eTP: Cluster, some endpoints local")
        },
        Case {
            external_local: true,
            externally_accessible: true,
            eps: vec![ready("10.0.0.0:80").local(), ready("10.0.0.1:80")],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            local: Some(&["10.0.0.0:80"]),
            has_any: true,
            ..base("iTP: Cluster, eTP: Local, some endpoints local")
        },
        Case {
            internal_local: true,
            external_local: true,
            externally_accessible: true,
            eps: vec![ready("10.0.0.0:80"), ready("10.0.0.1:80")],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            local: Some(&[]),
            has_any: true,
            ..base("iTP: Local, eTP: Local, all endpoints remote")
        },
        Case {
            internal_local: true,
            external_local: true,
            externally_accessible: true,
            eps: vec![
                ready("10.0.0.0:80").serving_terminating(),
                ready("10.0.0.1:80").serving_terminating(),
            ],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            local: Some(&[]),
            has_any: true,
            ..base("iTP: Local, eTP: Local, all endpoints remote and terminating")
        },
        Case {
            external_local: true,
            externally_accessible: true,
            eps: vec![
                ready("10.0.0.0:80"),
                ready("10.0.0.1:80").unready().local(),
                ready("10.0.0.2:80").serving_terminating().local(),
                ready("10.0.0.3:80").serving_terminating(),
            ],
            cluster: Some(&["10.0.0.0:80"]),
            local: Some(&["10.0.0.2:80"]),
            has_any: true,
            ..base("iTP: Cluster, eTP: Local, with terminating endpoints")
        },
        Case {
            external_local: true,
            externally_accessible: false,
            eps: vec![ready("10.0.0.0:80"), ready("10.0.0.1:80").local()],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            local: None,
            has_any: true,
            ..base("externalTrafficPolicy ignored if not externally accessible")
        },
        Case {
            internal_local: true,
            eps: vec![ready("10.0.0.0:80"), ready("10.0.0.1:80").local()],
            cluster: None,
            local: Some(&["10.0.0.1:80"]),
            has_any: true,
            ..base("no cluster endpoints for iTP:Local internal-only service")
        },
        Case {
            internal_local: true,
            eps: vec![ready("10.0.0.0:80").unready().local()],
            cluster: None,
            local: Some(&[]),
            has_any: false,
            ..base("iTP: Local, only an unready non-terminating local endpoint → REJECT")
        },
    ];
    for c in &cases {
        run(c);
    }
}

#[test]
fn fallback_endpoints_are_marked_serving_terminating() {
    let cands = vec![ready("10.0.0.1:80").serving_terminating().local().cand()];
    let sets = categorize(&cands, NODE, "");
    assert_eq!(sets.cluster.len(), 1);
    assert_eq!(
        sets.cluster[0].state,
        control::EndpointState::ServingTerminating
    );
    assert_eq!(
        sets.local[0].state,
        control::EndpointState::ServingTerminating
    );
}

#[test]
fn serving_terminating_fallback_ignores_topology() {
    // No Ready endpoint anywhere: the fallback takes every serving-terminating
    // endpoint, whatever their hints say.
    let cands: Vec<Candidate> = vec![
        ready("10.0.0.1:80")
            .zones(&["zone-b"])
            .serving_terminating()
            .cand(),
        ready("10.0.0.2:80")
            .zones(&["zone-a"])
            .serving_terminating()
            .cand(),
    ];
    assert_eq!(topology_mode(&cands, NODE, "zone-a"), TopologyMode::None);
    assert_eq!(categorize(&cands, NODE, "zone-a").cluster.len(), 2);
}

#[test]
fn not_serving_terminating_endpoints_are_never_used() {
    let mut e = ready("10.0.0.1:80").local();
    e.ready = false;
    e.serving = false;
    e.terminating = true;
    let sets = categorize(&[e.cand()], NODE, "");
    assert!(sets.cluster.is_empty() && sets.local.is_empty());
}
