//! mm-workloads: checked workloads for mm clusters (ARCHITECTURE §7).
//!
//! Why a crate of its own: the harness's `demo`, its tests and later the
//! fault-injection runs all drive the same workloads and must count their
//! outcomes the same way; the seed's pgbench scripts (`workloads/sql/`)
//! exercise throughput but cannot tell a lost write from a failed one.
//!
//! - [`bank`]: transfers between accounts in explicit transactions, with
//!   readers checking that `sum(balance)` never changes;
//! - [`ledger`]: autocommit inserts with unique ids, recording which were
//!   acknowledged, so that the checker can look for each one on every node;
//! - [`stats`]: committed / aborted / uncertain / errors and latency, the same
//!   for every workload;
//! - [`conn`]: connecting, classifying errors, stopping.
pub mod bank;
pub mod conn;
pub mod ledger;
pub mod stats;

pub use bank::{
    bank_expected_total, bank_seed_sql, run_bank, BankConfig, BankReport, ReadStats, BANK_SCHEMA,
};
pub use conn::{classify, connect, describe, Failure, Stop};
pub use ledger::{ledger_id, run_ledger, LedgerConfig, LedgerReport, LEDGER_SCHEMA};
pub use stats::{Latency, Stats};
