//! The L4 kernel fast path (BPF sockmap) through real loopback sockets:
//! client ⇄ [accepted socket ⇄ kernel ⇄ upstream socket] ⇄ server, driven by
//! `lightpath::l4::sockmap::relay` directly (so each test holds the pair's
//! outer ends) and once through the server with a balanced service.
//!
//! Needs root (bpf(2)); without it every test fails naming
//! LIGHTPATH_SKIP_ROOT_TESTS=1, which skips them.

#[path = "l4_common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use control::Affinity;
use lightpath::drain;
use lightpath::l4::copy::{CopyConfig, CopyEnd, Side, Transferred};
use lightpath::l4::sockmap::{self, FastPath};
use lightpath::l4::RelayConfig;
use lightpath::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SKIP_ENV: &str = "LIGHTPATH_SKIP_ROOT_TESTS";

/// Loads the fast path, or `None` when the skip switch is set; fails the
/// test with the switch named when not root.
fn fast_path(test: &str, capacity: u32) -> Option<Arc<FastPath>> {
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: {SKIP_ENV}=1");
        return None;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} needs root (bpf(2)). Run as root, or set {SKIP_ENV}=1 to skip it."
    );
    Some(FastPath::load(capacity).unwrap_or_else(|e| panic!("{test}: {e}")))
}

/// A connected loopback pair on `ip`: (outside end, the end the relay holds).
async fn pair(ip: &str) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind((ip, 0)).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (a, b) = (a.expect("connect"), b.expect("accept").0);
    a.set_nodelay(true).expect("nodelay");
    (a, b)
}

/// client, server, and the running relay between them. The relay's upstream
/// socket is the *connecting* end of its pair, as in lightpath.
struct Rig {
    client: TcpStream,
    server: TcpStream,
    relay: JoinHandle<(Transferred, CopyEnd)>,
    signal: Option<drain::Signal>,
    /// The relay's own two sockets: (client-facing, upstream).
    inner: (SocketAddr, SocketAddr),
}

/// Starts a relay between a fresh client and server. `pre_client` and
/// `pre_server` are written (and left to land in the relay's receive
/// queues) before the relay starts.
async fn rig_with(
    ip: &str,
    fp: Arc<FastPath>,
    cfg: CopyConfig,
    pre_client: &[u8],
    pre_server: &[u8],
) -> Rig {
    let (mut client, accepted) = pair(ip).await;
    let l = TcpListener::bind((ip, 0)).await.expect("bind server");
    let (up, srv) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
    let (upstream, mut server) = (up.expect("connect"), srv.expect("accept").0);
    server.set_nodelay(true).expect("nodelay");
    let inner = (
        accepted.local_addr().unwrap(),
        upstream.local_addr().unwrap(),
    );
    if !pre_client.is_empty() || !pre_server.is_empty() {
        client.write_all(pre_client).await.expect("pre-write");
        server.write_all(pre_server).await.expect("pre-write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (signal, watch) = drain::channel();
    let relay =
        tokio::spawn(async move { sockmap::relay(accepted, upstream, &fp, &cfg, &watch).await });
    Rig {
        client,
        server,
        relay,
        signal: Some(signal),
        inner,
    }
}

async fn rig(ip: &str, fp: Arc<FastPath>) -> Rig {
    rig_with(ip, fp, CopyConfig::default(), b"", b"").await
}

impl Rig {
    async fn ended(self) -> (Transferred, CopyEnd) {
        tokio::time::timeout(WAIT, self.relay)
            .await
            .expect("relay ends in time")
            .expect("relay task")
    }
}

/// Deterministic pseudo-random byte stream (xorshift64), so a receiver
/// checks what arrives without a copy, whatever the read sizes.
struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    fn new(seed: u64) -> Pattern {
        Pattern {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.word = self.state.to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

/// Writes `total` pattern bytes in `chunk`-sized writes, then half-closes.
async fn send_pattern(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    seed: u64,
    total: usize,
    chunk: usize,
) -> tokio::net::tcp::OwnedWriteHalf {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; chunk];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk);
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await.expect("send");
        left -= n;
    }
    w.shutdown().await.expect("half-close");
    w
}

/// Reads to EOF and checks every byte against the pattern.
async fn expect_pattern(mut r: tokio::net::tcp::OwnedReadHalf, seed: u64, total: usize) {
    let mut p = Pattern::new(seed);
    let mut got = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut seen = 0usize;
    loop {
        let n = r.read(&mut got).await.expect("read");
        if n == 0 {
            break;
        }
        p.fill(&mut want[..n]);
        assert!(
            got[..n] == want[..n],
            "stream differs within bytes {seen}..{}",
            seen + n
        );
        seen += n;
    }
    assert_eq!(seen, total, "bytes received before EOF");
}

async fn both_ways_intact(ip: &str, fp: Arc<FastPath>) {
    const TOTAL: usize = 4 * 1024 * 1024;
    let r = rig(ip, fp).await;
    let (cr, cw) = r.client.into_split();
    let (sr, sw) = r.server.into_split();
    let relay = r.relay;
    let all = async {
        tokio::join!(
            send_pattern(cw, 1, TOTAL, 8 * 1024),
            send_pattern(sw, 2, TOTAL, 8 * 1024),
            expect_pattern(sr, 1, TOTAL),
            expect_pattern(cr, 2, TOTAL),
        )
    };
    let all = tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(30), all).await });
    let (t, end) = tokio::time::timeout(WAIT, relay)
        .await
        .expect("relay ends after both FINs")
        .expect("relay task");
    assert_eq!(end, CopyEnd::Closed, "{t:?}");
    all.await
        .expect("streams")
        .expect("4 MiB each way within 30 s");
    assert_eq!(t.client_to_upstream, TOTAL as u64);
    assert_eq!(t.upstream_to_client, TOTAL as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_megabytes_both_ways_at_once_v4() {
    let Some(fp) = fast_path("random_megabytes_both_ways_at_once_v4", 64) else {
        return;
    };
    both_ways_intact("127.0.0.1", fp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_megabytes_both_ways_at_once_v6() {
    let Some(fp) = fast_path("random_megabytes_both_ways_at_once_v6", 64) else {
        return;
    };
    both_ways_intact("::1", fp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_pipelined_writes_arrive_in_order() {
    let Some(fp) = fast_path("many_small_pipelined_writes_arrive_in_order", 64) else {
        return;
    };
    let r = rig("127.0.0.1", fp).await;
    let (cr, mut cw) = r.client.into_split();
    let (mut sr, mut sw) = r.server.into_split();
    // The server echoes whatever it gets; the client writes 5000 small
    // numbered records without waiting, then checks the echo in order.
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = sr.read(&mut buf).await.expect("server read");
            if n == 0 {
                sw.shutdown().await.expect("server half-close");
                return;
            }
            sw.write_all(&buf[..n]).await.expect("server echo");
        }
    });
    let mut expected = Vec::new();
    for i in 0..5000u32 {
        let rec = format!("{i}:{}\n", "x".repeat((i % 97) as usize));
        expected.extend_from_slice(rec.as_bytes());
        cw.write_all(rec.as_bytes()).await.expect("client write");
    }
    cw.shutdown().await.expect("client half-close");
    let mut got = Vec::new();
    let mut cr = cr;
    tokio::time::timeout(WAIT, cr.read_to_end(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert!(
        got == expected,
        "echo differs ({} of {} bytes)",
        got.len(),
        expected.len()
    );
    echo.await.expect("echo task");
    let (t, end) = tokio::time::timeout(WAIT, r.relay)
        .await
        .expect("end")
        .expect("task");
    assert_eq!(end, CopyEnd::Closed);
    assert_eq!(t.client_to_upstream, expected.len() as u64);
}

/// The client's request and the server's greeting are both queued on the
/// relay's sockets before it starts: the kick makes the program see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_greeting_queued_before_activation_arrive() {
    let Some(fp) = fast_path("request_and_greeting_queued_before_activation_arrive", 64) else {
        return;
    };
    let req = b"GET / HTTP/1.1\r\n\r\n";
    let greet = b"220 hello\r\n";
    let mut r = rig_with("127.0.0.1", fp, CopyConfig::default(), req, greet).await;
    let mut got = [0u8; 18];
    tokio::time::timeout(WAIT, r.server.read_exact(&mut got))
        .await
        .expect("queued request arrives")
        .expect("read");
    assert_eq!(&got, req);
    let mut got = [0u8; 11];
    tokio::time::timeout(WAIT, r.client.read_exact(&mut got))
        .await
        .expect("queued greeting arrives")
        .expect("read");
    assert_eq!(&got, greet);
    // The connection goes on afterwards.
    roundtrip_through(&mut r, b"more").await;
    let Rig { client, server, .. } = &mut r;
    client.shutdown().await.expect("client FIN");
    server.shutdown().await.expect("server FIN");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.expect("client EOF");
    assert!(rest.is_empty());
    let (t, end) = r.ended().await;
    assert_eq!(end, CopyEnd::Closed);
    assert_eq!(t.client_to_upstream, 18 + 4);
    assert_eq!(t.upstream_to_client, 11 + 4);
}

/// Client → server, then the same bytes back.
async fn roundtrip_through(r: &mut Rig, msg: &[u8]) {
    let mut buf = vec![0u8; msg.len()];
    r.client.write_all(msg).await.expect("client write");
    tokio::time::timeout(WAIT, r.server.read_exact(&mut buf))
        .await
        .expect("to server in time")
        .expect("server read");
    assert_eq!(buf, msg);
    r.server.write_all(msg).await.expect("server write");
    tokio::time::timeout(WAIT, r.client.read_exact(&mut buf))
        .await
        .expect("to client in time")
        .expect("client read");
    assert_eq!(buf, msg);
}

/// The client writes 8 MiB and half-closes at once, while most of it is
/// still in flight through the kernel path: every byte arrives before the
/// server's EOF, and the server's reply still flows back afterwards. Then
/// the other way round (the server half-closes first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_each_way_with_data_in_flight() {
    const TOTAL: usize = 8 * 1024 * 1024;
    let Some(fp) = fast_path("half_close_each_way_with_data_in_flight", 64) else {
        return;
    };
    // Client first.
    let r = rig("127.0.0.1", fp.clone()).await;
    let (mut cr, cw) = r.client.into_split();
    let (sr, mut sw) = r.server.into_split();
    let send = send_pattern(cw, 7, TOTAL, 256 * 1024);
    let recv = async {
        expect_pattern(sr, 7, TOTAL).await;
        sw.write_all(b"reply after your FIN").await.expect("reply");
        sw.shutdown().await.expect("server FIN");
    };
    tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(send, recv) })
        .await
        .expect("8 MiB within 30 s");
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, cr.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .expect("reply");
    assert_eq!(reply, b"reply after your FIN");
    let (t, end) = tokio::time::timeout(WAIT, r.relay)
        .await
        .expect("end")
        .expect("task");
    assert_eq!(end, CopyEnd::Closed);
    assert_eq!(t.client_to_upstream, TOTAL as u64);
    assert_eq!(t.upstream_to_client, 20);

    // Server first.
    let r = rig("127.0.0.1", fp).await;
    let (cr, mut cw) = r.client.into_split();
    let (mut sr, sw) = r.server.into_split();
    let send = send_pattern(sw, 9, TOTAL, 256 * 1024);
    let recv = async {
        expect_pattern(cr, 9, TOTAL).await;
        cw.write_all(b"thanks")
            .await
            .expect("client after server FIN");
        cw.shutdown().await.expect("client FIN");
    };
    tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(send, recv) })
        .await
        .expect("8 MiB within 30 s");
    let mut tail = Vec::new();
    tokio::time::timeout(WAIT, sr.read_to_end(&mut tail))
        .await
        .expect("tail in time")
        .expect("tail");
    assert_eq!(tail, b"thanks");
    let (t, end) = tokio::time::timeout(WAIT, r.relay)
        .await
        .expect("end")
        .expect("task");
    assert_eq!(end, CopyEnd::Closed);
    assert_eq!(t.upstream_to_client, TOTAL as u64);
    assert_eq!(t.client_to_upstream, 6);
}

/// A reset from the server aborts the client side too (the client sees a
/// reset, not a clean EOF), and the relay names the side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_propagates() {
    let Some(fp) = fast_path("reset_propagates", 64) else {
        return;
    };
    let mut r = rig("127.0.0.1", fp).await;
    roundtrip_through(&mut r, b"hello").await;
    r.server.set_zero_linger().expect("linger 0");
    let Rig {
        mut client,
        server,
        relay,
        ..
    } = r;
    drop(server);
    let (_, end) = tokio::time::timeout(WAIT, relay)
        .await
        .expect("end")
        .expect("task");
    assert!(
        matches!(end, CopyEnd::Error(Side::Upstream, _)),
        "ended {end:?}"
    );
    let r = expect_closed(&mut client, WAIT).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "client sees a reset, got {r:?}"
    );
}

/// The relay's two sockets' kernel memory (`ss -tmn`, skmem r + w + t).
fn skmem_bytes(socks: &[SocketAddr]) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-tmnH"])
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    let mut total = 0u64;
    for (i, l) in lines.iter().enumerate() {
        let mut cols = l.split_whitespace();
        let local = cols.nth(3).unwrap_or("");
        if !socks.iter().any(|s| local == s.to_string()) {
            continue;
        }
        // The skmem line follows its socket line.
        let mem = lines.get(i + 1).copied().unwrap_or("");
        let Some(start) = mem.find("skmem:(") else {
            continue;
        };
        let inside = &mem[start + 7..];
        let inside = &inside[..inside.find(')').unwrap_or(inside.len())];
        for field in inside.split(',') {
            for (prefix, _) in [("r", ()), ("t", ()), ("w", ())] {
                if let Some(v) = field.strip_prefix(prefix) {
                    if let Ok(n) = v.parse::<u64>() {
                        total += n;
                    }
                }
            }
        }
    }
    total
}

/// A client writing 64 MiB to a server that never reads: the client's
/// writes must stall (the relay's receive window closes) and the relay's
/// two sockets hold a bounded amount of kernel memory.
///
/// FAILS on this 6.18 kernel, which is why the fast path is off by default:
/// `tcp_read_skb` takes each skb with `skb_set_owner_sk_safe`, whose
/// `skb_orphan` uncharges it from the receiving socket's rmem, so the window
/// never closes and the redirected skbs pile up, uncharged, in the peer's
/// psock queue (measured: all 64 MiB accepted while `ss` shows 4.2 MB on the
/// two sockets). Run with `--ignored` to check a kernel or a fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "6.18's egress redirect has no backpressure (see the doc comment)"]
async fn slow_reader_backpressure_is_bounded() {
    let Some(fp) = fast_path("slow_reader_backpressure_is_bounded", 64) else {
        return;
    };
    let r = rig("127.0.0.1", fp).await;
    let inner = [r.inner.0, r.inner.1];
    let (_cr, mut cw) = r.client.into_split();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let w = written.clone();
    let writer = tokio::spawn(async move {
        let chunk = vec![5u8; 64 * 1024];
        for _ in 0..1024 {
            if cw.write_all(&chunk).await.is_err() {
                return;
            }
            w.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Wait until the writer stalls: no progress for 300 ms (bounded: 10 s).
    let deadline = Instant::now() + WAIT;
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
        assert!(
            Instant::now() < deadline,
            "the writer never stalled ({now} bytes)"
        );
    }
    let mem = skmem_bytes(&inner);
    println!("stalled after {last} bytes; relay sockets hold {mem} bytes");
    assert!(last < 48 * 1024 * 1024, "{last} bytes accepted of 64 MiB");
    assert!(mem < 16 * 1024 * 1024, "relay sockets hold {mem} bytes");
    assert!(mem > 0, "ss found the relay's sockets");
    writer.abort();
    drop(r.server);
}

/// No data in either direction for the idle timeout: both sides are reset.
/// Traffic before that keeps the connection (the timer re-arms from
/// `tcpi_last_data_recv`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_resets_both_sides() {
    let Some(fp) = fast_path("idle_timeout_resets_both_sides", 64) else {
        return;
    };
    let cfg = CopyConfig {
        idle_timeout: Duration::from_millis(600),
        ..CopyConfig::default()
    };
    let mut r = rig_with("127.0.0.1", fp, cfg, b"", b"").await;
    let start = Instant::now();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        roundtrip_through(&mut r, b"keepalive").await;
    }
    assert!(!r.relay.is_finished(), "traffic keeps the connection");
    let Rig {
        mut client, relay, ..
    } = r;
    let (_, end) = tokio::time::timeout(WAIT, relay)
        .await
        .expect("end")
        .expect("task");
    assert_eq!(end, CopyEnd::Idle);
    assert!(start.elapsed() >= Duration::from_millis(1800));
    let r = expect_closed(&mut client, WAIT).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "client sees a reset, got {r:?}"
    );
}

/// A forced drain aborts a spliced connection; before it the connection
/// keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_drain_aborts() {
    let Some(fp) = fast_path("forced_drain_aborts", 64) else {
        return;
    };
    let mut r = rig("127.0.0.1", fp).await;
    roundtrip_through(&mut r, b"before").await;
    let signal = r.signal.take().expect("signal");
    let drain = tokio::spawn(signal.drain(Duration::from_millis(300)));
    roundtrip_through(&mut r, b"while draining").await;
    let Rig {
        mut client, relay, ..
    } = r;
    let (_, end) = tokio::time::timeout(WAIT, relay)
        .await
        .expect("end")
        .expect("task");
    assert_eq!(end, CopyEnd::Forced);
    let got = expect_closed(&mut client, WAIT).await;
    assert!(got.is_err(), "client sees a reset, got {got:?}");
    let _ = drain.await;
}

/// Through the server: a balanced L4 service with the fast path, the
/// backend speaking first; with maps for one connection only (capacity 2),
/// a second concurrent connection is copied in user space and works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_relays_through_the_kernel_and_falls_back_when_full() {
    let Some(fp) = fast_path(
        "server_relays_through_the_kernel_and_falls_back_when_full",
        2,
    ) else {
        return;
    };
    let b = Backend::echo(1).await;
    let cfg = ServerConfig {
        relay: RelayConfig {
            sockmap: Some(fp),
            ..RelayConfig::default()
        },
        ..ServerConfig::default()
    };
    let h = Harness::start(1, cfg, |a| {
        vec![(a[0], service("fast", &[b.addr], Affinity::None))]
    })
    .await;
    let (mut first, id) = connect_greeted(h.addrs[0]).await;
    assert_eq!(id, b.id);
    let (mut second, id) = connect_greeted(h.addrs[0]).await;
    assert_eq!(id, b.id);
    for i in 0..50 {
        roundtrip(&mut first, format!("first {i}").as_bytes()).await;
        roundtrip(&mut second, format!("second {i}").as_bytes()).await;
    }
    first.shutdown().await.expect("FIN");
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, first.read_to_end(&mut rest))
        .await
        .expect("EOF in time")
        .expect("EOF");
    assert!(rest.is_empty());
    drop(second);
    assert_eq!(b.wait_ends(2).await.len(), 2);
}

/// Without the fast path (`sockmap: None`, the `off` setting) the same
/// relay runs in user space.
#[tokio::test]
async fn disabled_setting_parses_and_relays_in_user_space() {
    use lightpath::l4::sockmap::Setting;
    assert_eq!("off".parse::<Setting>(), Ok(Setting::Off));
    assert_eq!("auto".parse::<Setting>(), Ok(Setting::Auto));
    assert_eq!("on".parse::<Setting>(), Ok(Setting::On));
    let err = "yes".parse::<Setting>().unwrap_err();
    assert!(err.contains("--l4-sockmap") && err.contains("yes"), "{err}");
    assert!(FastPath::from_setting(Setting::Off, 64)
        .expect("off never fails")
        .is_none());
    let b = Backend::echo(2).await;
    let h = Harness::start(1, ServerConfig::default(), |a| {
        vec![(a[0], service("slow", &[b.addr], Affinity::None))]
    })
    .await;
    let (mut s, id) = connect_greeted(h.addrs[0]).await;
    assert_eq!(id, b.id);
    roundtrip(&mut s, b"user space").await;
}
