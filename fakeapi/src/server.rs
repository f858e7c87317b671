//! HTTP routing: the URL space of a real API server for our three resources,
//! plus the discovery documents clients read first.
//!
//! Why hyper directly: the fake must behave like the API server at the wire
//! level (chunked watch bodies, Status errors with the right codes, closing
//! every connection on "restart"), which a higher-level framework would hide.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::resource::Kind;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{ApiError, Filter, Store, WriteMode};
use crate::table;
use crate::watch::{self, WatchRequest};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What watch streams wait on: the newest resourceVersion, and an epoch that
/// `expire_watches` bumps to end every open watch with 410.
#[derive(Copy, Clone, Debug, Default)]
pub struct Tick {
    pub rv: u64,
    pub epoch: u64,
}

/// Request counters, so tests can assert that a relist really happened.
#[derive(Default)]
pub struct Stats {
    pub lists: [AtomicU64; 3],
    pub watches: [AtomicU64; 3],
}

pub struct Shared {
    pub store: Mutex<Store>,
    pub tick: tokio::sync::watch::Sender<Tick>,
    pub stats: Stats,
    pub bookmark_interval: Duration,
    pub server_address: Mutex<String>,
    /// Per kind: list requests wait while true (a slow API server, or one
    /// whose etcd is catching up), so tests can observe a client mid-sync.
    pub list_hold: tokio::sync::watch::Sender<[bool; 3]>,
    /// Per kind: set by `expire_watches`, cleared by the next list. While
    /// set, a watch that resumes from a resourceVersion (instead of
    /// relisting) gets 410, so every client relists after an expiry, even
    /// one whose watch was not open at that moment.
    pub expired: [AtomicBool; 3],
}

impl Shared {
    pub fn new(bookmark_interval: Duration) -> Self {
        Shared {
            store: Mutex::new(Store::default()),
            tick: tokio::sync::watch::channel(Tick::default()).0,
            stats: Stats::default(),
            bookmark_interval,
            server_address: Mutex::new(String::new()),
            list_hold: tokio::sync::watch::channel([false; 3]).0,
            expired: Default::default(),
        }
    }

    pub fn hold_lists(&self, kind: Kind, hold: bool) {
        self.list_hold.send_modify(|h| h[idx(kind)] = hold);
    }

    /// Resolves once lists of `kind` are not held.
    async fn list_released(&self, kind: Kind) {
        let mut rx = self.list_hold.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|h| !h[idx(kind)]).await;
    }

    pub fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves a consistent store (every
        // write is one insert + one push), so poisoning is not fatal here.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every watch after a write.
    pub fn notify(&self) {
        let rv = self.lock().resource_version();
        self.tick.send_modify(|t| t.rv = rv);
    }

    pub fn expire_watches(&self) {
        for e in &self.expired {
            e.store(true, Ordering::Release);
        }
        self.lock().compact();
        self.tick.send_modify(|t| t.epoch += 1);
    }
}

pub(crate) fn idx(kind: Kind) -> usize {
    match kind {
        Kind::Service => 0,
        Kind::EndpointSlice => 1,
        Kind::Node => 2,
    }
}

impl Stats {
    pub fn lists(&self, kind: Kind) -> u64 {
        self.lists[idx(kind)].load(Ordering::Relaxed)
    }
    pub fn watches(&self, kind: Kind) -> u64 {
        self.watches[idx(kind)].load(Ordering::Relaxed)
    }
}

fn full(code: StatusCode, v: &Value) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(serde_json::to_vec(v).unwrap_or_default())).boxed_unsync(),
    );
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn ok(v: &Value) -> Response<Body> {
    full(StatusCode::OK, v)
}

fn error(e: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    full(code, &e.status())
}

/// Where a request points in the resource URL space.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

enum Route {
    Discovery(Value),
    Resource(Target),
}

fn discovery(path: &str, server_address: &str) -> Option<Value> {
    let by_gv = |gv: &str| -> Value {
        let resources: Vec<Value> = Kind::ALL
            .into_iter()
            .filter(|k| k.api_version() == gv)
            .map(Kind::discovery_entry)
            .collect();
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
    };
    let group = json!({
        "name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
    });
    Some(match path {
        "/version" => json!({
            "major": "1", "minor": "35", "gitVersion": "v1.35.0-fakeapi",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25.0", "compiler": "gc",
            "platform": "linux/amd64",
        }),
        "/api" => json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
        }),
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}),
        "/apis/discovery.k8s.io" => {
            let mut g = group;
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            g
        }
        "/api/v1" => by_gv("v1"),
        "/apis/discovery.k8s.io/v1" => by_gv("discovery.k8s.io/v1"),
        _ => return None,
    })
}

fn route(path: &str, server_address: &str) -> Option<Route> {
    if let Some(d) = discovery(path.trim_end_matches('/'), server_address) {
        return Some(Route::Discovery(d));
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    let kind = Kind::from_path(&gv, plural)?;
    if kind.namespaced() != namespace.is_some() && (name.is_some() || !kind.namespaced()) {
        return None;
    }
    Some(Route::Resource(Target {
        kind,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
    }))
}

fn query(uri: &http::Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| {
            q.split('&')
                .filter(|s| !s.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("1") | Some("true"))
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError::new(400, "BadRequest", msg)
}

fn parse_rv(v: Option<&str>) -> Result<Option<u64>, ApiError> {
    match v {
        None | Some("") | Some("0") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| bad_request(format!("invalid resourceVersion {s:?}"))),
    }
}

fn filter(t: &Target, q: &[(String, String)]) -> Result<Filter, ApiError> {
    Ok(Filter {
        namespace: t.namespace.clone(),
        labels: LabelSelector::parse(param(q, "labelSelector").unwrap_or(""))
            .map_err(|e| bad_request(e.to_string()))?,
        fields: FieldSelector::parse(param(q, "fieldSelector").unwrap_or(""))
            .map_err(|e| bad_request(e.to_string()))?,
    })
}

/// Items in a list response carry no kind/apiVersion, like the real server.
fn list_item(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    o
}

fn wants_table(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

fn list(
    shared: &Shared,
    t: &Target,
    q: &[(String, String)],
    as_table: bool,
) -> Result<Response<Body>, ApiError> {
    let f = filter(t, q)?;
    let limit = match param(q, "limit") {
        None | Some("") => 0,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| bad_request(format!("invalid limit {l:?}")))?,
    };
    let mut store = shared.lock();
    // resourceVersion + resourceVersionMatch: serve from "now", which is not
    // older than any resourceVersion we handed out; a future one times out as
    // on a real server.
    if let Some(rv) = parse_rv(param(q, "resourceVersion"))? {
        if rv > store.resource_version() {
            return Err(ApiError::new(
                504,
                "Timeout",
                format!(
                    "Too large resource version: {rv}, current: {}",
                    store.resource_version()
                ),
            ));
        }
        if param(q, "resourceVersionMatch") == Some("Exact") && rv != store.resource_version() {
            return Err(ApiError::gone(format!("too old resource version: {rv}")));
        }
    }
    let page = store.list(
        t.kind,
        &f,
        limit,
        param(q, "continue").filter(|c| !c.is_empty()),
    )?;
    drop(store);
    shared.stats.lists[idx(t.kind)].fetch_add(1, Ordering::Relaxed);
    shared.expired[idx(t.kind)].store(false, Ordering::Release);
    let mut meta = json!({"resourceVersion": page.rv.to_string()});
    if let Some(c) = &page.continue_token {
        meta["continue"] = json!(c);
        meta["remainingItemCount"] = json!(page.remaining);
    }
    if as_table {
        return Ok(ok(&table::table(t.kind, &page.items, meta)));
    }
    let items: Vec<Value> = page.items.iter().map(|o| list_item(o)).collect();
    Ok(ok(&json!({
        "kind": format!("{}List", t.kind.kind()),
        "apiVersion": t.kind.api_version(),
        "metadata": meta,
        "items": items,
    })))
}

fn start_watch(
    shared: &Arc<Shared>,
    t: &Target,
    q: &[(String, String)],
) -> Result<Response<Body>, ApiError> {
    let send_initial_events = truthy(param(q, "sendInitialEvents"));
    if send_initial_events && param(q, "resourceVersionMatch") != Some("NotOlderThan") {
        return Err(ApiError::new(
            422,
            "Invalid",
            "sendInitialEvents: Forbidden: sendInitialEvents is forbidden unless resourceVersionMatch is NotOlderThan",
        ));
    }
    let timeout = match param(q, "timeoutSeconds") {
        None | Some("") => Duration::from_secs(1800),
        Some(s) => Duration::from_secs(
            s.parse()
                .map_err(|_| bad_request(format!("invalid timeoutSeconds {s:?}")))?,
        ),
    };
    let req = WatchRequest {
        kind: t.kind,
        filter: filter(t, q)?,
        resource_version: parse_rv(param(q, "resourceVersion"))?,
        send_initial_events,
        bookmarks: truthy(param(q, "allowWatchBookmarks")),
        timeout,
    };
    shared.stats.watches[idx(t.kind)].fetch_add(1, Ordering::Relaxed);
    let body = StreamBody::new(watch::stream(shared.clone(), req)).boxed_unsync();
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Largest request body accepted for a write.
const MAX_BODY: usize = 16 << 20;

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| bad_request(format!("reading body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| bad_request(format!("decoding body: {e}")))
}

async fn handle_resource(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    t: Target,
) -> Result<Response<Body>, ApiError> {
    let q = query(req.uri());
    let ns = t.namespace.clone().unwrap_or_default();
    match (req.method().clone(), &t.name) {
        (Method::GET, None) if truthy(param(&q, "watch")) => start_watch(shared, &t, &q),
        (Method::GET, None) => {
            let table = wants_table(&req);
            shared.list_released(t.kind).await;
            list(shared, &t, &q, table)
        }
        (Method::GET, Some(name)) => {
            let obj = shared.lock().get(t.kind, &ns, name)?;
            if wants_table(&req) {
                let meta = json!({"resourceVersion": shared.lock().resource_version().to_string()});
                return Ok(ok(&table::table(t.kind, &[obj], meta)));
            }
            Ok(ok(&obj))
        }
        (Method::POST, None) => {
            let mut body = read_json(req).await?;
            if t.kind.namespaced() {
                body["metadata"]["namespace"] = json!(ns);
            }
            let obj = shared.lock().write(t.kind, body, WriteMode::Create)?;
            shared.notify();
            Ok(full(StatusCode::CREATED, &obj))
        }
        (Method::PUT, Some(name)) => {
            let mut body = read_json(req).await?;
            if body["metadata"]["name"].as_str() != Some(name.as_str()) {
                return Err(bad_request(format!(
                    "the name of the object ({}) does not match the name on the URL ({name})",
                    body["metadata"]["name"].as_str().unwrap_or("")
                )));
            }
            if t.kind.namespaced() {
                body["metadata"]["namespace"] = json!(ns);
            }
            let obj = shared.lock().write(t.kind, body, WriteMode::Update)?;
            shared.notify();
            Ok(ok(&obj))
        }
        (Method::DELETE, Some(name)) => {
            let obj = shared.lock().delete(t.kind, &ns, name)?;
            shared.notify();
            Ok(ok(&obj))
        }
        (m, _) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource: {m}"),
        )),
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let addr = shared
        .server_address
        .lock()
        .map(|a| a.clone())
        .unwrap_or_default();
    let path = req.uri().path().to_string();
    let resp = match route(&path, &addr) {
        Some(Route::Discovery(v)) if req.method() == Method::GET => ok(&v),
        Some(Route::Resource(t)) => match handle_resource(&shared, req, t).await {
            Ok(r) => r,
            Err(e) => error(&e),
        },
        _ => error(&ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )),
    };
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |p: &str| match route(p, "x") {
            Some(Route::Resource(t)) => Some((t.kind, t.namespace, t.name)),
            Some(Route::Discovery(_)) => None,
            None => None,
        };
        assert_eq!(r("/api/v1/services"), Some((Kind::Service, None, None)));
        assert_eq!(
            r("/api/v1/namespaces/a/services/b"),
            Some((Kind::Service, Some("a".into()), Some("b".into())))
        );
        assert_eq!(
            r("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices"),
            Some((Kind::EndpointSlice, Some("a".into()), None))
        );
        assert_eq!(
            r("/api/v1/nodes/n1"),
            Some((Kind::Node, None, Some("n1".into())))
        );
        assert_eq!(r("/api/v1/namespaces/a/nodes"), None);
        assert_eq!(r("/api/v1/services/x"), None);
        assert_eq!(r("/api/v1/pods"), None);
        assert!(matches!(route("/apis", "x"), Some(Route::Discovery(_))));
    }

    #[test]
    fn decodes_query() {
        assert_eq!(percent_decode("%21a%2Fb+c"), "!a/b c");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
