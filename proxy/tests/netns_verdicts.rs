//! What the kernel and lightpath do when a frontend cannot be served: no
//! endpoints (REJECT), Local policy with only remote endpoints (DROP), an
//! endpoint removed while connections are open, and lightpath itself down.
//! Needs root (see `support::netns::require_root`).

mod support {
    pub mod netns;
}

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::netns::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal")
}

/// A Service with no EndpointSlice at all.
fn empty_service(name: &str, vip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports:\n  - {{name: web, port: 80, targetPort: 8080, protocol: TCP}}\n---\n"
    )
}

/// Connect outcomes for the no-endpoint Service (REJECT expected) and the
/// Local-policy one without local endpoints (DROP expected).
async fn probe_reject_and_drop() -> (ConnectOutcome, ConnectOutcome) {
    let reject = probe(
        SocketAddr::new(ip("10.96.0.20"), 80),
        Duration::from_secs(3),
    )
    .await;
    let drop = probe(
        SocketAddr::new(ip("10.96.0.30"), 80),
        Duration::from_secs(2),
    )
    .await;
    (reject, drop)
}

#[test]
fn no_endpoints_is_refused_at_once_and_local_policy_without_local_endpoints_drops() {
    if !require_root(
        "no_endpoints_is_refused_at_once_and_local_policy_without_local_endpoints_drops",
    ) {
        return;
    }
    let mut sb = Sandbox::new("verdict", 1);
    sb.start_backend(1);
    let m = format!(
        "{}{}{}",
        node_yaml(),
        empty_service("empty", "10.96.0.20"),
        // Endpoints exist, but on another node, and the policy is Local.
        service_yaml(
            "remote",
            &[ip("10.96.0.30")],
            &[1],
            "node-b",
            "internalTrafficPolicy: Local"
        ),
    );
    let path = sb.write_manifest("svc.yaml", &m);
    sb.start_lightpath(&path, &[]);
    let table = sb.nft_table();
    assert!(
        table.contains("10.96.0.20 . tcp . 80 : goto reject_fe"),
        "{table}"
    );
    assert!(table.contains("10.96.0.30 . tcp . 80 : drop"), "{table}");

    let (reject, drop) = sb.client.run(probe_reject_and_drop);
    match reject {
        ConnectOutcome::Refused(t) => assert!(t < Duration::from_millis(100), "REJECT took {t:?}"),
        other => panic!("no-endpoint service must be refused, got {other:?}"),
    }
    assert!(
        matches!(drop, ConnectOutcome::TimedOut),
        "Local policy without local endpoints must DROP, got {drop:?}"
    );

    // The same verdicts for processes on the node itself (output hook).
    let (reject, drop) = sb.node.run(probe_reject_and_drop);
    match reject {
        ConnectOutcome::Refused(t) => assert!(
            t < Duration::from_millis(100),
            "node-local REJECT took {t:?}"
        ),
        other => panic!("node-local: no-endpoint service must be refused, got {other:?}"),
    }
    assert!(
        matches!(drop, ConnectOutcome::TimedOut),
        "node-local DROP, got {drop:?}"
    );
}

#[test]
fn node_processes_and_pods_reach_local_policy_external_frontends_without_a_local_endpoint() {
    if !require_root(
        "node_processes_and_pods_reach_local_policy_external_frontends_without_a_local_endpoint",
    ) {
        return;
    }
    let mut sb = Sandbox::new("etpnode", 1);
    sb.start_backend(1);
    // externalTrafficPolicy: Local, its only endpoint on another node:
    // NodePort 30070 and LoadBalancer IP 192.0.2.70.
    let svc = service_yaml(
        "edge",
        &[ip("10.96.0.70")],
        &[1],
        "node-b",
        "type: LoadBalancer\nexternalTrafficPolicy: Local",
    )
    .replace(
        "{name: echo, port: 9000, targetPort: 9000, protocol: TCP}",
        "{name: echo, port: 9000, targetPort: 9000, protocol: TCP, nodePort: 30070}",
    )
    .replacen(
        "---\n",
        "status:\n  loadBalancer:\n    ingress:\n    - {ip: 192.0.2.70}\n---\n",
        1,
    );
    // The Node's pod CIDR holds the client namespace's own address
    // (10.0.1.2): it plays a pod on this node. A second client address,
    // 10.0.1.5, plays a client from outside.
    let node = node_yaml().replace(
        "metadata: {name: node-a}\n",
        "metadata: {name: node-a}\nspec: {podCIDRs: [10.0.1.0/30]}\n",
    );
    sb.client.ip(&["addr", "add", "10.0.1.5/24", "dev", "eth0"]);
    sb.serve(&format!("{node}{svc}"));
    let table = sb.nft_table();
    assert!(
        table.contains("10.0.1.1 . tcp . 30070 : goto node_tproxy_v4"),
        "{table}"
    );
    assert!(
        table.contains("10.0.1.1 . tcp . 30070 . 10.0.1.0/30"),
        "{table}"
    );
    assert!(
        table.contains("192.0.2.70 . tcp . 9000 : goto node_tproxy_v4"),
        "{table}"
    );
    let node_port = SocketAddr::new(ip("10.0.1.1"), 30070);
    let lb = SocketAddr::new(ip("192.0.2.70"), 9000);
    // From outside the node: dropped (no local endpoint), as before.
    let outside = Some(ip("10.0.1.5"));
    let (np, lbo) = sb.client.run(move || async move {
        (
            probe_from(outside, node_port, Duration::from_secs(2)).await,
            probe_from(outside, lb, Duration::from_secs(2)).await,
        )
    });
    assert!(
        matches!(np, ConnectOutcome::TimedOut),
        "outside, NodePort: {np:?}"
    );
    assert!(
        matches!(lbo, ConnectOutcome::TimedOut),
        "outside, LB IP: {lbo:?}"
    );
    // From a pod on this node (its pod CIDR): the cluster-wide endpoint.
    let (np, lbo) = sb.client.run(move || async move {
        (
            probe(node_port, IO_TIMEOUT).await,
            probe(lb, IO_TIMEOUT).await,
        )
    });
    assert!(
        matches!(np, ConnectOutcome::Connected(_)),
        "pod, NodePort: {np:?}"
    );
    assert!(
        matches!(lbo, ConnectOutcome::Connected(_)),
        "pod, LB IP: {lbo:?}"
    );
    // From the node itself: served by the cluster-wide endpoint, as
    // kube-proxy's short-circuit does.
    let (np, lbo) = sb.node.run(move || async move {
        (
            probe(node_port, IO_TIMEOUT).await,
            probe(lb, IO_TIMEOUT).await,
        )
    });
    assert!(
        matches!(np, ConnectOutcome::Connected(_)),
        "node, NodePort: {np:?}"
    );
    assert!(
        matches!(lbo, ConnectOutcome::Connected(_)),
        "node, LB IP: {lbo:?}"
    );
}

#[test]
fn removed_backend_gets_no_new_connections_while_established_ones_finish() {
    if !require_root("removed_backend_gets_no_new_connections_while_established_ones_finish") {
        return;
    }
    let mut sb = Sandbox::new("remove", 2);
    sb.start_backend(1);
    sb.start_backend(2);
    let vip = ip("10.96.0.10");
    sb.serve(&web_manifest(&[vip], &[1, 2]));

    // Open echo connections until both pods hold at least one (the echo
    // port cannot tell pods apart, so open several: p2c spreads them).
    let (tx_open, rx_open) = std::sync::mpsc::channel::<()>();
    let (tx_go, rx_go) = std::sync::mpsc::channel::<()>();
    let holder = sb.client.spawn(move || async move {
        let mut conns = Vec::new();
        for _ in 0..8 {
            let mut s = TcpStream::connect(SocketAddr::new(vip, 9000))
                .await
                .expect("connect");
            s.write_all(b"ping").await.expect("write");
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.expect("echo before removal");
            conns.push(s);
        }
        let _ = tx_open.send(());
        let _ = rx_go.recv_timeout(Duration::from_secs(60));
        // After the removal every established connection still echoes.
        let mut ok = 0;
        for s in conns.iter_mut() {
            s.write_all(b"pong").await.expect("write after removal");
            let mut b = [0u8; 4];
            tokio::time::timeout(IO_TIMEOUT, s.read_exact(&mut b))
                .await
                .expect("echo after removal stalled")
                .expect("echo after removal");
            assert_eq!(&b, b"pong");
            ok += 1;
        }
        ok
    });
    rx_open
        .recv_timeout(Duration::from_secs(30))
        .expect("connections opened");
    let on_pod2 = sb.pods[1]
        .exec("ss", &["-Htn", "state", "established", "( sport = :9000 )"])
        .expect("ss")
        .lines()
        .count();
    assert!(
        on_pod2 > 0,
        "p2c put no echo connection on pod-2; nothing to check"
    );

    // The edit also adds a marker Service without endpoints: once its reject
    // element is in the kernel, lightpath has published the edited table.
    let only_one = format!(
        "{}{}{}",
        node_yaml(),
        service_yaml("web", &[vip], &[1], "node-a", ""),
        empty_service("marker", "10.96.0.99"),
    );
    sb.write_manifest("svc.yaml", &only_one);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sb.nft_table().contains("10.96.0.99") {
        assert!(
            std::time::Instant::now() < deadline,
            "edit not applied within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Wait (bounded) until the edit is in effect: ten answers in a row from
    // pod-1 (with two endpoints, p2c would have sent some to pod-2).
    let settled = sb.client.run(move || async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut run = 0;
        while run < 10 && std::time::Instant::now() < deadline {
            match http_name(SocketAddr::new(vip, 80)).await.as_deref() {
                Ok("pod-1") => run += 1,
                _ => run = 0,
            }
        }
        run >= 10
    });
    assert!(
        settled,
        "lightpath did not pick up the manifest edit within 10 s"
    );
    // New connections: pod-1 only.
    let names = sb.client.run(move || async move {
        let mut v = Vec::new();
        for _ in 0..20 {
            v.push(http_name(SocketAddr::new(vip, 80)).await.expect("http"));
        }
        v
    });
    assert!(
        names.iter().all(|n| n == "pod-1"),
        "removed pod-2 still got new connections: {names:?}"
    );
    let _ = tx_go.send(());
    let ok = holder.join().expect("holder");
    assert_eq!(ok, 8, "established connections must finish");
}

#[test]
fn lightpath_down_fails_fast_and_cleanup_removes_everything() {
    if !require_root("lightpath_down_fails_fast_and_cleanup_removes_everything") {
        return;
    }
    let mut sb = Sandbox::new("down", 1);
    sb.start_backend(1);
    let vip = ip("10.96.0.10");
    let lp = sb.serve(&web_manifest(&[vip], &[1]));
    let name = sb
        .client
        .run(move || wait_http(SocketAddr::new(vip, 80), Duration::from_secs(5)));
    assert_eq!(name.expect("served"), "pod-1");

    // SIGTERM: drains, exits 0, keeps the rules (fail closed).
    sb.lightpath(lp).signal(nix::sys::signal::Signal::SIGTERM);
    let code = sb.procs[lp].wait(Duration::from_secs(15));
    assert_eq!(
        code,
        Some(0),
        "exit after SIGTERM: {}",
        sb.lightpath(lp).lines.text()
    );
    assert!(sb.nft_table().contains("tproxy"), "rules kept after exit");

    let outcomes = sb.client.run(move || async move {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(probe(SocketAddr::new(vip, 80), Duration::from_secs(3)).await);
        }
        v
    });
    for o in &outcomes {
        match o {
            ConnectOutcome::Refused(t) => {
                assert!(*t < Duration::from_millis(100), "refusal took {t:?}")
            }
            other => panic!("with lightpath down, connections must fail fast: {other:?}"),
        }
    }

    // Restart picks up the kept rules (reconcile), then cleanup removes all.
    sb.serve(&web_manifest(&[vip], &[1]));
    let name = sb
        .client
        .run(move || wait_http(SocketAddr::new(vip, 80), Duration::from_secs(5)));
    assert_eq!(name.expect("served after restart"), "pod-1");
    sb.procs.clear();
    let out = sb
        .node
        .exec(&lightpath_bin().to_string_lossy(), &["cleanup"])
        .expect("cleanup");
    assert!(out.contains("removed"), "{out}");
    assert!(
        sb.node
            .exec("nft", &["list", "table", "inet", "lightpath"])
            .is_err(),
        "table gone"
    );
    let rules = sb.node.exec("ip", &["rule", "show"]).expect("ip rule");
    assert!(!rules.contains("lookup 100"), "{rules}");
    let rules6 = sb
        .node
        .exec("ip", &["-6", "rule", "show"])
        .expect("ip -6 rule");
    assert!(!rules6.contains("lookup 100"), "{rules6}");
    // Idempotent.
    sb.node
        .exec(&lightpath_bin().to_string_lossy(), &["cleanup"])
        .expect("second cleanup");
}

#[test]
fn sigterm_refuses_new_connections_and_drains_established_ones() {
    if !require_root("sigterm_refuses_new_connections_and_drains_established_ones") {
        return;
    }
    let mut sb = Sandbox::new("drain", 1);
    sb.start_backend(1);
    let vip = ip("10.96.0.10");
    let lp = sb.serve(&web_manifest(&[vip], &[1]));

    let (tx_open, rx_open) = std::sync::mpsc::channel::<()>();
    let (tx_go, rx_go) = std::sync::mpsc::channel::<()>();
    let holder = sb.client.spawn(move || async move {
        let mut s = TcpStream::connect(SocketAddr::new(vip, 9000))
            .await
            .expect("connect");
        s.write_all(b"ping").await.expect("write");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.expect("echo before SIGTERM");
        let _ = tx_open.send(());
        let _ = rx_go.recv_timeout(Duration::from_secs(30));
        s.write_all(b"pong").await.expect("write while draining");
        tokio::time::timeout(IO_TIMEOUT, s.read_exact(&mut b))
            .await
            .expect("echo while draining stalled")
            .expect("echo while draining");
        b
    });
    rx_open
        .recv_timeout(Duration::from_secs(20))
        .expect("connection open");

    let from = sb.lightpath(lp).lines.len();
    sb.lightpath(lp).signal(nix::sys::signal::Signal::SIGTERM);
    sb.lightpath(lp)
        .lines
        .wait_for("stopped accepting", from, Duration::from_secs(5))
        .expect("listener closed on SIGTERM");
    // New connections: refused at once while the old one is still served.
    let outcome = sb
        .client
        .run(move || async move { probe(SocketAddr::new(vip, 80), Duration::from_secs(3)).await });
    match outcome {
        ConnectOutcome::Refused(t) => assert!(t < Duration::from_millis(100), "refusal took {t:?}"),
        other => panic!("new connection during drain must be refused: {other:?}"),
    }
    let _ = tx_go.send(());
    assert_eq!(&holder.join().expect("holder"), b"pong");
    // The holder has closed its connection: the drain completes and
    // lightpath exits 0 well before the deadline.
    let code = sb.procs[lp].wait(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{}", sb.lightpath(lp).lines.text());
}

#[test]
fn restart_after_a_crash_reconciles_rules_and_routing() {
    if !require_root("restart_after_a_crash_reconciles_rules_and_routing") {
        return;
    }
    let mut sb = Sandbox::new("crash", 1);
    sb.start_backend(1);
    let old = format!(
        "{}{}",
        node_yaml(),
        service_yaml("old", &[ip("10.96.0.40")], &[1], "node-a", "")
    );
    let lp = sb.serve(&old);
    assert!(sb.nft_table().contains("10.96.0.40"));
    sb.lightpath(lp).signal(nix::sys::signal::Signal::SIGKILL);
    let _ = sb.procs[lp].wait(Duration::from_secs(5));

    let new = format!(
        "{}{}",
        node_yaml(),
        service_yaml("new", &[ip("10.96.0.50")], &[1], "node-a", "")
    );
    sb.serve(&new);
    let table = sb.nft_table();
    assert!(
        !table.contains("10.96.0.40"),
        "stale frontend survived the restart:\n{table}"
    );
    assert!(table.contains("10.96.0.50 . tcp . 80"), "{table}");
    for fam in ["-4", "-6"] {
        let rules = sb.node.exec("ip", &[fam, "rule", "show"]).expect("ip rule");
        assert_eq!(
            rules
                .lines()
                .filter(|l| l.contains("fwmark 0x1/0x1 lookup 100"))
                .count(),
            1,
            "exactly one policy rule ({fam}):\n{rules}"
        );
    }
    let name = sb.client.run(|| {
        wait_http(
            SocketAddr::new(ip("10.96.0.50"), 80),
            Duration::from_secs(5),
        )
    });
    assert_eq!(name.expect("served after restart"), "pod-1");
}

#[test]
fn manifest_edits_move_frontends_between_proxy_and_reject_in_the_kernel() {
    if !require_root("manifest_edits_move_frontends_between_proxy_and_reject_in_the_kernel") {
        return;
    }
    let mut sb = Sandbox::new("edit", 1);
    sb.start_backend(1);
    let vip = ip("10.96.0.10");
    let served = web_manifest(&[vip], &[1]);
    let lp = sb.serve(&served);
    assert!(sb.nft_table().contains("10.96.0.10 . tcp . 80"));

    // All endpoints gone: the kernel rejects, as one incremental update.
    let from = sb.lightpath(lp).lines.len();
    sb.write_manifest("svc.yaml", &web_manifest(&[vip], &[]));
    let from = sb
        .lightpath(lp)
        .lines
        .wait_for("redirect rules updated", from, Duration::from_secs(10))
        .expect("rules updated");
    let table = sb.nft_table();
    assert!(
        table.contains("10.96.0.10 . tcp . 80 : goto reject_fe"),
        "{table}"
    );
    let log = sb.lightpath(lp).lines.text();
    assert!(
        !log.contains("full_reload=true"),
        "an incremental update was refused:\n{log}"
    );
    let outcome = sb
        .client
        .run(move || async move { probe(SocketAddr::new(vip, 80), Duration::from_secs(3)).await });
    assert!(
        matches!(outcome, ConnectOutcome::Refused(t) if t < Duration::from_millis(100)),
        "{outcome:?}"
    );

    // Back: served again.
    sb.write_manifest("svc.yaml", &served);
    sb.lightpath(lp)
        .lines
        .wait_for("redirect rules updated", from, Duration::from_secs(10))
        .expect("rules updated again");
    let name = sb
        .client
        .run(move || wait_http(SocketAddr::new(vip, 80), Duration::from_secs(5)));
    assert_eq!(name.expect("served again"), "pod-1");
}
