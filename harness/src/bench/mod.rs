//! `mm-harness bench`: mm against its baselines on the seed workload (seed
//! 002): the three scripts `workloads/sql/test1.sql`, `test2.sql`,
//! `test3.sql` run at the same time, each `pgbench -M prepared -n -c 10 -j 10
//! -T <secs>`, on `mm(id int primary key, info text, mod_time timestamp)`.
//! The phases ([`Phase`], `--phases`) run one after the other on the same
//! machine and settings, each on servers of its own, stopped before the
//! next starts ([`run_bench`]); a phase that fails is reported and the next
//! one runs:
//!
//! - [`single`] (a): one plain PostgreSQL 15, the three scripts against it;
//! - [`cluster`] (b): mm, three PostgreSQL 15 with one mmd each, the scripts
//!   one per node through its mmd (40001 retried), then whether the nodes
//!   agree;
//! - [`async_mesh`] (c): three PostgreSQL 15 in a full mesh of native logical
//!   replication with last-writer-wins triggers and tombstones (what users
//!   build today when they want several writable nodes), the scripts one per
//!   node, then the seconds until the three nodes agree;
//! - [`two_pc`]: the limit of plain two-phase commit over three servers, the
//!   same scripts and clients driven by the harness (`cluster_vs_2pc_limit`);
//! - [`read`] (d): the read path, `pgbench -S` on node 1 of an mm cluster,
//!   directly and through its mmd, and a pgbouncer baseline on a plain
//!   server ([`pgbouncer`]);
//! - [`latency`]: one client's single-row INSERTs, plain vs through mmd;
//! - [`bulk`]: `pgbench -i -s 10`, a 1,000,000-row COPY and CREATE INDEX,
//!   plain vs through mmd, then every node compared.
//!
//! Figures: script-tps is the sum of the three pgbench runs' `tps` (one
//! "transaction" is one run of a script: 5 upserts, 5 updates, 2 deletes,
//! each statement its own transaction since the scripts have no BEGIN).
//! p50/p99 are over every script run of the three pgbench processes, from
//! their per-transaction logs (see [`crate::pgbench`] for why those).
//! [`targets`] holds what each figure is measured against.

pub mod async_mesh;
pub mod bulk;
pub mod cluster;
pub mod cpu;
pub mod latency;
pub mod pgbouncer;
pub mod phases;
pub mod read;
pub mod script;
pub mod single;
pub mod targets;
pub mod two_pc;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::local::LocalNode;
use crate::pg_bin::PgBin;
use crate::pgbench::{read_transaction_log, scripts_dir, Pgbench};

pub use async_mesh::{run_async_mesh, run_async_mesh_with, AsyncMeshResult};
pub use bulk::{run_bulk_with, BulkResult};
pub use cluster::{run_cluster_with, ClusterBenchResult};
pub use latency::{run_latency_with, InsertFigures, LatencyResult};
pub use phases::{Phase, Phases};
pub use read::{
    run_pgbouncer_read_with, run_read_with, PgbouncerReadResult, ReadBenchResult, ReadFigures,
};
pub use single::{run_single, run_single_with};
pub use targets::TargetCheck;
pub use two_pc::{run_two_pc_with, TwoPcResult};

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
    /// Which phases [`run_bench`] runs (default: all).
    pub phases: Phases,
}

impl BenchOptions {
    pub fn new(seconds: u32, work_root: impl Into<PathBuf>) -> Self {
        BenchOptions {
            seconds,
            clients: 10,
            work_root: work_root.into(),
            fsync: true,
            phases: Phases::default(),
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

/// A figure measured on one plain server and through mm.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SingleCluster {
    pub single: Option<f64>,
    pub cluster: Option<f64>,
}

/// The relaxed cluster phase, beside the default's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RelaxedSummary {
    pub script_tps: f64,
    pub p99_ms: f64,
    /// relaxed.script_tps / cluster.tps.
    pub vs_default: Option<f64>,
    pub agreed: bool,
}

/// What `mm-harness bench` prints (`--json`: this, on the last line). A
/// phase not run (see `phases`) or failed (see `errors`) is null, and so is
/// every figure that needs it.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub seconds: u32,
    pub clients_per_script: u32,
    pub fsync: bool,
    /// The phases asked for (`--phases`).
    pub phases: Vec<String>,
    pub single: Option<SingleSummary>,
    pub cluster: Option<ClusterBenchResult>,
    /// The cluster phase with `mm.wait_peer_commits = off` (COMMIT returns
    /// once the origin committed): its script-tps and p99 beside the default's.
    pub relaxed: Option<RelaxedSummary>,
    #[serde(rename = "async")]
    pub async_mesh: Option<AsyncSummary>,
    pub read: Option<ReadBenchResult>,
    pub two_pc_limit: Option<TwoPcResult>,
    /// The pgbouncer read baseline (run with the read phase).
    pub pgbouncer: Option<PgbouncerReadResult>,
    pub latency: Option<LatencyResult>,
    pub bulk: Option<BulkResult>,
    /// cluster.tps / single.tps.
    pub cluster_vs_single: Option<f64>,
    /// cluster.tps / async.tps.
    pub cluster_vs_async: Option<f64>,
    /// Select-only tps through node 1's mmd / directly on its PostgreSQL
    /// (`-M prepared`).
    pub proxy_read_ratio: Option<f64>,
    /// cluster.p99_ms / single.p99_ms.
    pub p99_ratio: Option<f64>,
    /// cluster.tps / two_pc_limit.tps (script runs per second both).
    pub cluster_vs_2pc_limit: Option<f64>,
    /// Select-only tps through pgbouncer / directly (`-M simple`).
    pub pgbouncer_read_ratio: Option<f64>,
    /// Select-only tps through mmd / directly (`-M simple`).
    pub proxy_read_ratio_simple: Option<f64>,
    /// Single-row INSERT latency, ms.
    pub insert_p50_ms: Option<SingleCluster>,
    pub insert_p99_ms: Option<SingleCluster>,
    /// Every bulk step committed through mm and every node consistent.
    pub bulk_ok: Option<bool>,
    pub copy_rows_per_s: Option<SingleCluster>,
    /// The async mesh's nodes agreed after the load, and when.
    pub converged: Option<bool>,
    pub convergence_s: Option<f64>,
    /// Phases that could not run, with why.
    pub errors: BTreeMap<String, String>,
    pub targets: Vec<TargetCheck>,
    pub all_targets_met: bool,
    /// Beyond the required targets; reported apart.
    pub stretch_targets: Vec<TargetCheck>,
    pub all_stretch_met: bool,
}

/// What the phases returned; `None` for one not run or failed.
#[derive(Debug, Default)]
pub struct PhaseResults {
    pub single: Option<BaselineResult>,
    pub cluster: Option<ClusterBenchResult>,
    pub relaxed: Option<ClusterBenchResult>,
    pub mesh: Option<AsyncMeshResult>,
    pub two_pc: Option<TwoPcResult>,
    pub read: Option<ReadBenchResult>,
    pub pgbouncer: Option<PgbouncerReadResult>,
    pub latency: Option<LatencyResult>,
    pub bulk: Option<BulkResult>,
    /// Phase name -> why it could not run.
    pub errors: BTreeMap<String, String>,
}

/// Runs the phases of `opts.phases` one after the other, each on servers of
/// its own, stopped before the next starts, and compares them. A phase that
/// fails is reported in `errors` and the bench goes on. `progress` hears
/// what starts when.
pub async fn run_bench(
    bin: &PgBin,
    opts: &BenchOptions,
    progress: &dyn Fn(&str),
) -> Result<BenchReport> {
    let secs = opts.seconds;
    let c = opts.clients;
    let mut r = PhaseResults::default();
    for phase in opts.phases.iter() {
        if crate::signals::shutting_down() {
            bail!("stopped on a signal before phase {phase}");
        }
        let outcome: Result<()> = match phase {
            Phase::Single => {
                progress(&format!(
                    "(a) single: one PostgreSQL, {secs} s of the seed's three scripts ({c} \
                     clients each)"
                ));
                run_single_with(bin, opts).await.map(|x| r.single = Some(x))
            }
            Phase::Cluster => {
                progress(&format!(
                    "(b) mm cluster: 3 PostgreSQL + 3 mmd, {secs} s, one script per node \
                     through its mmd (--max-tries {})",
                    cluster::MAX_TRIES
                ));
                run_cluster_with(bin, opts)
                    .await
                    .map(|x| r.cluster = Some(x))
            }
            Phase::Relaxed => {
                progress(&format!(
                    "(b') mm cluster relaxed: as (b) with mm.wait_peer_commits = off, {secs} s"
                ));
                cluster::run_relaxed_with(bin, opts)
                    .await
                    .map(|x| r.relaxed = Some(x))
            }
            Phase::Async => {
                progress(&format!(
                    "(c) async mesh: 3 PostgreSQL, logical replication + LWW, {secs} s, then \
                     convergence"
                ));
                run_async_mesh_with(bin, opts, &async_mesh::MeshOptions::default())
                    .await
                    .map(|x| r.mesh = Some(x))
            }
            Phase::TwoPc => {
                progress(&format!(
                    "2pc limit: 3 plain PostgreSQL, {} clients each preparing every \
                     statement on all three, {secs} s",
                    3 * c
                ));
                run_two_pc_with(opts).await.map(|x| r.two_pc = Some(x))
            }
            Phase::Read => {
                progress(&format!(
                    "(d) read: pgbench -S -M simple on a plain PostgreSQL, directly and \
                     through pgbouncer, {secs} s each"
                ));
                match run_pgbouncer_read_with(bin, opts).await {
                    Ok(x) => r.pgbouncer = Some(x),
                    Err(e) => {
                        r.errors.insert("read.pgbouncer".into(), format!("{e:#}"));
                    }
                }
                progress(&format!(
                    "(d) read: pgbench -S on node 1 of an mm cluster, directly and through \
                     its mmd, -M prepared and -M simple, {secs} s each"
                ));
                run_read_with(bin, opts).await.map(|x| r.read = Some(x))
            }
            Phase::Latency => {
                progress(&format!(
                    "latency: one client, single-row INSERTs for {secs} s on a plain \
                     PostgreSQL, then through node 1's mmd"
                ));
                r.latency = Some(run_latency_with(opts).await);
                Ok(())
            }
            Phase::Bulk => {
                progress(&format!(
                    "bulk: pgbench -i -s {}, COPY of {} rows, CREATE INDEX, on a plain \
                     PostgreSQL, then through node 1's mmd (then every node compared)",
                    bulk::SCALE,
                    bulk::COPY_ROWS
                ));
                r.bulk = Some(run_bulk_with(bin, opts).await);
                Ok(())
            }
        };
        if let Err(e) = outcome {
            progress(&format!("phase {phase} failed: {e:#}"));
            r.errors.insert(phase.name().into(), format!("{e:#}"));
        }
    }
    Ok(BenchReport::new(opts, r))
}

/// `a / b` when both are there and it means something.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

impl BenchReport {
    pub fn new(opts: &BenchOptions, r: PhaseResults) -> Self {
        let single_tps = r.single.as_ref().map(|s| s.figures.tps);
        let cluster_tps = r.cluster.as_ref().map(|c| c.figures.tps);
        let cluster_vs_single = ratio(cluster_tps, single_tps);
        let cluster_vs_async = ratio(cluster_tps, r.mesh.as_ref().map(|m| m.figures.tps));
        let cluster_vs_2pc_limit = ratio(cluster_tps, r.two_pc.as_ref().map(|t| t.figures.tps));
        let p99_ratio = ratio(
            r.cluster.as_ref().map(|c| c.figures.p99_ms),
            r.single.as_ref().map(|s| s.figures.p99_ms),
        );
        let proxy_read_ratio = r.read.as_ref().and_then(|x| x.proxy_read_ratio);
        let proxy_read_ratio_simple = r.read.as_ref().and_then(|x| x.proxy_read_ratio_simple);
        let pgbouncer_read_ratio = r.pgbouncer.as_ref().map(|p| p.pgbouncer_read_ratio);
        let lat = r.latency.as_ref();
        let insert = |f: fn(&InsertFigures) -> f64| {
            lat.map(|l| SingleCluster {
                single: l.single.as_ref().map(f),
                cluster: l.cluster.as_ref().map(f),
            })
        };
        let insert_p50_ms = insert(|x| x.p50_ms);
        let insert_p99_ms = insert(|x| x.p99_ms);
        let copy_rows_per_s = r.bulk.as_ref().map(|b| SingleCluster {
            single: b.single.as_ref().and_then(|s| s.copy_rows_per_s),
            cluster: b.cluster.as_ref().and_then(|s| s.copy_rows_per_s),
        });
        let bulk_ok = r.bulk.as_ref().map(|b| b.bulk_ok);
        let figures = targets::Figures {
            cluster_vs_single,
            cluster_vs_async,
            cluster_vs_2pc_limit,
            proxy_read_ratio,
            pgbouncer_read_ratio,
            p99_ratio,
            insert_p50_single_ms: insert_p50_ms.and_then(|x| x.single),
            insert_p50_cluster_ms: insert_p50_ms.and_then(|x| x.cluster),
            bulk_ok,
            copy_rows_per_s_single: copy_rows_per_s.and_then(|x| x.single),
            copy_rows_per_s_cluster: copy_rows_per_s.and_then(|x| x.cluster),
        };
        let required = targets::required(&figures);
        let stretch = targets::stretch(&figures);
        BenchReport {
            seconds: opts.seconds,
            clients_per_script: opts.clients,
            fsync: opts.fsync,
            phases: opts.phases.names(),
            single: r.single.map(|s| SingleSummary {
                figures: s.figures,
                rows: s.rows,
            }),
            converged: r.mesh.as_ref().map(|m| m.converged),
            convergence_s: r.mesh.as_ref().and_then(|m| m.convergence_s),
            async_mesh: r.mesh.map(|m| AsyncSummary {
                figures: m.figures,
                converged: m.converged,
                convergence_s: m.convergence_s,
                convergence_timeout_s: m.convergence_timeout_s,
                rows: m.rows,
                apply_errors: m.apply_errors,
            }),
            relaxed: r.relaxed.map(|x| RelaxedSummary {
                script_tps: x.figures.tps,
                p99_ms: x.figures.p99_ms,
                vs_default: ratio(Some(x.figures.tps), cluster_tps),
                agreed: x.agreed,
            }),
            cluster: r.cluster,
            read: r.read,
            two_pc_limit: r.two_pc,
            pgbouncer: r.pgbouncer,
            latency: r.latency,
            bulk: r.bulk,
            cluster_vs_single,
            cluster_vs_async,
            proxy_read_ratio,
            p99_ratio,
            cluster_vs_2pc_limit,
            pgbouncer_read_ratio,
            proxy_read_ratio_simple,
            insert_p50_ms,
            insert_p99_ms,
            bulk_ok,
            copy_rows_per_s,
            errors: r.errors,
            all_targets_met: required.iter().all(|t| t.met),
            targets: required,
            all_stretch_met: stretch.iter().all(|t| t.met),
            stretch_targets: stretch,
        }
    }

    /// The tables, the agreement and convergence lines, the other phases'
    /// figures, and the targets.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{} s per phase, {} clients per pgbench, fsync = {}, phases: {}\n\n",
            self.seconds,
            self.clients_per_script,
            if self.fsync { "on" } else { "off" },
            self.phases.join(",")
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
        if let Some(x) = &self.single {
            line("single", &x.figures);
        }
        if let Some(x) = &self.cluster {
            line("mm-cluster", &x.figures);
        }
        if let Some(x) = &self.relaxed {
            s.push_str(&format!(
                "{:<16} {:>10.1} {:>9} {:>9.2}   (mm.wait_peer_commits = off)\n",
                "mm-relaxed", x.script_tps, "", x.p99_ms
            ));
        }
        let mut line = |name: &str, f: &PgbenchFigures| {
            s.push_str(&format!(
                "{name:<16} {:>10.1} {:>9.2} {:>9.2} {:>9} {:>8} {:>8}\n",
                f.tps, f.p50_ms, f.p99_ms, f.transactions, f.retries, f.failures
            ))
        };
        if let Some(x) = &self.async_mesh {
            line("async-mesh", &x.figures);
        }
        if let Some(x) = &self.two_pc_limit {
            line("2pc-limit", &x.figures);
        }
        let mut reads: Vec<(&str, &ReadFigures)> = Vec::new();
        if let Some(p) = &self.pgbouncer {
            reads.push(("plain -M simple", &p.direct_simple));
            reads.push(("pgbouncer", &p.through_pgbouncer));
        }
        if let Some(r) = &self.read {
            for (name, f) in [
                ("read direct", &r.direct),
                ("read via mmd", &r.proxy),
                ("direct -M simple", &r.direct_simple),
                ("mmd -M simple", &r.proxy_simple),
            ] {
                if let Some(f) = f {
                    reads.push((name, f));
                }
            }
        }
        for (name, r) in reads {
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
            "(tps: script runs per second summed over the three scripts' clients; read: \
             pgbench -S transactions per second)\n\n",
        );
        if let Some(c) = &self.cluster {
            s.push_str(&match (c.agreed_immediately, c.agree_s) {
                (true, _) => "mm-cluster: every node equal (rows, hash sum), nothing \
                              prepared, at the first reading after the load\n"
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
        }
        if let Some(m) = &self.async_mesh {
            s.push_str(&match m.convergence_s {
                Some(t) => format!("async-mesh: converged {t:.1} s after the load\n"),
                None => format!(
                    "async-mesh: NOT converged within {:.0} s (rows {:?})\n",
                    m.convergence_timeout_s, m.rows
                ),
            });
        }
        if let Some(t) = &self.two_pc_limit {
            s.push_str(&format!(
                "2pc-limit: {} clients, {} statements committed on 3 servers, CPU idle {}{}\n",
                t.clients,
                t.statements,
                t.cpu_idle
                    .map_or("?".into(), |i| format!("{:.0}%", i * 100.0)),
                t.cpu_idle_note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            ));
            for e in &t.errors {
                s.push_str(&format!("2pc-limit error: {e}\n"));
            }
        }
        if let Some(r) = &self.read {
            s.push_str(&format!("read: {}\n", r.init));
            if let Some(e) = &r.error {
                s.push_str(&format!("read: FAILED, no read figures through mm: {e}\n"));
            }
        }
        let opt = |x: Option<f64>, unit: &str| x.map_or("-".into(), |v| format!("{v:.2}{unit}"));
        if let Some(l) = &self.latency {
            let p50 = self.insert_p50_ms.unwrap_or(SingleCluster {
                single: None,
                cluster: None,
            });
            let p99 = self.insert_p99_ms.unwrap_or(p50);
            s.push_str(&format!(
                "latency: single-row INSERT, one client: single p50 {} p99 {}; through mmd \
                 p50 {} p99 {}\n",
                opt(p50.single, " ms"),
                opt(p99.single, " ms"),
                opt(p50.cluster, " ms"),
                opt(p99.cluster, " ms"),
            ));
            for side in [&l.single, &l.cluster].into_iter().flatten() {
                if let Some(e) = &side.error {
                    s.push_str(&format!(
                        "latency: {} had {} failed inserts, first: {e}\n",
                        side.target, side.failures
                    ));
                }
            }
            for e in &l.errors {
                s.push_str(&format!("latency: {e}\n"));
            }
        }
        if let Some(b) = &self.bulk {
            for side in [&b.single, &b.cluster].into_iter().flatten() {
                s.push_str(&format!("bulk on {}:\n", side.target));
                for st in &side.steps {
                    s.push_str(&format!(
                        "  {:<24} {:>8.2} s  {}\n",
                        st.step,
                        st.elapsed_s,
                        match &st.error {
                            None => "ok".to_string(),
                            Some(e) => format!("FAILED: {e}"),
                        }
                    ));
                }
            }
            s.push_str(&format!(
                "bulk: COPY rows/s single {} cluster {}; nodes {}; bulk_ok = {}\n",
                opt(self.copy_rows_per_s.and_then(|x| x.single), ""),
                opt(self.copy_rows_per_s.and_then(|x| x.cluster), ""),
                match (b.consistent, b.agree_s) {
                    (Some(true), Some(t)) => format!("consistent ({t:.1} s after the steps)"),
                    (Some(false), _) => format!("INCONSISTENT: {}", b.problems.join("; ")),
                    _ => "not compared".into(),
                },
                b.bulk_ok
            ));
            for e in &b.errors {
                s.push_str(&format!("bulk: {e}\n"));
            }
        }
        for (phase, e) in &self.errors {
            s.push_str(&format!("phase {phase} FAILED: {e}\n"));
        }
        s.push_str("\ntargets:\n");
        s.push_str(&targets::render(&self.targets));
        s.push_str("stretch:\n");
        s.push_str(&targets::render(&self.stretch_targets));
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
