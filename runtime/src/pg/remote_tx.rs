//! A peer's prepared transaction as the data plane delivered it, and the SQL
//! that replays it here. Each row change must touch exactly one row: an
//! UPDATE or DELETE that finds nothing means this node has not (yet) got the
//! row the origin changed, so the applier votes no instead of diverging.

use super::replication::pgoutput::{OldTuple, Relation, Tuple, TupleValue};
use super::replication::Lsn;
use super::sql::{quote_ident, quote_literal};
use mm_core::Gid;
use std::sync::Arc;

/// Prefix of the transactional logical message that carries DDL.
pub const DDL_PREFIX: &str = "mm.ddl";
/// Prefix of the non-transactional message a catch-up donor emits.
pub const CATCHUP_PREFIX: &str = "mm.catchup";
/// Prefix of the marker every mm transaction carries, so that a prepared
/// transaction that changed no replicated row still reaches the peers.
pub const TX_PREFIX: &str = "mm.tx";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Insert {
        rel: Arc<Relation>,
        new: Tuple,
    },
    Update {
        rel: Arc<Relation>,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        rel: Arc<Relation>,
        old: OldTuple,
    },
    Truncate {
        rels: Vec<Arc<Relation>>,
        cascade: bool,
        restart_identity: bool,
    },
    Ddl {
        search_path: String,
        sql: String,
    },
}

/// A prepared transaction of a peer, waiting for the core's verdict.
#[derive(Clone, Debug)]
pub struct RemoteTx {
    pub gid: Gid,
    pub changes: Vec<Change>,
    /// End of its PREPARE in the peer's WAL.
    pub end_lsn: Lsn,
    /// Transactions the peer's stream decided before this one was prepared
    /// and that are still prepared here: they must finish first, or this
    /// one could miss rows they wrote.
    pub after: Vec<Gid>,
}

/// One statement of a replay and how many rows it must report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stmt {
    pub sql: String,
    pub expect_rows: Option<u64>,
    /// For `COPY ... FROM STDIN`: its rows in COPY's text format.
    pub copy_data: Option<Vec<u8>>,
}

impl Stmt {
    fn sql(sql: String, expect_rows: Option<u64>) -> Stmt {
        Stmt {
            sql,
            expect_rows,
            copy_data: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("table {table}: column {column} arrived in binary format")]
    Binary { table: String, column: String },
    #[error("table {table}: row has {got} columns, relation has {want}")]
    Arity {
        table: String,
        got: usize,
        want: usize,
    },
    #[error("table {table} has no replica identity key: cannot find the row to change")]
    NoKey { table: String },
    #[error("DDL message is not valid: {0}")]
    BadDdl(String),
}

fn table(rel: &Relation) -> String {
    format!("{}.{}", quote_ident(&rel.namespace), quote_ident(&rel.name))
}

fn literal(rel: &Relation, i: usize, v: &TupleValue) -> Result<Option<String>, ReplayError> {
    Ok(match v {
        TupleValue::Null => Some("NULL".to_string()),
        TupleValue::UnchangedToast => None,
        TupleValue::Text(_) => Some(quote_literal(v.as_text().ok_or_else(|| {
            ReplayError::Binary {
                table: table(rel),
                column: rel.columns[i].name.clone(),
            }
        })?)),
        TupleValue::Binary(_) => {
            return Err(ReplayError::Binary {
                table: table(rel),
                column: rel.columns[i].name.clone(),
            })
        }
    })
}

fn check_arity(rel: &Relation, t: &Tuple) -> Result<(), ReplayError> {
    if t.len() != rel.columns.len() {
        return Err(ReplayError::Arity {
            table: table(rel),
            got: t.len(),
            want: rel.columns.len(),
        });
    }
    Ok(())
}

/// `WHERE` finding the row: the key columns (from the old key tuple, or
/// the new row when the key did not change), or every column for
/// REPLICA IDENTITY FULL.
fn row_filter(rel: &Relation, old: Option<&OldTuple>, new: &Tuple) -> Result<String, ReplayError> {
    let (tuple, key_only) = match old {
        Some(OldTuple::Key(t)) => (t, true),
        Some(OldTuple::Full(t)) => (t, false),
        None => (new, true),
    };
    check_arity(rel, tuple)?;
    let mut conds = Vec::new();
    for (i, (col, v)) in rel.columns.iter().zip(tuple).enumerate() {
        if key_only && !col.key {
            continue;
        }
        match literal(rel, i, v)? {
            Some(l) if l == "NULL" => conds.push(format!("{} IS NULL", quote_ident(&col.name))),
            Some(l) => conds.push(format!("{} = {l}", quote_ident(&col.name))),
            None => {} // an unchanged TOAST value cannot be part of a key
        }
    }
    if conds.is_empty() {
        return Err(ReplayError::NoKey { table: table(rel) });
    }
    let filter = conds.join(" AND ");
    Ok(if key_only {
        filter
    } else {
        // Without a key several identical rows may match: change one.
        format!(
            "ctid = (SELECT ctid FROM {} WHERE {filter} LIMIT 1)",
            table(rel)
        )
    })
}

/// The columns an inserted row lists (all but unchanged TOAST values):
/// rows listing the same columns of the same table can share a statement.
fn insert_columns(rel: &Relation, new: &Tuple) -> Result<Vec<usize>, ReplayError> {
    check_arity(rel, new)?;
    Ok(new
        .iter()
        .enumerate()
        .filter(|(_, v)| !matches!(v, TupleValue::UnchangedToast))
        .map(|(i, _)| i)
        .collect())
}

fn column_list(rel: &Relation, cols: &[usize]) -> String {
    cols.iter()
        .map(|&i| quote_ident(&rel.columns[i].name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `INSERT INTO t (cols) VALUES (...), ...` of `rows`.
fn insert_sql(rel: &Relation, cols: &[usize], rows: &[&Tuple]) -> Result<String, ReplayError> {
    let mut sql = format!(
        "INSERT INTO {} ({}) VALUES ",
        table(rel),
        column_list(rel, cols)
    );
    for (n, row) in rows.iter().enumerate() {
        if n > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for (k, &i) in cols.iter().enumerate() {
            if k > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&literal(rel, i, &row[i])?.unwrap_or_default());
        }
        sql.push(')');
    }
    Ok(sql)
}

/// `rows` in COPY's text format: tab-separated, `\N` for NULL, backslash,
/// tab, newline and carriage return escaped.
fn copy_text(rel: &Relation, cols: &[usize], rows: &[&Tuple]) -> Result<Vec<u8>, ReplayError> {
    let mut out = Vec::with_capacity(rows.len() * 32);
    for row in rows {
        for (k, &i) in cols.iter().enumerate() {
            if k > 0 {
                out.push(b'\t');
            }
            match &row[i] {
                TupleValue::Null => out.extend_from_slice(b"\\N"),
                v @ TupleValue::Text(_) => {
                    let text = v.as_text().ok_or_else(|| ReplayError::Binary {
                        table: table(rel),
                        column: rel.columns[i].name.clone(),
                    })?;
                    for b in text.bytes() {
                        match b {
                            b'\\' => out.extend_from_slice(b"\\\\"),
                            b'\t' => out.extend_from_slice(b"\\t"),
                            b'\n' => out.extend_from_slice(b"\\n"),
                            b'\r' => out.extend_from_slice(b"\\r"),
                            b => out.push(b),
                        }
                    }
                }
                TupleValue::Binary(_) | TupleValue::UnchangedToast => {
                    return Err(ReplayError::Binary {
                        table: table(rel),
                        column: rel.columns[i].name.clone(),
                    })
                }
            }
        }
        out.push(b'\n');
    }
    Ok(out)
}

/// Rows per multi-row `INSERT` in a replay: one statement to parse, plan and
/// execute instead of a thousand (multimaster batches up to 1024 too).
pub const INSERT_BATCH_ROWS: usize = 1000;

/// From this many consecutive rows of one table on, a replay loads them with
/// `COPY FROM STDIN` instead: no SQL to parse, no literals to coerce (a
/// 1M-row COPY through mmd: docs/performance.md). Below it the extra round
/// trip of COPY's setup costs more than it saves.
pub const COPY_MIN_ROWS: usize = 200;

/// Rows per `COPY` of a replay (bounds the text held at once).
pub const COPY_BATCH_ROWS: usize = 100_000;

/// A run of inserted rows listing the same columns of one table.
struct InsertRun<'a> {
    rel: &'a Arc<Relation>,
    cols: Vec<usize>,
    rows: Vec<&'a Tuple>,
}

impl InsertRun<'_> {
    fn statements(self, out: &mut Vec<Stmt>) -> Result<(), ReplayError> {
        let (rel, cols) = (&**self.rel, &self.cols);
        if self.rows.len() >= COPY_MIN_ROWS {
            for rows in self.rows.chunks(COPY_BATCH_ROWS) {
                out.push(Stmt {
                    sql: format!(
                        "COPY {} ({}) FROM STDIN",
                        table(rel),
                        column_list(rel, cols)
                    ),
                    expect_rows: Some(rows.len() as u64),
                    copy_data: Some(copy_text(rel, cols, rows)?),
                });
            }
        } else {
            for rows in self.rows.chunks(INSERT_BATCH_ROWS) {
                out.push(Stmt::sql(
                    insert_sql(rel, cols, rows)?,
                    Some(rows.len() as u64),
                ));
            }
        }
        Ok(())
    }
}

/// The statements replaying `changes` in order, consecutive inserts into
/// the same table and columns folded into multi-row `INSERT`s, or a `COPY`
/// when there are many. Each statement still reports exactly the rows it
/// must change.
pub fn replay_statements(changes: &[Change]) -> Result<Vec<Stmt>, ReplayError> {
    let mut out = Vec::new();
    let mut run: Option<InsertRun> = None;
    for ch in changes {
        if let Change::Insert { rel, new } = ch {
            let cols = insert_columns(rel, new)?;
            match &mut run {
                Some(r) if r.cols == cols && (Arc::ptr_eq(r.rel, rel) || **r.rel == **rel) => {
                    r.rows.push(new)
                }
                _ => {
                    if let Some(r) = run.take() {
                        r.statements(&mut out)?;
                    }
                    run = Some(InsertRun {
                        rel,
                        cols,
                        rows: vec![new],
                    });
                }
            }
        } else {
            if let Some(r) = run.take() {
                r.statements(&mut out)?;
            }
            out.extend(ch.to_sql()?);
        }
    }
    if let Some(r) = run.take() {
        r.statements(&mut out)?;
    }
    Ok(out)
}

impl Change {
    /// The statements replaying this change.
    pub fn to_sql(&self) -> Result<Vec<Stmt>, ReplayError> {
        Ok(match self {
            Change::Insert { rel, new } => {
                let cols = insert_columns(rel, new)?;
                vec![Stmt::sql(insert_sql(rel, &cols, &[new])?, Some(1))]
            }
            Change::Update { rel, old, new } => {
                check_arity(rel, new)?;
                let filter = row_filter(rel, old.as_ref(), new)?;
                let mut sets = Vec::new();
                for (i, (c, v)) in rel.columns.iter().zip(new).enumerate() {
                    if let Some(l) = literal(rel, i, v)? {
                        sets.push(format!("{} = {l}", quote_ident(&c.name)));
                    }
                }
                if sets.is_empty() {
                    return Ok(vec![]);
                }
                vec![Stmt {
                    sql: format!(
                        "UPDATE {} SET {} WHERE {filter}",
                        table(rel),
                        sets.join(", ")
                    ),
                    expect_rows: Some(1),
                    copy_data: None,
                }]
            }
            Change::Delete { rel, old } => {
                let empty = vec![TupleValue::Null; rel.columns.len()];
                let filter = row_filter(rel, Some(old), &empty)?;
                vec![Stmt {
                    sql: format!("DELETE FROM {} WHERE {filter}", table(rel)),
                    expect_rows: Some(1),
                    copy_data: None,
                }]
            }
            Change::Truncate {
                rels,
                cascade,
                restart_identity,
            } => {
                let names: Vec<String> = rels.iter().map(|r| table(r)).collect();
                vec![Stmt {
                    sql: format!(
                        "TRUNCATE {}{}{}",
                        names.join(", "),
                        if *restart_identity {
                            " RESTART IDENTITY"
                        } else {
                            ""
                        },
                        if *cascade { " CASCADE" } else { "" }
                    ),
                    expect_rows: None,
                    copy_data: None,
                }]
            }
            Change::Ddl { search_path, sql } => vec![
                Stmt {
                    sql: format!(
                        "SELECT pg_catalog.set_config('search_path', {}, true)",
                        quote_literal(search_path)
                    ),
                    expect_rows: None,
                    copy_data: None,
                },
                Stmt {
                    sql: sql.clone(),
                    expect_rows: None,
                    copy_data: None,
                },
            ],
        })
    }
}

/// The DDL message body: `{"search_path": …, "sql": …}` as the origin's
/// proxy emits it (see `proxy::ddl`).
pub fn parse_ddl(content: &[u8]) -> Result<Change, ReplayError> {
    #[derive(serde::Deserialize)]
    struct Body {
        search_path: String,
        sql: String,
    }
    let b: Body =
        serde_json::from_slice(content).map_err(|e| ReplayError::BadDdl(e.to_string()))?;
    Ok(Change::Ddl {
        search_path: b.search_path,
        sql: b.sql,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::replication::pgoutput::Column;
    use bytes::Bytes;

    fn rel() -> Arc<Relation> {
        let col = |name: &str, key| Column {
            key,
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        };
        Arc::new(Relation {
            rel_id: 1,
            namespace: "public".into(),
            name: "mm".into(),
            replica_identity: b'd',
            columns: vec![col("id", true), col("info", false)],
        })
    }
    fn t(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::from(s.to_string()))
    }

    #[test]
    fn insert_update_delete_sql() {
        let r = rel();
        let ins = Change::Insert {
            rel: r.clone(),
            new: vec![t("1"), t("it's")],
        };
        assert_eq!(
            ins.to_sql().unwrap()[0].sql,
            r#"INSERT INTO "public"."mm" ("id", "info") VALUES ('1', 'it''s')"#
        );
        let upd = Change::Update {
            rel: r.clone(),
            old: None,
            new: vec![t("1"), TupleValue::UnchangedToast],
        };
        assert_eq!(
            upd.to_sql().unwrap()[0].sql,
            r#"UPDATE "public"."mm" SET "id" = '1' WHERE "id" = '1'"#
        );
        let upd_key = Change::Update {
            rel: r.clone(),
            old: Some(OldTuple::Key(vec![t("7"), TupleValue::Null])),
            new: vec![t("8"), TupleValue::Null],
        };
        assert_eq!(
            upd_key.to_sql().unwrap()[0].sql,
            r#"UPDATE "public"."mm" SET "id" = '8', "info" = NULL WHERE "id" = '7'"#
        );
        let del = Change::Delete {
            rel: r,
            old: OldTuple::Key(vec![t("7"), TupleValue::Null]),
        };
        let s = del.to_sql().unwrap();
        assert_eq!(s[0].sql, r#"DELETE FROM "public"."mm" WHERE "id" = '7'"#);
        assert_eq!(s[0].expect_rows, Some(1));
    }

    #[test]
    fn consecutive_inserts_share_a_statement_in_order() {
        let r = rel();
        let ins = |id: &str| Change::Insert {
            rel: r.clone(),
            new: vec![t(id), t("x")],
        };
        // A row with an unchanged TOAST value lists other columns: its own statement.
        let toast = Change::Insert {
            rel: r.clone(),
            new: vec![t("3"), TupleValue::UnchangedToast],
        };
        let del = Change::Delete {
            rel: r.clone(),
            old: OldTuple::Key(vec![t("1"), TupleValue::Null]),
        };
        let mut changes = vec![ins("1"), ins("2"), toast, del.clone(), ins("4")];
        let st = replay_statements(&changes).unwrap();
        let sql: Vec<&str> = st.iter().map(|s| s.sql.as_str()).collect();
        assert_eq!(
            sql,
            [
                r#"INSERT INTO "public"."mm" ("id", "info") VALUES ('1', 'x'), ('2', 'x')"#,
                r#"INSERT INTO "public"."mm" ("id") VALUES ('3')"#,
                r#"DELETE FROM "public"."mm" WHERE "id" = '1'"#,
                r#"INSERT INTO "public"."mm" ("id", "info") VALUES ('4', 'x')"#,
            ]
        );
        let rows: Vec<Option<u64>> = st.iter().map(|s| s.expect_rows).collect();
        assert_eq!(rows, [Some(2), Some(1), Some(1), Some(1)]);
        assert!(st.iter().all(|s| s.copy_data.is_none()));
        // Below COPY_MIN_ROWS: INSERTs; from it on, COPYs of COPY_BATCH_ROWS.
        changes = (0..COPY_MIN_ROWS - 1)
            .map(|i| ins(&i.to_string()))
            .collect();
        let st = replay_statements(&changes).unwrap();
        assert_eq!(st.len(), 1);
        assert!(st[0].sql.starts_with("INSERT INTO"));
        assert_eq!(st[0].expect_rows, Some(COPY_MIN_ROWS as u64 - 1));
        changes = (0..COPY_BATCH_ROWS + 1)
            .map(|i| ins(&i.to_string()))
            .chain([del.clone()])
            .collect();
        let st = replay_statements(&changes).unwrap();
        let rows: Vec<Option<u64>> = st.iter().map(|s| s.expect_rows).collect();
        assert_eq!(rows, [Some(COPY_BATCH_ROWS as u64), Some(1), Some(1)]);
        assert_eq!(st[0].sql, r#"COPY "public"."mm" ("id", "info") FROM STDIN"#);
        assert_eq!(st[1].copy_data.as_deref(), Some(&b"100000\tx\n"[..]));
        assert!(st[2].sql.starts_with("DELETE"));
    }

    #[test]
    fn copy_text_escapes_what_copy_would_split_on() {
        let r = rel();
        let rows = [
            vec![t("1"), t("tab\there")],
            vec![t("2"), TupleValue::Null],
            vec![t("3"), t("back\\slash\nnew\rline \\N")],
        ];
        let refs: Vec<&Tuple> = rows.iter().collect();
        let text = copy_text(&r, &[0, 1], &refs).unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "1\ttab\\there\n2\t\\N\n3\tback\\\\slash\\nnew\\rline \\\\N\n"
        );
        let bin = [vec![
            t("1"),
            TupleValue::Binary(Bytes::from_static(b"\x01")),
        ]];
        let refs: Vec<&Tuple> = bin.iter().collect();
        assert!(matches!(
            copy_text(&r, &[0, 1], &refs),
            Err(ReplayError::Binary { .. })
        ));
    }

    #[test]
    fn keyless_update_is_refused_and_binary_is_an_error() {
        let mut r = (*rel()).clone();
        for c in &mut r.columns {
            c.key = false;
        }
        let r = Arc::new(r);
        let upd = Change::Update {
            rel: r.clone(),
            old: None,
            new: vec![t("1"), t("x")],
        };
        assert!(matches!(upd.to_sql(), Err(ReplayError::NoKey { .. })));
        let ins = Change::Insert {
            rel: r,
            new: vec![TupleValue::Binary(Bytes::from_static(b"\x01")), t("x")],
        };
        assert!(matches!(ins.to_sql(), Err(ReplayError::Binary { .. })));
    }

    #[test]
    fn ddl_message_round_trips() {
        let c = parse_ddl(br#"{"search_path":"\"$user\", public","sql":"create table t(id int)"}"#)
            .unwrap();
        let s = c.to_sql().unwrap();
        assert_eq!(
            s[0].sql,
            r#"SELECT pg_catalog.set_config('search_path', '"$user", public', true)"#
        );
        assert_eq!(s[1].sql, "create table t(id int)");
        assert!(parse_ddl(b"not json").is_err());
    }
}
