//! mm-runtime: the production driver of the protocol core.
//!
//! - `config`: one TOML file per node, validated with clear errors.
//! - `mesh`: the control-plane TCP mesh (versioned frames, authenticated
//!   handshake, reconnect with backoff).
//! - `driver`: runs `mm_core::Node` on tokio: timers, inputs, outputs in
//!   order, persistence before release.
//! - `storage`: the trait the driver persists through and sends database
//!   commands to; PostgreSQL implements it in production, a model in tests.
//! - `pg`: PostgreSQL as that storage: durable state, data plane, replays.
//! - `proxy`: the client-facing PostgreSQL protocol proxy.
//! - `status`: `mtm.status()`'s source; `watchdog`: fail-stop when the
//!   local PostgreSQL is gone.

pub mod config;
pub mod driver;
pub mod mesh;
pub mod pg;
pub mod proxy;
pub mod state_log;
pub mod status;
pub mod storage;
pub mod watchdog;
