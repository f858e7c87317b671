//! The client side of a sandbox: what a test or the demo sends to a Service
//! address from inside a namespace. Every operation is bounded in time.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 request on a fresh connection; the response body (the
/// name of the `lightpath backend` that answered). Run inside a namespace.
/// Taking longer than `timeout` is an error of kind `TimedOut`.
pub async fn http_name(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let text = http_get(addr, timeout).await?;
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text:?}")))
}

/// One `GET /` on a fresh connection (`Connection: close`); the whole
/// response as text, head and body. Bounded by `timeout` as [`http_name`].
pub async fn http_get(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::with_capacity(256);
        s.read_to_end(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("http {addr}: timed out after {timeout:?}"),
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_the_body_and_rejects_a_response_without_one() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            for reply in [&b"HTTP/1.1 200 OK\r\n\r\npod-7\n"[..], b"garbage"] {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut req = [0u8; 512];
                let _ = s.read(&mut req).await;
                s.write_all(reply).await.expect("reply");
            }
        });
        let t = Duration::from_secs(5);
        assert_eq!(http_name(addr, t).await.expect("first"), "pod-7");
        let err = http_name(addr, t).await.expect_err("no header end");
        assert!(err.to_string().contains("bad response"), "{err}");
        server.await.expect("server");
    }
}
