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
//! ([`diff_script`]), applied in one transaction: a frontend whose action
//! changes is deleted and re-added with its new verdict in both maps in the
//! same batch, so no packet sees it missing.

use std::collections::BTreeMap;
use std::fmt::{self, Write};
use std::net::{IpAddr, SocketAddrV4, SocketAddrV6};

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

/// The desired state: every frontend and its action.
pub type Frontends = BTreeMap<Frontend, Action>;

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

fn verdict(hook: Hook, f: Family, action: Action) -> String {
    match (action, hook) {
        (Action::Proxy, Hook::Prerouting) => format!("goto {}", tproxy_chain(f)),
        (Action::Proxy, Hook::Output) => format!("goto {MARK_LOCAL_CHAIN}"),
        (Action::Reject, _) => format!("goto {REJECT_CHAIN}"),
        (Action::Drop, _) => "drop".to_string(),
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

    let adds: Vec<(&Frontend, Action)> = frontends.iter().map(|(f, a)| (f, *a)).collect();
    write_elements(&mut s, t, "add", &adds);
    s
}

/// A transaction from [`diff_script`].
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
    for (fe, &a) in old {
        if new.get(fe) != Some(&a) {
            deletes.push((fe, a));
        }
    }
    for (fe, &a) in new {
        if old.get(fe) != Some(&a) {
            adds.push((fe, a));
        }
    }
    if deletes.is_empty() && adds.is_empty() {
        return None;
    }
    let changed = deletes.iter().chain(&adds).map(|(fe, _)| *fe);
    let frontends = changed.collect::<std::collections::BTreeSet<_>>().len();
    let mut script = String::new();
    write_elements(&mut script, &cfg.table, "delete", &deletes);
    write_elements(&mut script, &cfg.table, "add", &adds);
    Some(Diff { script, frontends })
}

/// Removes the table if present (idempotent, atomic).
pub fn delete_script(cfg: &Config) -> String {
    format!("add table inet {t}\ndelete table inet {t}\n", t = cfg.table)
}

fn write_elements(s: &mut String, table: &str, verb: &str, items: &[(&Frontend, Action)]) {
    // Every frontend is in both maps of its family; group by map so each
    // statement names one.
    let mut groups: BTreeMap<(Hook, String), Vec<String>> = BTreeMap::new();
    for (fe, a) in items {
        let f = fe.family();
        for hook in Hook::BOTH {
            let text = if verb == "delete" {
                fe.to_string()
            } else {
                format!("{fe} : {}", verdict(hook, f, *a))
            };
            groups.entry((hook, hook.map(f))).or_default().push(text);
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
        assert!(
            !s.lines().any(|l| l.trim().starts_with("set ")),
            "no sets besides the maps: {s}"
        );
        assert_eq!(chain(&s, "mark_local"), vec!["meta mark set 0x1"]);
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
        f.insert(fe("10.96.0.10:53"), Action::Proxy);
        f.insert(
            Frontend::udp("10.96.0.10".parse().unwrap(), 53),
            Action::Proxy,
        );
        f.insert(fe("10.96.0.11:80"), Action::Reject);
        f.insert(fe("[fd00::10]:443"), Action::Drop);
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
            .map(|i| (fe(&format!("10.96.0.1:{}", 1000 + i)), Action::Proxy))
            .collect();
        let big: Frontends = (0..10_000u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0a60_0000 + i);
                (Frontend::tcp(ip.into(), 80), Action::Proxy)
            })
            .collect();
        let a = full_script(&cfg(), &small);
        let b = full_script(&cfg(), &big);
        assert_eq!(rule_lines(&a), rule_lines(&b));
        assert_eq!(rule_lines(&b).len(), 14, "{:?}", rule_lines(&b));
        // 10,000 elements in each of two maps, in statements of at most
        // ELEMENTS_PER_STATEMENT.
        let stmts = b.lines().filter(|l| l.starts_with("add element")).count();
        assert_eq!(stmts, 2 * 10_000 / ELEMENTS_PER_STATEMENT);
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
        old.insert(Frontend::udp(ip, 53), Action::Proxy);
        old.insert(Frontend::tcp(ip, 53), Action::Proxy);
        let mut new = old.clone();
        new.insert(Frontend::udp(ip, 53), Action::Reject);
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
        old.insert(fe("10.96.0.1:80"), Action::Proxy);
        old.insert(fe("10.96.0.2:80"), Action::Proxy);
        old.insert(fe("10.96.0.3:80"), Action::Reject);
        let mut new = old.clone();
        assert_eq!(diff_script(&cfg(), &old, &new), None);

        new.remove(&fe("10.96.0.1:80"));
        new.insert(fe("10.96.0.3:80"), Action::Drop);
        new.insert(fe("10.96.0.4:80"), Action::Proxy);
        new.insert(fe("[fd00::4]:80"), Action::Reject);
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

    #[test]
    fn delete_script_is_idempotent_form() {
        assert_eq!(
            delete_script(&cfg()),
            "add table inet lightpath\ndelete table inet lightpath\n"
        );
    }
}
