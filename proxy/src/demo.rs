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
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::sandbox::{self, Netns, Sandbox};

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
    #[error("sandbox: {0}")]
    Sandbox(#[from] sandbox::Error),
    #[error("demo did not finish within {0:?}")]
    Deadline(Duration),
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Traffic(String),
}

/// Runs the demo, printing to stdout. Tears everything down before returning.
pub fn main() -> Result<(), DemoError> {
    if !sandbox::is_root() {
        return Err(DemoError::NotRoot);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| DemoError::Setup(format!("tokio runtime: {e}")))?;
    // The pods run `lightpath backend` and the node `lightpath run`: this
    // very executable.
    let exe = std::env::current_exe().map_err(|e| DemoError::Setup(format!("current_exe: {e}")))?;
    let mut sandbox = Sandbox::try_new("demo", PODS, exe)?;
    sandbox.node_name = NODE_NAME.to_string();
    println!(
        "built the sandbox: namespaces {}-{{node,cl,p1..{PODS}}}",
        sandbox.id
    );
    let result = rt.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(DEMO_DEADLINE, demo(&mut sandbox)) => {
                r.unwrap_or(Err(DemoError::Deadline(DEMO_DEADLINE)))
            }
            _ = tokio::signal::ctrl_c() => Err(DemoError::Interrupted),
        }
    });
    drop(rt);
    println!(
        "\ntearing down the sandbox ({} namespaces)",
        sandbox.namespace_count()
    );
    drop(sandbox);
    result
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

/// One HTTP request on a fresh connection: the answering pod's name, or
/// the error in a few words (they are counted by text).
async fn request(addr: SocketAddr) -> Result<String, String> {
    sandbox::http_name(addr, REQUEST_TIMEOUT)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut => format!("timed out after {REQUEST_TIMEOUT:?}"),
            std::io::ErrorKind::Other => e.to_string(),
            kind => kind.to_string(),
        })
}

/// Runs `f` on a thread inside `ns`, without blocking the demo's runtime.
async fn in_ns<F, Fut, T>(ns: &Netns, f: F) -> Result<T, DemoError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let thread = ns.try_spawn(f)?;
    let name = ns.name.clone();
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .map_err(|e| DemoError::Setup(format!("waiting for namespace {name}: {e}")))?
        .map_err(|_| DemoError::Setup(format!("the thread in namespace {name} panicked")))?
        .map_err(DemoError::from)
}

/// SIGTERM to lightpath; how long it took to drain and exit. The rules stay
/// (the default), so clients fail fast.
fn stop_lightpath(sb: &mut Sandbox) -> Duration {
    let Some(mut p) = sb.procs.pop() else {
        return Duration::ZERO;
    };
    let start = Instant::now();
    p.signal(nix::sys::signal::Signal::SIGTERM);
    p.wait(Duration::from_secs(10));
    start.elapsed()
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

/// UDP flows in the UDP step.
const UDP_FLOWS: usize = 30;

/// `n` UDP request/replies, each from a fresh socket `connect()`ed to
/// `addr`; how many each pod answered (the echo puts its name first).
async fn udp_round(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut by_pod = BTreeMap::new();
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    for _ in 0..n {
        let Ok(s) = tokio::net::UdpSocket::bind(bind).await else {
            continue;
        };
        if s.connect(addr).await.is_err() || s.send(b"hello over UDP").await.is_err() {
            continue;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(len)) = tokio::time::timeout(REQUEST_TIMEOUT, s.recv(&mut buf)).await {
            let text = String::from_utf8_lossy(&buf[..len]);
            let name = text.split('\n').next().unwrap_or_default().to_string();
            *by_pod.entry(name).or_insert(0) += 1;
        }
    }
    by_pod
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

async fn demo(sb: &mut Sandbox) -> Result<(), DemoError> {
    let manifest = sb.try_write_manifest("demo.yaml", MANIFEST)?;
    for i in 1..=PODS {
        sb.try_start_backend(i)?;
    }
    println!(
        "started {PODS} backends (lightpath backend) in pod namespaces 10.244.{{1..{PODS}}}.2"
    );
    sb.try_start_lightpath(&manifest, &[])?;
    println!("started lightpath run in the node namespace on examples/demo.yaml; TPROXY rules:");
    let table = sb
        .node
        .exec("nft", &["list", "chain", "inet", "lightpath", "prerouting"])?;
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
    let mut p1 = in_ns(&sb.client, move || load(web4, REQUESTS)).await?;
    print!("{}", p1.report("   result"));
    if p1.by_endpoint.len() != PODS {
        return Err(DemoError::Traffic(format!(
            "expected all {PODS} endpoints to answer"
        )));
    }

    println!("\n2. the same over IPv6, to {web6}");
    let mut p2 = in_ns(&sb.client, move || load(web6, REQUESTS / 3)).await?;
    print!("{}", p2.report("   result"));

    println!("\n3. from a process on the node itself (host network), to {web4}");
    let mut p3 = in_ns(&sb.node, move || load(web4, REQUESTS / 3)).await?;
    print!("{}", p3.report("   result"));

    let udp4 = sock(VIP4, 9000)?;
    println!("\n3b. UDP: {UDP_FLOWS} datagrams, each from a fresh connected socket, to {udp4}/UDP (the backends' UDP echo)");
    let by_pod = in_ns(&sb.client, move || udp_round(udp4, UDP_FLOWS)).await?;
    let answered: usize = by_pod.values().sum();
    println!("   answered {answered}/{UDP_FLOWS}, from the service address (a connected socket accepts nothing else): {by_pod:?}");
    if answered == 0 {
        return Err(DemoError::Traffic("no UDP reply".into()));
    }

    println!("\n4. pod-3's backend stopped (still listed as ready, as before the kubelet notices)");
    sb.stop_backend(3);
    let mut p4 = in_ns(&sb.client, move || load(web4, REQUESTS)).await?;
    print!("{}", p4.report("   result"));
    let lost = p4.errors.values().sum::<usize>();
    println!(
        "   pod-3 refused its connections; lightpath retried them on another endpoint: {} failed, {} reached pod-3",
        lost,
        p4.by_endpoint.get("pod-3").copied().unwrap_or(0)
    );

    println!("\n5. a Service with no endpoints ({empty}): the kernel rejects it");
    let r = in_ns(&sb.client, move || refusal(empty)).await?;
    println!("   {r}");

    println!("\n6. lightpath stopped (SIGTERM): connections fail fast, never hang");
    let t = stop_lightpath(sb);
    println!("   lightpath drained and exited in {t:.2?}");
    let r = in_ns(&sb.client, move || refusal(web4)).await?;
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
