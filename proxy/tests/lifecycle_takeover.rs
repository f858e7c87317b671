//! Rolling update on one node: a second `lightpath run` starts beside the
//! first (SO_REUSEPORT on every listener), the first gets SIGTERM and
//! drains, and a client connecting continuously through the ClusterIP the
//! whole time loses no connection attempt.
//!
//! `net.ipv4.tcp_migrate_req=1` (set in the test's own node namespace, as
//! the DaemonSet's node would have it) makes the kernel hand connections
//! still queued on the closing listener to the surviving one instead of
//! resetting them. Needs root (see `support::netns::require_root`).

mod admin_util;
mod support {
    pub mod netns;
}

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use admin_util::{get, parse_prometheus, sample};
use support::netns::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VIP: &str = "10.96.0.10";

/// Connect, echo 64 bytes, close; any failure is returned.
async fn one_exchange(addr: SocketAddr, n: u64) -> Result<(), String> {
    let run = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("#{n} connect: {e}"))?;
        let msg = [(n % 251) as u8; 64];
        s.write_all(&msg)
            .await
            .map_err(|e| format!("#{n} write: {e}"))?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back)
            .await
            .map_err(|e| format!("#{n} read: {e}"))?;
        if back != msg {
            return Err(format!("#{n}: echo differs"));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .map_err(|_| format!("#{n}: timed out"))?
}

#[test]
fn second_process_takes_over_without_losing_connections() {
    if !require_root("second_process_takes_over_without_losing_connections") {
        return;
    }
    let mut sb = Sandbox::new("takeover", 2);
    sb.node
        .exec("sysctl", &["-qw", "net.ipv4.tcp_migrate_req=1"])
        .expect("tcp_migrate_req in the node namespace");
    sb.start_backend(1);
    sb.start_backend(2);
    let vip = VIP.parse().unwrap();
    let path = sb.write_manifest("svc.yaml", &web_manifest(&[vip], &[1, 2]));
    let old = sb.start_lightpath(&path, &[]);

    // A client connecting as fast as it can, 8 at a time, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let echo = SocketAddr::new(vip, 9000);
    let client = {
        let stop = stop.clone();
        sb.client.spawn(move || async move {
            let mut ok = 0u64;
            let mut errors = Vec::new();
            let mut n = 0u64;
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let batch: Vec<_> = (0..8)
                    .map(|_| {
                        n += 1;
                        tokio::spawn(one_exchange(echo, n))
                    })
                    .collect();
                for t in batch {
                    match t.await {
                        Ok(Ok(())) => ok += 1,
                        Ok(Err(e)) => errors.push(e),
                        Err(e) => errors.push(format!("task: {e}")),
                    }
                }
            }
            (ok, errors)
        })
    };

    std::thread::sleep(Duration::from_millis(500));
    // The replacement starts beside the old one: same listeners, same rules.
    let new = sb.start_lightpath(&path, &[]);
    std::thread::sleep(Duration::from_millis(500));
    sb.lightpath(old).signal(nix::sys::signal::Signal::SIGTERM);
    let code = sb.procs[old].wait(Duration::from_secs(8));
    assert_eq!(
        code,
        Some(0),
        "old lightpath exit: {}",
        sb.procs[old].lines.text()
    );
    // Keep connecting through the replacement alone for a while.
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = client.join().expect("client thread");

    assert!(
        errors.is_empty(),
        "{} of {} connection attempts failed during the takeover: {:?}",
        errors.len(),
        ok as usize + errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert!(
        ok >= 100,
        "only {ok} exchanges: the load was too light to mean anything"
    );

    // The replacement is the one serving now, and it is ready.
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let (ready, metrics) = sb
        .node
        .run(move || async move { (get(admin, "/ready").await, get(admin, "/metrics").await) });
    assert_eq!(ready.status, 200, "{}", ready.body);
    let scrape = parse_prometheus(&metrics.body);
    let opened = sample(
        &scrape,
        "lightpath_tcp_connections_opened_total",
        &[
            ("namespace", "default"),
            ("service", "web"),
            ("port", "echo"),
        ],
    )
    .unwrap_or(0.0);
    assert!(opened > 0.0, "the replacement served nothing");
    assert!(
        sb.procs[new].wait(Duration::from_millis(10)).is_none(),
        "replacement exited"
    );
}
