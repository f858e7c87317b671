//! The nftables ruleset as text for `nft -f -`, built by pure functions.
//!
//! Why sets and maps: kube-proxy's iptables mode grows one rule chain per
//! service, so every packet walks a list that is linear in services. Here
//! every frontend is a set element keyed by `address . protocol . port`, and
//! the rules are a constant handful per family, whatever the number of
//! services (kube-proxy's nftables mode does the same with verdict maps).
//!
//! The table, for one family (IPv6 is the same with `ip6`):
//!
//! * `prerouting` (filter, priority mangle):
//!   1. `noep_v4` verdict map: frontends without usable endpoints get the
//!      model's verdict in the kernel: `goto reject_fe` or `drop`.
//!   2. `proxy_v4` set → `tproxy` to lightpath's listener, mark, accept; one
//!      rule for TCP and one for UDP (the same set holds both: the protocol
//!      is part of the key). UDP datagrams land on a transparent UDP socket
//!      at the same address as the TCP listener.
//!      There is deliberately no `socket transparent` fast path before it:
//!      one that also matches SYNs stalls new connections for 1 s behind the
//!      proxy's TIME_WAIT sockets, and `tproxy` already finds established
//!      sockets itself.
//!   3. `proxy_v4` again → `goto reject_fe`: reached only when tproxy found no
//!      listener (lightpath down or restarting). TCP clients get a RST at
//!      once instead of waiting on rate-limited ICMP; UDP clients get ICMP
//!      port unreachable, which is what kube-proxy answers for a UDP service
//!      without endpoints.
//! * `output` (route, priority mangle): locally originated packets (node
//!   processes, host-network pods) to a frontend get the mark, so policy
//!   routing sends them through `lo` back into `prerouting`. lightpath's own
//!   upstream sockets carry the upstream mark and are skipped, so it can never
//!   capture itself. No-endpoint verdicts apply here directly.
//!
//! Changes after the first load are element additions and deletions only
//! ([`diff_script`]), applied in one transaction.

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

fn proxy_set(f: Family) -> String {
    format!("proxy_{}", f.suffix())
}

fn noep_map(f: Family) -> String {
    format!("noep_{}", f.suffix())
}

/// The chain no-endpoint frontends jump to for `Action::Reject`.
const REJECT_CHAIN: &str = "reject_fe";

/// The key expression matched against the sets.
fn key_expr(f: Family) -> String {
    format!("{} daddr . meta l4proto . th dport", f.nft())
}

fn verdict(action: Action) -> Option<String> {
    match action {
        Action::Proxy => None,
        Action::Reject => Some(format!("goto {REJECT_CHAIN}")),
        Action::Drop => Some("drop".to_string()),
    }
}

/// Where a frontend's element lives, given its action.
fn container(fe: &Frontend, action: Action) -> String {
    match action {
        Action::Proxy => proxy_set(fe.family()),
        Action::Reject | Action::Drop => noep_map(fe.family()),
    }
}

/// The element as written in an `add element` statement.
fn element(fe: &Frontend, action: Action) -> String {
    match verdict(action) {
        None => fe.to_string(),
        Some(v) => format!("{fe} : {v}"),
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
        let _ = writeln!(
            s,
            "\tset {} {{\n\t\ttype {} . inet_proto . inet_service\n\t}}",
            proxy_set(f),
            f.addr_type()
        );
        let _ = writeln!(
            s,
            "\tmap {} {{\n\t\ttype {} . inet_proto . inet_service : verdict\n\t}}",
            noep_map(f),
            f.addr_type()
        );
    }
    let _ = writeln!(
        s,
        "\tchain {REJECT_CHAIN} {{\n\t\tmeta l4proto tcp reject with tcp reset\n\t\treject\n\t}}"
    );

    let _ = writeln!(
        s,
        "\tchain prerouting {{\n\t\ttype filter hook prerouting priority mangle; policy accept;"
    );
    for f in Family::BOTH {
        let _ = writeln!(s, "\t\t{} vmap @{}", key_expr(f), noep_map(f));
    }
    for proto in L4Proto::ALL {
        let _ = writeln!(
            s,
            "\t\tmeta l4proto {proto} {} @{} tproxy ip to {} meta mark set {:#x} accept",
            key_expr(Family::V4),
            proxy_set(Family::V4),
            cfg.listener_v4,
            cfg.mark
        );
        if let Some(l6) = cfg.listener_v6 {
            let _ = writeln!(
                s,
                "\t\tmeta l4proto {proto} {} @{} tproxy ip6 to {} meta mark set {:#x} accept",
                key_expr(Family::V6),
                proxy_set(Family::V6),
                l6,
                cfg.mark
            );
        }
    }
    for f in Family::BOTH {
        let _ = writeln!(
            s,
            "\t\t{} @{} goto {REJECT_CHAIN}",
            key_expr(f),
            proxy_set(f)
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
        let _ = writeln!(s, "\t\t{} vmap @{}", key_expr(f), noep_map(f));
        let _ = writeln!(
            s,
            "\t\t{} @{} meta mark set {:#x}",
            key_expr(f),
            proxy_set(f),
            cfg.mark
        );
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "}}");

    let adds: Vec<(&Frontend, Action)> = frontends.iter().map(|(f, a)| (f, *a)).collect();
    write_elements(&mut s, t, "add", &adds);
    s
}

/// The transaction that turns `old` into `new`, or `None` when nothing
/// changed. Only elements whose action changed (or that appeared or
/// vanished) are touched: established connections to unchanged frontends
/// never see a rule change.
pub fn diff_script(cfg: &Config, old: &Frontends, new: &Frontends) -> Option<String> {
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
    let mut s = String::new();
    write_elements(&mut s, &cfg.table, "delete", &deletes);
    write_elements(&mut s, &cfg.table, "add", &adds);
    Some(s)
}

/// Removes the table if present (idempotent, atomic).
pub fn delete_script(cfg: &Config) -> String {
    format!("add table inet {t}\ndelete table inet {t}\n", t = cfg.table)
}

fn write_elements(s: &mut String, table: &str, verb: &str, items: &[(&Frontend, Action)]) {
    // Group by container so each statement names one set or map.
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (fe, a) in items {
        let text = if verb == "delete" {
            fe.to_string()
        } else {
            element(fe, *a)
        };
        groups.entry(container(fe, *a)).or_default().push(text);
    }
    for (name, elems) in groups {
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
    fn full_script_has_sets_chains_and_elements() {
        let mut f = Frontends::new();
        f.insert(fe("10.96.0.10:53"), Action::Proxy);
        f.insert(fe("10.96.0.11:80"), Action::Reject);
        f.insert(fe("[fd00::10]:443"), Action::Drop);
        let s = full_script(&cfg(), &f);
        assert!(s.starts_with("add table inet lightpath\ndelete table inet lightpath\n"));
        assert!(s.contains("type ipv4_addr . inet_proto . inet_service\n"));
        assert!(s.contains("type ipv6_addr . inet_proto . inet_service : verdict\n"));
        assert!(s.contains(
            "meta l4proto tcp ip daddr . meta l4proto . th dport @proxy_v4 tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept"
        ));
        assert!(s.contains("tproxy ip6 to [::1]:15001 meta mark set 0x1 accept"));
        assert!(s.contains("add element inet lightpath proxy_v4 { 10.96.0.10 . tcp . 53 }"));
        assert!(s.contains(
            "add element inet lightpath noep_v4 { 10.96.0.11 . tcp . 80 : goto reject_fe }"
        ));
        assert!(s.contains("add element inet lightpath noep_v6 { fd00::10 . tcp . 443 : drop }"));
        assert!(s.contains("meta mark & 0x2 == 0x2 return"));
    }

    #[test]
    fn fallback_reject_follows_tproxy_and_no_syn_matching_fast_path() {
        let s = full_script(&cfg(), &Frontends::new());
        let rules = rule_lines(&s);
        let tproxy4 = rules
            .iter()
            .position(|r| r.contains("tproxy ip to"))
            .unwrap();
        let reject4 = rules
            .iter()
            .position(|r| r.contains("@proxy_v4 goto reject_fe"))
            .unwrap();
        assert!(
            reject4 > tproxy4,
            "reject must come after tproxy: {rules:?}"
        );
        assert!(!s.contains("socket transparent"), "no fast path: {s}");
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
        // 10,000 elements in statements of at most ELEMENTS_PER_STATEMENT.
        let stmts = b.lines().filter(|l| l.starts_with("add element")).count();
        assert_eq!(stmts, 10_000 / ELEMENTS_PER_STATEMENT);
    }

    #[test]
    fn udp_frontends_share_the_sets_and_have_their_own_tproxy_rules() {
        let mut f = Frontends::new();
        f.insert(
            Frontend::udp("10.96.0.10".parse().unwrap(), 53),
            Action::Proxy,
        );
        f.insert(
            Frontend::tcp("10.96.0.10".parse().unwrap(), 53),
            Action::Proxy,
        );
        f.insert(
            Frontend::udp("10.96.0.11".parse().unwrap(), 53),
            Action::Reject,
        );
        f.insert(Frontend::udp("fd00::12".parse().unwrap(), 53), Action::Drop);
        let s = full_script(&cfg(), &f);
        assert!(s.contains(
            "meta l4proto udp ip daddr . meta l4proto . th dport @proxy_v4 tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept"
        ));
        assert!(s.contains(
            "meta l4proto udp ip6 daddr . meta l4proto . th dport @proxy_v6 tproxy ip6 to [::1]:15001 meta mark set 0x1 accept"
        ));
        assert!(s.contains(
            "add element inet lightpath proxy_v4 { 10.96.0.10 . tcp . 53, 10.96.0.10 . udp . 53 }"
        ));
        assert!(s.contains(
            "add element inet lightpath noep_v4 { 10.96.0.11 . udp . 53 : goto reject_fe }"
        ));
        assert!(s.contains("add element inet lightpath noep_v6 { fd00::12 . udp . 53 : drop }"));
        // Both tproxy rules come before the fallback reject of their family.
        let rules = rule_lines(&s);
        let last_tproxy = rules.iter().rposition(|r| r.contains("tproxy")).unwrap();
        let first_fallback = rules
            .iter()
            .position(|r| r.contains("@proxy_v4 goto reject_fe"))
            .unwrap();
        assert!(last_tproxy < first_fallback, "{rules:?}");
        // UDP gets the kernel's ICMP port unreachable, TCP a reset.
        assert!(s.contains(
            "chain reject_fe {\n\t\tmeta l4proto tcp reject with tcp reset\n\t\treject\n"
        ));
    }

    #[test]
    fn udp_diff_moves_between_set_and_map() {
        let ip = "10.96.0.10".parse().unwrap();
        let mut old = Frontends::new();
        old.insert(Frontend::udp(ip, 53), Action::Proxy);
        old.insert(Frontend::tcp(ip, 53), Action::Proxy);
        let mut new = old.clone();
        new.insert(Frontend::udp(ip, 53), Action::Reject);
        let d = diff_script(&cfg(), &old, &new).unwrap();
        assert_eq!(
            d,
            "delete element inet lightpath proxy_v4 { 10.96.0.10 . udp . 53 }\n\
             add element inet lightpath noep_v4 { 10.96.0.10 . udp . 53 : goto reject_fe }\n"
        );
    }

    #[test]
    fn no_v6_listener_means_v6_frontends_are_refused() {
        let mut c = cfg();
        c.listener_v6 = None;
        let s = full_script(&c, &Frontends::new());
        assert!(!s.contains("tproxy ip6"));
        assert!(s.contains("ip6 daddr . meta l4proto . th dport @proxy_v6 goto reject_fe"));
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
        let lines: Vec<&str> = d.lines().collect();
        assert_eq!(
            lines,
            vec![
                "delete element inet lightpath noep_v4 { 10.96.0.3 . tcp . 80 }",
                "delete element inet lightpath proxy_v4 { 10.96.0.1 . tcp . 80 }",
                "add element inet lightpath noep_v4 { 10.96.0.3 . tcp . 80 : drop }",
                "add element inet lightpath noep_v6 { fd00::4 . tcp . 80 : goto reject_fe }",
                "add element inet lightpath proxy_v4 { 10.96.0.4 . tcp . 80 }",
            ]
        );
        assert!(!d.contains("10.96.0.2"), "unchanged element touched: {d}");
    }

    #[test]
    fn proxy_to_verdict_moves_between_set_and_map() {
        let mut old = Frontends::new();
        old.insert(fe("10.96.0.1:80"), Action::Proxy);
        let mut new = Frontends::new();
        new.insert(fe("10.96.0.1:80"), Action::Reject);
        let d = diff_script(&cfg(), &old, &new).unwrap();
        assert_eq!(
            d,
            "delete element inet lightpath proxy_v4 { 10.96.0.1 . tcp . 80 }\n\
             add element inet lightpath noep_v4 { 10.96.0.1 . tcp . 80 : goto reject_fe }\n"
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
