//! Draining HTTP connections, end to end through real loopback sockets.
//!
//! Why: on SIGTERM the node proxy must not cut requests, and clients must
//! learn to go elsewhere before the listener is gone. Once the drain starts,
//! an HTTP/1.1 keep-alive connection answers its in-flight request with
//! `Connection: close` and then closes; an HTTP/2 connection gets GOAWAY,
//! its in-flight stream completes, and no new stream is accepted.

mod l7_common;

use std::time::Duration;

use bytes::Bytes;
use control::Mode;
use http::{Request, Response};
use l7_common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `/slow` answers after 600 ms, anything else at once.
async fn slow_backend() -> Backend {
    Backend::start(|_, req: Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(600)).await;
            return Response::new(full("slow-done"));
        }
        Response::new(full("fast"))
    })
    .await
}

#[tokio::test]
async fn http1_keep_alive_gets_connection_close_and_in_flight_completes() {
    let be = slow_backend().await;
    let mut p = Proxy::start(service("drain-h1", &[be.addr], Mode::Http, &[])).await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    let mut buf = Vec::new();
    s.write_all(b"GET /fast HTTP/1.1\r\nhost: svc\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, "fast");

    // A request in flight when the drain starts...
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: svc\r\n\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let signal = p.signal.take().expect("signal");
    let drained = tokio::spawn(signal.drain(Duration::from_secs(10)));
    // ...completes, and tells the client this connection is done.
    let (head, body) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "slow-done");
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(WAIT, s.read(&mut rest))
        .await
        .expect("close in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed after the response");
    let out = tokio::time::timeout(WAIT, drained)
        .await
        .expect("drain ends")
        .expect("drain task");
    assert_eq!(out, lightpath::drain::Drained::Graceful);
}

#[tokio::test]
async fn http2_gets_goaway_and_in_flight_stream_completes() {
    let be = slow_backend().await;
    let mut p = Proxy::start(service("drain-h2", &[be.addr], Mode::Http, &[])).await;
    let tcp = TcpStream::connect(p.addr).await.expect("connect");
    let (mut h2, conn) = tokio::time::timeout(WAIT, h2::client::handshake(tcp))
        .await
        .expect("handshake in time")
        .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let req = |path: &str| {
        Request::get(format!("http://svc{path}"))
            .body(())
            .expect("request")
    };
    // Warm: one stream answered before the drain.
    let (resp, _) = h2.send_request(req("/fast"), true).expect("send");
    let resp = tokio::time::timeout(WAIT, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), 200);

    let (in_flight, _) = h2.send_request(req("/slow"), true).expect("send");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let signal = p.signal.take().expect("signal");
    let drained = tokio::spawn(signal.drain(Duration::from_secs(10)));

    let resp = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("in time")
        .expect("in-flight stream completes after GOAWAY");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, body.data())
        .await
        .expect("body in time")
    {
        let chunk: Bytes = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"slow-done");

    // GOAWAY: the connection ends cleanly, and it takes no new stream.
    let end = tokio::time::timeout(WAIT, conn)
        .await
        .expect("connection ends after GOAWAY")
        .expect("conn task");
    assert!(end.is_ok(), "connection ended with {end:?}");
    let refused = match h2.send_request(req("/fast"), true) {
        Err(_) => true,
        Ok((resp, _)) => tokio::time::timeout(WAIT, resp)
            .await
            .expect("in time")
            .is_err(),
    };
    assert!(refused, "a new stream after GOAWAY must fail");
    let out = tokio::time::timeout(WAIT, drained)
        .await
        .expect("drain ends")
        .expect("drain task");
    assert_eq!(out, lightpath::drain::Drained::Graceful);
}
