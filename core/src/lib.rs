//! mm-core: the sans-IO protocol core of mm.
//!
//! One [`Node`] per cluster member. A driver (the simulator, or `mmd` on
//! tokio) feeds it [`Input`]s with the current time through
//! [`Node::handle`] and drains [`Output`]s with [`Node::poll_output`]:
//! messages to send, commands for the local database, durable writes, client
//! replies and events. The core does no I/O, reads no clock and draws no
//! random numbers; iteration order never depends on hashing.
//!
//! Contract for drivers:
//! - process outputs in order; a [`Output::Persist`] must be durable before
//!   any later output of the same batch is released (messages depend on it);
//! - a [`Output::Record`] may be made durable late, but before (or with)
//!   the next `Persist`, and the later outputs do not wait for it;
//! - call `handle(now, Input::Tick)` when `now >= node.next_timer()`;
//! - after a crash, rebuild the node with [`Node::recover`] from the durable
//!   state and the database's list of prepared gids.
//!
//! The protocol is described in `docs/protocol.md`.

mod catchup;
mod commit;
pub mod durable;
pub mod ids;
mod membership;
pub mod messages;
pub mod mutants;
mod node;
mod resolver;

pub use durable::{DurableOp, DurableState, TxRecord};
pub use ids::{Ballot, ClientId, Gid, NodeId, NodeSet, Time};
pub use messages::{Envelope, Generation, Message, NodeStatus, TxReport};
pub use mutants::Mutant;
pub use node::{CoordPhase, Node};

use serde::{Deserialize, Serialize};

/// Static settings of one node. Times are durations in microseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub id: NodeId,
    /// The configured nodes; quorums are majorities of this set, never of a
    /// generation. Ids need not be contiguous: a dropped node leaves a gap.
    pub nodes: NodeSet,
    /// Granularity of the periodic [`Input::Tick`].
    pub tick_interval: Time,
    pub heartbeat_interval: Time,
    /// A peer unheard for this long is disconnected.
    pub heartbeat_timeout: Time,
    /// How long a coordinator waits for a member's vote with no word from
    /// it (`TxProgress` from a member still receiving or applying restarts
    /// the wait): a bound on silence, not on size. Dead members are found by
    /// the heartbeats first.
    pub vote_timeout: Time,
    /// How long a prepared, undecided transaction waits before this node resolves it.
    pub resolve_after: Time,
    /// Retry period of an unfinished resolver round or campaign.
    pub retry_interval: Time,
    /// How long a joiner waits for a donor's catch-up before trying another.
    pub catchup_timeout: Time,
    /// A node serves reads only while a majority of its generation vouched
    /// for it within this lease (heartbeats echoing its own clock) and no
    /// transaction has been prepared here, unfinished, for longer. Origins
    /// waiting for peers' commits wait [`Config::peer_commit_wait`] at most,
    /// which exceeds the lease: a member that has not committed by then has
    /// stopped serving reads. See docs/protocol.md, "Visible everywhere".
    pub read_lease: Time,
    /// A deliberately broken protocol variant, for the simulator's mutant sweep.
    #[cfg(feature = "mutants")]
    pub mutant: Option<Mutant>,
}

impl Config {
    /// Defaults from the architecture brief: heartbeats every 200 ms,
    /// a peer is gone after 2 s. Panics on an impossible id or size; drivers
    /// reading user configuration use [`Config::try_new`].
    pub fn new(id: NodeId, nodes: usize) -> Config {
        Config::try_new(id, nodes).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_new(id: NodeId, nodes: usize) -> Result<Config, String> {
        if !(1..ids::MAX_NODES).contains(&nodes) {
            return Err(format!(
                "cluster size {nodes} outside 1..{}",
                ids::MAX_NODES
            ));
        }
        Config::try_with_nodes(id, NodeSet::first_n(nodes))
    }

    /// A node of the cluster made of `nodes` (any ids in `1..=MAX_NODES`).
    pub fn try_with_nodes(id: NodeId, nodes: NodeSet) -> Result<Config, String> {
        if nodes.is_empty() || nodes.iter().any(|n| n < 1 || n as usize > ids::MAX_NODES) {
            return Err(format!(
                "node ids {nodes} must be a non-empty set within 1..={}",
                ids::MAX_NODES
            ));
        }
        if !nodes.contains(id) {
            return Err(format!("node id {id} is not one of the nodes {nodes}"));
        }
        Ok(Config {
            id,
            nodes,
            tick_interval: Time::from_millis(50),
            heartbeat_interval: Time::from_millis(200),
            heartbeat_timeout: Time::from_millis(2000),
            vote_timeout: Time::from_millis(5000),
            resolve_after: Time::from_millis(2500),
            retry_interval: Time::from_millis(400),
            catchup_timeout: Time::from_millis(3000),
            read_lease: Time::from_millis(1000),
            #[cfg(feature = "mutants")]
            mutant: None,
        })
    }

    /// Timeouts for a fast, local network (the runtime's tests, the turmoil
    /// tier): a peer is gone after 1 s instead of 2 s, so runs take seconds.
    /// The heartbeat timeout stays above the mesh's first reconnect backoffs
    /// (50+100+200+400 ms), so a peer still dialing at start-up is not voted out.
    pub fn with_fast_timeouts(mut self) -> Config {
        let ms = Time::from_millis;
        self.tick_interval = ms(10);
        self.heartbeat_interval = ms(50);
        self.heartbeat_timeout = ms(1000);
        self.vote_timeout = ms(1000);
        self.resolve_after = ms(1500);
        self.retry_interval = ms(150);
        self.catchup_timeout = ms(2000);
        self.read_lease = ms(300);
        self
    }

    /// The longest an origin waits for a member's `Committed` (or holds the
    /// first answers of a new generation): the read lease plus a quarter
    /// for clocks that run at different rates.
    pub fn peer_commit_wait(&self) -> Time {
        Time(self.read_lease.0 + self.read_lease.0 / 4)
    }

    /// Votes needed for any quorum: a majority of the configured nodes.
    pub fn majority(&self) -> usize {
        self.nodes.len() / 2 + 1
    }

    pub fn all_nodes(&self) -> NodeSet {
        self.nodes
    }
}

/// Everything that can happen to a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// The timer asked for by [`Node::next_timer`] fired.
    Tick,
    /// A control-plane message arrived.
    Receive { from: NodeId, msg: Message },
    /// A client transaction that wrote something asks to commit. The core
    /// answers with `Db(PrepareLocal)` and later a `Reply`, or refuses at once.
    /// `wait_peers`: answer only once every member shows it, or has left
    /// the readable set (the session's `mm.wait_peer_commits`).
    CommitRequest { client: ClientId, wait_peers: bool },
    /// The data plane delivered a peer's prepared transaction. The core
    /// answers with `Db(ApplyAndPrepare)` or `Db(Discard)`.
    RemoteTx { gid: Gid },
    /// The data plane is still receiving or applying a peer's `gid` (a
    /// large transaction): the core tells the origin, which waits on.
    /// Drivers send it at most every few hundred milliseconds per gid.
    RemoteProgress { gid: Gid },
    /// Result of a database command.
    Db(DbResult),
    /// The driver applied a donor's catch-up stream `(from_gen, upto_gen)`.
    CatchupApplied {
        donor: NodeId,
        upto_gen: Option<u64>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DbResult {
    /// `PREPARE TRANSACTION gid` on the client's session finished.
    LocalPrepared {
        client: ClientId,
        gid: Gid,
        ok: bool,
    },
    /// A remote transaction was applied and prepared (`ok`) or failed (lock timeout, error).
    RemotePrepared { gid: Gid, ok: bool },
    /// `COMMIT PREPARED` / `ROLLBACK PREPARED` finished.
    Finished { gid: Gid, commit: bool },
}

/// Commands for the local database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DbCmd {
    /// Prepare the client's open transaction under `gid`.
    PrepareLocal {
        client: ClientId,
        gid: Gid,
    },
    /// Abandon the client's open transaction (refused or failed before prepare).
    RollbackLocal {
        client: ClientId,
    },
    /// Apply the delivered remote transaction and prepare it under its gid.
    ApplyAndPrepare {
        gid: Gid,
    },
    /// Drop the delivered remote transaction unapplied.
    Discard {
        gid: Gid,
    },
    CommitPrepared {
        gid: Gid,
    },
    RollbackPrepared {
        gid: Gid,
    },
    /// Send `to` every committed transaction of generations in
    /// `(from_gen, upto_gen)` (`None`: no upper bound), in local commit
    /// order, over the data plane; the joiner's driver reports
    /// `CatchupApplied` when it has applied them all.
    StreamCatchup {
        to: NodeId,
        from_gen: u64,
        upto_gen: Option<u64>,
    },
}

/// Why a transaction was rolled back; all are retryable (SQLSTATE 40001).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AbortReason {
    LocalPrepareFailed,
    VoteNo,
    VoteTimeout,
    GenerationChanged,
    Resolved,
}

/// The answer to a [`Input::CommitRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Committed,
    Aborted(AbortReason),
    /// Not online in a majority generation: nothing was done.
    Refused(NodeStatus),
}

/// How a resolver reached its decision (E3PC rules), for coverage and traces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ResolveRule {
    /// Some node already knew the outcome.
    AlreadyDecided,
    /// The highest accepted ballot carried this value.
    HighestAccepted,
    /// Nothing accepted in the quorum: abort is the only safe choice.
    NothingAccepted,
}

/// Things worth tracing; they change nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    StatusChanged {
        status: NodeStatus,
    },
    CampaignStarted {
        num: u64,
        members: NodeSet,
    },
    GenerationAdopted {
        gen: Generation,
    },
    CoordinatorAborted {
        gid: Gid,
        reason: AbortReason,
    },
    /// The coordinator's votes timed out, or its generation changed, after
    /// its own yes: the members may have accepted ballot zero on their own,
    /// so it cannot abort alone and hands the transaction to a resolver.
    CoordinatorResolving {
        gid: Gid,
        reason: AbortReason,
    },
    ResolverStarted {
        gid: Gid,
        ballot: Ballot,
    },
    ResolverDecided {
        gid: Gid,
        commit: bool,
        rule: ResolveRule,
    },
    CatchupStarted {
        donor: NodeId,
        from_gen: u64,
        upto_gen: Option<u64>,
    },
    CatchupCompleted {
        donor: NodeId,
        upto_gen: Option<u64>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    Send {
        to: NodeId,
        msg: Message,
    },
    Db(DbCmd),
    /// Make this durable before releasing any later output.
    Persist(DurableOp),
    /// Make this durable eventually: with the next `Persist` (never after
    /// it) or on the driver's own schedule; later outputs do not wait.
    /// Only state whose loss in a crash breaks no promise is recorded so:
    /// a decided outcome that was chosen (a majority durably accepted it, or
    /// the coordinator's own durable abort), which a resolver learns again.
    Record(DurableOp),
    Reply {
        client: ClientId,
        outcome: Outcome,
    },
    Event(Event),
}
