//! Frontend lookup on the accept path: `Table::lookup` at 10, 100, 1,000 and
//! 10,000 services.
//!
//! Why: every accepted connection (and every UDP flow's first datagram) does
//! one lookup of its original destination in the published snapshot, so the
//! lookup must stay flat as the cluster grows: the persistent hash map should
//! cost the same at 10 and at 10,000 services, unlike kube-proxy's iptables
//! mode whose per-connection cost grows with the rule count. The tables are
//! built from the same synthetic Kubernetes objects as the table-build bench,
//! through the real translation, so the keys and their distribution are what
//! the proxy sees.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use control::{synth, FrontendKey, Protocol, Table};

const SIZES: [u32; 4] = [10, 100, 1_000, 10_000];
/// Endpoints per service: the lookup does not touch them, so few keep the
/// setup short.
const ENDPOINTS: u32 = 3;

fn table(services: u32) -> Arc<Table> {
    let (svcs, slices) = synth::cluster(services, ENDPOINTS);
    let mut st = synth::store(svcs, slices);
    let t = st.snapshot();
    assert_eq!(t.len(), services as usize, "one frontend per service");
    t
}

/// The key of synthetic service `i` (its ClusterIP, port 80, TCP).
fn key(i: u32) -> FrontendKey {
    let ip = Ipv4Addr::new(10, 96, ((i >> 8) & 0xff) as u8, (i & 0xff) as u8);
    FrontendKey::new(SocketAddr::new(IpAddr::V4(ip), 80), Protocol::Tcp)
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    g.throughput(Throughput::Elements(1));
    for n in SIZES {
        let t = table(n);
        // Keys spread over the whole table, visited in a scrambled order so
        // consecutive lookups do not walk neighbouring nodes.
        let keys: Vec<FrontendKey> = (0..1024u32).map(|j| key((j * 7919) % n)).collect();
        for k in &keys {
            assert!(t.lookup(k).is_some(), "{k} must be in the table");
        }
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("hit", n), &t, |b, t| {
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(t.lookup(black_box(&keys[i])).is_some())
            })
        });
        // A miss: a connection to an address that has just been removed.
        let miss = FrontendKey::new(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 97, 0, 1)), 80),
            Protocol::Tcp,
        );
        assert!(t.lookup(&miss).is_none());
        g.bench_with_input(BenchmarkId::new("miss", n), &t, |b, t| {
            b.iter(|| black_box(t.lookup(black_box(&miss)).is_none()))
        });
    }
    g.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
