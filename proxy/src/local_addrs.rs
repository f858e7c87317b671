//! This node's own addresses: is a connection from a process on this node?
//!
//! Why: kube-proxy serves node-originated traffic to an external frontend
//! (NodePort, LoadBalancer IP, externalIP) of an `externalTrafficPolicy:
//! Local` service from the cluster-wide endpoints (its `fib saddr type
//! local` short-circuit), so a node process or host-network pod reaches such
//! a service even where no endpoint is local. Such a connection reaches
//! lightpath from one of the node's addresses (through `lo`, after the
//! output mark's detour), so the accept path asks this set, and only for
//! those frontends.
//!
//! The set is process-wide (the addresses are the host's, whatever asks),
//! read lock-free, and refreshed from `getifaddrs` (one netlink dump) by the
//! table sync task every second, so an address added at run time counts
//! from the next refresh on.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

fn set() -> &'static ArcSwap<HashSet<IpAddr>> {
    static SET: OnceLock<ArcSwap<HashSet<IpAddr>>> = OnceLock::new();
    SET.get_or_init(|| ArcSwap::from_pointee(read()))
}

/// The addresses of every interface of this network namespace (loopback
/// included). Empty if they cannot be read: then nothing counts as local.
fn read() -> HashSet<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return HashSet::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// Whether `ip` is one of this node's addresses (v4-mapped IPv6 counts as
/// its IPv4 address).
pub fn is_local(ip: IpAddr) -> bool {
    set().load().contains(&ip.to_canonical())
}

/// Reads the addresses again; swaps the set only when it changed.
pub fn refresh() {
    let now = read();
    let cur = set().load();
    if **cur != now {
        set().store(Arc::new(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_local_and_a_documentation_address_is_not() {
        refresh();
        assert!(is_local("127.0.0.1".parse().unwrap()));
        assert!(is_local("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_local("192.0.2.123".parse().unwrap()));
    }
}
