//! The PostgreSQL storage adapter: the [`Storage`] trait `mmd`'s driver
//! runs on. Durable protocol state goes to the `mm` schema ([`StateStore`]);
//! database commands go to the session that owns the client's transaction
//! (local prepare), the appliers (remote prepare), the finishers (commit or
//! roll back prepared) or a donor's catch-up mark.

use super::applier::{run_applier, ApplierSettings, ApplyJob};
use super::finisher::{run_finisher, FinishJob};
use super::hub::{Hub, SessionCmd};
use super::remote_tx::CATCHUP_PREFIX;
use super::sql::quote_literal;
use super::StateStore;
use crate::config::NodeConfig;
use crate::storage::{Loaded, Storage, StorageError};
use mm_core::{DbCmd, DbResult, DurableOp, Input, NodeId};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::NoTls;

pub struct PgStorage {
    state: StateStore,
    hub: Arc<Hub>,
    conninfo: String,
    appliers: BTreeMap<NodeId, async_channel::Sender<ApplyJob>>,
    finishers: async_channel::Sender<FinishJob>,
}

impl PgStorage {
    /// Connect the state store and start the applier and finisher pools.
    pub async fn start(cfg: &NodeConfig, hub: Arc<Hub>) -> Result<PgStorage, StorageError> {
        let conninfo = cfg.postgres.conninfo.clone();
        let state = StateStore::connect(&conninfo).await?;
        let settings = ApplierSettings {
            conninfo: conninfo.clone(),
            lock_timeout_ms: cfg.data_plane.lock_timeout_ms,
            // The crossing-write ranking rotates over ids up to the largest.
            nodes: cfg.largest_id() as usize,
            node_id: cfg.node_id,
        };
        let mut appliers = BTreeMap::new();
        for &peer in cfg.nodes.keys().filter(|&&p| p != cfg.node_id) {
            let (tx, rx) = async_channel::unbounded();
            for k in 0..cfg.data_plane.appliers_per_peer {
                tokio::spawn(run_applier(
                    peer,
                    k,
                    settings.clone(),
                    rx.clone(),
                    hub.clone(),
                ));
            }
            appliers.insert(peer, tx);
        }
        let (ftx, frx) = async_channel::unbounded();
        for _ in 0..cfg.data_plane.finishers {
            tokio::spawn(run_finisher(conninfo.clone(), frx.clone(), hub.clone()));
        }
        Ok(PgStorage {
            state,
            hub,
            conninfo,
            appliers,
            finishers: ftx,
        })
    }

    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    /// The receivers replay a missed transaction only from generations this
    /// node was not online in: tell them once that is durable.
    fn note_durable(&self, ops: &[DurableOp]) {
        for op in ops {
            if let DurableOp::LastOnline(g) = op {
                self.hub.set_last_online_gen(*g);
            }
        }
    }
}

impl Storage for PgStorage {
    async fn load(&mut self) -> Result<Loaded, StorageError> {
        let loaded = self.state.load().await?;
        if let Loaded::Existing { durable, .. } = &loaded {
            self.hub.set_last_online_gen(durable.last_online_gen);
        }
        Ok(loaded)
    }

    async fn persist(&mut self, op: &DurableOp) -> Result<(), StorageError> {
        self.state.persist(op).await?;
        self.note_durable(std::slice::from_ref(op));
        Ok(())
    }

    async fn persist_batch(&mut self, ops: &[DurableOp]) -> Result<(), StorageError> {
        self.state.persist_batch(ops).await?;
        self.note_durable(ops);
        Ok(())
    }

    fn execute(&mut self, cmd: DbCmd, results: &UnboundedSender<Input>) {
        match cmd {
            DbCmd::PrepareLocal { client, gid } => {
                let cmd = SessionCmd::Prepare {
                    gid,
                    results: results.clone(),
                };
                if self.hub.to_session(client, cmd).is_err() {
                    // The session ended before its commit was handled:
                    // PostgreSQL rolled its transaction back.
                    let _ = results.send(Input::Db(DbResult::LocalPrepared {
                        client,
                        gid,
                        ok: false,
                    }));
                }
            }
            DbCmd::RollbackLocal { client } => {
                let _ = self.hub.to_session(client, SessionCmd::Rollback);
            }
            DbCmd::ApplyAndPrepare { gid } => {
                let tx = self.hub.take_for_apply(&gid);
                match (tx, self.appliers.get(&gid.origin)) {
                    (Some(tx), Some(q)) => {
                        let job = ApplyJob {
                            tx,
                            results: results.clone(),
                        };
                        if q.try_send(job).is_err() {
                            let _ = results
                                .send(Input::Db(DbResult::RemotePrepared { gid, ok: false }));
                        }
                    }
                    _ => {
                        tracing::warn!(%gid, "asked to apply a transaction that was not delivered");
                        let _ =
                            results.send(Input::Db(DbResult::RemotePrepared { gid, ok: false }));
                    }
                }
            }
            DbCmd::Discard { gid } => {
                self.hub.discard_remote(&gid);
            }
            DbCmd::CommitPrepared { gid } | DbCmd::RollbackPrepared { gid } => {
                let commit = matches!(cmd, DbCmd::CommitPrepared { .. });
                let job = FinishJob {
                    gid,
                    commit,
                    results: results.clone(),
                };
                if self.finishers.try_send(job).is_err() {
                    tracing::error!(%gid, "finisher pool is gone");
                }
            }
            DbCmd::StreamCatchup {
                to,
                from_gen,
                upto_gen,
            } => {
                // The joiner reads our WAL through its slot anyway: mark the
                // point it must reach. Everything committed here before the
                // mark precedes it in the stream.
                let conninfo = self.conninfo.clone();
                let body = format!(
                    "{to}:{from_gen}:{}",
                    upto_gen.map_or("-".to_string(), |u| u.to_string())
                );
                tokio::spawn(async move {
                    if let Err(e) = emit_catchup_mark(&conninfo, &body).await {
                        tracing::warn!(to, "cannot emit the catch-up mark: {e}");
                    }
                });
            }
        }
    }
}

async fn emit_catchup_mark(conninfo: &str, body: &str) -> Result<(), String> {
    let (c, conn) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c.simple_query(&format!(
        "SET default_transaction_read_only = off; \
         SELECT pg_logical_emit_message(false, {}, {})",
        quote_literal(CATCHUP_PREFIX),
        quote_literal(body)
    ))
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}
