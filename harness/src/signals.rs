//! Stops every running local node when the process gets Ctrl-C (SIGINT) or
//! SIGTERM. The servers run in their own session (pg_ctl calls setsid), so a
//! terminal's Ctrl-C does not reach them, and Drop does not run when a signal
//! ends the process: without this they would outlive the harness.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::pg_bin::RunAs;

/// What is needed to stop one node without the cluster object.
#[derive(Debug, Clone)]
pub struct StopHandle {
    pub pg_ctl: PathBuf,
    pub data_dir: PathBuf,
    pub run_as: RunAs,
}

impl StopHandle {
    /// `pg_ctl stop -m fast`, falling back to `-m immediate`. Blocking.
    pub fn stop(&self) -> bool {
        for mode in ["fast", "immediate"] {
            let mut cmd = self.run_as.command(&self.pg_ctl);
            cmd.arg("stop")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", mode, "-w", "-t", "15"]);
            if let Some(dir) = self.data_dir.parent() {
                cmd.current_dir(dir);
            }
            match cmd.output() {
                Ok(out) if out.status.success() => return true,
                Ok(out) => {
                    let err = String::from_utf8_lossy(&out.stderr);
                    // Not running (anymore): nothing to stop.
                    if err.contains("Is server running?") || err.contains("does not exist") {
                        return true;
                    }
                }
                Err(_) => {}
            }
        }
        false
    }
}

/// To stderr itself: `eprintln!` from this thread would land in libtest's
/// output capture (threads inherit it) and be lost by `exit`.
fn say(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn registry() -> &'static Mutex<Vec<StopHandle>> {
    static REG: OnceLock<Mutex<Vec<StopHandle>>> = OnceLock::new();
    REG.get_or_init(|| Mutex::new(Vec::new()))
}

static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// Set once a signal asked us to stop everything: starting a node is refused
/// from then on.
pub fn shutting_down() -> bool {
    SHUTTING_DOWN.load(Ordering::SeqCst)
}

pub fn register(h: StopHandle) {
    let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    reg.retain(|x| x.data_dir != h.data_dir);
    reg.push(h);
}

pub fn unregister(data_dir: &std::path::Path) {
    let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    reg.retain(|x| x.data_dir != data_dir);
}

/// Stops every registered node. Blocking. Refuses later starts, and makes a
/// second pass a second later for a `pg_ctl start` that was in flight (its
/// postmaster.pid did not exist yet during the first).
pub fn stop_all_registered() {
    SHUTTING_DOWN.store(true, Ordering::SeqCst);
    let handles: Vec<StopHandle> = registry().lock().unwrap_or_else(|e| e.into_inner()).clone();
    for h in &handles {
        say(&format!("mm-harness: stopping {}", h.data_dir.display()));
        h.stop();
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    for h in &handles {
        if h.data_dir.join("postmaster.pid").exists() {
            say(&format!(
                "mm-harness: stopping {} (again)",
                h.data_dir.display()
            ));
            h.stop();
        }
    }
}

/// Installs (once per process) a thread that, on SIGINT or SIGTERM, stops all
/// registered nodes and exits with status 130.
pub fn install_stop_on_signal() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("mm-harness-signals".into())
            .spawn(|| {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(_) => return,
                };
                rt.block_on(async {
                    use tokio::signal::unix::{signal, SignalKind};
                    let Ok(mut term) = signal(SignalKind::terminate()) else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    say("mm-harness: signal received, stopping PostgreSQL nodes");
                    stop_all_registered();
                    std::process::exit(130);
                });
            });
        let _ = spawned;
    });
}
