//! The chunk store proper: durable put, verified get, delete, quarantine, listing and counters.
//!
//! Concurrency: calls for the same hash are serialized by one of [`HASH_LOCK_COUNT`] striped
//! mutexes, so two puts of one chunk cannot both count it, a delete cannot race a put's
//! "is it already here?" check, and a quarantine's "is this copy bad?" still holds when it moves
//! the copy. Calls for different hashes run in parallel. Reads (`get`, `verify`, `contains`,
//! `list`) take no lock: a rename replaces a chunk file atomically, so a reader sees either the
//! old file or the new one, never a mix.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::chunk_file::{probe_direct_io, ChunkFile, StagingBudget, WriteMode, STAGING_BUDGET_BYTES};
use crate::error::ChunkError;
use crate::faults::{FaultSettings, FaultState};
use crate::hash::{from_canonical_hex, from_canonical_hex_byte};
use mendfs_types::ChunkHash;

/// Number of striped per-hash locks. Enough that unrelated chunks rarely wait on each other with
/// the few dozen blocking threads tokio runs, small enough to cost nothing.
const HASH_LOCK_COUNT: usize = 64;

/// Number of leaf directories: `chunks/<2 hex>/<2 hex>`.
const LEAF_DIR_COUNT: usize = 256 * 256;

/// A chunk hash is quarantined this many times at most; past that something other than bit rot
/// is wrong, and `quarantine` reports an error instead of scanning ever further for a free name.
const QUARANTINED_COPIES_PER_HASH_MAX: u32 = 10_000;

/// Bytes compared at a time when checking whether an existing copy equals the bytes being put.
const COMPARE_BUFFER_BYTES: usize = 64 * 1024;

/// Counters kept by the store; see [`ChunkStore::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Chunk files under `chunks/`, good or corrupt (a corrupt copy counts until quarantined).
    pub chunk_count: u64,
    /// Sum of their sizes in bytes.
    pub chunk_bytes: u64,
}

/// The on-disk chunk store of one storage node. `Send + Sync`; share it through an `Arc`.
///
/// Only one `ChunkStore` may have a root open at a time (an advisory lock on `root/LOCK` enforces
/// it), because `open` deletes whatever it finds in `tmp/` and counts the chunks it finds.
#[derive(Debug)]
pub struct ChunkStore {
    chunks_dir: PathBuf,
    tmp_dir: PathBuf,
    quarantine_dir: PathBuf,
    max_chunk_bytes: usize,
    counts: SliceCounts,
    /// Makes temp file names unique within this process; the pid makes them unique across
    /// processes, in case the lock is ever bypassed.
    temp_file_counter: AtomicU64,
    /// How chunk files are written: direct I/O where the file system takes it, probed at open.
    write_mode: WriteMode,
    /// Bounds the staging buffers of direct writes across all chunk files open at once.
    staging_budget: Arc<StagingBudget>,
    hash_locks: Vec<Mutex<()>>,
    /// One bit per leaf directory, set once this process knows the directory exists and its
    /// entry, and its parent's entry, are on disk. Lets `put` skip both `create_dir` calls and the
    /// parent fsyncs on every put after the first into a directory.
    leaf_dirs_durable: Vec<AtomicU64>,
    /// Serializes creating leaf directories, so a second put cannot see a directory another put has
    /// just created but not yet fsynced into its parent, and then acknowledge a chunk in it.
    /// And holds, per level-1 directory (`chunks/<2 hex>`), whether this process knows it exists
    /// and its entry is on disk, so that each new leaf below it does not create and fsync it again.
    level1_dirs_durable: Mutex<[bool; 256]>,
    /// Injected faults (a slow or full disk), for chaos tests only; None, and never consulted,
    /// unless the node allows fault injection. See [`crate::faults`].
    faults: Option<Arc<FaultState>>,
    /// Held open for the advisory lock on `root/LOCK`; the lock is released when the store drops
    /// (or the process dies).
    _lock_file: File,
}

/// What `put` found at a chunk's final path before writing.
enum ExistingCopy {
    Absent,
    /// A file with exactly the bytes being put; kept open so it can be fsynced.
    Good(File),
    /// A file with other bytes (or unreadable): a corrupt copy to replace.
    Bad {
        len: u64,
    },
}

/// How a streamed chunk's bytes are checked against the hash [`ChunkStore::finish`] is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCheck {
    /// The writer hashes what it writes and `finish` compares: for bytes from another process,
    /// which may have been changed on the way or sent under a wrong hash.
    Hash,
    /// The caller hashed these very buffers in this process and hands that hash to `finish`:
    /// a second pass over the same memory would only double the CPU of every local copy (the
    /// coordinator's own replica of a chunk it streams). What the disk does to the bytes
    /// afterwards, reads and the scrubber find, as for any copy.
    CallerHashed,
}

/// A chunk being written piece by piece (see [`ChunkStore::begin`]): its temp file and the hash
/// of what was written so far. Blocking I/O; removes its temp file when dropped unless
/// [`ChunkStore::finish`] renamed it into place.
#[derive(Debug)]
pub struct ChunkWriter {
    file: Option<ChunkFile>,
    temp_path: PathBuf,
    /// None: [`StreamCheck::CallerHashed`], the caller vouches for the hash.
    hasher: Option<blake3::Hasher>,
    declared: u64,
    written: u64,
    /// An injected full disk (chaos tests), read when the chunk began: every write then fails
    /// as ENOSPC would.
    full_disk_injected: bool,
    renamed: bool,
}

impl ChunkWriter {
    /// Appends the next piece. More bytes than declared are refused (`SizeMismatch`), and the
    /// writer is then of no further use: the caller drops it.
    pub fn write(&mut self, piece: &[u8]) -> Result<(), ChunkError> {
        let after = self.written + piece.len() as u64;
        if after > self.declared {
            return Err(ChunkError::SizeMismatch { declared: self.declared, actual: after });
        }
        let Some(file) = self.file.as_mut() else {
            return Err(ChunkError::Io {
                context: format!("temp file {} was already closed", self.temp_path.display()),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        };
        let written =
            if self.full_disk_injected { Err(io::Error::from(io::ErrorKind::StorageFull)) } else { file.write(piece) };
        written.map_err(|e| ChunkError::from_io(e, "writing temp file", &self.temp_path))?;
        if let Some(hasher) = self.hasher.as_mut() {
            hasher.update(piece);
        }
        self.written = after;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        drop(self.file.take());
        if !self.renamed {
            // A failed removal is left to the next open, which empties tmp/.
            let _ = fs::remove_file(&self.temp_path);
        }
    }
}

/// What [`ChunkStore::quarantine`] did with the copy at a chunk's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a copy found good is still a good replica: the caller must not report it bad"]
pub enum QuarantineOutcome {
    /// The copy was bad (its bytes hash to another name, or could not be read) and now lies in
    /// `quarantine/`; the chunk is no longer stored here.
    MovedAside,
    /// The copy hashes to its name and was left in place: the caller's evidence was stale (a put
    /// replaced the bad copy since the caller read it). The chunk is still stored here.
    CopyIsGood,
}

impl ChunkStore {
    /// Opens the store at `root`, creating its directories if needed. Deletes temp files left by a
    /// crash (a put that never returned), then counts the chunks already stored, for `stats`.
    /// Fails if another `ChunkStore` has `root` open.
    pub fn open(root: &Path, max_chunk_bytes: usize) -> Result<Self, ChunkError> {
        let root_existed = root.is_dir();
        fs::create_dir_all(root).map_err(|e| ChunkError::from_io(e, "creating store root", root))?;
        if !root_existed {
            if let Some(parent) = root.parent().filter(|parent| !parent.as_os_str().is_empty()) {
                // fsync: the root's own entry must survive a crash, or every chunk below it goes
                // with it. Directories above the parent were the deployer's to make durable.
                sync_dir(parent)?;
            }
        }

        // No fsync for LOCK: it holds no data, and the lock lives in the kernel, not in the file.
        let lock_path = root.join("LOCK");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| ChunkError::from_io(e, "opening lock file", &lock_path))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(ChunkError::Io {
                    context: format!("chunk store {} is already open (in this or another process)", root.display()),
                    source: io::Error::from(io::ErrorKind::WouldBlock),
                })
            }
            Err(TryLockError::Error(error)) => return Err(ChunkError::from_io(error, "locking", &lock_path)),
        }

        let chunks_dir = root.join("chunks");
        let tmp_dir = root.join("tmp");
        let quarantine_dir = root.join("quarantine");
        for dir in [&chunks_dir, &tmp_dir, &quarantine_dir] {
            create_dir_if_missing(dir)?;
        }
        // fsync: makes the entries of chunks/, tmp/ and quarantine/ durable. Every later fsync of a
        // chunk's directories assumes these three exist on disk. Once per open, so it costs nothing.
        sync_dir(root)?;

        remove_temp_files(&tmp_dir)?;
        let write_mode = probe_direct_io(&tmp_dir);

        let store = ChunkStore {
            chunks_dir,
            tmp_dir,
            quarantine_dir,
            max_chunk_bytes,
            counts: SliceCounts::default(),
            temp_file_counter: AtomicU64::new(0),
            write_mode,
            staging_budget: StagingBudget::new(STAGING_BUDGET_BYTES),
            hash_locks: (0..HASH_LOCK_COUNT).map(|_| Mutex::new(())).collect(),
            leaf_dirs_durable: (0..LEAF_DIR_COUNT / 64).map(|_| AtomicU64::new(0)).collect(),
            level1_dirs_durable: Mutex::new([false; 256]),
            faults: None,
            _lock_file: lock_file,
        };

        store.for_each_chunk(|hash, entry| {
            let metadata = entry.metadata().map_err(|e| ChunkError::from_io(e, "reading size of", &entry.path()))?;
            store.counts.added(&hash, metadata.len());
            Ok(())
        })?;
        Ok(store)
    }

    /// Stores `data` under `expected` (the caller's hash); fails with `HashMismatch` if the bytes
    /// do not hash to it, and `TooLarge` past `max_chunk_bytes`. Idempotent: if a good copy exists,
    /// nothing is written; if a corrupt copy exists, it is replaced.
    ///
    /// Durable when it returns: temp file in `root/tmp`, write, fsync, rename into place, fsync
    /// the chunk's directory. On `DiskFull` (or any other error) the temp file is removed, so a
    /// failed put leaves nothing behind.
    pub fn put(&self, expected: &ChunkHash, data: &[u8]) -> Result<(), ChunkError> {
        match &self.faults {
            // An injected full disk: the temp file's write fails with the kernel's "no space",
            // so everything after it is the path a real ENOSPC takes.
            Some(faults) if faults.chunk_store_full() => {
                self.put_with_writer(expected, data, |_, _| Err(io::Error::from(io::ErrorKind::StorageFull)))
            }
            _ => self.put_with_writer(expected, data, |file, data| {
                file.write(data)?;
                file.sync()
            }),
        }
    }

    /// `put` with the step that fills the temp file passed in, so tests can make it fail the way a
    /// full disk does without needing a full disk.
    fn put_with_writer(
        &self,
        expected: &ChunkHash,
        data: &[u8],
        fill_temp_file: impl FnOnce(&mut ChunkFile, &[u8]) -> io::Result<()>,
    ) -> Result<(), ChunkError> {
        if data.len() > self.max_chunk_bytes {
            return Err(ChunkError::TooLarge { len: data.len(), max: self.max_chunk_bytes });
        }
        let actual = ChunkHash::of(data);
        if actual != *expected {
            return Err(ChunkError::HashMismatch { expected: expected.to_hex(), actual: actual.to_hex() });
        }

        let final_path = self.path_of(expected);
        let _hash_guard = self.lock_hash(expected);
        self.delay_injected();
        self.ensure_leaf_dir(expected)?;

        let replaced_len = match existing_copy(&final_path, data)? {
            ExistingCopy::Good(file) => {
                // fsync (file and directory) even though nothing is written: the copy may have been
                // renamed into place by a put that crashed, or failed, before its directory fsync.
                // That put was never acknowledged; this one will be, so make the copy durable now.
                // Both fsyncs are cheap when nothing is dirty.
                file.sync_all().map_err(|e| ChunkError::from_io(e, "syncing existing chunk", &final_path))?;
                return self.sync_leaf_dir(&final_path);
            }
            ExistingCopy::Absent => None,
            ExistingCopy::Bad { len } => Some(len),
        };

        let temp_path = self.temp_path(expected);
        if let Err(error) = self.write_temp_and_rename(&temp_path, &final_path, data, fill_temp_file) {
            // The rename did not happen, so the temp file (if it was created) is still there. A
            // failed removal is left to the next open, which empties tmp/.
            let _ = fs::remove_file(&temp_path);
            return Err(error);
        }
        // The temp file's removal from tmp/ needs no fsync: if a crash resurrects it, the next open
        // deletes it.

        let new_len = data.len() as u64;
        match replaced_len {
            None => self.counts.added(expected, new_len),
            Some(old_len) => self.counts.replaced(expected, new_len, old_len),
        }

        // fsync the directory: the rename is only a change to the directory, and until the
        // directory is on disk a crash can undo it, losing a chunk we are about to acknowledge.
        self.sync_leaf_dir(&final_path)
    }

    /// Starts a chunk whose bytes arrive in pieces and whose hash is known only at their end (a
    /// streamed prepare): a temp file in `root/tmp` that [`ChunkWriter::write`] fills (hashing
    /// it, as `check` says), and [`ChunkStore::finish`] checks, makes durable and renames into
    /// place. At most `declared` bytes are taken, and `declared` itself must be within
    /// `max_chunk_bytes`.
    /// Dropping the writer unfinished removes the temp file, so a stream that ends early or
    /// fails leaves nothing behind (a crash leaves it to the next open, which empties tmp/).
    pub fn begin(&self, declared: u64, check: StreamCheck) -> Result<ChunkWriter, ChunkError> {
        if declared > self.max_chunk_bytes as u64 {
            let len = usize::try_from(declared).unwrap_or(usize::MAX);
            return Err(ChunkError::TooLarge { len, max: self.max_chunk_bytes });
        }
        let counter = self.temp_file_counter.fetch_add(1, Ordering::Relaxed);
        let temp_path = self.tmp_dir.join(format!("stream.{}.{counter}.tmp", std::process::id()));
        let file = self.create_temp_file(&temp_path, declared)?;
        Ok(ChunkWriter {
            file: Some(file),
            temp_path,
            hasher: (check == StreamCheck::Hash).then(blake3::Hasher::new),
            declared,
            written: 0,
            full_disk_injected: self.faults.as_ref().is_some_and(|faults| faults.chunk_store_full()),
            renamed: false,
        })
    }

    /// Ends a streamed chunk: the bytes must hash to `expected`, else nothing is kept
    /// (`HashMismatch`); under [`StreamCheck::CallerHashed`] the caller's word is taken.
    /// Durable when it returns, like `put`: the temp file is fsynced, renamed into place (over a
    /// corrupt copy) and the chunk's directory fsynced; if a good copy is already there, the temp
    /// file is discarded and that copy made durable instead. The caller protects the chunk from
    /// collection first, as for `put`.
    pub fn finish(&self, mut writer: ChunkWriter, expected: &ChunkHash) -> Result<(), ChunkError> {
        if let Some(hasher) = writer.hasher.take() {
            let actual = ChunkHash::from_bytes(*hasher.finalize().as_bytes());
            if actual != *expected {
                return Err(ChunkError::HashMismatch { expected: expected.to_hex(), actual: actual.to_hex() });
            }
        }
        let Some(mut file) = writer.file.take() else {
            return Err(ChunkError::Io {
                context: format!("temp file {} was already closed", writer.temp_path.display()),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        };
        // fsync before the rename (`ChunkFile::sync` says why). Done before taking the hash lock,
        // so the slowest step does not hold up other chunks that share the lock.
        file.sync().map_err(|e| ChunkError::from_io(e, "syncing temp file", &writer.temp_path))?;
        drop(file);

        let final_path = self.path_of(expected);
        let _hash_guard = self.lock_hash(expected);
        self.delay_injected();
        self.ensure_leaf_dir(expected)?;
        let replaced_len = match chunk_file_len(&final_path)? {
            None if final_path.symlink_metadata().is_ok() => {
                return Err(ChunkError::Io {
                    context: format!("something other than a chunk file is in the way at {}", final_path.display()),
                    source: io::Error::from(io::ErrorKind::AlreadyExists),
                });
            }
            None => None,
            Some(len) => {
                // A copy that re-hashes to its name is kept and the new bytes dropped (the writer's
                // Drop removes them); any other is replaced by the rename below.
                let good = len == writer.written
                    && File::open(&final_path).and_then(|mut copy| hash_of_reader(&mut copy)).ok() == Some(*expected);
                if good {
                    // fsync the copy and its directory even though nothing is written: it may have
                    // been renamed into place by a put that failed or crashed before its directory
                    // fsync, and this chunk is about to be acknowledged.
                    let copy =
                        File::open(&final_path).map_err(|e| ChunkError::from_io(e, "opening chunk", &final_path))?;
                    copy.sync_all().map_err(|e| ChunkError::from_io(e, "syncing existing chunk", &final_path))?;
                    return self.sync_leaf_dir(&final_path);
                }
                Some(len)
            }
        };
        // tmp/ and chunks/ are on one filesystem (both under root), so this is atomic, and it
        // replaces a corrupt copy in the same step.
        fs::rename(&writer.temp_path, &final_path)
            .map_err(|e| ChunkError::from_io(e, "renaming temp file to", &final_path))?;
        writer.renamed = true;
        match replaced_len {
            None => self.counts.added(expected, writer.written),
            Some(old_len) => self.counts.replaced(expected, writer.written, old_len),
        }
        // fsync the directory: the rename is only a change to the directory, and until the
        // directory is on disk a crash can undo it, losing a chunk about to be acknowledged.
        self.sync_leaf_dir(&final_path)
    }

    /// A new temp file at `path` for a chunk of about `len` bytes, written in this store's mode.
    fn create_temp_file(&self, path: &Path, len: u64) -> Result<ChunkFile, ChunkError> {
        ChunkFile::create(path, self.write_mode, len, &self.staging_budget)
            .map_err(|e| ChunkError::from_io(e, "creating temp file", path))
    }

    fn write_temp_and_rename(
        &self,
        temp_path: &Path,
        final_path: &Path,
        data: &[u8],
        fill_temp_file: impl FnOnce(&mut ChunkFile, &[u8]) -> io::Result<()>,
    ) -> Result<(), ChunkError> {
        let mut temp_file = self.create_temp_file(temp_path, data.len() as u64)?;
        fill_temp_file(&mut temp_file, data).map_err(|e| ChunkError::from_io(e, "writing temp file", temp_path))?;
        drop(temp_file);
        // tmp/ and chunks/ are on one filesystem (both under root), so this is atomic, and it
        // replaces a corrupt copy in the same step.
        fs::rename(temp_path, final_path).map_err(|e| ChunkError::from_io(e, "renaming temp file to", final_path))
    }

    /// How this store writes chunk files (direct I/O where its file system takes it).
    pub fn write_mode(&self) -> WriteMode {
        self.write_mode
    }

    /// The largest chunk this store takes.
    pub fn max_chunk_bytes(&self) -> usize {
        self.max_chunk_bytes
    }

    /// Reads a chunk and checks that its bytes hash to its name. `Corrupt` if they do not: the
    /// caller should quarantine this copy (which re-checks it) and read another replica. Memory
    /// use is the file's size, which `put` bounded by `max_chunk_bytes`.
    pub fn get(&self, hash: &ChunkHash) -> Result<Vec<u8>, ChunkError> {
        self.get_into(hash, Vec::new())
    }

    /// [`ChunkStore::get`] into `buffer`: its contents are dropped and its capacity used (grown
    /// if short), so a caller can hand the same buffers round instead of allocating one per
    /// read.
    pub fn get_into(&self, hash: &ChunkHash, mut data: Vec<u8>) -> Result<Vec<u8>, ChunkError> {
        self.delay_injected();
        let path = self.path_of(hash);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(ChunkError::NotFound(hash.to_hex())),
            Err(error) => return Err(ChunkError::from_io(error, "opening chunk", &path)),
        };
        // The size is only a capacity hint; clamp it so a nonsense size cannot reserve huge memory.
        let size_hint = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
        let capacity = usize::try_from(size_hint).unwrap_or(usize::MAX).min(self.max_chunk_bytes);
        data.clear();
        data.reserve(capacity);
        file.read_to_end(&mut data).map_err(|e| ChunkError::from_io(e, "reading chunk", &path))?;

        let actual = ChunkHash::of(&data);
        if actual != *hash {
            return Err(ChunkError::Corrupt { hash: hash.to_hex(), actual: actual.to_hex() });
        }
        Ok(data)
    }

    /// Re-hashes a chunk's copy in bounded pieces, without loading it: `Ok` if its bytes hash to
    /// its name, `NotFound`, `Corrupt` (quarantine it), or `Io` if it could not be read. Takes no
    /// lock, like `get`. Blocking: reads the whole copy.
    ///
    /// This, not [`ChunkStore::contains`], is what may be taken as proof of a good copy.
    pub fn verify(&self, hash: &ChunkHash) -> Result<(), ChunkError> {
        self.delay_injected();
        let path = self.path_of(hash);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(ChunkError::NotFound(hash.to_hex())),
            Err(error) => return Err(ChunkError::from_io(error, "opening chunk", &path)),
        };
        let actual = hash_of_reader(&mut file).map_err(|e| ChunkError::from_io(e, "reading chunk", &path))?;
        if actual != *hash {
            return Err(ChunkError::Corrupt { hash: hash.to_hex(), actual: actual.to_hex() });
        }
        Ok(())
    }

    /// Whether a chunk file with this name exists. Presence only: the bytes are not verified, so
    /// a `true` is no proof of a good copy (a stale, rotted one answers `true` too); use
    /// [`ChunkStore::verify`] for that.
    pub fn contains(&self, hash: &ChunkHash) -> bool {
        fs::symlink_metadata(self.path_of(hash)).is_ok_and(|metadata| metadata.is_file())
    }

    /// Whether the chunk is known to be absent: its file does not exist while the store's own
    /// directory does. Any other error (an unreadable or unmounted directory, EIO) is not an
    /// answer, so this says false: a report of a missing copy makes the metadata unlist it,
    /// and that must never follow from an error that may pass.
    pub fn surely_missing(&self, hash: &ChunkHash) -> bool {
        let absent =
            matches!(fs::symlink_metadata(self.path_of(hash)), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        absent && fs::metadata(&self.chunks_dir).is_ok_and(|metadata| metadata.is_dir())
    }

    /// Deletes a chunk; `Ok(false)` if it was not there. The caller (the garbage collector) has
    /// already decided, through Raft, that no file version references it.
    ///
    /// No fsync of the directory: if a crash undoes the unlink, the chunk comes back as an
    /// unreferenced orphan. That wastes space until the next GC or reconcile pass deletes it again,
    /// but loses nothing and is never served (the metadata no longer lists this node for it), so
    /// the fsync would buy nothing worth a disk flush per deleted chunk.
    pub fn delete(&self, hash: &ChunkHash) -> Result<bool, ChunkError> {
        let path = self.path_of(hash);
        let _hash_guard = self.lock_hash(hash);
        let Some(len) = chunk_file_len(&path)? else {
            return Ok(false);
        };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(error) => return Err(ChunkError::from_io(error, "deleting chunk", &path)),
        }
        self.counts.removed(hash, len);
        Ok(true)
    }

    /// Moves a bad chunk aside to `root/quarantine/<hex>.<n>` (the first unused `n`), so it is never
    /// served again but is kept for inspection; but only if the copy at the chunk's path *is* bad.
    /// It re-hashes the copy first: `CopyIsGood` if its bytes hash to its name, and then nothing
    /// is moved. `NotFound` if there is no such chunk. Blocking: reads the whole copy.
    ///
    /// The caller's evidence is stale by the time it calls: a reader that found the copy corrupt
    /// (`get` takes no lock) may be overtaken by a put that renames a good copy over the bad one,
    /// and moving that good copy aside would lose a replica the metadata lists. An unreadable copy
    /// (a read error) counts as bad, as it does for `put`: it cannot be served either way.
    ///
    /// No fsync: if a crash undoes the move, the corrupt copy is back under its name, where every
    /// `get` verifies it, reports `Corrupt` and has it quarantined again. Nothing bad is served,
    /// so the flush would buy nothing.
    pub fn quarantine(&self, hash: &ChunkHash) -> Result<QuarantineOutcome, ChunkError> {
        self.quarantine_with_pause(hash, || {})
    }

    /// `quarantine` with a step run between the verdict and the rename, so tests can hold it there
    /// and show that no put gets in between.
    fn quarantine_with_pause(
        &self,
        hash: &ChunkHash,
        between_verify_and_rename: impl FnOnce(),
    ) -> Result<QuarantineOutcome, ChunkError> {
        let path = self.path_of(hash);
        let hex = hash.to_hex();
        // Why the verdict still holds at the rename: everything that changes what is at a chunk's
        // path (put's rename, delete, quarantine) holds this hash's lock, and `LOCK` keeps any other
        // store off this root. So from here to the rename nothing can replace the file hashed
        // below, and the rename moves exactly the copy that was found bad. (Comparing the inode of
        // the opened file with the path's would only narrow the window, since the check and the
        // rename are two calls; the lock closes it.) Readers take no lock, but they only read.
        let _hash_guard = self.lock_hash(hash);
        self.delay_injected();
        if chunk_file_len(&path)?.is_none() {
            // Nothing, or something other than a regular file (which is not ours to move).
            return Err(ChunkError::NotFound(hex));
        }
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(ChunkError::NotFound(hex)),
            // Not a verdict on the copy (out of file descriptors, say): move nothing.
            Err(error) => return Err(ChunkError::from_io(error, "opening chunk to quarantine", &path)),
        };
        // The size of the very file being judged, for the counters.
        let len = file.metadata().map_err(|e| ChunkError::from_io(e, "reading size of", &path))?.len();
        if hash_of_reader(&mut file).is_ok_and(|actual| actual == *hash) {
            return Ok(QuarantineOutcome::CopyIsGood);
        }
        drop(file);
        between_verify_and_rename();

        // Quarantine names embed the hash, so the hash lock also keeps two quarantines from
        // picking the same free name.
        let mut destination = None;
        for copy_idx in 0..QUARANTINED_COPIES_PER_HASH_MAX {
            let candidate = self.quarantine_dir.join(format!("{hex}.{copy_idx}"));
            match fs::symlink_metadata(&candidate) {
                Ok(_) => continue,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    destination = Some(candidate);
                    break;
                }
                Err(error) => return Err(ChunkError::from_io(error, "checking quarantine name", &candidate)),
            }
        }
        let Some(destination) = destination else {
            return Err(ChunkError::Io {
                context: format!(
                    "chunk {hex} already has {QUARANTINED_COPIES_PER_HASH_MAX} quarantined copies in {}",
                    self.quarantine_dir.display()
                ),
                source: io::Error::other("too many quarantined copies"),
            });
        };

        match fs::rename(&path, &destination) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(ChunkError::NotFound(hex)),
            Err(error) => return Err(ChunkError::from_io(error, "quarantining chunk", &path)),
        }
        self.counts.removed(hash, len);
        Ok(QuarantineOutcome::MovedAside)
    }

    /// The stored chunks whose hash starts with `byte0`, sorted: one of the store's 256 slices.
    /// Scans of the whole store (scrub, orphan collection) go a slice at a time, so that what
    /// they hold in memory, and each step's time on a chunk work thread, is a 256th of the store
    /// rather than all of it. Files that are not chunks are skipped, as by [`ChunkStore::list`].
    pub fn list_slice(&self, byte0: u8) -> Result<Vec<ChunkHash>, ChunkError> {
        let mut hashes = Vec::new();
        self.for_each_chunk_in_slice(byte0, |hash, _| {
            hashes.push(hash);
            Ok(())
        })?;
        hashes.sort_unstable();
        Ok(hashes)
    }

    /// Counts the chunks and bytes of one slice (the hashes that start with `byte0`) again, as
    /// [`ChunkStore::recount`] does for all of them, and makes that slice's share of
    /// [`ChunkStore::stats`] say so. A scan that recounts the store a slice at a time replaces
    /// each slice's numbers as it goes: a put or delete elsewhere meanwhile is counted as usual,
    /// and only one racing this slice's own count can leave its numbers a chunk off until the
    /// next recount. Returns the slice's numbers.
    pub fn recount_slice(&self, byte0: u8) -> Result<StoreStats, ChunkError> {
        let (mut chunk_count, mut chunk_bytes) = (0u64, 0u64);
        self.for_each_chunk_in_slice(byte0, |_, entry| {
            // A file deleted since the directory was read is simply not counted.
            if let Ok(metadata) = entry.metadata() {
                chunk_count += 1;
                chunk_bytes += metadata.len();
            }
            Ok(())
        })?;
        let counted = StoreStats { chunk_count, chunk_bytes };
        self.counts.set(byte0, counted);
        Ok(counted)
    }

    /// Every stored chunk, sorted by hash (so a scrubber can resume from a hash). Files that are
    /// not chunks (wrong names, wrong directory, not regular files) are skipped, not reported.
    pub fn list(&self) -> Result<Vec<ChunkHash>, ChunkError> {
        let mut hashes = Vec::new();
        self.for_each_chunk(|hash, _| {
            hashes.push(hash);
            Ok(())
        })?;
        hashes.sort_unstable();
        Ok(hashes)
    }

    /// Counts the stored chunks and their bytes again, and makes [`ChunkStore::stats`] say so.
    /// The counters follow every call of the store, but not what happens to files behind its
    /// back: a chunk file lost to a disk fault or deleted by hand stays counted, and counted
    /// twice once repair stores it again. The scrubber calls this once per pass, so such drift
    /// lasts one pass at most. A put or delete racing the scan can leave the numbers a chunk
    /// off until the next recount.
    pub fn recount(&self) -> Result<StoreStats, ChunkError> {
        for byte0 in 0..=u8::MAX {
            self.recount_slice(byte0)?;
        }
        Ok(self.stats())
    }

    /// Chunk count and bytes, kept up to date by every call rather than by scanning. The two
    /// numbers are read separately, so under concurrent writes they may be from slightly
    /// different moments.
    ///
    /// `chunk_bytes` adds a file's size when the store writes or counts it and subtracts the size
    /// it has when the store removes or replaces it. The two differ only if something outside the
    /// store changed the file's length (corruption by truncation, say); `chunk_bytes` is then off by
    /// that difference (never below zero) until the next `open` counts again. Tracking every
    /// chunk's size in memory would make it exact at tens of bytes per chunk, which is not worth it
    /// for a number used for capacity reports.
    pub fn stats(&self) -> StoreStats {
        self.counts.total()
    }

    /// Gives the store a [`FaultState`] to consult on every chunk read and write, for chaos
    /// tests only (see [`crate::faults`]). A store without one has no fault hooks at all.
    pub fn with_faults(mut self, faults: Arc<FaultState>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// The faults injected now; none for a store without a [`FaultState`].
    pub fn injected_faults(&self) -> FaultSettings {
        self.faults.as_ref().map(|faults| faults.get()).unwrap_or_default()
    }

    /// Waits out an injected slow disk, on this (blocking) thread; nothing without faults.
    fn delay_injected(&self) {
        if let Some(faults) = &self.faults {
            faults.delay_chunk_io();
        }
    }

    /// The directory chunk files live under: the filesystem whose room limits this store.
    pub fn chunks_dir(&self) -> &Path {
        &self.chunks_dir
    }

    /// Where the chunk's file lives (or would live): `root/chunks/<2 hex>/<2 hex>/<64 hex>`.
    pub fn path_of(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.chunks_dir.join(&hex[0..2]).join(&hex[2..4]).join(hex)
    }

    fn lock_hash(&self, hash: &ChunkHash) -> MutexGuard<'_, ()> {
        let idx = usize::from(hash[31]) % HASH_LOCK_COUNT;
        // The mutex guards no data, only ordering, so a panic in another holder leaves nothing
        // inconsistent behind: ignore poisoning.
        self.hash_locks[idx].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn temp_path(&self, hash: &ChunkHash) -> PathBuf {
        let counter = self.temp_file_counter.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir.join(format!("{}.{}.{counter}.tmp", hash.to_hex(), std::process::id()))
    }

    /// Makes sure `chunks/<2 hex>/<2 hex>` exists and is durable, at most once per directory per
    /// process.
    fn ensure_leaf_dir(&self, hash: &ChunkHash) -> Result<(), ChunkError> {
        let leaf_idx = usize::from(hash[0]) << 8 | usize::from(hash[1]);
        let (word, bit) = (&self.leaf_dirs_durable[leaf_idx / 64], 1u64 << (leaf_idx % 64));
        if word.load(Ordering::Acquire) & bit != 0 {
            return Ok(());
        }
        let mut level1_durable = self.level1_dirs_durable.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if word.load(Ordering::Acquire) & bit != 0 {
            return Ok(());
        }
        let hex = hash.to_hex();
        let level1_dir = self.chunks_dir.join(&hex[0..2]);
        let leaf_dir = level1_dir.join(&hex[2..4]);
        // fsync the parents even when the directories already existed: a process that crashed
        // between creating one and fsyncing its parent left it on disk only in the page cache.
        // Chunks renamed into a directory whose own entry is lost are lost with it. Once per
        // level-1 directory per process: on a new node nearly every chunk starts a new leaf, and
        // this fsync of chunks/ was one in three of a replica's fsyncs.
        if !level1_durable[usize::from(hash[0])] {
            create_dir_if_missing(&level1_dir)?;
            sync_dir(&self.chunks_dir)?;
            level1_durable[usize::from(hash[0])] = true;
        }
        create_dir_if_missing(&leaf_dir)?;
        sync_dir(&level1_dir)?;
        word.fetch_or(bit, Ordering::Release);
        Ok(())
    }

    fn sync_leaf_dir(&self, chunk_path: &Path) -> Result<(), ChunkError> {
        match chunk_path.parent() {
            Some(leaf_dir) => sync_dir(leaf_dir),
            None => Ok(()),
        }
    }

    /// Calls `visit` for every well-formed chunk file: `chunks/<2 hex>/<2 hex>/<64 hex>` in
    /// lowercase, in the directories its hash names, and a regular file. Everything else is junk
    /// and skipped.
    fn for_each_chunk(
        &self,
        mut visit: impl FnMut(ChunkHash, &fs::DirEntry) -> Result<(), ChunkError>,
    ) -> Result<(), ChunkError> {
        for level1 in read_dir(&self.chunks_dir)? {
            let level1 = level1.map_err(|e| ChunkError::from_io(e, "listing", &self.chunks_dir))?;
            let Some(byte0) = level1.file_name().to_str().and_then(from_canonical_hex_byte) else { continue };
            if !level1.file_type().is_ok_and(|file_type| file_type.is_dir()) {
                continue;
            }
            self.for_each_chunk_under(byte0, &level1.path(), &mut visit)?;
        }
        Ok(())
    }

    /// [`ChunkStore::for_each_chunk`] over the chunks whose hash starts with `byte0`, in the
    /// directory `level1_path` that holds them.
    fn for_each_chunk_under(
        &self,
        byte0: u8,
        level1_path: &Path,
        visit: &mut impl FnMut(ChunkHash, &fs::DirEntry) -> Result<(), ChunkError>,
    ) -> Result<(), ChunkError> {
        for level2 in read_dir(level1_path)? {
            let level2 = level2.map_err(|e| ChunkError::from_io(e, "listing", level1_path))?;
            let Some(byte1) = level2.file_name().to_str().and_then(from_canonical_hex_byte) else { continue };
            if !level2.file_type().is_ok_and(|file_type| file_type.is_dir()) {
                continue;
            }
            let level2_path = level2.path();
            for leaf in read_dir(&level2_path)? {
                let leaf = leaf.map_err(|e| ChunkError::from_io(e, "listing", &level2_path))?;
                let Some(hash) = leaf.file_name().to_str().and_then(from_canonical_hex) else { continue };
                if hash[0] != byte0 || hash[1] != byte1 {
                    continue;
                }
                if !leaf.file_type().is_ok_and(|file_type| file_type.is_file()) {
                    continue;
                }
                visit(hash, &leaf)?;
            }
        }
        Ok(())
    }

    /// [`ChunkStore::for_each_chunk`] over one slice of the store: the chunks whose hash starts
    /// with `byte0`, a 256th of them. No directory for the slice is no chunks.
    fn for_each_chunk_in_slice(
        &self,
        byte0: u8,
        mut visit: impl FnMut(ChunkHash, &fs::DirEntry) -> Result<(), ChunkError>,
    ) -> Result<(), ChunkError> {
        let level1_path = self.chunks_dir.join(format!("{byte0:02x}"));
        match fs::symlink_metadata(&level1_path) {
            Ok(metadata) if metadata.is_dir() => self.for_each_chunk_under(byte0, &level1_path, &mut visit),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ChunkError::from_io(e, "listing", &level1_path)),
        }
    }
}

/// The BLAKE3 of everything `reader` yields (the same hash as `ChunkHash::of` over those bytes),
/// read in bounded pieces, so judging a copy costs no more memory however large the file.
fn hash_of_reader(reader: &mut impl Read) -> io::Result<ChunkHash> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(reader)?;
    Ok(ChunkHash::from_bytes(*hasher.finalize().as_bytes()))
}

/// Whether the file at `path` holds exactly `data`. Reads in bounded pieces rather than loading
/// the whole copy next to `data`.
fn existing_copy(path: &Path, data: &[u8]) -> Result<ExistingCopy, ChunkError> {
    let Some(len) = chunk_file_len(path)? else {
        if path.symlink_metadata().is_ok() {
            return Err(ChunkError::Io {
                context: format!("something other than a chunk file is in the way at {}", path.display()),
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            });
        }
        return Ok(ExistingCopy::Absent);
    };
    if len != data.len() as u64 {
        return Ok(ExistingCopy::Bad { len });
    }
    // Any failure to read the existing copy makes it bad, not the put: writing a fresh copy over
    // an unreadable one (e.g. a media error) is exactly the repair wanted.
    let Ok(mut file) = File::open(path) else {
        return Ok(ExistingCopy::Bad { len });
    };
    let mut buffer = vec![0u8; COMPARE_BUFFER_BYTES.min(data.len().max(1))];
    let mut remaining = data;
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n_read) => match remaining.strip_prefix(&buffer[..n_read]) {
                Some(rest) => remaining = rest,
                // Different bytes, or more of them than expected (the file grew since the stat).
                None => return Ok(ExistingCopy::Bad { len }),
            },
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Ok(ExistingCopy::Bad { len }),
        }
    }
    if remaining.is_empty() {
        Ok(ExistingCopy::Good(file))
    } else {
        Ok(ExistingCopy::Bad { len })
    }
}

/// Size of the regular file at `path`; `None` if nothing (or something other than a regular
/// file) is there.
fn chunk_file_len(path: &Path) -> Result<Option<u64>, ChunkError> {
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_file() => Ok(Some(metadata.len())),
        Ok(_) => Ok(None),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(ChunkError::from_io(error, "checking chunk", path)),
    }
}

/// Subtracts without wrapping below zero: a counter that drifted low (see `stats`) must not turn
/// into a huge number.
/// The store's chunk count and bytes, kept per slice of the hash space (the chunks whose hash
/// starts with one byte), so that a recount done a slice at a time can replace one slice's
/// numbers while puts and deletes go on in the others. 4 KiB of counters.
#[derive(Debug)]
struct SliceCounts {
    chunks: [AtomicU64; 256],
    bytes: [AtomicU64; 256],
}

impl Default for SliceCounts {
    fn default() -> Self {
        Self { chunks: std::array::from_fn(|_| AtomicU64::new(0)), bytes: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

impl SliceCounts {
    fn added(&self, hash: &ChunkHash, len: u64) {
        self.chunks[usize::from(hash[0])].fetch_add(1, Ordering::Relaxed);
        self.bytes[usize::from(hash[0])].fetch_add(len, Ordering::Relaxed);
    }

    /// A copy of `old_len` bytes replaced by one of `new_len`.
    fn replaced(&self, hash: &ChunkHash, new_len: u64, old_len: u64) {
        // Add before subtracting so the counter does not dip below zero in between.
        self.bytes[usize::from(hash[0])].fetch_add(new_len, Ordering::Relaxed);
        saturating_sub(&self.bytes[usize::from(hash[0])], old_len);
    }

    fn removed(&self, hash: &ChunkHash, len: u64) {
        saturating_sub(&self.chunks[usize::from(hash[0])], 1);
        saturating_sub(&self.bytes[usize::from(hash[0])], len);
    }

    fn set(&self, byte0: u8, counted: StoreStats) {
        self.chunks[usize::from(byte0)].store(counted.chunk_count, Ordering::Relaxed);
        self.bytes[usize::from(byte0)].store(counted.chunk_bytes, Ordering::Relaxed);
    }

    /// The sums over every slice; read one counter at a time, so under concurrent writes the
    /// numbers may be from slightly different moments.
    fn total(&self) -> StoreStats {
        StoreStats {
            chunk_count: self.chunks.iter().map(|count| count.load(Ordering::Relaxed)).sum(),
            chunk_bytes: self.bytes.iter().map(|bytes| bytes.load(Ordering::Relaxed)).sum(),
        }
    }
}

fn saturating_sub(counter: &AtomicU64, amount: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |value| Some(value.saturating_sub(amount)));
}

fn create_dir_if_missing(dir: &Path) -> Result<(), ChunkError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(ChunkError::from_io(error, "creating directory", dir)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), ChunkError> {
    File::open(dir).and_then(|handle| handle.sync_all()).map_err(|e| ChunkError::from_io(e, "syncing directory", dir))
}

fn read_dir(dir: &Path) -> Result<fs::ReadDir, ChunkError> {
    fs::read_dir(dir).map_err(|e| ChunkError::from_io(e, "listing", dir))
}

/// Deletes every regular file in `tmp/`: each is a put that never returned, so no caller was told
/// it succeeded. No fsync afterwards: a deletion a crash undoes is redone at the next open.
fn remove_temp_files(tmp_dir: &Path) -> Result<(), ChunkError> {
    for entry in read_dir(tmp_dir)? {
        let entry = entry.map_err(|e| ChunkError::from_io(e, "listing", tmp_dir))?;
        // Only files: the store never makes directories here, so a directory is not ours to delete.
        if entry.file_type().is_ok_and(|file_type| !file_type.is_dir()) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(ChunkError::from_io(error, "removing leftover temp file", &path)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_store(dir: &tempfile::TempDir) -> ChunkStore {
        ChunkStore::open(dir.path(), 1 << 20).expect("open store")
    }

    fn tmp_is_empty(dir: &tempfile::TempDir) -> bool {
        fs::read_dir(dir.path().join("tmp")).expect("read tmp").next().is_none()
    }

    /// A real ENOSPC from the kernel: /dev/full fails every write with it.
    fn write_to_dev_full(_: &mut ChunkFile, data: &[u8]) -> io::Result<()> {
        std::io::Write::write_all(&mut OpenOptions::new().write(true).open("/dev/full")?, data)
    }

    #[test]
    fn a_streamed_chunk_is_checked_against_its_hash_unless_the_caller_hashed_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(&dir);
        let (data, other) = (b"streamed in two pieces".as_slice(), b"something else".as_slice());
        let stream = |check| {
            let mut writer = store.begin(data.len() as u64, check).expect("begin");
            writer.write(&data[..8]).expect("first piece");
            writer.write(&data[8..]).expect("second piece");
            writer
        };

        let refused = store.finish(stream(StreamCheck::Hash), &ChunkHash::of(other)).expect_err("wrong hash");
        assert!(matches!(refused, ChunkError::HashMismatch { .. }), "got {refused:?}");
        assert!(tmp_is_empty(&dir) && !store.contains(&ChunkHash::of(other)));
        store.finish(stream(StreamCheck::Hash), &ChunkHash::of(data)).expect("right hash");
        assert_eq!(store.get(&ChunkHash::of(data)).expect("get"), data);

        // The caller's word is taken: the bytes go in under the hash it gives. A wrong one is
        // a corrupt copy, which a read then finds (and repair replaces).
        store.finish(stream(StreamCheck::CallerHashed), &ChunkHash::of(other)).expect("no second hash");
        assert!(store.contains(&ChunkHash::of(other)));
        assert!(store.get(&ChunkHash::of(other)).is_err(), "a read checks the bytes");
    }

    #[test]
    fn disk_full_while_writing_is_reported_as_disk_full_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(&dir);
        let data = b"this chunk does not fit";
        let hash = ChunkHash::of(data);

        let error = store.put_with_writer(&hash, data, write_to_dev_full).expect_err("disk is full");

        assert!(matches!(error, ChunkError::DiskFull { .. }), "got {error:?}");
        assert!(tmp_is_empty(&dir), "the temp file must be removed");
        assert!(!store.contains(&hash));
        assert_eq!(store.stats(), StoreStats::default());
        // Once space is back, the same put succeeds.
        store.put(&hash, data).expect("put after space is freed");
        assert_eq!(store.get(&hash).expect("get"), data);
    }

    #[test]
    fn disk_full_while_replacing_a_corrupt_copy_keeps_the_old_file_and_stats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(&dir);
        let data = b"good bytes";
        let hash = ChunkHash::of(data);
        store.put(&hash, data).expect("put");
        fs::write(store.path_of(&hash), b"bad bytes, longer").expect("corrupt");
        let stats_before = store.stats();

        let error = store.put_with_writer(&hash, data, write_to_dev_full).expect_err("disk is full");

        assert!(matches!(error, ChunkError::DiskFull { .. }), "got {error:?}");
        assert!(tmp_is_empty(&dir));
        assert!(store.contains(&hash), "the old copy stays until a good one replaces it");
        assert_eq!(store.stats(), stats_before);
    }

    #[test]
    fn a_recount_corrects_the_counters_after_a_file_vanished_behind_the_stores_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(&dir);
        let (kept, lost) = (b"kept".as_slice(), b"lost to the disk".as_slice());
        store.put(&ChunkHash::of(kept), kept).expect("put");
        store.put(&ChunkHash::of(lost), lost).expect("put");
        std::fs::remove_file(store.path_of(&ChunkHash::of(lost))).expect("delete behind the store's back");
        // Repair stores the lost copy again: counted twice until the recount.
        store.put(&ChunkHash::of(lost), lost).expect("put again");
        assert_eq!(store.stats().chunk_count, 3);
        let expected = StoreStats { chunk_count: 2, chunk_bytes: (kept.len() + lost.len()) as u64 };
        assert_eq!(store.recount().expect("recount"), expected);
        assert_eq!(store.stats(), expected);
    }

    #[test]
    fn an_injected_full_disk_fails_new_writes_as_enospc_does_and_reads_go_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let faults = Arc::new(FaultState::new());
        let store = open_store(&dir).with_faults(faults.clone());
        let (stored, new) = (b"stored before the disk filled".as_slice(), b"arrives after".as_slice());
        let (stored_hash, new_hash) = (ChunkHash::of(stored), ChunkHash::of(new));
        store.put(&stored_hash, stored).expect("put");
        faults.set(FaultSettings { chunk_store_full: true, ..FaultSettings::default() });
        assert!(store.injected_faults().chunk_store_full);

        let error = store.put(&new_hash, new).expect_err("the disk is full");

        assert!(matches!(error, ChunkError::DiskFull { .. }), "got {error:?}");
        assert!(tmp_is_empty(&dir), "the temp file must be removed, as on a real ENOSPC");
        assert!(!store.contains(&new_hash));
        assert_eq!(store.get(&stored_hash).expect("reads keep working"), stored);
        store.verify(&stored_hash).expect("verify keeps working");
        store.put(&stored_hash, stored).expect("a copy already here needs no space");
        assert_eq!(store.stats(), StoreStats { chunk_count: 1, chunk_bytes: stored.len() as u64 });
        // Once the fault is cleared, the same put succeeds.
        faults.set(FaultSettings::default());
        store.put(&new_hash, new).expect("put after the fault is cleared");
        assert_eq!(store.get(&new_hash).expect("get"), new);
    }

    #[test]
    fn an_injected_delay_slows_every_chunk_read_and_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let faults = Arc::new(FaultState::new());
        let store = open_store(&dir).with_faults(faults.clone());
        let data = b"on a slow disk";
        let hash = ChunkHash::of(data);
        let delay = std::time::Duration::from_millis(30);
        faults.set(FaultSettings { chunk_io_delay_ms: delay.as_millis() as u64, ..FaultSettings::default() });
        // A lower bound only: a sleep lasts at least its duration, however busy the machine.
        let timed = |call: &dyn Fn()| {
            let started = std::time::Instant::now();
            call();
            started.elapsed()
        };
        assert!(timed(&|| store.put(&hash, data).expect("put")) >= delay, "put");
        assert!(timed(&|| assert_eq!(store.get(&hash).expect("get"), data)) >= delay, "get");
        assert!(timed(&|| store.verify(&hash).expect("verify")) >= delay, "verify");
        let outcome = std::cell::Cell::new(None);
        assert!(timed(&|| outcome.set(Some(store.quarantine(&hash).expect("quarantine")))) >= delay, "quarantine");
        assert_eq!(outcome.get(), Some(QuarantineOutcome::CopyIsGood));
    }

    #[test]
    fn a_store_without_faults_reports_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(open_store(&dir).injected_faults(), FaultSettings::default());
    }

    #[test]
    fn quota_exceeded_is_disk_full_and_other_errors_are_io() {
        let path = Path::new("/x");
        let quota = ChunkError::from_io(io::Error::from(io::ErrorKind::QuotaExceeded), "writing", path);
        assert!(matches!(quota, ChunkError::DiskFull { .. }));
        let denied = ChunkError::from_io(io::Error::from(io::ErrorKind::PermissionDenied), "writing", path);
        assert!(matches!(denied, ChunkError::Io { .. }));
    }

    #[test]
    fn a_put_cannot_slip_a_good_copy_in_between_a_quarantines_verdict_and_its_rename() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(&dir);
        let data = b"the good bytes a concurrent prepare brings";
        let hash = ChunkHash::of(data);
        store.put(&hash, data).expect("put");
        // Rot that keeps the length, so the byte counter stays exact (see `stats`).
        let mut bad_bytes = data.to_vec();
        bad_bytes[0] ^= 0x01;
        fs::write(store.path_of(&hash), &bad_bytes).expect("corrupt");

        let put_done = std::sync::atomic::AtomicBool::new(false);
        let outcome = std::thread::scope(|scope| {
            let outcome = store.quarantine_with_pause(&hash, || {
                // The verdict (bad) is in; a put of the good copy starts now and must wait for the
                // rename, or it would rename its good copy in and see it moved aside.
                scope.spawn(|| {
                    store.put(&hash, data).expect("concurrent put");
                    put_done.store(true, Ordering::SeqCst);
                });
                // Long enough for an unblocked put of a few bytes to finish many times over.
                std::thread::sleep(std::time::Duration::from_millis(200));
                assert!(!put_done.load(Ordering::SeqCst), "a put finished between the verdict and the rename");
            });
            outcome.expect("quarantine")
        });

        assert_eq!(outcome, QuarantineOutcome::MovedAside);
        assert!(put_done.load(Ordering::SeqCst));
        assert_eq!(store.get(&hash).expect("the put's good copy is in place"), data);
        let quarantined = dir.path().join("quarantine").join(format!("{}.0", hash.to_hex()));
        assert_eq!(fs::read(quarantined).expect("quarantined copy"), bad_bytes, "the bad copy, not the good one");
        assert_eq!(store.stats(), StoreStats { chunk_count: 1, chunk_bytes: data.len() as u64 });
    }

    #[test]
    fn streamed_hash_equals_the_chunk_hash() {
        // Longer than any one read, so the pieces are joined.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let streamed = hash_of_reader(&mut data.as_slice()).expect("hash");
        assert_eq!(streamed, ChunkHash::of(&data));
        assert_eq!(hash_of_reader(&mut [].as_slice()).expect("hash"), ChunkHash::of(b""));
    }

    #[test]
    fn a_directory_in_tmp_is_left_alone_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open_store(&dir));
        fs::create_dir(dir.path().join("tmp").join("not-ours")).expect("mkdir");
        drop(open_store(&dir));
        assert!(dir.path().join("tmp").join("not-ours").is_dir());
    }

    #[test]
    fn a_chunk_is_surely_missing_only_when_its_directory_answers_that_it_is_not_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(&dir);
        let data = b"a shard".to_vec();
        let hash = ChunkHash::of(&data);
        assert!(store.surely_missing(&hash));
        store.put(&hash, &data).expect("put");
        assert!(!store.surely_missing(&hash));
        // The data directory gone (unmounted, wiped): no answer, so not "missing".
        std::fs::rename(&store.chunks_dir, dir.path().join("elsewhere")).expect("move the directory away");
        assert!(!store.contains(&hash));
        assert!(!store.surely_missing(&hash), "an error is not an absence");
    }
}
