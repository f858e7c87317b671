//! Real scrapes after real HTTP traffic: requests through the server's L7
//! path on loopback (an HTTP service whose frontend is the listener's own
//! address), then `/metrics` parsed with an independent Prometheus parser;
//! the per-class request counters and the duration histogram match what
//! was sent, and so do the connection counters underneath; the upstream
//! connection gauge follows a removed service's connections down to 0.

mod admin_util;
mod support {
    pub mod loopback;
    pub mod scrape;
}

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use admin_util::*;
use bytes::Bytes;
use control::{Affinity, Mode, ServicePortName};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use support::loopback::service_port;
use support::scrape::{scrape_until, Rig};
use tokio::net::{TcpListener, TcpStream};

/// `/missing` → 404, anything else → 200 "ok". Also returns how many
/// connections it has open.
async fn http_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let count = open.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let count = count.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let status = if req.uri().path() == "/missing" {
                        StatusCode::NOT_FOUND
                    } else {
                        StatusCode::OK
                    };
                    let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                    *r.status_mut() = status;
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
                count.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_request_counters_match_the_requests_sent() {
    let (b1, open1) = http_backend().await;
    let (b2, open2) = http_backend().await;
    let name = ServicePortName::new("metrics-l7", "web", "http");
    // Pooled upstream connections outlive the test, so the gauge checked
    // below stays put.
    let annotations = BTreeMap::from([(
        "lightpath.io/upstream-idle-timeout".to_string(),
        "60s".to_string(),
    )]);
    let sp = service_port(name, Mode::Http, Affinity::None, &[b1, b2], annotations);
    let rig = Rig::start(1, |a| vec![(a[0], sp)], serde_json::Value::Null).await;
    let frontend = rig.served.addrs[0];

    // 3 keep-alive client connections: 30 × 200 and 12 × 404 in total.
    const CONNS: usize = 3;
    const OK_PER_CONN: usize = 10;
    const MISSING_PER_CONN: usize = 4;
    for _ in 0..CONNS {
        let s = TcpStream::connect(frontend).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        let driver = tokio::spawn(conn);
        for i in 0..OK_PER_CONN + MISSING_PER_CONN {
            let path = if i < OK_PER_CONN { "/ok" } else { "/missing" };
            let req = Request::get(path)
                .header("host", "web.metrics-l7")
                .body(Empty::<Bytes>::new())
                .unwrap();
            tokio::time::timeout(DEADLINE, send.ready())
                .await
                .expect("connection ready in time")
                .expect("connection ready");
            let resp = tokio::time::timeout(DEADLINE, send.send_request(req))
                .await
                .expect("response in time")
                .expect("response");
            let want = if i < OK_PER_CONN { 200 } else { 404 };
            assert_eq!(resp.status().as_u16(), want, "{path}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        drop(send);
        let _ = tokio::time::timeout(DEADLINE, driver).await;
    }

    let labels = [
        ("namespace", "metrics-l7"),
        ("service", "web"),
        ("port", "http"),
    ];
    let closed = |s: &_| sample(s, "lightpath_tcp_connections_closed_total", &labels);
    let s = scrape_until(rig.metrics_addr(), closed, Some(CONNS as f64)).await;
    let class = |c: &str| {
        let mut l = labels.to_vec();
        l.push(("class", c));
        sample(&s, "lightpath_http_requests_total", &l).unwrap_or(0.0)
    };
    assert_eq!(class("2xx"), (CONNS * OK_PER_CONN) as f64);
    assert_eq!(class("4xx"), (CONNS * MISSING_PER_CONN) as f64);
    assert_eq!(class("5xx"), 0.0);
    let total = (CONNS * (OK_PER_CONN + MISSING_PER_CONN)) as f64;
    assert_eq!(
        sample(&s, "lightpath_http_request_duration_seconds_count", &labels),
        Some(total)
    );
    assert_eq!(
        sample(&s, "lightpath_tcp_connections_opened_total", &labels),
        Some(CONNS as f64)
    );
    assert_eq!(
        sample(&s, "lightpath_tcp_connections_active", &labels),
        Some(0.0)
    );
    assert_eq!(
        sample(&s, "lightpath_http_retries_total", &labels),
        Some(0.0)
    );

    // The upstream connections the backends have open (pooled, idle now),
    // as the per-second sample reports them.
    let backends_open = open1.load(Ordering::SeqCst) + open2.load(Ordering::SeqCst);
    // Per backend, at most one per data thread (requests were sequential).
    assert!((1..=4).contains(&backends_open), "{backends_open}");
    let upstream = |s: &_| sample(s, "lightpath_http_upstream_connections", &labels);
    scrape_until(rig.metrics_addr(), upstream, Some(backends_open as f64)).await;

    // The service leaves the table: its pooled connections are closed, and
    // the gauge follows them to 0 instead of keeping its last sample.
    rig.served.publish(Vec::new());
    scrape_until(rig.metrics_addr(), upstream, Some(0.0)).await;
    let closed_in_time = async {
        while open1.load(Ordering::SeqCst) + open2.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(DEADLINE, closed_in_time)
        .await
        .expect("the removed service's upstream connections closed in time");

    rig.shutdown().await;
}
