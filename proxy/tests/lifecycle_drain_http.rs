//! SIGTERM during an HTTP keep-alive load run, against the real binary
//! under TPROXY: no request that reached lightpath is lost. Every response
//! is a complete 200; a connection ends either with `Connection: close` on a
//! response (the drain telling the client to go elsewhere) or, when it was
//! idle at that moment, closed before any byte of the next response, which
//! RFC 9112 section 9.3.1 lets a client retry (GET is idempotent). Needs root
//! (see `support::netns::require_root`).

mod support {
    pub mod netns;
}

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::netns::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Debug)]
enum End {
    /// A response said `Connection: close`.
    Close,
    /// Closed before any byte of the next response (retry-safe).
    IdleClosed,
}

/// Sequential keep-alive GETs until `stop_at`, or until the proxy ends the
/// connection. Returns (complete 200 responses, how it ended).
async fn keepalive_client(addr: SocketAddr, stop_at: Instant) -> Result<(usize, End), String> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut s = BufReader::new(s);
    let mut ok = 0;
    loop {
        if Instant::now() > stop_at {
            return Err(format!("no drain signal after {ok} responses"));
        }
        let req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        if s.get_mut().write_all(req.as_bytes()).await.is_err() {
            return Ok((ok, End::IdleClosed));
        }
        let mut status = String::new();
        let n = tokio::time::timeout(IO_TIMEOUT, s.read_line(&mut status))
            .await
            .map_err(|_| format!("response {ok}: timed out"))?;
        match n {
            Ok(0) | Err(_) if status.is_empty() => return Ok((ok, End::IdleClosed)),
            Err(e) => return Err(format!("response {ok}: {e}")),
            _ => {}
        }
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!("response {ok}: status line {status:?}"));
        }
        let (mut len, mut close) = (None, false);
        loop {
            let mut h = String::new();
            s.read_line(&mut h)
                .await
                .map_err(|e| format!("response {ok}: headers: {e}"))?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            }
            if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
                close = true;
            }
        }
        let len = len.ok_or_else(|| format!("response {ok}: no content-length"))?;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body)
            .await
            .map_err(|e| format!("response {ok}: truncated body: {e}"))?;
        if !body.starts_with(b"pod-") {
            return Err(format!("response {ok}: body {body:?}"));
        }
        ok += 1;
        if close {
            return Ok((ok, End::Close));
        }
    }
}

#[test]
fn sigterm_during_http_keepalive_load_loses_no_request() {
    if !require_root("sigterm_during_http_keepalive_load_loses_no_request") {
        return;
    }
    let mut sb = Sandbox::new("drainhttp", 2);
    sb.start_backend(1);
    sb.start_backend(2);
    let vip = "10.96.0.10".parse().expect("literal");
    let manifest = web_manifest(&[vip], &[1, 2]).replacen(
        "{name: web, port: 80, targetPort: 8080, protocol: TCP}",
        "{name: web, port: 80, targetPort: 8080, protocol: TCP, appProtocol: http}",
        1,
    );
    assert!(manifest.contains("appProtocol"), "port 80 made HTTP");
    let path = sb.write_manifest("svc.yaml", &manifest);
    let lp = sb.start_lightpath(&path, &[]);
    let web = SocketAddr::new(vip, 80);
    let name = sb.client.run(move || wait_http(web, IO_TIMEOUT));
    assert!(name.expect("served").starts_with("pod-"));

    const CLIENTS: usize = 16;
    let clients = sb.client.spawn(move || async move {
        let stop_at = Instant::now() + Duration::from_secs(10);
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| tokio::spawn(keepalive_client(web, stop_at)))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap_or_else(|e| Err(format!("task: {e}"))));
        }
        out
    });
    // Load runs, then SIGTERM mid-run.
    std::thread::sleep(Duration::from_millis(800));
    sb.lightpath(lp).signal(nix::sys::signal::Signal::SIGTERM);

    let results = clients.join().expect("client thread");
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        errors.is_empty(),
        "{} of {CLIENTS} clients saw errors: {errors:?}\n{}",
        errors.len(),
        sb.lightpath(lp).lines.text()
    );
    let served: usize = results
        .iter()
        .map(|r| r.as_ref().map_or(0, |(n, _)| *n))
        .sum();
    assert!(
        served > CLIENTS * 10,
        "only {served} responses before the drain"
    );
    let code = sb.procs[lp].wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", sb.lightpath(lp).lines.text());
    eprintln!(
        "{served} complete responses; endings: {:?}",
        results
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|(_, e)| e))
            .collect::<Vec<_>>()
    );
}
