//! The metrics tests' rig and scrapes: the loopback server (`loopback.rs`)
//! with its admin API on ephemeral loopback ports, and `/metrics` read the
//! way Prometheus reads it (status, content type, strict parse), polled
//! until counters settle. One copy, so the L4 and L7 metrics tests set up
//! and read the exposition the same way. Sits next to `loopback` in the test
//! crate's `mod support` and uses the crate's `mod admin_util` (its HTTP
//! GET and Prometheus parser).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lightpath::admin::{self, AdminHandle, AdminState};
use lightpath::health::{ProxyHealth, DEFAULT_HEALTH_TIMEOUT};
use lightpath::lifecycle::Readiness;
use lightpath::server::ServerConfig;
use prometheus_parse::Scrape;

use super::loopback::{Rows, Served};
use crate::admin_util::{get, loopback_config, parse_prometheus, DEADLINE};

/// The content type of the Prometheus text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A server on loopback frontends and the admin API over the same table
/// and balancers (as `lightpath run` wires them).
pub struct Rig {
    pub served: Served,
    pub admin: AdminHandle,
}

impl Rig {
    /// Binds `n` loopback frontends serving `rows(addrs)` and starts the
    /// admin and metrics-only listeners, with `settings` as the settings
    /// `/config_dump` shows.
    pub async fn start(
        n: usize,
        rows: impl FnOnce(&[SocketAddr]) -> Rows,
        settings: serde_json::Value,
    ) -> Rig {
        let served = Served::start(n, ServerConfig::default(), rows).await;
        let mut state = AdminState::new(
            served.table.subscribe(),
            Readiness::new(),
            ProxyHealth::new(DEFAULT_HEALTH_TIMEOUT),
        );
        state.balancers = Some(served.server.balancers().clone());
        state.data_plane = Some(tokio::runtime::Handle::current());
        state.settings = settings;
        let admin = admin::spawn(loopback_config(), state).expect("admin spawn");
        Rig { served, admin }
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.admin_addr().expect("admin listener")
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.admin.metrics_addr().expect("metrics listener")
    }

    /// Drains the server (2 s grace), waits for it to stop, then stops the
    /// admin API.
    pub async fn shutdown(mut self) {
        self.served.drain(Duration::from_secs(2)).await;
        self.admin.shutdown();
    }
}

/// One scrape of `addr`'s `/metrics`: 200, the exposition content type,
/// and a body that parses strictly.
pub async fn scrape(addr: SocketAddr) -> Scrape {
    let r = get(addr, "/metrics").await;
    assert_eq!(r.status, 200, "GET http://{addr}/metrics: {}", r.body);
    assert_eq!(r.header("Content-Type"), Some(PROMETHEUS_TEXT));
    parse_prometheus(&r.body)
}

/// Scrapes `addr` every 20 ms until `view` of a scrape is `want`, and
/// returns that scrape. Connection tasks count themselves closed just after
/// their clients see EOF, so tests read counters once these have settled.
/// Fails the test after [`DEADLINE`] with the last view.
pub async fn scrape_until<T: PartialEq + std::fmt::Debug>(
    addr: SocketAddr,
    view: impl Fn(&Scrape) -> T,
    want: T,
) -> Scrape {
    let start = Instant::now();
    loop {
        let s = scrape(addr).await;
        let seen = view(&s);
        if seen == want {
            return s;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "http://{addr}/metrics never showed {want:?}; last {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
