//! The Kubernetes source against `fakeapi`, through a real `kube::Client`
//! built from a kubeconfig: the production watch path runs unchanged.
//!
//! Every wait is bounded by [`WAIT`]; the API-server outage tests rely on the
//! watcher's default backoff (0.8 s doubling), so they take a few seconds.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use control::kube::KubeSource;
use control::{FrontendKey, Options, Protocol, Table};
use fakeapi::{FakeApi, Kind};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const NODE: &str = "node-a";

/// A kubeconfig file removed on drop.
struct Kubeconfig(PathBuf);

impl Drop for Kubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn kubeconfig_for(api: &FakeApi) -> Kubeconfig {
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "lp-kubeconfig-{}-{}.yaml",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    api.write_kubeconfig(&path).expect("write kubeconfig");
    Kubeconfig(path)
}

fn opts() -> Options {
    Options {
        node_name: NODE.into(),
        ..Options::default()
    }
}

async fn source(api: &FakeApi, opts: Options) -> (KubeSource, Kubeconfig) {
    let kc = kubeconfig_for(api);
    let client = control::kube::client(Some(&kc.0))
        .await
        .expect("kube client from the fake's kubeconfig");
    (control::kube::watch_cluster(client, opts), kc)
}

fn svc_json(name: &str, ip: &str, labels: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
            "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    })
}

fn svc(name: &str, ip: &str) -> Service {
    serde_json::from_value(svc_json(name, ip, json!({}))).expect("service")
}

fn labelled_svc(name: &str, ip: &str, proxy: &str) -> Service {
    let labels = json!({"service.kubernetes.io/service-proxy-name": proxy});
    serde_json::from_value(svc_json(name, ip, labels)).expect("service")
}

fn slice_json(name: &str, service: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-b"}))
        .collect();
    json!({
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
    serde_json::from_value(slice_json(name, service, ips)).expect("slice")
}

fn node(ip: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }))
    .expect("node")
}

fn key(ip: &str, port: u16) -> FrontendKey {
    let addr: SocketAddr = format!("{ip}:{port}").parse().expect("addr");
    FrontendKey::new(addr, Protocol::Tcp)
}

/// The cluster endpoints of `ip:port`, in table order (duplicates kept, so
/// a relist that doubled an endpoint is visible).
fn eps(t: &Table, ip: &str, port: u16) -> Option<Vec<SocketAddr>> {
    t.lookup(&key(ip, port))
        .map(|f| f.service.cluster_endpoints.iter().map(|e| e.addr).collect())
}

fn set(addrs: &[&str]) -> Option<Vec<SocketAddr>> {
    let s: BTreeSet<SocketAddr> = addrs
        .iter()
        .map(|a| format!("{a}:8080").parse().expect("addr"))
        .collect();
    Some(s.into_iter().collect())
}

fn sorted(v: Option<Vec<SocketAddr>>) -> Option<Vec<SocketAddr>> {
    v.map(|mut v| {
        v.sort();
        v
    })
}

fn summary(t: &Table) -> String {
    t.sorted()
        .iter()
        .map(|f| {
            format!(
                "{} -> {:?}",
                f.key,
                f.endpoints().iter().map(|e| e.addr).collect::<Vec<_>>()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

async fn wait_table(src: &KubeSource, what: &str, pred: impl Fn(&Table) -> bool) -> Arc<Table> {
    let mut rx = src.table.clone();
    let res = tokio::time::timeout(WAIT, rx.wait_for(|t| pred(t)))
        .await
        .map(|r| r.map(|t| t.clone()));
    match res {
        Ok(Ok(t)) => t,
        Ok(Err(_)) => panic!("kube source stopped while waiting for {what}"),
        Err(_) => {
            let t = src.table.borrow().clone();
            panic!(
                "timed out after {WAIT:?} waiting for {what}; table v{}: {}",
                t.version,
                summary(&t)
            )
        }
    }
}

async fn wait_ready(src: &KubeSource) {
    let mut ready = src.ready.clone();
    let res = tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
        .await
        .map(|r| r.map(|_| ()));
    match res {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("kube source stopped before ready"),
        Err(_) => panic!("not ready after {WAIT:?}"),
    }
}

async fn fake() -> FakeApi {
    FakeApi::start().await.expect("start fakeapi")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_scale_delete_touches_only_that_service() {
    let api = fake().await;
    api.apply(&node("192.0.2.10")).unwrap();
    api.apply(&svc("a", "10.96.0.10")).unwrap();
    api.apply(&slice("a-1", "a", &["10.1.0.1", "10.1.0.2"]))
        .unwrap();
    api.apply(&svc("b", "10.96.0.11")).unwrap();
    api.apply(&slice("b-1", "b", &["10.1.1.1"])).unwrap();
    let (src, _kc) = source(&api, opts()).await;
    wait_ready(&src).await;
    let t0 = src.table.borrow().clone();
    assert_eq!(
        eps(&t0, "10.96.0.10", 80),
        set(&["10.1.0.1", "10.1.0.2"]),
        "{}",
        summary(&t0)
    );
    assert_eq!(eps(&t0, "10.96.0.11", 80), set(&["10.1.1.1"]));
    let b0 = t0.lookup(&key("10.96.0.11", 80)).unwrap().service.clone();

    // A new NodePort service appears on the Node's InternalIP (from the Node watch).
    let np: Service = serde_json::from_value(json!({
        "metadata": {"name": "np", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.12", "clusterIPs": ["10.96.0.12"],
                 "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}]},
    }))
    .unwrap();
    api.apply(&np).unwrap();
    api.apply(&slice("np-1", "np", &["10.1.2.1"])).unwrap();
    // The Service and its slice come on separate watches and may be
    // published in different batches (the coalescing window is 2 ms), so
    // wait for the state asserted: both of np's rows with its endpoint.
    let np_eps = set(&["10.1.2.1"]);
    let t = wait_table(&src, "np's endpoint on its ClusterIP and NodePort", |t| {
        eps(t, "10.96.0.12", 80) == np_eps && eps(t, "192.0.2.10", 30080) == np_eps
    })
    .await;
    assert_eq!(eps(&t, "10.96.0.12", 80), np_eps, "{}", summary(&t));
    assert_eq!(eps(&t, "192.0.2.10", 30080), np_eps, "{}", summary(&t));
    assert!(
        Arc::ptr_eq(&t.lookup(&key("10.96.0.11", 80)).unwrap().service, &b0),
        "b's ServicePort was rebuilt by np's creation"
    );

    // Scale a up: only a's row changes; b keeps the very same Arc.
    api.apply(&slice("a-1", "a", &["10.1.0.1", "10.1.0.2", "10.1.0.3"]))
        .unwrap();
    let t1 = wait_table(&src, "a scaled to 3", |t| {
        eps(t, "10.96.0.10", 80).is_some_and(|e| e.len() == 3)
    })
    .await;
    assert_eq!(
        sorted(eps(&t1, "10.96.0.10", 80)),
        set(&["10.1.0.1", "10.1.0.2", "10.1.0.3"])
    );
    assert!(
        Arc::ptr_eq(&t1.lookup(&key("10.96.0.11", 80)).unwrap().service, &b0),
        "b's ServicePort was rebuilt by a's scale-up"
    );

    // Scale a down to one.
    api.apply(&slice("a-1", "a", &["10.1.0.3"])).unwrap();
    let t2 = wait_table(&src, "a scaled to 1", |t| {
        eps(t, "10.96.0.10", 80) == set(&["10.1.0.3"])
    })
    .await;
    assert!(Arc::ptr_eq(
        &t2.lookup(&key("10.96.0.11", 80)).unwrap().service,
        &b0
    ));

    // Delete a: its frontend is gone, b untouched.
    api.delete::<Service>("default", "a").unwrap();
    api.delete::<EndpointSlice>("default", "a-1").unwrap();
    let t3 = wait_table(&src, "a deleted", |t| {
        t.lookup(&key("10.96.0.10", 80)).is_none()
    })
    .await;
    assert!(Arc::ptr_eq(
        &t3.lookup(&key("10.96.0.11", 80)).unwrap().service,
        &b0
    ));
    assert!(t3.version > t0.version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_and_nothing_published_until_every_initial_list_completes() {
    // 1,200 services and slices: three list pages each (watcher page size
    // 500), so a source that published per page would be caught.
    const N: usize = 1200;
    let api = fake().await;
    let objs = (0..N).flat_map(|i| {
        let ip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
        let ep = format!("10.2.{}.{}", i / 250, i % 250 + 1);
        [
            (Kind::Service, svc_json(&format!("s{i}"), &ip, json!({}))),
            (
                Kind::EndpointSlice,
                slice_json(&format!("s{i}-1"), &format!("s{i}"), &[&ep]),
            ),
        ]
    });
    api.apply_many(objs).unwrap();
    api.apply(&node("192.0.2.10")).unwrap();
    api.stop().await;

    let (src, _kc) = source(&api, opts()).await;
    // Watch every snapshot the source publishes.
    let mut rx = src.table.clone();
    let seen = tokio::spawn(async move {
        let mut lens = Vec::new();
        while tokio::time::timeout(WAIT, rx.changed())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            let len = rx.borrow_and_update().len();
            lens.push(len);
            if len == N {
                break;
            }
        }
        lens
    });

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !*src.ready.borrow(),
        "ready while the API server is unreachable"
    );
    assert!(src.table.borrow().is_empty(), "published without any list");

    api.restart().await.unwrap();
    wait_ready(&src).await;
    assert_eq!(
        src.table.borrow().len(),
        N,
        "ready before the table was complete"
    );
    let lens = seen.await.unwrap();
    assert_eq!(lens, vec![N], "partial views were published: {lens:?}");
    assert!(
        api.list_requests(Kind::Service) >= 3,
        "expected paginated lists"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_restart_keeps_serving_then_converges() {
    let api = fake().await;
    api.apply(&node("192.0.2.10")).unwrap();
    for (name, ip, ep) in [
        ("a", "10.96.1.1", "10.3.0.1"),
        ("b", "10.96.1.2", "10.3.0.2"),
        ("c", "10.96.1.3", "10.3.0.3"),
    ] {
        api.apply(&svc(name, ip)).unwrap();
        api.apply(&slice(&format!("{name}-1"), name, &[ep]))
            .unwrap();
    }
    let (src, _kc) = source(&api, opts()).await;
    wait_ready(&src).await;
    let before = src.table.borrow().clone();
    assert_eq!(before.len(), 3);

    // Outage 1: the API server restarts with its history intact, so the
    // watches resume from their resourceVersion and replay the changes.
    api.stop().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        Arc::ptr_eq(&src.table.borrow(), &before),
        "table changed while the API server was down"
    );
    assert_eq!(
        eps(&src.table.borrow(), "10.96.1.1", 80),
        set(&["10.3.0.1"]),
        "last table no longer served"
    );
    api.apply(&slice("a-1", "a", &["10.3.0.1", "10.3.0.11"]))
        .unwrap();
    api.delete::<Service>("default", "c").unwrap();
    api.delete::<EndpointSlice>("default", "c-1").unwrap();
    api.restart().await.unwrap();
    let t = wait_table(&src, "convergence after restart", |t| {
        t.lookup(&key("10.96.1.3", 80)).is_none()
            && eps(t, "10.96.1.1", 80).is_some_and(|e| e.len() == 2)
    })
    .await;
    assert_eq!(
        sorted(eps(&t, "10.96.1.1", 80)),
        set(&["10.3.0.1", "10.3.0.11"])
    );
    assert_eq!(eps(&t, "10.96.1.2", 80), set(&["10.3.0.2"]));

    // Outage 2: the history is compacted meanwhile, so resuming gets 410 and
    // the watches relist. b's deletion produces no event at all; only the
    // relist can reveal it.
    let lists = api.list_requests(Kind::Service);
    api.stop().await;
    api.delete::<Service>("default", "b").unwrap();
    api.delete::<EndpointSlice>("default", "b-1").unwrap();
    api.apply(&svc("d", "10.96.1.4")).unwrap();
    api.apply(&slice("d-1", "d", &["10.3.0.4"])).unwrap();
    api.apply(&slice("a-1", "a", &["10.3.0.11"])).unwrap();
    api.compact();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        src.table.borrow().lookup(&key("10.96.1.2", 80)).is_some(),
        "b vanished before the API server returned"
    );
    api.restart().await.unwrap();
    let t = wait_table(&src, "convergence after relist", |t| {
        // Each watch relists on its own schedule; wait for both.
        t.lookup(&key("10.96.1.2", 80)).is_none()
            && eps(t, "10.96.1.4", 80).is_some_and(|e| !e.is_empty())
            && eps(t, "10.96.1.1", 80).is_some_and(|e| e.len() == 1)
    })
    .await;
    assert!(
        api.list_requests(Kind::Service) > lists,
        "no relist happened"
    );
    assert_eq!(t.len(), 2, "{}", summary(&t));
    assert_eq!(eps(&t, "10.96.1.1", 80), set(&["10.3.0.11"]));
    assert_eq!(eps(&t, "10.96.1.4", 80), set(&["10.3.0.4"]));
    assert!(*src.ready.borrow());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_410_relists_without_duplicate_or_lost_endpoints() {
    let api = fake().await;
    api.apply(&node("192.0.2.10")).unwrap();
    api.apply(&svc("a", "10.96.2.1")).unwrap();
    api.apply(&slice("a-1", "a", &["10.4.0.1", "10.4.0.2"]))
        .unwrap();
    api.apply(&slice("a-2", "a", &["10.4.0.3"])).unwrap();
    api.apply(&svc("b", "10.96.2.2")).unwrap();
    api.apply(&slice("b-1", "b", &["10.4.1.1"])).unwrap();
    let (src, _kc) = source(&api, opts()).await;
    wait_ready(&src).await;
    let lists = [Kind::Service, Kind::EndpointSlice, Kind::Node].map(|k| api.list_requests(k));

    // Every open watch ends with an ERROR 410; changes made before the
    // watcher relists are only visible through the relist.
    api.expire_watches();
    api.delete::<EndpointSlice>("default", "b-1").unwrap();
    api.apply(&slice("a-2", "a", &["10.4.0.3", "10.4.0.4"]))
        .unwrap();
    api.apply(&svc("e", "10.96.2.3")).unwrap();
    api.apply(&slice("e-1", "e", &["10.4.2.1"])).unwrap();

    let want_a = set(&["10.4.0.1", "10.4.0.2", "10.4.0.3", "10.4.0.4"]);
    let t = wait_table(&src, "relist after 410", |t| {
        eps(t, "10.96.2.1", 80).is_some_and(|e| e.len() >= 4) && eps(t, "10.96.2.3", 80).is_some()
    })
    .await;
    // Each watch relists on its own schedule (the Node's may come after the
    // table already converged, since nothing changed there): wait, bounded.
    for (k, before) in [Kind::Service, Kind::EndpointSlice, Kind::Node]
        .into_iter()
        .zip(lists)
    {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while api.list_requests(k) <= before && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            api.list_requests(k) > before,
            "{k:?} was not relisted after 410"
        );
    }
    assert_eq!(
        eps(&t, "10.96.2.1", 80).map(|e| e.len()),
        Some(4),
        "duplicate endpoints: {}",
        summary(&t)
    );
    assert_eq!(sorted(eps(&t, "10.96.2.1", 80)), want_a);
    assert_eq!(
        eps(&t, "10.96.2.2", 80),
        Some(vec![]),
        "b's deleted slice survived the relist"
    );
    assert_eq!(eps(&t, "10.96.2.3", 80), set(&["10.4.2.1"]));

    // The resumed watch still delivers ordinary events afterwards.
    api.apply(&slice("b-1", "b", &["10.4.1.2"])).unwrap();
    wait_table(&src, "event after relist", |t| {
        eps(t, "10.96.2.2", 80) == set(&["10.4.1.2"])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_labelled_for_another_proxy_are_ignored() {
    let api = fake().await;
    api.apply(&svc("plain", "10.96.3.1")).unwrap();
    api.apply(&labelled_svc("other", "10.96.3.2", "kube-proxy-ng"))
        .unwrap();
    api.apply(&labelled_svc("ours", "10.96.3.3", "lightpath"))
        .unwrap();
    let headless: Service = serde_json::from_value(json!({
        "metadata": {"name": "hl", "namespace": "default", "labels": {"service.kubernetes.io/headless": ""}},
        "spec": {"clusterIP": "None", "ports": [{"port": 80}]},
    }))
    .unwrap();
    api.apply(&headless).unwrap();
    let (src, _kc) = source(&api, opts()).await;
    let (hybrid, _kc2) = source(
        &api,
        Options {
            labelled_only: true,
            ..opts()
        },
    )
    .await;
    wait_ready(&src).await;
    wait_ready(&hybrid).await;
    let t = src.table.borrow().clone();
    assert!(t.lookup(&key("10.96.3.1", 80)).is_some(), "{}", summary(&t));
    assert!(
        t.lookup(&key("10.96.3.2", 80)).is_none(),
        "another proxy's service was taken"
    );
    assert!(t.lookup(&key("10.96.3.3", 80)).is_some());
    assert_eq!(t.len(), 2);
    let h = hybrid.table.borrow().clone();
    assert_eq!(h.len(), 1, "labelled-only mode: {}", summary(&h));
    assert!(h.lookup(&key("10.96.3.3", 80)).is_some());

    // Relabelling moves services in and out of both modes.
    api.apply(&labelled_svc("other", "10.96.3.2", "lightpath"))
        .unwrap();
    api.apply(&labelled_svc("ours", "10.96.3.3", "kube-proxy-ng"))
        .unwrap();
    for s in [&src, &hybrid] {
        wait_table(s, "relabelled services", |t| {
            t.lookup(&key("10.96.3.2", 80)).is_some() && t.lookup(&key("10.96.3.3", 80)).is_none()
        })
        .await;
    }
    assert!(src.table.borrow().lookup(&key("10.96.3.1", 80)).is_some());
    assert!(hybrid
        .table
        .borrow()
        .lookup(&key("10.96.3.1", 80))
        .is_none());
}

/// Counter value from the debugging recorder, 0 when never registered.
/// (name, labels, value) of one counter.
type CounterRow = (String, Vec<(String, String)>, u64);

fn counter(snap: &[CounterRow], name: &str, label: (&str, &str)) -> u64 {
    snap.iter()
        .filter(|(n, labels, _)| {
            n == name && labels.iter().any(|(k, v)| k == label.0 && v == label.1)
        })
        .map(|(_, _, v)| *v)
        .sum()
}

#[tokio::test(flavor = "current_thread")]
async fn invalid_slice_is_reported_and_the_rest_still_updates() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    // current_thread: the source task runs on this thread, so the local
    // recorder sees its metrics without touching any global state.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let read = || -> (Vec<CounterRow>, usize) {
        let mut histogram_samples = 0;
        let mut counters = Vec::new();
        for (ck, _, _, v) in snapshotter.snapshot().into_vec() {
            let name = ck.key().name().to_string();
            let labels = ck
                .key()
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            match v {
                DebugValue::Counter(c) => counters.push((name, labels, c)),
                DebugValue::Histogram(h) if name == control::kube::metrics::PROPAGATION => {
                    histogram_samples += h.len()
                }
                _ => {}
            }
        }
        (counters, histogram_samples)
    };

    let api = fake().await;
    api.apply(&svc("a", "10.96.4.1")).unwrap();
    api.apply(&slice("a-1", "a", &["10.5.0.1", "10.5.0.2"]))
        .unwrap();
    api.apply(&svc("b", "10.96.4.2")).unwrap();
    api.apply(&slice("b-1", "b", &["10.5.1.1"])).unwrap();
    let (src, _kc) = source(&api, opts()).await;
    wait_ready(&src).await;

    // a's slice turns invalid; b changes at the same time.
    let bad = slice_json("a-1", "a", &["10.5.0.1", "10.5.0.300"]);
    api.apply_json(Kind::EndpointSlice, bad).unwrap();
    api.apply(&slice("b-1", "b", &["10.5.1.1", "10.5.1.2"]))
        .unwrap();
    let t = wait_table(&src, "b updated despite a's invalid slice", |t| {
        eps(t, "10.96.4.2", 80).is_some_and(|e| e.len() == 2)
    })
    .await;
    assert_eq!(
        sorted(eps(&t, "10.96.4.1", 80)),
        set(&["10.5.0.1", "10.5.0.2"]),
        "a's last good endpoints were not kept"
    );
    // Fixing the slice applies again.
    api.apply(&slice("a-1", "a", &["10.5.0.9"])).unwrap();
    wait_table(&src, "a fixed", |t| {
        eps(t, "10.96.4.1", 80) == set(&["10.5.0.9"])
    })
    .await;
    // One read: the debugging recorder's snapshot drains what it reports.
    let (counters, histogram_samples) = read();
    use control::kube::metrics::{INVALID_OBJECTS, WATCH_EVENTS};
    let invalid_slices = counter(&counters, INVALID_OBJECTS, ("resource", "endpointslices"));
    assert_eq!(invalid_slices, 1, "invalid slice not counted: {counters:?}");
    for event in ["apply", "init_done"] {
        let n = counter(&counters, WATCH_EVENTS, ("event", event));
        assert!(n >= 3, "{n} {event} events: {counters:?}");
    }
    assert!(histogram_samples >= 2, "propagation histogram not recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_reports_each_watch_and_nothing_publishes_before_all() {
    let api = fake().await;
    api.apply(&node("10.0.0.1")).expect("node");
    api.apply(&svc("web", "10.96.0.10")).expect("svc");
    api.apply(&slice("web-1", "web", &["10.244.0.5"]))
        .expect("slice");
    api.hold_lists(Kind::EndpointSlice, true);
    let (src, _kc) = source(&api, opts()).await;

    let mut sync = src.initial_sync.clone();
    let s = *tokio::time::timeout(WAIT, sync.wait_for(|s| s.services && s.nodes))
        .await
        .expect("services and nodes list")
        .expect("source running");
    assert_eq!(s.pending(), ["endpointslices"]);
    assert!(!s.complete());
    // A partial view is never published.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!*src.ready.borrow());
    assert!(src.table.borrow().is_empty());

    api.hold_lists(Kind::EndpointSlice, false);
    wait_ready(&src).await;
    assert!(src.initial_sync.borrow().complete());
    let t = src.table.borrow().clone();
    assert_eq!(eps(&t, "10.96.0.10", 80), set(&["10.244.0.5"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_eligibility_follows_taint_and_deletion() {
    use control::kube::NodeEligibility;
    let api = fake().await;
    api.apply(&node("10.0.0.1")).expect("node");
    let (src, _kc) = source(&api, opts()).await;
    wait_ready(&src).await;
    assert_eq!(*src.node.borrow(), NodeEligibility::Eligible);
    let version = src.table.borrow().version;

    let wait = |want: NodeEligibility| {
        let mut rx = src.node.clone();
        async move {
            tokio::time::timeout(WAIT, rx.wait_for(|n| *n == want))
                .await
                .unwrap_or_else(|_| panic!("node never became {want}"))
                .expect("source running");
        }
    };
    let mut n = serde_json::to_value(node("10.0.0.1")).expect("json");
    n["spec"] =
        json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]});
    api.apply_json(Kind::Node, n.clone()).expect("taint");
    wait(NodeEligibility::ToBeDeletedByClusterAutoscaler).await;

    n["spec"] = json!({});
    api.apply_json(Kind::Node, n.clone()).expect("untaint");
    wait(NodeEligibility::Eligible).await;

    n["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    api.apply_json(Kind::Node, n).expect("deleting");
    wait(NodeEligibility::BeingDeleted).await;

    // Another node's taint is not ours.
    let mut other = serde_json::to_value(node("10.0.0.2")).expect("json");
    other["metadata"]["name"] = json!("node-b");
    other["spec"] =
        json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]});
    api.apply_json(Kind::Node, other).expect("node-b");
    // Eligibility alone never rebuilds the forwarding table.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(src.table.borrow().version, version);
    assert_eq!(*src.node.borrow(), NodeEligibility::BeingDeleted);
}
