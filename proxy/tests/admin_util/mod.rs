//! Shared helpers for the admin/metrics/health tests: a plain HTTP/1.1 GET
//! over loopback, strict Prometheus parsing, and model builders.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control::{
    Endpoint, EndpointState, Frontend, FrontendKind, Mode, Protocol, ServicePort, ServicePortName,
    Table,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every wait in these tests is bounded by this.
pub const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}):\n{}", self.body))
    }
}

/// `GET path` with `Connection: close`, bounded by [`DEADLINE`].
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    tokio::time::timeout(DEADLINE, get_inner(addr, path))
        .await
        .unwrap_or_else(|_| panic!("GET http://{addr}{path} timed out"))
}

async fn get_inner(addr: SocketAddr, path: &str) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = s.split_once("\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

/// Parses a scrape with `prometheus-parse`, first checking that every line
/// is a HELP, TYPE or sample line (the parser silently skips others).
pub fn parse_prometheus(text: &str) -> prometheus_parse::Scrape {
    use prometheus_parse::LineInfo;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            !matches!(LineInfo::parse(line), LineInfo::Ignored | LineInfo::Empty),
            "not valid Prometheus text: {line:?}"
        );
    }
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text parses")
}

/// The value of the one sample of `metric` whose labels include `labels`.
pub fn sample(
    scrape: &prometheus_parse::Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    use prometheus_parse::Value;
    let found: Vec<&prometheus_parse::Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .collect();
    assert!(
        found.len() <= 1,
        "{metric} {labels:?} matches {} samples",
        found.len()
    );
    found.first().map(|s| match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(b) => b.last().map_or(0.0, |b| b.count),
        Value::Summary(_) => panic!("{metric} is a summary"),
    })
}

pub fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
    ServicePortName {
        namespace: ns.into(),
        name: name.into(),
        port: port.into(),
    }
}

pub fn ep(addr: SocketAddr, state: EndpointState) -> Endpoint {
    Endpoint {
        addr,
        state,
        node_name: None,
        zone: None,
    }
}

pub fn service_port(
    name: ServicePortName,
    cluster: Vec<Endpoint>,
    local: Vec<Endpoint>,
    health_check_node_port: Option<u16>,
) -> Arc<ServicePort> {
    Arc::new(ServicePort {
        local_endpoints: local.into(),
        external_local: health_check_node_port.is_some(),
        health_check_node_port,
        ..ServicePort::new(name, Protocol::Tcp, Mode::L4, cluster.into())
    })
}

pub fn table(
    version: u64,
    frontends: Vec<(SocketAddr, FrontendKind, Arc<ServicePort>)>,
) -> Arc<Table> {
    let frontends = frontends
        .into_iter()
        .map(|(addr, kind, service)| Frontend::new(addr, kind, service));
    Arc::new(Table::new(version, frontends))
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Admin config on ephemeral loopback ports, health-check ports on loopback.
pub fn loopback_config() -> lightpath::admin::AdminConfig {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    lightpath::admin::AdminConfig {
        admin_addr: Some(any),
        metrics_addr: Some(any),
        health_addr: Some(any),
        service_health: true,
        service_health_ips: vec!["127.0.0.1".parse().unwrap()],
    }
}
