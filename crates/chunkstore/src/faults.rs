//! Injected disk faults: a slow disk and a full disk, for `mendfs chaos` and its tests only.
//!
//! # Why this exists
//!
//! A chaos run must show that the cluster behaves when a disk is slow or full, on real processes,
//! without root (no tmpfs to fill, no device-mapper delay). So a store can be given a
//! [`FaultState`], a pair of atomics that the node sets from its fault control file, and the
//! store consults them where a real disk would make itself felt:
//!
//! - `chunk_io_delay_ms`: every call that reads or writes a chunk's bytes (`put`, `get`,
//!   `verify`, `quarantine`) first sleeps that long, on the calling (blocking) thread, under the
//!   same locks the disk work holds, the way a slow disk stalls the thread that waits on it.
//! - `chunk_store_full`: the step of `put` that fills the temp file fails with the operating
//!   system's "no space left" error, so the write takes exactly the path a real ENOSPC takes
//!   (temp file removed, [`ChunkError::DiskFull`](crate::ChunkError::DiskFull)). As on a real
//!   full disk, a put of a chunk whose good copy is already here still succeeds (it writes
//!   nothing), and reads keep working.
//!
//! # Inert unless allowed
//!
//! A store opened with [`ChunkStore::open`](crate::ChunkStore::open) has no `FaultState` and
//! never looks for one: each hook is one `Option` check. Only a node started with
//! `--allow-fault-injection` gives its store one (see `mendfs_node`'s fault control).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The faults in force now; all off by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultSettings {
    /// Milliseconds every chunk read and write waits before it starts (0: none).
    pub chunk_io_delay_ms: u64,
    /// Writes fail as on a full disk, and the node's health reports its disk full.
    pub chunk_store_full: bool,
}

/// The longest injected delay: a typo must not wedge a node's blocking threads for hours.
pub const CHUNK_IO_DELAY_MS_MAX: u64 = 60_000;

/// The faults a store (and the node's health report) consults, shared through an `Arc` and
/// changed while the node runs. Atomics, not a lock: the hooks sit on every chunk read and write.
#[derive(Debug, Default)]
pub struct FaultState {
    chunk_io_delay_ms: AtomicU64,
    chunk_store_full: AtomicBool,
}

impl FaultState {
    /// No faults, until [`FaultState::set`] says otherwise.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `settings` in force for every later call (a call already sleeping finishes its
    /// sleep). A delay above [`CHUNK_IO_DELAY_MS_MAX`] is cut to it.
    pub fn set(&self, settings: FaultSettings) {
        self.chunk_io_delay_ms.store(settings.chunk_io_delay_ms.min(CHUNK_IO_DELAY_MS_MAX), Ordering::Relaxed);
        self.chunk_store_full.store(settings.chunk_store_full, Ordering::Relaxed);
    }

    /// The faults in force now.
    pub fn get(&self) -> FaultSettings {
        FaultSettings {
            chunk_io_delay_ms: self.chunk_io_delay_ms.load(Ordering::Relaxed),
            chunk_store_full: self.chunk_store_full.load(Ordering::Relaxed),
        }
    }

    /// Whether writes are to fail as on a full disk.
    pub fn chunk_store_full(&self) -> bool {
        self.chunk_store_full.load(Ordering::Relaxed)
    }

    /// Sleeps for the injected chunk I/O delay, if any. Blocking: call it only where the disk
    /// work itself runs (a `spawn_blocking` closure), never on an async worker.
    pub(crate) fn delay_chunk_io(&self) {
        let delay_ms = self.chunk_io_delay_ms.load(Ordering::Relaxed);
        if delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(delay_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_set_as_given_with_the_delay_bounded() {
        let faults = FaultState::new();
        assert_eq!(faults.get(), FaultSettings::default());
        faults.set(FaultSettings { chunk_io_delay_ms: 5, chunk_store_full: true });
        assert_eq!(faults.get(), FaultSettings { chunk_io_delay_ms: 5, chunk_store_full: true });
        assert!(faults.chunk_store_full());
        faults.set(FaultSettings { chunk_io_delay_ms: u64::MAX, chunk_store_full: false });
        assert_eq!(faults.get(), FaultSettings { chunk_io_delay_ms: CHUNK_IO_DELAY_MS_MAX, chunk_store_full: false });
    }
}
