//! How busy the machine was during a phase, from `/proc/stat`: a load
//! generator that leaves the CPUs idle measures its own waiting, not a limit.

use anyhow::{bail, Context, Result};

/// The machine-wide `cpu` line of `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// idle + iowait.
    pub idle: u64,
    /// Every field (user, nice, system, idle, iowait, irq, softirq, steal).
    pub total: u64,
}

impl CpuTimes {
    /// Reads `/proc/stat` now.
    pub fn read() -> Result<CpuTimes> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        parse_proc_stat(&text)
    }
}

/// The first (`cpu `) line of `/proc/stat`. guest and guest_nice are left
/// out: they are already counted in user and nice.
pub fn parse_proc_stat(text: &str) -> Result<CpuTimes> {
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        bail!("/proc/stat has no `cpu ` line");
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse::<u64>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("/proc/stat: unreadable line {line:?}"))?;
    if fields.len() < 4 {
        bail!("/proc/stat: too few fields in {line:?}");
    }
    Ok(CpuTimes {
        idle: fields[3] + fields.get(4).copied().unwrap_or(0),
        total: fields.iter().sum(),
    })
}

/// Fraction (0..=1) of the CPU time between two readings that was idle;
/// `None` if no tick passed.
pub fn idle_fraction(before: CpuTimes, after: CpuTimes) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    let idle = after.idle.checked_sub(before.idle)?;
    (total > 0).then(|| idle as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_cpu_line() {
        let t = parse_proc_stat(
            "cpu  100 5 50 800 40 1 2 2 0 0\ncpu0 50 2 25 400 20 0 1 1 0 0\nintr 1\n",
        )
        .unwrap();
        assert_eq!(t.idle, 840);
        assert_eq!(t.total, 1000);
        assert!(parse_proc_stat("intr 1\n").is_err());
        assert!(parse_proc_stat("cpu  1 x 3 4\n").is_err());
    }

    #[test]
    fn idle_between_readings() {
        let a = CpuTimes {
            idle: 100,
            total: 1000,
        };
        let b = CpuTimes {
            idle: 150,
            total: 1200,
        };
        assert_eq!(idle_fraction(a, b), Some(0.25));
        assert_eq!(idle_fraction(a, a), None);
        assert_eq!(idle_fraction(b, a), None);
    }
}
