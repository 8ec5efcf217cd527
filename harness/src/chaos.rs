//! `mm-harness chaos`: the seed scripts, bank transfers and an
//! acknowledged-write ledger through every node's mmd while a seeded random
//! schedule of faults hits single nodes; then everything is healed and every
//! node checked as `demo` checks it. A probe writer per node commits a row
//! every ~50 ms: its commits give the availability timeline (commits per
//! second per node) and, per fault, the time from the fault to the first
//! commit after it on a node the fault did not hit.
//!
//! The whole schedule (kinds, victims, start times, lengths) derives from
//! `--seed` and is printed, so a run can be repeated; the machine's timing
//! still varies between runs.
//!
//! Backends: `local` (processes here; faults are signals and restarts, the
//! harness supervises the mmds) and `docker` (a container per node; faults
//! are Docker's: kill, stop, pause, network disconnect, an iptables cut of
//! one link).

use crate::backend::docker::{DockerCluster, DockerClusterConfig};
use crate::backend::local::LocalClusterConfig;
use crate::checks::{check_nodes, Expect};
use crate::demo::SEED_SCHEMA;
use crate::mm_cluster::{MmCluster, MmOptions};
use crate::pg_bin::PgBin;
use crate::pgbench::{scripts_dir, Pgbench};
use anyhow::{bail, Context, Result};
use mm_workloads::bank::{bank_seed_sql, run_bank, BankConfig, BANK_SCHEMA};
use mm_workloads::conn::Stop;
use mm_workloads::ledger::{run_ledger, LedgerConfig, LEDGER_SCHEMA};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PROBE_SCHEMA: &str =
    "create table chaos_probe(node int, seq bigint, primary key (node, seq))";

#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub nodes: usize,
    pub duration: Duration,
    pub seed: u64,
    /// pgbench clients per node.
    pub clients: u32,
    pub work_dir: Option<std::path::PathBuf>,
    pub backend: Backend,
    /// Local backend: cut single links too (each node in a cgroup of its
    /// own, iptables; needs root). Docker always can.
    pub link_cuts: bool,
}

/// Where the nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Local,
    Docker,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Docker => "docker",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "local" => Ok(Backend::Local),
            "docker" => Ok(Backend::Docker),
            other => Err(format!("unknown backend {other:?} (local or docker)")),
        }
    }
}

impl Default for ChaosOptions {
    fn default() -> Self {
        ChaosOptions {
            nodes: 3,
            duration: Duration::from_secs(60),
            seed: 1,
            clients: 4,
            work_dir: None,
            backend: Backend::Local,
            link_cuts: false,
        }
    }
}

/// What a fault does to its victims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// `kill -9` of mmd; started again at heal.
    KillMmd,
    /// `kill -9` of PostgreSQL (postmaster and children); its mmd stops
    /// itself (watchdog); both started again at heal.
    KillPostgres,
    /// SIGSTOP of mmd and PostgreSQL; SIGCONT at heal.
    PauseNode,
    /// SIGSTOP of mmd only; SIGCONT at heal.
    PauseMmd,
    /// Clean stop of mmd and PostgreSQL; started again at heal.
    RestartNode,
    /// Docker: SIGKILL of the whole container; started again at heal.
    KillNode,
    /// Docker: the container leaves the cluster network; back at heal.
    Disconnect,
    /// The link between two nodes dropped both ways (Docker: iptables in
    /// both containers; local: iptables matching each node's cgroup, see
    /// `backend::linkcut`); restored at heal.
    CutLink,
}

const LOCAL_KINDS: [FaultKind; 5] = [
    FaultKind::KillMmd,
    FaultKind::KillPostgres,
    FaultKind::PauseNode,
    FaultKind::PauseMmd,
    FaultKind::RestartNode,
];

const DOCKER_KINDS: [FaultKind; 5] = [
    FaultKind::KillNode,
    FaultKind::RestartNode,
    FaultKind::PauseNode,
    FaultKind::Disconnect,
    FaultKind::CutLink,
];

fn kinds(backend: Backend, link_cuts: bool) -> Vec<FaultKind> {
    match backend {
        Backend::Local if link_cuts => [&LOCAL_KINDS[..], &[FaultKind::CutLink]].concat(),
        Backend::Local => LOCAL_KINDS.to_vec(),
        Backend::Docker => DOCKER_KINDS.to_vec(),
    }
}

/// One fault of the schedule: `kind` on `victims` (0-based) from `start`
/// for `length`.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedFault {
    pub kind: FaultKind,
    pub victims: Vec<usize>,
    pub start_s: f64,
    pub length_s: f64,
}

/// The schedule `seed` gives: a quiet gap of 2–6 s, a fault of 2–8 s, and so
/// on, within the run; victims stay a minority (one node of 3, one or two
/// of 5); a cut link has its two ends as victims.
pub fn schedule(
    seed: u64,
    nodes: usize,
    duration: Duration,
    backend: Backend,
    link_cuts: bool,
) -> Vec<PlannedFault> {
    let kinds = kinds(backend, link_cuts);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let end = duration.as_secs_f64() - 2.0;
    let mut t = 3.0;
    let mut out = Vec::new();
    let max_victims = (nodes - 1) / 2;
    loop {
        t += rng.gen_range(2.0..6.0);
        let length = rng.gen_range(2.0..8.0);
        if t + length > end {
            return out;
        }
        let kind = kinds[rng.gen_range(0..kinds.len())];
        let count = if kind == FaultKind::CutLink {
            2
        } else {
            rng.gen_range(1..=max_victims.max(1))
        };
        let mut victims = Vec::new();
        while victims.len() < count {
            let v = rng.gen_range(0..nodes);
            if !victims.contains(&v) {
                victims.push(v);
            }
        }
        victims.sort_unstable();
        out.push(PlannedFault {
            kind,
            victims,
            start_s: round3(t),
            length_s: round3(length),
        });
        t += length;
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub kind: FaultKind,
    /// 1-based node ids.
    pub nodes: Vec<usize>,
    pub at_s: f64,
    pub healed_s: f64,
    /// From the fault to the first probe commit after it on a node it did
    /// not hit (the majority's recovery time); none if nothing committed
    /// before the next fault.
    pub first_commit_after_s: Option<f64>,
}

impl FaultRecord {
    /// `f`, injected at `at` s and healed now (the first commit after it is
    /// filled in from the probes at the end).
    fn healed(f: &PlannedFault, at: f64, t0: Instant) -> FaultRecord {
        FaultRecord {
            kind: f.kind,
            nodes: f.victims.iter().map(|v| v + 1).collect(),
            at_s: round3(at),
            healed_s: round3(t0.elapsed().as_secs_f64()),
            first_commit_after_s: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub backend: String,
    pub seed: u64,
    pub nodes: usize,
    pub duration_s: f64,
    pub consistent: bool,
    pub problems: Vec<String>,
    pub ledger_acknowledged: usize,
    pub ledger_missing: i64,
    pub prepared_left: i64,
    pub bank_ok: bool,
    pub bank_transfers: u64,
    pub script_transactions: u64,
    pub probe_commits: u64,
    pub faults: usize,
    pub fault_log: Vec<FaultRecord>,
    /// The longest stretch of the load in which no node committed a probe.
    pub max_unavailable_s: f64,
    /// Commits per second per node (probe writers), one row per second.
    pub timeline: Vec<Vec<u32>>,
    /// From the heal to every node `online`.
    pub online_after_heal_s: Option<f64>,
    /// mmd processes the harness had to start again (e.g. after a watchdog stop).
    pub mmd_restarts: u64,
    pub repro: String,
}

/// Probe commit times per node, in seconds since the load started.
type ProbeLog = Arc<Mutex<Vec<Vec<f64>>>>;

pub async fn run_chaos(opts: &ChaosOptions, progress: &dyn Fn(&str)) -> Result<ChaosReport> {
    if opts.nodes < 3 {
        bail!("chaos needs at least 3 nodes (a fault must leave a majority)");
    }
    let plan = schedule(
        opts.seed,
        opts.nodes,
        opts.duration,
        opts.backend,
        opts.link_cuts,
    );
    progress(&format!(
        "seed {}: {} faults planned over {:?}",
        opts.seed,
        plan.len(),
        opts.duration
    ));
    for f in &plan {
        progress(&format!(
            "  at {:>6.1} s for {:>4.1} s: {:?} on node(s) {:?}",
            f.start_s,
            f.length_s,
            f.kind,
            f.victims.iter().map(|v| v + 1).collect::<Vec<_>>()
        ));
    }
    let log = std::env::var("MM_LOG").unwrap_or_else(|_| "info".into());
    let mut cluster = Target::start(opts, progress).await?;

    let n1 = cluster.connect_proxy(0).await?;
    for sql in [SEED_SCHEMA, BANK_SCHEMA, LEDGER_SCHEMA, PROBE_SCHEMA] {
        n1.batch_execute(sql)
            .await
            .with_context(|| format!("through node 1's mmd: {sql}"))?;
    }
    let accounts = 50;
    let initial = 1000;
    n1.batch_execute(&bank_seed_sql(accounts, initial))
        .await
        .context("seeding the bank")?;
    drop(n1);
    let proxies = cluster.proxies()?;
    let direct = cluster.direct()?;
    wait_rows(&direct, "select count(*) from mm_bank", i64::from(accounts)).await?;

    let stop = Stop::after(opts.duration);
    let t0 = Instant::now();

    let probes: ProbeLog = Arc::new(Mutex::new(vec![Vec::new(); opts.nodes]));
    let mut probe_tasks = Vec::new();
    for (i, conninfo) in proxies.iter().enumerate() {
        probe_tasks.push(tokio::spawn(probe(
            i,
            conninfo.clone(),
            stop.clone(),
            t0,
            probes.clone(),
        )));
    }
    let bank_cfg = BankConfig::new(proxies.clone(), accounts, initial);
    let bank = {
        let (cfg, stop) = (bank_cfg.clone(), stop.clone());
        tokio::spawn(async move { run_bank(&cfg, stop).await })
    };
    let ledger = {
        let (cfg, stop) = (LedgerConfig::new(proxies.clone()), stop.clone());
        tokio::spawn(async move { run_ledger(&cfg, stop).await })
    };
    let mut scripts = Vec::new();
    for i in 0..opts.nodes {
        let script = scripts_dir().join(format!("test{}.sql", i % 3 + 1));
        let port = cluster.client_port(i)?;
        let db = cluster.dbname();
        let bin = cluster.pgbench()?;
        let clients = opts.clients;
        let stop = stop.clone();
        scripts.push(tokio::spawn(async move {
            // Short rounds: a pgbench client gives up on a broken
            // connection, so a new round reconnects after a fault.
            let mut done = 0u64;
            while !stop.is_done() {
                let mut pb = Pgbench::new(script.clone(), clients, 3);
                pb.max_tries = Some(1000);
                match pb.run_at(&bin, port, &db).await {
                    Ok(out) => done += out.transactions.unwrap_or(0),
                    Err(_) => stop.sleep(Duration::from_millis(500)).await,
                }
                if !stop.is_done() {
                    stop.sleep(Duration::from_millis(100)).await;
                }
            }
            done
        }));
    }

    // The schedule, with the harness as every node's supervisor: an mmd
    // that stopped itself (its PostgreSQL was gone) is started again once
    // its node is not held down by a fault.
    let mut down: Vec<bool> = vec![false; opts.nodes];
    let mut records = Vec::new();
    let mut restarts = 0u64;
    let mut next = 0;
    let mut active: Option<(usize, f64)> = None;
    // A slow injection or heal (a clean PostgreSQL stop can take seconds)
    // delays the rest of the schedule instead of squeezing it.
    let mut shift = 0.0f64;
    while t0.elapsed() < opts.duration {
        let now = t0.elapsed().as_secs_f64();
        if let Some((k, at)) = active {
            let f = &plan[k];
            if now >= at + f.length_s {
                if let Err(e) = cluster.heal(f.kind, &f.victims, &log).await {
                    progress(&format!("{now:>6.1} s could not heal {:?}: {e:#}", f.kind));
                }
                for &v in &f.victims {
                    down[v] = false;
                }
                records.push(FaultRecord::healed(f, at, t0));
                progress(&format!("{now:>6.1} s healed {:?}", f.kind));
                shift = shift.max(t0.elapsed().as_secs_f64() - (f.start_s + f.length_s));
                active = None;
            }
        } else if next < plan.len() && now >= plan[next].start_s + shift {
            let f = &plan[next];
            if let Err(e) = cluster.inject(f.kind, &f.victims).await {
                progress(&format!(
                    "{now:>6.1} s could not inject {:?}: {e:#}",
                    f.kind
                ));
            }
            for &v in &f.victims {
                down[v] = true;
            }
            progress(&format!(
                "{now:>6.1} s {:?} on node(s) {:?}",
                f.kind,
                f.victims.iter().map(|v| v + 1).collect::<Vec<_>>()
            ));
            active = Some((next, now));
            next += 1;
        }
        restarts += cluster.supervise(&down, &log, progress)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some((k, at)) = active {
        let f = &plan[k];
        if let Err(e) = cluster.heal(f.kind, &f.victims, &log).await {
            progress(&format!("could not heal {:?}: {e:#}", f.kind));
        }
        records.push(FaultRecord::healed(f, at, t0));
    }
    let load_s = t0.elapsed().as_secs_f64();
    progress("load stopped; every fault healed; waiting for every node to be online");

    let mut script_transactions = 0;
    for s in scripts {
        script_transactions += s.await.context("pgbench task")?;
    }
    for p in probe_tasks {
        p.await.context("probe task")?;
    }
    let bank = bank.await.context("bank task")?;
    let ledger = ledger.await.context("ledger task")?;

    let heal_at = Instant::now();
    let mut problems = Vec::new();
    let online_after_heal_s = loop {
        restarts += cluster.supervise(&vec![false; opts.nodes], &log, progress)?;
        if cluster.all_online().await {
            break Some(heal_at.elapsed().as_secs_f64());
        }
        if heal_at.elapsed() > Duration::from_secs(120) {
            problems.push("not every node was online 120 s after the heal".to_string());
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    settle_prepared(&direct, Duration::from_secs(60)).await;

    let expect = Expect {
        bank_total: Some(bank_cfg.expected_total()),
        acknowledged: Some(ledger.acknowledged.clone()),
    };
    let verdict = check_nodes(&direct, &expect).await;
    problems.extend(verdict.problems.iter().cloned());
    if !bank.ok() {
        problems.push(format!(
            "bank: {} reads saw a wrong total ({}); unexpected errors: {}",
            bank.readers.violations,
            bank.readers.violation_samples.join("; "),
            bank.writers
                .error_samples
                .iter()
                .chain(&bank.readers.ops.error_samples)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let probes = probes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let probe_acked: i64 = probes.iter().map(|p| p.len() as i64).sum();
    problems.extend(check_probe_rows(&direct, &probes).await);

    let mut all: Vec<f64> = probes.iter().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    let mut max_gap = 0.0f64;
    let mut last = all.first().copied().unwrap_or(0.0);
    for &t in all.iter().chain(std::iter::once(&load_s)) {
        max_gap = max_gap.max(t - last);
        last = t;
    }
    for r in &mut records {
        let at = r.at_s;
        r.first_commit_after_s = probes
            .iter()
            .enumerate()
            .filter(|(i, _)| !r.nodes.contains(&(i + 1)))
            .filter_map(|(_, p)| p.iter().copied().find(|&t| t >= at))
            .min_by(f64::total_cmp)
            .map(|t| round3(t - at));
    }
    let secs = load_s.ceil() as usize;
    let mut timeline = vec![vec![0u32; opts.nodes]; secs.max(1)];
    for (i, p) in probes.iter().enumerate() {
        for &t in p {
            if let Some(row) = timeline.get_mut(t as usize) {
                row[i] += 1;
            }
        }
    }

    let ledger_missing = verdict
        .nodes
        .iter()
        .filter_map(|n| n.ledger_missing)
        .max()
        .unwrap_or(0);
    let prepared_left = verdict.nodes.iter().filter_map(|n| n.prepared_left).sum();
    let report = ChaosReport {
        backend: opts.backend.name().into(),
        seed: opts.seed,
        nodes: opts.nodes,
        duration_s: round3(load_s),
        consistent: verdict.consistent && problems.is_empty(),
        problems,
        ledger_acknowledged: ledger.acknowledged.len(),
        ledger_missing,
        prepared_left,
        bank_ok: bank.ok(),
        bank_transfers: bank.writers.committed,
        script_transactions,
        probe_commits: probe_acked as u64,
        faults: records.len(),
        fault_log: records,
        max_unavailable_s: round3(max_gap),
        timeline,
        online_after_heal_s: online_after_heal_s.map(round3),
        mmd_restarts: restarts,
        repro: format!(
            "mm-harness chaos --backend {} --nodes {} --duration {}s --seed {}{}",
            opts.backend.name(),
            opts.nodes,
            opts.duration.as_secs(),
            opts.seed,
            if opts.backend == Backend::Local && !opts.link_cuts {
                " --no-link-cuts"
            } else {
                ""
            }
        ),
    };
    cluster.stop().await;
    Ok(report)
}

/// The cluster under test, on either backend.
enum Target {
    Local(Box<MmCluster>),
    Docker(Box<DockerCluster>),
}

impl Target {
    async fn start(opts: &ChaosOptions, progress: &dyn Fn(&str)) -> Result<Target> {
        match opts.backend {
            Backend::Local => {
                let mut pg_cfg = LocalClusterConfig::for_tests("chaos", opts.nodes);
                pg_cfg.work_dir = opts.work_dir.clone();
                pg_cfg.stop_on_signal = true;
                pg_cfg.link_cuts = opts.link_cuts;
                let c = MmCluster::start(pg_cfg, MmOptions::default()).await?;
                progress(&format!(
                    "cluster online; work dir {}",
                    c.pg.work_dir().display()
                ));
                Ok(Target::Local(Box::new(c)))
            }
            Backend::Docker => {
                let c = DockerCluster::start(DockerClusterConfig::for_tests(opts.nodes)).await?;
                let names: Vec<&str> = c.nodes().iter().map(|n| n.container.as_str()).collect();
                progress(&format!("cluster online: containers {}", names.join(", ")));
                Ok(Target::Docker(Box::new(c)))
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Target::Local(c) => c.nodes.len(),
            Target::Docker(c) => c.len(),
        }
    }

    fn dbname(&self) -> String {
        match self {
            Target::Local(c) => c.dbname().to_string(),
            Target::Docker(_) => "postgres".into(),
        }
    }

    async fn connect_proxy(&self, i: usize) -> Result<tokio_postgres::Client> {
        match self {
            Target::Local(c) => c.connect_proxy(i).await,
            Target::Docker(c) => c.connect_proxy(i).await,
        }
    }

    /// Each node's mmd, from here.
    fn proxies(&self) -> Result<Vec<String>> {
        (0..self.len())
            .map(|i| match self {
                Target::Local(c) => Ok(c.nodes[i].client_conninfo(c.dbname())),
                Target::Docker(c) => c.client_conninfo(i),
            })
            .collect()
    }

    /// Each node's PostgreSQL, from here, for the checks.
    fn direct(&self) -> Result<Vec<String>> {
        (0..self.len())
            .map(|i| match self {
                Target::Local(c) => Ok(c.pg.conninfo(i)),
                Target::Docker(c) => c.pg_conninfo(i),
            })
            .collect()
    }

    /// The port of node `i`'s mmd on 127.0.0.1 (for pgbench).
    fn client_port(&self, i: usize) -> Result<u16> {
        match self {
            Target::Local(c) => Ok(c.nodes[i].client_port),
            Target::Docker(c) => c.nodes()[i]
                .client_host_port
                .ok_or_else(|| anyhow::anyhow!("node {} publishes no proxy port", i + 1)),
        }
    }

    fn pgbench(&self) -> Result<PgBin> {
        match self {
            Target::Local(c) => Ok(c.pg.bin().clone()),
            Target::Docker(_) => PgBin::find(),
        }
    }

    async fn inject(&mut self, kind: FaultKind, victims: &[usize]) -> Result<()> {
        match self {
            Target::Local(c) => {
                if kind == FaultKind::CutLink {
                    return c.cut_link(victims[0], victims[1]);
                }
                for &v in victims {
                    match kind {
                        FaultKind::KillMmd => c.kill_mmd(v),
                        FaultKind::KillPostgres => c.pg.kill9(v)?,
                        FaultKind::PauseNode => {
                            let _ = c.signal_mmd(v, libc::SIGSTOP); // it may have stopped itself
                            c.pg.pause(v)?;
                        }
                        FaultKind::PauseMmd => c.signal_mmd(v, libc::SIGSTOP)?,
                        FaultKind::RestartNode => {
                            c.stop_mmd(v);
                            c.pg.stop_node(v)?;
                        }
                        other => bail!("{other:?} is not a local-backend fault"),
                    }
                }
            }
            Target::Docker(c) => {
                if kind == FaultKind::CutLink {
                    return c.cut_link(victims[0], victims[1]).await;
                }
                for &v in victims {
                    match kind {
                        FaultKind::KillNode => c.kill(v).await?,
                        FaultKind::RestartNode => c.stop_node(v).await?,
                        FaultKind::PauseNode => c.pause(v).await?,
                        FaultKind::Disconnect => c.disconnect(v).await?,
                        other => bail!("{other:?} is not a Docker-backend fault"),
                    }
                }
            }
        }
        Ok(())
    }

    async fn heal(&mut self, kind: FaultKind, victims: &[usize], log: &str) -> Result<()> {
        match self {
            Target::Local(c) => {
                if kind == FaultKind::CutLink {
                    return c.heal_link(victims[0], victims[1]);
                }
                for &v in victims {
                    match kind {
                        FaultKind::KillMmd => c.start_mmd(v, log)?,
                        FaultKind::KillPostgres | FaultKind::RestartNode => {
                            c.pg.start_node(v).await?;
                            c.stop_mmd(v); // the watchdog may not have stopped it yet
                            c.start_mmd(v, log)?;
                        }
                        FaultKind::PauseNode => {
                            c.pg.resume(v)?;
                            let _ = c.signal_mmd(v, libc::SIGCONT);
                        }
                        FaultKind::PauseMmd => {
                            let _ = c.signal_mmd(v, libc::SIGCONT);
                        }
                        other => bail!("{other:?} is not a local-backend fault"),
                    }
                }
            }
            Target::Docker(c) => {
                if kind == FaultKind::CutLink {
                    return c.heal_link(victims[0], victims[1]).await;
                }
                for &v in victims {
                    match kind {
                        FaultKind::KillNode | FaultKind::RestartNode => c.start_node(v).await?,
                        FaultKind::PauseNode => c.unpause(v).await?,
                        FaultKind::Disconnect => c.reconnect(v).await?,
                        other => bail!("{other:?} is not a Docker-backend fault"),
                    }
                }
            }
        }
        Ok(())
    }

    /// Local backend: start again every mmd that stopped (its PostgreSQL
    /// was gone) on a node no fault holds down, as systemd would. In Docker
    /// the container's entrypoint does that. Returns how many it started.
    fn supervise(&mut self, down: &[bool], log: &str, progress: &dyn Fn(&str)) -> Result<u64> {
        let mut n = 0;
        if let Target::Local(c) = self {
            for (i, &is_down) in down.iter().enumerate() {
                if !is_down && c.pg.node(i).is_running() && !c.mmd_running(i) {
                    progress(&format!(
                        "starting the mmd of node {} again (it stopped)",
                        i + 1
                    ));
                    c.start_mmd(i, log)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    async fn all_online(&mut self) -> bool {
        for i in 0..self.len() {
            let st = match self {
                Target::Local(c) => c.status(i).await,
                Target::Docker(c) => c.status(i).await,
            };
            if st.ok().as_deref() != Some("online") {
                return false;
            }
        }
        true
    }

    async fn stop(&mut self) {
        match self {
            Target::Local(c) => c.stop_mmds(),
            Target::Docker(c) => {
                let _ = c.remove().await;
            }
        }
    }
}

/// Commit one row after another through node `i`'s mmd; note each commit.
async fn probe(i: usize, conninfo: String, stop: Stop, t0: Instant, log: ProbeLog) {
    let mut seq: i64 = 0;
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.is_done() {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = mm_workloads::conn::connect(&conninfo, Duration::from_secs(2))
                .await
                .ok();
            if client.is_none() {
                stop.sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let c = client.as_ref().expect("connected above");
        seq += 1;
        let node = (i + 1) as i32;
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            c.execute(
                "insert into chaos_probe(node, seq) values ($1, $2)",
                &[&node, &seq],
            ),
        )
        .await;
        match r {
            Ok(Ok(_)) => {
                let t = t0.elapsed().as_secs_f64();
                log.lock().unwrap_or_else(|p| p.into_inner())[i].push(t);
                stop.sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(_)) => stop.sleep(Duration::from_millis(100)).await,
            Err(_) => client = None, // no answer: a new session
        }
    }
}

/// Every acknowledged probe row is on every node.
async fn check_probe_rows(direct: &[String], probes: &[Vec<f64>]) -> Vec<String> {
    let mut problems = Vec::new();
    for (n, conninfo) in direct.iter().enumerate() {
        let Ok(db) = mm_workloads::conn::connect(conninfo, Duration::from_secs(5)).await else {
            problems.push(format!("node {}: cannot read the probe rows", n + 1));
            continue;
        };
        for (i, p) in probes.iter().enumerate() {
            let node = (i + 1) as i32;
            let r = db
                .query_one("select count(*) from chaos_probe where node = $1", &[&node])
                .await;
            if let Ok(r) = r {
                let have: i64 = r.get(0);
                if have < p.len() as i64 {
                    problems.push(format!(
                        "node {}: {} of node {}'s {} acknowledged probe rows",
                        n + 1,
                        have,
                        i + 1,
                        p.len()
                    ));
                }
            }
        }
    }
    problems
}

async fn wait_rows(direct: &[String], sql: &str, want: i64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, conninfo) in direct.iter().enumerate() {
        let db = mm_workloads::conn::connect(conninfo, Duration::from_secs(5)).await?;
        loop {
            let n: i64 = db.query_one(sql, &[]).await?.get(0);
            if n == want {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {}: `{sql}` gave {n}, not {want}", i + 1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Wait (bounded) until no node holds a prepared transaction, three
/// readings a second apart: a peer's stream still being applied can prepare
/// (and then roll back) a transaction after one reading saw none.
async fn settle_prepared(direct: &[String], limit: Duration) {
    let start = Instant::now();
    let mut clean = 0;
    while clean < 3 && start.elapsed() < limit {
        let mut left = 0i64;
        for c in direct {
            match mm_workloads::conn::connect(c, Duration::from_secs(5)).await {
                Ok(db) => match db
                    .query_one("select count(*) from pg_prepared_xacts", &[])
                    .await
                {
                    Ok(r) => left += r.get::<_, i64>(0),
                    Err(_) => left += 1,
                },
                Err(_) => left += 1,
            }
        }
        clean = if left == 0 { clean + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(if left == 0 { 1000 } else { 200 })).await;
    }
}

impl ChaosReport {
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "chaos ({} backend, {} nodes, seed {}, {:.0} s): {}\n",
            self.backend,
            self.nodes,
            self.seed,
            self.duration_s,
            if self.consistent {
                "CONSISTENT"
            } else {
                "INCONSISTENT"
            }
        ));
        for p in &self.problems {
            s.push_str(&format!("  problem: {p}\n"));
        }
        s.push_str("faults (fault → first commit on a node it did not hit):\n");
        for f in &self.fault_log {
            s.push_str(&format!(
                "  {:>6.1}–{:>6.1} s {:<13} node(s) {:?}: {}\n",
                f.at_s,
                f.healed_s,
                format!("{:?}", f.kind),
                f.nodes,
                f.first_commit_after_s
                    .map_or("no commit".to_string(), |t| format!("{t:.2} s"))
            ));
        }
        s.push_str("commits per second per node (probe writers):\n");
        for (sec, row) in self.timeline.iter().enumerate() {
            let marks: String = self
                .fault_log
                .iter()
                .filter(|f| f.at_s as usize == sec)
                .map(|f| format!(" <- {:?} {:?}", f.kind, f.nodes))
                .collect();
            s.push_str(&format!("  {sec:>4} {row:?}{marks}\n"));
        }
        s.push_str(&format!(
            "max unavailable {:.2} s; online {} s after the heal; ledger {} acknowledged, {} \
             missing; prepared left {}; bank {} ({} transfers); {} script transactions; {} mmd \
             restarts\nrepro: {}\n",
            self.max_unavailable_s,
            self.online_after_heal_s
                .map_or("never".to_string(), |t| format!("{t:.1}")),
            self.ledger_acknowledged,
            self.ledger_missing,
            self.prepared_left,
            if self.bank_ok { "ok" } else { "WRONG TOTAL" },
            self.bank_transfers,
            self.script_transactions,
            self.mmd_restarts,
            self.repro
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_schedule_of_minority_faults() {
        let a = schedule(7, 5, Duration::from_secs(120), Backend::Local, true);
        let b = schedule(7, 5, Duration::from_secs(120), Backend::Local, true);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert!(a.len() > 5);
        for f in &a {
            assert!(!f.victims.is_empty() && f.victims.len() <= 2);
            assert!(f.start_s + f.length_s <= 118.0);
        }
        assert_ne!(
            format!("{a:?}"),
            format!(
                "{:?}",
                schedule(8, 5, Duration::from_secs(120), Backend::Local, true)
            )
        );
        assert!(
            schedule(1, 3, Duration::from_secs(60), Backend::Local, false)
                .iter()
                .all(|f| f.victims.len() == 1)
        );
    }
}
