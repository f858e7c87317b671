//! Connections spread over the data threads (`lightpath::spread`), through
//! real loopback sockets: `Server::run_threaded` with two data threads whose
//! listeners are on different ports, and every client dialling the first
//! thread's port. That is the worst case of SO_REUSEPORT's hash (one thread
//! accepts everything), made certain, so without the hand-over every
//! connection would stay on thread 0.

mod l4_common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use control::Affinity;
use l4_common::{connect_greeted, roundtrip, service, table, Backend, WAIT};
use lightpath::drain;
use lightpath::server::{Server, ServerConfig};
use tokio::sync::watch;

fn listener() -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind frontend");
    l.set_nonblocking(true).expect("nonblocking");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// Waits (bounded) until `f` holds for the server's per-thread counts.
async fn wait_counts(server: &Server, what: &str, f: impl Fn(&[usize]) -> bool) -> Vec<usize> {
    let deadline = Instant::now() + WAIT;
    loop {
        let c = server.thread_connections();
        if f(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "{what}: counts {c:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_accepted_by_one_thread_are_served_by_both() {
    let prometheus = lightpath::metrics::install().expect("recorder");
    let b = Backend::echo(1).await;
    let (l0, front) = listener();
    let (l1, other) = listener();
    let svc = service("spread", &[b.addr], Affinity::None);
    let rows = vec![(front, svc.clone()), (other, svc)];
    let (_tx, rx) = watch::channel(table(1, &rows));
    let server = Server::new(rx, ServerConfig::default());
    let (signal, watch) = drain::channel();
    let s = server.clone();
    let task = tokio::spawn(async move { s.run_threaded(vec![vec![l0], vec![l1]], watch).await });

    // Eight long-lived connections, opened one after another, all to
    // thread 0's port; each is greeted by the backend through the relay.
    let mut clients = Vec::new();
    for i in 0..8 {
        let (c, hello) = connect_greeted(front).await;
        assert_eq!(hello, b.id, "connection {i} relayed");
        clients.push(c);
    }
    let counts = wait_counts(&server, "8 connections counted", |c| {
        c.iter().sum::<usize>() == 8
    })
    .await;
    assert_eq!(
        counts,
        vec![4, 4],
        "every other connection was handed to thread 1"
    );
    // The same counts are what `/metrics` renders.
    let text = prometheus.render();
    for t in 0..2 {
        let line = format!("lightpath_data_thread_connections{{thread=\"{t}\"}} 4");
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }

    // Both threads relay: every connection echoes its own bytes.
    for (i, c) in clients.iter_mut().enumerate() {
        roundtrip(c, format!("hello from {i}\n").as_bytes()).await;
    }

    // Closing uncounts them on the thread that served them.
    drop(clients);
    wait_counts(&server, "all closed", |c| c == [0, 0]).await;

    // A connection after the closes is served where it was accepted.
    let (c, _) = connect_greeted(front).await;
    wait_counts(&server, "one on thread 0", |c| c == [1, 0]).await;
    drop(c);

    signal.drain(Duration::from_secs(2)).await;
    tokio::time::timeout(WAIT, task)
        .await
        .expect("server stopped after the drain")
        .expect("serve task")
        .expect("serve");
}
