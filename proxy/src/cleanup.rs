//! `lightpath cleanup`: removes everything `lightpath run` puts in the kernel.
//!
//! Why a command of its own: the default on exit is to keep the rules (fail
//! closed while a new lightpath starts). Uninstalling lightpath from a node,
//! or handing it back to kube-proxy, needs an explicit, idempotent way to
//! remove the nftables table and the policy routing without a running proxy.

use crate::defaults;
use crate::run::{redirect_config, RunError};

/// Removes the `inet lightpath` table and the fwmark rule and local route of
/// both families. Safe to run when nothing is installed.
pub fn main() -> Result<(), RunError> {
    let listen = defaults::PROXY_ADDR
        .parse()
        .map_err(|e| RunError::Runtime(std::io::Error::other(e)))?;
    let cfg = redirect_config(listen, None, false)?;
    redirect::cleanup(&cfg)?;
    println!(
        "removed nftables table inet {} and policy routing (fwmark {:#x} lookup {})",
        cfg.table, cfg.mark, cfg.route_table
    );
    Ok(())
}
