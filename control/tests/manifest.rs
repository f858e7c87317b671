//! The manifest-file source: multi-document YAML/JSON, List kinds, and every
//! kind of bad input (each must be a clear error naming file, document,
//! object and field — never a panic), plus the watch loop keeping the last
//! good table across a bad edit.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use control::{
    load_manifests, watch_manifests, FrontendKey, ManifestError, Options, Protocol, Verdict,
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!(
            "lp-control-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        // Write-then-rename, as editors and kubelet do, so a poll never sees
        // a half-written file.
        let tmp = self.0.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &p).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn opts() -> Options {
    Options {
        node_name: "node-a".into(),
        ..Options::default()
    }
}

fn key(s: &str) -> FrontendKey {
    FrontendKey::new(s.parse().unwrap(), Protocol::Tcp)
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster.yaml")
}

const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {namespace: default, name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
"#;

const SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: default
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - addresses: [10.244.1.5]
"#;

/// Loading `text` fails with an error whose message contains `want`.
#[track_caller]
fn assert_fails_with(text: &str, want: &str) {
    let e = err_of(text);
    assert!(e.contains(want), "{e}");
}

fn err_of(text: &str) -> String {
    let d = TempDir::new();
    let p = d.write("m.yaml", text);
    match load_manifests(&[p], &opts()) {
        Ok(t) => panic!("expected an error, got a table with {} frontends", t.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn example_cluster_resolves_as_documented() {
    let t = load_manifests(&[example()], &opts()).expect("examples/cluster.yaml must load");
    let used = |k: &str| -> Vec<String> {
        let f = t.lookup(&key(k)).unwrap_or_else(|| panic!("missing {k}"));
        let mut v: Vec<String> = f.endpoints().iter().map(|e| e.addr.to_string()).collect();
        v.sort();
        v
    };
    // Named targetPort, terminating pod unused while others are ready.
    assert_eq!(
        used("10.96.0.10:80"),
        vec!["10.244.1.10:8080", "10.244.2.10:8080"]
    );
    // Topology: zone-a only.
    assert_eq!(used("10.96.0.12:80"), vec!["10.244.1.40:8080"]);
    // eTP=Local NodePort on our InternalIP: local pod only; ClusterIP: both.
    assert_eq!(used("10.244.0.1:30080"), vec!["10.244.1.30:8080"]);
    assert_eq!(
        used("10.96.1.10:80"),
        vec!["10.244.1.30:8080", "10.244.2.30:8080"]
    );
    // UDP DNS present with its protocol.
    assert!(t
        .lookup(&FrontendKey::new(
            "10.96.0.53:53".parse().unwrap(),
            Protocol::Udp
        ))
        .is_some());
    // Skipped: headless and another proxy's.
    assert!(t.lookup(&key("10.96.0.99:80")).is_none());
    assert!(t
        .sorted()
        .iter()
        .all(|f| f.service.name.name != "db-headless"));
    // node-b's NodePort address is not ours.
    assert!(t.lookup(&key("10.244.0.2:30080")).is_none());
    assert_eq!(t.len(), 8);
}

#[test]
fn multi_document_json_and_lists() {
    let d = TempDir::new();
    let svc_json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"namespace":"default","name":"web"},
        "spec":{"clusterIP":"10.96.0.10","ports":[{"name":"http","port":80}]}}"#;
    let list = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {namespace: default, name: web-1, labels: {kubernetes.io/service-name: web}}
    addressType: IPv4
    ports: [{name: http, port: 8080}]
    endpoints: [{addresses: [10.244.1.5]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSliceList
items:
  - metadata: {namespace: default, name: web-2, labels: {kubernetes.io/service-name: web}}
    addressType: IPv4
    ports: [{name: http, port: 8080}]
    endpoints: [{addresses: [10.244.1.6]}]
---
# an empty document is fine
"#;
    let a = d.write("svc.json", svc_json);
    let b = d.write("slices.yaml", list);
    let t = load_manifests(&[a, b], &opts()).unwrap();
    let f = t.lookup(&key("10.96.0.10:80")).unwrap();
    assert_eq!(f.endpoints().len(), 2);
}

#[test]
fn unknown_kind_is_an_error_with_location() {
    assert_fails_with(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x, namespace: ns}\n",
        "m.yaml: document 1: Deployment ns/x: unsupported kind \"Deployment\"",
    );
}

#[test]
fn missing_kind_and_non_mapping_documents() {
    let e = err_of("apiVersion: v1\nmetadata: {name: x}\n");
    assert!(e.ends_with("document 1: missing field `kind`"), "{e}");
    assert_fails_with(
        &format!("{SVC}---\n- just\n- a list\n"),
        "document 2: not a mapping",
    );
}

#[test]
fn wrong_api_version() {
    assert_fails_with(
        &SVC.replace("apiVersion: v1", "apiVersion: v2"),
        "Service default/web: apiVersion: Service must be \"v1\", got \"v2\"",
    );
}

#[test]
fn wrong_types_name_the_field() {
    assert_fails_with(
        &SVC.replace("port: 80", "port: eighty"),
        "Service default/web: spec.ports[0].port: invalid type: string \"eighty\"",
    );
    assert_fails_with(
        &SLICE.replace("addresses: [10.244.1.5]", "addresses: 10.244.1.5"),
        "EndpointSlice default/web-1: endpoints[0].addresses: invalid type",
    );
}

#[test]
fn missing_fields() {
    assert_fails_with(
        &SVC.replace("name: web", "nom: web"),
        "document 1: Service: metadata.name: missing",
    );
    assert_fails_with(
        &SVC.replace("ports: [{name: http, port: 80}]", "ports: [{name: http}]"),
        "Service default/web: spec.ports[0].port: missing or 0 (want 1-65535)",
    );
    assert_fails_with(
        &SLICE.replace("addressType: IPv4\n", ""),
        "EndpointSlice default/web-1: addressType: missing",
    );
    assert_fails_with(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
        "Service default/s: spec: missing",
    );
}

#[test]
fn malformed_ips() {
    assert_fails_with(
        &SVC.replace("10.96.0.10", "10.96.0.300"),
        "Service default/web: spec.clusterIP: invalid IP address \"10.96.0.300\"",
    );
    let doc = format!("{SVC}---{}", SLICE.replace("10.244.1.5", "10.0.0.300"));
    assert_fails_with(&doc, "m.yaml: document 2: EndpointSlice default/web-1: endpoints[0].addresses[0]: invalid IPv4 address \"10.0.0.300\"");
    assert_fails_with(
        &SLICE.replace("10.244.1.5", "fd00::5"),
        "invalid IPv4 address \"fd00::5\"",
    );
    assert_fails_with(
        &SVC.replace("spec:\n", "spec:\n  externalIPs: [1.2.3]\n"),
        "spec.externalIPs[0]: invalid IP address \"1.2.3\"",
    );
    let node = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: nope}]}\n";
    assert_fails_with(
        node,
        "Node node-a: status.addresses[0].address: invalid IP address \"nope\"",
    );
}

#[test]
fn ports_out_of_range() {
    assert_fails_with(
        &SVC.replace("port: 80", "port: 70000"),
        "spec.ports[0].port: port 70000 out of range 1-65535",
    );
    assert_fails_with(
        &SVC.replace("port: 80", "port: 0"),
        "spec.ports[0].port: missing or 0",
    );
    assert_fails_with(
        &SVC.replace("port: 80}", "port: 80, nodePort: -1}"),
        "spec.ports[0].nodePort: port -1 out of range",
    );
    assert_fails_with(
        &SLICE.replace("port: 8080", "port: 65536"),
        "EndpointSlice default/web-1: ports[0].port: port 65536 out of range",
    );
    assert_fails_with(
        &SVC.replace("port: 80", "port: 99999999999"),
        "spec.ports[0].port: invalid value",
    );
}

#[test]
fn bad_enums() {
    assert_fails_with(
        &SVC.replace("port: 80}", "port: 80, protocol: QUIC}"),
        "spec.ports[0].protocol: unknown protocol \"QUIC\"",
    );
    assert_fails_with(
        &SVC.replace("spec:\n", "spec:\n  type: Magic\n"),
        "spec.type: unknown type \"Magic\"",
    );
    assert_fails_with(
        &SVC.replace("spec:\n", "spec:\n  internalTrafficPolicy: Nearby\n"),
        "spec.internalTrafficPolicy: unknown policy \"Nearby\"",
    );
    assert_fails_with(&SVC.replace("spec:\n", "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n"), "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 out of range 1-86400");
    assert_fails_with(
        &SVC.replace(
            "metadata: {",
            "metadata: {annotations: {lightpath.io/protocol: quic}, ",
        ),
        "metadata.annotations[lightpath.io/protocol]: unknown protocol \"quic\"",
    );
    assert_fails_with(
        &SLICE.replace("addressType: IPv4", "addressType: IPv5"),
        "addressType: unknown address type \"IPv5\"",
    );
}

#[test]
fn duplicates_across_files_and_documents() {
    let d = TempDir::new();
    let a = d.write("a.yaml", SVC);
    let b = d.write("b.yaml", &format!("{SLICE}---{SVC}"));
    let e = load_manifests(&[a, b], &opts()).unwrap_err().to_string();
    assert!(
        e.contains("b.yaml: document 2: duplicate Service default/web (first defined at "),
        "{e}"
    );
    assert!(e.contains("a.yaml: document 1)"), "{e}");
    // Same name, different kind or namespace: not a duplicate.
    let c = d.write(
        "c.yaml",
        &format!(
            "{SVC}---{}",
            SVC.replace("namespace: default", "namespace: other")
        ),
    );
    assert!(load_manifests(&[c], &opts()).is_ok());
    // Omitted namespace means "default".
    let e2 = d.write(
        "e.yaml",
        &format!("{SVC}---{}", SVC.replace("namespace: default, ", "")),
    );
    assert!(load_manifests(&[e2], &opts())
        .unwrap_err()
        .to_string()
        .contains("duplicate Service default/web"));
}

#[test]
fn syntax_errors_and_missing_files() {
    assert_fails_with(
        "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
        "m.yaml: document 1: syntax:",
    );
    let e = load_manifests(&[PathBuf::from("/nonexistent/lp.yaml")], &opts()).unwrap_err();
    assert!(matches!(e, ManifestError::Read { .. }));
    assert!(e.to_string().starts_with("/nonexistent/lp.yaml: "), "{e}");
    assert!(matches!(
        load_manifests(&[], &opts()),
        Err(ManifestError::NoFiles)
    ));
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let text = format!(
        "{}---{}---\nkind: Pod\napiVersion: v1\nmetadata: {{name: p}}\n",
        SVC.replace("port: 80", "port: 0"),
        SLICE.replace("10.244.1.5", "x")
    );
    let d = TempDir::new();
    let p = d.write("m.yaml", &text);
    let e = load_manifests(&[p], &opts()).unwrap_err();
    assert_eq!(e.problems().len(), 3, "{e}");
    assert!(e.to_string().starts_with("3 problems:"), "{e}");
}

#[test]
fn garbage_never_panics() {
    let inputs = [
        "", "---", "null", "42", "\"str\"", "[]", "{}", "kind: 7", "kind: List\nitems: 3",
        "kind: List\nitems: [1, 2]", "kind: ServiceList\nitems: [{}]", "kind: Service\napiVersion: v1\nmetadata: 5",
        "kind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata: {name: a}\naddressType: IPv4\nendpoints: [{addresses: []}]\nports: [{}]",
        "kind: Service\napiVersion: v1\nmetadata: {name: a}\nspec: {clusterIP: '', ports: [{port: 1}]}",
        "kind: Service\napiVersion: v1\nmetadata: {name: a}\nspec: {clusterIPs: [], ports: null}",
        "kind: Service\napiVersion: v1\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 1, nodePort: 65536}]}",
        "kind: Node\napiVersion: v1\nmetadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP}]}",
        "\u{0}\u{1}", "a: b: c", "? [a]\n: b", "&a [*a]",
    ];
    let d = TempDir::new();
    for (i, text) in inputs.iter().enumerate() {
        let p = d.write(&format!("g{i}.yaml"), text);
        // Either outcome is fine; a panic fails the test.
        let _ = load_manifests(&[p], &opts())
            .map(|t| t.len())
            .map_err(|e| e.to_string());
    }
}

/// Polls `rx` until `pred` holds, bounded in time.
async fn wait_for(rx: &mut control::TableRx, what: &str, pred: impl Fn(&control::Table) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if pred(&rx.borrow_and_update()) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), rx.changed()).await;
    }
}

#[tokio::test]
async fn watch_publishes_good_edits_and_keeps_the_table_on_bad_ones() {
    let d = TempDir::new();
    let p = d.write("m.yaml", &format!("{SVC}---{SLICE}"));
    let (mut rx, task) =
        watch_manifests(vec![p.clone()], opts(), Duration::from_millis(20)).unwrap();
    let v0 = rx.borrow().version;
    assert_eq!(
        rx.borrow()
            .lookup(&key("10.96.0.10:80"))
            .unwrap()
            .endpoints()
            .len(),
        1
    );

    // A good edit: a second endpoint.
    d.write(
        "m.yaml",
        &format!(
            "{SVC}---{}",
            SLICE.replace("[10.244.1.5]", "[10.244.1.5]\n  - addresses: [10.244.1.6]")
        ),
    );
    wait_for(&mut rx, "two endpoints", |t| {
        t.lookup(&key("10.96.0.10:80"))
            .is_some_and(|f| f.endpoints().len() == 2)
    })
    .await;
    let good = rx.borrow().clone();
    assert!(good.version > v0);

    // A bad edit (invalid IP): nothing is published, the good table stays.
    d.write(
        "m.yaml",
        &format!("{SVC}---{}", SLICE.replace("10.244.1.5", "10.0.0.300")),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(std::sync::Arc::ptr_eq(&rx.borrow(), &good));
    // The file vanishing (mid-rename) keeps it too.
    fs::remove_file(&p).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(std::sync::Arc::ptr_eq(&rx.borrow(), &good));

    // Removing the slice from the files deletes its endpoints: REJECT.
    d.write("m.yaml", SVC);
    wait_for(&mut rx, "slice removed", |t| {
        t.lookup(&key("10.96.0.10:80"))
            .is_some_and(|f| f.verdict() == Some(Verdict::Reject))
    })
    .await;

    // Dropping every receiver ends the task.
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("task ends")
        .unwrap();
}

#[tokio::test]
async fn watch_refuses_to_start_on_invalid_files() {
    let d = TempDir::new();
    let p = d.write("m.yaml", &SVC.replace("10.96.0.10", "bogus"));
    let e = watch_manifests(vec![p], opts(), Duration::from_millis(20)).unwrap_err();
    assert!(
        e.to_string()
            .contains("spec.clusterIP: invalid IP address \"bogus\""),
        "{e}"
    );
}
