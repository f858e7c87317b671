//! Bidirectional byte copy between two TCP sockets.
//!
//! Why not `tokio::io::copy_bidirectional`: it has no idle timeout, cannot
//! tell which side failed, and holds its buffers for the connection's whole
//! life. This copy:
//! * **half-close**: EOF from one side becomes `shutdown(WR)` towards the
//!   other, and the opposite direction keeps flowing until its own EOF;
//! * **resets propagate**: a read or write error on either side aborts both
//!   (SO_LINGER 0), so the peer sees a reset, not a clean end of stream;
//! * **idle timeout**: one timer per connection that compares the byte
//!   counters every quarter of the timeout (no clock read or timer reset per
//!   message, see [`idle_watch`]): a quiet connection closes between 1× and
//!   1.25× the timeout after its last byte;
//! * **lazy upstream keepalive**: the same timer first fires after
//!   `upstream_keepalive_after` (1 s) and sets TCP keepalive on the upstream
//!   socket then. Keepalive probes start after 60 s idle, so they only ever
//!   matter for connections that live; setting them at connect time cost
//!   four `setsockopt`s on every connection, most of which (one request per
//!   connection) are closed within milliseconds. No timer is added for it:
//!   the idle timer is registered anyway and only its first deadline moves;
//! * **bounded memory**: a direction's buffer is allocated only when data
//!   first arrives (an idle connection holds none) and starts small. ztunnel's
//!   copy grew to 256 KiB per direction and drew memory complaints
//!   (istio/ztunnel#1630); here the user-space ceiling is 64 KiB per
//!   direction, 128 KiB per connection, which still fills a loopback or
//!   pod-network pipe (see BENCHMARKS.md). A spliced bulk direction holds at
//!   most `pipe_size` (1 MiB) in kernel pipe pages instead, while in flight.
//! * **zero-copy bulk**: once a direction has moved `grow_after` bytes and a
//!   read still fills the whole buffer, the flow is bulk: the buffer is freed
//!   and the direction continues with `splice(2)` through a pipe of
//!   `pipe_size` bytes ([`super::splice`]), so the bytes stay in the kernel.
//!   Request/response traffic never gets there and keeps the plain
//!   `recv`/`send` pair (a pipe would add descriptors and syscalls). Should
//!   the pipe fail (descriptor limit), the buffer grows to `max_buffer`
//!   instead, as before splice.
//!
//! * **FIN with the last data**: when the peer's FIN was already seen before
//!   a read that drained the socket, that read's data is the last: it is sent
//!   corked (`MSG_MORE`) and the `shutdown(WR)` that follows carries the FIN
//!   on the same segment, without the extra `recv` that would only return 0.
//!   The direction that ends second leaves its FIN to `close`, which follows
//!   at once. On a new connection per request (response + FIN from the
//!   backend) that is one segment and two syscalls less per connection, and
//!   on veth/loopback every segment we send is also received on our CPU.
//!
//! * **bytes reported as they flow**: each direction adds to its service's
//!   byte counter ([`Meters`]) whenever its count crosses a multiple of
//!   [`METER_STEP`] (64 KiB), and the remainder when the copy ends. A
//!   long-lived connection shows in `lightpath_tcp_*_bytes_total` while it
//!   lives (behind by less than 64 KiB per direction), not all at once when
//!   it closes, and the data path pays one shift and compare per message,
//!   not an atomic add on a counter both data threads share.
//!
//! Both sockets are used through `&TcpStream` readiness calls (`ready`,
//! `try_read`, `writable`, `try_write`), so the two directions share the
//! sockets without splitting or locking.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use metrics::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::drain;
use crate::rare::Rare;

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
    /// Per-direction user-space ceiling: the buffer size after
    /// `grow_after` bytes when splicing is off or unavailable.
    pub max_buffer: usize,
    pub grow_after: u64,
    /// Bulk directions switch to `splice(2)` (zero-copy).
    pub splice: bool,
    /// Pipe size of a spliced (bulk) direction: the most it holds in flight,
    /// in kernel pages that reference the received data (no copy).
    pub pipe_size: usize,
    /// Set TCP keepalive on the upstream socket once the connection has
    /// lived this long (`None`: never; the caller did it). The client socket
    /// inherits keepalive from the listener.
    pub upstream_keepalive_after: Option<Duration>,
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
            splice: true,
            // 1 MiB (Linux's default `pipe-max-size`): one splice pair then
            // moves whatever the socket holds, up to a megabyte, instead of
            // 64 KiB (16 pipe slots); a 1 GiB transfer costs about a fifth
            // less proxy CPU at the same rate (BENCHMARKS.md, "L4
            // keep-alive and bulk (session 5)"). Only bulk directions get a
            // pipe, and its pages are only held while data is in flight.
            pipe_size: 1024 * 1024,
            // Past the lifetime of connection-per-request traffic, far
            // below the 60 s before the first probe.
            upstream_keepalive_after: Some(Duration::from_secs(1)),
        }
    }
}

/// The counters a copy reports its bytes to as they flow (see the module
/// doc): the service's received (client → upstream) and sent (upstream →
/// client) byte counters.
#[derive(Debug, Clone, Copy)]
pub struct Meters<'a> {
    pub client_to_upstream: &'a Counter,
    pub upstream_to_client: &'a Counter,
}

/// A direction reports to its meter at every multiple of this many bytes.
pub const METER_STEP: u64 = 1 << METER_SHIFT;
const METER_SHIFT: u32 = 16;

/// Bytes copied in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// Of those, bytes moved with `splice(2)` (both directions).
    pub spliced: u64,
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

/// State the two directions share: which one ended first (see
/// [`half_close`]).
struct Activity {
    one_ended: AtomicBool,
}

/// The idle timer, with no clock on the data path: the pumps only bump
/// their byte counters (which they keep anyway), and this timer wakes every
/// `idle / 4` and compares the counters with what it saw at its last tick.
/// A tick that sees them moved records its own time as the last activity;
/// once `idle` has passed since such a tick with no movement since, the
/// connection is idle. So a quiet connection closes between `idle` and
/// `1.25 × idle` after its last byte (plus timer slack), and a connection
/// that moves data is never closed. Before, every message read the clock
/// (`Instant::now`, a vDSO `clock_gettime` and TSC read) to timestamp it.
///
/// On the way, once the connection is `keepalive.0` old, sets TCP keepalive
/// on `keepalive.1`: the one timer serves both, so a connection closed
/// before then never pays for keepalive.
async fn idle_watch(
    moved: [&AtomicU64; 2],
    idle: Duration,
    mut keepalive: Option<(Duration, &TcpStream)>,
) {
    let start = Instant::now();
    let period = (idle / 4).max(Duration::from_millis(1));
    let mut seen = 0u64;
    let mut moved_at = start;
    let mut next_tick = start + period;
    loop {
        let wake = match keepalive {
            Some((after, _)) => next_tick.min(start + after),
            None => next_tick,
        };
        tokio::time::sleep_until(wake).await;
        let now = Instant::now();
        if let Some((after, sock)) = keepalive {
            if now >= start + after {
                super::set_keepalive(sock);
                keepalive = None;
            }
        }
        if now < next_tick {
            continue;
        }
        next_tick = now + period;
        let total = moved[0]
            .load(Ordering::Relaxed)
            .wrapping_add(moved[1].load(Ordering::Relaxed));
        if total != seen {
            seen = total;
            moved_at = now;
        } else if now.duration_since(moved_at) >= idle {
            return;
        }
    }
}

/// Copies `client` ⇄ `upstream` until both directions end, one side fails,
/// the idle timeout passes or the drain is forced. On anything but a clean
/// close both sockets are set to reset when dropped.
///
/// After a clean close the FIN towards the side that ended last has not been
/// sent yet: it goes out when the socket is closed, so the caller drops both
/// sockets as soon as this returns.
///
/// One hand-written poll instead of `select!{ try_join!(..), .. }`: a wake
/// polls the two directions (each a cheap readiness check when it has
/// nothing to do) and the idle timer and drain signal only when they woke
/// the task ([`Rare`]): polled on every wake (as `select!` did), the drain's
/// `Notified` takes the drain channel's mutex, which all connections of
/// both data threads share, and the timer re-checks its entry, per message,
/// for futures that fire once in a connection's life.
///
/// With `meters`, every byte counted in the returned [`Transferred`] has
/// been added to them by the time this returns.
pub async fn copy_bidirectional(
    client: &TcpStream,
    upstream: &TcpStream,
    cfg: &CopyConfig,
    drain: &drain::Watch,
    meters: Option<Meters<'_>>,
) -> (Transferred, CopyEnd) {
    let activity = Activity {
        one_ended: AtomicBool::new(false),
    };
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let spliced = AtomicU64::new(0);
    let counts_up = Counts {
        total: &up,
        spliced: &spliced,
        meter: meters.map(|m| m.client_to_upstream),
    };
    let counts_down = Counts {
        total: &down,
        spliced: &spliced,
        meter: meters.map(|m| m.upstream_to_client),
    };
    let mut to_upstream = pin!(pump(
        client,
        upstream,
        Side::Client,
        Side::Upstream,
        counts_up,
        &activity,
        cfg
    ));
    let mut to_client = pin!(pump(
        upstream,
        client,
        Side::Upstream,
        Side::Client,
        counts_down,
        &activity,
        cfg
    ));
    let rare = pin!(async {
        tokio::select! {
            biased;
            _ = drain.forced() => CopyEnd::Forced,
            _ = idle_watch(
                [&up, &down],
                cfg.idle_timeout,
                cfg.upstream_keepalive_after.map(|after| (after, upstream)),
            ) => CopyEnd::Idle,
        }
    });
    let mut rare = Rare::new(rare);
    let (mut up_done, mut down_done) = (false, false);
    let end = std::future::poll_fn(|cx| {
        if !up_done {
            match to_upstream.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => up_done = true,
                Poll::Ready(Err((side, kind))) => return Poll::Ready(CopyEnd::Error(side, kind)),
                Poll::Pending => {}
            }
        }
        if !down_done {
            match to_client.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => down_done = true,
                Poll::Ready(Err((side, kind))) => return Poll::Ready(CopyEnd::Error(side, kind)),
                Poll::Pending => {}
            }
        }
        if up_done && down_done {
            return Poll::Ready(CopyEnd::Closed);
        }
        rare.poll_rare(cx)
    })
    .await;
    if end != CopyEnd::Closed {
        super::abort(client);
        super::abort(upstream);
    }
    counts_up.finish();
    counts_down.finish();
    let t = Transferred {
        client_to_upstream: up.load(Ordering::Relaxed),
        upstream_to_client: down.load(Ordering::Relaxed),
        spliced: spliced.load(Ordering::Relaxed),
    };
    (t, end)
}

/// Where one direction counts its bytes.
#[derive(Clone, Copy)]
struct Counts<'a> {
    /// Written by this direction only (a load and a store, not a locked
    /// read-modify-write); read by the idle timer and at the end.
    total: &'a AtomicU64,
    /// Shared by both directions.
    spliced: &'a AtomicU64,
    /// Reported to in steps of [`METER_STEP`], the rest at [`Counts::finish`].
    meter: Option<&'a Counter>,
}

impl Counts<'_> {
    fn add(&self, n: u64) {
        let t = self.total.load(Ordering::Relaxed);
        let after = t.wrapping_add(n);
        self.total.store(after, Ordering::Relaxed);
        let steps = (after >> METER_SHIFT).wrapping_sub(t >> METER_SHIFT);
        if steps != 0 {
            if let Some(m) = self.meter {
                m.increment(steps << METER_SHIFT);
            }
        }
    }

    /// Reports what the steps left out (called once, when the copy ends).
    fn finish(&self) {
        let rest = self.total.load(Ordering::Relaxed) & (METER_STEP - 1);
        if rest != 0 {
            if let Some(m) = self.meter {
                m.increment(rest);
            }
        }
    }
}

/// One direction: `from` → `to` until EOF, then `shutdown(WR)` on `to`.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    from_side: Side,
    to_side: Side,
    count: Counts<'_>,
    activity: &Activity,
    cfg: &CopyConfig,
) -> Result<(), (Side, io::ErrorKind)> {
    let mut buf: Vec<u8> = Vec::new();
    let mut total: u64 = 0;
    let mut try_splice = cfg.splice;
    loop {
        // ERROR too, so a reset is never mistaken for the FIN below.
        let ready = from
            .ready(Interest::READABLE | Interest::ERROR)
            .await
            .map_err(|e| (from_side, e.kind()))?;
        if buf.capacity() == 0 {
            buf = Vec::with_capacity(cfg.initial_buffer.max(1));
        }
        let n = match read_once(from, &mut buf) {
            Ok(0) => return half_close(to, to_side, activity),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err((from_side, e.kind())),
        };
        // The kernel queues a FIN only after all data before it, so a FIN
        // seen before a read that drained the socket makes this data the
        // last: pass it on corked and let the FIN ride on it.
        let last = ready.is_read_closed() && !ready.is_error() && n < buf.capacity();
        write_all(to, &buf[..n], last)
            .await
            .map_err(|e| (to_side, e.kind()))?;
        count.add(n as u64);
        if last {
            return half_close(to, to_side, activity);
        }
        total += n as u64;
        if total >= cfg.grow_after && n == buf.capacity() {
            // Sustained full reads: a bulk flow.
            if try_splice {
                match super::splice::Pipe::new(cfg.pipe_size) {
                    Ok(pipe) => {
                        drop(buf);
                        return pump_spliced(from, to, from_side, to_side, &pipe, count, activity)
                            .await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "no pipe for splice, copying through a buffer");
                        try_splice = false;
                    }
                }
            }
            if buf.capacity() < cfg.max_buffer {
                buf = Vec::with_capacity(cfg.max_buffer);
            }
        }
    }
}

/// The rest of one direction through `pipe`, without user-space copies.
/// The pipe is emptied into `to` before `from` is read again, so at EOF
/// nothing is left in it and the half-close is passed on at once.
async fn pump_spliced(
    from: &TcpStream,
    to: &TcpStream,
    from_side: Side,
    to_side: Side,
    pipe: &super::splice::Pipe,
    count: Counts<'_>,
    activity: &Activity,
) -> Result<(), (Side, io::ErrorKind)> {
    loop {
        from.readable().await.map_err(|e| (from_side, e.kind()))?;
        let n = match pipe.fill(from) {
            Ok(0) => return half_close(to, to_side, activity),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err((from_side, e.kind())),
        };
        let mut left = n;
        while left > 0 {
            to.writable().await.map_err(|e| (to_side, e.kind()))?;
            match pipe.drain(to, left) {
                Ok(0) => return Err((to_side, io::ErrorKind::WriteZero)),
                Ok(m) => {
                    let m = m.min(left);
                    left -= m;
                    count.add(m as u64);
                    count.spliced.fetch_add(m as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err((to_side, e.kind())),
            }
        }
    }
}

/// One `recv` into `buf`. A TCP `recv` that returns fewer bytes than asked
/// has emptied the receive queue, so the socket's read readiness is cleared
/// right away instead of finding out with a second `recv` that fails with
/// EAGAIN: one syscall less per message and direction, which on small
/// request/response traffic is a third of the relay's syscalls (haproxy's
/// raw socket layer makes the same inference).
///
/// Why this cannot lose a wakeup: the clearing goes through tokio's
/// `try_io`, which only clears the readiness *event observed before* the
/// `recv`; data or a FIN arriving after the `recv` raises a new edge-
/// triggered event with a newer tick, which the clear leaves alone, and
/// tokio never clears a seen read-closed (FIN) state.
///
/// The `recv` goes into `buf`'s spare capacity (`buf` is emptied first, and
/// holds the `n` bytes read afterwards): a fresh 8 KiB buffer per direction
/// and connection is never zeroed, which was a memset of 16 KiB per
/// connection-per-request. `try_read_buf` runs inside the outer `try_io`,
/// whose readiness it shares.
fn read_once(from: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    let want = buf.capacity();
    let mut got = 0;
    let r = from.try_io(tokio::io::Interest::READABLE, || {
        let n = from.try_read_buf(buf)?;
        got = n;
        if n > 0 && n < want {
            // Drained: Ok(n) is returned below, with readiness cleared.
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        r => r,
    }
}

/// Half-close: pass the EOF on; the other direction goes on. ENOTCONN means
/// the peer is already fully gone, which the other direction will report.
///
/// The direction that ends second skips the `shutdown`: the copy returns
/// next and the caller closes both sockets, and `close` sends the FIN (with
/// any corked data) all the same. That socket's own input is at EOF (the
/// other direction read it), so the close cannot turn into a reset.
fn half_close(
    to: &TcpStream,
    to_side: Side,
    activity: &Activity,
) -> Result<(), (Side, io::ErrorKind)> {
    if activity.one_ended.swap(true, Ordering::Relaxed) {
        return Ok(());
    }
    match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err((to_side, e.kind())),
    }
}

/// Writes all of `data`; `corked` sends it with `MSG_MORE`, so a partial
/// segment waits in the socket for the FIN that the caller sends next
/// (`tcp_send_fin` sets FIN on the last queued segment and pushes it).
async fn write_all(to: &TcpStream, mut data: &[u8], corked: bool) -> io::Result<()> {
    let flags = if corked {
        nix::libc::MSG_MORE | nix::libc::MSG_NOSIGNAL
    } else {
        nix::libc::MSG_NOSIGNAL
    };
    // `try_io` sends only when tokio has the socket as writable, and clears
    // that on EAGAIN: the `writable()` future is awaited only after a
    // WouldBlock, not before every send.
    while !data.is_empty() {
        let sent = to.try_io(Interest::WRITABLE, || {
            socket2::SockRef::from(to).send_with_flags(data, flags)
        });
        match sent {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Through real loopback sockets: client ⇄ (copy) ⇄ server.

    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: (the outside end, the end the copy holds).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn pattern(i: usize) -> u8 {
        (i.wrapping_mul(31) ^ (i >> 11)) as u8
    }

    fn cfg(splice: bool) -> CopyConfig {
        CopyConfig {
            initial_buffer: 4096,
            max_buffer: 64 * 1024,
            grow_after: 256 * 1024,
            splice,
            ..CopyConfig::default()
        }
    }

    /// Bytes reach the meters while the connection lives, in whole
    /// [`METER_STEP`]s, and exactly the transferred totals once the copy
    /// ended: through the buffer for the small reply, and through splice for
    /// the bulk upload (past `grow_after`).
    #[tokio::test]
    async fn meters_follow_the_bytes_while_the_connection_lives() {
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let meter = |a: &Arc<AtomicU64>| Counter::from_arc(a.clone());
        let (m_up, m_down) = (meter(&up), meter(&down));
        let (mut client, c) = pair().await;
        let (u, mut server) = pair().await;
        let (_sig, watch) = drain::channel();
        let cfg = cfg(true);
        let copy = tokio::spawn(async move {
            let meters = Meters {
                client_to_upstream: &m_up,
                upstream_to_client: &m_down,
            };
            copy_bidirectional(&c, &u, &cfg, &watch, Some(meters)).await
        });
        // 1 MiB + 1000 bytes up, all read by the server; the connection stays
        // open.
        const UP: usize = 1024 * 1024 + 1000;
        let data: Vec<u8> = (0..UP).map(pattern).collect();
        let (w, got) = tokio::join!(client.write_all(&data), async {
            let mut got = vec![0u8; UP];
            server.read_exact(&mut got).await.map(|_| got)
        });
        w.unwrap();
        assert_eq!(got.unwrap(), data);
        // The copy counts a chunk right after writing it: the last step may
        // be reported a moment after the server read it.
        let step = METER_STEP as usize;
        let deadline = Instant::now() + Duration::from_secs(5);
        while up.load(Ordering::Relaxed) < (UP / step * step) as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let seen = up.load(Ordering::Relaxed);
        assert_eq!(seen, (UP / step * step) as u64, "whole steps while open");
        assert_eq!(down.load(Ordering::Relaxed), 0);
        // A small reply (below one step) and the close.
        server.write_all(b"thanks").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = [0u8; 6];
        client.read_exact(&mut reply).await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        let (t, end) = copy.await.unwrap();
        assert_eq!(end, CopyEnd::Closed);
        assert!(t.spliced > 0, "the upload went through splice");
        assert_eq!(t.client_to_upstream, UP as u64);
        assert_eq!(t.upstream_to_client, 6);
        assert_eq!(up.load(Ordering::Relaxed), UP as u64, "the rest at the end");
        assert_eq!(down.load(Ordering::Relaxed), 6);
    }

    /// 8 MiB up, verified byte for byte, then half-close from the client; the
    /// server's reply still flows back after it, and the copy ends Closed.
    async fn bulk_then_half_close(splice: bool) -> Transferred {
        const TOTAL: usize = 8 * 1024 * 1024;
        let (mut client, c) = pair().await;
        let (u, mut server) = pair().await;
        let (_sig, watch) = drain::channel();
        let cfg = cfg(splice);
        let copy =
            tokio::spawn(async move { copy_bidirectional(&c, &u, &cfg, &watch, None).await });
        let send = async {
            let chunk: Vec<u8> = (0..TOTAL).map(pattern).collect();
            client.write_all(&chunk).await.unwrap();
            client.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            reply
        };
        let recv = async {
            let mut got = Vec::with_capacity(TOTAL);
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got.len(), TOTAL, "every byte arrives before the EOF");
            let bad = got.iter().enumerate().position(|(i, b)| *b != pattern(i));
            assert_eq!(bad, None, "first corrupted byte");
            server.write_all(b"after half-close").await.unwrap();
            server.shutdown().await.unwrap();
        };
        let (reply, ()) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(send, recv) })
                .await
                .expect("8 MiB through loopback within 20 s");
        assert_eq!(reply, b"after half-close");
        let (t, end) = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("copy ends after both EOFs")
            .unwrap();
        assert_eq!(end, CopyEnd::Closed);
        assert_eq!(t.client_to_upstream, TOTAL as u64);
        assert_eq!(t.upstream_to_client, 16);
        t
    }

    #[tokio::test]
    async fn bulk_direction_switches_to_splice_and_keeps_half_close() {
        let t = bulk_then_half_close(true).await;
        // Everything after the first full read past 256 KiB is spliced.
        assert!(
            t.spliced >= 7 * 1024 * 1024,
            "only {} of 8 MiB spliced",
            t.spliced
        );
    }

    /// A 1 MiB pipe toward a receiver that takes little at a time: the
    /// pipe holds far more than the receiving socket accepts, so drains
    /// are partial and wait for write readiness with data still in the
    /// pipe. Every byte still arrives, in order.
    #[tokio::test]
    async fn big_pipe_toward_a_slow_reader_delivers_every_byte() {
        const TOTAL: usize = 8 * 1024 * 1024;
        let (mut client, c) = pair().await;
        let (u, mut server) = pair().await;
        socket2::SockRef::from(&u)
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        let (_sig, watch) = drain::channel();
        let cfg = cfg(true);
        assert_eq!(cfg.pipe_size, 1024 * 1024);
        let copy =
            tokio::spawn(async move { copy_bidirectional(&c, &u, &cfg, &watch, None).await });
        let send = async {
            let chunk: Vec<u8> = (0..TOTAL).map(pattern).collect();
            client.write_all(&chunk).await.unwrap();
            client.shutdown().await.unwrap();
            client
        };
        let recv = async {
            let mut got = Vec::with_capacity(TOTAL);
            let mut buf = vec![0u8; 4096];
            // Slow at first (small reads with pauses), then at full speed.
            for _ in 0..64 {
                let n = server.read(&mut buf).await.unwrap();
                assert!(n > 0, "early EOF");
                got.extend_from_slice(&buf[..n]);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            server.read_to_end(&mut got).await.unwrap();
            got
        };
        let (_client, got) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(send, recv) })
                .await
                .expect("8 MiB through loopback within 20 s");
        assert_eq!(got.len(), TOTAL, "every byte arrives before the EOF");
        let bad = got.iter().enumerate().position(|(i, b)| *b != pattern(i));
        assert_eq!(bad, None, "first corrupted byte");
        drop(server);
        let (t, _) = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("copy ends")
            .unwrap();
        assert_eq!(t.client_to_upstream, TOTAL as u64);
        assert!(t.spliced >= 7 * 1024 * 1024, "only {} spliced", t.spliced);
    }

    #[tokio::test]
    async fn splice_off_copies_through_the_buffer() {
        let t = bulk_then_half_close(false).await;
        assert_eq!(t.spliced, 0);
    }

    #[tokio::test]
    async fn small_exchanges_never_splice() {
        let (mut client, c) = pair().await;
        let (u, mut server) = pair().await;
        let (_sig, watch) = drain::channel();
        let cfg = cfg(true);
        let copy =
            tokio::spawn(async move { copy_bidirectional(&c, &u, &cfg, &watch, None).await });
        let mut buf = [0u8; 64];
        for _ in 0..200 {
            client.write_all(b"ping").await.unwrap();
            server.read_exact(&mut buf[..4]).await.unwrap();
            server.write_all(b"pong").await.unwrap();
            client.read_exact(&mut buf[..4]).await.unwrap();
        }
        drop(client);
        drop(server);
        let (t, _) = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("copy ends when both peers close")
            .unwrap();
        assert_eq!(t.client_to_upstream, 800);
        assert_eq!(t.upstream_to_client, 800);
        assert_eq!(t.spliced, 0);
    }

    /// The backend answers and closes before the copy first reads: data and
    /// FIN are seen together, so the data goes out corked with the FIN. The
    /// client gets every byte, then EOF, and can still send on its half of
    /// the connection until it closes too.
    #[tokio::test]
    async fn data_with_fin_is_passed_on_then_the_other_half_still_flows() {
        let (mut client, c) = pair().await;
        let (u, mut server) = pair().await;
        server.write_all(b"response and goodbye").await.unwrap();
        server.shutdown().await.unwrap();
        // Let both segments (data, FIN) arrive before the copy starts.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_sig, watch) = drain::channel();
        let cfg = cfg(true);
        let copy =
            tokio::spawn(async move { copy_bidirectional(&c, &u, &cfg, &watch, None).await });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("data and EOF within 5 s")
            .unwrap();
        assert_eq!(got, b"response and goodbye");
        client.write_all(b"late").await.unwrap();
        client.shutdown().await.unwrap();
        let mut late = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut late))
            .await
            .expect("the client's half reaches the backend")
            .unwrap();
        assert_eq!(late, b"late");
        let (t, end) = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("copy ends after both EOFs")
            .unwrap();
        assert_eq!(end, CopyEnd::Closed);
        assert_eq!(t.upstream_to_client, 20);
        assert_eq!(t.client_to_upstream, 4);
    }

    /// Data followed by a reset (not a FIN) before the copy reads: the data
    /// may be passed on, but the client must see the reset, never a clean
    /// end of stream that would make a cut-off reply look complete.
    #[tokio::test]
    async fn data_then_reset_is_not_mistaken_for_fin() {
        let (mut client, c) = pair().await;
        let (u, mut server) = pair().await;
        server.write_all(b"partial").await.unwrap();
        server.set_zero_linger().unwrap();
        drop(server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_sig, watch) = drain::channel();
        let cfg = cfg(true);
        let copy =
            tokio::spawn(async move { copy_bidirectional(&c, &u, &cfg, &watch, None).await });
        let (_, end) = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("copy ends on the reset")
            .unwrap();
        assert!(
            matches!(end, CopyEnd::Error(Side::Upstream, _)),
            "ended {end:?}"
        );
        let mut got = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("client sees the end within 5 s");
        assert!(
            r.is_err(),
            "client saw a clean EOF after {got:?}, not the reset"
        );
    }

    fn keepalive_on(s: &TcpStream) -> bool {
        socket2::SockRef::from(s).keepalive().unwrap()
    }

    /// A relay between two loopback pairs whose copy sets upstream
    /// keepalive after `after`, once "ping" went through it; the upstream
    /// socket has no keepalive of its own.
    struct Relay {
        client: TcpStream,
        server: TcpStream,
        upstream: std::sync::Arc<TcpStream>,
        copy: tokio::task::JoinHandle<(Transferred, CopyEnd)>,
    }

    async fn pinged_relay(after: Duration) -> (Relay, drain::Signal) {
        let (mut client, c) = pair().await;
        let (u, mut server) = pair().await;
        let upstream = std::sync::Arc::new(u);
        assert!(!keepalive_on(&upstream));
        let (sig, watch) = drain::channel();
        let cfg = CopyConfig {
            upstream_keepalive_after: Some(after),
            ..cfg(true)
        };
        let up = upstream.clone();
        let copy =
            tokio::spawn(async move { copy_bidirectional(&c, &up, &cfg, &watch, None).await });
        let mut buf = [0u8; 4];
        client.write_all(b"ping").await.unwrap();
        server.read_exact(&mut buf).await.unwrap();
        let relay = Relay {
            client,
            server,
            upstream,
            copy,
        };
        (relay, sig)
    }

    /// A connection that outlives `upstream_keepalive_after` gets keepalive
    /// (60 s / 10 s / 6) on its upstream socket, set by the copy's timer
    /// while the connection sits idle; the client socket is left alone (it
    /// inherits keepalive from the listener).
    #[tokio::test]
    async fn upstream_keepalive_is_set_once_the_connection_lives() {
        let (mut r, _sig) = pinged_relay(Duration::from_millis(800)).await;
        let (u, mut buf) = (r.upstream.clone(), [0u8; 4]);
        assert!(!keepalive_on(&u), "not before 800 ms");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !keepalive_on(&u) {
            assert!(Instant::now() < deadline, "no keepalive after 5 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sock = socket2::SockRef::from(&*u);
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 6);
        // The relay still works after the timer fired.
        r.server.write_all(b"pong").await.unwrap();
        r.client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        drop(r.client);
        drop(r.server);
        let (_, end) = tokio::time::timeout(Duration::from_secs(5), r.copy)
            .await
            .expect("copy ends when both peers close")
            .unwrap();
        assert_eq!(end, CopyEnd::Closed);
    }

    /// A connection over before `upstream_keepalive_after` (by default a
    /// second) never pays the four keepalive `setsockopt`s.
    #[tokio::test]
    async fn short_connection_never_gets_upstream_keepalive() {
        assert_eq!(
            cfg(true).upstream_keepalive_after,
            Some(Duration::from_secs(1))
        );
        let started = Instant::now();
        // Longer than the default, so a loaded machine cannot outrun it.
        let (mut r, _sig) = pinged_relay(Duration::from_secs(4)).await;
        let (u, mut buf) = (r.upstream.clone(), [0u8; 4]);
        r.server.write_all(b"pong").await.unwrap();
        r.server.shutdown().await.unwrap();
        r.client.read_exact(&mut buf).await.unwrap();
        drop(r.client);
        let (_, end) = tokio::time::timeout(Duration::from_secs(5), r.copy)
            .await
            .expect("copy ends when both peers close")
            .unwrap();
        assert_eq!(end, CopyEnd::Closed);
        assert!(
            started.elapsed() < Duration::from_millis(3900),
            "the test itself took too long to show anything"
        );
        assert!(!keepalive_on(&u), "keepalive set on a short connection");
    }

    /// The idle timer reads no clock per message, only the byte counters
    /// every quarter of the timeout: a quiet connection is aborted no sooner
    /// than the timeout after its last byte and within 1.25× of it (plus
    /// slack for a loaded machine), while one that keeps moving bytes, in
    /// either direction, outlives several timeouts.
    #[tokio::test]
    async fn idle_timeout_by_counters_closes_quiet_keeps_busy() {
        const IDLE: Duration = Duration::from_millis(400);
        let start_copy = |c: TcpStream, u: TcpStream| {
            let (sig, watch) = drain::channel();
            let cfg = CopyConfig {
                idle_timeout: IDLE,
                ..cfg(true)
            };
            let copy = tokio::spawn(async move {
                let r = copy_bidirectional(&c, &u, &cfg, &watch, None).await;
                (r, Instant::now())
            });
            (copy, sig)
        };
        let (mut q_client, qc) = pair().await;
        let (qu, mut q_server) = pair().await;
        let (quiet, _qsig) = start_copy(qc, qu);
        let (mut b_client, bc) = pair().await;
        let (bu, mut b_server) = pair().await;
        let (busy, _bsig) = start_copy(bc, bu);
        let mut buf = [0u8; 4];
        // Before the write: the copy counts the byte after this instant.
        let last_byte = Instant::now();
        q_client.write_all(b"last").await.unwrap();
        q_server.read_exact(&mut buf).await.unwrap();
        // 1.5 s of traffic on the busy one, alternating directions.
        for i in 0..30 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if i % 2 == 0 {
                b_client.write_all(b"tick").await.unwrap();
                b_server.read_exact(&mut buf).await.unwrap();
            } else {
                b_server.write_all(b"tock").await.unwrap();
                b_client.read_exact(&mut buf).await.unwrap();
            }
        }
        let ((_, end), ended) = tokio::time::timeout(Duration::from_secs(5), quiet)
            .await
            .expect("the quiet copy ends")
            .unwrap();
        assert_eq!(end, CopyEnd::Idle);
        let after = ended.duration_since(last_byte);
        assert!(after >= IDLE, "closed {after:?} after its last byte");
        assert!(
            after <= IDLE * 5 / 4 + Duration::from_millis(400),
            "closed only {after:?} after its last byte"
        );
        assert!(!busy.is_finished(), "the busy connection was closed");
        b_client.write_all(b"more").await.unwrap();
        b_server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"more");
        drop((b_client, b_server));
        let ((_, end), _) = tokio::time::timeout(Duration::from_secs(5), busy)
            .await
            .expect("busy copy ends when both peers close")
            .unwrap();
        assert_eq!(end, CopyEnd::Closed);
    }

    /// A reset from the receiving side while spliced aborts both sides.
    #[tokio::test]
    async fn reset_while_spliced_aborts_the_copy() {
        let (mut client, c) = pair().await;
        let (u, mut server) = pair().await;
        let (_sig, watch) = drain::channel();
        let cfg = cfg(true);
        let copy =
            tokio::spawn(async move { copy_bidirectional(&c, &u, &cfg, &watch, None).await });
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            // Until the reset comes back as a write error (bounded).
            for _ in 0..100_000 {
                if client.write_all(&chunk).await.is_err() {
                    return true;
                }
            }
            false
        });
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        while got < 2 * 1024 * 1024 {
            let n = server.read(&mut buf).await.unwrap();
            assert!(n > 0, "unexpected EOF after {got} bytes");
            got += n;
        }
        server.set_zero_linger().unwrap();
        drop(server);
        let (t, end) = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("copy ends on the reset")
            .unwrap();
        assert!(
            matches!(end, CopyEnd::Error(Side::Upstream, _)),
            "ended {end:?}"
        );
        assert!(t.spliced > 0, "the reset hit the spliced path");
        let saw_error = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("client sees the abort")
            .unwrap();
        assert!(saw_error, "the client's writes must fail after the abort");
    }
}
