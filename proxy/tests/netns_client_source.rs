//! Which source address an endpoint sees, through real sockets: the client's
//! own where kube-proxy does not masquerade (ClusterIP traffic, both
//! families; external traffic of an `externalTrafficPolicy: Local`
//! service), the node's where it does (external traffic of a Cluster-policy
//! service, a pod reaching itself through its service, `--masquerade-all`,
//! and, under a local traffic detector, ClusterIP traffic from a source that
//! is not a pod).
//! The backend reports the peer it saw in `x-peer-addr`.
//! Needs root (see `support::netns::require_root`).

mod support {
    pub mod netns;
}

use std::net::{IpAddr, SocketAddr};

use support::netns::*;

const VIP4: &str = "10.96.0.50";
const VIP6: &str = "fd00:96::50";
const LOCAL_VIP: &str = "10.96.0.51";
const L7_VIP: &str = "10.96.0.52";
const DNS_VIP: &str = "10.96.0.53";
const NODE_IP: &str = "10.0.1.1";
const CLIENT_V6: &str = "fd00:1::2";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal")
}

/// `web` (dual-stack ClusterIP, NodePort 30050 with the default Cluster
/// policy) and `local` (NodePort 30051, externalTrafficPolicy: Local), both
/// over pod 1 on this node; port 80 is the backend's HTTP port, relayed at
/// L4 (the port is named `web`).
fn manifest() -> String {
    manifest_with_node(&node_yaml())
}

/// [`manifest`] with another Node object.
fn manifest_with_node(node: &str) -> String {
    let web = service_yaml(
        "web",
        &[ip(VIP4), ip(VIP6)],
        &[1],
        "node-a",
        "type: NodePort",
    )
    .replace(
        "{name: web, port: 80, targetPort: 8080, protocol: TCP}",
        "{name: web, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30050}",
    );
    let local = service_yaml(
        "local",
        &[ip(LOCAL_VIP)],
        &[1],
        "node-a",
        "type: NodePort\nexternalTrafficPolicy: Local",
    )
    .replace(
        "{name: web, port: 80, targetPort: 8080, protocol: TCP}",
        "{name: web, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30051}",
    );
    // `app`: the same, its port named `http`: proxied at L7.
    let app = service_yaml("app", &[ip(L7_VIP), ip("fd00:96::52")], &[1], "node-a", "")
        .replace("name: web,", "name: http,");
    // `dns`: UDP 53 to the backend's UDP echo.
    let dns = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\nspec:\n  clusterIP: {DNS_VIP}\n  ports:\n  - {{name: dns, port: 53, targetPort: 9000, protocol: UDP}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dns-1, namespace: default, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\nports:\n- {{name: dns, port: 9000, protocol: UDP}}\nendpoints:\n- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: node-a\n---\n",
        pod_v4(1)
    );
    format!("{node}{web}{local}{app}{dns}")
}

/// One GET; the address the backend saw (its `x-peer-addr` header).
async fn peer_seen(addr: SocketAddr) -> Result<SocketAddr, String> {
    let text = lightpath::sandbox::http_get(addr, IO_TIMEOUT)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("x-peer-addr: "))
        .ok_or_else(|| format!("{addr}: no x-peer-addr in {text:?}"))?;
    line.trim()
        .parse()
        .map_err(|e| format!("{addr}: bad x-peer-addr {line:?}: {e}"))
}

/// The address the backend's UDP echo saw a datagram come from.
async fn udp_peer_seen(addr: SocketAddr) -> Result<SocketAddr, String> {
    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0")
        .await
        .map_err(|e| e.to_string())?;
    sock.connect(addr).await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 512];
    // Datagrams may be lost: a few tries, each bounded.
    for _ in 0..5 {
        sock.send(b"peer?").await.map_err(|e| e.to_string())?;
        let got =
            tokio::time::timeout(std::time::Duration::from_secs(1), sock.recv(&mut buf)).await;
        if let Ok(Ok(n)) = got {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let peer = text
                .split_once('\n')
                .map(|(_, p)| p.trim().to_string())
                .ok_or_else(|| format!("{addr}: bad reply {text:?}"))?;
            return peer
                .parse()
                .map_err(|e| format!("{addr}: bad peer {peer:?}: {e}"));
        }
    }
    Err(format!("{addr}: no UDP reply"))
}

fn seen(r: Result<SocketAddr, String>) -> IpAddr {
    // The backend listens dual-stack: IPv4 peers come v4-mapped.
    r.unwrap_or_else(|e| panic!("{e}")).ip().to_canonical()
}

#[test]
fn endpoints_see_the_client_where_kube_proxy_does_not_masquerade() {
    if !require_root("endpoints_see_the_client_where_kube_proxy_does_not_masquerade") {
        return;
    }
    let mut sb = Sandbox::new("srcip", 1);
    sb.start_backend(1);
    sb.serve(&manifest());
    let table = sb.nft_table();
    assert!(
        table.contains("socket transparent 1"),
        "reply rule: {table}"
    );

    let (cluster4, cluster6, np_cluster, np_local, l7_4, l7_6) = sb.client.run(|| async {
        (
            peer_seen(SocketAddr::new(ip(VIP4), 80)).await,
            peer_seen(SocketAddr::new(ip(VIP6), 80)).await,
            peer_seen(SocketAddr::new(ip(NODE_IP), 30050)).await,
            peer_seen(SocketAddr::new(ip(NODE_IP), 30051)).await,
            peer_seen(SocketAddr::new(ip(L7_VIP), 80)).await,
            peer_seen(SocketAddr::new(ip("fd00:96::52"), 80)).await,
        )
    });
    let udp = sb
        .client
        .run(|| async { udp_peer_seen(SocketAddr::new(ip(DNS_VIP), 53)).await });
    assert_eq!(seen(udp), CLIENT_V4, "UDP keeps the client");
    assert_eq!(seen(l7_4), CLIENT_V4, "HTTP (L7) keeps the client (v4)");
    assert_eq!(seen(l7_6), ip(CLIENT_V6), "HTTP (L7) keeps the client (v6)");
    assert_eq!(seen(cluster4), CLIENT_V4, "ClusterIP keeps the client (v4)");
    assert_eq!(
        seen(cluster6),
        ip(CLIENT_V6),
        "ClusterIP keeps the client (v6)"
    );
    assert_ne!(
        seen(np_cluster),
        CLIENT_V4,
        "NodePort of a Cluster-policy service is masqueraded"
    );
    assert_eq!(
        seen(np_local),
        CLIENT_V4,
        "NodePort of a Local-policy service keeps the client"
    );

    // The pod reaching itself through its service (hairpin): masqueraded,
    // or it would answer itself; the connection works.
    let pod = pod_v4(1);
    let (hairpin, hairpin_l7) = sb.pods[0].run(|| async {
        (
            peer_seen(SocketAddr::new(ip(VIP4), 80)).await,
            peer_seen(SocketAddr::new(ip(L7_VIP), 80)).await,
        )
    });
    assert_ne!(seen(hairpin), pod, "hairpin is masqueraded");
    assert_ne!(seen(hairpin_l7), pod, "hairpin is masqueraded (L7)");

    // A process on the node: its own address, as it is anyway.
    let from_node = sb
        .node
        .run(|| async { peer_seen(SocketAddr::new(ip(VIP4), 80)).await });
    let from_node = seen(from_node);
    assert_ne!(from_node, CLIENT_V4);

    // Many connections in a row: every one keeps the client and gets its
    // answer (the reply rule brings each back; ports chosen per 4-tuple).
    let all = sb.client.run(|| async {
        let mut got = Vec::new();
        for _ in 0..50 {
            got.push(peer_seen(SocketAddr::new(ip(VIP4), 80)).await);
            got.push(peer_seen(SocketAddr::new(ip(L7_VIP), 80)).await);
        }
        got
    });
    for r in all {
        assert_eq!(seen(r), CLIENT_V4);
    }
}

#[test]
fn masquerade_all_connects_from_the_node() {
    if !require_root("masquerade_all_connects_from_the_node") {
        return;
    }
    let mut sb = Sandbox::new("srcmasq", 1);
    sb.start_backend(1);
    let path = sb.write_manifest("svc.yaml", &manifest());
    sb.start_lightpath(&path, &["--masquerade-all"]);
    let table = sb.nft_table();
    assert!(!table.contains("socket"), "no reply rule: {table}");
    let (cluster, np_local, l7) = sb.client.run(|| async {
        (
            peer_seen(SocketAddr::new(ip(VIP4), 80)).await,
            peer_seen(SocketAddr::new(ip(NODE_IP), 30051)).await,
            peer_seen(SocketAddr::new(ip(L7_VIP), 80)).await,
        )
    });
    assert_ne!(seen(cluster), CLIENT_V4);
    assert_ne!(seen(np_local), CLIENT_V4);
    assert_ne!(seen(l7), CLIENT_V4);
    let udp = sb
        .client
        .run(|| async { udp_peer_seen(SocketAddr::new(ip(DNS_VIP), 53)).await });
    assert_ne!(seen(udp), CLIENT_V4, "UDP masqueraded");
}

/// Under a local traffic detector (kube-proxy's `--cluster-cidr`, or
/// `--detect-local-mode NodeCIDR` with the Node's pod CIDRs), ClusterIP
/// traffic from a source that is not a pod reaches the endpoint from the
/// node's address, as kube-proxy masquerades off-cluster traffic to a
/// service VIP; a pod keeps its own address, and external frontends are not
/// affected. L4 and L7, both families, and UDP.
#[test]
fn a_local_traffic_detector_masquerades_off_cluster_clusterip_clients() {
    if !require_root("a_local_traffic_detector_masquerades_off_cluster_clusterip_clients") {
        return;
    }
    let node_with_pods = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDRs: [10.244.0.0/16, \"fd00:244::/32\"]}\nstatus:\n  addresses:\n  - {type: InternalIP, address: 10.0.1.1}\n---\n";
    let modes: [(&str, String, &[&str]); 2] = [
        (
            "srcdcc",
            node_yaml(),
            &["--cluster-cidr", "10.244.0.0/16,fd00:244::/32"],
        ),
        (
            "srcdnc",
            node_with_pods.to_string(),
            &["--detect-local-mode", "NodeCIDR"],
        ),
    ];
    for (tag, node, flags) in modes {
        let mut sb = Sandbox::new(tag, 2);
        sb.start_backend(1);
        let path = sb.write_manifest("svc.yaml", &manifest_with_node(&node));
        sb.start_lightpath(&path, flags);

        // The client namespace is not a pod: masqueraded on ClusterIPs.
        let (c4, c6, l7, np_local) = sb.client.run(|| async {
            (
                peer_seen(SocketAddr::new(ip(VIP4), 80)).await,
                peer_seen(SocketAddr::new(ip(VIP6), 80)).await,
                peer_seen(SocketAddr::new(ip(L7_VIP), 80)).await,
                peer_seen(SocketAddr::new(ip(NODE_IP), 30051)).await,
            )
        });
        let udp = sb
            .client
            .run(|| async { udp_peer_seen(SocketAddr::new(ip(DNS_VIP), 53)).await });
        assert_ne!(seen(c4), CLIENT_V4, "{tag}: off-cluster client, v4");
        assert_ne!(seen(c6), ip(CLIENT_V6), "{tag}: off-cluster client, v6");
        assert_ne!(seen(l7), CLIENT_V4, "{tag}: off-cluster client, L7");
        assert_ne!(seen(udp), CLIENT_V4, "{tag}: off-cluster client, UDP");
        assert_eq!(
            seen(np_local),
            CLIENT_V4,
            "{tag}: a Local-policy NodePort still keeps the client"
        );

        // Pod 2 is a pod: it keeps its address.
        let (p4, p6, pl7) = sb.pods[1].run(|| async {
            (
                peer_seen(SocketAddr::new(ip(VIP4), 80)).await,
                peer_seen(SocketAddr::new(ip(VIP6), 80)).await,
                peer_seen(SocketAddr::new(ip(L7_VIP), 80)).await,
            )
        });
        let pudp =
            sb.pods[1].run(|| async { udp_peer_seen(SocketAddr::new(ip(DNS_VIP), 53)).await });
        let pod = IpAddr::V4(pod_v4(2));
        assert_eq!(seen(p4), pod, "{tag}: pod client, v4");
        assert_eq!(seen(p6), IpAddr::V6(pod_v6(2)), "{tag}: pod client, v6");
        assert_eq!(seen(pl7), pod, "{tag}: pod client, L7");
        assert_eq!(seen(pudp), pod, "{tag}: pod client, UDP");
    }
}

/// One `GET /` on a kept-alive connection; the address the backend saw.
async fn peer_seen_on(s: &mut tokio::net::TcpStream) -> Result<SocketAddr, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        s.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::with_capacity(512);
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().to_string())
                    })
                    .ok_or_else(|| format!("no content-length in {head:?}"))?
                    .parse()
                    .map_err(|e| format!("content-length: {e}"))?;
                if body.len() >= len {
                    let peer = head
                        .lines()
                        .find_map(|l| l.strip_prefix("x-peer-addr: "))
                        .ok_or_else(|| format!("no x-peer-addr in {head:?}"))?;
                    return peer.trim().parse().map_err(|e| format!("{peer:?}: {e}"));
                }
            }
            let mut chunk = [0u8; 512];
            match s.read(&mut chunk).await {
                Ok(0) => return Err(format!("closed after {text:?}")),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// A dual-stack HTTP service port is balanced per family: a kept-alive
/// IPv4 client keeps reaching the IPv4 endpoint, and an IPv6 one the IPv6
/// endpoint, while connections of the other family come and go between
/// their requests. (With one balancer per name, each new connection put its
/// family's endpoint set in it, and the other family's kept-alive client
/// was then balanced over it.)
#[test]
fn each_family_of_a_dual_stack_service_is_balanced_over_its_own_endpoints() {
    if !require_root("each_family_of_a_dual_stack_service_is_balanced_over_its_own_endpoints") {
        return;
    }
    let mut sb = Sandbox::new("family", 1);
    sb.start_backend(1);
    sb.serve(&manifest());
    let (v4, v6) = (
        SocketAddr::new(ip(L7_VIP), 80),
        SocketAddr::new(ip("fd00:96::52"), 80),
    );
    let rounds: Vec<[Result<SocketAddr, String>; 4]> = sb.client.run(move || async move {
        let (mut c4, mut c6) = match tokio::join!(
            tokio::net::TcpStream::connect(v4),
            tokio::net::TcpStream::connect(v6)
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => panic!("connect: {:?} {:?}", a.err(), b.err()),
        };
        let mut rounds = Vec::new();
        for _ in 0..4 {
            let fresh6 = peer_seen(v6).await;
            let kept4 = peer_seen_on(&mut c4).await;
            let fresh4 = peer_seen(v4).await;
            let kept6 = peer_seen_on(&mut c6).await;
            rounds.push([kept4, fresh6, kept6, fresh4]);
        }
        rounds
    });
    for (i, [kept4, fresh6, kept6, fresh4]) in rounds.into_iter().enumerate() {
        assert_eq!(seen(kept4), CLIENT_V4, "round {i}: kept-alive IPv4 client");
        assert_eq!(seen(fresh6), ip(CLIENT_V6), "round {i}: new IPv6 client");
        assert_eq!(
            seen(kept6),
            ip(CLIENT_V6),
            "round {i}: kept-alive IPv6 client"
        );
        assert_eq!(seen(fresh4), CLIENT_V4, "round {i}: new IPv4 client");
    }
}
