//! Fail-stop on losing the local PostgreSQL. A node whose database is gone
//! (killed, paused, unreachable) cannot apply, prepare or finish anything,
//! yet its heartbeats would keep it a member and every transaction would
//! wait for its vote. So `mmd` stops itself: the peers see it leave and form
//! a generation without it; a supervisor (systemd, a container restart
//! policy, the harness) starts it again once PostgreSQL is back, and it
//! catches up like any returning node.

use std::time::Duration;
use tokio_postgres::NoTls;

/// How often the database is asked `SELECT 1`.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// One probe's limit (a paused server accepts the connection but never answers).
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Returns once the local PostgreSQL has failed every probe for `grace`.
pub async fn local_postgres_lost(conninfo: String, grace: Duration) -> String {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        let r = tokio::time::timeout(PROBE_TIMEOUT, probe(&conninfo, &mut client)).await;
        let err = match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("no answer within {PROBE_TIMEOUT:?}")),
        };
        match err {
            None => failing_since = None,
            Some(e) => {
                client = None;
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= grace {
                    return format!(
                        "the local PostgreSQL has not answered for {:.1} s ({e}): this node \
                         stops so the others can go on; start mmd again once PostgreSQL is back",
                        since.elapsed().as_secs_f64()
                    );
                }
                tracing::warn!("local PostgreSQL probe failed: {e}");
            }
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

async fn probe(conninfo: &str, client: &mut Option<tokio_postgres::Client>) -> Result<(), String> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        let (c, conn) = tokio_postgres::connect(&crate::pg::named(conninfo, "watchdog"), NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        *client = Some(c);
    }
    let c = client.as_ref().expect("connected above");
    c.simple_query("SELECT 1")
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
