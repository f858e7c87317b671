//! Validation errors for single Kubernetes objects.
//!
//! Why a structured error rather than a string: the manifest source prefixes
//! it with file and document index, the watcher counts it per kind, and an
//! operator must be able to find the offending field from the message alone,
//! e.g. `EndpointSlice default/web-abc: endpoints[2].addresses[0]: invalid
//! IPv4 address "10.0.0.300"`.

use std::fmt;

/// One invalid field in one object. The object's previous good version (if
/// any) stays in effect.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ObjectError {
    /// `Service`, `EndpointSlice` or `Node`.
    pub kind: &'static str,
    /// Empty for cluster-scoped objects (Node).
    pub namespace: String,
    pub name: String,
    /// JSON-path-like location, e.g. `spec.ports[1].nodePort`; empty when the
    /// problem is the object as a whole.
    pub field: String,
    pub message: String,
}

impl ObjectError {
    pub(crate) fn new(
        kind: &'static str,
        namespace: &str,
        name: &str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ObjectError {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// `Kind namespace/name` (or `Kind name` for cluster-scoped objects).
    pub fn object(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.object())?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}
