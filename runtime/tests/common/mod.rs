//! What the runtime's cluster tests share: a local 3-node mm cluster with
//! fast heartbeats (100 ms, 1 s timeout), mmd logging at `LOG`.

use mm_harness::backend::local::LocalClusterConfig;
use mm_harness::mm_cluster::{MmCluster, MmOptions};
use mm_harness::pg_bin::pg_or_skip;

/// mmd's log filter unless `MM_LOG` says otherwise.
pub const LOG: &str = "info,mm_runtime=debug";

/// `None` (the test skips, saying why) when PostgreSQL 15 is missing.
#[allow(dead_code)] // each test crate compiles this module; not all use it
pub async fn cluster(name: &str) -> Option<MmCluster> {
    cluster_with(name, false).await
}

/// Like [`cluster`]; with `link_cuts`, each node runs in a cgroup of its
/// own so a link can be cut (needs root).
pub async fn cluster_with(name: &str, link_cuts: bool) -> Option<MmCluster> {
    cluster_settings(name, link_cuts, Vec::new()).await
}

/// Like [`cluster_with`], with extra postgresql.conf settings.
pub async fn cluster_settings(
    name: &str,
    link_cuts: bool,
    settings: Vec<(String, String)>,
) -> Option<MmCluster> {
    pg_or_skip(name)?;
    std::env::set_var("MM_MMD_BIN", env!("CARGO_BIN_EXE_mmd"));
    let mut cfg = LocalClusterConfig::for_tests(name, 3);
    cfg.stop_on_signal = false;
    cfg.link_cuts = link_cuts;
    cfg.extra_settings = settings;
    let opts = MmOptions {
        extra_config: "[timeouts]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 1000\n"
            .into(),
        log: std::env::var("MM_LOG").unwrap_or(LOG.into()),
    };
    Some(MmCluster::start(cfg, opts).await.expect("cluster starts"))
}
