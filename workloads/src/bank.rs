//! Jepsen-style bank: transfers between accounts must conserve the total.
//!
//! Why: a transfer is two UPDATEs in one explicit transaction. If any node
//! ever applies half a transfer, applies one twice, loses one, or makes a
//! transaction visible before it is committed everywhere, some reader's
//! `sum(balance)` (or the final per-node totals the checker reads) differs
//! from accounts × initial balance. Writers and readers run on every node at
//! once, so a multi-master cluster is exercised where it is weakest: the
//! same rows updated concurrently through different nodes. Amounts are
//! random and may drive balances negative: only the total is invariant.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};

use crate::conn::{classify, client_seed, connect, describe, Failure, Stop, RECONNECT_PAUSE};
use crate::stats::{Stats, ERROR_SAMPLES};

/// The bank's table.
pub const BANK_SCHEMA: &str = "create table mm_bank(id int primary key, balance bigint not null)";

/// One INSERT creating accounts `1..=accounts`, each holding `initial`.
pub fn bank_seed_sql(accounts: i32, initial: i64) -> String {
    format!("insert into mm_bank(id, balance) select g, {initial} from generate_series(1, {accounts}) g")
}

/// The total every reader must see: `accounts × initial`.
pub fn bank_expected_total(accounts: i32, initial: i64) -> i64 {
    i64::from(accounts) * initial
}

/// How to run the bank.
#[derive(Debug, Clone)]
pub struct BankConfig {
    /// One connection string per node (the client endpoint to write through).
    pub conninfos: Vec<String>,
    /// Accounts `1..=accounts` (as seeded by [`bank_seed_sql`]); at least 2.
    pub accounts: i32,
    /// The balance each account was seeded with.
    pub initial_balance: i64,
    /// Transfer tasks per node, each with its own connection.
    pub writers_per_node: usize,
    /// `sum(balance)` reader tasks per node, each with its own connection.
    pub readers_per_node: usize,
    /// Transfers move `1..=max_amount`.
    pub max_amount: i64,
    /// Pause between two reads of one reader.
    pub read_pause: Duration,
    /// Seeds every client's `StdRng`.
    pub seed: u64,
    /// Longest a connect or a whole transfer may take; past it the connection
    /// is dropped (a commit in flight then counts as uncertain).
    pub op_timeout: Duration,
}

impl BankConfig {
    /// 2 writers and 1 reader per node, amounts up to 100, seed 1, 10 s timeout.
    pub fn new(conninfos: Vec<String>, accounts: i32, initial_balance: i64) -> BankConfig {
        BankConfig {
            conninfos,
            accounts,
            initial_balance,
            writers_per_node: 2,
            readers_per_node: 1,
            max_amount: 100,
            read_pause: Duration::from_millis(5),
            seed: 1,
            op_timeout: Duration::from_secs(10),
        }
    }

    pub fn expected_total(&self) -> i64 {
        bank_expected_total(self.accounts, self.initial_balance)
    }
}

/// What the readers saw.
#[derive(Debug, Clone, Serialize)]
pub struct ReadStats {
    /// `committed` counts successful reads; the other buckets as for writes.
    pub ops: Stats,
    /// Every total any reader saw, with how often.
    pub totals_seen: BTreeMap<i64, u64>,
    /// Reads whose total (or row count) was not the expected one.
    pub violations: u64,
    /// The first few of them, as "node2: total 9990, 10 rows".
    pub violation_samples: Vec<String>,
}

impl ReadStats {
    fn new() -> ReadStats {
        ReadStats {
            ops: Stats::new(),
            totals_seen: BTreeMap::new(),
            violations: 0,
            violation_samples: Vec::new(),
        }
    }

    fn merge(&mut self, o: &ReadStats) {
        self.ops.merge(&o.ops);
        for (t, n) in &o.totals_seen {
            *self.totals_seen.entry(*t).or_default() += n;
        }
        self.violations += o.violations;
        for v in &o.violation_samples {
            if self.violation_samples.len() < ERROR_SAMPLES {
                self.violation_samples.push(v.clone());
            }
        }
    }
}

/// The outcome of [`run_bank`].
#[derive(Debug, Clone, Serialize)]
pub struct BankReport {
    pub expected_total: i64,
    pub accounts: i32,
    pub elapsed_s: f64,
    /// All transfers.
    pub writers: Stats,
    /// Transfers per node, in `conninfos` order.
    pub writers_per_node: Vec<Stats>,
    /// All reads.
    pub readers: ReadStats,
}

impl BankReport {
    /// No reader saw a wrong total and no client hit an unexpected error.
    pub fn ok(&self) -> bool {
        self.readers.violations == 0 && self.writers.errors == 0 && self.readers.ops.errors == 0
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "bank: {} accounts, expected total {}, {:.1} s\n  transfers: {}\n",
            self.accounts,
            self.expected_total,
            self.elapsed_s,
            self.writers.summary()
        );
        for (i, w) in self.writers_per_node.iter().enumerate() {
            s.push_str(&format!("    node{}: {}\n", i + 1, w.summary()));
        }
        s.push_str(&format!(
            "  reads: {}\n  totals seen: {:?}; wrong totals: {}",
            self.readers.ops.summary(),
            self.readers.totals_seen,
            self.readers.violations
        ));
        if !self.readers.violation_samples.is_empty() {
            s.push_str(&format!(" ({})", self.readers.violation_samples.join("; ")));
        }
        s
    }
}

/// Runs transfers and readers on every node until `stop`; returns once every
/// client has finished. The table must exist and be seeded.
pub async fn run_bank(cfg: &BankConfig, stop: Stop) -> BankReport {
    assert!(cfg.accounts >= 2, "the bank needs at least 2 accounts");
    assert!(cfg.max_amount >= 1, "max_amount must be positive");
    let t0 = Instant::now();
    let cfg = Arc::new(cfg.clone());
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for node in 0..cfg.conninfos.len() {
        for w in 0..cfg.writers_per_node {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            let rng = StdRng::seed_from_u64(client_seed(cfg.seed, node, w));
            writers.push((
                node,
                tokio::spawn(async move { writer(&cfg, node, rng, &stop).await }),
            ));
        }
        for r in 0..cfg.readers_per_node {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            readers.push(tokio::spawn(
                async move { reader(&cfg, node, r, &stop).await },
            ));
        }
    }
    let mut per_node: Vec<Stats> = (0..cfg.conninfos.len()).map(|_| Stats::new()).collect();
    for (node, h) in writers {
        match h.await {
            Ok(s) => per_node[node].merge(&s),
            Err(e) => per_node[node].record_error(format!("writer task failed: {e}")),
        }
    }
    let mut rs = ReadStats::new();
    for h in readers {
        match h.await {
            Ok(r) => rs.merge(&r),
            Err(e) => rs.ops.record_error(format!("reader task failed: {e}")),
        }
    }
    BankReport {
        expected_total: cfg.expected_total(),
        accounts: cfg.accounts,
        elapsed_s: t0.elapsed().as_secs_f64(),
        writers: Stats::merged(&per_node),
        writers_per_node: per_node,
        readers: rs,
    }
}

struct WriterConn {
    client: Client,
    debit: Statement,
    credit: Statement,
}

async fn writer_conn(cfg: &BankConfig, node: usize) -> anyhow::Result<WriterConn> {
    let client = connect(&cfg.conninfos[node], cfg.op_timeout).await?;
    let prep = async {
        let debit = client
            .prepare("UPDATE mm_bank SET balance = balance - $1 WHERE id = $2")
            .await?;
        let credit = client
            .prepare("UPDATE mm_bank SET balance = balance + $1 WHERE id = $2")
            .await?;
        Ok::<_, tokio_postgres::Error>((debit, credit))
    };
    let (debit, credit) = tokio::time::timeout(cfg.op_timeout, prep)
        .await
        .map_err(|_| anyhow::anyhow!("preparing statements timed out"))?
        .map_err(|e| anyhow::anyhow!("preparing statements: {}", describe(&e)))?;
    Ok(WriterConn {
        client,
        debit,
        credit,
    })
}

/// A transfer that did not commit (or may not have: see `committing`).
struct TxFailed {
    err: Failure,
}

async fn transfer(
    c: &WriterConn,
    from: i32,
    to: i32,
    amount: i64,
    committing: &mut bool,
) -> Result<(), TxFailed> {
    let fail = |e: tokio_postgres::Error| TxFailed { err: classify(&e) };
    c.client.batch_execute("BEGIN").await.map_err(fail)?;
    for (stmt, id) in [(&c.debit, from), (&c.credit, to)] {
        let n = c
            .client
            .execute(stmt, &[&amount, &id])
            .await
            .map_err(fail)?;
        if n != 1 {
            return Err(TxFailed {
                err: Failure::Other(format!("update of account {id} touched {n} rows")),
            });
        }
    }
    *committing = true;
    c.client.batch_execute("COMMIT").await.map_err(fail)
}

async fn writer(cfg: &BankConfig, node: usize, mut rng: StdRng, stop: &Stop) -> Stats {
    let mut stats = Stats::new();
    let mut conn: Option<WriterConn> = None;
    while !stop.is_done() {
        let c = match conn.as_ref().filter(|c| !c.client.is_closed()) {
            Some(c) => c,
            None => match writer_conn(cfg, node).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    conn = None;
                    stats.record_conn_lost();
                    stop.sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            },
        };
        let from = rng.gen_range(1..=cfg.accounts);
        let mut to = rng.gen_range(1..cfg.accounts);
        if to >= from {
            to += 1;
        }
        let amount = rng.gen_range(1..=cfg.max_amount);
        let t0 = Instant::now();
        let mut committing = false;
        let r = tokio::time::timeout(
            cfg.op_timeout,
            transfer(c, from, to, amount, &mut committing),
        )
        .await;
        let (failure, drop_conn) = match r {
            Ok(Ok(())) => {
                stats.record_commit(t0.elapsed());
                continue;
            }
            Ok(Err(TxFailed { err })) => {
                let lost = matches!(err, Failure::Lost(_)) || c.client.is_closed();
                (err, lost)
            }
            Err(_) => (
                Failure::Lost(format!("transfer timed out after {:?}", cfg.op_timeout)),
                true,
            ),
        };
        match failure {
            Failure::Lost(_) if committing => stats.record_uncertain(),
            Failure::Lost(_) => stats.record_conn_lost(),
            Failure::Abort => stats.record_abort(),
            Failure::Other(m) => stats.record_error(format!("node{}: {m}", node + 1)),
        }
        if drop_conn {
            conn = None;
            continue;
        }
        // The transaction failed inside its block: end it before the next one.
        // A COMMIT that failed has already ended it; ROLLBACK then only warns.
        let rb = tokio::time::timeout(cfg.op_timeout, c.client.batch_execute("ROLLBACK")).await;
        if !matches!(rb, Ok(Ok(()))) {
            conn = None;
        }
    }
    stats
}

async fn reader(cfg: &BankConfig, node: usize, idx: usize, stop: &Stop) -> ReadStats {
    let mut rs = ReadStats::new();
    let expected = cfg.expected_total();
    let mut client: Option<Client> = None;
    while !stop.is_done() {
        let c = match client.as_ref().filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => match connect(&cfg.conninfos[node], cfg.op_timeout).await {
                Ok(c) => client.insert(c),
                Err(_) => {
                    rs.ops.record_conn_lost();
                    stop.sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            },
        };
        let t0 = Instant::now();
        let q = c.query_one("select sum(balance)::bigint, count(*) from mm_bank", &[]);
        match tokio::time::timeout(cfg.op_timeout, q).await {
            Ok(Ok(row)) => {
                rs.ops.record_commit(t0.elapsed());
                let total: Option<i64> = row.get(0);
                let rows: i64 = row.get(1);
                let total = total.unwrap_or(0);
                *rs.totals_seen.entry(total).or_default() += 1;
                if total != expected || rows != i64::from(cfg.accounts) {
                    rs.violations += 1;
                    if rs.violation_samples.len() < ERROR_SAMPLES {
                        rs.violation_samples.push(format!(
                            "node{} reader {idx}: total {total} (expected {expected}), {rows} rows",
                            node + 1
                        ));
                    }
                }
            }
            Ok(Err(e)) => match classify(&e) {
                Failure::Lost(_) => {
                    rs.ops.record_conn_lost();
                    client = None;
                }
                Failure::Abort => rs.ops.record_abort(),
                Failure::Other(m) => rs.ops.record_error(format!("node{}: {m}", node + 1)),
            },
            Err(_) => {
                rs.ops.record_conn_lost();
                client = None;
            }
        }
        stop.sleep(cfg.read_pause).await;
    }
    rs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_sql_and_total() {
        assert_eq!(
            bank_seed_sql(10, 1000),
            "insert into mm_bank(id, balance) select g, 1000 from generate_series(1, 10) g"
        );
        assert_eq!(bank_expected_total(10, 1000), 10_000);
        let cfg = BankConfig::new(vec![], 100, 7);
        assert_eq!(cfg.expected_total(), 700);
    }
}
