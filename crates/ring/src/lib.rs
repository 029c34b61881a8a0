//! Consistent-hash chunk placement: membership in, replica targets out.
//!
//! Every storage node is scattered over a 64-bit circle as many *virtual points* (vnodes), more
//! points for a node with more capacity. A chunk's key (its 32-byte BLAKE3 hash) is itself a
//! point on the circle; its replicas go to the nodes owning the points met by walking clockwise
//! from it. Because a node's points are fixed by its id alone, adding or removing a node only
//! moves the chunks whose walk meets that node's points, about `1/N` of the copies, instead of
//! reshuffling everything as `hash % N` would. Many points per node make each node's share of
//! the circle close to proportional to its weight (the arcs of one point vary a lot; the sum
//! of a hundred arcs does not).
//!
//! The walk prefers distinct zones: it first takes the first node of each zone not yet used,
//! and only when the eligible nodes span fewer zones than the replication factor does a
//! second walk fill the remaining slots with further distinct nodes, whatever their zone. So a
//! zone failure loses at most one copy whenever the cluster has enough zones.
//!
//! The ring proposes, the metadata records (docs/design/write-and-read-path.md): the placement computed here
//! is used when a chunk is written and when repair needs a new target; where copies actually
//! are is the metadata's business. Even so, every node must compute the same answer from the
//! same membership, so the vnode positions (see [`Ring::with_vnodes`]) are a cluster-wide
//! contract, pinned by a test.
//!
//! This module is pure: it knows nothing about the network, the disk, clocks or randomness.
//! Building a ring costs one BLAKE3 hash of 12 bytes per vnode and a sort; a placement costs a
//! binary search plus a walk that is bounded by the number of vnodes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

pub use mendfs_types::NodeId;

/// One storage node as the ring sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingNode {
    /// The node's membership id; also the only input to its vnode positions, so a node keeps
    /// its place on the circle across restarts, address changes and zone moves.
    pub id: NodeId,
    /// Failure domain (rack, room, availability zone). Replicas of one chunk prefer distinct
    /// zones. Compared as an exact string.
    pub zone: String,
    /// Relative capacity on a scale where [`Ring::WEIGHT_NORMAL`] (100) is one ordinary node:
    /// a node of weight 200 receives about twice the data of a node of weight 100. Weight 0
    /// receives nothing (it has no vnodes) but is still listed by [`Ring::nodes`].
    pub weight: u32,
}

/// The placement ring built from one membership snapshot. Immutable: build a new one when the
/// membership changes.
#[derive(Clone)]
pub struct Ring {
    /// Members sorted by id, one entry per id.
    nodes: Vec<RingNode>,
    /// Zone index (into the sorted list of zone names) of `nodes[i]`; comparing small integers
    /// in the walk is cheaper than comparing strings.
    node_zone_idx: Vec<u32>,
    /// Number of distinct zones among nodes that have vnodes; the zone-preferring walk can stop
    /// as soon as it has used them all.
    n_zones_with_vnodes: usize,
    /// Number of nodes that have vnodes: no placement can return more than this.
    n_nodes_with_vnodes: usize,
    /// Vnode positions, sorted ascending (ties broken by node id). Kept apart from
    /// `vnode_owner_idx` so the binary search touches only the positions.
    vnode_positions: Vec<u64>,
    /// `vnode_owner_idx[i]` is the index into `nodes` of the node owning `vnode_positions[i]`.
    vnode_owner_idx: Vec<u32>,
}

impl Ring {
    /// The weight of one ordinary node. Weights are relative, so the scale only matters
    /// together with `vnodes_per_weight`: a node of weight `WEIGHT_NORMAL` gets exactly
    /// `vnodes_per_weight` vnodes. A scale of 100 leaves room for nodes smaller than normal
    /// (weight 50 = half a node) without fractions.
    pub const WEIGHT_NORMAL: u32 = 100;

    /// Vnodes for a node of weight [`Ring::WEIGHT_NORMAL`] (so 1.28 vnodes per weight unit).
    ///
    /// Why 128: a node's share of the circle is a sum of its arcs, whose relative spread is
    /// about `1/sqrt(vnodes)`, so 128 points keep a normal node within roughly ±9% of its fair
    /// share (one standard deviation), and the copies that move when a node joins or leaves
    /// stay close to the ideal `1/N`. Four times more points would only halve that spread,
    /// while the ring's memory (12 bytes per vnode: 1.5 MB for 1,000 normal nodes) and its
    /// build time grow linearly.
    pub const DEFAULT_VNODES_PER_WEIGHT: u32 = 128;

    /// Upper bound on the vnodes of one node, so a mistyped weight (`u32::MAX`) cannot make
    /// the ring allocate gigabytes. With the default density it is reached at weight 51,200
    /// (512 normal nodes in one); heavier nodes are all treated as that heavy.
    pub const VNODES_PER_NODE_MAX: u32 = 65_536;

    /// Builds a ring with [`Ring::DEFAULT_VNODES_PER_WEIGHT`]; see [`Ring::with_vnodes`].
    pub fn new(nodes: &[RingNode]) -> Ring {
        Ring::with_vnodes(nodes, Ring::DEFAULT_VNODES_PER_WEIGHT)
    }

    /// Builds a ring where a node of weight `w` gets `round(w * vnodes_per_weight / 100)`
    /// vnodes, at least one if `w > 0` (a small node must still be reachable) and at most
    /// [`Ring::VNODES_PER_NODE_MAX`]. `vnodes_per_weight` is the vnode count of a node of
    /// weight [`Ring::WEIGHT_NORMAL`].
    ///
    /// Vnode `i` (counting from 0) of node `id` sits at the first 8 bytes, read as a big-endian
    /// `u64`, of `blake3(id as u64 big-endian ++ i as u32 big-endian)`. That formula is a
    /// cluster-wide contract: nodes running different versions must agree on it.
    ///
    /// The result does not depend on the order of `nodes`. Duplicate ids are a caller bug (the
    /// membership table has one row per id); they are resolved without regard to input order
    /// by keeping, for each id, the entry that sorts first by `(zone, weight)`, so the ring
    /// stays order-independent even then.
    pub fn with_vnodes(nodes: &[RingNode], vnodes_per_weight: u32) -> Ring {
        let mut nodes = nodes.to_vec();
        nodes.sort_by(|a, b| (a.id, &a.zone, a.weight).cmp(&(b.id, &b.zone, b.weight)));
        nodes.dedup_by_key(|node| node.id);

        let zone_idx_by_name: BTreeMap<&str, u32> =
            nodes.iter().map(|node| node.zone.as_str()).collect::<BTreeSet<&str>>().into_iter().zip(0u32..).collect();
        let node_zone_idx: Vec<u32> = nodes.iter().map(|node| zone_idx_by_name[node.zone.as_str()]).collect();

        let mut vnodes: Vec<(u64, u32)> = Vec::new();
        let mut zones_with_vnodes = BTreeSet::new();
        let mut n_nodes_with_vnodes = 0;
        for (node_idx, node) in (0u32..).zip(&nodes) {
            let n_vnodes = vnodes_for_weight(node.weight, vnodes_per_weight);
            if n_vnodes == 0 {
                continue;
            }
            n_nodes_with_vnodes += 1;
            zones_with_vnodes.insert(node_zone_idx[node_idx as usize]);
            vnodes.extend((0..n_vnodes).map(|vnode_idx| (vnode_position(node.id, vnode_idx), node_idx)));
        }
        // Sorting by (position, owner) makes ties (two vnodes at one position, which BLAKE3
        // makes astronomically unlikely) resolve the same way everywhere; owner indices follow
        // id order, so this does not depend on the input order either.
        vnodes.sort_unstable();
        let (vnode_positions, vnode_owner_idx) = vnodes.into_iter().unzip();

        Ring {
            nodes,
            node_zone_idx,
            n_zones_with_vnodes: zones_with_vnodes.len(),
            n_nodes_with_vnodes,
            vnode_positions,
            vnode_owner_idx,
        }
    }

    /// The members, sorted by id, one per id, including weight-0 nodes.
    pub fn nodes(&self) -> &[RingNode] {
        &self.nodes
    }

    /// Total number of vnodes on the ring: the bound on the length of any placement walk.
    pub fn n_vnodes(&self) -> usize {
        self.vnode_positions.len()
    }

    /// `replicas` distinct nodes for a chunk whose key is its 32-byte BLAKE3 hash, in
    /// preference order (the first is the primary), preferring distinct zones. Returns fewer
    /// only if fewer nodes with a non-zero weight exist.
    pub fn place(&self, key: &[u8; 32], replicas: usize) -> Vec<NodeId> {
        self.place_excluding(key, replicas, &BTreeSet::new())
    }

    /// Like [`Ring::place`], never choosing a node in `excluded`: nodes that are down,
    /// draining or degraded, or that already hold a copy when repair looks for new targets.
    /// The result is exactly what `place` returns on a ring built without the excluded nodes
    /// (a node's vnodes depend on its id alone), so excluding a node for a while moves only the
    /// copies it would have held, just as removing it would.
    ///
    /// The first `min(replicas, zones)` entries are in distinct zones, where `zones` counts
    /// the zones of the eligible (weighted, not excluded) nodes; returns
    /// `min(replicas, eligible nodes)` entries.
    pub fn place_excluding(&self, key: &[u8; 32], replicas: usize, excluded: &BTreeSet<NodeId>) -> Vec<NodeId> {
        let n_wanted = replicas.min(self.n_nodes_with_vnodes);
        if n_wanted == 0 {
            return Vec::new();
        }
        // BLAKE3 output is uniform, so its first 8 bytes are a uniform point on the circle;
        // two keys sharing those 8 bytes simply share a placement.
        let mut key_position_bytes = [0u8; 8];
        key_position_bytes.copy_from_slice(&key[..8]);
        let key_position = u64::from_be_bytes(key_position_bytes);
        // First vnode at or after the key; `start == len` wraps to vnode 0 in `walk`.
        let start = self.vnode_positions.partition_point(|&position| position < key_position);

        // Node indices into `self.nodes`, in preference order. `contains` on it is linear in
        // the replication factor, which is tiny (3 in practice), so a set would cost more.
        let mut chosen: Vec<u32> = Vec::with_capacity(n_wanted);
        let is_eligible = |chosen: &[u32], node_idx: u32| {
            !chosen.contains(&node_idx) && !excluded.contains(&self.nodes[node_idx as usize].id)
        };

        // Walk 1: one node per zone not yet used. It may stop early once every zone that has
        // vnodes is used, since no further node can add a new zone.
        let mut zones_used: Vec<u32> = Vec::with_capacity(n_wanted);
        for node_idx in self.walk(start) {
            if chosen.len() == n_wanted || zones_used.len() == self.n_zones_with_vnodes {
                break;
            }
            let zone_idx = self.node_zone_idx[node_idx as usize];
            if !zones_used.contains(&zone_idx) && is_eligible(&chosen, node_idx) {
                chosen.push(node_idx);
                zones_used.push(zone_idx);
            }
        }

        // Walk 2, only when the eligible nodes span fewer zones than wanted: fill up with
        // further distinct nodes in walk order, whatever their zone.
        if chosen.len() < n_wanted {
            for node_idx in self.walk(start) {
                if chosen.len() == n_wanted {
                    break;
                }
                if is_eligible(&chosen, node_idx) {
                    chosen.push(node_idx);
                }
            }
        }

        chosen.into_iter().map(|node_idx| self.nodes[node_idx as usize].id).collect()
    }

    /// Owners of the vnodes clockwise from vnode `start`, once around the circle: exactly
    /// `n_vnodes` items, so every walk terminates.
    fn walk(&self, start: usize) -> impl Iterator<Item = u32> + '_ {
        self.vnode_owner_idx[start..].iter().chain(&self.vnode_owner_idx[..start]).copied()
    }
}

impl fmt::Debug for Ring {
    /// Lists the members but only counts the vnodes: printing thousands of positions helps
    /// nobody.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("Ring").field("nodes", &self.nodes).field("n_vnodes", &self.n_vnodes()).finish()
    }
}

/// `round(weight * vnodes_per_weight / WEIGHT_NORMAL)`, at least 1 for a non-zero weight and
/// at most [`Ring::VNODES_PER_NODE_MAX`]. Computed in `u64`, which cannot overflow for any
/// `u32` inputs.
fn vnodes_for_weight(weight: u32, vnodes_per_weight: u32) -> u32 {
    if weight == 0 {
        return 0;
    }
    let normal = u64::from(Ring::WEIGHT_NORMAL);
    let rounded = (u64::from(weight) * u64::from(vnodes_per_weight) + normal / 2) / normal;
    // The clamp keeps the value within u32, so the fallback is never taken.
    u32::try_from(rounded.clamp(1, u64::from(Ring::VNODES_PER_NODE_MAX))).unwrap_or(Ring::VNODES_PER_NODE_MAX)
}

/// The position of vnode `vnode_idx` of node `node_id`: the first 8 bytes, big-endian, of
/// `blake3(node_id BE ++ vnode_idx BE)`. Part of the cluster-wide contract; see
/// [`Ring::with_vnodes`].
fn vnode_position(node_id: NodeId, vnode_idx: u32) -> u64 {
    let mut input = [0u8; 12];
    input[..8].copy_from_slice(&node_id.to_be_bytes());
    input[8..].copy_from_slice(&vnode_idx.to_be_bytes());
    let hash = blake3::hash(&input);
    let mut position_bytes = [0u8; 8];
    position_bytes.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_be_bytes(position_bytes)
}

#[cfg(test)]
mod tests;
