//! The unmutated core must pass every seed: 500 seeds each for 3 and 5 nodes.

use mm_sim::sweep::sweep;

fn assert_clean(nodes: usize, seeds: u64) {
    let s = sweep(0, seeds, nodes, None);
    let lines: Vec<String> = s
        .failing
        .iter()
        .map(|r| format!("seed {}: {}\n  {}", r.seed, r.violations[0], r.repro()))
        .collect();
    assert!(
        s.failing.is_empty(),
        "{} of {seeds} seeds failed with {nodes} nodes:\n{}",
        s.failing.len(),
        lines.join("\n")
    );
}

#[test]
fn three_nodes_500_seeds() {
    assert_clean(3, 500);
}

#[test]
fn five_nodes_500_seeds() {
    assert_clean(5, 500);
}
