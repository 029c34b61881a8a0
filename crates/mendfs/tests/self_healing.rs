//! Failure detection and self-healing against real `mendfs server` processes: nodes killed,
//! paused, restarted, drained, filled up, and chunk files corrupted on disk. Every wait polls
//! `cluster status` for the state it expects, with generous deadlines.
//!
//! Four storage nodes: three metadata voters (1-3) and one storage-only learner (4), so two
//! nodes can die and the metadata keeps its quorum.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mendfs_client::{Client, ClientConfig, Error};
use mendfs_testkit::{chunk_files, wait_for, Cluster, ClusterOptions};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(120);
const CHUNK: usize = 64 << 10;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

/// Detector and repair settings scaled down so the tests run in seconds, with margins wide
/// enough for a busy 2-core machine: suspicion about 2.5 s after the last heartbeat, `down`
/// 4 s after that.
fn fast_args(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--chunk-size-bytes",
        &CHUNK.to_string(),
        "--health-interval-ms",
        "250",
        "--acceptable-pause-ms",
        "1500",
        "--down-after-ms",
        "4000",
        "--repair-scan-interval-ms",
        "300",
        "--repair-bytes-per-sec",
        "0",
        "--orphan-grace-ms",
        "3000",
        "--gc-interval-ms",
        "500",
        "--scrub-bytes-per-sec",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // `extra` holds FLAG VALUE pairs that replace the defaults above (a flag may appear once).
    for pair in extra.chunks(2) {
        match args.iter().position(|arg| arg == pair[0]) {
            Some(at) => args[at + 1] = pair[1].to_string(),
            None => args.extend(pair.iter().map(|s| s.to_string())),
        }
    }
    args
}

/// Three voters plus storage-only node 4, all writable.
async fn start_four(args: Vec<String>, node_args: BTreeMap<u64, Vec<String>>) -> (Cluster, Client) {
    let options = ClusterOptions { nodes: 3, server_args: args, node_args, ..ClusterOptions::default() };
    let mut cluster = Cluster::start(binary(), options).expect("start cluster");
    cluster.wait_for_leader(DEADLINE).expect("a leader");
    blocking(|| cluster.add_storage_learner(4)).expect("add node 4");
    let client = client_at(&cluster, cluster.endpoint_list());
    // Every node has registered and is up once status says so.
    wait_status(&cluster, "all four storage nodes up", |s| {
        (1..=4).all(|id| node(s, id)["storage"] == true && node(s, id)["state"] == "up")
    });
    (cluster, client)
}

fn client_at(cluster: &Cluster, endpoints: Vec<String>) -> Client {
    let mut config = ClientConfig::new(endpoints);
    config.secret = cluster.secret();
    config.deadline = Duration::from_secs(60);
    Client::new(config).unwrap()
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn node(status: &Value, id: u64) -> Value {
    status["nodes"].as_array().and_then(|nodes| nodes.iter().find(|n| n["id"] == id).cloned()).unwrap_or(Value::Null)
}

fn u64_of(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

/// Polls `cluster status --json` (through any live node) until `check` holds; returns that status.
fn wait_status(cluster: &Cluster, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    blocking(|| {
        wait_for(what, DEADLINE, || {
            let Ok(status) = cluster.status() else { return Ok(None) };
            // Only a status with the leader's liveness view counts.
            if !status["health_error"].is_null() {
                return Ok(None);
            }
            Ok(check(&status).then_some(status))
        })
    })
    .unwrap_or_else(|e| {
        let last = cluster.status().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        panic!("{e}\nlast status: {last}")
    })
}

/// Deterministic content, distinct per stamp (see `stamped_bytes`).
fn content(stamp: u32, len: usize) -> Vec<u8> {
    mendfs_testkit::stamped_bytes(stamp, 0, len)
}

async fn put(client: &Client, path: &str, data: Vec<u8>) -> Result<(), Error> {
    let size = data.len() as u64;
    client.put_file(path, std::io::Cursor::new(data), Some(size), None, |_| {}).await.map(|_| ())
}

/// Puts, retrying a write the busy machine made slower than the test's small grace period.
async fn put_retrying(client: &Client, path: &str, data: &[u8]) {
    for attempt in 0..10 {
        match put(client, path, data.to_vec()).await {
            Ok(()) => return,
            Err(e) if attempt < 9 && (e.to_string().contains("grace period") || e.is_retryable()) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("put {path}: {e}"),
        }
    }
}

async fn get(client: &Client, path: &str) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    client.get_file(path, &mut out, |_, _| {}).await?;
    Ok(out)
}

/// `count` files of `chunks` chunks each, written 8 at a time, with content stamps from
/// `first_stamp` on (distinct stamps: no two files share a chunk); returns their (path, stamp).
async fn write_files(client: &Client, prefix: &str, first_stamp: u32, count: u32, chunks: usize) -> Vec<(String, u32)> {
    let files: Vec<(String, u32)> = (0..count).map(|i| (format!("{prefix}/{i:04}"), first_stamp + i)).collect();
    for batch in files.chunks(8) {
        let puts = batch.iter().map(|(path, stamp)| async move {
            put_retrying(client, path, &content(*stamp, chunks * CHUNK)).await;
        });
        futures::future::join_all(puts).await;
    }
    files
}

async fn assert_all_readable(client: &Client, files: &[(String, u32)], chunks: usize) {
    for batch in files.chunks(8) {
        let reads = batch.iter().map(|(path, stamp)| async move {
            let data = get(client, path).await.unwrap_or_else(|e| panic!("read {path}: {e}"));
            assert!(data == content(*stamp, chunks * CHUNK), "{path} came back different");
        });
        futures::future::join_all(reads).await;
    }
}

fn leader(cluster: &Cluster) -> u64 {
    cluster.wait_for_leader(DEADLINE).unwrap()
}

fn total_chunk_files(cluster: &Cluster, ids: &[u64]) -> usize {
    ids.iter().map(|id| chunk_files(&cluster.nodes[id].data_dir).len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_nodes_are_detected_and_repaired_and_a_returning_node_is_trimmed() {
    let (mut cluster, _) = start_four(fast_args(&[]), BTreeMap::new()).await;
    let leader_id = leader(&cluster);
    let victim = (1..=3).find(|id| *id != leader_id).unwrap();
    let survivors: Vec<u64> = (1..=4).filter(|id| *id != victim).collect();
    let client = client_at(&cluster, survivors.iter().map(|id| cluster.addr(*id)).collect());
    let files = write_files(&client, "/heal", 0, 200, 2).await;
    let status = wait_status(&cluster, "400 chunks fully replicated", |s| {
        u64_of(&s["chunks"]) == 400 && u64_of(&s["under_replicated_chunks"]) == 0
    });
    assert!(u64_of(&node(&status, victim)["chunks"]) > 0, "the victim holds copies: {status}");

    blocking(|| cluster.kill(victim)).unwrap();
    wait_status(&cluster, "the killed node is down", |s| node(s, victim)["state"] == "down");
    let status = wait_status(&cluster, "repair restores three copies", |s| {
        u64_of(&s["chunks"]) == 400
            && u64_of(&s["under_replicated_chunks"]) == 0
            && u64_of(&node(s, victim)["chunks"]) == 0
    });
    assert_eq!(u64_of(&status["lost_chunks"]), 0, "{status}");
    assert!(status["repair"]["job_id"].as_u64().is_some(), "a repair job was recorded: {status}");
    assert_all_readable(&client, &files, 2).await;

    // The dead node comes back after its copies were re-created elsewhere: its copies are
    // surplus and collected, so the cluster holds exactly three copies of each chunk again.
    blocking(|| cluster.restart(victim)).unwrap();
    wait_status(&cluster, "the returning node is up", |s| node(s, victim)["state"] == "up");
    blocking(|| {
        wait_for("surplus copies collected: three copies per chunk on disk", DEADLINE, || {
            Ok((total_chunk_files(&cluster, &[1, 2, 3, 4]) == 3 * 400).then_some(()))
        })
    })
    .unwrap_or_else(|e| panic!("{e}: {} chunk files", total_chunk_files(&cluster, &[1, 2, 3, 4])));

    // A second loss (at most RF-1 = 2 nodes down at once): the storage-only node.
    blocking(|| cluster.kill(4)).unwrap();
    wait_status(&cluster, "node 4 is down", |s| node(s, 4)["state"] == "down");
    let status = wait_status(&cluster, "repair restores three copies after the second loss", |s| {
        u64_of(&s["chunks"]) == 400 && u64_of(&s["under_replicated_chunks"]) == 0 && u64_of(&node(s, 4)["chunks"]) == 0
    });
    assert_eq!(u64_of(&status["lost_chunks"]), 0, "{status}");
    // And with the first victim killed again, two nodes are down at once: every chunk keeps
    // the two copies two live nodes can hold, and every file reads correctly.
    blocking(|| cluster.kill(victim)).unwrap();
    let status = wait_status(&cluster, "two live nodes hold two copies of everything", |s| {
        node(s, victim)["state"] == "down"
            && u64_of(&s["lost_chunks"]) == 0
            && u64_of(&s["unplaceable_copies"]) == 400
            && u64_of(&s["under_replicated_chunks"]) == 400
    });
    assert_eq!(u64_of(&status["chunks"]), 400);
    let live: Vec<u64> = (1..=3).filter(|id| *id != victim).collect();
    let client = client_at(&cluster, live.iter().map(|id| cluster.addr(*id)).collect());
    assert_all_readable(&client, &files, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_resumes_from_its_checkpoint_after_the_leader_is_killed() {
    // Throttled so the repair is still running when the leader dies; a patient detector so the
    // restarted old leader is not declared down while it boots.
    let args = fast_args(&["--repair-bytes-per-sec", "1048576", "--acceptable-pause-ms", "3000"]);
    let (mut cluster, client) = start_four(args, BTreeMap::new()).await;
    let files = write_files(&client, "/resume", 0, 100, 4).await;
    let status = wait_status(&cluster, "400 chunks fully replicated", |s| {
        u64_of(&s["chunks"]) == 400 && u64_of(&s["under_replicated_chunks"]) == 0
    });
    let needed_bytes = u64_of(&node(&status, 4)["chunks"]) * CHUNK as u64;
    assert!(needed_bytes > 0);

    blocking(|| cluster.kill(4)).unwrap();
    // Under way, and its start already in the committed timeline: the leader notes a job at
    // its next detection tick, and an event it had not committed yet dies with it (the new
    // leader, finding the job committed, rightly does not announce it again).
    let status = wait_status(&cluster, "repair under way and its start recorded", |s| {
        let done = u64_of(&s["repair"]["done_bytes"]);
        let started = s["events"].as_array().is_some_and(|events| events.iter().any(|e| e["kind"] == "repair_started"));
        s["repair"]["finished_unix_ms"].is_null() && done > 0 && done * 3 < needed_bytes && started
    });
    let job_id = u64_of(&status["repair"]["job_id"]);
    let old_leader = leader(&cluster);
    let copied_by_old_leader = u64_of(&node(&status, old_leader)["health"]["repair_copied_bytes"]);
    blocking(|| cluster.kill(old_leader)).unwrap();
    // Another node takes over before the old leader is back (restarted at once, it could
    // reclaim its own term before anyone noticed).
    let new_leader = leader(&cluster);
    assert_ne!(new_leader, old_leader);
    blocking(|| cluster.spawn(old_leader, true)).unwrap();

    let status = wait_status(&cluster, "the new leader finishes the repair", |s| {
        u64_of(&s["chunks"]) == 400
            && u64_of(&s["under_replicated_chunks"]) == 0
            && u64_of(&node(s, 4)["chunks"]) == 0
            && s["leader"] != old_leader
    });
    assert_eq!(u64_of(&status["repair"]["job_id"]), job_id, "the same job resumed: {status}");
    assert!(status["repair"]["finished_unix_ms"].is_u64(), "{status}");
    // The timeline is committed: the new leader continues the old one's story (node 4 down,
    // the job it started) instead of starting over, and tells it once.
    let status = wait_status(&cluster, "the timeline tells the whole story", |s| {
        let events = s["events"].as_array().cloned().unwrap_or_default();
        let has = |kind: &str, leader_node: Option<u64>| {
            events.iter().any(|e| e["kind"] == kind && leader_node.is_none_or(|id| e["node"] == id))
        };
        has("leader", Some(old_leader)) && has("leader", Some(new_leader)) && has("repair_finished", None)
    });
    let events = status["events"].as_array().unwrap();
    let count = |kind: &str, state: Option<&str>| {
        events.iter().filter(|e| e["kind"] == kind && state.is_none_or(|state| e["state"] == state)).count()
    };
    let node4_down =
        events.iter().filter(|e| e["kind"] == "node_state" && e["node"] == 4 && e["state"] == "down").count();
    assert_eq!(node4_down, 1, "node 4's death recorded once, by the leader that saw it: {events:?}");
    assert_eq!(count("repair_started", None), 1, "the job started once: {events:?}");
    let old_leader_at = events.iter().position(|e| e["kind"] == "leader" && e["node"] == old_leader).unwrap();
    let down_at = events.iter().position(|e| e["kind"] == "node_state" && e["node"] == 4).unwrap();
    let new_leader_at = events.iter().rposition(|e| e["kind"] == "leader" && e["node"] == new_leader).unwrap();
    assert!(old_leader_at < down_at && down_at < new_leader_at, "in order: {events:?}");
    let copied: u64 = (1..=3)
        .filter(|id| *id != old_leader)
        .map(|id| u64_of(&node(&status, id)["health"]["repair_copied_bytes"]))
        .sum::<u64>()
        + u64_of(&node(&status, old_leader)["health"]["repair_copied_bytes"])
        + copied_by_old_leader;
    assert!(
        copied < needed_bytes * 3 / 2,
        "copied {copied} bytes to restore {needed_bytes}: the repair started over. {status}"
    );
    // The old leader's counter was sampled one heartbeat before its death, so a few of its
    // last copies may be missing from the sum.
    assert!(copied * 10 >= needed_bytes * 9, "copied {copied}, far below the {needed_bytes} needed?");
    assert_all_readable(&client, &files, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrubber_finds_corrupt_chunks_and_they_are_repaired() {
    let args = fast_args(&["--scrub-bytes-per-sec", "104857600", "--scrub-interval-ms", "500"]);
    let (cluster, client) = start_four(args, BTreeMap::new()).await;
    let files = write_files(&client, "/rot", 0, 40, 2).await;
    wait_status(&cluster, "80 chunks fully replicated", |s| {
        u64_of(&s["chunks"]) == 80 && u64_of(&s["under_replicated_chunks"]) == 0
    });
    // Flip one byte in the middle of 10 chunk files spread over the nodes.
    let mut all: Vec<PathBuf> = (1..=4).flat_map(|id| chunk_files(&cluster.nodes[&id].data_dir)).collect();
    all.sort();
    let step = all.len() / 10;
    let corrupted: Vec<PathBuf> = (0..10).map(|i| all[i * step].clone()).collect();
    for path in &corrupted {
        let mut bytes = std::fs::read(path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x5a;
        std::fs::write(path, bytes).unwrap();
    }
    let status = wait_status(&cluster, "the scrubbers find all 10 corrupt copies", |s| {
        (1..=4).map(|id| u64_of(&node(s, id)["health"]["checksum_errors"])).sum::<u64>() >= 10
    });
    let found: u64 = (1..=4).map(|id| u64_of(&node(&status, id)["health"]["checksum_errors"])).sum();
    assert_eq!(found, 10, "exactly the corrupted copies are reported: {status}");
    wait_status(&cluster, "repair restores three good copies", |s| {
        u64_of(&s["under_replicated_chunks"]) == 0 && u64_of(&s["chunks"]) == 80
    });
    // Every corrupted copy is back with the right bytes, on its node or another.
    blocking(|| {
        wait_for("every chunk has three good copies on disk", DEADLINE, || {
            let good = (1..=4)
                .flat_map(|id| chunk_files(&cluster.nodes[&id].data_dir))
                .filter(|path| {
                    let name = path.file_name().unwrap().to_string_lossy().to_string();
                    std::fs::read(path).is_ok_and(|bytes| blake3::hash(&bytes).to_hex().as_str() == name)
                })
                .count();
            Ok((good == 3 * 80).then_some(()))
        })
    })
    .unwrap();
    assert_all_readable(&client, &files, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_target_holding_a_rotted_copy_copies_the_chunk_afresh() {
    // A long orphan grace, so GC leaves the planted stale copies alone until the repair comes.
    let (mut cluster, client) = start_four(fast_args(&["--orphan-grace-ms", "120000"]), BTreeMap::new()).await;
    let files = write_files(&client, "/stale", 0, 1, 8).await;
    wait_status(&cluster, "8 chunks fully replicated", |s| {
        u64_of(&s["chunks"]) == 8 && u64_of(&s["under_replicated_chunks"]) == 0
    });
    // Every chunk has three copies on four nodes. For each chunk node 4 holds, plant a rotted
    // copy (a stale orphan whose bytes went bad) on the one node that lacks the chunk: once node
    // 4 is gone, that node is the only place repair can copy it to.
    let node_4_dir = cluster.nodes[&4].data_dir.clone();
    let mut planted = Vec::new();
    for path_on_4 in chunk_files(&node_4_dir) {
        let relative = path_on_4.strip_prefix(&node_4_dir).unwrap().to_path_buf();
        let target = (1..=3).find(|id| !cluster.nodes[id].data_dir.join(&relative).exists()).unwrap();
        let path = cluster.nodes[&target].data_dir.join(&relative);
        let mut bytes = std::fs::read(&path_on_4).unwrap();
        bytes[0] ^= 0x5a;
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        planted.push((target, path));
    }
    assert!(!planted.is_empty(), "node 4 holds copies");

    blocking(|| cluster.kill(4)).unwrap();
    wait_status(&cluster, "repair restores three copies without node 4", |s| {
        node(s, 4)["state"] == "down"
            && u64_of(&s["chunks"]) == 8
            && u64_of(&s["under_replicated_chunks"]) == 0
            && u64_of(&node(s, 4)["chunks"]) == 0
    });
    // Each target answered with a fresh copy, not "already present" over its rotted one.
    for (target, path) in &planted {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            blake3::hash(&bytes).to_hex().as_str(),
            name,
            "node {target} still holds a rotted copy of {name} after the repair"
        );
        let quarantine = cluster.nodes[target].data_dir.join("chunks").join("quarantine");
        let kept = std::fs::read_dir(&quarantine)
            .unwrap()
            .flatten()
            .any(|entry| entry.file_name().to_string_lossy().starts_with(&name));
        assert!(kept, "node {target} quarantined its rotted copy of {name}");
    }
    assert_all_readable(&client, &files, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_briefly_paused_node_is_suspected_then_up_without_repair() {
    let (mut cluster, client) = start_four(fast_args(&[]), BTreeMap::new()).await;
    write_files(&client, "/pause", 0, 20, 1).await;
    wait_status(&cluster, "20 chunks fully replicated", |s| u64_of(&s["under_replicated_chunks"]) == 0);
    blocking(|| cluster.pause(4)).unwrap();
    let paused_at = Instant::now();
    let status = wait_status(&cluster, "the paused node is suspect", |s| node(s, 4)["state"] == "suspect");
    blocking(|| cluster.resume(4)).unwrap();
    assert!(node(&status, 4)["phi"].as_f64().unwrap() >= 8.0, "{status}");
    let status = wait_status(&cluster, "the resumed node is up again", |s| node(s, 4)["state"] == "up");
    assert!(
        status["repair"].is_null(),
        "no repair for a node that was never down ({:?} paused): {status}",
        paused_at.elapsed()
    );
    assert_eq!(u64_of(&status["under_replicated_chunks"]), 0, "{status}");
    let leader_log = cluster.log(leader(&cluster));
    assert!(!leader_log.contains("storage node down"), "node 4 was declared down:\n{leader_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_drained_under_write_load_ends_with_no_chunks() {
    let (cluster, client) = start_four(fast_args(&[]), BTreeMap::new()).await;
    let files = write_files(&client, "/before", 0, 40, 2).await;
    let drained = 2u64;
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            // Bounded: at most 60 files or 60 s.
            let started = Instant::now();
            let mut written = Vec::new();
            for i in 0..60u32 {
                if started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let path = format!("/during/{i:04}");
                put_retrying(&client, &path, &content(50_000 + i, 2 * CHUNK)).await;
                written.push((path, 50_000 + i));
            }
            written
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    blocking(|| cluster.run_cli(&["cluster", "drain", &drained.to_string()])).expect("drain");
    let during = writer.await.unwrap();
    let status = wait_status(&cluster, "the drained node holds no chunks", |s| {
        let n = node(s, drained);
        n["draining"] == true
            && u64_of(&n["chunks"]) == 0
            && n["health"]["chunk_count"] == 0
            && u64_of(&s["under_replicated_chunks"]) == 0
    });
    assert_eq!(chunk_files(&cluster.nodes[&drained].data_dir).len(), 0, "{status}");
    assert_all_readable(&client, &files, 2).await;
    assert_all_readable(&client, &during, 2).await;
    // Now it can be removed without losing anything; a node with copies could not.
    let refused = blocking(|| cluster.run_cli(&["cluster", "remove-node", "4"]));
    assert!(refused.is_err_and(|e| e.to_string().contains("drain")), "node 4 still holds copies");
    blocking(|| cluster.run_cli(&["cluster", "undrain", &drained.to_string()])).expect("undrain");
    wait_status(&cluster, "undrained", |s| node(s, drained)["draining"] == false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_is_degraded_and_writes_go_elsewhere() {
    let capacity = 24 * CHUNK as u64;
    let node_args = BTreeMap::from([(3u64, vec!["--storage-capacity-bytes".to_string(), capacity.to_string()])]);
    let (cluster, client) = start_four(fast_args(&[]), node_args).await;
    let mut files = Vec::new();
    let by = Instant::now() + DEADLINE;
    let mut round = 0u32;
    // Write until node 3 is past 90 % of its cap and declared degraded.
    loop {
        files.extend(write_files(&client, &format!("/full/{round}"), 1000 + round * 10, 4, 2).await);
        let status = blocking(|| cluster.status()).unwrap();
        if node(&status, 3)["state"] == "degraded" {
            break;
        }
        assert!(Instant::now() < by, "node 3 never became degraded: {status}");
        round += 1;
    }
    let status = wait_status(&cluster, "node 3 degraded", |s| node(s, 3)["state"] == "degraded");
    let held = u64_of(&node(&status, 3)["health"]["chunk_bytes"]);
    assert!(held <= capacity, "the cap holds: {held} > {capacity}");
    // Writes go on, to the other nodes.
    let after = write_files(&client, "/after-full", 0, 20, 2).await;
    for (path, _) in &after {
        let info = client.stat_file(path).await.unwrap();
        for chunk in &info.chunks {
            assert!(!chunk.replicas.contains(&3), "{path} placed a chunk on the degraded node");
            assert_eq!(chunk.replicas.len(), 3);
        }
    }
    let status = wait_status(&cluster, "fully replicated", |s| u64_of(&s["under_replicated_chunks"]) == 0);
    assert_eq!(u64_of(&status["lost_chunks"]), 0);
    assert_all_readable(&client, &after, 2).await;
    assert_all_readable(&client, &files, 2).await;
}
