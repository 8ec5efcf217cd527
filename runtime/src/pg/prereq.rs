//! What mm requires of a node's PostgreSQL (ARCHITECTURE §1), checked by
//! `mmctl init` and `mm-harness pg-check`: each unmet requirement says
//! exactly which `postgresql.conf` line to set.

/// What mm requires of every node's PostgreSQL in an `nodes`-node cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirements {
    pub nodes: u32,
    pub max_connections: u32,
    /// `data_plane.appliers_per_peer`: each applier binds a replication origin.
    pub appliers_per_peer: u32,
}

impl Requirements {
    /// Every client session may hold one prepared transaction per node
    /// (its own, plus the ones appliers prepare for peers): max_connections × N,
    /// and never fewer than 100 × N.
    pub fn max_prepared_transactions(&self) -> u32 {
        self.max_connections.max(100) * self.nodes
    }
    /// One logical slot per peer (N-1), room for a joining node's catch-up
    /// slots and a spare: 2N+2. In PostgreSQL 15 the same setting also caps
    /// the replication origins a server ever used ("could not find free
    /// replication state slot"), and mm uses one per applier and one for
    /// replays (and resync) per peer: (N-1) x (appliers_per_peer + 1).
    pub fn max_replication_slots(&self) -> u32 {
        (2 * self.nodes + 2).max(self.origins())
    }
    /// Replication origins a node uses: (N-1) x (appliers_per_peer + 1).
    pub fn origins(&self) -> u32 {
        self.nodes.saturating_sub(1) * (self.appliers_per_peer + 1)
    }
    /// Each slot is read by one walsender.
    pub fn max_wal_senders(&self) -> u32 {
        2 * self.nodes + 2
    }
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
pub fn check(obs: &Observed, nodes: u32, appliers_per_peer: u32) -> Vec<Finding> {
    let req = Requirements {
        nodes,
        max_connections: obs.max_connections,
        appliers_per_peer,
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
        format!(
            "2 x {nodes} nodes + 2 slots, and {} replication origins: {} peers x ({appliers_per_peer} appliers + 1)",
            req.origins(),
            nodes.saturating_sub(1)
        ),
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
pub async fn observe(client: &tokio_postgres::Client) -> Result<Observed, tokio_postgres::Error> {
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
        let f = check(&obs, 3, 4);
        assert!(!f[0].ok && f[0].message.contains("`wal_level = logical`"));
        assert!(!f[1].ok && f[1].message.contains("`max_prepared_transactions = 300`"));
        assert!(f[2].ok && f[3].ok);
    }

    /// PostgreSQL 15 caps replication origins by `max_replication_slots`:
    /// 5 nodes with 4 appliers per peer use 4 x 5 = 20 origins, more than
    /// the 2N+2 = 12 slots.
    #[test]
    fn replication_slots_count_every_origin() {
        let obs = Observed {
            wal_level: "logical".into(),
            max_connections: 100,
            max_prepared_transactions: 500,
            max_replication_slots: 16,
            max_wal_senders: 12,
        };
        let f = check(&obs, 5, 4);
        assert!(!f[2].ok, "{}", f[2].message);
        assert!(
            f[2].message.contains("`max_replication_slots = 20`"),
            "{}",
            f[2].message
        );
        assert!(
            f[2].message.contains("20 replication origins"),
            "{}",
            f[2].message
        );
        assert!(check(&obs, 5, 3)[2].ok, "4 x 4 = 16 origins fit");
        assert!(check(&obs, 3, 4)[2].ok);
    }
}
