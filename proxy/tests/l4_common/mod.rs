//! Loopback fixtures for the L4 tests: L4 service ports, backends with
//! observable behaviour, and the server harness (`support/loopback.rs`,
//! shared with the L7 tests).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control::{Affinity, Mode, ServicePort, ServicePortName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[path = "../support/loopback.rs"]
mod loopback;

use loopback::service_port;
/// A running server with its loopback frontends (`Harness::start(n, cfg,
/// rows)`), table sender and drain signal.
#[allow(unused_imports)]
pub use loopback::{table, Served as Harness};

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn service(name: &str, eps: &[SocketAddr], affinity: Affinity) -> Arc<ServicePort> {
    let name = ServicePortName {
        namespace: "test".into(),
        name: name.into(),
        port: String::new(),
    };
    service_port(name, Mode::L4, affinity, eps, BTreeMap::new())
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
