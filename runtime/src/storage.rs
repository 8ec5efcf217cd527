//! What the driver needs from the local database: durable protocol state
//! and the execution of database commands. PostgreSQL implements it in
//! production (the `mm` schema, prepared transactions, logical slots);
//! [`MemCluster`] implements it in memory for tests of the driver and,
//! later, for the turmoil tier.

use mm_core::{DbCmd, DbResult, DurableOp, DurableState, Gid, Input, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Db(String),
}

/// What a node finds when it starts.
#[derive(Debug, Clone)]
pub enum Loaded {
    /// Never ran: bootstrap a fresh cluster member.
    Fresh,
    /// Ran before: its durable state and the gids its database holds prepared.
    Existing {
        durable: DurableState,
        prepared: Vec<Gid>,
    },
}

/// Where durable protocol state lives and database commands run.
pub trait Storage: Send + 'static {
    fn load(&mut self) -> impl Future<Output = Result<Loaded, StorageError>> + Send;
    /// Make `op` durable. The driver releases no later output before this returns.
    fn persist(&mut self, op: &DurableOp) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Make all of `ops` durable, in order; one database transaction where
    /// the storage can (the driver batches what one round of inputs produced).
    fn persist_batch(
        &mut self,
        ops: &[DurableOp],
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        async move {
            for op in ops {
                self.persist(op).await?;
            }
            Ok(())
        }
    }
    /// Start a database command; its result, if it has one, arrives later on `results`.
    fn execute(&mut self, cmd: DbCmd, results: &UnboundedSender<Input>);
}

/// One node's database in a [`MemCluster`].
#[derive(Debug, Default, Clone)]
pub struct MemDb {
    pub durable: Option<DurableState>,
    pub prepared: BTreeSet<Gid>,
    /// Local commit order.
    pub committed: Vec<Gid>,
}

struct Shared {
    nodes: usize,
    dbs: BTreeMap<NodeId, MemDb>,
    /// Each running node's input channel: the in-memory data plane.
    inboxes: BTreeMap<NodeId, UnboundedSender<Input>>,
}

/// In-memory databases of a whole cluster, with an instant data plane:
/// a local prepare is delivered to every running peer, and catch-up copies
/// the donor's committed transactions. Survives a node's restart (the
/// database and durable state outlive the driver, as PostgreSQL would).
#[derive(Clone)]
pub struct MemCluster(Arc<Mutex<Shared>>);

impl MemCluster {
    pub fn new(nodes: usize) -> MemCluster {
        MemCluster(Arc::new(Mutex::new(Shared {
            nodes,
            dbs: BTreeMap::new(),
            inboxes: BTreeMap::new(),
        })))
    }
    /// The storage of node `id`; `results` is the channel its driver reads inputs from.
    pub fn storage(&self, id: NodeId, results: UnboundedSender<Input>) -> MemStorage {
        let mut s = self.0.lock().expect("lock");
        s.dbs.entry(id).or_default();
        s.inboxes.insert(id, results);
        MemStorage {
            id,
            cluster: self.clone(),
        }
    }
    /// Detach a stopped node from the data plane.
    pub fn detach(&self, id: NodeId) {
        self.0.lock().expect("lock").inboxes.remove(&id);
    }
    /// `pg/resync.rs` in miniature: replace `joiner`'s committed transactions
    /// with a copy of `donor`'s, then report its catch-up from `donor`
    /// applied (the copy holds everything the donor's stream would have
    /// sent, and more). Refused while the joiner holds a prepared
    /// transaction, as the real resync waits for the resolver to settle them.
    /// `broken` is a deliberately broken copy that misses the donor's oldest
    /// commit (as a copy that skips a table would), for the checks to
    /// catch. Returns the rows copied.
    pub fn resync(
        &self,
        joiner: NodeId,
        donor: NodeId,
        upto_gen: Option<u64>,
        broken: bool,
    ) -> Result<usize, String> {
        let mut s = self.0.lock().expect("lock");
        let mut copy = s
            .dbs
            .get(&donor)
            .map(|d| d.committed.clone())
            .unwrap_or_default();
        let Some(j) = s.dbs.get_mut(&joiner) else {
            return Err(format!("node {joiner} has no database"));
        };
        if !j.prepared.is_empty() {
            return Err(format!("node {joiner} holds {} prepared", j.prepared.len()));
        }
        if broken && !copy.is_empty() {
            copy.remove(0);
        }
        let rows = copy.len();
        j.committed = copy;
        if let Some(inbox) = s.inboxes.get(&joiner) {
            let _ = inbox.send(Input::CatchupApplied { donor, upto_gen });
        }
        Ok(rows)
    }
    pub fn db(&self, id: NodeId) -> MemDb {
        self.0
            .lock()
            .expect("lock")
            .dbs
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }
}

pub struct MemStorage {
    id: NodeId,
    cluster: MemCluster,
}

impl Storage for MemStorage {
    async fn load(&mut self) -> Result<Loaded, StorageError> {
        let s = self.cluster.0.lock().expect("lock");
        let db = &s.dbs[&self.id];
        Ok(match &db.durable {
            None => Loaded::Fresh,
            Some(d) => Loaded::Existing {
                durable: d.clone(),
                prepared: db.prepared.iter().copied().collect(),
            },
        })
    }

    async fn persist(&mut self, op: &DurableOp) -> Result<(), StorageError> {
        let mut s = self.cluster.0.lock().expect("lock");
        let n = s.nodes;
        let db = s.dbs.get_mut(&self.id).expect("registered");
        db.durable
            .get_or_insert_with(|| DurableState::bootstrap(mm_core::NodeSet::first_n(n)))
            .apply(op);
        Ok(())
    }

    fn execute(&mut self, cmd: DbCmd, results: &UnboundedSender<Input>) {
        let mut s = self.cluster.0.lock().expect("lock");
        let me = self.id;
        let reply = |i: Input| {
            let _ = results.send(i); // the driver is gone: nothing to tell
        };
        match cmd {
            DbCmd::PrepareLocal { client, gid } => {
                s.dbs.get_mut(&me).expect("registered").prepared.insert(gid);
                for (peer, inbox) in &s.inboxes {
                    if *peer != me {
                        let _ = inbox.send(Input::RemoteTx { gid });
                    }
                }
                reply(Input::Db(DbResult::LocalPrepared {
                    client,
                    gid,
                    ok: true,
                }));
            }
            DbCmd::ApplyAndPrepare { gid } => {
                s.dbs.get_mut(&me).expect("registered").prepared.insert(gid);
                reply(Input::Db(DbResult::RemotePrepared { gid, ok: true }));
            }
            DbCmd::CommitPrepared { gid } | DbCmd::RollbackPrepared { gid } => {
                let commit = matches!(cmd, DbCmd::CommitPrepared { .. });
                let db = s.dbs.get_mut(&me).expect("registered");
                if db.prepared.remove(&gid) && commit {
                    db.committed.push(gid);
                }
                reply(Input::Db(DbResult::Finished { gid, commit }));
            }
            DbCmd::StreamCatchup {
                to,
                from_gen,
                upto_gen,
            } => {
                let batch: Vec<Gid> = s.dbs[&me]
                    .committed
                    .iter()
                    .filter(|g| g.gen > from_gen && upto_gen.is_none_or(|u| g.gen < u))
                    .copied()
                    .collect();
                if let Some(joiner) = s.dbs.get_mut(&to) {
                    // Only what it lacks: a gid it holds prepared gets its
                    // decision from the protocol (as `pg/replay.rs` skips it).
                    for g in batch {
                        if !joiner.committed.contains(&g) && !joiner.prepared.contains(&g) {
                            joiner.committed.push(g);
                        }
                    }
                }
                if let Some(inbox) = s.inboxes.get(&to) {
                    let _ = inbox.send(Input::CatchupApplied {
                        donor: me,
                        upto_gen,
                    });
                }
            }
            DbCmd::RollbackLocal { .. } | DbCmd::Discard { .. } => {}
        }
    }
}
