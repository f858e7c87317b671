//! A throwaway Kubernetes "node" built from network namespaces: a client and
//! backend "pods" wired to a node namespace by veth pairs, with the real
//! `lightpath` binary running inside.
//!
//! Why it is a library module: `lightpath demo` and the end-to-end tests need
//! the same sandbox, and two copies drift (addresses, cleanup order, how a
//! process is waited for). TPROXY, nftables and policy routing only mean
//! something on real packets crossing real interfaces, and nothing may touch
//! the machine's own namespace, so every client runs inside a namespace of
//! the sandbox. Names carry a per-process, per-sandbox suffix (sandboxes run
//! in parallel) and everything is removed on `Drop`, also on failure.
//!
//! Every operation that can fail returns [`Error`], naming the command or
//! path; the demo reports it, the tests' support module turns it into a
//! panic with the same message.
//!
//! Topology (IPv4 / IPv6):
//! ```text
//!  client 10.0.1.2 fd00:1::2 ──c0── node 10.0.1.1 fd00:1::1
//!  pod i  10.244.i.2 fd00:244:i::2 ──p<i>── node 10.244.i.1 fd00:244:i::1
//! ```
//! The client's default route points at the node; the node's default route
//! points at the client (a node always has an uplink, and locally originated
//! service traffic needs a route to exist before the `output` mark applies).

mod client;
mod netns;
mod node;
mod process;

use std::process::{Command, Stdio};
use std::time::Duration;

pub use client::{http_get, http_name};
pub use netns::Netns;
pub use node::{pod_v4, pod_v6, Sandbox, CLIENT_V4, MAX_PODS, NODE_NAME};
pub use process::{Lines, Proc};

/// What went wrong while building or driving a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {program}: {source} (install iproute2 and nftables)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("setns {path}: {source}")]
    Setns { path: String, source: nix::Error },
    #[error("no line containing {needle:?} within {timeout:?}; output:\n{output}")]
    NoLine {
        needle: String,
        timeout: Duration,
        output: String,
    },
    #[error("{what}: {message}")]
    Failed { what: String, message: String },
}

impl Error {
    fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Runs a command to completion; its stdout, or an error with its stderr.
pub fn command(program: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: program.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Whether this process runs as root (the effective uid).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The switch that skips the tests needing root.
pub const SKIP_ROOT_TESTS: &str = "LIGHTPATH_SKIP_ROOT_TESTS";

/// Whether to run a test that needs root for `why`. Not root: fail with the
/// skip switch named; switch set: print a note and skip. Never a silent pass.
pub fn require_root(test: &str, why: &str) -> bool {
    if std::env::var(SKIP_ROOT_TESTS).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: {SKIP_ROOT_TESTS}=1");
        return false;
    }
    assert!(
        is_root(),
        "{test} needs root ({why}). Run as root, or set {SKIP_ROOT_TESTS}=1 to skip it."
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_errors_name_the_command() {
        assert_eq!(command("echo", &["hi"]).expect("echo"), "hi\n");
        let failed = command("sh", &["-c", "echo nope >&2; exit 3"]).expect_err("exit 3");
        let msg = failed.to_string();
        assert!(msg.contains("`sh -c") && msg.contains("nope"), "{msg}");
        let missing = command("/nonexistent/lp-tool", &[]).expect_err("no such program");
        assert!(
            missing
                .to_string()
                .contains("cannot run /nonexistent/lp-tool"),
            "{missing}"
        );
    }

    #[test]
    fn too_many_pods_is_refused_before_anything_is_created() {
        let err = Sandbox::try_new("big", MAX_PODS + 1, "lightpath".into())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("at most 250"), "{err}");
    }
}
