//! A running metadata node: openraft plus the storage and network adapters, the decisions only
//! the leader may take (writes, linearizable reads, session expiry, membership changes), and
//! forwarding of those requests from any node to the leader.
//!
//! [`MetaNode`] is this crate's face: every other crate reads and changes the metadata through
//! its typed methods, and none of them sees openraft, the state store or a catch-all answer.
//! Inside, a leader-only request travels as a [`LeaderRequest`] (so that it can be forwarded to
//! the leader in one envelope) and each typed method unpacks its own answer.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use futures::StreamExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mendfs_heal::detector::Liveness;
use mendfs_proto::v1::RaftPayload;
use mendfs_proto::FORWARDED_HEADER;
use mendfs_types::{unix_now_ms, ChunkHash};
use mendfs_worker::{Background, OnFailure, Step, Worker, WorkerError};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::blocking_work::BlockingWork;
use crate::clock::{self, Age, PeerClocks, PeerInstant, StateClock};
use crate::error::ApiError;
use crate::files::{
    self, ChunkRecord, CommitFile, FileRecord, InlineChunk, RepairJob, ReplicaAdded, ReplicaDrop, StageSegment,
    StorageNode,
};
use crate::kv;
use crate::network::{NetworkFactory, Peers};
use crate::raft_store::{RaftLogStore, ReadView, StateMachineStore, StateReader};
use crate::schema::{self, CommandError, CommandResult, KeyValue, Outcome};
use crate::state::{Command, Proposal, ProposalBatch, RequestId};
use crate::write_metrics::WriteMetrics;
use crate::{NodeId, Raft};

/// Everything a metadata node needs to run. Defaults suit a local cluster on one machine.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    pub node_id: NodeId,
    /// The address peers and clients use to reach this node.
    pub advertise_addr: String,
    /// Where this node serves HTTP (`/metrics`, the dashboard), as others can reach it; empty
    /// without `--http`. Members tell each other in `Node/Info`, so a dashboard can move to
    /// another node when the one it was loaded from dies.
    pub http_addr: String,
    pub data_dir: PathBuf,
    /// The initial voter set; the node with the lowest id initializes the cluster, once.
    pub initial_peers: BTreeMap<NodeId, String>,
    /// None only with `--insecure-dev`.
    pub secret: Option<String>,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Take a snapshot (and compact the log) after this many entries since the last one.
    pub snapshot_every_entries: u64,
    /// Keep this many entries behind the last snapshot, for followers that are slightly behind.
    pub log_entries_kept_after_snapshot: u64,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// How long a write may wait for a quorum before the caller hears a timeout.
    pub write_timeout_ms: u64,
    pub list_limit_max: u32,
    /// The cluster-wide limits this node proposes when it leads (see `schema::Limits`).
    pub limits: crate::schema::Limits,
    /// TLS for calls to peers: this node's certificate (its client identity) and the CA the
    /// peers' certificates must chain to. None: plaintext.
    pub peer_tls: Option<PeerTls>,
    /// An S3 multipart upload not completed this long after it began (both on the state
    /// clock) is aborted, and its parts' space given back.
    pub s3_upload_expiry_ms: u64,
    /// DELIBERATELY BROKEN, for `mendfs chaos` only: a client's key Get is answered from this
    /// node's own state, with neither the leader nor read-index, so a follower or a leader cut
    /// off from the majority answers stale values. It exists so the chaos checker can be shown
    /// to catch a server that is not linearizable. Off by default; the node refuses it without
    /// `--allow-fault-injection`.
    pub unsafe_local_reads: bool,
}

/// PEM material for TLS to peers.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerTls {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

impl MetaConfig {
    pub fn new(node_id: NodeId, advertise_addr: String, data_dir: PathBuf) -> Self {
        Self {
            node_id,
            advertise_addr,
            http_addr: String::new(),
            data_dir,
            initial_peers: BTreeMap::new(),
            secret: None,
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            snapshot_every_entries: 10_000,
            log_entries_kept_after_snapshot: 1_000,
            max_key_bytes: 4_096,
            max_value_bytes: 1 << 20,
            write_timeout_ms: 5_000,
            list_limit_max: 10_000,
            limits: crate::schema::Limits::default(),
            peer_tls: None,
            s3_upload_expiry_ms: 24 * 60 * 60 * 1000,
            unsafe_local_reads: false,
        }
    }
}

/// A request only the leader can serve; any other node forwards it.
///
/// Wire format: postcard numbers the variants by position, and nodes of two versions forward
/// to each other during a rolling upgrade, so a variant is never removed or reordered; a
/// retired one stays as a placeholder (`tests::leader_messages_keep_their_wire_numbers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum LeaderRequest {
    Propose(Proposal),
    Get {
        key: Vec<u8>,
    },
    List {
        prefix: Vec<u8>,
        limit: u32,
    },
    KeepAlive {
        session_id: u64,
    },
    AddNode {
        id: NodeId,
        addr: String,
        learner: bool,
    },
    RemoveNode {
        id: NodeId,
    },
    /// Retired: a file with its whole chunk list; now `FileChunks`. Refused.
    RetiredGetFile,
    /// Retired: files with their whole chunk lists; now `ListFiles`. Refused.
    RetiredListFiles,
    /// Which of these chunks no committed file lists on `node_id` (garbage collection).
    UnreferencedChunks {
        node_id: NodeId,
        hashes: Vec<ChunkHash>,
    },
    /// Retired: the health view was asked of the leader this way; `Cluster.Status` is now
    /// forwarded whole. Kept so the variants after it keep their numbers; refused.
    RetiredHealth,
    /// Drain or undrain a storage node.
    Drain {
        id: NodeId,
        draining: bool,
    },
    /// `List` continued from `start_key` (a page after the first). Forwarded only when
    /// `start_key` is not empty, so a first page still reaches a leader that predates it.
    ListFrom {
        prefix: Vec<u8>,
        start_key: Vec<u8>,
        limit: u32,
    },
    /// A file's summary and one page of its chunk list (`limit` 0: the summary alone), of
    /// `version` (None: the current one).
    FileChunks {
        path: String,
        version: Option<u64>,
        from_index: u64,
        limit: u32,
    },
    /// File summaries under a prefix, without their chunk lists.
    ListFiles {
        prefix: String,
        limit: u32,
    },
    /// Every storage node with its address, as the leader knows them: for a node whose own
    /// state lags (a learner catching up) and meets a replica on a node it has not heard of.
    StorageNodes,
    /// A read of the S3 keyspace.
    S3(s3_api::S3Read),
    /// The bytes of a chunk kept inline in the metadata.
    InlineChunk {
        hash: ChunkHash,
    },
    /// Use up a dashboard login code and open a session (`login`); answered `Redeemed`.
    RedeemLogin {
        code_hash: [u8; 32],
        session_name: String,
        session_hash: [u8; 32],
    },
    /// A read of the jobs.
    Jobs(jobs_api::JobRead),
    /// An erasure-coded chunk's stripe; answered `Stripe`.
    Stripe {
        chunk: ChunkHash,
    },
    /// Every redundancy policy; answered `Policies`.
    Policies,
    /// The leader's applied index after a read-index round that started after this arrived;
    /// answered `ReadIndex`. A node that waits until its own state reaches it has seen every
    /// write acknowledged before it asked (a token created through another node a moment ago).
    ReadIndex,
}

/// The leader's answer to a [`LeaderRequest`], one variant per request kind; the same wire
/// rule as for requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum LeaderResponse {
    Command(CommandResult),
    Get {
        revision: u64,
        kv: Option<KeyValue>,
    },
    List {
        revision: u64,
        kvs: Vec<KeyValue>,
        truncated: bool,
    },
    KeepAlive {
        ttl_ms: u64,
    },
    Membership(Membership),
    /// Retired with `LeaderRequest::RetiredGetFile`; never sent.
    RetiredFile,
    /// Retired with `LeaderRequest::RetiredListFiles`; never sent.
    RetiredFiles,
    Unreferenced(Vec<ChunkHash>),
    /// Retired with `LeaderRequest::RetiredHealth`; never sent.
    RetiredHealth,
    Drained,
    FileChunks(Option<(FileView, ChunkPage)>),
    Files {
        files: Vec<FileView>,
        truncated: bool,
    },
    StorageNodes(Vec<StorageNode>),
    S3(s3_api::S3Answer),
    InlineChunk(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// The login's outcome, and the leader's applied index once it was applied: the asker
    /// waits for its own state to reach it before it hands out the session token.
    Redeemed {
        result: CommandResult,
        applied_index: u64,
    },
    Jobs(jobs_api::JobAnswer),
    Stripe(Option<crate::stripes::StripeRecord>),
    Policies(Vec<(crate::policy::PolicyTarget, crate::policy::PolicyRecord)>),
    ReadIndex {
        applied_index: u64,
    },
}

/// What travels with a write besides its chunk list: the content of a small one kept inline,
/// or the shards of its erasure-coded chunks. A write has one or the other (inline content is
/// never prepared anywhere, stripes always are).
#[derive(Debug, Clone, Default)]
pub struct Carried {
    pub inline: Vec<InlineChunk>,
    pub stripes: Vec<crate::stripes::StripeCommit>,
}

impl Carried {
    pub fn inline(inline: Vec<InlineChunk>) -> Self {
        Carried { inline, stripes: Vec::new() }
    }
}

/// `command` with what travels with it, if anything.
fn with_carried(carried: Carried, command: Command) -> Command {
    let command = if carried.inline.is_empty() {
        command
    } else {
        Command::WithInlineChunks { inline: carried.inline, command: Box::new(command) }
    };
    if carried.stripes.is_empty() {
        command
    } else {
        // With inline chunks too, the apply refuses the nesting: a write never has both.
        Command::WithStripes { stripes: carried.stripes, command: Box::new(command) }
    }
}

/// A dashboard session a login code opened.
#[derive(Debug, Clone)]
pub struct LoginSession {
    /// The bearer token, known only to the caller (the metadata keeps its hash).
    pub token: String,
    pub name: String,
    pub role: crate::auth::Role,
    pub expires_unix_ms: u64,
}

/// A file version's summary: its record, which names its chunk list but does not hold it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileView {
    pub path: String,
    pub record: FileRecord,
}

/// One chunk of a file with the nodes its copies are listed on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: ChunkHash,
    pub size: u64,
    pub replicas: Vec<NodeId>,
}

/// Consecutive chunks of one file version, from one consistent read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkPage {
    pub version: u64,
    pub n_chunks: u64,
    pub from_index: u64,
    pub chunks: Vec<ChunkRef>,
}

/// The node's bound on the clients' metadata reads that go off the async workers (a file's
/// chunk page, a listing, an S3 or jobs answer, a page of keys, a collector's lookups, the
/// token list): two per core. On tokio's blocking pool, 32 clients' 4 KiB files (a page read
/// per get) left a coordinator with 38 to 41 threads that later work kept alive, each with
/// allocator pages of its own: in a full `mendfs bench files`, its 8-client 64 MiB get row then
/// peaked at 139 to 156 MiB. Bounded here, the node kept 13 threads, that row peaked at 133 to
/// 135 MiB, and every row ran as fast. Each read is a bounded page of rows, so they share a few
/// threads without one waiting long. The long scans (a node's whole chunk list, the session
/// scan) and the Raft log's work stay on tokio's pool, so none of them waits for client reads,
/// nor they for it.
static METADATA_READS: std::sync::LazyLock<BlockingWork> =
    std::sync::LazyLock::new(|| BlockingWork::new(crate::blocking_work::two_per_core(), "mendfs-meta-read"));

/// The most chunks one page holds.
pub const CHUNK_PAGE_CHUNKS_MAX: u32 = files::SEGMENT_CHUNKS_MAX as u32;
/// The most bytes one page holds, roughly (a hash, a size and each replica's id per chunk):
/// a page stays a small message, whatever the file's size or the chunks' replica counts.
const CHUNK_PAGE_BYTES_MAX: usize = 1 << 20;

/// The Raft members after a membership change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

/// A committed file version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileCommitted {
    pub version: u64,
    pub revision: u64,
}

/// A node's role in the metadata cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        }
    }
}

/// This node's view of the replicated log, for metrics and `cluster status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftStatus {
    pub role: Role,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    /// Why Raft stopped (a fatal storage error, say); None while it runs.
    pub stopped: Option<String>,
    /// Every member (voters and learners) with its address.
    pub members: BTreeMap<NodeId, String>,
    pub voters: BTreeSet<NodeId>,
}

/// Where a leader-only request comes from: whether it may still be forwarded, and until when
/// its caller waits for an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Origin {
    /// Already forwarded once by another node: never forwarded again.
    pub forwarded: bool,
    /// When the caller gives up (a client's `grpc-timeout`); None: this node's own timeouts.
    pub deadline: Option<Instant>,
}

impl Origin {
    /// This node's own work (repair, GC, a coordinator's lookups): its own timeouts apply.
    pub const LOCAL: Origin = Origin { forwarded: false, deadline: None };
    /// A request another node forwarded here, in an envelope with its deadline.
    pub const FORWARDED: Origin = Origin { forwarded: true, deadline: None };
}

/// A forwarded request with how long its sender waits for the answer.
///
/// The leader must not act on a request its sender has given up on (the sender has reported a
/// failure), so it needs to know how long the request was on its way, which no two dates tell:
/// the sender states when it sent the envelope *on the leader's monotonic clock*, as it knows
/// that clock from the leader's own calls to it (`clock::PeerClocks`: never later than the
/// truth), and how long it waits from then. The leader compares with its own clock alone.
///
/// Wire format: postcard, fields in order. Fields are only ever added at the end: a leader of
/// the previous version decodes the first two and ignores the rest, and this version decodes
/// an envelope of the previous version as [`LegacyForwardEnvelope`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ForwardEnvelope {
    /// Retired: the sender's date after which it no longer waits, which a leader compared with
    /// its own date, so that a follower whose clock was an hour behind had every request
    /// refused. Still filled for a leader of the previous version; ignored on arrival.
    pub deadline_unix_ms: u64,
    pub request: LeaderRequest,
    /// How long the sender waits for the answer from `sent_at`, in milliseconds.
    pub remaining_ms: u64,
    /// When the sender sent it, on the receiver's monotonic clock; None if the sender has no
    /// recent reading of the receiver's clock (it has not heard from it for a while).
    pub sent_at: Option<PeerInstant>,
    /// For a proposal that references prepared chunks: how long before sending, on the
    /// sender's monotonic clock, the first of them began preparing (see `files`).
    pub prepare_age_ms: Option<u64>,
}

/// An envelope as the previous version sends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LegacyForwardEnvelope {
    pub deadline_unix_ms: u64,
    pub request: LeaderRequest,
}

/// What the receiver makes of an envelope on arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrival {
    /// When its sender gives up, on the receiver's clock.
    pub deadline: Instant,
    /// The age of the write a proposal commits, with the time on the way counted.
    pub prepare_age: Option<Age>,
}

impl ForwardEnvelope {
    pub(crate) fn new(
        request: LeaderRequest,
        remaining: Duration,
        sent_at: Option<PeerInstant>,
        prepare_age: Option<Duration>,
    ) -> Self {
        let remaining_ms = remaining.as_millis() as u64;
        ForwardEnvelope {
            deadline_unix_ms: unix_now_ms().saturating_add(remaining_ms),
            request,
            remaining_ms,
            sent_at,
            prepare_age_ms: prepare_age.map(|age| age.as_millis() as u64),
        }
    }

    /// Decodes an envelope of this version or of the previous one.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, schema::StoreError> {
        schema::decode::<ForwardEnvelope>(bytes).or_else(|e| {
            let legacy: LegacyForwardEnvelope = schema::decode(bytes).map_err(|_| e)?;
            // The previous version's deadline is a date: all its sender left to go by.
            let remaining_ms = legacy.deadline_unix_ms.saturating_sub(unix_now_ms());
            Ok(ForwardEnvelope {
                deadline_unix_ms: legacy.deadline_unix_ms,
                request: legacy.request,
                remaining_ms,
                sent_at: None,
                prepare_age_ms: None,
            })
        })
    }

    /// The envelope arrived at `received`: when its sender gives up, or, if it has already
    /// (the request waited in a paused leader's socket, or in a network that held it back), by
    /// how many milliseconds it is late. Without a `sent_at` the time on the way is unknown and
    /// counted as none for the deadline (the leader then relies on its own timeouts), and as
    /// the whole wait for a write's age, which must never be counted short.
    pub(crate) fn arrival(&self, received: Instant) -> Result<Arrival, u64> {
        let remaining = Duration::from_millis(self.remaining_ms);
        let on_the_way = self.sent_at.and_then(|sent_at| clock::elapsed_since(sent_at, received));
        if let Some(late) = on_the_way.unwrap_or_default().checked_sub(remaining) {
            return Err(late.as_millis() as u64);
        }
        let prepare_age = self
            .prepare_age_ms
            .map(|age_ms| Age::of(Duration::from_millis(age_ms) + on_the_way.unwrap_or(remaining), received));
        Ok(Arrival { deadline: received + (remaining - on_the_way.unwrap_or_default()), prepare_age })
    }
}

/// The one error for an answer of the wrong kind: a leader of another version, or a bug.
mod jobs_api;
pub use jobs_api::{ClaimAnswer, JobView};
mod policy_api;
mod s3_api;
pub use s3_api::{AccessKeyView, BUCKETS_LISTED_MAX, OBJECTS_LISTED_MAX};

pub(crate) fn unexpected(what: &str, answer: impl std::fmt::Debug) -> ApiError {
    ApiError::Internal(format!("unexpected answer to {what}: {answer:?}"))
}

/// A file's summary and up to `limit` of its chunks from `from_index` on, with their
/// replicas, from one read view; None if there is no such file. `version`: refused with
/// `VersionMismatch` unless it is the current one (a reader paging through a file learns that
/// the file changed instead of mixing two versions).
fn file_chunk_page(
    view: &impl schema::StateStore,
    path: String,
    version: Option<u64>,
    from_index: u64,
    limit: u32,
) -> Result<Option<(FileView, ChunkPage)>, ApiError> {
    let record = files::get_file(view, &path).map_err(ApiError::internal)?;
    if let Some(expected) = version {
        let actual = record.as_ref().map_or(0, |record| record.version);
        if actual != expected {
            return Err(ApiError::Command(CommandError::VersionMismatch { expected, actual }));
        }
    }
    let Some(record) = record else { return Ok(None) };
    let limit = limit.min(CHUNK_PAGE_CHUNKS_MAX) as usize;
    let listed = files::file_chunk_page(view, &record, from_index, limit).map_err(ApiError::internal)?;
    let mut chunks = Vec::with_capacity(listed.len());
    let mut bytes = 0;
    for chunk in listed {
        let replicas = files::chunk_replicas(view, &chunk.hash).map_err(ApiError::internal)?;
        let replicas = replicas.ok_or_else(|| {
            ApiError::Internal(format!("file {path} references chunk {} missing from the chunk map", chunk.hash))
        })?;
        bytes += 48 + 8 * replicas.len();
        // Always at least one chunk, so a reader makes progress.
        if bytes > CHUNK_PAGE_BYTES_MAX && !chunks.is_empty() {
            break;
        }
        chunks.push(ChunkRef { hash: chunk.hash, size: chunk.size, replicas });
    }
    let page = ChunkPage { version: record.version, n_chunks: record.n_chunks, from_index, chunks };
    Ok(Some((FileView { path, record }, page)))
}

/// Session liveness, kept by the leader alone (soft state, like etcd's lease keep-alives): a
/// new leader starts every session's clock afresh, so a leader change never expires a session
/// whose client is alive.
#[derive(Default)]
struct SessionClocks {
    deadlines: HashMap<u64, Instant>,
    /// The same deadlines in order: a tick looks only at the sessions that are due, not at all
    /// of them.
    by_deadline: BTreeSet<(Instant, u64)>,
    /// When the sessions table was last read whole, to learn of sessions opened since (or under
    /// an earlier leader) and forget closed ones; not every tick, since it is a full scan.
    last_scan: Option<Instant>,
}

/// How often the leader reads the whole sessions table. Sessions opened through this leader get
/// their clocks when the open commits; the scan finds those opened under an earlier leader (at
/// once, on a new term) and forgets closed ones, so it is rare: it reads every session.
const SESSION_SCAN_EVERY: Duration = Duration::from_secs(10);
/// Expiries proposed per tick, all at once: group commit puts them into a few Raft entries.
const SESSION_EXPIRIES_PER_TICK_MAX: usize = 8_192;
/// Expiry proposals in flight at once.
const SESSION_EXPIRIES_IN_FLIGHT_MAX: usize = 512;

impl SessionClocks {
    fn set(&mut self, session_id: u64, deadline: Instant) {
        if let Some(previous) = self.deadlines.insert(session_id, deadline) {
            self.by_deadline.remove(&(previous, session_id));
        }
        self.by_deadline.insert((deadline, session_id));
    }

    fn forget(&mut self, session_id: u64) {
        if let Some(deadline) = self.deadlines.remove(&session_id) {
            self.by_deadline.remove(&(deadline, session_id));
        }
    }

    fn clear(&mut self) {
        *self = SessionClocks::default();
    }

    /// Takes in a full read of the sessions table at `now`: `(id, ttl_ms)` of every live
    /// session. Ones without a clock get a full TTL from now. None is forgotten here: a session
    /// opened while the table was being read is missing from `live` but very much alive.
    /// Clocks go when their session is closed or expired through this leader.
    fn sync(&mut self, live: &[(u64, u64)], now: Instant) {
        for (id, ttl_ms) in live {
            if !self.deadlines.contains_key(id) {
                self.set(*id, now + Duration::from_millis(*ttl_ms));
            }
        }
        self.last_scan = Some(now);
    }

    fn scan_due(&self, now: Instant) -> bool {
        self.last_scan.is_none_or(|last| now.saturating_duration_since(last) >= SESSION_SCAN_EVERY)
    }

    /// Sessions whose deadline has passed, earliest first, at most `limit`.
    fn due(&self, now: Instant, limit: usize) -> Vec<u64> {
        self.by_deadline.iter().take_while(|(deadline, _)| *deadline <= now).take(limit).map(|(_, id)| *id).collect()
    }
}

/// Proposals waiting to join a batch. Bounded: when Raft cannot keep up, callers wait here
/// (and time out) instead of growing memory.
const PROPOSAL_QUEUE_LEN_MAX: usize = 4_096;
/// Limits of one batch: entries stay small enough to replicate and apply quickly. A batch
/// closes once it holds this many bytes, so an entry is at most this plus one proposal (about
/// 2 MiB with the largest value).
const BATCH_PROPOSALS_MAX: usize = 512;
const BATCH_BYTES_MAX: usize = 1 << 20;
/// Entries in one AppendEntries. openraft 0.9 gives an AppendEntries the heartbeat interval to
/// complete, the follower's fsync included; a follower behind by many large entries was sent
/// them all at once (up to 300 entries of 4 MiB), never answered in time, and was sent the same
/// again: no progress, no commits. Four entries keep one message to about 8 MiB.
const APPEND_ENTRIES_MAX: u64 = 4;
/// Batches being committed at once. While they are, new proposals gather into the next batch;
/// more in flight would only make batches smaller.
const BATCHES_IN_FLIGHT_MAX: usize = 2;

struct PendingProposal {
    proposal: Proposal,
    /// For a proposal that references prepared chunks: how long ago they began preparing.
    prepare_age: Option<Age>,
    reply: oneshot::Sender<Result<CommandResult, ApiError>>,
}

/// When a write's chunks began preparing, on the state clock, as the leader reckons it while it
/// stamps the write at `stamp_ms`: the stamp less the write's age, measured on monotonic clocks
/// from before the write's first prepare (`age`). The apply compares the state clock, which is
/// at least the stamp, with this: so it refuses a write older than its grace by the real time
/// its chunks were protected for, whatever any node's date. A proposal without an age comes
/// from a coordinator of the previous version, whose `prepared_at_ms` is its date: compared
/// with this leader's date, as that version did.
fn prepared_at_on_state_clock(stamp_ms: u64, age: Option<Duration>, coordinator_date_ms: u64, wall_ms: u64) -> u64 {
    let age_ms = match age {
        Some(age) => age.as_millis() as u64,
        None => wall_ms.saturating_sub(coordinator_date_ms),
    };
    stamp_ms.saturating_sub(age_ms)
}

/// The batches this node stamped whose commit has not returned yet. A leader's garbage
/// collection read waits for every batch stamped before it ([`StampedBatches::settled`]): a
/// commit stamped in time must be visible to every orphan check that starts after its stamp,
/// even while it waits for a quorum (read-index alone covers only what is committed).
struct StampedBatches {
    open: Mutex<(u64, BTreeSet<u64>)>,
    /// Every batch numbered below this has settled.
    settled_below: tokio::sync::watch::Sender<u64>,
}

impl Default for StampedBatches {
    fn default() -> Self {
        Self { open: Mutex::default(), settled_below: tokio::sync::watch::channel(0).0 }
    }
}

impl StampedBatches {
    /// Numbers a batch about to be stamped.
    fn open(&self) -> u64 {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let number = open.0;
        open.0 += 1;
        open.1.insert(number);
        number
    }

    /// The batch's commit returned (applied here, or failed).
    fn settle(&self, number: u64) {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        open.1.remove(&number);
        let below = open.1.first().copied().unwrap_or(open.0);
        self.settled_below.send_replace(below);
    }

    /// Every batch numbered before now.
    fn mark(&self) -> u64 {
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).0
    }

    /// Waits until every batch numbered below `mark` has settled, at most `timeout`.
    async fn settled(&self, mark: u64, timeout: Duration) -> Result<(), ApiError> {
        let mut settled = self.settled_below.subscribe();
        let outcome = tokio::time::timeout(timeout, settled.wait_for(|below| *below >= mark)).await.map(|r| r.is_ok());
        match outcome {
            Ok(true) => Ok(()),
            Ok(false) => Err(ApiError::Unavailable("the node is shutting down".into())),
            Err(_) => Err(ApiError::Unavailable(format!("writes stamped earlier did not settle within {timeout:?}"))),
        }
    }
}

/// Group commit: turns concurrent proposals into few Raft entries. openraft 0.9 appends (and
/// fsyncs) each `client_write` on its own, so without this, write throughput would be bounded
/// by one fsync per write.
struct Proposer {
    raft: Raft,
    queue: mpsc::Receiver<PendingProposal>,
    in_flight: Arc<Semaphore>,
    background: Background,
    /// Stamps each batch: only a batch this node commits as leader keeps its stamp, so only the
    /// leader's clock reaches the state (see `clock`).
    clock: Arc<StateClock>,
    stamped: Arc<StampedBatches>,
    metrics: Arc<WriteMetrics>,
}

impl Worker for Proposer {
    fn name(&self) -> String {
        "meta.proposer".into()
    }

    async fn work(&mut self) -> Result<Step, WorkerError> {
        let Some(first) = self.queue.recv().await else { return Ok(Step::Done) };
        let permit = self.in_flight.clone().acquire_owned().await.map_err(|e| WorkerError(e.to_string()))?;
        let mut bytes = first.proposal.approximate_bytes();
        let mut batch = vec![first];
        while batch.len() < BATCH_PROPOSALS_MAX && bytes < BATCH_BYTES_MAX {
            match self.queue.try_recv() {
                Ok(next) => {
                    bytes += next.proposal.approximate_bytes();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        self.commit(batch, permit);
        Ok(Step::Busy)
    }
}

impl Proposer {
    /// Commits one batch in a task of its own, so the next batch gathers meanwhile.
    fn commit(&self, batch: Vec<PendingProposal>, permit: OwnedSemaphorePermit) {
        let raft = self.raft.clone();
        // Numbered before it is stamped, so that an orphan check that starts after the stamp
        // waits for it.
        let number = self.stamped.open();
        let stamped = self.stamped.clone();
        // Stamped here, just before the batch goes to Raft, and not where a proposal was made:
        // a follower's proposal is refused by its Raft and forwarded, and the leader's proposer
        // stamps it again. One stamp for the batch: its proposals are applied as one moment.
        let (now, wall_ms) = (Instant::now(), unix_now_ms());
        let stamp_ms = self.clock.stamp(wall_ms, now);
        let term = self.raft.metrics().borrow().current_term;
        let metrics = self.metrics.clone();
        self.background.spawn(async move {
            let _permit = permit;
            let (proposals, replies): (Vec<Proposal>, Vec<_>) = batch
                .into_iter()
                .map(|mut pending| {
                    pending.proposal.proposed_at_ms = stamp_ms;
                    let age = pending.prepare_age.map(|age| age.at(now));
                    if let Some(prepared_at_ms) = pending.proposal.command.prepared_at_ms_mut() {
                        *prepared_at_ms = prepared_at_on_state_clock(stamp_ms, age, *prepared_at_ms, wall_ms);
                    }
                    (pending.proposal, pending.reply)
                })
                .unzip();
            let n_proposals = proposals.len();
            let handed_to_raft = Instant::now();
            let write = raft.client_write(ProposalBatch { proposals });
            tokio::pin!(write);
            let outcome = tokio::select! {
                biased;
                outcome = &mut write => Some(outcome),
                () = entries_decided_without_answer(raft.metrics(), term) => {
                    // An answer that raced the metrics is taken; otherwise the entry is gone.
                    tokio::time::timeout(Duration::from_millis(100), &mut write).await.ok()
                }
            };
            stamped.settle(number);
            let Some(outcome) = outcome else {
                let error = ApiError::Timeout(
                    "this node lost the leadership while the write was pending, and a snapshot replaced its log \
                     entry: the outcome is unknown (retrying with the same request id is safe)"
                        .into(),
                );
                tracing::warn!(
                    proposals = replies.len(),
                    term,
                    "a batch's entry was replaced by a snapshot unanswered"
                );
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
                return;
            };
            match outcome {
                Ok(response) if response.data.len() == replies.len() => {
                    metrics.batch(n_proposals, handed_to_raft.elapsed());
                    for (reply, result) in replies.into_iter().zip(response.data) {
                        let _ = reply.send(Ok(result));
                    }
                }
                Ok(response) => {
                    let error = ApiError::Internal(format!(
                        "a batch of {} proposals produced {} results",
                        replies.len(),
                        response.data.len()
                    ));
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
                Err(e) => {
                    let error = match e {
                        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                            ApiError::NotLeader { leader: forward.leader_id }
                        }
                        RaftError::APIError(e) => ApiError::Unavailable(e.to_string()),
                        RaftError::Fatal(e) => ApiError::Unavailable(format!("raft stopped: {e}")),
                    };
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        });
    }
}

/// How long the state that decides a deposed leader's pending entries must hold before the
/// batch is given up: far longer than Raft takes to take in a write it was handed (so a write
/// still on its way into Raft is not given up), far shorter than a client's patience.
const ENTRIES_DECIDED_CONFIRM: Duration = Duration::from_secs(2);

/// Whether every entry this node may have appended for a batch proposed in `proposed_term` has
/// met its fate (committed and applied, or truncated away), from one metrics snapshot: the node
/// no longer leads in that term, and it has applied its whole log. An entry it appended lies at
/// or below its last log index unless a conflict truncated it (which answers the writer).
fn entries_decided(proposed_term: u64, metrics: &openraft::RaftMetrics<NodeId, BasicNode>) -> bool {
    let deposed = metrics.current_term != proposed_term || metrics.state != ServerState::Leader;
    let applied = metrics.last_applied.map_or(0, |log_id| log_id.index);
    deposed && applied >= metrics.last_log_index.unwrap_or(0)
}

/// Resolves once a batch proposed in `proposed_term` can no longer be answered by openraft 0.9
/// although it is decided. openraft answers a `client_write` when its entry is applied or
/// truncated, but not when a snapshot install purges it: a leader cut off in a minority, whose
/// few uncommitted entries lie below the snapshot the new leader sends it, would wait forever,
/// holding a batch permit (so this node never proposes again) and an unsettled stamp (so no
/// orphan check anywhere completes). `mendfs chaos` found this (a leader in the minority, then
/// kills). Once the entries are decided and stay so for [`ENTRIES_DECIDED_CONFIRM`], the entry
/// is either in the snapshot's state or gone for good, so the batch may settle: an orphan check
/// after it reads the state either way. Never resolves while Raft runs and the node still leads
/// in that term; pending forever once Raft stops (the write then fails on its own).
async fn entries_decided_without_answer(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, BasicNode>>,
    proposed_term: u64,
) {
    // This resolves a confirmation time after the batch went to Raft at the earliest anyway,
    // so the metrics (which change several times per write, each change a wake-up of every
    // waiting batch) are watched only from then on: the rare give-up comes at most that much
    // later, and a batch answered sooner, nearly every one, costs a timer and no wake-ups.
    tokio::time::sleep(ENTRIES_DECIDED_CONFIRM).await;
    loop {
        if entries_decided(proposed_term, &metrics.borrow_and_update()) {
            tokio::time::sleep(ENTRIES_DECIDED_CONFIRM).await;
            if entries_decided(proposed_term, &metrics.borrow_and_update()) {
                return;
            }
            continue;
        }
        if metrics.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Reads and keep-alives waiting for their leadership confirmation. Bounded: when
/// confirmations cannot keep up, callers wait here (and time out) instead of growing memory.
const CONFIRMATION_QUEUE_LEN_MAX: usize = 4_096;

/// Read-index on `raft`: confirms with a quorum that this node still leads, then waits until its
/// state machine has applied everything committed before, within `timeout`. A round in which
/// too few voters answered in time (each has one heartbeat interval: a busy node, a dead one
/// beside it) is tried again until the deadline, not answered `Unavailable` at once: the next
/// round may well succeed, and each round starts after the read arrived, so a later one is
/// just as safe.
async fn read_index(raft: &Raft, timeout: Duration) -> Result<(), ApiError> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, raft.ensure_linearizable()).await {
            Err(_) => {
                return Err(ApiError::Timeout(format!(
                    "could not confirm leadership with a quorum within {timeout:?} (is a majority of nodes reachable?)"
                )))
            }
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(forward)))) => {
                return Err(ApiError::NotLeader { leader: forward.leader_id })
            }
            Ok(Err(RaftError::APIError(e @ openraft::error::CheckIsLeaderError::QuorumNotEnough(_)))) => {
                if Instant::now() + backoff >= deadline {
                    return Err(ApiError::Unavailable(e.to_string()));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
            Ok(Err(RaftError::Fatal(e))) => return Err(ApiError::Unavailable(format!("raft stopped: {e}"))),
        }
    }
}

/// Confirms leadership for linearizable reads and keep-alives, many at once, as group commit
/// does for writes: every one waiting when a round starts shares one read-index (one heartbeat
/// to each voter, where openraft sends one per call), and one that arrives during a round waits
/// for the next. Either way the round that answers it started after it arrived, so its read
/// index is at least the commit index at its arrival and the quorum it heard from was asked
/// after it: that is what makes a read linearizable and a keep-alive's acknowledgement safe
/// (see the keep-alive in `serve_locally`).
struct LeadershipConfirmer {
    raft: Raft,
    timeout: Duration,
    queue: mpsc::Receiver<oneshot::Sender<Result<(), ApiError>>>,
}

impl Worker for LeadershipConfirmer {
    fn name(&self) -> String {
        "meta.leadership_confirmer".into()
    }

    async fn work(&mut self) -> Result<Step, WorkerError> {
        let Some(waiting) = next_round(&mut self.queue, CONFIRMATION_QUEUE_LEN_MAX).await else {
            return Ok(Step::Done);
        };
        let outcome = read_index(&self.raft, self.timeout).await;
        for reply in waiting {
            let _ = reply.send(outcome.clone());
        }
        Ok(Step::Busy)
    }
}

/// The callers a shared round answers: the next one to arrive, and every other already
/// waiting (at most `max`). None once the queue is closed.
async fn next_round<T>(queue: &mut mpsc::Receiver<T>, max: usize) -> Option<Vec<T>> {
    let mut waiting = vec![queue.recv().await?];
    while waiting.len() < max {
        match queue.try_recv() {
            Ok(next) => waiting.push(next),
            Err(_) => break,
        }
    }
    Some(waiting)
}

/// Callers waiting for this node's state to catch up with the leader. Bounded: a caller that
/// finds the queue full is answered at once (see [`CatchUpQueue::catch_up`]).
const CATCH_UP_QUEUE_LEN_MAX: usize = 4_096;

/// The way to [`StateCatchUp`]: waits until this node has applied every write acknowledged
/// before the call, wherever it was acknowledged.
#[derive(Clone)]
pub(crate) struct CatchUpQueue {
    queue: mpsc::Sender<oneshot::Sender<Result<(), ApiError>>>,
    freshness: Arc<Freshness>,
}

/// How recent this node's view of who may do what must be to admit a caller on it: a caller
/// whose rights were taken away (a token revoked, an S3 key deleted, a grant lowered) is
/// refused on every node once the change has been acknowledged for this long
/// ([`RIGHTS_REDUCED_WAIT`]). A node checks with the leader at most this often while it
/// serves callers, and in the background before it has to.
pub const RIGHTS_STATE_MAX_AGE: Duration = Duration::from_secs(1);

/// How long a change that takes rights away waits after it commits before it is acknowledged:
/// [`RIGHTS_STATE_MAX_AGE`], with room for the nodes' clocks running at slightly different
/// rates and for scheduling.
pub const RIGHTS_REDUCED_WAIT: Duration = Duration::from_millis(1_200);

/// When this node last knew itself caught up with the leader.
#[derive(Default)]
struct Freshness {
    /// The start of the latest catch-up round that succeeded: everything acknowledged before
    /// that instant had been applied here when the round ended.
    caught_up_since: std::sync::Mutex<Option<Instant>>,
    /// A round asked for in the background and not yet run.
    refresh_pending: std::sync::atomic::AtomicBool,
}

impl Freshness {
    fn age(&self) -> Option<Duration> {
        self.caught_up_since.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).map(|since| since.elapsed())
    }

    fn caught_up(&self, round_started: Instant) {
        let mut since = self.caught_up_since.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *since = Some(since.map_or(round_started, |since| since.max(round_started)));
    }
}

impl CatchUpQueue {
    /// Returns once this node's state includes every write acknowledged more than `max_age`
    /// ago: at once when a catch-up round that started within `max_age` succeeded (and a
    /// round is started in the background once half of it has passed, so that a node serving
    /// steady traffic rarely makes a caller wait), otherwise after a round.
    pub(crate) async fn caught_up_within(&self, max_age: Duration) -> Result<(), ApiError> {
        if self.fresh_within(max_age) {
            return Ok(());
        }
        self.catch_up().await
    }

    /// Whether [`CatchUpQueue::caught_up_within`] would return at once; starts the background
    /// round as it would.
    pub(crate) fn fresh_within(&self, max_age: Duration) -> bool {
        match self.freshness.age() {
            Some(age) if age <= max_age / 2 => true,
            Some(age) if age <= max_age => {
                if !self.freshness.refresh_pending.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    // The answer goes nowhere: the round only moves `caught_up_since`.
                    let (reply, _) = oneshot::channel();
                    if self.queue.try_send(reply).is_err() {
                        self.freshness.refresh_pending.store(false, std::sync::atomic::Ordering::Release);
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Waits for a catch-up round that started after this call. A full queue is an error
    /// at once, not a wait: strangers can send unknown tokens and made-up S3 key ids as fast
    /// as they like, and a caller with a valid token on a view too old to trust is better told
    /// `unavailable` (and retries) than queued without bound.
    pub(crate) async fn catch_up(&self) -> Result<(), ApiError> {
        let (reply, answer) = oneshot::channel();
        self.queue.try_send(reply).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::Unavailable("the catch-up queue is full".into()),
            mpsc::error::TrySendError::Closed(_) => ApiError::Unavailable("the node is shutting down".into()),
        })?;
        answer.await.map_err(|_| ApiError::Unavailable("the node is shutting down".into()))?
    }
}

/// Brings this node's applied state up to the leader's, many callers at once: every caller
/// waiting when a round starts shares its one read-index (one forward to the leader, which
/// shares its confirmation in turn), so a flood of unknown tokens costs the leader a call
/// per round trip, not one each. The round that answers a caller started after it asked,
/// so its index covers every write acknowledged before the caller asked.
struct StateCatchUp {
    node: MetaNode,
    queue: mpsc::Receiver<oneshot::Sender<Result<(), ApiError>>>,
}

impl Worker for StateCatchUp {
    fn name(&self) -> String {
        "meta.state_catch_up".into()
    }

    async fn work(&mut self) -> Result<Step, WorkerError> {
        let Some(waiting) = next_round(&mut self.queue, CATCH_UP_QUEUE_LEN_MAX).await else { return Ok(Step::Done) };
        let freshness = self.node.catch_ups.freshness.clone();
        freshness.refresh_pending.store(false, std::sync::atomic::Ordering::Release);
        let started = Instant::now();
        let outcome = self.node.catch_up_round().await;
        if outcome.is_ok() {
            freshness.caught_up(started);
        }
        for reply in waiting {
            let _ = reply.send(outcome.clone());
        }
        Ok(Step::Busy)
    }
}

/// What the leader does on its own: record the cluster id once, and expire sessions whose
/// keep-alives stopped.
struct LeaderDuties {
    node: MetaNode,
    led_in_term: Option<u64>,
    /// The term in which this leader's configured limits were found committed (or committed).
    limits_agreed_in_term: Option<u64>,
}

impl Worker for LeaderDuties {
    fn name(&self) -> String {
        "meta.leader_duties".into()
    }

    async fn work(&mut self) -> Result<Step, WorkerError> {
        const TICK: Duration = Duration::from_millis(100);
        let node = &self.node;
        if node.raft.metrics().borrow().state == ServerState::Shutdown {
            return Ok(Step::Done);
        }
        // Session clocks belong to one leadership term: losing leadership, even for less
        // than a tick (a new term), restarts every session's clock, so keep-alives sent to
        // an interim leader are never held against a client.
        let term = node.term();
        if !node.is_leader() {
            self.led_in_term = None;
            return Ok(Step::Idle(TICK));
        }
        if self.led_in_term != Some(term) {
            if let Ok(mut clocks) = node.sessions.lock() {
                clocks.clear();
            }
            self.led_in_term = Some(term);
        }
        if node.state.cluster_id().is_none() {
            let cluster_id = format!("{:032x}", rand::random::<u128>());
            if let Err(e) = node.propose(MetaNode::proposal(None, Command::InitCluster { cluster_id })).await {
                tracing::warn!("recording the cluster id: {e}");
            }
        }
        if self.limits_agreed_in_term != Some(term) {
            match node.agree_on_limits().await {
                Ok(()) => self.limits_agreed_in_term = Some(term),
                Err(e) => tracing::warn!("recording the cluster limits: {e}"),
            }
        }
        if let Err(e) = node.expire_sessions().await {
            tracing::warn!("session expiry: {e}");
        }
        Ok(Step::Idle(TICK))
    }
}

/// The leader's queued chunk-set work, one bounded step at a time: while a released chunk set
/// (a deleted or overwritten file's, an aborted upload's) or an expired upload waits, it
/// proposes `ReleaseChunks`, whose apply drops about a segment's worth of references. One at a
/// time, so a big delete never crowds the log.
struct ChunkReleaser {
    node: MetaNode,
}

/// How often the leader looks for released chunk sets and expired uploads when it found none.
const RELEASE_CHECK_EVERY: Duration = Duration::from_millis(250);

impl Worker for ChunkReleaser {
    fn name(&self) -> String {
        "meta.chunk_release".into()
    }

    async fn work(&mut self) -> Result<Step, WorkerError> {
        let node = &self.node;
        if node.raft.metrics().borrow().state == ServerState::Shutdown {
            return Ok(Step::Done);
        }
        if !node.is_leader() {
            return Ok(Step::Idle(RELEASE_CHECK_EVERY));
        }
        // By the state clock, which the apply compares with: this leader's next stamp.
        let now_ms = node.state.clock().peek(unix_now_ms(), Instant::now());
        let initiated_before_ms = now_ms.saturating_sub(node.config.s3_upload_expiry_ms);
        let (release, expire) = node
            .state
            .view()
            .and_then(|view| {
                Ok((
                    files::release_pending(&view, now_ms)?,
                    crate::s3::expired_multipart_pending(&view, initiated_before_ms)?,
                ))
            })
            .map_err(|e| WorkerError(e.to_string()))?;
        // Expired S3 uploads first: aborting them queues their parts for release.
        let command = match (expire, release) {
            (true, _) => Command::S3ExpireMultipart { initiated_before_ms },
            (false, true) => Command::ReleaseChunks,
            (false, false) => return Ok(Step::Idle(RELEASE_CHECK_EVERY)),
        };
        match node.propose(MetaNode::proposal(None, command)).await {
            Ok(_) => Ok(Step::Busy),
            Err(e) => {
                tracing::warn!("releasing chunk references: {e}");
                Ok(Step::Idle(RELEASE_CHECK_EVERY))
            }
        }
    }
}

/// A running metadata node; cheap to clone.
#[derive(Clone)]
pub struct MetaNode {
    pub(crate) config: Arc<MetaConfig>,
    pub(crate) raft: Raft,
    pub(crate) state: StateReader,
    pub(crate) peers: Peers,
    sessions: Arc<Mutex<SessionClocks>>,
    proposer: mpsc::Sender<PendingProposal>,
    /// Reads and keep-alives on their way to a leadership confirmation ([`LeadershipConfirmer`]).
    confirmations: mpsc::Sender<oneshot::Sender<Result<(), ApiError>>>,
    /// Callers waiting for this node's state to reach the leader's ([`StateCatchUp`]).
    catch_ups: CatchUpQueue,
    /// What this node knows of its peers' monotonic clocks (from their calls to it).
    pub(crate) peer_clocks: Arc<PeerClocks>,
    /// Batches stamped and not yet settled, which an orphan check waits for.
    stamped: Arc<StampedBatches>,
    /// Raft's committed index on this node (for metrics).
    committed_index: Arc<AtomicU64>,
    leader_changes: Arc<AtomicU64>,
    files: FilesInUse,
    write_metrics: Arc<WriteMetrics>,
}

/// Whether a stopped node's database files are closed: every handle to them (a connection
/// task, one of openraft's, a worker's) has been dropped, so the same directory can be opened
/// again at once, by this process or another.
#[derive(Clone)]
pub struct FilesInUse {
    databases: Arc<[crate::raft_store::DatabaseClosed]>,
}

impl FilesInUse {
    pub fn released(&self) -> bool {
        self.databases.iter().all(|database| database.is_closed())
    }
}

impl MetaNode {
    /// Opens the Raft log and state in `config.data_dir`, starts Raft, and runs the node's
    /// background work (group commit, leader duties) on `background`. Stop with
    /// [`MetaNode::shutdown`] and then `background.stop()`.
    pub async fn start(config: MetaConfig, background: &Background) -> Result<Self, String> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| format!("create data dir {}: {e}", config.data_dir.display()))?;
        // Fixes this process's monotonic origin before any moment is named to a peer.
        tracing::debug!(incarnation = clock::incarnation(), "process clock");
        let write_metrics = Arc::new(WriteMetrics::default());
        let mut log_store = RaftLogStore::open(&config.data_dir, config.node_id).map_err(|e| e.to_string())?;
        log_store.observe_into(&write_metrics);
        let durable_log = log_store.durable_log();
        log_store.give_up_own_leadership(config.node_id).map_err(|e| e.to_string())?;
        let committed_index = log_store.committed_index();
        let mut state_machine = StateMachineStore::open(&config.data_dir).map_err(|e| e.to_string())?;
        state_machine.follow_log_durability(durable_log.clone());
        state_machine.observe_into(write_metrics.clone());
        let state = state_machine.reader();
        let files = FilesInUse { databases: Arc::new([log_store.database_closed(), state.database_closed()]) };
        let peers = Peers::new(config.node_id, config.secret.as_deref(), config.peer_tls.as_ref(), state.clone())?;

        let raft_config = Config {
            cluster_name: "mendfs".to_string(),
            heartbeat_interval: config.heartbeat_interval_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries),
            max_in_snapshot_log_to_keep: config.log_entries_kept_after_snapshot,
            purge_batch_size: 64,
            max_payload_entries: APPEND_ENTRIES_MAX,
            ..Default::default()
        };
        let raft_config = Arc::new(raft_config.validate().map_err(|e| format!("raft config: {e}"))?);
        let raft = Raft::new(
            config.node_id,
            raft_config,
            NetworkFactory {
                peers: peers.clone(),
                durable_log,
                retry_unreachable_every: Duration::from_millis(config.heartbeat_interval_ms),
                metrics: write_metrics.clone(),
            },
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| format!("start raft: {e}"))?;

        let (proposer, queue) = mpsc::channel(PROPOSAL_QUEUE_LEN_MAX);
        let stamped = Arc::new(StampedBatches::default());
        // The proposer ends when the node stops; Raft failing under it fails each batch, not it.
        background.spawn_worker(
            Proposer {
                raft: raft.clone(),
                queue,
                in_flight: Arc::new(Semaphore::new(BATCHES_IN_FLIGHT_MAX)),
                background: background.clone(),
                clock: state.clock().clone(),
                stamped: stamped.clone(),
                metrics: write_metrics.clone(),
            },
            OnFailure::StopNode,
        );
        let (confirmations, confirmation_queue) = mpsc::channel(CONFIRMATION_QUEUE_LEN_MAX);
        background.spawn_worker(
            LeadershipConfirmer {
                raft: raft.clone(),
                timeout: Duration::from_millis(config.write_timeout_ms),
                queue: confirmation_queue,
            },
            OnFailure::StopNode,
        );
        let (catch_ups, catch_up_queue) = mpsc::channel(CATCH_UP_QUEUE_LEN_MAX);
        let node = MetaNode {
            config: Arc::new(config),
            raft,
            state,
            peers,
            sessions: Arc::default(),
            proposer,
            confirmations,
            catch_ups: CatchUpQueue { queue: catch_ups, freshness: Arc::default() },
            peer_clocks: Arc::default(),
            stamped,
            committed_index,
            leader_changes: Arc::default(),
            files,
            write_metrics,
        };
        if let Err(e) = node.initialize_once().await {
            node.shutdown().await;
            return Err(e);
        }
        background.spawn_worker(
            LeaderDuties { node: node.clone(), led_in_term: None, limits_agreed_in_term: None },
            OnFailure::Restart,
        );
        background.spawn_worker(ChunkReleaser { node: node.clone() }, OnFailure::Restart);
        background.spawn_worker(StateCatchUp { node: node.clone(), queue: catch_up_queue }, OnFailure::Restart);
        background.spawn(node.clone().count_leader_changes(background.stopping()));
        Ok(node)
    }

    /// Stops Raft: this node stops voting, replicating and applying. Its background work ends
    /// with the node's `Background`.
    /// Tells when this node's database files are closed, after a stop.
    pub fn files_in_use(&self) -> FilesInUse {
        self.files.clone()
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
    }

    /// Bootstraps the cluster from `--peers` exactly once: only the lowest-id peer does it, only
    /// when its log is empty. A restarted node has a log and skips this, so a restart with the
    /// same flags never re-initializes.
    async fn initialize_once(&self) -> Result<(), String> {
        let Some((&first_id, _)) = self.config.initial_peers.iter().next() else {
            return Ok(());
        };
        if first_id != self.config.node_id {
            return Ok(());
        }
        if self.raft.is_initialized().await.map_err(|e| e.to_string())? {
            return Ok(());
        }
        let members: BTreeMap<NodeId, BasicNode> =
            self.config.initial_peers.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
        tracing::info!(?members, "initializing a new cluster");
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            // Another start already did it (the log is no longer empty): nothing to do.
            Err(RaftError::APIError(e)) => {
                tracing::info!("cluster already initialized: {e}");
                Ok(())
            }
            Err(e) => Err(format!("initialize cluster: {e}")),
        }
    }

    pub fn id(&self) -> NodeId {
        self.config.node_id
    }

    pub fn config(&self) -> &MetaConfig {
        &self.config
    }

    /// Channels to other nodes, with the cluster secret and id on every call.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    pub fn cluster_id(&self) -> Option<String> {
        self.state.cluster_id()
    }

    pub fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics.current_leader == Some(self.config.node_id) && metrics.state == ServerState::Leader
    }

    pub fn leader_id(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The current leader's address, if known.
    pub fn leader_addr(&self) -> Option<String> {
        self.member_addr(self.leader_id()?)
    }

    /// The Raft term this node is in.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Every member of the metadata cluster (voters and learners).
    pub fn member_ids(&self) -> BTreeSet<NodeId> {
        self.raft.metrics().borrow().membership_config.membership().nodes().map(|(id, _)| *id).collect()
    }

    /// Where this node's metadata writes spend their time (see `write_metrics`).
    pub fn write_metrics(&self) -> &WriteMetrics {
        &self.write_metrics
    }

    /// Leader changes this node has seen (a new leader known, whoever it is).
    pub fn leader_changes(&self) -> u64 {
        self.leader_changes.load(Ordering::Relaxed)
    }

    pub fn raft_status(&self) -> RaftStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        RaftStatus {
            role: match metrics.state {
                ServerState::Leader => Role::Leader,
                ServerState::Follower => Role::Follower,
                ServerState::Candidate => Role::Candidate,
                ServerState::Learner => Role::Learner,
                ServerState::Shutdown => Role::Shutdown,
            },
            term: metrics.current_term,
            leader: metrics.current_leader,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            committed_index: self.committed_index.load(Ordering::Relaxed),
            applied_index: metrics.last_applied.map_or(0, |id| id.index),
            snapshot_index: metrics.snapshot.map_or(0, |id| id.index),
            purged_index: metrics.purged.map_or(0, |id| id.index),
            stopped: metrics.running_state.as_ref().err().map(|e| e.to_string()),
            members: membership.nodes().map(|(id, node)| (*id, node.addr.clone())).collect(),
            voters: membership.voter_ids().collect(),
        }
    }

    /// The cluster-wide revision this node's state machine has reached.
    /// The coordination keyspace's usage and limits as this node's state machine knows them.
    pub fn kv_usage(&self) -> Result<(crate::schema::KvUsage, u64), ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        let usage = schema::kv_usage(&view).map_err(ApiError::internal)?;
        Ok((usage, schema::compacted_revision(&view).map_err(ApiError::internal)?))
    }

    pub fn revision(&self) -> u64 {
        self.state.view().ok().and_then(|view| schema::current_revision(&view).ok()).unwrap_or(0)
    }

    async fn count_leader_changes(self, stopping: tokio_util::sync::WaitForCancellationFutureOwned) {
        // The server metrics change with the leadership only; the full metrics change several
        // times per write, and each change would wake this task.
        let mut metrics = self.raft.server_metrics();
        let mut last = metrics.borrow().current_leader;
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                _ = &mut stopping => return,
                changed = metrics.changed() => if changed.is_err() { return },
            }
            let now = metrics.borrow().current_leader;
            if now != last {
                if now.is_some() {
                    self.leader_changes.fetch_add(1, Ordering::Relaxed);
                }
                last = now;
            }
        }
    }

    /// A member's address from the current membership (borrowed, not cloned: this runs on
    /// every forwarded request and every reply hint).
    fn member_addr(&self, id: NodeId) -> Option<String> {
        self.raft.metrics().borrow().membership_config.membership().get_node(&id).map(|node| node.addr.clone())
    }

    /// Serves a leader-only request here if this node leads, otherwise forwards it to the
    /// leader (once: a forwarded request is never forwarded again).
    pub(crate) async fn serve_on_leader(
        &self,
        request: LeaderRequest,
        origin: Origin,
    ) -> Result<LeaderResponse, ApiError> {
        self.serve_on_leader_aged(request, origin, None).await
    }

    /// [`MetaNode::serve_on_leader`] for a proposal that references prepared chunks, with the
    /// age of its write, which travels with it to the leader's stamp.
    pub(crate) async fn serve_on_leader_aged(
        &self,
        request: LeaderRequest,
        origin: Origin,
        prepare_age: Option<Age>,
    ) -> Result<LeaderResponse, ApiError> {
        let mut waited = false;
        loop {
            // The leader this node knew and could not use, if any: the request waits (once)
            // for another rather than failing back to the client, which would retry only
            // after its backoff.
            let (failed, unusable) = match self.serve_locally(request.clone(), prepare_age).await {
                Err(ApiError::NotLeader { leader: Some(leader) })
                    if !origin.forwarded && leader != self.config.node_id =>
                {
                    match self.forward(leader, &request, origin.deadline, prepare_age).await {
                        Err(ApiError::Unavailable(e)) => (ApiError::Unavailable(e), Some(leader)),
                        other => return other,
                    }
                }
                Err(ApiError::NotLeader { leader: None }) if !origin.forwarded => {
                    (ApiError::NotLeader { leader: None }, None)
                }
                other => return other,
            };
            // Trying again is safe: a proposal carries its request id, which the state machine
            // deduplicates (the client would send the same one again), and the rest are reads.
            if waited || !self.wait_for_leader_other_than(unusable, origin.deadline).await {
                return Err(failed);
            }
            waited = true;
        }
    }

    /// Waits until this node knows a leader other than `unusable` (the one a request could not
    /// reach), for at most the time an election takes after a leader dies (the leader lease,
    /// an election timeout and a vote, with room for one split vote) and never past
    /// `deadline`. Whether one appeared. A leader that is only slow does not change, so a
    /// request to it fails at the bound, as it would have at once.
    async fn wait_for_leader_other_than(&self, unusable: Option<NodeId>, deadline: Option<Instant>) -> bool {
        let bound = Duration::from_millis(self.config.election_timeout_max_ms.saturating_mul(4));
        let until = deadline.map_or(Instant::now() + bound, |deadline| deadline.min(Instant::now() + bound));
        let mut metrics = self.raft.server_metrics();
        let changed =
            metrics.wait_for(|metrics| metrics.current_leader.is_some() && metrics.current_leader != unusable);
        let appeared = matches!(tokio::time::timeout_at(until.into(), changed).await, Ok(Ok(_)));
        appeared
    }

    /// Sends `request` to the leader in an envelope with a deadline, which the leader checks on
    /// arrival. The deadline is never later than the caller's own: a caller that has given up
    /// has reported a failure, and a request still waiting in a paused leader's socket must not
    /// turn that into a success when the leader resumes.
    async fn forward(
        &self,
        leader: NodeId,
        request: &LeaderRequest,
        caller_deadline: Option<Instant>,
        prepare_age: Option<Age>,
    ) -> Result<LeaderResponse, ApiError> {
        let Some(addr) = self.member_addr(leader) else {
            return Err(ApiError::NotLeader { leader: Some(leader) });
        };
        let mut client = self.peers.client(&addr).map_err(ApiError::Unavailable)?;
        let own = Duration::from_millis(self.config.write_timeout_ms + 1_000);
        let now = Instant::now();
        let timeout = caller_deadline.map_or(own, |deadline| own.min(deadline.saturating_duration_since(now)));
        if timeout.is_zero() {
            return Err(ApiError::Timeout("the caller's deadline passed before the request could be forwarded".into()));
        }
        // Read before the call starts, so the leader counts the request as sent no later than it
        // was, and gives up no later than this node does.
        let sent_at = self.peer_clocks.on_peer_clock(leader, now);
        let envelope = ForwardEnvelope::new(request.clone(), timeout, sent_at, prepare_age.map(|age| age.at(now)));
        let data = schema::encode(&envelope).map_err(ApiError::internal)?;
        let mut grpc_request = tonic::Request::new(RaftPayload { data });
        grpc_request.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::AsciiMetadataValue::from_static("1"));
        grpc_request.set_timeout(timeout);
        let reply = tokio::time::timeout(timeout, client.forward(grpc_request))
            .await
            .map_err(|_| ApiError::Timeout(format!("leader {leader} at {addr} did not answer within {timeout:?}")))?
            .map_err(|status| match status.code() {
                // `Unknown` is how a call that lost its connection midway ends ("transport
                // error"): a leader killed while serving it. Its outcome is unknown, and the
                // caller may try again (a write's request id makes that safe), as it would had
                // it called the leader itself; `Internal` would end the caller's write for good.
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown => {
                    ApiError::Unavailable(format!("leader {leader} at {addr}: {}", status.message()))
                }
                _ => ApiError::Internal(format!("leader {leader} at {addr}: {}", status.message())),
            })?;
        let result: Result<LeaderResponse, ApiError> =
            schema::decode(&reply.into_inner().data).map_err(ApiError::internal)?;
        result
    }

    async fn serve_locally(
        &self,
        request: LeaderRequest,
        prepare_age: Option<Age>,
    ) -> Result<LeaderResponse, ApiError> {
        match request {
            LeaderRequest::Propose(proposal) => {
                // Here, not only where clients enter: a forwarded proposal has seen no other check.
                crate::validate::check_command(&self.config, &proposal.command)?;
                let closing = match &proposal.command {
                    Command::SessionClose { session_id } | Command::SessionExpire { session_id } => Some(*session_id),
                    _ => None,
                };
                let result = self.propose_aged(proposal, prepare_age).await?;
                if let Ok(mut clocks) = self.sessions.lock() {
                    // A session's clock starts when its open commits, not when the next read
                    // of the sessions table finds it, and ends with it.
                    if let Ok(Outcome::SessionOpened { session_id, ttl_ms }) = &result {
                        clocks.set(*session_id, Instant::now() + Duration::from_millis(*ttl_ms));
                    }
                    if let (Some(session_id), Ok(_)) = (closing, &result) {
                        clocks.forget(session_id);
                    }
                }
                Ok(LeaderResponse::Command(result))
            }
            LeaderRequest::Get { key } => {
                self.linearizable_barrier().await?;
                let view = self.state.view().map_err(ApiError::internal)?;
                let kv = kv::get_key(&view, &key).map_err(ApiError::internal)?.map(|record| KeyValue { key, record });
                Ok(LeaderResponse::Get { revision: schema::current_revision(&view).map_err(ApiError::internal)?, kv })
            }
            LeaderRequest::List { prefix, limit } => self.list_page(prefix, Vec::new(), limit).await,
            LeaderRequest::ListFrom { prefix, start_key, limit } => self.list_page(prefix, start_key, limit).await,
            LeaderRequest::KeepAlive { session_id } => {
                if !self.is_leader() {
                    return Err(ApiError::NotLeader { leader: self.leader_id() });
                }
                // A leader cut off from the majority still believes it leads (openraft 0.9 has
                // no check-quorum), while the majority elects another and expires the session
                // on its own clock. An acknowledgement from such a leader would tell the client
                // its session lives when it may not, so a keep-alive is acknowledged only after
                // a quorum confirmed this node's leadership, in a round that started after the
                // keep-alive arrived: any later leader was elected after that, and gives the
                // session a full TTL from its election (see `SessionClocks`).
                self.confirm_leadership().await?;
                let view = self.state.view().map_err(ApiError::internal)?;
                let Some(session) = kv::get_session(&view, session_id).map_err(ApiError::internal)? else {
                    return Err(ApiError::Command(CommandError::SessionNotFound { session_id }));
                };
                let mut clocks = self.sessions.lock().map_err(|_| ApiError::internal("session clocks poisoned"))?;
                clocks.set(session_id, Instant::now() + Duration::from_millis(session.ttl_ms));
                Ok(LeaderResponse::KeepAlive { ttl_ms: session.ttl_ms })
            }
            LeaderRequest::FileChunks { path, version, from_index, limit } => {
                self.linearizable_barrier().await?;
                // Off the async workers: a page reads up to a segment's worth of chunk records.
                let page = self.read_state(move |view| file_chunk_page(view, path, version, from_index, limit)).await?;
                Ok(LeaderResponse::FileChunks(page))
            }
            LeaderRequest::ListFiles { prefix, limit } => {
                self.linearizable_barrier().await?;
                let limit = if limit == 0 { self.config.list_limit_max } else { limit.min(self.config.list_limit_max) };
                // A scan of up to `limit` file records: off the async workers.
                self.read_state(move |view| {
                    let (found, truncated) =
                        files::list_files(view, &prefix, limit as usize).map_err(ApiError::internal)?;
                    let files = found.into_iter().map(|(path, record)| FileView { path, record }).collect();
                    Ok(LeaderResponse::Files { files, truncated })
                })
                .await
            }
            LeaderRequest::StorageNodes => {
                self.linearizable_barrier().await?;
                Ok(LeaderResponse::StorageNodes(self.storage_nodes()?))
            }
            LeaderRequest::InlineChunk { hash } => {
                // The asker's page came from a linearizable read: once the leader has applied
                // up to its commit index, it holds every row that page could name.
                self.linearizable_barrier().await?;
                let view = self.state.view().map_err(ApiError::internal)?;
                let record = files::get_inline_chunk(&view, &hash).map_err(ApiError::internal)?;
                Ok(LeaderResponse::InlineChunk(record.map(|record| record.data)))
            }
            LeaderRequest::Stripe { chunk } => {
                // As for inline chunks: the asker's page came from a linearizable read.
                self.linearizable_barrier().await?;
                let view = self.state.view().map_err(ApiError::internal)?;
                Ok(LeaderResponse::Stripe(crate::stripes::get_stripe(&view, &chunk).map_err(ApiError::internal)?))
            }
            LeaderRequest::Policies => {
                self.linearizable_barrier().await?;
                let view = self.state.view().map_err(ApiError::internal)?;
                Ok(LeaderResponse::Policies(crate::policy::list_policies(&view).map_err(ApiError::internal)?))
            }
            LeaderRequest::RedeemLogin { code_hash, session_name, session_hash } => {
                // A code nobody issued costs a read here, never a log entry: the login
                // endpoint is open to strangers, who may try any number of codes.
                self.linearizable_barrier().await?;
                let known = {
                    let view = self.state.view().map_err(ApiError::internal)?;
                    crate::login::code_exists(&view, &code_hash).map_err(ApiError::internal)?
                };
                if !known {
                    return Ok(LeaderResponse::Redeemed {
                        result: Err(CommandError::LoginCodeInvalid),
                        applied_index: 0,
                    });
                }
                let command =
                    Command::Login(crate::login::LoginCommand::Redeem { code_hash, session_name, session_hash });
                let result = self.propose_aged(Self::proposal(None, command), None).await?;
                let applied_index = self.raft.metrics().borrow().last_applied.map_or(0, |id| id.index);
                Ok(LeaderResponse::Redeemed { result, applied_index })
            }
            LeaderRequest::ReadIndex => {
                self.linearizable_barrier().await?;
                let applied_index = self.raft.metrics().borrow().last_applied.map_or(0, |id| id.index);
                Ok(LeaderResponse::ReadIndex { applied_index })
            }
            LeaderRequest::S3(read) => {
                self.linearizable_barrier().await?;
                // Pages, listings and key lists read up to thousands of rows: off the async
                // workers.
                let answer = self.read_state(move |view| s3_api::answer(view, read)).await?;
                Ok(LeaderResponse::S3(answer))
            }
            LeaderRequest::Jobs(read) => {
                self.linearizable_barrier().await?;
                // A listing or a results page reads up to a thousand rows: off the async workers.
                let answer = self.read_state(move |view| jobs_api::answer(view, read)).await?;
                Ok(LeaderResponse::Jobs(answer))
            }
            LeaderRequest::RetiredGetFile | LeaderRequest::RetiredListFiles => Err(ApiError::InvalidArgument(
                "whole chunk lists are no longer served; files are read a page at a time (upgrade this node)".into(),
            )),
            LeaderRequest::UnreferencedChunks { node_id, hashes } => {
                // First every batch this node stamped before the check: a commit stamped in
                // time is applied (and seen below) or failed; one stamped later had its age
                // checked when stamped (`docs/design/garbage-collection.md`).
                let mark = self.stamped.mark();
                self.stamped.settled(mark, Duration::from_millis(self.config.write_timeout_ms)).await?;
                // Read-index: the answer reflects every commit acknowledged before it, so a
                // chunk reported unreferenced here was not referenced on this node by any
                // committed file at that moment.
                self.linearizable_barrier().await?;
                // One lookup per hash a collector asks about: off the async workers.
                self.read_state(move |view| {
                    let mut unreferenced = Vec::new();
                    for hash in hashes {
                        let listed = files::listed_on(view, &hash, node_id).map_err(ApiError::internal)?;
                        if !listed {
                            unreferenced.push(hash);
                        }
                    }
                    Ok(LeaderResponse::Unreferenced(unreferenced))
                })
                .await
            }
            LeaderRequest::RetiredHealth => Err(ApiError::InvalidArgument(
                "the health view is no longer forwarded this way; ask Cluster.Status (upgrade this node)".into(),
            )),
            LeaderRequest::Drain { id, draining } => {
                self.propose_here(Command::SetDraining { node_id: id, draining }).await?;
                Ok(LeaderResponse::Drained)
            }
            LeaderRequest::AddNode { id, addr, learner } => self.add_node(id, addr, learner).await,
            LeaderRequest::RemoveNode { id } => self.remove_node(id).await,
        }
    }

    /// Read-index: confirms leadership with a quorum and waits until the state machine has
    /// applied everything committed before the read arrived, so the read sees every write that
    /// completed before it (no clock assumption, unlike a leader lease). The round is shared
    /// with every read and keep-alive waiting when it starts ([`LeadershipConfirmer`]).
    async fn linearizable_barrier(&self) -> Result<(), ApiError> {
        self.confirm_leadership().await
    }

    /// The way for this node's gate to wait for its state to catch up with the leader's.
    pub(crate) fn catch_up_queue(&self) -> CatchUpQueue {
        self.catch_ups.clone()
    }

    /// Waits until this node has applied every write acknowledged before the call, through
    /// whichever node: local reads after it see them. One round is shared by every caller
    /// waiting when it starts.
    pub async fn catch_up(&self) -> Result<(), ApiError> {
        self.catch_ups.catch_up().await
    }

    /// Waits, when it has to, until this node's view of callers' rights is recent enough to
    /// admit a caller on it (see [`RIGHTS_STATE_MAX_AGE`]).
    pub async fn rights_state_fresh(&self) -> Result<(), ApiError> {
        self.catch_ups.caught_up_within(RIGHTS_STATE_MAX_AGE).await
    }

    /// Holds the acknowledgement of a change that took rights away until no node can still
    /// admit a caller on a view from before it (see [`RIGHTS_STATE_MAX_AGE`]).
    async fn rights_reduced(&self) {
        tokio::time::sleep(RIGHTS_REDUCED_WAIT).await;
    }

    /// One catch-up round: the leader's read index, then this node's apply up to it.
    async fn catch_up_round(&self) -> Result<(), ApiError> {
        let applied_index = match self.serve_on_leader(LeaderRequest::ReadIndex, Origin::LOCAL).await? {
            LeaderResponse::ReadIndex { applied_index } => applied_index,
            other => return Err(unexpected("a read index", other)),
        };
        let timeout = Duration::from_millis(self.config.write_timeout_ms);
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(applied_index), "the leader's read index")
            .await
            .map_err(|e| ApiError::Timeout(format!("this node did not apply up to index {applied_index}: {e}")))?;
        Ok(())
    }

    /// A read-index round that started after this call, shared by every read and keep-alive
    /// waiting when it starts (see [`LeadershipConfirmer`]).
    async fn confirm_leadership(&self) -> Result<(), ApiError> {
        let timeout = Duration::from_millis(self.config.write_timeout_ms);
        let (reply, answer) = oneshot::channel();
        match tokio::time::timeout(timeout, self.confirmations.send(reply)).await {
            Err(_) => return Err(ApiError::Unavailable(format!("the read-index queue stayed full for {timeout:?}"))),
            Ok(Err(_)) => return Err(ApiError::Unavailable("the node is shutting down".into())),
            Ok(Ok(())) => {}
        }
        answer.await.map_err(|_| ApiError::Unavailable("the node is shutting down".into()))?
    }

    /// `read` on one consistent view of the applied state, on the metadata-read threads: the
    /// clients' reads of many rows stay off the async workers and off tokio's blocking pool.
    async fn read_state<T: Send + 'static>(
        &self,
        read: impl FnOnce(&ReadView) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let state = self.state.clone();
        METADATA_READS
            .run(move || read(&state.view().map_err(ApiError::internal)?))
            .await
            .map_err(ApiError::internal)?
    }

    /// One page of keys under `prefix` from `start_key` on, from a linearizable read.
    async fn list_page(&self, prefix: Vec<u8>, start_key: Vec<u8>, limit: u32) -> Result<LeaderResponse, ApiError> {
        self.linearizable_barrier().await?;
        let limit = if limit == 0 { self.config.list_limit_max } else { limit.min(self.config.list_limit_max) };
        // Up to 10,000 keys or 4 MiB read from redb: off the async workers.
        self.read_state(move |view| {
            let (kvs, truncated) =
                kv::list_keys(view, &prefix, &start_key, limit as usize).map_err(ApiError::internal)?;
            Ok(LeaderResponse::List {
                revision: schema::current_revision(view).map_err(ApiError::internal)?,
                kvs,
                truncated,
            })
        })
        .await
    }

    async fn propose(&self, proposal: Proposal) -> Result<CommandResult, ApiError> {
        self.propose_aged(proposal, None).await
    }

    /// Queues a proposal for the next batch, with the age of the write it commits, if any.
    async fn propose_aged(&self, proposal: Proposal, prepare_age: Option<Age>) -> Result<CommandResult, ApiError> {
        let timeout = Duration::from_millis(self.config.write_timeout_ms);
        let (reply, answer) = oneshot::channel();
        let pending = PendingProposal { proposal, prepare_age, reply };
        let queued_at = Instant::now();
        let queued = tokio::time::timeout(timeout, self.proposer.send(pending)).await;
        match queued {
            Err(_) => return Err(ApiError::Unavailable(format!("the proposal queue stayed full for {timeout:?}"))),
            Ok(Err(_)) => return Err(ApiError::Unavailable("the node is shutting down".into())),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout(timeout, answer).await {
            Err(_) => Err(ApiError::Timeout(format!(
                "the write was not committed within {timeout:?}: no quorum reachable (the outcome is unknown; \
                 retrying with the same request id is safe)"
            ))),
            Ok(Err(_)) => Err(ApiError::Unavailable("the proposal was dropped: the node is shutting down".into())),
            Ok(Ok(result)) => {
                // A proposal this node's Raft refused (it does not lead) is forwarded: it is
                // the leader's write, and timed there.
                if result.is_ok() {
                    self.write_metrics.proposal(queued_at.elapsed());
                }
                result
            }
        }
    }

    /// Proposes a command on this node, which is serving a leader request.
    async fn propose_here(&self, command: Command) -> Result<Outcome, ApiError> {
        self.propose(Self::proposal(None, command)).await?.map_err(ApiError::Command)
    }

    fn membership(&self) -> (BTreeSet<NodeId>, BTreeMap<NodeId, BasicNode>) {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters = membership.voter_ids().collect();
        let nodes = membership.nodes().map(|(id, node)| (*id, node.clone())).collect();
        (voters, nodes)
    }

    fn membership_response(&self) -> LeaderResponse {
        let (voters, nodes) = self.membership();
        let learners = nodes.keys().filter(|id| !voters.contains(id)).copied().collect();
        LeaderResponse::Membership(Membership { voters: voters.into_iter().collect(), learners })
    }

    fn map_membership_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ApiError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                ApiError::NotLeader { leader: forward.leader_id }
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                ApiError::Unavailable(format!("membership change refused: {e}"))
            }
            RaftError::Fatal(e) => ApiError::Unavailable(format!("raft stopped: {e}")),
        }
    }

    /// Adds a node as a learner, waits for it to catch up, then promotes it to voter (unless
    /// it is to stay a learner).
    async fn add_node(&self, id: NodeId, addr: String, learner: bool) -> Result<LeaderResponse, ApiError> {
        crate::network::validate_node_addr(&addr).map_err(ApiError::InvalidArgument)?;
        if !self.is_leader() {
            return Err(ApiError::NotLeader { leader: self.leader_id() });
        }
        let (voters, nodes) = self.membership();
        if let Some(existing) = nodes.get(&id) {
            if existing.addr != addr {
                return Err(ApiError::InvalidArgument(format!(
                    "node {id} is already a member at {}; remove it first to change its address",
                    existing.addr
                )));
            }
        }
        if learner && voters.contains(&id) {
            return Err(ApiError::InvalidArgument(format!(
                "node {id} is a voter; remove it first to make it a learner"
            )));
        }
        if !voters.contains(&id) {
            let timeout = Duration::from_secs(60);
            tokio::time::timeout(timeout, self.raft.add_learner(id, BasicNode { addr }, true))
                .await
                .map_err(|_| ApiError::Timeout(format!("node {id} did not catch up as a learner within {timeout:?}")))?
                .map_err(|e| self.map_membership_error(e))?;
            if !learner {
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(|e| self.map_membership_error(e))?;
            }
        }
        Ok(self.membership_response())
    }

    async fn remove_node(&self, id: NodeId) -> Result<LeaderResponse, ApiError> {
        if !self.is_leader() {
            return Err(ApiError::NotLeader { leader: self.leader_id() });
        }
        let (voters, nodes) = self.membership();
        if !nodes.contains_key(&id) {
            let members: Vec<String> = nodes.keys().map(|id| id.to_string()).collect();
            return Err(ApiError::NotFound(format!("node {id} is not a member (members: {})", members.join(", "))));
        }
        if voters.contains(&id) && voters.len() == 1 {
            return Err(ApiError::InvalidArgument(format!("node {id} is the last voter; it cannot be removed")));
        }
        // Removing a node that still holds listed copies would make them unreadable at once;
        // drain it first (or let repair finish if it is down).
        // A scan of the whole chunk map: off the async workers, which carry Raft's heartbeats.
        let state = self.state.clone();
        let listed = tokio::task::spawn_blocking(move || {
            let view = state.view().map_err(ApiError::internal)?;
            files::chunks_listed_on(&view, id).map_err(ApiError::internal)
        })
        .await
        .map_err(ApiError::internal)??;
        if listed > 0 {
            return Err(ApiError::InvalidArgument(format!(
                "node {id} still holds {listed} listed chunk copies; run `mendfs cluster drain {id}` and wait for \
                 `cluster status` to show 0 chunks on it (or, if it is down, for repair to finish) before removing it"
            )));
        }
        if voters.contains(&id) {
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(|e| self.map_membership_error(e))?;
        }
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.map_membership_error(e))?;
        self.propose_here(Command::UnregisterStorageNode { node_id: id }).await?;
        Ok(self.membership_response())
    }

    /// Expires the sessions whose clocks ran out: all of them at once (group commit batches
    /// the proposals), found through the deadline index, with the sessions table read whole
    /// at most once per `SESSION_SCAN_EVERY`, off the async workers.
    async fn expire_sessions(&self) -> Result<(), ApiError> {
        // Due sessions first: a full scan (below) takes a while with many sessions, and must
        // not hold up the expiries that are due now.
        let expired = self.expire_due_sessions().await;
        let scan_due =
            self.sessions.lock().map_err(|_| ApiError::internal("session clocks poisoned"))?.scan_due(Instant::now());
        if scan_due {
            let state = self.state.clone();
            let live = tokio::task::spawn_blocking(move || -> Result<Vec<(u64, u64)>, ApiError> {
                let view = state.view().map_err(ApiError::internal)?;
                let sessions = kv::list_sessions(&view).map_err(ApiError::internal)?;
                Ok(sessions.into_iter().map(|(id, session)| (id, session.ttl_ms)).collect())
            })
            .await
            .map_err(ApiError::internal)??;
            self.sessions
                .lock()
                .map_err(|_| ApiError::internal("session clocks poisoned"))?
                .sync(&live, Instant::now());
        }
        expired
    }

    /// Commits this node's configured limits if they differ from the cluster's: the leader's
    /// configuration is the cluster's, and every replica enforces the committed value alike.
    async fn agree_on_limits(&self) -> Result<(), ApiError> {
        let committed = schema::limits(&self.state.view().map_err(ApiError::internal)?).map_err(ApiError::internal)?;
        if committed == self.config.limits {
            return Ok(());
        }
        tracing::info!(?committed, configured = ?self.config.limits, "the cluster limits change to this leader's");
        let result = self.propose(MetaNode::proposal(None, Command::SetLimits(self.config.limits))).await?;
        result.map(drop).map_err(ApiError::Command)
    }

    async fn expire_due_sessions(&self) -> Result<(), ApiError> {
        let expired = self
            .sessions
            .lock()
            .map_err(|_| ApiError::internal("session clocks poisoned"))?
            .due(Instant::now(), SESSION_EXPIRIES_PER_TICK_MAX);
        if expired.is_empty() {
            return Ok(());
        }
        tracing::info!(
            sessions = expired.len(),
            first = expired[0],
            "sessions expired: no keep-alive within their TTL"
        );
        let results: Vec<(u64, Result<CommandResult, ApiError>)> = futures::stream::iter(expired)
            .map(|session_id| async move {
                let proposal = Self::proposal(None, Command::SessionExpire { session_id });
                (session_id, self.propose(proposal).await)
            })
            .buffer_unordered(SESSION_EXPIRIES_IN_FLIGHT_MAX)
            .collect()
            .await;
        let mut clocks = self.sessions.lock().map_err(|_| ApiError::internal("session clocks poisoned"))?;
        let mut first_error = None;
        for (session_id, result) in results {
            match result {
                // Closed (or already gone): its clock goes; a failed proposal is tried again next tick.
                Ok(_) => clocks.forget(session_id),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Storage nodes as this node's state machine knows them (may lag the leader slightly;
    /// good enough to choose where to write, since the commit records where copies went).
    pub fn storage_nodes(&self) -> Result<Vec<StorageNode>, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        files::list_storage_nodes(&view).map_err(ApiError::internal)
    }

    /// Storage nodes as the leader knows them, from a linearizable read: every node a chunk
    /// page read at the same time or earlier can name.
    pub async fn storage_nodes_from_leader(&self, origin: Origin) -> Result<Vec<StorageNode>, ApiError> {
        match self.serve_on_leader(LeaderRequest::StorageNodes, origin).await? {
            LeaderResponse::StorageNodes(nodes) => Ok(nodes),
            other => Err(unexpected("the storage nodes", other)),
        }
    }

    /// Creates a client token named `name` with `role`; returns the token, which is stored
    /// only as its hash and cannot be shown again.
    pub async fn create_token(
        &self,
        origin: Origin,
        name: String,
        role: crate::auth::Role,
    ) -> Result<String, ApiError> {
        let token = crate::auth::generate_token();
        let record =
            crate::auth::TokenRecord { hash: crate::auth::token_hash(&token), role, created_unix_ms: unix_now_ms() };
        // The request id makes a retried create (after an ambiguous failure) idempotent.
        let request_id = RequestId { client_id: rand::random::<u64>() | 1, sequence: 1 };
        self.execute(origin, Some(request_id), Command::CreateToken { name, record }).await?;
        Ok(token)
    }

    /// Records a one-time dashboard login code (only its hash) for `role`, usable for
    /// `code_ttl` and opening a session of `session_ttl`; returns the code.
    pub async fn create_login_code(
        &self,
        origin: Origin,
        role: crate::auth::Role,
        code_ttl: Duration,
        session_ttl: Duration,
    ) -> Result<String, ApiError> {
        let code = crate::login::generate_login_code();
        let hash = crate::auth::token_hash(&code);
        // The request id makes a retried create (after an ambiguous failure) idempotent.
        let request_id = RequestId { client_id: rand::random::<u64>() | 1, sequence: 1 };
        let command = Command::Login(crate::login::LoginCommand::CreateCode {
            hash,
            role,
            code_ttl_ms: u64::try_from(code_ttl.as_millis()).unwrap_or(u64::MAX),
            session_ttl_ms: u64::try_from(session_ttl.as_millis()).unwrap_or(u64::MAX),
        });
        self.execute(origin, Some(request_id), command).await?;
        Ok(code)
    }

    /// Uses up a login code: returns a new session token, its name, role and expiry. The
    /// token is admitted by this node when this returns (its state has applied the session).
    pub async fn redeem_login_code(&self, origin: Origin, code: &str) -> Result<LoginSession, ApiError> {
        if !crate::login::is_login_code(code) {
            return Err(ApiError::Command(CommandError::LoginCodeInvalid));
        }
        let token = crate::auth::generate_token();
        let name = crate::login::session_name();
        let request = LeaderRequest::RedeemLogin {
            code_hash: crate::auth::token_hash(code),
            session_name: name.clone(),
            session_hash: crate::auth::token_hash(&token),
        };
        let (result, applied_index) = match self.serve_on_leader(request, origin).await? {
            LeaderResponse::Redeemed { result, applied_index } => (result, applied_index),
            other => return Err(unexpected("a login", other)),
        };
        let (role, expires_unix_ms) = match result.map_err(ApiError::Command)? {
            Outcome::LoginSession { role, expires_unix_ms } => (role, expires_unix_ms),
            other => return Err(unexpected("a login", LeaderResponse::Command(Ok(other)))),
        };
        // The page calls this node with the token next: it should know it by then. If this node
        // lags, the session is still handed out (the code is used up either way), and the page
        // retries until this node or another admits it.
        let timeout = Duration::from_millis(self.config.write_timeout_ms);
        if let Err(e) =
            self.raft.wait(Some(timeout)).applied_index_at_least(Some(applied_index), "the login's session").await
        {
            tracing::warn!("a login's session is not applied here yet ({e}); handing it out anyway");
        }
        Ok(LoginSession { token, name, role, expires_unix_ms })
    }

    /// Revokes the token named `name`; false if there was none. Every node stops admitting it
    /// as soon as it applies the revocation.
    pub async fn revoke_token(&self, origin: Origin, name: String) -> Result<bool, ApiError> {
        match self.execute(origin, None, Command::RevokeToken { name }).await? {
            Outcome::TokenRevoked { found } => {
                if found {
                    self.rights_reduced().await;
                }
                Ok(found)
            }
            other => Err(unexpected("a token revocation", other)),
        }
    }

    /// The client tokens this node knows of (its applied state), by name. A scan of the whole
    /// table (admins may create many): off the async workers.
    pub async fn list_tokens(&self) -> Result<Vec<(String, crate::auth::TokenRecord, Option<u64>)>, ApiError> {
        self.read_state(move |view| {
            let rows = schema::StateStore::range(view, schema::Table::Tokens, &[], None, usize::MAX)
                .map_err(ApiError::internal)?;
            rows.into_iter()
                .map(|(name, value)| {
                    let record = schema::decode(&value).map_err(ApiError::internal)?;
                    let expires = crate::login::token_expiry(view, &name).map_err(ApiError::internal)?;
                    Ok((String::from_utf8_lossy(&name).into_owned(), record, expires))
                })
                .collect()
        })
        .await
    }

    /// Calls `visit` for every chunk record of this node's state machine, in hash order, from
    /// one consistent read; stops early when `visit` returns false. Blocking (it reads the
    /// whole chunk map a page at a time): call it from `spawn_blocking`. Returns how many rows
    /// were skipped as not chunk records.
    pub fn for_each_chunk(&self, visit: impl FnMut(ChunkHash, ChunkRecord) -> bool) -> Result<u64, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        files::for_each_chunk(&view, visit).map_err(ApiError::internal)
    }

    /// [`MetaNode::for_each_chunk`] over one 256th of the chunk map: the records whose hash
    /// starts with `byte0`, from a consistent read of their own. For scans that go a slice at
    /// a time, so that no step holds a read (or a worker thread) for the whole map. Blocking.
    pub fn for_each_chunk_in_slice(
        &self,
        byte0: u8,
        visit: impl FnMut(ChunkHash, ChunkRecord) -> bool,
    ) -> Result<u64, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        let (start, end) = files::hash_slice_keys(byte0);
        files::for_each_chunk_between(&view, &start, end.as_ref().map(|end| end.as_slice()), visit)
            .map_err(ApiError::internal)
    }

    /// [`MetaNode::for_each_stripe`] over the stripes whose chunk hash starts with `byte0`, as
    /// [`MetaNode::for_each_chunk_in_slice`] goes over chunks. Blocking.
    pub fn for_each_stripe_in_slice(
        &self,
        byte0: u8,
        visit: impl FnMut(ChunkHash, crate::stripes::StripeRecord) -> bool,
    ) -> Result<u64, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        let (start, end) = files::hash_slice_keys(byte0);
        crate::stripes::for_each_stripe_between(&view, &start, end.as_ref().map(|end| end.as_slice()), visit)
            .map_err(ApiError::internal)
    }

    /// Calls `visit` for every stripe (erasure-coded chunk) of this node's state machine, in
    /// chunk-hash order, from one consistent read, like [`MetaNode::for_each_chunk`]. Blocking.
    pub fn for_each_stripe(
        &self,
        visit: impl FnMut(ChunkHash, crate::stripes::StripeRecord) -> bool,
    ) -> Result<u64, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        crate::stripes::for_each_stripe(&view, visit).map_err(ApiError::internal)
    }

    /// The repair job as this node's state machine last applied it.
    pub fn repair_job(&self) -> Result<Option<RepairJob>, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        files::repair_job(&view).map_err(ApiError::internal)
    }

    /// The cluster's timeline (bounded, oldest first), as this node applied it.
    pub fn cluster_events(&self) -> Result<Vec<files::ClusterEvent>, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        files::cluster_events(&view).map_err(ApiError::internal)
    }

    /// Appends events to the cluster's timeline (the leader's healer).
    pub async fn record_cluster_events(&self, events: Vec<files::ClusterEvent>) -> Result<(), ApiError> {
        self.execute_quietly(Command::RecordClusterEvents(events)).await
    }

    /// The repair jobs before the current one, newest first (bounded), as this node applied them.
    pub fn repair_history(&self) -> Result<Vec<RepairJob>, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        files::repair_history(&view).map_err(ApiError::internal)
    }

    /// Proposes a command through the leader (from this node, or for a client whose deadline
    /// it must not outlive) and returns its outcome.
    async fn execute(
        &self,
        origin: Origin,
        request_id: Option<RequestId>,
        command: Command,
    ) -> Result<Outcome, ApiError> {
        self.execute_aged(origin, request_id, command, None).await
    }

    /// [`MetaNode::execute`] for a command that references prepared chunks: `prepare_age`
    /// says how long ago they began preparing.
    pub(crate) async fn execute_aged(
        &self,
        origin: Origin,
        request_id: Option<RequestId>,
        command: Command,
        prepare_age: Option<Age>,
    ) -> Result<Outcome, ApiError> {
        let request = LeaderRequest::Propose(Self::proposal(request_id, command));
        match self.serve_on_leader_aged(request, origin, prepare_age).await? {
            LeaderResponse::Command(result) => result.map_err(ApiError::Command),
            other => Err(unexpected("a command", other)),
        }
    }

    /// Proposes a command whose outcome carries nothing but success.
    async fn execute_quietly(&self, command: Command) -> Result<(), ApiError> {
        self.execute(Origin::LOCAL, None, command).await.map(drop)
    }

    /// Builds a proposal, not yet stamped: the leader's proposer stamps it.
    pub(crate) fn proposal(request_id: Option<RequestId>, command: Command) -> Proposal {
        Proposal { request_id, proposed_at_ms: 0, command }
    }

    /// Phase two of a write: installs the file version. `request_id` makes a retried commit
    /// return the first one's outcome instead of committing twice.
    ///
    /// `prepare_started`, on this node's monotonic clock, is from before the first prepare of
    /// the chunks the commit carries: the commit is refused (`PrepareExpired`) if it reaches the
    /// leader's stamp more than `grace_ms` after it, so that it never lists a copy a storage
    /// node may have collected (see `files`). Its `prepared_at_ms` is filled in by the leader.
    pub async fn commit_file(
        &self,
        request_id: RequestId,
        commit: CommitFile,
        carried: Carried,
        prepare_started: Instant,
    ) -> Result<FileCommitted, ApiError> {
        let command = with_carried(carried, Command::CommitFile(commit));
        match self.execute_aged(Origin::LOCAL, Some(request_id), command, Some(Age::since(prepare_started))).await? {
            Outcome::FileCommitted { version, revision } => Ok(FileCommitted { version, revision }),
            other => Err(unexpected("a file commit", other)),
        }
    }

    /// Stages one full segment of a big file's upload (see `files`). `request_id` makes a
    /// retried stage return the first one's outcome instead of staging twice.
    /// `prepare_started` as for [`MetaNode::commit_file`], for this segment's chunks.
    pub async fn stage_segment(
        &self,
        request_id: RequestId,
        stage: StageSegment,
        stripes: Vec<crate::stripes::StripeCommit>,
        prepare_started: Instant,
    ) -> Result<(), ApiError> {
        let command = with_carried(Carried { inline: Vec::new(), stripes }, Command::StageSegment(stage));
        let age = Some(Age::since(prepare_started));
        self.execute_aged(Origin::LOCAL, Some(request_id), command, age).await.map(drop)
    }

    /// Releases what an upload staged, once its coordinator gave up on it.
    pub async fn abort_upload(&self, upload_id: u64) -> Result<(), ApiError> {
        self.execute_quietly(Command::AbortUpload { upload_id }).await
    }

    /// Deletes a file for a client; returns the revision of the deletion.
    pub async fn delete_file(
        &self,
        origin: Origin,
        request_id: Option<RequestId>,
        path: String,
        expected_version: Option<u64>,
    ) -> Result<u64, ApiError> {
        match self.execute(origin, request_id, Command::DeleteFile { path, expected_version }).await? {
            Outcome::Written { revision, .. } => Ok(revision),
            other => Err(unexpected("a file deletion", other)),
        }
    }

    /// Announces a storage node (or its new address); its admin state is kept.
    pub async fn register_storage_node(&self, node: StorageNode) -> Result<(), ApiError> {
        self.execute_quietly(Command::RegisterStorageNode { node }).await
    }

    /// A replica was found missing or corrupt: stop listing it (never the last one).
    pub async fn drop_replica(&self, hash: ChunkHash, node_id: NodeId) -> Result<(), ApiError> {
        self.execute_quietly(Command::DropReplica { hash, node_id }).await
    }

    /// Commits the leader's liveness decision about a storage node.
    pub async fn set_liveness(&self, node_id: NodeId, liveness: Liveness) -> Result<(), ApiError> {
        self.execute_quietly(Command::SetNodeLiveness { node_id, liveness }).await
    }

    /// Records finished repair copies (the repair's checkpoint), counted in job `job_id`.
    pub async fn add_replicas(&self, job_id: Option<u64>, added: Vec<ReplicaAdded>) -> Result<(), ApiError> {
        self.execute_quietly(Command::AddReplicas { job_id, added }).await
    }

    /// Records rebuilt or moved shards (counted in job `job_id`) and drops shard records repair
    /// no longer needs, each only if its kept copy still is listed.
    pub async fn repair_shards(
        &self,
        job_id: Option<u64>,
        added: Vec<crate::stripes::ShardAdded>,
        drops: Vec<crate::stripes::ShardDrop>,
    ) -> Result<(), ApiError> {
        self.execute_quietly(Command::RepairShards { job_id, added, drops }).await
    }

    /// Stops listing replicas repair no longer needs, each only if its kept copies still are.
    pub async fn drop_replicas(&self, drops: Vec<ReplicaDrop>) -> Result<(), ApiError> {
        self.execute_quietly(Command::DropReplicas { drops }).await
    }

    pub async fn record_repair_job(&self, job: RepairJob) -> Result<(), ApiError> {
        self.execute_quietly(Command::RecordRepairJob(job)).await
    }

    /// Drains (or undrains) a storage node for an operator.
    pub async fn set_draining(&self, origin: Origin, id: NodeId, draining: bool) -> Result<(), ApiError> {
        match self.serve_on_leader(LeaderRequest::Drain { id, draining }, origin).await? {
            LeaderResponse::Drained => Ok(()),
            other => Err(unexpected("a drain", other)),
        }
    }

    /// Adds a member (as a learner that is then promoted, unless `learner`).
    pub async fn add_member(
        &self,
        origin: Origin,
        id: NodeId,
        addr: String,
        learner: bool,
    ) -> Result<Membership, ApiError> {
        match self.serve_on_leader(LeaderRequest::AddNode { id, addr, learner }, origin).await? {
            LeaderResponse::Membership(membership) => Ok(membership),
            other => Err(unexpected("adding a node", other)),
        }
    }

    /// Removes a member that holds no listed chunk copies.
    pub async fn remove_member(&self, origin: Origin, id: NodeId) -> Result<Membership, ApiError> {
        match self.serve_on_leader(LeaderRequest::RemoveNode { id }, origin).await? {
            LeaderResponse::Membership(membership) => Ok(membership),
            other => Err(unexpected("removing a node", other)),
        }
    }

    /// A file's current version (its summary), from a linearizable read.
    pub async fn get_file(&self, origin: Origin, path: String) -> Result<Option<FileView>, ApiError> {
        Ok(self.file_chunks(origin, path, None, 0, 0).await?.map(|(file, _)| file))
    }

    /// A file's summary and up to `limit` chunks (at most [`CHUNK_PAGE_CHUNKS_MAX`], and a page
    /// stays under about 1 MiB) from `from_index` on, with their replicas, from one
    /// linearizable read; None if the file does not exist. With `version`, refused with
    /// `VersionMismatch` (actual 0: deleted) unless that is still the current version.
    pub async fn file_chunks(
        &self,
        origin: Origin,
        path: String,
        version: Option<u64>,
        from_index: u64,
        limit: u32,
    ) -> Result<Option<(FileView, ChunkPage)>, ApiError> {
        match self.serve_on_leader(LeaderRequest::FileChunks { path, version, from_index, limit }, origin).await? {
            LeaderResponse::FileChunks(page) => Ok(page),
            other => Err(unexpected("a chunk page", other)),
        }
    }

    /// Summaries of the files under `prefix` in path order (at most `limit`, 0 for the node's
    /// maximum), without chunk lists; the flag says whether the list was cut short.
    pub async fn list_files(
        &self,
        origin: Origin,
        prefix: String,
        limit: u32,
    ) -> Result<(Vec<FileView>, bool), ApiError> {
        match self.serve_on_leader(LeaderRequest::ListFiles { prefix, limit }, origin).await? {
            LeaderResponse::Files { files, truncated } => Ok((files, truncated)),
            other => Err(unexpected("a file listing", other)),
        }
    }

    /// The bytes of a chunk kept inline in the metadata (a page listed it without replicas),
    /// verified against its hash. From this node's state when it has applied the write; from
    /// the leader otherwise (a follower a little behind the page it was given). None: no
    /// version references it any more.
    pub async fn inline_chunk(&self, hash: ChunkHash) -> Result<Option<Bytes>, ApiError> {
        // Content-addressed and immutable: any state that holds the row holds the right bytes,
        // so a local read is as good as the leader's.
        let local = {
            let view = self.state.view().map_err(ApiError::internal)?;
            files::get_inline_chunk(&view, &hash).map_err(ApiError::internal)?
        };
        let data = match local {
            Some(record) => Some(record.data),
            None => match self.serve_on_leader(LeaderRequest::InlineChunk { hash }, Origin::LOCAL).await? {
                LeaderResponse::InlineChunk(data) => data,
                other => return Err(unexpected("an inline chunk", other)),
            },
        };
        match data {
            Some(data) if ChunkHash::of(&data) != hash => {
                Err(ApiError::Internal(format!("the metadata's inline chunk {hash} does not match its hash")))
            }
            data => Ok(data.map(Bytes::from)),
        }
    }

    /// An erasure-coded chunk's stripe as this node's state holds it, if it does: no round
    /// trip. Where shards are may be a little behind the leader's record; a read decodes
    /// around what is missing.
    pub fn stripe_local(&self, chunk: &ChunkHash) -> Result<Option<crate::stripes::StripeRecord>, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        crate::stripes::get_stripe(&view, chunk).map_err(ApiError::internal)
    }

    /// An erasure-coded chunk's stripe (a page listed the chunk without replicas, and it is not
    /// inline). From this node's state when it has applied the write, from the leader
    /// otherwise. None: no version references the chunk any more.
    pub async fn stripe(&self, chunk: ChunkHash) -> Result<Option<crate::stripes::StripeRecord>, ApiError> {
        let local = {
            let view = self.state.view().map_err(ApiError::internal)?;
            crate::stripes::get_stripe(&view, &chunk).map_err(ApiError::internal)?
        };
        if local.is_some() {
            // Where shards are may be a little behind the leader's record (a rebuild just
            // committed): a read tries the shards it finds and decodes around what is missing.
            return Ok(local);
        }
        match self.serve_on_leader(LeaderRequest::Stripe { chunk }, Origin::LOCAL).await? {
            LeaderResponse::Stripe(record) => Ok(record),
            other => Err(unexpected("a stripe", other)),
        }
    }

    /// Which of `hashes` no committed file lists on `node_id`, from a linearizable read.
    pub async fn unreferenced_chunks(
        &self,
        node_id: NodeId,
        hashes: Vec<ChunkHash>,
    ) -> Result<Vec<ChunkHash>, ApiError> {
        match self.serve_on_leader(LeaderRequest::UnreferencedChunks { node_id, hashes }, Origin::LOCAL).await? {
            LeaderResponse::Unreferenced(hashes) => Ok(hashes),
            other => Err(unexpected("an orphan check", other)),
        }
    }

    pub(crate) async fn get_key(&self, origin: Origin, key: Vec<u8>) -> Result<(u64, Option<KeyValue>), ApiError> {
        if self.config.unsafe_local_reads {
            return self.get_key_unsafely_here(key);
        }
        match self.serve_on_leader(LeaderRequest::Get { key }, origin).await? {
            LeaderResponse::Get { revision, kv } => Ok((revision, kv)),
            other => Err(unexpected("a get", other)),
        }
    }

    /// `--unsafe-local-reads` (chaos tests only): the key as this node's state machine has it
    /// now, with no leader and no read-index, so possibly stale. This breaks linearizability on
    /// purpose; see [`MetaConfig::unsafe_local_reads`].
    fn get_key_unsafely_here(&self, key: Vec<u8>) -> Result<(u64, Option<KeyValue>), ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        let kv = kv::get_key(&view, &key).map_err(ApiError::internal)?.map(|record| KeyValue { key, record });
        Ok((schema::current_revision(&view).map_err(ApiError::internal)?, kv))
    }

    pub(crate) async fn list_keys(
        &self,
        origin: Origin,
        prefix: Vec<u8>,
        start_key: Vec<u8>,
        limit: u32,
    ) -> Result<(u64, Vec<KeyValue>, bool), ApiError> {
        let request = if start_key.is_empty() {
            LeaderRequest::List { prefix, limit }
        } else {
            LeaderRequest::ListFrom { prefix, start_key, limit }
        };
        match self.serve_on_leader(request, origin).await? {
            LeaderResponse::List { revision, kvs, truncated } => Ok((revision, kvs, truncated)),
            other => Err(unexpected("a list", other)),
        }
    }

    pub(crate) async fn keep_alive(&self, origin: Origin, session_id: u64) -> Result<u64, ApiError> {
        match self.serve_on_leader(LeaderRequest::KeepAlive { session_id }, origin).await? {
            LeaderResponse::KeepAlive { ttl_ms } => Ok(ttl_ms),
            other => Err(unexpected("a keep-alive", other)),
        }
    }

    /// A client's key or session command through the leader.
    pub(crate) async fn client_command(
        &self,
        origin: Origin,
        request_id: Option<RequestId>,
        command: Command,
    ) -> Result<Outcome, ApiError> {
        self.execute(origin, request_id, command).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catch_up_queue_for_test() -> (CatchUpQueue, mpsc::Receiver<oneshot::Sender<Result<(), ApiError>>>) {
        let (queue, rounds) = mpsc::channel(4);
        (CatchUpQueue { queue, freshness: Arc::default() }, rounds)
    }

    fn caught_up_ago(queue: &CatchUpQueue, ago: Duration) {
        *queue.freshness.caught_up_since.lock().unwrap() = Some(Instant::now() - ago);
    }

    #[test]
    fn a_young_view_of_rights_admits_at_once_an_ageing_one_refreshes_once_an_old_one_waits() {
        let max_age = Duration::from_secs(1);
        let (queue, mut rounds) = catch_up_queue_for_test();
        assert!(!queue.fresh_within(max_age), "a node that never caught up must wait for a round");

        caught_up_ago(&queue, Duration::from_millis(100));
        assert!(queue.fresh_within(max_age));
        assert!(rounds.try_recv().is_err(), "no round while the view is young");

        caught_up_ago(&queue, Duration::from_millis(700));
        assert!(queue.fresh_within(max_age), "an ageing view still admits");
        assert!(rounds.try_recv().is_ok(), "and starts one round in the background");
        assert!(queue.fresh_within(max_age));
        assert!(rounds.try_recv().is_err(), "not a second one while the first is pending");

        caught_up_ago(&queue, Duration::from_millis(1_500));
        assert!(!queue.fresh_within(max_age), "a view older than the bound must wait for a round");
    }

    #[test]
    fn a_round_that_started_earlier_never_makes_the_view_older() {
        let (queue, _rounds) = catch_up_queue_for_test();
        let now = Instant::now();
        queue.freshness.caught_up(now);
        queue.freshness.caught_up(now - Duration::from_secs(5));
        assert!(queue.freshness.age().unwrap() < Duration::from_secs(1));
    }

    #[test]
    fn session_clocks_find_due_sessions_through_their_deadline_index() {
        let start = Instant::now();
        let mut clocks = SessionClocks::default();
        assert!(clocks.scan_due(start), "a first scan is due at once");
        clocks.sync(&[(1, 1_000), (2, 5_000), (3, 2_000)], start);
        assert!(!clocks.scan_due(start + Duration::from_millis(500)));
        assert!(clocks.scan_due(start + SESSION_SCAN_EVERY));
        assert_eq!(clocks.due(start + Duration::from_millis(999), 10), Vec::<u64>::new());
        assert_eq!(clocks.due(start + Duration::from_millis(2_000), 10), vec![1, 3], "earliest first");
        assert_eq!(clocks.due(start + Duration::from_millis(2_000), 1), vec![1], "at most the limit");
        // A keep-alive moves a session's deadline; the index follows.
        clocks.set(1, start + Duration::from_millis(9_000));
        assert_eq!(clocks.due(start + Duration::from_millis(5_000), 10), vec![3, 2]);
        // A scan adds the sessions it had no clock for and keeps the clocks it had.
        clocks.forget(2);
        clocks.forget(3);
        clocks.sync(&[(1, 1_000), (4, 1_000)], start + Duration::from_millis(6_000));
        assert_eq!(clocks.due(start + Duration::from_millis(7_000), 10), vec![4]);
        assert_eq!(clocks.due(start + Duration::from_millis(9_000), 10), vec![4, 1]);
        clocks.forget(4);
        assert_eq!(clocks.by_deadline.len(), clocks.deadlines.len());
        clocks.clear();
        assert!(clocks.due(start + Duration::from_secs(60), 10).is_empty() && clocks.scan_due(start));
    }

    /// `/f` with `n` chunks of `replicas` copies each, committed at `version` 1.
    fn store_with_file(n: u32, replicas: usize) -> schema::MemoryStore {
        let mut store = schema::MemoryStore::default();
        let chunks: Vec<files::CommittedChunk> = (0..n)
            .map(|i| {
                let mut bytes = [3u8; 32];
                bytes[..4].copy_from_slice(&i.to_be_bytes());
                let replicas = (1..=replicas as u64).collect();
                files::CommittedChunk { hash: ChunkHash::from_bytes(bytes), size: 1, replicas }
            })
            .collect();
        let commit = CommitFile {
            path: "/f".into(),
            size: u64::from(n),
            mtime_ms: 1,
            content_hash: vec![0; 32],
            chunks,
            upload_id: None,
            first_index: 0,
            expected_version: None,
            prepared_at_ms: 0,
            grace_ms: 1,
        };
        let proposal = Proposal { request_id: None, proposed_at_ms: 0, command: Command::CommitFile(commit) };
        crate::state::apply(&mut store, &proposal).expect("apply").expect("commit");
        store
    }

    #[test]
    fn chunk_pages_are_bounded_and_belong_to_one_version() {
        let store = store_with_file(5_000, 3);
        let (file, page) = file_chunk_page(&store, "/f".into(), None, 0, 0).unwrap().unwrap();
        assert_eq!((file.record.n_chunks, page.chunks.len()), (5_000, 0), "limit 0: the summary alone");
        let (_, page) = file_chunk_page(&store, "/f".into(), Some(1), 4_990, 100).unwrap().unwrap();
        assert_eq!((page.from_index, page.chunks.len(), page.chunks[0].replicas.clone()), (4_990, 10, vec![1, 2, 3]));
        let (_, past) = file_chunk_page(&store, "/f".into(), Some(1), 9_999, 100).unwrap().unwrap();
        assert!(past.chunks.is_empty());
        assert_eq!(
            file_chunk_page(&store, "/f".into(), Some(2), 0, 10).unwrap_err(),
            ApiError::Command(CommandError::VersionMismatch { expected: 2, actual: 1 }),
            "a reader of another version learns that the file changed"
        );
        assert_eq!(
            file_chunk_page(&store, "/gone".into(), Some(1), 0, 10).unwrap_err(),
            ApiError::Command(CommandError::VersionMismatch { expected: 1, actual: 0 })
        );
        assert!(file_chunk_page(&store, "/gone".into(), None, 0, 10).unwrap().is_none());
        // A page stops at about 1 MiB, however many replicas each chunk lists.
        let store = store_with_file(8_192, 64);
        let (_, page) = file_chunk_page(&store, "/f".into(), None, 0, u32::MAX).unwrap().unwrap();
        let bytes = schema::encode(&page).unwrap().len();
        assert!(
            page.chunks.len() < 8_192 && bytes <= CHUNK_PAGE_BYTES_MAX,
            "{} chunks, {bytes} bytes",
            page.chunks.len()
        );
    }

    /// A moment well after this process's monotonic origin, so that times before it can be named.
    fn later() -> Instant {
        Instant::now() + Duration::from_secs(3_600)
    }

    fn sent_ago(received: Instant, ms: u64) -> Option<PeerInstant> {
        Some(PeerInstant { incarnation: clock::incarnation(), monotonic_ms: clock::monotonic_ms(received) - ms })
    }

    fn kv_request() -> LeaderRequest {
        LeaderRequest::Get { key: b"k".to_vec() }
    }

    #[test]
    fn a_forwarded_request_is_timed_on_the_receivers_clock_alone() {
        let received = later();
        let three_s = Duration::from_secs(3);
        // Sent a second ago, with three seconds to wait: two are left, whatever either date says.
        let mut envelope = ForwardEnvelope::new(kv_request(), three_s, sent_ago(received, 1_000), None);
        for date in [0, unix_now_ms() - 3_600_000, unix_now_ms() + 3_600_000] {
            envelope.deadline_unix_ms = date;
            assert_eq!(
                envelope.arrival(received),
                Ok(Arrival { deadline: received + Duration::from_secs(2), prepare_age: None })
            );
        }
        // Sent four seconds ago (it sat in a paused leader's socket): its sender gave up a second ago.
        let late = ForwardEnvelope::new(kv_request(), three_s, sent_ago(received, 4_000), None);
        assert_eq!(late.arrival(received), Err(1_000));
        let just_late = ForwardEnvelope::new(kv_request(), three_s, sent_ago(received, 3_000), None);
        assert_eq!(just_late.arrival(received), Err(0));
        // Without a reading of this node's clock, or with one of an earlier process of this
        // node, the time on the way is unknown: the whole wait is left.
        let unknown = ForwardEnvelope::new(kv_request(), three_s, None, None);
        assert_eq!(unknown.arrival(received), Ok(Arrival { deadline: received + three_s, prepare_age: None }));
        let restarted =
            sent_ago(received, 10_000).map(|sent| PeerInstant { incarnation: sent.incarnation ^ 2, ..sent });
        let stale = ForwardEnvelope::new(kv_request(), three_s, restarted, None);
        assert_eq!(stale.arrival(received), Ok(Arrival { deadline: received + three_s, prepare_age: None }));
    }

    #[test]
    fn forward_envelopes_cross_versions() {
        let received = later();
        let envelope = ForwardEnvelope::new(kv_request(), Duration::from_secs(3), sent_ago(received, 5), None);
        let bytes = schema::encode(&envelope).unwrap();
        // A leader of the previous version reads its fields and ignores the new ones.
        let old: LegacyForwardEnvelope = schema::decode(&bytes).unwrap();
        assert!(matches!(old.request, LeaderRequest::Get { .. }));
        assert!(old.deadline_unix_ms.abs_diff(unix_now_ms() + 3_000) < 1_000, "a date its clock can check");
        // This version reads an envelope of the previous one by its date.
        let legacy = LegacyForwardEnvelope { deadline_unix_ms: unix_now_ms() + 2_000, request: kv_request() };
        let read = ForwardEnvelope::decode(&schema::encode(&legacy).unwrap()).unwrap();
        assert!(read.sent_at.is_none() && (1_000..=2_000).contains(&read.remaining_ms), "{read:?}");
        let past = LegacyForwardEnvelope { deadline_unix_ms: 1, request: kv_request() };
        let read = ForwardEnvelope::decode(&schema::encode(&past).unwrap()).unwrap();
        assert_eq!(read.arrival(received), Err(0), "past its date: refused, as before");
        assert!(ForwardEnvelope::decode(&[0xff; 3]).is_err());
    }

    #[test]
    fn a_forwarded_writes_age_counts_its_time_on_the_way_never_short() {
        let received = later();
        let (three_s, half_s) = (Duration::from_secs(3), Duration::from_millis(500));
        let measured = ForwardEnvelope::new(kv_request(), three_s, sent_ago(received, 200), Some(half_s));
        let age = measured.arrival(received).unwrap().prepare_age.unwrap();
        assert_eq!(
            age.at(received + Duration::from_millis(100)),
            Duration::from_millis(800),
            "500 + 200 on the way + 100 here"
        );
        // Not knowing how long it was on its way, the leader counts the whole wait.
        let unmeasured = ForwardEnvelope::new(kv_request(), three_s, None, Some(half_s));
        assert_eq!(unmeasured.arrival(received).unwrap().prepare_age.unwrap().at(received), three_s + half_s);
        assert_eq!(
            ForwardEnvelope::new(kv_request(), three_s, None, None).arrival(received).unwrap().prepare_age,
            None
        );
    }

    /// The coordinator's date, the leader's date and the state clock may all disagree: only
    /// the write's age decides.
    #[test]
    fn a_commit_is_judged_by_its_age_on_monotonic_clocks_not_by_any_date() {
        const DATE_MS: u64 = 1_780_000_000_000;
        let grace_ms = 2_000;
        let chunk = files::CommittedChunk { hash: ChunkHash::from_bytes([9; 32]), size: 1, replicas: vec![1] };
        let commit = |prepared_at_ms: u64| CommitFile {
            path: "/f".into(),
            size: 1,
            mtime_ms: 1,
            content_hash: vec![0; 32],
            chunks: vec![chunk.clone()],
            upload_id: None,
            first_index: 0,
            expected_version: None,
            prepared_at_ms,
            grace_ms,
        };
        let apply = |stamp_ms: u64, age: Duration, coordinator_date_ms: u64, leader_date_ms: u64| {
            let mut store = schema::MemoryStore::default();
            let previous =
                Proposal { request_id: None, proposed_at_ms: stamp_ms - 10, command: Command::Compact { revision: 0 } };
            crate::state::apply(&mut store, &previous).unwrap().unwrap();
            let mut proposal = MetaNode::proposal(None, Command::CommitFile(commit(coordinator_date_ms)));
            proposal.proposed_at_ms = stamp_ms;
            let field = proposal.command.prepared_at_ms_mut().unwrap();
            *field = prepared_at_on_state_clock(stamp_ms, Some(age), *field, leader_date_ms);
            crate::state::apply(&mut store, &proposal).unwrap()
        };
        for (coordinator_date_ms, leader_date_ms) in
            [(0, 0), (DATE_MS + 3_600_000, DATE_MS), (DATE_MS - 600_000, DATE_MS + 86_400_000)]
        {
            assert!(apply(DATE_MS, Duration::from_millis(1_999), coordinator_date_ms, leader_date_ms).is_ok());
            assert_eq!(
                apply(DATE_MS, Duration::from_millis(2_001), coordinator_date_ms, leader_date_ms),
                Err(CommandError::PrepareExpired { age_ms: 2_001, grace_ms })
            );
        }
        // A proposal from a coordinator of the previous version: its date against the leader's.
        assert_eq!(prepared_at_on_state_clock(DATE_MS, None, DATE_MS - 400, DATE_MS + 100), DATE_MS - 500);
        assert_eq!(prepared_at_on_state_clock(100, Some(Duration::from_millis(500)), 7, 7), 0, "never below 0");
    }

    #[tokio::test]
    async fn an_orphan_check_waits_for_every_batch_stamped_before_it() {
        let stamped = StampedBatches::default();
        let short = Duration::from_millis(50);
        assert_eq!(stamped.settled(stamped.mark(), short).await, Ok(()), "nothing stamped");
        let (first, second) = (stamped.open(), stamped.open());
        let mark = stamped.mark();
        let third = stamped.open();
        assert!(stamped.settled(mark, short).await.is_err(), "two batches stamped before the check are open");
        stamped.settle(second);
        assert!(stamped.settled(mark, short).await.is_err(), "the first one still is");
        stamped.settle(first);
        assert_eq!(stamped.settled(mark, short).await, Ok(()), "the third was stamped after the check");
        let waiting = stamped.settled(stamped.mark(), Duration::from_secs(10));
        stamped.settle(third);
        assert_eq!(waiting.await, Ok(()));
    }

    fn wire_number<T: Serialize>(message: &T) -> u8 {
        schema::encode(message).expect("encode")[0]
    }

    /// Nodes of two versions forward to each other: a variant's number is its wire identity.
    #[test]
    fn leader_messages_keep_their_wire_numbers() {
        let requests = [
            (LeaderRequest::Get { key: vec![] }, 1),
            (LeaderRequest::KeepAlive { session_id: 1 }, 3),
            (LeaderRequest::RemoveNode { id: 1 }, 5),
            (LeaderRequest::UnreferencedChunks { node_id: 1, hashes: vec![] }, 8),
            (LeaderRequest::RetiredHealth, 9),
            (LeaderRequest::RetiredGetFile, 6),
            (LeaderRequest::RetiredListFiles, 7),
            (LeaderRequest::Drain { id: 1, draining: true }, 10),
            (LeaderRequest::ListFrom { prefix: vec![], start_key: vec![], limit: 0 }, 11),
            (LeaderRequest::FileChunks { path: String::new(), version: None, from_index: 0, limit: 0 }, 12),
            (LeaderRequest::ListFiles { prefix: String::new(), limit: 0 }, 13),
            (LeaderRequest::StorageNodes, 14),
            (LeaderRequest::S3(s3_api::S3Read::Buckets), 15),
            (LeaderRequest::InlineChunk { hash: ChunkHash::from_bytes([1; 32]) }, 16),
            (LeaderRequest::RedeemLogin { code_hash: [0; 32], session_name: String::new(), session_hash: [0; 32] }, 17),
            (LeaderRequest::Jobs(jobs_api::JobRead::List), 18),
            (LeaderRequest::Stripe { chunk: ChunkHash::from_bytes([1; 32]) }, 19),
            (LeaderRequest::Policies, 20),
            (LeaderRequest::ReadIndex, 21),
        ];
        for (request, number) in requests {
            assert_eq!(wire_number(&request), number, "{request:?}");
        }
        let responses = [
            (LeaderResponse::KeepAlive { ttl_ms: 1 }, 3),
            (LeaderResponse::Unreferenced(vec![]), 7),
            (LeaderResponse::RetiredHealth, 8),
            (LeaderResponse::RetiredFile, 5),
            (LeaderResponse::RetiredFiles, 6),
            (LeaderResponse::Drained, 9),
            (LeaderResponse::FileChunks(None), 10),
            (LeaderResponse::Files { files: vec![], truncated: false }, 11),
            (LeaderResponse::StorageNodes(vec![]), 12),
            (LeaderResponse::S3(s3_api::S3Answer::Bucket(None)), 13),
            (LeaderResponse::InlineChunk(None), 14),
            (LeaderResponse::Redeemed { result: Ok(Outcome::Noop), applied_index: 0 }, 15),
            (LeaderResponse::Jobs(jobs_api::JobAnswer::Checkpoint(None)), 16),
            (LeaderResponse::Stripe(None), 17),
            (LeaderResponse::Policies(vec![]), 18),
            (LeaderResponse::ReadIndex { applied_index: 0 }, 19),
        ];
        for (response, number) in responses {
            assert_eq!(wire_number(&response), number, "{response:?}");
        }
        // Outcomes are in the deduplication table on disk, for its window.
        let outcomes = [(Outcome::Noop, 7), (Outcome::PolicyChanged { previous: None }, 13)];
        for (outcome, number) in outcomes {
            assert_eq!(wire_number(&outcome), number, "{outcome:?}");
        }
        // Commands are in the Raft log on disk, forever.
        let commands = [
            (Command::InitCluster { cluster_id: String::new() }, 0),
            (Command::SessionExpire { session_id: 1 }, 6),
            (Command::DropReplica { hash: ChunkHash::from_bytes([1; 32]), node_id: 1 }, 10),
            (Command::UnregisterStorageNode { node_id: 1 }, 13),
            (Command::DropReplicas { drops: vec![] }, 15),
            (Command::S3ExpireMultipart { initiated_before_ms: 0 }, 36),
            (Command::WithInlineChunks { inline: vec![], command: Box::new(Command::ReleaseChunks) }, 37),
            (
                Command::Login(crate::login::LoginCommand::Redeem {
                    code_hash: [0; 32],
                    session_name: String::new(),
                    session_hash: [0; 32],
                }),
                38,
            ),
            (Command::RecordClusterEvents(vec![]), 39),
            (Command::WithStripes { stripes: vec![], command: Box::new(Command::ReleaseChunks) }, 40),
            (Command::RepairShards { job_id: None, added: vec![], drops: vec![] }, 41),
            (Command::Job(crate::jobs::JobCommand::Cancel { name: String::new() }), 42),
            (
                Command::Policy(crate::policy::PolicyCommand::Unset {
                    target: crate::policy::PolicyTarget::Prefix("/".into()),
                }),
                43,
            ),
        ];
        for (command, number) in commands {
            assert_eq!(wire_number(&command), number, "{command:?}");
        }
    }
}
