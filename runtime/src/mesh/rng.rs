//! The mesh's randomness (reconnect jitter, handshake nonces), injectable so
//! that a simulated network (turmoil) can replay a run from its seed.

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::sync::{Arc, Mutex, PoisonError};

/// Where the mesh draws random numbers. The default is the operating
/// system's randomness (production); [`MeshRng::seeded`] is for simulation
/// only: seeded nonces are predictable, so a seeded mesh must never face a
/// real network.
#[derive(Clone, Default)]
pub struct MeshRng(Option<Arc<Mutex<StdRng>>>);

impl MeshRng {
    /// OS randomness (`OsRng` for nonces, `thread_rng` for jitter).
    pub fn os() -> MeshRng {
        MeshRng(None)
    }

    /// A deterministic generator, for simulation.
    pub fn seeded(seed: u64) -> MeshRng {
        MeshRng(Some(Arc::new(Mutex::new(StdRng::seed_from_u64(seed)))))
    }

    pub fn is_seeded(&self) -> bool {
        self.0.is_some()
    }

    pub(crate) fn fill_bytes(&self, buf: &mut [u8]) {
        match &self.0 {
            None => rand::rngs::OsRng.fill_bytes(buf),
            Some(r) => r
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .fill_bytes(buf),
        }
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range_inclusive(&self, lo: u64, hi: u64) -> u64 {
        match &self.0 {
            None => rand::thread_rng().gen_range(lo..=hi),
            Some(r) => r
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .gen_range(lo..=hi),
        }
    }
}

impl std::fmt::Debug for MeshRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "MeshRng(seeded)"
        } else {
            "MeshRng(os)"
        })
    }
}
