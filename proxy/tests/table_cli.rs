//! `lightpath table`, driven through the real binary on the bundled example
//! cluster: text and `--json` output, flags from the environment, and a
//! clear error (non-zero exit) on a bad manifest.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster.yaml")
}

fn lightpath(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lightpath"));
    cmd.arg("table").args(args);
    for k in [
        "NODE_NAME",
        "LIGHTPATH_MANIFESTS",
        "LIGHTPATH_PROXY_NAME",
        "LIGHTPATH_LABELLED_ONLY",
        "LIGHTPATH_NODE_IPS",
        "LIGHTPATH_CLUSTER_CIDR",
        "LIGHTPATH_DETECT_LOCAL_MODE",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run lightpath table")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}, stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).expect("utf-8 output")
}

#[test]
fn text_output_shows_sets_policy_and_verdicts() {
    let ex = example();
    let out = stdout(&lightpath(
        &["--manifests", ex.to_str().unwrap(), "--node-name", "node-a"],
        &[],
    ));
    assert!(out.starts_with("node node-a: 8 frontends"), "{out}");
    // Terminating pod listed nowhere while others are ready; sets per policy.
    assert!(out.contains(
        "10.96.0.10:80/TCP  clusterIP  shop/web:http  mode=http  affinity=none  policy=Cluster\n    cluster  10.244.1.10:8080 ready, 10.244.2.10:8080 ready\n    local    10.244.1.10:8080 ready\n    verdict  forward (2 endpoints)\n"
    ), "{out}");
    assert!(out.contains("10.244.0.1:30080/TCP  nodePort  edge/ingress:http  mode=http  affinity=none  policy=Local"), "{out}");
    assert!(out.contains("10.96.0.11:6379/TCP  clusterIP  shop/cart-redis:redis  mode=l4  affinity=clientIP/600s"), "{out}");
    assert!(
        out.contains("10.96.0.53:53/UDP  clusterIP  kube-system/kube-dns:dns  mode=l4"),
        "{out}"
    );
    assert!(
        out.contains("10.96.0.13:9000/TCP  clusterIP  shop/orders:api  mode=h2c"),
        "{out}"
    );
    assert!(out.contains("annot.   lightpath.io/retries=2"), "{out}");
    assert!(
        !out.contains("10.96.0.99"),
        "another proxy's service must be skipped: {out}"
    );
}

#[test]
fn json_output_is_the_documented_shape() {
    let ex = example();
    let out = stdout(&lightpath(
        &["--manifests", ex.to_str().unwrap(), "--json"],
        &[("NODE_NAME", "node-b")],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(v["schema"], "lightpath.table/v1");
    assert_eq!(v["nodeName"], "node-b");
    let fs = v["frontends"].as_array().unwrap();
    assert_eq!(fs.len(), 8);
    let find = |f: &str| {
        fs.iter()
            .find(|x| x["frontend"] == f)
            .unwrap_or_else(|| panic!("no {f}"))
    };
    // From node-b: its own NodePort address, and zone-b's catalog endpoints.
    let np = find("10.244.0.2:30080/TCP");
    assert_eq!(np["kind"], "nodePort");
    assert_eq!(np["trafficPolicy"], "Local");
    assert_eq!(np["endpoints"][0]["address"], "10.244.2.30:8080");
    assert_eq!(np["verdict"], "forward");
    let cat = find("10.96.0.12:80/TCP");
    let addrs: Vec<&str> = cat["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, vec!["10.244.2.40:8080", "10.244.2.41:8080"]);
    assert_eq!(cat["annotations"]["lightpath.io/retries"], "2");
    let redis = find("10.96.0.11:6379/TCP");
    assert_eq!(redis["affinity"]["type"], "ClientIP");
    assert_eq!(redis["affinity"]["timeoutSeconds"], 600);
    assert_eq!(redis["service"], "shop/cart-redis:redis");
    assert_eq!(redis["namespace"], "shop");
    assert_eq!(redis["portName"], "redis");
    assert_eq!(redis["mode"], "l4");
    assert_eq!(redis["localEndpoints"][0]["state"], "ready");
    assert_eq!(redis["localEndpoints"][0]["nodeName"], "node-b");
}

#[test]
fn terminating_fallback_and_drop_verdict_are_visible() {
    let dir = std::env::temp_dir().join(format!("lp-table-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("m.yaml");
    std::fs::write(&p, r#"
apiVersion: v1
kind: Service
metadata: {namespace: t, name: only-terminating}
spec: {clusterIP: 10.96.5.1, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: t, name: ot-1, labels: {kubernetes.io/service-name: only-terminating}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.244.1.9], conditions: {ready: false, serving: true, terminating: true}, nodeName: node-z}
---
apiVersion: v1
kind: Service
metadata: {namespace: t, name: local-only}
spec: {clusterIP: 10.96.5.2, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: t, name: lo-1, labels: {kubernetes.io/service-name: local-only}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.244.2.9], nodeName: node-z}
---
apiVersion: v1
kind: Service
metadata: {namespace: t, name: empty}
spec: {clusterIP: 10.96.5.3, ports: [{port: 80}]}
"#).unwrap();
    let out = lightpath(
        &["--manifests", p.to_str().unwrap(), "--node-name", "node-a"],
        &[],
    );
    let _ = std::fs::remove_dir_all(&dir);
    let out = stdout(&out);
    assert!(
        out.contains("    cluster  10.244.1.9:8080 serving-terminating\n"),
        "{out}"
    );
    assert!(out.contains("10.96.5.2:80/TCP  clusterIP  t/local-only:http  mode=http  affinity=none  policy=Local\n    cluster  10.244.2.9:8080 ready\n    local    -\n    verdict  drop (Local policy, no endpoint on this node)\n"), "{out}");
    assert!(out.contains("10.96.5.3:80/TCP  clusterIP  t/empty  mode=l4  affinity=none  policy=Cluster\n    cluster  -\n    local    -\n    verdict  reject (no usable endpoints anywhere)\n"), "{out}");
}

#[test]
fn source_ranges_are_shown_on_load_balancer_frontends_only() {
    let dir = std::env::temp_dir().join(format!("lp-table-cli-lbsrc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("m.yaml");
    std::fs::write(
        &p,
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: t, name: edge}
spec:
  type: LoadBalancer
  clusterIP: 10.96.6.1
  loadBalancerSourceRanges: [203.0.113.0/24, 198.51.100.9/32]
  ports: [{name: tcp, port: 443, nodePort: 30443}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.6}]}}
"#,
    )
    .unwrap();
    let args = ["--manifests", p.to_str().unwrap(), "--node-name", "node-a"];
    let text = lightpath(&args, &[]);
    let json = lightpath(&[&args[..], &["--json"]].concat(), &[]);
    let _ = std::fs::remove_dir_all(&dir);
    let text = stdout(&text);
    assert!(
        text.contains("192.0.2.6:443/TCP  loadBalancer  t/edge:tcp  mode=l4  affinity=none  policy=Cluster\n    cluster  -\n    local    -\n    sources  198.51.100.9/32, 203.0.113.0/24 (others dropped)\n"),
        "{text}"
    );
    assert_eq!(text.matches("    sources  ").count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    for f in v["frontends"].as_array().unwrap() {
        if f["kind"] == "loadBalancer" {
            assert_eq!(
                f["allowedSources"],
                serde_json::json!(["198.51.100.9/32", "203.0.113.0/24"])
            );
        } else {
            assert!(f.get("allowedSources").is_none(), "{f}");
        }
    }
}

#[test]
fn a_local_traffic_detector_shows_which_clusterip_clients_keep_their_address() {
    let ex = example();
    let args = ["--manifests", ex.to_str().unwrap(), "--node-name", "node-a"];
    // None by default.
    let text = stdout(&lightpath(&args, &[]));
    assert!(!text.contains("    source   "), "{text}");
    // --cluster-cidr (here from the environment): every ClusterIP, nothing else.
    let env = [("LIGHTPATH_CLUSTER_CIDR", "10.244.0.0/16")];
    let text = stdout(&lightpath(&args, &env));
    let clusterips = text.matches("  clusterIP  ").count();
    assert!(clusterips > 0, "{text}");
    assert_eq!(
        text.matches("    source   kept for 10.244.0.0/16 (others masqueraded)\n")
            .count(),
        clusterips,
        "{text}"
    );
    let json = stdout(&lightpath(&[&args[..], &["--json"]].concat(), &env));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for f in v["frontends"].as_array().unwrap() {
        if f["kind"] == "clusterIP" {
            assert_eq!(
                f["keptSources"],
                serde_json::json!(["10.244.0.0/16"]),
                "{f}"
            );
        } else {
            assert!(f.get("keptSources").is_none(), "{f}");
        }
    }
    // ClusterCIDR without networks is refused, naming the flag.
    let o = lightpath(
        &[&args[..], &["--detect-local-mode", "ClusterCIDR"]].concat(),
        &[],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--cluster-cidr"), "{err}");
}

#[test]
fn flags_from_environment_and_labelled_only() {
    let ex = example();
    let o = lightpath(
        &[],
        &[
            ("LIGHTPATH_MANIFESTS", ex.to_str().unwrap()),
            ("NODE_NAME", "node-a"),
            ("LIGHTPATH_PROXY_NAME", "kube-proxy"),
            ("LIGHTPATH_LABELLED_ONLY", "true"),
        ],
    );
    let out = stdout(&o);
    // Only the service labelled for "kube-proxy" remains.
    assert!(out.starts_with("node node-a: 1 frontends"), "{out}");
    assert!(
        out.contains("10.96.0.99:80/TCP  clusterIP  legacy/old-api:http"),
        "{out}"
    );
}

#[test]
fn bad_manifest_fails_with_file_document_object_and_field() {
    let dir = std::env::temp_dir().join(format!("lp-table-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("bad.yaml");
    std::fs::write(&p, "apiVersion: v1\nkind: Service\nmetadata: {namespace: a, name: b}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n").unwrap();
    let o = lightpath(
        &["--manifests", p.to_str().unwrap(), "--node-name", "node-a"],
        &[],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "bad.yaml: document 1: Service a/b: spec.clusterIP: invalid IP address \"10.96.0.300\""
        ),
        "{err}"
    );
    // No node name at all: clap names the flag and the variable.
    let o = lightpath(&["--manifests", "x.yaml"], &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--node-name"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
