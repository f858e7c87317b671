//! `expire_watches` over the wire: after it, a watch that resumes from a
//! resourceVersion gets a 410 ERROR event, even from the compaction point
//! itself (a client that was between two watches at the moment of expiry
//! must relist too); once the kind is listed again, watches resume normally.

use std::time::Duration;

use fakeapi::{FakeApi, Kind};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One GET with `Connection: close`; the whole response as text.
async fn get(api: &FakeApi, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(api.addr())
        .await
        .expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("response within 10 s")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

fn watch_path(rv: u64) -> String {
    format!("/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=1")
}

#[tokio::test]
async fn resumed_watches_get_410_until_the_kind_is_listed_again() {
    let api = FakeApi::start().await.unwrap();
    api.apply_json(
        Kind::Service,
        json!({"metadata": {"name": "web", "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]}}),
    )
    .unwrap();
    let rv = api.resource_version();
    assert!(
        !get(&api, &watch_path(rv)).await.contains("\"code\":410"),
        "a watch from the current resourceVersion must not expire before expire_watches"
    );

    api.expire_watches();
    // rv is the compaction point itself, so only the expiry makes it too old.
    let resumed = get(&api, &watch_path(rv)).await;
    assert!(
        resumed.contains("\"ERROR\"") && resumed.contains("\"code\":410"),
        "resumed watch after expiry: {resumed}"
    );

    let list = get(&api, "/api/v1/services").await;
    assert!(list.starts_with("HTTP/1.1 200"), "list: {list}");
    let after = get(&api, &watch_path(api.resource_version())).await;
    assert!(
        after.starts_with("HTTP/1.1 200") && !after.contains("\"code\":410"),
        "watch after the relist: {after}"
    );
}
