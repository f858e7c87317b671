//! The operator's view of `lightpath run --kubeconfig` while the cluster is
//! slow or the node is going away, probed over real sockets:
//!
//! - during a slow initial sync (fakeapi holds its list answers) `/ready`
//!   is 503 naming the watches still listing and the rules not yet applied,
//!   `/livez` is 200 throughout, and `/ready` turns 200 once the lists come;
//! - a signal during that sync exits 0 without touching anything;
//! - the Node tainted `ToBeDeletedByClusterAutoscaler`, or given a deletion
//!   timestamp, fails `/healthz` (kube-proxy's status, JSON and headers)
//!   while `/livez` stays 200, and clearing it passes `/healthz` again.
//!
//! Loopback only: the binary runs in the test's own namespace with
//! `--no-redirect` (no kernel rules) and every listener on 127.0.0.1 port 0;
//! the bound addresses come from its JSON log lines.

mod admin_util;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use admin_util::{get, parse_prometheus, sample, Reply};
use fakeapi::{FakeApi, Kind};
use serde_json::{json, Value};

/// Bound on every wait in this file.
const WAIT: Duration = Duration::from_secs(20);

fn node(taints: &[&str], deleting: bool) -> Value {
    let mut n = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-a"},
        "spec": {"taints": taints.iter().map(|k| json!({"key": k, "effect": "NoSchedule"})).collect::<Vec<_>>()},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.1"}]},
    });
    if deleting {
        n["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        n["metadata"]["finalizers"] = json!(["example.com/hold"]);
    }
    n
}

fn seed(api: &FakeApi) {
    api.apply_json(Kind::Node, node(&[], false)).expect("node");
    api.apply_json(
        Kind::Service,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        }),
    )
    .expect("service");
    api.apply_json(
        Kind::EndpointSlice,
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.2"], "conditions": {"ready": true}, "nodeName": "node-a"}],
        }),
    )
    .expect("slice");
}

/// `lightpath run` as a child process, its JSON log lines collected.
struct Lightpath {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("lp-kh-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// Writes `name` atomically (a polling reader never sees half a file).
    fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, &path).expect("rename manifest");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Lightpath {
    fn start(api: &FakeApi, tag: &str) -> Lightpath {
        let dir = TempDir::new(tag);
        let kubeconfig = dir.0.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        Self::spawn(dir, &["--kubeconfig".as_ref(), kubeconfig.as_os_str()])
    }

    /// `lightpath run` on manifest files, polled every 50 ms.
    fn start_manifests(dir: TempDir, manifest: &std::path::Path) -> Lightpath {
        let args = ["--manifests".as_ref(), manifest.as_os_str()];
        let poll = ["--manifest-poll-ms".as_ref(), "50".as_ref()];
        Self::spawn(dir, &[&args[..], &poll[..]].concat())
    }

    fn spawn(dir: TempDir, source: &[&std::ffi::OsStr]) -> Lightpath {
        let any = "127.0.0.1:0";
        let mut child = Command::new(env!("CARGO_BIN_EXE_lightpath"))
            .args(["run", "--node-name", "node-a"])
            .args(source)
            .args(["--no-redirect", "--no-ipv6", "--no-service-health"])
            .args(["--listen", any, "--admin-addr", any, "--metrics-addr", any])
            .args(["--health-addr", any, "--drain-timeout", "1"])
            .args(["--log-format", "json", "--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lightpath");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(v);
            }
        });
        Lightpath { child, lines, dir }
    }

    fn log(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The `addr` of the first log line whose message is `message`.
    async fn addr(&mut self, message: &str) -> SocketAddr {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = {
                let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
                lines
                    .iter()
                    .find(|v| v["message"] == message)
                    .and_then(|v| v["addr"].as_str()?.parse().ok())
            };
            if let Some(a) = found {
                return a;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "lightpath exited ({status}) before {message:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {message:?} log line within {WAIT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal lightpath");
    }

    async fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("lightpath did not exit within {WAIT:?}:\n{}", self.log());
    }
}

impl Drop for Lightpath {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GETs `path` until `done` holds for the reply (bounded by [`WAIT`]).
async fn until(addr: SocketAddr, path: &str, done: impl Fn(&Reply) -> bool) -> Reply {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = get(addr, path).await;
        if done(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "http://{addr}{path}: condition not met within {WAIT:?}; last {} {}",
            r.status,
            r.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn waiting_for(r: &Reply) -> Vec<String> {
    serde_json::from_value(r.json()["waiting_for"].clone()).expect("waiting_for is a list")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_says_what_a_slow_initial_sync_waits_for() {
    let api = FakeApi::start().await.expect("fakeapi");
    seed(&api);
    api.hold_lists(Kind::EndpointSlice, true);
    api.hold_lists(Kind::Node, true);
    let mut lp = Lightpath::start(&api, "sync");
    let admin = lp.addr("admin API listening").await;
    let health = lp.addr("health server listening").await;
    let metrics = lp.addr("metrics listening").await;

    // The servers answer before the sync: liveness and kube-proxy's
    // /healthz (healthy while starting up), but not readiness.
    let live = get(health, "/livez").await;
    assert_eq!(live.status, 200, "/livez during the sync: {}", live.body);
    assert_eq!(get(health, "/healthz").await.status, 200);
    // Services list at once; the held kinds are still named.
    let r = until(admin, "/ready", |r| {
        !waiting_for(r).contains(&"initial sync of services".to_string())
    })
    .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(
        waiting_for(&r),
        [
            "initial sync of endpointslices",
            "initial sync of nodes",
            "listeners serving",
            "redirect rules"
        ],
        "{}",
        r.body
    );
    let reason = r.json()["reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.starts_with("waiting for initial sync of endpointslices"),
        "{reason}"
    );
    assert_eq!(r.json()["draining"], false);
    assert_eq!(get(health, "/readyz").await.status, 503);
    // Prometheus sees the same from the metrics listener.
    let m = get(metrics, "/metrics").await;
    assert_eq!(m.status, 200);
    let scrape = parse_prometheus(&m.body);
    let synced = |r: &str| sample(&scrape, "lightpath_kube_synced", &[("resource", r)]);
    assert_eq!(synced("services"), Some(1.0), "{}", m.body);
    assert_eq!(synced("endpointslices"), Some(0.0), "{}", m.body);
    // Still held a while later: the answer is not a race with the sync.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(admin, "/ready").await.status, 503);
    assert_eq!(get(health, "/livez").await.status, 200);

    api.hold_lists(Kind::Node, false);
    let r = until(admin, "/ready", |r| {
        !waiting_for(r).contains(&"initial sync of nodes".to_string())
    })
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(waiting_for(&r)[0], "initial sync of endpointslices");

    api.hold_lists(Kind::EndpointSlice, false);
    let r = until(admin, "/ready", |r| r.status == 200).await;
    assert_eq!(r.json()["reason"], "ready");
    assert!(waiting_for(&r).is_empty());
    assert_eq!(get(health, "/readyz").await.status, 200);
    assert_eq!(get(health, "/livez").await.status, 200);
    // What it waited for is what it now serves.
    let eps = get(admin, "/endpoints?service=default/web").await;
    assert_eq!(eps.status, 200, "{}", eps.body);
    assert!(eps.body.contains("10.244.1.2:8080"), "{}", eps.body);

    lp.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(lp.exit_code().await, Some(0), "{}", lp.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_during_the_initial_sync_exits_cleanly() {
    let api = FakeApi::start().await.expect("fakeapi");
    seed(&api);
    for kind in [Kind::Service, Kind::EndpointSlice, Kind::Node] {
        api.hold_lists(kind, true);
    }
    let mut lp = Lightpath::start(&api, "sig");
    let admin = lp.addr("admin API listening").await;
    let r = get(admin, "/ready").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        waiting_for(&r).contains(&"initial sync of services".to_string()),
        "{}",
        r.body
    );
    lp.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(lp.exit_code().await, Some(0), "{}", lp.log());
    assert!(
        lp.log().contains("stopped before the initial sync"),
        "{}",
        lp.log()
    );
}

/// kube-proxy's proxy health answer: JSON with these headers.
fn assert_kube_proxy_shape(r: &Reply) {
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{r:?}");
    let v = r.json();
    for key in ["lastUpdated", "currentTime"] {
        let t = v[key].as_str().unwrap_or_else(|| panic!("{key} in {v}"));
        assert!(t.ends_with('Z'), "{key} = {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_going_away_fails_healthz_but_not_livez() {
    let api = FakeApi::start().await.expect("fakeapi");
    seed(&api);
    let mut lp = Lightpath::start(&api, "node");
    let admin = lp.addr("admin API listening").await;
    let health = lp.addr("health server listening").await;
    until(admin, "/ready", |r| r.status == 200).await;

    let h = get(health, "/healthz").await;
    assert_eq!(h.status, 200, "{}", h.body);
    assert_kube_proxy_shape(&h);
    assert_eq!(h.json()["nodeEligible"], true);

    // The cluster autoscaler marks the node for removal.
    api.apply_json(
        Kind::Node,
        node(&[control::kube::node::TO_BE_DELETED_TAINT], false),
    )
    .expect("taint node");
    let h = until(health, "/healthz", |r| r.status == 503).await;
    assert_kube_proxy_shape(&h);
    assert_eq!(h.json()["nodeEligible"], false, "{}", h.body);
    // The proxy itself is fine: liveness, the admin API's /livez, and the
    // service proxy's own health stay up.
    let l = get(health, "/livez").await;
    assert_eq!(l.status, 200, "{}", l.body);
    assert_kube_proxy_shape(&l);
    assert!(l.json().get("nodeEligible").is_none(), "{}", l.body);
    assert_eq!(get(admin, "/livez").await.status, 200);
    assert_eq!(get(admin, "/healthz").await.status, 503);
    assert_eq!(get(admin, "/ready").await.status, 200);

    // Scale-down cancelled: the taint goes, /healthz passes again.
    api.apply_json(
        Kind::Node,
        node(&["node.kubernetes.io/unschedulable"], false),
    )
    .expect("untaint node");
    let h = until(health, "/healthz", |r| r.status == 200).await;
    assert_eq!(h.json()["nodeEligible"], true);

    // Deleted (held by a finalizer): not eligible either.
    api.apply_json(Kind::Node, node(&[], true))
        .expect("delete node");
    let h = until(health, "/healthz", |r| r.status == 503).await;
    assert_eq!(h.json()["nodeEligible"], false, "{}", h.body);
    assert_eq!(get(health, "/livez").await.status, 200);
    assert!(
        lp.log().contains("node eligibility changed"),
        "{}",
        lp.log()
    );

    lp.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(lp.exit_code().await, Some(0), "{}", lp.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tainted_node_manifest_fails_healthz_but_not_livez() {
    let dir = TempDir::new("manifest");
    let docs = |node: Value| {
        let svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
        });
        format!("{node}\n---\n{svc}\n")
    };
    let path = dir.write("cluster.yaml", &docs(node(&[], false)));
    let mut lp = Lightpath::start_manifests(dir, &path);
    let admin = lp.addr("admin API listening").await;
    let health = lp.addr("health server listening").await;
    until(admin, "/ready", |r| r.status == 200).await;
    assert_eq!(get(health, "/healthz").await.status, 200);
    let dir = &lp.dir;

    dir.write(
        "cluster.yaml",
        &docs(node(&[control::kube::node::TO_BE_DELETED_TAINT], false)),
    );
    let h = until(health, "/healthz", |r| r.status == 503).await;
    assert_kube_proxy_shape(&h);
    assert_eq!(h.json()["nodeEligible"], false, "{}", h.body);
    assert_eq!(get(health, "/livez").await.status, 200);

    dir.write("cluster.yaml", &docs(node(&[], false)));
    let h = until(health, "/healthz", |r| r.status == 200).await;
    assert_eq!(h.json()["nodeEligible"], true);

    lp.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(lp.exit_code().await, Some(0), "{}", lp.log());
}
