//! One error type for the crate, so callers (the `run` command) can tell
//! a missing tool from a rejected ruleset and report the exact command.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The external tool (`nft`, `ip`) could not be started at all.
    #[error("cannot run `{program}` (is it installed and are we root?): {source}")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    /// The tool ran and refused the change.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}
