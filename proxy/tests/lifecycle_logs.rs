//! Logs from the real binary under TPROXY: with `--log-format json` every
//! line is a JSON object; `--access-log` adds one line per L4 connection and
//! per HTTP request (target `lightpath::access`, with the service, endpoint,
//! byte counts or method/path/status, and the duration); without the flag
//! there are none. Needs root (see `support::netns::require_root`).

mod support {
    pub mod netns;
}

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::netns::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ACCESS: &str = "lightpath::access";

/// Every output line as JSON (panics naming the first that is not).
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect()
}

/// One HTTP request to port 80 and one 5-byte echo on port 9000.
fn traffic(sb: &Sandbox, vip: std::net::IpAddr) {
    sb.client.run(move || async move {
        let name = wait_http(SocketAddr::new(vip, 80), IO_TIMEOUT).await;
        assert_eq!(name.expect("http"), "pod-1");
        let mut s = tokio::net::TcpStream::connect(SocketAddr::new(vip, 9000))
            .await
            .expect("echo connect");
        s.write_all(b"hello").await.expect("write");
        let mut back = [0u8; 5];
        s.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"hello");
        s.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.expect("eof");
    });
}

#[test]
fn access_log_lines_only_when_asked_and_json_throughout() {
    if !require_root("access_log_lines_only_when_asked_and_json_throughout") {
        return;
    }
    let mut sb = Sandbox::new("logs", 1);
    sb.start_backend(1);
    let vip = "10.96.0.10".parse().expect("literal");
    // Port 80 is HTTP (per-request proxying), port 9000 plain L4.
    let manifest = web_manifest(&[vip], &[1]).replacen(
        "{name: web, port: 80, targetPort: 8080, protocol: TCP}",
        "{name: web, port: 80, targetPort: 8080, protocol: TCP, appProtocol: http}",
        1,
    );
    assert!(manifest.contains("appProtocol"), "port 80 made HTTP");
    let path = sb.write_manifest("svc.yaml", &manifest);

    let lp = sb.start_lightpath(&path, &["--access-log", "--log-format", "json"]);
    traffic(&sb, vip);
    let lines = &sb.lightpath(lp).lines;
    lines
        .wait_for("\"message\":\"tcp\"", 0, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("no L4 access line: {e}"));
    lines
        .wait_for("\"message\":\"http\"", 0, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("no HTTP access line: {e}"));
    let all = json_lines(&lines.text());
    let access: Vec<&Value> = all.iter().filter(|v| v["target"] == ACCESS).collect();
    let tcp = access
        .iter()
        .find(|v| v["message"] == "tcp")
        .expect("tcp line");
    assert!(
        tcp["frontend"]
            .as_str()
            .is_some_and(|f| f.starts_with("10.96.0.10:9000/")),
        "{tcp}"
    );
    assert_eq!(tcp["endpoint"], format!("{}:9000", pod_v4(1)), "{tcp}");
    assert_eq!(tcp["sent"], 5, "{tcp}");
    assert_eq!(tcp["received"], 5, "{tcp}");
    assert!(tcp["duration_ms"].as_f64().is_some(), "{tcp}");
    assert!(
        tcp["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("10.0.1.2:")),
        "{tcp}"
    );
    let http = access
        .iter()
        .find(|v| v["message"] == "http")
        .expect("http line");
    assert_eq!(http["method"], "GET", "{http}");
    assert_eq!(http["path"], "/", "{http}");
    assert_eq!(http["status"], 200, "{http}");
    assert!(
        http["service"]
            .as_str()
            .is_some_and(|s| s.contains("default/web")),
        "{http}"
    );

    // The same traffic without --access-log: no access lines at all.
    sb.lightpath(lp).signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(sb.procs[lp].wait(Duration::from_secs(15)), Some(0));
    let quiet = sb.start_lightpath(&path, &["--log-format", "json"]);
    traffic(&sb, vip);
    sb.lightpath(quiet)
        .signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(sb.procs[quiet].wait(Duration::from_secs(15)), Some(0));
    let all = json_lines(&sb.lightpath(quiet).lines.text());
    assert!(
        all.iter().any(|v| v["message"] == "drained"),
        "the run logged through to its end"
    );
    let access: Vec<&Value> = all.iter().filter(|v| v["target"] == ACCESS).collect();
    assert!(access.is_empty(), "access lines while off: {access:?}");
}
