//! `spec.loadBalancerSourceRanges` through real sockets: only the listed
//! sources reach a LoadBalancer IP, the others are dropped (before any
//! reject); the ClusterIP and NodePort of the same Service stay open; a node
//! process is filtered like any client; a range change applies to new
//! connections while an accepted one keeps flowing.
//! Needs root (see `support::netns::require_root`).

mod support {
    pub mod netns;
}

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use support::netns::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const CLUSTER_IP: &str = "10.96.0.40";
const LB_IP: &str = "192.0.2.40";
const EMPTY_LB_IP: &str = "192.0.2.41";
const NODE_PORT: u16 = 30090;
/// The client namespace's own address: outside the first ranges.
const OUTSIDER: &str = "10.0.1.2";
/// A second client address, added by the test: inside the first ranges.
const INSIDER: &str = "10.0.1.5";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal")
}

/// The `edge` LoadBalancer Service (echo port 9000, node port
/// [`NODE_PORT`]) over pod 1, and `dark`, a LoadBalancer Service with the
/// same ranges and no endpoints, both restricted to `ranges`.
fn manifest(ranges: &str) -> String {
    format!(
        "{node}apiVersion: v1\nkind: Service\nmetadata: {{name: edge, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: {CLUSTER_IP}\n  loadBalancerSourceRanges: {ranges}\n  ports:\n  - {{name: echo, port: 9000, targetPort: 9000, protocol: TCP, nodePort: {NODE_PORT}}}\nstatus:\n  loadBalancer:\n    ingress:\n    - {{ip: {LB_IP}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: edge-ipv4\n  namespace: default\n  labels: {{kubernetes.io/service-name: edge}}\naddressType: IPv4\nports:\n- {{name: echo, port: 9000, protocol: TCP}}\nendpoints:\n- addresses: [\"{pod}\"]\n  conditions: {{ready: true}}\n  nodeName: node-a\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: dark, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.41\n  loadBalancerSourceRanges: {ranges}\n  ports:\n  - {{name: echo, port: 9000, targetPort: 9000, protocol: TCP}}\nstatus:\n  loadBalancer:\n    ingress:\n    - {{ip: {EMPTY_LB_IP}}}\n---\n",
        node = node_yaml(),
        pod = pod_v4(1),
    )
}

/// [`probe_from`] an address of the namespace it runs in, given as text.
async fn probe_src(src: &str, to: SocketAddr, wait: Duration) -> ConnectOutcome {
    probe_from(Some(ip(src)), to, wait).await
}

/// One echo round trip on an open connection.
async fn echo(s: &mut TcpStream, byte: u8) -> std::io::Result<u8> {
    s.write_all(&[byte]).await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(IO_TIMEOUT, s.read_exact(&mut b))
        .await
        .map_err(|_| std::io::Error::other("echo timed out"))??;
    Ok(b[0])
}

fn lb() -> SocketAddr {
    SocketAddr::new(ip(LB_IP), 9000)
}

fn connected(o: &ConnectOutcome) -> bool {
    matches!(o, ConnectOutcome::Connected(_))
}

/// How long a dropped SYN is given before the probe calls it dropped (the
/// kernel's first SYN retransmission is at 1 s).
const DROP_WAIT: Duration = Duration::from_millis(1500);

#[test]
fn only_listed_sources_reach_a_load_balancer_ip_and_a_change_spares_open_connections() {
    if !require_root(
        "only_listed_sources_reach_a_load_balancer_ip_and_a_change_spares_open_connections",
    ) {
        return;
    }
    let mut sb = Sandbox::new("lbsrc", 1);
    sb.start_backend(1);
    sb.client
        .ip(&["addr", "add", &format!("{INSIDER}/24"), "dev", "eth0"]);
    // A nested range too: merged with its parent before it reaches the
    // kernel (overlapping interval elements would fail the whole load).
    let path = sb.write_manifest(
        "svc.yaml",
        &manifest(&format!(
            "[\"{INSIDER}/32\", \" 10.0.1.4/30 \", \"2001:db8::/32\"]"
        )),
    );
    sb.start_lightpath(&path, &[]);
    let table = sb.nft_table();
    assert!(
        table.contains(&format!("{LB_IP} . tcp . 9000 : goto fw_tproxy_v4")),
        "{table}"
    );
    assert!(
        table.contains(&format!("{EMPTY_LB_IP} . tcp . 9000 : goto fw_reject_v4")),
        "{table}"
    );

    // From inside the range: through to the endpoint. From outside: the SYN
    // is dropped. The ClusterIP and the NodePort are not filtered.
    let (inside, outside, cluster, node_port, dark_inside, dark_outside) =
        sb.client.run(|| async {
            let inside = probe_src(INSIDER, lb(), IO_TIMEOUT).await;
            let outside = probe_src(OUTSIDER, lb(), DROP_WAIT).await;
            let cluster =
                probe_src(OUTSIDER, SocketAddr::new(ip(CLUSTER_IP), 9000), IO_TIMEOUT).await;
            let node_port = probe_src(
                OUTSIDER,
                SocketAddr::new(ip("10.0.1.1"), NODE_PORT),
                IO_TIMEOUT,
            )
            .await;
            let dark = SocketAddr::new(ip(EMPTY_LB_IP), 9000);
            let dark_inside = probe_src(INSIDER, dark, IO_TIMEOUT).await;
            let dark_outside = probe_src(OUTSIDER, dark, DROP_WAIT).await;
            (
                inside,
                outside,
                cluster,
                node_port,
                dark_inside,
                dark_outside,
            )
        });
    assert!(connected(&inside), "allowed source: {inside:?}");
    assert!(
        matches!(outside, ConnectOutcome::TimedOut),
        "source outside the ranges must be dropped: {outside:?}"
    );
    assert!(
        connected(&cluster),
        "ClusterIP is not filtered: {cluster:?}"
    );
    assert!(
        connected(&node_port),
        "NodePort is not filtered: {node_port:?}"
    );
    // Without endpoints: an allowed source is refused at once, any other
    // dropped (the firewall comes first).
    assert!(
        matches!(dark_inside, ConnectOutcome::Refused(_)),
        "allowed source, no endpoints: {dark_inside:?}"
    );
    assert!(
        matches!(dark_outside, ConnectOutcome::TimedOut),
        "disallowed source, no endpoints: {dark_outside:?}"
    );

    // A process on the node itself (source 10.0.1.1, outside the ranges)
    // is filtered too, after its loop through lo.
    let from_node = sb.node.run(|| async { probe(lb(), DROP_WAIT).await });
    assert!(
        matches!(from_node, ConnectOutcome::TimedOut),
        "node outside the ranges: {from_node:?}"
    );

    // An accepted connection from the insider, open across the change.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let held = sb.client.spawn(move || async move {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(ip(INSIDER), 0)).expect("bind");
        let mut s = tokio::time::timeout(IO_TIMEOUT, sock.connect(lb()))
            .await
            .expect("connect timed out")
            .expect("connect");
        assert_eq!(echo(&mut s, b'a').await.expect("echo before"), b'a');
        done_tx.send(()).expect("signal");
        // Wait (bounded) for the range change, then echo again.
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .expect("join")
            .expect("change signal");
        echo(&mut s, b'b').await
    });
    done_rx
        .recv_timeout(Duration::from_secs(15))
        .expect("held connection opened");

    // Swap the ranges: now only the outsider (and the node's address).
    sb.write_manifest(
        "svc.yaml",
        &manifest(&format!("[\"{OUTSIDER}/32\", \"10.0.1.1/32\"]")),
    );
    let want = format!("{LB_IP} . tcp . 9000 . {OUTSIDER}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut table = sb.nft_table();
    while !table.contains(&want) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        table = sb.nft_table();
    }
    assert!(table.contains(&want), "range change not applied: {table}");
    assert!(
        !table.contains(&format!("{LB_IP} . tcp . 9000 . {INSIDER}")),
        "{table}"
    );
    // The node's address is in a range: the LoadBalancer IP itself is
    // allowed too (kube-proxy's allowFromNode).
    assert!(
        table.contains(&format!("{LB_IP} . tcp . 9000 . {LB_IP}")),
        "{table}"
    );

    tx.send(()).expect("release the held connection");
    let after = held.join().expect("held connection");
    assert_eq!(
        after.expect("the accepted connection keeps flowing after the change"),
        b'b'
    );
    let (inside, outside) = sb.client.run(|| async {
        (
            probe_src(INSIDER, lb(), DROP_WAIT).await,
            probe_src(OUTSIDER, lb(), IO_TIMEOUT).await,
        )
    });
    assert!(
        matches!(inside, ConnectOutcome::TimedOut),
        "new connections from the old range are dropped: {inside:?}"
    );
    assert!(connected(&outside), "newly allowed source: {outside:?}");
    let from_node = sb.node.run(|| async { probe(lb(), IO_TIMEOUT).await });
    assert!(
        connected(&from_node),
        "node inside the ranges: {from_node:?}"
    );
}
