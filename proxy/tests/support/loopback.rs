//! The in-process server on loopback that the L4 and L7 tests drive: a
//! table whose frontends are plain 127.0.0.1 listeners (a listener's local
//! address is exactly what TPROXY would report as the original
//! destination), published through the same watch channel `lightpath run`
//! uses, with a drain signal. One copy, so the L4 and L7 fixtures cannot
//! drift in how a table or a service port is built.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control::{
    Affinity, Endpoint, Frontend, FrontendKind, Mode, Protocol, ServicePort, ServicePortName, Table,
};
use lightpath::drain;
use lightpath::server::{Server, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Frontend rows: each listener address and the service port it serves.
pub type Rows = Vec<(SocketAddr, Arc<ServicePort>)>;

/// A TCP service port whose endpoints are all ready, on no node or zone.
pub fn service_port(
    name: ServicePortName,
    mode: Mode,
    affinity: Affinity,
    eps: &[SocketAddr],
    annotations: BTreeMap<String, String>,
) -> Arc<ServicePort> {
    let eps: Arc<[Endpoint]> = eps.iter().copied().map(Endpoint::ready).collect();
    Arc::new(ServicePort {
        affinity,
        annotations,
        ..ServicePort::new(name, Protocol::Tcp, mode, eps)
    })
}

/// A table mapping each `(frontend address, service)` pair (ClusterIP
/// frontends, TCP).
pub fn table(version: u64, rows: &[(SocketAddr, Arc<ServicePort>)]) -> Arc<Table> {
    let frontends = rows
        .iter()
        .map(|(addr, svc)| Frontend::new(*addr, FrontendKind::ClusterIp, svc.clone()));
    Arc::new(Table::new(version, frontends))
}

/// A running server with its listeners, table sender and drain signal;
/// aborted on drop.
pub struct Served {
    pub addrs: Vec<SocketAddr>,
    pub table: watch::Sender<Arc<Table>>,
    pub server: Server,
    pub signal: Option<drain::Signal>,
    pub task: JoinHandle<()>,
}

impl Served {
    /// Binds `n` loopback listeners (the frontends) and serves `rows(addrs)`.
    pub async fn start(
        n: usize,
        cfg: ServerConfig,
        rows: impl FnOnce(&[SocketAddr]) -> Rows,
    ) -> Served {
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
        Served {
            addrs,
            table: tx,
            server,
            signal: Some(signal),
            task,
        }
    }

    /// Drains the server (work in flight gets `grace`) and waits, bounded,
    /// for its serve task to end; a serve error fails the test.
    pub async fn drain(&mut self, grace: Duration) {
        if let Some(signal) = self.signal.take() {
            signal.drain(grace).await;
        }
        tokio::time::timeout(grace + Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stopped serving after the drain")
            .expect("serve task");
    }

    /// Publishes the next table version with `rows`.
    pub fn publish(&self, rows: Rows) {
        let v = self.table.borrow().version + 1;
        self.table.send_replace(table(v, &rows));
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}
