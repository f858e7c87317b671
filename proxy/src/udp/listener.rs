//! The receive loop of one transparent UDP socket.
//!
//! Why a loop of its own: a TPROXY'd datagram arrives on the one socket bound
//! to the proxy port, with its original destination only in a control
//! message. This loop reads it ([`redirect::sockopt::recv_orig_dst`]), finds
//! the frontend in the current table snapshot and hands the datagram to the
//! [`FlowTable`]; replies leave from a socket bound to that frontend address
//! ([`ReplySockets`]), so the client sees the service address as source.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use control::{FrontendKey, Protocol, TableRx};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::{FlowKey, FlowTable};
use crate::balance::{Balancers, Scope};

/// Reply sockets, one per frontend address, created on first use.
pub struct ReplySockets {
    listener: Arc<UdpSocket>,
    map: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
}

impl ReplySockets {
    /// `listener` answers for its own address (a plain, non-TPROXY setup);
    /// every other frontend gets a transparent socket bound to it.
    pub fn new(listener: Arc<UdpSocket>) -> Self {
        ReplySockets {
            listener,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, from: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        if self.listener.local_addr().ok() == Some(from) {
            return Ok(self.listener.clone());
        }
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&from) {
            return Ok(s.clone());
        }
        let s = Arc::new(UdpSocket::from_std(redirect::sockopt::reply_socket(from)?)?);
        map.insert(from, s.clone());
        Ok(s)
    }
}

/// Serves `sock` until it fails: every datagram goes to its frontend's flow.
/// Unknown frontends, truncated datagrams and datagrams without an original
/// destination are dropped (counted in the flow table's `dropped`).
pub async fn serve(
    sock: Arc<UdpSocket>,
    table: TableRx,
    balancers: Arc<Balancers>,
    flows: Arc<FlowTable>,
) -> io::Result<()> {
    let replies = ReplySockets::new(sock.clone());
    let mut buf = vec![0u8; 65_536];
    loop {
        sock.readable().await?;
        let d = match sock.try_io(Interest::READABLE, || {
            redirect::sockopt::recv_orig_dst(&*sock, &mut buf)
        }) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!(error = %e, "udp receive failed");
                continue;
            }
        };
        let drop_one = || {
            flows
                .stats()
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        };
        let Some(dst) = d.orig_dst.filter(|_| !d.truncated) else {
            drop_one();
            continue;
        };
        let snap = table.borrow().clone();
        let Some(fe) = snap.lookup(&FrontendKey::new(dst, Protocol::Udp)) else {
            drop_one();
            continue;
        };
        let balancer = balancers.for_service_at(&fe.service, snap.version);
        let scope = Scope::of(fe);
        let reply = match replies.get(dst) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(frontend = %dst, error = %e, "cannot bind a reply socket");
                drop_one();
                continue;
            }
        };
        let key = FlowKey {
            client: d.from,
            orig_dst: dst,
        };
        if let Err(e) = flows
            .forward(key, &balancer, scope, &buf[..d.len], &reply)
            .await
        {
            tracing::debug!(client = %d.from, frontend = %dst, error = %e, "udp datagram dropped");
        }
    }
}

/// Applies every new table snapshot to the balancers, then evicts the flows
/// whose endpoint left, until the table's sender is gone.
pub async fn evict_on_update(mut table: TableRx, balancers: Arc<Balancers>, flows: Arc<FlowTable>) {
    while table.changed().await.is_ok() {
        let snap = table.borrow_and_update().clone();
        balancers.sync(&snap);
        let n = flows.evict_missing();
        if n > 0 {
            tracing::debug!(flows = n, "udp flows evicted: endpoint left");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    use control::{
        Affinity, Endpoint, EndpointState, Frontend, FrontendKind, Mode, ServicePort,
        ServicePortName, Table,
    };

    use crate::balance::BalanceConfig;
    use crate::udp::FlowConfig;

    fn table(front: SocketAddr, eps: &[SocketAddr], version: u64) -> Arc<Table> {
        let eps: Arc<[Endpoint]> = eps
            .iter()
            .map(|a| Endpoint {
                addr: *a,
                state: EndpointState::Ready,
                node_name: None,
                zone: None,
            })
            .collect();
        let svc = Arc::new(ServicePort {
            name: ServicePortName {
                namespace: "default".into(),
                name: "dns".into(),
                port: String::new(),
            },
            protocol: Protocol::Udp,
            mode: Mode::L4,
            affinity: Affinity::None,
            cluster_endpoints: eps,
            local_endpoints: Arc::from(Vec::new()),
            internal_local: false,
            external_local: false,
            health_check_node_port: None,
            annotations: BTreeMap::new(),
        });
        let key = FrontendKey::new(front, Protocol::Udp);
        let mut t = Table {
            version,
            ..Table::default()
        };
        t.frontends.insert(
            key,
            Frontend {
                key,
                kind: FrontendKind::ClusterIp,
                service: svc,
            },
        );
        Arc::new(t)
    }

    async fn echo(tag: u8) -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let mut out = vec![tag];
                out.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&out, from).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn datagrams_reach_the_frontend_endpoint_and_removal_evicts() {
        let (e1, e2) = (echo(1).await, echo(2).await);
        let std_sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let front = std_sock.local_addr().unwrap();
        redirect::sockopt::set_recv_orig_dst(&std_sock, front).unwrap();
        std_sock.set_nonblocking(true).unwrap();
        let sock = Arc::new(UdpSocket::from_std(std_sock).unwrap());
        let (tx, rx) = tokio::sync::watch::channel(table(front, &[e1, e2], 1));
        let balancers = Arc::new(Balancers::new(BalanceConfig::default()));
        let flows = FlowTable::new(FlowConfig::default());
        let server = tokio::spawn(serve(sock, rx.clone(), balancers.clone(), flows.clone()));
        let evictor = tokio::spawn(evict_on_update(rx, balancers.clone(), flows.clone()));

        let mut clients = Vec::new();
        let mut tags = Vec::new();
        for _ in 0..6 {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            c.connect(front).await.unwrap();
            c.send(b"ping").await.unwrap();
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), c.recv(&mut buf))
                .await
                .expect("reply within 5 s")
                .unwrap();
            assert_eq!(&buf[1..n], b"ping");
            tags.push(buf[0]);
            clients.push(c);
        }
        assert!(tags.contains(&1) && tags.contains(&2), "{tags:?}");
        assert_eq!(flows.len(), 6);

        tx.send(table(front, &[e1], 2)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let on_e2 = tags.iter().filter(|t| **t == 2).count();
        while flows.len() != 6 - on_e2 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} flows",
                flows.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for c in &clients {
            c.send(b"again").await.unwrap();
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), c.recv(&mut buf))
                .await
                .expect("reply within 5 s")
                .unwrap();
            assert_eq!((buf[0], &buf[1..n]), (1, &b"again"[..]));
        }
        server.abort();
        evictor.abort();
    }
}
