//! The model of one node's PostgreSQL: committed rows, row locks, client
//! sessions (volatile), prepared transactions and the committed log (durable).
//! Writes are row images, as logical replication ships them: peers apply
//! values, they never recompute them.

use mm_core::{ClientId, Gid};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// The seed's table: `mm(id, info, mod_time)`.
    Mm,
    /// The bank workload's table: `accounts(id, balance)`.
    Accounts,
}

impl Table {
    pub const ALL: [Table; 2] = [Table::Mm, Table::Accounts];
    pub fn name(self) -> &'static str {
        match self {
            Table::Mm => "mm",
            Table::Accounts => "accounts",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RowValue {
    Mm { info: u64, mod_time: u64 },
    Balance(i64),
}

/// One row image; `value == None` deletes the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Write {
    pub table: Table,
    pub id: u64,
    pub value: Option<RowValue>,
}

pub type Writes = Arc<Vec<Write>>;
pub type Key = (Table, u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LockOwner {
    Session(ClientId),
    Prepared(Gid),
}

#[derive(Clone, Debug, Default)]
struct Session {
    writes: Vec<Write>,
    locks: Vec<Key>,
}

/// Bank accounts every node starts with, identically.
pub const BANK_ACCOUNTS: u64 = 10;
pub const BANK_INITIAL_BALANCE: i64 = 1000;

#[derive(Clone, Debug)]
pub struct Db {
    rows: BTreeMap<Key, RowValue>,
    locks: BTreeMap<Key, LockOwner>,
    /// Volatile: lost with their locks in a crash.
    sessions: BTreeMap<ClientId, Session>,
    prepared: BTreeMap<Gid, (Writes, Vec<Key>)>,
    /// Local commit order, what a donor's slot would replay.
    committed_log: Vec<(Gid, Writes)>,
    committed: BTreeSet<Gid>,
}

impl Default for Db {
    fn default() -> Self {
        Db::new()
    }
}

impl Db {
    /// A fresh database with the bank accounts initialised.
    pub fn new() -> Db {
        let mut rows = BTreeMap::new();
        for id in 0..BANK_ACCOUNTS {
            rows.insert(
                (Table::Accounts, id),
                RowValue::Balance(BANK_INITIAL_BALANCE),
            );
        }
        Db {
            rows,
            locks: BTreeMap::new(),
            sessions: BTreeMap::new(),
            prepared: BTreeMap::new(),
            committed_log: Vec::new(),
            committed: BTreeSet::new(),
        }
    }

    // ---- client sessions ----

    /// Row lock for a session; false if someone else holds it (the client aborts).
    pub fn lock(&mut self, client: ClientId, key: Key) -> bool {
        match self.locks.get(&key) {
            Some(LockOwner::Session(c)) if *c == client => true,
            Some(_) => false,
            None => {
                self.locks.insert(key, LockOwner::Session(client));
                self.sessions.entry(client).or_default().locks.push(key);
                true
            }
        }
    }

    /// Read as the session sees it (its own writes first).
    pub fn read(&self, client: ClientId, key: Key) -> Option<RowValue> {
        if let Some(s) = self.sessions.get(&client) {
            if let Some(w) = s.writes.iter().rev().find(|w| (w.table, w.id) == key) {
                return w.value;
            }
        }
        self.rows.get(&key).copied()
    }

    /// Buffer a write in the session; the caller holds the row lock.
    pub fn write(&mut self, client: ClientId, w: Write) {
        debug_assert_eq!(
            self.locks.get(&(w.table, w.id)),
            Some(&LockOwner::Session(client))
        );
        self.sessions.entry(client).or_default().writes.push(w);
    }

    pub fn session_writes(&self, client: ClientId) -> Option<&[Write]> {
        self.sessions.get(&client).map(|s| s.writes.as_slice())
    }

    pub fn has_session(&self, client: ClientId) -> bool {
        self.sessions.contains_key(&client)
    }

    /// `ROLLBACK` of a session.
    pub fn rollback_session(&mut self, client: ClientId) {
        if let Some(s) = self.sessions.remove(&client) {
            for k in s.locks {
                self.locks.remove(&k);
            }
        }
    }

    /// `PREPARE TRANSACTION gid` on the session: its writes and locks become
    /// the prepared transaction's. Returns its writes, or None if no session.
    pub fn prepare_session(&mut self, client: ClientId, gid: Gid) -> Option<Writes> {
        let s = self.sessions.remove(&client)?;
        for k in &s.locks {
            self.locks.insert(*k, LockOwner::Prepared(gid));
        }
        let writes = Arc::new(s.writes);
        self.prepared.insert(gid, (writes.clone(), s.locks));
        Some(writes)
    }

    // ---- remote and prepared transactions ----

    /// Apply a delivered remote transaction and prepare it: try-lock every
    /// row (a waiting applier would time out: fail at once instead).
    pub fn apply_and_prepare(&mut self, gid: Gid, writes: &Writes) -> bool {
        if self.prepared.contains_key(&gid) || self.committed.contains(&gid) {
            return false;
        }
        let mut keys: Vec<Key> = writes.iter().map(|w| (w.table, w.id)).collect();
        keys.sort();
        keys.dedup();
        if keys.iter().any(|k| self.locks.contains_key(k)) {
            return false;
        }
        for k in &keys {
            self.locks.insert(*k, LockOwner::Prepared(gid));
        }
        self.prepared.insert(gid, (writes.clone(), keys));
        true
    }

    /// `COMMIT PREPARED`: Some(writes) if it was prepared here.
    pub fn commit_prepared(&mut self, gid: Gid) -> Option<Writes> {
        let (writes, keys) = self.prepared.remove(&gid)?;
        for k in keys {
            self.locks.remove(&k);
        }
        self.apply_committed(gid, writes.clone());
        Some(writes)
    }

    /// `ROLLBACK PREPARED`: true if it was prepared here.
    pub fn rollback_prepared(&mut self, gid: Gid) -> bool {
        match self.prepared.remove(&gid) {
            Some((_, keys)) => {
                for k in keys {
                    self.locks.remove(&k);
                }
                true
            }
            None => false,
        }
    }

    /// Apply writes as committed (commit of a prepared tx, or catch-up).
    pub fn apply_committed(&mut self, gid: Gid, writes: Writes) {
        for w in writes.iter() {
            match w.value {
                Some(v) => {
                    self.rows.insert((w.table, w.id), v);
                }
                None => {
                    self.rows.remove(&(w.table, w.id));
                }
            }
        }
        self.committed.insert(gid);
        self.committed_log.push((gid, writes));
    }

    /// Catch-up apply of one committed transaction; false if already committed here.
    /// A locally prepared copy is committed (same writes) rather than duplicated.
    pub fn catchup_apply(&mut self, gid: Gid, writes: &Writes) -> bool {
        if self.committed.contains(&gid) {
            return false;
        }
        if self.commit_prepared(gid).is_none() {
            self.apply_committed(gid, writes.clone());
        }
        true
    }

    // ---- crash ----

    /// The server restarts: sessions and their locks are gone; prepared
    /// transactions, rows and the log survive.
    pub fn crash(&mut self) {
        let clients: Vec<ClientId> = self.sessions.keys().copied().collect();
        for c in clients {
            self.rollback_session(c);
        }
    }

    // ---- inspection ----

    pub fn prepared_gids(&self) -> Vec<Gid> {
        self.prepared.keys().copied().collect()
    }
    pub fn is_prepared(&self, gid: Gid) -> bool {
        self.prepared.contains_key(&gid)
    }
    pub fn is_committed(&self, gid: Gid) -> bool {
        self.committed.contains(&gid)
    }
    pub fn committed_log(&self) -> &[(Gid, Writes)] {
        &self.committed_log
    }
    pub fn committed_count(&self) -> usize {
        self.committed.len()
    }
    pub fn get(&self, key: Key) -> Option<RowValue> {
        self.rows.get(&key).copied()
    }
    pub fn contains(&self, key: Key) -> bool {
        self.rows.contains_key(&key)
    }
    pub fn lock_owner(&self, key: Key) -> Option<LockOwner> {
        self.locks.get(&key).copied()
    }
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Sum of committed balances.
    pub fn bank_total(&self) -> i64 {
        self.rows
            .range((Table::Accounts, 0)..=(Table::Accounts, u64::MAX))
            .map(|(_, v)| match v {
                RowValue::Balance(b) => *b,
                _ => 0,
            })
            .sum()
    }

    /// Order-independent digest of a table, like the seed's
    /// `sum(hashtext(id||info||mod_time))`, plus its row count.
    pub fn digest(&self, table: Table) -> TableDigest {
        let mut d = TableDigest::default();
        for (k, v) in self.rows.range((table, 0)..=(table, u64::MAX)) {
            d.rows += 1;
            d.sum = d.sum.wrapping_add(row_hash(k.1, v));
        }
        d
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableDigest {
    pub rows: u64,
    pub sum: u64,
}

/// Stable hash of one row.
pub fn row_hash(id: u64, v: &RowValue) -> u64 {
    let mut h = crate::fnv::Fnv::new();
    h.u64(id);
    match v {
        RowValue::Mm { info, mod_time } => {
            h.u64(1);
            h.u64(*info);
            h.u64(*mod_time);
        }
        RowValue::Balance(b) => {
            h.u64(2);
            h.u64(*b as u64);
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gid(seq: u32) -> Gid {
        Gid {
            origin: 1,
            boot: 0,
            seq,
            gen: 1,
        }
    }

    #[test]
    fn locks_conflict_and_prepared_survive_crash() {
        let mut db = Db::new();
        let (a, b) = (ClientId(1), ClientId(2));
        let k = (Table::Mm, 7);
        assert!(db.lock(a, k));
        assert!(!db.lock(b, k));
        db.write(
            a,
            Write {
                table: Table::Mm,
                id: 7,
                value: Some(RowValue::Mm {
                    info: 1,
                    mod_time: 2,
                }),
            },
        );
        let w = db.prepare_session(a, gid(1)).unwrap();
        assert_eq!(w.len(), 1);
        db.crash();
        assert!(db.is_prepared(gid(1)));
        assert!(!db.lock(b, k));
        // A remote tx on the same row cannot prepare.
        assert!(!db.apply_and_prepare(gid(2), &w));
        db.commit_prepared(gid(1)).unwrap();
        assert!(db.contains(k));
        assert!(db.lock(b, k));
        db.crash();
        assert!(db.lock_owner(k).is_none());
    }

    #[test]
    fn digest_is_order_independent() {
        let mut x = Db::new();
        let mut y = Db::new();
        let w1 = Arc::new(vec![Write {
            table: Table::Mm,
            id: 1,
            value: Some(RowValue::Mm {
                info: 5,
                mod_time: 1,
            }),
        }]);
        let w2 = Arc::new(vec![Write {
            table: Table::Mm,
            id: 2,
            value: Some(RowValue::Mm {
                info: 6,
                mod_time: 1,
            }),
        }]);
        x.apply_committed(gid(1), w1.clone());
        x.apply_committed(gid(2), w2.clone());
        y.apply_committed(gid(2), w2);
        y.apply_committed(gid(1), w1);
        assert_eq!(x.digest(Table::Mm), y.digest(Table::Mm));
        assert_eq!(
            x.bank_total(),
            (BANK_ACCOUNTS as i64) * BANK_INITIAL_BALANCE
        );
    }
}
