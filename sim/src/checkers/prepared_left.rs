//! No prepared transaction is left on any node once the cluster settled.

use super::Violation;
use crate::db_model::Db;
use mm_core::NodeId;

pub fn check(dbs: &[(NodeId, &Db)]) -> Vec<Violation> {
    dbs.iter()
        .filter_map(|(n, db)| {
            let p = db.prepared_gids();
            (!p.is_empty()).then(|| {
                let list: Vec<String> = p.iter().take(10).map(|g| g.to_string()).collect();
                Violation::new(
                    "prepared_left",
                    format!("n{n} still holds {} prepared: {}", p.len(), list.join(" ")),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm_core::Gid;
    use std::sync::Arc;

    #[test]
    fn leftover_prepared_is_caught() {
        let mut db = Db::new();
        assert!(check(&[(1, &db)]).is_empty());
        db.apply_and_prepare(
            Gid {
                origin: 2,
                boot: 1,
                seq: 1,
                gen: 1,
            },
            &Arc::new(vec![]),
        );
        assert_eq!(check(&[(1, &db)])[0].checker, "prepared_left");
    }
}
