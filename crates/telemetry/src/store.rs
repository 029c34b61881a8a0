//! Bounded on-disk stores of records, one JSON object per line.
//!
//! A [`RecordLog`] is a directory of segment files named by an increasing sequence number
//! (`00000000000000000042.jsonl`). Appends go to the newest segment; a full segment is closed
//! and a new one started; the oldest segments are deleted so the directory never holds more
//! than the bound. A segment is an eighth of the bound, so dropping the oldest keeps at least
//! seven eighths of the history. Queries scan the segments oldest first without holding the
//! append lock, so a query never delays the requests being recorded.
//!
//! Durability: each record is one `write` of a whole line to a file opened for appending, with
//! no user-space buffer and no fsync. The page cache survives a killed process, which is the
//! failure these records help explain; a power loss may lose the tail, which is acceptable for
//! diagnostics and spares every request a disk flush.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::record::{Level, LogRecord, SpanRecord};

/// Smallest segment; a bound must hold two.
const SEGMENT_BYTES_MIN: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("record store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("a record of {len} bytes does not fit a segment of {limit} bytes")]
    RecordTooLarge { len: usize, limit: u64 },
    #[error("a store bound of {0} bytes is below the minimum of {min} bytes", min = 2 * SEGMENT_BYTES_MIN)]
    BoundTooSmall(u64),
    #[error("a record must be one line; this one holds a newline")]
    Newline,
    #[error("encoding a record: {0}")]
    Encode(#[from] serde_json::Error),
}

fn io_error(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io { path: path.to_path_buf(), source }
}

/// The segments on disk, oldest first, with their sizes, and the open newest one.
struct Segments {
    list: VecDeque<(u64, u64)>,
    /// The segment appends go to; `None` until the first append of this process, which never
    /// appends to a segment a crashed process may have left torn.
    current: Option<File>,
    total_bytes: u64,
}

pub struct RecordLog {
    dir: PathBuf,
    bound_bytes: u64,
    segment_bytes: u64,
    segments: Mutex<Segments>,
}

impl RecordLog {
    /// Opens (creating) the store in `dir`, dropping the oldest segments at once if they exceed
    /// `bound_bytes` (the bound may have been lowered since they were written).
    pub fn open(dir: &Path, bound_bytes: u64) -> Result<Self, StoreError> {
        if bound_bytes < 2 * SEGMENT_BYTES_MIN {
            return Err(StoreError::BoundTooSmall(bound_bytes));
        }
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let mut list = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
            let entry = entry.map_err(|e| io_error(dir, e))?;
            let name = entry.file_name();
            let Some(sequence) = name.to_str().and_then(|n| n.strip_suffix(".jsonl")).and_then(|n| n.parse().ok())
            else {
                continue;
            };
            let len = entry.metadata().map_err(|e| io_error(&entry.path(), e))?.len();
            list.push((sequence, len));
        }
        list.sort_unstable();
        let total_bytes = list.iter().map(|(_, len)| len).sum();
        let log = RecordLog {
            dir: dir.to_path_buf(),
            bound_bytes,
            segment_bytes: (bound_bytes / 8).max(SEGMENT_BYTES_MIN),
            segments: Mutex::new(Segments { list: list.into(), current: None, total_bytes }),
        };
        {
            let mut segments = log.lock();
            while segments.total_bytes > bound_bytes && !segments.list.is_empty() {
                log.drop_oldest(&mut segments)?;
            }
        }
        Ok(log)
    }

    fn lock(&self) -> MutexGuard<'_, Segments> {
        // A panic while holding the lock leaves the bookkeeping as consistent as the last
        // completed step; keep recording rather than poison every later request.
        self.segments.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn segment_path(&self, sequence: u64) -> PathBuf {
        self.dir.join(format!("{sequence:020}.jsonl"))
    }

    fn drop_oldest(&self, segments: &mut Segments) -> Result<(), StoreError> {
        let Some((sequence, len)) = segments.list.pop_front() else { return Ok(()) };
        if segments.list.is_empty() {
            segments.current = None;
        }
        let path = self.segment_path(sequence);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                segments.list.push_front((sequence, len));
                return Err(io_error(&path, e));
            }
        }
        segments.total_bytes -= len;
        Ok(())
    }

    /// Appends one record (`line`, without its newline). After it returns, the segments on
    /// disk hold at most the bound.
    pub fn append(&self, line: &[u8]) -> Result<(), StoreError> {
        if line.contains(&b'\n') {
            return Err(StoreError::Newline);
        }
        let needed = line.len() as u64 + 1;
        if needed > self.segment_bytes {
            return Err(StoreError::RecordTooLarge { len: line.len(), limit: self.segment_bytes });
        }
        let mut segments = self.lock();
        let current_len = match (&segments.current, segments.list.back()) {
            (Some(_), Some((_, len))) => *len,
            _ => u64::MAX,
        };
        if current_len.saturating_add(needed) > self.segment_bytes {
            let sequence = segments.list.back().map_or(0, |(sequence, _)| sequence + 1);
            let path = self.segment_path(sequence);
            let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| io_error(&path, e))?;
            segments.list.push_back((sequence, 0));
            segments.current = Some(file);
        }
        while segments.total_bytes + needed > self.bound_bytes && segments.list.len() > 1 {
            self.drop_oldest(&mut segments)?;
        }
        let mut record = Vec::with_capacity(line.len() + 1);
        record.extend_from_slice(line);
        record.push(b'\n');
        let sequence = segments.list.back().map_or(0, |(sequence, _)| *sequence);
        let Some(file) = segments.current.as_mut() else {
            return Err(io_error(&self.segment_path(sequence), std::io::Error::other("no open segment")));
        };
        if let Err(e) = file.write_all(&record) {
            // A partial write leaves a torn line, which readers skip; start afresh next time.
            segments.current = None;
            return Err(io_error(&self.segment_path(sequence), e));
        }
        if let Some((_, len)) = segments.list.back_mut() {
            *len += needed;
        }
        segments.total_bytes += needed;
        Ok(())
    }

    /// Visits every complete line, oldest first, until `visit` breaks. A line without its
    /// newline (torn by a crash, or being written) is skipped.
    pub fn scan(&self, mut visit: impl FnMut(&[u8]) -> ControlFlow<()>) -> Result<(), StoreError> {
        let sequences: Vec<u64> = self.lock().list.iter().map(|(sequence, _)| *sequence).collect();
        let mut line = Vec::new();
        for sequence in sequences {
            let path = self.segment_path(sequence);
            let file = match File::open(&path) {
                Ok(file) => file,
                // Dropped by an append since the list was taken.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(&path, e)),
            };
            let mut reader = BufReader::new(file);
            loop {
                line.clear();
                let read = reader.read_until(b'\n', &mut line).map_err(|e| io_error(&path, e))?;
                if read == 0 {
                    break;
                }
                let Some(complete) = line.strip_suffix(b"\n") else { continue };
                if visit(complete).is_break() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Bytes the segments hold on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.lock().total_bytes
    }

    pub fn bound_bytes(&self) -> u64 {
        self.bound_bytes
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Finished spans, found by trace id.
pub struct SpanStore {
    log: RecordLog,
}

impl SpanStore {
    pub fn open(dir: &Path, bound_bytes: u64) -> Result<Self, StoreError> {
        Ok(SpanStore { log: RecordLog::open(dir, bound_bytes)? })
    }

    pub fn record(&self, span: &SpanRecord) -> Result<(), StoreError> {
        self.log.append(&serde_json::to_vec(span)?)
    }

    /// The spans of one trace, in the order they finished.
    pub fn trace(&self, trace_id: &str) -> Result<Vec<SpanRecord>, StoreError> {
        // serde_json writes the fields in order without spaces: a cheap byte search skips
        // parsing every other trace's lines.
        let needle = format!("\"trace_id\":\"{trace_id}\"");
        let finder = |line: &[u8]| line.windows(needle.len()).any(|window| window == needle.as_bytes());
        let mut found = Vec::new();
        self.log.scan(|line| {
            if finder(line) {
                if let Ok(span) = serde_json::from_slice::<SpanRecord>(line) {
                    if span.trace_id == trace_id {
                        found.push(span);
                    }
                }
            }
            ControlFlow::Continue(())
        })?;
        Ok(found)
    }

    pub fn disk_bytes(&self) -> u64 {
        self.log.disk_bytes()
    }
}

/// Which log lines a query wants.
#[derive(Default, Clone, Debug)]
pub struct LogQuery {
    pub trace_id: Option<String>,
    pub since_unix_us: Option<u64>,
    /// This level or more severe.
    pub min_level: Option<Level>,
    /// The newest this many matches.
    pub limit: usize,
}

impl LogQuery {
    pub fn matches(&self, line: &LogRecord) -> bool {
        self.trace_id.as_ref().is_none_or(|trace| line.trace_id.as_ref() == Some(trace))
            && self.since_unix_us.is_none_or(|since| line.time_unix_us >= since)
            && self.min_level.is_none_or(|level| line.level >= level)
    }
}

/// Structured log lines.
pub struct LogStore {
    log: RecordLog,
}

impl LogStore {
    pub fn open(dir: &Path, bound_bytes: u64) -> Result<Self, StoreError> {
        Ok(LogStore { log: RecordLog::open(dir, bound_bytes)? })
    }

    pub fn record(&self, line: &LogRecord) -> Result<(), StoreError> {
        self.log.append(&serde_json::to_vec(line)?)
    }

    /// The newest `query.limit` matching lines, oldest first.
    pub fn query(&self, query: &LogQuery) -> Result<Vec<LogRecord>, StoreError> {
        let mut kept = VecDeque::with_capacity(query.limit.min(1024));
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        self.log.scan(|line| {
            if let Ok(record) = serde_json::from_slice::<LogRecord>(line) {
                if query.matches(&record) {
                    if kept.len() == query.limit {
                        kept.pop_front();
                    }
                    kept.push_back(record);
                }
            }
            ControlFlow::Continue(())
        })?;
        Ok(kept.into())
    }

    pub fn disk_bytes(&self) -> u64 {
        self.log.disk_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SpanStatus;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn dir_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
    }

    fn lines(log: &RecordLog) -> Vec<String> {
        let mut out = Vec::new();
        log.scan(|line| {
            out.push(String::from_utf8_lossy(line).into_owned());
            ControlFlow::Continue(())
        })
        .unwrap();
        out
    }

    fn span(trace: &str, id: u64) -> SpanRecord {
        SpanRecord {
            trace_id: trace.into(),
            span_id: format!("{id:016x}"),
            parent_id: None,
            node: 1,
            name: "Kv/Get".into(),
            start_unix_us: id,
            duration_us: 5,
            status: SpanStatus::Ok,
            error: None,
            attributes: BTreeMap::new(),
        }
    }

    fn log_line(time: u64, level: Level, trace: Option<&str>) -> LogRecord {
        LogRecord {
            time_unix_us: time,
            level,
            node: 1,
            target: "mendfs_data".into(),
            message: format!("line {time}"),
            trace_id: trace.map(str::to_string),
            span_id: None,
            fields: BTreeMap::new(),
        }
    }

    #[test]
    fn the_oldest_records_go_first_and_the_bound_holds() {
        let dir = tempfile::tempdir().unwrap();
        let log = RecordLog::open(dir.path(), 64 << 10).unwrap();
        for i in 0..10_000 {
            log.append(format!("record {i:05} {}", "x".repeat(40)).as_bytes()).unwrap();
            assert!(dir_bytes(dir.path()) <= 64 << 10);
        }
        let kept = lines(&log);
        assert_eq!(kept.last().unwrap(), &format!("record 09999 {}", "x".repeat(40)));
        assert!(!kept.iter().any(|l| l.starts_with("record 00000")));
        // The newest records are all there, in order, and at least 7/8 of the bound is used.
        let first: usize = kept[0][7..12].parse().unwrap();
        assert_eq!(kept.len(), 10_000 - first);
        assert!(log.disk_bytes() >= (64 << 10) * 7 / 8 - 64, "{}", log.disk_bytes());
        assert_eq!(log.disk_bytes(), dir_bytes(dir.path()));
    }

    #[test]
    fn records_survive_a_reopen_which_enforces_a_lower_bound_and_skips_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RecordLog::open(dir.path(), 64 << 10).unwrap();
            for i in 0..2_000 {
                log.append(format!("{i:06}").as_bytes()).unwrap();
            }
        }
        // A crash mid-write: the newest segment ends without its newline.
        let newest = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).max().unwrap();
        let mut file = OpenOptions::new().append(true).open(&newest).unwrap();
        file.write_all(b"{\"torn\":").unwrap();
        drop(file);
        let log = RecordLog::open(dir.path(), 64 << 10).unwrap();
        let kept = lines(&log);
        assert_eq!(kept.last().unwrap(), "001999");
        assert!(!kept.iter().any(|l| l.contains("torn")));
        log.append(b"after").unwrap();
        assert_eq!(lines(&log).last().unwrap(), "after");
        drop(log);
        let smaller = RecordLog::open(dir.path(), 8192).unwrap();
        assert!(dir_bytes(dir.path()) <= 8192);
        assert_eq!(lines(&smaller).last().unwrap(), "after");
    }

    #[test]
    fn bad_records_and_bounds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(RecordLog::open(dir.path(), 100), Err(StoreError::BoundTooSmall(100))));
        let log = RecordLog::open(dir.path(), 64 << 10).unwrap();
        assert!(matches!(log.append(b"two\nlines"), Err(StoreError::Newline)));
        let huge = vec![b'x'; 9000];
        assert!(matches!(log.append(&huge), Err(StoreError::RecordTooLarge { len: 9000, limit: 8192 })));
        assert!(lines(&log).is_empty());
    }

    #[test]
    fn a_trace_is_found_among_many() {
        let dir = tempfile::tempdir().unwrap();
        let store = SpanStore::open(dir.path(), 1 << 20).unwrap();
        let wanted = "4bf92f3577b34da6a3ce929d0e0e4736";
        for i in 0..300 {
            let trace = if i % 7 == 0 { wanted.to_string() } else { format!("{i:032x}") };
            store.record(&span(&trace, i)).unwrap();
        }
        let found = store.trace(wanted).unwrap();
        assert_eq!(found.len(), 43);
        assert!(found.iter().all(|s| s.trace_id == wanted));
        assert!(found.windows(2).all(|w| w[0].start_unix_us < w[1].start_unix_us));
        assert!(store.trace(&"f".repeat(32)).unwrap().is_empty());
    }

    #[test]
    fn log_queries_filter_by_trace_time_and_level_and_keep_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), 1 << 20).unwrap();
        let levels = [Level::Debug, Level::Info, Level::Warn, Level::Error];
        for i in 0..100u64 {
            let trace = (i % 10 == 0).then_some("t1");
            store.record(&log_line(i, levels[i as usize % 4], trace)).unwrap();
        }
        let all = store.query(&LogQuery { limit: 1000, ..Default::default() }).unwrap();
        assert_eq!(all.len(), 100);
        let newest = store.query(&LogQuery { limit: 5, ..Default::default() }).unwrap();
        assert_eq!(newest.iter().map(|l| l.time_unix_us).collect::<Vec<_>>(), vec![95, 96, 97, 98, 99]);
        let traced = store.query(&LogQuery { trace_id: Some("t1".into()), limit: 1000, ..Default::default() }).unwrap();
        assert_eq!(traced.len(), 10);
        let recent = store.query(&LogQuery { since_unix_us: Some(90), limit: 1000, ..Default::default() }).unwrap();
        assert_eq!(recent.len(), 10);
        let severe =
            store.query(&LogQuery { min_level: Some(Level::Warn), limit: 1000, ..Default::default() }).unwrap();
        assert_eq!(severe.len(), 50);
        assert!(severe.iter().all(|l| l.level >= Level::Warn));
        assert!(store.query(&LogQuery::default()).unwrap().is_empty());
    }

    #[test]
    fn appends_and_scans_from_many_threads_keep_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(RecordLog::open(dir.path(), 32 << 10).unwrap());
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        log.append(format!("writer {t} record {i}").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    log.scan(|line| {
                        assert!(line.starts_with(b"writer "));
                        ControlFlow::Continue(())
                    })
                    .unwrap();
                }
            })
        };
        for writer in writers {
            writer.join().unwrap();
        }
        reader.join().unwrap();
        assert!(dir_bytes(dir.path()) <= 32 << 10);
        assert_eq!(log.disk_bytes(), dir_bytes(dir.path()));
    }

    proptest! {
        #[test]
        fn the_directory_never_exceeds_the_bound(
            bound in 8192u64..40_000,
            sizes in proptest::collection::vec(0usize..1500, 1..300),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let log = RecordLog::open(dir.path(), bound).unwrap();
            let mut last = None;
            for (i, size) in sizes.iter().enumerate() {
                let line = format!("{i}:{}", "y".repeat(*size));
                if log.append(line.as_bytes()).is_ok() {
                    last = Some(line);
                }
                prop_assert!(dir_bytes(dir.path()) <= bound);
            }
            // The newest accepted record is always kept.
            if let Some(last) = last {
                let kept = lines(&log);
                prop_assert_eq!(kept.last(), Some(&last));
            }
        }
    }
}
