//! The checkers are proven: every deliberately broken core variant is
//! caught within 2,000 seeds, on a seed the correct core passes.

use mm_sim::sweep::first_failing_seed;
use mm_sim::Mutant;

#[test]
fn every_mutant_is_caught() {
    let mut missed = Vec::new();
    for m in Mutant::ALL {
        match first_failing_seed(3, Some(m), 2_000, true) {
            Some(r) => eprintln!(
                "{} caught at seed {}: {}",
                m.name(),
                r.seed,
                r.violations[0]
            ),
            None => missed.push(m.name()),
        }
    }
    assert!(
        missed.is_empty(),
        "mutants not caught in 2000 seeds: {missed:?}"
    );
}
