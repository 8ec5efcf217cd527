//! Catch-up of a node that missed transactions: a non-member replays what a
//! donor has committed and then asks to join (`ready_to_join`); a member in
//! `recovery` replays every committed transaction of the generations it
//! missed, up to its new generation, and only then goes `online`.
//!
//! A member that was online in generation `g` holds every transaction
//! committed in `g` (each needed its yes vote), so what it lacks is exactly
//! the transactions of generations after its `last_online_gen`.

use crate::durable::DurableOp;
use crate::ids::NodeId;
use crate::messages::{Message, NodeStatus};
use crate::node::{CatchupJob, Node};
use crate::{DbCmd, Event};

impl Node {
    pub(crate) fn catchup_tick(&mut self) {
        self.serve_catchup_requests();
        if let Some(job) = &self.catchup {
            if self.now >= job.deadline {
                self.catchup = None;
                self.catchup_attempts += 1;
            }
        }
        let wants = match self.status {
            NodeStatus::Recovery => true,
            NodeStatus::Catchup => !self.ready_to_join,
            _ => false,
        };
        // Our own undecided transactions come first, and decided ones must
        // have finished in the database: replaying newer ones over rows they
        // lock would apply them out of order.
        let unsettled =
            !self.in_doubt.is_empty() || !self.applying.is_empty() || !self.finishing.is_empty();
        if !wants || self.catchup.is_some() || unsettled {
            return;
        }
        let Some(donor) = self.pick_donor() else {
            return;
        };
        let g = self.durable.gen;
        let upto_gen = (self.status == NodeStatus::Recovery).then_some(g.num);
        let mut from_gen = self.durable.last_online_gen;
        if self.is_mutant(crate::Mutant::CatchupSkipsTransactions) {
            from_gen += 1;
        }
        self.catchup = Some(CatchupJob {
            donor,
            upto_gen,
            deadline: self.now + self.cfg.catchup_timeout,
        });
        self.event(Event::CatchupStarted {
            donor,
            from_gen,
            upto_gen,
        });
        self.send(donor, Message::CatchupRequest { from_gen, upto_gen });
    }

    /// A connected peer that is online in our generation (or, for a
    /// non-member, in the newest generation we hear of); attempts rotate
    /// through the candidates so one bad donor cannot stall us.
    fn pick_donor(&self) -> Option<NodeId> {
        let me = self.cfg.id;
        let conn = self.connected_set();
        let g = self.durable.gen;
        let newest = conn
            .iter()
            .filter(|&n| n != me)
            .map(|n| self.peers[n as usize].gen)
            .max()?;
        let want_gen = if self.status == NodeStatus::Recovery {
            g.num
        } else {
            newest
        };
        let candidates: Vec<NodeId> = conn
            .iter()
            .filter(|&n| n != me)
            .filter(|&n| {
                let p = &self.peers[n as usize];
                p.status == Some(NodeStatus::Online) && p.gen == want_gen
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        Some(candidates[self.catchup_attempts as usize % candidates.len()])
    }

    pub(crate) fn on_catchup_request(
        &mut self,
        from: NodeId,
        from_gen: u64,
        upto_gen: Option<u64>,
    ) {
        let can =
            self.status == NodeStatus::Online && upto_gen.is_none_or(|u| self.durable.gen.num >= u);
        if can {
            self.serving.insert(from, (from_gen, upto_gen));
            self.serve_catchup_requests();
        } else {
            self.send(from, Message::CatchupRefused { upto_gen });
        }
    }

    /// Stream to each waiting joiner once every transaction below its bound
    /// is settled here, so the stream holds all of them.
    fn serve_catchup_requests(&mut self) {
        let waiting: Vec<(NodeId, (u64, Option<u64>))> =
            self.serving.iter().map(|(n, r)| (*n, *r)).collect();
        for (to, (from_gen, upto_gen)) in waiting {
            if self.status != NodeStatus::Online {
                self.serving.remove(&to);
                self.send(to, Message::CatchupRefused { upto_gen });
                continue;
            }
            // Decided is not enough: the committed log holds a transaction
            // only once its COMMIT PREPARED finished.
            let settled = match upto_gen {
                Some(u) => self
                    .in_doubt
                    .keys()
                    .chain(self.finishing.iter())
                    .all(|gid| gid.gen >= u),
                None => true, // a pre-join snapshot: the final catch-up repeats the range
            };
            if settled {
                self.serving.remove(&to);
                self.db(DbCmd::StreamCatchup {
                    to,
                    from_gen,
                    upto_gen,
                });
            }
        }
    }

    pub(crate) fn on_catchup_refused(&mut self, from: NodeId, upto_gen: Option<u64>) {
        if self
            .catchup
            .as_ref()
            .is_some_and(|j| j.donor == from && j.upto_gen == upto_gen)
        {
            self.catchup = None;
            self.catchup_attempts += 1;
        }
    }

    pub(crate) fn on_catchup_applied(&mut self, donor: NodeId, upto_gen: Option<u64>) {
        if self
            .catchup
            .as_ref()
            .is_some_and(|j| j.upto_gen == upto_gen)
        {
            self.catchup = None;
        }
        let g = self.durable.gen;
        match upto_gen {
            Some(u) if u == g.num && self.status == NodeStatus::Recovery => {
                self.persist(DurableOp::LastOnline(u));
                self.event(Event::CatchupCompleted { donor, upto_gen });
            }
            None if self.status == NodeStatus::Catchup => {
                self.ready_to_join = true;
                self.event(Event::CatchupCompleted { donor, upto_gen });
            }
            _ => {} // stale: our generation moved on; a new job will run
        }
    }
}
