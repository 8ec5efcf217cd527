//! Finishers: `COMMIT PREPARED` / `ROLLBACK PREPARED` for decided
//! transactions, on a small pool of sessions (each commit waits for its WAL
//! flush; several sessions let PostgreSQL group those flushes). A decision
//! is never dropped: a lost session is replaced and the statement retried.

use super::applier::pg_message;
use super::hub::Hub;
use super::sql::quote_literal;
use mm_core::{DbResult, Gid, Input};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::{Client, NoTls};

pub struct FinishJob {
    pub gid: Gid,
    pub commit: bool,
    pub results: UnboundedSender<Input>,
}

/// `undefined_object`: no prepared transaction has this gid (it finished already).
const UNDEFINED_OBJECT: &str = "42704";

pub async fn run_finisher(
    conninfo: String,
    jobs: async_channel::Receiver<FinishJob>,
    hub: Arc<Hub>,
) {
    let mut client: Option<Client> = None;
    while let Ok(job) = jobs.recv().await {
        let verb = if job.commit { "COMMIT" } else { "ROLLBACK" };
        let sql = format!("{verb} PREPARED {}", quote_literal(&job.gid.to_string()));
        let mut delay = Duration::from_millis(50);
        loop {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match tokio_postgres::connect(&super::named(&conninfo, "finisher"), NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        client = Some(c);
                    }
                    Err(e) => {
                        tracing::warn!(gid = %job.gid, "finisher cannot connect, retrying: {e}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            let c = client.as_ref().expect("connected above");
            match c.simple_query(&sql).await {
                Ok(_) => break,
                Err(e) if e.code().map(|c| c.code()) == Some(UNDEFINED_OBJECT) => {
                    tracing::debug!(gid = %job.gid, "{verb} PREPARED: already finished");
                    break;
                }
                Err(e) => {
                    tracing::warn!(gid = %job.gid, "{verb} PREPARED failed, retrying: {}", pg_message(&e));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        hub.mark_finished(&job.gid);
        let _ = job.results.send(Input::Db(DbResult::Finished {
            gid: job.gid,
            commit: job.commit,
        }));
    }
}
