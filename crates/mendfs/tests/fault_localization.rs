//! Fault localization against real `mendfs server` processes: a request's trace across nodes,
//! the failing hop named when a replica is stopped, Prometheus metrics that parse and move,
//! span stores that stay within their byte bound, and spans exported over OTLP.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mendfs_client::{Client, ClientConfig, TraceContext, TraceId};
use mendfs_testkit::{free_port, wait_for, Cluster, ClusterOptions};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(120);
const CHUNK: usize = 64 << 10;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

/// A cluster whose nodes each serve HTTP (metrics) on a port of their own; returns it and
/// each node's HTTP address.
fn start_with_http(nodes: usize, extra: &[&str]) -> (Cluster, BTreeMap<u64, String>) {
    let mut server_args: Vec<String> = vec!["--chunk-size-bytes".into(), CHUNK.to_string()];
    server_args.extend(extra.iter().map(|s| s.to_string()));
    let mut http = BTreeMap::new();
    let mut node_args = BTreeMap::new();
    for id in 1..=nodes as u64 {
        let addr = format!("127.0.0.1:{}", free_port().unwrap());
        node_args.insert(id, vec!["--http".to_string(), addr.clone()]);
        http.insert(id, addr);
    }
    let options = ClusterOptions { nodes, server_args, node_args, ..ClusterOptions::default() };
    let cluster = Cluster::start(binary(), options).expect("start cluster");
    cluster.wait_for_leader(DEADLINE).expect("a leader");
    (cluster, http)
}

fn client_at(cluster: &Cluster, endpoints: Vec<String>, trace: Option<TraceContext>) -> Client {
    let mut config = ClientConfig::new(endpoints);
    config.secret = cluster.secret();
    config.deadline = Duration::from_secs(60);
    config.trace = trace;
    Client::new(config).unwrap()
}

/// Waits until every storage node has registered (a put with RF 3 succeeds).
fn wait_until_writable(cluster: &Cluster) {
    let file = cluster.root().join("probe.bin");
    std::fs::write(&file, b"probe").unwrap();
    let file = file.to_str().unwrap().to_string();
    wait_for("a writable cluster", DEADLINE, || Ok(cluster.run_cli(&["put", &file, "/probe"]).ok())).unwrap();
}

/// `GET path` over HTTP/1.0 on loopback; (status code, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, body.to_string())
}

fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "GET /metrics: {body}");
    prometheus_parse::Scrape::parse(body.lines().map(|line| Ok(line.to_string()))).expect("a valid exposition")
}

fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// Runs `mendfs trace ID --json` until it finds spans satisfying `done`.
fn trace_json(cluster: &Cluster, endpoints: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_for(&format!("trace {id}"), DEADLINE, || {
        let output = cluster.cli_at(endpoints).args(["trace", id, "--json", "--timeout", "5"]).output()?;
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        let Ok(trace) = serde_json::from_str::<Value>(&text) else { return Ok(None) };
        Ok(done(&trace).then_some(trace))
    })
    .unwrap()
}

fn spans(trace: &Value) -> &Vec<Value> {
    trace["spans"].as_array().unwrap()
}

/// The spans whose parent is not among the trace's spans.
fn roots(trace: &Value) -> Vec<&Value> {
    let ids: BTreeSet<&str> = spans(trace).iter().filter_map(|s| s["span_id"].as_str()).collect();
    spans(trace).iter().filter(|s| s["parent"].as_str().is_none_or(|p| !ids.contains(p))).collect()
}

#[test]
fn a_put_is_one_trace_across_nodes_under_one_root_and_the_metrics_move() {
    let (cluster, http) = start_with_http(3, &[]);
    wait_until_writable(&cluster);
    let coordinator = cluster.wait_for_leader(DEADLINE).unwrap() % 3 + 1; // not the leader: the commit forwards
    let endpoint = cluster.addr(coordinator);

    let put_ok = |scrape: &prometheus_parse::Scrape| {
        sample(scrape, "mendfs_rpc_requests_total", &[("op", "Files/Put"), ("outcome", "ok")]).unwrap_or(0.0)
    };
    let before = put_ok(&scrape(&http[&coordinator]));

    // 3 chunks of 64 KiB and a bit, through the CLI with --trace.
    let local = cluster.root().join("traced.bin");
    std::fs::write(&local, mendfs_testkit::stamped_bytes(1, 0, 3 * CHUNK + 100)).unwrap();
    let output =
        cluster.cli_at(&endpoint).args(["put", local.to_str().unwrap(), "/traced", "--trace"]).output().unwrap();
    assert!(output.status.success(), "put: {}", String::from_utf8_lossy(&output.stderr));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let id = stderr
        .lines()
        .find_map(|line| line.strip_prefix("trace id: "))
        .unwrap_or_else(|| panic!("no trace id on stderr: {stderr}"))
        .trim()
        .to_string();
    assert_eq!(id.len(), 32);

    // 4 chunks × 3 replicas: a prepare_chunk hop per replica, naming it, and under each hop to
    // another node that replica's Storage/PrepareChunk span (the coordinator's own copies are
    // written in place, without an RPC to itself).
    let trace = trace_json(&cluster, &endpoint, &id, |t| {
        spans(t).iter().filter(|s| s["name"] == "Storage/PrepareChunk").count() >= 8
            && spans(t).iter().filter(|s| s["name"] == "prepare_chunk").count() >= 12
            && spans(t).iter().any(|s| s["name"] == "Files/Put")
    });
    let all = spans(&trace);
    let nodes: BTreeSet<u64> = all.iter().filter_map(|s| s["node"].as_u64()).collect();
    assert!(nodes.len() >= 2, "spans from {nodes:?} only");
    let roots = roots(&trace);
    assert_eq!(roots.len(), 1, "one root, got {roots:?}");
    assert_eq!(roots[0]["name"], "Files/Put");
    assert_eq!(roots[0]["node"], coordinator);
    assert!(all.iter().all(|s| s["status"] == "ok"), "a span failed: {trace}");
    // Correct nesting: each replica's server span sits under the coordinator's prepare hop to
    // that very node, and each hop under the put.
    let by_id: BTreeMap<&str, &Value> = all.iter().map(|s| (s["span_id"].as_str().unwrap(), s)).collect();
    let parent_of = |span: &Value| by_id.get(span["parent"].as_str().unwrap_or("")).copied();
    for server in all.iter().filter(|s| s["name"] == "Storage/PrepareChunk") {
        let hop = parent_of(server).expect("a replica span has its hop as parent");
        assert_eq!(hop["name"], "prepare_chunk");
        assert_eq!(hop["node"], coordinator);
        assert_eq!(hop["attributes"]["peer"].as_str(), Some(server["node"].to_string().as_str()));
        let mut ancestor = hop;
        while let Some(up) = parent_of(ancestor) {
            ancestor = up;
        }
        assert_eq!(ancestor["name"], "Files/Put");
    }
    let own = coordinator.to_string();
    let hops_to_self = all.iter().filter(|s| s["name"] == "prepare_chunk" && s["attributes"]["peer"] == own.as_str());
    assert_eq!(hops_to_self.count(), 4, "one local copy per chunk: {trace}");
    assert!(
        !all.iter().any(|s| s["name"] == "Storage/PrepareChunk" && s["node"] == coordinator),
        "no RPC to itself: {trace}"
    );
    // The commit went to the leader: its forward is in the trace too, on the leader.
    assert!(all.iter().any(|s| s["name"] == "commit_file"), "no commit span: {trace}");
    assert!(
        all.iter().any(|s| s["name"] == "Node/Forward" && s["node"] != coordinator),
        "no forwarded commit on the leader: {trace}"
    );

    // The tree view names the root and the hops.
    let text = cluster.cli_at(&endpoint).args(["trace", &id]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("Files/Put") && text.contains("prepare_chunk"), "{text}");

    // Metrics: valid text format, the put counted, Raft and store figures present.
    let after = scrape(&http[&coordinator]);
    assert_eq!(put_ok(&after), before + 1.0);
    assert!(sample(&after, "mendfs_rpc_duration_seconds_count", &[("op", "Files/Put")]).unwrap_or(0.0) >= 1.0);
    assert!(sample(&after, "mendfs_raft_term", &[]).unwrap() >= 1.0);
    assert!(sample(&after, "mendfs_raft_commit_index", &[]).unwrap() >= 1.0);
    assert!(sample(&after, "mendfs_raft_applied_index", &[]).unwrap() >= 1.0);
    assert!(sample(&after, "mendfs_chunk_store_bytes", &[]).unwrap() > 0.0);
    assert!(sample(&after, "mendfs_telemetry_store_bytes", &[("store", "spans")]).unwrap() > 0.0);
    let leader = cluster.wait_for_leader(DEADLINE).unwrap();
    let on_leader = wait_for("the leader's detector view in /metrics", DEADLINE, || {
        let scrape = scrape(&http[&leader]);
        Ok(sample(&scrape, "mendfs_node_state", &[("node", "1"), ("state", "up")]).map(|_| scrape))
    })
    .unwrap();
    for node in ["1", "2", "3"] {
        assert_eq!(sample(&on_leader, "mendfs_node_state", &[("node", node), ("state", "up")]), Some(1.0));
        assert!(sample(&on_leader, "mendfs_node_phi", &[("node", node)]).is_some());
    }
    assert_eq!(sample(&on_leader, "mendfs_raft_is_leader", &[]), Some(1.0));
    // Where the leader's writes spent their time: each stage observed, a round trip to each
    // follower among them; a follower fsyncs and applies what it is sent.
    for stage in [
        "mendfs_raft_proposal_seconds_count",
        "mendfs_raft_batch_proposals_count",
        "mendfs_raft_batch_seconds_count",
        "mendfs_raft_log_fsync_seconds_count",
        "mendfs_raft_apply_seconds_count",
    ] {
        assert!(sample(&on_leader, stage, &[]).unwrap_or(0.0) >= 1.0, "{stage} on the leader");
    }
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for follower in &followers {
        let peer = follower.to_string();
        let round_trips = sample(&on_leader, "mendfs_raft_peer_append_seconds_count", &[("peer", &peer)]);
        assert!(round_trips.unwrap_or(0.0) >= 1.0, "AppendEntries round trips to {peer}");
    }
    let on_follower = scrape(&http[&followers[0]]);
    for stage in ["mendfs_raft_log_fsync_seconds_count", "mendfs_raft_apply_seconds_count"] {
        assert!(sample(&on_follower, stage, &[]).unwrap_or(0.0) >= 1.0, "{stage} on a follower");
    }
    let (code, body) = http_get(&http[&coordinator], "/healthz");
    assert_eq!(code, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["node_id"], coordinator);
    assert_eq!(http_get(&http[&coordinator], "/readyz").0, 200);
}

#[test]
fn a_put_failing_on_a_stopped_replica_names_that_node_in_its_failed_span() {
    let (mut cluster, _http) = start_with_http(3, &["--chunk-rpc-timeout-ms", "2000"]);
    wait_until_writable(&cluster);
    let leader = cluster.wait_for_leader(DEADLINE).unwrap();
    // Stop a follower and coordinate on the leader: with 3 nodes and RF 3 no node can stand
    // in, so the put fails; the stopped node is still `up` (not yet suspected) when chosen.
    let stopped = leader % 3 + 1;
    let coordinator = leader;
    let endpoint = cluster.addr(coordinator);
    cluster.pause(stopped).unwrap();

    let trace_id = TraceId::random();
    let local = cluster.root().join("doomed.bin");
    std::fs::write(&local, mendfs_testkit::stamped_bytes(2, 0, CHUNK)).unwrap();
    let output = cluster
        .cli_at(&endpoint)
        .args(["put", local.to_str().unwrap(), "/doomed", "--trace-id", &trace_id.to_string()])
        .output()
        .unwrap();
    assert!(!output.status.success(), "the put should fail with a replica stopped");
    let id = trace_id.to_string();
    let stopped_text = stopped.to_string();
    let trace = trace_json(&cluster, &endpoint, &id, |t| {
        spans(t).iter().any(|s| s["status"] == "error" && s["attributes"]["peer"].as_str() == Some(&stopped_text))
    });
    let failed: Vec<&Value> = spans(&trace).iter().filter(|s| s["status"] == "error").collect();
    let hop = failed.iter().find(|s| s["name"] == "prepare_chunk").expect("a failed prepare hop");
    assert_eq!(hop["attributes"]["peer"].as_str(), Some(stopped_text.as_str()));
    assert_eq!(hop["node"], coordinator);
    assert!(hop["error"].as_str().unwrap().contains(&format!("node {stopped}")), "{hop}");
    let root = roots(&trace);
    assert_eq!(root.len(), 1, "{trace}");
    assert_eq!(root[0]["name"], "Files/Put");
    assert_eq!(root[0]["status"], "error");
    // The stopped node cannot answer for its spans: the output names it.
    let unreachable: Vec<u64> =
        trace["unreachable"].as_array().unwrap().iter().filter_map(|u| u["node"].as_u64()).collect();
    assert_eq!(unreachable, vec![stopped]);
    // The text view marks the failure and names the node.
    let text = cluster.cli_at(&endpoint).args(["trace", &id, "--timeout", "5"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("→ {stopped}")) && text.contains("failed"), "{text}");
    // The coordinator's log lines of that trace are there to read.
    let logs = cluster
        .cli_at(&endpoint)
        .args(["logs", "--trace", &id, "--node", &coordinator.to_string(), "--json", "--timeout", "5"])
        .output()
        .unwrap();
    let logs = String::from_utf8_lossy(&logs.stdout);
    let lines: Vec<Value> = logs.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!lines.is_empty(), "no log lines for the trace");
    assert!(lines.iter().all(|l| l["trace_id"] == id.as_str() && l["node"] == coordinator));
    assert!(lines.iter().any(|l| l["level"] == "WARN"), "{logs}");
    cluster.resume(stopped).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_storage_stays_within_its_byte_bound_under_10000_requests() {
    const BOUND: u64 = 256 << 10;
    let bound = BOUND.to_string();
    let (cluster, _http) = tokio::task::block_in_place(|| {
        start_with_http(1, &["--span-store-bytes", &bound, "--log-store-bytes", &bound, "--replication-factor", "1"])
    });
    let spans_dir = cluster.nodes[&1].data_dir.join("telemetry").join("spans");
    let dir_bytes = |dir: &Path| -> u64 {
        std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
    };
    let first = TraceId::random();
    let client = client_at(&cluster, cluster.endpoint_list(), Some(TraceContext::new_root(first)));
    client.set(b"first", b"traced", None, None).await.unwrap();
    let client = client_at(&cluster, cluster.endpoint_list(), None);

    // 10,000 requests in 8 streams, each its own trace; bounded in count and time.
    let started = Instant::now();
    let peak = Arc::new(Mutex::new(0u64));
    let mut tasks = Vec::new();
    for stream in 0..8u32 {
        let client = client.clone();
        let (peak, spans_dir) = (peak.clone(), spans_dir.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..1250u32 {
                if i % 2 == 0 {
                    client.set(format!("k{stream}-{}", i % 16).as_bytes(), b"v", None, None).await.unwrap();
                } else {
                    client.get(format!("k{stream}-{}", i % 16).as_bytes()).await.unwrap();
                }
                if i % 50 == 0 {
                    let bytes = dir_bytes(&spans_dir);
                    let mut peak = peak.lock().unwrap();
                    *peak = (*peak).max(bytes);
                }
                assert!(started.elapsed() < DEADLINE, "10,000 requests took too long");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let last = TraceId::random();
    let traced = client_at(&cluster, cluster.endpoint_list(), Some(TraceContext::new_root(last)));
    traced.get(b"first").await.unwrap();

    let final_bytes = dir_bytes(&spans_dir);
    let peak = (*peak.lock().unwrap()).max(final_bytes);
    assert!(peak <= BOUND, "the span store reached {peak} bytes, over its bound of {BOUND}");
    // 10,000 spans of ~300 bytes is ~10 times the bound: the store did rotate, and the
    // newest trace is kept while the oldest is gone.
    assert!(final_bytes > BOUND / 2, "the store holds only {final_bytes} bytes");
    let found = |id: TraceId| {
        let endpoint = cluster.endpoints();
        tokio::task::block_in_place(|| {
            let output = cluster.cli_at(&endpoint).args(["trace", &id.to_string(), "--json"]).output().unwrap();
            let trace: Value = serde_json::from_slice(&output.stdout).unwrap();
            trace["spans"].as_array().unwrap().len()
        })
    };
    assert_eq!(found(last), 1, "the newest trace is kept");
    assert_eq!(found(first), 0, "the oldest trace was dropped");
    let logs_dir = cluster.nodes[&1].data_dir.join("telemetry").join("logs");
    assert!(dir_bytes(&logs_dir) <= BOUND);
}

/// A received span: its trace id bytes and its name.
type ReceivedSpan = (Vec<u8>, String);

/// A minimal OTLP collector: keeps what it is sent, except that it answers UNAVAILABLE, once,
/// to the first batch carrying spans of `refuse_once` (a collector restarting, say).
#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    refuse_once: Arc<Mutex<Option<Vec<u8>>>>,
    refused: Arc<Mutex<u32>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        let request = request.into_inner();
        let carries = |trace: &[u8]| {
            request
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
                .any(|s| s.trace_id == trace)
        };
        let mut refuse_once = self.refuse_once.lock().unwrap();
        if refuse_once.as_deref().is_some_and(carries) {
            *refuse_once = None;
            *self.refused.lock().unwrap() += 1;
            return Err(tonic::Status::unavailable("the collector is restarting"));
        }
        drop(refuse_once);
        let mut spans = self.spans.lock().unwrap();
        for resource in request.resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (s.trace_id, s.name)));
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_even_when_it_first_refuses_them() {
    let id = TraceId::random();
    let wanted = id.as_u128().to_be_bytes().to_vec();
    let collector = Collector { refuse_once: Arc::new(Mutex::new(Some(wanted.clone()))), ..Collector::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let service = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
        collector.clone(),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://{collector_addr}");
    let (cluster, _http) = tokio::task::block_in_place(|| start_with_http(1, &["--otlp-endpoint", &endpoint]));
    let client = client_at(&cluster, cluster.endpoint_list(), Some(TraceContext::new_root(id)));
    client.set(b"exported", b"yes", None, None).await.unwrap();
    let started = Instant::now();
    loop {
        let names: Vec<String> = collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(trace, _)| *trace == wanted)
            .map(|(_, n)| n.clone())
            .collect();
        if names.iter().any(|n| n == "Kv/Set") {
            assert_eq!(*collector.refused.lock().unwrap(), 1, "the batch was refused once, then sent again");
            break;
        }
        assert!(started.elapsed() < DEADLINE, "the collector never received the trace; it has {names:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Calls with a wrong secret, from anyone who reaches the port, are refused and counted, but
/// neither traced nor logged one line each: they must not push real records out of the node's
/// bounded stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_are_counted_but_neither_traced_nor_logged_one_by_one() {
    const REFUSED: u64 = 2_000;
    let (cluster, http) = tokio::task::block_in_place(|| start_with_http(1, &["--replication-factor", "1"]));
    let telemetry = cluster.nodes[&1].data_dir.join("telemetry");
    let dir_bytes = |dir: &Path| -> u64 {
        std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
    };
    let good = client_at(&cluster, cluster.endpoint_list(), None);
    wait_for_async(|| async { good.set(b"k", b"v", None, None).await.is_ok() }).await;
    let (spans_before, logs_before) = (dir_bytes(&telemetry.join("spans")), dir_bytes(&telemetry.join("logs")));

    let mut config = ClientConfig::new(cluster.endpoint_list());
    config.secret = Some("not the cluster secret".into());
    config.deadline = Duration::from_secs(5);
    let stranger = Client::new(config).unwrap();
    let started = Instant::now();
    for _ in 0..REFUSED {
        let refused = stranger.get(b"k").await.expect_err("a wrong secret is refused");
        assert!(refused.to_string().contains("wrong cluster secret"), "{refused}");
        assert!(started.elapsed() < DEADLINE, "{REFUSED} refusals took too long");
    }

    let counted = tokio::task::block_in_place(|| {
        sample(&scrape(&http[&1]), "mendfs_rpc_requests_total", &[("op", "Kv/Get"), ("outcome", "Unauthenticated")])
    });
    assert!(counted.unwrap_or(0.0) >= REFUSED as f64, "every refusal is counted: {counted:?}");
    // A span or a log line is a few hundred bytes: one each per refusal would be hundreds of KiB.
    let (spans_after, logs_after) = (dir_bytes(&telemetry.join("spans")), dir_bytes(&telemetry.join("logs")));
    assert!(spans_after - spans_before < 32 << 10, "spans grew {} bytes", spans_after - spans_before);
    assert!(logs_after - logs_before < 32 << 10, "logs grew {} bytes", logs_after - logs_before);
    let log = cluster.log(1);
    let lines = log.lines().filter(|line| line.contains("refused a call: wrong cluster secret")).count();
    assert!((1..=10).contains(&lines), "{lines} refusal lines for {REFUSED} refusals");
}

async fn wait_for_async<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < DEADLINE, "timed out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
