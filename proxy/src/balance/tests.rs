//! Balancer unit tests with synthetic latencies (loopback connect times are
//! too uniform to show a slow endpoint).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use control::{
    Affinity, Endpoint, EndpointState, Family, Frontend, FrontendKey, FrontendKind, Mode, Protocol,
    ServicePort, ServicePortName, Table,
};

use super::*;

fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([10, 1, 0, (i % 250) as u8 + 1], 8000 + i))
}

fn service(name: &str, eps: &[SocketAddr], affinity: Affinity) -> Arc<ServicePort> {
    let eps: Arc<[Endpoint]> = eps.iter().copied().map(Endpoint::ready).collect();
    Arc::new(ServicePort {
        affinity,
        ..ServicePort::new(
            ServicePortName::new("default", name, ""),
            Protocol::Tcp,
            Mode::L4,
            eps,
        )
    })
}

fn client(i: u8) -> IpAddr {
    IpAddr::from([192, 168, 0, i])
}

fn picks(b: &Balancer, n: usize) -> HashMap<SocketAddr, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let p = b.pick(Scope::Cluster, client(1), &[]).expect("pick");
        *m.entry(p.addr()).or_default() += 1;
    }
    m
}

#[tokio::test(start_paused = true)]
async fn equal_endpoints_share_evenly_and_never_pick_empty() {
    let eps: Vec<_> = (0..3).map(addr).collect();
    let b = Balancer::new(
        &service("a", &eps, Affinity::None),
        BalanceConfig::default(),
    );
    let m = picks(&b, 3000);
    for e in &eps {
        let n = m.get(e).copied().unwrap_or(0);
        assert!((800..=1200).contains(&n), "{e}: {n} of 3000 ({m:?})");
    }
    let empty = Balancer::new(&service("e", &[], Affinity::None), BalanceConfig::default());
    assert!(empty.pick(Scope::Cluster, client(1), &[]).is_none());
    // Local scope of a service with only cluster endpoints: nothing.
    assert!(b.pick(Scope::Local, client(1), &[]).is_none());
}

#[tokio::test(start_paused = true)]
async fn in_flight_steers_towards_idle_endpoints() {
    let eps: Vec<_> = (0..3).map(addr).collect();
    let b = Balancer::new(
        &service("a", &eps, Affinity::None),
        BalanceConfig::default(),
    );
    // Hold 300 picks open: in-flight counts must end up close to equal.
    let held: Vec<Pick> = (0..300)
        .map(|_| b.pick(Scope::Cluster, client(1), &[]).expect("pick"))
        .collect();
    for be in b.backends(Scope::Cluster) {
        let n = be.in_flight();
        assert!((85..=115).contains(&n), "{}: {n} of 300", be.addr());
    }
    drop(held);
    for be in b.backends(Scope::Cluster) {
        assert_eq!(be.in_flight(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn slow_endpoint_gets_less_and_recovers() {
    let eps: Vec<_> = (0..4).map(addr).collect();
    let b = Balancer::new(
        &service("a", &eps, Affinity::None),
        BalanceConfig::default(),
    );
    let slow = eps[0];
    // Simulated load: 20 concurrent "connections", each completing after its
    // endpoint's latency; the slow endpoint takes 100 ms, the others 5 ms.
    let share_slow = |slow_ms: u64, rounds: usize| {
        let mut got = 0usize;
        let mut total = 0usize;
        for _ in 0..rounds {
            let mut batch = Vec::new();
            for _ in 0..20 {
                let p = b.pick(Scope::Cluster, client(1), &[]).expect("pick");
                batch.push(p);
            }
            for p in &mut batch {
                let ms = if p.addr() == slow { slow_ms } else { 5 };
                p.backend().observe_latency(Duration::from_millis(ms));
                if p.addr() == slow {
                    got += 1;
                }
                total += 1;
            }
            drop(batch);
        }
        got as f64 / total as f64
    };
    let s = share_slow(100, 200);
    assert!(s < 0.10, "slow endpoint share {s:.3} (fair would be 0.25)");
    // It speeds up: after the old peak decays, it recovers a fair share.
    tokio::time::advance(Duration::from_secs(60)).await;
    let s = share_slow(5, 200);
    assert!(s > 0.18, "recovered share {s:.3}");
}

#[tokio::test(start_paused = true)]
async fn new_endpoint_starts_at_default_rtt_not_zero() {
    // The first endpoints of a service have no peers to learn from: they
    // start at the default RTT, never at zero.
    let eps: Vec<_> = (0..2).map(addr).collect();
    let svc = service("a", &eps, Affinity::None);
    let b = Balancer::new(&svc, BalanceConfig::default());
    for be in b.backends(Scope::Cluster) {
        assert_eq!(be.rtt_estimate(), Duration::from_millis(30));
    }
    // A peerless update (every old endpoint replaced) starts at the default
    // too, even though the old endpoints had samples.
    for be in b.backends(Scope::Cluster) {
        be.observe_latency(Duration::from_millis(50));
    }
    b.update(&service("a", &[addr(5), addr(6)], Affinity::None));
    let new = b.backend(addr(5)).expect("new backend");
    assert_eq!(new.rtt_estimate(), Duration::from_millis(30));
    // Zero configured: still never free.
    let zero = BalanceConfig {
        default_rtt: Duration::ZERO,
        ..BalanceConfig::default()
    };
    let z = Balancer::new(&svc, zero);
    assert!(z.backends(Scope::Cluster)[0].cost(Instant::now()) > 0.0);
}

#[tokio::test(start_paused = true)]
async fn new_endpoint_starts_at_its_peers_mean_and_is_not_starved() {
    let eps: Vec<_> = (0..2).map(addr).collect();
    let svc = service("a", &eps, Affinity::None);
    let b = Balancer::new(&svc, BalanceConfig::default());
    // Fast peers (1 ms and 3 ms), far below the 30 ms default (after the
    // default decayed away, so the samples are the estimates).
    tokio::time::advance(Duration::from_secs(120)).await;
    b.backend(addr(0))
        .expect("a0")
        .observe_latency(Duration::from_millis(1));
    b.backend(addr(1))
        .expect("a1")
        .observe_latency(Duration::from_millis(3));
    // An ejected peer's estimate does not count.
    let mut eps3 = eps.clone();
    eps3.push(addr(3));
    b.update(&service("a", &eps3, Affinity::None));
    let ejected = b.backend(addr(3)).expect("a3");
    ejected.observe_latency(Duration::from_secs(1));
    b.eject(addr(3)).expect("eject");
    let mut eps4 = eps3.clone();
    eps4.push(addr(2));
    b.update(&service("a", &eps4, Affinity::None));
    let new = b.backend(addr(2)).expect("new backend");
    let est = new.rtt_estimate();
    // The mean of the ready peers, (1 + 3) / 2 ms; ejected a3 is left out.
    assert!(
        est > Duration::from_micros(1_990) && est < Duration::from_micros(2_010),
        "seeded at {est:?}"
    );
    // Light sequential load (one request at a time, 1-2 ms each): the new
    // endpoint takes its turn within the first few picks instead of losing
    // every comparison for tens of seconds.
    let mut first = None;
    for i in 0..30 {
        tokio::time::advance(Duration::from_millis(100)).await;
        let mut p = b.pick(Scope::Cluster, client(1), &[]).expect("pick");
        if p.addr() == addr(2) && first.is_none() {
            first = Some(i);
        }
        tokio::time::advance(Duration::from_millis(2)).await;
        p.record_success();
    }
    assert!(first.is_some(), "new endpoint never picked in 30 requests");
    // And it is not flooded while others are busy: held picks spread.
    let held: Vec<Pick> = (0..90)
        .map(|_| b.pick(Scope::Cluster, client(1), &[]).expect("pick"))
        .collect();
    let n = held.iter().filter(|p| p.addr() == addr(2)).count();
    assert!(n < 60, "new endpoint took {n} of 90");
}

#[tokio::test(start_paused = true)]
async fn update_keeps_stats_of_staying_endpoints() {
    let svc1 = service("a", &[addr(0), addr(1)], Affinity::None);
    let b = Balancer::new(&svc1, BalanceConfig::default());
    let keep = b.backend(addr(0)).expect("a0");
    keep.observe_latency(Duration::from_millis(300));
    let held = b.pick(Scope::Cluster, client(1), &[addr(1)]).expect("pick");
    assert_eq!(held.addr(), addr(0));

    b.update(&service("a", &[addr(0), addr(2)], Affinity::None));
    let again = b.backend(addr(0)).expect("a0 kept");
    assert!(Arc::ptr_eq(&keep, &again), "same Backend object");
    assert_eq!(again.in_flight(), 1);
    assert!(again.rtt_estimate() >= Duration::from_millis(299));
    assert!(b.backend(addr(1)).is_none(), "removed");
    for _ in 0..100 {
        let p = b.pick(Scope::Cluster, client(1), &[]).expect("pick");
        assert_ne!(p.addr(), addr(1));
    }
    drop(held);
    assert_eq!(again.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn exclude_and_ejection() {
    let eps: Vec<_> = (0..4).map(addr).collect();
    let b = Balancer::new(
        &service("a", &eps, Affinity::None),
        BalanceConfig::default(),
    );
    // Exclusion (retries go elsewhere).
    for _ in 0..200 {
        let p = b
            .pick(Scope::Cluster, client(1), &[eps[0], eps[1], eps[2]])
            .expect("pick");
        assert_eq!(p.addr(), eps[3]);
    }
    assert!(b.pick(Scope::Cluster, client(1), &eps).is_none());

    // Ejection: 50 % of 4 = 2 may be out.
    b.eject(eps[0]).expect("first");
    b.eject(eps[1]).expect("second");
    let err = b.eject(eps[2]).expect_err("third exceeds the share");
    assert!(matches!(err, EjectError::LimitReached { .. }), "{err}");
    assert!(err.to_string().contains("default/a"), "{err}");
    assert!(matches!(b.eject(addr(99)), Err(EjectError::Unknown { .. })));
    for _ in 0..200 {
        let p = b.pick(Scope::Cluster, client(1), &[]).expect("pick");
        assert!(p.addr() == eps[2] || p.addr() == eps[3], "{}", p.addr());
    }
    // Only ejected ones left after exclusion: still served, not refused.
    let p = b
        .pick(Scope::Cluster, client(1), &[eps[2], eps[3]])
        .expect("fallback to ejected");
    assert!(p.addr() == eps[0] || p.addr() == eps[1]);
    assert!(b.readmit(eps[0]));
    assert!(b.backend(eps[0]).expect("b").is_ready());
}

#[tokio::test(start_paused = true)]
async fn failure_penalty_moves_load_away() {
    let eps: Vec<_> = (0..3).map(addr).collect();
    let b = Balancer::new(
        &service("a", &eps, Affinity::None),
        BalanceConfig::default(),
    );
    for be in b.backends(Scope::Cluster) {
        be.observe_latency(Duration::from_millis(2));
    }
    let mut p = b
        .pick(Scope::Cluster, client(1), &[eps[1], eps[2]])
        .expect("pick");
    p.record_failure();
    drop(p);
    let dead = b.backend(eps[0]).expect("b");
    assert_eq!(dead.consecutive_failures(), 1);
    let m = picks(&b, 300);
    assert_eq!(m.get(&eps[0]).copied().unwrap_or(0), 0, "{m:?}");
    let mut p = b
        .pick(Scope::Cluster, client(1), &[eps[1], eps[2]])
        .expect("pick");
    p.record_success();
    assert_eq!(dead.consecutive_failures(), 0);
}

#[tokio::test(start_paused = true)]
async fn client_ip_affinity_sticks_until_timeout_or_removal() {
    let eps: Vec<_> = (0..5).map(addr).collect();
    let aff = Affinity::ClientIp {
        timeout: Duration::from_secs(30),
    };
    let b = Balancer::new(&service("a", &eps, aff), BalanceConfig::default());
    let mut firsts = std::collections::HashSet::new();
    for c in 0..20u8 {
        let first = b.pick(Scope::Cluster, client(c), &[]).expect("pick").addr();
        firsts.insert(first);
        for _ in 0..20 {
            // Hold others open so load differs: affinity must still win.
            let _p = b.pick(Scope::Cluster, client(c), &[]).expect("pick");
            assert_eq!(_p.addr(), first);
        }
    }
    assert!(firsts.len() > 1, "different clients spread: {firsts:?}");

    let c = client(1);
    let first = b.pick(Scope::Cluster, c, &[]).expect("pick").addr();
    // A retry excluding it moves the client.
    let moved = b.pick(Scope::Cluster, c, &[first]).expect("pick").addr();
    assert_ne!(moved, first);
    assert_eq!(b.pick(Scope::Cluster, c, &[]).expect("pick").addr(), moved);
    // The endpoint leaves the set: the client moves.
    let rest: Vec<_> = eps.iter().copied().filter(|a| *a != moved).collect();
    b.update(&service("a", &rest, aff));
    let now = b.pick(Scope::Cluster, c, &[]).expect("pick").addr();
    assert_ne!(now, moved);
    // Expiry: after the timeout the entry no longer binds (seen by sweeping
    // many picks: at least one lands elsewhere).
    tokio::time::advance(Duration::from_secs(31)).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        tokio::time::advance(Duration::from_secs(31)).await;
        seen.insert(b.pick(Scope::Cluster, c, &[]).expect("pick").addr());
    }
    assert!(seen.len() > 1, "affinity expired: {seen:?}");
}

#[tokio::test(start_paused = true)]
async fn registry_syncs_with_table() {
    let s1 = service("a", &[addr(0)], Affinity::None);
    let s2 = service("b", &[addr(1)], Affinity::None);
    let fe = |port: u16, s: &Arc<ServicePort>| {
        let key = FrontendKey::new(SocketAddr::from(([10, 96, 0, 1], port)), Protocol::Tcp);
        (
            key,
            Frontend {
                key,
                kind: FrontendKind::ClusterIp,
                service: s.clone(),
            },
        )
    };
    let mut t = Table::default();
    for (k, f) in [fe(80, &s1), fe(81, &s2), fe(82, &s2)] {
        t.frontends.insert(k, f);
    }
    let reg = Balancers::new(BalanceConfig::default());
    assert_eq!(reg.sync(&Arc::new(t.clone())), 2);
    let a = reg.get(Family::V4, &s1.name).expect("a");
    // New snapshot: a's endpoints change, b disappears.
    let s1b = service("a", &[addr(0), addr(2)], Affinity::None);
    let mut t2 = Table::default();
    let (k, f) = fe(80, &s1b);
    t2.frontends.insert(k, f);
    assert_eq!(reg.sync(&Arc::new(t2)), 1);
    let a2 = reg.get(Family::V4, &s1.name).expect("a");
    assert!(Arc::ptr_eq(&a, &a2), "balancer reused");
    assert_eq!(a2.backends(Scope::Cluster).len(), 2);
    assert!(reg.get(Family::V4, &s2.name).is_none());
    // The hot path creates what the sync task has not seen yet.
    let s3 = service("c", &[addr(3)], Affinity::None);
    let c = reg.for_service(&s3);
    assert!(c.is_current(&s3));
    assert_eq!(reg.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn scope_of_frontend_follows_traffic_policy() {
    let mut sp = (*service("a", &[addr(0)], Affinity::None)).clone();
    sp.local_endpoints = Arc::from(vec![Endpoint {
        addr: addr(1),
        state: EndpointState::Ready,
        node_name: None,
        zone: None,
    }]);
    sp.external_local = true;
    let sp = Arc::new(sp);
    let key = FrontendKey::new(SocketAddr::from(([10, 96, 0, 1], 80)), Protocol::Tcp);
    let mut f = Frontend {
        key,
        kind: FrontendKind::ClusterIp,
        service: sp.clone(),
    };
    assert_eq!(Scope::of(&f), Scope::Cluster);
    f.kind = FrontendKind::NodePort;
    assert_eq!(Scope::of(&f), Scope::Local);
    let b = Balancer::new(&sp, BalanceConfig::default());
    let p = b.pick(Scope::Local, client(1), &[]).expect("pick");
    assert_eq!(p.addr(), addr(1));
    assert_eq!(f.endpoints()[0].addr, addr(1));
}

#[tokio::test(start_paused = true)]
async fn older_snapshot_never_rolls_the_set_back() {
    let old = service("a", &[addr(0), addr(1)], Affinity::None);
    let new = service("a", &[addr(0)], Affinity::None);
    let reg = Balancers::new(BalanceConfig::default());
    let b = reg.for_service_at(&old, 4);
    reg.for_service_at(&new, 5);
    assert_eq!(b.backends(Scope::Cluster).len(), 1);
    // A connection task that looked its frontend up in table 4 arrives late.
    let late = reg.for_service_at(&old, 4);
    assert!(Arc::ptr_eq(&b, &late));
    assert_eq!(b.backends(Scope::Cluster).len(), 1, "not rolled back");
    assert!(!b.apply(&old, 4));
    assert!(b.apply(&old, 6), "a newer table may bring it back");
    assert_eq!(b.backends(Scope::Cluster).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_newer_table_with_the_same_row_keeps_the_state_and_its_order() {
    let row = service("a", &[addr(0), addr(1)], Affinity::None);
    let older = service("a", &[addr(0)], Affinity::None);
    let b = Balancer::new(&row, BalanceConfig::default());
    assert!(b.apply(&row, 5));
    let before = b.state.load_full();
    // Tables 6..=9 share the row: nothing is rebuilt or swapped (a table
    // change costs one load per unchanged service port)...
    for v in 6..=9 {
        assert!(b.apply(&row, v));
    }
    assert!(Arc::ptr_eq(&before, &b.state.load_full()), "state replaced");
    // ...and the state still knows it holds table 9's row: a row from table
    // 8 is older and cannot replace it.
    assert!(!b.apply(&older, 8));
    assert_eq!(b.backends(Scope::Cluster).len(), 2, "rolled back");
    assert!(b.apply(&older, 10));
    assert_eq!(b.backends(Scope::Cluster).len(), 1);
    assert!(!b.apply(&row, 9), "an older table's row after a newer one");
}

#[tokio::test(start_paused = true)]
async fn a_sync_that_keeps_every_service_port_applies_changed_rows_in_place() {
    let table = |version: u64, rows: &[(u16, &Arc<ServicePort>)]| {
        let mut t = Table {
            version,
            ..Table::default()
        };
        for (port, s) in rows {
            let key = FrontendKey::new(SocketAddr::from(([10, 96, 0, 1], *port)), Protocol::Tcp);
            let f = Frontend {
                key,
                kind: FrontendKind::ClusterIp,
                service: (*s).clone(),
            };
            t.frontends.insert(key, f);
        }
        Arc::new(t)
    };
    let a = service("a", &[addr(0)], Affinity::None);
    let b = service("b", &[addr(1)], Affinity::None);
    let reg = Balancers::new(BalanceConfig::default());
    assert_eq!(reg.sync(&table(1, &[(80, &a), (81, &b), (82, &b)])), 2);
    let (ba, bb) = (
        reg.get(Family::V4, &a.name).expect("a"),
        reg.get(Family::V4, &b.name).expect("b"),
    );
    // Version 2: a's endpoints change, the set of service ports does not.
    let a2 = service("a", &[addr(0), addr(2)], Affinity::None);
    assert_eq!(reg.sync(&table(2, &[(80, &a2), (81, &b), (82, &b)])), 2);
    assert_eq!(ba.backends(Scope::Cluster).len(), 2, "a's change applied");
    assert!(Arc::ptr_eq(&ba, &reg.get(Family::V4, &a.name).expect("a")));
    assert!(Arc::ptr_eq(&bb, &reg.get(Family::V4, &b.name).expect("b")));
    // The same version again, then one service port gone: still exact.
    assert_eq!(reg.sync(&table(2, &[(80, &a2), (81, &b), (82, &b)])), 2);
    assert_eq!(reg.sync(&table(3, &[(80, &a2)])), 1);
    assert!(reg.get(Family::V4, &b.name).is_none());
    // And one added.
    assert_eq!(reg.sync(&table(4, &[(80, &a2), (81, &b)])), 2);
    // A table older than the one synced changes nothing.
    assert_eq!(reg.sync(&table(3, &[(80, &a)])), 2);
    assert_eq!(ba.backends(Scope::Cluster).len(), 2, "rolled back");
    // A port a connection created between two syncs (it saw a newer table
    // first) that the next synced table lacks: dropped by that sync.
    let c = service("c", &[addr(3)], Affinity::None);
    reg.for_service_at(&c, 6);
    assert_eq!(reg.len(), 3);
    assert_eq!(reg.sync(&table(7, &[(80, &a2), (81, &b)])), 2);
    assert!(reg.get(Family::V4, &c.name).is_none());
    assert!(Arc::ptr_eq(&ba, &reg.get(Family::V4, &a.name).expect("a")));
    // The sync after that diffs again: b goes, a stays.
    assert_eq!(reg.sync(&table(8, &[(80, &a2)])), 1);
    assert!(reg.get(Family::V4, &b.name).is_none());
}

/// A dual-stack service port is two rows with one name, one per family,
/// with the family's own endpoints. Each family has its own balancer: a
/// connection to the IPv4 frontend is never balanced over the IPv6 set, and
/// looking one family up leaves the other's state (its statistics) alone.
/// Keyed by name alone, each lookup replaced the other family's set.
#[tokio::test(start_paused = true)]
async fn each_family_of_a_dual_stack_port_has_its_own_balancer() {
    let v6_addr = |i: u16| SocketAddr::new(IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 1, i]), 8000);
    let v4 = service("a", &[addr(0), addr(1)], Affinity::None);
    let v6 = service("a", &[v6_addr(1), v6_addr(2)], Affinity::None);
    assert_eq!((v4.family, v6.family), (Family::V4, Family::V6));
    let row = |ip: IpAddr, s: &Arc<ServicePort>| {
        Frontend::new(SocketAddr::new(ip, 80), FrontendKind::ClusterIp, s.clone())
    };
    let t = Table::new(
        1,
        [
            row(IpAddr::from([10, 96, 0, 1]), &v4),
            row("fd00:96::1".parse().unwrap(), &v6),
        ],
    );
    let reg = Balancers::new(BalanceConfig::default());
    assert_eq!(reg.sync(&Arc::new(t.clone())), 2);
    let b4 = reg.for_service_at(&v4, 1);
    let b6 = reg.for_service_at(&v6, 1);
    assert!(!Arc::ptr_eq(&b4, &b6), "one balancer for both families");
    let state4 = b4.state.load_full();
    for _ in 0..20 {
        reg.for_service_at(&v6, 1);
        let p4 = b4.pick(Scope::Cluster, client(1), &[]).expect("v4 pick");
        assert!(
            p4.addr().is_ipv4(),
            "IPv4 frontend balanced to {}",
            p4.addr()
        );
        reg.for_service_at(&v4, 1);
        let p6 = b6.pick(Scope::Cluster, client(1), &[]).expect("v6 pick");
        assert!(
            p6.addr().is_ipv6(),
            "IPv6 frontend balanced to {}",
            p6.addr()
        );
    }
    assert!(
        Arc::ptr_eq(&state4, &b4.state.load_full()),
        "v4 state replaced"
    );
    assert!(Arc::ptr_eq(
        &reg.get(Family::V6, &v6.name).expect("v6"),
        &b6
    ));
    // The next sync keeps both.
    assert_eq!(reg.sync(&Arc::new(Table { version: 2, ..t })), 2);
    assert!(Arc::ptr_eq(
        &reg.get(Family::V4, &v4.name).expect("v4"),
        &b4
    ));
}
