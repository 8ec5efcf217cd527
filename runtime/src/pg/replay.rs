//! Replay of missed transactions. A node that was not online in a
//! generation (stopped, cut off, or not a member yet) lacks what committed
//! in it. Its receivers see those transactions in the peers' streams: a
//! peer's own ones (the core left them unapplied: no vote from a
//! non-member) and, in a donor's stream, the ones it applied for other
//! nodes (echoes). Once the stream shows one committed, it is replayed here
//! under its gid, in stream order, unless this node already holds it (the
//! `mm.applied_tx` record every apply writes, or a prepared copy). This is
//! what a catch-up mark waits for before the core goes `online`.

use super::applier::{check_row_counts, origin_session, pg_message, replay_body, run_chunks};
use super::hub::Hub;
use super::remote_tx::RemoteTx;
use super::sql::quote_literal;
use mm_core::NodeId;
use tokio_postgres::{Client, SimpleQueryMessage};

/// A replay waits this long for a row lock before the stream retries it.
const REPLAY_LOCK_TIMEOUT_MS: u64 = 5_000;

/// The origin a receiver's replays are tagged with: peers' receivers then
/// see them as echoes, not as writes made outside mm.
pub fn replay_origin(peer: NodeId) -> String {
    format!("mm_replay_{peer}")
}

pub struct Replayer {
    conninfo: String,
    origin: String,
    node_id: NodeId,
    client: Option<Client>,
}

impl Replayer {
    pub fn new(conninfo: String, peer: NodeId, node_id: NodeId) -> Replayer {
        Replayer {
            conninfo,
            origin: replay_origin(peer),
            node_id,
            client: None,
        }
    }

    /// Apply and commit `tx` here unless this node holds it already.
    /// Returns whether it was applied.
    pub async fn replay(&mut self, hub: &Hub, tx: &RemoteTx) -> Result<bool, String> {
        let _one_at_a_time = hub.replay_lock.lock().await;
        if hub.is_open(&tx.gid) {
            return Ok(false); // being applied or prepared here by the core's order
        }
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            // The origin is created here: replays are rare, and `mmctl init`
            // of an existing cluster did not create it.
            self.client = Some(origin_session(&self.conninfo, &self.origin, true).await?);
        }
        let c = self.client.as_ref().expect("connected above");
        let gid = quote_literal(&tx.gid.to_string());
        let held = c
            .simple_query(&format!(
                "SELECT EXISTS (SELECT 1 FROM mm.applied_tx WHERE gid = {gid}) \
                 OR EXISTS (SELECT 1 FROM pg_prepared_xacts WHERE gid = {gid})"
            ))
            .await
            .map_err(|e| pg_message(&e))?;
        let held = held.iter().any(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0) == Some("t"),
            _ => false,
        });
        if held {
            return Ok(false);
        }
        let (body, stmts) = replay_body(tx, REPLAY_LOCK_TIMEOUT_MS, self.node_id)?;
        // Prepared and committed under its gid, so this node's own stream
        // carries it as the same transaction to a node catching up from here.
        let counts = match run_chunks(c, body, &format!("PREPARE TRANSACTION {gid}"), || {}).await {
            Ok(m) => m,
            Err(e) => {
                let _ = c.simple_query("ROLLBACK").await;
                return Err(format!("replaying {}: {}", tx.gid, pg_message(&e)));
            }
        };
        if let Err(e) = check_row_counts(&counts, &stmts) {
            let _ = c.simple_query(&format!("ROLLBACK PREPARED {gid}")).await;
            return Err(format!(
                "replaying committed transaction {}: {e}; this node diverged and needs a resync",
                tx.gid
            ));
        }
        c.simple_query(&format!("COMMIT PREPARED {gid}"))
            .await
            .map_err(|e| format!("committing replayed {}: {}", tx.gid, pg_message(&e)))?;
        Ok(true)
    }
}
