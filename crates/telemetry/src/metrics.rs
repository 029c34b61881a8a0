//! Prometheus metrics in the text exposition format.
//!
//! Two kinds: [`RequestMetrics`], counted as requests are served (by operation and outcome,
//! with latency histograms), and a [`Scrape`], built afresh on every scrape from the node's
//! live state (Raft indexes, chunk store counters, the detector's view) so no value is ever
//! stale or copied twice.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// prometheus-client writes OpenMetrics text (counters as `<name>_total` under a
/// `# TYPE <name> counter` line, a final `# EOF`); this content type tells Prometheus so.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: String,
    outcome: String,
    /// `call`: an RPC of its own, counted by the server layer; `stream`: one of the requests a
    /// stream carries, each served as a call would be (a write on `Kv/WriteStream`, counted under
    /// the write's own op, `Kv/Set` and so on). Summed over `via`, an op counts every request.
    via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

/// Requests this node served, counted by the gRPC server layer.
pub struct RequestMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<OpLabels, Histogram>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "mendfs_rpc_requests",
            "RPCs served, by operation, outcome (ok or the gRPC code) and how they came (call, or a request on a stream)",
            requests.clone(),
        );
        // 100 µs to ~26 s in doublings: a kv read on loopback to a chunk prepare that waits
        // out a stopped replica's timeout.
        let duration = Family::<OpLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 19))
        });
        registry.register(
            "mendfs_rpc_duration_seconds",
            "Time to answer an RPC (to the reply's headers), by operation",
            duration.clone(),
        );
        RequestMetrics { registry, requests, duration }
    }

    /// Counts one served call. `outcome` is `ok` or the gRPC code's name.
    pub fn observe(&self, op: &str, outcome: &str, elapsed: Duration) {
        self.count(op, outcome, "call", elapsed);
    }

    /// Counts one request served on a stream, under its own `op`, as if it had been a call.
    pub fn observe_streamed(&self, op: &str, outcome: &str, elapsed: Duration) {
        self.count(op, outcome, "stream", elapsed);
    }

    fn count(&self, op: &str, outcome: &str, via: &'static str, elapsed: Duration) {
        self.requests.get_or_create(&RequestLabels { op: op.to_string(), outcome: outcome.to_string(), via }).inc();
        self.duration.get_or_create(&OpLabels { op: op.to_string() }).observe(elapsed.as_secs_f64());
    }

    /// Appends this registry's metrics (without the end-of-file marker).
    pub fn encode_into(&self, out: &mut String) -> std::fmt::Result {
        prometheus_client::encoding::text::encode_registry(out, &self.registry)
    }
}

/// Label pairs of one sample, e.g. `[("peer", "3")]`.
pub type Labels = Vec<(String, String)>;

pub use prometheus_client::metrics::histogram::Histogram;

/// Histograms of one metric, one per label set, each made by [`latency_histogram`].
pub type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// A histogram of durations in seconds, 50 µs to ~26 s in doublings: an fsync on a fast disk
/// to a write that waits out a peer's timeout.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

/// A [`HistogramFamily`] of [`latency_histogram`]s.
pub fn latency_histogram_family() -> HistogramFamily {
    Family::new_with_constructor(latency_histogram)
}

/// Values read from the node's state at scrape time.
#[derive(Default)]
pub struct Scrape {
    registry: Registry,
}

impl Scrape {
    pub fn new() -> Self {
        Self::default()
    }

    /// A monotonic count kept elsewhere (exposed as `<name>_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        self.registry.register(name, help, counter);
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        let gauge = Gauge::<f64, AtomicU64>::default();
        gauge.set(value);
        self.registry.register(name, help, gauge);
    }

    /// One gauge per label set (a value per peer, per state, ...).
    pub fn gauge_family(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = (Labels, f64)>) {
        let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (labels, value) in samples {
            family.get_or_create(&labels).set(value);
        }
        self.registry.register(name, help, family);
    }

    /// One counter per label set.
    pub fn counter_family(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = (Labels, u64)>) {
        let family = Family::<Labels, Counter<u64>>::default();
        for (labels, value) in samples {
            family.get_or_create(&labels).inc_by(value);
        }
        self.registry.register(name, help, family);
    }

    /// A histogram kept elsewhere, as it stands (the histogram is shared, not copied).
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.registry.register(name, help, histogram.clone());
    }

    /// Histograms kept elsewhere, one per label set.
    pub fn histogram_family(&mut self, name: &str, help: &str, family: &HistogramFamily) {
        self.registry.register(name, help, family.clone());
    }

    /// The whole exposition: the request metrics, these values, and the end marker.
    pub fn finish(self, requests: &RequestMetrics) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        requests.encode_into(&mut out)?;
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)?;
        prometheus_client::encoding::text::encode_eof(&mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_parses_and_carries_every_kind() {
        let requests = RequestMetrics::new();
        requests.observe("Files/Put", "ok", Duration::from_millis(3));
        requests.observe("Files/Put", "ok", Duration::from_millis(5));
        requests.observe("Files/Put", "Unavailable", Duration::from_secs(30));
        requests.observe_streamed("Kv/Set", "FailedPrecondition", Duration::from_millis(1));
        let mut scrape = Scrape::new();
        scrape.counter("mendfs_chunk_store_io_errors", "I/O errors", 4);
        scrape.gauge("mendfs_raft_term", "term", 7.0);
        scrape.gauge_family("mendfs_node_phi", "phi", vec![(vec![("peer".to_string(), "2".to_string())], 0.5)]);
        let fsync = latency_histogram();
        let peers = latency_histogram_family();
        scrape.histogram("mendfs_raft_log_fsync_seconds", "fsyncs", &fsync);
        scrape.histogram_family("mendfs_raft_peer_append_seconds", "appends", &peers);
        // Shared, not copied: what is observed after registering is in the exposition.
        fsync.observe(0.0002);
        fsync.observe(0.0003);
        peers.get_or_create(&vec![("peer".to_string(), "3".to_string())]).observe(0.001);
        let text = scrape.finish(&requests).expect("encode");
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("valid exposition");
        // prometheus-parse reads the classic text format, where a counter's samples named
        // `_total` under `# TYPE <name> counter` come out untyped: take either.
        let value = |name: &str, label: Option<(&str, &str)>| {
            parsed
                .samples
                .iter()
                .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .and_then(|s| match s.value {
                    prometheus_parse::Value::Counter(n)
                    | prometheus_parse::Value::Gauge(n)
                    | prometheus_parse::Value::Untyped(n) => Some(n),
                    _ => None,
                })
        };
        assert_eq!(value("mendfs_rpc_requests_total", Some(("outcome", "ok"))), Some(2.0));
        assert_eq!(value("mendfs_rpc_requests_total", Some(("outcome", "Unavailable"))), Some(1.0));
        assert_eq!(value("mendfs_rpc_duration_seconds_count", Some(("op", "Files/Put"))), Some(3.0));
        let streamed = parsed.samples.iter().find(|s| s.labels.get("op") == Some("Kv/Set")).expect("a streamed set");
        assert_eq!(streamed.labels.get("via"), Some("stream"));
        let called = parsed.samples.iter().find(|s| s.labels.get("op") == Some("Files/Put")).expect("a put");
        assert_eq!(called.labels.get("via"), Some("call"));
        assert_eq!(value("mendfs_chunk_store_io_errors_total", None), Some(4.0));
        assert_eq!(value("mendfs_raft_term", None), Some(7.0));
        assert_eq!(value("mendfs_node_phi", Some(("peer", "2"))), Some(0.5));
        assert_eq!(value("mendfs_raft_log_fsync_seconds_count", None), Some(2.0));
        assert_eq!(value("mendfs_raft_peer_append_seconds_count", Some(("peer", "3"))), Some(1.0));
        assert!(text.ends_with("# EOF\n"));
    }
}
