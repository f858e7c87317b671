//! Kernel-rule generation cost: the full `nft -f -` script for a table of
//! N frontends (start-up and the fallback reload) and the incremental
//! script when 3 of 10,000 frontends change (every table update). The
//! kernel's own load time is measured end to end by
//! proxy/tests/netns_scale.rs; this isolates lightpath's share.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use redirect::nft::{diff_script, full_script, Frontends};
use redirect::{Action, Config, Frontend};

fn config() -> Config {
    Config {
        table: "lightpath".into(),
        listener_v4: "127.0.0.1:15001".parse().expect("literal"),
        listener_v6: Some("[::1]:15001".parse().expect("literal")),
        mark: 1,
        upstream_mark: 2,
        route_table: 100,
        keep_client_source: true,
    }
}

fn frontends(n: u32) -> Frontends {
    (0..n)
        .map(|i| {
            let ip: IpAddr = Ipv4Addr::from(0x0a60_0000 + i).into();
            let action = if i % 10 == 5 {
                Action::Reject
            } else {
                Action::Proxy
            };
            (Frontend::tcp(ip, 80), action.into())
        })
        .collect()
}

fn full(c: &mut Criterion) {
    let cfg = config();
    let mut g = c.benchmark_group("redirect/full_script");
    for n in [10u32, 1_000, 10_000] {
        let f = frontends(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &f, |b, f| {
            b.iter(|| full_script(&cfg, black_box(f)))
        });
    }
    g.finish();
}

fn diff(c: &mut Criterion) {
    let cfg = config();
    let old = frontends(10_000);
    let mut new = old.clone();
    new.insert(
        Frontend::tcp(Ipv4Addr::new(10, 96, 0, 5).into(), 80),
        Action::Proxy.into(),
    );
    new.insert(
        Frontend::tcp(Ipv4Addr::new(10, 96, 0, 1).into(), 80),
        Action::Reject.into(),
    );
    new.insert(
        Frontend::tcp(Ipv4Addr::new(10, 97, 0, 1).into(), 443),
        Action::Proxy.into(),
    );
    c.bench_function("redirect/diff_script_3_of_10000", |b| {
        b.iter(|| diff_script(&cfg, black_box(&old), black_box(&new)))
    });
}

criterion_group!(benches, full, diff);
criterion_main!(benches);
