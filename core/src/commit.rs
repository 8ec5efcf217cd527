//! Three-phase commit: the coordinator (the transaction's origin) and the
//! participants (every other member of the transaction's generation).
//!
//! prepare everywhere → every member votes yes → the coordinator precommits
//! durably (ballot zero) → a majority of durable precommit acks decides
//! commit. Any no vote, vote timeout or generation change before the
//! precommit aborts. After the precommit only a decision (from the
//! coordinator or a resolver) ends the transaction.

use crate::durable::{DurableOp, TxRecord};
use crate::ids::{Ballot, ClientId, Gid, NodeId, NodeSet, Time};
use crate::messages::{Message, NodeStatus};
use crate::node::{CoordPhase, CoordTx, InDoubt, Node};
use crate::{AbortReason, DbCmd, Event, Outcome, Output};

impl Node {
    pub(crate) fn on_commit_request(&mut self, client: ClientId, wait_peers: bool) {
        if self.status != NodeStatus::Online {
            self.db(DbCmd::RollbackLocal { client });
            let outcome = Outcome::Refused(self.status);
            self.out.push_back(Output::Reply { client, outcome });
            return;
        }
        self.seq += 1;
        let g = self.durable.gen;
        let gid = Gid {
            origin: self.cfg.id,
            boot: self.durable.boot,
            seq: self.seq,
            gen: g.num,
        };
        self.coord.insert(
            gid,
            CoordTx {
                client,
                members: g.members,
                phase: CoordPhase::PreparingLocally,
                yes: NodeSet::EMPTY,
                acks: NodeSet::EMPTY,
                deadline: self.now + self.cfg.vote_timeout,
                wait_peers,
                committed: NodeSet::EMPTY,
                confirm_by: Time(u64::MAX),
                nudged: self.now,
            },
        );
        self.db(DbCmd::PrepareLocal { client, gid });
    }

    pub(crate) fn on_local_prepared(&mut self, client: ClientId, gid: Gid, ok: bool) {
        let Some(c) = self.coord.get_mut(&gid) else {
            // Aborted while preparing (e.g. a generation change): undo, and
            // tell the peers that may have received it on the data plane.
            if ok {
                let mut rec = self.record(gid);
                if rec.decided.is_none() {
                    rec.decided = Some(false);
                    self.persist(DurableOp::Tx(gid, rec));
                }
                self.db(DbCmd::RollbackPrepared { gid });
                let others = self.cfg.all_nodes().minus(NodeSet::single(self.cfg.id));
                self.send_all(others, Message::Decision { gid, commit: false });
            }
            return;
        };
        if !ok {
            self.coord.remove(&gid);
            self.event(Event::CoordinatorAborted {
                gid,
                reason: AbortReason::LocalPrepareFailed,
            });
            let outcome = Outcome::Aborted(AbortReason::LocalPrepareFailed);
            self.out.push_back(Output::Reply { client, outcome });
            return;
        }
        c.phase = CoordPhase::CollectingVotes;
        c.yes.insert(self.cfg.id);
        self.in_doubt.insert(gid, InDoubt { since: self.now });
        self.hold(gid);
        self.maybe_precommit(gid);
    }

    pub(crate) fn on_vote(&mut self, from: NodeId, gid: Gid, yes: bool) {
        let majority_mutant = self.is_mutant(crate::Mutant::CommitOnMajorityPrepares);
        let Some(c) = self.coord.get_mut(&gid) else {
            return;
        };
        if !c.members.contains(from) {
            return;
        }
        if !yes {
            if !majority_mutant
                && matches!(
                    c.phase,
                    CoordPhase::PreparingLocally | CoordPhase::CollectingVotes
                )
            {
                self.coordinator_abort(gid, AbortReason::VoteNo);
            }
            return;
        }
        c.yes.insert(from);
        self.maybe_precommit(gid);
    }

    fn maybe_precommit(&mut self, gid: Gid) {
        let quorum = self.quorum(self.coord[&gid].members);
        let majority_mutant = self.is_mutant(crate::Mutant::CommitOnMajorityPrepares);
        let rec = self.record(gid);
        let (now, resolve_after) = (self.now, self.cfg.resolve_after);
        let c = self.coord.get_mut(&gid).expect("caller checked");
        if c.phase != CoordPhase::CollectingVotes {
            return;
        }
        let enough = if majority_mutant {
            c.yes.len() >= quorum
        } else {
            c.yes == c.members
        };
        if !enough {
            return;
        }
        if rec.promised.is_some_and(|p| p > Ballot::COORDINATOR) || rec.decided.is_some() {
            // A resolver got here first; its decision will reach the client.
            c.phase = CoordPhase::AwaitingResolver;
            return;
        }
        c.phase = CoordPhase::PreCommitted;
        c.deadline = now + resolve_after;
        // Every member voted yes by now, so each has held it since before:
        // past this, one that has not committed has stopped serving reads.
        c.confirm_by = now + self.cfg.peer_commit_wait();
        let members = c.members;
        let accept = Message::Accept {
            gid,
            ballot: Ballot::COORDINATOR,
            commit: true,
        };
        // The peers' Accept goes out before the coordinator's own acceptance
        // is persisted, so both fsyncs overlap: proposing a value needs no
        // durable state (ballot zero is the coordinator's alone), and its own
        // ack, counted at once, is released with everything after it only
        // once durable (outputs are ordered: docs/protocol.md, "Output order").
        let others = members.minus(NodeSet::single(self.cfg.id));
        self.send_all(others, accept.clone());
        if self.is_mutant(crate::Mutant::CountOwnAckUndurable) {
            // Accepts in memory only, and counts that.
            let mut rec = self.record(gid);
            rec.promised = Some(Ballot::COORDINATOR);
            rec.accepted = Some((Ballot::COORDINATOR, true));
            self.durable.apply(&DurableOp::Tx(gid, rec));
            self.on_accepted(self.cfg.id, gid, Ballot::COORDINATOR, true);
        } else {
            self.send(self.cfg.id, accept);
        }
    }

    /// Acceptor side of a ballot (the coordinator's precommit or a resolver's phase 2).
    pub(crate) fn on_accept(&mut self, from: NodeId, gid: Gid, ballot: Ballot, commit: bool) {
        let mut rec = self.record(gid);
        if let Some(d) = rec.decided {
            self.send(from, Message::Decision { gid, commit: d });
            return;
        }
        if rec.promised.is_some_and(|p| p > ballot) {
            self.send(
                from,
                Message::Accepted {
                    gid,
                    ballot,
                    ok: false,
                },
            );
            return;
        }
        rec.promised = Some(ballot);
        rec.accepted = Some((ballot, commit));
        let ack = Message::Accepted {
            gid,
            ballot,
            ok: true,
        };
        if self.is_mutant(crate::Mutant::AckBeforePersist) && from != self.cfg.id {
            self.send(from, ack);
            self.persist(DurableOp::Tx(gid, rec));
        } else if self.is_mutant(crate::Mutant::AcceptanceRecordedLazily) {
            // An acceptance is a promise: it must never ride as a lazy record.
            self.record_lazily(DurableOp::Tx(gid, rec));
            self.send(from, ack);
        } else {
            self.persist(DurableOp::Tx(gid, rec));
            self.send(from, ack);
        }
    }

    pub(crate) fn on_accepted(&mut self, from: NodeId, gid: Gid, ballot: Ballot, ok: bool) {
        if ballot != Ballot::COORDINATOR {
            self.on_resolver_accepted(from, gid, ballot, ok);
            return;
        }
        let quorum = self.coord.get(&gid).map(|c| self.quorum(c.members));
        let Some(c) = self.coord.get_mut(&gid) else {
            return;
        };
        if c.phase != CoordPhase::PreCommitted || !ok {
            return;
        }
        c.acks.insert(from);
        if c.acks.len() >= quorum.unwrap_or(usize::MAX) {
            self.decide(gid, true);
        }
    }

    /// Record a final outcome durably, tell the members, and finish it locally.
    pub(crate) fn decide(&mut self, gid: Gid, commit: bool) {
        let mut rec = self.record(gid);
        if rec.decided.is_some() {
            return;
        }
        rec.decided = Some(commit);
        // A decision reached here is chosen (a majority durably accepted
        // it), so acting on it needs no record of it: the members finish and
        // learn it before `decided` is durable, and the record is written
        // lazily (no fsync on the commit's path, none competing with the
        // COMMIT PREPAREDs for the disk). Lost in a crash, it is re-learnt
        // from the acceptors by a resolver.
        self.finish_locally(gid, commit);
        let others = self.cfg.all_nodes().minus(NodeSet::single(self.cfg.id));
        self.send_all(others, Message::Decision { gid, commit });
        self.record_lazily(DurableOp::Tx(gid, rec));
    }

    pub(crate) fn on_decision(&mut self, gid: Gid, commit: bool) {
        let mut rec = self.record(gid);
        if rec.decided.is_some() {
            return;
        }
        // Only transactions we hold (or are preparing) need the decision;
        // others would bloat the store.
        let holds = self.in_doubt.contains_key(&gid)
            || self.coord.contains_key(&gid)
            || self.applying.contains_key(&gid);
        if !holds && rec == TxRecord::default() {
            return;
        }
        rec.decided = Some(commit);
        // Chosen already (see `decide`): finish at once, record lazily.
        self.finish_locally(gid, commit);
        self.record_lazily(DurableOp::Tx(gid, rec));
    }

    /// Commit or roll back a decided transaction in the local database.
    fn finish_locally(&mut self, gid: Gid, commit: bool) {
        self.resolving.remove(&gid);
        if !commit {
            self.holds.remove(&gid); // never visible anywhere
        }
        let prepared = self.in_doubt.remove(&gid).is_some();
        let wait = self.cfg.peer_commit_wait();
        if let Some(c) = self.coord.get_mut(&gid) {
            if commit {
                c.phase = CoordPhase::Committing;
                // Decided by a resolver: every member voted yes before.
                c.confirm_by = c.confirm_by.min(self.now + wait);
            } else {
                let c = self.coord.remove(&gid).expect("present");
                let outcome = Outcome::Aborted(AbortReason::Resolved);
                self.out.push_back(Output::Reply {
                    client: c.client,
                    outcome,
                });
            }
        }
        if prepared {
            self.finishing.insert(gid);
            let cmd = if commit {
                DbCmd::CommitPrepared { gid }
            } else {
                DbCmd::RollbackPrepared { gid }
            };
            self.db(cmd);
        } else if commit && self.coord.contains_key(&gid) {
            // Coordinator decided before its local prepare finished: cannot happen
            // (it votes only once prepared), but never leave the client hanging.
            let c = self.coord.remove(&gid).expect("present");
            let outcome = Outcome::Aborted(AbortReason::Resolved);
            self.out.push_back(Output::Reply {
                client: c.client,
                outcome,
            });
        }
    }

    pub(crate) fn on_finished(&mut self, gid: Gid, commit: bool) {
        self.finishing.remove(&gid);
        self.holds.remove(&gid);
        if !commit {
            return;
        }
        let me = self.cfg.id;
        match self.coord.get_mut(&gid) {
            Some(c) if c.phase == CoordPhase::Committing => {
                c.committed.insert(me);
                self.maybe_reply_committed(gid);
            }
            Some(_) => {}
            None if gid.origin != me => self.send(gid.origin, Message::Committed { gid }),
            None => {}
        }
    }

    /// Origin: a member's `COMMIT PREPARED` of `gid` finished.
    pub(crate) fn on_peer_committed(&mut self, from: NodeId, gid: Gid) {
        if let Some(c) = self.coord.get_mut(&gid) {
            c.committed.insert(from);
            self.maybe_reply_committed(gid);
        }
    }

    /// Answer a committed transaction's client once the promise it asked
    /// for holds: committed here and, when it waits for peers, committed on
    /// every member or past the wait that takes the others out of the
    /// readable set, and past the new generation's hold.
    fn maybe_reply_committed(&mut self, gid: Gid) {
        let mutant = self.is_mutant(crate::Mutant::ReplyBeforePeerCommits);
        let (now, me, hold) = (self.now, self.cfg.id, self.hold_replies_until);
        let Some(c) = self.coord.get(&gid) else {
            return;
        };
        if c.phase != CoordPhase::Committing || !c.committed.contains(me) {
            return;
        }
        let everywhere = c.members.is_subset(c.committed) || now >= c.confirm_by;
        if c.wait_peers && !mutant && !(everywhere && now >= hold) {
            return;
        }
        let c = self.coord.remove(&gid).expect("present");
        self.out.push_back(Output::Reply {
            client: c.client,
            outcome: Outcome::Committed,
        });
    }

    /// Note that `gid` is prepared here (read-lease bookkeeping).
    fn hold(&mut self, gid: Gid) {
        self.holds.entry(gid).or_insert(Some(self.now));
    }

    /// Abort a transaction this node coordinates that has not precommitted.
    pub(crate) fn coordinator_abort(&mut self, gid: Gid, reason: AbortReason) {
        let Some(c) = self.coord.get(&gid) else {
            return;
        };
        debug_assert!(matches!(
            c.phase,
            CoordPhase::PreparingLocally | CoordPhase::CollectingVotes
        ));
        let (members, client, phase) = (c.members, c.client, c.phase);
        self.event(Event::CoordinatorAborted { gid, reason });
        if phase == CoordPhase::PreparingLocally {
            // The local prepare is still running; `on_local_prepared` rolls it back.
            let c = self.coord.remove(&gid).expect("present");
            self.out.push_back(Output::Reply {
                client: c.client,
                outcome: Outcome::Aborted(reason),
            });
            return;
        }
        let mut rec = self.record(gid);
        rec.decided = Some(false);
        self.persist(DurableOp::Tx(gid, rec));
        self.coord.remove(&gid);
        self.in_doubt.remove(&gid);
        self.holds.remove(&gid);
        self.resolving.remove(&gid);
        self.db(DbCmd::RollbackPrepared { gid });
        self.out.push_back(Output::Reply {
            client,
            outcome: Outcome::Aborted(reason),
        });
        let others = members.minus(NodeSet::single(self.cfg.id));
        self.send_all(others, Message::Decision { gid, commit: false });
    }

    pub(crate) fn abort_coordinated_before(&mut self, gen: u64, reason: AbortReason) {
        let doomed: Vec<Gid> = self
            .coord
            .iter()
            .filter(|(g, c)| {
                g.gen < gen
                    && matches!(
                        c.phase,
                        CoordPhase::PreparingLocally | CoordPhase::CollectingVotes
                    )
            })
            .map(|(g, _)| *g)
            .collect();
        for gid in doomed {
            self.coordinator_abort(gid, reason);
        }
    }

    /// Participant: the data plane is still busy with a peer's `gid`.
    pub(crate) fn on_remote_progress(&mut self, gid: Gid) {
        if gid.origin != self.cfg.id && self.record(gid).decided.is_none() {
            self.send(gid.origin, Message::TxProgress { gid });
        }
    }

    /// Someone is still working on `gid`: a member still applying it (we are
    /// its origin: its vote may take longer), or its origin still collecting
    /// the others' votes (we voted yes: no resolver yet). Timers only: a late
    /// vote or decision is judged by the usual rules.
    pub(crate) fn on_tx_progress(&mut self, from: NodeId, gid: Gid) {
        let (now, wait) = (self.now, self.cfg.vote_timeout);
        if let Some(c) = self.coord.get_mut(&gid) {
            let collecting = matches!(
                c.phase,
                CoordPhase::PreparingLocally | CoordPhase::CollectingVotes
            );
            if collecting && c.members.contains(from) && !c.yes.contains(from) {
                c.deadline = c.deadline.max(now + wait);
            }
        } else if from == gid.origin && !self.resolving.contains_key(&gid) {
            if let Some(d) = self.in_doubt.get_mut(&gid) {
                d.since = d.since.max(now);
            }
        }
    }

    /// Tell the members that voted yes on a transaction still collecting
    /// votes that it is, before their resolvers would take over.
    fn nudge_voters(&mut self) {
        let every = Time(self.cfg.resolve_after.0 / 2);
        let now = self.now;
        let mut due = Vec::new();
        for (gid, c) in self.coord.iter_mut() {
            if c.phase == CoordPhase::CollectingVotes && now.saturating_sub(c.nudged) >= every {
                c.nudged = now;
                due.push((*gid, c.yes.minus(NodeSet::single(self.cfg.id))));
            }
        }
        for (gid, voters) in due {
            self.send_all(voters, Message::TxProgress { gid });
        }
    }

    pub(crate) fn commit_tick(&mut self) {
        self.nudge_voters();
        let waiting: Vec<Gid> = self
            .coord
            .iter()
            .filter(|(_, c)| c.phase == CoordPhase::Committing)
            .map(|(g, _)| *g)
            .collect();
        for gid in waiting {
            self.maybe_reply_committed(gid);
        }
        let expired: Vec<Gid> = self
            .coord
            .iter()
            .filter(|(_, c)| {
                self.now >= c.deadline
                    && matches!(
                        c.phase,
                        CoordPhase::PreparingLocally | CoordPhase::CollectingVotes
                    )
            })
            .map(|(g, _)| *g)
            .collect();
        for gid in expired {
            if self.coord[&gid].phase == CoordPhase::CollectingVotes {
                self.coordinator_abort(gid, AbortReason::VoteTimeout);
            }
        }
    }

    /// Whether this node may vote yes on `gid` now.
    fn may_vote_yes(&self, gid: Gid) -> bool {
        let g = self.durable.gen;
        let rec = self.record(gid);
        self.status == NodeStatus::Online
            && gid.gen == g.num
            && self.durable.promised_gen == g.num
            && g.members.contains(gid.origin)
            && rec.promised.is_none()
            && rec.decided.is_none()
    }

    /// Participant: the data plane delivered `gid`.
    pub(crate) fn on_remote_tx(&mut self, gid: Gid) {
        if gid.origin == self.cfg.id
            || self.in_doubt.contains_key(&gid)
            || self.applying.contains_key(&gid)
        {
            self.db(DbCmd::Discard { gid }); // an echo or a duplicate
            return;
        }
        if self.may_vote_yes(gid) {
            self.applying.insert(gid, self.now);
            self.db(DbCmd::ApplyAndPrepare { gid });
        } else {
            self.db(DbCmd::Discard { gid });
            self.vote_no(gid);
        }
    }

    pub(crate) fn on_remote_prepared(&mut self, gid: Gid, ok: bool) {
        if self.applying.remove(&gid).is_none() {
            if ok {
                // Not ours to hold (e.g. we restarted meanwhile): leave it to the resolver.
                self.in_doubt.insert(gid, InDoubt { since: self.now });
                self.hold(gid);
            }
            return;
        }
        if let Some(commit) = self.record(gid).decided {
            // Decided while we were still preparing it (the origin aborted
            // on another member's no): finish it now rather than leave it
            // to a resolver.
            if ok {
                self.in_doubt.insert(gid, InDoubt { since: self.now });
                self.hold(gid);
                self.finish_locally(gid, commit);
            }
            return;
        }
        if ok && self.may_vote_yes(gid) {
            self.in_doubt.insert(gid, InDoubt { since: self.now });
            self.hold(gid);
            self.send(gid.origin, Message::TxVote { gid, yes: true });
        } else {
            if ok {
                self.db(DbCmd::RollbackPrepared { gid });
            }
            self.vote_no(gid);
        }
    }

    /// Vote no. A member of the transaction's generation remembers it as an
    /// abort (its no forbids a commit), so a redelivery can never turn it
    /// into a yes. A non-member must not: its vote does not count, and a
    /// resolver would take the record for a decision.
    fn vote_no(&mut self, gid: Gid) {
        let g = self.durable.gen;
        let mut rec = self.record(gid);
        let counts = gid.gen == g.num && g.members.contains(self.cfg.id);
        if counts && rec.decided.is_none() && rec.promised.is_none() {
            rec.decided = Some(false);
            self.persist(DurableOp::Tx(gid, rec));
        }
        self.send(gid.origin, Message::TxVote { gid, yes: false });
    }
}
