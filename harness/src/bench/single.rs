//! Baseline (a): one plain PostgreSQL 15, the seed's three scripts at once
//! against it. No replication, no triggers: the ceiling a single server gives.

use anyhow::{Context, Result};
use std::path::Path;

use super::{count_and_hash_sum, run_seed_scripts, BaselineResult, BenchOptions, CREATE_MM};
use crate::backend::local::{LocalCluster, LocalClusterConfig};
use crate::pg_bin::PgBin;

/// One plain node, `secs` seconds of the seed workload, durable settings
/// (fsync on); the cluster lives in `<work_root>/bench-single`.
pub async fn run_single(bin: &PgBin, secs: u32, work_root: &Path) -> Result<BaselineResult> {
    run_single_with(bin, &BenchOptions::new(secs, work_root)).await
}

pub async fn run_single_with(bin: &PgBin, opts: &BenchOptions) -> Result<BaselineResult> {
    let mut cfg = LocalClusterConfig::new("bench-single", 1);
    cfg.work_dir = Some(opts.work_root.join("bench-single"));
    cfg.fsync = opts.fsync;
    let cluster = LocalCluster::start(cfg)
        .await
        .context("starting the single node")?;
    let node = cluster.node(0);
    let client = node.connect().await?;
    client
        .batch_execute(CREATE_MM)
        .await
        .context("creating mm")?;
    let run = run_seed_scripts(
        bin,
        [node, node, node],
        opts.seconds,
        opts.clients,
        &cluster.work_dir().join("pgbench"),
    )
    .await?;
    let (rows, _) = count_and_hash_sum(&client).await?;
    Ok(BaselineResult {
        baseline: "single".into(),
        nodes: 1,
        seconds: opts.seconds,
        clients_per_script: opts.clients,
        fsync: opts.fsync,
        figures: run.figures,
        scripts: run.scripts,
        rows,
    })
}
