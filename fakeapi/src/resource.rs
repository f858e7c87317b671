//! The three resource types the fake serves, with the naming facts the API
//! server publishes in discovery (plural, kind, group/version, scope).
//!
//! Why a closed enum: lightpath watches exactly Services, EndpointSlices and
//! Nodes. Serving only these keeps every URL the fake accepts one that a real
//! API server would answer the same way.

use serde_json::{json, Value};

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    pub fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::EndpointSlice => "endpointslice",
            Kind::Node => "node",
        }
    }

    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Service => &["svc"],
            Kind::EndpointSlice => &[],
            Kind::Node => &["no"],
        }
    }

    /// API group; empty for the legacy core group.
    pub fn group(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io",
            _ => "",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    pub fn from_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.kind() == kind)
    }

    /// The resource served at `group/version/plural`.
    pub fn from_path(group_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == group_version && k.plural() == plural)
    }

    /// The entry for this resource in an `APIResourceList`.
    pub fn discovery_entry(self) -> Value {
        json!({
            "name": self.plural(),
            "singularName": self.singular(),
            "namespaced": self.namespaced(),
            "kind": self.kind(),
            "verbs": ["create", "delete", "get", "list", "update", "watch"],
            "shortNames": self.short_names(),
        })
    }
}
