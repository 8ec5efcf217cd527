//! mmd end to end on three local PostgreSQL 15 servers: DDL through one
//! node reaches all, writes on any node commit everywhere, a crossing
//! conflict aborts with 40001 and leaves nothing prepared.

mod common;

use common::cluster;
use mm_harness::backend::local::LocalClusterConfig;
use mm_harness::mm_cluster::MmCluster;
use mm_harness::pg_bin::pg_or_skip;
use std::time::Duration;

async fn count_on(c: &MmCluster, i: usize, sql: &str) -> i64 {
    let db = c.pg.connect(i).await.unwrap();
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// `count_on` once it gives `want`, or its value after 5 s: a commit is
/// acknowledged when its origin committed, and peers finish it moments later.
async fn count_settled(c: &MmCluster, i: usize, sql: &str, want: i64) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = count_on(c, i, sql).await;
        if n == want || std::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
            count_settled(&c, i, "select count(*) from kv", 30).await,
            30,
            "node {}",
            i + 1
        );
        assert_eq!(
            count_settled(&c, i, "select count(*) from kv where v = 'y'", 5).await,
            5
        );
        assert_eq!(
            count_settled(&c, i, "select count(*) from pg_prepared_xacts", 0).await,
            0
        );
    }

    // Extended protocol in an explicit transaction, rolled back.
    let n2 = c.connect_proxy(1).await.unwrap();
    n2.batch_execute("begin").await.unwrap();
    n2.execute(
        "insert into kv values ($1, $2)",
        &[&1000i32, &"rolled back"],
    )
    .await
    .unwrap();
    n2.batch_execute("rollback").await.unwrap();
    let r = n2.query_one("select count(*) from kv", &[]).await.unwrap();
    assert_eq!(r.get::<_, i64>(0), 30);
    // Refused statements say why and leave the session usable.
    let e = n2
        .batch_execute("prepare transaction 'mine'")
        .await
        .expect_err("client 2PC is refused");
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e}");
    let e = n2
        .batch_execute("create table t2 as select 1 as a")
        .await
        .expect_err("CTAS is refused");
    assert!(format!("{e:?}").contains("CREATE TABLE AS"), "{e:?}");
    n2.batch_execute("select 1")
        .await
        .expect("session still usable");

    // Sequences are conflict-free: node k hands out k, k+N, ...
    n2.batch_execute("create table s(id serial primary key, v int)")
        .await
        .unwrap();
    for i in 0..3 {
        let p = c.connect_proxy(i).await.unwrap();
        p.execute("insert into s(v) values (1)", &[]).await.unwrap();
        p.execute("insert into s(v) values (1)", &[]).await.unwrap();
    }
    for i in 0..3 {
        assert_eq!(count_settled(&c, i, "select count(*) from s", 6).await, 6);
        assert_eq!(
            count_settled(&c, i, "select count(distinct id) from s", 6).await,
            6,
            "sequence values collided"
        );
    }

    // Crossing writes: node 1 holds a row lock in an open transaction; node
    // 2's write of the same row cannot be applied on node 1 within
    // lock_timeout, so it aborts with 40001, and node 1 still commits.
    let a = c.connect_proxy(0).await.unwrap();
    let b = c.connect_proxy(1).await.unwrap();
    a.batch_execute("begin").await.unwrap();
    a.batch_execute("update kv set v = 'a' where k = 1")
        .await
        .unwrap();
    let e = b
        .execute("update kv set v = 'b' where k = 1", &[])
        .await
        .expect_err("the crossing write aborts");
    assert_eq!(e.code().map(|c| c.code()), Some("40001"), "{e:?}");
    a.batch_execute("commit")
        .await
        .expect("the lock holder commits");
    for i in 0..3 {
        let db = c.pg.connect(i).await.unwrap();
        let v: String = db
            .query_one("select v from kv where k = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, "a", "node {}", i + 1);
        assert_eq!(
            count_on(&c, i, "select count(*) from pg_prepared_xacts").await,
            0
        );
    }
    // A node that lacks the row a remote UPDATE changes votes no instead
    // of diverging: delete k=2 behind mm's back on node 3, then update it
    // through node 1.
    let n3 = c.pg.connect(2).await.unwrap();
    n3.batch_execute("delete from kv where k = 2")
        .await
        .unwrap();
    let e = a
        .execute("update kv set v = 'lost' where k = 2", &[])
        .await
        .expect_err("node 3 cannot apply it");
    assert_eq!(e.code().map(|c| c.code()), Some("40001"), "{e:?}");
    for i in 0..2 {
        assert_eq!(
            count_on(&c, i, "select count(*) from kv where v = 'lost'").await,
            0,
            "node {} did not commit it",
            i + 1
        );
    }

    // Maintenance runs on this node only, with a notice; a table without a
    // primary key cannot be updated (PostgreSQL says why: the publication).
    n2.batch_execute("vacuum kv")
        .await
        .expect("vacuum runs locally");
    n2.batch_execute("create table nopk(a int)").await.unwrap();
    n2.batch_execute("insert into nopk values (1)")
        .await
        .unwrap();
    let e = n2
        .batch_execute("update nopk set a = 2")
        .await
        .expect_err("no replica identity");
    assert!(format!("{e:?}").contains("replica identity"), "{e:?}");

    // Authentication passes through: a SCRAM user with its password gets in,
    // a wrong password gets PostgreSQL's own error.
    let admin = c.pg.connect(0).await.unwrap();
    admin
        .batch_execute(
            "set password_encryption = 'scram-sha-256'; \
             create role scram_user login password 's3cret'; \
             grant all on kv to scram_user",
        )
        .await
        .unwrap();
    let hba = c.pg.node(0).data_dir.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "local all scram_user scram-sha-256\nhost all scram_user 127.0.0.1/32 scram-sha-256\n{old}"
        ),
    )
    .unwrap();
    admin
        .batch_execute("select pg_reload_conf()")
        .await
        .unwrap();
    // The reload is asynchronous: wait until the wrong password is refused.
    let port = c.nodes[0].client_port;
    let bad = format!("host=127.0.0.1 port={port} user=scram_user password=wrong dbname=postgres");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let e = loop {
        match tokio_postgres::connect(&bad, tokio_postgres::NoTls).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "pg_hba.conf never took effect"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("28P01"),
        "{e:?}"
    );
    let good =
        format!("host=127.0.0.1 port={port} user=scram_user password=s3cret dbname=postgres");
    let (sc, conn) = tokio_postgres::connect(&good, tokio_postgres::NoTls)
        .await
        .expect("SCRAM through mmd");
    tokio::spawn(conn);
    let r = sc.query_one("select count(*) from kv", &[]).await.unwrap();
    assert!(r.get::<_, i64>(0) > 0);

    // Status: SQL functions on every node, and mmctl's table.
    for i in 0..3 {
        let db = c.pg.connect(i).await.unwrap();
        let r = db
            .query_one(
                "select my_node_id, status, gen_members_online::text from mtm.status()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(r.get::<_, i32>(0), i as i32 + 1);
        assert_eq!(r.get::<_, String>(1), "online");
        assert_eq!(r.get::<_, String>(2), "{1,2,3}");
        let peers = db
            .query(
                "select id from mtm.nodes() where connected and link and receiver_ok",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(peers.len(), 3, "node {} sees every node", i + 1);
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmctl"))
        .arg("status")
        .arg("--config")
        .arg(&c.nodes[0].config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("node 1: online"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains(" yes ")).count(),
        3,
        "{text}"
    );
}

/// Bad input on the client port: garbage, a client that vanishes in the
/// middle of a transaction or right after COMMIT. Each gets a clear error
/// or a settled outcome; nothing is left prepared; mmd keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_lose_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(c) = cluster("e2e-bad").await else {
        return;
    };
    let n1 = c.connect_proxy(0).await.unwrap();
    n1.batch_execute("create table kv(k int primary key, v text)")
        .await
        .unwrap();
    let addr = format!("127.0.0.1:{}", c.nodes[0].client_port);

    // Garbage instead of a startup packet: a FATAL error, then close.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert_eq!(buf.first(), Some(&b'E'), "an ErrorResponse: {buf:?}");
    assert!(String::from_utf8_lossy(&buf).contains("invalid startup packet"));

    // Garbage after a good startup: FATAL protocol violation.
    let mut s = raw_session(&addr).await;
    s.write_all(b"\x01\x00\x00\x00\x08garbage").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(String::from_utf8_lossy(&buf).contains("08P01"), "{buf:?}");

    // Vanishing inside a transaction: PostgreSQL rolls it back.
    let mut s = raw_session(&addr).await;
    query(&mut s, "begin").await;
    query(&mut s, "insert into kv values (1, 'gone')").await;
    drop(s);

    // Vanishing right after COMMIT: the cluster settles it one way, everywhere.
    let mut s = raw_session(&addr).await;
    query(&mut s, "begin").await;
    query(&mut s, "insert into kv values (2, 'maybe')").await;
    s.write_all(&query_msg("commit")).await.unwrap();
    drop(s);

    // Vanishing in the middle of an implicit transaction.
    let mut s = raw_session(&addr).await;
    s.write_all(&query_msg("insert into kv values (3, 'maybe')"))
        .await
        .unwrap();
    drop(s);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut prepared = 0;
        for i in 0..3 {
            prepared += count_on(&c, i, "select count(*) from pg_prepared_xacts").await;
        }
        if prepared == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "prepared transactions left behind"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counts = counts_on_all(&c, "select count(*) from kv where k = 1").await;
    assert_eq!(
        counts,
        vec![0, 0, 0],
        "the abandoned transaction never committed"
    );
    for k in [2, 3] {
        let counts = counts_on_all(&c, &format!("select count(*) from kv where k = {k}")).await;
        assert!(
            counts == vec![0, 0, 0] || counts == vec![1, 1, 1],
            "k={k}: {counts:?}"
        );
    }
    n1.batch_execute("select 1")
        .await
        .expect("mmd still serves");
}

/// COPY FROM STDIN through mmd commits everywhere, by both protocols:
/// tokio-postgres' `copy_in` (extended: its Sync before the data is ignored
/// in copy mode, the one after CopyDone ends it), autocommit and inside
/// BEGIN … COMMIT, and psql's simple-protocol COPY. Each once hung or
/// failed with "unexpected message type 0x51 during COPY from stdin".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_commits_everywhere() {
    use tokio::io::AsyncWriteExt;
    let Some(c) = cluster("e2e-copy").await else {
        return;
    };
    let n1 = c.connect_proxy(0).await.unwrap();
    n1.batch_execute("create table cp(id int primary key, v text)")
        .await
        .unwrap();
    let t = Duration::from_secs(60);
    assert_eq!(
        tokio::time::timeout(t, ext(&n1, 0, 5000))
            .await
            .expect("autocommit copy_in hung"),
        5000
    );
    // copy_in's finish returns at CommandComplete: the proxy must send it
    // only once the cluster committed, so every node shows the rows now
    // (read directly, no waiting).
    assert_eq!(
        counts_on_all(&c, "select count(*) from cp").await,
        [5000; 3],
        "every node right after the COPY returned"
    );
    let n2 = c.connect_proxy(1).await.unwrap();
    n2.batch_execute("begin").await.unwrap();
    assert_eq!(
        tokio::time::timeout(t, ext(&n2, 5000, 6000))
            .await
            .expect("copy_in in BEGIN hung"),
        1000
    );
    n2.batch_execute("commit").await.unwrap();
    // Simple protocol, as psql's \copy and pgbench -i send it.
    let mut raw = raw_session(&format!("127.0.0.1:{}", c.nodes[2].client_port)).await;
    raw.write_all(&query_msg("copy cp(id, v) from stdin"))
        .await
        .unwrap();
    let data = copy_rows(6000, 6500);
    let mut d = vec![b'd'];
    d.extend_from_slice(&((data.len() + 4) as i32).to_be_bytes());
    d.extend_from_slice(&data);
    d.extend_from_slice(&[b'c', 0, 0, 0, 4]);
    raw.write_all(&d).await.unwrap();
    tokio::time::timeout(t, read_until_ready(&mut raw))
        .await
        .expect("simple COPY hung");
    // An implicit transaction whose second statement fails: the first
    // one's CommandComplete, then the error, as PostgreSQL sends them.
    raw.write_all(&query_msg(
        "insert into cp values (7000, 'a'); insert into cp values (7000, 'b')",
    ))
    .await
    .unwrap();
    assert_eq!(
        tokio::time::timeout(t, read_tags_until_ready(&mut raw))
            .await
            .expect("failed implicit transaction hung"),
        b"CEZ"
    );
    n1.batch_execute("select 1")
        .await
        .expect("session still usable");
    for i in 0..3 {
        assert_eq!(
            count_settled(&c, i, "select count(*) from cp", 6500).await,
            6500,
            "node {}",
            i + 1
        );
    }
}

fn copy_rows(from: i32, to: i32) -> bytes::Bytes {
    let mut b = String::new();
    for i in from..to {
        b.push_str(&format!("{i}\tx{i}\n"));
    }
    bytes::Bytes::from(b)
}

/// `copy cp from stdin` by tokio-postgres (extended protocol); rows copied.
async fn ext(client: &tokio_postgres::Client, from: i32, to: i32) -> u64 {
    use futures::SinkExt;
    let sink = client
        .copy_in::<_, bytes::Bytes>("copy cp(id, v) from stdin")
        .await
        .expect("copy_in starts");
    futures::pin_mut!(sink);
    sink.send(copy_rows(from, to)).await.unwrap();
    sink.finish().await.expect("copy_in commits")
}

async fn counts_on_all(c: &MmCluster, sql: &str) -> Vec<i64> {
    let mut v = Vec::new();
    for i in 0..3 {
        v.push(count_on(c, i, sql).await);
    }
    v
}

fn query_msg(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// A raw protocol session (trust auth), ready for queries.
async fn raw_session(addr: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for (k, v) in [("user", "postgres"), ("database", "postgres")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    pkt.extend_from_slice(&body);
    s.write_all(&pkt).await.unwrap();
    read_until_ready(&mut s).await;
    s
}

async fn query(s: &mut tokio::net::TcpStream, sql: &str) {
    use tokio::io::AsyncWriteExt;
    s.write_all(&query_msg(sql)).await.unwrap();
    read_until_ready(s).await;
}

/// The tags of the messages up to and including ReadyForQuery.
async fn read_tags_until_ready(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut tags = Vec::new();
    loop {
        let tag = s.read_u8().await.unwrap();
        let len = s.read_i32().await.unwrap();
        let mut body = vec![0; len as usize - 4];
        s.read_exact(&mut body).await.unwrap();
        tags.push(tag);
        if tag == b'Z' {
            return tags;
        }
    }
}

async fn read_until_ready(s: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    loop {
        let tag = s.read_u8().await.unwrap();
        let len = s.read_i32().await.unwrap();
        let mut body = vec![0; len as usize - 4];
        s.read_exact(&mut body).await.unwrap();
        assert_ne!(tag, b'E', "error: {}", String::from_utf8_lossy(&body));
        if tag == b'Z' {
            return;
        }
    }
}

/// A config naming peers that cannot be reached: mmd starts, says so in its
/// log, stays isolated, and refuses clients with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_peers_leave_a_node_isolated_and_refusing() {
    use mm_harness::backend::local::LocalCluster;
    if pg_or_skip("unreachable_peers").is_none() {
        return;
    }
    let mut pg_cfg = LocalClusterConfig::for_tests("e2e-alone", 1);
    pg_cfg.stop_on_signal = false;
    // Settings for the three-node cluster its config names.
    pg_cfg.extra_settings = vec![
        ("max_prepared_transactions".into(), "300".into()),
        ("max_replication_slots".into(), "16".into()),
    ];
    let pg = LocalCluster::start(pg_cfg).await.expect("postgres starts");
    let port = || mm_harness::mm_cluster::free_port().unwrap();
    let (client, mesh) = (port(), port());
    let mut text = format!(
        "cluster_id = \"alone\"\nnode_id = 1\nsecret = \"s\"\n[listen]\nmesh = \"127.0.0.1:{mesh}\"\n\
         client = \"127.0.0.1:{client}\"\n[postgres]\nconninfo = \"{}\"\n",
        pg.conninfo(0)
    );
    text.push_str(&format!(
        "[[nodes]]\nid = 1\nmesh = \"127.0.0.1:{mesh}\"\npostgres = \"{}\"\n",
        pg.conninfo(0)
    ));
    for id in 2..=3 {
        text.push_str(&format!(
            "[[nodes]]\nid = {id}\nmesh = \"127.0.0.1:{}\"\n\
             postgres = \"host=127.0.0.1 port={} user=postgres connect_timeout=1\"\n",
            port(),
            port()
        ));
    }
    let dir = pg.node(0).dir.clone();
    let cfg_path = dir.join("mmd.toml");
    std::fs::write(&cfg_path, text).unwrap();
    let cfg = mm_runtime::config::NodeConfig::load(&cfg_path).unwrap();
    mm_runtime::pg::init::init_node(&cfg).await.expect("init");
    let log = dir.join("mmd.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mmd"))
        .arg("--config")
        .arg(&cfg_path)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let conninfo = format!("host=127.0.0.1 port={client} user=postgres dbname=postgres");
    let err = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .err()
        .expect("an isolated node refuses clients");
    // An administrator's bypass session opens and reads; its writes are
    // refused at COMMIT, since the node is not online.
    let (admin, conn) = tokio_postgres::connect(
        &format!("{conninfo} options='-c mm.admin_bypass=on'"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("a bypass session opens on an isolated node");
    tokio::spawn(conn);
    let status: String = admin
        .query_one("select status from mtm.status()", &[])
        .await
        .expect("a bypass session reads")
        .get(0);
    assert_eq!(status, "isolated");
    admin
        .batch_execute("create table if not exists bypass_t(k int primary key)")
        .await
        .expect_err("DDL through a bypass session on an isolated node is refused");
    let werr = admin
        .execute("insert into mm.applied_tx values ('bypass-probe', 0)", &[])
        .await
        .expect_err("a write through a bypass session on an isolated node is refused");
    let _ = child.kill();
    let _ = child.wait();
    let wdb = werr.as_db_error().expect("a server error");
    assert_eq!(wdb.code().code(), "57P03", "{wdb:?}");
    let direct = pg.connect(0).await.unwrap();
    let n: i64 = direct
        .query_one(
            "select count(*) from mm.applied_tx where gid = 'bypass-probe'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the refused write left nothing");
    let db = err
        .as_db_error()
        .expect("a server error, not a dropped connection");
    assert_eq!(db.code().code(), "57P03", "{db:?}");
    assert!(db.message().contains("isolated"), "{}", db.message());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("cannot connect to peer"), "{logged}");
    assert!(
        logged.contains("data-plane stream from peer failed"),
        "{logged}"
    );
}

/// Visible everywhere when COMMIT returns (the default): a row committed
/// through one node's mmd is seen at once through every other node's mmd.
/// The same probes with `mm.wait_peer_commits = off` are counted, not
/// asserted (they may or may not lag on a given run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_visible_everywhere_when_it_returns() {
    let Some(c) = cluster("e2e-visible").await else {
        return;
    };
    let writer = c.connect_proxy(0).await.unwrap();
    writer
        .batch_execute("create table probe(id int primary key)")
        .await
        .unwrap();
    let readers = [
        c.connect_proxy(1).await.unwrap(),
        c.connect_proxy(2).await.unwrap(),
    ];
    let stale_default = stale_reads(&writer, &readers, 0..60).await;
    writer
        .batch_execute("set mm.wait_peer_commits = off")
        .await
        .unwrap();
    let stale_relaxed = stale_reads(&writer, &readers, 100..160).await;
    eprintln!("stale reads: default {stale_default}/120, relaxed {stale_relaxed}/120");
    assert_eq!(
        stale_default, 0,
        "a committed row was not visible on a peer"
    );
}

/// Insert each id through `writer`, then count the readers that do not see it yet.
async fn stale_reads(
    writer: &tokio_postgres::Client,
    readers: &[tokio_postgres::Client],
    ids: std::ops::Range<i32>,
) -> usize {
    let mut stale = 0;
    for id in ids {
        writer
            .batch_execute(&format!("insert into probe values ({id})"))
            .await
            .unwrap();
        for r in readers {
            let sql = format!("select count(*) from probe where id = {id}");
            let n: i64 = r.query_one(&sql, &[]).await.unwrap().get(0);
            stale += (n == 0) as usize;
        }
    }
    stale
}
