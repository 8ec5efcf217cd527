//! A short `mm-harness chaos` run on the local backend: seeded single-node
//! faults under the seed scripts, bank and ledger; afterwards every node
//! agrees, no acknowledged write is missing and nothing is left prepared.
//!
//! Skips (prints why, passes) when PostgreSQL 15 is not installed, unless
//! `MM_REQUIRE_PG` is set. Needs the `mmd` binary of the same profile
//! (`cargo test --workspace` builds it) or `MM_MMD_BIN`.

use mm_harness::chaos::{run_chaos, Backend, ChaosOptions};
use mm_harness::mm_cluster::find_mmd;
use mm_harness::pg_bin::pg_or_skip;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_chaos_run_ends_consistent() {
    if pg_or_skip("short_chaos_run_ends_consistent").is_none() {
        return;
    }
    find_mmd().expect("this test runs mmd: `cargo build --workspace --bins` first");
    let seed = std::env::var("MM_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let opts = ChaosOptions {
        nodes: 3,
        duration: Duration::from_secs(40),
        seed,
        clients: 2,
        backend: Backend::Local,
        // Link cuts need root (cgroups, iptables); CI runs as root.
        link_cuts: unsafe { libc::geteuid() } == 0,
        work_dir: Some(mm_harness::backend::local::default_work_root().join("chaos_test")),
    };
    let r = run_chaos(&opts, &|s| eprintln!("chaos: {s}"))
        .await
        .expect("chaos run");
    eprintln!("{}", r.render());
    assert!(
        r.consistent,
        "inconsistent: {:?}\nrepro: {}",
        r.problems, r.repro
    );
    assert_eq!(r.ledger_missing, 0);
    assert_eq!(r.prepared_left, 0);
    assert!(r.bank_ok);
    assert!(r.faults >= 3, "only {} faults ran", r.faults);
    // How fast the majority committed after each fault is printed above
    // (fault_log, timeline): timings are for the benchmark and the nightly
    // run, not for an assertion on a shared 2-core machine.
}
