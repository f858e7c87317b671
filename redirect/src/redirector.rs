//! Keeps the kernel's view of frontends equal to the desired one.
//!
//! Why a stateful wrapper around the pure generators: every table change
//! should touch only the elements that changed (so a busy cluster's updates
//! stay small and never disturb unchanged frontends), which needs memory of
//! what was installed. If an incremental transaction is refused (someone
//! edited our table by hand, an element vanished), the kernel applied
//! nothing, so we fall back to replacing the whole table in one
//! transaction: the kernel converges either way.

use std::time::{Duration, Instant};

use crate::exec::nft_script;
use crate::nft::{delete_script, full_script, patch, patch_script, Changes, Config, Frontends};
use crate::routing::{self, IpFamily};
use crate::Error;

/// What one [`Redirector::apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateStats {
    /// Frontends added, removed or whose action changed (each is an element
    /// of both of its family's maps).
    pub changed: usize,
    /// The incremental transaction was refused and the table was reloaded.
    pub full_reload: bool,
    pub elapsed: Duration,
}

/// Owner of lightpath's nftables table and policy routing.
#[derive(Debug)]
pub struct Redirector {
    cfg: Config,
    installed: Frontends,
}

fn families(cfg: &Config) -> Vec<IpFamily> {
    let mut f = vec![IpFamily::V4];
    if cfg.listener_v6.is_some() {
        f.push(IpFamily::V6);
    }
    f
}

impl Redirector {
    /// Reconciles from scratch: installs policy routing and replaces any
    /// table a previous run left with one holding exactly `frontends`.
    pub fn install(cfg: Config, frontends: Frontends) -> Result<Self, Error> {
        for fam in families(&cfg) {
            routing::setup(fam, cfg.mark, cfg.route_table)?;
        }
        nft_script(&full_script(&cfg, &frontends))?;
        Ok(Redirector {
            cfg,
            installed: frontends,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// What the kernel currently holds (as last applied).
    pub fn installed(&self) -> &Frontends {
        &self.installed
    }

    /// Moves the kernel to what is installed with `changes` applied, in
    /// one transaction that touches only the listed frontends whose rule
    /// changes (O(changes)). If the kernel refuses it, the whole table is
    /// reloaded to that state in one transaction. What is installed changes
    /// only on success.
    pub fn apply(&mut self, changes: Changes) -> Result<UpdateStats, Error> {
        let start = Instant::now();
        let Some(diff) = patch_script(&self.cfg, &self.installed, &changes) else {
            return Ok(UpdateStats {
                elapsed: start.elapsed(),
                ..Default::default()
            });
        };
        let full_reload = match nft_script(&diff.script) {
            Ok(()) => {
                patch(&mut self.installed, changes);
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "incremental nftables update refused; reloading the whole table");
                let mut desired = self.installed.clone();
                patch(&mut desired, changes);
                nft_script(&full_script(&self.cfg, &desired))?;
                self.installed = desired;
                true
            }
        };
        Ok(UpdateStats {
            changed: diff.frontends,
            full_reload,
            elapsed: start.elapsed(),
        })
    }

    /// Removes the table and policy routing (connections to service
    /// addresses then go wherever the node's routes send them).
    pub fn remove(self) -> Result<(), Error> {
        cleanup(&self.cfg)
    }
}

/// Removes everything lightpath may have installed for `cfg`, whether or
/// not a process is running: the `inet` table and the policy routing of both
/// families. Idempotent.
pub fn cleanup(cfg: &Config) -> Result<(), Error> {
    nft_script(&delete_script(cfg))?;
    routing::teardown(IpFamily::V4, cfg.mark, cfg.route_table)?;
    // IPv6 may be disabled on the node; then there is nothing to remove.
    if let Err(e) = routing::teardown(IpFamily::V6, cfg.mark, cfg.route_table) {
        tracing::debug!(error = %e, "IPv6 policy routing teardown skipped");
    }
    Ok(())
}
