//! The dashboard's JSON endpoints. Every answer is bounded (spans, log lines, requests), bad
//! input is a 400 that says what is wrong, and nothing a caller sends can panic a handler.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use mendfs_proto::v1 as pb;
use mendfs_telemetry::context::TraceId;
use mendfs_telemetry::record::{Level, LogRecord, SpanRecord};
use mendfs_telemetry::render::{render_json, Unreachable};
use mendfs_telemetry::store::LogQuery;
use mendfs_types::NodeId;

use super::{api_error, api_json, refusal};
use crate::http::HttpState;

/// What building the status may take; a member that does not answer is shown unreachable.
const STATUS_TIME: Duration = Duration::from_secs(3);
/// How long a member has to send its spans or log lines.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(3);
/// Most spans one trace answer holds (a trace is a request's hops: hundreds at most).
pub(crate) const TRACE_SPANS_MAX: usize = 5_000;
/// Most log lines one answer holds, and how many when the page does not say.
pub(crate) const LOG_LINES_MAX: usize = 1_000;
const LOG_LINES_DEFAULT: usize = 200;
/// Longest text echoed back in an error message.
const ECHO_CHARS_MAX: usize = 64;
/// The biggest message a member's answer may be (its spans or lines as JSON).
const MEMBER_REPLY_BYTES_MAX: usize = 16 << 20;

fn echo(text: &str) -> String {
    let mut shown: String = text.chars().take(ECHO_CHARS_MAX).collect();
    if text.chars().count() > ECHO_CHARS_MAX {
        shown.push('…');
    }
    shown
}

pub(crate) fn parse_trace_id(text: &str) -> Result<TraceId, String> {
    if text.len() > 32 {
        return Err(format!("trace id {:?} is not 32 hex digits", echo(text)));
    }
    text.trim().parse::<TraceId>().map_err(|e| e.to_string())
}

pub(super) async fn status(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&state, &headers).await {
        return refused;
    }
    let started = Instant::now();
    if let Some(status) = state.status_cache.fresh(started) {
        return api_json(StatusCode::OK, status);
    }
    let reply = state.cluster.status_reply(false, Some(started + STATUS_TIME)).await;
    let status = status_json(&reply, state.node.id(), &state.http_addr);
    state.status_cache.keep(started, status.clone());
    api_json(StatusCode::OK, status)
}

fn health_json(health: &pb::NodeHealth) -> serde_json::Value {
    serde_json::json!({
        "disk_used_bytes": health.disk_used_bytes,
        "disk_capacity_bytes": health.disk_capacity_bytes,
        "cpu_percent": health.cpu_percent,
        "memory_used_bytes": health.memory_used_bytes,
        "memory_total_bytes": health.memory_total_bytes,
        "rss_bytes": health.rss_bytes,
        "chunk_count": health.chunk_count,
        "chunk_bytes": health.chunk_bytes,
        "io_errors": health.io_errors,
        "checksum_errors": health.checksum_errors,
    })
}

/// The status reply as the page reads it, with the node that answered.
pub(crate) fn status_json(reply: &pb::StatusReply, served_by: NodeId, served_by_http: &str) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = reply
        .nodes
        .iter()
        .map(|n| {
            serde_json::json!({
                "id": n.id,
                "addr": n.addr,
                "http_addr": n.http_addr,
                "role": n.role,
                "voter": n.voter,
                "state": n.state,
                "state_reason": n.state_reason,
                "phi": n.phi,
                "heartbeat_age_ms": n.heartbeat_age_ms,
                "storage": n.storage,
                "draining": n.draining,
                "chunks_listed": n.chunks_listed,
                "lag": n.lag,
                "error": n.error,
                "health": n.health.as_ref().map(health_json),
            })
        })
        .collect();
    let repair_json = |r: &pb::RepairStatus| {
        serde_json::json!({
            "job_id": r.job_id,
            "reason": r.reason,
            "started_unix_ms": r.started_unix_ms,
            "finished_unix_ms": r.finished_unix_ms,
            "done_bytes": r.done_bytes,
            "total_bytes": r.total_bytes,
            "done_copies": r.done_copies,
            "total_copies": r.total_copies,
            "bytes_per_sec": r.bytes_per_sec,
            "eta_secs": r.eta_secs,
            "throttle_bytes_per_sec": r.throttle_bytes_per_sec,
        })
    };
    let repair = reply.repair.as_ref().map(repair_json);
    let recent_repairs: Vec<serde_json::Value> = reply.recent_repairs.iter().map(repair_json).collect();
    let events: Vec<serde_json::Value> = reply
        .events
        .iter()
        .map(|e| {
            serde_json::json!({
                "unix_ms": e.unix_ms, "kind": e.kind, "node": e.node, "state": e.state, "detail": e.detail,
            })
        })
        .collect();
    serde_json::json!({
        "served_by": { "node": served_by, "http_addr": served_by_http },
        "cluster_id": reply.cluster_id,
        "leader": reply.leader,
        "term": reply.term,
        "nodes": nodes,
        "chunks": reply.chunks,
        "under_replicated_chunks": reply.under_replicated_chunks,
        "lost_chunks": reply.lost_chunks,
        "unplaceable_copies": reply.unplaceable_copies,
        "over_replicated_chunks": reply.over_replicated_chunks,
        "stripes": reply.stripes.iter().map(|s| serde_json::json!({
            "live_shards": s.live_shards, "total_shards": s.total_shards, "stripes": s.stripes,
        })).collect::<Vec<_>>(),
        "repair": repair,
        "recent_repairs": recent_repairs,
        "health_error": reply.health_error,
        "events": events,
    })
}

type TelemetryClient = pb::telemetry_client::TelemetryClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, mendfs_meta::PeerInterceptor>,
>;

/// Asks one member for JSON records (spans or log lines) over the peers' channel, as `mendfs
/// trace` and `mendfs logs` ask each node.
async fn ask_member<Request, Call, Fut>(
    state: &HttpState,
    addr: &str,
    request: Request,
    call: Call,
) -> Result<Vec<String>, String>
where
    Call: FnOnce(TelemetryClient, tonic::Request<Request>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<String>, tonic::Status>>,
{
    let peers = state.node.peers();
    let client = pb::telemetry_client::TelemetryClient::with_interceptor(peers.channel(addr)?, peers.interceptor())
        .max_decoding_message_size(MEMBER_REPLY_BYTES_MAX);
    let mut request = tonic::Request::new(request);
    request.set_timeout(MEMBER_TIMEOUT);
    match tokio::time::timeout(MEMBER_TIMEOUT, call(client, request)).await {
        Err(_) => Err(format!("no answer within {MEMBER_TIMEOUT:?}")),
        Ok(Err(status)) => Err(status.message().to_string()),
        Ok(Ok(records)) => Ok(records),
    }
}

fn parse_records<T: serde::de::DeserializeOwned>(lines: &[String]) -> Vec<T> {
    // A line this node cannot read (a newer node's format) is skipped, not fatal.
    lines.iter().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

pub(super) async fn trace(State(state): State<Arc<HttpState>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&state, &headers).await {
        return refused;
    }
    let trace_id = match parse_trace_id(&id) {
        Ok(trace_id) => trace_id.to_string(),
        Err(e) => return api_error(StatusCode::BAD_REQUEST, e),
    };
    let members = state.node.raft_status().members;
    let own_id = state.node.id();
    let asks = members.iter().map(|(id, addr)| {
        let (state, trace_id) = (&state, trace_id.clone());
        async move {
            let answer = if *id == own_id {
                let spans = state.telemetry.spans.clone();
                match tokio::task::spawn_blocking(move || spans.trace(&trace_id)).await {
                    Ok(Ok(found)) => Ok(found),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(format!("span query: {e}")),
                }
            } else {
                ask_member(state, addr, pb::TraceSpansRequest { trace_id }, |mut client, request| async move {
                    client.trace_spans(request).await.map(|reply| reply.into_inner().spans_json)
                })
                .await
                .map(|lines| parse_records::<SpanRecord>(&lines))
            };
            (*id, answer)
        }
    });
    let mut spans = Vec::new();
    let mut unreachable = Vec::new();
    for (node, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(found) => spans.extend(found),
            Err(error) => unreachable.push(Unreachable { node, error }),
        }
    }
    let truncated = spans.len() > TRACE_SPANS_MAX;
    spans.sort_by_key(|span| span.start_unix_us);
    spans.truncate(TRACE_SPANS_MAX);
    let mut body = render_json(&trace_id, &spans, &unreachable);
    body["truncated"] = truncated.into();
    let code = if spans.is_empty() { StatusCode::NOT_FOUND } else { StatusCode::OK };
    if spans.is_empty() {
        body["error"] = format!("no node has spans of trace {trace_id} (too old, or never recorded)").into();
    }
    api_json(code, body)
}

/// What the log view asks for: `node`, `level`, `trace` and `limit`, from the query string.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LogFilter {
    pub node: Option<NodeId>,
    pub min_level: Option<Level>,
    pub trace_id: Option<String>,
    pub limit: usize,
}

pub(crate) fn parse_log_filter(query: Option<&str>) -> Result<LogFilter, String> {
    let mut filter = LogFilter { node: None, min_level: None, trace_id: None, limit: LOG_LINES_DEFAULT };
    for pair in query.unwrap_or_default().split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if value.is_empty() {
            continue; // an empty box in the form: no filter
        }
        match key {
            "node" => {
                filter.node =
                    Some(value.parse().map_err(|_| format!("node {:?} is not a node id (a number)", echo(value)))?)
            }
            "level" => filter.min_level = Some(value.parse::<Level>().map_err(|e| echo(&e))?),
            "trace" => filter.trace_id = Some(parse_trace_id(value)?.to_string()),
            "limit" => {
                let limit: usize = value.parse().map_err(|_| format!("limit {:?} is not a number", echo(value)))?;
                filter.limit = limit.clamp(1, LOG_LINES_MAX);
            }
            other => return Err(format!("unknown filter {:?}: use node, level, trace, limit", echo(other))),
        }
    }
    Ok(filter)
}

pub(super) async fn logs(
    State(state): State<Arc<HttpState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = refusal(&state, &headers).await {
        return refused;
    }
    let filter = match parse_log_filter(query.as_deref()) {
        Ok(filter) => filter,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, e),
    };
    let mut members = state.node.raft_status().members;
    if let Some(only) = filter.node {
        members.retain(|id, _| *id == only);
        if members.is_empty() {
            return api_error(StatusCode::BAD_REQUEST, format!("node {only} is not a member of the cluster"));
        }
    }
    let own_id = state.node.id();
    let query = LogQuery {
        trace_id: filter.trace_id.clone(),
        since_unix_us: None,
        min_level: filter.min_level,
        limit: filter.limit,
    };
    let asks = members.iter().map(|(id, addr)| {
        let (state, query) = (&state, query.clone());
        async move {
            let answer = if *id == own_id {
                let logs = state.telemetry.logs.clone();
                match tokio::task::spawn_blocking(move || logs.query(&query)).await {
                    Ok(Ok(found)) => Ok(found),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(format!("log query: {e}")),
                }
            } else {
                let request = pb::QueryLogsRequest {
                    trace_id: query.trace_id.clone().unwrap_or_default(),
                    since_unix_us: 0,
                    min_level: query.min_level.map(|level| level.as_str().to_string()).unwrap_or_default(),
                    limit: query.limit as u32,
                };
                ask_member(state, addr, request, |mut client, request| async move {
                    client.query_logs(request).await.map(|reply| reply.into_inner().lines_json)
                })
                .await
                .map(|lines| parse_records::<LogRecord>(&lines))
            };
            (*id, answer)
        }
    });
    let mut lines = Vec::new();
    let mut unreachable = Vec::new();
    for (node, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(found) => lines.extend(found),
            Err(error) => unreachable.push(serde_json::json!({ "node": node, "error": error })),
        }
    }
    // One timeline across nodes (their clocks as they are), the newest `limit` kept.
    lines.sort_by_key(|line| (line.time_unix_us, line.node));
    let skip = lines.len().saturating_sub(filter.limit);
    let lines = &lines[skip..];
    api_json(StatusCode::OK, serde_json::json!({ "lines": lines, "unreachable": unreachable }))
}

/// This node's recent failed and slow client requests (the page asks every node).
pub(super) async fn requests(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&state, &headers).await {
        return refused;
    }
    api_json(
        StatusCode::OK,
        serde_json::json!({
            "node": state.node.id(),
            "slow_request_ms": super::recent::SLOW_REQUEST_US / 1_000,
            "requests": state.telemetry.recent_requests.list(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters_are_read_and_bounded() {
        let all = parse_log_filter(None).unwrap();
        assert_eq!(all, LogFilter { node: None, min_level: None, trace_id: None, limit: LOG_LINES_DEFAULT });
        let some =
            parse_log_filter(Some("node=3&level=warn&trace=4BF92F3577B34DA6A3CE929D0E0E4736&limit=99999")).unwrap();
        assert_eq!(some.node, Some(3));
        assert_eq!(some.min_level, Some(Level::Warn));
        assert_eq!(some.trace_id.as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(some.limit, LOG_LINES_MAX, "clamped");
        // The form's empty boxes mean no filter.
        assert_eq!(parse_log_filter(Some("node=&level=&trace=")).unwrap().node, None);
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        let long = "x".repeat(10_000);
        for (query, says) in [
            ("node=two", "not a node id"),
            ("level=loud", "log level"),
            ("trace=123", "32 hex digits"),
            ("limit=-1", "not a number"),
            ("colour=red", "unknown filter"),
        ] {
            let e = parse_log_filter(Some(query)).unwrap_err();
            assert!(e.contains(says), "{query}: {e}");
        }
        let e = parse_log_filter(Some(&format!("trace={long}"))).unwrap_err();
        assert!(e.len() < 200, "a long input is not echoed whole: {e}");
    }

    #[test]
    fn a_bad_trace_id_is_refused_with_the_reason() {
        assert!(parse_trace_id("4bf92f3577b34da6a3ce929d0e0e4736").is_ok());
        assert!(parse_trace_id("00000000000000000000000000000000").unwrap_err().contains("all-zero"));
        assert!(parse_trace_id("zz").unwrap_err().contains("32 hex digits"));
        assert!(parse_trace_id(&"a".repeat(5_000)).unwrap_err().contains('…'));
    }

    #[test]
    fn the_status_json_names_every_node_with_its_http_address_and_the_events() {
        let reply = pb::StatusReply {
            leader: Some(2),
            term: 7,
            nodes: vec![
                pb::NodeStatus { id: 1, http_addr: "127.0.0.1:9001".into(), state: "up".into(), ..Default::default() },
                pb::NodeStatus {
                    id: 2,
                    role: "leader".into(),
                    state: "suspect".into(),
                    phi: 9.5,
                    ..Default::default()
                },
            ],
            events: vec![pb::ClusterEvent {
                unix_ms: 5,
                kind: "node_state".into(),
                node: Some(2),
                state: "suspect".into(),
                detail: "node 2 suspect".into(),
            }],
            recent_repairs: vec![pb::RepairStatus { job_id: 4, reason: "node 3 down".into(), ..Default::default() }],
            ..Default::default()
        };
        let json = status_json(&reply, 1, "127.0.0.1:9001");
        assert_eq!(json["served_by"]["node"], 1);
        assert_eq!(json["leader"], 2);
        assert_eq!(json["nodes"][0]["http_addr"], "127.0.0.1:9001");
        assert_eq!(json["nodes"][1]["phi"], 9.5);
        assert_eq!(json["events"][0]["state"], "suspect");
        assert!(json["repair"].is_null());
        assert_eq!(json["recent_repairs"][0]["job_id"], 4);
        assert_eq!(json["recent_repairs"][0]["reason"], "node 3 down");
    }
}
