//! The fake's etcd: objects, one global resourceVersion, and the change
//! history that watches replay.
//!
//! Why a history and not just a broadcast: a client that reconnects with
//! `resourceVersion=N` must receive exactly the changes after N, or a 410
//! Gone when N is older than the compaction point. That is the contract the
//! watcher's resume and relist logic depends on, so the fake keeps every
//! change since the last compaction and answers from it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::resource::Kind;
use crate::selector::{labels_of, FieldSelector, LabelSelector};

/// An API error, rendered as a `Status` object with this HTTP code.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn not_found(kind: Kind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.plural()),
        )
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One committed write.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub kind: Kind,
    pub ty: EventType,
    /// The object after the write (for a delete: its last state, stamped
    /// with the deletion's resourceVersion).
    pub object: Arc<Value>,
    /// The object before the write, for selector transitions.
    pub prev: Option<Arc<Value>>,
}

/// What a list or watch asks for.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, kind: Kind, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if kind.namespaced() && obj["metadata"]["namespace"].as_str() != Some(ns) {
                return false;
            }
        }
        self.fields.matches(obj) && self.labels.matches(&labels_of(obj))
    }
}

type Key = (Kind, String, String);

/// A list result frozen at one resourceVersion, served page by page.
struct ListSnapshot {
    rv: u64,
    items: Arc<[Arc<Value>]>,
}

pub struct ListPage {
    pub rv: u64,
    pub items: Vec<Arc<Value>>,
    pub continue_token: Option<String>,
    pub remaining: usize,
}

/// How many paginated lists may be in flight at once; older ones expire
/// (their continue token then answers 410, as an expired etcd token does).
const MAX_SNAPSHOTS: usize = 64;

#[derive(Default)]
pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Arc<Change>>,
    /// Changes at or below this resourceVersion are gone.
    compacted: u64,
    snapshots: HashMap<u64, ListSnapshot>,
    next_snapshot: u64,
    next_uid: u64,
}

fn now_rfc3339() -> String {
    // Seconds since the epoch rendered as RFC 3339 UTC without a date crate:
    // days-from-civil inverse (Howard Hinnant's algorithm).
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Forgets all history up to now: watches and continue tokens from an
    /// older resourceVersion get 410 Gone.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
        self.snapshots.clear();
    }

    fn key_of(kind: Kind, obj: &Value) -> Result<Key, ApiError> {
        let name = obj["metadata"]["name"].as_str().unwrap_or("");
        if name.is_empty() {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!("{}: metadata.name: Required value", kind.kind()),
            ));
        }
        let ns = if kind.namespaced() {
            obj["metadata"]["namespace"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
        } else {
            ""
        };
        Ok((kind, ns.to_string(), name.to_string()))
    }

    /// Create, update or (with `must_exist`/`must_not_exist`) strictly one of
    /// them. Returns the stored object.
    pub fn write(
        &mut self,
        kind: Kind,
        mut obj: Value,
        mode: WriteMode,
    ) -> Result<Arc<Value>, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "body is not a JSON object",
            ));
        }
        if let Some(k) = obj["kind"].as_str() {
            if k != kind.kind() {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    format!("kind {k} does not match resource {}", kind.plural()),
                ));
            }
        }
        let key = Self::key_of(kind, &obj)?;
        let prev = self.objects.get(&key).cloned();
        match (mode, &prev) {
            (WriteMode::Create, Some(_)) => {
                return Err(ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} \"{}\" already exists", kind.plural(), key.2),
                ))
            }
            (WriteMode::Update, None) => return Err(ApiError::not_found(kind, &key.2)),
            (WriteMode::Update, Some(p)) => {
                let want = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
                let have = p["metadata"]["resourceVersion"].as_str().unwrap_or("");
                if !want.is_empty() && want != have {
                    return Err(ApiError::new(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                            kind.plural(),
                            key.2
                        ),
                    ));
                }
            }
            _ => {}
        }
        self.rv += 1;
        let rv = self.rv;
        obj["kind"] = json!(kind.kind());
        obj["apiVersion"] = json!(kind.api_version());
        let meta = &mut obj["metadata"];
        if kind.namespaced() {
            meta["namespace"] = json!(key.1);
        }
        meta["resourceVersion"] = json!(rv.to_string());
        match &prev {
            Some(p) => {
                meta["uid"] = p["metadata"]["uid"].clone();
                meta["creationTimestamp"] = p["metadata"]["creationTimestamp"].clone();
                let generation = p["metadata"]["generation"].as_u64().unwrap_or(1);
                meta["generation"] = json!(generation + 1);
            }
            None => {
                self.next_uid += 1;
                meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.next_uid));
                meta["creationTimestamp"] = json!(now_rfc3339());
                meta["generation"] = json!(1);
            }
        }
        let obj = Arc::new(obj);
        self.objects.insert(key.clone(), obj.clone());
        self.history.push_back(Arc::new(Change {
            rv,
            kind,
            ty: if prev.is_some() {
                EventType::Modified
            } else {
                EventType::Added
            },
            object: obj.clone(),
            prev,
        }));
        Ok(obj)
    }

    pub fn delete(&mut self, kind: Kind, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        let ns = if kind.namespaced() { ns } else { "" };
        let key = (kind, ns.to_string(), name.to_string());
        let prev = self
            .objects
            .remove(&key)
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        self.rv += 1;
        let mut last = (*prev).clone();
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let last = Arc::new(last);
        self.history.push_back(Arc::new(Change {
            rv: self.rv,
            kind,
            ty: EventType::Deleted,
            object: last.clone(),
            prev: Some(prev),
        }));
        Ok(last)
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        let ns = if kind.namespaced() { ns } else { "" };
        self.objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))
    }

    /// All current objects of `kind` that pass `filter`, in key order.
    pub fn matching(&self, kind: Kind, filter: &Filter) -> Vec<Arc<Value>> {
        let start = (kind, String::new(), String::new());
        self.objects
            .range(start..)
            .take_while(|((k, _, _), _)| *k == kind)
            .filter(|(_, o)| filter.matches(kind, o))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// One page of a list. `continue_token` resumes a list frozen at its
    /// first page's resourceVersion; `limit` 0 means everything.
    pub fn list(
        &mut self,
        kind: Kind,
        filter: &Filter,
        limit: usize,
        continue_token: Option<&str>,
    ) -> Result<ListPage, ApiError> {
        let (snap_id, offset) = match continue_token {
            Some(tok) => {
                let (id, off, rv) = parse_token(tok).ok_or_else(|| {
                    ApiError::new(
                        400,
                        "BadRequest",
                        format!("continue key is not valid: {tok}"),
                    )
                })?;
                if rv < self.compacted || !self.snapshots.contains_key(&id) {
                    return Err(ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                    ));
                }
                (id, off)
            }
            None => {
                let items: Arc<[Arc<Value>]> = self.matching(kind, filter).into();
                if limit == 0 || items.len() <= limit {
                    return Ok(ListPage {
                        rv: self.rv,
                        remaining: 0,
                        items: items.to_vec(),
                        continue_token: None,
                    });
                }
                if self.snapshots.len() >= MAX_SNAPSHOTS {
                    if let Some(oldest) = self.snapshots.keys().min().copied() {
                        self.snapshots.remove(&oldest);
                    }
                }
                self.next_snapshot += 1;
                let id = self.next_snapshot;
                self.snapshots
                    .insert(id, ListSnapshot { rv: self.rv, items });
                (id, 0)
            }
        };
        let Some(snap) = self.snapshots.get(&snap_id) else {
            return Err(ApiError::gone("continue token expired"));
        };
        let limit = if limit == 0 { usize::MAX } else { limit };
        let end = offset.saturating_add(limit).min(snap.items.len());
        let items = snap.items.get(offset..end).unwrap_or(&[]).to_vec();
        let rv = snap.rv;
        let remaining = snap.items.len() - end;
        let continue_token = if remaining > 0 {
            Some(format!("{rv:x}.{snap_id:x}.{end:x}"))
        } else {
            self.snapshots.remove(&snap_id);
            None
        };
        Ok(ListPage {
            rv,
            items,
            continue_token,
            remaining,
        })
    }

    /// Changes after `rv`, or `Err` (410) when they were compacted away.
    pub fn changes_since(&self, rv: u64) -> Result<Vec<Arc<Change>>, ApiError> {
        if rv < self.compacted {
            return Err(ApiError::gone(format!(
                "too old resource version: {rv} ({})",
                self.compacted
            )));
        }
        let start = self.history.partition_point(|c| c.rv <= rv);
        Ok(self.history.range(start..).cloned().collect())
    }
}

fn parse_token(tok: &str) -> Option<(u64, usize, u64)> {
    let mut it = tok.split('.');
    let rv = u64::from_str_radix(it.next()?, 16).ok()?;
    let id = u64::from_str_radix(it.next()?, 16).ok()?;
    let off = usize::from_str_radix(it.next()?, 16).ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((id, off, rv))
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum WriteMode {
    Create,
    Update,
    Upsert,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns"}, "spec": {}})
    }

    #[test]
    fn pagination_is_consistent_and_expires_on_compaction() {
        let mut s = Store::default();
        for i in 0..5 {
            s.write(Kind::Service, svc(&format!("s{i}")), WriteMode::Create)
                .unwrap();
        }
        let f = Filter::default();
        let p1 = s.list(Kind::Service, &f, 2, None).unwrap();
        assert_eq!(p1.items.len(), 2);
        assert_eq!(p1.remaining, 3);
        // A write between pages does not show up in the frozen list.
        s.write(Kind::Service, svc("s9"), WriteMode::Create)
            .unwrap();
        let tok = p1.continue_token.unwrap();
        let p2 = s.list(Kind::Service, &f, 2, Some(&tok)).unwrap();
        assert_eq!(p2.rv, p1.rv);
        let p3 = s
            .list(Kind::Service, &f, 2, p2.continue_token.as_deref())
            .unwrap();
        assert_eq!(p3.items.len(), 1);
        assert!(p3.continue_token.is_none());

        let p1 = s.list(Kind::Service, &f, 2, None).unwrap();
        s.compact();
        let err = s
            .list(Kind::Service, &f, 2, p1.continue_token.as_deref())
            .err()
            .unwrap();
        assert_eq!(err.code, 410);
    }

    #[test]
    fn history_and_gone() {
        let mut s = Store::default();
        s.write(Kind::Service, svc("a"), WriteMode::Create).unwrap();
        let rv = s.resource_version();
        s.write(Kind::Service, svc("a"), WriteMode::Update).unwrap();
        s.delete(Kind::Service, "ns", "a").unwrap();
        let ch = s.changes_since(rv).unwrap();
        assert_eq!(
            ch.iter().map(|c| c.ty).collect::<Vec<_>>(),
            vec![EventType::Modified, EventType::Deleted]
        );
        s.compact();
        assert_eq!(s.changes_since(rv).err().unwrap().code, 410);
        assert!(s.changes_since(s.resource_version()).unwrap().is_empty());
    }
}
