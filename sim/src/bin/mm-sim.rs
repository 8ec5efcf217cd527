//! mm-sim command line: sweep many seeds, replay one, or prove the checkers
//! against the core's mutants.

use clap::{Parser, Subcommand};
use mm_sim::coverage::Path;
use mm_sim::faults::FaultKind;
use mm_sim::sweep::{first_failing_seed, sweep};
use mm_sim::turmoil::{run_turmoil, PhaseCoverage, PhaseFaults, SlotLoss, TurmoilOptions};
use mm_sim::{mutant_by_name, Mutant, Params, RunOptions, World};
use serde_json::json;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "mm-sim",
    about = "Deterministic simulator of mm's protocol core"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run many seeds in parallel and summarise.
    Sweep {
        #[arg(long, default_value_t = 1000)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long)]
        mutant: Option<String>,
        /// Last line: one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Replay one seed: its parameters, schedule, optionally every event, and the verdict.
    Replay {
        #[arg(long)]
        seed: u64,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long)]
        mutant: Option<String>,
        #[arg(long)]
        trace: bool,
    },
    /// For each mutant, the first seed whose run catches it.
    Mutants {
        #[arg(long, default_value_t = 2000)]
        seeds: u64,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long)]
        json: bool,
        /// Count a seed only if the unmutated core passes it.
        #[arg(long)]
        differential: bool,
    },
    /// Tier T2: the runtime's node driver and mesh under turmoil, seed by seed.
    Turmoil {
        #[arg(long, default_value_t = 20)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long)]
        mutant: Option<String>,
        /// Use the deliberately broken storage (loses one commit on node 2).
        #[arg(long)]
        lossy_storage: bool,
        /// Phase-targeted faults: `random` (each seed arms 0-4 targets),
        /// `off`, or one forced `PHASE:FAULT` (e.g. `commit_sent:crash`).
        #[arg(long, default_value = "random")]
        phase_faults: String,
        /// Whether a crash loses the node's replication slots, forcing a
        /// resync: `seeded` (one seed in three), `never`, `every-crash`.
        #[arg(long, default_value = "seeded")]
        slot_loss: String,
        /// Use the deliberately broken resync (its copy misses the donor's
        /// oldest commit).
        #[arg(long)]
        broken_resync: bool,
        /// Leave out mmd's silence of a recovery member that needs a resync.
        #[arg(long)]
        no_silence: bool,
        /// Print each seed's fault schedule.
        #[arg(long)]
        verbose: bool,
        /// Last line: one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn parse_mutant(m: &Option<String>) -> Result<Option<Mutant>, String> {
    match m {
        None => Ok(None),
        Some(name) => mutant_by_name(name).map(Some).ok_or_else(|| {
            let names: Vec<&str> = Mutant::ALL.iter().map(|m| m.name()).collect();
            format!("unknown mutant {name:?}; known: {}", names.join(", "))
        }),
    }
}

fn check_nodes(n: usize) -> Result<(), String> {
    if (1..=9).contains(&n) {
        Ok(())
    } else {
        Err(format!("--nodes {n}: use 1..=9"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Sweep {
            seeds,
            start,
            nodes,
            mutant,
            json,
        } => check_nodes(nodes)
            .and_then(|_| parse_mutant(&mutant))
            .map(|m| cmd_sweep(seeds, start, nodes, m, json)),
        Cmd::Replay {
            seed,
            nodes,
            mutant,
            trace,
        } => check_nodes(nodes)
            .and_then(|_| parse_mutant(&mutant))
            .map(|m| cmd_replay(seed, nodes, m, trace)),
        Cmd::Mutants {
            seeds,
            nodes,
            json,
            differential,
        } => check_nodes(nodes).map(|_| cmd_mutants(seeds, nodes, json, differential)),
        Cmd::Turmoil {
            seeds,
            start,
            nodes,
            mutant,
            lossy_storage,
            phase_faults,
            slot_loss,
            broken_resync,
            no_silence,
            verbose,
            json,
        } => check_nodes(nodes)
            .and_then(|_| {
                if nodes < 2 {
                    Err("turmoil: use --nodes 2..=9".to_string())
                } else {
                    parse_mutant(&mutant)
                }
            })
            .and_then(|m| {
                Ok((
                    m,
                    phase_faults.parse::<PhaseFaults>()?,
                    slot_loss.parse::<SlotLoss>()?,
                ))
            })
            .map(|(m, phase_faults, slot_loss)| {
                let opts = TurmoilOptions {
                    seed: start,
                    nodes,
                    mutant: m,
                    lossy_storage,
                    phase_faults,
                    slot_loss,
                    broken_resync,
                    no_silence,
                };
                cmd_turmoil(seeds, opts, verbose, json)
            }),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn cmd_sweep(seeds: u64, start: u64, nodes: usize, mutant: Option<Mutant>, json: bool) -> ExitCode {
    let t0 = Instant::now();
    let s = sweep(start, seeds, nodes, mutant);
    let secs = t0.elapsed().as_secs_f64();
    let per_min = if secs > 0.0 {
        seeds as f64 * 60.0 / secs
    } else {
        0.0
    };
    println!(
        "sweep: {} seeds ({}..{}), {} nodes, mutant {}: {:.1}s, {:.0} seeds/min",
        seeds,
        start,
        start + seeds,
        nodes,
        mutant.map_or("none", |m| m.name()),
        secs,
        per_min
    );
    println!(
        "transactions: {} committed, {} aborted, {} refused, {} lock conflicts; {} crashes; {} events",
        s.committed, s.aborted, s.refused, s.conflicts, s.crashes, s.events
    );
    println!(
        "liveness: {} unsettled seeds, slowest settle {}ms",
        s.unsettled,
        s.max_settle / 1000
    );
    println!("coverage (fraction of seeds reaching each path):");
    print!("{}", s.coverage.table());
    println!(
        "violations: {} in {} failing seeds",
        s.violations(),
        s.failing.len()
    );
    for r in &s.failing {
        println!("FAIL seed {}: {}", r.seed, r.violations[0]);
        for v in r.violations.iter().skip(1).take(4) {
            println!("    {v}");
        }
        println!("  repro: {}", r.repro());
    }
    if json {
        let cov: serde_json::Map<String, serde_json::Value> = Path::ALL
            .iter()
            .map(|p| (p.name().to_string(), json!(s.coverage.fraction(*p))))
            .collect();
        let kinds: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
        let obj = json!({
            "seeds": s.seeds,
            "nodes": nodes,
            "start": start,
            "violations": s.violations(),
            "failing_seeds": s.failing_seeds(),
            "seeds_per_min": per_min.round(),
            "fault_kinds": kinds,
            "committed": s.committed,
            "aborted": s.aborted,
            "refused": s.refused,
            "unsettled": s.unsettled,
            "coverage": cov,
        });
        println!("{obj}");
    }
    if s.failing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn cmd_replay(seed: u64, nodes: usize, mutant: Option<Mutant>, trace: bool) -> ExitCode {
    let params = Params::from_seed(seed, nodes, mutant);
    for l in params.describe() {
        println!("{l}");
    }
    let report = World::new(params, trace).run();
    if let Some(t) = &report.trace {
        println!("trace ({} lines):", t.len());
        for l in t {
            println!("{l}");
        }
        println!("trace hash {:016x}", report.trace_hash);
    }
    println!(
        "result: {} committed, {} aborted, {} refused; {} events; settled {}",
        report.committed,
        report.aborted,
        report.refused,
        report.stats.events,
        report
            .settle_time
            .map_or("never".to_string(), |t| format!("after {}ms", t / 1000))
    );
    let reached: Vec<&str> = report.coverage.reached().map(|p| p.name()).collect();
    println!("coverage: [{}]", reached.join(", "));
    if report.ok() {
        println!("verdict: OK");
        ExitCode::SUCCESS
    } else {
        println!("verdict: {} violations", report.violations.len());
        for v in &report.violations {
            println!("  {v}");
        }
        println!("repro: {}", mm_sim::repro_line(seed, nodes, mutant));
        ExitCode::FAILURE
    }
}

fn cmd_mutants(max: u64, nodes: usize, json: bool, differential: bool) -> ExitCode {
    let mut all = true;
    let mut obj = serde_json::Map::new();
    for m in Mutant::ALL {
        let t0 = Instant::now();
        let found = first_failing_seed(nodes, Some(m), max, differential);
        let secs = t0.elapsed().as_secs_f64();
        // Whether the unmutated core passes the catching seed: if not, the
        // catch may be the baseline's own failure rather than the mutant's.
        let baseline_ok = found
            .as_ref()
            .map(|r| mm_sim::run_seed(&RunOptions::new(r.seed, nodes)).ok());
        match &found {
            Some(r) => {
                println!(
                    "{:<30} caught at seed {} ({} seeds, {:.1}s; baseline {} there): {}",
                    m.name(),
                    r.seed,
                    r.seed + 1,
                    secs,
                    if baseline_ok == Some(true) {
                        "passes"
                    } else {
                        "FAILS too"
                    },
                    r.violations[0]
                );
                println!("  repro: {}", r.repro());
            }
            None => {
                all = false;
                println!("{:<30} NOT caught in {max} seeds ({secs:.1}s)", m.name());
            }
        }
        obj.insert(
            m.name().to_string(),
            json!({
                "caught": found.is_some(),
                "seeds_to_catch": found.as_ref().map(|r| r.seed + 1),
                "seed": found.as_ref().map(|r| r.seed),
                "checker": found.as_ref().map(|r| r.violations[0].checker),
                "baseline_ok": baseline_ok,
            }),
        );
    }
    if json {
        println!("{}", serde_json::Value::Object(obj));
    }
    if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn cmd_turmoil(seeds: u64, base: TurmoilOptions, verbose: bool, json: bool) -> ExitCode {
    let t0 = Instant::now();
    let (mut committed, mut aborted, mut refused, mut unknown) = (0, 0, 0, 0);
    let mut violations = 0;
    let mut resyncs = 0;
    let mut failing = Vec::new();
    let mut coverage = PhaseCoverage::default();
    for seed in base.seed..base.seed + seeds {
        let opts = TurmoilOptions {
            seed,
            ..base.clone()
        };
        let r = run_turmoil(&opts);
        coverage.add(&r);
        committed += r.committed;
        aborted += r.aborted;
        refused += r.refused;
        unknown += r.unknown;
        violations += r.violations.len();
        resyncs += r.resyncs.len();
        println!(
            "seed {seed}: {}ms simulated; {} committed, {} aborted, {} refused, {} unknown; {} txs; {} resyncs ({} silenced); settled {}; hash {:016x}; {}",
            r.sim_ms,
            r.committed,
            r.aborted,
            r.refused,
            r.unknown,
            r.committed_txs,
            r.resyncs.len(),
            r.silences,
            r.settled_after_ms
                .map_or("never".to_string(), |t| format!("{t}ms after healing")),
            r.event_hash,
            if r.ok() { "OK" } else { "FAIL" }
        );
        if verbose || !r.ok() {
            for f in &r.faults {
                println!("    fault: {f}");
            }
        }
        if !r.ok() {
            for v in r.violations.iter().take(10) {
                println!("  violation: {v}");
            }
            if r.violations.len() > 10 {
                println!("  ... and {} more violations", r.violations.len() - 10);
            }
            println!("  repro: {}", r.repro());
            failing.push(seed);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let per_min = if secs > 0.0 {
        seeds as f64 * 60.0 / secs
    } else {
        0.0
    };
    print!(
        "phase targets fired (seeds per pair):\n{}",
        coverage.table()
    );
    let missing = coverage.missing();
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|(p, x)| format!("{p}:{x}")).collect();
        println!("never fired: {}", names.join(", "));
    }
    println!(
        "turmoil: {seeds} seeds ({}..{}), {} nodes: {secs:.1}s, {per_min:.0} seeds/min; {violations} violations in {} failing seeds",
        base.seed,
        base.seed + seeds,
        base.nodes,
        failing.len()
    );
    if json {
        let obj = json!({
            "seeds": seeds,
            "start": base.seed,
            "nodes": base.nodes,
            "violations": violations,
            "failing_seeds": failing,
            "seeds_per_min": per_min.round(),
            "committed": committed,
            "aborted": aborted,
            "refused": refused,
            "unknown": unknown,
            "phase_faults": base.phase_faults.to_string(),
            "slot_loss": base.slot_loss.to_string(),
            "resyncs": resyncs,
            "phase_hits": coverage
                .hits
                .iter()
                .map(|((p, x), c)| (format!("{p}:{x}"), *c))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "phase_pairs_never_fired": missing.len(),
        });
        println!("{obj}");
    }
    if failing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
