//! Three-phase commit: the coordinator (the transaction's origin) and the
//! participants (every other member of the transaction's generation).
//!
//! prepare everywhere → every member sends its yes to every member → each
//! member that heard every yes accepts *commit* at ballot zero durably and
//! tells every member → whoever hears a quorum of those acceptances knows
//! commit is chosen and commits. A no vote, or the coordinator still
//! preparing, aborts; once the coordinator voted yes only a quorum of
//! acceptances or a resolver ends the transaction (its votes timing out
//! hand it to a resolver: the members may have accepted without it).

use crate::durable::{DurableOp, TxRecord};
use crate::ids::{Ballot, ClientId, Gid, NodeId, NodeSet, Time};
use crate::messages::{Message, NodeStatus};
use crate::node::{Ballot0, CoordPhase, CoordTx, InDoubt, Node};
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
                deadline: self.now + self.cfg.vote_timeout,
                relay_at: Time(u64::MAX),
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
        let members = c.members;
        self.in_doubt.insert(gid, InDoubt { since: self.now });
        self.hold(gid);
        self.vote_yes(gid, members);
    }

    /// This member holds `gid` prepared: its yes goes to every member, and
    /// counts here like theirs.
    fn vote_yes(&mut self, gid: Gid, members: NodeSet) {
        let me = self.cfg.id;
        self.send_all(
            members.minus(NodeSet::single(me)),
            Message::TxVote { gid, yes: true },
        );
        self.note_yes(gid, me, members);
        self.maybe_accept_ballot0(gid);
    }

    /// The members of `gid`'s generation, if this node takes part in it.
    fn members_of(&self, gid: Gid) -> Option<NodeSet> {
        if let Some(c) = self.coord.get(&gid) {
            return Some(c.members);
        }
        if let Some(b) = self.ballot0.get(&gid) {
            return Some(b.members);
        }
        let g = self.durable.gen;
        (gid.gen == g.num && g.members.contains(self.cfg.id)).then_some(g.members)
    }

    fn ballot0_entry(&mut self, gid: Gid, members: NodeSet) -> &mut Ballot0 {
        let now = self.now;
        self.ballot0.entry(gid).or_insert(Ballot0 {
            members,
            yes: NodeSet::EMPTY,
            acks: NodeSet::EMPTY,
            since: now,
        })
    }

    fn note_yes(&mut self, gid: Gid, from: NodeId, members: NodeSet) {
        self.ballot0_entry(gid, members).yes.insert(from);
    }

    pub(crate) fn on_vote(&mut self, from: NodeId, gid: Gid, yes: bool) {
        let majority_mutant = self.is_mutant(crate::Mutant::CommitOnMajorityPrepares);
        if !yes {
            // A no reaches the origin only; it forbids every acceptance of
            // ballot zero (that needs every yes), so the origin aborts alone.
            let Some(c) = self.coord.get(&gid) else {
                return;
            };
            if c.members.contains(from)
                && !majority_mutant
                && matches!(
                    c.phase,
                    CoordPhase::PreparingLocally | CoordPhase::CollectingVotes
                )
            {
                self.coordinator_abort(gid, AbortReason::VoteNo);
            }
            return;
        }
        if self.record(gid).decided.is_some() {
            return;
        }
        let Some(members) = self.members_of(gid) else {
            return;
        };
        if !members.contains(from) {
            return;
        }
        self.note_yes(gid, from, members);
        self.maybe_accept_ballot0(gid);
    }

    /// Accept *commit* at ballot zero once this member holds `gid` prepared
    /// (its own yes is in) and has heard every member's yes. Any member may:
    /// ballot zero only ever carries commit, and only after every yes.
    fn maybe_accept_ballot0(&mut self, gid: Gid) {
        let me = self.cfg.id;
        let majority_mutant = self.is_mutant(crate::Mutant::CommitOnMajorityPrepares);
        let Some(b) = self.ballot0.get(&gid) else {
            return;
        };
        let members = b.members;
        let enough = if majority_mutant {
            b.yes.len() >= self.quorum(members)
        } else {
            b.yes == members
        };
        if !b.yes.contains(me) || !enough {
            return;
        }
        let rec = self.record(gid);
        if rec.decided.is_some() || rec.accepted.is_some() {
            return;
        }
        let outbid = rec.promised.is_some_and(|p| p > Ballot::COORDINATOR);
        let (now, resolve_after, relay) = (
            self.now,
            self.cfg.resolve_after,
            self.cfg.heartbeat_interval,
        );
        let wait = self.cfg.peer_commit_wait();
        if let Some(c) = self.coord.get_mut(&gid) {
            if c.phase != CoordPhase::CollectingVotes {
                return;
            }
            if outbid {
                // A resolver got here first; its decision will reach the client.
                c.phase = CoordPhase::AwaitingResolver;
                return;
            }
            c.phase = CoordPhase::PreCommitted;
            c.deadline = now + resolve_after;
            c.relay_at = now + relay;
            // Every member voted yes by now, so each has held it since before:
            // past this, one that has not committed has stopped serving reads.
            c.confirm_by = now + wait;
        } else if outbid {
            return;
        }
        self.accept_ballot0(gid, members);
    }

    /// Accept *commit* at ballot zero durably, then tell every member
    /// (this one too: its own acceptance counts like the others).
    fn accept_ballot0(&mut self, gid: Gid, members: NodeSet) {
        let me = self.cfg.id;
        let mut rec = self.record(gid);
        rec.promised = Some(Ballot::COORDINATOR);
        rec.accepted = Some((Ballot::COORDINATOR, true));
        let op = DurableOp::Tx(gid, rec);
        let ack = Message::Accepted {
            gid,
            ballot: Ballot::COORDINATOR,
            ok: true,
        };
        let others = members.minus(NodeSet::single(me));
        if self.is_mutant(crate::Mutant::CountOwnAckUndurable) {
            // Accepts in memory only, and counts and announces that.
            self.durable.apply(&op);
        } else if self.is_mutant(crate::Mutant::AckBeforePersist) {
            self.send_all(others, ack.clone());
            self.persist(op);
            self.send(me, ack);
            return;
        } else if self.is_mutant(crate::Mutant::AcceptanceRecordedLazily) {
            self.record_lazily(op);
        } else {
            self.persist(op);
        }
        self.send_all(others, ack.clone());
        self.send(me, ack);
    }

    /// Acceptor side of a resolver's phase 2, or of the coordinator's relay
    /// of ballot zero (it heard every yes; a member may have missed one).
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
        if ballot == Ballot::COORDINATOR {
            let Some(members) = self.members_of(gid) else {
                return;
            };
            if from != gid.origin || !commit || !members.contains(self.cfg.id) {
                return;
            }
            if rec.accepted == Some((Ballot::COORDINATOR, true)) {
                // Accepted already; the relay means our word was not heard.
                let others = members.minus(NodeSet::single(self.cfg.id));
                self.send_all(
                    others,
                    Message::Accepted {
                        gid,
                        ballot,
                        ok: true,
                    },
                );
                return;
            }
            self.ballot0_entry(gid, members).yes = members;
            self.accept_ballot0(gid, members);
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
        if !ok || self.record(gid).decided.is_some() {
            return;
        }
        let Some(members) = self.members_of(gid) else {
            return;
        };
        if !members.contains(from) {
            return;
        }
        let quorum = self.quorum(members);
        let b = self.ballot0_entry(gid, members);
        b.acks.insert(from);
        if b.acks.len() >= quorum {
            // Chosen at ballot zero; every member hears the same acceptances,
            // so nobody needs to be told.
            self.decide_to(gid, true, NodeSet::EMPTY);
        }
    }

    /// Record a final outcome, tell the members, and finish it locally.
    pub(crate) fn decide(&mut self, gid: Gid, commit: bool) {
        let others = self.cfg.all_nodes().minus(NodeSet::single(self.cfg.id));
        self.decide_to(gid, commit, others);
    }

    /// [`Self::decide`], telling only `to`.
    pub(crate) fn decide_to(&mut self, gid: Gid, commit: bool, to: NodeSet) {
        let mut rec = self.record(gid);
        if rec.decided.is_some() {
            return;
        }
        rec.decided = Some(commit);
        self.ballot0.remove(&gid);
        // A decision reached here is chosen (a majority durably accepted
        // it), so acting on it needs no record of it: the members finish and
        // learn it before `decided` is durable, and the record is written
        // lazily (no fsync on the commit's path, none competing with the
        // COMMIT PREPAREDs for the disk). Lost in a crash, it is re-learnt
        // from the acceptors by a resolver.
        self.finish_locally(gid, commit);
        self.send_all(to, Message::Decision { gid, commit });
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
        self.ballot0.remove(&gid);
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
        self.ballot0.remove(&gid);
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
            self.coordinator_stop(gid, reason);
        }
    }

    /// The coordinator gives up waiting for `gid`'s votes: before its own
    /// yes it aborts alone; after it, a member may have heard every yes and
    /// accepted ballot zero, so a resolver settles it.
    fn coordinator_stop(&mut self, gid: Gid, reason: AbortReason) {
        let alone = self.is_mutant(crate::Mutant::CoordinatorAbortsAlone);
        let Some(c) = self.coord.get_mut(&gid) else {
            return;
        };
        if c.phase == CoordPhase::PreparingLocally || alone {
            self.coordinator_abort(gid, reason);
            return;
        }
        c.phase = CoordPhase::AwaitingResolver;
        self.event(Event::CoordinatorResolving { gid, reason });
        if !self.resolving.contains_key(&gid) {
            self.start_resolver(gid);
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
            let heard = self.ballot0.get(&gid).is_some_and(|b| b.yes.contains(from));
            if collecting && c.members.contains(from) && !heard {
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
                let yes = self.ballot0.get(gid).map_or(NodeSet::EMPTY, |b| b.yes);
                due.push((*gid, yes.minus(NodeSet::single(self.cfg.id))));
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
                self.coordinator_stop(gid, AbortReason::VoteTimeout);
            }
        }
        self.relay_ballot0();
        self.forget_stale_votes();
    }

    /// Coordinator: send ballot zero's `Accept` to the members whose
    /// acceptance it has not heard, every heartbeat interval after its own.
    /// A member that missed another's yes accepts on the coordinator's word
    /// (it sends ballot zero only once it heard every yes).
    fn relay_ballot0(&mut self) {
        let (now, every) = (self.now, self.cfg.heartbeat_interval);
        let me = self.cfg.id;
        let mut due = Vec::new();
        for (gid, c) in self.coord.iter_mut() {
            if c.phase == CoordPhase::PreCommitted && now >= c.relay_at {
                c.relay_at = now + every;
                let acks = self.ballot0.get(gid).map_or(NodeSet::EMPTY, |b| b.acks);
                due.push((*gid, c.members.minus(acks).minus(NodeSet::single(me))));
            }
        }
        for (gid, to) in due {
            let accept = Message::Accept {
                gid,
                ballot: Ballot::COORDINATOR,
                commit: true,
            };
            self.send_all(to, accept);
        }
    }

    /// Votes and acceptances heard for transactions this node never came to
    /// hold (it voted no, or never received it) are dropped after a while.
    fn forget_stale_votes(&mut self) {
        let (now, after) = (self.now, Time(self.cfg.resolve_after.0 * 2));
        let (coord, in_doubt, applying) = (&self.coord, &self.in_doubt, &self.applying);
        self.ballot0.retain(|gid, b| {
            coord.contains_key(gid)
                || in_doubt.contains_key(gid)
                || applying.contains_key(gid)
                || now.saturating_sub(b.since) < after
        });
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
            let members = self.durable.gen.members;
            self.vote_yes(gid, members);
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
