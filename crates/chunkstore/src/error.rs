//! The one error type of the chunk store, by kind.

use std::io;
use std::path::{Path, PathBuf};

/// What went wrong in a chunk store call. Hashes are spelled in lowercase hex.
///
/// Retrying the same call on the same node helps only for `Io` (and for `DiskFull` once space has
/// been freed); `NotFound` and `Corrupt` mean "read another replica"; `HashMismatch`, `TooLarge`
/// are the caller's mistake and fail the same way every time.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// No chunk with this hash is stored here.
    #[error("chunk {0} not found")]
    NotFound(String),

    /// The stored bytes no longer hash to the chunk's name: this copy rotted on disk. The caller
    /// should quarantine it (which re-checks it first) and read another replica.
    #[error("chunk {hash} is corrupt: its stored bytes hash to {actual}")]
    Corrupt { hash: String, actual: String },

    /// `put` was handed bytes that do not hash to the name it was asked to store them under.
    /// Nothing was written.
    #[error("data hashes to {actual}, not to the expected {expected}")]
    HashMismatch { expected: String, actual: String },

    /// The filesystem is out of space (or quota) while writing at `path`. Nothing was left behind.
    #[error("disk full while writing {path}")]
    DiskFull { path: PathBuf },

    /// The chunk is larger than this store accepts. Nothing was written.
    #[error("chunk of {len} bytes is larger than the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },

    /// A streamed chunk brought more bytes than its writer declared. Nothing was written.
    #[error("chunk stream declared at most {declared} bytes but {actual} arrived")]
    SizeMismatch { declared: u64, actual: u64 },

    /// Any other error the operating system reported; `context` says what the store was doing.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl ChunkError {
    /// Wraps an I/O error, turning "no space" and "quota exceeded" into `DiskFull` so callers can
    /// tell "this node is full" apart from every other failure.
    pub(crate) fn from_io(error: io::Error, what: &str, path: &Path) -> Self {
        if is_disk_full(&error) {
            ChunkError::DiskFull { path: path.to_path_buf() }
        } else {
            ChunkError::Io { context: format!("{what} {}", path.display()), source: error }
        }
    }
}

/// ENOSPC maps to `StorageFull` and EDQUOT to `QuotaExceeded`; both mean this node cannot take the
/// write, and retrying here will not help until space is freed.
pub(crate) fn is_disk_full(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}
