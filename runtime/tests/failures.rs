//! mmd under failures on three local PostgreSQL 15 servers.

use mm_harness::backend::local::LocalClusterConfig;
use mm_harness::mm_cluster::{MmCluster, MmOptions};
use mm_harness::pg_bin::pg_or_skip;
use std::time::{Duration, Instant};

async fn cluster(name: &str) -> Option<MmCluster> {
    pg_or_skip(name)?;
    std::env::set_var("MM_MMD_BIN", env!("CARGO_BIN_EXE_mmd"));
    let mut cfg = LocalClusterConfig::for_tests(name, 3);
    cfg.stop_on_signal = false;
    let opts = MmOptions {
        extra_config: "[timeouts]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 1000\n"
            .into(),
        log: std::env::var("MM_LOG").unwrap_or("info,mm_runtime=debug".into()),
    };
    Some(MmCluster::start(cfg, opts).await.expect("cluster starts"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_one_write_restart_rows_arrive() {
    let Some(mut c) = cluster("fail-stop-one").await else {
        return;
    };
    let n1 = c.connect_proxy(0).await.unwrap();
    n1.batch_execute("create table kv(k int primary key, v text)")
        .await
        .unwrap();
    n1.execute("insert into kv values (0, 'before')", &[])
        .await
        .unwrap();
    c.kill_mmd(2);
    let t0 = Instant::now();
    let mut k = 1;
    let mut first_ok = None;
    while t0.elapsed() < Duration::from_secs(20) {
        match n1
            .execute("insert into kv values ($1, 'during')", &[&k])
            .await
        {
            Ok(_) => {
                if first_ok.is_none() {
                    first_ok = Some(t0.elapsed());
                }
                k += 1;
                if k > 50 {
                    break;
                }
            }
            Err(e) => {
                eprintln!("{:?} {e:?}", t0.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    eprintln!("first commit after kill at {first_ok:?}, {k} rows");
    for i in 0..3 {
        eprintln!("node {} status {:?}", i + 1, c.status(i).await);
    }
    c.start_mmd(2, "info,mm_runtime=debug").unwrap();
    c.wait_online(Duration::from_secs(30))
        .await
        .expect("back online");
    let db = c.pg.connect(2).await.unwrap();
    let t1 = Instant::now();
    loop {
        let n: i64 = db
            .query_one("select count(*) from kv", &[])
            .await
            .unwrap()
            .get(0);
        if n == k as i64 {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "node 3 has {n} of {k} rows"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
