//! Synthetic clusters for benchmarks and the memory probe.
//!
//! Why in the library: the criterion bench (benches/benches/table.rs) and
//! the peak-memory example (control/examples/scale.rs) must measure the very
//! same objects, so the generator lives in one place. Objects are real
//! k8s-openapi types, as the watcher and the manifest source deliver them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::objects::LABEL_SERVICE_NAME;

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
