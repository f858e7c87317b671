//! Network-namespace harness for end-to-end tests: a throwaway "node" with
//! a client and backend "pods" wired to it by veth pairs, the real
//! `lightpath` binary inside, and clients that run inside the namespaces.
//!
//! Why this shape: TPROXY, nftables and policy routing only mean something
//! on real packets crossing real interfaces, and a test must never touch the
//! machine's own namespace. Every namespace name carries a per-process,
//! per-sandbox suffix so tests run in parallel, and everything (processes,
//! namespaces, hence their veths, rules and routes) is removed on `Drop`,
//! also when a test fails.
//!
//! Topology (IPv4 / IPv6):
//! ```text
//!  client 10.0.1.2 fd00:1::2 ──c0── node 10.0.1.1 fd00:1::1
//!  pod i  10.244.i.2 fd00:244:i::2 ──p<i>── node 10.244.i.1 fd00:244:i::1
//! ```
//! The client's default route points at the node; the node's default route
//! points at the client (a node always has an uplink, and locally originated
//! service traffic needs a route to exist before the `output` mark applies).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const SKIP_ENV: &str = "LIGHTPATH_SKIP_ROOT_TESTS";

/// Whether to run a root test. Not root: fail with the skip switch named;
/// skip switch set: print a note and skip.
pub fn require_root(test: &str) -> bool {
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: {SKIP_ENV}=1");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} needs root (network namespaces, nftables). Run as root, or set {SKIP_ENV}=1 to skip it."
    );
    true
}

fn cmd(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command and panics with its stderr on failure (setup only).
pub fn must(program: &str, args: &[&str]) -> String {
    cmd(program, args).unwrap_or_else(|e| panic!("{e}"))
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        must("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        must("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS args...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        must("ip", &a)
    }

    /// Runs a command inside the namespace and returns stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let mut a = vec!["netns", "exec", self.name.as_str(), program];
        a.extend_from_slice(args);
        cmd("ip", &a)
    }

    /// Runs `f` on a thread that has joined this namespace, with its own
    /// single-threaded Tokio runtime; every socket it opens lives in here.
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        self.spawn(f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Like [`Netns::run`], in the background.
    pub fn spawn<F, Fut, T>(&self, f: F) -> std::thread::JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = cmd("ip", &["netns", "del", &self.name]);
    }
}

/// Output lines of a child, shared with the test for waiting on them.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Lines {
    fn push(&self, l: String) {
        let (m, c) = &*self.0;
        m.lock().unwrap_or_else(|e| e.into_inner()).push(l);
        c.notify_all();
    }

    /// Waits until a line containing `needle` appears after line `from`;
    /// returns the index after it.
    pub fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> Result<usize, String> {
        let (m, c) = &*self.0;
        let deadline = Instant::now() + timeout;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(i) = g.iter().skip(from).position(|l| l.contains(needle)) {
                return Ok(from + i + 1);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no line containing {needle:?} within {timeout:?}; output:\n{}",
                    g.join("\n")
                ));
            }
            g = c
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn len(&self) -> usize {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn text(&self) -> String {
        self.0
             .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }
}

/// A process started inside a namespace; killed on drop.
pub struct Proc {
    pub child: Child,
    /// stdout and stderr lines, interleaved.
    pub lines: Lines,
}

impl Proc {
    pub fn spawn(ns: &Netns, program: &Path, args: &[&str]) -> Proc {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let lines = Lines::default();
        for r in [
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
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    lines.push(l);
                }
            });
        }
        Proc { child, lines }
    }

    /// Sends a signal (SIGTERM for a graceful stop).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
    }

    /// Waits for exit up to `timeout`; returns the exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn lightpath_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lightpath"))
}

pub fn pod_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8, 2)
}

pub fn pod_v6(i: usize) -> Ipv6Addr {
    format!("fd00:244:{i}::2").parse().expect("literal")
}

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);

/// A node, a client and `pods` backend namespaces. Processes are dropped
/// before namespaces (field order).
pub struct Sandbox {
    pub procs: Vec<Proc>,
    pub backends: Vec<Option<Proc>>,
    pub dir: PathBuf,
    pub node: Netns,
    pub client: Netns,
    pub pods: Vec<Netns>,
}

impl Sandbox {
    pub fn new(tag: &str, pods: usize) -> Sandbox {
        let id = format!(
            "lp-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let node = Netns::new(format!("{id}-node"));
        let client = Netns::new(format!("{id}-cl"));
        let mut sb = Sandbox {
            procs: Vec::new(),
            backends: Vec::new(),
            dir,
            node,
            client,
            pods: Vec::new(),
        };
        for i in 1..=pods {
            let ns = Netns::new(format!("{id}-p{i}"));
            sb.pods.push(ns);
            sb.backends.push(None);
        }
        sb.wire();
        sb
    }

    fn wire(&self) {
        let n = &self.node;
        must(
            "ip",
            &[
                "link",
                "add",
                "c0",
                "netns",
                &n.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &self.client.name,
            ],
        );
        n.ip(&["addr", "add", "10.0.1.1/24", "dev", "c0"]);
        n.ip(&["addr", "add", "fd00:1::1/64", "dev", "c0", "nodad"]);
        n.ip(&["link", "set", "c0", "up"]);
        let c = &self.client;
        c.ip(&["addr", "add", "10.0.1.2/24", "dev", "eth0"]);
        c.ip(&["addr", "add", "fd00:1::2/64", "dev", "eth0", "nodad"]);
        c.ip(&["link", "set", "eth0", "up"]);
        c.ip(&["route", "add", "default", "via", "10.0.1.1"]);
        c.ip(&["-6", "route", "add", "default", "via", "fd00:1::1"]);
        n.ip(&["route", "add", "default", "via", "10.0.1.2"]);
        n.ip(&["-6", "route", "add", "default", "via", "fd00:1::2"]);
        for (k, p) in self.pods.iter().enumerate() {
            let i = k + 1;
            let dev = format!("p{i}");
            must(
                "ip",
                &[
                    "link", "add", &dev, "netns", &n.name, "type", "veth", "peer", "name", "eth0",
                    "netns", &p.name,
                ],
            );
            n.ip(&["addr", "add", &format!("10.244.{i}.1/24"), "dev", &dev]);
            n.ip(&[
                "addr",
                "add",
                &format!("fd00:244:{i}::1/64"),
                "dev",
                &dev,
                "nodad",
            ]);
            n.ip(&["link", "set", &dev, "up"]);
            p.ip(&["addr", "add", &format!("{}/24", pod_v4(i)), "dev", "eth0"]);
            p.ip(&[
                "addr",
                "add",
                &format!("{}/64", pod_v6(i)),
                "dev",
                "eth0",
                "nodad",
            ]);
            p.ip(&["link", "set", "eth0", "up"]);
            p.ip(&["route", "add", "default", "via", &format!("10.244.{i}.1")]);
            p.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:244:{i}::1"),
            ]);
        }
    }

    /// Starts `lightpath backend --name pod-i` in pod `i` (1-based) and waits
    /// until it listens.
    pub fn start_backend(&mut self, i: usize) {
        let name = format!("pod-{i}");
        let p = Proc::spawn(
            &self.pods[i - 1],
            &lightpath_bin(),
            &["backend", "--name", &name],
        );
        p.lines
            .wait_for("ready", 0, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("backend {name}: {e}"));
        self.backends[i - 1] = Some(p);
    }

    pub fn stop_backend(&mut self, i: usize) {
        self.backends[i - 1] = None;
    }

    /// Writes a manifest file into the sandbox's directory (atomically, so a
    /// polling reader never sees half a file).
    pub fn write_manifest(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, &path).expect("rename manifest");
        path
    }

    /// Starts `lightpath run` in the node namespace on `manifest` and waits
    /// until it serves. Returns the index into `procs`.
    pub fn start_lightpath(&mut self, manifest: &Path, extra: &[&str]) -> usize {
        let m = manifest.to_string_lossy().to_string();
        let mut args = vec![
            "run",
            "--manifests",
            &m,
            "--node-name",
            "node-a",
            "--manifest-poll-ms",
            "100",
            "--drain-timeout",
            "5",
        ];
        args.extend_from_slice(extra);
        let p = Proc::spawn(&self.node, &lightpath_bin(), &args);
        p.lines
            .wait_for("serving", 0, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("lightpath run: {e}"));
        self.procs.push(p);
        self.procs.len() - 1
    }

    pub fn lightpath(&self, idx: usize) -> &Proc {
        &self.procs[idx]
    }

    /// `nft list table inet lightpath` in the node namespace.
    pub fn nft_table(&self) -> String {
        self.node
            .exec("nft", &["list", "table", "inet", "lightpath"])
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.procs.clear();
        self.backends.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One Service (ClusterIP, two ports: `web` 80→8080 HTTP name, `echo`
/// 9000→9000) with one EndpointSlice per family holding the given pods (all
/// on `node`, Ready). Extra `spec` lines (e.g. `internalTrafficPolicy:
/// Local`) are indented under spec.
pub fn service_yaml(
    name: &str,
    cluster_ips: &[IpAddr],
    pods: &[usize],
    node: &str,
    spec_extra: &str,
) -> String {
    let ips: Vec<String> = cluster_ips.iter().map(|i| i.to_string()).collect();
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|i| if i.is_ipv4() { "IPv4" } else { "IPv6" })
        .collect();
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {}\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  ipFamilyPolicy: {}\n  ports:\n  - {{name: web, port: 80, targetPort: 8080, protocol: TCP}}\n  - {{name: echo, port: 9000, targetPort: 9000, protocol: TCP}}\n",
        ips[0],
        ips.join(", "),
        families.join(", "),
        if ips.len() > 1 { "PreferDualStack" } else { "SingleStack" },
    );
    for line in spec_extra.lines() {
        y.push_str(&format!("  {line}\n"));
    }
    for fam in &families {
        let addrs: Vec<String> = pods
            .iter()
            .map(|&i| {
                if *fam == "IPv4" {
                    pod_v4(i).to_string()
                } else {
                    pod_v6(i).to_string()
                }
            })
            .collect();
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {fam}\nports:\n- {{name: web, port: 8080, protocol: TCP}}\n- {{name: echo, port: 9000, protocol: TCP}}\nendpoints:\n",
            fam.to_lowercase()
        ));
        for a in addrs {
            y.push_str(&format!(
                "- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n"
            ));
        }
    }
    y.push_str("---\n");
    y
}

/// A Node object for `node-a`.
pub fn node_yaml() -> String {
    "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses:\n  - {type: InternalIP, address: 10.0.1.1}\n---\n".to_string()
}

/// Bound on every client operation.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(IO_TIMEOUT, f).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what}: timed out"))
    })?
}

/// One HTTP/1.1 request on a fresh connection; returns the body (the
/// backend's name). Run inside a namespace.
pub async fn http_name(addr: SocketAddr) -> std::io::Result<String> {
    timed("http", async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim().to_string())
            .ok_or_else(|| std::io::Error::other(format!("bad response: {text:?}")))?;
        Ok(body)
    })
    .await
}

/// How a connect attempt ended, and how fast.
#[derive(Debug)]
pub enum ConnectOutcome {
    Connected(Duration),
    Refused(Duration),
    TimedOut,
    Other(std::io::Error),
}

/// Tries to connect and exchange a byte (a TPROXY'd connection "connects"
/// only if lightpath accepted it; the reset of a refused frontend may come
/// after the handshake), waiting at most `wait`.
pub async fn probe(addr: SocketAddr, wait: Duration) -> ConnectOutcome {
    let start = Instant::now();
    let r = tokio::time::timeout(wait, async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(())
    })
    .await;
    match r {
        Err(_) => ConnectOutcome::TimedOut,
        Ok(Ok(())) => ConnectOutcome::Connected(start.elapsed()),
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            ConnectOutcome::Refused(start.elapsed())
        }
        Ok(Err(e)) => ConnectOutcome::Other(e),
    }
}

/// Polls `http_name` until it answers (lightpath picking up a change, a
/// backend starting), at most `timeout`.
pub async fn wait_http(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match http_name(addr).await {
            Ok(n) => return Ok(n),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("{addr} not answering within {timeout:?}: {last}"))
}
