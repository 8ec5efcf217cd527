//! A pgbouncer of the harness's own, for the read baseline: Debian's
//! package (`scripts/setup-postgres.sh` installs it; bookworm's 1.18 has no
//! prepared statements in transaction pooling, hence `pgbench -M simple`
//! through it). Never the system service: its own ini, auth file, log and
//! pid file in a work directory, listening on 127.0.0.1 on a free port,
//! `pool_mode = transaction`, pointing at one PostgreSQL. pgbouncer refuses
//! to run as root, so when the harness is root it runs as the server's OS
//! user ([`RunAs`]), like PostgreSQL itself.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::backend::local::{free_ports, SUPERUSER};
use crate::pg_bin::RunAs;

/// What the ini says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BouncerConfig {
    pub listen_port: u16,
    /// The PostgreSQL server behind it, on 127.0.0.1.
    pub server_port: u16,
    pub dbname: String,
    /// Server connections per database/user pair: one per client, so the
    /// pool itself never makes a client wait.
    pub pool_size: u32,
    pub max_client_conn: u32,
    pub dir: PathBuf,
}

impl BouncerConfig {
    pub fn ini_path(&self) -> PathBuf {
        self.dir.join("pgbouncer.ini")
    }
    pub fn auth_path(&self) -> PathBuf {
        self.dir.join("userlist.txt")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("pgbouncer.log")
    }

    /// The ini file's text.
    pub fn render_ini(&self) -> String {
        format!(
            "; written by mm-harness bench\n\
             [databases]\n\
             {db} = host=127.0.0.1 port={server} dbname={db} user={SUPERUSER}\n\
             \n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {listen}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {auth}\n\
             pool_mode = transaction\n\
             default_pool_size = {pool}\n\
             min_pool_size = 0\n\
             reserve_pool_size = 0\n\
             max_client_conn = {maxc}\n\
             max_db_connections = 0\n\
             logfile = {log}\n\
             pidfile = {pid}\n\
             log_connections = 0\n\
             log_disconnections = 0\n\
             ignore_startup_parameters = extra_float_digits\n",
            db = self.dbname,
            server = self.server_port,
            listen = self.listen_port,
            auth = self.auth_path().display(),
            pool = self.pool_size,
            maxc = self.max_client_conn,
            log = self.log_path().display(),
            pid = self.dir.join("pgbouncer.pid").display(),
        )
    }

    /// The auth file: with `auth_type = trust` the user must still be listed.
    pub fn render_auth(&self) -> String {
        format!("\"{SUPERUSER}\" \"\"\n")
    }
}

/// `$MM_PGBOUNCER`, else `/usr/sbin/pgbouncer` (Debian), else `pgbouncer` on PATH.
pub fn find_pgbouncer() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MM_PGBOUNCER") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("MM_PGBOUNCER={} is not a file", p.display());
    }
    let debian = Path::new("/usr/sbin/pgbouncer");
    if debian.is_file() {
        return Ok(debian.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let c = d.join("pgbouncer");
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    bail!("pgbouncer not found: run scripts/setup-postgres.sh (installs Debian's pgbouncer) or set MM_PGBOUNCER")
}

/// A running pgbouncer; dropping it stops it.
pub struct Pgbouncer {
    pub cfg: BouncerConfig,
    child: Child,
}

impl Pgbouncer {
    /// Writes the files into `dir` (created) and starts pgbouncer in front
    /// of `127.0.0.1:server_port`; returns once it answers a query.
    pub async fn start(
        dir: &Path,
        server_port: u16,
        dbname: &str,
        clients: u32,
    ) -> Result<Pgbouncer> {
        let bin = find_pgbouncer()?;
        let run_as = RunAs::detect()?;
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        run_as.chown(dir)?;
        let cfg = BouncerConfig {
            listen_port: free_ports(1)?[0],
            server_port,
            dbname: dbname.to_string(),
            pool_size: clients,
            max_client_conn: clients + 20,
            dir: dir.to_path_buf(),
        };
        for (path, text) in [
            (cfg.ini_path(), cfg.render_ini()),
            (cfg.auth_path(), cfg.render_auth()),
        ] {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            run_as.chown(&path)?;
        }
        let out = std::fs::File::create(dir.join("pgbouncer.stderr"))
            .context("creating pgbouncer.stderr")?;
        let mut cmd = Command::new(&bin);
        cmd.arg(cfg.ini_path())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        use std::os::unix::process::CommandExt;
        if let RunAs::User { uid, gid, .. } = run_as {
            // pgbouncer refuses root; a direct child (not via runuser) so
            // stopping it is one signal to a pid we know.
            cmd.uid(uid).gid(gid);
        }
        // It must not outlive the harness (set after the uid change, which
        // would clear it).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut b = Pgbouncer { cfg, child };
        b.wait_ready(Duration::from_secs(15)).await?;
        Ok(b)
    }

    pub fn port(&self) -> u16 {
        self.cfg.listen_port
    }

    async fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let conninfo = format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname={}",
            self.cfg.listen_port, self.cfg.dbname
        );
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!("pgbouncer exited ({st}): {}", self.log_tail());
            }
            let err = match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    match c.simple_query("select 1").await {
                        Ok(_) => return Ok(()),
                        Err(e) => anyhow!(e),
                    }
                }
                Err(e) => anyhow!(e),
            };
            if Instant::now() > deadline {
                return Err(err.context(format!(
                    "pgbouncer on port {} does not answer after {limit:?}: {}",
                    self.cfg.listen_port,
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        for p in [self.cfg.log_path(), self.cfg.dir.join("pgbouncer.stderr")] {
            s.push_str(&format!(
                "\n{}:\n{}",
                p.display(),
                crate::mm_cluster::tail(&p, 10)
            ));
        }
        s
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        // SIGINT: pgbouncer's safe shutdown; then kill if it lingers.
        let _ = crate::procs::send_signal(self.child.id() as i32, libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_transaction_pooling_ini() {
        let cfg = BouncerConfig {
            listen_port: 6001,
            server_port: 5001,
            dbname: "postgres".into(),
            pool_size: 10,
            max_client_conn: 30,
            dir: PathBuf::from("/w/pgb"),
        };
        let ini = cfg.render_ini();
        assert!(
            ini.contains("\npostgres = host=127.0.0.1 port=5001 dbname=postgres user=postgres\n")
        );
        assert!(ini.contains("\nlisten_addr = 127.0.0.1\n"));
        assert!(ini.contains("\nlisten_port = 6001\n"));
        assert!(ini.contains("\npool_mode = transaction\n"));
        assert!(ini.contains("\nauth_type = trust\n"));
        assert!(ini.contains("\nauth_file = /w/pgb/userlist.txt\n"));
        assert!(ini.contains("\ndefault_pool_size = 10\n"));
        assert!(ini.contains("\nmax_client_conn = 30\n"));
        assert!(ini.contains("\nlogfile = /w/pgb/pgbouncer.log\n"));
        // [databases] comes before [pgbouncer].
        assert!(ini.find("[databases]") < ini.find("[pgbouncer]"));
        assert_eq!(cfg.render_auth(), "\"postgres\" \"\"\n");
    }
}
