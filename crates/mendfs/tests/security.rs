//! Security against real `mendfs server` processes: a TLS cluster that refuses plaintext and
//! foreign certificates, client tokens and their roles, peer-only RPCs closed to clients,
//! crafted peer messages that are refused without stopping Raft, spoofed heartbeats, and
//! strangers whose calls allocate nothing.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use mendfs_proto::v1 as pb;
use mendfs_testkit::{free_port, output_result, wait_for, Cluster, ClusterOptions};
use serde_json::Value;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(120);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

fn start(options: ClusterOptions) -> Cluster {
    let cluster = Cluster::start(binary(), options).expect("start cluster");
    cluster.wait_for_leader(DEADLINE).expect("a leader");
    cluster
}

fn node(status: &Value, id: u64) -> &Value {
    status["nodes"].as_array().and_then(|nodes| nodes.iter().find(|n| n["id"] == id)).unwrap_or(&Value::Null)
}

fn wait_status(cluster: &Cluster, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, DEADLINE, || Ok(cluster.status().ok().filter(|status| done(status)))).unwrap()
}

/// The CLI as a client holding `token` (not the secret), at `endpoints`.
fn as_token(cluster: &Cluster, endpoints: &str, token: &str) -> std::process::Command {
    let mut command = cluster.cli_at(endpoints);
    command.env_remove("MENDFS_SECRET").env("MENDFS_TOKEN", token);
    command
}

fn run(mut command: std::process::Command, args: &[&str]) -> Output {
    command.args(args).output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Creates a token with the secret (the operator on a node) and returns it.
fn create_token(cluster: &Cluster, name: &str, role: &str) -> String {
    cluster.run_cli(&["auth", "token", "create", name, "--role", role]).unwrap().trim().to_string()
}

fn wait_until_writable(cluster: &Cluster) {
    let file = cluster.root().join("probe.bin");
    std::fs::write(&file, b"probe").unwrap();
    let file = file.to_str().unwrap().to_string();
    wait_for("a writable cluster", DEADLINE, || Ok(cluster.run_cli(&["put", &file, "/probe"]).ok())).unwrap();
}

#[test]
fn a_tls_cluster_serves_https_and_refuses_plaintext_and_foreign_certificates() {
    let cluster = start(ClusterOptions { tls: true, ..ClusterOptions::default() });
    wait_until_writable(&cluster);
    let admin = create_token(&cluster, "admin", "admin");
    let https: String = cluster.endpoint_list().iter().map(|e| format!("https://{e}")).collect::<Vec<_>>().join(",");

    // put/get/kv/trace through https:// with the CA and a token.
    let data = cluster.root().join("data.bin");
    let contents: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    std::fs::write(&data, &contents).unwrap();
    let put = run(as_token(&cluster, &https, &admin), &["put", data.to_str().unwrap(), "/over-tls", "--trace"]);
    assert!(put.status.success(), "put over TLS: {}", stderr(&put));
    let trace_id = stderr(&put).lines().find_map(|l| l.strip_prefix("trace id: ")).unwrap().trim().to_string();
    let back = cluster.root().join("back.bin");
    let get = run(as_token(&cluster, &https, &admin), &["get", "/over-tls", back.to_str().unwrap()]);
    assert!(get.status.success(), "get over TLS: {}", stderr(&get));
    assert_eq!(std::fs::read(&back).unwrap(), contents);
    let set = run(as_token(&cluster, &https, &admin), &["kv", "set", "tls-key", "tls-value"]);
    assert!(set.status.success(), "kv set over TLS: {}", stderr(&set));
    let value = output_result(&[], run(as_token(&cluster, &https, &admin), &["kv", "get", "tls-key"])).unwrap();
    assert_eq!(value.trim(), "tls-value");
    wait_for("the put's trace over TLS", DEADLINE, || {
        let trace = run(as_token(&cluster, &https, &admin), &["trace", &trace_id, "--json", "--timeout", "5"]);
        let spans =
            serde_json::from_slice::<Value>(&trace.stdout).ok().and_then(|t| t["spans"].as_array().map(Vec::len));
        Ok(spans.filter(|spans| *spans >= 3))
    })
    .unwrap();

    // A plaintext client: its HTTP/2 preface is no TLS handshake.
    let mut plaintext = as_token(&cluster, &cluster.endpoints(), &admin);
    plaintext.env_remove("MENDFS_CA");
    let refused = run(plaintext, &["cluster", "status", "--timeout", "3"]);
    assert!(!refused.status.success(), "a plaintext client is refused");

    // A client, and a node, with certificates from another CA.
    let other = cluster.root().join("other-ca");
    let made = Command::new(binary())
        .args(["cert", "init"])
        .arg(&other)
        .args(["--nodes", "1", "--clients", "intruder"])
        .output()
        .unwrap();
    output_result(&["cert", "init"], made).unwrap();
    for (cert, key) in [("client-intruder.pem", "client-intruder.key"), ("node-1.pem", "node-1.key")] {
        let mut foreign = as_token(&cluster, &https, &admin);
        foreign.env("MENDFS_CLIENT_CERT", other.join(cert)).env("MENDFS_CLIENT_KEY", other.join(key));
        let refused = run(foreign, &["cluster", "status", "--timeout", "3"]);
        assert!(!refused.status.success(), "a {cert} from another CA is refused");
    }
    // Refusals are logged with the peer's address.
    wait_for("a logged refusal with the peer address", DEADLINE, || {
        Ok(cluster
            .nodes
            .keys()
            .any(|id| cluster.log(*id).contains("refused a connection: TLS handshake with 127.0.0.1:"))
            .then_some(()))
    })
    .unwrap();
    // A node with another CA's certificate cannot join: the cluster and it refuse each other.
    let mut cluster = cluster;
    cluster.add_node_entry(4).unwrap();
    let (foreign_addr, foreign_log_path) = (cluster.nodes[&4].addr.clone(), cluster.nodes[&4].log_path.clone());
    let server = cluster.server_command(4, false).unwrap();
    let args: Vec<String> = server.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut swapped = Command::new(binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MENDFS_") {
            swapped.env_remove(name);
        }
    }
    let mut skip = 0;
    for arg in &args {
        if skip > 0 {
            skip -= 1;
            continue;
        }
        if arg.starts_with("--tls-") {
            skip = 1;
            continue;
        }
        swapped.arg(arg);
    }
    swapped
        .arg("--tls-cert")
        .arg(other.join("node-1.pem"))
        .arg("--tls-key")
        .arg(other.join("node-1.key"))
        .arg("--tls-ca")
        .arg(other.join("ca.pem"))
        .arg("--roles")
        .arg("storage")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&foreign_log_path).unwrap());
    let mut child = swapped.spawn().unwrap();
    let _ = cluster.run_cli(&["cluster", "add-node", "4", &foreign_addr, "--learner", "--timeout", "5"]);
    let foreign_log = || std::fs::read_to_string(&foreign_log_path).unwrap_or_default();
    wait_for("the foreign node to refuse the cluster's certificate", DEADLINE, || {
        Ok(foreign_log().contains("refused a connection: TLS handshake").then_some(()))
    })
    .unwrap();
    let status = cluster.status().unwrap();
    assert!(node(&status, 4)["applied_index"].as_u64().unwrap_or(0) == 0, "the foreign node caught up: {status}");
    child.kill().unwrap();
    child.wait().unwrap();
}

use std::process::Command;

/// Tokens and roles, as clients see them on every node.
#[test]
fn tokens_have_roles_and_a_revoked_token_stops_working_on_every_node() {
    let cluster = start(ClusterOptions::default());
    wait_until_writable(&cluster);
    let reader = create_token(&cluster, "reader", "read");
    let writer = create_token(&cluster, "writer", "write");
    let admin = create_token(&cluster, "admin", "admin");
    let endpoints = cluster.endpoints();
    let file = cluster.root().join("f.txt");
    std::fs::write(&file, b"hello").unwrap();
    let file = file.to_str().unwrap();

    // write: put, kv set; not drain, not tokens.
    for args in [vec!["put", file, "/f"], vec!["kv", "set", "k", "v"]] {
        let out = run(as_token(&cluster, &endpoints, &writer), &args);
        assert!(out.status.success(), "{args:?} as write: {}", stderr(&out));
    }
    // read: get, ls, stat, kv get, cluster status; nothing that writes.
    for args in
        [vec!["get", "/f", "-"], vec!["ls", "/"], vec!["stat", "/f"], vec!["kv", "get", "k"], vec!["cluster", "status"]]
    {
        let out = run(as_token(&cluster, &endpoints, &reader), &args);
        assert!(out.status.success(), "{args:?} as read: {}", stderr(&out));
    }
    for args in [
        vec!["put", file, "/g"],
        vec!["rm", "/f"],
        vec!["kv", "set", "k", "w"],
        vec!["cluster", "drain", "2"],
        vec!["auth", "token", "create", "x", "--role", "admin"],
    ] {
        let out = run(as_token(&cluster, &endpoints, &reader), &args);
        assert!(!out.status.success(), "{args:?} as read succeeded");
        assert!(stderr(&out).contains("permission denied: role read"), "{args:?}: {}", stderr(&out));
    }
    for args in [vec!["cluster", "drain", "2"], vec!["auth", "token", "list"]] {
        let out = run(as_token(&cluster, &endpoints, &writer), &args);
        assert!(stderr(&out).contains("permission denied: role write"), "{args:?}: {}", stderr(&out));
    }
    let listed =
        output_result(&[], run(as_token(&cluster, &endpoints, &admin), &["auth", "token", "list", "--json"])).unwrap();
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    assert!(!listed.to_string().contains(&reader), "tokens are never listed");
    let whoami = output_result(&[], run(as_token(&cluster, &endpoints, &writer), &["auth", "whoami"])).unwrap();
    assert!(whoami.contains("token writer (role write)"), "{whoami}");

    // A lock's command gets its fencing token, and neither the holder's token nor the secret.
    let mut lock = as_token(&cluster, &endpoints, &writer);
    lock.env("MENDFS_SECRET", cluster.secret().unwrap());
    let held = run(
        lock,
        &[
            "kv",
            "lock",
            "job",
            "--",
            "sh",
            "-c",
            "echo \"$MENDFS_LOCK_TOKEN ${MENDFS_TOKEN:-no-token} ${MENDFS_SECRET:-no-secret}\"",
        ],
    );
    assert!(held.status.success(), "kv lock: {}", stderr(&held));
    let seen = String::from_utf8_lossy(&held.stdout);
    assert!(seen.trim().ends_with(" no-token no-secret"), "the command saw: {seen}");

    // `get` never writes through a planted symlink: the link is replaced, its target untouched.
    let victim = cluster.root().join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let destination = cluster.root().join("download.txt");
    std::os::unix::fs::symlink(&victim, &destination).unwrap();
    let get = run(as_token(&cluster, &endpoints, &reader), &["get", "/f", destination.to_str().unwrap()]);
    assert!(get.status.success(), "get: {}", stderr(&get));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "the symlink's target is untouched");
    assert!(!std::fs::symlink_metadata(&destination).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read(&destination).unwrap(), b"hello");
    // Nor into a directory a planted symlink points to (where a download into a directory
    // would go): the link is replaced, and nothing lands among the directory's files.
    let victim_dir = cluster.root().join("victim-dir");
    std::fs::create_dir(&victim_dir).unwrap();
    let planted = cluster.root().join("planted");
    std::os::unix::fs::symlink(&victim_dir, &planted).unwrap();
    let get = run(as_token(&cluster, &endpoints, &reader), &["get", "/f", planted.to_str().unwrap()]);
    assert!(get.status.success(), "get: {}", stderr(&get));
    assert_eq!(std::fs::read_dir(&victim_dir).unwrap().count(), 0, "nothing was written into the linked directory");
    assert!(!std::fs::symlink_metadata(&planted).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read(&planted).unwrap(), b"hello");

    // Revocation: every node refuses the token once it applied the revocation.
    let revoked =
        output_result(&[], run(as_token(&cluster, &endpoints, &admin), &["auth", "token", "revoke", "reader"]))
            .unwrap();
    assert!(revoked.contains("revoked"), "{revoked}");
    let started = Instant::now();
    for id in cluster.nodes.keys() {
        wait_for(&format!("node {id} to refuse the revoked token"), DEADLINE, || {
            let out = run(as_token(&cluster, &cluster.addr(*id), &reader), &["kv", "get", "k", "--timeout", "3"]);
            Ok(stderr(&out).contains("unknown, revoked or expired token").then_some(()))
        })
        .unwrap();
    }
    eprintln!("the revoked token was refused by every node {:?} after the revocation returned", started.elapsed());
}

/// A gRPC channel to `addr` whose calls carry `headers`.
async fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

fn with_headers<T>(message: T, headers: &[(&'static str, String)]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for (name, value) in headers {
        request.metadata_mut().insert(*name, value.parse::<AsciiMetadataValue>().unwrap());
    }
    request.set_timeout(Duration::from_secs(10));
    request
}

/// Every node-to-node RPC refuses a client token, even an admin's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tokens_cannot_call_peer_only_rpcs() {
    let cluster = tokio::task::block_in_place(|| start(ClusterOptions::default()));
    let admin = tokio::task::block_in_place(|| create_token(&cluster, "admin", "admin"));
    let headers = [("authorization", format!("Bearer {admin}"))];
    let channel = channel(&cluster.addr(1)).await;
    let payload = || pb::RaftPayload { data: vec![0; 8] };
    let mut node = pb::node_client::NodeClient::new(channel.clone());
    let mut health = pb::health_client::HealthClient::new(channel.clone());
    let mut storage = pb::storage_client::StorageClient::new(channel.clone());
    let answers = vec![
        ("AppendEntries", node.append_entries(with_headers(payload(), &headers)).await.map(drop)),
        (
            "AppendStream",
            node.append_stream(with_headers(futures::stream::iter([pb::AppendStreamRequest::default()]), &headers))
                .await
                .map(drop),
        ),
        ("Vote", node.vote(with_headers(payload(), &headers)).await.map(drop)),
        ("InstallSnapshot", node.install_snapshot(with_headers(payload(), &headers)).await.map(drop)),
        ("Forward", node.forward(with_headers(payload(), &headers)).await.map(drop)),
        (
            "Heartbeat",
            health.heartbeat(with_headers(pb::HeartbeatRequest { node_id: 1, health: None }, &headers)).await.map(drop),
        ),
        (
            "PrepareChunk",
            storage.prepare_chunk(with_headers(pb::PrepareChunkRequest::default(), &headers)).await.map(drop),
        ),
        ("ReadChunk", storage.read_chunk(with_headers(pb::ReadChunkRequest::default(), &headers)).await.map(drop)),
        (
            "ReplicateChunk",
            storage.replicate_chunk(with_headers(pb::ReplicateChunkRequest::default(), &headers)).await.map(drop),
        ),
    ];
    for (rpc, answer) in answers {
        let status = answer.expect_err(rpc);
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{rpc}: {status:?}");
        assert!(status.message().contains("peer-only"), "{rpc}: {}", status.message());
    }
}

/// Crafted peer messages (with the cluster secret) are refused, and Raft and repair go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_snapshots_forwards_and_spoofed_heartbeats_are_refused_and_the_cluster_heals() {
    let cluster = tokio::task::block_in_place(|| {
        let options = ClusterOptions {
            nodes: 4,
            server_args: ["--chunk-size-bytes", "65536", "--down-after-ms", "3000", "--acceptable-pause-ms", "1000"]
                .map(String::from)
                .to_vec(),
            ..ClusterOptions::default()
        };
        let cluster = start(options);
        wait_until_writable(&cluster);
        // Sixteen chunks to repair when a node dies.
        let file = cluster.root().join("one-mib.bin");
        std::fs::write(&file, (0..1u32 << 18).flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        cluster.run_cli(&["put", file.to_str().unwrap(), "/one-mib"]).unwrap();
        cluster
    });
    let secret = cluster.secret().unwrap();
    let status = tokio::task::block_in_place(|| cluster.status().unwrap());
    let (leader, term) = (status["leader"].as_u64().unwrap(), status["term"].as_u64().unwrap());
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let peer = |node: u64| [("x-mendfs-secret", secret.clone()), ("x-mendfs-node", node.to_string())];
    let mut target = pb::node_client::NodeClient::new(channel(&cluster.addr(follower)).await);

    // Two chunks of one snapshot, the second at offset 2^44.
    let first = mendfs_meta::crafted::install_snapshot_chunk(term, leader, "crafted-1", 0, vec![1; 100], false);
    let _ = target.install_snapshot(with_headers(pb::RaftPayload { data: first }, &peer(leader))).await;
    let far = mendfs_meta::crafted::install_snapshot_chunk(term, leader, "crafted-1", 1 << 44, vec![1; 100], false);
    let refused = target.install_snapshot(with_headers(pb::RaftPayload { data: far }, &peer(leader))).await;
    assert_eq!(refused.expect_err("a chunk at 2^44").code(), tonic::Code::InvalidArgument);
    // One undecodable last chunk.
    let garbage = mendfs_meta::crafted::install_snapshot_chunk(term, leader, "crafted-2", 0, vec![0xff; 4096], true);
    let refused = target.install_snapshot(with_headers(pb::RaftPayload { data: garbage }, &peer(leader))).await;
    let refused = refused.expect_err("an undecodable snapshot");
    assert!(refused.message().contains("not a MendFS snapshot"), "{refused:?}");

    // Forwarded commands that break the rules, sent straight to the leader.
    let mut at_leader = pb::node_client::NodeClient::new(channel(&cluster.addr(leader)).await);
    for (what, data) in [
        ("a 3-byte chunk hash", mendfs_meta::crafted::forward_commit_with_hash_len("/crafted", 3)),
        ("a 1 MiB key", mendfs_meta::crafted::forward_set(1 << 20, 1)),
        ("a 2 MiB value", mendfs_meta::crafted::forward_set(1, 2 << 20)),
    ] {
        let answer = at_leader.forward(with_headers(pb::RaftPayload { data }, &peer(follower))).await;
        // Refused as a malformed message, or answered with the validation error inside.
        let refused = match answer {
            Err(status) => status.code() == tonic::Code::InvalidArgument,
            Ok(reply) => mendfs_meta::crafted::forward_refusal(&reply.into_inner().data)
                .is_some_and(|why| why.starts_with("invalid argument")),
        };
        assert!(refused, "{what} was not refused");
    }

    // Kill a node; a peer keeps sending heartbeats in its name: refused, and it goes down.
    let victim = (1..=4).find(|id| *id != leader && *id != follower).unwrap();
    let mut cluster = cluster;
    tokio::task::block_in_place(|| cluster.kill(victim).unwrap());
    let spoof = |node_id: u64| pb::HeartbeatRequest { node_id, health: Some(pb::NodeHealth::default()) };
    let started = Instant::now();
    let mut refused = 0;
    loop {
        // To whichever node leads now (only the leader takes heartbeats).
        let status = tokio::task::block_in_place(|| cluster.status());
        if status.as_ref().is_ok_and(|s| node(s, victim)["state"] == "down") {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "the killed node was never declared down");
        if let Some(now_leading) = status.ok().and_then(|s| s["leader"].as_u64()).filter(|id| *id != victim) {
            let mut health = pb::health_client::HealthClient::new(channel(&cluster.addr(now_leading)).await);
            let sender = (1..=4).find(|id| *id != victim && *id != now_leading).unwrap();
            for headers in [peer(sender).to_vec(), vec![("x-mendfs-secret", secret.clone())]] {
                let status =
                    health.heartbeat(with_headers(spoof(victim), &headers)).await.expect_err("a spoofed heartbeat");
                match status.code() {
                    tonic::Code::PermissionDenied => refused += 1,
                    // Leadership moved since the status: ask again.
                    tonic::Code::FailedPrecondition if status.message().contains("not the leader") => {}
                    _ => panic!("a spoofed heartbeat: {status:?}"),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(refused >= 2);
    // Raft goes on on every live node, and repair brings every chunk back to three copies on
    // the three nodes left.
    tokio::task::block_in_place(|| {
        cluster.run_cli(&["kv", "set", "after", "crafted"]).unwrap();
        for id in (1..=4).filter(|id| *id != victim) {
            let value = cluster.cli_at(&cluster.addr(id)).args(["kv", "get", "after"]).output().unwrap();
            assert!(value.status.success(), "node {id} still serves: {}", stderr(&value));
        }
        wait_status(&cluster, "every chunk back to three copies", |s| {
            // The 1 MiB file's sixteen (the writability probe is small: inline in the metadata).
            s["under_replicated_chunks"] == 0 && s["chunks"].as_u64() >= Some(16)
        });
        for id in (1..=4).filter(|id| *id != victim) {
            assert!(!cluster.log(id).contains("panicked"), "node {id} panicked:\n{}", cluster.log_tail(id, 40));
        }
    });
}

/// 10,000 calls to made-up methods without credentials: no metric series, no spans, no
/// growth worth measuring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_unknown_calls_from_strangers_add_no_series_and_no_spans() {
    use tonic::codegen::http::uri::PathAndQuery;
    const CALLS: u32 = 10_000;
    let http_addr = format!("127.0.0.1:{}", free_port().unwrap());
    let cluster = tokio::task::block_in_place(|| {
        let options = ClusterOptions {
            nodes: 1,
            server_args: ["--replication-factor", "1"].map(String::from).to_vec(),
            node_args: BTreeMap::from([(1, vec!["--http".to_string(), http_addr.clone()])]),
            ..ClusterOptions::default()
        };
        start(options)
    });
    let series = || {
        let body = reqwest_metrics(&http_addr);
        body.lines().filter(|line| line.starts_with("mendfs_rpc_requests_total{")).count()
    };
    let telemetry = cluster.nodes[&1].data_dir.join("telemetry").join("spans");
    let dir_bytes = |dir: &Path| -> u64 {
        std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
    };
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let pid = cluster.nodes[&1].pid().unwrap();
    // One known call first, so the series that exist are there before the count.
    tokio::task::block_in_place(|| cluster.run_cli(&["kv", "set", "k", "v"]).unwrap());
    let (series_before, spans_before, rss_before) =
        (tokio::task::block_in_place(series), dir_bytes(&telemetry), rss(pid));

    let mut grpc = tonic::client::Grpc::new(channel(&cluster.addr(1)).await);
    let started = Instant::now();
    for i in 0..CALLS {
        grpc.ready().await.unwrap();
        let path = PathAndQuery::try_from(format!("/x{}.Y/{:032x}", i % 97, rand::random::<u128>())).unwrap();
        let codec = tonic_prost::ProstCodec::<pb::InfoRequest, pb::NodeInfo>::default();
        let mut request = tonic::Request::new(pb::InfoRequest {});
        if i % 2 == 1 {
            // A made-up token: refused after the node has caught up, which must cost no more.
            let bearer = format!("Bearer mendfs_tok_{:064x}", rand::random::<u128>());
            request.metadata_mut().insert("authorization", AsciiMetadataValue::try_from(bearer).unwrap());
        }
        let answer = grpc.unary(request, path, codec).await;
        assert_eq!(answer.expect_err("no credentials").code(), tonic::Code::Unauthenticated);
        assert!(started.elapsed() < DEADLINE, "{CALLS} calls took too long");
    }
    let (series_after, spans_after, rss_after) = (tokio::task::block_in_place(series), dir_bytes(&telemetry), rss(pid));
    // The refused calls share one series (op "unknown", outcome "Unauthenticated").
    assert!(series_after <= series_before + 1, "series {series_before} → {series_after}");
    assert!(spans_after - spans_before < 32 << 10, "the span store grew {} bytes", spans_after - spans_before);
    eprintln!(
        "{CALLS} unknown calls: series {series_before} → {series_after}, node RSS {rss_before} KiB → {rss_after} KiB"
    );
}

/// `GET /metrics` body over HTTP/1.0.
fn reqwest_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

/// One raw HTTP/1.1 GET with the given headers: status code, head and body.
fn http_get_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let extra: String = headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
    write!(stream, "GET {path} HTTP/1.1\r\n{extra}Connection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (code, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn an_open_clusters_dashboard_api_is_not_readable_by_other_sites_or_rebound_names() {
    // No secret: the API needs no token, so a browser must not carry a web page to it.
    let http = format!("127.0.0.1:{}", free_port().unwrap());
    let node_args = BTreeMap::from([(1, vec!["--http".to_string(), http.clone()])]);
    let cluster = start(ClusterOptions { nodes: 3, secure: false, node_args, ..ClusterOptions::default() });
    let status = |headers: &[(&str, &str)]| http_get_with(&http, "/api/status", headers);

    let (code, head, body) = wait_for("the dashboard API", DEADLINE, || {
        let answer = status(&[("Host", &http)]);
        Ok((answer.0 == 200).then_some(answer))
    })
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(!head.contains("access-control-allow-origin"), "no origin asked, none allowed: {head}");

    // Another site's page: answered (the browser sends it anyway) but not readable by it.
    let (code, head, _) = status(&[("Host", &http), ("Origin", "https://evil.example")]);
    assert_eq!(code, 200);
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    // Another node's dashboard (a page whose own node died reads this one): readable.
    let (code, head, _) = status(&[("Host", &http), ("Origin", "http://127.0.0.1:1")]);
    assert_eq!(code, 200);
    assert!(head.contains("access-control-allow-origin: http://127.0.0.1:1"), "{head}");
    // DNS rebinding: a page of evil.example whose name now points here is same-origin to the
    // browser, but names its own host.
    let (code, _, body) = status(&[("Host", "evil.example:9000")]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("no secret"), "{body}");
    let (code, _, body) = status(&[("Host", "localhost")]);
    assert_eq!(code, 200, "{body}");

    // With a secret any origin may read, since only a token it holds opens the API.
    let secured = format!("127.0.0.1:{}", free_port().unwrap());
    let node_args = BTreeMap::from([(1, vec!["--http".to_string(), secured.clone()])]);
    let _secured_cluster = start(ClusterOptions { nodes: 1, node_args, ..ClusterOptions::default() });
    let (code, head, _) =
        http_get_with(&secured, "/api/status", &[("Host", "anything.example"), ("Origin", "https://a.example")]);
    assert_eq!(code, 401, "a token is needed");
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    drop(cluster);
}

/// One raw HTTP/1.1 POST of a JSON body: status code and body.
fn http_post_json(addr: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0), body.to_string())
}

/// A token works on every node as soon as its creation returns, also on a node that had not
/// applied it when the call came: such a node catches up with the leader before it refuses a
/// token it does not know. The lagging node is paused (SIGSTOP) while the token is created,
/// and the calls with it wait in its sockets when it runs again, beside the entries it missed.
/// Three nodes with dashboards (their addresses by node id - 1), a follower to pause, and
/// the endpoints of the two others.
fn cluster_with_a_follower_to_pause() -> (Cluster, Vec<String>, u64, String) {
    let http: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port().unwrap())).collect();
    let node_args = (1..=3u64).map(|id| (id, vec!["--http".to_string(), http[id as usize - 1].clone()])).collect();
    let cluster = start(ClusterOptions { nodes: 3, node_args, ..ClusterOptions::default() });
    let leader = cluster.wait_for_leader(DEADLINE).unwrap();
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    let others = cluster.endpoints_of(&(1..=3).filter(|id| *id != lagging).collect::<Vec<_>>());
    (cluster, http, lagging, others)
}

/// A dashboard status call with `token`, written into `addr`'s socket before this returns (a
/// paused node answers it once it runs again); the thread yields the raw HTTP response.
fn dashboard_status_sent_now(addr: &str, token: &str) -> std::thread::JoinHandle<String> {
    use std::io::{Read, Write};
    let (addr, bearer) = (addr.to_string(), format!("Bearer {token}"));
    let (sent, was_sent) = std::sync::mpsc::channel();
    let dashboard = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            stream,
            "GET /api/status HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {bearer}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        sent.send(()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    });
    was_sent.recv_timeout(DEADLINE).unwrap();
    dashboard
}

#[test]
fn a_token_is_admitted_at_once_by_a_node_that_had_not_applied_its_creation() {
    let (mut cluster, http, lagging, others) = cluster_with_a_follower_to_pause();
    let at_others = |cluster: &Cluster, args: &[&str]| output_result(args, run(cluster.cli_at(&others), args)).unwrap();
    at_others(&cluster, &["kv", "set", "k", "v"]);
    cluster.wait_for_caught_up(&[1, 2, 3], DEADLINE).unwrap();

    cluster.pause(lagging).unwrap();
    let token = at_others(&cluster, &["auth", "token", "create", "fresh", "--role", "read"]).trim().to_string();
    // The dashboard call is written into the paused node's socket before it runs again.
    let dashboard = dashboard_status_sent_now(&http[lagging as usize - 1], &token);
    let grpc = as_token(&cluster, &cluster.endpoints_of(&[lagging]), &token)
        .args(["kv", "get", "k"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cluster.resume(lagging).unwrap();

    let response = dashboard.join().unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "node {lagging}'s dashboard: {response}");
    let out = grpc.wait_with_output().unwrap();
    assert!(out.status.success(), "node {lagging} over gRPC: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains('v'), "{}", String::from_utf8_lossy(&out.stdout));

    // Catching up admits what exists and nothing else: a made-up token is still refused,
    // by the node that caught up and by the others.
    for id in 1..=3u64 {
        let endpoints = cluster.endpoints_of(&[id]);
        let out = run(as_token(&cluster, &endpoints, "mendfs_tok_made_up"), &["kv", "get", "k"]);
        assert!(stderr(&out).contains("unknown, revoked or expired token"), "node {id}: {}", stderr(&out));
    }
}

#[test]
fn a_revoked_token_is_refused_at_once_by_a_node_that_had_not_applied_the_revocation() {
    let (mut cluster, http, lagging, others) = cluster_with_a_follower_to_pause();
    let at_others = |cluster: &Cluster, args: &[&str]| output_result(args, run(cluster.cli_at(&others), args)).unwrap();
    at_others(&cluster, &["kv", "set", "k", "v"]);
    let token = at_others(&cluster, &["auth", "token", "create", "doomed", "--role", "read"]).trim().to_string();
    cluster.wait_for_caught_up(&[1, 2, 3], DEADLINE).unwrap();
    // The token works on the node about to lag, which so has a recent view of the tokens.
    let lagging_endpoint = cluster.endpoints_of(&[lagging]);
    output_result(&[], run(as_token(&cluster, &lagging_endpoint, &token), &["kv", "get", "k"])).unwrap();

    cluster.pause(lagging).unwrap();
    // Acknowledged by the two others; the paused node still holds the token as valid.
    at_others(&cluster, &["auth", "token", "revoke", "doomed"]);
    // Both calls are in the paused node's sockets before it runs again.
    let dashboard = dashboard_status_sent_now(&http[lagging as usize - 1], &token);
    let grpc = as_token(&cluster, &lagging_endpoint, &token)
        .args(["kv", "get", "k"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cluster.resume(lagging).unwrap();

    let response = dashboard.join().unwrap();
    assert!(response.starts_with("HTTP/1.1 401"), "node {lagging}'s dashboard admitted a revoked token: {response}");
    let out = grpc.wait_with_output().unwrap();
    assert!(!out.status.success(), "node {lagging} admitted a revoked token over gRPC");
    assert!(stderr(&out).contains("unknown, revoked or expired token"), "{}", stderr(&out));
}

#[test]
fn a_login_link_opens_one_session_once_and_the_session_expires_everywhere() {
    let http: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port().unwrap())).collect();
    let node_args = (1..=3u64).map(|id| (id, vec!["--http".to_string(), http[id as usize - 1].clone()])).collect();
    let cluster = start(ClusterOptions { nodes: 3, node_args, ..ClusterOptions::default() });
    // A read session of 3 s, opened through node 1's dashboard.
    let link = cluster.run_cli(&["auth", "login-link", "--session-ttl", "3s", "--dashboard", &http[0]]).unwrap();
    let code = link.trim().split_once("#login=").map(|(_, code)| code.to_string()).unwrap();
    let body = format!("{{\"code\":\"{code}\"}}");

    // Two pages racing with the same link: one session, one refusal.
    let racers: Vec<_> = (0..2)
        .map(|i| {
            let (addr, body) = (http[i].clone(), body.clone());
            std::thread::spawn(move || http_post_json(&addr, "/api/login", &body))
        })
        .collect();
    let answers: Vec<(u16, String)> = racers.into_iter().map(|racer| racer.join().unwrap()).collect();
    let opened: Vec<&(u16, String)> = answers.iter().filter(|(code, _)| *code == 200).collect();
    assert_eq!(opened.len(), 1, "exactly one login: {answers:?}");
    assert!(answers.iter().any(|(code, body)| *code == 401 && body.contains("already used")), "{answers:?}");
    let session: Value = serde_json::from_str(&opened[0].1).unwrap();
    let token = session["token"].as_str().unwrap().to_string();
    let opened_at = Instant::now();

    // The session is a read token on every node: status yes, writes no.
    for addr in &http {
        let (code, _, body) =
            http_get_with(addr, "/api/status", &[("Host", addr), ("Authorization", &format!("Bearer {token}"))]);
        assert_eq!(code, 200, "{addr}: {body}");
    }
    let endpoints = cluster.endpoints();
    let refused = run(as_token(&cluster, &endpoints, &token), &["kv", "set", "k", "v"]);
    assert!(stderr(&refused).contains("permission denied: role read"), "{}", stderr(&refused));

    // Past its lifetime, every node refuses it, without anyone revoking it.
    for addr in &http {
        wait_for("the session refused once expired", DEADLINE, || {
            let (code, _, _) =
                http_get_with(addr, "/api/status", &[("Host", addr), ("Authorization", &format!("Bearer {token}"))]);
            Ok((code == 401).then_some(()))
        })
        .unwrap();
    }
    assert!(opened_at.elapsed() >= Duration::from_millis(2_500), "refused before it expired");
    let out = run(as_token(&cluster, &endpoints, &token), &["cluster", "status"]);
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));

    // Bad input: a malformed code, a made-up one, garbage, an oversized body.
    for (body, expected) in [
        ("{\"code\":\"mendfs_login_xyz\"}", 401),
        (&format!("{{\"code\":\"mendfs_login_{}\"}}", "0".repeat(64)) as &str, 401),
        ("not json", 400),
        (&"x".repeat(4096) as &str, 413),
    ] {
        let (code, answer) = http_post_json(&http[1], "/api/login", body);
        assert_eq!(code, expected, "{body:.40}: {answer}");
    }
}
