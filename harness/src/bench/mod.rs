//! The baselines `mm-harness bench` compares mm with, on the seed workload
//! (seed 002): the three scripts `workloads/sql/test1.sql`, `test2.sql`,
//! `test3.sql` run at the same time, each `pgbench -M prepared -n -c 10 -j 10
//! -T <secs>`, on `mm(id int primary key, info text, mod_time timestamp)`.
//!
//! - [`single`]: one plain PostgreSQL 15, the three scripts against it;
//! - [`async_mesh`]: three PostgreSQL 15 in a full mesh of native logical
//!   replication with last-writer-wins triggers and tombstones (what users
//!   build today when they want several writable nodes), the scripts one per
//!   node, then the seconds until the three nodes agree.
//!
//! Figures: script-tps is the sum of the three pgbench runs' `tps` (one
//! "transaction" is one run of a script: 5 upserts, 5 updates, 2 deletes,
//! each statement its own transaction since the scripts have no BEGIN).
//! p50/p99 are over every script run of the three pgbench processes, from
//! their per-transaction logs (see [`crate::pgbench`] for why those).

pub mod async_mesh;
pub mod single;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::local::LocalNode;
use crate::pg_bin::PgBin;
use crate::pgbench::{read_transaction_log, scripts_dir, Pgbench};

pub use async_mesh::{run_async_mesh, run_async_mesh_with, AsyncMeshResult};
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
    if log_dir.exists() {
        std::fs::remove_dir_all(log_dir)
            .with_context(|| format!("removing {}", log_dir.display()))?;
    }
    std::fs::create_dir_all(log_dir).with_context(|| format!("mkdir {}", log_dir.display()))?;
    let runs: Vec<(Pgbench, PathBuf)> = SCRIPTS
        .iter()
        .map(|script| {
            let prefix = log_dir.join(script.trim_end_matches(".sql"));
            let run = Pgbench::new(scripts_dir().join(script), clients, seconds)
                .with_transaction_log(&prefix);
            (run, prefix)
        })
        .collect();
    let (a, b, c) = tokio::join!(
        runs[0].0.run(bin, targets[0]),
        runs[1].0.run(bin, targets[1]),
        runs[2].0.run(bin, targets[2]),
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
                targets[i].name(),
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
            node: targets[i].name(),
            tps,
            transactions,
            failures: out.failed.unwrap_or(0) + out.aborted_clients,
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
    };
    Ok(WorkloadRun {
        figures,
        scripts,
        ended,
    })
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
