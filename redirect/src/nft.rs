//! The nftables ruleset as text for `nft -f -`, built by pure functions.
//!
//! Why verdict maps: kube-proxy's iptables mode grows one rule chain per
//! service, so every packet walks a list that is linear in services. Here
//! every frontend is a map element keyed by `address . protocol . port`, and
//! the rules are a constant handful per family, whatever the number of
//! services (kube-proxy's nftables mode does the same with its `service-ips`
//! verdict map). Why ONE lookup per packet: every packet entering the node
//! passes `prerouting`, including every backend response to the proxy, which
//! matches no frontend; with a set for proxied frontends and a map for the
//! rest, a miss cost three hash lookups (measured: 1.75 µs of rule
//! evaluation per keep-alive request machine-wide, BENCHMARKS.md).
//!
//! The table, for one family (IPv6 is the same with `ip6`):
//!
//! * `prerouting` (filter, priority mangle): one lookup in the `fe_v4`
//!   verdict map, whose verdict is the frontend's action:
//!   - proxied: `goto tproxy_v4`, a chain with one `tproxy` rule per
//!     protocol (to lightpath's listener, mark, accept; UDP datagrams land on
//!     a transparent UDP socket at the same address as the TCP listener),
//!     then `goto reject_fe`, reached only when tproxy found no socket
//!     (lightpath down or restarting): TCP clients get a RST at once instead
//!     of waiting on rate-limited ICMP; UDP clients get ICMP port
//!     unreachable, which is what kube-proxy answers for a UDP service
//!     without endpoints. There is deliberately no `socket transparent` fast
//!     path: one that also matches SYNs stalls new connections for 1 s behind
//!     the proxy's TIME_WAIT sockets, and `tproxy` already finds established
//!     sockets itself.
//!   - no endpoints at all: `goto reject_fe`; endpoints only elsewhere under
//!     a Local policy: `drop`.
//!   - a LoadBalancer IP with `loadBalancerSourceRanges`: `goto fw_tproxy_v4`
//!     (or `fw_reject_v4` without endpoints), where one lookup of
//!     `daddr . proto . dport . saddr` in the interval set `allow_v4` lets
//!     the allowed sources on and drops the rest, before any reject
//!     (kube-proxy's `firewall-ips` check). Only SYNs are checked in the
//!     proxy chain: a connection accepted before a range change keeps
//!     flowing, as kube-proxy checks new connections only.
//!
//!   Then, with [`Config::keep_client_source`], the reply rules: a TCP
//!   packet that is not a bare SYN, or a UDP datagram, that belongs to a
//!   transparent socket of this node (`socket transparent 1`: lightpath's
//!   upstream connections and flows bound to a client's address) gets the
//!   mark, so policy routing delivers
//!   it locally instead of forwarding it to the client. It comes after the
//!   frontend lookup, so frontend packets never pay for the socket lookup,
//!   and it skips SYNs for the TIME_WAIT pitfall the tproxy notes record.
//!   - an external frontend of an `externalTrafficPolicy: Local` service
//!     with endpoints only elsewhere: `goto node_tproxy_v4`, which proxies
//!     what arrives through `lo` (node processes, after the output mark's
//!     detour) and what comes from this node's pods (one lookup of
//!     `daddr . proto . dport . saddr` in `node_pods_v4`, the Node's pod
//!     CIDRs per such frontend), and drops the rest: kube-proxy serves the
//!     node and its pods from the cluster-wide endpoints (its `fib saddr
//!     type local` short-circuit, and NodeCIDR local detection).
//! * `output` (route, priority mangle): lightpath's own sockets (upstream
//!   connections, and its listeners, whose mark every accepted connection
//!   inherits) carry the upstream mark and return at the first rule, so it
//!   never captures itself and its replies cost no lookup. Other locally
//!   originated packets (node processes, host-network pods) do one lookup in
//!   `local_v4`: proxied frontends `goto mark_local` (the mark, so policy
//!   routing sends them through `lo` back into `prerouting`), no-endpoint
//!   frontends get their verdict here directly. It is a second map because
//!   the kernel refuses a `tproxy` reachable from the output hook
//!   (EOPNOTSUPP when `fe_v4` is also used there, checked on 6.18).
//!
//! Changes after the first load are element additions and deletions only
//! ([`patch_script`] for the frontends a table change touched;
//! [`diff_script`] for two whole maps, its reference in tests and the
//! benchmark), applied in one transaction: a frontend whose action
//! changes is deleted and re-added with its new verdict in both maps in the
//! same batch, so no packet sees it missing.

use std::collections::BTreeMap;
use std::fmt::{self, Write};
use std::net::{IpAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;

use ipnet::IpNet;

/// Elements per `add element`/`delete element` statement, so a 10,000-frontend
/// load is a few hundred readable lines rather than one enormous one.
const ELEMENTS_PER_STATEMENT: usize = 500;

/// Transport protocol of a redirected frontend. The sets are keyed by
/// `inet_proto`, so TCP and UDP frontends share them; each protocol has one
/// tproxy rule per family (the `tproxy` statement needs its protocol fixed).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum L4Proto {
    Tcp,
    Udp,
}

impl L4Proto {
    const ALL: [L4Proto; 2] = [L4Proto::Tcp, L4Proto::Udp];
}

impl fmt::Display for L4Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            L4Proto::Tcp => "tcp",
            L4Proto::Udp => "udp",
        })
    }
}

/// One service address the kernel must recognise.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: IpAddr,
    pub proto: L4Proto,
    pub port: u16,
}

impl Frontend {
    pub fn tcp(ip: IpAddr, port: u16) -> Self {
        Frontend {
            ip,
            proto: L4Proto::Tcp,
            port,
        }
    }

    pub fn udp(ip: IpAddr, port: u16) -> Self {
        Frontend {
            ip,
            proto: L4Proto::Udp,
            port,
        }
    }

    fn family(&self) -> Family {
        match self.ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Frontend {
    /// The set-element key, e.g. `10.96.0.10 . tcp . 53`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} . {} . {}", self.ip, self.proto, self.port)
    }
}

/// What the kernel does with a connection to a frontend.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// TPROXY it to lightpath.
    Proxy,
    /// No endpoints at all: refuse at once (TCP RST, ICMP unreachable).
    Reject,
    /// Endpoints exist but none usable here (Local policy): silently drop.
    Drop,
}

/// What the kernel does with one frontend, and for which sources.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub action: Action,
    /// The action for clients on this node (node processes, host-network
    /// pods), which reach the frontend through `lo`. Differs from `action`
    /// for an external frontend of an `externalTrafficPolicy: Local`
    /// service with no local endpoint: kube-proxy serves the node from the
    /// cluster-wide endpoints (`Proxy`) while others are dropped.
    pub node_action: Action,
    /// This node's pod CIDRs: where `node_action` differs, pods on this
    /// node get it too (kube-proxy's NodeCIDR local detection). Empty: only
    /// node processes.
    pub node_pods: Arc<[IpNet]>,
    /// Only these sources get `action` (a new TCP connection, or any UDP
    /// datagram); every other source is dropped. `None`: every source.
    /// Networks of the other family are ignored, and overlapping ones are
    /// merged here (the kernel refuses overlapping interval elements), so
    /// `Some` of nothing usable drops everything.
    pub sources: Option<Arc<[IpNet]>>,
}

impl Rule {
    /// `action` for the given sources only.
    pub fn only(action: Action, sources: Arc<[IpNet]>) -> Self {
        Rule {
            action,
            node_action: action,
            node_pods: Arc::from(Vec::new()),
            sources: Some(sources),
        }
    }

    /// This rule, with `node_action` for clients on this node: its
    /// processes, and its pods (`pods`, this node's pod CIDRs).
    pub fn for_node(self, node_action: Action, pods: Arc<[IpNet]>) -> Self {
        Rule {
            node_action,
            node_pods: pods,
            ..self
        }
    }

    /// Whether node clients are proxied where everyone else is dropped.
    fn node_only(&self) -> bool {
        self.action == Action::Drop && self.node_action == Action::Proxy
    }
}

impl From<Action> for Rule {
    /// `action` for every source.
    fn from(action: Action) -> Self {
        Rule {
            action,
            node_action: action,
            node_pods: Arc::from(Vec::new()),
            sources: None,
        }
    }
}

/// The desired state: every frontend and its rule.
pub type Frontends = BTreeMap<Frontend, Rule>;

/// Names and addresses the ruleset is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Table name in the `inet` family.
    pub table: String,
    /// IPv4 transparent listener (a TCP listener and a UDP socket share the
    /// address).
    pub listener_v4: SocketAddrV4,
    /// IPv6 transparent listener; without one, IPv6 frontends are refused.
    pub listener_v6: Option<SocketAddrV6>,
    /// Mark on redirected packets; policy routing sends it to `lo`.
    pub mark: u32,
    /// SO_MARK on lightpath's upstream sockets, excluded from capture.
    pub upstream_mark: u32,
    /// Policy-routing table with the `local` default route.
    pub route_table: u32,
    /// lightpath connects to endpoints from its clients' addresses (where
    /// kube-proxy would not masquerade): add the reply rule that steers
    /// the endpoints' answers, addressed to those clients, back to its
    /// transparent upstream sockets.
    pub keep_client_source: bool,
}

#[derive(Copy, Clone, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const BOTH: [Family; 2] = [Family::V4, Family::V6];
    fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }
    fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    fn addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }
}

/// The prerouting verdict map: every frontend, verdict = its action.
fn frontend_map(f: Family) -> String {
    format!("fe_{}", f.suffix())
}

/// The output verdict map for node-local clients: every frontend again,
/// with `goto mark_local` where prerouting has `goto tproxy_*`.
fn local_map(f: Family) -> String {
    format!("local_{}", f.suffix())
}

/// The chain proxied frontends jump to in prerouting.
fn tproxy_chain(f: Family) -> String {
    format!("tproxy_{}", f.suffix())
}

/// The firewall chain a source-restricted proxied frontend goes to.
fn fw_tproxy_chain(f: Family) -> String {
    format!("fw_tproxy_{}", f.suffix())
}

/// The firewall chain a source-restricted frontend without endpoints goes to.
fn fw_reject_chain(f: Family) -> String {
    format!("fw_reject_{}", f.suffix())
}

/// The chain of a frontend proxied for node clients only: those arrive
/// through `lo` (the output mark's detour); the rest is dropped. `fw`: the
/// source-range firewall comes first.
fn node_chain(f: Family, fw: bool) -> String {
    if fw {
        format!("node_fw_tproxy_{}", f.suffix())
    } else {
        format!("node_tproxy_{}", f.suffix())
    }
}

/// The interval set of `daddr . proto . dport . saddr` for this node's pods,
/// per node-only frontend.
fn node_pods_set(f: Family) -> String {
    format!("node_pods_{}", f.suffix())
}

/// The interval set of allowed `daddr . proto . dport . saddr`.
fn allow_set(f: Family) -> String {
    format!("allow_{}", f.suffix())
}

/// The chain no-endpoint frontends jump to for `Action::Reject`.
const REJECT_CHAIN: &str = "reject_fe";

/// The chain proxied frontends jump to in output: the mark only.
const MARK_LOCAL_CHAIN: &str = "mark_local";

/// The key expression matched against the maps.
fn key_expr(f: Family) -> String {
    format!("{} daddr . meta l4proto . th dport", f.nft())
}

/// Which of a family's two maps an element belongs to.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Hook {
    Prerouting,
    Output,
}

impl Hook {
    const BOTH: [Hook; 2] = [Hook::Prerouting, Hook::Output];
    fn map(self, f: Family) -> String {
        match self {
            Hook::Prerouting => frontend_map(f),
            Hook::Output => local_map(f),
        }
    }
}

/// The allowed sources of a restricted rule, of the frontend's family,
/// merged so no two overlap; `None` for an unrestricted rule.
fn allowed(fe: &Frontend, rule: &Rule) -> Option<Vec<IpNet>> {
    Some(of_family(fe, rule.sources.as_ref()?))
}

/// `nets` of `fe`'s family, host bits cleared, merged (no two overlap).
fn of_family(fe: &Frontend, nets: &[IpNet]) -> Vec<IpNet> {
    let v4 = fe.family() == Family::V4;
    let same: Vec<IpNet> = nets
        .iter()
        .filter(|n| matches!(n, IpNet::V4(_)) == v4)
        .map(|n| n.trunc())
        .collect();
    IpNet::aggregate(&same)
}

/// The map verdict of `fe` in `hook`; `restricted` is [`allowed`]'s answer
/// for it (computed once per frontend by the caller).
fn verdict(hook: Hook, fe: &Frontend, rule: &Rule, restricted: Option<&[IpNet]>) -> String {
    let f = fe.family();
    if restricted.is_some_and(<[IpNet]>::is_empty) {
        // Restricted to no source at all.
        return "drop".to_string();
    }
    if rule.node_only() {
        return match hook {
            Hook::Prerouting => format!("goto {}", node_chain(f, restricted.is_some())),
            Hook::Output => format!("goto {MARK_LOCAL_CHAIN}"),
        };
    }
    match (rule.action, hook, restricted.is_some()) {
        (Action::Proxy, Hook::Prerouting, false) => format!("goto {}", tproxy_chain(f)),
        (Action::Proxy, Hook::Prerouting, true) => format!("goto {}", fw_tproxy_chain(f)),
        // Marked and looped through `lo` into prerouting, where a
        // restricted frontend's firewall applies with the node's source.
        (Action::Proxy, Hook::Output, _) => format!("goto {MARK_LOCAL_CHAIN}"),
        (Action::Reject, Hook::Prerouting, true) => format!("goto {}", fw_reject_chain(f)),
        // Node-local clients are refused before the firewall, as in
        // kube-proxy (its endpoints check precedes the firewall in output).
        (Action::Reject, _, _) => format!("goto {REJECT_CHAIN}"),
        (Action::Drop, _, _) => "drop".to_string(),
    }
}

/// The whole table, replacing whatever a previous run left behind. The
/// `add table` + `delete table` prefix makes the replacement one atomic
/// transaction whether or not the table existed: reconcile on start.
pub fn full_script(cfg: &Config, frontends: &Frontends) -> String {
    let t = &cfg.table;
    let mut s = String::new();
    let _ = writeln!(s, "add table inet {t}");
    let _ = writeln!(s, "delete table inet {t}");
    let _ = writeln!(s, "table inet {t} {{");
    for f in Family::BOTH {
        for hook in Hook::BOTH {
            let _ = writeln!(
                s,
                "\tmap {} {{\n\t\ttype {} . inet_proto . inet_service : verdict\n\t}}",
                hook.map(f),
                f.addr_type()
            );
        }
    }
    for f in Family::BOTH {
        for set in [allow_set(f), node_pods_set(f)] {
            let _ = writeln!(
                s,
                "\tset {set} {{\n\t\ttype {a} . inet_proto . inet_service . {a}\n\t\tflags interval\n\t}}",
                a = f.addr_type()
            );
        }
    }
    let _ = writeln!(
        s,
        "\tchain {REJECT_CHAIN} {{\n\t\tmeta l4proto tcp reject with tcp reset\n\t\treject\n\t}}"
    );
    for f in Family::BOTH {
        let _ = writeln!(s, "\tchain {} {{", tproxy_chain(f));
        let listener = match f {
            Family::V4 => Some(cfg.listener_v4.to_string()),
            Family::V6 => cfg.listener_v6.map(|l| l.to_string()),
        };
        // Without a listener of this family its frontends are refused.
        if let Some(l) = listener {
            for proto in L4Proto::ALL {
                let _ = writeln!(
                    s,
                    "\t\tmeta l4proto {proto} tproxy {} to {l} meta mark set {:#x} accept",
                    f.nft(),
                    cfg.mark
                );
            }
        }
        let _ = writeln!(s, "\t\tgoto {REJECT_CHAIN}\n\t}}");
    }
    for f in Family::BOTH {
        let check = format!(
            "{} . {} saddr != @{} drop",
            key_expr(f),
            f.nft(),
            allow_set(f)
        );
        // Established connections (no SYN) skip the check.
        let _ = writeln!(
            s,
            "\tchain {} {{\n\t\ttcp flags ! syn goto {t}\n\t\t{check}\n\t\tgoto {t}\n\t}}",
            fw_tproxy_chain(f),
            t = tproxy_chain(f)
        );
        let _ = writeln!(
            s,
            "\tchain {} {{\n\t\t{check}\n\t\tgoto {REJECT_CHAIN}\n\t}}",
            fw_reject_chain(f)
        );
        for (fw, to) in [(false, tproxy_chain(f)), (true, fw_tproxy_chain(f))] {
            let _ = writeln!(
                s,
                "\tchain {} {{\n\t\tiif \"lo\" goto {to}\n\t\t{} . {} saddr @{} goto {to}\n\t\tdrop\n\t}}",
                node_chain(f, fw),
                key_expr(f),
                f.nft(),
                node_pods_set(f)
            );
        }
    }
    let _ = writeln!(
        s,
        "\tchain {MARK_LOCAL_CHAIN} {{\n\t\tmeta mark set {:#x}\n\t}}",
        cfg.mark
    );

    let _ = writeln!(
        s,
        "\tchain prerouting {{\n\t\ttype filter hook prerouting priority mangle; policy accept;"
    );
    for f in Family::BOTH {
        let _ = writeln!(s, "\t\t{} vmap @{}", key_expr(f), frontend_map(f));
    }
    if cfg.keep_client_source {
        let _ = writeln!(
            s,
            "\t\tmeta l4proto tcp tcp flags & (syn | ack) != syn socket transparent 1 meta mark set {m:#x} accept\n\t\tmeta l4proto udp socket transparent 1 meta mark set {m:#x} accept",
            m = cfg.mark
        );
    }
    let _ = writeln!(s, "\t}}");

    let _ = writeln!(
        s,
        "\tchain output {{\n\t\ttype route hook output priority mangle; policy accept;"
    );
    let _ = writeln!(
        s,
        "\t\tmeta mark & {m:#x} == {m:#x} return",
        m = cfg.upstream_mark
    );
    for f in Family::BOTH {
        let _ = writeln!(s, "\t\t{} vmap @{}", key_expr(f), local_map(f));
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "}}");

    let adds: Vec<(&Frontend, &Rule)> = frontends.iter().collect();
    write_elements(&mut s, t, "add", &adds);
    s
}

/// A transaction from [`patch_script`] or [`diff_script`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff {
    /// The `nft -f -` script.
    pub script: String,
    /// Frontends added, removed or whose action changed.
    pub frontends: usize,
}

/// The transaction that turns `old` into `new`, or `None` when nothing
/// changed. Only elements whose action changed (or that appeared or
/// vanished) are touched: established connections to unchanged frontends
/// never see a rule change. A changed action is a delete and an add of the
/// same key in the same transaction (nft 1.0 has no in-place verdict
/// replace), so the change is atomic.
pub fn diff_script(cfg: &Config, old: &Frontends, new: &Frontends) -> Option<Diff> {
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    for (fe, r) in old {
        if new.get(fe) != Some(r) {
            deletes.push((fe, r));
        }
    }
    for (fe, r) in new {
        if old.get(fe) != Some(r) {
            adds.push((fe, r));
        }
    }
    script_of(cfg, &deletes, &adds)
}

/// The wanted state of some frontends: a rule, or `None` for none at all.
/// Frontends not listed keep what they have.
pub type Changes = Vec<(Frontend, Option<Rule>)>;

/// `frontends` with `changes` applied: what [`patch_script`]'s transaction
/// leaves in the kernel.
pub fn patch(
    frontends: &mut Frontends,
    changes: impl IntoIterator<Item = (Frontend, Option<Rule>)>,
) {
    for (fe, want) in changes {
        match want {
            Some(rule) => frontends.insert(fe, rule),
            None => frontends.remove(&fe),
        };
    }
}

/// [`diff_script`] from `installed` to `installed` with `changes` applied,
/// in O(changes): only the listed frontends are compared.
pub fn patch_script(cfg: &Config, installed: &Frontends, changes: &Changes) -> Option<Diff> {
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    for (fe, want) in changes {
        let have = installed.get(fe);
        if have == want.as_ref() {
            continue;
        }
        if let Some(r) = have {
            deletes.push((fe, r));
        }
        if let Some(r) = want {
            adds.push((fe, r));
        }
    }
    script_of(cfg, &deletes, &adds)
}

fn script_of(
    cfg: &Config,
    deletes: &[(&Frontend, &Rule)],
    adds: &[(&Frontend, &Rule)],
) -> Option<Diff> {
    if deletes.is_empty() && adds.is_empty() {
        return None;
    }
    let changed = deletes.iter().chain(adds).map(|(fe, _)| *fe);
    let frontends = changed.collect::<std::collections::BTreeSet<_>>().len();
    let mut script = String::new();
    write_elements(&mut script, &cfg.table, "delete", deletes);
    write_elements(&mut script, &cfg.table, "add", adds);
    Some(Diff { script, frontends })
}

/// Removes the table if present (idempotent, atomic).
pub fn delete_script(cfg: &Config) -> String {
    format!("add table inet {t}\ndelete table inet {t}\n", t = cfg.table)
}

fn write_elements(s: &mut String, table: &str, verb: &str, items: &[(&Frontend, &Rule)]) {
    // Every frontend is in both maps of its family, and a restricted one has
    // an element per allowed network in its family's set; group by map or
    // set so each statement names one (maps first, then sets).
    let mut groups: BTreeMap<(u8, String), Vec<String>> = BTreeMap::new();
    for (fe, rule) in items {
        let f = fe.family();
        let restricted = allowed(fe, rule);
        for hook in Hook::BOTH {
            let text = if verb == "delete" {
                fe.to_string()
            } else {
                format!("{fe} : {}", verdict(hook, fe, rule, restricted.as_deref()))
            };
            groups
                .entry((hook as u8, hook.map(f)))
                .or_default()
                .push(text);
        }
        for net in restricted.into_iter().flatten() {
            groups
                .entry((2, allow_set(f)))
                .or_default()
                .push(format!("{fe} . {net}"));
        }
        if rule.node_only() {
            for net in of_family(fe, &rule.node_pods) {
                groups
                    .entry((3, node_pods_set(f)))
                    .or_default()
                    .push(format!("{fe} . {net}"));
            }
        }
    }
    for ((_, name), elems) in groups {
        for chunk in elems.chunks(ELEMENTS_PER_STATEMENT) {
            let _ = writeln!(
                s,
                "{verb} element inet {table} {name} {{ {} }}",
                chunk.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            table: "lightpath".into(),
            listener_v4: "127.0.0.1:15001".parse().unwrap(),
            listener_v6: Some("[::1]:15001".parse().unwrap()),
            mark: 1,
            upstream_mark: 2,
            route_table: 100,
            keep_client_source: false,
        }
    }

    fn fe(s: &str) -> Frontend {
        let a: std::net::SocketAddr = s.parse().unwrap();
        Frontend::tcp(a.ip(), a.port())
    }

    /// The rules of one chain, in order.
    fn chain<'a>(script: &'a str, name: &str) -> Vec<&'a str> {
        let head = format!("chain {name} {{");
        script
            .lines()
            .map(str::trim)
            .skip_while(|l| *l != head)
            .skip(1)
            .take_while(|l| *l != "}")
            .filter(|l| !l.starts_with("type "))
            .collect()
    }

    fn rule_lines(script: &str) -> Vec<&str> {
        // Lines at chain depth that are rules (not the base-chain header).
        let mut in_chain = false;
        let mut out = Vec::new();
        for line in script.lines() {
            let l = line.trim();
            if l.starts_with("chain ") {
                in_chain = true;
                continue;
            }
            if in_chain && l == "}" {
                in_chain = false;
                continue;
            }
            if in_chain && !l.starts_with("type ") {
                out.push(l);
            }
        }
        out
    }

    #[test]
    fn one_map_lookup_per_packet_and_family() {
        let s = full_script(&cfg(), &Frontends::new());
        assert!(s.starts_with("add table inet lightpath\ndelete table inet lightpath\n"));
        assert_eq!(
            chain(&s, "prerouting"),
            vec![
                "ip daddr . meta l4proto . th dport vmap @fe_v4",
                "ip6 daddr . meta l4proto . th dport vmap @fe_v6",
            ]
        );
        assert_eq!(
            chain(&s, "output"),
            vec![
                "meta mark & 0x2 == 0x2 return",
                "ip daddr . meta l4proto . th dport vmap @local_v4",
                "ip6 daddr . meta l4proto . th dport vmap @local_v6",
            ]
        );
        for m in ["fe_v4", "local_v4"] {
            assert!(s.contains(&format!(
                "map {m} {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n"
            )));
        }
        for m in ["fe_v6", "local_v6"] {
            assert!(s.contains(&format!(
                "map {m} {{\n\t\ttype ipv6_addr . inet_proto . inet_service : verdict\n"
            )));
        }
        // The only sets: the source-range firewall's and the node's pods,
        // one each per family.
        let sets: Vec<&str> = s
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("set "))
            .collect();
        assert_eq!(
            sets,
            vec![
                "set allow_v4 {",
                "set node_pods_v4 {",
                "set allow_v6 {",
                "set node_pods_v6 {"
            ],
            "{s}"
        );
        assert!(s.contains(
            "set allow_v4 {\n\t\ttype ipv4_addr . inet_proto . inet_service . ipv4_addr\n\t\tflags interval\n"
        ));
        assert_eq!(chain(&s, "mark_local"), vec!["meta mark set 0x1"]);
    }

    #[test]
    fn the_reply_rule_follows_the_frontend_lookup_and_skips_syns() {
        let mut c = cfg();
        c.keep_client_source = true;
        let s = full_script(&c, &Frontends::new());
        assert_eq!(
            chain(&s, "prerouting"),
            vec![
                "ip daddr . meta l4proto . th dport vmap @fe_v4",
                "ip6 daddr . meta l4proto . th dport vmap @fe_v6",
                "meta l4proto tcp tcp flags & (syn | ack) != syn socket transparent 1 meta mark set 0x1 accept",
                "meta l4proto udp socket transparent 1 meta mark set 0x1 accept",
            ]
        );
        // Without kept sources, no socket lookup at all.
        assert!(!full_script(&cfg(), &Frontends::new()).contains("socket"));
    }

    #[test]
    fn tproxy_chains_fall_back_to_reject_and_have_no_syn_matching_fast_path() {
        let s = full_script(&cfg(), &Frontends::new());
        assert_eq!(
            chain(&s, "tproxy_v4"),
            vec![
                "meta l4proto tcp tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept",
                "meta l4proto udp tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept",
                "goto reject_fe",
            ]
        );
        assert_eq!(
            chain(&s, "tproxy_v6"),
            vec![
                "meta l4proto tcp tproxy ip6 to [::1]:15001 meta mark set 0x1 accept",
                "meta l4proto udp tproxy ip6 to [::1]:15001 meta mark set 0x1 accept",
                "goto reject_fe",
            ]
        );
        // UDP gets the kernel's ICMP port unreachable, TCP a reset.
        assert_eq!(
            chain(&s, "reject_fe"),
            vec!["meta l4proto tcp reject with tcp reset", "reject"]
        );
        assert!(!s.contains("socket transparent"), "no fast path: {s}");
    }

    #[test]
    fn every_action_is_one_element_per_map() {
        let mut f = Frontends::new();
        f.insert(fe("10.96.0.10:53"), Action::Proxy.into());
        f.insert(
            Frontend::udp("10.96.0.10".parse().unwrap(), 53),
            Action::Proxy.into(),
        );
        f.insert(fe("10.96.0.11:80"), Action::Reject.into());
        f.insert(fe("[fd00::10]:443"), Action::Drop.into());
        let s = full_script(&cfg(), &f);
        let adds: Vec<&str> = s.lines().filter(|l| l.starts_with("add element")).collect();
        assert_eq!(
            adds,
            vec![
                "add element inet lightpath fe_v4 { 10.96.0.10 . tcp . 53 : goto tproxy_v4, \
                 10.96.0.10 . udp . 53 : goto tproxy_v4, 10.96.0.11 . tcp . 80 : goto reject_fe }",
                "add element inet lightpath fe_v6 { fd00::10 . tcp . 443 : drop }",
                "add element inet lightpath local_v4 { 10.96.0.10 . tcp . 53 : goto mark_local, \
                 10.96.0.10 . udp . 53 : goto mark_local, 10.96.0.11 . tcp . 80 : goto reject_fe }",
                "add element inet lightpath local_v6 { fd00::10 . tcp . 443 : drop }",
            ]
        );
    }

    #[test]
    fn rule_count_is_constant_in_frontends() {
        let small: Frontends = (0..10u16)
            .map(|i| (fe(&format!("10.96.0.1:{}", 1000 + i)), Action::Proxy.into()))
            .collect();
        let big: Frontends = (0..10_000u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0a60_0000 + i);
                (Frontend::tcp(ip.into(), 80), Action::Proxy.into())
            })
            .collect();
        let a = full_script(&cfg(), &small);
        let b = full_script(&cfg(), &big);
        assert_eq!(rule_lines(&a), rule_lines(&b));
        assert_eq!(rule_lines(&b).len(), 36, "{:?}", rule_lines(&b));
        // 10,000 elements in each of two maps, in statements of at most
        // ELEMENTS_PER_STATEMENT.
        let stmts = b.lines().filter(|l| l.starts_with("add element")).count();
        assert_eq!(stmts, 2 * 10_000 / ELEMENTS_PER_STATEMENT);
    }

    fn nets(v: &[&str]) -> Arc<[IpNet]> {
        v.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn restricted_frontends_go_through_the_firewall_before_their_action() {
        let s = full_script(&cfg(), &Frontends::new());
        // Allowed sources go on; others are dropped, before any reject.
        // Only SYNs are checked on the proxy path: established
        // connections survive a range change.
        assert_eq!(
            chain(&s, "fw_tproxy_v4"),
            vec![
                "tcp flags ! syn goto tproxy_v4",
                "ip daddr . meta l4proto . th dport . ip saddr != @allow_v4 drop",
                "goto tproxy_v4",
            ]
        );
        assert_eq!(
            chain(&s, "fw_reject_v6"),
            vec![
                "ip6 daddr . meta l4proto . th dport . ip6 saddr != @allow_v6 drop",
                "goto reject_fe",
            ]
        );

        let mut f = Frontends::new();
        let lb = nets(&["203.0.113.0/24", "198.51.100.7/32"]);
        f.insert(fe("192.0.2.10:80"), Rule::only(Action::Proxy, lb.clone()));
        f.insert(fe("192.0.2.11:80"), Rule::only(Action::Reject, lb.clone()));
        f.insert(fe("192.0.2.12:80"), Rule::only(Action::Drop, lb));
        // Restricted to nothing usable (only IPv6 ranges for a v4 address).
        f.insert(
            fe("192.0.2.13:80"),
            Rule::only(Action::Proxy, nets(&["2001:db8::/32"])),
        );
        f.insert(
            fe("[2001:db8::10]:443"),
            Rule::only(Action::Proxy, nets(&["2001:db8:1::/48", "10.0.0.0/8"])),
        );
        let s = full_script(&cfg(), &f);
        let adds: Vec<&str> = s.lines().filter(|l| l.starts_with("add element")).collect();
        assert_eq!(
            adds,
            vec![
                "add element inet lightpath fe_v4 { 192.0.2.10 . tcp . 80 : goto fw_tproxy_v4, \
                 192.0.2.11 . tcp . 80 : goto fw_reject_v4, 192.0.2.12 . tcp . 80 : drop, \
                 192.0.2.13 . tcp . 80 : drop }",
                "add element inet lightpath fe_v6 { 2001:db8::10 . tcp . 443 : goto fw_tproxy_v6 }",
                // Node-local clients: proxied ones are checked in
                // prerouting after the loop through lo; a reject comes
                // first, as in kube-proxy.
                "add element inet lightpath local_v4 { 192.0.2.10 . tcp . 80 : goto mark_local, \
                 192.0.2.11 . tcp . 80 : goto reject_fe, 192.0.2.12 . tcp . 80 : drop, \
                 192.0.2.13 . tcp . 80 : drop }",
                "add element inet lightpath local_v6 { 2001:db8::10 . tcp . 443 : goto mark_local }",
                "add element inet lightpath allow_v4 { 192.0.2.10 . tcp . 80 . 198.51.100.7/32, \
                 192.0.2.10 . tcp . 80 . 203.0.113.0/24, 192.0.2.11 . tcp . 80 . 198.51.100.7/32, \
                 192.0.2.11 . tcp . 80 . 203.0.113.0/24, 192.0.2.12 . tcp . 80 . 198.51.100.7/32, \
                 192.0.2.12 . tcp . 80 . 203.0.113.0/24 }",
                "add element inet lightpath allow_v6 { 2001:db8::10 . tcp . 443 . 2001:db8:1::/48 }",
            ]
        );
    }

    #[test]
    fn node_clients_of_a_local_policy_frontend_without_local_endpoints_are_proxied() {
        let s = full_script(&cfg(), &Frontends::new());
        // Node processes arrive through lo; the node's pods are listed per
        // frontend.
        assert_eq!(
            chain(&s, "node_tproxy_v4"),
            vec![
                "iif \"lo\" goto tproxy_v4",
                "ip daddr . meta l4proto . th dport . ip saddr @node_pods_v4 goto tproxy_v4",
                "drop"
            ]
        );
        assert_eq!(
            chain(&s, "node_fw_tproxy_v6"),
            vec![
                "iif \"lo\" goto fw_tproxy_v6",
                "ip6 daddr . meta l4proto . th dport . ip6 saddr @node_pods_v6 goto fw_tproxy_v6",
                "drop"
            ]
        );
        let mut f = Frontends::new();
        let pods = nets(&["10.244.1.0/24", "fd00:244:1::/64"]);
        f.insert(
            fe("10.0.1.1:30070"),
            Rule::from(Action::Drop).for_node(Action::Proxy, pods.clone()),
        );
        f.insert(
            fe("192.0.2.70:443"),
            Rule::only(Action::Drop, nets(&["203.0.113.0/24"])).for_node(Action::Proxy, pods),
        );
        // Same action for everyone: nothing special.
        f.insert(fe("10.96.0.30:80"), Rule::from(Action::Drop));
        let s = full_script(&cfg(), &f);
        let adds: Vec<&str> = s.lines().filter(|l| l.starts_with("add element")).collect();
        assert_eq!(
            adds,
            vec![
                "add element inet lightpath fe_v4 { 10.0.1.1 . tcp . 30070 : goto node_tproxy_v4, \
                 10.96.0.30 . tcp . 80 : drop, 192.0.2.70 . tcp . 443 : goto node_fw_tproxy_v4 }",
                "add element inet lightpath local_v4 { 10.0.1.1 . tcp . 30070 : goto mark_local, \
                 10.96.0.30 . tcp . 80 : drop, 192.0.2.70 . tcp . 443 : goto mark_local }",
                "add element inet lightpath allow_v4 { 192.0.2.70 . tcp . 443 . 203.0.113.0/24 }",
                "add element inet lightpath node_pods_v4 { 10.0.1.1 . tcp . 30070 . 10.244.1.0/24, \
                 192.0.2.70 . tcp . 443 . 10.244.1.0/24 }",
            ]
        );
        // A change of the node action alone is a change of the frontend.
        let mut before = Frontends::new();
        before.insert(fe("10.0.1.1:30070"), Rule::from(Action::Drop));
        let d = diff_script(&cfg(), &before, &f).unwrap();
        assert!(d.script.contains(
            "add element inet lightpath fe_v4 { 10.0.1.1 . tcp . 30070 : goto node_tproxy_v4"
        ));
    }

    #[test]
    fn overlapping_ranges_are_merged_and_host_bits_cleared() {
        // The kernel refuses two overlapping interval elements for one key
        // (the whole transaction fails), so nested and adjacent ranges
        // become one element.
        let mut f = Frontends::new();
        f.insert(
            fe("192.0.2.10:80"),
            Rule::only(
                Action::Proxy,
                nets(&[
                    "10.0.0.0/8",
                    "10.1.0.0/16",
                    "172.16.0.0/25",
                    "172.16.0.128/25",
                    "192.168.7.9/24",
                ]),
            ),
        );
        let s = full_script(&cfg(), &f);
        let set: Vec<&str> = s
            .lines()
            .filter(|l| l.starts_with("add element inet lightpath allow_v4"))
            .collect();
        assert_eq!(
            set,
            vec![
                "add element inet lightpath allow_v4 { 192.0.2.10 . tcp . 80 . 10.0.0.0/8, \
                 192.0.2.10 . tcp . 80 . 172.16.0.0/24, 192.0.2.10 . tcp . 80 . 192.168.7.0/24 }"
            ]
        );
    }

    #[test]
    fn a_range_change_swaps_set_elements_in_one_transaction() {
        let mut old = Frontends::new();
        old.insert(
            fe("192.0.2.10:80"),
            Rule::only(Action::Proxy, nets(&["203.0.113.0/24"])),
        );
        let mut new = old.clone();
        new.insert(
            fe("192.0.2.10:80"),
            Rule::only(Action::Proxy, nets(&["198.51.100.0/24"])),
        );
        let d = diff_script(&cfg(), &old, &new).unwrap();
        assert_eq!(d.frontends, 1);
        assert_eq!(
            d.script.lines().collect::<Vec<_>>(),
            vec![
                "delete element inet lightpath fe_v4 { 192.0.2.10 . tcp . 80 }",
                "delete element inet lightpath local_v4 { 192.0.2.10 . tcp . 80 }",
                "delete element inet lightpath allow_v4 { 192.0.2.10 . tcp . 80 . 203.0.113.0/24 }",
                "add element inet lightpath fe_v4 { 192.0.2.10 . tcp . 80 : goto fw_tproxy_v4 }",
                "add element inet lightpath local_v4 { 192.0.2.10 . tcp . 80 : goto mark_local }",
                "add element inet lightpath allow_v4 { 192.0.2.10 . tcp . 80 . 198.51.100.0/24 }",
            ]
        );
        // Lifting the restriction leaves no set element behind.
        let open: Frontends = [(fe("192.0.2.10:80"), Rule::from(Action::Proxy))].into();
        let d = diff_script(&cfg(), &new, &open).unwrap();
        assert!(d.script.contains(
            "delete element inet lightpath allow_v4 { 192.0.2.10 . tcp . 80 . 198.51.100.0/24 }"
        ));
        assert!(!d.script.contains("add element inet lightpath allow_v4"));
        assert!(d.script.contains(
            "add element inet lightpath fe_v4 { 192.0.2.10 . tcp . 80 : goto tproxy_v4 }"
        ));
        // Unchanged ranges, unchanged elements.
        assert_eq!(diff_script(&cfg(), &new, &new.clone()), None);
    }

    #[test]
    fn no_v6_listener_means_v6_frontends_are_refused() {
        let mut c = cfg();
        c.listener_v6 = None;
        let s = full_script(&c, &Frontends::new());
        assert!(!s.contains("tproxy ip6"));
        assert_eq!(chain(&s, "tproxy_v6"), vec!["goto reject_fe"]);
    }

    #[test]
    fn action_change_is_a_delete_and_an_add_in_one_transaction() {
        let ip = "10.96.0.10".parse().unwrap();
        let mut old = Frontends::new();
        old.insert(Frontend::udp(ip, 53), Action::Proxy.into());
        old.insert(Frontend::tcp(ip, 53), Action::Proxy.into());
        let mut new = old.clone();
        new.insert(Frontend::udp(ip, 53), Action::Reject.into());
        let d = diff_script(&cfg(), &old, &new).unwrap();
        assert_eq!(d.frontends, 1);
        assert_eq!(
            d.script,
            "delete element inet lightpath fe_v4 { 10.96.0.10 . udp . 53 }\n\
             delete element inet lightpath local_v4 { 10.96.0.10 . udp . 53 }\n\
             add element inet lightpath fe_v4 { 10.96.0.10 . udp . 53 : goto reject_fe }\n\
             add element inet lightpath local_v4 { 10.96.0.10 . udp . 53 : goto reject_fe }\n"
        );
    }

    #[test]
    fn diff_touches_only_changed_elements() {
        let mut old = Frontends::new();
        old.insert(fe("10.96.0.1:80"), Action::Proxy.into());
        old.insert(fe("10.96.0.2:80"), Action::Proxy.into());
        old.insert(fe("10.96.0.3:80"), Action::Reject.into());
        let mut new = old.clone();
        assert_eq!(diff_script(&cfg(), &old, &new), None);

        new.remove(&fe("10.96.0.1:80"));
        new.insert(fe("10.96.0.3:80"), Action::Drop.into());
        new.insert(fe("10.96.0.4:80"), Action::Proxy.into());
        new.insert(fe("[fd00::4]:80"), Action::Reject.into());
        let d = diff_script(&cfg(), &old, &new).unwrap();
        assert_eq!(d.frontends, 4);
        let lines: Vec<&str> = d.script.lines().collect();
        assert_eq!(
            lines,
            vec![
                "delete element inet lightpath fe_v4 { 10.96.0.1 . tcp . 80, 10.96.0.3 . tcp . 80 }",
                "delete element inet lightpath local_v4 { 10.96.0.1 . tcp . 80, 10.96.0.3 . tcp . 80 }",
                "add element inet lightpath fe_v4 { 10.96.0.3 . tcp . 80 : drop, 10.96.0.4 . tcp . 80 : goto tproxy_v4 }",
                "add element inet lightpath fe_v6 { fd00::4 . tcp . 80 : goto reject_fe }",
                "add element inet lightpath local_v4 { 10.96.0.3 . tcp . 80 : drop, 10.96.0.4 . tcp . 80 : goto mark_local }",
                "add element inet lightpath local_v6 { fd00::4 . tcp . 80 : goto reject_fe }",
            ]
        );
        assert!(
            !d.script.contains("10.96.0.2"),
            "unchanged element touched: {d:?}"
        );
    }

    /// The patch of a few frontends writes the same transaction as the
    /// diff of the two whole maps, and nothing when the listed frontends
    /// already have what is asked.
    #[test]
    fn patch_matches_the_diff_of_the_whole_maps() {
        let mut old = Frontends::new();
        old.insert(fe("10.96.0.1:80"), Action::Proxy.into());
        old.insert(fe("10.96.0.2:80"), Action::Proxy.into());
        old.insert(fe("10.96.0.3:80"), Action::Reject.into());
        let changes: Changes = vec![
            (fe("10.96.0.1:80"), None),
            (fe("10.96.0.2:80"), Some(Action::Proxy.into())),
            (fe("10.96.0.3:80"), Some(Action::Drop.into())),
            (fe("10.96.0.4:80"), Some(Action::Proxy.into())),
            (fe("[fd00::4]:80"), Some(Action::Reject.into())),
            (fe("10.96.0.5:80"), None),
        ];
        let mut new = old.clone();
        patch(&mut new, changes.clone());
        let patch = patch_script(&cfg(), &old, &changes).unwrap();
        assert_eq!(Some(patch), diff_script(&cfg(), &old, &new));
        let noop: Changes = vec![
            (fe("10.96.0.2:80"), Some(Action::Proxy.into())),
            (fe("10.96.0.9:80"), None),
        ];
        assert_eq!(patch_script(&cfg(), &old, &noop), None);
    }

    #[test]
    fn delete_script_is_idempotent_form() {
        assert_eq!(
            delete_script(&cfg()),
            "add table inet lightpath\ndelete table inet lightpath\n"
        );
    }
}
