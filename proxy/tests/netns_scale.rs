//! The rule count does not grow with the number of services: 10,000
//! frontends load as map elements under the same rules as 10, and an
//! incremental change touches only the changed frontends' elements. Load times are printed (see
//! README "Running on a node"). Needs root (see `support::netns::require_root`).

mod support {
    pub mod netns;
}

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use lightpath::defaults;
use redirect::nft::Frontends;
use redirect::{Action, Frontend, Redirector, Rule};
use support::netns::*;

/// The redirect configuration `lightpath run` uses by default.
fn config() -> redirect::Config {
    redirect::Config {
        table: defaults::NFT_TABLE.into(),
        listener_v4: defaults::PROXY_ADDR.parse().expect("default"),
        listener_v6: Some(defaults::PROXY_ADDR_V6.parse().expect("default")),
        mark: defaults::TPROXY_MARK,
        upstream_mark: defaults::UPSTREAM_MARK,
        route_table: defaults::ROUTE_TABLE,
        keep_client_source: true,
    }
}

fn ranges(nets: &[&str]) -> std::sync::Arc<[ipnet::IpNet]> {
    nets.iter().map(|n| n.parse().expect("literal")).collect()
}

/// `n` frontends: a tenth of them IPv6, a tenth with no endpoints, and a
/// tenth restricted to two source ranges.
fn frontends(n: u32) -> Frontends {
    (0..n)
        .map(|i| {
            let ip: IpAddr = if i % 10 == 0 {
                Ipv6Addr::from(0xfd00_0096_0000_0000_0000_0000_0000_0000u128 + i as u128).into()
            } else {
                Ipv4Addr::from(0x0a60_0000 + i).into()
            };
            let action = if i % 10 == 5 {
                Action::Reject
            } else {
                Action::Proxy
            };
            let rule = if i % 10 == 3 {
                // A LoadBalancer IP with two source ranges.
                Rule::only(action, ranges(&["203.0.113.0/24", "198.51.100.0/24"]))
            } else {
                action.into()
            };
            (Frontend::tcp(ip, 80 + (i % 3) as u16), rule)
        })
        .collect()
}

/// The objects of the lightpath table, from `nft -j`.
fn nft_objects(ns: &Netns) -> Vec<serde_json::Value> {
    let json = ns
        .exec("nft", &["-j", "list", "table", "inet", "lightpath"])
        .expect("nft -j");
    let mut v: serde_json::Value = serde_json::from_str(&json).expect("nft json");
    match v["nftables"].take() {
        serde_json::Value::Array(objects) => objects,
        other => panic!("nftables array expected: {other}"),
    }
}

/// Rules in the table (every "rule" object).
fn rule_count(ns: &Netns) -> usize {
    nft_objects(ns)
        .iter()
        .filter(|o| o.get("rule").is_some())
        .count()
}

/// Elements of every set and map in the table.
fn element_count(ns: &Netns) -> usize {
    nft_objects(ns)
        .iter()
        .filter_map(|o| o.get("set").or_else(|| o.get("map")))
        .map(|s| {
            s.get("elem")
                .and_then(|e| e.as_array())
                .map_or(0, |a| a.len())
        })
        .sum()
}

#[test]
fn rule_count_is_independent_of_the_number_of_services() {
    if !require_root("rule_count_is_independent_of_the_number_of_services") {
        return;
    }
    let small_ns = Netns::new(format!("lp-scale-{}-s", std::process::id()));
    let big_ns = Netns::new(format!("lp-scale-{}-b", std::process::id()));

    let small = small_ns
        .run(|| async { Redirector::install(config(), frontends(10)).expect("install 10") });
    let (load, update, stats) = big_ns.run(|| async {
        let start = Instant::now();
        let mut r = Redirector::install(config(), frontends(10_000)).expect("install 10,000");
        let load = start.elapsed();
        // One service gains endpoints, one loses them, one is added.
        let next: redirect::nft::Changes = vec![
            (
                Frontend::tcp("10.96.0.5".parse().expect("literal"), 82),
                Some(Action::Proxy.into()),
            ),
            (
                Frontend::tcp("10.96.0.1".parse().expect("literal"), 81),
                Some(Action::Reject.into()),
            ),
            (
                Frontend::tcp("10.97.0.1".parse().expect("literal"), 443),
                Some(Action::Proxy.into()),
            ),
            // And one restricted frontend's ranges change.
            (
                Frontend::tcp("10.96.0.3".parse().expect("literal"), 80),
                Some(Rule::only(Action::Proxy, ranges(&["192.0.2.0/24"]))),
            ),
        ];
        let start = Instant::now();
        let stats = r.apply(next).expect("apply");
        (load, start.elapsed(), stats)
    });
    drop(small);

    let (rs, rb) = (rule_count(&small_ns), rule_count(&big_ns));
    assert_eq!(
        rs, rb,
        "rule count must not depend on the number of frontends"
    );
    assert!(rs <= 40, "a constant handful of rules, got {rs}");
    // Every frontend is one element of its family's prerouting map and one
    // of its output map; a restricted one also has one element per range in
    // its family's allow set.
    assert_eq!(element_count(&small_ns), 2 * 10 + 2);
    assert_eq!(element_count(&big_ns), 2 * 10_001 + 2 * 1_000 - 1);
    assert!(!stats.full_reload, "incremental update refused");
    assert_eq!(
        stats.changed, 4,
        "2 changed their action + 1 added + 1 changed its ranges: {stats:?}"
    );
    eprintln!("10,000 frontends: {rb} rules (10 frontends: {rs}); full load {load:?}; incremental update of 4 frontends {update:?}");
    assert!(
        load < Duration::from_secs(10),
        "loading 10,000 frontends took {load:?}"
    );
}

/// `Redirector::apply` (the per-table-version path, O(changes)): a change
/// touches only its elements, and when the kernel refuses the incremental
/// transaction (an element it deletes was removed behind lightpath's back),
/// the whole table is reloaded to the wanted state in one transaction.
#[test]
fn applied_changes_fall_back_to_a_full_reload_when_refused() {
    if !require_root("applied_changes_fall_back_to_a_full_reload_when_refused") {
        return;
    }
    let ns = Netns::new(format!("lp-scale-{}-p", std::process::id()));
    let name = ns.name.clone();
    let (after, refused, elements) = ns.run(move || async move {
        let fe = |s: &str, port: u16| Frontend::tcp(s.parse().expect("literal"), port);
        let mut r = Redirector::install(config(), frontends(100)).expect("install 100");
        // One frontend rejects, one is added, one goes.
        let changes = vec![
            (fe("10.96.0.1", 81), Some(Action::Reject.into())),
            (fe("10.97.0.1", 443), Some(Action::Proxy.into())),
            (fe("10.96.0.2", 82), None),
        ];
        let after = r.apply(changes).expect("apply");
        // Someone deletes an element; the next change deletes it too.
        let gone = "10.96.0.4 . tcp . 81";
        for map in ["fe_v4", "local_v4"] {
            let script = format!("delete element inet lightpath {map} {{ {gone} }}");
            must("ip", &["netns", "exec", &name, "nft", &script]);
        }
        let refused = r
            .apply(vec![
                (fe("10.96.0.4", 81), None),
                (fe("10.97.0.2", 443), Some(Action::Proxy.into())),
            ])
            .expect("apply with full reload");
        let installed = r.installed().clone();
        (after, refused, installed)
    });
    assert_eq!(after.changed, 3, "{after:?}");
    assert!(!after.full_reload, "{after:?}");
    assert!(
        refused.full_reload,
        "the refused transaction reloads: {refused:?}"
    );
    // 100 - 1 gone + 1 added - 1 deleted + 1 added, each in both maps of its
    // family, and the ten restricted frontends' two ranges each.
    assert_eq!(elements.len(), 100);
    assert_eq!(element_count(&ns), 2 * 100 + 2 * 10);
    let table = ns
        .exec("nft", &["list", "table", "inet", "lightpath"])
        .expect("nft list");
    assert!(table.contains("10.97.0.2 . tcp . 443"), "{table}");
    assert!(!table.contains("10.96.0.4 . tcp . 81 "), "{table}");
}
