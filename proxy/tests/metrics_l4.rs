//! Real scrapes after real traffic: connections relayed by the L4 server on
//! loopback (the listener's own address is the frontend key, so no root is
//! needed), then `/metrics` from both the admin API and the metrics-only
//! listener parsed with an independent Prometheus parser, and the counters
//! compared with what the clients sent.

mod admin_util;
mod support {
    pub mod loopback;
    pub mod scrape;
}

use std::collections::BTreeMap;
use std::net::SocketAddr;

use admin_util::*;
use control::{Affinity, Mode, ServicePortName};
use support::loopback::service_port;
use support::scrape::{scrape, scrape_until, Rig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo backend on an ephemeral loopback port.
async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `n` bytes, half-closes, reads the echo to EOF; returns bytes read.
async fn echo_through(frontend: SocketAddr, n: usize) -> usize {
    let mut s = TcpStream::connect(frontend).await.unwrap();
    let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, payload, "echo mismatch");
    back.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_the_traffic_sent() {
    let b1 = echo_backend().await;
    let b2 = echo_backend().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // closed again: connecting to it is refused

    let name = ServicePortName::new("metrics-l4", "echo", "tcp");
    let dead_name = ServicePortName::new("metrics-l4", "dead", "");
    let stream_name = ServicePortName::new("metrics-l4", "stream", "tcp");
    let l4 = |name: &ServicePortName, eps: &[SocketAddr]| {
        service_port(name.clone(), Mode::L4, Affinity::None, eps, BTreeMap::new())
    };
    let rig = Rig::start(
        3,
        |a| {
            vec![
                (a[0], l4(&name, &[b1, b2])),
                (a[1], l4(&dead_name, &[dead])),
                (a[2], l4(&stream_name, &[b1])),
            ]
        },
        serde_json::json!({"test": "metrics_l4"}),
    )
    .await;
    let (frontend, dead_frontend) = (rig.served.addrs[0], rig.served.addrs[1]);
    let (admin, metrics) = (rig.admin_addr(), rig.metrics_addr());

    // 20 connections of different sizes, 4 at a time.
    const CONNS: usize = 20;
    let sizes: Vec<usize> = (0..CONNS).map(|i| 1000 + 997 * i).collect();
    let total: usize = sizes.iter().sum();
    let mut echoed = 0;
    for chunk in sizes.chunks(4) {
        let jobs: Vec<_> = chunk
            .iter()
            .map(|&n| tokio::spawn(echo_through(frontend, n)))
            .collect();
        for j in jobs {
            echoed += tokio::time::timeout(DEADLINE, j).await.unwrap().unwrap();
        }
    }
    assert_eq!(echoed, total);

    // One connection to the service whose only endpoint refuses: reset.
    // On loopback the reset can arrive before connect() even returns.
    if let Ok(mut s) = TcpStream::connect(dead_frontend).await {
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "dead service answered: {r:?}");
    }

    // Connection tasks finish (and count "closed") just after the clients
    // see EOF; wait for the counters to settle.
    let labels = [
        ("namespace", "metrics-l4"),
        ("service", "echo"),
        ("port", "tcp"),
    ];
    let closed = |s: &_| {
        let closed = "lightpath_tcp_connections_closed_total";
        (
            sample(s, closed, &labels),
            sample(s, closed, &[("service", "dead")]),
        )
    };
    let scrape_admin = scrape_until(admin, closed, (Some(CONNS as f64), Some(1.0))).await;
    let scrape_metrics = scrape(metrics).await;

    for s in [&scrape_admin, &scrape_metrics] {
        let v = |m: &str| sample(s, m, &labels).unwrap_or_else(|| panic!("{m} missing"));
        assert_eq!(v("lightpath_tcp_connections_opened_total"), CONNS as f64);
        assert_eq!(v("lightpath_tcp_connections_closed_total"), CONNS as f64);
        assert_eq!(v("lightpath_tcp_connections_active"), 0.0);
        assert_eq!(v("lightpath_tcp_connections_failed_total"), 0.0);
        assert_eq!(v("lightpath_tcp_received_bytes_total"), total as f64);
        assert_eq!(v("lightpath_tcp_sent_bytes_total"), total as f64);
        assert_eq!(v("lightpath_upstream_connect_failures_total"), 0.0);
        // Histogram: one observation per connection.
        assert_eq!(
            v("lightpath_upstream_connect_duration_seconds"),
            CONNS as f64
        );
        assert_eq!(
            sample(
                s,
                "lightpath_upstream_connect_duration_seconds_count",
                &labels
            ),
            Some(CONNS as f64)
        );

        let d = [("service", "dead")];
        assert_eq!(
            sample(s, "lightpath_tcp_connections_opened_total", &d),
            Some(1.0)
        );
        assert_eq!(
            sample(s, "lightpath_tcp_connections_failed_total", &d),
            Some(1.0)
        );
        assert!(sample(s, "lightpath_upstream_connect_failures_total", &d).unwrap() >= 1.0);

        // Node gauges.
        assert!(sample(s, "lightpath_table_frontends", &[]).unwrap() >= 2.0);
        assert!(sample(s, "lightpath_process_open_fds", &[]).unwrap() > 0.0);
        assert!(sample(s, "lightpath_process_resident_memory_bytes", &[]).unwrap() > 0.0);
        assert_eq!(sample(s, "lightpath_tokio_workers", &[]), Some(2.0));
    }

    // Every series of this service carries exactly the bounded label set.
    for smp in scrape_admin
        .samples
        .iter()
        .filter(|s| s.labels.get("service") == Some("echo"))
    {
        let mut keys: Vec<&str> = ["namespace", "service", "port", "class"]
            .into_iter()
            .filter(|k| smp.labels.get(k).is_some())
            .collect();
        keys.sort();
        assert!(
            keys == ["namespace", "port", "service"]
                || keys == ["class", "namespace", "port", "service"],
            "{}: unexpected labels {:?}",
            smp.metric,
            smp.labels
        );
    }

    // A long-lived connection's bytes show while it is open, in 64 KiB
    // steps, and exactly once it closed.
    let stream_frontend = rig.served.addrs[2];
    let st = [("service", "stream")];
    let bytes = |s: &_| {
        (
            sample(s, "lightpath_tcp_connections_active", &st),
            sample(s, "lightpath_tcp_received_bytes_total", &st),
            sample(s, "lightpath_tcp_sent_bytes_total", &st),
        )
    };
    const LONG: usize = 512 * 1024 + 100;
    let mut long = TcpStream::connect(stream_frontend).await.unwrap();
    let payload: Vec<u8> = (0..LONG).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; LONG];
    {
        let (mut r, mut w) = long.split();
        let (sent, read) = tokio::join!(w.write_all(&payload), r.read_exact(&mut back));
        sent.unwrap();
        read.unwrap();
    }
    assert_eq!(back, payload, "echo mismatch");
    let open = 512.0 * 1024.0;
    scrape_until(admin, bytes, (Some(1.0), Some(open), Some(open))).await;
    long.shutdown().await.unwrap();
    let mut rest = Vec::new();
    long.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let all = LONG as f64;
    scrape_until(admin, bytes, (Some(0.0), Some(all), Some(all))).await;

    // The metrics-only listener serves nothing else.
    assert_eq!(get(metrics, "/config_dump").await.status, 404);

    // /config_dump and /endpoints show the balancer's view of the same traffic.
    let dump = get(admin, "/config_dump").await.json();
    assert_eq!(dump["version"], 1);
    assert_eq!(dump["settings"]["test"], "metrics_l4");
    let echo = dump["balancers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["service"]["name"] == "echo")
        .expect("echo balancer in config_dump");
    let picks: u64 = echo["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["ewma_ms"].as_f64().unwrap() > 0.0, "{e}");
            assert!(e["cost"].as_f64().unwrap() > 0.0, "{e}");
            e["picks"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(picks, CONNS as u64);
    let r = get(admin, "/endpoints?service=metrics-l4/echo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v[0]["cluster_endpoints"].as_array().unwrap().len(), 2);
    assert_eq!(v[0]["balancer"].as_array().unwrap().len(), 2);

    // Ejection (as outlier detection does it) shows as a gauge, a counter
    // and in /config_dump; readmission undoes the gauge and counts too.
    let balancer = rig
        .served
        .server
        .balancers()
        .get(control::Family::V4, &name)
        .expect("echo balancer");
    // (endpoints ejected now, `counter` of the echo service)
    let ejected = |s: &prometheus_parse::Scrape, counter: &str| {
        (
            sample(s, "lightpath_endpoints", &[("state", "ejected")]),
            sample(s, counter, &labels),
        )
    };
    balancer.eject(b1).expect("eject one of two");
    let s = scrape(admin).await;
    let ejections = "lightpath_endpoint_ejections_total";
    assert_eq!(ejected(&s, ejections), (Some(1.0), Some(1.0)));
    let dump = get(admin, "/config_dump").await.json();
    assert_eq!(
        dump["ejections"][0]["addr"],
        b1.to_string(),
        "{}",
        dump["ejections"]
    );
    assert!(balancer.readmit(b1));
    let s = scrape(admin).await;
    let readmissions = "lightpath_endpoint_readmissions_total";
    assert_eq!(ejected(&s, readmissions), (Some(0.0), Some(1.0)));

    rig.shutdown().await;
}
