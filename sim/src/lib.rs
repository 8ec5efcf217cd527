//! mm-sim: a deterministic discrete-event simulator of mm's protocol core.
//!
//! One u64 seed derives everything: latencies, clients, the swarm-chosen
//! fault subset and schedule, every random draw. A run has a safety phase
//! (load and faults) and a liveness phase (everything healed, no new work,
//! the cluster must settle); checkers watch both. See `docs/` of the
//! project for the protocol; `ARCHITECTURE.md` §6 for the plan.
//!
//! Entry points: [`run_seed`] for one seed, [`sweep`] for many, and
//! [`world::World`] for scripted scenarios.

pub mod checkers;
pub mod coverage;
pub mod data_plane;
pub mod db_model;
pub mod faults;
pub mod fnv;
pub mod net;
pub mod params;
pub mod sweep;
pub mod time_util;
pub mod turmoil;
pub mod workload;
pub mod world;

pub use checkers::Violation;
pub use coverage::{Coverage, Path};
pub use mm_core::Mutant;
pub use params::Params;
pub use world::World;

use time_util::VTime;

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    pub seed: u64,
    pub nodes: usize,
    pub mutant: Option<Mutant>,
    /// Record one line per event (slower) and hash them.
    pub trace: bool,
}

impl RunOptions {
    pub fn new(seed: u64, nodes: usize) -> RunOptions {
        RunOptions {
            seed,
            nodes,
            mutant: None,
            trace: false,
        }
    }
}

/// The outcome of one seed.
#[derive(Clone, Debug)]
pub struct SeedReport {
    pub seed: u64,
    pub nodes: usize,
    pub mutant: Option<Mutant>,
    pub violations: Vec<Violation>,
    pub coverage: Coverage,
    pub stats: world::Stats,
    /// Client requests answered Committed / Aborted / Refused (refusals
    /// include transactions never started because the node did not accept work).
    pub committed: u64,
    pub aborted: u64,
    pub refused: u64,
    /// Time from healing to settled; None if it never settled.
    pub settle_time: Option<VTime>,
    pub end_time: VTime,
    /// Committed transactions on the most advanced node.
    pub committed_txs: u64,
    pub enabled_faults: Vec<faults::FaultKind>,
    /// FNV-1a over the trace lines; 0 unless traced.
    pub trace_hash: u64,
    pub trace: Option<Vec<String>>,
}

impl SeedReport {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The command that replays this seed with a trace.
    pub fn repro(&self) -> String {
        repro_line(self.seed, self.nodes, self.mutant)
    }
}

pub fn repro_line(seed: u64, nodes: usize, mutant: Option<Mutant>) -> String {
    let m = mutant
        .map(|m| format!(" --mutant {}", m.name()))
        .unwrap_or_default();
    format!("cargo run --release -p mm-sim -- replay --seed {seed} --nodes {nodes}{m} --trace")
}

/// Run one seed through both phases.
pub fn run_seed(opts: &RunOptions) -> SeedReport {
    let params = Params::from_seed(opts.seed, opts.nodes, opts.mutant);
    World::new(params, opts.trace).run()
}

pub use sweep::{sweep, SweepSummary};

/// Find a mutant by its name.
pub fn mutant_by_name(name: &str) -> Option<Mutant> {
    Mutant::ALL.into_iter().find(|m| m.name() == name)
}
