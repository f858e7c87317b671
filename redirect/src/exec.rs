//! Running `nft` and `ip`: the only place this crate starts processes.
//!
//! Why shell out instead of netlink: `nft -f -` applies a whole script as one
//! kernel transaction (what kube-proxy's nftables mode does through
//! knftables), and the text it consumes is the same text an operator reads
//! with `nft list table`, so what we generate is reviewable and testable as
//! plain strings. `ip rule`/`ip route` are touched twice per process
//! lifetime; netlink bindings would buy nothing there.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::Error;

/// Runs `nft -f -` with `script` on stdin; the kernel applies it atomically.
pub(crate) fn nft_script(script: &str) -> Result<(), Error> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            program: "nft",
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|source| Error::Spawn {
                program: "nft",
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| Error::Spawn {
        program: "nft",
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("nft -f - ({} script lines)", script.lines().count()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs a program with arguments, returning stdout.
pub(crate) fn run(program: &'static str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn { program, source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
