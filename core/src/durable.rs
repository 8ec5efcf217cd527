//! What a node must never forget. The core announces every change as an
//! [`crate::Output::Persist`] and the driver applies it to its store *before*
//! releasing any later output of the same batch (raft-rs: persist, then send).
//! After a crash the driver hands the store back to [`crate::Node::recover`].

use crate::ids::{Ballot, Gid};
use crate::messages::Generation;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Per-transaction protocol state: the acceptor's half of the resolver's
/// Paxos-like rounds, plus the final decision once known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxRecord {
    /// Highest ballot promised to a resolver; `None`: no promise yet.
    pub promised: Option<Ballot>,
    /// Highest ballot accepted and its value (`true`: precommit).
    pub accepted: Option<(Ballot, bool)>,
    /// Final outcome.
    pub decided: Option<bool>,
}

/// One change to the durable state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DurableOp {
    /// Restart counter (part of every gid this incarnation mints).
    Boot(u32),
    /// Voted for generation `n`: never work in or vote for an older one.
    PromiseGen(u64),
    /// Adopted a generation (implies the promise of its number).
    AdoptGen(Generation),
    /// Held every committed transaction of generations up to this one.
    LastOnline(u64),
    /// Protocol state of one transaction.
    Tx(Gid, TxRecord),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableState {
    pub boot: u32,
    pub promised_gen: u64,
    pub gen: Generation,
    pub last_online_gen: u64,
    pub txs: BTreeMap<Gid, TxRecord>,
}

impl DurableState {
    /// The state of a freshly initialised cluster: generation 1 with every
    /// configured node a member and a donor.
    /// A node added to a running cluster: a member of no generation, holding
    /// nothing, so it catches up before any generation counts it.
    pub fn joiner() -> DurableState {
        let none = crate::ids::NodeSet::EMPTY;
        DurableState {
            boot: 0,
            promised_gen: 0,
            gen: Generation {
                num: 0,
                members: none,
                donors: none,
            },
            last_online_gen: 0,
            txs: BTreeMap::new(),
        }
    }

    pub fn bootstrap(all: crate::ids::NodeSet) -> DurableState {
        DurableState {
            boot: 0,
            promised_gen: 1,
            gen: Generation {
                num: 1,
                members: all,
                donors: all,
            },
            last_online_gen: 1,
            txs: BTreeMap::new(),
        }
    }

    pub fn apply(&mut self, op: &DurableOp) {
        match op {
            DurableOp::Boot(b) => self.boot = *b,
            DurableOp::PromiseGen(n) => self.promised_gen = self.promised_gen.max(*n),
            DurableOp::AdoptGen(g) => {
                self.promised_gen = self.promised_gen.max(g.num);
                self.gen = *g;
            }
            DurableOp::LastOnline(n) => self.last_online_gen = self.last_online_gen.max(*n),
            DurableOp::Tx(gid, rec) => {
                self.txs.insert(*gid, *rec);
            }
        }
    }
}
