//! mmctl: operate an mm node.

use clap::{Parser, Subcommand};
use mm_runtime::config::NodeConfig;
use mm_runtime::pg::init::{init_node, InitError};
use mm_runtime::pg::membership::{add_node, drop_node};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "mmctl", about = "Operate an mm node")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check that the node's PostgreSQL can run mm (says exactly what to
    /// change if not), then prepare it: mm schema, publication, slots, origins.
    Init {
        /// The node's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Prepare this new node to join a running cluster (after `init`, with a
    /// configuration listing every node): creates its slot on every peer and
    /// asks its mmd for an initial copy of a donor's database. Then restart
    /// the other nodes' mmd with the new configuration one at a time, and
    /// start this node's mmd.
    AddNode {
        /// The new node's TOML configuration.
        #[arg(long)]
        config: PathBuf,
        /// Go on even though this node's database has tables (they are replaced).
        #[arg(long)]
        discard_local_data: bool,
    },
    /// Remove a node from the cluster for good: drops its slots and
    /// replication origins on every remaining node. Stop the node and
    /// remove it from every remaining configuration (restarting each mmd
    /// one at a time) first.
    DropNode {
        /// A remaining node's TOML configuration (no longer listing the node).
        #[arg(long)]
        config: PathBuf,
        /// The id of the node to drop.
        #[arg(long)]
        id: mm_core::NodeId,
    },
    /// Show the node's view of the cluster: its status and generation, and
    /// per node the connections and the slot retention (from `mtm.status()`
    /// and `mtm.nodes()` in the node's PostgreSQL).
    Status {
        /// The node's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::AddNode {
            config,
            discard_local_data,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(
                "add-node",
                add_node(&cfg, discard_local_data).await,
                &format!(
                    "node {} is ready to join: restart every other node's mmd with a \
                     configuration listing it, one at a time, then start its mmd",
                    cfg.node_id
                ),
            )
        }
        Cmd::DropNode { config, id } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(
                "drop-node",
                drop_node(&cfg, id).await,
                &format!("node {id} is no longer part of the cluster"),
            )
        }
        Cmd::Status { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match status(&cfg).await {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mmctl status: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Init { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match init_node(&cfg).await {
                Ok(report) => {
                    for c in &report.created {
                        println!("created  {c}");
                    }
                    for e in &report.existing {
                        println!("exists   {e}");
                    }
                    println!("node {} is ready for mm", cfg.node_id);
                    ExitCode::SUCCESS
                }
                Err(e @ InitError::Prerequisites(_)) => {
                    eprintln!("mmctl init: {e}");
                    eprintln!("nothing was changed");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("mmctl init: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// The node's configuration, or exit code 2 after saying what is wrong.
fn load(path: &std::path::Path) -> Result<NodeConfig, ExitCode> {
    NodeConfig::load(path).map_err(|e| {
        eprintln!("mmctl: {}: {e}", path.display());
        ExitCode::from(2)
    })
}

fn report(what: &str, r: Result<Vec<String>, String>, done: &str) -> ExitCode {
    match r {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mmctl {what}: {e}");
            ExitCode::from(1)
        }
    }
}

async fn status(cfg: &NodeConfig) -> Result<String, String> {
    let (c, conn) = tokio_postgres::connect(&cfg.postgres.conninfo, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", cfg.postgres.conninfo))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let q = |e: tokio_postgres::Error| match e.as_db_error() {
        Some(db) if db.code().code() == "42883" || db.code().code() == "3F000" => {
            "mtm.status() is missing: run `mmctl init` on this node".to_string()
        }
        _ => e.to_string(),
    };
    let st = c
        .query_opt(
            "select my_node_id, status, gen_num, gen_members::text, gen_members_online::text, \
             connected::text, in_doubt, to_char(reported_at, 'HH24:MI:SS'), resync \
             from mtm.status()",
            &[],
        )
        .await
        .map_err(q)?
        .ok_or("mmd has never reported on this node (is it running?)")?;
    let mut out = format!(
        "node {}: {}  generation {} members {} online {} connected {}  in-doubt {}  (reported {})\n\n",
        st.get::<_, i32>(0),
        st.get::<_, String>(1),
        st.get::<_, i64>(2),
        st.get::<_, String>(3),
        st.get::<_, String>(4),
        st.get::<_, String>(5),
        st.get::<_, i32>(6),
        st.get::<_, String>(7),
    );
    if let Some(resync) = st.get::<_, Option<String>>(8) {
        out.insert_str(
            out.len() - 1,
            &format!("resync from a donor snapshot: {resync}\n"),
        );
    }
    out.push_str(&format!(
        "{:>4}  {:<5} {:<8} {:<9} {:<5} {:<9} {:>14} {:>12}  {}\n",
        "id",
        "self",
        "member",
        "connected",
        "link",
        "receiver",
        "slot retained",
        "slot lag",
        "slot WAL"
    ));
    let rows = c
        .query(
            "select id, is_self, enabled, connected, link, receiver_ok, \
             coalesce(pg_size_pretty(slot_retained_bytes), '-'), \
             coalesce(pg_size_pretty(slot_lag_bytes), '-'), coalesce(slot_wal_status, '-') \
             from mtm.nodes()",
            &[],
        )
        .await
        .map_err(q)?;
    let yn = |b: bool| if b { "yes" } else { "no" };
    for r in rows {
        out.push_str(&format!(
            "{:>4}  {:<5} {:<8} {:<9} {:<5} {:<9} {:>14} {:>12}  {}\n",
            r.get::<_, i32>(0),
            yn(r.get(1)),
            yn(r.get(2)),
            yn(r.get(3)),
            yn(r.get(4)),
            if r.get::<_, bool>(1) {
                "-"
            } else {
                yn(r.get(5))
            },
            r.get::<_, String>(6),
            r.get::<_, String>(7),
            r.get::<_, String>(8),
        ));
    }
    Ok(out)
}
