//! The L4 relay under misbehaving peers: idle connections, hanging
//! endpoints, floods, resets, the connection cap and drain. None of them may
//! stall other connections.

#[path = "l4_common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use control::Affinity;
use lightpath::drain::Drained;
use lightpath::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A fresh connection through `addr` completes a round trip promptly.
async fn assert_prompt(addr: std::net::SocketAddr, what: &str) {
    let start = Instant::now();
    let (mut s, _) = connect_greeted(addr).await;
    roundtrip(&mut s, b"ping").await;
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "{what}: round trip took {took:?}"
    );
}

#[tokio::test]
async fn idle_timeout_closes_quiet_connections_only() {
    let b = Backend::echo(1).await;
    let mut cfg = ServerConfig::default();
    // 1 s against ticks 100 ms apart: a loaded machine can stretch a gap
    // several-fold before the busy connection looks idle.
    cfg.relay.copy.idle_timeout = Duration::from_millis(1000);
    let h = Harness::start(1, cfg, |a| {
        vec![(a[0], service("idle", &[b.addr], Affinity::None))]
    })
    .await;
    let (mut quiet, _) = connect_greeted(h.addrs[0]).await;
    let (mut busy, _) = connect_greeted(h.addrs[0]).await;
    let start = Instant::now();
    // Keep one busy past the timeout.
    for _ in 0..14 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        roundtrip(&mut busy, b"tick").await;
    }
    let r = expect_closed(&mut quiet, Duration::from_secs(2)).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "idle connection aborted, got {r:?}"
    );
    let closed_after = start.elapsed();
    assert!(
        closed_after >= Duration::from_millis(950),
        "{closed_after:?}"
    );
    roundtrip(&mut busy, b"still busy").await;
}

#[tokio::test]
async fn hanging_endpoint_does_not_stall_other_services() {
    let hang = Backend::hang(1).await;
    let good = Backend::echo(2).await;
    let h = Harness::start(2, ServerConfig::default(), |a| {
        vec![
            (a[0], service("hang", &[hang.addr], Affinity::None)),
            (a[1], service("good", &[good.addr], Affinity::None)),
        ]
    })
    .await;
    let mut stuck = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(h.addrs[0]).await.expect("connect");
        s.write_all(b"anyone?").await.expect("write");
        stuck.push(s);
    }
    for i in 0..20 {
        assert_prompt(h.addrs[1], &format!("good #{i} beside 50 hung")).await;
    }
    let deadline = Instant::now() + WAIT;
    while hang.accepted() < 50 {
        assert!(
            Instant::now() < deadline,
            "hung endpoint got {} of 50",
            hang.accepted()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The hung ones are still open (no reply, no close).
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(200), stuck[0].read(&mut b)).await;
    assert!(r.is_err(), "still waiting on the hung endpoint");
}

#[tokio::test]
async fn flood_of_idle_connections_does_not_stall_others() {
    let b = Backend::echo(1).await;
    let h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("flood", &[b.addr], Affinity::None))]
    })
    .await;
    // Connections that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(TcpStream::connect(h.addrs[0]).await.expect("connect"));
    }
    for i in 0..20 {
        assert_prompt(h.addrs[0], &format!("active #{i} among 400 idle")).await;
    }
    let deadline = Instant::now() + WAIT;
    while h.server.open_connections() < 400 {
        assert!(
            Instant::now() < deadline,
            "open: {}",
            h.server.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(idle);
    let deadline = Instant::now() + WAIT;
    while h.server.open_connections() > 0 {
        assert!(
            Instant::now() < deadline,
            "released: {}",
            h.server.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn over_the_connection_cap_is_reset_not_queued() {
    let b = Backend::echo(1).await;
    let cfg = ServerConfig {
        max_connections: 8,
        ..ServerConfig::default()
    };
    let h = Harness::start(1, cfg, |a| {
        vec![(a[0], service("cap", &[b.addr], Affinity::None))]
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_greeted(h.addrs[0]).await);
    }
    let start = Instant::now();
    let mut over = TcpStream::connect(h.addrs[0]).await.expect("connect");
    let r = expect_closed(&mut over, Duration::from_secs(2)).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "over the cap: reset, got {r:?}"
    );
    assert!(start.elapsed() < Duration::from_millis(500));
    // Freeing a slot makes room again.
    held.pop();
    let deadline = Instant::now() + WAIT;
    while h.server.open_connections() >= 8 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_prompt(h.addrs[0], "after a slot freed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_mid_stream_resets_upstream_only() {
    let b = Backend::echo(1).await;
    let h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("rst", &[b.addr], Affinity::None))]
    })
    .await;
    let (mut other, _) = connect_greeted(h.addrs[0]).await;
    let (mut victim, _) = connect_greeted(h.addrs[0]).await;
    let chunk = vec![7u8; 256 * 1024];
    victim.write_all(&chunk).await.expect("stream");
    victim.set_zero_linger().expect("linger");
    drop(victim);
    // The backend's side of that connection ends in a reset, not a clean EOF.
    let ends = b.wait_ends(1).await;
    assert!(
        matches!(ends[0], End::Error(k) if k == std::io::ErrorKind::ConnectionReset || k == std::io::ErrorKind::BrokenPipe),
        "backend saw {ends:?}"
    );
    roundtrip(&mut other, b"unaffected").await;
    assert_prompt(h.addrs[0], "after a reset").await;
}

#[tokio::test]
async fn upstream_reset_resets_the_client() {
    let b = Backend::echo(1).await;
    let h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("ursr", &[b.addr], Affinity::None))]
    })
    .await;
    let (mut s, _) = connect_greeted(h.addrs[0]).await;
    s.write_all(b"RESET").await.expect("write");
    let r = expect_closed(&mut s, Duration::from_secs(2)).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "client sees the reset, got {r:?}"
    );
}

#[tokio::test]
async fn drain_stops_accepting_then_forces_after_deadline() {
    let b = Backend::echo(1).await;
    let mut h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("drain", &[b.addr], Affinity::None))]
    })
    .await;
    let (mut open, _) = connect_greeted(h.addrs[0]).await;
    let signal = h.signal.take().expect("signal");
    let drain = tokio::spawn(signal.drain(Duration::from_millis(600)));
    // The accept loop stops: new connections are refused.
    let deadline = Instant::now() + WAIT;
    loop {
        match TcpStream::connect(h.addrs[0]).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => {}
        }
        assert!(Instant::now() < deadline, "listener closed on drain");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The established connection keeps working until the deadline...
    roundtrip(&mut open, b"during drain").await;
    // ...and is cut after it.
    let r = expect_closed(&mut open, Duration::from_secs(3)).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "forced close, got {r:?}"
    );
    let out = tokio::time::timeout(WAIT, drain)
        .await
        .expect("drain done")
        .expect("join");
    assert_eq!(out, Drained::Forced { remaining: 1 });
}

#[tokio::test]
async fn drain_is_graceful_when_connections_finish() {
    let b = Backend::echo(1).await;
    let mut h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("gdrain", &[b.addr], Affinity::None))]
    })
    .await;
    let (mut open, _) = connect_greeted(h.addrs[0]).await;
    let signal = h.signal.take().expect("signal");
    let drain = tokio::spawn(signal.drain(Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    roundtrip(&mut open, b"finishing").await;
    open.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.expect("eof");
    drop(open);
    let start = Instant::now();
    let out = tokio::time::timeout(WAIT, drain)
        .await
        .expect("drain done")
        .expect("join");
    assert_eq!(out, Drained::Graceful);
    assert!(start.elapsed() < Duration::from_secs(2));
}
