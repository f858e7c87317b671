//! The data plane's balancer registry, as `/config_dump` and `/endpoints`
//! show it: a copy of each endpoint's atomics and EWMA estimate, read on the
//! admin runtime.

use std::collections::HashSet;
use std::time::Duration;

use control::Table;

use super::dump::{BalancerDump, BalancerState, EndpointBalancerState};
use crate::balance::{Balancers, Scope};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl BalancerDump for Balancers {
    fn balancers(&self, table: &Table) -> Vec<BalancerState> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for fe in table.frontends.values() {
            let (name, family) = (&fe.service.name, fe.service.family);
            if !seen.insert((name.clone(), family)) {
                continue;
            }
            let Some(b) = self.get(family, name) else {
                continue;
            };
            let mut endpoints = Vec::new();
            for (scope, label) in [(Scope::Cluster, "cluster"), (Scope::Local, "local")] {
                for be in b.backends(scope) {
                    let ewma_ms = ms(be.rtt_estimate());
                    let in_flight = be.in_flight() as u64;
                    endpoints.push(EndpointBalancerState {
                        addr: be.addr(),
                        scope: label,
                        available: be.is_ready(),
                        ejected: !be.is_ready(),
                        in_flight,
                        ewma_ms,
                        cost: ewma_ms * (in_flight as f64 + 1.0),
                        picks: be.picks(),
                        failures: be.failures(),
                        consecutive_failures: be.consecutive_failures(),
                    });
                }
            }
            out.push(BalancerState {
                service: name.clone(),
                family,
                endpoints,
            });
        }
        out
    }

    /// Per scrape: one registry lookup and one atomic load per endpoint; no
    /// clock read, EWMA decay or per-endpoint record (at 10,000 service
    /// ports building the dump for this made a scrape take ~150 ms).
    fn ejected(&self, table: &Table) -> usize {
        let mut seen: HashSet<(&control::ServicePortName, control::Family)> = HashSet::new();
        let mut ejected = 0;
        for fe in table.frontends.values() {
            let (name, family) = (&fe.service.name, fe.service.family);
            if !seen.insert((name, family)) {
                continue;
            }
            let Some(b) = self.get(family, name) else {
                continue;
            };
            let mut addrs: Vec<std::net::SocketAddr> = Vec::new();
            for scope in [Scope::Cluster, Scope::Local] {
                for be in b.backends(scope) {
                    if !be.is_ready() && !addrs.contains(&be.addr()) {
                        addrs.push(be.addr());
                    }
                }
            }
            ejected += addrs.len();
        }
        ejected
    }
}
