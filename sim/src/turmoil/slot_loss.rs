//! Lost replication slots and the resync they force, for T2.
//!
//! In production a node away too long finds its slot on a peer invalidated
//! (`max_slot_wal_keep_size`): that peer's stream cannot tell it what it
//! missed, so the node replaces its database with a donor's snapshot and
//! goes on catching up (`runtime/src/pg/resync.rs`). Here a crash may lose
//! the crashed node's slots on every peer; a catch-up stream a donor then
//! starts to it becomes a resync: wait until the joiner holds nothing
//! prepared, copy the donor's committed transactions, slots made again.
//! The checks at the end of a run (atomicity, durability, convergence) then
//! see whether the protocol around it kept every commit.

use mm_core::NodeId;
use mm_runtime::storage::MemCluster;
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
}

pub type SharedSlots = Arc<Mutex<Slots>>;

impl Slots {
    /// `node`'s slots on every other of the `n` nodes are lost.
    pub fn lose(&mut self, node: NodeId, n: usize) {
        for donor in (1..=n as NodeId).filter(|&d| d != node) {
            self.lost.insert((donor, node));
        }
    }

    pub fn is_lost(&self, donor: NodeId, joiner: NodeId) -> bool {
        self.lost.contains(&(donor, joiner))
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
        let waiting = cluster.db(donor).prepared.intersection(&running).count() > 0;
        // The joiner's own prepared: the resolver settles them; look again shortly.
        if waiting {
        } else if let Ok(rows) = cluster.resync(joiner, donor, upto_gen, broken) {
            let mut s = slots.lock().expect("lock");
            // The real resync makes the joiner's lost slots on every peer
            // again before it copies.
            s.lost.retain(|&(_, j)| j != joiner);
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
