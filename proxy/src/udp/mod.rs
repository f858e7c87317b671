//! The UDP data plane: datagrams TPROXY'd to lightpath, relayed per flow.
//!
//! Why flows: UDP has no accepted socket, so the "connection" a client and a
//! service have is only the pair (client address, original destination).
//! kube-proxy relies on conntrack for that pair; lightpath keeps the same
//! thing in user space ([`FlowTable`]): the first datagram of a pair picks an
//! endpoint through the shared balancer (affinity and traffic-policy scope
//! included), later datagrams reuse it through one connected upstream socket,
//! and replies leave from the service address the client sent to. Idle flows
//! expire on conntrack's UDP timeouts; the table is capped, and flows whose
//! endpoint left the set are evicted as soon as the new snapshot is applied.

mod flows;
mod listener;
mod runner;

pub use flows::{FlowConfig, FlowKey, FlowStats, FlowTable, UdpError};
pub use listener::{evict_on_update, serve, ReplySockets};
pub use runner::{bind, UdpArgs, UdpProxy, UdpSockets};
