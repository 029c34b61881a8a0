//! The `tracing` layer that turns a node's spans and events into stored records.
//!
//! Every span the layer sees gets a W3C context: a span opened with a `traceparent` field
//! continues the caller's trace (the gRPC server layer passes the header in), one opened with a
//! `trace_id` field starts that trace, and any other span continues its parent's trace or, with
//! no parent, starts a new one. When a span closes it becomes a [`SpanRecord`]: duration, and
//! `error` if the code recorded one. Events become [`LogRecord`]s carrying the trace and span
//! they were written in.
//!
//! Field conventions for spans: `op` names the operation (else the span's name), `error`
//! (declared `tracing::field::Empty`, recorded on failure) marks it failed, `peer` names the
//! node an outgoing call went to; every other field is kept as an attribute.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::context::{SpanId, TraceContext, TraceId};
use crate::record::{Level, LogRecord, SpanRecord, SpanStatus};
use crate::store::{LogStore, SpanStore};

/// Longest message or attribute kept in a record; the rest is cut (marked with `…`), so one
/// huge error text cannot evict a store's worth of history.
const TEXT_BYTES_MAX: usize = 4096;

/// Something told about every sampled finished span (metrics, OTLP export). Must not block.
pub type SpanListener = Box<dyn Fn(&SpanRecord) + Send + Sync>;

/// Where finished spans and log lines go.
pub struct Sinks {
    pub node_id: u64,
    pub spans: Option<Arc<SpanStore>>,
    pub logs: Option<Arc<LogStore>>,
    pub span_listeners: Vec<SpanListener>,
    /// Records that could not be stored (disk full, I/O error); the first failure is printed
    /// to stderr, since logging it through `tracing` would recurse into the failing store.
    pub store_failures: AtomicU64,
    reported_failure: AtomicBool,
}

impl Sinks {
    pub fn new(node_id: u64, spans: Option<Arc<SpanStore>>, logs: Option<Arc<LogStore>>) -> Self {
        Sinks {
            node_id,
            spans,
            logs,
            span_listeners: Vec::new(),
            store_failures: AtomicU64::new(0),
            reported_failure: AtomicBool::new(false),
        }
    }

    fn store_failed(&self, what: &str, error: &dyn fmt::Display) {
        self.store_failures.fetch_add(1, Ordering::Relaxed);
        if !self.reported_failure.swap(true, Ordering::Relaxed) {
            eprintln!("mendfs telemetry: cannot store {what} (further failures are only counted): {error}");
        }
    }
}

/// The layer; see the module docs.
pub struct TelemetryLayer {
    sinks: Arc<Sinks>,
}

impl TelemetryLayer {
    pub fn new(sinks: Arc<Sinks>) -> Self {
        TelemetryLayer { sinks }
    }
}

/// What the layer keeps in a live span's extensions.
struct SpanState {
    trace_id: TraceId,
    span_id: SpanId,
    parent_id: Option<SpanId>,
    sampled: bool,
    name: String,
    start_unix_us: u64,
    started: Instant,
    error: Option<String>,
    attributes: BTreeMap<String, String>,
}

impl SpanState {
    fn context(&self) -> TraceContext {
        TraceContext { trace_id: self.trace_id, parent_span_id: self.span_id, sampled: self.sampled }
    }
}

fn unix_micros(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn cut(mut text: String) -> String {
    if text.len() > TEXT_BYTES_MAX {
        let mut end = TEXT_BYTES_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Collects a span's or event's fields as text.
#[derive(Default)]
struct Fields {
    traceparent: Option<String>,
    trace_id: Option<String>,
    op: Option<String>,
    error: Option<String>,
    message: Option<String>,
    other: BTreeMap<String, String>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        let value = cut(value);
        match field.name() {
            "traceparent" => self.traceparent = Some(value),
            "trace_id" => self.trace_id = Some(value),
            "op" => self.op = Some(value),
            "error" => self.error = Some(value),
            "message" => self.message = Some(value),
            name => {
                self.other.insert(name.to_string(), value);
            }
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl<S> Layer<S> for TelemetryLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let remote = fields.traceparent.as_deref().and_then(|value| TraceContext::parse_traceparent(value).ok());
        let explicit_root = fields.trace_id.as_deref().and_then(|value| value.parse::<TraceId>().ok());
        let inherited = || {
            span.scope().skip(1).find_map(|ancestor| ancestor.extensions().get::<SpanState>().map(SpanState::context))
        };
        let (trace_id, parent_id, sampled) = match (remote, explicit_root) {
            (Some(remote), _) => (remote.trace_id, Some(remote.parent_span_id), remote.sampled),
            (None, Some(trace_id)) => (trace_id, None, true),
            (None, None) => match inherited() {
                Some(parent) => (parent.trace_id, Some(parent.parent_span_id), parent.sampled),
                None => (TraceId::random(), None, true),
            },
        };
        let state = SpanState {
            trace_id,
            span_id: SpanId::random(),
            parent_id,
            sampled,
            name: fields.op.unwrap_or_else(|| span.name().to_string()),
            start_unix_us: unix_micros(SystemTime::now()),
            started: Instant::now(),
            error: fields.error,
            attributes: fields.other,
        };
        span.extensions_mut().insert(state);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        values.record(&mut fields);
        let mut extensions = span.extensions_mut();
        let Some(state) = extensions.get_mut::<SpanState>() else { return };
        if let Some(op) = fields.op {
            state.name = op;
        }
        if fields.error.is_some() {
            state.error = fields.error;
        }
        state.attributes.extend(fields.other);
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(logs) = &self.sinks.logs else { return };
        let mut fields = Fields::default();
        event.record(&mut fields);
        let context = ctx.event_span(event).and_then(|span| {
            span.scope().find_map(|ancestor| ancestor.extensions().get::<SpanState>().map(SpanState::context))
        });
        let metadata = event.metadata();
        let level = match *metadata.level() {
            tracing::Level::ERROR => Level::Error,
            tracing::Level::WARN => Level::Warn,
            tracing::Level::INFO => Level::Info,
            tracing::Level::DEBUG => Level::Debug,
            tracing::Level::TRACE => Level::Trace,
        };
        if let Some(error) = fields.error {
            fields.other.insert("error".into(), error);
        }
        let record = LogRecord {
            time_unix_us: unix_micros(SystemTime::now()),
            level,
            node: self.sinks.node_id,
            target: metadata.target().to_string(),
            message: fields.message.unwrap_or_default(),
            trace_id: context.map(|c| c.trace_id.to_string()),
            span_id: context.map(|c| c.parent_span_id.to_string()),
            fields: fields.other,
        };
        if let Err(e) = logs.record(&record) {
            self.sinks.store_failed("a log line", &e);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(state) = span.extensions_mut().remove::<SpanState>() else { return };
        if !state.sampled {
            return;
        }
        let record = SpanRecord {
            trace_id: state.trace_id.to_string(),
            span_id: state.span_id.to_string(),
            parent_id: state.parent_id.map(|id| id.to_string()),
            node: self.sinks.node_id,
            name: state.name,
            start_unix_us: state.start_unix_us,
            duration_us: state.started.elapsed().as_micros() as u64,
            status: if state.error.is_some() { SpanStatus::Error } else { SpanStatus::Ok },
            error: state.error,
            attributes: state.attributes,
        };
        if let Some(spans) = &self.sinks.spans {
            if let Err(e) = spans.record(&record) {
                self.sinks.store_failed("a span", &e);
            }
        }
        for listener in &self.sinks.span_listeners {
            listener(&record);
        }
    }
}

/// The trace context of the innermost span of the current task that this layer tracks, as
/// an outgoing call's `traceparent` should carry it; `None` outside any traced span or when
/// the process records nothing (no [`TelemetryLayer`] installed).
pub fn current_context() -> Option<TraceContext> {
    tracing::Span::current()
        .with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
            let span = registry.span(id)?;
            let found =
                span.scope().find_map(|ancestor| ancestor.extensions().get::<SpanState>().map(SpanState::context));
            found
        })
        .flatten()
}

/// The trace id of the current span, for code that wants to name it (in a reply or a log).
pub fn current_trace_id() -> Option<TraceId> {
    current_context().map(|context| context.trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tracing_subscriber::layer::SubscriberExt;

    fn collecting() -> (Arc<Mutex<Vec<SpanRecord>>>, tracing::Dispatch, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = Arc::new(LogStore::open(dir.path(), 1 << 20).expect("log store"));
        let collected = Arc::new(Mutex::new(Vec::new()));
        let mut sinks = Sinks::new(7, None, Some(logs));
        let sink = collected.clone();
        sinks.span_listeners.push(Box::new(move |span| sink.lock().expect("lock").push(span.clone())));
        let subscriber = tracing_subscriber::registry().with(TelemetryLayer::new(Arc::new(sinks)));
        (collected, tracing::Dispatch::new(subscriber), dir)
    }

    #[test]
    fn children_join_the_parents_trace_and_a_remote_parent_is_continued() {
        let (collected, dispatch, _dir) = collecting();
        let remote = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        tracing::dispatcher::with_default(&dispatch, || {
            let rpc = tracing::info_span!("rpc", op = "Files/Put", traceparent = remote, error = tracing::field::Empty);
            let _entered = rpc.enter();
            let context = current_context().expect("a context inside a span");
            assert_eq!(context.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            let hop = tracing::info_span!("prepare_chunk", peer = 3u64, error = tracing::field::Empty);
            hop.record("error", "deadline exceeded");
            drop(hop);
        });
        let spans = collected.lock().expect("lock").clone();
        assert_eq!(spans.len(), 2);
        let (hop, rpc) = (&spans[0], &spans[1]);
        assert_eq!(rpc.name, "Files/Put");
        assert_eq!(rpc.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(rpc.node, 7);
        assert_eq!(rpc.status, SpanStatus::Ok);
        assert_eq!(hop.trace_id, rpc.trace_id);
        assert_eq!(hop.parent_id.as_deref(), Some(rpc.span_id.as_str()));
        assert_eq!(hop.status, SpanStatus::Error);
        assert_eq!(hop.error.as_deref(), Some("deadline exceeded"));
        assert_eq!(hop.attributes.get("peer").map(String::as_str), Some("3"));
    }

    #[test]
    fn unparented_spans_start_distinct_traces_and_unsampled_ones_are_not_recorded() {
        let (collected, dispatch, _dir) = collecting();
        tracing::dispatcher::with_default(&dispatch, || {
            drop(tracing::info_span!("scrub_pass"));
            drop(tracing::info_span!("repair_round"));
            let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
            let span = tracing::info_span!("rpc", traceparent = unsampled);
            let _entered = span.enter();
            assert_eq!(current_context().map(|c| c.sampled), Some(false));
        });
        let spans = collected.lock().expect("lock").clone();
        assert_eq!(spans.len(), 2);
        assert_ne!(spans[0].trace_id, spans[1].trace_id);
        assert!(spans.iter().all(|s| s.parent_id.is_none()));
    }

    #[test]
    fn log_lines_carry_the_trace_they_were_written_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = Arc::new(LogStore::open(dir.path(), 1 << 20).expect("log store"));
        let sinks = Arc::new(Sinks::new(2, None, Some(logs.clone())));
        let subscriber = tracing_subscriber::registry().with(TelemetryLayer::new(sinks));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(node = 3u64, "outside any span");
            let span = tracing::info_span!("repair_round", trace_id = "0123456789abcdef0123456789abcdef");
            let _entered = span.enter();
            tracing::error!(chunk = "ab12", "copy failed");
        });
        let lines = logs.query(&crate::store::LogQuery { limit: 10, ..Default::default() }).expect("query");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].trace_id, None);
        assert_eq!(lines[0].fields.get("node").map(String::as_str), Some("3"));
        assert_eq!(lines[1].level, Level::Error);
        assert_eq!(lines[1].message, "copy failed");
        assert_eq!(lines[1].trace_id.as_deref(), Some("0123456789abcdef0123456789abcdef"));
        assert_eq!(lines[1].node, 2);
    }

    #[test]
    fn without_the_layer_there_is_no_context() {
        let span = tracing::info_span!("rpc");
        let _entered = span.enter();
        assert_eq!(current_context(), None);
    }
}
