//! `mendfs kv lock` against real processes: a holder cut off from the majority together with
//! its leader (nodes in network namespaces), and more contenders than one list returns.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use mendfs_client::{Client, ClientConfig};
use mendfs_testkit::netns::Lab;
use mendfs_testkit::{append_file, wait_for, Cluster, ClusterOptions};

const DEADLINE: Duration = Duration::from_secs(60);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

/// A CLI process that is killed if the test ends first (a panic included).
struct Running(Child);

impl Running {
    /// Waits for the process to exit, and returns whether it succeeded.
    fn wait_exit(&mut self, what: &str, deadline: Duration) -> bool {
        wait_for(what, deadline, || Ok(self.0.try_wait()?)).unwrap().success()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The shell whose pid is in this file gets SIGTERM on a test's panic, so that a command that
/// outlived its `kv lock` (the very bug the test looks for) does not linger; its trap ends its
/// sleep.
struct TerminateOnPanic(PathBuf);

impl Drop for TerminateOnPanic {
    fn drop(&mut self) {
        if let (true, Some(pid)) = (std::thread::panicking(), read_number(&self.0)) {
            let _ = mendfs_testkit::signal(pid as u32, libc::SIGTERM);
        }
    }
}

/// Wall-clock nanoseconds, the clock the commands' `date +%s%N` reads.
fn unix_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// A number a command wrote to `path` (whole: it writes a temporary file and renames it).
fn read_number(path: &Path) -> Option<u128> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn wait_number(what: &str, path: &Path, deadline: Duration) -> u128 {
    wait_for(what, deadline, || Ok(read_number(path))).unwrap()
}

/// Shell that writes `$value` to `path` in one piece.
fn write_sh(value: &str, path: &Path) -> String {
    let path = path.display();
    format!("echo {value} > {path}.tmp && mv {path}.tmp {path}")
}

/// Milliseconds from `from` to `to` (negative if `to` came first).
fn ms_after(from: u128, to: u128) -> f64 {
    (to as f64 - from as f64) / 1e6
}

/// The holder talks to the leader alone, from the leader's own namespace. The leader is then
/// cut off from the other nodes, still believing it leads, and the holder can still reach it.
/// Before the fix it kept acknowledging the holder's keep-alives, so the holder ran on while
/// the majority expired its session and gave the lock to another. Now the leader refuses
/// them, the holder gives its session up at 2/3 of the TTL and stops its command, which must
/// happen before the second contender, on the majority side, gets the lock (after the TTL).
#[test]
fn a_holder_cut_off_with_its_leader_stops_its_command_before_the_majority_hands_the_lock_on() {
    let lab = match Lab::create(&[1, 2, 3]) {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("skipping: this test runs nodes in network namespaces, which this machine refuses: {e:#}");
            return;
        }
    };
    let options = ClusterOptions { placement: lab.placement(), ..ClusterOptions::default() };
    let cluster = Cluster::start(binary(), options).expect("start the cluster in its namespaces");
    let leader = cluster.wait_for_leader(DEADLINE).expect("a leader");
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let dir = cluster.root().to_path_buf();
    let file = |name: &str| -> PathBuf { dir.join(name) };
    const TTL_SECS: u64 = 4;
    let ttl = TTL_SECS.to_string();

    // The holder's command records its token and start, and on SIGTERM when it was stopped.
    let holder_script = format!(
        "trap '{}; kill $sleeper 2>/dev/null; exit 143' TERM; {}; {}; {}; sleep 120 & sleeper=$!; wait $sleeper",
        write_sh("$(date +%s%N)", &file("holder.term")),
        write_sh("$$", &file("holder.pid")),
        write_sh("$MENDFS_LOCK_TOKEN", &file("holder.token")),
        write_sh("$(date +%s%N)", &file("holder.start")),
    );
    let _command = TerminateOnPanic(file("holder.pid"));
    let mut holder = Running(
        cluster
            .cli_in(Some(&lab.node_netns(leader)), &cluster.addr(leader))
            .args(["kv", "lock", "partition", "--ttl", &ttl, "--timeout", "30", "--", "sh", "-c", &holder_script])
            .stdout(Stdio::null())
            .stderr(append_file(&file("holder.stderr")).unwrap())
            .spawn()
            .expect("start the holder"),
    );
    let holder_token = wait_number("the holder's command to start", &file("holder.token"), DEADLINE);
    wait_number("the holder's command to start", &file("holder.start"), DEADLINE);

    let cut_ns = unix_ns();
    lab.cut_off(leader).expect("cut the leader off");

    // The second contender reaches only the majority's side.
    let second_script = format!(
        "{}; {}",
        write_sh("$(date +%s%N)", &file("second.start")),
        write_sh("$MENDFS_LOCK_TOKEN", &file("second.token"))
    );
    let mut second = Running(
        cluster
            .cli_at(&cluster.endpoints_of(&others))
            .args(["kv", "lock", "partition", "--ttl", &ttl, "--timeout", "60", "--", "sh", "-c", &second_script])
            .stdout(Stdio::null())
            .stderr(append_file(&file("second.stderr")).unwrap())
            .spawn()
            .expect("start the second contender"),
    );

    let holder_ok = holder.wait_exit("the holder to give the lock up", DEADLINE);
    let holder_stderr = std::fs::read_to_string(file("holder.stderr")).unwrap_or_default();
    assert!(!holder_ok, "the holder must fail once its lock is lost: {holder_stderr}");
    assert!(holder_stderr.contains("lock lost"), "the holder says why it stopped: {holder_stderr}");
    let term_ns = read_number(&file("holder.term"))
        .unwrap_or_else(|| panic!("the holder's command never got SIGTERM; holder: {holder_stderr}"));

    let second_ok = second.wait_exit("the second contender to take the lock and finish", DEADLINE);
    let second_stderr = std::fs::read_to_string(file("second.stderr")).unwrap_or_default();
    assert!(second_ok, "the second contender gets the lock: {second_stderr}");
    let second_start_ns = wait_number("the second command's start", &file("second.start"), DEADLINE);
    let second_token = wait_number("the second command's token", &file("second.token"), DEADLINE);

    eprintln!(
        "cut at 0 ms; the holder's command was stopped {:.0} ms after the cut; the second contender's command \
         started {:.0} ms after the cut (TTL {TTL_SECS} s); tokens {holder_token} then {second_token}\n\
         holder: {}",
        ms_after(cut_ns, term_ns),
        ms_after(cut_ns, second_start_ns),
        holder_stderr.trim()
    );
    assert!(
        term_ns < second_start_ns,
        "the holder's command ran until {:.0} ms after the cut, past the second's start at {:.0} ms",
        ms_after(cut_ns, term_ns),
        ms_after(cut_ns, second_start_ns)
    );
    assert!(second_token > holder_token, "fencing tokens only grow: {holder_token} then {second_token}");
}

/// Contenders are ordered by session id, not by age, so the one ahead can sit on any page of
/// the list. Here the first page (10,000 keys, the server's most) holds only newer contenders:
/// read alone, as before, it showed the waiter no one ahead while an older holder still held
/// the lock. The lock recipe now reads every page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_reads_every_page_of_contenders_before_it_takes_the_lock() {
    const FILLERS: usize = 10_000;
    let cluster = Cluster::start(binary(), ClusterOptions { nodes: 1, ..ClusterOptions::default() }).unwrap();
    tokio::task::block_in_place(|| cluster.wait_for_leader(DEADLINE)).expect("a leader");
    let mut config = ClientConfig::new(cluster.endpoint_list());
    config.secret = cluster.secret();
    config.deadline = Duration::from_secs(60);
    let client = Client::new(config).unwrap();
    let prefix = b"__lock/paged/";
    let key = |name: &str| [&prefix[..], name.as_bytes()].concat();

    // Two older holders, sorting after every other contender: the lock's holder, and one whose
    // release will wake the waiter.
    let holder = client.open_session(Duration::from_secs(30)).await.unwrap();
    let _holder_alive = holder.keep_alive_in_background();
    let held = client.create(&key("ffffffffffffffff"), b"", Some(holder.id())).await.unwrap();
    let waker = client.open_session(Duration::from_secs(30)).await.unwrap();
    let _waker_alive = waker.keep_alive_in_background();
    client.create(&key("fffffffffffffffe"), b"", Some(waker.id())).await.unwrap();

    let dir = cluster.root().to_path_buf();
    let started = dir.join("waiter.start");
    let script = write_sh("$(date +%s%N)", &started);
    let mut waiter = Running(
        cluster
            .cli()
            .args(["kv", "lock", "paged", "--ttl", "10", "--timeout", "60", "--", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(append_file(&dir.join("waiter.stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    let waiter_key = tokio::task::block_in_place(|| {
        wait_for("the waiter's key", DEADLINE, || {
            let runtime = tokio::runtime::Handle::current();
            let (kvs, _) = runtime.block_on(client.list(prefix, 0))?;
            Ok(kvs.into_iter().find(|kv| !kv.key.ends_with(b"ffffffffffffffff") && !kv.key.ends_with(b"fffe")))
        })
    })
    .unwrap();

    // Newer contenders that sort first ('-' < '0') and fill the first page.
    let created: Vec<Result<_, _>> = futures::stream::iter(0..FILLERS)
        .map(|i| {
            let client = client.clone();
            let filler = key(&format!("-{i:05}"));
            async move { client.create(&filler, b"", None).await }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    assert!(created.iter().all(Result::is_ok), "every filler is created");
    let (first_page, truncated) = client.list(prefix, 0).await.unwrap();
    assert!(truncated && first_page.iter().all(|kv| kv.create_revision > waiter_key.create_revision));
    let all = client.list_all(prefix).await.unwrap();
    assert_eq!(all.len(), FILLERS + 3, "every contender, each once");
    assert!(all.windows(2).all(|pair| pair[0].key < pair[1].key), "in key order");

    // The waker goes: the waiter looks again, and must still see the holder ahead of it.
    waker.close().await.unwrap();
    let observed_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < observed_until {
        assert!(read_number(&started).is_none(), "the waiter took the lock while an older holder held it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let released_ns = unix_ns();
    holder.close().await.unwrap();
    let started_ns = tokio::task::block_in_place(|| wait_number("the waiter's command to start", &started, DEADLINE));
    assert!(started_ns > released_ns, "the waiter's command started only once the holder released the lock");
    assert!(tokio::task::block_in_place(|| waiter.wait_exit("the waiter to finish", DEADLINE)));
    assert!(waiter_key.create_revision > held.create_revision, "its fencing token is above the holder's");
}
