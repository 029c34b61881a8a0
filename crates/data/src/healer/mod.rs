//! What the metadata leader does to keep data safe on its own: it listens to heartbeats, runs
//! the failure detector, commits the liveness decisions that start work, and repairs. Every
//! node runs a healer; it acts only while its node leads.
//!
//! - `detection`: every heartbeat feeds a phi-accrual detector (`mendfs_heal::detector`). The
//!   detector is soft state of one leadership term: a new leader starts with fresh arrival
//!   windows (a grace period), so a leader change never declares healthy nodes down. Only the
//!   transitions that change what the cluster does are committed through Raft: `down` (repair
//!   starts), `degraded` (no new chunks), and `up` again, which needs a heartbeat this leader
//!   actually received. Suspicion stays soft.
//! - `repair`: every scan reads the chunk map, asks the pure planner and repair core
//!   (`mendfs_heal::planner`, `mendfs_heal::repair`) what each chunk needs, and runs the most
//!   urgent copies, throttled by bytes per second and copies in flight. A target node pulls each
//!   copy from a healthy source and verifies it; the leader commits finished copies in small
//!   batches, which is the checkpoint a new leader resumes from. Replicas that are no longer
//!   needed are dropped from the records only once enough other copies exist.
//! - `health_view`: the leader's view of the cluster's health (liveness, each node's reported
//!   health, the latest scan, the repair rate), owned here, where it is produced;
//!   `cluster status`, the metrics and the `Health` service read it from the healer.
//! - `health_service`: the `Health` gRPC service, where heartbeats arrive.
//! - the timeline (`mendfs_heal::timeline`): what detection saw happen (state changes, repair
//!   jobs, redundancy lost and restored), committed through Raft after each tick that saw
//!   something, so every node holds it and `cluster status` carries it for the dashboard.

mod detection;
mod health_service;
mod health_view;
mod repair;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mendfs_heal::detector::{Detector, DetectorConfig, HealthReport};
use mendfs_heal::repair::{RepairRate, ScanSummary, Throttle};
use mendfs_meta::MetaNode;
use mendfs_proto::v1 as pb;
use mendfs_types::NodeId;
use mendfs_worker::{Background, OnFailure};

pub use health_service::HealthApi;
pub use health_view::{HealthSnapshot, NodeHealthView};
pub use mendfs_heal::timeline::{ClusterEvent, EventKind, TIMELINE_EVENTS_MAX};

#[derive(Debug, Clone)]
pub struct HealerConfig {
    pub detector: DetectorConfig,
    pub replication_factor: usize,
    /// How often the leader re-reads the chunk map for repair work.
    pub scan_interval: Duration,
    /// Repair copy bandwidth, cluster-wide (0: unlimited).
    pub repair_bytes_per_sec: u64,
    pub repair_copies_in_flight: usize,
    /// The prepare grace period: a repair copy is protected from collection this long.
    pub orphan_grace: Duration,
}

impl Default for HealerConfig {
    fn default() -> Self {
        Self {
            detector: DetectorConfig::default(),
            replication_factor: 3,
            scan_interval: Duration::from_secs(1),
            repair_bytes_per_sec: 128 << 20,
            repair_copies_in_flight: 8,
            orphan_grace: Duration::from_millis(mendfs_meta::PREPARE_GRACE_MS),
        }
    }
}

/// The detector's state for one leadership term.
struct Term {
    term: u64,
    detector: Detector,
    reports: BTreeMap<NodeId, pb::NodeHealth>,
}

/// The healer's soft state, shared by its workers and services.
#[derive(Default)]
struct Shared {
    term: Option<Term>,
    /// The latest scan and the term it was made in: no view is published before this
    /// leader's first scan, so a new leader never reports "0 under-replicated" unscanned.
    scan: Option<(u64, ScanSummary)>,
    repaired: RepairRate,
    /// What detection last published; None while this node does not lead.
    published: Option<HealthSnapshot>,
    /// What detection saw change this term, until it is committed.
    timeline: mendfs_heal::timeline::Timeline,
}

/// The leader's healer; cheap to clone.
#[derive(Clone)]
pub struct Healer {
    node: MetaNode,
    config: Arc<HealerConfig>,
    shared: Arc<Mutex<Shared>>,
    throttle: Arc<Mutex<Throttle>>,
    /// The detector's clock: milliseconds since the healer started.
    epoch: Instant,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Soft state of plain values: a panic elsewhere mid-update must not stop healing.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Healer {
    pub fn new(node: MetaNode, config: HealerConfig) -> Self {
        let throttle = Arc::new(Mutex::new(Throttle::new(config.repair_bytes_per_sec)));
        Self { node, config: Arc::new(config), shared: Arc::default(), throttle, epoch: Instant::now() }
    }

    /// Runs the detector and repair loops as workers of the node.
    pub fn spawn_workers(&self, background: &Background) {
        background.spawn_worker(detection::DetectionWorker { healer: self.clone() }, OnFailure::Restart);
        background.spawn_worker(repair::RepairWorker { healer: self.clone() }, OnFailure::Restart);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// The detector of the current term, created fresh when the term changed.
    fn term_state<'a>(&self, shared: &'a mut Shared, term: u64) -> &'a mut Term {
        if shared.term.as_ref().is_some_and(|t| t.term != term) {
            shared.term = None;
        }
        shared.term.get_or_insert_with(|| {
            tracing::info!(term, "leading: failure detector starts with fresh arrival windows");
            Term { term, detector: Detector::new(self.config.detector.clone()), reports: BTreeMap::new() }
        })
    }

    /// A heartbeat arrived (or this node, leading, sampled itself).
    pub fn record_heartbeat(&self, node_id: NodeId, health: &pb::NodeHealth) {
        let term = self.node.term();
        let now = self.now_ms();
        let report = HealthReport {
            disk_used_bytes: health.disk_used_bytes,
            disk_capacity_bytes: health.disk_capacity_bytes,
            io_errors: health.io_errors,
        };
        let mut shared = self.shared();
        let state = self.term_state(&mut shared, term);
        state.detector.heartbeat(node_id, now, &report);
        state.reports.insert(node_id, *health);
    }

    /// The cluster's health as this node sees it while leading: None on a follower, and on a
    /// new leader until its first scan. The repair job comes from the committed state.
    pub fn health_view(&self) -> Result<Option<HealthSnapshot>, mendfs_meta::ApiError> {
        if !self.node.is_leader() {
            return Ok(None);
        }
        let Some(mut snapshot) = self.shared().published.clone() else { return Ok(None) };
        snapshot.repair_job = self.node.repair_job()?;
        snapshot.repair_throttle_bytes_per_sec = self.config.repair_bytes_per_sec;
        Ok(Some(snapshot))
    }
}
