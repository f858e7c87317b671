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
use std::sync::Arc;

use arc_swap::ArcSwap;
use control::{FrontendKey, Protocol, Table, TableRx};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::{FlowKey, FlowTable};
use crate::balance::{Balancers, Scope};
use crate::l4::Source;

/// Reply sockets, one per frontend address, created on first use and
/// dropped when their frontend leaves the table.
///
/// An immutable map behind an [`ArcSwap`]: a lookup is a lock-free load; the
/// map is copied and swapped only when a frontend gets its first flow or a
/// new table snapshot drops frontends (both rare, and both control-path).
pub struct ReplySockets {
    listener: Arc<UdpSocket>,
    /// SO_MARK on every reply socket (0: none): lightpath's own packets
    /// leave the rules' output chain at its first rule, with no map lookup
    /// per reply datagram.
    mark: u32,
    /// The listener's own address, read once (not a syscall per new flow).
    listener_addr: Option<SocketAddr>,
    map: ArcSwap<HashMap<SocketAddr, Arc<UdpSocket>>>,
}

impl ReplySockets {
    /// `listener` answers for its own address (a plain, non-TPROXY setup);
    /// every other frontend gets a transparent socket bound to it, carrying
    /// SO_MARK `mark` (skipped when 0).
    pub fn new(listener: Arc<UdpSocket>, mark: u32) -> Self {
        ReplySockets {
            listener_addr: listener.local_addr().ok(),
            listener,
            mark,
            map: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    pub fn get(&self, from: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        if self.listener_addr == Some(from) {
            return Ok(self.listener.clone());
        }
        if let Some(s) = self.map.load().get(&from) {
            return Ok(s.clone());
        }
        let std_sock = redirect::sockopt::reply_socket(from)?;
        if self.mark != 0 {
            redirect::sockopt::set_mark(&std_sock, self.mark)?;
        }
        let created = Arc::new(UdpSocket::from_std(std_sock)?);
        // Whoever swaps first wins; a loser's socket is simply closed.
        let prev = self.map.rcu(|m| {
            if m.contains_key(&from) {
                Arc::clone(m)
            } else {
                let mut next = HashMap::clone(m);
                next.insert(from, created.clone());
                Arc::new(next)
            }
        });
        Ok(prev.get(&from).cloned().unwrap_or(created))
    }

    /// Closes the reply sockets of frontends `table` no longer has (flows
    /// still using one keep it open until they end).
    pub fn retain_in(&self, table: &Table) {
        let live = |a: &SocketAddr| table.lookup(&FrontendKey::new(*a, Protocol::Udp)).is_some();
        if self.map.load().keys().all(live) {
            return;
        }
        self.map.rcu(|m| {
            let mut next = HashMap::clone(m);
            next.retain(|a, _| live(a));
            next
        });
    }

    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    let replies = ReplySockets::new(sock.clone(), flows.config().upstream_mark);
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
            let route = || {
                let ip = key.client.ip();
                let keep = flows.keeps_client_source();
                (
                    Scope::for_client(fe, ip),
                    Source::for_frontend(fe, ip, keep),
                )
            };
            if let Err(e) = flows.forward(key, &balancer, route, payload, &reply) {
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
    use std::time::Duration;

    use control::{Endpoint, Frontend, FrontendKind, Mode, ServicePort, ServicePortName, Table};

    use crate::balance::BalanceConfig;
    use crate::udp::FlowConfig;

    fn table(front: SocketAddr, eps: &[SocketAddr], version: u64) -> Arc<Table> {
        let eps: Arc<[Endpoint]> = eps.iter().copied().map(Endpoint::ready).collect();
        let svc = Arc::new(ServicePort::new(
            ServicePortName::new("default", "dns", ""),
            Protocol::Udp,
            Mode::L4,
            eps,
        ));
        Arc::new(Table::new(
            version,
            [Frontend::new(front, FrontendKind::ClusterIp, svc)],
        ))
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reply_sockets_are_one_per_frontend_and_leave_with_it() {
        if !crate::sandbox::require_root(
            "reply_sockets_are_one_per_frontend_and_leave_with_it",
            "reply sockets are transparent: IP_TRANSPARENT, SO_MARK",
        ) {
            return;
        }
        let listener = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let replies = Arc::new(ReplySockets::new(listener.clone(), 0x2));
        // Its own address is the listener itself, not a new socket.
        let own = listener.local_addr().unwrap();
        assert!(Arc::ptr_eq(&replies.get(own).unwrap(), &listener));
        assert!(replies.is_empty());

        let free = || {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (a, b) = (free(), free());
        // Racing first uses of one frontend all get the same socket.
        let racers: Vec<_> = (0..4)
            .map(|_| {
                let r = replies.clone();
                tokio::task::spawn_blocking(move || r.get(a).unwrap())
            })
            .collect();
        let mut firsts = Vec::new();
        for h in racers {
            firsts.push(h.await.unwrap());
        }
        let sa = replies.get(a).unwrap();
        assert!(firsts.iter().all(|s| Arc::ptr_eq(s, &sa)));
        let sb = replies.get(b).unwrap();
        assert!(Arc::ptr_eq(&sb, &replies.get(b).unwrap()));
        assert_eq!(replies.len(), 2);
        assert_eq!(socket2::SockRef::from(&*sa).mark().unwrap(), 0x2);

        // A reply leaves from the frontend address.
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sa.send_to(b"pong", client.local_addr().unwrap())
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("reply within 5 s")
            .unwrap();
        assert_eq!((&buf[..n], from), (&b"pong"[..], a));

        // A snapshot without `b` closes b's socket, keeps a's.
        replies.retain_in(&table(a, &[], 2));
        assert_eq!(replies.len(), 1);
        assert!(Arc::ptr_eq(&replies.get(a).unwrap(), &sa));
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
