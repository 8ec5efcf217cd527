//! Named scenarios from multimaster's own suites, each on a 3-node mm
//! cluster of both backends (local processes, Docker containers): crossing
//! updates on two nodes (deadlock), hot-key upserts from every node, and
//! bank readers while a node is killed and comes back.
//!
//! The local tests skip (print why, pass) when PostgreSQL 15 is not
//! installed, unless `MM_REQUIRE_PG` is set, and need the `mmd` binary of
//! the same profile (`cargo test --workspace` builds it) or `MM_MMD_BIN`.
//! The Docker tests skip without Docker or the image `mm-node:dev`
//! (`scripts/build-image.sh`), unless `MM_REQUIRE_DOCKER=1`.

use mm_harness::backend::docker::{self, DockerCluster, DockerClusterConfig};
use mm_harness::backend::local::LocalClusterConfig;
use mm_harness::mm_cluster::{find_mmd, MmCluster, MmOptions};
use mm_harness::pg_bin::pg_or_skip;
use mm_workloads::{bank_seed_sql, run_bank, BankConfig, Stop, BANK_SCHEMA};
use std::time::{Duration, Instant};

/// One cluster at a time: each runs load on two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const LOG: &str = "info";

/// The cluster under test, on either backend.
enum Cluster {
    Local(Box<MmCluster>),
    Docker(Box<DockerCluster>),
}

impl Cluster {
    /// A local cluster, or `None` (the test skips, saying why) without
    /// PostgreSQL 15.
    async fn local(name: &str) -> Option<Cluster> {
        Cluster::local_with(name, Vec::new()).await
    }

    /// A local cluster with extra `postgresql.conf` settings.
    async fn local_with(name: &str, settings: Vec<(String, String)>) -> Option<Cluster> {
        pg_or_skip(name)?;
        find_mmd().expect("this test runs mmd: `cargo build --workspace --bins` first");
        let mut cfg = LocalClusterConfig::for_tests(name, 3);
        cfg.stop_on_signal = false;
        cfg.extra_settings = settings;
        let opts = MmOptions {
            extra_config: "[timeouts]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 1000\n"
                .into(),
            log: std::env::var("MM_LOG").unwrap_or(LOG.into()),
        };
        Some(Cluster::Local(Box::new(
            MmCluster::start(cfg, opts).await.expect("cluster starts"),
        )))
    }

    /// A Docker cluster of the image `scripts/build-image.sh` builds, or
    /// `None` (the test skips, saying why) without Docker or the image,
    /// unless `MM_REQUIRE_DOCKER=1`.
    async fn docker(name: &str) -> Option<Cluster> {
        let cfg = DockerClusterConfig::for_tests(3);
        if let Err(e) = docker::available(&cfg.image).await {
            if std::env::var("MM_REQUIRE_DOCKER").is_ok_and(|v| v == "1") {
                panic!("MM_REQUIRE_DOCKER=1 but Docker cannot run {name}: {e:#}");
            }
            eprintln!("SKIPPED {name}: {e:#} (set MM_REQUIRE_DOCKER=1 to make this a failure)");
            return None;
        }
        Some(Cluster::Docker(Box::new(
            DockerCluster::start(cfg).await.expect("cluster starts"),
        )))
    }

    /// Node `i`'s mmd (clients connect here).
    fn proxy(&self, i: usize) -> String {
        match self {
            Cluster::Local(c) => c.nodes[i].client_conninfo(c.dbname()),
            Cluster::Docker(c) => c.client_conninfo(i).unwrap(),
        }
    }

    /// Node `i`'s PostgreSQL, directly (for the checks).
    async fn direct(&self, i: usize) -> tokio_postgres::Client {
        match self {
            Cluster::Local(c) => c.pg.connect(i).await.unwrap(),
            Cluster::Docker(c) => c.connect_pg(i).await.unwrap(),
        }
    }

    async fn connect_proxy(&self, i: usize) -> tokio_postgres::Client {
        let (cl, conn) = tokio_postgres::connect(&self.proxy(i), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        cl
    }

    /// The whole of node `i` dies at once: `kill -9` of its PostgreSQL
    /// (its mmd stops itself), or `docker kill` of its container.
    async fn kill_node(&mut self, i: usize) {
        match self {
            Cluster::Local(c) => c.pg.kill9(i).unwrap(),
            Cluster::Docker(c) => c.kill(i).await.unwrap(),
        }
    }

    /// Node `i` starts again with its data, as a supervisor would.
    async fn start_node(&mut self, i: usize) {
        match self {
            Cluster::Local(c) => {
                c.pg.start_node(i).await.unwrap();
                c.stop_mmd(i); // the watchdog may not have stopped it yet
                c.start_mmd(i, LOG).unwrap();
            }
            Cluster::Docker(c) => c.start_node(i).await.unwrap(),
        }
    }

    async fn wait_online(&mut self, limit: Duration) {
        match self {
            Cluster::Local(c) => c.wait_online(limit).await,
            Cluster::Docker(c) => c.wait_online(limit).await,
        }
        .expect("every node online")
    }
}

/// Waits until `sql` (one bigint) reads the same on every node, directly.
async fn same_everywhere(c: &Cluster, sql: &str) -> i64 {
    same_on(c, &[0, 1, 2], sql).await
}

/// Waits until `sql` (one bigint) reads the same on `nodes`, directly.
async fn same_on(c: &Cluster, nodes: &[usize], sql: &str) -> i64 {
    let t = Instant::now();
    loop {
        let mut seen = Vec::new();
        for &i in nodes {
            let db = c.direct(i).await;
            seen.push(db.query_one(sql, &[]).await.unwrap().get::<_, i64>(0));
        }
        if seen.iter().all(|v| *v == seen[0]) {
            return seen[0];
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "nodes disagree on `{sql}`: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Errors a conflict may end a transaction with: serialization failure,
/// deadlock, lock timeout.
fn is_conflict(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code().map(|c| c.code()),
        Some("40001") | Some("40P01") | Some("55P03")
    )
}

/// Node 1 updates rows 1 then 2, node 2 rows 2 then 1, in a loop: every
/// transaction returns (commits or aborts with a conflict) within a bound,
/// some commit, and every node ends with both rows counting the commits.
async fn crossing_updates_on_two_nodes_return_within_a_bound(c: Cluster) {
    let n1 = c.connect_proxy(0).await;
    n1.batch_execute("create table acc(id int primary key, v bigint not null)")
        .await
        .unwrap();
    n1.execute("insert into acc values (1, 0), (2, 0)", &[])
        .await
        .unwrap();
    same_everywhere(&c, "select count(*) from acc").await;
    const BOUND: Duration = Duration::from_secs(15);
    let mut tasks = Vec::new();
    for (node, order) in [(0usize, [1, 2]), (1, [2, 1])] {
        let cl = c.connect_proxy(node).await;
        tasks.push(tokio::spawn(async move {
            let (mut commits, mut conflicts, mut slowest) = (0i64, 0, Duration::ZERO);
            for _ in 0..40 {
                let t = Instant::now();
                let r = tokio::time::timeout(BOUND, async {
                    let tx = format!(
                        "begin; update acc set v = v + 1 where id = {}; \
                         update acc set v = v + 1 where id = {}; commit",
                        order[0], order[1]
                    );
                    cl.batch_execute(&tx).await
                })
                .await
                .unwrap_or_else(|_| panic!("node {} hung past {BOUND:?}", node + 1));
                slowest = slowest.max(t.elapsed());
                match r {
                    Ok(()) => commits += 1,
                    Err(e) if is_conflict(&e) => {
                        conflicts += 1;
                        // The session is in an aborted transaction block.
                        let _ = cl.batch_execute("rollback").await;
                    }
                    Err(e) => panic!("node {}: unexpected error {e:?}", node + 1),
                }
            }
            (commits, conflicts, slowest)
        }));
    }
    let mut total = 0;
    for (node, t) in tasks.into_iter().enumerate() {
        let (commits, conflicts, slowest) = t.await.unwrap();
        eprintln!(
            "node {}: {commits} committed, {conflicts} aborted on a conflict, slowest {slowest:?}",
            node + 1
        );
        total += commits;
    }
    assert!(total > 0, "no crossing transaction committed");
    let v1 = same_everywhere(&c, "select v from acc where id = 1").await;
    let v2 = same_everywhere(&c, "select v from acc where id = 2").await;
    assert_eq!((v1, v2), (total, total), "each commit adds 1 to both rows");
    let prepared = same_everywhere(&c, "select count(*) from pg_prepared_xacts").await;
    assert_eq!(prepared, 0);
}

/// Every node upserts the same key for 10 s: the cluster keeps committing
/// (in every 2-second window), and the counter ends equal everywhere,
/// between the acknowledged upserts and those plus the ones whose outcome
/// is unknown.
async fn hot_key_upserts_keep_committing(c: Cluster) {
    let n1 = c.connect_proxy(0).await;
    n1.batch_execute("create table hot(k int primary key, n bigint not null)")
        .await
        .unwrap();
    same_everywhere(&c, "select count(*) from pg_tables where tablename = 'hot'").await;
    const RUN: Duration = Duration::from_secs(10);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for node in 0..3 {
        let cl = c.connect_proxy(node).await;
        tasks.push(tokio::spawn(async move {
            let (mut acked, mut unknown, mut conflicts) = (0i64, 0i64, 0);
            let mut windows = [0u32; 5];
            while t0.elapsed() < RUN {
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    cl.execute(
                        "insert into hot values (1, 1) on conflict (k) do update set n = hot.n + 1",
                        &[],
                    ),
                )
                .await;
                match r {
                    Ok(Ok(_)) => {
                        acked += 1;
                        let w = (t0.elapsed().as_secs() / 2) as usize;
                        if let Some(w) = windows.get_mut(w) {
                            *w += 1;
                        }
                    }
                    Ok(Err(e)) if is_conflict(&e) => conflicts += 1,
                    Ok(Err(e)) => panic!("node {}: unexpected error {e:?}", node + 1),
                    Err(_) => {
                        unknown += 1;
                        break;
                    }
                }
            }
            (acked, unknown, conflicts, windows)
        }));
    }
    let (mut acked, mut unknown) = (0, 0);
    let mut all_windows = [0u32; 5];
    for (node, t) in tasks.into_iter().enumerate() {
        let (a, u, conflicts, windows) = t.await.unwrap();
        eprintln!(
            "node {}: {a} upserts committed, {conflicts} aborted on a conflict, {u} unknown; \
             commits per 2 s: {windows:?}",
            node + 1
        );
        for (w, n) in windows.iter().enumerate() {
            all_windows[w] += n;
        }
        acked += a;
        unknown += u;
    }
    // Crossing upserts of one row abort both sides more often than not
    // (each waits for the other's lock until lock_timeout; see
    // docs/protocol.md), so the bound is on the cluster, not on each node.
    assert!(
        all_windows.iter().all(|w| *w > 0),
        "the cluster stopped committing upserts: commits per 2 s {all_windows:?}"
    );
    let n = same_everywhere(&c, "select coalesce(sum(n), 0)::bigint from hot").await;
    assert!(
        acked <= n && n <= acked + unknown,
        "counter {n}, acknowledged {acked}, unknown {unknown}"
    );
    let prepared = same_everywhere(&c, "select count(*) from pg_prepared_xacts").await;
    assert_eq!(prepared, 0);
}

/// The bank's accounts, created through node 1 and present everywhere.
async fn seed_bank(c: &Cluster, accounts: i32, initial: i64) {
    let n1 = c.connect_proxy(0).await;
    n1.batch_execute(BANK_SCHEMA).await.unwrap();
    n1.batch_execute(&bank_seed_sql(accounts, initial))
        .await
        .unwrap();
    same_everywhere(c, "select count(*) from mm_bank").await;
}

/// Transfers and `sum(balance)` readers on every node for 20 s; node 3 is
/// killed after 5 s and started again after 10 s. No reader
/// ever sees a wrong total, and every node ends with the same balances.
async fn bank_readers_see_the_total_while_a_node_is_killed(mut c: Cluster) {
    const ACCOUNTS: i32 = 20;
    const INITIAL: i64 = 1000;
    seed_bank(&c, ACCOUNTS, INITIAL).await;
    let proxies: Vec<String> = (0..3).map(|i| c.proxy(i)).collect();
    let cfg = BankConfig::new(proxies, ACCOUNTS, INITIAL);
    let expected = cfg.expected_total();
    let bank =
        tokio::spawn(async move { run_bank(&cfg, Stop::after(Duration::from_secs(20))).await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    c.kill_node(2).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    c.start_node(2).await;
    let report = bank.await.unwrap();
    eprintln!("{}", report.render());
    assert_eq!(report.readers.violations, 0, "a reader saw a wrong total");
    assert!(report.writers.committed > 0, "no transfer committed");
    c.wait_online(Duration::from_secs(60)).await;
    let total = same_everywhere(&c, "select sum(balance)::bigint from mm_bank").await;
    assert_eq!(total, expected);
    same_everywhere(
        &c,
        "select ('x' || substr(md5(string_agg(id || ':' || balance, ',' order by id)), 1, 15))::bit(60)::bigint from mm_bank",
    )
    .await;
}

/// Bank transfers through nodes 1 and 3 while node 4 is added (`mmctl
/// init` and `add-node`, a rolling restart of nodes 1–3 with the new
/// configuration, then its mmd: an initial copy of a donor's snapshot and
/// a catch-up) and node 2 is then dropped (stopped, out of the generation,
/// removed from every configuration with a rolling restart, `mmctl
/// drop-node`). Readers never see a wrong total, node 4 commits and ends
/// with the same balances as nodes 1 and 3, the generation is {1, 3, 4},
/// and no node keeps a slot for node 2.
async fn add_and_drop_a_node_under_load(mut c: Cluster) {
    const ACCOUNTS: i32 = 20;
    const INITIAL: i64 = 1000;
    const LIMIT: Duration = Duration::from_secs(180);
    seed_bank(&c, ACCOUNTS, INITIAL).await;
    let proxies: Vec<String> = [0, 2].iter().map(|&i| c.proxy(i)).collect();
    let cfg = BankConfig::new(proxies, ACCOUNTS, INITIAL);
    let expected = cfg.expected_total();
    let cancel = tokio_util::sync::CancellationToken::new();
    let stop = Stop::new(cancel.clone(), Duration::from_secs(900));
    let bank = tokio::spawn(async move { run_bank(&cfg, stop).await });
    tokio::time::sleep(Duration::from_secs(3)).await;

    let t = Instant::now();
    let i4 = match &mut c {
        Cluster::Local(mm) => mm.add_node(LIMIT).await,
        Cluster::Docker(d) => d.add_node(LIMIT).await,
    }
    .expect("node 4 joins");
    eprintln!(
        "node 4 added and online in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let log = match &c {
        Cluster::Local(mm) => std::fs::read_to_string(&mm.nodes[i4].log_path).unwrap(),
        Cluster::Docker(d) => d.logs(i4).await.unwrap(),
    };
    assert!(log.contains("resync done"), "node 4 copied no snapshot");
    // The cluster may still be settling after the last restart: retry
    // what the cluster says is safe to retry.
    let p4 = c.connect_proxy(i4).await;
    let t = Instant::now();
    loop {
        match p4
            .batch_execute(
                "begin; update mm_bank set balance = balance - 5 where id = 1; \
                 update mm_bank set balance = balance + 5 where id = 2; commit",
            )
            .await
        {
            Ok(()) => break,
            Err(e) if is_conflict(&e) && t.elapsed() < Duration::from_secs(20) => {
                let _ = p4.batch_execute("rollback").await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("node 4 commits no transfer: {e}"),
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let t = Instant::now();
    match &mut c {
        Cluster::Local(mm) => mm.drop_node(1, LIMIT).await,
        Cluster::Docker(d) => d.drop_node(1, LIMIT).await,
    }
    .expect("node 2 is dropped");
    eprintln!("node 2 dropped in {:.1} s", t.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(3)).await;
    cancel.cancel();
    let report = bank.await.unwrap();
    eprintln!("{}", report.render());
    assert_eq!(report.readers.violations, 0, "a reader saw a wrong total");
    assert!(report.writers.committed > 0, "no transfer committed");

    let rest = [0, 2, 3];
    let total = same_on(&c, &rest, "select sum(balance)::bigint from mm_bank").await;
    assert_eq!(total, expected);
    same_on(
        &c,
        &rest,
        "select ('x' || substr(md5(string_agg(id || ':' || balance, ',' order by id)), 1, 15))::bit(60)::bigint from mm_bank",
    )
    .await;
    assert_eq!(
        same_on(&c, &rest, "select count(*) from pg_prepared_xacts").await,
        0
    );
    let slots_for_2 = same_on(
        &c,
        &rest,
        "select count(*) from pg_replication_slots where slot_name = 'mm_slot_for_2'",
    )
    .await;
    assert_eq!(slots_for_2, 0, "a node keeps WAL for the dropped node");
    let members = c
        .direct(3)
        .await
        .query_one("select gen_members::text from mtm.status()", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    assert_eq!(members, "{1,3,4}");
}

/// Sized for four nodes from the start, as an operator would before adding
/// one (`mmctl add-node` refuses otherwise, naming the settings; the Docker
/// image is sized for five).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_add_and_drop_a_node_under_load() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let room = vec![
        ("max_replication_slots".to_string(), "16".to_string()),
        ("max_wal_senders".to_string(), "16".to_string()),
        ("max_prepared_transactions".to_string(), "400".to_string()),
    ];
    if let Some(c) = Cluster::local_with("local_add_and_drop_a_node", room).await {
        add_and_drop_a_node_under_load(c).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_add_and_drop_a_node_under_load() {
    let _serial = ONE_AT_A_TIME.lock().await;
    if let Some(c) = Cluster::docker("docker_add_and_drop_a_node").await {
        add_and_drop_a_node_under_load(c).await;
    }
}

/// One test per scenario and backend; one cluster at a time.
macro_rules! on_both_backends {
    ($($scenario:ident: $local:ident, $docker:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $local() {
            let _serial = ONE_AT_A_TIME.lock().await;
            if let Some(c) = Cluster::local(stringify!($local)).await {
                $scenario(c).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $docker() {
            let _serial = ONE_AT_A_TIME.lock().await;
            if let Some(c) = Cluster::docker(stringify!($docker)).await {
                $scenario(c).await;
            }
        }
    )*};
}

on_both_backends! {
    crossing_updates_on_two_nodes_return_within_a_bound: local_crossing_updates, docker_crossing_updates;
    hot_key_upserts_keep_committing: local_hot_key_upserts, docker_hot_key_upserts;
    bank_readers_see_the_total_while_a_node_is_killed: local_bank_readers_under_a_kill, docker_bank_readers_under_a_kill;
}
