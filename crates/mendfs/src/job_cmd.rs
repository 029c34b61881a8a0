//! `mendfs job` (submit, status, results, wait, cancel, list, checkpoint) and `mendfs worker`,
//! which claims tasks of the cluster's jobs and runs their command.
//!
//! A worker holds one coordination session per job it works on (with the job's TTL): every
//! task it runs is leased under that session, and the cluster ends the leases with the
//! session. The worker runs each attempt's command in a process group of its own and kills
//! the group as soon as the attempt may no longer commit: the session is given up (the
//! client's keep-alive rule, before the cluster can expire it), the lease check says the task
//! was won elsewhere or the job cancelled, or the lease is gone. Whatever a command still
//! sends after that (an orphan of a killed worker, say) is refused by its lease's fencing
//! number on the leader, so a task commits exactly one result.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mendfs_client::jobs::{AttemptEnd, JobSpec, JobStatus};
use mendfs_client::{Client, Error as ClientError, Session};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cli::Connection;

/// Environment of a task's command.
const ENV_JOB: &str = "MENDFS_JOB";
const ENV_TASK: &str = "MENDFS_TASK";
const ENV_LEASE: &str = "MENDFS_JOB_LEASE";
const ENV_CHECKPOINT_IN: &str = "MENDFS_CHECKPOINT_IN";
const ENV_BIN: &str = "MENDFS_BIN";

/// Tries to report an attempt's end (each with the client's own retries and deadline) before
/// the worker gives the job's session up instead.
const REPORT_TRIES: u32 = 4;
/// Results read per page by `job results`.
const RESULTS_PAGE: u32 = 1_000;
/// How often `job wait` reads the status.
const WAIT_POLL: Duration = Duration::from_millis(300);

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// Record a job of N tasks (ids 0..N-1); workers run CMD once per task.
    Submit {
        name: String,
        /// Number of tasks.
        #[arg(long)]
        tasks: u64,
        /// Attempts of each task run at once, on different workers; the first result wins.
        #[arg(long, default_value_t = 1)]
        redundancy: u32,
        /// Attempts before a task is failed (non-zero exits and lost leases both count).
        #[arg(long, default_value_t = 3)]
        max_attempts: u32,
        /// Seconds a silent worker keeps its tasks before they go to another.
        #[arg(long, default_value_t = 10.0)]
        ttl: f64,
        /// Backup attempts for stragglers (redundancy 1): a task running over 3x the mean of
        /// completed ones (and over 2 s) gets one, this many per job at most.
        #[arg(long, default_value_t = 0)]
        speculative_max: u32,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Tasks done / running / pending / failed, attempts, resumed tasks, per-worker counts,
    /// throughput and ETA.
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Committed results (each task's stdout) in task order.
    Results {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Wait until the job is over; exit 0 if every task is done, 1 otherwise.
    Wait {
        name: String,
        /// Give up after this many seconds (default: wait as long as it takes).
        #[arg(long)]
        timeout_s: Option<f64>,
    },
    /// Cancel a job: no more claims, every running attempt's writes are refused and its
    /// workers stop it.
    Cancel { name: String },
    /// Every job with its counts.
    List {
        #[arg(long)]
        json: bool,
    },
    /// From a task's command: save FILE as the task's checkpoint (under the task's lease,
    /// from MENDFS_JOB, MENDFS_TASK and MENDFS_JOB_LEASE). At most 1 MiB.
    Checkpoint { file: PathBuf },
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// Tasks run at once.
    #[arg(long, default_value_t = 1)]
    pub slots: usize,
    /// Exit once no job has work left (rather than wait for new jobs).
    #[arg(long)]
    pub exit_when_idle: bool,
    /// Work only on this job.
    #[arg(long)]
    pub job: Option<String>,
    /// This worker's label in per-worker counts (default: host:pid).
    #[arg(long)]
    pub name: Option<String>,
}

pub async fn run_job(connection: Connection, command: JobCommand) -> Result<ExitCode> {
    let client = connection.client()?;
    match command {
        JobCommand::Submit { name, tasks, redundancy, max_attempts, ttl, speculative_max, command } => {
            anyhow::ensure!(ttl.is_finite() && ttl > 0.0, "--ttl must be a positive number of seconds");
            let spec = JobSpec {
                tasks,
                redundancy,
                max_attempts,
                ttl_ms: (ttl * 1000.0).round() as u64,
                command,
                speculative_max,
            };
            client.job_submit(&name, spec).await.with_context(|| format!("submit job {name}"))?;
            eprintln!("job {name} submitted: {tasks} tasks; run `mendfs worker` to work on it");
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Status { name, json } => {
            let status = client.job_status(&name).await.with_context(|| format!("status of job {name}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status_json(&status))?);
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Results { name, json } => {
            let mut all = Vec::new();
            let mut from = 0;
            loop {
                let (page, next) = client
                    .job_results_page(&name, from, RESULTS_PAGE)
                    .await
                    .with_context(|| format!("results of job {name}"))?;
                all.extend(page.into_iter().filter(|result| result.state == "done"));
                match next {
                    Some(next) => from = next,
                    None => break,
                }
            }
            if json {
                let results: Vec<_> = all
                    .iter()
                    .map(|result| {
                        json!({
                            "task": result.task,
                            "output": String::from_utf8_lossy(&result.output),
                            "worker": result.worker,
                            "attempt": result.attempt,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                for result in &all {
                    let output = String::from_utf8_lossy(&result.output);
                    println!("{}\t{}", result.task, output.trim_end_matches('\n'));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Wait { name, timeout_s } => {
            let deadline = timeout_s.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
            loop {
                let status = client.job_status(&name).await.with_context(|| format!("status of job {name}"))?;
                let tasks = status.spec.as_ref().map_or(0, |spec| spec.tasks);
                if status.cancelled || status.done + status.failed >= tasks {
                    print_status(&status);
                    return Ok(if status.done == tasks { ExitCode::SUCCESS } else { ExitCode::FAILURE });
                }
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    print_status(&status);
                    bail!("job {name} is not over after {:.1} s", timeout_s.unwrap_or_default());
                }
                tokio::time::sleep(WAIT_POLL).await;
            }
        }
        JobCommand::Cancel { name } => {
            client.job_cancel(&name).await.with_context(|| format!("cancel job {name}"))?;
            eprintln!("job {name} cancelled");
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::List { json } => {
            let jobs = client.job_list().await.context("list jobs")?;
            if json {
                let jobs: Vec<_> = jobs.iter().map(status_json).collect();
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                for job in &jobs {
                    let tasks = job.spec.as_ref().map_or(0, |spec| spec.tasks);
                    println!(
                        "{}\t{}\t{}/{} done\t{} failed\t{} running",
                        job.name,
                        state_word(job),
                        job.done,
                        tasks,
                        job.failed,
                        job.running
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Checkpoint { file } => {
            let var = |name: &str| {
                std::env::var(name).with_context(|| format!("{name} is not set: run this from a task's command"))
            };
            let (job, task, lease) = (var(ENV_JOB)?, var(ENV_TASK)?, var(ENV_LEASE)?);
            let task: u64 = task.parse().with_context(|| format!("{ENV_TASK}={task:?} is not a task id"))?;
            let lease: u64 = lease.parse().with_context(|| format!("{ENV_LEASE}={lease:?} is not a lease"))?;
            let data = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let limit = mendfs_meta::jobs::CHECKPOINT_BYTES_MAX;
            if data.len() > limit {
                bail!("checkpoint {} is {} bytes; the limit is {limit} bytes (1 MiB)", file.display(), data.len());
            }
            client
                .job_checkpoint(&job, task, lease, data)
                .await
                .with_context(|| format!("checkpoint of job {job} task {task}"))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn state_word(status: &JobStatus) -> &'static str {
    let tasks = status.spec.as_ref().map_or(0, |spec| spec.tasks);
    if status.cancelled {
        "cancelled"
    } else if status.done >= tasks {
        "done"
    } else if status.done + status.failed >= tasks {
        "failed"
    } else {
        "running"
    }
}

/// Tasks per second since the first claim, and the seconds left at that rate.
fn rate(status: &JobStatus) -> (f64, Option<f64>) {
    let tasks = status.spec.as_ref().map_or(0, |spec| spec.tasks);
    let end_ms = if status.finished_ms > 0 { status.finished_ms } else { status.now_ms };
    let elapsed_s = end_ms.saturating_sub(status.first_claim_ms) as f64 / 1000.0;
    if status.first_claim_ms == 0 || elapsed_s <= 0.0 {
        return (0.0, None);
    }
    let throughput = status.done as f64 / elapsed_s;
    let left = tasks.saturating_sub(status.done + status.failed) as f64;
    let eta = if throughput > 0.0 { Some(left / throughput) } else { None };
    (throughput, eta)
}

fn status_json(status: &JobStatus) -> serde_json::Value {
    let (throughput, eta) = rate(status);
    let spec = status.spec.clone().unwrap_or_default();
    let workers: serde_json::Map<String, serde_json::Value> =
        status.workers.iter().map(|w| (w.worker.clone(), json!(w.done))).collect();
    json!({
        "name": status.name,
        "state": state_word(status),
        "tasks": spec.tasks,
        "done": status.done,
        "running": status.running,
        "pending": status.pending,
        "failed": status.failed,
        "attempts": status.attempts,
        "resumed_from_checkpoint": status.resumed_from_checkpoint,
        "lost_leases": status.lost_leases,
        "fenced": status.fenced,
        "speculative": status.speculative,
        "redundancy": spec.redundancy,
        "max_attempts": spec.max_attempts,
        "ttl_ms": spec.ttl_ms,
        "command": spec.command,
        "live_workers": status.live_workers,
        "workers": workers,
        "throughput_tasks_per_s": throughput,
        "eta_s": eta,
        "failures": status.failures.iter().map(|f| json!({"task": f.task, "stderr_tail": f.stderr_tail})).collect::<Vec<_>>(),
    })
}

fn print_status(status: &JobStatus) {
    let spec = status.spec.clone().unwrap_or_default();
    let (throughput, eta) = rate(status);
    println!("job {}: {}", status.name, state_word(status));
    println!(
        "tasks {}: done {}, running {}, pending {}, failed {}",
        spec.tasks, status.done, status.running, status.pending, status.failed
    );
    println!(
        "attempts {}, resumed from checkpoint {}, lost leases {}, fenced writes {}, backups {}",
        status.attempts, status.resumed_from_checkpoint, status.lost_leases, status.fenced, status.speculative
    );
    let counts: Vec<String> = status.workers.iter().map(|w| format!("{} {}", w.worker, w.done)).collect();
    println!("workers: {} live; done by worker: {}", status.live_workers, counts.join(", "));
    match eta {
        Some(eta) if status.finished_ms == 0 => println!("throughput {throughput:.2} tasks/s, ETA {eta:.0} s"),
        _ => println!("throughput {throughput:.2} tasks/s"),
    }
    for failure in &status.failures {
        println!("task {} failed: {}", failure.task, failure.stderr_tail.trim_end());
    }
}

/// One job's session on this worker, and a signal that fires when it is over.
struct JobSession {
    session: Session,
    keep_alive: tokio::task::JoinHandle<ClientError>,
    lost: watch::Sender<bool>,
}

pub async fn run_worker(args: WorkerArgs) -> Result<ExitCode> {
    anyhow::ensure!((1..=1_024).contains(&args.slots), "--slots must be 1 to 1024");
    let client = args.connection.client()?;
    let label = args.name.clone().unwrap_or_else(|| format!("{}:{}", hostname(), std::process::id()));
    let env = TaskEnv::new(&args)?;
    let mut sessions: HashMap<String, JobSession> = HashMap::new();
    let mut running: JoinSet<(String, bool)> = JoinSet::new();
    let mut running_by_job: HashMap<String, usize> = HashMap::new();
    let mut rotation = 0usize;
    let (stopping, _) = watch::channel(false);
    let mut terminate = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
    eprintln!("worker {label}: {} slot(s)", args.slots);
    loop {
        while let Some(finished) = running.try_join_next() {
            reaped(finished, &mut running_by_job, &mut sessions, &label).await;
        }
        // A session whose keep-alive task ended is over: stop its attempts, open another later.
        sessions.retain(|job, held| {
            if held.keep_alive.is_finished() {
                eprintln!("worker {label}: session {} of job {job} lost; stopping its tasks", held.session.id());
                let _ = held.lost.send(true);
                false
            } else {
                true
            }
        });
        let jobs = match client.job_list().await {
            Ok(jobs) => jobs,
            Err(e) => {
                eprintln!("worker {label}: cannot list jobs: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let active: Vec<JobStatus> = jobs
            .into_iter()
            .filter(|job| args.job.as_ref().is_none_or(|only| *only == job.name))
            .filter(|job| !job.cancelled && job.finished_ms == 0)
            .collect();
        // Sessions of jobs that are over and have nothing running here are closed, which
        // withdraws this worker from their placement.
        let over: Vec<String> = sessions
            .keys()
            .filter(|name| !active.iter().any(|job| &job.name == *name))
            .filter(|name| running_by_job.get(*name).copied().unwrap_or(0) == 0)
            .cloned()
            .collect();
        for name in over {
            if let Some(held) = sessions.remove(&name) {
                held.keep_alive.abort();
                let _ = held.session.close().await;
            }
        }
        if active.is_empty() && running.is_empty() && args.exit_when_idle {
            eprintln!("worker {label}: no work left; exiting");
            let _ = std::fs::remove_dir_all(&env.scratch);
            return Ok(ExitCode::SUCCESS);
        }
        let mut wait = Duration::from_secs(1);
        if !active.is_empty() {
            rotation = rotation.wrapping_add(1);
            for i in 0..active.len() {
                let job = &active[(rotation + i) % active.len()];
                // Nothing unleased, and no second or backup attempt wanted: a claim would only
                // be a Raft write answering "nothing".
                let spec = job.spec.clone().unwrap_or_default();
                if job.pending == 0 && spec.redundancy <= 1 && spec.speculative_max == 0 {
                    continue;
                }
                while running.len() < args.slots {
                    let ttl = Duration::from_millis(job.spec.as_ref().map_or(10_000, |spec| spec.ttl_ms));
                    if !sessions.contains_key(&job.name) {
                        match client.open_session(ttl).await {
                            Ok(session) => {
                                let keep_alive = session.keep_alive_in_background();
                                let (lost, _) = watch::channel(false);
                                sessions.insert(job.name.clone(), JobSession { session, keep_alive, lost });
                            }
                            Err(e) => {
                                eprintln!("worker {label}: cannot open a session for job {}: {e}", job.name);
                                break;
                            }
                        }
                    }
                    let Some(held) = sessions.get(&job.name) else { break };
                    let claim = match client.job_claim(&job.name, held.session.id(), &label).await {
                        Ok(claim) => claim,
                        Err(e) => {
                            eprintln!("worker {label}: claim in job {} failed: {e}", job.name);
                            // A claim that timed out may have been applied: a lease this
                            // worker does not know of would be held for as long as the
                            // session lives. Ending the session ends it (and this worker's
                            // other attempts of the job, which are retried elsewhere).
                            if matches!(e, ClientError::SessionNotFound(_) | ClientError::Timeout { .. }) {
                                abandon_session(&mut sessions, &job.name, &label).await;
                            }
                            break;
                        }
                    };
                    if !claim.claimed {
                        if !claim.over {
                            wait = wait.min(Duration::from_millis(claim.retry_after_ms.max(50)));
                        }
                        break;
                    }
                    let attempt = Attempt {
                        client: client.clone(),
                        job: job.name.clone(),
                        task: claim.task,
                        lease: claim.lease,
                        has_checkpoint: claim.has_checkpoint,
                        command: claim.command,
                        check_every: (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)),
                        lost: held.lost.subscribe(),
                        stopping: stopping.subscribe(),
                        env: env.clone(),
                        label: label.clone(),
                    };
                    *running_by_job.entry(job.name.clone()).or_default() += 1;
                    let name = job.name.clone();
                    running.spawn(async move {
                        let abandon = attempt.run().await;
                        (name, abandon)
                    });
                }
            }
        }
        if running.len() >= args.slots || active.is_empty() {
            wait = Duration::from_secs(1);
        }
        tokio::select! {
            Some(finished) = running.join_next(), if !running.is_empty() => {
                reaped(finished, &mut running_by_job, &mut sessions, &label).await;
            }
            () = tokio::time::sleep(wait) => {}
            _ = terminate.recv() => {
                let code = stop_worker(&label, &stopping, sessions, running, 143).await;
                let _ = std::fs::remove_dir_all(&env.scratch);
                return Ok(code);
            }
            _ = interrupt.recv() => {
                let code = stop_worker(&label, &stopping, sessions, running, 130).await;
                let _ = std::fs::remove_dir_all(&env.scratch);
                return Ok(code);
            }
        }
    }
}

/// How long a stopping worker waits for its commands to be killed before it closes its
/// sessions anyway.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Stops a worker on SIGTERM or SIGINT: its commands are killed and their leases given back
/// (not counted as failed attempts), then its sessions are closed, which ends whatever lease
/// is left, so the tasks go to other workers now rather than after the TTL.
async fn stop_worker(
    label: &str,
    stopping: &watch::Sender<bool>,
    sessions: HashMap<String, JobSession>,
    mut running: JoinSet<(String, bool)>,
    code: u8,
) -> ExitCode {
    eprintln!("worker {label}: stopping: killing {} running task(s), releasing their leases", running.len());
    let _ = stopping.send(true);
    let _ = tokio::time::timeout(STOP_GRACE, async { while running.join_next().await.is_some() {} }).await;
    for (_, held) in sessions {
        held.keep_alive.abort();
        let _ = held.session.close().await;
    }
    ExitCode::from(code)
}

/// Accounts for a finished attempt; one whose end could not be reported costs its job's
/// session (see [`Attempt::run`]).
async fn reaped(
    finished: Result<(String, bool), tokio::task::JoinError>,
    running_by_job: &mut HashMap<String, usize>,
    sessions: &mut HashMap<String, JobSession>,
    label: &str,
) {
    let Ok((job, abandon)) = finished else { return };
    if let Some(count) = running_by_job.get_mut(&job) {
        *count = count.saturating_sub(1);
    }
    if abandon {
        abandon_session(sessions, &job, label).await;
    }
}

/// Ends this worker's session for `job`: its attempts there are stopped, and the cluster ends
/// every lease it held at once (or at its TTL if the close does not get through).
async fn abandon_session(sessions: &mut HashMap<String, JobSession>, job: &str, label: &str) {
    if let Some(held) = sessions.remove(job) {
        eprintln!("worker {label}: giving up session {} of job {job}", held.session.id());
        held.keep_alive.abort();
        let _ = held.lost.send(true);
        let _ = held.session.close().await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "worker".to_string())
}

/// What a task's command finds in its environment besides the task: how to reach the cluster
/// (so that `$MENDFS_BIN job checkpoint FILE` works) and the binary itself.
#[derive(Clone)]
struct TaskEnv {
    vars: Vec<(String, String)>,
    scratch: PathBuf,
}

impl TaskEnv {
    fn new(args: &WorkerArgs) -> Result<Self> {
        let cluster = &args.connection.cluster;
        let mut vars = vec![("MENDFS_ENDPOINTS".to_string(), cluster.endpoints.join(","))];
        if let Ok(bin) = std::env::current_exe() {
            vars.push((ENV_BIN.to_string(), bin.display().to_string()));
        }
        // The command calls the cluster with this worker's credentials (its checkpoints are
        // bound to the lease, so these let it do no more than the worker could).
        if let Some(token) = &cluster.token {
            vars.push(("MENDFS_TOKEN".to_string(), token.clone()));
        }
        if let Some(secret) = crate::cli::read_secret(cluster.secret_file.as_ref())? {
            vars.push(("MENDFS_SECRET".to_string(), secret));
        }
        Ok(Self { vars, scratch: new_scratch_dir()? })
    }
}

/// A fresh directory for a worker's checkpoint files that only this user can enter, under an
/// unguessable name: a fixed name in a shared temp directory could be made in advance by
/// another local user (as a directory they can read, or a link to one), who would then read
/// and swap the tasks' checkpoints. The worker removes it when it stops; a killed worker
/// leaves it behind.
fn new_scratch_dir() -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    // tempfile makes a directory with the default mode (0755 under the usual umask) unless told.
    Ok(tempfile::Builder::new()
        .prefix("mendfs-worker-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .context("cannot create the worker's scratch directory")?
        .keep())
}

/// One attempt of one task on this worker.
struct Attempt {
    client: Client,
    job: String,
    task: u64,
    lease: u64,
    has_checkpoint: bool,
    command: Vec<String>,
    check_every: Duration,
    lost: watch::Receiver<bool>,
    stopping: watch::Receiver<bool>,
    env: TaskEnv,
    label: String,
}

/// Why a running attempt was stopped.
enum Stopped {
    Exited(std::process::ExitStatus),
    LeaseGone(String),
    /// The worker is stopping: the command is killed and the lease given back.
    WorkerStopping,
}

impl Attempt {
    /// Runs the attempt and reports how it ended. True if the attempt's end could not be
    /// reported: its lease may still be held, and only ending the session ends it.
    async fn run(mut self) -> bool {
        let what = format!("job {} task {} (lease {})", self.job, self.task, self.lease);
        let checkpoint_in = self.env.scratch.join(format!("{}.{}.{}.checkpoint", self.job, self.task, self.lease));
        if self.has_checkpoint {
            match self.client.job_read_checkpoint(&self.job, self.task).await {
                Ok(Some(data)) => {
                    if let Err(e) = std::fs::write(&checkpoint_in, data) {
                        eprintln!("worker {}: {what}: cannot write its checkpoint: {e}", self.label);
                    }
                }
                Ok(None) => {}
                Err(e) => eprintln!("worker {}: {what}: cannot read its checkpoint: {e}", self.label),
            }
        }
        let end = self.execute(&what, &checkpoint_in).await;
        let _ = std::fs::remove_file(&checkpoint_in);
        let Some(end) = end else { return false };
        // Each try carries a new request id; a result applied by an earlier try makes the
        // next one answer "lease not current", which ends the loop too.
        for attempt in 0..REPORT_TRIES {
            match self.client.job_complete(&self.job, self.task, self.lease, end.clone()).await {
                Ok(()) => return false,
                Err(ClientError::LeaseLost(why)) => {
                    eprintln!("worker {}: {what}: result refused: {why}", self.label);
                    return false;
                }
                Err(e) => {
                    eprintln!("worker {}: {what}: cannot report the attempt (try {}): {e}", self.label, attempt + 1);
                    tokio::time::sleep(Duration::from_secs(1 << attempt.min(4))).await;
                }
            }
        }
        true
    }

    /// Runs the command; None if the attempt was stopped and has nothing to report.
    async fn execute(&mut self, what: &str, checkpoint_in: &std::path::Path) -> Option<AttemptEnd> {
        let Some(program) = self.command.first() else {
            let message = "mendfs worker: the job has no command".to_string();
            return Some(AttemptEnd::Failed { exit_code: None, stderr_tail: message.into_bytes() });
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(&self.command[1..])
            .envs(self.env.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(ENV_JOB, &self.job)
            .env(ENV_TASK, self.task.to_string())
            .env(ENV_LEASE, self.lease.to_string())
            .env_remove(ENV_CHECKPOINT_IN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so that stopping it stops whatever it started too.
            .process_group(0)
            .kill_on_drop(true);
        if checkpoint_in.exists() {
            command.env(ENV_CHECKPOINT_IN, checkpoint_in);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let reason = match e.kind() {
                    std::io::ErrorKind::NotFound => "No such file or directory".to_string(),
                    std::io::ErrorKind::PermissionDenied => "Permission denied".to_string(),
                    _ => e.to_string(),
                };
                let message = format!("mendfs worker: cannot run {program:?}: {reason}");
                eprintln!("worker {}: {what}: {message}", self.label);
                return Some(AttemptEnd::Failed { exit_code: None, stderr_tail: message.into_bytes() });
            }
        };
        let pid = child.id();
        let stdout =
            child.stdout.take().map(|out| tokio::spawn(read_bounded(out, mendfs_meta::jobs::RESULT_BYTES_MAX)));
        let stderr =
            child.stderr.take().map(|err| tokio::spawn(read_tail(err, mendfs_meta::jobs::STDERR_TAIL_BYTES_MAX)));
        let mut check = tokio::time::interval(self.check_every);
        check.tick().await;
        let stopped = loop {
            tokio::select! {
                biased;
                status = child.wait() => match status {
                    Ok(status) => break Stopped::Exited(status),
                    Err(e) => break Stopped::LeaseGone(format!("cannot wait for the command: {e}")),
                },
                _ = self.lost.changed() => break Stopped::LeaseGone("the worker's session was lost".into()),
                _ = self.stopping.changed() => break Stopped::WorkerStopping,
                _ = check.tick() => {
                    match self.client.job_lease(&self.job, self.task, self.lease).await {
                        Ok((true, _)) => {}
                        Ok((false, why)) => break Stopped::LeaseGone(why),
                        // A failed check proves nothing; the session's own rule decides.
                        Err(_) => {}
                    }
                }
            }
        };
        // A command that ended on its own while the worker was not looking (paused, say) has
        // a result to report even though the lease is gone: the cluster decides, by its
        // fencing number, whether it still counts.
        let stopped = match stopped {
            Stopped::LeaseGone(why) => match child.try_wait() {
                Ok(Some(status)) => Stopped::Exited(status),
                _ => Stopped::LeaseGone(why),
            },
            exited => exited,
        };
        match stopped {
            Stopped::WorkerStopping => {
                kill_group(pid);
                let _ = child.wait().await;
                match self.client.job_release(&self.job, self.task, self.lease).await {
                    Ok(()) => eprintln!("worker {}: {what}: stopped and released", self.label),
                    Err(e) => eprintln!("worker {}: {what}: stopped; cannot release the lease: {e}", self.label),
                }
                None
            }
            Stopped::LeaseGone(why) => {
                kill_group(pid);
                let _ = child.wait().await;
                eprintln!("worker {}: {what}: stopped: {why}", self.label);
                None
            }
            Stopped::Exited(status) => {
                let (out, overflow) = match stdout {
                    Some(reader) => reader.await.unwrap_or_default(),
                    None => (Vec::new(), false),
                };
                let err = match stderr {
                    Some(reader) => reader.await.unwrap_or_default(),
                    None => Vec::new(),
                };
                if status.success() && !overflow {
                    Some(AttemptEnd::Succeeded { stdout: out })
                } else if status.success() {
                    let message = format!(
                        "mendfs worker: the output is over the {} byte limit of a result",
                        mendfs_meta::jobs::RESULT_BYTES_MAX
                    );
                    Some(AttemptEnd::Failed { exit_code: Some(0), stderr_tail: message.into_bytes() })
                } else {
                    Some(AttemptEnd::Failed { exit_code: status.code(), stderr_tail: err })
                }
            }
        }
    }
}

/// Kills the process group of a command that has not been reaped yet (so its group id cannot
/// be anyone else's).
fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|pid| i32::try_from(pid).ok()).and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Reads everything, keeping the first `max` bytes; the flag says whether there was more.
async fn read_bounded(mut reader: impl tokio::io::AsyncRead + Unpin, max: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut buffer = vec![0u8; 16 * 1024];
    let mut overflow = false;
    while let Ok(n) = reader.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let room = max.saturating_sub(kept.len());
        kept.extend_from_slice(&buffer[..n.min(room)]);
        overflow |= n > room;
    }
    (kept, overflow)
}

/// Reads everything, keeping the last `max` bytes.
async fn read_tail(mut reader: impl tokio::io::AsyncRead + Unpin, max: usize) -> Vec<u8> {
    let mut tail: Vec<u8> = Vec::new();
    let mut buffer = vec![0u8; 16 * 1024];
    while let Ok(n) = reader.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buffer[..n]);
        if tail.len() > max {
            tail.drain(..tail.len() - max);
        }
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn each_worker_gets_its_own_private_scratch_dir() {
        let (first, second) = (new_scratch_dir().unwrap(), new_scratch_dir().unwrap());
        assert_ne!(first, second, "two workers of one process must not share a scratch directory");
        for dir in [&first, &second] {
            let metadata = std::fs::symlink_metadata(dir).unwrap();
            assert!(metadata.is_dir(), "{} is not a plain directory", dir.display());
            assert_eq!(metadata.permissions().mode() & 0o777, 0o700, "{} is open to other users", dir.display());
        }
        for dir in [first, second] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
