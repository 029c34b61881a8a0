//! The shape of the metadata state, below both halves of the state machine (`kv` and `files`):
//! the ordered byte tables and the [`StateStore`] trait over them, the encoding of their rows,
//! the cluster-wide revision and its event history, and what a command answers (its
//! [`Outcome`] or the [`CommandError`] refusing it).
//!
//! The redb-backed store (`raft_store`) and [`MemoryStore`] (for unit and property tests)
//! implement the same trait; nothing here reads a clock or a random number.

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
    /// token name → [`crate::auth::TokenRecord`]: client tokens, by the hash only.
    Tokens,
    /// chunk set id (u64 BE) ++ index of the segment's last chunk (u64 BE) →
    /// `Vec<`[`crate::files::FileChunk`]`>`: a file's (or an upload's) chunk list, in bounded
    /// segments. Keyed by the last index so that one range read finds the segment holding any
    /// index.
    Segments,
    /// upload id (u64 BE) → [`crate::files::Upload`]: a big file being written, segment by
    /// segment, not yet committed.
    Uploads,
    /// expiry time ms (u64 BE) ++ upload id (u64 BE) → (): expiry index of `Uploads`.
    UploadsByExpiry,
    /// chunk set id (u64 BE) → (): chunk sets no file or upload owns any more, whose chunk
    /// references are still to be dropped (a bounded amount per `ReleaseChunks`).
    ReleasedChunkSets,
    /// bucket name → [`crate::s3::BucketRecord`]
    S3Buckets,
    /// bucket ++ 0 ++ object key → [`crate::s3::ObjectRecord`]
    S3Objects,
    /// access key id → [`crate::s3::AccessKeyRecord`]
    S3Keys,
    /// access key id ++ 0 ++ bucket → [`crate::s3::Grant`]
    S3Grants,
    /// piece list id (u64 BE) → the objects naming it (a reference count).
    S3PieceLists,
    /// piece list id (u64 BE) ++ index of the piece's last chunk in the object (u64 BE) → a
    /// piece: a chunk set and where it starts.
    S3Pieces,
    /// multipart upload id (u64 BE) → [`crate::s3::MultipartUpload`]
    S3Uploads,
    /// bucket ++ 0 ++ key ++ 0 ++ upload id (u64 BE) → (): uploads by object, for listings.
    S3UploadsByObject,
    /// initiation time ms (u64 BE) ++ upload id (u64 BE) → (): for expiring abandoned uploads.
    S3UploadsByTime,
    /// upload id (u64 BE) ++ part number (u32 BE) → [`crate::s3::PartRecord`]
    S3Parts,
    /// chunk hash (32 bytes) → [`crate::files::InlineChunkRecord`]: a small chunk kept in the
    /// metadata itself (its bytes and its references) instead of on storage nodes. A hash is
    /// in `Chunks` or here, never both.
    InlineChunks,
    /// login code hash (32 bytes) → [`crate::login::LoginCodeRecord`]: one-time dashboard
    /// login links not yet used.
    LoginCodes,
    /// token name → expiry ms (u64 BE): the tokens that expire (the sessions logins open).
    TokenExpiries,
    /// chunk hash (32 bytes) → [`crate::stripes::StripeRecord`]: an erasure-coded chunk's
    /// shards and where they are. A hash is in `Chunks`, `InlineChunks` or here, never two.
    Stripes,
    /// shard hash ++ node (u64 BE) ++ chunk hash (72 bytes) → (): which stripes list a shard on
    /// a node.
    ShardIndex,
    /// job name → [`crate::jobs::JobRecord`]
    Jobs,
    /// job name ++ 0 ++ task id (u64 BE) → [`crate::jobs::TaskRecord`]: claimed tasks only.
    JobTasks,
    /// job name ++ 0 ++ task id → the task's last checkpoint (bytes, bounded).
    JobCheckpoints,
    /// job name ++ 0 ++ task id → (): started tasks that can take another attempt.
    JobPending,
    /// job name ++ 0 ++ task id → (): tasks failed for good, for `job status`.
    JobFailed,
    /// job name ++ 0 ++ session id (u64 BE) → worker label: a job's live workers, the
    /// placement ring's members.
    JobWorkers,
    /// session id (u64 BE) ++ job name ++ 0 ++ task id → lease (u64 BE): what a session holds
    /// (task `u64::MAX`: its registration), released when it ends.
    JobHolds,
    /// tag ++ name → [`crate::policy::PolicyRecord`]: redundancy policies, of path prefixes
    /// (tag `p`) and of buckets (tag `b`).
    Policies,
}

impl Table {
    /// In discriminant order (storage indexes by `table as usize`).
    pub const ALL: [Table; 38] = [
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
        Table::Tokens,
        Table::Segments,
        Table::Uploads,
        Table::UploadsByExpiry,
        Table::ReleasedChunkSets,
        Table::S3Buckets,
        Table::S3Objects,
        Table::S3Keys,
        Table::S3Grants,
        Table::S3PieceLists,
        Table::S3Pieces,
        Table::S3Uploads,
        Table::S3UploadsByObject,
        Table::S3UploadsByTime,
        Table::S3Parts,
        Table::InlineChunks,
        Table::LoginCodes,
        Table::TokenExpiries,
        Table::Stripes,
        Table::ShardIndex,
        Table::Jobs,
        Table::JobTasks,
        Table::JobCheckpoints,
        Table::JobPending,
        Table::JobFailed,
        Table::JobWorkers,
        Table::JobHolds,
        Table::Policies,
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
            Table::Tokens => "tokens",
            Table::Segments => "segments",
            Table::Uploads => "uploads",
            Table::UploadsByExpiry => "uploads_by_expiry",
            Table::ReleasedChunkSets => "released_chunk_sets",
            Table::S3Buckets => "s3_buckets",
            Table::S3Objects => "s3_objects",
            Table::S3Keys => "s3_keys",
            Table::S3Grants => "s3_grants",
            Table::S3PieceLists => "s3_piece_lists",
            Table::S3Pieces => "s3_pieces",
            Table::S3Uploads => "s3_uploads",
            Table::S3UploadsByObject => "s3_uploads_by_object",
            Table::S3UploadsByTime => "s3_uploads_by_time",
            Table::S3Parts => "s3_parts",
            Table::InlineChunks => "inline_chunks",
            Table::LoginCodes => "login_codes",
            Table::TokenExpiries => "token_expiries",
            Table::Stripes => "stripes",
            Table::ShardIndex => "shard_index",
            Table::Jobs => "jobs",
            Table::JobTasks => "job_tasks",
            Table::JobCheckpoints => "job_checkpoints",
            Table::JobPending => "job_pending",
            Table::JobFailed => "job_failed",
            Table::JobWorkers => "job_workers",
            Table::JobHolds => "job_holds",
            Table::Policies => "policies",
        }
    }
}

pub const META_REVISION: &[u8] = b"revision";
pub const META_COMPACTED_REVISION: &[u8] = b"compacted_revision";
pub const META_NEXT_SESSION_ID: &[u8] = b"next_session_id";
pub const META_CLUSTER_ID: &[u8] = b"cluster_id";
pub const META_CLOCK_MS: &[u8] = b"clock_ms";
/// Every deduplication record stamped before this state-clock time has been forgotten.
pub const META_DEDUP_EXPIRED_BEFORE_MS: &[u8] = b"dedup_expired_before_ms";
/// The cluster's [`Limits`], as the leader last proposed them.
pub const META_LIMITS: &[u8] = b"limits";
/// Bytes of the live coordination keys (key + encoded record), for the quota.
pub const META_KEY_BYTES: &[u8] = b"key_bytes";
/// Bytes of the event history (revision key + encoded events), for the quota.
pub const META_HISTORY_BYTES: &[u8] = b"history_bytes";
/// How many sessions are open, for `Limits::max_sessions`.
pub const META_SESSION_COUNT: &[u8] = b"session_count";
/// 1 while the keyspace quota alarm is raised (see [`quota_alarm`]).
pub const META_QUOTA_ALARM: &[u8] = b"quota_alarm";

/// How many revisions of change history are kept for watchers. A watcher that falls further
/// behind than this gets a clear "compacted" error and must re-list. A constant, not a setting:
/// every replica must compact identically.
pub const EVENT_HISTORY_REVISIONS: u64 = 50_000;

/// Cluster-wide bounds that every replica must apply identically, so they live in the replicated
/// state: each new leader proposes the values of its own configuration (`Command::SetLimits`)
/// when they differ from the committed ones. Until the first is committed, the defaults hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Live keys plus event history, in bytes; writes beyond it are refused (etcd's backend
    /// quota, and the same default).
    pub kv_quota_bytes: u64,
    /// The event history is trimmed, oldest revision first, beyond this many bytes (as well as
    /// beyond [`EVENT_HISTORY_REVISIONS`]).
    pub kv_history_bytes: u64,
    /// Opening a session beyond this many is refused.
    pub max_sessions: u64,
}

impl Limits {
    pub const DEFAULT_KV_QUOTA_BYTES: u64 = 2 << 30;
    pub const DEFAULT_KV_HISTORY_BYTES: u64 = 512 << 20;
    /// The leader keeps a clock per session (about 100 bytes each), so this bounds that memory
    /// to ~100 MB as well as the sessions table.
    pub const DEFAULT_MAX_SESSIONS: u64 = 1_000_000;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            kv_quota_bytes: Self::DEFAULT_KV_QUOTA_BYTES,
            kv_history_bytes: Self::DEFAULT_KV_HISTORY_BYTES,
            max_sessions: Self::DEFAULT_MAX_SESSIONS,
        }
    }
}

pub fn limits(store: &impl StateStore) -> Result<Limits, StoreError> {
    store.get(Table::Meta, META_LIMITS)?.map(|bytes| decode(&bytes)).transpose().map(Option::unwrap_or_default)
}

/// What the coordination keyspace uses against its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvUsage {
    pub key_bytes: u64,
    pub history_bytes: u64,
    pub quota_bytes: u64,
    pub alarm: bool,
    pub sessions: u64,
    pub max_sessions: u64,
}

impl KvUsage {
    pub fn used_bytes(&self) -> u64 {
        self.key_bytes.saturating_add(self.history_bytes)
    }
}

pub fn kv_usage(store: &impl StateStore) -> Result<KvUsage, StoreError> {
    let limits = limits(store)?;
    Ok(KvUsage {
        key_bytes: get_u64(store, Table::Meta, META_KEY_BYTES)?,
        history_bytes: get_u64(store, Table::Meta, META_HISTORY_BYTES)?,
        quota_bytes: limits.kv_quota_bytes,
        alarm: get_u64(store, Table::Meta, META_QUOTA_ALARM)? != 0,
        sessions: get_u64(store, Table::Meta, META_SESSION_COUNT)?,
        max_sessions: limits.max_sessions,
    })
}

/// Adds `delta` (which may be negative) to a byte counter; a counter never goes below zero.
pub fn add_to_counter(store: &mut impl StateStore, counter: &[u8], delta: i64) -> Result<(), StoreError> {
    let current = get_u64(store, Table::Meta, counter)?;
    let updated =
        if delta >= 0 { current.saturating_add(delta as u64) } else { current.saturating_sub(delta.unsigned_abs()) };
    put_u64(store, Table::Meta, counter, updated)
}

/// The quota alarm: raised when a write is refused for the quota, cleared once deletes and
/// compaction bring the usage to 90 % of the quota or less. While it is raised every write
/// that adds bytes is refused, as in etcd, so that a keyspace at its limit does not flap
/// between accepting and refusing writes of different sizes.
pub fn quota_alarm(store: &impl StateStore) -> Result<bool, StoreError> {
    Ok(get_u64(store, Table::Meta, META_QUOTA_ALARM)? != 0)
}

/// Clears the alarm if the usage has fallen far enough; called after anything that frees bytes.
pub fn settle_quota_alarm(store: &mut impl StateStore) -> Result<(), StoreError> {
    if !quota_alarm(store)? {
        return Ok(());
    }
    let usage = kv_usage(store)?;
    if usage.used_bytes() <= usage.quota_bytes / 10 * 9 {
        put_u64(store, Table::Meta, META_QUOTA_ALARM, 0)?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

/// The ordered byte tables, as the state machine sees them.
pub trait StateStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn remove(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError>;
    /// Removes `key` and returns the value it had: one lookup where `get` then `remove` are two.
    fn take(&mut self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Entries with `start <= key < end` (no end: to the last key), in key order, at most `limit`.
    fn range(&self, table: Table, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Rows, StoreError>;
}

/// A key's current state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Byte strings are encoded as one slice (`serde_bytes`), in the same bytes postcard writes
    /// for a sequence of `u8`, but without a call per byte: a 1 MiB value took 190 ms to decode
    /// in a debug build, longer than a Raft heartbeat.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub version: u64,
    pub create_revision: u64,
    pub modify_revision: u64,
    /// 0 when the key belongs to no session.
    pub session_id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// After a put: the new record. After a delete: the last record, with an empty value.
    pub record: KeyRecord,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    #[serde(with = "serde_bytes")]
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
    /// The event history was dropped up to and including `revision`.
    Compacted {
        revision: u64,
    },
    /// A token was revoked, or there was none of that name.
    TokenRevoked {
        found: bool,
    },
    /// A command that succeeded with nothing to report and took no revision:
    /// `RegisterStorageNode`, and `DropReplica` (also when it changed nothing). Raft's own
    /// entries (blank, membership) carry no proposal; `storage` answers them with an empty
    /// result vector, not with this.
    Noop,
    /// An S3 object (or part) was written: its ETag and time.
    ObjectWritten {
        etag: String,
        last_modified_ms: u64,
    },
    /// Which of the keys a `S3DeleteObjects` named existed.
    ObjectsDeleted {
        found: Vec<bool>,
    },
    MultipartCreated {
        upload_id: u64,
    },
    /// A login code opened a session with this role, until this time (state clock).
    LoginSession {
        role: crate::auth::Role,
        expires_unix_ms: u64,
    },
    /// What a job command (`Command::Job`) answered.
    Job(crate::jobs::JobOutcome),
    /// A policy was set or unset: the one the target had before, if any.
    PolicyChanged {
        previous: Option<crate::policy::Redundancy>,
    },
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
    #[error("a token named {name:?} already exists; revoke it first")]
    TokenExists { name: String },
    #[error(
        "kv quota exceeded: the keyspace uses {used_bytes} bytes (keys and history) of its {quota_bytes}-byte \
         quota and this write adds {needed_bytes}; reads and deletes still work: delete keys and run \
         `mendfs kv compact`, writes resume once usage is at or below 90% of the quota"
    )]
    QuotaExceeded { used_bytes: u64, quota_bytes: u64, needed_bytes: u64 },
    #[error("too many sessions: {open} are open and the limit is {limit}; close unused sessions")]
    TooManySessions { open: u64, limit: u64 },
    #[error("cannot compact to revision {requested}: the current revision is {current}")]
    CompactBeyondCurrent { requested: u64, current: u64 },
    #[error(
        "upload {upload_id} is gone: it expired (no segment for longer than its grace period), was aborted, or \
         never started; write the file again"
    )]
    UploadNotFound { upload_id: u64 },
    #[error("upload {upload_id} does not match: {why}")]
    UploadMismatch { upload_id: u64, why: String },
    #[error("chunk {hash} is listed as a repeat, but no earlier entry of the write and no chunk record names it")]
    UnknownChunk { hash: mendfs_types::ChunkHash },
    #[error("bucket {bucket} does not exist")]
    NoSuchBucket { bucket: String },
    #[error("bucket {bucket} already exists")]
    BucketExists { bucket: String, yours: bool },
    #[error("bucket {bucket} is not empty: delete its objects and abort its multipart uploads first")]
    BucketNotEmpty { bucket: String },
    #[error("object {key:?} does not exist in bucket {bucket}")]
    NoSuchKey { bucket: String, key: String },
    #[error("precondition failed: {why}")]
    PreconditionFailed { why: String },
    #[error("multipart upload {upload_id} does not exist (completed, aborted, expired or never created)")]
    NoSuchUpload { upload_id: u64 },
    #[error("invalid part: {why}")]
    InvalidPart { why: String },
    #[error("the parts of a completed upload must be listed in ascending part number order")]
    InvalidPartOrder,
    #[error("part too small: {why}")]
    EntityTooSmall { why: String },
    #[error("access key {key_id} already exists")]
    AccessKeyExists { key_id: String },
    #[error("access key {key_id} does not exist")]
    NoSuchAccessKey { key_id: String },
    #[error("invalid request: {why}")]
    InvalidRequest { why: String },
    #[error("this login link was already used, has expired or was never issued; ask for a new one with `mendfs auth login-link`")]
    LoginCodeInvalid,
    #[error("too many {what}: the limit is {limit}; {hint}")]
    TooMany { what: String, limit: u64, hint: String },
    #[error("job {name} does not exist")]
    JobNotFound { name: String },
    #[error("a job named {name} already exists; choose another name")]
    JobExists { name: String },
    /// A checkpoint or result under a lease that is no longer the task's (fencing).
    #[error("refused: job {name} task {task} lease {lease} is not current: {why}")]
    LeaseLost { name: String, task: u64, lease: u64, why: String },
}

pub type CommandResult = Result<Outcome, CommandError>;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|e| StoreError(format!("encode: {e}")))
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError(format!("decode: {e}")))
}

pub fn get_u64(store: &impl StateStore, table: Table, key: &[u8]) -> Result<u64, StoreError> {
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

pub fn put_u64(store: &mut impl StateStore, table: Table, key: &[u8], value: u64) -> Result<(), StoreError> {
    store.put(table, key, &value.to_be_bytes())
}

pub fn current_revision(store: &impl StateStore) -> Result<u64, StoreError> {
    get_u64(store, Table::Meta, META_REVISION)
}

/// Revisions at or below this have been dropped from the event history.
pub fn compacted_revision(store: &impl StateStore) -> Result<u64, StoreError> {
    get_u64(store, Table::Meta, META_COMPACTED_REVISION)
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

/// Starts a new revision: bumps the counter, records the events, drops history beyond the
/// retention bounds (revisions and bytes).
pub fn commit_revision(store: &mut impl StateStore, events: &[Event]) -> Result<u64, StoreError> {
    let revision = current_revision(store)? + 1;
    put_u64(store, Table::Meta, META_REVISION, revision)?;
    let row = encode(&events)?;
    store.put(Table::Events, &revision.to_be_bytes(), &row)?;
    add_to_counter(store, META_HISTORY_BYTES, history_row_bytes(row.len()) as i64)?;
    let limits = limits(store)?;
    // The revision just written always stays, so a watcher can see it, whatever its size.
    let keep_from = revision.saturating_sub(EVENT_HISTORY_REVISIONS - 1);
    compact_history(store, |oldest, history_bytes| {
        oldest < keep_from || (oldest < revision && history_bytes > limits.kv_history_bytes)
    })?;
    Ok(revision)
}

/// The bytes one history row counts for: its revision key and its encoded events.
fn history_row_bytes(encoded_len: usize) -> u64 {
    8 + encoded_len as u64
}

/// Drops the oldest revisions of history while `drop_oldest(oldest revision, history bytes)`
/// says so.
///
/// Every revision writes one history row and history is dropped from its oldest end, so the
/// rows are exactly the revisions after the compacted one up to the current one: the oldest is
/// found without a scan. Every write comes here, and the two range scans this took (one to drop
/// a row, one to see the next) were a visible part of a follower's apply (`mendfs bench kv`).
pub fn compact_history(
    store: &mut impl StateStore,
    mut drop_oldest: impl FnMut(u64, u64) -> bool,
) -> Result<(), StoreError> {
    let current = current_revision(store)?;
    loop {
        let oldest = compacted_revision(store)?.saturating_add(1);
        if oldest > current || !drop_oldest(oldest, get_u64(store, Table::Meta, META_HISTORY_BYTES)?) {
            break;
        }
        let Some(row) = store.take(Table::Events, &oldest.to_be_bytes())? else {
            // A gap this code never leaves: fall back to finding the oldest row by its key.
            return compact_history_by_scan(store, drop_oldest);
        };
        add_to_counter(store, META_HISTORY_BYTES, -(history_row_bytes(row.len()) as i64))?;
        put_u64(store, Table::Meta, META_COMPACTED_REVISION, oldest)?;
    }
    settle_quota_alarm(store)
}

/// [`compact_history`] for a history whose rows are not the revisions after the compacted one.
fn compact_history_by_scan(
    store: &mut impl StateStore,
    mut drop_oldest: impl FnMut(u64, u64) -> bool,
) -> Result<(), StoreError> {
    while let Some((key, row)) = store.range(Table::Events, &[], None, 1)?.into_iter().next() {
        let oldest = u64::from_be_bytes(
            key.as_slice().try_into().map_err(|_| StoreError("event revision is not a u64".into()))?,
        );
        if !drop_oldest(oldest, get_u64(store, Table::Meta, META_HISTORY_BYTES)?) {
            break;
        }
        store.remove(Table::Events, &key)?;
        add_to_counter(store, META_HISTORY_BYTES, -(history_row_bytes(row.len()) as i64))?;
        put_u64(store, Table::Meta, META_COMPACTED_REVISION, oldest.max(compacted_revision(store)?))?;
    }
    settle_quota_alarm(store)
}

/// The state machine over in-memory maps, for tests.
#[cfg(test)]
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemoryStore {
    tables: std::collections::BTreeMap<Table, std::collections::BTreeMap<Vec<u8>, Vec<u8>>>,
}

#[cfg(test)]
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

    fn take(&mut self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tables.get_mut(&table).and_then(|rows| rows.remove(key)))
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
mod byte_string_encoding {
    /// `serde_bytes` changes the speed of encoding keys and values, not the bytes: state and
    /// logs written before it read back the same.
    #[test]
    fn a_byte_string_encodes_as_a_sequence_of_u8_did() {
        #[derive(serde::Serialize)]
        struct Plain {
            value: Vec<u8>,
        }
        #[derive(serde::Serialize)]
        struct Bytes {
            #[serde(with = "serde_bytes")]
            value: Vec<u8>,
        }
        for len in [0usize, 1, 127, 128, 70_000] {
            let value: Vec<u8> = (0..len).map(|i| i as u8).collect();
            assert_eq!(
                super::encode(&Plain { value: value.clone() }).expect("plain"),
                super::encode(&Bytes { value }).expect("bytes")
            );
        }
    }
}
