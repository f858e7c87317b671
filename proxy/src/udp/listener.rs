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

use control::{FrontendKey, Protocol, Table, TableRx};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::{FlowKey, FlowTable};
use crate::balance::{Balancers, Scope};

/// Reply sockets, one per frontend address, created on first use and
/// dropped when their frontend leaves the table.
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
        let mut map = self.lock();
        if let Some(s) = map.get(&from) {
            return Ok(s.clone());
        }
        let s = Arc::new(UdpSocket::from_std(redirect::sockopt::reply_socket(from)?)?);
        map.insert(from, s.clone());
        Ok(s)
    }

    /// Closes the reply sockets of frontends `table` no longer has (flows
    /// still using one keep it open until they end).
    pub fn retain_in(&self, table: &Table) {
        self.lock()
            .retain(|a, _| table.lookup(&FrontendKey::new(*a, Protocol::Udp)).is_some());
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<UdpSocket>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Datagrams read per wake-up before the loop yields to other tasks.
const BATCH: usize = 256;
/// Consecutive receive errors after which the socket is considered broken.
const MAX_CONSECUTIVE_ERRORS: u32 = 1_000;

/// Serves `sock` until it fails: every datagram goes to its flow; a
/// datagram without a flow looks its frontend up in the current table
/// snapshot and starts one. Datagrams for unknown frontends, without an
/// original destination, or truncated are dropped and counted.
pub async fn serve(
    sock: Arc<UdpSocket>,
    table: TableRx,
    balancers: Arc<Balancers>,
    flows: Arc<FlowTable>,
) -> io::Result<()> {
    let replies = ReplySockets::new(sock.clone());
    let mut pruned_at = table.borrow().version;
    let mut buf = vec![0u8; 65_536];
    let mut errors = 0u32;
    loop {
        sock.readable().await?;
        let mut drained = false;
        for _ in 0..BATCH {
            let d = match sock.try_io(Interest::READABLE, || {
                redirect::sockopt::recv_orig_dst(&*sock, &mut buf)
            }) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) => {
                    errors += 1;
                    if errors >= MAX_CONSECUTIVE_ERRORS {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "udp receive failed");
                    continue;
                }
            };
            errors = 0;
            let Some(dst) = d.orig_dst else {
                crate::metrics::udp::unmatched().increment(1);
                continue;
            };
            let key = FlowKey {
                client: d.from,
                orig_dst: dst,
            };
            let payload = &buf[..d.len];
            if !d.truncated {
                if let Some(r) = flows.relay(&key, payload) {
                    if let Err(e) = r {
                        tracing::debug!(client = %d.from, frontend = %dst, error = %e, "udp datagram dropped");
                    }
                    continue;
                }
            }
            // A new flow: the control-path lookups happen only here.
            let snap = table.borrow().clone();
            if snap.version != pruned_at {
                replies.retain_in(&snap);
                pruned_at = snap.version;
            }
            let Some(fe) = snap.lookup(&FrontendKey::new(dst, Protocol::Udp)) else {
                crate::metrics::udp::unmatched().increment(1);
                continue;
            };
            if d.truncated {
                // Larger than any UDP payload: cannot happen on a sane
                // kernel, and must not be relayed cut.
                crate::metrics::udp::udp(&fe.service.name)
                    .dropped
                    .increment(1);
                continue;
            }
            let balancer = balancers.for_service_at(&fe.service, snap.version);
            let reply = match replies.get(dst) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(frontend = %dst, error = %e, "cannot bind a reply socket");
                    crate::metrics::udp::udp(&fe.service.name)
                        .dropped
                        .increment(1);
                    continue;
                }
            };
            if let Err(e) = flows.forward(key, &balancer, Scope::of(fe), payload, &reply) {
                tracing::debug!(client = %d.from, frontend = %dst, error = %e, "udp datagram dropped");
            }
        }
        if !drained {
            // A full batch and more queued: let other tasks (reply relays,
            // TCP connections) run before the next one.
            tokio::task::yield_now().await;
        }
    }
}

/// Evicts, for every new table snapshot, the flows whose frontend or
/// endpoint left (see [`FlowTable::evict_stale`]), until the table's sender
/// is gone.
pub async fn evict_on_update(mut table: TableRx, balancers: Arc<Balancers>, flows: Arc<FlowTable>) {
    while table.changed().await.is_ok() {
        let snap = table.borrow_and_update().clone();
        let n = flows.evict_stale(&snap, &balancers);
        if n > 0 {
            tracing::info!(
                version = snap.version,
                flows = n,
                "udp flows evicted: endpoint left"
            );
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
