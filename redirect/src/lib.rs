//! Everything lightpath does to the kernel, fenced into one crate.
//!
//! Why a crate of its own: the data plane needs three kernel facilities
//! (transparent sockets, nftables TPROXY rules and policy routing), each with
//! sharp edges measured on real kernels (see `shared/notes/tproxy-on-this-kernel.md`).
//! Keeping them here means the rest of lightpath never touches a raw socket
//! option or shells out to `nft`, and the rule generation stays a set of pure,
//! unit-tested functions.
//!
//! * [`sockopt`]: IP_TRANSPARENT listeners, original destination, SO_MARK.
//! * [`nft`]: the `inet` table as text for `nft -f -` (pure functions).
//! * [`routing`]: the `fwmark` rule and the `local` default route.
//! * [`Redirector`]: applies a desired frontend set as one atomic transaction,
//!   diffing against what it installed before.

#![deny(unsafe_code)]

mod error;
mod exec;
pub mod nft;
mod redirector;
pub mod routing;
pub mod sockopt;

pub use error::Error;
pub use nft::{Action, Config, Frontend, L4Proto, Rule};
pub use redirector::{cleanup, Redirector, UpdateStats};
