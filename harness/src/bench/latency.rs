//! Phase latency: what one client waits for one write. A single client, a
//! loop of single-row `INSERT`s in autocommit (a prepared statement, a
//! fresh primary key each), each timed on its own, for `seconds`: on one
//! plain PostgreSQL, and through node 1's mmd on a 3-node mm cluster (the
//! table made through that mmd, replicated DDL). A loop in the harness
//! rather than pgbench: every statement's latency is exact, and the keys
//! cannot collide.

use anyhow::{Context, Result};
use serde::Serialize;
use std::time::{Duration, Instant};

use super::cluster::{start_cluster, wait_on_every_node};
use super::{percentile, BenchOptions};
use crate::backend::local::{LocalCluster, LocalClusterConfig};

pub const CREATE_TABLE: &str = "create table public.mm_latency(id bigint primary key, info text)";
pub const INSERT: &str = "insert into public.mm_latency(id, info) values ($1, 'x')";

/// One side's inserts.
#[derive(Debug, Clone, Serialize)]
pub struct InsertFigures {
    /// "single" (PostgreSQL) or "node1 (mmd)".
    pub target: String,
    /// Inserts acknowledged.
    pub inserts: u64,
    pub tps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Inserts that failed (the first error in `error`).
    pub failures: u64,
    pub error: Option<String>,
}

/// The phase in the report.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    /// "latency".
    pub phase: String,
    pub seconds: u32,
    pub fsync: bool,
    pub single: Option<InsertFigures>,
    pub cluster: Option<InsertFigures>,
    /// Why a side has no figures.
    pub errors: Vec<String>,
}

/// Both sides, each on fresh servers (`bench-latency-single`,
/// `bench-latency-cluster`), one after the other.
pub async fn run_latency_with(opts: &BenchOptions) -> LatencyResult {
    let mut errors = Vec::new();
    let single = match single(opts).await {
        Ok(f) => Some(f),
        Err(e) => {
            errors.push(format!("single: {e:#}"));
            None
        }
    };
    let cluster = match cluster(opts).await {
        Ok(f) => Some(f),
        Err(e) => {
            errors.push(format!("cluster: {e:#}"));
            None
        }
    };
    LatencyResult {
        phase: "latency".into(),
        seconds: opts.seconds,
        fsync: opts.fsync,
        single,
        cluster,
        errors,
    }
}

async fn single(opts: &BenchOptions) -> Result<InsertFigures> {
    let mut cfg = LocalClusterConfig::new("bench-latency-single", 1);
    cfg.work_dir = Some(opts.work_root.join("bench-latency-single"));
    cfg.fsync = opts.fsync;
    let server = LocalCluster::start(cfg)
        .await
        .context("starting the plain server")?;
    let c = server.connect(0).await?;
    c.batch_execute(CREATE_TABLE)
        .await
        .context("creating mm_latency")?;
    insert_loop(&c, "single", opts.seconds).await
}

async fn cluster(opts: &BenchOptions) -> Result<InsertFigures> {
    let cluster = start_cluster(opts, "bench-latency-cluster").await?;
    let c = cluster.connect_proxy(0).await?;
    c.batch_execute(CREATE_TABLE)
        .await
        .context("creating mm_latency through node 1's mmd")?;
    wait_on_every_node(
        &cluster,
        "select to_regclass('public.mm_latency') is not null",
        "the table mm_latency",
    )
    .await?;
    insert_loop(&c, "node1 (mmd)", opts.seconds).await
}

/// Inserts one row at a time for `seconds`, timing each.
pub async fn insert_loop(
    c: &tokio_postgres::Client,
    target: &str,
    seconds: u32,
) -> Result<InsertFigures> {
    let stmt = c.prepare(INSERT).await.context("preparing the insert")?;
    let mut lat = Vec::new();
    let mut failures = 0;
    let mut error = None;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(u64::from(seconds));
    let mut id: i64 = 0;
    while Instant::now() < deadline {
        id += 1;
        let t0 = Instant::now();
        match c.execute(&stmt, &[&id]).await {
            Ok(_) => lat.push(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX)),
            Err(e) => {
                failures += 1;
                if error.is_none() {
                    error = Some(mm_workloads::describe(&e));
                }
                if c.is_closed() {
                    break;
                }
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let ms = |p: f64| percentile(&lat, p).map_or(f64::NAN, |us| us as f64 / 1000.0);
    Ok(InsertFigures {
        target: target.into(),
        inserts: lat.len() as u64,
        tps: lat.len() as f64 / elapsed,
        p50_ms: ms(50.0),
        p99_ms: ms(99.0),
        failures,
        error,
    })
}
