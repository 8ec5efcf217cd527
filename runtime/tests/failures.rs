//! mmd under failures on three local PostgreSQL 15 servers (multimaster's
//! own suites: stop a node, kill under load, a paused node): the majority
//! keeps committing, the victim refuses or is gone, and once it returns it
//! catches up by itself to the same data.

mod common;

use common::LOG;
use mm_harness::mm_cluster::{online_since, server_now, MmCluster};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One cluster at a time: three clusters under load on two cores starve
/// each other's catch-up, which is not what these tests measure.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn cluster(name: &str) -> Option<MmCluster> {
    cluster_with(name, false).await
}

async fn cluster_with(name: &str, link_cuts: bool) -> Option<MmCluster> {
    with_table(common::cluster_with(name, link_cuts).await?).await
}

async fn with_table(c: MmCluster) -> Option<MmCluster> {
    let n1 = c.connect_proxy(0).await.unwrap();
    n1.batch_execute("create table kv(k int primary key, v text)")
        .await
        .unwrap();
    Some(c)
}

/// Insert distinct keys through node `i`'s mmd until cancelled, retrying
/// whatever fails; returns the acknowledged keys.
fn writer(c: &MmCluster, i: usize, stop: CancellationToken) -> tokio::task::JoinHandle<Vec<i32>> {
    let conninfo = c.nodes[i].client_conninfo(c.dbname());
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut k = (i as i32 + 1) * 1_000_000;
        let mut client: Option<tokio_postgres::Client> = None;
        while !stop.is_cancelled() {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                    Ok((cl, conn)) => {
                        tokio::spawn(conn);
                        Some(cl)
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
            }
            let cl = client.as_ref().unwrap();
            k += 1;
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                cl.execute("insert into kv values ($1, 'w')", &[&k]),
            )
            .await;
            match r {
                Ok(Ok(_)) => {
                    acked.push(k);
                    // A steady load, below what a returning node replays
                    // per second on this 2-core machine (see docs/protocol.md).
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(_) => client = None,
            }
        }
        acked
    })
}

/// md5 of the whole table on node `i`, read directly.
async fn digest(c: &MmCluster, i: usize) -> (i64, String) {
    let db = c.pg.connect(i).await.unwrap();
    let r = db
        .query_one(
            "select count(*), coalesce(md5(string_agg(k::text || v, ',' order by k)), '') from kv",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// Every node holds the same rows, all acknowledged keys among them, and
/// nothing is left prepared (waits up to 30 s for in-flight finishing).
async fn converged(c: &MmCluster, acked: &[i32]) {
    let t = Instant::now();
    loop {
        let mut d = Vec::new();
        let mut prepared = 0i64;
        for i in 0..3 {
            d.push(digest(c, i).await);
            let db = c.pg.connect(i).await.unwrap();
            prepared += db
                .query_one("select count(*) from pg_prepared_xacts", &[])
                .await
                .unwrap()
                .get::<_, i64>(0);
        }
        if d.iter().all(|x| *x == d[0]) && prepared == 0 {
            let db = c.pg.connect(0).await.unwrap();
            let have: Vec<i32> = db
                .query("select k from kv", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            let have: std::collections::BTreeSet<i32> = have.into_iter().collect();
            let missing = acked.iter().filter(|k| !have.contains(k)).count();
            assert_eq!(missing, 0, "{missing} acknowledged rows are missing");
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "nodes disagree: {d:?}, {prepared} prepared left"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Time until a write through node `i` commits.
async fn first_commit(c: &MmCluster, i: usize, key: i32, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        if let Ok(p) = c.connect_proxy(i).await {
            if p.execute("insert into kv values ($1, 'probe')", &[&key])
                .await
                .is_ok()
            {
                return t.elapsed();
            }
        }
        assert!(t.elapsed() < limit, "node {} committed nothing", i + 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_one_write_restart_rows_arrive() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(mut c) = cluster("fail-stop-one").await else {
        return;
    };
    c.stop_mmd(2);
    c.pg.stop_node(2).unwrap();
    let took = first_commit(&c, 0, 1, Duration::from_secs(20)).await;
    eprintln!("first commit after stopping node 3: {took:?}");
    let n1 = c.connect_proxy(0).await.unwrap();
    for k in 2..=50 {
        n1.execute("insert into kv values ($1, 'during')", &[&k])
            .await
            .unwrap();
    }
    c.pg.start_node(2).await.unwrap();
    c.start_mmd(2, LOG).unwrap();
    c.wait_online(Duration::from_secs(30))
        .await
        .expect("node 3 back online");
    converged(&c, &(1..=50).collect::<Vec<_>>()).await;
    assert_eq!(digest(&c, 2).await.0, 50);
}

/// The echo filter (plugin/mm_output) must not leave out what a returning
/// node lacks: node 3 is away while node 1 commits with node 2, then node 1
/// goes down too, so node 3 can get node 1's rows only as echoes in node
/// 2's stream (of a generation after node 3's last online one). Run with
/// every echo left out (`echo_skip` returning `u64::MAX`), node 3 came back
/// online without them and this test failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_node_gets_a_downed_origins_rows_as_echoes() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(mut c) = cluster("fail-echo-catchup").await else {
        return;
    };
    if std::env::var_os("MM_REQUIRE_PG").is_some() {
        // CI installs the plugin (scripts/build-plugin.sh): prove the
        // filter is on, or this test would not test it.
        let db = c.pg.connect(1).await.unwrap();
        let plugin: String = db
            .query_one(
                "select plugin::text from pg_replication_slots where slot_name = 'mm_slot_for_3'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            plugin, "mm_output",
            "node 2's slot for node 3 should filter echoes"
        );
    }
    c.stop_mmd(2);
    c.pg.stop_node(2).unwrap();
    first_commit(&c, 0, 1, Duration::from_secs(20)).await;
    let n1 = c.connect_proxy(0).await.unwrap();
    for k in 2..=40 {
        n1.execute("insert into kv values ($1, 'from node 1')", &[&k])
            .await
            .unwrap();
    }
    drop(n1);
    c.stop_mmd(0);
    c.pg.stop_node(0).unwrap();
    c.pg.start_node(2).await.unwrap();
    c.start_mmd(2, LOG).unwrap();
    c.wait_node_online(2, Duration::from_secs(60))
        .await
        .expect("node 3 online with node 2");
    // Nodes 2 and 3 are the majority now: what node 3 serves must hold
    // node 1's rows.
    let t = Instant::now();
    loop {
        let (n, _) = digest(&c, 2).await;
        if n == 40 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "node 3 is online with {n} of node 1's 40 rows"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    first_commit(&c, 2, 41, Duration::from_secs(20)).await;
    c.pg.start_node(0).await.unwrap();
    c.start_mmd(0, LOG).unwrap();
    c.wait_online(Duration::from_secs(60))
        .await
        .expect("node 1 back online");
    converged(&c, &(1..=41).collect::<Vec<_>>()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_postgres_under_load_survivors_commit_victim_returns() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(mut c) = cluster("fail-kill-pg").await else {
        return;
    };
    let stop = CancellationToken::new();
    let writers: Vec<_> = (0..3).map(|i| writer(&c, i, stop.clone())).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.pg.kill9(2).unwrap();
    let took = first_commit(&c, 0, -1, Duration::from_secs(20)).await;
    eprintln!("first commit on node 1 after kill -9 of node 3's PostgreSQL: {took:?}");
    // Its mmd stops itself (watchdog) instead of holding the cluster's votes.
    let t = Instant::now();
    while c.mmd_running(2) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "mmd 3 kept running without its database"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "mmd of node 3 stopped itself {:?} after the kill",
        t.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.pg.start_node(2).await.unwrap();
    c.start_mmd(2, LOG).unwrap();
    c.wait_online(Duration::from_secs(30))
        .await
        .expect("node 3 back online");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let mut acked = vec![-1];
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    eprintln!("{} writes acknowledged", acked.len());
    converged(&c, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_node_majority_commits_victim_catches_up() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(mut c) = cluster("fail-pause").await else {
        return;
    };
    let stop = CancellationToken::new();
    let writers: Vec<_> = (0..2).map(|i| writer(&c, i, stop.clone())).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.signal_mmd(2, libc::SIGSTOP).unwrap();
    c.pg.pause(2).unwrap();
    let took = first_commit(&c, 1, -2, Duration::from_secs(20)).await;
    eprintln!("first commit on node 2 after pausing node 3: {took:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.pg.resume(2).unwrap();
    c.signal_mmd(2, libc::SIGCONT).unwrap();
    // Paused past the watchdog's grace, its mmd may have stopped itself.
    let t = Instant::now();
    loop {
        if !c.mmd_running(2) {
            c.start_mmd(2, LOG).unwrap();
        }
        if c.wait_online(Duration::from_secs(2)).await.is_ok() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "node 3 never came back online"
        );
    }
    stop.cancel();
    let mut acked = vec![-2];
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    converged(&c, &acked).await;
    // The probe key was written while node 3 was paused: it has it now.
    let (n, _) = digest(&c, 2).await;
    assert!(n as usize >= acked.len());
}

/// Multimaster's partition test on one link: nodes 1 and 2 cannot reach
/// each other, both still reach node 3. A generation is a mutually
/// connected majority, so node 3 and one of 1 and 2 keep committing; the
/// other refuses until the link heals, then catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_leaves_one_clique_committing_and_heals() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping a_cut_link_leaves_one_clique_committing_and_heals: cutting a link needs root (cgroups, iptables)");
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(mut c) = cluster_with("fail-cut", true).await else {
        return;
    };
    let stop = CancellationToken::new();
    let writers: Vec<_> = (0..3).map(|i| writer(&c, i, stop.clone())).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.cut_link(0, 1).unwrap();
    let took = first_commit(&c, 2, -3, Duration::from_secs(20)).await;
    eprintln!("first commit on node 3 after cutting link 1-2: {took:?}");
    // One end of the cut link is out: the generation is {3, 1} or {3, 2}.
    let t = Instant::now();
    let out = loop {
        let s1 = c.status(0).await.unwrap_or_default();
        let s2 = c.status(1).await.unwrap_or_default();
        match (s1 == "online", s2 == "online") {
            (true, false) => break 1,
            (false, true) => break 0,
            _ => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "expected exactly one of nodes 1 and 2 online, saw {s1} and {s2}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The end left out refuses work with a clear error.
    match c.connect_proxy(out).await {
        Ok(p) => {
            let e = p
                .execute("insert into kv values (-4, 'refused')", &[])
                .await
                .expect_err("a node outside the generation refuses writes");
            eprintln!("node {} refuses: {e}", out + 1);
        }
        Err(e) => eprintln!("node {} refuses at connect: {e:#}", out + 1),
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.heal_link(0, 1).unwrap();
    c.wait_online(Duration::from_secs(40))
        .await
        .expect("every node online after the heal");
    stop.cancel();
    let mut acked = vec![-3];
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    converged(&c, &acked).await;
}

/// A node away while its peers' WAL outgrew `max_slot_wal_keep_size`: its
/// slots on them are invalidated, so it cannot catch up from their streams.
/// It says so, stays out of `online` (it lacks committed rows), replaces its
/// database with a donor's snapshot by itself, under load, and comes back
/// with every row, the table created while it was away, and sequences that
/// hand out values no other node uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_resynced_from_a_donor_snapshot() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let settings = vec![
        ("max_slot_wal_keep_size".to_string(), "64MB".to_string()),
        ("max_wal_size".to_string(), "64MB".to_string()),
        ("min_wal_size".to_string(), "32MB".to_string()),
    ];
    let Some(c) = common::cluster_settings("fail-slot-lost", false, settings).await else {
        return;
    };
    let Some(mut c) = with_table(c).await else {
        return;
    };
    let n1 = c.connect_proxy(0).await.unwrap();
    n1.batch_execute("create table ser(id serial primary key, node int)")
        .await
        .unwrap();
    c.stop_mmd(2);
    c.pg.stop_node(2).unwrap();
    first_commit(&c, 0, -10, Duration::from_secs(20)).await;
    let n1 = c.connect_proxy(0).await.unwrap();
    n1.batch_execute(
        "create table made_while_away(k int primary key); \
         insert into made_while_away select generate_series(1, 100); \
         insert into ser(node) values (1), (1), (1)",
    )
    .await
    .unwrap();
    // Six WAL segments of 16 MB past node 3's slot, a checkpoint after
    // each. The other nodes' slots follow (their restart point moves at the
    // running-transactions record a checkpoint logs); node 3's does not, and
    // once it is more than 64 MB behind a checkpoint invalidates it.
    for i in 0..6 {
        first_commit(&c, 0, -20 - i, Duration::from_secs(20)).await;
        let mut marks = Vec::new();
        for n in 0..2 {
            let db = c.pg.connect(n).await.unwrap();
            db.batch_execute("select pg_switch_wal(); checkpoint")
                .await
                .unwrap();
            let lsn: String = db
                .query_one("select pg_current_wal_lsn()::text", &[])
                .await
                .unwrap()
                .get(0);
            marks.push(lsn);
        }
        // A write after the checkpoint moves the active slots past it.
        first_commit(&c, 0, -40 - i, Duration::from_secs(20)).await;
        let mut nudge_key = -1000 - 100 * i;
        for (n, mark) in marks.iter().enumerate() {
            let peer_slot = format!("mm_slot_for_{}", 2 - n); // node 1 serves 2, node 2 serves 1
            let db = c.pg.connect(n).await.unwrap();
            let t = Instant::now();
            let mut nudged = Instant::now();
            loop {
                // A slot's restart point moves only to a running-transactions
                // record past the mark: without a new checkpoint that waits for
                // the background writer's (every 15 s), which under load came
                // too late (CI). A checkpoint and a write make one now.
                if nudged.elapsed() > Duration::from_secs(3) {
                    db.batch_execute("checkpoint").await.unwrap();
                    first_commit(&c, 0, nudge_key, Duration::from_secs(20)).await;
                    nudge_key -= 1;
                    nudged = Instant::now();
                }
                let caught_up: bool = db
                    .query_one(
                        "select coalesce(restart_lsn >= $2::text::pg_lsn, false) \
                         from pg_replication_slots where slot_name = $1",
                        &[&peer_slot, mark],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if caught_up {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "{peer_slot} on node {} did not follow",
                    n + 1
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for n in 0..2 {
        let db = c.pg.connect(n).await.unwrap();
        db.batch_execute("checkpoint").await.unwrap();
    }
    let lost: String =
        c.pg.connect(0)
            .await
            .unwrap()
            .query_one(
                "select coalesce(slot_wal_status, '-') from mtm.nodes() where id = 3",
                &[],
            )
            .await
            .unwrap()
            .get(0);
    assert_eq!(lost, "lost", "node 1 shows node 3's slot as lost");
    let stop = CancellationToken::new();
    let writers: Vec<_> = (0..2).map(|i| writer(&c, i, stop.clone())).collect();
    c.pg.start_node(2).await.unwrap();
    c.start_mmd(2, LOG).unwrap();
    let t = Instant::now();
    let log = c.nodes[2].log_path.clone();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("needs a resync") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "node 3 never said its slot was invalidated"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Then it resyncs and comes back by itself, while nodes 1 and 2 commit.
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("resync done") && c.status(2).await.ok().as_deref() == Some("online") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "node 3 is not online 120 s after its restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "node 3 online {:.1} s after it said it needs a resync",
        t.elapsed().as_secs_f64()
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("resync done"),
        "node 3's log says nothing of the resync"
    );
    let note: Option<String> =
        c.pg.connect(2)
            .await
            .unwrap()
            .query_one("select resync from mtm.status()", &[])
            .await
            .unwrap()
            .get(0);
    eprintln!("node 3 mtm.status().resync: {note:?}");
    assert!(
        note.as_deref().is_some_and(|n| n.starts_with("done")),
        "mtm.status() on node 3 shows the resync: {note:?}"
    );
    // Node 3's sequence values stay its own: inserts through every node
    // commit without a duplicate key.
    // A transaction may still abort as the generation settles (40001, safe
    // to retry); a duplicate key would fail for good.
    for i in [2usize, 0, 1, 2] {
        let p = c.connect_proxy(i).await.unwrap();
        let t = Instant::now();
        loop {
            match p
                .execute("insert into ser(node) values ($1)", &[&(i as i32 + 1)])
                .await
            {
                Ok(_) => break,
                Err(e)
                    if e.code().map(|c| c.code()) == Some("40001")
                        && t.elapsed() < Duration::from_secs(20) =>
                {
                    eprintln!("node {}: insert retried: {e}", i + 1);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("node {}: insert into ser failed: {e:?}", i + 1),
            }
        }
    }
    stop.cancel();
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    eprintln!("{} rows acknowledged during the resync", acked.len());
    converged(&c, &acked).await;
    for q in [
        "select count(*) from made_while_away",
        "select count(*) from ser",
    ] {
        let mut counts = Vec::new();
        for i in 0..3 {
            let db = c.pg.connect(i).await.unwrap();
            counts.push(db.query_one(q, &[]).await.unwrap().get::<_, i64>(0));
        }
        assert!(counts.iter().all(|n| *n == counts[0]), "{q}: {counts:?}");
    }
}

/// A node whose rows diverged while it was away (a row deleted directly on
/// its PostgreSQL, outside mm): the replay of a committed update of that row
/// finds nothing to update, the node says it needs a resync and does it by
/// itself, and comes back with the row as the cluster committed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_finds_a_row_missing_resyncs_the_node() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(mut c) = cluster("fail-diverged").await else {
        return;
    };
    let n1 = c.connect_proxy(0).await.unwrap();
    n1.batch_execute("insert into kv select g, 'v' from generate_series(1, 10) g")
        .await
        .unwrap();
    converged(&c, &[]).await;
    c.stop_mmd(2);
    c.pg.stop_node(2).unwrap();
    first_commit(&c, 0, -1, Duration::from_secs(20)).await;
    let n1 = c.connect_proxy(0).await.unwrap();
    n1.batch_execute("update kv set v = 'updated while node 3 was away' where k = 5")
        .await
        .unwrap();
    c.pg.start_node(2).await.unwrap();
    // Outside mm: only node 3 loses the row.
    c.pg.connect(2)
        .await
        .unwrap()
        .batch_execute("delete from kv where k = 5")
        .await
        .unwrap();
    let db3 = c.pg.connect(2).await.unwrap();
    let since = server_now(&db3).await.unwrap();
    c.start_mmd(2, LOG).unwrap();
    let t = Instant::now();
    loop {
        // Only a report of the new mmd counts.
        if online_since(&db3, &since).await {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "node 3 is not online 90 s after its restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "node 3 online {:.1} s after its restart",
        t.elapsed().as_secs_f64()
    );
    let log = std::fs::read_to_string(&c.nodes[2].log_path).unwrap_or_default();
    assert!(
        log.contains("diverged"),
        "node 3 did not notice it diverged"
    );
    assert!(log.contains("resync done"), "node 3 did not resync");
    converged(&c, &[5]).await;
    let v: String =
        c.pg.connect(2)
            .await
            .unwrap()
            .query_one("select v from kv where k = 5", &[])
            .await
            .unwrap()
            .get(0);
    assert_eq!(v, "updated while node 3 was away");
}
