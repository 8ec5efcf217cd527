//! The PostgreSQL settings an mm node needs (ARCHITECTURE §1), as written
//! into each local node's `mm.conf` and as checked by `mm-harness pg-check`.

use std::fmt::Write as _;
use std::path::Path;

/// What mm requires of every node's PostgreSQL in an `nodes`-node cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirements {
    pub nodes: u32,
    pub max_connections: u32,
}

impl Requirements {
    /// Every client session may hold one prepared transaction per node
    /// (its own, plus the ones appliers prepare for peers): max_connections × N,
    /// and never fewer than 100 × N.
    pub fn max_prepared_transactions(&self) -> u32 {
        self.max_connections.max(100) * self.nodes
    }
    /// One logical slot per peer (N-1), room for a joining node's catch-up
    /// slots and a spare: 2N+2.
    pub fn max_replication_slots(&self) -> u32 {
        2 * self.nodes + 2
    }
    /// Each slot is read by one walsender.
    pub fn max_wal_senders(&self) -> u32 {
        2 * self.nodes + 2
    }
}

/// Settings for one node of a local test cluster.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub port: u16,
    pub socket_dir: String,
    pub req: Requirements,
    /// `fsync = off`: only for tests. Safe against `kill -9` of PostgreSQL
    /// (written pages stay in the OS page cache), not against an OS crash.
    pub fsync: bool,
    /// Extra `name = value` lines, appended last (they win).
    pub extra: Vec<(String, String)>,
}

impl NodeSettings {
    pub fn render(&self) -> String {
        let r = &self.req;
        let mut s = String::new();
        let mut line = |k: &str, v: String, why: &str| {
            if why.is_empty() {
                let _ = writeln!(s, "{k} = {v}");
            } else {
                let _ = writeln!(s, "{k} = {v}\t\t# {why}");
            }
        };
        line("listen_addresses", "'127.0.0.1'".into(), "loopback only");
        line("port", self.port.to_string(), "");
        line(
            "unix_socket_directories",
            quote(&self.socket_dir),
            "inside the work dir, not /var/run/postgresql",
        );
        line(
            "wal_level",
            "logical".into(),
            "mm reads peers through logical slots",
        );
        line("max_connections", r.max_connections.to_string(), "");
        line(
            "max_prepared_transactions",
            r.max_prepared_transactions().to_string(),
            "max_connections x nodes",
        );
        line(
            "max_replication_slots",
            r.max_replication_slots().max(10).to_string(),
            "2N+2: one per peer, catch-up, spare",
        );
        line(
            "max_wal_senders",
            r.max_wal_senders().max(10).to_string(),
            "one per slot",
        );
        line("max_worker_processes", "16".into(), "");
        // mm keeps one two_phase logical slot per peer open from the peer's mmd.
        // wal_sender_timeout = 0 would let a walsender whose receiver vanished
        // without a FIN/RST (partition, paused process) hold its slot "active"
        // forever, so the reconnecting receiver gets "replication slot ... is
        // active for PID ..."; it would also hide a receiver that never answers
        // keepalives. Keep it on, shorter than the 60 s default, so fault tests
        // recover quickly. Prepared-but-undecided transactions do not depend on it.
        line(
            "wal_sender_timeout",
            "'10s'".into(),
            "not 0: see harness/src/pg_conf.rs",
        );
        // A slot keeps exactly what its peer has not confirmed (catch-up source).
        line(
            "max_slot_wal_keep_size",
            "-1".into(),
            "slots retain all WAL",
        );
        line(
            "fsync",
            if self.fsync { "on" } else { "off" }.into(),
            if self.fsync {
                ""
            } else {
                "TESTS ONLY: survives kill -9, not an OS crash"
            },
        );
        line("log_line_prefix", "'%m [%p] %q%a '".into(), "");
        line("log_min_messages", "warning".into(), "");
        for (k, v) in &self.extra {
            line(k, v.clone(), "extra");
        }
        s
    }

    /// Writes `mm.conf` next to `postgresql.conf` and includes it from there (once).
    pub fn install(&self, data_dir: &Path) -> std::io::Result<()> {
        std::fs::write(
            data_dir.join("mm.conf"),
            format!(
                "# Written by mm-harness (harness/src/pg_conf.rs); rewritten on every start.\n{}",
                self.render()
            ),
        )?;
        let main = data_dir.join("postgresql.conf");
        let text = std::fs::read_to_string(&main)?;
        if !text.contains("include 'mm.conf'") {
            std::fs::write(&main, format!("{text}\ninclude 'mm.conf'\n"))?;
        }
        Ok(())
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A server's current values of the settings mm cares about.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub wal_level: String,
    pub max_connections: u32,
    pub max_prepared_transactions: u32,
    pub max_replication_slots: u32,
    pub max_wal_senders: u32,
}

/// One finding of [`check`].
#[derive(Debug, Clone)]
pub struct Finding {
    pub ok: bool,
    pub setting: &'static str,
    pub message: String,
}

/// Compares a server's settings with what an `nodes`-node mm cluster needs.
/// Each failed finding says exactly which `postgresql.conf` line to set.
pub fn check(obs: &Observed, nodes: u32) -> Vec<Finding> {
    let req = Requirements {
        nodes,
        max_connections: obs.max_connections,
    };
    let mut out = Vec::new();
    out.push(if obs.wal_level == "logical" {
        Finding {
            ok: true,
            setting: "wal_level",
            message: "wal_level = logical".into(),
        }
    } else {
        Finding {
            ok: false,
            setting: "wal_level",
            message: format!(
                "wal_level = {} but mm needs logical decoding: set `wal_level = logical` in \
                 postgresql.conf (restart required)",
                obs.wal_level
            ),
        }
    });
    let mut at_least = |setting: &'static str, have: u32, need: u32, why: String| {
        out.push(if have >= need {
            Finding {
                ok: true,
                setting,
                message: format!("{setting} = {have} (need >= {need}: {why})"),
            }
        } else {
            Finding {
                ok: false,
                setting,
                message: format!(
                    "{setting} = {have} is too small ({why}): set `{setting} = {need}` in \
                     postgresql.conf (restart required)"
                ),
            }
        });
    };
    at_least(
        "max_prepared_transactions",
        obs.max_prepared_transactions,
        req.max_prepared_transactions(),
        format!(
            "max_connections {} x {nodes} nodes",
            obs.max_connections.max(100)
        ),
    );
    at_least(
        "max_replication_slots",
        obs.max_replication_slots,
        req.max_replication_slots(),
        format!("2 x {nodes} nodes + 2"),
    );
    at_least(
        "max_wal_senders",
        obs.max_wal_senders,
        req.max_wal_senders(),
        format!("2 x {nodes} nodes + 2"),
    );
    out
}

/// Reads [`Observed`] from a server.
pub async fn observe(client: &tokio_postgres::Client) -> anyhow::Result<Observed> {
    let rows = client
        .query(
            "select name, setting from pg_settings where name = any($1)",
            &[&vec![
                "wal_level",
                "max_connections",
                "max_prepared_transactions",
                "max_replication_slots",
                "max_wal_senders",
            ]],
        )
        .await?;
    let mut o = Observed::default();
    for row in rows {
        let name: String = row.get(0);
        let value: String = row.get(1);
        let num = || value.parse::<u32>().unwrap_or(0);
        match name.as_str() {
            "wal_level" => o.wal_level = value.clone(),
            "max_connections" => o.max_connections = num(),
            "max_prepared_transactions" => o.max_prepared_transactions = num(),
            "max_replication_slots" => o.max_replication_slots = num(),
            "max_wal_senders" => o.max_wal_senders = num(),
            _ => {}
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fail_with_exact_lines() {
        let obs = Observed {
            wal_level: "replica".into(),
            max_connections: 100,
            max_prepared_transactions: 0,
            max_replication_slots: 10,
            max_wal_senders: 10,
        };
        let f = check(&obs, 3);
        assert!(!f[0].ok && f[0].message.contains("`wal_level = logical`"));
        assert!(!f[1].ok && f[1].message.contains("`max_prepared_transactions = 300`"));
        assert!(f[2].ok && f[3].ok);
    }

    #[test]
    fn rendered_settings_pass_the_check() {
        let s = NodeSettings {
            port: 5555,
            socket_dir: "/tmp/x".into(),
            req: Requirements {
                nodes: 3,
                max_connections: 100,
            },
            fsync: false,
            extra: vec![],
        };
        let text = s.render();
        assert!(text.contains("wal_level = logical"));
        assert!(text.contains("max_prepared_transactions = 300"));
        assert!(text.contains("fsync = off"));
    }
}
