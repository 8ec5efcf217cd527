//! What the proxy's sessions, the data-plane receivers, the appliers and the
//! storage adapter share inside one `mmd`: the sessions waiting to prepare,
//! the delivered remote transactions waiting for the core's verdict, and the
//! remote transactions prepared here and not yet finished, and the ones the
//! core left unapplied until the peer's stream shows how they ended.

use super::remote_tx::RemoteTx;
use mm_core::{ClientId, Gid, Input};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// What the storage asks of a client session in the middle of its commit.
#[derive(Debug)]
pub enum SessionCmd {
    /// Prepare the open transaction under `gid`, report `LocalPrepared` on `results`.
    Prepare {
        gid: Gid,
        results: mpsc::UnboundedSender<Input>,
    },
    /// Abandon the open transaction.
    Rollback,
}

#[derive(Default)]
struct Inner {
    sessions: BTreeMap<ClientId, mpsc::UnboundedSender<SessionCmd>>,
    remote: BTreeMap<Gid, RemoteTx>,
    applying: BTreeSet<Gid>,
    applied: BTreeSet<Gid>,
    /// Left unapplied by the core (not a member of its generation, or a
    /// duplicate): if the peer's stream shows it committed, it is a missed
    /// transaction to replay here (see `replay`).
    missed: BTreeMap<Gid, RemoteTx>,
    /// Per peer: is its data-plane stream up?
    receivers: BTreeMap<mm_core::NodeId, bool>,
    /// The last resync, or the one under way, for `mtm.status()`.
    resync_note: Option<String>,
}

#[derive(Default)]
pub struct Hub {
    inner: Mutex<Inner>,
    finished: Notify,
    /// The core's durable `last_online_gen`: this node holds every
    /// transaction committed up to that generation.
    last_online_gen: AtomicU64,
    /// Replays of missed transactions run one at a time, so two streams
    /// carrying the same transaction cannot both apply it.
    pub replay_lock: tokio::sync::Mutex<()>,
    /// A receiver found this node's slot on a peer invalidated.
    resync_wanted: AtomicBool,
    /// A resync is replacing this node's database: receivers stay down.
    resyncing: AtomicBool,
    /// An initial copy is pending (`mmctl add-node`): receivers wait for it.
    held: AtomicBool,
    resync_changed: Notify,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_receiver_up(&self, peer: mm_core::NodeId, up: bool) {
        self.lock().receivers.insert(peer, up);
    }
    pub fn receiver_up(&self, peer: mm_core::NodeId) -> bool {
        self.lock().receivers.get(&peer).copied().unwrap_or(false)
    }

    /// This node lost data it can only get back from a donor snapshot.
    pub fn want_resync(&self) {
        self.resync_wanted.store(true, Ordering::Release);
        self.resync_changed.notify_waiters();
    }
    pub fn resync_wanted(&self) -> bool {
        self.resync_wanted.load(Ordering::Acquire)
    }
    /// Wait until a resync is wanted.
    pub async fn resync_requested(&self) {
        self.wait_resync_flag(|h| h.resync_wanted()).await
    }
    /// This node must copy a donor's database before streaming anything.
    pub fn hold_for_initial_copy(&self) {
        self.held.store(true, Ordering::Release);
        self.want_resync();
    }
    /// A resync starts (`true`, receivers go down) or ended (`false`);
    /// one that succeeded clears the request.
    pub fn set_resyncing(&self, on: bool, done: bool) {
        if done {
            self.resync_wanted.store(false, Ordering::Release);
            self.held.store(false, Ordering::Release);
        }
        self.resyncing.store(on, Ordering::Release);
        self.resync_changed.notify_waiters();
    }
    pub fn resyncing(&self) -> bool {
        self.resyncing.load(Ordering::Acquire)
    }
    pub(crate) fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }
    /// Resolves once a resync is under way (for receivers to stop).
    pub async fn resync_started(&self) {
        self.wait_resync_flag(|h| h.resyncing()).await
    }
    /// Resolves once no resync is under way or pending as an initial copy.
    pub async fn resync_finished(&self) {
        self.wait_resync_flag(|h| !h.resyncing() && !h.held()).await
    }
    async fn wait_resync_flag(&self, done: impl Fn(&Hub) -> bool) {
        loop {
            let notified = self.resync_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return;
            }
            notified.await;
        }
    }
    pub fn set_resync_note(&self, note: String) {
        self.lock().resync_note = Some(note);
    }
    pub fn resync_note(&self) -> Option<String> {
        self.lock().resync_note.clone()
    }
    /// Peers whose data-plane stream is up.
    pub fn receivers_up(&self) -> Vec<mm_core::NodeId> {
        self.lock()
            .receivers
            .iter()
            .filter(|(_, up)| **up)
            .map(|(p, _)| *p)
            .collect()
    }

    pub fn register_session(&self, client: ClientId, tx: mpsc::UnboundedSender<SessionCmd>) {
        self.lock().sessions.insert(client, tx);
    }
    pub fn unregister_session(&self, client: ClientId) {
        self.lock().sessions.remove(&client);
    }
    /// Hand `cmd` to the session of `client`; gives it back if the session is gone.
    pub fn to_session(&self, client: ClientId, cmd: SessionCmd) -> Result<(), SessionCmd> {
        match self.lock().sessions.get(&client) {
            Some(tx) => tx.send(cmd).map_err(|e| e.0),
            None => Err(cmd),
        }
    }

    /// A peer's prepared transaction arrived: keep it until the core decides.
    pub fn deliver(&self, tx: RemoteTx) {
        self.lock().remote.insert(tx.gid, tx);
    }
    /// The core dropped it unapplied: kept until the stream shows its end.
    pub fn discard_remote(&self, gid: &Gid) {
        let mut i = self.lock();
        if let Some(tx) = i.remote.remove(gid) {
            i.missed.insert(*gid, tx);
        }
    }
    /// Still waiting for the core's verdict (apply or discard).
    pub fn awaiting_verdict(&self, gid: &Gid) -> bool {
        self.lock().remote.contains_key(gid)
    }
    /// Its end is in the stream: hand over what the core left unapplied.
    pub fn take_missed(&self, gid: &Gid) -> Option<RemoteTx> {
        self.lock().missed.remove(gid)
    }
    pub fn last_online_gen(&self) -> u64 {
        self.last_online_gen.load(Ordering::Acquire)
    }
    pub fn set_last_online_gen(&self, g: u64) {
        self.last_online_gen.fetch_max(g, Ordering::AcqRel);
    }
    /// The core wants it applied: it is handed to an applier.
    pub fn take_for_apply(&self, gid: &Gid) -> Option<RemoteTx> {
        let mut i = self.lock();
        let tx = i.remote.remove(gid)?;
        i.applying.insert(*gid);
        Some(tx)
    }
    /// Neither waiting for the core, nor being applied, nor prepared here:
    /// its data-plane position can be confirmed to the peer.
    pub fn is_settled(&self, gid: &Gid) -> bool {
        let i = self.lock();
        !i.remote.contains_key(gid)
            && !i.applying.contains(gid)
            && !i.applied.contains(gid)
            && !i.missed.contains_key(gid)
    }
    /// Where `gid` is, for logs.
    pub fn describe(&self, gid: &Gid, echo: bool, to_replay: bool) -> &'static str {
        let i = self.lock();
        if echo {
            "an echo whose end the stream has not shown"
        } else if to_replay {
            "committed, queued for replay"
        } else if i.remote.contains_key(gid) {
            "waiting for the core's verdict"
        } else if i.applying.contains(gid) {
            "being applied"
        } else if i.applied.contains(gid) {
            "prepared here, waiting for its decision"
        } else if i.missed.contains_key(gid) {
            "left unapplied, waiting for its end in the stream"
        } else {
            "settled"
        }
    }
    /// Being applied or prepared here (not finished).
    pub fn is_open(&self, gid: &Gid) -> bool {
        let i = self.lock();
        i.applying.contains(gid) || i.applied.contains(gid)
    }
    pub fn remote_pending(&self) -> usize {
        self.lock().remote.len()
    }

    /// An applier is done with it: prepared here (`ok`) or voted no.
    pub fn mark_applied(&self, gid: Gid, ok: bool) {
        let mut i = self.lock();
        i.applying.remove(&gid);
        if ok {
            i.applied.insert(gid);
        }
        drop(i);
        if !ok {
            self.finished.notify_waiters();
        }
    }
    /// It was committed or rolled back here.
    pub fn mark_finished(&self, gid: &Gid) {
        self.lock().applied.remove(gid);
        self.finished.notify_waiters();
    }
    pub fn is_applied(&self, gid: &Gid) -> bool {
        self.lock().applied.contains(gid)
    }
    pub fn applied_count(&self) -> usize {
        self.lock().applied.len()
    }

    /// Wait until none of `gids` is prepared here any more, at most `limit`.
    /// Returns false on timeout.
    pub async fn wait_finished(&self, gids: &[Gid], limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.finished.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !gids.iter().any(|g| self.is_open(g)) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return !gids.iter().any(|g| self.is_open(g));
            }
        }
    }
}
