//! Runs pgbench (the seed workload's client) against a node.
//!
//! Latency percentiles come from pgbench's per-transaction log (`-l
//! --log-prefix`, see [`Pgbench::with_transaction_log`] and
//! [`read_transaction_log`]): one line per finished transaction with its
//! latency in microseconds, so p50/p99 are exact over every transaction. The
//! summary's "latency average" has no percentiles, `--report-per-command`
//! gives per-statement averages only, and the aggregate log
//! (`--aggregate-interval`) keeps sum, sum of squares, min and max per
//! interval, from which percentiles cannot be recovered. The per-transaction
//! log costs one buffered line per transaction in each pgbench thread.

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
    /// `-l --log-prefix=PREFIX`: a per-transaction log per pgbench thread,
    /// files `PREFIX.<pid>` and `PREFIX.<pid>.<thread>`.
    pub log_prefix: Option<PathBuf>,
    /// `--max-tries`: retry serialization failures (40001, what mm answers
    /// when the cluster aborts a transaction) and deadlocks up to this many tries.
    pub max_tries: Option<u32>,
}

impl Pgbench {
    pub fn new(script: impl Into<PathBuf>, clients: u32, seconds: u32) -> Self {
        Pgbench {
            script: script.into(),
            clients,
            jobs: clients,
            seconds,
            protocol: "prepared".into(),
            log_prefix: None,
            max_tries: None,
        }
    }

    /// Also write the per-transaction log under `prefix` (see [`read_transaction_log`]).
    pub fn with_transaction_log(mut self, prefix: impl Into<PathBuf>) -> Self {
        self.log_prefix = Some(prefix.into());
        self
    }

    /// Runs it to completion (no `-i`: the script's table must exist).
    pub async fn run(&self, bin: &PgBin, node: &LocalNode) -> Result<PgbenchOutcome> {
        self.run_at(bin, node.port, &node.dbname).await
    }

    /// Runs it against `127.0.0.1:port` (a node's PostgreSQL or its mmd).
    pub async fn run_at(&self, bin: &PgBin, port: u16, dbname: &str) -> Result<PgbenchOutcome> {
        let mut cmd = tokio::process::Command::new(bin.pgbench());
        if let Some(n) = self.max_tries {
            cmd.arg(format!("--max-tries={n}"));
        }
        if let Some(prefix) = &self.log_prefix {
            let mut arg = std::ffi::OsString::from("--log-prefix=");
            arg.push(prefix);
            cmd.arg("-l").arg(arg);
        }
        let out = cmd
            .args(["-M", &self.protocol, "-n", "-f"])
            .arg(&self.script)
            .args([
                "-c",
                &self.clients.to_string(),
                "-j",
                &self.jobs.to_string(),
            ])
            .args(["-T", &self.seconds.to_string()])
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
            .arg(dbname)
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
            failed: field("number of failed transactions:").and_then(|s| s.parse().ok()),
            retried: field("number of transactions retried:").and_then(|s| s.parse().ok()),
            latency_avg_ms: field("latency average =").and_then(|s| s.parse().ok()),
            aborted_clients: stderr
                .lines()
                .filter(|l| l.contains("aborted in command"))
                .count() as u64,
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
    /// "number of failed transactions" (serialization or deadlock errors; pgbench 15).
    pub failed: Option<u64>,
    /// "number of transactions retried" (with `--max-tries` > 1).
    pub retried: Option<u64>,
    /// "latency average = X ms".
    pub latency_avg_ms: Option<f64>,
    /// Clients that died on an error ("client N aborted in command ..." on stderr).
    pub aborted_clients: u64,
    pub stdout: String,
    pub stderr: String,
}

/// What a per-transaction log says.
#[derive(Debug, Clone, Default)]
pub struct TransactionLog {
    /// Latency of every finished transaction, microseconds, in file order.
    pub latencies_us: Vec<u64>,
    /// Lines whose time is not a number: "failed", "serialization",
    /// "deadlock" (failed transactions) or "skipped" (only with `--rate`).
    pub not_finished: u64,
    /// The files read.
    pub files: Vec<PathBuf>,
}

/// Reads every file a run with [`Pgbench::with_transaction_log`]`(prefix)`
/// wrote: `prefix.<pid>` and `prefix.<pid>.<thread>`. A line is
/// `client_id transaction_no time script_no time_epoch time_us [...]`, with
/// `time` the transaction's latency in microseconds.
pub fn read_transaction_log(prefix: &Path) -> Result<TransactionLog> {
    let dir = match prefix.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let stem = prefix
        .file_name()
        .with_context(|| format!("log prefix {} has no file name", prefix.display()))?
        .to_string_lossy()
        .into_owned();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| is_log_of(&e.file_name().to_string_lossy(), &stem))
        .map(|e| e.path())
        .collect();
    files.sort();
    let mut log = TransactionLog::default();
    for f in &files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for line in text.lines() {
            if let Some(t) = line.split_whitespace().nth(2) {
                match t.parse::<u64>() {
                    Ok(us) => log.latencies_us.push(us),
                    Err(_) => log.not_finished += 1,
                }
            }
        }
    }
    log.files = files;
    Ok(log)
}

/// `stem.<digits>` or `stem.<digits>.<digits>`.
fn is_log_of(name: &str, stem: &str) -> bool {
    let Some(rest) = name.strip_prefix(stem).and_then(|r| r.strip_prefix('.')) else {
        return false;
    };
    let parts: Vec<&str> = rest.split('.').collect();
    (1..=2).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_file_names() {
        assert!(is_log_of("test1.1234", "test1"));
        assert!(is_log_of("test1.1234.7", "test1"));
        assert!(!is_log_of("test1.1234.7.1", "test1"));
        assert!(!is_log_of("test10.1234", "test1"));
        assert!(!is_log_of("test1.x", "test1"));
        assert!(!is_log_of("test1", "test1"));
    }

    #[test]
    fn reads_transaction_logs() {
        let dir = std::env::temp_dir().join(format!("mm-pgbench-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("s.42"),
            "0 0 1500 0 1700000000 1\n0 1 failed 0 1700000000 2\n",
        )
        .unwrap();
        std::fs::write(dir.join("s.42.1"), "1 0 2500 0 1700000000 3\n").unwrap();
        std::fs::write(dir.join("other.42"), "1 0 9999 0 1700000000 3\n").unwrap();
        let log = read_transaction_log(&dir.join("s")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(log.latencies_us, vec![1500, 2500]);
        assert_eq!(log.not_finished, 1);
        assert_eq!(log.files.len(), 2);
    }
}
