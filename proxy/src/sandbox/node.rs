//! The sandbox's topology and the processes in it: a node namespace running
//! `lightpath run`, a client namespace, and pod namespaces running
//! `lightpath backend`. The addresses here are the ones the demo manifest
//! and the tests' manifests name.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{Error, Netns, Proc};

/// The node name `lightpath run` is started with unless changed.
pub const NODE_NAME: &str = "node-a";
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// Bound on a backend saying "ready" (a process start on a busy machine).
const BACKEND_READY: Duration = Duration::from_secs(10);
/// Bound on `lightpath run` saying "serving" (rules installed, listening).
const LIGHTPATH_SERVING: Duration = Duration::from_secs(20);

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// At most this many pods: pod `i` lives in 10.244.`i`.0/24.
pub const MAX_PODS: usize = 250;

/// Pod `i`'s (1-based) IPv4 address; host `1` of its /24 is the node.
pub fn pod_v4(i: usize) -> Ipv4Addr {
    pod_net_v4(i, 2)
}

/// Pod `i`'s (1-based) IPv6 address; host `1` of its /64 is the node.
pub fn pod_v6(i: usize) -> Ipv6Addr {
    pod_net_v6(i, 2)
}

fn pod_net_v4(i: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, u8::try_from(i).unwrap_or(u8::MAX), host)
}

fn pod_net_v6(i: usize, host: u16) -> Ipv6Addr {
    let group = u16::try_from(i).unwrap_or(u16::MAX);
    Ipv6Addr::new(0xfd00, 0x244, group, 0, 0, 0, 0, host)
}

/// A node, a client and backend pod namespaces. Processes are dropped
/// before namespaces (field order, and `Drop` clears them first).
pub struct Sandbox {
    /// `lightpath run` processes (and any a caller adds), by start order.
    pub procs: Vec<Proc>,
    /// Pod `i`'s backend at `i - 1`, when running.
    pub backends: Vec<Option<Proc>>,
    /// A scratch directory for manifests, removed on drop.
    pub dir: PathBuf,
    pub node: Netns,
    pub client: Netns,
    pub pods: Vec<Netns>,
    /// The `lightpath` executable run in the namespaces.
    pub bin: PathBuf,
    /// `--node-name` for `lightpath run`.
    pub node_name: String,
    /// The prefix of every namespace name: `lp-TAG-PID-SEQ`.
    pub id: String,
}

impl Sandbox {
    /// Creates and wires the namespaces for `pods` backends; `bin` is the
    /// `lightpath` executable to run in them.
    pub fn try_new(tag: &str, pods: usize, bin: PathBuf) -> Result<Sandbox, Error> {
        if pods > MAX_PODS {
            return Err(Error::Failed {
                what: format!("sandbox {tag}"),
                message: format!("{pods} pods asked for, at most {MAX_PODS}"),
            });
        }
        let id = format!(
            "lp-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // Each namespace is deleted on drop, so an error below removes what
        // was made before it; the directory comes last for the same reason.
        let node = Netns::try_new(format!("{id}-node"))?;
        let client = Netns::try_new(format!("{id}-cl"))?;
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        // From here on every piece is owned by `sb`: an error drops it all.
        let mut sb = Sandbox {
            procs: Vec::new(),
            backends: Vec::new(),
            node,
            client,
            pods: Vec::new(),
            dir,
            bin,
            node_name: NODE_NAME.to_string(),
            id,
        };
        for i in 1..=pods {
            let ns = Netns::try_new(format!("{}-p{i}", sb.id))?;
            sb.pods.push(ns);
            sb.backends.push(None);
        }
        sb.wire()?;
        Ok(sb)
    }

    /// How many namespaces the sandbox owns.
    pub fn namespace_count(&self) -> usize {
        2 + self.pods.len()
    }

    fn wire(&self) -> Result<(), Error> {
        let n = &self.node;
        veth(n, "c0", &self.client, "eth0")?;
        addresses(n, "c0", "10.0.1.1/24", "fd00:1::1/64")?;
        addresses(&self.client, "eth0", "10.0.1.2/24", "fd00:1::2/64")?;
        default_routes(&self.client, "10.0.1.1", "fd00:1::1")?;
        // The node's uplink: locally originated service traffic needs a
        // route before the output mark can divert it.
        default_routes(n, "10.0.1.2", "fd00:1::2")?;
        for (k, p) in self.pods.iter().enumerate() {
            let i = k + 1;
            let dev = format!("p{i}");
            veth(n, &dev, p, "eth0")?;
            let (gw4, gw6) = (pod_net_v4(i, 1), pod_net_v6(i, 1));
            addresses(n, &dev, &format!("{gw4}/24"), &format!("{gw6}/64"))?;
            addresses(
                p,
                "eth0",
                &format!("{}/24", pod_v4(i)),
                &format!("{}/64", pod_v6(i)),
            )?;
            default_routes(p, &gw4.to_string(), &gw6.to_string())?;
        }
        Ok(())
    }

    /// Starts `lightpath backend --name pod-i` in pod `i` (1-based) and
    /// waits until it listens.
    pub fn try_start_backend(&mut self, i: usize) -> Result<(), Error> {
        let name = format!("pod-{i}");
        let ns = i
            .checked_sub(1)
            .and_then(|k| self.pods.get(k))
            .ok_or_else(|| Error::Failed {
                what: format!("backend {name}"),
                message: format!("the sandbox has {} pods", self.pods.len()),
            })?;
        let p = Proc::try_spawn(ns, &self.bin, &["backend", "--name", &name])?;
        p.lines.wait_for("ready", 0, BACKEND_READY)?;
        self.backends[i - 1] = Some(p);
        Ok(())
    }

    /// Stops pod `i`'s backend (the pod stays, as before the kubelet
    /// notices). No backend there: nothing to do.
    pub fn stop_backend(&mut self, i: usize) {
        if let Some(slot) = i.checked_sub(1).and_then(|k| self.backends.get_mut(k)) {
            slot.take();
        }
    }

    /// Writes a file into the sandbox's directory atomically (a polling
    /// reader never sees half a manifest); its path.
    pub fn try_write_manifest(&self, name: &str, text: &str) -> Result<PathBuf, Error> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).map_err(|e| Error::io(tmp.display().to_string(), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(path.display().to_string(), e))?;
        Ok(path)
    }

    /// Starts `lightpath run` in the node namespace on `manifest` (plus
    /// `extra` flags) and waits until it serves; its index into `procs`.
    pub fn try_start_lightpath(&mut self, manifest: &Path, extra: &[&str]) -> Result<usize, Error> {
        let m = manifest.to_string_lossy().to_string();
        let mut args = vec![
            "run",
            "--manifests",
            &m,
            "--node-name",
            &self.node_name,
            "--manifest-poll-ms",
            "100",
            "--drain-timeout",
            "5",
        ];
        args.extend_from_slice(extra);
        let p = Proc::try_spawn(&self.node, &self.bin, &args)?;
        p.lines.wait_for("serving", 0, LIGHTPATH_SERVING)?;
        self.procs.push(p);
        Ok(self.procs.len() - 1)
    }

    /// `nft list table inet lightpath` in the node namespace.
    pub fn try_nft_table(&self) -> Result<String, Error> {
        self.node
            .exec("nft", &["list", "table", "inet", "lightpath"])
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.procs.clear();
        self.backends.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A veth pair from `a`'s `dev_a` to `b`'s `dev_b`, both up.
fn veth(a: &Netns, dev_a: &str, b: &Netns, dev_b: &str) -> Result<(), Error> {
    super::command(
        "ip",
        &[
            "link", "add", dev_a, "netns", &a.name, "type", "veth", "peer", "name", dev_b, "netns",
            &b.name,
        ],
    )?;
    a.try_ip(&["link", "set", dev_a, "up"])?;
    b.try_ip(&["link", "set", dev_b, "up"])?;
    Ok(())
}

/// One IPv4 and one IPv6 address on `dev` (no duplicate address detection:
/// the address is usable at once).
fn addresses(ns: &Netns, dev: &str, v4: &str, v6: &str) -> Result<(), Error> {
    ns.try_ip(&["addr", "add", v4, "dev", dev])?;
    ns.try_ip(&["addr", "add", v6, "dev", dev, "nodad"])?;
    Ok(())
}

fn default_routes(ns: &Netns, via4: &str, via6: &str) -> Result<(), Error> {
    ns.try_ip(&["route", "add", "default", "via", via4])?;
    ns.try_ip(&["-6", "route", "add", "default", "via", via6])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_addresses_follow_the_topology() {
        assert_eq!(pod_v4(3).to_string(), "10.244.3.2");
        assert_eq!(pod_v6(3).to_string(), "fd00:244:3::2");
        assert_eq!(pod_v6(12).to_string(), "fd00:244:c::2");
        assert_eq!(pod_net_v6(12, 1).to_string(), "fd00:244:c::1");
        assert_eq!(pod_net_v4(12, 1).to_string(), "10.244.12.1");
    }
}
