//! What a client statement means for replication, from its leading words.
//! Not a SQL parser (sqlparser-rs rejects much valid PostgreSQL, and a
//! statement it cannot parse would still need a decision): a small lexer
//! that skips quoted text, dollar quotes and comments, enough to split a
//! query string at its top-level semicolons and look at keywords. Anything
//! unrecognised counts as a write, the safe side: it runs inside a
//! replicated transaction.

/// How the proxy treats a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Runs as is outside a transaction (the session is read-only by
    /// default, so a misjudged write fails instead of escaping replication).
    Read,
    /// Must run inside a replicated transaction.
    Write,
    /// Schema change: replicated as a DDL message in the same transaction.
    Ddl,
    /// Schema change of session-local objects (temporary tables): not replicated.
    LocalDdl,
    Begin {
        read_only: bool,
    },
    Commit,
    Rollback,
    /// SAVEPOINT, RELEASE, ROLLBACK TO: inside the open transaction.
    Savepoint,
    /// Session settings and statement handles: no transaction needed.
    Session,
    /// VACUUM, ANALYZE, CHECKPOINT, REINDEX, CLUSTER: this node only.
    Maintenance,
    /// Refused with this reason.
    Refused(&'static str),
    Empty,
}

impl Kind {
    /// Needs a replicated transaction around it when run outside one.
    pub fn needs_transaction(&self) -> bool {
        matches!(self, Kind::Write | Kind::Ddl)
    }
    pub fn is_transaction_control(&self) -> bool {
        matches!(self, Kind::Begin { .. } | Kind::Commit | Kind::Rollback)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    /// Lowercased word, or a single punctuation character.
    text: String,
    /// Parenthesis depth at the token.
    depth: u32,
}

/// Splits `sql` into statements at top-level semicolons and lexes each.
fn lex(sql: &str) -> Vec<(String, Vec<Token>)> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut toks = Vec::new();
    let mut start = 0;
    let mut depth = 0u32;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut nest = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        nest += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        nest -= 1;
                        i += 2;
                        if nest == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            b'\'' | b'"' => {
                // 'it''s' and "a""b": a doubled quote stays inside; in an
                // E'…' literal a backslash escapes the next byte.
                let escapes = c == b'\'' && i > 0 && matches!(b[i - 1], b'e' | b'E');
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == c {
                        if b.get(i + 1) == Some(&c) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                toks.push(Token {
                    text: if c == b'"' { "\"ident\"" } else { "'lit'" }.into(),
                    depth,
                });
            }
            b'$' => {
                // $tag$ ... $tag$ (or a $1 parameter).
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                if j < b.len()
                    && b[j] == b'$'
                    && !b[i + 1..j].first().is_some_and(u8::is_ascii_digit)
                {
                    let tag = &b[i..=j];
                    let mut k = j + 1;
                    while k + tag.len() <= b.len() && &b[k..k + tag.len()] != tag {
                        k += 1;
                    }
                    i = (k + tag.len()).min(b.len());
                    toks.push(Token {
                        text: "'lit'".into(),
                        depth,
                    });
                    continue;
                }
                i = j;
                continue;
            }
            b'(' => {
                depth += 1;
                toks.push(Token {
                    text: "(".into(),
                    depth,
                });
            }
            b')' => {
                depth = depth.saturating_sub(1);
                toks.push(Token {
                    text: ")".into(),
                    depth,
                });
            }
            b';' if depth == 0 => {
                out.push((sql[start..i].trim().to_string(), std::mem::take(&mut toks)));
                start = i + 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let s = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                toks.push(Token {
                    text: sql[s..i].to_ascii_lowercase(),
                    depth,
                });
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    let rest = sql[start.min(sql.len())..].trim();
    if !rest.is_empty() || !toks.is_empty() {
        out.push((rest.to_string(), toks));
    }
    out
}

/// The statements of a query string, each with its kind. Empty statements
/// (stray semicolons, comments only) are dropped.
pub fn statements(sql: &str) -> Vec<(String, Kind)> {
    lex(sql)
        .into_iter()
        .map(|(text, toks)| {
            let k = kind_of(&toks);
            (text, k)
        })
        .filter(|(_, k)| *k != Kind::Empty)
        .collect()
}

/// Whether `sql` is a `COPY ... FROM` (the backend then reads copy data:
/// nothing may be pipelined behind it, or the backend takes that for bad
/// copy data and drops the session).
pub fn copies_in(sql: &str) -> bool {
    let first = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next();
    first.is_some_and(|w| w.eq_ignore_ascii_case("copy")) && classify(sql) == Kind::Write
}

/// A statement that changes the session's `mm.wait_peer_commits`:
/// `Some(Some(v))` for `SET [SESSION|LOCAL] mm.wait_peer_commits = v|TO v`,
/// `Some(None)` for `RESET` (back to the node's default). The statement
/// still goes to PostgreSQL (a placeholder setting there, so `SHOW` works);
/// the proxy keeps its own copy to avoid asking at every COMMIT. `LOCAL` is
/// taken as session-wide.
pub fn wait_peer_commits_setting(sql: &str) -> Option<Option<bool>> {
    // Every statement passes here: lower-case (allocate) only a SET/RESET.
    let first = sql.trim_start().split(char::is_whitespace).next()?;
    if !first.eq_ignore_ascii_case("set") && !first.eq_ignore_ascii_case("reset") {
        return None;
    }
    let lower = sql.trim().trim_end_matches(';').to_ascii_lowercase();
    let mut w = lower
        .split(|c: char| c.is_whitespace() || c == '=')
        .filter(|t| !t.is_empty());
    match w.next()? {
        "reset" => (w.next()? == "mm.wait_peer_commits" && w.next().is_none()).then_some(None),
        "set" => {
            let mut name = w.next()?;
            if name == "session" || name == "local" {
                name = w.next()?;
            }
            if name != "mm.wait_peer_commits" {
                return None;
            }
            let mut v = w.next()?;
            if v == "to" {
                v = w.next()?;
            }
            if w.next().is_some() {
                return None;
            }
            match v.trim_matches('\'') {
                "on" | "true" | "yes" | "1" => Some(Some(true)),
                "off" | "false" | "no" | "0" => Some(Some(false)),
                "default" => Some(None),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The kind of a single statement (a Parse message holds one).
pub fn classify(sql: &str) -> Kind {
    let all = statements(sql);
    match all.len() {
        0 => Kind::Empty,
        1 => all.into_iter().next().expect("one").1,
        _ => Kind::Refused("a prepared statement cannot hold several commands"),
    }
}

fn words(toks: &[Token]) -> Vec<&str> {
    toks.iter().map(|t| t.text.as_str()).collect()
}

fn has_seq(w: &[&str], seq: &[&str]) -> bool {
    w.windows(seq.len()).any(|x| x == seq)
}

fn kind_of(toks: &[Token]) -> Kind {
    let w = words(toks);
    let top: Vec<&str> = toks
        .iter()
        .filter(|t| t.depth == 0)
        .map(|t| t.text.as_str())
        .collect();
    let first = match w.first() {
        None => return Kind::Empty,
        Some(f) => *f,
    };
    let second = w.get(1).copied().unwrap_or("");
    match first {
        "select" | "values" | "table" | "with" | "(" => {
            if top.contains(&"into") && first == "select" {
                return Kind::Refused(
                    "SELECT INTO is not supported: use CREATE TABLE, then INSERT … SELECT",
                );
            }
            let writes = ["insert", "update", "delete", "merge"];
            if first == "with" && w.iter().any(|x| writes.contains(x)) {
                return Kind::Write;
            }
            if has_seq(&w, &["for", "update"])
                || has_seq(&w, &["for", "share"])
                || has_seq(&w, &["for", "no", "key"])
                || has_seq(&w, &["for", "key", "share"])
                || w.iter().any(|x| {
                    matches!(
                        *x,
                        "nextval" | "setval" | "pg_advisory_xact_lock" | "lo_create" | "lo_unlink"
                    )
                })
            {
                return Kind::Write;
            }
            Kind::Read
        }
        "show" => Kind::Read,
        "explain" => {
            if w.contains(&"analyze") || w.contains(&"analyse") {
                Kind::Write
            } else {
                Kind::Read
            }
        }
        "insert" | "update" | "delete" | "merge" | "call" | "do" | "lock" | "execute"
        | "declare" | "fetch" | "move" | "truncate" | "import" => Kind::Write,
        "copy" => {
            if top.contains(&"from") {
                Kind::Write
            } else {
                Kind::Read
            }
        }
        "begin" | "start" => Kind::Begin {
            read_only: has_seq(&w, &["read", "only"]),
        },
        "commit" | "end" => {
            if second == "prepared" {
                Kind::Refused("COMMIT PREPARED is mm's own: clients cannot run two-phase commit")
            } else if has_seq(&w, &["and", "chain"]) && !has_seq(&w, &["and", "no", "chain"]) {
                Kind::Refused("COMMIT AND CHAIN is not supported")
            } else {
                Kind::Commit
            }
        }
        "rollback" | "abort" => {
            if second == "prepared" {
                Kind::Refused("ROLLBACK PREPARED is mm's own: clients cannot run two-phase commit")
            } else if w.contains(&"to") {
                Kind::Savepoint
            } else {
                Kind::Rollback
            }
        }
        "savepoint" | "release" => Kind::Savepoint,
        "prepare" => {
            if second == "transaction" {
                Kind::Refused(
                    "PREPARE TRANSACTION is mm's own: clients cannot run two-phase commit",
                )
            } else {
                Kind::Session
            }
        }
        "set" | "reset" => {
            let managed = w.contains(&"default_transaction_read_only")
                || has_seq(&w, &["session", "characteristics"]);
            if managed {
                Kind::Refused("default_transaction_read_only is managed by mm in proxied sessions")
            } else {
                Kind::Session
            }
        }
        "deallocate" | "discard" | "listen" | "unlisten" | "notify" | "load" | "close" => {
            Kind::Session
        }
        "vacuum" | "analyze" | "analyse" | "checkpoint" | "reindex" | "cluster" => {
            Kind::Maintenance
        }
        "create" | "alter" | "drop" => ddl_kind(first, &w, &top),
        "comment" | "grant" | "revoke" | "security" | "refresh" | "reassign" => Kind::Ddl,
        _ => Kind::Write,
    }
}

fn ddl_kind(verb: &str, w: &[&str], top: &[&str]) -> Kind {
    let obj: Vec<&str> = w[1..]
        .iter()
        .copied()
        .filter(|x| {
            !matches!(
                *x,
                "or" | "replace" | "unique" | "unlogged" | "global" | "local"
            )
        })
        .take(2)
        .collect();
    let o0 = obj.first().copied().unwrap_or("");
    if matches!(o0, "temp" | "temporary") {
        return Kind::LocalDdl;
    }
    match (verb, o0) {
        (_, "database") if verb != "alter" => Kind::Refused(
            "CREATE/DROP DATABASE cannot run in a transaction: run it on every node directly",
        ),
        (_, "tablespace") => {
            Kind::Refused("tablespaces are per node: create them on every node directly")
        }
        ("alter", "system") => Kind::Refused(
            "ALTER SYSTEM changes one node's configuration: run it on each node directly",
        ),
        (_, "subscription") | (_, "publication") => Kind::Refused(
            "publications and subscriptions are per node: mm's data plane manages its own",
        ),
        (_, "index") if obj.get(1) == Some(&"concurrently") => Kind::Refused(
            "CREATE/DROP INDEX CONCURRENTLY cannot run in a transaction: use CREATE INDEX",
        ),
        ("create", "table") if top.contains(&"as") => {
            Kind::Refused("CREATE TABLE AS is not supported: CREATE TABLE, then INSERT … SELECT")
        }
        _ => Kind::Ddl,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(sql: &str) -> Kind {
        classify(sql)
    }

    #[test]
    fn wait_peer_commits_settings() {
        let w = wait_peer_commits_setting;
        assert_eq!(w("SET mm.wait_peer_commits = off"), Some(Some(false)));
        assert_eq!(
            w("set session mm.wait_peer_commits to 'on';"),
            Some(Some(true))
        );
        assert_eq!(w("SET LOCAL mm.wait_peer_commits=false"), Some(Some(false)));
        assert_eq!(w("RESET mm.wait_peer_commits"), Some(None));
        assert_eq!(w("SET mm.wait_peer_commits TO DEFAULT"), Some(None));
        assert_eq!(w("SET mm.wait_peer_commits = maybe"), None);
        assert_eq!(w("SET work_mem = '4MB'"), None);
        assert_eq!(w("select 'SET mm.wait_peer_commits = off'"), None);
    }

    #[test]
    fn reads_writes_and_control() {
        assert_eq!(k("select 1"), Kind::Read);
        assert_eq!(k("SELECT * FROM t WHERE a = 'x;y'"), Kind::Read);
        assert_eq!(k("select * from t for update"), Kind::Write);
        assert_eq!(k("select nextval('s')"), Kind::Write);
        assert_eq!(
            k("with x as (delete from t returning *) select * from x"),
            Kind::Write
        );
        assert_eq!(k("with x as (select 1) select * from x"), Kind::Read);
        assert_eq!(k("insert into mm select 1"), Kind::Write);
        assert_eq!(k("  update mm set a = 1"), Kind::Write);
        assert_eq!(k("BEGIN"), Kind::Begin { read_only: false });
        assert_eq!(k("begin read only"), Kind::Begin { read_only: true });
        assert_eq!(
            k("start transaction isolation level serializable"),
            Kind::Begin { read_only: false }
        );
        assert_eq!(k("END"), Kind::Commit);
        assert_eq!(k("commit"), Kind::Commit);
        assert_eq!(k("rollback"), Kind::Rollback);
        assert_eq!(k("rollback to savepoint a"), Kind::Savepoint);
        assert!(matches!(k("prepare transaction 'x'"), Kind::Refused(_)));
        assert!(matches!(k("commit prepared 'x'"), Kind::Refused(_)));
        assert_eq!(k("prepare s as select 1"), Kind::Session);
        assert_eq!(k("set search_path = a"), Kind::Session);
        assert!(matches!(
            k("set default_transaction_read_only = off"),
            Kind::Refused(_)
        ));
        assert_eq!(k("copy t from stdin"), Kind::Write);
        assert_eq!(k("copy t to stdout"), Kind::Read);
        assert!(copies_in("  COPY t (a) FROM STDIN"));
        assert!(!copies_in("copy t to stdout"));
        assert!(!copies_in("insert into t select 1"));
        assert_eq!(k("explain select 1"), Kind::Read);
        assert_eq!(k("explain analyze delete from t"), Kind::Write);
        assert_eq!(k("vacuum t"), Kind::Maintenance);
        assert_eq!(k("frobnicate the database"), Kind::Write);
        assert_eq!(k(" -- only a comment\n"), Kind::Empty);
    }

    #[test]
    fn ddl() {
        assert_eq!(k("create table t(id int primary key)"), Kind::Ddl);
        assert_eq!(
            k("create table t(id int generated always as identity primary key)"),
            Kind::Ddl
        );
        assert!(matches!(k("create table t as select 1"), Kind::Refused(_)));
        assert!(matches!(k("select 1 into t"), Kind::Refused(_)));
        assert_eq!(k("create temp table t(a int)"), Kind::LocalDdl);
        assert_eq!(k("create local temporary table t(a int)"), Kind::LocalDdl);
        assert_eq!(
            k("create or replace function f() returns int as $$ select 1; $$ language sql"),
            Kind::Ddl
        );
        assert_eq!(k("create unique index i on t(a)"), Kind::Ddl);
        assert!(matches!(
            k("create index concurrently i on t(a)"),
            Kind::Refused(_)
        ));
        assert!(matches!(k("create database x"), Kind::Refused(_)));
        assert!(matches!(
            k("alter system set work_mem = '1MB'"),
            Kind::Refused(_)
        ));
        assert_eq!(k("alter table t add column b int"), Kind::Ddl);
        assert_eq!(k("drop table t"), Kind::Ddl);
        assert_eq!(k("grant select on t to public"), Kind::Ddl);
    }

    #[test]
    fn splitting_respects_quotes_comments_and_dollar_quotes() {
        let s = statements(
            "insert into t values ('a;b'); /* ; */ select \"x;y\" from t; \
             create function f() returns int as $body$ select 1; $body$ language sql;;",
        );
        let kinds: Vec<Kind> = s.iter().map(|x| x.1.clone()).collect();
        assert_eq!(kinds, vec![Kind::Write, Kind::Read, Kind::Ddl]);
        assert_eq!(statements("select $1; select 2").len(), 2);
        assert_eq!(statements("select E'it\\'s; x'").len(), 1);
        assert!(matches!(k("select 1; select 2"), Kind::Refused(_)));
    }
}
