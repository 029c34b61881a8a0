//! Orphan collection on a storage node: copies that no committed file lists on this node are
//! deleted, but only after the leader confirms it (a linearizable read) and only if no write
//! has claimed them within the grace period. A chunk in use is never deleted; a chunk left by a
//! failed write is deleted one grace period (plus one pass) after the failure.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mendfs_meta::node::{LeaderRequest, LeaderResponse};
use mendfs_meta::{MetaNode, Origin};

use crate::storage::StorageState;

/// Hashes asked about per leader round trip.
const HASHES_PER_QUERY: usize = 1_024;

/// Runs forever: one pass every `interval`.
pub async fn run(node: MetaNode, storage: Arc<StorageState>, grace: Duration, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match collect_once(&node, &storage, grace).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "collected orphaned chunk copies"),
            Err(e) => tracing::warn!("orphan collection: {e}"),
        }
    }
}

/// One pass; returns how many copies were deleted.
pub async fn collect_once(node: &MetaNode, storage: &Arc<StorageState>, grace: Duration) -> Result<usize, String> {
    let scan = storage.clone();
    let candidates = tokio::task::spawn_blocking(move || -> Result<Vec<[u8; 32]>, String> {
        let now = SystemTime::now();
        let mut old_enough = Vec::new();
        for hash in scan.store.list().map_err(|e| e.to_string())? {
            // Recently written copies are left alone whatever the metadata says: their write
            // may still be on its way to the commit.
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

    let mut deleted = 0;
    for batch in candidates.chunks(HASHES_PER_QUERY) {
        let request = LeaderRequest::UnreferencedChunks {
            node_id: node.config.node_id,
            hashes: batch.iter().map(|h| h.to_vec()).collect(),
        };
        let unreferenced = match node.serve_on_leader(request, Origin::LOCAL).await.map_err(|e| e.to_string())? {
            LeaderResponse::Unreferenced(hashes) => hashes,
            other => return Err(format!("unexpected answer: {other:?}")),
        };
        for hash in unreferenced {
            let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else { continue };
            let storage = storage.clone();
            let removed = tokio::task::spawn_blocking(move || storage.delete_if_collectable(&hash))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            if removed {
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}
