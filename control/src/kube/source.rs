//! The event loop: three watch streams in, table snapshots out.
//!
//! Why one task owning the [`ClusterState`]: every event mutates the same
//! state, so a single owner needs no lock, and the data plane only ever sees
//! the immutable `Arc<Table>` this task publishes. Events are applied as
//! they arrive; publishing waits [`COALESCE`] after the first unpublished
//! change so a burst (a rollout touching many slices) yields one snapshot,
//! yet a lone update still reaches the data plane within a few ms.
//!
//! Nothing is published while any watch is (re)listing: before every
//! initial list completes, a partial view would program rules for half the
//! cluster; during a relist after an outage, objects not yet relisted would
//! look deleted. The last complete table keeps serving meanwhile.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::BoxStream;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

use super::metrics::{PublishMetrics, ResourceMetrics};
use super::node::NodeEligibility;
use super::selectors::{label_selector, node_field_selector};
use super::tracker::{ObjRef, Tracker};
use super::InitialSync;
use crate::error::ObjectError;
use crate::model::Table;
use crate::options::Options;
use crate::state::ClusterState;

/// How long after the first unpublished change a snapshot is published.
/// Small against the 100 ms propagation budget; large enough to fold a
/// burst of slice updates into one snapshot.
pub const COALESCE: Duration = Duration::from_millis(2);

/// One of the watched kinds, with how its events land in [`ClusterState`].
trait Watched: kube::Resource + Clone + Send + 'static {
    const RESOURCE: &'static str;
    fn upsert(state: &mut ClusterState, obj: Self) -> Result<(), ObjectError>;
    fn remove(state: &mut ClusterState, key: &ObjRef);
}

impl Watched for Service {
    const RESOURCE: &'static str = "services";
    fn upsert(state: &mut ClusterState, obj: Self) -> Result<(), ObjectError> {
        state.upsert_service(obj)
    }
    fn remove(state: &mut ClusterState, key: &ObjRef) {
        state.delete_service(&key.0, &key.1)
    }
}

impl Watched for EndpointSlice {
    const RESOURCE: &'static str = "endpointslices";
    fn upsert(state: &mut ClusterState, obj: Self) -> Result<(), ObjectError> {
        state.upsert_slice(obj)
    }
    fn remove(state: &mut ClusterState, key: &ObjRef) {
        state.delete_slice(&key.0, &key.1)
    }
}

impl Watched for Node {
    const RESOURCE: &'static str = "nodes";
    fn upsert(state: &mut ClusterState, obj: Self) -> Result<(), ObjectError> {
        state.upsert_node(obj)
    }
    fn remove(state: &mut ClusterState, key: &ObjRef) {
        state.delete_node(&key.1)
    }
}

fn obj_ref<K: kube::Resource>(obj: &K) -> ObjRef {
    let ns = obj
        .meta()
        .namespace
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_default();
    (ns, obj.meta().name.clone().unwrap_or_default())
}

/// One watch's bookkeeping and metrics.
struct Watch {
    tracker: Tracker,
    metrics: ResourceMetrics,
}

impl Watch {
    fn new(resource: &'static str) -> Self {
        Watch {
            tracker: Tracker::default(),
            metrics: ResourceMetrics::new(resource),
        }
    }
}

/// Boxed: the objects are hundreds of bytes each; one allocation per event
/// is noise beside its JSON decoding.
enum Update {
    Service(Box<watcher::Result<Event<Service>>>),
    Slice(Box<watcher::Result<Event<EndpointSlice>>>),
    Node(Box<watcher::Result<Event<Node>>>),
}

/// Where the loop publishes what it learns.
pub(super) struct Outputs {
    pub table: watch::Sender<Arc<Table>>,
    pub ready: watch::Sender<bool>,
    pub initial_sync: watch::Sender<InitialSync>,
    pub node: watch::Sender<NodeEligibility>,
}

/// The mutable side of the loop: state, trackers and what is unpublished.
struct Pump {
    state: ClusterState,
    services: Watch,
    slices: Watch,
    nodes: Watch,
    /// When the oldest unpublished change arrived.
    dirty_since: Option<Instant>,
    /// The unpublished batch includes a relist (its age measures the outage,
    /// not propagation, so it is kept out of the histogram).
    batch_relisted: bool,
    table_tx: watch::Sender<Arc<Table>>,
    ready_tx: watch::Sender<bool>,
    sync_tx: watch::Sender<InitialSync>,
    node_tx: watch::Sender<NodeEligibility>,
    node_name: String,
    publish: PublishMetrics,
}

impl Pump {
    fn complete(&self) -> bool {
        self.services.tracker.complete()
            && self.slices.tracker.complete()
            && self.nodes.tracker.complete()
    }

    fn mark_dirty(&mut self) {
        self.dirty_since.get_or_insert_with(Instant::now);
    }

    fn apply<K: Watched>(
        state: &mut ClusterState,
        w: &mut Watch,
        ev: watcher::Result<Event<K>>,
    ) -> (bool, bool) {
        let resource = K::RESOURCE;
        let upsert = |state: &mut ClusterState, w: &mut Watch, obj: K| {
            let key = obj_ref(&obj);
            if let Err(e) = K::upsert(state, obj) {
                w.metrics.invalid.increment(1);
                tracing::warn!(
                    resource,
                    object = %e.object(),
                    field = %e.field,
                    error = %e,
                    "invalid object ignored; its previous version (if any) stays in effect"
                );
            }
            // Known either way: if it is deleted later, the delete must apply.
            w.tracker.seen(key);
        };
        // (changed the state, was part of a relist)
        match ev {
            Ok(Event::Apply(obj)) => {
                w.metrics.apply.increment(1);
                upsert(state, w, obj);
                (true, false)
            }
            Ok(Event::Delete(obj)) => {
                w.metrics.delete.increment(1);
                let key = obj_ref(&obj);
                K::remove(state, &key);
                w.tracker.gone(&key);
                (true, false)
            }
            Ok(Event::Init) => {
                w.metrics.init.increment(1);
                w.metrics.synced.set(0.0);
                tracing::debug!(resource, "listing");
                w.tracker.init();
                (false, true)
            }
            Ok(Event::InitApply(obj)) => {
                w.metrics.init_apply.increment(1);
                upsert(state, w, obj);
                (true, true)
            }
            Ok(Event::InitDone) => {
                w.metrics.init_done.increment(1);
                w.metrics.synced.set(1.0);
                let vanished = w.tracker.done();
                tracing::info!(
                    resource,
                    objects = w.tracker.known_count(),
                    vanished = vanished.len(),
                    "list complete"
                );
                for key in &vanished {
                    K::remove(state, key);
                }
                (true, true)
            }
            Err(e) => {
                w.metrics.errors.increment(1);
                match &e {
                    watcher::Error::WatchError(status) if status.code == 410 => tracing::info!(
                        resource,
                        "watch resourceVersion expired (410 Gone); relisting"
                    ),
                    _ => {
                        tracing::warn!(resource, error = %e, "watch failed; retrying with backoff, last table keeps serving")
                    }
                }
                (false, false)
            }
        }
    }

    fn handle(&mut self, update: Update) {
        let (changed, relist) = match update {
            Update::Service(ev) => Self::apply(&mut self.state, &mut self.services, *ev),
            Update::Slice(ev) => Self::apply(&mut self.state, &mut self.slices, *ev),
            Update::Node(ev) => {
                self.observe_node(&ev);
                Self::apply(&mut self.state, &mut self.nodes, *ev)
            }
        };
        if changed {
            self.mark_dirty();
        }
        self.batch_relisted |= relist;
        let synced = InitialSync {
            services: self.services.tracker.synced(),
            endpointslices: self.slices.tracker.synced(),
            nodes: self.nodes.tracker.synced(),
        };
        self.sync_tx.send_if_modified(|cur| {
            let changed = *cur != synced;
            *cur = synced;
            changed
        });
    }

    /// Our Node's eligibility, published at once (it does not wait for the
    /// coalescing window or a complete view: it is one object's state).
    /// As kube-proxy, a delete is judged by the deleted object's last state.
    fn observe_node(&self, ev: &watcher::Result<Event<Node>>) {
        let node = match ev {
            Ok(Event::Apply(n) | Event::InitApply(n) | Event::Delete(n)) => n,
            _ => return,
        };
        if node.metadata.name.as_deref() != Some(self.node_name.as_str()) {
            return;
        }
        let eligibility = NodeEligibility::of(node);
        self.node_tx.send_if_modified(|cur| {
            if *cur == eligibility {
                return false;
            }
            tracing::info!(node = %self.node_name, from = %cur, to = %eligibility, "node eligibility changed");
            *cur = eligibility;
            true
        });
    }

    /// When the pending batch should be published, if it may be.
    fn deadline(&self) -> Option<Instant> {
        match self.dirty_since {
            Some(t) if self.complete() => Some(t + COALESCE),
            _ => None,
        }
    }

    fn publish(&mut self) {
        let Some(since) = self.dirty_since.take() else {
            return;
        };
        let snap = self.state.snapshot();
        let version = snap.version;
        let frontends = snap.len();
        let sent = self.table_tx.send_if_modified(|cur| {
            if Arc::ptr_eq(cur, &snap) {
                false
            } else {
                *cur = snap;
                true
            }
        });
        if !std::mem::take(&mut self.batch_relisted) {
            self.publish
                .propagation
                .record(since.elapsed().as_secs_f64());
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.publish.last_sync.set(now.as_secs_f64());
        self.publish.table_version.set(version as f64);
        self.publish.frontends.set(frontends as f64);
        if sent {
            tracing::debug!(version, frontends, "table published");
        }
        if !*self.ready_tx.borrow() {
            let (services, slices) = self.state.counts();
            tracing::info!(services, slices, frontends, "initial sync complete; ready");
            self.ready_tx.send_replace(true);
        }
    }
}

fn stream<K>(api: Api<K>, config: watcher::Config) -> BoxStream<'static, watcher::Result<Event<K>>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    // The watcher relists on 410 by itself; the backoff (0.8 s doubling to
    // 30 s, reset after 2 min of health) paces reconnects to a missing API
    // server.
    watcher::watcher(api, config).default_backoff().boxed()
}

pub(super) async fn run(client: Client, opts: Options, out: Outputs) {
    let labels = label_selector(&opts);
    let node_fields = node_field_selector(&opts);
    let services = stream(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels(&labels),
    )
    .map(|ev| Update::Service(Box::new(ev)));
    let slices = stream(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&labels),
    )
    .map(|ev| Update::Slice(Box::new(ev)));
    let nodes = stream(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&node_fields),
    )
    .map(|ev| Update::Node(Box::new(ev)));
    let mut events = futures::stream::select(futures::stream::select(services, slices), nodes);

    let node_name = opts.node_name.clone();
    let mut pump = Pump {
        state: ClusterState::new(opts),
        services: Watch::new(Service::RESOURCE),
        slices: Watch::new(EndpointSlice::RESOURCE),
        nodes: Watch::new(Node::RESOURCE),
        dirty_since: None,
        batch_relisted: false,
        table_tx: out.table,
        ready_tx: out.ready,
        sync_tx: out.initial_sync,
        node_tx: out.node,
        node_name,
        publish: PublishMetrics::default(),
    };
    loop {
        let deadline = pump.deadline();
        tokio::select! {
            update = events.next() => match update {
                Some(u) => pump.handle(u),
                // The watcher streams never end on their own.
                None => break,
            },
            _ = sleep_until(deadline), if deadline.is_some() => pump.publish(),
            // Everyone holding the table went away: nothing left to serve.
            _ = pump.table_tx.closed() => break,
        }
    }
    tracing::debug!("kubernetes source stopped");
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d).await
    }
}
