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
//! `docs/ARCHITECTURE.md`, "Garbage collection").

use serde::{Deserialize, Serialize};

use crate::state::{
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChunk {
    pub hash: Vec<u8>,
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
    pub hash: Vec<u8>,
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

pub fn get_file(store: &impl StateStore, path: &str) -> Result<Option<FileRecord>, StoreError> {
    store.get(Table::Files, path.as_bytes())?.map(|bytes| decode(&bytes)).transpose()
}

pub fn get_chunk(store: &impl StateStore, hash: &[u8]) -> Result<Option<ChunkRecord>, StoreError> {
    store.get(Table::Chunks, hash)?.map(|bytes| decode(&bytes)).transpose()
}

/// Files whose path starts with `prefix`, in order; the flag says whether `limit` cut it short.
pub fn list_files(
    store: &impl StateStore,
    prefix: &str,
    limit: usize,
) -> Result<(Vec<(String, FileRecord)>, bool), StoreError> {
    let end = crate::state::prefix_end(prefix.as_bytes());
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
    let draining = match store.get(Table::StorageNodes, &key)? {
        Some(bytes) => decode::<StorageNode>(&bytes)?.draining,
        None => node.draining,
    };
    store.put(Table::StorageNodes, &key, &encode(&StorageNode { draining, ..node.clone() })?)?;
    Ok(Ok(Outcome::Noop))
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
    store.put(Table::Chunks, &chunk.hash, &encode(&record)?)
}

fn drop_reference(store: &mut impl StateStore, hash: &[u8]) -> Result<(), StoreError> {
    let Some(mut record) = get_chunk(store, hash)? else {
        return Err(StoreError(format!("chunk map lost a referenced chunk {}", hex(hash))));
    };
    record.refs = record.refs.saturating_sub(1);
    if record.refs == 0 {
        // No committed version names it any more: its copies become orphans, collected by the
        // storage nodes after the grace period.
        store.remove(Table::Chunks, hash)
    } else {
        store.put(Table::Chunks, hash, &encode(&record)?)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
        chunks: commit.chunks.iter().map(|c| FileChunk { hash: c.hash.clone(), size: c.size }).collect(),
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
    hash: &[u8],
    node_id: u64,
) -> Result<CommandResult, StoreError> {
    if let Some(mut record) = get_chunk(store, hash)? {
        // Never drop the last listed copy: a record with no replica could never be repaired,
        // while a bad last copy can still be read by trying it.
        if record.replicas.len() > 1 && record.replicas.contains(&node_id) {
            record.replicas.retain(|node| *node != node_id);
            store.put(Table::Chunks, hash, &encode(&record)?)?;
        }
    }
    Ok(Ok(Outcome::Noop))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    fn chunk(byte: u8, replicas: &[u64]) -> CommittedChunk {
        CommittedChunk { hash: vec![byte; 32], size: 10, replicas: replicas.to_vec() }
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
        get_chunk(store, &[byte; 32]).unwrap().map_or(0, |record| record.refs)
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
        assert!(get_chunk(&store, &[1; 32]).unwrap().is_none(), "an unreferenced chunk loses its record");
        assert_eq!(get_chunk(&store, &[2; 32]).unwrap().unwrap().replicas, vec![1, 2, 3, 4], "new copies are listed");
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
        drop_replica(&mut store, &[1; 32], 1).unwrap().unwrap();
        drop_replica(&mut store, &[1; 32], 2).unwrap().unwrap();
        assert_eq!(get_chunk(&store, &[1; 32]).unwrap().unwrap().replicas, vec![2]);
    }

    #[test]
    fn registration_keeps_the_admin_state() {
        let mut store = MemoryStore::default();
        let node = StorageNode { id: 4, addr: "127.0.0.1:1".into(), zone: "a".into(), weight: 100, draining: true };
        register_storage_node(&mut store, &node).unwrap().unwrap();
        let moved = StorageNode { addr: "127.0.0.1:2".into(), draining: false, ..node };
        register_storage_node(&mut store, &moved).unwrap().unwrap();
        let nodes = list_storage_nodes(&store).unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].addr, "127.0.0.1:2");
        assert!(nodes[0].draining, "re-registering does not undo a drain");
    }
}
