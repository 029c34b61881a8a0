//! The `Files` service: two-phase writes, verified reads, and the file namespace calls.
//!
//! Write: the upload is cut into chunks; each chunk's bytes are forwarded, as they arrive, to
//! `replication_factor` nodes chosen by the ring for a key of the write and the chunk's index
//! (fsynced there once the chunk's hash, sent last, checks out); a node that fails is made up
//! by copying from a survivor to the ring's next choice (erasure-coded chunks are buffered
//! whole, encoded, and a failed shard's node replaced) (the commit records where the copies really are, so a write survives a
//! dead replica without losing redundancy). Only when every chunk has all its copies does one
//! Raft entry commit the file. A big file's chunk list goes to the metadata a segment at a time
//! as its chunks are prepared (each segment staged by its own bounded entry), and the commit
//! carries only the last one; so the coordinator holds one segment of the list, never the
//! file's. A failure before the commit leaves the previous version untouched: the staged
//! segments are released (aborted, or expired by the metadata), and the prepared copies become
//! orphans that `gc` collects after the grace period.
//!
//! Read: the file's chunk list and replica lists come a page at a time from linearizable reads
//! of one version (a reader whose file changes under it fails rather than mixing versions);
//! each chunk is fetched from its replicas in turn (this node first), its hash checked, and a
//! replica that answers "missing" or "corrupt" is reported so the chunk map stops listing it.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use mendfs_chunkstore::StreamCheck;
use mendfs_erasure::Scheme;
use mendfs_heal::detector::Liveness;
use mendfs_heal::planner::ClusterView;
use mendfs_meta::stripes::{ShardCommit, StripeCommit, StripeRecord};
use mendfs_meta::{
    request_origin, segment_chunks_for, ApiError, Carried, ChunkPage, ChunkRef, CommitFile, CommittedChunk,
    FileCommitted, FileView, InlineChunk, MetaNode, Origin, PeerInterceptor, RequestId, StageSegment, StorageNode,
    CHUNK_PAGE_CHUNKS_MAX,
};
use mendfs_proto::status_with_cause;
use mendfs_proto::v1 as pb;
use mendfs_proto::v1::files_server::Files;
use mendfs_proto::v1::storage_client::StorageClient;
use mendfs_ring::Ring;
use mendfs_types::{ChunkHash, NodeId};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::buffer_pool::BufferPool;
use crate::chunk_service::{chunk_status, LocalChunks};
use crate::read_budget::ReadBudget;
use crate::{node_state, DataConfig};

/// Chunk bytes being prepared at once per upload: enough to keep the replicas busy, little
/// enough that an upload holds at most this much in memory. Counted in chunks, at least
/// `PREPARE_CHUNKS_IN_FLIGHT_MIN` (3 of the default 4 MiB) and at most
/// `PREPARE_CHUNKS_IN_FLIGHT_MAX`, so that small chunks are not prepared one round trip (and
/// one fsync) at a time.
const PREPARE_BYTES_IN_FLIGHT_MAX: usize = 12 << 20;
const PREPARE_CHUNKS_IN_FLIGHT_MIN: usize = 3;
const PREPARE_CHUNKS_IN_FLIGHT_MAX: usize = 64;
/// How long a put's commit keeps trying while the metadata cluster elects a leader.
const COMMIT_RETRY_FOR: Duration = Duration::from_secs(30);
/// How long a read under way waits out a leader change for the metadata it needs next (a
/// page, a stripe): an election takes about a second; a client's deadline bounds the rest.
const READ_METADATA_RETRY_FOR: Duration = Duration::from_secs(10);
/// The unit of the node's in-flight budget (`DataConfig::max_inflight_bytes`): a chunk holds
/// its size in slots, at least one, so many small files can be in flight at once.
const INFLIGHT_SLOT_BYTES: usize = 64 << 10;
/// Chunks a reader fetches ahead of the one it streams: while they add up to less than
/// `READ_AHEAD_BYTES_MAX` (many if they are small), at most `READ_AHEAD_CHUNKS_MAX`, and only
/// with room in the node's read budget (`Coordinator::read_budget`).
const READ_AHEAD_CHUNKS_MAX: usize = 64;
const READ_AHEAD_BYTES_MAX: u64 = 8 << 20;
/// How long a reader waits for room when the chunks readers hold are at the read budget's hard
/// cap: long enough for other readers' clients to take their chunks, short enough that a node
/// swamped with reads answers `Unavailable` (retry later) rather than letting them pile up.
const READ_BUDGET_PATIENCE: Duration = Duration::from_secs(30);
/// Data in one segment of an upload, at most: a segment's chunks must all be prepared within
/// the grace period of its first prepare, so a segment is a few seconds of work at any
/// reasonable rate even with big chunks (and otherwise as many chunks as the metadata takes in
/// one segment).
const SEGMENT_DATA_BYTES_MAX: u64 = 256 << 20;
/// The slowest upload rate a segment is sized for: a segment holds at most what this rate
/// writes in a quarter of the grace period, so a short grace (a test's, or an operator's who
/// wants orphans gone quickly) shrinks segments instead of failing every big upload.
const SEGMENT_RATE_FLOOR_BYTES_PER_SEC: u64 = 32 << 20;
/// Size of the data messages a gRPC read streams back (smaller chunks are gathered into one).
/// Each reader's transport holds about two of them beyond the read budget (gRPC encodes a message
/// into a buffer of its own, and HTTP/2 keeps a frame until the window opens): at 1 MiB, 32
/// readers of 64 MiB files took a coordinator to 302 MiB, at 256 KiB to 239, at the same rate
/// within the noise (`mendfs bench files`, `bench s3`). And every byte a gRPC read sends goes
/// through one such buffer, allocated per message and freed once written: at 64 KiB they come
/// from the allocator's small-object pages, reused at once, where 256 KiB ones left 8 readers
/// of 64 MiB files 5 to 15 MiB higher at their peak (113 and 122 against 92 to 113 MiB).
const GRPC_READ_MESSAGE_BYTES: usize = 64 << 10;
/// The idle read buffers a node keeps are at most its read budget divided by this. A quarter
/// (8 MiB, two 4 MiB chunks, at the default budget) was enough for 8 clients' 1 MiB GETs to
/// run at the rate they had before the allocator's purge delay was shortened (`bench s3`);
/// how many reads find a buffer is not counted.
const READ_BUFFER_POOL_SHARE: usize = 4;
/// Messages buffered per reader before the coordinator waits for the client, besides its
/// read-ahead: few, since each is a slice of a chunk that stays in memory while it waits.
const READ_QUEUE_MESSAGES: usize = 2;
/// How long a put waits for enough storage nodes to accept chunks before it fails: a cluster
/// that just started has a leader a moment before its storage nodes have registered, and a
/// node that is coming back is up again within a few heartbeats.
const PLACEMENT_WAIT_MAX: Duration = Duration::from_secs(10);
/// Pause between two looks at the storage nodes while a put waits for them.
const PLACEMENT_RETRY_EVERY: Duration = Duration::from_millis(200);
pub use mendfs_meta::PATH_BYTES_MAX;
/// Chunks smaller than this stay replicated under an erasure-coded policy: K + M shards of a
/// few KiB cost more in records, fsyncs and round trips than three copies do.
pub const EC_CHUNK_BYTES_MIN: usize = 64 << 10;

/// How a write keeps its chunks: `replicate`, or `ec:K+M` for every chunk of at least
/// [`EC_CHUNK_BYTES_MIN`]. The metadata's type, since policies store it.
pub use mendfs_meta::policy::{Redundancy, StoredAs};

/// How a put asked for its redundancy: said (`--redundancy`), or left to the policy of its
/// path. Empty or absent means the policy.
pub fn requested_redundancy(text: &str) -> Result<Option<Redundancy>, Status> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(Status::invalid_argument)
}

/// How content is kept, as `stat`, `ls -l` and a put's reply say it: `ec:K+M`,
/// `replicate:N` (the cluster's replication factor, which repair keeps every replicated chunk
/// at) or `inline` (in the metadata).
pub fn describe_stored(stored: StoredAs, replication_factor: usize) -> String {
    match stored {
        StoredAs::Inline => "inline".to_string(),
        StoredAs::Replicated => format!("replicate:{replication_factor}"),
        StoredAs::Striped(scheme) => scheme.to_string(),
    }
}

/// A chunk as its prepare leaves it: listed with its copies, or without them and with the
/// stripe that holds it.
#[derive(Debug, Clone)]
struct Prepared {
    chunk: CommittedChunk,
    stripe: Option<StripeCommit>,
}

type StorageRpc = StorageClient<InterceptedService<Channel, PeerInterceptor>>;

/// Checks a file path (see `mendfs_meta::validate_path`), as a gRPC answer.
pub fn validate_path(path: &str) -> Result<(), Status> {
    mendfs_meta::validate_path(path).map_err(Status::invalid_argument)
}

#[derive(Clone)]
pub struct Coordinator {
    node: MetaNode,
    config: Arc<DataConfig>,
    /// The node's in-flight chunk budget, in slots of `INFLIGHT_SLOT_BYTES`.
    inflight: Arc<tokio::sync::Semaphore>,
    /// The node's budget for chunk bytes readers hold, the same size, apart from the uploads'
    /// so that neither direction starves the other ([`ReadBudget`]).
    read_budget: Arc<ReadBudget>,
    /// Buffers of local chunk reads, kept for the next read ([`BufferPool`]).
    read_buffers: Arc<BufferPool>,
    /// This node's own chunks, if it is a storage node: its own copies are prepared and read
    /// without a round trip through gRPC to itself.
    local: Option<Arc<LocalChunks>>,
}

impl Coordinator {
    pub fn new(node: MetaNode, config: DataConfig, local: Option<Arc<LocalChunks>>) -> Self {
        // Room for at least one whole chunk, or no upload of a big file could ever start.
        let slots = config.max_inflight_bytes.max(config.chunk_size_bytes).div_ceil(INFLIGHT_SLOT_BYTES);
        Self {
            node,
            config: Arc::new(config),
            inflight: Arc::new(tokio::sync::Semaphore::new(slots)),
            read_budget: ReadBudget::new((slots * INFLIGHT_SLOT_BYTES) as u64),
            read_buffers: BufferPool::new(slots * INFLIGHT_SLOT_BYTES / READ_BUFFER_POOL_SHARE),
            local,
        }
    }

    /// Bytes of idle read buffers kept for the next reads (for the node's metrics).
    pub fn read_buffer_pool_bytes(&self) -> usize {
        self.read_buffers.idle_bytes()
    }

    /// What the node's readers hold of its read budget now (for its metrics).
    pub fn read_budget_usage(&self) -> crate::ReadBudgetUsage {
        self.read_budget.usage()
    }

    /// The budget's slots for `bytes` of chunk data.
    fn inflight_slots(bytes: usize) -> u32 {
        bytes.div_ceil(INFLIGHT_SLOT_BYTES).max(1) as u32
    }

    /// Waits for `bytes` of the node's in-flight budget. Only a caller that holds none of it
    /// may wait here, and only holders that make progress on their own (a prepare) may hold
    /// it: then the waits cannot form a cycle.
    async fn reserve(&self, bytes: usize) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.inflight
            .clone()
            .acquire_many_owned(Self::inflight_slots(bytes))
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))
    }

    /// This node's chunk store when `id` is this node.
    fn local_store(&self, id: NodeId) -> Option<&Arc<LocalChunks>> {
        self.local.as_ref().filter(|_| id == self.node.id())
    }

    fn storage(&self, addr: &str) -> Result<StorageRpc, Status> {
        let channel = self.node.peers().channel(addr).map_err(Status::unavailable)?;
        Ok(StorageClient::with_interceptor(channel, self.node.peers().interceptor())
            .max_decoding_message_size(crate::CHUNK_BYTES_MAX + 1024)
            .max_encoding_message_size(crate::CHUNK_BYTES_MAX + 1024))
    }

    /// The placement ring over nodes that accept new chunks (up, not draining: the same rule
    /// repair uses), and every node's address.
    fn placement(&self) -> Result<(Ring, HashMap<u64, String>), Status> {
        let nodes: Vec<StorageNode> = self.node.storage_nodes()?;
        let addresses = nodes.iter().map(|n| (n.id, n.addr.clone())).collect();
        let cluster = ClusterView::new(nodes.iter().map(node_state).collect(), self.config.replication_factor);
        let ring = cluster.ring().clone();
        if ring.nodes().len() < self.config.replication_factor {
            let refused: Vec<String> = nodes
                .iter()
                .filter(|n| n.draining || n.liveness != Liveness::Up)
                .map(|n| {
                    format!(
                        "node {} {}",
                        n.id,
                        if n.draining { "draining".to_string() } else { n.liveness.to_string() }
                    )
                })
                .collect();
            return Err(Status::failed_precondition(format!(
                "{} storage nodes accept new chunks; {} copies are needed (replication factor){}",
                ring.nodes().len(),
                self.config.replication_factor,
                if refused.is_empty() {
                    String::new()
                } else {
                    format!("; not accepting: {} (`mendfs status` gives the reasons)", refused.join(", "))
                }
            )));
        }
        Ok((ring, addresses))
    }

    /// `placement`, waiting up to `deadline` while too few storage nodes accept chunks.
    async fn placement_by(&self, deadline: Instant) -> Result<(Ring, HashMap<u64, String>), Status> {
        loop {
            match self.placement() {
                Err(status)
                    if status.code() == tonic::Code::FailedPrecondition
                        && Instant::now() + PLACEMENT_RETRY_EVERY < deadline =>
                {
                    tokio::time::sleep(PLACEMENT_RETRY_EVERY).await;
                }
                placed => return placed,
            }
        }
    }

    /// Proposes one of an upload's metadata writes (a segment, the commit) through Raft. One
    /// that fails only because leadership is changing (no leader known, a leader that stepped
    /// down, a timeout) is tried again for up to `COMMIT_RETRY_FOR`: the chunks are durable and
    /// protected for the grace period, and `request_id`, derived from the upload's write id,
    /// makes a retry of a write that did apply return that first outcome instead of applying
    /// it twice.
    pub async fn propose_retrying<T, F>(&self, write: impl FnMut() -> F) -> Result<T, ApiError>
    where
        F: std::future::Future<Output = Result<T, ApiError>>,
    {
        retry_transient(COMMIT_RETRY_FOR, write).await
    }

    /// Stages one full segment of a big upload, the `number`th (from 0), whose chunks began
    /// preparing at `started`.
    async fn stage(
        &self,
        write_id: [u8; 16],
        number: u64,
        stage: StageSegment,
        stripes: Vec<StripeCommit>,
        started: Instant,
    ) -> Result<(), ApiError> {
        let request_id = upload_request_id(write_id, 2 + number);
        self.propose_retrying(|| self.node.stage_segment(request_id, stage.clone(), stripes.clone(), started)).await
    }

    /// Prepares one copy on node `id`, in a span naming that node, so a trace shows which
    /// replica failed or was slow.
    async fn send_prepare(
        &self,
        id: u64,
        addr: Option<&String>,
        hash: &ChunkHash,
        request: pb::PrepareChunkRequest,
    ) -> Result<(), String> {
        let span = tracing::info_span!(
            "prepare_chunk",
            peer = id,
            chunk = %hash.short(),
            bytes = request.data.len(),
            error = tracing::field::Empty,
        );
        let result = async {
            if let Some(local) = self.local_store(id) {
                let (local, hash) = (local.clone(), *hash);
                let grace = Duration::from_millis(request.grace_ms);
                return crate::chunk_work::run(move || local.prepare(&hash, &request.data, grace))
                    .await
                    .map_err(|e| format!("prepare task: {e}"))?
                    .map_err(|e| status_with_cause(&chunk_status(e)));
            }
            let addr = addr.ok_or("no address known")?;
            let mut client = self.storage(addr).map_err(|s| s.message().to_string())?;
            let mut request = Request::new(request);
            let timeout = self.config.chunk_rpc_timeout;
            request.set_timeout(timeout);
            answered_within(timeout, client.prepare_chunk(request)).await
        }
        .instrument(span.clone())
        .await;
        record_node_error(&span, id, result)
    }

    /// Phase one for one chunk: durable on `replication_factor` distinct nodes, or an error.
    async fn prepare_chunk(
        &self,
        ring: &Ring,
        addresses: &HashMap<u64, String>,
        write_id: &[u8],
        hash: ChunkHash,
        data: Bytes,
    ) -> Result<CommittedChunk, Status> {
        let replication_factor = self.config.replication_factor;
        // Every eligible node in preference order: the first are the chunk's home, the rest
        // stand in for any that fail.
        let candidates = ring.place_excluding(&hash, ring.nodes().len(), &BTreeSet::new());
        let request = pb::PrepareChunkRequest {
            write_id: write_id.to_vec(),
            hash: hash.to_vec(),
            data,
            grace_ms: self.config.orphan_grace.as_millis() as u64,
        };
        let mut stored = Vec::with_capacity(replication_factor);
        let mut errors = Vec::new();
        let mut next = 0;
        while stored.len() < replication_factor {
            let wanted = replication_factor - stored.len();
            let batch: Vec<u64> = candidates.iter().skip(next).take(wanted).copied().collect();
            if batch.is_empty() {
                return Err(Status::unavailable(format!(
                    "chunk {} reached only {} of {replication_factor} replicas: {}",
                    hash,
                    stored.len(),
                    errors.join("; ")
                )));
            }
            next += batch.len();
            let attempts = batch.iter().map(|id| self.send_prepare(*id, addresses.get(id), &hash, request.clone()));
            for (id, result) in batch.iter().zip(futures::future::join_all(attempts).await) {
                match result {
                    Ok(()) => stored.push(*id),
                    Err(e) => {
                        tracing::warn!(node = id, chunk = %hash, "prepare failed, trying another node: {e}");
                        errors.push(format!("node {id}: {e}"));
                    }
                }
            }
        }
        Ok(CommittedChunk { hash, size: request.data.len() as u64, replicas: stored })
    }

    /// Phase one for an erasure-coded chunk: its K + M shards each fsynced on a node of its
    /// own, the ring's choice first and the next eligible nodes for any that fail, or an error.
    async fn prepare_stripe(
        &self,
        ring: &Ring,
        addresses: &HashMap<u64, String>,
        write_id: &[u8],
        hash: ChunkHash,
        data: Bytes,
        scheme: Scheme,
    ) -> Result<StripeCommit, Status> {
        let size = data.len() as u64;
        let total = scheme.total_shards();
        let candidates = ring.place_excluding(&hash, ring.nodes().len(), &BTreeSet::new());
        if candidates.len() < total {
            return Err(Status::failed_precondition(format!(
                "{scheme} needs {total} storage nodes that accept data, one per shard; {} do",
                candidates.len()
            )));
        }
        let shards = crate::chunk_work::run(move || mendfs_erasure::encode(scheme, &data))
            .await
            .map_err(|e| Status::internal(format!("encode task: {e}")))?
            .map_err(|e| Status::internal(format!("encode chunk {hash}: {e}")))?;
        let shards: Vec<(ChunkHash, Bytes)> =
            shards.into_iter().map(|shard| (ChunkHash::of(&shard), Bytes::from(shard))).collect();
        let grace_ms = self.config.orphan_grace.as_millis() as u64;
        let mut placed: Vec<Option<NodeId>> = vec![None; total];
        let mut assigned: Vec<NodeId> = candidates[..total].to_vec();
        let mut spare = candidates[total..].iter().copied();
        let mut errors = Vec::new();
        loop {
            let pending: Vec<usize> = (0..total).filter(|&i| placed[i].is_none()).collect();
            if pending.is_empty() {
                break;
            }
            let attempts = pending.iter().map(|&i| {
                let request = pb::PrepareChunkRequest {
                    write_id: write_id.to_vec(),
                    hash: shards[i].0.to_vec(),
                    data: shards[i].1.clone(),
                    grace_ms,
                };
                self.send_prepare(assigned[i], addresses.get(&assigned[i]), &shards[i].0, request)
            });
            for (&i, result) in pending.iter().zip(futures::future::join_all(attempts).await) {
                match result {
                    Ok(()) => placed[i] = Some(assigned[i]),
                    Err(e) => {
                        tracing::warn!(node = assigned[i], chunk = %hash, shard = i, "shard prepare failed: {e}");
                        errors.push(format!("shard {i} on node {}: {e}", assigned[i]));
                        let Some(next) = spare.next() else {
                            return Err(Status::unavailable(format!(
                                "stripe of chunk {hash} ({scheme}) could not place every shard: {}",
                                errors.join("; ")
                            )));
                        };
                        assigned[i] = next;
                    }
                }
            }
        }
        let shards = shards
            .iter()
            .zip(placed)
            .map(|((shard, _), node)| ShardCommit { hash: *shard, node: node.unwrap_or_default() })
            .collect();
        Ok(StripeCommit { chunk: hash, size, scheme, shards })
    }

    /// Starts [`Coordinator::prepare_chunk`] as its own task, holding one of the node's
    /// in-flight chunk slots until it is done. A task, not a lazy future: an upload waiting for
    /// a slot or for client data must not stall the prepares it already started, or uploads
    /// holding slots could wait on each other forever.
    #[allow(clippy::too_many_arguments)]
    fn spawn_prepare(
        &self,
        slot: tokio::sync::OwnedSemaphorePermit,
        ring: &Arc<Ring>,
        addresses: &Arc<HashMap<u64, String>>,
        write_id: [u8; 16],
        hash: ChunkHash,
        data: Bytes,
        redundancy: Redundancy,
    ) -> tokio::task::JoinHandle<Result<Prepared, Status>> {
        let coordinator = self.clone();
        let (ring, addresses) = (ring.clone(), addresses.clone());
        tokio::spawn(
            async move {
                let _slot = slot;
                match redundancy {
                    Redundancy::Erasure(scheme) if data.len() >= EC_CHUNK_BYTES_MIN => {
                        let size = data.len() as u64;
                        let stripe =
                            coordinator.prepare_stripe(&ring, &addresses, &write_id, hash, data, scheme).await?;
                        let chunk = CommittedChunk { hash, size, replicas: Vec::new() };
                        Ok(Prepared { chunk, stripe: Some(stripe) })
                    }
                    _ => {
                        let chunk = coordinator.prepare_chunk(&ring, &addresses, &write_id, hash, data).await?;
                        Ok(Prepared { chunk, stripe: None })
                    }
                }
            }
            .in_current_span(),
        )
    }

    /// Reads one chunk from the first replica that returns the right bytes; `size` is the size
    /// the metadata lists (0 if unknown), for the buffer of a local read.
    async fn read_chunk(
        &self,
        hash: &ChunkHash,
        size: u64,
        replicas: &[NodeId],
        addresses: &HashMap<NodeId, String>,
    ) -> Result<Bytes, Status> {
        if replicas.is_empty() {
            return self.read_unreplicated_chunk(hash, addresses).await;
        }
        let mut order: Vec<u64> = replicas.to_vec();
        // This node first (no network hop), the others in random order to spread load.
        let me = self.node.id();
        {
            use rand::seq::SliceRandom;
            order.shuffle(&mut rand::rng());
        }
        order.sort_by_key(|id| *id != me);
        let mut errors = Vec::new();
        for id in order {
            let Some(addr) = addresses.get(&id) else {
                errors.push(format!("node {id}: address unknown"));
                continue;
            };
            let span =
                tracing::info_span!("read_chunk", peer = id, chunk = %hash.short(), error = tracing::field::Empty);
            // Whether the bytes are still to be checked against the hash: the local store's
            // read has just re-hashed them in this process, so hashing them again would only
            // double the CPU of every local read (a second BLAKE3 pass per chunk); bytes from
            // another node are checked here, end to end, whatever that node checked.
            let result: Result<(Bytes, bool), Status> = async {
                if let Some(local) = self.local_store(id) {
                    let (local, hash) = (local.clone(), *hash);
                    // The listed size is only a hint for the buffer, capped.
                    let buffer = self.read_buffers.take(usize::try_from(size).unwrap_or(0).min(crate::CHUNK_BYTES_MAX));
                    return crate::chunk_work::run(move || local.read_into(&hash, buffer))
                        .await
                        .map_err(|e| Status::internal(format!("read task: {e}")))?
                        .map(|data| (self.read_buffers.freeze(data), false))
                        .map_err(chunk_status);
                }
                let mut client = self.storage(addr)?;
                let mut request = Request::new(pb::ReadChunkRequest { hash: hash.to_vec() });
                let timeout = self.config.chunk_rpc_timeout;
                request.set_timeout(timeout);
                let reply = tokio::time::timeout(timeout, client.read_chunk(request))
                    .await
                    .map_err(|_| Status::deadline_exceeded(format!("no answer within {timeout:?}")))??;
                Ok((reply.into_inner().data, true))
            }
            .instrument(span.clone())
            .await;

            match result {
                Ok((data, unchecked)) => {
                    if !unchecked || ChunkHash::of(&data) == *hash {
                        return Ok(data);
                    }
                    span.record("error", "bytes do not match the hash");
                    errors.push(format!("node {id}: bytes do not match the hash"));
                    self.report_bad_replica(hash, id);
                }
                Err(status) => {
                    let text = status_with_cause(&status);
                    span.record("error", text.as_str());
                    errors.push(format!("node {id}: {text}"));
                    if matches!(status.code(), tonic::Code::NotFound | tonic::Code::DataLoss) {
                        self.report_bad_replica(hash, id);
                    }
                }
            }
        }
        Err(Status::unavailable(format!("no replica of chunk {hash} could be read: {}", errors.join("; "))))
    }

    /// A chunk listed without replicas: kept inline in the metadata, or erasure-coded.
    async fn read_unreplicated_chunk(
        &self,
        hash: &ChunkHash,
        addresses: &HashMap<NodeId, String>,
    ) -> Result<Bytes, Status> {
        // A striped chunk's record is almost always on this node already: read it here, with
        // no round trip to the leader per chunk.
        if let Some(stripe) = self.node.stripe_local(hash)? {
            return self.read_stripe(hash, &stripe, addresses).await;
        }
        let span = tracing::info_span!("read_inline_chunk", chunk = %hash.short(), error = tracing::field::Empty);
        let read =
            retry_transient(READ_METADATA_RETRY_FOR, || self.node.inline_chunk(*hash)).instrument(span.clone()).await;
        let gone = || {
            Status::aborted(format!(
                "chunk {hash} is gone: the content changed while it was read (replaced or deleted); read it again"
            ))
        };
        match read {
            Ok(Some(data)) => Ok(data),
            Ok(None) => match retry_transient(READ_METADATA_RETRY_FOR, || self.node.stripe(*hash)).await {
                Ok(Some(stripe)) => self.read_stripe(hash, &stripe, addresses).await,
                // Every reference to it went since the page was read: the version is gone.
                Ok(None) => {
                    span.record("error", "gone");
                    Err(gone())
                }
                Err(e) => Err(e.into()),
            },
            Err(e) => {
                span.record("error", e.to_string());
                Err(e.into())
            }
        }
    }

    /// An erasure-coded chunk from its shards: the K data shards when they all read (no
    /// decoding), else whatever K shards read, decoded here. Every shard is verified by its
    /// hash (a bad one is reported like a bad replica), and the chunk by its own.
    async fn read_stripe(
        &self,
        hash: &ChunkHash,
        stripe: &StripeRecord,
        addresses: &HashMap<NodeId, String>,
    ) -> Result<Bytes, Status> {
        let k = stripe.scheme.data_shards();
        let span = tracing::info_span!("read_stripe", chunk = %hash.short(), scheme = %stripe.scheme, error = tracing::field::Empty);
        let shard_size = stripe.scheme.shard_bytes(usize::try_from(stripe.size).unwrap_or(0)) as u64;
        let read_shards = |indexes: std::ops::Range<usize>| {
            futures::future::join_all(indexes.map(|i| {
                let slot = &stripe.shards[i];
                async move {
                    // A slot whose bad copy was unlisted waits for its rebuild: missing, not a
                    // chunk to look up elsewhere.
                    if slot.nodes.is_empty() {
                        return Err(Status::not_found("no node holds it (lost, being rebuilt)"));
                    }
                    self.read_chunk(&slot.hash, shard_size, &slot.nodes, addresses).await
                }
            }))
        };
        let mut shards: Vec<Option<Bytes>> = Vec::with_capacity(stripe.shards.len());
        let mut errors = Vec::new();
        for (i, result) in
            read_shards(0..k.min(stripe.shards.len())).instrument(span.clone()).await.into_iter().enumerate()
        {
            match result {
                Ok(shard) => shards.push(Some(shard)),
                Err(e) => {
                    errors.push(format!("shard {i}: {}", e.message()));
                    shards.push(None);
                }
            }
        }
        if shards.iter().any(Option::is_none) {
            // Degraded: the parity shards stand in for the missing data shards.
            for (i, result) in
                read_shards(k..stripe.shards.len()).instrument(span.clone()).await.into_iter().enumerate()
            {
                match result {
                    Ok(shard) => shards.push(Some(shard)),
                    Err(e) => {
                        errors.push(format!("shard {}: {}", k + i, e.message()));
                        shards.push(None);
                    }
                }
            }
        } else {
            shards.resize(stripe.shards.len(), None);
        }
        let (scheme, size) = (stripe.scheme, usize::try_from(stripe.size).unwrap_or(usize::MAX));
        let decoded = crate::chunk_work::run(move || {
            let refs: Vec<Option<&[u8]>> = shards.iter().map(|shard| shard.as_deref()).collect();
            mendfs_erasure::reconstruct(scheme, size, &refs)
        })
        .await
        .map_err(|e| Status::internal(format!("decode task: {e}")))?;
        let data = match decoded {
            Ok(data) => data,
            Err(e) => {
                let text = format!("stripe of chunk {hash}: {e} ({})", errors.join("; "));
                span.record("error", text.as_str());
                return Err(Status::unavailable(text));
            }
        };
        if ChunkHash::of(&data) != *hash {
            let text = format!("stripe of chunk {hash} decoded to other bytes (shards verified one by one)");
            span.record("error", text.as_str());
            return Err(Status::data_loss(text));
        }
        Ok(Bytes::from(data))
    }

    /// Tells the metadata that a replica is missing or corrupt (in the background: the read
    /// goes on with another copy either way).
    fn report_bad_replica(&self, hash: &ChunkHash, node_id: NodeId) {
        tracing::warn!(node = node_id, chunk = %hash, "bad replica reported");
        let node = self.node.clone();
        let hash = *hash;
        tokio::spawn(
            async move {
                if let Err(e) = node.drop_replica(hash, node_id).await {
                    tracing::warn!("reporting a bad replica: {e}");
                }
            }
            .in_current_span(),
        );
    }

    /// [`describe_stored`] with this node's replication factor; empty when not known.
    fn describe(&self, stored: Option<StoredAs>) -> String {
        stored.map(|stored| describe_stored(stored, self.config.replication_factor)).unwrap_or_default()
    }

    /// How a version whose first page was read is kept, from its first chunk: one listed with
    /// copies is replicated; one listed without is a stripe or inline, which this node's state
    /// tells, or else the leader's stripe record. None if that fails.
    async fn page_stored_as(&self, file: &FileView, page: &ChunkPage) -> Option<StoredAs> {
        if file.record.n_chunks == 0 {
            return Some(StoredAs::Inline);
        }
        let first = page.chunks.first().filter(|_| page.from_index == 0)?;
        if !first.replicas.is_empty() {
            return Some(StoredAs::Replicated);
        }
        if let Ok(Some(stored)) = self.node.chunk_stored_as(&first.hash) {
            return Some(stored);
        }
        match self.node.stripe(first.hash).await {
            Ok(Some(stripe)) => Some(StoredAs::Striped(stripe.scheme)),
            // Listed without copies and not striped: kept inline.
            Ok(None) => Some(StoredAs::Inline),
            Err(e) => {
                tracing::debug!(path = %file.path, "how the file is kept is unknown: {e}");
                None
            }
        }
    }

    /// How a listed version is kept, from the leader's first page of it; None if the version
    /// changed meanwhile or the leader could not say.
    async fn stored_as_from_leader(&self, file: &FileView) -> Option<StoredAs> {
        let version = Some(file.record.version);
        match self.node.file_chunks(Origin::LOCAL, file.path.clone(), version, 0, 1).await {
            Ok(Some((file, page))) => self.page_stored_as(&file, &page).await,
            _ => None,
        }
    }

    /// A file's summary and the first `limit` chunks of its current version.
    async fn first_page(&self, origin: Origin, path: &str, limit: u32) -> Result<(FileView, ChunkPage), Status> {
        match self.node.file_chunks(origin, path.to_string(), None, 0, limit).await? {
            Some(found) => Ok(found),
            None => Err(Status::not_found(format!("file {path} not found"))),
        }
    }

    async fn receive_upload(
        &self,
        mut stream: Streaming<pb::PutFileRequest>,
        wait_for_nodes_until: Instant,
    ) -> Result<pb::PutFileReply, Status> {
        let header = match stream.message().await? {
            Some(pb::PutFileRequest { part: Some(pb::put_file_request::Part::Header(header)) }) => header,
            _ => return Err(Status::invalid_argument("an upload starts with a header message")),
        };
        validate_path(&header.path)?;
        // A redundancy the put says wins; otherwise the policy of the path's longest matching
        // prefix, read from this node's applied state (a policy changed a moment ago may not
        // be seen yet: either way the content is durable, and the reply says what was done).
        let (redundancy, policy) = match requested_redundancy(&header.redundancy)? {
            Some(redundancy) => (redundancy, None),
            None => match self.node.policy_for_path(&header.path)? {
                Some((prefix, redundancy)) => (redundancy, Some(prefix)),
                None => (Redundancy::Replicate, None),
            },
        };
        let replication_factor = self.config.replication_factor;
        let source = FileUpload { stream, declared: header.size, received: 0 };
        self.write_content(header.path.clone(), source, wait_for_nodes_until, redundancy, |written| async move {
            let commit = CommitFile {
                path: header.path.clone(),
                size: written.size,
                // 0 (the usual): the apply stamps the state clock, not this node's date.
                mtime_ms: header.mtime_ms,
                content_hash: written.content_hash.to_vec(),
                upload_id: written.upload_id,
                first_index: written.first_index,
                // Filled in by the leader, from `prepare_started`.
                prepared_at_ms: 0,
                chunks: written.chunks,
                expected_version: header.expected_version,
                grace_ms: written.grace_ms,
            };
            let committing =
                tracing::info_span!("commit_file", chunks = written.n_chunks, error = tracing::field::Empty);
            let (request_id, started, carried) = (written.request_id, written.prepare_started, written.carried);
            let committed = self
                .propose_retrying(|| self.node.commit_file(request_id, commit.clone(), carried.clone(), started))
                .instrument(committing.clone())
                .await;
            if let Err(e) = &committed {
                committing.record("error", e.to_string());
            }
            let FileCommitted { version, .. } = committed?;
            Ok(pb::PutFileReply {
                version,
                size: written.size,
                content_hash: written.content_hash.to_vec(),
                chunks: written.n_chunks,
                redundancy: describe_stored(written.stored_as, replication_factor),
                policy: policy.unwrap_or_default(),
                fallback: written.fallback.unwrap_or_default(),
            })
        })
        .await
    }

    /// Phase one of a write, for any kind of content: places, prepares and stages the chunks
    /// of everything `source` yields, labelled `label` in the metadata (a file's path, an S3
    /// object's label), then hands the result to `commit` (phase two). If anything fails, what
    /// the metadata staged is released now rather than at the upload's expiry.
    pub async fn write_content<T, F, Fut>(
        &self,
        label: String,
        source: impl UploadSource,
        wait_for_nodes_until: Instant,
        redundancy: Redundancy,
        commit: F,
    ) -> Result<T, Status>
    where
        F: FnOnce(WrittenContent) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let (ring, addresses) = self.placement_by(wait_for_nodes_until).await?;
        let (redundancy, fallback) = self.fall_back_if_too_few_nodes(redundancy, &ring);
        let write_id: [u8; 16] = rand::random();
        let chunk_size = self.config.chunk_size_bytes;
        let grace_ms = self.config.orphan_grace.as_millis() as u64;
        let segment_bytes =
            SEGMENT_DATA_BYTES_MAX.min(SEGMENT_RATE_FLOOR_BYTES_PER_SEC.saturating_mul(grace_ms) / 4_000);
        let mut segment_chunks = segment_chunks_for(self.config.replication_factor)
            .min((segment_bytes / chunk_size.max(1) as u64).max(1) as usize);
        if let Redundancy::Erasure(scheme) = redundancy {
            // Every chunk of a segment may be striped, and its stripe travels with the segment.
            segment_chunks = segment_chunks.min(mendfs_meta::segment_stripes_for(scheme.total_shards()));
        }
        let mut list = SegmentedList::new(write_id, label, segment_chunks, grace_ms);
        let written = match self.write_chunks(source, Arc::new(ring), Arc::new(addresses), redundancy, &mut list).await
        {
            Ok((size, content_hash, inline)) => {
                let n_chunks = list.staged_chunks + list.current.len() as u64;
                let stored_as = match redundancy {
                    _ if inline.is_some() || n_chunks == 0 => StoredAs::Inline,
                    Redundancy::Erasure(scheme) if list.striped_chunks > 0 => StoredAs::Striped(scheme),
                    _ => StoredAs::Replicated,
                };
                let written = WrittenContent {
                    size,
                    content_hash,
                    n_chunks,
                    upload_id: (list.staged_chunks > 0).then_some(list.upload_id),
                    first_index: list.staged_chunks,
                    prepare_started: list.current_started(),
                    chunks: std::mem::take(&mut list.current),
                    grace_ms: list.grace_ms,
                    request_id: upload_request_id(list.write_id, 1),
                    stored_as,
                    fallback,
                    carried: Carried {
                        inline: inline.map(|data| InlineChunk { data }).into_iter().collect(),
                        stripes: std::mem::take(&mut list.current_stripes),
                    },
                };
                commit(written).await
            }
            Err(e) => Err(e),
        };
        if written.is_err() && list.staged_chunks > 0 {
            // If this fails, or comes after a commit whose answer was lost, the expiry (or
            // nothing: a committed upload is gone) is what remains.
            let (node, upload_id) = (self.node.clone(), list.upload_id);
            tokio::spawn(
                async move {
                    if let Err(e) = node.abort_upload(upload_id).await {
                        tracing::warn!(upload = upload_id, "releasing a failed upload's segments: {e}");
                    }
                }
                .in_current_span(),
            );
        }
        written
    }

    /// An erasure-coded write with fewer storage nodes accepting data than its shards: kept
    /// as the cluster's copies when the node is configured so (`--ec-fallback replicate`),
    /// with the reason for the reply; otherwise unchanged, and its first stripe refuses it.
    /// Decided once, at the start: a node lost mid-write fails the write as it would anyway.
    fn fall_back_if_too_few_nodes(&self, redundancy: Redundancy, ring: &Ring) -> (Redundancy, Option<String>) {
        match redundancy {
            Redundancy::Erasure(scheme)
                if self.config.ec_fallback_replicate && ring.nodes().len() < scheme.total_shards() =>
            {
                let why = format!(
                    "{scheme} needs {} storage nodes that accept data, one per shard; {} do: kept as replicate:{} \
                     (--ec-fallback replicate)",
                    scheme.total_shards(),
                    ring.nodes().len(),
                    self.config.replication_factor
                );
                tracing::warn!("{why}");
                (Redundancy::Replicate, Some(why))
            }
            other => (other, None),
        }
    }

    /// Prepares the chunks of everything `source` yields and stages the full segments;
    /// returns the size and the BLAKE3 of the content, and the content itself if it is small
    /// enough to be kept inline in the metadata (`DataConfig::inline_max_bytes`): then it is
    /// the list's one chunk, prepared nowhere. Replicated content is streamed to its replicas
    /// (`write_streamed`); what follows is the erasure-coded path, which needs each chunk whole
    /// to encode it. A chunk takes its share of the node's
    /// in-flight budget once it is whole, and holds it until its replicas have it. Never while
    /// it is being filled: an upload that held budget while it waited for its client's data
    /// could wait forever, since uploads on one HTTP/2 connection share its flow-control
    /// window, and uploads waiting for budget stop reading (their unread data fills that
    /// window). An upload's own memory is the chunk it fills.
    async fn write_chunks(
        &self,
        mut source: impl UploadSource,
        ring: Arc<Ring>,
        addresses: Arc<HashMap<u64, String>>,
        redundancy: Redundancy,
        list: &mut SegmentedList,
    ) -> Result<(u64, [u8; 32], Option<Vec<u8>>), Status> {
        if !matches!(redundancy, Redundancy::Erasure(_)) {
            return self.write_streamed(source, ring, addresses, list).await;
        }
        let chunk_size = self.config.chunk_size_bytes;
        let mut content_hash = blake3::Hasher::new();
        let mut size = 0u64;
        let mut buffer: Vec<u8> = Vec::new();
        let mut in_flight = FuturesOrdered::new();
        while let Some(data) = source.next_data().await? {
            content_hash.update(&data);
            size += data.len() as u64;
            let mut rest = &data[..];
            while !rest.is_empty() {
                if buffer.capacity() == 0 {
                    // Sized for what the source says is left (a small file holds only its
                    // size), a whole chunk when it cannot say.
                    let left = source.remaining_hint().map_or(chunk_size as u64, |left| left + rest.len() as u64);
                    buffer.reserve_exact(left.min(chunk_size as u64) as usize);
                }
                let take = (chunk_size - buffer.len()).min(rest.len());
                buffer.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if buffer.len() == chunk_size {
                    let chunk = HashedChunk::of(std::mem::take(&mut buffer));
                    self.prepare_next(list, &mut in_flight, &ring, &addresses, redundancy, chunk).await?;
                }
            }
        }
        let content_hash = *content_hash.finalize().as_bytes();
        // Nothing prepared yet means the buffer holds the whole content.
        if !buffer.is_empty() && list.started_chunks == 0 && buffer.len() <= self.config.inline_max_bytes {
            list.chunk_starting();
            list.current.push(CommittedChunk { hash: ChunkHash::of(&buffer), size, replicas: Vec::new() });
            return Ok((size, content_hash, Some(buffer)));
        }
        if !buffer.is_empty() {
            self.prepare_next(list, &mut in_flight, &ring, &addresses, redundancy, HashedChunk::of(buffer)).await?;
        }
        self.settle(list, &mut in_flight, 0).await?;
        Ok((size, content_hash, None))
    }

    /// Starts preparing the upload's next chunk, holding its share of the in-flight budget
    /// until its replicas have it, then takes in prepared chunks (in order) until fewer than
    /// the upload's window are left in flight. A chunk the upload already listed is not
    /// prepared again: it goes into the list as a repeat, a reference to the copies its first
    /// listing made.
    async fn prepare_next(
        &self,
        list: &mut SegmentedList,
        in_flight: &mut PreparesInFlight,
        ring: &Arc<Ring>,
        addresses: &Arc<HashMap<u64, String>>,
        redundancy: Redundancy,
        chunk: HashedChunk,
    ) -> Result<(), Status> {
        let HashedChunk { data, hash } = chunk;
        list.chunk_starting();
        if list.is_repeat(&hash) {
            let repeat = CommittedChunk { hash, size: data.len() as u64, replicas: Vec::new() };
            in_flight.push_back(Box::pin(std::future::ready(Ok(Prepared { chunk: repeat, stripe: None }))));
        } else {
            // Waits holding no budget: whoever holds it is a prepare that finishes on its own.
            let permit = self.reserve(data.len()).await?;
            let prepare =
                self.spawn_prepare(permit, ring, addresses, list.write_id, hash, Bytes::from(data), redundancy);
            in_flight.push_back(Box::pin(async move {
                prepare.await.map_err(|e| Status::internal(format!("prepare task: {e}")))?
            }));
        }
        let window = (PREPARE_BYTES_IN_FLIGHT_MAX / self.config.chunk_size_bytes.max(1))
            .clamp(PREPARE_CHUNKS_IN_FLIGHT_MIN, PREPARE_CHUNKS_IN_FLIGHT_MAX);
        self.settle(list, in_flight, window - 1).await
    }

    /// Takes in prepared chunks, in order, until at most `keep` are still in flight; stages
    /// each segment that fills.
    async fn settle(
        &self,
        list: &mut SegmentedList,
        in_flight: &mut PreparesInFlight,
        keep: usize,
    ) -> Result<(), Status> {
        while in_flight.len() > keep {
            let Some(prepared) = in_flight.next().await else { break };
            if let Some((number, stage, stripes, started)) = list.push(prepared?) {
                let staging = tracing::info_span!(
                    "stage_segment",
                    first_chunk = stage.first_index,
                    chunks = stage.chunks.len(),
                    error = tracing::field::Empty,
                );
                let staged =
                    self.stage(list.write_id, number, stage, stripes, started).instrument(staging.clone()).await;
                if let Err(e) = &staged {
                    staging.record("error", e.to_string());
                }
                staged?;
            }
        }
        Ok(())
    }

    /// Streams `range` of a content's bytes to `tx` in order, page by page: with a few chunks
    /// (or a few MiB of small ones) fetched ahead and the next page asked for when this one is
    /// used up, so memory is a page of chunk references plus the read-ahead, whatever the
    /// content's size. Chunks wholly outside the range are never read. A page of a version that
    /// is no longer current (an overwrite or a delete while reading) ends the stream with
    /// `Aborted`. `messages` says how the data is cut into the stream's messages.
    pub async fn stream_content<M>(
        &self,
        content: &ContentRef,
        n_chunks: u64,
        first: ChunkPage,
        range: std::ops::Range<u64>,
        tx: &mpsc::Sender<Result<M, Status>>,
        messages: DataMessages<M>,
    ) -> Result<(), Status> {
        let DataMessages { piece_bytes, wrap } = messages;
        // A zero piece size would never make progress slicing a chunk; one byte is the least.
        let piece_bytes = piece_bytes.max(1);
        let mut next_index = first.from_index + first.chunks.len() as u64;
        let mut addresses = self.addresses_for(&first.chunks).await?;
        let mut listed = first.chunks.into_iter().peekable();
        let mut ahead = FuturesOrdered::new();
        let mut ahead_bytes = 0u64;
        // Where the next listed chunk starts in the content.
        let mut offset = 0u64;
        let mut sent_to = range.start;
        // Small pieces not yet sent, gathered into messages of up to `piece_bytes`;
        // a big piece goes out as slices of its chunk, not copied.
        let mut unsent = BytesMut::new();
        // Resolves once the bytes of the chunk fetched last have all gone out.
        let mut previous_released: Option<tokio::sync::oneshot::Receiver<()>> = None;
        loop {
            while offset < range.end
                && (ahead.is_empty() || (ahead.len() < READ_AHEAD_CHUNKS_MAX && ahead_bytes < READ_AHEAD_BYTES_MAX))
            {
                let chunk = match listed.peek() {
                    Some(chunk) => chunk,
                    None if next_index < n_chunks => {
                        let page = self.next_page(content, next_index).await?;
                        if page.chunks.is_empty() {
                            return Err(Status::internal(format!(
                                "an empty chunk page at chunk {next_index} of {content}"
                            )));
                        }
                        next_index += page.chunks.len() as u64;
                        // A long read may meet copies that repair put on a node added since
                        // it began.
                        addresses = self.addresses_for(&page.chunks).await?;
                        listed = page.chunks.into_iter().peekable();
                        continue;
                    }
                    None => break,
                };
                let chunk_start = offset;
                if chunk_start + chunk.size <= range.start {
                    offset += chunk.size;
                    listed.next();
                    continue;
                }
                // The chunk due next may overdraw the budget up to its hard cap, so every
                // reader moves on its own and none waits for another's client until then (over
                // the budget it first lets its own previous chunk go out; at the cap it waits
                // for room, see `ReadBudget`); the ones after it only with room in the budget.
                // The charge goes with the bytes, until the last of their slices has been
                // handed to the transport.
                let mut charge = if ahead.is_empty() {
                    if !self.read_budget.has_room_for(chunk.size) {
                        if let Some(released) = previous_released.take() {
                            // Err: the charge went without a word, which is just as good.
                            let _ = released.await;
                        }
                    }
                    self.read_budget.charge_due(chunk.size, READ_BUDGET_PATIENCE).await.map_err(Status::unavailable)?
                } else {
                    match self.read_budget.try_charge_ahead(chunk.size) {
                        Some(charge) => charge,
                        None => break,
                    }
                };
                previous_released = Some(charge.on_release());
                let Some(chunk) = listed.next() else { break };
                offset += chunk.size;
                // The part of the chunk inside the range.
                let keep = (range.start.max(chunk_start) - chunk_start) as usize
                    ..(range.end.min(offset) - chunk_start) as usize;
                let addresses = addresses.clone();
                ahead_bytes += chunk.size;
                ahead.push_back(async move {
                    let read = self.read_chunk(&chunk.hash, chunk.size, &chunk.replicas, &addresses).await;
                    (chunk.size, keep, read.map(|data| charge.attach(data)))
                });
            }
            let Some((size, keep, read)) = ahead.next().await else { break };
            ahead_bytes -= size;
            let data = read?;
            if keep.end > data.len() {
                return Err(Status::internal(format!(
                    "a chunk of {content} has {} bytes, not the {size} listed",
                    data.len()
                )));
            }
            let mut piece = data.slice(keep);
            sent_to += piece.len() as u64;
            // Top up what is gathered to a whole message, then whole messages straight from
            // the chunk, and gather the tail.
            if !unsent.is_empty() {
                let take = (piece_bytes - unsent.len()).min(piece.len());
                unsent.extend_from_slice(&piece.split_to(take));
                if unsent.len() == piece_bytes && tx.send(Ok(wrap(unsent.split().freeze()))).await.is_err() {
                    return Ok(());
                }
            }
            while piece.len() >= piece_bytes {
                if tx.send(Ok(wrap(piece.split_to(piece_bytes)))).await.is_err() {
                    return Ok(());
                }
            }
            unsent.extend_from_slice(&piece);
        }
        if !unsent.is_empty() && tx.send(Ok(wrap(unsent.freeze()))).await.is_err() {
            return Ok(());
        }
        if sent_to != range.end {
            return Err(Status::internal(format!(
                "the chunk list of {content} ended at byte {sent_to}, short of {}",
                range.end
            )));
        }
        Ok(())
    }

    /// Every storage node's address, from this node's state.
    fn addresses(&self) -> Result<Arc<HashMap<u64, String>>, Status> {
        Ok(Arc::new(self.node.storage_nodes()?.into_iter().map(|n| (n.id, n.addr)).collect()))
    }

    /// The addresses of every replica `chunks` name. The page came from the leader; this
    /// node's own state may not have applied a node's registration yet (a learner still
    /// catching up, a follower a little behind), so a replica it cannot place sends it to the
    /// leader for the list, which is at least as new as the page.
    async fn addresses_for(&self, chunks: &[ChunkRef]) -> Result<Arc<HashMap<u64, String>>, Status> {
        let local = self.addresses()?;
        let all_known = chunks.iter().flat_map(|c| &c.replicas).all(|id| local.contains_key(id));
        if all_known {
            return Ok(local);
        }
        let nodes = self.node.storage_nodes_from_leader(Origin::LOCAL).await?;
        Ok(Arc::new(nodes.into_iter().map(|n| (n.id, n.addr)).collect()))
    }

    /// The page of a content's version from `from_index`; `Aborted` once that version is gone.
    async fn next_page(&self, content: &ContentRef, from_index: u64) -> Result<ChunkPage, Status> {
        // A read under way rides out a leader change rather than failing half-streamed.
        let page = retry_transient(READ_METADATA_RETRY_FOR, || async {
            match content {
                ContentRef::File { path, version } => self
                    .node
                    .file_chunks(Origin::LOCAL, path.clone(), Some(*version), from_index, CHUNK_PAGE_CHUNKS_MAX)
                    .await
                    .and_then(|page| page.map(|(_, page)| page).ok_or(ApiError::NotFound(path.clone()))),
                ContentRef::Object { bucket, key, pieces } => {
                    self.node
                        .s3_object_page(bucket.clone(), key.clone(), *pieces, from_index, CHUNK_PAGE_CHUNKS_MAX)
                        .await
                }
            }
        })
        .await;
        match page {
            Ok(page) => Ok(page),
            Err(
                ApiError::NotFound(_)
                | ApiError::Command(
                    mendfs_meta::CommandError::VersionMismatch { .. }
                    | mendfs_meta::CommandError::PreconditionFailed { .. }
                    | mendfs_meta::CommandError::NoSuchBucket { .. },
                ),
            ) => Err(Status::aborted(format!(
                "{content} changed while it was read (replaced or deleted); read it again"
            ))),
            Err(e) => Err(e.into()),
        }
    }
}

/// How [`Coordinator::stream_content`] sends data: in pieces of `piece_bytes` (but for the
/// last), each wrapped into a message by `wrap`. A `piece_bytes` of 0 is read as 1.
#[derive(Debug, Clone, Copy)]
pub struct DataMessages<M> {
    pub piece_bytes: usize,
    pub wrap: fn(Bytes) -> M,
}

/// The version of a content a reader streams.
#[derive(Debug, Clone)]
pub enum ContentRef {
    File {
        path: String,
        version: u64,
    },
    /// An S3 object's content, named by its piece list.
    Object {
        bucket: String,
        key: String,
        pieces: u64,
    },
}

impl std::fmt::Display for ContentRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContentRef::File { path, version } => write!(f, "{path} (version {version})"),
            ContentRef::Object { bucket, key, .. } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

type PrepareInFlight = Pin<Box<dyn std::future::Future<Output = Result<Prepared, Status>> + Send>>;
type PreparesInFlight = FuturesOrdered<PrepareInFlight>;

/// Client bytes forwarded to a replica's stream at a time: a client message (1 MiB) is cut
/// into slices of this size (sharing its buffer, no copy), so the budget is charged and given
/// back in small steps and each remote stream's encoder holds at most one slice beside its
/// HTTP/2 window.
const FORWARD_PIECE_BYTES: usize = 256 << 10;

/// The start of a chunk buffered before its streams open: a chunk that ends within it is
/// prepared whole, as before streaming (one unary call per replica, no stream set up, and a
/// repeat costs nothing), which keeps small chunks and a file's tail cheap. The same as a
/// slice, so that a streamed chunk's buffered start goes out as one.
const STREAM_AFTER_BYTES: usize = FORWARD_PIECE_BYTES;

/// Slices queued for one replica's stream before forwarding to it waits: a little slack so a
/// replica's short pauses (an fsync of another chunk) do not stall the upload.
const REPLICA_QUEUE_PIECES: usize = 4;

/// A message on its way to one replica's chunk stream.
enum ToReplica {
    /// A slice of the chunk, with its share of the node's in-flight budget: given back once
    /// every replica's stream has taken the slice (the last clone of the permit drops).
    Data(Bytes, Arc<tokio::sync::OwnedSemaphorePermit>),
    /// The chunk's bytes are complete: its hash, which the replica checks before it keeps it.
    End(ChunkHash),
}

/// One replica's stream of the chunk being forwarded: a gRPC `PrepareChunkStream` call, or a
/// writer into this node's own store, fed through a short queue by the upload.
struct ReplicaStream {
    id: NodeId,
    /// None once the replica failed or was sent the end.
    tx: Option<mpsc::Sender<ToReplica>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
    /// Why the coordinator gave up on this replica mid-stream.
    failed: Option<String>,
    span: tracing::Span,
}

impl ReplicaStream {
    /// Gives the replica up. Its task goes too: the slices still queued for it hold shares of
    /// the node's in-flight budget, and a replica that takes nothing (a hung disk behind a
    /// live process) would keep them until its own deadline, minutes, starving every upload.
    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            tracing::warn!(node = self.id, "chunk stream to a replica failed: {why}");
            self.span.record("error", format!("node {}: {why}", self.id));
            self.failed = Some(why);
        }
        self.tx = None;
        self.task.abort();
    }

    /// Sends `message`, waiting at most `timeout` for room: a replica that takes nothing for
    /// that long (stalled, SIGSTOPped, partitioned) is given up.
    async fn send(&mut self, message: ToReplica, timeout: Duration) {
        let Some(tx) = &self.tx else { return };
        match tokio::time::timeout(timeout, tx.send(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                let why = self.why_ended_early(timeout).await;
                self.fail(why);
            }
            Err(_) => self.fail(format!("took no data for {timeout:?}")),
        }
    }

    /// The reason a replica's stream stopped taking data before its chunk ended: the call's
    /// own answer (a full disk, a refused write), which the caller must see, not a bare "ended
    /// early". The queue closes as the call ends, so its answer follows at once; `timeout`
    /// only bounds a transport that never settles. The task is awaited here at most once:
    /// `fail` follows, and a failed replica's task is never polled again.
    async fn why_ended_early(&mut self, timeout: Duration) -> String {
        match tokio::time::timeout(timeout, &mut self.task).await {
            Ok(Ok(Err(e))) => e,
            Ok(Ok(Ok(()))) => "the replica answered before the chunk's end".to_string(),
            Ok(Err(e)) => format!("chunk stream task: {e}"),
            Err(_) => "the replica's stream ended early and gave no reason".to_string(),
        }
    }
}

impl Drop for ReplicaStream {
    /// A chunk given up (its upload failed or its client went away) ends its calls: each
    /// replica sees its stream break and keeps nothing, and the budget its queue holds returns.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The chunk an upload is forwarding: its replicas' streams, its length and running hash.
struct ChunkStream {
    /// Every eligible node in ring order for `key`: the first RF were streamed to, the rest
    /// stand in for any that fail.
    candidates: Vec<NodeId>,
    replicas: Vec<ReplicaStream>,
    /// None for a chunk that starts the content: its hash is the content's hash so far, which
    /// the upload computes anyway, so its bytes are not hashed twice.
    hasher: Option<blake3::Hasher>,
    len: usize,
}

impl ChunkStream {
    fn errors(&self) -> Vec<String> {
        self.replicas.iter().filter_map(|r| r.failed.as_ref().map(|why| format!("node {}: {why}", r.id))).collect()
    }
}

/// What an upload that forwards chunks keeps between them.
struct Forwarding {
    ring: Arc<Ring>,
    addresses: Arc<HashMap<u64, String>>,
    write_id: [u8; 16],
    /// Nodes that failed a chunk of this upload: later chunks go elsewhere while enough other
    /// nodes remain, so a dead node costs the upload one timeout, not one per chunk.
    avoid: Arc<std::sync::Mutex<BTreeSet<NodeId>>>,
}

/// The ring key of an upload's `index`th chunk: streamed chunks are placed before their hash
/// is known, so by the write id and the index instead (uniform like a hash, distinct per chunk
/// and per upload). Reads, repair and GC go by the replicas the metadata records, so nothing
/// else needs to find a chunk by its ring position.
fn streamed_chunk_key(write_id: &[u8; 16], index: u64) -> ChunkHash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mendfs streamed chunk placement");
    hasher.update(write_id);
    hasher.update(&index.to_be_bytes());
    ChunkHash::from_bytes(*hasher.finalize().as_bytes())
}

impl Coordinator {
    /// Opens the streams of the upload's next chunk (index `index`, at most `declared` bytes)
    /// to the first RF nodes in ring order for its key.
    fn open_chunk_stream(
        &self,
        forwarding: &Forwarding,
        index: u64,
        declared: usize,
        starts_content: bool,
    ) -> ChunkStream {
        let replication_factor = self.config.replication_factor;
        let key = streamed_chunk_key(&forwarding.write_id, index);
        let all = forwarding.ring.nodes().len();
        let avoid = forwarding.avoid.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let mut candidates = forwarding.ring.place_excluding(&key, all, &avoid);
        if candidates.len() < replication_factor {
            // Too few nodes left without the ones that failed before: try them again.
            candidates = forwarding.ring.place_excluding(&key, all, &BTreeSet::new());
        }
        let replicas = candidates
            .iter()
            .take(replication_factor)
            .map(|&id| self.open_replica_stream(forwarding, id, declared))
            .collect();
        ChunkStream { candidates, replicas, hasher: (!starts_content).then(blake3::Hasher::new), len: 0 }
    }

    /// Starts one replica's stream: a task that writes into this node's own store, or a
    /// `PrepareChunkStream` call, in a span naming the replica.
    fn open_replica_stream(&self, forwarding: &Forwarding, id: NodeId, declared: usize) -> ReplicaStream {
        let span = tracing::info_span!(
            "prepare_chunk",
            peer = id,
            chunk = tracing::field::Empty,
            bytes = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let (tx, mut rx) = mpsc::channel::<ToReplica>(REPLICA_QUEUE_PIECES);
        let grace = self.config.orphan_grace;
        let task = if let Some(local) = self.local_store(id) {
            let local = local.clone();
            tokio::spawn(
                async move {
                    let starting = local.clone();
                    let mut chunk = crate::chunk_work::run(move || {
                        starting.begin_streamed(declared as u64, StreamCheck::CallerHashed)
                    })
                    .await
                    .map_err(|e| format!("chunk stream task: {e}"))?
                    .map_err(|e| status_with_cause(&chunk_status(e)))?;
                    while let Some(message) = rx.recv().await {
                        match message {
                            ToReplica::Data(data, permit) => {
                                chunk = crate::chunk_work::run(move || chunk.write(&data).map(|()| chunk))
                                    .await
                                    .map_err(|e| format!("chunk stream task: {e}"))?
                                    .map_err(|e| status_with_cause(&chunk_status(e)))?;
                                drop(permit);
                            }
                            ToReplica::End(hash) => {
                                return crate::chunk_work::run(move || chunk.finish(&hash, grace))
                                    .await
                                    .map_err(|e| format!("chunk stream task: {e}"))?
                                    .map_err(|e| status_with_cause(&chunk_status(e)));
                            }
                        }
                    }
                    Err("the chunk's stream ended without its hash".to_string())
                }
                .instrument(span.clone()),
            )
        } else {
            let client = match forwarding.addresses.get(&id) {
                Some(addr) => self.storage(addr).map_err(|s| s.message().to_string()),
                None => Err("no address known".to_string()),
            };
            let header = pb::PrepareChunkPiece {
                header: Some(pb::PrepareChunkHeader {
                    write_id: forwarding.write_id.to_vec(),
                    grace_ms: grace.as_millis() as u64,
                    size: declared as u64,
                }),
                ..Default::default()
            };
            let pieces = futures::stream::once(std::future::ready(header)).chain(
                futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(|message| match message {
                    // Taken by the call: the slice's budget share goes back (with the last
                    // replica's), the transport holds at most this slice beside its window.
                    ToReplica::Data(data, permit) => {
                        drop(permit);
                        pb::PrepareChunkPiece { data, ..Default::default() }
                    }
                    ToReplica::End(hash) => pb::PrepareChunkPiece { hash: hash.to_vec(), ..Default::default() },
                }),
            );
            tokio::spawn(
                async move {
                    let mut client = client?;
                    // No deadline on the call: it lasts as long as the client takes to send the
                    // chunk. The coordinator bounds each wait for the replica instead (taking a
                    // slice, answering the end), and the replica bounds the whole stream.
                    client.prepare_chunk_stream(Request::new(pieces)).await.map(drop).map_err(|s| status_with_cause(&s))
                }
                .instrument(span.clone()),
            )
        };
        ReplicaStream { id, tx: Some(tx), task, failed: None, span }
    }

    /// Forwards `data`, the next bytes of the chunk, to its replicas' streams, a slice at a
    /// time. Each slice takes its share of the node's in-flight budget only now that it has
    /// arrived, and gives it back once every replica's stream has taken it. So budget is held
    /// only by slices queued for replica streams, which drain on their own (they wait for
    /// their replica, never for a client or for budget), and an upload waiting for budget or
    /// for its client's data holds nothing that another upload waits for: no cycle of waits can
    /// form, even between uploads sharing one HTTP/2 connection's flow-control window (an
    /// upload waiting here stops reading its stream, but every slice it holds budget for
    /// drains without it).
    async fn forward(&self, chunk: &mut ChunkStream, mut data: Bytes) -> Result<(), Status> {
        if let Some(hasher) = chunk.hasher.as_mut() {
            hasher.update(&data);
        }
        chunk.len += data.len();
        let timeout = self.config.chunk_rpc_timeout;
        while !data.is_empty() {
            let slice = data.split_to(data.len().min(FORWARD_PIECE_BYTES));
            let permit = Arc::new(self.reserve(slice.len()).await?);
            for replica in &mut chunk.replicas {
                replica.send(ToReplica::Data(slice.clone(), permit.clone()), timeout).await;
            }
            if chunk.replicas.iter().all(|replica| replica.tx.is_none()) {
                return Err(Status::unavailable(format!(
                    "a chunk reached none of its replicas: {}",
                    chunk.errors().join("; ")
                )));
            }
        }
        Ok(())
    }

    /// Ends the chunk whose bytes are complete. A repeat of a chunk this upload already listed
    /// drops its streams (the replicas keep nothing) and is listed without replicas. Otherwise
    /// the replicas are sent its hash, and a task waits for their answers and makes up any copy
    /// that failed from a survivor (`settle_streamed`): the chunk counts as prepared only with
    /// RF fsynced copies.
    /// `content_so_far` hashes every byte of the content up to the end of this chunk, and no
    /// more: the hash of a chunk that starts the content.
    fn end_chunk(
        &self,
        forwarding: &Forwarding,
        list: &mut SegmentedList,
        chunk: ChunkStream,
        content_so_far: &blake3::Hasher,
    ) -> PrepareInFlight {
        let hash = ChunkHash::from_bytes(*chunk.hasher.as_ref().unwrap_or(content_so_far).finalize().as_bytes());
        let size = chunk.len as u64;
        if list.is_repeat(&hash) {
            for replica in &chunk.replicas {
                // The call is dropped, so the replica sees its stream break and keeps nothing.
                replica.task.abort();
            }
            let repeat = CommittedChunk { hash, size, replicas: Vec::new() };
            return Box::pin(std::future::ready(Ok(Prepared { chunk: repeat, stripe: None })));
        }
        let coordinator = self.clone();
        let (addresses, avoid) = (forwarding.addresses.clone(), forwarding.avoid.clone());
        // Aborted if the upload is dropped (its client went away, another chunk failed): a
        // put that will not commit gets no more fsyncs or stand-in copies, only orphans GC
        // collects.
        let settling = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            async move {
                let chunk = coordinator.settle_streamed(chunk, hash, &addresses, &avoid).await?;
                Ok(Prepared { chunk, stripe: None })
            }
            .in_current_span(),
        ));
        Box::pin(async move { settling.await.map_err(|e| Status::internal(format!("prepare task: {e}")))? })
    }

    /// Sends the end to every replica still streaming, waits (within the chunk RPC timeout)
    /// for each to answer that its copy is fsynced, and copies the chunk from a survivor to
    /// the next nodes in ring order until RF nodes have it. No survivor: the chunk, and so the
    /// put, fails.
    async fn settle_streamed(
        &self,
        mut chunk: ChunkStream,
        hash: ChunkHash,
        addresses: &HashMap<u64, String>,
        avoid: &std::sync::Mutex<BTreeSet<NodeId>>,
    ) -> Result<CommittedChunk, Status> {
        let timeout = self.config.chunk_rpc_timeout;
        for replica in &mut chunk.replicas {
            replica.span.record("chunk", tracing::field::display(hash.short()));
            replica.span.record("bytes", chunk.len);
            replica.send(ToReplica::End(hash), timeout).await;
            // Nothing more to send: the call's request ends here.
            replica.tx = None;
        }
        let mut stored = Vec::new();
        let mut errors = Vec::new();
        for replica in &mut chunk.replicas {
            if let Some(why) = &replica.failed {
                // Already the call's own error when it ended by itself (`why_ended_early`).
                errors.push(format!("node {}: {why}", replica.id));
                continue;
            }
            match tokio::time::timeout(timeout, &mut replica.task).await {
                Ok(Ok(Ok(()))) => stored.push(replica.id),
                Ok(Ok(Err(e))) => {
                    replica.fail(e.clone());
                    errors.push(format!("node {}: {e}", replica.id));
                }
                Ok(Err(e)) => errors.push(format!("node {}: chunk stream task: {e}", replica.id)),
                Err(_) => {
                    replica.task.abort();
                    replica.fail(format!("no answer within {timeout:?}"));
                    errors.push(format!("node {}: no answer within {timeout:?}", replica.id));
                }
            }
        }
        let tried: BTreeSet<NodeId> = chunk.replicas.iter().map(|replica| replica.id).collect();
        {
            let mut avoid = avoid.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            avoid.extend(chunk.replicas.iter().filter(|replica| replica.failed.is_some()).map(|replica| replica.id));
        }
        let replication_factor = self.config.replication_factor;
        if stored.is_empty() {
            return Err(Status::unavailable(format!(
                "chunk {hash} reached none of its {replication_factor} replicas: {}",
                errors.join("; ")
            )));
        }
        if stored.len() < replication_factor {
            let sources: Vec<String> = stored.iter().filter_map(|id| addresses.get(id).cloned()).collect();
            let stand_ins = chunk.candidates.iter().filter(|id| !tried.contains(id)).copied().collect::<Vec<_>>();
            for id in stand_ins {
                if stored.len() == replication_factor {
                    break;
                }
                match self.copy_to(id, addresses.get(&id), hash, &sources).await {
                    Ok(()) => stored.push(id),
                    Err(e) => {
                        tracing::warn!(node = id, chunk = %hash, "copying a chunk to a stand-in failed: {e}");
                        errors.push(format!("node {id}: {e}"));
                    }
                }
            }
            if stored.len() < replication_factor {
                return Err(Status::unavailable(format!(
                    "chunk {hash} reached only {} of {replication_factor} replicas: {}",
                    stored.len(),
                    errors.join("; ")
                )));
            }
        }
        Ok(CommittedChunk { hash, size: chunk.len as u64, replicas: stored })
    }

    /// Copies a chunk that some replicas have (`sources`, their addresses) onto node `id`, a
    /// stand-in for a replica that failed mid-stream: `ReplicateChunk` on that node, which
    /// pulls, verifies, fsyncs and protects it as repair does; the coordinator's own store
    /// pulls it itself.
    async fn copy_to(
        &self,
        id: NodeId,
        addr: Option<&String>,
        hash: ChunkHash,
        sources: &[String],
    ) -> Result<(), String> {
        let span =
            tracing::info_span!("replicate_chunk", peer = id, chunk = %hash.short(), error = tracing::field::Empty);
        let timeout = self.config.chunk_rpc_timeout;
        let grace = self.config.orphan_grace;
        let result = async {
            if let Some(local) = self.local_store(id) {
                let pull = |addr: String| async move {
                    let mut client = self.storage(&addr).map_err(|s| s.message().to_string())?;
                    let mut request = Request::new(pb::ReadChunkRequest { hash: hash.to_vec() });
                    request.set_timeout(timeout);
                    match tokio::time::timeout(timeout, client.read_chunk(request)).await {
                        Err(_) => Err(format!("no answer within {timeout:?}")),
                        Ok(Err(status)) => Err(status_with_cause(&status)),
                        Ok(Ok(reply)) => Ok(reply.into_inner().data),
                    }
                };
                return crate::chunk_service::replicate(local, hash, grace, sources, pull)
                    .await
                    .map(drop)
                    .map_err(|s| status_with_cause(&s));
            }
            let addr = addr.ok_or("no address known")?;
            let mut client = self.storage(addr).map_err(|s| s.message().to_string())?;
            let mut request = Request::new(pb::ReplicateChunkRequest {
                hash: hash.to_vec(),
                source_addrs: sources.to_vec(),
                grace_ms: grace.as_millis() as u64,
            });
            request.set_timeout(timeout);
            answered_within(timeout, client.replicate_chunk(request)).await
        }
        .instrument(span.clone())
        .await;
        record_node_error(&span, id, result)
    }

    /// `write_chunks` for replicated content: each chunk's bytes are forwarded to its replicas
    /// as they arrive, so no upload holds a chunk (see `forward` for the budget). The first
    /// `STREAM_AFTER_BYTES` of a chunk are buffered before its streams open: a chunk that ends
    /// within them (small chunks, a file's short tail, content small enough to be inline) is
    /// prepared whole like before, by its hash with one unary `PrepareChunk` per replica, and a
    /// repeat among them costs no stream at all. Content that ends within `inline_max_bytes`
    /// before any chunk started is kept inline.
    async fn write_streamed(
        &self,
        mut source: impl UploadSource,
        ring: Arc<Ring>,
        addresses: Arc<HashMap<u64, String>>,
        list: &mut SegmentedList,
    ) -> Result<(u64, [u8; 32], Option<Vec<u8>>), Status> {
        let chunk_size = self.config.chunk_size_bytes.max(1);
        // Never above a chunk: a chunk that fits is always buffered whole.
        let buffered_max = STREAM_AFTER_BYTES.min(chunk_size);
        let forwarding = Forwarding { ring, addresses, write_id: list.write_id, avoid: Arc::default() };
        let window = (PREPARE_BYTES_IN_FLIGHT_MAX / chunk_size)
            .clamp(PREPARE_CHUNKS_IN_FLIGHT_MIN, PREPARE_CHUNKS_IN_FLIGHT_MAX);
        let mut content_hash = blake3::Hasher::new();
        let mut size = 0u64;
        // The start of a chunk whose streams are not open yet.
        let mut head: Vec<u8> = Vec::new();
        let mut current: Option<ChunkStream> = None;
        let mut in_flight = FuturesOrdered::new();
        while let Some(mut data) = source.next_data().await? {
            size += data.len() as u64;
            // The content hash takes each piece as it goes into a chunk (not the whole of `data`,
            // which may reach into the next chunk), so that when the first chunk ends it has
            // hashed that chunk and nothing more: the first chunk's hash is then the content's
            // so far, and its bytes are hashed once.
            while !data.is_empty() {
                let chunk = match &mut current {
                    Some(chunk) => chunk,
                    None if chunk_size == buffered_max || head.len() + data.len() <= buffered_max => {
                        if head.capacity() == 0 {
                            // Sized for what the source says is left (a small file holds only its
                            // size), the most a chunk buffers when it cannot say.
                            let left =
                                source.remaining_hint().map_or(buffered_max as u64, |left| left + data.len() as u64);
                            head.reserve_exact(left.min(buffered_max as u64) as usize);
                        }
                        let take = (buffered_max - head.len()).min(data.len());
                        let piece = data.split_to(take);
                        content_hash.update(&piece);
                        head.extend_from_slice(&piece);
                        if head.len() == chunk_size {
                            let whole = std::mem::take(&mut head);
                            let chunk = match list.started_chunks {
                                0 => HashedChunk { data: whole, hash: content_hash_so_far(&content_hash) },
                                _ => HashedChunk::of(whole),
                            };
                            self.prepare_next(
                                list,
                                &mut in_flight,
                                &forwarding.ring,
                                &forwarding.addresses,
                                Redundancy::Replicate,
                                chunk,
                            )
                            .await?;
                        }
                        continue;
                    }
                    None => {
                        // The chunk is longer than the buffer takes: stream it, its start first.
                        let left = source
                            .remaining_hint()
                            .map_or(chunk_size as u64, |left| left + (head.len() + data.len()) as u64);
                        let declared = left.min(chunk_size as u64) as usize;
                        let index = list.started_chunks;
                        list.chunk_starting();
                        let chunk = current.insert(self.open_chunk_stream(&forwarding, index, declared, index == 0));
                        if !head.is_empty() {
                            self.forward(chunk, Bytes::from(std::mem::take(&mut head))).await?;
                        }
                        chunk
                    }
                };
                let take = (chunk_size - chunk.len).min(data.len());
                let piece = data.split_to(take);
                content_hash.update(&piece);
                self.forward(chunk, piece).await?;
                if chunk.len == chunk_size {
                    if let Some(full) = current.take() {
                        in_flight.push_back(self.end_chunk(&forwarding, list, full, &content_hash));
                        self.settle(list, &mut in_flight, window - 1).await?;
                    }
                }
            }
        }
        if let Some(last) = current.take().filter(|chunk| chunk.len > 0) {
            in_flight.push_back(self.end_chunk(&forwarding, list, last, &content_hash));
        } else if !head.is_empty() {
            // Nothing started yet means the buffer holds the whole content, whose hash is its.
            let whole_content = list.started_chunks == 0;
            if whole_content && head.len() <= self.config.inline_max_bytes {
                list.chunk_starting();
                let hash = content_hash_so_far(&content_hash);
                list.current.push(CommittedChunk { hash, size, replicas: Vec::new() });
                return Ok((size, *content_hash.finalize().as_bytes(), Some(head)));
            }
            let chunk = match whole_content {
                true => HashedChunk { data: head, hash: content_hash_so_far(&content_hash) },
                false => HashedChunk::of(head),
            };
            self.prepare_next(
                list,
                &mut in_flight,
                &forwarding.ring,
                &forwarding.addresses,
                Redundancy::Replicate,
                chunk,
            )
            .await?;
        }
        self.settle(list, &mut in_flight, 0).await?;
        Ok((size, *content_hash.finalize().as_bytes(), None))
    }
}

/// A chunk's bytes and their hash, which the caller may have already (the chunk is all the
/// content so far: see `content_hash_so_far`).
struct HashedChunk {
    data: Vec<u8>,
    hash: ChunkHash,
}

impl HashedChunk {
    fn of(data: Vec<u8>) -> Self {
        let hash = ChunkHash::of(&data);
        Self { data, hash }
    }
}

/// The hash of what `content` has taken so far: a chunk's hash when that chunk is all of it.
fn content_hash_so_far(content: &blake3::Hasher) -> ChunkHash {
    ChunkHash::from_bytes(*content.finalize().as_bytes())
}

/// Files of one listing whose redundancy is asked of the leader when this node's state does
/// not hold them yet: a lagging node's `ls -l` costs at most this many round trips.
const LIST_STORED_AS_LEADER_READS_MAX: usize = 64;

/// Distinct chunks an upload remembers to send as repeats instead of preparing them again: a
/// bound on the coordinator's memory (32 bytes each), however big and repetitive the file.
const KNOWN_CHUNKS_MAX: usize = 65_536;

/// Where an upload's bytes come from: the next piece of data, or None at its end (which the
/// source has checked is a real end, not a client that went away).
pub trait UploadSource: Send {
    fn next_data(&mut self) -> impl std::future::Future<Output = Result<Option<Bytes>, Status>> + Send;

    /// The bytes still to come after what `next_data` returned so far, when the source knows
    /// (a declared size): a small file then holds only its size of the in-flight budget.
    fn remaining_hint(&self) -> Option<u64> {
        None
    }
}

/// A unary call to a storage node that must answer within `timeout`: its error, or the
/// timeout, as text naming the cause.
async fn answered_within<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(format!("no answer within {timeout:?}")),
        Ok(Err(status)) => Err(status_with_cause(&status)),
        Ok(Ok(_)) => Ok(()),
    }
}

/// `result` of a call to node `id`, its error recorded on the call's span.
fn record_node_error(span: &tracing::Span, id: NodeId, result: Result<(), String>) -> Result<(), String> {
    if let Err(e) = &result {
        span.record("error", format!("node {id}: {e}"));
    }
    result
}

/// What phase one wrote, for phase two to commit.
#[derive(Debug)]
pub struct WrittenContent {
    pub size: u64,
    /// BLAKE3 of the whole content.
    pub content_hash: [u8; 32],
    pub n_chunks: u64,
    /// The last segment's chunks (all of them when nothing was staged).
    pub chunks: Vec<CommittedChunk>,
    /// The upload whose staged segments come first, if any were.
    pub upload_id: Option<u64>,
    pub first_index: u64,
    /// Before the first prepare of `chunks`, on this node's monotonic clock: the commit passes
    /// it to the metadata (`MetaNode::commit_file`), which refuses the commit if it comes more
    /// than `grace_ms` later, measured from here, never by a date.
    pub prepare_started: Instant,
    pub grace_ms: u64,
    /// The commit's request id: the same on every retry, so it applies once.
    pub request_id: RequestId,
    /// How the write kept the content: striped if it striped any chunk (a short tail stays
    /// replicated), replicated, or inline. A chunk the metadata already holds another way
    /// keeps that way (`stat` then says so); this is what the write itself did.
    pub stored_as: StoredAs,
    /// Why an erasure-coded write was replicated instead (`DataConfig::ec_fallback_replicate`).
    pub fallback: Option<String>,
    /// What the commit carries: the content of a small write kept inline in the metadata
    /// (`chunks` lists it as its one chunk without replicas), or the stripes of the
    /// erasure-coded chunks among `chunks`.
    pub carried: Carried,
}

/// A `Files.Put` stream as an upload source: data messages up to the end marker, whose size
/// must match, and never more than the header declared.
struct FileUpload {
    stream: Streaming<pb::PutFileRequest>,
    declared: Option<u64>,
    received: u64,
}

impl UploadSource for FileUpload {
    fn remaining_hint(&self) -> Option<u64> {
        self.declared.map(|declared| declared.saturating_sub(self.received))
    }

    async fn next_data(&mut self) -> Result<Option<Bytes>, Status> {
        let size = self.received;
        let data = match self.stream.message().await {
            Ok(Some(pb::PutFileRequest { part: Some(pb::put_file_request::Part::Data(data)) })) => data,
            Ok(Some(pb::PutFileRequest { part: Some(pb::put_file_request::Part::End(end)) })) => {
                if end.size != size {
                    return Err(Status::invalid_argument(format!(
                        "the upload's end says {} bytes but {size} arrived; nothing was committed",
                        end.size
                    )));
                }
                if let Some(declared) = self.declared.filter(|declared| *declared != size) {
                    return Err(Status::invalid_argument(format!(
                        "truncated upload: {size} of {declared} declared bytes arrived; nothing was committed"
                    )));
                }
                return Ok(None);
            }
            Ok(Some(_)) => return Err(Status::invalid_argument("only the first upload message may be a header")),
            Ok(None) => {
                return Err(Status::aborted(format!(
                    "the upload ended after {size} bytes without its end marker (the client stopped or its \
                     input failed); nothing was committed"
                )))
            }
            Err(status) => {
                return Err(Status::aborted(format!(
                    "the upload stream broke after {size} bytes ({}); nothing was committed",
                    status.message()
                )))
            }
        };
        self.received += data.len() as u64;
        if let Some(declared) = self.declared.filter(|declared| self.received > *declared) {
            return Err(Status::invalid_argument(format!(
                "the upload is longer than its declared {declared} bytes; nothing was committed"
            )));
        }
        Ok(Some(Bytes::from(data)))
    }
}

/// An upload's chunk list while it is written: the segment being filled in memory, the ones
/// before it staged in the metadata. Memory is one segment, whatever the file's size.
struct SegmentedList {
    write_id: [u8; 16],
    /// The metadata's name for the upload (from the write id).
    upload_id: u64,
    path: String,
    segment_chunks: usize,
    /// Chunks whose prepare has started.
    started_chunks: u64,
    /// Chunks in staged segments: the index in the file of `current[0]`.
    staged_chunks: u64,
    staged_segments: u64,
    /// Prepared chunks of the segment being filled, in file order.
    current: Vec<CommittedChunk>,
    /// The stripes of the erasure-coded ones among them.
    current_stripes: Vec<StripeCommit>,
    /// Chunks of the whole upload prepared as stripes, for what the put reports.
    striped_chunks: u64,
    /// When each segment not yet staged (the current one first) began preparing, on this
    /// node's monotonic clock, read before its first chunk's prepare: the metadata refuses its
    /// staging if that is more than the grace period before the leader stamps it. A monotonic
    /// clock, because the storage nodes' protection of the chunks runs on theirs: a date that
    /// steps back would make the chunks look younger than they are.
    segment_started: std::collections::VecDeque<Instant>,
    /// When the upload began, for a file without chunks.
    created: Instant,
    /// The coordinator's grace period (see `CommitFile::grace_ms`).
    grace_ms: u64,
    /// Chunks this upload has listed (up to `KNOWN_CHUNKS_MAX`). A repeat always comes after
    /// its first listing in the file, so in the same entry or in a segment staged before, and
    /// the metadata resolves it against that (a failed first prepare fails the upload first).
    known: std::collections::HashSet<ChunkHash>,
}

impl SegmentedList {
    fn new(write_id: [u8; 16], path: String, segment_chunks: usize, grace_ms: u64) -> Self {
        let [_, _, _, _, _, _, _, _, a, b, c, d, e, f, g, h] = write_id;
        Self {
            write_id,
            upload_id: u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            path,
            segment_chunks: segment_chunks.max(1),
            started_chunks: 0,
            staged_chunks: 0,
            staged_segments: 0,
            current: Vec::new(),
            current_stripes: Vec::new(),
            striped_chunks: 0,
            segment_started: std::collections::VecDeque::new(),
            created: Instant::now(),
            grace_ms,
            known: std::collections::HashSet::new(),
        }
    }

    /// Whether `hash` was listed before in this upload; otherwise it is remembered (while
    /// there is room) and must be prepared.
    fn is_repeat(&mut self, hash: &ChunkHash) -> bool {
        if self.known.contains(hash) {
            return true;
        }
        if self.known.len() < KNOWN_CHUNKS_MAX {
            self.known.insert(*hash);
        }
        false
    }

    /// A chunk's prepare is about to start.
    fn chunk_starting(&mut self) {
        if self.started_chunks.is_multiple_of(self.segment_chunks as u64) {
            self.segment_started.push_back(Instant::now());
        }
        self.started_chunks += 1;
    }

    fn current_started(&self) -> Instant {
        self.segment_started.front().copied().unwrap_or(self.created)
    }

    /// Takes in the next prepared chunk; when that fills the segment, returns it to be staged
    /// (with its number and when its chunks began preparing), and starts the next.
    fn push(&mut self, prepared: Prepared) -> Option<(u64, StageSegment, Vec<StripeCommit>, Instant)> {
        self.current.push(prepared.chunk);
        self.striped_chunks += u64::from(prepared.stripe.is_some());
        self.current_stripes.extend(prepared.stripe);
        if self.current.len() < self.segment_chunks {
            return None;
        }
        let stage = StageSegment {
            upload_id: self.upload_id,
            path: self.path.clone(),
            first_index: self.staged_chunks,
            // Filled in by the leader, from `started`.
            prepared_at_ms: 0,
            grace_ms: self.grace_ms,
            chunks: std::mem::take(&mut self.current),
        };
        let started = self.segment_started.pop_front().unwrap_or(self.created);
        let number = self.staged_segments;
        self.staged_chunks += stage.chunks.len() as u64;
        self.staged_segments += 1;
        Some((number, stage, std::mem::take(&mut self.current_stripes), started))
    }
}

/// The request id of an upload's `sequence`th metadata write (1: the commit; 2 on: segments),
/// the same on every retry.
fn upload_request_id(write_id: [u8; 16], sequence: u64) -> RequestId {
    let [a, b, c, d, e, f, g, h, ..] = write_id;
    RequestId { client_id: u64::from_le_bytes([a, b, c, d, e, f, g, h]), sequence }
}

/// Runs `attempt` until it succeeds, fails for a reason other than a leadership change (no
/// leader known, a leader that stepped down, a timeout), or `retry_for` has passed, with a
/// backoff from 50 ms to 1 s between tries.
async fn retry_transient<T, F>(retry_for: Duration, mut attempt: impl FnMut() -> F) -> Result<T, ApiError>
where
    F: std::future::Future<Output = Result<T, ApiError>>,
{
    let give_up = Instant::now() + retry_for;
    let mut backoff = Duration::from_millis(50);
    loop {
        match attempt().await {
            Err(e) if e.is_retryable() && Instant::now() + backoff < give_up => {
                tracing::info!("metadata not answering yet, retrying: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// A file's summary on the wire, with `chunks` as its (first) chunk list page and how its
/// content is kept (empty: not known).
fn file_info(file: &FileView, chunks: &[ChunkRef], redundancy: String) -> pb::FileInfo {
    pb::FileInfo {
        redundancy,
        path: file.path.clone(),
        size: file.record.size,
        mtime_ms: file.record.mtime_ms,
        content_hash: file.record.content_hash.clone(),
        version: file.record.version,
        chunks: chunks.iter().map(chunk_info).collect(),
        n_chunks: file.record.n_chunks,
    }
}

fn chunk_info(chunk: &ChunkRef) -> pb::ChunkInfo {
    pb::ChunkInfo { hash: chunk.hash.to_vec(), size: chunk.size, replicas: chunk.replicas.clone() }
}

/// A page limit from the wire: 0 or more than a page means a full page.
fn page_limit(limit: u32) -> u32 {
    if limit == 0 {
        CHUNK_PAGE_CHUNKS_MAX
    } else {
        limit.min(CHUNK_PAGE_CHUNKS_MAX)
    }
}

type FileStream = Pin<Box<dyn Stream<Item = Result<pb::GetFileReply, Status>> + Send>>;

#[tonic::async_trait]
impl Files for Coordinator {
    async fn put(&self, request: Request<Streaming<pb::PutFileRequest>>) -> Result<Response<pb::PutFileReply>, Status> {
        // Within the caller's deadline, if it sent one (a stream usually does not).
        let cap = Instant::now() + PLACEMENT_WAIT_MAX;
        let wait_until = request_origin(&request).deadline.map_or(cap, |deadline| deadline.min(cap));
        // Boxed: the write's future is deep enough to overflow the compiler's layout depth.
        let reply = Box::pin(self.receive_upload(request.into_inner(), wait_until)).await;
        if let Err(status) = &reply {
            tracing::warn!("put failed: {}", status.message());
        }
        reply.map(Response::new)
    }

    type GetStream = FileStream;

    async fn get(&self, request: Request<pb::GetFileRequest>) -> Result<Response<Self::GetStream>, Status> {
        let path = request.into_inner().path;
        validate_path(&path)?;
        let (file, first) = self.first_page(Origin::LOCAL, &path, CHUNK_PAGE_CHUNKS_MAX).await?;
        let (tx, rx) = mpsc::channel(READ_QUEUE_MESSAGES);
        let coordinator = self.clone();
        tokio::spawn(
            async move {
                // In the RPC's span: the chunk reads nest under it, and it lasts as long as the stream.
                let info = pb::GetFileReply {
                    part: Some(pb::get_file_reply::Part::Info(file_info(&file, &[], String::new()))),
                };
                if tx.send(Ok(info)).await.is_err() {
                    return;
                }
                let content = ContentRef::File { path: file.path.clone(), version: file.record.version };
                let data: fn(Bytes) -> pb::GetFileReply =
                    |data| pb::GetFileReply { part: Some(pb::get_file_reply::Part::Data(data)) };
                let range = 0..file.record.size;
                let streamed = coordinator
                    .stream_content(
                        &content,
                        file.record.n_chunks,
                        first,
                        range,
                        &tx,
                        DataMessages { piece_bytes: GRPC_READ_MESSAGE_BYTES, wrap: data },
                    )
                    .await;
                if let Err(status) = streamed {
                    // The reply's headers went out already: mark the RPC's span here.
                    tracing::Span::current().record("error", status.message());
                    let _ = tx.send(Err(status)).await;
                }
            }
            .in_current_span(),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stat(&self, request: Request<pb::StatFileRequest>) -> Result<Response<pb::FileInfo>, Status> {
        let origin = request_origin(&request);
        let path = request.into_inner().path;
        validate_path(&path)?;
        let (file, page) = self.first_page(origin, &path, CHUNK_PAGE_CHUNKS_MAX).await?;
        let redundancy = self.describe(self.page_stored_as(&file, &page).await);
        Ok(Response::new(file_info(&file, &page.chunks, redundancy)))
    }

    async fn list(&self, request: Request<pb::ListFilesRequest>) -> Result<Response<pb::ListFilesReply>, Status> {
        let origin = request_origin(&request);
        let request = request.into_inner();
        if request.prefix.len() > PATH_BYTES_MAX || request.prefix.contains('\0') {
            return Err(Status::invalid_argument("the prefix is too long or contains a NUL byte"));
        }
        let (files, truncated) = self.node.list_files(origin, request.prefix, request.limit).await?;
        let mut infos = Vec::with_capacity(files.len());
        let mut asked_leader = 0;
        for file in &files {
            // From this node's state: a read per file, no round trip. A version it has not
            // applied yet (or released already) is asked of the leader, a bounded number of
            // times per listing; beyond that it is left unknown.
            let stored = match self.node.stored_as(&file.record) {
                Ok(Some(stored)) => Some(stored),
                _ if asked_leader < LIST_STORED_AS_LEADER_READS_MAX => {
                    asked_leader += 1;
                    self.stored_as_from_leader(file).await
                }
                _ => None,
            };
            infos.push(file_info(file, &[], self.describe(stored)));
        }
        let files = infos;
        Ok(Response::new(pb::ListFilesReply { files, truncated }))
    }

    async fn chunks(&self, request: Request<pb::FileChunksRequest>) -> Result<Response<pb::FileChunksReply>, Status> {
        let origin = request_origin(&request);
        let request = request.into_inner();
        validate_path(&request.path)?;
        let version = (request.version != 0).then_some(request.version);
        let page = self
            .node
            .file_chunks(origin, request.path.clone(), version, request.from_index, page_limit(request.limit))
            .await?;
        let Some((_, page)) = page else {
            return Err(Status::not_found(format!("file {} not found", request.path)));
        };
        Ok(Response::new(pb::FileChunksReply {
            version: page.version,
            n_chunks: page.n_chunks,
            from_index: page.from_index,
            chunks: page.chunks.iter().map(chunk_info).collect(),
        }))
    }

    async fn delete(&self, request: Request<pb::DeleteFileRequest>) -> Result<Response<pb::DeleteFileReply>, Status> {
        let origin = request_origin(&request);
        let request = request.into_inner();
        validate_path(&request.path)?;
        let request_id = request.request_id.map(|id| RequestId { client_id: id.client_id, sequence: id.sequence });
        let revision = self.node.delete_file(origin, request_id, request.path, request.expected_version).await?;
        Ok(Response::new(pb::DeleteFileReply { revision }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_put_says_its_redundancy_or_leaves_it_to_the_policy() {
        assert_eq!(requested_redundancy("").expect("empty"), None);
        assert_eq!(requested_redundancy("  ").expect("blank"), None);
        assert_eq!(requested_redundancy("replicate").expect("replicate"), Some(Redundancy::Replicate));
        let scheme: Scheme = "ec:4+2".parse().expect("scheme");
        assert_eq!(requested_redundancy("ec:4+2").expect("ec"), Some(Redundancy::Erasure(scheme)));
        let refused = requested_redundancy("ec:4+0").expect_err("no parity");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("e.g. ec:4+2"), "{}", refused.message());
    }

    #[test]
    fn stored_content_is_described_as_stat_and_ls_show_it() {
        let scheme: Scheme = "ec:8+3".parse().expect("scheme");
        assert_eq!(describe_stored(StoredAs::Striped(scheme), 3), "ec:8+3");
        assert_eq!(describe_stored(StoredAs::Replicated, 3), "replicate:3");
        assert_eq!(describe_stored(StoredAs::Inline, 3), "inline");
    }

    /// A replica stream whose call ends with `answer` as soon as it starts, before taking any
    /// data (a replica whose disk is full refuses the chunk at once).
    fn replica_that_ends_with(answer: Result<(), String>) -> ReplicaStream {
        let (tx, rx) = mpsc::channel::<ToReplica>(1);
        let task = tokio::spawn(async move {
            drop(rx);
            answer
        });
        ReplicaStream { id: 7, tx: Some(tx), task, failed: None, span: tracing::Span::none() }
    }

    async fn slice_to(replica: &mut ReplicaStream) {
        while !replica.task.is_finished() {
            tokio::task::yield_now().await;
        }
        let permit = Arc::new(Arc::new(tokio::sync::Semaphore::new(1)).try_acquire_owned().expect("permit"));
        replica.send(ToReplica::Data(Bytes::from_static(b"data"), permit), Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn a_replica_that_ends_its_stream_early_is_failed_with_its_own_reason() {
        let mut refused = replica_that_ends_with(Err("disk full while writing the chunk".to_string()));
        slice_to(&mut refused).await;
        assert!(refused.tx.is_none(), "a replica whose stream ended takes no more data");
        assert_eq!(refused.failed.as_deref(), Some("disk full while writing the chunk"));

        let mut answered = replica_that_ends_with(Ok(()));
        slice_to(&mut answered).await;
        assert_eq!(answered.failed.as_deref(), Some("the replica answered before the chunk's end"));
        // The chunk's error names the replica and its reason.
        let chunk = ChunkStream { candidates: vec![7], replicas: vec![refused], hasher: None, len: 4 };
        assert_eq!(chunk.errors(), vec!["node 7: disk full while writing the chunk".to_string()]);
    }
}
