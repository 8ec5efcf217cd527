//! Phase (d), the read path, and its baselines; the builtin select-only
//! script `pgbench -S`, `clients` clients for `seconds` each run.
//!
//! - [`run_read_with`]: an mm cluster (3 PostgreSQL + 3 mmd). pgbench's
//!   tables are made through node 1's mmd with `pgbench -i -s 1 -n`, so every
//!   node gets the same ones as replicated DDL and writes; creating them
//!   directly on each node would put rows in the servers that mm never
//!   committed. If the cluster does not take it (today its one
//!   100,000-row COPY transaction ends in VoteTimeout), that is the phase's
//!   figure: the error is reported and the read figures are null; there is
//!   no fallback to smaller batches, which would measure a different load.
//!   Then every node must show every account, `VACUUM ANALYZE` runs on each
//!   (pgbench -i's own vacuum step, skipped by `-n`: VACUUM writes nothing
//!   that replicates), and pgbench -S runs directly against node 1's
//!   PostgreSQL and through node 1's mmd, with `-M prepared` and again with
//!   `-M simple`. `proxy_read_ratio` (prepared) and
//!   `proxy_read_ratio_simple` = through mmd / direct.
//! - [`run_pgbouncer_read_with`]: what a well-known proxy costs on the same
//!   load: one plain PostgreSQL with the same settings, `pgbench -i -s 1`
//!   directly, then `pgbench -S -M simple` directly and through a pgbouncer
//!   in transaction pooling ([`super::pgbouncer`]; bookworm's 1.18 keeps no
//!   prepared statements in that mode, hence `-M simple`).
//!   `pgbouncer_read_ratio` = through pgbouncer / direct.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

use super::cluster::{start_cluster, wait_on_every_node};
use super::pgbouncer::Pgbouncer;
use super::BenchOptions;
use crate::backend::local::{LocalCluster, LocalClusterConfig, SUPERUSER};
use crate::mm_cluster::MmCluster;
use crate::pg_bin::PgBin;
use crate::pgbench::read_transaction_log;

/// `pgbench -i -s` of the read phase.
pub const READ_SCALE: u32 = 1;
/// How long `pgbench -i` may take before it counts as failed.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(600);

/// One `pgbench -S` run.
#[derive(Debug, Clone, Serialize)]
pub struct ReadFigures {
    /// `node1` (PostgreSQL), `node1 (mmd)`, `pgbouncer`...
    pub target: String,
    pub port: u16,
    /// `-M`: prepared or simple.
    pub protocol: String,
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

/// Phase (d): select-only on node 1 of an mm cluster, directly and through
/// its mmd. The figures are null when `error` says why.
#[derive(Debug, Clone, Serialize)]
pub struct ReadBenchResult {
    /// "read".
    pub phase: String,
    pub scale: u32,
    pub clients: u32,
    pub seconds: u32,
    pub fsync: bool,
    /// How the pgbench tables were created (or why not).
    pub init: String,
    /// Seconds that took, until every node had every account.
    pub init_s: Option<f64>,
    /// `-M prepared`.
    pub direct: Option<ReadFigures>,
    pub proxy: Option<ReadFigures>,
    /// `proxy.tps / direct.tps`.
    pub proxy_read_ratio: Option<f64>,
    /// `-M simple`.
    pub direct_simple: Option<ReadFigures>,
    pub proxy_simple: Option<ReadFigures>,
    /// `proxy_simple.tps / direct_simple.tps`.
    pub proxy_read_ratio_simple: Option<f64>,
    /// What stopped the phase (the init through mmd failing, most likely).
    pub error: Option<String>,
}

/// The pgbouncer read baseline.
#[derive(Debug, Clone, Serialize)]
pub struct PgbouncerReadResult {
    /// "pgbouncer-read".
    pub phase: String,
    pub pgbouncer: String,
    pub pool_mode: String,
    pub scale: u32,
    pub clients: u32,
    pub seconds: u32,
    pub fsync: bool,
    pub direct_simple: ReadFigures,
    pub through_pgbouncer: ReadFigures,
    /// `through_pgbouncer.tps / direct_simple.tps`.
    pub pgbouncer_read_ratio: f64,
}

/// A fresh mm cluster (`<work_root>/bench-read`), then [`read_phase`]; the
/// cluster is stopped before this returns. Only failing to start the
/// cluster is an `Err`.
pub async fn run_read_with(bin: &PgBin, opts: &BenchOptions) -> Result<ReadBenchResult> {
    let mut cluster = start_cluster(opts, "bench-read").await?;
    Ok(read_phase(bin, &mut cluster, opts).await)
}

/// Phase (d) on a running cluster without pgbench's tables; whatever fails
/// is in `error`.
pub async fn read_phase(
    bin: &PgBin,
    cluster: &mut MmCluster,
    opts: &BenchOptions,
) -> ReadBenchResult {
    let mut r = ReadBenchResult {
        phase: "read".into(),
        scale: READ_SCALE,
        clients: opts.clients,
        seconds: opts.seconds,
        fsync: opts.fsync,
        init: String::new(),
        init_s: None,
        direct: None,
        proxy: None,
        proxy_read_ratio: None,
        direct_simple: None,
        proxy_simple: None,
        proxy_read_ratio_simple: None,
        error: None,
    };
    if let Err(e) = measure(bin, cluster, opts, &mut r).await {
        r.error = Some(format!("{e:#}"));
    }
    r
}

async fn measure(
    bin: &PgBin,
    cluster: &mut MmCluster,
    opts: &BenchOptions,
    r: &mut ReadBenchResult,
) -> Result<()> {
    let db = cluster.dbname().to_string();
    let mmd_port = cluster.nodes[0].client_port;
    let pg_port = cluster.pg.node(0).port;
    let started = Instant::now();
    let how = format!("pgbench -i -s {READ_SCALE} -n through node 1's mmd");
    r.init = format!("{how}: failed");
    pgbench_init(bin, mmd_port, &db, READ_SCALE, INIT_TIMEOUT)
        .await
        .with_context(|| how.clone())?;
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
    for i in 0..cluster.nodes.len() {
        let c = cluster.pg.connect(i).await?;
        vacuum_and_warm(&c)
            .await
            .with_context(|| format!("node {}", i + 1))?;
    }
    r.init = format!(
        "{how} (DDL replicated, the COPY one transaction committed on every node); every node \
         checked for {accounts} accounts, then VACUUM ANALYZE on each"
    );
    r.init_s = Some(started.elapsed().as_secs_f64());

    let logs = fresh_dir(&cluster.pg.work_dir().join("pgbench-read"))?;
    let run = |target: &'static str, port: u16, protocol: &'static str, log: &'static str| {
        select_only(
            bin,
            target,
            port,
            &db,
            protocol,
            opts.clients,
            opts.seconds,
            logs.join(log),
        )
    };
    let direct = run("node1", pg_port, "prepared", "direct").await?;
    let proxy = run("node1 (mmd)", mmd_port, "prepared", "proxy").await?;
    r.proxy_read_ratio = Some(proxy.tps / direct.tps);
    r.direct = Some(direct);
    r.proxy = Some(proxy);
    let direct = run("node1", pg_port, "simple", "direct-simple").await?;
    let proxy = run("node1 (mmd)", mmd_port, "simple", "proxy-simple").await?;
    r.proxy_read_ratio_simple = Some(proxy.tps / direct.tps);
    r.direct_simple = Some(direct);
    r.proxy_simple = Some(proxy);
    Ok(())
}

/// One plain server (`<work_root>/bench-pgbouncer`), pgbench's tables made
/// directly, `pgbench -S -M simple` directly and through pgbouncer.
pub async fn run_pgbouncer_read_with(
    bin: &PgBin,
    opts: &BenchOptions,
) -> Result<PgbouncerReadResult> {
    let mut cfg = LocalClusterConfig::new("bench-pgbouncer", 1);
    cfg.work_dir = Some(opts.work_root.join("bench-pgbouncer"));
    cfg.fsync = opts.fsync;
    let server = LocalCluster::start(cfg)
        .await
        .context("starting the plain server")?;
    let node = server.node(0);
    pgbench_init(bin, node.port, &node.dbname, READ_SCALE, INIT_TIMEOUT)
        .await
        .context("pgbench -i on the plain server")?;
    vacuum_and_warm(&node.connect().await?).await?;
    let bouncer = Pgbouncer::start(
        &server.work_dir().join("pgbouncer"),
        node.port,
        &node.dbname,
        opts.clients,
    )
    .await?;
    let version = pgbouncer_version();
    let logs = fresh_dir(&server.work_dir().join("pgbench-read"))?;
    let direct = select_only(
        bin,
        "node1",
        node.port,
        &node.dbname,
        "simple",
        opts.clients,
        opts.seconds,
        logs.join("direct-simple"),
    )
    .await?;
    let through = select_only(
        bin,
        "pgbouncer",
        bouncer.port(),
        &node.dbname,
        "simple",
        opts.clients,
        opts.seconds,
        logs.join("pgbouncer"),
    )
    .await?;
    Ok(PgbouncerReadResult {
        phase: "pgbouncer-read".into(),
        pgbouncer: version,
        pool_mode: "transaction".into(),
        scale: READ_SCALE,
        clients: opts.clients,
        seconds: opts.seconds,
        fsync: opts.fsync,
        pgbouncer_read_ratio: through.tps / direct.tps,
        direct_simple: direct,
        through_pgbouncer: through,
    })
}

/// `pgbouncer --version`'s first line.
fn pgbouncer_version() -> String {
    super::pgbouncer::find_pgbouncer()
        .ok()
        .and_then(|b| std::process::Command::new(b).arg("--version").output().ok())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// `pgbench -i -s SCALE -n -q` against `127.0.0.1:port`; its error line if it fails.
pub async fn pgbench_init(
    bin: &PgBin,
    port: u16,
    db: &str,
    scale: u32,
    limit: Duration,
) -> Result<()> {
    let run = tokio::process::Command::new(bin.pgbench())
        .args(["-i", "-s", &scale.to_string(), "-n", "-q"])
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
        .arg(db)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, run)
        .await
        .map_err(|_| anyhow::anyhow!("pgbench -i -s {scale} did not finish within {limit:?}"))?
        .with_context(|| format!("running {}", bin.pgbench().display()))?;
    if !out.status.success() {
        bail!(
            "pgbench -i -s {scale} failed ({}): {}",
            out.status,
            error_lines(&String::from_utf8_lossy(&out.stderr))
        );
    }
    Ok(())
}

/// The lines of pgbench's stderr that say what went wrong.
pub fn error_lines(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("error") || l.contains("ERROR") || l.starts_with("DETAIL"))
        .map(|l| l.trim_start_matches("pgbench: error: "))
        .collect();
    if lines.is_empty() {
        stderr
            .trim()
            .lines()
            .last()
            .unwrap_or("no output")
            .to_string()
    } else {
        lines.join("; ")
    }
}

/// pgbench -i's vacuum step (so autovacuum does not run in the middle of a
/// measurement), then a full read so no run pays for the first reads.
async fn vacuum_and_warm(c: &tokio_postgres::Client) -> Result<()> {
    c.batch_execute(
        "vacuum analyze pgbench_branches, pgbench_tellers, pgbench_accounts, pgbench_history",
    )
    .await
    .context("vacuum analyze of pgbench's tables")?;
    c.batch_execute("select count(*), sum(abalance) from public.pgbench_accounts")
        .await
        .context("reading pgbench_accounts")?;
    Ok(())
}

fn fresh_dir(dir: &Path) -> Result<std::path::PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

/// `pgbench -S -M <protocol> -n -c C -j C -T secs` with a per-transaction log.
#[allow(clippy::too_many_arguments)]
async fn select_only(
    bin: &PgBin,
    target: &str,
    port: u16,
    dbname: &str,
    protocol: &str,
    clients: u32,
    seconds: u32,
    log_prefix: std::path::PathBuf,
) -> Result<ReadFigures> {
    let mut prefix = std::ffi::OsString::from("--log-prefix=");
    prefix.push(&log_prefix);
    let c = clients.to_string();
    let out = tokio::process::Command::new(bin.pgbench())
        .args(["-S", "-M", protocol, "-n", "-c", &c, "-j", &c])
        .args(["-T", &seconds.to_string()])
        .arg("-l")
        .arg(prefix)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
        .arg(dbname)
        .kill_on_drop(true)
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
            "pgbench -S -M {protocol} on {target} gave no summary ({}):\n{}\n{}",
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
    let mut lat = read_transaction_log(&log_prefix)?.latencies_us;
    lat.sort_unstable();
    let ms = |p: f64| super::percentile(&lat, p).map_or(f64::NAN, |us| us as f64 / 1000.0);
    Ok(ReadFigures {
        target: target.to_string(),
        port,
        protocol: protocol.to_string(),
        tps,
        p50_ms: ms(50.0),
        p99_ms: ms(99.0),
        transactions,
        failures: failed + aborted,
        latency_avg_ms: field("latency average =").and_then(|s| s.parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::error_lines;

    #[test]
    fn keeps_the_error_lines_of_pgbench() {
        let e = "dropping old tables...\ncreating tables...\n\
                 pgbench: error: PQendcopy failed\nDETAIL: VoteTimeout\n";
        assert_eq!(error_lines(e), "PQendcopy failed; DETAIL: VoteTimeout");
        assert_eq!(error_lines("just this\n"), "just this");
        assert_eq!(error_lines(""), "no output");
    }
}
