//! Runs pgbench (the seed workload's client) against a node.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

use crate::backend::local::{LocalNode, SUPERUSER};
use crate::pg_bin::PgBin;

/// The repository's `workloads/sql` directory.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("workloads")
        .join("sql")
}

/// One pgbench run: `pgbench -M prepared -n -f SCRIPT -c C -j J -T SECS`.
#[derive(Debug, Clone)]
pub struct Pgbench {
    pub script: PathBuf,
    pub clients: u32,
    pub jobs: u32,
    pub seconds: u32,
    /// `-M`: simple, extended or prepared.
    pub protocol: String,
}

impl Pgbench {
    pub fn new(script: impl Into<PathBuf>, clients: u32, seconds: u32) -> Self {
        Pgbench {
            script: script.into(),
            clients,
            jobs: clients,
            seconds,
            protocol: "prepared".into(),
        }
    }

    /// Runs it to completion (no `-i`: the script's table must exist).
    pub async fn run(&self, bin: &PgBin, node: &LocalNode) -> Result<PgbenchOutcome> {
        let out = tokio::process::Command::new(bin.pgbench())
            .args(["-M", &self.protocol, "-n", "-f"])
            .arg(&self.script)
            .args([
                "-c",
                &self.clients.to_string(),
                "-j",
                &self.jobs.to_string(),
            ])
            .args(["-T", &self.seconds.to_string()])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &node.port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .arg(&node.dbname)
            .output()
            .await
            .with_context(|| format!("running {}", bin.pgbench().display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let field = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned)
        };
        Ok(PgbenchOutcome {
            success: out.status.success(),
            transactions: field("number of transactions actually processed:")
                .and_then(|s| s.split('/').next().and_then(|n| n.parse().ok())),
            tps: field("tps =").and_then(|s| s.parse().ok()),
            stdout,
            stderr,
        })
    }
}

#[derive(Debug, Clone)]
pub struct PgbenchOutcome {
    pub success: bool,
    pub transactions: Option<u64>,
    pub tps: Option<f64>,
    pub stdout: String,
    pub stderr: String,
}
