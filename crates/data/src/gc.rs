//! Orphan collection on a storage node: copies that no committed file lists on this node are
//! deleted, but only after the leader confirms it (a linearizable read) and only if no write
//! has claimed them within the grace period. A chunk in use is never deleted; a chunk left by a
//! failed write is deleted one grace period (plus one pass) after the failure.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mendfs_meta::MetaNode;
use mendfs_types::ChunkHash;
use mendfs_worker::{Step, Worker, WorkerError};

use crate::chunk_service::LocalChunks;

/// Hashes asked about per leader round trip.
const HASHES_PER_QUERY: usize = 1_024;

/// One pass every `interval`, the first an interval after start (nothing is collectable
/// sooner: a starting node protects every chunk for a grace period).
pub struct GcWorker {
    node: MetaNode,
    storage: Arc<LocalChunks>,
    grace: Duration,
    interval: Duration,
    started: bool,
}

impl GcWorker {
    pub fn new(node: MetaNode, storage: Arc<LocalChunks>, grace: Duration, interval: Duration) -> Self {
        Self { node, storage, grace, interval, started: false }
    }
}

impl Worker for GcWorker {
    fn name(&self) -> String {
        "gc".into()
    }

    async fn work(&mut self) -> Result<Step, WorkerError> {
        if !std::mem::replace(&mut self.started, true) {
            return Ok(Step::Idle(self.interval));
        }
        // A failed pass (no leader to confirm with, say) is simply tried again next interval.
        match collect_once(&self.node, &self.storage, self.grace).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "collected orphaned chunk copies"),
            Err(e) => tracing::warn!("orphan collection: {e}"),
        }
        Ok(Step::Idle(self.interval))
    }
}

/// One pass; returns how many copies were deleted. It goes a slice of the store at a time
/// (the copies whose hash starts with one byte, see `ChunkStore::list_slice`), so each step on
/// the node's bounded chunk work threads, and the candidates held at once, are a 256th of the
/// store: a pass over millions of copies never keeps a thread, or their whole list, for its
/// length.
pub async fn collect_once(node: &MetaNode, storage: &Arc<LocalChunks>, grace: Duration) -> Result<usize, String> {
    let mut deleted = 0;
    for byte0 in 0..=u8::MAX {
        let scan = storage.clone();
        let candidates = crate::chunk_work::run(move || -> Result<Vec<ChunkHash>, String> {
            let now = SystemTime::now();
            let mut old_enough = Vec::new();
            for hash in scan.store.list_slice(byte0).map_err(|e| e.to_string())? {
                // Recently written copies are left alone whatever the metadata says: their
                // write may still be on its way to the commit.
                let age = std::fs::metadata(scan.store.path_of(&hash))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|modified| now.duration_since(modified).ok());
                if age.is_some_and(|age| age > grace) && scan.is_collectable(&hash) {
                    old_enough.push(hash);
                }
            }
            Ok(old_enough)
        })
        .await
        .map_err(|e| e.to_string())??;

        for batch in candidates.chunks(HASHES_PER_QUERY) {
            let unreferenced = node.unreferenced_chunks(node.id(), batch.to_vec()).await.map_err(|e| e.to_string())?;
            for hash in unreferenced {
                let storage = storage.clone();
                let removed = crate::chunk_work::run(move || storage.delete_if_collectable(&hash))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                if removed {
                    deleted += 1;
                }
            }
        }
    }
    Ok(deleted)
}
