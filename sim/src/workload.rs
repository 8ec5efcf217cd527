//! Client workloads. Seed-mix clients replay the seed's pgbench script
//! (5 upserts into the node's own key partition, 5 updates and a 2-row
//! delete anywhere) pinned to one node; bank clients move money between
//! random accounts through random nodes. A transaction executes on the
//! origin's model database at once; a lock conflict there aborts it on the
//! client side (a real client would wait, then retry).

use crate::db_model::{Db, RowValue, Table, Write, BANK_ACCOUNTS};
use crate::fnv::Fnv;
use crate::time_util::VTime;
use mm_core::{ClientId, Gid, NodeId};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Key range of the seed's table.
pub const MM_KEYS: u64 = 30_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// Pinned to a node.
    SeedMix { node: NodeId },
    /// Picks a random node per transaction.
    Bank,
    /// One transaction with fixed writes on a fixed node, scripted by a
    /// test through [`crate::World::script_tx`]; never retried once sent.
    Scripted { node: NodeId },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientState {
    /// Will act at its next scheduled step.
    Idle,
    /// Sent `CommitRequest` to `node` (incarnation `inc`).
    Waiting {
        node: NodeId,
        inc: u32,
        gid: Option<Gid>,
    },
}

#[derive(Clone, Debug)]
pub struct Client {
    pub id: ClientId,
    pub kind: ClientKind,
    pub state: ClientState,
    pub rng: ChaCha8Rng,
    /// Transactions attempted (feeds the deterministic `info` values).
    pub counter: u64,
}

/// Why a transaction did not reach `CommitRequest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxError {
    LockConflict,
}

/// The seed's script on `db` as `client`, for node `node` of `nodes`.
pub fn seed_mix(
    db: &mut Db,
    client: &mut Client,
    node: NodeId,
    nodes: usize,
    local_now: u64,
) -> Result<(), TxError> {
    client.counter += 1;
    let idx = (node - 1) as u64;
    let n = nodes as u64;
    let info = |id: u64, c: &Client| {
        let mut h = Fnv::new();
        h.u64(c.id.0);
        h.u64(c.counter);
        h.u64(id);
        h.finish()
    };
    let id_client = client.id;
    for _ in 0..5 {
        let id = client.rng.gen_range(0..MM_KEYS / n) * n + idx;
        let v = RowValue::Mm {
            info: info(id, client),
            mod_time: local_now,
        };
        lock(db, id_client, Table::Mm, id)?;
        db.write(
            id_client,
            Write {
                table: Table::Mm,
                id,
                value: Some(v),
            },
        );
    }
    for _ in 0..5 {
        let id = client.rng.gen_range(0..MM_KEYS);
        if db.read(id_client, (Table::Mm, id)).is_some() {
            lock(db, id_client, Table::Mm, id)?;
            let v = RowValue::Mm {
                info: info(id, client),
                mod_time: local_now,
            };
            db.write(
                id_client,
                Write {
                    table: Table::Mm,
                    id,
                    value: Some(v),
                },
            );
        }
    }
    let id = client.rng.gen_range(0..MM_KEYS);
    for id in [id, id + 1] {
        if db.read(id_client, (Table::Mm, id)).is_some() {
            lock(db, id_client, Table::Mm, id)?;
            db.write(
                id_client,
                Write {
                    table: Table::Mm,
                    id,
                    value: None,
                },
            );
        }
    }
    Ok(())
}

/// One transfer between two distinct random accounts.
pub fn bank_transfer(db: &mut Db, client: &mut Client) -> Result<(), TxError> {
    client.counter += 1;
    let from = client.rng.gen_range(0..BANK_ACCOUNTS);
    let to = (from + client.rng.gen_range(1..BANK_ACCOUNTS)) % BANK_ACCOUNTS;
    let amount = client.rng.gen_range(1..=100i64);
    let c = client.id;
    lock(db, c, Table::Accounts, from)?;
    lock(db, c, Table::Accounts, to)?;
    let bal = |db: &Db, id| match db.read(c, (Table::Accounts, id)) {
        Some(RowValue::Balance(b)) => b,
        _ => 0,
    };
    let (bf, bt) = (bal(db, from), bal(db, to));
    db.write(
        c,
        Write {
            table: Table::Accounts,
            id: from,
            value: Some(RowValue::Balance(bf - amount)),
        },
    );
    db.write(
        c,
        Write {
            table: Table::Accounts,
            id: to,
            value: Some(RowValue::Balance(bt + amount)),
        },
    );
    Ok(())
}

/// A scripted client's fixed writes, in order.
pub fn scripted(db: &mut Db, client: &mut Client, writes: &[Write]) -> Result<(), TxError> {
    for w in writes {
        lock(db, client.id, w.table, w.id)?;
        db.write(client.id, *w);
    }
    client.counter += 1;
    Ok(())
}

fn lock(db: &mut Db, c: ClientId, t: Table, id: u64) -> Result<(), TxError> {
    if db.lock(c, (t, id)) {
        Ok(())
    } else {
        Err(TxError::LockConflict)
    }
}

/// Swarm-chosen workload shape.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadParams {
    pub seed_clients_per_node: Vec<usize>,
    pub bank_clients: usize,
    pub think_min: VTime,
    pub think_max: VTime,
    /// Wait before retrying after a refusal or conflict.
    pub retry_after: VTime,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn seed_mix_writes_own_partition_and_bank_conserves() {
        let mut db = Db::new();
        let mut c = Client {
            id: ClientId(1),
            kind: ClientKind::SeedMix { node: 2 },
            state: ClientState::Idle,
            rng: ChaCha8Rng::seed_from_u64(3),
            counter: 0,
        };
        seed_mix(&mut db, &mut c, 2, 3, 99).unwrap();
        let w = db.session_writes(c.id).unwrap();
        assert!(w.len() >= 5);
        assert!(w[..5].iter().all(|w| w.id % 3 == 1));
        db.rollback_session(c.id);
        bank_transfer(&mut db, &mut c).unwrap();
        let gid = Gid {
            origin: 1,
            boot: 1,
            seq: 1,
            gen: 1,
        };
        db.prepare_session(c.id, gid).unwrap();
        db.commit_prepared(gid).unwrap();
        assert_eq!(db.bank_total(), crate::checkers::bank::TOTAL);
    }
}
