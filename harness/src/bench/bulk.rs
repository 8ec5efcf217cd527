//! Phase bulk: large transactions. Through node 1's mmd on a 3-node mm
//! cluster, and directly on one plain PostgreSQL for the rate to compare
//! with, the same steps, each its own transaction(s) and each with
//! [`STEP_TIMEOUT`] so the bench cannot hang:
//!
//! 1. `pgbench -i -s 10 -n` (1,000,000 rows in pgbench_accounts, one COPY
//!    transaction; `-n` as in the read phase: its VACUUM is not what is
//!    measured);
//! 2. `create table mm_bulk(id int primary key, info text)`;
//! 3. `COPY mm_bulk FROM STDIN` of [`COPY_ROWS`] rows, fed by the harness
//!    (tokio-postgres `copy_in`), one transaction;
//! 4. `create index` on mm_bulk(info).
//!
//! Then, on the cluster, every node read directly: each table's row count
//! and `sum(hashtext(row::text))`, the index, nothing prepared left, equal
//! everywhere (polled until they agree, up to [`AGREE_TIMEOUT`]). A failed
//! step is a figure (its error text, `bulk_ok = false`), not the end of the
//! phase: the next steps still run, after the cluster is back online.

use anyhow::{anyhow, Context, Result};
use bytes::{BufMut, BytesMut};
use futures_util::SinkExt;
use serde::Serialize;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;

use super::cluster::start_cluster;
use super::read::pgbench_init;
use super::BenchOptions;
use crate::backend::local::{LocalCluster, LocalClusterConfig};
use crate::mm_cluster::MmCluster;
use crate::pg_bin::PgBin;

/// `pgbench -i -s`.
pub const SCALE: u32 = 10;
pub const COPY_ROWS: u64 = 1_000_000;
/// The most one step may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the nodes may take to agree after the last step.
pub const AGREE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the cluster may take to be online again before a step.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `create table` (setup, not a measured step) is retried on 40001.
const SETUP_RETRY: Duration = Duration::from_secs(120);

pub const CREATE_TABLE: &str = "create table public.mm_bulk(id int primary key, info text)";
pub const COPY: &str = "copy public.mm_bulk(id, info) from stdin";
pub const CREATE_INDEX: &str = "create index mm_bulk_info on public.mm_bulk(info)";
pub const INDEX_NAME: &str = "mm_bulk_info";
/// The tables compared across nodes.
pub const TABLES: [&str; 5] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
    "mm_bulk",
];

/// One step.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    pub step: String,
    pub ok: bool,
    pub elapsed_s: f64,
    /// Times it was sent (only the setup step is retried).
    pub tries: u32,
    pub error: Option<String>,
}

/// The steps on one side.
#[derive(Debug, Clone, Serialize)]
pub struct BulkSide {
    /// "single" or "node1 (mmd)".
    pub target: String,
    pub steps: Vec<StepResult>,
    /// COPY_ROWS / the COPY's seconds, when it committed.
    pub copy_rows_per_s: Option<f64>,
}

impl BulkSide {
    pub fn all_ok(&self) -> bool {
        self.steps.iter().all(|s| s.ok)
    }
}

/// One table on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableFigure {
    pub table: String,
    /// `None`: the table does not exist there.
    pub rows: Option<i64>,
    pub hash_sum: Option<i64>,
}

/// One node's reading.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReading {
    pub node: String,
    pub tables: Vec<TableFigure>,
    pub index: bool,
    pub prepared_left: i64,
    pub error: Option<String>,
}

/// The phase in the report.
#[derive(Debug, Clone, Serialize)]
pub struct BulkResult {
    /// "bulk".
    pub phase: String,
    pub scale: u32,
    pub copy_rows: u64,
    pub step_timeout_s: u64,
    pub fsync: bool,
    pub single: Option<BulkSide>,
    pub cluster: Option<BulkSide>,
    /// Every node equal, nothing prepared (after the steps).
    pub consistent: Option<bool>,
    /// Seconds after the last step until they agreed.
    pub agree_s: Option<f64>,
    pub nodes: Vec<NodeReading>,
    pub problems: Vec<String>,
    /// Every cluster step committed and every node consistent.
    pub bulk_ok: bool,
    /// A side that could not run at all.
    pub errors: Vec<String>,
}

/// Both sides on fresh servers (`bench-bulk-single`, `bench-bulk-cluster`).
pub async fn run_bulk_with(bin: &PgBin, opts: &BenchOptions) -> BulkResult {
    let mut r = BulkResult {
        phase: "bulk".into(),
        scale: SCALE,
        copy_rows: COPY_ROWS,
        step_timeout_s: STEP_TIMEOUT.as_secs(),
        fsync: opts.fsync,
        single: None,
        cluster: None,
        consistent: None,
        agree_s: None,
        nodes: Vec::new(),
        problems: Vec::new(),
        bulk_ok: false,
        errors: Vec::new(),
    };
    match single(bin, opts).await {
        Ok(s) => r.single = Some(s),
        Err(e) => r.errors.push(format!("single: {e:#}")),
    }
    if let Err(e) = cluster(bin, opts, &mut r).await {
        r.errors.push(format!("cluster: {e:#}"));
    }
    r.bulk_ok = r.cluster.as_ref().is_some_and(BulkSide::all_ok) && r.consistent == Some(true);
    r
}

async fn single(bin: &PgBin, opts: &BenchOptions) -> Result<BulkSide> {
    let mut cfg = LocalClusterConfig::new("bench-bulk-single", 1);
    cfg.work_dir = Some(opts.work_root.join("bench-bulk-single"));
    cfg.fsync = opts.fsync;
    let server = LocalCluster::start(cfg)
        .await
        .context("starting the plain server")?;
    let node = server.node(0);
    Ok(steps(
        bin,
        "single",
        node.port,
        &node.dbname,
        &node.conninfo(),
        &mut Before::Nothing,
    )
    .await)
}

async fn cluster(bin: &PgBin, opts: &BenchOptions, r: &mut BulkResult) -> Result<()> {
    let mut cluster = start_cluster(opts, "bench-bulk-cluster").await?;
    let port = cluster.nodes[0].client_port;
    let db = cluster.dbname().to_string();
    let conninfo = cluster.nodes[0].client_conninfo(&db);
    let side = steps(
        bin,
        "node1 (mmd)",
        port,
        &db,
        &conninfo,
        &mut Before::Online(&mut cluster),
    )
    .await;
    r.cluster = Some(side);

    let direct: Vec<String> = (0..cluster.nodes.len())
        .map(|i| cluster.pg.conninfo(i))
        .collect();
    let ended = Instant::now();
    loop {
        let at = ended.elapsed().as_secs_f64();
        let mut readings = Vec::new();
        for (i, ci) in direct.iter().enumerate() {
            readings.push(read_node(&format!("node{}", i + 1), ci).await);
        }
        let problems = compare(&readings);
        r.nodes = readings;
        r.problems = problems;
        if r.problems.is_empty() {
            r.consistent = Some(true);
            r.agree_s = Some(at);
            break;
        }
        if ended.elapsed() > AGREE_TIMEOUT {
            r.consistent = Some(false);
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// What happens before each step.
enum Before<'a> {
    Nothing,
    /// After an aborted big transaction the cluster may change generation:
    /// each step starts once every node is online again (or notes it was not).
    Online(&'a mut MmCluster),
}

impl Before<'_> {
    /// A note for the step's error, if something was wrong.
    async fn run(&mut self) -> Option<String> {
        match self {
            Before::Nothing => None,
            Before::Online(c) => c
                .wait_online(ONLINE_TIMEOUT)
                .await
                .err()
                .map(|e| format!("{e:#}")),
        }
    }
}

/// The four steps against `127.0.0.1:port` (pgbench) and `conninfo`
/// (tokio-postgres, a fresh session per step).
async fn steps(
    bin: &PgBin,
    target: &str,
    port: u16,
    db: &str,
    conninfo: &str,
    before: &mut Before<'_>,
) -> BulkSide {
    let mut side = BulkSide {
        target: target.into(),
        steps: Vec::new(),
        copy_rows_per_s: None,
    };
    let note = before.run().await;
    side.steps.push(
        step(
            &format!("pgbench -i -s {SCALE} -n"),
            note,
            pgbench_init(bin, port, db, SCALE, STEP_TIMEOUT),
        )
        .await,
    );
    let note = before.run().await;
    // Setup, not a measured step: after an aborted big transaction the
    // peers may still be replaying it and abort this too (40001), so it is
    // retried, which also lets the cluster settle before the COPY.
    let tries = std::cell::Cell::new(0);
    let mut create = step(
        "create table mm_bulk",
        note,
        sql_retrying(conninfo, CREATE_TABLE, SETUP_RETRY, &tries),
    )
    .await;
    create.tries = tries.get();
    side.steps.push(create);
    let note = before.run().await;
    let copy = step(&format!("copy {COPY_ROWS} rows"), note, copy_rows(conninfo)).await;
    if copy.ok && copy.elapsed_s > 0.0 {
        side.copy_rows_per_s = Some(COPY_ROWS as f64 / copy.elapsed_s);
    }
    side.steps.push(copy);
    let note = before.run().await;
    side.steps
        .push(step("create index", note, sql(conninfo, CREATE_INDEX)).await);
    side
}

/// Runs one step under [`STEP_TIMEOUT`], timing it.
async fn step(
    name: &str,
    note: Option<String>,
    work: impl Future<Output = Result<()>>,
) -> StepResult {
    let t0 = Instant::now();
    let outcome = match tokio::time::timeout(STEP_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("did not finish within {STEP_TIMEOUT:?}")),
    };
    let elapsed_s = t0.elapsed().as_secs_f64();
    let error = outcome.err().map(|e| match &note {
        Some(n) => format!("{e:#} (before the step: {n})"),
        None => format!("{e:#}"),
    });
    StepResult {
        step: name.into(),
        ok: error.is_none(),
        elapsed_s,
        tries: 1,
        error,
    }
}

async fn connect(conninfo: &str) -> Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {conninfo}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

async fn sql(conninfo: &str, stmt: &str) -> Result<()> {
    connect(conninfo)
        .await?
        .batch_execute(stmt)
        .await
        .map_err(|e| anyhow!(mm_workloads::describe(&e)))
        .with_context(|| stmt.to_string())
}

/// [`sql`], again after a 40001 ("safe to retry") or while mmd refuses
/// sessions because its node is not online (a generation change after an
/// aborted transaction), until `limit`; counts the tries in `tries`.
async fn sql_retrying(
    conninfo: &str,
    stmt: &str,
    limit: Duration,
    tries: &std::cell::Cell<u32>,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        tries.set(tries.get() + 1);
        let e = match tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                match c.batch_execute(stmt).await {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        let transient = e.code().is_some_and(|c| {
            *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::CANNOT_CONNECT_NOW
        }) || mm_workloads::describe(&e).contains("is not online");
        if !transient || Instant::now() >= deadline {
            return Err(anyhow!(mm_workloads::describe(&e)))
                .with_context(|| format!("{stmt} (try {})", tries.get()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `COPY mm_bulk FROM STDIN`, [`COPY_ROWS`] text rows sent in 256 KiB chunks.
async fn copy_rows(conninfo: &str) -> Result<()> {
    let c = connect(conninfo).await?;
    let sink = c
        .copy_in::<_, bytes::Bytes>(COPY)
        .await
        .map_err(|e| anyhow!(mm_workloads::describe(&e)))
        .context(COPY)?;
    let mut sink = std::pin::pin!(sink);
    let mut buf = BytesMut::with_capacity(512 * 1024);
    for id in 1..=COPY_ROWS {
        buf.put_slice(format!("{id}\tbulk row {id}\n").as_bytes());
        if buf.len() >= 256 * 1024 {
            sink.send(buf.split().freeze())
                .await
                .map_err(|e| anyhow!(mm_workloads::describe(&e)))
                .context("sending COPY data")?;
        }
    }
    if !buf.is_empty() {
        sink.send(buf.split().freeze())
            .await
            .map_err(|e| anyhow!(mm_workloads::describe(&e)))
            .context("sending COPY data")?;
    }
    let rows = sink
        .as_mut()
        .finish()
        .await
        .map_err(|e| anyhow!(mm_workloads::describe(&e)))
        .context("ending the COPY")?;
    if rows != COPY_ROWS {
        return Err(anyhow!("COPY reported {rows} rows, sent {COPY_ROWS}"));
    }
    Ok(())
}

/// One node's tables, index and prepared transactions, read directly.
async fn read_node(name: &str, conninfo: &str) -> NodeReading {
    let mut r = NodeReading {
        node: name.into(),
        tables: Vec::new(),
        index: false,
        prepared_left: 0,
        error: None,
    };
    if let Err(e) = read_into(conninfo, &mut r).await {
        r.error = Some(format!("{e:#}"));
    }
    r
}

async fn read_into(conninfo: &str, r: &mut NodeReading) -> Result<()> {
    let c = connect(conninfo).await?;
    for t in TABLES {
        let exists: bool = c
            .query_one(
                "select to_regclass($1) is not null",
                &[&format!("public.{t}")],
            )
            .await?
            .get(0);
        let (rows, hash_sum) = if exists {
            let row = c
                .query_one(
                    &format!(
                        "select count(*)::bigint, coalesce(sum(hashtext(t::text)), 0)::bigint \
                         from public.{t} t"
                    ),
                    &[],
                )
                .await
                .with_context(|| format!("count and hash sum of {t}"))?;
            (Some(row.get(0)), Some(row.get(1)))
        } else {
            (None, None)
        };
        r.tables.push(TableFigure {
            table: t.into(),
            rows,
            hash_sum,
        });
    }
    r.index = c
        .query_one(
            "select count(*) > 0 from pg_indexes where schemaname = 'public' and indexname = $1",
            &[&INDEX_NAME],
        )
        .await?
        .get(0);
    r.prepared_left = c
        .query_one("select count(*)::bigint from pg_prepared_xacts", &[])
        .await?
        .get(0);
    Ok(())
}

/// What differs between the nodes, one line each; empty when they agree.
pub fn compare(nodes: &[NodeReading]) -> Vec<String> {
    let mut problems = Vec::new();
    for n in nodes {
        if let Some(e) = &n.error {
            problems.push(format!("{}: {e}", n.node));
        }
        if n.prepared_left > 0 {
            problems.push(format!("{}: {} prepared left", n.node, n.prepared_left));
        }
    }
    let Some(first) = nodes.iter().find(|n| n.error.is_none()) else {
        return problems;
    };
    for n in nodes.iter().filter(|n| n.error.is_none()) {
        for (a, b) in first.tables.iter().zip(&n.tables) {
            if a != b {
                problems.push(format!(
                    "{}: {} rows {:?} hash {:?}, {}: rows {:?} hash {:?}",
                    a.table, first.node, a.rows, a.hash_sum, n.node, b.rows, b.hash_sum
                ));
            }
        }
        if n.index != first.index {
            problems.push(format!(
                "index {INDEX_NAME}: {} {}, {} {}",
                first.node, first.index, n.node, n.index
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, rows: i64, index: bool) -> NodeReading {
        NodeReading {
            node: name.into(),
            tables: vec![TableFigure {
                table: "mm_bulk".into(),
                rows: Some(rows),
                hash_sum: Some(rows * 7),
            }],
            index,
            prepared_left: 0,
            error: None,
        }
    }

    #[test]
    fn compares_nodes() {
        assert!(compare(&[node("n1", 5, true), node("n2", 5, true)]).is_empty());
        let p = compare(&[node("n1", 5, true), node("n2", 4, true)]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("mm_bulk"));
        assert_eq!(
            compare(&[node("n1", 5, true), node("n2", 5, false)]).len(),
            1
        );
        let mut bad = node("n3", 5, true);
        bad.error = Some("cannot connect".into());
        bad.prepared_left = 2;
        assert_eq!(compare(&[node("n1", 5, true), bad]).len(), 2);
    }
}
