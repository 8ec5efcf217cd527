//! Transitions of the core under a tiny in-process driver: instant delivery,
//! a database that always succeeds, explicit crashes and link cuts. The
//! simulator explores faults at random; these tests pin the basic paths.

use mm_core::*;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

struct Cluster {
    n: usize,
    nodes: Vec<Option<Node>>,
    durable: Vec<DurableState>,
    prepared: Vec<BTreeSet<Gid>>,
    committed: Vec<Vec<Gid>>,
    queue: VecDeque<Envelope>,
    data: VecDeque<(NodeId, Gid)>,
    cut: BTreeSet<(NodeId, NodeId)>,
    replies: BTreeMap<ClientId, Outcome>,
    events: Vec<(NodeId, Event)>,
    now: Time,
    /// Drop every output of a node after it persists an acceptance of ballot zero.
    crash_after_precommit: Option<NodeId>,
    /// Messages matching this are lost.
    drop: Option<fn(&Envelope) -> bool>,
}

impl Cluster {
    fn new(n: usize) -> Cluster {
        let now = Time::ZERO;
        Cluster {
            n,
            nodes: (0..=n)
                .map(|i| (i > 0).then(|| Node::new(Config::new(i as NodeId, n), now)))
                .collect(),
            durable: (0..=n)
                .map(|_| DurableState::bootstrap(mm_core::NodeSet::first_n(n)))
                .collect(),
            prepared: vec![BTreeSet::new(); n + 1],
            committed: vec![Vec::new(); n + 1],
            queue: VecDeque::new(),
            data: VecDeque::new(),
            cut: BTreeSet::new(),
            replies: BTreeMap::new(),
            events: Vec::new(),
            now,
            crash_after_precommit: None,
            drop: None,
        }
    }

    fn node(&mut self, i: NodeId) -> &mut Node {
        self.nodes[i as usize].as_mut().expect("node is up")
    }

    fn input(&mut self, i: NodeId, input: Input) {
        let now = self.now;
        let Some(node) = self.nodes[i as usize].as_mut() else {
            return;
        };
        node.handle(now, input);
        self.drain(i);
    }

    fn drain(&mut self, i: NodeId) {
        let mut feedback = Vec::new();
        while let Some(out) = self.nodes[i as usize]
            .as_mut()
            .and_then(|n| n.poll_output())
        {
            match out {
                Output::Persist(op) => {
                    self.durable[i as usize].apply(&op);
                    if let DurableOp::Tx(gid, rec) = &op {
                        let own =
                            gid.origin == i && rec.accepted == Some((Ballot::COORDINATOR, true));
                        if own && self.crash_after_precommit == Some(i) {
                            self.crash_after_precommit = None;
                            self.crash(i);
                            return;
                        }
                    }
                }
                // This harness writes lazy records at once (the simulator
                // is where they are lost in crashes).
                Output::Record(op) => self.durable[i as usize].apply(&op),
                Output::Send { to, msg } => {
                    let env = Envelope { from: i, to, msg };
                    if !self.cut.contains(&(i, to)) && !self.drop.is_some_and(|d| d(&env)) {
                        self.queue.push_back(env);
                    }
                }
                Output::Db(cmd) => match cmd {
                    DbCmd::PrepareLocal { client, gid } => {
                        self.prepared[i as usize].insert(gid);
                        for p in 1..=self.n as NodeId {
                            if p != i {
                                self.data.push_back((p, gid));
                            }
                        }
                        feedback.push(Input::Db(DbResult::LocalPrepared {
                            client,
                            gid,
                            ok: true,
                        }));
                    }
                    DbCmd::ApplyAndPrepare { gid } => {
                        self.prepared[i as usize].insert(gid);
                        feedback.push(Input::Db(DbResult::RemotePrepared { gid, ok: true }));
                    }
                    DbCmd::CommitPrepared { gid } | DbCmd::RollbackPrepared { gid } => {
                        let commit = matches!(cmd, DbCmd::CommitPrepared { .. });
                        if self.prepared[i as usize].remove(&gid) && commit {
                            self.committed[i as usize].push(gid);
                        }
                        feedback.push(Input::Db(DbResult::Finished { gid, commit }));
                    }
                    DbCmd::StreamCatchup {
                        to,
                        from_gen,
                        upto_gen,
                    } => {
                        let batch: Vec<Gid> = self.committed[i as usize]
                            .iter()
                            .filter(|g| g.gen > from_gen && upto_gen.is_none_or(|u| g.gen < u))
                            .copied()
                            .collect();
                        for g in batch {
                            if !self.committed[to as usize].contains(&g) {
                                self.committed[to as usize].push(g);
                            }
                        }
                        let input = Input::CatchupApplied { donor: i, upto_gen };
                        self.input(to, input);
                    }
                    DbCmd::RollbackLocal { .. } | DbCmd::Discard { .. } => {}
                },
                Output::Reply { client, outcome } => {
                    self.replies.insert(client, outcome);
                }
                Output::Event(e) => self.events.push((i, e)),
            }
        }
        for input in feedback {
            self.input(i, input);
        }
    }

    fn crash(&mut self, i: NodeId) {
        self.nodes[i as usize] = None;
    }

    fn restart(&mut self, i: NodeId) {
        let prepared: Vec<Gid> = self.prepared[i as usize].iter().copied().collect();
        let cfg = Config::new(i, self.n);
        self.nodes[i as usize] = Some(Node::recover(
            cfg,
            self.durable[i as usize].clone(),
            &prepared,
            self.now,
        ));
        self.drain(i);
    }

    fn isolate(&mut self, i: NodeId, on: bool) {
        for p in 1..=self.n as NodeId {
            if p != i {
                for l in [(i, p), (p, i)] {
                    if on {
                        self.cut.insert(l);
                    } else {
                        self.cut.remove(&l);
                    }
                }
            }
        }
    }

    /// Deliver everything in flight.
    fn settle(&mut self) {
        loop {
            if let Some(env) = self.queue.pop_front() {
                if self.cut.contains(&(env.from, env.to)) {
                    continue;
                }
                self.input(
                    env.to,
                    Input::Receive {
                        from: env.from,
                        msg: env.msg,
                    },
                );
            } else if let Some((to, gid)) = self.data.pop_front() {
                if self.nodes[to as usize].is_some() && !self.cut.contains(&(gid.origin, to)) {
                    self.input(to, Input::RemoteTx { gid });
                }
            } else {
                break;
            }
        }
    }

    /// Advance time in ticks, delivering in between.
    fn run_for(&mut self, ms: u64) {
        let end = self.now + Time::from_millis(ms);
        while self.now < end {
            self.now = self.now + Time::from_millis(50);
            for i in 1..=self.n as NodeId {
                if self.nodes[i as usize]
                    .as_ref()
                    .is_some_and(|n| n.next_timer() <= self.now)
                {
                    self.input(i, Input::Tick);
                }
            }
            self.settle();
        }
    }

    fn commit(&mut self, at: NodeId, client: u64) -> Option<Outcome> {
        let c = ClientId(client);
        self.input(
            at,
            Input::CommitRequest {
                client: c,
                wait_peers: false,
            },
        );
        self.settle();
        self.replies.get(&c).copied()
    }

    fn status(&self, i: NodeId) -> NodeStatus {
        self.nodes[i as usize].as_ref().expect("up").status()
    }
}

fn warm(n: usize) -> Cluster {
    let mut c = Cluster::new(n);
    c.run_for(500);
    for i in 1..=n as NodeId {
        assert_eq!(
            c.status(i),
            NodeStatus::Online,
            "node {i} online after warm-up"
        );
    }
    c
}

#[test]
fn commit_reaches_every_node() {
    let mut c = warm(3);
    assert_eq!(c.commit(1, 1), Some(Outcome::Committed));
    for i in 1..=3 {
        assert_eq!(c.committed[i].len(), 1, "node {i}");
        assert!(c.prepared[i].is_empty());
    }
}

#[test]
fn a_no_vote_aborts_everywhere() {
    let mut c = warm(3);
    // Node 3 applied a resolver promise first, so it must vote no.
    let gid = Gid {
        origin: 1,
        boot: 0,
        seq: 1,
        gen: 1,
    };
    c.input(
        3,
        Input::Receive {
            from: 2,
            msg: Message::ResolveQuery {
                gid,
                ballot: Ballot { round: 1, node: 2 },
            },
        },
    );
    c.queue.clear();
    assert_eq!(c.commit(1, 1), Some(Outcome::Aborted(AbortReason::VoteNo)));
    c.run_for(100);
    for i in 1..=3 {
        assert!(c.committed[i].is_empty());
        assert!(
            c.prepared[i].is_empty(),
            "node {i} left {:?}",
            c.prepared[i]
        );
    }
}

#[test]
fn coordinator_crash_after_its_precommit_alone_is_resolved_to_abort() {
    let mut c = warm(3);
    c.crash_after_precommit = Some(1);
    // The participants' votes to each other are lost, so only the
    // coordinator hears every yes; its acceptance of ballot zero (and its
    // relay of it) never leave, and it dies once that acceptance is durable.
    c.drop = Some(|e| {
        let between_participants = e.from != 1 && e.to != 1;
        (between_participants && matches!(e.msg, Message::TxVote { .. }))
            || (e.from == 1 && matches!(e.msg, Message::Accept { .. } | Message::Accepted { .. }))
    });
    c.input(
        1,
        Input::CommitRequest {
            client: ClientId(1),
            wait_peers: false,
        },
    );
    c.settle();
    assert!(c.nodes[1].is_none());
    c.run_for(8000);
    // Nodes 2 and 3 had prepared but accepted nothing: a majority without
    // node 1 holds no accepted ballot, so the resolver aborts.
    for i in 2..=3 {
        assert!(
            c.prepared[i].is_empty(),
            "node {i} still holds {:?}",
            c.prepared[i]
        );
    }
    c.restart(1);
    c.run_for(8000);
    // The coordinator's own acceptance alone is no majority: abort everywhere.
    for i in 1..=3 {
        assert!(c.prepared[i].is_empty(), "node {i}");
        assert!(c.committed[i].is_empty(), "node {i}");
    }
    assert!(c
        .events
        .iter()
        .any(|(_, e)| matches!(e, Event::ResolverDecided { commit: false, .. })));
}

#[test]
fn resolver_commits_when_a_majority_precommitted() {
    let mut c = warm(3);
    // Nodes 1 and 2 hear every yes and accept ballot zero (a majority); node
    // 3 misses node 2's yes, hears no acceptance and no relay, and node 2
    // does not hear node 1's acceptance: only node 1 learns the commit, and
    // then it dies.
    c.drop = Some(|e| {
        (e.from == 2 && e.to == 3 && matches!(e.msg, Message::TxVote { .. }))
            || (e.to == 3 && matches!(e.msg, Message::Accepted { .. }))
            || (e.from == 1
                && matches!(
                    e.msg,
                    Message::Accepted { .. } | Message::Accept { .. } | Message::Decision { .. }
                ))
    });
    assert_eq!(c.commit(1, 7), Some(Outcome::Committed));
    c.crash(1);
    c.drop = None;
    assert!(c.committed[2].is_empty() && c.committed[3].is_empty());
    assert_eq!(c.replies.get(&ClientId(7)), Some(&Outcome::Committed));
    c.cut.clear();
    c.run_for(8000);
    for i in 2..=3 {
        assert_eq!(
            c.committed[i].len(),
            1,
            "node {i} must commit what was acknowledged"
        );
    }
}

#[test]
fn minority_refuses_and_majority_moves_on() {
    let mut c = warm(3);
    c.isolate(3, true);
    c.run_for(4000);
    assert_eq!(c.status(3), NodeStatus::Isolated);
    assert_eq!(c.commit(3, 1), Some(Outcome::Refused(NodeStatus::Isolated)));
    assert_eq!(c.status(1), NodeStatus::Online);
    assert_eq!(c.node(1).generation().members, [1, 2].into_iter().collect());
    assert_eq!(c.commit(1, 2), Some(Outcome::Committed));
    assert_eq!(c.commit(2, 3), Some(Outcome::Committed));
    // Node 3 returns, catches up and is online in a new generation.
    c.isolate(3, false);
    c.run_for(8000);
    for i in 1..=3 {
        assert_eq!(c.status(i), NodeStatus::Online, "node {i}");
    }
    assert_eq!(c.node(3).generation().members, NodeSet::first_n(3));
    assert_eq!(c.committed[3].len(), 2, "node 3 caught up");
    assert_eq!(c.commit(3, 4), Some(Outcome::Committed));
    assert!(c.events.iter().any(|(n, e)| *n == 3
        && matches!(
            e,
            Event::CatchupCompleted {
                upto_gen: Some(_),
                ..
            }
        )));
}

#[test]
fn crashed_participant_recovers_its_prepared_transaction() {
    let mut c = warm(3);
    assert_eq!(c.commit(1, 1), Some(Outcome::Committed));
    c.crash(3);
    c.run_for(4000);
    assert_eq!(c.commit(2, 2), Some(Outcome::Committed));
    c.restart(3);
    c.run_for(8000);
    assert_eq!(c.status(3), NodeStatus::Online);
    let mut a = c.committed[1].clone();
    let mut b = c.committed[3].clone();
    a.sort();
    b.sort();
    assert_eq!(a, b);
}

#[test]
fn five_nodes_survive_two_losses() {
    let mut c = warm(5);
    c.crash(4);
    c.crash(5);
    c.run_for(4000);
    assert_eq!(c.commit(1, 1), Some(Outcome::Committed));
    c.crash(3);
    c.run_for(4000);
    assert_eq!(c.status(1), NodeStatus::Isolated);
    assert_eq!(c.commit(1, 2), Some(Outcome::Refused(NodeStatus::Isolated)));
}

/// Found on real PostgreSQL: the origin aborts (another member voted no)
/// while this participant is still applying the transaction. The abort
/// decision must not be dropped: once the prepare finishes, the prepared
/// copy is rolled back at once instead of waiting for a resolver.
#[test]
fn decision_arriving_while_applying_is_applied_after_the_prepare() {
    let mut c = Cluster::new(3);
    c.run_for(3000);
    assert_eq!(c.node(2).status(), NodeStatus::Online);
    let now = c.now;
    let mut n = c.nodes[2].take().expect("node 2 is up");
    while n.poll_output().is_some() {}
    let gid = Gid {
        origin: 1,
        boot: 0,
        seq: 7,
        gen: 1,
    };
    n.handle(now, Input::RemoteTx { gid });
    let outs: Vec<Output> = std::iter::from_fn(|| n.poll_output()).collect();
    assert!(
        outs.contains(&Output::Db(DbCmd::ApplyAndPrepare { gid })),
        "{outs:?}"
    );
    n.handle(
        now,
        Input::Receive {
            from: 1,
            msg: Message::Decision { gid, commit: false },
        },
    );
    while n.poll_output().is_some() {}
    n.handle(now, Input::Db(DbResult::RemotePrepared { gid, ok: true }));
    let outs: Vec<Output> = std::iter::from_fn(|| n.poll_output()).collect();
    assert!(
        outs.contains(&Output::Db(DbCmd::RollbackPrepared { gid })),
        "the prepared copy is rolled back at once: {outs:?}"
    );
    assert!(
        !outs.iter().any(|o| matches!(
            o,
            Output::Send {
                msg: Message::TxVote { yes: true, .. },
                ..
            }
        )),
        "no yes vote after the decision: {outs:?}"
    );
    assert_eq!(n.in_doubt().count(), 0);
}

#[test]
fn a_restarted_node_is_online_only_after_heartbeats_show_its_generation_is_current() {
    // Node 3 restarts as a member of generation 1; the others moved on to 2.
    let durable = DurableState::bootstrap(NodeSet::first_n(3));
    let mut node = Node::recover(Config::new(3, 3), durable, &[], Time::ZERO);
    let t = Time::from_millis(10);
    // Other messages from both peers arrive before their heartbeats.
    for from in [1, 2] {
        let gid = Gid {
            origin: from,
            boot: 1,
            seq: 1,
            gen: 2,
        };
        let msg = Message::Decision { gid, commit: true };
        node.handle(t, Input::Receive { from, msg });
    }
    node.handle(t, Input::Tick);
    assert_ne!(
        node.status(),
        NodeStatus::Online,
        "online in generation 1 without knowing the peers' generation"
    );
    for from in [1, 2] {
        let msg = Message::Heartbeat {
            sent_at: mm_core::Time::ZERO,
            echo: None,
            gen: 2,
            promised_gen: 2,
            status: NodeStatus::Online,
            connected: NodeSet::first_n(3),
            last_online_gen: 2,
            ready_to_join: false,
        };
        node.handle(t, Input::Receive { from, msg });
    }
    node.handle(t, Input::Tick);
    assert_eq!(node.status(), NodeStatus::Catchup);
}
