//! mm-harness: starts real PostgreSQL 15 clusters, runs workloads against them
//! and injects faults (ARCHITECTURE §7).
//!
//! - [`pg_bin`]: finding PostgreSQL 15 and the OS user that runs it;
//! - [`pg_conf`]: the settings mm needs, written per node and checked by `pg-check`;
//! - [`backend::local`]: N local servers on loopback (start, kill -9, restart, stop on Drop);
//! - [`backend::docker`]: an mm cluster with one container per node (image
//!   `mm-node:dev`) on a private network: kill, stop/start, pause, disconnect, cut links;
//! - [`pgbench`]: running the seed's pgbench scripts;
//! - [`bench`]: the baselines mm is measured against (one plain PostgreSQL, an
//!   asynchronous logical-replication mesh);
//! - [`checks`]: reading every node directly after a run: hash sums, bank
//!   totals, acknowledged writes, leftover prepared transactions;
//! - [`mm_cluster`]: an mm cluster on the local backend (PostgreSQL + one mmd each);
//! - [`chaos`]: workloads under a seeded schedule of faults, then the checks;
//! - [`signals`], [`procs`]: stopping nodes on Ctrl-C, process groups.
pub mod backend;
pub mod bench;
pub mod chaos;
pub mod checks;
pub mod demo;
pub mod mm_cluster;
pub mod pg_bin;
pub mod pg_conf;
pub mod pgbench;
pub mod procs;
pub mod signals;
