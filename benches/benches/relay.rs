//! The L4 relay on loopback, against the same workload without it:
//! * `connect`: a new connection to an echo backend and a 1-byte round trip
//!   (accept, frontend lookup, p2c pick, upstream connect, first bytes);
//! * `bulk`: 64 MiB pushed one way and the echo read back (copy throughput,
//!   with the relay's bounded buffers).
//!
//! Run: `cargo bench -p lightpath-benches --bench relay`.

use std::net::SocketAddr;
use std::time::Duration;

use control::Mode;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lightpath_benches::{echo_backend, runtime, service, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BULK: usize = 64 * 1024 * 1024;

async fn connect_roundtrip(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("read");
}

async fn bulk(addr: SocketAddr) {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let buf = vec![0x5au8; 256 * 1024];
        for _ in 0..BULK / buf.len() {
            w.write_all(&buf).await.expect("write");
        }
        w.shutdown().await.expect("shutdown");
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, BULK);
    writer.await.expect("writer");
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let (direct, proxy) = rt.block_on(async {
        let backend = echo_backend().await;
        (
            backend,
            Proxy::start(service("echo", "", Mode::L4, &[backend])).await,
        )
    });
    let proxied = proxy.addr;

    let mut g = c.benchmark_group("relay/connect");
    for (name, addr) in [("direct", direct), ("lightpath-l4", proxied)] {
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| rt.block_on(connect_roundtrip(addr)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("relay/bulk-64MiB-echo");
    g.throughput(Throughput::Bytes(BULK as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    for (name, addr) in [("direct", direct), ("lightpath-l4", proxied)] {
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| rt.block_on(bulk(addr)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
