//! mmd's state log beside a real PostgreSQL 15 (`PgStorage::load`): a fresh
//! node starts a log and the database records where it is; a restart reads
//! it back; a missing log, or a log beside a database that never had one, is
//! refused rather than taken for a fresh node; the state an older mmd kept
//! in `mm.tx_state` is imported once.
//!
//! Skips (prints why, passes) when PostgreSQL 15 is not installed, unless
//! `MM_REQUIRE_PG` is set (CI).

use std::path::Path;
use std::sync::Arc;

use mm_core::{Ballot, DurableOp, DurableState, Gid, NodeSet, TxRecord};
use mm_harness::backend::local::{LocalCluster, LocalClusterConfig};
use mm_harness::pg_bin::pg_or_skip;
use mm_runtime::config::NodeConfig;
use mm_runtime::pg::adapter::PgStorage;
use mm_runtime::pg::hub::Hub;
use mm_runtime::pg::StateStore;
use mm_runtime::storage::{Loaded, Storage};

fn config(conninfo: &str, state_dir: &Path) -> NodeConfig {
    NodeConfig::parse(&format!(
        r#"
cluster_id = "state-log-test"
node_id = 1
secret = "s"
[listen]
mesh = "127.0.0.1:7191"
client = "127.0.0.1:6191"
[postgres]
conninfo = "{conninfo}"
[state]
dir = "{}"
[[nodes]]
id = 1
mesh = "127.0.0.1:7191"
"#,
        state_dir.display()
    ))
    .expect("valid config")
}

async fn load(cfg: &NodeConfig) -> (PgStorage, Result<Loaded, String>) {
    let mut s = PgStorage::start(cfg, Arc::new(Hub::new()))
        .await
        .expect("start storage");
    let loaded = s.load().await.map_err(|e| e.to_string());
    (s, loaded)
}

fn state_with_tx() -> (Vec<DurableOp>, DurableState) {
    let mut d = DurableState::bootstrap(NodeSet::first_n(1));
    let gid = Gid {
        origin: 1,
        boot: 0,
        seq: 7,
        gen: 1,
    };
    let rec = TxRecord {
        promised: Some(Ballot::COORDINATOR),
        accepted: Some((Ballot::COORDINATOR, true)),
        decided: Some(true),
    };
    let ops = vec![
        DurableOp::Boot(d.boot),
        DurableOp::AdoptGen(d.gen),
        DurableOp::PromiseGen(d.promised_gen),
        DurableOp::LastOnline(d.last_online_gen),
        DurableOp::Tx(gid, rec),
    ];
    d.txs.insert(gid, rec);
    (ops, d)
}

fn durable(l: Loaded) -> DurableState {
    match l {
        Loaded::Existing { durable, .. } => durable,
        Loaded::Fresh => panic!("expected an existing state"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_belongs_with_its_database() {
    if pg_or_skip("state_log").is_none() {
        return;
    }
    let cluster = LocalCluster::start(LocalClusterConfig::for_tests("state-log", 1))
        .await
        .expect("start PostgreSQL");
    let conninfo = cluster.conninfo(0);
    StateStore::connect(&conninfo)
        .await
        .unwrap()
        .init_schema()
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let cfg = config(&conninfo, &dir);
    let (ops, expected) = state_with_tx();

    // A fresh node: a new log, persisted to and read back after a restart.
    let (mut s, loaded) = load(&cfg).await;
    assert!(matches!(loaded, Ok(Loaded::Fresh)), "{loaded:?}");
    s.persist_batch(&ops).await.unwrap();
    drop(s);
    let (_, loaded) = load(&cfg).await;
    assert_eq!(durable(loaded.unwrap()), expected);

    // The log lost: refused, naming the directory.
    std::fs::rename(&dir, tmp.path().join("moved")).unwrap();
    let (_, loaded) = load(&cfg).await;
    let err = loaded.expect_err("a missing log is refused");
    assert!(err.contains("restore that directory"), "{err}");

    // A log beside a database that never had one (its marker gone): refused.
    std::fs::rename(tmp.path().join("moved"), &dir).unwrap();
    let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute("DELETE FROM mm.state_log").await.unwrap();
    let (_, loaded) = load(&cfg).await;
    let err = loaded.expect_err("a foreign log is refused");
    assert!(err.contains("belongs to another database"), "{err}");

    // An older mmd's state in mm.tx_state, no log yet: imported once.
    std::fs::remove_dir_all(&dir).unwrap();
    let mut legacy = StateStore::connect(&conninfo).await.unwrap();
    legacy.persist_batch(&ops).await.unwrap();
    let (_, loaded) = load(&cfg).await;
    assert_eq!(durable(loaded.unwrap()), expected);
    let rows: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM mm.tx_state) + (SELECT count(*) FROM mm.node_state)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the imported tables are emptied");
    let (_, loaded) = load(&cfg).await;
    assert_eq!(durable(loaded.unwrap()), expected, "read from the log now");
}
