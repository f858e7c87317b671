//! The admission webhook's answer time. The API server waits for it on every
//! Service creation (up to the configuration's 5 s timeout), so it must stay
//! far below a millisecond of work per review; the HTTPS round trip on a
//! kept-alive TLS connection is what the API server actually sees.
//!
//! Run: `cargo bench -p lightpath-benches --bench webhook`

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use lightpath::webhook::bootstrap::{Material, Target};
use lightpath::webhook::{review, server, tls, Policy};
use rustls_pki_types::pem::PemObject;

fn service_review(protocols: &[&str]) -> Vec<u8> {
    let ports: Vec<_> = protocols
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"name": format!("p{i}"), "port": 80 + i, "targetPort": 8080 + i, "protocol": p}))
        .collect();
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7f0b2cde-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Service"},
            "resource": {"group": "", "version": "v1", "resource": "services"},
            "name": "web", "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:ci:deployer", "groups": ["system:serviceaccounts"]},
            "object": {
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop",
                    "labels": {"app": "web", "tier": "frontend", "team": "shop"},
                    "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(600)}},
                "spec": {"type": "ClusterIP", "selector": {"app": "web"}, "ports": ports,
                    "sessionAffinity": "None", "ipFamilyPolicy": "SingleStack"}
            },
            "oldObject": null, "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
    .to_string()
    .into_bytes()
}

fn answer(c: &mut Criterion) {
    let policy = Policy::default();
    let mut g = c.benchmark_group("webhook/answer");
    for (name, protocols) in [
        ("label_tcp_3_ports", &["TCP", "TCP", "TCP"][..]),
        ("skip_tcp_udp", &["TCP", "UDP"][..]),
    ] {
        let body = service_review(protocols);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| review::answer(std::hint::black_box(&body), &policy).expect("answer"))
        });
    }
    g.finish();
}

fn https_round_trip(c: &mut Criterion) {
    let rt = lightpath_benches::runtime();
    let target = Target {
        namespace: "lightpath-system".into(),
        secret: "lightpath-webhook-tls".into(),
        service: "lightpath-webhook".into(),
        webhook_config: "lightpath-webhook".into(),
    };
    let material = Material::generate(&target, SystemTime::now()).expect("certificate");
    let key = material.certified_key(&target).expect("key");
    let (addr, _stop) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = tls::server_config(tls::SwappableCert::new(key)).expect("tls");
        tokio::spawn(server::serve(
            listener,
            config,
            Arc::new(Policy::default()),
            async move {
                let _ = stopped.await;
            },
        ));
        (addr, stop)
    });
    // One kept-alive TLS connection, as the API server keeps one per webhook.
    let mut send = rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(material.ca_cert.as_bytes()) {
            roots.add(c.expect("pem")).expect("root");
        }
        let config = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from(target.service_dns_name()).expect("name");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("handshake");
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("http1");
        tokio::spawn(conn);
        send
    });
    let body = Bytes::from(service_review(&["TCP", "TCP", "TCP"]));
    c.bench_function("webhook/https_round_trip_keepalive", |b| {
        b.iter(|| {
            rt.block_on(async {
                let req = http::Request::post(server::MUTATE_PATH)
                    .header("host", "lightpath-webhook.lightpath-system.svc")
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .expect("request");
                // The previous exchange must be fully done before the next.
                send.ready().await.expect("connection ready");
                let resp = send.send_request(req).await.expect("response");
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.expect("body").to_bytes()
            })
        })
    });
}

criterion_group!(benches, answer, https_round_trip);
criterion_main!(benches);
