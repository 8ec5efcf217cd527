//! Where a cluster's PostgreSQL servers run. `local`: processes on this machine.
pub mod local;
