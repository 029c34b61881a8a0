//! The repair loop's decisions, free of I/O: what one scan of the chunk map found and which of
//! its copies to run first, how the checkpointed repair job moves (start, extend, finish), and
//! how fast copies may go.
//!
//! The leader's repair worker (in the data plane) reads the chunk map, feeds every chunk's plan
//! into a [`Scan`], records what [`next_job`] decides through Raft, and paces its copies with a
//! [`Throttle`]; everything here takes the time as an argument, so tests give exact histories.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::detector::Liveness;
use crate::planner::{urgency, ChunkPlan, CopyTask, DropTask, NodeState};
use crate::NodeId;

/// The repair the leader is running, checkpointed in Raft: a new leader continues the same
/// job (its counters and start time) instead of starting over. Stored in the metadata with
/// postcard, which encodes fields by position: append new fields at the end, never reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairJob {
    pub id: u64,
    pub started_ms: u64,
    /// Why it started: "node 3 down", "node 2 draining", "2 bad replicas"...
    pub reason: String,
    /// Chunk copies and bytes done so far plus those the latest scan still planned.
    pub total_copies: u64,
    pub total_bytes: u64,
    pub done_copies: u64,
    pub done_bytes: u64,
    /// Set when a scan found nothing left to copy.
    pub finished_ms: Option<u64>,
}

impl RepairJob {
    pub fn is_running(&self) -> bool {
        self.finished_ms.is_none()
    }
}

/// Counts from one full scan of the chunk map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanSummary {
    pub chunks: u64,
    pub under_replicated: u64,
    pub over_replicated: u64,
    pub lost: u64,
    pub unplaceable: u64,
    /// Chunk records listing each node.
    pub chunks_listed: BTreeMap<NodeId, u64>,
}

/// A copy task ranked by its chunk's urgency (fewest live copies first, then the largest
/// deficit), so that a bounded heap keeps the most urgent.
struct Urgent((usize, Reverse<usize>), CopyTask);

impl Urgent {
    fn key(&self) -> ((usize, Reverse<usize>), &[u8; 32], NodeId) {
        (self.0, &self.1.hash, self.1.target)
    }
}

impl PartialEq for Urgent {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
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
        self.key().cmp(&other.key())
    }
}

/// Aggregates the plans of one scan, keeping at most `copies_max` copies (the most urgent) and
/// `drops_max` drops, so the scan's memory is bounded however large the chunk map is; the next
/// scan finds the rest.
pub struct Scan {
    summary: ScanSummary,
    urgent: BinaryHeap<Urgent>,
    drops: Vec<DropTask>,
    copies_max: usize,
    drops_max: usize,
}

/// What a scan found and the work it kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOutcome {
    pub summary: ScanSummary,
    /// Most urgent first.
    pub copies: Vec<CopyTask>,
    pub drops: Vec<DropTask>,
}

impl ScanOutcome {
    pub fn planned_bytes(&self) -> u64 {
        self.copies.iter().map(|copy| copy.size).sum()
    }
}

impl Scan {
    pub fn new(copies_max: usize, drops_max: usize) -> Self {
        Self { summary: ScanSummary::default(), urgent: BinaryHeap::new(), drops: Vec::new(), copies_max, drops_max }
    }

    /// Counts one chunk: its listed `replicas` and the planner's `plan` for it.
    pub fn add(&mut self, replicas: &[NodeId], plan: ChunkPlan) {
        let summary = &mut self.summary;
        summary.chunks += 1;
        for node in replicas {
            *summary.chunks_listed.entry(*node).or_default() += 1;
        }
        summary.under_replicated += u64::from(plan.under_replicated());
        summary.over_replicated += u64::from(!plan.drops.is_empty());
        summary.lost += u64::from(plan.lost);
        summary.unplaceable += plan.unplaceable as u64;
        let key = urgency(&plan);
        for copy in plan.copies {
            self.urgent.push(Urgent(key, copy));
            if self.urgent.len() > self.copies_max {
                self.urgent.pop();
            }
        }
        let room = self.drops_max.saturating_sub(self.drops.len());
        self.drops.extend(plan.drops.into_iter().take(room));
    }

    pub fn finish(self) -> ScanOutcome {
        let copies = self.urgent.into_sorted_vec().into_iter().map(|Urgent(_, copy)| copy).collect();
        ScanOutcome { summary: self.summary, copies, drops: self.drops }
    }
}

/// What the repair job record becomes after a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobChange {
    /// Nothing to record: no job runs and none is needed, or the running job's totals stand.
    Unchanged(Option<RepairJob>),
    /// A scan found work with no job running: a new job, numbered after the last one.
    Started(RepairJob),
    /// The running job's totals moved (new damage, or copies the last scan did not see).
    Extended(RepairJob),
    /// The scan found nothing left to copy: the job ends with what it did.
    Finished(RepairJob),
}

impl JobChange {
    /// The record to commit, if any.
    pub fn to_record(&self) -> Option<&RepairJob> {
        match self {
            JobChange::Unchanged(_) => None,
            JobChange::Started(job) | JobChange::Extended(job) | JobChange::Finished(job) => Some(job),
        }
    }

    /// The job the coming copies count in.
    pub fn running(&self) -> Option<&RepairJob> {
        match self {
            JobChange::Unchanged(job) => job.as_ref().filter(|job| job.is_running()),
            JobChange::Started(job) | JobChange::Extended(job) => Some(job),
            JobChange::Finished(_) => None,
        }
    }
}

/// Moves the checkpointed job to match what a scan planned. `reason` is asked only when a job
/// starts.
pub fn next_job(
    last: Option<RepairJob>,
    planned_copies: u64,
    planned_bytes: u64,
    now_ms: u64,
    reason: impl FnOnce() -> String,
) -> JobChange {
    let last_id = last.as_ref().map_or(0, |job| job.id);
    match (last.filter(RepairJob::is_running), planned_copies) {
        (None, 0) => JobChange::Unchanged(None),
        (Some(mut job), 0) => {
            job.finished_ms = Some(now_ms);
            job.total_copies = job.done_copies;
            job.total_bytes = job.done_bytes;
            JobChange::Finished(job)
        }
        (Some(mut job), _) => {
            let totals = (job.done_copies + planned_copies, job.done_bytes + planned_bytes);
            if totals == (job.total_copies, job.total_bytes) {
                return JobChange::Unchanged(Some(job));
            }
            (job.total_copies, job.total_bytes) = totals;
            JobChange::Extended(job)
        }
        (None, _) => JobChange::Started(RepairJob {
            id: last_id + 1,
            started_ms: now_ms,
            reason: reason(),
            total_copies: planned_copies,
            total_bytes: planned_bytes,
            done_copies: 0,
            done_bytes: 0,
            finished_ms: None,
        }),
    }
}

/// Why repair starts, in an operator's words: the down and draining nodes, else the count of
/// under-replicated chunks (bad replicas found by reads and scrubs).
pub fn repair_reason(nodes: &[NodeState], summary: &ScanSummary) -> String {
    let mut reasons: Vec<String> = Vec::new();
    for node in nodes {
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

/// A token bucket over bytes: lets a burst of one second through, then holds the average.
/// One per healer, kept across repair rounds: a bucket made afresh each round would let a full
/// second's burst through every round, and short rounds would run far over the rate.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_sec: f64,
    tokens: f64,
    refilled: Option<Instant>,
}

impl Throttle {
    /// 0 bytes per second: unthrottled.
    pub fn new(bytes_per_sec: u64) -> Self {
        Self { bytes_per_sec: bytes_per_sec as f64, tokens: bytes_per_sec as f64, refilled: None }
    }

    /// Takes `bytes` at `now`; returns how long to wait before sending them (zero within the
    /// burst). The debt of a wait is carried, so the average holds whatever the sizes.
    pub fn reserve(&mut self, now: Instant, bytes: u64) -> Duration {
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

/// Repair throughput over a sliding window, for the operator's view. Bounded: one entry per
/// finished copy within the window, and a copy takes at least a round trip.
#[derive(Debug, Default)]
pub struct RepairRate {
    copies: VecDeque<(Instant, u64)>,
}

impl RepairRate {
    pub const WINDOW: Duration = Duration::from_secs(10);

    pub fn record(&mut self, now: Instant, bytes: u64) {
        self.copies.push_back((now, bytes));
        self.forget_before(now);
    }

    /// Bytes per second over the window ending at `now`.
    pub fn bytes_per_sec(&mut self, now: Instant) -> f64 {
        self.forget_before(now);
        let bytes: u64 = self.copies.iter().map(|(_, bytes)| bytes).sum();
        bytes as f64 / Self::WINDOW.as_secs_f64()
    }

    fn forget_before(&mut self, now: Instant) {
        while self.copies.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) > Self::WINDOW) {
            self.copies.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::ClusterView;
    use mendfs_types::ChunkHash;

    fn node(id: NodeId, liveness: Liveness) -> NodeState {
        NodeState { id, zone: format!("z{id}"), weight: 100, liveness, draining: false }
    }

    fn hash(byte: u8) -> ChunkHash {
        ChunkHash::from_bytes([byte; 32])
    }

    #[test]
    fn a_scan_counts_every_chunk_and_keeps_the_most_urgent_copies() {
        let view = ClusterView::new((1..=5).map(|id| node(id, Liveness::Up)).collect(), 3);
        let mut scan = Scan::new(2, 10);
        // Two copies short, one copy short, healthy, and one copy short again.
        let chunks: [(ChunkHash, Vec<NodeId>); 4] =
            [(hash(1), vec![1]), (hash(2), vec![1, 2]), (hash(3), vec![1, 2, 3]), (hash(4), vec![2, 3])];
        for (chunk, replicas) in &chunks {
            scan.add(replicas, view.plan_chunk(chunk, 10, replicas));
        }
        let outcome = scan.finish();
        assert_eq!(outcome.summary.chunks, 4);
        assert_eq!(outcome.summary.under_replicated, 3);
        assert_eq!(outcome.summary.chunks_listed, BTreeMap::from([(1, 3), (2, 3), (3, 2)]));
        // Four copies were planned; the two kept are those of the chunk with one live copy.
        assert_eq!(outcome.copies.len(), 2);
        assert!(outcome.copies.iter().all(|copy| copy.hash == hash(1)), "{:?}", outcome.copies);
        assert_eq!(outcome.planned_bytes(), 20);
    }

    #[test]
    fn the_job_starts_extends_holds_and_finishes() {
        let reason = || "node 3 down".to_string();
        assert_eq!(next_job(None, 0, 0, 5, reason), JobChange::Unchanged(None));
        let JobChange::Started(job) = next_job(None, 4, 40, 5, reason) else { panic!("a job starts") };
        assert_eq!((job.id, job.started_ms, job.total_copies, job.reason.as_str()), (1, 5, 4, "node 3 down"));
        // Two copies done and checkpointed; the next scan plans the two left: totals stand.
        let done = RepairJob { done_copies: 2, done_bytes: 20, ..job.clone() };
        assert_eq!(next_job(Some(done.clone()), 2, 20, 6, reason), JobChange::Unchanged(Some(done.clone())));
        // New damage adds to the totals.
        let JobChange::Extended(extended) = next_job(Some(done.clone()), 5, 50, 7, reason) else { panic!() };
        assert_eq!((extended.total_copies, extended.total_bytes), (7, 70));
        // Nothing left: the job ends with what it did, and no job runs.
        let change = next_job(Some(done.clone()), 0, 0, 9, reason);
        let JobChange::Finished(finished) = &change else { panic!("the job finishes") };
        assert_eq!((finished.finished_ms, finished.total_copies), (Some(9), 2));
        assert_eq!(change.running(), None);
        // A finished job is history: new work starts job 2.
        let JobChange::Started(next) = next_job(Some(finished.clone()), 1, 10, 10, reason) else { panic!() };
        assert_eq!(next.id, 2);
    }

    #[test]
    fn the_reason_names_down_and_draining_nodes() {
        let summary = ScanSummary { under_replicated: 7, ..ScanSummary::default() };
        let mut draining = node(2, Liveness::Up);
        draining.draining = true;
        assert_eq!(repair_reason(&[node(1, Liveness::Up)], &summary), "7 under-replicated chunks");
        assert_eq!(repair_reason(&[node(1, Liveness::Down), draining], &summary), "node 1 down, node 2 draining");
    }

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

    #[test]
    fn the_rate_counts_only_the_window() {
        let start = Instant::now();
        let mut rate = RepairRate::default();
        rate.record(start, 1_000);
        rate.record(start + Duration::from_secs(5), 9_000);
        assert_eq!(rate.bytes_per_sec(start + Duration::from_secs(6)), 1_000.0);
        assert_eq!(rate.bytes_per_sec(start + Duration::from_secs(11)), 900.0);
        assert_eq!(rate.bytes_per_sec(start + Duration::from_secs(16)), 0.0);
    }
}
