//! Probes over real loopback HTTP: kube-proxy's health-check node port for
//! eTP=Local services, kube-proxy's `/healthz` `/livez`, and readiness
//! (`/ready` on the admin API, `/readyz` on the health server).

mod admin_util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use admin_util::*;
use control::{EndpointState, FrontendKind};
use lightpath::admin::{self, AdminState};
use lightpath::health::{IpFamily, ProxyHealth, DEFAULT_HEALTH_TIMEOUT};
use lightpath::lifecycle::Readiness;

/// Polls `path` until `want(reply)` or the deadline.
async fn until(addr: SocketAddr, path: &str, want: impl Fn(&Reply) -> bool) -> Reply {
    let start = Instant::now();
    loop {
        let r = get(addr, path).await;
        if want(&r) {
            return r;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "GET {path} never matched; last: {} {}",
            r.status,
            r.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects until the port accepts (the listener opens after a table sync).
async fn wait_listening(addr: SocketAddr) {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(start.elapsed() < DEADLINE, "{addr} never started listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_node_port_follows_local_ready_endpoints() {
    let hc_port = free_port();
    let hc: SocketAddr = format!("127.0.0.1:{hc_port}").parse().unwrap();
    let name = spn("shop", "front", "http");
    let fe: SocketAddr = "10.96.7.7:80".parse().unwrap();
    let a: SocketAddr = "10.244.0.10:8080".parse().unwrap();
    let b: SocketAddr = "10.244.0.11:8080".parse().unwrap();
    let remote: SocketAddr = "10.244.9.9:8080".parse().unwrap();
    let with_local = |version, local: Vec<control::Endpoint>| {
        table(
            version,
            vec![(
                fe,
                FrontendKind::LoadBalancer,
                service_port(
                    name.clone(),
                    vec![ep(remote, EndpointState::Ready)],
                    local,
                    Some(hc_port),
                ),
            )],
        )
    };

    // Two local ready endpoints.
    let (tx, rx) = tokio::sync::watch::channel(with_local(
        1,
        vec![ep(a, EndpointState::Ready), ep(b, EndpointState::Ready)],
    ));
    let health = ProxyHealth::new(DEFAULT_HEALTH_TIMEOUT);
    let srv = admin::spawn(
        loopback_config(),
        AdminState::new(rx, Readiness::new(), health.clone()),
    )
    .expect("admin spawn");
    wait_listening(hc).await;

    let r = get(hc, "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(r.header("X-Load-Balancing-Endpoint-Weight"), Some("2"));
    // kube-proxy's exact body.
    assert_eq!(
        r.body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"front\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
    );
    // Any path answers, as kube-proxy's per-service handler does.
    assert_eq!(get(hc, "/anything").await.status, 200);

    // Only a serving-but-terminating local endpoint: 503, zero endpoints
    // (the model keeps it in local_endpoints as the fallback; the health
    // check must not count it, so the load balancer drains the node).
    tx.send(with_local(
        2,
        vec![ep(a, EndpointState::ServingTerminating)],
    ))
    .unwrap();
    let r = until(hc, "/", |r| r.status == 503).await;
    let v = r.json();
    assert_eq!(v["localEndpoints"], 0);
    assert_eq!(v["serviceProxyHealthy"], true);
    assert_eq!(v["service"]["namespace"], "shop");
    assert_eq!(r.header("X-Load-Balancing-Endpoint-Weight"), Some("0"));

    // No local endpoints at all: 503.
    tx.send(with_local(3, vec![])).unwrap();
    let r = until(hc, "/", |r| r.status == 503).await;
    assert_eq!(r.json()["localEndpoints"], 0);

    // Back to one ready endpoint (two ports of one pod count once: by IP).
    tx.send(with_local(4, vec![ep(a, EndpointState::Ready)]))
        .unwrap();
    let r = until(hc, "/", |r| r.status == 200).await;
    assert_eq!(r.json()["localEndpoints"], 1);

    // Proxy unhealthy (an update queued past the timeout): 503 although
    // endpoints are ready, and the body says why.
    let unhealthy = ProxyHealth::new(Duration::from_millis(1));
    drop(srv);
    let (tx2, rx2) = tokio::sync::watch::channel(with_local(5, vec![ep(a, EndpointState::Ready)]));
    let srv = admin::spawn(
        loopback_config(),
        AdminState::new(rx2, Readiness::new(), unhealthy.clone()),
    )
    .expect("admin spawn");
    unhealthy.updated(IpFamily::IPv4);
    unhealthy.queued_update(IpFamily::IPv4);
    tokio::time::sleep(Duration::from_millis(5)).await;
    wait_listening(hc).await;
    let r = get(hc, "/").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["serviceProxyHealthy"], false);
    assert_eq!(r.json()["localEndpoints"], 1);

    // The service loses its health-check port: the listener closes.
    tx2.send(table(6, vec![])).unwrap();
    let start = Instant::now();
    while tokio::net::TcpStream::connect(hc).await.is_ok() {
        assert!(start.elapsed() < DEADLINE, "health-check port stayed open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(srv);
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_says_what_it_waits_for_and_turns_false_on_drain() {
    let (_tx, rx) = tokio::sync::watch::channel(table(1, vec![]));
    let readiness = Readiness::new();
    let table_guard = readiness.register_task("initial table");
    let rules_guard = readiness.register_task("redirect rules");
    let srv = admin::spawn(
        loopback_config(),
        AdminState::new(
            rx,
            readiness.clone(),
            ProxyHealth::new(DEFAULT_HEALTH_TIMEOUT),
        ),
    )
    .expect("admin spawn");
    let admin = srv.admin_addr().unwrap();
    let health = srv.health_addr().unwrap();

    let r = get(admin, "/ready").await;
    assert_eq!(r.status, 503);
    let v = r.json();
    assert_eq!(v["ready"], false);
    assert_eq!(
        v["waiting_for"],
        serde_json::json!(["initial table", "redirect rules"])
    );
    // The health server's /readyz says the same.
    let r = get(health, "/readyz").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["waiting_for"][0], "initial table");

    drop(table_guard);
    let r = get(admin, "/ready").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.json()["waiting_for"],
        serde_json::json!(["redirect rules"])
    );

    drop(rules_guard);
    let r = get(admin, "/ready").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["waiting_for"], serde_json::json!([]));
    assert_eq!(get(health, "/readyz").await.status, 200);

    // SIGTERM's effect: not ready at once, saying it is draining; liveness
    // is unaffected (the process must not be restarted mid-drain).
    readiness.start_draining();
    let r = get(admin, "/ready").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["draining"], true);
    assert_eq!(get(health, "/readyz").await.status, 503);
    assert_eq!(get(health, "/livez").await.status, 200);
    assert_eq!(get(admin, "/livez").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_proxy_healthz_and_livez() {
    let (_tx, rx) = tokio::sync::watch::channel(table(1, vec![]));
    let health = ProxyHealth::new(Duration::from_millis(200));
    let srv = admin::spawn(
        loopback_config(),
        AdminState::new(rx, Readiness::new(), health.clone()),
    )
    .expect("admin spawn");
    let addr = srv.health_addr().unwrap();

    // Starting up: healthy, lastUpdated is Go's zero time... reported as now
    // because kube-proxy rewrites it on a healthy answer.
    let r = get(addr, "/healthz").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
    let v = r.json();
    assert_eq!(v["healthy"], true);
    assert_eq!(v["nodeEligible"], true);
    assert_eq!(v["lastUpdated"], v["currentTime"]);
    assert!(v.get("status").is_none(), "no proxier synced yet: {v}");
    // /livez never carries nodeEligible.
    let v = get(addr, "/livez").await.json();
    assert!(v.get("nodeEligible").is_none(), "{v}");

    health.updated_all();
    let v = get(addr, "/healthz").await.json();
    assert_eq!(v["status"]["IPv4"]["healthy"], true);
    assert_eq!(v["status"]["IPv6"]["healthy"], true);

    // An update queued and not applied within the timeout: unhealthy on both.
    health.queued_update(IpFamily::IPv6);
    let r = until(addr, "/livez", |r| r.status == 503).await;
    let v = r.json();
    assert_eq!(v["healthy"], false);
    assert_eq!(v["status"]["IPv6"]["healthy"], false);
    assert_eq!(v["status"]["IPv4"]["healthy"], true);
    // An unhealthy answer reports the real last update, not now.
    assert_ne!(v["lastUpdated"], v["currentTime"]);
    assert_eq!(get(addr, "/healthz").await.status, 503);

    health.updated(IpFamily::IPv6);
    assert_eq!(get(addr, "/healthz").await.status, 200);

    // The node is going away: /healthz fails (load balancers drain the
    // node), /livez stays healthy (the kubelet must not restart us).
    health.set_node_eligible(false);
    let r = get(addr, "/healthz").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["nodeEligible"], false);
    assert_eq!(get(addr, "/livez").await.status, 200);

    assert_eq!(get(addr, "/nope").await.status, 404);
}
