//! Read after commit: once a client is told `Committed` (asking for
//! visibility everywhere, as every simulated client does), no node that
//! would serve a read (`Node::readable_until` ahead of its clock) lacks the
//! transaction in its database. Fed as commits are acknowledged, as nodes
//! commit, and after every input a node handles (readability only lapses
//! between inputs, so these are the moments it can start to hold).

use super::Violation;
use mm_core::{Gid, NodeId};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, Default)]
pub struct ReadAfterCommit {
    /// Acknowledged transactions each node's database does not show yet.
    missing: BTreeMap<NodeId, BTreeSet<Gid>>,
}

impl ReadAfterCommit {
    /// `gid` was acknowledged; `lacking` are the nodes whose database does
    /// not show it, with whether each is readable now.
    pub fn on_acked(
        &mut self,
        gid: Gid,
        lacking: impl IntoIterator<Item = (NodeId, bool)>,
    ) -> Option<Violation> {
        let mut found = None;
        for (n, readable) in lacking {
            self.missing.entry(n).or_default().insert(gid);
            if readable && found.is_none() {
                found = Some(stale(n, gid, "when COMMIT returned"));
            }
        }
        found
    }

    pub fn on_committed(&mut self, node: NodeId, gid: Gid) {
        if let Some(m) = self.missing.get_mut(&node) {
            m.remove(&gid);
        }
    }

    /// `node` just handled an input and is (or is not) readable.
    pub fn check(&self, node: NodeId, readable: bool) -> Option<Violation> {
        let gid = self.missing.get(&node)?.first()?;
        readable.then(|| stale(node, *gid, "later"))
    }
}

fn stale(node: NodeId, gid: Gid, when: &str) -> Violation {
    Violation::new(
        "read_after_commit",
        format!("n{node} serves reads ({when}) without acknowledged {gid}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gid(seq: u32) -> Gid {
        Gid {
            origin: 1,
            boot: 1,
            seq,
            gen: 1,
        }
    }

    #[test]
    fn a_readable_node_lacking_an_acknowledged_commit_is_caught() {
        let mut c = ReadAfterCommit::default();
        assert!(c.on_acked(gid(1), [(2, false)]).is_none());
        assert!(c.check(2, false).is_none());
        assert!(
            c.check(2, true).is_some(),
            "became readable while lacking it"
        );
        c.on_committed(2, gid(1));
        assert!(c.check(2, true).is_none());
        assert!(c.on_acked(gid(2), [(3, true)]).is_some());
    }
}
