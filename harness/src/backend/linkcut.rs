//! Cutting the link between two nodes of a local cluster.
//!
//! Every node shares loopback, so an address cannot tell nodes apart; their
//! processes can. Each node's PostgreSQL and mmd run in a cgroup (v2) of
//! their own. Every TCP connection a node's processes open to another node's
//! ports gets a conntrack mark that names the link (`-m cgroup --path` on the
//! first packet), and a cut is one iptables rule dropping every packet of the
//! connections with that mark, both directions, open ones and new ones alike.
//! Clients of the harness run outside these cgroups and are never cut.
//!
//! Needs root, a cgroup2 mount, and iptables with the cgroup, conntrack,
//! connmark and multiport matches; [`LinkCuts::new`] says what is missing.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct LinkCuts {
    /// This cluster's cgroup directory; node `i` is `node{i+1}` inside.
    base: PathBuf,
    /// `base` relative to the cgroup2 root, as iptables names it.
    rel: String,
    chain: String,
    nodes: usize,
    marked: bool,
    cut: BTreeSet<(usize, usize)>,
}

impl LinkCuts {
    /// Creates a cgroup per node and an empty iptables chain for them.
    pub fn new(nodes: usize) -> Result<LinkCuts> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        if unsafe { libc::geteuid() } != 0 {
            bail!("cutting links on the local backend needs root (cgroups and iptables)");
        }
        let root = cgroup2_root()?;
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("mm-links-{}-{k}", std::process::id());
        let base = root.join(&name);
        for i in 0..nodes {
            let d = base.join(format!("node{}", i + 1));
            std::fs::create_dir_all(&d)
                .with_context(|| format!("creating cgroup {}", d.display()))?;
        }
        // iptables chain names are at most 28 characters.
        let chain = format!("MM-{}-{k}", std::process::id());
        let cuts = LinkCuts {
            base,
            rel: name,
            chain,
            nodes,
            marked: false,
            cut: BTreeSet::new(),
        };
        iptables(&["-N", &cuts.chain])?;
        iptables(&["-I", "OUTPUT", "-j", &cuts.chain])
            .context("hooking the link-cut chain into OUTPUT")?;
        Ok(cuts)
    }

    /// Makes `cmd` (and everything it starts) run in node `i`'s cgroup.
    pub fn place(&self, i: usize, cmd: &mut Command) {
        let procs = self
            .base
            .join(format!("node{}", i + 1))
            .join("cgroup.procs");
        let procs = CString::new(procs.as_os_str().as_bytes()).expect("no NUL in a path");
        // Only async-signal-safe calls between fork and exec: open, write, close.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process.
                let n = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n < 0 {
                    return Err(err);
                }
                Ok(())
            });
        }
    }

    /// Marks the connections of every link: `ports[i]` are the ports node
    /// `i` listens on (PostgreSQL, mmd's mesh). Must run before the nodes
    /// connect to each other: a connection is marked when it opens.
    pub fn mark_links(&mut self, ports: &[Vec<u16>]) -> Result<()> {
        if ports.len() != self.nodes {
            bail!("{} port lists for {} nodes", ports.len(), self.nodes);
        }
        if self.marked {
            return Ok(());
        }
        for a in 0..self.nodes {
            for (b, listen) in ports.iter().enumerate() {
                if a == b {
                    continue;
                }
                let dports: Vec<String> = listen.iter().map(u16::to_string).collect();
                iptables(&[
                    "-A",
                    &self.chain,
                    "-p",
                    "tcp",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW",
                    "-m",
                    "cgroup",
                    "--path",
                    &self.cgroup_path(a),
                    "-m",
                    "multiport",
                    "--dports",
                    &dports.join(","),
                    "-j",
                    "CONNMARK",
                    "--set-mark",
                    &mark(a, b),
                ])
                .context("marking the connections between nodes")?;
            }
        }
        self.marked = true;
        Ok(())
    }

    /// Drops every packet between nodes `a` and `b` (0-based).
    pub fn cut(&mut self, a: usize, b: usize) -> Result<()> {
        let link = link(a, b)?;
        if !self.marked {
            bail!("links are not marked yet (mark_links)");
        }
        if self.cut.insert(link) {
            iptables(&self.drop_rule("-A", a, b))?;
        }
        Ok(())
    }

    /// Lets the packets between `a` and `b` through again.
    pub fn heal(&mut self, a: usize, b: usize) -> Result<()> {
        let link = link(a, b)?;
        if self.cut.remove(&link) {
            iptables(&self.drop_rule("-D", a, b))?;
        }
        Ok(())
    }

    pub fn cut_links(&self) -> Vec<(usize, usize)> {
        self.cut.iter().copied().collect()
    }

    fn drop_rule(&self, op: &str, a: usize, b: usize) -> Vec<String> {
        [
            op,
            &self.chain,
            "-m",
            "connmark",
            "--mark",
            &mark(a, b),
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn cgroup_path(&self, i: usize) -> String {
        format!("{}/node{}", self.rel, i + 1)
    }
}

impl Drop for LinkCuts {
    fn drop(&mut self) {
        let _ = iptables(&["-D", "OUTPUT", "-j", &self.chain]);
        let _ = iptables(&["-F", &self.chain]);
        let _ = iptables(&["-X", &self.chain]);
        // A cgroup can be removed once its processes are gone.
        for i in 0..self.nodes {
            let _ = std::fs::remove_dir(self.base.join(format!("node{}", i + 1)));
        }
        let _ = std::fs::remove_dir(&self.base);
    }
}

/// One mark per link, whichever side opened the connection.
fn mark(a: usize, b: usize) -> String {
    let (lo, hi) = (a.min(b), a.max(b));
    format!("0x4d4d{:02x}{:02x}", lo, hi)
}

fn link(a: usize, b: usize) -> Result<(usize, usize)> {
    if a == b {
        bail!("a link joins two different nodes");
    }
    Ok((a.min(b), a.max(b)))
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a pure v2
/// system, `/sys/fs/cgroup/unified` on a hybrid one).
fn cgroup2_root() -> Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .find(|d| Path::new(d).join("cgroup.procs").exists())
        .ok_or_else(|| {
            anyhow!("no cgroup2 hierarchy is mounted: cutting links on the local backend needs one")
        })
}

fn iptables<S: AsRef<str>>(args: &[S]) -> Result<()> {
    let args: Vec<&str> = args.iter().map(|s| s.as_ref()).collect();
    let out = Command::new("iptables")
        .arg("-w")
        .args(&args)
        .output()
        .context("running iptables (Debian package: iptables)")?;
    if !out.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_has_one_mark_whichever_side_opened_it() {
        assert_eq!(mark(0, 2), mark(2, 0));
        assert_ne!(mark(0, 1), mark(0, 2));
        assert_eq!(mark(1, 2), "0x4d4d0102");
        assert!(link(1, 1).is_err());
    }
}
