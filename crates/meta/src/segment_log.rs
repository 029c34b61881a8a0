//! The Raft log as a directory of segment files: each append is one `pwrite` of framed records
//! at the end of the active segment, and making it durable is one `fdatasync` of that file.
//!
//! A redb transaction per append (the store this replaces) wrote about eleven 4 KiB pages
//! (B-tree leaf, branches, allocator state, header) and cost 250 µs a durable commit on this
//! project's test machine, against about 100 µs for a record written into a preallocated file
//! and `fdatasync`ed: a follower's append is on every write's critical path.
//!
//! Layout of `raft-log/`:
//! - `NNNNNNNNNNNNNNNNNNNN.seg`: segments, named by the index of their first entry, preallocated
//!   to [`SEGMENT_BYTES`] (`fallocate`) so that a sync rarely has a file size to persist. A
//!   batch that does not fit starts a new segment; one larger than a whole segment extends it.
//! - `meta`: the vote, the last purged log id and a committed hint, replaced atomically.
//! - `LOCK`: held (`flock`) while a process has the log open.
//!
//! A record is `[body length u32][crc32 of body u32][body]`, the body `[kind u8][term u64]
//! [node u64][index u64][payload]`, little-endian. A zero length marks the end of the written
//! part of a segment (preallocated space reads as zeros).
//!
//! Recovery reads every segment in order. Entry indexes must follow one another. In the last
//! segment the first record that fails its checksum, overruns the file or breaks the sequence
//! is the end of the log: a write that a crash cut short, which nobody was told was durable
//! (a follower answers only after the sync; a leader counts its own entries only once synced,
//! see `DurableLog`). Everything after it is zeroed before the log is used, so that bytes of
//! that cut write can never line up behind later appends and come back. The same zeroing
//! follows a truncation. In an earlier segment, which was synced before the next was started,
//! a bad record is corruption: the log refuses to open rather than drop acknowledged entries.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::{CommittedLeaderId, LogId, Vote};
use serde::{Deserialize, Serialize};

use crate::NodeId;

/// The size segments are preallocated to: large enough that rolling to a new one (a sync, a
/// file creation, a directory sync) is rare, small enough that a node's first segment does not
/// reserve much disk, and that recovery's read of the last one is quick.
pub const SEGMENT_BYTES: u64 = 16 << 20;

const PREFIX_BYTES: usize = 8;
const HEADER_BYTES: usize = 1 + 8 + 8 + 8;
const SEGMENT_SUFFIX: &str = ".seg";
const META_FILE: &str = "meta";
const LOCK_FILE: &str = "LOCK";
/// Zeroes are written in pieces of this size when a segment's tail is cleared.
const ZERO_PIECE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt Raft log record at byte {offset}: {reason}")]
    Corrupt { path: String, offset: u64, reason: String },
    #[error("Raft log entry {got} appended where entry {expected} is next")]
    OutOfSequence { expected: u64, got: u64 },
    #[error("the Raft log in {0} is open in another process")]
    Locked(String),
}

fn io_context(context: impl FnOnce() -> String) -> impl FnOnce(std::io::Error) -> LogError {
    move |source| LogError::Io { context: context(), source }
}

// ------------------------------------------------------------------------------------------
// Records: pure framing, no I/O.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A Raft entry; the payload is the encoded entry.
    Entry = 1,
    /// The committed log id Raft last reported: a hint for a restart (see
    /// `RaftLogStore::save_committed`), written with the next append at no extra sync.
    Committed = 2,
}

impl RecordKind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Entry),
            2 => Some(Self::Committed),
            _ => None,
        }
    }
}

/// Appends one framed record to `out`.
pub fn encode_record(out: &mut Vec<u8>, kind: RecordKind, log_id: LogId<NodeId>, payload: &[u8]) {
    let start = out.len();
    let body_len = (HEADER_BYTES + payload.len()) as u32;
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind as u8);
    out.extend_from_slice(&log_id.leader_id.term.to_le_bytes());
    out.extend_from_slice(&log_id.leader_id.node_id.to_le_bytes());
    out.extend_from_slice(&log_id.index.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + PREFIX_BYTES..]);
    out[start + 4..start + PREFIX_BYTES].copy_from_slice(&crc.to_le_bytes());
}

/// A record as found in a segment's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScannedRecord {
    pub kind: RecordKind,
    pub log_id: LogId<NodeId>,
    /// Where the record starts in its segment.
    pub offset: u64,
    /// The whole record's length, prefix included.
    pub len: u32,
}

/// Why a scan stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// A zero length (never-written space) or the end of the bytes, on a record boundary.
    Clean,
    /// A record that is not whole or not intact: a cut write, or corruption.
    Damaged { offset: u64, reason: String },
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// A record checked and read from the start of some bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedRecord<'a> {
    pub kind: RecordKind,
    pub log_id: LogId<NodeId>,
    pub payload: &'a [u8],
    /// The whole record's length, prefix included.
    pub len: usize,
}

/// Checks the record at the start of `bytes`; `Ok(None)` for a zero length (the end of what
/// was written).
pub fn parse_record(bytes: &[u8]) -> Result<Option<ParsedRecord<'_>>, String> {
    if bytes.len() < PREFIX_BYTES {
        return if bytes.iter().all(|&b| b == 0) {
            Ok(None)
        } else {
            Err(format!("{} bytes left, less than a record's prefix", bytes.len()))
        };
    }
    let body_len = u32_at(bytes, 0) as usize;
    if body_len == 0 {
        return Ok(None);
    }
    if body_len < HEADER_BYTES {
        return Err(format!("length {body_len} is shorter than a record header"));
    }
    let Some(body) = bytes.get(PREFIX_BYTES..PREFIX_BYTES + body_len) else {
        return Err(format!("length {body_len} runs past the end of the segment"));
    };
    let crc = u32_at(bytes, 4);
    let actual = crc32fast::hash(body);
    if crc != actual {
        return Err(format!("checksum {actual:08x}, recorded {crc:08x}"));
    }
    let Some(kind) = RecordKind::from_byte(body[0]) else {
        return Err(format!("unknown record kind {}", body[0]));
    };
    let log_id = LogId::new(CommittedLeaderId::new(u64_at(body, 1), u64_at(body, 9)), u64_at(body, 17));
    Ok(Some(ParsedRecord { kind, log_id, payload: &body[HEADER_BYTES..], len: PREFIX_BYTES + body_len }))
}

/// Every intact record from the start of `bytes`, up to the first that is not.
pub fn scan_records(bytes: &[u8]) -> (Vec<ScannedRecord>, ScanEnd) {
    let mut records = Vec::new();
    let mut offset = 0usize;
    loop {
        match parse_record(&bytes[offset..]) {
            Ok(None) => return (records, ScanEnd::Clean),
            Ok(Some(record)) => {
                records.push(ScannedRecord {
                    kind: record.kind,
                    log_id: record.log_id,
                    offset: offset as u64,
                    len: record.len as u32,
                });
                offset += record.len;
            }
            Err(reason) => return (records, ScanEnd::Damaged { offset: offset as u64, reason }),
        }
    }
}

// ------------------------------------------------------------------------------------------
// The log's small state beside the segments.

/// What the log keeps outside its segments. Replaced whole (temporary file, fsync, rename,
/// directory fsync), so a crash leaves the old version or the new one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogMeta {
    pub vote: Option<Vote<NodeId>>,
    pub last_purged: Option<LogId<NodeId>>,
    /// A hint only (see [`RecordKind::Committed`]); refreshed whenever the file is written.
    pub committed: Option<LogId<NodeId>>,
}

fn read_meta(dir: &Path) -> Result<LogMeta, LogError> {
    let path = dir.join(META_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LogMeta::default()),
        Err(e) => return Err(io_context(|| format!("read {}", path.display()))(e)),
    };
    let corrupt = |reason: String| LogError::Corrupt { path: path.display().to_string(), offset: 0, reason };
    if bytes.len() < 4 {
        return Err(corrupt("shorter than its checksum".into()));
    }
    let (crc, body) = bytes.split_at(4);
    if u32_at(crc, 0) != crc32fast::hash(body) {
        return Err(corrupt("checksum mismatch".into()));
    }
    postcard::from_bytes(body).map_err(|e| corrupt(format!("decode: {e}")))
}

fn write_meta(dir: &Path, meta: &LogMeta) -> Result<(), LogError> {
    let body = postcard::to_allocvec(meta)
        .map_err(|e| LogError::Io { context: "encode the Raft log's meta".into(), source: std::io::Error::other(e) })?;
    let mut bytes = crc32fast::hash(&body).to_le_bytes().to_vec();
    bytes.extend_from_slice(&body);
    let path = dir.join(META_FILE);
    let temporary = dir.join("meta.tmp");
    let context = |what: &'static str| {
        let path = path.clone();
        io_context(move || format!("{what} {}", path.display()))
    };
    let mut file = File::create(&temporary).map_err(context("create the temporary of"))?;
    file.write_all(&bytes).map_err(context("write"))?;
    // Durable before the rename: the renamed file must hold these bytes after a crash.
    file.sync_all().map_err(context("fsync"))?;
    drop(file);
    std::fs::rename(&temporary, &path).map_err(context("rename into place"))?;
    // The rename is durable only once the directory is.
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|dir| dir.sync_all()).map_err(io_context(|| format!("fsync directory {}", dir.display())))
}

// ------------------------------------------------------------------------------------------
// Segments and the log.

struct Segment {
    /// The index of the first entry written to it, which names it.
    first_index: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Bytes written so far: where the next record goes.
    end: u64,
}

/// Where one entry is.
#[derive(Clone, Copy)]
struct Location {
    segment: u64,
    offset: u64,
    len: u32,
    leader_id: CommittedLeaderId<NodeId>,
}

struct State {
    /// Oldest first; the last is the one appended to.
    segments: VecDeque<Segment>,
    /// Every entry the log holds, in order; the first has index `first_index`.
    locations: VecDeque<Location>,
    first_index: u64,
    meta: LogMeta,
    /// The committed id most recently passed to an append, whether or not it was written.
    committed: Option<LogId<NodeId>>,
    /// Whether `committed` is newer than any the segments or meta file hold.
    committed_unwritten: bool,
}

impl State {
    fn last_log_id(&self) -> Option<LogId<NodeId>> {
        match self.locations.back() {
            Some(last) => Some(LogId::new(last.leader_id, self.first_index + self.locations.len() as u64 - 1)),
            None => self.meta.last_purged,
        }
    }

    /// The index the next entry must have; `None` for an empty log never purged, which takes
    /// any first index.
    fn next_index(&self) -> Option<u64> {
        self.last_log_id().map(|id| id.index + 1)
    }

    fn location(&self, index: u64) -> Option<Location> {
        let position = index.checked_sub(self.first_index)?;
        self.locations.get(usize::try_from(position).ok()?).copied()
    }

    fn segment_position(&self, first_index: u64) -> Option<usize> {
        let position = self.segments.partition_point(|segment| segment.first_index < first_index);
        (self.segments.get(position)?.first_index == first_index).then_some(position)
    }
}

/// The Raft log's segments, shared by the appending task, the readers (replication) and the
/// flush task. Writes (`append`, `truncate`, `purge`) come one at a time from openraft.
pub struct SegmentLog {
    dir: PathBuf,
    /// [`SEGMENT_BYTES`], but for tests that roll segments quickly.
    segment_bytes: u64,
    state: Mutex<State>,
    /// Held locked for as long as the log is open; released when this is dropped.
    _lock: File,
}

/// Entries to append: each log id with its encoded entry.
pub type EncodedEntries = Vec<(LogId<NodeId>, Vec<u8>)>;

impl SegmentLog {
    /// Opens (creating if need be) the log in `dir`, recovering from a crash as the module
    /// describes.
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        Self::open_with_segment_bytes(dir, SEGMENT_BYTES)
    }

    fn open_with_segment_bytes(dir: &Path, segment_bytes: u64) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(io_context(|| format!("create {}", dir.display())))?;
        let lock = File::create(dir.join(LOCK_FILE))
            .map_err(io_context(|| format!("create the lock in {}", dir.display())))?;
        if lock.try_lock().is_err() {
            return Err(LogError::Locked(dir.display().to_string()));
        }
        let _ = std::fs::remove_file(dir.join("meta.tmp"));
        let meta = read_meta(dir)?;
        let mut state = State {
            segments: VecDeque::new(),
            locations: VecDeque::new(),
            first_index: meta.last_purged.map_or(0, |id| id.index + 1),
            committed: meta.committed,
            committed_unwritten: false,
            meta,
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_context(|| format!("list {}", dir.display())))? {
            let entry = entry.map_err(io_context(|| format!("list {}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(first_index) = name.strip_suffix(SEGMENT_SUFFIX).and_then(|stem| stem.parse::<u64>().ok()) {
                names.push((first_index, entry.path()));
            }
        }
        names.sort();
        // Segments whose entries are all purged (the next one starts at or before the first
        // entry kept): a crash came between the purge mark and the removal of their files.
        let purged = state.meta.last_purged.map(|id| id.index);
        let mut wholly_purged = 0;
        while wholly_purged + 1 < names.len() && purged.is_some_and(|purged| names[wholly_purged + 1].0 <= purged + 1) {
            remove_file(&names[wholly_purged].1)?;
            wholly_purged += 1;
        }
        let names = &names[wholly_purged..];
        let mut previous = None;
        for (position, (first_index, path)) in names.iter().enumerate() {
            recover_segment(&mut state, &mut previous, *first_index, path.clone(), position + 1 == names.len())?;
        }
        if let Some(purged) = purged {
            while state.first_index <= purged && !state.locations.is_empty() {
                state.locations.pop_front();
                state.first_index += 1;
            }
            if state.locations.is_empty() {
                state.first_index = purged + 1;
            } else if state.first_index != purged + 1 {
                return Err(LogError::Corrupt {
                    path: dir.display().to_string(),
                    offset: 0,
                    reason: format!("entries {}..={purged} are missing after the purge mark", purged + 1),
                });
            }
        }
        if state.locations.is_empty() {
            // Nothing past the purge mark (or nothing at all): the next entry starts a segment
            // of its own, named for it.
            for segment in state.segments.drain(..) {
                remove_file(&segment.path)?;
            }
        }
        sync_dir(dir)?;
        Ok(Self { dir: dir.to_path_buf(), segment_bytes, state: Mutex::new(state), _lock: lock })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn meta(&self) -> LogMeta {
        let state = self.state();
        LogMeta { committed: state.committed, ..state.meta.clone() }
    }

    pub fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.state().last_log_id()
    }

    pub fn last_purged(&self) -> Option<LogId<NodeId>> {
        self.state().meta.last_purged
    }

    /// Stores the vote durably (see `RaftLogStore::save_vote` for why it must be).
    pub fn save_vote(&self, vote: Vote<NodeId>) -> Result<(), LogError> {
        self.save_vote_and_committed(Some(vote), None)
    }

    /// Stores the vote durably, with `committed` as the committed hint if it is newer.
    pub fn save_vote_and_committed(
        &self,
        vote: Option<Vote<NodeId>>,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), LogError> {
        let meta = {
            let state = self.state();
            LogMeta { vote, committed: state.committed.max(committed), ..state.meta.clone() }
        };
        // Outside the lock (writes come one at a time from openraft): readers need not wait
        // for the file's two fsyncs.
        write_meta(&self.dir, &meta)?;
        let mut state = self.state();
        state.committed = meta.committed;
        state.meta = meta;
        state.committed_unwritten = false;
        Ok(())
    }

    /// Writes `entries` (and `committed`, when it is news) after the last entry. They are
    /// readable when this returns; durable only after [`SegmentLog::sync`], or at once with
    /// `sync`. A failed write leaves the log as it was: the entries are not recorded, and the
    /// next append overwrites whatever part of them reached the file.
    pub fn append(
        &self,
        mut entries: EncodedEntries,
        committed: Option<LogId<NodeId>>,
        sync: bool,
    ) -> Result<(), LogError> {
        if let Some(purged) = self.state().meta.last_purged {
            // Entries a snapshot already covers (and the state machine applied, or the purge
            // could not have happened) are kept by nobody: the log starts after the purge.
            entries.retain(|(log_id, _)| log_id.index > purged.index);
        }
        let Some((first, _)) = entries.first() else { return Ok(()) };
        let first = first.index;
        if self.state().next_index().is_some_and(|next| first < next) {
            // Entries that replace some already held: the old ones from `first` on go first, as
            // a truncation (openraft truncates before it appends over a conflict; this keeps the
            // log without holes whatever the caller does).
            self.truncate(first)?;
        }
        let mut state = self.state();
        if let Some(expected) = state.next_index() {
            if first != expected {
                return Err(LogError::OutOfSequence { expected, got: first });
            }
        }
        if committed > state.committed {
            state.committed = committed;
            state.committed_unwritten = true;
        }
        let mut bytes = Vec::with_capacity(
            entries.iter().map(|(_, payload)| PREFIX_BYTES + HEADER_BYTES + payload.len()).sum::<usize>() + 64,
        );
        if state.committed_unwritten {
            if let Some(committed) = state.committed {
                encode_record(&mut bytes, RecordKind::Committed, committed, &[]);
            }
        }
        let mut offsets = Vec::with_capacity(entries.len());
        for (log_id, payload) in &entries {
            offsets.push((bytes.len() as u64, log_id.leader_id));
            encode_record(&mut bytes, RecordKind::Entry, *log_id, payload);
        }
        let needs_segment = match state.segments.back() {
            None => true,
            // A batch that does not fit starts a new segment, unless the segment is still empty
            // (a batch larger than a segment extends it instead).
            Some(active) => active.end > 0 && active.end + bytes.len() as u64 > self.segment_bytes,
        };
        if needs_segment {
            self.start_segment(&mut state, first)?;
        }
        let Some(active) = state.segments.back_mut() else {
            return Err(LogError::Io { context: "no active segment".into(), source: std::io::Error::other("none") });
        };
        let base = active.end;
        active
            .file
            .write_all_at(&bytes, base)
            .map_err(io_context(|| format!("write entries {first}.. to {}", active.path.display())))?;
        active.end += bytes.len() as u64;
        let (segment, file, path) = (active.first_index, active.file.clone(), active.path.clone());
        if state.locations.is_empty() {
            state.first_index = first;
        }
        for (i, (offset, leader_id)) in offsets.into_iter().enumerate() {
            let len = (PREFIX_BYTES + HEADER_BYTES + entries[i].1.len()) as u32;
            state.locations.push_back(Location { segment, offset: base + offset, len, leader_id });
        }
        state.committed_unwritten = false;
        drop(state);
        if sync {
            // Outside the lock: readers (replication) need not wait for the disk.
            file.sync_data().map_err(io_context(|| format!("fdatasync {}", path.display())))?;
        }
        Ok(())
    }

    /// Makes every append so far durable. Appends only ever go to the newest segment, and a
    /// segment is synced before the next one is started, so syncing that one is enough.
    pub fn sync(&self) -> Result<(), LogError> {
        let active = self.state().segments.back().map(|segment| (segment.file.clone(), segment.path.clone()));
        match active {
            Some((file, path)) => file.sync_data().map_err(io_context(|| format!("fdatasync {}", path.display()))),
            None => Ok(()),
        }
    }

    /// Syncs the active segment (everything before it is synced already) and starts a new one
    /// whose first entry will be `first_index`.
    fn start_segment(&self, state: &mut State, first_index: u64) -> Result<(), LogError> {
        if let Some(active) = state.segments.back() {
            // Durable before any entry goes to the next segment: recovery trusts every segment
            // but the last to be whole.
            active.file.sync_data().map_err(io_context(|| format!("fdatasync {}", active.path.display())))?;
        }
        let path = self.dir.join(format!("{first_index:020}{SEGMENT_SUFFIX}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_context(|| format!("create {}", path.display())))?;
        match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, self.segment_bytes) {
            Ok(()) => {}
            // A file system without preallocation still works: writes extend the file.
            Err(rustix::io::Errno::OPNOTSUPP) => {}
            Err(e) => return Err(io_context(|| format!("preallocate {}", path.display()))(e.into())),
        }
        // The file and its name durable before entries in it are acknowledged.
        file.sync_all().map_err(io_context(|| format!("fsync {}", path.display())))?;
        sync_dir(&self.dir)?;
        state.segments.push_back(Segment { first_index, path, file: Arc::new(file), end: 0 });
        Ok(())
    }

    /// The entries with indexes in `start..end` that the log holds, in order: each log id with
    /// its encoded entry, checked against its checksum.
    pub fn read(&self, start: u64, end: u64) -> Result<EncodedEntries, LogError> {
        let wanted: Vec<(u64, Location, Arc<File>, PathBuf)> = {
            let state = self.state();
            let start = start.max(state.first_index);
            let end = end.min(state.first_index + state.locations.len() as u64);
            let mut wanted = Vec::with_capacity(end.saturating_sub(start) as usize);
            let mut segment: Option<&Segment> = None;
            for index in start..end {
                let Some(location) = state.location(index) else { break };
                if segment.is_none_or(|segment| segment.first_index != location.segment) {
                    segment =
                        state.segment_position(location.segment).and_then(|position| state.segments.get(position));
                }
                let Some(segment) = segment else { break };
                wanted.push((index, location, segment.file.clone(), segment.path.clone()));
            }
            wanted
        };
        let mut entries = Vec::with_capacity(wanted.len());
        for (index, location, file, path) in wanted {
            let mut bytes = vec![0; location.len as usize];
            file.read_exact_at(&mut bytes, location.offset)
                .map_err(io_context(|| format!("read entry {index} from {}", path.display())))?;
            let corrupt = |reason: String| LogError::Corrupt {
                path: path.display().to_string(),
                offset: location.offset,
                reason,
            };
            match parse_record(&bytes).map_err(corrupt)? {
                Some(record) if record.kind == RecordKind::Entry && record.log_id.index == index => {
                    entries.push((record.log_id, record.payload.to_vec()));
                }
                _ => return Err(corrupt(format!("not entry {index}"))),
            }
        }
        Ok(entries)
    }

    /// Removes the entries from `index` on, durably: removed entries conflict with the
    /// leader's log, and must not come back after a crash.
    pub fn truncate(&self, index: u64) -> Result<(), LogError> {
        let mut state = self.state();
        let Some(location) = state.location(index) else { return Ok(()) };
        while state.segments.back().is_some_and(|segment| segment.first_index > location.segment) {
            if let Some(segment) = state.segments.pop_back() {
                remove_file(&segment.path)?;
            }
        }
        let Some(active) = state.segments.back_mut() else {
            return Err(LogError::Io { context: "truncate: no segment".into(), source: std::io::Error::other("none") });
        };
        zero_tail(&active.file, &active.path, location.offset, active.end)?;
        active.end = location.offset;
        let keep = (index - state.first_index) as usize;
        state.locations.truncate(keep);
        // A committed hint written after the cut went with it.
        state.committed_unwritten = true;
        drop(state);
        sync_dir(&self.dir)
    }

    /// Forgets the entries up to `log_id` (a snapshot holds them): the purge mark first,
    /// durably, then the segments no longer needed. A crash between the two leaves segments
    /// that the next open removes.
    pub fn purge(&self, log_id: LogId<NodeId>) -> Result<(), LogError> {
        let meta = {
            let state = self.state();
            if state.meta.last_purged >= Some(log_id) {
                return Ok(());
            }
            LogMeta { last_purged: Some(log_id), committed: state.committed, ..state.meta.clone() }
        };
        // Outside the lock, as in `save_vote_and_committed`.
        write_meta(&self.dir, &meta)?;
        let mut state = self.state();
        state.meta = meta;
        state.committed_unwritten = false;
        let last_index = state.last_log_id().map(|id| id.index);
        let through_the_end = state.locations.is_empty() || last_index.is_some_and(|last| last <= log_id.index);
        if through_the_end {
            // Nothing left: the next entry (after the purge) starts a fresh segment, so that no
            // segment ever holds a gap in its indexes.
            for segment in state.segments.drain(..) {
                remove_file(&segment.path)?;
            }
            state.locations.clear();
            state.first_index = log_id.index + 1;
            return Ok(());
        }
        while state.first_index <= log_id.index && !state.locations.is_empty() {
            state.locations.pop_front();
            state.first_index += 1;
        }
        while state.segments.len() > 1 && state.segments[1].first_index <= log_id.index + 1 {
            if let Some(segment) = state.segments.pop_front() {
                remove_file(&segment.path)?;
            }
        }
        Ok(())
    }
}

fn remove_file(path: &Path) -> Result<(), LogError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_context(|| format!("remove {}", path.display()))(e)),
    }
}

/// Zeroes `file` from `from` to `to` (or to its end, if longer) and syncs it.
fn zero_tail(file: &File, path: &Path, from: u64, to: u64) -> Result<(), LogError> {
    let zeros = vec![0u8; ZERO_PIECE_BYTES];
    let mut at = from;
    while at < to {
        let piece = (to - at).min(ZERO_PIECE_BYTES as u64) as usize;
        file.write_all_at(&zeros[..piece], at)
            .map_err(io_context(|| format!("clear the tail of {}", path.display())))?;
        at += piece as u64;
    }
    file.sync_data().map_err(io_context(|| format!("fdatasync {}", path.display())))
}

/// Reads one segment into `state` (see the module's recovery rules). `previous` is the index
/// of the last entry read so far, from any segment.
fn recover_segment(
    state: &mut State,
    previous: &mut Option<LogId<NodeId>>,
    first_index: u64,
    path: PathBuf,
    last: bool,
) -> Result<(), LogError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_context(|| format!("open {}", path.display())))?;
    let bytes = std::fs::read(&path).map_err(io_context(|| format!("read {}", path.display())))?;
    let (records, scan_end) = scan_records(&bytes);
    let mut end = scan_end;
    let mut written = 0u64;
    let mut entries_here = 0u64;
    for record in records {
        if record.kind == RecordKind::Entry {
            if entries_here == 0 {
                // A segment's first entry is the one it is named for, and follows the previous
                // segment's last. Crashes cannot break this (a segment is created and synced
                // before anything is written to it), so a break is a lost or misnamed file.
                let follows = previous.is_none_or(|previous| previous.index + 1 == first_index);
                if record.log_id.index != first_index || !follows {
                    return Err(LogError::Corrupt {
                        path: path.display().to_string(),
                        offset: record.offset,
                        reason: format!(
                            "the segment starts with entry {} after entry {:?}",
                            record.log_id.index,
                            previous.map(|previous| previous.index)
                        ),
                    });
                }
            }
            let expected = previous.map_or(first_index, |previous| previous.index + 1);
            let out_of_order = match previous {
                // Terms never go down along a Raft log.
                Some(previous) => record.log_id.leader_id < previous.leader_id,
                None => false,
            };
            if record.log_id.index != expected || out_of_order {
                end = ScanEnd::Damaged {
                    offset: record.offset,
                    reason: format!(
                        "entry {} of term {} where entry {expected} was next",
                        record.log_id.index, record.log_id.leader_id.term
                    ),
                };
                break;
            }
            if state.locations.is_empty() {
                state.first_index = record.log_id.index;
            }
            state.locations.push_back(Location {
                segment: first_index,
                offset: record.offset,
                len: record.len,
                leader_id: record.log_id.leader_id,
            });
            *previous = Some(record.log_id);
            entries_here += 1;
        } else if Some(record.log_id) > state.committed {
            state.committed = Some(record.log_id);
        }
        written = record.offset + u64::from(record.len);
    }
    if let ScanEnd::Damaged { offset, reason } = &end {
        if !last {
            return Err(LogError::Corrupt {
                path: path.display().to_string(),
                offset: *offset,
                reason: reason.clone(),
            });
        }
        tracing::warn!(
            path = %path.display(),
            offset,
            reason,
            "the Raft log ends in a record a crash cut short; it is dropped (it was never acknowledged)"
        );
    }
    if last && bytes[written as usize..].iter().any(|&b| b != 0) {
        zero_tail(&file, &path, written, bytes.len() as u64)?;
    }
    state.segments.push_back(Segment { first_index, path, file: Arc::new(file), end: written });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    /// Entries `range` of `term`, each payload naming its index and term (and `size` bytes long).
    fn entries(term: u64, range: std::ops::RangeInclusive<u64>, size: usize) -> EncodedEntries {
        range
            .map(|index| {
                let mut payload = format!("entry {index} term {term};").into_bytes();
                payload.resize(size.max(payload.len()), b'.');
                (id(term, index), payload)
            })
            .collect()
    }

    fn indexes_and_terms(log: &SegmentLog) -> Vec<(u64, u64)> {
        let read = log.read(0, u64::MAX).expect("read");
        for (log_id, payload) in &read {
            assert!(payload.starts_with(format!("entry {} term {};", log_id.index, log_id.leader_id.term).as_bytes()));
        }
        read.iter().map(|(log_id, _)| (log_id.index, log_id.leader_id.term)).collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("list")
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "seg"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_record_reads_back_and_any_flipped_bit_is_caught() {
        let mut bytes = Vec::new();
        encode_record(&mut bytes, RecordKind::Entry, id(3, 7), b"payload");
        let record = parse_record(&bytes).expect("intact").expect("a record");
        let expected =
            ParsedRecord { kind: RecordKind::Entry, log_id: id(3, 7), payload: b"payload", len: bytes.len() };
        assert_eq!(record, expected);
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            match parse_record(&damaged) {
                Err(_) => {}
                // Only a length turned to zero reads as the clean end, never as another record.
                Ok(None) => assert!(bit < 32),
                Ok(Some(record)) => panic!("bit {bit} flipped and still read as {record:?}"),
            }
        }
    }

    proptest! {
        /// Whatever prefix of a segment's bytes survives a crash, with zeroes after it, a scan
        /// returns exactly the records that are whole in it.
        #[test]
        fn a_scan_of_any_cut_returns_exactly_the_whole_records(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..20),
            cut_fraction in 0.0f64..1.0,
            garbage in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut bytes = Vec::new();
            let mut ends = Vec::new();
            for (i, payload) in payloads.iter().enumerate() {
                encode_record(&mut bytes, RecordKind::Entry, id(1, i as u64 + 1), payload);
                ends.push(bytes.len());
            }
            let cut = (bytes.len() as f64 * cut_fraction) as usize;
            let mut survived = bytes[..cut].to_vec();
            survived.extend_from_slice(&garbage);
            survived.resize(survived.len() + 64, 0);
            let (records, _) = scan_records(&survived);
            // A record is whole when the bytes after the cut happen to be the ones it lost (a
            // cut one byte short of its end, and a first garbage byte equal to the lost one):
            // it then reads back exactly as written, which is right.
            let whole = ends.iter().filter(|&&end| survived.get(..end) == Some(&bytes[..end])).count();
            prop_assert!(whole >= ends.iter().filter(|&&end| end <= cut).count());
            // Anything else that reads as a record would be garbage passing the checksum: 1 in
            // 2^32, which these small cases do not reach.
            prop_assert_eq!(records.len(), whole, "garbage read as a record");
            for (i, record) in records.iter().enumerate() {
                prop_assert_eq!(record.log_id, id(1, i as u64 + 1));
            }
        }
    }

    #[test]
    fn entries_survive_a_reopen_and_the_log_rolls_into_new_segments() {
        let dir = tempfile::tempdir().expect("dir");
        let log = SegmentLog::open_with_segment_bytes(dir.path(), 4096).expect("open");
        for first in (1..=200).step_by(10) {
            log.append(entries(1, first..=first + 9, 100), Some(id(1, first)), first % 20 == 1).expect("append");
        }
        log.sync().expect("sync");
        assert!(segment_files(dir.path()).len() > 3, "small segments roll");
        assert_eq!(
            log.read(57, 60).expect("read").iter().map(|(id, _)| id.index).collect::<Vec<_>>(),
            vec![57, 58, 59]
        );
        drop(log);

        let log = SegmentLog::open_with_segment_bytes(dir.path(), 4096).expect("reopen");
        assert_eq!(indexes_and_terms(&log), (1..=200).map(|index| (index, 1)).collect::<Vec<_>>());
        assert_eq!(log.last_log_id(), Some(id(1, 200)));
        assert_eq!(log.meta().committed, Some(id(1, 191)));
        assert!(matches!(log.append(entries(1, 205..=205, 10), None, true), Err(LogError::OutOfSequence { .. })));
    }

    #[test]
    fn a_second_open_of_the_same_log_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let log = SegmentLog::open(dir.path()).expect("open");
        assert!(matches!(SegmentLog::open(dir.path()), Err(LogError::Locked(_))));
        drop(log);
        SegmentLog::open(dir.path()).expect("open once the first is closed");
    }

    /// A batch cut by a crash with its first record lost and later ones intact: recovery ends
    /// the log before it and clears the rest, so that a shorter batch written in its place
    /// cannot be followed, after the next crash, by the cut batch's old records.
    #[test]
    fn a_cut_write_never_comes_back_behind_later_appends() {
        let dir = tempfile::tempdir().expect("dir");
        let log = SegmentLog::open(dir.path()).expect("open");
        log.append(entries(1, 1..=4, 50), None, true).expect("append");
        let tail_at = log.state().segments[0].end;
        log.append(entries(3, 5..=7, 50), None, true).expect("append");
        drop(log);
        let segment = segment_files(dir.path())[0].clone();
        let file = std::fs::OpenOptions::new().write(true).open(&segment).expect("open segment");
        // The crash lost the page holding entry 5's header: 6 and 7 are intact on disk.
        file.write_all_at(&[0xee; 12], tail_at).expect("damage");
        drop(file);

        let log = SegmentLog::open(dir.path()).expect("recover");
        assert_eq!(indexes_and_terms(&log), (1..=4).map(|index| (index, 1)).collect::<Vec<_>>());
        // The entry 5 that replaces the lost one is exactly as long, so entries 6 and 7 of term
        // 3 would line up right behind it, in sequence and in term order, if still there.
        log.append(entries(2, 5..=5, 50), None, true).expect("append");
        drop(log);
        let log = SegmentLog::open(dir.path()).expect("reopen");
        assert_eq!(indexes_and_terms(&log), vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 2)]);
    }

    #[test]
    fn a_truncation_is_durable_and_the_removed_entries_never_return() {
        let dir = tempfile::tempdir().expect("dir");
        let log = SegmentLog::open_with_segment_bytes(dir.path(), 2048).expect("open");
        for first in (1..=60).step_by(5) {
            // Terms 1 and then 2: the entry of term 2 that replaces entry 23 below would be
            // followed, if the truncation left them, by entries in sequence and in term order.
            let term = if first < 21 { 1 } else { 2 };
            log.append(entries(term, first..=first + 4, 100), None, true).expect("append");
        }
        let segments_before = segment_files(dir.path()).len();
        log.truncate(23).expect("truncate");
        assert_eq!(log.last_log_id(), Some(id(2, 22)));
        assert!(segment_files(dir.path()).len() < segments_before, "later segments removed");
        log.append(entries(2, 23..=23, 100), None, true).expect("append");
        drop(log);
        let log = SegmentLog::open_with_segment_bytes(dir.path(), 2048).expect("reopen");
        let mut expected: Vec<(u64, u64)> = (1..=22).map(|index| (index, if index < 21 { 1 } else { 2 })).collect();
        expected.push((23, 2));
        assert_eq!(indexes_and_terms(&log), expected);
        // An append over held entries truncates them first.
        log.append(entries(3, 20..=21, 100), None, true).expect("append over");
        drop(log);
        let log = SegmentLog::open_with_segment_bytes(dir.path(), 2048).expect("reopen");
        let mut expected: Vec<(u64, u64)> = (1..=19).map(|index| (index, 1)).collect();
        expected.extend([(20, 3), (21, 3)]);
        assert_eq!(indexes_and_terms(&log), expected);
    }

    #[test]
    fn a_purge_removes_whole_segments_and_survives_a_crash_before_their_removal() {
        let dir = tempfile::tempdir().expect("dir");
        let log = SegmentLog::open_with_segment_bytes(dir.path(), 2048).expect("open");
        for first in (1..=100).step_by(5) {
            log.append(entries(1, first..=first + 4, 100), None, true).expect("append");
        }
        let before = segment_files(dir.path());
        // Keep copies, to put back as if the crash came before they were removed.
        let copies: Vec<(PathBuf, Vec<u8>)> =
            before.iter().map(|path| (path.clone(), std::fs::read(path).expect("read"))).collect();
        log.purge(id(1, 50)).expect("purge");
        assert!(segment_files(dir.path()).len() < before.len());
        assert_eq!(indexes_and_terms(&log).first(), Some(&(51, 1)));
        assert_eq!(log.read(40, 52).expect("read").len(), 1, "purged entries are not read");
        drop(log);
        for (path, bytes) in &copies {
            if !path.exists() {
                std::fs::write(path, bytes).expect("put back");
            }
        }
        let log = SegmentLog::open_with_segment_bytes(dir.path(), 2048).expect("reopen");
        assert_eq!(indexes_and_terms(&log), (51..=100).map(|index| (index, 1)).collect::<Vec<_>>());
        assert_eq!(log.last_purged(), Some(id(1, 50)));

        // A purge past the end (a snapshot installed from the leader) empties the log; the next
        // entry starts a segment of its own.
        log.purge(id(4, 500)).expect("purge past the end");
        assert_eq!(log.last_log_id(), Some(id(4, 500)));
        assert!(segment_files(dir.path()).is_empty());
        log.append(entries(4, 501..=502, 10), None, true).expect("append after the snapshot");
        drop(log);
        let log = SegmentLog::open_with_segment_bytes(dir.path(), 2048).expect("reopen");
        assert_eq!(indexes_and_terms(&log), vec![(501, 4), (502, 4)]);
    }

    /// A log of entries 1..=40 of term 1 in segments of 2 KiB, closed.
    fn closed_log_of_small_segments() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("dir");
        let log = SegmentLog::open_with_segment_bytes(dir.path(), 2048).expect("open");
        for first in (1..=40).step_by(5) {
            log.append(entries(1, first..=first + 4, 100), None, true).expect("append");
        }
        dir
    }

    /// Opens the log in `dir`, which must be refused as corrupt; returns the reason.
    fn refused_as_corrupt(dir: &Path) -> String {
        match SegmentLog::open_with_segment_bytes(dir, 2048) {
            Err(LogError::Corrupt { path, reason, .. }) => format!("{path}: {reason}"),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("a damaged log opened"),
        }
    }

    #[test]
    fn damage_in_an_earlier_segment_refuses_to_open_rather_than_lose_entries() {
        let dir = closed_log_of_small_segments();
        let first_segment = segment_files(dir.path())[0].clone();
        let file = std::fs::OpenOptions::new().write(true).open(&first_segment).expect("open segment");
        file.write_all_at(b"rot", 200).expect("damage");
        drop(file);
        assert!(refused_as_corrupt(dir.path()).contains(".seg: "));
    }

    /// A segment lost from the middle, or one whose name disagrees with its first entry, is not
    /// something a crash does: the log refuses to open rather than serve a log with a hole.
    #[test]
    fn a_lost_or_misnamed_segment_refuses_to_open() {
        let dir = closed_log_of_small_segments();
        let segments = segment_files(dir.path());
        assert!(segments.len() >= 3);
        let misnamed = segments[1].with_file_name(format!("{:020}{SEGMENT_SUFFIX}", 999));
        std::fs::rename(&segments[1], &misnamed).expect("rename");
        assert!(refused_as_corrupt(dir.path()).contains("starts with entry"));
        std::fs::rename(&misnamed, &segments[1]).expect("rename back");
        SegmentLog::open_with_segment_bytes(dir.path(), 2048).expect("whole again");

        std::fs::remove_file(&segments[1]).expect("lose a segment");
        assert!(refused_as_corrupt(dir.path()).contains("starts with entry"));
    }

    #[test]
    fn the_vote_and_the_purge_mark_are_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let log = SegmentLog::open(dir.path()).expect("open");
        log.save_vote(Vote::new_committed(7, 2)).expect("vote");
        log.purge(id(6, 10)).expect("purge");
        drop(log);
        let log = SegmentLog::open(dir.path()).expect("reopen");
        assert_eq!(log.meta().vote, Some(Vote::new_committed(7, 2)));
        assert_eq!(log.last_purged(), Some(id(6, 10)));
        assert_eq!(log.last_log_id(), Some(id(6, 10)));
        std::fs::write(dir.path().join(META_FILE), b"\x01\x02\x03\x04junk").expect("damage");
        drop(log);
        assert!(matches!(SegmentLog::open(dir.path()), Err(LogError::Corrupt { .. })));
    }
}
