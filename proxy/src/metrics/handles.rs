//! What every per-service-port handle set shares: the label set that names a
//! service port, and the process-wide registry that hands out one shared
//! handle set per service port.
//!
//! Why one place: the TCP/HTTP set ([`super::ServiceMetrics`]) and the UDP set
//! ([`super::udp::UdpMetrics`]) must label their series identically (so one
//! PromQL `by (namespace, service, port)` joins them) and must both make sure
//! the recorder is installed before taking a handle (a handle taken earlier is
//! a no-op for ever). Keeping those rules here means they cannot drift apart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use control::ServicePortName;
use metrics::Label;

/// The labels of every per-service-port series: `namespace`, `service`, `port`.
pub(crate) fn service_port_labels(name: &ServicePortName) -> Vec<Label> {
    vec![
        Label::new("namespace", name.namespace.clone()),
        Label::new("service", name.name.clone()),
        Label::new("port", name.port.clone()),
    ]
}

/// `labels` plus one fixed extra label (a status class, an eviction reason).
pub(crate) fn with_label(labels: &[Label], key: &'static str, value: &'static str) -> Vec<Label> {
    let mut l = labels.to_vec();
    l.push(Label::new(key, value));
    l
}

/// Installs lightpath's recorder if no recorder is installed yet. If another
/// recorder is already global, handles go to that one instead.
pub(crate) fn ensure_recorder() {
    if let Err(e) = super::install() {
        tracing::debug!(error = %e, "metrics recorder not installed by lightpath");
    }
}

/// One shared `Arc<T>` per service port, created on first request. Control
/// path only: callers keep the `Arc` and never come back per packet.
pub(crate) struct Registry<T> {
    map: OnceLock<Mutex<HashMap<ServicePortName, Arc<T>>>>,
}

impl<T> Registry<T> {
    pub(crate) const fn new() -> Self {
        Registry {
            map: OnceLock::new(),
        }
    }

    /// The set for `name`, made by `make` the first time. Installs the
    /// recorder first, so `make` may register series right away.
    pub(crate) fn get(&self, name: &ServicePortName, make: impl FnOnce() -> T) -> Arc<T> {
        ensure_recorder();
        let mut map = self
            .map
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(name.clone()).or_insert_with(|| Arc::new(make())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spn(n: &str) -> ServicePortName {
        ServicePortName::new("unit", n, "p")
    }

    #[test]
    fn one_set_per_name_made_once() {
        static REG: Registry<u32> = Registry::new();
        let mut made = 0;
        let a = REG.get(&spn("a"), || {
            made += 1;
            1
        });
        let again = REG.get(&spn("a"), || {
            made += 1;
            2
        });
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(*again, 1);
        assert_eq!(made, 1);
        assert_eq!(*REG.get(&spn("b"), || 3), 3);
    }

    #[test]
    fn labels_name_the_service_port_then_the_extra() {
        let l = with_label(&service_port_labels(&spn("web")), "reason", "cap");
        let pairs: Vec<(&str, &str)> = l.iter().map(|l| (l.key(), l.value())).collect();
        assert_eq!(
            pairs,
            [
                ("namespace", "unit"),
                ("service", "web"),
                ("port", "p"),
                ("reason", "cap")
            ]
        );
    }
}
