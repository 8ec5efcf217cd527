//! An mm cluster in Docker: one container per node from the image `mm-node:dev`
//! (`scripts/build-image.sh`; PostgreSQL 15 and `mmd` beside it, see
//! `docker/entrypoint.sh`), on a private bridge network created for the
//! cluster, with faults Docker can inject: SIGKILL, stop/start, pause,
//! disconnection from the network, and links cut with iptables.
//!
//! Layout of a cluster named `mm-<pid>-<n>`:
//! ```text
//! network  mm-<pid>-<n>       bridge, subnet 172.29.<k>.0/24 (first free k)
//! node i   mm-<pid>-<n>-n<i>  address 172.29.<k>.<10+i>, fixed across restarts
//!          5432 PostgreSQL  -> 127.0.0.1:<random> on the host
//!          6432 mmd proxy   -> 127.0.0.1:<random> on the host
//!          7100 mesh (inside the network only)
//! ```
//! Each node's TOML config (listing every node by its fixed address) goes in
//! through the environment (`MM_CONFIG_TOML`); the entrypoint runs initdb,
//! `mmctl init` (it only touches the local PostgreSQL, so each node does it
//! at its first start) and then `mmd`. The data directory lives in the
//! container's filesystem: `kill`/`stop` and then `start` bring a node back
//! with its data. Host ports are chosen once per node and published again
//! on every start, so clients' connection strings stay valid; the mappings
//! are still read back after every start and reconnect.
//!
//! Dropping the cluster removes its containers and network (set
//! `MM_DOCKER_KEEP=1` to keep them for a post-mortem). After an abort (Ctrl-C)
//! they stay: `docker rm -f $(docker ps -aq --filter label=mm.harness)` and
//! `docker network prune --filter label=mm.harness` remove them.

mod cli;

pub use cli::DockerCli;

use anyhow::{anyhow, bail, Context, Result};
use mm_runtime::config::NodeConfig;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The image `scripts/build-image.sh` builds (override: `$MM_DOCKER_IMAGE`).
pub const DEFAULT_IMAGE: &str = "mm-node:dev";
/// Ports inside every container.
pub const PG_PORT: u16 = 5432;
pub const CLIENT_PORT: u16 = 6432;
pub const MESH_PORT: u16 = 7100;
/// Label on everything the harness creates in Docker.
const LABEL: &str = "mm.harness";

/// How to build a Docker cluster.
#[derive(Debug, Clone)]
pub struct DockerClusterConfig {
    pub nodes: usize,
    pub image: String,
    /// `fsync = off` in every PostgreSQL (tests); durable when true.
    pub fsync: bool,
    /// `[timeouts]` / `[data_plane]` lines appended to every node's config.
    pub extra_config: String,
    /// `RUST_LOG` of every mmd (default: `$MM_LOG`, else `info`).
    pub log: String,
    /// How long [`DockerCluster::start`] waits for every node to be online.
    pub online_timeout: Duration,
}

impl DockerClusterConfig {
    /// `nodes` nodes of `$MM_DOCKER_IMAGE` (default `mm-node:dev`), fsync off.
    pub fn for_tests(nodes: usize) -> Self {
        DockerClusterConfig {
            nodes,
            image: std::env::var("MM_DOCKER_IMAGE").unwrap_or_else(|_| DEFAULT_IMAGE.into()),
            fsync: false,
            extra_config: String::new(),
            log: std::env::var("MM_LOG").unwrap_or_else(|_| "info".into()),
            online_timeout: Duration::from_secs(120),
        }
    }
}

/// One node (container) of the cluster.
#[derive(Debug, Clone)]
pub struct DockerNode {
    /// 1-based.
    pub id: usize,
    pub container: String,
    /// Fixed address on the cluster network.
    pub ip: Ipv4Addr,
    /// Host ports (on 127.0.0.1) of PostgreSQL and of the mmd proxy, as of
    /// the last (re)start; `None` while the node is down or disconnected.
    pub pg_host_port: Option<u16>,
    pub client_host_port: Option<u16>,
    /// The host ports it is published on, chosen once: clients keep their
    /// connection strings across a restart.
    pinned: (u16, u16),
    /// Removed from the cluster ([`DockerCluster::drop_node`]).
    pub dropped: bool,
}

/// A node's view of the cluster, from `mtm.status()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub status: String,
    pub number: i64,
    pub members: i64,
    pub members_online: i64,
}

/// A running cluster; dropping it removes the containers and the network.
pub struct DockerCluster {
    pub name: String,
    pub network: String,
    pub subnet: String,
    nodes: Vec<DockerNode>,
    docker: DockerCli,
    /// Links cut with [`cut_link`](Self::cut_link), as (i, j) with i < j.
    cut: Vec<(usize, usize)>,
    keep: bool,
    cfg: DockerClusterConfig,
}

/// Why Docker tests cannot run here (no CLI, no daemon, no image), or `Ok`.
pub async fn available(image: &str) -> Result<()> {
    let docker = DockerCli::default();
    docker.check_daemon().await?;
    if !docker.image_exists(image).await? {
        bail!("the image {image} does not exist: build it with scripts/build-image.sh");
    }
    Ok(())
}

impl DockerCluster {
    /// Creates the network and the containers, and waits until every node
    /// is online. On failure, whatever was created is removed again.
    pub async fn start(cfg: DockerClusterConfig) -> Result<DockerCluster> {
        let max = mm_runtime::config::MAX_CLUSTER_SIZE;
        if cfg.nodes == 0 || cfg.nodes > max || cfg.nodes > 200 {
            bail!("a Docker cluster needs 1 to {max} nodes, not {}", cfg.nodes);
        }
        let docker = DockerCli::default();
        docker.check_daemon().await?;
        if !docker.image_exists(&cfg.image).await? {
            bail!(
                "the image {} does not exist: build it with scripts/build-image.sh",
                cfg.image
            );
        }
        let name = unique_name();
        let (subnet, prefix) = create_network(&docker, &name).await?;
        let mut cluster = DockerCluster {
            network: name.clone(),
            subnet,
            nodes: (1..=cfg.nodes)
                .map(|id| DockerNode {
                    id,
                    container: format!("{name}-n{id}"),
                    ip: Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 10 + id as u8),
                    pg_host_port: None,
                    client_host_port: None,
                    pinned: (0, 0),
                    dropped: false,
                })
                .collect(),
            name,
            docker,
            cut: Vec::new(),
            keep: std::env::var("MM_DOCKER_KEEP").is_ok_and(|v| v == "1"),
            cfg: cfg.clone(),
        };
        // From here on, Drop cleans up if anything fails.
        for i in 0..cfg.nodes {
            cluster.nodes[i].pinned = (
                crate::mm_cluster::free_port()?,
                crate::mm_cluster::free_port()?,
            );
            let toml = cluster.node_config(i, &cfg.extra_config)?;
            cluster.run_container(i, &cfg, &toml, &[]).await?;
        }
        for i in 0..cfg.nodes {
            cluster.refresh_ports(i).await?;
        }
        cluster.wait_online(cfg.online_timeout).await?;
        Ok(cluster)
    }

    pub fn nodes(&self) -> &[DockerNode] {
        &self.nodes
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Connection string of node `i`'s mmd (the proxy) from the host (0-based).
    pub fn client_conninfo(&self, i: usize) -> Result<String> {
        let node = self.node(i)?;
        let port = node.client_host_port.ok_or_else(|| {
            anyhow!(
                "node {} has no published proxy port (down or disconnected)",
                node.id
            )
        })?;
        Ok(conninfo(port))
    }

    /// Connection string of node `i`'s PostgreSQL from the host, for checks.
    pub fn pg_conninfo(&self, i: usize) -> Result<String> {
        let node = self.node(i)?;
        let port = node.pg_host_port.ok_or_else(|| {
            anyhow!(
                "node {} has no published PostgreSQL port (down or disconnected)",
                node.id
            )
        })?;
        Ok(conninfo(port))
    }

    /// Connects to node `i`'s PostgreSQL directly.
    pub async fn connect_pg(&self, i: usize) -> Result<tokio_postgres::Client> {
        connect(&self.pg_conninfo(i)?, self.nodes[i].id, "PostgreSQL").await
    }

    /// Connects to node `i` through its mmd.
    pub async fn connect_proxy(&self, i: usize) -> Result<tokio_postgres::Client> {
        connect(&self.client_conninfo(i)?, self.nodes[i].id, "mmd").await
    }

    /// Node `i`'s status as its mmd last published it (`mtm.status()`).
    pub async fn status(&self, i: usize) -> Result<String> {
        let c = tokio::time::timeout(Duration::from_secs(5), self.connect_pg(i))
            .await
            .map_err(|_| anyhow!("node {}: connecting took over 5 s", i + 1))??;
        let row = tokio::time::timeout(
            Duration::from_secs(5),
            c.query_opt("select status from mtm.status()", &[]),
        )
        .await
        .map_err(|_| anyhow!("node {}: mtm.status() took over 5 s", i + 1))??;
        Ok(row
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|| "unknown".into()))
    }

    /// Waits until every node reports `online` in one generation whose
    /// members are all online and include every node (a node can report
    /// `online` a moment before the generation that includes it is adopted);
    /// fails early, with its log, when a container exits.
    pub async fn wait_online(&mut self, limit: Duration) -> Result<()> {
        let n = self.nodes.iter().filter(|n| !n.dropped).count() as i64;
        let deadline = Instant::now() + limit;
        loop {
            let mut waiting = Vec::new();
            let mut gens = Vec::new();
            for i in 0..self.nodes.len() {
                if self.nodes[i].dropped {
                    continue;
                }
                if !self.is_running(i).await? {
                    bail!(
                        "container {} is not running; its last log lines:\n{}",
                        self.nodes[i].container,
                        self.logs_tail(i, 30).await
                    );
                }
                if self.nodes[i].pg_host_port.is_none() {
                    self.refresh_ports(i).await?;
                }
                match self.generation(i).await {
                    Ok(g) if g.status == "online" && g.members == n && g.members_online == n => {
                        gens.push(g.number)
                    }
                    Ok(g) => waiting.push(format!(
                        "node {}: {} in generation {} ({} of {} members online)",
                        i + 1,
                        g.status,
                        g.number,
                        g.members_online,
                        g.members
                    )),
                    Err(e) => waiting.push(format!("node {}: {e:#}", i + 1)),
                }
            }
            if waiting.is_empty() && gens.windows(2).all(|w| w[0] == w[1]) {
                return Ok(());
            }
            if waiting.is_empty() {
                waiting.push(format!("generations differ: {gens:?}"));
            }
            if Instant::now() > deadline {
                bail!("not online within {limit:?}: {}", waiting.join("; "));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Node `i`'s status and generation as its mmd last published them.
    pub async fn generation(&self, i: usize) -> Result<Generation> {
        let q = "select status, gen_num, coalesce(cardinality(gen_members), 0), \
                 coalesce(cardinality(gen_members_online), 0) from mtm.status()";
        let c = tokio::time::timeout(Duration::from_secs(5), self.connect_pg(i))
            .await
            .map_err(|_| anyhow!("node {}: connecting took over 5 s", i + 1))??;
        let row = tokio::time::timeout(Duration::from_secs(5), c.query_opt(q, &[]))
            .await
            .map_err(|_| anyhow!("node {}: mtm.status() took over 5 s", i + 1))??
            .ok_or_else(|| anyhow!("node {}: mmd has not reported yet", i + 1))?;
        Ok(Generation {
            status: row.try_get(0)?,
            number: row.try_get(1)?,
            members: i64::from(row.try_get::<_, i32>(2)?),
            members_online: i64::from(row.try_get::<_, i32>(3)?),
        })
    }

    // ---- faults ------------------------------------------------------------

    /// SIGKILL to every process of node `i` (`docker kill`).
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        let c = self.node(i)?.container.clone();
        self.docker.run(&["kill", &c]).await?;
        self.mark_down(i);
        Ok(())
    }

    /// Clean stop of node `i` (`docker stop`: SIGTERM, mmd then PostgreSQL stop).
    pub async fn stop_node(&mut self, i: usize) -> Result<()> {
        let c = self.node(i)?.container.clone();
        self.docker.run(&["stop", "-t", "20", &c]).await?;
        self.mark_down(i);
        Ok(())
    }

    /// Starts node `i` again after [`kill`](Self::kill) or [`stop_node`](Self::stop_node),
    /// with its data, and reads its (possibly new) host ports. Links cut
    /// before stay cut: the iptables rules are put back.
    pub async fn start_node(&mut self, i: usize) -> Result<()> {
        let c = self.node(i)?.container.clone();
        self.docker.run(&["start", &c]).await?;
        self.refresh_ports(i).await?;
        let cut: Vec<(usize, usize)> = self.cut.clone();
        for (a, b) in cut {
            if a == i || b == i {
                let (me, peer) = if a == i { (a, b) } else { (b, a) };
                self.iptables_drop(me, peer, true).await?;
            }
        }
        Ok(())
    }

    /// Freezes every process of node `i` (`docker pause`, the cgroup freezer).
    pub async fn pause(&mut self, i: usize) -> Result<()> {
        let c = self.node(i)?.container.clone();
        self.docker.run(&["pause", &c]).await.map(|_| ())
    }

    pub async fn unpause(&mut self, i: usize) -> Result<()> {
        let c = self.node(i)?.container.clone();
        self.docker.run(&["unpause", &c]).await.map(|_| ())
    }

    /// Takes node `i` off the cluster network: it reaches no peer, and the
    /// host cannot reach it either (its published ports go with the network).
    pub async fn disconnect(&mut self, i: usize) -> Result<()> {
        let c = self.node(i)?.container.clone();
        self.docker
            .run(&["network", "disconnect", &self.network, &c])
            .await?;
        self.mark_down(i);
        Ok(())
    }

    /// Puts node `i` back on the network at its address.
    pub async fn reconnect(&mut self, i: usize) -> Result<()> {
        let node = self.node(i)?.clone();
        let ip = node.ip.to_string();
        self.docker
            .run(&[
                "network",
                "connect",
                "--ip",
                &ip,
                &self.network,
                &node.container,
            ])
            .await?;
        self.refresh_ports(i).await
    }

    /// Cuts the link between nodes `i` and `j` (0-based) in both directions:
    /// each drops every packet from and to the other (iptables in both
    /// containers). Both must be running.
    pub async fn cut_link(&mut self, i: usize, j: usize) -> Result<()> {
        let key = self.link_key(i, j)?;
        self.iptables_drop(i, j, true).await?;
        self.iptables_drop(j, i, true).await?;
        if !self.cut.contains(&key) {
            self.cut.push(key);
        }
        Ok(())
    }

    /// Undoes [`cut_link`](Self::cut_link).
    pub async fn heal_link(&mut self, i: usize, j: usize) -> Result<()> {
        let key = self.link_key(i, j)?;
        self.iptables_drop(i, j, false).await?;
        self.iptables_drop(j, i, false).await?;
        self.cut.retain(|&k| k != key);
        Ok(())
    }

    /// Node `i`'s container log (the entrypoint's and mmd's output).
    pub async fn logs(&self, i: usize) -> Result<String> {
        let node = self.node(i)?;
        let out = self.docker.output(&["logs", &node.container]).await?;
        if !out.ok {
            bail!("docker logs {}: {}", node.container, out.stderr.trim());
        }
        // docker logs replays the container's stdout and stderr on ours.
        Ok(format!("{}{}", out.stdout, out.stderr))
    }

    /// Wait until node `i`'s log holds `needle`; an error with its last
    /// lines if its container stops first or `limit` passes.
    async fn wait_for_log(&self, i: usize, needle: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.logs(i).await.is_ok_and(|l| l.contains(needle)) {
                return Ok(());
            }
            if !self.is_running(i).await.unwrap_or(false) || Instant::now() >= deadline {
                bail!(
                    "node {} never logged {needle:?}; its last log lines:\n{}",
                    self.nodes[i].id,
                    self.logs_tail(i, 30).await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The last `n` lines of [`logs`](Self::logs), or why there are none.
    pub async fn logs_tail(&self, i: usize, n: usize) -> String {
        match self.logs(i).await {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            }
            Err(e) => format!("(no log: {e:#})"),
        }
    }

    /// Node `i`'s PostgreSQL server log (inside the container).
    pub async fn pg_log(&self, i: usize) -> Result<String> {
        let node = self.node(i)?;
        self.docker
            .run(&["exec", &node.container, "cat", "/var/lib/mm/postgres.log"])
            .await
    }

    /// Whether node `i`'s container runs (paused counts as running).
    pub async fn is_running(&self, i: usize) -> Result<bool> {
        let node = self.node(i)?;
        let out = self
            .docker
            .run(&["inspect", "--format", "{{.State.Running}}", &node.container])
            .await?;
        Ok(out.trim() == "true")
    }

    // ---- internals ---------------------------------------------------------

    fn node(&self, i: usize) -> Result<&DockerNode> {
        self.nodes.get(i).ok_or_else(|| {
            anyhow!(
                "no node index {i}: the cluster has {} nodes (indexes are 0-based)",
                self.nodes.len()
            )
        })
    }

    fn link_key(&self, i: usize, j: usize) -> Result<(usize, usize)> {
        self.node(i)?;
        self.node(j)?;
        if i == j {
            bail!("cannot cut the link of node {} with itself", i + 1);
        }
        Ok((i.min(j), i.max(j)))
    }

    fn mark_down(&mut self, i: usize) {
        self.nodes[i].pg_host_port = None;
        self.nodes[i].client_host_port = None;
    }

    /// The TOML config of node `i`, validated with mmd's own parser.
    fn node_config(&self, i: usize, extra: &str) -> Result<String> {
        let mut peers = String::new();
        for n in self.nodes.iter().filter(|n| !n.dropped) {
            peers.push_str(&format!(
                "[[nodes]]\nid = {}\nmesh = \"{}:{MESH_PORT}\"\n\
                 postgres = \"host={} port={PG_PORT} user=postgres dbname=postgres\"\n\n",
                n.id, n.ip, n.ip
            ));
        }
        let text = format!(
            "cluster_id = \"{}\"\nnode_id = {}\nsecret = \"docker test cluster secret\"\n\n\
             [listen]\nmesh = \"0.0.0.0:{MESH_PORT}\"\nclient = \"0.0.0.0:{CLIENT_PORT}\"\n\n\
             [postgres]\nconninfo = \"host=/var/run/postgresql port={PG_PORT} user=postgres \
             dbname=postgres\"\n\n[state]\ndir = \"/var/lib/mm/state\"\n\n{extra}\n\n{peers}",
            self.name, self.nodes[i].id
        );
        NodeConfig::parse(&text)
            .map_err(|e| anyhow!("the config of node {} is invalid: {e}", i + 1))?;
        Ok(text)
    }

    async fn run_container(
        &self,
        i: usize,
        cfg: &DockerClusterConfig,
        toml: &str,
        more_env: &[&str],
    ) -> Result<()> {
        let node = &self.nodes[i];
        let ip = node.ip.to_string();
        let mut env = vec![
            format!("MM_CONFIG_TOML={toml}"),
            format!("MM_MAX_NODES={}", cfg.nodes.max(5)),
            format!("MM_PG_FSYNC={}", if cfg.fsync { "on" } else { "off" }),
            format!("RUST_LOG={}", cfg.log),
        ];
        env.extend(more_env.iter().map(|e| e.to_string()));
        let (pg_host, client_host) = node.pinned;
        let pg_publish = format!("127.0.0.1:{pg_host}:{PG_PORT}");
        let client_publish = format!("127.0.0.1:{client_host}:{CLIENT_PORT}");
        let cluster_label = format!("mm.cluster={}", self.name);
        let hostname = format!("n{}", node.id);
        let mut args: Vec<&str> = vec![
            "run",
            "--detach",
            "--name",
            &node.container,
            "--hostname",
            &hostname,
            "--label",
            LABEL,
            "--label",
            &cluster_label,
            "--network",
            &self.network,
            "--ip",
            &ip,
            "--cap-add",
            "NET_ADMIN",
            "--publish",
            &pg_publish,
            "--publish",
            &client_publish,
        ];
        for e in &env {
            args.push("--env");
            args.push(e);
        }
        args.push(&cfg.image);
        self.docker
            .run(&args)
            .await
            .with_context(|| format!("starting node {}", node.id))?;
        Ok(())
    }

    // ---- adding and dropping nodes ----------------------------------------

    /// Add a node under the next id, as an operator would: a new container
    /// whose entrypoint runs `mmctl init` and `mmctl add-node`, then every
    /// other node's config rewritten to list it and their containers
    /// restarted one at a time. Returns its index once every node is online.
    pub async fn add_node(&mut self, limit: Duration) -> Result<usize> {
        let i = self.nodes.len();
        let id = i + 1;
        let o = self.nodes[0].ip.octets();
        self.nodes.push(DockerNode {
            id,
            container: format!("{}-n{id}", self.name),
            ip: Ipv4Addr::new(o[0], o[1], o[2], 10 + id as u8),
            pg_host_port: None,
            client_host_port: None,
            pinned: (
                crate::mm_cluster::free_port()?,
                crate::mm_cluster::free_port()?,
            ),
            dropped: false,
        });
        let toml = self.node_config(i, &self.cfg.extra_config)?;
        let cfg = self.cfg.clone();
        self.run_container(i, &cfg, &toml, &["MM_ADD_NODE=1"])
            .await?;
        self.refresh_ports(i).await?;
        // Its `mmctl add-node` reads and writes the other nodes' PostgreSQL
        // (slots, prerequisites): restarting them before it is done cuts it
        // off (57P01, seen in CI).
        self.wait_for_log(i, "mm-entrypoint: starting mmd", limit)
            .await?;
        let others: Vec<usize> = (0..i).filter(|&j| !self.nodes[j].dropped).collect();
        self.rolling_restart(&others, limit).await?;
        self.wait_online(limit).await?;
        Ok(i)
    }

    /// Drop node `i` for good: stop its container, wait for a generation
    /// without it, rewrite the others' configs with a rolling restart, then
    /// `mmctl drop-node` in a remaining container.
    pub async fn drop_node(&mut self, i: usize, limit: Duration) -> Result<()> {
        self.stop_node(i).await?;
        let id = self.nodes[i].id as i32;
        let rest: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| j != i && !self.nodes[j].dropped)
            .collect();
        let deadline = Instant::now() + limit;
        loop {
            let mut out = true;
            for &j in &rest {
                let member: Option<bool> = match self.connect_pg(j).await {
                    Ok(c) => c
                        .query_opt("select $1 = any(gen_members) from mtm.status()", &[&id])
                        .await?
                        .map(|r| r.get(0)),
                    Err(_) => None,
                };
                out &= member == Some(false);
            }
            if out {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {id} is still a member of the generation after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.nodes[i].dropped = true;
        self.rolling_restart(&rest, limit).await?;
        let c = self.nodes[rest[0]].container.clone();
        let id = id.to_string();
        self.docker
            .run(&[
                "exec",
                &c,
                "mmctl",
                "drop-node",
                "--config",
                "/etc/mm/mmd.toml",
                "--id",
                &id,
            ])
            .await
            .with_context(|| format!("mmctl drop-node {id}"))?;
        Ok(())
    }

    /// Write each node's current config into its container and restart
    /// the containers one at a time, each back `online` (by a report made
    /// after its restart) before the next.
    async fn rolling_restart(&mut self, which: &[usize], limit: Duration) -> Result<()> {
        for &i in which {
            let toml = self.node_config(i, &self.cfg.extra_config)?;
            let c = self.nodes[i].container.clone();
            let env = format!("MM_NEW_CONFIG={toml}");
            self.docker
                .run(&[
                    "exec",
                    "-e",
                    &env,
                    &c,
                    "sh",
                    "-c",
                    "printf '%s\\n' \"$MM_NEW_CONFIG\" > /etc/mm/mmd.toml",
                ])
                .await
                .with_context(|| format!("writing the config of node {}", i + 1))?;
            let since = crate::mm_cluster::server_now(&self.connect_pg(i).await?).await?;
            self.stop_node(i).await?;
            self.start_node(i).await?;
            let deadline = Instant::now() + limit;
            loop {
                let online = match self.connect_pg(i).await {
                    Ok(c) => crate::mm_cluster::online_since(&c, &since).await,
                    Err(_) => false,
                };
                if online {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "node {} is not online {limit:?} after its restart; its log:\n{}",
                        i + 1,
                        self.logs_tail(i, 30).await
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Ok(())
    }

    /// Reads node `i`'s published host ports (they change across restarts).
    async fn refresh_ports(&mut self, i: usize) -> Result<()> {
        let container = self.node(i)?.container.clone();
        // Docker publishes the ports a moment after `docker start` returns.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let json = self
                .docker
                .run(&[
                    "inspect",
                    "--format",
                    "{{json .NetworkSettings.Ports}}",
                    &container,
                ])
                .await?;
            let pg = host_port(&json, PG_PORT);
            let client = host_port(&json, CLIENT_PORT);
            if let (Some(pg), Some(client)) = (pg, client) {
                self.nodes[i].pg_host_port = Some(pg);
                self.nodes[i].client_host_port = Some(client);
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "container {container} publishes no host ports for {PG_PORT} and \
                     {CLIENT_PORT} (is it running and connected?): {}",
                    json.trim()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Adds (`on`) or removes iptables rules in node `me` dropping all
    /// traffic from and to node `peer`. Adding twice or removing what is not
    /// there is harmless.
    async fn iptables_drop(&self, me: usize, peer: usize, on: bool) -> Result<()> {
        let container = self.nodes[me].container.clone();
        let peer_ip = self.nodes[peer].ip.to_string();
        for (chain, dir) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
            let rule = [chain, dir, peer_ip.as_str(), "-j", "DROP"];
            let exists = self
                .docker
                .output(&[&["exec", &container, "iptables", "-w", "-C"][..], &rule[..]].concat())
                .await?
                .ok;
            let action = match (on, exists) {
                (true, false) => "-I",
                (false, true) => "-D",
                _ => continue,
            };
            self.docker
                .run(
                    &[
                        &["exec", &container, "iptables", "-w", action][..],
                        &rule[..],
                    ]
                    .concat(),
                )
                .await
                .with_context(|| {
                    format!(
                        "{} the link node {} -> node {} with iptables",
                        if on { "cutting" } else { "healing" },
                        me + 1,
                        peer + 1
                    )
                })?;
        }
        Ok(())
    }

    /// Removes the containers and the network (also done on Drop).
    pub async fn remove(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        for n in &self.nodes {
            let out = self
                .docker
                .output(&["rm", "-f", "-v", &n.container]) // -v: the image's data volume
                .await?;
            if !out.ok && !out.stderr.contains("No such container") {
                errors.push(out.stderr.trim().to_string());
            }
        }
        let out = self
            .docker
            .output(&["network", "rm", &self.network])
            .await?;
        if !out.ok && !out.stderr.contains("not found") {
            errors.push(out.stderr.trim().to_string());
        }
        self.nodes.clear();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("removing cluster {}: {}", self.name, errors.join("; "))
        }
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        if self.nodes.is_empty() && self.network.is_empty() {
            return;
        }
        if self.keep {
            eprintln!(
                "mm-harness: keeping Docker cluster {} (MM_DOCKER_KEEP=1): containers {}",
                self.name,
                self.nodes
                    .iter()
                    .map(|n| n.container.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            return;
        }
        // Drop may run inside or outside a tokio runtime: use blocking
        // processes, not the async CLI wrapper.
        let program = std::env::var("MM_DOCKER_BIN").unwrap_or_else(|_| "docker".into());
        let quiet = |args: &[&str]| {
            let _ = std::process::Command::new(&program)
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        };
        if !self.nodes.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(self.nodes.iter().map(|n| n.container.as_str()));
            quiet(&args);
        }
        quiet(&["network", "rm", &self.network]);
    }
}

/// `mm-<pid>-<counter>`: unique among concurrent harness processes.
fn unique_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    format!(
        "mm-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates the cluster's bridge network on the first free /24 of
/// 172.29.0.0/16 (fixed node addresses need a subnet we chose).
async fn create_network(docker: &DockerCli, name: &str) -> Result<(String, [u8; 3])> {
    // Start at a spot derived from the name, so concurrent clusters rarely
    // try the same subnets.
    let start = name
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
        % 256;
    let cluster_label = format!("mm.cluster={name}");
    let mut last = String::new();
    for k in 0..256 {
        let third = ((start + k) % 256) as u8;
        let subnet = format!("172.29.{third}.0/24");
        let out = docker
            .output(&[
                "network",
                "create",
                "--driver",
                "bridge",
                "--subnet",
                &subnet,
                "--label",
                LABEL,
                "--label",
                &cluster_label,
                name,
            ])
            .await?;
        if out.ok {
            return Ok((subnet, [172, 29, third]));
        }
        last = out.stderr.trim().to_string();
        if !last.contains("overlap") {
            break;
        }
    }
    bail!("cannot create the Docker network {name}: {last}")
}

/// The host port Docker published for `port/tcp`, from `.NetworkSettings.Ports` JSON.
fn host_port(json: &str, port: u16) -> Option<u16> {
    let v: serde_json::Value = serde_json::from_str(json.trim()).ok()?;
    v.get(format!("{port}/tcp"))?
        .as_array()?
        .iter()
        .find_map(|b| b.get("HostPort")?.as_str()?.parse().ok())
}

fn conninfo(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5")
}

async fn connect(conninfo: &str, id: usize, what: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {what} of node {id} ({conninfo})"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_published_ports() {
        let json = r#"{"5432/tcp":[{"HostIp":"127.0.0.1","HostPort":"49153"}],"6432/tcp":[{"HostIp":"127.0.0.1","HostPort":"49154"}],"7100/tcp":null}"#;
        assert_eq!(host_port(json, PG_PORT), Some(49153));
        assert_eq!(host_port(json, CLIENT_PORT), Some(49154));
        assert_eq!(host_port(json, MESH_PORT), None);
        assert_eq!(host_port("null", PG_PORT), None);
        assert_eq!(host_port("garbage", PG_PORT), None);
    }
}
