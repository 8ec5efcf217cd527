//! PostgreSQL as the node's storage.
//!
//! - [`adapter`]: [`adapter::PgStorage`], the driver's storage on PostgreSQL;
//! - [`receiver`] → [`hub`] → [`applier`]: a peer's prepared transactions,
//!   from its WAL to a prepared transaction here; [`finisher`] commits or
//!   rolls back decided ones; [`remote_tx`] turns changes into SQL;
//!   [`replay`] applies committed transactions this node missed;
//!   [`resync`] replaces the database with a donor's snapshot when a slot
//!   this node needed was invalidated;
//! - [`init`], [`prereq`]: `mmctl init`; [`membership`]: `mmctl add-node`
//!   and `drop-node`;
//! - [`state`]: the durable protocol state (`mm_core::DurableState`) in the
//!   `mm` schema of the local database, and the prepared mm transactions
//!   PostgreSQL holds (`pg_prepared_xacts`).

pub mod adapter;
pub mod applier;
pub mod finisher;
pub mod functions;
pub mod hub;
pub mod init;
pub mod membership;
pub mod prereq;
pub mod receiver;
pub mod remote_tx;
pub mod replay;
pub mod replication;
pub mod resync;
pub mod sql;
pub mod state;

pub use state::StateStore;

use crate::storage::StorageError;

/// `conninfo` with `application_name=mmd <role>`, so `pg_stat_activity`
/// (and a profile by process) tells mmd's sessions apart: the state store,
/// appliers, finishers, receivers. An application_name already in the
/// connection string wins (it comes first for libpq and tokio-postgres
/// alike, so it is not appended twice).
pub fn named(conninfo: &str, role: &str) -> String {
    if conninfo.contains("application_name") {
        return conninfo.to_string();
    }
    if conninfo.contains("://") {
        let sep = if conninfo.contains('?') { '&' } else { '?' };
        format!(
            "{conninfo}{sep}application_name=mmd%20{}",
            role.replace(' ', "%20")
        )
    } else {
        format!("{conninfo} application_name='mmd {role}'")
    }
}

/// A tokio-postgres error as a [`StorageError`], with PostgreSQL's own
/// message (and SQLSTATE) when the server sent one.
pub(crate) fn db_error(context: &str, e: &tokio_postgres::Error) -> StorageError {
    let detail = match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => {
            // e.g. "error connecting to server: Connection refused", "connection closed"
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(cause) = src {
                let c = cause.to_string();
                if !s.contains(&c) {
                    s.push_str(": ");
                    s.push_str(&c);
                }
                src = cause.source();
            }
            s
        }
    };
    StorageError::Db(format!("{context}: {detail}"))
}
