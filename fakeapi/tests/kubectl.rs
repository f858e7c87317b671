//! The fake is convincing enough for the real client: `kubectl` reads (and
//! deletes) through it with only a kubeconfig. Skipped with a printed note
//! when kubectl is not installed; CI installs it.

use std::process::Output;
use std::time::Duration;

use fakeapi::{FakeApi, Kind};
use serde_json::json;

fn kubectl_path() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("kubectl"))
            .find(|p| p.is_file())
    })
}

async fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=10s")
        .args(args);
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("kubectl did not finish within 60 s")
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_reads_services_slices_and_nodes() {
    if kubectl_path().is_none() {
        eprintln!("NOTE: kubectl not on PATH; skipping the kubectl check (the protocol is covered by control/tests/kube_watch.rs)");
        return;
    }
    let api = FakeApi::start().await.unwrap();
    api.apply_json(
        Kind::Service,
        json!({"metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
               "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                        "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]}}),
    )
    .unwrap();
    api.apply_json(
        Kind::Service,
        json!({"metadata": {"name": "db", "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 5432, "protocol": "TCP"}]}}),
    )
    .unwrap();
    api.apply_json(
        Kind::EndpointSlice,
        json!({"metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "ports": [{"name": "", "port": 8080}],
               "endpoints": [{"addresses": ["10.1.0.1"]}, {"addresses": ["10.1.0.2"]}]}),
    )
    .unwrap();
    api.apply_json(
        Kind::Node,
        json!({"metadata": {"name": "node-a"},
               "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}],
                          "conditions": [{"type": "Ready", "status": "True"}]}}),
    )
    .unwrap();
    let kc = std::env::temp_dir().join(format!("lp-fakeapi-kubectl-{}.yaml", std::process::id()));
    api.write_kubeconfig(&kc).unwrap();
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = Rm(kc.clone());

    // Discovery + server-side table printing.
    let out = kubectl(&kc, &["get", "svc", "-A"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NAMESPACE"), "{text}");
    for want in [
        "web",
        "shop",
        "10.96.0.10",
        "80:30080/TCP",
        "db",
        "5432/TCP",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    // Label selector, namespaced path, JSON output.
    let out = kubectl(
        &kc,
        &["get", "svc", "-n", "shop", "-l", "app=web", "-o", "json"],
    )
    .await;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["items"][0]["spec"]["clusterIP"], "10.96.0.10");
    let out = kubectl(&kc, &["get", "svc", "-A", "-l", "app!=web", "-o", "name"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "service/db");

    let out = kubectl(&kc, &["get", "endpointslices", "-A"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("web-1") && text.contains("10.1.0.1,10.1.0.2"),
        "{text}"
    );
    let out = kubectl(&kc, &["get", "nodes"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("node-a") && text.contains("Ready"), "{text}");

    // Pagination: kubectl lists in chunks of --chunk-size.
    let out = kubectl(&kc, &["get", "svc", "-A", "--chunk-size=1", "-o", "name"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);

    // Writes over HTTP.
    kubectl(
        &kc,
        &["delete", "svc", "db", "-n", "default", "--wait=false"],
    )
    .await;
    assert_eq!(
        api.get(Kind::Service, "default", "db")
            .err()
            .map(|e| e.to_string()),
        Some("404 NotFound: services \"db\" not found".to_string())
    );
}
