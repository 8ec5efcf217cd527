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

/// `INSERT INTO t (cols)` and `(values)` of one inserted row: rows with the
/// same first part can share one statement.
fn insert_parts(rel: &Relation, new: &Tuple) -> Result<(String, String), ReplayError> {
    check_arity(rel, new)?;
    let mut cols = Vec::new();
    let mut vals = Vec::new();
    for (i, (c, v)) in rel.columns.iter().zip(new).enumerate() {
        if let Some(l) = literal(rel, i, v)? {
            cols.push(quote_ident(&c.name));
            vals.push(l);
        }
    }
    Ok((
        format!("INSERT INTO {} ({})", table(rel), cols.join(", ")),
        format!("({})", vals.join(", ")),
    ))
}

/// Rows per multi-row `INSERT` in a replay: one statement to parse, plan and
/// execute instead of a thousand (multimaster batches up to 1024 too).
pub const INSERT_BATCH_ROWS: usize = 1000;

/// The statements replaying `changes` in order, consecutive inserts into
/// the same table and columns folded into multi-row `INSERT`s. Each
/// statement still reports exactly the rows it must change.
pub fn replay_statements(changes: &[Change]) -> Result<Vec<Stmt>, ReplayError> {
    let mut out = Vec::new();
    // The open batch: its `INSERT INTO ...` part, its rows' value lists.
    let mut batch: Option<(String, Vec<String>)> = None;
    let flush = |batch: &mut Option<(String, Vec<String>)>, out: &mut Vec<Stmt>| {
        if let Some((into, rows)) = batch.take() {
            out.push(Stmt {
                sql: format!("{into} VALUES {}", rows.join(", ")),
                expect_rows: Some(rows.len() as u64),
            });
        }
    };
    for ch in changes {
        if let Change::Insert { rel, new } = ch {
            let (into, row) = insert_parts(rel, new)?;
            match &mut batch {
                Some((b, rows)) if *b == into && rows.len() < INSERT_BATCH_ROWS => rows.push(row),
                _ => {
                    flush(&mut batch, &mut out);
                    batch = Some((into, vec![row]));
                }
            }
        } else {
            flush(&mut batch, &mut out);
            out.extend(ch.to_sql()?);
        }
    }
    flush(&mut batch, &mut out);
    Ok(out)
}

impl Change {
    /// The statements replaying this change.
    pub fn to_sql(&self) -> Result<Vec<Stmt>, ReplayError> {
        Ok(match self {
            Change::Insert { rel, new } => {
                let (into, row) = insert_parts(rel, new)?;
                vec![Stmt {
                    sql: format!("{into} VALUES {row}"),
                    expect_rows: Some(1),
                }]
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
                }]
            }
            Change::Delete { rel, old } => {
                let empty = vec![TupleValue::Null; rel.columns.len()];
                let filter = row_filter(rel, Some(old), &empty)?;
                vec![Stmt {
                    sql: format!("DELETE FROM {} WHERE {filter}", table(rel)),
                    expect_rows: Some(1),
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
                }]
            }
            Change::Ddl { search_path, sql } => vec![
                Stmt {
                    sql: format!(
                        "SELECT pg_catalog.set_config('search_path', {}, true)",
                        quote_literal(search_path)
                    ),
                    expect_rows: None,
                },
                Stmt {
                    sql: sql.clone(),
                    expect_rows: None,
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
        let mut changes = vec![ins("1"), ins("2"), toast, del, ins("4")];
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
        // Batches stop at INSERT_BATCH_ROWS.
        changes = (0..INSERT_BATCH_ROWS + 1)
            .map(|i| ins(&i.to_string()))
            .collect();
        let st = replay_statements(&changes).unwrap();
        let rows: Vec<Option<u64>> = st.iter().map(|s| s.expect_rows).collect();
        assert_eq!(rows, [Some(INSERT_BATCH_ROWS as u64), Some(1)]);
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
