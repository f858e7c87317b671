//! What `/config_dump` and `/endpoints` show: the table as the data plane sees
//! it, joined with the balancers' live per-endpoint state.
//!
//! Why a trait for the balancer side: the admin server must not depend on how
//! the balancer stores its state, only on a point-in-time copy of it. The
//! data plane's balancer registry implements [`BalancerDump`]; the admin
//! runtime calls it per request (a few atomics and tiny mutexes per endpoint,
//! never on the data plane's threads).

use std::net::SocketAddr;

use control::{Endpoint, Frontend, ServicePortName, Table};
use serde::Serialize;

use crate::health::HealthReport;
use crate::lifecycle::ReadyStatus;

/// A point-in-time copy of one service port's balancer.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BalancerState {
    pub service: ServicePortName,
    /// A dual-stack service port has a balancer per family.
    pub family: control::Family,
    pub endpoints: Vec<EndpointBalancerState>,
}

/// One endpoint as the balancer sees it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EndpointBalancerState {
    pub addr: SocketAddr,
    /// Which endpoint set: "cluster" or "local".
    pub scope: &'static str,
    /// The balancer may pick it (not ejected, not tripped).
    pub available: bool,
    /// Ejected by outlier detection / a breaker / a health check.
    pub ejected: bool,
    pub in_flight: u64,
    /// Peak-EWMA latency estimate, milliseconds.
    pub ewma_ms: f64,
    /// What p2c compares: estimate × (in-flight + 1), milliseconds.
    pub cost: f64,
    pub picks: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
}

/// Implemented by the data plane's balancer registry.
pub trait BalancerDump: Send + Sync {
    /// The balancers of `table`'s service ports, in any order.
    fn balancers(&self, table: &Table) -> Vec<BalancerState>;

    /// How many endpoints the balancers skip right now (distinct per
    /// service port). Every scrape asks, so implementations should count
    /// without building the whole dump.
    fn ejected(&self, table: &Table) -> usize {
        self.balancers(table)
            .iter()
            .map(|b| {
                let mut addrs: Vec<SocketAddr> = b
                    .endpoints
                    .iter()
                    .filter(|e| e.ejected)
                    .map(|e| e.addr)
                    .collect();
                addrs.sort();
                addrs.dedup();
                addrs.len()
            })
            .sum()
    }
}

/// A frontend and what the kernel does with it when its set is empty.
#[derive(Debug, Serialize)]
pub struct TableEntry<'a> {
    #[serde(flatten)]
    pub frontend: &'a Frontend,
    /// `null` while the frontend has endpoints, else "reject" or "drop".
    pub verdict: Option<control::Verdict>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Ejection {
    pub service: ServicePortName,
    pub addr: SocketAddr,
}

/// The whole `/config_dump` document.
#[derive(Debug, Serialize)]
pub struct ConfigDump<'a> {
    pub version: u64,
    pub readiness: ReadyStatus,
    pub health: HealthReport,
    pub settings: &'a serde_json::Value,
    /// Frontends in key order.
    pub table: Vec<TableEntry<'a>>,
    pub balancers: Vec<BalancerState>,
    pub ejections: Vec<Ejection>,
}

pub fn config_dump<'a>(
    table: &'a Table,
    readiness: ReadyStatus,
    health: HealthReport,
    settings: &'a serde_json::Value,
    mut balancers: Vec<BalancerState>,
) -> ConfigDump<'a> {
    balancers.sort_by(|a, b| a.service.cmp(&b.service));
    for b in &mut balancers {
        b.endpoints.sort_by_key(|e| (e.scope, e.addr));
    }
    let ejections = balancers
        .iter()
        .flat_map(|b| {
            b.endpoints.iter().filter(|e| e.ejected).map(|e| Ejection {
                service: b.service.clone(),
                addr: e.addr,
            })
        })
        .collect();
    ConfigDump {
        version: table.version,
        readiness,
        health,
        settings,
        table: table
            .sorted()
            .into_iter()
            .map(|frontend| TableEntry {
                frontend,
                verdict: frontend.verdict(),
            })
            .collect(),
        balancers,
        ejections,
    }
}

/// `ns/name` or `ns/name:port` as given to `/endpoints?service=`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceQuery {
    pub namespace: String,
    pub name: String,
    pub port: Option<String>,
}

impl ServiceQuery {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ns, rest) = s
            .split_once('/')
            .ok_or_else(|| format!("service={s:?}: expected namespace/name[:port]"))?;
        let (name, port) = match rest.split_once(':') {
            Some((n, p)) => (n, Some(p.to_string())),
            None => (rest, None),
        };
        if ns.is_empty() || name.is_empty() {
            return Err(format!(
                "service={s:?}: namespace and name must not be empty"
            ));
        }
        Ok(ServiceQuery {
            namespace: ns.to_string(),
            name: name.to_string(),
            port,
        })
    }

    fn matches(&self, spn: &ServicePortName) -> bool {
        spn.namespace == self.namespace
            && spn.name == self.name
            && self.port.as_ref().is_none_or(|p| *p == spn.port)
    }
}

/// One service port in `/endpoints`.
#[derive(Debug, Serialize)]
pub struct ServicePortEndpoints {
    pub service: ServicePortName,
    pub mode: control::Mode,
    pub frontends: Vec<String>,
    pub cluster_endpoints: Vec<Endpoint>,
    pub local_endpoints: Vec<Endpoint>,
    pub balancer: Option<Vec<EndpointBalancerState>>,
}

/// Every service port matching `q`, sorted by name; empty if none.
pub fn endpoints(
    table: &Table,
    q: &ServiceQuery,
    balancers: &[BalancerState],
) -> Vec<ServicePortEndpoints> {
    let mut out: Vec<ServicePortEndpoints> = Vec::new();
    for fe in table.sorted() {
        let svc = &fe.service;
        if !q.matches(&svc.name) {
            continue;
        }
        if let Some(existing) = out.iter_mut().find(|e| e.service == svc.name) {
            existing
                .frontends
                .push(format!("{} ({:?})", fe.key, fe.kind));
            continue;
        }
        let balancer = balancers.iter().find(|b| b.service == svc.name).map(|b| {
            let mut eps = b.endpoints.clone();
            eps.sort_by_key(|e| (e.scope, e.addr));
            eps
        });
        out.push(ServicePortEndpoints {
            service: svc.name.clone(),
            mode: svc.mode,
            frontends: vec![format!("{} ({:?})", fe.key, fe.kind)],
            cluster_endpoints: svc.cluster_endpoints.to_vec(),
            local_endpoints: svc.local_endpoints.to_vec(),
            balancer,
        });
    }
    out.sort_by(|a, b| a.service.cmp(&b.service));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        assert_eq!(
            ServiceQuery::parse("default/web").unwrap(),
            ServiceQuery {
                namespace: "default".into(),
                name: "web".into(),
                port: None
            }
        );
        assert_eq!(
            ServiceQuery::parse("default/web:http")
                .unwrap()
                .port
                .as_deref(),
            Some("http")
        );
        for bad in ["web", "/web", "default/", ""] {
            let e = ServiceQuery::parse(bad).unwrap_err();
            assert!(e.contains("service="), "{bad}: {e}");
        }
    }
}
