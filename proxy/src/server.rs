//! The accept loop: redirected connections in, one task per connection,
//! dispatched by the frontend's mode.
//!
//! Why it looks the way it does:
//! * The accepted socket's original destination (its local address under
//!   TPROXY) is the frontend key; the lookup reads the table snapshot that is
//!   current at accept time, one `Arc` clone per connection, no lock held.
//! * A frontend that is unknown or has no endpoints is reset at once
//!   (SO_LINGER 0): the kernel rules normally reject those, so reaching us
//!   means the table just changed, and a fast failure beats a hang.
//! * Bounded: a semaphore caps concurrent connections; over the cap a new
//!   connection is reset immediately rather than left in the backlog, so a
//!   flood fails fast and cannot wedge the listener. Accept errors such as
//!   EMFILE back off exponentially instead of spinning.
//! * Drain: on the drain signal every accept loop stops and drops its
//!   listener; connection tasks hold a [`drain::Watch`] until they finish.
//! * Few syscalls per connection, because a new connection per request is
//!   the case where a proxy loses to kernel DNAT: TCP_NODELAY and keepalive
//!   are set once on the listener and inherited by every accepted socket,
//!   the client address comes from `accept`, and under TPROXY (local address
//!   ≠ the listener's) the local address is the original destination without
//!   asking conntrack.
//! * Threads: with several data threads, a thread that accepts while it
//!   serves clearly more connections than another hands the socket over
//!   ([`crate::spread`]), so a few long-lived connections do not share one
//!   core while another idles.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use control::{FrontendKey, Mode, Protocol, Table, TableRx};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::balance::{BalanceConfig, Balancers, Scope};
use crate::drain;
use crate::l4::{self, RelayConfig};
use crate::spread::{Open, Spread};

/// Settings of the data plane server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Concurrent connections across all listeners. 100 000: two descriptors
    /// each stays under the usual 1 M hard RLIMIT_NOFILE with room to spare,
    /// and an idle relayed connection costs a task and no buffers.
    pub max_connections: usize,
    pub relay: RelayConfig,
    pub balance: BalanceConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 100_000,
            relay: RelayConfig::default(),
            balance: BalanceConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listener {addr}: {source}")]
    Listener {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// The shared state of all accept loops: the table, the balancers and the
/// connection limit.
#[derive(Debug, Clone)]
pub struct Server {
    table: TableRx,
    balancers: Arc<Balancers>,
    cfg: Arc<ServerConfig>,
    slots: Arc<Semaphore>,
    /// Per-service L7 state (settings, budgets, pools) for HTTP frontends.
    l7: Arc<crate::l7::L7>,
    /// Listeners not closed yet (see [`Server::listeners_open`]).
    listeners_open: Arc<AtomicUsize>,
    /// Connection counts of the data threads and a channel into each, set
    /// by [`Server::run_threaded`] with more than one thread.
    spread: Arc<OnceLock<Arc<Spread<Handed>>>>,
}

/// A connection that one data thread accepted and hands to another.
#[derive(Debug)]
struct Handed {
    /// Deregistered from the accepting thread's reactor.
    sock: std::net::TcpStream,
    peer: SocketAddr,
    listening: Listening,
    slot: OwnedSemaphorePermit,
    open: Open,
}

/// What an accept loop of a data thread needs to hand connections over.
#[derive(Debug, Clone)]
struct Lane {
    spread: Arc<Spread<Handed>>,
    me: usize,
}

/// Serves redirected TCP connections from `listeners` (typically the v4 and
/// v6 transparent listeners) with the frontends of `table`, until `drain`
/// is signalled.
///
/// Returns once every accept loop has stopped (at the drain signal);
/// connections still open keep running with their own [`drain::Watch`]
/// clones, so the caller completes the shutdown with
/// [`drain::Signal::drain`], which waits for them up to its deadline.
pub async fn serve(
    listeners: Vec<TcpListener>,
    table: TableRx,
    cfg: ServerConfig,
    drain: drain::Watch,
) -> Result<(), ServeError> {
    let server = Server::new(table, cfg);
    server.run(listeners, drain).await
}

impl Server {
    pub fn new(table: TableRx, cfg: ServerConfig) -> Self {
        let balancers = Arc::new(Balancers::new(cfg.balance.clone()));
        balancers.sync(&table.borrow());
        Server {
            table,
            balancers,
            slots: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
            l7: Arc::new(crate::l7::L7::new(&cfg.relay.connect)),
            cfg: Arc::new(cfg),
            listeners_open: Arc::new(AtomicUsize::new(0)),
            spread: Arc::new(OnceLock::new()),
        }
    }

    /// Open connections per data thread (empty unless
    /// [`Server::run_threaded`] runs more than one).
    pub fn thread_connections(&self) -> Vec<usize> {
        self.spread.get().map(|s| s.counts()).unwrap_or_default()
    }

    /// How many of the listeners given to [`Server::run`] or
    /// [`Server::run_threaded`] are still open. At the drain signal each
    /// accept loop closes its listener on its own thread, a moment later;
    /// the caller waits for zero before it reports "draining", so a client
    /// that saw `/ready` turn is never accepted afterwards.
    pub fn listeners_open(&self) -> Arc<AtomicUsize> {
        self.listeners_open.clone()
    }

    /// The balancers, shared with whatever else needs endpoint state.
    pub fn balancers(&self) -> &Arc<Balancers> {
        &self.balancers
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        self.cfg.max_connections.max(1) - self.slots.available_permits()
    }

    /// Runs one accept loop per listener plus the table sync task until
    /// `drain` is signalled.
    pub async fn run(
        &self,
        listeners: Vec<TcpListener>,
        drain: drain::Watch,
    ) -> Result<(), ServeError> {
        let mut addrs = Vec::with_capacity(listeners.len());
        for l in &listeners {
            let addr = l.local_addr().map_err(|source| ServeError::Listener {
                addr: "?".into(),
                source,
            })?;
            addrs.push(addr);
        }
        tracing::info!(listeners = ?addrs, "serving");
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(sync_table(
            self.table.clone(),
            self.balancers.clone(),
            self.l7.clone(),
            drain.clone(),
        ));
        self.listeners_open
            .fetch_add(listeners.len(), Ordering::SeqCst);
        for l in listeners {
            loops.spawn(self.clone().accept_loop(l, drain.clone(), None));
        }
        drop(drain);
        while let Some(r) = loops.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "accept loop task failed");
            }
        }
        tracing::info!(listeners = ?addrs, "stopped accepting");
        Ok(())
    }

    /// Like [`Server::run`], but the accept loops and their connections run
    /// on dedicated threads, one per listener set in `sets`, each thread a
    /// current-thread runtime with its own SO_REUSEPORT listeners (the
    /// kernel spreads new connections over them). Why: on a few shared cores
    /// a work-stealing runtime spends its time on cross-thread wakeups and
    /// futex sleeps per small message; one event loop per core that owns its
    /// connections end to end does not (haproxy's and Envoy's model). The
    /// table and balancer sync tasks stay on the calling runtime. A thread
    /// that accepts while it serves clearly more connections than another
    /// hands the connection over ([`crate::spread`]).
    ///
    /// Returns once every thread has stopped accepting (at the drain signal)
    /// and its connections have ended, or, after the drain was forced, after
    /// a short grace for their aborts.
    pub async fn run_threaded(
        &self,
        sets: Vec<Vec<std::net::TcpListener>>,
        drain: drain::Watch,
    ) -> Result<(), ServeError> {
        let mut sync = tokio::task::JoinSet::new();
        sync.spawn(sync_table(
            self.table.clone(),
            self.balancers.clone(),
            self.l7.clone(),
            drain.clone(),
        ));
        let addrs: Vec<SocketAddr> = sets
            .iter()
            .flatten()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        tracing::info!(listeners = ?addrs, threads = sets.len(), "serving");
        self.listeners_open
            .fetch_add(sets.iter().map(Vec::len).sum(), Ordering::SeqCst);
        let mut stopped = Vec::with_capacity(sets.len());
        let mut done = Vec::with_capacity(sets.len());
        let mut inboxes = Vec::new();
        let mut spread = None;
        if sets.len() > 1 {
            let (s, rx) = Spread::new(sets.len());
            // Only the first run sets it; a second concurrent run (not done
            // by `lightpath run`) would simply not spread its connections.
            if self.spread.set(s.clone()).is_ok() {
                spread = Some(s);
                inboxes = rx;
            }
        }
        let mut inboxes = inboxes.into_iter();
        for (i, set) in sets.into_iter().enumerate() {
            let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let this = self.clone();
            let drain = drain.clone();
            let lane = spread.clone().map(|spread| Lane { spread, me: i });
            let inbox = inboxes.next();
            let spawned = std::thread::Builder::new()
                .name(format!("lightpath-data-{i}"))
                .spawn(move || {
                    this.data_thread(set, lane.zip(inbox), drain, stopped_tx);
                    let _ = tx.send(());
                });
            match spawned {
                Ok(_) => {
                    stopped.push(stopped_rx);
                    done.push(rx);
                }
                Err(source) => {
                    return Err(ServeError::Listener {
                        addr: format!("data thread {i}"),
                        source,
                    })
                }
            }
        }
        drop(drain);
        for rx in stopped {
            let _ = rx.await;
        }
        tracing::info!(listeners = ?addrs, "stopped accepting");
        for rx in done {
            // An Err means the thread died; the others still finish.
            let _ = rx.await;
        }
        while let Some(r) = sync.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "sync task failed");
            }
        }
        Ok(())
    }

    /// One data thread: its listeners' accept loops (and, with `lane`, the
    /// loop taking connections other threads hand over) on a current-thread
    /// runtime, then its connections until they end.
    fn data_thread(
        self,
        set: Vec<std::net::TcpListener>,
        lane: Option<(Lane, tokio::sync::mpsc::UnboundedReceiver<Handed>)>,
        drain: drain::Watch,
        stopped: tokio::sync::oneshot::Sender<()>,
    ) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "data thread runtime");
                return;
            }
        };
        rt.block_on(async move {
            let mut loops = tokio::task::JoinSet::new();
            let (lane, inbox) = lane.unzip();
            if let Some(inbox) = inbox {
                loops.spawn(self.clone().take_handed(inbox, drain.clone()));
            }
            for l in set {
                let addr = l.local_addr().ok();
                match TcpListener::from_std(l) {
                    Ok(l) => {
                        loops.spawn(self.clone().accept_loop(l, drain.clone(), lane.clone()));
                    }
                    Err(e) => {
                        self.listeners_open.fetch_sub(1, Ordering::SeqCst);
                        tracing::error!(?addr, error = %e, "listener on data thread");
                    }
                }
            }
            while loops.join_next().await.is_some() {}
            let _ = stopped.send(());
            // Connections run as tasks of this runtime: keep it alive until
            // every connection (of any thread) is gone, or shortly after the
            // drain is forced, when they are being aborted anyway.
            let forced = drain.forced();
            tokio::pin!(forced);
            let mut grace: Option<tokio::time::Instant> = None;
            // Bounded: at most the drain deadline plus the grace.
            while self.open_connections() > 0 {
                if grace.is_some_and(|g| tokio::time::Instant::now() >= g) {
                    break;
                }
                tokio::select! {
                    _ = &mut forced, if grace.is_none() => {
                        grace = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        });
    }

    /// Serves the connections other data threads hand to this one, until
    /// the drain; those already sent by then are still served, and later
    /// sends fail, so their thread serves them itself.
    async fn take_handed(
        self,
        mut inbox: tokio::sync::mpsc::UnboundedReceiver<Handed>,
        drain: drain::Watch,
    ) {
        loop {
            let handed = tokio::select! {
                biased;
                _ = drain.signaled() => break,
                h = inbox.recv() => h,
            };
            match handed {
                Some(h) => self.adopt(h, &drain),
                None => return,
            }
        }
        inbox.close();
        while let Ok(h) = inbox.try_recv() {
            self.adopt(h, &drain);
        }
    }

    /// Registers a handed-over connection (or one whose hand-over failed)
    /// with this thread and serves it.
    fn adopt(&self, h: Handed, drain: &drain::Watch) {
        match TcpStream::from_std(h.sock) {
            Ok(sock) => {
                self.spawn_connection(sock, h.peer, h.listening, h.slot, Some(h.open), drain)
            }
            // The socket is closed as it drops; the client sees a reset or EOF.
            Err(e) => {
                tracing::warn!(peer = %h.peer, error = %e, "handed-over connection not registered")
            }
        }
    }

    /// Serves an accepted connection on this thread, or hands it to a
    /// less-loaded one (see [`crate::spread`]).
    fn dispatch(
        &self,
        sock: TcpStream,
        peer: SocketAddr,
        listening: Listening,
        slot: OwnedSemaphorePermit,
        lane: Option<&Lane>,
        drain: &drain::Watch,
    ) {
        let Some(lane) = lane else {
            return self.spawn_connection(sock, peer, listening, slot, None, drain);
        };
        let open = lane.spread.place(lane.me);
        if open.lane() == lane.me {
            return self.spawn_connection(sock, peer, listening, slot, Some(open), drain);
        }
        let to = open.lane();
        let sock = match sock.into_std() {
            Ok(s) => s,
            Err(e) => {
                // Deregistering failed and closed the socket.
                tracing::warn!(%peer, error = %e, "connection not handed over");
                return;
            }
        };
        let handed = Handed {
            sock,
            peer,
            listening,
            slot,
            open,
        };
        if let Err(mut h) = lane.spread.send(to, handed) {
            // That thread stopped taking connections: serve it here.
            h.open = lane.spread.open_on(lane.me);
            self.adopt(h, drain);
        }
    }

    /// One task for one connection on this thread's runtime.
    fn spawn_connection(
        &self,
        sock: TcpStream,
        peer: SocketAddr,
        listening: Listening,
        slot: OwnedSemaphorePermit,
        open: Option<Open>,
        drain: &drain::Watch,
    ) {
        // The snapshot current at accept time, for this connection.
        let table = self.table.borrow().clone();
        let this = self.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            this.handle(sock, peer, listening, &table, &drain).await;
            drop(slot);
            drop(open);
            drop(drain);
        });
    }

    async fn accept_loop(self, listener: TcpListener, drain: drain::Watch, lane: Option<Lane>) {
        let mut backoff = Backoff::new();
        let listening = Listening {
            addr: listener.local_addr().ok(),
            tuned: match l4::tune_listener(&listener) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "listener options not set, setting them per connection");
                    false
                }
            },
        };
        // Over-limit warnings: at most one per second, with a count, so a
        // flood cannot turn into a log flood.
        let mut over_limit: (Option<tokio::time::Instant>, u64) = (None, 0);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = drain.signaled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((sock, peer)) => {
                    backoff.reset();
                    let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                        over_limit.1 += 1;
                        let now = tokio::time::Instant::now();
                        if over_limit
                            .0
                            .is_none_or(|t| now >= t + Duration::from_secs(1))
                        {
                            tracing::warn!(%peer, limit = self.cfg.max_connections, reset = over_limit.1, "connection limit reached, resetting new connections");
                            over_limit = (Some(now), 0);
                        }
                        l4::abort(&sock);
                        continue;
                    };
                    self.dispatch(sock, peer, listening, slot, lane.as_ref(), &drain);
                }
                Err(e) if is_connection_error(&e) => {
                    // The client gave up between SYN and accept: not our problem.
                    tracing::debug!(error = %e, "accept: connection error");
                }
                Err(e) => {
                    let wait = backoff.next();
                    tracing::warn!(error = %e, ?wait, "accept failed, backing off");
                    tokio::select! {
                        _ = drain.signaled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        drop(listener);
        self.listeners_open.fetch_sub(1, Ordering::SeqCst);
    }

    /// One connection: find its frontend, then hand it to the mode's handler.
    async fn handle(
        &self,
        sock: TcpStream,
        peer: SocketAddr,
        listening: Listening,
        table: &Table,
        drain: &drain::Watch,
    ) {
        let dst = match listening.original_dst(&sock) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "no original destination");
                l4::abort(&sock);
                return;
            }
        };
        let key = FrontendKey::new(dst, Protocol::Tcp);
        let Some(frontend) = table.lookup(&key) else {
            tracing::debug!(%peer, frontend = %key, "no such frontend, resetting");
            l4::abort(&sock);
            return;
        };
        let scope = Scope::for_client(frontend, peer.ip());
        if scope.endpoints(&frontend.service).is_empty() {
            // Counted as opened and failed, like a connection whose endpoints
            // all refused.
            self.balancers
                .for_service(&frontend.service)
                .metrics()
                .tcp_open()
                .failed();
            tracing::debug!(%peer, frontend = %key, service = %frontend.service.name, "no endpoints, resetting");
            l4::abort(&sock);
            return;
        }
        if !listening.tuned {
            l4::set_keepalive(&sock);
            let _ = sock.set_nodelay(true);
        }
        let balancer = self
            .balancers
            .for_service_at(&frontend.service, table.version);
        // Opened and active until this function returns.
        let conn = balancer.metrics().tcp_open();
        let access_started = crate::telemetry::access_log_enabled().then(std::time::Instant::now);
        let keep = self.cfg.relay.connect.keep_client_source;
        let source = l4::Source::for_frontend(frontend, peer.ip(), keep);
        // The dispatch point: HTTP frontends are proxied per request.
        let result = match frontend.service.mode {
            Mode::L4 => {
                let meters = Some(conn.meters());
                let client = l4::Client {
                    ip: peer.ip(),
                    source,
                };
                l4::relay(
                    sock,
                    client,
                    balancer,
                    scope,
                    &self.cfg.relay,
                    drain,
                    meters,
                )
                .await
            }
            Mode::Http | Mode::H2c => {
                self.l7
                    .serve_connection(sock, peer, frontend, balancer, (scope, source), drain)
                    .await;
                return;
            }
        };
        // Relayed bytes were counted as they flowed (`l4::Meters`).
        if result.is_err() {
            conn.failed();
        }
        if let Some(started) = access_started {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let service = &frontend.service.name;
            match &result {
                Ok(r) => tracing::info!(
                    target: crate::telemetry::ACCESS_LOG, %peer, frontend = %key, %service,
                    endpoint = %r.endpoint, attempts = r.attempts,
                    sent = r.transferred.client_to_upstream, received = r.transferred.upstream_to_client,
                    duration_ms = ms, end = ?r.end, "tcp"
                ),
                Err(e) => tracing::info!(
                    target: crate::telemetry::ACCESS_LOG, %peer, frontend = %key, %service,
                    duration_ms = ms, error = %e, "tcp"
                ),
            }
        }
        match result {
            Ok(r) => tracing::debug!(
                %peer, frontend = %key, endpoint = %r.endpoint, attempts = r.attempts,
                sent = r.transferred.client_to_upstream, received = r.transferred.upstream_to_client,
                end = ?r.end, "connection done"
            ),
            Err(e) => tracing::info!(%peer, frontend = %key, error = %e, "connection failed"),
        }
    }
}

/// What a connection needs to know about the listener that accepted it.
#[derive(Debug, Clone, Copy)]
struct Listening {
    addr: Option<SocketAddr>,
    /// TCP_NODELAY and keepalive were set on the listener (and so are
    /// inherited by accepted sockets).
    tuned: bool,
}

impl Listening {
    /// The destination the client dialled. Under TPROXY the accepted
    /// socket's local address is the original destination and differs from
    /// the listener's own address: one `getsockname`. Only when it equals
    /// the listener's (REDIRECT/DNAT steered the connection, or a client
    /// dialled the listener itself) is conntrack asked, by
    /// [`redirect::sockopt::original_dst`].
    fn original_dst(&self, sock: &TcpStream) -> io::Result<SocketAddr> {
        let local = sock.local_addr()?;
        let local = SocketAddr::new(local.ip().to_canonical(), local.port());
        let Some(l) = self.addr else {
            return redirect::sockopt::original_dst(sock);
        };
        let l = SocketAddr::new(l.ip().to_canonical(), l.port());
        let maybe_redirected =
            local.port() == l.port() && (l.ip().is_unspecified() || l.ip() == local.ip());
        if maybe_redirected {
            redirect::sockopt::original_dst(sock)
        } else {
            Ok(local)
        }
    }
}

/// Keeps the balancers, then the per-service L7 state, in step with the
/// table: balancers of removed service ports are dropped and new ones exist
/// before their first connection, and L7 state (which starts health checks
/// on a service's balancer) always sees the balancers of the same snapshot.
/// One loop, so that order holds for every snapshot. Between snapshots it
/// sweeps the idle upstream connections of the L7 services.
async fn sync_table(
    mut table: TableRx,
    balancers: Arc<Balancers>,
    l7: Arc<crate::l7::L7>,
    drain: drain::Watch,
) {
    let mut sweep = tokio::time::interval(crate::l7::IDLE_SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut source_open = true;
    // Starts from the snapshot current now: it may be newer than the one the
    // balancers were built from in `Server::new`.
    loop {
        let t = table.borrow_and_update().clone();
        let n = balancers.sync(&t);
        l7.sync(&t, &balancers);
        tracing::debug!(
            version = t.version,
            balancers = n,
            "balancers and L7 state synced"
        );
        loop {
            tokio::select! {
                biased;
                _ = drain.signaled() => return,
                r = table.changed(), if source_open => match r {
                    Ok(()) => break,
                    // The source is gone; the last table keeps serving (and
                    // its idle connections are still swept).
                    Err(_) => source_open = false,
                },
                _ = sweep.tick() => {
                    l7.sweep_idle();
                    crate::local_addrs::refresh();
                }
            }
        }
    }
}

/// Errors that concern one pending connection, not the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Exponential backoff for accept errors: 5 ms doubling to 1 s.
struct Backoff(Duration);

impl Backoff {
    const MIN: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Backoff(Self::MIN)
    }

    fn reset(&mut self) {
        self.0 = Self::MIN;
    }

    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-connection setsockopt calls are skipped on the promise that
    /// accepted sockets inherit the listener's options; hold Linux to it.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l4::tune_listener(&l).unwrap();
        let addr = l.local_addr().unwrap();
        let (c, a) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (_c, (sock, _)) = (c.unwrap(), a.unwrap());
        assert!(sock.nodelay().unwrap(), "TCP_NODELAY inherited");
        let s = socket2::SockRef::from(&sock);
        assert!(s.keepalive().unwrap(), "SO_KEEPALIVE inherited");
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 6);
    }

    /// A connection to the listener's own address was not redirected by
    /// TPROXY: its destination comes from conntrack or, without an entry,
    /// is the listener address itself.
    #[tokio::test]
    async fn direct_connection_to_the_listener_is_its_own_destination() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let listening = Listening {
            addr: Some(addr),
            tuned: false,
        };
        let (c, a) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (_c, (sock, _)) = (c.unwrap(), a.unwrap());
        assert_eq!(listening.original_dst(&sock).unwrap(), addr);
        // A listener on the unspecified address takes the same path.
        let any = Listening {
            addr: Some(SocketAddr::new([0, 0, 0, 0].into(), addr.port())),
            tuned: false,
        };
        assert_eq!(any.original_dst(&sock).unwrap(), addr);
    }
}
