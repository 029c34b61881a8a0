//! The repair planner for erasure-coded chunks: from where each shard of a stripe is recorded
//! and how the nodes are doing, the shards to rebuild, the shards to move, and the records
//! that may go.
//!
//! A stripe of K data and M parity shards survives any M losses, so what matters is how many
//! shards are left: a stripe with K + M live shards is whole, one with fewer than K is lost.
//! Every shard of a stripe lives on a node of its own (a node's death must cost a stripe one
//! shard, not two), so targets are chosen by the ring away from every node listed for any shard
//! of the stripe. A lost shard is *rebuilt* by its target from K other shards (it reads K
//! shards to write one: the traffic the note reports); a shard that is still readable but on a
//! draining node is *moved* (one shard read). Like [`crate::planner`], the plan comes from the
//! record alone, so it is idempotent, and it never lowers redundancy: a shard's extra record is
//! dropped only while the shard has a counting copy elsewhere, named in the drop's `keep`.
//!
//! Pure: no I/O, no clock.

use std::collections::BTreeSet;

use mendfs_types::ChunkHash;

use crate::planner::{ClusterView, DropReason, NodeState};
use crate::NodeId;

/// Where one shard of a stripe is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardCopies {
    /// The shard's BLAKE3 hash (shards are content-addressed like chunks).
    pub hash: ChunkHash,
    /// Nodes listed for it, in any order, duplicates allowed; one in a healthy stripe.
    pub nodes: Vec<NodeId>,
}

/// Re-create shard `index` on `target` from `sources`: K other shards, each with the node to
/// read it from. The target verifies every shard it reads and the one it builds by hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildTask {
    pub index: usize,
    pub hash: ChunkHash,
    pub target: NodeId,
    /// Exactly K (shard index, node) pairs, by shard index; data shards first when readable,
    /// so a rebuild of a parity shard is a plain encode.
    pub sources: Vec<(usize, NodeId)>,
}

/// Copy shard `index` (readable, but on nodes that no longer count: draining) to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveTask {
    pub index: usize,
    pub hash: ChunkHash,
    pub target: NodeId,
    pub sources: Vec<NodeId>,
}

/// Stop listing `node` for shard `index`, provided `keep` is still listed for it when applied.
/// By index, not hash: a stripe may name one shard hash in two slots (a tiny chunk's padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardDropTask {
    pub index: usize,
    pub hash: ChunkHash,
    pub node: NodeId,
    pub keep: NodeId,
    pub reason: DropReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StripePlan {
    /// K and K + M.
    pub data_shards: usize,
    pub total_shards: usize,
    /// Shards with a copy on a node that counts ([`NodeState::counts`]).
    pub live: usize,
    /// Fewer than K shards readable: nothing can rebuild it.
    pub lost: bool,
    pub rebuilds: Vec<RebuildTask>,
    pub moves: Vec<MoveTask>,
    pub drops: Vec<ShardDropTask>,
    /// Shards wanted elsewhere for which no eligible node is left (too few nodes for K + M).
    pub unplaceable: usize,
}

impl StripePlan {
    /// Shards left above the K needed: 0 is one more loss from unrecoverable. Repair runs the
    /// stripes with the fewest first.
    pub fn margin(&self) -> usize {
        self.live.saturating_sub(self.data_shards)
    }

    pub fn under_redundant(&self) -> bool {
        self.live < self.total_shards
    }
}

impl ClusterView {
    /// The plan for one stripe, keyed by its chunk's hash (placement), with `data_shards` = K
    /// and `shards[i]` where shard `i` is recorded.
    pub fn plan_stripe(&self, key: &ChunkHash, data_shards: usize, shards: &[ShardCopies]) -> StripePlan {
        let total_shards = shards.len();
        let mut plan = StripePlan { data_shards, total_shards, ..StripePlan::default() };
        let state = |id: NodeId| self.node(id);
        let counts = |id: NodeId| state(id).is_some_and(NodeState::counts);
        let readable = |id: NodeId| state(id).is_some_and(NodeState::readable);
        let up = |id: NodeId| state(id).is_some_and(|node| node.liveness == crate::detector::Liveness::Up);

        // Per shard, its distinct listed nodes, sorted: the plan must not depend on order.
        let listed: Vec<Vec<NodeId>> = shards
            .iter()
            .map(|shard| shard.nodes.iter().copied().collect::<BTreeSet<_>>().into_iter().collect())
            .collect();
        let counting: Vec<Option<NodeId>> =
            listed.iter().map(|nodes| best(nodes.iter().copied().filter(|&id| counts(id)), &up)).collect();
        let readable_at: Vec<Option<NodeId>> =
            listed.iter().map(|nodes| best(nodes.iter().copied().filter(|&id| readable(id)), &up)).collect();
        plan.live = counting.iter().flatten().count();
        let readable_shards = readable_at.iter().flatten().count();
        if readable_shards < data_shards.max(1) {
            plan.lost = true;
            return plan;
        }

        // Shards short of a counting copy: moved when still readable, rebuilt when not.
        // Unreadable shards first: when eligible targets are short, a rebuild (nothing else can
        // restore that shard) takes one before a move (the shard still reads where it is).
        let mut wanted: Vec<usize> = (0..total_shards).filter(|&i| counting[i].is_none()).collect();
        wanted.sort_by_key(|&i| (readable_at[i].is_some(), i));
        if !wanted.is_empty() {
            let occupied: BTreeSet<NodeId> = listed.iter().flatten().copied().collect();
            let targets = self.ring().place_excluding(key, wanted.len(), &occupied);
            plan.unplaceable = wanted.len() - targets.len();
            // Sources for rebuilds: K readable shards, those that count and are up first, then
            // data before parity (decoding is cheapest from data), then by index.
            let mut candidates: Vec<(usize, NodeId)> =
                (0..total_shards).filter_map(|i| readable_at[i].map(|node| (i, node))).collect();
            candidates.sort_by_key(|&(i, node)| (counting[i].is_none(), !up(node), i >= data_shards, i));
            let mut sources: Vec<(usize, NodeId)> = candidates.into_iter().take(data_shards).collect();
            sources.sort_unstable();
            for (&index, target) in wanted.iter().zip(targets) {
                let hash = shards[index].hash;
                match readable_at[index] {
                    Some(_) => {
                        let mut from: Vec<NodeId> = listed[index].iter().copied().filter(|&id| readable(id)).collect();
                        from.sort_by_key(|&id| (!up(id), id));
                        plan.moves.push(MoveTask { index, hash, target, sources: from });
                    }
                    None => plan.rebuilds.push(RebuildTask { index, hash, target, sources: sources.clone() }),
                }
            }
        }

        // Records that may go: only of a shard that keeps a counting copy, which the drop names.
        for (index, nodes) in listed.iter().enumerate() {
            let Some(keep) = counting[index] else { continue };
            for &node in nodes {
                if node == keep {
                    continue;
                }
                let reason = if !readable(node) {
                    DropReason::NodeDown
                } else if !counts(node) {
                    DropReason::Drained
                } else {
                    DropReason::Surplus
                };
                plan.drops.push(ShardDropTask { index, hash: shards[index].hash, node, keep, reason });
            }
        }
        plan
    }
}

/// The node to rely on among `nodes` (sorted): the first that is up, else the first.
fn best(nodes: impl Iterator<Item = NodeId>, up: &impl Fn(NodeId) -> bool) -> Option<NodeId> {
    let nodes: Vec<NodeId> = nodes.collect();
    nodes.iter().copied().find(|&id| up(id)).or_else(|| nodes.first().copied())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::detector::Liveness;

    fn node(id: NodeId, liveness: Liveness, draining: bool) -> NodeState {
        NodeState { id, zone: format!("z{id}"), weight: mendfs_ring::Ring::WEIGHT_NORMAL, liveness, draining }
    }

    fn view(states: &[(NodeId, Liveness, bool)]) -> ClusterView {
        ClusterView::new(states.iter().map(|&(id, l, d)| node(id, l, d)).collect(), 3)
    }

    fn up_nodes(n: u64) -> Vec<(NodeId, Liveness, bool)> {
        (1..=n).map(|id| (id, Liveness::Up, false)).collect()
    }

    fn shards(placement: &[&[NodeId]]) -> Vec<ShardCopies> {
        placement
            .iter()
            .enumerate()
            .map(|(i, nodes)| ShardCopies { hash: ChunkHash::from_bytes([i as u8 + 1; 32]), nodes: nodes.to_vec() })
            .collect()
    }

    const KEY: ChunkHash = ChunkHash::from_bytes([9; 32]);

    #[test]
    fn a_whole_stripe_needs_nothing() {
        let plan = view(&up_nodes(8)).plan_stripe(&KEY, 4, &shards(&[&[1], &[2], &[3], &[4], &[5], &[6]]));
        assert_eq!((plan.live, plan.lost, plan.margin()), (6, false, 2));
        assert!(plan.rebuilds.is_empty() && plan.moves.is_empty() && plan.drops.is_empty());
        assert!(!plan.under_redundant());
    }

    #[test]
    fn two_dead_nodes_mean_two_rebuilds_on_fresh_nodes_from_k_shards() {
        let mut nodes = up_nodes(8);
        nodes[1].1 = Liveness::Down; // node 2
        nodes[4].1 = Liveness::Down; // node 5
        let plan = view(&nodes).plan_stripe(&KEY, 4, &shards(&[&[1], &[2], &[3], &[4], &[5], &[6]]));
        assert_eq!((plan.live, plan.margin()), (4, 0));
        assert_eq!(plan.rebuilds.len(), 2);
        let mut targets: Vec<NodeId> = plan.rebuilds.iter().map(|r| r.target).collect();
        targets.sort_unstable();
        assert_eq!(targets, [7, 8], "the only nodes holding no shard of this stripe");
        for rebuild in &plan.rebuilds {
            assert_eq!(rebuild.sources, [(0, 1), (2, 3), (3, 4), (5, 6)]);
        }
        assert_eq!(plan.rebuilds[0].index, 1);
        assert_eq!(plan.rebuilds[1].index, 4);
        // The dead nodes' records stay until the shards exist again elsewhere.
        assert!(plan.drops.is_empty());
    }

    #[test]
    fn fewer_than_k_readable_shards_is_lost_and_plans_nothing() {
        let mut nodes = up_nodes(8);
        for dead in [1, 2, 3] {
            nodes[dead].1 = Liveness::Down;
        }
        let plan = view(&nodes).plan_stripe(&KEY, 4, &shards(&[&[1], &[2], &[3], &[4], &[5], &[6]]));
        assert!(plan.lost);
        assert_eq!(plan.live, 3);
        assert!(plan.rebuilds.is_empty() && plan.moves.is_empty() && plan.drops.is_empty());
    }

    #[test]
    fn a_draining_nodes_shard_is_moved_not_rebuilt_then_its_record_dropped() {
        let mut nodes = up_nodes(7);
        nodes[2].2 = true; // node 3 draining
        let stripe = shards(&[&[1], &[2], &[3], &[4], &[5], &[6]]);
        let plan = view(&nodes).plan_stripe(&KEY, 4, &stripe);
        assert!(plan.rebuilds.is_empty());
        assert_eq!(plan.moves, [MoveTask { index: 2, hash: stripe[2].hash, target: 7, sources: vec![3] }]);
        // Once the move is recorded, the draining node's record goes, on condition.
        let moved = shards(&[&[1], &[2], &[3, 7], &[4], &[5], &[6]]);
        let plan = view(&nodes).plan_stripe(&KEY, 4, &moved);
        assert!(plan.moves.is_empty() && plan.rebuilds.is_empty());
        assert_eq!(
            plan.drops,
            [ShardDropTask { index: 2, hash: moved[2].hash, node: 3, keep: 7, reason: DropReason::Drained }]
        );
    }

    #[test]
    fn a_returning_node_leaves_a_surplus_record_that_goes() {
        // Shard 1 was rebuilt on node 7 while node 2 was down; node 2 is back with its copy.
        let stripe = shards(&[&[1], &[2, 7], &[3], &[4], &[5], &[6]]);
        let plan = view(&up_nodes(7)).plan_stripe(&KEY, 4, &stripe);
        assert_eq!(plan.drops.len(), 1);
        assert_eq!(plan.drops[0].reason, DropReason::Surplus);
        assert_eq!(plan.drops[0].index, 1);
        assert_ne!(plan.drops[0].keep, plan.drops[0].node);
    }

    #[test]
    fn too_few_nodes_leave_shards_unplaceable() {
        let mut nodes = up_nodes(6);
        nodes[5].1 = Liveness::Down;
        let plan = view(&nodes).plan_stripe(&KEY, 4, &shards(&[&[1], &[2], &[3], &[4], &[5], &[6]]));
        assert_eq!((plan.unplaceable, plan.rebuilds.len()), (1, 0), "no node without a shard of it");
    }

    /// K, M, each node's liveness and draining flag, and each shard's listed nodes.
    type Scenario = (usize, usize, Vec<(Liveness, bool)>, Vec<Vec<u64>>);

    fn scenario() -> impl Strategy<Value = Scenario> {
        (1usize..=6, 1usize..=3, 3usize..=12).prop_flat_map(|(k, m, n)| {
            let states = proptest::collection::vec(
                (
                    prop_oneof![
                        Just(Liveness::Up),
                        Just(Liveness::Suspect),
                        Just(Liveness::Down),
                        Just(Liveness::Degraded)
                    ],
                    any::<bool>(),
                ),
                n,
            );
            let placement = proptest::collection::vec(proptest::collection::vec(1..=n as u64 + 1, 0..3), k + m);
            (Just(k), Just(m), states, placement)
        })
    }

    proptest! {
        /// Whatever the stripe's records and the nodes' states: no drop takes a shard's last
        /// counting copy, every target is a node that accepts data and holds no shard of the
        /// stripe, targets are distinct, a rebuild reads exactly K readable shards other than
        /// its own, and a lost stripe plans nothing.
        #[test]
        fn plans_never_lower_redundancy_and_spread_shards((k, m, states, placement) in scenario()) {
            let nodes: Vec<NodeState> = states.iter().enumerate().map(|(i, &(l, d))| node(i as u64 + 1, l, d)).collect();
            let by_id: BTreeMap<NodeId, NodeState> = nodes.iter().map(|n| (n.id, n.clone())).collect();
            let view = ClusterView::new(nodes, 3);
            let stripe: Vec<ShardCopies> = placement.iter().enumerate()
                .map(|(i, nodes)| ShardCopies { hash: ChunkHash::from_bytes([i as u8 + 1; 32]), nodes: nodes.clone() })
                .collect();
            let plan = view.plan_stripe(&KEY, k, &stripe);
            prop_assert_eq!(plan.total_shards, k + m);
            let occupied: BTreeSet<NodeId> = placement.iter().flatten().copied().collect();
            let counts = |id: NodeId| by_id.get(&id).is_some_and(NodeState::counts);
            let readable = |id: NodeId| by_id.get(&id).is_some_and(NodeState::readable);
            if plan.lost {
                prop_assert!(plan.rebuilds.is_empty() && plan.moves.is_empty() && plan.drops.is_empty());
                return Ok(());
            }
            let mut targets = BTreeSet::new();
            for target in plan.rebuilds.iter().map(|r| r.target).chain(plan.moves.iter().map(|m| m.target)) {
                prop_assert!(by_id[&target].accepts_new());
                prop_assert!(!occupied.contains(&target));
                prop_assert!(targets.insert(target), "two shards to one node");
            }
            for rebuild in &plan.rebuilds {
                prop_assert_eq!(rebuild.sources.len(), k);
                for &(index, node) in &rebuild.sources {
                    prop_assert!(index != rebuild.index);
                    prop_assert!(placement[index].contains(&node) && readable(node));
                }
            }
            for drop in &plan.drops {
                prop_assert!(drop.keep != drop.node && counts(drop.keep));
                let shard = &stripe[drop.index];
                prop_assert!(shard.nodes.contains(&drop.keep) && shard.nodes.contains(&drop.node));
            }
        }
    }
}
