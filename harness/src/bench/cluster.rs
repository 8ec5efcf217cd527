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
//!
//! The read phase (d) is [`super::read`]; it starts its cluster with
//! [`start_cluster`] too.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::time::{Duration, Instant};

use super::{run_seed_scripts_at, BenchOptions, PgbenchFigures, ScriptFigures, Target, CREATE_MM};
use crate::backend::local::LocalClusterConfig;
use crate::checks::{check_nodes, Expect, Verdict};
use crate::mm_cluster::{MmCluster, MmOptions};
use crate::pg_bin::PgBin;

/// pgbench's `--max-tries` in the cluster phase.
pub const MAX_TRIES: u32 = 1000;
/// How long the nodes may take to agree after the load.
pub const AGREE_TIMEOUT: Duration = Duration::from_secs(30);

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

/// The cluster phase with every node's `[visibility] wait_peer_commits =
/// false`: COMMIT returns once the origin committed (peers a moment later).
pub async fn run_relaxed_with(bin: &PgBin, opts: &BenchOptions) -> Result<ClusterBenchResult> {
    let extra = "[visibility]\nwait_peer_commits = false\n";
    let cluster = start_cluster_with(opts, "bench-relaxed", extra).await?;
    let mut r = cluster_phase(bin, &cluster, opts).await?;
    r.phase = "mm-cluster-relaxed".into();
    Ok(r)
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

/// Three PostgreSQL + three mmd in `<work_root>/<name>`, with `opts.fsync`.
pub async fn start_cluster(opts: &BenchOptions, name: &str) -> Result<MmCluster> {
    start_cluster_with(opts, name, "").await
}

async fn start_cluster_with(opts: &BenchOptions, name: &str, extra: &str) -> Result<MmCluster> {
    let mut cfg = LocalClusterConfig::new(name, 3);
    cfg.work_dir = Some(opts.work_root.join(name));
    cfg.fsync = opts.fsync;
    let mm = MmOptions {
        extra_config: extra.to_string(),
        ..MmOptions::default()
    };
    MmCluster::start(cfg, mm)
        .await
        .with_context(|| format!("starting the mm cluster {name} (3 PostgreSQL + 3 mmd)"))
}

/// Polls `check` (one boolean) on every node's PostgreSQL until it is true
/// everywhere, up to 30 s: what node 1's mmd acknowledged reaches the
/// others' `COMMIT PREPARED` moments later.
pub(crate) async fn wait_on_every_node(cluster: &MmCluster, check: &str, what: &str) -> Result<()> {
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
