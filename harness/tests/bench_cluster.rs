//! Phases (b) and (d) of `mm-harness bench`, short: the seed workload on an
//! mm cluster (3 PostgreSQL 15 + 3 mmd) through each node's mmd, after which
//! the nodes must agree; and `pgbench -S` on node 1 directly and through its
//! mmd. The read phase makes pgbench's tables with `pgbench -i` through node
//! 1's mmd and has no fallback: the cluster aborts its one 100,000-row COPY
//! transaction today (VoteTimeout), and then the phase must say so (its
//! error, no figures) rather than report figures of another load.
//!
//! Skips (prints why, passes) when PostgreSQL 15 is not installed, unless
//! `MM_REQUIRE_PG` is set. Needs the `mmd` binary of the same profile
//! (`cargo build --workspace --bins`; `cargo test --workspace` builds it) or
//! `MM_MMD_BIN`.

use std::time::Instant;

use mm_harness::bench::BenchOptions;
use mm_harness::bench::{cluster, read};
use mm_harness::mm_cluster::find_mmd;
use mm_harness::pg_bin::pg_or_skip;

const SECONDS: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_and_read_phases() {
    let Some(bin) = pg_or_skip("cluster_and_read_phases") else {
        return;
    };
    if let Err(e) = find_mmd() {
        panic!(
            "this test runs mmd and could not find it: {e:#}\n\
             run `cargo build --workspace --bins` first (or set MM_MMD_BIN)"
        );
    }
    let mut opts = BenchOptions::new(
        SECONDS,
        mm_harness::backend::local::default_work_root().join("bench_cluster_test"),
    );
    // Behaviour, not speed.
    opts.fsync = false;

    // One cluster for both phases (`mm-harness bench` gives each its own):
    // it saves a start.
    let t0 = Instant::now();
    let mut cluster = cluster::start_cluster(&opts, "bench-cluster-and-read")
        .await
        .expect("starting 3 PostgreSQL + 3 mmd");
    eprintln!("cluster started in {:?}", t0.elapsed());

    let t0 = Instant::now();
    let mm = cluster::cluster_phase(&bin, &cluster, &opts)
        .await
        .expect("cluster phase");
    eprintln!("cluster phase ({:?}): {mm:#?}", t0.elapsed());
    let f = &mm.figures;
    assert!(f.tps > 0.0, "{f:?}");
    assert!(f.transactions > 0, "{f:?}");
    assert!(f.p50_ms > 0.0 && f.p50_ms <= f.p99_ms, "{f:?}");
    assert!(
        mm.agreed,
        "the cluster's nodes disagree after the load: {:?}",
        mm.problems
    );
    assert_eq!(mm.prepared_left, 0, "{mm:?}");
    assert!(
        mm.rows.iter().all(|r| *r == mm.rows[0] && r.is_some()),
        "{mm:?}"
    );

    let t0 = Instant::now();
    let read = read::read_phase(&bin, &mut cluster, &opts).await;
    eprintln!("read phase ({:?}): {read:#?}", t0.elapsed());
    match &read.error {
        // The figure of today's mm: the init's error, and no read figures.
        Some(e) => {
            assert!(!e.is_empty());
            assert!(read.proxy_read_ratio.is_none(), "{read:?}");
            assert!(read.proxy_read_ratio_simple.is_none(), "{read:?}");
        }
        None => {
            let (direct, proxy) = (read.direct.as_ref().unwrap(), read.proxy.as_ref().unwrap());
            assert!(direct.tps > 0.0 && proxy.tps > 0.0, "{read:?}");
            assert!(read.proxy_read_ratio.is_some_and(|r| r > 0.0), "{read:?}");
            assert!(
                read.proxy_read_ratio_simple.is_some_and(|r| r > 0.0),
                "{read:?}"
            );
            assert_eq!(direct.failures + proxy.failures, 0, "{read:?}");
        }
    }
}
