//! Builders for Kubernetes objects in tests: JSON in, k8s-openapi types out,
//! so every test reads like the manifest it stands for.
#![allow(dead_code)]

use std::net::SocketAddr;

use control::{ClusterState, Endpoint, EndpointState, FrontendKey, Options, Protocol, Table};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

pub const NODE: &str = "node-a";

pub fn opts() -> Options {
    Options {
        node_name: NODE.into(),
        ..Options::default()
    }
}

pub fn svc(v: Value) -> Service {
    serde_json::from_value(v).expect("test Service must deserialize")
}

pub fn slice(v: Value) -> EndpointSlice {
    serde_json::from_value(v).expect("test EndpointSlice must deserialize")
}

pub fn node(v: Value) -> Node {
    serde_json::from_value(v).expect("test Node must deserialize")
}

/// A ClusterIP service `ns/name` at `ip` with the given `spec.ports`.
pub fn cluster_ip(ns: &str, name: &str, ip: &str, ports: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports}
    })
}

/// One endpoint: address, conditions (ready, serving, terminating) as
/// JSON values (null = unset), and nodeName.
pub fn ep(addr: &str, node: Option<&str>) -> Value {
    json!({"addresses": [addr], "nodeName": node})
}

pub fn ep_cond(
    addr: &str,
    node: Option<&str>,
    ready: Value,
    serving: Value,
    terminating: Value,
) -> Value {
    json!({
        "addresses": [addr], "nodeName": node,
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating}
    })
}

/// An IPv4 slice `name` for service `svc` with ports `[(name, port)]`.
pub fn v4_slice(
    ns: &str,
    name: &str,
    svc: &str,
    ports: &[(&str, i32)],
    endpoints: Vec<Value>,
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"})).collect::<Vec<_>>(),
        "endpoints": endpoints
    })
}

pub fn our_node(zone: Option<&str>, internal_ip: &str) -> Node {
    let mut labels = serde_json::Map::new();
    if let Some(z) = zone {
        labels.insert("topology.kubernetes.io/zone".into(), json!(z));
    }
    node(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": labels},
        "status": {"addresses": [
            {"type": "InternalIP", "address": internal_ip},
            {"type": "Hostname", "address": NODE}
        ]}
    }))
}

pub fn key(addr: &str) -> FrontendKey {
    FrontendKey::new(
        addr.parse::<SocketAddr>().expect("test address"),
        Protocol::Tcp,
    )
}

pub fn key_udp(addr: &str) -> FrontendKey {
    FrontendKey::new(
        addr.parse::<SocketAddr>().expect("test address"),
        Protocol::Udp,
    )
}

/// `ip:port` strings of an endpoint set, sorted.
pub fn addrs(eps: &[Endpoint]) -> Vec<String> {
    let mut v: Vec<String> = eps.iter().map(|e| e.addr.to_string()).collect();
    v.sort();
    v
}

/// `ip:port(state)` strings, sorted.
pub fn addrs_state(eps: &[Endpoint]) -> Vec<String> {
    let mut v: Vec<String> = eps
        .iter()
        .map(|e| {
            let s = match e.state {
                EndpointState::Ready => "ready",
                EndpointState::ServingTerminating => "serving-terminating",
            };
            format!("{}({s})", e.addr)
        })
        .collect();
    v.sort();
    v
}

/// The endpoints the data plane would use for the frontend at `addr`.
pub fn used(table: &Table, addr: &str) -> Vec<String> {
    let f = table.lookup(&key(addr)).unwrap_or_else(|| {
        panic!(
            "no frontend {addr} in table: {:?}",
            table
                .sorted()
                .iter()
                .map(|f| f.key.to_string())
                .collect::<Vec<_>>()
        )
    });
    addrs(f.endpoints())
}

pub fn state_with(objs: Vec<Value>) -> ClusterState {
    let mut st = ClusterState::new(opts());
    apply(&mut st, objs);
    st
}

pub fn apply(st: &mut ClusterState, objs: Vec<Value>) {
    for o in objs {
        match o["kind"].as_str() {
            Some("Service") => st.upsert_service(svc(o)).expect("valid Service"),
            Some("EndpointSlice") => st.upsert_slice(slice(o)).expect("valid EndpointSlice"),
            Some("Node") => st.upsert_node(node(o)).expect("valid Node"),
            k => panic!("unknown kind {k:?}"),
        }
    }
}

/// The kernel verdict of the frontend at `addr` (`None`: proxied).
pub fn verdict(table: &Table, addr: &str) -> Option<control::Verdict> {
    table
        .lookup(&key(addr))
        .unwrap_or_else(|| panic!("no frontend {addr} in table"))
        .verdict()
}
