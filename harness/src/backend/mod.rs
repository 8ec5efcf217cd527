//! Where a cluster's nodes run. `local`: PostgreSQL processes on this machine;
//! `docker`: one container per node (PostgreSQL 15 + mmd) on a private network.
pub mod docker;
pub mod linkcut;
pub mod local;
