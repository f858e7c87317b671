//! The L7 hot path: per-request header rewriting, and one HTTP/1.1
//! keep-alive round trip through the in-process L7 proxy against the same
//! round trip straight to the backend (both on loopback, same client).
//!
//! Run: `cargo bench -p lightpath-benches --bench l7`.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use control::Mode;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lightpath::l7::headers;
use lightpath_benches::{runtime, service, Proxy};
use tokio::net::TcpListener;

fn typical_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "web.shop.svc.cluster.local"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) bench"),
        ("accept", "text/html,application/xhtml+xml"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-US,en;q=0.9"),
        ("cookie", "session=0123456789abcdef; theme=dark"),
        ("connection", "keep-alive"),
        ("x-forwarded-for", "192.0.2.10"),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

async fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn bench(c: &mut Criterion) {
    // Formatted once per client connection, as the proxy does.
    let client = headers::ClientAddr::new(IpAddr::from([10, 0, 0, 7]));
    let base = typical_headers();
    c.bench_function("l7/headers/prepare_request", |b| {
        b.iter(|| {
            let mut h = base.clone();
            headers::prepare_request(&mut h, &client, false);
            black_box(h)
        })
    });

    let rt = runtime();
    let (backend, proxy) = rt.block_on(async {
        let b = backend().await;
        (
            b,
            Proxy::start(service("l7", "http", Mode::Http, &[b])).await,
        )
    });
    let front = proxy.addr;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut g = c.benchmark_group("l7/roundtrip");
    for (name, addr) in [("direct", backend), ("lightpath", front)] {
        let uri: http::Uri = format!("http://{addr}/").parse().expect("uri");
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let req = Request::get(uri.clone())
                        .body(Empty::<Bytes>::new())
                        .expect("req");
                    let resp = client.request(req).await.expect("response");
                    assert_eq!(resp.status(), 200);
                    black_box(resp.into_body().collect().await.expect("body").to_bytes())
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
