//! Outlier ejection: consecutive failures take an endpoint out of the
//! balancer for a growing time, then a timer readmits it.
//!
//! Why as readiness in the balancer (Envoy's outlier detection, linkerd's
//! consecutive-failures breaker): both the L4 relay (connect failures) and
//! the L7 stack (connect failures, 5xx) see an endpoint fail, and both pick
//! from the same `Backend`s, so one not-ready flag serves both. The ejection
//! time is `base × times ejected` up to a maximum, so a flapping endpoint
//! stays out longer each time; readmission clears the failure streak, and
//! the first request after it is the probe: one more failure streak ejects
//! again, for longer. The balancer's maximum ejected share always applies,
//! so a service-wide failure cannot empty the set.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Backend, Balancer};

/// Ejection settings (per service for L7, defaults for L4).
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Consecutive failures that eject; 0 disables ejection.
    pub consecutive: u32,
    pub base_time: Duration,
    pub max_time: Duration,
    pub max_percent: u8,
}

impl Default for OutlierConfig {
    /// Envoy's defaults: 5 consecutive failures, 30 s base, 300 s maximum;
    /// the ejected share is the balancer's (50 %, see `BalanceConfig`).
    fn default() -> Self {
        OutlierConfig {
            consecutive: 5,
            base_time: Duration::from_secs(30),
            max_time: Duration::from_secs(300),
            max_percent: 50,
        }
    }
}

impl Balancer {
    /// Call after recording a failure on `backend`: ejects it when its
    /// failure streak reached `cfg.consecutive` (and the share allows), and
    /// schedules its readmission. Returns the ejection time when this call
    /// ejected it. Needs a tokio runtime (the readmission timer).
    pub fn report_failure(&self, backend: &Arc<Backend>, cfg: &OutlierConfig) -> Option<Duration> {
        if cfg.consecutive == 0 || backend.consecutive_failures() < cfg.consecutive {
            return None;
        }
        match self.eject_within(backend.addr(), cfg.max_percent) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "not ejecting");
                return None;
            }
        }
        let n = backend.count_ejection();
        let time = cfg.base_time.saturating_mul(n).min(cfg.max_time);
        tracing::info!(service = %self.name(), endpoint = %backend.addr(), ejections = n, ?time, "endpoint ejected");
        let weak: Weak<Backend> = Arc::downgrade(backend);
        let metrics = self.metrics().clone();
        tokio::spawn(async move {
            tokio::time::sleep(time).await;
            if let Some(b) = weak.upgrade() {
                b.clear_failures();
                if !b.is_ready() {
                    metrics.readmissions.increment(1);
                }
                b.set_ready(true);
                tracing::info!(endpoint = %b.addr(), "endpoint readmitted");
            }
        });
        Some(time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{BalanceConfig, Scope};
    use control::{Endpoint, EndpointState, Mode, Protocol, ServicePort, ServicePortName};

    fn service_with(n: u16) -> Arc<ServicePort> {
        let eps: Arc<[Endpoint]> = (0..n)
            .map(|i| Endpoint {
                addr: std::net::SocketAddr::from(([10, 1, 0, 1 + i as u8], 80)),
                state: EndpointState::Ready,
                node_name: None,
                zone: None,
            })
            .collect();
        Arc::new(ServicePort::new(
            ServicePortName::new("t", "outlier", ""),
            Protocol::Tcp,
            Mode::Http,
            eps,
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_streak_and_readmits_for_growing_time() {
        let svc = service_with(3);
        let bal = Balancer::new(&svc, BalanceConfig::default());
        let cfg = OutlierConfig {
            consecutive: 2,
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(25),
            max_percent: 50,
        };
        let addr = svc.cluster_endpoints[0].addr;
        let b = bal.backend(addr).expect("backend");
        // The failing endpoint is picked directly: p2c itself would steer
        // away from it after the first failure's latency penalty.
        let fail = |bal: &Balancer| {
            let mut p = bal.pick_endpoint(Scope::Cluster, addr).expect("pick");
            p.record_failure();
            bal.report_failure(p.backend(), &cfg)
        };
        assert_eq!(fail(&bal), None);
        assert_eq!(fail(&bal), Some(Duration::from_secs(10)));
        assert!(!b.is_ready());
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(b.is_ready(), "readmitted after the base time");
        assert_eq!(b.consecutive_failures(), 0);
        fail(&bal);
        assert_eq!(
            fail(&bal),
            Some(Duration::from_secs(20)),
            "second ejection is longer"
        );
        tokio::time::sleep(Duration::from_secs(21)).await;
        fail(&bal);
        assert_eq!(
            fail(&bal),
            Some(Duration::from_secs(25)),
            "capped at max_time"
        );
    }
}
