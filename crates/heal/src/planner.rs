//! The repair planner: from where a chunk's copies are recorded and how the nodes are doing, the
//! copies that restore its redundancy and the copies that may go.
//!
//! The metadata records where each chunk's replicas actually are (the ring only proposes), so
//! repair is exact: the planner reads a chunk's recorded replica list, the liveness and
//! administrative state of every node, and the ring built from the nodes that may receive new
//! data, and returns a [`ChunkPlan`]: copy tasks (a target pulls the chunk from one of the
//! listed sources and verifies it) and drop tasks (forget a replica, on the condition that the
//! `keep` nodes are still listed). It does no I/O and reads no clock, so the leader can re-plan
//! every chunk on every scan, and tests can assert exact plans.
//!
//! Plans are idempotent because they are computed from the record alone, never from the tasks
//! handed out before: an executed copy is committed through Raft as "chunk X gained node c", an
//! executed drop as "chunk X no longer on node n", and the next plan sees the new record and
//! asks only for what is still missing. A new leader, or a scan racing with its own executors,
//! therefore redoes nothing that was recorded, and copying a chunk that is already there costs
//! nothing more than a verification.
//!
//! The planner never reduces redundancy while repairing: a chunk with fewer counting replicas
//! than the replication factor only gets copies, never drops, not even of the records on down
//! nodes (such a node may come back with its copy, and its record is how we would count it
//! again). Drops come only once enough counting replicas are listed, and every drop names the
//! replication-factor counting replicas that must still be listed when it is applied, so no
//! sequence of drops, however interleaved, leaves the chunk with fewer.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use mendfs_ring::{Ring, RingNode};
use mendfs_types::ChunkHash;
use serde::{Deserialize, Serialize};

use crate::detector::Liveness;
use crate::NodeId;

/// One node as the planner sees it: membership (zone, weight, draining) plus the liveness the
/// leader's failure detector currently assigns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// The node's membership id.
    pub id: NodeId,
    /// Failure domain; the ring spreads new copies over distinct zones.
    pub zone: String,
    /// Relative capacity ([`Ring::WEIGHT_NORMAL`] is one ordinary node); 0 receives nothing.
    pub weight: u32,
    /// The failure detector's verdict.
    pub liveness: Liveness,
    /// The operator is emptying this node: its copies are moved away and it receives none.
    pub draining: bool,
}

impl NodeState {
    /// The node can serve its copy, so it can be a source for repair. Only `down` nodes cannot:
    /// a `suspect` node has merely missed some heartbeats and a `degraded` one is slow or short
    /// of space, but both still answer reads, and the target verifies what it pulls anyway.
    pub fn readable(&self) -> bool {
        self.liveness != Liveness::Down
    }

    /// A copy on this node counts toward the replication factor. A draining node's copies are
    /// about to go, so they must already be replaced elsewhere; a suspect node's copy still
    /// counts, so a short network hiccup does not trigger a storm of copies.
    pub fn counts(&self) -> bool {
        self.readable() && !self.draining
    }

    /// The node may receive new copies (from repair and from the write path). Only healthy,
    /// non-draining nodes with capacity: a copy sent to a suspect or degraded node would likely
    /// need repairing again soon, and a draining node is being emptied.
    pub fn accepts_new(&self) -> bool {
        self.liveness == Liveness::Up && !self.draining && self.weight > 0
    }
}

/// A snapshot of the cluster for planning: the nodes by id, the ring of the nodes that accept
/// new copies, and the replication factor. Immutable: build a new one when a node's state or
/// the membership changes.
#[derive(Debug, Clone)]
pub struct ClusterView {
    nodes: BTreeMap<NodeId, NodeState>,
    ring: Ring,
    replication_factor: usize,
}

impl ClusterView {
    /// Builds the view. Duplicate ids are a caller bug (the membership table has one row per
    /// id); the last entry for an id wins.
    ///
    /// A replication factor of 0 is treated as 1: with 0, every copy would be surplus and the
    /// planner would drop them all.
    pub fn new(nodes: Vec<NodeState>, replication_factor: usize) -> Self {
        let nodes: BTreeMap<NodeId, NodeState> = nodes.into_iter().map(|node| (node.id, node)).collect();
        let ring_nodes: Vec<RingNode> = nodes
            .values()
            .filter(|node| node.accepts_new())
            .map(|node| RingNode { id: node.id, zone: node.zone.clone(), weight: node.weight })
            .collect();
        ClusterView { nodes, ring: Ring::new(&ring_nodes), replication_factor: replication_factor.max(1) }
    }

    /// The number of counting replicas every chunk should have (at least 1).
    pub fn replication_factor(&self) -> usize {
        self.replication_factor
    }

    /// The node with this id, if it is a member.
    pub fn node(&self, id: NodeId) -> Option<&NodeState> {
        self.nodes.get(&id)
    }

    /// The ring of the nodes that accept new copies ([`NodeState::accepts_new`]): the targets
    /// of repair, and of the write path too, so new data never lands on a node being emptied
    /// or one that is failing.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The plan for one chunk, from its content hash, its size and the node ids its record
    /// lists (in any order, duplicates allowed). See [`ChunkPlan`] for what the plan contains.
    pub fn plan_chunk(&self, hash: &ChunkHash, size: u64, replicas: &[NodeId]) -> ChunkPlan {
        // Rule 1: a set, so a duplicated id counts once and the list's order cannot change
        // the plan.
        let listed: BTreeSet<NodeId> = replicas.iter().copied().collect();
        let replicas: Vec<Replica> = listed.iter().map(|&id| self.replica(id)).collect();
        let replication_factor = self.replication_factor;
        let live = replicas.iter().filter(|replica| replica.counts).count();
        let mut plan = ChunkPlan { replication_factor, live, ..ChunkPlan::default() };

        if live < replication_factor {
            // Rule 2: copy only. Every listed node is excluded as a target, whatever its state:
            // it already has (or had) the chunk, and a second copy on one node adds nothing.
            let need = replication_factor - live;
            let targets = self.ring.place_excluding(hash, need, &listed);
            plan.unplaceable = need.saturating_sub(targets.len());
            let mut sources: Vec<&Replica> = replicas.iter().filter(|replica| replica.readable).collect();
            if sources.is_empty() {
                plan.lost = true;
                return plan;
            }
            // Executors try sources in order: counting copies before those on draining nodes
            // (which are busy being emptied), healthy before suspect or degraded, then the
            // ring's preference and the id, so every leader hands out the same list.
            if sources.len() > 1 {
                let preference = Preference::new(&self.ring, hash);
                sources.sort_by_key(|replica| (!replica.counts, !replica.up, preference.rank(replica.id), replica.id));
            }
            let sources: Vec<NodeId> = sources.into_iter().map(|replica| replica.id).collect();
            plan.copies = targets
                .into_iter()
                .map(|target| CopyTask { hash: *hash, size, target, sources: sources.clone() })
                .collect();
            return plan;
        }

        // Rule 3: enough counting replicas, so the extra records may go. `keep` is the
        // replication factor's worth of counting replicas the ring prefers, so a surplus left
        // by a node's return is trimmed toward where placement would put the chunk anyway.
        let mut keep: Vec<NodeId> =
            replicas.iter().filter(|replica| replica.counts).map(|replica| replica.id).collect();
        if keep.len() > replication_factor {
            // Walking the ring costs a pass over its vnodes, so only when there is a choice.
            let preference = Preference::new(&self.ring, hash);
            keep.sort_by_key(|&id| (preference.rank(id), id));
            keep.truncate(replication_factor);
            // `keep` is a condition on the record, a set: sorted by id so equal plans compare
            // equal.
            keep.sort_unstable();
        }
        plan.drops = replicas
            .iter()
            .filter_map(|replica| {
                let reason = if !replica.readable {
                    DropReason::NodeDown
                } else if !replica.counts {
                    DropReason::Drained
                } else if keep.binary_search(&replica.id).is_err() {
                    DropReason::Surplus
                } else {
                    return None;
                };
                Some(DropTask { hash: *hash, node: replica.id, keep: keep.clone(), reason })
            })
            .collect();
        plan
    }

    /// How a listed replica's node is doing. A node that is no longer a member (removed) is
    /// treated as down and draining: its copy cannot be read and will never count again.
    fn replica(&self, id: NodeId) -> Replica {
        match self.nodes.get(&id) {
            Some(node) => {
                Replica { id, readable: node.readable(), counts: node.counts(), up: node.liveness == Liveness::Up }
            }
            None => Replica { id, readable: false, counts: false, up: false },
        }
    }
}

/// A listed replica with the derived rules of its node.
#[derive(Debug, Clone, Copy)]
struct Replica {
    id: NodeId,
    readable: bool,
    counts: bool,
    up: bool,
}

/// The ring's full preference order for one chunk, for ranking the nodes that hold it.
struct Preference {
    order: Vec<NodeId>,
}

impl Preference {
    fn new(ring: &Ring, hash: &[u8; 32]) -> Self {
        Preference { order: ring.place(hash, ring.nodes().len()) }
    }

    /// The node's position in the ring's preference; nodes not on the ring (suspect, degraded,
    /// draining, weightless or unknown) rank after all those on it.
    fn rank(&self, id: NodeId) -> usize {
        self.order.iter().position(|&candidate| candidate == id).unwrap_or(usize::MAX)
    }
}

/// Copy one chunk to `target`, pulling it from the first of `sources` that serves it. The target
/// verifies the content against `hash` before it reports success, and the completion is recorded
/// as "chunk `hash` gained node `target`".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyTask {
    /// The chunk's BLAKE3 hash.
    pub hash: ChunkHash,
    /// The chunk's size in bytes, for throttling and accounting.
    pub size: u64,
    /// A node that accepts new copies and is not listed for this chunk.
    pub target: NodeId,
    /// Listed, readable nodes in the order to try them; never empty.
    pub sources: Vec<NodeId>,
}

/// Why a replica's record may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DropReason {
    /// The node is down or no longer a member: its copy cannot be read.
    NodeDown,
    /// The node is draining: its copy has been replaced elsewhere.
    Drained,
    /// The chunk has more counting replicas than the replication factor, and this one is not
    /// among those the ring prefers.
    Surplus,
}

/// Forget that `node` holds the chunk, provided every node of `keep` is still listed when the
/// drop is applied; the condition makes concurrent or stale drops safe, since none can take the
/// chunk below `keep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropTask {
    /// The chunk's BLAKE3 hash.
    pub hash: ChunkHash,
    /// The node whose record goes.
    pub node: NodeId,
    /// Exactly the replication factor's worth of counting replicas, sorted by id; never
    /// contains `node`.
    pub keep: Vec<NodeId>,
    /// Why the record may go.
    pub reason: DropReason,
}

/// What to do for one chunk. A plan has copies or drops, never both: copies while the chunk
/// has fewer counting replicas than the replication factor, drops only once it has enough.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkPlan {
    /// The replication factor the plan was made for.
    pub replication_factor: usize,
    /// Distinct listed replicas that count ([`NodeState::counts`]).
    pub live: usize,
    /// One task per new target, in the ring's preference order.
    pub copies: Vec<CopyTask>,
    /// One task per record that may go, by node id.
    pub drops: Vec<DropTask>,
    /// Copies wanted for which no eligible target exists (too few nodes accept new copies).
    pub unplaceable: usize,
    /// No listed replica is readable: there is nothing to copy from, so no copies.
    pub lost: bool,
}

impl ChunkPlan {
    /// Nothing to execute. A no-op plan may still be under-replicated (lost, or no target).
    pub fn is_noop(&self) -> bool {
        self.copies.is_empty() && self.drops.is_empty()
    }

    /// Fewer counting replicas than the replication factor.
    pub fn under_replicated(&self) -> bool {
        self.live < self.replication_factor
    }

    /// Counting replicas missing to reach the replication factor.
    pub fn missing(&self) -> usize {
        self.replication_factor.saturating_sub(self.live)
    }
}

/// Counters over the plans of one scan, for metrics and the operator's status view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSummary {
    /// Chunks planned.
    pub chunks: u64,
    /// Chunks with fewer counting replicas than the replication factor.
    pub under_replicated: u64,
    /// Chunks with records to drop (surplus, drained or on down nodes).
    pub over_replicated: u64,
    /// Chunks without any readable replica.
    pub lost: u64,
    /// Copies wanted that found no eligible target.
    pub unplaceable: u64,
    /// Copy tasks.
    pub copies: u64,
    /// Bytes those copy tasks move.
    pub copy_bytes: u64,
    /// Drop tasks.
    pub drops: u64,
}

impl PlanSummary {
    /// Counts one chunk's plan; `size` is the chunk's size in bytes. Saturates rather than
    /// wraps, since these are only statistics.
    pub fn add(&mut self, plan: &ChunkPlan, size: u64) {
        let n_copies = plan.copies.len() as u64;
        self.chunks = self.chunks.saturating_add(1);
        self.under_replicated = self.under_replicated.saturating_add(u64::from(plan.under_replicated()));
        self.over_replicated = self.over_replicated.saturating_add(u64::from(!plan.drops.is_empty()));
        self.lost = self.lost.saturating_add(u64::from(plan.lost));
        self.unplaceable = self.unplaceable.saturating_add(plan.unplaceable as u64);
        self.copies = self.copies.saturating_add(n_copies);
        self.copy_bytes = self.copy_bytes.saturating_add(size.saturating_mul(n_copies));
        self.drops = self.drops.saturating_add(plan.drops.len() as u64);
    }
}

/// Urgency order for a bounded work queue: fewer live copies first (a chunk one failure away
/// from loss before one that is merely short), then larger deficits; a smaller key is more
/// urgent. Drop-only plans have `live >= replication_factor`, so they come after every
/// under-replicated chunk.
pub fn urgency(plan: &ChunkPlan) -> (usize, Reverse<usize>) {
    (plan.live, Reverse(plan.missing()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HASH: ChunkHash = ChunkHash::from_bytes([7; 32]);
    const SIZE: u64 = 1 << 20;

    fn node(id: NodeId, liveness: Liveness, draining: bool) -> NodeState {
        NodeState { id, zone: format!("z{}", id % 3), weight: Ring::WEIGHT_NORMAL, liveness, draining }
    }

    fn up(id: NodeId) -> NodeState {
        node(id, Liveness::Up, false)
    }

    fn sorted(mut ids: Vec<NodeId>) -> Vec<NodeId> {
        ids.sort_unstable();
        ids
    }

    fn targets(plan: &ChunkPlan) -> Vec<NodeId> {
        plan.copies.iter().map(|copy| copy.target).collect()
    }

    fn dropped(plan: &ChunkPlan) -> Vec<(NodeId, DropReason)> {
        plan.drops.iter().map(|drop| (drop.node, drop.reason)).collect()
    }

    #[test]
    fn node_state_rules() {
        let cases = [
            (Liveness::Up, false, 100, (true, true, true)),
            (Liveness::Up, false, 0, (true, true, false)),
            (Liveness::Up, true, 100, (true, false, false)),
            (Liveness::Suspect, false, 100, (true, true, false)),
            (Liveness::Degraded, false, 100, (true, true, false)),
            (Liveness::Degraded, true, 100, (true, false, false)),
            (Liveness::Down, false, 100, (false, false, false)),
            (Liveness::Down, true, 100, (false, false, false)),
        ];
        for (liveness, draining, weight, expected) in cases {
            let state = NodeState { id: 1, zone: "z".into(), weight, liveness, draining };
            assert_eq!((state.readable(), state.counts(), state.accepts_new()), expected, "{state:?}");
        }
    }

    #[test]
    fn ring_holds_only_nodes_accepting_new_copies() {
        let mut weightless = up(5);
        weightless.weight = 0;
        let view = ClusterView::new(
            vec![
                up(1),
                node(2, Liveness::Suspect, false),
                node(3, Liveness::Down, false),
                node(4, Liveness::Up, true),
                weightless,
                node(6, Liveness::Degraded, false),
                up(7),
            ],
            3,
        );
        let ring_ids: Vec<NodeId> = view.ring().nodes().iter().map(|node| node.id).collect();
        assert_eq!(ring_ids, vec![1, 7]);
        assert_eq!(view.node(4).map(|node| node.draining), Some(true));
        assert_eq!(view.node(99), None);
    }

    #[test]
    fn replication_factor_zero_is_treated_as_one() {
        let view = ClusterView::new(vec![up(1), up(2)], 0);
        assert_eq!(view.replication_factor(), 1);
        let plan = view.plan_chunk(&HASH, SIZE, &[1]);
        assert!(plan.is_noop(), "{plan:?}");
        assert_eq!(plan.live, 1);
    }

    #[test]
    fn healthy_chunk_is_a_noop() {
        let view = ClusterView::new((1..=5).map(up).collect(), 3);
        let plan = view.plan_chunk(&HASH, SIZE, &[3, 1, 5]);
        assert_eq!(plan, ChunkPlan { replication_factor: 3, live: 3, ..ChunkPlan::default() });
        assert!(plan.is_noop());
        assert!(!plan.under_replicated());
    }

    #[test]
    fn down_replica_is_copied_then_dropped_then_noop() {
        let view = ClusterView::new(vec![up(1), up(2), node(3, Liveness::Down, false), up(4)], 3);

        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 3]);
        assert_eq!(plan.live, 2);
        assert!(plan.under_replicated());
        assert!(plan.drops.is_empty(), "no drop while under-replicated: {plan:?}");
        assert_eq!(plan.copies.len(), 1);
        let copy = &plan.copies[0];
        assert_eq!((copy.hash, copy.size, copy.target), (HASH, SIZE, 4));
        assert_eq!(sorted(copy.sources.clone()), vec![1, 2]);

        // The copy is recorded: the down replica may go now, on condition that 1, 2, 4 stay.
        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 3, 4]);
        assert_eq!(plan.live, 3);
        assert!(plan.copies.is_empty());
        assert_eq!(
            plan.drops,
            vec![DropTask { hash: HASH, node: 3, keep: vec![1, 2, 4], reason: DropReason::NodeDown }]
        );

        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 4]);
        assert!(plan.is_noop(), "{plan:?}");
        assert_eq!(plan.live, 3);
    }

    #[test]
    fn drained_replica_is_copied_then_dropped() {
        let view = ClusterView::new(vec![up(1), up(2), node(3, Liveness::Up, true), up(4)], 3);

        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 3]);
        assert_eq!(plan.live, 2);
        assert_eq!(targets(&plan), vec![4]);
        assert!(plan.drops.is_empty());
        // The draining node is a source, but the last one tried.
        let sources = &plan.copies[0].sources;
        assert_eq!(sources.len(), 3);
        assert_eq!(sources[2], 3);

        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 3, 4]);
        assert!(plan.copies.is_empty());
        assert_eq!(
            plan.drops,
            vec![DropTask { hash: HASH, node: 3, keep: vec![1, 2, 4], reason: DropReason::Drained }]
        );

        assert!(view.plan_chunk(&HASH, SIZE, &[1, 2, 4]).is_noop());
    }

    #[test]
    fn surplus_replica_not_preferred_by_the_ring_is_dropped() {
        let view = ClusterView::new((1..=4).map(up).collect(), 3);
        let preference = view.ring().place(&HASH, 4);
        assert_eq!(sorted(preference.clone()), vec![1, 2, 3, 4]);

        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 3, 4]);
        assert_eq!(plan.live, 4);
        assert!(!plan.under_replicated());
        assert!(plan.copies.is_empty());
        let keep = sorted(preference[..3].to_vec());
        assert_eq!(
            plan.drops,
            vec![DropTask { hash: HASH, node: preference[3], keep: keep.clone(), reason: DropReason::Surplus }]
        );

        assert!(view.plan_chunk(&HASH, SIZE, &keep).is_noop());
    }

    #[test]
    fn surplus_prefers_keeping_nodes_on_the_ring() {
        // 2 is suspect, so not on the ring: it is the surplus one whatever the ring says.
        let view = ClusterView::new(vec![up(1), node(2, Liveness::Suspect, false), up(3), up(4)], 3);
        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 3, 4]);
        assert_eq!(dropped(&plan), vec![(2, DropReason::Surplus)]);
        assert_eq!(plan.drops[0].keep, vec![1, 3, 4]);
    }

    #[test]
    fn suspect_replicas_count_so_nothing_is_copied() {
        let view = ClusterView::new(
            vec![up(1), node(2, Liveness::Suspect, false), node(3, Liveness::Suspect, false), up(4), up(5)],
            3,
        );
        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 3]);
        assert_eq!(plan.live, 3);
        assert!(plan.is_noop(), "{plan:?}");

        let plan = view.plan_chunk(&HASH, SIZE, &[2, 3]);
        assert_eq!(plan.live, 2);
        assert_eq!(plan.copies.len(), 1);
        assert!([1, 4, 5].contains(&plan.copies[0].target));
    }

    #[test]
    fn degraded_replica_counts_but_is_never_a_target() {
        let view = ClusterView::new(vec![up(1), up(2), node(3, Liveness::Degraded, false), up(4)], 3);
        assert!(view.plan_chunk(&HASH, SIZE, &[1, 2, 3]).is_noop());

        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2]);
        assert_eq!(targets(&plan), vec![4]);

        let view = ClusterView::new(vec![up(1), up(2), node(3, Liveness::Degraded, false)], 3);
        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2]);
        assert!(plan.copies.is_empty(), "{plan:?}");
        assert_eq!(plan.unplaceable, 1);
        assert!(!plan.lost);
    }

    #[test]
    fn weightless_node_counts_but_is_never_a_target() {
        let mut weightless = up(3);
        weightless.weight = 0;
        let view = ClusterView::new(vec![up(1), up(2), weightless, up(4)], 3);
        assert!(view.plan_chunk(&HASH, SIZE, &[1, 2, 3]).is_noop());
        assert_eq!(targets(&view.plan_chunk(&HASH, SIZE, &[1, 2])), vec![4]);
    }

    #[test]
    fn unknown_node_is_treated_as_down() {
        let view = ClusterView::new((1..=4).map(up).collect(), 3);
        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 99]);
        assert_eq!(plan.live, 2);
        assert_eq!(plan.copies.len(), 1);
        let copy = &plan.copies[0];
        assert!([3, 4].contains(&copy.target), "{copy:?}");
        assert_eq!(sorted(copy.sources.clone()), vec![1, 2]);

        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 99, copy.target]);
        assert_eq!(dropped(&plan), vec![(99, DropReason::NodeDown)]);
        assert_eq!(plan.drops[0].keep, sorted(vec![1, 2, copy.target]));
    }

    #[test]
    fn all_replicas_down_is_lost() {
        let view = ClusterView::new(
            vec![node(1, Liveness::Down, false), node(2, Liveness::Down, true), up(3), up(4), up(5)],
            3,
        );
        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 77]);
        assert!(plan.lost);
        assert_eq!(plan.live, 0);
        assert!(plan.copies.is_empty() && plan.drops.is_empty(), "{plan:?}");
        assert!(plan.under_replicated());
        assert_eq!(plan.unplaceable, 0);

        // A chunk with no record at all is lost too: nothing to copy from.
        assert!(view.plan_chunk(&HASH, SIZE, &[]).lost);
    }

    #[test]
    fn too_few_nodes_is_unplaceable() {
        let view = ClusterView::new(vec![up(1), up(2), node(3, Liveness::Down, false)], 3);
        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 3]);
        assert!(plan.copies.is_empty());
        assert!(plan.drops.is_empty());
        assert_eq!(plan.unplaceable, 1);
        assert!(!plan.lost);

        // Only one readable replica and one free node: one copy, one unplaceable.
        let view = ClusterView::new(vec![up(1), node(2, Liveness::Down, false), up(3)], 3);
        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2]);
        assert_eq!(targets(&plan), vec![3]);
        assert_eq!(plan.unplaceable, 1);
    }

    #[test]
    fn duplicated_ids_count_once() {
        let view = ClusterView::new((1..=4).map(up).collect(), 3);
        let plan = view.plan_chunk(&HASH, SIZE, &[1, 1, 2, 2, 3, 3]);
        assert_eq!(plan.live, 3);
        assert!(plan.is_noop());

        let plan = view.plan_chunk(&HASH, SIZE, &[2, 1, 1, 2]);
        assert_eq!(plan.live, 2);
        assert_eq!(plan.copies.len(), 1);
        assert!([3, 4].contains(&plan.copies[0].target));
        assert_eq!(plan.copies[0].sources.len(), 2);
        assert_eq!(plan, view.plan_chunk(&HASH, SIZE, &[1, 2]));
    }

    #[test]
    fn sources_order_counting_then_healthy() {
        let view = ClusterView::new(
            vec![
                node(1, Liveness::Suspect, false),
                node(2, Liveness::Up, true),
                node(3, Liveness::Down, false),
                up(4),
                up(5),
                node(6, Liveness::Suspect, true),
            ],
            3,
        );
        let plan = view.plan_chunk(&HASH, SIZE, &[1, 2, 3, 4, 6]);
        assert_eq!(plan.live, 2);
        assert_eq!(targets(&plan), vec![5]);
        assert_eq!(plan.copies[0].sources, vec![4, 1, 2, 6]);
    }

    #[test]
    fn summary_and_urgency() {
        let view = ClusterView::new(vec![up(1), up(2), up(3), node(4, Liveness::Down, false), up(5)], 3);
        let healthy = view.plan_chunk(&HASH, 10, &[1, 2, 3]);
        let one_short = view.plan_chunk(&HASH, 10, &[1, 2, 4]);
        let two_short = view.plan_chunk(&HASH, 100, &[1]);
        let lost = view.plan_chunk(&HASH, 1000, &[4]);
        let surplus = view.plan_chunk(&HASH, 10, &[1, 2, 3, 4, 5]);

        let mut summary = PlanSummary::default();
        for (plan, size) in [(&healthy, 10), (&one_short, 10), (&two_short, 100), (&lost, 1000), (&surplus, 10)] {
            summary.add(plan, size);
        }
        assert_eq!(
            summary,
            PlanSummary {
                chunks: 5,
                under_replicated: 3,
                over_replicated: 1,
                lost: 1,
                unplaceable: 0,
                copies: 3,
                copy_bytes: 10 + 2 * 100,
                drops: 2,
            }
        );

        let mut plans = vec![&surplus, &healthy, &one_short, &lost, &two_short];
        plans.sort_by_key(|plan| urgency(plan));
        assert_eq!(plans, vec![&lost, &two_short, &one_short, &healthy, &surplus]);
        assert!(urgency(&two_short) < urgency(&one_short));
    }

    // Property tests over random clusters.

    #[derive(Debug, Clone)]
    struct Case {
        nodes: Vec<NodeState>,
        replication_factor: usize,
        replicas: Vec<NodeId>,
        hash: ChunkHash,
    }

    /// Ids above the cluster's size (at most 8) are unknown nodes.
    const REPLICA_ID_MAX: NodeId = 10;

    fn liveness_strategy() -> impl Strategy<Value = Liveness> {
        prop_oneof![
            4 => Just(Liveness::Up),
            1 => Just(Liveness::Suspect),
            1 => Just(Liveness::Down),
            1 => Just(Liveness::Degraded),
        ]
    }

    fn case_strategy() -> impl Strategy<Value = Case> {
        (3usize..=8, 1usize..=3)
            .prop_flat_map(|(n_nodes, n_zones)| {
                proptest::collection::vec(
                    (
                        liveness_strategy(),
                        proptest::bool::weighted(0.2),
                        0..n_zones,
                        prop_oneof![1 => Just(0u32), 4 => Just(100u32), 2 => Just(250u32)],
                    ),
                    n_nodes,
                )
            })
            .prop_map(|specs| {
                (1..)
                    .zip(specs)
                    .map(|(id, (liveness, draining, zone_idx, weight))| NodeState {
                        id,
                        zone: format!("z{zone_idx}"),
                        weight,
                        liveness,
                        draining,
                    })
                    .collect::<Vec<NodeState>>()
            })
            .prop_flat_map(|nodes| {
                (Just(nodes), 1usize..=4, proptest::collection::vec(1..=REPLICA_ID_MAX, 0..8), any::<[u8; 32]>())
            })
            .prop_map(|(nodes, replication_factor, replicas, hash)| Case {
                nodes,
                replication_factor,
                replicas,
                hash: ChunkHash::from_bytes(hash),
            })
    }

    fn counting(view: &ClusterView, replicas: &[NodeId]) -> usize {
        let listed: BTreeSet<NodeId> = replicas.iter().copied().collect();
        listed.iter().filter(|&&id| view.node(id).is_some_and(NodeState::counts)).count()
    }

    /// Records what executors would: targets gain the chunk, dropped nodes lose it, provided
    /// their `keep` nodes are still listed (checked, since the planner promises it).
    fn apply(replicas: &mut Vec<NodeId>, plan: &ChunkPlan) -> Result<(), TestCaseError> {
        replicas.extend(plan.copies.iter().map(|copy| copy.target));
        for drop in &plan.drops {
            for kept in &drop.keep {
                prop_assert!(replicas.contains(kept), "keep {kept} no longer listed when dropping {drop:?}");
            }
            replicas.retain(|&id| id != drop.node);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prop_plans_respect_the_invariants(case in case_strategy()) {
            let view = ClusterView::new(case.nodes.clone(), case.replication_factor);
            let rf = view.replication_factor();
            let plan = view.plan_chunk(&case.hash, SIZE, &case.replicas);
            let listed: BTreeSet<NodeId> = case.replicas.iter().copied().collect();
            let readable = |id: NodeId| view.node(id).is_some_and(NodeState::readable);

            prop_assert_eq!(plan.replication_factor, rf);
            prop_assert_eq!(plan.live, counting(&view, &case.replicas));
            prop_assert!(plan.copies.is_empty() || plan.drops.is_empty());

            let mut seen_targets = BTreeSet::new();
            for copy in &plan.copies {
                prop_assert!(!listed.contains(&copy.target), "copy to a listed node: {:?}", copy);
                prop_assert!(view.node(copy.target).is_some_and(NodeState::accepts_new), "bad target: {:?}", copy);
                prop_assert!(seen_targets.insert(copy.target), "target twice: {:?}", copy);
                prop_assert!(!copy.sources.is_empty());
                prop_assert_eq!((copy.hash, copy.size), (case.hash, SIZE));
                prop_assert_eq!(&copy.sources, &plan.copies[0].sources);
                let distinct: BTreeSet<NodeId> = copy.sources.iter().copied().collect();
                prop_assert_eq!(distinct.len(), copy.sources.len());
                for &source in &copy.sources {
                    prop_assert!(listed.contains(&source) && readable(source), "bad source {} in {:?}", source, copy);
                }
            }

            let any_readable = listed.iter().any(|&id| readable(id));
            if plan.live < rf {
                prop_assert!(plan.drops.is_empty(), "drop while under-replicated: {:?}", plan);
                prop_assert_eq!(plan.lost, !any_readable);
                if !plan.lost {
                    prop_assert_eq!(plan.copies.len() + plan.unplaceable, rf - plan.live);
                    // Every readable listed replica is offered as a source.
                    let n_readable = listed.iter().filter(|&&id| readable(id)).count();
                    for copy in &plan.copies {
                        prop_assert_eq!(copy.sources.len(), n_readable);
                    }
                }
            } else {
                prop_assert!(plan.copies.is_empty() && !plan.lost && plan.unplaceable == 0, "{:?}", plan);
                // Every record that is not a kept counting replica is dropped.
                prop_assert_eq!(plan.drops.len(), listed.len() - rf);
            }
            for drop in &plan.drops {
                prop_assert!(listed.contains(&drop.node));
                prop_assert!(!drop.keep.contains(&drop.node), "drop of a kept node: {:?}", drop);
                prop_assert_eq!(drop.keep.len(), rf);
                prop_assert_eq!(&drop.keep, &plan.drops[0].keep);
                for kept in &drop.keep {
                    prop_assert!(listed.contains(kept) && view.node(*kept).is_some_and(NodeState::counts));
                }
                let expected = match view.node(drop.node) {
                    None => DropReason::NodeDown,
                    Some(node) if !node.readable() => DropReason::NodeDown,
                    Some(node) if node.draining => DropReason::Drained,
                    Some(_) => DropReason::Surplus,
                };
                prop_assert_eq!(drop.reason, expected);
            }
        }

        #[test]
        fn prop_drops_never_leave_fewer_than_rf_counting(case in case_strategy()) {
            let view = ClusterView::new(case.nodes.clone(), case.replication_factor);
            let plan = view.plan_chunk(&case.hash, SIZE, &case.replicas);
            let before = counting(&view, &case.replicas);
            let mut after_drops = case.replicas.clone();
            after_drops.retain(|id| !plan.drops.iter().any(|drop| drop.node == *id));
            let after = counting(&view, &after_drops);
            if plan.drops.is_empty() {
                prop_assert_eq!(after, before);
            } else {
                // Exactly the kept replicas remain counting: the surplus goes, nothing more.
                prop_assert!(after >= view.replication_factor(), "{} counting left after {:?}", after, plan);
                prop_assert_eq!(after, view.replication_factor());
            }
        }

        #[test]
        fn prop_repair_reaches_a_fixpoint(case in case_strategy()) {
            let view = ClusterView::new(case.nodes.clone(), case.replication_factor);
            let rf = view.replication_factor();
            let n_accepting = case.nodes.iter().filter(|node| node.accepts_new()).count();
            let any_readable = case.replicas.iter().any(|&id| view.node(id).is_some_and(NodeState::readable));
            prop_assume!(n_accepting >= rf && any_readable);

            let mut replicas = case.replicas.clone();
            let mut plan = view.plan_chunk(&case.hash, SIZE, &replicas);
            for _round in 0..2 {
                apply(&mut replicas, &plan)?;
                plan = view.plan_chunk(&case.hash, SIZE, &replicas);
            }
            prop_assert!(plan.is_noop(), "not a fixpoint after 3 plans: {:?} for {:?}", plan, replicas);
            prop_assert_eq!(plan.live, rf);
            prop_assert!(!plan.under_replicated() && !plan.lost && plan.unplaceable == 0);
            let distinct: BTreeSet<NodeId> = replicas.iter().copied().collect();
            prop_assert_eq!(distinct.len(), rf, "only counting replicas remain: {:?}", replicas);
        }

        #[test]
        fn prop_partial_execution_replans_only_what_is_missing(case in case_strategy(), n_done in 0usize..4) {
            let view = ClusterView::new(case.nodes.clone(), case.replication_factor);
            let plan = view.plan_chunk(&case.hash, SIZE, &case.replicas);
            let n_done = n_done.min(plan.copies.len());
            let mut replicas = case.replicas.clone();
            replicas.extend(plan.copies[..n_done].iter().map(|copy| copy.target));
            let replan = view.plan_chunk(&case.hash, SIZE, &replicas);
            prop_assert_eq!(replan.live, plan.live + n_done);
            prop_assert_eq!(replan.copies.len(), plan.copies.len() - n_done);
            prop_assert_eq!(replan.unplaceable, plan.unplaceable);
            for copy in &replan.copies {
                prop_assert!(!replicas.contains(&copy.target));
            }
        }

        #[test]
        fn prop_plans_are_deterministic(case in case_strategy()) {
            let view = ClusterView::new(case.nodes.clone(), case.replication_factor);
            let plan = view.plan_chunk(&case.hash, SIZE, &case.replicas);
            prop_assert_eq!(&plan, &view.plan_chunk(&case.hash, SIZE, &case.replicas));

            // Neither the order of the nodes, nor that of the record, nor duplicates matter.
            let mut nodes = case.nodes.clone();
            nodes.reverse();
            let reordered = ClusterView::new(nodes, case.replication_factor);
            let mut replicas: Vec<NodeId> = case.replicas.iter().rev().copied().collect();
            replicas.extend_from_slice(&case.replicas);
            prop_assert_eq!(&plan, &reordered.plan_chunk(&case.hash, SIZE, &replicas));
        }
    }
}
