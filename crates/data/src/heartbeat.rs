//! Every node tells the metadata leader, once per interval, that it is alive and how it is
//! doing: disk, CPU, memory, its chunk store, and the error, scrub and repair counters. The
//! leader's failure detector (see `healer`) learns each node's rhythm from these arrivals.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mendfs_meta::MetaNode;
use mendfs_proto::v1 as pb;
use mendfs_worker::{Step, Worker, WorkerError};
use sysinfo::{ProcessesToUpdate, System};
use tonic::Request;

use crate::chunk_service::{Counters, LocalChunks};
use crate::healer::Healer;

/// Samples this node's health. Keeps its `System` between samples: CPU usage is measured
/// between two refreshes.
pub struct HealthSampler {
    system: System,
    measured_dir: PathBuf,
    storage: Option<Arc<LocalChunks>>,
}

impl HealthSampler {
    /// Measures the filesystem of the chunk store on a storage node (where new chunks go, and
    /// what placement cares about; it may be a mount of its own), of `data_dir` otherwise.
    pub fn new(data_dir: &Path, storage: Option<Arc<LocalChunks>>) -> Self {
        let measured = storage.as_ref().map_or(data_dir, |storage| storage.store.chunks_dir());
        let measured_dir = measured.canonicalize().unwrap_or_else(|_| measured.to_path_buf());
        Self { system: System::new(), measured_dir, storage }
    }

    /// The filesystem holding `measured_dir`: (total, available to this unprivileged process)
    /// bytes; None if the kernel cannot say (the directory is gone, say), which the detector
    /// treats as unknown rather than full.
    fn filesystem(&self) -> Option<(u64, u64)> {
        let stats = rustix::fs::statvfs(&self.measured_dir).ok()?;
        Some((stats.f_blocks.saturating_mul(stats.f_frsize), stats.f_bavail.saturating_mul(stats.f_frsize)))
    }

    pub fn sample(&mut self) -> pb::NodeHealth {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let rss_bytes = match sysinfo::get_current_pid() {
            Ok(pid) => {
                self.system.refresh_processes(ProcessesToUpdate::Some(&[pid]), true);
                self.system.process(pid).map_or(0, |process| process.memory())
            }
            Err(_) => 0,
        };
        let mut filesystem = self.filesystem();
        if self.storage.as_ref().is_some_and(|storage| storage.store.injected_faults().chunk_store_full) {
            // An injected full disk (chaos tests only): reported as a real one is, a filesystem
            // with no room left, so the detector and placement judge it exactly as they would.
            filesystem = filesystem.map(|(total, _)| (total, 0));
        }
        let mut health = pb::NodeHealth {
            cpu_percent: self.system.global_cpu_usage(),
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            rss_bytes,
            ..Default::default()
        };
        let capacity = self.storage.as_ref().and_then(|storage| storage.capacity_bytes);
        let stats = self.storage.as_ref().map(|storage| storage.store.stats());
        let chunk_bytes = stats.as_ref().map_or(0, |stats| stats.chunk_bytes);
        if let Some(fullness) = disk_fullness(filesystem, capacity, chunk_bytes) {
            health.disk_used_bytes = fullness.used_bytes;
            health.disk_capacity_bytes = fullness.capacity_bytes;
        }
        if let (Some(storage), Some(stats)) = (&self.storage, stats) {
            health.chunk_count = stats.chunk_count;
            health.chunk_bytes = stats.chunk_bytes;
            let c = &storage.counters;
            health.io_errors = Counters::get(&c.io_errors);
            health.checksum_errors = Counters::get(&c.checksum_errors);
            health.scrub_passes = Counters::get(&c.scrub_passes);
            health.scrub_checked_chunks = Counters::get(&c.scrub_checked_chunks);
            health.scrub_checked_bytes = Counters::get(&c.scrub_checked_bytes);
            health.repair_copied_chunks = Counters::get(&c.repair_copied_chunks);
            health.repair_copied_bytes = Counters::get(&c.repair_copied_bytes);
            health.repair_rebuilt_shards = Counters::get(&c.repair_rebuilt_shards);
            health.repair_rebuilt_bytes = Counters::get(&c.repair_rebuilt_bytes);
            health.repair_rebuild_read_bytes = Counters::get(&c.repair_rebuild_read_bytes);
        }
        health
    }
}

/// Sends this node's heartbeat once per interval to whichever node leads now (to its own
/// healer when it leads).
pub struct HeartbeatWorker {
    node: MetaNode,
    healer: Healer,
    sampler: Arc<Mutex<HealthSampler>>,
    interval: Duration,
}

impl HeartbeatWorker {
    pub fn new(node: MetaNode, healer: Healer, sampler: HealthSampler, interval: Duration) -> Self {
        Self { node, healer, sampler: Arc::new(Mutex::new(sampler)), interval }
    }
}

impl Worker for HeartbeatWorker {
    fn name(&self) -> String {
        "heartbeat".into()
    }

    async fn work(&mut self) -> Result<Step, WorkerError> {
        let started = Instant::now();
        let sampler = self.sampler.clone();
        let health = tokio::task::spawn_blocking(move || {
            sampler.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).sample()
        })
        .await
        .map_err(|e| format!("health sample: {e}"))?;
        if self.node.is_leader() {
            self.healer.record_heartbeat(self.node.id(), &health);
        } else if let Some(leader_addr) = self.node.leader_addr() {
            if let Err(e) = send(&self.node, &leader_addr, health, self.interval).await {
                // The detector on the leader is what notices missing heartbeats; here it is
                // only worth a debug line (a leader change makes a few of these).
                tracing::debug!(leader = %leader_addr, "heartbeat not delivered: {e}");
            }
        }
        // One heartbeat per interval, however long this one took (a late one is not doubled).
        Ok(Step::Idle(self.interval.saturating_sub(started.elapsed())))
    }
}

async fn send(node: &MetaNode, leader_addr: &str, health: pb::NodeHealth, interval: Duration) -> Result<(), String> {
    let peers = node.peers();
    let mut client =
        pb::health_client::HealthClient::with_interceptor(peers.channel(leader_addr)?, peers.interceptor());
    // A heartbeat older than the next one is worthless: give up on it when the next is due.
    let timeout = interval.max(Duration::from_millis(200));
    let mut request = Request::new(pb::HeartbeatRequest { node_id: node.id(), health: Some(health) });
    request.set_timeout(timeout);
    tokio::time::timeout(timeout, client.heartbeat(request))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|status| mendfs_proto::status_with_cause(&status))?;
    Ok(())
}

/// How full a node's storage is, as the detector judges it against `disk_full_ratio`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskFullness {
    pub used_bytes: u64,
    pub capacity_bytes: u64,
}

/// With an operator's cap, fullness is measured against the cap: the room left is what the cap
/// allows or what the filesystem still has, whichever is less. Without a cap it is the whole
/// filesystem's fullness, which on a shared disk also counts other programs' files.
/// `filesystem` is (total, available) bytes; None when neither is known.
pub fn disk_fullness(filesystem: Option<(u64, u64)>, capacity: Option<u64>, chunk_bytes: u64) -> Option<DiskFullness> {
    match capacity {
        Some(capacity) => {
            let fs_room = filesystem.map_or(u64::MAX, |(_, available)| available);
            let room = capacity.saturating_sub(chunk_bytes).min(fs_room);
            Some(DiskFullness { used_bytes: capacity - room, capacity_bytes: capacity })
        }
        None => filesystem.map(|(total, available)| DiskFullness {
            used_bytes: total.saturating_sub(available),
            capacity_bytes: total,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn an_injected_full_disk_is_reported_as_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let faults = Arc::new(mendfs_chunkstore::FaultState::new());
        let store = mendfs_chunkstore::ChunkStore::open(dir.path(), 1 << 20).expect("open store");
        let storage = Arc::new(LocalChunks::new(
            Arc::new(store.with_faults(faults.clone())),
            Duration::from_secs(60),
            Some(4 * GIB),
        ));
        let mut sampler = HealthSampler::new(dir.path(), Some(storage));
        let health = sampler.sample();
        assert!(health.disk_used_bytes < health.disk_capacity_bytes, "{health:?}");

        faults.set(mendfs_chunkstore::FaultSettings { chunk_store_full: true, ..Default::default() });
        let health = sampler.sample();
        assert_eq!((health.disk_used_bytes, health.disk_capacity_bytes), (4 * GIB, 4 * GIB));
    }

    #[test]
    fn without_a_cap_the_whole_filesystem_counts() {
        let full = disk_fullness(Some((100 * GIB, 5 * GIB)), None, GIB).unwrap();
        assert_eq!(full, DiskFullness { used_bytes: 95 * GIB, capacity_bytes: 100 * GIB });
        assert_eq!(disk_fullness(None, None, GIB), None);
    }

    #[test]
    fn with_a_cap_a_busy_shared_disk_with_room_to_spare_is_not_full() {
        // The host's disk is 95 % full with other files, but 5 GiB is plenty for a 4 GiB cap.
        let full = disk_fullness(Some((100 * GIB, 5 * GIB)), Some(4 * GIB), GIB).unwrap();
        assert_eq!(full, DiskFullness { used_bytes: GIB, capacity_bytes: 4 * GIB });
    }

    #[test]
    fn with_a_cap_the_lesser_room_binds() {
        // Chunks fill the cap...
        let full = disk_fullness(Some((100 * GIB, 50 * GIB)), Some(4 * GIB), 4 * GIB - 1).unwrap();
        assert_eq!(full.used_bytes, 4 * GIB - 1);
        // ...or the filesystem has less room than the cap would allow.
        let full = disk_fullness(Some((100 * GIB, GIB / 2)), Some(4 * GIB), GIB).unwrap();
        assert_eq!(full, DiskFullness { used_bytes: 4 * GIB - GIB / 2, capacity_bytes: 4 * GIB });
        // Over the cap (a cap lowered after the fact) saturates at full.
        let full = disk_fullness(None, Some(4 * GIB), 5 * GIB).unwrap();
        assert_eq!(full.used_bytes, 4 * GIB);
    }
}
