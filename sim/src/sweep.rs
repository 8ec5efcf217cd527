//! Many seeds in parallel (rayon), aggregated deterministically in seed
//! order whatever the thread interleaving.

use crate::coverage::CoverageTally;
use crate::{run_seed, Mutant, RunOptions, SeedReport};
use rayon::prelude::*;

#[derive(Clone, Debug, Default)]
pub struct SweepSummary {
    pub seeds: u64,
    pub failing: Vec<SeedReport>,
    pub coverage: CoverageTally,
    pub committed: u64,
    pub aborted: u64,
    pub refused: u64,
    pub conflicts: u64,
    pub crashes: u64,
    pub events: u64,
    pub unsettled: u64,
    /// Largest settle time seen (µs).
    pub max_settle: u64,
}

impl SweepSummary {
    pub fn violations(&self) -> usize {
        self.failing.iter().map(|r| r.violations.len()).sum()
    }
    pub fn failing_seeds(&self) -> Vec<u64> {
        self.failing.iter().map(|r| r.seed).collect()
    }
}

/// Run seeds `start..start+count` on every core.
pub fn sweep(start: u64, count: u64, nodes: usize, mutant: Option<Mutant>) -> SweepSummary {
    let reports: Vec<SeedReport> = (start..start + count)
        .into_par_iter()
        .map(|seed| {
            run_seed(&RunOptions {
                mutant,
                ..RunOptions::new(seed, nodes)
            })
        })
        .collect();
    let mut s = SweepSummary::default();
    for r in reports {
        s.seeds += 1;
        s.coverage.add(&r.coverage);
        s.committed += r.committed;
        s.aborted += r.aborted;
        s.refused += r.refused;
        s.conflicts += r.stats.conflicts;
        s.crashes += r.stats.crashes;
        s.events += r.stats.events;
        match r.settle_time {
            Some(t) => s.max_settle = s.max_settle.max(t),
            None => s.unsettled += 1,
        }
        if !r.ok() {
            s.failing.push(r);
        }
    }
    s
}

/// The smallest seed in `0..max` that a mutant fails, searched in parallel chunks.
/// With `differential`, a seed counts only if the unmutated core passes it
/// (so a baseline failure cannot masquerade as a catch).
pub fn first_failing_seed(
    nodes: usize,
    mutant: Option<Mutant>,
    max: u64,
    differential: bool,
) -> Option<SeedReport> {
    let chunk = (rayon::current_num_threads() as u64 * 8).max(16);
    let mut start = 0;
    while start < max {
        let end = (start + chunk).min(max);
        let found = (start..end)
            .into_par_iter()
            .map(|seed| {
                run_seed(&RunOptions {
                    seed,
                    nodes,
                    mutant,
                    trace: false,
                })
            })
            .filter(|r| !r.ok())
            .filter(|r| !differential || run_seed(&RunOptions::new(r.seed, nodes)).ok())
            .min_by_key(|r| r.seed);
        if found.is_some() {
            return found;
        }
        start = end;
    }
    None
}
