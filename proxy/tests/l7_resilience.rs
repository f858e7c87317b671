//! L7 resilience end to end through real loopback sockets: retries and their
//! budget, non-idempotent requests, peak-EWMA steering, outlier ejection and
//! readmission, timeouts, circuit-breaker limits and ring-hash balancing.

mod l7_common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use control::Mode;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use l7_common::*;
use lightpath::balance::BalanceConfig;
use lightpath::server::ServerConfig;

fn status(code: u16, body: &'static str) -> Response<BBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(code).expect("status");
    r
}

/// Sends `n` requests built by `req`, `conc` at a time; returns status counts.
async fn load(
    c: &HttpClient,
    n: usize,
    conc: usize,
    req: impl Fn(usize) -> Request<BBody>,
) -> HashMap<u16, usize> {
    let mut counts = HashMap::new();
    let mut i = 0;
    while i < n {
        let mut batch = Vec::new();
        for _ in 0..conc.min(n - i) {
            let (c, r) = (c.clone(), req(i));
            i += 1;
            batch.push(tokio::spawn(async move { send(&c, r).await.0 }));
        }
        for t in batch {
            *counts.entry(t.await.expect("task")).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test]
async fn half_failing_backend_gets_gets_retried_posts_are_not() {
    // Every other request to this backend is a 503.
    let flaky_handler = |n: usize, _| async move {
        if n % 2 == 1 {
            status(503, "flaky")
        } else {
            status(200, "flaky-ok")
        }
    };
    let good = ok_backend("good").await;
    let flaky = Backend::start(flaky_handler).await;
    let p = Proxy::start(service("half", &[good.addr, flaky.addr], Mode::Http, &[])).await;
    let c = client();
    let url = p.url("/");
    let gets = load(&c, 300, 4, |_| {
        Request::get(url.as_str()).body(full("")).expect("req")
    })
    .await;
    assert_eq!(gets.get(&200), Some(&300), "GETs: {gets:?}");
    // At least one 503 was served and hidden by a retry (after it, p2c
    // steers away from the failing endpoint).
    assert!(
        flaky.requests() >= 2,
        "the flaky backend took part: {}",
        flaky.requests()
    );

    // POSTs to a service whose only endpoint is the flaky one: every 503
    // reaches the client, and the backend sees each POST exactly once.
    let only = Backend::start(flaky_handler).await;
    let p = Proxy::start(service("half-post", &[only.addr], Mode::Http, &[])).await;
    let url = p.url("/");
    let posts = load(&c, 100, 4, |_| {
        Request::post(url.as_str())
            .body(full("order"))
            .expect("req")
    })
    .await;
    assert_eq!(
        only.requests(),
        100,
        "each POST reached the backend exactly once: {posts:?}"
    );
    assert_eq!(posts.get(&503), Some(&50), "{posts:?}");
    assert_eq!(posts.get(&200), Some(&50), "{posts:?}");
}

#[tokio::test]
async fn retry_budget_stops_a_retry_storm() {
    let a = Backend::start(|_, _| async move { status(503, "a") }).await;
    let b = Backend::start(|_, _| async move { status(503, "b") }).await;
    // A 1/s reserve (10 over the 10 s window) plus 20 % of requests.
    let p = Proxy::start(service(
        "storm",
        &[a.addr, b.addr],
        Mode::Http,
        &[("lightpath.io/retry-budget-min-per-second", "1")],
    ))
    .await;
    let c = client();
    let url = p.url("/");
    let n = 200;
    let got = load(&c, n, 2, |_| {
        Request::get(url.as_str()).body(full("")).expect("req")
    })
    .await;
    // Clients see the backends' own 503s, not proxy errors.
    assert_eq!(got.get(&503), Some(&n), "{got:?}");
    let total = a.requests() + b.requests();
    let retries = total - n;
    // Without a budget: 2 retries each = 400. With it: ≤ 10 + 20 % of 200.
    assert!(
        retries <= 10 + n / 5 + 5,
        "retries {retries} exceed the budget"
    );
    assert!(retries >= 10, "some retries were made: {retries}");
}

#[tokio::test]
async fn slow_endpoint_gets_a_small_share_and_recovers() {
    let slow_on = Arc::new(AtomicBool::new(true));
    let s2 = slow_on.clone();
    let slow = Backend::start(move |_, _| {
        let slow = s2.load(Ordering::SeqCst);
        async move {
            if slow {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            status(200, "slow")
        }
    })
    .await;
    let f1 = ok_backend("f1").await;
    let f2 = ok_backend("f2").await;
    // A 1 s decay so the test sees the recovery within seconds (10 s in
    // production; the shape is the same).
    let cfg = ServerConfig {
        balance: BalanceConfig {
            decay: Duration::from_secs(1),
            ..BalanceConfig::default()
        },
        ..ServerConfig::default()
    };
    let p = Proxy::start_with(
        service("slow", &[slow.addr, f1.addr, f2.addr], Mode::Http, &[]),
        cfg,
    )
    .await;
    let c = client();
    let url = p.url("/");
    let req = |_| Request::get(url.as_str()).body(full("")).expect("req");
    let got = load(&c, 600, 6, req).await;
    assert_eq!(got.get(&200), Some(&600));
    let slow_share = slow.requests() as f64 / 600.0;
    assert!(
        slow_share < 0.12,
        "slow endpoint share {slow_share:.3} (fair share 0.33)"
    );

    slow_on.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = slow.requests();
    let got = load(&c, 600, 6, req).await;
    assert_eq!(got.get(&200), Some(&600));
    let share = (slow.requests() - before) as f64 / 600.0;
    // Fair is 0.33; loopback timing on a busy 2-core machine varies, so
    // the bar is "clearly recovered": well above its slow-phase share.
    assert!(
        share > 0.15 && share > 2.0 * slow_share,
        "recovered share {share:.3} vs {slow_share:.3} while slow (fair share 0.33)"
    );
}

#[tokio::test]
async fn killed_endpoint_is_ejected_without_client_errors_and_readmitted() {
    let a = ok_backend("a").await;
    let b = ok_backend("b").await;
    let victim = ok_backend("victim").await;
    let victim_addr = victim.addr;
    let cfg = ServerConfig {
        balance: BalanceConfig {
            decay: Duration::from_secs(1),
            ..BalanceConfig::default()
        },
        ..ServerConfig::default()
    };
    let svc = service(
        "kill",
        &[a.addr, b.addr, victim_addr],
        Mode::Http,
        &[
            ("lightpath.io/ejection-consecutive-failures", "2"),
            ("lightpath.io/ejection-base-time", "2s"),
        ],
    );
    let name = svc.name.clone();
    let p = Proxy::start_with(svc, cfg).await;
    let c = client();
    let url = p.url("/");
    let req = |_| Request::get(url.as_str()).body(full("")).expect("req");
    let got = load(&c, 60, 3, req).await;
    assert_eq!(got.get(&200), Some(&60));
    assert!(victim.requests() > 0);

    victim.kill();
    drop(victim);
    let bal = p
        .server
        .balancers()
        .get(control::Family::V4, &name)
        .expect("balancer");
    let backend = bal.backend(victim_addr).expect("victim backend");
    // Traffic continues without errors until the victim is ejected.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut sent = 0;
    while backend.is_ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "victim never ejected"
        );
        let got = load(&c, 20, 3, req).await;
        assert_eq!(got.get(&200), Some(&20), "GETs failed: {got:?}");
        sent += 20;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(backend.ejections() >= 1);
    assert!(sent > 0);

    // Healthy again on the same address: readmitted after the ejection
    // time, and takes traffic.
    let back = Backend::start_on(victim_addr, |_, _| async move { status(200, "back") }).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while back.requests() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "victim never readmitted"
        );
        let got = load(&c, 20, 3, req).await;
        assert_eq!(got.get(&200), Some(&20), "GETs failed: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(backend.is_ready());
}

#[tokio::test]
async fn timeouts_give_504_and_streams_are_not_cut_by_default() {
    let slow = Backend::start(|_, req| async move {
        if req.uri().path() == "/stream" {
            // A long-poll style response: 15 chunks over 1.5 s.
            let s = futures::stream::unfold(0u32, |i| async move {
                if i == 15 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(
                        "tick\n",
                    ))),
                    i + 1,
                ))
            });
            return Response::new(BodyExt::boxed(StreamBody::new(s)));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        status(200, "late")
    })
    .await;
    let per_try = Proxy::start(service(
        "pertry",
        &[slow.addr],
        Mode::Http,
        &[
            ("lightpath.io/per-try-timeout", "200ms"),
            ("lightpath.io/max-attempts", "1"),
        ],
    ))
    .await;
    let (code, h, body) = get(&client(), &per_try.url("/")).await;
    assert_eq!(code, 504, "{body:?}");
    assert_eq!(h["x-lightpath-error"], "per-try-timeout");

    let whole = Proxy::start(service(
        "whole",
        &[slow.addr],
        Mode::Http,
        &[("lightpath.io/request-timeout", "300ms")],
    ))
    .await;
    let started = tokio::time::Instant::now();
    let (code, h, _) = get(&client(), &whole.url("/")).await;
    assert_eq!(code, 504);
    assert_eq!(h["x-lightpath-error"], "request-timeout");
    assert!(started.elapsed() < Duration::from_secs(1));

    // Default settings: no response timeout, a slow stream completes.
    let dflt = Proxy::start(service("dflt", &[slow.addr], Mode::Http, &[])).await;
    let (code, _, body) = get(&client(), &dflt.url("/stream")).await;
    assert_eq!(code, 200);
    assert_eq!(body.len(), 15 * 5);
}

#[tokio::test]
async fn limits_overflow_with_503_and_connect_failure_gives_502() {
    let slow = Backend::start(|_, _| async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        status(200, "ok")
    })
    .await;
    let p = Proxy::start(service(
        "limits",
        &[slow.addr],
        Mode::Http,
        &[("lightpath.io/max-requests", "2")],
    ))
    .await;
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (c, url) = (c.clone(), p.url("/"));
        tasks.push(tokio::spawn(async move {
            send(&c, Request::get(url).body(full("")).expect("req")).await
        }));
    }
    let mut ok = 0;
    let mut overflow = 0;
    for t in tasks {
        let (code, h, _) = t.await.expect("task");
        match code {
            200 => ok += 1,
            503 => {
                assert_eq!(h["x-lightpath-overflow"], "true");
                overflow += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, overflow), (2, 4), "no queueing past the limit");

    // Nothing listens on the endpoint: 502 after the attempts.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let p = Proxy::start(service("dead", &[dead], Mode::Http, &[])).await;
    let (code, h, body) = get(&client(), &p.url("/")).await;
    assert_eq!(code, 502, "{body:?}");
    assert_eq!(h["x-lightpath-error"], "connect-failed");
}

#[tokio::test]
async fn ring_hash_is_sticky_and_moves_about_one_nth_on_add() {
    let ids = ["r0", "r1", "r2", "r3"];
    let mut backends = Vec::new();
    for id in ids {
        backends.push(ok_backend(id).await);
    }
    let annotations = [
        ("lightpath.io/balance", "ring-hash"),
        ("lightpath.io/hash-on", "header:x-user"),
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let p = Proxy::start(service("ring", &addrs[..3], Mode::Http, &annotations)).await;
    let c = client();
    let url = p.url("/");
    let users = 200;
    let owner = |user: usize| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let req = Request::get(url)
                .header("x-user", format!("user-{user}"))
                .body(full(""))
                .expect("req");
            let (code, _, body) = send(&c, req).await;
            assert_eq!(code, 200);
            body
        }
    };
    let mut first = Vec::new();
    for u in 0..users {
        let a = owner(u).await;
        for _ in 0..3 {
            assert_eq!(owner(u).await, a, "user {u} moved without a change");
        }
        first.push(a);
    }
    p.publish(service("ring", &addrs, Mode::Http, &annotations));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut moved = 0;
    for (u, before) in first.iter().enumerate() {
        let now = owner(u).await;
        if now != *before {
            assert_eq!(now.as_ref(), b"r3", "keys only move to the new endpoint");
            moved += 1;
        }
    }
    let share = moved as f64 / users as f64;
    assert!(
        (0.1..0.45).contains(&share),
        "moved {share:.2}, expected about 1/4"
    );
}

#[tokio::test]
async fn retried_request_reports_attempts() {
    // The first endpoint tried refuses connections; the request succeeds on
    // the other one and says it took two attempts.
    let hits = Arc::new(AtomicU64::new(0));
    let h2 = hits.clone();
    let ok = Backend::start(move |_, _| {
        h2.fetch_add(1, Ordering::SeqCst);
        async move { status(200, "ok") }
    })
    .await;
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let c = client();
    let mut saw_two = false;
    // A fresh proxy per trial: its first pick is a coin flip between the two
    // (equal default RTT); after a failure p2c avoids the dead one.
    for _ in 0..20 {
        let p = Proxy::start(service("attempts", &[dead, ok.addr], Mode::Http, &[])).await;
        // A POST: a connect failure means it was never sent, so it is retried.
        let (code, h, _) = send(&c, Request::post(p.url("/")).body(full("x")).expect("req")).await;
        assert_eq!(code, 200);
        saw_two |= h["x-lightpath-attempts"] == "2";
    }
    assert!(saw_two, "some request went to the dead endpoint first");
    assert_eq!(hits.load(Ordering::SeqCst), 20);
}

#[tokio::test]
async fn active_health_check_takes_a_failing_endpoint_out_before_requests() {
    let served = Arc::new(AtomicU64::new(0));
    let healthy = Arc::new(AtomicBool::new(false));
    let (s2, h2) = (served.clone(), healthy.clone());
    // Accepts connections, but its health endpoint fails and so would
    // every request.
    let sick = Backend::start(move |_, req| {
        let (served, healthy) = (s2.clone(), h2.load(Ordering::SeqCst));
        async move {
            if req.uri().path() == "/healthz" {
                return status(if healthy { 200 } else { 503 }, "health");
            }
            served.fetch_add(1, Ordering::SeqCst);
            status(if healthy { 200 } else { 500 }, "sick")
        }
    })
    .await;
    let a = ok_backend("a").await;
    let b = ok_backend("b").await;
    let svc = service(
        "health",
        &[a.addr, b.addr, sick.addr],
        Mode::Http,
        &[
            ("lightpath.io/health-check", "http:/healthz"),
            ("lightpath.io/health-check-interval", "100ms"),
        ],
    );
    let name = svc.name.clone();
    let p = Proxy::start(svc).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let backend = loop {
        if let Some(bal) = p.server.balancers().get(control::Family::V4, &name) {
            if let Some(b) = bal.backend(sick.addr) {
                if !b.is_ready() {
                    break b;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health check never took the endpoint out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // No client request ever reaches the sick endpoint.
    let c = client();
    let url = p.url("/");
    let got = load(&c, 100, 4, |_| {
        Request::get(url.as_str()).body(full("")).expect("req")
    })
    .await;
    assert_eq!(got.get(&200), Some(&100), "{got:?}");
    assert_eq!(
        served.load(Ordering::SeqCst),
        0,
        "requests reached the failing endpoint"
    );

    // Healthy again: the next passing check readmits it.
    healthy.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !backend.is_ready() {
        assert!(tokio::time::Instant::now() < deadline, "never readmitted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An h2c endpoint that refuses every stream with RST_STREAM(REFUSED_STREAM)
/// (what a server at its stream limit or shutting down does); counts them.
async fn refusing_h2_backend(refused: Arc<AtomicU64>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let refused = refused.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    refused.fetch_add(1, Ordering::SeqCst);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn h2_refused_stream_is_retried_on_another_endpoint_even_for_post() {
    let refused = Arc::new(AtomicU64::new(0));
    let (refuser, task) = refusing_h2_backend(refused.clone()).await;
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    let ok = Backend::start(move |_, req: Request<hyper::body::Incoming>| {
        let s2 = s2.clone();
        async move {
            // The POST body arrives whole at the endpoint that processes it.
            let body = req.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"order-42");
            s2.fetch_add(1, Ordering::SeqCst);
            status(200, "ok")
        }
    })
    .await;
    let c = client();
    let mut trials = 0u64;
    let mut saw_two = 0;
    // A fresh proxy per trial: the first pick is a coin flip between the two
    // (equal default RTT); after a refusal p2c avoids the refuser.
    while refused.load(Ordering::SeqCst) < 3 && trials < 40 {
        trials += 1;
        let p = Proxy::start(service("refused", &[refuser, ok.addr], Mode::H2c, &[])).await;
        let req = Request::post(p.url("/order"))
            .body(full("order-42"))
            .expect("req");
        let (code, h, body) = send(&c, req).await;
        assert_eq!(code, 200, "{body:?}");
        if h["x-lightpath-attempts"] == "2" {
            saw_two += 1;
        }
    }
    let refused = refused.load(Ordering::SeqCst);
    assert!(refused >= 3, "the refuser got only {refused} streams");
    assert_eq!(saw_two, refused, "every refused POST was retried once");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        trials,
        "each POST processed once"
    );
    task.abort();
}

#[tokio::test]
async fn empty_endpoint_set_queues_requests_until_the_deadline() {
    let a = ok_backend("a").await;
    let ann = [
        ("lightpath.io/queue-capacity", "2"),
        ("lightpath.io/queue-timeout", "3s"),
    ];
    let p = Proxy::start(service("queue", &[a.addr], Mode::Http, &ann)).await;
    // One HTTP/2 connection, opened while the service had an endpoint (a
    // new connection to a service without endpoints is refused at L4).
    let c = h2_client();
    let (code, _, _) = get(&c, &p.url("/")).await;
    assert_eq!(code, 200);

    // The set empties: 5 concurrent requests; 2 wait, 3 overflow at once.
    p.publish(service("queue", &[], Mode::Http, &ann));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let (c, url) = (c.clone(), p.url("/"));
        tasks.push(tokio::spawn(async move {
            let r = send(&c, Request::get(url).body(full("")).expect("req")).await;
            (r, started.elapsed())
        }));
    }
    // The overflowed ones are answered before any endpoint appears.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b = ok_backend("b").await;
    let published = started.elapsed();
    p.publish(service("queue", &[b.addr], Mode::Http, &ann));
    let (mut ok, mut overflow) = (0, 0);
    for t in tasks {
        let ((code, h, body), took) = t.await.expect("task");
        match code {
            200 => {
                assert_eq!(&body[..], b"b");
                assert!(took >= published, "served after the update");
                ok += 1;
            }
            503 => {
                assert_eq!(h["x-lightpath-overflow"], "true", "{body:?}");
                assert!(took < published, "overflow at once: {took:?}");
                overflow += 1;
            }
            other => panic!("unexpected {other}: {body:?}"),
        }
    }
    assert_eq!((ok, overflow), (2, 3));

    // Nobody shows up: 503 after the queue timeout, saying why.
    let short = [("lightpath.io/queue-timeout", "300ms")];
    p.publish(service("queue", &[], Mode::Http, &short));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = tokio::time::Instant::now();
    let (code, h, body) = get(&c, &p.url("/")).await;
    let took = t0.elapsed();
    assert_eq!(code, 503);
    assert_eq!(h["x-lightpath-error"], "no-endpoints");
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("within 300ms (fail-fast)"), "{text}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn max_retries_limit_overflows_retries_not_requests() {
    // Both endpoints answer 503 to the first request each gets, slowly, so
    // two requests are in their retries at the same time.
    let slow_503 = |n: usize, _| async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if n == 0 {
            status(503, "first")
        } else {
            status(200, "ok")
        }
    };
    let a = Backend::start(slow_503).await;
    let b = Backend::start(slow_503).await;
    let p = Proxy::start(service(
        "retry-limit",
        &[a.addr, b.addr],
        Mode::Http,
        &[("lightpath.io/max-retries", "0")],
    ))
    .await;
    let c = client();
    // No retry slot at all: each request gets its first answer, retried or
    // not, and never a proxy error.
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (c, url) = (c.clone(), p.url("/"));
        tasks.push(tokio::spawn(async move {
            send(&c, Request::get(url).body(full("")).expect("req")).await
        }));
    }
    for t in tasks {
        let (code, h, body) = t.await.expect("task");
        assert_eq!(h["x-lightpath-attempts"], "1", "{code} {body:?}");
        assert!(!h.contains_key("x-lightpath-error"), "{h:?}");
        if code == 503 {
            assert_eq!(&body[..], b"first", "the endpoint's own 503");
        }
    }
    assert_eq!(a.requests() + b.requests(), 2, "no retry was sent");

    // With the default limit the same first 503 is retried on the other
    // endpoint, which (slowly) answers 200.
    let a2 = Backend::start(slow_503).await;
    let b2 = Backend::start(move |n, r| async move {
        if n == 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let _ = r;
        status(200, "ok")
    })
    .await;
    let d = Proxy::start(service(
        "retry-default",
        &[a2.addr, b2.addr],
        Mode::Http,
        &[],
    ))
    .await;
    let mut retried = false;
    for _ in 0..10 {
        let (code, h, _) = get(&c, &d.url("/")).await;
        assert_eq!(code, 200);
        retried |= h["x-lightpath-attempts"] == "2";
        if a2.requests() > 0 {
            break;
        }
    }
    assert!(a2.requests() > 0, "a2 was never picked");
    assert!(retried, "a2's 503 was retried on b2");
}

/// Idle upstream connections are closed once `upstream-idle-timeout` has
/// passed, though no request comes to the service any more: the periodic
/// sweep closes them, not the service's next request.
#[tokio::test]
async fn idle_upstream_connections_close_after_the_idle_timeout_without_traffic() {
    idle_connections_close(Mode::Http, "idle").await;
}

/// The same for HTTP/2 (h2c) endpoints: the multiplexed connection per
/// endpoint and data thread (one here: the test proxy runs on the test's
/// one thread) is let go once no request started on it for the idle timeout.
#[tokio::test]
async fn idle_http2_upstream_connections_close_after_the_idle_timeout_without_traffic() {
    idle_connections_close(Mode::H2c, "idle-h2").await;
}

/// 8 requests (4 at a time) to one endpoint over `mode`, then none: every
/// upstream connection closes after the 1 s idle timeout, not before, and
/// the next request opens a new connection.
async fn idle_connections_close(mode: Mode, name: &str) {
    let b = ok_backend("b").await;
    let p = Proxy::start(service(
        name,
        &[b.addr],
        mode,
        &[("lightpath.io/upstream-idle-timeout", "1s")],
    ))
    .await;
    let c = client();
    let url = p.url("/");
    let req = |_| Request::get(url.as_str()).body(full("")).expect("req");
    let got = load(&c, 8, 4, req).await;
    assert_eq!(got.get(&200), Some(&8), "{got:?}");
    assert!(b.open() >= 1, "the pooled connections are open at first");
    if mode == Mode::H2c {
        assert_eq!(b.open(), 1, "one multiplexed connection per thread");
    }
    let quiet = b
        .all_closed(&format!(
            "idle {mode:?} upstream connection(s), no request since"
        ))
        .await;
    assert!(
        quiet >= Duration::from_millis(700),
        "closed after {quiet:?}, before the idle timeout"
    );
    let before = b.connections.load(Ordering::SeqCst);
    let (code, _, _) = get(&c, &url).await;
    assert_eq!(code, 200);
    assert_eq!(b.connections.load(Ordering::SeqCst), before + 1);
}

/// An idle connection never makes a request fail with "overflow": with
/// `max-connections` 2, the idle connection pooled to an ejected endpoint
/// holds a slot, and two concurrent requests to the healthy endpoint need
/// both. It is closed to make room, and both are answered. (A POST's 503 is
/// not retried but passed on, so its connection goes back to the pool.)
#[tokio::test]
async fn idle_connections_of_an_ejected_endpoint_do_not_overflow_max_connections() {
    let sick = Backend::start(|_, _| async move { status(503, "sick") }).await;
    let slow = Backend::start(|_, _| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        status(200, "ok")
    })
    .await;
    let svc = service(
        "room",
        &[sick.addr, slow.addr],
        Mode::Http,
        &[
            ("lightpath.io/max-connections", "2"),
            ("lightpath.io/ejection-consecutive-failures", "1"),
            ("lightpath.io/ejection-base-time", "60s"),
        ],
    );
    let name = svc.name.clone();
    let p = Proxy::start(svc).await;
    let c = client();
    let url = p.url("/");
    let bal = p
        .server
        .balancers()
        .get(control::Family::V4, &name)
        .expect("balancer");
    let sick_backend = bal.backend(sick.addr).expect("sick backend");
    // One POST at a time until the sick endpoint is ejected.
    let mut sent = 0;
    while sick_backend.is_ready() {
        assert!(sent < 50, "the sick endpoint was never ejected");
        let post = Request::post(url.as_str()).body(full("x")).expect("req");
        let (code, _, _) = send(&c, post).await;
        assert!(code == 200 || code == 503, "{code}");
        sent += 1;
    }
    assert_eq!(sick.open(), 1, "its idle connection is pooled");
    assert!(slow.open() <= 1, "{}", slow.open());
    let req = |_| Request::get(url.as_str()).body(full("")).expect("req");
    let got = load(&c, 2, 2, req).await;
    assert_eq!(got.get(&200), Some(&2), "{got:?}");
    assert_eq!(slow.open(), 2);
    sick.all_closed("idle connection(s) to the ejected endpoint")
        .await;
}

/// After an annotation change, a client connection that stays idle keeps
/// the service's previous L7 state until its next request, and with it that
/// state's pooled upstream connections: those are still closed once their
/// idle timeout passes, and the client connection's next request is served
/// with the new state.
#[tokio::test]
async fn idle_upstream_connections_of_a_replaced_state_still_close() {
    let b = ok_backend("b").await;
    let idle = ("lightpath.io/upstream-idle-timeout", "1s");
    let p = Proxy::start(service("retire", &[b.addr], Mode::Http, &[idle])).await;
    let mut s = tokio::net::TcpStream::connect(p.addr)
        .await
        .expect("connect");
    let mut buf = Vec::new();
    // One keep-alive GET on the held client connection, answered by `b`.
    async fn get_b(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
        let get = b"GET / HTTP/1.1\r\nhost: retire\r\n\r\n";
        tokio::io::AsyncWriteExt::write_all(s, get)
            .await
            .expect("write");
        let (head, body) = read_response(s, buf).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, "b");
    }
    get_b(&mut s, &mut buf).await;
    assert_eq!(b.open(), 1, "the upstream connection is pooled");

    // New annotations: a new L7 state. The client connection stays idle.
    p.publish(service(
        "retire",
        &[b.addr],
        Mode::Http,
        &[idle, ("lightpath.io/max-connections", "100")],
    ));
    b.all_closed("idle upstream connection(s) of the replaced state")
        .await;

    get_b(&mut s, &mut buf).await;
    assert_eq!(b.connections.load(Ordering::SeqCst), 2);

    // The service leaves the table; the client connection stays open and
    // idle, and the state it holds still has its upstream connection
    // closed on time.
    Served::publish(&p, Vec::new());
    b.all_closed("idle upstream connection(s) of the removed service")
        .await;
}
