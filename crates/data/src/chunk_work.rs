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
//! Only the data plane's work is bounded: the metadata's blocking work (Raft log fsyncs,
//! redb) still gets a thread of its own at once, so a data disk that hangs every chunk
//! operation holds these threads and no more, and the node keeps its place in the cluster.

use tokio::sync::Semaphore;
use tokio::task::JoinError;

/// Chunk operations that run at once in a process, per core: two per core kept a 2-core node's
/// disk and cores as busy as hundreds of threads did (the bench above), and more cores come
/// with more memory and usually more disks to keep busy.
const CHUNK_WORK_THREADS_PER_CORE: usize = 2;

/// Chunk operations that run at once in this process.
pub fn chunk_work_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get()) * CHUNK_WORK_THREADS_PER_CORE
}

/// A bound on blocking work running at once: a task waits for a permit, then runs on a
/// chunk work thread (`threads`) holding it. Waiting here rather than in the pool's queue
/// means a task whose caller went away before its turn never runs.
pub struct ChunkWork {
    permits: Semaphore,
}

/// The process's bound on the data plane's blocking work: one per process, as the threads
/// and the allocator's memory they keep are the process's.
static SHARED: std::sync::LazyLock<ChunkWork> = std::sync::LazyLock::new(|| ChunkWork::new(chunk_work_threads()));

impl ChunkWork {
    pub const fn new(threads: usize) -> Self {
        Self { permits: Semaphore::const_new(threads) }
    }

    pub fn shared() -> &'static ChunkWork {
        &SHARED
    }

    /// Runs `work` on a blocking thread once fewer than the bound's tasks run, and returns its
    /// result. Dropped while waiting for its turn, `work` never runs; once started, it runs to
    /// its end (like any blocking task) and holds its permit until then.
    pub async fn run<F, R>(&'static self, work: F) -> Result<R, JoinError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        // The semaphore is never closed, so there is always a permit to wait for; were it
        // closed, the work would run unbounded rather than fail.
        let permit = self.permits.acquire().await.ok();
        let work = move || {
            let _running = permit;
            work()
        };
        match threads() {
            Some(threads) => threads.spawn_blocking(work).await,
            None => tokio::task::spawn_blocking(work).await,
        }
    }

    /// Tasks that may start now without waiting.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

/// The threads chunk work runs on: the blocking pool of a runtime of its own, capped at
/// `chunk_work_threads()`. The permits alone did not bound the threads: a task that ends gives
/// its permit back before its thread is idle again, so the next task, let in at once, often
/// found no idle thread and tokio started one more (the 8-client rows above stayed at 138–181
/// MiB). With the permits, a task seldom waits for a thread here, and never for long.
///
/// The runtime is never driven: a blocking pool runs its tasks without it, so chunk work must
/// not use tokio's timers or spawn tasks (none does: it is `std::fs` and plain computation).
/// None if the runtime could not be built; chunk work then runs on the caller's runtime's
/// pool, bounded by the permits.
fn threads() -> Option<&'static tokio::runtime::Handle> {
    static RUNTIME: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .max_blocking_threads(chunk_work_threads())
                .thread_name("mendfs-chunk-work")
                .build()
                .inspect_err(|e| tracing::warn!("cannot start the chunk work threads, using the runtime's own: {e}"))
                .ok()
        })
        .as_ref()
        .map(|runtime| runtime.handle())
}

/// Runs `work` within the process's bound on the data plane's blocking work.
pub async fn run<F, R>(work: F) -> Result<R, JoinError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    ChunkWork::shared().run(work).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Polls `done` until it holds, for at most a generous deadline.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_tasks_run_at_once_than_the_bound_and_the_next_starts_when_one_ends() {
        static BOUNDED: ChunkWork = ChunkWork::new(2);
        let running = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let mut releases = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let (release, wait) = std::sync::mpsc::channel::<()>();
            releases.push(release);
            let (running, started) = (running.clone(), started.clone());
            tasks.push(tokio::spawn(BOUNDED.run(move || {
                running.fetch_add(1, Ordering::SeqCst);
                started.fetch_add(1, Ordering::SeqCst);
                let _ = wait.recv();
                running.fetch_sub(1, Ordering::SeqCst);
            })));
        }
        eventually("two tasks run", || started.load(Ordering::SeqCst) == 2).await;
        assert_eq!(BOUNDED.available(), 0);
        // The third waits for a permit, not for a thread: it has not started, and cannot
        // until one of the two running ends, which only its release allows.
        assert_eq!(started.load(Ordering::SeqCst), 2);
        for release in &releases {
            let _ = release.send(());
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(started.load(Ordering::SeqCst), 3);
        assert_eq!(running.load(Ordering::SeqCst), 0);
        assert_eq!(BOUNDED.available(), 2);
    }

    #[tokio::test]
    async fn work_dropped_while_waiting_for_its_turn_never_runs() {
        static BOUNDED: ChunkWork = ChunkWork::new(1);
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let holding = tokio::spawn(BOUNDED.run(move || {
            let _ = wait.recv();
        }));
        eventually("the first task holds the permit", || BOUNDED.available() == 0).await;
        let ran = Arc::new(AtomicUsize::new(0));
        let counted = ran.clone();
        let waiting = tokio::spawn(BOUNDED.run(move || counted.fetch_add(1, Ordering::SeqCst)));
        tokio::task::yield_now().await;
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        let _ = release.send(());
        holding.await.unwrap().unwrap();
        assert_eq!(BOUNDED.available(), 1);
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }
}
