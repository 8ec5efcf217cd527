//! Majority: every `Committed` reply is given under a generation whose
//! members are a majority of the configured nodes, and no two different
//! generations are adopted under the same number.

use super::Violation;
use mm_core::{Generation, Gid, NodeId};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default)]
pub struct Majority {
    adopted: BTreeMap<u64, (NodeId, Generation)>,
}

impl Majority {
    pub fn on_adopted(&mut self, node: NodeId, gen: Generation) -> Option<Violation> {
        match self.adopted.get(&gen.num) {
            None => {
                self.adopted.insert(gen.num, (node, gen));
                None
            }
            Some((_, g)) if g.members == gen.members && g.donors == gen.donors => None,
            Some((other, g)) => Some(Violation::new(
                "majority",
                format!(
                    "generation {} adopted as members {} donors {} by n{other} but members {} donors {} by n{node}",
                    gen.num, g.members, g.donors, gen.members, gen.donors
                ),
            )),
        }
    }

    pub fn on_committed_reply(
        node: NodeId,
        gid: Option<Gid>,
        gen: Generation,
        configured: usize,
    ) -> Option<Violation> {
        let majority = configured / 2 + 1;
        (gen.members.len() < majority).then(|| {
            Violation::new(
                "majority",
                format!(
                    "n{node} acknowledged {} committed in generation {} with members {} (< {majority} of {configured})",
                    gid.map(|g| g.to_string()).unwrap_or_else(|| "?".into()),
                    gen.num,
                    gen.members
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm_core::NodeSet;

    #[test]
    fn minority_commit_and_split_generations_are_caught() {
        let minority = Generation {
            num: 2,
            members: NodeSet::single(1),
            donors: NodeSet::single(1),
        };
        assert_eq!(
            Majority::on_committed_reply(1, None, minority, 3)
                .unwrap()
                .checker,
            "majority"
        );
        let maj = Generation {
            num: 2,
            members: NodeSet::first_n(2),
            donors: NodeSet::first_n(2),
        };
        assert!(Majority::on_committed_reply(1, None, maj, 3).is_none());
        let mut m = Majority::default();
        assert!(m.on_adopted(1, maj).is_none());
        assert!(m.on_adopted(2, maj).is_none());
        assert!(m.on_adopted(3, minority).is_some());
    }
}
