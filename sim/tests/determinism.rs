//! A seed replays byte-identically, and the scripted-scenario API works.

use mm_sim::faults::FaultAction;
use mm_sim::time_util::{MS, SEC};
use mm_sim::{run_seed, Params, RunOptions, World};

#[test]
fn same_seed_same_trace() {
    for seed in 0..20 {
        for nodes in [3, 5] {
            let opts = RunOptions {
                seed,
                nodes,
                mutant: None,
                trace: true,
            };
            let a = run_seed(&opts);
            let b = run_seed(&opts);
            assert_ne!(a.trace_hash, 0);
            assert_eq!(
                a.trace_hash, b.trace_hash,
                "seed {seed} nodes {nodes} diverged"
            );
            assert_eq!(a.trace, b.trace);
            // Tracing must not change the run itself.
            let c = run_seed(&RunOptions {
                trace: false,
                ..opts
            });
            assert_eq!(
                (a.committed, a.aborted, a.refused),
                (c.committed, c.aborted, c.refused)
            );
        }
    }
}

#[test]
fn different_seeds_differ() {
    let a = run_seed(&RunOptions {
        seed: 1,
        nodes: 3,
        mutant: None,
        trace: true,
    });
    let b = run_seed(&RunOptions {
        seed: 2,
        nodes: 3,
        mutant: None,
        trace: true,
    });
    assert_ne!(a.trace_hash, b.trace_hash);
}

#[test]
fn scripted_crash_after_vote() {
    let mut w = World::new(Params::calm(7, 3), true);
    // Node 2 crashes right after its first yes vote leaves, and comes back 1 s later.
    w.crash_after_output(2, 5 * SEC, Some(SEC), |o| {
        matches!(
            o,
            mm_core::Output::Send {
                msg: mm_core::Message::TxVote { yes: true, .. },
                ..
            }
        )
    });
    w.inject(3 * SEC, FaultAction::Isolate { node: 3 });
    w.inject(4 * SEC + 500 * MS, FaultAction::HealLinks);
    w.run_until(2 * SEC);
    assert!(w.trace().iter().any(|l| l.contains("CRASH mid-batch")));
    let r = w.run();
    assert!(r.settle_time.is_some());
    assert!(r.committed > 0);
}
