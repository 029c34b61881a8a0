//! A node's chunk store behind the `Storage` service, with the pending-write protection that
//! makes garbage collection safe.
//!
//! A prepare registers the chunk as pending (until now + the writer's grace period, plus half
//! again for clock skew) *before* it checks or writes the file, and a collection deletes only
//! under the same lock after checking that nothing is pending; so a write can never re-use a
//! copy that a concurrent collection is removing. A node that restarts forgets its pending
//! set, so it treats every chunk as pending for one grace period after start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mendfs_chunkstore::{ChunkError, ChunkHash, ChunkStore};
use mendfs_proto::v1 as pb;
use mendfs_proto::v1::storage_server::Storage;
use tonic::{Request, Response, Status};

pub struct StorageState {
    pub store: Arc<ChunkStore>,
    pending: Mutex<HashMap<ChunkHash, Instant>>,
    protected_until: Instant,
}

/// Pending entries kept before expired ones are swept on the next prepare.
const PENDING_SWEEP_LEN: usize = 65_536;

pub fn parse_hash(bytes: &[u8]) -> Result<ChunkHash, Status> {
    bytes.try_into().map_err(|_| Status::invalid_argument(format!("a chunk hash has 32 bytes, not {}", bytes.len())))
}

fn skew_allowance(grace: Duration) -> Duration {
    grace + grace / 2
}

impl StorageState {
    pub fn new(store: Arc<ChunkStore>, grace: Duration) -> Self {
        Self { store, pending: Mutex::default(), protected_until: Instant::now() + skew_allowance(grace) }
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
        self.store.put(hash, data)
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

fn chunk_status(error: ChunkError) -> Status {
    match error {
        ChunkError::NotFound(_) => Status::not_found(error.to_string()),
        ChunkError::Corrupt { .. } => Status::data_loss(error.to_string()),
        ChunkError::HashMismatch { .. } | ChunkError::TooLarge { .. } => Status::invalid_argument(error.to_string()),
        ChunkError::DiskFull { .. } => Status::resource_exhausted(error.to_string()),
        other => Status::internal(other.to_string()),
    }
}

pub struct StorageApi {
    pub state: Arc<StorageState>,
}

#[tonic::async_trait]
impl Storage for StorageApi {
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
        let store = self.state.store.clone();
        let result = tokio::task::spawn_blocking(move || {
            let result = store.get(&hash);
            if let Err(ChunkError::Corrupt { .. }) = &result {
                // Never serve it again; keep it for inspection.
                if let Err(e) = store.quarantine(&hash) {
                    tracing::warn!("quarantine of a corrupt chunk failed: {e}");
                }
            }
            result
        })
        .await
        .map_err(|e| Status::internal(format!("read task: {e}")))?;
        match result {
            Ok(data) => Ok(Response::new(pb::ReadChunkReply { data })),
            Err(e) => {
                tracing::warn!("read chunk: {e}");
                Err(chunk_status(e))
            }
        }
    }
}
