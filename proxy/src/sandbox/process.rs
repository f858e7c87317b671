//! A process started inside a namespace, killed on drop, whose output lines
//! are collected so a caller can wait for "ready" or "serving" (and print
//! everything it said when it never does).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Error, Netns};

/// Output lines of a child (stdout and stderr, interleaved), shared with
/// whoever waits on them.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Lines {
    fn push(&self, l: String) {
        let (m, c) = &*self.0;
        m.lock().unwrap_or_else(|e| e.into_inner()).push(l);
        c.notify_all();
    }

    /// Waits until a line containing `needle` appears after line `from`;
    /// returns the index after it.
    pub fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> Result<usize, Error> {
        let (m, c) = &*self.0;
        let deadline = Instant::now() + timeout;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(i) = g.iter().skip(from).position(|l| l.contains(needle)) {
                return Ok(from + i + 1);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::NoLine {
                    needle: needle.to_string(),
                    timeout,
                    output: g.join("\n"),
                });
            }
            g = c
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn len(&self) -> usize {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn text(&self) -> String {
        self.0
             .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }
}

/// A process started inside a namespace; killed on drop.
pub struct Proc {
    pub child: Child,
    /// stdout and stderr lines, interleaved.
    pub lines: Lines,
}

impl Proc {
    /// `ip netns exec NS program args...` with `RUST_LOG=info`, its output
    /// collected into [`Proc::lines`].
    pub fn try_spawn(ns: &Netns, program: &Path, args: &[&str]) -> Result<Proc, Error> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                program: program.display().to_string(),
                source,
            })?;
        let lines = Lines::default();
        let outputs: [Option<Box<dyn Read + Send>>; 2] = [
            child.stdout.take().map(|s| Box::new(s) as _),
            child.stderr.take().map(|s| Box::new(s) as _),
        ];
        for r in outputs.into_iter().flatten() {
            let lines = lines.clone();
            // Ends at EOF, i.e. when the child exits.
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    lines.push(l);
                }
            });
        }
        Ok(Proc { child, lines })
    }

    /// Sends a signal (SIGTERM for a graceful stop). `ip netns exec` execs
    /// the program, so the child is the program itself.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    /// Waits for exit up to `timeout`; the exit code (`None` when it is
    /// still running, or was killed by a signal).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_finds_lines_after_from_and_times_out_with_the_output() {
        let lines = Lines::default();
        lines.push("starting".into());
        lines.push("ready on 1".into());
        assert_eq!(lines.wait_for("ready", 0, Duration::ZERO).ok(), Some(2));
        let pusher = lines.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            pusher.push("ready on 2".into());
        });
        assert_eq!(
            lines.wait_for("ready", 2, Duration::from_secs(5)).ok(),
            Some(3)
        );
        let _ = t.join();
        let err = lines
            .wait_for("serving", 0, Duration::from_millis(10))
            .expect_err("never said");
        let msg = err.to_string();
        assert!(
            msg.contains("\"serving\"") && msg.contains("ready on 2"),
            "{msg}"
        );
        assert_eq!(lines.len(), 3);
    }
}
