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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use control::{ServicePort, ServicePortName, Table};

use super::{BalanceConfig, Balancer};

type Map = HashMap<ServicePortName, Arc<Balancer>>;

#[derive(Debug)]
pub struct Balancers {
    cfg: BalanceConfig,
    map: ArcSwap<Map>,
    write: Mutex<()>,
}

impl Balancers {
    pub fn new(cfg: BalanceConfig) -> Self {
        Balancers {
            cfg,
            map: ArcSwap::from_pointee(Map::new()),
            write: Mutex::new(()),
        }
    }

    pub fn config(&self) -> &BalanceConfig {
        &self.cfg
    }

    /// The balancer of a service port, if the last sync created it.
    pub fn get(&self, name: &ServicePortName) -> Option<Arc<Balancer>> {
        self.map.load().get(name).cloned()
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
        if let Some(b) = self.map.load().get(&service.name) {
            if b.is_current(service) {
                return b.clone();
            }
        }
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let map = self.map.load_full();
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
        self.map.store(Arc::new(next));
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
        let old = self.map.load_full();
        let (mut added, mut seen) = (false, 0usize);
        for fe in table.frontends.values() {
            match old.get(&fe.service.name) {
                Some(b) if b.mark_synced(table.version) => {
                    seen += 1;
                    b.apply(&fe.service, table.version);
                }
                Some(_) => {}
                // A new service port: the map is rebuilt below, which applies
                // every row anyway.
                None => {
                    added = true;
                    break;
                }
            }
        }
        if !added && seen == old.len() {
            return old.len();
        }
        let mut next = Map::with_capacity(old.len());
        for fe in table.frontends.values() {
            let svc = &fe.service;
            if next.contains_key(&svc.name) {
                continue;
            }
            let b = match old.get(&svc.name) {
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
            next.insert(svc.name.clone(), b);
        }
        let len = next.len();
        self.map.store(Arc::new(next));
        len
    }

    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
