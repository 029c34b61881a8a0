//! Network faults and clock skew against real processes. Partitions: nodes in network
//! namespaces ([`Lab`]) with nftables filters between them, clients in a namespace of their own
//! that reaches every node, as Jepsen's do. Skew: nodes under libfaketime
//! ([`ClusterOptions::clock_control`]), their wall clocks moved while their monotonic clocks
//! stay true. A test that this machine cannot run (not root, no nft, no libfaketime) says so
//! and passes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use mendfs_testkit::netns::Lab;
use mendfs_testkit::{output_result, wait_for, Cluster, ClusterOptions};
use serde_json::Value;

/// For anything that should happen: generous, CI is a busy 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);
/// One CLI attempt, in seconds: short, so that polling tries again soon.
const ATTEMPT_SECS: &str = "5";
/// How long a fault holds while the test writes through it: many election timeouts (150 to
/// 300 ms), so that whatever elections the fault provokes happen under it.
const FAULT_HOLD: Duration = Duration::from_secs(3);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

/// A lab for nodes 1..=3 with working packet filters, or None after saying why not.
fn lab_with_filters() -> Option<Lab> {
    let lab = match Lab::create(&[1, 2, 3]) {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("skipping: this test runs nodes in network namespaces, which this machine refuses: {e:#}");
            return None;
        }
    };
    if let Err(e) = lab.filters_available() {
        eprintln!("skipping: this test filters packets between namespaces, which this machine cannot: {e:#}");
        return None;
    }
    Some(lab)
}

fn start_in(lab: &Lab) -> Cluster {
    start_in_with(lab, &[])
}

fn start_in_with(lab: &Lab, server_args: &[&str]) -> Cluster {
    let options = ClusterOptions {
        placement: lab.placement(),
        server_args: server_args.iter().map(|arg| arg.to_string()).collect(),
        ..ClusterOptions::default()
    };
    Cluster::start(binary(), options).expect("start the cluster in its namespaces")
}

/// The CLI (from the CLI's namespace) aimed at nodes `ids` only, giving up after `timeout_secs`.
fn cli_via_within(cluster: &Cluster, ids: &[u64], timeout_secs: &str, args: &[&str]) -> Output {
    cluster.cli_at(&cluster.endpoints_of(ids)).args(args).args(["--timeout", timeout_secs]).output().unwrap()
}

fn cli_via(cluster: &Cluster, ids: &[u64], args: &[&str]) -> Output {
    cli_via_within(cluster, ids, ATTEMPT_SECS, args)
}

fn via(cluster: &Cluster, ids: &[u64], args: &[&str]) -> anyhow::Result<String> {
    output_result(args, cli_via(cluster, ids, args))
}

fn status_via(cluster: &Cluster, ids: &[u64]) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&via(cluster, ids, &["cluster", "status", "--json"])?)?)
}

fn node_field<'a>(status: &'a Value, id: u64, field: &str) -> &'a Value {
    status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["id"].as_u64() == Some(id)))
        .map_or(&Value::Null, |node| &node[field])
}

/// Sets `key` through nodes `ids`, trying again until one attempt is acknowledged.
fn set_via(cluster: &Cluster, ids: &[u64], key: &str, value: &str) {
    wait_for(&format!("{key}={value} acknowledged through nodes {ids:?}"), DEADLINE, || {
        via(cluster, ids, &["kv", "set", key, value]).map(Some)
    })
    .unwrap();
}

/// Writes `prefix/0`, `prefix/1`, ... through any node for [`FAULT_HOLD`] (three at least),
/// each acknowledged within the deadline; returns how many.
fn write_while_the_fault_holds(cluster: &Cluster, prefix: &str) -> usize {
    let started = Instant::now();
    let mut written = 0;
    while written < 3 || started.elapsed() < FAULT_HOLD {
        set_via(cluster, &all(cluster), &format!("{prefix}/{written}"), "x");
        written += 1;
    }
    written
}

fn all(cluster: &Cluster) -> Vec<u64> {
    cluster.nodes.keys().copied().collect()
}

/// Waits until the healed cluster agrees: one leader, every node a follower of it at the same
/// term, with the same revision applied.
fn wait_converged(cluster: &Cluster) -> Value {
    let ids = all(cluster);
    wait_for("every node to agree on one leader and one revision", DEADLINE, || {
        let status = status_via(cluster, &ids)?;
        let leaders: Vec<u64> = ids.iter().copied().filter(|id| node_field(&status, *id, "role") == "leader").collect();
        let terms: Vec<&Value> = ids.iter().map(|id| node_field(&status, *id, "term")).collect();
        let revisions: Vec<&Value> = ids.iter().map(|id| node_field(&status, *id, "revision")).collect();
        let agreed = leaders.len() == 1
            && status["leader"].as_u64() == leaders.first().copied()
            && terms.iter().all(|term| *term == terms[0])
            && revisions.iter().all(|revision| revision.is_u64() && *revision == revisions[0]);
        Ok(agreed.then_some(status))
    })
    .unwrap()
}

/// Every node, asked alone, has `key` at `value`.
fn assert_everywhere(cluster: &Cluster, key: &str, value: &str) {
    for id in all(cluster) {
        let read = wait_for(&format!("node {id} to answer a read"), DEADLINE, || {
            via(cluster, &[id], &["kv", "get", key]).map(Some)
        })
        .unwrap();
        assert_eq!(read.trim(), value, "node {id} reads {key}");
    }
}

/// (a) The leader alone on one side: the two others elect a leader among themselves and go on
/// committing, while the old leader, which a client still reaches, acknowledges no write and
/// serves no stale read. After the heal everyone follows one leader at one revision.
#[test]
fn a_leader_partitioned_into_a_minority_of_one_stops_acknowledging_while_the_majority_commits() {
    let Some(lab) = lab_with_filters() else { return };
    let cluster = start_in(&lab);
    let old = cluster.wait_for_leader(DEADLINE).expect("a leader");
    let majority: Vec<u64> = all(&cluster).into_iter().filter(|id| *id != old).collect();
    set_via(&cluster, &all(&cluster), "register", "before");

    let cut = Instant::now();
    lab.isolate(old).expect("isolate the leader");
    let new = wait_for("a leader elected on the majority side", DEADLINE, || {
        let status = status_via(&cluster, &majority)?;
        Ok(status["leader"].as_u64().filter(|id| majority.contains(id) && node_field(&status, *id, "role") == "leader"))
    })
    .unwrap();
    set_via(&cluster, &majority, "register", "during");
    for i in 0..5 {
        via(&cluster, &majority, &["kv", "set", &format!("majority/{i}"), "x"]).expect("a write through the majority");
    }
    eprintln!("node {new} leads the majority, writes acknowledged {:?} after the cut", cut.elapsed());

    // The old leader, still reachable from the clients' namespace, cannot reach a quorum.
    let write = cli_via(&cluster, &[old], &["kv", "set", "register", "stale"]);
    assert!(
        !write.status.success(),
        "the cut-off leader acknowledged a write: {}",
        String::from_utf8_lossy(&write.stdout)
    );
    let read = cli_via(&cluster, &[old], &["kv", "get", "register"]);
    if read.status.success() {
        let value = String::from_utf8_lossy(&read.stdout);
        assert_eq!(value.trim(), "during", "the cut-off leader served a stale read");
    }

    lab.heal_network().expect("heal");
    let status = wait_converged(&cluster);
    eprintln!("converged {:?} after the cut: leader {}", cut.elapsed(), status["leader"]);
    // A write after the heal orders every read after anything the old leader still held.
    set_via(&cluster, &all(&cluster), "barrier", "after");
    assert_everywhere(&cluster, "register", "during");
    assert_everywhere(&cluster, "majority/4", "x");
}

/// (a') A leader cut off with writes pending, while the majority moves on so far that the
/// deposed leader catches up by a snapshot, not by the log: openraft 0.9 then never answers the
/// writes whose entries the snapshot replaced. MendFS used to wait for them forever, with its
/// two batch slots taken, so that node never proposed again (not even a follower's forward) and
/// no orphan check completed anywhere it led. (`mendfs chaos --seed 999` found it.) The node
/// now gives such a batch up as of unknown outcome once its log is decided, and writes through
/// it work again.
#[test]
fn a_deposed_leader_whose_pending_writes_a_snapshot_replaced_writes_again() {
    let Some(lab) = lab_with_filters() else { return };
    // Snapshots every 20 entries, keeping at most 20 after one: the majority's 100 writes below
    // leave the deposed leader too far behind for the log.
    let cluster = start_in_with(&lab, &["--snapshot-every-entries", "20"]);
    let old = cluster.wait_for_leader(DEADLINE).expect("a leader");
    let majority: Vec<u64> = all(&cluster).into_iter().filter(|id| *id != old).collect();
    set_via(&cluster, &all(&cluster), "register", "before");

    lab.isolate(old).expect("isolate the leader");
    // One write at a time through the cut-off leader: each becomes a batch of its own that
    // cannot commit, more batches than the node keeps in flight.
    for i in 0..3 {
        let write = cli_via_within(&cluster, &[old], "2", &["kv", "set", &format!("stranded/{i}"), "x"]);
        assert!(!write.status.success(), "the cut-off leader acknowledged a write");
    }
    wait_for("a leader elected on the majority side", DEADLINE, || {
        let status = status_via(&cluster, &majority)?;
        Ok(status["leader"].as_u64().filter(|id| majority.contains(id)))
    })
    .unwrap();
    for i in 0..100 {
        set_via(&cluster, &majority, &format!("majority/{i}"), "x");
    }

    lab.heal_network().expect("heal");
    wait_converged(&cluster);
    // Through the old leader alone (a follower now, or the leader again): its writes go
    // through its own proposer first.
    set_via(&cluster, &[old], "register", "after");
    assert_everywhere(&cluster, "register", "after");
}

/// (b) Two non-transitive faults: the leader's packets to one follower lost (that follower
/// hears no heartbeat, while the leader still hears it), then a bridge (two nodes that cannot
/// see each other, and one that sees both). Each time some node commits, within a generous
/// deadline, and the heal converges.
#[test]
fn one_way_loss_and_a_bridge_leave_the_cluster_committing_and_the_heal_converges() {
    let Some(lab) = lab_with_filters() else { return };
    let cluster = start_in(&lab);
    let everyone = all(&cluster);
    let started = Instant::now();

    let leader = cluster.wait_for_leader(DEADLINE).expect("a leader");
    let deaf = everyone.iter().copied().find(|id| *id != leader).unwrap();
    lab.cut_one_way(leader, deaf).expect("one-way cut");
    let one_way = write_while_the_fault_holds(&cluster, "one-way");
    lab.heal_network().expect("heal the one-way cut");
    wait_converged(&cluster);
    eprintln!("one-way cut {leader} -> {deaf}: {one_way} writes, converged after {:?}", started.elapsed());

    let leader = cluster.wait_for_leader(DEADLINE).expect("a leader");
    let others: Vec<u64> = everyone.iter().copied().filter(|id| *id != leader).collect();
    let (bridge, far) = (others[0], others[1]);
    lab.bridge(&[leader], bridge, &[far]).expect("bridge");
    let bridged = write_while_the_fault_holds(&cluster, "bridge");
    lab.heal_network().expect("heal the bridge");
    wait_converged(&cluster);
    eprintln!("bridge {leader} | {bridge} | {far}: {bridged} writes, converged after {:?}", started.elapsed());
    set_via(&cluster, &everyone, "barrier", "after");
    assert_everywhere(&cluster, &format!("one-way/{}", one_way - 1), "x");
    assert_everywhere(&cluster, &format!("bridge/{}", bridged - 1), "x");
}

/// (c) The leader loses 30 % of its packets to and from the other nodes, each way: slower, but
/// key writes and a file (whose chunks go to every node) still succeed.
#[test]
fn a_leader_losing_30_percent_of_its_packets_keeps_the_cluster_working() {
    let Some(lab) = lab_with_filters() else { return };
    // Two copies of each chunk, so that a copy the lossy node fails to take goes to the third.
    let cluster = start_in_with(&lab, &["--replication-factor", "2"]);
    let everyone = all(&cluster);
    let leader = cluster.wait_for_leader(DEADLINE).expect("a leader");
    let contents: Vec<u8> = (0..25_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let local = cluster.root().join("flaky.bin");
    std::fs::write(&local, &contents).unwrap();
    let local = local.to_str().unwrap();
    wait_for("a writable cluster", DEADLINE, || Ok(via(&cluster, &everyone, &["put", local, "/probe"]).ok())).unwrap();

    let started = Instant::now();
    lab.flaky(leader, 30).expect("flaky leader");
    for i in 0..10 {
        set_via(&cluster, &everyone, &format!("flaky/{i}"), &i.to_string());
    }
    // The file goes through a node with a sound link (a coordinator on the lossy node pushes
    // every copy through the loss, which gRPC's keep-alive then often gives up on) and its
    // commit through the lossy leader; an attempt may take a while, TCP resending what is lost.
    let sound: Vec<u64> = everyone.iter().copied().filter(|id| *id != leader).collect();
    wait_for("a file put through the lossy network", DEADLINE, || {
        output_result(&["put"], cli_via_within(&cluster, &sound, "30", &["put", local, "/flaky"])).map(Some)
    })
    .unwrap();
    let back = cluster.root().join("flaky.back");
    let back_text = back.to_str().unwrap();
    wait_for("the file read back", DEADLINE, || via(&cluster, &everyone, &["get", "/flaky", back_text]).map(Some))
        .unwrap();
    assert!(std::fs::read(&back).unwrap() == contents, "the file reads back whole");
    eprintln!("10 writes and a file through a 30 % lossy leader in {:?}", started.elapsed());

    lab.heal_network().expect("heal");
    wait_converged(&cluster);
    assert_everywhere(&cluster, "flaky/9", "9");
}

/// A cluster whose node clocks the test moves, or None after saying why not.
fn start_with_clock_control(server_args: &[&str]) -> Option<Cluster> {
    if mendfs_testkit::faketime_library().is_none() {
        eprintln!(
            "skipping: this test skews node clocks with libfaketime, which is not installed (apt-get install faketime)"
        );
        return None;
    }
    // Every node serves HTTP, whose answers carry its date: how a test reads a node's clock.
    let node_args = (1..=3u64)
        .map(|id| (id, vec!["--http".to_string(), format!("127.0.0.1:{}", mendfs_testkit::free_port().unwrap())]))
        .collect();
    let options = ClusterOptions {
        clock_control: true,
        server_args: server_args.iter().map(|arg| arg.to_string()).collect(),
        node_args,
        ..ClusterOptions::default()
    };
    Some(Cluster::start(binary(), options).expect("start the cluster under libfaketime"))
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// How far node `id`'s wall clock is from the test's, in seconds: the `Date` of its HTTP
/// listener's answer (whole seconds; the tests allow far more than that).
fn clock_offset_seen_through(cluster: &Cluster, id: u64) -> anyhow::Result<i64> {
    use std::io::{Read as _, Write as _};
    let args = cluster.options().node_args.get(&id).ok_or_else(|| anyhow::anyhow!("no HTTP flag for node {id}"))?;
    let addr = args.get(1).ok_or_else(|| anyhow::anyhow!("no HTTP address for node {id}"))?;
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: mendfs\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let date = answer
        .lines()
        .find_map(|line| line.strip_prefix("date: ").or_else(|| line.strip_prefix("Date: ")))
        .ok_or_else(|| anyhow::anyhow!("no Date in node {id}'s answer: {answer}"))?;
    let at = httpdate::parse_http_date(date.trim())?;
    let at_ms = at.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    Ok((at_ms - unix_ms()) / 1000)
}

/// A small local file to put.
fn probe_file(cluster: &Cluster) -> PathBuf {
    let path = cluster.root().join("probe.bin");
    std::fs::write(&path, b"what time is it").unwrap();
    path
}

/// The harness itself: an offset moves one node's wall clock from the next read on, and
/// survives the node's restart; the other nodes, and the CLI, keep the true time.
#[test]
fn a_clock_offset_moves_one_nodes_wall_clock_and_survives_its_restart() {
    let Some(mut cluster) = start_with_clock_control(&[]) else { return };
    let offset_through = |cluster: &Cluster, id: u64| {
        wait_for(&format!("an answer from node {id}"), DEADLINE, || Ok(clock_offset_seen_through(cluster, id).ok()))
            .unwrap()
    };
    let near = |seconds: i64, target: i64| (seconds - target).abs() <= 30;
    assert!(near(offset_through(&cluster, 1), 0), "node 1 starts at the true time");

    cluster.set_clock_offset(2, 3_600).unwrap();
    let seen = offset_through(&cluster, 2);
    assert!(near(seen, 3_600), "node 2's clock is an hour ahead at once, not {seen} s");
    cluster.restart(2).unwrap();
    let seen = offset_through(&cluster, 2);
    assert!(near(seen, 3_600), "node 2's clock is still an hour ahead after its restart, not {seen} s");
    assert!(cluster.set_clock_offset(9, 1).is_err(), "no node 9");

    // A file put through the node an hour ahead is dated by the state clock, not by that
    // node's date (which the coordinator used to stamp).
    let probe = probe_file(&cluster);
    let remote = "/put-through-the-node-ahead";
    wait_for("a put through node 2", DEADLINE, || {
        Ok(via(&cluster, &[2], &["put", probe.to_str().unwrap(), remote]).ok())
    })
    .unwrap();
    let stat: Value = serde_json::from_str(&via(&cluster, &[2], &["stat", remote, "--json"]).unwrap()).unwrap();
    let mtime_ms = stat["mtime_ms"].as_i64().expect("an mtime");
    let off = (mtime_ms - unix_ms()) / 1000;
    assert!(near(off, 0), "the file's mtime is {off} s off the true time");
}

/// Sets and gets a key, and puts and gets a file, through node `id` alone.
fn write_and_read_through(cluster: &Cluster, id: u64, local: &Path) -> anyhow::Result<()> {
    let key = format!("skew/{id}");
    via(cluster, &[id], &["kv", "set", &key, "v"])?;
    anyhow::ensure!(via(cluster, &[id], &["kv", "get", &key])?.trim() == "v", "kv get returned another value");
    let remote = format!("/skew-{id}");
    via(cluster, &[id], &["put", local.to_str().unwrap(), &remote])?;
    let back = cluster.root().join(format!("back-{id}"));
    via(cluster, &[id], &["get", &remote, back.to_str().unwrap()])?;
    anyhow::ensure!(std::fs::read(&back)? == std::fs::read(local)?, "the file read back differs");
    Ok(())
}

/// One follower `skew_secs` ahead, the other as far behind: keys and files written and read
/// through each node, the one ahead first (its writes are those that could move the state
/// clock). Skew moves wall clocks only; Raft, leases and timeouts run on monotonic clocks.
fn skewed_followers_keep_the_cluster_writing_through_every_node(skew_secs: i64) {
    let Some(cluster) = start_with_clock_control(&[]) else { return };
    let probe = probe_file(&cluster);
    let local = probe.to_str().unwrap();
    wait_for("a writable cluster", DEADLINE, || Ok(via(&cluster, &all(&cluster), &["put", local, "/probe"]).ok()))
        .unwrap();
    let leader = cluster.wait_for_leader(DEADLINE).expect("a leader");
    let followers: Vec<u64> = all(&cluster).into_iter().filter(|id| *id != leader).collect();
    let (ahead, behind) = (followers[0], followers[1]);
    cluster.set_clock_offset(ahead, skew_secs).unwrap();
    cluster.set_clock_offset(behind, -skew_secs).unwrap();
    for id in [ahead, leader, behind] {
        let role = if id == leader {
            "the leader"
        } else if id == ahead {
            "ahead"
        } else {
            "behind"
        };
        if let Err(e) = write_and_read_through(&cluster, id, &probe) {
            panic!("through node {id} ({role}), with followers {skew_secs} s ahead and behind: {e:#}");
        }
    }
}

/// A skew of seconds, well inside the forwarding deadline and the prepare grace, is harmless.
#[test]
fn followers_two_seconds_ahead_and_behind_keep_the_cluster_writing_through_every_node() {
    skewed_followers_keep_the_cluster_writing_through_every_node(2);
}

/// An hour is no harder: nothing needs the nodes' clocks to agree. (It once did: a follower an
/// hour behind had every forwarded request refused as late, its date compared with the
/// leader's; and one put through the node an hour ahead moved the state clock an hour ahead, so
/// that puts through every other node failed `PrepareExpired`.)
#[test]
fn followers_an_hour_ahead_and_behind_keep_the_cluster_writing_through_every_node() {
    skewed_followers_keep_the_cluster_writing_through_every_node(3_600);
}

/// Storage nodes protect prepared copies for 1.5 grace periods of their monotonic clocks, then
/// collect them if nothing references them; the state machine refuses a commit whose chunks
/// began preparing more than a grace period before the leader stamped it. A coordinator whose
/// date steps back between prepare and commit (NTP correcting a clock that ran ahead) once made
/// its chunks look younger than they were, since their age was the state clock less its date:
/// the commit was accepted after the copies were gone, and an acknowledged file could not be
/// read. The age is now measured on monotonic clocks, and such a commit is refused.
#[test]
fn a_coordinator_whose_clock_steps_back_never_commits_chunks_already_collected() {
    const CHUNK_BYTES: usize = 64 * 1024;
    let grace = ["--orphan-grace-ms", "2000", "--gc-interval-ms", "300", "--chunk-size-bytes", "65536"];
    let Some(cluster) = start_with_clock_control(&grace) else { return };
    wait_for("an answer from node 1", DEADLINE, || Ok(clock_offset_seen_through(&cluster, 1).ok())).unwrap();
    cluster.set_clock_offset(1, 600).unwrap();
    assert!((clock_offset_seen_through(&cluster, 1).unwrap() - 600).abs() < 30, "node 1 ten minutes ahead");
    let chunk_counts = || -> Vec<usize> {
        cluster.nodes.values().map(|node| mendfs_testkit::chunk_files(&node.data_dir).len()).collect()
    };
    let before = chunk_counts();

    // A MiB (the CLI sends its input in MiB messages: 16 chunks) through node 1, which
    // prepares the chunks on every node; the rest of the file later.
    let sent_first = 16 * CHUNK_BYTES;
    let contents = mendfs_testkit::stamped_bytes(7, 0, sent_first + 1_000);
    let mut put = cluster
        .cli_at(&cluster.addr(1))
        .args(["put", "-", "/stepped-back", "--timeout", "120"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = put.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, &contents[..sent_first]).unwrap();
    std::io::Write::flush(&mut stdin).unwrap();
    wait_for("the first chunks prepared on every node", DEADLINE, || {
        Ok(chunk_counts().iter().zip(&before).all(|(now, then)| *now >= then + 8).then_some(()))
    })
    .unwrap();

    // The clock steps back; the storage nodes' protection of the copies runs out.
    cluster.set_clock_offset(1, 0).unwrap();
    wait_for("the prepared copies collected as orphans", DEADLINE, || {
        Ok(chunk_counts().iter().zip(&before).all(|(now, then)| now <= then).then_some(()))
    })
    .unwrap();

    std::io::Write::write_all(&mut stdin, &contents[sent_first..]).unwrap();
    drop(stdin);
    let output = put.wait_with_output().unwrap();
    if !output.status.success() {
        // Refusing the commit is right: its copies are gone.
        eprintln!("the late commit was refused: {}", String::from_utf8_lossy(&output.stderr).trim());
        return;
    }
    let back = cluster.root().join("stepped-back.back");
    let get = via(&cluster, &all(&cluster), &["get", "/stepped-back", back.to_str().unwrap()]);
    assert!(get.is_ok(), "an acknowledged put cannot be read back: {get:?}");
    assert!(std::fs::read(&back).unwrap() == contents, "an acknowledged put reads back whole");
}
