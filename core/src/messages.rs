//! Control-plane messages between nodes. Every message is self-describing
//! (it names the generation or gid it is about), so duplicates, reordering
//! and late arrival are harmless: each handler checks the state it asserts.

use crate::ids::{Ballot, Gid, NodeId, NodeSet, Time};
use serde::{Deserialize, Serialize};

/// A generation: a numbered membership. `members` is a majority clique of
/// the configured nodes; `donors` are the members that held every committed
/// transaction when the generation formed (they are `online` at once, the
/// other members enter `recovery` and catch up from a donor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Generation {
    pub num: u64,
    pub members: NodeSet,
    pub donors: NodeSet,
}

/// What a node is doing, from its own point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeStatus {
    /// Member of its current generation, holding every committed transaction: takes work.
    Online,
    /// Member of its current generation, still replaying from a donor: votes no.
    Recovery,
    /// Not a member of a generation it could work in; catching up and asking to join.
    Catchup,
    /// Cannot see a majority: refuses work until it can.
    Isolated,
}

/// A transaction's state as reported to a resolver (phase 1 answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxReport {
    /// Final decision known.
    Decided { commit: bool },
    /// An accepted proposal: ballot zero with `commit` is the coordinator's precommit.
    Accepted { ballot: Ballot, commit: bool },
    /// Prepared (voted yes, or coordinator prepared locally), nothing accepted.
    Prepared,
    /// Never prepared here; the promise just made means it never will be.
    NotPrepared,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Every `heartbeat_interval`: the sender's view, for failure detection and cliques.
    Heartbeat {
        /// The sender's clock when it sent this (only the sender reads it,
        /// when the recipient echoes it back).
        sent_at: Time,
        /// The latest `sent_at` the sender received from the recipient: the
        /// recipient's proof that the sender was in `gen` (promised nothing
        /// newer) after that instant of its own clock. The read lease.
        echo: Option<Time>,
        gen: u64,
        /// Highest generation the sender voted for; ahead of `gen` while a
        /// campaign is open, or forever if it died: a leader re-forms then.
        promised_gen: u64,
        status: NodeStatus,
        /// Peers the sender heard from within `heartbeat_timeout` (itself included).
        connected: NodeSet,
        last_online_gen: u64,
        /// A non-member whose pre-join catch-up is done asks to be included.
        ready_to_join: bool,
    },
    /// A campaign for generation `num` with the given members.
    Propose { num: u64, members: NodeSet },
    /// Answer to `Propose`, sent after the promise is durable.
    GenVote {
        num: u64,
        granted: bool,
        last_online_gen: u64,
    },
    /// The campaign won: adopt this generation.
    NewGen { gen: Generation },

    /// Participant's vote on a transaction it was asked to apply.
    TxVote { gid: Gid, yes: bool },
    /// "Still working on it": a participant still receiving or applying
    /// `gid` tells its origin, and an origin still collecting votes tells
    /// the members that voted yes. The waits for a vote and for a decision
    /// are bounds on silence, not on a transaction's size.
    TxProgress { gid: Gid },
    /// Phase 2 of a ballot: precommit (`commit`) or pre-abort at `ballot`.
    /// The coordinator's precommit is `ballot == Ballot::COORDINATOR`.
    Accept {
        gid: Gid,
        ballot: Ballot,
        commit: bool,
    },
    /// Answer to `Accept`, sent after the acceptance is durable.
    Accepted { gid: Gid, ballot: Ballot, ok: bool },
    /// Final outcome.
    Decision { gid: Gid, commit: bool },
    /// A member's `COMMIT PREPARED` of `gid` finished: the origin, waiting
    /// for every member to show it, may answer its client.
    Committed { gid: Gid },

    /// Resolver phase 1: promise `ballot` and report your state of `gid`.
    ResolveQuery { gid: Gid, ballot: Ballot },
    /// Answer to `ResolveQuery`, sent after the promise is durable.
    /// `ok == false` means a higher ballot was promised already (`promised`).
    ResolveState {
        gid: Gid,
        ballot: Ballot,
        ok: bool,
        promised: Ballot,
        report: TxReport,
    },

    /// A returning node asks a donor for every committed transaction of
    /// generations `(from_gen, upto_gen)`; `upto_gen == None`: all it has now.
    CatchupRequest {
        from_gen: u64,
        upto_gen: Option<u64>,
    },
    /// The donor cannot serve (not online, or no longer a donor).
    CatchupRefused { upto_gen: Option<u64> },
}

impl Message {
    /// A short stable name, for traces and coverage tables.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Heartbeat { .. } => "Heartbeat",
            Message::Propose { .. } => "Propose",
            Message::GenVote { .. } => "GenVote",
            Message::NewGen { .. } => "NewGen",
            Message::TxVote { .. } => "TxVote",
            Message::TxProgress { .. } => "TxProgress",
            Message::Accept { .. } => "Accept",
            Message::Accepted { .. } => "Accepted",
            Message::Decision { .. } => "Decision",
            Message::Committed { .. } => "Committed",
            Message::ResolveQuery { .. } => "ResolveQuery",
            Message::ResolveState { .. } => "ResolveState",
            Message::CatchupRequest { .. } => "CatchupRequest",
            Message::CatchupRefused { .. } => "CatchupRefused",
        }
    }

    /// The transaction a message is about, if any.
    pub fn gid(&self) -> Option<Gid> {
        match self {
            Message::TxVote { gid, .. }
            | Message::TxProgress { gid }
            | Message::Accept { gid, .. }
            | Message::Accepted { gid, .. }
            | Message::Decision { gid, .. }
            | Message::Committed { gid }
            | Message::ResolveQuery { gid, .. }
            | Message::ResolveState { gid, .. } => Some(*gid),
            _ => None,
        }
    }
}

/// Who sent what to whom: the unit drivers carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub from: NodeId,
    pub to: NodeId,
    pub msg: Message,
}
