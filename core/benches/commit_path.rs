//! Transactions per second through one coordinator's state machine: the
//! full commit path of a 3-node cluster with the peers' answers fed in
//! directly, so only the core's own work is measured.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mm_core::*;

fn drain(node: &mut Node) -> usize {
    let mut n = 0;
    while node.poll_output().is_some() {
        n += 1;
    }
    n
}

fn one_commit(node: &mut Node, client: u64, now: Time) {
    let client = ClientId(client);
    node.handle(
        now,
        Input::CommitRequest {
            client,
            wait_peers: false,
        },
    );
    let mut gid = None;
    while let Some(out) = node.poll_output() {
        if let Output::Db(DbCmd::PrepareLocal { gid: g, .. }) = out {
            gid = Some(g);
        }
    }
    let gid = gid.expect("online node prepares");
    node.handle(
        now,
        Input::Db(DbResult::LocalPrepared {
            client,
            gid,
            ok: true,
        }),
    );
    drain(node);
    for peer in [2, 3] {
        node.handle(
            now,
            Input::Receive {
                from: peer,
                msg: Message::TxVote { gid, yes: true },
            },
        );
        drain(node);
    }
    let ack = Message::Accepted {
        gid,
        ballot: Ballot::COORDINATOR,
        ok: true,
    };
    node.handle(now, Input::Receive { from: 2, msg: ack });
    drain(node);
    node.handle(now, Input::Db(DbResult::Finished { gid, commit: true }));
    let replied = std::iter::from_fn(|| node.poll_output()).any(|o| {
        matches!(
            o,
            Output::Reply {
                outcome: Outcome::Committed,
                ..
            }
        )
    });
    assert!(replied, "commit path must end in a Committed reply");
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(1));
    g.bench_function("commit_path_3_nodes", |b| {
        let now = Time::from_millis(10);
        let mut node = Node::new(Config::new(1, 3), now);
        // Make the peers look connected so the node stays online.
        for peer in [2, 3] {
            let hb = Message::Heartbeat {
                sent_at: mm_core::Time::ZERO,
                echo: None,
                gen: 1,
                promised_gen: 1,
                status: NodeStatus::Online,
                connected: NodeSet::first_n(3),
                last_online_gen: 1,
                ready_to_join: false,
            };
            node.handle(
                now,
                Input::Receive {
                    from: peer,
                    msg: hb,
                },
            );
        }
        drain(&mut node);
        let mut client = 0;
        b.iter(|| {
            client += 1;
            one_commit(&mut node, client, now);
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
