//! What changed between two table snapshots: per row (for the kernel's
//! rules) and per service port.
//!
//! Why: the data plane keeps state per service port (balancers, L7 state,
//! the node's endpoint gauges) in step with the table, and the table
//! changes an EndpointSlice at a time. Visiting every port's state for every
//! version cost ~50 ms of CPU per version at 10,000 services, on the data
//! plane's own runtime (BENCHMARKS.md, "Session 12"). Snapshots share the
//! rows of unchanged ports (`ClusterState` keeps the previous
//! `Arc<ServicePort>` of a port that did not change), so one pointer
//! comparison per row finds the rows and ports that did; only those are
//! visited. The same holds for the kernel rules, one per row (6 ms per
//! version at 10,000 services to build and compare them all).
//!
//! A diff is computed from the two tables alone, with no change log to keep
//! in step: a table built or edited by hand (tests, fixtures) diffs as
//! exactly as one from `ClusterState`, only slower when its rows are not
//! shared (every row then counts as changed, which is still correct).

use std::collections::HashSet;
use std::sync::Arc;

use crate::model::{Family, Frontend, ServicePort, ServicePortName, Table};

/// A service port's identity: a dual-stack port is two ports, one per family.
pub type PortId<'a> = (Family, &'a ServicePortName);

fn id(p: &ServicePort) -> PortId<'_> {
    (p.family, &p.name)
}

/// The rows that differ between an older and a newer table.
#[derive(Debug, Default)]
pub struct RowDiff<'a> {
    /// Rows of the newer table that the older one lacks or had otherwise
    /// (another kind, or another row of its service port).
    pub changed: Vec<&'a Frontend>,
    /// Rows of the older table whose frontend the newer one lacks.
    pub removed: Vec<&'a Frontend>,
}

impl RowDiff<'_> {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

/// The service ports that differ between an older and a newer table.
#[derive(Debug, Default)]
pub struct PortDiff<'a> {
    /// Ports with a row in the newer table that is not the older table's
    /// row at that frontend (new ports, and ports with a new frontend,
    /// included), as the newer table has them: each once. Visiting one
    /// whose row did not change must be harmless.
    pub changed: Vec<&'a Arc<ServicePort>>,
    /// Ports of the older table that have no frontend in the newer one, as
    /// the older table had them: each once.
    pub removed: Vec<&'a Arc<ServicePort>>,
}

impl PortDiff<'_> {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

impl Table {
    /// The rows that changed from `older` to this table: O(rows) pointer
    /// comparisons, nothing more; one pass when no frontend went.
    pub fn row_diff<'a>(&'a self, older: &'a Table) -> RowDiff<'a> {
        let mut diff = RowDiff::default();
        if self.frontends.ptr_eq(&older.frontends) {
            return diff;
        }
        // Keys of this table that the older one has too: when that is every
        // key of the older table, none went, and its pass is skipped (the
        // usual change replaces rows: endpoints come and go).
        let mut kept = 0usize;
        for fe in self.frontends.values() {
            let same = match older.frontends.get(&fe.key) {
                Some(o) => {
                    kept += 1;
                    o.kind == fe.kind && Arc::ptr_eq(&o.service, &fe.service)
                }
                None => false,
            };
            if !same {
                diff.changed.push(fe);
            }
        }
        if kept < older.frontends.len() {
            for fe in older.frontends.values() {
                if !self.frontends.contains_key(&fe.key) {
                    diff.removed.push(fe);
                }
            }
        }
        diff
    }

    /// The ports that changed from `older` to this table: [`Table::row_diff`]
    /// plus O(changed rows) work; a port that lost a frontend also hashes
    /// every port name of this table once, to learn whether another row
    /// still names it.
    pub fn port_diff<'a>(&'a self, older: &'a Table) -> PortDiff<'a> {
        let rows = self.row_diff(older);
        let mut diff = PortDiff::default();
        let mut seen: HashSet<*const ServicePort> = HashSet::new();
        for fe in &rows.changed {
            if seen.insert(Arc::as_ptr(&fe.service)) {
                diff.changed.push(&fe.service);
            }
        }
        // Ports that lost a frontend (it went, or now names another port):
        // gone, unless another row names them.
        let moved = rows.changed.iter().filter_map(|fe| {
            let old = older.frontends.get(&fe.key)?;
            (id(&old.service) != id(&fe.service)).then_some(old)
        });
        let mut left: Vec<&Arc<ServicePort>> = Vec::new();
        seen.clear();
        for fe in rows.removed.iter().copied().chain(moved) {
            if seen.insert(Arc::as_ptr(&fe.service)) {
                left.push(&fe.service);
            }
        }
        if left.is_empty() {
            return diff;
        }
        let changed: HashSet<PortId> = diff.changed.iter().map(|p| id(p)).collect();
        left.retain(|p| !changed.contains(&id(p)));
        if left.is_empty() {
            return diff;
        }
        // Still named by an unchanged row? Only a full pass can tell.
        let present: HashSet<PortId> = self.frontends.values().map(|f| id(&f.service)).collect();
        let mut gone: HashSet<PortId> = HashSet::new();
        for p in left {
            if !present.contains(&id(p)) && gone.insert(id(p)) {
                diff.removed.push(p);
            }
        }
        diff
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use super::*;
    use crate::model::{Endpoint, Frontend, FrontendKind, Mode, Protocol};

    fn port(name: &str, ep: IpAddr) -> Arc<ServicePort> {
        Arc::new(ServicePort::new(
            ServicePortName::new("ns", name, ""),
            Protocol::Tcp,
            Mode::L4,
            Arc::from([Endpoint::ready(SocketAddr::new(ep, 8080))]),
        ))
    }

    fn row(ip: [u8; 4], p: &Arc<ServicePort>) -> Frontend {
        Frontend::new(
            SocketAddr::from((ip, 80)),
            FrontendKind::ClusterIp,
            p.clone(),
        )
    }

    fn names(ports: &[&Arc<ServicePort>]) -> Vec<String> {
        let mut v: Vec<String> = ports
            .iter()
            .map(|p| format!("{}/{:?}", p.name, p.family))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn finds_changed_new_and_removed_ports_and_nothing_else() {
        let v4 = |i: u8| IpAddr::from([10, 1, 0, i]);
        let (a, b, c) = (port("a", v4(1)), port("b", v4(2)), port("c", v4(3)));
        let c6 = port("c", "fd00::3".parse().unwrap());
        let c6_row = Frontend::new(
            "[fd00:96::3]:80".parse().unwrap(),
            FrontendKind::ClusterIp,
            c6.clone(),
        );
        let old = Table::new(
            1,
            [
                row([10, 96, 0, 1], &a),
                row([10, 96, 0, 2], &b),
                row([10, 96, 0, 3], &c),
                c6_row.clone(),
            ],
        );
        assert!(old.port_diff(&old).is_empty());
        let mut new = old.clone();
        new.version = 2;
        assert!(new.port_diff(&old).is_empty(), "shared rows");
        // a's endpoints change; b gets a second frontend (same row, so
        // listed too); the IPv4 row of the dual-stack c goes, its IPv6 row
        // stays; d is new.
        let a2 = port("a", v4(9));
        let d = port("d", v4(4));
        for f in [
            row([10, 96, 0, 1], &a2),
            row([10, 96, 1, 2], &b),
            row([10, 96, 0, 4], &d),
        ] {
            new.frontends.insert(f.key, f);
        }
        new.frontends.remove(&row([10, 96, 0, 3], &c).key);
        let diff = new.port_diff(&old);
        assert_eq!(names(&diff.changed), ["ns/a/V4", "ns/b/V4", "ns/d/V4"]);
        assert!(Arc::ptr_eq(
            diff.changed.iter().find(|p| p.name.name == "a").unwrap(),
            &a2
        ));
        assert_eq!(names(&diff.removed), ["ns/c/V4"]);
        // Backwards, the other way round.
        let back = old.port_diff(&new);
        assert_eq!(names(&back.changed), ["ns/a/V4", "ns/c/V4"]);
        assert!(Arc::ptr_eq(
            back.changed.iter().find(|p| p.name.name == "a").unwrap(),
            &a
        ));
        assert_eq!(names(&back.removed), ["ns/d/V4"]);
    }

    #[test]
    fn a_port_that_keeps_one_of_its_frontends_is_not_removed() {
        let a = port("a", [10, 1, 0, 1].into());
        let old = Table::new(2, [row([10, 96, 0, 1], &a), row([192, 168, 0, 1], &a)]);
        // An external IP goes; the ClusterIP row (unchanged) stays.
        let new = Table::new(3, [row([10, 96, 0, 1], &a)]);
        assert!(new.port_diff(&old).is_empty());
        // A frontend that moves to another port removes neither.
        let b = port("b", [10, 1, 0, 2].into());
        let moved = Table::new(4, [row([10, 96, 0, 1], &a), row([192, 168, 0, 1], &b)]);
        let diff = moved.port_diff(&old);
        assert_eq!(names(&diff.changed), ["ns/b/V4"]);
        assert!(diff.removed.is_empty());
        // Every frontend gone: removed once.
        let empty = Table::default();
        let diff = empty.port_diff(&old);
        assert_eq!(names(&diff.removed), ["ns/a/V4"]);
        assert!(diff.changed.is_empty());
    }

    /// Rows equal in value but not shared (a table built by hand) count as
    /// changed: visiting them is slower, never wrong.
    #[test]
    fn unshared_equal_rows_count_as_changed() {
        let a = port("a", [10, 1, 0, 1].into());
        let a_copy = Arc::new((*a).clone());
        let old = Table::new(1, [row([10, 96, 0, 1], &a)]);
        let new = Table::new(2, [row([10, 96, 0, 1], &a_copy)]);
        let diff = new.port_diff(&old);
        assert_eq!(names(&diff.changed), ["ns/a/V4"]);
        assert!(diff.removed.is_empty());
    }

    /// Rows: a changed row (its port's new row, or another kind at the same
    /// address), a new one and a gone one are listed; shared rows are not.
    #[test]
    fn row_diff_lists_changed_new_and_gone_rows_only() {
        let (a, b) = (
            port("a", [10, 1, 0, 1].into()),
            port("b", [10, 1, 0, 2].into()),
        );
        let old = Table::new(
            1,
            [
                row([10, 96, 0, 1], &a),
                row([10, 96, 0, 2], &b),
                row([10, 96, 0, 3], &b),
            ],
        );
        let a2 = port("a", [10, 1, 0, 9].into());
        let mut lb = row([10, 96, 0, 2], &b);
        lb.kind = FrontendKind::LoadBalancer;
        let new = Table::new(2, [row([10, 96, 0, 1], &a2), lb, row([10, 96, 0, 4], &b)]);
        let diff = new.row_diff(&old);
        let mut changed: Vec<String> = diff.changed.iter().map(|f| f.key.to_string()).collect();
        changed.sort();
        assert_eq!(
            changed,
            ["10.96.0.1:80/TCP", "10.96.0.2:80/TCP", "10.96.0.4:80/TCP"]
        );
        let removed: Vec<String> = diff.removed.iter().map(|f| f.key.to_string()).collect();
        assert_eq!(removed, ["10.96.0.3:80/TCP"]);
        assert!(old.clone().row_diff(&old).is_empty());
    }
}
