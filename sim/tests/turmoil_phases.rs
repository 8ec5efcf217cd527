//! T2 with phase-targeted faults: a fixed sweep fires every (phase, fault)
//! pair at least once and every seed passes; targeted runs replay exactly;
//! and a targeted fault catches a core mutant.

use mm_sim::turmoil::{
    run_turmoil, Phase, PhaseCoverage, PhaseFault, PhaseFaults, TurmoilOptions, TurmoilReport,
};
use mm_sim::Mutant;
use std::time::Instant;

/// 60 seeds of 3 nodes (0..60) and 30 of 5 (60..90), each arming its own
/// random targets.
#[test]
fn sweep_fires_every_phase_fault_pair() {
    let t0 = Instant::now();
    let mut cov = PhaseCoverage::default();
    let mut failed = Vec::new();
    for (nodes, seeds) in [(3, 0..60u64), (5, 60..90u64)] {
        for seed in seeds {
            let r = run_turmoil(&TurmoilOptions::new(seed, nodes));
            cov.add(&r);
            if !r.ok() {
                eprintln!("{}", r.failure());
                failed.push(r.repro());
            }
        }
    }
    eprint!("{}", cov.table());
    eprintln!("sweep took {:.1}s", t0.elapsed().as_secs_f64());
    assert!(
        failed.is_empty(),
        "failing seeds:\n  {}",
        failed.join("\n  ")
    );
    let missing = cov.missing();
    assert!(missing.is_empty(), "pairs never fired: {missing:?}");
}

/// Whether `phase:fault`, forced on 20 seeds of 3 nodes, catches `mutant` with
/// an atomicity or durability violation that is the target's and the
/// mutant's: the correct core passes the same run, and the mutant passes
/// the same seed without the target.
fn target_catches(mutant: Mutant, phase: Phase, fault: PhaseFault) {
    let target = PhaseFaults::Forced(phase, fault);
    let with = |seed, mutant, phase_faults| {
        run_turmoil(&TurmoilOptions {
            mutant,
            phase_faults,
            ..TurmoilOptions::new(seed, 3)
        })
    };
    let m = Some(mutant);
    let caught: Vec<TurmoilReport> = (0..20)
        .map(|seed| with(seed, m, target))
        .filter(|r| !r.ok())
        .collect();
    assert!(
        !caught.is_empty(),
        "{} not caught by {target} in 20 seeds",
        mutant.name()
    );
    for r in &caught {
        eprintln!(
            "seed {} caught: {} ({})",
            r.seed,
            r.violations[0],
            r.repro()
        );
        assert!(
            r.violations
                .iter()
                .any(|v| v.starts_with("atomicity") || v.starts_with("durability")),
            "seed {}: {:?}",
            r.seed,
            r.violations
        );
    }
    let r = caught
        .iter()
        .find(|r| with(r.seed, m, PhaseFaults::Off).ok())
        .unwrap_or_else(|| {
            panic!(
                "every catch of {} happens without {target} too",
                mutant.name()
            )
        });
    assert_eq!(r.phase_hits, vec![(phase, fault)]);
    let clean = with(r.seed, None, target);
    assert!(clean.ok(), "{}", clean.failure());
}

/// The resolver that ignores accepted ballots aborts a transaction whose
/// commit was already chosen. That takes a member that learnt the commit
/// while the others hold only acceptances: cutting the coordinator off from
/// everyone as its (lazy) decided record is written, `commit_sent`, leaves
/// the other members to resolve what it learnt, where the time-based
/// schedule rarely does.
#[test]
fn partition_at_commit_sent_catches_resolver_ignoring_ballots() {
    target_catches(
        Mutant::ResolverIgnoresBallots,
        Phase::CommitSent,
        PhaseFault::PartitionAll,
    );
}

/// A coordinator that aborts alone when its votes time out after its own
/// yes rolls back what the members committed among themselves: cutting a
/// participant off from the coordinator as it applies (`voted_yes`) loses
/// its yes to the coordinator only, while the other members hear every yes.
#[test]
fn partition_at_voted_yes_catches_coordinator_aborting_alone() {
    target_catches(
        Mutant::CoordinatorAbortsAlone,
        Phase::VotedYes,
        PhaseFault::PartitionOne,
    );
}

/// Crash or cut off the donor or the joiner while a catch-up is under way
/// (streams take up to a second here): the liveness phase still ends with
/// every node online and the databases converged, and some streams were
/// indeed lost with their donor.
#[test]
fn faults_mid_catchup_still_converge() {
    let t0 = Instant::now();
    let mut fired = 0;
    let mut dropped = 0;
    let mut failed = Vec::new();
    let targets = [
        (Phase::CatchupDonor, PhaseFault::Crash),
        (Phase::CatchupDonor, PhaseFault::PartitionAll),
        (Phase::CatchupJoiner, PhaseFault::Crash),
        (Phase::CatchupJoiner, PhaseFault::PartitionOne),
    ];
    for (i, (p, x)) in targets.into_iter().enumerate() {
        for seed in 0..8u64 {
            let nodes = if seed % 4 == 3 { 5 } else { 3 };
            let r = run_turmoil(&TurmoilOptions {
                phase_faults: PhaseFaults::Forced(p, x),
                ..TurmoilOptions::new(1000 + 10 * i as u64 + seed, nodes)
            });
            fired += r.phase_hits.len();
            dropped += r.streams_dropped;
            if !r.ok() {
                eprintln!("{}", r.failure());
                failed.push(r.repro());
            }
        }
    }
    eprintln!(
        "{fired} of 32 targets fired; {dropped} streams dropped; {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "failing seeds:\n  {}",
        failed.join("\n  ")
    );
    assert!(fired >= 24, "only {fired} of 32 catch-up targets fired");
    assert!(dropped > 0, "no donor crash landed mid-stream");
}
