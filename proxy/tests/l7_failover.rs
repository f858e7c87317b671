//! An endpoint dying with requests in flight on pooled keep-alive upstream
//! connections, end to end through real loopback sockets.
//!
//! Why its own file: this is the load benchmark's failure case (a backend
//! SIGKILLed under keep-alive load), and the property is exact: idempotent
//! requests that were already sent when the endpoint died (it reset or
//! closed the connection before any response byte) are retried on another
//! endpoint, so the client sees no error at all; a POST that was sent is
//! never sent twice, so it gets 502. One backend here is a raw TCP server
//! that parses requests itself and, once doomed, holds them unanswered
//! until the test kills it (RST on some connections, FIN on others); the
//! last case kills a real `lightpath backend` process with SIGKILL.

mod l7_common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control::Mode;
use http::{Request, Response};
use http_body_util::BodyExt;
use l7_common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A raw HTTP/1.1 backend: answers `200 dying` while healthy; once
/// [`Dying::doom`] is called it reads further requests and holds them with
/// no response byte until [`Dying::kill`], which closes every held
/// connection: with RST (SO_LINGER 0) on even-numbered connections, with a
/// plain FIN on odd ones.
struct Dying {
    addr: SocketAddr,
    doomed: Arc<AtomicBool>,
    /// Bodies of the requests held (sent to us, never answered).
    held: Arc<Mutex<Vec<String>>>,
    served: Arc<AtomicUsize>,
    kill: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Dying {
    async fn start() -> Dying {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let doomed = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(AtomicUsize::new(0));
        let (kill, killed) = watch::channel(false);
        let (d, h, s) = (doomed.clone(), held.clone(), served.clone());
        let task = tokio::spawn(async move {
            let mut n = 0usize;
            loop {
                let Ok((sock, _)) = l.accept().await else {
                    continue;
                };
                n += 1;
                let rst = n.is_multiple_of(2);
                let (d, h, s, k) = (d.clone(), h.clone(), s.clone(), killed.clone());
                tokio::spawn(dying_conn(sock, rst, d, h, s, k));
            }
        });
        Dying {
            addr,
            doomed,
            held,
            served,
            kill,
            task,
        }
    }

    fn doom(&self) {
        self.doomed.store(true, Ordering::SeqCst);
    }

    fn held(&self) -> Vec<String> {
        self.held.lock().expect("held").clone()
    }

    fn kill(&self) {
        self.task.abort();
        let _ = self.kill.send(true);
    }
}

impl Drop for Dying {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads one request (head plus a `content-length` body) from `buf`/`s`;
/// returns its body, or `None` when the connection ended.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
    buf.drain(..head_end + len);
    Some(body)
}

async fn dying_conn(
    mut s: TcpStream,
    rst: bool,
    doomed: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<String>>>,
    served: Arc<AtomicUsize>,
    mut killed: watch::Receiver<bool>,
) {
    let mut buf = Vec::new();
    loop {
        let body = tokio::select! {
            r = read_request(&mut s, &mut buf) => match r {
                Some(b) => b,
                None => return,
            },
            _ = killed.wait_for(|k| *k) => break,
        };
        if doomed.load(Ordering::SeqCst) {
            held.lock().expect("held").push(body);
            let _ = killed.wait_for(|k| *k).await;
            break;
        }
        served.fetch_add(1, Ordering::SeqCst);
        let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\ndying";
        if s.write_all(resp).await.is_err() {
            return;
        }
    }
    if rst {
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    }
    drop(s);
}

/// A backend answering 200 with its id after 30 ms (so its in-flight count,
/// and with it its p2c cost, grows under the test's load while the dying
/// endpoint looks idle) and recording the bodies it got.
async fn recording_backend(id: &'static str, seen: Arc<Mutex<HashSet<String>>>) -> Backend {
    Backend::start(move |_, req: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let body = req.into_body().collect().await.map(|c| c.to_bytes());
            if let Ok(b) = body {
                if !b.is_empty() {
                    seen.lock()
                        .expect("seen")
                        .insert(String::from_utf8_lossy(&b).into_owned());
                }
            }
            Response::new(full(id))
        }
    })
    .await
}

/// Spawns requests from `make(i)` one every 2 ms (at most `max`) until
/// `enough()`; returns their tasks.
async fn spawn_until(
    c: &HttpClient,
    max: usize,
    make: impl Fn(usize) -> Request<BBody>,
    enough: impl Fn() -> bool,
) -> Vec<tokio::task::JoinHandle<(u16, http::HeaderMap, bytes::Bytes)>> {
    let mut tasks = Vec::new();
    for i in 0..max {
        if enough() {
            break;
        }
        let (c, r) = (c.clone(), make(i));
        tasks.push(tokio::spawn(async move { send(&c, r).await }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tasks
}

/// Warm-up: keep-alive GETs until the dying backend served some, so the
/// proxy holds pooled connections to it.
async fn warm_up(c: &HttpClient, url: &str, dying: &Dying) {
    for _ in 0..200 {
        let (code, _, _) = get(c, url).await;
        assert_eq!(code, 200);
        if dying.served.load(Ordering::SeqCst) >= 5 {
            return;
        }
    }
    panic!("the dying backend never got traffic during warm-up");
}

/// Ejection off, so the dying endpoint keeps its share until it dies and
/// every held request meets the failure on the request path.
const NO_EJECTION: (&str, &str) = ("lightpath.io/ejection-consecutive-failures", "0");

/// Two recording backends and the dying one behind one HTTP service port
/// (ejection off), with the proxy's pool to the dying one warmed up. Fields
/// drop in order: client, proxy, then the backends.
struct Rig {
    client: HttpClient,
    url: String,
    _proxy: Proxy,
    dying: Dying,
    _backends: [Backend; 2],
    /// Request ids the recording backends received.
    seen: Arc<Mutex<HashSet<String>>>,
}

async fn warmed_rig(name: &str) -> Rig {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let a = recording_backend("a", seen.clone()).await;
    let b = recording_backend("b", seen.clone()).await;
    let dying = Dying::start().await;
    let proxy = Proxy::start(service(
        name,
        &[a.addr, b.addr, dying.addr],
        Mode::Http,
        &[NO_EJECTION],
    ))
    .await;
    let client = client();
    let url = proxy.url("/");
    warm_up(&client, &url, &dying).await;
    Rig {
        client,
        url,
        _proxy: proxy,
        dying,
        _backends: [a, b],
        seen,
    }
}

#[tokio::test]
async fn gets_in_flight_on_a_dying_keep_alive_backend_are_retried_without_errors() {
    let Rig {
        client: c,
        url,
        dying,
        ..
    } = &warmed_rig("dying-get").await;

    dying.doom();
    // Enough GETs in flight on the dying endpoint to exceed any small
    // concurrent-retry limit when they all fail at once.
    let tasks = spawn_until(
        c,
        400,
        |_| Request::get(url.as_str()).body(full("")).expect("req"),
        || dying.held().len() >= 8,
    )
    .await;
    let held = dying.held().len();
    assert!(held >= 8, "only {held} GETs reached the dying endpoint");
    dying.kill();

    let mut codes: HashMap<u16, usize> = HashMap::new();
    let mut retried = 0;
    for t in tasks {
        let (code, h, body) = t.await.expect("task");
        *codes.entry(code).or_default() += 1;
        assert_eq!(code, 200, "GET failed: {body:?} {h:?}");
        if h["x-lightpath-attempts"] != "1" {
            retried += 1;
        }
    }
    assert!(
        retried >= held,
        "{held} held GETs but only {retried} responses were retried ({codes:?})"
    );
}

#[tokio::test]
async fn posts_sent_to_a_dying_keep_alive_backend_get_502_and_are_not_resent() {
    let Rig {
        client: c,
        url,
        dying,
        seen,
        ..
    } = &warmed_rig("dying-post").await;

    dying.doom();
    let tasks = spawn_until(
        c,
        400,
        |i| {
            Request::post(url.as_str())
                .body(full(format!("post-{i}")))
                .expect("req")
        },
        || dying.held().len() >= 4,
    )
    .await;
    let held = dying.held();
    assert!(held.len() >= 4, "only {} POSTs held", held.len());
    dying.kill();

    let mut bad_gateway = 0;
    for t in tasks {
        let (code, h, body) = t.await.expect("task");
        match code {
            200 => {}
            502 => {
                bad_gateway += 1;
                assert_eq!(h["x-lightpath-attempts"], "1", "{body:?}");
                assert_eq!(h["x-lightpath-error"], "upstream-error");
            }
            other => panic!("unexpected {other}: {body:?}"),
        }
    }
    assert_eq!(bad_gateway, held.len(), "every sent POST fails, no other");
    let seen = seen.lock().expect("seen");
    for id in &held {
        assert!(!seen.contains(id), "{id} was sent twice");
    }
}

/// A free loopback port (bound and released; the child binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Kills the child (if still running) when the test ends, also on failure.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `lightpath backend` on loopback and waits for its ready line.
async fn backend_process(name: &str) -> (Child, SocketAddr) {
    use std::io::BufRead;
    let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let echo: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lightpath"))
        .args(["backend", "--name", name])
        .arg("--http")
        .arg(http.to_string())
        .arg("--echo")
        .arg(echo.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn lightpath backend");
    let stdout = child.stdout.take().expect("stdout");
    let child = Child(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        line
    });
    let line = tokio::time::timeout(WAIT, line)
        .await
        .expect("backend ready in time")
        .expect("read");
    assert!(line.contains("ready"), "backend said {line:?}");
    (child, http)
}

#[tokio::test]
async fn sigkilled_backend_process_under_keep_alive_load_costs_no_get() {
    let (_a, a) = backend_process("pa").await;
    let (_b, b) = backend_process("pb").await;
    let (mut victim, v) = backend_process("pv").await;
    let p = Proxy::start(service("sigkill", &[a, b, v], Mode::Http, &[])).await;
    let url = p.url("/");
    // 16 keep-alive clients in a loop, like the load benchmark's wrk.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (c, url, stop) = (client(), url.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut codes: HashMap<u16, usize> = HashMap::new();
            let mut bodies: HashMap<String, usize> = HashMap::new();
            for _ in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (code, _, body) = get(&c, &url).await;
                *codes.entry(code).or_default() += 1;
                *bodies
                    .entry(String::from_utf8_lossy(&body).trim().to_owned())
                    .or_default() += 1;
            }
            (codes, bodies)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    victim.0.kill().expect("SIGKILL the backend");
    let _ = victim.0.wait();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);
    let mut codes: HashMap<u16, usize> = HashMap::new();
    let mut bodies: HashMap<String, usize> = HashMap::new();
    for w in workers {
        let (c, b) = w.await.expect("worker");
        for (k, n) in c {
            *codes.entry(k).or_default() += n;
        }
        for (k, n) in b {
            *bodies.entry(k).or_default() += n;
        }
    }
    let total: usize = codes.values().sum();
    assert_eq!(
        codes.get(&200),
        Some(&total),
        "client-visible errors: {codes:?}"
    );
    assert!(
        bodies.get("pv").copied().unwrap_or(0) > 0,
        "victim got no traffic: {bodies:?}"
    );
}
