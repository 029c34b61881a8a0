//! The scrubber: every storage node re-reads and re-hashes its chunks, at a throttled rate, to
//! find bit rot before a reader does. A corrupt copy is quarantined (kept for inspection, never
//! served) and reported; a copy (or a stripe's shard) the metadata lists here but the disk lacks
//! is reported too. The report makes the metadata stop listing the copy, and the leader's
//! repair restores the count from a good copy elsewhere (or rebuilds the shard from K others).

use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use mendfs_chunkstore::ChunkError;
use mendfs_meta::MetaNode;
use mendfs_types::ChunkHash;
use mendfs_worker::{Step, Worker, WorkerError};

use crate::chunk_service::{CopyAfterQuarantine, Counters, LocalChunks};

#[derive(Debug, Clone)]
pub struct ScrubConfig {
    /// Read bandwidth for scrubbing (0: scrubbing off).
    pub bytes_per_sec: u64,
    /// Rest between two passes.
    pub pause_between_passes: Duration,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        Self { bytes_per_sec: 32 << 20, pause_between_passes: Duration::from_secs(3600) }
    }
}

/// Missing copies reported per pass at most; the next pass reports the rest.
const MISSING_PER_PASS_MAX: usize = 4_096;

/// One throttled pass over this node's chunks, then a rest of `pause_between_passes`.
pub struct ScrubWorker {
    node: MetaNode,
    storage: Arc<LocalChunks>,
    config: ScrubConfig,
}

impl ScrubWorker {
    pub fn new(node: MetaNode, storage: Arc<LocalChunks>, config: ScrubConfig) -> Self {
        Self { node, storage, config }
    }
}

impl Worker for ScrubWorker {
    fn name(&self) -> String {
        "scrub".into()
    }

    async fn work(&mut self) -> Result<Step, WorkerError> {
        if self.config.bytes_per_sec == 0 {
            tracing::info!("scrubbing is off");
            return Ok(Step::Done);
        }
        let (node, storage) = (&self.node, &self.storage);
        // Each pass is a trace of its own: its reports of bad copies to the leader nest under it.
        let pass = tracing::info_span!(
            "scrub_pass",
            checked = tracing::field::Empty,
            corrupt = tracing::field::Empty,
            missing = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let result = scrub_pass(node, storage, self.config.bytes_per_sec).instrument(pass.clone()).await;
        match &result {
            Ok(outcome) => {
                pass.record("checked", outcome.checked);
                pass.record("corrupt", outcome.corrupt);
                pass.record("missing", outcome.missing);
            }
            Err(e) => {
                pass.record("error", e.as_str());
            }
        }
        pass.in_scope(|| match result {
            Ok(outcome) => {
                if outcome.corrupt + outcome.missing > 0 {
                    tracing::warn!(corrupt = outcome.corrupt, missing = outcome.missing, "scrub pass found bad copies");
                } else {
                    tracing::debug!(checked = outcome.checked, "scrub pass clean");
                }
            }
            Err(e) => tracing::warn!("scrub pass: {e}"),
        });
        Ok(Step::Idle(self.config.pause_between_passes))
    }
}

#[derive(Debug, Default)]
pub struct PassOutcome {
    pub checked: u64,
    pub corrupt: u64,
    pub missing: u64,
}

/// One pass over the node's chunks, a slice of the store at a time (the chunks whose hash
/// starts with one byte, see `ChunkStore::list_slice`): each step (listing a slice, checking
/// one chunk, looking for a slice's missing copies, counting it) is one turn on the node's
/// bounded chunk work threads. A pass over millions of chunks then holds neither a thread nor
/// a list of the whole store for its whole length, and uploads and reads take their turns
/// between its steps.
pub async fn scrub_pass(
    node: &MetaNode,
    storage: &Arc<LocalChunks>,
    bytes_per_sec: u64,
) -> Result<PassOutcome, String> {
    let mut outcome = PassOutcome::default();
    let counters = &storage.counters;
    counters.scrub_checked_chunks.store(0, std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let mut read_bytes = 0u64;
    for byte0 in 0..=u8::MAX {
        let listing = storage.clone();
        let hashes = crate::chunk_work::run(move || listing.store.list_slice(byte0))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        for hash in hashes {
            read_bytes += check_copy(node, storage, hash, &mut outcome).await?;
            // Throttle: stay at or under the configured average read rate.
            let due = Duration::from_secs_f64(read_bytes as f64 / bytes_per_sec as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }

    // Copies the metadata lists here but the disk does not have (lost files, a wiped dir).
    let mut missing = Vec::new();
    for byte0 in 0..=u8::MAX {
        if missing.len() >= MISSING_PER_PASS_MAX {
            break;
        }
        let room = MISSING_PER_PASS_MAX - missing.len();
        let (checker, metadata) = (storage.clone(), node.clone());
        missing.extend(
            crate::chunk_work::run(move || missing_in_slice(&metadata, &checker, byte0, room))
                .await
                .map_err(|e| e.to_string())??,
        );
    }
    // One report per copy, though a shard may be listed by stripes in several slices.
    missing.sort_unstable();
    missing.dedup();
    for hash in &missing {
        // Re-check: a repair copy may have landed since the listing. Presence is enough here, as
        // this looks only for missing copies: a file that was here at the listing was re-hashed
        // above, and one that landed since was hashed by the put that stored it.
        if storage.store.surely_missing(hash) {
            tracing::warn!(chunk = %hash, "scrub: a listed copy is missing here; reporting it");
            outcome.missing += 1;
            report(node, hash).await;
        }
    }
    // Files lost behind the store's back (found missing above) are still in its counters,
    // which the heartbeat reports as this node's chunk count: count again once per pass.
    // Each slice's numbers are replaced as it is counted, so puts and deletes meanwhile in
    // the other slices stay counted.
    for byte0 in 0..=u8::MAX {
        let counting = storage.clone();
        if let Err(e) =
            crate::chunk_work::run(move || counting.store.recount_slice(byte0)).await.map_err(|e| e.to_string())?
        {
            tracing::warn!("scrub: recounting the chunk store: {e}");
            break;
        }
    }
    Counters::add(&counters.scrub_passes, 1);
    Ok(outcome)
}

/// Re-reads and re-hashes one copy; a corrupt one is quarantined and reported. Returns the
/// bytes read, for the pass's throttle.
async fn check_copy(
    node: &MetaNode,
    storage: &Arc<LocalChunks>,
    hash: ChunkHash,
    outcome: &mut PassOutcome,
) -> Result<u64, String> {
    let counters = &storage.counters;
    let store = storage.store.clone();
    let result = crate::chunk_work::run(move || store.get(&hash)).await.map_err(|e| e.to_string())?;
    match result {
        Ok(data) => {
            outcome.checked += 1;
            Counters::add(&counters.scrub_checked_chunks, 1);
            Counters::add(&counters.scrub_checked_bytes, data.len() as u64);
            return Ok(data.len() as u64);
        }
        // Collected since the listing: nothing to check.
        Err(ChunkError::NotFound(_)) => {}
        Err(e @ ChunkError::Corrupt { .. }) => {
            counters.count_error(&e);
            tracing::warn!("scrub: {e}; quarantining the copy");
            let quarantining = storage.clone();
            let after = crate::chunk_work::run(move || quarantining.quarantine_corrupt_copy(&hash))
                .await
                .map_err(|e| e.to_string())?;
            // A put that replaced the copy since it was read left a good one, which stays
            // listed; only a copy that is really gone or bad is reported.
            if after == CopyAfterQuarantine::NoGoodCopy {
                outcome.corrupt += 1;
                report(node, &hash).await;
            }
        }
        Err(e) => {
            counters.count_error(&e);
            tracing::warn!("scrub read: {e}");
        }
    }
    Ok(0)
}

/// The copies, at most `room`, that the metadata lists on this node among the chunks (and the
/// stripes' shards) whose hash starts with `byte0`, and that the disk does not have. A shard is
/// a file like a chunk, reported the same way, once however many stripes share it (one report
/// unlists it from all of them). Rows that are not chunk records are the repair scan's to
/// report, once per round. Blocking.
fn missing_in_slice(
    metadata: &MetaNode,
    checker: &LocalChunks,
    byte0: u8,
    room: usize,
) -> Result<Vec<ChunkHash>, String> {
    let me = metadata.id();
    let mut missing = Vec::new();
    metadata
        .for_each_chunk_in_slice(byte0, |hash, record| {
            if record.replicas.contains(&me) && checker.store.surely_missing(&hash) {
                missing.push(hash);
            }
            missing.len() < room
        })
        .map_err(|e| e.to_string())?;
    if missing.len() < room {
        let mut shards = std::collections::BTreeSet::new();
        metadata
            .for_each_stripe_in_slice(byte0, |_, record| {
                for slot in record.shards {
                    if slot.nodes.contains(&me) && checker.store.surely_missing(&slot.hash) {
                        shards.insert(slot.hash);
                    }
                }
                missing.len() + shards.len() < room
            })
            .map_err(|e| e.to_string())?;
        missing.extend(shards);
    }
    Ok(missing)
}

async fn report(node: &MetaNode, hash: &ChunkHash) {
    if let Err(e) = node.drop_replica(*hash, node.id()).await {
        tracing::warn!("reporting a bad copy: {e}");
    }
}
