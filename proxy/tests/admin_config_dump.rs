//! `/config_dump` and `/endpoints` follow a manifest file edited on disk
//! (control's `watch_manifests`), and bad queries get clear answers.

mod admin_util;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use admin_util::*;
use lightpath::admin::{self, AdminState};
use lightpath::health::{ProxyHealth, DEFAULT_HEALTH_TIMEOUT};
use lightpath::lifecycle::Readiness;

const NODE: &str = "node-a";

fn manifest(extra_endpoint: bool) -> String {
    let mut s = String::from(
        r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: dump}
spec:
  clusterIP: 10.96.50.1
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: dump
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- addresses: [10.244.5.1]
  conditions: {ready: true}
  nodeName: node-a
"#,
    );
    if extra_endpoint {
        s.push_str(
            r#"- addresses: [10.244.5.2]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-b
---
apiVersion: v1
kind: Service
metadata: {name: added, namespace: dump}
spec:
  clusterIP: 10.96.50.2
  ports:
  - {port: 443, protocol: TCP}
"#,
        );
    }
    s
}

struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_reflects_a_manifest_change() {
    let file = TempFile(std::env::temp_dir().join(format!(
        "lp-admin-dump-{}-{}.yaml",
        std::process::id(),
        free_port()
    )));
    std::fs::write(&file.0, manifest(false)).unwrap();
    let opts = control::Options {
        node_name: NODE.into(),
        ..Default::default()
    };
    let (rx, source) =
        control::watch_manifests(vec![file.0.clone()], opts, Duration::from_millis(50))
            .expect("manifests load");
    let mut state = AdminState::new(
        rx,
        Readiness::new(),
        ProxyHealth::new(DEFAULT_HEALTH_TIMEOUT),
    );
    state.settings = serde_json::json!({"manifests": [file.0.display().to_string()]});
    let srv = admin::spawn(loopback_config(), state).expect("admin spawn");
    let admin = srv.admin_addr().unwrap();

    let r = get(admin, "/config_dump").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let before = r.json();
    let v1 = before["version"].as_u64().unwrap();
    let table = before["table"].as_array().unwrap();
    assert_eq!(table.len(), 1, "{before}");
    assert_eq!(table[0]["key"]["ip"], "10.96.50.1");
    assert_eq!(table[0]["key"]["port"], 80);
    assert_eq!(table[0]["service"]["name"]["name"], "web");
    assert_eq!(
        table[0]["service"]["cluster_endpoints"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        before["settings"]["manifests"][0],
        file.0.display().to_string()
    );
    assert_eq!(before["readiness"]["ready"], true);
    assert_eq!(before["ejections"], serde_json::json!([]));

    // Edit the file: one more (terminating) endpoint and one more service.
    std::fs::write(&file.0, manifest(true)).unwrap();
    let start = Instant::now();
    let after = loop {
        let v = get(admin, "/config_dump").await.json();
        if v["version"].as_u64().unwrap() > v1 {
            break v;
        }
        assert!(start.elapsed() < DEADLINE, "config_dump never changed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let table = after["table"].as_array().unwrap();
    assert_eq!(table.len(), 2, "{after}");
    let added = table
        .iter()
        .find(|f| f["service"]["name"]["name"] == "added")
        .expect("new service in config_dump");
    assert_eq!(added["key"]["port"], 443);
    // No endpoints at all: the kernel rejects (kube-proxy's REJECT).
    assert_eq!(added["verdict"], "reject", "{added}");
    let web = table
        .iter()
        .find(|f| f["service"]["name"]["name"] == "web")
        .unwrap();
    assert!(web["verdict"].is_null(), "{web}");

    // /endpoints for one service, with the new endpoint's state.
    let r = get(admin, "/endpoints?service=dump%2Fweb").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let eps = v[0]["cluster_endpoints"].as_array().unwrap();
    // Ready endpoints only: the terminating one is a fallback, unused while
    // a ready one exists.
    assert_eq!(eps.len(), 1, "{v}");
    assert_eq!(eps[0]["addr"], "10.244.5.1:8080");
    assert_eq!(v[0]["service"]["port"], "http");
    assert_eq!(
        get(admin, "/endpoints?service=dump/web:http").await.status,
        200
    );

    // Unknown service, missing and malformed parameters.
    let r = get(admin, "/endpoints?service=dump/nope").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("dump/nope"), "{}", r.body);
    let r = get(admin, "/endpoints").await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("service=namespace/name"), "{}", r.body);
    let r = get(admin, "/endpoints?service=justaname").await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("justaname"), "{}", r.body);

    // A broken edit keeps the last good table.
    std::fs::write(&file.0, "kind: Service\nmetadata: {name: [broken").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still = get(admin, "/config_dump").await.json();
    assert_eq!(still["version"], after["version"]);
    assert_eq!(still["table"].as_array().unwrap().len(), 2);

    // Index and unknown paths.
    assert_eq!(get(admin, "/").await.status, 200);
    assert_eq!(get(admin, "/nope").await.status, 404);
    source.abort();
    drop(srv);
}
