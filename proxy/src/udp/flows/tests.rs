//! Flow-table tests over loopback: the "frontend" is a plain UDP socket whose
//! local address is the frontend key, endpoints are UDP echo sockets.

use super::*;
use std::collections::HashSet;

use control::{Endpoint, Mode, Protocol, ServicePort, ServicePortName};

use crate::balance::{BalanceConfig, Balancers};

fn service(eps: &[SocketAddr]) -> Arc<ServicePort> {
    let eps: Arc<[Endpoint]> = eps.iter().copied().map(Endpoint::ready).collect();
    Arc::new(ServicePort::new(
        ServicePortName::new("default", "dns", "dns"),
        Protocol::Udp,
        Mode::L4,
        eps,
    ))
}

/// A UDP echo endpoint that prefixes replies with its own port, so the
/// client can tell which endpoint answered. Returns its address.
async fn echo() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let mut out = addr.port().to_be_bytes().to_vec();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from).await;
        }
    });
    addr
}

fn cfg(max_flows: usize, idle: Duration) -> FlowConfig {
    FlowConfig {
        max_flows,
        unreplied_timeout: idle,
        stream_timeout: idle,
        upstream_mark: 0,
        keep_client_source: false,
    }
}

/// A flow table in front of one service's endpoints, with the frontend
/// socket that replies leave from (its address is the flows' `orig_dst`).
struct Rig {
    _balancers: Balancers,
    b: Arc<Balancer>,
    front: Arc<UdpSocket>,
    front_addr: SocketAddr,
    table: Arc<FlowTable>,
}

impl Rig {
    async fn new(eps: &[SocketAddr], cfg: FlowConfig) -> Rig {
        let balancers = Balancers::new(BalanceConfig::default());
        let b = balancers.for_service(&service(eps));
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        Rig {
            _balancers: balancers,
            b,
            front_addr: front.local_addr().unwrap(),
            front,
            table: FlowTable::new(cfg),
        }
    }

    /// The flow from `client` to this frontend.
    fn key(&self, client: impl Into<SocketAddr>) -> FlowKey {
        FlowKey {
            client: client.into(),
            orig_dst: self.front_addr,
        }
    }

    /// Relays one datagram of flow `key` (cluster scope).
    fn forward(&self, key: FlowKey, payload: &[u8]) -> Result<SocketAddr, UdpError> {
        self.table.forward(
            key,
            &self.b,
            || (Scope::Cluster, Source::Node),
            payload,
            &self.front,
        )
    }
}

/// A silent endpoint (bound, never answers): only the clients' datagrams
/// count as activity. Keep the socket alive for the test.
fn silent() -> (std::net::UdpSocket, SocketAddr) {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    (s, addr)
}

async fn recv_within(sock: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("no reply within 5 s")
        .unwrap();
    buf.truncate(n);
    buf
}

#[tokio::test]
async fn replies_come_from_the_frontend_and_flows_stick() {
    let (e1, e2) = (echo().await, echo().await);
    let rig = Rig::new(&[e1, e2], cfg(1024, Duration::from_secs(30))).await;
    let table = &rig.table;

    let mut used = HashSet::new();
    for _ in 0..8 {
        // A connect()ed client accepts only datagrams from the frontend.
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(rig.front_addr).await.unwrap();
        let key = rig.key(client.local_addr().unwrap());
        let first = rig.forward(key, b"q0").unwrap();
        let r = recv_within(&client).await;
        assert_eq!(&r[2..], b"q0");
        assert_eq!(u16::from_be_bytes([r[0], r[1]]), first.port());
        for i in 1..5u8 {
            let ep = rig.forward(key, &[b'q', i]).unwrap();
            assert_eq!(ep, first, "a flow keeps its endpoint");
            let r = recv_within(&client).await;
            assert_eq!(u16::from_be_bytes([r[0], r[1]]), first.port());
            assert_eq!(&r[2..], &[b'q', i]);
        }
        used.insert(first);
    }
    assert_eq!(table.len(), 8);
    assert_eq!(used.len(), 2, "flows are balanced over both endpoints");
    assert_eq!(table.stats().datagrams_up.load(Ordering::Relaxed), 40);
    assert_eq!(table.stats().datagrams_down.load(Ordering::Relaxed), 40);
}

#[tokio::test]
async fn flows_expire_after_idle_timeout() {
    let rig = Rig::new(&[echo().await], cfg(1024, Duration::from_millis(200))).await;
    let table = &rig.table;
    for port in 1..=50u16 {
        rig.forward(rig.key(([127, 0, 0, 1], 40_000 + port)), b"x")
            .unwrap();
    }
    assert_eq!(table.len(), 50);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !table.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} flows left",
            table.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(table.stats().expired.load(Ordering::Relaxed), 50);
}

#[tokio::test]
async fn hundred_thousand_flows_stay_under_the_cap() {
    const CAP: usize = 512;
    let rig = Rig::new(&[echo().await], cfg(CAP, Duration::from_secs(60))).await;
    let table = &rig.table;
    for i in 0..100_000u32 {
        let [_, a, b, c] = i.to_be_bytes();
        let key = rig.key(([127, a, b, c.max(1)], 1000 + (i % 50_000) as u16));
        rig.forward(key, b"x").unwrap();
        assert!(table.len() <= CAP);
        if i % 10 == 0 {
            // Let aborted reply tasks run their drop, closing their sockets.
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(table.len(), CAP);
    let st = table.stats();
    assert_eq!(st.created.load(Ordering::Relaxed), 100_000);
    assert_eq!(st.evicted_cap.load(Ordering::Relaxed), 100_000 - CAP as u64);
}

#[tokio::test]
async fn flows_of_a_removed_endpoint_are_evicted() {
    let (e1, e2) = (echo().await, echo().await);
    let rig = Rig::new(&[e1, e2], cfg(1024, Duration::from_secs(30))).await;
    let table = &rig.table;
    let mut keys = Vec::new();
    for port in 1..=40u16 {
        let key = rig.key(([127, 0, 0, 1], 41_000 + port));
        rig.forward(key, b"x").unwrap();
        keys.push(key);
    }
    let on_e2 = keys
        .iter()
        .filter(|k| table.endpoint(k) == Some(e2))
        .count();
    assert!(on_e2 > 0 && on_e2 < 40, "{on_e2} of 40 flows on e2");
    assert_eq!(table.evict_missing(), 0, "nothing left the set yet");

    rig.b.update(&service(&[e1]));
    assert_eq!(table.evict_missing(), on_e2);
    assert_eq!(table.len(), 40 - on_e2);
    for k in &keys {
        // Survivors keep e1; evicted flows re-pick, and only e1 is left.
        let ep = rig.forward(*k, b"y").unwrap();
        assert_eq!(ep, e1);
    }
    assert_eq!(
        table.stats().evicted_endpoint.load(Ordering::Relaxed),
        on_e2 as u64
    );
}

#[tokio::test]
async fn no_endpoint_is_an_error_naming_the_service() {
    let rig = Rig::new(&[], FlowConfig::default()).await;
    let e = rig
        .forward(rig.key(([127, 0, 0, 1], 5000)), b"x")
        .unwrap_err();
    assert!(e.to_string().contains("default/dns:dns"), "{e}");
    assert!(rig.table.is_empty());
}

#[tokio::test]
async fn a_full_table_evicts_idle_flows_before_busy_ones() {
    let (_silent, e) = silent();
    let rig = Rig::new(&[e], cfg(4, Duration::from_secs(30))).await;
    let table = &rig.table;
    let key = |port: u16| rig.key(([127, 0, 0, 1], 42_000 + port));
    for port in 1..=4 {
        rig.forward(key(port), b"x").unwrap();
    }
    // Flow 1, the oldest, stays busy; 2..4 go quiet.
    tokio::time::sleep(Duration::from_millis(5)).await;
    rig.forward(key(1), b"again").unwrap();
    // Two newcomers push out the two oldest idle flows, not the busy one.
    for port in 5..=6 {
        rig.forward(key(port), b"x").unwrap();
    }
    assert_eq!(table.len(), 4);
    let alive: Vec<u16> = (1..=6)
        .filter(|p| table.endpoint(&key(*p)).is_some())
        .collect();
    assert_eq!(alive, vec![1, 4, 5, 6]);
    assert_eq!(table.stats().evicted_cap.load(Ordering::Relaxed), 2);
    // Without further activity its second chance is spent: next in line.
    for port in 7..=9 {
        rig.forward(key(port), b"x").unwrap();
    }
    assert!(table.endpoint(&key(1)).is_none(), "idle now, so evicted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_relays_and_new_flows_keep_the_cap_and_the_counts() {
    // Busy flows relay from several threads while others flood the table
    // with new flows: existing-flow datagrams take no table-wide lock, yet
    // the cap holds at every moment and every flow is accounted for.
    let (_silent, e) = silent();
    const CAP: usize = 64;
    let rig = Rig::new(&[e], cfg(CAP, Duration::from_secs(60))).await;
    let (table, b, front, front_addr) = (&rig.table, &rig.b, &rig.front, rig.front_addr);
    let key = move |task: u16, n: u16| FlowKey {
        client: SocketAddr::from(([127, 0, 1, task as u8], 1000 + n)),
        orig_dst: front_addr,
    };
    let mut tasks = Vec::new();
    for task in 0..4u16 {
        let (table, b, front) = (table.clone(), b.clone(), front.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            for n in 0..2_000u16 {
                // Even tasks: 4 busy flows each, reused; odd: a new flow
                // per datagram.
                let k = if task % 2 == 0 {
                    key(task, n % 4)
                } else {
                    key(task, n)
                };
                match table.forward(k, &b, || (Scope::Cluster, Source::Node), b"x", &front) {
                    Ok(ep) => {
                        assert_eq!(ep, e);
                        sent += 1;
                    }
                    // A full send buffer drops the datagram, counted.
                    Err(UdpError::Upstream { .. }) => {}
                    Err(other) => panic!("{other}"),
                }
                assert!(table.len() <= CAP, "{} flows > cap {CAP}", table.len());
                if n % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            sent
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("relays finish within 60 s")
            .unwrap();
    }
    let st = table.stats();
    assert!(table.len() <= CAP);
    assert_eq!(st.datagrams_up.load(Ordering::Relaxed), sent);
    assert_eq!(
        st.datagrams_up.load(Ordering::Relaxed) + st.dropped.load(Ordering::Relaxed),
        8_000
    );
    // No expiry (60 s idle), no endpoint change: every flow created is
    // either alive or was evicted for the cap.
    assert_eq!(st.expired.load(Ordering::Relaxed), 0);
    assert_eq!(
        st.created.load(Ordering::Relaxed),
        st.evicted_cap.load(Ordering::Relaxed) + table.len() as u64
    );
    assert!(
        st.created.load(Ordering::Relaxed) >= 4_000,
        "the flooders' flows"
    );
}
