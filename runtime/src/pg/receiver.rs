//! Receivers: one per peer, streaming the peer's PostgreSQL WAL through the
//! slot reserved for this node (`mm_slot_for_<me>`, pgoutput with
//! `two_phase` and `messages`). A transaction the peer prepared under an mm
//! gid of its own is delivered to the core (`RemoteTx`); everything else is
//! not ours to apply: the peer's own protocol-state writes (`mm` schema),
//! transactions it applied for other nodes (echoes: an Origin message, or a
//! gid of another origin), and writes made on the peer outside mm.
//!
//! A transaction the core left unapplied, or an echo of a generation this
//! node was not online in, is kept until the stream shows how it ended: if
//! it committed, this node missed it and replays it ([`super::replay`])
//! when the peer's catch-up mark arrives, in the peer's commit order.
//!
//! A position is confirmed to the peer only once every transaction before
//! it is settled here (dropped, or prepared and then finished), so a
//! restarted receiver is sent again whatever is still open.

use super::hub::Hub;
use super::init::{slot_for, PUBLICATION};
use super::remote_tx::{parse_ddl, Change, RemoteTx, CATCHUP_PREFIX, DDL_PREFIX};
use super::replay::Replayer;
use super::replication::conn::{EchoSkip, ReplicationClient, ReplicationStream, FILTERING_PLUGIN};
use super::replication::pgoutput::{PgOutputMessage, Relation};
use super::replication::Lsn;
use super::sql::quote_literal;
use mm_core::{Gid, Input, Message, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

pub struct ReceiverSettings {
    pub me: NodeId,
    pub peer: NodeId,
    pub peer_conninfo: String,
    /// This node's own PostgreSQL, for replays.
    pub local_conninfo: String,
    /// `logical_decoding_work_mem` (MB) of the peer's walsender for this stream.
    pub decoding_work_mem_mb: u64,
}

/// Stream from `peer` forever, reconnecting with backoff.
pub async fn run_receiver(s: ReceiverSettings, hub: Arc<Hub>, results: UnboundedSender<Input>) {
    let mut delay = Duration::from_millis(200);
    let mut said_lost = false;
    loop {
        hub.resync_finished().await;
        let r = stream_once(&s, &hub, &results).await;
        hub.set_receiver_up(s.peer, false);
        match r {
            Ok(()) if hub.resyncing() => {
                tracing::info!(peer = s.peer, "data-plane stream stopped for a resync");
                said_lost = false;
                delay = Duration::from_millis(200);
                continue;
            }
            Ok(()) => {
                tracing::info!(peer = s.peer, "data-plane stream ended, reconnecting");
                delay = Duration::from_millis(200);
            }
            Err(e) if slot_invalidated(&e) => {
                // The peer removed WAL this node had not read yet: nothing
                // it missed from that peer can be streamed any more.
                if !said_lost {
                    said_lost = true;
                    tracing::error!(
                        peer = s.peer,
                        "this node's slot on node {} was invalidated (it retained more WAL \
                         than max_slot_wal_keep_size while this node was away): this node \
                         cannot catch up from that node's stream and needs a resync from a \
                         donor snapshot; it stays out of `online` and refuses work until \
                         the resync is done ({e})",
                        s.peer
                    );
                }
                hub.want_resync();
            }
            Err(e) if e.contains("needs a resync") => {
                // A committed transaction did not fit this node's rows: it
                // diverged. Only a donor's snapshot repairs that (it runs
                // once the node is out of the generation, in `catchup`).
                tracing::error!(peer = s.peer, "{e}; resyncing from a donor snapshot");
                hub.want_resync();
            }
            Err(e) => {
                tracing::warn!(peer = s.peer, "data-plane stream from peer failed: {e}");
            }
        }
        if results.is_closed() {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The transaction being read from the stream.
struct Building {
    gid: Option<Gid>,
    echo: bool,
    changes: Vec<Change>,
    /// Touched a table outside the `mm` schema.
    user_rows: bool,
    bad: Option<String>,
    /// When its first message arrived, and when the origin last heard that
    /// it is still arriving (a large transaction streams for a while).
    started: tokio::time::Instant,
    told: tokio::time::Instant,
}

/// How often a transaction still arriving is reported to its origin.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(300);

/// A catch-up mark for this node: report when everything before it is settled.
struct Mark {
    at: Lsn,
    upto_gen: Option<u64>,
    /// When it arrived, and when we last said what holds it.
    since: tokio::time::Instant,
    told: tokio::time::Instant,
}

async fn stream_once(
    s: &ReceiverSettings,
    hub: &Arc<Hub>,
    results: &UnboundedSender<Input>,
) -> Result<(), String> {
    let mut client = ReplicationClient::connect(&super::named(
        &s.peer_conninfo,
        &format!("receiver for node {}", s.me),
    ))
    .await
    .map_err(|e| format!("connecting to {}: {e}", redact(&s.peer_conninfo)))?;
    client
        .simple_query(&format!(
            "SET logical_decoding_work_mem = '{}MB'",
            s.decoding_work_mem_mb
        ))
        .await
        .map_err(|e| format!("setting logical_decoding_work_mem: {e}"))?;
    let skip = echo_skip(&mut client, s, hub).await?;
    let mut stream = client
        .start_filtered(&slot_for(s.me), PUBLICATION, Lsn(0), skip)
        .await
        .map_err(|e| format!("starting replication from slot {}: {e}", slot_for(s.me)))?;
    stream.set_status_interval(Duration::from_secs(1));
    tracing::info!(
        peer = s.peer,
        echoes_skipped_upto_gen = ?skip.map(|k| k.skip_upto),
        "data-plane stream started"
    );
    hub.set_receiver_up(s.peer, true);

    let mut rels: BTreeMap<u32, Arc<Relation>> = BTreeMap::new();
    let mut cur: Option<Building> = None;
    // Delivered and not yet settled here, by prepare LSN.
    let mut inflight: BTreeMap<Lsn, Gid> = BTreeMap::new();
    // Decided in the peer's stream while still open here.
    let mut decided: BTreeSet<Gid> = BTreeSet::new();
    let mut marks: Vec<Mark> = Vec::new();
    // Echoes this node may lack, until the stream shows their end.
    let mut echoes: BTreeMap<Gid, Vec<Change>> = BTreeMap::new();
    // The echoes among `inflight`.
    let mut echo_gids: BTreeSet<Gid> = BTreeSet::new();
    // Committed transactions this node may lack, in this stream's commit
    // order. Replayed only when this peer's catch-up mark arrives: the
    // donor's commit order is a serial order of all of them, while two
    // streams interleaved are not (row images of crossing transfers would
    // land out of order). Once the core is online in a later generation, a
    // catch-up from some donor covered them: they are only checked.
    let mut to_replay: Vec<RemoteTx> = Vec::new();
    let mut replayer = Replayer::new(s.local_conninfo.clone(), s.peer, s.me);
    let mut outside_mm_warned = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        // Not biased: a busy stream must not starve the tick that confirms
        // positions and completes catch-up marks.
        let next = tokio::select! {
            r = stream.next() => r.map_err(|e| e.to_string())?,
            // The resync replaces what this stream's state describes.
            _ = hub.resync_started() => return Ok(()),
            _ = tick.tick() => {
                if let Some(c) = cur.as_mut().filter(|c| !c.echo && c.started.elapsed() >= PROGRESS_EVERY) {
                    if let (Some(gid), true) = (c.gid, c.told.elapsed() >= PROGRESS_EVERY) {
                        c.told = tokio::time::Instant::now();
                        let _ = results.send(Input::RemoteProgress { gid });
                    }
                }
                let covered = to_replay
                    .iter()
                    .take_while(|t| t.gid.gen <= hub.last_online_gen())
                    .count();
                let late: Vec<RemoteTx> = to_replay.drain(..covered).collect();
                if replay_all(late, &mut replayer, hub, &mut stream).await? > 0 {
                    tracing::warn!(peer = s.peer, "a catch-up missed transactions of this stream; replayed them late");
                }
                let pending: BTreeSet<Gid> = to_replay.iter().map(|t| t.gid).collect();
                // An echo is settled here once this stream showed its end
                // and replayed it if it committed; the origin's own copy of it
                // (left unapplied by the core) waits for the origin's stream,
                // which is down whenever the origin is: a catch-up from this
                // donor must not wait for that.
                inflight.retain(|_, g| {
                    let keep = if echo_gids.contains(g) {
                        echoes.contains_key(g) || pending.contains(g)
                    } else {
                        pending.contains(g) || !hub.is_settled(g)
                    };
                    if !keep {
                        echo_gids.remove(g);
                    }
                    keep
                });
                decided.retain(|g| hub.is_open(g));
                marks.retain_mut(|m| {
                    let first = inflight.range(..m.at).next().map(|(_, g)| *g);
                    match first {
                        None => {
                            let _ = results.send(Input::CatchupApplied { donor: s.peer, upto_gen: m.upto_gen });
                            false
                        }
                        Some(g) => {
                            // An operator's first question when a node stays
                            // out of `online`: what is it waiting for?
                            if m.told.elapsed() >= Duration::from_secs(2) {
                                m.told = tokio::time::Instant::now();
                                tracing::info!(
                                    peer = s.peer,
                                    upto_gen = ?m.upto_gen,
                                    waiting_s = m.since.elapsed().as_secs(),
                                    unsettled = inflight.range(..m.at).count(),
                                    first = %g,
                                    state = hub.describe(&g, echoes.contains_key(&g), pending.contains(&g)),
                                    "catch-up mark waits for transactions before it to settle"
                                );
                            }
                            true
                        }
                    }
                });
                // The echo filter was set from an older last online
                // generation: start again once nothing here is half-read, so
                // the peer leaves out the echoes of the newer generations too.
                if skip.is_some_and(|k| hub.last_online_gen() > k.skip_upto)
                    && cur.is_none()
                    && marks.is_empty()
                    && to_replay.is_empty()
                    && echoes.is_empty()
                {
                    tracing::info!(
                        peer = s.peer,
                        last_online_gen = hub.last_online_gen(),
                        "restarting the data-plane stream to leave out the echoes this node now has"
                    );
                    return Ok(());
                }
                let safe = match inflight.keys().next() {
                    Some(first) => *first,
                    None if cur.is_none() => stream.received(),
                    None => stream.confirmed(),
                };
                if safe > stream.confirmed() {
                    stream.confirm(safe).await.map_err(|e| e.to_string())?;
                }
                continue;
            }
        };
        let Some((lsn, msg)) = next else {
            return Ok(());
        };
        match msg {
            PgOutputMessage::Relation(r) => {
                rels.insert(r.rel_id, Arc::new(r));
            }
            PgOutputMessage::Type(_) => {}
            PgOutputMessage::Begin(_) => {
                cur = Some(Building {
                    gid: None,
                    echo: false,
                    changes: Vec::new(),
                    user_rows: false,
                    bad: None,
                    started: tokio::time::Instant::now(),
                    told: tokio::time::Instant::now(),
                });
            }
            PgOutputMessage::BeginPrepare(b) => {
                let gid = b.gid.parse::<Gid>().ok();
                cur = Some(Building {
                    echo: gid.is_none_or(|g| g.origin != s.peer),
                    gid,
                    changes: Vec::new(),
                    user_rows: false,
                    bad: None,
                    started: tokio::time::Instant::now(),
                    told: tokio::time::Instant::now(),
                });
            }
            PgOutputMessage::Origin(_) => {
                if let Some(c) = cur.as_mut() {
                    c.echo = true;
                }
            }
            PgOutputMessage::Insert(i) => push_row(&mut cur, &rels, i.rel_id, |rel| {
                Change::Insert { rel, new: i.new }
            }),
            PgOutputMessage::Update(u) => {
                push_row(&mut cur, &rels, u.rel_id, |rel| Change::Update {
                    rel,
                    old: u.old,
                    new: u.new,
                })
            }
            PgOutputMessage::Delete(d) => push_row(&mut cur, &rels, d.rel_id, |rel| {
                Change::Delete { rel, old: d.old }
            }),
            PgOutputMessage::Truncate(t) => {
                if let Some(c) = cur.as_mut() {
                    let found: Option<Vec<Arc<Relation>>> =
                        t.rel_ids.iter().map(|id| rels.get(id).cloned()).collect();
                    match found {
                        Some(list) => {
                            let list: Vec<_> =
                                list.into_iter().filter(|r| r.namespace != "mm").collect();
                            if !list.is_empty() {
                                c.user_rows = true;
                                c.changes.push(Change::Truncate {
                                    rels: list,
                                    cascade: t.cascade,
                                    restart_identity: t.restart_identity,
                                });
                            }
                        }
                        None => c.bad = Some("TRUNCATE of an unknown relation".into()),
                    }
                }
            }
            PgOutputMessage::Message(m) => {
                if m.transactional {
                    if let Some(c) = cur.as_mut() {
                        if m.prefix == DDL_PREFIX {
                            match parse_ddl(&m.content) {
                                Ok(ch) => {
                                    c.user_rows = true;
                                    c.changes.push(ch);
                                }
                                Err(e) => c.bad = Some(e.to_string()),
                            }
                        }
                    }
                } else if m.prefix == CATCHUP_PREFIX {
                    if let Some(mark) = parse_mark(&m.content, s.me, lsn) {
                        tracing::info!(peer = s.peer, upto_gen = ?mark.upto_gen, "catch-up mark received");
                        let n = replay_all(
                            std::mem::take(&mut to_replay),
                            &mut replayer,
                            hub,
                            &mut stream,
                        )
                        .await?;
                        if n > 0 {
                            tracing::info!(
                                peer = s.peer,
                                "replayed {n} committed transactions this node missed"
                            );
                        }
                        marks.push(mark);
                    }
                }
            }
            PgOutputMessage::Commit(_) => {
                if let Some(c) = cur.take() {
                    if c.user_rows && !c.echo && !outside_mm_warned {
                        outside_mm_warned = true;
                        tracing::warn!(
                            peer = s.peer,
                            "the peer committed writes outside mm (a direct session, not through \
                             mmd): they are not replicated"
                        );
                    }
                }
            }
            PgOutputMessage::Prepare(p) => {
                let Some(c) = cur.take() else { continue };
                let Some(gid) = c.gid else { continue };
                if c.echo {
                    let missed = gid.origin != s.me && gid.gen > hub.last_online_gen();
                    if missed && c.user_rows && c.bad.is_none() {
                        echoes.insert(gid, c.changes);
                        echo_gids.insert(gid);
                        inflight.insert(p.prepare_lsn, gid);
                    }
                    continue;
                }
                if let Some(why) = c.bad {
                    // Deliver nothing: the core's vote timeout aborts it everywhere.
                    tracing::error!(%gid, peer = s.peer, "cannot replay a remote transaction: {why}");
                    continue;
                }
                decided.retain(|g| hub.is_open(g));
                let tx = RemoteTx {
                    gid,
                    changes: c.changes,
                    end_lsn: p.end_lsn,
                    after: decided.iter().copied().collect(),
                };
                inflight.insert(p.prepare_lsn, gid);
                hub.deliver(tx);
                if results.send(Input::RemoteTx { gid }).is_err() {
                    return Ok(()); // the driver stopped
                }
            }
            PgOutputMessage::CommitPrepared(cp) => {
                let Ok(gid) = cp.gid.parse::<Gid>() else {
                    continue;
                };
                let missed = match echoes.remove(&gid) {
                    Some(changes) => Some(RemoteTx {
                        gid,
                        changes,
                        end_lsn: cp.end_lsn,
                        after: Vec::new(),
                    }),
                    None if gid.origin == s.peer => {
                        wait_verdict(hub, &gid).await?;
                        hub.take_missed(&gid)
                    }
                    None => None,
                };
                match missed {
                    Some(tx) => {
                        to_replay.push(tx);
                        // A catch-up from this peer is under way: a
                        // transaction prepared before its mark and committed
                        // after it must not wait for the next mark.
                        if !marks.is_empty() {
                            replay_all(
                                std::mem::take(&mut to_replay),
                                &mut replayer,
                                hub,
                                &mut stream,
                            )
                            .await?;
                        }
                    }
                    None => note_decided(&cp.gid, true, s.peer, hub, &mut decided, results),
                }
            }
            PgOutputMessage::RollbackPrepared(rp) => {
                let Ok(gid) = rp.gid.parse::<Gid>() else {
                    continue;
                };
                echoes.remove(&gid);
                if gid.origin == s.peer {
                    wait_verdict(hub, &gid).await?;
                    hub.take_missed(&gid);
                }
                note_decided(&rp.gid, false, s.peer, hub, &mut decided, results)
            }
        }
    }
}

/// Which echoes the peer may leave out of this stream: with the
/// [`FILTERING_PLUGIN`] slot, those the stream below would drop on arrival
/// anyway (another node's transaction of a generation this node was online
/// in, or this node's own), judged by this node's last online generation
/// now. That generation only grows, so an echo left out stays one this node
/// has (docs/protocol.md, "Echo filter"). `None` on a pgoutput slot.
async fn echo_skip(
    client: &mut ReplicationClient,
    s: &ReceiverSettings,
    hub: &Hub,
) -> Result<Option<EchoSkip>, String> {
    let rows = client
        .simple_query(&format!(
            "select plugin from pg_replication_slots where slot_name = {}",
            quote_literal(&slot_for(s.me))
        ))
        .await
        .map_err(|e| format!("reading slot {}: {e}", slot_for(s.me)))?;
    let plugin = rows.first().and_then(|r| r.first().cloned().flatten());
    Ok(
        (plugin.as_deref() == Some(FILTERING_PLUGIN)).then(|| EchoSkip {
            me: s.me.into(),
            origin: s.peer.into(),
            skip_upto: hub.last_online_gen(),
        }),
    )
}

/// Replay `txs` in order; returns how many were applied (not already held).
/// A long backlog keeps answering the peer's keepalives, or its walsender
/// would drop the stream (`wal_sender_timeout`) and the work start over.
async fn replay_all(
    txs: Vec<RemoteTx>,
    replayer: &mut Replayer,
    hub: &Hub,
    stream: &mut ReplicationStream,
) -> Result<usize, String> {
    let mut applied = 0;
    let mut last_status = tokio::time::Instant::now();
    for tx in txs {
        if replayer.replay(hub, &tx).await? {
            applied += 1;
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            let at = stream.confirmed();
            stream.confirm(at).await.map_err(|e| e.to_string())?;
            last_status = tokio::time::Instant::now();
        }
    }
    Ok(applied)
}

/// The core answers a delivered transaction within a driver round; its end
/// in the stream is handled only once the core has said whether it applies
/// it here.
async fn wait_verdict(hub: &Hub, gid: &Gid) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while hub.awaiting_verdict(gid) {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the core gave no verdict on {gid} within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// The peer decided one of its transactions that is still open here: later
/// ones of this stream wait for it (see `RemoteTx::after`).
///
/// The origin finishes its own prepared copy only once its decision is
/// durable, so its stream is also a decision message: the core gets it, as
/// from the origin. This matters when this node's stream lags: the origin's
/// `Decision` arrived before the transaction was held here, the core had
/// nothing to apply it to, and only a resolver round (about one a second)
/// would otherwise finish the late-prepared copy.
fn note_decided(
    gid: &str,
    commit: bool,
    peer: NodeId,
    hub: &Hub,
    decided: &mut BTreeSet<Gid>,
    results: &UnboundedSender<Input>,
) {
    if let Ok(gid) = gid.parse::<Gid>() {
        if gid.origin == peer && hub.is_open(&gid) {
            decided.insert(gid);
            let _ = results.send(Input::Receive {
                from: peer,
                msg: Message::Decision { gid, commit },
            });
        }
    }
}

fn push_row(
    cur: &mut Option<Building>,
    rels: &BTreeMap<u32, Arc<Relation>>,
    rel_id: u32,
    make: impl FnOnce(Arc<Relation>) -> Change,
) {
    let Some(c) = cur.as_mut() else { return };
    match rels.get(&rel_id) {
        Some(rel) if rel.namespace == "mm" => {}
        Some(rel) => {
            c.user_rows = true;
            c.changes.push(make(rel.clone()));
        }
        None => c.bad = Some(format!("row of unknown relation {rel_id}")),
    }
}

/// PostgreSQL's refusal to stream from a slot that lost its WAL
/// (`max_slot_wal_keep_size`).
fn slot_invalidated(e: &str) -> bool {
    e.contains("has been invalidated")
        || e.contains("cannot read from logical replication slot")
        || e.contains("wal_status is lost")
}

/// `to:from_gen:upto_gen` (upto `-` for none), for node `me` only.
fn parse_mark(content: &[u8], me: NodeId, at: Lsn) -> Option<Mark> {
    let text = std::str::from_utf8(content).ok()?;
    let mut parts = text.split(':');
    let to: NodeId = parts.next()?.parse().ok()?;
    let _from: u64 = parts.next()?.parse().ok()?;
    let upto = parts.next()?;
    if to != me {
        return None;
    }
    let upto_gen = if upto == "-" {
        None
    } else {
        Some(upto.parse().ok()?)
    };
    let now = tokio::time::Instant::now();
    Some(Mark {
        at,
        upto_gen,
        since: now,
        told: now,
    })
}

/// A conninfo without its password, for logs.
pub fn redact(conninfo: &str) -> String {
    conninfo
        .split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_for_one_node() {
        assert!(parse_mark(b"2:1:3", 1, Lsn(5)).is_none());
        let m = parse_mark(b"1:1:3", 1, Lsn(5)).unwrap();
        assert_eq!((m.at, m.upto_gen), (Lsn(5), Some(3)));
        assert_eq!(parse_mark(b"1:1:-", 1, Lsn(5)).unwrap().upto_gen, None);
        assert!(parse_mark(b"junk", 1, Lsn(5)).is_none());
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact("host=a password=s3cret port=1"),
            "host=a password=*** port=1"
        );
    }
}
