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
use mendfs_types::ChunkHash;

use crate::planner::{ChunkPlan, CopyTask, DropTask, NodeState};
use crate::stripe::{MoveTask, RebuildTask, ShardCopies, ShardDropTask, StripePlan};
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

/// Counts from one full scan of the chunk map and the stripes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanSummary {
    /// Chunks, replicated and striped.
    pub chunks: u64,
    /// Chunks short of redundancy: fewer counting replicas than the replication factor, or a
    /// stripe with fewer than K + M live shards.
    pub under_replicated: u64,
    pub over_replicated: u64,
    /// Chunks nothing can read back: no readable replica, or fewer than K readable shards.
    pub lost: u64,
    pub unplaceable: u64,
    /// Chunk records listing each node; a stripe counts once per shard a node holds.
    pub chunks_listed: BTreeMap<NodeId, u64>,
    /// Erasure-coded chunks among `chunks`, by (live shards, K + M): `(6, 6)` is whole,
    /// `(4, 6)` is one loss from unrecoverable under ec:4+2.
    pub stripes_by_live: BTreeMap<(u32, u32), u64>,
}

impl ScanSummary {
    pub fn stripes(&self) -> u64 {
        self.stripes_by_live.values().sum()
    }
}

/// What a stripe's repair does for one shard: rebuild it from K others, or move it off a
/// node that no longer counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardWork {
    Rebuild(RebuildTask),
    Move(MoveTask),
}

/// One shard's repair, with what the executor needs of its stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardTask {
    /// The striped chunk (the stripe's key).
    pub chunk: ChunkHash,
    pub chunk_size: u64,
    /// K and M.
    pub data_shards: usize,
    pub parity_shards: usize,
    /// The bytes of one shard: what the task writes.
    pub shard_bytes: u64,
    pub work: ShardWork,
}

impl ShardTask {
    pub fn index(&self) -> usize {
        match &self.work {
            ShardWork::Rebuild(task) => task.index,
            ShardWork::Move(task) => task.index,
        }
    }

    pub fn target(&self) -> NodeId {
        match &self.work {
            ShardWork::Rebuild(task) => task.target,
            ShardWork::Move(task) => task.target,
        }
    }

    /// Bytes read across the network to do it: K shards to rebuild one, one to move it. What
    /// the repair throttle charges, since reads are the traffic a rebuild multiplies.
    pub fn read_bytes(&self) -> u64 {
        match &self.work {
            ShardWork::Rebuild(task) => self.shard_bytes.saturating_mul(task.sources.len() as u64),
            ShardWork::Move(_) => self.shard_bytes,
        }
    }
}

/// A unit of repair: a chunk copy or a shard's rebuild or move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairTask {
    Copy(CopyTask),
    Shard(ShardTask),
}

impl RepairTask {
    /// Bytes the task writes on its target: what the job and the throttle count.
    pub fn bytes(&self) -> u64 {
        match self {
            RepairTask::Copy(copy) => copy.size,
            RepairTask::Shard(shard) => shard.shard_bytes,
        }
    }

    /// Bytes the task moves between nodes: what the repair throttle charges.
    pub fn network_bytes(&self) -> u64 {
        match self {
            RepairTask::Copy(copy) => copy.size,
            RepairTask::Shard(shard) => shard.read_bytes(),
        }
    }

    pub fn target(&self) -> NodeId {
        match self {
            RepairTask::Copy(copy) => copy.target,
            RepairTask::Shard(shard) => shard.target(),
        }
    }

    /// Its chunk, and the shard index for a shard's task: with the target, it names the task.
    fn identity(&self) -> (&[u8; 32], usize) {
        match self {
            RepairTask::Copy(copy) => (copy.hash.as_bytes(), 0),
            RepairTask::Shard(shard) => (shard.chunk.as_bytes(), shard.index()),
        }
    }
}

/// How urgent a chunk's repair is, smaller first: the losses it can still take (a chunk with one
/// live copy and a stripe with exactly K live shards both take none), then the larger deficit.
type UrgencyKey = (usize, Reverse<usize>);

/// A task ranked by its chunk's urgency, so that a bounded heap keeps the most urgent.
struct Urgent(UrgencyKey, RepairTask);

impl Urgent {
    fn key(&self) -> (UrgencyKey, (&[u8; 32], usize), NodeId) {
        (self.0, self.1.identity(), self.1.target())
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

/// Aggregates the plans of one scan, keeping at most `tasks_max` tasks (the most urgent) and
/// `drops_max` drops of each kind, so the scan's memory is bounded however large the chunk map
/// is; the next scan finds the rest.
pub struct Scan {
    summary: ScanSummary,
    urgent: BinaryHeap<Urgent>,
    drops: Vec<DropTask>,
    shard_drops: Vec<(ChunkHash, ShardDropTask)>,
    tasks_max: usize,
    drops_max: usize,
}

/// What a scan found and the work it kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOutcome {
    pub summary: ScanSummary,
    /// Most urgent first.
    pub tasks: Vec<RepairTask>,
    pub drops: Vec<DropTask>,
    /// Shard records that may go, with their stripe's chunk.
    pub shard_drops: Vec<(ChunkHash, ShardDropTask)>,
}

impl ScanOutcome {
    pub fn planned_bytes(&self) -> u64 {
        self.tasks.iter().map(RepairTask::bytes).sum()
    }
}

impl Scan {
    pub fn new(tasks_max: usize, drops_max: usize) -> Self {
        Self {
            summary: ScanSummary::default(),
            urgent: BinaryHeap::new(),
            drops: Vec::new(),
            shard_drops: Vec::new(),
            tasks_max,
            drops_max,
        }
    }

    fn push(&mut self, key: UrgencyKey, task: RepairTask) {
        self.urgent.push(Urgent(key, task));
        if self.urgent.len() > self.tasks_max {
            self.urgent.pop();
        }
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
        let key = (plan.live.saturating_sub(1), Reverse(plan.missing()));
        for copy in plan.copies {
            self.push(key, RepairTask::Copy(copy));
        }
        let room = self.drops_max.saturating_sub(self.drops.len());
        self.drops.extend(plan.drops.into_iter().take(room));
    }

    /// Counts one stripe: `chunk`, of `chunk_size` bytes in shards of `shard_bytes`, with
    /// `shards` listed where they are and the planner's `plan` for it.
    pub fn add_stripe(
        &mut self,
        chunk: ChunkHash,
        chunk_size: u64,
        shard_bytes: u64,
        shards: &[ShardCopies],
        plan: StripePlan,
    ) {
        let summary = &mut self.summary;
        summary.chunks += 1;
        for node in shards.iter().flat_map(|shard| shard.nodes.iter()) {
            *summary.chunks_listed.entry(*node).or_default() += 1;
        }
        let live = u32::try_from(plan.live).unwrap_or(u32::MAX);
        let total = u32::try_from(plan.total_shards).unwrap_or(u32::MAX);
        *summary.stripes_by_live.entry((live, total)).or_default() += 1;
        summary.under_replicated += u64::from(plan.under_redundant());
        summary.over_replicated += u64::from(!plan.drops.is_empty());
        summary.lost += u64::from(plan.lost);
        summary.unplaceable += plan.unplaceable as u64;
        let key = (plan.margin(), Reverse(plan.total_shards.saturating_sub(plan.live)));
        let task = |work| ShardTask {
            chunk,
            chunk_size,
            data_shards: plan.data_shards,
            parity_shards: plan.total_shards.saturating_sub(plan.data_shards),
            shard_bytes,
            work,
        };
        let work: Vec<ShardWork> = plan
            .rebuilds
            .iter()
            .cloned()
            .map(ShardWork::Rebuild)
            .chain(plan.moves.iter().cloned().map(ShardWork::Move))
            .collect();
        for work in work {
            self.push(key, RepairTask::Shard(task(work)));
        }
        let room = self.drops_max.saturating_sub(self.shard_drops.len());
        self.shard_drops.extend(plan.drops.into_iter().take(room).map(|drop| (chunk, drop)));
    }

    pub fn finish(self) -> ScanOutcome {
        let tasks = self.urgent.into_sorted_vec().into_iter().map(|Urgent(_, task)| task).collect();
        ScanOutcome { summary: self.summary, tasks, drops: self.drops, shard_drops: self.shard_drops }
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

/// Moves the checkpointed job to match what a scan planned. `reason` is asked when a job starts
/// or grows: a job that takes in the copies of a node found down after it started names that
/// node too (the nodes it named stay named: it repairs for them as well), so an operator
/// reading "node 8 down" is not left wondering who repairs node 7.
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
            let named: Vec<String> = job.reason.split(", ").map(str::to_string).collect();
            for part in reason().split(", ") {
                // Node changes only: a count of under-replicated chunks is a start's reason.
                if part.starts_with("node ") && !named.iter().any(|n| n == part) {
                    job.reason.push_str(", ");
                    job.reason.push_str(part);
                }
            }
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
        assert_eq!(outcome.tasks.len(), 2);
        assert!(
            outcome.tasks.iter().all(|task| matches!(task, RepairTask::Copy(copy) if copy.hash == hash(1))),
            "{:?}",
            outcome.tasks
        );
        assert_eq!(outcome.planned_bytes(), 20);
    }

    fn shard_copies(placement: &[&[NodeId]]) -> Vec<ShardCopies> {
        placement
            .iter()
            .enumerate()
            .map(|(i, nodes)| ShardCopies { hash: hash(100 + i as u8), nodes: nodes.to_vec() })
            .collect()
    }

    #[test]
    fn a_stripe_at_its_last_spare_shard_goes_before_a_chunk_short_of_one_copy() {
        // Nodes 1..=8, nodes 5 and 6 down: the ec:2+2 stripe on 3..=6 has exactly K = 2 live
        // shards (no loss left to take); the chunk on 1, 2 and 5 has two live copies (one left).
        let mut nodes: Vec<NodeState> = (1..=8).map(|id| node(id, Liveness::Up)).collect();
        nodes[4].liveness = Liveness::Down;
        nodes[5].liveness = Liveness::Down;
        let view = ClusterView::new(nodes, 3);
        let mut scan = Scan::new(2, 10);
        scan.add(&[1, 2, 5], view.plan_chunk(&hash(1), 1_000, &[1, 2, 5]));
        let whole = shard_copies(&[&[1], &[2], &[3], &[4]]);
        scan.add_stripe(hash(2), 100, 50, &whole, view.plan_stripe(&hash(2), 2, &whole));
        let shards = shard_copies(&[&[3], &[4], &[5], &[6]]);
        scan.add_stripe(hash(3), 100, 50, &shards, view.plan_stripe(&hash(3), 2, &shards));
        let outcome = scan.finish();
        assert_eq!(outcome.summary.chunks, 3);
        assert_eq!(outcome.summary.under_replicated, 2);
        assert_eq!(outcome.summary.stripes(), 2);
        assert_eq!(outcome.summary.stripes_by_live, BTreeMap::from([((2, 4), 1), ((4, 4), 1)]));
        assert_eq!(outcome.summary.chunks_listed[&3], 2, "a shard each of two stripes");
        // Only two tasks are kept: both are the stripe's rebuilds, from its data shards.
        assert_eq!(outcome.tasks.len(), 2, "{:?}", outcome.tasks);
        for task in &outcome.tasks {
            let RepairTask::Shard(shard) = task else { panic!("the stripe goes first: {task:?}") };
            let ShardWork::Rebuild(rebuild) = &shard.work else { panic!("nothing left to move") };
            assert_eq!((shard.chunk, shard.data_shards, shard.parity_shards), (hash(3), 2, 2));
            assert_eq!(rebuild.sources, [(0, 3), (1, 4)]);
            assert_eq!(shard.read_bytes(), 100, "K shards read to write one");
        }
        assert_eq!(outcome.planned_bytes(), 100);
        // The dead shards' records go once rebuilt: none now, as no copy is kept yet.
        assert!(outcome.shard_drops.is_empty());
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
        assert_eq!(extended.reason, "node 3 down", "a reason it already gives is not repeated");
        // Another node found down while the job runs: the job grows and names it too.
        let JobChange::Extended(grown) =
            next_job(Some(done.clone()), 9, 90, 8, || "node 3 down, node 5 down, 4 under-replicated chunks".into())
        else {
            panic!()
        };
        assert_eq!(grown.reason, "node 3 down, node 5 down");
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
