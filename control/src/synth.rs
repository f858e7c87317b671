//! Synthetic clusters for benchmarks and the memory probe.
//!
//! Why in the library: the criterion bench (benches/benches/table.rs) and
//! the peak-memory example (control/examples/scale.rs) must measure the very
//! same objects, so the generator lives in one place. Objects are real
//! k8s-openapi types, as the watcher and the manifest source deliver them.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::Table;
use crate::objects::LABEL_SERVICE_NAME;
use crate::options::Options;
use crate::state::ClusterState;

/// Service `i` of a synthetic cluster: ClusterIP 10.96.x.y, one HTTP port.
pub fn service(i: u32) -> Service {
    let ip = format!("10.96.{}.{}", (i >> 8) & 0xff, i & 0xff);
    Service {
        metadata: ObjectMeta {
            namespace: Some(format!("ns-{}", i % 50)),
            name: Some(format!("svc-{i}")),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The EndpointSlice of service `i` with `n` endpoints spread over 20 nodes;
/// `generation` shifts the addresses so successive generations differ.
pub fn slice(i: u32, n: u32, generation: u32) -> EndpointSlice {
    let endpoints = (0..n)
        .map(|j| {
            let k = i * n + j + generation;
            Endpoint {
                addresses: vec![format!(
                    "10.{}.{}.{}",
                    128 + ((k >> 16) & 0x3f),
                    (k >> 8) & 0xff,
                    k & 0xff
                )],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(format!("node-{}", k % 20)),
                zone: Some(format!("zone-{}", k % 3)),
                ..Default::default()
            }
        })
        .collect();
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some(format!("ns-{}", i % 50)),
            name: Some(format!("svc-{i}-abcde")),
            labels: Some(BTreeMap::from([(
                LABEL_SERVICE_NAME.to_string(),
                format!("svc-{i}"),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]),
    }
}

/// `services` services with `endpoints` endpoints each.
pub fn cluster(services: u32, endpoints: u32) -> (Vec<Service>, Vec<EndpointSlice>) {
    (
        (0..services).map(service).collect(),
        (0..services).map(|i| slice(i, endpoints, 0)).collect(),
    )
}

/// A store for node `node-1` holding `svcs` and `slices`, loaded as a fresh
/// watch delivers them: every Service, then every slice.
pub fn store(svcs: Vec<Service>, slices: Vec<EndpointSlice>) -> ClusterState {
    let mut st = ClusterState::new(Options {
        node_name: "node-1".into(),
        ..Options::default()
    });
    for s in svcs {
        st.upsert_service(s).expect("a synthetic Service is valid");
    }
    for s in slices {
        st.upsert_slice(s)
            .expect("a synthetic EndpointSlice is valid");
    }
    st
}

/// Step `step` of a scripted churn over a store of [`cluster`]`(services, _)`
/// built by [`store`], for tests of what follows table changes: by
/// `step % 5`, service `step * 7 % services` gets new endpoints, loses them
/// all, has them all terminating (still serving), is re-added, or is
/// deleted.
pub fn churn_step(st: &mut ClusterState, step: u32, services: u32) {
    let i = step * 7 % services;
    let svc = service(i);
    match step % 5 {
        0 => st.upsert_slice(slice(i, 3 + step % 3, step)),
        1 => st.upsert_slice(slice(i, 0, step)),
        2 => {
            let mut s = slice(i, 3, step);
            for ep in &mut s.endpoints {
                let c = ep.conditions.get_or_insert_with(Default::default);
                c.ready = Some(false);
                c.serving = Some(true);
                c.terminating = Some(true);
            }
            st.upsert_slice(s)
        }
        3 => st.upsert_service(svc),
        _ => {
            let ns = svc.metadata.namespace.unwrap_or_default();
            st.delete_service(&ns, svc.metadata.name.as_deref().unwrap_or_default());
            Ok(())
        }
    }
    .expect("a synthetic object is valid");
}

/// The tables a reader of a churning store sees: the first table of
/// [`store`]`(`[`cluster`]`(services, endpoints))`, then one after each of
/// `steps` [`churn_step`]s, except every third (a slow reader skips
/// versions), and one after the last.
pub fn churned(services: u32, endpoints: u32, steps: u32) -> (Arc<Table>, Vec<Arc<Table>>) {
    let (svcs, slices) = cluster(services, endpoints);
    let mut st = store(svcs, slices);
    let first = st.snapshot();
    let mut later = Vec::new();
    for step in 1..=steps {
        churn_step(&mut st, step, services);
        if step % 3 != 0 || step == steps {
            later.push(st.snapshot());
        }
    }
    (first, later)
}
