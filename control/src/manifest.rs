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
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use tokio::sync::watch;

use crate::error::ObjectError;
use crate::model::Table;
use crate::objects::{parse_node, parse_service, parse_slice};
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

    /// `(kind, namespace, name)`: the identity used for duplicate detection
    /// and diffing. Namespace is "" for Nodes, "default" when omitted.
    pub fn id(&self) -> (&'static str, String, String) {
        let meta = match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
        };
        let ns = match self {
            Object::Node(_) => String::new(),
            _ => meta
                .namespace
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string()),
        };
        (self.kind(), ns, meta.name.clone().unwrap_or_default())
    }

    fn describe(&self) -> String {
        let (kind, ns, name) = self.id();
        if ns.is_empty() {
            format!("{kind} {name}")
        } else {
            format!("{kind} {ns}/{name}")
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

/// Parses every document of one file: the objects that parsed, and every
/// problem (not just the first).
pub fn parse_file(path: &Path, text: &str) -> (Vec<Document>, Vec<ManifestError>) {
    let mut docs = Vec::new();
    let mut errs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let at = Location {
            path: path.to_path_buf(),
            document: i + 1,
            item: None,
        };
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                errs.push(ManifestError::Document {
                    at,
                    object: None,
                    message: format!("syntax: {e}"),
                });
                // serde_yaml cannot resume after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let kind = str_field(&value, "kind").map(str::to_string);
        match kind.as_deref() {
            Some(k)
                if k == "List"
                    || (k.ends_with("List")
                        && expected_api_version(&k[..k.len() - 4]).is_some()) =>
            {
                let item_kind = (k != "List").then(|| &k[..k.len() - 4]);
                // Take the items out rather than cloning them: a large List
                // would otherwise be held twice at the parse peak.
                let mut value = value;
                let items = value.as_mapping_mut().and_then(|m| m.remove("items"));
                let items = match items {
                    Some(serde_yaml::Value::Sequence(items)) => items,
                    Some(serde_yaml::Value::Null) | None => Vec::new(),
                    Some(_) => {
                        errs.push(ManifestError::Document {
                            at,
                            object: None,
                            message: format!("items: {k} items must be a sequence"),
                        });
                        continue;
                    }
                };
                for (j, item) in items.into_iter().enumerate() {
                    let at = Location {
                        item: Some(j),
                        ..at.clone()
                    };
                    match object_from_value(&at, item, item_kind) {
                        Ok(object) => docs.push(Document { at, object }),
                        Err(e) => errs.push(e),
                    }
                }
            }
            _ => match object_from_value(&at, value, None) {
                Ok(object) => docs.push(Document { at, object }),
                Err(e) => errs.push(e),
            },
        }
    }
    (docs, errs)
}

/// Reads and parses `paths`, checks for duplicates and validates every
/// object. Either every document is good, or every problem is returned.
pub fn read_manifests(paths: &[PathBuf], opts: &Options) -> Result<Vec<Document>, ManifestError> {
    if paths.is_empty() {
        return Err(ManifestError::NoFiles);
    }
    let mut texts = Vec::with_capacity(paths.len());
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(|source| ManifestError::Read {
            path: p.clone(),
            source,
        })?;
        texts.push(text);
    }
    parse_texts(paths, &texts, opts)
}

fn parse_texts(
    paths: &[PathBuf],
    texts: &[String],
    opts: &Options,
) -> Result<Vec<Document>, ManifestError> {
    let mut all = Vec::new();
    let mut errs = Vec::new();
    for (p, text) in paths.iter().zip(texts) {
        let (docs, e) = parse_file(p, text);
        all.extend(docs);
        errs.extend(e);
    }
    let mut seen: HashMap<(&'static str, String, String), Location> = HashMap::new();
    for d in &all {
        if let Err(source) = d.object.validate(opts) {
            errs.push(ManifestError::Object {
                at: d.at.clone(),
                source: Box::new(source),
            });
        }
        match seen.get(&d.object.id()) {
            Some(first) => errs.push(ManifestError::Duplicate {
                at: d.at.clone(),
                object: d.object.describe(),
                first: first.clone(),
            }),
            None => {
                seen.insert(d.object.id(), d.at.clone());
            }
        }
    }
    if errs.is_empty() {
        Ok(all)
    } else {
        Err(ManifestError::from_list(errs))
    }
}

/// Identity → content hash of every object last applied. Hashes, not the
/// objects, so a long-running `run` does not hold a second copy of the
/// cluster next to the store.
type Index = HashMap<(&'static str, String, String), Option<u64>>;

fn object_hash(o: &Object) -> Option<u64> {
    let bytes = match o {
        Object::Service(s) => serde_json::to_vec(s),
        Object::EndpointSlice(s) => serde_json::to_vec(s),
        Object::Node(n) => serde_json::to_vec(n),
    }
    .ok()?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

/// Applies a validated document set to `state`: upserts every new or changed
/// object, deletes objects of `previous` that are gone, and returns the new
/// index.
fn apply(state: &mut ClusterState, previous: &Index, docs: Vec<Document>) -> Index {
    let mut current = Index::with_capacity(docs.len());
    for d in docs {
        let id = d.object.id();
        let hash = object_hash(&d.object);
        // An unhashable object (never expected) is always re-applied.
        if hash.is_none() || previous.get(&id) != Some(&hash) {
            // Already validated, so these cannot fail; log defensively anyway.
            let res = match d.object {
                Object::Service(s) => state.upsert_service(*s),
                Object::EndpointSlice(s) => state.upsert_slice(*s),
                Object::Node(n) => state.upsert_node(*n),
            };
            if let Err(e) = res {
                tracing::warn!(at = %d.at, error = %e, "object rejected");
            }
        }
        current.insert(id, hash);
    }
    for id @ (kind, ns, name) in previous.keys() {
        if !current.contains_key(id) {
            match *kind {
                "Service" => state.delete_service(ns, name),
                "EndpointSlice" => state.delete_slice(ns, name),
                _ => state.delete_node(name),
            }
        }
    }
    current
}

/// Builds the table from manifest files once.
pub fn load_manifests(paths: &[PathBuf], opts: &Options) -> Result<Arc<Table>, ManifestError> {
    let docs = read_manifests(paths, opts)?;
    let mut state = ClusterState::new(opts.clone());
    apply(&mut state, &Index::new(), docs);
    Ok(state.snapshot())
}

fn content_hash(texts: &[String]) -> u64 {
    let mut h = DefaultHasher::new();
    texts.hash(&mut h);
    h.finish()
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<String>, ManifestError> {
    paths
        .iter()
        .map(|p| {
            std::fs::read_to_string(p).map_err(|source| ManifestError::Read {
                path: p.clone(),
                source,
            })
        })
        .collect()
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
    if paths.is_empty() {
        return Err(ManifestError::NoFiles);
    }
    let texts = read_all(&paths)?;
    let docs = parse_texts(&paths, &texts, &opts)?;
    let mut state = ClusterState::new(opts.clone());
    let mut objects = apply(&mut state, &Index::new(), docs);
    let (tx, rx) = watch::channel(state.snapshot());
    let mut last_hash = content_hash(&texts);
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
            let texts = match read_all(&paths) {
                Ok(t) => t,
                Err(e) => {
                    // Often transient (an editor's rename-into-place); keep serving.
                    tracing::warn!(error = %e, "manifest unreadable; keeping the previous table");
                    continue;
                }
            };
            let hash = content_hash(&texts);
            if hash == last_hash {
                continue;
            }
            match parse_texts(&paths, &texts, &opts) {
                Ok(docs) => {
                    objects = apply(&mut state, &objects, docs);
                    last_hash = hash;
                    last_error = None;
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
                Err(e) => {
                    // Report a given bad content once, not every poll.
                    if last_error != Some(hash) {
                        for p in e.problems() {
                            tracing::warn!(problem = %p, "invalid manifest edit; keeping the previous table");
                        }
                        last_error = Some(hash);
                    }
                }
            }
        }
    });
    Ok((rx, task))
}
