//! Acknowledged-write ledger: every INSERT the cluster acknowledged must be
//! on every node afterwards.
//!
//! Why: durability and atomic commit are promises about acknowledged writes.
//! Writers on every node insert rows whose ids are unique per (node, client,
//! seq), each in its own autocommit INSERT, and record an id as acknowledged
//! only when the INSERT returned success. Afterwards the checker looks for
//! each acknowledged id on each node: a missing one is a lost write. An
//! INSERT aborted with 40001/40P01 is not acknowledged and its id is never
//! reused (the next insert takes a new seq); one whose connection broke
//! mid-flight is "uncertain" — it may be present or not, and neither is a
//! violation.

use std::sync::Arc;
use std::time::Duration;

use rand::distributions::Alphanumeric;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};

use crate::conn::{classify, client_seed, connect, describe, Failure, Stop, RECONNECT_PAUSE};
use crate::stats::Stats;

/// The ledger's table.
pub const LEDGER_SCHEMA: &str =
    "create table mm_ledger(id bigint primary key, node int not null, client int not null, seq bigint not null, payload text not null)";

/// Ids per node: `node × 10^12`.
pub const NODE_STRIDE: i64 = 1_000_000_000_000;
/// Ids per client of a node: `client × 10^8`.
pub const CLIENT_STRIDE: i64 = 100_000_000;

/// The id of write `seq` (1-based, below 10^8) of `client` (below 10^4) on
/// `node` (1-based): `node × 10^12 + client × 10^8 + seq`.
pub fn ledger_id(node: i32, client: i32, seq: i64) -> i64 {
    debug_assert!((0..10_000).contains(&client) && (0..CLIENT_STRIDE).contains(&seq));
    i64::from(node) * NODE_STRIDE + i64::from(client) * CLIENT_STRIDE + seq
}

/// How to run the ledger.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// One connection string per node; node `i` (0-based here) writes ids
    /// with node number `i + 1`.
    pub conninfos: Vec<String>,
    /// Writer tasks per node, each with its own connection.
    pub clients_per_node: usize,
    /// Characters of random payload per row.
    pub payload_len: usize,
    /// Seeds every client's `StdRng` (payloads).
    pub seed: u64,
    /// Longest a connect or an INSERT may take; past it the connection is
    /// dropped and the INSERT counts as uncertain.
    pub op_timeout: Duration,
}

impl LedgerConfig {
    /// 2 clients per node, 32-character payloads, seed 1, 10 s timeout.
    pub fn new(conninfos: Vec<String>) -> LedgerConfig {
        LedgerConfig {
            conninfos,
            clients_per_node: 2,
            payload_len: 32,
            seed: 1,
            op_timeout: Duration::from_secs(10),
        }
    }
}

/// The outcome of [`run_ledger`].
#[derive(Debug, Clone, Serialize)]
pub struct LedgerReport {
    pub elapsed_s: f64,
    /// All inserts.
    pub stats: Stats,
    /// Inserts per node, in `conninfos` order.
    pub per_node: Vec<Stats>,
    pub acknowledged_count: usize,
    pub uncertain_count: usize,
    /// Ids whose INSERT returned success, sorted: each must be on every node.
    #[serde(skip)]
    pub acknowledged: Vec<i64>,
    /// Ids whose INSERT's outcome is unknown, sorted: may be present or not.
    #[serde(skip)]
    pub uncertain: Vec<i64>,
}

impl LedgerReport {
    pub fn render(&self) -> String {
        let mut s = format!(
            "ledger: {} acknowledged, {} uncertain, {:.1} s\n  inserts: {}",
            self.acknowledged_count,
            self.uncertain_count,
            self.elapsed_s,
            self.stats.summary()
        );
        for (i, n) in self.per_node.iter().enumerate() {
            s.push_str(&format!("\n    node{}: {}", i + 1, n.summary()));
        }
        s
    }
}

struct ClientOutcome {
    stats: Stats,
    acknowledged: Vec<i64>,
    uncertain: Vec<i64>,
}

/// Runs the ledger writers on every node until `stop`; returns once every
/// client has finished. The table must exist.
pub async fn run_ledger(cfg: &LedgerConfig, stop: Stop) -> LedgerReport {
    assert!(
        cfg.clients_per_node < 10_000,
        "client numbers must stay below 10^4"
    );
    let t0 = Instant::now();
    let cfg = Arc::new(cfg.clone());
    let mut tasks = Vec::new();
    for node in 0..cfg.conninfos.len() {
        for client in 0..cfg.clients_per_node {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            tasks.push((
                node,
                tokio::spawn(async move { ledger_client(&cfg, node, client, &stop).await }),
            ));
        }
    }
    let mut per_node: Vec<Stats> = (0..cfg.conninfos.len()).map(|_| Stats::new()).collect();
    let mut acknowledged = Vec::new();
    let mut uncertain = Vec::new();
    for (node, h) in tasks {
        match h.await {
            Ok(o) => {
                per_node[node].merge(&o.stats);
                acknowledged.extend(o.acknowledged);
                uncertain.extend(o.uncertain);
            }
            Err(e) => per_node[node].record_error(format!("ledger task failed: {e}")),
        }
    }
    acknowledged.sort_unstable();
    uncertain.sort_unstable();
    LedgerReport {
        elapsed_s: t0.elapsed().as_secs_f64(),
        stats: Stats::merged(&per_node),
        per_node,
        acknowledged_count: acknowledged.len(),
        uncertain_count: uncertain.len(),
        acknowledged,
        uncertain,
    }
}

async fn ledger_conn(cfg: &LedgerConfig, node: usize) -> anyhow::Result<(Client, Statement)> {
    let client = connect(&cfg.conninfos[node], cfg.op_timeout).await?;
    let stmt = tokio::time::timeout(
        cfg.op_timeout,
        client.prepare(
            "insert into mm_ledger(id, node, client, seq, payload) values ($1, $2, $3, $4, $5)",
        ),
    )
    .await
    .map_err(|_| anyhow::anyhow!("preparing the insert timed out"))?
    .map_err(|e| anyhow::anyhow!("preparing the insert: {}", describe(&e)))?;
    Ok((client, stmt))
}

async fn ledger_client(
    cfg: &LedgerConfig,
    node: usize,
    client: usize,
    stop: &Stop,
) -> ClientOutcome {
    let mut out = ClientOutcome {
        stats: Stats::new(),
        acknowledged: Vec::new(),
        uncertain: Vec::new(),
    };
    let mut rng = StdRng::seed_from_u64(client_seed(cfg.seed, node, client));
    let node_no = node as i32 + 1;
    let client_no = client as i32;
    let mut conn: Option<(Client, Statement)> = None;
    let mut seq: i64 = 0;
    while !stop.is_done() {
        let (c, stmt) = match conn.as_ref().filter(|(c, _)| !c.is_closed()) {
            Some(c) => (&c.0, &c.1),
            None => match ledger_conn(cfg, node).await {
                Ok(c) => {
                    let c = conn.insert(c);
                    (&c.0, &c.1)
                }
                Err(_) => {
                    conn = None;
                    out.stats.record_conn_lost();
                    stop.sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            },
        };
        // Every attempt takes a new seq: an id is never sent twice.
        seq += 1;
        let id = ledger_id(node_no, client_no, seq);
        let payload: String = (&mut rng)
            .sample_iter(&Alphanumeric)
            .take(cfg.payload_len)
            .map(char::from)
            .collect();
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            cfg.op_timeout,
            c.execute(stmt, &[&id, &node_no, &client_no, &seq, &payload]),
        )
        .await;
        match r {
            Ok(Ok(1)) => {
                out.stats.record_commit(t0.elapsed());
                out.acknowledged.push(id);
            }
            Ok(Ok(n)) => out
                .stats
                .record_error(format!("node{node_no}: insert of {id} reported {n} rows")),
            Ok(Err(e)) => match classify(&e) {
                Failure::Abort => out.stats.record_abort(),
                Failure::Lost(_) => {
                    out.stats.record_uncertain();
                    out.uncertain.push(id);
                    conn = None;
                }
                Failure::Other(m) => out
                    .stats
                    .record_error(format!("node{node_no}: insert of {id}: {m}")),
            },
            Err(_) => {
                out.stats.record_uncertain();
                out.uncertain.push(id);
                conn = None;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_per_node_client_seq() {
        assert_eq!(ledger_id(1, 0, 1), 1_000_000_000_001);
        assert_eq!(
            ledger_id(3, 12, 345),
            3_000_000_000_000 + 1_200_000_000 + 345
        );
        let mut ids = Vec::new();
        for n in 1..=3 {
            for c in 0..3 {
                for s in [1, 2, CLIENT_STRIDE - 1] {
                    ids.push(ledger_id(n, c, s));
                }
            }
        }
        let len = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), len);
    }
}
