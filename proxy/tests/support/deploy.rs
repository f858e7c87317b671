//! The deploy/ overlays as objects: `kubectl kustomize` renders one, and the
//! tests read the result as JSON-like values. One renderer, so every test
//! reads the same objects and fails with the same message when kubectl is
//! missing or an overlay does not build.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Fails the test, saying where kubectl comes from, when it is missing.
pub fn require_kubectl() {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "kubectl is needed to render deploy/ (`kubectl kustomize`); .ci/run installs it \
         (deploy/install-kubectl.sh)"
    );
}

/// The objects of `deploy/overlays/<overlay>`, rendered by `kubectl
/// kustomize`, in order, empty documents left out. `T` is
/// `serde_yaml::Value` or `serde_json::Value`.
pub fn render_overlay<T: DeserializeOwned>(overlay: &str) -> Vec<T> {
    require_kubectl();
    let dir = repo().join("deploy/overlays").join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 YAML");
    let docs: Vec<T> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("YAML document"))
        .filter(|v| !v.is_null())
        .map(|v| serde_yaml::from_value(v).expect("rendered object"))
        .collect();
    assert!(!docs.is_empty(), "{overlay} rendered nothing");
    docs
}
