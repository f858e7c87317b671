//! Table build cost: the full build of a 10,000-service × 10-endpoint
//! cluster from Kubernetes objects, and one incremental EndpointSlice update
//! against that built state (must not rebuild the table: targets < 1 s and
//! < 1 ms). Then what the data plane does with each new table: the
//! balancers' sync, which runs once per table version.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

use control::{synth, ClusterState, Options};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lightpath::balance::{BalanceConfig, Balancers};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn opts() -> Options {
    Options {
        node_name: "node-1".into(),
        ..Options::default()
    }
}

/// A store for this node holding `svcs` and `slices` (the objects as a
/// fresh watch would deliver them: every Service, then every slice).
fn loaded(svcs: Vec<Service>, slices: Vec<EndpointSlice>) -> ClusterState {
    let mut st = ClusterState::new(opts());
    for s in svcs {
        st.upsert_service(s).unwrap();
    }
    for s in slices {
        st.upsert_slice(s).unwrap();
    }
    st
}

fn full_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("table");
    g.sample_size(10);
    g.bench_function("full_build_10k_services_x10", |b| {
        b.iter_batched(
            || synth::cluster(SERVICES, ENDPOINTS),
            |(svcs, slices)| {
                let mut st = loaded(svcs, slices);
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
    let mut st = loaded(svcs, slices);
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

/// `Balancers::sync` of a 10,000-service table in which one EndpointSlice
/// changed (the table itself is built outside the timing).
fn balancers_sync(c: &mut Criterion) {
    let (svcs, slices) = synth::cluster(SERVICES, ENDPOINTS);
    let mut st = loaded(svcs, slices);
    let balancers = Balancers::new(BalanceConfig::default());
    assert_eq!(balancers.sync(&st.snapshot()), SERVICES as usize);
    let mut g = c.benchmark_group("table");
    let mut generation = 0u32;
    g.bench_function("balancers_sync_after_one_slice_update_in_10k", |b| {
        b.iter_batched(
            || {
                st.upsert_slice(next_slice(&mut generation)).unwrap();
                st.snapshot()
            },
            |table| balancers.sync(&table),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, full_build, one_slice_update, balancers_sync);
criterion_main!(benches);
