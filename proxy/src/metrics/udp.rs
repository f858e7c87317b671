//! Per-service-port UDP metric handles: datagrams and bytes each way, active
//! flows, flow evictions and drops.
//!
//! Why a module (and registry) apart from the TCP/HTTP handles: UDP is
//! counted per datagram, so the data path must never look a series up by
//! name. A flow takes its service port's `Arc<UdpMetrics>` once, when it is
//! created (the only registry lookup), and every datagram after that is one
//! atomic add on a handle it already holds. Datagrams that match no service
//! port at all (a stale rule, a frontend removed a moment ago) have no labels
//! to carry and go to one process-wide counter.
//!
//! Like the TCP series, a deleted service port's series stay exported with
//! their final values and are reused if the service port comes back.

use std::sync::{Arc, OnceLock};

use control::ServicePortName;
use metrics::{counter, gauge, Counter, Gauge};

use super::handles::{ensure_recorder, service_port_labels, with_label, Registry};

/// The UDP metric names (labels: namespace, service, port; evictions also
/// `reason`).
pub mod names {
    pub const RX_DATAGRAMS: &str = "lightpath_udp_received_datagrams_total";
    pub const TX_DATAGRAMS: &str = "lightpath_udp_sent_datagrams_total";
    pub const RX_BYTES: &str = "lightpath_udp_received_bytes_total";
    pub const TX_BYTES: &str = "lightpath_udp_sent_bytes_total";
    pub const FLOWS_ACTIVE: &str = "lightpath_udp_flows_active";
    pub const FLOWS_CREATED: &str = "lightpath_udp_flows_created_total";
    pub const FLOWS_EXPIRED: &str = "lightpath_udp_flows_expired_total";
    /// Label `reason`: `cap` (the flow table was full, oldest flow evicted)
    /// or `endpoint` (the flow's endpoint left the set).
    pub const FLOW_EVICTIONS: &str = "lightpath_udp_flow_evictions_total";
    pub const DROPPED: &str = "lightpath_udp_dropped_datagrams_total";
    /// No labels: datagrams whose original destination is no frontend.
    pub const UNMATCHED: &str = "lightpath_udp_unmatched_datagrams_total";
}

/// Why a flow was evicted before its idle timeout.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// The flow table was full; the oldest flow gave way.
    Cap,
    /// The flow's endpoint (or its whole service port) left the table.
    Endpoint,
}

impl Eviction {
    pub fn label(self) -> &'static str {
        match self {
            Eviction::Cap => "cap",
            Eviction::Endpoint => "endpoint",
        }
    }
}

/// Every UDP handle of one service port.
#[derive(Debug)]
pub struct UdpMetrics {
    pub name: ServicePortName,
    /// Datagrams and bytes received from clients (and relayed upstream).
    pub rx_datagrams: Counter,
    pub rx_bytes: Counter,
    /// Datagrams and bytes sent back to clients.
    pub tx_datagrams: Counter,
    pub tx_bytes: Counter,
    pub flows_active: Gauge,
    pub flows_created: Counter,
    pub flows_expired: Counter,
    evictions: [Counter; 2],
    /// Datagrams not relayed either way (no endpoint, socket errors, a full
    /// send buffer).
    pub dropped: Counter,
}

impl UdpMetrics {
    fn register(name: &ServicePortName) -> Self {
        let labels = service_port_labels(name);
        let eviction = |e: Eviction| {
            counter!(
                names::FLOW_EVICTIONS,
                with_label(&labels, "reason", e.label())
            )
        };
        UdpMetrics {
            name: name.clone(),
            rx_datagrams: counter!(names::RX_DATAGRAMS, labels.clone()),
            rx_bytes: counter!(names::RX_BYTES, labels.clone()),
            tx_datagrams: counter!(names::TX_DATAGRAMS, labels.clone()),
            tx_bytes: counter!(names::TX_BYTES, labels.clone()),
            flows_active: gauge!(names::FLOWS_ACTIVE, labels.clone()),
            flows_created: counter!(names::FLOWS_CREATED, labels.clone()),
            flows_expired: counter!(names::FLOWS_EXPIRED, labels.clone()),
            evictions: [eviction(Eviction::Cap), eviction(Eviction::Endpoint)],
            dropped: counter!(names::DROPPED, labels),
        }
    }

    /// One datagram of `bytes` from a client, relayed upstream.
    pub fn received(&self, bytes: usize) {
        self.rx_datagrams.increment(1);
        self.rx_bytes.increment(bytes as u64);
    }

    /// One datagram of `bytes` sent back to a client.
    pub fn sent(&self, bytes: usize) {
        self.tx_datagrams.increment(1);
        self.tx_bytes.increment(bytes as u64);
    }

    pub fn evicted(&self, why: Eviction, flows: u64) {
        self.evictions[why as usize].increment(flows);
    }
}

/// The UDP handles for `name`, registered on first use. Call when a flow is
/// created, never per datagram.
pub fn udp(name: &ServicePortName) -> Arc<UdpMetrics> {
    static REGISTRY: Registry<UdpMetrics> = Registry::new();
    describe_once();
    REGISTRY.get(name, || UdpMetrics::register(name))
}

/// The process-wide counter of datagrams that matched no frontend.
pub fn unmatched() -> &'static Counter {
    static UNMATCHED: OnceLock<Counter> = OnceLock::new();
    UNMATCHED.get_or_init(|| {
        describe_once();
        counter!(names::UNMATCHED)
    })
}

/// Installs the recorder (handles taken before it exists would be no-ops for
/// ever), then describes the UDP metrics to it once.
fn describe_once() {
    ensure_recorder();
    static DESCRIBED: OnceLock<()> = OnceLock::new();
    DESCRIBED.get_or_init(describe);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
    use names::*;
    describe_counter!(RX_DATAGRAMS, "UDP datagrams received from clients.");
    describe_counter!(TX_DATAGRAMS, "UDP datagrams sent to clients.");
    describe_counter!(RX_BYTES, Unit::Bytes, "UDP payload bytes from clients.");
    describe_counter!(TX_BYTES, Unit::Bytes, "UDP payload bytes to clients.");
    describe_gauge!(FLOWS_ACTIVE, "UDP flows (client, service address) alive.");
    describe_counter!(FLOWS_CREATED, "UDP flows created.");
    describe_counter!(FLOWS_EXPIRED, "UDP flows removed after their idle timeout.");
    describe_counter!(
        FLOW_EVICTIONS,
        "UDP flows evicted early: table full (cap) or endpoint gone (endpoint)."
    );
    describe_counter!(DROPPED, "UDP datagrams not relayed.");
    describe_counter!(UNMATCHED, "UDP datagrams for no known frontend.");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spn(n: &str) -> ServicePortName {
        ServicePortName::new("unit", n, "dns")
    }

    #[test]
    fn same_name_same_handles_and_counts_render() {
        let handle = super::super::install().expect("install recorder");
        let a = udp(&spn("udp-same"));
        assert!(Arc::ptr_eq(&a, &udp(&spn("udp-same"))));
        a.received(10);
        a.sent(30);
        a.evicted(Eviction::Cap, 2);
        a.flows_active.increment(1.0);
        let text = handle.render();
        let has = |name: &str, extra: &str, value: &str| {
            text.lines().any(|l| {
                l.starts_with(name)
                    && l.contains("service=\"udp-same\"")
                    && l.contains(extra)
                    && l.ends_with(&format!(" {value}"))
            })
        };
        assert!(has(names::RX_DATAGRAMS, "", "1"), "{text}");
        assert!(has(names::RX_BYTES, "", "10"), "{text}");
        assert!(has(names::TX_BYTES, "", "30"), "{text}");
        assert!(has(names::FLOW_EVICTIONS, "reason=\"cap\"", "2"), "{text}");
        assert!(
            has(names::FLOW_EVICTIONS, "reason=\"endpoint\"", "0"),
            "{text}"
        );
        assert!(has(names::FLOWS_ACTIVE, "", "1"), "{text}");
    }
}
