//! `sessionAffinity: ClientIP`: which endpoint each client IP was last sent
//! to, for `timeoutSeconds` after its last new connection.
//!
//! Why "after its last connection": that is what kube-proxy does. Its
//! iptables mode records the client in the endpoint's `recent` list on every
//! new connection (`--set`) and matches within `--seconds` of the last one, so
//! a client that keeps connecting stays put indefinitely and one that goes
//! quiet is rebalanced after the timeout.
//!
//! The map is per service port and only exists for services that ask for
//! affinity, so the mutex is never on the path of ordinary services. Expired
//! entries are swept when the map has doubled since the last sweep, which
//! keeps memory proportional to the clients seen within one timeout.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Sweeps never run below this size: small maps cost nothing to keep.
const MIN_SWEEP_LEN: usize = 1024;

#[derive(Debug)]
pub(crate) struct AffinityMap {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    entries: HashMap<IpAddr, Entry>,
    sweep_at_len: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    addr: SocketAddr,
    last_used: Instant,
}

impl AffinityMap {
    pub(crate) fn new() -> Self {
        AffinityMap {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                sweep_at_len: MIN_SWEEP_LEN,
            }),
        }
    }

    /// The endpoint `client` is stuck to, if it connected within `timeout`.
    pub(crate) fn get(
        &self,
        client: IpAddr,
        timeout: Duration,
        now: Instant,
    ) -> Option<SocketAddr> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let e = inner.entries.get(&client)?;
        (now.saturating_duration_since(e.last_used) <= timeout).then_some(e.addr)
    }

    /// Records (or refreshes) `client → addr` at `now`.
    pub(crate) fn set(&self, client: IpAddr, addr: SocketAddr, timeout: Duration, now: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.entries.insert(
            client,
            Entry {
                addr,
                last_used: now,
            },
        );
        if inner.entries.len() >= inner.sweep_at_len {
            inner
                .entries
                .retain(|_, e| now.saturating_duration_since(e.last_used) <= timeout);
            inner.sweep_at_len = (inner.entries.len() * 2).max(MIN_SWEEP_LEN);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_after_last_use_and_sweeps() {
        let m = AffinityMap::new();
        let t = Duration::from_secs(10);
        let c: IpAddr = "10.0.0.1".parse().unwrap();
        let a: SocketAddr = "10.1.0.1:80".parse().unwrap();
        m.set(c, a, t, Instant::now());
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(m.get(c, t, Instant::now()), Some(a));
        m.set(c, a, t, Instant::now()); // refreshed by a new connection
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(m.get(c, t, Instant::now()), Some(a));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(m.get(c, t, Instant::now()), None);

        // Many one-off clients: the map is swept instead of growing forever.
        for i in 0..10_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(i));
            m.set(ip, a, t, Instant::now());
            tokio::time::advance(Duration::from_millis(5)).await;
        }
        // Only clients from the last ~10 s (2000 × 5 ms) can remain, plus
        // whatever arrived since the last sweep.
        assert!(m.len() <= 2 * 2_000 + MIN_SWEEP_LEN, "{}", m.len());
    }
}
