//! Background work as workers, in the manner of Garage's `BackgroundRunner`.
//!
//! A node does much of its work on its own: group commit, session expiry, heartbeats, failure
//! detection, repair, scrubbing, orphan collection, telemetry export. Each such loop is a
//! [`Worker`]: it has a name, does one step of work per call, and says whether it has more to do
//! at once ([`Step::Busy`]), should rest ([`Step::Idle`]) or is finished ([`Step::Done`]).
//! [`Background`] runs the workers of one node:
//!
//! - every worker and task it starts is tracked, and [`Background::stop`] returns only once all
//!   of them have ended, so a stopped node leaves nothing running;
//! - a step that fails, or panics, is logged with the worker's name and counted in its status;
//!   by its [`OnFailure`] policy the worker then restarts after a backoff or stops the whole
//!   node. A worker is never silently gone;
//! - [`Background::workers`] tells what each worker is doing, for metrics and status pages.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a worker does after a step of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// There is more to do: the next step starts at once.
    Busy,
    /// Nothing to do for now: the next step starts after this long, unless the node stops.
    Idle(Duration),
    /// The worker is finished and ends.
    Done,
}

/// Why a step of work failed, in words for the log and the worker's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerError(pub String);

impl fmt::Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WorkerError {}

impl From<String> for WorkerError {
    fn from(message: String) -> Self {
        WorkerError(message)
    }
}

impl From<&str> for WorkerError {
    fn from(message: &str) -> Self {
        WorkerError(message.to_string())
    }
}

/// One background loop of a node.
pub trait Worker: Send + 'static {
    /// A stable name for logs and status (`"healer.repair"`, `"gc"`).
    fn name(&self) -> String;

    /// One step of work. Cancelled at an `.await` when the node stops, so a step must leave
    /// shared state consistent at every await point (as any cancellable future must).
    fn work(&mut self) -> impl Future<Output = Result<Step, WorkerError>> + Send;
}

/// What happens when a worker's step fails or panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Log it, wait (1 s, doubling to 60 s while failures repeat), and carry on.
    Restart,
    /// Log it and stop the node: a node without this worker must not keep serving.
    StopNode,
}

/// A worker's state as [`Background::workers`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Busy,
    Idle,
    /// Failed and waiting to restart.
    Failing,
    Done,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerStatus {
    pub name: String,
    pub state: WorkerState,
    /// Steps completed, failed ones included.
    pub steps: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The workers and tasks of one node; cheap to clone.
#[derive(Clone, Default)]
pub struct Background {
    tracker: TaskTracker,
    stop: CancellationToken,
    statuses: Arc<Mutex<Vec<Arc<Mutex<WorkerStatus>>>>>,
    /// Why the node stopped itself, if a `StopNode` worker failed.
    fatal: Arc<Mutex<Option<String>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Statuses are plain values; a panic elsewhere cannot leave them unusable.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Background {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `worker` until it is done or the node stops.
    pub fn spawn_worker(&self, mut worker: impl Worker, on_failure: OnFailure) {
        let name = worker.name();
        let status = Arc::new(Mutex::new(WorkerStatus {
            name: name.clone(),
            state: WorkerState::Busy,
            steps: 0,
            failures: 0,
            last_error: None,
        }));
        lock(&self.statuses).push(status.clone());
        let background = self.clone();
        // No span around the loop: a worker's steps (a repair round, a scrub pass) are each a
        // trace of their own, and a span open for the node's lifetime would make them one.
        self.tracker.spawn(async move {
            let set_state = |state| lock(&status).state = state;
            let mut backoff = RESTART_BACKOFF_MIN;
            loop {
                set_state(WorkerState::Busy);
                let step = tokio::select! {
                    biased;
                    _ = background.stop.cancelled() => break,
                    step = AssertUnwindSafe(worker.work()).catch_unwind() => step,
                };
                let failure = match step {
                    Ok(Ok(step)) => {
                        lock(&status).steps += 1;
                        backoff = RESTART_BACKOFF_MIN;
                        match step {
                            Step::Busy => {
                                // Let other tasks run between steps of a busy worker.
                                tokio::task::yield_now().await;
                                continue;
                            }
                            Step::Idle(rest) => {
                                set_state(WorkerState::Idle);
                                tokio::select! {
                                    _ = background.stop.cancelled() => break,
                                    _ = tokio::time::sleep(rest) => continue,
                                }
                            }
                            Step::Done => {
                                set_state(WorkerState::Done);
                                return;
                            }
                        }
                    }
                    Ok(Err(error)) => error.0,
                    Err(panic) => format!("panicked: {}", panic_message(&panic)),
                };
                {
                    let mut status = lock(&status);
                    status.steps += 1;
                    status.failures += 1;
                    status.last_error = Some(failure.clone());
                    status.state = WorkerState::Failing;
                }
                match on_failure {
                    OnFailure::Restart => {
                        tracing::error!(worker = %name, "worker failed, restarting in {backoff:?}: {failure}");
                        tokio::select! {
                            _ = background.stop.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
                    }
                    OnFailure::StopNode => {
                        background.fail(format!("worker {name} failed: {failure}"));
                        break;
                    }
                }
            }
            set_state(WorkerState::Stopped);
        });
    }

    /// Runs a task that is not a loop of steps (a server, a stream), tracked like a worker:
    /// it must end once [`Background::stopping`] fires.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Fires when the node is stopping (asked to, or a `StopNode` worker failed).
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.stop.clone().cancelled_owned()
    }

    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Stops the node because something it cannot run without failed (a server, say).
    pub fn fail(&self, why: String) {
        tracing::error!("stopping the node: {why}");
        lock(&self.fatal).get_or_insert(why);
        self.stop.cancel();
    }

    /// Why the node stopped itself, if a worker it cannot run without failed.
    pub fn fatal_error(&self) -> Option<String> {
        lock(&self.fatal).clone()
    }

    pub fn workers(&self) -> Vec<WorkerStatus> {
        lock(&self.statuses).iter().map(|status| lock(status).clone()).collect()
    }

    /// Tells every worker and task to stop, without waiting for them.
    pub fn request_stop(&self) {
        self.stop.cancel();
        self.tracker.close();
    }

    /// Stops every worker and task and waits until all have ended. Returns false if some were
    /// still running after `grace` (they are left to end on their own).
    pub async fn stop(&self, grace: Duration) -> bool {
        self.request_stop();
        tokio::time::timeout(grace, self.tracker.wait()).await.is_ok()
    }

    /// Tasks still running (workers and plain tasks).
    pub fn running(&self) -> usize {
        self.tracker.len()
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message.to_string()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Counting {
        steps: Arc<AtomicU32>,
        fail_at: Option<u32>,
        panic_at: Option<u32>,
        done_at: Option<u32>,
    }

    impl Worker for Counting {
        fn name(&self) -> String {
            "counting".into()
        }

        async fn work(&mut self) -> Result<Step, WorkerError> {
            let step = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
            if Some(step) == self.panic_at {
                panic!("step {step} panicked");
            }
            if Some(step) == self.fail_at {
                return Err(format!("step {step} failed").into());
            }
            if Some(step) == self.done_at {
                return Ok(Step::Done);
            }
            Ok(Step::Idle(Duration::from_millis(1)))
        }
    }

    fn counting(fail_at: Option<u32>, panic_at: Option<u32>, done_at: Option<u32>) -> (Counting, Arc<AtomicU32>) {
        let steps = Arc::new(AtomicU32::new(0));
        (Counting { steps: steps.clone(), fail_at, panic_at, done_at }, steps)
    }

    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_or_panicking_worker_restarts_and_says_why() {
        let background = Background::new();
        let (worker, steps) = counting(Some(2), Some(3), None);
        background.spawn_worker(worker, OnFailure::Restart);
        until("steps after the failures", || steps.load(Ordering::SeqCst) >= 5).await;
        let status = &background.workers()[0];
        assert_eq!(status.name, "counting");
        assert_eq!(status.failures, 2);
        assert_eq!(status.last_error.as_deref(), Some("panicked: step 3 panicked"));
        assert!(!background.is_stopping());
        assert!(background.stop(Duration::from_secs(5)).await);
        assert_eq!(background.workers()[0].state, WorkerState::Stopped);
        assert_eq!(background.running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_the_node_cannot_do_without_stops_the_node() {
        let background = Background::new();
        let (fatal, _) = counting(Some(1), None, None);
        let (other, _) = counting(None, None, None);
        background.spawn_worker(fatal, OnFailure::StopNode);
        background.spawn_worker(other, OnFailure::Restart);
        background.stopping().await;
        assert_eq!(background.fatal_error().as_deref(), Some("worker counting failed: step 1 failed"));
        assert!(background.stop(Duration::from_secs(5)).await);
        assert_eq!(background.running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_idle_and_finished_workers_and_plain_tasks() {
        let background = Background::new();
        let (done, _) = counting(None, None, Some(1));
        let (idle, _) = counting(None, None, None);
        background.spawn_worker(done, OnFailure::Restart);
        background.spawn_worker(idle, OnFailure::Restart);
        let stopping = background.stopping();
        background.spawn(stopping);
        until("the first worker to finish", || background.workers()[0].state == WorkerState::Done).await;
        assert_eq!(background.running(), 2);
        assert!(background.stop(Duration::from_secs(5)).await);
        assert_eq!(background.running(), 0);
    }
}
