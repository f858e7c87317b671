//! `lightpath demo`, the README's first command, run as a test: it must
//! succeed, report what it promises, and leave no namespace behind. Needs
//! root (see `support::netns::require_root`).

mod support {
    pub mod netns;
}

use std::process::Command;

use support::netns::*;

#[test]
fn demo_runs_reports_and_cleans_up() {
    if !require_root("demo_runs_reports_and_cleans_up") {
        return;
    }
    let out = Command::new(lightpath_bin())
        .arg("demo")
        .env("NO_COLOR", "1")
        .output()
        .expect("run lightpath demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for pod in ["pod-1", "pod-2", "pod-3"] {
        assert!(stdout.contains(pod), "{pod} missing:\n{stdout}");
    }
    for needle in [
        "latency (connect + request + response): p50",
        "0 failed, 0 reached pod-3",
        "connection refused in",
        "tearing down the sandbox",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing:\n{stdout}");
    }
    // The demo's namespaces are named after its pid.
    let prefix = format!("lp-demo-{}-", out_pid(&stdout));
    let left = must("ip", &["netns", "list"]);
    assert!(
        !left.contains(&prefix),
        "demo left namespaces behind:\n{left}"
    );
}

/// The pid in "namespaces lp-demo-<pid>-{...}".
fn out_pid(stdout: &str) -> String {
    stdout
        .split("lp-demo-")
        .nth(1)
        .and_then(|s| s.split('-').next())
        .unwrap_or_else(|| panic!("no namespace prefix in:\n{stdout}"))
        .to_string()
}
