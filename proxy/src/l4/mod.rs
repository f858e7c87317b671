//! The L4 TCP relay: connect to a balanced endpoint (retrying on another one
//! when a connect fails), then copy bytes both ways until both sides are done.
//!
//! Why its own module, apart from the accept loop: the L7 stack reuses the
//! connect step (with its balancer bookkeeping and SO_MARK) for its upstream
//! connections, and `Upgrade`/`CONNECT` tunnels reuse the copy step.
//!
//! * [`connect`]: bounded attempts, each with a timeout, each on an endpoint
//!   not tried before; every outcome is reported to the balancer (connect
//!   time as the latency sample, or a failure).
//! * [`copy`]: bidirectional copy with half-close, reset propagation, an idle
//!   timeout and bounded per-connection memory.
//! * [`splice`]: the zero-copy path [`copy`] switches bulk directions to.

pub mod connect;
pub mod copy;
pub mod splice;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::balance::{Balancer, Scope};
use crate::drain;

pub use connect::{connect, Client, ConnectConfig, ConnectError, Source};
pub use copy::{copy_bidirectional, CopyConfig, CopyEnd, Meters, Transferred};

/// Settings of the L4 relay.
#[derive(Debug, Clone, Default)]
pub struct RelayConfig {
    pub connect: ConnectConfig,
    pub copy: CopyConfig,
}

/// What one relayed connection did (for logs and tests).
#[derive(Debug, Clone)]
pub struct RelayReport {
    pub endpoint: SocketAddr,
    /// Connect attempts made, including the successful one.
    pub attempts: usize,
    pub transferred: Transferred,
    pub end: CopyEnd,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("drain deadline passed while connecting")]
    Forced,
}

/// Relays `client` (whose address is `from.ip`, as `accept` returned it:
/// no `getpeername` per connection) to an endpoint chosen by `balancer` from
/// `scope`, connecting from the source `from.source` says. TCP_NODELAY and keepalive are expected on `client` already,
/// inherited from the listener (see [`tune_listener`]). The upstream socket
/// gets TCP_NODELAY at connect and keepalive only if the connection is still
/// open after [`CopyConfig::upstream_keepalive_after`] (see [`copy`]).
///
/// When no endpoint can be reached the client is reset (SO_LINGER 0), the
/// closest a proxy can get to the "connection refused" kube-proxy's DNAT
/// would have produced. Errors are returned for logging only; every socket is
/// closed when this returns.
pub async fn relay(
    client: TcpStream,
    from: Client,
    balancer: Arc<Balancer>,
    scope: Scope,
    cfg: &RelayConfig,
    drain: &drain::Watch,
    meters: Option<Meters<'_>>,
) -> Result<RelayReport, RelayError> {
    let connected = tokio::select! {
        r = connect(&balancer, scope, from, &cfg.connect) => r,
        _ = drain.forced() => {
            abort(&client);
            return Err(RelayError::Forced);
        }
    };
    let (upstream, pick, attempts) = match connected {
        Ok(c) => c,
        Err(e) => {
            abort(&client);
            return Err(e.into());
        }
    };
    let endpoint = pick.addr();
    let (transferred, end) = copy_bidirectional(&client, &upstream, &cfg.copy, drain, meters).await;
    // The in-flight slot is held until both sockets are done.
    drop(pick);
    Ok(RelayReport {
        endpoint,
        attempts,
        transferred,
        end,
    })
}

/// Closes `sock` with a RST instead of a FIN when it is dropped, so the peer
/// sees an abort rather than a clean end of stream.
pub fn abort(sock: &TcpStream) {
    let _ = sock.set_zero_linger();
}

/// TCP keepalive on proxied sockets: a peer that vanished without FIN or RST
/// (node crash, network partition) is detected within about two minutes
/// instead of holding two descriptors until the idle timeout. Probes are
/// answered by a live peer's kernel, so healthy idle connections are not cut.
fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6)
}

/// Keepalive on one socket (upstream sockets: at once for L7's pooled ones,
/// after a second for relayed ones; client sockets of a listener that
/// [`tune_listener`] could not tune). Four setsockopt calls.
pub(crate) fn set_keepalive(sock: &TcpStream) {
    let _ = socket2::SockRef::from(sock).set_tcp_keepalive(&keepalive());
}

/// Sets TCP_NODELAY and the keepalive options on a listening socket once:
/// Linux copies both into every socket `accept` returns, which saves five
/// setsockopt calls per accepted connection on the new-connection path.
/// On error the caller sets them per connection instead.
pub fn tune_listener<S: std::os::fd::AsFd>(listener: &S) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(listener);
    sock.set_tcp_nodelay(true)?;
    sock.set_tcp_keepalive(&keepalive())
}
