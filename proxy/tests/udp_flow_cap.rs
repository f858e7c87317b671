//! The UDP flow table under a flood of distinct clients, through real
//! sockets on loopback: 100,000 client sockets (each its own address), one
//! datagram each, into lightpath's UDP receive loop. The table must never
//! hold more than its cap (and the process never more sockets than the cap
//! allows), every flow beyond the cap must be counted as an eviction in the
//! Prometheus series, and once the clients stop, every flow must idle out.
//!
//! The listener is a plain loopback socket that asks for original
//! destinations, so the "frontend" is its own address: the receive loop,
//! flow table, reply path and metrics are exactly those of `lightpath run`,
//! without needing TPROXY (or root).

mod admin_util;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use admin_util::{parse_prometheus, sample};
use control::{
    Endpoint, Frontend, FrontendKind, Mode, Protocol, ServicePort, ServicePortName, Table,
};
use lightpath::balance::{BalanceConfig, Balancers};
use lightpath::udp::{serve, FlowConfig, FlowTable};
use tokio::net::UdpSocket;

const FLOWS: u32 = 100_000;
const CAP: usize = 1_000;
const IDLE: Duration = Duration::from_millis(800);
/// Datagrams in flight before the client waits for the proxy to catch up
/// (the listener's receive buffer holds a few hundred).
const WINDOW: u64 = 128;

fn table(front: SocketAddr, endpoint: SocketAddr) -> Arc<Table> {
    let svc = Arc::new(ServicePort::new(
        ServicePortName::new("flood", "udp-cap", "dns"),
        Protocol::Udp,
        Mode::L4,
        Arc::from([Endpoint::ready(endpoint)]),
    ));
    Arc::new(Table::new(
        1,
        [Frontend::new(front, FrontendKind::ClusterIp, svc)],
    ))
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Client `i`'s own loopback address (all of 127/8 is local).
fn client_addr(i: u32) -> SocketAddr {
    let [_, a, b, c] = (i + 1).to_be_bytes();
    SocketAddr::from((Ipv4Addr::new(127, a.max(1), b, c), 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_clients_stay_under_the_cap_and_idle_out() {
    let metrics = lightpath::metrics::install().expect("metrics recorder");

    // The endpoint: echoes every datagram.
    let endpoint = UdpSocket::bind("127.0.0.1:0").await.expect("endpoint");
    let endpoint_addr = endpoint.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = endpoint.recv_from(&mut buf).await {
            let _ = endpoint.send_to(&buf[..n], from).await;
        }
    });

    let listener = StdUdpSocket::bind("127.0.0.1:0").expect("listener");
    let front = listener.local_addr().expect("addr");
    redirect::sockopt::set_recv_orig_dst(&listener, front).expect("IP_RECVORIGDSTADDR");
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = Arc::new(UdpSocket::from_std(listener).expect("tokio socket"));
    let (_tx, rx) = tokio::sync::watch::channel(table(front, endpoint_addr));
    let balancers = Arc::new(Balancers::new(BalanceConfig::default()));
    let flows = FlowTable::new(FlowConfig {
        max_flows: CAP,
        unreplied_timeout: IDLE,
        stream_timeout: IDLE,
        upstream_mark: 0,
        keep_client_source: false,
    });
    let server = tokio::spawn(serve(listener, rx, balancers, flows.clone()));

    let fds_before = open_fds();
    let st = flows.stats();
    // Every datagram is either relayed upstream or counted as dropped.
    let handled = || st.datagrams_up.load(Ordering::Relaxed) + st.dropped.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut max_flows = 0;
    let mut max_fds = 0;
    // Memory once the table is full and has turned over ten times, against
    // the end: the other 90,000 flows must not add to it.
    let mut rss_full = 0;
    for i in 0..FLOWS {
        let c = StdUdpSocket::bind(client_addr(i)).expect("client socket");
        c.send_to(b"flood", front).expect("send");
        drop(c);
        let sent = u64::from(i) + 1;
        if sent % WINDOW == 0 || sent == u64::from(FLOWS) {
            // Wait (bounded) until the proxy has handled all but a window.
            let deadline = Instant::now() + Duration::from_secs(10);
            while handled() + WINDOW / 2 < sent && sent < u64::from(FLOWS) {
                assert!(
                    Instant::now() < deadline,
                    "proxy stuck at {} of {sent} datagrams",
                    handled()
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            max_flows = max_flows.max(flows.len());
            max_fds = max_fds.max(open_fds());
            if rss_full == 0 && sent >= 10 * CAP as u64 {
                rss_full = rss();
            }
            assert!(flows.len() <= CAP, "{} flows > cap {CAP}", flows.len());
        }
    }
    // The last datagrams.
    let deadline = Instant::now() + Duration::from_secs(10);
    while handled() < u64::from(FLOWS) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let flood = started.elapsed();
    let rss_end = rss();
    let created = st.created.load(Ordering::Relaxed);
    let dropped = st.dropped.load(Ordering::Relaxed);
    eprintln!(
        "{FLOWS} clients in {flood:?}: {created} flows created, {dropped} datagrams dropped, \
         at most {max_flows} flows and {max_fds} fds (before: {fds_before}), \
         RSS {:.1} MiB with the table full, {:.1} MiB at the end",
        rss_full as f64 / 1048576.0,
        rss_end as f64 / 1048576.0
    );
    assert!(
        rss_end < rss_full + 16 * 1024 * 1024,
        "memory grew with the number of clients: {rss_full} -> {rss_end} bytes"
    );
    // Every datagram was handled (one lost in a full receive buffer would
    // have been counted nowhere: the window prevents that), and each client
    // got its own flow.
    assert_eq!(handled(), u64::from(FLOWS));
    assert_eq!(created, st.datagrams_up.load(Ordering::Relaxed));
    assert!(
        dropped < u64::from(FLOWS) / 100,
        "{dropped} datagrams dropped"
    );
    assert!(max_flows <= CAP);
    // One upstream socket per flow, plus evicted ones not yet closed by
    // their aborted task: bounded by the cap, not by the clients.
    assert!(
        max_fds < fds_before + 2 * CAP + 512,
        "{max_fds} open fds for a cap of {CAP}"
    );
    let udp_cap = [("service", "udp-cap")];
    let s = parse_prometheus(&metrics.render());
    // Flows beyond the cap are evicted by it. When the flood runs slower
    // than CAP flows per IDLE (a loaded machine), some flows idle out
    // before the cap reaches them instead; each flow that left is counted
    // exactly once either way (checked after the idle-out below).
    let evicted = sample(
        &s,
        "lightpath_udp_flow_evictions_total",
        &[("service", "udp-cap"), ("reason", "cap")],
    )
    .unwrap_or(0.0);
    assert!(
        evicted > 0.0,
        "no cap evictions counted for {created} flows through a cap of {CAP}"
    );
    assert_eq!(
        sample(&s, "lightpath_udp_flows_created_total", &udp_cap),
        Some(created as f64)
    );
    assert_eq!(
        sample(&s, "lightpath_udp_received_datagrams_total", &udp_cap),
        Some(created as f64)
    );

    // Quiet now: every flow idles out.
    let deadline = Instant::now() + IDLE * 5;
    while !flows.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} flows left {:?} after the last datagram",
            flows.len(),
            IDLE * 5
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = parse_prometheus(&metrics.render());
    assert_eq!(
        sample(&s, "lightpath_udp_flows_active", &udp_cap),
        Some(0.0)
    );
    let expired = sample(&s, "lightpath_udp_flows_expired_total", &udp_cap).unwrap_or(0.0);
    assert!(expired >= CAP as f64, "the last {CAP} flows idled out");
    assert_eq!(
        evicted + expired,
        created as f64,
        "every flow counted once when it left: {evicted} cap evictions + {expired} expiries"
    );
    server.abort();
}
