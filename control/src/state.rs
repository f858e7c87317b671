//! The incremental object store: Kubernetes objects in, table snapshots out.
//!
//! Why incremental: a cluster with 10,000 services changes one EndpointSlice
//! at a time, many times a second. Rebuilding the whole table per change
//! would cost ~O(cluster) each time. Instead every object event marks the
//! services it touches dirty; [`ClusterState::snapshot`] re-translates only
//! those and patches a persistent (`imbl`) map, so publishing a snapshot is
//! O(changed rows) and untouched rows (and their `Arc<ServicePort>`) are
//! shared with the previous snapshot. Both the manifest source and the
//! Kubernetes watcher feed this same type.
//!
//! Address conflicts (two services claiming one ip:port/protocol, e.g. the
//! same externalIP) are resolved deterministically: the service whose
//! `namespace/name` sorts first owns the frontend; when it lets go, the next
//! claimant takes over.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::error::ObjectError;
use crate::model::{Frontend, FrontendKey, Table};
use crate::objects::{
    parse_node, parse_service, parse_slice, NodeInfo, ObjKey, ServiceInfo, Skip, SliceInfo,
};
use crate::options::Options;
use crate::translate::{translate, NodeCtx};

/// Every object this node cares about, plus the table derived from them.
pub struct ClusterState {
    opts: Options,
    services: HashMap<ObjKey, ServiceInfo>,
    slices: HashMap<ObjKey, SliceInfo>,
    /// service → names of the slices labelled for it.
    slices_by_service: HashMap<ObjKey, SortedSet<String>>,
    node: Option<NodeInfo>,
    node_ctx: NodeCtx,
    node_dirty: bool,
    /// Services whose rows must be recomputed at the next snapshot.
    dirty: HashSet<ObjKey>,
    /// The frontend keys each service currently claims.
    claimed: HashMap<ObjKey, Vec<FrontendKey>>,
    /// Every claimant of each key; the first (smallest) owns the row.
    claims: HashMap<FrontendKey, SortedSet<ObjKey>>,
    frontends: imbl::HashMap<FrontendKey, Frontend>,
    changed: bool,
    published: Arc<Table>,
    /// One shared copy of each node, zone and hint name: 100,000 endpoints
    /// name a few hundred nodes, so per-endpoint strings would be waste.
    names: HashSet<Arc<str>>,
}

impl ClusterState {
    pub fn new(opts: Options) -> Self {
        let node_ctx = NodeCtx::new(&opts, None);
        ClusterState {
            opts,
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_by_service: HashMap::new(),
            node: None,
            node_ctx,
            node_dirty: false,
            dirty: HashSet::new(),
            claimed: HashMap::new(),
            claims: HashMap::new(),
            frontends: imbl::HashMap::new(),
            changed: false,
            published: Arc::new(Table::default()),
            names: HashSet::new(),
        }
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Adds or replaces a Service. On error the previous version stays.
    /// Skipped services (headless, ExternalName, another proxy's) are valid
    /// and simply have no rows.
    pub fn upsert_service(&mut self, svc: Service) -> Result<(), ObjectError> {
        let parsed = parse_service(&svc, &self.opts)?;
        let key = match &parsed {
            Ok(info) => info.key.clone(),
            Err(_) => ObjKey::new(
                svc.metadata
                    .namespace
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .unwrap_or("default"),
                svc.metadata.name.as_deref().unwrap_or_default(),
            ),
        };
        drop(svc);
        self.upsert_service_info(key, parsed);
        Ok(())
    }

    /// [`Self::upsert_service`] for a Service already validated by
    /// [`parse_service`]: `Err(skip)` removes `key`'s rows. Lets a source
    /// drop the (large) k8s-openapi object as soon as it is validated.
    pub fn upsert_service_info(&mut self, key: ObjKey, parsed: Result<ServiceInfo, Skip>) {
        match parsed {
            Ok(info) => {
                if self.services.get(&info.key) != Some(&info) {
                    self.dirty.insert(info.key.clone());
                    self.services.insert(info.key.clone(), info);
                }
            }
            Err(skip) => {
                tracing::debug!(service = %key, reason = %skip, "service skipped");
                self.delete_service(&key.namespace, &key.name);
            }
        }
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let key = ObjKey::new(namespace, name);
        if self.services.remove(&key).is_some() {
            self.dirty.insert(key);
        }
    }

    /// Adds or replaces an EndpointSlice. On error the previous version stays.
    pub fn upsert_slice(&mut self, slice: EndpointSlice) -> Result<(), ObjectError> {
        let info = parse_slice(&slice)?;
        drop(slice);
        self.upsert_slice_info(info);
        Ok(())
    }

    /// [`Self::upsert_slice`] for a slice already validated by [`parse_slice`].
    pub fn upsert_slice_info(&mut self, mut info: SliceInfo) {
        self.intern(&mut info);
        if self.slices.get(&info.key) == Some(&info) {
            return;
        }
        let key = info.key.clone();
        self.unindex_slice(&key);
        if let Some(svc) = info.service_key() {
            self.slices_by_service
                .entry(svc.clone())
                .or_default()
                .insert(key.name.clone());
            self.dirty.insert(svc);
        }
        self.slices.insert(key, info);
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        let key = ObjKey::new(namespace, name);
        self.unindex_slice(&key);
        self.slices.remove(&key);
    }

    fn intern(&mut self, info: &mut SliceInfo) {
        let names = &mut self.names;
        let mut one = |s: &mut Arc<str>| match names.get(&**s) {
            Some(shared) => *s = shared.clone(),
            None => {
                names.insert(s.clone());
            }
        };
        for ep in &mut info.endpoints {
            ep.node_name.iter_mut().for_each(&mut one);
            ep.zone.iter_mut().for_each(&mut one);
            ep.zone_hints.iter_mut().for_each(&mut one);
            ep.node_hints.iter_mut().for_each(&mut one);
        }
    }

    fn unindex_slice(&mut self, key: &ObjKey) {
        let Some(svc) = self.slices.get(key).and_then(SliceInfo::service_key) else {
            return;
        };
        if let Some(names) = self.slices_by_service.get_mut(&svc) {
            names.remove(&key.name);
            if names.is_empty() {
                self.slices_by_service.remove(&svc);
            }
        }
        self.dirty.insert(svc);
    }

    /// Adds or replaces a Node. Only our own node (`Options::node_name`)
    /// matters; others are ignored without validation.
    pub fn upsert_node(&mut self, node: Node) -> Result<(), ObjectError> {
        if node.metadata.name.as_deref() != Some(self.opts.node_name.as_str()) {
            return Ok(());
        }
        self.upsert_node_info(parse_node(&node)?);
        Ok(())
    }

    /// [`Self::upsert_node`] for a Node already validated by [`parse_node`];
    /// ignored unless it is our own node.
    pub fn upsert_node_info(&mut self, info: NodeInfo) {
        if info.name != self.opts.node_name {
            return;
        }
        if self.node.as_ref() != Some(&info) {
            self.node = Some(info);
            self.node_dirty = true;
        }
    }

    pub fn delete_node(&mut self, name: &str) {
        if name == self.opts.node_name && self.node.take().is_some() {
            self.node_dirty = true;
        }
    }

    /// Number of proxied services and of known EndpointSlices.
    pub fn counts(&self) -> (usize, usize) {
        (self.services.len(), self.slices.len())
    }

    /// The current table. Recomputes only services touched since the last
    /// call; returns the same `Arc` (same version) if nothing changed.
    pub fn snapshot(&mut self) -> Arc<Table> {
        if self.node_dirty {
            self.node_dirty = false;
            let ctx = NodeCtx::new(&self.opts, self.node.as_ref());
            if ctx != self.node_ctx {
                self.node_ctx = ctx;
                // Locality, zone and NodePort addresses may change anywhere.
                self.dirty.extend(self.services.keys().cloned());
                self.dirty.extend(self.claimed.keys().cloned());
            }
        }
        // Recomputing one service can hand a contested frontend to another,
        // which then becomes dirty itself; that chain is bounded by the
        // number of claimants.
        // Taken in batches: picking one key at a time out of a large HashSet
        // rescans its emptied buckets and goes quadratic on a full build.
        loop {
            let batch: Vec<ObjKey> = self.dirty.drain().collect();
            if batch.is_empty() {
                break;
            }
            for key in batch {
                let rows = match self.services.get(&key) {
                    Some(info) => {
                        let slices: Vec<&SliceInfo> = self
                            .slices_by_service
                            .get(&key)
                            .into_iter()
                            .flatten()
                            .filter_map(|n| self.slices.get(&ObjKey::new(&key.namespace, n)))
                            .collect();
                        translate(info, &slices, &self.node_ctx)
                    }
                    None => Vec::new(),
                };
                self.apply(&key, rows);
            }
        }
        if self.changed {
            self.changed = false;
            self.published = Arc::new(Table {
                version: self.published.version + 1,
                frontends: self.frontends.clone(),
            });
        }
        self.published.clone()
    }

    /// Replaces the rows `svc` claims with `rows`.
    fn apply(&mut self, svc: &ObjKey, rows: Vec<Frontend>) {
        let old = self.claimed.remove(svc).unwrap_or_default();
        let mut new_keys: Vec<FrontendKey> = Vec::with_capacity(rows.len());
        for mut row in rows {
            if new_keys.contains(&row.key) {
                tracing::warn!(service = %svc, frontend = %row.key, "service claims the same frontend twice; first wins");
                continue;
            }
            new_keys.push(row.key);
            // Keep the previous Arc when the port did not change, so the data
            // plane can tell untouched service ports by pointer.
            if let Some(prev) = self.frontends.get(&row.key) {
                if prev.service == row.service {
                    row.service = prev.service.clone();
                }
            }
            self.claim(svc, row);
        }
        for key in old {
            if !new_keys.contains(&key) {
                self.release(svc, key);
            }
        }
        if !new_keys.is_empty() {
            self.claimed.insert(svc.clone(), new_keys);
        }
    }

    fn claim(&mut self, svc: &ObjKey, row: Frontend) {
        let claimants = self.claims.entry(row.key).or_default();
        claimants.insert(svc.clone());
        if claimants.first() != Some(svc) {
            tracing::warn!(
                frontend = %row.key,
                service = %svc,
                owner = ?claimants.first(),
                "frontend already claimed by another service; not taken"
            );
            return;
        }
        if self.frontends.get(&row.key) != Some(&row) {
            self.frontends.insert(row.key, row);
            self.changed = true;
        }
    }

    fn release(&mut self, svc: &ObjKey, key: FrontendKey) {
        let Some(claimants) = self.claims.get_mut(&key) else {
            return;
        };
        let was_owner = claimants.first() == Some(svc);
        claimants.remove(svc);
        let next = claimants.first().cloned();
        if claimants.is_empty() {
            self.claims.remove(&key);
        }
        if was_owner {
            self.frontends.remove(&key);
            self.changed = true;
            if let Some(next) = next {
                self.dirty.insert(next);
            }
        }
    }
}

/// A set kept as a sorted `Vec`. Almost every set here has one element (one
/// slice per service, one claimant per frontend); a `BTreeSet` would
/// allocate a whole 11-slot node for each, which dominated the store's
/// memory at 10,000 services.
#[derive(Debug)]
struct SortedSet<T>(Vec<T>);

impl<T> Default for SortedSet<T> {
    fn default() -> Self {
        SortedSet(Vec::new())
    }
}

impl<T: Ord> SortedSet<T> {
    fn insert(&mut self, v: T) {
        if let Err(i) = self.0.binary_search(&v) {
            self.0.insert(i, v);
        }
    }

    fn remove(&mut self, v: &T) {
        if let Ok(i) = self.0.binary_search(v) {
            self.0.remove(i);
        }
    }

    fn first(&self) -> Option<&T> {
        self.0.first()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a, T> IntoIterator for &'a SortedSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
