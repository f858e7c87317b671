//! The set of balancers, one per service port, kept in step with the table.
//!
//! Why a copy-on-write map behind arc-swap (pingora's pattern): connection
//! tasks look a balancer up on every accept, while the map changes only when
//! a service port appears or disappears. Readers never lock; writers (the
//! table-sync task, or a connection that saw a newer snapshot first) take a
//! writer-only mutex and publish a new map.
//!
//! A balancer is reused across snapshots as long as its service port exists,
//! so per-endpoint statistics and affinity entries survive updates.
//!
//! One map per address family: a dual-stack service port is two rows with
//! one name and two endpoint sets (kube-proxy runs a proxier per family), so
//! each family has its own balancer. Keyed by name alone, the two rows took
//! turns replacing each other's endpoint set, and a connection could be
//! balanced over the other family's endpoints.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use control::{Family, ServicePort, ServicePortName, Table};

use super::{BalanceConfig, Balancer};

type Map = HashMap<ServicePortName, Arc<Balancer>>;

#[derive(Debug)]
pub struct Balancers {
    cfg: BalanceConfig,
    /// Indexed by [`Family::index`].
    maps: [ArcSwap<Map>; 2],
    write: Mutex<()>,
}

impl Balancers {
    pub fn new(cfg: BalanceConfig) -> Self {
        Balancers {
            cfg,
            maps: [
                ArcSwap::from_pointee(Map::new()),
                ArcSwap::from_pointee(Map::new()),
            ],
            write: Mutex::new(()),
        }
    }

    pub fn config(&self) -> &BalanceConfig {
        &self.cfg
    }

    fn map(&self, family: Family) -> &ArcSwap<Map> {
        &self.maps[family.index()]
    }

    /// The balancer of a service port in `family`, if the last sync created it.
    pub fn get(&self, family: Family, name: &ServicePortName) -> Option<Arc<Balancer>> {
        self.map(family).load().get(name).cloned()
    }

    /// The balancer for `service`, updated to exactly this snapshot of it.
    /// The hot path: a lock-free lookup when the balancer is current (the
    /// usual case); creation or update under the writer lock otherwise, so a
    /// connection never balances over an older endpoint set than the table
    /// it looked its frontend up in.
    ///
    /// Unversioned (see [`Balancer::update`]); the accept path uses
    /// [`Balancers::for_service_at`].
    pub fn for_service(&self, service: &Arc<ServicePort>) -> Arc<Balancer> {
        self.lookup_or_apply(service, None)
    }

    /// [`Balancers::for_service`] for a service port taken from the table
    /// with version `table_version`: never rolls a balancer back to an older
    /// snapshot than one it already applied.
    pub fn for_service_at(&self, service: &Arc<ServicePort>, table_version: u64) -> Arc<Balancer> {
        self.lookup_or_apply(service, Some(table_version))
    }

    fn lookup_or_apply(&self, service: &Arc<ServicePort>, version: Option<u64>) -> Arc<Balancer> {
        let slot = self.map(service.family);
        if let Some(b) = slot.load().get(&service.name) {
            if b.is_current(service) {
                return b.clone();
            }
        }
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let map = slot.load_full();
        if let Some(b) = map.get(&service.name) {
            match version {
                Some(v) => {
                    b.apply(service, v);
                }
                None => b.update(service),
            }
            return b.clone();
        }
        let b = Arc::new(Balancer::new(service, self.cfg.clone()));
        if let Some(v) = version {
            b.apply(service, v);
        }
        let mut next = (*map).clone();
        next.insert(service.name.clone(), b.clone());
        slot.store(Arc::new(next));
        b
    }

    /// Brings the registry in line with `table`: creates balancers for new
    /// service ports, applies endpoint changes, drops balancers of service
    /// ports that are gone. Returns the number of balancers.
    ///
    /// A table change usually leaves the set of service ports as it was
    /// (endpoints come and go): then every balancer applies its row (a load
    /// when the row is unchanged) and the map is kept, so no map of every
    /// service port is rebuilt per table version.
    pub fn sync(&self, table: &Table) -> usize {
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.maps.each_ref().map(|m| m.load_full());
        let (mut added, mut seen) = (false, 0usize);
        for fe in table.frontends.values() {
            let svc = &fe.service;
            match old[svc.family.index()].get(&svc.name) {
                Some(b) if b.mark_synced(table.version) => {
                    seen += 1;
                    b.apply(svc, table.version);
                }
                Some(_) => {}
                // A new service port: the maps are rebuilt below, which
                // applies every row anyway.
                None => {
                    added = true;
                    break;
                }
            }
        }
        let had = old[0].len() + old[1].len();
        if !added && seen == had {
            return had;
        }
        let mut next = old.each_ref().map(|m| Map::with_capacity(m.len()));
        for fe in table.frontends.values() {
            let svc = &fe.service;
            let i = svc.family.index();
            if next[i].contains_key(&svc.name) {
                continue;
            }
            let b = match old[i].get(&svc.name) {
                Some(b) => {
                    b.apply(svc, table.version);
                    b.clone()
                }
                None => {
                    let b = Arc::new(Balancer::new(svc, self.cfg.clone()));
                    b.apply(svc, table.version);
                    b
                }
            };
            next[i].insert(svc.name.clone(), b);
        }
        let len = next[0].len() + next[1].len();
        for (slot, map) in self.maps.iter().zip(next) {
            slot.store(Arc::new(map));
        }
        len
    }

    pub fn len(&self) -> usize {
        self.maps.iter().map(|m| m.load().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
