//! `lightpath run --kubeconfig` end to end: the real binary in a node
//! namespace watches `fakeapi` (also in that namespace, on its loopback)
//! through a kubeconfig, and a client namespace sends traffic through the
//! TPROXY rules while the test edits the cluster. Needs root (see
//! `support::netns::require_root`).

mod support {
    pub mod kube_api;
    pub mod netns;
}

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use fakeapi::Kind;
use support::kube_api::*;
use support::netns::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// Generous: with one request at a time (no in-flight load) a new endpoint
// is picked only once its 30 ms default RTT estimate has decayed below the
// observed loopback-fast ones (decay 10 s: about 50 s), so scale-up can take
// that long to show on an idle machine.
const WAIT: Duration = Duration::from_secs(90);

fn vip() -> IpAddr {
    "10.96.0.10".parse().expect("literal")
}

async fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(IO_TIMEOUT, async {
        s.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await?;
        if buf != msg {
            return Err(std::io::Error::other(format!("echo mismatch: {buf:?}")));
        }
        Ok(())
    })
    .await
    .map_err(|_| std::io::Error::other("echo timed out"))?
}

/// Backend names answering `addr` until `done` holds for the names seen in
/// the last `window` requests, within [`WAIT`].
async fn until_names(
    addr: SocketAddr,
    window: usize,
    done: impl Fn(&BTreeSet<String>) -> bool,
) -> BTreeSet<String> {
    let deadline = Instant::now() + WAIT;
    let mut recent: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        if let Ok(name) = http_name(addr).await {
            recent.push(name);
            if recent.len() > window {
                recent.remove(0);
            }
            let set: BTreeSet<String> = recent.iter().cloned().collect();
            if recent.len() == window && done(&set) {
                return set;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr}: condition not reached within {WAIT:?}; last names {recent:?}");
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn kube_source_drives_traffic_through_tproxy() {
    if !require_root("kube_source_drives_traffic_through_tproxy") {
        return;
    }
    let mut sb = Sandbox::new("kube", 3);
    for i in 1..=3 {
        sb.start_backend(i);
    }
    let node_api = NodeApi::start(&sb.node);
    let api = node_api.api.clone();
    apply_yaml(&api, &node_yaml());
    apply_yaml(&api, &service_yaml("web", &[vip()], &[1, 2], "node-a", ""));
    let kubeconfig = sb.dir.join("kubeconfig.yaml");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");

    let kc = kubeconfig.to_string_lossy().to_string();
    let p = Proc::spawn(
        &sb.node,
        &lightpath_bin(),
        &[
            "run",
            "--kubeconfig",
            &kc,
            "--node-name",
            "node-a",
            "--drain-timeout",
            "5",
        ],
    );
    p.lines
        .wait_for("serving", 0, WAIT)
        .unwrap_or_else(|e| panic!("lightpath run --kubeconfig: {e}"));
    sb.procs.push(p);

    let web = SocketAddr::new(vip(), 80);
    let echo = SocketAddr::new(vip(), 9000);
    let client_api = api.clone();
    sb.client.run(move || async move {
        // The service from the API server is served, over both endpoints.
        let seen = until_names(web, 30, |s| s.len() == 2).await;
        assert_eq!(seen, names(&["pod-1", "pod-2"]));

        // An established connection must survive the endpoint changes.
        let mut conn = TcpStream::connect(echo).await.expect("echo connect");
        echo_roundtrip(&mut conn, b"before")
            .await
            .expect("echo before");

        // Scale up: the new endpoint takes traffic.
        apply_yaml(
            &client_api,
            &service_yaml("web", &[vip()], &[1, 2, 3], "node-a", ""),
        );
        until_names(web, 1, |s| s.contains("pod-3")).await;
        echo_roundtrip(&mut conn, b"after scale-up")
            .await
            .expect("established connection broken by scale-up");

        // Scale down to pod 3 only.
        apply_yaml(
            &client_api,
            &service_yaml("web", &[vip()], &[3], "node-a", ""),
        );
        until_names(web, 20, |s| *s == names(&["pod-3"])).await;
        echo_roundtrip(&mut conn, b"after scale-down")
            .await
            .expect("established connection broken by scale-down");
    });

    // Service deleted: its rules leave the kernel.
    assert!(sb.nft_table().contains("10.96.0.10"), "{}", sb.nft_table());
    api.delete_kind(Kind::Service, "default", "web")
        .expect("delete service");
    let deadline = Instant::now() + WAIT;
    while sb.nft_table().contains("10.96.0.10") {
        assert!(
            Instant::now() < deadline,
            "rules for the deleted service still present:\n{}",
            sb.nft_table()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(node_api);
}
