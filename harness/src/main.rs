//! `mm-harness`: local PostgreSQL 15 clusters for mm.
//!
//! - `mm-harness pg-up --nodes 3 [--workdir D]`: start N plain servers, print
//!   their ports and connection strings, stop them on Ctrl-C.
//! - `mm-harness pg-check --port P [--nodes N]`: does that server have the
//!   settings mm needs? Exit 0 yes, 1 no (with the postgresql.conf lines), 2
//!   cannot connect.
//! - `mm-harness chaos [--backend local|docker] [--nodes 3|5] [--duration D] [--seed S]
//!   [--json]`: workloads under seeded faults, availability, the checks.
//! - `mm-harness bench [--seconds N] [--json] [--no-fsync] [--workdir D]
//!   [--phases single,cluster,relaxed,async,two_pc,read,latency,bulk]`: mm against
//!   its baselines, phase after phase (harness/src/bench): one plain
//!   PostgreSQL, the mm cluster through its mmds, the asynchronous
//!   logical-replication mesh, plain two-phase commit, the read path
//!   through mmd vs directly vs pgbouncer, single-insert latency and bulk
//!   loads; the figures against their targets.
//! - `mm-harness bench-baselines --seconds N [--json]` (hidden): the two
//!   baselines `mm-harness bench` compares mm with: one plain PostgreSQL, and
//!   the asynchronous logical-replication mesh (harness/src/bench).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mm_harness::backend::local::{LocalCluster, LocalClusterConfig};
use mm_harness::pg_conf;

#[derive(Parser)]
#[command(name = "mm-harness", about = "Real PostgreSQL 15 clusters for mm")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The main job: a local mm cluster (PostgreSQL 15 + mmd per node) under
    /// the seed workload, bank transfers and an acknowledged-write ledger,
    /// then every node checked directly; ends in a consistency verdict.
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How long the load runs (e.g. 30s, 2m).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        duration: std::time::Duration,
        /// pgbench clients per node.
        #[arg(long, default_value_t = 10)]
        clients: u32,
        /// Run PostgreSQL with fsync = on (default off: test durability only).
        #[arg(long)]
        fsync: bool,
        /// Work directory. Default: target/mm-work/demo.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Print the report as one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Workloads (seed scripts, bank, ledger, probes) under a seeded random
    /// schedule of single-node faults, then heal and check every node; an
    /// availability timeline; the last line with --json is the report.
    Chaos {
        /// Where the nodes run: `local` (processes here) or `docker`
        /// (containers of the image scripts/build-image.sh builds).
        #[arg(long, default_value = "local")]
        backend: mm_harness::chaos::Backend,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How long the load and the faults run (e.g. 60s, 10m).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        duration: std::time::Duration,
        /// Seed of the fault schedule (printed; the same seed, the same schedule).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// pgbench clients per node.
        #[arg(long, default_value_t = 4)]
        clients: u32,
        /// Work directory. Default: target/mm-work/chaos.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Print the report as one JSON object on the last line.
        #[arg(long)]
        json: bool,
        /// Local backend: leave single-link cuts out of the schedule. They
        /// need root (a cgroup per node and iptables); without root they are
        /// left out anyway.
        #[arg(long)]
        no_link_cuts: bool,
    },
    /// Start an mm cluster (N PostgreSQL 15 + one mmd each) on 127.0.0.1
    /// and keep it running until Ctrl-C or SIGTERM; the last line printed is
    /// JSON with each node's client address, DSN, data directory and logs.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Work directory (wiped on start if mm-harness created it).
        /// Default: target/mm-work/up.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// fsync = off (faster; for tests only: not safe against an OS crash).
        #[arg(long)]
        no_fsync: bool,
    },
    /// Start N plain PostgreSQL 15 nodes on 127.0.0.1 and wait for Ctrl-C.
    PgUp {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Work directory (wiped on start if mm-harness created it).
        /// Default: target/mm-work/pg-up.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// fsync = off (faster; for tests only: not safe against an OS crash).
        #[arg(long)]
        no_fsync: bool,
    },
    /// Check a running server's settings against mm's requirements.
    PgCheck {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value = "postgres")]
        user: String,
        #[arg(long, default_value = "postgres")]
        dbname: String,
        /// Number of nodes in the intended mm cluster.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// `data_plane.appliers_per_peer` of the mmd configs (origins per peer).
        #[arg(long, default_value_t = pg_conf::DEFAULT_APPLIERS)]
        appliers_per_peer: u32,
    },
    /// mm against its baselines, one phase after the other on the same
    /// machine: (a) one plain PostgreSQL, (b) the mm cluster (3 PostgreSQL +
    /// 3 mmd) through each node's mmd, (c) three PostgreSQL in an
    /// asynchronous logical-replication mesh, all three under the seed's
    /// three scripts at once; plain 2PC over three servers under the same
    /// scripts; (d) pgbench -S on node 1 of an mm cluster, directly and
    /// through its mmd, and on a plain server through pgbouncer; one
    /// client's INSERT latency; bulk loads (pgbench -i -s 10, COPY, CREATE
    /// INDEX). Prints the figures and the ratios against their targets.
    Bench {
        /// Seconds of each measured run (pgbench -T, or the harness's own
        /// load); the read phase makes six such runs, latency two.
        #[arg(long, default_value_t = 30)]
        seconds: u32,
        /// Also print the report as one JSON object on the last line.
        #[arg(long)]
        json: bool,
        /// fsync = off on every server (faster; default on, as bench-baselines:
        /// mm commits durably, so everything is measured durable).
        #[arg(long)]
        no_fsync: bool,
        /// Root of the phases' work directories (bench-single, bench-cluster,
        /// bench-async-mesh, bench-2pc, bench-read...). Default: target/mm-work.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Comma list of the phases to run (in their fixed order):
        /// single,cluster,relaxed,async,two_pc,read,latency,bulk, or all.
        #[arg(long, default_value = "all", value_parser = parse_phases)]
        phases: mm_harness::bench::Phases,
    },
    /// The baselines without mm: one plain PostgreSQL, and three in an
    /// asynchronous logical-replication mesh, under the seed workload.
    #[command(hide = true)]
    BenchBaselines {
        /// Seconds of load (pgbench -T) for each baseline.
        #[arg(long, default_value_t = 30)]
        seconds: u32,
        /// One JSON object on stdout instead of a table.
        #[arg(long)]
        json: bool,
        /// fsync = off (faster; not what mm is measured with).
        #[arg(long)]
        no_fsync: bool,
        /// Root of the clusters' work directories. Default: target/mm-work.
        #[arg(long)]
        workdir: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Demo {
            nodes,
            duration,
            clients,
            fsync,
            workdir,
            json,
        } => {
            let opts = mm_harness::demo::DemoOptions {
                nodes,
                duration,
                clients,
                fsync,
                work_dir: workdir,
                ..Default::default()
            };
            demo(opts, json).await
        }
        Cmd::Chaos {
            backend,
            nodes,
            duration,
            seed,
            clients,
            workdir,
            json,
            no_link_cuts,
        } => {
            let root = unsafe { libc::geteuid() } == 0;
            if backend == mm_harness::chaos::Backend::Local && !no_link_cuts && !root {
                eprintln!("chaos: not root: single-link cuts are left out of the schedule");
            }
            let opts = mm_harness::chaos::ChaosOptions {
                nodes,
                duration,
                seed,
                clients,
                work_dir: workdir,
                backend,
                link_cuts: !no_link_cuts && root,
            };
            chaos(opts, json).await
        }
        Cmd::Up {
            nodes,
            workdir,
            no_fsync,
        } => up(nodes, workdir, no_fsync).await,
        Cmd::PgUp {
            nodes,
            workdir,
            no_fsync,
        } => pg_up(nodes, workdir, no_fsync).await,
        Cmd::PgCheck {
            port,
            host,
            user,
            dbname,
            nodes,
            appliers_per_peer,
        } => pg_check(&host, port, &user, &dbname, (nodes, appliers_per_peer)).await,
        Cmd::Bench {
            seconds,
            json,
            no_fsync,
            workdir,
            phases,
        } => bench(seconds, json, no_fsync, workdir, phases).await,
        Cmd::BenchBaselines {
            seconds,
            json,
            no_fsync,
            workdir,
        } => bench_baselines(seconds, json, no_fsync, workdir).await,
    }
}

fn parse_phases(s: &str) -> Result<mm_harness::bench::Phases, String> {
    mm_harness::bench::Phases::parse(s).map_err(|e| e.to_string())
}

async fn bench(
    seconds: u32,
    json: bool,
    no_fsync: bool,
    workdir: Option<PathBuf>,
    phases: mm_harness::bench::Phases,
) -> ExitCode {
    use mm_harness::bench::{self, BenchOptions};
    let bin = match mm_harness::pg_bin::PgBin::find() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("mm-harness bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = mm_harness::mm_cluster::find_mmd() {
        eprintln!("mm-harness bench: {e:#}");
        return ExitCode::from(2);
    }
    let root = workdir.unwrap_or_else(mm_harness::backend::local::default_work_root);
    let mut opts = BenchOptions::new(seconds, root);
    opts.fsync = !no_fsync;
    opts.phases = phases;
    eprintln!(
        "bench: {seconds} s per phase, fsync = {} ({}), work dirs under {}",
        if opts.fsync { "on" } else { "off" },
        if opts.fsync {
            "the default, as bench-baselines: --no-fsync turns it off"
        } else {
            "--no-fsync"
        },
        opts.work_root.display()
    );
    let progress = |m: &str| eprintln!("bench: {m}");
    match bench::run_bench(&bin, &opts, &progress).await {
        Ok(report) => {
            print!("{}", report.render());
            if json {
                match serde_json::to_string(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("bench: cannot render JSON: {e}"),
                }
            }
            // The targets are what mm aims at, not a pass/fail of the run;
            // nodes that disagree are, and so is a phase that could not run.
            let disagreed = report.cluster.as_ref().is_some_and(|c| !c.agreed);
            if disagreed || !report.errors.is_empty() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("mm-harness bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn bench_baselines(
    seconds: u32,
    json: bool,
    no_fsync: bool,
    workdir: Option<PathBuf>,
) -> ExitCode {
    use mm_harness::bench::{self, async_mesh::MeshOptions, BenchOptions};
    let bin = match mm_harness::pg_bin::PgBin::find() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("mm-harness bench-baselines: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let root = workdir.unwrap_or_else(mm_harness::backend::local::default_work_root);
    let mut opts = BenchOptions::new(seconds, root);
    opts.fsync = !no_fsync;
    eprintln!("single: one PostgreSQL, {seconds} s of the seed's three scripts");
    let single = match bench::run_single_with(&bin, &opts).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mm-harness bench-baselines: single: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("async mesh: three PostgreSQL, {seconds} s, one script per node, then convergence");
    let mesh = match bench::run_async_mesh_with(&bin, &opts, &MeshOptions::default()).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mm-harness bench-baselines: async mesh: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        let both = serde_json::json!({ "single": single, "async_mesh": mesh });
        println!("{both}");
    } else {
        println!(
            "{:<12} {:>10} {:>9} {:>9} {:>8} {:>9}  convergence",
            "baseline", "script-tps", "p50 ms", "p99 ms", "txns", "failures"
        );
        let line = |name: &str, f: &bench::PgbenchFigures, conv: String| {
            println!(
                "{name:<12} {:>10.1} {:>9.2} {:>9.2} {:>8} {:>9}  {conv}",
                f.tps, f.p50_ms, f.p99_ms, f.transactions, f.failures
            )
        };
        line("single", &single.figures, "-".into());
        let conv = match mesh.convergence_s {
            Some(s) => format!("converged {s:.1} s after the load"),
            None => format!(
                "NOT converged within {:.0} s (rows {:?})",
                mesh.convergence_timeout_s, mesh.rows
            ),
        };
        line("async-mesh", &mesh.figures, conv);
        if mesh.apply_errors > 0 {
            println!("async-mesh apply errors: {}", mesh.apply_errors);
        }
    }
    if mesh.converged {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn up(nodes: usize, workdir: Option<PathBuf>, no_fsync: bool) -> ExitCode {
    use mm_harness::mm_cluster::{MmCluster, MmOptions};
    let mut cfg = LocalClusterConfig::new("up", nodes);
    cfg.work_dir = workdir;
    cfg.fsync = !no_fsync;
    cfg.stop_on_signal = false;
    let ctrl_c = tokio::spawn(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
    tokio::task::yield_now().await;
    let cluster = match MmCluster::start(cfg, MmOptions::default()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mm-harness up: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let list: Vec<serde_json::Value> = cluster
        .nodes
        .iter()
        .map(|n| {
            let pg = cluster.pg.node(n.id - 1);
            serde_json::json!({
                "id": n.id,
                "client": format!("127.0.0.1:{}", n.client_port),
                "dsn": n.client_conninfo(cluster.dbname()),
                "postgres_dsn": pg.conninfo(),
                "data_dir": pg.data_dir,
                "config": n.config_path,
                "logs": [n.log_path.clone(), pg.log_file.clone()],
            })
        })
        .collect();
    eprintln!(
        "mm-harness up: {} nodes online; Ctrl-C stops them",
        list.len()
    );
    println!("{}", serde_json::json!({ "nodes": list }));
    let _ = ctrl_c.await;
    eprintln!("mm-harness up: stopping");
    drop(cluster);
    ExitCode::SUCCESS
}

async fn pg_up(nodes: usize, workdir: Option<PathBuf>, no_fsync: bool) -> ExitCode {
    let mut cfg = LocalClusterConfig::new("pg-up", nodes);
    cfg.work_dir = workdir;
    cfg.fsync = !no_fsync;
    // We handle Ctrl-C here, then Drop stops the nodes.
    cfg.stop_on_signal = false;
    // Listen for Ctrl-C before starting: one during startup is then handled
    // right after it (and Drop stops what started) instead of killing us.
    let ctrl_c = tokio::spawn(tokio::signal::ctrl_c());
    tokio::task::yield_now().await;
    let started = LocalCluster::start(cfg).await;
    let cluster = match started {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mm-harness pg-up: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "PostgreSQL: {} ({}), run as {}",
        cluster.bin().version,
        cluster.bin().bindir.display(),
        cluster.run_as().describe()
    );
    println!("work dir:   {}", cluster.work_dir().display());
    println!();
    println!("{:<6} {:>6}  conninfo", "node", "port");
    for n in cluster.nodes() {
        println!("{:<6} {:>6}  {}", n.name(), n.port, n.conninfo());
    }
    println!();
    println!("Ctrl-C stops all nodes.");
    let _ = ctrl_c.await;
    println!("stopping {} nodes", cluster.nodes().len());
    drop(cluster);
    ExitCode::SUCCESS
}

async fn pg_check(
    host: &str,
    port: u16,
    user: &str,
    dbname: &str,
    (nodes, appliers_per_peer): (u32, u32),
) -> ExitCode {
    let conninfo = format!("host={host} port={port} user={user} dbname={dbname}");
    let client = match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        Err(e) => {
            eprintln!("mm-harness pg-check: cannot connect ({conninfo}): {e}");
            return ExitCode::from(2);
        }
    };
    let observed = match pg_conf::observe(&client).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mm-harness pg-check: reading pg_settings: {e:#}");
            return ExitCode::from(2);
        }
    };
    let findings = pg_conf::check(&observed, nodes, appliers_per_peer);
    println!("{conninfo} (for a {nodes}-node mm cluster):");
    for f in &findings {
        println!("  [{}] {}", if f.ok { " ok " } else { "FAIL" }, f.message);
    }
    let bad: Vec<_> = findings.iter().filter(|f| !f.ok).collect();
    if bad.is_empty() {
        println!("sufficient for mm");
        ExitCode::SUCCESS
    } else {
        println!();
        println!("insufficient: add to postgresql.conf, then restart the server:");
        let req = pg_conf::Requirements {
            nodes,
            max_connections: observed.max_connections,
            appliers_per_peer,
        };
        for f in bad {
            let value = match f.setting {
                "wal_level" => "logical".to_string(),
                "max_prepared_transactions" => req.max_prepared_transactions().to_string(),
                "max_replication_slots" => req.max_replication_slots().to_string(),
                _ => req.max_wal_senders().to_string(),
            };
            println!("  {} = {value}", f.setting);
        }
        ExitCode::FAILURE
    }
}

/// `30s`, `2m`, `1h`, `90` (seconds).
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 30s, 2m, 1h)"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("{s:?}: the duration must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(v * mult))
}

async fn chaos(opts: mm_harness::chaos::ChaosOptions, json: bool) -> ExitCode {
    let progress = |s: &str| eprintln!("chaos: {s}");
    match mm_harness::chaos::run_chaos(&opts, &progress).await {
        Ok(r) => {
            print!("{}", r.render());
            if json {
                match serde_json::to_string(&r) {
                    Ok(line) => println!("{line}"),
                    Err(e) => eprintln!("mm-harness chaos: cannot encode the report: {e}"),
                }
            }
            if r.consistent {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("mm-harness chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn demo(opts: mm_harness::demo::DemoOptions, json: bool) -> ExitCode {
    mm_harness::signals::install_stop_on_signal();
    let progress = |m: &str| eprintln!("demo: {m}");
    match mm_harness::demo::run_demo(&opts, &progress).await {
        Ok(report) => {
            println!("{}", report.render());
            if json {
                match serde_json::to_string(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("demo: cannot render JSON: {e}"),
                }
            }
            if report.consistent {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("mm-harness demo: {e:#}");
            ExitCode::from(2)
        }
    }
}
