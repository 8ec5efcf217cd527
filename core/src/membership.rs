//! Membership and generations: heartbeats, connectivity views, the largest
//! mutually connected majority clique, campaigns and generation adoption.
//!
//! A generation is formed only with a durable promise from every proposed
//! member, and members are always a majority of the configured nodes, so two
//! generations' member sets always intersect (see docs/protocol.md).

use crate::durable::DurableOp;
use crate::ids::{NodeId, NodeSet, Time};
use crate::messages::{Generation, Message, NodeStatus};
use crate::node::{Campaign, Node};
use crate::{AbortReason, Event};
use std::collections::BTreeMap;

impl Node {
    pub(crate) fn membership_tick(&mut self) {
        if self.now >= self.next_heartbeat {
            self.send_heartbeats();
            self.next_heartbeat = self.now + self.cfg.heartbeat_interval;
        }
        self.refresh_status();
        if let Some(c) = &self.campaign {
            if self.now >= c.deadline {
                self.campaign = None;
                self.next_campaign = self.now + self.stagger();
            }
        }
        if self.campaign.is_none() && self.now >= self.next_campaign {
            self.maybe_campaign();
        }
    }

    /// Delay that keeps nodes from campaigning or resolving in lock step.
    pub(crate) fn stagger(&self) -> crate::Time {
        crate::Time(self.cfg.retry_interval.0 * (1 + self.cfg.id as u64) / 2)
    }

    /// One heartbeat per peer: each echoes that peer's own clock (its read lease).
    fn send_heartbeats(&mut self) {
        let connected = self.connected_set();
        let peers = self.cfg.all_nodes().minus(NodeSet::single(self.cfg.id));
        for to in peers.iter() {
            let msg = Message::Heartbeat {
                sent_at: self.now,
                echo: self.peers[to as usize].their_clock,
                gen: self.durable.gen.num,
                promised_gen: self.durable.promised_gen,
                status: self.status,
                connected,
                last_online_gen: self.durable.last_online_gen,
                ready_to_join: self.ready_to_join,
            };
            self.send(to, msg);
        }
    }

    pub(crate) fn connected_set(&self) -> NodeSet {
        let mut s = NodeSet::single(self.cfg.id);
        for n in self.cfg.all_nodes().iter() {
            if let Some(t) = self.peers[n as usize].last_heard {
                if self.now.saturating_sub(t) <= self.cfg.heartbeat_timeout {
                    s.insert(n);
                }
            }
        }
        s
    }

    pub(crate) fn on_heartbeat(
        &mut self,
        from: NodeId,
        gen: u64,
        status: NodeStatus,
        connected: NodeSet,
        last_online_gen: u64,
        ready_to_join: bool,
    ) {
        let p = &mut self.peers[from as usize];
        p.gen = gen;
        p.status = Some(status);
        p.connected = connected;
        p.last_online_gen = last_online_gen;
        p.ready_to_join = ready_to_join;
        // Repair a lost NewGen: a member of our generation still in an older one.
        let g = self.durable.gen;
        if gen < g.num && g.members.contains(from) && g.members.contains(self.cfg.id) {
            self.send(from, Message::NewGen { gen: g });
        }
    }

    /// Largest set of mutually connected nodes containing this one; ties go
    /// to the set keeping most current members, then the smallest bitmask.
    pub(crate) fn best_clique(&self) -> NodeSet {
        let me = self.cfg.id;
        let conn = self.connected_set();
        let view = |n: NodeId| {
            if n == me {
                conn
            } else {
                self.peers[n as usize].connected
            }
        };
        let mutual = |a: NodeId, b: NodeId| view(a).contains(b) && view(b).contains(a);
        let cand: Vec<NodeId> = conn.iter().filter(|&n| n != me).collect();
        let members = self.durable.gen.members;
        let mut best = NodeSet::single(me);
        let mut best_key = (
            1usize,
            members.contains(me) as usize,
            std::cmp::Reverse(best.0),
        );
        for mask in 0u32..(1 << cand.len()) {
            let mut s = NodeSet::single(me);
            for (i, n) in cand.iter().enumerate() {
                if mask & (1 << i) != 0 {
                    s.insert(*n);
                }
            }
            let nodes: Vec<NodeId> = s.iter().collect();
            let clique = nodes
                .iter()
                .enumerate()
                .all(|(i, &a)| nodes[i + 1..].iter().all(|&b| mutual(a, b)));
            if !clique {
                continue;
            }
            let key = (s.len(), s.intersect(members).len(), std::cmp::Reverse(s.0));
            if key > best_key {
                best = s;
                best_key = key;
            }
        }
        best
    }

    /// The members the next generation should have, if it differs from the
    /// current one and this node is the one to campaign for it.
    fn desired_members(&self) -> Option<NodeSet> {
        let me = self.cfg.id;
        let g = self.durable.gen;
        let clique = self.best_clique();
        if clique.len() < self.quorum(clique) {
            return None;
        }
        // Right after boot a member we never heard from may simply not have
        // connected yet: voting it out would only churn generations.
        let booting = self.now < self.booted_at + self.cfg.heartbeat_timeout;
        if booting
            && g.members
                .iter()
                .any(|m| m != me && self.peers[m as usize].last_heard.is_none())
        {
            return None;
        }
        // A newer generation exists among our peers: let its members repair us.
        if clique
            .iter()
            .any(|n| n != me && self.peers[n as usize].gen > g.num)
        {
            return None;
        }
        // Nodes of the clique in our (the newest) generation; one of them leads,
        // since nodes behind it wait to be repaired and never campaign.
        let current: NodeSet = clique
            .iter()
            .filter(|&n| n == me || self.peers[n as usize].gen == g.num)
            .collect();
        if current.min() != Some(me) {
            return None;
        }
        let keeps = |n: NodeId| {
            let ready = if n == me {
                self.ready_to_join
            } else {
                self.peers[n as usize].ready_to_join
            };
            (g.members.contains(n) && current.contains(n)) || ready
        };
        let mut desired: NodeSet = clique.iter().filter(|&n| keeps(n)).collect();
        if desired.len() < self.quorum(desired) {
            // No working majority to extend: start over with everyone we can reach.
            desired = clique;
        }
        let promise = |n: NodeId| {
            if n == me {
                self.durable.promised_gen
            } else {
                self.peers[n as usize].promised_gen
            }
        };
        // A promise ahead of the generation belongs to a campaign that has not
        // formed (or died): the voter holds work until a newer one forms.
        let settled = desired
            .iter()
            .all(|n| current.contains(n) && promise(n) == g.num);
        if desired == g.members && settled {
            return None;
        }
        Some(desired)
    }

    fn maybe_campaign(&mut self) {
        let Some(members) = self.desired_members() else {
            self.wanted = None;
            return;
        };
        // Views lag by up to a heartbeat (a peer's first heartbeat may not
        // list us yet): act only on a wish that held for two intervals.
        match self.wanted {
            Some((w, since)) if w == members => {
                if self.now < since + Time(self.cfg.heartbeat_interval.0 * 2) {
                    return;
                }
            }
            _ => {
                self.wanted = Some((members, self.now));
                return;
            }
        }
        self.wanted = None;
        let highest_seen = members
            .iter()
            .filter(|&n| n != self.cfg.id)
            .map(|n| {
                self.peers[n as usize]
                    .promised_gen
                    .max(self.peers[n as usize].gen)
            })
            .max()
            .unwrap_or(0);
        let num = self
            .durable
            .promised_gen
            .max(highest_seen)
            .max(self.highest_promise_seen)
            + 1;
        self.campaign = Some(Campaign {
            num,
            members,
            granted: NodeSet::EMPTY,
            last_online: BTreeMap::new(),
            deadline: self.now + self.cfg.retry_interval,
        });
        self.event(Event::CampaignStarted { num, members });
        self.send_all(members, Message::Propose { num, members });
    }

    pub(crate) fn on_propose(&mut self, from: NodeId, num: u64, members: NodeSet) {
        let grant = num > self.durable.promised_gen && members.contains(self.cfg.id);
        if grant {
            self.persist(DurableOp::PromiseGen(num));
        }
        let num = if grant {
            num
        } else {
            self.durable.promised_gen
        };
        let last_online_gen = self.durable.last_online_gen;
        self.send(
            from,
            Message::GenVote {
                num,
                granted: grant,
                last_online_gen,
            },
        );
    }

    pub(crate) fn on_gen_vote(
        &mut self,
        from: NodeId,
        num: u64,
        granted: bool,
        last_online_gen: u64,
    ) {
        if !granted {
            self.highest_promise_seen = self.highest_promise_seen.max(num);
        }
        let Some(c) = &mut self.campaign else { return };
        if !granted {
            if num >= c.num {
                // Someone promised a newer campaign: ours cannot win.
                self.campaign = None;
                self.next_campaign = self.now + self.stagger();
            }
            return;
        }
        if num != c.num || !c.members.contains(from) {
            return;
        }
        c.granted.insert(from);
        c.last_online.insert(from, last_online_gen);
        if c.granted != c.members {
            return;
        }
        let newest = c.last_online.values().copied().max().unwrap_or(0);
        let donors = c
            .last_online
            .iter()
            .filter(|(_, &l)| l == newest)
            .map(|(&n, _)| n)
            .collect();
        let gen = Generation {
            num: c.num,
            members: c.members,
            donors,
        };
        self.campaign = None;
        self.send_all(gen.members, Message::NewGen { gen });
    }

    pub(crate) fn on_new_gen(&mut self, gen: Generation) {
        if gen.num <= self.durable.gen.num {
            return;
        }
        let me = self.cfg.id;
        self.persist(DurableOp::AdoptGen(gen));
        if gen.donors.contains(me) {
            self.persist(DurableOp::LastOnline(gen.num));
        }
        self.event(Event::GenerationAdopted { gen });
        self.hold_replies_until = self.now + self.cfg.peer_commit_wait();
        // Peers' views lag by up to a heartbeat: judge the new generation on fresh ones.
        self.next_campaign =
            self.now + crate::Time(self.cfg.heartbeat_interval.0 * 2) + self.stagger();
        self.ready_to_join = false;
        self.catchup = None;
        self.serving.clear();
        // A generation change is a barrier: what has not precommitted aborts.
        self.abort_coordinated_before(gen.num, AbortReason::GenerationChanged);
        self.refresh_status();
    }
}
