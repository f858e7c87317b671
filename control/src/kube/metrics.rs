//! Metric handles for the Kubernetes source, through the `metrics` facade.
//!
//! Why handles registered once: label sets are fixed (three resources, five
//! event kinds), so each handle is resolved at startup and an event costs
//! one atomic add, with no key hashing per event. Exporting is the admin
//! side's job; with no recorder installed these are no-ops.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

pub const WATCH_EVENTS: &str = "lightpath_kube_watch_events_total";
pub const WATCH_ERRORS: &str = "lightpath_kube_watch_errors_total";
pub const INVALID_OBJECTS: &str = "lightpath_kube_invalid_objects_total";
pub const SYNCED: &str = "lightpath_kube_synced";
pub const LAST_SYNC: &str = "lightpath_kube_last_sync_timestamp_seconds";
pub const PROPAGATION: &str = "lightpath_kube_update_propagation_seconds";
pub const TABLE_VERSION: &str = "lightpath_kube_table_version";
pub const FRONTENDS: &str = "lightpath_kube_frontends";

/// Per-resource handles (`resource` label: services, endpointslices, nodes).
pub struct ResourceMetrics {
    pub apply: Counter,
    pub delete: Counter,
    pub init: Counter,
    pub init_apply: Counter,
    pub init_done: Counter,
    /// Watch/list failures: connection errors, 410 Gone, decode errors.
    pub errors: Counter,
    /// Objects rejected by validation (the previous version stays).
    pub invalid: Counter,
    /// 1 once the current (re)list has completed, 0 while listing.
    pub synced: Gauge,
}

impl ResourceMetrics {
    pub fn new(resource: &'static str) -> Self {
        let ev =
            |event: &'static str| counter!(WATCH_EVENTS, "resource" => resource, "event" => event);
        ResourceMetrics {
            apply: ev("apply"),
            delete: ev("delete"),
            init: ev("init"),
            init_apply: ev("init_apply"),
            init_done: ev("init_done"),
            errors: counter!(WATCH_ERRORS, "resource" => resource),
            invalid: counter!(INVALID_OBJECTS, "resource" => resource),
            synced: gauge!(SYNCED, "resource" => resource),
        }
    }
}

/// Handles for publishing.
pub struct PublishMetrics {
    /// Unix time of the last snapshot published from a complete view.
    pub last_sync: Gauge,
    /// Oldest unpublished event → snapshot published, per publish.
    pub propagation: Histogram,
    pub table_version: Gauge,
    pub frontends: Gauge,
}

impl Default for PublishMetrics {
    fn default() -> Self {
        PublishMetrics {
            last_sync: gauge!(LAST_SYNC),
            propagation: histogram!(PROPAGATION),
            table_version: gauge!(TABLE_VERSION),
            frontends: gauge!(FRONTENDS),
        }
    }
}
