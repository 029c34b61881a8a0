//! The file namespace and chunk map inside the metadata state machine, free of I/O.
//!
//! A file version is an ordered list of chunks; a chunk record says where its copies are and
//! how many chunk-list entries reference it. A commit installs the new version and moves the
//! references in one Raft entry, so a reader sees the old file or the new one, never a mix.
//!
//! **Chunk lists in segments.** A version's chunk list is not part of its record: it lives in
//! `Segments` rows of at most [`SEGMENT_CHUNKS_MAX`] chunks under a *chunk set* id, which the
//! [`FileRecord`] names. So no record, no Raft entry and no reply grows with the file. A small
//! file is committed by one `CommitFile` carrying its whole list. A big one is written as an
//! *upload*: each full segment is staged by its own `StageSegment` (adding its chunk
//! references, so its copies are protected from collection from then on), and the final
//! `CommitFile` carries the last segment and installs the upload's chunk set as the file's,
//! which costs the same however many segments came before: the file appears whole or not at
//! all. An upload that no segment extends for its grace period expires by the state clock.
//!
//! **References.** A chunk's `refs` counts its entries in every segment that exists: those of
//! committed versions, of uploads, and of released chunk sets not yet processed. A chunk set
//! that nothing owns any more (a deleted or overwritten version, an aborted or expired upload)
//! is *released*: the first segment's worth of its references is dropped at once, the rest by
//! `ReleaseChunks` commands that the leader proposes while any are queued, a bounded amount
//! each, so no apply does work proportional to a file's size. Until then the chunks stay
//! referenced, which only delays their collection.
//!
//! **Inline chunks.** The content of a small write (up to [`INLINE_CHUNK_BYTES_MAX`], by
//! default 16 KiB: `DataConfig::inline_max_bytes`) travels in its commit entry and is kept in
//! `InlineChunks`, replicated by Raft like the rest of the metadata: one step instead of a
//! prepare on every replica plus a commit. Such a chunk is still a hash and a size in the chunk
//! list, so everything that shares chunk sets (S3 pieces, copies, multipart parts) works
//! unchanged; it has references but no copies, and repair, scrubbing and the storage nodes'
//! collection never see it. A hash is in `Chunks` or in `InlineChunks`, never both: whichever
//! held it first takes the references of later writes of the same content.
//!
//! Garbage collection never happens here: a chunk whose count drops to zero loses its record,
//! and the storage nodes later delete copies that no record lists, after checking with the
//! leader and only past a grace period in which a new write could still reference them (see
//! `docs/design/garbage-collection.md`).

use mendfs_heal::detector::Liveness;
use mendfs_types::{ChunkHash, NodeId};
use serde::{Deserialize, Serialize};

use crate::schema::{
    commit_revision, current_revision, decode, encode, get_u64, prefix_end, put_u64, CommandError, CommandResult,
    Outcome, StateStore, StoreError, Table,
};

/// The default for how long after its chunks were prepared a write may still commit. Storage
/// nodes keep prepared chunks at least this long, so a commit within it never references a
/// deleted copy.
pub const PREPARE_GRACE_MS: u64 = 10 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageNode {
    pub id: u64,
    pub addr: String,
    pub zone: String,
    /// Relative capacity for placement (100 = a default node).
    pub weight: u32,
    pub draining: bool,
    /// The last liveness a leader committed: `Up`, `Down` or `Degraded` (suspicion is the
    /// leader's soft state and never committed). Coordinators place new chunks only on `Up`
    /// nodes that are not draining; repair treats copies on `Down` nodes as lost.
    pub liveness: Liveness,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChunk {
    pub hash: ChunkHash,
    pub size: u64,
}

/// A file version. Its chunk list is in `Segments`, under `chunk_set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub size: u64,
    pub mtime_ms: u64,
    /// BLAKE3 of the whole content.
    pub content_hash: Vec<u8>,
    pub version: u64,
    pub create_revision: u64,
    pub modify_revision: u64,
    /// The chunk set holding this version's chunk list.
    pub chunk_set: u64,
    pub n_chunks: u64,
}

/// Chunks in one segment of a chunk list: one `Segments` row, one `StageSegment` (about
/// 600 KiB of proposal at RF 3), at most one `CommitFile`'s worth, and one chunk page.
pub const SEGMENT_CHUNKS_MAX: usize = 8_192;
/// The most one segment's chunks add to a proposal (see [`committed_chunk_bytes`]), so a
/// staging entry stays small next to the 4 MiB batches of group commit however many replicas
/// each chunk has.
pub const SEGMENT_BYTES_MAX: usize = 1 << 20;

/// What one chunk adds to a proposal: its hash, its size and its replicas' ids.
pub fn committed_chunk_bytes(chunk: &CommittedChunk) -> usize {
    48 + 8 * chunk.replicas.len()
}

/// How many chunks of `replicas` copies each a coordinator puts into one segment: as many as
/// both segment limits allow.
pub fn segment_chunks_for(replicas: usize) -> usize {
    (SEGMENT_BYTES_MAX / (48 + 8 * replicas)).clamp(1, SEGMENT_CHUNKS_MAX)
}

/// What one stripe adds to a proposal beside its write: the chunk's hash and size, and each
/// shard's hash and node. The stripes of one entry weigh at most `SEGMENT_BYTES_MAX`.
pub fn stripe_commit_bytes(total_shards: usize) -> usize {
    48 + 40 * total_shards
}

/// How many erasure-coded chunks of `total_shards` shards each one segment may hold: the
/// stripes that travel with it must fit the same limit as its chunk entries.
pub fn segment_stripes_for(total_shards: usize) -> usize {
    (SEGMENT_BYTES_MAX / stripe_commit_bytes(total_shards)).clamp(1, SEGMENT_CHUNKS_MAX)
}

/// Chunk references dropped at once when a chunk set is released, and by one `ReleaseChunks`
/// (whole segments, so up to twice this): bounded work per apply, whatever a file's size.
pub const RELEASE_CHUNKS_PER_APPLY: u64 = SEGMENT_CHUNKS_MAX as u64;
/// Uploads one `ReleaseChunks` expires.
const UPLOADS_EXPIRED_PER_APPLY: usize = 64;
/// The next chunk set id (in `Meta`); ids start at 1 and are never reused.
const META_NEXT_CHUNK_SET: &[u8] = b"next_chunk_set";

/// A file being written segment by segment and not yet committed: its chunk set so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    pub path: String,
    pub chunk_set: u64,
    pub n_chunks: u64,
    pub size: u64,
    /// State-clock time after which the upload is abandoned: its last segment's apply plus its
    /// grace. Staging or committing it later is refused (`UploadNotFound`), and the next
    /// `ReleaseChunks` releases its chunk set.
    pub expires_at_ms: u64,
}

/// One full segment of an upload, staged ahead of its `CommitFile`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSegment {
    /// Chosen by the coordinator (random); the first segment (`first_index` 0) starts it.
    pub upload_id: u64,
    pub path: String,
    /// The index in the file of this segment's first chunk: the number of chunks staged
    /// before it.
    pub first_index: u64,
    pub chunks: Vec<CommittedChunk>,
    /// As in [`CommitFile`], for this segment's chunks.
    pub prepared_at_ms: u64,
    /// As in [`CommitFile`]: a segment later than this after `prepared_at_ms` is refused; also
    /// how long the upload lives without another segment.
    pub grace_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    pub size: u64,
    /// Committed file versions that name this chunk (a chunk twice in one file counts twice).
    pub refs: u64,
    pub replicas: Vec<u64>,
}

/// The largest chunk the metadata keeps inline, whatever a node's setting: small enough that an
/// entry carrying a few stays far below a batch's size, and that a snapshot of millions of
/// small files stays a metadata-sized one.
pub const INLINE_CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Inline chunks one entry may carry (a write has one; a little room for wrappers to come).
pub const INLINE_CHUNKS_PER_ENTRY_MAX: usize = 4;

/// A chunk's bytes, sent with the commit that references them (see [`InlineChunkRecord`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InlineChunk {
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A chunk kept in the metadata: its bytes, and the chunk-list entries that reference it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InlineChunkRecord {
    pub refs: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedChunk {
    pub hash: ChunkHash,
    pub size: u64,
    /// The nodes that acknowledged (fsynced) this chunk during prepare. Empty for a chunk the
    /// same write already lists earlier (a repeat, not prepared again): it only adds a
    /// reference to the chunk's record, which that earlier entry keeps alive.
    pub replicas: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitFile {
    pub path: String,
    /// The whole file's size.
    pub size: u64,
    /// 0: stamped with the state clock at the apply ([`stamped`]).
    pub mtime_ms: u64,
    pub content_hash: Vec<u8>,
    /// The file's last chunks (at most [`SEGMENT_CHUNKS_MAX`]): all of them without an upload.
    pub chunks: Vec<CommittedChunk>,
    /// The upload whose staged segments come before `chunks`; None: `chunks` is the file.
    pub upload_id: Option<u64>,
    /// The index in the file of `chunks[0]`: the chunks staged before (0 without an upload).
    pub first_index: u64,
    /// Replace only the version the writer started from (0: the path must not exist).
    pub expected_version: Option<u64>,
    /// When the coordinator started preparing `chunks`, on the state clock: filled in by the
    /// leader as it stamps the proposal, its stamp less the write's age, which the coordinator
    /// measured on its monotonic clock from before its first prepare and which counts the time
    /// the proposal took to reach the leader (`node::prepared_at_on_state_clock`). No two dates
    /// are compared. (Entries from before this rule carry the coordinator's date.)
    pub prepared_at_ms: u64,
    /// How long storage nodes keep prepared chunks (the coordinator's setting, sent to them
    /// with every prepare): a commit later than this after `prepared_at_ms` is refused, since
    /// its chunks may already have been collected.
    pub grace_ms: u64,
}

/// The longest file path, in bytes.
pub const PATH_BYTES_MAX: usize = 4_096;

/// Checks a file path: absolute, `/`-separated, no empty, `.` or `..` segments, no NUL; says
/// what is wrong.
pub fn validate_path(path: &str) -> Result<(), String> {
    let fail = |why: &str| Err(format!("invalid path {path:?}: {why}"));
    if path.len() > PATH_BYTES_MAX {
        return fail(&format!("longer than {PATH_BYTES_MAX} bytes"));
    }
    if !path.starts_with('/') || path == "/" {
        return fail("must start with / and name a file");
    }
    if path.contains('\0') {
        return fail("contains a NUL byte");
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return fail("empty segment (// or a trailing /)"),
            "." | ".." => return fail("contains . or .."),
            _ => {}
        }
    }
    Ok(())
}

pub fn get_file(store: &impl StateStore, path: &str) -> Result<Option<FileRecord>, StoreError> {
    store.get(Table::Files, path.as_bytes())?.map(|bytes| decode(&bytes)).transpose()
}

pub fn get_chunk(store: &impl StateStore, hash: &ChunkHash) -> Result<Option<ChunkRecord>, StoreError> {
    store.get(Table::Chunks, hash.as_ref())?.map(|bytes| decode(&bytes)).transpose()
}

pub fn get_inline_chunk(store: &impl StateStore, hash: &ChunkHash) -> Result<Option<InlineChunkRecord>, StoreError> {
    store.get(Table::InlineChunks, hash.as_ref())?.map(|bytes| decode(&bytes)).transpose()
}

/// Where a referenced chunk's copies are: the nodes its record lists, or none for a chunk kept
/// inline in the metadata or erasure-coded (its reader asks for the one or the stripe); None
/// if no table knows it.
pub fn chunk_replicas(store: &impl StateStore, hash: &ChunkHash) -> Result<Option<Vec<u64>>, StoreError> {
    if let Some(record) = get_chunk(store, hash)? {
        return Ok(Some(record.replicas));
    }
    let elsewhere =
        store.get(Table::InlineChunks, hash.as_ref())?.is_some() || store.get(Table::Stripes, hash.as_ref())?.is_some();
    Ok(elsewhere.then(Vec::new))
}

/// Files whose path starts with `prefix`, in order; the flag says whether `limit` cut it short.
pub fn list_files(
    store: &impl StateStore,
    prefix: &str,
    limit: usize,
) -> Result<(Vec<(String, FileRecord)>, bool), StoreError> {
    let end = crate::schema::prefix_end(prefix.as_bytes());
    let rows = store.range(Table::Files, prefix.as_bytes(), end.as_deref(), limit.saturating_add(1))?;
    let truncated = rows.len() > limit;
    let mut files = Vec::with_capacity(rows.len().min(limit));
    for (path, value) in rows.into_iter().take(limit) {
        let path = String::from_utf8(path).map_err(|e| StoreError(format!("file path is not UTF-8: {e}")))?;
        files.push((path, decode(&value)?));
    }
    Ok((files, truncated))
}

pub fn list_storage_nodes(store: &impl StateStore) -> Result<Vec<StorageNode>, StoreError> {
    store.range(Table::StorageNodes, &[], None, usize::MAX)?.into_iter().map(|(_, value)| decode(&value)).collect()
}

pub(crate) fn register_storage_node(
    store: &mut impl StateStore,
    node: &StorageNode,
) -> Result<CommandResult, StoreError> {
    let key = node.id.to_be_bytes();
    // The admin state and the committed liveness survive a re-registration (a restart): only
    // the leader's detector and the operator change them.
    let (draining, liveness) = match store.get(Table::StorageNodes, &key)? {
        Some(bytes) => {
            let existing = decode::<StorageNode>(&bytes)?;
            (existing.draining, existing.liveness)
        }
        None => (node.draining, node.liveness),
    };
    store.put(Table::StorageNodes, &key, &encode(&StorageNode { draining, liveness, ..node.clone() })?)?;
    Ok(Ok(Outcome::Noop))
}

fn update_storage_node(
    store: &mut impl StateStore,
    node_id: u64,
    change: impl FnOnce(&mut StorageNode),
) -> Result<CommandResult, StoreError> {
    let key = node_id.to_be_bytes();
    let Some(bytes) = store.get(Table::StorageNodes, &key)? else {
        return Ok(Err(CommandError::NodeNotFound { node_id }));
    };
    let mut node: StorageNode = decode(&bytes)?;
    change(&mut node);
    store.put(Table::StorageNodes, &key, &encode(&node)?)?;
    Ok(Ok(Outcome::Noop))
}

pub(crate) fn set_liveness(
    store: &mut impl StateStore,
    node_id: u64,
    liveness: Liveness,
) -> Result<CommandResult, StoreError> {
    // Suspicion is never committed; a proposal of it is a leader bug, kept harmless.
    if liveness == Liveness::Suspect {
        return Ok(Ok(Outcome::Noop));
    }
    update_storage_node(store, node_id, |node| node.liveness = liveness)
}

pub(crate) fn set_draining(
    store: &mut impl StateStore,
    node_id: u64,
    draining: bool,
) -> Result<CommandResult, StoreError> {
    update_storage_node(store, node_id, |node| node.draining = draining)
}

pub(crate) fn unregister_storage_node(store: &mut impl StateStore, node_id: u64) -> Result<CommandResult, StoreError> {
    store.remove(Table::StorageNodes, &node_id.to_be_bytes())?;
    Ok(Ok(Outcome::Noop))
}

/// A copy made by repair: `node` now holds a verified, fsynced copy of `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaAdded {
    pub hash: ChunkHash,
    pub node: u64,
}

/// Stop listing `node` for `hash`, but only if every node in `keep` is still listed: the
/// planner decided the drop against those copies, and a concurrent change (another drop, a
/// bad-replica report) must not turn a safe drop into a loss of redundancy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaDrop {
    pub hash: ChunkHash,
    pub node: u64,
    pub keep: Vec<u64>,
}

/// The repair job record: defined beside its transitions in the pure repair core.
pub use mendfs_heal::repair::RepairJob;
/// A timeline event: defined beside the pure timeline that produces it.
pub use mendfs_heal::timeline::ClusterEvent;

const META_REPAIR_JOB: &[u8] = b"repair_job";
/// The jobs before the current one, newest first: `Vec<RepairJob>`.
const META_REPAIR_HISTORY: &[u8] = b"repair_history";
/// Past repair jobs kept: enough to see the last few failures of a day, in one small row.
pub const REPAIR_HISTORY_MAX: usize = 16;

pub fn repair_job(store: &impl StateStore) -> Result<Option<RepairJob>, StoreError> {
    store.get(Table::Meta, META_REPAIR_JOB)?.map(|bytes| decode(&bytes)).transpose()
}

/// The repair jobs before the current one, newest first, at most `REPAIR_HISTORY_MAX`. In the
/// state machine, so every node shows the same history and a new leader keeps it.
pub fn repair_history(store: &impl StateStore) -> Result<Vec<RepairJob>, StoreError> {
    store.get(Table::Meta, META_REPAIR_HISTORY)?.map(|bytes| decode(&bytes)).transpose().map(Option::unwrap_or_default)
}

/// The committed cluster timeline: `Vec<ClusterEvent>`, oldest first.
const META_CLUSTER_EVENTS: &[u8] = b"cluster_events";
/// Most events one entry may append (a detector tick produces a handful).
pub const CLUSTER_EVENTS_PER_ENTRY_MAX: usize = 64;
/// Longest sentence one event carries.
pub const CLUSTER_EVENT_DETAIL_BYTES_MAX: usize = 1_024;

/// The cluster's timeline as committed by its leaders, oldest first, at most
/// `mendfs_heal::timeline::TIMELINE_EVENTS_MAX`.
pub fn cluster_events(store: &impl StateStore) -> Result<Vec<ClusterEvent>, StoreError> {
    store.get(Table::Meta, META_CLUSTER_EVENTS)?.map(|bytes| decode(&bytes)).transpose().map(Option::unwrap_or_default)
}

pub(crate) fn record_cluster_events(
    store: &mut impl StateStore,
    events: &[ClusterEvent],
) -> Result<CommandResult, StoreError> {
    let mut ring = cluster_events(store)?;
    mendfs_heal::timeline::append_events(&mut ring, events.iter().cloned());
    store.put(Table::Meta, META_CLUSTER_EVENTS, &encode(&ring)?)?;
    Ok(Ok(Outcome::Noop))
}

pub(crate) fn record_repair_job(store: &mut impl StateStore, job: &RepairJob) -> Result<CommandResult, StoreError> {
    if let Some(previous) = repair_job(store)? {
        // A new job moves the one it replaces into the history, as it last stood: finished,
        // or cut short (a leader that started a new job without finishing the old one).
        if previous.id != job.id {
            let mut history = repair_history(store)?;
            history.retain(|old| old.id != previous.id);
            history.insert(0, previous);
            history.truncate(REPAIR_HISTORY_MAX);
            store.put(Table::Meta, META_REPAIR_HISTORY, &encode(&history)?)?;
        }
    }
    store.put(Table::Meta, META_REPAIR_JOB, &encode(job)?)?;
    Ok(Ok(Outcome::Noop))
}

/// Records finished copies, and counts them in the repair job when they belong to it (in the
/// same entry, so the checkpoint and the counters never disagree).
pub(crate) fn add_replicas(
    store: &mut impl StateStore,
    job_id: Option<u64>,
    added: &[ReplicaAdded],
) -> Result<CommandResult, StoreError> {
    let (mut copies, mut bytes) = (0u64, 0u64);
    for add in added {
        // A chunk deleted meanwhile has no record: its new copy is an orphan for GC.
        let Some(mut record) = get_chunk(store, &add.hash)? else { continue };
        if record.replicas.contains(&add.node) {
            continue;
        }
        record.replicas.push(add.node);
        store.put(Table::Chunks, add.hash.as_ref(), &encode(&record)?)?;
        copies += 1;
        bytes += record.size;
    }
    if let (Some(job_id), Some(mut job)) = (job_id, repair_job(store)?) {
        if job.id == job_id {
            job.done_copies += copies;
            job.done_bytes += bytes;
            job.total_copies = job.total_copies.max(job.done_copies);
            job.total_bytes = job.total_bytes.max(job.done_bytes);
            store.put(Table::Meta, META_REPAIR_JOB, &encode(&job)?)?;
        }
    }
    Ok(Ok(Outcome::Noop))
}

pub(crate) fn drop_replicas(store: &mut impl StateStore, drops: &[ReplicaDrop]) -> Result<CommandResult, StoreError> {
    for drop in drops {
        let Some(mut record) = get_chunk(store, &drop.hash)? else { continue };
        let still_safe = !drop.keep.is_empty()
            && !drop.keep.contains(&drop.node)
            && drop.keep.iter().all(|node| record.replicas.contains(node));
        if still_safe && record.replicas.contains(&drop.node) {
            record.replicas.retain(|node| *node != drop.node);
            store.put(Table::Chunks, drop.hash.as_ref(), &encode(&record)?)?;
        }
    }
    Ok(Ok(Outcome::Noop))
}

/// Records shards rebuilt or moved (counted in their job, in the same entry, as
/// [`add_replicas`] does) and applies the conditional shard drops.
pub(crate) fn repair_shards(
    store: &mut impl StateStore,
    job_id: Option<u64>,
    added: &[crate::stripes::ShardAdded],
    drops: &[crate::stripes::ShardDrop],
) -> Result<CommandResult, StoreError> {
    let (copies, bytes) = crate::stripes::add_shards(store, added)?;
    crate::stripes::drop_shards(store, drops)?;
    if let (Some(job_id), Some(mut job)) = (job_id, repair_job(store)?) {
        if job.id == job_id && copies > 0 {
            job.done_copies = job.done_copies.saturating_add(copies);
            job.done_bytes = job.done_bytes.saturating_add(bytes);
            job.total_copies = job.total_copies.max(job.done_copies);
            job.total_bytes = job.total_bytes.max(job.done_bytes);
            store.put(Table::Meta, META_REPAIR_JOB, &encode(&job)?)?;
        }
    }
    Ok(Ok(Outcome::Noop))
}

/// Whether a committed record lists `hash` on `node_id`: a chunk's replica, or a shard of a
/// stripe. What garbage collection asks before a node deletes a file.
pub fn listed_on(store: &impl StateStore, hash: &ChunkHash, node_id: NodeId) -> Result<bool, StoreError> {
    if get_chunk(store, hash)?.is_some_and(|record| record.replicas.contains(&node_id)) {
        return Ok(true);
    }
    crate::stripes::shard_listed_on(store, hash, node_id)
}

/// How many chunk records and stripe shards list `node_id` (full scans: for admin checks,
/// such as whether a node may be removed, not hot paths).
pub fn chunks_listed_on(store: &impl StateStore, node_id: u64) -> Result<u64, StoreError> {
    let mut count = 0u64;
    for_each_chunk(store, |_, record| {
        if record.replicas.contains(&node_id) {
            count += 1;
        }
        true
    })?;
    crate::stripes::for_each_stripe(store, |_, record| {
        count += record.shards.iter().filter(|slot| slot.nodes.contains(&node_id)).count() as u64;
        true
    })?;
    Ok(count)
}

/// Calls `visit` for every chunk record in hash order, a page at a time so memory stays
/// bounded; stops early when `visit` returns false. A row that is not a chunk record (a key
/// that is not a hash, a value that does not decode) is skipped and counted, not an error: a
/// scan that failed on it would fail forever, and repair would stop for every other chunk.
/// Returns how many rows were skipped.
pub fn for_each_chunk(
    store: &impl StateStore,
    visit: impl FnMut(ChunkHash, ChunkRecord) -> bool,
) -> Result<u64, StoreError> {
    for_each_chunk_between(store, &[], None, visit)
}

/// The keys of the chunk map's (and the stripe map's) slice of hashes that start with `byte0`:
/// from `[byte0]` up to `[byte0 + 1]`, or to the end for the last slice.
pub fn hash_slice_keys(byte0: u8) -> ([u8; 1], Option<[u8; 1]>) {
    ([byte0], byte0.checked_add(1).map(|next| [next]))
}

/// [`for_each_chunk`] over the records whose keys are from `start` up to `end` (excluded).
pub fn for_each_chunk_between(
    store: &impl StateStore,
    start: &[u8],
    end: Option<&[u8]>,
    mut visit: impl FnMut(ChunkHash, ChunkRecord) -> bool,
) -> Result<u64, StoreError> {
    let mut skipped = 0;
    const PAGE: usize = 4_096;
    let mut start: Vec<u8> = start.to_vec();
    loop {
        let rows = store.range(Table::Chunks, &start, end, PAGE)?;
        let full = rows.len() == PAGE;
        for (key, value) in &rows {
            let (Ok(hash), Ok(record)) = (ChunkHash::try_from(key.as_slice()), decode::<ChunkRecord>(value)) else {
                skipped += 1;
                continue;
            };
            if !visit(hash, record) {
                return Ok(skipped);
            }
        }
        match rows.last() {
            Some((last, _)) if full => {
                start = last.clone();
                start.push(0);
            }
            _ => return Ok(skipped),
        }
    }
}

fn add_reference(store: &mut impl StateStore, chunk: &CommittedChunk) -> Result<(), StoreError> {
    let record = match get_chunk(store, &chunk.hash)? {
        Some(mut record) => {
            record.refs += 1;
            // Copies written by this prepare are real copies too; listing them keeps them
            // from being collected as orphans.
            for node in &chunk.replicas {
                if !record.replicas.contains(node) {
                    record.replicas.push(*node);
                }
            }
            record
        }
        None => {
            if let Some(mut inline) = get_inline_chunk(store, &chunk.hash)? {
                // The metadata already holds this content: copies this write prepared of it
                // are orphans, collected like any other.
                inline.refs += 1;
                return store.put(Table::InlineChunks, chunk.hash.as_ref(), &encode(&inline)?);
            }
            if crate::stripes::add_reference(store, &chunk.hash)? {
                return Ok(());
            }
            ChunkRecord { size: chunk.size, refs: 1, replicas: chunk.replicas.clone() }
        }
    };
    store.put(Table::Chunks, chunk.hash.as_ref(), &encode(&record)?)
}

fn drop_reference(store: &mut impl StateStore, hash: &ChunkHash) -> Result<(), StoreError> {
    let Some(mut record) = get_chunk(store, hash)? else {
        let Some(mut inline) = get_inline_chunk(store, hash)? else {
            if crate::stripes::drop_reference(store, hash)? {
                return Ok(());
            }
            return Err(StoreError(format!("chunk map lost a referenced chunk {}", hash)));
        };
        inline.refs = inline.refs.saturating_sub(1);
        return if inline.refs == 0 {
            store.remove(Table::InlineChunks, hash.as_ref())
        } else {
            store.put(Table::InlineChunks, hash.as_ref(), &encode(&inline)?)
        };
    };
    record.refs = record.refs.saturating_sub(1);
    if record.refs == 0 {
        // No committed version names it any more: its copies become orphans, collected by the
        // storage nodes after the grace period.
        store.remove(Table::Chunks, hash.as_ref())
    } else {
        store.put(Table::Chunks, hash.as_ref(), &encode(&record)?)
    }
}

fn segment_key(chunk_set: u64, last_index: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&chunk_set.to_be_bytes());
    key[8..].copy_from_slice(&last_index.to_be_bytes());
    key
}

pub(crate) fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// A fresh chunk set id.
fn new_chunk_set(store: &mut impl StateStore) -> Result<u64, StoreError> {
    let id = get_u64(store, Table::Meta, META_NEXT_CHUNK_SET)?.max(1);
    put_u64(store, Table::Meta, META_NEXT_CHUNK_SET, id + 1)?;
    Ok(id)
}

/// The first repeat in `chunks` (an entry without replicas) whose chunk neither an earlier entry
/// of `chunks` nor a chunk record (or inline chunk) names: it would reference copies nobody
/// prepared. A write sends repeats only of chunks it listed before, in this entry or in a
/// staged segment of its own upload, whose references keep the record alive, and entries of
/// the inline chunks its entry carries (see [`with_inline_chunks`]).
fn unresolved_repeat(store: &impl StateStore, chunks: &[CommittedChunk]) -> Result<Option<ChunkHash>, StoreError> {
    let mut listed = std::collections::HashSet::new();
    for chunk in chunks {
        if chunk.replicas.is_empty()
            && !listed.contains(&chunk.hash)
            && store.get(Table::Chunks, chunk.hash.as_ref())?.is_none()
            && store.get(Table::InlineChunks, chunk.hash.as_ref())?.is_none()
            && store.get(Table::Stripes, chunk.hash.as_ref())?.is_none()
        {
            return Ok(Some(chunk.hash));
        }
        listed.insert(chunk.hash);
    }
    Ok(None)
}

/// Applies `apply_inner`, a write whose chunk list (`listed`) names the chunks `inline` carries,
/// with those chunks kept in the metadata: each is recorded (without references) before the
/// write is applied, so the write's entries for it resolve, and whatever the write did not
/// reference afterwards (a refused write) is removed again. Refuses, before any change, a
/// chunk larger than [`INLINE_CHUNK_BYTES_MAX`], more than [`INLINE_CHUNKS_PER_ENTRY_MAX`], or
/// one the write does not list with its size and without replicas.
pub(crate) fn with_inline_chunks<S: StateStore>(
    store: &mut S,
    inline: &[InlineChunk],
    listed: Option<&[CommittedChunk]>,
    apply_inner: impl FnOnce(&mut S) -> Result<CommandResult, StoreError>,
) -> Result<CommandResult, StoreError> {
    let refuse = |why: String| Ok(Err(CommandError::InvalidRequest { why }));
    let Some(listed) = listed else {
        return refuse("inline chunks come only with a file, object or part write".to_string());
    };
    if inline.len() > INLINE_CHUNKS_PER_ENTRY_MAX {
        return refuse(format!(
            "{} inline chunks in one entry; the most is {INLINE_CHUNKS_PER_ENTRY_MAX}",
            inline.len()
        ));
    }
    let mut hashes = Vec::with_capacity(inline.len());
    for chunk in inline {
        if chunk.data.len() > INLINE_CHUNK_BYTES_MAX {
            return refuse(format!(
                "an inline chunk of {} bytes; the most is {INLINE_CHUNK_BYTES_MAX}",
                chunk.data.len()
            ));
        }
        let hash = ChunkHash::of(&chunk.data);
        let named = listed
            .iter()
            .any(|entry| entry.hash == hash && entry.size == chunk.data.len() as u64 && entry.replicas.is_empty());
        if !named {
            return refuse(format!("inline chunk {hash} is not in the write's chunk list as an entry without copies"));
        }
        hashes.push(hash);
    }
    let mut recorded = Vec::new();
    for (hash, chunk) in hashes.iter().zip(inline) {
        let known = store.get(Table::Chunks, hash.as_ref())?.is_some()
            || store.get(Table::InlineChunks, hash.as_ref())?.is_some()
            || store.get(Table::Stripes, hash.as_ref())?.is_some();
        if !known {
            let record = InlineChunkRecord { refs: 0, data: chunk.data.clone() };
            store.put(Table::InlineChunks, hash.as_ref(), &encode(&record)?)?;
            recorded.push(*hash);
        }
    }
    let result = apply_inner(store)?;
    for hash in recorded {
        if get_inline_chunk(store, &hash)?.is_some_and(|record| record.refs == 0) {
            store.remove(Table::InlineChunks, hash.as_ref())?;
        }
    }
    Ok(result)
}

/// Appends `chunks`, the chunk list's entries from `first_index` on, to `chunk_set` as one
/// segment, adding a reference to each chunk.
fn append_segment(
    store: &mut impl StateStore,
    chunk_set: u64,
    first_index: u64,
    chunks: &[CommittedChunk],
) -> Result<(), StoreError> {
    let Some(last) = chunks.len().checked_sub(1) else { return Ok(()) };
    for chunk in chunks {
        add_reference(store, chunk)?;
    }
    let list: Vec<FileChunk> = chunks.iter().map(|c| FileChunk { hash: c.hash, size: c.size }).collect();
    store.put(Table::Segments, &segment_key(chunk_set, first_index + last as u64), &encode(&list)?)
}

/// Up to `limit` entries of a chunk list of `n_chunks` from `from_index` on, in order: one
/// range read per segment touched.
pub fn chunk_list_page(
    store: &impl StateStore,
    chunk_set: u64,
    n_chunks: u64,
    from_index: u64,
    limit: usize,
) -> Result<Vec<FileChunk>, StoreError> {
    let end = prefix_end(&chunk_set.to_be_bytes());
    let mut page = Vec::with_capacity(limit.min(SEGMENT_CHUNKS_MAX).min(n_chunks.saturating_sub(from_index) as usize));
    let mut index = from_index;
    while page.len() < limit && index < n_chunks {
        let rows = store.range(Table::Segments, &segment_key(chunk_set, index), end.as_deref(), 1)?;
        let broken = || StoreError(format!("chunk set {chunk_set} has no segment holding chunk {index}"));
        let (key, value) = rows.into_iter().next().ok_or_else(broken)?;
        let last = u64_at(&key, 8).ok_or_else(broken)?;
        let segment: Vec<FileChunk> = decode(&value)?;
        let first = (last + 1).checked_sub(segment.len() as u64).filter(|first| *first <= index).ok_or_else(broken)?;
        let wanted = limit - page.len();
        page.extend(segment.into_iter().skip((index - first) as usize).take(wanted));
        index = from_index + page.len() as u64;
    }
    Ok(page)
}

/// Up to `limit` chunks of a file version from `from_index` on.
pub fn file_chunk_page(
    store: &impl StateStore,
    file: &FileRecord,
    from_index: u64,
    limit: usize,
) -> Result<Vec<FileChunk>, StoreError> {
    chunk_list_page(store, file.chunk_set, file.n_chunks, from_index, limit)
}

/// Drops the references of `chunk_set`'s segments, first segment first, whole segments until
/// at least `budget` are dropped. Returns how many were, and whether the set is now empty.
fn release_segments(store: &mut impl StateStore, chunk_set: u64, budget: u64) -> Result<(u64, bool), StoreError> {
    let start = chunk_set.to_be_bytes();
    let end = prefix_end(&start);
    let mut dropped = 0;
    loop {
        let rows = store.range(Table::Segments, &start, end.as_deref(), 1)?;
        let Some((key, value)) = rows.into_iter().next() else { return Ok((dropped, true)) };
        if dropped >= budget {
            return Ok((dropped, false));
        }
        let segment: Vec<FileChunk> = decode(&value)?;
        for chunk in &segment {
            drop_reference(store, &chunk.hash)?;
        }
        store.remove(Table::Segments, &key)?;
        dropped += segment.len() as u64;
    }
}

/// Nothing owns `chunk_set` any more: drops its first segment's worth of references now and
/// queues the rest for `ReleaseChunks`.
pub(crate) fn release_chunk_set(store: &mut impl StateStore, chunk_set: u64) -> Result<(), StoreError> {
    let (_, empty) = release_segments(store, chunk_set, RELEASE_CHUNKS_PER_APPLY)?;
    if !empty {
        store.put(Table::ReleasedChunkSets, &chunk_set.to_be_bytes(), &[])?;
    }
    Ok(())
}

/// Nothing owns `chunk_set` any more: queues all of its references for `ReleaseChunks`, for a
/// command that releases many chunk sets at once (an S3 multipart upload's parts).
pub(crate) fn queue_chunk_set_release(store: &mut impl StateStore, chunk_set: u64) -> Result<(), StoreError> {
    store.put(Table::ReleasedChunkSets, &chunk_set.to_be_bytes(), &[])
}

pub fn get_upload(store: &impl StateStore, upload_id: u64) -> Result<Option<Upload>, StoreError> {
    store.get(Table::Uploads, &upload_id.to_be_bytes())?.map(|bytes| decode(&bytes)).transpose()
}

fn expiry_key(expires_at_ms: u64, upload_id: u64) -> [u8; 16] {
    segment_key(expires_at_ms, upload_id)
}

/// Forgets an upload (its chunk set is the caller's to install or release).
fn remove_upload(store: &mut impl StateStore, upload_id: u64, upload: &Upload) -> Result<(), StoreError> {
    store.remove(Table::UploadsByExpiry, &expiry_key(upload.expires_at_ms, upload_id))?;
    store.remove(Table::Uploads, &upload_id.to_be_bytes())
}

/// The upload, unless it is missing, expired, or not the one the command continues.
fn continued_upload(
    store: &impl StateStore,
    upload_id: u64,
    path: &str,
    first_index: u64,
    clock_ms: u64,
) -> Result<Result<Upload, CommandError>, StoreError> {
    let Some(upload) = get_upload(store, upload_id)?.filter(|upload| upload.expires_at_ms >= clock_ms) else {
        return Ok(Err(CommandError::UploadNotFound { upload_id }));
    };
    if upload.path != path {
        let why = format!("it writes {}, not {path}", upload.path);
        return Ok(Err(CommandError::UploadMismatch { upload_id, why }));
    }
    if upload.n_chunks != first_index {
        let why = format!("{} chunks are staged, but the segment starts at chunk {first_index}", upload.n_chunks);
        return Ok(Err(CommandError::UploadMismatch { upload_id, why }));
    }
    Ok(Ok(upload))
}

/// Refuses a write whose chunks began preparing more than `grace_ms` of state clock ago. The
/// state clock is at least the leader's stamp, and `prepared_at_ms` is that stamp less the
/// write's real age, so the age checked is never less than the real one.
fn check_prepare_age(prepared_at_ms: u64, grace_ms: u64, clock_ms: u64) -> Result<(), CommandError> {
    let age_ms = clock_ms.saturating_sub(prepared_at_ms);
    if age_ms > grace_ms {
        return Err(CommandError::PrepareExpired { age_ms, grace_ms });
    }
    Ok(())
}

pub(crate) fn stage_segment(
    store: &mut impl StateStore,
    stage: &StageSegment,
    clock_ms: u64,
) -> Result<CommandResult, StoreError> {
    if let Err(refused) = check_prepare_age(stage.prepared_at_ms, stage.grace_ms, clock_ms) {
        return Ok(Err(refused));
    }
    let exists = store.get(Table::Uploads, &stage.upload_id.to_be_bytes())?.is_some();
    let continued = if stage.first_index == 0 && !exists {
        None
    } else {
        match continued_upload(store, stage.upload_id, &stage.path, stage.first_index, clock_ms)? {
            Ok(upload) => Some(upload),
            Err(refused) => return Ok(Err(refused)),
        }
    };
    if let Some(hash) = unresolved_repeat(store, &stage.chunks)? {
        return Ok(Err(CommandError::UnknownChunk { hash }));
    }
    let mut upload = match continued {
        Some(upload) => {
            store.remove(Table::UploadsByExpiry, &expiry_key(upload.expires_at_ms, stage.upload_id))?;
            upload
        }
        None => Upload {
            path: stage.path.clone(),
            chunk_set: new_chunk_set(store)?,
            n_chunks: 0,
            size: 0,
            expires_at_ms: clock_ms,
        },
    };
    append_segment(store, upload.chunk_set, upload.n_chunks, &stage.chunks)?;
    upload.n_chunks += stage.chunks.len() as u64;
    upload.size = stage.chunks.iter().fold(upload.size, |size, chunk| size.saturating_add(chunk.size));
    upload.expires_at_ms = clock_ms.saturating_add(stage.grace_ms);
    store.put(Table::UploadsByExpiry, &expiry_key(upload.expires_at_ms, stage.upload_id), &[])?;
    store.put(Table::Uploads, &stage.upload_id.to_be_bytes(), &encode(&upload)?)?;
    Ok(Ok(Outcome::Noop))
}

/// The coordinator gave up on an upload (its client went away, its commit was refused):
/// releases what it staged now rather than at its expiry.
pub(crate) fn abort_upload(store: &mut impl StateStore, upload_id: u64) -> Result<CommandResult, StoreError> {
    if let Some(upload) = get_upload(store, upload_id)? {
        remove_upload(store, upload_id, &upload)?;
        release_chunk_set(store, upload.chunk_set)?;
    }
    Ok(Ok(Outcome::Noop))
}

/// The queued work of chunk sets: expires abandoned uploads, then drops about `budget`
/// references of released chunk sets, oldest set first.
pub(crate) fn release_chunks(
    store: &mut impl StateStore,
    clock_ms: u64,
    budget: u64,
) -> Result<CommandResult, StoreError> {
    let due = store.range(Table::UploadsByExpiry, &[], Some(&clock_ms.to_be_bytes()), UPLOADS_EXPIRED_PER_APPLY)?;
    for (key, _) in due {
        store.remove(Table::UploadsByExpiry, &key)?;
        let Some(upload_id) = u64_at(&key, 8) else { continue };
        if let Some(upload) = get_upload(store, upload_id)? {
            store.remove(Table::Uploads, &upload_id.to_be_bytes())?;
            store.put(Table::ReleasedChunkSets, &upload.chunk_set.to_be_bytes(), &[])?;
        }
    }
    let mut dropped = 0;
    while dropped < budget {
        let rows = store.range(Table::ReleasedChunkSets, &[], None, 1)?;
        let Some((key, _)) = rows.into_iter().next() else { break };
        let (done, empty) = match u64_at(&key, 0) {
            Some(chunk_set) => release_segments(store, chunk_set, budget - dropped)?,
            None => (0, true),
        };
        if empty {
            store.remove(Table::ReleasedChunkSets, &key)?;
        }
        dropped += done;
    }
    Ok(Ok(Outcome::Noop))
}

/// Whether a `ReleaseChunks` proposed at `now_ms` would find work: a released chunk set, or an
/// upload expired by then.
pub fn release_pending(store: &impl StateStore, now_ms: u64) -> Result<bool, StoreError> {
    Ok(!store.range(Table::ReleasedChunkSets, &[], None, 1)?.is_empty()
        || !store.range(Table::UploadsByExpiry, &[], Some(&now_ms.to_be_bytes()), 1)?.is_empty())
}

/// The chunk list a write brings to its commit: the last segment, and the upload whose staged
/// segments come before it (shared by file commits and S3 objects and parts).
pub(crate) struct NewChunkList<'a> {
    /// What the upload was staged for (a file's path, an S3 object's label): a staged upload
    /// of another target is refused.
    pub label: &'a str,
    /// The whole content's size.
    pub size: u64,
    pub chunks: &'a [CommittedChunk],
    pub upload_id: Option<u64>,
    pub first_index: u64,
    pub prepared_at_ms: u64,
    pub grace_ms: u64,
}

/// Checks `list` and installs it as a chunk set: the upload's, or a new one. Returns the chunk
/// set and its chunk count. Every refusal comes before the first change, so a caller that
/// checked its own conditions first refuses or applies whole.
pub(crate) fn install_chunk_list(
    store: &mut impl StateStore,
    list: &NewChunkList<'_>,
    clock_ms: u64,
) -> Result<Result<(u64, u64), CommandError>, StoreError> {
    if let Err(refused) = check_prepare_age(list.prepared_at_ms, list.grace_ms, clock_ms) {
        return Ok(Err(refused));
    }
    let final_bytes = list.chunks.iter().fold(0u64, |size, chunk| size.saturating_add(chunk.size));
    if let Some(hash) = unresolved_repeat(store, list.chunks)? {
        return Ok(Err(CommandError::UnknownChunk { hash }));
    }
    let chunk_set = match list.upload_id {
        None => {
            if final_bytes != list.size {
                let why = format!("its chunks hold {final_bytes} bytes, but the content has {}", list.size);
                return Ok(Err(CommandError::UploadMismatch { upload_id: 0, why }));
            }
            new_chunk_set(store)?
        }
        Some(upload_id) => {
            let upload = match continued_upload(store, upload_id, list.label, list.first_index, clock_ms)? {
                Ok(upload) => upload,
                Err(refused) => return Ok(Err(refused)),
            };
            if upload.size.saturating_add(final_bytes) != list.size {
                let why = format!(
                    "{} bytes are staged and {final_bytes} come with the commit, but the content has {}",
                    upload.size, list.size
                );
                return Ok(Err(CommandError::UploadMismatch { upload_id, why }));
            }
            remove_upload(store, upload_id, &upload)?;
            upload.chunk_set
        }
    };
    let first_index = if list.upload_id.is_some() { list.first_index } else { 0 };
    append_segment(store, chunk_set, first_index, list.chunks)?;
    Ok(Ok((chunk_set, first_index + list.chunks.len() as u64)))
}

/// A version's modification time: the one its writer set (a client preserving a file's
/// mtime), or, for 0, the state clock at the apply. Never the date of the node that took the
/// write: a node whose clock is a day off would otherwise stamp an overwrite as older than the
/// version it replaced, and every replica applies the same stamp.
pub(crate) fn stamped(requested_ms: u64, clock_ms: u64) -> u64 {
    if requested_ms == 0 {
        clock_ms
    } else {
        requested_ms
    }
}

pub(crate) fn commit_file(
    store: &mut impl StateStore,
    commit: &CommitFile,
    clock_ms: u64,
) -> Result<CommandResult, StoreError> {
    if let Err(refused) = check_prepare_age(commit.prepared_at_ms, commit.grace_ms, clock_ms) {
        return Ok(Err(refused));
    }
    let existing = get_file(store, &commit.path)?;
    let actual = existing.as_ref().map_or(0, |file| file.version);
    if let Some(expected) = commit.expected_version {
        if expected != actual {
            return Ok(Err(CommandError::VersionMismatch { expected, actual }));
        }
    }
    let list = NewChunkList {
        label: &commit.path,
        size: commit.size,
        chunks: &commit.chunks,
        upload_id: commit.upload_id,
        first_index: commit.first_index,
        prepared_at_ms: commit.prepared_at_ms,
        grace_ms: commit.grace_ms,
    };
    // New references first, so a chunk shared by the old and the new version never drops to
    // zero in between.
    let (chunk_set, n_chunks) = match install_chunk_list(store, &list, clock_ms)? {
        Ok(installed) => installed,
        Err(refused) => return Ok(Err(refused)),
    };
    if let Some(old) = &existing {
        release_chunk_set(store, old.chunk_set)?;
    }
    let revision = current_revision(store)? + 1;
    let record = FileRecord {
        size: commit.size,
        mtime_ms: stamped(commit.mtime_ms, clock_ms),
        content_hash: commit.content_hash.clone(),
        version: actual + 1,
        create_revision: existing.as_ref().map_or(revision, |file| file.create_revision),
        modify_revision: revision,
        chunk_set,
        n_chunks,
    };
    store.put(Table::Files, commit.path.as_bytes(), &encode(&record)?)?;
    commit_revision(store, &[])?;
    Ok(Ok(Outcome::FileCommitted { version: record.version, revision }))
}

pub(crate) fn delete_file(
    store: &mut impl StateStore,
    path: &str,
    expected_version: Option<u64>,
) -> Result<CommandResult, StoreError> {
    let Some(existing) = get_file(store, path)? else {
        return Ok(Err(CommandError::FileNotFound { path: path.to_string() }));
    };
    if let Some(expected) = expected_version {
        if expected != existing.version {
            return Ok(Err(CommandError::VersionMismatch { expected, actual: existing.version }));
        }
    }
    release_chunk_set(store, existing.chunk_set)?;
    store.remove(Table::Files, path.as_bytes())?;
    let revision = commit_revision(store, &[])?;
    Ok(Ok(Outcome::Written { revision, kv: None, deleted: true }))
}

pub(crate) fn drop_replica(
    store: &mut impl StateStore,
    hash: &ChunkHash,
    node_id: NodeId,
) -> Result<CommandResult, StoreError> {
    if let Some(mut record) = get_chunk(store, hash)? {
        // Never drop the last listed copy: a record with no replica could never be repaired,
        // while a bad last copy can still be read by trying it.
        if record.replicas.len() > 1 && record.replicas.contains(&node_id) {
            record.replicas.retain(|node| *node != node_id);
            store.put(Table::Chunks, hash.as_ref(), &encode(&record)?)?;
        }
    }
    // The same file on a node may be a shard too (storage is by hash).
    crate::stripes::drop_bad_shard(store, hash, node_id)?;
    Ok(Ok(Outcome::Noop))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::MemoryStore;

    fn chunk(byte: u8, replicas: &[u64]) -> CommittedChunk {
        CommittedChunk { hash: ChunkHash::from_bytes([byte; 32]), size: 10, replicas: replicas.to_vec() }
    }

    fn commit(path: &str, chunks: Vec<CommittedChunk>, expected_version: Option<u64>) -> CommitFile {
        CommitFile {
            path: path.into(),
            size: chunks.iter().map(|c| c.size).sum(),
            mtime_ms: 1,
            content_hash: vec![0; 32],
            chunks,
            upload_id: None,
            first_index: 0,
            expected_version,
            prepared_at_ms: 1_000,
            grace_ms: PREPARE_GRACE_MS,
        }
    }

    fn refs(store: &MemoryStore, byte: u8) -> u64 {
        get_chunk(store, &ChunkHash::from_bytes([byte; 32])).unwrap().map_or(0, |record| record.refs)
    }

    #[test]
    fn overwrite_moves_references_atomically_and_keeps_shared_chunks() {
        let mut store = MemoryStore::default();
        commit_file(&mut store, &commit("/a", vec![chunk(1, &[1, 2, 3]), chunk(2, &[1, 2, 3])], None), 1_000)
            .unwrap()
            .unwrap();
        assert_eq!((refs(&store, 1), refs(&store, 2)), (1, 1));
        // The new version shares chunk 2 and drops chunk 1.
        let outcome =
            commit_file(&mut store, &commit("/a", vec![chunk(2, &[2, 3, 4]), chunk(3, &[1, 2, 3])], Some(1)), 1_000)
                .unwrap()
                .unwrap();
        assert!(matches!(outcome, Outcome::FileCommitted { version: 2, .. }));
        assert_eq!((refs(&store, 1), refs(&store, 2), refs(&store, 3)), (0, 1, 1));
        assert!(
            get_chunk(&store, &ChunkHash::from_bytes([1; 32])).unwrap().is_none(),
            "an unreferenced chunk loses its record"
        );
        assert_eq!(
            get_chunk(&store, &ChunkHash::from_bytes([2; 32])).unwrap().unwrap().replicas,
            vec![1, 2, 3, 4],
            "new copies are listed"
        );
    }

    #[test]
    fn the_same_chunk_in_two_files_survives_one_delete() {
        let mut store = MemoryStore::default();
        commit_file(&mut store, &commit("/a", vec![chunk(7, &[1, 2, 3])], None), 1_000).unwrap().unwrap();
        commit_file(&mut store, &commit("/b", vec![chunk(7, &[1, 2, 3]), chunk(7, &[1, 2, 3])], None), 1_000)
            .unwrap()
            .unwrap();
        assert_eq!(refs(&store, 7), 3);
        delete_file(&mut store, "/b", None).unwrap().unwrap();
        assert_eq!(refs(&store, 7), 1, "still referenced by /a");
        delete_file(&mut store, "/a", Some(1)).unwrap().unwrap();
        assert_eq!(refs(&store, 7), 0);
    }

    /// A commit without a time is stamped with the state clock at its apply; one with a time
    /// (a client preserving a file's mtime) keeps it.
    #[test]
    fn a_commit_is_stamped_with_the_state_clock_unless_it_carries_a_time() {
        let mut store = MemoryStore::default();
        let unstamped = CommitFile { mtime_ms: 0, ..commit("/a", vec![chunk(1, &[1])], None) };
        commit_file(&mut store, &unstamped, 1_500).unwrap().unwrap();
        assert_eq!(get_file(&store, "/a").unwrap().unwrap().mtime_ms, 1_500);
        commit_file(&mut store, &commit("/a", vec![chunk(2, &[1])], None), 1_600).unwrap().unwrap();
        assert_eq!(get_file(&store, "/a").unwrap().unwrap().mtime_ms, 1);
    }

    #[test]
    fn refused_commits_change_nothing() {
        let mut store = MemoryStore::default();
        commit_file(&mut store, &commit("/a", vec![chunk(1, &[1])], None), 1_000).unwrap().unwrap();
        let before = store.clone();
        let stale = commit_file(&mut store, &commit("/a", vec![chunk(2, &[1])], Some(7)), 1_000).unwrap();
        assert_eq!(stale, Err(CommandError::VersionMismatch { expected: 7, actual: 1 }));
        let late =
            commit_file(&mut store, &commit("/a", vec![chunk(2, &[1])], None), 1_000 + PREPARE_GRACE_MS + 1).unwrap();
        assert!(matches!(late, Err(CommandError::PrepareExpired { .. })));
        assert_eq!(store, before);
        assert_eq!(
            delete_file(&mut store, "/missing", None).unwrap(),
            Err(CommandError::FileNotFound { path: "/missing".into() })
        );
    }

    fn inline_commit(path: &str, data: &[u8], expected_version: Option<u64>) -> (CommitFile, Vec<InlineChunk>) {
        let entry = CommittedChunk { hash: ChunkHash::of(data), size: data.len() as u64, replicas: vec![] };
        (commit(path, vec![entry], expected_version), vec![InlineChunk { data: data.to_vec() }])
    }

    fn commit_inline(store: &mut MemoryStore, commit: &CommitFile, inline: &[InlineChunk]) -> CommandResult {
        with_inline_chunks(store, inline, Some(&commit.chunks), |store| commit_file(store, commit, 1_000)).unwrap()
    }

    fn inline_refs(store: &MemoryStore, data: &[u8]) -> Option<u64> {
        get_inline_chunk(store, &ChunkHash::of(data)).unwrap().map(|record| record.refs)
    }

    #[test]
    fn a_small_write_keeps_its_bytes_in_the_metadata_until_its_last_reference_goes() {
        let mut store = MemoryStore::default();
        let (first, carried) = inline_commit("/a", b"small file", None);
        commit_inline(&mut store, &first, &carried).unwrap();
        let hash = ChunkHash::of(b"small file");
        assert_eq!(get_inline_chunk(&store, &hash).unwrap().unwrap().data, b"small file");
        assert_eq!(chunk_replicas(&store, &hash).unwrap(), Some(vec![]), "listed without copies");
        assert!(get_chunk(&store, &hash).unwrap().is_none(), "repair and collection never see it");
        // The same content again, inline: one row, two references.
        let (second, carried) = inline_commit("/b", b"small file", None);
        commit_inline(&mut store, &second, &carried).unwrap();
        assert_eq!(inline_refs(&store, b"small file"), Some(2));
        // Overwriting /a with other content moves its reference.
        let (overwrite, carried) = inline_commit("/a", b"other", Some(1));
        commit_inline(&mut store, &overwrite, &carried).unwrap();
        assert_eq!((inline_refs(&store, b"small file"), inline_refs(&store, b"other")), (Some(1), Some(1)));
        delete_file(&mut store, "/b", None).unwrap().unwrap();
        delete_file(&mut store, "/a", None).unwrap().unwrap();
        assert!(store.range(Table::InlineChunks, &[], None, 1).unwrap().is_empty(), "nothing left");
    }

    #[test]
    fn a_refused_or_mismatched_inline_write_changes_nothing() {
        let mut store = MemoryStore::default();
        let (first, carried) = inline_commit("/a", b"v1", None);
        commit_inline(&mut store, &first, &carried).unwrap();
        let before = store.clone();
        let (stale, carried) = inline_commit("/a", b"v2", Some(9));
        assert_eq!(
            commit_inline(&mut store, &stale, &carried),
            Err(CommandError::VersionMismatch { expected: 9, actual: 1 })
        );
        assert_eq!(store, before, "the refused write's bytes are not left behind");
        // Bytes the chunk list does not name, or names with copies or another size.
        let (listed, _) = inline_commit("/b", b"listed", None);
        let unnamed = [InlineChunk { data: b"not listed".to_vec() }];
        assert!(matches!(commit_inline(&mut store, &listed, &unnamed), Err(CommandError::InvalidRequest { .. })));
        let with_copies =
            commit("/b", vec![CommittedChunk { hash: ChunkHash::of(b"x"), size: 1, replicas: vec![1] }], None);
        let carried = [InlineChunk { data: b"x".to_vec() }];
        assert!(matches!(commit_inline(&mut store, &with_copies, &carried), Err(CommandError::InvalidRequest { .. })));
        let too_big = vec![7u8; INLINE_CHUNK_BYTES_MAX + 1];
        let (big, carried) = inline_commit("/c", &too_big, None);
        assert!(matches!(commit_inline(&mut store, &big, &carried), Err(CommandError::InvalidRequest { .. })));
        let not_a_write =
            with_inline_chunks(&mut store, &[InlineChunk { data: b"x".to_vec() }], None, |_| Ok(Ok(Outcome::Noop)));
        assert!(matches!(not_a_write.unwrap(), Err(CommandError::InvalidRequest { .. })));
        assert_eq!(store, before);
    }

    /// A content is kept one way: whichever way it was first written takes the later writes'
    /// references, so no hash is both inline and in the chunk map.
    #[test]
    fn the_same_content_written_both_ways_is_kept_one_way() {
        let mut store = MemoryStore::default();
        let data = b"same bytes";
        let hash = ChunkHash::of(data);
        let replicated =
            |path: &str| commit(path, vec![CommittedChunk { hash, size: 10, replicas: vec![1, 2, 3] }], None);
        // Inline first: a later replicated write's copies become orphans.
        let (inline, carried) = inline_commit("/a", data, None);
        commit_inline(&mut store, &inline, &carried).unwrap();
        commit_file(&mut store, &replicated("/b"), 1_000).unwrap().unwrap();
        assert_eq!(inline_refs(&store, data), Some(2));
        assert!(get_chunk(&store, &hash).unwrap().is_none());
        delete_file(&mut store, "/a", None).unwrap().unwrap();
        delete_file(&mut store, "/b", None).unwrap().unwrap();
        // Replicated first: a later inline write references the copies and stores nothing.
        commit_file(&mut store, &replicated("/c"), 1_000).unwrap().unwrap();
        let (inline, carried) = inline_commit("/d", data, None);
        commit_inline(&mut store, &inline, &carried).unwrap();
        assert_eq!(get_chunk(&store, &hash).unwrap().unwrap().refs, 2);
        assert_eq!(inline_refs(&store, data), None);
        check_references(&store);
    }

    #[test]
    fn dropping_a_replica_never_drops_the_last_one() {
        let mut store = MemoryStore::default();
        commit_file(&mut store, &commit("/a", vec![chunk(1, &[1, 2])], None), 1_000).unwrap().unwrap();
        drop_replica(&mut store, &ChunkHash::from_bytes([1; 32]), 1).unwrap().unwrap();
        drop_replica(&mut store, &ChunkHash::from_bytes([1; 32]), 2).unwrap().unwrap();
        assert_eq!(get_chunk(&store, &ChunkHash::from_bytes([1; 32])).unwrap().unwrap().replicas, vec![2]);
    }

    fn replicas(store: &MemoryStore, byte: u8) -> Vec<u64> {
        get_chunk(store, &ChunkHash::from_bytes([byte; 32])).unwrap().map(|r| r.replicas).unwrap_or_default()
    }

    fn job(id: u64) -> RepairJob {
        RepairJob {
            id,
            started_ms: 5,
            reason: "node 3 down".into(),
            total_copies: 2,
            total_bytes: 20,
            done_copies: 0,
            done_bytes: 0,
            finished_ms: None,
        }
    }

    #[test]
    fn added_replicas_are_listed_once_and_counted_in_their_job() {
        let mut store = MemoryStore::default();
        commit_file(&mut store, &commit("/a", vec![chunk(1, &[1, 2]), chunk(2, &[1, 2])], None), 1_000)
            .unwrap()
            .unwrap();
        record_repair_job(&mut store, &job(7)).unwrap().unwrap();
        let added = vec![
            ReplicaAdded { hash: ChunkHash::from_bytes([1; 32]), node: 3 },
            ReplicaAdded { hash: ChunkHash::from_bytes([1; 32]), node: 3 },
            ReplicaAdded { hash: ChunkHash::from_bytes([2; 32]), node: 1 },
            ReplicaAdded { hash: ChunkHash::from_bytes([9; 32]), node: 3 },
        ];
        add_replicas(&mut store, Some(7), &added).unwrap().unwrap();
        assert_eq!(replicas(&store, 1), vec![1, 2, 3]);
        assert_eq!(replicas(&store, 2), vec![1, 2], "an already listed node is not added twice");
        assert!(
            get_chunk(&store, &ChunkHash::from_bytes([9; 32])).unwrap().is_none(),
            "a deleted chunk gets no record back"
        );
        let recorded = repair_job(&store).unwrap().unwrap();
        assert_eq!((recorded.done_copies, recorded.done_bytes), (1, 10), "only real additions count");
        // Another job's completions (a stale leader's) do not count in this one.
        add_replicas(&mut store, Some(6), &[ReplicaAdded { hash: ChunkHash::from_bytes([2; 32]), node: 4 }])
            .unwrap()
            .unwrap();
        assert_eq!(repair_job(&store).unwrap().unwrap().done_copies, 1);
        assert_eq!(replicas(&store, 2), vec![1, 2, 4]);
    }

    #[test]
    fn a_new_repair_job_moves_the_previous_one_into_a_bounded_history() {
        let mut store = MemoryStore::default();
        assert!(repair_history(&store).unwrap().is_empty());
        record_repair_job(&mut store, &job(1)).unwrap().unwrap();
        let mut finished = job(1);
        finished.done_copies = 2;
        finished.finished_ms = Some(9);
        // The same job recorded again (progress, its finish) is not history.
        record_repair_job(&mut store, &finished).unwrap().unwrap();
        assert!(repair_history(&store).unwrap().is_empty());
        record_repair_job(&mut store, &job(2)).unwrap().unwrap();
        assert_eq!(repair_history(&store).unwrap(), vec![finished.clone()]);
        assert_eq!(repair_job(&store).unwrap().unwrap().id, 2);

        for id in 3..(REPAIR_HISTORY_MAX as u64 + 10) {
            record_repair_job(&mut store, &job(id)).unwrap().unwrap();
        }
        let history = repair_history(&store).unwrap();
        assert_eq!(history.len(), REPAIR_HISTORY_MAX);
        let ids: Vec<u64> = history.iter().map(|job| job.id).collect();
        let newest = REPAIR_HISTORY_MAX as u64 + 8;
        assert_eq!(ids, (newest + 1 - REPAIR_HISTORY_MAX as u64..=newest).rev().collect::<Vec<_>>(), "newest first");
    }

    #[test]
    fn a_drop_applies_only_while_its_kept_copies_are_listed() {
        let mut store = MemoryStore::default();
        commit_file(&mut store, &commit("/a", vec![chunk(1, &[1, 2, 3, 4])], None), 1_000).unwrap().unwrap();
        let drop =
            |node: u64, keep: &[u64]| ReplicaDrop { hash: ChunkHash::from_bytes([1; 32]), node, keep: keep.to_vec() };
        // Two drops planned against overlapping keeps: the second is stale once the first applied.
        drop_replicas(&mut store, &[drop(4, &[1, 2, 3]), drop(3, &[1, 2, 4])]).unwrap().unwrap();
        assert_eq!(replicas(&store, 1), vec![1, 2, 3]);
        // Never a drop with an empty keep, nor of a node in its own keep.
        drop_replicas(&mut store, &[drop(3, &[]), drop(2, &[1, 2])]).unwrap().unwrap();
        assert_eq!(replicas(&store, 1), vec![1, 2, 3]);
        drop_replicas(&mut store, &[drop(3, &[1, 2])]).unwrap().unwrap();
        assert_eq!(replicas(&store, 1), vec![1, 2]);
    }

    #[test]
    fn liveness_and_drain_change_only_registered_nodes_and_survive_reregistration() {
        let mut store = MemoryStore::default();
        assert_eq!(set_draining(&mut store, 9, true).unwrap(), Err(CommandError::NodeNotFound { node_id: 9 }));
        let node = StorageNode {
            id: 9,
            addr: "127.0.0.1:1".into(),
            zone: "a".into(),
            weight: 100,
            draining: false,
            liveness: Liveness::Up,
        };
        register_storage_node(&mut store, &node).unwrap().unwrap();
        set_liveness(&mut store, 9, Liveness::Down).unwrap().unwrap();
        set_liveness(&mut store, 9, Liveness::Suspect).unwrap().unwrap();
        assert_eq!(list_storage_nodes(&store).unwrap()[0].liveness, Liveness::Down, "suspicion is never committed");
        register_storage_node(&mut store, &node).unwrap().unwrap();
        assert_eq!(list_storage_nodes(&store).unwrap()[0].liveness, Liveness::Down, "a restart does not claim up");
        unregister_storage_node(&mut store, 9).unwrap().unwrap();
        assert!(list_storage_nodes(&store).unwrap().is_empty());
    }

    #[test]
    fn chunk_scans_page_through_every_record() {
        let mut store = MemoryStore::default();
        for i in 0..5_000u32 {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&i.to_be_bytes());
            let hash = ChunkHash::from_bytes(bytes);
            let c = CommittedChunk { hash, size: 1, replicas: vec![u64::from(i % 3) + 1] };
            commit_file(&mut store, &commit(&format!("/f{i}"), vec![c], None), 1_000).unwrap().unwrap();
        }
        assert_eq!(chunks_listed_on(&store, 1).unwrap(), 1_667);
        let mut seen = 0;
        for_each_chunk(&store, |_, _| {
            seen += 1;
            true
        })
        .unwrap();
        assert_eq!(seen, 5_000);
    }

    #[test]
    fn chunk_scans_a_slice_at_a_time_see_every_record_once_in_hash_order() {
        let mut store = MemoryStore::default();
        // First bytes at both ends of the key space, and many sharing one slice (more than a page).
        let firsts = (0..5_000u32).map(|i| if i < 4_500 { 0x7f } else { [0x00, 0x01, 0xfe, 0xff][i as usize % 4] });
        let mut expected = Vec::new();
        for (i, first) in (0..5_000u32).zip(firsts) {
            let mut bytes = [0u8; 32];
            bytes[0] = first;
            bytes[1..5].copy_from_slice(&i.to_be_bytes());
            let hash = ChunkHash::from_bytes(bytes);
            expected.push(hash);
            let c = CommittedChunk { hash, size: 1, replicas: vec![1] };
            commit_file(&mut store, &commit(&format!("/f{i}"), vec![c], None), 1_000).unwrap().unwrap();
        }
        expected.sort();
        let mut seen = Vec::new();
        for byte0 in 0..=u8::MAX {
            let (start, end) = hash_slice_keys(byte0);
            for_each_chunk_between(&store, &start, end.as_ref().map(|end| end.as_slice()), |hash, _| {
                assert_eq!(hash[0], byte0, "a record outside its slice");
                seen.push(hash);
                true
            })
            .unwrap();
        }
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_chunk_scan_skips_rows_that_are_not_chunk_records() {
        let mut store = MemoryStore::default();
        commit_file(&mut store, &commit("/a", vec![chunk(1, &[1]), chunk(3, &[2])], None), 1_000).unwrap().unwrap();
        // What a bad forwarded command once left behind: a 3-byte key, and a value that does not decode.
        store
            .put(Table::Chunks, &[2; 3], &encode(&ChunkRecord { size: 1, refs: 1, replicas: vec![1] }).unwrap())
            .unwrap();
        store.put(Table::Chunks, &[2; 32], &[0xff; 5]).unwrap();
        let mut seen = Vec::new();
        let skipped = for_each_chunk(&store, |hash, _| {
            seen.push(hash);
            true
        })
        .unwrap();
        assert_eq!(skipped, 2);
        assert_eq!(seen, vec![ChunkHash::from_bytes([1; 32]), ChunkHash::from_bytes([3; 32])]);
    }

    #[test]
    fn registration_keeps_the_admin_state() {
        let mut store = MemoryStore::default();
        let node = StorageNode {
            id: 4,
            addr: "127.0.0.1:1".into(),
            zone: "a".into(),
            weight: 100,
            draining: true,
            liveness: Liveness::Up,
        };
        register_storage_node(&mut store, &node).unwrap().unwrap();
        let moved = StorageNode { addr: "127.0.0.1:2".into(), draining: false, ..node };
        register_storage_node(&mut store, &moved).unwrap().unwrap();
        let nodes = list_storage_nodes(&store).unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].addr, "127.0.0.1:2");
        assert!(nodes[0].draining, "re-registering does not undo a drain");
    }

    // -----------------------------------------------------------------------------------------
    // Chunk lists in segments, uploads, released chunk sets
    // -----------------------------------------------------------------------------------------

    /// A chunk whose hash is made from `n` (so any number of distinct chunks), size 1.
    fn numbered(n: u32, replicas: &[u64]) -> CommittedChunk {
        let mut bytes = [0xa5; 32];
        bytes[..4].copy_from_slice(&n.to_be_bytes());
        CommittedChunk { hash: ChunkHash::from_bytes(bytes), size: 1, replicas: replicas.to_vec() }
    }

    fn numbered_list(range: std::ops::Range<u32>) -> Vec<CommittedChunk> {
        range.map(|n| numbered(n, &[1, 2, 3])).collect()
    }

    fn stage(upload_id: u64, path: &str, first_index: u64, chunks: Vec<CommittedChunk>) -> StageSegment {
        StageSegment {
            upload_id,
            path: path.into(),
            first_index,
            chunks,
            prepared_at_ms: 1_000,
            grace_ms: PREPARE_GRACE_MS,
        }
    }

    fn final_commit(
        upload_id: u64,
        path: &str,
        first_index: u64,
        chunks: Vec<CommittedChunk>,
        size: u64,
    ) -> CommitFile {
        CommitFile { upload_id: Some(upload_id), first_index, size, ..commit(path, chunks, None) }
    }

    /// Every chunk's `refs` equals its entries in all segment rows, and no record has none.
    fn check_references(store: &MemoryStore) {
        let mut counted: std::collections::BTreeMap<ChunkHash, u64> = std::collections::BTreeMap::new();
        for (_, value) in store.range(Table::Segments, &[], None, usize::MAX).unwrap() {
            for chunk in decode::<Vec<FileChunk>>(&value).unwrap() {
                *counted.entry(chunk.hash).or_default() += 1;
            }
        }
        let mut recorded = std::collections::BTreeMap::new();
        for_each_chunk(store, |hash, record| {
            recorded.insert(hash, record.refs);
            true
        })
        .unwrap();
        for (key, value) in store.range(Table::InlineChunks, &[], None, usize::MAX).unwrap() {
            let hash = ChunkHash::try_from(key.as_slice()).unwrap();
            let record: InlineChunkRecord = decode(&value).unwrap();
            assert_eq!(ChunkHash::of(&record.data), hash, "an inline chunk is stored under its hash");
            assert!(recorded.insert(hash, record.refs).is_none(), "chunk {hash} is both inline and in the chunk map");
        }
        let mut index_rows = std::collections::BTreeSet::new();
        crate::stripes::for_each_stripe(store, |hash, record| {
            assert!(recorded.insert(hash, record.refs).is_none(), "chunk {hash} is striped and kept another way too");
            for slot in &record.shards {
                for &node in &slot.nodes {
                    let listing = crate::stripes::stripes_listing(store, &slot.hash, node, usize::MAX).unwrap();
                    assert!(listing.contains(&hash), "shard unindexed");
                    index_rows.insert((slot.hash, node, hash));
                }
            }
            true
        })
        .unwrap();
        let rows = store.range(Table::ShardIndex, &[], None, usize::MAX).unwrap().len();
        assert_eq!(rows, index_rows.len(), "stale index rows");
        assert_eq!(recorded, counted, "chunk references disagree with the segments naming them");
    }

    fn whole_list(store: &MemoryStore, path: &str) -> Vec<ChunkHash> {
        let file = get_file(store, path).unwrap().unwrap();
        let list = file_chunk_page(store, &file, 0, usize::MAX).unwrap();
        assert_eq!(list.len() as u64, file.n_chunks);
        list.into_iter().map(|c| c.hash).collect()
    }

    fn drain_releases(store: &mut MemoryStore, clock_ms: u64) -> usize {
        let mut steps = 0;
        while release_pending(store, clock_ms).unwrap() {
            release_chunks(store, clock_ms, RELEASE_CHUNKS_PER_APPLY).unwrap().unwrap();
            steps += 1;
            assert!(steps < 10_000, "release never ends");
        }
        steps
    }

    #[test]
    fn a_big_file_is_staged_in_segments_and_appears_whole_at_its_commit() {
        let mut store = MemoryStore::default();
        let s = SEGMENT_CHUNKS_MAX as u32;
        for segment in 0..3u32 {
            let chunks = numbered_list(segment * s..(segment + 1) * s);
            stage_segment(&mut store, &stage(9, "/big", u64::from(segment * s), chunks), 1_000).unwrap().unwrap();
            assert!(get_file(&store, "/big").unwrap().is_none(), "nothing is visible before the commit");
        }
        assert_eq!(get_chunk(&store, &numbered(5, &[]).hash).unwrap().unwrap().refs, 1, "staged chunks are referenced");
        check_references(&store);
        let tail = numbered_list(3 * s..3 * s + 10);
        let outcome =
            commit_file(&mut store, &final_commit(9, "/big", 3 * u64::from(s), tail, 3 * u64::from(s) + 10), 2_000)
                .unwrap()
                .unwrap();
        assert!(matches!(outcome, Outcome::FileCommitted { version: 1, .. }));
        let file = get_file(&store, "/big").unwrap().unwrap();
        assert_eq!((file.n_chunks, file.size), (3 * u64::from(s) + 10, 3 * u64::from(s) + 10));
        let expected: Vec<ChunkHash> = (0..3 * s + 10).map(|n| numbered(n, &[]).hash).collect();
        assert_eq!(whole_list(&store, "/big"), expected);
        // Pages that start and end inside segments and cross their boundaries.
        for (from, limit) in [(0u64, 1usize), (8_191, 2), (100, 20_000), (24_570, 100), (24_586, 5)] {
            let page = file_chunk_page(&store, &file, from, limit).unwrap();
            let want: Vec<ChunkHash> = expected.iter().skip(from as usize).take(limit).copied().collect();
            assert_eq!(page.iter().map(|c| c.hash).collect::<Vec<_>>(), want, "page at {from}, {limit}");
        }
        assert!(get_upload(&store, 9).unwrap().is_none(), "the commit consumes the upload");
        assert!(store.range(Table::UploadsByExpiry, &[], None, 10).unwrap().is_empty());
        check_references(&store);
    }

    #[test]
    fn a_staged_segment_or_final_commit_that_does_not_continue_its_upload_is_refused_and_changes_nothing() {
        let mut store = MemoryStore::default();
        stage_segment(&mut store, &stage(1, "/big", 0, numbered_list(0..4)), 1_000).unwrap().unwrap();
        let before = store.clone();
        let refusals = [
            stage_segment(&mut store, &stage(1, "/big", 3, numbered_list(4..8)), 1_000).unwrap(),
            stage_segment(&mut store, &stage(1, "/big", 0, numbered_list(4..8)), 1_000).unwrap(),
            stage_segment(&mut store, &stage(1, "/other", 4, numbered_list(4..8)), 1_000).unwrap(),
            stage_segment(&mut store, &stage(2, "/big", 4, numbered_list(4..8)), 1_000).unwrap(),
            commit_file(&mut store, &final_commit(1, "/big", 5, numbered_list(4..5), 5), 1_000).unwrap(),
            commit_file(&mut store, &final_commit(1, "/big", 4, numbered_list(4..5), 6), 1_000).unwrap(),
            commit_file(&mut store, &final_commit(2, "/big", 4, numbered_list(4..5), 5), 1_000).unwrap(),
            commit_file(
                &mut store,
                &CommitFile { expected_version: Some(3), ..final_commit(1, "/big", 4, vec![], 4) },
                1_000,
            )
            .unwrap(),
        ];
        for refused in &refusals {
            assert!(
                matches!(
                    refused,
                    Err(CommandError::UploadMismatch { .. }
                        | CommandError::UploadNotFound { .. }
                        | CommandError::VersionMismatch { .. })
                ),
                "{refused:?}"
            );
        }
        assert!(matches!(refusals[3], Err(CommandError::UploadNotFound { upload_id: 2 })));
        assert_eq!(store, before);
        // The right continuation still works, with an empty last segment.
        commit_file(&mut store, &final_commit(1, "/big", 4, vec![], 4), 1_000).unwrap().unwrap();
        assert_eq!(whole_list(&store, "/big").len(), 4);
    }

    #[test]
    fn an_abandoned_upload_expires_by_the_state_clock_and_releases_its_references() {
        let mut store = MemoryStore::default();
        let grace = PREPARE_GRACE_MS;
        stage_segment(&mut store, &stage(1, "/big", 0, numbered_list(0..100)), 1_000).unwrap().unwrap();
        // A later segment moves the expiry: the upload lives `grace` after its last segment.
        let later = 1_000 + grace / 2;
        stage_segment(
            &mut store,
            &StageSegment { prepared_at_ms: later, ..stage(1, "/big", 100, numbered_list(100..200)) },
            later,
        )
        .unwrap()
        .unwrap();
        assert!(!release_pending(&store, 1_000 + grace + 1).unwrap(), "extended by the second segment");
        assert!(release_pending(&store, later + grace + 1).unwrap());
        assert_eq!(drain_releases(&mut store, later + grace), 0, "not yet expired at its deadline");
        // Past it, staging or committing is refused even before anything collected it...
        let late = later + grace + 1;
        let refused = commit_file(
            &mut store,
            &CommitFile { prepared_at_ms: late, ..final_commit(1, "/big", 200, vec![], 200) },
            late,
        )
        .unwrap();
        assert_eq!(refused, Err(CommandError::UploadNotFound { upload_id: 1 }));
        // ...and the next release steps drop every reference it held.
        drain_releases(&mut store, late);
        assert!(get_upload(&store, 1).unwrap().is_none());
        assert_eq!(chunks_listed_on(&store, 1).unwrap(), 0, "no chunk is referenced any more");
        assert!(store.range(Table::Segments, &[], None, 1).unwrap().is_empty());
        check_references(&store);
    }

    #[test]
    fn deleting_a_big_file_drops_a_segment_at_once_and_the_rest_in_bounded_steps() {
        let mut store = MemoryStore::default();
        let s = SEGMENT_CHUNKS_MAX as u32;
        // Five segments; the file also shares chunks with a small one, which must survive.
        for segment in 0..5u32 {
            let chunks = numbered_list(segment * s..(segment + 1) * s);
            stage_segment(&mut store, &stage(4, "/big", u64::from(segment * s), chunks), 1_000).unwrap().unwrap();
        }
        commit_file(&mut store, &final_commit(4, "/big", 5 * u64::from(s), vec![], 5 * u64::from(s)), 1_000)
            .unwrap()
            .unwrap();
        commit_file(&mut store, &commit("/small", numbered_list(0..3), None), 1_000).unwrap().unwrap();
        delete_file(&mut store, "/big", None).unwrap().unwrap();
        check_references(&store);
        assert_eq!(chunks_listed_on(&store, 1).unwrap(), 4 * u64::from(s) + 3, "one segment dropped at once");
        let steps = drain_releases(&mut store, 1_000);
        assert_eq!(steps, 4, "a segment per step");
        assert_eq!(chunks_listed_on(&store, 1).unwrap(), 3, "only the small file's chunks remain");
        assert_eq!(whole_list(&store, "/small").len(), 3);
        check_references(&store);
        // Overwriting releases the old version the same way, after the new one's references.
        commit_file(&mut store, &commit("/small", numbered_list(1..4), Some(1)), 1_000).unwrap().unwrap();
        assert_eq!(chunks_listed_on(&store, 1).unwrap(), 3);
        assert!(get_chunk(&store, &numbered(0, &[]).hash).unwrap().is_none());
        check_references(&store);
    }

    #[test]
    fn an_aborted_upload_releases_what_it_staged() {
        let mut store = MemoryStore::default();
        commit_file(&mut store, &commit("/keep", numbered_list(0..2), None), 1_000).unwrap().unwrap();
        stage_segment(&mut store, &stage(8, "/big", 0, numbered_list(0..50)), 1_000).unwrap().unwrap();
        abort_upload(&mut store, 8).unwrap().unwrap();
        abort_upload(&mut store, 8).unwrap().unwrap();
        assert_eq!(chunks_listed_on(&store, 1).unwrap(), 2);
        assert!(!release_pending(&store, u64::MAX).unwrap());
        let refused = stage_segment(&mut store, &stage(8, "/big", 50, numbered_list(50..60)), 1_000).unwrap();
        assert_eq!(refused, Err(CommandError::UploadNotFound { upload_id: 8 }));
        check_references(&store);
    }

    #[test]
    fn a_repeat_adds_a_reference_without_replicas_and_must_follow_its_first_listing() {
        let mut store = MemoryStore::default();
        let repeat = |n: u32| CommittedChunk { replicas: vec![], ..numbered(n, &[]) };
        // Within one entry: the first listing prepared it, the repeats only count.
        let chunks = vec![numbered(1, &[1, 2]), repeat(1), numbered(2, &[2, 3]), repeat(1)];
        stage_segment(&mut store, &stage(5, "/big", 0, chunks), 1_000).unwrap().unwrap();
        let record = get_chunk(&store, &numbered(1, &[]).hash).unwrap().unwrap();
        assert_eq!((record.refs, record.replicas), (3, vec![1, 2]));
        // Across segments of one upload: the staged segment keeps the record alive.
        commit_file(&mut store, &final_commit(5, "/big", 4, vec![repeat(2), repeat(1)], 6), 1_000).unwrap().unwrap();
        assert_eq!(get_chunk(&store, &numbered(2, &[]).hash).unwrap().unwrap().refs, 2);
        check_references(&store);
        // A repeat of a chunk nothing lists is refused whole, changing nothing.
        let before = store.clone();
        let orphan = commit("/small", vec![numbered(3, &[1]), repeat(4)], None);
        assert_eq!(
            commit_file(&mut store, &orphan, 1_000).unwrap(),
            Err(CommandError::UnknownChunk { hash: numbered(4, &[]).hash })
        );
        let refused = stage_segment(&mut store, &stage(6, "/other", 0, vec![repeat(9)]), 1_000).unwrap();
        assert_eq!(refused, Err(CommandError::UnknownChunk { hash: numbered(9, &[]).hash }));
        assert_eq!(store, before);
        delete_file(&mut store, "/big", None).unwrap().unwrap();
        assert!(store.range(Table::Chunks, &[], None, 1).unwrap().is_empty());
    }

    /// What a sequence of file operations may do, for the property test below.
    #[derive(Debug, Clone)]
    enum FileOp {
        /// Commit a small file `path` with these chunk numbers.
        Put {
            path: u8,
            chunks: Vec<u8>,
        },
        /// Stage a segment of upload `upload` (for path `upload % 3`).
        Stage {
            upload: u8,
            chunks: Vec<u8>,
        },
        /// Commit upload `upload` with these last chunks.
        Commit {
            upload: u8,
            chunks: Vec<u8>,
        },
        Abort {
            upload: u8,
        },
        Delete {
            path: u8,
        },
        /// Commit `path` as one small chunk of content `content`: kept inline, or (the same
        /// bytes) prepared on replicas, as a coordinator with inlining off would.
        /// A one-chunk put of `content`, replicated (0), inline (1) or erasure-coded (2).
        PutSmall {
            path: u8,
            content: u8,
            how: u8,
        },
        /// A release step of this budget, `advance_ms` later.
        Release {
            budget: u64,
            advance_ms: u64,
        },
    }

    fn file_op() -> impl proptest::strategy::Strategy<Value = FileOp> {
        use proptest::prelude::*;
        let chunks = || prop::collection::vec(0u8..12, 0..6);
        prop_oneof![
            (0u8..3, chunks()).prop_map(|(path, chunks)| FileOp::Put { path, chunks }),
            (0u8..4, prop::collection::vec(0u8..12, 1..6))
                .prop_map(|(upload, chunks)| FileOp::Stage { upload, chunks }),
            (0u8..4, chunks()).prop_map(|(upload, chunks)| FileOp::Commit { upload, chunks }),
            (0u8..4).prop_map(|upload| FileOp::Abort { upload }),
            (0u8..3).prop_map(|path| FileOp::Delete { path }),
            (0u8..3, 0u8..3, 0u8..3).prop_map(|(path, content, how)| FileOp::PutSmall { path, content, how }),
            (1u64..6, prop_oneof![Just(0u64), Just(PREPARE_GRACE_MS / 2), Just(PREPARE_GRACE_MS + 1)])
                .prop_map(|(budget, advance_ms)| FileOp::Release { budget, advance_ms }),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Whatever the interleaving of small puts, staged uploads, commits, aborts, deletes,
        /// expiries and partial release steps: every chunk's count equals the segment entries
        /// naming it, every file reads back the chunks it was committed with, and once every
        /// file is deleted and the queue drained, nothing is referenced.
        #[test]
        fn references_follow_the_segments_through_any_history(ops in proptest::collection::vec(file_op(), 0..60)) {
            let mut store = MemoryStore::default();
            let mut clock_ms = 1_000u64;
            let mut files: std::collections::BTreeMap<String, Vec<ChunkHash>> = Default::default();
            // Upload → (path, chunks staged so far), while the model believes it is alive.
            let mut uploads: std::collections::BTreeMap<u64, (String, Vec<ChunkHash>, u64)> = Default::default();
            // An even chunk the write listed before is sent as a repeat, without replicas.
            let list = |numbers: &[u8], before: &[ChunkHash]| -> Vec<CommittedChunk> {
                let mut listed: Vec<ChunkHash> = before.to_vec();
                numbers
                    .iter()
                    .map(|n| {
                        let chunk = numbered(u32::from(*n), &[1, 2]);
                        let repeat = n % 2 == 0 && listed.contains(&chunk.hash);
                        listed.push(chunk.hash);
                        if repeat { CommittedChunk { replicas: vec![], ..chunk } } else { chunk }
                    })
                    .collect()
            };
            for op in ops {
                match op {
                    FileOp::Put { path, chunks } => {
                        let path = format!("/f{path}");
                        let c = CommitFile { prepared_at_ms: clock_ms, ..commit(&path, list(&chunks, &[]), None) };
                        commit_file(&mut store, &c, clock_ms).unwrap().unwrap();
                        files.insert(path, c.chunks.iter().map(|c| c.hash).collect());
                    }
                    FileOp::Stage { upload, chunks } => {
                        let id = u64::from(upload);
                        let (path, staged, _) = uploads.get(&id).cloned().unwrap_or((format!("/f{}", upload % 3), vec![], 0));
                        let st = StageSegment { prepared_at_ms: clock_ms, ..stage(id, &path, staged.len() as u64, list(&chunks, &staged)) };
                        let result = stage_segment(&mut store, &st, clock_ms).unwrap();
                        if result.is_ok() {
                            let mut staged = staged;
                            staged.extend(st.chunks.iter().map(|c| c.hash));
                            uploads.insert(id, (path, staged, clock_ms + PREPARE_GRACE_MS));
                        } else {
                            proptest::prop_assert!(matches!(result, Err(CommandError::UploadNotFound { .. })), "{result:?}");
                            uploads.remove(&id);
                        }
                    }
                    FileOp::Commit { upload, chunks } => {
                        let id = u64::from(upload);
                        let Some((path, staged, _)) = uploads.remove(&id) else { continue };
                        let last = list(&chunks, &staged);
                        let size = (staged.len() + last.len()) as u64;
                        let c = CommitFile { prepared_at_ms: clock_ms, ..final_commit(id, &path, staged.len() as u64, last, size) };
                        match commit_file(&mut store, &c, clock_ms).unwrap() {
                            Ok(_) => {
                                let mut all = staged;
                                all.extend(c.chunks.iter().map(|c| c.hash));
                                files.insert(path, all);
                            }
                            Err(refused) => proptest::prop_assert!(matches!(refused, CommandError::UploadNotFound { .. }), "{refused:?}"),
                        }
                    }
                    FileOp::Abort { upload } => {
                        abort_upload(&mut store, u64::from(upload)).unwrap().unwrap();
                        uploads.remove(&u64::from(upload));
                    }
                    FileOp::Delete { path } => {
                        let path = format!("/f{path}");
                        let result = delete_file(&mut store, &path, None).unwrap();
                        proptest::prop_assert_eq!(result.is_ok(), files.remove(&path).is_some());
                    }
                    FileOp::PutSmall { path, content, how } => {
                        let path = format!("/f{path}");
                        let data = vec![content; 5];
                        let hash = ChunkHash::of(&data);
                        let replicas = if how == 0 { vec![1, 2] } else { vec![] };
                        let entry = CommittedChunk { hash, size: 5, replicas };
                        let c = CommitFile { prepared_at_ms: clock_ms, ..commit(&path, vec![entry], None) };
                        match how {
                            0 => commit_file(&mut store, &c, clock_ms).unwrap().unwrap(),
                            1 => {
                                let carried = [InlineChunk { data }];
                                with_inline_chunks(&mut store, &carried, Some(&c.chunks), |store| commit_file(store, &c, clock_ms))
                                    .unwrap()
                                    .unwrap()
                            }
                            _ => {
                                // Shards of different contents may coincide (shard 0 here).
                                let shards = (0..3u8)
                                    .map(|i| crate::stripes::ShardCommit {
                                        hash: ChunkHash::of(&[if i == 0 { 0 } else { content }, i]),
                                        node: u64::from(i) + 1,
                                    })
                                    .collect();
                                let stripe = crate::stripes::StripeCommit {
                                    chunk: hash,
                                    size: 5,
                                    scheme: crate::stripes::Scheme::new(2, 1).unwrap(),
                                    shards,
                                };
                                crate::stripes::with_stripes(&mut store, &[stripe], Some(&c.chunks), |store| commit_file(store, &c, clock_ms))
                                    .unwrap()
                                    .unwrap()
                            }
                        };
                        files.insert(path, vec![hash]);
                    }
                    FileOp::Release { budget, advance_ms } => {
                        clock_ms += advance_ms;
                        release_chunks(&mut store, clock_ms, budget).unwrap().unwrap();
                        uploads.retain(|_, (_, _, expires)| *expires >= clock_ms);
                    }
                }
                check_references(&store);
                for (path, chunks) in &files {
                    proptest::prop_assert_eq!(&whole_list(&store, path), chunks);
                }
            }
            for path in files.keys() {
                delete_file(&mut store, path, None).unwrap().unwrap();
            }
            drain_releases(&mut store, clock_ms + PREPARE_GRACE_MS + 1);
            check_references(&store);
            proptest::prop_assert!(store.range(Table::Chunks, &[], None, 1).unwrap().is_empty(), "nothing referenced");
            proptest::prop_assert!(store.range(Table::InlineChunks, &[], None, 1).unwrap().is_empty(), "no inline chunk left");
            proptest::prop_assert!(store.range(Table::Stripes, &[], None, 1).unwrap().is_empty(), "no stripe left");
            proptest::prop_assert!(store.range(Table::ShardIndex, &[], None, 1).unwrap().is_empty(), "no shard index left");
            proptest::prop_assert!(store.range(Table::Segments, &[], None, 1).unwrap().is_empty(), "no segment left");
            proptest::prop_assert!(store.range(Table::Uploads, &[], None, 1).unwrap().is_empty(), "no upload left");
        }
    }
}
