//! The L4 kernel fast path: an established relayed pair is handed to the
//! kernel's sockmap ([`redirect::bpf`]) and user space only watches for the
//! end of the connection.
//!
//! Why: the user-space copy costs two `recv`, two `send` and the epoll
//! wake-ups per request, and most of the relay's CPU is kernel time around
//! those calls. Spliced by the verdict program, each received skb goes
//! straight to the other socket's send path; user space sees no data at all.
//!
//! What user space still does, and why each step is safe:
//! * **Activation**: both sockets go into the maps (targets first, see
//!   [`redirect::bpf`]), leave tokio's epoll (they would otherwise wake the
//!   reactor on every skb) and are kicked with `SO_RCVLOWAT` so bytes queued
//!   before activation (the client's first request, a server's greeting) are
//!   seen by the program. They are never read here, so order is kept.
//! * **Watching**: a per-connection epoll instance holds both sockets with
//!   `EPOLLRDHUP` only (plus the implicit `EPOLLERR`/`EPOLLHUP`): a data
//!   wake-up carries `EPOLLIN` in its key and does not match, so the watcher
//!   wakes for FIN, reset or error and nothing else.
//! * **Half-close**: the program never sees a FIN. When one side's FIN
//!   arrives, the bytes it sent before may still sit in the peer's psock
//!   queue; shutting the peer's write side (or leaving the maps) now would
//!   lose them. So the FIN is passed on only once the peer's sent + queued
//!   bytes (`tcpi_bytes_acked` then `SIOCOUTQ`, in that order, so a racing
//!   ACK can only make it look smaller) reach what this side received
//!   (`tcpi_bytes_received`), checked with a short backoff; no progress for
//!   the idle timeout aborts both.
//! * **Reset / error** on either side aborts both (SO_LINGER 0), as the
//!   user-space copy does. **Idle timeout**: when the timer fires,
//!   `tcpi_last_data_recv` of both sockets says whether data moved meanwhile.
//!   **Drain**: spliced connections keep working until the forced deadline.
//! * **End**: both FINs passed on → the pair leaves the maps, then both
//!   sockets close. Byte counts come from `TCP_INFO`.
//! * **No backpressure (kernel limitation, why this is off by default)**:
//!   on 6.18 `tcp_read_skb` orphans each skb it hands to the program
//!   (`skb_set_owner_sk_safe` → `skb_orphan` uncharges the receiving
//!   socket's rmem), so the receive window never closes and skbs for a peer
//!   that does not read pile up, uncharged, in the peer's psock queue. The
//!   user-space copy is bounded by the socket buffers; this path is not
//!   (`slow_reader_backpressure_is_bounded` in tests/l4_sockmap.rs).
//! * **Splice interplay**: a spliced flow has no user-space copy at all, so
//!   the `splice(2)` switch of [`super::copy`] never applies to it. When the
//!   maps are full or an insert fails, the connection is copied in user space
//!   as before.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use redirect::bpf::{BpfError, InsertError, PairKeys, SockPairMap};
use redirect::sockopt::{outq, register_epoll, tcp_counters, TcpCounters, WatchFd};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::copy::{copy_bidirectional, CopyConfig, CopyEnd, Side, Transferred};
use crate::drain;

/// Sockets the maps hold by default: 65,536, i.e. 32,768 spliced
/// connections; a connection that finds the maps full is copied in user
/// space.
pub const DEFAULT_CAPACITY: u32 = 65_536;

/// When to use the fast path (`lightpath run --l4-sockmap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Setting {
    /// Load it; when that fails, warn once and copy in user space.
    Auto,
    /// Load it or refuse to start.
    On,
    /// Copy in user space.
    Off,
}

impl std::str::FromStr for Setting {
    type Err = String;
    fn from_str(s: &str) -> Result<Setting, String> {
        match s {
            "auto" => Ok(Setting::Auto),
            "on" => Ok(Setting::On),
            "off" => Ok(Setting::Off),
            other => Err(format!(
                "--l4-sockmap: expected auto, on or off, got {other:?}"
            )),
        }
    }
}

/// The process's one map pair and verdict program.
#[derive(Debug)]
pub struct FastPath {
    maps: SockPairMap,
}

impl FastPath {
    /// Loads the maps (`capacity` sockets) and the verdict program.
    pub fn load(capacity: u32) -> Result<Arc<FastPath>, BpfError> {
        Ok(Arc::new(FastPath {
            maps: SockPairMap::load(capacity)?,
        }))
    }

    /// What `setting` gives: `Ok(None)` for off, or for auto when loading
    /// failed (logged once here, as a warning).
    pub fn from_setting(
        setting: Setting,
        capacity: u32,
    ) -> Result<Option<Arc<FastPath>>, BpfError> {
        match setting {
            Setting::Off => Ok(None),
            Setting::On => FastPath::load(capacity).map(Some),
            Setting::Auto => match FastPath::load(capacity) {
                Ok(fp) => Ok(Some(fp)),
                Err(e) => {
                    tracing::warn!(error = %e, "L4 kernel fast path unavailable, relaying TCP in user space");
                    Ok(None)
                }
            },
        }
    }
}

/// Relays `client` ⇄ `upstream` in the kernel until both directions end,
/// one side fails, the idle timeout passes or the drain is forced; falls
/// back to [`copy_bidirectional`] when the pair cannot be inserted.
pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    fp: &FastPath,
    cfg: &CopyConfig,
    drain: &drain::Watch,
) -> (Transferred, CopyEnd) {
    let keys = match fp.maps.insert_pair(&client, &upstream) {
        Ok(keys) => keys,
        Err(e) => {
            match e {
                InsertError::Full => tracing::debug!("sockmap full, copying in user space"),
                InsertError::Other(e) => {
                    tracing::debug!(error = %e, "sockmap insert failed, copying in user space")
                }
            }
            return copy_bidirectional(&client, &upstream, cfg, drain).await;
        }
    };
    // Out of tokio's epoll: from here on no data wake-up reaches user space.
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        (c, u) => {
            // Deregistration failed: whichever socket is left closes with a
            // reset (it was never read, so its peer must not see a clean end).
            for s in [c.ok(), u.ok()].into_iter().flatten() {
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
            let _ = fp.maps.remove_pair(&keys);
            return (
                Transferred::default(),
                CopyEnd::Error(Side::Client, io::ErrorKind::Other),
            );
        }
    };
    let pair = Pair {
        sides: [
            End::new(client, Side::Client, 0),
            // The active opener's SYN counts in its tcpi_bytes_acked.
            End::new(upstream, Side::Upstream, 1),
        ],
    };
    let end = match Spliced::start(&pair) {
        Ok(mut s) => s.run(cfg, drain).await,
        Err((side, e)) => Finish::Abort(CopyEnd::Error(side, e.kind())),
    };
    pair.finish(end, fp, &keys)
}

/// One socket of the pair.
struct End {
    sock: std::net::TcpStream,
    side: Side,
    /// Sequence space in `tcpi_bytes_acked` that is not data (the SYN).
    syn: u64,
}

impl End {
    fn new(sock: std::net::TcpStream, side: Side, syn: u64) -> End {
        End { sock, side, syn }
    }

    fn counters(&self) -> Result<TcpCounters, (Side, io::Error)> {
        tcp_counters(&self.sock).map_err(|e| (self.side, e))
    }

    /// Data bytes handed to this socket's TCP so far (sent or queued), as
    /// seen from the kernel: acked first, then the send queue.
    fn written(&self) -> Result<u64, (Side, io::Error)> {
        let acked = self.counters()?.bytes_acked;
        let queued = outq(&self.sock).map_err(|e| (self.side, e))?;
        Ok((acked + queued).saturating_sub(self.syn))
    }
}

struct Pair {
    sides: [End; 2],
}

/// How the spliced phase ended.
enum Finish {
    /// Both FINs were passed on.
    Closed,
    Abort(CopyEnd),
}

impl Pair {
    /// Leaves the maps (clean end) or resets both (any other end), then
    /// closes both sockets. Byte counts come from `TCP_INFO`.
    fn finish(self, end: Finish, fp: &FastPath, keys: &PairKeys) -> (Transferred, CopyEnd) {
        let received = |e: &End| {
            // A received FIN counts one in tcpi_bytes_received.
            e.counters()
                .map(|c| c.bytes_received.saturating_sub(1))
                .unwrap_or(0)
        };
        let t = Transferred {
            client_to_upstream: received(&self.sides[0]),
            upstream_to_client: received(&self.sides[1]),
            spliced: 0,
        };
        let end = match end {
            Finish::Closed => {
                if let Err(e) = fp.maps.remove_pair(keys) {
                    // Closing removes the entries as well.
                    tracing::debug!(error = %e, "sockmap removal failed");
                }
                CopyEnd::Closed
            }
            Finish::Abort(end) => {
                for e in &self.sides {
                    let _ = socket2::SockRef::from(&e.sock).set_linger(Some(Duration::ZERO));
                }
                end
            }
        };
        // Dropping `self` closes both; a socket still in a map leaves it in
        // the kernel's close path.
        (t, end)
    }
}

struct Spliced<'a> {
    pair: &'a Pair,
    /// Reports FIN, reset and errors of the pair.
    watch: AsyncFd<WatchFd>,
    /// The side's FIN has arrived.
    eof: [bool; 2],
    /// The side's FIN was passed on to the other side (shutdown(WR) there).
    passed: [bool; 2],
}

impl<'a> Spliced<'a> {
    fn start(pair: &'a Pair) -> Result<Spliced<'a>, (Side, io::Error)> {
        let sys = |e: nix::Error| (Side::Client, io::Error::from(e));
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(sys)?;
        for (i, e) in pair.sides.iter().enumerate() {
            ep.add(
                e.sock.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET, i as u64),
            )
            .map_err(|err| (e.side, io::Error::from(err)))?;
        }
        let watch = register_epoll(ep).map_err(|e| (Side::Client, e))?;
        // Bytes that arrived before activation: let the program see them.
        for e in &pair.sides {
            redirect::bpf::kick(&e.sock).map_err(|err| (e.side, io::Error::other(err)))?;
        }
        Ok(Spliced {
            pair,
            watch,
            eof: [false; 2],
            passed: [false; 2],
        })
    }

    async fn run(&mut self, cfg: &CopyConfig, drain: &drain::Watch) -> Finish {
        let idle = cfg.idle_timeout;
        let mut idle_at = Instant::now() + idle;
        // Flush polling: 1 ms doubling up to 50 ms, with progress tracking.
        let mut backoff = Duration::from_millis(1);
        let mut progress: [(u64, Instant); 2] = [(0, Instant::now()); 2];
        loop {
            // Pass on every FIN whose bytes are all out.
            for (from, seen) in progress.iter_mut().enumerate() {
                if !self.eof[from] || self.passed[from] {
                    continue;
                }
                match self.flushed(from) {
                    Ok(Some(written)) => {
                        let now = Instant::now();
                        if written != seen.0 {
                            *seen = (written, now);
                        } else if now.duration_since(seen.1) >= idle {
                            return Finish::Abort(CopyEnd::Idle);
                        }
                    }
                    Ok(None) => {
                        let to = &self.pair.sides[1 - from];
                        match socket2::SockRef::from(&to.sock).shutdown(std::net::Shutdown::Write) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                            Err(e) => return Finish::Abort(CopyEnd::Error(to.side, e.kind())),
                        }
                        self.passed[from] = true;
                        backoff = Duration::from_millis(1);
                    }
                    Err((side, e)) => return Finish::Abort(CopyEnd::Error(side, e.kind())),
                }
            }
            if self.passed == [true, true] {
                return Finish::Closed;
            }
            let flushing = (0..2).any(|i| self.eof[i] && !self.passed[i]);
            let wake = if flushing {
                (Instant::now() + backoff).min(idle_at)
            } else {
                idle_at
            };
            tokio::select! {
                r = self.watch.readable() => match r {
                    Ok(mut guard) => {
                        if let Err(end) = read_events(guard.get_inner(), self.pair, &mut self.eof) {
                            return Finish::Abort(end);
                        }
                        guard.clear_ready();
                        // Events are edge-triggered: the wait above took
                        // them all, so clearing cannot lose one (a new one
                        // makes the epoll fd readable again).
                    }
                    Err(e) => return Finish::Abort(CopyEnd::Error(Side::Client, e.kind())),
                },
                _ = tokio::time::sleep_until(wake) => {
                    if flushing {
                        backoff = (backoff * 2).min(Duration::from_millis(50));
                    }
                }
                _ = drain.forced() => return Finish::Abort(CopyEnd::Forced),
            }
            if Instant::now() >= idle_at {
                match self.quiet_for() {
                    Ok(q) if q >= idle => return Finish::Abort(CopyEnd::Idle),
                    Ok(q) => idle_at = Instant::now() + (idle - q),
                    Err((side, e)) => return Finish::Abort(CopyEnd::Error(side, e.kind())),
                }
            }
        }
    }
}

/// Reads the pending events: FIN marks a side's end (`eof`), a reset or
/// error ends the relay.
fn read_events(watch: &WatchFd, pair: &Pair, eof: &mut [bool; 2]) -> Result<(), CopyEnd> {
    let mut evs = [EpollEvent::empty(); 4];
    loop {
        let n = match watch.epoll().wait(&mut evs, EpollTimeout::ZERO) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(CopyEnd::Error(Side::Client, io::Error::from(e).kind())),
        };
        for ev in &evs[..n] {
            let Some(e) = pair.sides.get(ev.data() as usize) else {
                continue;
            };
            let flags = ev.events();
            if flags.contains(EpollFlags::EPOLLERR) {
                let kind = match e.sock.take_error() {
                    Ok(Some(err)) => err.kind(),
                    _ => io::ErrorKind::ConnectionReset,
                };
                return Err(CopyEnd::Error(e.side, kind));
            }
            if flags.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP) {
                eof[ev.data() as usize] = true;
            }
        }
        if n < evs.len() {
            return Ok(());
        }
    }
}

impl Spliced<'_> {
    /// `Ok(None)` when everything `from` received has been handed to the
    /// other side's TCP; else `Ok(Some(written so far))`.
    fn flushed(&self, from: usize) -> Result<Option<u64>, (Side, io::Error)> {
        let src = &self.pair.sides[from];
        let dst = &self.pair.sides[1 - from];
        // `from` has its FIN: its count is final (minus the FIN's one).
        let received = src.counters()?.bytes_received.saturating_sub(1);
        let written = dst.written()?;
        Ok(if written >= received {
            None
        } else {
            Some(written)
        })
    }

    /// How long neither socket has received data.
    fn quiet_for(&self) -> Result<Duration, (Side, io::Error)> {
        let mut ms = u32::MAX;
        for e in &self.pair.sides {
            ms = ms.min(e.counters()?.last_data_recv_ms);
        }
        Ok(Duration::from_millis(ms as u64))
    }
}
