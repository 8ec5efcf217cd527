//! The baselines of `mm-harness bench` that need no mm: short runs of one
//! plain PostgreSQL and of the asynchronous logical-replication mesh, and
//! why the mesh needs its tombstones.
//!
//! Skips (prints why, passes) when PostgreSQL 15 is not installed, unless
//! `MM_REQUIRE_PG` is set. The tests take turns (a lock): the machine may
//! have two cores, and each starts its own servers.

use std::time::{Duration, Instant};

use mm_harness::backend::local::{LocalCluster, LocalClusterConfig, LocalNode};
use mm_harness::bench::async_mesh::{self, setup_mesh, MeshOptions};
use mm_harness::bench::{self, BenchOptions};
use mm_harness::pg_bin::pg_or_skip;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn options(seconds: u32) -> BenchOptions {
    let mut o = BenchOptions::new(
        seconds,
        mm_harness::backend::local::default_work_root().join("bench_baselines_test"),
    );
    // These runs check behaviour, not speed.
    o.fsync = false;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_runs_of_both_baselines() {
    let Some(bin) = pg_or_skip("short_runs_of_both_baselines") else {
        return;
    };
    let _turn = SERIAL.lock().await;
    let t0 = Instant::now();
    let single = bench::run_single_with(&bin, &options(5))
        .await
        .expect("single baseline");
    eprintln!("single ({:?}): {single:?}", t0.elapsed());
    let f = &single.figures;
    assert!(f.tps > 0.0, "{f:?}");
    assert!(f.transactions > 0, "{f:?}");
    assert!(f.p50_ms > 0.0 && f.p50_ms <= f.p99_ms, "{f:?}");
    assert_eq!(f.failures, 0, "{single:?}");
    assert!(single.rows > 0);

    let t0 = Instant::now();
    let mesh = bench::run_async_mesh_with(&bin, &options(5), &MeshOptions::default())
        .await
        .expect("async mesh baseline");
    eprintln!("async mesh ({:?}): {mesh:?}", t0.elapsed());
    let f = &mesh.figures;
    assert!(f.tps > 0.0, "{f:?}");
    assert!(f.p50_ms > 0.0 && f.p50_ms <= f.p99_ms, "{f:?}");
    assert!(mesh.tombstones);
    assert!(
        mesh.converged,
        "the mesh with tombstones did not converge: {mesh:?}"
    );
    assert!(mesh.convergence_s.is_some());
    assert!(mesh.rows[0] > 0, "{mesh:?}");
    assert_eq!(
        mesh.apply_errors, 0,
        "an apply worker stopped on an error: {mesh:?}"
    );
}

/// What became of one row inserted and at once deleted on node 1.
#[derive(Debug)]
struct Observed {
    /// A node showed the row again after it had lost it (node 1: after its
    /// own delete; the others: after the delete reached them).
    reappeared: Option<(String, Duration)>,
    /// Rows with that id per node at the last poll.
    last: Vec<i64>,
}

/// Insert id 1 on node 1, delete it there right away, then watch all nodes
/// every 10 ms for `window` (stopping early once the row re-appears).
async fn insert_then_delete_on_node1(nodes: &[LocalNode], window: Duration) -> Observed {
    let mut clients = Vec::new();
    for n in nodes {
        clients.push(n.connect().await.unwrap());
    }
    clients[0]
        .batch_execute("insert into public.mm values (1, 'doomed', clock_timestamp())")
        .await
        .unwrap();
    clients[0]
        .batch_execute("delete from public.mm where id = 1")
        .await
        .unwrap();
    let deleted = Instant::now();
    // Per node: seen with the row, then seen without it.
    let mut had: Vec<bool> = (0..nodes.len()).map(|i| i == 0).collect();
    let mut lost: Vec<bool> = (0..nodes.len()).map(|i| i == 0).collect();
    let mut last = vec![0; nodes.len()];
    while deleted.elapsed() < window {
        for (i, c) in clients.iter().enumerate() {
            let n: i64 = c
                .query_one("select count(*) from public.mm where id = 1", &[])
                .await
                .unwrap()
                .get(0);
            last[i] = n;
            if n > 0 && lost[i] {
                return Observed {
                    reappeared: Some((nodes[i].name(), deleted.elapsed())),
                    last,
                };
            }
            had[i] |= n > 0;
            lost[i] |= had[i] && n == 0;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Observed {
        reappeared: None,
        last,
    }
}

/// The same tiny case on two meshes of the same three servers, in two
/// databases: with tombstones the deleted row stays deleted everywhere;
/// without them the insert's echoes re-create it, and (insert, delete)
/// pairs keep circling the mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_matter() {
    let Some(_) = pg_or_skip("tombstones_matter") else {
        return;
    };
    let _turn = SERIAL.lock().await;
    let mut cfg = LocalClusterConfig::for_tests("bench_tombstones_matter", 3);
    cfg.extra_settings = async_mesh::mesh_settings();
    let cluster = LocalCluster::start(cfg).await.expect("start 3 nodes");
    let in_db = |db: &str| -> Vec<LocalNode> {
        cluster
            .nodes()
            .iter()
            .map(|n| {
                let mut n = n.clone();
                n.dbname = db.to_string();
                n
            })
            .collect()
    };
    for i in 0..3 {
        let c = cluster.connect(i).await.unwrap();
        for db in ["with_tombs", "without_tombs"] {
            c.batch_execute(&format!("create database {db}"))
                .await
                .unwrap();
        }
    }
    let with = MeshOptions {
        name: "with_tombs".into(),
        tombstones: true,
        ..MeshOptions::default()
    };
    let without = MeshOptions {
        name: "without_tombs".into(),
        tombstones: false,
        ..MeshOptions::default()
    };
    let (with_nodes, without_nodes) = (in_db("with_tombs"), in_db("without_tombs"));
    setup_mesh(&with_nodes, &with)
        .await
        .expect("mesh with tombstones");
    setup_mesh(&without_nodes, &without)
        .await
        .expect("mesh without tombstones");

    let seen = insert_then_delete_on_node1(&with_nodes, Duration::from_secs(3)).await;
    eprintln!("with tombstones: {seen:?}");
    assert!(
        seen.reappeared.is_none(),
        "with tombstones the row came back: {seen:?}"
    );
    assert_eq!(seen.last, vec![0, 0, 0], "{seen:?}");
    let conv = async_mesh::wait_converged(
        &with_nodes,
        Instant::now(),
        Duration::from_secs(10),
        Duration::from_millis(200),
    )
    .await
    .unwrap();
    assert!(conv.converged && conv.rows == vec![0, 0, 0], "{conv:?}");
    let tombs: i64 = with_nodes[2]
        .connect()
        .await
        .unwrap()
        .query_one("select count(*) from public.mm_tomb where id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tombs, 1, "node3 should hold node1's one tombstone");

    let seen = insert_then_delete_on_node1(&without_nodes, Duration::from_secs(10)).await;
    eprintln!("without tombstones: {seen:?}");
    // Stop the storm before the servers stop.
    for (i, n) in without_nodes.iter().enumerate() {
        let c = n.connect().await.unwrap();
        for j in 0..3 {
            if i != j {
                let _ = c
                    .batch_execute(&format!(
                        "alter subscription without_tombs_sub_{}_{} disable",
                        i + 1,
                        j + 1
                    ))
                    .await;
            }
        }
    }
    assert!(
        seen.reappeared.is_some(),
        "without tombstones the deleted row was expected to come back: {seen:?}"
    );
}
