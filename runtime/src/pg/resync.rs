//! Resync: a node whose slot on a peer was invalidated (the peer removed
//! WAL the node had not read, `max_slot_wal_keep_size`) cannot learn from
//! that stream what it missed. It replaces its whole database with a
//! consistent snapshot of an online donor, then catches up as usual.
//!
//! The snapshot is the one the donor exports when it creates this node's
//! slot again (`CREATE_REPLICATION_SLOT … SNAPSHOT 'export'`), as
//! PostgreSQL's own table sync does: every transaction the donor committed
//! before the slot's consistent point is in the copy, every later one is in
//! the new stream. A transaction of another peer is in the copy or in the
//! donor's stream as an echo; the copy also takes the donor's
//! `mm.applied_tx`, so a replay from any stream skips what the copy holds.
//! Lost slots on the other peers are created again before the snapshot, so
//! their streams start no later than it.
//!
//! The copy is one local transaction: schema from `pg_dump --schema-only`
//! (the well-kept tool for exactly this; it reads the same snapshot), rows by
//! `COPY … (FORMAT binary)`. If anything fails, this node's database is as
//! it was and the resync is tried again. It runs only while the node is in
//! `catchup` (not a member, so nothing is applied here) with no prepared
//! transaction left, and with every receiver stopped.

use super::applier::{origin_session, pg_message};
use super::hub::Hub;
use super::init::slot_for;
use super::replication::conn::ReplicationClient;
use super::sql::{qualified, quote_ident, quote_literal};
use crate::driver::DriverHandle;
use futures::{SinkExt, StreamExt};
use mm_core::{NodeId, NodeStatus};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

/// Schemas that are never copied: PostgreSQL's and mm's own.
const OWN_SCHEMAS: &str = "('mm', 'mtm', 'information_schema')";

pub struct ResyncSettings {
    pub me: NodeId,
    pub local_conninfo: String,
    pub peers: Vec<(NodeId, String)>,
    pub pg_dump: PathBuf,
}

/// Whether `mmctl add-node` asked for an initial copy (`mm.resync_request`).
pub async fn initial_copy_requested(conninfo: &str) -> Result<Option<String>, String> {
    let c = connect(conninfo).await?;
    let row = c
        .query_opt("select reason from mm.resync_request", &[])
        .await
        .map_err(|e| pg_message(&e))?;
    Ok(row.map(|r| r.get(0)))
}

/// `pg_dump` of the PostgreSQL 15 install, else the one on `PATH`.
pub fn find_pg_dump() -> PathBuf {
    let debian = PathBuf::from("/usr/lib/postgresql/15/bin/pg_dump");
    if debian.exists() {
        debian
    } else {
        PathBuf::from("pg_dump")
    }
}

/// What a resync did, for the log and `mtm.status()`.
struct Report {
    donor: NodeId,
    tables: usize,
    rows: u64,
    slots_recreated: Vec<NodeId>,
}

/// Wait for receivers to ask for a resync, then run it (retrying) whenever
/// the node is in `catchup`.
pub async fn run_resync(s: ResyncSettings, hub: Arc<Hub>, driver: DriverHandle) {
    let mut status = driver.watch();
    let mut attempt = 0usize;
    loop {
        hub.resync_requested().await;
        // A `recovery` member cannot catch up without the lost stream, and
        // it must not be resynced while a member: it goes silent until the
        // others vote it out (found by T2, `--slot-loss every-crash`).
        let st = loop {
            let st = status.borrow_and_update().status;
            match st {
                NodeStatus::Catchup | NodeStatus::Online => break st,
                NodeStatus::Recovery => driver.silence(true).await,
                NodeStatus::Isolated => {}
            }
            if status.changed().await.is_err() {
                return; // the driver stopped
            }
        };
        driver.silence(false).await;
        if st == NodeStatus::Online && !hub.held() {
            // Online, this node holds every committed transaction (each
            // needed its vote), so a slot lost on a peer only needs making
            // again where the peer is now: what it prepared meanwhile
            // aborts for want of this node's vote.
            let mut made = Vec::new();
            for (peer, conninfo) in &s.peers {
                if let Ok(true) = make_slot(s.me, conninfo, true).await {
                    made.push(*peer);
                }
            }
            if !made.is_empty() {
                tracing::warn!(
                    "this node is online, so it holds every committed transaction: its lost \
                     slots on nodes {made:?} were created again at their current position"
                );
                hub.set_resync_note(format!(
                    "not needed at {}: online, lost slots on nodes {made:?} created again",
                    utc_clock()
                ));
                hub.set_resyncing(false, true);
                continue;
            }
        }
        // A member holds what its generation committed; only a node out of
        // the generation may have its database replaced.
        if status
            .wait_for(|st| st.status == NodeStatus::Catchup)
            .await
            .is_err()
        {
            return; // the driver stopped
        }
        hub.set_resync_note(format!("in progress since {}", utc_clock()));
        let t = Instant::now();
        hub.set_resyncing(true, false);
        let r = resync_once(&s, &hub, attempt).await;
        attempt += 1;
        match r {
            Ok(rep) => {
                let secs = t.elapsed().as_secs_f64();
                tracing::warn!(
                    donor = rep.donor,
                    tables = rep.tables,
                    rows = rep.rows,
                    slots_recreated = ?rep.slots_recreated,
                    "resync done: this node's database was replaced by a snapshot of node {} \
                     ({} tables, {} rows, {secs:.1} s); catching up from its stream",
                    rep.donor,
                    rep.tables,
                    rep.rows
                );
                hub.set_resync_note(format!(
                    "done at {} from node {}: {} tables, {} rows in {secs:.1} s",
                    utc_clock(),
                    rep.donor,
                    rep.tables,
                    rep.rows
                ));
                hub.set_resyncing(false, true);
            }
            Err(e) => {
                tracing::warn!(
                    "resync failed, retrying in 5 s (this node's database is unchanged): {e}"
                );
                hub.set_resync_note(format!("failed at {}: {e}", utc_clock()));
                hub.set_resyncing(false, false);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// `HH:MM:SS` UTC; the log lines carry the full time.
fn utc_clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{:02}:{:02}:{:02} UTC",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

async fn connect(conninfo: &str) -> Result<Client, String> {
    let (c, conn) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

async fn resync_once(s: &ResyncSettings, hub: &Hub, attempt: usize) -> Result<Report, String> {
    // Receivers stop at their next step; a replay under way finishes first.
    let t = Instant::now();
    while !hub.receivers_up().is_empty() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "receivers from {:?} did not stop within 30 s",
                hub.receivers_up()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let local = connect(&s.local_conninfo)
        .await
        .map_err(|e| format!("connecting to this node's PostgreSQL: {e}"))?;
    // A prepared transaction here would commit over the copied rows.
    let prepared: i64 = local
        .query_one(
            "select count(*) from pg_prepared_xacts where database = current_database()",
            &[],
        )
        .await
        .map_err(|e| pg_message(&e))?
        .get(0);
    if prepared > 0 {
        return Err(format!(
            "{prepared} prepared transactions here are not settled yet"
        ));
    }

    let donor = pick_donor(s, attempt).await?;
    let donor_conninfo = &s.peers.iter().find(|(p, _)| *p == donor).expect("a peer").1;

    // Lost slots on the other peers first: their streams must start no
    // later than the donor's snapshot.
    let mut recreated = Vec::new();
    for (peer, conninfo) in s.peers.iter().filter(|(p, _)| *p != donor) {
        match make_slot(s.me, conninfo, true).await {
            Ok(true) => recreated.push(*peer),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                peer,
                "resync: cannot check this node's slot on node {peer} ({e}); if it was lost \
                 too, a later resync repairs it"
            ),
        }
    }

    let mut repl = ReplicationClient::connect(donor_conninfo)
        .await
        .map_err(|e| format!("replication connection to node {donor}: {e}"))?;
    let slot = slot_for(s.me);
    let exists = repl
        .simple_query(&format!(
            "select 1 from pg_replication_slots where slot_name = {}",
            quote_literal(&slot)
        ))
        .await
        .map_err(|e| format!("reading slots on node {donor}: {e}"))?;
    if !exists.is_empty() {
        repl.drop_slot(&slot, true)
            .await
            .map_err(|e| format!("dropping {slot} on node {donor}: {e}"))?;
    }
    // This waits for every transaction running on the donor to end,
    // prepared ones included (PostgreSQL's snapshot builder), so one the
    // donor holds prepared and later commits is in the snapshot. T2 models
    // this wait; without it a resync loses such a commit (sim/src/turmoil/slot_loss.rs).
    let info = repl
        .create_slot_exporting(&slot, true)
        .await
        .map_err(|e| format!("creating {slot} on node {donor}: {e}"))?;
    recreated.push(donor);
    let snapshot = info.snapshot.expect("checked by create_slot_exporting");
    tracing::info!(
        donor,
        %snapshot,
        consistent_point = %info.consistent_point,
        "resync: slot {slot} created on node {donor}, copying its snapshot"
    );

    let (tables, rows) = copy_snapshot(s, donor, donor_conninfo, &snapshot).await?;
    // The snapshot is released with the connection that exported it.
    drop(repl);
    Ok(Report {
        donor,
        tables,
        rows,
        slots_recreated: recreated,
    })
}

/// An online peer (its `mtm.status()`), rotating with the attempts.
async fn pick_donor(s: &ResyncSettings, attempt: usize) -> Result<NodeId, String> {
    let n = s.peers.len();
    let mut why = Vec::new();
    for i in 0..n {
        let (peer, conninfo) = &s.peers[(attempt + i) % n];
        let status = async {
            let c = connect(conninfo).await?;
            let r = c
                .query_opt("select status from mtm.status()", &[])
                .await
                .map_err(|e| pg_message(&e))?;
            Ok::<_, String>(r.map(|r| r.get::<_, String>(0)))
        };
        match tokio::time::timeout(Duration::from_secs(5), status).await {
            Ok(Ok(Some(st))) if st == "online" => return Ok(*peer),
            Ok(Ok(st)) => why.push(format!("node {peer} is {}", st.as_deref().unwrap_or("?"))),
            Ok(Err(e)) => why.push(format!("node {peer}: {e}")),
            Err(_) => why.push(format!("node {peer}: no answer in 5 s")),
        }
    }
    Err(format!("no online donor ({})", why.join("; ")))
}

/// Create this node's slot on a peer if it is missing or, with
/// `replace_lost`, if it was invalidated; true if it did.
pub(crate) async fn make_slot(
    me: NodeId,
    conninfo: &str,
    replace_lost: bool,
) -> Result<bool, String> {
    let slot = slot_for(me);
    let mut repl = ReplicationClient::connect(conninfo)
        .await
        .map_err(|e| e.to_string())?;
    let rows = repl
        .simple_query(&format!(
            "select coalesce(wal_status, '') from pg_replication_slots where slot_name = {}",
            quote_literal(&slot)
        ))
        .await
        .map_err(|e| e.to_string())?;
    match rows.first() {
        None => {}
        Some(r) if replace_lost && r.first().cloned().flatten().as_deref() == Some("lost") => repl
            .drop_slot(&slot, true)
            .await
            .map_err(|e| e.to_string())?,
        Some(_) => return Ok(false),
    }
    repl.create_slot(&slot, true)
        .await
        .map_err(|e| e.to_string())?;
    Ok(true)
}

/// Replace this node's user schemas and rows with the donor's snapshot, in
/// one local transaction. Returns (tables, rows) copied.
async fn copy_snapshot(
    s: &ResyncSettings,
    donor_id: NodeId,
    donor_conninfo: &str,
    snapshot: &str,
) -> Result<(usize, u64), String> {
    let pre = pg_dump(s, donor_conninfo, snapshot, "pre-data").await?;
    let post = pg_dump(s, donor_conninfo, snapshot, "post-data").await?;

    let donor = connect(donor_conninfo)
        .await
        .map_err(|e| format!("connecting to the donor: {e}"))?;
    donor
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
        .map_err(|e| format!("importing the donor's snapshot: {}", pg_message(&e)))?;

    // Written under the donor's replay origin, so peers see an echo, not
    // writes made outside mm. Not an origin of its own: PostgreSQL keeps
    // one replication state slot (of max_replication_slots) per origin ever
    // used, and one more left an applier of node 3 without one (seen in 1
    // of 5 runs of the resync test: its peer's transactions timed out). The
    // receivers, whose replays use this origin, are stopped meanwhile.
    let origin = super::replay::replay_origin(donor_id);
    let local = origin_session(&s.local_conninfo, &origin, true).await?;
    let sql =
        |what: &'static str| move |e: tokio_postgres::Error| format!("{what}: {}", pg_message(&e));
    // This node's sequences, so none hands out a value it already used.
    let own_seqs = sequences(&local).await?;
    local
        .batch_execute("BEGIN; SET LOCAL lock_timeout = '10s'")
        .await
        .map_err(sql("starting the local transaction"))?;
    let r = async {
        let schemas = local
            .query(
                &format!(
                    "select nspname::text from pg_namespace where nspname not in {OWN_SCHEMAS} \
                     and nspname not like 'pg\\_%' order by 1"
                ),
                &[],
            )
            .await
            .map_err(sql("listing schemas"))?;
        for r in schemas {
            let name: String = r.get(0);
            local
                .batch_execute(&format!("DROP SCHEMA {} CASCADE", quote_ident(&name)))
                .await
                .map_err(sql("dropping this node's schemas"))?;
        }
        // pg_dump leaves `public` out (it exists in every database); this is
        // PostgreSQL 15's default for it.
        local
            .batch_execute(
                "CREATE SCHEMA public AUTHORIZATION pg_database_owner; \
                 GRANT USAGE ON SCHEMA public TO PUBLIC; \
                 COMMENT ON SCHEMA public IS 'standard public schema'",
            )
            .await
            .map_err(sql("creating schema public"))?;
        local
            .batch_execute(&pre)
            .await
            .map_err(sql("creating the donor's schema"))?;

        let tables = donor
            .query(
                &format!(
                    "select n.nspname::text, c.relname::text from pg_class c \
                     join pg_namespace n on n.oid = c.relnamespace \
                     where c.relkind = 'r' and c.relpersistence = 'p' \
                     and n.nspname not in {OWN_SCHEMAS} and n.nspname not like 'pg\\_%' \
                     order by 1, 2"
                ),
                &[],
            )
            .await
            .map_err(sql("listing the donor's tables"))?;
        let mut rows = 0u64;
        for t in &tables {
            let name = qualified(t.get(0), t.get(1));
            rows += copy_table(&donor, &local, &name, &name).await?;
        }
        local
            .batch_execute("DELETE FROM mm.resync_request; TRUNCATE mm.applied_tx")
            .await
            .map_err(sql("clearing mm.applied_tx"))?;
        copy_table(&donor, &local, "mm.applied_tx", "mm.applied_tx").await?;

        let donor_seqs = sequences(&donor).await?;
        for (name, last) in &donor_seqs {
            let used = own_seqs.get(name).copied().flatten().max(*last);
            let stride = crate::config::SEQUENCE_STRIDE;
            let next = next_own_value(used, stride as i64, i64::from(s.me));
            local
                .batch_execute(&format!(
                    "ALTER SEQUENCE {name} INCREMENT BY {stride} MINVALUE 1 RESTART WITH {next}"
                ))
                .await
                .map_err(sql("setting a sequence"))?;
        }
        local
            .batch_execute(&post)
            .await
            .map_err(sql("creating the donor's indexes and constraints"))?;
        local
            .batch_execute("COMMIT")
            .await
            .map_err(sql("committing the copy"))?;
        Ok::<_, String>((tables.len(), rows))
    }
    .await;
    if r.is_err() {
        let _ = local.batch_execute("ROLLBACK").await;
    }
    r
}

/// `COPY from TO STDOUT` on the donor into `COPY to FROM STDIN` here.
async fn copy_table(donor: &Client, local: &Client, from: &str, to: &str) -> Result<u64, String> {
    let out = donor
        .copy_out(&format!("COPY {from} TO STDOUT (FORMAT binary)"))
        .await
        .map_err(|e| format!("reading {from} on the donor: {}", pg_message(&e)))?;
    let sink = local
        .copy_in(&format!("COPY {to} FROM STDIN (FORMAT binary)"))
        .await
        .map_err(|e| format!("writing {to}: {}", pg_message(&e)))?;
    futures::pin_mut!(out);
    futures::pin_mut!(sink);
    while let Some(chunk) = out.next().await {
        let chunk =
            chunk.map_err(|e| format!("reading {from} on the donor: {}", pg_message(&e)))?;
        sink.send(chunk)
            .await
            .map_err(|e| format!("writing {to}: {}", pg_message(&e)))?;
    }
    sink.finish()
        .await
        .map_err(|e| format!("writing {to}: {}", pg_message(&e)))
}

/// Each user sequence (qualified name) and its last value.
async fn sequences(c: &Client) -> Result<BTreeMap<String, Option<i64>>, String> {
    let rows = c
        .query(
            &format!(
                "select schemaname::text, sequencename::text, last_value from pg_sequences \
                 where schemaname not in {OWN_SCHEMAS} and schemaname not like 'pg\\_%'"
            ),
            &[],
        )
        .await
        .map_err(|e| format!("reading sequences: {}", pg_message(&e)))?;
    Ok(rows
        .iter()
        .map(|r| (qualified(r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// The first value above `used` that is this node's (≡ me mod n), as
/// `mm.adjust_sequences` makes them.
fn next_own_value(used: Option<i64>, n: i64, me: i64) -> i64 {
    let from = used.map_or(1, |u| u + 1);
    from + (((me - from) % n) + n) % n
}

/// `pg_dump --schema-only` of one section, under the donor's snapshot,
/// without mm's schemas, owners or grants (roles are per server).
async fn pg_dump(
    s: &ResyncSettings,
    conninfo: &str,
    snapshot: &str,
    section: &str,
) -> Result<String, String> {
    let out = tokio::process::Command::new(&s.pg_dump)
        .arg(format!("--snapshot={snapshot}"))
        .arg(format!("--section={section}"))
        .args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--no-publications",
            "--no-subscriptions",
            "--exclude-schema=mm",
            "--exclude-schema=mtm",
            "--dbname",
        ])
        .arg(conninfo)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("running {}: {e}", s.pg_dump.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --section={section} failed: {}",
            s.pg_dump.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // psql meta-commands (`\restrict`) are not SQL.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n"))
}

#[cfg(test)]
mod tests {
    use super::next_own_value;

    #[test]
    fn sequences_resume_above_every_used_value_on_this_nodes_residue() {
        assert_eq!(next_own_value(None, 3, 1), 1);
        assert_eq!(next_own_value(None, 3, 3), 3);
        assert_eq!(next_own_value(Some(7), 3, 2), 8);
        assert_eq!(next_own_value(Some(8), 3, 2), 11);
        assert_eq!(next_own_value(Some(9), 3, 3), 12);
    }
}
