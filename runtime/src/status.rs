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

/// How often the report is written when nothing but the in-doubt count changed:
/// `mtm.status()` calls a report older than 5 s stale.
const REFRESH: Duration = Duration::from_millis(500);

/// What was last published, to tell a change of state from a refresh.
#[derive(PartialEq, Eq)]
struct Written {
    /// Status, generation, connectivity, resync: published as soon as they change.
    state: (&'static str, mm_core::Generation, mm_core::NodeSet),
    /// Each peer's link and receiver (`mm.nodes_now`).
    nodes: (mm_core::NodeSet, mm_core::NodeSet, Vec<mm_core::NodeId>),
}

impl Written {
    fn of(s: &StatusSnapshot, hub: &Hub) -> Written {
        let status = if hub.resyncing() {
            "resync"
        } else {
            status_name(s.status)
        };
        let receivers = hub.receivers_up();
        Written {
            state: (status, s.generation, s.connected),
            nodes: (s.connected, s.links, receivers),
        }
    }
}

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
        let (client, conn) = match tokio_postgres::connect(
            &crate::pg::named(&cfg.postgres.conninfo, "status"),
            NoTls,
        )
        .await
        {
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
        let mut last: Option<Written> = None;
        let mut last_at = tokio::time::Instant::now();
        loop {
            let snap = watch.borrow_and_update().clone();
            let now = Written::of(&snap, &hub);
            // A change of state is published at once; the in-doubt count
            // moves with every transaction, so on its own it waits for the
            // periodic refresh: writing it at each commit cost about a
            // sixth of the machine's CPU under the seed workload.
            let due = last_at.elapsed() >= REFRESH;
            let changed = last.as_ref().is_none_or(|l| l.state != now.state);
            if changed || due {
                let nodes_changed = last.as_ref().is_none_or(|l| l.nodes != now.nodes);
                if let Err(e) = write(&client, &cfg, &snap, &hub, nodes_changed).await {
                    tracing::warn!("cannot publish status: {e}");
                    break;
                }
                last = Some(now);
                last_at = tokio::time::Instant::now();
            }
            let wait = REFRESH.saturating_sub(last_at.elapsed());
            tokio::select! {
                r = watch.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
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
    nodes_changed: bool,
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
    if !nodes_changed {
        return Ok(());
    }
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
