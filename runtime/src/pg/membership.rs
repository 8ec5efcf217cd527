//! `mmctl add-node` and `mmctl drop-node`: the PostgreSQL side of changing
//! which nodes a cluster has. The membership itself is every node's
//! configuration: quorums are majorities of the configured nodes, and two
//! configurations one node apart always have intersecting majorities, so
//! nodes are restarted with the new configuration one at a time
//! (docs/protocol.md §14, "Adding and dropping nodes").
//!
//! - add-node, on the new node: its slot on every peer (so the peers keep
//!   its WAL from now on) and a durable request for an initial copy, which
//!   its `mmd` carries out before streaming anything ([`super::resync`]);
//! - drop-node, with a remaining node's configuration: once the node is out
//!   of every remaining node's generation and streams from none, its slots
//!   and replication origins are dropped everywhere, so no peer keeps WAL
//!   for it.

use super::applier::pg_message;
use super::init::slot_for;
use crate::config::NodeConfig;
use mm_core::NodeId;
use tokio_postgres::{Client, NoTls};

async fn connect(conninfo: &str) -> Result<Client, String> {
    let (c, conn) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .map_err(|e| {
            format!(
                "cannot connect ({}): {e}",
                super::receiver::redact(conninfo)
            )
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

/// Prepare this (new) node to join: see the module docs. Returns what it did.
pub async fn add_node(cfg: &NodeConfig, discard_local_data: bool) -> Result<Vec<String>, String> {
    let me = cfg.node_id;
    let local = connect(&cfg.postgres.conninfo).await?;
    let ready: bool = local
        .query_one("select to_regclass('mm.resync_request') is not null", &[])
        .await
        .map_err(|e| pg_message(&e))?
        .get(0);
    if !ready {
        return Err(
            "this node is not prepared for mm: run `mmctl init` with the same \
                    configuration first"
                .into(),
        );
    }
    let tables: i64 = local
        .query_one(
            "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where c.relkind in ('r', 'p') and n.nspname not in ('mm', 'mtm', 'information_schema') \
             and n.nspname not like 'pg\\_%'",
            &[],
        )
        .await
        .map_err(|e| pg_message(&e))?
        .get(0);
    if tables > 0 && !discard_local_data {
        return Err(format!(
            "this node's database has {tables} tables: joining replaces the whole database \
             with a donor's copy; pass --discard-local-data to go on"
        ));
    }
    // A larger cluster needs more slots, replication origins and walsenders
    // on every node: say which node must change what before touching any.
    let size = cfg.nodes.len() as u32;
    let mut short = Vec::new();
    for n in cfg.nodes.values().filter(|n| n.id != me) {
        let Some(conninfo) = n.postgres.as_deref() else {
            return Err(format!("nodes[id = {}].postgres is missing", n.id));
        };
        let Ok(c) = connect(conninfo).await else {
            continue; // reported below, with the slot
        };
        // A reused id would reuse gids the peers already hold.
        let used: bool = c
            .query_one(
                "select exists (select 1 from mm.applied_tx where gid like $1)",
                &[&format!("mm-{me}-%")],
            )
            .await
            .map_err(|e| format!("node {}: {}", n.id, pg_message(&e)))?
            .get(0);
        if used {
            return Err(format!(
                "node {} holds transactions of an earlier node {me}: an id is never reused, \
                 give the new node an id no node ever had",
                n.id
            ));
        }
        let obs = super::prereq::observe(&c)
            .await
            .map_err(|e| format!("node {}: {}", n.id, pg_message(&e)))?;
        for f in super::prereq::check(&obs, size, cfg.data_plane.appliers_per_peer as u32)
            .into_iter()
            .filter(|f| !f.ok)
        {
            short.push(format!("node {}: {}", n.id, f.message));
        }
    }
    if !short.is_empty() {
        return Err(format!(
            "the other nodes' PostgreSQL is not ready for a cluster of {size} nodes (change \
             these and restart each, one at a time):\n  - {}",
            short.join("\n  - ")
        ));
    }
    let mut done = Vec::new();
    let mut missing = Vec::new();
    for n in cfg.nodes.values().filter(|n| n.id != me) {
        let conninfo = n.postgres.as_deref().expect("checked above");
        match super::resync::make_slot(me, conninfo, false).await {
            Ok(true) => done.push(format!("created slot {} on node {}", slot_for(me), n.id)),
            Ok(false) => done.push(format!("slot {} exists on node {}", slot_for(me), n.id)),
            Err(e) => missing.push(format!("node {}: {e}", n.id)),
        }
    }
    if !missing.is_empty() {
        // The resync creates missing slots on the peers it reaches later;
        // saying so beats refusing while one peer is down.
        done.push(format!(
            "could not create this node's slot on: {} (the initial copy creates it when that \
             node is reachable)",
            missing.join("; ")
        ));
    }
    local
        .execute(
            "INSERT INTO mm.resync_request (singleton, reason) VALUES (true, 'add-node') \
             ON CONFLICT (singleton) DO NOTHING",
            &[],
        )
        .await
        .map_err(|e| pg_message(&e))?;
    done.push("requested an initial copy from a donor at the next start of mmd".into());
    Ok(done)
}

/// Remove node `gone` from every node of `cfg` (which must no longer list
/// it): see the module docs. Returns what it did.
pub async fn drop_node(cfg: &NodeConfig, gone: NodeId) -> Result<Vec<String>, String> {
    if cfg.nodes.contains_key(&gone) {
        return Err(format!(
            "node {gone} is still in this configuration: remove its [[nodes]] entry from every \
             remaining node's configuration first"
        ));
    }
    let slot = slot_for(gone);
    let mut clients = Vec::new();
    for n in cfg.nodes.values() {
        let conninfo = if n.id == cfg.node_id {
            cfg.postgres.conninfo.as_str()
        } else {
            n.postgres
                .as_deref()
                .ok_or_else(|| format!("nodes[id = {}].postgres is missing", n.id))?
        };
        let c = connect(conninfo)
            .await
            .map_err(|e| format!("node {}: {e}; every remaining node must be up", n.id))?;
        // Checked everywhere before anything is dropped.
        let member: Option<bool> = c
            .query_opt(
                "select $1::int = any(gen_members) from mtm.status()",
                &[&i32::from(gone)],
            )
            .await
            .map_err(|e| format!("node {}: {}", n.id, pg_message(&e)))?
            .map(|r| r.get(0));
        if member == Some(true) {
            return Err(format!(
                "node {} still counts node {gone} as a member of its generation: stop node \
                 {gone} and wait until the cluster forms a generation without it",
                n.id
            ));
        }
        let active: Option<bool> = c
            .query_opt(
                "select active from pg_replication_slots where slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| format!("node {}: {}", n.id, pg_message(&e)))?
            .map(|r| r.get(0));
        if active == Some(true) {
            return Err(format!(
                "node {gone} is still streaming from node {}: stop its mmd first",
                n.id
            ));
        }
        clients.push((n.id, c));
    }
    let mut done = Vec::new();
    for (id, c) in clients {
        let dropped = c
            .query(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
                 where slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| format!("node {id}: dropping {slot}: {}", pg_message(&e)))?;
        let origins: Vec<String> = c
            .query(
                "select roname::text from pg_replication_origin where roname like $1 or roname = $2",
                &[&format!("mm\\_node\\_{gone}\\_%"), &format!("mm_replay_{gone}")],
            )
            .await
            .map_err(|e| format!("node {id}: reading origins: {}", pg_message(&e)))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for o in &origins {
            c.execute("select pg_replication_origin_drop($1)", &[o])
                .await
                .map_err(|e| {
                    format!(
                        "node {id}: cannot drop origin {o} ({}): restart node {id}'s mmd with \
                         the new configuration first, then run drop-node again",
                        pg_message(&e)
                    )
                })?;
        }
        c.execute(
            "delete from mm.nodes_now where id = $1",
            &[&i32::from(gone)],
        )
        .await
        .map_err(|e| format!("node {id}: {}", pg_message(&e)))?;
        done.push(format!(
            "node {id}: dropped {} slot and {} replication origins of node {gone}",
            dropped.len(),
            origins.len()
        ));
    }
    Ok(done)
}
