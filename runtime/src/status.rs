//! Publishes the node's status into its own database for `mtm.status()` and
//! `mtm.nodes()` (SQL, like multimaster's) and `mmctl status`: on every
//! change and at least twice a second, so a stale report (mmd gone) shows.

use crate::config::NodeConfig;
use crate::driver::StatusSnapshot;
use crate::pg::hub::Hub;
use crate::pg::receiver::redact;
use crate::proxy::session::status_name;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::NoTls;

const UPSERT_STATUS: &str = "INSERT INTO mm.status_now (singleton, my_node_id, status, connected, \
     gen_num, gen_members, gen_donors, gen_configured, in_doubt, resync, updated_at) \
     VALUES (true, $1, $2, $3, $4, $5, $6, $7, $8, $9, now()) \
     ON CONFLICT (singleton) DO UPDATE SET my_node_id = EXCLUDED.my_node_id, \
     status = EXCLUDED.status, connected = EXCLUDED.connected, gen_num = EXCLUDED.gen_num, \
     gen_members = EXCLUDED.gen_members, gen_donors = EXCLUDED.gen_donors, \
     gen_configured = EXCLUDED.gen_configured, in_doubt = EXCLUDED.in_doubt, \
     resync = EXCLUDED.resync, updated_at = now()";
const UPSERT_NODE: &str =
    "INSERT INTO mm.nodes_now (id, conninfo, is_self, connected, link, receiver_ok) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET conninfo = EXCLUDED.conninfo, \
     is_self = EXCLUDED.is_self, connected = EXCLUDED.connected, link = EXCLUDED.link, \
     receiver_ok = EXCLUDED.receiver_ok";

fn ids(set: mm_core::NodeSet) -> Vec<i32> {
    set.iter().map(i32::from).collect()
}

/// Run until the driver stops; reconnects to the database as needed.
pub async fn run_status_writer(
    cfg: NodeConfig,
    mut watch: watch::Receiver<StatusSnapshot>,
    hub: Arc<Hub>,
) {
    loop {
        let (client, conn) = match tokio_postgres::connect(&cfg.postgres.conninfo, NoTls).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("status writer cannot connect: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        // A node dropped from the configuration leaves no stale row; the
        // configuration is fixed for this mmd's life, so once is enough.
        let configured: Vec<i32> = cfg.nodes.keys().map(|&i| i32::from(i)).collect();
        if let Err(e) = client
            .execute(
                "DELETE FROM mm.nodes_now WHERE id <> ALL($1)",
                &[&configured],
            )
            .await
        {
            tracing::warn!("cannot prune mm.nodes_now: {e}");
        }
        loop {
            let snap = watch.borrow_and_update().clone();
            if let Err(e) = write(&client, &cfg, &snap, &hub).await {
                tracing::warn!("cannot publish status: {e}");
                break;
            }
            tokio::select! {
                r = watch.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn write(
    c: &tokio_postgres::Client,
    cfg: &NodeConfig,
    s: &StatusSnapshot,
    hub: &Hub,
) -> Result<(), tokio_postgres::Error> {
    let configured: Vec<i32> = cfg.nodes.keys().map(|&i| i32::from(i)).collect();
    c.execute(
        UPSERT_STATUS,
        &[
            &i32::from(s.node_id),
            &if hub.resyncing() {
                "resync"
            } else {
                status_name(s.status)
            },
            &ids(s.connected),
            &(s.generation.num as i64),
            &ids(s.generation.members),
            &ids(s.generation.donors),
            &configured,
            &(s.in_doubt as i32),
            &hub.resync_note(),
        ],
    )
    .await?;
    for n in cfg.nodes.values() {
        let me = n.id == cfg.node_id;
        c.execute(
            UPSERT_NODE,
            &[
                &i32::from(n.id),
                &n.postgres.as_deref().map(redact),
                &me,
                &(me || s.connected.contains(n.id)),
                &(me || s.links.contains(n.id)),
                &(me || hub.receiver_up(n.id)),
            ],
        )
        .await?;
    }
    Ok(())
}
