//! Three drivers over the real TCP mesh on loopback, with in-memory
//! databases: a commit reaches every node, the majority continues when a
//! node stops, and the node rejoins and catches up when it returns.

use mm_core::{ClientId, NodeId, NodeSet, NodeStatus, Outcome};
use mm_runtime::driver::{Driver, DriverHandle};
use mm_runtime::mesh::{Mesh, MeshConfig};
use mm_runtime::storage::MemCluster;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::task::JoinHandle;

const N: usize = 3;

fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let ls: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// Short timeouts so the test runs in seconds of real time.
fn core_config(id: NodeId) -> mm_core::Config {
    mm_core::Config::new(id, N).with_fast_timeouts()
}

async fn start(
    id: NodeId,
    addrs: &[SocketAddr],
    cluster: &MemCluster,
) -> (DriverHandle, JoinHandle<()>) {
    let peers: BTreeMap<NodeId, SocketAddr> = (1..=N as NodeId)
        .filter(|&p| p != id)
        .map(|p| (p, addrs[p as usize - 1]))
        .collect();
    let cfg = MeshConfig {
        cluster_id: "driver-test".into(),
        node_id: id,
        listen: addrs[id as usize - 1],
        peers,
        secret: b"test secret".to_vec(),
    };
    let (mesh, inbox) = Mesh::start(cfg).await.expect("mesh starts");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let storage = cluster.storage(id, tx.clone());
    let (driver, handle) = Driver::start(core_config(id), storage, mesh, inbox, (tx, rx))
        .await
        .expect("driver starts");
    let join = tokio::spawn(async move {
        driver.run().await.expect("driver runs");
    });
    (handle, join)
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Online in `members`, with a live link to and a heartbeat from every other
/// member: a node may be online on a majority while its link to the last
/// member is still connecting, and a commit sent then cannot reach that
/// member and aborts with VoteTimeout (seen in CI).
async fn online_in(h: &DriverHandle, members: NodeSet) -> bool {
    h.status().await.is_some_and(|s| {
        let mut others = members;
        others.remove(s.node_id);
        s.status == NodeStatus::Online
            && s.generation.members == members
            && others
                .iter()
                .all(|p| s.links.contains(p) && s.connected.contains(p))
    })
}

type Running = Vec<(DriverHandle, JoinHandle<()>)>;

/// N drivers on loopback, each online with links to all the others.
async fn start_cluster() -> (Vec<SocketAddr>, MemCluster, Running) {
    let addrs = free_addrs(N);
    let cluster = MemCluster::new(N);
    let mut nodes = Vec::new();
    for id in 1..=N as NodeId {
        nodes.push(start(id, &addrs, &cluster).await);
    }
    let all = NodeSet::first_n(N);
    for (h, _) in &nodes {
        wait_for("every node online", async || online_in(h, all).await).await;
    }
    (addrs, cluster, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_failover_and_rejoin_over_tcp() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (addrs, cluster, mut nodes) = start_cluster().await;
    let all = NodeSet::first_n(N);

    assert_eq!(
        nodes[0].0.commit(ClientId(1), true).await,
        Some(Outcome::Committed)
    );
    wait_for("the commit on every node", async || {
        (1..=3).all(|i| cluster.db(i).committed.len() == 1)
    })
    .await;

    // Node 3 stops: nodes 1 and 2 form a generation of their own and commit.
    let (h3, j3) = nodes.pop().unwrap();
    h3.shutdown().await;
    j3.await.unwrap();
    cluster.detach(3);
    let majority: NodeSet = [1, 2].into_iter().collect();
    for (h, _) in &nodes {
        wait_for("a generation without node 3", async || {
            online_in(h, majority).await
        })
        .await;
    }
    assert_eq!(
        nodes[1].0.commit(ClientId(2), true).await,
        Some(Outcome::Committed)
    );
    assert_eq!(
        cluster.db(3).committed.len(),
        1,
        "node 3 is down and misses the second commit"
    );

    // Node 3 returns with its durable state, catches up and is let back in.
    nodes.push(start(3, &addrs, &cluster).await);
    for (h, _) in &nodes {
        wait_for("node 3 back in the generation", async || {
            online_in(h, all).await
        })
        .await;
    }
    assert_eq!(cluster.db(3).committed.len(), 2, "node 3 caught up");
    assert_eq!(
        nodes[2].0.commit(ClientId(3), true).await,
        Some(Outcome::Committed)
    );
    wait_for("the third commit everywhere", async || {
        (1..=3).all(|i| cluster.db(i).committed.len() == 3)
    })
    .await;

    for (h, j) in nodes {
        h.shutdown().await;
        j.await.unwrap();
    }
}

/// `DriverHandle::silence`, what a member that needs a resync uses: the
/// others vote it out while it still hears them (so it sees it is out, in
/// `catchup`), and it is let back in once it speaks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silenced_node_is_voted_out_and_rejoins_when_it_speaks_again() {
    let (_, cluster, nodes) = start_cluster().await;
    let all = NodeSet::first_n(N);

    nodes[2].0.silence(true).await;
    let majority: NodeSet = [1, 2].into_iter().collect();
    for (h, _) in &nodes[..2] {
        wait_for("a generation without node 3", async || {
            online_in(h, majority).await
        })
        .await;
    }
    wait_for("node 3 out, in catchup", async || {
        nodes[2]
            .0
            .status()
            .await
            .is_some_and(|s| s.status == NodeStatus::Catchup)
    })
    .await;
    assert_eq!(
        nodes[0].0.commit(ClientId(1), true).await,
        Some(Outcome::Committed)
    );

    nodes[2].0.silence(false).await;
    for (h, _) in &nodes {
        wait_for("node 3 back in the generation", async || {
            online_in(h, all).await
        })
        .await;
    }
    wait_for("node 3 caught up", async || {
        cluster.db(3).committed.len() == 1
    })
    .await;
    for (h, j) in nodes {
        h.shutdown().await;
        j.await.unwrap();
    }
}

/// A decided outcome is a lazy record (`Output::Record`): no persist of its
/// own on the commit's path, but it reaches storage on the driver's timer
/// even when no later persist batch comes to carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_decision_records_reach_storage_without_more_traffic() {
    let (_addrs, cluster, nodes) = start_cluster().await;
    assert_eq!(
        nodes[0].0.commit(ClientId(1), true).await,
        Some(Outcome::Committed)
    );
    let decided_everywhere = || {
        (1..=N as NodeId).all(|i| {
            cluster.db(i).durable.is_some_and(|d| {
                d.txs.len() == 1 && d.txs.values().all(|r| r.decided == Some(true))
            })
        })
    };
    wait_for("every node's decided record in storage", async || {
        decided_everywhere()
    })
    .await;
    for (h, j) in nodes {
        h.shutdown().await;
        j.await.unwrap();
    }
}
