//! Convergence: equal order-independent digests and row counts per table
//! on every node at the end.

use super::Violation;
use crate::db_model::{Db, Table};
use mm_core::NodeId;

pub fn check(dbs: &[(NodeId, &Db)]) -> Vec<Violation> {
    let mut v = Vec::new();
    let Some((first_id, first)) = dbs.first() else {
        return v;
    };
    for table in Table::ALL {
        let d0 = first.digest(table);
        for (id, db) in &dbs[1..] {
            let d = db.digest(table);
            if d != d0 {
                v.push(Violation::new(
                    "convergence",
                    format!(
                        "table {}: n{first_id} has {} rows sum {:016x}, n{id} has {} rows sum {:016x}",
                        table.name(),
                        d0.rows,
                        d0.sum,
                        d.rows,
                        d.sum
                    ),
                ));
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db_model::{RowValue, Write};
    use mm_core::Gid;
    use std::sync::Arc;

    #[test]
    fn diverged_tables_are_caught() {
        let a = Db::new();
        let mut b = Db::new();
        assert!(check(&[(1, &a), (2, &b)]).is_empty());
        let g = Gid {
            origin: 2,
            boot: 1,
            seq: 1,
            gen: 1,
        };
        b.apply_committed(
            g,
            Arc::new(vec![Write {
                table: Table::Mm,
                id: 3,
                value: Some(RowValue::Mm {
                    info: 1,
                    mod_time: 1,
                }),
            }]),
        );
        let v = check(&[(1, &a), (2, &b)]);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].checker, "convergence");
    }
}
