//! `lightpath run --no-redirect`: someone else steers traffic with a NAT
//! REDIRECT rule, and lightpath finds the original destination through
//! conntrack (SO_ORIGINAL_DST) and leaves the kernel's rules alone. Needs
//! root (see `support::netns::require_root`).

mod support {
    pub mod netns;
}

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::netns::*;

#[test]
fn redirect_setups_use_the_conntrack_original_destination() {
    if !require_root("redirect_setups_use_the_conntrack_original_destination") {
        return;
    }
    let mut sb = Sandbox::new("noredir", 2);
    sb.start_backend(1);
    sb.start_backend(2);
    let vip: IpAddr = "10.96.0.10".parse().expect("literal");
    let path = sb.write_manifest("svc.yaml", &web_manifest(&[vip], &[1, 2]));
    // Node-local clients' connections to the service are NATed to the listener.
    let rules = "table ip lp_test_nat {\n\
                 \tchain out { type nat hook output priority -100; policy accept;\n\
                 \t\tip daddr 10.96.0.10 tcp dport 80 redirect to :15001\n\t}\n}\n";
    let rules_path = sb.write_manifest("nat.nft", rules);
    sb.node
        .exec("nft", &["-f", &rules_path.to_string_lossy()])
        .expect("nat rules");
    sb.start_lightpath(&path, &["--no-redirect"]);
    assert!(
        sb.node
            .exec("nft", &["list", "table", "inet", "lightpath"])
            .is_err(),
        "--no-redirect must not install the lightpath table"
    );
    let names = sb.node.run(move || async move {
        let mut v = std::collections::BTreeSet::new();
        for _ in 0..20 {
            v.insert(
                wait_http(SocketAddr::new(vip, 80), Duration::from_secs(5))
                    .await
                    .expect("served"),
            );
        }
        v
    });
    assert_eq!(names.len(), 2, "both endpoints through REDIRECT: {names:?}");
}
