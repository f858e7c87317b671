//! The manifest-file source: YAML/JSON files of Services, EndpointSlices and
//! Nodes → table snapshots, re-read when the files change.
//!
//! Why it exists: lightpath must be runnable and testable without a cluster
//! (the demo, the `table` command, the end-to-end tests), and files must go
//! through exactly the same validation and translation as the Kubernetes
//! watcher — so this module only parses documents and feeds [`ClusterState`].
//!
//! An edit is all-or-nothing: if any document of any file is invalid, every
//! problem is reported (file, 1-based document index, `items[i]` inside a
//! List, kind and name, field) and the previous table keeps serving.
//! Change detection is a content hash polled at a fixed interval: it works
//! on every filesystem (including bind-mounted ConfigMaps, whose atomic
//! symlink swaps defeat most inotify setups) and costs one read per poll.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::Hasher;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::watch;

use crate::error::ObjectError;
use crate::kube::NodeEligibility;
use crate::manifest_doc;
use crate::model::Table;
use crate::objects::{
    parse_node, parse_service, parse_slice, NodeInfo, ObjKey, ServiceInfo, Skip, SliceInfo,
};
use crate::options::Options;
use crate::state::ClusterState;
use crate::TableRx;

/// Where a document came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// Index inside a `List` document's `items`.
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.path.display(), self.document)?;
        if let Some(i) = self.item {
            write!(f, " items[{i}]")?;
        }
        Ok(())
    }
}

/// A problem with one or more manifest files.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Syntax, wrong types, missing or unknown kind: the document could not
    /// be read as an object. `object` names it when its kind and name were
    /// readable.
    #[error("{at}: {}{message}", object.as_ref().map(|o| format!("{o}: ")).unwrap_or_default())]
    Document {
        at: Location,
        object: Option<String>,
        message: String,
    },
    /// A well-formed object with an invalid field.
    #[error("{at}: {source}")]
    Object {
        at: Location,
        #[source]
        source: Box<ObjectError>,
    },
    #[error("{at}: duplicate {object} (first defined at {first})")]
    Duplicate {
        at: Location,
        object: String,
        first: Location,
    },
    #[error("{} problems:\n{}", .0.len(), .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Many(Vec<ManifestError>),
    #[error("no manifest files given")]
    NoFiles,
}

impl ManifestError {
    fn from_list(mut errs: Vec<ManifestError>) -> ManifestError {
        if errs.len() == 1 {
            errs.remove(0)
        } else {
            ManifestError::Many(errs)
        }
    }

    /// The individual problems (one for anything but `Many`).
    pub fn problems(&self) -> Vec<&ManifestError> {
        match self {
            ManifestError::Many(v) => v.iter().collect(),
            e => vec![e],
        }
    }
}

/// A typed object read from a manifest.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Node(_) => "Node",
        }
    }

    /// `(kind, namespace/name)`: the identity used for duplicate detection
    /// and diffing. Namespace is "" for Nodes, "default" when omitted.
    pub fn id(&self) -> (&'static str, ObjKey) {
        let meta = match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
        };
        let ns = match self {
            Object::Node(_) => "",
            _ => meta
                .namespace
                .as_deref()
                .filter(|s| !s.is_empty())
                .unwrap_or("default"),
        };
        (
            self.kind(),
            ObjKey::new(ns, meta.name.as_deref().unwrap_or_default()),
        )
    }

    fn describe(&self) -> String {
        let (kind, key) = self.id();
        if key.namespace.is_empty() {
            format!("{kind} {}", key.name)
        } else {
            format!("{kind} {key}")
        }
    }

    /// Field-level validation, the same the store applies on upsert.
    fn validate(&self, opts: &Options) -> Result<(), ObjectError> {
        match self {
            Object::Service(s) => parse_service(s, opts).map(drop),
            Object::EndpointSlice(s) => parse_slice(s).map(drop),
            Object::Node(n) if n.metadata.name.as_deref() == Some(opts.node_name.as_str()) => {
                parse_node(n).map(drop)
            }
            Object::Node(_) => Ok(()),
        }
    }
}

/// One object and where it came from.
#[derive(Clone, Debug)]
pub struct Document {
    pub at: Location,
    pub object: Object,
}

fn expected_api_version(kind: &str) -> Option<&'static str> {
    match kind {
        "Service" | "Node" => Some("v1"),
        "EndpointSlice" => Some("discovery.k8s.io/v1"),
        _ => None,
    }
}

fn str_field<'a>(v: &'a serde_yaml::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(serde_yaml::Value::as_str)
}

/// Best-effort `Kind namespace/name` for error messages about a document
/// that failed to deserialize.
fn describe_raw(kind: &str, v: &serde_yaml::Value) -> Option<String> {
    let meta = v.get("metadata")?;
    let name = str_field(meta, "name")?;
    Some(match (kind, str_field(meta, "namespace")) {
        ("Node", _) => format!("Node {name}"),
        (k, Some(ns)) => format!("{k} {ns}/{name}"),
        (k, None) => format!("{k} default/{name}"),
    })
}

fn typed<T: serde::de::DeserializeOwned>(v: serde_yaml::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.into_inner().to_string()
        } else {
            format!("{path}: {}", e.into_inner())
        }
    })
}

/// One object document (not a List) → a typed object.
fn object_from_value(
    at: &Location,
    v: serde_yaml::Value,
    default_kind: Option<&str>,
) -> Result<Object, ManifestError> {
    let doc_err = |object: Option<String>, message: String| ManifestError::Document {
        at: at.clone(),
        object,
        message,
    };
    if !v.is_mapping() {
        return Err(doc_err(
            None,
            "not a mapping (expected a Kubernetes object)".into(),
        ));
    }
    let kind = match (str_field(&v, "kind"), default_kind) {
        (Some(k), _) => k.to_string(),
        (None, Some(k)) => k.to_string(),
        (None, None) => return Err(doc_err(None, "missing field `kind`".into())),
    };
    let Some(want_api) = expected_api_version(&kind) else {
        return Err(doc_err(
            describe_raw(&kind, &v),
            format!(
                "unsupported kind {kind:?} (want Service, EndpointSlice, Node or a List of them)"
            ),
        ));
    };
    let describe = describe_raw(&kind, &v);
    match str_field(&v, "apiVersion") {
        Some(a) if a == want_api => {}
        None if default_kind.is_some() => {}
        Some(a) => {
            return Err(doc_err(
                describe,
                format!("apiVersion: {kind} must be {want_api:?}, got {a:?}"),
            ))
        }
        None => return Err(doc_err(describe, "missing field `apiVersion`".into())),
    }
    let name_ok = v
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(serde_yaml::Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if !name_ok {
        return Err(doc_err(None, format!("{kind}: metadata.name: missing")));
    }
    let obj = match kind.as_str() {
        "Service" => typed::<Service>(v).map(|o| Object::Service(Box::new(o))),
        "EndpointSlice" => typed::<EndpointSlice>(v).map(|o| Object::EndpointSlice(Box::new(o))),
        _ => typed::<Node>(v).map(|o| Object::Node(Box::new(o))),
    };
    obj.map_err(|m| doc_err(describe, m))
}

/// `Some(item kind)` when `kind` names a List: `None` inside for a plain
/// `List` (items carry their own kind), `Some("Service")` for `ServiceList`.
fn list_kind(kind: &str) -> Option<Option<&str>> {
    if kind == "List" {
        return Some(None);
    }
    let item = kind.strip_suffix("List")?;
    expected_api_version(item).map(|_| Some(item))
}

/// Walks every document of one file in order, handing each object (or the
/// problem that kept it from being one) to `f` as soon as it is read. One
/// object's `serde_yaml::Value` tree is alive at a time: the items of a
/// `List` document are converted one by one while it is being parsed
/// (see [`manifest_doc`](crate::manifest_doc)).
fn each_object(
    path: &Path,
    text: &str,
    mut f: impl FnMut(Location, Result<Object, ManifestError>),
) {
    let at = |document: usize| Location {
        path: path.to_path_buf(),
        document,
        item: None,
    };
    // `kubectl get -o json` writes one JSON List. serde_yaml loads a whole
    // document's event list before deserializing it (~20x the text), while
    // serde_json streams; a cheap allocation-free syntax pass picks the
    // streaming parser for text that is exactly one JSON value.
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
        let mut de = serde_json::Deserializer::from_str(text);
        one_document(at(1), &mut f, |on_item| {
            manifest_doc::read(&mut de, on_item).map_err(|e| e.to_string())
        });
        return;
    }
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let ok = one_document(at(i + 1), &mut f, |on_item| {
            manifest_doc::read(de, on_item).map_err(|e| e.to_string())
        });
        if !ok {
            // serde_yaml cannot resume after a syntax error.
            break;
        }
    }
}

/// The item callback [`manifest_doc::read`] calls.
type OnItem<'a> = dyn FnMut(usize, serde_yaml::Value) -> Option<serde_yaml::Value> + 'a;

/// Reads one document with `read` and hands its objects to `f`. Returns
/// false after a syntax error.
fn one_document(
    at: Location,
    f: &mut impl FnMut(Location, Result<Object, ManifestError>),
    read: impl FnOnce(&mut OnItem<'_>) -> Result<manifest_doc::Document, String>,
) -> bool {
    // An item that names its own kind and apiVersion converts the same
    // whatever List it is in: convert it now. Others (a typed
    // `ServiceList`'s kindless items) wait for the List's kind.
    let mut on_item = |j: usize, item: serde_yaml::Value| {
        if str_field(&item, "kind").is_none() || str_field(&item, "apiVersion").is_none() {
            return Some(item);
        }
        let at = Location {
            item: Some(j),
            ..at.clone()
        };
        let obj = object_from_value(&at, item, None);
        f(at, obj);
        None
    };
    let doc = read(&mut on_item);
    let doc_err = |message: String| ManifestError::Document {
        at: at.clone(),
        object: None,
        message,
    };
    let (rest, items) = match doc {
        Ok(manifest_doc::Document::Null) => return true,
        Ok(manifest_doc::Document::NotMapping) => {
            let e = doc_err("not a mapping (expected a Kubernetes object)".into());
            f(at.clone(), Err(e));
            return true;
        }
        Ok(manifest_doc::Document::Mapping { rest, items }) => (rest, items),
        Err(e) => {
            f(at.clone(), Err(doc_err(format!("syntax: {e}"))));
            return false;
        }
    };
    let rest = serde_yaml::Value::Mapping(rest);
    let kind = str_field(&rest, "kind");
    match (kind.and_then(list_kind), items) {
        (Some(item_kind), manifest_doc::Items::Streamed(held)) => {
            for (j, item) in held {
                let at = Location {
                    item: Some(j),
                    ..at.clone()
                };
                let obj = object_from_value(&at, item, item_kind);
                f(at, obj);
            }
        }
        (Some(_), manifest_doc::Items::Absent | manifest_doc::Items::Null) => {}
        (Some(_), manifest_doc::Items::Other) => {
            let k = kind.unwrap_or_default();
            f(
                at.clone(),
                Err(doc_err(format!("items: {k} items must be a sequence"))),
            );
        }
        (None, manifest_doc::Items::Streamed(_)) => {
            // Its items were read as objects; an object with `items` is a
            // mistake worth naming rather than half-applying.
            let what = kind.map_or("a document without `kind`".to_string(), |k| {
                format!("kind {k:?}")
            });
            f(
                at.clone(),
                Err(doc_err(format!(
                    "items: only a List (or ServiceList, EndpointSliceList, NodeList) has items, not {what}"
                ))),
            );
        }
        // `items` of another shape is an unknown field of the object,
        // ignored like any other.
        (None, _) => {
            let obj = object_from_value(&at, rest, None);
            f(at, obj);
        }
    }
    true
}

/// Parses every document of one file: the objects that parsed, and every
/// problem (not just the first).
pub fn parse_file(path: &Path, text: &str) -> (Vec<Document>, Vec<ManifestError>) {
    let mut docs = Vec::new();
    let mut errs = Vec::new();
    each_object(path, text, |at, obj| match obj {
        Ok(object) => docs.push(Document { at, object }),
        Err(e) => errs.push(e),
    });
    (docs, errs)
}

/// `(kind, namespace/name)`: an object's identity for duplicate detection
/// and for deleting what an edit removed. Namespace is "" for Nodes.
type Id = (&'static str, ObjKey);

/// Every object of the last applied file set.
type Index = HashSet<Id>;

/// What a file set says once every document is read: what `keep` made of
/// each object, their identities, and the hash of the content read.
struct Scan<T> {
    kept: Vec<T>,
    ids: Index,
    hash: u64,
}

/// Reads `paths` one file at a time (each text is dropped once parsed),
/// checks every object (`keep` validates it and turns it into what the
/// caller holds on to) and rejects duplicates. Either every document is
/// good, or every problem is returned. After the first problem nothing
/// more is kept: the result is an error anyway.
fn scan<T>(
    paths: &[PathBuf],
    mut keep: impl FnMut(&Location, Object) -> Result<T, ObjectError>,
) -> Result<Scan<T>, ManifestError> {
    if paths.is_empty() {
        return Err(ManifestError::NoFiles);
    }
    let mut hasher = DefaultHasher::new();
    let mut kept = Vec::new();
    let mut errs = Vec::new();
    let mut seen: HashMap<Id, Location> = HashMap::new();
    for p in paths {
        let text = read_file(p)?;
        hash_chunk(&mut hasher, text.as_bytes());
        hash_end_of_file(&mut hasher);
        each_object(p, &text, |at, obj| {
            let obj = match obj {
                Ok(o) => o,
                Err(e) => return errs.push(e),
            };
            let id = obj.id();
            let dup = match seen.get(&id) {
                Some(first) => Some(ManifestError::Duplicate {
                    at: at.clone(),
                    object: obj.describe(),
                    first: first.clone(),
                }),
                None => {
                    seen.insert(id, at.clone());
                    None
                }
            };
            match keep(&at, obj) {
                Ok(t) if errs.is_empty() && dup.is_none() => kept.push(t),
                Ok(_) => {}
                Err(source) => errs.push(ManifestError::Object {
                    at,
                    source: Box::new(source),
                }),
            }
            if let Some(d) = dup {
                errs.push(d);
            }
            if !errs.is_empty() {
                kept = Vec::new();
            }
        });
    }
    if errs.is_empty() {
        Ok(Scan {
            kept,
            ids: seen.into_keys().collect(),
            hash: hasher.finish(),
        })
    } else {
        Err(ManifestError::from_list(errs))
    }
}

/// Reads and parses `paths`, checks for duplicates and validates every
/// object. Either every document is good, or every problem is returned.
/// Keeps every typed object; `run` uses the leaner path of
/// [`watch_manifests`], which keeps only the validated facts.
pub fn read_manifests(paths: &[PathBuf], opts: &Options) -> Result<Vec<Document>, ManifestError> {
    let scan = scan(paths, |at, object| {
        object.validate(opts)?;
        Ok(Document {
            at: at.clone(),
            object,
        })
    })?;
    Ok(scan.kept)
}

/// A validated object reduced to the facts the store keeps. The typed
/// k8s-openapi object (a few KB per Service or EndpointSlice, most of it
/// fields lightpath never reads) is dropped as soon as it is validated, so a
/// 10,000-service manifest never holds 20,000 of them at once.
enum Fact {
    Service(ObjKey, Result<ServiceInfo, Skip>),
    Slice(SliceInfo),
    /// Our Node, and whether it may take load-balancer traffic.
    Node(NodeInfo, NodeEligibility),
    /// Another node's Node: valid, ignored.
    OtherNode,
}

impl Object {
    /// Validates the object into the facts the store keeps, consuming it.
    fn into_fact(self, opts: &Options) -> Result<Fact, ObjectError> {
        match self {
            Object::Service(s) => {
                let parsed = parse_service(&s, opts)?;
                let key = match &parsed {
                    Ok(info) => info.key.clone(),
                    Err(_) => Object::Service(s).id().1,
                };
                Ok(Fact::Service(key, parsed))
            }
            Object::EndpointSlice(s) => parse_slice(&s).map(Fact::Slice),
            Object::Node(n) if n.metadata.name.as_deref() == Some(opts.node_name.as_str()) => {
                parse_node(&n).map(|info| Fact::Node(info, NodeEligibility::of(&n)))
            }
            Object::Node(_) => Ok(Fact::OtherNode),
        }
    }
}

/// Reads, validates and reduces `paths` to facts.
fn scan_facts(paths: &[PathBuf], opts: &Options) -> Result<Scan<Fact>, ManifestError> {
    scan(paths, |_, object| object.into_fact(opts))
}

/// Applies a validated file set to `state`: upserts every object (the store
/// ignores unchanged ones), deletes objects of `previous` that are gone, and
/// returns the new index.
fn apply(state: &mut ClusterState, previous: &Index, scan: Scan<Fact>) -> Index {
    for fact in scan.kept {
        match fact {
            Fact::Service(key, parsed) => state.upsert_service_info(key, parsed),
            Fact::Slice(info) => state.upsert_slice_info(info),
            Fact::Node(info, _) => state.upsert_node_info(info),
            Fact::OtherNode => {}
        }
    }
    for id @ (kind, key) in previous {
        if !scan.ids.contains(id) {
            match *kind {
                "Service" => state.delete_service(&key.namespace, &key.name),
                "EndpointSlice" => state.delete_slice(&key.namespace, &key.name),
                _ => state.delete_node(&key.name),
            }
        }
    }
    scan.ids
}

/// Builds the table from manifest files once.
pub fn load_manifests(paths: &[PathBuf], opts: &Options) -> Result<Arc<Table>, ManifestError> {
    let scan = scan_facts(paths, opts)?;
    let mut state = ClusterState::new(opts.clone());
    apply(&mut state, &Index::new(), scan);
    Ok(state.snapshot())
}

fn read_file(path: &Path) -> Result<String, ManifestError> {
    std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Content hashing is streaming (SipHash consumes its input in 8-byte words
/// whatever the chunking), so a poll can hash the files through a small
/// buffer and compare with the hash [`scan`] computed from whole texts.
fn hash_chunk(h: &mut DefaultHasher, bytes: &[u8]) {
    h.write(bytes);
}

/// Separates files: 0xFF never occurs in UTF-8 text.
fn hash_end_of_file(h: &mut DefaultHasher) {
    h.write(&[0xff]);
}

/// The content hash of `paths` without holding a whole file in memory.
fn content_hash(paths: &[PathBuf]) -> Result<u64, ManifestError> {
    let mut h = DefaultHasher::new();
    let mut buf = vec![0u8; 64 << 10];
    for p in paths {
        let read_err = |source| ManifestError::Read {
            path: p.clone(),
            source,
        };
        let mut file = std::fs::File::open(p).map_err(read_err)?;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hash_chunk(&mut h, &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_err(e)),
            }
        }
        hash_end_of_file(&mut h);
    }
    Ok(h.finish())
}

/// Loads the manifests (failing if they are invalid now), then spawns a task
/// on the current Tokio runtime that polls them every `poll` and publishes a
/// new snapshot when their content changes. A bad edit is logged with
/// every problem and the previous table keeps serving. The task ends when
/// every receiver is dropped.
pub fn watch_manifests(
    paths: Vec<PathBuf>,
    opts: Options,
    poll: Duration,
) -> Result<(TableRx, tokio::task::JoinHandle<()>), ManifestError> {
    watch_manifests_and_node(paths, opts, poll).map(|(table, _, task)| (table, task))
}

/// Our Node's eligibility in a validated file set (`Eligible` without one).
fn node_eligibility(scan: &Scan<Fact>) -> NodeEligibility {
    scan.kept
        .iter()
        .find_map(|f| match f {
            Fact::Node(_, e) => Some(*e),
            _ => None,
        })
        .unwrap_or_default()
}

/// [`watch_manifests`], plus our Node's eligibility for load-balancer
/// traffic (kube-proxy's `/healthz`), which a taint or deletion timestamp
/// in the Node document changes without touching the table.
pub fn watch_manifests_and_node(
    paths: Vec<PathBuf>,
    opts: Options,
    poll: Duration,
) -> Result<
    (
        TableRx,
        watch::Receiver<NodeEligibility>,
        tokio::task::JoinHandle<()>,
    ),
    ManifestError,
> {
    let scan = scan_facts(&paths, &opts)?;
    let (node_tx, node_rx) = watch::channel(node_eligibility(&scan));
    let mut last_hash = scan.hash;
    let mut state = ClusterState::new(opts.clone());
    let mut objects = apply(&mut state, &Index::new(), scan);
    let (tx, rx) = watch::channel(state.snapshot());
    let poll = poll.max(Duration::from_millis(10));

    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate
        let mut last_error: Option<u64> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tx.closed() => return,
            }
            let hash = match content_hash(&paths) {
                Ok(h) => h,
                Err(e) => {
                    // Often transient (an editor's rename-into-place); keep serving.
                    tracing::warn!(error = %e, "manifest unreadable; keeping the previous table");
                    continue;
                }
            };
            if hash == last_hash || last_error == Some(hash) {
                continue;
            }
            match scan_facts(&paths, &opts) {
                Ok(scan) => {
                    last_hash = scan.hash;
                    last_error = None;
                    node_tx.send_if_modified(|cur| {
                        let now = node_eligibility(&scan);
                        let changed = *cur != now;
                        *cur = now;
                        changed
                    });
                    objects = apply(&mut state, &objects, scan);
                    let table = state.snapshot();
                    if table.version != tx.borrow().version {
                        tracing::info!(
                            version = table.version,
                            frontends = table.len(),
                            "manifests changed; table published"
                        );
                        tx.send_replace(table);
                    }
                }
                Err(e @ ManifestError::Read { .. }) => {
                    tracing::warn!(error = %e, "manifest unreadable; keeping the previous table");
                }
                Err(e) => {
                    // Report a given bad content once, not every poll.
                    for p in e.problems() {
                        tracing::warn!(problem = %p, "invalid manifest edit; keeping the previous table");
                    }
                    last_error = Some(hash);
                }
            }
        }
    });
    Ok((rx, node_rx, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            node_name: "node-a".into(),
            ..Options::default()
        }
    }

    fn load(name: &str, text: &str) -> Result<Arc<Table>, String> {
        let dir = std::env::temp_dir().join(format!("lp-manifest-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.yaml");
        std::fs::write(&p, text).unwrap();
        let r = load_manifests(&[p], &opts()).map_err(|e| e.to_string());
        std::fs::remove_dir_all(&dir).unwrap();
        r
    }

    const ITEM_SVC: &str = "{apiVersion: v1, kind: Service, metadata: {name: web, namespace: default}, spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}}";
    const ITEM_SLICE: &str = "{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}, addressType: IPv4, ports: [{name: http, port: 8080}], endpoints: [{addresses: [10.244.1.5]}, {addresses: [10.244.1.6]}]}";

    fn endpoints(t: &Table) -> usize {
        let key = crate::FrontendKey::new("10.96.0.10:80".parse().unwrap(), crate::Protocol::Tcp);
        t.lookup(&key).map_or(0, |f| f.endpoints().len())
    }

    #[test]
    fn kubectl_list_with_items_before_kind() {
        // `kubectl get -o yaml` sorts keys: items come before kind.
        let text = format!("apiVersion: v1\nitems:\n- {ITEM_SVC}\n- {ITEM_SLICE}\nkind: List\nmetadata: {{resourceVersion: \"\"}}\n");
        assert_eq!(endpoints(&load("kubectl", &text).unwrap()), 2);
    }

    #[test]
    fn kubectl_json_list_takes_the_streaming_json_parser() {
        let to_json = |yaml: &str| {
            serde_json::to_string(&serde_yaml::from_str::<serde_json::Value>(yaml).unwrap())
                .unwrap()
        };
        let text = format!(
            "{{\"apiVersion\": \"v1\", \"items\": [{}, {}], \"kind\": \"List\"}}\n",
            to_json(ITEM_SVC),
            to_json(ITEM_SLICE)
        );
        assert!(serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok());
        assert_eq!(endpoints(&load("json-list", &text).unwrap()), 2);
        // Problems inside are located the same way.
        let bad = text.replace("10.244.1.6", "x");
        let e = load("json-bad", &bad).unwrap_err();
        assert!(
            e.contains("m.yaml: document 1 items[1]: EndpointSlice default/web-1"),
            "{e}"
        );
    }

    #[test]
    fn typed_list_items_without_kind_wait_for_the_list_kind() {
        let slice =
            ITEM_SLICE.replace("apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, ", "");
        let text = format!("---\n{ITEM_SVC}\n---\nitems: [{slice}]\napiVersion: discovery.k8s.io/v1\nkind: EndpointSliceList\n");
        assert_eq!(endpoints(&load("typed", &text).unwrap()), 2);
    }

    #[test]
    fn list_item_problems_name_the_item() {
        let bad = ITEM_SLICE.replace("10.244.1.6", "x");
        let text = format!("items: [{ITEM_SVC}, {bad}]\nkind: List\n");
        let e = load("bad-item", &text).unwrap_err();
        assert!(
            e.contains("m.yaml: document 1 items[1]: EndpointSlice default/web-1"),
            "{e}"
        );
        assert!(e.contains("endpoints[1].addresses[0]"), "{e}");
    }

    #[test]
    fn items_on_a_non_list_document_are_an_error() {
        let text =
            format!("kind: Service\napiVersion: v1\nmetadata: {{name: s}}\nitems: [{ITEM_SVC}]\n");
        let e = load("svc-items", &text).unwrap_err();
        assert!(e.contains("document 1: items: only a List"), "{e}");
        assert!(e.contains("not kind \"Service\""), "{e}");
        // A List whose items are not a sequence.
        let e = load("list-scalar", "kind: List\nitems: 3\n").unwrap_err();
        assert!(e.contains("items: List items must be a sequence"), "{e}");
    }

    /// The poll compares a hash streamed through a 64 KB buffer with the
    /// one [`scan`] took from whole texts: they must agree, or every poll
    /// would re-parse (and a bad edit would be reported on every poll).
    #[test]
    fn streamed_hash_equals_the_scan_hash() {
        let dir = std::env::temp_dir().join(format!("lp-manifest-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default}\n\
                   spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        // Larger than the buffer, and not a multiple of 8 bytes.
        let big = format!("{svc}{}", "# filler comment line\n".repeat(7_000));
        let a = dir.join("a.yaml");
        let b = dir.join("b.yaml");
        std::fs::write(&a, &big).unwrap();
        std::fs::write(&b, svc.replace("name: s,", "name: t,")).unwrap();
        let paths = vec![a.clone(), b.clone()];
        let scanned = scan(&paths, |_, o| Ok(o.kind())).unwrap();
        assert_eq!(scanned.kept, ["Service", "Service"]);
        assert_eq!(content_hash(&paths).unwrap(), scanned.hash);
        // Moving bytes from one file to the next changes the hash.
        std::fs::write(&a, &big[..big.len() - 1]).unwrap();
        std::fs::write(&b, format!("\n{}", svc.replace("name: s,", "name: t,"))).unwrap();
        assert_ne!(content_hash(&paths).unwrap(), scanned.hash);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
