//! The node's HTTP side (`--http`): Prometheus `/metrics`, `/healthz` (the process serves),
//! `/readyz` (it also sees a Raft leader), and the web dashboard at `/` with its `/api/`
//! (see `dashboard`). Every value is read from the live state at request time.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use mendfs_data::chunk_service::{Counters, LocalChunks};
use mendfs_data::cluster_service::ClusterApi;
use mendfs_data::healer::Healer;
use mendfs_heal::detector::Liveness;
use mendfs_meta::auth::Authenticator;
use mendfs_meta::MetaNode;
use mendfs_telemetry::metrics::{Labels, RequestMetrics, Scrape, CONTENT_TYPE};
use mendfs_worker::{Background, WorkerState};

use crate::listener::Connection;
use crate::telemetry::Telemetry;
use crate::NodeError;

pub(crate) struct HttpState {
    pub node: MetaNode,
    pub healer: Healer,
    pub storage: Option<Arc<LocalChunks>>,
    /// For the read budget's gauges.
    pub coordinator: mendfs_data::coordinator::Coordinator,
    pub requests: Arc<RequestMetrics>,
    pub telemetry: Telemetry,
    pub background: Background,
    pub metrics_token: Option<String>,
    /// Storage nodes the cluster needs registered before it is ready.
    pub replication_factor: usize,
    /// Decides the dashboard API's callers as gRPC decides `Cluster/Status`.
    pub authenticator: Authenticator,
    /// `cluster status`, for the dashboard.
    pub cluster: ClusterApi,
    /// This node's HTTP address as others reach it.
    pub http_addr: String,
    /// The last `/api/status` answer and when it was built, shared by every open dashboard.
    pub status_cache: crate::dashboard::StatusCache,
    /// Bounds the dashboard logins served at once (`dashboard::login`).
    pub logins: tokio::sync::Semaphore,
}

/// The admitted connections of the HTTP listener (see `listener`), as axum takes them.
struct Connections {
    incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<Connection>>,
    addr: Option<SocketAddr>,
}

impl axum::serve::Listener for Connections {
    type Io = Connection;
    type Addr = Option<SocketAddr>;

    async fn accept(&mut self) -> (Connection, Option<SocketAddr>) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(connection)) => {
                    let remote = connection.remote();
                    return (connection, remote);
                }
                Some(Err(_)) => continue,
                // The node is stopping: the graceful shutdown ends the server.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        Ok(self.addr)
    }
}

/// Serves until the node stops. The listener is bound by the caller, so a taken port fails
/// the start with a clear message.
pub(crate) async fn serve(
    incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<Connection>>,
    addr: Option<SocketAddr>,
    state: Arc<HttpState>,
    stopping: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = crate::dashboard::routes(state.clone())
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Err(e) = axum::serve(Connections { incoming, addr }, app).with_graceful_shutdown(stopping).await {
        tracing::error!("HTTP server: {e}");
    }
}

pub(crate) async fn bind(flag: &str, addr: &str) -> Result<tokio::net::TcpListener, NodeError> {
    let addr: SocketAddr =
        addr.parse().map_err(|_| NodeError::Config(crate::ConfigError(format!("{flag} {addr:?} is not IP:PORT"))))?;
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| NodeError::Io { context: format!("cannot listen on {flag} {addr}"), source: e })
}

/// The HTTP address to tell others: the bound one, or, when bound to every interface
/// (`0.0.0.0:8080`), the host others reach the node's gRPC at with the HTTP port.
pub(crate) fn advertised_http_addr(bound: SocketAddr, advertise_addr: &str) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    match advertise_addr.rsplit_once(':') {
        Some((host, _)) if !host.is_empty() => format!("{host}:{}", bound.port()),
        _ => bound.to_string(),
    }
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs.iter().map(|(key, value)| (key.to_string(), value.clone())).collect()
}

fn scrape(state: &HttpState) -> Scrape {
    let mut scrape = Scrape::new();
    let node_id = state.node.id();
    scrape.gauge_family(
        "mendfs_node_info",
        "This node: its id and version (value 1)",
        [(labels(&[("node_id", node_id.to_string()), ("version", env!("CARGO_PKG_VERSION").to_string())]), 1.0)],
    );

    let raft = state.node.raft_status();
    scrape.gauge("mendfs_raft_term", "Current Raft term", raft.term as f64);
    scrape.gauge(
        "mendfs_raft_last_log_index",
        "Index of the last entry in this node's Raft log",
        raft.last_log_index as f64,
    );
    scrape.gauge(
        "mendfs_raft_commit_index",
        "Highest Raft index this node knows is committed",
        raft.committed_index as f64,
    );
    scrape.gauge(
        "mendfs_raft_applied_index",
        "Highest Raft index applied to this node's state machine",
        raft.applied_index as f64,
    );
    scrape.gauge(
        "mendfs_raft_is_leader",
        "1 if this node is the Raft leader",
        if raft.leader == Some(node_id) { 1.0 } else { 0.0 },
    );
    scrape.gauge("mendfs_raft_leader_id", "The leader this node knows (0: none)", raft.leader.unwrap_or(0) as f64);
    scrape.counter("mendfs_raft_leader_changes", "Times this node saw a new leader", state.node.leader_changes());
    state.node.write_metrics().export(&mut scrape);
    if let Ok((usage, _)) = state.node.kv_usage() {
        scrape.gauge("mendfs_kv_key_bytes", "Bytes of live coordination keys and values", usage.key_bytes as f64);
        scrape.gauge("mendfs_kv_history_bytes", "Bytes of key history kept for watchers", usage.history_bytes as f64);
        scrape.gauge(
            "mendfs_kv_quota_bytes",
            "The coordination keyspace's byte quota (keys and history)",
            usage.quota_bytes as f64,
        );
        scrape.gauge(
            "mendfs_kv_quota_alarm",
            "1 while writes are refused for the kv quota",
            if usage.alarm { 1.0 } else { 0.0 },
        );
        scrape.gauge("mendfs_kv_sessions", "Open coordination sessions", usage.sessions as f64);
        scrape.gauge("mendfs_kv_max_sessions", "The most sessions that may be open", usage.max_sessions as f64);
    }
    let workers = state.background.workers();
    scrape.counter_family(
        "mendfs_worker_failures",
        "Failed (or panicked) steps of each background worker",
        workers.iter().map(|w| (labels(&[("worker", w.name.clone())]), w.failures)),
    );
    scrape.gauge_family(
        "mendfs_worker_running",
        "1 for each background worker that has not stopped or finished",
        workers.iter().map(|w| {
            let running = !matches!(w.state, WorkerState::Done | WorkerState::Stopped);
            (labels(&[("worker", w.name.clone())]), if running { 1.0 } else { 0.0 })
        }),
    );

    scrape.gauge(
        "mendfs_read_buffer_pool_bytes",
        "Idle chunk-sized buffers this node keeps for its next local reads (at most a quarter of the read budget)",
        state.coordinator.read_buffer_pool_bytes() as f64,
    );
    let read_budget = state.coordinator.read_budget_usage();
    scrape.gauge(
        "mendfs_read_budget_held_bytes",
        "Chunk bytes this node holds for readers as their coordinator (read, or on their way to the client)",
        read_budget.held_bytes as f64,
    );
    scrape.gauge(
        "mendfs_read_budget_limit_bytes",
        "The readers' budget (--max-inflight-bytes): beyond it, only the chunk each reader needs next is read",
        read_budget.limit_bytes as f64,
    );
    scrape.gauge(
        "mendfs_read_budget_cap_bytes",
        "The most chunk bytes readers may hold: at it, a reader waits for room (30 s, then unavailable)",
        read_budget.cap_bytes as f64,
    );

    if let Some(storage) = &state.storage {
        let stats = storage.store.stats();
        scrape.gauge("mendfs_chunk_store_chunks", "Chunk files held by this node", stats.chunk_count as f64);
        scrape.gauge("mendfs_chunk_store_bytes", "Bytes of chunk files held by this node", stats.chunk_bytes as f64);
        if let Some(capacity) = storage.capacity_bytes {
            scrape.gauge("mendfs_chunk_store_capacity_bytes", "The operator's cap on chunk bytes", capacity as f64);
        }
        let counters = &storage.counters;
        for (name, help, counter) in [
            ("mendfs_chunk_store_io_errors", "Chunk operations that failed with an I/O error", &counters.io_errors),
            (
                "mendfs_chunk_store_checksum_errors",
                "Chunk copies found corrupt (read or scrub)",
                &counters.checksum_errors,
            ),
            ("mendfs_scrub_passes", "Completed scrub passes over this node's chunks", &counters.scrub_passes),
            ("mendfs_scrub_checked_chunks", "Chunks verified by the scrubber", &counters.scrub_checked_chunks),
            ("mendfs_scrub_checked_bytes", "Bytes verified by the scrubber", &counters.scrub_checked_bytes),
            ("mendfs_repair_copied_chunks", "Chunk copies this node pulled for repair", &counters.repair_copied_chunks),
            ("mendfs_repair_copied_bytes", "Bytes this node pulled for repair", &counters.repair_copied_bytes),
            ("mendfs_repair_rebuilt_shards", "Erasure-coded shards this node rebuilt", &counters.repair_rebuilt_shards),
            ("mendfs_repair_rebuilt_bytes", "Bytes of the shards this node rebuilt", &counters.repair_rebuilt_bytes),
            (
                "mendfs_repair_rebuild_read_bytes",
                "Shard bytes this node read from others to rebuild shards",
                &counters.repair_rebuild_read_bytes,
            ),
        ] {
            scrape.counter(name, help, Counters::get(counter));
        }
    }

    // The cluster view exists on the leader only (its failure detector and repair scans).
    if let Some(snapshot) = state.healer.health_view().ok().flatten() {
        scrape.gauge_family(
            "mendfs_node_phi",
            "Phi of each node's heartbeats, from the leader's failure detector",
            snapshot.nodes.iter().map(|n| (labels(&[("node", n.node_id.to_string())]), n.phi)),
        );
        scrape.gauge_family(
            "mendfs_node_heartbeat_age_seconds",
            "Time since the leader last heard each node",
            snapshot.nodes.iter().filter_map(|n| {
                n.heartbeat_age_ms.map(|age| (labels(&[("node", n.node_id.to_string())]), age as f64 / 1000.0))
            }),
        );
        let states = [Liveness::Up, Liveness::Suspect, Liveness::Down, Liveness::Degraded];
        scrape.gauge_family(
            "mendfs_node_state",
            "1 for each node's current state (up, suspect, down, degraded), 0 for the others",
            snapshot.nodes.iter().flat_map(|n| {
                states.iter().map(move |s| {
                    (
                        labels(&[("node", n.node_id.to_string()), ("state", s.as_str().to_string())]),
                        if n.liveness == *s { 1.0 } else { 0.0 },
                    )
                })
            }),
        );
        let scan = &snapshot.scan;
        scrape.gauge("mendfs_cluster_chunks", "Chunks in the chunk map (latest scan)", scan.chunks as f64);
        scrape.gauge(
            "mendfs_cluster_under_replicated_chunks",
            "Chunks with fewer live copies than RF",
            scan.under_replicated as f64,
        );
        scrape.gauge(
            "mendfs_cluster_over_replicated_chunks",
            "Chunks with more copies than RF",
            scan.over_replicated as f64,
        );
        scrape.gauge("mendfs_cluster_lost_chunks", "Chunks with no readable copy", scan.lost as f64);
        scrape.gauge_family(
            "mendfs_cluster_stripes",
            "Erasure-coded chunks by live shards out of K + M",
            scan.stripes_by_live.iter().map(|(&(live, total), &count)| {
                (labels(&[("live", live.to_string()), ("total", total.to_string())]), count as f64)
            }),
        );
        scrape.gauge(
            "mendfs_cluster_unplaceable_copies",
            "Copies repair cannot place (too few eligible nodes)",
            scan.unplaceable as f64,
        );
        scrape.gauge(
            "mendfs_repair_bytes_per_second",
            "Repair copy rate over the last seconds",
            snapshot.repair_bytes_per_sec,
        );
        if let Some(job) = &snapshot.repair_job {
            scrape.gauge(
                "mendfs_repair_job_running",
                "1 while a repair job has copies left",
                if job.finished_ms.is_none() { 1.0 } else { 0.0 },
            );
            scrape.gauge(
                "mendfs_repair_job_done_bytes",
                "Bytes the current (or last) repair job copied",
                job.done_bytes as f64,
            );
            scrape.gauge(
                "mendfs_repair_job_total_bytes",
                "Bytes the current (or last) repair job has to copy in all",
                job.total_bytes as f64,
            );
            scrape.gauge(
                "mendfs_repair_job_done_copies",
                "Copies the current (or last) repair job made",
                job.done_copies as f64,
            );
            scrape.gauge(
                "mendfs_repair_job_total_copies",
                "Copies the current (or last) repair job has to make in all",
                job.total_copies as f64,
            );
        }
    }

    scrape.gauge_family(
        "mendfs_telemetry_store_bytes",
        "Bytes on disk of this node's span and log stores",
        [
            (labels(&[("store", "spans".into())]), state.telemetry.spans.disk_bytes() as f64),
            (labels(&[("store", "logs".into())]), state.telemetry.logs.disk_bytes() as f64),
        ],
    );
    scrape.counter(
        "mendfs_telemetry_store_failures",
        "Spans and log lines that could not be stored",
        state.telemetry.sinks.store_failures.load(Ordering::Relaxed),
    );
    if let Some(otlp) = &state.telemetry.otlp {
        scrape.counter(
            "mendfs_otlp_exported_spans",
            "Spans sent to the OTLP collector",
            otlp.counters.exported.load(Ordering::Relaxed),
        );
        scrape.counter(
            "mendfs_otlp_dropped_spans",
            "Spans not exported (queue full or collector failed)",
            otlp.counters.dropped.load(Ordering::Relaxed),
        );
    }
    scrape
}

/// Whether the request carries `Authorization: Bearer <token>`, compared in constant time.
fn bearer_matches(headers: &axum::http::HeaderMap, token: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    given.len() == token.len() && given.iter().zip(token.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn metrics(State(state): State<Arc<HttpState>>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    if let Some(token) = &state.metrics_token {
        if !bearer_matches(&headers, token) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "/metrics needs Authorization: Bearer <the node's metrics token>\n".to_string(),
            );
        }
    }
    match scrape(&state).finish(&state.requests) {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

fn health_json(state: &HttpState) -> serde_json::Value {
    let raft = state.node.raft_status();
    serde_json::json!({
        "node_id": state.node.id(),
        "raft": match &raft.stopped { None => "running".to_string(), Some(e) => format!("stopped: {e}") },
        "leader": raft.leader,
        "term": raft.term,
        "applied_index": raft.applied_index,
    })
}

/// 200 while the process serves and its Raft core runs: restart it otherwise.
async fn healthz(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    let running = state.node.raft_status().stopped.is_none();
    let code = if running { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(health_json(&state)))
}

/// 200 when the node also knows a leader and the cluster has registered at least as many
/// storage nodes as the replication factor: a cluster that just started is ready once it can
/// take a write. Registered, not up: a node that dies later keeps the others ready, since
/// reads still work and writes wait for placement or fail with the reason.
async fn readyz(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    let raft = state.node.raft_status();
    let storage_nodes = state.node.storage_nodes().map_or(0, |nodes| nodes.len());
    let ready = raft.stopped.is_none() && raft.leader.is_some() && storage_nodes >= state.replication_factor;
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut body = health_json(&state);
    body["storage_nodes"] = storage_nodes.into();
    body["replication_factor"] = state.replication_factor.into();
    (code, axum::Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_bound_to_every_interface_advertises_its_grpc_host_with_the_http_port() {
        let bound: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        assert_eq!(advertised_http_addr(bound, "10.0.0.1:7000"), "127.0.0.1:9000");
        let any: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        assert_eq!(advertised_http_addr(any, "mendfs-1.example.net:7000"), "mendfs-1.example.net:9000");
        assert_eq!(advertised_http_addr(any, "no-port"), "0.0.0.0:9000", "nothing better to say");
    }
}
