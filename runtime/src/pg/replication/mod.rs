//! The data plane's receiving end (ARCHITECTURE §1): a logical replication
//! client that pulls a peer's transactions from the peer's PostgreSQL 15
//! through a slot reserved for us (pgoutput, protocol 3, `two_phase` and
//! `messages` on).
//!
//! - [`conn`]: our own replication-mode connection on `postgres-protocol`
//!   ([`ReplicationClient`] for the replication commands, then
//!   [`ReplicationStream`] in CopyBoth mode, with explicit flush
//!   confirmation). Why our own: see the module's documentation.
//! - [`pgoutput`]: the pgoutput protocol 3 decoder ([`PgOutputMessage`]).
//!
//! ```ignore
//! let mut c = ReplicationClient::connect("host=10.0.0.2 user=mm dbname=app").await?;
//! c.create_slot("mm_node_1", true).await?;
//! let mut s = c.start("mm_node_1", "mm_pub", Lsn::ZERO).await?;
//! while let Some((lsn, msg)) = s.next().await? {
//!     // apply ...; once the transaction ending at `end_lsn` is durable here:
//!     // s.confirm(end_lsn).await?;
//! }
//! ```

pub mod conn;
pub mod pgoutput;

use std::fmt;
use std::str::FromStr;

pub use conn::{ReplicationClient, ReplicationStream, SlotInfo, SystemInfo};
pub use pgoutput::{DecodeError, PgOutputMessage};

/// A WAL position (`pg_lsn`), shown the way PostgreSQL shows it: `16/B374D848`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`, InvalidXLogRecPtr; as a START_REPLICATION position it means
    /// "from the slot's confirmed_flush_lsn".
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A string that is not `X/Y` with X and Y hexadecimal 32-bit halves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?} (expected X/Y, hexadecimal)")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Lsn, ParseLsnError> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |h: &str| {
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(h, 16).map_err(|_| err())
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }
}

/// What can go wrong on a replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    /// An unusable conninfo or argument (bad slot name, TLS demanded, ...).
    #[error("replication config: {0}")]
    Config(String),
    #[error("replication connection I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection.
    #[error("replication connection closed by the server")]
    Closed,
    #[error("replication authentication: {0}")]
    Auth(String),
    /// An ErrorResponse from the server.
    #[error("{severity} ({code}): {message}{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
    },
    /// The server said something the protocol does not allow here.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// An XLogData payload that is not valid pgoutput protocol 3.
    #[error("pgoutput message at {lsn}: {err}")]
    Decode { lsn: Lsn, err: DecodeError },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_display_and_parse() {
        let l = Lsn(0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), l);
        assert_eq!("16/b374d848".parse::<Lsn>().unwrap(), l);
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::ZERO);
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "1/2/3",
            "x/1",
            "123456789/0",
            "+1/0",
            "1 /0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
        assert!(Lsn(1) < Lsn(0x1_0000_0000));
    }
}
