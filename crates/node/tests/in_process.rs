//! Several nodes in one test process, started and stopped through the library: the middle
//! layer between the pure cores' unit tests and the real-process cluster tests. Each node gets
//! its own loopback port and data directory; a stop through the handle plays a clean shutdown
//! (the process tests play SIGKILL and SIGSTOP).

use std::time::{Duration, Instant};

use mendfs_client::{Client, ClientConfig};
use mendfs_node::{Node, NodeConfig, NodeHandle, Telemetry};
use mendfs_testkit::{free_port, stamped_bytes};
use tempfile::TempDir;

const DEADLINE: Duration = Duration::from_secs(90);

fn config(id: u64, port: u16, peers: &str, root: &std::path::Path) -> NodeConfig {
    NodeConfig {
        node_id: id,
        listen: format!("127.0.0.1:{port}"),
        data_dir: root.join(format!("node-{id}")),
        peers: Some(peers.to_string()),
        insecure_dev: true,
        replication_factor: 2,
        chunk_size_bytes: 64 << 10,
        storage_capacity_bytes: Some(8 << 30),
        health_interval_ms: 200,
        acceptable_pause_ms: 600,
        down_after_ms: 1_500,
        repair_scan_interval_ms: 200,
        span_store_bytes: 1 << 20,
        log_store_bytes: 1 << 20,
        ..NodeConfig::default()
    }
}

async fn start(config: NodeConfig) -> NodeHandle {
    let telemetry = Telemetry::open(&config).expect("telemetry stores");
    Node::start(config, telemetry).await.expect("node starts")
}

/// Starts `n` voters that are also storage nodes; returns their configs (to restart them) and
/// handles.
async fn start_cluster(root: &TempDir, n: u64) -> (Vec<NodeConfig>, Vec<Option<NodeHandle>>) {
    let ports: Vec<u16> = (0..n).map(|_| free_port().expect("free port")).collect();
    let peers: Vec<String> = ports.iter().enumerate().map(|(i, port)| format!("{}=127.0.0.1:{port}", i + 1)).collect();
    let peers = peers.join(",");
    let configs: Vec<NodeConfig> =
        ports.iter().enumerate().map(|(i, port)| config(i as u64 + 1, *port, &peers, root.path())).collect();
    let mut handles = Vec::new();
    for config in &configs {
        handles.push(Some(start(config.clone()).await));
    }
    (configs, handles)
}

fn client(handles: &[Option<NodeHandle>]) -> Client {
    let endpoints = handles.iter().flatten().map(|handle| handle.addr().to_string()).collect();
    Client::new(ClientConfig::new(endpoints)).expect("client")
}

/// Polls `check` until it gives Some, failing after `DEADLINE` with the last thing it saw.
async fn wait_for<T>(what: &str, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < DEADLINE {
        match check().await {
            Ok(value) => return value,
            Err(seen) => last = seen,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {DEADLINE:?} waiting for {what}; last seen: {last}");
}

async fn wait_for_storage_up(client: &Client, n: usize) {
    wait_for("every storage node up", async || {
        let status = client.status().await.map_err(|e| e.to_string())?;
        let up = status.nodes.iter().filter(|node| node.storage && node.state == "up").count();
        if up == n {
            Ok(())
        } else {
            Err(format!("{:?}", status.nodes))
        }
    })
    .await;
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_in_one_process_detect_a_stopped_node_repair_it_and_stop_without_leftovers() {
    let tasks_before = alive_tasks();
    let root = tempfile::tempdir().expect("tempdir");
    let (_configs, mut handles) = start_cluster(&root, 3).await;
    let client = client(&handles);

    wait_for_storage_up(&client, 3).await;
    let content = stamped_bytes(7, 0, (1 << 20) + 123);
    let reply = client
        .put_file("/in-process/a", std::io::Cursor::new(content.clone()), Some(content.len() as u64), None, |_| {})
        .await
        .expect("put");
    assert_eq!(reply.size, content.len() as u64);

    // Stop a follower that holds copies, through its handle.
    let leader = handles.iter().flatten().find(|h| h.is_leader()).map(|h| h.id()).expect("a leader");
    let info = client.stat_file("/in-process/a").await.expect("stat");
    let victim = (1..=3u64)
        .filter(|id| *id != leader)
        .find(|id| info.chunks.iter().any(|chunk| chunk.replicas.contains(id)))
        .expect("a follower holds a copy");
    drop(client);
    let handle = handles[victim as usize - 1].take().expect("running");
    handle.stop().await.expect("a clean stop");

    let survivors = handles.iter().flatten().map(|h| h.addr().to_string()).collect();
    let client = Client::new(ClientConfig::new(survivors)).expect("client");
    wait_for("the stopped node down and every chunk back to two copies", async || {
        let status = client.status().await.map_err(|e| e.to_string())?;
        let state = status.nodes.iter().find(|n| n.id == victim).map(|n| n.state.clone()).unwrap_or_default();
        let repaired = status.repair.as_ref().is_some_and(|job| job.finished_unix_ms.is_some());
        if state == "down" && status.under_replicated_chunks == 0 && status.lost_chunks == 0 && repaired {
            Ok(())
        } else {
            Err(format!(
                "node {victim} {state}, {} under-replicated, repair {:?}",
                status.under_replicated_chunks, status.repair
            ))
        }
    })
    .await;
    let info = wait_for("no copy listed on the stopped node", async || {
        let info = client.stat_file("/in-process/a").await.map_err(|e| e.to_string())?;
        let clean = info.chunks.iter().all(|c| c.replicas.len() == 2 && !c.replicas.contains(&victim));
        if clean {
            Ok(info)
        } else {
            Err(format!("{:?}", info.chunks.iter().map(|c| &c.replicas).collect::<Vec<_>>()))
        }
    })
    .await;
    assert!(!info.chunks.is_empty());
    let mut read = Vec::new();
    client.get_file("/in-process/a", &mut read, |_, _| {}).await.expect("get after repair");
    assert!(read == content, "the file reads back whole after repair");

    drop(client);
    for handle in handles.iter_mut().filter_map(Option::take) {
        handle.stop().await.expect("a clean stop");
    }
    // Nothing of the nodes is left running: no worker, server, Raft task or peer connection.
    wait_for("every task of the stopped nodes to end", async || {
        let alive = alive_tasks();
        if alive <= tasks_before {
            Ok(())
        } else {
            Err(format!("{alive} tasks alive, {tasks_before} before"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_releases_its_files_and_port_and_restarts_with_its_data() {
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("free port");
    let mut config = config(1, port, &format!("1=127.0.0.1:{port}"), root.path());
    config.replication_factor = 1;
    let node = start(config.clone()).await;
    let client = Client::new(ClientConfig::new(vec![node.addr().to_string()])).expect("client");
    wait_for("a leader", async || client.set(b"k", b"before the stop", None, None).await.map_err(|e| e.to_string()))
        .await;
    drop(client);
    node.stop().await.expect("a clean stop");

    // The same directory (its redb files and chunk store lock) and the same port, at once.
    let node = start(config).await;
    let client = Client::new(ClientConfig::new(vec![node.addr().to_string()])).expect("client");
    let kv = wait_for("the key after the restart", async || {
        client.get(b"k").await.map_err(|e| e.to_string())?.ok_or_else(|| "no key yet".to_string())
    })
    .await;
    assert_eq!(kv.value, b"before the stop");
    drop(client);
    node.stop().await.expect("a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_in_flight_when_its_coordinator_is_stopped_completes() {
    use tokio::io::AsyncWriteExt;

    let root = tempfile::tempdir().expect("tempdir");
    let (_configs, mut handles) = start_cluster(&root, 3).await;
    let everyone = client(&handles);
    wait_for_storage_up(&everyone, 3).await;
    let leader = handles.iter().flatten().find(|h| h.is_leader()).map(|h| h.id()).expect("a leader");
    let coordinator_id = (1..=3u64).find(|id| *id != leader).expect("a follower");
    let coordinator = handles[coordinator_id as usize - 1].take().expect("running");
    let through_it = Client::new(ClientConfig::new(vec![coordinator.addr().to_string()])).expect("client");

    let content = stamped_bytes(11, 0, 16 << 20);
    let (mut writer, reader) = tokio::io::duplex(64 << 10);
    let size = content.len() as u64;
    let upload =
        tokio::spawn(async move { through_it.put_file("/in-process/drained", reader, Some(size), None, |_| {}).await });
    // Well past what the client and the connection buffer: the coordinator is receiving.
    writer.write_all(&content[..10 << 20]).await.expect("first part");
    let stopping = tokio::spawn(coordinator.stop());
    writer.write_all(&content[10 << 20..]).await.expect("the rest, while the node stops");
    drop(writer);
    let reply = upload.await.expect("upload task").expect("the upload the stop found in flight completes");
    assert_eq!(reply.size, size);
    stopping.await.expect("stop task").expect("a clean stop");

    let mut read = Vec::new();
    everyone.get_file("/in-process/drained", &mut read, |_, _| {}).await.expect("get from the others");
    assert!(read == content, "the file reads back whole");
    drop(everyone);
    for handle in handles.iter_mut().filter_map(Option::take) {
        handle.stop().await.expect("a clean stop");
    }
}

/// `mendfs_rpc_requests_total`'s `op` labels, from a scrape of `/metrics`.
fn request_ops(http_addr: std::net::SocketAddr) -> std::collections::BTreeMap<String, f64> {
    let (code, response) = http_get(http_addr, "/metrics", "");
    assert_eq!(code, 200, "{response}");
    let mut ops = std::collections::BTreeMap::new();
    for line in response.lines().filter(|line| line.starts_with("mendfs_rpc_requests_total{")) {
        let op = line.split("op=\"").nth(1).and_then(|rest| rest.split('"').next()).expect("an op label");
        let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a value");
        *ops.entry(op.to_string()).or_default() += value;
    }
    ops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_made_up_paths_without_credentials_add_no_metric_series() {
    use tonic::codegen::http::uri::PathAndQuery;

    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("free port");
    let mut config = config(1, port, &format!("1=127.0.0.1:{port}"), root.path());
    config.insecure_dev = false;
    config.secret = Some("the cluster secret".into());
    config.http = Some("127.0.0.1:0".into());
    config.replication_factor = 1;
    let node = start(config).await;
    let http_addr = node.http_addr().expect("an HTTP address");
    let mut client_config = ClientConfig::new(vec![node.addr().to_string()]);
    client_config.secret = Some("the cluster secret".into());
    let client = Client::new(client_config).expect("client");
    wait_for("a leader", async || client.set(b"k", b"v", None, None).await.map_err(|e| e.to_string())).await;
    let before = tokio::task::block_in_place(|| request_ops(http_addr));

    const CALLS: u64 = 2_000;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    for i in 0..CALLS {
        grpc.ready().await.expect("ready");
        let path = PathAndQuery::try_from(format!("/x.Y{i}/M{}", i * 7919)).expect("path");
        let codec = tonic_prost::ProstCodec::<mendfs_proto::v1::InfoRequest, mendfs_proto::v1::NodeInfo>::default();
        let answer = grpc.unary(tonic::Request::new(mendfs_proto::v1::InfoRequest {}), path, codec).await;
        // Refused before any router: a stranger learns nothing, not even which methods exist.
        assert_eq!(answer.expect_err("no credentials").code(), tonic::Code::Unauthenticated);
    }

    let after = tokio::task::block_in_place(|| request_ops(http_addr));
    let new_ops: Vec<&String> = after.keys().filter(|op| !before.contains_key(*op)).collect();
    assert!(new_ops.iter().all(|op| op.as_str() == "unknown"), "new op labels: {new_ops:?}");
    assert!(after.get("unknown").copied().unwrap_or(0.0) >= CALLS as f64, "every made-up call is counted once");
    drop(client);
    node.stop().await.expect("a clean stop");
}

/// (status code, body) of `GET path` with optional extra header lines.
fn http_get(http_addr: std::net::SocketAddr, path: &str, extra_headers: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(http_addr).expect("connect to --http");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {http_addr}\r\n{extra_headers}\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_metrics_token_only_its_bearer_scrapes_and_health_stays_open() {
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("free port");
    let mut config = config(1, port, &format!("1=127.0.0.1:{port}"), root.path());
    config.http = Some("127.0.0.1:0".into());
    config.metrics_token = Some("scrape-me".into());
    let node = start(config).await;
    let http = node.http_addr().expect("an HTTP address");
    tokio::task::block_in_place(|| {
        assert_eq!(http_get(http, "/metrics", "").0, 401, "no token");
        assert_eq!(http_get(http, "/metrics", "Authorization: Bearer scrape-m\r\n").0, 401, "a wrong token");
        assert_eq!(http_get(http, "/metrics", "Authorization: Basic scrape-me\r\n").0, 401, "not a bearer");
        let (code, body) = http_get(http, "/metrics", "Authorization: Bearer scrape-me\r\n");
        assert_eq!(code, 200);
        assert!(body.contains("mendfs_node_info"), "{body}");
        assert_eq!(http_get(http, "/healthz", "").0, 200, "liveness needs no token");
    });
    node.stop().await.expect("a clean stop");
}

/// Reads from `stream` until the node closes it (EOF or reset); returns how long that took,
/// or None if it is still open after `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {} // the server's HTTP/2 preface and settings
        }
    }
}

/// Connections are bounded per address, and silent ones are closed: before their first bytes
/// after the handshake timeout, later after the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_bound_connections_per_address_and_close_silent_ones() {
    use tokio::io::AsyncWriteExt;
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("free port");
    let mut config = config(1, port, &format!("1=127.0.0.1:{port}"), root.path());
    config.max_connections_per_ip = 3;
    config.idle_timeout_ms = 1_000;
    let node = start(config).await;
    let connect = || tokio::net::TcpStream::connect(node.addr());

    // Three connections are held; a fourth from the same address is closed at once.
    let mut silent = connect().await.expect("connect");
    let silent_since = Instant::now();
    let mut talked = connect().await.expect("connect");
    let _third = connect().await.expect("connect");
    // Each is admitted once the accept loop took it: wait until the node answers the third.
    let mut fourth = wait_for("a fourth connection to be refused", async || {
        let mut fourth = connect().await.map_err(|e| e.to_string())?;
        match closed_within(&mut fourth, Duration::from_secs(2)).await {
            Some(_) => Ok(fourth),
            None => Err("the fourth connection stayed open".into()),
        }
    })
    .await;
    drop(fourth.shutdown().await);

    // A connection that sent its preface and then nothing is closed after the idle timeout.
    talked.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("send the preface");
    let idle = closed_within(&mut talked, Duration::from_secs(30)).await.expect("closed when idle");
    assert!(idle >= Duration::from_millis(900), "closed after {idle:?}, before the idle timeout");
    // One that never sent a byte is closed after the handshake timeout (10 s).
    closed_within(&mut silent, Duration::from_secs(30)).await.expect("closed without a first byte");
    let never = silent_since.elapsed();
    assert!(never >= Duration::from_secs(9), "closed {never:?} after it connected");
    // Closed connections free their places.
    let mut again = connect().await.expect("connect");
    assert!(closed_within(&mut again, Duration::from_millis(500)).await.is_none(), "a freed place is taken again");
    node.stop().await.expect("a clean stop");
}

/// openraft 0.9 lets a leader that lost its quorum go on believing it leads, while the
/// majority could elect another and expire sessions. Such a leader must not acknowledge a
/// keep-alive; and a client that hears no acknowledgement gives its session up 2/3 of the TTL
/// after sending the last acknowledged one, before the cluster could expire it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_without_a_quorum_refuses_keep_alives_and_the_client_gives_the_session_up() {
    const TTL: Duration = Duration::from_secs(3);
    let root = tempfile::tempdir().expect("tempdir");
    let (_configs, mut handles) = start_cluster(&root, 3).await;
    let leader = wait_for("a leader", async || {
        handles.iter().flatten().find(|h| h.is_leader()).map(|h| h.id()).ok_or_else(|| "no leader yet".to_string())
    })
    .await;
    let leader_idx = leader as usize - 1;
    let mut config = ClientConfig::new(vec![handles[leader_idx].as_ref().expect("running").addr().to_string()]);
    config.deadline = Duration::from_secs(2);
    config.attempt_timeout = Duration::from_secs(1);
    let client = Client::new(config).expect("client");
    let session = wait_for("a session", async || client.open_session(TTL).await.map_err(|e| e.to_string())).await;
    session.keep_alive().await.expect("a keep-alive is acknowledged while the leader has its quorum");
    let in_background = session.keep_alive_in_background();

    for idx in (0..3).filter(|idx| *idx != leader_idx) {
        handles[idx].take().expect("running").stop().await.expect("a clean stop");
    }
    let alone_since = Instant::now();
    let leader_handle = handles[leader_idx].as_ref().expect("running");
    assert!(leader_handle.is_leader(), "the premise: alone, the leader still believes it leads");
    let refused = session.keep_alive().await;
    assert!(
        matches!(refused, Err(mendfs_client::Error::Timeout { .. })),
        "a leader without a quorum acknowledged a keep-alive: {refused:?}"
    );
    assert!(leader_handle.is_leader(), "refused by a node that still believes it leads");

    let ended = tokio::time::timeout(TTL, in_background).await.expect("given up within the TTL").expect("task");
    let given_up_after = alone_since.elapsed();
    let mendfs_client::Error::SessionLost { silent_for, .. } = ended else {
        panic!("the session ended otherwise: {ended}");
    };
    assert!(
        silent_for >= TTL * 2 / 3 && silent_for < TTL,
        "given up {silent_for:?} after the last acknowledged send, not at 2/3 of the {TTL:?} TTL"
    );
    eprintln!("alone, the leader refused keep-alives; the client gave the session up {given_up_after:?} later");
    for handle in handles.into_iter().flatten() {
        handle.stop().await.expect("a clean stop");
    }
}
