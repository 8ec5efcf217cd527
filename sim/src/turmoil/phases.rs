//! Phase-targeted faults for T2: a seed arms a few (protocol phase, fault)
//! targets; each fires the first time, after the load started, a node
//! reaches that phase, on that node or on its link to a peer.
//!
//! Phases are observed from outside the runtime: the sim's storage wrapper
//! sees every database command and durable write of a node, and the
//! driver's event hook (`Driver::on_event`) sees the core's `CatchupStarted`
//! event, the one phase with no database footprint.

use mm_core::{Ballot, DbCmd, DurableOp, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// A protocol phase a targeted fault waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// A coordinator prepared its transaction locally and waits for votes.
    LocalPrepared,
    /// A participant applied and prepared a peer's transaction: it votes yes.
    VotedYes,
    /// A coordinator made its precommit durable and sent it; acks pending.
    Precommitted,
    /// A coordinator's decided-commit record is written. It is a lazy
    /// record (`Output::Record`), so this is its next persist batch:
    /// COMMIT PREPARED and the Decision have left, the client may have its
    /// answer; a crash here loses the batch and whatever it allows.
    CommitSent,
    /// A resolver promised its own ballot: its query round is in flight.
    ResolverRound,
    /// A campaign leader promised its own generation: Propose is in flight.
    Campaign,
    /// A node adopted a new generation.
    GenAdopted,
    /// A joiner started a catch-up job (asked a donor).
    CatchupJoiner,
    /// A donor started streaming catch-up to a joiner.
    CatchupDonor,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::LocalPrepared,
        Phase::VotedYes,
        Phase::Precommitted,
        Phase::CommitSent,
        Phase::ResolverRound,
        Phase::Campaign,
        Phase::GenAdopted,
        Phase::CatchupJoiner,
        Phase::CatchupDonor,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::LocalPrepared => "local_prepared",
            Phase::VotedYes => "voted_yes",
            Phase::Precommitted => "precommitted",
            Phase::CommitSent => "commit_sent",
            Phase::ResolverRound => "resolver_round",
            Phase::Campaign => "campaign",
            Phase::GenAdopted => "gen_adopted",
            Phase::CatchupJoiner => "catchup_joiner",
            Phase::CatchupDonor => "catchup_donor",
        }
    }
}

/// What a target does to the node that reached the phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PhaseFault {
    /// Crash the node, restart it after the target's duration.
    Crash,
    /// Partition it from one peer (its partner in the phase, if it has one).
    PartitionOne,
    /// Partition it from every peer.
    PartitionAll,
    /// Hold the link to one peer (messages wait, then arrive).
    Hold,
}

impl PhaseFault {
    pub const ALL: [PhaseFault; 4] = [
        PhaseFault::Crash,
        PhaseFault::PartitionOne,
        PhaseFault::PartitionAll,
        PhaseFault::Hold,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PhaseFault::Crash => "crash",
            PhaseFault::PartitionOne => "partition_one",
            PhaseFault::PartitionAll => "partition_all",
            PhaseFault::Hold => "hold",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for PhaseFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which targets a run arms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PhaseFaults {
    /// Only the time-based schedule.
    Off,
    /// The seed picks 0 to 4 targets (distinct phases, distinct faults) from its RNG.
    #[default]
    Random,
    /// Exactly this target (plus the seed's time-based schedule).
    Forced(Phase, PhaseFault),
}

impl fmt::Display for PhaseFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PhaseFaults::Off => f.write_str("off"),
            PhaseFaults::Random => f.write_str("random"),
            PhaseFaults::Forced(p, x) => write!(f, "{p}:{x}"),
        }
    }
}

impl FromStr for PhaseFaults {
    type Err = String;
    /// `off`, `random`, or `PHASE:FAULT` (e.g. `commit_sent:crash`).
    fn from_str(s: &str) -> Result<PhaseFaults, String> {
        match s {
            "off" => return Ok(PhaseFaults::Off),
            "random" => return Ok(PhaseFaults::Random),
            _ => {}
        }
        let phases: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
        let faults: Vec<&str> = PhaseFault::ALL.iter().map(|x| x.name()).collect();
        let usage = || {
            format!(
                "phase faults {s:?}: use off, random or PHASE:FAULT; phases: {}; faults: {}",
                phases.join(", "),
                faults.join(", ")
            )
        };
        let (p, x) = s.split_once(':').ok_or_else(usage)?;
        let p = Phase::ALL.into_iter().find(|q| q.name() == p);
        let x = PhaseFault::ALL.into_iter().find(|y| y.name() == x);
        match (p, x) {
            (Some(p), Some(x)) => Ok(PhaseFaults::Forced(p, x)),
            _ => Err(usage()),
        }
    }
}

/// One armed target, all its random choices drawn when armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub phase: Phase,
    pub fault: PhaseFault,
    /// How long the crash, partition or hold lasts.
    pub duration_ms: u64,
    /// Picks the peer when the phase names no partner.
    pub peer_pick: u32,
}

/// A node reached an armed phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub phase: Phase,
    pub node: NodeId,
    /// The phase's partner: the coordinator of a yes vote, the donor of a
    /// joiner, the joiner of a donor.
    pub partner: Option<NodeId>,
}

/// What the hosts report to the main loop, shared by every node's storage
/// wrapper and its driver's event hook.
#[derive(Debug, Default)]
pub struct PhaseTap {
    /// Set by the main loop: targets fire only in this window.
    pub active: bool,
    /// Phases still waiting for their first occurrence, with their fault.
    pub armed: BTreeMap<Phase, PhaseFault>,
    /// Fired, not yet handled by the main loop.
    pub hits: Vec<Hit>,
    /// How often each phase was reached while active (armed or not).
    pub reached: BTreeMap<Phase, u64>,
    /// Catch-up streams started by donors, and those that landed (the
    /// rest were dropped mid-way by a crash of the donor's host).
    pub streams_started: u64,
    pub streams_landed: u64,
    /// Generation numbers some node promised: the first to promise a
    /// number is its campaign's leader (it votes for itself at once).
    pub promised: BTreeSet<u64>,
}

pub type SharedTap = Arc<Mutex<PhaseTap>>;

impl PhaseTap {
    /// Whether this fired a crash target.
    pub fn observe(&mut self, phase: Phase, node: NodeId, partner: Option<NodeId>) -> bool {
        if !self.active {
            return false;
        }
        *self.reached.entry(phase).or_default() += 1;
        let Some(fault) = self.armed.remove(&phase) else {
            return false;
        };
        self.hits.push(Hit {
            phase,
            node,
            partner,
        });
        fault == PhaseFault::Crash
    }

    /// A database command of `node`.
    pub fn on_db_cmd(&mut self, node: NodeId, cmd: &DbCmd) {
        let _ = match *cmd {
            DbCmd::PrepareLocal { .. } => self.observe(Phase::LocalPrepared, node, None),
            DbCmd::ApplyAndPrepare { gid } => self.observe(Phase::VotedYes, node, Some(gid.origin)),
            DbCmd::StreamCatchup { to, .. } => self.observe(Phase::CatchupDonor, node, Some(to)),
            _ => false,
        };
    }

    /// A durable write of `node`. True if a crash target fired: the node
    /// must then stop right here, so nothing that follows this write (in
    /// particular the messages it allows) leaves before the host crashes.
    pub fn on_persist(&mut self, node: NodeId, op: &DurableOp) -> bool {
        match op {
            DurableOp::PromiseGen(num) if self.promised.insert(*num) => {
                self.observe(Phase::Campaign, node, None)
            }
            DurableOp::AdoptGen(g) => {
                self.promised.insert(g.num);
                self.observe(Phase::GenAdopted, node, None)
            }
            DurableOp::Tx(gid, rec) if gid.origin == node && rec.decided == Some(true) => {
                // The coordinator's (lazy) decided record reaches storage.
                self.observe(Phase::CommitSent, node, None)
            }
            DurableOp::Tx(gid, rec) if rec.decided.is_none() => {
                let own = |b: Ballot| b.node == node && b.round > 0;
                if gid.origin == node && rec.accepted == Some((Ballot::COORDINATOR, true)) {
                    // The coordinator's acceptance of its own precommit.
                    self.observe(Phase::Precommitted, node, None)
                } else if rec.promised.is_some_and(own)
                    && rec.accepted.map(|(b, _)| b) != rec.promised
                {
                    // A resolver's promise of its own ballot (phase 1).
                    self.observe(Phase::ResolverRound, node, None)
                } else {
                    false
                }
            }
            _ => false,
        }
    }
}

// ---------------------------------------------------------------- coverage

/// For a sweep: how many seeds fired each (phase, fault) pair.
#[derive(Clone, Debug, Default)]
pub struct PhaseCoverage {
    pub seeds: u64,
    pub hits: BTreeMap<(Phase, PhaseFault), u64>,
    /// Seeds that armed each pair (fired or not).
    pub armed: BTreeMap<(Phase, PhaseFault), u64>,
    /// Seeds that reached each phase at all (while faults could fire).
    pub reached: BTreeMap<Phase, u64>,
}

impl PhaseCoverage {
    pub fn add(&mut self, r: &super::TurmoilReport) {
        self.seeds += 1;
        let pairs: BTreeSet<(Phase, PhaseFault)> = r.phase_hits.iter().copied().collect();
        for p in pairs {
            *self.hits.entry(p).or_default() += 1;
        }
        for t in &r.targets {
            *self.armed.entry((t.phase, t.fault)).or_default() += 1;
        }
        for p in r.phases_reached.keys() {
            *self.reached.entry(*p).or_default() += 1;
        }
    }

    pub fn merge(&mut self, other: &PhaseCoverage) {
        self.seeds += other.seeds;
        for (k, v) in &other.hits {
            *self.hits.entry(*k).or_default() += v;
        }
        for (k, v) in &other.armed {
            *self.armed.entry(*k).or_default() += v;
        }
        for (k, v) in &other.reached {
            *self.reached.entry(*k).or_default() += v;
        }
    }

    /// Pairs no seed fired.
    pub fn missing(&self) -> Vec<(Phase, PhaseFault)> {
        Phase::ALL
            .iter()
            .flat_map(|&p| PhaseFault::ALL.iter().map(move |&x| (p, x)))
            .filter(|k| !self.hits.contains_key(k))
            .collect()
    }

    /// One row per phase: seeds that reached it, then per fault the seeds
    /// that fired it / armed it.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<16} {:>8} {:>7} {:>14} {:>14} {:>7}   (fired/armed)\n",
            "phase", "reached", "crash", "partition_one", "partition_all", "hold"
        );
        for p in Phase::ALL {
            let c = |x| {
                let get = |m: &BTreeMap<_, u64>| m.get(&(p, x)).copied().unwrap_or(0);
                format!("{}/{}", get(&self.hits), get(&self.armed))
            };
            s.push_str(&format!(
                "{:<16} {:>8} {:>7} {:>14} {:>14} {:>7}\n",
                p.name(),
                self.reached.get(&p).copied().unwrap_or(0),
                c(PhaseFault::Crash),
                c(PhaseFault::PartitionOne),
                c(PhaseFault::PartitionAll),
                c(PhaseFault::Hold),
            ));
        }
        s.push_str(&format!("({} seeds)\n", self.seeds));
        s
    }
}
