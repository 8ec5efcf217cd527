//! The resolver: settles transactions that are prepared here and undecided
//! once their coordinator has gone quiet, with E3PC's rules over Paxos-like
//! ballots. Phase 1 collects promises and states from a majority; phase 2
//! proposes a value and needs a majority of durable acceptances.
//!
//! Rules (in order): a node that knows the outcome decides it; otherwise
//! the value accepted under the highest ballot is proposed; otherwise
//! (nothing accepted in the quorum, so no precommit can have reached a
//! majority) abort is proposed.

use crate::durable::DurableOp;
use crate::ids::{Ballot, Gid, NodeId};
use crate::messages::{Message, NodeStatus, TxReport};
use crate::node::{CoordPhase, Node, Resolution};
use crate::{Event, ResolveRule};
use std::collections::BTreeMap;

impl Node {
    pub(crate) fn resolver_tick(&mut self) {
        if self.status == NodeStatus::Isolated {
            return; // no quorum reachable; rounds would only time out
        }
        let wait = self.cfg.resolve_after + self.stagger();
        let due: Vec<Gid> = self
            .in_doubt
            .iter()
            .filter(|(gid, d)| {
                let stale = match self.resolving.get(gid) {
                    Some(r) => self.now >= r.deadline,
                    None => self.now.saturating_sub(d.since) >= wait,
                };
                let coordinating = self.coord.get(gid).is_some_and(|c| {
                    matches!(
                        c.phase,
                        CoordPhase::PreparingLocally | CoordPhase::CollectingVotes
                    )
                });
                stale && !coordinating
            })
            .map(|(g, _)| *g)
            .collect();
        for gid in due {
            self.start_resolver(gid);
        }
    }

    pub(crate) fn start_resolver(&mut self, gid: Gid) {
        self.max_round += 1;
        let ballot = Ballot {
            round: self.max_round,
            node: self.cfg.id,
        };
        self.resolving.insert(
            gid,
            Resolution {
                ballot,
                reports: BTreeMap::new(),
                proposal: None,
                accepted: crate::NodeSet::EMPTY,
                deadline: self.now + self.cfg.retry_interval + self.stagger(),
            },
        );
        self.event(Event::ResolverStarted { gid, ballot });
        self.send_all(self.cfg.all_nodes(), Message::ResolveQuery { gid, ballot });
    }

    /// Acceptor, phase 1: promise the ballot durably, then report.
    pub(crate) fn on_resolve_query(&mut self, from: NodeId, gid: Gid, ballot: Ballot) {
        self.max_round = self.max_round.max(ballot.round);
        let mut rec = self.record(gid);
        let (ok, report) = if let Some(commit) = rec.decided {
            (true, TxReport::Decided { commit })
        } else if rec.promised.is_some_and(|p| p > ballot) {
            (false, TxReport::NotPrepared)
        } else {
            rec.promised = Some(ballot);
            self.persist(DurableOp::Tx(gid, rec));
            let report = match rec.accepted {
                Some((b, commit)) => TxReport::Accepted { ballot: b, commit },
                None if self.in_doubt.contains_key(&gid) => TxReport::Prepared,
                // Not prepared (or still applying): the promise forbids a yes from now on.
                None => TxReport::NotPrepared,
            };
            (true, report)
        };
        let promised = rec.promised.unwrap_or_default();
        self.send(
            from,
            Message::ResolveState {
                gid,
                ballot,
                ok,
                promised,
                report,
            },
        );
    }

    pub(crate) fn on_resolve_state(
        &mut self,
        from: NodeId,
        gid: Gid,
        ballot: Ballot,
        ok: bool,
        promised: Ballot,
        report: TxReport,
    ) {
        let quorum = self.quorum(self.durable.gen.members);
        let ignore_ballots = self.is_mutant(crate::Mutant::ResolverIgnoresBallots);
        let Some(r) = self.resolving.get_mut(&gid) else {
            return;
        };
        if r.ballot != ballot || r.proposal.is_some() {
            return;
        }
        if !ok {
            self.max_round = self.max_round.max(promised.round);
            r.deadline = self.now; // outbid: retry with a higher ballot at the next tick
            return;
        }
        r.reports.insert(from, report);
        if r.reports.len() < quorum {
            return;
        }
        let decided = r.reports.values().find_map(|rep| match rep {
            TxReport::Decided { commit } => Some(*commit),
            _ => None,
        });
        if let Some(commit) = decided {
            self.event(Event::ResolverDecided {
                gid,
                commit,
                rule: ResolveRule::AlreadyDecided,
            });
            self.decide(gid, commit);
            return;
        }
        let highest = r
            .reports
            .values()
            .filter_map(|rep| match rep {
                TxReport::Accepted { ballot, commit } => Some((*ballot, *commit)),
                _ => None,
            })
            .max();
        if ignore_ballots {
            self.event(Event::ResolverDecided {
                gid,
                commit: false,
                rule: ResolveRule::NothingAccepted,
            });
            self.decide(gid, false);
            return;
        }
        let (commit, rule) = match highest {
            Some((_, commit)) => (commit, ResolveRule::HighestAccepted),
            None => (false, ResolveRule::NothingAccepted),
        };
        r.proposal = Some((commit, rule));
        self.send_all(
            self.cfg.all_nodes(),
            Message::Accept {
                gid,
                ballot,
                commit,
            },
        );
    }

    /// Phase 2 answers to this node's resolver proposal.
    pub(crate) fn on_resolver_accepted(
        &mut self,
        from: NodeId,
        gid: Gid,
        ballot: Ballot,
        ok: bool,
    ) {
        let quorum = self.quorum(self.durable.gen.members);
        let Some(r) = self.resolving.get_mut(&gid) else {
            return;
        };
        let Some((commit, rule)) = r.proposal else {
            return;
        };
        if r.ballot != ballot {
            return;
        }
        if !ok {
            r.deadline = self.now;
            return;
        }
        r.accepted.insert(from);
        if r.accepted.len() >= quorum {
            self.event(Event::ResolverDecided { gid, commit, rule });
            self.decide(gid, commit);
        }
    }
}
