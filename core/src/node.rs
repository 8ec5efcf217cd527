//! The per-node state machine: its state, the input dispatch and the output
//! queue. The protocol's parts live in their own modules as `impl Node`
//! blocks: membership, commit (coordinator and participant), resolver, catch-up.

use crate::durable::{DurableOp, DurableState, TxRecord};
use crate::ids::{Ballot, ClientId, Gid, NodeId, NodeSet, Time};
use crate::messages::{Generation, Message, NodeStatus};
use crate::{Config, DbCmd, DbResult, Event, Input, Output};
use std::collections::{BTreeMap, VecDeque};

/// Where a coordinated transaction stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CoordPhase {
    /// `PREPARE TRANSACTION` issued on the client's session.
    PreparingLocally,
    /// Prepared here; waiting for every member's vote.
    CollectingVotes,
    /// Every vote heard and its own acceptance of ballot zero made durable;
    /// waiting to hear a quorum of acceptances.
    PreCommitted,
    /// A resolver took the transaction over (promised a higher ballot here,
    /// or this coordinator started one: its votes timed out or its
    /// generation changed after its own yes); the client waits for the decision.
    AwaitingResolver,
    /// Decided commit; `COMMIT PREPARED` issued locally.
    Committing,
}

#[derive(Clone, Debug)]
pub(crate) struct CoordTx {
    pub client: ClientId,
    pub members: NodeSet,
    pub phase: CoordPhase,
    pub deadline: Time,
    /// When to send ballot zero's `Accept` to the members whose acceptance
    /// has not been heard (a vote lost between two participants).
    pub relay_at: Time,
    /// Answer only once every member committed (or the wait ran out).
    pub wait_peers: bool,
    /// Members whose `COMMIT PREPARED` finished (this node included).
    pub committed: NodeSet,
    /// Set when every vote is in: past it, a member that has not committed
    /// has stopped serving reads (its hold outlived the read lease).
    pub confirm_by: Time,
    /// When the members that voted yes last heard "still collecting" (they
    /// would otherwise start resolving it).
    pub nudged: Time,
}

/// Ballot zero of one transaction as this member sees it. Every member
/// sends its yes to every member; one that holds the transaction prepared
/// and has heard every yes accepts *commit* at ballot zero durably and says
/// so to every member; whoever hears a quorum of those acceptances knows
/// the outcome (docs/protocol.md §7).
#[derive(Clone, Debug)]
pub(crate) struct Ballot0 {
    /// The members of the transaction's generation.
    pub members: NodeSet,
    /// Members whose yes was heard (this node included once it voted).
    pub yes: NodeSet,
    /// Members whose durable acceptance of ballot zero was heard.
    pub acks: NodeSet,
    /// When this node first heard of it (an entry for a transaction it never
    /// holds is forgotten after a while).
    pub since: Time,
}

/// A transaction prepared in the local database whose outcome is not known here.
#[derive(Clone, Debug)]
pub(crate) struct InDoubt {
    /// When it was prepared (or when this incarnation found it).
    pub since: Time,
}

/// What this node last heard from a peer.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PeerView {
    pub last_heard: Option<Time>,
    pub gen: u64,
    pub promised_gen: u64,
    pub status: Option<NodeStatus>,
    pub connected: NodeSet,
    pub last_online_gen: u64,
    pub ready_to_join: bool,
    /// Latest `sent_at` of the peer's heartbeats, echoed back in ours.
    pub their_clock: Option<Time>,
    /// The freshest of our own clock instants the peer echoed while in
    /// generation `.1` (and promised nothing newer): the read lease it grants.
    pub vouched: Option<(Time, u64)>,
}

#[derive(Clone, Debug)]
pub(crate) struct Campaign {
    pub num: u64,
    pub members: NodeSet,
    pub granted: NodeSet,
    /// Each voter's `last_online_gen`, by node id.
    pub last_online: BTreeMap<NodeId, u64>,
    pub deadline: Time,
}

#[derive(Clone, Debug)]
pub(crate) struct Resolution {
    pub ballot: Ballot,
    /// Phase 1 answers: `(report)` per node that promised.
    pub reports: BTreeMap<NodeId, crate::messages::TxReport>,
    /// Phase 2: the value proposed and who accepted it.
    pub proposal: Option<(bool, crate::ResolveRule)>,
    pub accepted: NodeSet,
    pub deadline: Time,
}

#[derive(Clone, Debug)]
pub(crate) struct CatchupJob {
    pub donor: NodeId,
    pub upto_gen: Option<u64>,
    pub deadline: Time,
}

/// One cluster member's protocol state machine.
pub struct Node {
    pub(crate) cfg: Config,
    pub(crate) now: Time,
    /// When this incarnation started: peers get one heartbeat timeout to show up.
    pub(crate) booted_at: Time,
    pub(crate) durable: DurableState,
    pub(crate) status: NodeStatus,
    pub(crate) out: VecDeque<Output>,
    pub(crate) next_tick: Time,

    // membership
    pub(crate) peers: Vec<PeerView>,
    pub(crate) next_heartbeat: Time,
    pub(crate) campaign: Option<Campaign>,
    pub(crate) next_campaign: Time,
    /// The membership this node would campaign for, and since when it has wanted it.
    pub(crate) wanted: Option<(NodeSet, Time)>,
    /// Highest generation number promised by anyone, as learnt from refusals.
    pub(crate) highest_promise_seen: u64,

    // commit
    pub(crate) seq: u32,
    pub(crate) coord: BTreeMap<Gid, CoordTx>,
    pub(crate) ballot0: BTreeMap<Gid, Ballot0>,
    pub(crate) in_doubt: BTreeMap<Gid, InDoubt>,
    /// Remote transactions handed to the database for apply-and-prepare.
    pub(crate) applying: BTreeMap<Gid, Time>,
    /// Decided transactions whose `COMMIT/ROLLBACK PREPARED` has not finished.
    pub(crate) finishing: std::collections::BTreeSet<Gid>,
    /// Transactions prepared here and not finished, with when this node
    /// first held them (`None`: before this incarnation). One held longer
    /// than the read lease may be committed elsewhere: no reads here.
    pub(crate) holds: BTreeMap<Gid, Option<Time>>,
    /// Answers that promise visibility everywhere wait until then: members
    /// excluded by this generation may have served reads until their lease
    /// from its members ran out.
    pub(crate) hold_replies_until: Time,

    // resolver
    pub(crate) resolving: BTreeMap<Gid, Resolution>,
    pub(crate) max_round: u32,

    // catch-up
    pub(crate) catchup: Option<CatchupJob>,
    pub(crate) ready_to_join: bool,
    pub(crate) catchup_attempts: u32,
    /// Donor side: requests waiting until the donor's older transactions are settled.
    pub(crate) serving: BTreeMap<NodeId, (u64, Option<u64>)>,
}

impl Node {
    /// A node of a freshly initialised cluster (generation 1, every node online).
    pub fn new(cfg: Config, now: Time) -> Node {
        // Isolated until heartbeats show a majority, like any other start.
        let durable = DurableState::bootstrap(cfg.nodes);
        Node::with_state(cfg, durable, now)
    }

    /// A node added to a running cluster. Generation 1 of the cluster it
    /// joins had other members, so it must not claim to be in it.
    pub fn new_joiner(cfg: Config, now: Time) -> Node {
        Node::with_state(cfg, DurableState::joiner(), now)
    }

    /// A node restarting after a crash: its durable state and the gids its
    /// database still holds prepared (`pg_prepared_xacts`). Volatile state
    /// (coordinated transactions, campaigns, resolver rounds) is gone.
    pub fn recover(cfg: Config, durable: DurableState, prepared: &[Gid], now: Time) -> Node {
        let mut node = Node::with_state(cfg, durable, now);
        let boot = node.durable.boot + 1;
        node.persist(DurableOp::Boot(boot));
        for gid in prepared {
            match node.record(*gid).decided {
                Some(commit) => {
                    node.finishing.insert(*gid);
                    let cmd = if commit {
                        DbCmd::CommitPrepared { gid: *gid }
                    } else {
                        DbCmd::RollbackPrepared { gid: *gid }
                    };
                    node.db(cmd);
                }
                None => {
                    node.in_doubt.insert(*gid, InDoubt { since: now });
                }
            }
            node.holds.insert(*gid, None);
        }
        node
    }

    fn with_state(cfg: Config, durable: DurableState, now: Time) -> Node {
        let peers = vec![PeerView::default(); crate::ids::MAX_NODES + 1];
        Node {
            now,
            booted_at: now,
            durable,
            status: NodeStatus::Isolated,
            out: VecDeque::new(),
            next_tick: now,
            peers,
            next_heartbeat: now,
            campaign: None,
            next_campaign: now,
            wanted: None,
            highest_promise_seen: 0,
            seq: 0,
            coord: BTreeMap::new(),
            ballot0: BTreeMap::new(),
            in_doubt: BTreeMap::new(),
            applying: BTreeMap::new(),
            finishing: Default::default(),
            holds: BTreeMap::new(),
            hold_replies_until: now + cfg.peer_commit_wait(),
            resolving: BTreeMap::new(),
            max_round: 0,
            catchup: None,
            ready_to_join: false,
            catchup_attempts: 0,
            serving: BTreeMap::new(),
            cfg,
        }
    }

    /// Feed one input. `now` must not go backwards.
    pub fn handle(&mut self, now: Time, input: Input) {
        self.now = self.now.max(now);
        match input {
            Input::Tick => self.on_tick(),
            Input::Receive { from, msg } => self.on_message(from, msg),
            Input::CommitRequest { client, wait_peers } => {
                self.on_commit_request(client, wait_peers)
            }
            Input::RemoteTx { gid } => self.on_remote_tx(gid),
            Input::RemoteProgress { gid } => self.on_remote_progress(gid),
            Input::Db(res) => match res {
                DbResult::LocalPrepared { client, gid, ok } => {
                    self.on_local_prepared(client, gid, ok)
                }
                DbResult::RemotePrepared { gid, ok } => self.on_remote_prepared(gid, ok),
                DbResult::Finished { gid, commit } => self.on_finished(gid, commit),
            },
            Input::CatchupApplied { donor, upto_gen } => self.on_catchup_applied(donor, upto_gen),
        }
        self.refresh_status();
    }

    /// Next output, in the order the driver must process them.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When the driver must next deliver [`Input::Tick`].
    pub fn next_timer(&self) -> Time {
        self.next_tick
    }

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn status(&self) -> NodeStatus {
        self.status
    }
    pub fn generation(&self) -> Generation {
        self.durable.gen
    }
    pub fn durable(&self) -> &DurableState {
        &self.durable
    }
    /// Highest generation this node voted for (ahead of `generation()` during a campaign).
    pub fn promised_gen(&self) -> u64 {
        self.durable.promised_gen
    }
    /// Whether client work (reads and writes) is accepted here now.
    pub fn accepts_work(&self) -> bool {
        self.status == NodeStatus::Online
    }
    /// Until when this node may serve reads with the read-after-commit
    /// guarantee, absent new inputs (`None`: not now). Online; a majority of
    /// the generation vouched for it within the read lease; nothing held
    /// prepared here longer than the lease. See docs/protocol.md.
    pub fn readable_until(&self) -> Option<Time> {
        if self.status != NodeStatus::Online {
            return None;
        }
        let lease = self.cfg.read_lease;
        let gen = self.durable.gen.num;
        // Called after every input (the driver publishes it): no allocation.
        let mut vouches = [Time::ZERO; crate::ids::MAX_NODES + 1];
        let mut n_vouches = 0;
        for n in self.cfg.all_nodes().iter().filter(|&n| n != self.cfg.id) {
            if let Some((at, g)) = self.peers[n as usize].vouched {
                if g == gen {
                    vouches[n_vouches] = at;
                    n_vouches += 1;
                }
            }
        }
        let vouches = &mut vouches[..n_vouches];
        vouches.sort_unstable_by(|a, b| b.cmp(a));
        let needed = self.cfg.majority() - 1;
        let mut until = if needed == 0 {
            Time(u64::MAX)
        } else {
            vouches.get(needed - 1).map(|&at| at + lease)?
        };
        for (gid, held) in &self.holds {
            let own_undecided = self.coord.get(gid).is_some_and(|c| {
                matches!(
                    c.phase,
                    CoordPhase::PreparingLocally | CoordPhase::CollectingVotes
                )
            });
            if own_undecided {
                continue; // not precommitted: nobody can commit it yet
            }
            until = until.min((*held)? + lease);
        }
        (self.now < until).then_some(until)
    }

    /// Peers heard from within the heartbeat timeout, this node included.
    pub fn connected(&self) -> NodeSet {
        self.connected_set()
    }
    /// Transactions this node coordinates, with their phase.
    pub fn coordinating(&self) -> impl Iterator<Item = (Gid, CoordPhase)> + '_ {
        self.coord.iter().map(|(g, c)| (*g, c.phase))
    }
    /// Prepared here and undecided (participant side, or coordinator after a crash).
    pub fn in_doubt(&self) -> impl Iterator<Item = Gid> + '_ {
        self.in_doubt.keys().copied()
    }
    /// Remote transactions being applied and prepared here.
    pub fn applying(&self) -> impl Iterator<Item = Gid> + '_ {
        self.applying.keys().copied()
    }

    fn on_tick(&mut self) {
        self.membership_tick();
        self.commit_tick();
        self.resolver_tick();
        self.catchup_tick();
        self.next_tick = self.now + self.cfg.tick_interval;
    }

    fn on_message(&mut self, from: NodeId, msg: Message) {
        if !self.cfg.nodes.contains(from) || from == self.cfg.id {
            return; // not a peer of ours; the transport should not have let it in
        }
        self.peers[from as usize].last_heard = Some(self.now);
        self.dispatch(from, msg);
    }

    /// Handle a message from a peer or from this node itself (resolver and
    /// campaign rounds count the local node like any other voter).
    pub(crate) fn dispatch(&mut self, from: NodeId, msg: Message) {
        match msg {
            Message::Heartbeat {
                sent_at,
                echo,
                gen,
                promised_gen,
                status,
                connected,
                last_online_gen,
                ready_to_join,
            } => {
                let p = &mut self.peers[from as usize];
                p.promised_gen = promised_gen;
                p.their_clock = p.their_clock.max(Some(sent_at));
                if let Some(at) = echo.filter(|_| promised_gen == gen) {
                    if p.vouched.is_none_or(|(v, _)| at > v) {
                        p.vouched = Some((at, gen));
                    }
                }
                self.on_heartbeat(from, gen, status, connected, last_online_gen, ready_to_join)
            }
            Message::Propose { num, members } => self.on_propose(from, num, members),
            Message::GenVote {
                num,
                granted,
                last_online_gen,
            } => self.on_gen_vote(from, num, granted, last_online_gen),
            Message::NewGen { gen } => self.on_new_gen(gen),
            Message::TxVote { gid, yes } => self.on_vote(from, gid, yes),
            Message::TxProgress { gid } => self.on_tx_progress(from, gid),
            Message::Accept {
                gid,
                ballot,
                commit,
            } => self.on_accept(from, gid, ballot, commit),
            Message::Accepted { gid, ballot, ok } => self.on_accepted(from, gid, ballot, ok),
            Message::Decision { gid, commit } => self.on_decision(gid, commit),
            Message::Committed { gid } => self.on_peer_committed(from, gid),
            Message::ResolveQuery { gid, ballot } => self.on_resolve_query(from, gid, ballot),
            Message::ResolveState {
                gid,
                ballot,
                ok,
                promised,
                report,
            } => self.on_resolve_state(from, gid, ballot, ok, promised, report),
            Message::CatchupRequest { from_gen, upto_gen } => {
                self.on_catchup_request(from, from_gen, upto_gen)
            }
            Message::CatchupRefused { upto_gen } => self.on_catchup_refused(from, upto_gen),
        }
    }

    /// Send to a peer, or handle at once if addressed to this node.
    pub(crate) fn send(&mut self, to: NodeId, msg: Message) {
        if to == self.cfg.id {
            self.dispatch(to, msg);
        } else {
            self.out.push_back(Output::Send { to, msg });
        }
    }

    pub(crate) fn send_all(&mut self, to: NodeSet, msg: Message) {
        for n in to.iter() {
            self.send(n, msg.clone());
        }
    }

    pub(crate) fn persist(&mut self, op: DurableOp) {
        self.durable.apply(&op);
        self.out.push_back(Output::Persist(op));
    }

    /// A write the node may lose in a crash without breaking a promise
    /// (see [`Output::Record`]): off the commit's critical path.
    pub(crate) fn record_lazily(&mut self, op: DurableOp) {
        self.durable.apply(&op);
        self.out.push_back(Output::Record(op));
    }

    pub(crate) fn db(&mut self, cmd: DbCmd) {
        self.out.push_back(Output::Db(cmd));
    }

    pub(crate) fn event(&mut self, e: Event) {
        self.out.push_back(Output::Event(e));
    }

    pub(crate) fn record(&self, gid: Gid) -> TxRecord {
        self.durable.txs.get(&gid).copied().unwrap_or_default()
    }

    pub(crate) fn is_mutant(&self, _m: crate::Mutant) -> bool {
        #[cfg(feature = "mutants")]
        {
            self.cfg.mutant == Some(_m)
        }
        #[cfg(not(feature = "mutants"))]
        {
            false
        }
    }

    /// Recompute the node's status from membership and connectivity.
    pub(crate) fn refresh_status(&mut self) {
        let id = self.cfg.id;
        let gen = self.durable.gen;
        // Any message marks a peer heard, but only its heartbeat says which
        // generation it is in: a restarted node that heard peers' other
        // messages first was `online` in its old generation for a moment
        // (serving reads) before a heartbeat showed a newer one.
        let mut conn = NodeSet::single(id);
        for n in self.connected_set().iter() {
            if self.peers[n as usize].status.is_some() {
                conn.insert(n);
            }
        }
        let sees_majority = conn.len() >= self.quorum(gen.members);
        // A peer in a newer generation means ours is over, whatever we were in it.
        let stale = conn
            .iter()
            .any(|n| n != id && self.peers[n as usize].gen > gen.num);
        let status = if !sees_majority {
            NodeStatus::Isolated
        } else if stale {
            NodeStatus::Catchup
        } else if gen.members.contains(id) && self.durable.last_online_gen >= gen.num {
            if self.durable.promised_gen == gen.num {
                NodeStatus::Online
            } else {
                // Voted for a newer generation that has not formed yet: hold work.
                NodeStatus::Isolated
            }
        } else if gen.members.contains(id) {
            NodeStatus::Recovery
        } else {
            NodeStatus::Catchup
        };
        if status != self.status {
            self.status = status;
            self.event(Event::StatusChanged { status });
        }
    }

    /// Votes needed for a quorum. Always a majority of the configured nodes;
    /// the minority mutant counts the given set instead.
    pub(crate) fn quorum(&self, set: NodeSet) -> usize {
        if self.is_mutant(crate::Mutant::MinorityAcceptsWrites) {
            set.len() / 2 + 1
        } else {
            self.cfg.majority()
        }
    }
}
