//! Opt-in active health checks (`lightpath.io/health-check`), with
//! pingora's TCP and HTTP checks, feeding the balancer's endpoint readiness.
//!
//! Why active checks at all when outlier ejection exists: ejection needs
//! requests to fail first; a health check takes a broken endpoint out before
//! any client request reaches it (a pod whose dependency died still accepts
//! connections and answers 5xx). Why pingora's checks: they are maintained,
//! have connect/read timeouts built in, and the HTTP check validates the
//! status of a real request.
//!
//! One task per service port with health checks on, holding only weak
//! references: it ends when the service port (or its settings) goes away.
//! Each round checks every endpoint concurrently. A failing endpoint is
//! marked not-ready within the balancer's maximum ejected share; it is
//! readmitted by the first passing check. Endpoints taken out by outlier
//! ejection are left to its timer.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use pingora_load_balancing::health_check::{
    HealthCheck as PingoraCheck, HttpHealthCheck, TcpHealthCheck,
};
use pingora_load_balancing::Backend as PingoraBackend;

use super::settings::{HealthCheck, HealthKind};
use super::Shared;
use crate::balance::{Balancer, Scope};

/// Builds the pingora check for `hc` (timeouts: pingora's 1 s connect and
/// 1 s read).
fn checker(hc: &HealthCheck) -> Box<dyn PingoraCheck + Send + Sync> {
    match &hc.kind {
        HealthKind::Tcp => TcpHealthCheck::new(),
        HealthKind::Http { path } => {
            let mut c = HttpHealthCheck::new("lightpath-health-check", false);
            // `path` was validated as an absolute path without whitespace.
            c.req
                .set_uri(path.parse().unwrap_or_else(|_| http::Uri::from_static("/")));
            Box::new(c)
        }
    }
}

/// Starts the health-check task of one service port.
pub(crate) fn spawn(
    balancer: &Arc<Balancer>,
    shared: &Arc<Shared>,
    hc: HealthCheck,
    max_percent: u8,
) {
    let (bal, sh): (Weak<Balancer>, Weak<Shared>) =
        (Arc::downgrade(balancer), Arc::downgrade(shared));
    let service = balancer.name().clone();
    tokio::spawn(async move {
        let check = checker(&hc);
        // Endpoints this task took out (and so may put back).
        let mut down: HashSet<SocketAddr> = HashSet::new();
        let mut tick = tokio::time::interval(hc.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (Some(bal), Some(_shared)) = (bal.upgrade(), sh.upgrade()) else {
                tracing::debug!(%service, "health checks stopped");
                return;
            };
            let mut addrs: Vec<SocketAddr> = bal
                .backends(Scope::Cluster)
                .iter()
                .chain(bal.backends(Scope::Local).iter())
                .map(|b| b.addr())
                .collect();
            addrs.sort_unstable();
            addrs.dedup();
            down.retain(|a| addrs.contains(a));
            let results = futures::future::join_all(addrs.iter().map(|a| {
                let check = &check;
                async move {
                    let target = PingoraBackend::new(&a.to_string());
                    match target {
                        Ok(t) => check.check(&t).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                }
            }))
            .await;
            for (addr, result) in addrs.iter().zip(results) {
                let Some(backend) = bal.backend(*addr) else {
                    continue;
                };
                match result {
                    Ok(()) => {
                        if down.remove(addr) && !backend.is_ready() {
                            bal.readmit(*addr);
                            tracing::info!(%service, endpoint = %addr, "health check passed, endpoint readmitted");
                        }
                    }
                    Err(e) => {
                        if backend.is_ready() {
                            match bal.eject_within(*addr, max_percent) {
                                Ok(true) => {
                                    down.insert(*addr);
                                    tracing::info!(%service, endpoint = %addr, error = %e, "health check failed, endpoint out");
                                }
                                Ok(false) => {}
                                Err(refused) => {
                                    tracing::warn!(%service, endpoint = %addr, error = %e, %refused, "health check failed, endpoint kept")
                                }
                            }
                        }
                    }
                }
            }
        }
    });
}
