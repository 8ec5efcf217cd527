//! A cluster of N plain PostgreSQL 15 servers as local processes on loopback.
//!
//! Layout of a work directory (default `target/mm-work/<name>`):
//! ```text
//! <work>/.mm-harness-workdir      marker: only such directories are ever wiped
//! <work>/node1/                   owned by the server user; also its unix socket dir
//! <work>/node1/data/              initdb; postgresql.conf includes mm.conf
//! <work>/node1/postgres.log       pg_ctl -l
//! ```
//! Authentication is `initdb -A trust`: any local or 127.0.0.1 connection
//! (including replication connections) is accepted without a password, as
//! superuser `postgres`. That is for tests on a single machine only; the
//! servers listen on 127.0.0.1 alone.
//!
//! Nodes are addressed by index `0..n`; their display names are `node1..nodeN`.
//! Dropping the cluster stops every node (`pg_ctl stop -m fast`, then
//! `immediate`); so does Ctrl-C/SIGTERM unless `stop_on_signal` is off.

use anyhow::{anyhow, bail, Context, Result};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::linkcut::LinkCuts;
use crate::pg_bin::{run_checked, PgBin, RunAs};
use crate::pg_conf::{NodeSettings, Requirements};
use crate::procs;
use crate::signals::{self, StopHandle};

const MARKER: &str = ".mm-harness-workdir";
/// The superuser initdb creates (`-U postgres`), whoever runs the server.
pub const SUPERUSER: &str = "postgres";
/// sun_path is 108 bytes including the NUL.
const MAX_SOCKET_PATH: usize = 107;

/// How to build a local cluster.
#[derive(Debug, Clone)]
pub struct LocalClusterConfig {
    /// Names the work directory `<root>/<name>`.
    pub name: String,
    pub nodes: usize,
    /// Overrides the whole work directory (not just the root).
    pub work_dir: Option<PathBuf>,
    /// `false` sets `fsync = off` and `initdb --no-sync`: for tests only.
    pub fsync: bool,
    pub max_connections: u32,
    /// Extra postgresql.conf settings, written last.
    pub extra_settings: Vec<(String, String)>,
    /// Stop the nodes on SIGINT/SIGTERM and exit 130 (a process-wide handler).
    pub stop_on_signal: bool,
    /// Database the connection strings name; created unless it is `postgres`.
    pub dbname: String,
    /// Run each node in a cgroup of its own so links between nodes can be
    /// cut ([`LinkCuts`]); needs root and iptables.
    pub link_cuts: bool,
}

impl LocalClusterConfig {
    /// Durable defaults (fsync on).
    pub fn new(name: impl Into<String>, nodes: usize) -> Self {
        LocalClusterConfig {
            name: name.into(),
            nodes,
            work_dir: None,
            fsync: true,
            max_connections: 100,
            extra_settings: Vec::new(),
            stop_on_signal: true,
            dbname: "postgres".into(),
            link_cuts: false,
        }
    }

    /// Like [`new`](Self::new) with `fsync = off`: for tests only.
    pub fn for_tests(name: impl Into<String>, nodes: usize) -> Self {
        LocalClusterConfig {
            fsync: false,
            ..Self::new(name, nodes)
        }
    }
}

/// `$MM_WORK_DIR`, else `$CARGO_TARGET_DIR/mm-work`, else the workspace's `target/mm-work`.
pub fn default_work_root() -> PathBuf {
    if let Some(d) = std::env::var_os("MM_WORK_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d).join("mm-work");
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("target")
        .join("mm-work")
}

/// One server of the cluster.
#[derive(Debug, Clone)]
pub struct LocalNode {
    /// 1-based, for display (`node1`).
    pub id: usize,
    pub port: u16,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub log_file: PathBuf,
    pub dbname: String,
    running: bool,
}

impl LocalNode {
    pub fn name(&self) -> String {
        format!("node{}", self.id)
    }

    /// libpq / tokio-postgres key=value connection string over TCP loopback.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname={}",
            self.port, self.dbname
        )
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The postmaster's pid from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Result<i32> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .with_context(|| format!("{}: no postmaster.pid (not running?)", self.name()))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| anyhow!("{}: unreadable postmaster.pid", self.name()))
    }

    /// Connects with tokio-postgres; the connection task runs on the current runtime.
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {} ({})", self.name(), self.conninfo()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

/// A running local cluster. Dropping it stops every node.
pub struct LocalCluster {
    bin: PgBin,
    run_as: RunAs,
    work_dir: PathBuf,
    fsync: bool,
    req: Requirements,
    extra: Vec<(String, String)>,
    nodes: Vec<LocalNode>,
    cuts: Option<LinkCuts>,
}

impl LocalCluster {
    /// initdb, configure and start `cfg.nodes` servers; returns once every one
    /// accepts connections.
    pub async fn start(cfg: LocalClusterConfig) -> Result<LocalCluster> {
        if cfg.nodes == 0 {
            bail!("a cluster needs at least one node");
        }
        let bin = PgBin::find()?;
        let run_as = RunAs::detect()?;
        let work_dir = cfg
            .work_dir
            .clone()
            .unwrap_or_else(|| default_work_root().join(&cfg.name));
        let work_dir = absolute(&work_dir)?;
        prepare_work_dir(&work_dir, &bin, &run_as)?;

        if cfg.stop_on_signal {
            signals::install_stop_on_signal();
        }
        let ports = free_ports(cfg.nodes)?;
        // The plugin's setting first: a caller's extra settings win.
        let mut extra = bin.plugin_settings();
        extra.extend(cfg.extra_settings.iter().cloned());
        let mut cluster = LocalCluster {
            bin,
            run_as,
            work_dir: work_dir.clone(),
            fsync: cfg.fsync,
            req: Requirements {
                nodes: cfg.nodes as u32,
                max_connections: cfg.max_connections,
                appliers_per_peer: crate::pg_conf::DEFAULT_APPLIERS,
            },
            extra,
            nodes: Vec::new(),
            cuts: if cfg.link_cuts {
                Some(LinkCuts::new(cfg.nodes)?)
            } else {
                None
            },
        };
        for (i, port) in ports.into_iter().enumerate() {
            let node = cluster.new_node(i, port, &cfg.dbname)?;
            cluster.nodes.push(node);
        }

        // initdb all nodes concurrently (about a second each).
        let mut jobs = Vec::new();
        for node in &cluster.nodes {
            let cmd = cluster.initdb_command(node);
            let name = node.name();
            jobs.push(tokio::task::spawn_blocking(move || {
                run_checked(cmd, &format!("initdb {name}"))
            }));
        }
        for job in jobs {
            job.await
                .context("initdb task")?
                .context(cluster.permission_hint())?;
        }
        for i in 0..cluster.nodes.len() {
            cluster.write_settings(i)?;
        }
        // Start all nodes concurrently.
        if signals::shutting_down() {
            bail!(
                "not starting {}: shutting down on a signal",
                work_dir.display()
            );
        }
        let mut jobs = Vec::new();
        for i in 0..cluster.nodes.len() {
            jobs.push(cluster.start_command(i));
        }
        let mut results = Vec::new();
        for (i, cmd) in jobs.into_iter().enumerate() {
            let name = cluster.nodes[i].name();
            results.push(tokio::task::spawn_blocking(move || {
                run_checked(cmd, &format!("pg_ctl start {name}"))
            }));
        }
        let mut failed = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            match r.await.context("pg_ctl task")? {
                Ok(_) => cluster.mark_started(i),
                Err(e) => failed.push((i, e)),
            }
        }
        // A port picked as free may have been taken meanwhile: retry those nodes
        // on fresh ports.
        for (i, e) in failed {
            if !cluster.log_says_port_busy(i) {
                return Err(e.context(cluster.log_tail(i)));
            }
            cluster.start_node_on_new_port(i).await?;
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_ready(i).await?;
        }
        if cfg.dbname != "postgres" {
            for node in &cluster.nodes {
                let mut admin = node.clone();
                admin.dbname = "postgres".into();
                let c = admin.connect().await?;
                c.batch_execute(&format!(
                    "CREATE DATABASE \"{}\"",
                    cfg.dbname.replace('"', "\"\"")
                ))
                .await
                .with_context(|| format!("createdb {} on {}", cfg.dbname, node.name()))?;
            }
        }
        Ok(cluster)
    }

    /// Node `i`'s directory (created) and description, not yet initialised.
    fn new_node(&self, i: usize, port: u16, dbname: &str) -> Result<LocalNode> {
        let dir = self.work_dir.join(format!("node{}", i + 1));
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        self.run_as.chown(&dir)?;
        let node = LocalNode {
            id: i + 1,
            port,
            data_dir: dir.join("data"),
            socket_dir: dir.clone(),
            log_file: dir.join("postgres.log"),
            dir,
            dbname: dbname.to_string(),
            running: false,
        };
        check_socket_path(&node)?;
        Ok(node)
    }

    fn initdb_command(&self, node: &LocalNode) -> std::process::Command {
        let mut cmd = self.run_as.command(&self.bin.tool("initdb"));
        cmd.arg("-D")
            .arg(&node.data_dir)
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C"])
            .current_dir(&node.dir);
        if !self.fsync {
            cmd.arg("--no-sync");
        }
        cmd
    }

    /// initdb and start one more server (node `len + 1`), with the same
    /// settings, sized for the larger cluster, and the same database;
    /// returns its index. Link cuts do not cover it.
    pub async fn add_node(&mut self) -> Result<usize> {
        let i = self.nodes.len();
        let port = free_ports(1)?[0];
        let dbname = self.nodes[0].dbname.clone();
        let node = self.new_node(i, port, &dbname)?;
        let cmd = self.initdb_command(&node);
        let name = node.name();
        tokio::task::spawn_blocking(move || run_checked(cmd, &format!("initdb {name}")))
            .await
            .context("initdb task")?
            .context(self.permission_hint())?;
        self.nodes.push(node);
        self.req.nodes += 1;
        self.start_node(i).await?;
        if dbname != "postgres" {
            let mut admin = self.nodes[i].clone();
            admin.dbname = "postgres".into();
            admin
                .connect()
                .await?
                .batch_execute(&format!(
                    "CREATE DATABASE \"{}\"",
                    dbname.replace('"', "\"\"")
                ))
                .await
                .with_context(|| format!("createdb {dbname} on {}", self.nodes[i].name()))?;
        }
        Ok(i)
    }

    pub fn nodes(&self) -> &[LocalNode] {
        &self.nodes
    }

    pub fn node(&self, i: usize) -> &LocalNode {
        &self.nodes[i]
    }

    pub fn conninfo(&self, i: usize) -> String {
        self.nodes[i].conninfo()
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    pub fn bin(&self) -> &PgBin {
        &self.bin
    }

    pub fn run_as(&self) -> &RunAs {
        &self.run_as
    }

    pub async fn connect(&self, i: usize) -> Result<tokio_postgres::Client> {
        self.nodes[i].connect().await
    }

    /// Crash node `i`: SIGKILL to the postmaster and every child (backends,
    /// walsenders, checkpointer...), then wait until none is left.
    pub fn kill9(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let pid = node.postmaster_pid()?;
        let mut victims = procs::instance(pid);
        // The postmaster first, so it cannot fork replacements; then whatever
        // children it had, including ones forked before it died.
        for &p in &victims {
            let _ = procs::send_signal(p, libc::SIGKILL);
        }
        victims.extend(procs::children(pid));
        for &p in &victims[1..] {
            let _ = procs::send_signal(p, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left: Vec<i32> = victims
                .iter()
                .copied()
                .filter(|&p| procs::process_alive(p))
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!("{}: processes {left:?} survive kill -9", node.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signals::unregister(&node.data_dir);
        self.nodes[i].running = false;
        Ok(())
    }

    /// Freeze node `i` (SIGSTOP to the postmaster and its children);
    /// [`resume`](Self::resume) undoes it. Connections opened meanwhile hang.
    pub fn pause(&self, i: usize) -> Result<()> {
        self.signal_instance(i, libc::SIGSTOP)
    }

    pub fn resume(&self, i: usize) -> Result<()> {
        self.signal_instance(i, libc::SIGCONT)
    }

    fn signal_instance(&self, i: usize, sig: i32) -> Result<()> {
        let pid = self.nodes[i].postmaster_pid()?;
        for p in procs::instance(pid) {
            procs::send_signal(p, sig)
                .with_context(|| format!("signal {sig} to {} pid {p}", self.nodes[i].name()))?;
        }
        Ok(())
    }

    /// Clean shutdown of node `i` (`-m fast`, then `immediate`).
    pub fn stop_node(&mut self, i: usize) -> Result<()> {
        if !self.nodes[i].running {
            return Ok(());
        }
        // A paused node cannot shut down.
        let _ = self.resume(i);
        let h = self.stop_handle(i);
        if !h.stop() {
            bail!(
                "{}: pg_ctl stop failed; {}",
                self.nodes[i].name(),
                self.log_tail(i)
            );
        }
        signals::unregister(&h.data_dir);
        self.nodes[i].running = false;
        Ok(())
    }

    /// Start node `i` again on its port (after [`kill9`](Self::kill9) this
    /// runs crash recovery; prepared transactions survive).
    pub async fn start_node(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].running {
            return Ok(());
        }
        self.remove_stale_pid_file(i);
        self.write_settings(i)?;
        if signals::shutting_down() {
            bail!(
                "{}: not starting, shutting down on a signal",
                self.nodes[i].name()
            );
        }
        let name = self.nodes[i].name();
        let cmd = self.start_command(i);
        tokio::task::spawn_blocking(move || run_checked(cmd, &format!("pg_ctl start {name}")))
            .await
            .context("pg_ctl task")?
            .map_err(|e| e.context(self.log_tail(i)))?;
        self.mark_started(i);
        self.wait_ready(i).await
    }

    /// Stop (if running) and start node `i`.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.stop_node(i)?;
        self.start_node(i).await
    }

    /// Stops every node (also done on Drop).
    pub fn stop(&mut self) {
        for i in 0..self.nodes.len() {
            if let Err(e) = self.stop_node(i) {
                eprintln!("mm-harness: {e:#}");
            }
        }
    }

    fn stop_handle(&self, i: usize) -> StopHandle {
        StopHandle {
            pg_ctl: self.bin.tool("pg_ctl"),
            data_dir: self.nodes[i].data_dir.clone(),
            run_as: self.run_as.clone(),
        }
    }

    fn mark_started(&mut self, i: usize) {
        self.nodes[i].running = true;
        signals::register(self.stop_handle(i));
    }

    fn write_settings(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let settings = NodeSettings {
            port: node.port,
            socket_dir: node.socket_dir.display().to_string(),
            req: self.req,
            fsync: self.fsync,
            extra: self.extra.clone(),
        };
        settings
            .install(&node.data_dir)
            .with_context(|| format!("writing settings of {}", node.name()))?;
        self.run_as.chown(&node.data_dir.join("mm.conf"))
    }

    /// `pg_ctl start -w` for node `i`. Registers the node for stop-on-signal
    /// first, so a Ctrl-C while it starts still stops it.
    fn start_command(&self, i: usize) -> std::process::Command {
        signals::register(self.stop_handle(i));
        let node = &self.nodes[i];
        let mut cmd = self.run_as.command(&self.bin.tool("pg_ctl"));
        cmd.arg("start")
            .arg("-D")
            .arg(&node.data_dir)
            .arg("-l")
            .arg(&node.log_file)
            .args(["-w", "-t", "60"])
            .current_dir(&node.dir);
        if let Some(cuts) = &self.cuts {
            cuts.place(i, &mut cmd);
        }
        cmd
    }

    /// The link cutter, when the cluster was started with `link_cuts`.
    pub fn link_cuts(&self) -> Option<&LinkCuts> {
        self.cuts.as_ref()
    }
    pub fn link_cuts_mut(&mut self) -> Option<&mut LinkCuts> {
        self.cuts.as_mut()
    }

    async fn start_node_on_new_port(&mut self, i: usize) -> Result<()> {
        let mut last = None;
        for _ in 0..3 {
            self.nodes[i].port = free_ports(1)?[0];
            match self.start_node(i).await {
                Ok(()) => return Ok(()),
                Err(e) if self.log_says_port_busy(i) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no free port")))
    }

    async fn wait_ready(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let err = match node.connect().await {
                Ok(c) => match c.simple_query("select 1").await {
                    Ok(_) => return Ok(()),
                    Err(e) => anyhow!(e),
                },
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(err.context(format!(
                    "{} does not accept connections; {}",
                    node.name(),
                    self.log_tail(i)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// After kill -9 the postmaster may linger as a zombie until its parent
    /// (PID 1 of a container, here) reaps it, and PostgreSQL's lock files
    /// (`postmaster.pid`, `.s.PGSQL.<port>.lock`) would name it as a live
    /// server (kill(pid, 0) succeeds on a zombie). Remove those whose pid is
    /// dead or a zombie.
    fn remove_stale_pid_file(&self, i: usize) {
        let node = &self.nodes[i];
        let lock_files = [
            node.data_dir.join("postmaster.pid"),
            node.socket_dir.join(format!(".s.PGSQL.{}.lock", node.port)),
        ];
        for f in lock_files {
            let pid = std::fs::read_to_string(&f)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
            if let Some(pid) = pid {
                if !procs::process_alive(pid) {
                    let _ = std::fs::remove_file(&f);
                }
            }
        }
    }

    fn log_says_port_busy(&self, i: usize) -> bool {
        let log = std::fs::read_to_string(&self.nodes[i].log_file).unwrap_or_default();
        log.contains("could not bind") || log.contains("Address already in use")
    }

    fn log_tail(&self, i: usize) -> String {
        let path = &self.nodes[i].log_file;
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("last lines of {}:\n{tail}", path.display())
    }

    fn permission_hint(&self) -> String {
        match &self.run_as {
            RunAs::Myself => format!("initializing {}", self.work_dir.display()),
            RunAs::User { name, .. } => format!(
                "initializing {} as OS user {name} (we are root); every parent directory \
                 must be searchable by {name}, else pass a work dir under /tmp",
                self.work_dir.display()
            ),
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

/// Empties `dir` for a fresh cluster: refuses a non-empty directory the harness
/// did not create; stops servers a previous, aborted run left behind.
fn prepare_work_dir(dir: &Path, bin: &PgBin, run_as: &RunAs) -> Result<()> {
    if dir.exists() {
        let ours = dir.join(MARKER).exists();
        let empty = std::fs::read_dir(dir)?.next().is_none();
        if !ours && !empty {
            bail!(
                "{} exists and is not an mm-harness work directory (no {MARKER}); \
                 refusing to wipe it",
                dir.display()
            );
        }
        for e in std::fs::read_dir(dir)?.flatten() {
            let data_dir = e.path().join("data");
            if data_dir.join("postmaster.pid").exists() {
                StopHandle {
                    pg_ctl: bin.tool("pg_ctl"),
                    data_dir,
                    run_as: run_as.clone(),
                }
                .stop();
            }
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    std::fs::write(
        dir.join(MARKER),
        "created by mm-harness; wiped on the next start\n",
    )?;
    run_as.chown(dir)
}

fn check_socket_path(node: &LocalNode) -> Result<()> {
    let sock = node.socket_dir.join(format!(".s.PGSQL.{}", node.port));
    let len = sock.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        bail!(
            "unix socket path {} is {len} bytes, over the {MAX_SOCKET_PATH}-byte limit; \
             use a shorter work directory",
            sock.display()
        );
    }
    Ok(())
}

/// `n` distinct ports free on 127.0.0.1 right now, for servers to listen
/// on. Picked below the kernel's ephemeral range (32768 and up by default)
/// and not with `bind(:0)`: a port from that range can be taken, before our
/// server binds it, as the source port of any outgoing connection (a CI run
/// lost a test to exactly that: "Address already in use"). A process-wide
/// cursor, started at a pid-derived offset, keeps parallel tests of one
/// process off each other's picks; each pick is checked by binding it.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 32_768 - LOW;
    static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = CURSOR.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut held = Vec::with_capacity(n);
    for _ in 0..SPAN {
        if held.len() == n {
            break;
        }
        let port = (LOW + CURSOR.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    if held.len() < n {
        bail!("finding free ports: fewer than {n} free in {LOW}..32768");
    }
    // Held until here so that the picks are distinct.
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}
