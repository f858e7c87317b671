//! UDP end to end through real TPROXY rules: a real resolver (`dnsmasq`, one
//! per backend namespace, each answering `example.test` with its own address
//! so the client can tell which endpoint answered) behind a dual-stack
//! NodePort Service, the real `lightpath run` in the node namespace, and
//! clients that are `connect()`ed UDP sockets in the client namespace: the
//! kernel hands such a socket only datagrams from the address it connected
//! to, so every answer proves the reply left from the service address.
//! Needs root (see `support::netns::require_root`) and dnsmasq
//! (`dnsmasq-base`, installed by `.ci/run`).

mod admin_util;
mod support {
    pub mod netns;
}

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use admin_util::{get, parse_prometheus, sample};
use prometheus_parse::Scrape;
use support::netns::*;
use tokio::net::UdpSocket;

const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";
const NODE_IP: &str = "10.0.1.1";
const NODE_PORT: u16 = 30053;

fn vip4() -> SocketAddr {
    SocketAddr::new(VIP4.parse().expect("literal"), 53)
}

fn vip6() -> SocketAddr {
    SocketAddr::new(VIP6.parse().expect("literal"), 53)
}

/// The address pod `i`'s resolver gives `example.test`.
fn answer_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, i as u8)
}

/// A dual-stack NodePort Service `dns` (UDP 53, nodePort 30053) whose
/// endpoints are `pods`.
fn dns_yaml(pods: &[usize]) -> String {
    let mut y = format!(
        "{}apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: {VIP4}\n  clusterIPs: [{VIP4}, \"{VIP6}\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: PreferDualStack\n  ports:\n  - {{name: dns, port: 53, targetPort: 53, protocol: UDP, nodePort: {NODE_PORT}}}\n",
        node_yaml()
    );
    for fam in ["IPv4", "IPv6"] {
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-{}\n  namespace: default\n  labels: {{kubernetes.io/service-name: dns}}\naddressType: {fam}\nports:\n- {{name: dns, port: 53, protocol: UDP}}\nendpoints:\n",
            fam.to_lowercase()
        ));
        for &i in pods {
            let a = if fam == "IPv4" {
                pod_v4(i).to_string()
            } else {
                pod_v6(i).to_string()
            };
            y.push_str(&format!(
                "- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n  nodeName: node-a\n"
            ));
        }
    }
    y.push_str("---\n");
    y
}

/// Starts dnsmasq in pod `i`, logging every query to its output.
fn start_resolver(sb: &mut Sandbox, i: usize) {
    let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("dnsmasq not found: install dnsmasq-base (see .ci/run)"));
    let address = format!("--address=/example.test/{}", answer_of(i));
    let l4 = format!("--listen-address={}", pod_v4(i));
    let l6 = format!("--listen-address={}", pod_v6(i));
    let p = Proc::spawn(
        &sb.pods[i - 1],
        bin,
        &[
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--port=53",
            "--bind-interfaces",
            &l4,
            &l6,
            &address,
            "--user=root",
            "--pid-file=",
            "--log-facility=-",
            "--log-queries",
        ],
    );
    p.lines
        .wait_for("started", 0, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("dnsmasq in pod {i}: {e}"));
    sb.backends[i - 1] = Some(p);
}

/// Pods 1 and 2 resolving, lightpath serving `dns` over both.
fn serving(tag: &str) -> (Sandbox, std::path::PathBuf) {
    let mut sb = Sandbox::new(tag, 2);
    start_resolver(&mut sb, 1);
    start_resolver(&mut sb, 2);
    let path = sb.write_manifest("dns.yaml", &dns_yaml(&[1, 2]));
    sb.start_lightpath(&path, &[]);
    (sb, path)
}

/// An `example.test IN A` query with id `id`.
fn query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["example", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The first A record of a response to query `id`.
fn parse_a(resp: &[u8], id: u16) -> Result<Ipv4Addr, String> {
    let bad = |why: &str| format!("{why}: {resp:02x?}");
    if resp.len() < 12 || resp[..2] != id.to_be_bytes() {
        return Err(bad("not the answer to our query"));
    }
    if resp[3] & 0x0f != 0 {
        return Err(bad("error rcode"));
    }
    let (qd, an) = (
        u16::from_be_bytes([resp[4], resp[5]]),
        u16::from_be_bytes([resp[6], resp[7]]),
    );
    let mut at = 12;
    let skip_name = |mut at: usize| -> Result<usize, String> {
        loop {
            let len = *resp.get(at).ok_or_else(|| bad("name runs off"))? as usize;
            if len == 0 {
                return Ok(at + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Ok(at + 2);
            }
            at += 1 + len;
        }
    };
    for _ in 0..qd {
        at = skip_name(at)? + 4;
    }
    for _ in 0..an {
        at = skip_name(at)?;
        let f = resp.get(at..at + 10).ok_or_else(|| bad("short record"))?;
        let (rtype, rdlen) = (
            u16::from_be_bytes([f[0], f[1]]),
            u16::from_be_bytes([f[8], f[9]]) as usize,
        );
        at += 10;
        let rdata = resp.get(at..at + rdlen).ok_or_else(|| bad("short rdata"))?;
        if rtype == 1 && rdlen == 4 {
            return Ok(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]));
        }
        at += rdlen;
    }
    Err(bad("no A record"))
}

/// Asks `sock` (connected to a service address) for `example.test`, up to
/// three tries of one second; the pod that answered.
async fn resolve(sock: &UdpSocket, id: u16) -> Result<usize, String> {
    let mut last = String::from("no answer");
    for _ in 0..3 {
        sock.send(&query(id)).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let a = parse_a(&buf[..n], id)?;
                return (1..=2)
                    .find(|&i| answer_of(i) == a)
                    .ok_or_else(|| format!("answer {a} is no pod's"));
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
    }
    Err(format!(
        "{}: {last}",
        sock.peer_addr().map_err(|e| e.to_string())?
    ))
}

/// A fresh client socket `connect()`ed to `to`: the kernel drops anything
/// not sent from `to` itself.
async fn client(to: SocketAddr) -> UdpSocket {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(bind).await.expect("bind");
    s.connect(to).await.expect("connect");
    s
}

/// `n` fresh flows to `to`; how many each pod answered.
async fn spread(to: SocketAddr, n: u16) -> BTreeMap<usize, usize> {
    let mut seen = BTreeMap::new();
    for id in 0..n {
        let s = client(to).await;
        let pod = resolve(&s, id).await.unwrap_or_else(|e| panic!("{e}"));
        *seen.entry(pod).or_insert(0) += 1;
    }
    seen
}

#[test]
fn dns_answers_through_clusterip_nodeport_and_ipv6_from_the_service_address() {
    if !require_root("dns_answers_through_clusterip_nodeport_and_ipv6_from_the_service_address") {
        return;
    }
    let (sb, _) = serving("udpdns");
    let nft = sb.nft_table();
    assert!(
        nft.contains("meta l4proto udp tproxy ip to")
            && nft.contains("meta l4proto udp tproxy ip6 to")
            && nft.contains("10.96.0.10 . udp . 53")
            && nft.contains("10.0.1.1 . udp . 30053"),
        "UDP rule and element in the kernel:\n{nft}"
    );
    let (v4, v6, np) = sb.client.run(|| async {
        let node_port = SocketAddr::new(NODE_IP.parse().expect("literal"), NODE_PORT);
        (
            spread(vip4(), 16).await,
            spread(vip6(), 16).await,
            spread(node_port, 4).await,
        )
    });
    assert_eq!(v4.len(), 2, "IPv4 flows over both endpoints: {v4:?}");
    assert_eq!(v6.len(), 2, "IPv6 flows over both endpoints: {v6:?}");
    assert_eq!(np.values().sum::<usize>(), 4, "NodePort answered: {np:?}");
    // Processes on the node itself: caught by the output hook, looped
    // through `lo` into the tproxy rule.
    let local = sb.node.run(|| spread(vip4(), 4));
    assert_eq!(local.values().sum::<usize>(), 4, "node-local: {local:?}");
}

/// `/metrics` from lightpath's metrics port in the node namespace,
/// strictly parsed.
async fn scrape() -> Scrape {
    let r = get("127.0.0.1:15090".parse().expect("literal"), "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.body);
    parse_prometheus(&r.body)
}

/// How many A queries pod 2's resolver has logged so far.
fn pod2_queries(sb: &Sandbox) -> usize {
    sb.backends[1]
        .as_ref()
        .expect("pod 2 resolver")
        .lines
        .text()
        .matches("query[A]")
        .count()
}

/// The value of the `dns` service port's series `name` (with `labels`
/// among its labels too).
fn value(m: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut all = vec![("service", "dns")];
    all.extend_from_slice(labels);
    sample(m, name, &all).unwrap_or_else(|| panic!("no {name} with {all:?}"))
}

#[test]
fn removed_endpoint_gets_no_new_datagrams_after_one_update_and_metrics_count_it() {
    if !require_root("removed_endpoint_gets_no_new_datagrams_after_one_update_and_metrics_count_it")
    {
        return;
    }
    let (sb, _) = serving("udpdrop");
    // Sockets created in the client namespace outlive the thread that made
    // them, so one namespace thread holds them across the manifest edit.
    let (to_client, from_test) = std::sync::mpsc::channel::<()>();
    let (to_test, from_client) = std::sync::mpsc::channel::<Vec<usize>>();
    let handle = sb.client.spawn(move || async move {
        let mut socks = Vec::new();
        let mut first = Vec::new();
        for id in 100..116u16 {
            let s = client(vip4()).await;
            first.push(resolve(&s, id).await.unwrap_or_else(|e| panic!("{e}")));
            socks.push(s);
        }
        to_test.send(first.clone()).expect("test waiting");
        // Wait for the test to remove pod 2, then ask again on every flow
        // and on fresh ones.
        from_test
            .recv_timeout(Duration::from_secs(30))
            .expect("test never signalled");
        let mut again = Vec::new();
        for (k, s) in socks.iter().enumerate() {
            again.push(
                resolve(s, 200 + k as u16)
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
        let fresh = spread(vip4(), 16).await;
        (first, again, fresh)
    });
    let first = from_client
        .recv_timeout(Duration::from_secs(60))
        .expect("client flows");
    assert!(
        first.contains(&1) && first.contains(&2),
        "flows on both pods before the edit: {first:?}"
    );
    let p2_queries_before = pod2_queries(&sb);

    // Pod 2 leaves the endpoints (its resolver keeps running: it would
    // answer, so any datagram reaching it would show in its log).
    let lp_lines = sb.lightpath(0).lines.len();
    sb.write_manifest("dns.yaml", &dns_yaml(&[1]));
    sb.lightpath(0)
        .lines
        .wait_for("udp flows evicted", lp_lines, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    to_client.send(()).expect("client waiting");
    let (first, again, fresh) = handle
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(
        again.iter().all(|&p| p == 1),
        "every flow answered by pod 1 after the update (before: {first:?}, after: {again:?})"
    );
    assert_eq!(
        fresh.get(&1),
        Some(&16),
        "new flows only on pod 1: {fresh:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let p2_queries_after = pod2_queries(&sb);
    assert_eq!(
        p2_queries_after, p2_queries_before,
        "pod 2 received datagrams after it left the endpoints"
    );

    // Everything above, as Prometheus sees it.
    let m = sb.node.run(scrape);
    let on_p2 = first.iter().filter(|&&p| p == 2).count() as f64;
    let total_queries = (16 + 16 + 16) as f64;
    let v = |name: &str| value(&m, name, &[]);
    let at_least = [
        ("lightpath_udp_received_datagrams_total", total_queries),
        ("lightpath_udp_sent_datagrams_total", total_queries),
        ("lightpath_udp_received_bytes_total", total_queries * 30.0),
        ("lightpath_udp_sent_bytes_total", total_queries * 46.0),
        ("lightpath_udp_flows_active", 16.0),
        ("lightpath_udp_flows_created_total", 32.0 + on_p2),
    ];
    for (name, min) in at_least {
        assert!(v(name) >= min, "{name} = {}, want >= {min}", v(name));
    }
    let evicted = |reason| {
        value(
            &m,
            "lightpath_udp_flow_evictions_total",
            &[("reason", reason)],
        )
    };
    assert!(
        evicted("endpoint") >= on_p2,
        "{} flows evicted for their endpoint, {on_p2} on pod 2",
        evicted("endpoint")
    );
    assert_eq!(evicted("cap"), 0.0);
    assert_eq!(value(&m, "lightpath_udp_dropped_datagrams_total", &[]), 0.0);
}

/// A ClusterIP Service `echo` (UDP 9000 → the backends' UDP echo) with
/// ClientIP session affinity, over `pods`.
fn sticky_echo_yaml(pods: &[usize]) -> String {
    let mut y = format!(
        "{}apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default}}\nspec:\n  clusterIP: 10.96.0.30\n  sessionAffinity: ClientIP\n  ports:\n  - {{name: echo, port: 9000, targetPort: 9000, protocol: UDP}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\nports:\n- {{name: echo, port: 9000, protocol: UDP}}\nendpoints:\n",
        node_yaml()
    );
    for &i in pods {
        y.push_str(&format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: node-a\n",
            pod_v4(i)
        ));
    }
    y.push_str("---\n");
    y
}

/// `lightpath backend`'s UDP echo behind a ClientIP-affinity Service: every
/// new flow of one client lands on the same endpoint, as for TCP.
#[test]
fn client_ip_affinity_keeps_new_udp_flows_on_one_endpoint() {
    if !require_root("client_ip_affinity_keeps_new_udp_flows_on_one_endpoint") {
        return;
    }
    let mut sb = Sandbox::new("udpaff", 3);
    for i in 1..=3 {
        sb.start_backend(i);
    }
    let path = sb.write_manifest("echo.yaml", &sticky_echo_yaml(&[1, 2, 3]));
    sb.start_lightpath(&path, &[]);
    let names = sb.client.run(|| async {
        let to: SocketAddr = "10.96.0.30:9000".parse().expect("literal");
        let mut names = BTreeMap::new();
        for k in 0..12u8 {
            let s = client(to).await;
            let mut got = None;
            for _ in 0..3 {
                s.send(&[b'q', k]).await.expect("send");
                let mut buf = [0u8; 64];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(1), s.recv(&mut buf)).await
                {
                    got = Some(buf[..n].to_vec());
                    break;
                }
            }
            let reply = got.unwrap_or_else(|| panic!("no echo for flow {k}"));
            let text = String::from_utf8_lossy(&reply).to_string();
            let (name, echoed) = text
                .split_once('\n')
                .unwrap_or_else(|| panic!("bad echo {text:?}"));
            assert_eq!(echoed.as_bytes(), &[b'q', k], "payload echoed intact");
            *names.entry(name.to_string()).or_insert(0) += 1;
        }
        names
    });
    assert_eq!(
        names.len(),
        1,
        "one endpoint for every flow of one client: {names:?}"
    );
}

/// A UDP Service without endpoints is refused in the kernel with ICMP port
/// unreachable, as kube-proxy does: a connected client socket sees
/// ECONNREFUSED at once instead of waiting for a timeout.
#[test]
fn udp_service_without_endpoints_is_refused_at_once() {
    if !require_root("udp_service_without_endpoints_is_refused_at_once") {
        return;
    }
    let mut sb = Sandbox::new("udprej", 1);
    let path = sb.write_manifest("echo.yaml", &sticky_echo_yaml(&[]));
    sb.start_lightpath(&path, &[]);
    let nft = sb.nft_table();
    assert!(
        nft.contains("10.96.0.30 . udp . 9000 : goto reject_fe"),
        "no-endpoint UDP frontend in the reject map:\n{nft}"
    );
    let (outcome, took) = sb.client.run(|| async {
        let s = client("10.96.0.30:9000".parse().expect("literal")).await;
        let start = std::time::Instant::now();
        s.send(b"anyone?").await.expect("send");
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf)).await;
        (r.map(|r| r.map_err(|e| e.kind())), start.elapsed())
    });
    assert_eq!(
        outcome,
        Ok(Err(std::io::ErrorKind::ConnectionRefused)),
        "refused, not answered or dropped"
    );
    assert!(took < Duration::from_secs(1), "refused in {took:?}");
}
