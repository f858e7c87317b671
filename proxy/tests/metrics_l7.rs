//! Real scrapes after real HTTP traffic: requests through the server's L7
//! path on loopback (an HTTP service whose frontend is the listener's own
//! address), then `/metrics` parsed with an independent Prometheus parser;
//! the per-class request counters and the duration histogram match what
//! was sent, and so do the connection counters underneath.

mod admin_util;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use admin_util::*;
use bytes::Bytes;
use control::{EndpointState, FrontendKind, Mode, ServicePort};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lightpath::admin::{self, AdminState};
use lightpath::health::{ProxyHealth, DEFAULT_HEALTH_TIMEOUT};
use lightpath::lifecycle::Readiness;
use lightpath::server::{Server, ServerConfig};
use tokio::net::{TcpListener, TcpStream};

/// `/missing` → 404, anything else → 200 "ok".
async fn http_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
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
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_request_counters_match_the_requests_sent() {
    let b1 = http_backend().await;
    let b2 = http_backend().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let frontend = listener.local_addr().unwrap();
    let name = spn("metrics-l7", "web", "http");
    let mut sp: ServicePort = (*service_port(
        name.clone(),
        vec![ep(b1, EndpointState::Ready), ep(b2, EndpointState::Ready)],
        vec![],
        None,
    ))
    .clone();
    sp.mode = Mode::Http;
    let (_tx, rx) = tokio::sync::watch::channel(table(
        1,
        vec![(frontend, FrontendKind::ClusterIp, Arc::new(sp))],
    ));
    let server = Server::new(rx.clone(), ServerConfig::default());
    let (drain_signal, drain_watch) = lightpath::drain::channel();
    let serving = {
        let server = server.clone();
        tokio::spawn(async move { server.run(vec![listener], drain_watch).await })
    };
    let srv = admin::spawn(
        loopback_config(),
        AdminState::new(
            rx,
            Readiness::new(),
            ProxyHealth::new(DEFAULT_HEALTH_TIMEOUT),
        ),
    )
    .expect("admin spawn");

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
    let start = Instant::now();
    let s = loop {
        let r = get(srv.metrics_addr().unwrap(), "/metrics").await;
        assert_eq!(r.status, 200);
        let s = parse_prometheus(&r.body);
        if sample(&s, "lightpath_tcp_connections_closed_total", &labels) == Some(CONNS as f64) {
            break s;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "connections never closed in metrics"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
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

    drain_signal.drain(Duration::from_secs(2)).await;
    tokio::time::timeout(DEADLINE, serving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(srv);
}
