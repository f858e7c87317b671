//! Every listener address and default that more than one module (or the
//! deploy manifests) must agree on, named in one place with the reason for
//! its value. Per-feature settings live beside their feature but take their
//! defaults from here.

/// The transparent listener that nftables TPROXY steers service traffic to.
/// Loopback only: TPROXY delivers to it whatever the packet's destination, and
/// nothing else on the node should be able to reach it directly.
pub const PROXY_ADDR: &str = "127.0.0.1:15001";
/// The same listener for IPv6 service traffic.
pub const PROXY_ADDR_V6: &str = "[::1]:15001";

/// Admin API (`/ready`, `/healthz`, `/metrics`, `/config_dump`,
/// `/endpoints`). Envoy's port, but loopback only: it shows the whole table.
pub const ADMIN_ADDR: &str = "127.0.0.1:15000";
/// `/metrics` alone, on all addresses, for Prometheus.
pub const METRICS_ADDR: &str = "0.0.0.0:15090";
/// kube-proxy's health server (`/healthz`, `/livez`, `/readyz`): kubelet
/// probes a host-network pod on the node IP, and cloud load balancers use it.
pub const HEALTH_ADDR: &str = "0.0.0.0:10256";

/// nftables table owned by lightpath (`inet` family: one table, both IP families).
pub const NFT_TABLE: &str = "lightpath";
/// Firewall mark set on redirected packets, routed to `lo` by policy routing.
pub const TPROXY_MARK: u32 = 0x1;
/// Policy-routing table holding the `local` default route.
pub const ROUTE_TABLE: u32 = 100;
/// SO_MARK on lightpath's own upstream sockets so the rules never capture them.
/// The transparent listeners and UDP reply sockets carry it too, so replies
/// to clients leave the output chain at its first rule.
pub const UPSTREAM_MARK: u32 = 0x2;
// Policy routing matches `fwmark TPROXY_MARK/TPROXY_MARK` and the output
// chain `mark & UPSTREAM_MARK == UPSTREAM_MARK`: a shared bit would route
// every reply and upstream packet to `lo`, or exempt redirected ones.
const _: () = assert!(
    TPROXY_MARK & UPSTREAM_MARK == 0,
    "marks must not share bits"
);

/// `--proxy-name`: services labelled `service.kubernetes.io/service-proxy-name`
/// with this value are ours; others with the label are skipped.
pub const PROXY_NAME: &str = "lightpath";
