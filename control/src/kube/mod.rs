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
pub mod node;
pub mod selectors;
mod source;
mod tracker;

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use client::{client, ClientError};
pub use node::NodeEligibility;
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
    /// Which watches have completed their first list. Lets an operator see
    /// what a slow start is waiting for (the table itself stays empty until
    /// all of them have).
    pub initial_sync: watch::Receiver<InitialSync>,
    /// This node's eligibility for load-balancer traffic, from our Node
    /// object (kube-proxy's `/healthz` contract). `Eligible` until the Node
    /// says otherwise.
    pub node: watch::Receiver<NodeEligibility>,
    /// The watch task; it ends when every table receiver is dropped.
    pub task: JoinHandle<()>,
}

/// Per watched resource: has its first list completed?
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct InitialSync {
    pub services: bool,
    pub endpointslices: bool,
    pub nodes: bool,
}

impl InitialSync {
    /// The resources still on their first list, by API name.
    pub fn pending(&self) -> Vec<&'static str> {
        [
            ("services", self.services),
            ("endpointslices", self.endpointslices),
            ("nodes", self.nodes),
        ]
        .into_iter()
        .filter(|(_, done)| !done)
        .map(|(name, _)| name)
        .collect()
    }

    pub fn complete(&self) -> bool {
        self.services && self.endpointslices && self.nodes
    }
}

/// Starts watching the cluster through `client`. Must be called within a
/// Tokio runtime. Never fails: an unreachable API server only delays
/// readiness (the watches retry with backoff).
pub fn watch_cluster(client: ::kube::Client, opts: Options) -> KubeSource {
    let (table_tx, table) = watch::channel(Arc::new(Table::default()));
    let (ready_tx, ready) = watch::channel(false);
    let (sync_tx, initial_sync) = watch::channel(InitialSync::default());
    let (node_tx, node) = watch::channel(NodeEligibility::Eligible);
    let outputs = source::Outputs {
        table: table_tx,
        ready: ready_tx,
        initial_sync: sync_tx,
        node: node_tx,
    };
    let task = tokio::spawn(source::run(client, opts, outputs));
    KubeSource {
        table,
        ready,
        initial_sync,
        node,
        task,
    }
}
