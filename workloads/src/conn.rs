//! What every workload client shares: connecting, sorting a failure into
//! the buckets of [`Stats`](crate::Stats), and knowing when to stop.
//!
//! Why: the workloads run while nodes are killed, paused and partitioned.
//! A client must then reconnect rather than die, must never hang past the
//! end of the run on a paused server (every operation has a timeout, and a
//! timed-out commit is uncertain), and must classify an error the same way
//! in every workload, or the checks downstream would judge them differently.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

/// When a workload stops: at its deadline or when the token is cancelled,
/// whichever comes first. Clients finish the operation in flight (bounded by
/// its timeout) and return.
#[derive(Debug, Clone)]
pub struct Stop {
    cancel: CancellationToken,
    deadline: Instant,
}

impl Stop {
    /// Stops after `duration` or when `cancel` is cancelled.
    pub fn new(cancel: CancellationToken, duration: Duration) -> Stop {
        Stop {
            cancel,
            deadline: Instant::now() + duration,
        }
    }

    /// Stops after `duration`.
    pub fn after(duration: Duration) -> Stop {
        Stop::new(CancellationToken::new(), duration)
    }

    pub fn is_done(&self) -> bool {
        self.cancel.is_cancelled() || Instant::now() >= self.deadline
    }

    /// Sleeps `d`, waking early when the workload stops.
    pub async fn sleep(&self, d: Duration) {
        let until = (Instant::now() + d).min(self.deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = self.cancel.cancelled() => {}
        }
    }
}

/// How a failed statement counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// 40001 serialization failure or 40P01 deadlock: the database rolled the
    /// transaction back; the client may go on.
    Abort,
    /// The connection is gone (closed, I/O error, class 08, the server
    /// terminating it: 57P01/57P02, or mmd: 57P03), or the server said the outcome is
    /// unknown (40003). Uncertain if a commit was in flight.
    Lost(String),
    /// Anything else, with a message.
    Other(String),
}

/// Sorts an error from tokio-postgres into a [`Failure`].
pub fn classify(e: &tokio_postgres::Error) -> Failure {
    let msg = describe(e);
    match e.code() {
        Some(c)
            if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            Failure::Abort
        }
        Some(c)
            if c.code().starts_with("08")
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                // mmd ends a session on a node that is not (or no longer) online.
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::T_R_STATEMENT_COMPLETION_UNKNOWN =>
        {
            Failure::Lost(msg)
        }
        Some(_) => Failure::Other(msg),
        None => Failure::Lost(msg),
    }
}

/// "SQLSTATE message" for a server error, else the error and its causes.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {}", db.code().code(), db.message());
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Connects to `conninfo` (libpq key=value or URL) without TLS, giving up
/// after `timeout`; the connection task runs on the current runtime and ends
/// when the client is dropped.
pub async fn connect(conninfo: &str, timeout: Duration) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(
        timeout,
        tokio_postgres::connect(conninfo, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| anyhow::anyhow!("timed out after {timeout:?}"))
    .and_then(|r| r.map_err(|e| anyhow::anyhow!(describe(&e))))
    .with_context(|| format!("connecting to {conninfo}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A seed for client `client` of node `node` derived from the workload's seed,
/// so that every client draws its own stream and a run is repeatable.
pub(crate) fn client_seed(seed: u64, node: usize, client: usize) -> u64 {
    // splitmix64 of the three, so that nearby inputs give unrelated streams.
    let mut z = seed ^ ((node as u64) << 32) ^ (client as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Pause before reconnecting to a node that refused or dropped us.
pub(crate) const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_at_deadline_or_cancel() {
        let s = Stop::after(Duration::from_millis(50));
        assert!(!s.is_done());
        let t0 = std::time::Instant::now();
        s.sleep(Duration::from_secs(10)).await;
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(s.is_done());

        let tok = CancellationToken::new();
        let s = Stop::new(tok.clone(), Duration::from_secs(3600));
        assert!(!s.is_done());
        tok.cancel();
        assert!(s.is_done());
        s.sleep(Duration::from_secs(10)).await; // returns at once
    }

    #[test]
    fn client_seeds_differ() {
        let mut v: Vec<u64> = (0..3)
            .flat_map(|n| (0..4).map(move |c| client_seed(7, n, c)))
            .collect();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), 12);
        assert_eq!(client_seed(7, 1, 2), client_seed(7, 1, 2));
    }

    #[tokio::test]
    async fn connect_failure_is_an_error_not_a_hang() {
        // Port 1 on loopback: nothing listens there.
        let r = connect(
            "host=127.0.0.1 port=1 user=x dbname=x",
            Duration::from_secs(5),
        )
        .await;
        assert!(r.is_err());
    }
}
