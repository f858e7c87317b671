//! `lightpath demo`: the whole node data path on one machine, in a minute.
//!
//! Why it exists: the first thing anyone wants to know is whether lightpath
//! carries real traffic, and a Kubernetes cluster is a lot to ask for that.
//! The demo builds a throwaway "node" out of network namespaces (a client,
//! the node running the real `lightpath run` with real TPROXY rules, three
//! backend "pods" running `lightpath backend` from the same binary), sends
//! real connections to ClusterIPs, prints what happened, and removes every
//! namespace again — also on Ctrl-C or error (drop guards) — within a bounded
//! time. Nothing outside its own namespaces is touched.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The cluster served, with addresses matching the sandbox below.
const MANIFEST: &str = include_str!("../../examples/demo.yaml");
const NODE_NAME: &str = "demo-node";
const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";
const VIP_EMPTY: &str = "10.96.0.20";
const PODS: usize = 3;
/// Requests per phase; enough for stable percentiles, quick on two cores.
const REQUESTS: usize = 300;
/// Concurrent clients per phase.
const CONCURRENCY: usize = 8;
/// The whole demo is bounded by this.
const DEMO_DEADLINE: Duration = Duration::from_secs(120);
/// Bound on one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("needs root (it creates network namespaces and nftables rules); run it as root, e.g. sudo -E cargo run --release -p lightpath -- demo")]
    NotRoot,
    #[error("{0}")]
    Setup(String),
    #[error("demo did not finish within {0:?}")]
    Deadline(Duration),
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Traffic(String),
}

/// Runs the demo, printing to stdout. Tears everything down before returning.
pub fn main() -> Result<(), DemoError> {
    if !is_root() {
        return Err(DemoError::NotRoot);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| DemoError::Setup(format!("tokio runtime: {e}")))?;
    let sandbox = Sandbox::build()?;
    let result = rt.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(DEMO_DEADLINE, demo(&sandbox)) => {
                r.unwrap_or(Err(DemoError::Deadline(DEMO_DEADLINE)))
            }
            _ = tokio::signal::ctrl_c() => Err(DemoError::Interrupted),
        }
    });
    drop(rt);
    println!(
        "\ntearing down the sandbox ({} namespaces)",
        sandbox.namespaces.len()
    );
    drop(sandbox);
    result
}

fn is_root() -> bool {
    // The effective uid is the second field of the `Uid:` line.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn sh(program: &str, args: &[&str]) -> Result<String, DemoError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            DemoError::Setup(format!(
                "cannot run {program}: {e} (install iproute2 and nftables)"
            ))
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(DemoError::Setup(format!(
            "`{program} {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A child process, killed on drop, whose output lines are forwarded to a
/// channel (so the demo can wait for "ready" and "serving").
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(ns: &str, args: &[&str]) -> Result<Proc, DemoError> {
        let exe =
            std::env::current_exe().map_err(|e| DemoError::Setup(format!("current_exe: {e}")))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&exe)
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| DemoError::Setup(format!("spawn {}: {e}", exe.display())))?;
        let (tx, rx) = mpsc::channel();
        let out: Vec<Box<dyn std::io::Read + Send>> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for r in out {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(Proc { child, lines: rx })
    }

    fn wait_line(&self, needle: &str, timeout: Duration) -> Result<(), DemoError> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Ok(()),
                Ok(l) => seen.push(l),
                Err(_) => {
                    return Err(DemoError::Setup(format!(
                        "no {needle:?} within {timeout:?}; output:\n{}",
                        seen.join("\n")
                    )))
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The namespaces and processes of the demo; everything goes on drop,
/// processes first.
struct Sandbox {
    lightpath: std::sync::Mutex<Option<Proc>>,
    backends: std::sync::Mutex<Vec<Option<Proc>>>,
    namespaces: Vec<String>,
    dir: PathBuf,
    prefix: String,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Ok(mut l) = self.lightpath.lock() {
            l.take();
        }
        if let Ok(mut b) = self.backends.lock() {
            b.clear();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = sh("ip", &["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Sandbox {
    fn ns(&self, which: &str) -> String {
        format!("{}-{which}", self.prefix)
    }

    fn build() -> Result<Sandbox, DemoError> {
        let prefix = format!("lp-demo-{}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir)
            .map_err(|e| DemoError::Setup(format!("{}: {e}", dir.display())))?;
        let mut sb = Sandbox {
            lightpath: std::sync::Mutex::new(None),
            backends: std::sync::Mutex::new(Vec::new()),
            namespaces: Vec::new(),
            dir,
            prefix,
        };
        println!(
            "building the sandbox: namespaces {}-{{node,client,pod1..{PODS}}}",
            sb.prefix
        );
        let node = sb.add_ns("node")?;
        let client = sb.add_ns("client")?;
        veth(&node, "c0", &client, "eth0")?;
        addr(&node, "c0", "10.0.1.1/24", "fd00:1::1/64")?;
        addr(&client, "eth0", "10.0.1.2/24", "fd00:1::2/64")?;
        route(&client, "10.0.1.1", "fd00:1::1")?;
        // The node's uplink: locally originated service traffic needs a route
        // before the output mark can divert it.
        route(&node, "10.0.1.2", "fd00:1::2")?;
        for i in 1..=PODS {
            let pod = sb.add_ns(&format!("pod{i}"))?;
            let dev = format!("p{i}");
            veth(&node, &dev, &pod, "eth0")?;
            addr(
                &node,
                &dev,
                &format!("10.244.{i}.1/24"),
                &format!("fd00:244:{i}::1/64"),
            )?;
            addr(
                &pod,
                "eth0",
                &format!("10.244.{i}.2/24"),
                &format!("fd00:244:{i}::2/64"),
            )?;
            route(&pod, &format!("10.244.{i}.1"), &format!("fd00:244:{i}::1"))?;
        }
        Ok(sb)
    }

    fn add_ns(&mut self, which: &str) -> Result<String, DemoError> {
        let name = self.ns(which);
        sh("ip", &["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        sh("ip", &["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    fn start_backend(&self, i: usize) -> Result<(), DemoError> {
        let p = Proc::spawn(
            &self.ns(&format!("pod{i}")),
            &["backend", "--name", &format!("pod-{i}")],
        )?;
        p.wait_line("ready", Duration::from_secs(10))?;
        let mut b = self
            .backends
            .lock()
            .map_err(|_| DemoError::Setup("lock".into()))?;
        while b.len() < i {
            b.push(None);
        }
        b[i - 1] = Some(p);
        Ok(())
    }

    fn stop_backend(&self, i: usize) {
        if let Ok(mut b) = self.backends.lock() {
            if let Some(slot) = b.get_mut(i - 1) {
                slot.take();
            }
        }
    }

    fn start_lightpath(&self, manifest: &Path) -> Result<(), DemoError> {
        let m = manifest.to_string_lossy().to_string();
        let p = Proc::spawn(
            &self.ns("node"),
            &[
                "run",
                "--manifests",
                &m,
                "--node-name",
                NODE_NAME,
                "--drain-timeout",
                "2",
            ],
        )?;
        p.wait_line("serving", Duration::from_secs(20))?;
        *self
            .lightpath
            .lock()
            .map_err(|_| DemoError::Setup("lock".into()))? = Some(p);
        Ok(())
    }

    /// SIGTERM to lightpath (`ip netns exec` execs it: the child is lightpath
    /// itself). The rules stay (the default), so clients fail fast.
    fn stop_lightpath(&self) -> Result<Duration, DemoError> {
        let mut g = self
            .lightpath
            .lock()
            .map_err(|_| DemoError::Setup("lock".into()))?;
        let Some(mut p) = g.take() else {
            return Ok(Duration::ZERO);
        };
        let start = Instant::now();
        let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .map_err(|e| DemoError::Setup(format!("SIGTERM lightpath: {e}")))?;
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = p.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(start.elapsed())
    }

    /// Runs `f` on a thread inside namespace `which`.
    async fn in_ns<F, Fut, T>(&self, which: &str, f: F) -> Result<T, DemoError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.ns(which));
        tokio::task::spawn_blocking(move || {
            let file =
                std::fs::File::open(&path).map_err(|e| DemoError::Setup(format!("{path}: {e}")))?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| DemoError::Setup(format!("setns {path}: {e}")))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| DemoError::Setup(format!("runtime: {e}")))?;
            Ok(rt.block_on(f()))
        })
        .await
        .map_err(|e| DemoError::Setup(format!("namespace thread: {e}")))?
    }
}

fn veth(ns_a: &str, dev_a: &str, ns_b: &str, dev_b: &str) -> Result<(), DemoError> {
    sh(
        "ip",
        &[
            "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns",
            ns_b,
        ],
    )?;
    sh("ip", &["-n", ns_a, "link", "set", dev_a, "up"])?;
    sh("ip", &["-n", ns_b, "link", "set", dev_b, "up"])?;
    Ok(())
}

fn addr(ns: &str, dev: &str, v4: &str, v6: &str) -> Result<(), DemoError> {
    sh("ip", &["-n", ns, "addr", "add", v4, "dev", dev])?;
    sh("ip", &["-n", ns, "addr", "add", v6, "dev", dev, "nodad"])?;
    Ok(())
}

fn route(ns: &str, via4: &str, via6: &str) -> Result<(), DemoError> {
    sh("ip", &["-n", ns, "route", "add", "default", "via", via4])?;
    sh(
        "ip",
        &["-n", ns, "-6", "route", "add", "default", "via", via6],
    )?;
    Ok(())
}

/// One phase's results.
#[derive(Default)]
struct Phase {
    by_endpoint: BTreeMap<String, usize>,
    latencies: Vec<Duration>,
    errors: BTreeMap<String, usize>,
}

impl Phase {
    fn report(&mut self, title: &str) -> String {
        let mut s = String::new();
        let ok: usize = self.by_endpoint.values().sum();
        let _ = writeln!(
            s,
            "{title}: {ok}/{} requests answered",
            ok + self.errors.values().sum::<usize>()
        );
        for (ep, n) in &self.by_endpoint {
            let _ = writeln!(
                s,
                "    {ep:<8} {n:>4} connections {}",
                "#".repeat((n * 40).div_ceil(REQUESTS.max(1)))
            );
        }
        for (e, n) in &self.errors {
            let _ = writeln!(s, "    error x{n}: {e}");
        }
        self.latencies.sort();
        if !self.latencies.is_empty() {
            let p = |q: f64| {
                let i = ((self.latencies.len() as f64 * q).ceil() as usize)
                    .clamp(1, self.latencies.len())
                    - 1;
                self.latencies[i]
            };
            let _ = writeln!(
                s,
                "    latency (connect + request + response): p50 {:.2?}  p90 {:.2?}  p99 {:.2?}  max {:.2?}",
                p(0.50),
                p(0.90),
                p(0.99),
                p(1.0)
            );
        }
        s
    }
}

/// One HTTP request on a fresh connection: the answering pod's name.
async fn request(addr: SocketAddr) -> Result<String, String> {
    let r = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::with_capacity(256);
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    })
    .await;
    match r {
        Err(_) => Err(format!("timed out after {REQUEST_TIMEOUT:?}")),
        Ok(Err(e)) => Err(e.kind().to_string()),
        Ok(Ok(buf)) => {
            let text = String::from_utf8_lossy(&buf);
            text.split_once("\r\n\r\n")
                .map(|(_, b)| b.trim().to_string())
                .ok_or_else(|| "malformed response".to_string())
        }
    }
}

/// `REQUESTS` requests from `CONCURRENCY` concurrent clients.
async fn load(addr: SocketAddr, requests: usize) -> Phase {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CONCURRENCY {
        // Split exactly: the first `requests % CONCURRENCY` clients send one more.
        let per = requests / CONCURRENCY + usize::from(c < requests % CONCURRENCY);
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(per);
            for _ in 0..per {
                let start = Instant::now();
                let r = request(addr).await;
                out.push((r, start.elapsed()));
            }
            out
        });
    }
    let mut phase = Phase::default();
    while let Some(r) = tasks.join_next().await {
        for (r, t) in r.unwrap_or_default() {
            match r {
                Ok(name) => {
                    *phase.by_endpoint.entry(name).or_insert(0) += 1;
                    phase.latencies.push(t);
                }
                Err(e) => *phase.errors.entry(e).or_insert(0) += 1,
            }
        }
    }
    phase
}

/// How a connection to `addr` fails (or not), and how fast.
async fn refusal(addr: SocketAddr) -> String {
    let start = Instant::now();
    match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await {
        Err(_) => "no answer within 3s (dropped)".to_string(),
        Ok(Ok(_)) => format!("connected in {:.2?}", start.elapsed()),
        Ok(Err(e)) => format!("{} in {:.2?}", e.kind(), start.elapsed()),
    }
}

fn sock(ip: &str, port: u16) -> Result<SocketAddr, DemoError> {
    let ip: IpAddr = ip
        .parse()
        .map_err(|e| DemoError::Setup(format!("{ip}: {e}")))?;
    Ok(SocketAddr::new(ip, port))
}

async fn demo(sb: &Sandbox) -> Result<(), DemoError> {
    let manifest = sb.dir.join("demo.yaml");
    std::fs::write(&manifest, MANIFEST)
        .map_err(|e| DemoError::Setup(format!("{}: {e}", manifest.display())))?;
    for i in 1..=PODS {
        sb.start_backend(i)?;
    }
    println!(
        "started {PODS} backends (lightpath backend) in pod namespaces 10.244.{{1..{PODS}}}.2"
    );
    sb.start_lightpath(&manifest)?;
    println!("started lightpath run in the node namespace on examples/demo.yaml; TPROXY rules:");
    let table = sh(
        "ip",
        &[
            "netns",
            "exec",
            &sb.ns("node"),
            "nft",
            "list",
            "chain",
            "inet",
            "lightpath",
            "prerouting",
        ],
    )?;
    for l in table
        .lines()
        .filter(|l| l.contains("tproxy") || l.contains("vmap") || l.contains("goto"))
    {
        println!("    {}", l.trim());
    }

    let web4 = sock(VIP4, 80)?;
    let web6 = sock(VIP6, 80)?;
    let empty = sock(VIP_EMPTY, 80)?;

    println!("\n1. {REQUESTS} new connections from the client namespace to web {web4} ({CONCURRENCY} concurrent)");
    let mut p1 = sb.in_ns("client", move || load(web4, REQUESTS)).await?;
    print!("{}", p1.report("   result"));
    if p1.by_endpoint.len() != PODS {
        return Err(DemoError::Traffic(format!(
            "expected all {PODS} endpoints to answer"
        )));
    }

    println!("\n2. the same over IPv6, to {web6}");
    let mut p2 = sb.in_ns("client", move || load(web6, REQUESTS / 3)).await?;
    print!("{}", p2.report("   result"));

    println!("\n3. from a process on the node itself (host network), to {web4}");
    let mut p3 = sb.in_ns("node", move || load(web4, REQUESTS / 3)).await?;
    print!("{}", p3.report("   result"));

    println!("\n4. pod-3's backend stopped (still listed as ready, as before the kubelet notices)");
    sb.stop_backend(3);
    let mut p4 = sb.in_ns("client", move || load(web4, REQUESTS)).await?;
    print!("{}", p4.report("   result"));
    let lost = p4.errors.values().sum::<usize>();
    println!(
        "   pod-3 refused its connections; lightpath retried them on another endpoint: {} failed, {} reached pod-3",
        lost,
        p4.by_endpoint.get("pod-3").copied().unwrap_or(0)
    );

    println!("\n5. a Service with no endpoints ({empty}): the kernel rejects it");
    let r = sb.in_ns("client", move || refusal(empty)).await?;
    println!("   {r}");

    println!("\n6. lightpath stopped (SIGTERM): connections fail fast, never hang");
    let t = sb.stop_lightpath()?;
    println!("   lightpath drained and exited in {t:.2?}");
    let r = sb.in_ns("client", move || refusal(web4)).await?;
    println!("   connect to {web4}: {r}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_report_has_counts_and_percentiles() {
        let mut p = Phase::default();
        p.by_endpoint.insert("pod-1".into(), 2);
        p.latencies = vec![Duration::from_millis(3), Duration::from_millis(1)];
        let r = p.report("x");
        assert!(r.contains("2/2 requests answered"), "{r}");
        assert!(r.contains("p50 1.00ms"), "{r}");
        assert!(r.contains("max 3.00ms"), "{r}");
    }

    #[test]
    fn manifest_addresses_match_the_sandbox() {
        for i in 1..=PODS {
            assert!(MANIFEST.contains(&format!("10.244.{i}.2")), "pod {i}");
        }
        assert!(MANIFEST.contains(VIP4) && MANIFEST.contains(VIP6) && MANIFEST.contains(VIP_EMPTY));
        assert!(MANIFEST.contains(NODE_NAME));
    }
}
