//! `mendfs job` and `mendfs worker` against real processes: a worker killed mid-job, a worker
//! paused past its TTL (a zombie whose writes must be fenced), the leader killed mid-job,
//! redundant and backup (speculative) attempts, and bad input.
//!
//! Task commands are small `sh` scripts that count, checkpoint the count with
//! `$MENDFS_BIN job checkpoint`, and print the square of their task id; they log what they did
//! (started from which checkpoint, which checkpoints were acknowledged or refused) in the
//! test's directory, which is how the tests see inside the attempts.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use mendfs_testkit::{wait_for, Cluster, ClusterOptions};

const DEADLINE: Duration = Duration::from_secs(90);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

fn start_cluster() -> Cluster {
    let cluster = Cluster::start(binary(), ClusterOptions { nodes: 3, ..ClusterOptions::default() }).expect("start");
    cluster.wait_for_leader(DEADLINE).expect("a leader is elected");
    cluster
}

/// A worker process in a process group of its own (so that a test can kill or pause the
/// worker together with its commands), killed with its group when the test ends.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(cluster: &Cluster, dir: &Path, name: &str, slots: usize) -> Worker {
        let log = dir.join(format!("{name}.log"));
        let child = cluster
            .cli()
            .args(["worker", "--slots", &slots.to_string(), "--exit-when-idle", "--name", name])
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .process_group(0)
            .spawn()
            .expect("start a worker");
        Worker { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Signals the worker's process group: the worker and the commands it runs share none
    /// (each command has a group of its own), so a killed worker leaves orphaned commands
    /// behind, as a crashed worker process would.
    fn signal_group(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("a pid");
        rustix::process::kill_process_group(pid, signal).expect("signal the worker's group");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_exit(&mut self, deadline: Duration) -> bool {
        wait_for("the worker exits", deadline, || Ok(self.child.try_wait()?)).unwrap().success()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(cluster: &Cluster, args: &[&str]) -> String {
    cluster.run_cli(args).unwrap_or_else(|e| panic!("mendfs {args:?}: {e:#}"))
}

fn status(cluster: &Cluster, job: &str) -> serde_json::Value {
    serde_json::from_str(&cli(cluster, &["job", "status", job, "--json"])).expect("status JSON")
}

fn results(cluster: &Cluster, job: &str) -> BTreeMap<u64, serde_json::Value> {
    let out = cli(cluster, &["job", "results", job, "--json"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).expect("results JSON");
    list.into_iter().map(|r| (r["task"].as_u64().unwrap(), r)).collect()
}

fn wait_for_status(cluster: &Cluster, job: &str, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    wait_for(what, DEADLINE, || {
        let status = status(cluster, job);
        Ok(check(&status).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}; last status {}", status(cluster, job)));
}

/// A task that counts to `steps`, one step every `step_s` seconds, checkpointing the count
/// after each step, and prints the square of its task id. In `dir` it logs
/// `start.TASK.LEASE` (the count it started from), `ack.TASK.LEASE` (each count the cluster
/// acknowledged), `refused.TASK.LEASE` (what it was told when a checkpoint was refused) and
/// `end.TASK.LEASE` (written just before it prints its result).
fn counting_task(dir: &Path, steps: u32, step_s: &str) -> String {
    format!(
        r#"d={dir}; t=$MENDFS_TASK; l=$MENDFS_JOB_LEASE; n=0
if [ -n "$MENDFS_CHECKPOINT_IN" ]; then n=$(cat "$MENDFS_CHECKPOINT_IN"); fi
echo "$n $$" > "$d/start.$t.$l"
while [ "$n" -lt {steps} ]; do
  sleep {step_s}
  n=$((n+1))
  echo "$n" > "$d/ck.$t.$l"
  if "$MENDFS_BIN" job checkpoint "$d/ck.$t.$l" 2>>"$d/refused.$t.$l"; then echo "$n" >> "$d/ack.$t.$l"; fi
done
touch "$d/end.$t.$l"
echo $((t * t))"#,
        dir = dir.display()
    )
}

fn read_numbers(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Every task has exactly one result, its square, and every attempt that started from a
/// checkpoint started from the last one the cluster acknowledged to an earlier attempt.
fn check_results_and_resumes(cluster: &Cluster, job: &str, dir: &Path, tasks: u64) -> u64 {
    let results = results(cluster, job);
    assert_eq!(results.len() as u64, tasks, "one result per task: {results:?}");
    for (task, result) in &results {
        assert_eq!(result["output"].as_str().unwrap().trim(), (task * task).to_string(), "task {task}");
    }
    let mut resumed = 0;
    for task in 0..tasks {
        let mut acknowledged_before = 0;
        for lease in 1..=20u64 {
            let start = read_numbers(&dir.join(format!("start.{task}.{lease}")));
            let Some(&from) = start.first() else { continue };
            if from > 0 {
                resumed += 1;
            }
            assert!(
                from >= acknowledged_before,
                "task {task} lease {lease} started from {from}, but {acknowledged_before} was acknowledged before"
            );
            acknowledged_before = acknowledged_before
                .max(read_numbers(&dir.join(format!("ack.{task}.{lease}"))).into_iter().max().unwrap_or(0));
        }
    }
    resumed
}

/// Whether a command of the worker `worker_pid` (its parent) is running a task that has an
/// acknowledged checkpoint.
fn checkpointed_task_of(dir: &Path, worker_pid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.filter_map(|entry| entry.ok()).any(|entry| {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(attempt) = name.strip_prefix("start.") else { return false };
        let acknowledged = dir.join(format!("ack.{attempt}")).exists();
        let ended = dir.join(format!("end.{attempt}")).exists();
        let pid = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|line| line.split_whitespace().nth(1).map(str::to_string));
        let parent = pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()).and_then(|stat| {
            // The parent pid is the second field after the command name, which is in parentheses.
            stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<u32>().ok()
        });
        acknowledged && !ended && parent == Some(worker_pid)
    })
}

fn submit(cluster: &Cluster, job: &str, tasks: u64, extra: &[&str], script: &str) {
    let tasks = tasks.to_string();
    let mut args = vec!["job", "submit", job, "--tasks", &tasks];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    cli(cluster, &args);
}

#[test]
fn a_killed_worker_s_tasks_resume_from_their_checkpoints_elsewhere() {
    let started = Instant::now();
    let cluster = start_cluster();
    let dir = tempfile::tempdir().unwrap();
    submit(&cluster, "squares", 20, &["--ttl", "2"], &counting_task(dir.path(), 4, "0.3"));
    let mut doomed = Worker::start(&cluster, dir.path(), "doomed", 2);
    let mut survivor = Worker::start(&cluster, dir.path(), "survivor", 2);
    // Mid-run: some tasks done, the doomed worker holding tasks with checkpoints.
    wait_for_status(&cluster, "squares", "a few tasks done", |s| {
        s["done"].as_u64().unwrap() >= 4 && s["running"].as_u64().unwrap() >= 3
    });
    wait_for("a checkpoint of the doomed worker's", DEADLINE, || {
        Ok(std::fs::read_dir(dir.path())?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("ack."))
            .then_some(()))
    })
    .unwrap();
    let killed_at = Instant::now();
    doomed.signal_group(rustix::process::Signal::KILL);
    assert!(!doomed.wait_exit(Duration::from_secs(10)), "SIGKILLed");
    wait_for_status(&cluster, "squares", "the doomed worker's leases end", |s| s["lost_leases"].as_u64().unwrap() > 0);
    let reassigned_after = killed_at.elapsed();
    assert!(survivor.wait_exit(DEADLINE), "the survivor finishes the job and exits: {}", survivor.log());
    let status = status(&cluster, "squares");
    assert_eq!(status["done"], 20, "{status}");
    assert_eq!(status["failed"], 0, "{status}");
    assert!(status["resumed_from_checkpoint"].as_u64().unwrap() > 0, "{status}");
    assert!(status["workers"]["survivor"].as_u64().unwrap() > 0, "{status}");
    let resumed = check_results_and_resumes(&cluster, "squares", dir.path(), 20);
    assert!(resumed > 0, "some attempt started from a checkpoint");
    eprintln!(
        "jobs: worker killed, its leases ended after {reassigned_after:?} (TTL 2 s); status {status}; test took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_paused_worker_s_late_checkpoint_and_result_are_refused() {
    let cluster = start_cluster();
    let dir = tempfile::tempdir().unwrap();
    // One task, long enough that the paused worker's command outlives its lease.
    submit(&cluster, "zombie", 1, &["--ttl", "2"], &counting_task(dir.path(), 8, "0.5"));
    let mut paused = Worker::start(&cluster, dir.path(), "paused", 1);
    wait_for("the first worker's first checkpoint", DEADLINE, || Ok(dir.path().join("ack.0.1").exists().then_some(())))
        .unwrap();
    // Only the worker is paused: its command runs on, a zombie whose lease expires under it.
    mendfs_testkit::signal(paused.pid(), libc::SIGSTOP).unwrap();
    let mut other = Worker::start(&cluster, dir.path(), "other", 1);
    wait_for_status(&cluster, "zombie", "the task goes to the other worker", |s| s["attempts"].as_u64().unwrap() >= 2);
    // The zombie's command keeps checkpointing after its lease ended: refused.
    wait_for("a refused checkpoint", DEADLINE, || {
        let refused = std::fs::read_to_string(dir.path().join("refused.0.1")).unwrap_or_default();
        Ok(refused.contains("not current").then_some(refused))
    })
    .unwrap();
    // Its command finishes; only then is the worker resumed, with a result to report.
    wait_for("the zombie's command ends", DEADLINE, || Ok(dir.path().join("end.0.1").exists().then_some(()))).unwrap();
    mendfs_testkit::signal(paused.pid(), libc::SIGCONT).unwrap();
    assert!(other.wait_exit(DEADLINE), "the other worker finishes: {}", other.log());
    assert!(paused.wait_exit(DEADLINE), "the resumed worker exits: {}", paused.log());
    assert!(paused.log().contains("result refused"), "the zombie's result is refused: {}", paused.log());
    let status = status(&cluster, "zombie");
    assert_eq!(status["done"], 1, "{status}");
    assert!(status["fenced"].as_u64().unwrap() >= 2, "checkpoint and result refused: {status}");
    let results = results(&cluster, "zombie");
    assert_eq!(results[&0]["worker"], "other", "{results:?}");
    assert_eq!(results[&0]["output"].as_str().unwrap().trim(), "0");
    assert!(results[&0]["attempt"].as_u64().unwrap() >= 2);
    check_results_and_resumes(&cluster, "zombie", dir.path(), 1);
}

#[test]
fn a_job_completes_through_the_leader_s_death_without_losing_a_checkpoint() {
    let mut cluster = start_cluster();
    let dir = tempfile::tempdir().unwrap();
    submit(&cluster, "failover", 12, &["--ttl", "3"], &counting_task(dir.path(), 4, "0.3"));
    let first = Worker::start(&cluster, dir.path(), "first", 2);
    let mut second = Worker::start(&cluster, dir.path(), "second", 2);
    wait_for_status(&cluster, "failover", "a few tasks done", |s| s["done"].as_u64().unwrap() >= 3);
    wait_for("the first worker running a task with a checkpoint", DEADLINE, || {
        Ok(checkpointed_task_of(dir.path(), first.pid()).then_some(()))
    })
    .unwrap();
    let leader = cluster.wait_for_leader(DEADLINE).unwrap();
    cluster.kill(leader).unwrap();
    // A worker dies too, so that tasks must resume from checkpoints the old leader committed.
    first.signal_group(rustix::process::Signal::KILL);
    assert!(second.wait_exit(DEADLINE), "the job completes: {}", second.log());
    let status = status(&cluster, "failover");
    assert_eq!((status["done"].as_u64(), status["failed"].as_u64()), (Some(12), Some(0)), "{status}");
    let resumed = check_results_and_resumes(&cluster, "failover", dir.path(), 12);
    assert!(resumed > 0, "the killed worker's checkpointed task resumed: {status}");
    eprintln!("jobs: leader {leader} killed; {resumed} attempts resumed from checkpoints; status {status}");
    drop(first);
}

#[test]
fn redundant_and_backup_attempts_commit_one_result_and_stop_the_loser_and_bad_input_is_refused() {
    let cluster = start_cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    // Each task runs on both workers; the second attempt is fast, the first slow.
    let script = format!(
        r#"echo $$ > "{d}/pid.$MENDFS_TASK.$MENDFS_JOB_LEASE"
if [ "$MENDFS_JOB_LEASE" = 1 ]; then sleep 20; else sleep 1; fi
touch "{d}/end.$MENDFS_TASK.$MENDFS_JOB_LEASE"; echo "$MENDFS_TASK by $MENDFS_JOB_LEASE""#
    );
    submit(&cluster, "twice", 3, &["--redundancy", "2", "--ttl", "3"], &script);
    let mut a = Worker::start(&cluster, dir.path(), "a", 3);
    let mut b = Worker::start(&cluster, dir.path(), "b", 3);
    assert!(a.wait_exit(DEADLINE), "{}", a.log());
    assert!(b.wait_exit(DEADLINE), "{}", b.log());
    let twice = status(&cluster, "twice");
    assert_eq!(twice["done"], 3, "{twice}");
    assert_eq!(twice["attempts"], 6, "each task ran twice: {twice}");
    let outputs = results(&cluster, "twice");
    for task in 0..3u64 {
        assert_eq!(outputs[&task]["output"].as_str().unwrap().trim(), format!("{task} by 2"), "{outputs:?}");
        assert!(!dir.path().join(format!("end.{task}.1")).exists(), "the loser of task {task} never finished");
        let pid: i32 =
            std::fs::read_to_string(dir.path().join(format!("pid.{task}.1"))).unwrap().trim().parse().unwrap();
        wait_for("the loser's process is gone", Duration::from_secs(10), || {
            Ok((!Path::new(&format!("/proc/{pid}")).exists()).then_some(()))
        })
        .unwrap();
    }
    let logs = a.log() + &b.log();
    assert_eq!(logs.matches("stopped:").count(), 3, "every loser was stopped: {logs}");

    // Redundancy 1 with a straggler: task 0's first attempt hangs; it gets a backup attempt,
    // which wins, and the hung one is stopped.
    let straggler = r#"if [ "$MENDFS_TASK" = 0 ] && [ "$MENDFS_JOB_LEASE" = 1 ]; then sleep 60; fi; sleep 0.2; echo "$MENDFS_TASK""#;
    submit(&cluster, "straggler", 4, &["--speculative-max", "1", "--ttl", "3"], straggler);
    let mut a = Worker::start(&cluster, dir.path(), "a2", 2);
    let mut b = Worker::start(&cluster, dir.path(), "b2", 2);
    assert!(a.wait_exit(DEADLINE), "{}", a.log());
    assert!(b.wait_exit(DEADLINE), "{}", b.log());
    let backed_up = status(&cluster, "straggler");
    assert_eq!((backed_up["done"].as_u64(), backed_up["speculative"].as_u64()), (Some(4), Some(1)), "{backed_up}");
    assert_eq!(results(&cluster, "straggler")[&0]["attempt"], 2, "the backup attempt's result");

    // A worker stopped with SIGTERM kills its command and gives its lease back: the task runs
    // elsewhere at once, not after its 30 s TTL, and the stop is not a failed attempt.
    let graceful = format!(
        r#"echo $$ > "{d}/graceful.$MENDFS_JOB_LEASE"; if [ "$MENDFS_JOB_LEASE" = 1 ]; then sleep 60; fi; echo done"#
    );
    submit(&cluster, "graceful", 1, &["--ttl", "30"], &graceful);
    let mut stopping = Worker::start(&cluster, dir.path(), "stopping", 1);
    let first_pid = wait_for("the first attempt starts", DEADLINE, || {
        Ok(std::fs::read_to_string(dir.path().join("graceful.1")).ok().and_then(|pid| pid.trim().parse::<i32>().ok()))
    })
    .unwrap();
    let stopped_at = Instant::now();
    mendfs_testkit::signal(stopping.pid(), libc::SIGTERM).unwrap();
    assert!(!stopping.wait_exit(Duration::from_secs(15)), "a stopped worker exits non-zero: {}", stopping.log());
    assert!(!Path::new(&format!("/proc/{first_pid}")).exists(), "its command was killed");
    let mut next = Worker::start(&cluster, dir.path(), "next", 1);
    assert!(next.wait_exit(DEADLINE), "{}", next.log());
    assert!(stopped_at.elapsed() < Duration::from_secs(20), "the lease was released, not left to expire");
    assert_eq!(results(&cluster, "graceful")[&0]["worker"], "next");
    assert!(stopping.log().contains("stopped and released"), "{}", stopping.log());
    let graceful = status(&cluster, "graceful");
    assert_eq!(graceful["lost_leases"], 0, "the lease was given back, not lost: {graceful}");

    // Bad input.
    let refused = |args: &[&str]| -> String {
        let out = cluster.cli().args(args).output().unwrap();
        assert!(!out.status.success(), "mendfs {args:?} must fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(refused(&["job", "status", "nosuch"]).contains("job nosuch does not exist"));
    assert!(refused(&["job", "results", "nosuch"]).contains("does not exist"));
    assert!(refused(&["job", "cancel", "nosuch"]).contains("does not exist"));
    assert!(refused(&["job", "submit", "zero", "--tasks", "0", "--", "true"]).contains("at least one task"));
    assert!(refused(&["job", "submit", "twice", "--tasks", "1", "--", "true"]).contains("already exists"));
    assert!(refused(&["job", "checkpoint", "/dev/null"]).contains("MENDFS_JOB is not set"));
    cli(&cluster, &["job", "submit", "missing", "--tasks", "1", "--max-attempts", "1", "--", "nosuchcmd-mendfs"]);
    let big = format!(
        r#"head -c 1100000 /dev/zero > "{d}/big"; "$MENDFS_BIN" job checkpoint "{d}/big" 2> "{d}/big.err"; echo $?"#
    );
    submit(&cluster, "bigcheckpoint", 1, &[], &big);
    let mut c = Worker::start(&cluster, dir.path(), "c", 2);
    assert!(c.wait_exit(DEADLINE), "{}", c.log());
    let waited = cluster.cli().args(["job", "wait", "missing"]).output().unwrap();
    assert!(!waited.status.success(), "a job with a failed task waits to a failure");
    let missing = status(&cluster, "missing");
    assert_eq!(missing["failed"], 1, "{missing}");
    let tail = missing["failures"][0]["stderr_tail"].as_str().unwrap();
    assert!(tail.contains(r#"mendfs worker: cannot run "nosuchcmd-mendfs": No such file or directory"#), "{tail}");
    let big_err = std::fs::read_to_string(dir.path().join("big.err")).unwrap();
    assert!(big_err.contains("the limit is 1048576 bytes"), "{big_err}");
    assert_eq!(results(&cluster, "bigcheckpoint")[&0]["output"].as_str().unwrap().trim(), "1", "its exit status");
    let list = cli(&cluster, &["job", "list"]);
    for job in ["twice", "missing", "bigcheckpoint"] {
        assert!(list.contains(job), "{list}");
    }
}
