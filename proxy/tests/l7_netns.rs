//! L7 through real TPROXY rules: the real `lightpath run` in a node
//! namespace serves an HTTP-mode ClusterIP (annotation
//! `lightpath.io/protocol: http`); a client namespace sends HTTP/1.1
//! requests to the ClusterIP. Needs root (see `support::netns::require_root`).

mod support {
    pub mod netns;
}

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use support::netns::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn vip4() -> IpAddr {
    "10.96.0.10".parse().expect("literal")
}

/// One request on a fresh connection; returns (status line, headers, body).
async fn request(addr: SocketAddr) -> Result<(String, String, String), String> {
    let work = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(
            b"GET /l7 HTTP/1.1\r\nHost: web.default.svc.cluster.local\r\nConnection: close\r\n\r\n",
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("bad response: {text:?}"))?;
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        Ok::<_, String>((
            status.to_string(),
            headers.to_ascii_lowercase(),
            body.trim().to_string(),
        ))
    };
    tokio::time::timeout(IO_TIMEOUT, work)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[test]
fn http_clusterip_is_proxied_per_request_through_tproxy() {
    if !require_root("http_clusterip_is_proxied_per_request_through_tproxy") {
        return;
    }
    let mut sb = Sandbox::new("l7", 3);
    for i in 1..=3 {
        sb.start_backend(i);
    }
    let yaml = service_yaml("web", &[vip4()], &[1, 2, 3], "node-a", "").replacen(
        "metadata: {name: web, namespace: default}",
        "metadata: {name: web, namespace: default, annotations: {lightpath.io/protocol: http}}",
        1,
    );
    assert!(yaml.contains("lightpath.io/protocol"), "annotation placed");
    let path = sb.write_manifest("svc.yaml", &format!("{}{yaml}", node_yaml()));
    sb.start_lightpath(&path, &[]);
    let addr = SocketAddr::new(vip4(), 80);

    let seen = sb.client.run(move || async move {
        let mut seen = BTreeMap::new();
        for _ in 0..60 {
            let (status, headers, body) = request(addr).await.unwrap_or_else(|e| panic!("{e}"));
            assert!(status.contains(" 200 "), "{status}");
            // Only the L7 path adds these.
            assert!(headers.contains("x-lightpath-attempts: "), "{headers}");
            *seen.entry(body).or_insert(0usize) += 1;
        }
        seen
    });
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        vec!["pod-1", "pod-2", "pod-3"],
        "requests balanced over every endpoint: {seen:?}"
    );

    // A stopped endpoint: GETs keep succeeding (connect failures retried on
    // another endpoint, then the endpoint is avoided and ejected).
    sb.stop_backend(2);
    let seen = sb.client.run(move || async move {
        let mut seen = BTreeMap::new();
        for _ in 0..40 {
            let (status, _, body) = request(addr).await.unwrap_or_else(|e| panic!("{e}"));
            assert!(status.contains(" 200 "), "{status}: {body}");
            *seen.entry(body).or_insert(0usize) += 1;
        }
        seen
    });
    assert!(!seen.contains_key("pod-2"), "{seen:?}");
}
