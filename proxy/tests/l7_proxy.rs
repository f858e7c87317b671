//! L7 proxying end to end through real loopback sockets: headers, keep-alive,
//! chunked and 100 MB streamed bodies, h2c multiplexing with trailers,
//! WebSocket-style upgrades, CONNECT tunnels, malformed and oversized
//! requests.

mod l7_common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use control::Mode;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use l7_common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A backend that echoes what it saw: method, path, selected headers.
async fn mirror() -> Backend {
    Backend::start(|_, req| async move {
        let h = req.headers();
        let get = |k: &str| {
            h.get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let line = format!(
            "{} {} host={} xff={} xfp={} rid={} conn={}",
            req.method(),
            req.uri(),
            get("host"),
            get("x-forwarded-for"),
            get("x-forwarded-proto"),
            get("x-request-id"),
            get("connection"),
        );
        let body = req.into_body().collect().await.expect("body").to_bytes();
        Response::new(full(format!("{line} body={}", body.len())))
    })
    .await
}

#[tokio::test]
async fn headers_host_forwarding_and_attempts() {
    let b = mirror().await;
    let p = Proxy::start(service("hdr", &[b.addr], Mode::Http, &[])).await;
    let c = client();
    let req = Request::get(p.url("/a/b?q=1"))
        .header("host", "web.shop.svc.cluster.local")
        .header("x-forwarded-for", "192.0.2.1")
        .body(full(""))
        .expect("req");
    let (status, headers, body) = send(&c, req).await;
    let body = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("GET /a/b?q=1 host=web.shop.svc.cluster.local"),
        "{body}"
    );
    assert!(body.contains("xff=192.0.2.1, 127.0.0.1"), "{body}");
    assert!(body.contains("xfp=http"), "{body}");
    assert!(!body.contains("rid=-"), "x-request-id added: {body}");
    assert_eq!(headers["x-lightpath-attempts"], "1");

    // An existing request id is kept.
    let req = Request::get(p.url("/"))
        .header("x-request-id", "keep-me")
        .body(full(""))
        .expect("req");
    let (_, _, body) = send(&c, req).await;
    assert!(String::from_utf8_lossy(&body).contains("rid=keep-me"));
}

#[tokio::test]
async fn keep_alive_and_chunked_bodies() {
    let b = mirror().await;
    let p = Proxy::start(service("ka", &[b.addr], Mode::Http, &[])).await;
    // Raw HTTP/1.1 over one client connection: three requests, one chunked.
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    let mut all = Vec::new();
    for i in 0..3 {
        let req = if i == 1 {
            "POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_string()
        } else {
            format!("GET /{i} HTTP/1.1\r\nhost: x\r\n\r\n")
        };
        s.write_all(req.as_bytes()).await.expect("write");
        let resp = read_whole_response(&mut s).await;
        all.push(resp);
    }
    assert!(all[0].contains("GET /0"), "{}", all[0]);
    assert!(
        all[1].contains("POST /c") && all[1].contains("body=11"),
        "{}",
        all[1]
    );
    assert!(all[2].contains("GET /2"), "{}", all[2]);
    // The proxy reused one pooled upstream connection for all three.
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
    assert_eq!(b.requests(), 3);

    // A chunked response streams back in chunks.
    let chunky = Backend::start(|_, _| async move {
        let chunks = futures::stream::iter((0..50).map(|i| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(format!(
                "chunk{i};"
            ))))
        }));
        Response::new(BodyExt::boxed(StreamBody::new(chunks)))
    })
    .await;
    p.publish(service("ka", &[chunky.addr], Mode::Http, &[]));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, _, body) = get(&client(), &p.url("/")).await;
    assert_eq!(status, 200);
    assert_eq!(
        body.len(),
        (0..50).map(|i| format!("chunk{i};").len()).sum::<usize>()
    );
}

/// One HTTP/1.1 response with a content-length body, head lowercased; the
/// connection must carry nothing after it.
async fn read_whole_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let (head, body) = read_response(s, &mut buf).await;
    assert!(buf.is_empty(), "no extra bytes expected");
    format!("{head}\r\n\r\n{body}")
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

const BIG: u64 = 100 * 1024 * 1024;

/// A body of `len` bytes generated on the fly in 64 KiB chunks.
fn generated(len: u64) -> BBody {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let n = len / chunk.len() as u64;
    let s = futures::stream::iter(0..n).map(move |_| {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(chunk.clone()))
    });
    BodyExt::boxed(StreamBody::new(s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_100_mb_both_ways_without_buffering() {
    // Upload: the backend counts and discards; download: it generates.
    let b = Backend::start(|_, req| async move {
        if req.method() == http::Method::POST {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.expect("frame").into_data() {
                    n += d.len() as u64;
                }
            }
            Response::new(full(n.to_string()))
        } else {
            Response::new(generated(BIG))
        }
    })
    .await;
    let p = Proxy::start(service("bulk", &[b.addr], Mode::Http, &[])).await;
    let c = client();
    // Warm up allocators and pools before measuring.
    let _ = get(&c, &p.url("/warm-up-small")).await;
    let before = rss();
    let mut peak = before;

    let req = Request::post(p.url("/up"))
        .body(generated(BIG))
        .expect("req");
    let (status, _, body) = send(&c, req).await;
    assert_eq!(status, 200);
    assert_eq!(body, BIG.to_string().as_bytes());
    peak = peak.max(rss());

    let resp = tokio::time::timeout(
        WAIT,
        c.request(Request::get(p.url("/down")).body(full("")).expect("req")),
    )
    .await
    .expect("in time")
    .expect("response");
    let mut body = resp.into_body();
    let mut got = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Some(f) = tokio::time::timeout_at(deadline, body.frame())
        .await
        .expect("in time")
    {
        if let Ok(d) = f.expect("frame").into_data() {
            got += d.len() as u64;
        }
        if got % (8 * 1024 * 1024) < 65536 {
            peak = peak.max(rss());
        }
    }
    assert_eq!(got, BIG);
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 40 * 1024 * 1024,
        "RSS grew by {} MiB while streaming 100 MiB each way",
        growth / (1024 * 1024)
    );
}

#[tokio::test]
async fn h2c_multiplexing_and_grpc_trailers() {
    let b = Backend::start(|n, req| async move {
        assert_eq!(req.version(), http::Version::HTTP_2, "h2c upstream");
        let te = req.headers().get("te").cloned();
        let _ = req.into_body().collect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert(
            "grpc-message",
            HeaderValue::from_str(&format!("req{n}")).expect("v"),
        );
        let frames = futures::stream::iter(vec![
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from_static(
                b"\0\0\0\0\x02hi",
            ))),
            Ok(Frame::trailers(trailers)),
        ]);
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        if let Some(te) = te {
            r.headers_mut().insert("x-saw-te", te);
        }
        r
    })
    .await;
    let p = Proxy::start(service("grpc", &[b.addr], Mode::H2c, &[])).await;
    let c = h2_client();
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (c, url) = (c.clone(), p.url("/pkg.Svc/Method"));
        tasks.push(tokio::spawn(async move {
            let req = Request::post(url)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(full(Bytes::from_static(b"\0\0\0\0\x00")))
                .expect("req");
            let resp = tokio::time::timeout(WAIT, c.request(req))
                .await
                .expect("in time")
                .expect("resp");
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["x-saw-te"], "trailers");
            let collected = resp.into_body().collect().await.expect("body");
            let trailers = collected
                .trailers()
                .cloned()
                .expect("trailers pass through");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(collected.to_bytes().as_ref(), b"\0\0\0\0\x02hi");
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    // 20 requests of 100 ms each concurrently: multiplexed, not serialised.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(b.requests(), 20);
    // All of them over a handful of upstream connections (one per endpoint).
    assert!(b.connections.load(Ordering::SeqCst) <= 2);
}

#[tokio::test]
async fn websocket_upgrade_echo() {
    // A backend that accepts `Upgrade: websocket` and echoes raw bytes.
    let b = Backend::start(|_, mut req| async move {
        let up = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(u) = up.await {
                let mut io = hyper_util::rt::TokioIo::new(u);
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        let mut r = Response::new(full(""));
        *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", HeaderValue::from_static("websocket"));
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("upgrade"));
        r.headers_mut().insert(
            "sec-websocket-accept",
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        r
    })
    .await;
    let p = Proxy::start(service("ws", &[b.addr], Mode::Http, &[])).await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(b"GET /chat HTTP/1.1\r\nhost: ws\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    for msg in [&b"hello"[..], b"second frame", &[0x81, 0x85, 1, 2, 3, 4, 5]] {
        s.write_all(msg).await.expect("write");
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(got, msg);
    }
}

#[tokio::test]
async fn connect_tunnel_relays_bytes_after_200() {
    // A raw backend: answers CONNECT with 200, then echoes bytes until EOF,
    // then sends its own FIN.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen2 = seen.clone();
    let backend = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let head = read_head(&mut s).await;
        *seen2.lock().expect("seen") = head;
        s.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => s.write_all(&buf[..n]).await.expect("echo"),
            }
        }
        let _ = s.shutdown().await;
    });
    let p = Proxy::start(service("connect", &[addr], Mode::Http, &[])).await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nhost: db.internal:5432\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let upstream_head = seen.lock().expect("seen").clone();
    assert!(
        upstream_head.starts_with("CONNECT db.internal:5432 HTTP/1.1"),
        "{upstream_head}"
    );
    // Not HTTP any more: arbitrary bytes both ways, including ones that
    // look like an HTTP request.
    for msg in [
        &b"\x00\x01binary\xff"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        &[7u8; 10_000][..],
    ] {
        s.write_all(msg).await.expect("write");
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(got, msg);
    }
    // Half-close travels through: our FIN reaches the backend, its FIN
    // comes back.
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("EOF in time")
        .expect("read");
    assert!(rest.is_empty());
    tokio::time::timeout(WAIT, backend)
        .await
        .expect("backend done")
        .expect("backend task");
}

async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while find(&buf, b"\r\n\r\n").is_none() {
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
        buf.push(b[0]);
    }
    String::from_utf8_lossy(&buf).to_string()
}

#[tokio::test]
async fn malformed_gets_400_after_earlier_pipelined_requests_and_oversized_gets_431() {
    let b = mirror().await;
    let p = Proxy::start(service("bad", &[b.addr], Mode::Http, &[])).await;
    // Two good pipelined requests, then garbage: both good ones are answered,
    // then a 400.
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(b"GET /one HTTP/1.1\r\nhost: x\r\n\r\nGET /two HTTP/1.1\r\nhost: x\r\n\r\nGET /three HTT\x01P/9\r\n\r\n")
        .await
        .expect("write");
    let mut all = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut all))
        .await
        .expect("closes in time");
    let all = String::from_utf8_lossy(&all);
    let one = all.find("GET /one").expect("first answered");
    let two = all.find("GET /two").expect("second answered");
    let bad = all.find("HTTP/1.1 400").expect("400 for the malformed one");
    assert!(one < two && two < bad, "{all}");

    // Another connection is unaffected.
    let (status, _, _) = get(&client(), &p.url("/after")).await;
    assert_eq!(status, 200);

    // Headers over the 64 KiB limit: 431.
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    let big = "a".repeat(100 * 1024);
    let req = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
}

#[tokio::test]
async fn no_endpoints_on_an_open_connection_gives_503() {
    let b = ok_backend("a").await;
    let p = Proxy::start(service("gone", &[b.addr], Mode::Http, &[])).await;
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let first = read_whole_response(&mut s).await;
    assert!(first.starts_with("http/1.1 200"), "{first}");
    // The service loses its endpoints while the connection is open.
    p.publish(service("gone", &[], Mode::Http, &[]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let second = read_whole_response(&mut s).await;
    assert!(second.starts_with("http/1.1 503"), "{second}");
    assert!(
        second.contains("x-lightpath-error: no-endpoints"),
        "{second}"
    );
    assert!(second.contains("no endpoints"), "{second}");
}
