//! The metadata cluster against real `mendfs server` processes on 127.0.0.1: failover,
//! compare-and-set, sessions, watches, snapshots, partitions and bad input.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mendfs_client::{Client, ClientConfig, Error, EventKind};
use mendfs_testkit::{wait_for, Cluster, ClusterOptions};

const DEADLINE: Duration = Duration::from_secs(90);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

fn start(options: ClusterOptions) -> Cluster {
    let cluster = Cluster::start(binary(), options).expect("start cluster");
    cluster.wait_for_leader(DEADLINE).expect("a leader is elected");
    cluster
}

fn client_for(cluster: &Cluster, endpoints: Vec<String>) -> Client {
    let mut config = ClientConfig::new(endpoints);
    config.secret = cluster.secret();
    config.deadline = Duration::from_secs(60);
    Client::new(config).expect("client")
}

fn client(cluster: &Cluster) -> Client {
    client_for(cluster, cluster.endpoint_list())
}

/// Runs blocking harness work (process control, polling) from an async test.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sets_survive_a_leader_kill_and_a_full_restart() {
    let mut cluster = start(ClusterOptions::default());
    let client = client(&cluster);
    let acknowledged: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    const CLIENTS: usize = 8;
    const SETS_PER_CLIENT: usize = 125;

    let mut tasks = Vec::new();
    for client_idx in 0..CLIENTS {
        let client = client.clone();
        let acknowledged = acknowledged.clone();
        tasks.push(tokio::spawn(async move {
            for set_idx in 0..SETS_PER_CLIENT {
                let key = format!("load/{client_idx}/{set_idx}");
                let value = format!("v{client_idx}-{set_idx}");
                // A create, so that a write applied once and retried (alone or in another
                // batch, across the kill) would come back `KeyExists` were it applied twice.
                client.create(key.as_bytes(), value.as_bytes(), None).await.map_err(|e| format!("{key}: {e}"))?;
                acknowledged.lock().unwrap().insert(key, value);
            }
            Ok::<(), String>(())
        }));
    }
    // Kill the leader once about half of the sets are acknowledged.
    let cluster_ref = &mut cluster;
    let killed = blocking(|| {
        wait_for("half of the sets", DEADLINE, || Ok((acknowledged.lock().unwrap().len() >= 500).then_some(())))?;
        let leader = cluster_ref.wait_for_leader(DEADLINE)?;
        cluster_ref.kill(leader)?;
        anyhow::Ok(leader)
    })
    .expect("kill the leader midway");
    for task in tasks {
        task.await.expect("client task").expect("every set is eventually acknowledged");
    }
    assert_eq!(acknowledged.lock().unwrap().len(), CLIENTS * SETS_PER_CLIENT);
    let new_leader = blocking(|| cluster.wait_for_leader(DEADLINE)).expect("new leader");
    assert_ne!(new_leader, killed, "the killed node cannot still lead");

    // Restart every node: the killed one and, with SIGKILL, the two that stayed up.
    blocking(|| {
        for id in 1..=3 {
            cluster.restart(id)?;
        }
        cluster.wait_for_leader(DEADLINE)
    })
    .expect("the cluster comes back");
    let acknowledged = acknowledged.lock().unwrap().clone();
    for (key, value) in acknowledged {
        let kv = client.get(key.as_bytes()).await.expect("get").unwrap_or_else(|| panic!("{key} was lost"));
        assert_eq!(kv.value, value.as_bytes(), "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_counter_under_contention_counts_exactly() {
    let cluster = start(ClusterOptions::default());
    let client = client(&cluster);
    client.set(b"counter", b"0", Some(0), None).await.expect("create the counter");
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u64;
            for _ in 0..100 {
                loop {
                    let kv = client.get(b"counter").await?.expect("the counter exists");
                    let value: u64 = String::from_utf8_lossy(&kv.value).parse().expect("a number");
                    match client.set(b"counter", (value + 1).to_string().as_bytes(), Some(kv.version), None).await {
                        Ok(_) => break,
                        Err(Error::VersionMismatch { expected, actual }) => {
                            assert_eq!(expected, kv.version);
                            assert!(actual > expected, "a conflict means someone else moved the counter on");
                            conflicts += 1;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok::<u64, Error>(conflicts)
        }));
    }
    let mut conflicts = 0;
    for task in tasks {
        conflicts += task.await.expect("task").expect("increments succeed");
    }
    let kv = client.get(b"counter").await.expect("get").expect("counter");
    assert_eq!(String::from_utf8_lossy(&kv.value), "400", "after {conflicts} CAS conflicts");
    assert_eq!(kv.version, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_key_vanishes_after_its_client_is_killed_and_watchers_see_it() {
    let cluster = start(ClusterOptions::default());
    let client = client(&cluster);
    let ttl = Duration::from_secs(2);
    let mut holder = cluster
        .cli()
        .args(["kv", "create", "service/leader", "node-a", "--ephemeral", "--ttl", "2", "--hold"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the holder");
    let appeared_by = Instant::now() + DEADLINE;
    let created = loop {
        if let Some(kv) = client.get(b"service/leader").await.expect("get") {
            break kv;
        }
        assert!(Instant::now() < appeared_by, "the ephemeral key never appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(created.session_id, 0, "the key belongs to a session");

    let mut watch = client.watch(b"service/leader", false, created.modify_revision + 1);
    // Outlive several keep-alives first: a live holder keeps its key.
    tokio::time::sleep(ttl * 2).await;
    assert!(client.get(b"service/leader").await.expect("get").is_some(), "a live session keeps its key");

    holder.kill().expect("SIGKILL the holder");
    holder.wait().expect("reap the holder");
    let killed_at = Instant::now();
    let reply = tokio::time::timeout(DEADLINE, watch.next()).await.expect("the watcher hears of it").expect("watch");
    let deleted_after = killed_at.elapsed();
    assert_eq!(reply.events.len(), 1);
    assert_eq!(reply.events[0].kind, EventKind::Delete as i32, "the watcher sees the delete");
    assert!(client.get(b"service/leader").await.expect("get").is_none());
    // TTL plus one keep-alive interval, plus slack for a busy machine's scheduling.
    let bound = ttl + ttl / 3 + Duration::from_secs(2);
    assert!(deleted_after <= bound, "deleted {deleted_after:?} after the kill; expected within {bound:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_gets_every_change_exactly_once_in_order_across_a_leader_kill() {
    let mut cluster = start(ClusterOptions::default());
    let client = client(&cluster);
    let start_revision = client.set(b"w/start", b"", None, None).await.expect("set").modify_revision + 1;
    let mut watch = client_for(&cluster, cluster.endpoint_list()).watch(b"w/", true, start_revision);
    const WRITES: usize = 300;
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..WRITES {
                client.set(format!("w/{}", i % 7).as_bytes(), format!("{i}").as_bytes(), None, None).await?;
            }
            Ok::<(), Error>(())
        })
    };
    let mut seen = Vec::new();
    let mut last_revision = 0;
    let mut killed = false;
    while seen.len() < WRITES {
        let reply = tokio::time::timeout(DEADLINE, watch.next()).await.expect("events keep coming").expect("watch");
        assert!(reply.revision > last_revision, "revisions strictly increase");
        last_revision = reply.revision;
        for event in reply.events {
            assert_eq!(event.kind, EventKind::Put as i32);
            seen.push(String::from_utf8_lossy(&event.kv.expect("kv").value).into_owned());
        }
        if !killed && seen.len() >= WRITES / 3 {
            let leader = blocking(|| cluster.wait_for_leader(DEADLINE)).expect("leader");
            blocking(|| cluster.kill(leader)).expect("kill");
            killed = true;
        }
    }
    writer.await.expect("writer").expect("every write acknowledged");
    let expected: Vec<String> = (0..WRITES).map(|i| i.to_string()).collect();
    assert_eq!(seen, expected, "every change exactly once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_during_compaction_catches_up_by_snapshot() {
    let options = ClusterOptions {
        server_args: vec!["--snapshot-every-entries".into(), "50".into()],
        ..ClusterOptions::default()
    };
    let mut cluster = start(options);
    let client = client(&cluster);
    let leader = blocking(|| cluster.wait_for_leader(DEADLINE)).expect("leader");
    let lagging = (1..=3).find(|id| *id != leader).expect("a follower");
    blocking(|| cluster.kill(lagging)).expect("kill");
    for i in 0..400 {
        client.set(format!("snap/{i}").as_bytes(), format!("{i}").as_bytes(), None, None).await.expect("set");
    }
    // The leader's log is compacted far past anything the stopped node has.
    let purged = blocking(|| {
        wait_for("the leader to purge its log", DEADLINE, || {
            let status = cluster.status()?;
            let leader_node =
                status["nodes"].as_array().and_then(|nodes| nodes.iter().find(|n| n["role"] == "leader").cloned());
            Ok(leader_node.and_then(|n| n["purged_index"].as_u64()).filter(|purged| *purged > 200))
        })
    })
    .expect("log compaction");
    blocking(|| cluster.restart(lagging)).expect("restart");
    blocking(|| {
        wait_for("the restarted node to catch up", DEADLINE, || {
            let status = cluster.status()?;
            let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
            let leader_revision = nodes.iter().find(|n| n["role"] == "leader").and_then(|n| n["revision"].as_u64());
            let node = nodes.iter().find(|n| n["id"].as_u64() == Some(lagging));
            Ok(node.filter(|n| n["revision"].as_u64() == leader_revision && leader_revision.is_some()).map(|_| ()))
        })
    })
    .expect("catch-up");
    assert!(
        cluster.nodes[&lagging].data_dir.join("snapshot.bin").exists(),
        "the node received a snapshot (the leader had purged its log up to {purged})"
    );
    // Its state is complete: with the other follower gone, reads need the restarted node.
    let other = (1..=3).find(|id| *id != leader && *id != lagging).expect("the other follower");
    blocking(|| cluster.kill(other)).expect("kill the other follower");
    for i in (0..400).step_by(37) {
        let kv = client.get(format!("snap/{i}").as_bytes()).await.expect("get").expect("present");
        assert_eq!(kv.value, i.to_string().as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_minority_fails_with_a_timeout_and_never_applies() {
    let mut cluster = start(ClusterOptions::default());
    let leader = blocking(|| cluster.wait_for_leader(DEADLINE)).expect("leader");
    let lone = (1..=3).find(|id| *id != leader).expect("a follower");
    let other = (1..=3).find(|id| *id != leader && *id != lone).expect("the other follower");
    cluster.pause(leader).expect("SIGSTOP the leader");
    cluster.pause(other).expect("SIGSTOP a follower");

    let started = Instant::now();
    let output = cluster
        .cli_at(&cluster.addr(lone))
        .args(["kv", "set", "minority/key", "must-not-apply", "--timeout", "5"])
        .output()
        .expect("run the CLI");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a minority write must fail");
    assert!(stderr.contains("timed out"), "a clear timeout error, got: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line on stderr, got: {stderr}");
    assert!(took < Duration::from_secs(60), "the CLI never hangs (took {took:?})");

    cluster.resume(leader).expect("SIGCONT");
    cluster.resume(other).expect("SIGCONT");
    blocking(|| cluster.wait_for_leader(DEADLINE)).expect("leader again");
    let client = client(&cluster);
    // A write after the heal is ordered after anything the paused nodes still held.
    client.set(b"minority/barrier", b"", None, None).await.expect("write after heal");
    assert!(client.get(b"minority/key").await.expect("get").is_none(), "the failed write never applied");
}

/// The write reaches a follower, which forwards it to a leader that is paused; the client gives
/// up; the leader resumes at once, still leading (the followers' election timeout is a minute,
/// so they never campaign), with a majority. The forwarded write sitting in its socket must be
/// refused, not applied: the client was told it failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_its_client_gave_up_on_is_not_applied_by_a_leader_that_resumes() {
    let patient = vec!["--election-timeout-ms".to_string(), "60000".to_string()];
    let options =
        ClusterOptions { node_args: BTreeMap::from([(2, patient.clone()), (3, patient)]), ..ClusterOptions::default() };
    let mut cluster = start(options);
    let leader = blocking(|| cluster.wait_for_leader(DEADLINE)).expect("leader");
    assert_eq!(leader, 1, "only node 1 campaigns");
    let client = client(&cluster);
    client.set(b"resume/before", b"", None, None).await.expect("a write while all is well");

    cluster.pause(1).expect("SIGSTOP the leader");
    let output = blocking(|| {
        cluster.cli_at(&cluster.addr(2)).args(["kv", "set", "resume/key", "must-not-apply", "--timeout", "3"]).output()
    })
    .expect("run the CLI");
    cluster.resume(1).expect("SIGCONT the leader");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("timed out"), "the client gave up: {stderr}");

    assert_eq!(blocking(|| cluster.wait_for_leader(DEADLINE)).expect("leader"), 1, "node 1 still leads");
    client.set(b"resume/barrier", b"", None, None).await.expect("write after the resume");
    assert!(
        client.get(b"resume/key").await.expect("get").is_none(),
        "a write reported as timed out was applied when the leader resumed"
    );
    let log = cluster.log(1);
    assert!(log.contains("after its deadline"), "the leader says why it refused the request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clean_errors_and_the_node_stays_up() {
    let options = ClusterOptions {
        server_args: vec!["--max-key-bytes".into(), "64".into(), "--max-value-bytes".into(), "1024".into()],
        ..ClusterOptions::default()
    };
    let cluster = start(options);
    let client = client(&cluster);
    client.set(b"keep/me", b"safe", None, None).await.expect("set");

    // Garbage on the gRPC port, and a truncated HTTP/2 preface.
    for garbage in [&b"\x00\x01\x02 not http2 at all \xff\xfe"[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"] {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(cluster.addr(1)).expect("connect");
        stream.write_all(garbage).expect("write garbage");
    }

    // Keys and values beyond the limits.
    let err = client.set(&[b'k'; 65], b"v", None, None).await.expect_err("key too long");
    assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("limit is 64")), "{err}");
    let err = client.set(b"big", &[0u8; 1025], None, None).await.expect_err("value too big");
    assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("limit is 1024")), "{err}");
    let err = client.set(b"", b"v", None, None).await.expect_err("empty key");
    assert!(matches!(err, Error::InvalidArgument(_)));
    let huge = vec![0u8; 4 << 20];
    let err = client.set(b"huge", &huge, None, None).await.expect_err("message beyond the size limit");
    assert!(!err.is_retryable(), "refused, not retried: {err}");

    // Membership calls naming unknown nodes.
    let err = cluster.run_cli(&["cluster", "remove-node", "9"]).expect_err("unknown node");
    assert!(format!("{err:#}").contains("node 9 is not a member"), "{err:#}");
    let err = cluster.run_cli(&["cluster", "add-node", "0", "127.0.0.1:1"]).expect_err("node id 0");
    assert!(format!("{err:#}").contains("reserved"), "{err:#}");

    // Wrong, missing and malformed secrets are refused.
    let wrong = cluster.cli().env("MENDFS_SECRET", "not-the-secret").args(["kv", "get", "keep/me"]).output().unwrap();
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong cluster secret"));
    let missing = cluster.cli().env_remove("MENDFS_SECRET").args(["kv", "get", "keep/me"]).output().unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("a token is required"));
    assert!(
        cluster.log(1).contains("refused a call")
            || cluster.log(2).contains("refused a call")
            || cluster.log(3).contains("refused a call")
    );

    // Malformed payloads on the node-to-node service.
    let mut node = mendfs_proto::v1::node_client::NodeClient::connect(format!("http://{}", cluster.addr(1)))
        .await
        .expect("connect");
    let mut request = tonic::Request::new(mendfs_proto::v1::RaftPayload { data: vec![0xff; 37] });
    request.metadata_mut().insert(mendfs_proto::SECRET_HEADER, cluster.secret().unwrap().parse().unwrap());
    let status = node.append_entries(request).await.expect_err("malformed");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // The same on an append stream: the stream answers it with the error and ends.
    let cluster_id = cluster.status().expect("status")["cluster_id"].as_str().expect("a cluster id").to_string();
    let malformed = mendfs_proto::v1::AppendStreamRequest { data: vec![0xff; 37], ..Default::default() };
    let stream_request = |with_cluster_id: bool| {
        let mut request = tonic::Request::new(futures::stream::iter([malformed.clone()]));
        let metadata = request.metadata_mut();
        metadata.insert(mendfs_proto::SECRET_HEADER, cluster.secret().unwrap().parse().unwrap());
        metadata.insert(mendfs_proto::NODE_ID_HEADER, "2".parse().unwrap());
        if with_cluster_id {
            metadata.insert(mendfs_proto::CLUSTER_ID_HEADER, cluster_id.parse().unwrap());
        }
        request
    };
    let mut answers = node.append_stream(stream_request(true)).await.expect("a peer opens a stream").into_inner();
    let status = answers.message().await.expect_err("malformed");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // A caller that shows no cluster id is checked on every call, so it gets no stream.
    let status = node.append_stream(stream_request(false)).await.expect_err("no cluster id");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");

    // A streamed write that names no write, or a key beyond the limit, gets an error of its
    // own; the stream goes on to the next write.
    use mendfs_proto::v1::{batch_op, batch_result, BatchOp, PutRequest, StreamedWrite};
    let set = |key: &[u8]| StreamedWrite {
        op: Some(BatchOp {
            op: Some(batch_op::Op::Set(PutRequest { key: key.to_vec(), value: b"v".to_vec(), ..Default::default() })),
        }),
        ..Default::default()
    };
    let writes = vec![StreamedWrite::default(), set(&[b'k'; 65]), set(b"streamed/after-bad-ones")];
    let mut request = tonic::Request::new(futures::stream::iter(writes));
    request.metadata_mut().insert(mendfs_proto::SECRET_HEADER, cluster.secret().unwrap().parse().unwrap());
    let mut kv =
        mendfs_proto::v1::kv_client::KvClient::connect(format!("http://{}", cluster.addr(1))).await.expect("connect");
    let mut answers = kv.write_stream(request).await.expect("a write stream opens").into_inner();
    for what in ["no write", "a key too long"] {
        let answer = answers.message().await.expect("an answer").expect("not the end");
        let refused = match answer.result {
            Some(batch_result::Result::Error(error)) => error,
            other => panic!("{what}: {other:?}"),
        };
        assert_eq!(refused.code, tonic::Code::InvalidArgument as i32, "{what}: {refused:?}");
    }
    let answer = answers.message().await.expect("an answer").expect("not the end");
    assert!(matches!(answer.result, Some(batch_result::Result::Written(_))), "{answer:?}");
    assert!(answers.message().await.expect("a clean end").is_none());

    // Missing keys: a clear error, not an empty success.
    let err = cluster.run_cli(&["kv", "get", "no/such/key"]).expect_err("missing");
    assert!(format!("{err:#}").contains("not found"), "{err:#}");

    // Everything still up, nothing lost.
    let status = cluster.status().expect("status");
    let roles: Vec<String> = status["nodes"].as_array().unwrap().iter().map(|n| n["role"].to_string()).collect();
    assert!(!roles.iter().any(|r| r.contains("unreachable")), "{roles:?}");
    assert_eq!(client.get(b"keep/me").await.unwrap().unwrap().value, b"safe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_data_belongs_to_another_cluster_is_refused() {
    // Cluster B: one node with id 3, whose data directory we then move into cluster A.
    let other = Cluster::start(binary(), ClusterOptions { nodes: 1, ..ClusterOptions::default() }).expect("cluster B");
    other.wait_for_leader(DEADLINE).expect("B's leader");
    wait_for("B's cluster id", DEADLINE, || {
        Ok(other.status()?["cluster_id"].as_str().filter(|id| !id.is_empty()).map(str::to_string))
    })
    .expect("B records its id");
    let mut other = other;
    other.kill(1).expect("stop B");

    let mut cluster = start(ClusterOptions::default());
    let client = client(&cluster);
    client.set(b"a/data", b"precious", None, None).await.expect("set");
    let leader = blocking(|| cluster.wait_for_leader(DEADLINE)).expect("leader");
    let victim = (1..=3).find(|id| *id != leader).expect("a follower");
    blocking(|| cluster.kill(victim)).expect("kill");
    let victim_dir = cluster.nodes[&victim].data_dir.clone();
    std::fs::remove_dir_all(&victim_dir).expect("remove the victim's data");
    copy_dir(&other.nodes[&1].data_dir, &victim_dir);
    blocking(|| cluster.spawn(victim, true)).expect("start with the foreign data dir");

    for i in 0..20 {
        client.set(format!("a/after/{i}").as_bytes(), b"x", None, None).await.expect("A keeps working");
    }
    blocking(|| {
        wait_for("the refusal to be logged", DEADLINE, || {
            Ok((1..=3)
                .any(|id| {
                    cluster.log(id).contains("cluster id mismatch") || cluster.log(id).contains("another cluster")
                })
                .then_some(()))
        })
    })
    .expect("a clear error in a log");
    assert_eq!(client.get(b"a/data").await.unwrap().unwrap().value, b"precious", "nothing lost");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_add_and_remove_while_clients_write() {
    let mut cluster = start(ClusterOptions::default());
    let client = client(&cluster);
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                client.set(format!("m/{i}").as_bytes(), b"x", None, None).await?;
            }
            Ok::<(), Error>(())
        })
    };
    cluster.add_node_entry(4).expect("reserve node 4");
    blocking(|| cluster.spawn(4, false)).expect("start node 4 without --peers");
    let out = blocking(|| cluster.run_cli(&["cluster", "add-node", "4", &cluster.addr(4)])).expect("add-node");
    assert!(out.contains("voters: [1, 2, 3, 4]"), "{out}");
    let leader = blocking(|| cluster.wait_for_leader(DEADLINE)).expect("leader");
    let removed = (1..=3).find(|id| *id != leader).expect("a follower");
    let out = blocking(|| cluster.run_cli(&["cluster", "remove-node", &removed.to_string()])).expect("remove-node");
    assert!(!out.contains(&removed.to_string()) || out.contains("learners: []"), "{out}");
    writer.await.expect("writer").expect("writes go on through membership changes");
    let status = blocking(|| cluster.status()).expect("status");
    let ids: Vec<u64> = status["nodes"].as_array().unwrap().iter().filter_map(|n| n["id"].as_u64()).collect();
    assert!(ids.contains(&4) && !ids.contains(&removed), "{ids:?}");
    for i in 0..200 {
        assert!(client.get(format!("m/{i}").as_bytes()).await.unwrap().is_some());
    }
}

#[test]
fn server_refuses_to_start_without_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(binary())
        .args(["server", "--node-id", "1", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("MENDFS_SECRET")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no cluster secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_lost_its_disk_rejoins_without_harming_the_leader() {
    let mut cluster = start(ClusterOptions::default());
    let client = client(&cluster);
    for i in 0..50 {
        client.set(format!("disk/{i}").as_bytes(), b"before", None, None).await.expect("set");
    }
    let leader = blocking(|| cluster.wait_for_leader(DEADLINE)).expect("leader");
    // Not node 1: the lowest id would bootstrap a new cluster from an empty disk.
    let victim = (2..=3).find(|id| *id != leader).expect("a follower other than node 1");
    blocking(|| cluster.kill(victim)).expect("kill");
    std::fs::remove_dir_all(&cluster.nodes[&victim].data_dir).expect("wipe the disk");
    blocking(|| cluster.spawn(victim, true)).expect("restart on an empty disk");
    for i in 50..100 {
        client.set(format!("disk/{i}").as_bytes(), b"after", None, None).await.expect("writes go on");
    }
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    blocking(|| cluster.wait_for_caught_up(&ids, DEADLINE)).expect("the wiped node is re-replicated");
    for id in ids {
        assert!(!cluster.log(id).contains("panicked"), "node {id} panicked:\n{}", cluster.log_tail(id, 30));
    }
    assert_eq!(client.list(b"disk/", 0).await.expect("list").0.len(), 100);
}

/// With 100,000 sessions open, an abandoned session still expires on time: the leader finds
/// due sessions through its deadline index and expires them together, so its ephemeral key
/// is gone within TTL + 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ephemeral_key_expires_on_time_among_100000_sessions() {
    use futures::StreamExt;
    const SESSIONS: usize = 100_000;
    const TTL: Duration = Duration::from_secs(2);
    let cluster = start(ClusterOptions { nodes: 1, ..ClusterOptions::default() });
    let client = client(&cluster);
    let ready_by = Instant::now() + DEADLINE;
    while client.set(b"ready", b"1", None, None).await.is_err() {
        assert!(Instant::now() < ready_by, "the cluster never took a write");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let started = Instant::now();
    let opened: Vec<Result<_, Error>> = futures::stream::iter(0..SESSIONS)
        .map(|_| {
            let client = client.clone();
            // Long enough to outlive the test: these sessions are the crowd, not the subject.
            async move { client.open_session(Duration::from_secs(600)).await.map(|session| session.id()) }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let failed = opened.iter().filter(|opened| opened.is_err()).count();
    assert_eq!(failed, 0, "{failed} of {SESSIONS} sessions failed to open");
    eprintln!("{SESSIONS} sessions opened in {:.1?}", started.elapsed());

    for round in 0..3 {
        let session = client.open_session(TTL).await.unwrap();
        let key = format!("ephemeral/{round}");
        client.create(key.as_bytes(), b"held", Some(session.id())).await.unwrap();
        let abandoned = Instant::now();
        drop(session); // no keep-alive from here on
        let gone_after = loop {
            if client.get(key.as_bytes()).await.unwrap().is_none() {
                break abandoned.elapsed();
            }
            assert!(abandoned.elapsed() < Duration::from_secs(60), "the key never went away");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        eprintln!(
            "round {round}: the ephemeral key was gone {gone_after:.1?} after its session's last word (TTL {TTL:?})"
        );
        assert!(gone_after <= TTL + Duration::from_secs(2), "gone after {gone_after:?}, more than TTL + 2 s");
        assert!(gone_after >= TTL - Duration::from_millis(100), "gone after {gone_after:?}, before its TTL");
    }
}

/// `mendfs_rpc_requests_total` summed over the lines whose labels contain `label`.
fn rpc_count(http: &str, label: &str) -> f64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(http).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .lines()
        .filter(|line| line.starts_with("mendfs_rpc_requests_total{") && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether process `pid` has exited (gone, or a zombie its parent has not reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// For three nodes: each one's `--http` flag and the address it names, for `rpc_count`.
fn http_listeners() -> (BTreeMap<u64, Vec<String>>, BTreeMap<u64, String>) {
    let mut node_args = BTreeMap::new();
    let mut http = BTreeMap::new();
    for id in 1..=3u64 {
        let addr = format!("127.0.0.1:{}", mendfs_testkit::free_port().unwrap());
        node_args.insert(id, vec!["--http".to_string(), addr.clone()]);
        http.insert(id, addr);
    }
    (node_args, http)
}

/// A leader sends its followers' entries on one long-lived stream each (`Node/AppendStream`),
/// not one call per message; a follower that stops ends its streams instead of waiting for
/// them, and one that comes back gets a new stream and every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_travel_on_one_stream_per_follower_which_a_stopping_follower_ends() {
    let (node_args, http) = http_listeners();
    let mut cluster = start(ClusterOptions { node_args, ..ClusterOptions::default() });
    let client = client(&cluster);
    let leader = blocking(|| cluster.wait_for_leader(DEADLINE)).unwrap();
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let opened = |id: u64| rpc_count(&http[&id], "op=\"Node/AppendStream\",outcome=\"ok\"");
    // Until the cluster has its id, appends go as unary calls (a stream is checked once).
    let mut warm_up = 0;
    blocking(|| {
        wait_for("a stream to each follower", DEADLINE, || {
            warm_up += 1;
            let key = format!("stream/warm-up/{warm_up}");
            tokio::runtime::Handle::current().block_on(client.set(key.as_bytes(), b"v", None, None))?;
            Ok(followers.iter().all(|id| opened(*id) >= 1.0).then_some(()))
        })
    })
    .unwrap();
    let before: Vec<f64> = followers.iter().map(|id| opened(*id)).collect();
    const WRITES: usize = 40;
    for i in 0..WRITES {
        client.set(format!("stream/{i}").as_bytes(), b"v", None, None).await.unwrap();
    }
    for (id, before) in followers.iter().zip(before) {
        let reopened = opened(*id) - before;
        // A stream is reopened only after a failure (an answer later than openraft waits for,
        // on a busy machine): not once per message.
        assert!(reopened <= 4.0, "node {id} was opened {reopened} more append streams for {WRITES} writes");
    }

    // A graceful stop drains the calls in flight; a leader's stream is not one of them.
    let stopping = followers[0];
    let pid = cluster.nodes[&stopping].pid().unwrap();
    mendfs_testkit::signal(pid, libc::SIGTERM).unwrap();
    blocking(|| wait_for("the follower to stop", DEADLINE, || Ok(exited(pid).then_some(())))).unwrap();
    let log = cluster.log(stopping);
    assert!(!log.contains("calls still in flight"), "the stop waited for a stream: {}", cluster.log_tail(stopping, 20));

    client.set(b"stream/while-stopped", b"v", None, None).await.unwrap();
    blocking(|| cluster.restart(stopping)).unwrap();
    blocking(|| cluster.wait_for_caught_up(&[stopping], DEADLINE)).unwrap();
    for i in 0..WRITES {
        client.set(format!("stream/again/{i}").as_bytes(), b"v", None, None).await.unwrap();
    }
    blocking(|| {
        wait_for("the restarted follower's new stream", DEADLINE, || Ok((opened(stopping) >= 1.0).then_some(())))
    })
    .unwrap();
    blocking(|| cluster.wait_for_caught_up(&[stopping], DEADLINE)).unwrap();
}

/// A lone writer's writes go one after another on one stream (`Kv/WriteStream`), not a call
/// each, and each gets its own outcome; each is authorized on its own, so a token revoked while
/// the stream is open stops the next write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_writer_streams_its_writes_and_a_revoked_token_stops_the_next_one() {
    let (node_args, http) = http_listeners();
    let cluster = start(ClusterOptions { node_args, ..ClusterOptions::default() });
    let token = blocking(|| cluster.run_cli(&["auth", "token", "create", "streamer", "--role", "write"]))
        .unwrap()
        .trim()
        .to_string();
    let mut config = ClientConfig::new(cluster.endpoint_list());
    config.token = Some(token);
    let writer = Client::new(config).unwrap();
    let sets_via = |via: &str| {
        (1..=3u64)
            .map(|id| {
                let scrape = &http[&id];
                rpc_count(scrape, &format!("op=\"Kv/Set\",outcome=\"ok\",via=\"{via}\""))
                    + rpc_count(scrape, &format!("op=\"Kv/Set\",outcome=\"FailedPrecondition\",via=\"{via}\""))
            })
            .sum::<f64>()
    };
    let unary = || sets_via("call");
    let streamed = || sets_via("stream");
    // The first write may find the token not yet applied on the node it asks, or open its
    // stream at a follower, which names the leader for the next.
    writer.set(b"streamed/first", b"v", None, None).await.unwrap();
    writer.set(b"streamed/second", b"v", None, None).await.unwrap();
    let unary_before = unary();
    let streamed_before = streamed();
    const WRITES: usize = 30;
    for i in 0..WRITES {
        let kv = writer.set(format!("streamed/{i}").as_bytes(), b"v1", None, None).await.unwrap();
        assert_eq!(kv.version, 1);
        let kv = writer.set(format!("streamed/{i}").as_bytes(), b"v2", Some(1), None).await.unwrap();
        assert_eq!(kv.version, 2, "a compare-and-set on the stream");
    }
    // Each write keeps its own outcome: a conflict, a refusal.
    let conflict = writer.set(b"streamed/0", b"never", Some(1), None).await;
    assert!(matches!(conflict, Err(Error::VersionMismatch { expected: 1, actual: 2 })), "{conflict:?}");
    let taken = writer.create(b"streamed/0", b"never", None).await;
    assert!(matches!(taken, Err(Error::KeyExists { version: 2 })), "{taken:?}");
    assert_eq!(writer.get(b"streamed/0").await.unwrap().unwrap().value, b"v2");
    let unary_sets = unary() - unary_before;
    assert!(unary_sets <= 2.0, "{unary_sets} of {} sets went as calls of their own", 2 * WRITES + 1);
    // Each streamed set is counted as a set, with its own outcome (the conflict too), so the
    // request metrics miss none of them.
    let streamed_sets = streamed() - streamed_before;
    assert!(
        streamed_sets >= (2 * WRITES + 1) as f64 - unary_sets,
        "{streamed_sets} streamed sets counted in the metrics, {unary_sets} as calls, of {}",
        2 * WRITES + 1
    );

    // A graceful stop of the node the stream is on (the leader, which the first write's node
    // named) ends the stream between writes instead of waiting out its grace for it.
    let leader = blocking(|| cluster.wait_for_leader(DEADLINE)).unwrap();
    let pid = cluster.nodes[&leader].pid().unwrap();
    mendfs_testkit::signal(pid, libc::SIGTERM).unwrap();
    blocking(|| wait_for("the leader to stop", DEADLINE, || Ok(exited(pid).then_some(())))).unwrap();
    let log = cluster.log(leader);
    assert!(!log.contains("calls still in flight"), "the stop waited for a stream: {}", cluster.log_tail(leader, 20));

    blocking(|| cluster.run_cli(&["auth", "token", "revoke", "streamer"])).unwrap();
    let refused = writer.set(b"streamed/after-revoke", b"v", None, None).await;
    assert!(
        matches!(&refused, Err(Error::Unauthenticated(m)) if m.contains("revoked")),
        "a write after the revocation: {refused:?}"
    );
    assert_eq!(client(&cluster).get(b"streamed/after-revoke").await.unwrap(), None, "nothing was written");
}

/// A writer's stream follows the leader. Paused long enough for the others to elect another
/// and then resumed, the old leader would forward every write on the stream it holds, which
/// stays open (its connection outlived the pause); instead it ends the stream between writes,
/// naming the new leader, where the next stream opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_stream_moves_to_the_new_leader_when_its_node_steps_down() {
    let (node_args, http) = http_listeners();
    let mut cluster = start(ClusterOptions { node_args, ..ClusterOptions::default() });
    let writer = client(&cluster);
    let streamed_sets_at = |id: u64| rpc_count(&http[&id], "op=\"Kv/Set\",outcome=\"ok\",via=\"stream\"");
    // The first writes find the leader (a follower names it) and leave the stream there.
    for i in 0..5 {
        writer.set(format!("moving/{i}").as_bytes(), b"v", None, None).await.unwrap();
    }
    let old = blocking(|| cluster.wait_for_leader(DEADLINE)).unwrap();
    assert!(streamed_sets_at(old) >= 2.0, "the stream is on the leader");

    blocking(|| cluster.pause(old)).unwrap();
    // Asked of the other two: a status call to the paused node would wait out its timeout.
    let others = (1..=3u64).filter(|id| *id != old).map(|id| cluster.addr(id)).collect::<Vec<_>>().join(",");
    let new = blocking(|| {
        wait_for("a new leader", DEADLINE, || {
            let output = cluster.cli_at(&others).args(["cluster", "status", "--json", "--timeout", "5"]).output()?;
            let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
            Ok(status["leader"].as_u64().filter(|leader| *leader != old))
        })
    })
    .unwrap();
    blocking(|| cluster.resume(old)).unwrap();
    blocking(|| cluster.wait_for_caught_up(&[old], DEADLINE)).unwrap();

    let at_new_before = streamed_sets_at(new);
    const WRITES: usize = 20;
    for i in 0..WRITES {
        writer.set(format!("moved/{i}").as_bytes(), b"v", None, None).await.unwrap();
    }
    // One write may still go through the old leader's stream (it was read before the node
    // noticed), and the one after it in a call of its own.
    let at_new = streamed_sets_at(new) - at_new_before;
    assert!(at_new >= (WRITES - 2) as f64, "only {at_new} of {WRITES} writes went on a stream at the new leader {new}");
}

/// Many tasks writing through one client share calls (`Kv/Batch`), and every write still gets
/// the outcome its own call would have had: its value, its conflict, its refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_calls_and_each_gets_its_own_outcome() {
    let (node_args, http) = http_listeners();
    let server_args = vec!["--max-value-bytes".to_string(), "1024".to_string()];
    let cluster = start(ClusterOptions { server_args, node_args, ..ClusterOptions::default() });
    let client = client(&cluster);
    client.set(b"batch/cas", b"v1", None, None).await.unwrap();
    client.create(b"batch/taken", b"first", None).await.unwrap();
    client.set(b"batch/doomed", b"x", None, None).await.unwrap();
    let leader = blocking(|| cluster.wait_for_leader(DEADLINE)).unwrap();
    let batches_before = rpc_count(&http[&leader], "op=\"Kv/Batch\"");

    const WRITERS: usize = 400;
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..WRITERS {
        let client = client.clone();
        writers.spawn(async move {
            let outcome = match i % 5 {
                0 | 1 => client.set(format!("batch/key/{i}").as_bytes(), format!("v{i}").as_bytes(), None, None).await,
                2 => client.set(b"batch/cas", b"never", Some(99), None).await,
                3 => client.create(b"batch/taken", b"second", None).await,
                _ => client.set(format!("batch/big/{i}").as_bytes(), &[7u8; 1025], None, None).await,
            };
            (i, outcome)
        });
    }
    let mut deleted = 0;
    for _ in 0..8 {
        deleted += usize::from(client.delete(b"batch/doomed", None).await.unwrap());
    }
    assert_eq!(deleted, 1, "the key was deleted once; later deletes found nothing");
    while let Some(joined) = writers.join_next().await {
        let (i, outcome) = joined.unwrap();
        match i % 5 {
            0 | 1 => {
                let kv = outcome.unwrap_or_else(|e| panic!("write {i}: {e}"));
                assert_eq!((kv.key, kv.version), (format!("batch/key/{i}").into_bytes(), 1));
            }
            2 => assert!(
                matches!(outcome, Err(Error::VersionMismatch { expected: 99, actual: 1 })),
                "write {i}: {outcome:?}"
            ),
            3 => assert!(matches!(outcome, Err(Error::KeyExists { version: 1 })), "write {i}: {outcome:?}"),
            _ => assert!(
                matches!(&outcome, Err(Error::InvalidArgument(m)) if m.contains("limit is 1024")),
                "write {i}: {outcome:?}"
            ),
        }
    }
    for i in (0..WRITERS).filter(|i| i % 5 < 2) {
        let kv = client.get(format!("batch/key/{i}").as_bytes()).await.unwrap().expect("written");
        assert_eq!(kv.value, format!("v{i}").into_bytes());
    }
    assert_eq!(client.get(b"batch/taken").await.unwrap().unwrap().value, b"first");
    assert_eq!(client.get(b"batch/cas").await.unwrap().unwrap().version, 1);
    let batches = rpc_count(&http[&leader], "op=\"Kv/Batch\"") - batches_before;
    assert!(
        batches >= 1.0 && batches < WRITERS as f64,
        "{WRITERS} concurrent writes went out in {batches} Kv/Batch calls"
    );

    // The call itself, as a client of any version might send it.
    let mut kv =
        mendfs_proto::v1::kv_client::KvClient::connect(format!("http://{}", cluster.addr(leader))).await.unwrap();
    let with_secret = |ops: Vec<mendfs_proto::v1::BatchOp>| {
        let mut request = tonic::Request::new(mendfs_proto::v1::BatchRequest { ops });
        request.metadata_mut().insert(mendfs_proto::SECRET_HEADER, cluster.secret().unwrap().parse().unwrap());
        request
    };
    let set = |key: &str| mendfs_proto::v1::BatchOp {
        op: Some(mendfs_proto::v1::batch_op::Op::Set(mendfs_proto::v1::PutRequest {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })),
    };
    let too_many = kv.batch(with_secret((0..257).map(|i| set(&format!("batch/over/{i}"))).collect())).await;
    let status = too_many.expect_err("257 writes in one call");
    assert!(status.code() == tonic::Code::InvalidArgument && status.message().contains("limit is 256"), "{status:?}");
    assert!(client.get(b"batch/over/0").await.unwrap().is_none(), "nothing of a refused batch is applied");
    let reply = kv
        .batch(with_secret(vec![set("batch/direct"), mendfs_proto::v1::BatchOp { op: None }]))
        .await
        .expect("a batch with one empty op")
        .into_inner();
    assert_eq!(reply.results.len(), 2);
    assert!(matches!(reply.results[0].result, Some(mendfs_proto::v1::batch_result::Result::Written(_))));
    match &reply.results[1].result {
        Some(mendfs_proto::v1::batch_result::Result::Error(error)) => {
            assert_eq!(error.code, tonic::Code::InvalidArgument as i32, "{error:?}");
        }
        other => panic!("an op naming no write must fail on its own: {other:?}"),
    }
    assert_eq!(client.get(b"batch/direct").await.unwrap().unwrap().value, b"v");
}
