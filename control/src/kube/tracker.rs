//! Relist bookkeeping for one watch: which objects are applied, and which
//! vanished while we were not looking.
//!
//! Why: after a reconnect that needs a relist (410 Gone, or a fresh list
//! after the API server restarted), the watcher replays the whole current
//! set as `Init`, `InitApply`…, `InitDone`. Objects deleted during the
//! outage produce no event at all; they are simply absent from the relist.
//! Tracking the keys seen since `Init` lets `InitDone` delete exactly those,
//! without buffering whole objects (at 10,000 services that copy would
//! double the source's memory for the duration of a relist).

use std::collections::HashSet;

/// `(namespace, name)`; namespace empty for Nodes.
pub type ObjRef = (String, String);

#[derive(Default)]
pub struct Tracker {
    /// Objects currently applied to the cluster state.
    known: HashSet<ObjRef>,
    /// `Some` between `Init` and `InitDone`: keys listed so far.
    relisting: Option<HashSet<ObjRef>>,
    /// At least one list has completed.
    synced: bool,
}

impl Tracker {
    /// `Init`: a (re)list begins. A relist that restarts midway simply
    /// starts counting again; objects it applied stay known.
    pub fn init(&mut self) {
        self.relisting = Some(HashSet::new());
    }

    /// `InitApply` or `Apply` of `key`.
    pub fn seen(&mut self, key: ObjRef) {
        if let Some(r) = &mut self.relisting {
            r.insert(key.clone());
        }
        self.known.insert(key);
    }

    /// `Delete` of `key`.
    pub fn gone(&mut self, key: &ObjRef) {
        self.known.remove(key);
        if let Some(r) = &mut self.relisting {
            r.remove(key);
        }
    }

    /// `InitDone`: returns the objects that were known but not relisted,
    /// which the caller must delete.
    pub fn done(&mut self) -> Vec<ObjRef> {
        let listed = self.relisting.take().unwrap_or_default();
        let vanished = self
            .known
            .iter()
            .filter(|k| !listed.contains(*k))
            .cloned()
            .collect();
        self.known = listed;
        self.synced = true;
        vanished
    }

    /// Synced and not in the middle of a relist: this watch's part of the
    /// view is complete.
    pub fn complete(&self) -> bool {
        self.synced && self.relisting.is_none()
    }

    /// At least one list has completed (a later relist does not undo it).
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn known_count(&self) -> usize {
        self.known.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: &str) -> ObjRef {
        ("ns".into(), n.into())
    }

    #[test]
    fn relist_reports_vanished_objects_once() {
        let mut t = Tracker::default();
        assert!(!t.complete());
        t.init();
        t.seen(k("a"));
        t.seen(k("b"));
        assert!(t.done().is_empty());
        assert!(t.complete());
        t.seen(k("c"));
        // Outage: b and c deleted, d created; the relist shows a and d.
        t.init();
        assert!(!t.complete());
        t.seen(k("a"));
        t.seen(k("d"));
        let mut gone = t.done();
        gone.sort();
        assert_eq!(gone, vec![k("b"), k("c")]);
        assert_eq!(t.known_count(), 2);
    }

    #[test]
    fn interrupted_relist_restarts_cleanly() {
        let mut t = Tracker::default();
        t.init();
        t.seen(k("a"));
        t.seen(k("b"));
        t.done();
        t.init();
        t.seen(k("a"));
        // The list failed midway; the watcher starts over.
        t.init();
        t.seen(k("b"));
        assert_eq!(t.done(), vec![k("a")]);
    }
}
