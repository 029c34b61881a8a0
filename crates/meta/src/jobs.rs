//! Fault-tolerant jobs: a pool of N tasks (ids `0..N`) that workers claim, checkpoint and
//! complete, each task committing exactly one result.
//!
//! The intuition: a task attempt is a *lease* held under the worker's coordination session.
//! Every claim of a task takes the next attempt number of that task, which is the lease's
//! fencing token; a checkpoint or a result must name the lease it was made under, and is
//! refused unless that lease is still one of the task's current ones. A lease ends when its
//! attempt completes, when the task is won by another attempt, when the job is cancelled, or
//! when its session ends (`release_session`, called from the same apply that expires or closes
//! the session). So a worker that was paused past its TTL (a zombie) can never overwrite a
//! newer attempt's checkpoint or commit a result after another attempt did: the first
//! accepted `Complete` with a success makes the task `Done` and every other lease void.
//!
//! Placement: a worker registers in a job with its first claim (under its session, so the
//! registration ends with the session). A claim prefers tasks whose id the consistent-hash
//! ring over the job's live workers maps to the claiming worker; it takes another's only when
//! none of its own is claimable (work stealing), so no task starves and a joining or leaving
//! worker moves only its share of the preference.
//!
//! Tasks are materialized lazily: a job of N tasks is one record, and a task gets a row when
//! it is first claimed. `next_fresh` is the frontier below which every task has a row; a claim
//! looks at a bounded window of fresh ids past it and at a bounded page of the `JobPending`
//! index (tasks already started that can take another attempt: retried, lease lost, or running
//! below their redundancy). Every apply does bounded work, whatever N is.
//!
//! Like every module under `state`, this does no I/O and reads no clock: time is the state
//! clock passed in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::schema::{decode, encode, CommandError, CommandResult, Outcome, StateStore, StoreError, Table};

/// Job names: 1 to this many bytes of `A-Z a-z 0-9 . _ -`.
pub const JOB_NAME_BYTES_MAX: usize = 128;
/// Tasks of one job. A task costs nothing until claimed; once claimed, its row (~100 bytes
/// plus its result) stays in the metadata, so a million tasks with small results are ~100 MB
/// of Raft state at most, comparable to the sessions table's bound.
pub const TASKS_PER_JOB_MAX: u64 = 1_000_000;
/// Jobs the cluster keeps (finished and cancelled ones included: there is no `job delete`
/// yet). Equal to what one `job list` returns, which is how workers find work.
pub const JOBS_MAX: u64 = 1_000;
/// Concurrent attempts of one task.
pub const REDUNDANCY_MAX: u32 = 8;
/// Attempts of one task (failed exits and lost leases both count).
pub const ATTEMPTS_MAX: u32 = 100;
/// Backup attempts (speculative execution) of one job with redundancy 1.
pub const SPECULATIVE_MAX: u32 = 1_000;
/// One task's checkpoint, stored inline in the metadata and replicated by Raft.
pub const CHECKPOINT_BYTES_MAX: usize = 1 << 20;
/// One task's result (its command's stdout). A larger output fails the attempt: it is
/// refused, never truncated, so a committed result is always the whole output.
pub const RESULT_BYTES_MAX: usize = 64 << 10;
/// The stderr tail kept for a failed attempt (the last bytes; truncated, not refused).
pub const STDERR_TAIL_BYTES_MAX: usize = 4 << 10;
/// A job's command line, all arguments together.
pub const COMMAND_BYTES_MAX: usize = 16 << 10;
/// Results and checkpoints one job may hold in the metadata at once.
pub const JOB_STORED_BYTES_MAX: u64 = 1 << 30;
/// Live workers of one job: the ring built at each claim is over at most this many.
pub const WORKERS_PER_JOB_MAX: usize = 256;
/// Leases one session may hold (a worker's slots).
pub const LEASES_PER_SESSION_MAX: usize = 1_024;
/// Worker labels (`host:pid` by default), for per-worker counts.
pub const WORKER_LABEL_BYTES_MAX: usize = 128;
/// A job's lease TTL: the session TTL its workers use.
pub const JOB_TTL_MS: std::ops::RangeInclusive<u64> = 500..=3_600_000;
/// Fresh ids and pending rows a claim looks at, each.
const CLAIM_SCAN_MAX: usize = 256;
/// Vnodes per worker on the placement ring: few, because the ring is built at every claim;
/// the preference only needs to be stable, not perfectly even.
const RING_VNODES_PER_WORKER: u32 = 16;
/// A failed attempt's retry waits `BACKOFF_BASE_MS * 2^(failures-1)`, at most `BACKOFF_MAX_MS`.
const BACKOFF_BASE_MS: u64 = 500;
const BACKOFF_MAX_MS: u64 = 60_000;
/// Per-worker done counts kept in a job record; later workers are counted under "other".
const WORKER_COUNTS_MAX: usize = 256;
/// A running task gets a backup attempt (redundancy 1) once it has run this many times the
/// mean duration of the job's completed tasks (MapReduce's straggler rule, simplified)...
const SPECULATIVE_FACTOR: u64 = 3;
/// ...and at least this long, so that a job of fast tasks does not back up every jitter.
const SPECULATIVE_MIN_MS: u64 = 2_000;
/// Running tasks a claim looks at for a straggler.
const SPECULATIVE_SCAN_MAX: usize = 64;

/// What the user submitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub tasks: u64,
    pub redundancy: u32,
    pub max_attempts: u32,
    pub ttl_ms: u64,
    pub command: Vec<String>,
    /// Backup attempts allowed for stragglers when `redundancy` is 1 (0: none).
    pub speculative_max: u32,
}

/// A job and its counters, kept up to date by every apply so that a status read is one row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub spec: JobSpec,
    pub created_ms: u64,
    pub cancelled: bool,
    /// When the last task finished or the job was cancelled (0: not yet).
    pub finished_ms: u64,
    /// When the first task was claimed (0: not yet).
    pub first_claim_ms: u64,
    pub done: u64,
    pub failed: u64,
    /// Tasks with at least one lease.
    pub running: u64,
    /// Claims (attempts started), backups and redundant ones included.
    pub attempts: u64,
    /// Claims that started from a checkpoint.
    pub resumed_from_checkpoint: u64,
    /// Leases ended by their session's end.
    pub lost_leases: u64,
    /// Checkpoints and results refused because their lease was not current (fencing).
    pub fenced: u64,
    /// Backup attempts started for stragglers.
    pub speculative: u64,
    /// Every task below this id has a row.
    pub next_fresh: u64,
    /// Bytes of results and checkpoints held.
    pub stored_bytes: u64,
    /// Sum and count of completed tasks' durations (first claim to result), for stragglers.
    pub completed_ms_total: u64,
    pub completed: u64,
    /// Tasks done by each worker label.
    pub done_by_worker: BTreeMap<String, u64>,
}

impl JobRecord {
    pub fn pending(&self) -> u64 {
        self.spec.tasks.saturating_sub(self.done + self.failed + self.running)
    }

    pub fn is_over(&self) -> bool {
        self.cancelled || self.done + self.failed >= self.spec.tasks
    }
}

/// One attempt of a task, held under a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The fencing token: this attempt's number among the task's claims.
    pub attempt: u64,
    pub session_id: u64,
    pub worker: String,
    pub started_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Started at least once and waiting for (another) attempt, or running.
    Active,
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub state: TaskState,
    pub leases: Vec<Lease>,
    /// Claims so far: the last fencing token handed out.
    pub claims: u64,
    /// Attempts that ended without a result (failed exit or lost lease).
    pub failures: u32,
    /// No claim before this time on the state clock (the retry backoff).
    pub not_before_ms: u64,
    /// The lease whose checkpoint is stored (0: none).
    pub checkpoint_attempt: u64,
    pub first_claim_ms: u64,
    pub finished_ms: u64,
    /// Done: the committed stdout.
    #[serde(with = "serde_bytes")]
    pub result: Vec<u8>,
    /// Done: the winning attempt and its worker.
    pub result_attempt: u64,
    pub result_worker: String,
    /// The last failed attempt's stderr tail.
    pub stderr_tail: String,
}

/// How an attempt ended, as its worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskOutcome {
    Succeeded {
        #[serde(with = "serde_bytes")]
        stdout: Vec<u8>,
    },
    Failed {
        /// None: killed by a signal, or it never started.
        exit_code: Option<i32>,
        stderr_tail: String,
    },
}

/// The one `Command` variant of jobs (`Command::Job`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobCommand {
    Submit {
        name: String,
        spec: JobSpec,
    },
    Cancel {
        name: String,
    },
    /// A worker asks for a task of `name` under its session.
    Claim {
        name: String,
        session_id: u64,
        worker: String,
    },
    Checkpoint {
        name: String,
        task: u64,
        lease: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Complete {
        name: String,
        task: u64,
        lease: u64,
        outcome: TaskOutcome,
    },
    /// A worker that is stopping gives a lease back: the task is claimable again at once, and
    /// the attempt does not count against `max_attempts`.
    Release {
        name: String,
        task: u64,
        lease: u64,
    },
}

impl JobCommand {
    pub fn approximate_bytes(&self) -> usize {
        match self {
            JobCommand::Submit { name, spec } => name.len() + spec.command.iter().map(|a| a.len() + 2).sum::<usize>(),
            JobCommand::Cancel { name } | JobCommand::Release { name, .. } => name.len(),
            JobCommand::Claim { name, worker, .. } => name.len() + worker.len(),
            JobCommand::Checkpoint { name, data, .. } => name.len() + data.len(),
            JobCommand::Complete { name, outcome, .. } => {
                name.len()
                    + match outcome {
                        TaskOutcome::Succeeded { stdout } => stdout.len(),
                        TaskOutcome::Failed { stderr_tail, .. } => stderr_tail.len(),
                    }
            }
        }
    }

    /// The limits a command must keep before it is proposed (`validate`).
    pub fn check(&self) -> Result<(), String> {
        match self {
            JobCommand::Submit { name, spec } => {
                validate_job_name(name)?;
                check_spec(spec)
            }
            JobCommand::Cancel { name } | JobCommand::Release { name, .. } => validate_job_name(name),
            JobCommand::Claim { name, worker, .. } => {
                validate_job_name(name)?;
                if worker.is_empty() || worker.len() > WORKER_LABEL_BYTES_MAX {
                    return Err(format!("a worker label is 1 to {WORKER_LABEL_BYTES_MAX} bytes"));
                }
                Ok(())
            }
            JobCommand::Checkpoint { name, data, .. } => {
                validate_job_name(name)?;
                if data.len() > CHECKPOINT_BYTES_MAX {
                    return Err(format!(
                        "the checkpoint is {} bytes; the limit is {CHECKPOINT_BYTES_MAX} bytes (1 MiB)",
                        data.len()
                    ));
                }
                Ok(())
            }
            JobCommand::Complete { name, outcome, .. } => {
                validate_job_name(name)?;
                match outcome {
                    TaskOutcome::Succeeded { stdout } if stdout.len() > RESULT_BYTES_MAX => Err(format!(
                        "the result is {} bytes; the limit is {RESULT_BYTES_MAX} bytes (64 KiB)",
                        stdout.len()
                    )),
                    TaskOutcome::Failed { stderr_tail, .. } if stderr_tail.len() > STDERR_TAIL_BYTES_MAX => {
                        Err(format!("a stderr tail is at most {STDERR_TAIL_BYTES_MAX} bytes"))
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

/// What a job command answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    Submitted,
    Cancelled {
        found: bool,
    },
    Claimed(Claim),
    /// Nothing to claim now: try again after `retry_after_ms`, or never if the job is over.
    NothingToClaim {
        retry_after_ms: u64,
        over: bool,
    },
    CheckpointSaved,
    /// The attempt's result was committed (a success) or its failure recorded.
    Completed,
    /// The lease was given back.
    Released,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub task: u64,
    pub lease: u64,
    /// Whether the task has a checkpoint to start from (read it with a job read).
    pub has_checkpoint: bool,
    pub command: Vec<String>,
    /// A backup attempt of a straggler.
    pub speculative: bool,
}

pub fn validate_job_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= JOB_NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("job name {name:?} must be 1 to {JOB_NAME_BYTES_MAX} of A-Z a-z 0-9 . _ -"))
    }
}

fn check_spec(spec: &JobSpec) -> Result<(), String> {
    if spec.tasks == 0 {
        return Err("a job needs at least one task (--tasks 0)".into());
    }
    if spec.tasks > TASKS_PER_JOB_MAX {
        return Err(format!("{} tasks is more than the limit of {TASKS_PER_JOB_MAX} per job", spec.tasks));
    }
    if !(1..=REDUNDANCY_MAX).contains(&spec.redundancy) {
        return Err(format!("--redundancy must be 1 to {REDUNDANCY_MAX}, not {}", spec.redundancy));
    }
    if !(1..=ATTEMPTS_MAX).contains(&spec.max_attempts) {
        return Err(format!("--max-attempts must be 1 to {ATTEMPTS_MAX}, not {}", spec.max_attempts));
    }
    if !JOB_TTL_MS.contains(&spec.ttl_ms) {
        return Err(format!("--ttl must be 0.5 s to 1 h, not {} ms", spec.ttl_ms));
    }
    if spec.speculative_max > SPECULATIVE_MAX {
        return Err(format!("--speculative-max is at most {SPECULATIVE_MAX}"));
    }
    if spec.command.is_empty() || spec.command[0].is_empty() {
        return Err("a job needs a command: mendfs job submit NAME --tasks N -- CMD [ARGS...]".into());
    }
    let bytes: usize = spec.command.iter().map(|arg| arg.len() + 1).sum();
    if bytes > COMMAND_BYTES_MAX {
        return Err(format!("the command line is {bytes} bytes; the limit is {COMMAND_BYTES_MAX}"));
    }
    Ok(())
}

fn job_key(name: &str) -> Vec<u8> {
    name.as_bytes().to_vec()
}

/// `name ++ 0 ++ task (u64 BE)`: the key of a task's rows (`JobTasks`, `JobCheckpoints`,
/// `JobPending`, `JobFailed`). Names hold no 0 byte, so one job's keys are one range.
pub fn task_key(name: &str, task: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 9);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(&task.to_be_bytes());
    key
}

fn job_prefix(name: &str) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key
}

/// The task id at the end of a task key.
fn task_of(key: &[u8]) -> Result<u64, StoreError> {
    let tail: [u8; 8] = key
        .get(key.len().saturating_sub(8)..)
        .and_then(|tail| tail.try_into().ok())
        .ok_or_else(|| StoreError("job task key too short".into()))?;
    Ok(u64::from_be_bytes(tail))
}

/// `JobWorkers` key: `name ++ 0 ++ session (u64 BE)`.
fn worker_key(name: &str, session_id: u64) -> Vec<u8> {
    task_key(name, session_id)
}

/// `JobHolds` key: `session (u64 BE) ++ name ++ 0 ++ task (u64 BE)`; the task [`REGISTRATION`]
/// stands for the session's registration as a worker of the job.
fn hold_key(session_id: u64, name: &str, task: u64) -> Vec<u8> {
    let mut key = session_id.to_be_bytes().to_vec();
    key.extend_from_slice(&task_key(name, task));
    key
}

const REGISTRATION: u64 = u64::MAX;

pub fn get_job(store: &impl StateStore, name: &str) -> Result<Option<JobRecord>, StoreError> {
    store.get(Table::Jobs, &job_key(name))?.map(|bytes| decode(&bytes)).transpose()
}

fn put_job(store: &mut impl StateStore, name: &str, job: &JobRecord) -> Result<(), StoreError> {
    store.put(Table::Jobs, &job_key(name), &encode(job)?)
}

pub fn get_task(store: &impl StateStore, name: &str, task: u64) -> Result<Option<TaskRecord>, StoreError> {
    store.get(Table::JobTasks, &task_key(name, task))?.map(|bytes| decode(&bytes)).transpose()
}

fn put_task(store: &mut impl StateStore, name: &str, task: u64, record: &TaskRecord) -> Result<(), StoreError> {
    store.put(Table::JobTasks, &task_key(name, task), &encode(record)?)
}

pub fn get_checkpoint(store: &impl StateStore, name: &str, task: u64) -> Result<Option<Vec<u8>>, StoreError> {
    store.get(Table::JobCheckpoints, &task_key(name, task))
}

/// Jobs by name, from `after` on (exclusive), at most `limit`.
pub fn list_jobs(
    store: &impl StateStore,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, JobRecord)>, StoreError> {
    let start = after.map(|name| {
        let mut key = job_key(name);
        key.push(0);
        key
    });
    let rows = store.range(Table::Jobs, start.as_deref().unwrap_or(&[]), None, limit)?;
    rows.into_iter()
        .map(|(key, value)| {
            let name = String::from_utf8(key).map_err(|e| StoreError(format!("job name: {e}")))?;
            Ok((name, decode(&value)?))
        })
        .collect()
}

/// Task rows of a job from `from` on, at most `limit`, in task order; tasks never claimed
/// have no row.
pub fn list_tasks(
    store: &impl StateStore,
    name: &str,
    from: u64,
    limit: usize,
) -> Result<Vec<(u64, TaskRecord)>, StoreError> {
    let end = crate::schema::prefix_end(&job_prefix(name));
    store
        .range(Table::JobTasks, &task_key(name, from), end.as_deref(), limit)?
        .into_iter()
        .map(|(key, value)| Ok((task_of(&key)?, decode(&value)?)))
        .collect()
}

/// Failed tasks of a job, at most `limit`.
pub fn failed_tasks(store: &impl StateStore, name: &str, limit: usize) -> Result<Vec<u64>, StoreError> {
    let prefix = job_prefix(name);
    let end = crate::schema::prefix_end(&prefix);
    store.range(Table::JobFailed, &prefix, end.as_deref(), limit)?.iter().map(|(key, _)| task_of(key)).collect()
}

fn job_not_found(name: &str) -> CommandError {
    CommandError::JobNotFound { name: name.to_string() }
}

/// Applies one job command at state time `clock_ms`.
pub fn apply(store: &mut impl StateStore, command: &JobCommand, clock_ms: u64) -> Result<CommandResult, StoreError> {
    let outcome = match command {
        JobCommand::Submit { name, spec } => submit(store, name, spec, clock_ms)?,
        JobCommand::Cancel { name } => cancel(store, name, clock_ms)?,
        JobCommand::Claim { name, session_id, worker } => claim(store, name, *session_id, worker, clock_ms)?,
        JobCommand::Checkpoint { name, task, lease, data } => checkpoint(store, name, *task, *lease, data)?,
        JobCommand::Complete { name, task, lease, outcome } => complete(store, name, *task, *lease, outcome, clock_ms)?,
        JobCommand::Release { name, task, lease } => release(store, name, *task, *lease)?,
    };
    Ok(outcome.map(Outcome::Job))
}

fn submit(
    store: &mut impl StateStore,
    name: &str,
    spec: &JobSpec,
    clock_ms: u64,
) -> Result<Result<JobOutcome, CommandError>, StoreError> {
    if let Err(why) = validate_job_name(name).and_then(|()| check_spec(spec)) {
        return Ok(Err(CommandError::InvalidRequest { why }));
    }
    if let Some(existing) = get_job(store, name)? {
        // The same submission retried (its first attempt applied) is not a conflict; the
        // request id normally answers it, this covers a retry after the dedup window.
        if existing.spec == *spec && existing.created_ms == clock_ms {
            return Ok(Ok(JobOutcome::Submitted));
        }
        return Ok(Err(CommandError::JobExists { name: name.to_string() }));
    }
    let count = crate::schema::get_u64(store, Table::Meta, META_JOB_COUNT)?;
    if count >= JOBS_MAX {
        return Ok(Err(CommandError::InvalidRequest {
            why: format!("the cluster already keeps {count} jobs, the limit; no more can be submitted"),
        }));
    }
    crate::schema::put_u64(store, Table::Meta, META_JOB_COUNT, count + 1)?;
    let job = JobRecord {
        spec: spec.clone(),
        created_ms: clock_ms,
        cancelled: false,
        finished_ms: 0,
        first_claim_ms: 0,
        done: 0,
        failed: 0,
        running: 0,
        attempts: 0,
        resumed_from_checkpoint: 0,
        lost_leases: 0,
        fenced: 0,
        speculative: 0,
        next_fresh: 0,
        stored_bytes: 0,
        completed_ms_total: 0,
        completed: 0,
        done_by_worker: BTreeMap::new(),
    };
    put_job(store, name, &job)?;
    Ok(Ok(JobOutcome::Submitted))
}

/// How many jobs the cluster keeps, for [`JOBS_MAX`].
pub const META_JOB_COUNT: &[u8] = b"job_count";

fn cancel(
    store: &mut impl StateStore,
    name: &str,
    clock_ms: u64,
) -> Result<Result<JobOutcome, CommandError>, StoreError> {
    let Some(mut job) = get_job(store, name)? else { return Ok(Err(job_not_found(name))) };
    if !job.cancelled && !job.is_over() {
        job.cancelled = true;
        job.finished_ms = clock_ms;
        put_job(store, name, &job)?;
    }
    // Leases of a cancelled job are not walked here (that would be work proportional to the
    // job): every checkpoint and result under them is refused from now on, their workers see
    // the job over at their next lease check, and their rows go with their sessions.
    Ok(Ok(JobOutcome::Cancelled { found: true }))
}

/// The worker (session) a task id prefers: the consistent-hash ring over the job's live
/// workers, keyed by the BLAKE3 of the job name and task id.
struct Placement {
    ring: mendfs_ring::Ring,
}

impl Placement {
    fn new(workers: &[u64]) -> Self {
        let nodes: Vec<mendfs_ring::RingNode> = workers
            .iter()
            .map(|&id| mendfs_ring::RingNode { id, zone: String::new(), weight: mendfs_ring::Ring::WEIGHT_NORMAL })
            .collect();
        Self { ring: mendfs_ring::Ring::with_vnodes(&nodes, RING_VNODES_PER_WORKER) }
    }

    fn owner(&self, name: &str, task: u64) -> Option<u64> {
        let hash = blake3::hash(&task_key(name, task));
        self.ring.place(hash.as_bytes(), 1).first().copied()
    }
}

/// The live workers (session ids) of a job.
fn job_workers(store: &impl StateStore, name: &str) -> Result<Vec<u64>, StoreError> {
    let prefix = job_prefix(name);
    let end = crate::schema::prefix_end(&prefix);
    store
        .range(Table::JobWorkers, &prefix, end.as_deref(), WORKERS_PER_JOB_MAX)?
        .iter()
        .map(|(k, _)| task_of(k))
        .collect()
}

fn holds_of(store: &impl StateStore, session_id: u64, limit: usize) -> Result<crate::schema::Rows, StoreError> {
    let prefix = session_id.to_be_bytes();
    let end = crate::schema::prefix_end(&prefix);
    store.range(Table::JobHolds, &prefix, end.as_deref(), limit)
}

/// A claim candidate: (prefers another worker, leases it has, task id), smallest first.
type Rank = (bool, usize, u64);

fn claim(
    store: &mut impl StateStore,
    name: &str,
    session_id: u64,
    worker: &str,
    clock_ms: u64,
) -> Result<Result<JobOutcome, CommandError>, StoreError> {
    let Some(mut job) = get_job(store, name)? else { return Ok(Err(job_not_found(name))) };
    if crate::kv::get_session(store, session_id)?.is_none() {
        return Ok(Err(CommandError::SessionNotFound { session_id }));
    }
    if job.is_over() {
        return Ok(Ok(JobOutcome::NothingToClaim { retry_after_ms: 0, over: true }));
    }
    if store.get(Table::JobWorkers, &worker_key(name, session_id))?.is_none() {
        if job_workers(store, name)?.len() >= WORKERS_PER_JOB_MAX {
            return Ok(Err(CommandError::InvalidRequest {
                why: format!("job {name} already has {WORKERS_PER_JOB_MAX} workers, the limit"),
            }));
        }
        store.put(Table::JobWorkers, &worker_key(name, session_id), worker.as_bytes())?;
        store.put(Table::JobHolds, &hold_key(session_id, name, REGISTRATION), &[])?;
    }
    if holds_of(store, session_id, LEASES_PER_SESSION_MAX + 2)?.len() > LEASES_PER_SESSION_MAX {
        return Ok(Err(CommandError::InvalidRequest {
            why: format!("session {session_id} already holds {LEASES_PER_SESSION_MAX} task leases, the limit"),
        }));
    }
    let placement = Placement::new(&job_workers(store, name)?);
    let mine = |task: u64| placement.owner(name, task).is_none_or(|owner| owner == session_id);

    let mut best: Option<(Rank, Option<TaskRecord>)> = None;
    let mut earliest_retry_ms: Option<u64> = None;
    let consider = |rank: Rank, record: Option<TaskRecord>, best: &mut Option<(Rank, Option<TaskRecord>)>| {
        if best.as_ref().is_none_or(|(current, _)| rank < *current) {
            *best = Some((rank, record));
        }
    };
    // Tasks already started that can take another attempt.
    let prefix = job_prefix(name);
    let end = crate::schema::prefix_end(&prefix);
    for (key, _) in store.range(Table::JobPending, &prefix, end.as_deref(), CLAIM_SCAN_MAX)? {
        let task = task_of(&key)?;
        let Some(record) = get_task(store, name, task)? else { continue };
        if record.leases.iter().any(|lease| lease.session_id == session_id) {
            continue;
        }
        if record.not_before_ms > clock_ms {
            let wait = record.not_before_ms - clock_ms;
            earliest_retry_ms = Some(earliest_retry_ms.map_or(wait, |w| w.min(wait)));
            continue;
        }
        consider((!mine(task), record.leases.len(), task), Some(record), &mut best);
    }
    // Fresh tasks past the frontier.
    let mut fresh_seen = 0;
    let mut task = job.next_fresh;
    while task < job.spec.tasks && fresh_seen < CLAIM_SCAN_MAX {
        if get_task(store, name, task)?.is_none() {
            fresh_seen += 1;
            consider((!mine(task), 0, task), None, &mut best);
            if mine(task) {
                // The first fresh task of one's own is the best fresh one; stealing looks no
                // further either, since the smallest id already ranks first among others'.
                break;
            }
        }
        task += 1;
    }
    let mut speculative = false;
    if best.is_none() && job.spec.redundancy == 1 && job.speculative < u64::from(job.spec.speculative_max) {
        if let Some((task, record)) = straggler(store, name, &job, session_id, clock_ms)? {
            best = Some(((true, 1, task), Some(record)));
            speculative = true;
        }
    }
    let Some(((_, _, task), record)) = best else {
        let retry_after_ms = earliest_retry_ms.unwrap_or(500).clamp(50, 5_000);
        return Ok(Ok(JobOutcome::NothingToClaim { retry_after_ms, over: false }));
    };
    let fresh = record.is_none();
    let mut record = record.unwrap_or(TaskRecord {
        state: TaskState::Active,
        leases: Vec::new(),
        claims: 0,
        failures: 0,
        not_before_ms: 0,
        checkpoint_attempt: 0,
        first_claim_ms: clock_ms,
        finished_ms: 0,
        result: Vec::new(),
        result_attempt: 0,
        result_worker: String::new(),
        stderr_tail: String::new(),
    });
    record.claims += 1;
    let lease = record.claims;
    if record.leases.is_empty() {
        job.running += 1;
    }
    record.leases.push(Lease { attempt: lease, session_id, worker: worker.to_string(), started_ms: clock_ms });
    let has_checkpoint = record.checkpoint_attempt != 0;
    if has_checkpoint {
        job.resumed_from_checkpoint += 1;
    }
    if speculative {
        job.speculative += 1;
    }
    job.attempts += 1;
    if job.first_claim_ms == 0 {
        job.first_claim_ms = clock_ms.max(1);
    }
    if record.leases.len() < job.spec.redundancy as usize {
        store.put(Table::JobPending, &task_key(name, task), &[])?;
    } else {
        store.remove(Table::JobPending, &task_key(name, task))?;
    }
    put_task(store, name, task, &record)?;
    store.put(Table::JobHolds, &hold_key(session_id, name, task), &lease.to_be_bytes())?;
    if fresh {
        let mut steps = 0;
        while job.next_fresh < job.spec.tasks && steps < CLAIM_SCAN_MAX {
            if get_task(store, name, job.next_fresh)?.is_none() {
                break;
            }
            job.next_fresh += 1;
            steps += 1;
        }
    }
    put_job(store, name, &job)?;
    Ok(Ok(JobOutcome::Claimed(Claim { task, lease, has_checkpoint, command: job.spec.command.clone(), speculative })))
}

/// A running task (one lease, not this session's) that has run far longer than the job's
/// completed tasks took on average: it gets a backup attempt.
fn straggler(
    store: &impl StateStore,
    name: &str,
    job: &JobRecord,
    session_id: u64,
    clock_ms: u64,
) -> Result<Option<(u64, TaskRecord)>, StoreError> {
    if job.completed == 0 {
        return Ok(None);
    }
    let threshold_ms =
        (job.completed_ms_total / job.completed).saturating_mul(SPECULATIVE_FACTOR).max(SPECULATIVE_MIN_MS);
    // The scan starts where the frontier was recently: tasks well below it finished long ago.
    let from = job.next_fresh.saturating_sub(SPECULATIVE_SCAN_MAX as u64 * 4);
    for (task, record) in list_tasks(store, name, from, SPECULATIVE_SCAN_MAX * 4)? {
        if record.state == TaskState::Active
            && record.leases.len() == 1
            && record.leases[0].session_id != session_id
            && clock_ms.saturating_sub(record.leases[0].started_ms) > threshold_ms
        {
            return Ok(Some((task, record)));
        }
    }
    Ok(None)
}

/// Why a lease-bound write is refused, if it is: the task, its job and the lease must be
/// current.
fn fence(
    store: &impl StateStore,
    name: &str,
    task: u64,
    lease: u64,
) -> Result<Result<(JobRecord, TaskRecord), CommandError>, StoreError> {
    let Some(job) = get_job(store, name)? else { return Ok(Err(job_not_found(name))) };
    let refuse = |why: String| Ok(Err(CommandError::LeaseLost { name: name.to_string(), task, lease, why }));
    if task >= job.spec.tasks {
        return Ok(Err(CommandError::InvalidRequest {
            why: format!("job {name} has tasks 0 to {}, not {task}", job.spec.tasks - 1),
        }));
    }
    if job.cancelled {
        return refuse("the job was cancelled".into());
    }
    let Some(record) = get_task(store, name, task)? else { return refuse("the task was never claimed".into()) };
    match record.state {
        TaskState::Done => {
            return refuse(format!("the task's result was already committed by attempt {}", record.result_attempt))
        }
        TaskState::Failed => return refuse("the task has failed for good".into()),
        TaskState::Active => {}
    }
    if !record.leases.iter().any(|held| held.attempt == lease) {
        let current: Vec<String> = record.leases.iter().map(|held| held.attempt.to_string()).collect();
        return refuse(format!(
            "the lease ended (its session expired or the attempt was replaced); current leases: [{}]",
            current.join(", ")
        ));
    }
    Ok(Ok((job, record)))
}

/// [`fence`] for a checkpoint or a result, counting a lease refusal in the job so that status
/// shows fencing at work.
fn fence_counted(
    store: &mut impl StateStore,
    name: &str,
    task: u64,
    lease: u64,
) -> Result<Result<(JobRecord, TaskRecord), CommandError>, StoreError> {
    let fenced = fence(store, name, task, lease)?;
    if let Err(CommandError::LeaseLost { .. }) = &fenced {
        if let Some(mut job) = get_job(store, name)? {
            job.fenced += 1;
            put_job(store, name, &job)?;
        }
    }
    Ok(fenced)
}

fn checkpoint(
    store: &mut impl StateStore,
    name: &str,
    task: u64,
    lease: u64,
    data: &[u8],
) -> Result<Result<JobOutcome, CommandError>, StoreError> {
    if data.len() > CHECKPOINT_BYTES_MAX {
        return Ok(Err(CommandError::InvalidRequest {
            why: format!("the checkpoint is {} bytes; the limit is {CHECKPOINT_BYTES_MAX}", data.len()),
        }));
    }
    let (mut job, mut record) = match fence_counted(store, name, task, lease)? {
        Ok(found) => found,
        Err(refused) => return Ok(Err(refused)),
    };
    let key = task_key(name, task);
    let old = store.get(Table::JobCheckpoints, &key)?.map_or(0, |old| old.len() as u64);
    let stored = job.stored_bytes - old.min(job.stored_bytes) + data.len() as u64;
    if stored > JOB_STORED_BYTES_MAX {
        return Ok(Err(CommandError::InvalidRequest {
            why: format!(
                "job {name} would hold {stored} bytes of results and checkpoints, over {JOB_STORED_BYTES_MAX}"
            ),
        }));
    }
    job.stored_bytes = stored;
    store.put(Table::JobCheckpoints, &key, data)?;
    record.checkpoint_attempt = lease;
    put_task(store, name, task, &record)?;
    put_job(store, name, &job)?;
    Ok(Ok(JobOutcome::CheckpointSaved))
}

fn complete(
    store: &mut impl StateStore,
    name: &str,
    task: u64,
    lease: u64,
    outcome: &TaskOutcome,
    clock_ms: u64,
) -> Result<Result<JobOutcome, CommandError>, StoreError> {
    let (mut job, mut record) = match fence_counted(store, name, task, lease)? {
        Ok(found) => found,
        Err(refused) => return Ok(Err(refused)),
    };
    let key = task_key(name, task);
    match outcome {
        TaskOutcome::Succeeded { stdout } => {
            if stdout.len() > RESULT_BYTES_MAX {
                return Ok(Err(CommandError::InvalidRequest {
                    why: format!("the result is {} bytes; the limit is {RESULT_BYTES_MAX}", stdout.len()),
                }));
            }
            let checkpoint = store.get(Table::JobCheckpoints, &key)?.map_or(0, |c| c.len() as u64);
            let stored = job.stored_bytes.saturating_sub(checkpoint) + stdout.len() as u64;
            if stored > JOB_STORED_BYTES_MAX {
                return Ok(Err(CommandError::InvalidRequest {
                    why: format!("job {name} would hold {stored} bytes of results, over {JOB_STORED_BYTES_MAX}"),
                }));
            }
            job.stored_bytes = stored;
            let worker = record
                .leases
                .iter()
                .find(|held| held.attempt == lease)
                .map(|held| held.worker.clone())
                .unwrap_or_default();
            // The task is won: every lease ends with it (the losers' later writes are fenced).
            for held in std::mem::take(&mut record.leases) {
                store.remove(Table::JobHolds, &hold_key(held.session_id, name, task))?;
            }
            record_winner(&mut record, lease, &worker, stdout, clock_ms);
            store.remove(Table::JobCheckpoints, &key)?;
            store.remove(Table::JobPending, &key)?;
            job.running = job.running.saturating_sub(1);
            job.done += 1;
            job.completed += 1;
            job.completed_ms_total += clock_ms.saturating_sub(record.first_claim_ms);
            let label = if job.done_by_worker.len() < WORKER_COUNTS_MAX || job.done_by_worker.contains_key(&worker) {
                worker
            } else {
                "other".to_string()
            };
            *job.done_by_worker.entry(label).or_default() += 1;
        }
        TaskOutcome::Failed { exit_code, stderr_tail } => {
            let why = match exit_code {
                Some(code) => format!("attempt {lease} exited with status {code}"),
                None => format!("attempt {lease} did not exit normally"),
            };
            end_attempt(store, name, &mut job, task, &mut record, lease, &why, stderr_tail, clock_ms, true)?;
        }
    }
    if job.done + job.failed >= job.spec.tasks && job.finished_ms == 0 {
        job.finished_ms = clock_ms.max(1);
    }
    put_task(store, name, task, &record)?;
    put_job(store, name, &job)?;
    Ok(Ok(JobOutcome::Completed))
}

fn release(
    store: &mut impl StateStore,
    name: &str,
    task: u64,
    lease: u64,
) -> Result<Result<JobOutcome, CommandError>, StoreError> {
    let (mut job, mut record) = match fence(store, name, task, lease)? {
        Ok(found) => found,
        Err(refused) => return Ok(Err(refused)),
    };
    let Some(position) = record.leases.iter().position(|held| held.attempt == lease) else {
        return Ok(Ok(JobOutcome::Released));
    };
    let held = record.leases.remove(position);
    store.remove(Table::JobHolds, &hold_key(held.session_id, name, task))?;
    if record.leases.is_empty() {
        job.running = job.running.saturating_sub(1);
    }
    store.put(Table::JobPending, &task_key(name, task), &[])?;
    put_task(store, name, task, &record)?;
    put_job(store, name, &job)?;
    Ok(Ok(JobOutcome::Released))
}

fn record_winner(record: &mut TaskRecord, lease: u64, worker: &str, stdout: &[u8], clock_ms: u64) {
    record.state = TaskState::Done;
    record.result = stdout.to_vec();
    record.result_attempt = lease;
    record.result_worker = worker.to_string();
    record.finished_ms = clock_ms;
    record.checkpoint_attempt = 0;
}

/// Ends attempt `lease` of a task without a result: a failed exit (`backoff`) or a lost lease.
/// The task fails for good after `max_attempts` such ends; otherwise it is claimable again.
#[allow(clippy::too_many_arguments)]
fn end_attempt(
    store: &mut impl StateStore,
    name: &str,
    job: &mut JobRecord,
    task: u64,
    record: &mut TaskRecord,
    lease: u64,
    why: &str,
    stderr_tail: &str,
    clock_ms: u64,
    backoff: bool,
) -> Result<(), StoreError> {
    let Some(position) = record.leases.iter().position(|held| held.attempt == lease) else { return Ok(()) };
    let held = record.leases.remove(position);
    store.remove(Table::JobHolds, &hold_key(held.session_id, name, task))?;
    record.failures += 1;
    let mut tail = format!("{why} on {}", held.worker);
    if !stderr_tail.is_empty() {
        tail.push_str(": ");
        tail.push_str(stderr_tail);
    }
    record.stderr_tail = truncate_tail(&tail, STDERR_TAIL_BYTES_MAX);
    let key = task_key(name, task);
    if record.failures >= job.spec.max_attempts {
        record.state = TaskState::Failed;
        record.finished_ms = clock_ms;
        for other in std::mem::take(&mut record.leases) {
            store.remove(Table::JobHolds, &hold_key(other.session_id, name, task))?;
        }
        store.remove(Table::JobPending, &key)?;
        store.put(Table::JobFailed, &key, &[])?;
        job.running = job.running.saturating_sub(1);
        job.failed += 1;
        return Ok(());
    }
    if backoff {
        let exponent = record.failures.saturating_sub(1).min(16);
        record.not_before_ms = clock_ms + (BACKOFF_BASE_MS << exponent).min(BACKOFF_MAX_MS);
    }
    if record.leases.is_empty() {
        job.running = job.running.saturating_sub(1);
    }
    store.put(Table::JobPending, &key, &[])?;
    Ok(())
}

/// The last `max` bytes of `text`, cut at a character boundary.
pub fn truncate_tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

/// A session ended (expired or closed): its registrations go, and every lease it held ends,
/// counted as a failed attempt of its task, which becomes claimable again at once. Called in
/// the same apply as the session's end, so no replica ever sees the session gone and its
/// leases alive.
pub fn release_session(store: &mut impl StateStore, session_id: u64, clock_ms: u64) -> Result<(), StoreError> {
    // A session holds at most LEASES_PER_SESSION_MAX leases plus one registration per job it
    // claimed in; the loop reads pages until none is left.
    loop {
        let rows = holds_of(store, session_id, CLAIM_SCAN_MAX)?;
        if rows.is_empty() {
            return Ok(());
        }
        for (key, value) in rows {
            store.remove(Table::JobHolds, &key)?;
            let rest = &key[8..];
            let task = task_of(rest)?;
            let name = std::str::from_utf8(&rest[..rest.len().saturating_sub(9)])
                .map_err(|e| StoreError(format!("job hold key: {e}")))?
                .to_string();
            if task == REGISTRATION {
                store.remove(Table::JobWorkers, &worker_key(&name, session_id))?;
                continue;
            }
            let lease = value.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0);
            let (Some(mut job), Some(mut record)) = (get_job(store, &name)?, get_task(store, &name, task)?) else {
                continue;
            };
            if record.state != TaskState::Active || job.cancelled {
                continue;
            }
            job.lost_leases += 1;
            let why = format!("attempt {lease} lost its lease (session {session_id} ended)");
            end_attempt(store, &name, &mut job, task, &mut record, lease, &why, "", clock_ms, false)?;
            if job.done + job.failed >= job.spec.tasks && job.finished_ms == 0 {
                job.finished_ms = clock_ms.max(1);
            }
            put_task(store, &name, task, &record)?;
            put_job(store, &name, &job)?;
        }
    }
}

#[cfg(test)]
mod tests;
