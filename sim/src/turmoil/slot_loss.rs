//! Lost replication slots and the resync they force, for T2.
//!
//! In production a node away too long finds its slot on a peer invalidated
//! (`max_slot_wal_keep_size`): that peer's stream cannot tell it what it
//! missed, so the node replaces its database with a donor's snapshot and
//! goes on catching up (`runtime/src/pg/resync.rs`). Here a crashed node
//! may find, when it restarts, its slots on every peer lost, if the others
//! committed without it meanwhile; a catch-up stream a donor then starts
//! to it becomes a resync: wait until the joiner holds nothing
//! prepared, copy the donor's committed transactions, slots made again.
//! The checks at the end of a run (atomicity, durability, convergence) then
//! see whether the protocol around it kept every commit.

use mm_core::{Gid, NodeId, NodeStatus};
use mm_runtime::driver::{DriverHandle, StatusSnapshot};
use mm_runtime::storage::MemCluster;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// When a crash loses the crashed node's slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotLoss {
    /// One seed in three: every crash of that seed loses them.
    Seeded,
    Never,
    EveryCrash,
}

impl SlotLoss {
    /// Whether this run loses slots, given a draw in [0, 3).
    pub fn on(self, draw: u32) -> bool {
        match self {
            SlotLoss::Seeded => draw == 0,
            SlotLoss::Never => false,
            SlotLoss::EveryCrash => true,
        }
    }
}

impl fmt::Display for SlotLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SlotLoss::Seeded => "seeded",
            SlotLoss::Never => "never",
            SlotLoss::EveryCrash => "every-crash",
        })
    }
}

impl FromStr for SlotLoss {
    type Err = String;
    fn from_str(s: &str) -> Result<SlotLoss, String> {
        match s {
            "seeded" => Ok(SlotLoss::Seeded),
            "never" => Ok(SlotLoss::Never),
            "every-crash" => Ok(SlotLoss::EveryCrash),
            _ => Err(format!("slot loss {s:?}: use seeded, never or every-crash")),
        }
    }
}

/// One resync, for the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resync {
    pub joiner: NodeId,
    pub donor: NodeId,
    pub rows: usize,
}

/// Which slots are lost, and the resyncs done.
#[derive(Default)]
pub struct Slots {
    /// (donor, joiner): the joiner's slot on the donor is invalidated.
    lost: BTreeSet<(NodeId, NodeId)>,
    pub resyncs: Vec<Resync>,
    /// Times a `recovery` member with lost slots went silent.
    pub silences: u64,
    /// Each node's running driver and the status it publishes.
    statuses: BTreeMap<NodeId, (DriverHandle, watch::Receiver<StatusSnapshot>)>,
}

pub type SharedSlots = Arc<Mutex<Slots>>;

impl Slots {
    /// `node`'s slots on every other of the `n` nodes are lost, if the
    /// others committed without it while it was away (slots are lost to
    /// WAL written meanwhile: a generation that excluded it but committed
    /// nothing cannot, and then no majority holds what a resync would copy,
    /// as seed 1324 showed with two nodes waiting for a resync at once);
    /// false if not.
    pub fn lose(&mut self, cluster: &MemCluster, node: NodeId, n: usize) -> bool {
        let db = cluster.db(node);
        let held: BTreeSet<Gid> = db.committed.iter().chain(&db.prepared).copied().collect();
        let missed = (1..=n as NodeId)
            .filter(|&p| p != node)
            .any(|p| cluster.db(p).committed.iter().any(|g| !held.contains(g)));
        if missed {
            for donor in (1..=n as NodeId).filter(|&d| d != node) {
                self.lost.insert((donor, node));
            }
        }
        missed
    }

    pub fn is_lost(&self, donor: NodeId, joiner: NodeId) -> bool {
        self.lost.contains(&(donor, joiner))
    }

    /// A (re)started driver.
    pub fn started(&mut self, node: NodeId, driver: DriverHandle) {
        let w = driver.watch();
        self.statuses.insert(node, (driver, w));
    }

    /// `node`'s slots are made again on every peer.
    fn remake(&mut self, node: NodeId) {
        self.lost.retain(|&(_, j)| j != node);
    }

    fn needs_resync(&self, node: NodeId) -> bool {
        self.lost.iter().any(|&(_, j)| j == node)
    }

    /// An online node's receivers find its lost slots and make them again
    /// where the peers are (it holds every commit, each needed its vote).
    /// Without this, a node back online in its generation before anyone
    /// noticed the loss kept it, and a later gap catch-up as a `recovery`
    /// member waited for a resync that runs only in `catchup` (seed 322).
    pub fn repair_online(&mut self) {
        let online: Vec<NodeId> = self
            .lost
            .iter()
            .map(|&(_, j)| j)
            .filter(|&j| self.status(j) == Some(NodeStatus::Online))
            .collect();
        for j in online {
            self.remake(j);
        }
    }

    /// The node's status now; None while it is down.
    fn status(&self, node: NodeId) -> Option<NodeStatus> {
        let (_, w) = self.statuses.get(&node)?;
        if w.has_changed().is_err() {
            return None; // the driver is gone
        }
        let s = w.borrow().status;
        Some(s)
    }
}

/// The donor's side of a stream to a joiner whose slot it lost: poll until
/// the joiner holds nothing prepared, then copy (and report the catch-up
/// applied). A crash of the donor's host drops this task with the stream.
/// False if another donor's resync made the slot again first: the caller
/// streams as usual (the real resync is the joiner's, and runs once).
pub async fn resync(
    cluster: &MemCluster,
    slots: &SharedSlots,
    (joiner, donor): (NodeId, NodeId),
    upto_gen: Option<u64>,
    broken: bool,
) -> bool {
    // Making the slot again (`CREATE_REPLICATION_SLOT`) waits for every
    // transaction running on the donor to end, prepared ones included: one
    // prepared there and committed elsewhere is then in the snapshot.
    // Without this wait, seeds 57, 118 and 189 (`--slot-loss every-crash`)
    // lost such a commit on the joiner.
    let running = cluster.db(donor).prepared;
    loop {
        // Without this, seed 322 resynced node 2 a second time, after it
        // was back in the generation, and lost its newer commits.
        if !slots.lock().expect("lock").is_lost(donor, joiner) {
            return false;
        }
        // The real resync runs only while the node is in `catchup`; an
        // online node makes a lost slot again where the peer is and streams
        // on, as it holds every commit. Without this, seed 1094 resynced
        // node 1 from a stream that landed after it was back online, and
        // lost its newer commits.
        // A `recovery` member waits until [`silence_while_stuck`] has had
        // it voted out.
        let status = slots.lock().expect("lock").status(joiner);
        match status {
            Some(NodeStatus::Catchup) => {}
            Some(NodeStatus::Online) => {
                slots.lock().expect("lock").remake(joiner);
                return false;
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        }
        let donor_done = cluster.db(donor).prepared.is_disjoint(&running);
        // Refused while the joiner holds prepared ones: the resolver
        // settles them; look again shortly.
        let copied = donor_done
            .then(|| cluster.resync(joiner, donor, upto_gen, broken).ok())
            .flatten();
        if let Some(rows) = copied {
            let mut s = slots.lock().expect("lock");
            // The real resync makes the joiner's lost slots on every peer
            // again before it copies.
            s.remake(joiner);
            s.resyncs.push(Resync {
                joiner,
                donor,
                rows,
            });
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The joiner's side, run on its host as `pg/resync.rs` runs in its mmd:
/// while its slots are lost and it is a `recovery` member (which cannot
/// catch up, and must not be resynced while a member), it sends its peers
/// nothing, so they vote it out; then it is in `catchup` and the resync can
/// run. Without this, seed 9 (`--slot-loss every-crash`) kept node 1 such
/// a member for good.
pub async fn silence_while_stuck(
    slots: SharedSlots,
    node: NodeId,
    driver: DriverHandle,
    enabled: bool,
) {
    let mut silenced = false;
    if !enabled {
        return std::future::pending().await;
    }
    loop {
        let want = {
            let s = slots.lock().expect("lock");
            s.needs_resync(node) && s.status(node) == Some(NodeStatus::Recovery)
        };
        if want != silenced {
            if want {
                slots.lock().expect("lock").silences += 1;
            }
            driver.silence(want).await;
            silenced = want;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
