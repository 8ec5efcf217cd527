//! `mm-harness demo`: the main job. A local N-node mm cluster under the
//! seed workload (test1/2/3.sql at once, one per node, through each node's
//! mmd, `-M prepared`, 10 clients, 40001 retried) plus the bank and ledger
//! workloads, then every node read directly: equal hash sums and row
//! counts, bank total conserved, every acknowledged ledger row present,
//! nothing left prepared.

use crate::backend::local::LocalClusterConfig;
use crate::bench::percentile;
use crate::checks::{check_nodes, Expect, Verdict};
use crate::mm_cluster::{MmCluster, MmOptions};
use crate::pgbench::{read_transaction_log, scripts_dir, Pgbench};
use anyhow::{Context, Result};
use mm_workloads::bank::{bank_seed_sql, run_bank, BankConfig, BankReport, BANK_SCHEMA};
use mm_workloads::conn::Stop;
use mm_workloads::ledger::{run_ledger, LedgerConfig, LedgerReport, LEDGER_SCHEMA};
use serde::Serialize;
use std::time::{Duration, Instant};

pub const SEED_SCHEMA: &str = "create table mm(id int primary key, info text, mod_time timestamp)";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub nodes: usize,
    pub duration: Duration,
    /// pgbench clients per node.
    pub clients: u32,
    /// fsync on the PostgreSQL servers (off: faster, test-only durability).
    pub fsync: bool,
    pub bank_accounts: i32,
    pub work_dir: Option<std::path::PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            nodes: 3,
            duration: Duration::from_secs(30),
            clients: 10,
            fsync: false,
            bank_accounts: 100,
            work_dir: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeLoad {
    pub node: usize,
    pub script: String,
    /// Scripts per second (pgbench's tps: one script = one pgbench transaction).
    pub tps: f64,
    pub transactions: u64,
    /// pgbench transactions that failed after their retries.
    pub failed: u64,
    /// pgbench retries (40001 from the cluster, 40P01).
    pub retried: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub clients_aborted: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub consistent: bool,
    pub problems: Vec<String>,
    pub hash_sums: Vec<Option<i64>>,
    pub row_counts: Vec<Option<i64>>,
    /// Total script-tps over all nodes.
    pub tps: f64,
    pub per_node: Vec<NodeLoad>,
    /// Retries pgbench made plus aborts the checked workloads saw (40001).
    pub aborts: u64,
    pub ledger_acknowledged: usize,
    pub ledger_missing: i64,
    pub prepared_left: i64,
    pub bank_ok: bool,
    pub bank_transfers: u64,
    pub settle_s: f64,
    pub duration_s: f64,
    pub fsync: bool,
    #[serde(skip)]
    pub verdict: Option<Verdict>,
    #[serde(skip)]
    pub bank: Option<BankReport>,
    #[serde(skip)]
    pub ledger: Option<LedgerReport>,
}

/// Run the demo; the cluster is stopped when this returns.
pub async fn run_demo(opts: &DemoOptions, progress: &dyn Fn(&str)) -> Result<DemoReport> {
    let mut pg_cfg = if opts.fsync {
        LocalClusterConfig::new("demo", opts.nodes)
    } else {
        LocalClusterConfig::for_tests("demo", opts.nodes)
    };
    pg_cfg.work_dir = opts.work_dir.clone();
    progress(&format!(
        "starting {} PostgreSQL 15 servers and {} mmd (fsync={})",
        opts.nodes,
        opts.nodes,
        if opts.fsync { "on" } else { "off" }
    ));
    let cluster = MmCluster::start(pg_cfg, MmOptions::default()).await?;
    let work = cluster.pg.work_dir().to_path_buf();
    progress(&format!("cluster online; work dir {}", work.display()));

    // Schema through node 1 only: the other nodes get it as replicated DDL.
    let n1 = cluster.connect_proxy(0).await?;
    for sql in [SEED_SCHEMA, BANK_SCHEMA, LEDGER_SCHEMA] {
        n1.batch_execute(sql)
            .await
            .with_context(|| format!("through node 1's mmd: {sql}"))?;
    }
    let initial = 1000;
    n1.batch_execute(&bank_seed_sql(opts.bank_accounts, initial))
        .await
        .context("seeding the bank")?;
    drop(n1);
    // The seeding commit was acknowledged when node 1 committed; the others
    // run COMMIT PREPARED moments later. Start readers once all have it.
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..opts.nodes {
        let db = cluster.pg.connect(i).await?;
        loop {
            let n: i64 = db
                .query_one("select count(*) from mm_bank", &[])
                .await?
                .get(0);
            if n == i64::from(opts.bank_accounts) {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("node {} never showed the seeded bank accounts", i + 1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    progress("schema created through node 1 (replicated as DDL)");

    let proxies: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.client_conninfo(cluster.dbname()))
        .collect();
    let direct: Vec<String> = (0..opts.nodes).map(|i| cluster.pg.conninfo(i)).collect();
    let secs = opts.duration.as_secs().max(1) as u32;

    progress(&format!(
        "running for {secs} s: test1/2/3.sql ({} clients each, -M prepared) + bank + ledger",
        opts.clients
    ));
    let bin = cluster.pg.bin().clone();
    let mut benches = Vec::new();
    for i in 0..opts.nodes {
        let script = scripts_dir().join(format!("test{}.sql", i % 3 + 1));
        let log_prefix = work.join(format!("pgbench-node{}", i + 1));
        let mut pb = Pgbench::new(script, opts.clients, secs).with_transaction_log(&log_prefix);
        pb.max_tries = Some(1000);
        let port = cluster.nodes[i].client_port;
        let db = cluster.dbname().to_string();
        let bin = bin.clone();
        benches.push(tokio::spawn(async move {
            let out = pb.run_at(&bin, port, &db).await;
            (pb, log_prefix, out)
        }));
    }
    let bank_cfg = BankConfig::new(proxies.clone(), opts.bank_accounts, initial);
    let ledger_cfg = LedgerConfig::new(proxies.clone());
    let stop = Stop::after(opts.duration);
    let bank = {
        let cfg = bank_cfg.clone();
        let stop = stop.clone();
        tokio::spawn(async move { run_bank(&cfg, stop).await })
    };
    let ledger = {
        let cfg = ledger_cfg.clone();
        let stop = stop.clone();
        tokio::spawn(async move { run_ledger(&cfg, stop).await })
    };

    let mut per_node = Vec::new();
    for (i, h) in benches.into_iter().enumerate() {
        let (pb, prefix, out) = h.await.context("pgbench task")?;
        let out = out?;
        let log = read_transaction_log(&prefix).unwrap_or_default();
        let mut lat = log.latencies_us;
        lat.sort_unstable();
        let q = |p: f64| percentile(&lat, p * 100.0).map_or(0.0, |us| us as f64 / 1000.0);
        if !out.success {
            progress(&format!(
                "pgbench on node {} reported a failure:\n{}",
                i + 1,
                out.stderr.lines().take(5).collect::<Vec<_>>().join("\n")
            ));
        }
        per_node.push(NodeLoad {
            node: i + 1,
            script: pb
                .script
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            tps: out.tps.unwrap_or(0.0),
            transactions: out.transactions.unwrap_or(0),
            failed: out.failed.unwrap_or(0),
            retried: out.retried.unwrap_or(0),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            clients_aborted: out.aborted_clients,
        });
    }
    let bank = bank.await.context("bank task")?;
    let ledger = ledger.await.context("ledger task")?;
    progress("load stopped; waiting for in-flight transactions to finish");

    // The last commits are acknowledged after the origin's COMMIT PREPARED;
    // peers finish theirs moments later. Wait (bounded) for that, then read.
    let settle_start = Instant::now();
    let settle_limit = Duration::from_secs(30);
    loop {
        let mut left = 0i64;
        for c in &direct {
            if let Ok(db) = mm_workloads::conn::connect(c, Duration::from_secs(5)).await {
                if let Ok(r) = db
                    .query_one("select count(*) from pg_prepared_xacts", &[])
                    .await
                {
                    left += r.get::<_, i64>(0);
                }
            }
        }
        if left == 0 || settle_start.elapsed() > settle_limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settle_s = settle_start.elapsed().as_secs_f64();

    let expect = Expect {
        bank_total: Some(bank_cfg.expected_total()),
        acknowledged: Some(ledger.acknowledged.clone()),
    };
    let verdict = check_nodes(&direct, &expect).await;
    let mut problems = verdict.problems.clone();
    if !bank.ok() {
        problems.push("bank readers saw a wrong total while transfers ran".into());
    }
    for n in &per_node {
        if n.clients_aborted > 0 {
            problems.push(format!(
                "pgbench on node {}: {} clients aborted on errors",
                n.node, n.clients_aborted
            ));
        }
    }
    let aborts =
        per_node.iter().map(|n| n.retried).sum::<u64>() + bank.writers.aborts + ledger.stats.aborts;
    let report = DemoReport {
        consistent: verdict.consistent && problems.is_empty(),
        problems,
        hash_sums: verdict.nodes.iter().map(|n| n.hash_sum.flatten()).collect(),
        row_counts: verdict.nodes.iter().map(|n| n.mm_rows).collect(),
        tps: per_node.iter().map(|n| n.tps).sum(),
        per_node,
        aborts,
        ledger_acknowledged: ledger.acknowledged.len(),
        ledger_missing: verdict
            .nodes
            .iter()
            .filter_map(|n| n.ledger_missing)
            .max()
            .unwrap_or(0),
        prepared_left: verdict.nodes.iter().filter_map(|n| n.prepared_left).sum(),
        bank_ok: bank.ok(),
        bank_transfers: bank.writers.committed,
        settle_s,
        duration_s: opts.duration.as_secs_f64(),
        fsync: opts.fsync,
        verdict: Some(verdict),
        bank: Some(bank),
        ledger: Some(ledger),
    };
    Ok(report)
}

impl DemoReport {
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "\n{:<6} {:<10} {:>9} {:>8} {:>8} {:>9} {:>9}\n",
            "node", "script", "tps", "retried", "failed", "p50 ms", "p99 ms"
        ));
        for n in &self.per_node {
            s.push_str(&format!(
                "{:<6} {:<10} {:>9.1} {:>8} {:>8} {:>9.2} {:>9.2}\n",
                format!("node{}", n.node),
                n.script,
                n.tps,
                n.retried,
                n.failed,
                n.p50_ms,
                n.p99_ms
            ));
        }
        s.push_str(&format!("total script-tps: {:.1}\n", self.tps));
        if let Some(b) = &self.bank {
            s.push_str(&format!("bank:   {}\n", b.render()));
        }
        if let Some(l) = &self.ledger {
            s.push_str(&format!("ledger: {}\n", l.render()));
        }
        if let Some(v) = &self.verdict {
            s.push_str(&v.render());
            s.push('\n');
        }
        s.push_str(&format!(
            "settled {:.1} s after the load stopped\n",
            self.settle_s
        ));
        s.push_str(&if self.consistent {
            "VERDICT: CONSISTENT: equal hash sums and row counts on every node, bank total \
             conserved, every acknowledged ledger row present, no prepared transaction left\n"
                .to_string()
        } else {
            format!("VERDICT: INCONSISTENT:\n  {}\n", self.problems.join("\n  "))
        });
        s
    }
}
