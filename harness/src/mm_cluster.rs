//! An mm cluster on the local backend: N PostgreSQL 15 servers
//! ([`LocalCluster`]), each prepared by `mmctl init`'s library call and
//! given an `mmd` process with its own TOML config, client port and mesh port.

use crate::backend::local::{LocalCluster, LocalClusterConfig};
use anyhow::{anyhow, bail, Context, Result};
use mm_runtime::config::NodeConfig;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where the `mmd` binary is: `$MM_MMD_BIN`, else beside the running
/// executable (or one directory up, for test binaries in `deps/`).
pub fn find_mmd() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MM_MMD_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("MM_MMD_BIN={} is not a file", p.display());
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    for _ in 0..2 {
        if let Some(d) = dir {
            let cand = d.join("mmd");
            if cand.is_file() {
                return Ok(cand);
            }
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    bail!(
        "the mmd binary was not found next to {}: build it with `cargo build --workspace --bins` \
         (same profile), or set MM_MMD_BIN",
        exe.display()
    )
}

/// The server's clock now, to compare `mtm.status()` reports with: after an
/// mmd restart the old mmd's last report may still read `online`.
pub async fn server_now(c: &tokio_postgres::Client) -> Result<String> {
    Ok(c.query_one("select now()::text", &[]).await?.get(0))
}

/// Whether mmd reported `online` after `since` (from [`server_now`]).
pub async fn online_since(c: &tokio_postgres::Client, since: &str) -> bool {
    c.query_opt(
        "select 1 from mtm.status() where status = 'online' \
         and reported_at > $1::text::timestamptz",
        &[&since],
    )
    .await
    .is_ok_and(|r| r.is_some())
}

/// A loopback port nobody listens on right now (see
/// [`crate::backend::local::free_ports`]).
pub fn free_port() -> Result<u16> {
    Ok(crate::backend::local::free_ports(1)?[0])
}

pub struct MmNode {
    pub id: usize,
    pub client_port: u16,
    pub mesh_port: u16,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// Removed from the cluster (`drop_node`): its id is not reused.
    pub dropped: bool,
    child: Option<Child>,
}

impl MmNode {
    /// Connection string of this node's mmd (the proxy).
    pub fn client_conninfo(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.client_port
        )
    }
}

pub struct MmCluster {
    pub pg: LocalCluster,
    pub nodes: Vec<MmNode>,
    mmd: PathBuf,
    dbname: String,
    extra_config: String,
    log: String,
}

/// Options of the mm side of a local cluster.
#[derive(Clone, Debug)]
pub struct MmOptions {
    /// `[timeouts]` and `[data_plane]` lines appended to every config.
    pub extra_config: String,
    /// `RUST_LOG` for the mmd processes (default: `$MM_LOG`, else `info`).
    pub log: String,
}

impl Default for MmOptions {
    fn default() -> Self {
        MmOptions {
            extra_config: String::new(),
            log: std::env::var("MM_LOG").unwrap_or_else(|_| "info".into()),
        }
    }
}

impl MmCluster {
    /// Start PostgreSQL, write configs, init every node, start every mmd,
    /// and wait until all are online.
    pub async fn start(pg_cfg: LocalClusterConfig, opts: MmOptions) -> Result<MmCluster> {
        let mmd = find_mmd()?;
        let dbname = pg_cfg.dbname.clone();
        let mut pg = LocalCluster::start(pg_cfg).await?;
        let n = pg.nodes().len();
        // Picked together: separate picks can return the same port (two
        // nodes once got the same mesh address).
        let picked = crate::backend::local::free_ports(2 * n)?;
        let ports: Vec<(u16, u16)> = picked.chunks(2).map(|p| (p[0], p[1])).collect();
        // Nodes reach each other at their PostgreSQL (data plane) and their
        // mmd's mesh port.
        let listen: Vec<Vec<u16>> = (0..n).map(|i| vec![pg.node(i).port, ports[i].1]).collect();
        if let Some(cuts) = pg.link_cuts_mut() {
            cuts.mark_links(&listen)?;
        }
        let mut nodes = Vec::new();
        for (i, node) in pg.nodes().iter().enumerate() {
            nodes.push(MmNode {
                id: i + 1,
                client_port: ports[i].0,
                mesh_port: ports[i].1,
                config_path: node.dir.join("mmd.toml"),
                log_path: node.dir.join("mmd.log"),
                dropped: false,
                child: None,
            });
        }
        let mut c = MmCluster {
            pg,
            nodes,
            mmd,
            dbname,
            extra_config: opts.extra_config.clone(),
            log: opts.log.clone(),
        };
        c.write_configs()?;
        for i in 0..n {
            mm_runtime::pg::init::init_node(&c.config(i)?)
                .await
                .map_err(|e| anyhow!("mmctl init of node {}: {e}", i + 1))?;
        }
        for i in 0..n {
            c.start_mmd(i, &opts.log)?;
        }
        c.wait_online(Duration::from_secs(60)).await?;
        Ok(c)
    }

    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    /// Write every node's TOML: the nodes not dropped, this one's ports.
    fn write_configs(&self) -> Result<()> {
        let mut nodes_toml = String::new();
        for n in self.nodes.iter().filter(|n| !n.dropped) {
            nodes_toml.push_str(&format!(
                "[[nodes]]\nid = {}\nmesh = \"127.0.0.1:{}\"\npostgres = \"{}\"\n\n",
                n.id,
                n.mesh_port,
                self.pg.node(n.id - 1).conninfo()
            ));
        }
        for n in self.nodes.iter().filter(|n| !n.dropped) {
            let node = self.pg.node(n.id - 1);
            // mmd reaches its own PostgreSQL over the Unix socket (cheaper
            // than TCP loopback); peers use TCP.
            let local = format!(
                "host={} port={} user=postgres dbname={}",
                node.socket_dir.display(),
                node.port,
                node.dbname
            );
            let text = format!(
                "cluster_id = \"mm-local\"\nnode_id = {}\nsecret = \"local test cluster secret\"\n\n\
                 [listen]\nmesh = \"127.0.0.1:{}\"\nclient = \"127.0.0.1:{}\"\n\n\
                 [postgres]\nconninfo = \"{}\"\n\n{}\n{}",
                n.id, n.mesh_port, n.client_port, local, self.extra_config, nodes_toml
            );
            std::fs::write(&n.config_path, &text)
                .with_context(|| format!("writing {}", n.config_path.display()))?;
        }
        Ok(())
    }

    /// Node `i`'s configuration as mmd reads it.
    pub fn config(&self, i: usize) -> Result<NodeConfig> {
        let p = &self.nodes[i].config_path;
        NodeConfig::load(p).map_err(|e| anyhow!("{}: {e}", p.display()))
    }

    /// Restart the mmd of every node in `which` with its current
    /// configuration, one at a time, each back `online` before the next.
    pub async fn rolling_restart(&mut self, which: &[usize], limit: Duration) -> Result<()> {
        for &i in which {
            // The old mmd's last report says `online` for a while: only a
            // report made after the restart counts.
            let since = server_now(&self.pg.connect(i).await?).await?;
            self.stop_mmd(i);
            let log = self.log.clone();
            self.start_mmd(i, &log)?;
            self.wait_node_online_since(i, Some(&since), limit).await?;
        }
        Ok(())
    }

    /// Add a node under the next id, as an operator would: a new
    /// PostgreSQL, every configuration listing it, `mmctl init` and
    /// `mmctl add-node` on it, a rolling restart of the other mmds, then its
    /// own mmd, which copies a donor's database and joins. Returns its index
    /// once it is `online`.
    pub async fn add_node(&mut self, limit: Duration) -> Result<usize> {
        let i = self.pg.add_node().await?;
        let ports = crate::backend::local::free_ports(2)?;
        let node = self.pg.node(i);
        self.nodes.push(MmNode {
            id: i + 1,
            client_port: ports[0],
            mesh_port: ports[1],
            config_path: node.dir.join("mmd.toml"),
            log_path: node.dir.join("mmd.log"),
            dropped: false,
            child: None,
        });
        self.write_configs()?;
        let cfg = self.config(i)?;
        mm_runtime::pg::init::init_node(&cfg)
            .await
            .map_err(|e| anyhow!("mmctl init of node {}: {e}", i + 1))?;
        mm_runtime::pg::membership::add_node(&cfg, false)
            .await
            .map_err(|e| anyhow!("mmctl add-node of node {}: {e}", i + 1))?;
        let others: Vec<usize> = (0..i).filter(|&j| !self.nodes[j].dropped).collect();
        self.rolling_restart(&others, limit).await?;
        let log = self.log.clone();
        self.start_mmd(i, &log)?;
        self.wait_node_online(i, limit).await?;
        Ok(i)
    }

    /// Drop node `i` for good, as an operator would: stop its mmd and
    /// PostgreSQL, wait for a generation without it, remove it from every
    /// configuration with a rolling restart, then `mmctl drop-node`.
    pub async fn drop_node(&mut self, i: usize, limit: Duration) -> Result<()> {
        self.stop_mmd(i);
        self.pg.stop_node(i)?;
        let id = self.nodes[i].id as i32;
        let rest: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| j != i && !self.nodes[j].dropped)
            .collect();
        let deadline = tokio::time::Instant::now() + limit;
        'wait: loop {
            let mut out = true;
            for &j in &rest {
                let c = self.pg.connect(j).await?;
                let member: Option<bool> = c
                    .query_opt("select $1 = any(gen_members) from mtm.status()", &[&id])
                    .await?
                    .map(|r| r.get(0));
                if member != Some(false) {
                    out = false;
                }
            }
            if out {
                break 'wait;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("node {id} is still a member of the generation after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.nodes[i].dropped = true;
        self.write_configs()?;
        self.rolling_restart(&rest, limit).await?;
        mm_runtime::pg::membership::drop_node(&self.config(rest[0])?, id as u8)
            .await
            .map_err(|e| anyhow!("mmctl drop-node {id}: {e}"))?;
        Ok(())
    }

    /// An error with the end of its log if node `i`'s mmd has exited.
    fn check_mmd_alive(&mut self, i: usize) -> Result<()> {
        if let Some(child) = self.nodes[i].child.as_mut() {
            if let Ok(Some(st)) = child.try_wait() {
                bail!(
                    "mmd of node {} exited ({st}); its log: {}\n{}",
                    i + 1,
                    self.nodes[i].log_path.display(),
                    tail(&self.nodes[i].log_path, 20)
                );
            }
        }
        Ok(())
    }

    /// Wait until node `i` reports `online`; fails early if its mmd exits.
    pub async fn wait_node_online(&mut self, i: usize, limit: Duration) -> Result<()> {
        self.wait_node_online_since(i, None, limit).await
    }

    async fn wait_node_online_since(
        &mut self,
        i: usize,
        since: Option<&str>,
        limit: Duration,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.check_mmd_alive(i)?;
            let online = match since {
                None => self.status(i).await.ok().as_deref() == Some("online"),
                Some(t) => match self.pg.connect(i).await {
                    Ok(c) => online_since(&c, t).await,
                    Err(_) => false,
                },
            };
            if online {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("node {} is not online after {limit:?}", i + 1);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Start node `i`'s mmd (0-based).
    pub fn start_mmd(&mut self, i: usize, log: &str) -> Result<()> {
        let node = &mut self.nodes[i];
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .with_context(|| format!("opening {}", node.log_path.display()))?;
        let mut cmd = Command::new(&self.mmd);
        // mmd must not outlive the harness (Ctrl-C exits without Drop):
        // the kernel sends it SIGTERM when the harness goes.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        if let Some(cuts) = self.pg.link_cuts() {
            cuts.place(i, &mut cmd);
        }
        let child = cmd
            .arg("--config")
            .arg(&node.config_path)
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", self.mmd.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// Drops every packet between nodes `a` and `b` (0-based), both ways;
    /// the cluster must have been started with `link_cuts`.
    pub fn cut_link(&mut self, a: usize, b: usize) -> Result<()> {
        self.pg
            .link_cuts_mut()
            .ok_or_else(|| anyhow!("this cluster was started without link cuts"))?
            .cut(a, b)
    }

    /// Lets the packets between `a` and `b` through again.
    pub fn heal_link(&mut self, a: usize, b: usize) -> Result<()> {
        match self.pg.link_cuts_mut() {
            Some(c) => c.heal(a, b),
            None => Ok(()),
        }
    }

    /// Stop node `i`'s mmd with SIGKILL.
    pub fn kill_mmd(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether node `i`'s mmd process is running (not exited, not killed).
    pub fn mmd_running(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Freeze (`SIGSTOP`) or thaw (`SIGCONT`) node `i`'s mmd.
    pub fn signal_mmd(&self, i: usize, sig: i32) -> Result<()> {
        let Some(c) = self.nodes[i].child.as_ref() else {
            bail!("mmd of node {} is not running", i + 1);
        };
        crate::procs::send_signal(c.id() as i32, sig)
            .with_context(|| format!("signal {sig} to mmd of node {}", i + 1))
    }

    /// Stop node `i`'s mmd cleanly (SIGTERM, then SIGKILL after 3 s).
    pub fn stop_mmd(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            stop_child(&mut c);
        }
    }

    /// Node `i`'s status as its mmd last published it (`mtm.status()`).
    pub async fn status(&self, i: usize) -> Result<String> {
        let c = self.pg.connect(i).await?;
        let row = c.query_opt("select status from mtm.status()", &[]).await?;
        Ok(row.map(|r| r.get(0)).unwrap_or_else(|| "unknown".into()))
    }

    /// Wait until every node reports `online`; fails early if an mmd exits.
    pub async fn wait_online(&mut self, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let mut all = true;
            for i in 0..self.nodes.len() {
                if self.nodes[i].dropped {
                    continue;
                }
                self.check_mmd_alive(i)?;
                if self.status(i).await.ok().as_deref() != Some("online") {
                    all = false;
                }
            }
            if all {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the cluster did not come online within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Connect to node `i` through its mmd.
    pub async fn connect_proxy(&self, i: usize) -> Result<tokio_postgres::Client> {
        let conninfo = self.nodes[i].client_conninfo(&self.dbname);
        let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to mmd of node {} ({conninfo})", i + 1))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    pub fn stop_mmds(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                stop_child(&mut c);
            }
        }
    }
}

fn stop_child(c: &mut Child) {
    // A frozen mmd cannot act on SIGTERM.
    let _ = crate::procs::send_signal(c.id() as i32, libc::SIGCONT);
    // SIGTERM first: mmd stops its driver cleanly.
    let _ = crate::procs::send_signal(c.id() as i32, libc::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for MmCluster {
    fn drop(&mut self) {
        self.stop_mmds();
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
