//! mmctl: operate an mm node.

use clap::{Parser, Subcommand};
use mm_runtime::config::NodeConfig;
use mm_runtime::pg::init::{init_node, InitError};
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
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Init { config } => {
            let cfg = match NodeConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("mmctl: {}: {e}", config.display());
                    return ExitCode::from(2);
                }
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
