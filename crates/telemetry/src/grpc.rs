//! Trace context on the wire: the server side opens a span for every RPC it serves, under
//! the caller's `traceparent`, and counts the request; the client side puts the current
//! context into every outgoing call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tracing::Instrument;

use crate::context::{TraceContext, TraceId, TRACEPARENT_HEADER};
use crate::metrics::RequestMetrics;

/// The operation an RPC path names: `/mendfs.v1.Files/Put` → `Files/Put`.
pub fn operation_name(path: &str) -> &str {
    let path = path.trim_start_matches('/');
    match path.split_once('/') {
        Some((service, method)) => {
            let service_name = service.rsplit('.').next().unwrap_or(service);
            // Both halves are slices of `path`; keep one contiguous slice.
            let start = path.len() - method.len() - 1 - service_name.len();
            &path[start..]
        }
        None => path,
    }
}

/// The label an RPC path counts under: its `Service/Method` if a proto defines it, else
/// `unknown`. A fixed set, so that requests to made-up paths (from anyone, before any credential
/// is checked) cannot add metric series or fill the span store.
pub fn known_operation(path: &str) -> &'static str {
    let op = operation_name(path);
    mendfs_proto::OPERATIONS.iter().find(|known| **known == op).copied().unwrap_or(UNKNOWN_OPERATION)
}

pub const UNKNOWN_OPERATION: &str = "unknown";

/// Calls that are the cluster's own background rhythm, not requests: Raft replication and
/// elections, health heartbeats. Traced only when a caller sends a context (never, today);
/// otherwise each would start a trace of its own many times a second and flood the store.
fn is_background(op: &str) -> bool {
    matches!(op, "Node/AppendEntries" | "Node/AppendStream" | "Node/Vote" | "Node/InstallSnapshot" | "Health/Heartbeat")
}

/// Whether a call (its path, headers and connection) carries credentials the services behind
/// will accept.
pub type Admits = Arc<dyn Fn(&str, &http::HeaderMap, &http::Extensions) -> bool + Send + Sync>;

/// Wraps every service of a tonic server.
#[derive(Clone)]
pub struct RpcTraceLayer {
    metrics: Arc<RequestMetrics>,
    admits: Option<Admits>,
}

impl RpcTraceLayer {
    pub fn new(metrics: Arc<RequestMetrics>) -> Self {
        RpcTraceLayer { metrics, admits: None }
    }

    /// Opens no span for a call `admits` refuses: a refused call is counted, but a stranger's
    /// calls must not push real traces out of the bounded span store.
    pub fn admitting(mut self, admits: Admits) -> Self {
        self.admits = Some(admits);
        self
    }
}

impl<S> tower::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner, metrics: self.metrics.clone(), admits: self.admits.clone() }
    }
}

#[derive(Clone)]
pub struct RpcTrace<S> {
    inner: S,
    metrics: Arc<RequestMetrics>,
    admits: Option<Admits>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, RequestBody, ResponseBody> tower::Service<http::Request<RequestBody>> for RpcTrace<S>
where
    S: tower::Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
    RequestBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<RequestBody>) -> Self::Future {
        // The instance that was polled ready serves this call; a fresh clone stays behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let op = known_operation(request.uri().path());
        let traceparent =
            request.headers().get(TRACEPARENT_HEADER).and_then(|value| value.to_str().ok()).map(str::to_string);
        let metrics = self.metrics.clone();
        // A handler that serves requests on a stream (each write on `Kv/WriteStream`) counts
        // each of them here too.
        request.extensions_mut().insert(metrics.clone());
        let started = Instant::now();
        // A path no service defines is answered `Unimplemented` by the router: counted, not
        // traced.
        let refused = self
            .admits
            .as_ref()
            .is_some_and(|admits| !admits(request.uri().path(), request.headers(), request.extensions()));
        let span = if (traceparent.is_none() && is_background(op)) || op == UNKNOWN_OPERATION || refused {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                "rpc",
                op = %op,
                traceparent = traceparent.as_deref(),
                error = tracing::field::Empty,
            )
        };
        // The handler's future is built inside the span, and everything it awaits runs in it.
        let future = span.in_scope(|| inner.call(request));
        Box::pin(
            async move {
                let result = future.await;
                let outcome = match &result {
                    Ok(response) => match tonic::Status::from_header_map(response.headers()) {
                        // A failed unary call or a stream that fails before its first message
                        // answers with the status in the headers ("trailers-only").
                        Some(status) if status.code() != tonic::Code::Ok => {
                            tracing::Span::current()
                                .record("error", format!("{:?}: {}", status.code(), status.message()));
                            format!("{:?}", status.code())
                        }
                        _ => "ok".to_string(),
                    },
                    Err(e) => {
                        tracing::Span::current().record("error", e.to_string());
                        "transport".to_string()
                    }
                };
                metrics.observe(op, &outcome, started.elapsed());
                result
            }
            .instrument(span),
        )
    }
}

/// The context an outgoing call carries: the current span's if this task runs in one, else a
/// new trace (every request carries a trace id, even from code that opened no span).
pub fn outgoing_context() -> TraceContext {
    crate::layer::current_context().unwrap_or_else(|| TraceContext::new_root(TraceId::random()))
}

/// Puts a `traceparent` into an outgoing request's metadata: `context`, or else
/// [`outgoing_context`].
pub fn inject(metadata: &mut tonic::metadata::MetadataMap, context: Option<TraceContext>) {
    let context = context.unwrap_or_else(outgoing_context);
    if let Ok(value) = context.to_traceparent().parse() {
        metadata.insert(TRACEPARENT_HEADER, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_drop_the_package() {
        assert_eq!(operation_name("/mendfs.v1.Files/Put"), "Files/Put");
        assert_eq!(operation_name("/Storage/PrepareChunk"), "Storage/PrepareChunk");
        assert_eq!(operation_name("/odd"), "odd");
        assert_eq!(operation_name(""), "");
    }

    #[test]
    fn only_defined_operations_get_a_label_of_their_own() {
        assert_eq!(known_operation("/mendfs.v1.Files/Put"), "Files/Put");
        assert_eq!(known_operation("/mendfs.v1.Node/AppendEntries"), "Node/AppendEntries");
        for made_up in ["/x.Y/3f0c", "/mendfs.v1.Files/Putt", "", "/", "//", "/a/b/c"] {
            assert_eq!(known_operation(made_up), UNKNOWN_OPERATION, "{made_up:?}");
        }
    }

    #[test]
    fn inject_writes_a_parsable_header() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        let context = TraceContext::new_root(TraceId::random());
        inject(&mut metadata, Some(context));
        let value = metadata.get(TRACEPARENT_HEADER).and_then(|v| v.to_str().ok()).expect("header");
        assert_eq!(TraceContext::parse_traceparent(value), Ok(context));
        let mut fresh = tonic::metadata::MetadataMap::new();
        inject(&mut fresh, None);
        assert!(fresh.get(TRACEPARENT_HEADER).is_some());
    }
}
