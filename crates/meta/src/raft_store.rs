//! openraft's storage: the Raft log and vote in segment files under `raft-log/` (see
//! `segment_log`), the state machine in `state.redb`, the latest snapshot in `snapshot.bin`.
//!
//! The log and the state apart, so that appending (on the leader's hot path) and applying
//! committed entries proceed in parallel instead of queueing on one writer.
//! Every write whose loss Raft cannot tolerate (votes, log appends, truncations, purges, snapshot
//! installs) is fsynced before openraft is told it happened: an acknowledged vote or entry that
//! a crash could take back would let two leaders be elected in one term, or lose a committed
//! write. One exception, with its own guard: a leader's appends of its own new entries are told
//! flushed before their fsync, so that the fsync overlaps the followers' (see
//! [`RaftLogStore::append`] and [`DurableLog`]). Two writes are
//! lazy on purpose, each with its reason beside it: `save_committed` (a hint Raft re-learns) and
//! `apply`, which is made durable only every `DURABLE_APPLY_EVERY_ENTRIES` entries and before a
//! snapshot is built, because the log still holds every entry after the durable applied id and
//! openraft re-applies them after a crash.

use std::fmt::Debug;
use std::io::Write;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use mendfs_telemetry::metrics::Histogram;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use crate::schema::{self, decode, encode, CommandResult, Rows, StateStore, StoreError, Table};
use crate::segment_log::SegmentLog;
use crate::snapshot_file::{Item, SnapshotParser, SnapshotWriter};
use crate::state;
use crate::write_metrics::WriteMetrics;
use crate::{NodeId, TypeConfig};

type RaftStorageError = StorageError<NodeId>;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const LOG_META: TableDefinition<&str, &[u8]> = TableDefinition::new("log_meta");
const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";
const KEY_LAST_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "membership";

const SNAPSHOT_FILE: &str = "snapshot.bin";
const CLUSTER_ID_FILE: &str = "cluster_id";

fn table_definition(table: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(table.name())
}

fn io_err(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

fn store_err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// redb's page cache for the state machine: its default, 1 GiB, let a node's memory grow to
/// that with a large state. Kept small because it is a node's largest steady cost: redb reads
/// with `pread`, so a page that is not cached here still comes from the kernel's page cache,
/// not the disk, while 256 MiB filled within seconds of small puts and took a node under
/// 8-client load from about 80 MiB of RSS to 150 (`mendfs bench s3`).
const STATE_CACHE_BYTES: usize = 48 << 20;
/// For reading a Raft log an earlier version kept in redb, once, from start to end.
const LOG_CACHE_BYTES: usize = 16 << 20;

fn open_database(path: &Path, cache_bytes: usize) -> Result<OpenDatabase, StoreError> {
    let database = redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| StoreError(format!("open {}: {e}", path.display())))?;
    Ok(OpenDatabase { pending: std::sync::Mutex::default(), database, closed: ClosedOnDrop(Arc::default()) })
}

/// A redb database that tells when its file is closed. The last handle going is not enough:
/// the database's own drop (which writes its clean-shutdown mark and releases the file) runs
/// after that, on whichever thread dropped it, and a reopen before it ends is refused. Fields
/// drop in order, so `closed` is set only once `database` is gone.
pub(crate) struct OpenDatabase {
    /// Applied entries not yet committed (see [`PendingApply`]). Declared before `database`:
    /// a transaction must go before the database it belongs to.
    pending: std::sync::Mutex<Option<PendingApply>>,
    database: Database,
    closed: ClosedOnDrop,
}

/// The state machine's write transaction, left open between applies: consecutive applies share
/// it, and it is committed when a reader needs what it holds, when it has taken in
/// [`PENDING_APPLY_PROPOSALS_MAX`] proposals or [`PENDING_APPLY_BYTES_MAX`] bytes, or when an
/// apply must be durable. A redb transaction copies every page it first changes and writes
/// back every table root and page checksum when it commits; committing once per apply was
/// about half of a follower's CPU under many clients (`mendfs bench kv`), while consecutive
/// applies mostly touch the same pages (the tail of the history, of the deduplication record,
/// the keys a client just wrote). Nothing is lost by the wait that was not already: the
/// commits it saves were not durable either (see `apply`), and the log holds every entry after
/// the durable applied id.
///
/// The lock is the only way to a write transaction on this database: redb allows one at a
/// time, and a `begin_write` while this one is open would wait for ever.
struct PendingApply {
    txn: redb::WriteTransaction,
    proposals: usize,
    bytes: usize,
}

/// Bounds of what a pending apply transaction takes in before it is committed: they bound the
/// pages it keeps dirty in memory (each proposal dirties a few pages) and what a reader's
/// commit may cost.
const PENDING_APPLY_PROPOSALS_MAX: usize = 256;
const PENDING_APPLY_BYTES_MAX: usize = 4 << 20;

struct ClosedOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl OpenDatabase {
    fn closed_signal(&self) -> DatabaseClosed {
        DatabaseClosed(self.closed.0.clone())
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Option<PendingApply>> {
        // A panic while it was held came from an apply, which had taken the transaction out:
        // it was dropped, with the applies it held, and the failed apply stops Raft on this
        // node (a restart re-applies them from the log). Nothing half-changed is left behind.
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Commits what applies left pending (durably if asked; an `Immediate` commit with nothing
    /// pending still persists the non-durable commits before it).
    fn commit_pending(&self, durability: Durability) -> Result<(), redb::Error> {
        let mut pending = self.lock_pending();
        Self::commit_locked(&self.database, &mut pending, durability)
    }

    fn commit_locked(
        database: &Database,
        pending: &mut Option<PendingApply>,
        durability: Durability,
    ) -> Result<(), redb::Error> {
        match pending.take() {
            Some(mut open) => {
                open.txn.set_durability(durability)?;
                open.txn.commit()?;
            }
            None if matches!(durability, Durability::Immediate) => database.begin_write()?.commit()?,
            None => {}
        }
        Ok(())
    }

    /// Makes every commit so far durable (an empty `Immediate` commit persists the
    /// non-durable ones before it). Only for an apply that has just committed what was
    /// pending: applies come one at a time, so no pending transaction opens meanwhile, and
    /// this `begin_write` waits for none (a snapshot build's commit at the same moment waits
    /// for this one, not for ever).
    fn persist_commits(&self) -> Result<(), redb::Error> {
        Ok(self.database.begin_write()?.commit()?)
    }

    /// A read transaction that sees every entry applied so far.
    fn begin_read(&self) -> Result<redb::ReadTransaction, redb::Error> {
        self.commit_pending(Durability::None)?;
        Ok(self.database.begin_read()?)
    }
}

impl Drop for OpenDatabase {
    fn drop(&mut self) {
        // Committed, and then made durable by redb's own close. Best effort: what is lost here
        // the log re-applies at the next start.
        if let Err(e) = self.commit_pending(Durability::None) {
            tracing::warn!(error = %e, "could not commit the last applies before closing the state machine");
        }
    }
}

/// Whether a database file has been closed (see [`OpenDatabase`]).
#[derive(Clone)]
pub struct DatabaseClosed(Arc<std::sync::atomic::AtomicBool>);

impl DatabaseClosed {
    pub fn is_closed(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Runs blocking redb work off the async executor.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AnyError> + Send + 'static,
) -> Result<T, AnyError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| AnyError::error(format!("storage task failed: {e}")))?
}

// ------------------------------------------------------------------------------------------
// Raft log

#[derive(Clone)]
pub struct RaftLogStore {
    log: Arc<OpenLog>,
    node_id: NodeId,
    /// The latest committed index Raft told us (`save_committed`), for metrics; openraft's own
    /// metrics do not carry it.
    committed_index: Arc<std::sync::atomic::AtomicU64>,
    /// The committed id Raft last told us and no log write has stored yet (see
    /// `save_committed`).
    committed_unsaved: Arc<std::sync::Mutex<Option<Option<LogId<NodeId>>>>>,
    /// The vote as last saved or read: tells a leader's own appends from a follower's.
    vote: Arc<std::sync::Mutex<Option<Vote<NodeId>>>>,
    durable: Arc<watch::Sender<DurableLog>>,
    unflushed: Arc<std::sync::Mutex<Unflushed>>,
    /// Where each fsync's time goes (see `write_metrics`).
    fsync_seconds: Histogram,
}

/// How far this node's log is on disk, for what must not run ahead of it while a leader's own
/// appends are told flushed before their fsync ([`RaftLogStore::append`]): the state machine
/// applies an entry only once its log id is durable here, and a leader announces to followers
/// no commit beyond it ([`commit_to_announce`]). So an entry is applied anywhere, and a client
/// answered, only once the leader and a quorum of the others hold it on disk: a majority, as
/// Raft needs, and the leader's fsync still runs beside the followers'.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DurableLog {
    /// The greatest log id (in log id order: term first) known durable. Entries appended as a
    /// follower are durable when appended; a leader's own, when their shared fsync returns.
    /// After a truncation this may name an entry no longer in the log: it is only ever compared
    /// with entries of a later term (a leader's own) or with entries that are durable anyway.
    pub last: Option<LogId<NodeId>>,
    /// The fsync of a leader's own entries failed: nothing after it may be applied or announced.
    pub failed: Option<String>,
}

/// The commit index a leader may tell its followers, given what its Raft counts as committed
/// and what its own log holds on disk. Raft counts the leader's own entries once appended; this
/// holds the announcement back until they are durable here as well, so that no follower
/// applies an entry a crash of the leader could still take from the majority. `None` announces
/// nothing new (a follower never moves its commit index back).
pub fn commit_to_announce(committed: Option<LogId<NodeId>>, durable: &DurableLog) -> Option<LogId<NodeId>> {
    if durable.failed.is_some() {
        return None;
    }
    match (committed, durable.last) {
        (Some(committed), Some(durable)) if committed > durable => {
            // The durable id is in this leader's log if the leader wrote it in the same term;
            // otherwise it may be a truncated entry of an old term: announce nothing.
            (committed.leader_id == durable.leader_id).then_some(durable)
        }
        (Some(_), None) => None,
        (committed, _) => committed,
    }
}

/// A leader's own appends that are readable but not yet durable.
#[derive(Default)]
struct Unflushed {
    /// The last log id appended and not yet covered by a flush.
    last: Option<LogId<NodeId>>,
    /// A flush task is running; it takes whatever is queued before it ends.
    flushing: bool,
}

/// Makes the leader's own appends durable with one fsync for all queued so far, then moves
/// [`DurableLog`] on, until none is waiting. Appends that arrive during an fsync share the next.
fn flush_until_idle(
    log: &SegmentLog,
    unflushed: &std::sync::Mutex<Unflushed>,
    durable: &watch::Sender<DurableLog>,
    fsync_seconds: &Histogram,
) {
    loop {
        let last = {
            let mut unflushed = unflushed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match unflushed.last.take() {
                Some(last) => last,
                None => {
                    unflushed.flushing = false;
                    return;
                }
            }
        };
        // The id taken was queued after its append's write returned, so this sync, which
        // begins later, covers it and every entry before it.
        let started = std::time::Instant::now();
        let synced = log.sync();
        fsync_seconds.observe(started.elapsed().as_secs_f64());
        match synced {
            Ok(()) => durable.send_modify(|durable| durable.last = durable.last.max(Some(last))),
            Err(e) => {
                tracing::error!(error = %e, "the Raft log could not be made durable");
                durable.send_modify(|durable| durable.failed = Some(format!("fsync of the Raft log failed: {e}")));
            }
        }
    }
}

/// The segment log, with a signal that tells when it is closed (its lock released), as
/// [`OpenDatabase`] has for redb. Fields drop in order.
struct OpenLog {
    log: SegmentLog,
    closed: ClosedOnDrop,
}

impl std::ops::Deref for OpenLog {
    type Target = SegmentLog;

    fn deref(&self) -> &SegmentLog {
        &self.log
    }
}

/// The directory of the Raft log's segments (see `segment_log`).
const LOG_DIR: &str = "raft-log";
/// Where earlier versions kept the Raft log: a redb database, moved into segments on open.
const REDB_LOG_FILE: &str = "raft-log.redb";

/// Moves a Raft log kept in redb by an earlier version into segments, so that an upgraded node
/// keeps its vote and entries (forgetting the vote could let it vote twice in one term). The
/// segments are built beside the final directory and renamed into place, and the redb file is
/// removed only after that: a crash at any point leaves one whole copy to start from.
fn migrate_redb_log(data_dir: &Path) -> Result<(), StoreError> {
    let redb_path = data_dir.join(REDB_LOG_FILE);
    if !redb_path.exists() {
        return Ok(());
    }
    let context = |what: &str, e: &dyn std::fmt::Display| StoreError(format!("{what} {}: {e}", redb_path.display()));
    let target = data_dir.join(LOG_DIR);
    if !target.exists() {
        let building = data_dir.join("raft-log.migrating");
        if building.exists() {
            std::fs::remove_dir_all(&building).map_err(|e| context("remove the unfinished migration of", &e))?;
        }
        let db = open_database(&redb_path, LOG_CACHE_BYTES)?;
        let txn = db.begin_read().map_err(|e| context("read", &e))?;
        let meta = txn.open_table(LOG_META).map_err(|e| context("read", &e))?;
        let get = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(meta.get(key).map_err(|e| context("read", &e))?.map(|guard| guard.value().to_vec()))
        };
        let vote: Option<Vote<NodeId>> = get(KEY_VOTE)?.map(|bytes| decode(&bytes)).transpose()?;
        let purged: Option<Option<LogId<NodeId>>> = get(KEY_LAST_PURGED)?.map(|bytes| decode(&bytes)).transpose()?;
        let committed: Option<Option<LogId<NodeId>>> = get(KEY_COMMITTED)?.map(|bytes| decode(&bytes)).transpose()?;
        let log = SegmentLog::open(&building).map_err(|e| context("migrate", &e))?;
        if let Some(purged) = purged.flatten() {
            log.purge(purged).map_err(|e| context("migrate", &e))?;
        }
        let table = txn.open_table(LOG).map_err(|e| context("read", &e))?;
        let mut batch = Vec::new();
        for row in table.iter().map_err(|e| context("read", &e))? {
            let (_, value) = row.map_err(|e| context("read", &e))?;
            let entry: Entry<TypeConfig> = decode(value.value())?;
            batch.push((entry.log_id, value.value().to_vec()));
            if batch.len() == 1024 {
                log.append(std::mem::take(&mut batch), None, false).map_err(|e| context("migrate", &e))?;
            }
        }
        log.append(batch, committed.flatten(), false).map_err(|e| context("migrate", &e))?;
        // Syncs the entries, and writes the vote and the committed hint.
        log.sync().map_err(|e| context("migrate", &e))?;
        log.save_vote_and_committed(vote, committed.flatten()).map_err(|e| context("migrate", &e))?;
        drop(log);
        std::fs::rename(&building, &target).map_err(|e| context("put the migrated log of", &e))?;
        std::fs::File::open(data_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| context("fsync the directory of", &e))?;
        tracing::info!(from = %redb_path.display(), to = %target.display(), "moved the Raft log into segment files");
    }
    std::fs::remove_file(&redb_path).map_err(|e| context("remove", &e))?;
    std::fs::File::open(data_dir).and_then(|dir| dir.sync_all()).map_err(|e| context("fsync the directory of", &e))
}

impl RaftLogStore {
    pub fn open(data_dir: &Path, node_id: NodeId) -> Result<Self, StoreError> {
        migrate_redb_log(data_dir)?;
        let log = SegmentLog::open(&data_dir.join(LOG_DIR)).map_err(store_err)?;
        let store = Self {
            log: Arc::new(OpenLog { log, closed: ClosedOnDrop(Arc::default()) }),
            node_id,
            committed_index: Arc::default(),
            committed_unsaved: Arc::default(),
            vote: Arc::default(),
            durable: Arc::new(watch::channel(DurableLog::default()).0),
            unflushed: Arc::default(),
            fsync_seconds: mendfs_telemetry::metrics::latency_histogram(),
        };
        // Everything on disk at start-up is durable.
        let last = store.log.last_log_id();
        store.durable.send_modify(|durable| durable.last = last);
        Ok(store)
    }

    /// Observes every fsync of the log's entries in `metrics` from now on.
    pub fn observe_into(&mut self, metrics: &WriteMetrics) {
        self.fsync_seconds = metrics.log_fsync_histogram();
    }

    /// Turns a stored vote that says this node won its term into a plain vote for itself in
    /// that term, before openraft starts.
    ///
    /// openraft 0.9 resumes leadership at start-up when the stored vote is committed and its
    /// own, without a new term and so without a new first entry. Its read index is then the
    /// larger of that first entry (long committed) and the committed index it restored, which is
    /// saved lazily (`save_committed`): an entry committed and acknowledged just before a crash
    /// was missing from linearizable reads after the restart (`limits.rs` lost the last write
    /// of 100 that way). As a candidate instead, the node wins a new term or follows whoever
    /// does, and that leader's first entry, which commits everything before it, bounds reads.
    /// Safe: an uncommitted vote is less than what the node knew, never more.
    pub fn give_up_own_leadership(&self, node_id: NodeId) -> Result<(), StoreError> {
        match self.log.meta().vote {
            Some(vote) if vote.is_committed() && vote.leader_id().voted_for() == Some(node_id) => {
                let candidate = Vote::new(vote.leader_id().get_term(), node_id);
                self.log.save_vote(candidate).map_err(store_err)
            }
            _ => Ok(()),
        }
    }

    /// Writes `entries` to the log: readable when this returns; durable too, unless they are
    /// this leader's own (see `append`).
    async fn write_entries(&self, entries: Vec<Entry<TypeConfig>>) -> Result<(), AnyError> {
        let Some(last) = entries.last().map(|entry| entry.log_id) else { return Ok(()) };
        let as_leader = self.appending_as_leader(&entries);
        let mut encoded = Vec::with_capacity(entries.len());
        for entry in &entries {
            encoded.push((entry.log_id, encode(entry).map_err(io_err)?));
        }
        let committed = self.committed_unsaved.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if as_leader {
            // Written here, not on a blocking thread: without its sync an append is one
            // `pwrite` into the page cache (a roll to a new segment, once per segment, also
            // syncs), and the hop to a blocking thread and back cost more than the write.
            self.log.append(encoded, committed.flatten(), false).map_err(io_err)?;
            self.flush_later(last);
        } else {
            let (log, fsync_seconds) = (self.log.clone(), self.fsync_seconds.clone());
            blocking(move || {
                let started = std::time::Instant::now();
                log.append(encoded, committed.flatten(), true).map_err(io_err)?;
                fsync_seconds.observe(started.elapsed().as_secs_f64());
                Ok(())
            })
            .await?;
            self.durable.send_modify(|durable| durable.last = durable.last.max(Some(last)));
        }
        Ok(())
    }

    /// How far the log is durable, as it moves.
    pub fn durable_log(&self) -> watch::Receiver<DurableLog> {
        self.durable.subscribe()
    }

    /// Whether `entries` are this node's own as the leader it is now: their leader id is the
    /// one of its committed vote for itself. A follower never appends an entry of the current
    /// term's leader id as its own, and an entry a former leadership of this node wrote (got
    /// back from a later leader) carries an older term.
    fn appending_as_leader(&self, entries: &[Entry<TypeConfig>]) -> bool {
        let vote = *self.vote.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(vote) = vote else { return false };
        if !vote.is_committed() || vote.leader_id().voted_for() != Some(self.node_id) {
            return false;
        }
        let leader_id = openraft::CommittedLeaderId::from(vote);
        !entries.is_empty() && entries.iter().all(|entry| entry.log_id.leader_id == leader_id)
    }

    /// Queues `last` for the next fsync of the log, starting a flush task if none runs.
    fn flush_later(&self, last: LogId<NodeId>) {
        let mut unflushed = self.unflushed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        unflushed.last = unflushed.last.max(Some(last));
        if unflushed.flushing {
            return;
        }
        unflushed.flushing = true;
        let (log, unflushed, durable) = (self.log.clone(), self.unflushed.clone(), self.durable.clone());
        let fsync_seconds = self.fsync_seconds.clone();
        tokio::task::spawn_blocking(move || flush_until_idle(&log, &unflushed, &durable, &fsync_seconds));
    }

    /// A handle that tells when the log's files are closed (see `FilesInUse`).
    pub fn database_closed(&self) -> DatabaseClosed {
        DatabaseClosed(self.log.closed.0.clone())
    }

    /// The committed index as last saved, shared: it moves as Raft commits.
    pub fn committed_index(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.committed_index.clone()
    }
}

impl RaftLogReader<TypeConfig> for RaftLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, RaftStorageError> {
        let start = match range.start_bound() {
            Bound::Included(index) => *index,
            Bound::Excluded(index) => index.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(index) => Bound::Included(*index),
            Bound::Excluded(index) => Bound::Excluded(*index),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match end {
            Bound::Included(index) => index.saturating_add(1),
            Bound::Excluded(index) => index,
            Bound::Unbounded => u64::MAX,
        };
        let read = || -> Result<Vec<Entry<TypeConfig>>, AnyError> {
            let mut entries = Vec::new();
            for (_, bytes) in self.log.read(start, end).map_err(io_err)? {
                entries.push(decode(&bytes).map_err(io_err)?);
            }
            Ok(entries)
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for RaftLogStore {
    type LogReader = RaftLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let last_purged_log_id = self.log.last_purged();
        let last_log_id = self.log.last_log_id();
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        // Durable before returning: a node that forgot its vote after a crash could vote twice
        // in one term.
        let log = self.log.clone();
        let vote = *vote;
        blocking(move || log.save_vote(vote).map_err(io_err)).await.map_err(StorageIOError::write_vote)?;
        *self.vote.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        let vote = self.log.meta().vote;
        *self.vote.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = vote;
        Ok(vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), RaftStorageError> {
        self.committed_index.store(committed.map_or(0, |id| id.index), std::sync::atomic::Ordering::Relaxed);
        // Kept in memory and written with the next append (a record in the same write), or the
        // next vote or purge: a write of its own on every commit would cost as much as the
        // append does. Losing the latest value is harmless: the committed index
        // only lets a restarted node re-apply sooner, and Raft re-learns it from the leader
        // (see `give_up_own_leadership` for why reads never depend on it).
        *self.committed_unsaved.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, RaftStorageError> {
        let unsaved = *self.committed_unsaved.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let committed = match unsaved {
            Some(committed) => committed,
            None => self.log.meta().committed,
        };
        self.committed_index.store(committed.map_or(0, |id| id.index), std::sync::atomic::Ordering::Relaxed);
        Ok(committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        // openraft 0.9 awaits the flush callback before it sends a leader's new entries to the
        // followers, which put the leader's fsync and the followers' one after the other on
        // every write. A leader's own entries are therefore told flushed once readable, and
        // made durable by a flush task while they travel; nothing applies them or announces
        // their commit before that fsync returns (see `DurableLog`). A follower's entries are
        // durable before the callback, as Raft needs: it counts toward the leader's quorum the
        // moment it answers, and a committed entry must survive any minority of crashes.
        match self.write_entries(entries).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        // Durable: entries removed here conflict with the leader's log; if they came back after
        // a crash the node would hold a log the leader never wrote.
        let log = self.log.clone();
        blocking(move || log.truncate(log_id.index).map_err(io_err))
            .await
            .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        // The purge mark durable before any segment goes, so that the log state read at
        // start-up never claims entries the segments no longer have.
        let log = self.log.clone();
        blocking(move || log.purge(log_id).map_err(io_err)).await.map_err(|e| StorageIOError::write_logs(e).into())
    }
}

// ------------------------------------------------------------------------------------------
// State machine

/// The state machine tables inside one redb write transaction.
type ByteTable<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

struct WriteTables<'txn> {
    txn: &'txn redb::WriteTransaction,
    /// Opened on first use: an apply touches two or three of the tables, and opening all of
    /// them (a lookup in redb's table tree each, and a root to write back at the commit) was
    /// a visible part of every small write's CPU.
    tables: Vec<std::cell::OnceCell<ByteTable<'txn>>>,
    /// The rows of the `meta` table this transaction has read or written, written back by
    /// [`WriteTables::finish`]. Every command reads and bumps a few of these counters (the
    /// revision, the clock, the byte counts the quota checks), and a batch of a hundred
    /// proposals did each through redb's page cache and B-tree: most of a follower's apply
    /// time under many clients (`mendfs bench kv`). The table is a handful of small rows.
    meta: std::cell::RefCell<std::collections::BTreeMap<Vec<u8>, MetaRow>>,
}

/// A `meta` row as this transaction sees it: `None` removed; `dirty` not yet in redb.
struct MetaRow {
    value: Option<Vec<u8>>,
    dirty: bool,
}

impl<'txn> WriteTables<'txn> {
    fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            txn,
            tables: Table::ALL.iter().map(|_| std::cell::OnceCell::new()).collect(),
            meta: std::cell::RefCell::default(),
        })
    }

    /// Writes the `meta` rows changed in this transaction into redb. Must run before the
    /// transaction commits: what is only in the overlay is lost with it.
    fn finish(mut self) -> Result<(), StoreError> {
        let rows = std::mem::take(self.meta.get_mut());
        for (key, row) in rows.into_iter().filter(|(_, row)| row.dirty) {
            let table = self.table_mut(Table::Meta)?;
            match row.value {
                Some(value) => table.insert(key.as_slice(), value.as_slice()).map_err(store_err)?,
                None => table.remove(key.as_slice()).map_err(store_err)?,
            };
        }
        Ok(())
    }

    /// Creates every table that does not exist yet (at start-up, so that readers find them).
    fn create_all(txn: &'txn redb::WriteTransaction) -> Result<(), StoreError> {
        for table in Table::ALL {
            txn.open_table(table_definition(table)).map_err(store_err)?;
        }
        Ok(())
    }

    fn table(&self, table: Table) -> Result<&ByteTable<'txn>, StoreError> {
        let cell = &self.tables[table as usize];
        if let Some(open) = cell.get() {
            return Ok(open);
        }
        let open = self.txn.open_table(table_definition(table)).map_err(store_err)?;
        Ok(cell.get_or_init(|| open))
    }

    fn table_mut(&mut self, table: Table) -> Result<&mut ByteTable<'txn>, StoreError> {
        self.table(table)?;
        self.tables[table as usize].get_mut().ok_or_else(|| StoreError(format!("table {} not open", table.name())))
    }
}

fn range_rows<T: ReadableTable<&'static [u8], &'static [u8]>>(
    table: &T,
    start: &[u8],
    end: Option<&[u8]>,
    limit: usize,
) -> Result<Rows, StoreError> {
    let range = match end {
        Some(end) => table.range::<&[u8]>(start..end),
        None => table.range::<&[u8]>(start..),
    }
    .map_err(store_err)?;
    let mut rows = Vec::new();
    for row in range.take(limit) {
        let (key, value) = row.map_err(store_err)?;
        rows.push((key.value().to_vec(), value.value().to_vec()));
    }
    Ok(rows)
}

impl StateStore for WriteTables<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if table == Table::Meta {
            if let Some(row) = self.meta.borrow().get(key) {
                return Ok(row.value.clone());
            }
        }
        let value = self.table(table)?.get(key).map_err(store_err)?.map(|guard| guard.value().to_vec());
        if table == Table::Meta {
            self.meta.borrow_mut().insert(key.to_vec(), MetaRow { value: value.clone(), dirty: false });
        }
        Ok(value)
    }

    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if table == Table::Meta {
            self.meta.get_mut().insert(key.to_vec(), MetaRow { value: Some(value.to_vec()), dirty: true });
            return Ok(());
        }
        self.table_mut(table)?.insert(key, value).map_err(store_err)?;
        Ok(())
    }

    fn remove(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        if table == Table::Meta {
            self.meta.get_mut().insert(key.to_vec(), MetaRow { value: None, dirty: true });
            return Ok(());
        }
        self.table_mut(table)?.remove(key).map_err(store_err)?;
        Ok(())
    }

    fn take(&mut self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if table == Table::Meta {
            let value = self.get(table, key)?;
            self.remove(table, key)?;
            return Ok(value);
        }
        Ok(self.table_mut(table)?.remove(key).map_err(store_err)?.map(|guard| guard.value().to_vec()))
    }

    fn range(&self, table: Table, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Rows, StoreError> {
        if table != Table::Meta {
            return range_rows(self.table(table)?, start, end, limit);
        }
        // redb's rows under the overlay's: read enough that the overlay's removals cannot
        // leave fewer than `limit` when more exist.
        let overlay = self.meta.borrow();
        let in_range = |key: &[u8]| key >= start && end.is_none_or(|end| key < end);
        let changed = overlay.iter().filter(|(key, row)| row.dirty && in_range(key)).count();
        let mut rows: std::collections::BTreeMap<Vec<u8>, Vec<u8>> =
            range_rows(self.table(table)?, start, end, limit.saturating_add(changed))?.into_iter().collect();
        for (key, row) in overlay.iter().filter(|(key, row)| row.dirty && in_range(key)) {
            match &row.value {
                Some(value) => rows.insert(key.clone(), value.clone()),
                None => rows.remove(key),
            };
        }
        Ok(rows.into_iter().take(limit).collect())
    }
}

/// A consistent read-only view of the state machine (one redb read transaction). Tables open
/// on first use: most reads touch one or two of them.
pub struct ReadView {
    txn: redb::ReadTransaction,
    tables: Vec<std::sync::OnceLock<redb::ReadOnlyTable<&'static [u8], &'static [u8]>>>,
    last_applied: Option<LogId<NodeId>>,
}

impl ReadView {
    fn new(txn: redb::ReadTransaction, last_applied: Option<LogId<NodeId>>) -> Self {
        Self { txn, tables: Table::ALL.iter().map(|_| std::sync::OnceLock::new()).collect(), last_applied }
    }

    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.last_applied
    }

    fn table(&self, table: Table) -> Result<&redb::ReadOnlyTable<&'static [u8], &'static [u8]>, StoreError> {
        let cell = &self.tables[table as usize];
        if let Some(open) = cell.get() {
            return Ok(open);
        }
        let open = self.txn.open_table(table_definition(table)).map_err(store_err)?;
        Ok(cell.get_or_init(|| open))
    }
}

impl StateStore for ReadView {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.table(table)?.get(key).map_err(store_err)?.map(|guard| guard.value().to_vec()))
    }

    fn put(&mut self, table: Table, _key: &[u8], _value: &[u8]) -> Result<(), StoreError> {
        Err(StoreError(format!("read-only view: cannot write to {}", table.name())))
    }

    fn remove(&mut self, table: Table, _key: &[u8]) -> Result<(), StoreError> {
        Err(StoreError(format!("read-only view: cannot remove from {}", table.name())))
    }

    fn take(&mut self, table: Table, _key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Err(StoreError(format!("read-only view: cannot remove from {}", table.name())))
    }

    fn range(&self, table: Table, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Rows, StoreError> {
        range_rows(self.table(table)?, start, end, limit)
    }
}

/// What the rest of the node sees of the state machine: consistent reads, and a signal that
/// fires after every applied batch (carrying the latest revision) for watchers.
#[derive(Clone)]
pub struct StateReader {
    db: Arc<OpenDatabase>,
    revision: watch::Receiver<u64>,
    cluster_id: Arc<RwLock<Option<String>>>,
    tokens: crate::auth::SharedTokens,
    /// The state clock as applied here, with the moment it was (what a new leader stamps from).
    clock: Arc<crate::clock::StateClock>,
}

impl StateReader {
    /// A handle that tells when the state machine's database file is closed.
    pub fn database_closed(&self) -> DatabaseClosed {
        self.db.closed_signal()
    }

    /// The client tokens, kept current as tokens are created and revoked.
    pub fn tokens(&self) -> crate::auth::SharedTokens {
        self.tokens.clone()
    }

    pub fn view(&self) -> Result<ReadView, StoreError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let last_applied = {
            let meta = txn.open_table(SM_META).map_err(store_err)?;
            match meta.get(KEY_LAST_APPLIED).map_err(store_err)? {
                Some(guard) => decode(guard.value())?,
                None => None,
            }
        };
        Ok(ReadView::new(txn, last_applied))
    }

    /// Fires whenever entries were applied; holds the latest revision.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.clone()
    }

    /// The id of the cluster this node's data belongs to, once known.
    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id.read().ok().and_then(|guard| guard.clone())
    }

    /// The state clock: its applied value, and this node's stamps when it leads.
    pub(crate) fn clock(&self) -> &Arc<crate::clock::StateClock> {
        &self.clock
    }
}

type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// Reads of a snapshot file go in pieces of this size.
const SNAPSHOT_READ_BYTES: usize = 256 << 10;

/// See `apply`: how many entries may be applied between two durable state machine commits.
const DURABLE_APPLY_EVERY_ENTRIES: u64 = 1_024;

/// What an apply tells readers, read in its transaction: a reader's view would commit the
/// pending transaction (see [`PendingApply`]) after every apply.
struct Published {
    revision: u64,
    clock_ms: u64,
    cluster_id: Option<String>,
    /// The client tokens, only when the apply changed them (every call reads them, and most
    /// applies do not touch them).
    tokens: Option<crate::auth::TokenTable>,
}

impl Published {
    /// `cluster_id_known`: this node has the cluster's id already, so it is not read again.
    fn read(store: &impl StateStore, tokens_changed: bool, cluster_id_known: bool) -> Result<Self, StoreError> {
        Ok(Self {
            revision: schema::current_revision(store)?,
            clock_ms: schema::get_u64(store, schema::Table::Meta, schema::META_CLOCK_MS)?,
            cluster_id: if cluster_id_known { None } else { state::cluster_id(store)? },
            tokens: if tokens_changed { Some(crate::auth::TokenTable::load(store)?) } else { None },
        })
    }
}

pub struct StateMachineStore {
    entries_since_durable: u64,
    /// The log's durability, when a log store shares this node ([`DurableLog`]): an entry is
    /// applied only once durable in this node's log.
    durable_log: Option<watch::Receiver<DurableLog>>,
    db: Arc<OpenDatabase>,
    data_dir: PathBuf,
    /// Held by a snapshot build and an install for their whole run: the two write
    /// `snapshot.bin` and an install replaces the state a build reads, so they take turns.
    snapshot_turn: Arc<tokio::sync::Mutex<()>>,
    /// Test hook: runs inside a build between opening its read transaction and making the
    /// state durable, where a race would bite (`MENDFS_TEST_SNAPSHOT_BUILD_PAUSE_MS` sets a sleep).
    build_pause: Option<Arc<dyn Fn() + Send + Sync>>,
    revision_tx: Arc<watch::Sender<u64>>,
    cluster_id: Arc<RwLock<Option<String>>>,
    reader: StateReader,
    metrics: Arc<WriteMetrics>,
}

impl StateMachineStore {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let db = Arc::new(open_database(&data_dir.join("state.redb"), STATE_CACHE_BYTES)?);
        let txn = db.database.begin_write().map_err(store_err)?;
        WriteTables::create_all(&txn)?;
        txn.open_table(SM_META).map_err(store_err)?;
        txn.commit().map_err(store_err)?;
        let (revision, cluster_id, tokens, clock_ms) = {
            let view = ReadView::new(db.begin_read().map_err(store_err)?, None);
            (
                schema::current_revision(&view)?,
                state::cluster_id(&view)?,
                crate::auth::TokenTable::load(&view)?,
                schema::get_u64(&view, schema::Table::Meta, schema::META_CLOCK_MS)?,
            )
        };
        // The clock on disk was stamped before this process started: it holds from now on.
        let clock = Arc::new(crate::clock::StateClock::default());
        clock.applied(clock_ms, std::time::Instant::now());
        let cluster_id = match std::fs::read_to_string(data_dir.join(CLUSTER_ID_FILE)) {
            Ok(text) if !text.trim().is_empty() => Some(text.trim().to_string()),
            Ok(_) => cluster_id,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => cluster_id,
            Err(e) => return Err(StoreError(format!("read {CLUSTER_ID_FILE}: {e}"))),
        };
        let (revision_tx, revision_rx) = watch::channel(revision);
        let cluster_id = Arc::new(RwLock::new(cluster_id));
        let reader = StateReader {
            db: db.clone(),
            revision: revision_rx,
            cluster_id: cluster_id.clone(),
            tokens: Arc::new(RwLock::new(tokens)),
            clock,
        };
        remove_stale_temporary_files(data_dir)?;
        let build_pause =
            std::env::var("MENDFS_TEST_SNAPSHOT_BUILD_PAUSE_MS").ok().and_then(|ms| ms.parse::<u64>().ok()).map(|ms| {
                Arc::new(move || std::thread::sleep(std::time::Duration::from_millis(ms)))
                    as Arc<dyn Fn() + Send + Sync>
            });
        Ok(Self {
            entries_since_durable: 0,
            durable_log: None,
            db,
            data_dir: data_dir.to_path_buf(),
            snapshot_turn: Arc::default(),
            build_pause,
            revision_tx: Arc::new(revision_tx),
            cluster_id,
            reader,
            metrics: Arc::default(),
        })
    }

    /// Observes every apply in `metrics` from now on.
    pub fn observe_into(&mut self, metrics: Arc<WriteMetrics>) {
        self.metrics = metrics;
    }

    pub fn reader(&self) -> StateReader {
        self.reader.clone()
    }

    /// Applies entries only once `durable_log` says this node's log holds them on disk.
    pub fn follow_log_durability(&mut self, durable_log: watch::Receiver<DurableLog>) {
        self.durable_log = Some(durable_log);
    }

    /// Waits until the log holds `last` on disk (see [`DurableLog`]).
    async fn wait_until_durable(&mut self, last: LogId<NodeId>) -> Result<(), RaftStorageError> {
        let Some(durable_log) = &mut self.durable_log else { return Ok(()) };
        let durable = durable_log
            .wait_for(|durable| durable.failed.is_some() || durable.last >= Some(last))
            .await
            .map_err(|_| StorageIOError::read_logs(io_err("the log store is gone")))?;
        match &durable.failed {
            Some(failed) => Err(StorageIOError::write_logs(io_err(failed)).into()),
            None => Ok(()),
        }
    }

    /// Tells readers what was applied.
    fn publish(&self, published: Published) -> Result<(), StoreError> {
        if let Some(tokens) = published.tokens {
            *self.reader.tokens.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = tokens;
        }
        if self.reader.cluster_id().is_none() {
            if let Some(cluster_id) = published.cluster_id {
                // Durable at once, apart from the (lazily fsynced) state machine: the id is what
                // keeps this data directory from ever being mixed into another cluster, even
                // if this node is later restarted somewhere it can no longer apply its log.
                write_file_durably(&self.data_dir.join(CLUSTER_ID_FILE), cluster_id.as_bytes())?;
                if let Ok(mut guard) = self.cluster_id.write() {
                    *guard = Some(cluster_id);
                }
            }
        }
        // Read at the end of the apply: the clock it reached was stamped before this moment.
        self.reader.clock.applied(published.clock_ms, std::time::Instant::now());
        self.revision_tx.send_replace(published.revision);
        Ok(())
    }

    fn snapshot_path(&self) -> PathBuf {
        self.data_dir.join(SNAPSHOT_FILE)
    }

    #[cfg(test)]
    pub(crate) fn set_build_pause(&mut self, pause: Arc<dyn Fn() + Send + Sync>) {
        self.build_pause = Some(pause);
    }
}

/// A temporary file beside `snapshot.bin`, unique to its writer (a build and an install never
/// share one), removed if dropped before it is renamed into place.
fn temporary_snapshot_file(data_dir: &Path, purpose: &str) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new().prefix(&format!("snapshot-{purpose}-")).suffix(".tmp").tempfile_in(data_dir)
}

/// Leftovers of a build or install a crash interrupted.
fn remove_stale_temporary_files(data_dir: &Path) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(data_dir).map_err(|e| StoreError(format!("list {}: {e}", data_dir.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snapshot-") && name.ends_with(".tmp") || name == "snapshot.tmp" {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Durably puts `temporary` in place as `snapshot.bin`: fsync of the file, rename, fsync of the
/// directory (the rename is durable only once the directory is).
fn install_snapshot_file(temporary: tempfile::NamedTempFile, path: &Path) -> std::io::Result<()> {
    temporary.as_file().sync_all()?;
    temporary.persist(path).map_err(|e| e.error)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Reads the meta at the head of a snapshot file (the rest is read when it is sent or installed).
fn read_snapshot_meta(path: &Path) -> Result<Option<Meta>, AnyError> {
    use std::io::Read;
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("open {}: {e}", path.display()))),
    };
    let mut parser = SnapshotParser::default();
    let mut meta = None;
    let mut piece = vec![0u8; 4096];
    while meta.is_none() {
        let read = file.read(&mut piece).map_err(io_err)?;
        if read == 0 {
            return Err(io_err(format!("{} ends before its meta", path.display())));
        }
        // The first item is the meta; stop there.
        let result = parser.feed(&piece[..read], |item| match item {
            Item::Meta(bytes) => {
                meta = Some(bytes);
                Err(String::new())
            }
            Item::Row { .. } => Err("a row before the meta".into()),
        });
        if let Err(e) = result {
            if meta.is_none() {
                return Err(io_err(format!("{}: {e}", path.display())));
            }
        }
    }
    meta.map(|bytes| decode(&bytes)).transpose().map_err(io_err)
}

/// Writes a file so that after a crash it is either absent, the old version, or complete:
/// temporary file, fsync, rename, fsync of the directory (the rename itself is only durable
/// once the directory is).
pub fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let context = |what: &str, e: std::io::Error| StoreError(format!("{what} {}: {e}", path.display()));
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary).map_err(|e| context("create", e))?;
    file.write_all(bytes).map_err(|e| context("write", e))?;
    file.sync_all().map_err(|e| context("fsync", e))?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(|e| context("rename", e))?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent).and_then(|dir| dir.sync_all()).map_err(|e| context("fsync directory of", e))?;
    }
    Ok(())
}

pub struct SnapshotBuilder {
    db: Arc<OpenDatabase>,
    store: StateMachineStore,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let _turn = self.store.snapshot_turn.clone().lock_owned().await;
        let db = self.db.clone();
        let data_dir = self.store.data_dir.clone();
        let path = self.store.snapshot_path();
        let pause = self.store.build_pause.clone();
        let meta = blocking(move || {
            // The read transaction first: it fixes the instant the snapshot describes.
            let txn = db.begin_read().map_err(io_err)?;
            if let Some(pause) = pause {
                pause();
            }
            // Then make durable every applied entry, which includes all the read transaction
            // sees (an empty Immediate commit persists the non-durable ones before it). In the
            // other order an apply landing in between would be in the snapshot but not on disk,
            // and openraft, told the snapshot covers it, may purge the log entries a restart
            // needs to re-apply it.
            db.commit_pending(Durability::Immediate).map_err(io_err)?;
            let sm_meta = txn.open_table(SM_META).map_err(io_err)?;
            let last_applied: Option<LogId<NodeId>> = match sm_meta.get(KEY_LAST_APPLIED).map_err(io_err)? {
                Some(guard) => decode(guard.value()).map_err(io_err)?,
                None => None,
            };
            let membership: StoredMembership<NodeId, openraft::BasicNode> =
                match sm_meta.get(KEY_MEMBERSHIP).map_err(io_err)? {
                    Some(guard) => decode(guard.value()).map_err(io_err)?,
                    None => StoredMembership::default(),
                };
            let snapshot_id = match last_applied {
                Some(log_id) => format!("{}-{}-{}", log_id.leader_id, log_id.index, rand::random::<u32>()),
                None => format!("empty-{}", rand::random::<u32>()),
            };
            let meta = Meta { last_log_id: last_applied, last_membership: membership, snapshot_id };
            // Rows go from the read transaction to the file one at a time.
            let temporary = temporary_snapshot_file(&data_dir, "build").map_err(io_err)?;
            let mut writer =
                SnapshotWriter::new(std::io::BufWriter::new(temporary.as_file()), &encode(&meta).map_err(io_err)?)
                    .map_err(io_err)?;
            for table in Table::ALL {
                let handle = txn.open_table(table_definition(table)).map_err(io_err)?;
                for row in handle.iter().map_err(io_err)? {
                    let (key, value) = row.map_err(io_err)?;
                    writer.row(table, key.value(), value.value()).map_err(io_err)?;
                }
            }
            writer.finish().map_err(io_err)?.flush().map_err(io_err)?;
            // Durable before openraft hears of it: it purges the log up to the snapshot.
            install_snapshot_file(temporary, &path).map_err(io_err)?;
            Ok(meta)
        })
        .await
        .map_err(StorageIOError::read_state_machine)?;
        let file = tokio::fs::File::open(self.store.snapshot_path())
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io_err(e)))?;
        Ok(Snapshot { meta, snapshot: Box::new(file) })
    }
}

impl StateMachineStore {
    fn handle(&self) -> StateMachineStore {
        StateMachineStore {
            entries_since_durable: 0,
            durable_log: self.durable_log.clone(),
            db: self.db.clone(),
            data_dir: self.data_dir.clone(),
            snapshot_turn: self.snapshot_turn.clone(),
            build_pause: self.build_pause.clone(),
            revision_tx: self.revision_tx.clone(),
            cluster_id: self.cluster_id.clone(),
            reader: self.reader.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, openraft::BasicNode>), RaftStorageError> {
        let read = || -> Result<_, AnyError> {
            let txn = self.db.begin_read().map_err(io_err)?;
            let meta = txn.open_table(SM_META).map_err(io_err)?;
            let last_applied: Option<LogId<NodeId>> = match meta.get(KEY_LAST_APPLIED).map_err(io_err)? {
                Some(guard) => decode(guard.value()).map_err(io_err)?,
                None => None,
            };
            let membership = match meta.get(KEY_MEMBERSHIP).map_err(io_err)? {
                Some(guard) => decode(guard.value()).map_err(io_err)?,
                None => StoredMembership::default(),
            };
            Ok((last_applied, membership))
        };
        read().map_err(|e| StorageIOError::read_state_machine(e).into())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<CommandResult>>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|entry| entry.log_id) else {
            return Ok(Vec::new());
        };
        self.wait_until_durable(last).await?;
        let db = self.db.clone();
        // No fsync on every apply: the entries are durable in the Raft log, and the applied id
        // is written in the same transaction as the state, so after a crash the state machine
        // is simply older and openraft re-applies the rest from the log. The log is only
        // purged up to a snapshot, and building one first makes the state durable
        // (`SnapshotBuilder`), so the entries needed for that replay are never gone. A durable
        // commit every `DURABLE_APPLY_EVERY_ENTRIES` bounds the replay after a crash. Most
        // applies do not even commit: they leave their transaction to the next (`PendingApply`).
        self.entries_since_durable += entries.len() as u64;
        let durability = if self.entries_since_durable >= DURABLE_APPLY_EVERY_ENTRIES {
            self.entries_since_durable = 0;
            Durability::Immediate
        } else {
            Durability::None
        };
        let tokens_changed = entries.iter().any(|entry| match &entry.payload {
            EntryPayload::Normal(batch) => batch.proposals.iter().any(|proposal| proposal.command.changes_tokens()),
            _ => false,
        });
        let durable = matches!(durability, Durability::Immediate);
        let cluster_id_known = self.reader.cluster_id().is_some();
        let work = || {
            let mut pending = db.lock_pending();
            let open = match pending.take() {
                Some(open) => open,
                None => PendingApply { txn: db.database.begin_write().map_err(io_err)?, proposals: 0, bytes: 0 },
            };
            // On an error below the transaction is dropped with this apply half in it, and the
            // applies before it that it held: the failed apply stops Raft on this node, and a
            // restart re-applies all of them from the log.
            let PendingApply { txn, mut proposals, mut bytes } = open;
            let mut results = Vec::with_capacity(entries.len());
            let published;
            {
                let mut tables = WriteTables::open(&txn).map_err(io_err)?;
                let mut meta = txn.open_table(SM_META).map_err(io_err)?;
                let mut last_applied = None;
                for entry in &entries {
                    last_applied = Some(entry.log_id);
                    match &entry.payload {
                        EntryPayload::Blank => results.push(Vec::new()),
                        EntryPayload::Normal(batch) => {
                            let mut batch_results = Vec::with_capacity(batch.proposals.len());
                            for proposal in &batch.proposals {
                                batch_results.push(state::apply(&mut tables, proposal).map_err(io_err)?);
                                bytes += proposal.approximate_bytes();
                            }
                            proposals += batch.proposals.len();
                            results.push(batch_results);
                        }
                        EntryPayload::Membership(membership) => {
                            let stored = StoredMembership::new(Some(entry.log_id), membership.clone());
                            let bytes = encode(&stored).map_err(io_err)?;
                            meta.insert(KEY_MEMBERSHIP, bytes.as_slice()).map_err(io_err)?;
                            results.push(Vec::new());
                        }
                    }
                }
                // The applied id goes in the same transaction as the state it describes.
                let applied = encode(&last_applied).map_err(io_err)?;
                meta.insert(KEY_LAST_APPLIED, applied.as_slice()).map_err(io_err)?;
                published = Published::read(&tables, tokens_changed, cluster_id_known).map_err(io_err)?;
                tables.finish().map_err(io_err)?;
            }
            *pending = Some(PendingApply { txn, proposals, bytes });
            if durable || proposals >= PENDING_APPLY_PROPOSALS_MAX || bytes >= PENDING_APPLY_BYTES_MAX {
                OpenDatabase::commit_locked(&db.database, &mut pending, Durability::None).map_err(io_err)?;
            }
            Ok::<_, AnyError>((results, published))
        };
        // The apply runs here: it is tens of microseconds of CPU, less than the two thread
        // hand-offs a blocking task costs. Besides applies (one at a time), readers committing
        // a pending apply (as long as a commit without fsync), a snapshot's build (its one
        // durable commit) and install take the pending transaction's lock, so this almost
        // never waits for the disk.
        let started = std::time::Instant::now();
        let (results, published) = work().map_err(StorageIOError::write_state_machine)?;
        self.metrics.apply(started.elapsed());
        if durable {
            // The fsync goes to a blocking thread, and outside the pending lock: readers need
            // the applies visible, which they are, not durable.
            let db = db.clone();
            blocking(move || db.persist_commits().map_err(io_err))
                .await
                .map_err(StorageIOError::write_state_machine)?;
        }
        self.publish(published).map_err(|e| StorageIOError::read_state_machine(io_err(e)))?;
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { db: self.db.clone(), store: self.handle() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, RaftStorageError> {
        // Anonymous: it is gone when openraft drops it, installed or not; an install copies
        // what it reads into `snapshot.bin`.
        let data_dir = self.data_dir.clone();
        let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(data_dir))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?
            .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<tokio::fs::File>) -> Result<(), RaftStorageError> {
        let _turn = self.snapshot_turn.clone().lock_owned().await;
        let source = snapshot.into_std().await;
        let db = self.db.clone();
        let snapshot_meta = meta.clone();
        let data_dir = self.data_dir.clone();
        let path = self.snapshot_path();
        blocking(move || install_from_file(&db, &data_dir, &path, source, &snapshot_meta))
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), e))?;
        let published = self.reader.view().and_then(|view| Published::read(&view, true, false));
        self.publish(published.map_err(|e| StorageIOError::read_state_machine(io_err(e)))?)
            .map_err(|e| StorageIOError::read_state_machine(io_err(e)))?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        let path = self.snapshot_path();
        let _turn = self.snapshot_turn.clone().lock_owned().await;
        let read = {
            let path = path.clone();
            blocking(move || {
                let Some(meta) = read_snapshot_meta(&path)? else { return Ok(None) };
                // Opened under the turn: a later build or install renames a new file into
                // place and leaves this one readable until it is dropped.
                let file = std::fs::File::open(&path).map_err(io_err)?;
                Ok(Some((meta, file)))
            })
            .await
        };
        let found = read.map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(found.map(|(meta, file)| Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
    }
}

/// Replaces the whole state with the snapshot in `source`, row by row in one write transaction,
/// copying its bytes into a new `snapshot.bin` on the way; nothing is committed unless the
/// snapshot parses to its end and its hash matches.
fn install_from_file(
    db: &OpenDatabase,
    data_dir: &Path,
    path: &Path,
    mut source: std::fs::File,
    meta: &Meta,
) -> Result<(), AnyError> {
    use std::io::{Read, Seek};
    source.rewind().map_err(io_err)?;
    let temporary = temporary_snapshot_file(data_dir, "install").map_err(io_err)?;
    let mut copy = std::io::BufWriter::new(temporary.as_file());
    // Held to the end: no apply may open a transaction of its own meanwhile. Applies before
    // this one are committed first; the snapshot replaces what they wrote anyway.
    let mut pending = db.lock_pending();
    OpenDatabase::commit_locked(&db.database, &mut pending, Durability::None).map_err(io_err)?;
    let txn = db.database.begin_write().map_err(io_err)?;
    {
        let mut tables = WriteTables::open(&txn).map_err(io_err)?;
        for table in Table::ALL {
            tables.table_mut(table).map_err(io_err)?.retain(|_, _| false).map_err(io_err)?;
        }
        let mut parser = SnapshotParser::default();
        let mut piece = vec![0u8; SNAPSHOT_READ_BYTES];
        loop {
            let read = source.read(&mut piece).map_err(io_err)?;
            if read == 0 {
                break;
            }
            copy.write_all(&piece[..read]).map_err(io_err)?;
            parser
                .feed(&piece[..read], |item| match item {
                    Item::Meta(_) => Ok(()),
                    Item::Row { table, key, value } => tables.put(table, &key, &value).map_err(|e| e.to_string()),
                })
                .map_err(io_err)?;
        }
        parser.finish().map_err(io_err)?;
        tables.finish().map_err(io_err)?;
        let mut sm_meta = txn.open_table(SM_META).map_err(io_err)?;
        let applied = encode(&meta.last_log_id).map_err(io_err)?;
        sm_meta.insert(KEY_LAST_APPLIED, applied.as_slice()).map_err(io_err)?;
        let membership = encode(&meta.last_membership).map_err(io_err)?;
        sm_meta.insert(KEY_MEMBERSHIP, membership.as_slice()).map_err(io_err)?;
    }
    // Durable: the leader stops sending the entries this snapshot covers.
    txn.commit().map_err(io_err)?;
    copy.flush().map_err(io_err)?;
    drop(copy);
    // The copy becomes the snapshot this node serves to others and restarts from.
    install_snapshot_file(temporary, path).map_err(io_err)
}

impl From<StoreError> for AnyError {
    fn from(e: StoreError) -> Self {
        AnyError::error(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Proposal, ProposalBatch};
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::CommittedLeaderId;

    struct Builder;

    impl StoreBuilder<TypeConfig, RaftLogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, RaftLogStore, StateMachineStore), RaftStorageError> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(io_err(e)))?;
            let log = RaftLogStore::open(dir.path(), 1).map_err(|e| StorageIOError::write(io_err(e)))?;
            let state = StateMachineStore::open(dir.path()).map_err(|e| StorageIOError::write(io_err(e)))?;
            Ok((dir, log, state))
        }
    }

    /// openraft's own conformance suite for log and state machine stores.
    #[test]
    fn the_stores_pass_openraft_storage_suite() {
        if let Err(e) = Suite::test_all(Builder) {
            panic!("openraft's storage suite failed: {e}");
        }
    }

    fn set_entry(index: u64, key: &str) -> Entry<TypeConfig> {
        let proposal = Proposal {
            request_id: None,
            proposed_at_ms: 0,
            command: Command::Set { key: key.into(), value: vec![1; 100], expected_version: None, session_id: None },
        };
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(ProposalBatch { proposals: vec![proposal] }),
        }
    }

    fn log_id(term: u64, node: NodeId, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, node), index)
    }

    fn blank(term: u64, node: NodeId, index: u64) -> Entry<TypeConfig> {
        Entry { log_id: log_id(term, node, index), payload: EntryPayload::Blank }
    }

    /// A node upgraded from a version that kept its Raft log in redb keeps its vote, its purge
    /// mark and its entries, and the redb file is gone once they are in segments.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_kept_in_redb_by_an_earlier_version_moves_into_segments() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let db = open_database(&dir.path().join(REDB_LOG_FILE), LOG_CACHE_BYTES).expect("create");
            let txn = db.database.begin_write().expect("write");
            {
                let mut log = txn.open_table(LOG).expect("table");
                for index in 6..=9 {
                    let bytes = encode(&blank(2, 1, index)).expect("encode");
                    log.insert(index, bytes.as_slice()).expect("insert");
                }
                let mut meta = txn.open_table(LOG_META).expect("table");
                let vote = encode(&Vote::<NodeId>::new_committed(2, 1)).expect("encode");
                meta.insert(KEY_VOTE, vote.as_slice()).expect("insert");
                let purged = encode(&Some(log_id(1, 1, 5))).expect("encode");
                meta.insert(KEY_LAST_PURGED, purged.as_slice()).expect("insert");
                let committed = encode(&Some(log_id(2, 1, 8))).expect("encode");
                meta.insert(KEY_COMMITTED, committed.as_slice()).expect("insert");
            }
            txn.commit().expect("commit");
        }
        // A migration a crash interrupted, left half-built: started over.
        std::fs::create_dir_all(dir.path().join("raft-log.migrating")).expect("dir");
        std::fs::write(dir.path().join("raft-log.migrating/00000000000000000001.seg"), b"half").expect("write");

        let mut log = RaftLogStore::open(dir.path(), 1).expect("open and migrate");
        assert!(!dir.path().join(REDB_LOG_FILE).exists(), "the redb log is removed");
        assert!(!dir.path().join("raft-log.migrating").exists());
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 5)));
        assert_eq!(state.last_log_id, Some(log_id(2, 1, 9)));
        assert_eq!(log.read_vote().await.expect("vote"), Some(Vote::new_committed(2, 1)));
        assert_eq!(log.read_committed().await.expect("committed"), Some(log_id(2, 1, 8)));
        let entries = log.try_get_log_entries(0..).await.expect("read");
        assert_eq!(entries.iter().map(|entry| entry.log_id.index).collect::<Vec<_>>(), vec![6, 7, 8, 9]);
    }

    #[derive(Debug, Clone)]
    enum MetaOp {
        Get(u8),
        Put(u8, u8),
        Remove(u8),
        Range(u8, Option<u8>, usize),
        Commit,
    }

    fn meta_op() -> impl proptest::strategy::Strategy<Value = MetaOp> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..8).prop_map(MetaOp::Get),
            (0u8..8, any::<u8>()).prop_map(|(key, value)| MetaOp::Put(key, value)),
            (0u8..8).prop_map(MetaOp::Remove),
            (0u8..8, proptest::option::of(0u8..9), 0usize..6)
                .prop_map(|(start, end, limit)| MetaOp::Range(start, end, limit)),
            Just(MetaOp::Commit),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// The `meta` overlay reads, ranges and commits exactly as a plain table would, across
        /// transactions.
        #[test]
        fn the_meta_overlay_behaves_as_the_table_it_stands_for(ops in proptest::collection::vec(meta_op(), 1..60)) {
            let dir = tempfile::tempdir().expect("dir");
            let db = open_database(&dir.path().join("state.redb"), 1 << 20).expect("open");
            let txn = db.database.begin_write().expect("write");
            WriteTables::create_all(&txn).expect("create");
            txn.commit().expect("commit");
            let mut model = schema::MemoryStore::default();
            for transaction in ops.split(|op| matches!(op, MetaOp::Commit)) {
                let txn = db.database.begin_write().expect("write");
                let mut store = WriteTables::open(&txn).expect("tables");
                for op in transaction {
                    match op {
                        MetaOp::Get(key) => proptest::prop_assert_eq!(
                            store.get(Table::Meta, &[*key]).expect("get"),
                            model.get(Table::Meta, &[*key]).expect("get")
                        ),
                        MetaOp::Put(key, value) => {
                            store.put(Table::Meta, &[*key], &[*value]).expect("put");
                            model.put(Table::Meta, &[*key], &[*value]).expect("put");
                        }
                        MetaOp::Remove(key) => {
                            store.remove(Table::Meta, &[*key]).expect("remove");
                            model.remove(Table::Meta, &[*key]).expect("remove");
                        }
                        MetaOp::Range(start, end, limit) => {
                            let end = end.map(|end| vec![end]);
                            proptest::prop_assert_eq!(
                                store.range(Table::Meta, &[*start], end.as_deref(), *limit).expect("range"),
                                model.range(Table::Meta, &[*start], end.as_deref(), *limit).expect("range")
                            );
                        }
                        MetaOp::Commit => {}
                    }
                }
                store.finish().expect("finish");
                txn.commit().expect("commit");
            }
            let view = ReadView::new(db.begin_read().expect("read"), None);
            proptest::prop_assert_eq!(
                view.range(Table::Meta, &[], None, usize::MAX).expect("range"),
                model.range(Table::Meta, &[], None, usize::MAX).expect("range")
            );
        }
    }

    #[test]
    fn a_leader_announces_only_the_commit_its_own_log_holds_on_disk() {
        let durable = |last: Option<LogId<NodeId>>| DurableLog { last, failed: None };
        // Durable at or beyond the commit: announced as it is.
        assert_eq!(commit_to_announce(Some(log_id(2, 1, 5)), &durable(Some(log_id(2, 1, 9)))), Some(log_id(2, 1, 5)));
        assert_eq!(commit_to_announce(None, &durable(Some(log_id(2, 1, 9)))), None);
        // Committed by Raft's count ahead of the leader's fsync: held back to what is durable.
        assert_eq!(commit_to_announce(Some(log_id(2, 1, 9)), &durable(Some(log_id(2, 1, 5)))), Some(log_id(2, 1, 5)));
        // The durable id is of another leadership (maybe a truncated entry): nothing new.
        assert_eq!(commit_to_announce(Some(log_id(3, 1, 4)), &durable(Some(log_id(2, 1, 9)))), None);
        assert_eq!(commit_to_announce(Some(log_id(3, 1, 4)), &durable(None)), None);
        // After a failed fsync nothing more is announced.
        let failed = DurableLog { last: Some(log_id(2, 1, 9)), failed: Some("disk gone".into()) };
        assert_eq!(commit_to_announce(Some(log_id(2, 1, 5)), &failed), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_a_leaders_own_entries_go_to_disk_after_they_are_counted() {
        let dir = tempfile::tempdir().expect("dir");
        let mut log = RaftLogStore::open(dir.path(), 1).expect("open");
        let mut durable = log.durable_log();

        // As a follower of node 2 in term 2: durable as soon as written.
        log.save_vote(&Vote::new_committed(2, 2)).await.expect("vote");
        assert!(!log.appending_as_leader(&[blank(2, 2, 1)]));
        log.write_entries(vec![blank(2, 2, 1), blank(2, 2, 2)]).await.expect("append");
        assert_eq!(durable.borrow_and_update().last, Some(log_id(2, 2, 2)));

        // An entry this node wrote as leader of an older term, sent back by a later leader, is
        // a follower's entry too; so are entries of a vote not yet committed.
        log.save_vote(&Vote::new(3, 1)).await.expect("vote");
        assert!(!log.appending_as_leader(&[blank(3, 1, 3)]));
        log.save_vote(&Vote::new_committed(3, 1)).await.expect("vote");
        assert!(!log.appending_as_leader(&[blank(2, 1, 3)]));
        assert!(!log.appending_as_leader(&[blank(3, 1, 3), blank(2, 2, 4)]));

        // As leader of term 3: readable at once, durable once the flush task is done.
        assert!(log.appending_as_leader(&[blank(3, 1, 3), blank(3, 1, 4)]));
        log.write_entries(vec![blank(3, 1, 3), blank(3, 1, 4)]).await.expect("append");
        let read = log.try_get_log_entries(3..=4).await.expect("read");
        assert_eq!(read.iter().map(|entry| entry.log_id).collect::<Vec<_>>(), vec![log_id(3, 1, 3), log_id(3, 1, 4)]);
        let last = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            durable.wait_for(|durable| durable.last >= Some(log_id(3, 1, 4))),
        )
        .await
        .expect("flushed in time")
        .expect("log store alive")
        .last;
        assert_eq!(last, Some(log_id(3, 1, 4)));

        // Reopened (as after a crash once the flush returned): the entries are there. The
        // flush task lets go of the database just after it reports, as a node's restart waits
        // for (`FilesInUse`).
        // The flush task may hold the last handle: the signal says when the file is closed.
        let closed = log.database_closed();
        drop(log);
        let closing_by = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !closed.is_closed() {
            assert!(std::time::Instant::now() < closing_by, "the flush task kept the log open");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mut reopened = RaftLogStore::open(dir.path(), 1).expect("reopen as soon as the file is closed");
        assert_eq!(reopened.get_log_state().await.expect("state").last_log_id, Some(log_id(3, 1, 4)));
        assert_eq!(reopened.durable_log().borrow().last, Some(log_id(3, 1, 4)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_state_machine_applies_an_entry_only_once_the_log_holds_it_on_disk() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = StateMachineStore::open(dir.path()).expect("open");
        let (durable_tx, durable_rx) = watch::channel(DurableLog { last: Some(log_id(1, 1, 1)), failed: None });
        store.follow_log_durability(durable_rx);
        store.apply([set_entry(1, "a")]).await.expect("apply the durable entry");

        let apply = tokio::spawn(async move {
            store.apply([set_entry(2, "b"), set_entry(3, "c")]).await.expect("apply");
            store
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!apply.is_finished(), "entries applied before the log held them on disk");
        durable_tx.send_modify(|durable| durable.last = Some(log_id(1, 1, 2)));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!apply.is_finished(), "entries applied before the log held all of them on disk");
        durable_tx.send_modify(|durable| durable.last = Some(log_id(1, 1, 3)));
        let store =
            tokio::time::timeout(std::time::Duration::from_secs(10), apply).await.expect("applied").expect("join");
        assert_eq!(keys(&store), vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);

        // A failed fsync fails the apply instead of leaving it waiting.
        let mut store = store;
        durable_tx.send_modify(|durable| durable.failed = Some("disk gone".into()));
        assert!(store.apply([set_entry(4, "d")]).await.is_err());
    }

    /// Small applies leave their transaction open for the next ones (what makes them cheap),
    /// yet every reader sees all that was applied, a bound commits a long run of them, and a
    /// store closed with applies pending reopens with them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_applies_are_seen_by_readers_bounded_and_kept_across_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = StateMachineStore::open(dir.path()).expect("open");
        let revisions = store.reader().subscribe();
        store.apply([set_entry(1, "a")]).await.expect("apply");
        assert!(store.db.lock_pending().is_some(), "a small apply left its transaction open");
        assert_eq!(*revisions.borrow(), 1, "the apply's revision is published while it is pending");
        assert_eq!(keys(&store), vec![b"a".to_vec()]);
        assert!(store.db.lock_pending().is_none(), "the reader committed what was pending");

        let run = PENDING_APPLY_PROPOSALS_MAX as u64;
        store.apply((2..2 + run).map(|i| set_entry(i, &format!("b{i:04}")))).await.expect("apply");
        assert!(store.db.lock_pending().is_none(), "a run of {run} proposals is committed at once");
        let last = 2 + run;
        store.apply([set_entry(last, "z")]).await.expect("apply");
        assert!(store.db.lock_pending().is_some());
        assert_eq!(*revisions.borrow(), last);

        drop(revisions);
        drop(store);
        let mut reopened = StateMachineStore::open(dir.path()).expect("reopen");
        let (applied, _) = reopened.applied_state().await.expect("applied");
        assert_eq!(applied.map(|id| id.index), Some(last), "the pending applies were kept at close");
        assert_eq!(keys(&reopened).len() as u64, last);
    }

    fn keys(store: &StateMachineStore) -> Vec<Vec<u8>> {
        let view = store.reader().view().expect("view");
        crate::kv::list_keys(&view, b"", &[], usize::MAX).expect("list").0.into_iter().map(|kv| kv.key).collect()
    }

    /// A build paused between its read transaction and its durability point, with an apply and
    /// an install arriving meanwhile: the snapshot describes exactly the read transaction's
    /// instant, the install waits for the build, and what is left on disk reopens.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_racing_an_apply_and_an_install_leaves_a_consistent_restartable_store() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = StateMachineStore::open(dir.path()).expect("open");
        store.apply((1..=10).map(|i| set_entry(i, &format!("a{i}")))).await.expect("apply");

        // The snapshot the install will bring: another store's state, up to index 30.
        let other_dir = tempfile::tempdir().expect("dir");
        let mut other = StateMachineStore::open(other_dir.path()).expect("open");
        other.apply((1..=30).map(|i| set_entry(i, &format!("b{i}")))).await.expect("apply");
        let incoming = other.get_snapshot_builder().await.build_snapshot().await.expect("build");

        let (paused_tx, paused_rx) = std::sync::mpsc::channel::<()>();
        let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
        let resume_rx = std::sync::Mutex::new(resume_rx);
        store.set_build_pause(Arc::new(move || {
            let _ = paused_tx.send(());
            let _ = resume_rx.lock().map(|rx| rx.recv());
        }));
        let mut builder = store.get_snapshot_builder().await;
        let build = tokio::spawn(async move { builder.build_snapshot().await });
        tokio::task::spawn_blocking(move || paused_rx.recv()).await.expect("join").expect("paused");

        // An apply lands inside the pause; an install arrives and must wait its turn.
        store.apply([set_entry(11, "a11")]).await.expect("apply during the build");
        let mut installer = store.handle();
        let install_meta = incoming.meta.clone();
        let install = tokio::spawn(async move { installer.install_snapshot(&install_meta, incoming.snapshot).await });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!install.is_finished(), "the install ran while a build held the snapshot file");
        resume_tx.send(()).expect("resume");

        let built = build.await.expect("join").expect("build");
        assert_eq!(
            built.meta.last_log_id.map(|id| id.index),
            Some(10),
            "the snapshot is the read transaction's instant"
        );
        install.await.expect("join").expect("install");
        let mut expected: Vec<Vec<u8>> = (1..=30).map(|i| format!("b{i}").into_bytes()).collect();
        expected.sort();
        assert_eq!(keys(&store), expected);

        // The file left in place is the installed snapshot, whole; the store reopens from it.
        let current = store.get_current_snapshot().await.expect("read").expect("a snapshot");
        assert_eq!(current.meta.last_log_id.map(|id| id.index), Some(30));
        drop(store);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        let mut reopened = StateMachineStore::open(dir.path()).expect("reopen");
        let (applied, _) = reopened.applied_state().await.expect("applied");
        assert_eq!(applied.map(|id| id.index), Some(30));
        let snapshot = reopened.get_current_snapshot().await.expect("read").expect("a snapshot");
        let mut bytes = Vec::new();
        let mut file = snapshot.snapshot;
        tokio::io::AsyncReadExt::read_to_end(&mut file, &mut bytes).await.expect("read");
        let mut parser = SnapshotParser::default();
        let mut rows = 0;
        parser
            .feed(&bytes, |item| {
                rows += usize::from(matches!(item, Item::Row { .. }));
                Ok(())
            })
            .expect("parses");
        parser.finish().expect("whole");
        assert!(rows >= 30);
    }
}
