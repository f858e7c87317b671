//! The network-namespace sandbox for end-to-end tests: the library's
//! [`lightpath::sandbox`] (shared with `lightpath demo`), plus what only
//! tests want: the root check with its skip switch, panicking shorthands
//! (a failed setup step fails the test with the step's error), manifests
//! for the sandbox's addresses, and bounded client probes.
//!
//! The shorthands are extension traits named after the library's fallible
//! methods without `try_` (`Sandbox::new`, `sb.start_backend(1)`, `ns.run(..)`),
//! so a test imports them all with `use support::netns::*`.
#![allow(dead_code)]

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use lightpath::sandbox;
// Re-exported for the tests, each of which uses some of them.
#[allow(unused_imports)]
pub use lightpath::sandbox::{pod_v4, pod_v6, Lines, Netns, Proc, Sandbox, CLIENT_V4};

/// Whether to run a root test. Not root: fail with the skip switch named;
/// skip switch set: print a note and skip.
pub fn require_root(test: &str) -> bool {
    sandbox::require_root(test, "network namespaces, nftables")
}

/// Runs a command and panics with its stderr on failure (setup only).
pub fn must(program: &str, args: &[&str]) -> String {
    sandbox::command(program, args).unwrap_or_else(|e| panic!("{e}"))
}

pub fn lightpath_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lightpath"))
}

fn ok<T>(r: Result<T, sandbox::Error>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Panicking shorthands for [`Netns`].
pub trait NetnsExt {
    fn new(name: String) -> Self;
    /// `ip -n NS args...`
    fn ip(&self, args: &[&str]) -> String;
    /// Runs `f` on a thread that has joined this namespace, with its own
    /// single-threaded Tokio runtime; a panic in `f` fails the test.
    fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static;
    /// Like [`NetnsExt::run`], in the background.
    fn spawn<F, Fut, T>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static;
}

impl NetnsExt for Netns {
    fn new(name: String) -> Self {
        ok(Netns::try_new(name))
    }

    fn ip(&self, args: &[&str]) -> String {
        ok(self.try_ip(args))
    }

    fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        match ok(self.try_spawn(f)).join() {
            Ok(r) => ok(r),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    fn spawn<F, Fut, T>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let thread = ok(self.try_spawn(f));
        // Joins to the test's own panic when `f` panics.
        std::thread::spawn(move || match thread.join() {
            Ok(r) => ok(r),
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }
}

/// Panicking shorthand for [`Proc`].
pub trait ProcExt {
    fn spawn(ns: &Netns, program: &Path, args: &[&str]) -> Self;
}

impl ProcExt for Proc {
    fn spawn(ns: &Netns, program: &Path, args: &[&str]) -> Self {
        ok(Proc::try_spawn(ns, program, args))
    }
}

/// Panicking shorthands for [`Sandbox`], running the test's `lightpath`.
pub trait SandboxExt {
    /// A sandbox with `pods` backend namespaces; `tag` names its namespaces.
    fn new(tag: &str, pods: usize) -> Self;
    /// Starts `lightpath backend --name pod-i` in pod `i` (1-based).
    fn start_backend(&mut self, i: usize);
    fn write_manifest(&self, name: &str, text: &str) -> PathBuf;
    /// Starts `lightpath run` in the node; the index into `procs`.
    fn start_lightpath(&mut self, manifest: &Path, extra: &[&str]) -> usize;
    fn lightpath(&self, idx: usize) -> &Proc;
    /// Writes `manifest` as `svc.yaml` (again, if it is there) and starts
    /// `lightpath run` on it; the index into `procs`.
    fn serve(&mut self, manifest: &str) -> usize;
    /// `nft list table inet lightpath` in the node namespace.
    fn nft_table(&self) -> String;
}

impl SandboxExt for Sandbox {
    fn new(tag: &str, pods: usize) -> Self {
        ok(Sandbox::try_new(tag, pods, lightpath_bin()))
    }

    fn start_backend(&mut self, i: usize) {
        ok(self.try_start_backend(i))
    }

    fn write_manifest(&self, name: &str, text: &str) -> PathBuf {
        ok(self.try_write_manifest(name, text))
    }

    fn start_lightpath(&mut self, manifest: &Path, extra: &[&str]) -> usize {
        ok(self.try_start_lightpath(manifest, extra))
    }

    fn lightpath(&self, idx: usize) -> &Proc {
        &self.procs[idx]
    }

    fn serve(&mut self, manifest: &str) -> usize {
        let path = self.write_manifest("svc.yaml", manifest);
        self.start_lightpath(&path, &[])
    }

    fn nft_table(&self) -> String {
        ok(self.try_nft_table())
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

/// The usual test cluster: [`node_yaml`] and the `web` Service
/// ([`service_yaml`]) at `vips` over `pods`, all on `node-a`.
pub fn web_manifest(vips: &[IpAddr], pods: &[usize]) -> String {
    format!(
        "{}{}",
        node_yaml(),
        service_yaml("web", vips, pods, "node-a", "")
    )
}

/// A Node object for `node-a`.
pub fn node_yaml() -> String {
    "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses:\n  - {type: InternalIP, address: 10.0.1.1}\n---\n".to_string()
}

/// Bound on every client operation.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/1.1 request on a fresh connection; returns the body (the
/// backend's name). Run inside a namespace.
pub async fn http_name(addr: SocketAddr) -> std::io::Result<String> {
    sandbox::http_name(addr, IO_TIMEOUT).await
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
    probe_from(None, addr, wait).await
}

/// [`probe`] from the source address `from` (one of the namespace's own)
/// when given.
pub async fn probe_from(from: Option<IpAddr>, addr: SocketAddr, wait: Duration) -> ConnectOutcome {
    let start = Instant::now();
    let r = tokio::time::timeout(wait, async {
        let mut s = match from {
            None => TcpStream::connect(addr).await?,
            Some(ip) => {
                let sock = match ip {
                    IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                sock.bind(SocketAddr::new(ip, 0))?;
                sock.connect(addr).await?
            }
        };
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
