//! The L7 hot path: per-request header rewriting, and one HTTP/1.1
//! keep-alive round trip through the in-process L7 proxy against the same
//! round trip straight to the backend (both on loopback, same client).
//! Off the hot path, at 10,000 HTTP services: the first L7 sync, and one
//! idle-connection sweep (what the table sync task runs every second).
//!
//! Run: `cargo bench -p lightpath-benches --bench l7`.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use control::Mode;
use control::{Frontend, FrontendKind, Table};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lightpath::balance::{BalanceConfig, Balancers};
use lightpath::l4::connect::ConnectConfig;
use lightpath::l7::{headers, L7};
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

/// 10,000 HTTP service ports with 3 endpoints each, as a table.
fn http_table() -> Arc<Table> {
    let frontends = (0..10_000u32).map(|i| {
        let eps: Vec<SocketAddr> = (0..3u16)
            .map(|e| SocketAddr::from(([10, 244, (i / 250) as u8, (i % 250) as u8], 8080 + e)))
            .collect();
        let port = service(&format!("s{i}"), "http", Mode::Http, &eps);
        let ip = [10, 96, (i >> 8) as u8, i as u8];
        Frontend::new(SocketAddr::from((ip, 80)), FrontendKind::ClusterIp, port)
    });
    Arc::new(Table::new(1, frontends))
}

/// Off the hot path, at 10,000 HTTP service ports: the first `L7::sync`
/// (every service's L7 state built, as at start), and `L7::sweep_idle`
/// with a pool for each of the 30,000 endpoints (as after traffic) and no
/// idle connection to close, which the table sync task runs every second.
fn control(c: &mut Criterion) {
    let table = http_table();
    let balancers = Balancers::new(BalanceConfig::default());
    let mut g = c.benchmark_group("l7/control");
    g.sample_size(10);
    g.bench_function("first_sync/10000_services", |b| {
        b.iter_batched(
            || L7::new(&ConnectConfig::default()),
            |l7| {
                l7.sync(&table, &balancers);
                l7
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
    let l7 = L7::new(&ConnectConfig::default());
    l7.sync(&table, &balancers);
    for fe in table.frontends.values() {
        let svc = l7.service(&fe.service);
        for ep in fe.service.cluster_endpoints.iter() {
            svc.shared.pools.get(ep.addr, None);
        }
    }
    c.bench_function("l7/control/idle_sweep/10000_services_30000_pools", |b| {
        b.iter(|| black_box(l7.sweep_idle()))
    });
}

criterion_group!(benches, bench, control);
criterion_main!(benches);
