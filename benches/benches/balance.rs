//! The balancer's hot path: one p2c pick (with its in-flight guard and a
//! latency sample) over 3, 100 and 1000 endpoints, the same with ClientIP
//! affinity, and applying an endpoint update that changes one endpoint.
//!
//! Run: `cargo bench -p lightpath-benches --bench balance`.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use control::{Affinity, Endpoint, Mode, Protocol, ServicePort, ServicePortName};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lightpath::balance::{BalanceConfig, Balancer, Scope};

fn service(n: usize, affinity: Affinity, shift: usize) -> Arc<ServicePort> {
    let eps: Arc<[Endpoint]> = (shift..n + shift)
        .map(|i| {
            Endpoint::ready(SocketAddr::from((
                [10, 1, (i / 250) as u8, (i % 250) as u8 + 1],
                8080,
            )))
        })
        .collect();
    Arc::new(ServicePort {
        affinity,
        ..ServicePort::new(
            ServicePortName::new("bench", format!("svc{n}"), "http"),
            Protocol::Tcp,
            Mode::L4,
            eps,
        )
    })
}

fn bench(c: &mut Criterion) {
    // Balancer time comes from tokio's clock; a runtime context provides it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let client = IpAddr::from([192, 168, 1, 1]);

    let mut g = c.benchmark_group("balance/pick");
    for n in [3usize, 100, 1000] {
        let b = Balancer::new(&service(n, Affinity::None, 0), BalanceConfig::default());
        // Some load so costs differ, as in real use.
        let held: Vec<_> = (0..n)
            .filter_map(|_| b.pick(Scope::Cluster, client, &[]))
            .collect();
        g.bench_with_input(BenchmarkId::new("p2c", n), &n, |bench, _| {
            bench.iter(|| {
                let mut p = b
                    .pick(Scope::Cluster, black_box(client), &[])
                    .expect("pick");
                p.record_success();
                black_box(p.addr())
            })
        });
        let aff = Balancer::new(
            &service(
                n,
                Affinity::ClientIp {
                    timeout: Duration::from_secs(10800),
                },
                0,
            ),
            BalanceConfig::default(),
        );
        g.bench_with_input(BenchmarkId::new("p2c+affinity", n), &n, |bench, _| {
            bench.iter(|| {
                let p = aff
                    .pick(Scope::Cluster, black_box(client), &[])
                    .expect("pick");
                black_box(p.addr())
            })
        });
        drop(held);
    }
    g.finish();

    let mut g = c.benchmark_group("balance/update");
    for n in [3usize, 100, 1000] {
        let a = service(n, Affinity::None, 0);
        let bsvc = service(n, Affinity::None, 1); // one endpoint out, one in
        let bal = Balancer::new(&a, BalanceConfig::default());
        let mut flip = false;
        g.bench_with_input(
            BenchmarkId::new("one-endpoint-change", n),
            &n,
            |bench, _| {
                bench.iter(|| {
                    flip = !flip;
                    bal.update(if flip { &bsvc } else { &a });
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
