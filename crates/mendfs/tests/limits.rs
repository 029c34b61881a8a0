//! Bounded under heavy use, against real `mendfs server` processes: the coordination keyspace's
//! byte quota (refusal, memory through snapshots and a full restart, space freed by delete and
//! compaction), a snapshot build racing applies with a crash right after it, the in-flight
//! and read budgets under many uploads and under readers that stall, and the bound on chunk
//! work threads under them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mendfs_client::{Client, ClientConfig};
use mendfs_testkit::{wait_for, Cluster, ClusterOptions};

const DEADLINE: Duration = Duration::from_secs(60);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

fn start(options: ClusterOptions) -> Cluster {
    let cluster = Cluster::start(binary(), options).expect("start cluster");
    cluster.wait_for_leader(DEADLINE).expect("a leader");
    cluster
}

fn client(cluster: &Cluster) -> Client {
    let mut config = ClientConfig::new(cluster.endpoint_list());
    config.secret = cluster.secret();
    Client::new(config).expect("client")
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A node's peak resident memory so far (the kernel's high-water mark), in MiB.
fn peak_rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn peaks(cluster: &Cluster) -> BTreeMap<u64, u64> {
    cluster.nodes.iter().filter_map(|(id, node)| node.pid().and_then(peak_rss_mib).map(|peak| (*id, peak))).collect()
}

/// A full restart: every node killed, then started again from its disk; returns their ids once
/// a leader is elected.
fn restart_all(cluster: &mut Cluster) -> Vec<u64> {
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    for id in &ids {
        blocking(|| cluster.kill(*id)).expect("kill");
    }
    for id in &ids {
        blocking(|| cluster.restart(*id)).expect("restart");
    }
    blocking(|| cluster.wait_for_leader(DEADLINE)).expect("a leader after the restart");
    ids
}

fn value_of(index: usize) -> Vec<u8> {
    let stamp = format!("value {index} ");
    stamp.as_bytes().iter().copied().cycle().take(1 << 20).collect()
}

fn kv_usage(cluster: &Cluster) -> serde_json::Value {
    cluster.status().expect("status")["kv"].clone()
}

/// No node's memory should come near this while the keyspace is held to 64 MiB: a snapshot or
/// an install that held the state several times over, or a history of values, would.
const RSS_BOUND_MIB: u64 = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_quota_refuses_writes_until_space_is_freed_and_memory_stays_bounded() {
    let options = ClusterOptions {
        server_args: ["--kv-quota-bytes", "64MiB", "--snapshot-every-entries", "16"].map(String::from).to_vec(),
        ..ClusterOptions::default()
    };
    let mut cluster = start(options);
    let client = client(&cluster);

    // 1 MiB values until the quota refuses one.
    let mut acknowledged = Vec::new();
    let refusal = loop {
        let index = acknowledged.len();
        assert!(index < 100, "64 MiB took more than 100 values of 1 MiB");
        match client.set(format!("big/{index:03}").as_bytes(), &value_of(index), None, None).await {
            Ok(_) => acknowledged.push(index),
            Err(error) => break error.to_string(),
        }
    };
    assert!(
        refusal.contains("quota exceeded") && refusal.contains("67108864"),
        "after {} values: {refusal}\n{}",
        acknowledged.len(),
        cluster.log_tail(blocking(|| cluster.wait_for_leader(DEADLINE)).expect("leader"), 30)
    );
    // Keys and history both count: about 32 values fit, not 64.
    assert!((25..=33).contains(&acknowledged.len()), "{} values fit", acknowledged.len());
    let usage = kv_usage(&cluster);
    assert_eq!(usage["quota_alarm"], true, "{usage}");
    assert_eq!(usage["quota_bytes"], 64 << 20, "{usage}");
    // Reads work, and a small write is refused while the alarm is raised.
    let first = client.get(b"big/000").await.expect("get").expect("present");
    assert_eq!(first.value, value_of(0));
    let small = client.set(b"small", b"x", None, None).await.expect_err("the alarm refuses writes");
    assert!(small.to_string().contains("quota"), "{small}");
    let peaks_before_restart = peaks(&cluster);

    restart_all(&mut cluster);
    let client = self::client(&cluster);
    for index in &acknowledged {
        let kv = client.get(format!("big/{index:03}").as_bytes()).await.expect("get").expect("acknowledged key");
        assert!(kv.value == value_of(*index), "big/{index:03} came back different");
    }
    let peaks_after_restart = peaks(&cluster);
    println!("peak RSS per node (MiB): before the restart {peaks_before_restart:?}, after it {peaks_after_restart:?}");
    for (id, peak) in peaks_before_restart.iter().chain(&peaks_after_restart) {
        assert!(*peak < RSS_BOUND_MIB, "node {id} peaked at {peak} MiB");
    }

    // Deleting frees the keys' bytes; compaction frees the history's; writes resume.
    for index in &acknowledged {
        client.delete(format!("big/{index:03}").as_bytes(), None).await.expect("delete under the alarm");
    }
    let compacted = client.compact(0).await.expect("compact");
    assert!(compacted > 0);
    // The deletes alone bring the use under the alarm's bound, and the node `status` asks may
    // apply the compaction a little after the leader answered it: wait for both there.
    let usage = blocking(|| {
        wait_for("the alarm to clear and the compaction to apply", DEADLINE, || {
            let usage = kv_usage(&cluster);
            let compaction_applied = usage["compacted_revision"].as_u64().is_some_and(|revision| revision >= compacted);
            Ok((usage["quota_alarm"] == false && compaction_applied).then_some(usage))
        })
    })
    .expect("alarm cleared and compaction applied");
    assert!(usage["history_bytes"].as_u64().expect("history bytes") < 1 << 20, "{usage}");
    client.set(b"big/again", &value_of(1000), None, None).await.expect("a write after freeing space");
}

/// A snapshot build paused (by a test hook) between its read transaction and its durability
/// point while writes keep landing, then every node killed at once right after the snapshot:
/// the restarted cluster reads every acknowledged write. This caught a leader that resumed its
/// term after the restart and served a read that missed the last acknowledged write (see
/// `RaftLogStore::give_up_own_leadership`). What it cannot show is the build's own ordering: a
/// SIGKILL keeps redb's non-durable commits (they are in the page cache; only a power loss
/// drops them), so that is shown by the store's unit test instead
/// (`a_build_racing_an_apply_and_an_install_leaves_a_consistent_restartable_store`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_right_after_a_snapshot_built_during_writes_loses_nothing() {
    let options = ClusterOptions {
        server_args: ["--snapshot-every-entries", "50"].map(String::from).to_vec(),
        server_env: vec![("MENDFS_TEST_SNAPSHOT_BUILD_PAUSE_MS".into(), "1500".into())],
        ..ClusterOptions::default()
    };
    let mut cluster = start(options);
    let client = client(&cluster);
    let leader = blocking(|| cluster.wait_for_leader(DEADLINE)).expect("leader");
    let snapshot_index = |cluster: &Cluster| -> Option<u64> {
        let status = cluster.status().ok()?;
        let nodes = status["nodes"].as_array()?.clone();
        nodes.iter().find(|n| n["id"].as_u64() == Some(leader)).and_then(|n| n["snapshot_index"].as_u64())
    };

    let mut acknowledged = 0usize;
    let started = Instant::now();
    // Writes until the first snapshot is in (its build sleeps 1.5 s while these keep landing).
    while snapshot_index(&cluster).unwrap_or(0) == 0 {
        assert!(acknowledged < 5_000 && started.elapsed() < DEADLINE, "no snapshot after {acknowledged} writes");
        for _ in 0..20 {
            client.set(format!("w/{acknowledged:05}").as_bytes(), b"v", None, None).await.expect("set");
            acknowledged += 1;
        }
    }
    let peaks_before = peaks(&cluster);
    let ids = restart_all(&mut cluster);
    let client = self::client(&cluster);
    println!(
        "{acknowledged} writes; peak RSS per node (MiB): before the crash {peaks_before:?}, after the restart {:?}",
        peaks(&cluster)
    );
    let (kvs, truncated) = client.list(b"w/", 0).await.expect("list");
    assert!(!truncated);
    let found: std::collections::BTreeSet<Vec<u8>> = kvs.into_iter().map(|kv| kv.key).collect();
    let lost: Vec<String> =
        (0..acknowledged).map(|i| format!("w/{i:05}")).filter(|key| !found.contains(key.as_bytes())).collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes lost in the crash: {lost:?}\n{}",
        ids.iter().map(|id| format!("--- node {id}\n{}", cluster.log_tail(*id, 40))).collect::<Vec<_>>().join("\n")
    );
    for id in &ids {
        let log = cluster.log(*id);
        assert!(!log.contains("Failed to get log entries"), "node {id} could not replay its log:\n{log}");
    }
}

/// The content of test file `index`: `size` bytes that differ from every other file's.
fn file_content(index: usize, size: usize) -> Vec<u8> {
    let stamp = format!("file {index} ");
    stamp.as_bytes().iter().copied().cycle().take(size).collect()
}

/// Threads of process `pid` named `name`, as the kernel keeps a name: its first 15 bytes.
fn threads_named(pid: u32, name: &str) -> usize {
    let kept = &name.as_bytes()[..name.len().min(15)];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(Result::ok)
        .filter(|task| std::fs::read(task.path().join("comm")).is_ok_and(|comm| comm.trim_ascii_end() == kept))
        .count()
}

/// Samples, until `stop`, how many threads called `name` each of `pids` runs at once; returns
/// the most seen for each.
fn count_threads_named(
    pids: Vec<u32>,
    name: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<usize>> {
    std::thread::spawn(move || {
        let mut most = vec![0; pids.len()];
        while !stop.load(Ordering::Relaxed) {
            for (most, pid) in most.iter_mut().zip(&pids) {
                *most = (*most).max(threads_named(*pid, name));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        most
    })
}

/// A coordinator whose in-flight budget holds a single chunk still serves many uploads (of
/// declared and undeclared size, all on the client's one HTTP/2 connection) and reads at
/// once: they take turns for the budget, none waits on another forever (an upload that held
/// budget while it waited for its data did: the uploads waiting for budget stopped reading,
/// and their unread data filled the connection's flow-control window), and every byte comes
/// back. Meanwhile no node runs more chunk file work at once than its bound of threads, nor
/// more threads for its metadata reads (the readers' chunk pages) than theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_reads_take_turns_in_a_one_chunk_inflight_budget() {
    // Not a divisor of the client's 256 KiB messages: chunks span messages.
    const CHUNK: usize = 192 << 10;
    let chunk = CHUNK.to_string();
    let server_args = vec!["--chunk-size-bytes".into(), chunk.clone(), "--max-inflight-bytes".into(), chunk];
    let cluster = start(ClusterOptions { nodes: 3, server_args, ..ClusterOptions::default() });
    let client = client(&cluster);
    // Several upload messages (256 KiB) each, and many chunks.
    let size_of = |index: usize| CHUNK * (8 + index % 5) + 1000 * index;
    // Some files first, for the reads that run beside the uploads.
    for index in 0..4 {
        let content = file_content(index, size_of(index));
        let size = Some(content.len() as u64);
        // The storage nodes register just after the start: retried until they have.
        let started = Instant::now();
        while let Err(e) = client
            .put_file(&format!("/budget/{index}"), std::io::Cursor::new(content.clone()), size, None, |_| {})
            .await
        {
            assert!(started.elapsed() < DEADLINE, "file {index} never written: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let pids: Vec<u32> = cluster.nodes.values().filter_map(|node| node.pid()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let counting = count_threads_named(pids.clone(), "mendfs-chunk-work", stop.clone());
    let counting_reads = count_threads_named(pids, "mendfs-meta-read", stop.clone());
    let mut tasks = Vec::new();
    for index in 4..16 {
        let writer = client.clone();
        tasks.push(tokio::spawn(async move {
            let content = file_content(index, size_of(index));
            // Every other upload does not say its size: it reserves whole chunks.
            let size = (index % 2 == 0).then_some(content.len() as u64);
            writer.put_file(&format!("/budget/{index}"), std::io::Cursor::new(content), size, None, |_| {}).await?;
            anyhow::Ok(())
        }));
        let reader = client.clone();
        let read = index % 4;
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            reader.get_file(&format!("/budget/{read}"), &mut got, |_, _| {}).await?;
            anyhow::ensure!(got == file_content(read, size_of(read)), "file {read} came back different");
            anyhow::Ok(())
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(tasks))
        .await
        .expect("uploads and reads waiting on each other for the budget");
    for result in all {
        result.expect("task").expect("an upload or read");
    }
    stop.store(true, Ordering::Relaxed);
    let most_threads = counting.join().expect("the thread counter");
    // The data crate's bound (`chunk_work_threads`): two per core.
    let bound = 2 * std::thread::available_parallelism().map_or(1, |cores| cores.get());
    assert!(most_threads.iter().all(|most| *most <= bound), "chunk work threads {most_threads:?}, bound {bound}");
    assert!(most_threads.iter().any(|most| *most >= 1), "no chunk work thread seen: {most_threads:?}");
    // The metadata's bound (`METADATA_READS`): two per core as well.
    let most_read_threads = counting_reads.join().expect("the thread counter");
    assert!(
        most_read_threads.iter().all(|most| *most <= bound),
        "metadata read threads {most_read_threads:?}, bound {bound}"
    );
    assert!(most_read_threads.iter().any(|most| *most >= 1), "no metadata read thread seen: {most_read_threads:?}");
    for index in 4..16 {
        let mut got = Vec::new();
        client.get_file(&format!("/budget/{index}"), &mut got, |_, _| {}).await.expect("read back");
        assert_eq!(got, file_content(index, size_of(index)), "file {index}");
    }
}

/// A writer that takes the first bytes it is given and then never anything more: a reader that
/// stops taking its data, with its stream left open.
struct StallingWriter {
    taken: usize,
}

impl tokio::io::AsyncWrite for StallingWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.taken > 0 {
            // Never woken: the task waits until it is dropped.
            return std::task::Poll::Pending;
        }
        self.taken = buf.len().min(1);
        std::task::Poll::Ready(Ok(self.taken))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The coordinator's read budget, from its `/metrics`: (held, limit, cap) in bytes.
fn read_budget(http: &str) -> Option<(f64, f64, f64)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(http).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let body = response.split_once("\r\n\r\n")?.1;
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|line| Ok(line.to_string()))).ok()?;
    let gauge = |name: &str| {
        scrape.samples.iter().find(|sample| sample.metric == name).and_then(|sample| match sample.value {
            prometheus_parse::Value::Gauge(value) | prometheus_parse::Value::Untyped(value) => Some(value),
            _ => None,
        })
    };
    Some((
        gauge("mendfs_read_budget_held_bytes")?,
        gauge("mendfs_read_budget_limit_bytes")?,
        gauge("mendfs_read_budget_cap_bytes")?,
    ))
}

/// Readers that stop taking their data hold no more of their coordinator's memory than the
/// read budget's hard cap, however many they are, and give all of it back when they go: a
/// fresh read through the same node then runs to its end, every byte intact. (A charge that
/// outlived its reader would leave the node unable to serve reads for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stall_hold_at_most_the_read_cap_and_give_it_all_back_when_they_go() {
    const CHUNK: usize = 256 << 10;
    const STALLED_READERS: usize = 12;
    let chunk = CHUNK.to_string();
    let server_args = vec!["--chunk-size-bytes".into(), chunk.clone(), "--max-inflight-bytes".into(), chunk];
    let http = format!("127.0.0.1:{}", mendfs_testkit::free_port().expect("port"));
    let node_args = BTreeMap::from([(1, vec!["--http".to_string(), http.clone()])]);
    let cluster = start(ClusterOptions { nodes: 3, server_args, node_args, ..ClusterOptions::default() });
    // Every call through node 1: it coordinates every read.
    let mut config = ClientConfig::new(vec![cluster.addr(1)]);
    config.secret = cluster.secret();
    config.deadline = Duration::from_secs(300);
    let client = Client::new(config).expect("client");
    let content = file_content(7, CHUNK * 32 + 12_345);
    let started = Instant::now();
    while let Err(e) =
        client.put_file("/stall", std::io::Cursor::new(content.clone()), Some(content.len() as u64), None, |_| {}).await
    {
        // The storage nodes register just after the start: retried until they have.
        assert!(started.elapsed() < DEADLINE, "the file was never written: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut stalled = Vec::new();
    for _ in 0..STALLED_READERS {
        let reader = client.clone();
        stalled.push(tokio::spawn(async move {
            let _ = reader.get_file("/stall", &mut StallingWriter { taken: 0 }, |_, _| {}).await;
        }));
    }
    let (held, limit, cap) = blocking(|| {
        wait_for("the stalled readers to fill the read budget", DEADLINE, || {
            Ok(read_budget(&http).filter(|(held, limit, _)| held >= limit))
        })
    })
    .expect("the budget filled");
    assert_eq!(limit, CHUNK as f64, "the budget is --max-inflight-bytes");
    assert!(held <= cap, "readers hold {held} bytes, beyond the cap of {cap}");
    // Held there: still within the cap a moment later, with every reader still stalled.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (held, _, _) = blocking(|| read_budget(&http)).expect("metrics");
        assert!(held <= cap, "readers hold {held} bytes, beyond the cap of {cap}");
    }

    for reader in &stalled {
        reader.abort();
    }
    for reader in stalled {
        let _ = reader.await;
    }
    blocking(|| {
        wait_for("the vanished readers' budget to come back", DEADLINE, || {
            Ok(read_budget(&http).filter(|(held, _, _)| *held == 0.0))
        })
    })
    .expect("every charge given back");
    let mut got = Vec::new();
    client.get_file("/stall", &mut got, |_, _| {}).await.expect("a fresh read");
    assert!(got == content, "the file came back different");
}
