//! mmd: the mm daemon beside one PostgreSQL 15 server. Runs the protocol
//! core (driver), the control-plane mesh, one data-plane receiver per peer,
//! the appliers and finishers, the client proxy and the status publisher.

use clap::Parser;
use mm_runtime::config::NodeConfig;
use mm_runtime::driver::Driver;
use mm_runtime::mesh::{Mesh, MeshConfig};
use mm_runtime::pg::adapter::PgStorage;
use mm_runtime::pg::hub::Hub;
use mm_runtime::pg::receiver::{run_receiver, ReceiverSettings};
use mm_runtime::pg::resync::{find_pg_dump, initial_copy_requested, run_resync, ResyncSettings};
use mm_runtime::proxy::backend::BackendAddr;
use mm_runtime::proxy::{serve, ProxyContext};
use mm_runtime::status::run_status_writer;
use mm_runtime::watchdog::local_postgres_lost;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// How long the local PostgreSQL may fail to answer before this node stops.
const LOCAL_POSTGRES_GRACE: Duration = Duration::from_secs(3);

#[derive(Parser)]
#[command(
    name = "mmd",
    about = "mm daemon: synchronous multi-master beside PostgreSQL 15"
)]
struct Cli {
    /// The node's TOML configuration.
    #[arg(long)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cfg = match NodeConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mmd: {}: {e}", cli.config.display());
            return ExitCode::from(2);
        }
    };
    // One thread by default: mmd's work is many small hops between tasks
    // (proxy sessions, driver, receivers, appliers), and on one thread a hop
    // is a queue push instead of a cross-thread wake-up. Measured on 2 cores
    // under the seed workload: 111 script-tps and a 3.5 ms single-row INSERT
    // on one thread, 84 and 5.3 ms with a worker per core (docs/performance.md).
    // MMD_THREADS=N (N > 1) runs N worker threads instead.
    let threads: usize = std::env::var("MMD_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let built = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mmd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mmd: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cfg: NodeConfig) -> Result<(), String> {
    let mut peers = Vec::new();
    for n in cfg.nodes.values().filter(|n| n.id != cfg.node_id) {
        let conninfo = n.postgres.clone().ok_or_else(|| {
            format!(
                "nodes[id = {}].postgres is missing: mmd streams every peer's changes from its \
                 PostgreSQL, so each [[nodes]] entry needs a conninfo",
                n.id
            )
        })?;
        peers.push((n.id, conninfo));
    }
    let backend = BackendAddr::from_conninfo(&cfg.postgres.conninfo)?;
    tracing::info!("starting {cfg}");

    let hub = Arc::new(Hub::new());
    let storage = PgStorage::start(&cfg, hub.clone())
        .await
        .map_err(|e| format!("{e} (is PostgreSQL running, and did `mmctl init` prepare it?)"))?;
    let mesh_cfg = MeshConfig::from_node_config(&cfg).map_err(|e| e.to_string())?;
    let (mesh, inbox) = Mesh::start(mesh_cfg)
        .await
        .map_err(|e| format!("cannot listen on {} for the mesh: {e}", cfg.listen.mesh))?;
    let mut joining = false;
    match initial_copy_requested(&cfg.postgres.conninfo).await {
        Ok(Some(reason)) => {
            joining = true;
            tracing::warn!(
                "this node's database will be replaced by a donor's snapshot before it streams \
                 anything ({reason}); it stays out of `online` until then"
            );
            hub.hold_for_initial_copy();
        }
        Ok(None) => {}
        Err(e) => return Err(format!("reading mm.resync_request: {e} (run `mmctl init`)")),
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (driver, handle) = Driver::start_as(
        cfg.to_core_config(),
        storage,
        mesh,
        inbox,
        (tx.clone(), rx),
        joining,
    )
    .await
    .map_err(|e| format!("{e} (did `mmctl init` prepare this node?)"))?;

    tokio::spawn(run_resync(
        ResyncSettings {
            me: cfg.node_id,
            local_conninfo: cfg.postgres.conninfo.clone(),
            peers: peers.clone(),
            pg_dump: find_pg_dump(),
        },
        hub.clone(),
        handle.clone(),
    ));
    for (peer, conninfo) in peers {
        let s = ReceiverSettings {
            me: cfg.node_id,
            peer,
            peer_conninfo: conninfo,
            local_conninfo: cfg.postgres.conninfo.clone(),
            decoding_work_mem_mb: cfg.data_plane.decoding_work_mem_mb,
        };
        tokio::spawn(run_receiver(s, hub.clone(), tx.clone()));
    }
    drop(tx);

    let listener = tokio::net::TcpListener::bind(cfg.listen.client)
        .await
        .map_err(|e| format!("cannot listen on {} for clients: {e}", cfg.listen.client))?;
    let ctx = Arc::new(ProxyContext::new(
        cfg.node_id,
        cfg.nodes.len(),
        backend,
        handle.clone(),
        hub.clone(),
        handle.watch(),
        cfg.visibility,
    ));
    tokio::spawn(async move {
        if let Err(e) = serve(listener, ctx).await {
            tracing::error!("client listener failed: {e}");
        }
    });
    tokio::spawn(run_status_writer(cfg.clone(), handle.watch(), hub.clone()));

    let stopper = handle.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        tracing::info!("stopping");
        stopper.shutdown().await;
    });
    tracing::info!(client = %cfg.listen.client, "mmd is running");
    let lost = local_postgres_lost(cfg.postgres.conninfo.clone(), LOCAL_POSTGRES_GRACE);
    tokio::select! {
        r = driver.run() => r.map_err(|e| e.to_string()),
        why = lost => {
            tracing::error!("{why}");
            Err(why)
        }
    }
}
