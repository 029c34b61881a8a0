//! `MetaNode`'s jobs face: the job commands through Raft and linearizable reads of jobs on
//! the leader, for the `Jobs` service.

use serde::{Deserialize, Serialize};

use super::{unexpected, LeaderRequest, LeaderResponse, MetaNode, Origin};
use crate::error::ApiError;
use crate::jobs::{self, Claim, JobCommand, JobOutcome, JobRecord, JobSpec, TaskOutcome, TaskRecord, TaskState};
use crate::schema::{self, CommandError, Outcome, StateStore};
use crate::state::{Command, RequestId};

/// Jobs one listing returns at most.
pub const JOBS_LISTED_MAX: usize = jobs::JOBS_MAX as usize;
/// Failed tasks a status shows (with their stderr tails).
pub const FAILURES_SHOWN_MAX: usize = 20;
/// Task rows one results page returns at most, and about how many bytes.
pub const RESULTS_PAGE_MAX: usize = 1_000;
pub const RESULTS_PAGE_BYTES_MAX: usize = 4 << 20;

/// A linearizable job read the leader serves; travels inside `LeaderRequest::Jobs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum JobRead {
    Status { name: String },
    List,
    Results { name: String, from_task: u64, limit: u32 },
    Lease { name: String, task: u64, lease: u64 },
    Checkpoint { name: String, task: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum JobAnswer {
    Status(Box<JobView>),
    List(Vec<JobView>),
    Results { tasks: Vec<(u64, TaskRecord)>, next_task: Option<u64> },
    Lease { current: bool, why: String },
    Checkpoint(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
}

/// A job as `job status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub name: String,
    pub record: JobRecord,
    /// The state clock at the read.
    pub now_ms: u64,
    pub live_workers: u64,
    /// Failed tasks (at most [`FAILURES_SHOWN_MAX`]) and their stderr tails.
    pub failures: Vec<(u64, String)>,
}

fn view(store: &impl StateStore, name: String, record: JobRecord, failures: bool) -> Result<JobView, ApiError> {
    let internal = ApiError::internal;
    let now_ms = schema::get_u64(store, schema::Table::Meta, schema::META_CLOCK_MS).map_err(internal)?;
    let prefix = {
        let mut prefix = name.as_bytes().to_vec();
        prefix.push(0);
        prefix
    };
    let end = schema::prefix_end(&prefix);
    let live_workers = store
        .range(schema::Table::JobWorkers, &prefix, end.as_deref(), jobs::WORKERS_PER_JOB_MAX)
        .map_err(internal)?
        .len() as u64;
    let mut shown = Vec::new();
    if failures && record.failed > 0 {
        for task in jobs::failed_tasks(store, &name, FAILURES_SHOWN_MAX).map_err(internal)? {
            let tail = jobs::get_task(store, &name, task).map_err(internal)?.map(|t| t.stderr_tail).unwrap_or_default();
            shown.push((task, tail));
        }
    }
    Ok(JobView { name, record, now_ms, live_workers, failures: shown })
}

/// Answers `read` from `store` (on the leader, behind its read-index barrier).
pub(crate) fn answer(store: &impl StateStore, read: JobRead) -> Result<JobAnswer, ApiError> {
    let internal = ApiError::internal;
    let job = |name: &str| -> Result<JobRecord, ApiError> {
        jobs::get_job(store, name)
            .map_err(internal)?
            .ok_or_else(|| ApiError::Command(CommandError::JobNotFound { name: name.to_string() }))
    };
    Ok(match read {
        JobRead::Status { name } => {
            let record = job(&name)?;
            JobAnswer::Status(Box::new(view(store, name, record, true)?))
        }
        JobRead::List => {
            let mut views = Vec::new();
            for (name, record) in jobs::list_jobs(store, None, JOBS_LISTED_MAX).map_err(internal)? {
                views.push(view(store, name, record, false)?);
            }
            JobAnswer::List(views)
        }
        JobRead::Results { name, from_task, limit } => {
            job(&name)?;
            let limit = (limit as usize).clamp(1, RESULTS_PAGE_MAX);
            let mut tasks = Vec::new();
            let mut bytes = 0usize;
            let mut next_task = None;
            for (task, record) in jobs::list_tasks(store, &name, from_task, limit + 1).map_err(internal)? {
                if tasks.len() == limit || (!tasks.is_empty() && bytes + record.result.len() > RESULTS_PAGE_BYTES_MAX) {
                    next_task = Some(task);
                    break;
                }
                bytes += record.result.len() + record.stderr_tail.len();
                tasks.push((task, record));
            }
            JobAnswer::Results { tasks, next_task }
        }
        JobRead::Lease { name, task, lease } => {
            let record = job(&name)?;
            let (current, why) = if record.cancelled {
                (false, "the job was cancelled".to_string())
            } else {
                match jobs::get_task(store, &name, task).map_err(internal)? {
                    None => (false, "the task was never claimed".to_string()),
                    Some(t) if t.state == TaskState::Done => {
                        (false, format!("the task's result was committed by attempt {}", t.result_attempt))
                    }
                    Some(t) if t.state == TaskState::Failed => (false, "the task failed for good".to_string()),
                    Some(t) if t.leases.iter().any(|held| held.attempt == lease) => (true, String::new()),
                    Some(_) => (false, "the lease ended (its session expired)".to_string()),
                }
            };
            JobAnswer::Lease { current, why }
        }
        JobRead::Checkpoint { name, task } => {
            job(&name)?;
            JobAnswer::Checkpoint(jobs::get_checkpoint(store, &name, task).map_err(internal)?)
        }
    })
}

fn job_outcome(outcome: Outcome) -> Result<JobOutcome, ApiError> {
    match outcome {
        Outcome::Job(outcome) => Ok(outcome),
        other => Err(unexpected("a job command", other)),
    }
}

/// What a claim got: a task under a lease, or when to ask again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimAnswer {
    Claimed(Claim),
    Nothing { retry_after_ms: u64, over: bool },
}

impl MetaNode {
    async fn job_read(&self, origin: Origin, read: JobRead) -> Result<JobAnswer, ApiError> {
        match self.serve_on_leader(LeaderRequest::Jobs(read), origin).await? {
            LeaderResponse::Jobs(answer) => Ok(answer),
            other => Err(unexpected("a job read", other)),
        }
    }

    async fn job_command(
        &self,
        origin: Origin,
        request_id: Option<RequestId>,
        command: JobCommand,
    ) -> Result<JobOutcome, ApiError> {
        job_outcome(self.execute(origin, request_id, Command::Job(command)).await?)
    }

    pub async fn job_submit(
        &self,
        origin: Origin,
        request_id: Option<RequestId>,
        name: String,
        spec: JobSpec,
    ) -> Result<(), ApiError> {
        self.job_command(origin, request_id, JobCommand::Submit { name, spec }).await.map(drop)
    }

    pub async fn job_cancel(
        &self,
        origin: Origin,
        request_id: Option<RequestId>,
        name: String,
    ) -> Result<(), ApiError> {
        self.job_command(origin, request_id, JobCommand::Cancel { name }).await.map(drop)
    }

    pub async fn job_claim(
        &self,
        origin: Origin,
        request_id: Option<RequestId>,
        name: String,
        session_id: u64,
        worker: String,
    ) -> Result<ClaimAnswer, ApiError> {
        match self.job_command(origin, request_id, JobCommand::Claim { name, session_id, worker }).await? {
            JobOutcome::Claimed(claim) => Ok(ClaimAnswer::Claimed(claim)),
            JobOutcome::NothingToClaim { retry_after_ms, over } => Ok(ClaimAnswer::Nothing { retry_after_ms, over }),
            other => Err(unexpected("a claim", other)),
        }
    }

    pub async fn job_checkpoint(
        &self,
        origin: Origin,
        request_id: Option<RequestId>,
        name: String,
        task: u64,
        lease: u64,
        data: Vec<u8>,
    ) -> Result<(), ApiError> {
        self.job_command(origin, request_id, JobCommand::Checkpoint { name, task, lease, data }).await.map(drop)
    }

    pub async fn job_complete(
        &self,
        origin: Origin,
        request_id: Option<RequestId>,
        name: String,
        task: u64,
        lease: u64,
        outcome: TaskOutcome,
    ) -> Result<(), ApiError> {
        self.job_command(origin, request_id, JobCommand::Complete { name, task, lease, outcome }).await.map(drop)
    }

    pub async fn job_release(
        &self,
        origin: Origin,
        request_id: Option<RequestId>,
        name: String,
        task: u64,
        lease: u64,
    ) -> Result<(), ApiError> {
        self.job_command(origin, request_id, JobCommand::Release { name, task, lease }).await.map(drop)
    }

    pub async fn job_status(&self, origin: Origin, name: String) -> Result<JobView, ApiError> {
        match self.job_read(origin, JobRead::Status { name }).await? {
            JobAnswer::Status(view) => Ok(*view),
            other => Err(unexpected("a job status", other)),
        }
    }

    pub async fn job_list(&self, origin: Origin) -> Result<Vec<JobView>, ApiError> {
        match self.job_read(origin, JobRead::List).await? {
            JobAnswer::List(views) => Ok(views),
            other => Err(unexpected("a job list", other)),
        }
    }

    pub async fn job_results(
        &self,
        origin: Origin,
        name: String,
        from_task: u64,
        limit: u32,
    ) -> Result<(Vec<(u64, TaskRecord)>, Option<u64>), ApiError> {
        match self.job_read(origin, JobRead::Results { name, from_task, limit }).await? {
            JobAnswer::Results { tasks, next_task } => Ok((tasks, next_task)),
            other => Err(unexpected("job results", other)),
        }
    }

    pub async fn job_lease(
        &self,
        origin: Origin,
        name: String,
        task: u64,
        lease: u64,
    ) -> Result<(bool, String), ApiError> {
        match self.job_read(origin, JobRead::Lease { name, task, lease }).await? {
            JobAnswer::Lease { current, why } => Ok((current, why)),
            other => Err(unexpected("a lease check", other)),
        }
    }

    pub async fn job_read_checkpoint(
        &self,
        origin: Origin,
        name: String,
        task: u64,
    ) -> Result<Option<Vec<u8>>, ApiError> {
        match self.job_read(origin, JobRead::Checkpoint { name, task }).await? {
            JobAnswer::Checkpoint(data) => Ok(data),
            other => Err(unexpected("a checkpoint read", other)),
        }
    }
}
