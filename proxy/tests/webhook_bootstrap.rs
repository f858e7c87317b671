//! The webhook's self-signed bootstrap against a loopback API server that
//! keeps Secrets and MutatingWebhookConfigurations in memory: the real
//! `lightpath webhook --bootstrap-secret` creates its Secret, patches the
//! caBundle of the configuration rendered from deploy/overlays/hybrid, and
//! serves a certificate that a client trusting only that caBundle accepts
//! under the Service's DNS name, as the API server would. Also: replicas
//! racing on the Secret, leaf renewal under the same CA, and the webhook's
//! RBAC being exactly the requests it makes.

mod support {
    pub mod deploy;
}

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lightpath::webhook::bootstrap::{self, Material, Target};
use serde_json::{json, Value};
use support::deploy::render_overlay;
use tokio::net::TcpListener;

const NS: &str = "lightpath-system";
const SECRET: &str = "lightpath-webhook-tls";
const SERVICE: &str = "lightpath-webhook";
const CONFIG: &str = "lightpath-webhook";

fn target() -> Target {
    Target {
        namespace: NS.into(),
        secret: SECRET.into(),
        service: SERVICE.into(),
        webhook_config: CONFIG.into(),
    }
}

/// `(verb, resource, name)` as RBAC sees a request.
type Seen = BTreeSet<(String, String, String)>;

#[derive(Default)]
struct Store {
    secrets: BTreeMap<String, Value>,
    configs: BTreeMap<String, Value>,
    version: u64,
    seen: Seen,
    creates: usize,
}

/// A loopback API server for secrets (namespaced) and
/// mutatingwebhookconfigurations, with resourceVersion conflicts and the
/// strategic merge of `webhooks` by name.
struct MiniApi {
    addr: SocketAddr,
    store: Arc<Mutex<Store>>,
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn handle(store: &mut Store, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let parsed: Result<Value, _> = if body.is_empty() {
        Ok(Value::Null)
    } else {
        serde_json::from_slice(body)
    };
    let Ok(body) = parsed else {
        return status(400, "BadRequest", "body is not JSON");
    };
    match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "secrets", rest @ ..] if *ns == NS => {
            let name = rest.first().copied().unwrap_or_default();
            let verb = match (method, name.is_empty()) {
                ("GET", false) => "get",
                ("POST", true) => "create",
                ("PUT", false) => "update",
                _ => return status(405, "MethodNotAllowed", "unsupported"),
            };
            store
                .seen
                .insert((verb.into(), "secrets".into(), name.to_string()));
            match verb {
                "get" => match store.secrets.get(name) {
                    Some(s) => (200, s.clone()),
                    None => status(404, "NotFound", "secret not found"),
                },
                "create" => {
                    let Some(name) = body["metadata"]["name"].as_str().map(String::from) else {
                        return status(422, "Invalid", "metadata.name required");
                    };
                    if store.secrets.contains_key(&name) {
                        return status(409, "AlreadyExists", "secret already exists");
                    }
                    store.version += 1;
                    store.creates += 1;
                    let mut obj = body;
                    obj["metadata"]["resourceVersion"] = json!(store.version.to_string());
                    store.secrets.insert(name, obj.clone());
                    (201, obj)
                }
                _ => {
                    let current = store
                        .secrets
                        .get(name)
                        .map(|s| s["metadata"]["resourceVersion"].clone());
                    if current.is_none() {
                        return status(404, "NotFound", "secret not found");
                    }
                    if current != Some(body["metadata"]["resourceVersion"].clone()) {
                        return status(409, "Conflict", "the object has been modified");
                    }
                    store.version += 1;
                    let mut obj = body;
                    obj["metadata"]["resourceVersion"] = json!(store.version.to_string());
                    store.secrets.insert(name.to_string(), obj.clone());
                    (200, obj)
                }
            }
        }
        ["apis", "admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", name] => {
            let verb = match method {
                "GET" => "get",
                "PATCH" => "patch",
                _ => return status(405, "MethodNotAllowed", "unsupported"),
            };
            store.seen.insert((
                verb.into(),
                "mutatingwebhookconfigurations".into(),
                name.to_string(),
            ));
            let Some(config) = store.configs.get_mut(*name) else {
                return status(404, "NotFound", "configuration not found");
            };
            if verb == "patch" {
                for patch in body["webhooks"].as_array().into_iter().flatten() {
                    let Some(hook) = config["webhooks"]
                        .as_array_mut()
                        .and_then(|hs| hs.iter_mut().find(|h| h["name"] == patch["name"]))
                    else {
                        return status(422, "Invalid", "strategic merge by name: no such webhook");
                    };
                    hook["clientConfig"]["caBundle"] = patch["clientConfig"]["caBundle"].clone();
                }
            }
            (200, config.clone())
        }
        _ => status(404, "NotFound", "no such resource"),
    }
}

impl MiniApi {
    async fn start(config: Value) -> MiniApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let store = Arc::new(Mutex::new(Store::default()));
        let name = config["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        store.lock().expect("store").configs.insert(name, config);
        let shared = store.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let store = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        let store = store.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let (code, value) = match body {
                                Ok(body) => {
                                    let mut store = store.lock().expect("store");
                                    handle(&mut store, &method, &path, &body)
                                }
                                Err(_) => status(400, "BadRequest", "body"),
                            };
                            let mut resp =
                                http::Response::new(Full::new(Bytes::from(value.to_string())));
                            *resp.status_mut() = http::StatusCode::from_u16(code).expect("status");
                            resp.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        MiniApi { addr, store }
    }

    fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().expect("url"));
        kube::Client::try_from(config).expect("client")
    }

    fn seen(&self) -> Seen {
        self.store.lock().expect("store").seen.clone()
    }

    fn ca_bundle(&self) -> Option<String> {
        let store = self.store.lock().expect("store");
        let b64 = store.configs.get(CONFIG)?["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()?
            .to_string();
        let pem = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        String::from_utf8(pem).ok()
    }
}

/// The objects of the hybrid overlay, rendered by `kubectl kustomize`.
fn hybrid() -> Vec<Value> {
    render_overlay("hybrid")
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} not in the hybrid overlay"))
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// POST a review to `addr` trusting only `ca_pem`, checking the server's
/// certificate for the Service DNS name the API server uses.
async fn post_review(addr: SocketAddr, ca_pem: &str, body: Vec<u8>) -> Result<Value, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(lightpath::webhook::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(format!("{SERVICE}.{NS}.svc"))
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::post("/mutate")
        .header("host", format!("{SERVICE}.{NS}.svc"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_bootstraps_its_certificate_and_the_ca_bundle_trusts_it() {
    let docs = hybrid();
    let api = MiniApi::start(find(&docs, "MutatingWebhookConfiguration", CONFIG).clone()).await;
    assert!(
        api.ca_bundle().is_none(),
        "the manifest ships without a caBundle"
    );

    let kubeconfig = TempFile(std::env::temp_dir().join(format!(
        "lp-whkc-{}-{}.yaml",
        std::process::id(),
        rand::random::<u32>()
    )));
    std::fs::write(
        &kubeconfig.0,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: t\n  context:\n    cluster: t\n    user: t\ncurrent-context: t\n\
             users:\n- name: t\n  user: {{}}\n",
            api.addr
        ),
    )
    .expect("kubeconfig");
    let port = free_port();
    // The Deployment's own arguments, with a loopback listener.
    let deployment = find(&docs, "Deployment", "lightpath-webhook");
    let mut args: Vec<String> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg").to_string())
        .filter(|a| !a.starts_with("--listen="))
        .collect();
    args.push(format!("--listen=127.0.0.1:{port}"));
    args.push(format!("--kubeconfig={}", kubeconfig.0.display()));
    let child = Command::new(env!("CARGO_BIN_EXE_lightpath"))
        .args(&args)
        .env("POD_NAMESPACE", NS)
        .env_remove("KUBECONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start lightpath webhook");
    let mut child = Kill(child);

    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Service"},
            "resource": {"group": "", "version": "v1", "resource": "services"},
            "namespace": "shop", "operation": "CREATE",
            "object": {"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80, "protocol": "TCP"}]}}}
    })
    .to_string()
    .into_bytes();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let answer = loop {
        if let Some(exit) = child.0.try_wait().expect("child status") {
            panic!("lightpath webhook exited early: {exit}");
        }
        if let Some(ca) = api.ca_bundle() {
            if let Ok(answer) = post_review(addr, &ca, review.clone()).await {
                break answer;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhook not serving with a trusted certificate within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");

    // The Secret holds what is served, as a kubernetes.io/tls Secret.
    let store = api
        .store
        .lock()
        .expect("store")
        .secrets
        .get(SECRET)
        .cloned();
    let secret = store.expect("bootstrap Secret created");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    for key in ["tls.crt", "tls.key", "ca.crt", "ca.key"] {
        assert!(secret["data"][key].is_string(), "Secret has {key}");
    }
    let _ = child.0.kill();

    // The webhook's RBAC is exactly what it did.
    assert_rbac_covers_exactly(&docs, &api.seen(), false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_replicas_share_one_secret_and_renewal_keeps_the_ca() {
    let docs = hybrid();
    let api = MiniApi::start(find(&docs, "MutatingWebhookConfiguration", CONFIG).clone()).await;
    let t = target();
    let (a, b) = tokio::join!(
        bootstrap::ensure(api.client(), &t),
        bootstrap::ensure(api.client(), &t)
    );
    let (a, b) = (a.expect("replica a"), b.expect("replica b"));
    assert_eq!(a, b, "both replicas serve the same certificate");
    assert_eq!(api.store.lock().expect("store").creates, 1);
    assert_eq!(api.ca_bundle().as_deref(), Some(a.ca_cert.as_str()));

    // A leaf close to expiry is re-issued under the same CA, so the caBundle
    // (and replicas still serving the old leaf) stay valid.
    let old = Material::generate(
        &target(),
        SystemTime::now() - bootstrap::LEAF_VALIDITY + Duration::from_secs(24 * 3600),
    )
    .expect("old material");
    {
        let mut store = api.store.lock().expect("store");
        let rv = store.secrets[SECRET]["metadata"]["resourceVersion"].clone();
        let mut secret = serde_json::to_value(old.to_secret(&target())).expect("secret json");
        secret["metadata"]["resourceVersion"] = rv;
        store.secrets.insert(SECRET.into(), secret);
    }
    let renewed = bootstrap::ensure(api.client(), &target())
        .await
        .expect("renew");
    assert_eq!(renewed.ca_cert, old.ca_cert, "CA kept");
    assert_ne!(renewed.cert, old.cert, "leaf re-issued");
    assert!(renewed.usable(&target(), SystemTime::now()));
    assert_eq!(api.ca_bundle().as_deref(), Some(old.ca_cert.as_str()));

    // A Secret that is not ours to read (garbage) is replaced, not fatal.
    {
        let mut store = api.store.lock().expect("store");
        store.secrets.get_mut(SECRET).expect("secret")["data"]["tls.crt"] =
            json!("bm90IGEgY2VydA==");
    }
    let replaced = bootstrap::ensure(api.client(), &target())
        .await
        .expect("replace garbage");
    assert!(replaced.usable(&target(), SystemTime::now()));
    assert_eq!(api.ca_bundle().as_deref(), Some(replaced.ca_cert.as_str()));

    assert_rbac_covers_exactly(&docs, &api.seen(), true);
}

#[tokio::test]
async fn configuration_without_our_webhook_is_a_clear_error() {
    let mut config = find(&hybrid(), "MutatingWebhookConfiguration", CONFIG).clone();
    config["webhooks"][0]["clientConfig"]["service"]["name"] = json!("someone-else");
    let api = MiniApi::start(config).await;
    let err = bootstrap::ensure(api.client(), &target())
        .await
        .expect_err("no webhook calls our service");
    let msg = err.to_string();
    assert!(msg.contains(CONFIG) && msg.contains(SERVICE), "{msg}");
}

/// Every request the webhook made is allowed by its Role/ClusterRole
/// (including resourceNames), and every granted verb was used (`update`
/// only when `renewed`).
fn assert_rbac_covers_exactly(docs: &[Value], seen: &Seen, renewed: bool) {
    let mut rules: Vec<(String, BTreeSet<String>, BTreeSet<String>)> = Vec::new();
    for (kind, name) in [
        ("Role", "lightpath-webhook-bootstrap"),
        ("ClusterRole", "lightpath-webhook-bootstrap"),
    ] {
        for rule in find(docs, kind, name)["rules"].as_array().expect("rules") {
            let set = |k: &str| -> BTreeSet<String> {
                rule[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().expect("string").to_string())
                    .collect()
            };
            for resource in set("resources") {
                rules.push((resource, set("verbs"), set("resourceNames")));
            }
        }
    }
    for (verb, resource, name) in seen {
        assert!(
            rules.iter().any(|(r, verbs, names)| r == resource
                && verbs.contains(verb)
                && (names.is_empty() || names.contains(name))),
            "webhook did {verb} {resource}/{name}, which its RBAC does not allow"
        );
    }
    for (resource, verbs, _) in &rules {
        for verb in verbs {
            if verb == "update" && !renewed {
                continue;
            }
            assert!(
                seen.iter().any(|(v, r, _)| v == verb && r == resource),
                "RBAC grants {verb} on {resource}, which the webhook never does"
            );
        }
    }
    // Bound to the Deployment's service account.
    let sa = find(docs, "Deployment", "lightpath-webhook")["spec"]["template"]["spec"]
        ["serviceAccountName"]
        .clone();
    for kind in ["RoleBinding", "ClusterRoleBinding"] {
        let b = find(docs, kind, "lightpath-webhook-bootstrap");
        assert_eq!(b["subjects"][0]["name"], sa);
    }
}
