//! Every parameter of a run, derived from one u64 seed. Sub-generators are
//! separate ChaCha8 streams of the same seed, so adding a draw in one place
//! does not shift every other choice.

use crate::faults::FaultPlan;
use crate::time_util::{VTime, MS, SEC};
use crate::workload::WorkloadParams;
use mm_core::Mutant;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Named rng streams of a seed.
pub mod stream {
    pub const PARAMS: u64 = 1;
    pub const FAULTS: u64 = 2;
    pub const NET: u64 = 3;
    pub const DB: u64 = 4;
    /// Client `i` uses `CLIENT_BASE + i`.
    pub const CLIENT_BASE: u64 = 1000;
}

pub fn rng_for(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub seed: u64,
    pub nodes: usize,
    pub mutant: Option<Mutant>,
    /// Length of the safety phase (faults and load on).
    pub safety: VTime,
    /// How long the liveness phase may take to settle.
    pub liveness_bound: VTime,
    pub net_latency_us: u64,
    pub net_jitter_us: u64,
    /// Per-item delay of the data plane.
    pub data_latency_us: u64,
    pub db_latency_min_us: u64,
    pub db_latency_max_us: u64,
    pub workload: WorkloadParams,
    pub faults: FaultPlan,
    /// The nodes' vote timeout: swarm-chosen on both sides of the heartbeat
    /// timeout (2 s), so that a lost vote is sometimes caught by the vote
    /// wait and sometimes by a generation change.
    pub vote_timeout_ms: u64,
}

impl Params {
    /// The swarm choice for `seed`.
    pub fn from_seed(seed: u64, nodes: usize, mutant: Option<Mutant>) -> Params {
        let mut r = rng_for(seed, stream::PARAMS);
        let safety = 10 * SEC;
        let net_latency_us = r.gen_range(100..=2_000);
        let net_jitter_us = r.gen_range(0..=net_latency_us);
        let data_latency_us = r.gen_range(200..=3_000);
        let db_latency_min_us = r.gen_range(50..=500);
        let db_latency_max_us = db_latency_min_us + r.gen_range(0..=6_000);
        let seed_clients_per_node = (0..nodes).map(|_| r.gen_range(1..=3)).collect();
        let bank_clients = r.gen_range(0..=3);
        let think_min = r.gen_range(10..=40) * MS;
        let think_max = think_min + r.gen_range(0..=60) * MS;
        let workload = WorkloadParams {
            seed_clients_per_node,
            bank_clients,
            think_min,
            think_max,
            retry_after: r.gen_range(20..=150) * MS,
        };
        let faults = FaultPlan::swarm(&mut rng_for(seed, stream::FAULTS), nodes, safety);
        // Drawn last, so the draws above are those of earlier versions.
        let vote_timeout_ms = [1_000, 1_500, 5_000][r.gen_range(0..3)];
        Params {
            seed,
            nodes,
            mutant,
            safety,
            liveness_bound: 30 * SEC,
            net_latency_us,
            net_jitter_us,
            data_latency_us,
            db_latency_min_us,
            db_latency_max_us,
            workload,
            faults,
            vote_timeout_ms,
        }
    }

    /// A calm run: no faults, fixed latencies (for scripted scenarios).
    pub fn calm(seed: u64, nodes: usize) -> Params {
        let mut p = Params::from_seed(seed, nodes, None);
        p.faults = FaultPlan::none(nodes);
        p
    }

    /// Every derived parameter, one per line, for `replay`.
    pub fn describe(&self) -> Vec<String> {
        let mut v = vec![
            format!(
                "seed {} nodes {} mutant {}",
                self.seed,
                self.nodes,
                self.mutant.map_or("none", |m| m.name())
            ),
            format!(
                "safety {}ms, liveness bound {}ms",
                self.safety / MS,
                self.liveness_bound / MS
            ),
            format!(
                "control latency {}us + jitter {}us; data plane {}us/item; db latency {}..{}us",
                self.net_latency_us,
                self.net_jitter_us,
                self.data_latency_us,
                self.db_latency_min_us,
                self.db_latency_max_us
            ),
            format!(
                "clients: seed-mix per node {:?}, bank {}; think {}..{}ms; retry after {}ms",
                self.workload.seed_clients_per_node,
                self.workload.bank_clients,
                self.workload.think_min / MS,
                self.workload.think_max / MS,
                self.workload.retry_after / MS
            ),
            format!("vote timeout {}ms", self.vote_timeout_ms),
        ];
        let f = &self.faults;
        let names: Vec<&str> = f.enabled.iter().map(|k| k.name()).collect();
        v.push(format!("faults enabled: [{}]", names.join(", ")));
        v.push(format!(
            "message faults: reorder p={:.3} max {}ms, duplicate p={:.3}, drop p={:.3}",
            f.msg.reorder_p,
            f.msg.reorder_max_us / MS,
            f.msg.duplicate_p,
            f.msg.drop_p
        ));
        v.push(format!(
            "db errors: prepare p={:.3}, apply p={:.3}",
            f.db_error_prepare_p, f.db_error_apply_p
        ));
        for (i, c) in f.clocks.iter().enumerate().skip(1) {
            v.push(format!(
                "clock n{i}: offset {}us drift {}ppm",
                c.offset_us, c.drift_ppm
            ));
        }
        v.push(format!("schedule ({} actions):", f.schedule.len()));
        for s in &f.schedule {
            v.push(format!("  {} {}", crate::faults::fmt_t(s.at), s.action));
        }
        v
    }
}
