//! Per-service-port metric handles, registered once and shared by every
//! connection and request of that service port.
//!
//! The registry is process-wide and keyed by [`ServicePortName`]; it is only
//! consulted when a balancer is created for a service port (control path).
//! The data path holds the returned `Arc<ServiceMetrics>` and touches nothing
//! but atomics. Series of a deleted service port stay exported with their
//! final values (Prometheus counters must not vanish and reappear), and are
//! reused if the service comes back.
//!
//! Why the series are registered lazily, on the service port's first use
//! (its first connection, request, ejection...): a node of a 10,000-service
//! cluster carries traffic for few of them, and the 22 series of one service
//! port cost the recorder ~2 KB (keys, label strings, atomics) — about 20 MB
//! at that scale for series that would only ever say 0. So a service port
//! with no traffic yet has no series in the exposition; from its first use on
//! it has all of them (zeros included), and keeps them. The data path still
//! does no label hashing: after the first use, reaching a handle is one
//! atomic load ([`OnceLock::get`]).

use std::ops::Deref;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use control::ServicePortName;
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use super::handles::{service_port_labels, with_label, Registry};
use super::names;

/// HTTP status class, the only extra label on request counters.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StatusClass {
    Informational = 0,
    Success = 1,
    Redirection = 2,
    ClientError = 3,
    ServerError = 4,
}

impl StatusClass {
    pub const ALL: [StatusClass; 5] = [
        StatusClass::Informational,
        StatusClass::Success,
        StatusClass::Redirection,
        StatusClass::ClientError,
        StatusClass::ServerError,
    ];

    /// The class of a status code; anything outside 100..=599 counts as a
    /// server error (it can only come from a broken upstream).
    pub fn of(status: u16) -> Self {
        match status {
            100..=199 => StatusClass::Informational,
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirection,
            400..=499 => StatusClass::ClientError,
            _ => StatusClass::ServerError,
        }
    }

    pub fn label(self) -> &'static str {
        ["1xx", "2xx", "3xx", "4xx", "5xx"][self as usize]
    }
}

/// The handles of one service port, registered lazily: every handle field of
/// [`ServiceHandles`] is reachable through `Deref` (`metrics.tcp_opened`),
/// and the first such access registers all of them.
#[derive(Debug)]
pub struct ServiceMetrics {
    pub name: ServicePortName,
    /// Boxed: the 22 handles are ~350 bytes, and most service ports of a
    /// large cluster never fill this in.
    handles: OnceLock<Box<ServiceHandles>>,
}

/// Every per-service-port handle. Fields are public so the data plane can
/// use exactly the handle it needs; helpers on [`ServiceMetrics`] cover the
/// common pairs.
#[derive(Debug)]
pub struct ServiceHandles {
    pub tcp_opened: Counter,
    pub tcp_closed: Counter,
    pub tcp_active: Gauge,
    pub tcp_failed: Counter,
    pub rx_bytes: Counter,
    pub tx_bytes: Counter,
    pub connect_duration: Histogram,
    pub connect_failures: Counter,
    pub http_requests: [Counter; 5],
    pub http_request_duration: Histogram,
    pub http_retries: Counter,
    pub http_retry_overflows: Counter,
    pub http_retry_budget_exhausted: Counter,
    pub breaker_overflows: Counter,
    /// Set by the L7 idle sweep every second (`crate::l7::L7::sweep_idle`).
    pub http_upstream_connections: Gauge,
    pub ejections: Counter,
    pub readmissions: Counter,
}

impl ServiceMetrics {
    fn new(name: &ServicePortName) -> Self {
        ServiceMetrics {
            name: name.clone(),
            handles: OnceLock::new(),
        }
    }

    /// Whether the series exist yet (the service port has been used).
    pub fn is_registered(&self) -> bool {
        self.handles.get().is_some()
    }

    /// Counts an accepted connection as opened and active until the returned
    /// guard drops (then closed).
    pub fn tcp_open(self: &Arc<Self>) -> TcpConnection {
        self.tcp_opened.increment(1);
        self.tcp_active.increment(1.0);
        TcpConnection {
            metrics: Arc::clone(self),
        }
    }

    /// One successful upstream connect and how long it took.
    pub fn connect_succeeded(&self, took: Duration) {
        self.connect_duration.record(took.as_secs_f64());
    }

    /// One failed upstream connect attempt.
    pub fn connect_failed(&self) {
        self.connect_failures.increment(1);
    }

    /// One HTTP response and the request's duration.
    pub fn http_response(&self, status: u16, took: Duration) {
        self.http_requests[StatusClass::of(status) as usize].increment(1);
        self.http_request_duration.record(took.as_secs_f64());
    }
}

impl Deref for ServiceMetrics {
    type Target = ServiceHandles;

    /// Registers every series of the service port on first use.
    fn deref(&self) -> &ServiceHandles {
        self.handles
            .get_or_init(|| Box::new(ServiceHandles::register(&self.name)))
    }
}

impl ServiceHandles {
    fn register(name: &ServicePortName) -> Self {
        let labels = service_port_labels(name);
        let with_class = |c: StatusClass| {
            counter!(
                names::HTTP_REQUESTS,
                with_label(&labels, "class", c.label())
            )
        };
        ServiceHandles {
            tcp_opened: counter!(names::TCP_OPENED, labels.clone()),
            tcp_closed: counter!(names::TCP_CLOSED, labels.clone()),
            tcp_active: gauge!(names::TCP_ACTIVE, labels.clone()),
            tcp_failed: counter!(names::TCP_FAILED, labels.clone()),
            rx_bytes: counter!(names::TCP_RX_BYTES, labels.clone()),
            tx_bytes: counter!(names::TCP_TX_BYTES, labels.clone()),
            connect_duration: histogram!(names::CONNECT_DURATION, labels.clone()),
            connect_failures: counter!(names::CONNECT_FAILURES, labels.clone()),
            http_requests: StatusClass::ALL.map(with_class),
            http_request_duration: histogram!(names::HTTP_REQUEST_DURATION, labels.clone()),
            http_retries: counter!(names::HTTP_RETRIES, labels.clone()),
            http_retry_overflows: counter!(names::HTTP_RETRY_OVERFLOWS, labels.clone()),
            http_retry_budget_exhausted: counter!(
                names::HTTP_RETRY_BUDGET_EXHAUSTED,
                labels.clone()
            ),
            breaker_overflows: counter!(names::BREAKER_OVERFLOWS, labels.clone()),
            http_upstream_connections: gauge!(names::HTTP_UPSTREAM_CONNECTIONS, labels.clone()),
            ejections: counter!(names::EJECTIONS, labels.clone()),
            readmissions: counter!(names::READMISSIONS, labels),
        }
    }
}

/// An open connection: counted as active while alive, closed on drop.
#[derive(Debug)]
pub struct TcpConnection {
    metrics: Arc<ServiceMetrics>,
}

impl TcpConnection {
    /// The service's byte counters, which the relay adds to as bytes flow:
    /// received from the client, sent to the client.
    pub fn meters(&self) -> crate::l4::Meters<'_> {
        crate::l4::Meters {
            client_to_upstream: &self.metrics.rx_bytes,
            upstream_to_client: &self.metrics.tx_bytes,
        }
    }

    /// The connection never reached an endpoint (all attempts failed, or no
    /// endpoint was usable).
    pub fn failed(&self) {
        self.metrics.tcp_failed.increment(1);
    }

    pub fn metrics(&self) -> &Arc<ServiceMetrics> {
        &self.metrics
    }
}

impl Drop for TcpConnection {
    fn drop(&mut self) {
        self.metrics.tcp_active.decrement(1.0);
        self.metrics.tcp_closed.increment(1);
    }
}

/// The handles for `name` (one shared set per service port). Control path
/// only: call when a balancer is created and keep the `Arc`. The series
/// themselves are registered on the handles' first use.
pub fn service(name: &ServicePortName) -> Arc<ServiceMetrics> {
    static REGISTRY: Registry<ServiceMetrics> = Registry::new();
    REGISTRY.get(name, || ServiceMetrics::new(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spn(n: &str) -> ServicePortName {
        ServicePortName::new("unit", n, "web")
    }

    #[test]
    fn status_classes() {
        assert_eq!(StatusClass::of(101).label(), "1xx");
        assert_eq!(StatusClass::of(204).label(), "2xx");
        assert_eq!(StatusClass::of(304).label(), "3xx");
        assert_eq!(StatusClass::of(404).label(), "4xx");
        assert_eq!(StatusClass::of(503).label(), "5xx");
        assert_eq!(StatusClass::of(0).label(), "5xx");
        assert_eq!(StatusClass::of(999).label(), "5xx");
    }

    #[test]
    fn same_name_same_handles() {
        let a = service(&spn("same"));
        let b = service(&spn("same"));
        assert!(Arc::ptr_eq(&a, &b));
        let c = service(&spn("other"));
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn series_appear_on_first_use_all_at_once() {
        let handle = super::super::install().expect("install recorder");
        let m = service(&spn("lazy"));
        assert!(!m.is_registered());
        let ours = |text: &str| {
            text.lines()
                .filter(|l| !l.starts_with('#') && l.contains("service=\"lazy\""))
                .count()
        };
        assert_eq!(ours(&handle.render()), 0, "no series before first use");
        m.connect_failed();
        assert!(m.is_registered());
        let text = handle.render();
        // Every per-service-port metric, zeros included, once used.
        for name in [
            names::TCP_OPENED,
            names::TCP_ACTIVE,
            names::TCP_RX_BYTES,
            names::HTTP_REQUESTS,
            names::HTTP_RETRIES,
            names::EJECTIONS,
            names::READMISSIONS,
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(name) && l.contains("service=\"lazy\"")),
                "{name} missing after first use in\n{text}"
            );
        }
        assert!(text.lines().any(|l| l.starts_with(names::CONNECT_FAILURES)
            && l.contains("service=\"lazy\"")
            && l.ends_with(" 1")));
        // Handles obtained again later share the registered series.
        assert!(service(&spn("lazy")).is_registered());
    }

    #[test]
    fn connection_guard_counts_open_active_closed() {
        let handle = super::super::install().expect("install recorder");
        let m = service(&spn("guard"));
        {
            let c = m.tcp_open();
            c.meters().client_to_upstream.increment(10);
            c.meters().upstream_to_client.increment(20);
            let text = handle.render();
            assert!(
                text.lines().any(|l| l.starts_with(names::TCP_ACTIVE)
                    && l.contains("service=\"guard\"")
                    && l.ends_with(" 1")),
                "{text}"
            );
        }
        let text = handle.render();
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains("service=\"guard\""))
                .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
                .to_string()
        };
        assert!(line(names::TCP_ACTIVE).ends_with(" 0"));
        assert!(line(names::TCP_CLOSED).ends_with(" 1"));
        assert!(line(names::TCP_OPENED).ends_with(" 1"));
        assert!(line(names::TCP_RX_BYTES).ends_with(" 10"));
        assert!(line(names::TCP_TX_BYTES).ends_with(" 20"));
    }
}
