//! Consistent hashing (`lightpath.io/balance: ring-hash`) over a Ketama
//! continuum, pingora's port of nginx/libketama.
//!
//! Why Ketama: when an endpoint joins or leaves, only about 1/N of the keys
//! move, so caches behind the service keep their hit rate and sticky
//! clients stay put. The ring is built once per service-port snapshot (its
//! endpoint set), never per request. Readiness comes from the shared
//! balancer's backends: a key whose endpoint is ejected or excluded (already
//! tried) walks the ring to the next endpoint, so ejection and retries work
//! the same as with p2c.

use std::net::SocketAddr;

use control::{Endpoint, ServicePort};
use pingora_ketama::{Bucket, Continuum};

use crate::balance::Scope;

/// Ketama points per endpoint (pingora's default weight 1 gives 160).
const POINTS_PER_NODE: usize = 160;

pub struct Ring {
    cluster: Option<Continuum>,
    local: Option<Continuum>,
    cluster_len: usize,
    local_len: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("cluster", &self.cluster_len)
            .field("local", &self.local_len)
            .finish()
    }
}

fn continuum(eps: &[Endpoint]) -> Option<Continuum> {
    if eps.is_empty() {
        return None;
    }
    let buckets: Vec<Bucket> = eps.iter().map(|e| Bucket::new(e.addr, 1)).collect();
    Some(Continuum::new(&buckets))
}

impl Ring {
    pub fn new(port: &ServicePort) -> Self {
        Ring {
            cluster: continuum(&port.cluster_endpoints),
            local: continuum(&port.local_endpoints),
            cluster_len: port.cluster_endpoints.len(),
            local_len: port.local_endpoints.len(),
        }
    }

    /// The endpoint for `key`: the first on the ring that is usable
    /// (`usable(addr)`: ready and not excluded); if none is usable, the first
    /// not excluded (ejection must never become an outage).
    pub fn pick(
        &self,
        scope: Scope,
        key: &[u8],
        exclude: &[SocketAddr],
        usable: impl Fn(SocketAddr) -> bool,
    ) -> Option<SocketAddr> {
        let (ring, n) = match scope {
            Scope::Cluster => (self.cluster.as_ref()?, self.cluster_len),
            Scope::Local => (self.local.as_ref()?, self.local_len),
        };
        let mut fallback = None;
        // The iterator cycles; one full turn visits every endpoint.
        for addr in ring.node_iter(key).take(n * POINTS_PER_NODE) {
            if exclude.contains(addr) {
                continue;
            }
            if usable(*addr) {
                return Some(*addr);
            }
            fallback.get_or_insert(*addr);
        }
        fallback
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::{EndpointState, Mode, Protocol, ServicePortName};
    use std::sync::Arc;

    fn port(n: u8) -> ServicePort {
        let eps: Arc<[Endpoint]> = (1..=n)
            .map(|i| Endpoint {
                addr: SocketAddr::from(([10, 0, 0, i], 8080)),
                state: EndpointState::Ready,
                node_name: None,
                zone: None,
            })
            .collect();
        ServicePort::new(
            ServicePortName::new("t", "ring", ""),
            Protocol::Tcp,
            Mode::Http,
            eps,
        )
    }

    #[test]
    fn adding_an_endpoint_moves_about_one_nth() {
        let (r4, r5) = (Ring::new(&port(4)), Ring::new(&port(5)));
        let keys = 10_000;
        let mut moved = 0;
        for k in 0..keys {
            let key = format!("client-{k}");
            let a = r4.pick(Scope::Cluster, key.as_bytes(), &[], |_| true);
            let b = r5.pick(Scope::Cluster, key.as_bytes(), &[], |_| true);
            if a != b {
                moved += 1;
                // Keys only ever move to the new endpoint.
                assert_eq!(b, Some(SocketAddr::from(([10, 0, 0, 5], 8080))));
            }
        }
        let share = moved as f64 / keys as f64;
        assert!((0.12..0.28).contains(&share), "moved {share}");
    }

    #[test]
    fn skips_unusable_and_excluded_but_never_returns_none_with_candidates() {
        let r = Ring::new(&port(3));
        let first = r.pick(Scope::Cluster, b"k", &[], |_| true).expect("pick");
        let next = r
            .pick(Scope::Cluster, b"k", &[first], |_| true)
            .expect("pick");
        assert_ne!(first, next);
        let not_first = r
            .pick(Scope::Cluster, b"k", &[], |a| a != first)
            .expect("pick");
        assert_eq!(not_first, next, "walks the ring past an ejected endpoint");
        assert_eq!(
            r.pick(Scope::Cluster, b"k", &[], |_| false),
            Some(first),
            "all ejected: still answers"
        );
        assert_eq!(r.pick(Scope::Local, b"k", &[], |_| true), None);
    }
}
