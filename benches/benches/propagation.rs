//! Kubernetes source: update propagation, and memory/CPU at scale.
//!
//! Why two processes: the fake API server (`fakeapi`) holds every object
//! as JSON plus its change history; measured in the same process it would
//! swamp the source's own footprint. So this binary re-executes itself as a
//! child that serves the fake cluster, and the parent is exactly what a
//! node runs: a `kube::Client` from a kubeconfig, `control::kube::watch_cluster`
//! and the published table.
//!
//! Measured (parent):
//! - initial sync: wall time, CPU time and RSS to load N services with
//!   E endpoints each through list+watch;
//! - propagation: `PUT` of one EndpointSlice (a new endpoint address) to the
//!   fake API server → that address visible in the published table (the data
//!   plane reads the table per connection, so visible = used by the next
//!   connection), p50/p90/p99/max over many updates;
//! - steady state: RSS and CPU% while idle after the updates;
//! - criterion: the same propagation, as `kube/endpointslice_update`.
//!
//! `cargo bench -p lightpath-benches --bench propagation` runs the full scale
//! (10,000 services / 100,000 endpoints); without `--bench` (as under
//! `cargo test --all-targets`) it is a small smoke run. Override with
//! `LP_BENCH_SERVICES`, `LP_BENCH_ENDPOINTS_PER_SERVICE`, `LP_BENCH_UPDATES`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::kube::KubeSource;
use control::{FrontendKey, Options, Protocol, Table};
use criterion::Criterion;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use serde_json::{json, Value};

const CHILD_ENV: &str = "LP_BENCH_FAKEAPI_CHILD";
const NODE: &str = "bench-node";
/// Bound on any single wait (sync, one update).
const WAIT: Duration = Duration::from_secs(120);

fn service_ip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

/// A unique address per (initial) endpoint index, and per update index.
fn endpoint_ip(k: usize, base: usize) -> String {
    format!("10.{}.{}.{}", base + k / 65536, (k / 256) % 256, k % 256)
}

fn slice_json(i: usize, ips: &[String]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "other-node"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("s{i}-abcde"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("s{i}"),
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn initial_ips(i: usize, per: usize) -> Vec<String> {
    (0..per).map(|j| endpoint_ip(i * per + j, 128)).collect()
}

/// Child: serve the fake cluster until stdin closes (the parent exited).
fn child(services: usize, per: usize, kubeconfig: PathBuf) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let api = fakeapi::FakeApi::start().await.expect("start fakeapi");
        api.apply_json(
            fakeapi::Kind::Node,
            json!({"metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "z1"}},
                   "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}),
        )
        .expect("node");
        let objs = (0..services).flat_map(|i| {
            [
                (
                    fakeapi::Kind::Service,
                    json!({"metadata": {"name": format!("s{i}"), "namespace": "bench", "labels": {"app": format!("s{i}")}},
                           "spec": {"type": "ClusterIP", "clusterIP": service_ip(i), "clusterIPs": [service_ip(i)],
                                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
                ),
                (fakeapi::Kind::EndpointSlice, slice_json(i, &initial_ips(i, per))),
            ]
        });
        api.apply_many(objs).expect("load");
        api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        println!("READY");
        let _ = std::io::stdout().flush();
        // Serve until the parent closes our stdin.
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                line.clear();
            }
        })
        .await
        .ok();
    });
}

/// The child process, killed on drop.
struct Fake {
    child: Child,
    kubeconfig: PathBuf,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn spawn_fake(services: usize, per: usize) -> Fake {
    let kubeconfig =
        std::env::temp_dir().join(format!("lp-bench-kubeconfig-{}.yaml", std::process::id()));
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .env(
            CHILD_ENV,
            format!("{services},{per},{}", kubeconfig.display()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn fake API server child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("child ready line");
    assert_eq!(line.trim(), "READY", "fake API server child did not start");
    Fake { child, kubeconfig }
}

/// (VmRSS, VmHWM) in MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Process CPU time (user + system). /proc reports USER_HZ (100) ticks.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of those.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    Duration::from_millis(ticks * 10)
}

fn key(i: usize) -> FrontendKey {
    FrontendKey::new(
        format!("{}:80", service_ip(i)).parse().expect("addr"),
        Protocol::Tcp,
    )
}

fn has_endpoint(t: &Table, i: usize, ip: &str) -> bool {
    t.lookup(&key(i)).is_some_and(|f| {
        f.service
            .cluster_endpoints
            .iter()
            .any(|e| e.addr.ip().to_string() == ip)
    })
}

struct Updater {
    api: Api<EndpointSlice>,
    table: control::TableRx,
    services: usize,
    per: usize,
    next: AtomicUsize,
}

impl Updater {
    /// One update: replace service i's slice with one new endpoint address,
    /// then wait until the published table contains it.
    async fn one(&self) -> Duration {
        let u = self.next.fetch_add(1, Ordering::Relaxed);
        let i = (u * 7919) % self.services; // spread over the cluster
        let new_ip = endpoint_ip(u, 200);
        let mut ips = initial_ips(i, self.per);
        ips[0] = new_ip.clone();
        let slice: EndpointSlice = serde_json::from_value(slice_json(i, &ips)).expect("slice");
        let mut rx = self.table.clone();
        rx.mark_unchanged();
        let start = Instant::now();
        self.api
            .replace(&format!("s{i}-abcde"), &PostParams::default(), &slice)
            .await
            .expect("PUT endpointslice");
        tokio::time::timeout(WAIT, rx.wait_for(|t| has_endpoint(t, i, &new_ip)))
            .await
            .expect("update not visible within the bound")
            .expect("source stopped");
        start.elapsed()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let mut it = spec.splitn(3, ',');
        let services = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let per = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let kubeconfig = PathBuf::from(it.next().unwrap_or("kubeconfig.yaml"));
        child(services, per, kubeconfig);
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let services = env_usize("LP_BENCH_SERVICES", if full { 10_000 } else { 200 });
    let per = env_usize("LP_BENCH_ENDPOINTS_PER_SERVICE", 10);
    let updates = env_usize("LP_BENCH_UPDATES", if full { 2_000 } else { 20 });

    let fake = spawn_fake(services, per);
    let rt = lightpath_benches::runtime();
    let (rss0, _) = rss_mib();
    let cpu0 = cpu_time();
    let start = Instant::now();
    let (source, updater): (KubeSource, Arc<Updater>) = rt.block_on(async {
        let client = control::kube::client(Some(&fake.kubeconfig))
            .await
            .expect("client");
        let opts = Options {
            node_name: NODE.into(),
            ..Options::default()
        };
        let source = control::kube::watch_cluster(client.clone(), opts);
        let mut ready = source.ready.clone();
        tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
            .await
            .expect("initial sync within the bound")
            .expect("source stopped");
        let updater = Arc::new(Updater {
            api: Api::namespaced(client, "bench"),
            table: source.table.clone(),
            services,
            per,
            next: AtomicUsize::new(0),
        });
        (source, updater)
    });
    let sync_wall = start.elapsed();
    let sync_cpu = cpu_time() - cpu0;
    let (rss_synced, _) = rss_mib();
    let frontends = source.table.borrow().len();
    assert_eq!(frontends, services, "table incomplete after sync");
    let endpoints: usize = source
        .table
        .borrow()
        .frontends
        .values()
        .map(|f| f.service.cluster_endpoints.len())
        .sum();
    assert_eq!(endpoints, services * per, "endpoints missing after sync");

    // Propagation, sequential updates.
    let mut lat: Vec<Duration> = rt.block_on(async {
        let mut v = Vec::with_capacity(updates);
        for _ in 0..updates {
            v.push(updater.one().await);
        }
        v
    });
    lat.sort();

    // Steady state: idle for a while, then read memory and CPU.
    let idle = if full {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(1)
    };
    let cpu_before_idle = cpu_time();
    rt.block_on(async { tokio::time::sleep(idle).await });
    let idle_cpu = cpu_time() - cpu_before_idle;
    let (rss_steady, rss_peak) = rss_mib();

    println!(
        "kube source: {services} services / {} endpoints, {updates} updates",
        services * per
    );
    println!(
        "  initial sync: {} wall, {} CPU; RSS {rss0:.1} MiB before, {rss_synced:.1} MiB after",
        ms(sync_wall),
        ms(sync_cpu)
    );
    println!(
        "  propagation (PUT EndpointSlice -> endpoint in published table): p50 {} p90 {} p99 {} max {}",
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.90)),
        ms(percentile(&lat, 0.99)),
        ms(percentile(&lat, 1.0)),
    );
    println!(
        "  steady state: RSS {rss_steady:.1} MiB (peak {rss_peak:.1} MiB), idle CPU {:.2}% of one core over {idle:?}",
        idle_cpu.as_secs_f64() / idle.as_secs_f64() * 100.0
    );
    // The target is checked at full scale only; the smoke run under
    // `cargo test` proves the path works, not its speed.
    if full {
        assert!(
            percentile(&lat, 0.99) < Duration::from_millis(100),
            "propagation p99 over the 100 ms target"
        );
    }

    if full {
        let mut c = Criterion::default()
            .configure_from_args()
            .sample_size(20)
            .measurement_time(Duration::from_secs(10));
        c.bench_function("kube/endpointslice_update_to_table", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += updater.one().await;
                    }
                    total
                })
            })
        });
        c.final_summary();
    }
    drop(source);
    drop(fake);
}
