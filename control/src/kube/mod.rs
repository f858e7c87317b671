//! The Kubernetes source: Services, EndpointSlices and this node's Node,
//! watched in-process with `kube::runtime::watcher`, translated by the same
//! [`crate::ClusterState`] the manifest source uses, published as
//! `Arc<Table>` snapshots.
//!
//! Why in-process: no separate control plane or xDS hop per node. An
//! EndpointSlice event becomes a new snapshot in milliseconds, and because
//! `ClusterState` re-translates only the touched service, the data plane
//! sees the other services' `Arc<ServicePort>`s unchanged (it diffs by
//! pointer).
//!
//! Guarantees, each tested against `fakeapi` with a real `kube::Client`:
//! - readiness turns true only after every watch's initial list completed,
//!   and nothing is published from a partial view before that;
//! - when the API server goes away the last table keeps serving; watches
//!   reconnect with backoff, relist on 410 Gone, and a relist replaces the
//!   state exactly (objects deleted meanwhile are deleted);
//! - an invalid object is logged (object and field) and counted; the rest
//!   of the cluster still updates.
//!
//! Usage from the binary:
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let client = control::kube::client(Some(std::path::Path::new("/etc/kubeconfig"))).await?;
//! let source = control::kube::watch_cluster(client, control::Options::default());
//! let mut ready = source.ready.clone();
//! ready.wait_for(|r| *r).await?; // only now program rules from source.table
//! # Ok(()) }
//! ```

mod client;
pub mod metrics;
pub mod selectors;
mod source;
mod tracker;

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use client::{client, ClientError};
pub use source::COALESCE;

use crate::model::Table;
use crate::options::Options;
use crate::TableRx;

/// A running Kubernetes source.
pub struct KubeSource {
    /// The current table. Holds an empty table until `ready` is true.
    pub table: TableRx,
    /// True once every watch (Services, EndpointSlices, Node) completed its
    /// initial list and the first complete snapshot is in `table`. Stays
    /// true through later outages (the last table keeps serving).
    pub ready: watch::Receiver<bool>,
    /// The watch task; it ends when every table receiver is dropped.
    pub task: JoinHandle<()>,
}

/// Starts watching the cluster through `client`. Must be called within a
/// Tokio runtime. Never fails: an unreachable API server only delays
/// readiness (the watches retry with backoff).
pub fn watch_cluster(client: ::kube::Client, opts: Options) -> KubeSource {
    let (table_tx, table) = watch::channel(Arc::new(Table::default()));
    let (ready_tx, ready) = watch::channel(false);
    let task = tokio::spawn(source::run(client, opts, table_tx, ready_tx));
    KubeSource { table, ready, task }
}
