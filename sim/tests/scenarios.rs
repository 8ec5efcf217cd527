//! Named protocol scenarios: scripted faults at chosen protocol steps, each
//! checked by the simulator's checkers (atomicity, durability, convergence,
//! liveness) and pinned as an `insta` snapshot of the filtered event trace,
//! so any change of protocol behaviour shows up as a reviewed diff.
//!
//! Every world is calm (no random faults), has 3 nodes and no background
//! clients: the only transactions are the scripted ones. Regenerate the
//! snapshots with `INSTA_UPDATE=always cargo test -p mm-sim --test scenarios`
//! and review the diff.

use mm_core::{AbortReason, Ballot, DbCmd, Event, Gid, Message, NodeId, Output, ResolveRule};
use mm_sim::db_model::{RowValue, Table, Write};
use mm_sim::faults::FaultAction;
use mm_sim::time_util::{VTime, SEC};
use mm_sim::{Params, SeedReport, World};

const SEED: u64 = 1;

/// A calm 3-node world with no background clients, traced.
fn world() -> World {
    let mut p = Params::calm(SEED, 3);
    // Below the heartbeat timeout: a lost vote aborts before a generation change.
    p.vote_timeout_ms = 1_500;
    p.workload.seed_clients_per_node = vec![0; 3];
    p.workload.bank_clients = 0;
    World::new(p, true)
}

/// One row of the seed's table.
fn row(id: u64, info: u64) -> Write {
    Write {
        table: Table::Mm,
        id,
        value: Some(RowValue::Mm { info, mod_time: 0 }),
    }
}

// ---- output predicates ----

fn sends_yes_vote(o: &Output) -> bool {
    matches!(
        o,
        Output::Send {
            msg: Message::TxVote { yes: true, .. },
            ..
        }
    )
}

fn sends_yes_vote_to(to: NodeId) -> impl Fn(&Output) -> bool {
    move |o| matches!(o, Output::Send { to: t, msg: Message::TxVote { yes: true, .. } } if *t == to)
}

// ---- trace filtering ----

/// The protocol story of a run: transaction, membership, resolver and
/// catch-up lines, faults and crashes. Dropped: heartbeats and the campaign
/// messages (the `CampaignStarted` / `GenerationAdopted` events tell it).
/// Debug forms are shortened: gids as `mm-o-b.s-g`, ballots as
/// `b<round>.<node>`, node sets as `{1,2}`.
fn story(r: &SeedReport) -> String {
    let trace = r.trace.as_ref().expect("traced run");
    trace
        .iter()
        .filter(|l| {
            !["Heartbeat", "Propose", "GenVote", "NewGen"]
                .iter()
                .any(|k| l.contains(k))
        })
        .map(|l| shorten(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn shorten(l: &str) -> String {
    let mut s = l.to_string();
    s = rewrite(&s, "Gid { ", |f| {
        format!("mm-{}-{}.{}-{}", f[0], f[1], f[2], f[3])
    });
    s = rewrite(&s, "Ballot { ", |f| format!("b{}.{}", f[0], f[1]));
    s = rewrite_nodeset(&s);
    s.replace("ClientId(", "client(")
}

/// Replace every `<prefix>a: 1, b: 2 }` by `f(["1", "2"])`.
fn rewrite(s: &str, prefix: &str, f: impl Fn(&[&str]) -> String) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(prefix) {
        out.push_str(&rest[..i]);
        let after = &rest[i + prefix.len()..];
        let end = after.find(" }").expect("closing brace");
        let fields: Vec<&str> = after[..end]
            .split(", ")
            .map(|kv| kv.split_once(": ").map_or(kv, |(_, v)| v))
            .collect();
        out.push_str(&f(&fields));
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

fn rewrite_nodeset(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("NodeSet(") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "NodeSet(".len()..];
        let end = after.find(')').expect("closing paren");
        let bits: u32 = after[..end].parse().expect("bitmask");
        let ids: Vec<String> = (0..32)
            .filter(|b| bits & (1 << b) != 0)
            .map(|b| b.to_string())
            .collect();
        out.push_str(&format!("{{{}}}", ids.join(",")));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Scripted transactions start after this: the cluster has exchanged a few
/// heartbeat rounds, so failure detection runs on the heartbeat timeout.
const WARM: VTime = SEC;

/// Run both phases to the end. The run must settle with no violation
/// (atomicity, durability, convergence, majority, liveness, every client
/// answered). Returns the report and the value of `key` on nodes 1..=3.
fn settle(mut w: World, key: u64) -> (SeedReport, Vec<Option<RowValue>>) {
    w.run_until(VTime::MAX);
    let rows = (1..=3).map(|id| w.db(id).get((Table::Mm, key))).collect();
    let r = w.finish();
    assert!(
        r.violations.is_empty(),
        "violations: {:#?}\n{}",
        r.violations,
        story(&r)
    );
    assert!(r.settle_time.is_some(), "did not settle");
    (r, rows)
}

/// Whether `node` emitted exactly this event.
fn emitted(r: &SeedReport, node: NodeId, e: &Event) -> bool {
    let needle = format!(" n{node} event {e:?}");
    r.trace
        .as_ref()
        .unwrap()
        .iter()
        .any(|l| l.ends_with(&needle))
}

fn has_line(r: &SeedReport, needle: &str) -> bool {
    r.trace.as_ref().unwrap().iter().any(|l| l.contains(needle))
}

fn gid(origin: NodeId, boot: u32, seq: u32, gen: u64) -> Gid {
    Gid {
        origin,
        boot,
        seq,
        gen,
    }
}

fn value(info: u64) -> Option<RowValue> {
    Some(RowValue::Mm { info, mod_time: 0 })
}

/// The line a node's send of `msg` to `to` leaves in the trace (delivered or not).
fn sent(r: &SeedReport, from: NodeId, to: NodeId, msg: &Message) -> bool {
    let needle = format!(" n{from} -> n{to} {msg:?}");
    has_line(r, &needle)
}

/// The coordinator crashes as its yes vote leaves for n2 only: n2 hears
/// every yes and accepts ballot zero, n3 misses the coordinator's yes and
/// accepts nothing (n2's acceptance alone is no quorum). The survivors'
/// resolver (quorum {2,3}) finds n2's acceptance and must commit (rule
/// `HighestAccepted`): it cannot know that no majority accepted. The
/// coordinator returns with the transaction prepared, learns the commit and
/// catches up.
#[test]
fn coordinator_crashes_while_its_vote_leaves() {
    let mut w = world();
    w.script_tx(WARM, 1, vec![row(1, 1)]);
    w.crash_after_output(1, 5 * SEC, None, sends_yes_vote_to(2));
    let (r, rows) = settle(w, 1);
    let g = gid(1, 0, 1, 1);
    assert!(has_line(&r, "n1 CRASH mid-batch"));
    assert!(
        !has_line(&r, "n1 -> n3 TxVote"),
        "n3 never got the coordinator's yes"
    );
    assert!([2, 3].iter().any(|&n| emitted(
        &r,
        n,
        &Event::ResolverDecided {
            gid: g,
            commit: true,
            rule: ResolveRule::HighestAccepted
        }
    )));
    assert!(emitted(
        &r,
        1,
        &Event::ResolverDecided {
            gid: g,
            commit: true,
            rule: ResolveRule::AlreadyDecided
        }
    ));
    assert_eq!(rows, vec![value(1); 3]);
    insta::assert_snapshot!(story(&r));
}

/// The coordinator crashes right after its yes vote reached both
/// participants: each hears every yes, accepts ballot zero and hears the
/// other's acceptance, a quorum, so both commit with no coordinator and no
/// resolver. The coordinator returns with the transaction prepared, its
/// resolver learns the commit (`AlreadyDecided`) and it catches up.
#[test]
fn coordinator_crashes_after_its_vote() {
    let mut w = world();
    w.script_tx(WARM, 1, vec![row(1, 1)]);
    w.crash_after_output(1, 5 * SEC, None, sends_yes_vote_to(3));
    let (r, rows) = settle(w, 1);
    let g = gid(1, 0, 1, 1);
    for n in [2, 3] {
        assert!(
            !r.trace
                .as_ref()
                .unwrap()
                .iter()
                .any(|l| l.contains(&format!(" n{n} event ResolverDecided"))),
            "n{n} learnt the commit from the acceptances"
        );
    }
    assert!(emitted(
        &r,
        1,
        &Event::ResolverDecided {
            gid: g,
            commit: true,
            rule: ResolveRule::AlreadyDecided
        }
    ));
    assert_eq!(rows, vec![value(1); 3]);
    insta::assert_snapshot!(story(&r));
}

/// A participant crashes right after its yes vote leaves for the
/// coordinator: the coordinator hears every yes and accepts ballot zero; the
/// other participant missed the crashed one's yes and accepts only when the
/// coordinator relays ballot zero to it, a quorum of two; the client is told
/// `Committed`. The participant restarts 1 s later with
/// the transaction prepared, its resolver learns the commit
/// (`AlreadyDecided`); back within the heartbeat timeout, it never left
/// generation 1, so there is no campaign and no catch-up.
#[test]
fn participant_crashes_after_prepare() {
    let mut w = world();
    w.script_tx(WARM, 1, vec![row(1, 1)]);
    w.crash_after_output(2, 5 * SEC, Some(SEC), sends_yes_vote);
    let (r, rows) = settle(w, 1);
    let g = gid(1, 0, 1, 1);
    assert!(has_line(&r, "n2 CRASH mid-batch"));
    assert!(has_line(&r, "n2 RESTART with 1 prepared in db"));
    assert!(emitted(
        &r,
        2,
        &Event::ResolverDecided {
            gid: g,
            commit: true,
            rule: ResolveRule::AlreadyDecided
        }
    ));
    // Back within the heartbeat timeout: it never left generation 1, so no
    // campaign and no catch-up, only its in-doubt transaction to settle.
    assert!(!has_line(&r, "GenerationAdopted"));
    assert_eq!((r.committed, r.aborted), (1, 0));
    assert_eq!(rows, vec![value(1); 3]);
    insta::assert_snapshot!(story(&r));
}

/// Partition during vote collection: a participant is cut off right after
/// preparing, so its yes votes are lost. The coordinator's votes time out
/// (before the heartbeat timeout changes the generation) after its own yes:
/// it cannot abort alone (a member might have heard every yes), so its
/// resolver runs; the quorum {1,2} accepted nothing and it aborts
/// (`NothingAccepted`). When the partition heals, the isolated
/// participant's resolver learns the abort and rolls its prepared copy back.
#[test]
fn partition_during_vote_collection() {
    let mut w = world();
    w.script_tx(WARM, 1, vec![row(1, 1)]);
    w.on_output(3, sends_yes_vote, FaultAction::Isolate { node: 3 });
    w.inject(5 * SEC, FaultAction::HealLinks);
    let (r, rows) = settle(w, 1);
    let g = gid(1, 0, 1, 1);
    assert!(emitted(
        &r,
        1,
        &Event::CoordinatorResolving {
            gid: g,
            reason: AbortReason::VoteTimeout
        }
    ));
    assert!(emitted(
        &r,
        1,
        &Event::ResolverDecided {
            gid: g,
            commit: false,
            rule: ResolveRule::NothingAccepted
        }
    ));
    assert!(emitted(
        &r,
        3,
        &Event::ResolverDecided {
            gid: g,
            commit: false,
            rule: ResolveRule::AlreadyDecided
        }
    ));
    assert_eq!((r.committed, r.aborted), (0, 1));
    assert_eq!(rows, vec![None; 3]);
    insta::assert_snapshot!(story(&r));
}

/// Partition once the coordinator's yes is out: the links back to the
/// coordinator are cut, so it hears neither the votes nor the acceptances.
/// The participants hear every yes, accept ballot zero, hear each other's
/// acceptance and commit on their own. The coordinator's votes time out: it
/// hands the transaction to its resolver, which learns the commit once the
/// links heal (`AlreadyDecided`), and the waiting client is told `Committed`.
#[test]
fn partition_after_the_votes_leave() {
    let mut w = world();
    w.script_tx(WARM, 1, vec![row(1, 1)]);
    w.on_output(
        1,
        sends_yes_vote_to(3),
        FaultAction::OneWay { from: 2, to: 1 },
    );
    w.on_output(
        1,
        sends_yes_vote_to(3),
        FaultAction::OneWay { from: 3, to: 1 },
    );
    w.inject(5 * SEC, FaultAction::HealLinks);
    let (r, rows) = settle(w, 1);
    let g = gid(1, 0, 1, 1);
    assert!(has_line(&r, "n2 -> n1 Accepted"));
    assert!(emitted(
        &r,
        1,
        &Event::CoordinatorResolving {
            gid: g,
            reason: AbortReason::VoteTimeout
        }
    ));
    assert!(emitted(
        &r,
        1,
        &Event::ResolverDecided {
            gid: g,
            commit: true,
            rule: ResolveRule::AlreadyDecided
        }
    ));
    assert_eq!((r.committed, r.aborted), (1, 0));
    assert_eq!(rows, vec![value(1); 3]);
    insta::assert_snapshot!(story(&r));
}

/// Partition while the acceptances travel: n3, the last to vote, accepts
/// ballot zero, and is cut off as n1's acceptance leaves for it: it hears
/// no other acceptance and stays in doubt with ballot zero accepted, while
/// n1 and n2 learn the commit from each other's acceptances. The rest form a generation without n3; after the
/// heal its resolver learns the commit (`AlreadyDecided`) and it catches up.
#[test]
fn partition_while_acceptances_travel() {
    let mut w = world();
    w.script_tx(WARM, 1, vec![row(1, 1)]);
    w.on_output(
        1,
        |o| {
            matches!(o, Output::Send { to: 3, msg: Message::Accepted { ballot, ok: true, .. } }
                if *ballot == Ballot::COORDINATOR)
        },
        FaultAction::Isolate { node: 3 },
    );
    w.inject(5 * SEC, FaultAction::HealLinks);
    let (r, rows) = settle(w, 1);
    let g = gid(1, 0, 1, 1);
    assert!(emitted(
        &r,
        3,
        &Event::ResolverDecided {
            gid: g,
            commit: true,
            rule: ResolveRule::AlreadyDecided
        }
    ));
    assert!(emitted(
        &r,
        3,
        &Event::CatchupCompleted {
            donor: 1,
            upto_gen: Some(3)
        }
    ));
    assert_eq!((r.committed, r.aborted), (1, 0));
    assert_eq!(rows, vec![value(1); 3]);
    insta::assert_snapshot!(story(&r));
}

/// A node returns mid-transaction: n3 crashes, the others form generation 2
/// and commit a first transaction; n3 restarts the moment the coordinator
/// prepares a second one. The data plane delivers both to n3, which is not
/// a member of generation 2: it discards them and votes no, a vote that does
/// not count, so the second transaction commits with n1 and n2. n3 then
/// catches up both committed transactions and joins generation 3.
#[test]
fn node_returns_mid_transaction() {
    let mut w = world();
    w.inject(WARM, FaultAction::Crash { node: 3 });
    w.script_tx(5 * SEC, 1, vec![row(1, 1)]);
    w.script_tx(6 * SEC, 1, vec![row(4, 2)]);
    w.on_output(
        1,
        |o| matches!(o, Output::Db(DbCmd::PrepareLocal { gid, .. }) if gid.seq == 2),
        FaultAction::Restart { node: 3 },
    );
    let (r, rows) = settle(w, 4);
    let g2 = gid(1, 0, 2, 2);
    assert!(has_line(&r, "n3 RESTART"));
    assert!(sent(
        &r,
        3,
        1,
        &Message::TxVote {
            gid: g2,
            yes: false
        }
    ));
    assert!(has_line(&r, "n3 catch-up from n1 applied 2/2 txs"));
    assert!(emitted(
        &r,
        3,
        &Event::CatchupCompleted {
            donor: 1,
            upto_gen: Some(3)
        }
    ));
    assert_eq!((r.committed, r.aborted), (2, 0));
    assert_eq!(rows, vec![value(2); 3]);
    insta::assert_snapshot!(story(&r));
}

/// Two coordinators write the same row at the same moment. Each holds the
/// row locked by its own prepared transaction, so applying the other's fails
/// and it votes no; n3 prepares whichever arrives first and votes no on the
/// other. Both coordinators abort with `VoteNo` and the row stays absent.
#[test]
fn two_coordinators_conflict_on_one_row() {
    let mut w = world();
    w.script_tx(WARM, 1, vec![row(7, 1)]);
    w.script_tx(WARM, 2, vec![row(7, 2)]);
    let (r, rows) = settle(w, 7);
    for origin in [1, 2] {
        let g = gid(origin, 0, 1, 1);
        assert!(emitted(
            &r,
            origin,
            &Event::CoordinatorAborted {
                gid: g,
                reason: AbortReason::VoteNo
            }
        ));
    }
    assert_eq!((r.committed, r.aborted), (0, 2));
    assert_eq!(rows, vec![None; 3]);
    insta::assert_snapshot!(story(&r));
}

/// The coordinator crashes right after telling its client `Committed`: its
/// `decided` record was only a lazy record (no fsync on the commit's path),
/// not yet written, and is lost. It restarts 1 s later with the
/// transaction committed in its database and its durable acceptance of
/// ballot zero only: nothing is in doubt, no resolver runs, and every node
/// holds the row. The client's acknowledgement stays true.
#[test]
fn coordinator_crashes_before_its_decision_is_written() {
    let mut w = world();
    // Past the hold on answers after boot, so the answer follows the commits.
    w.script_tx(2 * SEC, 1, vec![row(1, 1)]);
    w.crash_after_output(1, 5 * SEC, Some(SEC), |o| {
        matches!(
            o,
            Output::Reply {
                outcome: mm_core::Outcome::Committed,
                ..
            }
        )
    });
    let (r, rows) = settle(w, 1);
    assert!(has_line(&r, "n1 lazy records lost: 1"));
    assert!(!r
        .trace
        .as_ref()
        .unwrap()
        .iter()
        .any(|l| l.contains("ResolverDecided")));
    assert_eq!((r.committed, r.aborted), (1, 0));
    assert_eq!(rows, vec![value(1); 3]);
    insta::assert_snapshot!(story(&r));
}
