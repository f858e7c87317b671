//! A fake Kubernetes API server (`fakeapi`) served from inside a sandbox's
//! node namespace, so `lightpath run --kubeconfig` there reaches it on the
//! namespace's own loopback and nothing listens in the machine's namespace.
//! Stopped, and its thread joined, on drop.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use fakeapi::{FakeApi, Kind};
use serde::Deserialize;

use super::netns::{Netns, NetnsExt};

/// Bound on the fake API server coming up in the namespace.
const START: Duration = Duration::from_secs(10);

/// The fake API server, served from a thread inside the node namespace.
pub struct NodeApi {
    pub api: Arc<FakeApi>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeApi {
    pub fn start(node: &Netns) -> NodeApi {
        let (api_tx, api_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = node.spawn(move || async move {
            let api = Arc::new(FakeApi::start().await.expect("start fakeapi"));
            let _ = api_tx.send(api.clone());
            let _ = stopped.await;
            api.stop().await;
        });
        let api = api_rx
            .recv_timeout(START)
            .expect("fakeapi did not start in the node namespace");
        NodeApi {
            api,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for NodeApi {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Applies every document of a multi-document YAML string.
pub fn apply_yaml(api: &FakeApi, yaml: &str) {
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v = serde_json::Value::deserialize(doc).expect("yaml document");
        if v.is_null() {
            continue;
        }
        let kind = Kind::from_kind(v["kind"].as_str().unwrap_or("")).expect("known kind");
        api.apply_json(kind, v).expect("apply");
    }
}
