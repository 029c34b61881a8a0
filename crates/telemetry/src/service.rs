//! The `Telemetry` gRPC service: a node answers for what it recorded itself.

use std::sync::Arc;

use mendfs_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::context::TraceId;
use crate::record::Level;
use crate::store::{LogQuery, LogStore, SpanStore};

/// Most log lines one query returns; a caller wanting more narrows the filter.
pub const LOG_LINES_MAX: usize = 10_000;

pub struct TelemetryApi {
    pub node_id: u64,
    pub spans: Arc<SpanStore>,
    pub logs: Arc<LogStore>,
}

fn serialize_all<T: serde::Serialize>(records: &[T]) -> Result<Vec<String>, Status> {
    records
        .iter()
        .map(|record| serde_json::to_string(record).map_err(|e| Status::internal(format!("encoding a record: {e}"))))
        .collect()
}

#[tonic::async_trait]
impl pb::telemetry_server::Telemetry for TelemetryApi {
    async fn trace_spans(
        &self,
        request: Request<pb::TraceSpansRequest>,
    ) -> Result<Response<pb::TraceSpansReply>, Status> {
        let trace_id: TraceId =
            request.get_ref().trace_id.parse().map_err(|e| Status::invalid_argument(format!("{e}")))?;
        let spans = self.spans.clone();
        // The stores read files: off the async workers.
        let found = tokio::task::spawn_blocking(move || spans.trace(&trace_id.to_string()))
            .await
            .map_err(|e| Status::internal(format!("span query: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::TraceSpansReply { node_id: self.node_id, spans_json: serialize_all(&found)? }))
    }

    async fn query_logs(&self, request: Request<pb::QueryLogsRequest>) -> Result<Response<pb::QueryLogsReply>, Status> {
        let request = request.into_inner();
        let trace_id = match request.trace_id.as_str() {
            "" => None,
            text => Some(text.parse::<TraceId>().map_err(|e| Status::invalid_argument(format!("{e}")))?.to_string()),
        };
        let min_level = match request.min_level.as_str() {
            "" => None,
            text => Some(text.parse::<Level>().map_err(Status::invalid_argument)?),
        };
        let query = LogQuery {
            trace_id,
            since_unix_us: (request.since_unix_us > 0).then_some(request.since_unix_us),
            min_level,
            limit: (request.limit as usize).min(LOG_LINES_MAX),
        };
        let logs = self.logs.clone();
        let found = tokio::task::spawn_blocking(move || logs.query(&query))
            .await
            .map_err(|e| Status::internal(format!("log query: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::QueryLogsReply { node_id: self.node_id, lines_json: serialize_all(&found)? }))
    }
}
