//! `lightpath backend`: a tiny test backend built into the same binary.
//!
//! Why in the binary: the demo and the end-to-end tests need "pods" that run
//! inside throwaway network namespaces on a fresh machine with nothing else
//! installed. Two listeners are enough to observe a proxy from outside:
//!
//! * a TCP echo port: bytes come back unchanged, and the client's FIN is
//!   answered with ours once everything is echoed (so half-close and large
//!   transfers can be checked end to end);
//! * an HTTP/1.1 port that answers every request with the backend's name
//!   (so a client can tell which endpoint it reached), and the address the
//!   connection came from in an `x-peer-addr` header (so a test can tell
//!   whether the proxy kept the client's address);
//! * a UDP echo port: every datagram comes back with the backend's name and
//!   a newline in front (request/response over UDP, and which endpoint
//!   answered); the datagram [`UDP_PEER_QUERY`] is answered with the name,
//!   a newline and the address it came from instead.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Echo buffer: big enough that a 100 MB transfer is not syscall-bound.
const ECHO_BUF: usize = 64 * 1024;

#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// Name returned by the HTTP port (e.g. the pod name).
    #[arg(long)]
    pub name: String,
    /// TCP echo listener (dual-stack when `[::]`).
    #[arg(long, default_value = "[::]:9000")]
    pub echo: SocketAddr,
    /// HTTP listener answering with the name.
    #[arg(long, default_value = "[::]:8080")]
    pub http: SocketAddr,
    /// UDP echo socket: replies are `NAME\n` + the datagram. Default: the
    /// TCP echo address (same port number, UDP).
    #[arg(long)]
    pub udp_echo: Option<SocketAddr>,
}

/// Serves both listeners until the process is killed. Prints one
/// `backend NAME ready` line once both are bound, for callers to wait on.
pub async fn run(args: BackendArgs) -> std::io::Result<()> {
    let echo = TcpListener::bind(args.echo).await?;
    let http = TcpListener::bind(args.http).await?;
    let udp = UdpSocket::bind(args.udp_echo.unwrap_or(args.echo)).await?;
    println!("backend {} ready", args.name);
    let name: Arc<str> = args.name.into();
    let body = Bytes::from(format!("{name}\n"));
    let udp_prefix = body.clone();
    tokio::select! {
        r = accept_loop(echo, |s| async move { let _ = echo_conn(s).await; }) => r,
        r = accept_loop(http, move |s| http_conn(s, body.clone())) => r,
        r = udp_echo(udp, udp_prefix) => r,
    }
}

/// The UDP datagram that asks for the sender's address as the backend saw it.
pub const UDP_PEER_QUERY: &[u8] = b"peer?";

/// Answers every datagram with `prefix` + the datagram, to its sender
/// ([`UDP_PEER_QUERY`]: `prefix` + the sender's address).
async fn udp_echo(sock: UdpSocket, prefix: Bytes) -> std::io::Result<()> {
    // Never returns: the `Result` only matches the other serving loops.
    let mut buf = vec![0u8; 65_536];
    let mut out = Vec::with_capacity(prefix.len() + 2048);
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            // Transient (ENOMEM and the like): back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        out.clear();
        out.extend_from_slice(&prefix);
        if &buf[..n] == UDP_PEER_QUERY {
            out.extend_from_slice(from.to_string().as_bytes());
        } else {
            out.extend_from_slice(&buf[..n]);
        }
        // A lost reply is what UDP does; the client retries or counts it.
        let _ = sock.send_to(&out, from).await;
    }
}

async fn accept_loop<F, Fut>(listener: TcpListener, handle: F) -> std::io::Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(handle(s));
            }
            // EMFILE and friends: back off instead of spinning.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

/// Echoes until the client's FIN, then sends ours.
async fn echo_conn(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; ECHO_BUF];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return s.shutdown().await;
        }
        s.write_all(&buf[..n]).await?;
    }
}

/// The response header naming the address the backend saw the connection
/// come from (the proxy's, or the client's when the proxy kept it).
pub const PEER_HEADER: &str = "x-peer-addr";

async fn http_conn(s: TcpStream, body: Bytes) {
    let peer = s
        .peer_addr()
        .ok()
        .and_then(|a| hyper::header::HeaderValue::from_str(&a.to_string()).ok());
    let svc = service_fn(move |_req| {
        let body = body.clone();
        let peer = peer.clone();
        async move {
            let mut resp = hyper::Response::new(Full::new(body));
            if let Some(p) = peer {
                resp.headers_mut().insert(PEER_HEADER, p);
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(s), svc)
        .await;
}
