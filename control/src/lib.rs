//! lightpath's control side: Kubernetes objects in (manifest files or the
//! kube watcher), immutable forwarding-table snapshots out.
//!
//! The data plane never sees a Kubernetes object. It holds a
//! `watch::Receiver<Arc<Table>>` and reads whatever snapshot is current.

pub mod model;

pub use model::*;

/// How the data plane receives table snapshots.
pub type TableRx = tokio::sync::watch::Receiver<std::sync::Arc<Table>>;
