//! A node's chunk store behind the `Storage` service, with the pending-write protection that
//! makes garbage collection safe.
//!
//! A prepare registers the chunk as pending (until now + the writer's grace period, plus half
//! again as a margin) *before* it checks or writes the file, and a collection deletes only
//! under the same lock after checking that nothing is pending; so a write can never re-use a
//! copy that a concurrent collection is removing. A node that restarts forgets its pending
//! set, so it treats every chunk as pending for one grace period after start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mendfs_chunkstore::{ChunkError, ChunkHash, ChunkStore, ChunkWriter, QuarantineOutcome, StreamCheck};
use mendfs_proto::v1 as pb;
use mendfs_proto::v1::storage_server::Storage;
use tonic::{Request, Response, Status};

/// This node's chunks: the store, the prepares that protect chunks from collection, the
/// operator's cap and the error and work counters.
pub struct LocalChunks {
    pub store: Arc<ChunkStore>,
    pending: Mutex<HashMap<ChunkHash, Instant>>,
    protected_until: Instant,
    /// The operator's cap on chunk bytes kept here (None: the filesystem's size).
    pub capacity_bytes: Option<u64>,
    /// Bytes of prepares under way, counted against the capacity so concurrent prepares cannot
    /// overshoot it together.
    reserved_bytes: Mutex<u64>,
    pub counters: Counters,
}

/// What this node has seen since it started, reported in every heartbeat.
#[derive(Debug, Default)]
pub struct Counters {
    pub io_errors: AtomicU64,
    pub checksum_errors: AtomicU64,
    pub scrub_passes: AtomicU64,
    pub scrub_checked_chunks: AtomicU64,
    pub scrub_checked_bytes: AtomicU64,
    pub repair_copied_chunks: AtomicU64,
    pub repair_copied_bytes: AtomicU64,
    /// Shards of erasure-coded chunks rebuilt here, their bytes, and the shard bytes read
    /// from other nodes to rebuild them (K per shard): repair's network cost.
    pub repair_rebuilt_shards: AtomicU64,
    pub repair_rebuilt_bytes: AtomicU64,
    pub repair_rebuild_read_bytes: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Counts a failed chunk operation by kind: corruption and I/O trouble are health signals.
    pub fn count_error(&self, error: &ChunkError) {
        match error {
            ChunkError::Corrupt { .. } => Self::add(&self.checksum_errors, 1),
            ChunkError::Io { .. } | ChunkError::DiskFull { .. } => Self::add(&self.io_errors, 1),
            _ => {}
        }
    }
}

/// What is left of a copy found corrupt once it went through quarantine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyAfterQuarantine {
    /// The copy was moved aside, was gone already, or is bad and could not be moved: this node
    /// has no good copy, and the caller reports it.
    NoGoodCopy,
    /// A put replaced the corrupt copy before the quarantine: the good copy stays, and this node
    /// is still a replica (the caller must not report it bad).
    Good,
}

/// What a `ReplicateChunk` did on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replicated {
    /// A copy that re-hashes to its name was already here; nothing was pulled.
    AlreadyPresent,
    /// The chunk was pulled from a source and stored (over a corrupt copy, if one was here).
    Copied { bytes: u64 },
}

/// Pending entries kept before expired ones are swept on the next prepare.
const PENDING_SWEEP_LEN: usize = 65_536;

pub fn parse_hash(bytes: &[u8]) -> Result<ChunkHash, Status> {
    ChunkHash::try_from(bytes).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// How long a prepare protects its chunk: the writer's grace, within which the metadata accepts
/// the write's commit (its age measured on monotonic clocks, like this), and half again, a margin
/// for different clock rates (`docs/design/garbage-collection.md`).
fn skew_allowance(grace: Duration) -> Duration {
    grace + grace / 2
}

impl LocalChunks {
    pub fn new(store: Arc<ChunkStore>, grace: Duration, capacity_bytes: Option<u64>) -> Self {
        Self {
            store,
            pending: Mutex::default(),
            protected_until: Instant::now() + skew_allowance(grace),
            capacity_bytes,
            reserved_bytes: Mutex::new(0),
            counters: Counters::default(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<ChunkHash, Instant>> {
        // A poisoned lock only means another thread panicked mid-update of a plain map.
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Protects `hash` from collection for `grace` (and the skew allowance) from now.
    fn mark_pending(&self, hash: &ChunkHash, grace: Duration) {
        let mut pending = self.pending();
        let now = Instant::now();
        if pending.len() >= PENDING_SWEEP_LEN {
            pending.retain(|_, until| *until > now);
        }
        let until = now + skew_allowance(grace);
        let entry = pending.entry(*hash).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Stores a chunk for a write, durably, protected from collection for `grace`.
    pub fn prepare(&self, hash: &ChunkHash, data: &[u8], grace: Duration) -> Result<(), ChunkError> {
        self.mark_pending(hash, grace);
        // Presence is enough here: it only decides whether the put adds bytes. Over a corrupt
        // copy of another length the estimate is off by the difference, as `stats` already is.
        let reserved = match self.capacity_bytes {
            Some(capacity) if !self.store.contains(hash) => {
                let mut reserved = self.reserved_bytes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if self.store.stats().chunk_bytes + *reserved + data.len() as u64 > capacity {
                    self.counters.count_error(&ChunkError::DiskFull { path: self.store.path_of(hash) });
                    return Err(ChunkError::DiskFull { path: self.store.path_of(hash) });
                }
                *reserved += data.len() as u64;
                data.len() as u64
            }
            _ => 0,
        };
        let result = self.store.put(hash, data);
        if reserved > 0 {
            let mut total = self.reserved_bytes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            *total -= reserved;
        }
        if let Err(e) = &result {
            self.counters.count_error(e);
        }
        result
    }

    /// Starts a chunk whose bytes arrive in pieces (a streamed prepare) and whose hash is known
    /// only at the end: `declared` bytes, counted against the capacity cap from now until the
    /// chunk is finished or dropped (whether the chunk is already here is unknown until its
    /// hash is, so a node at its cap refuses even a chunk it has). Blocking: creates the temp
    /// file.
    pub fn begin_streamed(self: &Arc<Self>, declared: u64, check: StreamCheck) -> Result<StreamedChunk, ChunkError> {
        let reserved = match self.capacity_bytes {
            Some(capacity) => {
                let mut reserved = self.reserved_bytes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if self.store.stats().chunk_bytes + *reserved + declared > capacity {
                    let error = ChunkError::DiskFull { path: self.store.chunks_dir().to_path_buf() };
                    self.counters.count_error(&error);
                    return Err(error);
                }
                *reserved += declared;
                declared
            }
            None => 0,
        };
        // Built before the writer, so that a failure to begin gives the reservation back.
        let mut chunk = StreamedChunk { local: self.clone(), writer: None, reserved };
        match self.store.begin(declared, check) {
            Ok(writer) => chunk.writer = Some(writer),
            Err(error) => {
                self.counters.count_error(&error);
                return Err(error);
            }
        }
        Ok(chunk)
    }

    /// Protects a chunk from collection for `grace` and says whether a good copy is already here.
    /// Repair calls it before pulling a copy, so the copy it is about to record can never be
    /// collected between "already here" and the commit that lists it.
    ///
    /// "Good" means the copy re-hashes to its name, not merely that a file of that name exists:
    /// a stale orphan that rotted would otherwise be recorded as a replica (and a good surplus
    /// copy elsewhere dropped in its favour). A corrupt copy is quarantined, and the caller copies
    /// the chunk afresh as if none were here. Blocking: re-hashes the copy.
    pub fn claim(&self, hash: &ChunkHash, grace: Duration) -> bool {
        {
            let mut pending = self.pending();
            let until = Instant::now() + skew_allowance(grace);
            let entry = pending.entry(*hash).or_insert(until);
            *entry = (*entry).max(until);
        }
        match self.store.verify(hash) {
            Ok(()) => true,
            Err(ChunkError::NotFound(_)) => false,
            Err(error @ ChunkError::Corrupt { .. }) => {
                self.counters.count_error(&error);
                tracing::warn!("{error}; quarantining it before copying the chunk afresh");
                self.quarantine_corrupt_copy(hash) == CopyAfterQuarantine::Good
            }
            Err(error) => {
                // Unreadable: no good copy. Copying afresh replaces it, since a put treats a copy
                // it cannot read as bad.
                self.counters.count_error(&error);
                tracing::warn!("checking the copy already here: {error}; copying the chunk afresh");
                false
            }
        }
    }

    /// Reads a chunk, verified. A corrupt copy is quarantined (never served again, kept for
    /// inspection); if the quarantine finds that a put replaced it with a good copy meanwhile,
    /// that copy is read and served instead of an error that would make the reader report a
    /// replica that is fine. Blocking.
    pub fn read(&self, hash: &ChunkHash) -> Result<Vec<u8>, ChunkError> {
        self.read_into(hash, Vec::new())
    }

    /// [`LocalChunks::read`] into `buffer` (see [`ChunkStore::get_into`]).
    pub fn read_into(&self, hash: &ChunkHash, buffer: Vec<u8>) -> Result<Vec<u8>, ChunkError> {
        let result = self.store.get_into(hash, buffer);
        if let Err(error) = &result {
            self.counters.count_error(error);
        }
        match result {
            Err(ChunkError::Corrupt { .. }) if self.quarantine_corrupt_copy(hash) == CopyAfterQuarantine::Good => {
                let reread = self.store.get(hash);
                if let Err(error) = &reread {
                    self.counters.count_error(error);
                }
                reread
            }
            other => other,
        }
    }

    /// Quarantines a copy the caller found corrupt, and says what is here afterwards. The store
    /// re-checks the copy under the chunk's lock and leaves it if it is good: a put may have
    /// replaced the bad copy since the caller read it, and that copy is a replica the metadata
    /// must go on listing. Blocking: re-hashes the copy.
    pub fn quarantine_corrupt_copy(&self, hash: &ChunkHash) -> CopyAfterQuarantine {
        match self.store.quarantine(hash) {
            Ok(QuarantineOutcome::MovedAside) => CopyAfterQuarantine::NoGoodCopy,
            Ok(QuarantineOutcome::CopyIsGood) => {
                tracing::info!(chunk = %hash, "a good copy replaced the corrupt one before its quarantine; kept");
                CopyAfterQuarantine::Good
            }
            // Removed meanwhile (collected, or quarantined by another caller): no copy to keep.
            Err(ChunkError::NotFound(_)) => CopyAfterQuarantine::NoGoodCopy,
            Err(error) => {
                // The bad copy stays under its name, where every read re-hashes and refuses it.
                self.counters.count_error(&error);
                tracing::warn!(chunk = %hash, "quarantine of a corrupt copy failed: {error}");
                CopyAfterQuarantine::NoGoodCopy
            }
        }
    }

    /// Whether the chunk may be considered for collection at all (not pending, node not
    /// freshly started).
    pub fn is_collectable(&self, hash: &ChunkHash) -> bool {
        let now = Instant::now();
        now >= self.protected_until && self.pending().get(hash).is_none_or(|until| *until <= now)
    }

    /// Deletes an orphan copy, unless a write claimed it since it was found.
    pub fn delete_if_collectable(&self, hash: &ChunkHash) -> Result<bool, ChunkError> {
        let pending = self.pending();
        let now = Instant::now();
        if now < self.protected_until || pending.get(hash).is_some_and(|until| *until > now) {
            return Ok(false);
        }
        // Deleting while holding the lock: a prepare of the same chunk waits, then writes it anew.
        self.store.delete(hash)
    }
}

/// A chunk being streamed into this node's store ([`LocalChunks::begin_streamed`]). Dropped
/// unfinished, it leaves nothing behind: the temp file is removed and the capacity reservation
/// given back.
pub struct StreamedChunk {
    local: Arc<LocalChunks>,
    writer: Option<ChunkWriter>,
    reserved: u64,
}

impl StreamedChunk {
    /// Appends the next piece: written to the temp file and hashed. Blocking.
    pub fn write(&mut self, piece: &[u8]) -> Result<(), ChunkError> {
        let result = match self.writer.as_mut() {
            Some(writer) => writer.write(piece),
            None => Err(Self::already_finished()),
        };
        self.counted(result)
    }

    /// Ends the chunk as `hash`: protects it from collection for `grace` first (so a copy
    /// already here cannot be collected between "it is here" and the commit that lists it, as
    /// for `prepare`), then checks size and hash and stores it durably (or keeps the good copy
    /// already here). Blocking.
    pub fn finish(mut self, hash: &ChunkHash, grace: Duration) -> Result<(), ChunkError> {
        self.local.mark_pending(hash, grace);
        let result = match self.writer.take() {
            Some(writer) => self.local.store.finish(writer, hash),
            None => Err(Self::already_finished()),
        };
        self.counted(result)
    }

    fn already_finished() -> ChunkError {
        ChunkError::Io {
            context: "the streamed chunk was already finished".to_string(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }
    }

    /// `result`, its error counted in the node's health counters.
    fn counted(&self, result: Result<(), ChunkError>) -> Result<(), ChunkError> {
        if let Err(error) = &result {
            self.local.counters.count_error(error);
        }
        result
    }

    /// Bytes taken so far.
    pub fn written(&self) -> u64 {
        self.writer.as_ref().map_or(0, ChunkWriter::written)
    }
}

impl Drop for StreamedChunk {
    fn drop(&mut self) {
        // The writer goes first (removing its temp file unless it was renamed into place).
        drop(self.writer.take());
        if self.reserved > 0 {
            let mut total = self.local.reserved_bytes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            *total = total.saturating_sub(self.reserved);
        }
    }
}

/// The longest a replica waits for a streamed chunk to end when the writer's grace period is
/// shorter: a chunk older than the grace period can no longer be committed, so waiting longer
/// only keeps a temp file open; but a grace period of a few hundred milliseconds (tests) must
/// not fail a chunk that a busy machine streams a little slower.
const STREAM_DEADLINE_MIN: Duration = Duration::from_secs(30);
/// The longest a replica keeps a streamed chunk's temp file and reservation open, whatever
/// grace period the peer names: far beyond any grace period an operator sets.
const STREAM_DEADLINE_MAX: Duration = Duration::from_secs(6 * 3600);

/// The work behind `PrepareChunkStream`: a header, data pieces, the hash. The pieces go to a
/// temp file as they arrive (hashed as they go, off the async workers); the chunk is stored and
/// protected only once its final message names the hash its bytes have. A stream that ends
/// without it, breaks, carries more than it declared or outlives its deadline (the writer's
/// grace period, at least `STREAM_DEADLINE_MIN`) leaves nothing behind.
pub async fn prepare_streamed<S>(state: &Arc<LocalChunks>, mut pieces: S) -> Result<(), Status>
where
    S: futures::Stream<Item = Result<pb::PrepareChunkPiece, Status>> + Unpin,
{
    use futures::StreamExt;
    // The header is waited for no longer than a chunk's shortest deadline: a peer that opens
    // streams and sends nothing must not hold handlers for ever.
    let first = match tokio::time::timeout(STREAM_DEADLINE_MIN, pieces.next()).await {
        Err(_) => {
            return Err(Status::deadline_exceeded(format!("no chunk stream header within {STREAM_DEADLINE_MIN:?}")))
        }
        Ok(first) => first,
    };
    let first = match first {
        Some(Ok(first)) => first,
        Some(Err(status)) => return Err(Status::aborted(format!("chunk stream broke: {}", status.message()))),
        None => return Err(Status::invalid_argument("a chunk stream starts with a header")),
    };
    let Some(header) = first.header.clone() else {
        return Err(Status::invalid_argument("a chunk stream starts with a header"));
    };
    let max = state.store.max_chunk_bytes() as u64;
    if header.size > max {
        return Err(Status::invalid_argument(format!(
            "a chunk of {} bytes is larger than this node's largest of {max}",
            header.size
        )));
    }
    let grace = Duration::from_millis(header.grace_ms);
    let deadline = grace.clamp(STREAM_DEADLINE_MIN, STREAM_DEADLINE_MAX);
    let receiving = async {
        let starting = state.clone();
        let mut chunk = crate::chunk_work::run(move || starting.begin_streamed(header.size, StreamCheck::Hash))
            .await
            .map_err(|e| Status::internal(format!("chunk stream task: {e}")))?
            .map_err(chunk_status)?;
        let mut piece = first;
        loop {
            if !piece.data.is_empty() {
                let data = std::mem::take(&mut piece.data);
                chunk = crate::chunk_work::run(move || chunk.write(&data).map(|()| chunk))
                    .await
                    .map_err(|e| Status::internal(format!("chunk stream task: {e}")))?
                    .map_err(chunk_status)?;
            }
            if !piece.hash.is_empty() {
                let hash = parse_hash(&piece.hash)?;
                return crate::chunk_work::run(move || chunk.finish(&hash, grace))
                    .await
                    .map_err(|e| Status::internal(format!("chunk stream task: {e}")))?
                    .map_err(chunk_status);
            }
            piece = match pieces.next().await {
                Some(Ok(piece)) if piece.header.is_none() => piece,
                Some(Ok(_)) => return Err(Status::invalid_argument("only a chunk stream's first message is a header")),
                Some(Err(status)) => {
                    return Err(Status::aborted(format!(
                        "chunk stream broke after {} bytes: {}",
                        chunk.written(),
                        status.message()
                    )))
                }
                None => {
                    return Err(Status::aborted(format!(
                        "chunk stream ended after {} bytes without its hash; nothing was kept",
                        chunk.written()
                    )))
                }
            };
        }
    };
    tokio::time::timeout(deadline, receiving).await.map_err(|_| {
        Status::deadline_exceeded(format!("chunk stream did not end within {deadline:?}; nothing was kept"))
    })?
}

/// A chunk operation's error as a gRPC answer: `NotFound` and `DataLoss` tell a reader to try
/// another replica and report this one.
///
/// A full disk or an I/O error is answered without the file it happened on: the coordinator
/// passes a replica's answer on to the client, and a client has no business learning the
/// server's directory layout. The whole error, path and all, goes to this node's log (under the
/// request's trace id, so `mendfs trace` shows it on the failing hop).
pub(crate) fn chunk_status(error: ChunkError) -> Status {
    match error {
        ChunkError::NotFound(_) => Status::not_found(error.to_string()),
        ChunkError::Corrupt { .. } => Status::data_loss(error.to_string()),
        ChunkError::HashMismatch { .. } | ChunkError::TooLarge { .. } | ChunkError::SizeMismatch { .. } => {
            Status::invalid_argument(error.to_string())
        }
        ChunkError::DiskFull { .. } => {
            tracing::warn!("chunk store: {error}");
            Status::resource_exhausted("disk full: no room on this node for the chunk; nothing was kept")
        }
        ChunkError::Io { ref source, .. } => {
            tracing::warn!("chunk store: {error}");
            Status::internal(format!("chunk store I/O error: {source}"))
        }
    }
}

pub struct ChunkService {
    pub state: Arc<LocalChunks>,
    /// Channels to the other nodes, for pulling repair copies.
    pub peers: mendfs_meta::Peers,
    /// Bounds concurrent repair pulls on this node, so repair never crowds out client traffic.
    pub replication_slots: Arc<tokio::sync::Semaphore>,
}

/// Repair pulls one node serves at once.
pub const REPLICATIONS_IN_FLIGHT_MAX: usize = 4;
const PULL_TIMEOUT: Duration = Duration::from_secs(30);

impl ChunkService {
    pub fn new(state: Arc<LocalChunks>, peers: mendfs_meta::Peers) -> Self {
        Self { state, peers, replication_slots: Arc::new(tokio::sync::Semaphore::new(REPLICATIONS_IN_FLIGHT_MAX)) }
    }

    async fn pull(&self, addr: &str, hash: &ChunkHash) -> Result<bytes::Bytes, String> {
        let channel = self.peers.channel(addr)?;
        let mut client = pb::storage_client::StorageClient::with_interceptor(channel, self.peers.interceptor())
            .max_decoding_message_size(crate::CHUNK_BYTES_MAX + 1024);
        let mut request = Request::new(pb::ReadChunkRequest { hash: hash.to_vec() });
        request.set_timeout(PULL_TIMEOUT);
        let reply = tokio::time::timeout(PULL_TIMEOUT, client.read_chunk(request))
            .await
            .map_err(|_| format!("no answer within {PULL_TIMEOUT:?}"))?
            .map_err(|status| mendfs_proto::status_with_cause(&status))?;
        // Not hashed here: the store's put verifies the bytes against the hash before writing.
        Ok(reply.into_inner().data)
    }
}

#[tonic::async_trait]
impl Storage for ChunkService {
    async fn prepare_chunk(
        &self,
        request: Request<pb::PrepareChunkRequest>,
    ) -> Result<Response<pb::PrepareChunkReply>, Status> {
        let request = request.into_inner();
        let hash = parse_hash(&request.hash)?;
        let grace = Duration::from_millis(request.grace_ms);
        let state = self.state.clone();
        crate::chunk_work::run(move || state.prepare(&hash, &request.data, grace))
            .await
            .map_err(|e| Status::internal(format!("prepare task: {e}")))?
            .map_err(chunk_status)?;
        Ok(Response::new(pb::PrepareChunkReply {}))
    }

    async fn prepare_chunk_stream(
        &self,
        request: Request<tonic::Streaming<pb::PrepareChunkPiece>>,
    ) -> Result<Response<pb::PrepareChunkReply>, Status> {
        prepare_streamed(&self.state, request.into_inner()).await?;
        Ok(Response::new(pb::PrepareChunkReply {}))
    }

    async fn read_chunk(&self, request: Request<pb::ReadChunkRequest>) -> Result<Response<pb::ReadChunkReply>, Status> {
        let hash = parse_hash(&request.get_ref().hash)?;
        let state = self.state.clone();
        let result = crate::chunk_work::run(move || state.read(&hash))
            .await
            .map_err(|e| Status::internal(format!("read task: {e}")))?;
        match result {
            Ok(data) => Ok(Response::new(pb::ReadChunkReply { data: data.into() })),
            Err(e) => {
                // `chunk_status` logs the errors whose answer leaves details out.
                if !matches!(e, ChunkError::Io { .. } | ChunkError::DiskFull { .. }) {
                    tracing::warn!("read chunk: {e}");
                }
                Err(chunk_status(e))
            }
        }
    }

    async fn replicate_chunk(
        &self,
        request: Request<pb::ReplicateChunkRequest>,
    ) -> Result<Response<pb::ReplicateChunkReply>, Status> {
        let request = request.into_inner();
        let hash = parse_hash(&request.hash)?;
        let grace = Duration::from_millis(request.grace_ms);
        let _slot =
            self.replication_slots.acquire().await.map_err(|_| Status::unavailable("the node is shutting down"))?;
        let pull_from = |addr: String| async move { self.pull(&addr, &hash).await };
        let replicated = replicate(&self.state, hash, grace, &request.source_addrs, pull_from).await?;
        let reply = match replicated {
            Replicated::AlreadyPresent => pb::ReplicateChunkReply { already_present: true, copied_bytes: 0 },
            Replicated::Copied { bytes } => pb::ReplicateChunkReply { already_present: false, copied_bytes: bytes },
        };
        Ok(Response::new(reply))
    }

    async fn rebuild_shard(
        &self,
        request: Request<pb::RebuildShardRequest>,
    ) -> Result<Response<pb::RebuildShardReply>, Status> {
        let rebuild = ShardRebuild::parse(request.into_inner())?;
        let _slot =
            self.replication_slots.acquire().await.map_err(|_| Status::unavailable("the node is shutting down"))?;
        let pull_from = |addr: String, hash: ChunkHash| async move { self.pull(&addr, &hash).await };
        let rebuilt = rebuild_shard(&self.state, rebuild, pull_from).await?;
        let reply = match rebuilt {
            RebuiltShard::AlreadyPresent => pb::RebuildShardReply { already_present: true, ..Default::default() },
            RebuiltShard::Rebuilt { read_bytes, written_bytes } => {
                pb::RebuildShardReply { already_present: false, read_bytes, written_bytes }
            }
        };
        Ok(Response::new(reply))
    }
}

/// A checked `RebuildShard` request.
#[derive(Debug, Clone)]
pub struct ShardRebuild {
    pub chunk: ChunkHash,
    pub chunk_size: usize,
    pub scheme: mendfs_erasure::Scheme,
    pub index: usize,
    pub hash: ChunkHash,
    /// K or more, the first K preferred: (shard index, its hash, addresses to read it from).
    pub sources: Vec<(usize, ChunkHash, Vec<String>)>,
    pub grace: Duration,
}

impl ShardRebuild {
    /// Refuses, before any work, a request that cannot describe a stripe: a bad scheme or
    /// size, a shard index out of range, fewer than K distinct sources, a source that is the
    /// shard being built, more addresses for a source than a cluster could have reason to name.
    pub fn parse(request: pb::RebuildShardRequest) -> Result<Self, Status> {
        let invalid = |why: String| Status::invalid_argument(format!("rebuild of a shard: {why}"));
        let small = |n: u32| u8::try_from(n).map_err(|_| invalid(format!("{n} shards is too many")));
        let scheme = mendfs_erasure::Scheme::new(small(request.data_shards)?, small(request.parity_shards)?)
            .map_err(|e| invalid(e.to_string()))?;
        let chunk_size = usize::try_from(request.chunk_size)
            .ok()
            .filter(|&size| size <= crate::CHUNK_BYTES_MAX)
            .ok_or_else(|| invalid(format!("a chunk of {} bytes is over the limit", request.chunk_size)))?;
        let total = scheme.total_shards();
        let index = request.index as usize;
        if index >= total {
            return Err(invalid(format!("shard {index} of a {total}-shard stripe")));
        }
        if request.sources.len() < scheme.data_shards() {
            return Err(invalid(format!("{} sources, {scheme} needs {}", request.sources.len(), scheme.data_shards())));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut sources = Vec::with_capacity(request.sources.len());
        for source in request.sources {
            let source_index = source.index as usize;
            if source_index >= total || source_index == index || !seen.insert(source_index) {
                return Err(invalid(format!("source shard {source_index} is out of range, repeated or the one built")));
            }
            if source.addrs.len() > SOURCE_ADDRS_MAX {
                return Err(invalid(format!("{} addresses for shard {source_index}", source.addrs.len())));
            }
            sources.push((source_index, parse_hash(&source.hash)?, source.addrs));
        }
        Ok(Self {
            chunk: parse_hash(&request.chunk)?,
            chunk_size,
            scheme,
            index,
            hash: parse_hash(&request.hash)?,
            sources,
            grace: Duration::from_millis(request.grace_ms),
        })
    }
}

/// Nodes one source shard may be read from: its listed copies, a handful at most.
const SOURCE_ADDRS_MAX: usize = 16;

/// What a `RebuildShard` did on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuiltShard {
    /// A good copy was here already: nothing was read.
    AlreadyPresent,
    Rebuilt {
        read_bytes: u64,
        written_bytes: u64,
    },
}

/// The work behind `RebuildShard`: claims the shard (protecting it from GC, as a copy repair
/// does), reads the K sources in parallel, each from the first address whose bytes hash to the
/// source's name, rebuilds the shard, and stores it only if it hashes to its own name (the
/// store's put checks that, so wrong sources or a wrong scheme can never plant bad bytes).
pub async fn rebuild_shard<Pull>(
    state: &Arc<LocalChunks>,
    rebuild: ShardRebuild,
    pull: impl Fn(String, ChunkHash) -> Pull,
) -> Result<RebuiltShard, Status>
where
    Pull: std::future::Future<Output = Result<bytes::Bytes, String>>,
{
    let (hash, grace) = (rebuild.hash, rebuild.grace);
    let claiming = state.clone();
    let present = crate::chunk_work::run(move || claiming.claim(&hash, grace))
        .await
        .map_err(|e| Status::internal(format!("claim task: {e}")))?;
    if present {
        return Ok(RebuiltShard::AlreadyPresent);
    }
    let shard_bytes = rebuild.scheme.shard_bytes(rebuild.chunk_size);
    let data_shards = rebuild.scheme.data_shards();
    let pull = &pull;
    let read_one = |(index, source_hash, addrs): (usize, ChunkHash, Vec<String>)| async move {
        let mut errors = Vec::new();
        for addr in addrs {
            match pull(addr.clone(), source_hash).await {
                Ok(data) if data.len() == shard_bytes && ChunkHash::of(&data) == source_hash => {
                    return Ok((index, data))
                }
                Ok(data) => errors.push(format!("{addr}: {} bytes that are not shard {index}", data.len())),
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(format!(
            "shard {index}: {}",
            if errors.is_empty() { "no node to read it from".into() } else { errors.join("; ") }
        ))
    };
    // The first K sources in parallel; for each that fails, the next one, until K are read or
    // none is left: one bad or missing source costs a read, not the rebuild.
    let mut shards: Vec<Option<bytes::Bytes>> = vec![None; rebuild.scheme.total_shards()];
    let (mut read, mut next) = (0, 0);
    let mut errors = Vec::new();
    while read < data_shards && next < rebuild.sources.len() {
        let batch = &rebuild.sources[next..(next + data_shards - read).min(rebuild.sources.len())];
        next += batch.len();
        for result in futures::future::join_all(batch.iter().cloned().map(read_one)).await {
            match result {
                Ok((index, data)) => {
                    shards[index] = Some(data);
                    read += 1;
                }
                Err(e) => errors.push(e),
            }
        }
    }
    if read < data_shards {
        return Err(Status::unavailable(format!(
            "rebuilding shard {} of stripe {}: {read} of the {data_shards} shards needed could be read: {}",
            rebuild.index,
            rebuild.chunk.short(),
            errors.join("; ")
        )));
    }
    let read_bytes = (shard_bytes * read) as u64;
    let storing = state.clone();
    let (scheme, chunk_size, index) = (rebuild.scheme, rebuild.chunk_size, rebuild.index);
    let stored = crate::chunk_work::run(move || {
        let views: Vec<Option<&[u8]>> = shards.iter().map(|shard| shard.as_deref()).collect();
        let built = mendfs_erasure::rebuild_shards(scheme, chunk_size, &views, &[index])
            .map_err(|e| Status::invalid_argument(format!("rebuilding shard {index}: {e}")))?
            .pop()
            .ok_or_else(|| Status::internal("the codec returned no shard"))?;
        // The put re-hashes the bytes against the shard's name: a rebuild from sources of
        // another stripe, or under the wrong scheme, is refused here and stores nothing.
        storing.prepare(&hash, &built, grace).map_err(chunk_status)?;
        Ok::<u64, Status>(built.len() as u64)
    })
    .await
    .map_err(|e| Status::internal(format!("rebuild task: {e}")))?;
    let written_bytes = stored?;
    Counters::add(&state.counters.repair_rebuilt_shards, 1);
    Counters::add(&state.counters.repair_rebuilt_bytes, written_bytes);
    Counters::add(&state.counters.repair_rebuild_read_bytes, read_bytes);
    Ok(RebuiltShard::Rebuilt { read_bytes, written_bytes })
}

/// The work behind `ReplicateChunk`: claims the chunk (protecting it from GC), answers
/// `AlreadyPresent` only for a copy that re-hashes to its name (a corrupt one is quarantined
/// first), and otherwise pulls the chunk from the sources in turn and stores the first bytes that
/// hash to it. `pull` fetches from one source address; the service pulls over gRPC.
pub async fn replicate<Pull>(
    state: &Arc<LocalChunks>,
    hash: ChunkHash,
    grace: Duration,
    source_addrs: &[String],
    mut pull: impl FnMut(String) -> Pull,
) -> Result<Replicated, Status>
where
    // A closure returning a future rather than an async closure over `&str`: the service's
    // future must be `Send`, and the compiler cannot yet prove that of an async closure's future
    // for every lifetime of its argument.
    Pull: std::future::Future<Output = Result<bytes::Bytes, String>>,
{
    let claiming = state.clone();
    // Re-hashes a copy already here: blocking work, off the async workers.
    let present = crate::chunk_work::run(move || claiming.claim(&hash, grace))
        .await
        .map_err(|e| Status::internal(format!("claim task: {e}")))?;
    if present {
        // Idempotent: a good copy that is already here is not copied again (a repair resumed by a
        // new leader redoes only what was not recorded).
        return Ok(Replicated::AlreadyPresent);
    }
    let mut errors = Vec::new();
    for addr in source_addrs {
        let data = match pull(addr.clone()).await {
            Ok(data) => data,
            Err(e) => {
                errors.push(format!("{addr}: {e}"));
                continue;
            }
        };
        let size = data.len() as u64;
        let storing = state.clone();
        let stored = crate::chunk_work::run(move || storing.prepare(&hash, &data, grace))
            .await
            .map_err(|e| Status::internal(format!("store task: {e}")))?;
        match stored {
            Ok(()) => {}
            // A source that sent wrong bytes: try the next one.
            Err(e @ ChunkError::HashMismatch { .. }) => {
                errors.push(format!("{addr}: {e}"));
                continue;
            }
            Err(e) => return Err(chunk_status(e)),
        }
        Counters::add(&state.counters.repair_copied_chunks, 1);
        Counters::add(&state.counters.repair_copied_bytes, size);
        return Ok(Replicated::Copied { bytes: size });
    }
    Err(Status::unavailable(format!("no source could supply the chunk: {}", errors.join("; "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);

    fn local_chunks(dir: &tempfile::TempDir) -> Arc<LocalChunks> {
        let store = ChunkStore::open(dir.path(), 1 << 20).expect("open store");
        Arc::new(LocalChunks::new(Arc::new(store), GRACE, None))
    }

    fn quarantined(dir: &tempfile::TempDir) -> Vec<Vec<u8>> {
        let entries = std::fs::read_dir(dir.path().join("quarantine")).expect("quarantine dir");
        entries.map(|entry| std::fs::read(entry.expect("entry").path()).expect("read")).collect()
    }

    /// A source that hands over `data` and counts how often it was asked.
    fn source<'a>(
        data: &'a [u8],
        pulls: &'a std::cell::Cell<u32>,
    ) -> impl FnMut(String) -> std::future::Ready<Result<bytes::Bytes, String>> + 'a {
        move |_addr| {
            pulls.set(pulls.get() + 1);
            std::future::ready(Ok(bytes::Bytes::copy_from_slice(data)))
        }
    }

    #[tokio::test]
    async fn replicate_onto_a_corrupt_copy_quarantines_it_and_copies_the_good_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = local_chunks(&dir);
        let data = b"the chunk as its sources hold it".to_vec();
        let hash = ChunkHash::of(&data);
        // A stale orphan of the chunk that rotted since it was written.
        local.store.put(&hash, &data).expect("put");
        let rotted = b"the chunk as this node's disk holds it".to_vec();
        std::fs::write(local.store.path_of(&hash), &rotted).expect("corrupt");

        let pulls = std::cell::Cell::new(0);
        let sources = ["source-a".to_string()];
        let replicated = replicate(&local, hash, GRACE, &sources, source(&data, &pulls)).await.expect("replicate");

        assert_eq!(replicated, Replicated::Copied { bytes: data.len() as u64 }, "not already present");
        assert_eq!(pulls.get(), 1);
        assert_eq!(local.store.get(&hash).expect("the good copy is here"), data);
        assert_eq!(quarantined(&dir), vec![rotted], "the corrupt copy was moved aside, not served");
        assert_eq!(Counters::get(&local.counters.checksum_errors), 1);
        assert!(!local.is_collectable(&hash), "the copy is protected until its commit");
    }

    #[tokio::test]
    async fn replicate_onto_a_good_copy_is_already_present_and_pulls_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = local_chunks(&dir);
        let data = b"a chunk already here".to_vec();
        let hash = ChunkHash::of(&data);
        local.store.put(&hash, &data).expect("put");

        let pulls = std::cell::Cell::new(0);
        let sources = ["source-a".to_string()];
        let replicated = replicate(&local, hash, GRACE, &sources, source(&data, &pulls)).await.expect("replicate");

        assert_eq!(replicated, Replicated::AlreadyPresent);
        assert_eq!(pulls.get(), 0);
        assert!(quarantined(&dir).is_empty());
    }

    #[tokio::test]
    async fn replicate_skips_a_source_with_wrong_bytes_and_takes_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = local_chunks(&dir);
        let data = b"the right bytes".to_vec();
        let hash = ChunkHash::of(&data);

        let sources = ["bad".to_string(), "good".to_string()];
        let pull = |addr: String| {
            std::future::ready(Ok(if addr == "bad" {
                bytes::Bytes::from_static(b"wrong bytes")
            } else {
                bytes::Bytes::from(data.clone())
            }))
        };
        let replicated = replicate(&local, hash, GRACE, &sources, pull).await.expect("replicate");

        assert_eq!(replicated, Replicated::Copied { bytes: data.len() as u64 });
        assert_eq!(local.store.get(&hash).expect("get"), data);
    }

    #[test]
    fn a_read_that_finds_a_copy_corrupt_quarantines_it_and_reports_no_good_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = local_chunks(&dir);
        let data = b"rots on disk".to_vec();
        let hash = ChunkHash::of(&data);
        local.store.put(&hash, &data).expect("put");
        std::fs::write(local.store.path_of(&hash), b"rots on dusk").expect("corrupt");

        assert!(matches!(local.read(&hash), Err(ChunkError::Corrupt { .. })));
        assert!(!local.store.contains(&hash));
        assert_eq!(quarantined(&dir).len(), 1);
    }

    #[test]
    fn quarantining_a_copy_a_put_has_since_replaced_keeps_it_as_a_good_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = local_chunks(&dir);
        let data = b"found rotted, then rewritten".to_vec();
        let hash = ChunkHash::of(&data);
        local.store.put(&hash, &data).expect("put");
        std::fs::write(local.store.path_of(&hash), b"found rotted, then rewritteN").expect("corrupt");
        assert!(matches!(local.store.get(&hash), Err(ChunkError::Corrupt { .. })));
        local.prepare(&hash, &data, GRACE).expect("a prepare replaces the bad copy");

        assert_eq!(local.quarantine_corrupt_copy(&hash), CopyAfterQuarantine::Good);
        assert_eq!(local.read(&hash).expect("still served"), data);
        assert!(quarantined(&dir).is_empty());
    }

    fn header(size: u64) -> pb::PrepareChunkPiece {
        pb::PrepareChunkPiece {
            header: Some(pb::PrepareChunkHeader { write_id: vec![7; 16], grace_ms: 60_000, size }),
            ..Default::default()
        }
    }

    fn data(bytes: &[u8]) -> pb::PrepareChunkPiece {
        pb::PrepareChunkPiece { data: bytes::Bytes::copy_from_slice(bytes), ..Default::default() }
    }

    fn end(hash: &ChunkHash) -> pb::PrepareChunkPiece {
        pb::PrepareChunkPiece { hash: hash.to_vec(), ..Default::default() }
    }

    async fn stream_in(
        local: &Arc<LocalChunks>,
        pieces: Vec<Result<pb::PrepareChunkPiece, Status>>,
    ) -> Result<(), Status> {
        prepare_streamed(local, futures::stream::iter(pieces)).await
    }

    fn tmp_is_empty(dir: &tempfile::TempDir) -> bool {
        std::fs::read_dir(dir.path().join("tmp")).expect("tmp dir").next().is_none()
    }

    /// A chunk in three pieces, as the coordinator forwards them.
    fn pieces_of(chunk: &[u8]) -> Vec<Result<pb::PrepareChunkPiece, Status>> {
        let mut pieces = vec![Ok(header(chunk.len() as u64))];
        pieces.extend(chunk.chunks(chunk.len().div_ceil(3)).map(|piece| Ok(data(piece))));
        pieces.push(Ok(end(&ChunkHash::of(chunk))));
        pieces
    }

    #[tokio::test]
    async fn a_streamed_chunk_is_stored_verified_and_protected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = local_chunks(&dir);
        let chunk: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let hash = ChunkHash::of(&chunk);
        stream_in(&local, pieces_of(&chunk)).await.expect("stored");
        assert_eq!(local.store.get(&hash).expect("stored"), chunk);
        assert_eq!(local.store.stats().chunk_bytes, chunk.len() as u64);
        assert!(!local.is_collectable(&hash), "protected until its commit");
        assert!(tmp_is_empty(&dir));
        // A header that already carries data, and an end that carries the rest, are fine too;
        // a declared size is a maximum, not the exact size.
        let small = b"first and last".to_vec();
        let (head, tail) = small.split_at(5);
        let mut first = header(1000);
        first.data = bytes::Bytes::copy_from_slice(head);
        let mut last = end(&ChunkHash::of(&small));
        last.data = bytes::Bytes::copy_from_slice(tail);
        stream_in(&local, vec![Ok(first), Ok(last)]).await.expect("stored");
        assert_eq!(local.store.get(&ChunkHash::of(&small)).expect("stored"), small);
    }

    #[tokio::test]
    async fn a_streamed_chunk_whose_bytes_do_not_hash_to_its_name_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = local_chunks(&dir);
        let chunk = vec![5u8; 10_000];
        let mut pieces = pieces_of(&chunk);
        let claimed = ChunkHash::of(b"other bytes");
        *pieces.last_mut().expect("end") = Ok(end(&claimed));
        let error = stream_in(&local, pieces).await.expect_err("refused");
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
        assert!(!local.store.contains(&claimed) && !local.store.contains(&ChunkHash::of(&chunk)));
        assert!(tmp_is_empty(&dir), "the temp file is gone");
        assert_eq!(local.store.stats().chunk_count, 0);
    }

    #[tokio::test]
    async fn a_streamed_chunk_longer_than_declared_or_than_the_largest_chunk_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = local_chunks(&dir);
        let chunk = vec![9u8; 3_000];
        let mut pieces = pieces_of(&chunk);
        pieces[0] = Ok(header(2_999));
        let error = stream_in(&local, pieces).await.expect_err("refused");
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
        assert!(error.message().contains("2999"), "{error}");
        assert!(tmp_is_empty(&dir) && !local.store.contains(&ChunkHash::of(&chunk)));
        // The store of `local_chunks` takes chunks of at most 1 MiB.
        let error = stream_in(&local, vec![Ok(header((1 << 20) + 1))]).await.expect_err("too large");
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
        assert!(tmp_is_empty(&dir));
        // No header first, or a second header: refused.
        let error = stream_in(&local, vec![Ok(data(b"x"))]).await.expect_err("no header");
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
        let error = stream_in(&local, vec![Ok(header(10)), Ok(header(10))]).await.expect_err("two headers");
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
        assert!(tmp_is_empty(&dir));
    }

    #[tokio::test]
    async fn a_streamed_chunk_that_ends_early_or_breaks_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = local_chunks(&dir);
        let chunk = vec![3u8; 30_000];
        let mut ended_early = pieces_of(&chunk);
        ended_early.pop();
        let error = stream_in(&local, ended_early).await.expect_err("no hash");
        assert_eq!(error.code(), tonic::Code::Aborted, "{error}");
        let mut broken = pieces_of(&chunk);
        broken.insert(2, Err(Status::unavailable("connection reset")));
        let error = stream_in(&local, broken).await.expect_err("broken");
        assert_eq!(error.code(), tonic::Code::Aborted, "{error}");
        assert!(tmp_is_empty(&dir));
        assert!(!local.store.contains(&ChunkHash::of(&chunk)));
        assert_eq!(local.store.stats(), Default::default());
    }

    #[tokio::test]
    async fn a_streamed_chunk_already_here_keeps_the_copy_and_still_takes_the_claim() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path(), 1 << 20).expect("open store");
        let chunk = vec![1u8; 50_000];
        let hash = ChunkHash::of(&chunk);
        store.put(&hash, &chunk).expect("put");
        // A node long past its start: only a claim protects the chunk.
        let local = Arc::new(LocalChunks {
            protected_until: Instant::now(),
            ..LocalChunks::new(Arc::new(store), Duration::ZERO, None)
        });
        assert!(local.is_collectable(&hash));
        stream_in(&local, pieces_of(&chunk)).await.expect("already here");
        assert!(!local.is_collectable(&hash), "claimed for the commit");
        assert_eq!(local.store.stats().chunk_count, 1, "counted once");
        assert_eq!(local.store.get(&hash).expect("kept"), chunk);
        assert!(tmp_is_empty(&dir), "the streamed bytes were discarded");
        // Over a corrupt copy of the same length, the streamed bytes replace it.
        std::fs::write(local.store.path_of(&hash), vec![2u8; 50_000]).expect("corrupt");
        stream_in(&local, pieces_of(&chunk)).await.expect("replaced");
        assert_eq!(local.store.get(&hash).expect("good again"), chunk);
        assert_eq!(local.store.stats().chunk_bytes, 50_000);
    }

    #[tokio::test]
    async fn a_streamed_chunk_counts_against_the_capacity_until_it_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path(), 1 << 20).expect("open store");
        let local = Arc::new(LocalChunks::new(Arc::new(store), GRACE, Some(100_000)));
        let open = local.begin_streamed(80_000, StreamCheck::Hash).expect("room");
        let error = local
            .begin_streamed(30_000, StreamCheck::Hash)
            .map(drop)
            .expect_err("over the cap while the first is open");
        assert!(matches!(error, ChunkError::DiskFull { .. }), "{error}");
        drop(open);
        local.begin_streamed(30_000, StreamCheck::Hash).expect("room again once the first is dropped");
        assert!(tmp_is_empty(&dir));
    }

    /// An ec:4+2 stripe of a 1000-byte chunk: its shards and their hashes.
    fn stripe() -> (mendfs_erasure::Scheme, Vec<u8>, Vec<Vec<u8>>) {
        let scheme = mendfs_erasure::Scheme::new(4, 2).expect("scheme");
        let chunk: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let shards = mendfs_erasure::encode(scheme, &chunk).expect("encode");
        (scheme, chunk, shards)
    }

    fn rebuild_request(shards: &[Vec<u8>], index: u32, sources: &[u32]) -> pb::RebuildShardRequest {
        pb::RebuildShardRequest {
            chunk: ChunkHash::of(b"chunk").to_vec(),
            chunk_size: 1000,
            data_shards: 4,
            parity_shards: 2,
            index,
            hash: ChunkHash::of(&shards[index as usize]).to_vec(),
            sources: sources
                .iter()
                .map(|&i| pb::ShardSource {
                    index: i,
                    hash: ChunkHash::of(&shards[i as usize]).to_vec(),
                    addrs: vec!["liar".into(), format!("node-{i}")],
                })
                .collect(),
            grace_ms: 60_000,
        }
    }

    #[tokio::test]
    async fn a_lost_shard_is_rebuilt_from_k_others_past_a_source_that_lies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = local_chunks(&dir);
        let (_, _, shards) = stripe();
        // Node "liar" answers every read with bytes of the right length but the wrong content.
        let pull = |addr: String, hash: ChunkHash| {
            let found = shards.iter().find(|shard| ChunkHash::of(shard) == hash).cloned().expect("a shard");
            std::future::ready(Ok(if addr == "liar" {
                bytes::Bytes::from(vec![0xAA; found.len()])
            } else {
                bytes::Bytes::from(found)
            }))
        };
        for (index, sources) in [(1u32, [0u32, 2, 3, 4]), (5, [0, 1, 2, 3]), (0, [2, 3, 4, 5])] {
            let rebuild = ShardRebuild::parse(rebuild_request(&shards, index, &sources)).expect("valid");
            let rebuilt = rebuild_shard(&local, rebuild, pull).await.expect("rebuilt");
            let shard = &shards[index as usize];
            let len = shard.len() as u64;
            assert_eq!(rebuilt, RebuiltShard::Rebuilt { read_bytes: 4 * len, written_bytes: len }, "shard {index}");
            assert_eq!(&local.store.get(&ChunkHash::of(shard)).expect("stored"), shard);
            assert!(!local.is_collectable(&ChunkHash::of(shard)), "protected until its commit");
        }
        assert_eq!(Counters::get(&local.counters.repair_rebuilt_shards), 3);
        let again = ShardRebuild::parse(rebuild_request(&shards, 1, &[0, 2, 3, 4])).expect("valid");
        assert_eq!(rebuild_shard(&local, again, pull).await.expect("idempotent"), RebuiltShard::AlreadyPresent);
    }

    #[tokio::test]
    async fn a_rebuild_that_does_not_hash_to_the_shard_stores_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = local_chunks(&dir);
        let (_, _, shards) = stripe();
        let pull = |_addr: String, hash: ChunkHash| {
            let found = shards.iter().find(|shard| ChunkHash::of(shard) == hash).cloned();
            std::future::ready(found.map(bytes::Bytes::from).ok_or_else(|| "no such shard".to_string()))
        };
        // Sources of this stripe, but the request claims the result is shard 2's when it
        // rebuilds shard 1: the codec's output does not hash to the name, and nothing is kept.
        let mut request = rebuild_request(&shards, 1, &[0, 2, 3, 4]);
        request.hash = ChunkHash::of(&shards[2]).to_vec();
        let rebuild = ShardRebuild::parse(request).expect("well-formed");
        let error = rebuild_shard(&local, rebuild, pull).await.expect_err("refused");
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
        assert!(
            local.store.get(&ChunkHash::of(&shards[2])).is_err()
                && local.store.get(&ChunkHash::of(&shards[1])).is_err()
        );
        // A source nobody holds: unavailable, naming the shard.
        let mut request = rebuild_request(&shards, 1, &[0, 2, 3, 4]);
        request.sources[3].hash = ChunkHash::of(b"elsewhere").to_vec();
        let error = rebuild_shard(&local, ShardRebuild::parse(request).expect("ok"), pull).await.expect_err("no");
        assert_eq!(error.code(), tonic::Code::Unavailable);
        assert!(error.message().contains("shard 4"), "{error}");
        // The same with a fifth source offered: the rebuild reads it instead.
        let mut request = rebuild_request(&shards, 1, &[0, 2, 3, 4, 5]);
        request.sources[3].hash = ChunkHash::of(b"elsewhere").to_vec();
        let rebuilt = rebuild_shard(&local, ShardRebuild::parse(request).expect("ok"), pull).await.expect("rebuilt");
        let len = shards[1].len() as u64;
        assert_eq!(rebuilt, RebuiltShard::Rebuilt { read_bytes: 4 * len, written_bytes: len });
        assert_eq!(local.store.get(&ChunkHash::of(&shards[1])).expect("stored"), shards[1]);
    }

    #[test]
    fn malformed_rebuild_requests_are_refused_before_any_work() {
        let (_, _, shards) = stripe();
        let good = rebuild_request(&shards, 1, &[0, 2, 3, 4]);
        let cases: Vec<(&str, pb::RebuildShardRequest)> = vec![
            ("no parity", pb::RebuildShardRequest { parity_shards: 0, ..good.clone() }),
            ("huge K", pb::RebuildShardRequest { data_shards: 300, ..good.clone() }),
            ("index out of range", pb::RebuildShardRequest { index: 6, ..good.clone() }),
            ("huge chunk", pb::RebuildShardRequest { chunk_size: u64::MAX, ..good.clone() }),
            ("too few sources", rebuild_request(&shards, 1, &[0, 2, 3])),
            ("a repeated source", rebuild_request(&shards, 1, &[0, 2, 2, 3])),
            ("the built shard as a source", rebuild_request(&shards, 1, &[0, 1, 2, 3])),
            ("a short hash", pb::RebuildShardRequest { hash: vec![1, 2], ..good.clone() }),
        ];
        for (what, request) in cases {
            let error = ShardRebuild::parse(request).expect_err(what);
            assert_eq!(error.code(), tonic::Code::InvalidArgument, "{what}: {error}");
        }
        assert!(ShardRebuild::parse(good).is_ok());
    }

    #[test]
    fn a_full_disk_or_an_io_error_is_answered_without_the_servers_paths() {
        let path = std::path::PathBuf::from("/srv/private-layout/chunks/tmp/stream.7.tmp");
        let full = chunk_status(ChunkError::DiskFull { path: path.clone() });
        assert_eq!(full.code(), tonic::Code::ResourceExhausted);
        assert!(full.message().contains("disk full"), "{}", full.message());
        let io = chunk_status(ChunkError::Io {
            context: format!("fsync {}", path.display()),
            // EIO, what a failing disk gives.
            source: std::io::Error::from_raw_os_error(5),
        });
        assert_eq!(io.code(), tonic::Code::Internal);
        assert!(io.message().contains("I/O error"), "{}", io.message());
        for status in [full, io] {
            assert!(!status.message().contains("private-layout"), "a path leaked: {}", status.message());
        }
        // The kinds a caller must act on keep their names: which chunk is missing or rotten.
        let missing = chunk_status(ChunkError::NotFound("ab12".into()));
        assert!(missing.message().contains("ab12"), "{}", missing.message());
    }
}
