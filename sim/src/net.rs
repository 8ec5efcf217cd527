//! Control-plane links between nodes and their faults: partitions (per
//! direction), clogging, reordering, duplication and loss. The world asks
//! the network what happens to each message it sends; the network only
//! holds link state and draws from its own rng stream.

use crate::time_util::VTime;
use mm_core::NodeId;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Swarm-chosen intensities of the message-level faults (0 = off).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MsgFaults {
    /// Probability of an extra random delay (which reorders).
    pub reorder_p: f64,
    pub reorder_max_us: u64,
    pub duplicate_p: f64,
    pub drop_p: f64,
}

/// What happens to one sent message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    Dropped,
    /// Delivery times (two when duplicated).
    Deliver(Vec<VTime>),
}

#[derive(Clone, Debug)]
pub struct Net {
    n: usize,
    /// `up[from][to]`: messages flow from → to.
    up: Vec<Vec<bool>>,
    /// Messages on from → to wait until this time.
    clog_until: Vec<Vec<VTime>>,
    /// FIFO per link unless reordered: the last scheduled delivery.
    last_delivery: Vec<Vec<VTime>>,
    pub base_latency_us: u64,
    pub jitter_us: u64,
    pub faults: MsgFaults,
    rng: ChaCha8Rng,
}

impl Net {
    pub fn new(n: usize, base_latency_us: u64, jitter_us: u64, rng: ChaCha8Rng) -> Net {
        let sz = n + 1;
        Net {
            n,
            up: vec![vec![true; sz]; sz],
            clog_until: vec![vec![0; sz]; sz],
            last_delivery: vec![vec![0; sz]; sz],
            base_latency_us,
            jitter_us,
            faults: MsgFaults::default(),
            rng,
        }
    }

    pub fn nodes(&self) -> usize {
        self.n
    }

    pub fn is_up(&self, from: NodeId, to: NodeId) -> bool {
        self.up[from as usize][to as usize]
    }

    pub fn set_link(&mut self, from: NodeId, to: NodeId, up: bool) {
        self.up[from as usize][to as usize] = up;
    }

    /// Both directions between every pair across the split go down.
    pub fn partition(&mut self, side_a: &[NodeId]) {
        for a in 1..=self.n as NodeId {
            for b in 1..=self.n as NodeId {
                if side_a.contains(&a) != side_a.contains(&b) {
                    self.set_link(a, b, false);
                }
            }
        }
    }

    /// Only links between ring neighbours stay up.
    pub fn ring(&mut self) {
        let n = self.n as NodeId;
        for a in 1..=n {
            for b in 1..=n {
                let d = (a as i32 - b as i32).rem_euclid(n as i32);
                if a != b && d != 1 && d != n as i32 - 1 {
                    self.set_link(a, b, false);
                }
            }
        }
    }

    pub fn clog(&mut self, from: NodeId, to: NodeId, until: VTime) {
        let c = &mut self.clog_until[from as usize][to as usize];
        *c = (*c).max(until);
    }

    pub fn clogged_until(&self, from: NodeId, to: NodeId) -> VTime {
        self.clog_until[from as usize][to as usize]
    }

    /// Every link up, no clogs, message faults off.
    pub fn heal(&mut self, now: VTime) {
        for row in &mut self.up {
            row.iter_mut().for_each(|u| *u = true);
        }
        for row in &mut self.clog_until {
            row.iter_mut().for_each(|c| *c = (*c).min(now));
        }
        self.faults = MsgFaults::default();
    }

    /// Decide a message's fate at send time.
    pub fn send(&mut self, now: VTime, from: NodeId, to: NodeId) -> Fate {
        if !self.is_up(from, to) {
            return Fate::Dropped;
        }
        let f = self.faults;
        if f.drop_p > 0.0 && self.rng.gen_bool(f.drop_p) {
            return Fate::Dropped;
        }
        let copies = if f.duplicate_p > 0.0 && self.rng.gen_bool(f.duplicate_p) {
            2
        } else {
            1
        };
        let mut times = Vec::with_capacity(copies);
        for _ in 0..copies {
            let mut t = now + self.base_latency_us + self.rng.gen_range(0..=self.jitter_us);
            if f.reorder_p > 0.0 && self.rng.gen_bool(f.reorder_p) {
                t += self.rng.gen_range(0..=f.reorder_max_us);
            } else {
                // TCP keeps order on a link.
                let last = &mut self.last_delivery[from as usize][to as usize];
                t = t.max(*last);
                *last = t;
            }
            times.push(t);
        }
        Fate::Deliver(times)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ring_keeps_neighbours_only() {
        let mut net = Net::new(5, 100, 0, ChaCha8Rng::seed_from_u64(1));
        net.ring();
        assert!(net.is_up(1, 2) && net.is_up(1, 5) && net.is_up(3, 4));
        assert!(!net.is_up(1, 3) && !net.is_up(2, 5));
        net.heal(0);
        assert!(net.is_up(1, 3));
    }

    #[test]
    fn partition_and_fifo() {
        let mut net = Net::new(3, 100, 50, ChaCha8Rng::seed_from_u64(2));
        net.partition(&[1]);
        assert_eq!(net.send(0, 1, 2), Fate::Dropped);
        assert!(net.is_up(2, 3));
        let mut last = 0;
        for i in 0..20 {
            match net.send(i, 2, 3) {
                Fate::Deliver(t) => {
                    assert!(t[0] >= last);
                    last = t[0];
                }
                Fate::Dropped => panic!(),
            }
        }
    }
}
