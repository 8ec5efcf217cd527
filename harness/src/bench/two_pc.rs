//! Baseline: the limit of synchronous replication by two-phase commit,
//! without mm. Three plain PostgreSQL 15 servers (fsync as the other phases,
//! `max_prepared_transactions` set by the harness's settings), the seed's
//! table on each, and a load generator in the harness standing in for an
//! ideal coordinator: as many clients as the cluster phase has
//! (`clients` per script, one third running each script), each with one
//! connection to every server. For each statement of its script (the
//! scripts read by [`SeedScript`], `\set` values drawn as pgbench draws
//! them, each statement its own transaction as in the cluster phase) a
//! client sends `BEGIN; <stmt>; PREPARE TRANSACTION '<gid>'` as one
//! simple-query string to the three servers at once, then `COMMIT PREPARED
//! '<gid>'` to the three at once. Nothing else: no votes between peers, no
//! log of its own, no recovery, which is why it is a limit and not a rival.
//!
//! The servers evaluate `random()` in the upserts themselves, so their rows
//! differ: this measures what the commits cost, not a replica. Two clients
//! can lock the same row in opposite orders on two servers, a deadlock no
//! server sees; `lock_timeout` ([`LOCK_TIMEOUT_MS`]) ends it, the statement
//! is rolled back everywhere (`ROLLBACK` / `ROLLBACK PREPARED`) and retried,
//! as pgbench retries 40001 in the cluster phase.
//!
//! A script run is the unit of the cluster phase's script-tps: tps is
//! finished script runs per second over all clients, p50/p99 the latency of
//! one script run (nearest rank, as [`super::percentile`]). CPU idle over
//! the load is read from `/proc/stat`: an idle machine would mean the
//! clients, not the servers, set the figure.

use anyhow::{bail, Context, Result};
use futures_util::future::join_all;
use rand::SeedableRng;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::cpu::{idle_fraction, CpuTimes};
use super::script::SeedScript;
use super::{percentile, BenchOptions, PgbenchFigures, CREATE_MM, SCRIPTS};
use crate::backend::local::{LocalCluster, LocalClusterConfig};
use crate::pgbench::scripts_dir;

/// `lock_timeout` of the load's sessions: ends deadlocks across servers.
pub const LOCK_TIMEOUT_MS: u64 = 1000;
/// Tries of one statement (as `--max-tries` of the cluster phase).
pub const MAX_TRIES: u32 = super::cluster::MAX_TRIES;
/// Idle CPU above this during the load gets a note in the report.
pub const IDLE_NOTE_ABOVE: f64 = 0.2;
/// Hard errors kept for the report.
const ERRORS_KEPT: usize = 5;

/// The 2PC limit in the report (`two_pc_limit`).
#[derive(Debug, Clone, Serialize)]
pub struct TwoPcResult {
    /// "2pc-limit".
    pub phase: String,
    pub nodes: usize,
    pub seconds: u32,
    /// All clients (`clients_per_script` x 3).
    pub clients: u32,
    pub clients_per_script: u32,
    pub fsync: bool,
    /// tps (script runs per second), p50_ms, p99_ms, transactions (script
    /// runs), failures (script runs given up), retries (statements retried).
    #[serde(flatten)]
    pub figures: PgbenchFigures,
    /// Statements committed on all three servers.
    pub statements: u64,
    pub lock_timeout_ms: u64,
    /// `max_prepared_transactions` of the servers.
    pub max_prepared_transactions: i64,
    /// Share of CPU time idle during the load (0..1).
    pub cpu_idle: Option<f64>,
    /// Set when `cpu_idle` is above [`IDLE_NOTE_ABOVE`].
    pub cpu_idle_note: Option<String>,
    /// The first hard errors (a client stops at one).
    pub errors: Vec<String>,
}

/// What one client did.
#[derive(Debug, Default)]
struct ClientOutcome {
    scripts: u64,
    latencies_us: Vec<u64>,
    statements: u64,
    retries: u64,
    failures: u64,
    error: Option<String>,
}

/// How one statement's two-phase commit went wrong.
enum Attempt {
    /// Rolled back everywhere; try again.
    Retry,
    Fatal(anyhow::Error),
}

/// Three fresh servers in `<work_root>/bench-2pc`, the load for
/// `opts.seconds`; the servers are stopped before this returns.
pub async fn run_two_pc_with(opts: &BenchOptions) -> Result<TwoPcResult> {
    let mut cfg = LocalClusterConfig::new("bench-2pc", 3);
    cfg.work_dir = Some(opts.work_root.join("bench-2pc"));
    cfg.fsync = opts.fsync;
    let cluster = LocalCluster::start(cfg)
        .await
        .context("starting three plain PostgreSQL servers")?;
    let clients = opts.clients * SCRIPTS.len() as u32;
    let mut max_prepared = i64::MAX;
    for i in 0..3 {
        let c = cluster.connect(i).await?;
        c.batch_execute(CREATE_MM)
            .await
            .with_context(|| format!("creating mm on node {}", i + 1))?;
        let v: String = c
            .query_one("show max_prepared_transactions", &[])
            .await?
            .get(0);
        max_prepared = max_prepared.min(v.parse().context("max_prepared_transactions")?);
    }
    if max_prepared < i64::from(clients) {
        bail!("max_prepared_transactions = {max_prepared}, fewer than the {clients} clients");
    }
    let mut scripts = Vec::new();
    for name in SCRIPTS {
        let path = scripts_dir().join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        scripts.push(Arc::new(SeedScript::parse(name, &text)?));
    }
    let conninfos: Arc<Vec<String>> = Arc::new((0..3).map(|i| cluster.conninfo(i)).collect());

    // Connect every client first, so the clock runs over the load only.
    let mut sessions = Vec::new();
    for k in 0..clients {
        sessions.push(
            connect_all(&conninfos)
                .await
                .with_context(|| format!("client {k}: connecting to the three servers"))?,
        );
    }
    let before = CpuTimes::read()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(u64::from(opts.seconds));
    let tasks: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(k, conns)| {
            let script = scripts[k % scripts.len()].clone();
            tokio::spawn(run_client(k, script, conns, deadline))
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.context("a 2PC client task")?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_idle = idle_fraction(before, CpuTimes::read()?);

    let mut lat: Vec<u64> = outcomes
        .iter()
        .flat_map(|o| o.latencies_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let ms = |p: f64| percentile(&lat, p).map_or(f64::NAN, |us| us as f64 / 1000.0);
    let transactions: u64 = outcomes.iter().map(|o| o.scripts).sum();
    let figures = PgbenchFigures {
        tps: transactions as f64 / elapsed,
        p50_ms: ms(50.0),
        p99_ms: ms(99.0),
        transactions,
        failures: outcomes.iter().map(|o| o.failures).sum(),
        retries: outcomes.iter().map(|o| o.retries).sum(),
    };
    Ok(TwoPcResult {
        phase: "2pc-limit".into(),
        nodes: 3,
        seconds: opts.seconds,
        clients,
        clients_per_script: opts.clients,
        fsync: opts.fsync,
        figures,
        statements: outcomes.iter().map(|o| o.statements).sum(),
        lock_timeout_ms: LOCK_TIMEOUT_MS,
        max_prepared_transactions: max_prepared,
        cpu_idle,
        cpu_idle_note: idle_note(cpu_idle, clients),
        errors: outcomes
            .iter()
            .filter_map(|o| o.error.clone())
            .take(ERRORS_KEPT)
            .collect(),
    })
}

/// The note for an idle machine.
pub fn idle_note(idle: Option<f64>, clients: u32) -> Option<String> {
    let idle = idle?;
    (idle > IDLE_NOTE_ABOVE).then(|| {
        format!(
            "CPU {:.0}% idle with {clients} clients: the load did not saturate the machine, \
             so this limit may be low (more clients could give more)",
            idle * 100.0
        )
    })
}

async fn connect_all(conninfos: &[String]) -> Result<Vec<Client>> {
    let mut conns = Vec::new();
    for ci in conninfos {
        let (c, conn) = tokio_postgres::connect(ci, NoTls)
            .await
            .with_context(|| format!("connecting to {ci}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        c.batch_execute(&format!("set lock_timeout = {LOCK_TIMEOUT_MS}"))
            .await
            .context("set lock_timeout")?;
        conns.push(c);
    }
    Ok(conns)
}

/// Script runs until `deadline` (the run in flight finishes).
async fn run_client(
    k: usize,
    script: Arc<SeedScript>,
    conns: Vec<Client>,
    deadline: Instant,
) -> ClientOutcome {
    let mut out = ClientOutcome::default();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(k as u64);
    let mut seq = 0u64;
    while Instant::now() < deadline {
        let statements = match script.expand(&script.draw(&mut rng)) {
            Ok(s) => s,
            Err(e) => {
                out.error = Some(format!("{e:#}"));
                out.failures += 1;
                return out;
            }
        };
        let t0 = Instant::now();
        let mut gave_up = false;
        for stmt in &statements {
            let mut tries = 0;
            loop {
                seq += 1;
                tries += 1;
                let gid = format!("mmb_{k}_{seq}");
                match commit_everywhere(&conns, stmt, &gid).await {
                    Ok(()) => {
                        out.statements += 1;
                        break;
                    }
                    Err(Attempt::Retry) if tries < MAX_TRIES => out.retries += 1,
                    Err(Attempt::Retry) => {
                        gave_up = true;
                        break;
                    }
                    Err(Attempt::Fatal(e)) => {
                        out.failures += 1;
                        out.error = Some(format!("client {k}: {e:#}"));
                        return out;
                    }
                }
            }
            if gave_up {
                break;
            }
        }
        if gave_up {
            out.failures += 1;
        } else {
            out.scripts += 1;
            out.latencies_us
                .push(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
        }
    }
    out
}

/// One statement, prepared on every server at once and then committed on
/// every server at once; on an error, rolled back wherever it got to.
async fn commit_everywhere(conns: &[Client], stmt: &str, gid: &str) -> Result<(), Attempt> {
    // One string per server: BEGIN, the statement and PREPARE travel in one
    // round trip, as a coordinator that pipelines them would send them.
    let prepare = format!("BEGIN; {stmt}; PREPARE TRANSACTION '{gid}'");
    let prepared = join_all(conns.iter().map(|c| c.simple_query(&prepare))).await;
    if prepared.iter().all(Result::is_ok) {
        let commit = format!("COMMIT PREPARED '{gid}'");
        for (i, r) in join_all(conns.iter().map(|c| c.batch_execute(&commit)))
            .await
            .into_iter()
            .enumerate()
        {
            r.map_err(|e| {
                Attempt::Fatal(anyhow::Error::new(e).context(format!(
                    "COMMIT PREPARED on node {} (the transaction stays prepared)",
                    i + 1
                )))
            })?;
        }
        return Ok(());
    }
    let rollback_prepared = format!("ROLLBACK PREPARED '{gid}'");
    let undo = join_all(conns.iter().zip(&prepared).map(|(c, r)| {
        // A server that failed is in an aborted transaction block (or none:
        // ROLLBACK then only warns); one that prepared holds it prepared.
        let sql = if r.is_ok() {
            rollback_prepared.as_str()
        } else {
            "ROLLBACK"
        };
        c.batch_execute(sql)
    }))
    .await;
    for (i, u) in undo.into_iter().enumerate() {
        u.map_err(|e| {
            Attempt::Fatal(anyhow::Error::new(e).context(format!("rolling back on node {}", i + 1)))
        })?;
    }
    let Some((i, err)) = prepared
        .into_iter()
        .enumerate()
        .find_map(|(i, r)| r.err().map(|e| (i, e)))
    else {
        return Err(Attempt::Retry);
    };
    if retryable(&err) {
        Err(Attempt::Retry)
    } else {
        Err(Attempt::Fatal(
            anyhow::Error::new(err).context(format!("node {}: {prepare}", i + 1)),
        ))
    }
}

/// Errors a retry can get past: lock waits across servers ended by
/// `lock_timeout`, deadlocks, serialization failures.
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::LOCK_NOT_AVAILABLE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::idle_note;

    #[test]
    fn notes_an_idle_machine_only() {
        assert!(idle_note(Some(0.1), 30).is_none());
        assert!(idle_note(None, 30).is_none());
        let n = idle_note(Some(0.35), 30).unwrap();
        assert!(n.contains("35%") && n.contains("30 clients"), "{n}");
    }
}
