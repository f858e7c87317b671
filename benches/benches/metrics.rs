//! What metrics cost on the hot path.
//!
//! * `metrics_handles`: the per-connection and per-request accounting alone
//!   (registered handles: atomic adds, no label hashing).
//! * `l4_connections`: whole connections through the L4 server on loopback
//!   (connect, 64-byte echo, close), with nobody scraping, with a Prometheus
//!   scrape of the admin `/metrics` every second, and with one every 10 ms
//!   (a stress case, 100× what Prometheus does), so the scrape's cost on the
//!   data plane shows up as a throughput difference.
//!
//! Run: `cargo bench -p lightpath-benches --bench metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use control::{Mode, ServicePortName};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lightpath::admin::{self, AdminConfig, AdminState};
use lightpath::health::{ProxyHealth, DEFAULT_HEALTH_TIMEOUT};
use lightpath::lifecycle::Readiness;
use lightpath_benches::{echo_backend, runtime, service, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn spn(name: &str) -> ServicePortName {
    ServicePortName::new("bench", name, "tcp")
}

fn handles(c: &mut Criterion) {
    let m = lightpath::metrics::service(&spn("handles"));
    let mut g = c.benchmark_group("metrics_handles");
    g.throughput(Throughput::Elements(1));
    g.bench_function("tcp_connection_open_bytes_close", |b| {
        b.iter(|| {
            let conn = m.tcp_open();
            // What a short relay reports when its copy ends.
            let m = conn.meters();
            m.client_to_upstream.increment(std::hint::black_box(512));
            m.upstream_to_client.increment(std::hint::black_box(4096));
            drop(conn);
        })
    });
    g.bench_function("connect_latency_record", |b| {
        b.iter(|| m.connect_succeeded(std::hint::black_box(Duration::from_micros(120))))
    });
    g.bench_function("http_response", |b| {
        b.iter(|| {
            m.http_response(
                std::hint::black_box(200),
                std::hint::black_box(Duration::from_micros(800)),
            )
        })
    });
    g.finish();
}

/// One proxied connection: connect, 64 bytes there and back, close.
async fn exchange(frontend: SocketAddr) {
    let mut s = TcpStream::connect(frontend).await.expect("connect");
    let msg = [7u8; 64];
    s.write_all(&msg).await.expect("write");
    let mut back = [0u8; 64];
    s.read_exact(&mut back).await.expect("read");
}

/// GET /metrics over a fresh connection; returns the body size.
async fn scrape(admin: SocketAddr) -> usize {
    let Ok(mut s) = TcpStream::connect(admin).await else {
        return 0;
    };
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut body = Vec::new();
    let _ = s.read_to_end(&mut body).await;
    body.len()
}

fn l4_connections(c: &mut Criterion) {
    // The data plane: its own multi-thread runtime, as in `lightpath run`.
    let rt = runtime();
    let (frontend, admin_addr, _keep) = rt.block_on(async {
        let b1 = echo_backend().await;
        let b2 = echo_backend().await;
        let proxy = Proxy::start(service("l4", "tcp", Mode::L4, &[b1, b2])).await;
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut state = AdminState::new(
            proxy.table.clone(),
            Readiness::new(),
            ProxyHealth::new(DEFAULT_HEALTH_TIMEOUT),
        );
        state.balancers = Some(proxy.server.balancers().clone());
        state.data_plane = Some(tokio::runtime::Handle::current());
        let handle = admin::spawn(
            AdminConfig {
                admin_addr: Some(any),
                metrics_addr: None,
                health_addr: None,
                service_health: false,
                service_health_ips: Vec::new(),
            },
            state,
        )
        .expect("admin");
        let admin_addr = handle.admin_addr().expect("admin addr");
        (proxy.addr, admin_addr, (proxy, handle))
    });

    let mut g = c.benchmark_group("l4_connections");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(8));
    for (label, every) in [
        ("no_scrape", None),
        ("scrape_every_1s", Some(Duration::from_secs(1))),
        ("scrape_every_10ms", Some(Duration::from_millis(10))),
    ] {
        // The scraper is a separate thread and runtime, like Prometheus is a
        // separate process: only the admin runtime and the shared atomics
        // stand between it and the data plane.
        let stop = Arc::new(AtomicBool::new(false));
        let scrapes = Arc::new(AtomicU64::new(0));
        let scraper = every.map(|every| {
            let stop = stop.clone();
            let scrapes = scrapes.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("scraper runtime");
                rt.block_on(async {
                    while !stop.load(Ordering::Relaxed) {
                        if scrape(admin_addr).await > 0 {
                            scrapes.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(every).await;
                    }
                })
            })
        });
        g.bench_function(label, |b| b.iter(|| rt.block_on(exchange(frontend))));
        stop.store(true, Ordering::Relaxed);
        if let Some(t) = scraper {
            let _ = t.join();
            eprintln!("{label}: {} scrapes", scrapes.load(Ordering::Relaxed));
        }
    }
    g.finish();
}

criterion_group!(benches, handles, l4_connections);
criterion_main!(benches);
