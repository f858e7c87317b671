//! Table build cost: the full build of a 10,000-service × 10-endpoint
//! cluster from Kubernetes objects, and one incremental EndpointSlice update
//! against that built state (must not rebuild the table: targets < 1 s and
//! < 1 ms). Then what the data plane does with each new table, once per
//! table version: finding the service ports that changed, the three
//! per-port consumers (the balancers, the L7 state, the node's gauges), and
//! the kernel rules' transaction (built from the changed rows, against
//! rebuilding and comparing every rule as before session 12).

use std::sync::Arc;

use control::{synth, Table};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lightpath::balance::{BalanceConfig, Balancers};
use lightpath::l4::connect::ConnectConfig;
use lightpath::l7::L7;
use lightpath::metrics::TableCounter;

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn full_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("table");
    g.sample_size(10);
    g.bench_function("full_build_10k_services_x10", |b| {
        b.iter_batched(
            || synth::cluster(SERVICES, ENDPOINTS),
            |(svcs, slices)| {
                let mut st = synth::store(svcs, slices);
                // Returned, so dropping the store is not timed.
                let table = st.snapshot();
                (st, table)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// The next changed EndpointSlice: each call moves one service's endpoints,
/// a different service each time.
fn next_slice(generation: &mut u32) -> EndpointSlice {
    *generation += 1;
    synth::slice(*generation % SERVICES, ENDPOINTS, *generation)
}

fn one_slice_update(c: &mut Criterion) {
    let (svcs, slices) = synth::cluster(SERVICES, ENDPOINTS);
    let mut st = synth::store(svcs, slices);
    let base = st.snapshot();
    assert_eq!(base.len(), SERVICES as usize);
    let mut g = c.benchmark_group("table");
    let mut generation = 0u32;
    g.bench_function("one_slice_update_in_10k", |b| {
        b.iter_batched(
            || next_slice(&mut generation),
            |slice| {
                st.upsert_slice(slice).unwrap();
                st.snapshot()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// The store after the full build, and a source of its next tables: each
/// one EndpointSlice update newer than the last (built outside the timing).
fn updates() -> (Arc<Table>, impl FnMut() -> Arc<Table>) {
    let (svcs, slices) = synth::cluster(SERVICES, ENDPOINTS);
    let mut st = synth::store(svcs, slices);
    let first = st.snapshot();
    assert_eq!(first.len(), SERVICES as usize);
    let mut generation = 0u32;
    let next = move || {
        st.upsert_slice(next_slice(&mut generation)).unwrap();
        st.snapshot()
    };
    (first, next)
}

/// Times `f` on each next table from `next`, in the `table` group.
fn per_update<R>(
    c: &mut Criterion,
    name: &str,
    next: &mut impl FnMut() -> Arc<Table>,
    mut f: impl FnMut(Arc<Table>) -> R,
) {
    let mut g = c.benchmark_group("table");
    g.bench_function(name, |b| {
        b.iter_batched(&mut *next, &mut f, BatchSize::SmallInput)
    });
    g.finish();
}

/// `Balancers::sync` of a 10,000-service table in which one EndpointSlice
/// changed.
fn balancers_sync(c: &mut Criterion) {
    let (first, mut next) = updates();
    let balancers = Balancers::new(BalanceConfig::default());
    assert_eq!(balancers.sync(&first), SERVICES as usize);
    per_update(
        c,
        "balancers_sync_after_one_slice_update_in_10k",
        &mut next,
        |t| balancers.sync(&t),
    );
}

/// `L7::sync` of the same (every synth port is HTTP: it has L7 state).
fn l7_sync(c: &mut Criterion) {
    let (first, mut next) = updates();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _rt = rt.enter();
    let balancers = Balancers::new(BalanceConfig::default());
    let l7 = L7::new(&ConnectConfig::default());
    balancers.sync(&first);
    l7.sync(&first, &balancers);
    per_update(c, "l7_sync_after_one_slice_update_in_10k", &mut next, |t| {
        balancers.sync(&t);
        l7.sync(&t, &balancers)
    });
}

/// The node gauges' figures (`TableCounter::update`) of the same.
fn node_stats(c: &mut Criterion) {
    let (first, mut next) = updates();
    let mut counter = TableCounter::default();
    counter.update(&first);
    per_update(
        c,
        "node_stats_after_one_slice_update_in_10k",
        &mut next,
        |t| counter.update(&t),
    );
}

/// `Table::port_diff` of the same against the table before it: what each
/// per-port consumer pays to find the ports it must visit.
fn port_diff(c: &mut Criterion) {
    let (first, mut next) = updates();
    let mut prev = first;
    let mut g = c.benchmark_group("table");
    g.bench_function("port_diff_after_one_slice_update_in_10k", |b| {
        b.iter_batched(
            || {
                let table = next();
                (std::mem::replace(&mut prev, table.clone()), table)
            },
            |(old, new)| new.port_diff(&old).changed.len(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// The nftables transaction for the same: from the changed rows
/// (`kernel_changes` + `patch_script`, what `follow_table` does), and, as
/// the baseline, from every row (`kernel_frontends` + `diff_script`).
fn kernel_rules(c: &mut Criterion) {
    use lightpath::run::{kernel_changes, kernel_frontends};
    use redirect::nft::{diff_script, patch_script};
    let cfg = redirect::Config {
        table: "lightpath".into(),
        listener_v4: "127.0.0.1:15001".parse().expect("literal"),
        listener_v6: None,
        mark: 1,
        upstream_mark: 2,
        route_table: 100,
        keep_client_source: true,
    };
    let (first, mut next) = updates();
    let mut g = c.benchmark_group("table");
    let mut prev = first.clone();
    let installed = kernel_frontends(&first);
    g.bench_function("kernel_changes_after_one_slice_update_in_10k", |b| {
        b.iter_batched(
            || {
                let table = next();
                (std::mem::replace(&mut prev, table.clone()), table)
            },
            |(old, new)| patch_script(&cfg, &installed, &kernel_changes(&new, &old)),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    per_update(
        c,
        "kernel_rules_rebuilt_after_one_slice_update_in_10k",
        &mut next,
        |t| diff_script(&cfg, &installed, &kernel_frontends(&t)),
    );
}

criterion_group!(
    benches,
    full_build,
    one_slice_update,
    port_diff,
    balancers_sync,
    l7_sync,
    node_stats,
    kernel_rules
);
criterion_main!(benches);
