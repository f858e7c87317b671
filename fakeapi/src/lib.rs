//! A loopback Kubernetes API server for tests: Services, EndpointSlices and
//! Nodes, served with the real list/watch protocol.
//!
//! Why a fake at all: lightpath's Kubernetes source must be tested through a
//! real `kube::Client`, so the production code path (HTTP, JSON decoding,
//! the watcher's list/watch/relist state machine, backoff) runs unchanged.
//! A mock behind a trait would test none of that; a real cluster is not
//! available in CI. So the fake implements, for three resources, what the
//! watcher and `kubectl get` rely on:
//!
//! - list with a global `resourceVersion`, `limit`/`continue` pagination over
//!   a consistent snapshot, label selectors (`=`, `!=`, `in`, `notin`,
//!   exists, `!exists`) and `metadata.name`/`metadata.namespace` field
//!   selectors, namespaced and all-namespaces paths;
//! - watch as newline-delimited `WatchEvent`s, resumable from any retained
//!   `resourceVersion`, with bookmarks, `sendInitialEvents`, selector
//!   transitions (an object leaving the selector is DELETED), and a 410
//!   ERROR event for a compacted `resourceVersion`;
//! - create/update/delete from the test (Rust API) or over HTTP;
//! - discovery (`/api`, `/apis`, `/version`, …) and server-side Table
//!   printing so `kubectl --kubeconfig F get svc -A` works;
//! - stop and restart on the same port, dropping every open connection;
//! - holding list responses per kind, to play a slow initial sync.
//!
//! Test support only: never a dependency of the shipped binary.

mod resource;
mod selector;
mod server;
mod store;
mod table;
mod watch;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub use resource::Kind;
pub use selector::{FieldSelector, LabelSelector, SelectorError};
pub use store::ApiError;

use server::Shared;
use store::WriteMode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("fakeapi serves Service, EndpointSlice and Node, not {0}")]
    Unsupported(&'static str),
    #[error("encoding object: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("fakeapi listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Knobs; the defaults suit tests.
#[derive(Clone, Debug)]
pub struct Config {
    /// How often an idle watch that asked for bookmarks gets one. The real
    /// server sends one about every minute; tests want them sooner.
    pub bookmark_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// A running (or stopped) fake API server. Dropping it stops it.
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Owning the connections here means aborting this task drops the set,
    // which aborts every connection: that is what "the API server went away"
    // looks like to a client.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| server::handle(shared.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn kind_of<K: k8s_openapi::Resource>() -> Result<Kind, Error> {
    Kind::from_kind(K::KIND).ok_or(Error::Unsupported(K::KIND))
}

fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl FakeApi {
    /// Serves on 127.0.0.1 at a free port.
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(Config::default()).await
    }

    pub async fn start_with(config: Config) -> Result<Self, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config.bookmark_interval));
        if let Ok(mut a) = shared.server_address.lock() {
            *a = addr.to_string();
        }
        let acceptor = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FakeApi {
            shared,
            addr,
            acceptor: Mutex::new(Some(acceptor)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fakeapi\n  cluster:\n    server: {}\n\
             contexts:\n- name: fakeapi\n  context:\n    cluster: fakeapi\n    user: fakeapi\n    namespace: default\n\
             current-context: fakeapi\nusers:\n- name: fakeapi\n  user: {{}}\npreferences: {{}}\n",
            self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), Error> {
        std::fs::write(path, self.kubeconfig_yaml())?;
        Ok(())
    }

    fn take_acceptor(&self) -> Option<JoinHandle<()>> {
        self.acceptor.lock().ok().and_then(|mut a| a.take())
    }

    /// Closes the listener and every open connection (watches end
    /// mid-stream). The stored objects stay; writes keep working.
    pub async fn stop(&self) {
        if let Some(h) = self.take_acceptor() {
            h.abort();
            let _ = h.await;
        }
    }

    pub fn is_running(&self) -> bool {
        self.acceptor.lock().map(|a| a.is_some()).unwrap_or(false)
    }

    /// Starts serving again on the same port, with the same objects and
    /// history (like an API server restarting in front of the same etcd).
    pub async fn restart(&self) -> Result<(), Error> {
        self.stop().await;
        let mut last = None;
        // The port was ours a moment ago; the bind only races with the
        // kernel finishing the close, so a short bounded retry suffices.
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    let h = tokio::spawn(accept_loop(listener, self.shared.clone()));
                    if let Ok(mut a) = self.acceptor.lock() {
                        *a = Some(h);
                    }
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Err(Error::Io(last.unwrap_or_else(|| {
            std::io::Error::other("bind retries exhausted")
        })))
    }

    fn write_value(&self, kind: Kind, obj: Value, mode: WriteMode) -> Result<u64, Error> {
        let stored = self.shared.lock().write(kind, obj, mode)?;
        self.shared.notify();
        Ok(rv_of(&stored))
    }

    /// Creates or replaces `obj`; returns its new resourceVersion.
    pub fn apply<K: k8s_openapi::Resource + Serialize>(&self, obj: &K) -> Result<u64, Error> {
        self.write_value(
            kind_of::<K>()?,
            serde_json::to_value(obj)?,
            WriteMode::Upsert,
        )
    }

    /// Creates `obj`; 409 AlreadyExists if it does.
    pub fn create<K: k8s_openapi::Resource + Serialize>(&self, obj: &K) -> Result<u64, Error> {
        self.write_value(
            kind_of::<K>()?,
            serde_json::to_value(obj)?,
            WriteMode::Create,
        )
    }

    /// Replaces `obj`; 404 if missing, 409 on a stale resourceVersion.
    pub fn update<K: k8s_openapi::Resource + Serialize>(&self, obj: &K) -> Result<u64, Error> {
        self.write_value(
            kind_of::<K>()?,
            serde_json::to_value(obj)?,
            WriteMode::Update,
        )
    }

    /// Creates or replaces a raw JSON object (for objects the typed API
    /// cannot express, e.g. an invalid IP string).
    pub fn apply_json(&self, kind: Kind, obj: Value) -> Result<u64, Error> {
        self.write_value(kind, obj, WriteMode::Upsert)
    }

    /// Applies many objects under one lock and one wake-up (bulk loading).
    pub fn apply_many(&self, objs: impl IntoIterator<Item = (Kind, Value)>) -> Result<u64, Error> {
        let mut rv = 0;
        {
            let mut store = self.shared.lock();
            for (kind, obj) in objs {
                let stored = store.write(kind, obj, WriteMode::Upsert)?;
                rv = rv_of(&stored);
            }
        }
        self.shared.notify();
        Ok(rv)
    }

    /// Deletes `namespace/name` (namespace ignored for Nodes).
    pub fn delete<K: k8s_openapi::Resource>(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<u64, Error> {
        self.delete_kind(kind_of::<K>()?, namespace, name)
    }

    /// Deletes `namespace/name` of `kind` (namespace ignored for Nodes).
    pub fn delete_kind(&self, kind: Kind, namespace: &str, name: &str) -> Result<u64, Error> {
        let last = self.shared.lock().delete(kind, namespace, name)?;
        self.shared.notify();
        Ok(rv_of(&last))
    }

    /// The stored object as JSON.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Value, Error> {
        Ok((*self.shared.lock().get(kind, namespace, name)?).clone())
    }

    /// The newest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().resource_version()
    }

    /// Forgets history: watches resuming from an older resourceVersion and
    /// outstanding continue tokens get 410 Gone. Open watches keep running.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Compacts and ends every open watch with a 410 ERROR event, as the API
    /// server does when a watcher falls out of its window. Clients must
    /// relist: until a kind is listed again, a watch of it that resumes from
    /// a resourceVersion also gets 410 (a client that was between two
    /// watches at the moment of expiry relists too).
    pub fn expire_watches(&self) {
        self.shared.expire_watches();
    }

    /// While `hold` is true, list requests for `kind` wait (the connection
    /// stays open, no answer); releasing answers them with the then-current
    /// state. Watches are not affected. For testing what a client reports
    /// during a slow initial sync.
    pub fn hold_lists(&self, kind: Kind, hold: bool) {
        self.shared.hold_lists(kind, hold);
    }

    /// Completed list requests for `kind` (each page counts).
    pub fn list_requests(&self, kind: Kind) -> u64 {
        self.shared.stats.lists(kind)
    }

    /// Watch requests started for `kind`.
    pub fn watch_requests(&self, kind: Kind) -> u64 {
        self.shared.stats.watches(kind)
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(h) = self.take_acceptor() {
            h.abort();
        }
    }
}
