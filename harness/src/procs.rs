//! Process inspection and signals for fault injection (kill -9) and shutdown.

/// Whether `pid` exists and is not a zombie (the container's PID 1 may not reap).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // "pid (comm) S ..." — comm may contain spaces; the state follows the last ')'.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Live (non-zombie) direct children of `parent`.
pub fn children(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit(')').next() else {
            continue;
        };
        // fields after comm: state ppid pgrp ...
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 1 && f[1].parse::<i32>().ok() == Some(parent) && f[0] != "Z" && f[0] != "X" {
            out.push(pid);
        }
    }
    out
}

/// A PostgreSQL instance: the postmaster and its children. Every child calls
/// setsid(), so signalling the postmaster's process group does not reach them.
pub fn instance(postmaster: i32) -> Vec<i32> {
    let mut v = vec![postmaster];
    v.extend(children(postmaster));
    v
}

/// `kill` as a checked call.
pub fn send_signal(pid: i32, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
