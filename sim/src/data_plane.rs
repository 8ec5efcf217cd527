//! The data plane: one ordered stream per (origin, peer), like a logical
//! replication slot. Items are retained until delivered: partitions and
//! crashes never drop them, they only wait. Delivery needs the link up and
//! the receiver up and not paused (the world checks that).

use crate::db_model::Writes;
use mm_core::{Gid, NodeId};
use std::collections::VecDeque;

#[derive(Clone, Debug)]
pub enum DataItem {
    /// A prepared transaction of the stream's origin.
    Tx { gid: Gid, writes: Writes },
    /// A donor's catch-up batch: every committed tx of generations in
    /// `(from_gen, upto_gen)`, in the donor's commit order.
    Catchup {
        upto_gen: Option<u64>,
        txs: Vec<(Gid, Writes)>,
    },
}

#[derive(Clone, Debug, Default)]
pub struct Stream {
    pub queue: VecDeque<DataItem>,
    /// A delivery attempt is scheduled.
    pub scheduled: bool,
}

#[derive(Clone, Debug)]
pub struct DataPlane {
    n: usize,
    streams: Vec<Stream>,
}

impl DataPlane {
    pub fn new(n: usize) -> DataPlane {
        DataPlane {
            n,
            streams: vec![Stream::default(); (n + 1) * (n + 1)],
        }
    }

    fn idx(&self, from: NodeId, to: NodeId) -> usize {
        from as usize * (self.n + 1) + to as usize
    }

    pub fn stream(&mut self, from: NodeId, to: NodeId) -> &mut Stream {
        let i = self.idx(from, to);
        &mut self.streams[i]
    }

    /// Append; returns true if the caller must schedule a delivery attempt.
    pub fn push(&mut self, from: NodeId, to: NodeId, item: DataItem) -> bool {
        let s = self.stream(from, to);
        s.queue.push_back(item);
        if s.scheduled {
            false
        } else {
            s.scheduled = true;
            true
        }
    }

    pub fn is_drained(&self) -> bool {
        self.streams.iter().all(|s| s.queue.is_empty())
    }

    /// `(from, to, pending items)` of every non-empty stream.
    pub fn pending(&self) -> Vec<(NodeId, NodeId, usize)> {
        let mut v = Vec::new();
        for from in 1..=self.n as NodeId {
            for to in 1..=self.n as NodeId {
                let l = self.streams[self.idx(from, to)].queue.len();
                if l > 0 {
                    v.push((from, to, l));
                }
            }
        }
        v
    }
}
