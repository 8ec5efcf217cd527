//! `mmctl init`: check that a node's PostgreSQL can run mm and prepare it.
//! Preparation is idempotent, so running it again is harmless:
//! - the `mm` schema with the durable protocol state;
//! - the publication the peers' pgoutput streams read (`mm_publication`, all tables);
//! - one logical slot per peer, with `two_phase` on, so a prepared
//!   transaction reaches the peer at PREPARE time (`mm_slot_for_<peer>`);
//! - one replication origin per applier of each peer, which the applier binds
//!   its session to, so changes applied for a peer are tagged and never
//!   echoed back as ours (`mm_node_<peer>_<k>`);
//! - `mm.adjust_sequences`, `mtm.status()`, `mtm.nodes()` (see `functions`).

use crate::config::NodeConfig;
use crate::pg::prereq::{self, Finding};
use crate::pg::replication::conn::{plugin_unusable, FILTERING_PLUGIN};
use crate::pg::StateStore;
use mm_core::NodeId;
use tokio_postgres::NoTls;

pub const PUBLICATION: &str = "mm_publication";

/// The slot on this node that `peer` streams from.
pub fn slot_for(peer: NodeId) -> String {
    format!("mm_slot_for_{peer}")
}

pub use super::applier::applier_origin;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot connect to PostgreSQL ({conninfo}): {source}")]
    Connect {
        conninfo: String,
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL {found} is not supported: mm needs PostgreSQL 15")]
    Version { found: String },
    #[error("PostgreSQL is not ready for mm:\n{}", list(.0))]
    Prerequisites(Vec<Finding>),
    #[error("{what}: {source}")]
    Sql {
        what: String,
        source: tokio_postgres::Error,
    },
    #[error(
        "slot {slot} exists without two_phase, so prepared transactions would reach peers \
         only at COMMIT PREPARED: drop it (select pg_drop_replication_slot('{slot}')) and run init again"
    )]
    SlotWithoutTwoPhase { slot: String },
    #[error(transparent)]
    State(#[from] crate::storage::StorageError),
}

fn list(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(|f| format!("  - {}", f.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What `init` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub created: Vec<String>,
    pub existing: Vec<String>,
}

/// Check the prerequisites (nothing is changed if one is missing), then prepare.
pub async fn init_node(cfg: &NodeConfig) -> Result<InitReport, InitError> {
    let conninfo = &cfg.postgres.conninfo;
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .map_err(|source| InitError::Connect {
            conninfo: conninfo.clone(),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "init: connection ended");
        }
    });
    let sql = |what: &str| {
        let what = what.to_string();
        move |source| InitError::Sql { what, source }
    };

    let version: i32 = client
        .query_one("select current_setting('server_version_num')::int", &[])
        .await
        .map_err(sql("reading server_version_num"))?
        .get(0);
    if !(150000..160000).contains(&version) {
        return Err(InitError::Version {
            found: version.to_string(),
        });
    }
    let observed = prereq::observe(&client)
        .await
        .map_err(sql("reading pg_settings"))?;
    let missing: Vec<Finding> = prereq::check(
        &observed,
        cfg.nodes.len() as u32,
        cfg.data_plane.appliers_per_peer as u32,
    )
    .into_iter()
    .filter(|f| !f.ok)
    .collect();
    if !missing.is_empty() {
        return Err(InitError::Prerequisites(missing));
    }

    let mut report = InitReport::default();
    let mut store = StateStore::connect(conninfo).await?;
    store.init_schema().await?;
    report.existing.push("schema mm".into());
    client
        .batch_execute(super::functions::FUNCTIONS)
        .await
        .map_err(sql(
            "installing mm.adjust_sequences, mtm.status() and mtm.nodes()",
        ))?;
    report
        .existing
        .push("functions mm.adjust_sequences, mtm.status, mtm.nodes".into());

    let has_pub = client
        .query_opt(
            "select 1 from pg_publication where pubname = $1",
            &[&PUBLICATION],
        )
        .await
        .map_err(sql("reading pg_publication"))?
        .is_some();
    if has_pub {
        report.existing.push(format!("publication {PUBLICATION}"));
    } else {
        client
            .batch_execute(&format!("create publication {PUBLICATION} for all tables"))
            .await
            .map_err(sql("creating the publication"))?;
        report.created.push(format!("publication {PUBLICATION}"));
    }

    for &peer in cfg.nodes.keys().filter(|&&p| p != cfg.node_id) {
        let slot = slot_for(peer);
        let row = client
            .query_opt(
                "select two_phase from pg_replication_slots where slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(sql("reading pg_replication_slots"))?;
        match row {
            Some(r) if r.get::<_, bool>(0) => report.existing.push(format!("slot {slot}")),
            Some(_) => return Err(InitError::SlotWithoutTwoPhase { slot }),
            None => {
                let create = "select pg_create_logical_replication_slot($1, $2, false, true)";
                let plugin = FILTERING_PLUGIN;
                let plugin = match client.query_one(create, &[&slot, &plugin]).await {
                    Err(e)
                        if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FILE)
                            || e.as_db_error()
                                .is_some_and(|d| plugin_unusable(d.message())) =>
                    {
                        tracing::warn!(
                            "{FILTERING_PLUGIN} is not usable on this server (install it with \
                             scripts/build-plugin.sh and name it in output_plugin_libraries): \
                             slot {slot} uses pgoutput, and every echo is decoded and sent"
                        );
                        client
                            .query_one(create, &[&slot, &"pgoutput"])
                            .await
                            .map_err(sql(&format!("creating slot {slot}")))?;
                        "pgoutput"
                    }
                    r => {
                        r.map_err(sql(&format!("creating slot {slot}")))?;
                        plugin
                    }
                };
                report.created.push(format!("slot {slot} ({plugin})"));
            }
        }
        for k in 0..cfg.data_plane.appliers_per_peer {
            let origin = applier_origin(peer, k);
            let exists = client
                .query_opt(
                    "select 1 from pg_replication_origin where roname = $1",
                    &[&origin],
                )
                .await
                .map_err(sql("reading pg_replication_origin"))?
                .is_some();
            if exists {
                report.existing.push(format!("origin {origin}"));
            } else {
                client
                    .query_one("select pg_replication_origin_create($1)", &[&origin])
                    .await
                    .map_err(sql(&format!("creating origin {origin}")))?;
                report.created.push(format!("origin {origin}"));
            }
        }
    }
    Ok(report)
}
