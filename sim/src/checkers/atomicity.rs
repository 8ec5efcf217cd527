//! Atomicity: one outcome per gid on every node. Fed at every effective
//! `COMMIT PREPARED` / `ROLLBACK PREPARED` and every catch-up apply.

use super::Violation;
use mm_core::{Gid, NodeId, NodeSet};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, Default)]
pub struct Atomicity {
    /// gid → (nodes that committed it, nodes that rolled it back).
    outcomes: BTreeMap<Gid, (NodeSet, NodeSet)>,
    reported: BTreeSet<Gid>,
}

impl Atomicity {
    pub fn record(&mut self, node: NodeId, gid: Gid, commit: bool) -> Option<Violation> {
        let e = self.outcomes.entry(gid).or_default();
        if commit {
            e.0.insert(node);
        } else {
            e.1.insert(node);
        }
        if !e.0.is_empty() && !e.1.is_empty() && self.reported.insert(gid) {
            return Some(Violation::new(
                "atomicity",
                format!("{gid} committed on {} but rolled back on {}", e.0, e.1),
            ));
        }
        None
    }

    /// Whether some node committed `gid`.
    pub fn committed_somewhere(&self, gid: Gid) -> bool {
        self.outcomes.get(&gid).is_some_and(|e| !e.0.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_here_rollback_there_is_caught() {
        let g = Gid {
            origin: 1,
            boot: 1,
            seq: 1,
            gen: 1,
        };
        let mut a = Atomicity::default();
        assert!(a.record(1, g, true).is_none());
        assert!(a.record(2, g, true).is_none());
        let v = a.record(3, g, false).expect("violation");
        assert_eq!(v.checker, "atomicity");
        assert!(a.record(3, g, false).is_none(), "reported once");
        let h = Gid { seq: 2, ..g };
        assert!(a.record(1, h, false).is_none());
        assert!(a.record(2, h, false).is_none());
    }
}
