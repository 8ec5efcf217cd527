//! Where the PostgreSQL 15 binaries are, and which OS user runs the server.
//!
//! `initdb`, `pg_ctl` and `postgres` refuse to run as root. When the harness
//! itself runs as root (CI containers, this machine), every server-side
//! command goes through `runuser -u <user> --`, with `<user>` the `postgres`
//! account Debian's package creates (override with `MM_PG_OS_USER`), and the
//! node directories are chowned to it. Clients (`pgbench`, tokio-postgres)
//! run as whoever we are: they connect over TCP to 127.0.0.1.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The major version mm targets.
pub const PG_MAJOR: u32 = 15;
/// Where Debian's `postgresql-15` puts the server binaries.
pub const DEBIAN_BINDIR: &str = "/usr/lib/postgresql/15/bin";
const SETUP_HINT: &str = "run scripts/setup-postgres.sh (installs Debian's postgresql-15), \
                          or set MM_PG_BINDIR to a PostgreSQL 15 bin directory";

/// A located PostgreSQL 15 installation.
#[derive(Debug, Clone)]
pub struct PgBin {
    pub bindir: PathBuf,
    /// `postgres --version`, e.g. "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)".
    pub version: String,
}

impl PgBin {
    /// Finds PostgreSQL 15: `$MM_PG_BINDIR` if set (and nothing else), else
    /// `/usr/lib/postgresql/15/bin`, then `pg_config --bindir` if that `pg_config`
    /// is version 15.
    pub fn find() -> Result<PgBin> {
        let mut tried = Vec::new();
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(dir) = std::env::var_os("MM_PG_BINDIR") {
            // An explicit choice is the only candidate.
            candidates.push(PathBuf::from(dir));
        } else {
            candidates.push(PathBuf::from(DEBIAN_BINDIR));
            candidates.extend(pg_config_bindir());
        }
        for dir in candidates {
            match Self::at(&dir) {
                Ok(bin) => return Ok(bin),
                Err(e) => tried.push(format!("{}: {e:#}", dir.display())),
            }
        }
        bail!(
            "PostgreSQL {PG_MAJOR} server binaries not found ({}); {SETUP_HINT}",
            tried.join("; ")
        )
    }

    /// Uses `dir` if it holds a PostgreSQL 15 `postgres`, `initdb` and `pg_ctl`.
    pub fn at(dir: &Path) -> Result<PgBin> {
        for tool in ["postgres", "initdb", "pg_ctl"] {
            if !dir.join(tool).is_file() {
                bail!("no {tool}");
            }
        }
        let out = Command::new(dir.join("postgres"))
            .arg("--version")
            .output()
            .context("running postgres --version")?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match major_version(&version) {
            Some(PG_MAJOR) => Ok(PgBin {
                bindir: dir.to_path_buf(),
                version,
            }),
            other => bail!("version {other:?} ({version:?}), need {PG_MAJOR}"),
        }
    }

    pub fn tool(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// Whether this server has `name` among its settings (`postgres
    /// --describe-config`): a setting it does not know in postgresql.conf
    /// stops it from starting.
    pub fn has_setting(&self, name: &str) -> bool {
        Command::new(self.tool("postgres"))
            .arg("--describe-config")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.split('\t').next() == Some(name))
            })
            .unwrap_or(false)
    }

    /// The settings that let mmd create its slots with the mm_output plugin
    /// (scripts/build-plugin.sh): PostgreSQL 15.20 and later only allow the
    /// output plugins `output_plugin_libraries` names; earlier 15.x have no
    /// such setting and allow any.
    pub fn plugin_settings(&self) -> Vec<(String, String)> {
        if self.has_setting("output_plugin_libraries") {
            vec![(
                "output_plugin_libraries".into(),
                "'pgoutput, test_decoding, mm_output'".into(),
            )]
        } else {
            Vec::new()
        }
    }

    /// `pgbench`: the one next to the server, else whatever is on PATH.
    pub fn pgbench(&self) -> PathBuf {
        let p = self.tool("pgbench");
        if p.is_file() {
            p
        } else {
            PathBuf::from("pgbench")
        }
    }
}

fn pg_config_bindir() -> Option<PathBuf> {
    let v = Command::new("pg_config").arg("--version").output().ok()?;
    // "PostgreSQL 15.18 (Debian ...)"
    if major_version(&String::from_utf8_lossy(&v.stdout)) != Some(PG_MAJOR) {
        return None;
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The major version in "postgres (PostgreSQL) 15.18 ..." or "PostgreSQL 15.18".
pub fn major_version(s: &str) -> Option<u32> {
    let after = s.split("PostgreSQL").nth(1)?;
    let word = after
        .trim_start_matches([')', ' '])
        .split_whitespace()
        .next()?;
    word.split(['.', 'b', 'r', 'd']).next()?.parse().ok()
}

/// The OS user the server processes run as.
#[derive(Debug, Clone)]
pub enum RunAs {
    /// We are not root: run the server as ourselves.
    Myself,
    /// We are root: run it as this unprivileged user via `runuser`.
    User { name: String, uid: u32, gid: u32 },
}

impl RunAs {
    /// `Myself` unless we are root; then `$MM_PG_OS_USER` or `postgres`.
    pub fn detect() -> Result<RunAs> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(RunAs::Myself);
        }
        let name = std::env::var("MM_PG_OS_USER").unwrap_or_else(|_| "postgres".to_string());
        let id = |flag: &str| -> Result<u32> {
            let out = Command::new("id").arg(flag).arg(&name).output()?;
            if !out.status.success() {
                bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
        };
        let (uid, gid) = match (id("-u"), id("-g")) {
            (Ok(u), Ok(g)) => (u, g),
            (Err(e), _) | (_, Err(e)) => bail!(
                "running as root, and initdb/postgres refuse root: they must run as an unprivileged \
                 OS user, but user {name:?} does not exist ({e}); scripts/setup-postgres.sh creates \
                 'postgres', or set MM_PG_OS_USER"
            ),
        };
        if uid == 0 {
            bail!("MM_PG_OS_USER={name} is root; PostgreSQL refuses to run as root");
        }
        if Command::new("runuser").arg("--help").output().is_err() {
            bail!("running as root needs `runuser` (util-linux) to start PostgreSQL as {name}");
        }
        Ok(RunAs::User { name, uid, gid })
    }

    /// A command for `program` that runs as the server user, with PG* variables
    /// that could redirect it (PGDATA, PGPORT, PGHOST) removed.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = match self {
            RunAs::Myself => Command::new(program),
            RunAs::User { name, .. } => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(name).arg("--").arg(program);
                c
            }
        };
        for var in ["PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE"] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Makes `path` owned by the server user (no-op when that is us).
    pub fn chown(&self, path: &Path) -> Result<()> {
        if let RunAs::User { uid, gid, .. } = self {
            std::os::unix::fs::chown(path, Some(*uid), Some(*gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        match self {
            RunAs::Myself => "current user".into(),
            RunAs::User { name, .. } => format!("OS user {name} (we are root)"),
        }
    }
}

/// Runs a server-side command to completion; an error carries its output.
pub fn run_checked(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: could not run {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(anyhow!("{what} failed ({}):\n{}", out.status, text.trim()));
    }
    Ok(text)
}

/// For tests: the PostgreSQL 15 binaries, or `None` after printing why the
/// test is skipped. With `MM_REQUIRE_PG` set (CI sets it), a missing
/// PostgreSQL is a failure instead.
pub fn pg_or_skip(test: &str) -> Option<PgBin> {
    match PgBin::find() {
        Ok(bin) => Some(bin),
        Err(e) => {
            let required = std::env::var("MM_REQUIRE_PG").is_ok_and(|v| !v.is_empty() && v != "0");
            if required {
                panic!("MM_REQUIRE_PG is set but PostgreSQL 15 is missing: {e:#}");
            }
            eprintln!("SKIPPED {test}: {e:#} (set MM_REQUIRE_PG=1 to make this a failure)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::major_version;

    #[test]
    fn parses_versions() {
        assert_eq!(
            major_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(
            major_version("PostgreSQL 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(major_version("postgres (PostgreSQL) 16beta1"), Some(16));
        assert_eq!(major_version("nonsense"), None);
    }
}
