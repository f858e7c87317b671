//! The DaemonSet's own command line, run for real: for each overlay, the
//! container's args and the environment the kubelet would give it (the
//! ConfigMaps it loads, `NODE_NAME` from the downward API) start the real
//! binary in a throwaway node namespace, watching a fake API server, and the
//! DaemonSet's readiness, liveness and startup probes and the Prometheus
//! scrape target must then answer 200. The one difference from a cluster is
//! how the kube client finds the API server: a kubeconfig
//! (`LIGHTPATH_KUBECONFIG`) instead of the in-cluster service account.
//! Needs root (see `support::netns::require_root`).

mod support {
    pub mod deploy;
    pub mod kube_api;
    pub mod netns;
}

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_yaml::Value;
use support::deploy::render_overlay;
use support::kube_api::*;
use support::netns::*;

const WAIT: Duration = Duration::from_secs(30);

/// Args and environment of the DaemonSet's container, as the kubelet would
/// assemble them on a node called `node`.
fn command_line(docs: &[Value], node: &str) -> (Vec<String>, BTreeMap<String, String>) {
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("DaemonSet");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let args = c["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect();
    let mut env = BTreeMap::new();
    for from in c["envFrom"].as_sequence().into_iter().flatten() {
        let name = &from["configMapRef"]["name"];
        let cm = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && &d["metadata"]["name"] == name)
            .expect("ConfigMap named by envFrom");
        for (k, v) in cm["data"].as_mapping().into_iter().flatten() {
            env.insert(
                k.as_str().expect("key").to_string(),
                v.as_str().expect("value").to_string(),
            );
        }
    }
    for e in c["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().expect("name").to_string();
        let value = match (
            e["value"].as_str(),
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => v.to_string(),
            (None, Some("spec.nodeName")) => node.to_string(),
            other => panic!("env {name}: unsupported source {other:?}"),
        };
        env.insert(name, value);
    }
    (args, env)
}

/// Paths the DaemonSet's probes and scrape annotation name, with ports.
fn probe_targets(docs: &[Value]) -> Vec<(u16, String)> {
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("DaemonSet");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let mut out = Vec::new();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let get = &c[probe]["httpGet"];
        if let (Some(port), Some(path)) = (get["port"].as_u64(), get["path"].as_str()) {
            out.push((port as u16, path.to_string()));
        }
    }
    let ann = &ds["spec"]["template"]["metadata"]["annotations"];
    let port: u16 = ann["prometheus.io/port"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .expect("scrape port");
    out.push((
        port,
        ann["prometheus.io/path"].as_str().expect("path").into(),
    ));
    out
}

struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Plain HTTP/1.1 GET on loopback (inside the namespace): status and body.
async fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line: {text:?}"))?;
        Ok((status, text))
    };
    tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[test]
fn daemonset_command_line_starts_and_passes_its_probes() {
    if !require_root("daemonset_command_line_starts_and_passes_its_probes") {
        return;
    }
    for (i, overlay) in ["replace-kube-proxy", "hybrid"].into_iter().enumerate() {
        let docs = render_overlay::<Value>(overlay);
        let (args, mut env) = command_line(&docs, "node-a");
        let node = Netns::new(format!("lp-ds{}-{i}", std::process::id()));
        let api = NodeApi::start(&node);
        let kubeconfig = TempFile(
            std::env::temp_dir().join(format!("lp-ds-kubeconfig-{}-{i}.yaml", std::process::id())),
        );
        api.api.write_kubeconfig(&kubeconfig.0).expect("kubeconfig");
        env.insert(
            "LIGHTPATH_KUBECONFIG".into(),
            kubeconfig.0.display().to_string(),
        );
        let mut argv: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        argv.push(lightpath_bin().display().to_string());
        argv.extend(args.iter().cloned());
        let argv_ref: Vec<&str> = argv.iter().map(String::as_str).collect();
        let proc = Proc::spawn(&node, Path::new("/usr/bin/env"), &argv_ref);

        let targets = probe_targets(&docs);
        let result = node.run(move || async move {
            let deadline = Instant::now() + WAIT;
            let mut last = BTreeMap::new();
            loop {
                let mut all_ok = true;
                for (port, path) in &targets {
                    let r = get(*port, path).await;
                    all_ok &= matches!(r, Ok((200, _)));
                    last.insert(format!(":{port}{path}"), r);
                }
                if all_ok {
                    return Ok(last);
                }
                if Instant::now() > deadline {
                    return Err(last);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        match result {
            Ok(answers) => {
                let metrics = answers
                    .iter()
                    .find(|(k, _)| k.ends_with("/metrics"))
                    .and_then(|(_, r)| r.as_ref().ok())
                    .map(|(_, body)| body.clone())
                    .unwrap_or_default();
                assert!(
                    metrics.contains("lightpath_"),
                    "{overlay}: the scrape target serves lightpath metrics"
                );
            }
            Err(last) => panic!(
                "{overlay}: probes not all 200 within {WAIT:?}: {last:?}\nlightpath output:\n{}",
                proc.lines.text()
            ),
        }
        drop(proc);
        drop(api);
    }
}
