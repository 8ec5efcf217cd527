//! The consistency checks after a run: read every node's PostgreSQL
//! directly and decide whether the cluster is consistent (ARCHITECTURE §7).
//!
//! Why direct connections: the checks must not trust the system under test,
//! so they bypass mm's client endpoint and ask each server itself. What a
//! run must leave behind:
//! - the seed's check: equal `sum(hashtext(id||info||mod_time))` over `mm`
//!   and equal row counts on every node (the table must exist);
//! - the bank's total equal to accounts × initial balance on every node;
//! - every write the ledger workload saw acknowledged present on every node;
//! - no prepared transaction left over in `pg_prepared_xacts` (an in-doubt
//!   3PC transaction that was never resolved holds locks forever).
//!
//! A figure that could not be read is an error on that node and makes the
//! verdict inconsistent: a check that silently skips is no check.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use mm_workloads::conn::{connect, describe};

/// The seed's hash check over `mm`.
pub const MM_HASH_SUM: &str = "select sum(hashtext(t.id||t.info||t.mod_time)) from mm t";
/// How many missing ledger ids and prepared gids a node lists.
pub const LIST_LIMIT: usize = 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the checks expect beyond cross-node equality.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// The bank's total (accounts × initial balance). `None`: `mm_bank` is
    /// read if it exists and only compared across nodes.
    pub bank_total: Option<i64>,
    /// Ids the ledger workload saw acknowledged. `None`: `mm_ledger` is read
    /// if it exists and its row counts only compared across nodes.
    pub acknowledged: Option<Vec<i64>>,
}

/// One node's figures. `None` where the figure was not read (the table is
/// optional and absent, or reading it failed: see `errors`).
#[derive(Debug, Clone, Serialize)]
pub struct NodeFigures {
    pub name: String,
    /// Everything that could not be read, one message each.
    pub errors: Vec<String>,
    /// The seed's hash sum (NULL for an empty table reads as `Some(None)`).
    pub hash_sum: Option<Option<i64>>,
    pub mm_rows: Option<i64>,
    pub bank_total: Option<i64>,
    pub bank_rows: Option<i64>,
    pub ledger_rows: Option<i64>,
    /// Acknowledged ids absent from this node.
    pub ledger_missing: Option<i64>,
    /// The smallest of them, up to [`LIST_LIMIT`].
    pub ledger_missing_ids: Vec<i64>,
    /// Prepared transactions in any database of this server.
    pub prepared_left: Option<i64>,
    /// Their gids, up to [`LIST_LIMIT`].
    pub prepared_gids: Vec<String>,
}

/// The checks' outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Equal hash sums and counts everywhere, the expected bank total on
    /// every node, no acknowledged write missing, no prepared transaction
    /// left, and every figure read.
    pub consistent: bool,
    /// Why not, one line each; empty when consistent.
    pub problems: Vec<String>,
    pub expected_bank_total: Option<i64>,
    pub acknowledged: Option<usize>,
    pub nodes: Vec<NodeFigures>,
}

/// Checks the nodes `node1..nodeN` at these connection strings.
pub async fn check_nodes(conninfos: &[String], expect: &Expect) -> Verdict {
    let named: Vec<(String, String)> = conninfos
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("node{}", i + 1), c.clone()))
        .collect();
    check_named(&named, expect).await
}

/// Checks `(name, conninfo)` nodes. Nodes are read one after the other:
/// call it once the workload has stopped and replication has settled.
pub async fn check_named(nodes: &[(String, String)], expect: &Expect) -> Verdict {
    let mut figures = Vec::with_capacity(nodes.len());
    for (name, conninfo) in nodes {
        figures.push(read_node(name, conninfo, expect).await);
    }
    judge(figures, expect)
}

async fn read_node(name: &str, conninfo: &str, expect: &Expect) -> NodeFigures {
    let mut f = NodeFigures {
        name: name.to_string(),
        errors: Vec::new(),
        hash_sum: None,
        mm_rows: None,
        bank_total: None,
        bank_rows: None,
        ledger_rows: None,
        ledger_missing: None,
        ledger_missing_ids: Vec::new(),
        prepared_left: None,
        prepared_gids: Vec::new(),
    };
    let c = match connect(conninfo, CONNECT_TIMEOUT).await {
        Ok(c) => c,
        Err(e) => {
            f.errors.push(format!("{e:#}"));
            return f;
        }
    };

    match query(&c, "select (select sum(hashtext(t.id||t.info||t.mod_time)) from mm t), (select count(*) from mm)", &[]).await {
        Ok(rows) => {
            f.hash_sum = Some(rows[0].get(0));
            f.mm_rows = Some(rows[0].get(1));
        }
        Err(e) => f.errors.push(format!("mm: {e}")),
    }

    match table_exists(&c, "mm_bank").await {
        Ok(true) => match query(
            &c,
            "select coalesce(sum(balance), 0)::bigint, count(*) from mm_bank",
            &[],
        )
        .await
        {
            Ok(rows) => {
                f.bank_total = Some(rows[0].get(0));
                f.bank_rows = Some(rows[0].get(1));
            }
            Err(e) => f.errors.push(format!("mm_bank: {e}")),
        },
        Ok(false) if expect.bank_total.is_some() => {
            f.errors.push("mm_bank: table does not exist".into());
        }
        Ok(false) => {}
        Err(e) => f.errors.push(format!("mm_bank: {e}")),
    }

    match table_exists(&c, "mm_ledger").await {
        Ok(true) => {
            match query(&c, "select count(*) from mm_ledger", &[]).await {
                Ok(rows) => f.ledger_rows = Some(rows[0].get(0)),
                Err(e) => f.errors.push(format!("mm_ledger: {e}")),
            }
            if let Some(acked) = &expect.acknowledged {
                // One round trip: the missing ids, smallest first, each row
                // also carrying how many are missing in all.
                let sql = "select a.id, count(*) over () from unnest($1::bigint[]) as a(id) \
                           where not exists (select 1 from mm_ledger l where l.id = a.id) \
                           order by a.id limit $2";
                let limit = LIST_LIMIT as i64;
                match query(&c, sql, &[acked, &limit]).await {
                    Ok(rows) => {
                        f.ledger_missing = Some(rows.first().map_or(0, |r| r.get::<_, i64>(1)));
                        f.ledger_missing_ids = rows.iter().map(|r| r.get(0)).collect();
                    }
                    Err(e) => f.errors.push(format!("mm_ledger: {e}")),
                }
            }
        }
        Ok(false) if expect.acknowledged.is_some() => {
            f.errors.push("mm_ledger: table does not exist".into());
        }
        Ok(false) => {}
        Err(e) => f.errors.push(format!("mm_ledger: {e}")),
    }

    let limit = LIST_LIMIT as i64;
    match query(
        &c,
        "select gid, count(*) over () from pg_prepared_xacts order by prepared limit $1",
        &[&limit],
    )
    .await
    {
        Ok(rows) => {
            f.prepared_left = Some(rows.first().map_or(0, |r| r.get::<_, i64>(1)));
            f.prepared_gids = rows.iter().map(|r| r.get(0)).collect();
        }
        Err(e) => f.errors.push(format!("pg_prepared_xacts: {e}")),
    }
    f
}

async fn query(
    c: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, String> {
    match tokio::time::timeout(QUERY_TIMEOUT, c.query(sql, params)).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => Err(describe(&e)),
        Err(_) => Err(format!("query timed out after {QUERY_TIMEOUT:?}")),
    }
}

async fn table_exists(c: &Client, table: &str) -> Result<bool, String> {
    let rows = query(c, "select to_regclass($1) is not null", &[&table]).await?;
    Ok(rows[0].get(0))
}

/// "mm hash sums differ: node1 X, node2 Y" when the figures differ across nodes.
fn differs(
    nodes: &[NodeFigures],
    what: &str,
    get: impl Fn(&NodeFigures) -> String,
) -> Option<String> {
    let first = get(nodes.first()?);
    if nodes.iter().all(|n| get(n) == first) {
        return None;
    }
    let list: Vec<String> = nodes
        .iter()
        .map(|n| format!("{} {}", n.name, get(n)))
        .collect();
    Some(format!("{what} differ: {}", list.join(", ")))
}

fn judge(nodes: Vec<NodeFigures>, expect: &Expect) -> Verdict {
    let mut problems = Vec::new();
    if nodes.is_empty() {
        problems.push("no nodes to check".to_string());
    }
    for n in &nodes {
        for e in &n.errors {
            problems.push(format!("{}: {e}", n.name));
        }
    }
    problems.extend(differs(&nodes, "mm hash sums", |n| hash(n.hash_sum)));
    problems.extend(differs(&nodes, "mm row counts", |n| opt(n.mm_rows)));
    problems.extend(differs(&nodes, "bank totals", |n| opt(n.bank_total)));
    problems.extend(differs(&nodes, "bank row counts", |n| opt(n.bank_rows)));
    problems.extend(differs(&nodes, "ledger row counts", |n| opt(n.ledger_rows)));
    for n in &nodes {
        if let (Some(want), Some(got)) = (expect.bank_total, n.bank_total) {
            if want != got {
                problems.push(format!("{}: bank total {got}, expected {want}", n.name));
            }
        }
        if let Some(missing) = n.ledger_missing.filter(|m| *m > 0) {
            problems.push(format!(
                "{}: {missing} acknowledged ledger writes missing (first: {:?})",
                n.name, n.ledger_missing_ids
            ));
        }
        if let Some(p) = n.prepared_left.filter(|p| *p > 0) {
            problems.push(format!(
                "{}: {p} prepared transactions left ({:?})",
                n.name, n.prepared_gids
            ));
        }
    }
    Verdict {
        consistent: problems.is_empty(),
        problems,
        expected_bank_total: expect.bank_total,
        acknowledged: expect.acknowledged.as_ref().map(|a| a.len()),
        nodes,
    }
}

/// A figure for display: "-" when it was not read.
fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// A hash sum for display: "null" for an empty table, "-" when not read.
fn hash(h: Option<Option<i64>>) -> String {
    match h {
        Some(Some(h)) => h.to_string(),
        Some(None) => "null".to_string(),
        None => "-".to_string(),
    }
}

impl Verdict {
    /// A few lines for people: the verdict, a table of per-node figures, the problems.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if self.consistent {
            let _ = writeln!(s, "verdict: CONSISTENT ({} nodes)", self.nodes.len());
        } else {
            let _ = writeln!(
                s,
                "verdict: INCONSISTENT ({} nodes, {} problem{})",
                self.nodes.len(),
                self.problems.len(),
                if self.problems.len() == 1 { "" } else { "s" }
            );
        }
        let _ = write!(
            s,
            "  expected bank total: {}",
            opt(self.expected_bank_total)
        );
        let _ = writeln!(
            s,
            "; acknowledged ledger writes: {}",
            opt(self.acknowledged)
        );
        let _ = writeln!(
            s,
            "  {:<8} {:>14} {:>9} {:>12} {:>9} {:>11} {:>8} {:>8}",
            "node",
            "hash_sum",
            "mm_rows",
            "bank_total",
            "bank_rows",
            "ledger_rows",
            "missing",
            "prepared"
        );
        for n in &self.nodes {
            let _ = writeln!(
                s,
                "  {:<8} {:>14} {:>9} {:>12} {:>9} {:>11} {:>8} {:>8}",
                n.name,
                hash(n.hash_sum),
                opt(n.mm_rows),
                opt(n.bank_total),
                opt(n.bank_rows),
                opt(n.ledger_rows),
                opt(n.ledger_missing),
                opt(n.prepared_left)
            );
        }
        if !self.problems.is_empty() {
            let _ = writeln!(s, "  problems:");
            for p in &self.problems {
                let _ = writeln!(s, "    - {p}");
            }
        }
        s.truncate(s.trim_end().len());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, hash: i64, rows: i64) -> NodeFigures {
        NodeFigures {
            name: name.into(),
            errors: vec![],
            hash_sum: Some(Some(hash)),
            mm_rows: Some(rows),
            bank_total: Some(1000),
            bank_rows: Some(10),
            ledger_rows: Some(5),
            ledger_missing: Some(0),
            ledger_missing_ids: vec![],
            prepared_left: Some(0),
            prepared_gids: vec![],
        }
    }

    fn expect() -> Expect {
        Expect {
            bank_total: Some(1000),
            acknowledged: Some(vec![1, 2, 3]),
        }
    }

    #[test]
    fn equal_nodes_are_consistent() {
        let v = judge(vec![node("node1", 7, 3), node("node2", 7, 3)], &expect());
        assert!(v.consistent, "{}", v.render());
        assert!(v.render().starts_with("verdict: CONSISTENT (2 nodes)"));
    }

    #[test]
    fn each_kind_of_divergence_is_caught() {
        type Tamper = fn(&mut NodeFigures);
        let cases: Vec<(&str, Tamper)> = vec![
            ("hash sums", |n| n.hash_sum = Some(Some(8))),
            ("row counts", |n| n.mm_rows = Some(4)),
            ("expected 1000", |n| n.bank_total = Some(999)),
            ("missing", |n| n.ledger_missing = Some(1)),
            ("prepared", |n| n.prepared_left = Some(1)),
            ("boom", |n| n.errors.push("boom".into())),
            ("hash sums", |n| n.hash_sum = None),
        ];
        for (want, tamper) in cases {
            let mut b = node("node2", 7, 3);
            tamper(&mut b);
            let v = judge(vec![node("node1", 7, 3), b], &expect());
            assert!(!v.consistent, "{want}");
            assert!(
                v.problems.iter().any(|p| p.contains(want)),
                "{want}: {:?}",
                v.problems
            );
            assert!(v.render().contains("INCONSISTENT"));
        }
        assert!(!judge(vec![], &expect()).consistent);
    }
}
