//! The node-side fault injection that `mendfs chaos` drives, against real `mendfs server`
//! processes: refused without `--allow-fault-injection`, inert without it, a full chunk store
//! through `<data_dir>/faults.json` seen by writes and by `cluster status` as a real full disk
//! is, and `--unsafe-local-reads` answering stale values that the same scenario without it never
//! answers. Every wait polls with a deadline; nothing asserts on wall-clock time.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mendfs_client::{Client, ClientConfig, Error};
use mendfs_testkit::{wait_for, Cluster, ClusterOptions};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(90);
const FAULT_FILE: &str = "faults.json";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

fn start(options: ClusterOptions) -> Cluster {
    let cluster = Cluster::start(binary(), options).expect("start cluster");
    cluster.wait_for_leader(DEADLINE).expect("a leader");
    cluster
}

fn client_at(cluster: &Cluster, endpoints: Vec<String>) -> Client {
    let mut config = ClientConfig::new(endpoints);
    config.secret = cluster.secret();
    Client::new(config).expect("client")
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn args(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| arg.to_string()).collect()
}

fn node(status: &Value, id: u64) -> Value {
    status["nodes"].as_array().and_then(|nodes| nodes.iter().find(|n| n["id"] == id).cloned()).unwrap_or(Value::Null)
}

/// Polls `cluster status --json` until `check` holds for a status with the leader's health view.
fn wait_status(cluster: &Cluster, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    blocking(|| {
        wait_for(what, DEADLINE, || {
            let Ok(status) = cluster.status() else { return Ok(None) };
            Ok((status["health_error"].is_null() && check(&status)).then_some(status))
        })
    })
    .unwrap_or_else(|e| panic!("{e}\nlast status: {:?}", cluster.status().map(|s| s.to_string())))
}

/// Writes the control file the way a careful writer does: elsewhere, then renamed into place.
fn set_faults(data_dir: &Path, json: &str) {
    let temp = data_dir.join("faults.json.tmp");
    std::fs::write(&temp, json).unwrap();
    std::fs::rename(&temp, data_dir.join(FAULT_FILE)).unwrap();
}

/// Puts 20 000 bytes: above the inline limit, so the content goes to storage nodes.
async fn put(client: &Client, path: &str, stamp: u32) -> Result<(), Error> {
    let data = mendfs_testkit::stamped_bytes(stamp, 0, 20_000);
    let size = data.len() as u64;
    client.put_file(path, std::io::Cursor::new(data), Some(size), None, |_| {}).await.map(|_| ())
}

#[test]
fn unsafe_local_reads_without_allow_fault_injection_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    let run = |extra: &[&str]| {
        let output = Command::new(binary())
            .args(["server", "--node-id", "1", "--listen", "127.0.0.1:0", "--insecure-dev", "--data-dir"])
            .arg(&data_dir)
            .args(extra)
            .env_clear()
            .output()
            .unwrap();
        assert!(!output.status.success(), "a node asked for a fault mode without the switch must not start");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let error = run(&["--unsafe-local-reads"]);
    assert!(error.contains("--unsafe-local-reads") && error.contains("--allow-fault-injection"), "{error}");
    // The same from a config file: a stray line cannot turn the broken mode on either.
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "unsafe_local_reads = true\n").unwrap();
    let error = run(&["--config", config.to_str().unwrap()]);
    assert!(error.contains("--allow-fault-injection"), "{error}");
    assert!(!data_dir.exists(), "nothing was started or written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_file_on_a_node_without_the_switch_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // There before the node starts, so a node that read it at all would be full from the start.
    let data_dir = dir.path().join("node-1");
    std::fs::create_dir_all(&data_dir).unwrap();
    set_faults(&data_dir, r#"{"chunk_store_full": true, "chunk_io_delay_ms": 60000}"#);
    let options = ClusterOptions {
        nodes: 1,
        dir: Some(dir.path().to_path_buf()),
        server_args: args(&["--replication-factor", "1", "--health-interval-ms", "250"]),
        ..ClusterOptions::default()
    };
    let cluster = start(options);
    let client = client_at(&cluster, cluster.endpoint_list());

    let status = wait_status(&cluster, "node 1 up with its health reported", |s| {
        node(s, 1)["state"] == "up" && node(s, 1)["health"]["disk_capacity_bytes"].as_u64().unwrap_or(0) > 0
    });
    let health = &node(&status, 1)["health"];
    assert!(health["disk_used_bytes"].as_u64() < health["disk_capacity_bytes"].as_u64(), "not full: {status}");
    put(&client, "/inert", 1).await.expect("a put succeeds: the control file is not read");
    assert!(!cluster.log(1).to_lowercase().contains("fault injection"), "the node never mentions fault injection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_full_disk_refuses_writes_shows_in_status_and_clears() {
    let options = ClusterOptions {
        server_args: args(&["--allow-fault-injection", "--health-interval-ms", "250"]),
        ..ClusterOptions::default()
    };
    let cluster = start(options);
    let client = client_at(&cluster, cluster.endpoint_list());
    wait_status(&cluster, "three storage nodes up", |s| (1..=3).all(|id| node(s, id)["state"] == "up"));
    put(&client, "/before", 1).await.expect("a put while every disk has room");

    let full_node = 3;
    let data_dir = cluster.nodes[&full_node].data_dir.clone();
    set_faults(&data_dir, r#"{"chunk_store_full": true}"#);
    // RF = 3 on three nodes: every chunk needs node 3. The first put after the fault is in force
    // fails at node 3's prepare (disk full), or, once the leader has judged node 3, waits for
    // placement and fails naming it degraded.
    let mut stamp = 2;
    let error = loop {
        match put(&client, &format!("/during/{stamp}"), stamp).await {
            Ok(()) => stamp += 1,
            Err(error) => break error.to_string(),
        }
        assert!(stamp < 1_000, "puts kept succeeding on a full node");
    };
    eprintln!("the put on a full node failed with: {error}");
    assert!(
        error.contains("disk full") || error.contains(&format!("node {full_node} degraded")),
        "a clear error naming the full disk: {error}"
    );
    let status = wait_status(&cluster, "node 3 degraded with a full disk", |s| {
        let n = node(s, full_node);
        let capacity = n["health"]["disk_capacity_bytes"].as_u64().unwrap_or(0);
        n["state"] == "degraded" && capacity > 0 && n["health"]["disk_used_bytes"].as_u64() == Some(capacity)
    });
    let reason = node(&status, full_node)["state_reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("disk 100% full"), "status says why: {reason}");
    assert!(blocking(|| cluster.log(full_node)).contains("fault injection: faults in force now"));

    // Cleared (a missing file is no faults): up again, and puts succeed.
    std::fs::remove_file(data_dir.join(FAULT_FILE)).unwrap();
    wait_status(&cluster, "node 3 up again", |s| node(s, full_node)["state"] == "up");
    put(&client, "/after", 1_000).await.expect("a put once the disk has room again");
    let info = client.stat_file("/after").await.unwrap();
    assert!(info.chunks.iter().all(|chunk| chunk.replicas.contains(&full_node)), "node 3 takes copies again");
}

/// One round: node 3 (a follower that never campaigns) is paused, the key gets a new value
/// through nodes 1 and 2, node 3 resumes and is read from at once, through its address alone.
/// Returns whether that read was stale. Waits for node 3 to catch up before returning.
async fn pause_write_resume_read(cluster: &mut Cluster, writer: &Client, reader: &Client, round: u32) -> bool {
    let key = b"chaos/register";
    let value = format!("round {round}");
    blocking(|| cluster.pause(3)).expect("SIGSTOP node 3");
    writer.set(key, value.as_bytes(), None, None).await.expect("a write through nodes 1 and 2");
    blocking(|| cluster.resume(3)).expect("SIGCONT node 3");
    let read = reader.get(key).await.expect("a read through node 3");
    let stale = read.as_ref().map(|kv| kv.value.as_slice()) != Some(value.as_bytes());
    // Node 3 catches up before the next round, so each round starts from the same place.
    let mut last = None;
    for _ in 0..900 {
        match reader.get(key).await {
            Ok(Some(kv)) if kv.value == value.as_bytes() => return stale,
            other => last = Some(other),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("node 3 never caught up with {value:?}; last read: {last:?}\nnode 3 log:\n{}", cluster.log_tail(3, 20));
}

async fn stale_reads(unsafe_local_reads: bool, rounds: u32) -> (u32, u32) {
    let mut server_args = args(&["--allow-fault-injection"]);
    if unsafe_local_reads {
        server_args.push("--unsafe-local-reads".into());
    }
    // Nodes 2 and 3 never campaign, so node 1 leads throughout and node 3 stays a follower.
    let patient = args(&["--election-timeout-ms", "60000"]);
    let options = ClusterOptions {
        server_args,
        node_args: BTreeMap::from([(2, patient.clone()), (3, patient)]),
        ..ClusterOptions::default()
    };
    let mut cluster = start(options);
    assert_eq!(blocking(|| cluster.wait_for_leader(DEADLINE)).unwrap(), 1, "only node 1 campaigns");
    let writer = client_at(&cluster, vec![cluster.addr(1), cluster.addr(2)]);
    let reader = client_at(&cluster, vec![cluster.addr(3)]);
    writer.set(b"chaos/register", b"round 0", None, None).await.unwrap();
    let (mut stale, mut played) = (0, 0);
    for round in 1..=rounds {
        played += 1;
        if pause_write_resume_read(&mut cluster, &writer, &reader, round).await {
            stale += 1;
            if unsafe_local_reads {
                break;
            }
        }
    }
    if unsafe_local_reads {
        assert!(cluster.log(3).contains("UNSAFE LOCAL READS"), "the node warns loudly at start");
    }
    (stale, played)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_local_reads_can_answer_stale_values_that_read_index_never_does() {
    let (stale, played) = stale_reads(true, 30).await;
    eprintln!("with --unsafe-local-reads: a stale read in round {played}");
    assert!(stale > 0, "no stale read in {played} rounds with --unsafe-local-reads");
    let (stale, played) = stale_reads(false, 5).await;
    assert_eq!(stale, 0, "{stale} stale reads in {played} rounds through the leader and read-index");
}
