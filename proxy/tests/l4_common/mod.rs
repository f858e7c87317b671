//! Loopback fixtures for the L4 tests: a table whose frontend is a plain
//! 127.0.0.1 listener (its local address is exactly what TPROXY would report),
//! backends with observable behaviour, and a server harness.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control::{
    Affinity, Endpoint, EndpointState, Frontend, FrontendKey, FrontendKind, Mode, Protocol,
    ServicePort, ServicePortName, Table,
};
use lightpath::drain;
use lightpath::server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn service(name: &str, eps: &[SocketAddr], affinity: Affinity) -> Arc<ServicePort> {
    let eps: Arc<[Endpoint]> = eps
        .iter()
        .map(|a| Endpoint {
            addr: *a,
            state: EndpointState::Ready,
            node_name: None,
            zone: None,
        })
        .collect();
    Arc::new(ServicePort {
        name: ServicePortName {
            namespace: "test".into(),
            name: name.into(),
            port: String::new(),
        },
        protocol: Protocol::Tcp,
        mode: Mode::L4,
        affinity,
        cluster_endpoints: eps,
        local_endpoints: Arc::from(Vec::new()),
        internal_local: false,
        external_local: false,
        health_check_node_port: None,
        annotations: BTreeMap::new(),
    })
}

/// A table mapping each `(frontend address, service)` pair.
pub fn table(version: u64, rows: &[(SocketAddr, Arc<ServicePort>)]) -> Arc<Table> {
    let mut t = Table {
        version,
        ..Table::default()
    };
    for (addr, svc) in rows {
        let key = FrontendKey::new(*addr, Protocol::Tcp);
        t.frontends.insert(
            key,
            Frontend {
                key,
                kind: FrontendKind::ClusterIp,
                service: svc.clone(),
            },
        );
    }
    Arc::new(t)
}

/// A running server with its listeners, table sender and drain signal.
pub struct Harness {
    pub addrs: Vec<SocketAddr>,
    pub table: watch::Sender<Arc<Table>>,
    pub server: Server,
    pub signal: Option<drain::Signal>,
    pub task: JoinHandle<()>,
}

impl Harness {
    /// Binds `n` loopback listeners (the frontends) and serves `rows(addrs)`.
    pub async fn start(
        n: usize,
        cfg: ServerConfig,
        rows: impl FnOnce(&[SocketAddr]) -> Vec<(SocketAddr, Arc<ServicePort>)>,
    ) -> Harness {
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..n {
            let l = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind frontend");
            addrs.push(l.local_addr().expect("addr"));
            listeners.push(l);
        }
        let (tx, rx) = watch::channel(table(1, &rows(&addrs)));
        let server = Server::new(rx, cfg);
        let (signal, watch) = drain::channel();
        let s = server.clone();
        let task = tokio::spawn(async move {
            s.run(listeners, watch).await.expect("serve");
        });
        Harness {
            addrs,
            table: tx,
            server,
            signal: Some(signal),
            task,
        }
    }

    pub fn publish(&self, rows: Vec<(SocketAddr, Arc<ServicePort>)>) {
        let v = self.table.borrow().version + 1;
        self.table.send_replace(table(v, &rows));
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a backend connection ended, as the backend saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Eof,
    Error(io::ErrorKind),
}

/// A loopback backend. Every connection is greeted with `id` (4 bytes), then
/// echoed; on EOF the backend finishes echoing and half-closes. Data
/// containing `RESET` makes it abort the connection (SO_LINGER 0).
pub struct Backend {
    pub addr: SocketAddr,
    pub id: [u8; 4],
    pub accepted: Arc<AtomicUsize>,
    pub ends: Arc<Mutex<Vec<End>>>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn echo(n: u8) -> Backend {
        Self::start(n, false).await
    }

    /// Accepts and then never reads or writes.
    pub async fn hang(n: u8) -> Backend {
        Self::start(n, true).await
    }

    async fn start(n: u8, hang: bool) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = l.local_addr().expect("addr");
        let id = [b'b', b'0' + n / 10, b'0' + n % 10, b'\n'];
        let accepted = Arc::new(AtomicUsize::new(0));
        let ends = Arc::new(Mutex::new(Vec::new()));
        let (acc, en) = (accepted.clone(), ends.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let en = en.clone();
                tokio::spawn(async move {
                    if hang {
                        let mut b = [0u8; 1];
                        // Hold the socket until the peer goes away.
                        let _ = tokio::time::timeout(Duration::from_secs(120), async {
                            loop {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                if s.peek(&mut b).await.map(|n| n == 0).unwrap_or(true) {
                                    break;
                                }
                            }
                        })
                        .await;
                        return;
                    }
                    let end = echo(&mut s, &id).await;
                    if let Ok(mut en) = en.lock() {
                        en.push(end);
                    }
                });
            }
        });
        Backend {
            addr,
            id,
            accepted,
            ends,
            task,
        }
    }

    /// Waits until `n` connections have ended and returns how they ended.
    pub async fn wait_ends(&self, n: usize) -> Vec<End> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let ends = self.ends.lock().map(|e| e.clone()).unwrap_or_default();
            if ends.len() >= n {
                return ends;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "backend saw {} of {n} connection ends",
                ends.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(s: &mut TcpStream, id: &[u8; 4]) -> End {
    if let Err(e) = s.write_all(id).await {
        return End::Error(e.kind());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => {
                let _ = s.shutdown().await;
                return End::Eof;
            }
            Ok(n) => {
                if buf[..n].windows(5).any(|w| w == b"RESET") {
                    let _ = s.set_zero_linger();
                    return End::Eof;
                }
                if let Err(e) = s.write_all(&buf[..n]).await {
                    return End::Error(e.kind());
                }
            }
            Err(e) => return End::Error(e.kind()),
        }
    }
}

/// An address where nothing listens (connects are refused).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    drop(l);
    a
}

/// Connects to `addr` and reads the 4-byte greeting.
pub async fn connect_greeted(addr: SocketAddr) -> (TcpStream, [u8; 4]) {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let mut id = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut id))
        .await
        .expect("greeting in time")
        .expect("greeting");
    (s, id)
}

/// Sends `msg` and expects it echoed back.
pub async fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(back, msg);
}

/// What a client sees when it reads from a connection the proxy refused or
/// aborted: a reset (or EOF), promptly.
pub async fn expect_closed(s: &mut TcpStream, within: Duration) -> io::Result<usize> {
    let mut b = [0u8; 16];
    tokio::time::timeout(within, s.read(&mut b))
        .await
        .expect("closed in time")
}

pub fn client_ip() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
