//! Appliers: replay a peer's prepared transaction here and prepare it under
//! the same gid (`ApplyAndPrepare`). Each worker owns one session bound to
//! its own replication origin (`mm_node_<peer>_<k>`: in PostgreSQL 15 one
//! session holds an origin at a time, and parallel workers keep one slow
//! transaction from stalling a peer's stream), runs with
//! `session_replication_role = replica` (triggers and FK checks already ran
//! on the origin, as in PostgreSQL's own apply worker), and waits for row
//! locks a bounded time (see [`lock_wait_ms`]): a waiting applier votes
//! no, which is how two nodes' crossing writes end instead of deadlocking.

use super::hub::Hub;
use super::remote_tx::{replay_statements, Change, RemoteTx, Stmt};
use super::sql::quote_literal;
use futures::SinkExt;
use mm_core::{DbResult, Gid, Input, NodeId};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// The origin applier `k` of `peer`'s transactions binds its session to.
pub fn applier_origin(peer: NodeId, k: usize) -> String {
    format!("mm_node_{peer}_{k}")
}

pub struct ApplyJob {
    pub tx: RemoteTx,
    pub results: UnboundedSender<Input>,
}

#[derive(Clone)]
pub struct ApplierSettings {
    pub conninfo: String,
    pub lock_timeout_ms: u64,
    pub nodes: usize,
    pub node_id: NodeId,
}

/// Run worker `k` for `peer` until the job queue closes.
pub async fn run_applier(
    peer: NodeId,
    k: usize,
    settings: ApplierSettings,
    jobs: async_channel::Receiver<ApplyJob>,
    hub: Arc<Hub>,
) {
    let origin = applier_origin(peer, k);
    let mut client: Option<Client> = None;
    while let Ok(job) = jobs.recv().await {
        let gid = job.tx.gid;
        // The transactions the peer decided before this one must be done
        // here first; if a decision is slow, replay anyway: a row they wrote
        // that is missing makes this one vote no rather than diverge.
        if !job.tx.after.is_empty() {
            let limit = Duration::from_millis(settings.lock_timeout_ms * 4);
            if !hub.wait_finished(&job.tx.after, limit).await {
                tracing::debug!(%gid, "applying before earlier decisions finished");
            }
        }
        let ok = loop {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                // Created if missing: a node added later has no origins on
                // the nodes that were there before it.
                match origin_session(&settings.conninfo, &origin, true).await {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        tracing::warn!(peer, worker = k, "applier cannot connect: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            let c = client.as_ref().expect("connected above");
            match apply(c, &job.tx, &settings, &job.results).await {
                Ok(()) => break true,
                Err(e) if c.is_closed() => {
                    tracing::warn!(%gid, "applier lost its session, retrying: {e}");
                }
                Err(e) => {
                    tracing::info!(%gid, peer, "remote transaction votes no: {e}");
                    let _ = c.simple_query("ROLLBACK").await;
                    break false;
                }
            }
        };
        hub.mark_applied(gid, ok);
        let _ = job
            .results
            .send(Input::Db(DbResult::RemotePrepared { gid, ok }));
    }
}

/// A session that replays remote changes: bound to replication origin
/// `origin` (created first if `create`), as a replica (no triggers, no FK
/// checks: they ran on the origin), allowed to write.
pub async fn origin_session(conninfo: &str, origin: &str, create: bool) -> Result<Client, String> {
    let (client, conn) = tokio_postgres::connect(&super::named(conninfo, origin), NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let name = quote_literal(origin);
    let create = if create {
        format!(
            "SELECT pg_replication_origin_create({name}) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = {name}); "
        )
    } else {
        String::new()
    };
    let setup = format!(
        "SET session_replication_role = replica; SET default_transaction_read_only = off; \
         {create}SELECT pg_replication_origin_session_setup({name})"
    );
    client
        .simple_query(&setup)
        .await
        .map_err(|e| format!("binding to origin {origin}: {}", pg_message(&e)))?;
    Ok(client)
}

/// PostgreSQL's own message (and SQLSTATE) when it sent one.
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

async fn apply(
    c: &Client,
    tx: &RemoteTx,
    s: &ApplierSettings,
    results: &UnboundedSender<Input>,
) -> Result<(), String> {
    let wait = lock_wait_ms(
        s.lock_timeout_ms,
        tx.gid.origin,
        s.node_id,
        s.nodes,
        priority_epoch(),
    );
    let (body, stmts) = replay_body(tx, wait, s.node_id)?;
    // PREPARE in the same round trip as the last chunk; if a row count then
    // shows this node lacks a row, undo the prepared copy and vote no.
    let gid = quote_literal(&tx.gid.to_string());
    let mut told = tokio::time::Instant::now();
    let progress = || {
        if told.elapsed() >= super::receiver::PROGRESS_EVERY {
            told = tokio::time::Instant::now();
            let _ = results.send(Input::RemoteProgress { gid: tx.gid });
        }
    };
    let counts = run_chunks(c, body, &format!("PREPARE TRANSACTION {gid}"), progress)
        .await
        .map_err(|e| pg_message(&e))?;
    if let Err(e) = check_row_counts(&counts, &stmts) {
        let _ = c.simple_query(&format!("ROLLBACK PREPARED {gid}")).await;
        return Err(e);
    }
    Ok(())
}

/// How long an applier here waits for a row lock held by a transaction of
/// this node. Two nodes' crossing writes each wait for the other's lock; with
/// one timeout both would vote no and both abort, again and again on a hot
/// row. So one of the two has priority: applying a transaction of a node
/// that ranks above this one, an applier waits twice the timeout (this
/// node's transaction gives way: the other node votes no on it quickly);
/// of a node ranking below, a tenth. The two nodes of a crossing pair pick
/// opposite waits, and one of the two commits.
///
/// The ranking rotates every [`PRIORITY_PERIOD_S`] seconds of wall-clock
/// time (`epoch`), so under constant contention on one row every node gets
/// its turn to win. Two nodes whose clocks straddle a period boundary may
/// pick the same wait for a moment: then both abort, as without a ranking.
/// Safety never depends on it: any vote no only aborts.
pub fn lock_wait_ms(
    lock_timeout_ms: u64,
    origin: NodeId,
    me: NodeId,
    nodes: usize,
    epoch: u64,
) -> u64 {
    let n = nodes.max(1) as u64;
    let rank = |id: NodeId| (u64::from(id) + n - 1 - epoch % n) % n;
    if rank(origin) < rank(me) {
        lock_timeout_ms.saturating_mul(2)
    } else {
        (lock_timeout_ms / 10).max(20)
    }
}

/// How often the crossing-write ranking rotates (see [`lock_wait_ms`]).
pub const PRIORITY_PERIOD_S: u64 = 2;

/// The current period of the ranking, from the wall clock.
pub fn priority_epoch() -> u64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    secs / PRIORITY_PERIOD_S
}

/// Lock wait of a replayed transaction that holds DDL. Autovacuum, which
/// starts on a freshly loaded table, holds a lock that `CREATE INDEX` and
/// most `ALTER TABLE`s wait for, and yields it only to a waiter of more than
/// `deadlock_timeout` (1 s by default): with the row-level lock wait the
/// peer gave up first and voted no (a 1M-row CREATE INDEX through mmd
/// aborted so in `mm-harness bench --phases bulk`).
pub const DDL_LOCK_TIMEOUT_MS: u64 = 3000;

/// One round of a replay: simple queries, or one `COPY FROM STDIN` with its data.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Sql(String),
    Copy { sql: String, data: Vec<u8> },
}

/// `BEGIN`, the transaction's statements and the `mm.applied_tx` record,
/// ready for `PREPARE TRANSACTION`: statements cut into simple queries of
/// about [`CHUNK_BYTES`] each (one string of a million rows would be parsed
/// whole, every statement's tree held at once), a `COPY` a step of its own;
/// and the statements, for [`check_row_counts`].
pub fn replay_body(
    tx: &RemoteTx,
    lock_timeout_ms: u64,
    node_id: NodeId,
) -> Result<(Vec<Step>, Vec<Stmt>), String> {
    let ddl = tx.changes.iter().any(|ch| matches!(ch, Change::Ddl { .. }));
    let lock_timeout_ms = if ddl {
        lock_timeout_ms.max(DDL_LOCK_TIMEOUT_MS)
    } else {
        lock_timeout_ms
    };
    let mut stmts = replay_statements(&tx.changes).map_err(|e| e.to_string())?;
    let mut steps = Vec::new();
    let mut sql = format!("BEGIN; SET LOCAL lock_timeout = '{lock_timeout_ms}ms'");
    for st in &mut stmts {
        if let Some(data) = st.copy_data.take() {
            if !sql.is_empty() {
                steps.push(Step::Sql(std::mem::take(&mut sql)));
            }
            steps.push(Step::Copy {
                sql: st.sql.clone(),
                data,
            });
            continue;
        }
        if sql.len() >= CHUNK_BYTES {
            steps.push(Step::Sql(std::mem::take(&mut sql)));
        } else if !sql.is_empty() {
            sql.push_str(";\n");
        }
        sql.push_str(&st.sql);
    }
    if ddl {
        if !sql.is_empty() {
            sql.push_str(";\n");
        }
        sql.push_str(&format!(
            "SELECT mm.adjust_sequences({}, {node_id})",
            crate::config::SEQUENCE_STRIDE
        ));
    }
    if !sql.is_empty() {
        sql.push_str(";\n");
    }
    sql.push_str(&record_applied(tx.gid));
    steps.push(Step::Sql(sql));
    Ok((steps, stmts))
}

/// Size of one simple query of a replay.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Data per CopyData message of a replay's `COPY`.
const COPY_SEND_BYTES: usize = 256 * 1024;

/// Runs the steps of [`replay_body`], `last` appended to the final one
/// (the `PREPARE`), and returns the row count of every statement, in
/// order; `progress` is called after each step.
pub async fn run_chunks(
    c: &Client,
    mut steps: Vec<Step>,
    last: &str,
    mut progress: impl FnMut(),
) -> Result<Vec<u64>, tokio_postgres::Error> {
    if let Some(Step::Sql(end)) = steps.last_mut() {
        end.push_str(";\n");
        end.push_str(last);
    }
    let mut counts = Vec::new();
    for step in steps {
        match step {
            Step::Sql(sql) => {
                for m in c.simple_query(&sql).await? {
                    if let SimpleQueryMessage::CommandComplete(n) = m {
                        counts.push(n);
                    }
                }
            }
            Step::Copy { sql, data } => {
                let sink = c.copy_in::<_, bytes::Bytes>(sql.as_str()).await?;
                let mut sink = std::pin::pin!(sink);
                let data = bytes::Bytes::from(data);
                let mut at = 0;
                while at < data.len() {
                    let end = (at + COPY_SEND_BYTES).min(data.len());
                    sink.send(data.slice(at..end)).await?;
                    at = end;
                }
                counts.push(sink.as_mut().finish().await?);
            }
        }
        progress();
    }
    Ok(counts)
}

/// Every row change must have touched exactly the rows it did on the
/// origin; otherwise this node lacks a row.
pub fn check_row_counts(counts: &[u64], stmts: &[Stmt]) -> Result<(), String> {
    // counts: BEGIN, SET, then one per statement.
    for (i, st) in stmts.iter().enumerate() {
        let got = counts.get(i + 2).copied();
        if let Some(want) = st.expect_rows {
            if got != Some(want) {
                return Err(format!(
                    "{} changed {} rows here, {want} on the origin: this node lacks the row",
                    st.sql
                        .split(" WHERE ")
                        .next()
                        .unwrap_or(&st.sql)
                        .split(" VALUES ")
                        .next()
                        .unwrap_or(&st.sql),
                    got.map_or("no".to_string(), |n| n.to_string())
                ));
            }
        }
    }
    Ok(())
}

/// The statement that records `gid` as applied here, inside its transaction.
fn record_applied(gid: Gid) -> String {
    format!(
        "INSERT INTO mm.applied_tx (gid, gen) VALUES ({}, {})",
        quote_literal(&gid.to_string()),
        gid.gen
    )
}

#[cfg(test)]
mod tests {
    use super::lock_wait_ms;

    #[test]
    fn the_two_ends_of_a_crossing_pair_wait_differently() {
        for epoch in 0..6 {
            for (a, b) in [(1, 2), (2, 3), (1, 3)] {
                let on_b = lock_wait_ms(500, a, b, 3, epoch); // b applies a's
                let on_a = lock_wait_ms(500, b, a, 3, epoch);
                assert!(
                    (on_b == 1000 && on_a == 50) || (on_b == 50 && on_a == 1000),
                    "epoch {epoch}, nodes {a} and {b}: {on_b} and {on_a}"
                );
            }
        }
        assert_eq!(lock_wait_ms(50, 3, 2, 3, 0), 20);
    }

    #[test]
    fn every_node_ranks_first_in_some_period() {
        for me in 1..=3u8 {
            let wins = (0..3u64).any(|epoch| {
                (1..=3u8)
                    .filter(|&o| o != me)
                    .all(|o| lock_wait_ms(500, me, o, 3, epoch) == 1000)
            });
            assert!(wins, "node {me} never has priority");
        }
    }
}
