//! SIGTERM during load, against the real binary under TPROXY in a sandbox of
//! namespaces: `/ready` turns 503 at once, every connection in flight
//! finishes intact (zero client errors), new ones fail fast, and the process
//! exits 0 as soon as the last one is done. Needs root (see
//! `support::netns::require_root`).

mod admin_util;
mod support {
    pub mod netns;
}

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use admin_util::get;
use support::netns::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VIP: &str = "10.96.0.10";
const ADMIN: &str = "127.0.0.1:15000";

/// One long echo conversation: `chunks` × 1 KiB with `gap` between them,
/// each echoed back intact; then half-close and EOF.
async fn conversation(
    addr: SocketAddr,
    id: usize,
    chunks: usize,
    gap: Duration,
) -> Result<usize, String> {
    let run = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("conn {id}: connect: {e}"))?;
        let mut total = 0;
        for c in 0..chunks {
            let chunk: Vec<u8> = (0..1024).map(|i| ((i + c * 7 + id) % 251) as u8).collect();
            s.write_all(&chunk)
                .await
                .map_err(|e| format!("conn {id} chunk {c}: write: {e}"))?;
            let mut back = vec![0u8; chunk.len()];
            s.read_exact(&mut back)
                .await
                .map_err(|e| format!("conn {id} chunk {c}: read: {e}"))?;
            if back != chunk {
                return Err(format!("conn {id} chunk {c}: echo differs"));
            }
            total += back.len();
            tokio::time::sleep(gap).await;
        }
        s.shutdown()
            .await
            .map_err(|e| format!("conn {id}: shutdown: {e}"))?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .await
            .map_err(|e| format!("conn {id}: final read: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("conn {id}: {} stray bytes", rest.len()));
        }
        Ok(total)
    };
    tokio::time::timeout(IO_TIMEOUT, run)
        .await
        .map_err(|_| format!("conn {id}: timed out"))?
}

#[test]
fn sigterm_during_load_completes_every_connection() {
    if !require_root("sigterm_during_load_completes_every_connection") {
        return;
    }
    let mut sb = Sandbox::new("drain", 2);
    sb.start_backend(1);
    sb.start_backend(2);
    let vip = VIP.parse().unwrap();
    let lp = sb.serve(&web_manifest(&[vip], &[1, 2]));

    let admin: SocketAddr = ADMIN.parse().unwrap();
    let ready = sb
        .node
        .run(move || async move { get(admin, "/ready").await });
    assert_eq!(ready.status, 200, "{}", ready.body);

    // 24 conversations of 20 chunks, 100 ms apart: ~2 s each.
    const CONNS: usize = 24;
    const CHUNKS: usize = 20;
    let echo: SocketAddr = SocketAddr::new(vip, 9000);
    let clients = sb.client.spawn(move || async move {
        let tasks: Vec<_> = (0..CONNS)
            .map(|id| tokio::spawn(conversation(echo, id, CHUNKS, Duration::from_millis(100))))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap_or_else(|e| Err(format!("task: {e}"))));
        }
        out
    });

    // Mid-run: SIGTERM.
    std::thread::sleep(Duration::from_millis(600));
    let sent = Instant::now();
    sb.lightpath(lp).signal(nix::sys::signal::Signal::SIGTERM);

    // Not ready at once (well before the conversations end), saying why.
    let r = sb.node.run(move || async move {
        let start = Instant::now();
        loop {
            let r = get(admin, "/ready").await;
            if r.status == 503 || start.elapsed() > Duration::from_secs(1) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert_eq!(r.status, 503, "/ready after SIGTERM: {}", r.body);
    assert_eq!(r.json()["draining"], true);
    assert!(
        sent.elapsed() < Duration::from_millis(1000),
        "/ready took {:?} to turn",
        sent.elapsed()
    );

    // New connections are not accepted any more, and fail fast.
    let outcome = sb
        .client
        .run(move || async move { probe(echo, Duration::from_secs(2)).await });
    assert!(
        !matches!(outcome, ConnectOutcome::Connected(_)),
        "a new connection was accepted while draining: {outcome:?}"
    );

    // Every conversation in flight completed.
    let results = clients.join().expect("client thread");
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        errors.is_empty(),
        "{} client errors: {errors:?}",
        errors.len()
    );
    let bytes: usize = results.iter().map(|r| *r.as_ref().unwrap()).sum();
    assert_eq!(bytes, CONNS * CHUNKS * 1024);

    // The process exits 0 once drained, well within its 5 s deadline.
    let code = sb.procs[lp].wait(Duration::from_secs(8));
    assert_eq!(
        code,
        Some(0),
        "lightpath exit: {}",
        sb.procs[lp].lines.text()
    );
    let log = sb.procs[lp].lines.text();
    assert!(log.contains("Graceful"), "drain was not graceful:\n{log}");
}
