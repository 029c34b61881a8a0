//! What a node records about its own work: its span and log stores under
//! `DATA_DIR/telemetry/`, and the optional OTLP export. The process-wide `tracing` subscriber
//! that fills them is the binary's to install (one per process); a node in a test without one
//! still serves its (empty) stores.

use std::sync::{Arc, Mutex};

use mendfs_telemetry::layer::Sinks;
use mendfs_telemetry::otlp::{ExportLoop, OtlpExporter};
use mendfs_telemetry::store::{LogStore, SpanStore};

use crate::dashboard::recent::RecentRequests;
use crate::{NodeConfig, NodeError};

#[derive(Clone)]
pub struct Telemetry {
    pub sinks: Arc<Sinks>,
    pub spans: Arc<SpanStore>,
    pub logs: Arc<LogStore>,
    pub otlp: Option<OtlpExporter>,
    /// The recent failed and slow client requests, for the dashboard.
    pub recent_requests: Arc<RecentRequests>,
    /// The OTLP export loop, until the node takes it to run among its tasks.
    export: Arc<Mutex<Option<ExportLoop>>>,
}

impl Telemetry {
    /// Opens the stores, bounded as `config` says, and starts the OTLP exporter if configured.
    pub fn open(config: &NodeConfig) -> Result<Self, NodeError> {
        let dir = config.data_dir.join("telemetry");
        let spans = Arc::new(
            SpanStore::open(&dir.join("spans"), config.span_store_bytes)
                .map_err(|e| NodeError::Start(format!("open the span store: {e}")))?,
        );
        let logs = Arc::new(
            LogStore::open(&dir.join("logs"), config.log_store_bytes)
                .map_err(|e| NodeError::Start(format!("open the log store: {e}")))?,
        );
        let mut sinks = Sinks::new(config.node_id, Some(spans.clone()), Some(logs.clone()));
        let recent_requests = Arc::new(RecentRequests::default());
        let offered = recent_requests.clone();
        sinks.span_listeners.push(Box::new(move |span| offered.offer(span)));
        let (otlp, export) = match &config.otlp_endpoint {
            Some(endpoint) => {
                let (exporter, export) = OtlpExporter::new(endpoint, config.node_id).map_err(NodeError::Start)?;
                let offered = exporter.clone();
                sinks.span_listeners.push(Box::new(move |span| offered.offer(span)));
                (Some(exporter), Some(export))
            }
            None => (None, None),
        };
        Ok(Self { sinks: Arc::new(sinks), spans, logs, otlp, recent_requests, export: Arc::new(Mutex::new(export)) })
    }

    /// The export loop, once: the node runs it until it stops.
    pub(crate) fn take_export(&self) -> Option<ExportLoop> {
        self.export.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }
}
