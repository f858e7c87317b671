//! One network namespace, owned: created on construction, deleted on drop
//! (which also removes its veth ends, addresses, routes and rules). Work
//! that must happen inside it runs on a thread made for that thread's
//! lifetime, so no thread of the caller ever changes namespace.

use std::future::Future;
use std::thread::JoinHandle;

use super::{command, Error};

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `ip netns add NAME` and brings its loopback up.
    pub fn try_new(name: String) -> Result<Netns, Error> {
        command("ip", &["netns", "add", &name])?;
        // Owned from here on: a failure below still deletes it.
        let ns = Netns { name };
        ns.try_ip(&["link", "set", "lo", "up"])?;
        // No duplicate address detection on the interfaces created in here
        // (they take the namespace's defaults): a tentative link-local
        // address cannot source neighbour solicitations, and those for a
        // packet from a non-local source (a kept client address) would not
        // be sent for the first seconds. Without IPv6 there is nothing to set.
        let _ = ns.exec(
            "sh",
            &["-c", "echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad"],
        );
        Ok(ns)
    }

    /// `ip -n NS args...`
    pub fn try_ip(&self, args: &[&str]) -> Result<String, Error> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        command("ip", &a)
    }

    /// Runs a command inside the namespace; its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, Error> {
        let mut a = vec!["netns", "exec", self.name.as_str(), program];
        a.extend_from_slice(args);
        command("ip", &a)
    }

    /// Runs `f` on a new thread that has joined this namespace, with its own
    /// single-threaded Tokio runtime: every socket it opens lives in here.
    /// The thread's result is `Err` when it could not enter the namespace.
    pub fn try_spawn<F, Fut, T>(&self, f: F) -> Result<JoinHandle<Result<T, Error>>, Error>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        // Opened here so a missing namespace is reported to the caller.
        let file = std::fs::File::open(&path).map_err(|e| Error::io(path.clone(), e))?;
        std::thread::Builder::new()
            .name(format!("netns {}", self.name))
            .spawn(move || {
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|source| Error::Setns { path, source })?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::io("tokio runtime", e))?;
                Ok(rt.block_on(f()))
            })
            .map_err(|e| Error::io("spawn namespace thread", e))
    }

    /// [`Netns::try_spawn`], waited for. A panic in `f` becomes an error.
    pub fn try_run<F, Fut, T>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        self.try_spawn(f)?.join().map_err(|panic| Error::Failed {
            what: format!("thread in namespace {}", self.name),
            message: panic_message(panic.as_ref()),
        })?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = command("ip", &["netns", "del", &self.name]);
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_kept() {
        let p: Box<dyn std::any::Any + Send> = Box::new("boom");
        assert_eq!(panic_message(p.as_ref()), "boom");
        let p: Box<dyn std::any::Any + Send> = Box::new(String::from("bang"));
        assert_eq!(panic_message(p.as_ref()), "bang");
        let p: Box<dyn std::any::Any + Send> = Box::new(7u8);
        assert_eq!(panic_message(p.as_ref()), "panicked");
    }
}
