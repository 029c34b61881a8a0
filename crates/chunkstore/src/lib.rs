//! The on-disk, checksummed chunk store of a storage node.
//!
//! # Intuition
//!
//! A chunk is named by the BLAKE3 hash of its bytes, so the name is also the checksum: every read
//! re-hashes the bytes and compares them with the name, and a chunk that rotted on disk is caught
//! before it is served. Because the name depends only on the content, storing the same chunk twice
//! is a no-op, and repair can copy a chunk from any healthy replica without asking which version
//! it is. A chunk is written to a temp file, fsynced, and renamed into place, so a chunk file is
//! either absent or complete: a crash never leaves a half-written chunk under a chunk's name. A
//! file under a chunk's name proves nothing more: it may be an old copy that has rotted since.
//! Only [`ChunkStore::verify`] (or a `get`) re-hashing it shows a good copy.
//!
//! Chunk files are written with direct I/O where the file system takes it (see `chunk_file`):
//! a chunk is fsynced as soon as it is written, so a trip through the page cache buys nothing.
//! Reads go through the page cache.
//!
//! The store is synchronous (`std::fs`) and knows nothing about the network, Raft or reference
//! counts: callers in async code run calls on blocking threads (the data plane's `chunk_work`,
//! which bounds how many run at once), and the decision
//! *whether* a chunk may be deleted belongs to the garbage collector, not to this crate.
//!
//! # Disk layout
//!
//! ```text
//! root/
//!   LOCK                          advisory lock: one open ChunkStore per root at a time
//!   chunks/ab/cd/abcd…(64 hex)    one file per chunk, holding exactly the chunk's bytes
//!   tmp/<64 hex>.<pid>.<n>.tmp    writes in progress; anything here at open is a crash leftover
//!   quarantine/<64 hex>.<n>       bad copies moved aside: never served, kept for inspection
//! ```
//!
//! The two levels of 256 directories keep each directory small (a million chunks is about 15
//! files per leaf directory), so lookups and directory fsyncs stay cheap. `tmp/` lives on the same
//! filesystem as `chunks/`, which is what makes the final rename atomic.
//!
//! # Errors
//!
//! [`ChunkError`] says what went wrong by kind. `NotFound` and `Corrupt` tell the caller to read
//! another replica (and, for `Corrupt`, to [`ChunkStore::quarantine`] this one); `HashMismatch`
//! and `TooLarge` are the caller's mistake and will fail the same way again; `DiskFull` means this
//! node cannot take writes until space is freed, so the write should go elsewhere; `Io` is
//! anything else the operating system reported.
//!
//! A quarantine re-checks the copy under the chunk's lock before moving it, because a put may have
//! replaced the bad copy since the caller saw it. It then answers
//! [`QuarantineOutcome::CopyIsGood`] and moves nothing, and the caller must keep treating the copy
//! as a good replica (not report it bad).
//!
//! # Injected faults
//!
//! For `mendfs chaos` only, a store can be given a [`FaultState`] ([`ChunkStore::with_faults`])
//! that makes it a slow disk or a full one. A store opened the ordinary way has none and never
//! looks for one; see the `faults` module for what each fault does.

mod chunk_file;
mod error;
mod faults;
mod hash;
mod store;

pub use chunk_file::WriteMode;
pub use error::ChunkError;
pub use faults::{FaultSettings, FaultState, CHUNK_IO_DELAY_MS_MAX};
pub use mendfs_types::ChunkHash;
pub use store::{ChunkStore, ChunkWriter, QuarantineOutcome, StoreStats, StreamCheck};
