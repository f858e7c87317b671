//! End to end through real TPROXY rules: a client namespace dials ClusterIPs,
//! the node namespace runs the real `lightpath run`, backend namespaces run
//! `lightpath backend`. Needs root (see `support::netns::require_root`).

mod support {
    pub mod netns;
}

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::netns::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn vip4() -> IpAddr {
    "10.96.0.10".parse().expect("literal")
}

fn vip6() -> IpAddr {
    "fd00:96::10".parse().expect("literal")
}

/// A sandbox with `pods` backends running and lightpath serving one
/// dual-stack Service over all of them.
fn serving(tag: &str, pods: usize) -> Sandbox {
    let mut sb = Sandbox::new(tag, pods);
    for i in 1..=pods {
        sb.start_backend(i);
    }
    let all: Vec<usize> = (1..=pods).collect();
    sb.serve(&web_manifest(&[vip4(), vip6()], &all));
    sb
}

async fn names(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let name = http_name(addr)
            .await
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        *seen.entry(name).or_insert(0) += 1;
    }
    seen
}

/// Like [`names`], `at_once` requests at a time.
async fn concurrent_names(addr: SocketAddr, n: usize, at_once: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n / at_once {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..at_once {
            batch.spawn(async move { http_name(addr).await });
        }
        while let Some(r) = batch.join_next().await {
            let name = r
                .expect("request task")
                .unwrap_or_else(|e| panic!("{addr}: {e}"));
            *seen.entry(name).or_insert(0) += 1;
        }
    }
    seen
}

#[test]
fn clusterip_reaches_every_ready_endpoint() {
    if !require_root("clusterip_reaches_every_ready_endpoint") {
        return;
    }
    let sb = serving("every", 3);
    let seen = sb.client.run(|| names(SocketAddr::new(vip4(), 80), 60));
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        vec!["pod-1", "pod-2", "pod-3"],
        "every endpoint must get connections: {seen:?}"
    );
}

#[test]
fn ipv6_clusterip_works() {
    if !require_root("ipv6_clusterip_works") {
        return;
    }
    let sb = serving("v6", 2);
    let seen = sb.client.run(|| names(SocketAddr::new(vip6(), 80), 30));
    assert_eq!(seen.len(), 2, "both endpoints over IPv6: {seen:?}");
}

#[test]
fn node_local_clients_reach_clusterips() {
    if !require_root("node_local_clients_reach_clusterips") {
        return;
    }
    let sb = serving("local", 2);
    // Processes in the node namespace itself: caught by the output hook.
    // Ten at a time: with connections in flight the balancer spreads them
    // whatever the timing (one after another, a fast first endpoint may
    // keep winning the comparison).
    let v4 = sb
        .node
        .run(|| concurrent_names(SocketAddr::new(vip4(), 80), 20, 10));
    assert_eq!(v4.len(), 2, "node-local IPv4: {v4:?}");
    let v6 = sb
        .node
        .run(|| concurrent_names(SocketAddr::new(vip6(), 80), 20, 10));
    assert_eq!(v6.len(), 2, "node-local IPv6: {v6:?}");
}

/// 100 MB each way through the echo port, hashed on both sides.
#[test]
fn hundred_megabytes_arrive_intact_both_ways() {
    if !require_root("hundred_megabytes_arrive_intact_both_ways") {
        return;
    }
    const TOTAL: usize = 100 * 1024 * 1024;
    const CHUNK: usize = 256 * 1024;
    let sb = serving("bulk", 1);
    let (sent, received, elapsed) = sb.client.run(|| async {
        let start = std::time::Instant::now();
        let s = TcpStream::connect(SocketAddr::new(vip4(), 9000))
            .await
            .expect("connect");
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut h = Sha256::new();
            // Deterministic, non-repeating content: a counter in every 8 bytes.
            let mut buf = vec![0u8; CHUNK];
            let mut counter: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut left = TOTAL;
            while left > 0 {
                for word in buf.chunks_exact_mut(8) {
                    counter = counter.wrapping_mul(6364136223846793005).wrapping_add(1);
                    word.copy_from_slice(&counter.to_le_bytes());
                }
                let n = left.min(CHUNK);
                h.update(&buf[..n]);
                w.write_all(&buf[..n]).await.expect("write");
                left -= n;
            }
            w.shutdown().await.expect("shutdown");
            h.finalize()
        });
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0usize;
        loop {
            let n = tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf))
                .await
                .expect("read stalled")
                .expect("read");
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            got += n;
        }
        assert_eq!(got, TOTAL, "byte count");
        (writer.await.expect("writer"), h.finalize(), start.elapsed())
    });
    assert_eq!(sent, received, "echoed content differs");
    eprintln!(
        "100 MB echoed through lightpath in {elapsed:?} ({:.0} MB/s each way)",
        100.0 / elapsed.as_secs_f64()
    );
}

/// The client's FIN reaches the backend (which answers only after it) and
/// the reply still flows back on the half-closed connection.
#[test]
fn half_close_reaches_backend_and_reply_flows() {
    if !require_root("half_close_reaches_backend_and_reply_flows") {
        return;
    }
    let sb = serving("half", 1);
    let (echoed, eof) = sb.client.run(|| async {
        let mut s = TcpStream::connect(SocketAddr::new(vip4(), 9000))
            .await
            .expect("connect");
        s.write_all(b"hello after which I close my side")
            .await
            .expect("write");
        s.shutdown().await.expect("shutdown(WR)");
        let mut buf = Vec::new();
        let r = tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut buf)).await;
        (buf, matches!(r, Ok(Ok(_))))
    });
    assert!(eof, "backend never closed: our FIN did not reach it");
    assert_eq!(echoed, b"hello after which I close my side");
}

/// One endpoint of the service has no process listening: every connection
/// still succeeds, on the live one.
#[test]
fn connect_failure_is_retried_on_another_endpoint() {
    if !require_root("connect_failure_is_retried_on_another_endpoint") {
        return;
    }
    let mut sb = Sandbox::new("retry", 2);
    sb.start_backend(1); // pod 2 exists (its address answers) but refuses.
    sb.serve(&web_manifest(&[vip4()], &[1, 2]));
    let seen = sb.client.run(|| names(SocketAddr::new(vip4(), 80), 30));
    assert_eq!(
        seen.get("pod-1"),
        Some(&30),
        "all 30 served by the live pod: {seen:?}"
    );
}

/// `--tcp-congestion`: both of lightpath's legs of a relayed connection, at
/// L4 (the echo port) and at L7 (a port named `http`, whose upstream
/// connection stays pooled), use the chosen algorithm. Read from the node
/// namespace's socket table (`ss -ti`) while the client holds both
/// connections open; `reno` is not any usual default, so this fails when
/// the flag does not reach a socket.
#[test]
fn relayed_connections_use_the_chosen_congestion_control() {
    if !require_root("relayed_connections_use_the_chosen_congestion_control") {
        return;
    }
    let l7_vip: IpAddr = "10.96.0.11".parse().expect("literal");
    let mut sb = Sandbox::new("cc", 1);
    sb.start_backend(1);
    let app =
        service_yaml("app", &[l7_vip], &[1], "node-a", "").replace("name: web,", "name: http,");
    let manifest = format!("{}{app}", web_manifest(&[vip4()], &[1]));
    let path = sb.write_manifest("svc.yaml", &manifest);
    sb.start_lightpath(&path, &["--tcp-congestion", "reno"]);
    let node = sb.node.name.clone();
    let table = sb.client.run(move || async move {
        let mut echo = TcpStream::connect(SocketAddr::new(vip4(), 9000))
            .await
            .expect("L4 connect");
        echo.write_all(b"ping").await.expect("L4 write");
        let mut buf = [0u8; 4];
        tokio::time::timeout(IO_TIMEOUT, echo.read_exact(&mut buf))
            .await
            .expect("L4 echo in time")
            .expect("L4 echo");
        assert_eq!(&buf, b"ping");
        let mut http = TcpStream::connect(SocketAddr::new(l7_vip, 80))
            .await
            .expect("L7 connect");
        http.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .expect("L7 write");
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(IO_TIMEOUT, http.read(&mut chunk))
                .await
                .expect("L7 response in time")
                .expect("L7 read");
            assert!(
                n > 0,
                "L7 connection closed: {:?}",
                String::from_utf8_lossy(&head)
            );
            head.extend_from_slice(&chunk[..n]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&head)
        );
        // Both connections are open: lightpath holds four sockets.
        must(
            "ip",
            &[
                "netns",
                "exec",
                &node,
                "ss",
                "-tinH",
                "state",
                "established",
            ],
        )
    });
    // `ss -i` prints each socket's line, then its details: the TCP options
    // in use (`ts`, `sack`, ...), then the congestion control's name.
    let lines: Vec<&str> = table.lines().collect();
    let sockets: Vec<(&str, &str)> = lines
        .chunks(2)
        .filter_map(|c| Some((c[0], *c.get(1)?)))
        .collect();
    assert!(
        sockets.len() >= 4,
        "four relayed sockets expected:\n{table}"
    );
    for (sock, info) in &sockets {
        assert!(
            info.split_whitespace().any(|w| w == "reno"),
            "{sock}\n{info}\nin:\n{table}"
        );
    }
}
