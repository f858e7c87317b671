//! lightpath's control side: Kubernetes objects in (manifest files or the
//! kube watcher), immutable forwarding-table snapshots out.
//!
//! The data plane never sees a Kubernetes object. It holds a
//! `watch::Receiver<Arc<Table>>` and reads whatever snapshot is current.
//!
//! Pipeline: [`objects`] validates each object into small facts,
//! [`ClusterState`] stores them and tracks which services changed,
//! [`translate`] + [`select`] turn one service into its table rows exactly
//! as kube-proxy would, and [`manifest`] feeds files through the same path.

pub mod diff;
pub mod error;
pub mod kube;
pub mod manifest;
mod manifest_doc;
pub mod model;
pub mod objects;
pub mod options;
pub mod select;
pub mod state;
pub mod synth;
pub mod translate;

pub use diff::{PortDiff, PortId};
pub use error::ObjectError;
pub use manifest::{load_manifests, read_manifests, watch_manifests, ManifestError};
pub use model::*;
pub use options::Options;
pub use state::ClusterState;

/// How the data plane receives table snapshots.
pub type TableRx = tokio::sync::watch::Receiver<std::sync::Arc<Table>>;
