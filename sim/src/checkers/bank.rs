//! Bank: the sum of committed balances equals the initial total on every
//! node, checked after every commit that touches accounts.

use super::Violation;
use crate::db_model::{Db, BANK_ACCOUNTS, BANK_INITIAL_BALANCE};
use mm_core::{Gid, NodeId};

pub const TOTAL: i64 = BANK_ACCOUNTS as i64 * BANK_INITIAL_BALANCE;

pub fn check(node: NodeId, gid: Gid, db: &Db) -> Option<Violation> {
    let total = db.bank_total();
    (total != TOTAL).then(|| {
        Violation::new(
            "bank",
            format!("n{node}: balances sum to {total} != {TOTAL} after {gid}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db_model::{RowValue, Table, Write};
    use std::sync::Arc;

    #[test]
    fn money_created_is_caught() {
        let g = Gid {
            origin: 1,
            boot: 1,
            seq: 1,
            gen: 1,
        };
        let mut db = Db::new();
        assert!(check(1, g, &db).is_none());
        db.apply_committed(
            g,
            Arc::new(vec![Write {
                table: Table::Accounts,
                id: 0,
                value: Some(RowValue::Balance(5000)),
            }]),
        );
        assert_eq!(check(1, g, &db).unwrap().checker, "bank");
    }
}
