//! Virtual time and per-node clocks. The world runs on virtual
//! microseconds; each node sees its own skewed clock (offset plus a rate
//! drift), which stays monotonic so the core's `now` never goes backwards.

use mm_core::Time;

/// Virtual microseconds since the start of the run.
pub type VTime = u64;

pub const MS: VTime = 1_000;
pub const SEC: VTime = 1_000_000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    pub offset_us: u64,
    /// Rate drift in parts per million (> -1_000_000).
    pub drift_ppm: i64,
}

impl Clock {
    /// The node's reading at virtual time `t`.
    pub fn local(&self, t: VTime) -> Time {
        let drift = (t as i128 * self.drift_ppm as i128) / 1_000_000;
        Time((self.offset_us as i128 + t as i128 + drift).max(0) as u64)
    }

    /// The earliest virtual time at which the node's clock reads `>= local`.
    pub fn virtual_at(&self, local: Time) -> VTime {
        let l = local.0 as i128 - self.offset_us as i128;
        if l <= 0 {
            return 0;
        }
        let mut t = (l * 1_000_000 / (1_000_000 + self.drift_ppm as i128)).max(0) as u64;
        while t > 0 && self.local(t - 1) >= local {
            t -= 1;
        }
        while self.local(t) < local {
            t += 1;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_is_exact_and_monotonic() {
        for c in [
            Clock {
                offset_us: 0,
                drift_ppm: 0,
            },
            Clock {
                offset_us: 123_456,
                drift_ppm: 37_000,
            },
            Clock {
                offset_us: 5,
                drift_ppm: -42_000,
            },
        ] {
            let mut prev = Time(0);
            for t in (0..5_000_000u64).step_by(7_777) {
                let l = c.local(t);
                assert!(l >= prev);
                prev = l;
                let v = c.virtual_at(l);
                assert!(c.local(v) >= l && v <= t);
                if v > 0 {
                    assert!(c.local(v - 1) < l);
                }
            }
        }
    }
}
