//! Which phases `mm-harness bench` runs (`--phases`), in their fixed order.

use anyhow::{bail, Result};
use std::fmt;

/// One phase of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Single,
    Cluster,
    /// The cluster phase with `mm.wait_peer_commits = off` on every node.
    Relaxed,
    Async,
    TwoPc,
    Read,
    Latency,
    Bulk,
}

impl Phase {
    /// Every phase, in the order they run.
    pub const ALL: [Phase; 8] = [
        Phase::Single,
        Phase::Cluster,
        Phase::Relaxed,
        Phase::Async,
        Phase::TwoPc,
        Phase::Read,
        Phase::Latency,
        Phase::Bulk,
    ];

    /// The name `--phases` takes and the report uses.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Single => "single",
            Phase::Cluster => "cluster",
            Phase::Relaxed => "relaxed",
            Phase::Async => "async",
            Phase::TwoPc => "two_pc",
            Phase::Read => "read",
            Phase::Latency => "latency",
            Phase::Bulk => "bulk",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of phases; runs in [`Phase::ALL`]'s order whatever order it was
/// written in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phases(Vec<Phase>);

impl Default for Phases {
    fn default() -> Self {
        Phases(Phase::ALL.to_vec())
    }
}

impl Phases {
    /// A comma list such as `single,two_pc`; `all` (or an empty list) is
    /// every phase. Unknown names are an error that lists the known ones.
    pub fn parse(s: &str) -> Result<Phases> {
        let mut picked = Vec::new();
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            if word.eq_ignore_ascii_case("all") {
                return Ok(Phases::default());
            }
            let Some(p) = Phase::ALL
                .iter()
                .copied()
                .find(|p| p.name().eq_ignore_ascii_case(word) || alias(*p, word))
            else {
                let known: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
                bail!("unknown phase {word:?} (known: {}, all)", known.join(","));
            };
            if !picked.contains(&p) {
                picked.push(p);
            }
        }
        if picked.is_empty() {
            return Ok(Phases::default());
        }
        picked.sort();
        Ok(Phases(picked))
    }

    pub fn has(&self, p: Phase) -> bool {
        self.0.contains(&p)
    }

    pub fn iter(&self) -> impl Iterator<Item = Phase> + '_ {
        self.0.iter().copied()
    }

    pub fn names(&self) -> Vec<String> {
        self.0.iter().map(|p| p.name().to_string()).collect()
    }
}

/// Other spellings people type.
fn alias(p: Phase, word: &str) -> bool {
    let w = word.to_ascii_lowercase();
    matches!(
        (p, w.as_str()),
        (Phase::TwoPc, "2pc" | "two-pc" | "twopc")
            | (Phase::Async, "async_mesh" | "async-mesh" | "mesh")
            | (Phase::Cluster, "mm-cluster" | "mm")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comma_lists_in_run_order() {
        let p = Phases::parse("bulk, single,2pc,single").unwrap();
        assert_eq!(p.names(), ["single", "two_pc", "bulk"]);
        assert!(p.has(Phase::Bulk) && !p.has(Phase::Read));
        assert_eq!(Phases::parse("all").unwrap(), Phases::default());
        assert_eq!(Phases::parse("").unwrap(), Phases::default());
        assert_eq!(Phases::default().iter().count(), 8);
    }

    #[test]
    fn unknown_phase_is_an_error_naming_the_known_ones() {
        let e = Phases::parse("single,bogus").unwrap_err().to_string();
        assert!(e.contains("bogus") && e.contains("two_pc"), "{e}");
    }
}
