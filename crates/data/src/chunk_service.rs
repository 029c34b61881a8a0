//! A node's chunk store behind the `Storage` service, with the pending-write protection that
//! makes garbage collection safe.
//!
//! A prepare registers the chunk as pending (until now + the writer's grace period, plus half
//! again for clock skew) *before* it checks or writes the file, and a collection deletes only
//! under the same lock after checking that nothing is pending; so a write can never re-use a
//! copy that a concurrent collection is removing. A node that restarts forgets its pending
//! set, so it treats every chunk as pending for one grace period after start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mendfs_chunkstore::{ChunkError, ChunkHash, ChunkStore};
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

/// Pending entries kept before expired ones are swept on the next prepare.
const PENDING_SWEEP_LEN: usize = 65_536;

pub fn parse_hash(bytes: &[u8]) -> Result<ChunkHash, Status> {
    ChunkHash::try_from(bytes).map_err(|e| Status::invalid_argument(e.to_string()))
}

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

    /// Stores a chunk for a write, durably, protected from collection for `grace`.
    pub fn prepare(&self, hash: &ChunkHash, data: &[u8], grace: Duration) -> Result<(), ChunkError> {
        {
            let mut pending = self.pending();
            let now = Instant::now();
            if pending.len() >= PENDING_SWEEP_LEN {
                pending.retain(|_, until| *until > now);
            }
            let until = now + skew_allowance(grace);
            let entry = pending.entry(*hash).or_insert(until);
            *entry = (*entry).max(until);
        }
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

    /// Reads a chunk, verified against its hash. A corrupt copy is counted and quarantined:
    /// never served again, kept for inspection. Blocking.
    pub fn read(&self, hash: &ChunkHash) -> Result<Vec<u8>, ChunkError> {
        let result = self.store.get(hash);
        if let Err(e) = &result {
            self.counters.count_error(e);
            tracing::warn!("read chunk: {e}");
        }
        if let Err(ChunkError::Corrupt { .. }) = &result {
            if let Err(e) = self.store.quarantine(hash) {
                tracing::warn!("quarantine of a corrupt chunk failed: {e}");
            }
        }
        result
    }

    /// Protects a chunk from collection for `grace` and says whether a copy is already here.
    /// Repair calls it before pulling a copy, so the copy it is about to record can never be
    /// collected between "already here" and the commit that lists it.
    pub fn claim(&self, hash: &ChunkHash, grace: Duration) -> bool {
        {
            let mut pending = self.pending();
            let until = Instant::now() + skew_allowance(grace);
            let entry = pending.entry(*hash).or_insert(until);
            *entry = (*entry).max(until);
        }
        self.store.contains(hash)
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

/// A chunk operation's error as a gRPC answer: `NotFound` and `DataLoss` tell a reader to try
/// another replica and report this one.
pub(crate) fn chunk_status(error: ChunkError) -> Status {
    match error {
        ChunkError::NotFound(_) => Status::not_found(error.to_string()),
        ChunkError::Corrupt { .. } => Status::data_loss(error.to_string()),
        ChunkError::HashMismatch { .. } | ChunkError::TooLarge { .. } => Status::invalid_argument(error.to_string()),
        ChunkError::DiskFull { .. } => Status::resource_exhausted(error.to_string()),
        other => Status::internal(other.to_string()),
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

    async fn pull(&self, addr: &str, hash: &ChunkHash) -> Result<Vec<u8>, String> {
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
        tokio::task::spawn_blocking(move || state.prepare(&hash, &request.data, grace))
            .await
            .map_err(|e| Status::internal(format!("prepare task: {e}")))?
            .map_err(chunk_status)?;
        Ok(Response::new(pb::PrepareChunkReply {}))
    }

    async fn read_chunk(&self, request: Request<pb::ReadChunkRequest>) -> Result<Response<pb::ReadChunkReply>, Status> {
        let hash = parse_hash(&request.get_ref().hash)?;
        let state = self.state.clone();
        let data = tokio::task::spawn_blocking(move || state.read(&hash))
            .await
            .map_err(|e| Status::internal(format!("read task: {e}")))?
            .map_err(chunk_status)?;
        Ok(Response::new(pb::ReadChunkReply { data }))
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
        let state = self.state.clone();
        let present = tokio::task::spawn_blocking(move || state.claim(&hash, grace))
            .await
            .map_err(|e| Status::internal(format!("claim task: {e}")))?;
        if present {
            // Idempotent: a copy that is already here is not copied again (a repair resumed by a
            // new leader redoes only what was not recorded).
            return Ok(Response::new(pb::ReplicateChunkReply { already_present: true, copied_bytes: 0 }));
        }
        let mut errors = Vec::new();
        for addr in &request.source_addrs {
            let data = match self.pull(addr, &hash).await {
                Ok(data) => data,
                Err(e) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            let size = data.len() as u64;
            let state = self.state.clone();
            let stored = tokio::task::spawn_blocking(move || state.prepare(&hash, &data, grace))
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
            Counters::add(&self.state.counters.repair_copied_chunks, 1);
            Counters::add(&self.state.counters.repair_copied_bytes, size);
            return Ok(Response::new(pb::ReplicateChunkReply { already_present: false, copied_bytes: size }));
        }
        Err(Status::unavailable(format!("no source could supply the chunk: {}", errors.join("; "))))
    }
}
