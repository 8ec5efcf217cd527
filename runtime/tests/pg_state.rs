//! `mm_runtime::pg::StateStore` against a real PostgreSQL 15 (one local node
//! started by mm-harness): fresh start, round trips of durable ops, prepared
//! gids, undecodable rows, and a lost connection.
//!
//! Skips (prints why, passes) when PostgreSQL 15 is not installed, unless
//! `MM_REQUIRE_PG` is set (CI): then a missing PostgreSQL fails the test.

use std::time::Instant;

use mm_core::{Ballot, DurableOp, DurableState, Generation, Gid, NodeSet, TxRecord};
use mm_harness::backend::local::{LocalCluster, LocalClusterConfig};
use mm_harness::pg_bin::pg_or_skip;
use mm_runtime::pg::StateStore;
use mm_runtime::storage::{Loaded, StorageError};

async fn one_node(name: &str) -> LocalCluster {
    let t0 = Instant::now();
    let c = LocalCluster::start(LocalClusterConfig::for_tests(name, 1))
        .await
        .expect("start 1-node cluster");
    eprintln!("{name}: PostgreSQL up in {:?}", t0.elapsed());
    c
}

async fn store(cluster: &LocalCluster) -> StateStore {
    let mut s = StateStore::connect(&cluster.conninfo(0))
        .await
        .expect("connect");
    s.init_schema().await.expect("init_schema");
    s
}

fn gid(origin: u8, boot: u32, seq: u32, gen: u64) -> Gid {
    Gid {
        origin,
        boot,
        seq,
        gen,
    }
}

/// What the driver persists for a fresh node.
fn bootstrap_ops(d: &DurableState) -> Vec<DurableOp> {
    vec![
        DurableOp::Boot(d.boot),
        DurableOp::AdoptGen(d.gen),
        DurableOp::PromiseGen(d.promised_gen),
        DurableOp::LastOnline(d.last_online_gen),
    ]
}

/// Every combination of a TxRecord's options (2 × 3 × 3 = 18).
fn every_tx_record() -> Vec<TxRecord> {
    let mut out = Vec::new();
    for promised in [None, Some(Ballot { round: 7, node: 2 })] {
        for accepted in [
            None,
            Some((Ballot::COORDINATOR, true)),
            Some((Ballot { round: 3, node: 16 }, false)),
        ] {
            for decided in [None, Some(true), Some(false)] {
                out.push(TxRecord {
                    promised,
                    accepted,
                    decided,
                });
            }
        }
    }
    out
}

/// Hand-written op sequences, each applied after the bootstrap ops.
fn sequences() -> Vec<(&'static str, Vec<DurableOp>)> {
    let g3 = Generation {
        num: 3,
        members: NodeSet::first_n(3).minus(NodeSet::single(2)),
        donors: NodeSet::single(1),
    };
    let every: Vec<DurableOp> = every_tx_record()
        .into_iter()
        .enumerate()
        .map(|(i, r)| DurableOp::Tx(gid(1 + (i % 3) as u8, 1, i as u32, 2), r))
        .collect();
    let g = gid(2, 0, 5, 3);
    vec![
        ("nothing more", vec![]),
        (
            "node fields, maxima kept",
            vec![
                DurableOp::Boot(1),
                DurableOp::PromiseGen(5),
                DurableOp::PromiseGen(4), // lower: ignored
                DurableOp::AdoptGen(g3),  // older than the promise: promise stays 5
                DurableOp::LastOnline(3),
                DurableOp::LastOnline(2), // lower: ignored
                DurableOp::Boot(2),
            ],
        ),
        ("every tx record option combination", every),
        (
            "one tx through its life, overwritten back to nothing",
            vec![
                DurableOp::Tx(g, TxRecord::default()),
                DurableOp::Tx(
                    g,
                    TxRecord {
                        promised: Some(Ballot { round: 1, node: 3 }),
                        ..TxRecord::default()
                    },
                ),
                DurableOp::Tx(
                    g,
                    TxRecord {
                        promised: Some(Ballot { round: 2, node: 1 }),
                        accepted: Some((Ballot { round: 2, node: 1 }, true)),
                        decided: None,
                    },
                ),
                DurableOp::Tx(
                    g,
                    TxRecord {
                        promised: Some(Ballot { round: 2, node: 1 }),
                        accepted: Some((Ballot { round: 2, node: 1 }, true)),
                        decided: Some(true),
                    },
                ),
                DurableOp::Tx(gid(3, 0, 1, 3), TxRecord::default()),
                DurableOp::Tx(g, TxRecord::default()),
            ],
        ),
        (
            "extremes",
            vec![
                DurableOp::Boot(u32::MAX),
                DurableOp::AdoptGen(Generation {
                    num: i64::MAX as u64,
                    members: NodeSet(u32::MAX),
                    donors: NodeSet::EMPTY,
                }),
                DurableOp::LastOnline(i64::MAX as u64),
                DurableOp::Tx(
                    gid(u8::MAX, u32::MAX, u32::MAX, i64::MAX as u64),
                    TxRecord {
                        promised: Some(Ballot {
                            round: u32::MAX,
                            node: u8::MAX,
                        }),
                        accepted: Some((
                            Ballot {
                                round: u32::MAX,
                                node: 0,
                            },
                            false,
                        )),
                        decided: Some(false),
                    },
                ),
            ],
        ),
    ]
}

fn existing(l: Loaded) -> (DurableState, Vec<Gid>) {
    match l {
        Loaded::Existing { durable, prepared } => (durable, prepared),
        Loaded::Fresh => panic!("expected an existing state, got Fresh"),
    }
}

fn db_msg(r: Result<impl std::fmt::Debug, StorageError>) -> String {
    match r {
        Ok(v) => panic!("expected a StorageError, got Ok({v:?})"),
        Err(StorageError::Db(m)) => m,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_then_op_sequences_round_trip() {
    let Some(_) = pg_or_skip("fresh_then_op_sequences_round_trip") else {
        return;
    };
    let t0 = Instant::now();
    let cluster = one_node("pg_state_round_trip").await;
    let admin = cluster.connect(0).await.unwrap();

    let mut s = StateStore::connect(&cluster.conninfo(0)).await.unwrap();
    let msg = db_msg(s.load().await);
    assert!(msg.contains("mm.node_state"), "{msg}");
    s.init_schema().await.unwrap();
    s.init_schema().await.unwrap(); // idempotent
    assert!(matches!(s.load().await.unwrap(), Loaded::Fresh));

    // A bootstrap that crashed half way is still Fresh.
    s.persist(&DurableOp::Boot(0)).await.unwrap();
    s.persist(&DurableOp::AdoptGen(
        DurableState::bootstrap(mm_core::NodeSet::first_n(3)).gen,
    ))
    .await
    .unwrap();
    assert!(matches!(s.load().await.unwrap(), Loaded::Fresh));

    for (name, ops) in sequences() {
        admin
            .batch_execute("TRUNCATE mm.node_state, mm.tx_state")
            .await
            .unwrap();
        let mut mem = DurableState::bootstrap(mm_core::NodeSet::first_n(3));
        for op in bootstrap_ops(&mem).iter().chain(&ops) {
            s.persist(op)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            mem.apply(op);
        }
        let (same_conn, prepared) = existing(s.load().await.unwrap());
        assert_eq!(same_conn, mem, "{name}: same connection");
        assert!(prepared.is_empty());
        let mut fresh = StateStore::connect(&cluster.conninfo(0)).await.unwrap();
        let (reloaded, _) = existing(fresh.load().await.unwrap());
        assert_eq!(reloaded, mem, "{name}: new connection");
        eprintln!("{name}: {} ops + bootstrap round trip", ops.len());
    }

    // A generation beyond bigint is refused, not wrapped; nothing changes.
    let before = existing(s.load().await.unwrap()).0;
    let msg = db_msg(s.persist(&DurableOp::PromiseGen(u64::MAX)).await);
    assert!(msg.contains("bigint"), "{msg}");
    assert_eq!(existing(s.load().await.unwrap()).0, before);

    // Undecodable rows: an error naming the gid, no panic.
    admin
        .batch_execute("INSERT INTO mm.tx_state (gid) VALUES ('garbage-gid')")
        .await
        .unwrap();
    let msg = db_msg(s.load().await);
    assert!(msg.contains("garbage-gid"), "{msg}");
    admin
        .batch_execute(
            "DELETE FROM mm.tx_state WHERE gid = 'garbage-gid'; \
             INSERT INTO mm.tx_state (gid, promised_round, promised_node) \
             VALUES ('mm-1-0.9-1', 1, 999)",
        )
        .await
        .unwrap();
    let msg = db_msg(s.load().await);
    assert!(
        msg.contains("mm-1-0.9-1") && msg.contains("promised_node"),
        "{msg}"
    );
    admin
        .batch_execute(
            "UPDATE mm.tx_state SET promised_node = 1, promised_round = -1 \
             WHERE gid = 'mm-1-0.9-1'",
        )
        .await
        .unwrap();
    let msg = db_msg(s.load().await);
    assert!(msg.contains("promised_round"), "{msg}");
    admin
        .batch_execute("UPDATE mm.node_state SET boot = -1")
        .await
        .unwrap();
    let msg = db_msg(s.load().await);
    assert!(msg.contains("boot"), "{msg}");
    eprintln!("round trip test done in {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_lists_only_mm_gids_of_this_database() {
    let Some(_) = pg_or_skip("load_lists_only_mm_gids_of_this_database") else {
        return;
    };
    let t0 = Instant::now();
    let cluster = one_node("pg_state_prepared").await;
    let mut s = store(&cluster).await;
    for op in bootstrap_ops(&DurableState::bootstrap(mm_core::NodeSet::first_n(3))) {
        s.persist(&op).await.unwrap();
    }
    let admin = cluster.connect(0).await.unwrap();
    admin
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    admin.batch_execute("CREATE DATABASE other").await.unwrap();
    for gid in ["mm-2-0.5-3", "other-tool-1", "mm-not-ours"] {
        admin
            .batch_execute(&format!(
                "BEGIN; INSERT INTO t VALUES (1); PREPARE TRANSACTION '{gid}'"
            ))
            .await
            .unwrap();
    }
    // An mm gid prepared in another database of the same server is not ours.
    let mut other = cluster.node(0).clone();
    other.dbname = "other".into();
    let oc = other.connect().await.unwrap();
    oc.batch_execute(
        "CREATE TABLE u (id int); BEGIN; INSERT INTO u VALUES (1); \
         PREPARE TRANSACTION 'mm-1-0.1-1'",
    )
    .await
    .unwrap();

    let (durable, prepared) = existing(s.load().await.unwrap());
    assert_eq!(
        durable,
        DurableState::bootstrap(mm_core::NodeSet::first_n(3))
    );
    assert_eq!(prepared, vec![gid(2, 0, 5, 3)]);
    assert_eq!(s.prepared_gids().await.unwrap(), vec![gid(2, 0, 5, 3)]);

    for g in ["mm-2-0.5-3", "other-tool-1", "mm-not-ours"] {
        admin
            .batch_execute(&format!("ROLLBACK PREPARED '{g}'"))
            .await
            .unwrap();
    }
    oc.batch_execute("ROLLBACK PREPARED 'mm-1-0.1-1'")
        .await
        .unwrap();
    let (_, prepared) = existing(s.load().await.unwrap());
    assert!(prepared.is_empty(), "{prepared:?}");
    eprintln!("prepared gids test done in {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_is_a_clean_error() {
    let Some(_) = pg_or_skip("lost_connection_is_a_clean_error") else {
        return;
    };
    let t0 = Instant::now();
    let mut cluster = one_node("pg_state_restart").await;
    let mut s = store(&cluster).await;
    let mut mem = DurableState::bootstrap(mm_core::NodeSet::first_n(3));
    for op in bootstrap_ops(&mem) {
        s.persist(&op).await.unwrap();
    }
    let op = DurableOp::Tx(
        gid(1, 0, 1, 1),
        TxRecord {
            decided: Some(true),
            ..TxRecord::default()
        },
    );
    s.persist(&op).await.unwrap();
    mem.apply(&op);

    let t1 = Instant::now();
    cluster.restart(0).await.unwrap();
    eprintln!("restart in {:?}", t1.elapsed());
    let msg = db_msg(s.persist(&DurableOp::Boot(1)).await);
    eprintln!("persist after restart: {msg}");
    assert!(msg.contains("Boot(1)"), "{msg}");
    let msg = db_msg(s.load().await);
    eprintln!("load after restart: {msg}");

    // A new connection sees everything persisted before the restart.
    let mut s2 = StateStore::connect(&cluster.conninfo(0)).await.unwrap();
    let (durable, _) = existing(s2.load().await.unwrap());
    assert_eq!(durable, mem);

    // Connecting to a stopped server fails cleanly too.
    cluster.stop_node(0).unwrap();
    let msg = db_msg(StateStore::connect(&cluster.conninfo(0)).await.map(|_| ()));
    eprintln!("connect to a stopped server: {msg}");
    assert!(msg.contains("connecting"), "{msg}");
    let msg = db_msg(s2.persist(&DurableOp::Boot(1)).await);
    eprintln!("persist to a stopped server: {msg}");
    eprintln!("lost connection test done in {:?}", t0.elapsed());
}
