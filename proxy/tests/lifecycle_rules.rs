//! `--remove-rules-on-exit`: after SIGTERM and the drain, the nftables
//! table and the policy routing are gone from the node (the opposite
//! default, rules kept so clients fail fast, is checked in
//! `netns_verdicts`). Needs root (see `support::netns::require_root`).

mod support {
    pub mod netns;
}

use std::net::SocketAddr;
use std::time::Duration;

use support::netns::*;

#[test]
fn remove_rules_on_exit_leaves_no_rules_or_routing() {
    if !require_root("remove_rules_on_exit_leaves_no_rules_or_routing") {
        return;
    }
    let mut sb = Sandbox::new("rmrules", 1);
    sb.start_backend(1);
    let vip = "10.96.0.10".parse().expect("literal");
    let path = sb.write_manifest("svc.yaml", &web_manifest(&[vip], &[1]));
    let lp = sb.start_lightpath(&path, &["--remove-rules-on-exit"]);
    let name = sb
        .client
        .run(move || wait_http(SocketAddr::new(vip, 80), Duration::from_secs(5)));
    assert_eq!(name.expect("served"), "pod-1");
    assert!(sb.nft_table().contains("tproxy"), "{}", sb.nft_table());
    let policy = |fam: &str| {
        sb.node
            .exec("ip", &[fam, "rule", "show"])
            .expect("ip rule show")
            .lines()
            .filter(|l| l.contains("lookup 100"))
            .count()
    };
    assert_eq!(policy("-4"), 1);

    sb.lightpath(lp).signal(nix::sys::signal::Signal::SIGTERM);
    let code = sb.procs[lp].wait(Duration::from_secs(15));
    let log = sb.lightpath(lp).lines.text();
    assert_eq!(code, Some(0), "exit after SIGTERM: {log}");
    assert!(log.contains("redirect rules removed"), "{log}");
    let table = sb.node.exec("nft", &["list", "table", "inet", "lightpath"]);
    assert!(table.is_err(), "table still there: {table:?}");
    for fam in ["-4", "-6"] {
        assert_eq!(policy(fam), 0, "policy rule left ({fam})");
    }
    let routes = sb
        .node
        .exec("ip", &["route", "show", "table", "100"])
        .unwrap_or_default();
    assert!(
        routes.trim().is_empty(),
        "routes left in table 100: {routes}"
    );
}
