//! The PostgreSQL settings an mm node needs (ARCHITECTURE §1), as written
//! into each local node's `mm.conf` and as checked by `mm-harness pg-check`.

pub use mm_runtime::pg::prereq::{check, observe, Finding, Observed, Requirements};

/// The mmd configs the harness writes keep `data_plane.appliers_per_peer`
/// at its default, which sets how many replication origins a node uses.
pub const DEFAULT_APPLIERS: u32 = mm_runtime::config::DEFAULT_APPLIERS_PER_PEER as u32;
use std::fmt::Write as _;
use std::path::Path;

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
            "max(2N+2 slots, (N-1) x (appliers + 1) replication origins)",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_settings_pass_the_check() {
        let s = NodeSettings {
            port: 5555,
            socket_dir: "/tmp/x".into(),
            req: Requirements {
                nodes: 3,
                max_connections: 100,
                appliers_per_peer: DEFAULT_APPLIERS,
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
