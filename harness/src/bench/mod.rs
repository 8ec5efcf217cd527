//! `mm-harness bench`: mm against its baselines on the seed workload (seed
//! 002): the three scripts `workloads/sql/test1.sql`, `test2.sql`,
//! `test3.sql` run at the same time, each `pgbench -M prepared -n -c 10 -j 10
//! -T <secs>`, on `mm(id int primary key, info text, mod_time timestamp)`.
//! The phases run one after the other on the same machine and settings, each
//! on its own cluster, stopped before the next starts ([`run_bench`]):
//!
//! - [`single`] (a): one plain PostgreSQL 15, the three scripts against it;
//! - [`cluster`] (b): mm, three PostgreSQL 15 with one mmd each, the scripts
//!   one per node through its mmd (40001 retried), then whether the nodes
//!   agree;
//! - [`async_mesh`] (c): three PostgreSQL 15 in a full mesh of native logical
//!   replication with last-writer-wins triggers and tombstones (what users
//!   build today when they want several writable nodes), the scripts one per
//!   node, then the seconds until the three nodes agree;
//! - [`cluster::run_read_with`] (d): the read path, `pgbench -S` on node 1 of
//!   an mm cluster, directly and through its mmd.
//!
//! Figures: script-tps is the sum of the three pgbench runs' `tps` (one
//! "transaction" is one run of a script: 5 upserts, 5 updates, 2 deletes,
//! each statement its own transaction since the scripts have no BEGIN).
//! p50/p99 are over every script run of the three pgbench processes, from
//! their per-transaction logs (see [`crate::pgbench`] for why those).

pub mod async_mesh;
pub mod cluster;
pub mod cpu;
pub mod phases;
pub mod script;
pub mod single;
pub mod targets;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::local::LocalNode;
use crate::pg_bin::PgBin;
use crate::pgbench::{read_transaction_log, scripts_dir, Pgbench};

pub use async_mesh::{run_async_mesh, run_async_mesh_with, AsyncMeshResult};
pub use cluster::{run_cluster_with, run_read_with, ClusterBenchResult, ReadBenchResult};
pub use single::{run_single, run_single_with};

/// The seed's table.
pub const CREATE_MM: &str =
    "create table public.mm(id int primary key, info text, mod_time timestamp)";
/// The seed's check (`sum(hashtext(...))`) with the row count.
pub const COUNT_AND_HASH_SUM: &str =
    "select count(*)::bigint, coalesce(sum(hashtext(t.id||t.info||t.mod_time)), 0)::bigint from public.mm t";
/// The seed's scripts, in node order.
pub const SCRIPTS: [&str; 3] = ["test1.sql", "test2.sql", "test3.sql"];

/// How a baseline runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// `-T` of each pgbench.
    pub seconds: u32,
    /// `-c` and `-j` of each pgbench (the seed: 10).
    pub clients: u32,
    /// Each baseline's cluster goes to `<work_root>/bench-<baseline>` (wiped on start).
    pub work_root: PathBuf,
    /// `fsync` of the servers. On by default: mm commits durably, so its
    /// baselines do too.
    pub fsync: bool,
}

impl BenchOptions {
    pub fn new(seconds: u32, work_root: impl Into<PathBuf>) -> Self {
        BenchOptions {
            seconds,
            clients: 10,
            work_root: work_root.into(),
            fsync: true,
        }
    }
}

/// What the pgbench runs of one baseline add up to.
#[derive(Debug, Clone, Serialize)]
pub struct PgbenchFigures {
    /// Sum of the three scripts' tps (script runs per second).
    pub tps: f64,
    /// Median latency of a script run over all three pgbench processes, ms.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank), ms.
    pub p99_ms: f64,
    /// Script runs that finished (sum of "number of transactions actually processed").
    pub transactions: u64,
    /// Failed script runs ("number of failed transactions") plus clients that
    /// aborted on an error.
    pub failures: u64,
    /// Script runs pgbench retried after a serialization failure or deadlock
    /// (only with `--max-tries`; 0 for the baselines).
    pub retries: u64,
}

/// One pgbench process of a baseline.
#[derive(Debug, Clone, Serialize)]
pub struct ScriptFigures {
    pub script: String,
    /// The node it ran against (`node1`...).
    pub node: String,
    pub tps: f64,
    pub transactions: u64,
    pub failures: u64,
    /// "number of transactions retried" (with `--max-tries`).
    pub retries: u64,
    /// pgbench's own "latency average", ms.
    pub latency_avg_ms: Option<f64>,
}

/// The baseline of one plain PostgreSQL.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineResult {
    /// "single".
    pub baseline: String,
    pub nodes: usize,
    pub seconds: u32,
    pub clients_per_script: u32,
    pub fsync: bool,
    pub figures: PgbenchFigures,
    pub scripts: Vec<ScriptFigures>,
    /// Rows in `mm` after the run.
    pub rows: i64,
}

/// One run of the seed workload.
#[derive(Debug, Clone)]
pub struct WorkloadRun {
    pub figures: PgbenchFigures,
    pub scripts: Vec<ScriptFigures>,
    /// When the last pgbench exited (the load stopped).
    pub ended: Instant,
}

/// Where one pgbench process of a run connects: `127.0.0.1:port`, database
/// `dbname`; a node's PostgreSQL or its mmd.
#[derive(Debug, Clone)]
pub struct Target {
    /// For reports (`node1`...).
    pub name: String,
    pub port: u16,
    pub dbname: String,
}

impl From<&LocalNode> for Target {
    fn from(n: &LocalNode) -> Self {
        Target {
            name: n.name(),
            port: n.port,
            dbname: n.dbname.clone(),
        }
    }
}

/// The three scripts at once, `targets[i]` running `SCRIPTS[i]`; returns once
/// all three pgbench processes exited. Per-transaction logs go to `log_dir`
/// (emptied first).
pub async fn run_seed_scripts(
    bin: &PgBin,
    targets: [&LocalNode; 3],
    seconds: u32,
    clients: u32,
    log_dir: &Path,
) -> Result<WorkloadRun> {
    let targets = targets.map(Target::from);
    run_seed_scripts_at(bin, &targets, seconds, clients, None, log_dir).await
}

/// [`run_seed_scripts`] against any three endpoints, with pgbench's
/// `--max-tries` (a cluster that aborts transactions with 40001 needs it).
pub async fn run_seed_scripts_at(
    bin: &PgBin,
    targets: &[Target; 3],
    seconds: u32,
    clients: u32,
    max_tries: Option<u32>,
    log_dir: &Path,
) -> Result<WorkloadRun> {
    if log_dir.exists() {
        std::fs::remove_dir_all(log_dir)
            .with_context(|| format!("removing {}", log_dir.display()))?;
    }
    std::fs::create_dir_all(log_dir).with_context(|| format!("mkdir {}", log_dir.display()))?;
    let runs: Vec<(Pgbench, PathBuf)> = SCRIPTS
        .iter()
        .map(|script| {
            let prefix = log_dir.join(script.trim_end_matches(".sql"));
            let mut run = Pgbench::new(scripts_dir().join(script), clients, seconds)
                .with_transaction_log(&prefix);
            run.max_tries = max_tries;
            (run, prefix)
        })
        .collect();
    let (a, b, c) = tokio::join!(
        runs[0].0.run_at(bin, targets[0].port, &targets[0].dbname),
        runs[1].0.run_at(bin, targets[1].port, &targets[1].dbname),
        runs[2].0.run_at(bin, targets[2].port, &targets[2].dbname),
    );
    let ended = Instant::now();
    let outcomes = [a?, b?, c?];

    let mut scripts = Vec::new();
    let mut latencies = Vec::new();
    for (i, out) in outcomes.iter().enumerate() {
        let (Some(tps), Some(transactions)) = (out.tps, out.transactions) else {
            bail!(
                "pgbench {} on {} gave no summary (exit ok: {}):\n{}\n{}",
                SCRIPTS[i],
                targets[i].name,
                out.success,
                out.stdout.trim(),
                out.stderr.trim()
            );
        };
        let log = read_transaction_log(&runs[i].1)?;
        if log.files.is_empty() {
            bail!(
                "pgbench {} wrote no per-transaction log under {}",
                SCRIPTS[i],
                runs[i].1.display()
            );
        }
        latencies.extend_from_slice(&log.latencies_us);
        scripts.push(ScriptFigures {
            script: SCRIPTS[i].to_string(),
            node: targets[i].name.clone(),
            tps,
            transactions,
            failures: out.failed.unwrap_or(0) + out.aborted_clients,
            retries: out.retried.unwrap_or(0),
            latency_avg_ms: out.latency_avg_ms,
        });
    }
    latencies.sort_unstable();
    let ms = |us: Option<u64>| us.map_or(f64::NAN, |us| us as f64 / 1000.0);
    let figures = PgbenchFigures {
        tps: scripts.iter().map(|s| s.tps).sum(),
        p50_ms: ms(percentile(&latencies, 50.0)),
        p99_ms: ms(percentile(&latencies, 99.0)),
        transactions: scripts.iter().map(|s| s.transactions).sum(),
        failures: scripts.iter().map(|s| s.failures).sum(),
        retries: scripts.iter().map(|s| s.retries).sum(),
    };
    Ok(WorkloadRun {
        figures,
        scripts,
        ended,
    })
}

/// Phase (a) in the report.
#[derive(Debug, Clone, Serialize)]
pub struct SingleSummary {
    #[serde(flatten)]
    pub figures: PgbenchFigures,
    /// Rows in `mm` after the run.
    pub rows: i64,
}

/// Phase (c) in the report.
#[derive(Debug, Clone, Serialize)]
pub struct AsyncSummary {
    #[serde(flatten)]
    pub figures: PgbenchFigures,
    pub converged: bool,
    pub convergence_s: Option<f64>,
    pub convergence_timeout_s: f64,
    pub rows: Vec<i64>,
    pub apply_errors: i64,
}

/// One ratio against its target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub name: String,
    pub value: f64,
    /// `>=` or `<=`.
    pub op: String,
    pub target: f64,
    /// A NaN value (a figure missing) is not met.
    pub met: bool,
}

impl TargetCheck {
    fn at_least(name: &str, value: f64, target: f64) -> Self {
        TargetCheck {
            name: name.into(),
            value,
            op: ">=".into(),
            target,
            met: value >= target,
        }
    }

    fn at_most(name: &str, value: f64, target: f64) -> Self {
        TargetCheck {
            name: name.into(),
            value,
            op: "<=".into(),
            target,
            met: value <= target,
        }
    }
}

/// What `mm-harness bench` prints (`--json`: this, on the last line).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub seconds: u32,
    pub clients_per_script: u32,
    pub fsync: bool,
    pub single: SingleSummary,
    pub cluster: ClusterBenchResult,
    #[serde(rename = "async")]
    pub async_mesh: AsyncSummary,
    pub read: ReadBenchResult,
    /// cluster.tps / single.tps.
    pub cluster_vs_single: f64,
    /// cluster.tps / async.tps.
    pub cluster_vs_async: f64,
    /// Select-only tps through node 1's mmd / directly on its PostgreSQL.
    pub proxy_read_ratio: f64,
    /// cluster.p99_ms / single.p99_ms.
    pub p99_ratio: f64,
    /// The async mesh's nodes agreed after the load, and when.
    pub converged: bool,
    pub convergence_s: Option<f64>,
    pub targets: Vec<TargetCheck>,
    pub all_targets_met: bool,
}

/// The targets mm is measured against.
pub const TARGET_CLUSTER_VS_ASYNC: f64 = 0.5;
pub const TARGET_CLUSTER_VS_SINGLE: f64 = 0.25;
pub const TARGET_PROXY_READ_RATIO: f64 = 0.9;
pub const TARGET_P99_RATIO: f64 = 3.0;

/// Runs phases (a) single, (b) mm cluster, (c) async mesh and (d) read path,
/// one after the other, each cluster stopped before the next starts, and
/// compares them. `progress` hears what starts when.
pub async fn run_bench(
    bin: &PgBin,
    opts: &BenchOptions,
    progress: &dyn Fn(&str),
) -> Result<BenchReport> {
    let secs = opts.seconds;
    let c = opts.clients;
    progress(&format!(
        "(a) single: one PostgreSQL, {secs} s of the seed's three scripts ({c} clients each)"
    ));
    let single = run_single_with(bin, opts)
        .await
        .context("phase (a) single")?;
    progress(&format!(
        "(b) mm cluster: 3 PostgreSQL + 3 mmd, {secs} s, one script per node through its mmd \
         (--max-tries {})",
        cluster::MAX_TRIES
    ));
    let mm = run_cluster_with(bin, opts)
        .await
        .context("phase (b) mm cluster")?;
    progress(&format!(
        "(c) async mesh: 3 PostgreSQL, logical replication + LWW, {secs} s, then convergence"
    ));
    let mesh = run_async_mesh_with(bin, opts, &async_mesh::MeshOptions::default())
        .await
        .context("phase (c) async mesh")?;
    progress(&format!(
        "(d) read path: pgbench -S on node 1 of an mm cluster, {secs} s directly, then {secs} s \
         through its mmd"
    ));
    let read = run_read_with(bin, opts)
        .await
        .context("phase (d) read path")?;
    Ok(BenchReport::new(opts, single, mm, mesh, read))
}

impl BenchReport {
    pub fn new(
        opts: &BenchOptions,
        single: BaselineResult,
        cluster: ClusterBenchResult,
        mesh: AsyncMeshResult,
        read: ReadBenchResult,
    ) -> Self {
        let cluster_vs_single = cluster.figures.tps / single.figures.tps;
        let cluster_vs_async = cluster.figures.tps / mesh.figures.tps;
        let p99_ratio = cluster.figures.p99_ms / single.figures.p99_ms;
        let proxy_read_ratio = read.proxy_read_ratio;
        let targets = vec![
            TargetCheck::at_least(
                "cluster_vs_async",
                cluster_vs_async,
                TARGET_CLUSTER_VS_ASYNC,
            ),
            TargetCheck::at_least(
                "cluster_vs_single",
                cluster_vs_single,
                TARGET_CLUSTER_VS_SINGLE,
            ),
            TargetCheck::at_least(
                "proxy_read_ratio",
                proxy_read_ratio,
                TARGET_PROXY_READ_RATIO,
            ),
            TargetCheck::at_most("p99_ratio", p99_ratio, TARGET_P99_RATIO),
        ];
        BenchReport {
            seconds: opts.seconds,
            clients_per_script: opts.clients,
            fsync: opts.fsync,
            single: SingleSummary {
                figures: single.figures,
                rows: single.rows,
            },
            converged: mesh.converged,
            convergence_s: mesh.convergence_s,
            async_mesh: AsyncSummary {
                figures: mesh.figures,
                converged: mesh.converged,
                convergence_s: mesh.convergence_s,
                convergence_timeout_s: mesh.convergence_timeout_s,
                rows: mesh.rows,
                apply_errors: mesh.apply_errors,
            },
            cluster,
            read,
            cluster_vs_single,
            cluster_vs_async,
            proxy_read_ratio,
            p99_ratio,
            all_targets_met: targets.iter().all(|t| t.met),
            targets,
        }
    }

    /// The table, the agreement and convergence lines, and the ratios with
    /// their targets.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{} s per phase, {} clients per pgbench, fsync = {}\n\n",
            self.seconds,
            self.clients_per_script,
            if self.fsync { "on" } else { "off" }
        ));
        s.push_str(&format!(
            "{:<16} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8}\n",
            "phase", "tps", "p50 ms", "p99 ms", "txns", "retries", "failures"
        ));
        let mut line = |name: &str, f: &PgbenchFigures| {
            s.push_str(&format!(
                "{name:<16} {:>10.1} {:>9.2} {:>9.2} {:>9} {:>8} {:>8}\n",
                f.tps, f.p50_ms, f.p99_ms, f.transactions, f.retries, f.failures
            ))
        };
        line("single", &self.single.figures);
        line("mm-cluster", &self.cluster.figures);
        line("async-mesh", &self.async_mesh.figures);
        for (name, r) in [
            ("read direct", &self.read.direct),
            ("read via mmd", &self.read.proxy),
        ] {
            let f = PgbenchFigures {
                tps: r.tps,
                p50_ms: r.p50_ms,
                p99_ms: r.p99_ms,
                transactions: r.transactions,
                failures: r.failures,
                retries: 0,
            };
            line(name, &f);
        }
        s.push_str(
            "(tps: script runs per second summed over the three pgbench processes; read: \
             pgbench -S transactions per second on node 1)\n\n",
        );
        let c = &self.cluster;
        s.push_str(&match (c.agreed_immediately, c.agree_s) {
            (true, _) => "mm-cluster: every node equal (rows, hash sum), nothing prepared, \
                          at the first reading after the load\n"
                .to_string(),
            (false, Some(t)) => format!(
                "mm-cluster: nodes agreed {t:.2} s after the load (first reading: {})\n",
                c.first_problems.join("; ")
            ),
            (false, None) => format!(
                "mm-cluster: nodes DISAGREE {:.0} s after the load: {}\n",
                cluster::AGREE_TIMEOUT.as_secs_f64(),
                c.problems.join("; ")
            ),
        });
        s.push_str(&match self.async_mesh.convergence_s {
            Some(t) => format!("async-mesh: converged {t:.1} s after the load\n"),
            None => format!(
                "async-mesh: NOT converged within {:.0} s (rows {:?})\n",
                self.async_mesh.convergence_timeout_s, self.async_mesh.rows
            ),
        });
        s.push_str(&format!("read: {}\n\n", self.read.init));
        for t in &self.targets {
            s.push_str(&format!(
                "{:<18} {:>7.3}   target {} {:<5} {}\n",
                t.name,
                t.value,
                t.op,
                t.target,
                if t.met { "met" } else { "NOT MET" }
            ));
        }
        s
    }
}

/// Nearest-rank percentile of sorted values: the smallest value with at
/// least `p` percent of the values at or below it.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `(rows, hash sum)` of `mm` on a node: the seed's check.
pub async fn count_and_hash_sum(client: &tokio_postgres::Client) -> Result<(i64, i64)> {
    let row = client
        .query_one(COUNT_AND_HASH_SUM, &[])
        .await
        .context("count and hash sum of mm")?;
    Ok((row.get(0), row.get(1)))
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[1, 2, 3], 50.0), Some(2));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
