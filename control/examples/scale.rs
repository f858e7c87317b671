//! Peak memory and wall time of building the table for a large cluster, and
//! of one incremental EndpointSlice update.
//!
//!     cargo run --release -p control --example scale -- 10000 10 [stream|batch]
//!
//! Prints VmHWM (peak RSS) from /proc/self/status before objects exist,
//! after the objects are generated, and after the table is built (the
//! objects are dropped as they are consumed, as the watcher does).

use std::time::Instant;

use control::{synth, ClusterState, Options};

fn status(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "?".into())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let services: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let endpoints: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    println!(
        "baseline          VmRSS {}  VmHWM {}",
        status("VmRSS:"),
        status("VmHWM:")
    );

    // "stream" (default): each object is generated and upserted at once, as
    // a watcher receives them, so the peak is the store plus the table.
    // "batch": every object exists first (as a full manifest file does).
    let batch = args.next().as_deref() == Some("batch");
    let start;
    let mut st = ClusterState::new(Options {
        node_name: "node-1".into(),
        ..Options::default()
    });
    if batch {
        let (svcs, slices) = synth::cluster(services, endpoints);
        println!(
            "objects generated VmRSS {}  VmHWM {}",
            status("VmRSS:"),
            status("VmHWM:")
        );
        start = Instant::now();
        for s in svcs {
            st.upsert_service(s).expect("valid service");
        }
        for s in slices {
            st.upsert_slice(s).expect("valid slice");
        }
    } else {
        start = Instant::now();
        for i in 0..services {
            st.upsert_service(synth::service(i)).expect("valid service");
            st.upsert_slice(synth::slice(i, endpoints, 0))
                .expect("valid slice");
        }
    }
    let table = st.snapshot();
    let build = start.elapsed();
    println!(
        "table built       VmRSS {}  VmHWM {}  ({} frontends, {} services x {} endpoints, {:?})",
        status("VmRSS:"),
        status("VmHWM:"),
        table.len(),
        services,
        endpoints,
        build
    );

    let n = 1000u32;
    let start = Instant::now();
    for g in 1..=n {
        st.upsert_slice(synth::slice(g % services, endpoints, g))
            .expect("valid slice");
        let _ = st.snapshot();
    }
    println!(
        "one-slice update  {:?} mean over {n} updates (incl. building the slice object)",
        start.elapsed() / n
    );
    println!(
        "final             VmRSS {}  VmHWM {}",
        status("VmRSS:"),
        status("VmHWM:")
    );
}
