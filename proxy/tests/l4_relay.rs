//! The L4 relay through real loopback sockets: balancing, integrity,
//! half-close, endpoint updates, retries, affinity and refusals.

#[path = "l4_common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use control::Affinity;
use lightpath::balance::Scope;
use lightpath::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_reaches_every_endpoint_evenly() {
    let bs = [
        Backend::echo(1).await,
        Backend::echo(2).await,
        Backend::echo(3).await,
    ];
    let eps: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("even", &eps, Affinity::None))]
    })
    .await;
    // 90 concurrent connections, all held open: in-flight drives p2c, so the
    // split must be close to even.
    let mut held = Vec::new();
    let mut by_id: HashMap<[u8; 4], usize> = HashMap::new();
    for i in 0..90u32 {
        let (mut s, id) = connect_greeted(h.addrs[0]).await;
        roundtrip(&mut s, format!("hello {i}").as_bytes()).await;
        *by_id.entry(id).or_default() += 1;
        held.push(s);
    }
    for b in &bs {
        let n = by_id.get(&b.id).copied().unwrap_or(0);
        assert!(
            (22..=38).contains(&n),
            "backend {:?}: {n} of 90 ({by_id:?})",
            b.id
        );
        assert_eq!(b.accepted(), n);
    }
    let bal = h
        .server
        .balancers()
        .get(
            control::Family::V4,
            &service("even", &[], Affinity::None).name,
        )
        .expect("balancer");
    let in_flight: usize = bal
        .backends(Scope::Cluster)
        .iter()
        .map(|b| b.in_flight())
        .sum();
    assert_eq!(in_flight, 90);
    drop(held);
    let deadline = Instant::now() + WAIT;
    while bal
        .backends(Scope::Cluster)
        .iter()
        .map(|b| b.in_flight())
        .sum::<usize>()
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "in-flight slots released after close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deterministic pseudo-random bytes (xorshift64), so a receiver can check a
/// stream byte for byte without keeping a copy.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_both_ways_intact() {
    const TOTAL: usize = 100 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let b = Backend::echo(1).await;
    let h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("bulk", &[b.addr], Affinity::None))]
    })
    .await;
    let (s, _) = connect_greeted(h.addrs[0]).await;
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut p = Pattern(0x9e3779b97f4a7c15);
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..TOTAL / CHUNK {
            p.fill(&mut buf);
            wr.write_all(&buf).await.expect("send");
        }
        wr.shutdown().await.expect("half-close");
        wr
    });
    let start = Instant::now();
    let mut p = Pattern(0x9e3779b97f4a7c15);
    let mut expect = vec![0u8; CHUNK];
    let mut got = vec![0u8; CHUNK];
    for i in 0..TOTAL / CHUNK {
        p.fill(&mut expect);
        tokio::time::timeout(Duration::from_secs(60), rd.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("echo");
        assert!(got == expect, "chunk {i} differs");
    }
    // Then a clean EOF: the backend saw our FIN and half-closed back.
    let mut tail = [0u8; 1];
    let n = tokio::time::timeout(WAIT, rd.read(&mut tail))
        .await
        .expect("eof")
        .expect("eof");
    assert_eq!(n, 0);
    writer.await.expect("writer");
    let secs = start.elapsed().as_secs_f64();
    println!(
        "100 MiB each way in {secs:.2} s ({:.0} MiB/s per direction)",
        100.0 / secs
    );
    assert_eq!(b.wait_ends(1).await, vec![End::Eof]);
}

#[tokio::test]
async fn half_close_reaches_backend_and_reply_still_flows() {
    let b = Backend::echo(1).await;
    let h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("half", &[b.addr], Affinity::None))]
    })
    .await;
    let (mut s, _) = connect_greeted(h.addrs[0]).await;
    s.write_all(b"last words").await.expect("write");
    s.shutdown().await.expect("shutdown(WR)");
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("reply in time")
        .expect("reply");
    assert_eq!(rest, b"last words");
    // The backend only half-closes after it saw our EOF.
    assert_eq!(b.wait_ends(1).await, vec![End::Eof]);
}

#[tokio::test]
async fn removed_endpoint_gets_no_new_connections_but_established_flows() {
    let bs = [Backend::echo(1).await, Backend::echo(2).await];
    let eps: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("upd", &eps, Affinity::None))]
    })
    .await;
    let (mut old, id) = connect_greeted(h.addrs[0]).await;
    let (gone, stay) = if id == bs[0].id {
        (&bs[0], &bs[1])
    } else {
        (&bs[1], &bs[0])
    };
    h.publish(vec![(
        h.addrs[0],
        service("upd", &[stay.addr], Affinity::None),
    )]);
    let before = gone.accepted();
    for _ in 0..20 {
        let (mut s, id) = connect_greeted(h.addrs[0]).await;
        assert_eq!(id, stay.id, "new connection went to the removed endpoint");
        roundtrip(&mut s, b"new").await;
    }
    assert_eq!(gone.accepted(), before);
    // The established connection is untouched.
    roundtrip(&mut old, b"still here").await;
    // And an endpoint added back is used again.
    h.publish(vec![(h.addrs[0], service("upd", &eps, Affinity::None))]);
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(connect_greeted(h.addrs[0]).await);
    }
    assert!(
        gone.accepted() > before,
        "re-added endpoint receives traffic"
    );
}

#[tokio::test]
async fn connect_failure_is_retried_on_another_endpoint() {
    let live = Backend::echo(1).await;
    let dead = dead_addr().await;
    let h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("retry", &[dead, live.addr], Affinity::None))]
    })
    .await;
    for _ in 0..30 {
        let (mut s, id) = connect_greeted(h.addrs[0]).await;
        assert_eq!(id, live.id);
        roundtrip(&mut s, b"ok").await;
    }
    let bal = h
        .server
        .balancers()
        .get(
            control::Family::V4,
            &service("retry", &[], Affinity::None).name,
        )
        .expect("balancer");
    let d = bal.backend(dead).expect("dead backend");
    assert!(d.failures() >= 1, "the dead endpoint was tried");
    assert_eq!(live.accepted(), 30);
}

#[tokio::test]
async fn all_endpoints_dead_resets_the_client_fast() {
    let eps = vec![
        dead_addr().await,
        dead_addr().await,
        dead_addr().await,
        dead_addr().await,
    ];
    let h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("dead", &eps, Affinity::None))]
    })
    .await;
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(h.addrs[0])
        .await
        .expect("connect");
    let r = expect_closed(&mut s, Duration::from_secs(2)).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "reset, got {r:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    let bal = h
        .server
        .balancers()
        .get(
            control::Family::V4,
            &service("dead", &[], Affinity::None).name,
        )
        .expect("balancer");
    let tried: u64 = bal
        .backends(Scope::Cluster)
        .iter()
        .map(|b| b.failures())
        .sum();
    assert_eq!(tried, 3, "bounded: three attempts on distinct endpoints");
}

#[tokio::test]
async fn client_ip_affinity_keeps_a_client_on_one_endpoint() {
    let bs = [
        Backend::echo(1).await,
        Backend::echo(2).await,
        Backend::echo(3).await,
    ];
    let eps: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let aff = Affinity::ClientIp {
        timeout: Duration::from_secs(10800),
    };
    let h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("sticky", &eps, aff))]
    })
    .await;
    let (first, id) = connect_greeted(h.addrs[0]).await;
    let mut held = vec![first];
    // Even with that endpoint loaded by held connections, the client stays.
    for _ in 0..30 {
        let (s, got) = connect_greeted(h.addrs[0]).await;
        assert_eq!(got, id);
        held.push(s);
    }
    let bal = h
        .server
        .balancers()
        .get(
            control::Family::V4,
            &service("sticky", &[], Affinity::None).name,
        )
        .expect("balancer");
    let sticky = bal
        .backends(Scope::Cluster)
        .into_iter()
        .find(|b| b.in_flight() == 31)
        .expect("all 31 on one endpoint");
    assert!(eps.contains(&sticky.addr()));
}

#[tokio::test]
async fn no_endpoints_or_unknown_frontend_closes_at_once() {
    let h = Harness::start(2, ServerConfig::default(), |a| {
        // a[1] has no row at all: an unknown frontend.
        vec![(a[0], service("empty", &[], Affinity::None))]
    })
    .await;
    for addr in [h.addrs[0], h.addrs[1]] {
        let start = Instant::now();
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let r = expect_closed(&mut s, Duration::from_secs(2)).await;
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{addr}: reset, got {r:?}"
        );
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{addr}: immediate"
        );
    }
}
