//! The Docker backend end to end: a 3-node mm cluster in containers of the
//! image `mm-node:dev` (`scripts/build-image.sh`), written through the mmd
//! proxies and checked on each node's PostgreSQL directly, under SIGKILL and
//! restart of a node, a cut link, and a paused node.
//!
//! Skips (passes with a message) when Docker or the image is unavailable,
//! unless `MM_REQUIRE_DOCKER=1`, which turns that into a failure:
//!
//!     MM_REQUIRE_DOCKER=1 cargo test -p mm-harness --test docker_backend -- --nocapture

use anyhow::{anyhow, bail, Context, Result};
use mm_harness::backend::docker::{self, DockerCluster, DockerClusterConfig};
use std::time::{Duration, Instant};

/// The tests share the machine's cores: one cluster at a time.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a write may keep failing with a retryable error around a fault.
const WRITE_BOUND: Duration = Duration::from_secs(20);

/// `Ok(Some(config))` to run, `Ok(None)` to skip, `Err` when Docker is
/// required but missing.
async fn docker_or_skip(test: &str) -> Result<Option<DockerClusterConfig>> {
    let cfg = DockerClusterConfig::for_tests(3);
    match docker::available(&cfg.image).await {
        Ok(()) => Ok(Some(cfg)),
        Err(e) if std::env::var("MM_REQUIRE_DOCKER").is_ok_and(|v| v == "1") => {
            Err(e.context("MM_REQUIRE_DOCKER=1 but Docker cannot run the test"))
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: {e:#} (set MM_REQUIRE_DOCKER=1 to make this a failure)");
            Ok(None)
        }
    }
}

/// Whether an error is one a client is told to retry: the node refuses work
/// (57P03), the cluster aborted the transaction (40001), or the connection
/// broke or hung (a node going away mid-statement).
fn retryable(e: &anyhow::Error) -> bool {
    for cause in e.chain() {
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            return match pg.code() {
                Some(code) => matches!(code.code(), "57P03" | "40001" | "08006" | "57P01"),
                None => true, // I/O error, closed connection
            };
        }
    }
    // Timeouts and connection failures of our own.
    true
}

/// Runs `sql` (one write transaction) through node `i`'s mmd, retrying
/// retryable errors until `bound`; returns how long it took. A unique
/// violation on a retry means an earlier, unacknowledged attempt committed.
async fn write(cluster: &DockerCluster, i: usize, sql: &str, bound: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let attempt = async {
            let c = cluster.connect_proxy(i).await?;
            c.batch_execute(sql).await.map_err(anyhow::Error::from)
        };
        let err = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(())) => return Ok(t0.elapsed()),
            Ok(Err(e)) => e,
            Err(_) => anyhow!("the statement took over 10 s"),
        };
        let unique_violation = err.chain().any(|c| {
            c.downcast_ref::<tokio_postgres::Error>()
                .and_then(|e| e.code())
                .is_some_and(|c| c.code() == "23505")
        });
        if unique_violation && attempts > 1 {
            return Ok(t0.elapsed());
        }
        if !retryable(&err) {
            return Err(err.context(format!("writing through node {}: {sql}", i + 1)));
        }
        if t0.elapsed() > bound {
            return Err(err.context(format!(
                "writing through node {} still fails after {:?} ({attempts} attempts): {sql}",
                i + 1,
                t0.elapsed()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A commit is acknowledged once its origin committed; the peers run their
/// COMMIT PREPARED moments later. Wait (bounded) until node `i` has `t`.
async fn wait_table(cluster: &DockerCluster, i: usize) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let c = cluster.connect_pg(i).await?;
        let r = c
            .query_one("select to_regclass('t') is not null", &[])
            .await?;
        if r.get::<_, bool>(0) {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(anyhow!(
                "node {} has no table t 10 s after it committed",
                i + 1
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ids in `t` on node `i`'s PostgreSQL (read directly, not through mmd).
async fn ids_on(cluster: &DockerCluster, i: usize) -> Result<Vec<i32>> {
    let c = cluster.connect_pg(i).await?;
    let rows = c.query("select id from t order by id", &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Waits until node `i` holds exactly `want` (peers apply commits a moment
/// after the coordinator acknowledges them).
async fn wait_rows(cluster: &DockerCluster, i: usize, want: &[i32], limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let got = ids_on(cluster, i).await;
        if let Ok(ids) = &got {
            if ids == want {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "node {} does not hold the expected rows after {limit:?}: want {want:?}, got {got:?}",
                i + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn start(cfg: DockerClusterConfig) -> Result<DockerCluster> {
    let t0 = Instant::now();
    let cluster = DockerCluster::start(cfg).await?;
    eprintln!(
        "cluster {} ({} nodes, subnet {}) online in {:.1?}",
        cluster.name,
        cluster.len(),
        cluster.subnet,
        t0.elapsed()
    );
    Ok(cluster)
}

/// Prints the last log lines of every node, to make a failure readable.
async fn report<T>(cluster: &DockerCluster, r: Result<T>) -> Result<T> {
    if r.is_err() {
        for i in 0..cluster.len() {
            eprintln!(
                "---- node {} log ----\n{}",
                i + 1,
                cluster.logs_tail(i, 40).await
            );
        }
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_anywhere_then_kill_and_restart_a_node() -> Result<()> {
    let Some(cfg) = docker_or_skip("write_anywhere_then_kill_and_restart_a_node").await? else {
        return Ok(());
    };
    let _one = ONE_CLUSTER.lock().await;
    let mut cluster = start(cfg).await?;
    let r = kill_and_restart(&mut cluster).await;
    report(&cluster, r).await
}

async fn kill_and_restart(cluster: &mut DockerCluster) -> Result<()> {
    let t = write(
        cluster,
        0,
        "create table t (id int primary key, via int not null)",
        WRITE_BOUND,
    )
    .await?;
    eprintln!("create table through node 1: {t:.1?}");
    wait_table(cluster, 1).await?;
    for id in 1..=10 {
        write(
            cluster,
            1,
            &format!("insert into t values ({id}, 2)"),
            WRITE_BOUND,
        )
        .await?;
    }
    let mut want: Vec<i32> = (1..=10).collect();
    wait_rows(cluster, 2, &want, Duration::from_secs(10))
        .await
        .context("rows written through node 2, read on node 3's PostgreSQL")?;
    eprintln!("10 rows inserted through node 2 are on node 3");

    let t0 = Instant::now();
    cluster.kill(2).await?;
    eprintln!("node 3 killed (docker kill) in {:.1?}", t0.elapsed());
    let t = write(cluster, 0, "insert into t values (11, 1)", WRITE_BOUND)
        .await
        .context("a write through node 1 with node 3 dead")?;
    eprintln!("first write through node 1 after the kill committed in {t:.1?}");
    for id in 12..=20 {
        write(
            cluster,
            id as usize % 2,
            &format!("insert into t values ({id}, {})", id % 2 + 1),
            WRITE_BOUND,
        )
        .await?;
    }
    want.extend(11..=20);
    wait_rows(cluster, 0, &want, Duration::from_secs(10)).await?;
    wait_rows(cluster, 1, &want, Duration::from_secs(10)).await?;

    let t0 = Instant::now();
    cluster.start_node(2).await?;
    cluster
        .wait_online(Duration::from_secs(120))
        .await
        .context("node 3 after docker start")?;
    eprintln!("node 3 restarted and online in {:.1?}", t0.elapsed());
    wait_rows(cluster, 2, &want, Duration::from_secs(30))
        .await
        .context("node 3 caught up after its restart")?;
    eprintln!("node 3 holds all 20 rows after catching up");

    // And it takes writes again.
    write(cluster, 2, "insert into t values (21, 3)", WRITE_BOUND).await?;
    want.push(21);
    for i in 0..3 {
        wait_rows(cluster, i, &want, Duration::from_secs(10)).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn majority_keeps_committing_across_a_cut_link_and_a_paused_node() -> Result<()> {
    let test = "majority_keeps_committing_across_a_cut_link_and_a_paused_node";
    let Some(cfg) = docker_or_skip(test).await? else {
        return Ok(());
    };
    let _one = ONE_CLUSTER.lock().await;
    let mut cluster = start(cfg).await?;
    let r = cut_and_pause(&mut cluster).await;
    report(&cluster, r).await
}

async fn cut_and_pause(cluster: &mut DockerCluster) -> Result<()> {
    write(
        cluster,
        0,
        "create table t (id int primary key, via int not null)",
        WRITE_BOUND,
    )
    .await?;
    write(cluster, 0, "insert into t values (1, 1)", WRITE_BOUND).await?;
    let mut want = vec![1];

    // Nodes 1 and 3 lose each other; node 2 still sees both, so some
    // majority containing node 2 goes on.
    cluster.cut_link(0, 2).await?;
    eprintln!("link 1-3 cut");
    let t = write(cluster, 1, "insert into t values (2, 2)", WRITE_BOUND)
        .await
        .context("a write through node 2 with the link 1-3 cut")?;
    eprintln!("write through node 2 with the link 1-3 cut committed in {t:.1?}");
    for id in 3..=6 {
        write(
            cluster,
            1,
            &format!("insert into t values ({id}, 2)"),
            WRITE_BOUND,
        )
        .await?;
    }
    want.extend(2..=6);
    wait_rows(cluster, 1, &want, Duration::from_secs(10)).await?;

    let t0 = Instant::now();
    cluster.heal_link(0, 2).await?;
    cluster
        .wait_online(Duration::from_secs(120))
        .await
        .context("all nodes after healing the link 1-3")?;
    eprintln!("link 1-3 healed, all nodes online in {:.1?}", t0.elapsed());
    for i in 0..3 {
        wait_rows(cluster, i, &want, Duration::from_secs(30)).await?;
    }

    // Node 3 frozen: nodes 1 and 2 go on without it.
    cluster.pause(2).await?;
    eprintln!("node 3 paused");
    let t = write(cluster, 0, "insert into t values (7, 1)", WRITE_BOUND)
        .await
        .context("a write through node 1 with node 3 paused")?;
    eprintln!("write through node 1 with node 3 paused committed in {t:.1?}");
    for id in 8..=10 {
        write(
            cluster,
            1,
            &format!("insert into t values ({id}, 2)"),
            WRITE_BOUND,
        )
        .await?;
    }
    want.extend(7..=10);
    wait_rows(cluster, 0, &want, Duration::from_secs(10)).await?;

    let t0 = Instant::now();
    cluster.unpause(2).await?;
    cluster
        .wait_online(Duration::from_secs(120))
        .await
        .context("all nodes after unpausing node 3")?;
    eprintln!("node 3 unpaused, all nodes online in {:.1?}", t0.elapsed());
    for i in 0..3 {
        wait_rows(cluster, i, &want, Duration::from_secs(30)).await?;
    }
    eprintln!("all three nodes hold the same {} rows", want.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_stop_and_network_disconnect() -> Result<()> {
    let Some(cfg) = docker_or_skip("clean_stop_and_network_disconnect").await? else {
        return Ok(());
    };
    let _one = ONE_CLUSTER.lock().await;
    let mut cluster = start(cfg).await?;
    let r = stop_and_disconnect(&mut cluster).await;
    report(&cluster, r).await
}

async fn stop_and_disconnect(cluster: &mut DockerCluster) -> Result<()> {
    write(
        cluster,
        0,
        "create table t (id int primary key, via int not null)",
        WRITE_BOUND,
    )
    .await?;
    let mut want = Vec::new();

    // docker stop (SIGTERM: mmd, then PostgreSQL -m fast) and start.
    cluster.stop_node(1).await?;
    eprintln!("node 2 stopped (docker stop)");
    let t = write(cluster, 0, "insert into t values (1, 1)", WRITE_BOUND)
        .await
        .context("a write through node 1 with node 2 stopped")?;
    eprintln!("write through node 1 with node 2 stopped committed in {t:.1?}");
    want.push(1);
    let t0 = Instant::now();
    cluster.start_node(1).await?;
    cluster
        .wait_online(Duration::from_secs(120))
        .await
        .context("node 2 after docker start")?;
    eprintln!(
        "node 2 started and all nodes online in {:.1?}",
        t0.elapsed()
    );

    // Node 3 off the network.
    cluster.disconnect(2).await?;
    eprintln!("node 3 disconnected from the network");
    let t = write(cluster, 1, "insert into t values (2, 2)", WRITE_BOUND)
        .await
        .context("a write through node 2 with node 3 disconnected")?;
    eprintln!("write through node 2 with node 3 disconnected committed in {t:.1?}");
    want.push(2);
    let t0 = Instant::now();
    cluster.reconnect(2).await?;
    cluster
        .wait_online(Duration::from_secs(120))
        .await
        .context("node 3 after reconnecting it")?;
    eprintln!(
        "node 3 reconnected and all nodes online in {:.1?}",
        t0.elapsed()
    );

    let logs = cluster.logs(2).await?;
    if !logs.contains("starting mmd") {
        bail!("node 3's log does not show mmd starting:\n{logs}");
    }
    for i in 0..3 {
        wait_rows(cluster, i, &want, Duration::from_secs(30)).await?;
    }
    eprintln!("all three nodes hold the same {} rows", want.len());
    Ok(())
}
