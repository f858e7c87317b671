//! Bidirectional byte copy between two TCP sockets.
//!
//! Why not `tokio::io::copy_bidirectional`: it has no idle timeout, cannot
//! tell which side failed, and holds its buffers for the connection's whole
//! life. This copy:
//! * **half-close**: EOF from one side becomes `shutdown(WR)` towards the
//!   other, and the opposite direction keeps flowing until its own EOF;
//! * **resets propagate**: a read or write error on either side aborts both
//!   (SO_LINGER 0), so the peer sees a reset, not a clean end of stream;
//! * **idle timeout**: one timer per connection, re-armed lazily from a
//!   last-activity timestamp (no timer reset per read);
//! * **bounded memory**: a direction's buffer is allocated only when data
//!   first arrives (an idle connection holds none), starts small and grows
//!   once, to a fixed maximum, after sustained throughput. ztunnel's copy grew
//!   to 256 KiB per direction and drew memory complaints (istio/ztunnel#1630);
//!   here the ceiling is 64 KiB per direction, 128 KiB per connection, which
//!   still fills a loopback or pod-network pipe (see BENCHMARKS.md).
//!
//! Both sockets are used through `&TcpStream` readiness calls (`readable`,
//! `try_read`, `writable`, `try_write`), so the two directions share the
//! sockets without splitting or locking.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::drain;

#[derive(Debug, Clone)]
pub struct CopyConfig {
    /// Close a connection with no data in either direction for this long.
    /// 24 h: kube-proxy's `--conntrack-tcp-timeout-established` default, the
    /// point where a connection through kube-proxy's DNAT dies, so clients
    /// moving from kube-proxy never see idle connections cut sooner than
    /// before (Envoy's 1 h would cut idle database pools that used to work).
    /// Dead peers are found sooner by TCP keepalive.
    pub idle_timeout: Duration,
    /// First buffer size of a direction, allocated on its first data.
    pub initial_buffer: usize,
    /// Buffer size after `grow_after` bytes in that direction.
    pub max_buffer: usize,
    pub grow_after: u64,
}

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig {
            idle_timeout: Duration::from_secs(24 * 3600),
            // One 8 KiB read covers typical request/response exchanges.
            initial_buffer: 8 * 1024,
            max_buffer: 64 * 1024,
            // A megabyte in one direction means a bulk transfer.
            grow_after: 1024 * 1024,
        }
    }
}

/// Bytes copied in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

/// Which side of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// How a copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyEnd {
    /// Both directions reached EOF and were shut down in turn.
    Closed,
    /// `side` failed (reset, broken pipe, ...); both were aborted.
    Error(Side, io::ErrorKind),
    /// No data for the idle timeout; both were aborted.
    Idle,
    /// The drain deadline passed; both were aborted.
    Forced,
}

struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last data seen.
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves when nothing happened for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Copies `client` ⇄ `upstream` until both directions end, one side fails,
/// the idle timeout passes or the drain is forced. On anything but a clean
/// close both sockets are set to reset when dropped.
pub async fn copy_bidirectional(
    client: &TcpStream,
    upstream: &TcpStream,
    cfg: &CopyConfig,
    drain: &drain::Watch,
) -> (Transferred, CopyEnd) {
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let both = async {
        tokio::try_join!(
            pump(
                client,
                upstream,
                Side::Client,
                Side::Upstream,
                &up,
                &activity,
                cfg
            ),
            pump(
                upstream,
                client,
                Side::Upstream,
                Side::Client,
                &down,
                &activity,
                cfg
            ),
        )
    };
    let end = tokio::select! {
        r = both => match r {
            Ok(_) => CopyEnd::Closed,
            Err((side, kind)) => CopyEnd::Error(side, kind),
        },
        _ = activity.idle(cfg.idle_timeout) => CopyEnd::Idle,
        _ = drain.forced() => CopyEnd::Forced,
    };
    if end != CopyEnd::Closed {
        super::abort(client);
        super::abort(upstream);
    }
    let t = Transferred {
        client_to_upstream: up.load(Ordering::Relaxed),
        upstream_to_client: down.load(Ordering::Relaxed),
    };
    (t, end)
}

/// One direction: `from` → `to` until EOF, then `shutdown(WR)` on `to`.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    from_side: Side,
    to_side: Side,
    count: &AtomicU64,
    activity: &Activity,
    cfg: &CopyConfig,
) -> Result<(), (Side, io::ErrorKind)> {
    let mut buf: Vec<u8> = Vec::new();
    let mut total: u64 = 0;
    loop {
        from.readable().await.map_err(|e| (from_side, e.kind()))?;
        if buf.is_empty() {
            buf = vec![0; cfg.initial_buffer.max(1)];
        }
        let n = match from.try_read(&mut buf) {
            Ok(0) => {
                // Half-close: pass the EOF on; the other direction goes on.
                // ENOTCONN means the peer is already fully gone, which the
                // other direction will report.
                match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                    Err(e) => return Err((to_side, e.kind())),
                }
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err((from_side, e.kind())),
        };
        activity.touch();
        write_all(to, &buf[..n])
            .await
            .map_err(|e| (to_side, e.kind()))?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        total += n as u64;
        if total >= cfg.grow_after && buf.len() < cfg.max_buffer {
            buf = vec![0; cfg.max_buffer];
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
