//! The data plane's blocking work (chunk file I/O and erasure coding), on a bounded number of
//! threads.
//!
//! Chunk files are read and written with `std::fs`, so each operation runs on a blocking
//! thread. On tokio's own pool, which starts a thread whenever none is idle (up to 512), 32
//! concurrent uploads left the coordinating node with 45–47 threads, and every thread that had
//! touched chunk buffers kept allocator pages of its own: the 8-client rows of `mendfs bench
//! files` that followed the 32-client ones peaked at 167–201 MiB there, against 95–115 MiB on a
//! fresh node with the same live heap. On threads of its own, at most 8, the same rows peaked at
//! 114–136 MiB; at most 4 (two per core of that 2-core machine), at 101–112 MiB, and ran as
//! fast or faster (`bench files --sizes 67108864 --clients 32,8`, alternated runs). A node's
//! chunk work beyond `chunk_work_threads()` at once waits its turn here instead.
//!
//! The bound is the data plane's own: the metadata's reads have a bound of their own
//! (`mendfs_meta`'s `METADATA_READS`) and its Raft log work none, so a data disk that hangs
//! every chunk operation holds these threads and no more, and the node keeps its place in the
//! cluster.

use mendfs_meta::blocking_work::BlockingWork;
use tokio::task::JoinError;

/// Chunk operations that run at once in this process: two per core kept a 2-core node's disk
/// and cores as busy as hundreds of threads did (the bench above), and more cores come with
/// more memory and usually more disks to keep busy.
pub fn chunk_work_threads() -> usize {
    mendfs_meta::blocking_work::two_per_core()
}

/// The process's bound on the data plane's blocking work: one per process, as the threads
/// and the allocator's memory they keep are the process's.
static SHARED: std::sync::LazyLock<BlockingWork> =
    std::sync::LazyLock::new(|| BlockingWork::new(chunk_work_threads(), "mendfs-chunk-work"));

/// Runs `work` within the process's bound on the data plane's blocking work.
pub async fn run<F, R>(work: F) -> Result<R, JoinError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    SHARED.run(work).await
}
