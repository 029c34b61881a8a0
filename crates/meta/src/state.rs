//! The metadata state machine's logic, free of I/O.
//!
//! Every committed Raft entry other than Raft's own (blank, membership) carries a
//! [`ProposalBatch`]: concurrent writes share one entry (group commit). `storage` applies the
//! batch's proposals one by one, in order, so this module never sees a batch: [`apply`] turns
//! one [`Proposal`] into changes to a small set of ordered byte tables behind the
//! [`StateStore`] trait. The redb-backed store applies them inside one write transaction
//! together with the applied log id, so the state on disk always describes exactly the entries
//! up to that id (etcd 3.5's inconsistency came from saving the applied index apart from the
//! state). [`MemoryStore`] implements the same trait over `BTreeMap`s for
//! unit and property tests; every node applies the same entries to the same state and must get
//! the same result, so nothing here reads a clock or a random number.
//!
//! The data model follows etcd v3: one cluster-wide revision, bumped once per successful
//! mutating command; per key a version (1 on create, +1 per set), a create and a modify
//! revision, and an optional session (etcd's lease). Every revision's events are kept in a
//! bounded history so that watchers can resume from any recent revision without gaps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Rows of a table, in key order: (key, value).
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// The ordered byte tables the state machine is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Table {
    /// key → [`KeyRecord`]
    Keys,
    /// session id (u64 BE) → [`SessionRecord`]
    Sessions,
    /// session id (u64 BE) ++ key → (): the ephemeral keys a session owns.
    SessionKeys,
    /// revision (u64 BE) → `Vec<Event>`: the bounded change history watchers read.
    Events,
    /// client id (u64 BE) ++ sequence (u64 BE) → [`DedupRecord`]
    Dedup,
    /// proposal time ms (u64 BE) ++ client id ++ sequence → (): expiry index of `Dedup`.
    DedupByTime,
    /// named scalars, see the `META_*` constants.
    Meta,
    /// path → [`crate::files::FileRecord`]
    Files,
    /// chunk hash (32 bytes) → [`crate::files::ChunkRecord`]: where a chunk's copies are, and
    /// how many committed file versions reference it.
    Chunks,
    /// node id (u64 BE) → [`crate::files::StorageNode`]
    StorageNodes,
}

impl Table {
    /// In discriminant order (storage indexes by `table as usize`).
    pub const ALL: [Table; 10] = [
        Table::Keys,
        Table::Sessions,
        Table::SessionKeys,
        Table::Events,
        Table::Dedup,
        Table::DedupByTime,
        Table::Meta,
        Table::Files,
        Table::Chunks,
        Table::StorageNodes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Keys => "keys",
            Table::Sessions => "sessions",
            Table::SessionKeys => "session_keys",
            Table::Events => "events",
            Table::Dedup => "dedup",
            Table::DedupByTime => "dedup_by_time",
            Table::Meta => "meta",
            Table::Files => "files",
            Table::Chunks => "chunks",
            Table::StorageNodes => "storage_nodes",
        }
    }
}

pub const META_REVISION: &[u8] = b"revision";
pub const META_COMPACTED_REVISION: &[u8] = b"compacted_revision";
pub const META_NEXT_SESSION_ID: &[u8] = b"next_session_id";
pub const META_CLUSTER_ID: &[u8] = b"cluster_id";
pub const META_CLOCK_MS: &[u8] = b"clock_ms";

/// How many revisions of change history are kept for watchers. A watcher that falls further
/// behind than this gets a clear "compacted" error and must re-list. A constant, not a setting:
/// every replica must compact identically.
pub const EVENT_HISTORY_REVISIONS: u64 = 50_000;
/// How long a write's outcome is remembered for deduplication, measured on the proposers'
/// clocks. Clients retry an ambiguous write for far less than this.
pub const DEDUP_WINDOW_MS: u64 = 120_000;

#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

/// The ordered byte tables, as the state machine sees them.
pub trait StateStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn remove(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError>;
    /// Entries with `start <= key < end` (no end: to the last key), in key order, at most `limit`.
    fn range(&self, table: Table, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Rows, StoreError>;
}

/// A key's current state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub value: Vec<u8>,
    pub version: u64,
    pub create_revision: u64,
    pub modify_revision: u64,
    /// 0 when the key belongs to no session.
    pub session_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub key: Vec<u8>,
    /// After a put: the new record. After a delete: the last record, with an empty value.
    pub record: KeyRecord,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId {
    pub client_id: u64,
    pub sequence: u64,
}

/// What a client asked for, as replicated through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Records the cluster's identity; only the first one ever applied takes effect.
    InitCluster {
        cluster_id: String,
    },
    Create {
        key: Vec<u8>,
        value: Vec<u8>,
        session_id: Option<u64>,
    },
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
        expected_version: Option<u64>,
        session_id: Option<u64>,
    },
    Delete {
        key: Vec<u8>,
        expected_version: Option<u64>,
    },
    SessionOpen {
        ttl_ms: u64,
    },
    /// The client closed its session.
    SessionClose {
        session_id: u64,
    },
    /// The leader saw no keep-alive for longer than the session's TTL.
    SessionExpire {
        session_id: u64,
    },
    /// A storage node announces itself (or its new address); its admin state is kept.
    RegisterStorageNode {
        node: crate::files::StorageNode,
    },
    /// Phase two of a file write: installs the new version and its chunk references at once.
    CommitFile(crate::files::CommitFile),
    DeleteFile {
        path: String,
        expected_version: Option<u64>,
    },
    /// A replica was found missing or corrupt: stop listing it (repair restores the count).
    DropReplica {
        hash: Vec<u8>,
        node_id: u64,
    },
    /// The leader's detector decided a storage node's liveness changed (`Up`, `Down` or
    /// `Degraded`); committed so every coordinator stops placing chunks on it, and so a new
    /// leader knows what was decided.
    SetNodeLiveness {
        node_id: u64,
        liveness: mendfs_heal::detector::Liveness,
    },
    /// The operator drains (or undrains) a storage node: repair moves its copies elsewhere.
    SetDraining {
        node_id: u64,
        draining: bool,
    },
    /// A removed node's storage record goes away with it.
    UnregisterStorageNode {
        node_id: u64,
    },
    /// Repair copies that are done: the checkpoint of the repair, in batches.
    AddReplicas {
        job_id: Option<u64>,
        added: Vec<crate::files::ReplicaAdded>,
    },
    /// Replicas repair no longer needs (on a down or drained node, or surplus), each applied
    /// only if the copies it was decided against are still listed.
    DropReplicas {
        drops: Vec<crate::files::ReplicaDrop>,
    },
    /// Starts, updates or finishes the repair job record.
    RecordRepairJob(crate::files::RepairJob),
}

/// One Raft entry's payload: a command, who sent it, and when the proposing node received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub request_id: Option<RequestId>,
    /// Wall-clock time on the proposing node; only used to age out deduplication records, so
    /// clock skew between leaders only shortens or stretches that window.
    pub proposed_at_ms: u64,
    pub command: Command,
}

impl Proposal {
    /// Roughly the bytes this proposal adds to a Raft entry, for batch size limits.
    pub fn approximate_bytes(&self) -> usize {
        const OVERHEAD_BYTES: usize = 64;
        OVERHEAD_BYTES
            + match &self.command {
                Command::InitCluster { cluster_id } => cluster_id.len(),
                Command::Create { key, value, .. } | Command::Set { key, value, .. } => key.len() + value.len(),
                Command::Delete { key, .. } => key.len(),
                Command::SessionOpen { .. } | Command::SessionClose { .. } | Command::SessionExpire { .. } => 0,
                Command::RegisterStorageNode { node } => node.addr.len() + node.zone.len(),
                Command::CommitFile(commit) => commit.path.len() + commit.chunks.len() * 64,
                Command::DeleteFile { path, .. } => path.len(),
                Command::DropReplica { hash, .. } => hash.len(),
                Command::SetNodeLiveness { .. }
                | Command::SetDraining { .. }
                | Command::UnregisterStorageNode { .. } => 0,
                Command::AddReplicas { added, .. } => added.len() * 48,
                Command::DropReplicas { drops } => drops.iter().map(|d| 48 + d.keep.len() * 8).sum(),
                Command::RecordRepairJob(job) => job.reason.len() + 64,
            }
    }
}

/// Proposals that travel through Raft as one entry: concurrent writes share one log append,
/// one replication round and one fsync per node (group commit). They are applied in order,
/// each as if it were its own entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalBatch {
    pub proposals: Vec<Proposal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub record: KeyRecord,
}

/// The successful outcome of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Written {
        revision: u64,
        kv: Option<KeyValue>,
        deleted: bool,
    },
    SessionOpened {
        session_id: u64,
        ttl_ms: u64,
    },
    SessionClosed {
        revision: u64,
        found: bool,
    },
    ClusterId {
        cluster_id: String,
    },
    FileCommitted {
        version: u64,
        revision: u64,
    },
    /// A command that succeeded with nothing to report and took no revision:
    /// `RegisterStorageNode`, and `DropReplica` (also when it changed nothing). Raft's own
    /// entries (blank, membership) carry no proposal; `storage` answers them with an empty
    /// result vector, not with this.
    Noop,
}

/// Why a well-formed command was refused. These are answers, not failures: the command was
/// applied (as a no-op) and every replica agrees on the refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("key already exists (version {version})")]
    KeyExists { version: u64 },
    #[error("version mismatch: expected version {expected}, actual version {actual}")]
    VersionMismatch { expected: u64, actual: u64 },
    #[error("session {session_id} not found (expired or closed)")]
    SessionNotFound { session_id: u64 },
    #[error("file {path} not found")]
    FileNotFound { path: String },
    #[error(
        "the write's chunks were prepared {age_ms} ms ago, beyond the {grace_ms} ms grace period; retry the write"
    )]
    PrepareExpired { age_ms: u64, grace_ms: u64 },
    #[error("storage node {node_id} is not registered")]
    NodeNotFound { node_id: u64 },
}

pub type CommandResult = Result<Outcome, CommandError>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DedupRecord {
    result: CommandResult,
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|e| StoreError(format!("encode: {e}")))
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError(format!("decode: {e}")))
}

pub(crate) fn get_u64(store: &impl StateStore, table: Table, key: &[u8]) -> Result<u64, StoreError> {
    match store.get(table, key)? {
        None => Ok(0),
        Some(bytes) => {
            let array: [u8; 8] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| StoreError(format!("{}: not a u64", String::from_utf8_lossy(key))))?;
            Ok(u64::from_be_bytes(array))
        }
    }
}

fn put_u64(store: &mut impl StateStore, table: Table, key: &[u8], value: u64) -> Result<(), StoreError> {
    store.put(table, key, &value.to_be_bytes())
}

pub fn current_revision(store: &impl StateStore) -> Result<u64, StoreError> {
    get_u64(store, Table::Meta, META_REVISION)
}

/// Revisions at or below this have been dropped from the event history.
pub fn compacted_revision(store: &impl StateStore) -> Result<u64, StoreError> {
    get_u64(store, Table::Meta, META_COMPACTED_REVISION)
}

pub fn cluster_id(store: &impl StateStore) -> Result<Option<String>, StoreError> {
    store
        .get(Table::Meta, META_CLUSTER_ID)?
        .map(|bytes| String::from_utf8(bytes).map_err(|e| StoreError(format!("cluster id: {e}"))))
        .transpose()
}

pub fn get_key(store: &impl StateStore, key: &[u8]) -> Result<Option<KeyRecord>, StoreError> {
    store.get(Table::Keys, key)?.map(|bytes| decode(&bytes)).transpose()
}

pub fn get_session(store: &impl StateStore, session_id: u64) -> Result<Option<SessionRecord>, StoreError> {
    store.get(Table::Sessions, &session_id.to_be_bytes())?.map(|bytes| decode(&bytes)).transpose()
}

/// All live sessions, for a new leader to start tracking their keep-alives.
pub fn list_sessions(store: &impl StateStore) -> Result<Vec<(u64, SessionRecord)>, StoreError> {
    let mut sessions = Vec::new();
    for (key, value) in store.range(Table::Sessions, &[], None, usize::MAX)? {
        let id =
            u64::from_be_bytes(key.as_slice().try_into().map_err(|_| StoreError("session id is not a u64".into()))?);
        sessions.push((id, decode(&value)?));
    }
    Ok(sessions)
}

/// The smallest key greater than every key starting with `prefix`, or None if there is none
/// (the prefix is empty or all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Keys starting with `prefix`, in order; the flag says whether `limit` cut the list short.
pub fn list_keys(store: &impl StateStore, prefix: &[u8], limit: usize) -> Result<(Vec<KeyValue>, bool), StoreError> {
    let end = prefix_end(prefix);
    let rows = store.range(Table::Keys, prefix, end.as_deref(), limit.saturating_add(1))?;
    let truncated = rows.len() > limit;
    let kvs = rows
        .into_iter()
        .take(limit)
        .map(|(key, value)| Ok(KeyValue { key, record: decode(&value)? }))
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok((kvs, truncated))
}

/// Events of the revisions from `from` on, at most `max_revisions` of them, filtered by
/// key or prefix. A revision with no matching event comes back with an empty list, so that a
/// watcher still advances past it.
pub fn events_between(
    store: &impl StateStore,
    from: u64,
    max_revisions: usize,
    key: &[u8],
    is_prefix: bool,
) -> Result<Vec<(u64, Vec<Event>)>, StoreError> {
    let rows = store.range(Table::Events, &from.to_be_bytes(), None, max_revisions)?;
    let mut out = Vec::with_capacity(rows.len());
    for (revision_bytes, value) in rows {
        let revision = u64::from_be_bytes(
            revision_bytes.as_slice().try_into().map_err(|_| StoreError("event revision is not a u64".into()))?,
        );
        let events: Vec<Event> = decode(&value)?;
        let matching: Vec<Event> = events
            .into_iter()
            .filter(|event| if is_prefix { event.key.starts_with(key) } else { event.key == key })
            .collect();
        out.push((revision, matching));
    }
    Ok(out)
}

/// Applies one committed proposal. Deterministic: the same proposals applied to the same state
/// give the same state and results on every replica.
pub fn apply(store: &mut impl StateStore, proposal: &Proposal) -> Result<CommandResult, StoreError> {
    let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?.max(proposal.proposed_at_ms);
    put_u64(store, Table::Meta, META_CLOCK_MS, clock_ms)?;
    expire_dedup(store, clock_ms)?;

    if let Some(request_id) = proposal.request_id {
        if let Some(bytes) = store.get(Table::Dedup, &dedup_key(request_id))? {
            let record: DedupRecord = decode(&bytes)?;
            return Ok(record.result);
        }
    }

    let result = apply_command(store, &proposal.command)?;

    if let Some(request_id) = proposal.request_id {
        store.put(Table::Dedup, &dedup_key(request_id), &encode(&DedupRecord { result: result.clone() })?)?;
        let mut time_key = clock_ms.to_be_bytes().to_vec();
        time_key.extend_from_slice(&dedup_key(request_id));
        store.put(Table::DedupByTime, &time_key, &[])?;
    }
    Ok(result)
}

fn dedup_key(request_id: RequestId) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&request_id.client_id.to_be_bytes());
    key[8..].copy_from_slice(&request_id.sequence.to_be_bytes());
    key
}

/// Forgets deduplication records older than the window. Bounded work per call so that one
/// entry's apply never stalls on a backlog; the rest goes with the next entries.
fn expire_dedup(store: &mut impl StateStore, clock_ms: u64) -> Result<(), StoreError> {
    const MAX_EXPIRED_PER_APPLY: usize = 64;
    let cutoff = clock_ms.saturating_sub(DEDUP_WINDOW_MS);
    let expired = store.range(Table::DedupByTime, &[], Some(&cutoff.to_be_bytes()), MAX_EXPIRED_PER_APPLY)?;
    for (time_key, _) in expired {
        store.remove(Table::DedupByTime, &time_key)?;
        if time_key.len() == 24 {
            store.remove(Table::Dedup, &time_key[8..])?;
        }
    }
    Ok(())
}

/// Starts a new revision: bumps the counter, records the events, drops history beyond the
/// retention bound.
pub(crate) fn commit_revision(store: &mut impl StateStore, events: &[Event]) -> Result<u64, StoreError> {
    let revision = current_revision(store)? + 1;
    put_u64(store, Table::Meta, META_REVISION, revision)?;
    store.put(Table::Events, &revision.to_be_bytes(), &encode(&events)?)?;
    if revision > EVENT_HISTORY_REVISIONS {
        let dropped = revision - EVENT_HISTORY_REVISIONS;
        store.remove(Table::Events, &dropped.to_be_bytes())?;
        put_u64(store, Table::Meta, META_COMPACTED_REVISION, dropped)?;
    }
    Ok(revision)
}

fn session_key_entry(session_id: u64, key: &[u8]) -> Vec<u8> {
    let mut entry = session_id.to_be_bytes().to_vec();
    entry.extend_from_slice(key);
    entry
}

fn apply_command(store: &mut impl StateStore, command: &Command) -> Result<CommandResult, StoreError> {
    match command {
        Command::RegisterStorageNode { node } => crate::files::register_storage_node(store, node),
        Command::CommitFile(commit) => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            crate::files::commit_file(store, commit, clock_ms)
        }
        Command::DeleteFile { path, expected_version } => crate::files::delete_file(store, path, *expected_version),
        Command::DropReplica { hash, node_id } => crate::files::drop_replica(store, hash, *node_id),
        Command::SetNodeLiveness { node_id, liveness } => crate::files::set_liveness(store, *node_id, *liveness),
        Command::SetDraining { node_id, draining } => crate::files::set_draining(store, *node_id, *draining),
        Command::UnregisterStorageNode { node_id } => crate::files::unregister_storage_node(store, *node_id),
        Command::AddReplicas { job_id, added } => crate::files::add_replicas(store, *job_id, added),
        Command::DropReplicas { drops } => crate::files::drop_replicas(store, drops),
        Command::RecordRepairJob(job) => crate::files::record_repair_job(store, job),
        Command::InitCluster { cluster_id: proposed } => {
            let cluster_id = match cluster_id(store)? {
                Some(existing) => existing,
                None => {
                    store.put(Table::Meta, META_CLUSTER_ID, proposed.as_bytes())?;
                    proposed.clone()
                }
            };
            Ok(Ok(Outcome::ClusterId { cluster_id }))
        }
        Command::Create { key, value, session_id } => {
            if let Some(existing) = get_key(store, key)? {
                return Ok(Err(CommandError::KeyExists { version: existing.version }));
            }
            put_key(store, key, value, None, *session_id)
        }
        Command::Set { key, value, expected_version, session_id } => {
            let existing = get_key(store, key)?;
            let actual = existing.as_ref().map_or(0, |record| record.version);
            if let Some(expected) = *expected_version {
                if expected != actual {
                    return Ok(Err(CommandError::VersionMismatch { expected, actual }));
                }
            }
            put_key(store, key, value, existing, *session_id)
        }
        Command::Delete { key, expected_version } => {
            let existing = get_key(store, key)?;
            let actual = existing.as_ref().map_or(0, |record| record.version);
            if let Some(expected) = *expected_version {
                if expected != actual {
                    return Ok(Err(CommandError::VersionMismatch { expected, actual }));
                }
            }
            match existing {
                None => Ok(Ok(Outcome::Written { revision: current_revision(store)?, kv: None, deleted: false })),
                Some(record) => {
                    let event = delete_key(store, key, record)?;
                    let revision = commit_revision(store, &[event])?;
                    Ok(Ok(Outcome::Written { revision, kv: None, deleted: true }))
                }
            }
        }
        Command::SessionOpen { ttl_ms } => {
            let session_id = get_u64(store, Table::Meta, META_NEXT_SESSION_ID)?.max(1);
            put_u64(store, Table::Meta, META_NEXT_SESSION_ID, session_id + 1)?;
            store.put(Table::Sessions, &session_id.to_be_bytes(), &encode(&SessionRecord { ttl_ms: *ttl_ms })?)?;
            Ok(Ok(Outcome::SessionOpened { session_id, ttl_ms: *ttl_ms }))
        }
        Command::SessionClose { session_id } | Command::SessionExpire { session_id } => {
            if get_session(store, *session_id)?.is_none() {
                return Ok(Ok(Outcome::SessionClosed { revision: current_revision(store)?, found: false }));
            }
            store.remove(Table::Sessions, &session_id.to_be_bytes())?;
            let prefix = session_id.to_be_bytes();
            let end = prefix_end(&prefix);
            let owned = store.range(Table::SessionKeys, &prefix, end.as_deref(), usize::MAX)?;
            let mut events = Vec::with_capacity(owned.len());
            for (entry, _) in owned {
                store.remove(Table::SessionKeys, &entry)?;
                let key = &entry[8..];
                if let Some(record) = get_key(store, key)? {
                    // A key re-attached to another session (or none) since is no longer ours.
                    if record.session_id == *session_id {
                        events.push(delete_key(store, key, record)?);
                    }
                }
            }
            let revision = if events.is_empty() { current_revision(store)? } else { commit_revision(store, &events)? };
            Ok(Ok(Outcome::SessionClosed { revision, found: true }))
        }
    }
}

fn put_key(
    store: &mut impl StateStore,
    key: &[u8],
    value: &[u8],
    existing: Option<KeyRecord>,
    session_id: Option<u64>,
) -> Result<CommandResult, StoreError> {
    let session_id = session_id.unwrap_or(0);
    if session_id != 0 && get_session(store, session_id)?.is_none() {
        return Ok(Err(CommandError::SessionNotFound { session_id }));
    }
    let revision = current_revision(store)? + 1;
    let record = match existing {
        Some(previous) => {
            if previous.session_id != 0 && previous.session_id != session_id {
                store.remove(Table::SessionKeys, &session_key_entry(previous.session_id, key))?;
            }
            KeyRecord {
                value: value.to_vec(),
                version: previous.version + 1,
                create_revision: previous.create_revision,
                modify_revision: revision,
                session_id,
            }
        }
        None => KeyRecord {
            value: value.to_vec(),
            version: 1,
            create_revision: revision,
            modify_revision: revision,
            session_id,
        },
    };
    if session_id != 0 {
        store.put(Table::SessionKeys, &session_key_entry(session_id, key), &[])?;
    }
    store.put(Table::Keys, key, &encode(&record)?)?;
    let kv = KeyValue { key: key.to_vec(), record: record.clone() };
    let committed = commit_revision(store, &[Event { kind: EventKind::Put, key: key.to_vec(), record }])?;
    debug_assert_eq!(committed, revision);
    Ok(Ok(Outcome::Written { revision, kv: Some(kv), deleted: false }))
}

fn delete_key(store: &mut impl StateStore, key: &[u8], record: KeyRecord) -> Result<Event, StoreError> {
    store.remove(Table::Keys, key)?;
    if record.session_id != 0 {
        store.remove(Table::SessionKeys, &session_key_entry(record.session_id, key))?;
    }
    Ok(Event { kind: EventKind::Delete, key: key.to_vec(), record: KeyRecord { value: Vec::new(), ..record } })
}

/// The state machine over in-memory maps, for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemoryStore {
    tables: BTreeMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl StateStore for MemoryStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tables.get(&table).and_then(|rows| rows.get(key)).cloned())
    }

    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tables.entry(table).or_default().insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn remove(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        if let Some(rows) = self.tables.get_mut(&table) {
            rows.remove(key);
        }
        Ok(())
    }

    fn range(&self, table: Table, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Rows, StoreError> {
        let Some(rows) = self.tables.get(&table) else {
            return Ok(Vec::new());
        };
        Ok(rows
            .range(start.to_vec()..)
            .take_while(|(key, _)| end.is_none_or(|end| key.as_slice() < end))
            .take(limit)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests;
