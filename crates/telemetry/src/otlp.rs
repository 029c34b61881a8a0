//! Optional export of finished spans to an OpenTelemetry collector (Jaeger, Tempo, the
//! OpenTelemetry Collector) over OTLP/gRPC, so a cluster's traces can live beside the rest
//! of an operator's. The node's own span store is kept either way.
//!
//! The request path only hands a span to a bounded queue; a background task batches and
//! sends. A slow or absent collector costs dropped exports (counted), never request latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};
use tokio::sync::mpsc;

use crate::record::{SpanRecord, SpanStatus};

/// Spans waiting for export; beyond this, new spans are dropped (and counted).
const QUEUE_SPANS: usize = 8192;
/// Spans per export request.
const BATCH_SPANS: usize = 512;
/// Longest a finished span waits before it is sent.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Tries per batch, the first retry after `RETRY_BACKOFF_FIRST`, each later one after twice the
/// last wait: a batch gives up after 0.2 + 0.4 + 0.8 s of backoff (plus the calls' own time).
const EXPORT_ATTEMPTS: u32 = 4;
const RETRY_BACKOFF_FIRST: Duration = Duration::from_millis(200);

/// The exporter's counters, for `/metrics`.
#[derive(Default, Debug)]
pub struct ExportCounters {
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
    pub failed_batches: AtomicU64,
}

/// The export loop: it ends when every exporter handle is gone.
pub type ExportLoop = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The request-path side: hands spans to the export task.
#[derive(Clone)]
pub struct OtlpExporter {
    queue: mpsc::Sender<SpanRecord>,
    pub counters: Arc<ExportCounters>,
}

impl OtlpExporter {
    /// An exporter towards `endpoint` (`http://HOST:4317`, or `https://` checked against the
    /// system's trusted CAs), and the export loop, which the caller runs as a task of its own
    /// (a node runs it among its tracked tasks, so that a stopped node leaves no exporter
    /// behind).
    pub fn new(endpoint: &str, node_id: u64) -> Result<(Self, ExportLoop), String> {
        let uri = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
        let mut channel = tonic::transport::Endpoint::from_shared(uri.clone())
            .map_err(|e| format!("--otlp-endpoint {endpoint:?}: {e}"))?;
        if uri.starts_with("https://") {
            let tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
            channel = channel.tls_config(tls).map_err(|e| format!("--otlp-endpoint {endpoint:?}: TLS: {e}"))?;
        }
        let channel = channel.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(10)).connect_lazy();
        let (queue, receiver) = mpsc::channel(QUEUE_SPANS);
        let counters = Arc::new(ExportCounters::default());
        let export = Box::pin(export_loop(TraceServiceClient::new(channel), receiver, node_id, counters.clone()));
        Ok((OtlpExporter { queue, counters }, export))
    }

    /// Queues a span for export without waiting.
    pub fn offer(&self, span: &SpanRecord) {
        if self.queue.try_send(span.clone()).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn export_loop(
    mut client: TraceServiceClient<tonic::transport::Channel>,
    mut receiver: mpsc::Receiver<SpanRecord>,
    node_id: u64,
    counters: Arc<ExportCounters>,
) {
    let mut batch = Vec::with_capacity(BATCH_SPANS);
    loop {
        let Some(first) = receiver.recv().await else { return };
        batch.push(first);
        let deadline = tokio::time::sleep(BATCH_DELAY);
        tokio::pin!(deadline);
        while batch.len() < BATCH_SPANS {
            tokio::select! {
                next = receiver.recv() => match next {
                    Some(span) => batch.push(span),
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        let count = batch.len() as u64;
        let request = export_request(node_id, &batch);
        batch.clear();
        // A batch is retried, with backoff, while the collector answers with a code the OTLP
        // spec calls retryable; then it is dropped (counted): the spans are still in the node's
        // own store. New spans queue meanwhile, up to the queue's bound.
        let mut backoff = RETRY_BACKOFF_FIRST;
        let mut attempt = 1;
        let outcome = loop {
            match client.export(request.clone()).await {
                Ok(_) => break Ok(()),
                Err(status) if attempt < EXPORT_ATTEMPTS && retryable(status.code()) => {
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(status) => break Err(status),
            }
        };
        match outcome {
            Ok(()) => counters.exported.fetch_add(count, Ordering::Relaxed),
            Err(_) => {
                counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                counters.dropped.fetch_add(count, Ordering::Relaxed)
            }
        };
    }
}

/// The codes after which OTLP/gRPC says an export may be retried (OTLP specification,
/// "Failures"). RESOURCE_EXHAUSTED is retryable only with a server's RetryInfo, which this
/// exporter does not read, so it is not retried.
fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted
            | tonic::Code::OutOfRange
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    )
}

fn string_value(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_string())) }),
    }
}

fn hex_bytes(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .filter_map(|i| text.get(2 * i..2 * i + 2))
        .filter_map(|pair| u8::from_str_radix(pair, 16).ok())
        .collect()
}

/// One export request for `spans` recorded on `node_id`.
pub fn export_request(node_id: u64, spans: &[SpanRecord]) -> ExportTraceServiceRequest {
    let spans = spans
        .iter()
        .map(|record| Span {
            trace_id: hex_bytes(&record.trace_id),
            span_id: hex_bytes(&record.span_id),
            parent_span_id: record.parent_id.as_deref().map(hex_bytes).unwrap_or_default(),
            name: record.name.clone(),
            kind: if record.attributes.contains_key("peer") {
                span::SpanKind::Client as i32
            } else if record.parent_id.is_some() || record.name.contains('/') {
                span::SpanKind::Server as i32
            } else {
                span::SpanKind::Internal as i32
            },
            start_time_unix_nano: record.start_unix_us.saturating_mul(1000),
            end_time_unix_nano: record.start_unix_us.saturating_add(record.duration_us).saturating_mul(1000),
            attributes: record.attributes.iter().map(|(key, value)| string_value(key, value)).collect(),
            status: Some(match record.status {
                SpanStatus::Ok => Status { message: String::new(), code: status::StatusCode::Unset as i32 },
                SpanStatus::Error => {
                    Status { message: record.error.clone().unwrap_or_default(), code: status::StatusCode::Error as i32 }
                }
            }),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    string_value("service.name", "mendfs"),
                    string_value("service.instance.id", &node_id.to_string()),
                    string_value("service.version", env!("CARGO_PKG_VERSION")),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope { name: "mendfs".into(), ..Default::default() }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_converts_with_its_ids_times_and_failure() {
        let record = SpanRecord {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            parent_id: Some("00000000000000aa".into()),
            node: 3,
            name: "prepare_chunk".into(),
            start_unix_us: 1_000,
            duration_us: 250,
            status: SpanStatus::Error,
            error: Some("deadline exceeded".into()),
            attributes: [("peer".to_string(), "2".to_string())].into(),
        };
        let request = export_request(3, &[record]);
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.trace_id.len(), 16);
        assert_eq!(span.trace_id[0], 0x4b);
        assert_eq!(span.span_id, vec![0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(span.parent_span_id.len(), 8);
        assert_eq!((span.start_time_unix_nano, span.end_time_unix_nano), (1_000_000, 1_250_000));
        assert_eq!(span.kind, span::SpanKind::Client as i32);
        let status = span.status.as_ref().expect("status");
        assert_eq!(status.code, status::StatusCode::Error as i32);
        assert_eq!(status.message, "deadline exceeded");
    }
}
