//! Erasure-coded chunks in the metadata (`docs/design/erasure-coding.md`).
//!
//! A striped chunk is listed in its write's chunk list like an inline one, by hash and size
//! without replicas; its shards travel beside the write (`Command::WithStripes`) and are kept
//! in `Stripes` (chunk hash → [`StripeRecord`]: the scheme, and per shard its hash and the
//! nodes holding it), with the references of the file versions that list the chunk.
//! `ShardIndex` (shard hash ++ node ++ chunk hash, one row per listed copy) answers "is this
//! file on node N referenced?" (garbage collection) with one exact probe, however many stripes
//! share the shard (a zero run shared by thousands of chunks of a sparse file), and "node N's
//! copy of this hash is bad" (scrub, readers) with the stripes to fix.
//!
//! One representation per chunk: a hash is in `Chunks`, `InlineChunks` or `Stripes`, never
//! two of them. A write of content the metadata already holds another way references that;
//! the shards it prepared are orphans, collected like any other. Shards themselves may
//! coincide (two chunks with the same zero-filled stretch have an identical shard); each
//! stripe lists its own, and a node's file is kept while any record lists it there.
//!
//! Pure: no I/O, no clock.

use mendfs_types::{ChunkHash, NodeId};
use serde::{Deserialize, Serialize};

use crate::files::CommittedChunk;
use crate::schema::{decode, encode, CommandError, CommandResult, StateStore, StoreError, Table};

pub use mendfs_erasure::Scheme;

/// Striped chunks one entry may carry: a segment's worth.
pub const STRIPES_PER_ENTRY_MAX: usize = crate::files::SEGMENT_CHUNKS_MAX;

/// One shard as the write that prepared it commits it: its hash and the node that fsynced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCommit {
    pub hash: ChunkHash,
    pub node: NodeId,
}

/// A striped chunk as its write commits it. Encoded with postcard, by position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeCommit {
    /// The chunk's hash, as the write's chunk list names it.
    pub chunk: ChunkHash,
    pub size: u64,
    pub scheme: Scheme,
    /// K + M, in shard order, each on a node of its own.
    pub shards: Vec<ShardCommit>,
}

/// Where one shard of a stripe is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSlot {
    pub hash: ChunkHash,
    /// One node in a whole stripe; two while a moved or rebuilt shard's old copy is listed.
    pub nodes: Vec<NodeId>,
}

/// `Stripes` row. Encoded with postcard, by position: append new fields at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeRecord {
    pub size: u64,
    pub scheme: Scheme,
    /// Committed file versions that list the chunk.
    pub refs: u64,
    pub shards: Vec<ShardSlot>,
}

pub fn get_stripe(store: &impl StateStore, chunk: &ChunkHash) -> Result<Option<StripeRecord>, StoreError> {
    store.get(Table::Stripes, chunk.as_ref())?.map(|bytes| decode(&bytes)).transpose()
}

fn index_key(shard: &ChunkHash, node: NodeId, chunk: &ChunkHash) -> [u8; 72] {
    let mut key = [0u8; 72];
    key[..32].copy_from_slice(shard.as_ref());
    key[32..40].copy_from_slice(&node.to_be_bytes());
    key[40..].copy_from_slice(chunk.as_ref());
    key
}

/// The (shard, node) pairs a stripe lists, each once (a stripe may name one shard in two slots:
/// the zero padding of a tiny chunk).
fn listed_copies(record: &StripeRecord) -> std::collections::BTreeSet<(ChunkHash, NodeId)> {
    record.shards.iter().flat_map(|slot| slot.nodes.iter().map(move |&node| (slot.hash, node))).collect()
}

/// Whether some stripe lists `shard` on `node`: one probe of the index.
pub fn shard_listed_on(store: &impl StateStore, shard: &ChunkHash, node: NodeId) -> Result<bool, StoreError> {
    Ok(!stripes_listing(store, shard, node, 1)?.is_empty())
}

/// Up to `limit` chunks whose stripes list `shard` on `node`.
pub fn stripes_listing(
    store: &impl StateStore,
    shard: &ChunkHash,
    node: NodeId,
    limit: usize,
) -> Result<Vec<ChunkHash>, StoreError> {
    let mut start = shard.as_ref().to_vec();
    start.extend_from_slice(&node.to_be_bytes());
    let end = crate::schema::prefix_end(&start);
    let rows = store.range(Table::ShardIndex, &start, end.as_deref(), limit)?;
    Ok(rows
        .into_iter()
        .filter_map(|(key, _)| <[u8; 32]>::try_from(key.get(40..72)?).ok().map(ChunkHash::from_bytes))
        .collect())
}

/// Writes a stripe's record and moves its index rows from what `old` listed to what `record`
/// lists.
fn put_stripe(
    store: &mut impl StateStore,
    chunk: &ChunkHash,
    old: Option<&StripeRecord>,
    record: &StripeRecord,
) -> Result<(), StoreError> {
    let before = old.map(listed_copies).unwrap_or_default();
    let after = listed_copies(record);
    for (shard, node) in before.difference(&after) {
        store.remove(Table::ShardIndex, &index_key(shard, *node, chunk))?;
    }
    for (shard, node) in after.difference(&before) {
        store.put(Table::ShardIndex, &index_key(shard, *node, chunk), &[])?;
    }
    store.put(Table::Stripes, chunk.as_ref(), &encode(record)?)
}

fn remove_stripe(store: &mut impl StateStore, chunk: &ChunkHash, record: &StripeRecord) -> Result<(), StoreError> {
    for (shard, node) in listed_copies(record) {
        store.remove(Table::ShardIndex, &index_key(&shard, node, chunk))?;
    }
    store.remove(Table::Stripes, chunk.as_ref())
}

/// A reference from a committed version, if the chunk is striped; false if it is not.
pub(crate) fn add_reference(store: &mut impl StateStore, chunk: &ChunkHash) -> Result<bool, StoreError> {
    let Some(mut record) = get_stripe(store, chunk)? else { return Ok(false) };
    record.refs += 1;
    // References change no copy: the record alone.
    store.put(Table::Stripes, chunk.as_ref(), &encode(&record)?)?;
    Ok(true)
}

/// Drops a reference, if the chunk is striped (false if not); the last one removes the stripe,
/// whose shards become orphans for the storage nodes' collectors.
pub(crate) fn drop_reference(store: &mut impl StateStore, chunk: &ChunkHash) -> Result<bool, StoreError> {
    let Some(mut record) = get_stripe(store, chunk)? else { return Ok(false) };
    record.refs = record.refs.saturating_sub(1);
    if record.refs == 0 {
        remove_stripe(store, chunk, &record)?;
    } else {
        store.put(Table::Stripes, chunk.as_ref(), &encode(&record)?)?;
    }
    Ok(true)
}

/// Checks a stripe as a write commits it, before any change: a valid shape, shards on distinct
/// nodes, and named by the write's chunk list by hash and size, without replicas.
fn check_stripe(stripe: &StripeCommit, listed: &[CommittedChunk]) -> Result<(), String> {
    let total = stripe.scheme.total_shards();
    if stripe.shards.len() != total {
        return Err(format!(
            "stripe {} has {} shards, {} wants {total}",
            stripe.chunk,
            stripe.shards.len(),
            stripe.scheme
        ));
    }
    let mut nodes: Vec<NodeId> = stripe.shards.iter().map(|shard| shard.node).collect();
    nodes.sort_unstable();
    nodes.dedup();
    if nodes.len() != total {
        return Err(format!("stripe {} puts two shards on one node: a node's loss would cost it two", stripe.chunk));
    }
    let named =
        listed.iter().any(|entry| entry.hash == stripe.chunk && entry.size == stripe.size && entry.replicas.is_empty());
    if !named {
        return Err(format!("stripe {} is not in the write's chunk list as an entry without copies", stripe.chunk));
    }
    Ok(())
}

/// Applies `apply_inner`, a write whose chunk list (`listed`) names the chunks `stripes`
/// carries: each stripe is recorded (without references) before the write applies, so its
/// entries resolve, and a stripe the write did not reference afterwards (a refused write) is
/// removed again. A chunk the metadata already holds (replicated, inline or striped) keeps
/// that representation. Refuses, before any change, a malformed stripe (see `check_stripe`).
pub(crate) fn with_stripes<S: StateStore>(
    store: &mut S,
    stripes: &[StripeCommit],
    listed: Option<&[CommittedChunk]>,
    apply_inner: impl FnOnce(&mut S) -> Result<CommandResult, StoreError>,
) -> Result<CommandResult, StoreError> {
    let refuse = |why: String| Ok(Err(CommandError::InvalidRequest { why }));
    let Some(listed) = listed else {
        return refuse("stripes come only with a file, object, part or segment write".to_string());
    };
    if stripes.len() > STRIPES_PER_ENTRY_MAX {
        return refuse(format!("{} stripes in one entry; the most is {STRIPES_PER_ENTRY_MAX}", stripes.len()));
    }
    if let Some(why) = stripes.iter().find_map(|stripe| check_stripe(stripe, listed).err()) {
        return refuse(why);
    }
    let mut recorded = Vec::new();
    for stripe in stripes {
        let known = store.get(Table::Chunks, stripe.chunk.as_ref())?.is_some()
            || store.get(Table::InlineChunks, stripe.chunk.as_ref())?.is_some()
            || store.get(Table::Stripes, stripe.chunk.as_ref())?.is_some();
        if known {
            continue;
        }
        let record = StripeRecord {
            size: stripe.size,
            scheme: stripe.scheme,
            refs: 0,
            shards: stripe.shards.iter().map(|shard| ShardSlot { hash: shard.hash, nodes: vec![shard.node] }).collect(),
        };
        put_stripe(store, &stripe.chunk, None, &record)?;
        recorded.push(stripe.chunk);
    }
    let result = apply_inner(store)?;
    for chunk in recorded {
        if let Some(record) = get_stripe(store, &chunk)?.filter(|record| record.refs == 0) {
            remove_stripe(store, &chunk, &record)?;
        }
    }
    Ok(result)
}

/// A node's copy of a shard is bad (a scrub or a reader found it corrupt or missing): the node
/// is no longer listed for it in any stripe, so the repair planner rebuilds the shard from the
/// others. Unlike a chunk's last replica, a shard's only copy is unlisted too: a bad shard
/// serves nothing (every read verifies it) and the stripe's other shards rebuild it; keeping
/// it listed would leave the stripe counted whole and never repaired. Only while fewer than K
/// other slots stay listed on a node that may serve them (a member not committed `down`) is
/// it kept: then the stripe cannot be rebuilt without it, and a report that was wrong (an
/// error taken for a loss) must not turn a readable stripe into a lost one.
///
/// Bounded per report (`BAD_SHARD_STRIPES_MAX` stripes): a file shared by more stripes than
/// that (a zero run) is unlisted from the first ones now and from the rest by the scrubber's
/// next reports of it; until then those stripes still list a bad copy, which readers verify
/// and skip.
pub(crate) fn drop_bad_shard(store: &mut impl StateStore, shard: &ChunkHash, node: NodeId) -> Result<(), StoreError> {
    let serving: std::collections::BTreeSet<NodeId> = crate::files::list_storage_nodes(store)?
        .into_iter()
        .filter(|member| member.liveness != mendfs_heal::detector::Liveness::Down)
        .map(|member| member.id)
        .collect();
    for chunk in stripes_listing(store, shard, node, BAD_SHARD_STRIPES_MAX)? {
        let Some(old) = get_stripe(store, &chunk)? else { continue };
        let mut record = old.clone();
        let data_shards = record.scheme.data_shards();
        for index in 0..record.shards.len() {
            let slot = &record.shards[index];
            if slot.hash != *shard || !slot.nodes.contains(&node) {
                continue;
            }
            let others_serving = record
                .shards
                .iter()
                .enumerate()
                .filter(|(other, slot)| *other != index && slot.nodes.iter().any(|id| serving.contains(id)))
                .count();
            let another_copy = slot.nodes.iter().any(|&id| id != node && serving.contains(&id));
            if another_copy || others_serving >= data_shards {
                record.shards[index].nodes.retain(|listed| *listed != node);
            }
        }
        if record != old {
            put_stripe(store, &chunk, Some(&old), &record)?;
        }
    }
    Ok(())
}

/// Stripes one bad-copy report changes at most (see [`drop_bad_shard`]).
pub const BAD_SHARD_STRIPES_MAX: usize = 1_024;

/// A shard rebuilt or moved by repair: `node` now holds shard `index` of `chunk`'s stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardAdded {
    pub chunk: ChunkHash,
    pub index: u32,
    pub node: NodeId,
}

/// Stop listing `node` for shard `index` of `chunk`, if `keep` is still listed for it (the
/// planner's condition, as for replica drops).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardDrop {
    pub chunk: ChunkHash,
    pub index: u32,
    pub node: NodeId,
    pub keep: NodeId,
}

/// Records finished rebuilds and moves; returns the copies and bytes that counted (a stripe
/// deleted meanwhile, or a node already listed, counts nothing).
pub(crate) fn add_shards(store: &mut impl StateStore, added: &[ShardAdded]) -> Result<(u64, u64), StoreError> {
    let (mut copies, mut bytes) = (0u64, 0u64);
    for add in added {
        let Some(old) = get_stripe(store, &add.chunk)? else { continue };
        let mut record = old.clone();
        let shard_bytes = record.scheme.shard_bytes(usize::try_from(record.size).unwrap_or(usize::MAX)) as u64;
        // A node listed in any slot already (this one, or another: a checkpoint of a plan made
        // before another rebuild landed there) is not added: a stripe keeps one shard per node,
        // so that a node's loss costs it one shard.
        if record.shards.iter().any(|slot| slot.nodes.contains(&add.node)) {
            continue;
        }
        let Some(slot) = record.shards.get_mut(add.index as usize) else { continue };
        slot.nodes.push(add.node);
        put_stripe(store, &add.chunk, Some(&old), &record)?;
        copies = copies.saturating_add(1);
        bytes = bytes.saturating_add(shard_bytes);
    }
    Ok((copies, bytes))
}

pub(crate) fn drop_shards(store: &mut impl StateStore, drops: &[ShardDrop]) -> Result<(), StoreError> {
    for drop in drops {
        let Some(old) = get_stripe(store, &drop.chunk)? else { continue };
        let mut record = old.clone();
        let Some(slot) = record.shards.get_mut(drop.index as usize) else { continue };
        if drop.keep != drop.node && slot.nodes.contains(&drop.keep) && slot.nodes.contains(&drop.node) {
            slot.nodes.retain(|node| *node != drop.node);
            put_stripe(store, &drop.chunk, Some(&old), &record)?;
        }
    }
    Ok(())
}

/// Calls `visit` for every stripe in chunk-hash order, a page at a time; stops when `visit`
/// returns false. Rows that do not decode are skipped and counted (see `files::for_each_chunk`).
pub fn for_each_stripe(
    store: &impl StateStore,
    visit: impl FnMut(ChunkHash, StripeRecord) -> bool,
) -> Result<u64, StoreError> {
    for_each_stripe_between(store, &[], None, visit)
}

/// [`for_each_stripe`] over the stripes whose keys are from `start` up to `end` (excluded).
pub fn for_each_stripe_between(
    store: &impl StateStore,
    start: &[u8],
    end: Option<&[u8]>,
    mut visit: impl FnMut(ChunkHash, StripeRecord) -> bool,
) -> Result<u64, StoreError> {
    const PAGE: usize = 1_024;
    let mut skipped = 0;
    let mut start: Vec<u8> = start.to_vec();
    loop {
        let rows = store.range(Table::Stripes, &start, end, PAGE)?;
        let full = rows.len() == PAGE;
        for (key, value) in rows {
            start = key.clone();
            start.push(0);
            let parsed = <[u8; 32]>::try_from(key.as_slice()).ok().zip(decode::<StripeRecord>(&value).ok());
            match parsed {
                Some((hash, record)) => {
                    if !visit(ChunkHash::from_bytes(hash), record) {
                        return Ok(skipped);
                    }
                }
                None => skipped += 1,
            }
        }
        if !full {
            return Ok(skipped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::MemoryStore;

    fn hash(byte: u8) -> ChunkHash {
        ChunkHash::from_bytes([byte; 32])
    }

    fn stripe(chunk: u8, first_shard: u8, nodes: &[NodeId]) -> StripeCommit {
        StripeCommit {
            chunk: hash(chunk),
            size: 100,
            scheme: Scheme::new(4, 2).unwrap_or_else(|e| panic!("{e}")),
            shards: nodes
                .iter()
                .enumerate()
                .map(|(i, &node)| ShardCommit { hash: hash(first_shard + i as u8), node })
                .collect(),
        }
    }

    fn is_empty(store: &MemoryStore) -> bool {
        Table::ALL.iter().all(|table| store.range(*table, &[], None, 1).is_ok_and(|rows| rows.is_empty()))
    }

    fn listing(chunk: u8) -> Vec<CommittedChunk> {
        vec![CommittedChunk { hash: hash(chunk), size: 100, replicas: vec![] }]
    }

    /// The write stand-in: references every listed chunk, as a commit does.
    fn reference_all(store: &mut MemoryStore, listed: &[CommittedChunk]) -> Result<CommandResult, StoreError> {
        for chunk in listed {
            assert!(add_reference(store, &chunk.hash)?, "the stripe is recorded before the write applies");
        }
        Ok(Ok(crate::schema::Outcome::Noop))
    }

    #[test]
    fn a_committed_stripe_is_found_by_its_shards_until_its_last_reference_goes() {
        let mut store = MemoryStore::default();
        let listed = listing(1);
        with_stripes(&mut store, &[stripe(1, 10, &[1, 2, 3, 4, 5, 6])], Some(&listed), |s| reference_all(s, &listed))
            .unwrap()
            .unwrap();
        let record = get_stripe(&store, &hash(1)).unwrap().unwrap();
        assert_eq!((record.refs, record.shards.len()), (1, 6));
        assert!(shard_listed_on(&store, &hash(12), 3).unwrap());
        assert!(!shard_listed_on(&store, &hash(12), 4).unwrap(), "shard 2 is on node 3 only");
        assert_eq!(stripes_listing(&store, &hash(15), 6, 10).unwrap(), [hash(1)]);

        assert!(add_reference(&mut store, &hash(1)).unwrap());
        assert!(drop_reference(&mut store, &hash(1)).unwrap());
        assert!(shard_listed_on(&store, &hash(12), 3).unwrap());
        assert!(drop_reference(&mut store, &hash(1)).unwrap());
        assert!(get_stripe(&store, &hash(1)).unwrap().is_none());
        assert!(!shard_listed_on(&store, &hash(12), 3).unwrap(), "its shards are orphans now");
        assert!(store.range(Table::ShardIndex, &[], None, 10).unwrap().is_empty());
        assert!(!drop_reference(&mut store, &hash(1)).unwrap(), "not striped any more");
    }

    #[test]
    fn malformed_or_unnamed_stripes_change_nothing() {
        let mut store = MemoryStore::default();
        let listed = listing(1);
        let cases = [
            stripe(1, 10, &[1, 2, 3, 4, 5]),    // a shard short
            stripe(1, 10, &[1, 2, 3, 4, 5, 5]), // two shards on one node
            stripe(2, 10, &[1, 2, 3, 4, 5, 6]), // not in the chunk list
        ];
        for case in cases {
            let result = with_stripes(&mut store, &[case], Some(&listed), |_| panic!("must not apply")).unwrap();
            assert!(matches!(result, Err(CommandError::InvalidRequest { .. })), "{result:?}");
        }
        let with_copies = vec![CommittedChunk { hash: hash(1), size: 100, replicas: vec![1] }];
        let result =
            with_stripes(&mut store, &[stripe(1, 10, &[1, 2, 3, 4, 5, 6])], Some(&with_copies), |_| panic!("no"))
                .unwrap();
        assert!(result.is_err(), "a chunk listed with copies is not striped");
        let result = with_stripes(&mut store, &[stripe(1, 10, &[1, 2, 3, 4, 5, 6])], None, |_| panic!("no")).unwrap();
        assert!(result.is_err(), "only around a write");
        assert!(is_empty(&store));
    }

    #[test]
    fn a_refused_write_leaves_no_stripe() {
        let mut store = MemoryStore::default();
        let listed = listing(1);
        let refused = |_: &mut MemoryStore| Ok(Err(CommandError::FileNotFound { path: "/x".into() }));
        let result = with_stripes(&mut store, &[stripe(1, 10, &[1, 2, 3, 4, 5, 6])], Some(&listed), refused).unwrap();
        assert!(result.is_err());
        assert!(is_empty(&store), "{store:?}");
    }

    fn member(store: &mut MemoryStore, id: NodeId, liveness: mendfs_heal::detector::Liveness) {
        let node = crate::files::StorageNode {
            id,
            addr: format!("127.0.0.1:{id}"),
            zone: String::new(),
            weight: 100,
            draining: false,
            liveness,
        };
        crate::files::register_storage_node(store, &node).unwrap().unwrap();
        crate::files::set_liveness(store, id, liveness).unwrap().unwrap();
    }

    #[test]
    fn repair_adds_and_conditionally_drops_shard_copies_and_bad_copies_go_unless_last() {
        let mut store = MemoryStore::default();
        for id in 1..=9 {
            member(&mut store, id, mendfs_heal::detector::Liveness::Up);
        }
        let listed = listing(1);
        with_stripes(&mut store, &[stripe(1, 10, &[1, 2, 3, 4, 5, 6])], Some(&listed), |s| reference_all(s, &listed))
            .unwrap()
            .unwrap();
        // Node 2 died; shard 1 was rebuilt on node 7.
        let added = add_shards(&mut store, &[ShardAdded { chunk: hash(1), index: 1, node: 7 }]).unwrap();
        assert_eq!(added, (1, 26), "one shard of 100 bytes over 4, rounded up to even");
        assert_eq!(add_shards(&mut store, &[ShardAdded { chunk: hash(1), index: 1, node: 7 }]).unwrap(), (0, 0));
        assert_eq!(add_shards(&mut store, &[ShardAdded { chunk: hash(1), index: 9, node: 7 }]).unwrap(), (0, 0));
        // A drop whose kept copy is not listed does nothing; with it, the old record goes.
        drop_shards(&mut store, &[ShardDrop { chunk: hash(1), index: 1, node: 2, keep: 8 }]).unwrap();
        assert_eq!(get_stripe(&store, &hash(1)).unwrap().unwrap().shards[1].nodes, [2, 7]);
        drop_shards(&mut store, &[ShardDrop { chunk: hash(1), index: 1, node: 2, keep: 7 }]).unwrap();
        assert_eq!(get_stripe(&store, &hash(1)).unwrap().unwrap().shards[1].nodes, [7]);
        // A bad copy goes, even a shard's only one, while K other shards are listed: repair
        // rebuilds it from them.
        add_shards(&mut store, &[ShardAdded { chunk: hash(1), index: 1, node: 8 }]).unwrap();
        drop_bad_shard(&mut store, &hash(11), 7).unwrap();
        assert_eq!(get_stripe(&store, &hash(1)).unwrap().unwrap().shards[1].nodes, [8]);
        drop_bad_shard(&mut store, &hash(11), 8).unwrap();
        assert!(get_stripe(&store, &hash(1)).unwrap().unwrap().shards[1].nodes.is_empty());
        assert!(!shard_listed_on(&store, &hash(11), 8).unwrap());
        // Shard 0 bad too: K = 4 others (2..=5) are still listed, so it goes. Then shard 2:
        // only 3 others are, and it stays, since the stripe could not be rebuilt without it.
        drop_bad_shard(&mut store, &hash(10), 1).unwrap();
        drop_bad_shard(&mut store, &hash(12), 3).unwrap();
        let shards = get_stripe(&store, &hash(1)).unwrap().unwrap().shards;
        assert!(shards[0].nodes.is_empty() && shards[1].nodes.is_empty(), "{shards:?}");
        assert_eq!(shards[2].nodes, [3], "kept: fewer than K others listed");
        // Shard 1 rebuilt on node 9: shard 3's bad copy goes, then shard 4's stays.
        add_shards(&mut store, &[ShardAdded { chunk: hash(1), index: 1, node: 9 }]).unwrap();
        drop_bad_shard(&mut store, &hash(13), 4).unwrap();
        assert!(get_stripe(&store, &hash(1)).unwrap().unwrap().shards[3].nodes.is_empty());
        drop_bad_shard(&mut store, &hash(14), 5).unwrap();
        assert_eq!(get_stripe(&store, &hash(1)).unwrap().unwrap().shards[4].nodes, [5], "kept: K listed");
        // A rebuild checkpointed onto a node that holds another slot of the stripe (planned
        // before that node got it) is refused: one shard per node.
        assert_eq!(add_shards(&mut store, &[ShardAdded { chunk: hash(1), index: 0, node: 9 }]).unwrap(), (0, 0));
        assert!(get_stripe(&store, &hash(1)).unwrap().unwrap().shards[0].nodes.is_empty());
    }

    #[test]
    fn a_bad_report_never_unlists_a_shard_the_stripe_needs_because_other_nodes_are_down() {
        use mendfs_heal::detector::Liveness;
        let mut store = MemoryStore::default();
        for id in 1..=6 {
            member(&mut store, id, if id >= 5 { Liveness::Down } else { Liveness::Up });
        }
        let listed = listing(1);
        with_stripes(&mut store, &[stripe(1, 10, &[1, 2, 3, 4, 5, 6])], Some(&listed), |s| reference_all(s, &listed))
            .unwrap()
            .unwrap();
        // Nodes 5 and 6 are down, their slots still listed: five other slots are listed but
        // only three are on nodes that may serve them, fewer than K = 4. A report of shard 0
        // on node 1 (maybe an error taken for a loss) keeps it listed, so GC keeps the file.
        drop_bad_shard(&mut store, &hash(10), 1).unwrap();
        assert_eq!(get_stripe(&store, &hash(1)).unwrap().unwrap().shards[0].nodes, [1]);
        assert!(shard_listed_on(&store, &hash(10), 1).unwrap());
        // Node 5 comes back: four others serve, and the bad copy goes.
        crate::files::set_liveness(&mut store, 5, Liveness::Up).unwrap().unwrap();
        drop_bad_shard(&mut store, &hash(10), 1).unwrap();
        assert!(get_stripe(&store, &hash(1)).unwrap().unwrap().shards[0].nodes.is_empty());
        let mut seen = Vec::new();
        for_each_stripe(&store, |chunk, record| {
            seen.push((chunk, record.refs));
            true
        })
        .unwrap();
        assert_eq!(seen, [(hash(1), 1)]);
    }

    #[test]
    fn many_stripes_sharing_a_shard_keep_it_listed_on_each_of_their_nodes() {
        // A sparse file: 5 000 chunks whose shard 0 is the same zero run, on nodes 1..=5.
        let mut store = MemoryStore::default();
        let zero = hash(200);
        for i in 0..5_000u32 {
            let mut chunk = [0u8; 32];
            chunk[..4].copy_from_slice(&i.to_be_bytes());
            let chunk = ChunkHash::from_bytes(chunk);
            let listed = vec![CommittedChunk { hash: chunk, size: 100, replicas: vec![] }];
            let node = u64::from(i % 5) + 1;
            let mut shards: Vec<ShardCommit> =
                (1..6u64).map(|n| ShardCommit { hash: hash(n as u8), node: 10 + n }).collect();
            shards.insert(0, ShardCommit { hash: zero, node });
            let stripe = StripeCommit { chunk, size: 100, scheme: Scheme::new(4, 2).unwrap(), shards };
            with_stripes(&mut store, &[stripe], Some(&listed), |s| reference_all(s, &listed)).unwrap().unwrap();
        }
        for node in 1..=5 {
            assert!(shard_listed_on(&store, &zero, node).unwrap(), "node {node}");
        }
        assert!(!shard_listed_on(&store, &zero, 6).unwrap());
    }

    #[test]
    fn a_stripe_naming_one_shard_twice_indexes_and_unindexes_it_once() {
        let mut store = MemoryStore::default();
        let listed = listing(1);
        let mut twice = stripe(1, 10, &[1, 2, 3, 4, 5, 6]);
        twice.shards[3].hash = twice.shards[2].hash; // zero padding of a tiny chunk
        twice.shards[3].node = 3;
        twice.shards[2].node = 7;
        with_stripes(&mut store, &[twice], Some(&listed), |s| reference_all(s, &listed)).unwrap().unwrap();
        assert!(shard_listed_on(&store, &hash(12), 3).unwrap() && shard_listed_on(&store, &hash(12), 7).unwrap());
        drop_reference(&mut store, &hash(1)).unwrap();
        assert!(is_empty(&store));
    }

    #[test]
    fn identical_shards_of_two_stripes_are_each_listed() {
        let mut store = MemoryStore::default();
        // Chunks 1 and 2 share shard 10 (a zero run), on different nodes.
        let listed = vec![
            CommittedChunk { hash: hash(1), size: 100, replicas: vec![] },
            CommittedChunk { hash: hash(2), size: 100, replicas: vec![] },
        ];
        let stripes = [stripe(1, 10, &[1, 2, 3, 4, 5, 6]), stripe(2, 10, &[6, 5, 4, 3, 2, 1])];
        with_stripes(&mut store, &stripes, Some(&listed), |s| reference_all(s, &listed)).unwrap().unwrap();
        assert_eq!(stripes_listing(&store, &hash(10), 1, 10).unwrap(), [hash(1)]);
        assert_eq!(stripes_listing(&store, &hash(10), 6, 10).unwrap(), [hash(2)]);
        assert!(shard_listed_on(&store, &hash(10), 1).unwrap() && shard_listed_on(&store, &hash(10), 6).unwrap());
        drop_reference(&mut store, &hash(1)).unwrap();
        assert!(!shard_listed_on(&store, &hash(10), 1).unwrap());
        assert!(shard_listed_on(&store, &hash(10), 6).unwrap(), "still chunk 2's");
    }
}
