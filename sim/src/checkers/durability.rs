//! Durability: every gid acknowledged `Committed` to a client is committed
//! on every node once the cluster has settled.

use super::Violation;
use crate::db_model::Db;
use mm_core::{Gid, NodeId};

pub fn check(acked: &[Gid], dbs: &[(NodeId, &Db)]) -> Vec<Violation> {
    let mut v = Vec::new();
    for gid in acked {
        let missing: Vec<NodeId> = dbs
            .iter()
            .filter(|(_, db)| !db.is_committed(*gid))
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            v.push(Violation::new(
                "durability",
                format!("{gid} acknowledged committed but missing on nodes {missing:?}"),
            ));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn acknowledged_but_missing_is_caught() {
        let g = Gid {
            origin: 1,
            boot: 1,
            seq: 1,
            gen: 1,
        };
        let mut a = Db::new();
        let b = Db::new();
        a.apply_committed(g, Arc::new(vec![]));
        assert!(check(&[g], &[(1, &a)]).is_empty());
        let v = check(&[g], &[(1, &a), (2, &b)]);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].checker, "durability");
    }
}
