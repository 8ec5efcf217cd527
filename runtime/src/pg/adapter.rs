//! The PostgreSQL storage adapter: the [`Storage`] trait `mmd`'s driver
//! runs on. Durable protocol state goes to mmd's state log ([`StateLog`],
//! found through and imported once from the `mm` schema, [`StateStore`]);
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
use crate::state_log::StateLog;
use crate::storage::{Loaded, Storage, StorageError};
use mm_core::{DbCmd, DbResult, DurableOp, Input, NodeId};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::NoTls;

pub struct PgStorage {
    state: StateStore,
    state_dir: std::path::PathBuf,
    /// Open once [`Storage::load`] has run.
    log: Option<StateLog>,
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
            state_dir: cfg.state_dir.clone(),
            log: None,
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

impl PgStorage {
    /// Opens the state log, checking it belongs with this database: a
    /// database that says its state is in a log that is not there, or a log
    /// holding a node's state beside a database that never had one, would
    /// otherwise start as a fresh node and forget its promises.
    async fn open_log(&mut self) -> Result<Option<mm_core::DurableState>, StorageError> {
        let dir = self.state_dir.clone();
        let shown = dir.display().to_string();
        let marker = self.state.state_log_marker().await?;
        let present = StateLog::exists(&dir);
        if let (false, Some(m)) = (present, &marker) {
            return Err(StorageError::Db(format!(
                "this node's protocol state was kept in the state log {m}, and there is \
                 none at {shown}: restore that directory (or set [state] dir to it); to \
                 start the node anew, give it a new database and run `mmctl add-node`"
            )));
        }
        let (mut log, state) = StateLog::open(&dir)?;
        if marker.is_none() {
            if state.is_some() {
                return Err(StorageError::Db(format!(
                    "the state log at {shown} holds a node's state, but this database has \
                     never used one (mm.state_log is empty): it belongs to another database"
                )));
            }
            // First start with a log: bring over the state an older mmd kept in tables.
            let imported = match self.state.load().await? {
                Loaded::Existing { durable, .. } => {
                    log.import(&durable).await?;
                    tracing::info!(dir = %shown, "imported the protocol state from mm.tx_state");
                    Some(durable)
                }
                Loaded::Fresh => None,
            };
            self.state.set_state_log_marker(&shown).await?;
            self.log = Some(log);
            return Ok(imported);
        }
        self.log = Some(log);
        Ok(state)
    }

    fn log(&mut self) -> Result<&mut StateLog, StorageError> {
        self.log
            .as_mut()
            .ok_or_else(|| StorageError::Db("the state log is not open yet".into()))
    }
}

impl Storage for PgStorage {
    async fn load(&mut self) -> Result<Loaded, StorageError> {
        let state = self.open_log().await?;
        let loaded = match state {
            None => Loaded::Fresh,
            Some(durable) => Loaded::Existing {
                durable,
                prepared: self.state.prepared_gids().await?,
            },
        };
        if let Loaded::Existing { durable, .. } = &loaded {
            self.hub.set_last_online_gen(durable.last_online_gen);
        }
        Ok(loaded)
    }

    async fn persist(&mut self, op: &DurableOp) -> Result<(), StorageError> {
        self.persist_batch(std::slice::from_ref(op)).await
    }

    async fn persist_batch(&mut self, ops: &[DurableOp]) -> Result<(), StorageError> {
        self.log()?.append(ops).await?;
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
