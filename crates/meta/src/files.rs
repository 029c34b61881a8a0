//! The file namespace and chunk map inside the metadata state machine, free of I/O.
//!
//! A file version is an ordered list of chunks; a chunk record says where its copies are and
//! how many committed file versions reference it. A commit installs the new version and moves
//! the references in one Raft entry, so a reader sees the old file or the new one, never a mix,
//! and a chunk's reference count is exactly the number of committed versions naming it.
//!
//! Garbage collection never happens here: a chunk whose count drops to zero loses its record,
//! and the storage nodes later delete copies that no record lists, after checking with the
//! leader and only past a grace period in which a new write could still reference them (see
//! `docs/design/garbage-collection.md`).

use mendfs_heal::detector::Liveness;
use mendfs_types::{ChunkHash, NodeId};
use serde::{Deserialize, Serialize};

use crate::schema::{
    commit_revision, current_revision, decode, encode, CommandError, CommandResult, Outcome, StateStore, StoreError,
    Table,
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub size: u64,
    pub mtime_ms: u64,
    /// BLAKE3 of the whole content.
    pub content_hash: Vec<u8>,
    pub version: u64,
    pub create_revision: u64,
    pub modify_revision: u64,
    pub chunks: Vec<FileChunk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    pub size: u64,
    /// Committed file versions that name this chunk (a chunk twice in one file counts twice).
    pub refs: u64,
    pub replicas: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedChunk {
    pub hash: ChunkHash,
    pub size: u64,
    /// The nodes that acknowledged (fsynced) this chunk during prepare.
    pub replicas: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitFile {
    pub path: String,
    pub size: u64,
    pub mtime_ms: u64,
    pub content_hash: Vec<u8>,
    pub chunks: Vec<CommittedChunk>,
    /// Replace only the version the writer started from (0: the path must not exist).
    pub expected_version: Option<u64>,
    /// When the coordinator started preparing, on its clock.
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

const META_REPAIR_JOB: &[u8] = b"repair_job";

pub fn repair_job(store: &impl StateStore) -> Result<Option<RepairJob>, StoreError> {
    store.get(Table::Meta, META_REPAIR_JOB)?.map(|bytes| decode(&bytes)).transpose()
}

pub(crate) fn record_repair_job(store: &mut impl StateStore, job: &RepairJob) -> Result<CommandResult, StoreError> {
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

/// How many chunk records list `node_id` (a full scan: for admin checks, not hot paths).
pub fn chunks_listed_on(store: &impl StateStore, node_id: u64) -> Result<u64, StoreError> {
    let mut count = 0;
    for_each_chunk(store, |_, record| {
        if record.replicas.contains(&node_id) {
            count += 1;
        }
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
    mut visit: impl FnMut(ChunkHash, ChunkRecord) -> bool,
) -> Result<u64, StoreError> {
    let mut skipped = 0;
    const PAGE: usize = 4_096;
    let mut start: Vec<u8> = Vec::new();
    loop {
        let rows = store.range(Table::Chunks, &start, None, PAGE)?;
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
        None => ChunkRecord { size: chunk.size, refs: 1, replicas: chunk.replicas.clone() },
    };
    store.put(Table::Chunks, chunk.hash.as_ref(), &encode(&record)?)
}

fn drop_reference(store: &mut impl StateStore, hash: &ChunkHash) -> Result<(), StoreError> {
    let Some(mut record) = get_chunk(store, hash)? else {
        return Err(StoreError(format!("chunk map lost a referenced chunk {}", hash)));
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

pub(crate) fn commit_file(
    store: &mut impl StateStore,
    commit: &CommitFile,
    clock_ms: u64,
) -> Result<CommandResult, StoreError> {
    let age_ms = clock_ms.saturating_sub(commit.prepared_at_ms);
    if age_ms > commit.grace_ms {
        return Ok(Err(CommandError::PrepareExpired { age_ms, grace_ms: commit.grace_ms }));
    }
    let existing = get_file(store, &commit.path)?;
    let actual = existing.as_ref().map_or(0, |file| file.version);
    if let Some(expected) = commit.expected_version {
        if expected != actual {
            return Ok(Err(CommandError::VersionMismatch { expected, actual }));
        }
    }
    // New references first, so a chunk shared by the old and the new version never drops to
    // zero in between.
    for chunk in &commit.chunks {
        add_reference(store, chunk)?;
    }
    if let Some(old) = &existing {
        for chunk in &old.chunks {
            drop_reference(store, &chunk.hash)?;
        }
    }
    let revision = current_revision(store)? + 1;
    let record = FileRecord {
        size: commit.size,
        mtime_ms: commit.mtime_ms,
        content_hash: commit.content_hash.clone(),
        version: actual + 1,
        create_revision: existing.as_ref().map_or(revision, |file| file.create_revision),
        modify_revision: revision,
        chunks: commit.chunks.iter().map(|c| FileChunk { hash: c.hash, size: c.size }).collect(),
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
    for chunk in &existing.chunks {
        drop_reference(store, &chunk.hash)?;
    }
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
}
