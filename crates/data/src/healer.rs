//! What the metadata leader does to keep data safe on its own: it listens to heartbeats, runs
//! the failure detector, commits the liveness decisions that start work, and repairs.
//!
//! - Detection: every heartbeat feeds a phi-accrual detector (`mendfs_heal::detector`). The
//!   detector is soft state of one leadership term: a new leader starts with fresh arrival
//!   windows (a grace period), so a leader change never declares healthy nodes down. Only the
//!   transitions that change what the cluster does are committed through Raft: `down` (repair
//!   starts), `degraded` (no new chunks), and `up` again, which needs a heartbeat this leader
//!   actually received. Suspicion stays soft.
//! - Repair: every scan reads the chunk map, asks the pure planner (`mendfs_heal::planner`) what
//!   each chunk needs, and runs the most urgent copies (fewest live copies first), throttled by
//!   bytes per second and copies in flight. A target node pulls each copy from a healthy source
//!   and verifies it; the leader commits finished copies in small batches (`AddReplicas`), which
//!   is the checkpoint: a new leader re-plans from the records and redoes only what was not
//!   recorded, and a copy already present is not pulled again. Replicas that are no longer
//!   needed (on down or drained nodes, or surplus) are dropped from the records only once enough
//!   other copies exist; storage nodes then collect the unlisted files (see `gc`).

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mendfs_heal::detector::{Detector, DetectorConfig, HealthReport, Liveness};
use mendfs_heal::planner::{urgency, ClusterView, CopyTask, DropTask};
use mendfs_meta::files::{self, RepairJob, ReplicaAdded, ReplicaDrop, StorageNode};
use mendfs_meta::health::{HealthSnapshot, NodeHealthReport, NodeHealthView, ScanSummary};
use mendfs_meta::node::now_ms;
use mendfs_meta::state::Command;
use mendfs_meta::MetaNode;
use mendfs_proto::v1 as pb;
use tokio::sync::{mpsc, Semaphore};
use tonic::{Request, Response, Status};
use tracing::Instrument;

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
            orphan_grace: Duration::from_millis(files::PREPARE_GRACE_MS),
        }
    }
}

/// Copies planned per scan at most: the most urgent ones; the next scan finds the rest. Keeps
/// the planner's memory bounded however large the chunk map is.
const COPIES_PER_SCAN_MAX: usize = 2_048;
const DROPS_PER_SCAN_MAX: usize = 8_192;
/// Finished copies are committed after this many, or this long, whichever comes first: the
/// granularity of the checkpoint a new leader resumes from.
const CHECKPOINT_COPIES: usize = 16;
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
const DROPS_PER_ENTRY: usize = 512;
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(60);
/// The window over which the repair rate is measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The detector's state for one leadership term.
struct Term {
    term: u64,
    detector: Detector,
    reports: BTreeMap<u64, NodeHealthReport>,
}

#[derive(Default)]
struct Shared {
    term: Option<Term>,
    /// The latest scan and the term it was made in: no view is published before this
    /// leader's first scan, so a new leader never reports "0 under-replicated" unscanned.
    scan: Option<(u64, ScanSummary)>,
    repaired: VecDeque<(Instant, u64)>,
}

/// The leader's healer; cheap to clone. Every node runs one, and it acts only while its node
/// leads.
#[derive(Clone)]
pub struct Healer {
    node: MetaNode,
    config: Arc<HealerConfig>,
    shared: Arc<Mutex<Shared>>,
    throttle: Arc<Mutex<Throttle>>,
    epoch: Instant,
}

impl Healer {
    pub fn new(node: MetaNode, config: HealerConfig) -> Self {
        let throttle = Arc::new(Mutex::new(Throttle::new(config.repair_bytes_per_sec)));
        Self { node, config: Arc::new(config), shared: Arc::default(), throttle, epoch: Instant::now() }
    }

    fn throttle(&self) -> std::sync::MutexGuard<'_, Throttle> {
        // The bucket is plain numbers; a panic elsewhere cannot leave it unusable.
        self.throttle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        // Poisoning only means another task panicked mid-update of soft state; carry on.
        self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

    pub fn record_heartbeat(&self, node_id: u64, health: &pb::NodeHealth) {
        let term = self.node.raft.metrics().borrow().current_term;
        let now = self.now();
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

    /// Runs forever: the detector loop and the repair loop.
    pub async fn run(self) {
        tokio::join!(self.clone().detect_forever(), self.repair_forever());
    }

    async fn detect_forever(self) {
        const TICK: Duration = Duration::from_millis(100);
        loop {
            tokio::time::sleep(TICK).await;
            if !self.node.is_leader() {
                self.shared().term = None;
                if let Ok(mut published) = self.node.health.lock() {
                    *published = None;
                }
                continue;
            }
            if let Err(e) = self.detect_once().await {
                tracing::warn!("failure detection: {e}");
            }
        }
    }

    async fn detect_once(&self) -> Result<(), String> {
        let term = self.node.raft.metrics().borrow().current_term;
        let members: BTreeSet<u64> = {
            let metrics = self.node.raft.metrics().borrow().clone();
            metrics.membership_config.membership().nodes().map(|(id, _)| *id).collect()
        };
        let storage: BTreeMap<u64, StorageNode> =
            self.node.storage_nodes().map_err(|e| e.to_string())?.into_iter().map(|n| (n.id, n)).collect();
        let now = self.now();
        let (assessments, snapshot) = {
            let mut shared = self.shared();
            let scan = match &shared.scan {
                Some((scanned_term, scan)) if *scanned_term == term => Some(scan.clone()),
                _ => None,
            };
            let rate = repair_rate(&mut shared.repaired);
            let state = self.term_state(&mut shared, term);
            let expected: BTreeSet<u64> = members.iter().chain(storage.keys()).copied().collect();
            for id in &expected {
                state.detector.watch(*id, now);
            }
            let gone: Vec<u64> = state.detector.tracked().filter(|id| !expected.contains(id)).collect();
            for id in gone {
                state.detector.forget(id);
                state.reports.remove(&id);
            }
            let assessments = state.detector.evaluate(now);
            let nodes = assessments
                .iter()
                .map(|a| NodeHealthView {
                    node_id: a.node,
                    // A node this leader has not heard from keeps its committed `down` until
                    // it is heard: a fresh window must not make a dead node look alive.
                    liveness: match storage.get(&a.node) {
                        Some(n) if n.liveness == Liveness::Down && a.last_heartbeat_age_ms.is_none() => Liveness::Down,
                        _ => a.liveness,
                    },
                    phi: a.phi,
                    heartbeat_age_ms: a.last_heartbeat_age_ms,
                    reason: a.reason.clone(),
                    health: state.reports.get(&a.node).copied(),
                })
                .collect();
            let snapshot =
                scan.map(|scan| HealthSnapshot { nodes, scan, repair_bytes_per_sec: rate, repair_job: None });
            (assessments, snapshot)
        };
        if let Ok(mut published) = self.node.health.lock() {
            *published = snapshot;
        }
        for assessment in assessments {
            let Some(node) = storage.get(&assessment.node) else { continue };
            let decided = match assessment.liveness {
                Liveness::Suspect => continue,
                // `up` needs evidence: a heartbeat this leader received.
                Liveness::Up if assessment.last_heartbeat_age_ms.is_none() => continue,
                other => other,
            };
            if decided == node.liveness {
                continue;
            }
            match decided {
                Liveness::Down => tracing::warn!(node = node.id, reason = %assessment.reason, "storage node down"),
                Liveness::Degraded => {
                    tracing::warn!(node = node.id, reason = %assessment.reason, "storage node degraded")
                }
                _ => tracing::info!(node = node.id, was = %node.liveness, "storage node up"),
            }
            let command = Command::SetNodeLiveness { node_id: node.id, liveness: decided };
            self.node.execute(None, command).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn repair_forever(self) {
        let mut pause = self.config.scan_interval;
        loop {
            tokio::time::sleep(pause).await;
            pause = self.config.scan_interval;
            if !self.node.is_leader() {
                continue;
            }
            match self.repair_once().await {
                // Work done changes what the next scan finds (copies made allow drops; drops
                // finish the job): scan again at once rather than leave redundancy waiting.
                Ok(true) => pause = Duration::from_millis(20),
                Ok(false) => {}
                Err(e) => tracing::warn!("repair: {e}"),
            }
        }
    }

    /// One scan of the chunk map and one round of the work it found; says whether it did any.
    pub async fn repair_once(&self) -> Result<bool, String> {
        let term = self.node.raft.metrics().borrow().current_term;
        let storage = self.node.storage_nodes().map_err(|e| e.to_string())?;
        let addresses: HashMap<u64, String> = storage.iter().map(|n| (n.id, n.addr.clone())).collect();
        let cluster = ClusterView::new(storage.iter().map(crate::node_state).collect(), self.config.replication_factor);
        let node = self.node.clone();
        let (summary, copies, drops, job) = tokio::task::spawn_blocking(move || scan(&node, &cluster))
            .await
            .map_err(|e| format!("scan task: {e}"))??;
        let planned_bytes: u64 = copies.iter().map(|c| c.size).sum();
        self.shared().scan = Some((term, summary.clone()));

        // A round with work is a trace of its own (the copies and their pulls nest under it);
        // the idle rounds, one a second, are not recorded.
        let round = if copies.is_empty() && drops.is_empty() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                "repair_round",
                copies = copies.len(),
                bytes = planned_bytes,
                drops = drops.len(),
                error = tracing::field::Empty,
            )
        };
        let result =
            self.repair_round(&storage, &addresses, (summary, copies, drops, job)).instrument(round.clone()).await;
        if let Err(e) = &result {
            round.record("error", e.as_str());
        }
        result
    }

    async fn repair_round(
        &self,
        storage: &[StorageNode],
        addresses: &HashMap<u64, String>,
        (summary, copies, drops, job): ScanResult,
    ) -> Result<bool, String> {
        let planned_bytes: u64 = copies.iter().map(|c| c.size).sum();
        let job_before = job.clone();
        let job = self.update_job(job, storage, &summary, copies.len() as u64, planned_bytes).await?;
        let job_changed = job_before.filter(|j| j.finished_ms.is_none()).map(|j| j.id) != job.as_ref().map(|j| j.id);
        // Failed copies are not progress: retrying them at once would only spin.
        let mut worked = !drops.is_empty() || job_changed;
        for batch in drops.chunks(DROPS_PER_ENTRY) {
            let drops = batch
                .iter()
                .map(|d| ReplicaDrop { hash: d.hash.to_vec(), node: d.node, keep: d.keep.clone() })
                .collect();
            self.node.execute(None, Command::DropReplicas { drops }).await.map_err(|e| e.to_string())?;
        }
        if !copies.is_empty() {
            worked |= self.copy_all(copies, addresses, job.map(|j| j.id)).await? > 0;
        }
        Ok(worked)
    }

    /// Starts, extends or finishes the checkpointed repair job to match what the scan found.
    async fn update_job(
        &self,
        job: Option<RepairJob>,
        storage: &[StorageNode],
        summary: &ScanSummary,
        planned_copies: u64,
        planned_bytes: u64,
    ) -> Result<Option<RepairJob>, String> {
        let previous_id = job.as_ref().map_or(0, |j| j.id);
        let active = job.filter(|j| j.finished_ms.is_none());
        let next = match (active, planned_copies) {
            (None, 0) => return Ok(None),
            (Some(mut job), 0) => {
                job.finished_ms = Some(now_ms());
                job.total_copies = job.done_copies;
                job.total_bytes = job.done_bytes;
                tracing::info!(job = job.id, copies = job.done_copies, bytes = job.done_bytes, "repair finished");
                job
            }
            (Some(mut job), _) => {
                let (copies, bytes) = (job.done_copies + planned_copies, job.done_bytes + planned_bytes);
                if (copies, bytes) == (job.total_copies, job.total_bytes) {
                    return Ok(Some(job));
                }
                job.total_copies = copies;
                job.total_bytes = bytes;
                job
            }
            (None, _) => {
                let job = RepairJob {
                    id: previous_id + 1,
                    started_ms: now_ms(),
                    reason: repair_reason(storage, summary),
                    total_copies: planned_copies,
                    total_bytes: planned_bytes,
                    done_copies: 0,
                    done_bytes: 0,
                    finished_ms: None,
                };
                tracing::info!(job = job.id, reason = %job.reason, copies = planned_copies, bytes = planned_bytes, "repair started");
                job
            }
        };
        self.node.execute(None, Command::RecordRepairJob(next.clone())).await.map_err(|e| e.to_string())?;
        Ok(Some(next).filter(|j| j.finished_ms.is_none()))
    }

    /// Runs the copies, throttled, committing finished ones in small batches; returns how many
    /// succeeded.
    async fn copy_all(
        &self,
        copies: Vec<CopyTask>,
        addresses: &HashMap<u64, String>,
        job_id: Option<u64>,
    ) -> Result<usize, String> {
        let (done_tx, mut done_rx) = mpsc::channel::<(ReplicaAdded, u64)>(CHECKPOINT_COPIES * 4);
        let slots = Arc::new(Semaphore::new(self.config.repair_copies_in_flight.max(1)));
        let dispatcher = {
            let healer = self.clone();
            let addresses = addresses.clone();
            tokio::spawn(
                async move {
                    for copy in copies {
                        if !healer.node.is_leader() {
                            return;
                        }
                        let wait = healer.throttle().reserve(Instant::now(), copy.size);
                        tokio::time::sleep(wait).await;
                        let Ok(slot) = slots.clone().acquire_owned().await else { return };
                        let healer = healer.clone();
                        let addresses = addresses.clone();
                        let done_tx = done_tx.clone();
                        tokio::spawn(
                            async move {
                                let _slot = slot;
                                match healer.replicate(&copy, &addresses).await {
                                    Ok(copied_bytes) => {
                                        let added = ReplicaAdded { hash: copy.hash.to_vec(), node: copy.target };
                                        let _ = done_tx.send((added, copied_bytes)).await;
                                    }
                                    Err(e) => tracing::warn!(target_node = copy.target, "repair copy failed: {e}"),
                                }
                            }
                            .in_current_span(),
                        );
                    }
                }
                .in_current_span(),
            )
        };
        let mut batch = Vec::new();
        let mut succeeded = 0;
        let mut ticker = tokio::time::interval(CHECKPOINT_INTERVAL);
        loop {
            tokio::select! {
                done = done_rx.recv() => match done {
                    Some((added, bytes)) => {
                        succeeded += 1;
                        self.shared().repaired.push_back((Instant::now(), bytes));
                        batch.push(added);
                        if batch.len() >= CHECKPOINT_COPIES {
                            self.checkpoint(&mut batch, job_id).await?;
                        }
                    }
                    None => break,
                },
                _ = ticker.tick() => self.checkpoint(&mut batch, job_id).await?,
            }
        }
        self.checkpoint(&mut batch, job_id).await?;
        dispatcher.await.map_err(|e| format!("repair dispatcher: {e}"))?;
        Ok(succeeded)
    }

    async fn checkpoint(&self, batch: &mut Vec<ReplicaAdded>, job_id: Option<u64>) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        let added = std::mem::take(batch);
        self.node.execute(None, Command::AddReplicas { job_id, added }).await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Asks the target to pull the chunk from a source; returns the bytes it copied (0 if it
    /// already had the chunk).
    async fn replicate(&self, copy: &CopyTask, addresses: &HashMap<u64, String>) -> Result<u64, String> {
        let span = tracing::info_span!(
            "repair_copy",
            peer = copy.target,
            chunk = %hex_prefix(&copy.hash),
            bytes = copy.size,
            error = tracing::field::Empty,
        );
        let result = self.replicate_unlogged(copy, addresses).instrument(span.clone()).await;
        if let Err(e) = &result {
            span.record("error", e.as_str());
        }
        result
    }

    async fn replicate_unlogged(&self, copy: &CopyTask, addresses: &HashMap<u64, String>) -> Result<u64, String> {
        let target = addresses.get(&copy.target).ok_or_else(|| format!("node {} has no address", copy.target))?;
        let source_addrs = copy.sources.iter().filter_map(|id| addresses.get(id).cloned()).collect();
        let channel = self.node.peers.channel(target)?;
        let mut client = pb::storage_client::StorageClient::with_interceptor(channel, self.node.peers.interceptor());
        let mut request = Request::new(pb::ReplicateChunkRequest {
            hash: copy.hash.to_vec(),
            source_addrs,
            grace_ms: self.config.orphan_grace.as_millis() as u64,
        });
        request.set_timeout(REPLICATE_TIMEOUT);
        let reply = tokio::time::timeout(REPLICATE_TIMEOUT, client.replicate_chunk(request))
            .await
            .map_err(|_| format!("no answer within {REPLICATE_TIMEOUT:?}"))?
            .map_err(|status| mendfs_meta::network::status_with_cause(&status))?;
        Ok(reply.into_inner().copied_bytes)
    }
}

/// Copy tasks ordered by the planner's urgency (fewest live copies first, then the largest
/// deficit), so a bounded heap keeps the most urgent.
struct Urgent(Urgency, CopyTask);
type Urgency = (usize, std::cmp::Reverse<usize>);
impl PartialEq for Urgent {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0 && self.1.hash == other.1.hash && self.1.target == other.1.target
    }
}
impl Eq for Urgent {}
impl PartialOrd for Urgent {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Urgent {
    // A max-heap whose top is the least urgent task, so it is the one evicted when full.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, self.1.hash, self.1.target).cmp(&(other.0, other.1.hash, other.1.target))
    }
}

type ScanResult = (ScanSummary, Vec<CopyTask>, Vec<DropTask>, Option<RepairJob>);

/// Reads the chunk map once and plans every chunk, keeping the most urgent work.
fn scan(node: &MetaNode, cluster: &ClusterView) -> Result<ScanResult, String> {
    let view = node.state.view().map_err(|e| e.to_string())?;
    let mut summary = ScanSummary::default();
    let mut urgent: BinaryHeap<Urgent> = BinaryHeap::new();
    let mut drops = Vec::new();
    let mut failure = None;
    files::for_each_chunk(&view, |hash, record| {
        let Ok(hash) = <[u8; 32]>::try_from(hash) else {
            failure = Some(format!("a chunk key of {} bytes in the chunk map", hash.len()));
            return false;
        };
        summary.chunks += 1;
        for node in &record.replicas {
            *summary.chunks_listed.entry(*node).or_default() += 1;
        }
        let plan = cluster.plan_chunk(&hash, record.size, &record.replicas);
        if plan.live < cluster.replication_factor() {
            summary.under_replicated += 1;
        }
        if !plan.drops.is_empty() {
            summary.over_replicated += 1;
        }
        summary.lost += u64::from(plan.lost);
        summary.unplaceable += plan.unplaceable as u64;
        let key = urgency(&plan);
        for copy in plan.copies {
            urgent.push(Urgent(key, copy));
            if urgent.len() > COPIES_PER_SCAN_MAX {
                urgent.pop();
            }
        }
        for drop in plan.drops {
            if drops.len() < DROPS_PER_SCAN_MAX {
                drops.push(drop);
            }
        }
        true
    })
    .map_err(|e| e.to_string())?;
    if let Some(failure) = failure {
        return Err(failure);
    }
    let copies = urgent.into_sorted_vec().into_iter().map(|Urgent(_, copy)| copy).collect();
    let job = files::repair_job(&view).map_err(|e| e.to_string())?;
    Ok((summary, copies, drops, job))
}

fn repair_reason(storage: &[StorageNode], summary: &ScanSummary) -> String {
    let mut reasons: Vec<String> = Vec::new();
    for node in storage {
        if node.liveness == Liveness::Down {
            reasons.push(format!("node {} down", node.id));
        }
        if node.draining {
            reasons.push(format!("node {} draining", node.id));
        }
    }
    if reasons.is_empty() {
        reasons.push(format!("{} under-replicated chunks", summary.under_replicated));
    }
    reasons.join(", ")
}

fn repair_rate(repaired: &mut VecDeque<(Instant, u64)>) -> f64 {
    while repaired.front().is_some_and(|(at, _)| at.elapsed() > RATE_WINDOW) {
        repaired.pop_front();
    }
    let bytes: u64 = repaired.iter().map(|(_, bytes)| bytes).sum();
    bytes as f64 / RATE_WINDOW.as_secs_f64()
}

/// A token bucket over bytes: lets a burst of one second through, then holds the average.
/// One per healer, kept across repair rounds: a bucket made afresh each round would let a full
/// second's burst through every round, and short rounds would run far over the rate.
struct Throttle {
    bytes_per_sec: f64,
    tokens: f64,
    refilled: Option<Instant>,
}

impl Throttle {
    fn new(bytes_per_sec: u64) -> Self {
        Self { bytes_per_sec: bytes_per_sec as f64, tokens: bytes_per_sec as f64, refilled: None }
    }

    /// Takes `bytes` at `now`; returns how long to wait before sending them (zero within the
    /// burst). The debt of a wait is carried, so the average holds whatever the sizes.
    fn reserve(&mut self, now: Instant, bytes: u64) -> Duration {
        if self.bytes_per_sec <= 0.0 {
            return Duration::ZERO;
        }
        let burst = self.bytes_per_sec;
        let elapsed = self.refilled.map_or(0.0, |refilled| now.saturating_duration_since(refilled).as_secs_f64());
        self.tokens = (self.tokens + elapsed * self.bytes_per_sec).min(burst);
        self.refilled = Some(now);
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            Duration::from_secs_f64(-self.tokens / self.bytes_per_sec)
        } else {
            Duration::ZERO
        }
    }
}

/// The `Health` service: heartbeats arrive here on the leader.
pub struct HealthApi {
    pub healer: Healer,
}

#[tonic::async_trait]
impl pb::health_server::Health for HealthApi {
    async fn heartbeat(&self, request: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatReply>, Status> {
        let node = &self.healer.node;
        if !node.is_leader() {
            return Err(Status::failed_precondition(format!(
                "node {} is not the leader (leader: {:?})",
                node.config.node_id,
                node.leader_id()
            )));
        }
        let request = request.into_inner();
        let health = request.health.unwrap_or_default();
        self.healer.record_heartbeat(request.node_id, &health);
        Ok(Response::new(pb::HeartbeatReply {}))
    }
}

/// The first 8 bytes of a chunk hash in hex: enough to recognize a chunk in a trace.
fn hex_prefix(hash: &[u8]) -> String {
    hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_lets_one_second_through_then_holds_the_rate() {
        let start = Instant::now();
        let mut throttle = Throttle::new(100);
        assert_eq!(throttle.reserve(start, 100), Duration::ZERO, "the first second's burst");
        assert_eq!(throttle.reserve(start, 50), Duration::from_millis(500));
        // The debt is carried: 150 B were taken at t=0 against a burst of 100, so at t=1 s another
        // 100 B waits until t=1.5 s, when 250 B = burst + 1.5 s of rate are due.
        assert_eq!(throttle.reserve(start + Duration::from_secs(1), 100), Duration::from_millis(500));
    }

    #[test]
    fn the_throttle_holds_across_rounds_and_never_banks_more_than_a_second() {
        let start = Instant::now();
        let mut throttle = Throttle::new(1000);
        // Ten rounds of 1000 bytes, each taken as soon as the last wait ends: after the first
        // burst, every round waits a full second, however the rounds are split.
        let mut now = start;
        for round in 0..10 {
            let wait = throttle.reserve(now, 1000);
            assert_eq!(wait, if round == 0 { Duration::ZERO } else { Duration::from_secs(1) }, "round {round}");
            now += wait;
        }
        // A long idle spell refills only one second's worth.
        now += Duration::from_secs(60);
        assert_eq!(throttle.reserve(now, 1000), Duration::ZERO);
        assert_eq!(throttle.reserve(now, 1000), Duration::from_secs(1));
    }

    #[test]
    fn a_zero_rate_is_unthrottled() {
        let mut throttle = Throttle::new(0);
        assert_eq!(throttle.reserve(Instant::now(), u64::MAX), Duration::ZERO);
    }
}
