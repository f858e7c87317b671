//! The admission webhook over real TLS on loopback: a rustls client that
//! trusts only a freshly generated certificate posts AdmissionReviews and
//! reads the decoded JSONPatch, as the API server would.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lightpath::webhook::{self, tls, Policy};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Every network step of a test is bounded by this.
const STEP: Duration = Duration::from_secs(10);

struct Cert {
    cert_pem: String,
    key_pem: String,
}

fn localhost_cert() -> Cert {
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("params");
    let cert = params.self_signed(&key).expect("self-signed");
    Cert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A webhook server on 127.0.0.1:0; stops when dropped.
struct Server {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start(cert: &Cert, policy: Policy) -> Server {
    let key = tls::certified_key(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes(), "test")
        .expect("certified key");
    start_with(tls::SwappableCert::new(key), policy).await
}

async fn start_with(certs: Arc<tls::SwappableCert>, policy: Policy) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let config = tls::server_config(certs).expect("server config");
    tokio::spawn(webhook::server::serve(
        listener,
        config,
        Arc::new(policy),
        async move {
            let _ = stopped.await;
        },
    ));
    Server { addr, _stop: stop }
}

fn connector(trusted_pem: &str, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(trusted_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// `GET path` over HTTP/1.1 on a new TLS connection; status and body.
async fn get(addr: SocketAddr, trusted_pem: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
    request(addr, trusted_pem, "GET", path, vec![], false).await
}

/// One HTTPS request over a new TLS connection; returns status and body.
async fn request(
    addr: SocketAddr,
    trusted_pem: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
    h2: bool,
) -> Result<(u16, Vec<u8>), String> {
    let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
    let tcp = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("localhost").expect("name");
    let tls = tokio::time::timeout(STEP, connector(trusted_pem, alpn).connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    let req = http::Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let fut = async move {
        let resp = if h2 {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            send.send_request(req).await
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("h1 handshake: {e}"))?;
            tokio::spawn(conn);
            send.send_request(req).await
        }
        .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, body.to_vec()))
    };
    tokio::time::timeout(STEP, fut)
        .await
        .map_err(|_| "request timed out".to_string())?
}

fn review(kind: &str, namespace: &str, object: Value) -> Vec<u8> {
    let resource = format!("{}s", kind.to_ascii_lowercase());
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7f0b2cde-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": resource},
            "name": "web",
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "test"},
            "object": object,
            "oldObject": null,
            "dryRun": false
        }
    })
    .to_string()
    .into_bytes()
}

fn service(ports: &[(&str, Option<&str>)], labels: Option<Value>) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .enumerate()
        .map(|(i, (proto, app))| {
            let mut p = json!({"name": format!("p{i}"), "port": 80 + i, "protocol": proto});
            if let Some(app) = app {
                p["appProtocol"] = json!(app);
            }
            p
        })
        .collect();
    let mut meta = json!({"name": "web"});
    if let Some(labels) = labels {
        meta["labels"] = labels;
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": meta,
           "spec": {"type": "ClusterIP", "ports": ports, "selector": {"app": "web"}}})
}

/// POST a review and return the decoded response object and the decoded
/// JSONPatch, if any.
async fn admit(server: &Server, cert: &Cert, body: Vec<u8>, h2: bool) -> (Value, Option<Value>) {
    let (status, bytes) = request(server.addr, &cert.cert_pem, "POST", "/mutate", body, h2)
        .await
        .expect("request");
    assert_eq!(status, 200, "body: {}", String::from_utf8_lossy(&bytes));
    let out: Value = serde_json::from_slice(&bytes).expect("response JSON");
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    let resp = out["response"].clone();
    assert_eq!(resp["uid"], "7f0b2cde-0000-4000-8000-000000000001");
    assert_eq!(resp["allowed"], true, "the webhook never denies");
    let patch = resp["patch"].as_str().map(|b64| {
        assert_eq!(resp["patchType"], "JSONPatch");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("patch is base64");
        serde_json::from_slice::<Value>(&raw).expect("patch is JSON")
    });
    (resp, patch)
}

fn label_patch() -> Value {
    json!([{"op": "add", "path": "/metadata/labels/service.kubernetes.io~1service-proxy-name", "value": "lightpath"}])
}

/// A TCP Service with no labels at all: the whole label map is added.
async fn assert_unlabelled_service_gets_the_label_map(server: &Server, cert: &Cert) {
    let (_, patch) = admit(
        server,
        cert,
        review("Service", "shop", service(&[("TCP", None)], None)),
        false,
    )
    .await;
    assert_eq!(
        patch,
        Some(json!([{"op": "add", "path": "/metadata/labels",
            "value": {"service.kubernetes.io/service-proxy-name": "lightpath"}}]))
    );
}

#[tokio::test]
async fn tcp_and_http_services_are_labelled_over_h1_and_h2() {
    let cert = localhost_cert();
    let server = start(&cert, Policy::default()).await;
    let body = review(
        "Service",
        "shop",
        service(
            &[("TCP", Some("http")), ("TCP", None)],
            Some(json!({"app": "web"})),
        ),
    );
    for h2 in [false, true] {
        let (_, patch) = admit(&server, &cert, body.clone(), h2).await;
        assert_eq!(patch, Some(label_patch()), "h2={h2}");
    }
    // No labels at all: the whole map is added.
    assert_unlabelled_service_gets_the_label_map(&server, &cert).await;
}

#[tokio::test]
async fn tcp_plus_udp_is_labelled_unless_the_policy_is_tcp_only() {
    let cert = localhost_cert();
    let body = review(
        "Service",
        "dns",
        service(&[("TCP", None), ("UDP", None)], None),
    );

    let today = start(&cert, Policy::default()).await;
    let (resp, patch) = admit(&today, &cert, body.clone(), false).await;
    assert!(patch.is_some(), "UDP is carried: TCP+UDP labelled: {resp}");

    let tcp_only = start(&cert, Policy::new("lightpath", ["kube-system"], ["TCP"])).await;
    let (resp, patch) = admit(&tcp_only, &cert, body, false).await;
    assert_eq!(
        patch, None,
        "a TCP-only policy leaves UDP to kube-proxy: {resp}"
    );
}

#[tokio::test]
async fn sctp_excluded_namespace_and_already_named_are_left_alone() {
    let cert = localhost_cert();
    let server = start(
        &cert,
        Policy::new("lightpath", ["kube-system"], ["TCP", "UDP"]),
    )
    .await;
    let cases = [
        (
            "sctp",
            review(
                "Service",
                "shop",
                service(&[("TCP", None), ("SCTP", None)], None),
            ),
        ),
        (
            "kube-system",
            review("Service", "kube-system", service(&[("TCP", None)], None)),
        ),
        (
            "ours already",
            review(
                "Service",
                "shop",
                service(
                    &[("TCP", None)],
                    Some(json!({"service.kubernetes.io/service-proxy-name": "lightpath"})),
                ),
            ),
        ),
        (
            "another proxy",
            review(
                "Service",
                "shop",
                service(
                    &[("TCP", None)],
                    Some(json!({"service.kubernetes.io/service-proxy-name": "cilium"})),
                ),
            ),
        ),
    ];
    for (name, body) in cases {
        let (resp, patch) = admit(&server, &cert, body, false).await;
        assert_eq!(patch, None, "{name}: {resp}");
    }
}

#[tokio::test]
async fn unrelated_kind_is_allowed_unchanged() {
    let cert = localhost_cert();
    let server = start(&cert, Policy::default()).await;
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
                     "spec": {"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 80}]}]}});
    let (resp, patch) = admit(&server, &cert, review("Pod", "shop", pod), false).await;
    assert_eq!(patch, None);
    assert!(resp.get("patchType").is_none());
}

#[tokio::test]
async fn malformed_reviews_get_clean_errors_and_the_server_keeps_serving() {
    let cert = localhost_cert();
    let server = start(&cert, Policy::default()).await;
    let bad: [&[u8]; 4] = [
        b"{not json",
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
        br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x","kind":{"kind":"Service"}}}"#,
        &[0xff, 0xfe, 0x00, 0x01],
    ];
    for body in bad {
        let (status, text) = request(
            server.addr,
            &cert.cert_pem,
            "POST",
            "/mutate",
            body.to_vec(),
            false,
        )
        .await
        .expect("request");
        assert_eq!(status, 400);
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains("AdmissionReview"), "clear message: {text}");
    }
    // A Service object that does not decode is admitted unchanged, with why.
    let (resp, patch) = admit(
        &server,
        &cert,
        review("Service", "shop", json!({"spec": {"ports": "eighty"}})),
        false,
    )
    .await;
    assert_eq!(patch, None);
    assert!(resp["status"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("request.object"));
    // Oversized body: refused, not buffered without limit.
    let huge = vec![b' '; webhook::server::MAX_BODY + 1];
    let (status, _) = request(server.addr, &cert.cert_pem, "POST", "/mutate", huge, false)
        .await
        .expect("request");
    assert_eq!(status, 400);
    // A client that never completes the TLS handshake costs nothing visible.
    let _idle = TcpStream::connect(server.addr).await.expect("connect");
    // Still serving, and health answers.
    assert_unlabelled_service_gets_the_label_map(&server, &cert).await;
    let (status, _) = get(server.addr, &cert.cert_pem, "/healthz")
        .await
        .expect("healthz");
    assert_eq!(status, 200);
    let (status, _) = get(server.addr, &cert.cert_pem, "/mutate")
        .await
        .expect("wrong method");
    assert_eq!(status, 405);
}

/// Temporary directory removed on drop, even when the test fails.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "lp-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn rewritten_certificate_files_are_served_without_restart() {
    let dir = TempDir::new("whcert");
    let files = tls::CertFiles {
        cert: dir.0.join("tls.crt"),
        key: dir.0.join("tls.key"),
    };
    let first = localhost_cert();
    std::fs::write(&files.cert, &first.cert_pem).expect("write");
    std::fs::write(&files.key, &first.key_pem).expect("write");
    let certs = tls::SwappableCert::new(files.load().expect("load"));
    tokio::spawn(
        files
            .clone()
            .watch(certs.clone(), Duration::from_millis(50)),
    );
    let server = start_with(certs, Policy::default()).await;
    let health = |pem: String| async move { get(server.addr, &pem, "/healthz").await };
    assert_eq!(health(first.cert_pem.clone()).await.expect("first").0, 200);

    // A half-written pair is ignored: the last good certificate keeps serving.
    std::fs::write(&files.key, "garbage").expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        health(first.cert_pem.clone()).await.expect("still first").0,
        200
    );

    let second = localhost_cert();
    std::fs::write(&files.cert, &second.cert_pem).expect("write");
    std::fs::write(&files.key, &second.key_pem).expect("write");
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Ok((200, _)) = health(second.cert_pem.clone()).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate not served within {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        health(first.cert_pem.clone()).await.is_err(),
        "old certificate is no longer served"
    );
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn carried_protocols_flag_of_the_binary() {
    let dir = TempDir::new("whflag");
    let cert = localhost_cert();
    let (cert_path, key_path) = (dir.0.join("tls.crt"), dir.0.join("tls.key"));
    std::fs::write(&cert_path, &cert.cert_pem).expect("write");
    std::fs::write(&key_path, &cert.key_pem).expect("write");
    let bin = env!("CARGO_BIN_EXE_lightpath");

    // A typo is refused at start, naming the flag and the value.
    let out = std::process::Command::new(bin)
        .args([
            "webhook",
            "--listen",
            "127.0.0.1:0",
            "--carried-protocols",
            "TCP,QUIC",
        ])
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .output()
        .expect("run lightpath webhook");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--carried-protocols") && stderr.contains("QUIC"),
        "{stderr}"
    );

    // UDP switched on by the flag: TCP+UDP Services are labelled.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = std::process::Command::new(bin)
        .args(["webhook", "--carried-protocols", "tcp,udp"])
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start lightpath webhook");
    let mut child = Kill(child);
    let (stop, _) = oneshot::channel();
    let server = Server {
        addr: format!("127.0.0.1:{port}").parse().expect("addr"),
        _stop: stop,
    };
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Some(exit) = child.0.try_wait().expect("status") {
            panic!("lightpath webhook exited: {exit}");
        }
        if let Ok((200, _)) = get(server.addr, &cert.cert_pem, "/healthz").await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhook not up in {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = review(
        "Service",
        "dns",
        service(&[("TCP", None), ("UDP", None)], None),
    );
    let (_, patch) = admit(&server, &cert, body, false).await;
    assert!(patch.is_some(), "UDP carried by flag: labelled");
    let sctp = review(
        "Service",
        "x",
        service(&[("TCP", None), ("SCTP", None)], None),
    );
    let (_, patch) = admit(&server, &cert, sctp, false).await;
    assert_eq!(patch, None, "SCTP still not carried");
}
