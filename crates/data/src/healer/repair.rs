//! The repair loop on the leader: scan the chunk map and the stripes, record the repair job's
//! progress, drop the replicas and shard records no longer needed, and run the most urgent
//! work (chunk copies, shard rebuilds and moves), throttled, checkpointing finished work
//! through the metadata in small batches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mendfs_heal::planner::{ClusterView, CopyTask};
use mendfs_heal::repair::{next_job, repair_reason, JobChange, RepairTask, Scan, ScanOutcome, ShardTask, ShardWork};
use mendfs_heal::stripe::ShardCopies;
use mendfs_meta::stripes::{ShardAdded, ShardDrop};
use mendfs_meta::{ReplicaAdded, ReplicaDrop, StorageNode};
use mendfs_proto::v1 as pb;
use mendfs_types::{unix_now_ms, NodeId};
use mendfs_worker::{Step, Worker, WorkerError};
use tokio::sync::{mpsc, Semaphore};
use tonic::Request;
use tracing::Instrument;

use super::{lock, Healer};

/// Tasks (copies, shard rebuilds and moves) planned per scan at most: the most urgent ones;
/// the next scan finds the rest. Keeps the planner's memory bounded however large the chunk
/// map is.
const TASKS_PER_SCAN_MAX: usize = 2_048;
const DROPS_PER_SCAN_MAX: usize = 8_192;
/// Finished copies are committed after this many, or this long, whichever comes first: the
/// granularity of the checkpoint a new leader resumes from.
const CHECKPOINT_COPIES: usize = 16;
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
const DROPS_PER_ENTRY: usize = 512;
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(60);

/// A finished task as the checkpoint records it.
enum Done {
    Replica(ReplicaAdded),
    Shard(ShardAdded),
}
/// The rest after a round that did work: what it did changes what the next scan finds (copies
/// made allow drops; drops finish the job), so redundancy should not wait a full interval.
const RESCAN_AFTER_PROGRESS: Duration = Duration::from_millis(20);

pub(super) struct RepairWorker {
    pub(super) healer: Healer,
}

impl Worker for RepairWorker {
    fn name(&self) -> String {
        "healer.repair".into()
    }

    async fn work(&mut self) -> Result<Step, WorkerError> {
        let interval = self.healer.config.scan_interval;
        if !self.healer.node.is_leader() {
            return Ok(Step::Idle(interval));
        }
        match self.healer.repair_once().await {
            Ok(true) => Ok(Step::Idle(RESCAN_AFTER_PROGRESS)),
            Ok(false) => Ok(Step::Idle(interval)),
            // Leadership lost mid-round, no quorum, a node gone: the next scan starts over
            // from the committed records.
            Err(e) => {
                tracing::warn!("repair: {e}");
                Ok(Step::Idle(interval))
            }
        }
    }
}

impl Healer {
    /// One scan of the chunk map and one round of the work it found; says whether it did any.
    pub(super) async fn repair_once(&self) -> Result<bool, String> {
        let term = self.node.term();
        let storage = self.node.storage_nodes().map_err(|e| e.to_string())?;
        let addresses: HashMap<NodeId, String> = storage.iter().map(|n| (n.id, n.addr.clone())).collect();
        let cluster = ClusterView::new(storage.iter().map(crate::node_state).collect(), self.config.replication_factor);
        let node = self.node.clone();
        let outcome = tokio::task::spawn_blocking(move || -> Result<ScanOutcome, String> {
            let mut scan = Scan::new(TASKS_PER_SCAN_MAX, DROPS_PER_SCAN_MAX);
            let skipped = node
                .for_each_chunk(|hash, record| {
                    scan.add(&record.replicas, cluster.plan_chunk(&hash, record.size, &record.replicas));
                    true
                })
                .map_err(|e| e.to_string())?;
            if skipped > 0 {
                tracing::error!(skipped, "the chunk map holds rows that are not chunk records; repair skips them");
            }
            let skipped = node
                .for_each_stripe(|chunk, record| {
                    let shards: Vec<ShardCopies> = record
                        .shards
                        .into_iter()
                        .map(|slot| ShardCopies { hash: slot.hash, nodes: slot.nodes })
                        .collect();
                    let size = usize::try_from(record.size).unwrap_or(usize::MAX);
                    let shard_bytes = record.scheme.shard_bytes(size) as u64;
                    let plan = cluster.plan_stripe(&chunk, record.scheme.data_shards(), &shards);
                    scan.add_stripe(chunk, record.size, shard_bytes, &shards, plan);
                    true
                })
                .map_err(|e| e.to_string())?;
            if skipped > 0 {
                tracing::error!(skipped, "the stripe table holds rows that are not stripes; repair skips them");
            }
            Ok(scan.finish())
        })
        .await
        .map_err(|e| format!("scan task: {e}"))??;
        self.shared().scan = Some((term, outcome.summary.clone()));

        // A round with work is a trace of its own (the copies and their pulls nest under it);
        // the idle rounds, one a second, are not recorded.
        let round = if outcome.tasks.is_empty() && outcome.drops.is_empty() && outcome.shard_drops.is_empty() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                "repair_round",
                copies = outcome.tasks.len(),
                bytes = outcome.planned_bytes(),
                drops = outcome.drops.len() + outcome.shard_drops.len(),
                error = tracing::field::Empty,
            )
        };
        let result = self.repair_round(&storage, &addresses, outcome).instrument(round.clone()).await;
        if let Err(e) = &result {
            round.record("error", e.as_str());
        }
        result
    }

    async fn repair_round(
        &self,
        storage: &[StorageNode],
        addresses: &HashMap<NodeId, String>,
        outcome: ScanOutcome,
    ) -> Result<bool, String> {
        let last = self.node.repair_job().map_err(|e| e.to_string())?;
        let nodes: Vec<_> = storage.iter().map(crate::node_state).collect();
        let change = next_job(last, outcome.tasks.len() as u64, outcome.planned_bytes(), unix_now_ms(), || {
            repair_reason(&nodes, &outcome.summary)
        });
        match &change {
            JobChange::Started(job) => {
                tracing::info!(job = job.id, reason = %job.reason, copies = job.total_copies, bytes = job.total_bytes, "repair started")
            }
            JobChange::Finished(job) => {
                tracing::info!(job = job.id, copies = job.done_copies, bytes = job.done_bytes, "repair finished")
            }
            JobChange::Extended(_) | JobChange::Unchanged(_) => {}
        }
        if let Some(record) = change.to_record() {
            self.node.record_repair_job(record.clone()).await.map_err(|e| e.to_string())?;
        }
        let job_id = change.running().map(|job| job.id);
        let job_changed = matches!(change, JobChange::Started(_) | JobChange::Finished(_));
        // Failed copies are not progress: retrying them at once would only spin.
        let mut worked = !outcome.drops.is_empty() || !outcome.shard_drops.is_empty() || job_changed;
        for batch in outcome.drops.chunks(DROPS_PER_ENTRY) {
            let drops =
                batch.iter().map(|d| ReplicaDrop { hash: d.hash, node: d.node, keep: d.keep.clone() }).collect();
            self.node.drop_replicas(drops).await.map_err(|e| e.to_string())?;
        }
        for batch in outcome.shard_drops.chunks(DROPS_PER_ENTRY) {
            let drops = batch
                .iter()
                .map(|(chunk, d)| ShardDrop {
                    chunk: *chunk,
                    index: u32::try_from(d.index).unwrap_or(u32::MAX),
                    node: d.node,
                    keep: d.keep,
                })
                .collect();
            self.node.repair_shards(None, Vec::new(), drops).await.map_err(|e| e.to_string())?;
        }
        if !outcome.tasks.is_empty() {
            worked |= self.run_all(outcome.tasks, addresses, job_id).await? > 0;
        }
        Ok(worked)
    }

    /// Runs the tasks, throttled, committing finished ones in small batches; returns how many
    /// succeeded.
    async fn run_all(
        &self,
        tasks: Vec<RepairTask>,
        addresses: &HashMap<NodeId, String>,
        job_id: Option<u64>,
    ) -> Result<usize, String> {
        let (done_tx, mut done_rx) = mpsc::channel::<(Done, u64)>(CHECKPOINT_COPIES * 4);
        let slots = Arc::new(Semaphore::new(self.config.repair_copies_in_flight.max(1)));
        let dispatcher = {
            let healer = self.clone();
            let addresses = addresses.clone();
            tokio::spawn(
                async move {
                    // The copies are the dispatcher's: aborting it (a round cancelled when the
                    // node stops) aborts them too, and it returns only once all have ended.
                    let mut in_flight = tokio::task::JoinSet::new();
                    for task in tasks {
                        if !healer.node.is_leader() {
                            break;
                        }
                        let wait = lock(&healer.throttle).reserve(Instant::now(), task.network_bytes());
                        tokio::time::sleep(wait).await;
                        let Ok(slot) = slots.clone().acquire_owned().await else { break };
                        let healer = healer.clone();
                        let addresses = addresses.clone();
                        let done_tx = done_tx.clone();
                        in_flight.spawn(
                            async move {
                                let _slot = slot;
                                let target = task.target();
                                match healer.run_task(&task, &addresses).await {
                                    Ok(done) => {
                                        let _ = done_tx.send(done).await;
                                    }
                                    Err(e) => tracing::warn!(target_node = target, "repair task failed: {e}"),
                                }
                            }
                            .in_current_span(),
                        );
                    }
                    drop(done_tx);
                    while in_flight.join_next().await.is_some() {}
                }
                .in_current_span(),
            )
        };
        // If this round is cancelled (the node stops), the dispatcher must not go on copying.
        let _stop_dispatcher = AbortOnDrop(dispatcher.abort_handle());
        let mut batch = Batch::default();
        let mut succeeded = 0;
        let mut ticker = tokio::time::interval(CHECKPOINT_INTERVAL);
        loop {
            tokio::select! {
                done = done_rx.recv() => match done {
                    Some((done, bytes)) => {
                        succeeded += 1;
                        self.shared().repaired.record(Instant::now(), bytes);
                        match done {
                            Done::Replica(added) => batch.replicas.push(added),
                            Done::Shard(added) => batch.shards.push(added),
                        }
                        if batch.len() >= CHECKPOINT_COPIES {
                            self.checkpoint(&mut batch, job_id).await?;
                        }
                    }
                    None => break,
                },
                _ = ticker.tick() => self.checkpoint(&mut batch, job_id).await?,
            }
        }
        self.checkpoint(&mut batch, job_id).await?;
        dispatcher.await.map_err(|e| format!("repair dispatcher: {e}"))?;
        Ok(succeeded)
    }

    async fn checkpoint(&self, batch: &mut Batch, job_id: Option<u64>) -> Result<(), String> {
        let Batch { replicas, shards } = std::mem::take(batch);
        if !replicas.is_empty() {
            self.node.add_replicas(job_id, replicas).await.map_err(|e| e.to_string())?;
        }
        if !shards.is_empty() {
            self.node.repair_shards(job_id, shards, Vec::new()).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Runs one task; returns what to record and the bytes it wrote (0 if the target already
    /// had them).
    async fn run_task(&self, task: &RepairTask, addresses: &HashMap<NodeId, String>) -> Result<(Done, u64), String> {
        match task {
            RepairTask::Copy(copy) => {
                let bytes = self.replicate(copy, addresses).await?;
                Ok((Done::Replica(ReplicaAdded { hash: copy.hash, node: copy.target }), bytes))
            }
            RepairTask::Shard(shard) => {
                let bytes = self.repair_shard(shard, addresses).await?;
                let index = u32::try_from(shard.index()).map_err(|_| "shard index out of range".to_string())?;
                Ok((Done::Shard(ShardAdded { chunk: shard.chunk, index, node: shard.target() }), bytes))
            }
        }
    }

    /// Rebuilds or moves one shard onto its target; returns the bytes written there.
    async fn repair_shard(&self, task: &ShardTask, addresses: &HashMap<NodeId, String>) -> Result<u64, String> {
        let span = tracing::info_span!(
            "repair_shard",
            peer = task.target(),
            chunk = %task.chunk.short(),
            shard = task.index(),
            kind = if matches!(task.work, ShardWork::Rebuild(_)) { "rebuild" } else { "move" },
            bytes = task.shard_bytes,
            error = tracing::field::Empty,
        );
        let result = async {
            match &task.work {
                // A readable shard moves like a chunk: shards are stored as chunks are. If its
                // copies cannot be read after all (missing, rotted), it is rebuilt instead.
                ShardWork::Move(moved) => {
                    let copy = CopyTask {
                        hash: moved.hash,
                        size: task.shard_bytes,
                        target: moved.target,
                        sources: moved.sources.clone(),
                    };
                    match self.replicate_unlogged(&copy, addresses).await {
                        Ok(bytes) => Ok(bytes),
                        Err(e) => {
                            tracing::info!("moving the shard failed ({e}); rebuilding it from the others");
                            self.rebuild_unlogged(task, moved.index, moved.hash, moved.target, &[], addresses).await
                        }
                    }
                }
                ShardWork::Rebuild(rebuild) => {
                    self.rebuild_unlogged(
                        task,
                        rebuild.index,
                        rebuild.hash,
                        rebuild.target,
                        &rebuild.sources,
                        addresses,
                    )
                    .await
                }
            }
        }
        .instrument(span.clone())
        .await;
        if let Err(e) = &result {
            span.record("error", e.as_str());
        }
        result
    }

    /// Asks `target` to rebuild shard `index` (`hash`) of `task`'s stripe. The sources offered
    /// are `preferred` (the plan's K) first, then every other slot with a listed copy, each
    /// with its listed nodes (the planned one first): the target reads K and takes the next
    /// for any that fails, so one bad source costs a read, not a round.
    async fn rebuild_unlogged(
        &self,
        task: &ShardTask,
        index: usize,
        hash: mendfs_types::ChunkHash,
        target_id: NodeId,
        preferred: &[(usize, NodeId)],
        addresses: &HashMap<NodeId, String>,
    ) -> Result<u64, String> {
        let target = addresses.get(&target_id).ok_or_else(|| format!("node {target_id} has no address"))?;
        let record = self
            .node
            .stripe(task.chunk)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("stripe {} is gone", task.chunk.short()))?;
        let order = preferred
            .iter()
            .map(|&(slot, node)| (slot, Some(node)))
            .chain((0..record.shards.len()).map(|slot| (slot, None)));
        let mut seen = std::collections::BTreeSet::from([index]);
        let mut sources = Vec::new();
        for (slot_index, planned) in order {
            let Some(slot) = record.shards.get(slot_index) else { continue };
            if slot.nodes.is_empty() || !seen.insert(slot_index) {
                continue;
            }
            let mut nodes: Vec<NodeId> = planned.into_iter().collect();
            nodes.extend(slot.nodes.iter().copied().filter(|&other| Some(other) != planned));
            let addrs = nodes.iter().filter_map(|id| addresses.get(id).cloned()).collect();
            sources.push(pb::ShardSource { index: slot_index as u32, hash: slot.hash.to_vec(), addrs });
        }
        let peers = self.node.peers();
        let mut client =
            pb::storage_client::StorageClient::with_interceptor(peers.channel(target)?, peers.interceptor());
        let mut request = Request::new(pb::RebuildShardRequest {
            chunk: task.chunk.to_vec(),
            chunk_size: task.chunk_size,
            data_shards: task.data_shards as u32,
            parity_shards: task.parity_shards as u32,
            index: index as u32,
            hash: hash.to_vec(),
            sources,
            grace_ms: self.config.orphan_grace.as_millis() as u64,
        });
        request.set_timeout(REPLICATE_TIMEOUT);
        let reply = tokio::time::timeout(REPLICATE_TIMEOUT, client.rebuild_shard(request))
            .await
            .map_err(|_| format!("no answer within {REPLICATE_TIMEOUT:?}"))?
            .map_err(|status| mendfs_proto::status_with_cause(&status))?;
        Ok(reply.into_inner().written_bytes)
    }

    /// Asks the target to pull the chunk from a source; returns the bytes it copied (0 if it
    /// already had the chunk).
    async fn replicate(&self, copy: &CopyTask, addresses: &HashMap<NodeId, String>) -> Result<u64, String> {
        let span = tracing::info_span!(
            "repair_copy",
            peer = copy.target,
            chunk = %copy.hash.short(),
            bytes = copy.size,
            error = tracing::field::Empty,
        );
        let result = self.replicate_unlogged(copy, addresses).instrument(span.clone()).await;
        if let Err(e) = &result {
            span.record("error", e.as_str());
        }
        result
    }

    async fn replicate_unlogged(&self, copy: &CopyTask, addresses: &HashMap<NodeId, String>) -> Result<u64, String> {
        let target = addresses.get(&copy.target).ok_or_else(|| format!("node {} has no address", copy.target))?;
        let source_addrs = copy.sources.iter().filter_map(|id| addresses.get(id).cloned()).collect();
        let peers = self.node.peers();
        let mut client =
            pb::storage_client::StorageClient::with_interceptor(peers.channel(target)?, peers.interceptor());
        let mut request = Request::new(pb::ReplicateChunkRequest {
            hash: copy.hash.to_vec(),
            source_addrs,
            grace_ms: self.config.orphan_grace.as_millis() as u64,
        });
        request.set_timeout(REPLICATE_TIMEOUT);
        let reply = tokio::time::timeout(REPLICATE_TIMEOUT, client.replicate_chunk(request))
            .await
            .map_err(|_| format!("no answer within {REPLICATE_TIMEOUT:?}"))?
            .map_err(|status| mendfs_proto::status_with_cause(&status))?;
        Ok(reply.into_inner().copied_bytes)
    }
}

/// Finished work not yet checkpointed.
#[derive(Default)]
struct Batch {
    replicas: Vec<ReplicaAdded>,
    shards: Vec<ShardAdded>,
}

impl Batch {
    fn len(&self) -> usize {
        self.replicas.len() + self.shards.len()
    }
}

/// Aborts a task when dropped: a round cancelled mid-way takes its copy dispatcher with it.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
