//! Identifiers shared by every part of the protocol: nodes, node sets,
//! global transaction ids, ballots and virtual time.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A node's id, 1-based as in multimaster (`node_id = 1..=max_nodes`).
pub type NodeId = u8;

/// The largest cluster the bitmask [`NodeSet`] can hold.
pub const MAX_NODES: usize = 16;

/// Microseconds of the driver's clock. The core never reads a clock: every
/// call carries `now`, so a simulator can run virtual time.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Time(pub u64);

impl Time {
    pub const ZERO: Time = Time(0);
    pub fn from_millis(ms: u64) -> Time {
        Time(ms * 1000)
    }
    pub fn as_millis(self) -> u64 {
        self.0 / 1000
    }
    pub fn saturating_sub(self, other: Time) -> Time {
        Time(self.0.saturating_sub(other.0))
    }
}

impl std::ops::Add<Time> for Time {
    type Output = Time;
    fn add(self, rhs: Time) -> Time {
        Time(self.0 + rhs.0)
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}s", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// A set of node ids as a bitmask: `Copy`, totally ordered, and iterated in
/// ascending id order, so no decision ever depends on hash order.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct NodeSet(pub u32);

impl NodeSet {
    pub const EMPTY: NodeSet = NodeSet(0);

    /// Nodes `1..=n`.
    pub fn first_n(n: usize) -> NodeSet {
        assert!(n <= MAX_NODES, "at most {MAX_NODES} nodes");
        NodeSet(((1u32 << n) - 1) << 1)
    }
    pub fn single(id: NodeId) -> NodeSet {
        NodeSet(1 << id)
    }
    pub fn contains(self, id: NodeId) -> bool {
        (id as usize) < 32 && self.0 & (1 << id) != 0
    }
    pub fn insert(&mut self, id: NodeId) {
        self.0 |= 1 << id;
    }
    pub fn remove(&mut self, id: NodeId) {
        self.0 &= !(1 << id);
    }
    pub fn with(mut self, id: NodeId) -> NodeSet {
        self.insert(id);
        self
    }
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn union(self, o: NodeSet) -> NodeSet {
        NodeSet(self.0 | o.0)
    }
    pub fn intersect(self, o: NodeSet) -> NodeSet {
        NodeSet(self.0 & o.0)
    }
    pub fn minus(self, o: NodeSet) -> NodeSet {
        NodeSet(self.0 & !o.0)
    }
    pub fn is_subset(self, o: NodeSet) -> bool {
        self.0 & !o.0 == 0
    }
    pub fn min(self) -> Option<NodeId> {
        (self.0 != 0).then(|| self.0.trailing_zeros() as NodeId)
    }
    pub fn iter(self) -> impl Iterator<Item = NodeId> {
        (0..32u8).filter(move |i| self.0 & (1 << i) != 0)
    }
}

impl fmt::Display for NodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{")?;
        for (i, n) in self.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{n}")?;
        }
        write!(f, "}}")
    }
}

impl FromIterator<NodeId> for NodeSet {
    fn from_iter<I: IntoIterator<Item = NodeId>>(it: I) -> Self {
        let mut s = NodeSet::EMPTY;
        for n in it {
            s.insert(n);
        }
        s
    }
}

/// Global transaction id, `mm-<origin>-<boot>.<seq>-<generation>` on the
/// wire and in `PREPARE TRANSACTION`. `boot` (a durable restart counter) keeps
/// ids unique across restarts without persisting every sequence number; the
/// generation tells every participant which membership the transaction
/// belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Gid {
    pub origin: NodeId,
    pub boot: u32,
    pub seq: u32,
    pub gen: u64,
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mm-{}-{}.{}-{}",
            self.origin, self.boot, self.seq, self.gen
        )
    }
}

/// Why a string is not a gid of ours (PostgreSQL holds gids of other tools too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidParseError(pub String);

impl fmt::Display for GidParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not an mm gid: {:?}", self.0)
    }
}
impl std::error::Error for GidParseError {}

impl FromStr for Gid {
    type Err = GidParseError;
    fn from_str(s: &str) -> Result<Gid, GidParseError> {
        let err = || GidParseError(s.to_string());
        let rest = s.strip_prefix("mm-").ok_or_else(err)?;
        let mut parts = rest.split('-');
        let origin = parts.next().ok_or_else(err)?.parse().map_err(|_| err())?;
        let bs = parts.next().ok_or_else(err)?;
        let gen = parts.next().ok_or_else(err)?.parse().map_err(|_| err())?;
        if parts.next().is_some() {
            return Err(err());
        }
        let (b, q) = bs.split_once('.').ok_or_else(err)?;
        Ok(Gid {
            origin,
            boot: b.parse().map_err(|_| err())?,
            seq: q.parse().map_err(|_| err())?,
            gen,
        })
    }
}

/// A resolver ballot. Ballot zero belongs to the transaction's coordinator
/// (its precommit); resolvers use `round >= 1`, and the node id makes two
/// resolvers' ballots distinct.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Ballot {
    pub round: u32,
    pub node: NodeId,
}

impl Ballot {
    pub const COORDINATOR: Ballot = Ballot { round: 0, node: 0 };
}

impl fmt::Display for Ballot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.round, self.node)
    }
}

/// Handle of a client session, chosen by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientId(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_round_trips_through_text() {
        let g = Gid {
            origin: 3,
            boot: 2,
            seq: 77,
            gen: 12,
        };
        assert_eq!(g.to_string(), "mm-3-2.77-12");
        assert_eq!("mm-3-2.77-12".parse::<Gid>().unwrap(), g);
        for bad in [
            "",
            "mm-",
            "mm-3-2-12",
            "mm-x-2.1-1",
            "pg-3-2.7-1",
            "mm-3-2.7-1-9",
        ] {
            assert!(bad.parse::<Gid>().is_err(), "{bad}");
        }
    }

    #[test]
    fn node_set_iterates_in_order() {
        let s: NodeSet = [5, 1, 3].into_iter().collect();
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![1, 3, 5]);
        assert_eq!(
            NodeSet::first_n(3).iter().collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(s.min(), Some(1));
        assert!(NodeSet::single(3).is_subset(s));
        assert_eq!(s.to_string(), "{1,3,5}");
    }
}
