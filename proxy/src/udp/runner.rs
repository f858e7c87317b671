//! The UDP half of `lightpath run`: its flags, its sockets and its tasks.
//!
//! Why here and not in `run.rs`: the node runner is shared by every part of
//! the data plane, and UDP needs three things of it only: bind the
//! transparent sockets before the rules go in (so the first redirected
//! datagram finds one), start the receive loops and the eviction task once
//! the balancers exist, and stop them on shutdown. Everything else about UDP
//! stays behind this module's three calls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control::TableRx;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

use super::{evict_on_update, serve, FlowConfig, FlowTable};
use crate::balance::Balancers;

/// UDP flow settings of `lightpath run`. The defaults are conntrack's.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct UdpArgs {
    /// Most UDP flows (client, service address) at once; when full, the
    /// oldest flow is evicted (counted in
    /// lightpath_udp_flow_evictions_total{reason="cap"}). Each flow holds
    /// one socket, so keep this below the open-file limit.
    #[arg(long, env = "LIGHTPATH_UDP_MAX_FLOWS", default_value_t = FlowConfig::default().max_flows)]
    pub udp_max_flows: usize,
    /// Idle time after which a UDP flow that never saw a reply expires
    /// (nf_conntrack_udp_timeout).
    #[arg(long, env = "LIGHTPATH_UDP_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_secs")]
    pub udp_timeout: Duration,
    /// Idle time after which a UDP flow that saw replies expires
    /// (nf_conntrack_udp_timeout_stream).
    #[arg(long, env = "LIGHTPATH_UDP_STREAM_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_secs")]
    pub udp_stream_timeout: Duration,
}

mod humantime_serde_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

impl UdpArgs {
    /// The flow-table settings; `upstream_mark` keeps the rules from
    /// capturing lightpath's own upstream datagrams (0: no mark).
    pub fn flow_config(&self, upstream_mark: u32, keep_client_source: bool) -> FlowConfig {
        FlowConfig {
            max_flows: self.udp_max_flows,
            unreplied_timeout: self.udp_timeout,
            stream_timeout: self.udp_stream_timeout,
            upstream_mark,
            keep_client_source,
        }
    }
}

/// The bound UDP sockets, waiting for [`UdpSockets::start`].
pub struct UdpSockets {
    socks: Vec<UdpSocket>,
}

/// Binds a transparent UDP socket at each of `addrs` (the TCP listeners'
/// addresses: TPROXY sends UDP frontends' datagrams there). With
/// `no_redirect` nothing is bound: without TPROXY rules no datagram would
/// ever carry a service address as its original destination.
pub fn bind(
    addrs: &[SocketAddr],
    no_redirect: bool,
) -> Result<UdpSockets, (SocketAddr, std::io::Error)> {
    let mut socks = Vec::new();
    if no_redirect {
        return Ok(UdpSockets { socks });
    }
    for &addr in addrs {
        let s = redirect::sockopt::transparent_udp(addr)
            .and_then(UdpSocket::from_std)
            .map_err(|e| (addr, e))?;
        socks.push(s);
    }
    Ok(UdpSockets { socks })
}

/// The running UDP data plane; dropping it stops the receive loops and
/// closes every flow.
pub struct UdpProxy {
    flows: Arc<FlowTable>,
    tasks: JoinSet<()>,
}

impl UdpSockets {
    pub fn is_empty(&self) -> bool {
        self.socks.is_empty()
    }

    /// Starts one receive loop per socket and the eviction task, sharing
    /// the TCP side's balancers (so affinity, topology and endpoint state
    /// are the same for both protocols).
    pub fn start(self, cfg: FlowConfig, table: TableRx, balancers: Arc<Balancers>) -> UdpProxy {
        let flows = FlowTable::new(cfg);
        let mut tasks = JoinSet::new();
        for sock in self.socks {
            let addr = sock.local_addr().ok();
            let (t, b, f) = (table.clone(), balancers.clone(), flows.clone());
            tasks.spawn(async move {
                if let Err(e) = serve(Arc::new(sock), t, b, f).await {
                    tracing::error!(?addr, error = %e, "udp listener stopped");
                }
            });
        }
        tasks.spawn(evict_on_update(table, balancers, flows.clone()));
        UdpProxy { flows, tasks }
    }
}

impl UdpProxy {
    pub fn flows(&self) -> &Arc<FlowTable> {
        &self.flows
    }

    /// Stops receiving: new datagrams then meet the rules' fallback reject
    /// (ICMP port unreachable). Flows relay replies until dropped.
    pub fn stop_receiving(&mut self) {
        self.tasks.abort_all();
    }
}
