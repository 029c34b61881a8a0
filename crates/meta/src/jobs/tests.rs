//! The job state machine through `state::apply`, over [`MemoryStore`]: leases, fencing,
//! retries, redundancy, session expiry, and a property test of exactly-once results.

use proptest::prelude::*;

use super::*;
use crate::schema::MemoryStore;
use crate::state::{apply as apply_proposal, Command, Proposal};

fn at(store: &mut MemoryStore, clock_ms: u64, command: Command) -> CommandResult {
    apply_proposal(store, &Proposal { request_id: None, proposed_at_ms: clock_ms, command }).expect("memory store")
}

fn job(store: &mut MemoryStore, clock_ms: u64, command: JobCommand) -> CommandResult {
    at(store, clock_ms, Command::Job(command))
}

fn spec(tasks: u64, redundancy: u32, max_attempts: u32) -> JobSpec {
    JobSpec { tasks, redundancy, max_attempts, ttl_ms: 2_000, command: vec!["true".into()], speculative_max: 0 }
}

fn submit(store: &mut MemoryStore, name: &str, spec: JobSpec) -> CommandResult {
    job(store, 1, JobCommand::Submit { name: name.into(), spec })
}

fn session(store: &mut MemoryStore) -> u64 {
    match at(store, 1, Command::SessionOpen { ttl_ms: 2_000 }) {
        Ok(Outcome::SessionOpened { session_id, .. }) => session_id,
        other => panic!("session open: {other:?}"),
    }
}

fn claim(store: &mut MemoryStore, clock_ms: u64, name: &str, session_id: u64) -> Option<Claim> {
    let worker = format!("w{session_id}");
    match job(store, clock_ms, JobCommand::Claim { name: name.into(), session_id, worker }) {
        Ok(Outcome::Job(JobOutcome::Claimed(claim))) => Some(claim),
        Ok(Outcome::Job(JobOutcome::NothingToClaim { .. })) | Err(CommandError::SessionNotFound { .. }) => None,
        other => panic!("claim: {other:?}"),
    }
}

fn succeed(store: &mut MemoryStore, clock_ms: u64, name: &str, task: u64, lease: u64, out: &str) -> CommandResult {
    let outcome = TaskOutcome::Succeeded { stdout: out.as_bytes().to_vec() };
    job(store, clock_ms, JobCommand::Complete { name: name.into(), task, lease, outcome })
}

fn fail(store: &mut MemoryStore, clock_ms: u64, name: &str, task: u64, lease: u64) -> CommandResult {
    let outcome = TaskOutcome::Failed { exit_code: Some(1), stderr_tail: "boom".into() };
    job(store, clock_ms, JobCommand::Complete { name: name.into(), task, lease, outcome })
}

fn save(store: &mut MemoryStore, name: &str, task: u64, lease: u64, data: &[u8]) -> CommandResult {
    job(store, 2, JobCommand::Checkpoint { name: name.into(), task, lease, data: data.to_vec() })
}

fn record(store: &MemoryStore, name: &str) -> JobRecord {
    get_job(store, name).expect("read").expect("job exists")
}

#[test]
fn bad_submissions_are_refused_with_a_reason() {
    let mut store = MemoryStore::default();
    let zero = submit(&mut store, "j", spec(0, 1, 1));
    assert!(
        matches!(&zero, Err(CommandError::InvalidRequest { why }) if why.contains("at least one task")),
        "{zero:?}"
    );
    assert!(submit(&mut store, "bad/name", spec(1, 1, 1)).is_err());
    assert!(submit(&mut store, "j", spec(TASKS_PER_JOB_MAX + 1, 1, 1)).is_err());
    assert!(submit(&mut store, "j", spec(1, REDUNDANCY_MAX + 1, 1)).is_err());
    assert_eq!(submit(&mut store, "j", spec(3, 1, 1)), Ok(Outcome::Job(JobOutcome::Submitted)));
    let again = job(&mut store, 5, JobCommand::Submit { name: "j".into(), spec: spec(4, 1, 1) });
    assert_eq!(again, Err(CommandError::JobExists { name: "j".into() }));
    let s = session(&mut store);
    assert_eq!(
        job(&mut store, 2, JobCommand::Claim { name: "nope".into(), session_id: s, worker: "w".into() }),
        Err(CommandError::JobNotFound { name: "nope".into() })
    );
    let big = vec![0u8; CHECKPOINT_BYTES_MAX + 1];
    assert!(JobCommand::Checkpoint { name: "j".into(), task: 0, lease: 1, data: big }.check().is_err());
}

#[test]
fn a_claim_needs_a_live_session_and_every_task_commits_once() {
    let mut store = MemoryStore::default();
    submit(&mut store, "j", spec(2, 1, 3)).expect("submit");
    assert!(matches!(
        job(&mut store, 2, JobCommand::Claim { name: "j".into(), session_id: 99, worker: "w".into() }),
        Err(CommandError::SessionNotFound { session_id: 99 })
    ));
    let s = session(&mut store);
    let first = claim(&mut store, 2, "j", s).expect("a task");
    let second = claim(&mut store, 2, "j", s).expect("another task");
    assert_ne!(first.task, second.task);
    assert!(claim(&mut store, 2, "j", s).is_none(), "both tasks are leased");
    succeed(&mut store, 3, "j", first.task, first.lease, "a").expect("first result");
    assert!(matches!(
        succeed(&mut store, 3, "j", first.task, first.lease, "again"),
        Err(CommandError::LeaseLost { .. })
    ));
    succeed(&mut store, 4, "j", second.task, second.lease, "b").expect("second result");
    let done = record(&store, "j");
    assert_eq!((done.done, done.running, done.pending(), done.fenced), (2, 0, 0, 1));
    assert!(done.is_over() && done.finished_ms > 0);
    assert_eq!(get_task(&store, "j", first.task).expect("read").expect("row").result, b"a");
}

#[test]
fn an_expired_session_loses_its_leases_and_its_zombie_writes_are_fenced() {
    let mut store = MemoryStore::default();
    submit(&mut store, "j", spec(1, 1, 3)).expect("submit");
    let (zombie, other) = (session(&mut store), session(&mut store));
    let lost = claim(&mut store, 2, "j", zombie).expect("claimed");
    save(&mut store, "j", 0, lost.lease, b"3").expect("checkpoint under a live lease");
    at(&mut store, 5, Command::SessionExpire { session_id: zombie }).expect("expire");
    let resumed = claim(&mut store, 6, "j", other).expect("claimable again at once");
    assert!(resumed.has_checkpoint);
    assert!(resumed.lease > lost.lease, "fencing tokens grow");
    assert!(matches!(save(&mut store, "j", 0, lost.lease, b"9"), Err(CommandError::LeaseLost { .. })));
    assert!(matches!(succeed(&mut store, 7, "j", 0, lost.lease, "zombie"), Err(CommandError::LeaseLost { .. })));
    assert_eq!(get_checkpoint(&store, "j", 0).expect("read"), Some(b"3".to_vec()), "the zombie wrote nothing");
    succeed(&mut store, 8, "j", 0, resumed.lease, "right").expect("result");
    let done = record(&store, "j");
    assert_eq!((done.done, done.resumed_from_checkpoint, done.lost_leases, done.fenced), (1, 1, 1, 2));
    let holds = store.range(Table::JobHolds, &[], None, 10).expect("holds");
    assert!(holds.iter().all(|(key, _)| task_of(key).ok() == Some(REGISTRATION)), "no lease held after the end");
}

#[test]
fn failures_back_off_then_fail_the_task_with_its_stderr() {
    let mut store = MemoryStore::default();
    submit(&mut store, "j", spec(1, 1, 2)).expect("submit");
    let s = session(&mut store);
    let first = claim(&mut store, 10, "j", s).expect("claimed");
    fail(&mut store, 10, "j", 0, first.lease).expect("failure recorded");
    assert!(claim(&mut store, 10 + BACKOFF_BASE_MS - 1, "j", s).is_none(), "backing off");
    let second = claim(&mut store, 10 + BACKOFF_BASE_MS, "j", s).expect("retried after the backoff");
    fail(&mut store, 700, "j", 0, second.lease).expect("failure recorded");
    let over = record(&store, "j");
    assert_eq!((over.failed, over.done, over.running), (1, 0, 0));
    assert!(over.is_over());
    let task = get_task(&store, "j", 0).expect("read").expect("row");
    assert_eq!(task.state, TaskState::Failed);
    assert!(task.stderr_tail.contains("boom"), "{}", task.stderr_tail);
    assert_eq!(failed_tasks(&store, "j", 10).expect("failed"), vec![0]);
}

#[test]
fn redundant_attempts_run_together_and_the_first_result_wins() {
    let mut store = MemoryStore::default();
    submit(&mut store, "j", spec(1, 2, 3)).expect("submit");
    let (a, b) = (session(&mut store), session(&mut store));
    let first = claim(&mut store, 2, "j", a).expect("first attempt");
    assert!(claim(&mut store, 2, "j", a).is_none(), "one session runs a task once");
    let second = claim(&mut store, 2, "j", b).expect("second attempt");
    assert_eq!(first.task, second.task);
    succeed(&mut store, 3, "j", 0, second.lease, "b").expect("winner");
    assert!(matches!(succeed(&mut store, 4, "j", 0, first.lease, "a"), Err(CommandError::LeaseLost { .. })));
    let done = record(&store, "j");
    assert_eq!((done.done, done.attempts), (1, 2));
    assert_eq!(get_task(&store, "j", 0).expect("read").expect("row").result, b"b");
}

#[test]
fn a_worker_prefers_its_own_tasks_and_steals_when_it_has_none() {
    let mut store = MemoryStore::default();
    submit(&mut store, "j", spec(40, 1, 3)).expect("submit");
    let (a, b) = (session(&mut store), session(&mut store));
    // Both register before either takes its share.
    let first_a = claim(&mut store, 2, "j", a).expect("a");
    let first_b = claim(&mut store, 2, "j", b).expect("b");
    let placement = Placement::new(&[a, b]);
    assert_eq!(placement.owner("j", first_b.task), Some(b), "b took one of its own");
    let mut taken = vec![first_a.task, first_b.task];
    while let Some(next) = claim(&mut store, 3, "j", a) {
        taken.push(next.task);
    }
    taken.sort_unstable();
    taken.dedup();
    assert_eq!(taken.len(), 40, "a stole everything left once it had nothing of its own");
}

#[test]
fn a_straggler_gets_one_backup_attempt() {
    let mut store = MemoryStore::default();
    let mut job_spec = spec(3, 1, 3);
    job_spec.speculative_max = 1;
    submit(&mut store, "j", job_spec).expect("submit");
    let (a, b) = (session(&mut store), session(&mut store));
    let slow = claim(&mut store, 10, "j", a).expect("slow");
    let fast = claim(&mut store, 10, "j", b).expect("fast");
    succeed(&mut store, 110, "j", fast.task, fast.lease, "x").expect("done in 100 ms");
    let last = claim(&mut store, 110, "j", b).expect("last");
    succeed(&mut store, 210, "j", last.task, last.lease, "x").expect("done in 100 ms");
    assert!(claim(&mut store, 1_000, "j", b).is_none(), "not yet a straggler");
    let backup = claim(&mut store, 10 + SPECULATIVE_MIN_MS + 1, "j", b).expect("backup");
    assert!(backup.speculative && backup.task == slow.task);
    assert!(claim(&mut store, 10_000, "j", b).is_none(), "bounded by --speculative-max");
    succeed(&mut store, 10_001, "j", slow.task, backup.lease, "x").expect("backup wins");
    assert!(matches!(
        succeed(&mut store, 10_002, "j", slow.task, slow.lease, "x"),
        Err(CommandError::LeaseLost { .. })
    ));
}

#[test]
fn a_released_lease_is_not_a_failed_attempt() {
    let mut store = MemoryStore::default();
    submit(&mut store, "j", spec(1, 1, 1)).expect("submit");
    let s = session(&mut store);
    let first = claim(&mut store, 2, "j", s).expect("claimed");
    let released = job(&mut store, 3, JobCommand::Release { name: "j".into(), task: 0, lease: first.lease });
    assert_eq!(released, Ok(Outcome::Job(JobOutcome::Released)));
    assert!(matches!(save(&mut store, "j", 0, first.lease, b"1"), Err(CommandError::LeaseLost { .. })));
    let second = claim(&mut store, 3, "j", s).expect("claimable again at once, with max-attempts 1");
    succeed(&mut store, 4, "j", 0, second.lease, "ok").expect("result");
    let done = record(&store, "j");
    assert_eq!((done.done, done.failed, done.running), (1, 0, 0));
}

#[test]
fn cancel_fences_every_lease() {
    let mut store = MemoryStore::default();
    submit(&mut store, "j", spec(2, 1, 3)).expect("submit");
    let s = session(&mut store);
    let held = claim(&mut store, 2, "j", s).expect("claimed");
    job(&mut store, 3, JobCommand::Cancel { name: "j".into() }).expect("cancel");
    assert!(matches!(save(&mut store, "j", held.task, held.lease, b"1"), Err(CommandError::LeaseLost { .. })));
    assert!(claim(&mut store, 4, "j", s).is_none());
    assert!(record(&store, "j").is_over());
}

/// One step of a random schedule.
#[derive(Debug, Clone)]
enum Step {
    Claim(usize),
    Checkpoint(usize, u8),
    Succeed(usize),
    Fail(usize),
    Expire(usize),
    Reopen(usize),
    Release(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..3usize).prop_map(Step::Claim),
        2 => (0..3usize, any::<u8>()).prop_map(|(w, b)| Step::Checkpoint(w, b)),
        3 => (0..3usize).prop_map(Step::Succeed),
        1 => (0..3usize).prop_map(Step::Fail),
        1 => (0..3usize).prop_map(Step::Expire),
        1 => (0..3usize).prop_map(Step::Reopen),
        1 => (0..3usize).prop_map(Step::Release),
    ]
}

proptest! {
    /// Whatever the interleaving of claims, checkpoints, completions, releases and session expiries
    /// across three workers (each remembering every lease it ever got, so zombies write too),
    /// each task commits at most one result, that result is never replaced, a write is
    /// accepted only under a lease the task currently lists, and the counters add up.
    #[test]
    fn each_task_commits_one_result_and_no_stale_lease_writes(
        redundancy in 1u32..=2,
        steps in proptest::collection::vec(step(), 1..120),
    ) {
        let mut store = MemoryStore::default();
        submit(&mut store, "j", spec(4, redundancy, 3)).expect("submit");
        let mut sessions: Vec<u64> = (0..3).map(|_| session(&mut store)).collect();
        let mut leases: Vec<Vec<(u64, u64)>> = vec![Vec::new(); 3];
        let mut committed: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut clock = 10u64;
        for step in steps {
            clock += 700;
            match step {
                Step::Claim(w) => {
                    if let Some(claim) = claim(&mut store, clock, "j", sessions[w]) {
                        leases[w].push((claim.task, claim.lease));
                    }
                }
                Step::Checkpoint(w, _) | Step::Succeed(w) if leases[w].is_empty() => {}
                Step::Checkpoint(w, byte) => {
                    let (task, lease) = leases[w][usize::from(byte) % leases[w].len()];
                    let current = get_task(&store, "j", task).expect("read").is_some_and(|t| {
                        t.state == TaskState::Active && t.leases.iter().any(|l| l.attempt == lease)
                    });
                    let result = save(&mut store, "j", task, lease, &[byte]);
                    prop_assert_eq!(result.is_ok(), current, "checkpoint accepted iff its lease is current");
                }
                Step::Succeed(w) => {
                    let (task, lease) = leases[w][leases[w].len() - 1];
                    let current = get_task(&store, "j", task).expect("read").is_some_and(|t| {
                        t.state == TaskState::Active && t.leases.iter().any(|l| l.attempt == lease)
                    });
                    let out = format!("{task}:{lease}");
                    let result = succeed(&mut store, clock, "j", task, lease, &out);
                    prop_assert_eq!(result.is_ok(), current, "result accepted iff its lease is current");
                    if result.is_ok() {
                        prop_assert!(committed.insert(task, out.into_bytes()).is_none(), "a second result for {}", task);
                    }
                }
                Step::Fail(w) => {
                    if let Some(&(task, lease)) = leases[w].last() {
                        let _ = fail(&mut store, clock, "j", task, lease);
                    }
                }
                Step::Expire(w) => {
                    at(&mut store, clock, Command::SessionExpire { session_id: sessions[w] }).expect("expire");
                }
                Step::Reopen(w) => {
                    sessions[w] = session(&mut store);
                }
                Step::Release(w) => {
                    if let Some(&(task, lease)) = leases[w].last() {
                        let _ = job(&mut store, clock, JobCommand::Release { name: "j".into(), task, lease });
                    }
                }
            }
            let job = record(&store, "j");
            let mut running = 0;
            for (task, result) in &committed {
                let row = get_task(&store, "j", *task).expect("read").expect("row");
                prop_assert_eq!(row.state, TaskState::Done);
                prop_assert_eq!(&row.result, result, "a committed result never changes");
            }
            for (_, row) in list_tasks(&store, "j", 0, 10).expect("tasks") {
                prop_assert!(row.leases.len() <= redundancy as usize);
                if row.state == TaskState::Active && !row.leases.is_empty() {
                    running += 1;
                }
            }
            prop_assert_eq!(job.done, committed.len() as u64);
            prop_assert_eq!(job.running, running);
            prop_assert!(job.done + job.failed + job.running <= 4);
        }
    }
}
