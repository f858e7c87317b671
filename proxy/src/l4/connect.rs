//! Connecting to a balanced endpoint, with bounded retries on other endpoints.
//!
//! Why retry at all at L4: the client's SYN has already been accepted by
//! lightpath, so a failed upstream connect would otherwise surface as a reset
//! of an established connection. kube-proxy's DNAT cannot retry; we can, as
//! long as no byte has been exchanged, which is the case until connect
//! succeeds.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::balance::{Balancer, Pick, Scope};
use control::ServicePortName;

#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// Per-attempt connect timeout. 1 s (linkerd2-proxy's default): an
    /// in-cluster connect completes in well under a millisecond, and Linux
    /// retransmits an unanswered SYN after 1 s, so waiting longer only
    /// waits for a retransmit when another endpoint could answer now.
    pub timeout: Duration,
    /// Endpoints tried per connection, each a different one. 3: enough to
    /// ride over one or two dead pods, bounded so a fully broken service
    /// fails within ~3 s instead of walking the whole set.
    pub attempts: usize,
    /// SO_MARK for upstream sockets so the node's own redirect rules never
    /// capture them; 0 = no mark (tests without CAP_NET_ADMIN).
    pub mark: u32,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        ConnectConfig {
            timeout: Duration::from_secs(1),
            attempts: 3,
            mark: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{service}: no endpoints")]
    NoEndpoints { service: ServicePortName },
    #[error("{service}: {attempts} connect attempt(s) failed, last to {last}: {source}")]
    Exhausted {
        service: ServicePortName,
        attempts: usize,
        last: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("client socket: {0}")]
    Client(#[source] io::Error),
}

/// Connects to an endpoint of `scope` for `client`, trying up to
/// `cfg.attempts` distinct endpoints. Returns the stream, the balancer's
/// in-flight [`Pick`] (hold it for the connection's lifetime) and the number
/// of attempts made.
pub async fn connect(
    balancer: &Balancer,
    scope: Scope,
    client: IpAddr,
    cfg: &ConnectConfig,
) -> Result<(TcpStream, Pick, usize), ConnectError> {
    let attempts = cfg.attempts.max(1);
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(attempts);
    let mut last_err: Option<(SocketAddr, io::Error)> = None;
    while tried.len() < attempts {
        let Some(mut pick) = balancer.pick(scope, client, &tried) else {
            break;
        };
        let addr = pick.addr();
        tried.push(addr);
        let started = std::time::Instant::now();
        match connect_one(addr, cfg).await {
            Ok(stream) => {
                balancer.metrics().connect_succeeded(started.elapsed());
                pick.record_success();
                return Ok((stream, pick, tried.len()));
            }
            Err(e) => {
                balancer.metrics().connect_failed();
                pick.record_failure();
                // Outlier ejection (shared with L7): a streak of failed
                // connects takes the endpoint out for a while.
                balancer.report_failure(pick.backend(), &crate::balance::OutlierConfig::default());
                tracing::debug!(service = %balancer.name(), endpoint = %addr, error = %e, "connect failed");
                last_err = Some((addr, e));
            }
        }
    }
    let service = balancer.name().clone();
    match last_err {
        Some((last, source)) => Err(ConnectError::Exhausted {
            service,
            attempts: tried.len(),
            last,
            source,
        }),
        None => Err(ConnectError::NoEndpoints { service }),
    }
}

/// One attempt: a (marked) socket, connected within the timeout.
pub async fn connect_one(addr: SocketAddr, cfg: &ConnectConfig) -> io::Result<TcpStream> {
    let sock = redirect::sockopt::upstream_socket(addr, cfg.mark)?;
    let stream = match tokio::time::timeout(cfg.timeout, sock.connect(addr)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", cfg.timeout),
            ))
        }
    };
    super::set_keepalive(&stream);
    Ok(stream)
}
