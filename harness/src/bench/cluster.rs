//! What `mm-harness bench` measures on mm itself, on a local cluster of three
//! PostgreSQL 15 servers with one `mmd` each ([`MmCluster`]):
//!
//! - [`run_cluster_with`], phase (b): the seed's three scripts at once, one
//!   per node, each through that node's mmd (`-M prepared`, `--max-tries
//!   1000`: mm answers 40001 when the cluster aborts a transaction, and
//!   pgbench retries it), the table created through node 1's mmd (replicated
//!   DDL). Then every node is read directly: equal row counts and hash sums,
//!   and nothing left in `pg_prepared_xacts`. A commit is acknowledged once
//!   every node has prepared it and the origin has committed; the peers'
//!   `COMMIT PREPARED` follows moments later, so the nodes are first read at
//!   once and then every 100 ms until they agree (up to 30 s), and both are
//!   reported.
//! - [`run_read_with`], phase (d): the read path. pgbench's tables are made
//!   through node 1's mmd, so every node gets the same ones as replicated
//!   DDL and writes (`pgbench -i -s 1 -n` itself, or when the cluster aborts
//!   its one big COPY transaction, the same tables and rows in smaller
//!   transactions: see [`init_pgbench_tables`]; the run checks each node has
//!   every account). Creating them directly on each node would work too
//!   (mmd does not replicate writes committed outside it; it logs a
//!   warning), but would bypass what is measured: through mmd they are
//!   made like any client's tables. Then `VACUUM ANALYZE` on every node
//!   (pgbench -i's own vacuum step, so autovacuum does not do it during a
//!   run), and the builtin select-only script `pgbench -S -M prepared` runs first
//!   directly against node 1's PostgreSQL, then through node 1's mmd, which
//!   relays reads to its own server without leaving the node.
//!   `proxy_read_ratio` = through / direct is what the proxy costs.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{run_seed_scripts_at, BenchOptions, PgbenchFigures, ScriptFigures, Target, CREATE_MM};
use crate::backend::local::{LocalClusterConfig, SUPERUSER};
use crate::checks::{check_nodes, Expect, Verdict};
use crate::mm_cluster::{MmCluster, MmOptions};
use crate::pg_bin::PgBin;
use crate::pgbench::read_transaction_log;

/// pgbench's `--max-tries` in the cluster phase.
pub const MAX_TRIES: u32 = 1000;
/// How long the nodes may take to agree after the load.
pub const AGREE_TIMEOUT: Duration = Duration::from_secs(30);
/// `pgbench -i -s` of the read phase.
pub const READ_SCALE: u32 = 1;

/// Phase (b): the mm cluster under the seed workload.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterBenchResult {
    /// "mm-cluster".
    pub phase: String,
    pub nodes: usize,
    pub seconds: u32,
    pub clients_per_script: u32,
    pub fsync: bool,
    pub max_tries: u32,
    /// tps, p50_ms, p99_ms, transactions, failures, retries.
    #[serde(flatten)]
    pub figures: PgbenchFigures,
    pub scripts: Vec<ScriptFigures>,
    /// The first reading right after the load found every node equal and
    /// nothing prepared.
    pub agreed_immediately: bool,
    /// They agreed within [`AGREE_TIMEOUT`].
    pub agreed: bool,
    /// Seconds from the end of the load to the reading that found them
    /// agreeing (that reading's start); `None` if they never did.
    pub agree_s: Option<f64>,
    /// Per node at the last reading.
    pub rows: Vec<Option<i64>>,
    pub hash_sums: Vec<Option<i64>>,
    /// Prepared transactions left on all nodes at the last reading.
    pub prepared_left: i64,
    /// What the first reading found wrong (empty when it agreed at once).
    pub first_problems: Vec<String>,
    /// What the last reading found wrong (empty when they agreed).
    pub problems: Vec<String>,
}

/// Three PostgreSQL + three mmd, the seed's scripts one per node through its
/// mmd for `opts.seconds`, then the agreement check. The cluster lives in
/// `<work_root>/bench-cluster` and is stopped before this returns.
pub async fn run_cluster_with(bin: &PgBin, opts: &BenchOptions) -> Result<ClusterBenchResult> {
    let cluster = start_cluster(opts, "bench-cluster").await?;
    cluster_phase(bin, &cluster, opts).await
}

/// Phase (b) on a running cluster whose `mm` table does not exist yet.
pub async fn cluster_phase(
    bin: &PgBin,
    cluster: &MmCluster,
    opts: &BenchOptions,
) -> Result<ClusterBenchResult> {
    let n1 = cluster.connect_proxy(0).await?;
    n1.batch_execute(CREATE_MM)
        .await
        .context("creating mm through node 1's mmd")?;
    drop(n1);
    wait_on_every_node(
        cluster,
        "select to_regclass('public.mm') is not null",
        "the table mm",
    )
    .await?;

    let targets: [Target; 3] = std::array::from_fn(|i| Target {
        name: format!("node{} (mmd)", i + 1),
        port: cluster.nodes[i].client_port,
        dbname: cluster.dbname().to_string(),
    });
    let run = run_seed_scripts_at(
        bin,
        &targets,
        opts.seconds,
        opts.clients,
        Some(MAX_TRIES),
        &cluster.pg.work_dir().join("pgbench"),
    )
    .await?;

    let direct: Vec<String> = (0..cluster.nodes.len())
        .map(|i| cluster.pg.conninfo(i))
        .collect();
    let first = check_nodes(&direct, &Expect::default()).await;
    let first_problems = first.problems.clone();
    let mut last = first;
    let mut agree_s = last.consistent.then_some(0.0);
    while agree_s.is_none() && run.ended.elapsed() < AGREE_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let at = run.ended.elapsed().as_secs_f64();
        last = check_nodes(&direct, &Expect::default()).await;
        if last.consistent {
            agree_s = Some(at);
        }
    }
    let (rows, hash_sums, prepared_left) = node_figures(&last);
    Ok(ClusterBenchResult {
        phase: "mm-cluster".into(),
        nodes: cluster.nodes.len(),
        seconds: opts.seconds,
        clients_per_script: opts.clients,
        fsync: opts.fsync,
        max_tries: MAX_TRIES,
        figures: run.figures,
        scripts: run.scripts,
        agreed_immediately: first_problems.is_empty(),
        agreed: last.consistent,
        agree_s,
        rows,
        hash_sums,
        prepared_left,
        first_problems,
        problems: last.problems,
    })
}

fn node_figures(v: &Verdict) -> (Vec<Option<i64>>, Vec<Option<i64>>, i64) {
    (
        v.nodes.iter().map(|n| n.mm_rows).collect(),
        v.nodes.iter().map(|n| n.hash_sum.flatten()).collect(),
        v.nodes.iter().filter_map(|n| n.prepared_left).sum(),
    )
}

/// One `pgbench -S` run.
#[derive(Debug, Clone, Serialize)]
pub struct ReadFigures {
    /// `node1` (PostgreSQL) or `node1 (mmd)`.
    pub target: String,
    pub port: u16,
    pub tps: f64,
    /// From the per-transaction log, ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub transactions: u64,
    /// Failed transactions plus clients aborted on an error.
    pub failures: u64,
    /// pgbench's "latency average", ms.
    pub latency_avg_ms: Option<f64>,
}

/// Phase (d): select-only on node 1, directly and through its mmd.
#[derive(Debug, Clone, Serialize)]
pub struct ReadBenchResult {
    /// "read".
    pub phase: String,
    pub scale: u32,
    pub clients: u32,
    pub seconds: u32,
    pub fsync: bool,
    /// How the pgbench tables were created.
    pub init: String,
    /// Seconds that took, until every node had every account.
    pub init_s: f64,
    pub direct: ReadFigures,
    pub proxy: ReadFigures,
    /// `proxy.tps / direct.tps`.
    pub proxy_read_ratio: f64,
}

/// How phase (d) makes pgbench's tables, always through node 1's mmd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadInit {
    /// `pgbench -i -s 1 -n`; if the cluster aborts it, [`ReadInit::Batches`].
    PgbenchFirst,
    /// `pgbench -i -I dtp`, then the rows in transactions of [`INIT_BATCH`]
    /// accounts (what the fallback does, without first spending the time a
    /// failed `pgbench -i` costs).
    Batches,
}

/// A fresh cluster (`<work_root>/bench-read`), `pgbench -i -s 1 -n` through
/// node 1's mmd (see [`init_pgbench_tables`]), then `pgbench -S -M prepared
/// -c C -j C -T secs` directly against node 1's PostgreSQL and then through
/// its mmd. The cluster is stopped before this returns.
pub async fn run_read_with(bin: &PgBin, opts: &BenchOptions) -> Result<ReadBenchResult> {
    let mut cluster = start_cluster(opts, "bench-read").await?;
    read_phase(bin, &mut cluster, opts, ReadInit::PgbenchFirst).await
}

/// Phase (d) on a running cluster, choosing how the tables are made.
pub async fn read_phase(
    bin: &PgBin,
    cluster: &mut MmCluster,
    opts: &BenchOptions,
    how: ReadInit,
) -> Result<ReadBenchResult> {
    let db = cluster.dbname().to_string();
    let mmd_port = cluster.nodes[0].client_port;
    let pg_port = cluster.pg.node(0).port;

    let started = Instant::now();
    let init = init_pgbench_tables(bin, cluster, how).await?;
    let accounts = i64::from(READ_SCALE) * 100_000;
    wait_on_every_node(
        cluster,
        "select to_regclass('public.pgbench_accounts') is not null",
        "pgbench's tables",
    )
    .await?;
    wait_on_every_node(
        cluster,
        &format!("select count(*) = {accounts} from public.pgbench_accounts"),
        "pgbench's accounts",
    )
    .await?;
    // What pgbench -i's vacuum step (skipped by -n) does, on every node
    // directly (VACUUM writes nothing that replicates): autovacuum would
    // otherwise do it in the middle of one of the runs. Then warm node 1's
    // buffers so neither run pays for the first reads.
    for i in 0..cluster.nodes.len() {
        cluster
            .pg
            .connect(i)
            .await?
            .batch_execute(
                "vacuum analyze pgbench_branches, pgbench_tellers, pgbench_accounts, pgbench_history",
            )
            .await
            .with_context(|| format!("vacuum analyze of pgbench's tables on node {}", i + 1))?;
    }
    cluster
        .pg
        .connect(0)
        .await?
        .batch_execute("select count(*), sum(abalance) from public.pgbench_accounts")
        .await
        .context("reading pgbench_accounts on node 1")?;
    let init_s = started.elapsed().as_secs_f64();

    let logs = cluster.pg.work_dir().join("pgbench-read");
    if logs.exists() {
        std::fs::remove_dir_all(&logs).with_context(|| format!("removing {}", logs.display()))?;
    }
    std::fs::create_dir_all(&logs).with_context(|| format!("mkdir {}", logs.display()))?;
    let direct = select_only(
        bin,
        "node1",
        pg_port,
        &db,
        opts.clients,
        opts.seconds,
        &logs.join("direct"),
    )
    .await?;
    let proxy = select_only(
        bin,
        "node1 (mmd)",
        mmd_port,
        &db,
        opts.clients,
        opts.seconds,
        &logs.join("proxy"),
    )
    .await?;
    Ok(ReadBenchResult {
        phase: "read".into(),
        scale: READ_SCALE,
        clients: opts.clients,
        seconds: opts.seconds,
        fsync: opts.fsync,
        init: format!(
            "{init}; every node checked for {accounts} accounts, then VACUUM ANALYZE on each"
        ),
        init_s,
        proxy_read_ratio: proxy.tps / direct.tps,
        direct,
        proxy,
    })
}

/// Rows per transaction when the accounts are loaded in batches.
pub const INIT_BATCH: i64 = 2_000;
/// Sessions inserting batches at once (each peer applies with several appliers).
pub const INIT_SESSIONS: usize = 4;

/// Creates pgbench's tables through node 1's mmd, so every node has the
/// same ones, and says how. First (with [`ReadInit::PgbenchFirst`])
/// `pgbench -i -s 1 -n` itself: its DDL is replicated, but its COPY of all
/// 100,000 accounts is one transaction that every peer must replay and
/// prepare within the vote timeout (1.5 s by default). Measured on a 2-core
/// machine, peers replay about 15,000 rows a second (20,000 rows commit in
/// 1.4 s through mmd), so the cluster aborts it (40001, VoteTimeout), and
/// the peers' appliers then stay busy replaying it for another 10-30 s,
/// aborting whatever comes meanwhile (on a loaded machine the delay has
/// also cost a generation change). In that case, and with
/// [`ReadInit::Batches`], `pgbench -i -I dtp` (drop, create tables, primary
/// keys: DDL only, retried until the cluster takes it) and the rows
/// pgbench's server-side generation (`-I G`) would insert, [`INIT_BATCH`]
/// accounts per transaction in [`INIT_SESSIONS`] sessions, each retried on
/// 40001.
pub async fn init_pgbench_tables(
    bin: &PgBin,
    cluster: &mut MmCluster,
    how: ReadInit,
) -> Result<String> {
    let port = cluster.nodes[0].client_port;
    let db = cluster.dbname().to_string();
    let pgbench_i = |steps: Option<&'static str>| {
        let mut cmd = tokio::process::Command::new(bin.pgbench());
        cmd.args(["-i", "-s", &READ_SCALE.to_string(), "-n", "-q"]);
        if let Some(steps) = steps {
            cmd.args(["-I", steps]);
        }
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
            .arg(&db);
        cmd
    };
    let mut why = "asked for batches".to_string();
    if how == ReadInit::PgbenchFirst {
        let out = pgbench_i(None)
            .output()
            .await
            .with_context(|| format!("running {}", bin.pgbench().display()))?;
        if out.status.success() {
            return Ok(format!(
                "pgbench -i -s {READ_SCALE} -n through node 1's mmd (DDL replicated, the COPY \
                 one transaction committed on every node)"
            ));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        why = format!(
            "pgbench -i -s {READ_SCALE} -n through node 1's mmd failed: {}",
            stderr
                .lines()
                .find(|l| l.contains("error"))
                .unwrap_or("no error line")
                .trim()
                .trim_start_matches("pgbench: error: ")
        );
    }
    // The aborted COPY may have cost a generation change: wait until every
    // node is online again. The peers may still be busy with it for a
    // while, and abort the DDL too.
    cluster
        .wait_online(Duration::from_secs(60))
        .await
        .context("waiting for every node to be online")?;
    let mut tries = 0;
    loop {
        let out = pgbench_i(Some("dtp"))
            .output()
            .await
            .with_context(|| format!("running {}", bin.pgbench().display()))?;
        tries += 1;
        if out.status.success() {
            break;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let transient = stderr.contains("safe to retry") || stderr.contains("is not online");
        if !transient || tries >= 20 {
            bail!(
                "pgbench -i -s {READ_SCALE} -n -I dtp through node 1's mmd failed ({}, try \
                 {tries}):\n{}",
                out.status,
                stderr.trim()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let ddl_tries = tries;
    let scale = i64::from(READ_SCALE);
    let mut batches = vec![
        format!(
            "insert into pgbench_branches(bid, bbalance) select bid, 0 from generate_series(1, {scale}) as bid"
        ),
        format!(
            "insert into pgbench_tellers(tid, bid, tbalance) \
             select tid, (tid - 1) / 10 + 1, 0 from generate_series(1, {}) as tid",
            10 * scale
        ),
    ];
    let accounts = 100_000 * scale;
    let mut from = 1;
    while from <= accounts {
        let to = (from + INIT_BATCH - 1).min(accounts);
        batches.push(format!(
            "insert into pgbench_accounts(aid, bid, abalance, filler) \
             select aid, (aid - 1) / 100000 + 1, 0, '' from generate_series({from}, {to}) as aid"
        ));
        from = to + 1;
    }
    let n_batches = batches.len();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(batches));
    let mut loaders = Vec::new();
    for _ in 0..INIT_SESSIONS {
        let c = cluster.connect_proxy(0).await?;
        let queue = queue.clone();
        loaders.push(tokio::spawn(async move {
            let mut retries = 0u32;
            loop {
                let Some(sql) = queue.lock().expect("batch queue").pop() else {
                    return Ok::<u32, anyhow::Error>(retries);
                };
                let mut tries = 0;
                loop {
                    match c.batch_execute(&sql).await {
                        Ok(()) => break,
                        Err(e)
                            if e.code()
                                == Some(
                                    &tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE,
                                )
                                && tries < 20 =>
                        {
                            tries += 1;
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => {
                            return Err(anyhow::Error::new(e))
                                .with_context(|| format!("through node 1's mmd: {sql}"))
                        }
                    }
                }
            }
        }));
    }
    let mut retries = 0;
    for l in loaders {
        retries += l.await.context("a loader task")??;
    }
    Ok(format!(
        "{why}; so pgbench -i -s {READ_SCALE} -n -I dtp through node 1's mmd (replicated DDL, \
         {ddl_tries} tries), then pgbench's rows inserted through it, {INIT_BATCH} accounts \
         per transaction in {INIT_SESSIONS} sessions ({n_batches} transactions, {retries} \
         retried on 40001)"
    ))
}

/// `pgbench -S -M prepared -n -c C -j C -T secs` with a per-transaction log.
async fn select_only(
    bin: &PgBin,
    target: &str,
    port: u16,
    dbname: &str,
    clients: u32,
    seconds: u32,
    log_prefix: &Path,
) -> Result<ReadFigures> {
    let mut prefix = std::ffi::OsString::from("--log-prefix=");
    prefix.push(log_prefix);
    let c = clients.to_string();
    let out = tokio::process::Command::new(bin.pgbench())
        .args(["-S", "-M", "prepared", "-n", "-c", &c, "-j", &c])
        .args(["-T", &seconds.to_string()])
        .arg("-l")
        .arg(prefix)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
        .arg(dbname)
        .output()
        .await
        .with_context(|| format!("running {}", bin.pgbench().display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    let tps: Option<f64> = field("tps =").and_then(|s| s.parse().ok());
    let transactions: Option<u64> = field("number of transactions actually processed:")
        .and_then(|s| s.split('/').next().and_then(|n| n.parse().ok()));
    let (Some(tps), Some(transactions)) = (tps, transactions) else {
        bail!(
            "pgbench -S on {target} gave no summary ({}):\n{}\n{}",
            out.status,
            stdout.trim(),
            stderr.trim()
        );
    };
    let failed: u64 = field("number of failed transactions:")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let aborted = stderr
        .lines()
        .filter(|l| l.contains("aborted in command"))
        .count() as u64;
    let mut lat = read_transaction_log(log_prefix)?.latencies_us;
    lat.sort_unstable();
    let ms = |p: f64| super::percentile(&lat, p).map_or(f64::NAN, |us| us as f64 / 1000.0);
    Ok(ReadFigures {
        target: target.to_string(),
        port,
        tps,
        p50_ms: ms(50.0),
        p99_ms: ms(99.0),
        transactions,
        failures: failed + aborted,
        latency_avg_ms: field("latency average =").and_then(|s| s.parse().ok()),
    })
}

/// Three PostgreSQL + three mmd in `<work_root>/<name>`, with `opts.fsync`.
pub async fn start_cluster(opts: &BenchOptions, name: &str) -> Result<MmCluster> {
    let mut cfg = LocalClusterConfig::new(name, 3);
    cfg.work_dir = Some(opts.work_root.join(name));
    cfg.fsync = opts.fsync;
    MmCluster::start(cfg, MmOptions::default())
        .await
        .with_context(|| format!("starting the mm cluster {name} (3 PostgreSQL + 3 mmd)"))
}

/// Polls `check` (one boolean) on every node's PostgreSQL until it is true
/// everywhere, up to 30 s: what node 1's mmd acknowledged reaches the
/// others' `COMMIT PREPARED` moments later.
async fn wait_on_every_node(cluster: &MmCluster, check: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..cluster.nodes.len() {
        let c = cluster.pg.connect(i).await?;
        loop {
            let ok: bool = c
                .query_one(check, &[])
                .await
                .with_context(|| format!("node {}: {check}", i + 1))?
                .get(0);
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {} did not show {what} within 30 s", i + 1);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}
