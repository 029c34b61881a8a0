//! Blocking work on a bounded number of threads of its own.
//!
//! tokio's blocking pool starts a thread whenever none is idle, up to 512, and keeps each for
//! 10 s after its last task; work that rotates over them keeps them all. Every thread that has
//! allocated keeps allocator pages of its own, so a burst of short blocking tasks leaves a node
//! with dozens of threads and tens of MiB it no longer uses (see the data crate's `chunk_work`
//! for the chunk store's figures, and `node::METADATA_READS` for the metadata's). A
//! [`BlockingWork`] runs its tasks on at most `threads` threads of its own; a task beyond that
//! waits for its turn in async code, where a caller that goes away before its turn takes its
//! task with it.

use std::sync::OnceLock;

use tokio::sync::Semaphore;
use tokio::task::JoinError;

/// A bound on blocking work running at once, with the threads it runs on.
pub struct BlockingWork {
    permits: Semaphore,
    threads: usize,
    name: &'static str,
    runtime: OnceLock<Option<tokio::runtime::Runtime>>,
}

impl BlockingWork {
    /// At most `threads` tasks at once, on threads named `name`.
    pub const fn new(threads: usize, name: &'static str) -> Self {
        Self { permits: Semaphore::const_new(threads), threads, name, runtime: OnceLock::new() }
    }

    /// Runs `work` on one of this bound's threads once fewer than its `threads` tasks run, and
    /// returns its result. Dropped while waiting for its turn, `work` never runs; once started,
    /// it runs to its end (like any blocking task) and holds its permit until then.
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
        match self.threads() {
            Some(threads) => threads.spawn_blocking(work).await,
            None => tokio::task::spawn_blocking(work).await,
        }
    }

    /// Tasks that may start now without waiting.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// The threads the work runs on: the blocking pool of a runtime of its own, capped at
    /// `threads`. The permits alone did not bound the threads: a task that ends gives its
    /// permit back before its thread is idle again, so the next task, let in at once, often
    /// found no idle thread and tokio started one more (8-client chunk rows stayed at 138–181
    /// MiB). With the permits, a task seldom waits for a thread here, and never for long.
    ///
    /// The runtime is never driven: a blocking pool runs its tasks without it, so the work must
    /// not use tokio's timers or spawn tasks (file I/O, redb reads and plain computation do
    /// neither). None if the runtime could not be built; the work then runs on the caller's
    /// runtime's pool, bounded by the permits.
    fn threads(&self) -> Option<&tokio::runtime::Handle> {
        self.runtime
            .get_or_init(|| {
                tokio::runtime::Builder::new_current_thread()
                    .max_blocking_threads(self.threads.max(1))
                    .thread_name(self.name)
                    .build()
                    .inspect_err(|e| {
                        tracing::warn!("cannot start the {} threads, using the runtime's own: {e}", self.name)
                    })
                    .ok()
            })
            .as_ref()
            .map(|runtime| runtime.handle())
    }
}

/// Tasks to run at once for work that keeps a core busy while it runs, on this machine: two per
/// core kept a 2-core node's disk and cores as busy as hundreds of threads did (`chunk_work`).
pub fn two_per_core() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get()) * 2
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
        static BOUNDED: BlockingWork = BlockingWork::new(2, "test-bounded");
        let running = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let threads = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let mut releases = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let (release, wait) = std::sync::mpsc::channel::<()>();
            releases.push(release);
            let (running, started, threads) = (running.clone(), started.clone(), threads.clone());
            tasks.push(tokio::spawn(BOUNDED.run(move || {
                running.fetch_add(1, Ordering::SeqCst);
                started.fetch_add(1, Ordering::SeqCst);
                threads.lock().unwrap().insert(std::thread::current().name().map(str::to_string));
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
        let names = threads.lock().unwrap().clone();
        assert_eq!(names, [Some("test-bounded".to_string())].into(), "the work ran on the bound's own threads");
    }

    #[tokio::test]
    async fn work_dropped_while_waiting_for_its_turn_never_runs() {
        static BOUNDED: BlockingWork = BlockingWork::new(1, "test-dropped");
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
