//! Swarm testing: every seed enables a random subset of the fault kinds with
//! random intensities, then lays out a schedule over the safety phase.
//! Different subsets reach different corners (a seed full of drops never
//! lets a slow crash scenario develop, and vice versa).

use crate::net::MsgFaults;
use crate::time_util::{Clock, VTime, MS, SEC};
use mm_core::NodeId;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    PartitionSymmetric,
    PartitionOneWay,
    IsolateOne,
    MajorityRing,
    LinkClog,
    Reorder,
    Duplicate,
    Drop,
    CrashRestart,
    CrashMidBatch,
    Pause,
    ClockSkew,
    DbErrorPrepare,
    DbErrorApply,
}

impl FaultKind {
    pub const ALL: [FaultKind; 14] = [
        FaultKind::PartitionSymmetric,
        FaultKind::PartitionOneWay,
        FaultKind::IsolateOne,
        FaultKind::MajorityRing,
        FaultKind::LinkClog,
        FaultKind::Reorder,
        FaultKind::Duplicate,
        FaultKind::Drop,
        FaultKind::CrashRestart,
        FaultKind::CrashMidBatch,
        FaultKind::Pause,
        FaultKind::ClockSkew,
        FaultKind::DbErrorPrepare,
        FaultKind::DbErrorApply,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::PartitionSymmetric => "partition_symmetric",
            FaultKind::PartitionOneWay => "partition_one_way",
            FaultKind::IsolateOne => "isolate_one",
            FaultKind::MajorityRing => "majority_ring",
            FaultKind::LinkClog => "link_clog",
            FaultKind::Reorder => "reorder",
            FaultKind::Duplicate => "duplicate",
            FaultKind::Drop => "drop",
            FaultKind::CrashRestart => "crash_restart",
            FaultKind::CrashMidBatch => "crash_mid_batch",
            FaultKind::Pause => "pause",
            FaultKind::ClockSkew => "clock_skew",
            FaultKind::DbErrorPrepare => "db_error_prepare",
            FaultKind::DbErrorApply => "db_error_apply",
        }
    }

    fn is_link_episode(self) -> bool {
        matches!(
            self,
            FaultKind::PartitionSymmetric
                | FaultKind::PartitionOneWay
                | FaultKind::IsolateOne
                | FaultKind::MajorityRing
                | FaultKind::LinkClog
        )
    }

    fn is_node_episode(self) -> bool {
        matches!(
            self,
            FaultKind::CrashRestart | FaultKind::CrashMidBatch | FaultKind::Pause
        )
    }
}

/// Message kinds a mid-batch crash is biased towards: the ones a buggy
/// core might send before persisting what they assert, and the two a
/// correct core sends ahead of its own persist (the precommit's `Accept`
/// before the coordinator's acceptance, a `Decision` before its record).
pub const CRASH_AFTER_KINDS: [&str; 6] = [
    "Accepted",
    "TxVote",
    "ResolveState",
    "GenVote",
    "Accept",
    "Decision",
];

/// One scheduled change to the world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Cut both directions between `side` and the rest.
    Partition {
        side: Vec<NodeId>,
    },
    /// Cut `from → to` only.
    OneWay {
        from: NodeId,
        to: NodeId,
    },
    /// Cut a node off both ways.
    Isolate {
        node: NodeId,
    },
    /// Keep only ring-neighbour links.
    Ring,
    /// Delay everything on `from → to` until `until`.
    Clog {
        from: NodeId,
        to: NodeId,
        until: VTime,
    },
    /// Restore every link (end of a link episode).
    HealLinks,
    Crash {
        node: NodeId,
    },
    Restart {
        node: NodeId,
    },
    /// Crash `node` right after it emits a `Send` of one of `kinds` (any
    /// kind if empty) before `until`; restart `restart_after` later.
    CrashAfterSend {
        node: NodeId,
        kinds: Vec<&'static str>,
        until: VTime,
        restart_after: VTime,
    },
    /// The node processes nothing until `until`.
    Pause {
        node: NodeId,
        until: VTime,
    },
}

impl fmt::Display for FaultAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultAction::Partition { side } => write!(f, "partition {side:?} | rest"),
            FaultAction::OneWay { from, to } => write!(f, "cut link {from}->{to}"),
            FaultAction::Isolate { node } => write!(f, "isolate n{node}"),
            FaultAction::Ring => write!(f, "majority ring"),
            FaultAction::Clog { from, to, until } => {
                write!(f, "clog {from}->{to} until {}", fmt_t(*until))
            }
            FaultAction::HealLinks => write!(f, "heal links"),
            FaultAction::Crash { node } => write!(f, "crash n{node}"),
            FaultAction::Restart { node } => write!(f, "restart n{node}"),
            FaultAction::CrashAfterSend {
                node,
                kinds,
                until,
                restart_after,
            } => write!(
                f,
                "arm crash of n{node} after sending {kinds:?} until {} (restart after {}ms)",
                fmt_t(*until),
                restart_after / MS
            ),
            FaultAction::Pause { node, until } => {
                write!(f, "pause n{node} until {}", fmt_t(*until))
            }
        }
    }
}

pub fn fmt_t(t: VTime) -> String {
    mm_core::Time(t).to_string()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledFault {
    pub at: VTime,
    pub action: FaultAction,
}

/// Everything fault-related derived from a seed.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultPlan {
    pub enabled: Vec<FaultKind>,
    pub msg: MsgFaults,
    /// Indexed by node id (index 0 unused).
    pub clocks: Vec<Clock>,
    pub db_error_prepare_p: f64,
    pub db_error_apply_p: f64,
    pub schedule: Vec<ScheduledFault>,
}

impl FaultPlan {
    /// No faults at all (scripted scenarios add their own).
    pub fn none(nodes: usize) -> FaultPlan {
        FaultPlan {
            enabled: Vec::new(),
            msg: MsgFaults::default(),
            clocks: vec![Clock::default(); nodes + 1],
            db_error_prepare_p: 0.0,
            db_error_apply_p: 0.0,
            schedule: Vec::new(),
        }
    }

    pub fn is_enabled(&self, k: FaultKind) -> bool {
        self.enabled.contains(&k)
    }

    /// The swarm choice for one seed over a safety phase of `safety` µs.
    pub fn swarm(rng: &mut ChaCha8Rng, nodes: usize, safety: VTime) -> FaultPlan {
        let mut plan = FaultPlan::none(nodes);
        for k in FaultKind::ALL {
            let p = if k == FaultKind::MajorityRing && nodes < 5 {
                0.0
            } else {
                0.4
            };
            if rng.gen_bool(p) {
                plan.enabled.push(k);
            }
        }
        let ids: Vec<NodeId> = (1..=nodes as NodeId).collect();
        if plan.is_enabled(FaultKind::Reorder) {
            plan.msg.reorder_p = rng.gen_range(0.02..0.3);
            plan.msg.reorder_max_us = rng.gen_range(1..=300) * MS;
        }
        if plan.is_enabled(FaultKind::Duplicate) {
            plan.msg.duplicate_p = rng.gen_range(0.01..0.2);
        }
        if plan.is_enabled(FaultKind::Drop) {
            plan.msg.drop_p = rng.gen_range(0.005..0.15);
        }
        if plan.is_enabled(FaultKind::ClockSkew) {
            for c in plan.clocks.iter_mut().skip(1) {
                *c = Clock {
                    offset_us: rng.gen_range(0..=2 * SEC),
                    drift_ppm: rng.gen_range(-50_000..=50_000),
                };
            }
        }
        if plan.is_enabled(FaultKind::DbErrorPrepare) {
            plan.db_error_prepare_p = rng.gen_range(0.01..0.2);
        }
        if plan.is_enabled(FaultKind::DbErrorApply) {
            plan.db_error_apply_p = rng.gen_range(0.01..0.2);
        }

        // Link episodes: one at a time, each healed before the next.
        let link_kinds: Vec<FaultKind> = plan
            .enabled
            .iter()
            .copied()
            .filter(|k| k.is_link_episode())
            .collect();
        if !link_kinds.is_empty() {
            let mut t = rng.gen_range(200 * MS..2 * SEC);
            let episodes = rng.gen_range(1..=4);
            for _ in 0..episodes {
                if t >= safety {
                    break;
                }
                let kind = *link_kinds.choose(rng).unwrap();
                let dur = rng.gen_range(300 * MS..4 * SEC);
                let action = match kind {
                    FaultKind::PartitionSymmetric => {
                        let mut shuffled = ids.clone();
                        shuffled.shuffle(rng);
                        let k = rng.gen_range(1..=nodes / 2);
                        let mut side: Vec<NodeId> = shuffled[..k].to_vec();
                        side.sort();
                        FaultAction::Partition { side }
                    }
                    FaultKind::PartitionOneWay => {
                        let from = *ids.choose(rng).unwrap();
                        let to = *ids
                            .iter()
                            .filter(|&&x| x != from)
                            .collect::<Vec<_>>()
                            .choose(rng)
                            .unwrap();
                        FaultAction::OneWay { from, to: *to }
                    }
                    FaultKind::IsolateOne => FaultAction::Isolate {
                        node: *ids.choose(rng).unwrap(),
                    },
                    FaultKind::MajorityRing => FaultAction::Ring,
                    _ => {
                        let from = *ids.choose(rng).unwrap();
                        let to = *ids
                            .iter()
                            .filter(|&&x| x != from)
                            .collect::<Vec<_>>()
                            .choose(rng)
                            .unwrap();
                        FaultAction::Clog {
                            from,
                            to: *to,
                            until: t + dur,
                        }
                    }
                };
                plan.schedule.push(ScheduledFault { at: t, action });
                plan.schedule.push(ScheduledFault {
                    at: t + dur,
                    action: FaultAction::HealLinks,
                });
                t += dur + rng.gen_range(100 * MS..3 * SEC);
            }
        }

        // Node episodes: crashes, mid-batch crashes, pauses.
        let node_kinds: Vec<FaultKind> = plan
            .enabled
            .iter()
            .copied()
            .filter(|k| k.is_node_episode())
            .collect();
        if !node_kinds.is_empty() {
            let mut t = rng.gen_range(300 * MS..2 * SEC);
            let episodes = rng.gen_range(1..=4);
            for _ in 0..episodes {
                if t >= safety {
                    break;
                }
                let kind = *node_kinds.choose(rng).unwrap();
                let node = *ids.choose(rng).unwrap();
                let mut end = t;
                match kind {
                    FaultKind::CrashRestart => {
                        let down = rng.gen_range(50 * MS..3 * SEC);
                        plan.schedule.push(ScheduledFault {
                            at: t,
                            action: FaultAction::Crash { node },
                        });
                        plan.schedule.push(ScheduledFault {
                            at: t + down,
                            action: FaultAction::Restart { node },
                        });
                        end += down;
                    }
                    FaultKind::CrashMidBatch => {
                        let kinds = if rng.gen_bool(0.85) {
                            vec![*CRASH_AFTER_KINDS.choose(rng).unwrap()]
                        } else {
                            Vec::new()
                        };
                        let window = rng.gen_range(500 * MS..4 * SEC);
                        let restart_after = rng.gen_range(50 * MS..3 * SEC);
                        plan.schedule.push(ScheduledFault {
                            at: t,
                            action: FaultAction::CrashAfterSend {
                                node,
                                kinds,
                                until: t + window,
                                restart_after,
                            },
                        });
                        end += window / 2;
                    }
                    _ => {
                        let dur = rng.gen_range(2200 * MS..4500 * MS);
                        plan.schedule.push(ScheduledFault {
                            at: t,
                            action: FaultAction::Pause {
                                node,
                                until: t + dur,
                            },
                        });
                        end += dur;
                    }
                }
                // Overlap is allowed (two nodes down at once), less often.
                t = if rng.gen_bool(0.25) {
                    t + rng.gen_range(0..SEC)
                } else {
                    end + rng.gen_range(100 * MS..2 * SEC)
                };
            }
        }
        plan.schedule.sort_by_key(|f| f.at);
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn swarm_is_deterministic_and_varied() {
        let a = FaultPlan::swarm(&mut ChaCha8Rng::seed_from_u64(7), 5, 10 * SEC);
        let b = FaultPlan::swarm(&mut ChaCha8Rng::seed_from_u64(7), 5, 10 * SEC);
        assert_eq!(a, b);
        let mut seen = std::collections::BTreeSet::new();
        for s in 0..200 {
            let p = FaultPlan::swarm(&mut ChaCha8Rng::seed_from_u64(s), 5, 10 * SEC);
            seen.extend(p.enabled.iter().copied());
            assert!(p.schedule.windows(2).all(|w| w[0].at <= w[1].at));
        }
        assert_eq!(seen.len(), FaultKind::ALL.len());
    }
}
