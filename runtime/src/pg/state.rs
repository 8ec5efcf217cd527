//! The `mm` schema of the local database, and the durable protocol state as
//! it was kept there before mmd's own state log (`crate::state_log`): mmd
//! reads `node_state`/`tx_state` once, to import them into a new log, and
//! `mm.state_log` records where the log is. [`StateStore::persist`] still
//! writes that older form (tests build the states an import must read).
//!
//! Schema (created by [`StateStore::init_schema`], idempotent):
//!
//! ```sql
//! mm.node_state(singleton bool primary key default true check (singleton),
//!               boot bigint, promised_gen bigint, gen_num bigint,
//!               gen_members bigint, gen_donors bigint, last_online_gen bigint)
//! mm.tx_state(gid text primary key,
//!             promised_round bigint, promised_node int,
//!             accepted_round bigint, accepted_node int, accepted_commit bool,
//!             decided bool)
//! ```
//!
//! Why this shape:
//! - One column per field rather than a serialized blob: every
//!   [`DurableOp`] becomes one autocommitted upsert touching only its own
//!   fields, so it is durable when the statement returns (with the default
//!   `synchronous_commit = on`) and never rewrites unrelated state. The state
//!   stays readable with `psql` when debugging a node.
//! - `node_state` is a single row (the `singleton` key). Its columns are
//!   nullable because the driver makes a fresh node's bootstrap state durable
//!   as four ops (`Boot`, `AdoptGen`, `PromiseGen`, `LastOnline`) before the
//!   node says anything: a row with a NULL left is a bootstrap that crashed
//!   half way, and loads as [`Loaded::Fresh`].
//! - `PromiseGen`/`LastOnline` keep the maximum in SQL (`greatest`), exactly
//!   as [`mm_core::DurableState::apply`] does, so the stored state is always
//!   the in-memory state after the same ops.
//! - Unsigned protocol integers (`u32` boot, rounds and node sets as
//!   bitmasks, `u64` generations) are stored as `bigint`: every `u32` fits;
//!   a `u64` above `i64::MAX` is refused with an error rather than wrapped.
//! - `tx_state` is keyed by the gid's text form (the same string as in
//!   `PREPARE TRANSACTION`), so it joins with `pg_prepared_xacts.gid`.
//!   `NULL` means `None`; the three `accepted_*` columns are NULL together
//!   (a CHECK enforces it).

use std::time::Duration;

use mm_core::{Ballot, DurableOp, DurableState, Generation, Gid, NodeId, NodeSet, TxRecord};
use std::collections::BTreeMap;
use tokio_postgres::{Client, NoTls, Row, Statement};

use super::db_error;
use crate::storage::{Loaded, StorageError};

/// The schema, in one implicit transaction (`batch_execute` sends it as one
/// simple query): either all of it exists afterwards or none of it changed.
const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS mm;
CREATE TABLE IF NOT EXISTS mm.node_state (
    singleton bool PRIMARY KEY DEFAULT true CHECK (singleton),
    boot bigint,
    promised_gen bigint,
    gen_num bigint,
    gen_members bigint,
    gen_donors bigint,
    last_online_gen bigint
);
-- Every mm transaction this database holds, written inside it (by the
-- origin, an applier or a replay): a replay skips one that is already here,
-- and a resynced node's copy of it says what the copy holds.
CREATE TABLE IF NOT EXISTS mm.applied_tx (
    gid text PRIMARY KEY,
    gen bigint NOT NULL
);
-- Set by `mmctl add-node`: replace this database with a donor's snapshot
-- before streaming anything; the copy deletes it in its own transaction.
CREATE TABLE IF NOT EXISTS mm.resync_request (
    singleton bool PRIMARY KEY DEFAULT true CHECK (singleton),
    reason text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now()
);
-- Where this node's protocol state lives (crate::state_log): a database
-- whose state log is missing, or a log beside the wrong database, is
-- refused at start instead of being taken for a fresh node.
CREATE TABLE IF NOT EXISTS mm.state_log (
    singleton bool PRIMARY KEY DEFAULT true CHECK (singleton),
    dir text NOT NULL
);
-- Before the state log: read once, to import it (crate::pg::adapter).
CREATE TABLE IF NOT EXISTS mm.tx_state (
    gid text PRIMARY KEY,
    promised_round bigint,
    promised_node int,
    accepted_round bigint,
    accepted_node int,
    accepted_commit bool,
    decided bool,
    CHECK ((promised_round IS NULL) = (promised_node IS NULL)),
    CHECK ((accepted_round IS NULL) = (accepted_node IS NULL)
       AND (accepted_node IS NULL) = (accepted_commit IS NULL))
);
";

const UPSERT_BOOT: &str = "INSERT INTO mm.node_state (singleton, boot) VALUES (true, $1) \
     ON CONFLICT (singleton) DO UPDATE SET boot = EXCLUDED.boot";
const UPSERT_PROMISE: &str =
    "INSERT INTO mm.node_state (singleton, promised_gen) VALUES (true, $1) \
     ON CONFLICT (singleton) DO UPDATE \
     SET promised_gen = greatest(mm.node_state.promised_gen, EXCLUDED.promised_gen)";
const UPSERT_ADOPT: &str = "INSERT INTO mm.node_state \
     (singleton, promised_gen, gen_num, gen_members, gen_donors) VALUES (true, $1, $1, $2, $3) \
     ON CONFLICT (singleton) DO UPDATE SET \
     promised_gen = greatest(mm.node_state.promised_gen, EXCLUDED.promised_gen), \
     gen_num = EXCLUDED.gen_num, gen_members = EXCLUDED.gen_members, \
     gen_donors = EXCLUDED.gen_donors";
const UPSERT_LAST_ONLINE: &str = "INSERT INTO mm.node_state (singleton, last_online_gen) \
     VALUES (true, $1) ON CONFLICT (singleton) DO UPDATE \
     SET last_online_gen = greatest(mm.node_state.last_online_gen, EXCLUDED.last_online_gen)";
const UPSERT_TX: &str = "INSERT INTO mm.tx_state (gid, promised_round, promised_node, \
     accepted_round, accepted_node, accepted_commit, decided) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (gid) DO UPDATE SET \
     promised_round = EXCLUDED.promised_round, promised_node = EXCLUDED.promised_node, \
     accepted_round = EXCLUDED.accepted_round, accepted_node = EXCLUDED.accepted_node, \
     accepted_commit = EXCLUDED.accepted_commit, decided = EXCLUDED.decided";

const SELECT_NODE: &str = "SELECT boot, promised_gen, gen_num, gen_members, gen_donors, \
     last_online_gen FROM mm.node_state";
const SELECT_TXS: &str = "SELECT gid, promised_round, promised_node, accepted_round, \
     accepted_node, accepted_commit, decided FROM mm.tx_state ORDER BY gid";
const SELECT_PREPARED: &str =
    "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid";

/// Used when the connection string sets no `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The statements of [`StateStore::persist`], prepared once per connection
/// (after the schema exists).
struct Prepared {
    boot: Statement,
    promise: Statement,
    adopt: Statement,
    last_online: Statement,
    tx: Statement,
}

/// The node's durable protocol state in PostgreSQL (see the module docs for
/// the schema). One connection, no automatic reconnect: once it is lost every
/// call fails with a [`StorageError`], and the owner decides what to do
/// (the driver stops; a restarted node loads the state again).
pub struct StateStore {
    client: Client,
    stmts: Option<Prepared>,
}

impl StateStore {
    /// Connects (no TLS: the database is local) and spawns the connection task.
    pub async fn connect(conninfo: &str) -> Result<StateStore, StorageError> {
        let mut cfg: tokio_postgres::Config = conninfo
            .parse()
            .map_err(|e| db_error("invalid connection string", &e))?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("mmd state");
        }
        let (client, conn) = cfg
            .connect(NoTls)
            .await
            .map_err(|e| db_error("connecting to the local database", &e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!("state store connection ended: {e}");
            }
        });
        Ok(StateStore {
            client,
            stmts: None,
        })
    }

    /// Creates the `mm` schema and its tables if missing. Idempotent.
    pub async fn init_schema(&mut self) -> Result<(), StorageError> {
        self.client
            .batch_execute(SCHEMA)
            .await
            .map_err(|e| db_error("creating the mm schema", &e))
    }

    /// Makes `op` durable: one autocommitted statement, so it is on disk
    /// when this returns (`synchronous_commit = on`, the default).
    pub async fn persist(&mut self, op: &DurableOp) -> Result<(), StorageError> {
        self.persist_batch(std::slice::from_ref(op)).await
    }

    /// Makes all of `ops` durable in one transaction, its statements
    /// pipelined: one commit (one WAL flush) for a whole round of the driver.
    pub async fn persist_batch(&mut self, ops: &[DurableOp]) -> Result<(), StorageError> {
        if ops.is_empty() {
            return Ok(());
        }
        if self.stmts.is_none() {
            self.stmts = Some(self.prepare().await?);
        }
        let s = self.stmts.as_ref().expect("prepared above");
        if ops.len() == 1 {
            return execute_op(&self.client, s, &ops[0]).await;
        }
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| db_error("beginning a state batch", &e))?;
        let all = futures::future::join_all(ops.iter().map(|op| execute_op(&tx, s, op))).await;
        for r in all {
            r?;
        }
        tx.commit()
            .await
            .map_err(|e| db_error("committing a state batch", &e))
    }

    /// What this node finds when it starts: [`Loaded::Fresh`] if it never
    /// completed its bootstrap, else its durable state and the mm gids the
    /// database holds prepared (gids of other tools are ignored).
    pub async fn load(&mut self) -> Result<Loaded, StorageError> {
        let rows = self
            .client
            .query(SELECT_NODE, &[])
            .await
            .map_err(|e| db_error("loading mm.node_state", &e))?;
        let Some(row) = rows.first() else {
            return Ok(Loaded::Fresh);
        };
        let Some(mut durable) = decode_node(row)? else {
            tracing::info!("mm.node_state holds an unfinished bootstrap: starting fresh");
            return Ok(Loaded::Fresh);
        };
        let txs = self
            .client
            .query(SELECT_TXS, &[])
            .await
            .map_err(|e| db_error("loading mm.tx_state", &e))?;
        for row in &txs {
            let (gid, rec) = decode_tx(row)?;
            durable.txs.insert(gid, rec);
        }
        let prepared = self.prepared_gids().await?;
        Ok(Loaded::Existing { durable, prepared })
    }

    /// The directory of this node's state log, if it has one.
    pub async fn state_log_marker(&self) -> Result<Option<String>, StorageError> {
        self.client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS mm.state_log (\
                 singleton bool PRIMARY KEY DEFAULT true CHECK (singleton), dir text NOT NULL)",
            )
            .await
            .map_err(|e| db_error("creating mm.state_log", &e))?;
        let row = self
            .client
            .query_opt("SELECT dir FROM mm.state_log", &[])
            .await
            .map_err(|e| db_error("reading mm.state_log", &e))?;
        row.map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| db_error("reading mm.state_log.dir", &e))
    }

    /// Records that the state now lives in the log at `dir`, and empties the
    /// tables it was kept in before, in one transaction.
    pub async fn set_state_log_marker(&mut self, dir: &str) -> Result<(), StorageError> {
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| db_error("beginning the state log marker", &e))?;
        tx.execute(
            "INSERT INTO mm.state_log (singleton, dir) VALUES (true, $1) \
             ON CONFLICT (singleton) DO UPDATE SET dir = EXCLUDED.dir",
            &[&dir],
        )
        .await
        .map_err(|e| db_error("writing mm.state_log", &e))?;
        tx.batch_execute("DELETE FROM mm.node_state; DELETE FROM mm.tx_state")
            .await
            .map_err(|e| db_error("emptying mm.node_state and mm.tx_state", &e))?;
        tx.commit()
            .await
            .map_err(|e| db_error("committing the state log marker", &e))
    }

    /// The mm gids of the transactions prepared in this database.
    pub async fn prepared_gids(&self) -> Result<Vec<Gid>, StorageError> {
        let rows = self
            .client
            .query(SELECT_PREPARED, &[])
            .await
            .map_err(|e| db_error("listing pg_prepared_xacts", &e))?;
        let mut gids = Vec::new();
        for row in &rows {
            let text: String = row
                .try_get(0)
                .map_err(|e| db_error("reading pg_prepared_xacts.gid", &e))?;
            match text.parse::<Gid>() {
                Ok(g) => gids.push(g),
                Err(e) => tracing::debug!("ignoring prepared transaction: {e}"),
            }
        }
        Ok(gids)
    }

    async fn prepare(&self) -> Result<Prepared, StorageError> {
        let p = |sql: &'static str| async move {
            self.client
                .prepare(sql)
                .await
                .map_err(|e| db_error("preparing the state statements", &e))
        };
        Ok(Prepared {
            boot: p(UPSERT_BOOT).await?,
            promise: p(UPSERT_PROMISE).await?,
            adopt: p(UPSERT_ADOPT).await?,
            last_online: p(UPSERT_LAST_ONLINE).await?,
            tx: p(UPSERT_TX).await?,
        })
    }
}

fn to_i64(v: u64, what: &str) -> Result<i64, StorageError> {
    i64::try_from(v).map_err(|_| StorageError::Db(format!("{what} {v} does not fit in a bigint")))
}

fn bad_row(what: &str, why: impl std::fmt::Display) -> StorageError {
    StorageError::Db(format!("undecodable {what}: {why}"))
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    col: &str,
    what: &str,
) -> Result<T, StorageError> {
    row.try_get(col)
        .map_err(|e| bad_row(what, format_args!("column {col}: {e}")))
}

fn u32_of(v: i64, col: &str, what: &str) -> Result<u32, StorageError> {
    u32::try_from(v).map_err(|_| bad_row(what, format_args!("{col} = {v} is out of range")))
}

fn u64_of(v: i64, col: &str, what: &str) -> Result<u64, StorageError> {
    u64::try_from(v).map_err(|_| bad_row(what, format_args!("{col} = {v} is out of range")))
}

fn node_of(v: i32, col: &str, what: &str) -> Result<NodeId, StorageError> {
    NodeId::try_from(v).map_err(|_| bad_row(what, format_args!("{col} = {v} is out of range")))
}

/// The node row as a state without transactions; `None` if a field is still
/// NULL (an unfinished bootstrap).
fn decode_node(row: &Row) -> Result<Option<DurableState>, StorageError> {
    const W: &str = "mm.node_state row";
    let boot: Option<i64> = get(row, "boot", W)?;
    let promised: Option<i64> = get(row, "promised_gen", W)?;
    let num: Option<i64> = get(row, "gen_num", W)?;
    let members: Option<i64> = get(row, "gen_members", W)?;
    let donors: Option<i64> = get(row, "gen_donors", W)?;
    let last_online: Option<i64> = get(row, "last_online_gen", W)?;
    let (Some(boot), Some(promised), Some(num), Some(members), Some(donors), Some(last_online)) =
        (boot, promised, num, members, donors, last_online)
    else {
        return Ok(None);
    };
    Ok(Some(DurableState {
        boot: u32_of(boot, "boot", W)?,
        promised_gen: u64_of(promised, "promised_gen", W)?,
        gen: Generation {
            num: u64_of(num, "gen_num", W)?,
            members: NodeSet(u32_of(members, "gen_members", W)?),
            donors: NodeSet(u32_of(donors, "gen_donors", W)?),
        },
        last_online_gen: u64_of(last_online, "last_online_gen", W)?,
        txs: BTreeMap::new(),
    }))
}

fn decode_tx(row: &Row) -> Result<(Gid, TxRecord), StorageError> {
    let text: String = get(row, "gid", "mm.tx_state row")?;
    let w = format!("mm.tx_state row of gid {text:?}");
    let w = w.as_str();
    let gid: Gid = text.parse().map_err(|e| bad_row(w, e))?;
    let ballot = |round: Option<i64>, node: Option<i32>, rc: &str, nc: &str| match (round, node) {
        (None, None) => Ok(None),
        (Some(r), Some(n)) => Ok(Some(Ballot {
            round: u32_of(r, rc, w)?,
            node: node_of(n, nc, w)?,
        })),
        _ => Err(bad_row(
            w,
            format_args!("{rc} and {nc} must be NULL together"),
        )),
    };
    let promised = ballot(
        get(row, "promised_round", w)?,
        get(row, "promised_node", w)?,
        "promised_round",
        "promised_node",
    )?;
    let accepted_ballot = ballot(
        get(row, "accepted_round", w)?,
        get(row, "accepted_node", w)?,
        "accepted_round",
        "accepted_node",
    )?;
    let accepted_commit: Option<bool> = get(row, "accepted_commit", w)?;
    let accepted = match (accepted_ballot, accepted_commit) {
        (None, None) => None,
        (Some(b), Some(v)) => Some((b, v)),
        _ => {
            return Err(bad_row(
                w,
                "accepted ballot and accepted_commit must be NULL together",
            ))
        }
    };
    let decided: Option<bool> = get(row, "decided", w)?;
    Ok((
        gid,
        TxRecord {
            promised,
            accepted,
            decided,
        },
    ))
}

/// One state change as one statement.
async fn execute_op(
    c: &impl tokio_postgres::GenericClient,
    s: &Prepared,
    op: &DurableOp,
) -> Result<(), StorageError> {
    let what = || format!("persisting {op:?}");
    let res = match op {
        DurableOp::Boot(b) => c.execute(&s.boot, &[&i64::from(*b)]).await,
        DurableOp::PromiseGen(n) => {
            let n = to_i64(*n, "promised generation")?;
            c.execute(&s.promise, &[&n]).await
        }
        DurableOp::AdoptGen(g) => {
            let num = to_i64(g.num, "generation")?;
            let members = i64::from(g.members.0);
            let donors = i64::from(g.donors.0);
            c.execute(&s.adopt, &[&num, &members, &donors]).await
        }
        DurableOp::LastOnline(n) => {
            let n = to_i64(*n, "last online generation")?;
            c.execute(&s.last_online, &[&n]).await
        }
        DurableOp::Tx(gid, rec) => {
            let gid = gid.to_string();
            let p_round = rec.promised.map(|b| i64::from(b.round));
            let p_node = rec.promised.map(|b| i32::from(b.node));
            let a_round = rec.accepted.map(|(b, _)| i64::from(b.round));
            let a_node = rec.accepted.map(|(b, _)| i32::from(b.node));
            let a_commit = rec.accepted.map(|(_, v)| v);
            c.execute(
                &s.tx,
                &[
                    &gid,
                    &p_round,
                    &p_node,
                    &a_round,
                    &a_node,
                    &a_commit,
                    &rec.decided,
                ],
            )
            .await
        }
    };
    res.map(|_| ()).map_err(|e| db_error(&what(), &e))
}
