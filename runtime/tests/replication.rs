//! `mm_runtime::pg::replication` against a real PostgreSQL 15 (one local node
//! started by mm-harness): a two_phase slot streams prepared transactions at
//! PREPARE time (pgoutput proto 3), logical messages, COMMIT/ROLLBACK
//! PREPARED, Origin tagging, and `confirm` moving `confirmed_flush_lsn` so a
//! reconnect does not replay.
//!
//! Skips (prints why, passes) when PostgreSQL 15 is not installed, unless
//! `MM_REQUIRE_PG` is set (CI): then a missing PostgreSQL fails the test.

use std::time::{Duration, Instant};

use mm_harness::backend::local::{LocalCluster, LocalClusterConfig};
use mm_harness::pg_bin::pg_or_skip;
use mm_runtime::pg::replication::conn::{EchoSkip, FILTERING_PLUGIN};
use mm_runtime::pg::replication::pgoutput::{OldTuple, PgOutputMessage as M, TupleValue};
use mm_runtime::pg::replication::{Lsn, ReplError, ReplicationClient, ReplicationStream};

const CREATE_MM: &str = "create table mm(id int primary key, info text, mod_time timestamp)";
const STEP: Duration = Duration::from_secs(20);

/// One node with table mm and publication mm_pub; a SQL session on it.
async fn setup(name: &str) -> (LocalCluster, tokio_postgres::Client) {
    let t0 = Instant::now();
    let cluster = LocalCluster::start(LocalClusterConfig::for_tests(name, 1))
        .await
        .expect("start 1-node cluster");
    eprintln!("{name}: PostgreSQL up in {:?}", t0.elapsed());
    let c = cluster.connect(0).await.unwrap();
    c.batch_execute(CREATE_MM).await.unwrap();
    c.batch_execute("create publication mm_pub for all tables")
        .await
        .unwrap();
    (cluster, c)
}

async fn client(cluster: &LocalCluster) -> ReplicationClient {
    let conninfo = format!("{} application_name=mm_test", cluster.conninfo(0));
    tokio::time::timeout(STEP, ReplicationClient::connect(&conninfo))
        .await
        .expect("connect timed out")
        .expect("connect")
}

async fn next(s: &mut ReplicationStream) -> (Lsn, M) {
    tokio::time::timeout(STEP, s.next())
        .await
        .expect("no message within 20 s")
        .expect("stream error")
        .expect("stream ended")
}

/// Messages up to and including the first one `last` accepts.
async fn until(s: &mut ReplicationStream, last: impl Fn(&M) -> bool) -> Vec<M> {
    let mut out = Vec::new();
    loop {
        let (_, m) = next(s).await;
        let stop = last(&m);
        out.push(m);
        if stop {
            return out;
        }
    }
}

fn text(v: &TupleValue) -> Option<&str> {
    match v {
        TupleValue::Null => None,
        other => Some(other.as_text().expect("a text value")),
    }
}

fn row(t: &[TupleValue]) -> Vec<Option<&str>> {
    t.iter().map(text).collect()
}

fn kinds(ms: &[M]) -> Vec<&'static str> {
    ms.iter()
        .map(|m| match m {
            M::Begin(_) => "Begin",
            M::Commit(_) => "Commit",
            M::Origin(_) => "Origin",
            M::Relation(_) => "Relation",
            M::Type(_) => "Type",
            M::Insert(_) => "Insert",
            M::Update(_) => "Update",
            M::Delete(_) => "Delete",
            M::Truncate(_) => "Truncate",
            M::Message(_) => "Message",
            M::BeginPrepare(_) => "BeginPrepare",
            M::Prepare(_) => "Prepare",
            M::CommitPrepared(_) => "CommitPrepared",
            M::RollbackPrepared(_) => "RollbackPrepared",
        })
        .collect()
}

async fn slot_row(c: &tokio_postgres::Client, slot: &str) -> (bool, bool, Lsn) {
    let r = c
        .query_one(
            "select two_phase, active, coalesce(confirmed_flush_lsn::text, '0/0') \
             from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    let lsn: String = r.get(2);
    (r.get(0), r.get(1), lsn.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_transactions_stream_at_prepare_time() {
    let Some(_) = pg_or_skip("prepared_transactions_stream_at_prepare_time") else {
        return;
    };
    let t0 = Instant::now();
    let (cluster, c) = setup("repl_prepared").await;

    let mut rc = client(&cluster).await;
    let sys = rc.identify_system().await.unwrap();
    assert_eq!(sys.dbname.as_deref(), Some(cluster.node(0).dbname.as_str()));
    assert!(sys.timeline >= 1);
    // replication=database connections also run SQL.
    let rows = rc.simple_query("select 1, null::text").await.unwrap();
    assert_eq!(rows, vec![vec![Some("1".to_string()), None]]);
    let slot = rc.create_slot("mm_slot", true).await.unwrap();
    assert_eq!(slot.slot_name, "mm_slot");
    // mm_output when installed (without options it is pgoutput).
    assert!(
        ["pgoutput", FILTERING_PLUGIN].contains(&slot.output_plugin.as_str()),
        "{slot:?}"
    );
    assert!(slot.consistent_point >= sys.xlog_pos, "{slot:?} {sys:?}");
    let (two_phase, _, _) = slot_row(&c, "mm_slot").await;
    assert!(two_phase, "slot must be two_phase");
    let mut s = rc.start("mm_slot", "mm_pub", Lsn::ZERO).await.unwrap();

    c.batch_execute(
        "BEGIN;
         INSERT INTO mm VALUES (1, 'one', '2020-01-01 00:00:00'), (2, 'two', '2020-01-02 00:00:00');
         UPDATE mm SET info = 'uno' WHERE id = 1;
         DELETE FROM mm WHERE id = 2;
         SELECT pg_logical_emit_message(true, 'mm.ddl', 'create table x()');
         PREPARE TRANSACTION 'mm-1-0.1-1'",
    )
    .await
    .unwrap();
    let t1 = Instant::now();
    let ms = until(&mut s, |m| matches!(m, M::Prepare(_))).await;
    eprintln!("prepared transaction decoded in {:?}", t1.elapsed());
    assert_eq!(
        kinds(&ms),
        [
            "BeginPrepare",
            "Relation",
            "Insert",
            "Insert",
            "Update",
            "Delete",
            "Message",
            "Prepare"
        ],
        "{ms:#?}"
    );
    let M::BeginPrepare(bp) = &ms[0] else {
        unreachable!()
    };
    assert_eq!(bp.gid, "mm-1-0.1-1");
    let M::Relation(rel) = &ms[1] else {
        unreachable!()
    };
    assert_eq!(
        (rel.namespace.as_str(), rel.name.as_str()),
        ("public", "mm")
    );
    let cols: Vec<(&str, bool, u32)> = rel
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.key, c.type_oid))
        .collect();
    assert_eq!(
        cols,
        [
            ("id", true, 23),
            ("info", false, 25),
            ("mod_time", false, 1114)
        ]
    );
    let M::Insert(i1) = &ms[2] else {
        unreachable!()
    };
    assert_eq!(i1.rel_id, rel.rel_id);
    assert_eq!(
        row(&i1.new),
        [Some("1"), Some("one"), Some("2020-01-01 00:00:00")]
    );
    let M::Insert(i2) = &ms[3] else {
        unreachable!()
    };
    assert_eq!(
        row(&i2.new),
        [Some("2"), Some("two"), Some("2020-01-02 00:00:00")]
    );
    let M::Update(u) = &ms[4] else { unreachable!() };
    assert_eq!(u.old, None, "key unchanged: no old tuple");
    assert_eq!(
        row(&u.new),
        [Some("1"), Some("uno"), Some("2020-01-01 00:00:00")]
    );
    let M::Delete(d) = &ms[5] else { unreachable!() };
    let OldTuple::Key(k) = &d.old else {
        panic!("{d:?}")
    };
    assert_eq!(row(k), [Some("2"), None, None]);
    let M::Message(msg) = &ms[6] else {
        unreachable!()
    };
    assert!(msg.transactional);
    assert_eq!(msg.prefix, "mm.ddl");
    assert_eq!(&msg.content[..], b"create table x()");
    let M::Prepare(p) = &ms[7] else {
        unreachable!()
    };
    assert_eq!(p.gid, "mm-1-0.1-1");
    assert_eq!(p.xid, bp.xid);
    assert!(p.end_lsn > p.prepare_lsn);

    c.batch_execute("COMMIT PREPARED 'mm-1-0.1-1'")
        .await
        .unwrap();
    let (_, m) = next(&mut s).await;
    let M::CommitPrepared(cp) = &m else {
        panic!("{m:?}")
    };
    assert_eq!(cp.gid, "mm-1-0.1-1");
    assert_eq!(cp.xid, bp.xid);

    // A second prepared transaction, rolled back.
    c.batch_execute(
        "BEGIN; INSERT INTO mm VALUES (3, 'three', now()); PREPARE TRANSACTION 'mm-1-0.1-2'",
    )
    .await
    .unwrap();
    let ms = until(&mut s, |m| matches!(m, M::Prepare(_))).await;
    assert_eq!(kinds(&ms), ["BeginPrepare", "Insert", "Prepare"], "{ms:#?}");
    c.batch_execute("ROLLBACK PREPARED 'mm-1-0.1-2'")
        .await
        .unwrap();
    let (_, m) = next(&mut s).await;
    let M::RollbackPrepared(rp) = &m else {
        panic!("{m:?}")
    };
    assert_eq!(rp.gid, "mm-1-0.1-2");

    // A plain transaction and a TRUNCATE.
    c.batch_execute("INSERT INTO mm VALUES (4, 'four', now())")
        .await
        .unwrap();
    let ms = until(&mut s, |m| matches!(m, M::Commit(_))).await;
    assert_eq!(kinds(&ms), ["Begin", "Insert", "Commit"], "{ms:#?}");
    c.batch_execute("TRUNCATE mm").await.unwrap();
    let ms = until(&mut s, |m| matches!(m, M::Commit(_))).await;
    // TRUNCATE invalidates the relation: pgoutput may describe it again.
    let ms: Vec<M> = ms
        .into_iter()
        .filter(|m| !matches!(m, M::Relation(_)))
        .collect();
    assert_eq!(kinds(&ms), ["Begin", "Truncate", "Commit"], "{ms:#?}");
    let M::Truncate(t) = &ms[1] else {
        unreachable!()
    };
    assert_eq!(t.rel_ids, [rel.rel_id]);

    s.close().await.unwrap();
    // Errors come back as the server's: an unknown slot.
    let rc = client(&cluster).await;
    match rc.start("no_such_slot", "mm_pub", Lsn::ZERO).await {
        Err(ReplError::Server { code, .. }) => assert_eq!(code, "42704"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("START_REPLICATION of a missing slot succeeded"),
    }
    // Over the Unix socket too.
    let node = cluster.node(0);
    let unix = cluster.conninfo(0).replace(
        "host=127.0.0.1",
        &format!("host={}", node.socket_dir.display()),
    );
    let mut rc = tokio::time::timeout(STEP, ReplicationClient::connect(&unix))
        .await
        .expect("unix connect timed out")
        .expect("unix connect");
    assert!(rc.identify_system().await.is_ok());
    assert!(rc.create_slot("Bad-Name", true).await.is_err());
    wait_inactive(&c, "mm_slot").await;
    rc.drop_slot("mm_slot", true).await.unwrap();
    let n: i64 = c
        .query_one("select count(*) from pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    eprintln!("prepared_transactions test done in {:?}", t0.elapsed());
}

async fn wait_inactive(c: &tokio_postgres::Client, slot: &str) {
    let deadline = Instant::now() + STEP;
    while slot_row(c, slot).await.1 {
        assert!(Instant::now() < deadline, "slot {slot} still active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_transactions_are_not_replayed() {
    let Some(_) = pg_or_skip("confirmed_transactions_are_not_replayed") else {
        return;
    };
    let t0 = Instant::now();
    let (cluster, c) = setup("repl_confirm").await;
    let mut rc = client(&cluster).await;
    rc.create_slot("mm_slot", true).await.unwrap();
    let mut s = rc.start("mm_slot", "mm_pub", Lsn::ZERO).await.unwrap();

    c.batch_execute("INSERT INTO mm VALUES (1, 'first', now())")
        .await
        .unwrap();
    c.batch_execute(
        "BEGIN; INSERT INTO mm VALUES (2, 'second', now()); PREPARE TRANSACTION 'mm-1-0.1-1'",
    )
    .await
    .unwrap();
    c.batch_execute("COMMIT PREPARED 'mm-1-0.1-1'")
        .await
        .unwrap();
    let ms = until(&mut s, |m| matches!(m, M::Commit(_))).await;
    assert_eq!(kinds(&ms), ["Begin", "Relation", "Insert", "Commit"]);
    let ms = until(&mut s, |m| matches!(m, M::CommitPrepared(_))).await;
    assert_eq!(
        kinds(&ms),
        ["BeginPrepare", "Insert", "Prepare", "CommitPrepared"]
    );
    let M::CommitPrepared(cp) = &ms[3] else {
        unreachable!()
    };
    let end = cp.end_lsn;
    let before = slot_row(&c, "mm_slot").await.2;
    assert!(
        before < end,
        "confirmed_flush_lsn {before} already at {end}"
    );

    let t1 = Instant::now();
    s.confirm(end).await.unwrap();
    assert_eq!(s.confirmed(), end);
    let deadline = Instant::now() + STEP;
    loop {
        let flushed = slot_row(&c, "mm_slot").await.2;
        if flushed >= end {
            eprintln!(
                "confirmed_flush_lsn {before} -> {flushed} in {:?}",
                t1.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "confirmed_flush_lsn stuck at {flushed}, want {end}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.close().await.unwrap();
    wait_inactive(&c, "mm_slot").await;

    c.batch_execute("INSERT INTO mm VALUES (3, 'third', now())")
        .await
        .unwrap();
    let rc = client(&cluster).await;
    let mut s = rc.start("mm_slot", "mm_pub", Lsn::ZERO).await.unwrap();
    let ms = until(&mut s, |m| matches!(m, M::Commit(_))).await;
    // A new walsender: the relation is described again, but only the new
    // transaction is sent.
    assert_eq!(
        kinds(&ms),
        ["Begin", "Relation", "Insert", "Commit"],
        "{ms:#?}"
    );
    let M::Insert(i) = &ms[2] else { unreachable!() };
    assert_eq!(
        text(&i.new[0]),
        Some("3"),
        "replayed a confirmed transaction"
    );
    drop(s);
    drop(cluster);
    eprintln!("confirm test done in {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_tags_transactions_of_a_replication_origin() {
    let Some(_) = pg_or_skip("origin_tags_transactions_of_a_replication_origin") else {
        return;
    };
    let t0 = Instant::now();
    let (cluster, c) = setup("repl_origin").await;
    c.batch_execute("SELECT pg_replication_origin_create('mm_node_2')")
        .await
        .unwrap();
    let mut rc = client(&cluster).await;
    rc.create_slot("mm_slot", true).await.unwrap();
    let mut s = rc.start("mm_slot", "mm_pub", Lsn::ZERO).await.unwrap();

    // As the applier does for a transaction it received from node 2.
    c.batch_execute(
        "SELECT pg_replication_origin_session_setup('mm_node_2');
         BEGIN;
         SELECT pg_replication_origin_xact_setup('0/1234', now());
         INSERT INTO mm VALUES (1, 'from node 2', now());
         COMMIT;
         BEGIN; INSERT INTO mm VALUES (2, 'from node 2, prepared', now());
         PREPARE TRANSACTION 'mm-2-0.1-1';",
    )
    .await
    .unwrap();
    let ms = until(&mut s, |m| matches!(m, M::Commit(_))).await;
    assert_eq!(
        kinds(&ms),
        ["Begin", "Origin", "Relation", "Insert", "Commit"],
        "{ms:#?}"
    );
    let M::Origin(o) = &ms[1] else { unreachable!() };
    assert_eq!(o.name, "mm_node_2");
    assert_eq!(o.origin_lsn, "0/1234".parse().unwrap());
    let ms = until(&mut s, |m| matches!(m, M::Prepare(_))).await;
    assert_eq!(
        kinds(&ms),
        ["BeginPrepare", "Origin", "Insert", "Prepare"],
        "{ms:#?}"
    );
    let M::Origin(o) = &ms[1] else { unreachable!() };
    assert_eq!(o.name, "mm_node_2");

    // A local transaction: no Origin.
    c.batch_execute("SELECT pg_replication_origin_session_reset()")
        .await
        .unwrap();
    c.batch_execute("COMMIT PREPARED 'mm-2-0.1-1'")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO mm VALUES (3, 'local', now())")
        .await
        .unwrap();
    let ms = until(&mut s, |m| matches!(m, M::CommitPrepared(_))).await;
    assert_eq!(kinds(&ms), ["CommitPrepared"], "{ms:#?}");
    let ms = until(&mut s, |m| matches!(m, M::Commit(_))).await;
    assert_eq!(kinds(&ms), ["Begin", "Insert", "Commit"], "{ms:#?}");
    drop(s);
    drop(cluster);
    eprintln!("origin test done in {:?}", t0.elapsed());
}

/// A prepared transaction of three rows and an `mm.tx` marker under `gid`.
async fn prepare(db: &tokio_postgres::Client, first: i32, gid: &str) {
    let sql = format!(
        "BEGIN; INSERT INTO mm SELECT g, 'r', NULL FROM generate_series({first}, {}) g; \
         SELECT pg_logical_emit_message(true, 'mm.tx', '{gid}'); PREPARE TRANSACTION '{gid}'",
        first + 2
    );
    db.batch_execute(&sql).await.unwrap()
}

/// mm_output with its options (plugin/mm_output): a stream from node 1 to
/// node 9 that may skip echoes up to generation 5 gets node 1's own
/// transactions and the echoes of later generations, whole and in order
/// (batched into few CopyData messages), and nothing of the echoes it
/// already has, nor of node 9's own transactions applied here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mm_output_leaves_out_echoes_a_node_has() {
    let Some(_) = pg_or_skip("mm_output_leaves_out_echoes_a_node_has") else {
        return;
    };
    let (cluster, c) = setup("repl_mm_output").await;
    let mut rc = client(&cluster).await;
    let slot = rc.create_slot("mm_filtered", true).await.unwrap();
    if slot.output_plugin != FILTERING_PLUGIN {
        assert!(
            std::env::var_os("MM_REQUIRE_PG").is_none(),
            "mm_output is not installed (scripts/build-plugin.sh)"
        );
        eprintln!("SKIP: mm_output is not installed (scripts/build-plugin.sh)");
        return;
    }
    let skip = EchoSkip {
        me: 9,
        origin: 1,
        skip_upto: 5,
    };
    let mut s = rc
        .start_filtered("mm_filtered", "mm_pub", Lsn::ZERO, Some(skip))
        .await
        .unwrap();
    // An applier's session: rows of another node, under a replication origin.
    let applier = cluster.connect(0).await.unwrap();
    applier
        .batch_execute(
            "select pg_replication_origin_create('mm_node_2_0'); \
             select pg_replication_origin_session_setup('mm_node_2_0')",
        )
        .await
        .unwrap();
    prepare(&c, 1, "mm-1-0.1-3").await; // node 1's own: sent
    prepare(&applier, 10, "mm-2-0.1-5").await; // echo node 9 has: left out
    prepare(&applier, 20, "mm-2-0.1-6").await; // echo of a later generation: sent
    prepare(&applier, 30, "mm-9-0.1-7").await; // node 9's own, applied here: left out
    for gid in ["mm-1-0.1-3", "mm-2-0.1-5", "mm-2-0.1-6", "mm-9-0.1-7"] {
        c.batch_execute(&format!("COMMIT PREPARED '{gid}'"))
            .await
            .unwrap();
    }
    c.batch_execute("SELECT pg_logical_emit_message(false, 'end', '')")
        .await
        .unwrap();
    let ms = until(&mut s, |m| matches!(m, M::Message(x) if x.prefix == "end")).await;
    let seen: Vec<String> = ms
        .iter()
        .filter_map(|m| match m {
            M::BeginPrepare(b) => Some(format!("begin {}", b.gid)),
            M::Prepare(p) => Some(format!("prepare {}", p.gid)),
            M::CommitPrepared(p) => Some(format!("commit {}", p.gid)),
            M::Insert(i) => Some(format!("row {}", text(&i.new[0]).unwrap())),
            _ => None,
        })
        .collect();
    assert_eq!(
        seen,
        [
            "begin mm-1-0.1-3",
            "row 1",
            "row 2",
            "row 3",
            "prepare mm-1-0.1-3",
            "begin mm-2-0.1-6",
            "row 20",
            "row 21",
            "row 22",
            "prepare mm-2-0.1-6",
            "commit mm-1-0.1-3",
            "commit mm-2-0.1-6",
        ],
        "{ms:#?}"
    );
    assert!(
        ms.iter().any(|m| matches!(m, M::Origin(_))),
        "the echo that is sent keeps its Origin message: {ms:#?}"
    );
    // Without the options the same slot is pgoutput's stream: everything.
    drop(s);
    let mut plain = client(&cluster)
        .await
        .start("mm_filtered", "mm_pub", Lsn::ZERO)
        .await;
    while let Err(ReplError::Server { message, .. }) = &plain {
        // The walsender of the dropped stream may still hold the slot.
        assert!(message.contains("is active"), "{message}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        plain = client(&cluster)
            .await
            .start("mm_filtered", "mm_pub", Lsn::ZERO)
            .await;
    }
    let mut plain = plain.unwrap();
    let ms = until(
        &mut plain,
        |m| matches!(m, M::Message(x) if x.prefix == "end"),
    )
    .await;
    let begins = ms
        .iter()
        .filter(|m| matches!(m, M::BeginPrepare(_)))
        .count();
    assert_eq!(begins, 4, "{ms:#?}");
    drop(cluster);
}
