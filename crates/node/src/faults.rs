//! The fault control file: how `mendfs chaos` makes a running node's chunk store slow or full.
//!
//! # Why a file
//!
//! A chaos run needs to turn faults on and off in a node while it runs. Every listener of a node
//! is reachable by strangers, so the control has no network surface at all: a node started with
//! `--allow-fault-injection` polls `<data_dir>/faults.json` every [`POLL_INTERVAL`], and only
//! someone who can already write into its data directory can inject anything. Without that
//! flag no [`FaultControlWorker`] exists, the file is never read, and the chunk store has no
//! fault hooks (see `mendfs_chunkstore`'s `faults` module for what each fault does).
//!
//! # The file
//!
//! ```json
//! {"chunk_io_delay_ms": 200, "chunk_store_full": false}
//! ```
//!
//! Both fields are optional (missing: 0 and false); an unknown field is an error, so a typo
//! does not silently inject nothing. A missing file means no faults. A file that cannot be read
//! or parsed is reported once per distinct content, with a warning, and the faults in force stay
//! as they were: a writer caught half-way (write the file elsewhere and rename it into place to
//! avoid that) or a mistake never clears or flips faults by accident.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mendfs_chunkstore::{FaultSettings, FaultState, CHUNK_IO_DELAY_MS_MAX};
use mendfs_worker::{Step, Worker, WorkerError};
use serde::Deserialize;

/// The control file's name in the data directory.
pub const FAULT_FILE_NAME: &str = "faults.json";

/// How often the control file is read.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Bytes of the control file read at most; a longer file is malformed (it holds two fields).
const FAULT_FILE_BYTES_MAX: u64 = 4_096;

/// The control file's fields, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FaultFile {
    chunk_io_delay_ms: u64,
    chunk_store_full: bool,
}

/// The faults a control file asks for, or why it cannot be used.
fn parse(bytes: &[u8]) -> Result<FaultSettings, String> {
    let file: FaultFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.chunk_io_delay_ms > CHUNK_IO_DELAY_MS_MAX {
        return Err(format!(
            "chunk_io_delay_ms {} is above the maximum {CHUNK_IO_DELAY_MS_MAX}",
            file.chunk_io_delay_ms
        ));
    }
    Ok(FaultSettings { chunk_io_delay_ms: file.chunk_io_delay_ms, chunk_store_full: file.chunk_store_full })
}

/// What one look at the control file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// The same file as last time (or still none): nothing to do.
    Unchanged,
    /// A new file (or its removal) put these faults in force; `changed` says whether they
    /// differ from the faults in force before.
    Applied { settings: FaultSettings, changed: bool },
    /// A new file that cannot be used; the faults in force stay. Reported once per content.
    Malformed(String),
}

/// The control file's content as last seen, so each change is acted on (and warned about) once.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Missing,
    Content(Vec<u8>),
    Unreadable(String),
}

/// Reads a node's control file and puts what it says in force. Blocking (it reads a file).
pub struct FaultControl {
    path: PathBuf,
    faults: Arc<FaultState>,
    last_seen: Option<Seen>,
}

impl FaultControl {
    pub fn new(data_dir: &Path, faults: Arc<FaultState>) -> Self {
        Self { path: data_dir.join(FAULT_FILE_NAME), faults, last_seen: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state this control sets, for the chunk store to consult.
    pub fn faults(&self) -> &Arc<FaultState> {
        &self.faults
    }

    /// Looks at the control file once and acts on a change.
    pub fn poll(&mut self) -> Polled {
        let seen = self.read();
        if self.last_seen.as_ref() == Some(&seen) {
            return Polled::Unchanged;
        }
        self.last_seen = Some(seen.clone());
        let settings = match &seen {
            Seen::Missing => Ok(FaultSettings::default()),
            Seen::Content(bytes) => parse(bytes),
            Seen::Unreadable(why) => Err(why.clone()),
        };
        match settings {
            Ok(settings) => {
                let changed = self.faults.get() != settings;
                self.faults.set(settings);
                Polled::Applied { settings, changed }
            }
            Err(why) => Polled::Malformed(why),
        }
    }

    fn read(&self) -> Seen {
        let file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Seen::Missing,
            Err(error) => return Seen::Unreadable(format!("cannot open it: {error}")),
        };
        let mut bytes = Vec::new();
        if let Err(error) = file.take(FAULT_FILE_BYTES_MAX + 1).read_to_end(&mut bytes) {
            return Seen::Unreadable(format!("cannot read it: {error}"));
        }
        if bytes.len() as u64 > FAULT_FILE_BYTES_MAX {
            return Seen::Unreadable(format!("it is longer than {FAULT_FILE_BYTES_MAX} bytes"));
        }
        Seen::Content(bytes)
    }
}

/// Polls the control file every [`POLL_INTERVAL`]; runs only on a node started with
/// `--allow-fault-injection`.
pub struct FaultControlWorker {
    control: Arc<Mutex<FaultControl>>,
}

impl FaultControlWorker {
    pub fn new(control: FaultControl) -> Self {
        Self { control: Arc::new(Mutex::new(control)) }
    }
}

/// Logs what a poll found: faults turned on loudly, a cleared file quietly, a bad file once.
pub fn log_polled(path: &Path, polled: &Polled) {
    match polled {
        Polled::Unchanged | Polled::Applied { changed: false, .. } => {}
        Polled::Applied { settings, changed: true } if *settings == FaultSettings::default() => {
            tracing::info!(file = %path.display(), "fault injection: no faults in force now");
        }
        Polled::Applied { settings, changed: true } => tracing::warn!(
            file = %path.display(),
            chunk_io_delay_ms = settings.chunk_io_delay_ms,
            chunk_store_full = settings.chunk_store_full,
            "fault injection: faults in force now"
        ),
        Polled::Malformed(why) => tracing::warn!(
            file = %path.display(),
            "fault injection: the control file cannot be used ({why}); the faults in force stay as they were"
        ),
    }
}

impl Worker for FaultControlWorker {
    fn name(&self) -> String {
        "faults".into()
    }

    async fn work(&mut self) -> Result<Step, WorkerError> {
        let control = self.control.clone();
        tokio::task::spawn_blocking(move || {
            // A poisoned lock only means a poll panicked; the control holds nothing it could
            // have left half-changed that a fresh poll does not put right.
            let mut control = control.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let polled = control.poll();
            log_polled(control.path(), &polled);
        })
        .await
        .map_err(|e| WorkerError(format!("fault control task: {e}")))?;
        Ok(Step::Idle(POLL_INTERVAL))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(dir: &tempfile::TempDir) -> (FaultControl, Arc<FaultState>) {
        let faults = Arc::new(FaultState::new());
        (FaultControl::new(dir.path(), faults.clone()), faults)
    }

    fn write(dir: &tempfile::TempDir, text: &str) {
        std::fs::write(dir.path().join(FAULT_FILE_NAME), text).expect("write the control file");
    }

    const FULL: FaultSettings = FaultSettings { chunk_io_delay_ms: 0, chunk_store_full: true };

    #[test]
    fn a_missing_file_is_no_faults_and_each_change_is_acted_on_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut control, faults) = control(&dir);
        assert_eq!(control.poll(), Polled::Applied { settings: FaultSettings::default(), changed: false });
        assert_eq!(control.poll(), Polled::Unchanged);

        write(&dir, r#"{"chunk_store_full": true}"#);
        assert_eq!(control.poll(), Polled::Applied { settings: FULL, changed: true });
        assert_eq!(faults.get(), FULL);
        assert_eq!(control.poll(), Polled::Unchanged);

        write(&dir, r#"{"chunk_io_delay_ms": 25, "chunk_store_full": false}"#);
        let slow = FaultSettings { chunk_io_delay_ms: 25, chunk_store_full: false };
        assert_eq!(control.poll(), Polled::Applied { settings: slow, changed: true });

        std::fs::remove_file(dir.path().join(FAULT_FILE_NAME)).expect("remove");
        assert_eq!(control.poll(), Polled::Applied { settings: FaultSettings::default(), changed: true });
        assert_eq!(faults.get(), FaultSettings::default());
    }

    #[test]
    fn a_malformed_file_keeps_the_faults_in_force_and_is_reported_once_per_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut control, faults) = control(&dir);
        write(&dir, r#"{"chunk_store_full": true}"#);
        control.poll();

        for bad in [
            r#"{"chunk_store_full": tru"#,
            r#"{"chunk_store_ful": false}"#,
            r#"{"chunk_io_delay_ms": -1}"#,
            r#"{"chunk_io_delay_ms": 60001}"#,
            "",
        ] {
            write(&dir, bad);
            assert!(matches!(control.poll(), Polled::Malformed(_)), "{bad:?} is malformed");
            assert_eq!(control.poll(), Polled::Unchanged, "{bad:?} is reported once");
            assert_eq!(faults.get(), FULL, "{bad:?} changes nothing");
        }
        write(&dir, &" ".repeat(FAULT_FILE_BYTES_MAX as usize + 1));
        assert!(matches!(control.poll(), Polled::Malformed(why) if why.contains("longer")));
        assert_eq!(faults.get(), FULL);

        write(&dir, "{}");
        assert_eq!(control.poll(), Polled::Applied { settings: FaultSettings::default(), changed: true });
    }
}
