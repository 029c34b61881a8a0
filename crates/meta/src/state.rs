//! The metadata state machine's logic, free of I/O.
//!
//! Every committed Raft entry other than Raft's own (blank, membership) carries a
//! [`ProposalBatch`]: concurrent writes share one entry (group commit). `raft_store` applies the
//! batch's proposals one by one, in order, so this module never sees a batch: [`apply`] turns
//! one [`Proposal`] into changes to a small set of ordered byte tables behind the
//! [`StateStore`] trait (`schema`): keys and sessions in `kv`, files and chunks in `files`.
//! The redb-backed store applies them inside one write transaction
//! together with the applied log id, so the state on disk always describes exactly the entries
//! up to that id (etcd 3.5's inconsistency came from saving the applied index apart from the
//! state). `MemoryStore` implements the same trait over `BTreeMap`s for
//! unit and property tests; every node applies the same entries to the same state and must get
//! the same result, so nothing here reads a clock or a random number.
//!
//! The data model follows etcd v3: one cluster-wide revision, bumped once per successful
//! mutating command; per key a version (1 on create, +1 per set), a create and a modify
//! revision, and an optional session (etcd's lease). Every revision's events are kept in a
//! bounded history so that watchers can resume from any recent revision without gaps.

use serde::{Deserialize, Serialize};

use crate::schema::{
    decode, encode, get_u64, put_u64, CommandError, CommandResult, Outcome, StateStore, StoreError, Table,
    META_CLOCK_MS, META_CLUSTER_ID, META_DEDUP_EXPIRED_BEFORE_MS,
};
use crate::{files, jobs, kv, s3};

/// How long a write's outcome is remembered for deduplication, measured on the state clock,
/// which never runs faster than real time (see `clock`). Clients retry an ambiguous write for
/// far less than this.
pub const DEDUP_WINDOW_MS: u64 = 120_000;

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
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        session_id: Option<u64>,
    },
    Set {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        expected_version: Option<u64>,
        session_id: Option<u64>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
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
    /// Phase two of a file write: installs the new version at once, with its last segment of
    /// chunk references (for a big file, after the segments its upload staged).
    CommitFile(crate::files::CommitFile),
    DeleteFile {
        path: String,
        expected_version: Option<u64>,
    },
    /// A replica was found missing or corrupt: stop listing it (repair restores the count).
    DropReplica {
        hash: mendfs_types::ChunkHash,
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
    /// Records a client token (its hash) under a name no other token has.
    CreateToken {
        name: String,
        record: crate::auth::TokenRecord,
    },
    RevokeToken {
        name: String,
    },
    /// Drops the coordination keys' event history up to and including `revision`.
    Compact {
        revision: u64,
    },
    /// The leader's configured cluster-wide limits, proposed when they differ from the
    /// committed ones.
    SetLimits(crate::schema::Limits),
    /// One full segment of a big file's chunk list, ahead of the `CommitFile` that installs
    /// the file: its chunk references are added now, so no entry carries a whole big file.
    StageSegment(crate::files::StageSegment),
    /// The coordinator gave up on an upload: release what it staged.
    AbortUpload {
        upload_id: u64,
    },
    /// The leader's bounded step through queued work: expires abandoned uploads and drops
    /// the references of released chunk sets (a deleted or overwritten big file's).
    ReleaseChunks,
    /// S3: a bucket; `owner` (an access key) gets every right in it.
    S3CreateBucket {
        bucket: String,
        owner: Option<String>,
    },
    /// S3: deletes an empty bucket.
    S3DeleteBucket {
        bucket: String,
    },
    /// S3: records an access key (the admin created it).
    S3PutAccessKey {
        key_id: String,
        record: crate::s3::AccessKeyRecord,
    },
    S3DeleteAccessKey {
        key_id: String,
    },
    /// S3: what a key may do in a bucket (an empty grant removes it).
    S3SetGrant {
        key_id: String,
        bucket: String,
        grant: crate::s3::Grant,
    },
    /// S3: phase two of a single-part object write.
    S3PutObject(Box<crate::s3::PutObject>),
    /// S3: a server-side copy: a new record naming the source's content.
    S3CopyObject(Box<crate::s3::CopyObject>),
    S3DeleteObjects {
        bucket: String,
        keys: Vec<String>,
    },
    S3CreateMultipart(Box<crate::s3::MultipartUpload>),
    /// S3: phase two of a part's write.
    S3PutPart(Box<crate::s3::PutPart>),
    S3CompleteMultipart(Box<crate::s3::CompleteUpload>),
    S3AbortMultipart {
        upload_id: u64,
        bucket: String,
        key: String,
    },
    /// The leader aborts multipart uploads initiated before this time (on the state clock: its
    /// next stamp less the expiry), a bounded number per entry.
    S3ExpireMultipart {
        initiated_before_ms: u64,
    },
    /// A write (`CommitFile`, `S3PutObject` or `S3PutPart`) whose small chunks travel with it
    /// and are kept in the metadata (`files::with_inline_chunks`): the whole write is one
    /// entry, no storage node involved.
    WithInlineChunks {
        inline: Vec<crate::files::InlineChunk>,
        command: Box<Command>,
    },
    /// One-time dashboard login links and the sessions they open (`login`).
    Login(crate::login::LoginCommand),
    /// The leader's healer appends what it saw happen to the cluster's timeline.
    RecordClusterEvents(Vec<crate::files::ClusterEvent>),
    /// A write (file, object, part or segment) whose erasure-coded chunks' shards travel with
    /// it (`stripes::with_stripes`).
    WithStripes {
        stripes: Vec<crate::stripes::StripeCommit>,
        command: Box<Command>,
    },
    /// Repair's checkpoint for stripes: shards rebuilt or moved (counted in the job, like
    /// `AddReplicas`), and shard records that may go, each on the condition of a kept copy.
    RepairShards {
        job_id: Option<u64>,
        added: Vec<crate::stripes::ShardAdded>,
        drops: Vec<crate::stripes::ShardDrop>,
    },
    /// Fault-tolerant jobs: submit, cancel, and a worker's claim, checkpoint and completion
    /// under a lease (`jobs`). One wrapper variant, so that the log's numbering of commands
    /// moves by one whatever jobs need later.
    Job(crate::jobs::JobCommand),
    /// Redundancy policies of path prefixes and buckets (`policy`); one wrapper variant, as
    /// for jobs.
    Policy(crate::policy::PolicyCommand),
}

impl Command {
    /// Whether applying this changes the client tokens, which every node keeps in memory.
    pub fn changes_tokens(&self) -> bool {
        matches!(
            self,
            Command::CreateToken { .. }
                | Command::RevokeToken { .. }
                | Command::Login(crate::login::LoginCommand::Redeem { .. })
        )
    }

    /// For a command that references prepared chunks (a file commit, a staged segment, an S3
    /// object or part): when they began preparing, on the state clock. The leader fills it in
    /// as it stamps the proposal (its stamp less the write's age); the apply refuses the command
    /// if the state clock is past it by more than the grace (`files::check_prepare_age`).
    pub fn prepared_at_ms_mut(&mut self) -> Option<&mut u64> {
        match self {
            Command::WithInlineChunks { command, .. } | Command::WithStripes { command, .. } => {
                command.prepared_at_ms_mut()
            }
            Command::CommitFile(commit) => Some(&mut commit.prepared_at_ms),
            Command::StageSegment(stage) => Some(&mut stage.prepared_at_ms),
            Command::S3PutObject(put) => Some(&mut put.content.prepared_at_ms),
            Command::S3PutPart(put) => Some(&mut put.content.prepared_at_ms),
            _ => None,
        }
    }
}

impl Command {
    /// The chunk list a write brings (its last segment): a file commit's, an S3 object's or
    /// part's.
    pub fn written_chunks(&self) -> Option<&[crate::files::CommittedChunk]> {
        match self {
            Command::CommitFile(commit) => Some(&commit.chunks),
            Command::S3PutObject(put) => Some(&put.content.chunks),
            Command::S3PutPart(put) => Some(&put.content.chunks),
            _ => None,
        }
    }

    /// The chunk list a write may carry stripes for: [`Command::written_chunks`], and a big
    /// file's staged segments, whose chunks are erasure-coded like any other.
    pub fn striped_chunks(&self) -> Option<&[crate::files::CommittedChunk]> {
        match self {
            Command::StageSegment(stage) => Some(&stage.chunks),
            other => other.written_chunks(),
        }
    }
}

/// One Raft entry's payload: a command, who sent it, and when the leader committed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub request_id: Option<RequestId>,
    /// The leader's stamp, the only way time enters the state: the state clock becomes the
    /// largest stamp applied. Whoever builds a proposal leaves it 0; the proposer of the node
    /// that commits it as leader stamps it, following its wall clock but never faster than its
    /// monotonic clock (`clock::next_stamp`), so no node's date can move the state clock further
    /// than the real time that passed. (Entries written before this rule carry the proposing
    /// node's wall clock; applying them is unchanged.)
    pub proposed_at_ms: u64,
    pub command: Command,
}

impl Proposal {
    /// Roughly the bytes this proposal adds to a Raft entry, for batch size limits.
    pub fn approximate_bytes(&self) -> usize {
        const OVERHEAD_BYTES: usize = 64;
        OVERHEAD_BYTES + self.command.approximate_bytes()
    }
}

impl Command {
    /// Roughly the bytes this command adds to a Raft entry.
    pub fn approximate_bytes(&self) -> usize {
        match self {
            Command::InitCluster { cluster_id } => cluster_id.len(),
            Command::Create { key, value, .. } | Command::Set { key, value, .. } => key.len() + value.len(),
            Command::Delete { key, .. } => key.len(),
            Command::SessionOpen { .. } | Command::SessionClose { .. } | Command::SessionExpire { .. } => 0,
            Command::RegisterStorageNode { node } => node.addr.len() + node.zone.len(),
            Command::CommitFile(commit) => {
                commit.path.len() + commit.content_hash.len() + committed_chunks_bytes(&commit.chunks)
            }
            Command::DeleteFile { path, .. } => path.len(),
            Command::DropReplica { .. } => 32,
            Command::SetNodeLiveness { .. } | Command::SetDraining { .. } | Command::UnregisterStorageNode { .. } => 0,
            Command::AddReplicas { added, .. } => added.len() * 48,
            Command::DropReplicas { drops } => drops.iter().map(|d| 48 + d.keep.len() * 8).sum(),
            Command::RecordRepairJob(job) => job.reason.len() + 64,
            Command::CreateToken { name, .. } => name.len() + 48,
            Command::RevokeToken { name } => name.len(),
            Command::Compact { .. } | Command::SetLimits(_) => 0,
            Command::StageSegment(stage) => stage.path.len() + committed_chunks_bytes(&stage.chunks),
            Command::AbortUpload { .. } | Command::ReleaseChunks => 0,
            Command::S3CreateBucket { bucket, owner } => bucket.len() + owner.as_ref().map_or(0, String::len),
            Command::S3DeleteBucket { bucket } => bucket.len(),
            Command::S3PutAccessKey { key_id, record } => key_id.len() + record.name.len() + record.secret.len(),
            Command::S3DeleteAccessKey { key_id } => key_id.len(),
            Command::S3SetGrant { key_id, bucket, .. } => key_id.len() + bucket.len(),
            Command::S3PutObject(put) => put.approximate_bytes(),
            Command::S3CopyObject(copy) => {
                copy.source_bucket.len() + copy.source_key.len() + copy.bucket.len() + copy.key.len() + 512
            }
            Command::S3DeleteObjects { bucket, keys } => bucket.len() + keys.iter().map(|k| k.len() + 8).sum::<usize>(),
            Command::S3CreateMultipart(upload) => upload.bucket.len() + upload.key.len() + 2_048,
            Command::S3PutPart(put) => {
                put.content.approximate_bytes() + put.etag.len() + put.bucket.len() + put.key.len()
            }
            Command::S3CompleteMultipart(complete) => {
                complete.bucket.len()
                    + complete.key.len()
                    + complete.parts.iter().map(|(_, etag)| etag.len() + 8).sum::<usize>()
            }
            Command::S3AbortMultipart { bucket, key, .. } => bucket.len() + key.len(),
            Command::S3ExpireMultipart { .. } => 0,
            Command::WithInlineChunks { inline, command } => {
                inline.iter().map(|chunk| chunk.data.len() + 8).sum::<usize>() + command.approximate_bytes()
            }
            Command::Login(login) => login.approximate_bytes(),
            Command::RecordClusterEvents(events) => events.iter().map(|e| e.detail.len() + 32).sum(),
            Command::WithStripes { stripes, command } => {
                stripes.iter().map(|stripe| 48 + stripe.shards.len() * 40).sum::<usize>() + command.approximate_bytes()
            }
            Command::RepairShards { added, drops, .. } => added.len() * 48 + drops.len() * 56,
            Command::Job(job) => job.approximate_bytes(),
            Command::Policy(policy) => policy.approximate_bytes(),
        }
    }
}

/// What a list of committed chunks adds to an entry; `validate` bounds it per segment
/// (`SEGMENT_BYTES_MAX`).
fn committed_chunks_bytes(chunks: &[crate::files::CommittedChunk]) -> usize {
    chunks.iter().map(crate::files::committed_chunk_bytes).sum()
}

/// Proposals that travel through Raft as one entry: concurrent writes share one log append,
/// one replication round and one fsync per node (group commit). They are applied in order,
/// each as if it were its own entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalBatch {
    pub proposals: Vec<Proposal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DedupRecord {
    result: CommandResult,
}

pub fn cluster_id(store: &impl StateStore) -> Result<Option<String>, StoreError> {
    store
        .get(Table::Meta, META_CLUSTER_ID)?
        .map(|bytes| String::from_utf8(bytes).map_err(|e| StoreError(format!("cluster id: {e}"))))
        .transpose()
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
///
/// A record is stamped with the clock of the entry that wrote it, and the clock never goes
/// back, so once a scan has forgotten everything before a cutoff nothing before it comes back:
/// the entries of a batch share a clock and all but the first skip the scan, which every write
/// paid for before (`mendfs bench kv`).
fn expire_dedup(store: &mut impl StateStore, clock_ms: u64) -> Result<(), StoreError> {
    const MAX_EXPIRED_PER_APPLY: usize = 64;
    let cutoff = clock_ms.saturating_sub(DEDUP_WINDOW_MS);
    if cutoff <= get_u64(store, Table::Meta, META_DEDUP_EXPIRED_BEFORE_MS)? {
        return Ok(());
    }
    let expired = store.range(Table::DedupByTime, &[], Some(&cutoff.to_be_bytes()), MAX_EXPIRED_PER_APPLY)?;
    let all_expired = expired.len() < MAX_EXPIRED_PER_APPLY;
    for (time_key, _) in expired {
        store.remove(Table::DedupByTime, &time_key)?;
        if time_key.len() == 24 {
            store.remove(Table::Dedup, &time_key[8..])?;
        }
    }
    if all_expired {
        put_u64(store, Table::Meta, META_DEDUP_EXPIRED_BEFORE_MS, cutoff)?;
    }
    Ok(())
}

fn apply_command(store: &mut impl StateStore, command: &Command) -> Result<CommandResult, StoreError> {
    match command {
        Command::RegisterStorageNode { node } => files::register_storage_node(store, node),
        Command::CommitFile(commit) => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            files::commit_file(store, commit, clock_ms)
        }
        Command::DeleteFile { path, expected_version } => files::delete_file(store, path, *expected_version),
        Command::DropReplica { hash, node_id } => files::drop_replica(store, hash, *node_id),
        Command::SetNodeLiveness { node_id, liveness } => files::set_liveness(store, *node_id, *liveness),
        Command::SetDraining { node_id, draining } => files::set_draining(store, *node_id, *draining),
        Command::UnregisterStorageNode { node_id } => files::unregister_storage_node(store, *node_id),
        Command::AddReplicas { job_id, added } => files::add_replicas(store, *job_id, added),
        Command::DropReplicas { drops } => files::drop_replicas(store, drops),
        Command::RecordRepairJob(job) => files::record_repair_job(store, job),
        Command::CreateToken { name, record } => {
            if let Some(existing) = store.get(Table::Tokens, name.as_bytes())? {
                // The same token proposed again (a retry whose first attempt was applied) is
                // not a conflict.
                if decode::<crate::auth::TokenRecord>(&existing)?.hash != record.hash {
                    return Ok(Err(CommandError::TokenExists { name: name.clone() }));
                }
            }
            store.put(Table::Tokens, name.as_bytes(), &encode(record)?)?;
            Ok(Ok(Outcome::Noop))
        }
        Command::RevokeToken { name } => {
            let found = store.get(Table::Tokens, name.as_bytes())?.is_some();
            store.remove(Table::Tokens, name.as_bytes())?;
            store.remove(Table::TokenExpiries, name.as_bytes())?;
            Ok(Ok(Outcome::TokenRevoked { found }))
        }
        Command::Compact { revision } => kv::compact(store, *revision),
        Command::SetLimits(limits) => {
            store.put(Table::Meta, crate::schema::META_LIMITS, &encode(limits)?)?;
            // A raised quota can clear the alarm at once; a lowered one is enforced by the
            // next write.
            crate::schema::settle_quota_alarm(store)?;
            Ok(Ok(Outcome::Noop))
        }
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
        Command::Create { key, value, session_id } => kv::create(store, key, value, *session_id),
        Command::Set { key, value, expected_version, session_id } => {
            kv::set(store, key, value, *expected_version, *session_id)
        }
        Command::Delete { key, expected_version } => kv::delete(store, key, *expected_version),
        Command::SessionOpen { ttl_ms } => kv::open_session(store, *ttl_ms),
        Command::SessionClose { session_id } | Command::SessionExpire { session_id } => {
            let result = kv::close_session(store, *session_id)?;
            // The session's job leases end in the same apply as the session: no replica ever
            // sees a lease outlive its session.
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            jobs::release_session(store, *session_id, clock_ms)?;
            Ok(result)
        }
        Command::StageSegment(stage) => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            files::stage_segment(store, stage, clock_ms)
        }
        Command::AbortUpload { upload_id } => files::abort_upload(store, *upload_id),
        Command::ReleaseChunks => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            files::release_chunks(store, clock_ms, files::RELEASE_CHUNKS_PER_APPLY)
        }
        Command::S3CreateBucket { bucket, owner } => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            s3::create_bucket(store, bucket, owner.as_deref(), clock_ms)
        }
        Command::S3DeleteBucket { bucket } => s3::delete_bucket(store, bucket),
        Command::S3PutAccessKey { key_id, record } => s3::put_access_key(store, key_id, record),
        Command::S3DeleteAccessKey { key_id } => s3::delete_access_key(store, key_id),
        Command::S3SetGrant { key_id, bucket, grant } => s3::set_grant(store, key_id, bucket, *grant),
        Command::S3PutObject(put) => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            s3::put_object(store, put, clock_ms)
        }
        Command::S3CopyObject(copy) => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            s3::copy_object(store, copy, clock_ms)
        }
        Command::S3DeleteObjects { bucket, keys } => s3::delete_objects(store, bucket, keys),
        Command::S3CreateMultipart(upload) => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            s3::create_multipart(store, upload, clock_ms)
        }
        Command::S3PutPart(put) => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            s3::put_part(store, put, clock_ms)
        }
        Command::S3CompleteMultipart(complete) => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            s3::complete_multipart(store, complete, clock_ms)
        }
        Command::S3AbortMultipart { upload_id, bucket, key } => s3::abort_multipart(store, *upload_id, bucket, key),
        Command::S3ExpireMultipart { initiated_before_ms } => s3::expire_multipart(store, *initiated_before_ms),
        Command::WithInlineChunks { inline, command } => {
            if matches!(command.as_ref(), Command::WithInlineChunks { .. } | Command::WithStripes { .. }) {
                let why = "inline chunks wrap a write, not another wrapper".to_string();
                return Ok(Err(CommandError::InvalidRequest { why }));
            }
            files::with_inline_chunks(store, inline, command.written_chunks(), |store| apply_command(store, command))
        }
        Command::Login(login) => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            crate::login::apply(store, login, clock_ms)
        }
        Command::RecordClusterEvents(events) => files::record_cluster_events(store, events),
        Command::WithStripes { stripes, command } => {
            if matches!(command.as_ref(), Command::WithStripes { .. } | Command::WithInlineChunks { .. }) {
                let why = "stripes wrap a write, not another wrapper".to_string();
                return Ok(Err(CommandError::InvalidRequest { why }));
            }
            crate::stripes::with_stripes(store, stripes, command.striped_chunks(), |store| {
                apply_command(store, command)
            })
        }
        Command::RepairShards { job_id, added, drops } => files::repair_shards(store, *job_id, added, drops),
        Command::Job(job) => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            jobs::apply(store, job, clock_ms)
        }
        Command::Policy(policy) => {
            let clock_ms = get_u64(store, Table::Meta, META_CLOCK_MS)?;
            crate::policy::apply(store, policy, clock_ms)
        }
    }
}

#[cfg(test)]
mod tests;
