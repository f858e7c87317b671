//! Shared fixtures for the criterion benchmarks: the data-plane runtime, a
//! loopback echo backend and an in-process server with one frontend. One
//! copy, so the relay, L7 and metrics benches measure the same server set up
//! the same way (as `lightpath run` does), and differ only in what they time.

use std::net::SocketAddr;
use std::sync::Arc;

use control::{
    Endpoint, Frontend, FrontendKind, Mode, Protocol, ServicePort, ServicePortName, Table,
};
use lightpath::drain;
use lightpath::server::{Server, ServerConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The data plane's runtime shape in `lightpath run` on this 2-core machine:
/// multi-thread, two workers, I/O and timers.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The TCP service port `bench/<name>:<port>` in `mode`, whose endpoints
/// are `backends`, all ready.
pub fn service(name: &str, port: &str, mode: Mode, backends: &[SocketAddr]) -> Arc<ServicePort> {
    Arc::new(ServicePort::new(
        ServicePortName::new("bench", name, port),
        Protocol::Tcp,
        mode,
        backends.iter().copied().map(Endpoint::ready).collect(),
    ))
}

/// A TCP echo server on an ephemeral loopback port: echoes each connection
/// to EOF, then half-closes. Call inside a runtime.
pub async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A running server whose one ClusterIP frontend is a loopback listener (its
/// own address, as TPROXY would report the original destination). Serves
/// until dropped: holding it keeps the table sender and drain signal alive.
pub struct Proxy {
    /// The frontend address to dial.
    pub addr: SocketAddr,
    pub server: Server,
    /// The published table, for an admin state watching the same snapshots.
    pub table: watch::Receiver<Arc<Table>>,
    _tx: watch::Sender<Arc<Table>>,
    _signal: drain::Signal,
}

impl Proxy {
    /// Binds a loopback frontend for `service` and serves it with the default
    /// server config. Call inside a runtime.
    pub async fn start(service: Arc<ServicePort>) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind frontend");
        let addr = l.local_addr().expect("addr");
        let table = Table::new(1, [Frontend::new(addr, FrontendKind::ClusterIp, service)]);
        let (tx, rx) = watch::channel(Arc::new(table));
        let server = Server::new(rx.clone(), ServerConfig::default());
        let (signal, watch) = drain::channel();
        let s = server.clone();
        tokio::spawn(async move {
            let _ = s.run(vec![l], watch).await;
        });
        Proxy {
            addr,
            server,
            table: rx,
            _tx: tx,
            _signal: signal,
        }
    }
}
