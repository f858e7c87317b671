//! Service + EndpointSlice + Node → table rows, through `ClusterState`, the
//! same path the manifest source and the Kubernetes watcher use. Cases follow
//! kube-proxy's endpointslicecache_test.go and servicechangetracker_test.go
//! in spirit: the slice→port join, dedupe, family filtering, skipping, and
//! which frontends a Service produces.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use control::{Affinity, ClusterState, EndpointState, FrontendKind, Mode, Options, Verdict};
use serde_json::json;

fn web() -> serde_json::Value {
    cluster_ip(
        "default",
        "web",
        "10.96.0.10",
        json!([{"name": "http", "port": 80, "targetPort": "http-alt"}]),
    )
}

/// An IPv4 slice `name` of `web` with its `http` port resolved to 8080.
fn web_slice(name: &str, endpoints: Vec<serde_json::Value>) -> serde_json::Value {
    v4_slice("default", name, "web", &[("http", 8080)], endpoints)
}

/// `web` with one ready endpoint, 10.244.1.5, in slice `web-1`.
fn web_with_one_endpoint() -> ClusterState {
    state_with(vec![
        web(),
        web_slice("web-1", vec![ep("10.244.1.5", None)]),
    ])
}

// ---------- endpointslicecache: join, union, dedupe ----------

#[test]
fn slice_joins_by_port_name_using_the_slices_port_number() {
    // targetPort is named ("http-alt"); the slice carries the resolved 8080.
    let mut st = web_with_one_endpoint();
    let t = st.snapshot();
    assert_eq!(used(&t, "10.96.0.10:80"), vec!["10.244.1.5:8080"]);
}

#[test]
fn slice_port_with_other_name_or_protocol_does_not_join() {
    let mut st = state_with(vec![
        web(),
        v4_slice(
            "default",
            "web-1",
            "web",
            &[("metrics", 9090)],
            vec![ep("10.244.1.5", None)],
        ),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": "web-udp", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "UDP"}],
            "endpoints": [{"addresses": ["10.244.1.6"]}]
        }),
    ]);
    let t = st.snapshot();
    assert!(used(&t, "10.96.0.10:80").is_empty());
    assert_eq!(verdict(&t, "10.96.0.10:80"), Some(Verdict::Reject));
}

#[test]
fn endpoints_union_across_slices_and_multiple_ports() {
    let svc = cluster_ip(
        "shop",
        "api",
        "10.96.1.1",
        json!([{"name": "http", "port": 80}, {"name": "grpc", "port": 9000}]),
    );
    let mut st = state_with(vec![
        svc,
        v4_slice(
            "shop",
            "api-a",
            "api",
            &[("http", 8080), ("grpc", 9090)],
            vec![ep("10.244.1.1", None), ep("10.244.1.2", None)],
        ),
        v4_slice(
            "shop",
            "api-b",
            "api",
            &[("http", 8080), ("grpc", 9090)],
            vec![ep("10.244.2.1", None)],
        ),
    ]);
    let t = st.snapshot();
    assert_eq!(
        used(&t, "10.96.1.1:80"),
        vec!["10.244.1.1:8080", "10.244.1.2:8080", "10.244.2.1:8080"]
    );
    assert_eq!(
        used(&t, "10.96.1.1:9000"),
        vec!["10.244.1.1:9090", "10.244.1.2:9090", "10.244.2.1:9090"]
    );
    let grpc = t.lookup(&key("10.96.1.1:9000")).unwrap();
    assert_eq!(grpc.service.name.to_string(), "shop/api:grpc");
    assert_eq!(grpc.service.mode, Mode::H2c);
}

#[test]
fn same_endpoint_in_two_slices_is_deduplicated() {
    // An endpoint moving between slices is briefly in both.
    let mut st = state_with(vec![
        web(),
        web_slice("web-1", vec![ep("10.244.1.5", None)]),
        web_slice(
            "web-2",
            vec![ep("10.244.1.5", None), ep("10.244.1.6", None)],
        ),
    ]);
    assert_eq!(
        used(&st.snapshot(), "10.96.0.10:80"),
        vec!["10.244.1.5:8080", "10.244.1.6:8080"]
    );
}

#[test]
fn dedupe_prefers_the_non_terminating_copy_in_either_order() {
    let term = ep_cond("10.244.1.5", None, json!(false), json!(true), json!(true));
    let running = ep("10.244.1.5", None);
    for (a, b) in [(term.clone(), running.clone()), (running, term)] {
        let mut st = state_with(vec![
            web(),
            web_slice("web-a", vec![a]),
            web_slice("web-b", vec![b]),
        ]);
        let t = st.snapshot();
        let f = t.lookup(&key("10.96.0.10:80")).unwrap();
        assert_eq!(addrs_state(f.endpoints()), vec!["10.244.1.5:8080(ready)"]);
    }
}

#[test]
fn nil_conditions_mean_ready_serving_not_terminating() {
    let mut st = state_with(vec![
        web(),
        web_slice(
            "web-1",
            vec![
                json!({"addresses": ["10.244.1.1"]}),
                json!({"addresses": ["10.244.1.2"], "conditions": {}}),
                ep_cond("10.244.1.3", None, json!(false), json!(null), json!(null)),
            ],
        ),
    ]);
    let t = st.snapshot();
    assert_eq!(
        addrs_state(t.lookup(&key("10.96.0.10:80")).unwrap().endpoints()),
        vec!["10.244.1.1:8080(ready)", "10.244.1.2:8080(ready)"]
    );
}

#[test]
fn terminating_pod_is_used_only_when_nothing_is_ready() {
    let term = ep_cond("10.244.1.9", None, json!(false), json!(true), json!(true));
    let mut st = state_with(vec![
        web(),
        web_slice("web-1", vec![term, ep("10.244.1.1", None)]),
    ]);
    assert_eq!(
        used(&st.snapshot(), "10.96.0.10:80"),
        vec!["10.244.1.1:8080"]
    );
    // The ready pod goes away: the serving-terminating one takes over.
    let term = ep_cond("10.244.1.9", None, json!(false), json!(true), json!(true));
    apply(&mut st, vec![web_slice("web-1", vec![term])]);
    let t = st.snapshot();
    let f = t.lookup(&key("10.96.0.10:80")).unwrap();
    assert_eq!(
        addrs_state(f.endpoints()),
        vec!["10.244.1.9:8080(serving-terminating)"]
    );
    assert_eq!(f.verdict(), None);
}

#[test]
fn slice_without_service_name_label_is_ignored() {
    let mut s = web_slice("web-1", vec![ep("10.244.1.5", None)]);
    s["metadata"]["labels"] = json!({});
    let mut st = state_with(vec![web(), s]);
    assert!(used(&st.snapshot(), "10.96.0.10:80").is_empty());
    // ...and a slice that loses its label stops contributing.
    apply(
        &mut st,
        vec![web_slice("web-2", vec![ep("10.244.1.6", None)])],
    );
    assert_eq!(
        used(&st.snapshot(), "10.96.0.10:80"),
        vec!["10.244.1.6:8080"]
    );
    let mut unlabelled = web_slice("web-2", vec![ep("10.244.1.6", None)]);
    unlabelled["metadata"]["labels"] = json!({});
    apply(&mut st, vec![unlabelled]);
    assert!(used(&st.snapshot(), "10.96.0.10:80").is_empty());
}

#[test]
fn slice_moving_to_another_service_leaves_the_first() {
    let other = cluster_ip(
        "default",
        "other",
        "10.96.0.11",
        json!([{"name": "http", "port": 80}]),
    );
    let mut st = state_with(vec![
        web(),
        other,
        web_slice("s1", vec![ep("10.244.1.5", None)]),
    ]);
    assert_eq!(used(&st.snapshot(), "10.96.0.10:80").len(), 1);
    apply(
        &mut st,
        vec![v4_slice(
            "default",
            "s1",
            "other",
            &[("http", 8080)],
            vec![ep("10.244.1.5", None)],
        )],
    );
    let t = st.snapshot();
    assert!(used(&t, "10.96.0.10:80").is_empty());
    assert_eq!(used(&t, "10.96.0.11:80"), vec!["10.244.1.5:8080"]);
}

#[test]
fn ports_without_name_or_number_are_ignored_like_kube_proxy() {
    let s = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"port": 8080}, {"name": "http"}, {"name": "http", "port": 0}],
        "endpoints": [{"addresses": ["10.244.1.5"]}, {"addresses": []}]
    });
    let mut st = state_with(vec![web(), s]);
    assert!(used(&st.snapshot(), "10.96.0.10:80").is_empty());
}

#[test]
fn unnamed_single_port_joins_the_empty_name() {
    let svc = cluster_ip("default", "db", "10.96.0.20", json!([{"port": 5432}]));
    let mut st = state_with(vec![
        svc,
        v4_slice(
            "default",
            "db-1",
            "db",
            &[("", 5432)],
            vec![ep("10.244.3.3", None)],
        ),
    ]);
    let t = st.snapshot();
    assert_eq!(used(&t, "10.96.0.20:5432"), vec!["10.244.3.3:5432"]);
    assert_eq!(
        t.lookup(&key("10.96.0.20:5432"))
            .unwrap()
            .service
            .name
            .to_string(),
        "default/db"
    );
}

#[test]
fn slice_arriving_before_its_service_is_applied_when_the_service_comes() {
    let mut st = state_with(vec![web_slice("web-1", vec![ep("10.244.1.5", None)])]);
    assert!(st.snapshot().is_empty());
    apply(&mut st, vec![web()]);
    assert_eq!(
        used(&st.snapshot(), "10.96.0.10:80"),
        vec!["10.244.1.5:8080"]
    );
}

#[test]
fn deleting_slice_and_service() {
    let mut st = web_with_one_endpoint();
    assert_eq!(used(&st.snapshot(), "10.96.0.10:80").len(), 1);
    st.delete_slice("default", "web-1");
    let t = st.snapshot();
    assert!(used(&t, "10.96.0.10:80").is_empty());
    assert_eq!(verdict(&t, "10.96.0.10:80"), Some(Verdict::Reject));
    st.delete_service("default", "web");
    assert!(st.snapshot().is_empty());
    // Deleting unknown objects is a no-op.
    st.delete_service("nope", "nope");
    st.delete_slice("nope", "nope");
    st.delete_node("nope");
}

// ---------- families ----------

fn dual_stack() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "ds"},
        "spec": {
            "clusterIP": "10.96.0.30", "clusterIPs": ["10.96.0.30", "fd00:10:96::30"],
            "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
            "externalIPs": ["192.0.2.10", "2001:db8::10"],
            "ports": [{"name": "http", "port": 80}]
        }
    })
}

fn v6_slice(name: &str, addr: &str) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": name, "labels": {"kubernetes.io/service-name": "ds"}},
        "addressType": "IPv6",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [addr]}]
    })
}

#[test]
fn dual_stack_families_never_cross() {
    let mut st = state_with(vec![
        dual_stack(),
        v4_slice(
            "default",
            "ds-v4",
            "ds",
            &[("http", 8080)],
            vec![ep("10.244.1.1", None)],
        ),
        v6_slice("ds-v6", "fd00:244::1"),
    ]);
    let t = st.snapshot();
    assert_eq!(used(&t, "10.96.0.30:80"), vec!["10.244.1.1:8080"]);
    assert_eq!(used(&t, "[fd00:10:96::30]:80"), vec!["[fd00:244::1]:8080"]);
    assert_eq!(used(&t, "192.0.2.10:80"), vec!["10.244.1.1:8080"]);
    assert_eq!(used(&t, "[2001:db8::10]:80"), vec!["[fd00:244::1]:8080"]);
    assert_eq!(
        t.lookup(&key("192.0.2.10:80")).unwrap().kind,
        FrontendKind::ExternalIp
    );
    assert_eq!(t.len(), 4);
}

#[test]
fn single_stack_service_ignores_other_family_slices_and_addresses() {
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "ds"},
        "spec": {"clusterIP": "10.96.0.30", "externalIPs": ["2001:db8::10"], "ports": [{"name": "http", "port": 80}]}
    });
    let mut st = state_with(vec![svc, v6_slice("ds-v6", "fd00:244::1")]);
    let t = st.snapshot();
    assert!(used(&t, "10.96.0.30:80").is_empty());
    assert_eq!(
        t.len(),
        1,
        "the v6 externalIP has no v6 ClusterIP, so no v6 frontend"
    );
}

#[test]
fn fqdn_slices_are_ignored() {
    let s = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": "web-f", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "FQDN",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["web.example.com"]}]
    });
    let mut st = state_with(vec![web(), s]);
    assert!(used(&st.snapshot(), "10.96.0.10:80").is_empty());
}

#[test]
fn v4_mapped_lookup_finds_v4_frontend() {
    let mut st = state_with(vec![web()]);
    let t = st.snapshot();
    assert!(t.lookup(&key("[::ffff:10.96.0.10]:80")).is_some());
}

// ---------- servicechangetracker: which services, which frontends ----------

#[test]
fn headless_external_name_and_other_proxies_are_skipped() {
    let headless = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "h"},
        "spec": {"clusterIP": "None", "ports": [{"port": 80}]}});
    let headless_label = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "hl", "labels": {"service.kubernetes.io/headless": ""}},
        "spec": {"clusterIP": "10.96.0.41", "ports": [{"port": 80}]}});
    let ext = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "e"},
        "spec": {"type": "ExternalName", "externalName": "example.com", "clusterIP": "10.96.0.42", "ports": [{"port": 80}]}});
    let other = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "o", "labels": {"service.kubernetes.io/service-proxy-name": "cilium"}},
        "spec": {"clusterIP": "10.96.0.43", "ports": [{"port": 80}]}});
    let ours = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "ours", "labels": {"service.kubernetes.io/service-proxy-name": "lightpath"}},
        "spec": {"clusterIP": "10.96.0.44", "ports": [{"port": 80}]}});
    let no_ip = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "noip"},
        "spec": {"ports": [{"port": 80}]}});
    let mut st = state_with(vec![
        headless,
        headless_label,
        ext,
        other,
        ours.clone(),
        no_ip,
        web(),
    ]);
    let t = st.snapshot();
    let keys: Vec<String> = t.sorted().iter().map(|f| f.key.to_string()).collect();
    assert_eq!(keys, vec!["10.96.0.10:80/TCP", "10.96.0.44:80/TCP"]);

    // labelled-only (hybrid) mode takes only services labelled for us.
    let mut st = ClusterState::new(Options {
        labelled_only: true,
        ..opts()
    });
    apply(&mut st, vec![web(), ours]);
    let keys: Vec<String> = st
        .snapshot()
        .sorted()
        .iter()
        .map(|f| f.key.to_string())
        .collect();
    assert_eq!(keys, vec!["10.96.0.44:80/TCP"]);
}

#[test]
fn custom_proxy_name() {
    let labelled = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "o", "labels": {"service.kubernetes.io/service-proxy-name": "edge"}},
        "spec": {"clusterIP": "10.96.0.43", "ports": [{"port": 80}]}});
    let mut st = ClusterState::new(Options {
        proxy_name: "edge".into(),
        ..opts()
    });
    apply(&mut st, vec![labelled]);
    assert_eq!(st.snapshot().len(), 1);
}

#[test]
fn service_becoming_headless_or_other_proxy_loses_its_rows() {
    let mut st = state_with(vec![web()]);
    assert_eq!(st.snapshot().len(), 1);
    let mut w = web();
    w["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "kube-proxy"});
    apply(&mut st, vec![w]);
    assert!(st.snapshot().is_empty());
    apply(&mut st, vec![web()]);
    assert_eq!(st.snapshot().len(), 1);
}

fn lb_service() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "edge", "name": "gw", "annotations": {"lightpath.io/retries": "2", "other.io/x": "y"}},
        "spec": {
            "type": "LoadBalancer", "clusterIP": "10.96.2.2", "clusterIPs": ["10.96.2.2"],
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
            "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]
        },
        "status": {"loadBalancer": {"ingress": [
            {"ip": "203.0.113.7"},
            {"ip": "203.0.113.8", "ipMode": "VIP"},
            {"ip": "203.0.113.9", "ipMode": "Proxy"},
            {"hostname": "lb.example.com"}
        ]}}
    })
}

/// The slice of [`lb_service`], `http` resolved to 8080.
fn gw_slice(endpoints: Vec<serde_json::Value>) -> serde_json::Value {
    v4_slice("edge", "gw-1", "gw", &[("http", 8080)], endpoints)
}

#[test]
fn loadbalancer_frontends_nodeports_and_health_check() {
    let mut st = ClusterState::new(Options {
        node_ips: vec!["192.168.1.10".parse().unwrap()],
        ..opts()
    });
    st.upsert_node(our_node(Some("zone-a"), "10.244.0.1"))
        .unwrap();
    apply(
        &mut st,
        vec![
            lb_service(),
            gw_slice(vec![
                ep("10.244.0.5", Some(NODE)),
                ep("10.244.9.5", Some("node-z")),
            ]),
        ],
    );
    let t = st.snapshot();
    let keys: Vec<String> = t
        .sorted()
        .iter()
        .map(|f| format!("{} {:?}", f.key, f.kind))
        .collect();
    assert_eq!(
        keys,
        vec![
            "10.96.2.2:80/TCP ClusterIp",
            "10.244.0.1:30080/TCP NodePort",
            "192.168.1.10:30080/TCP NodePort",
            "203.0.113.7:80/TCP LoadBalancer",
            "203.0.113.8:80/TCP LoadBalancer",
        ]
    );
    let sp = &t.lookup(&key("10.96.2.2:80")).unwrap().service;
    assert!(sp.external_local && !sp.internal_local);
    assert_eq!(sp.health_check_node_port, Some(32000));
    assert_eq!(sp.mode, Mode::Http);
    assert_eq!(sp.annotations.len(), 1);
    assert_eq!(sp.annotations["lightpath.io/retries"], "2");
    // eTP=Local: external frontends use the local set, ClusterIP the cluster set.
    assert_eq!(
        used(&t, "10.96.2.2:80"),
        vec!["10.244.0.5:8080", "10.244.9.5:8080"]
    );
    assert_eq!(used(&t, "10.244.0.1:30080"), vec!["10.244.0.5:8080"]);
    assert_eq!(used(&t, "203.0.113.7:80"), vec!["10.244.0.5:8080"]);
    // Node-originated traffic to an external frontend short-circuits to the cluster set.
    let np = t.lookup(&key("10.244.0.1:30080")).unwrap();
    assert_eq!(
        addrs(np.endpoints_for_client(true)),
        vec!["10.244.0.5:8080", "10.244.9.5:8080"]
    );
    // Both frontend pointers share one ServicePort.
    assert!(Arc::ptr_eq(&np.service, sp));
}

/// The allowed sources of the frontend at `addr`, as text (`None`: any).
fn sources(t: &control::Table, addr: &str) -> Option<Vec<String>> {
    t.lookup(&key(addr))
        .unwrap_or_else(|| panic!("no frontend {addr}"))
        .allowed_sources()
        .map(|nets| nets.iter().map(|n| n.to_string()).collect())
}

#[test]
fn source_ranges_restrict_only_load_balancer_ips() {
    let mut gw = lb_service();
    // Padded, nested, with host bits, of both families, and one empty
    // entry: trimmed, merged, cleared, split by family, skipped.
    gw["spec"]["loadBalancerSourceRanges"] = json!([
        " 198.51.100.0/24 ",
        "198.51.100.128/25",
        "192.0.2.77/28",
        "",
        "2001:db8::/32"
    ]);
    let mut st = state_with(vec![gw, gw_slice(vec![ep("10.244.0.5", Some(NODE))])]);
    st.upsert_node(our_node(None, "10.244.0.1")).unwrap();
    let t = st.snapshot();
    let want = Some(vec![
        "192.0.2.64/28".to_string(),
        "198.51.100.0/24".to_string(),
    ]);
    assert_eq!(sources(&t, "203.0.113.7:80"), want);
    assert_eq!(sources(&t, "203.0.113.8:80"), want);
    // kube-proxy: NodePorts, ClusterIPs (and externalIPs) are not filtered.
    assert_eq!(sources(&t, "10.96.2.2:80"), None);
    assert_eq!(sources(&t, "10.244.0.1:30080"), None);
    // The ranges are on the service port (config_dump shows them there).
    let sp = &t.lookup(&key("10.96.2.2:80")).unwrap().service;
    assert_eq!(
        sp.load_balancer_source_ranges.as_deref().map(<[_]>::len),
        Some(2)
    );
}

#[test]
fn a_range_holding_the_node_also_allows_the_load_balancer_ips() {
    let mut gw = lb_service();
    gw["spec"]["loadBalancerSourceRanges"] = json!(["10.244.0.0/24"]);
    let mut st = state_with(vec![gw, gw_slice(vec![ep("10.244.0.5", Some(NODE))])]);
    st.upsert_node(our_node(None, "10.244.0.1")).unwrap();
    let t = st.snapshot();
    // kube-proxy's allowFromNode: a VIP bound on the node makes node-to-VIP
    // traffic arrive from the VIP itself.
    assert_eq!(
        sources(&t, "203.0.113.7:80"),
        Some(vec![
            "10.244.0.0/24".to_string(),
            "203.0.113.7/32".to_string(),
            "203.0.113.8/32".to_string()
        ])
    );
    // A node outside every range: only the ranges.
    st.upsert_node(our_node(None, "10.9.0.1")).unwrap();
    assert_eq!(
        sources(&st.snapshot(), "203.0.113.7:80"),
        Some(vec!["10.244.0.0/24".to_string()])
    );
}

#[test]
fn ranges_of_the_other_family_only_leave_this_family_open() {
    // kube-proxy's usesFWChain is per family: IPv6 ranges alone do not
    // restrict the IPv4 LoadBalancer IPs.
    let mut gw = lb_service();
    gw["spec"]["loadBalancerSourceRanges"] = json!(["2001:db8::/32"]);
    let t = state_with(vec![gw, gw_slice(vec![ep("10.244.0.5", Some(NODE))])]).snapshot();
    assert_eq!(sources(&t, "203.0.113.7:80"), None);
    // No ranges at all: open.
    let t = state_with(vec![lb_service()]).snapshot();
    assert_eq!(sources(&t, "203.0.113.7:80"), None);
}

#[test]
fn an_invalid_range_names_the_field_and_keeps_the_previous_service() {
    let mut st = state_with(vec![lb_service()]);
    let good = st.snapshot();
    let mut bad = lb_service();
    bad["spec"]["loadBalancerSourceRanges"] = json!(["10.0.0.0/8", "10.0.0.0/33"]);
    let e = st.upsert_service(svc(bad)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Service edge/gw: spec.loadBalancerSourceRanges[1]: invalid CIDR \"10.0.0.0/33\" \
         (want e.g. 203.0.113.0/24 or 2001:db8::/64)"
    );
    assert!(Arc::ptr_eq(&good, &st.snapshot()));
}

#[test]
fn pod_cidrs_reach_the_external_frontends_of_local_policy_services_only() {
    let with_pods = |cidrs: serde_json::Value| {
        node(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE},
            "spec": {"podCIDRs": cidrs},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.244.0.1"}]}
        }))
    };
    let mut st = state_with(vec![lb_service(), web()]);
    st.upsert_node(with_pods(json!(["10.244.0.0/24", "fd00:244::/64"])))
        .unwrap();
    let t = st.snapshot();
    // gw (externalTrafficPolicy: Local): the node's pods, its family's.
    let gw = &t.lookup(&key("203.0.113.7:80")).unwrap().service;
    let cidrs: Vec<String> = gw.local_pod_cidrs.iter().map(|n| n.to_string()).collect();
    assert_eq!(cidrs, vec!["10.244.0.0/24", "fd00:244::/64"]);
    // web (ClusterIP only): nothing to short-circuit.
    let web = &t.lookup(&key("10.96.0.10:80")).unwrap().service;
    assert!(web.local_pod_cidrs.is_empty());
    // A bad CIDR names the field; the previous Node stays.
    let e = st
        .upsert_node(with_pods(json!(["10.244.0.0/24", "10.244.1.0/40"])))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Node node-a: spec.podCIDRs[1]: invalid CIDR \"10.244.1.0/40\" \
         (want e.g. 203.0.113.0/24 or 2001:db8::/64)"
    );
}

#[test]
fn a_local_traffic_detector_reaches_every_service_port() {
    use control::options::DetectLocal;
    let with_pods = node(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE},
        "spec": {"podCIDRs": ["10.244.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.244.0.1"}]}
    }));
    let translate = |detect_local: DetectLocal| {
        let mut st = ClusterState::new(Options {
            detect_local,
            ..opts()
        });
        apply(&mut st, vec![lb_service(), web()]);
        st.upsert_node(with_pods.clone()).unwrap();
        st.snapshot()
    };
    let view = |t: &control::Table, k: &str| {
        let sp = &t.lookup(&key(k)).unwrap().service;
        let nets: Vec<String> = sp.local_pod_cidrs.iter().map(|n| n.to_string()).collect();
        (sp.masquerade_off_cluster, nets)
    };
    let node_pods = || vec!["10.244.0.0/24".to_string()];
    let cluster = || vec!["10.240.0.0/12".to_string()];
    let cases = [
        // None: ClusterIPs keep every source; the short-circuit uses the Node's pods.
        (DetectLocal::Unset, (false, vec![]), (false, node_pods())),
        // NodeCIDR: the Node's pods, on every service port.
        (
            DetectLocal::NodeCidr,
            (true, node_pods()),
            (true, node_pods()),
        ),
        // ClusterCIDR: the given networks, for the short-circuit too.
        (
            DetectLocal::ClusterCidr(vec!["10.240.0.0/12".parse().unwrap()]),
            (true, cluster()),
            (true, cluster()),
        ),
    ];
    for (mode, cluster_ip, external) in cases {
        let t = translate(mode.clone());
        assert_eq!(view(&t, "10.96.0.10:80"), cluster_ip, "{mode:?}, ClusterIP");
        assert_eq!(
            view(&t, "203.0.113.7:80"),
            external,
            "{mode:?}, LoadBalancer IP"
        );
    }
    // NodeCIDR before the Node has a pod CIDR: no detector yet.
    let mut st = ClusterState::new(Options {
        detect_local: DetectLocal::NodeCidr,
        ..opts()
    });
    apply(&mut st, vec![web()]);
    assert_eq!(view(&st.snapshot(), "10.96.0.10:80"), (false, vec![]));
}

#[test]
fn etp_local_with_only_remote_endpoints_drops_external_but_serves_cluster_ip() {
    let mut st = state_with(vec![
        lb_service(),
        gw_slice(vec![ep("10.244.9.5", Some("node-z"))]),
    ]);
    st.upsert_node(our_node(None, "10.244.0.1")).unwrap();
    let t = st.snapshot();
    assert_eq!(verdict(&t, "10.244.0.1:30080"), Some(Verdict::Drop));
    assert_eq!(verdict(&t, "203.0.113.7:80"), Some(Verdict::Drop));
    assert_eq!(verdict(&t, "10.96.2.2:80"), None);
    // No endpoints at all: REJECT everywhere.
    st.delete_slice("edge", "gw-1");
    let t = st.snapshot();
    for f in t.sorted() {
        assert_eq!(f.verdict(), Some(Verdict::Reject), "{}", f.key);
    }
}

#[test]
fn itp_local_remote_only_is_drop_and_local_ready_is_used() {
    let mut svc = web();
    svc["spec"]["internalTrafficPolicy"] = json!("Local");
    let mut st = state_with(vec![
        svc,
        web_slice("web-1", vec![ep("10.244.9.1", Some("node-z"))]),
    ]);
    let t = st.snapshot();
    assert_eq!(verdict(&t, "10.96.0.10:80"), Some(Verdict::Drop));
    apply(
        &mut st,
        vec![web_slice(
            "web-1",
            vec![
                ep("10.244.9.1", Some("node-z")),
                ep("10.244.0.7", Some(NODE)),
            ],
        )],
    );
    let t = st.snapshot();
    assert_eq!(used(&t, "10.96.0.10:80"), vec!["10.244.0.7:8080"]);
}

#[test]
fn etp_local_on_clusterip_without_external_ips_is_ignored() {
    let mut svc = web();
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    let mut st = state_with(vec![svc]);
    let t = st.snapshot();
    assert!(
        !t.lookup(&key("10.96.0.10:80"))
            .unwrap()
            .service
            .external_local
    );
}

#[test]
fn session_affinity() {
    let mut a = web();
    a["spec"]["sessionAffinity"] = json!("ClientIP");
    let mut b = cluster_ip("default", "b", "10.96.0.12", json!([{"port": 80}]));
    b["spec"]["sessionAffinity"] = json!("ClientIP");
    b["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 60}});
    let mut st = state_with(vec![a, b]);
    let t = st.snapshot();
    assert_eq!(
        t.lookup(&key("10.96.0.10:80")).unwrap().service.affinity,
        Affinity::ClientIp {
            timeout: Duration::from_secs(10800)
        }
    );
    assert_eq!(
        t.lookup(&key("10.96.0.12:80")).unwrap().service.affinity,
        Affinity::ClientIp {
            timeout: Duration::from_secs(60)
        }
    );
}

#[test]
fn mode_detection() {
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "m"},
        "spec": {"clusterIP": "10.96.0.50", "ports": [
            {"name": "http-web", "port": 1},
            {"name": "http2", "port": 2},
            {"name": "grpc-api", "port": 3},
            {"name": "h2c", "port": 4},
            {"name": "web", "port": 5, "appProtocol": "http"},
            {"name": "w2", "port": 6, "appProtocol": "kubernetes.io/h2c"},
            {"name": "ws", "port": 7, "appProtocol": "kubernetes.io/ws"},
            {"name": "http-tls", "port": 8, "appProtocol": "https"},
            {"name": "https", "port": 9},
            {"name": "mysql", "port": 10},
            {"name": "dns", "port": 11, "protocol": "UDP", "appProtocol": "http"},
            {"name": "g", "port": 12, "appProtocol": "grpc"},
            {"name": "httpish", "port": 13}
        ]}
    });
    let mut st = state_with(vec![svc]);
    let t = st.snapshot();
    let mode = |p: &str| t.lookup(&key(p)).map(|f| f.service.mode);
    assert_eq!(mode("10.96.0.50:1"), Some(Mode::Http));
    assert_eq!(mode("10.96.0.50:2"), Some(Mode::H2c));
    assert_eq!(mode("10.96.0.50:3"), Some(Mode::H2c));
    assert_eq!(mode("10.96.0.50:4"), Some(Mode::H2c));
    assert_eq!(mode("10.96.0.50:5"), Some(Mode::Http));
    assert_eq!(mode("10.96.0.50:6"), Some(Mode::H2c));
    assert_eq!(mode("10.96.0.50:7"), Some(Mode::Http));
    assert_eq!(
        mode("10.96.0.50:8"),
        Some(Mode::L4),
        "appProtocol wins over the name"
    );
    assert_eq!(mode("10.96.0.50:9"), Some(Mode::L4));
    assert_eq!(mode("10.96.0.50:10"), Some(Mode::L4));
    assert_eq!(mode("10.96.0.50:12"), Some(Mode::H2c));
    assert_eq!(
        mode("10.96.0.50:13"),
        Some(Mode::L4),
        "prefix means the whole first dash-segment"
    );
    let udp = t.lookup(&key_udp("10.96.0.50:11")).unwrap();
    assert_eq!(udp.service.mode, Mode::L4);
    assert_eq!(udp.service.protocol, control::Protocol::Udp);
}

#[test]
fn protocol_annotation_forces_mode() {
    let mut a = web();
    a["metadata"]["annotations"] = json!({"lightpath.io/protocol": "tcp"});
    let mut b = cluster_ip(
        "default",
        "b",
        "10.96.0.12",
        json!([{"name": "db", "port": 80}]),
    );
    b["metadata"]["annotations"] = json!({"lightpath.io/protocol": "h2c"});
    let mut st = state_with(vec![a, b]);
    let t = st.snapshot();
    assert_eq!(
        t.lookup(&key("10.96.0.10:80")).unwrap().service.mode,
        Mode::L4
    );
    assert_eq!(
        t.lookup(&key("10.96.0.12:80")).unwrap().service.mode,
        Mode::H2c
    );
    assert_eq!(
        t.lookup(&key("10.96.0.10:80")).unwrap().service.annotations["lightpath.io/protocol"],
        "tcp"
    );
}

// ---------- topology through the store ----------

fn hinted_slice(zones: &[(&str, &str)]) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = zones
        .iter()
        .map(|(addr, z)| json!({"addresses": [addr], "zone": z, "hints": {"forZones": [{"name": z}]}}))
        .collect();
    web_slice("web-1", eps)
}

#[test]
fn zone_hints_follow_our_nodes_zone_label() {
    let mut st = state_with(vec![
        web(),
        hinted_slice(&[("10.244.1.1", "zone-a"), ("10.244.2.1", "zone-b")]),
    ]);
    // No Node object yet: zone unknown, no filtering.
    assert_eq!(used(&st.snapshot(), "10.96.0.10:80").len(), 2);
    st.upsert_node(our_node(Some("zone-a"), "10.244.0.1"))
        .unwrap();
    let t = st.snapshot();
    assert_eq!(used(&t, "10.96.0.10:80"), vec!["10.244.1.1:8080"]);
    assert_eq!(
        t.lookup(&key("10.96.0.10:80")).unwrap().endpoints()[0]
            .zone
            .as_deref(),
        Some("zone-a")
    );
    st.upsert_node(our_node(Some("zone-b"), "10.244.0.1"))
        .unwrap();
    assert_eq!(
        used(&st.snapshot(), "10.96.0.10:80"),
        vec!["10.244.2.1:8080"]
    );
    st.delete_node(NODE);
    assert_eq!(used(&st.snapshot(), "10.96.0.10:80").len(), 2);
}

#[test]
fn other_nodes_are_ignored() {
    let mut st = state_with(vec![
        web(),
        hinted_slice(&[("10.244.1.1", "zone-a"), ("10.244.2.1", "zone-b")]),
    ]);
    let v = st.snapshot().version;
    let other = node(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-z", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "not-an-ip"}]}}));
    st.upsert_node(other).unwrap();
    assert_eq!(st.snapshot().version, v);
}

// ---------- incremental behaviour ----------

#[test]
fn snapshot_is_the_same_arc_when_nothing_changed() {
    let mut st = state_with(vec![web()]);
    let a = st.snapshot();
    let b = st.snapshot();
    assert!(Arc::ptr_eq(&a, &b));
    // Re-applying identical objects changes nothing either.
    apply(&mut st, vec![web()]);
    let c = st.snapshot();
    assert!(Arc::ptr_eq(&a, &c));
    // A real change bumps the version by one.
    apply(
        &mut st,
        vec![web_slice("web-1", vec![ep("10.244.1.5", None)])],
    );
    let d = st.snapshot();
    assert_eq!(d.version, a.version + 1);
    // Old snapshots are immutable.
    assert!(used(&a, "10.96.0.10:80").is_empty());
}

#[test]
fn one_slice_change_touches_only_its_service() {
    let mut objs = Vec::new();
    for i in 0..20 {
        let name = format!("s{i}");
        objs.push(cluster_ip(
            "default",
            &name,
            &format!("10.96.3.{i}"),
            json!([{"name": "http", "port": 80}]),
        ));
        objs.push(v4_slice(
            "default",
            &format!("{name}-1"),
            &name,
            &[("http", 8080)],
            vec![ep(&format!("10.244.3.{i}"), None)],
        ));
    }
    let mut st = state_with(objs);
    let before = st.snapshot();
    apply(
        &mut st,
        vec![v4_slice(
            "default",
            "s7-1",
            "s7",
            &[("http", 8080)],
            vec![ep("10.244.3.7", None), ep("10.244.4.7", None)],
        )],
    );
    let after = st.snapshot();
    assert_eq!(after.version, before.version + 1);
    for i in 0..20 {
        let k = key(&format!("10.96.3.{i}:80"));
        let same = Arc::ptr_eq(
            &before.lookup(&k).unwrap().service,
            &after.lookup(&k).unwrap().service,
        );
        assert_eq!(same, i != 7, "service s{i}");
    }
    assert_eq!(used(&after, "10.96.3.7:80").len(), 2);
}

#[test]
fn invalid_update_keeps_the_previous_object() {
    let mut st = web_with_one_endpoint();
    let good = st.snapshot();
    let mut bad_svc = web();
    bad_svc["spec"]["ports"][0]["port"] = json!(70000);
    let e = st.upsert_service(svc(bad_svc)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Service default/web: spec.ports[0].port: port 70000 out of range 1-65535"
    );
    let bad_slice = web_slice(
        "web-1",
        vec![ep("10.244.1.6", None), ep("10.0.0.300", None)],
    );
    let e = st.upsert_slice(slice(bad_slice)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "EndpointSlice default/web-1: endpoints[1].addresses[0]: invalid IPv4 address \"10.0.0.300\""
    );
    let after = st.snapshot();
    assert!(Arc::ptr_eq(&good, &after));
    assert_eq!(used(&after, "10.96.0.10:80"), vec!["10.244.1.5:8080"]);
}

#[test]
fn conflicting_frontends_go_to_the_first_service_by_name_and_fail_over() {
    let mut a = cluster_ip("default", "a", "10.96.0.61", json!([{"port": 80}]));
    a["spec"]["externalIPs"] = json!(["192.0.2.1"]);
    let mut b = cluster_ip("default", "b", "10.96.0.62", json!([{"port": 80}]));
    b["spec"]["externalIPs"] = json!(["192.0.2.1"]);
    // b arrives first, then a (sorting first) takes the shared frontend.
    let mut st = state_with(vec![b]);
    let t = st.snapshot();
    assert_eq!(
        t.lookup(&key("192.0.2.1:80")).unwrap().service.name.name,
        "b"
    );
    apply(&mut st, vec![a]);
    let t = st.snapshot();
    assert_eq!(
        t.lookup(&key("192.0.2.1:80")).unwrap().service.name.name,
        "a"
    );
    st.delete_service("default", "a");
    let t = st.snapshot();
    assert_eq!(
        t.lookup(&key("192.0.2.1:80")).unwrap().service.name.name,
        "b"
    );
    assert!(t.lookup(&key("10.96.0.61:80")).is_none());
}

#[test]
fn udp_and_sctp_ports_are_in_the_table_with_their_protocol() {
    let svc = cluster_ip(
        "kube-system",
        "dns",
        "10.96.0.53",
        json!([{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}, {"name": "s", "port": 99, "protocol": "SCTP"}]),
    );
    let sl = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "kube-system", "name": "dns-1", "labels": {"kubernetes.io/service-name": "dns"}},
        "addressType": "IPv4",
        "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.5.5"]}]
    });
    let mut st = state_with(vec![svc, sl]);
    let t = st.snapshot();
    let u = t.lookup(&key_udp("10.96.0.53:53")).unwrap();
    assert_eq!(addrs(u.endpoints()), vec!["10.244.5.5:53"]);
    assert_eq!(u.service.name.port, "dns");
    assert_eq!(
        t.lookup(&key("10.96.0.53:53")).unwrap().service.name.port,
        "dns-tcp"
    );
    assert_eq!(t.len(), 3);
    assert_eq!(EndpointState::Ready, u.endpoints()[0].state);
}
