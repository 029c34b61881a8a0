//! The node's recent failed and slow client requests, for the dashboard's "find the failing
//! hop" list: a bounded ring fed by the span listener as each request's server span ends.
//! Only the requests a client made are kept (not node-to-node calls nor the dashboard's own
//! polling), and only those that failed or took long, so a busy node's healthy traffic does
//! not push the interesting ones out.

use std::collections::VecDeque;
use std::sync::Mutex;

use mendfs_meta::auth::{required_access, Access};
use mendfs_telemetry::record::{SpanRecord, SpanStatus};
use serde::Serialize;

/// Requests kept per node.
pub const RECENT_REQUESTS_MAX: usize = 100;
/// A request slower than this is listed even when it succeeded.
pub const SLOW_REQUEST_US: u64 = 250_000;

/// Calls the dashboard and the CLI make to look at the cluster: never listed, or watching
/// would fill the list with itself.
const LOOKING: [&str; 5] =
    ["Cluster/Status", "Telemetry/TraceSpans", "Telemetry/QueryLogs", "Node/Info", "Auth/WhoAmI"];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecentRequest {
    pub trace_id: String,
    pub node: u64,
    pub name: String,
    pub start_unix_us: u64,
    pub duration_us: u64,
    pub failed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Default)]
pub struct RecentRequests {
    kept: Mutex<VecDeque<RecentRequest>>,
}

/// Whether a finished span is a client's request worth listing.
pub fn is_notable(span: &SpanRecord) -> bool {
    let client_call = matches!(required_access(&span.name), Some(Access::Client(_)));
    client_call
        && !LOOKING.contains(&span.name.as_str())
        && (span.status == SpanStatus::Error || span.duration_us >= SLOW_REQUEST_US)
}

impl RecentRequests {
    pub fn offer(&self, span: &SpanRecord) {
        if !is_notable(span) {
            return;
        }
        let request = RecentRequest {
            trace_id: span.trace_id.clone(),
            node: span.node,
            name: span.name.clone(),
            start_unix_us: span.start_unix_us,
            duration_us: span.duration_us,
            failed: span.status == SpanStatus::Error,
            error: span.error.clone(),
        };
        let mut kept = self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if kept.len() == RECENT_REQUESTS_MAX {
            kept.pop_front();
        }
        kept.push_back(request);
    }

    /// Newest first.
    pub fn list(&self) -> Vec<RecentRequest> {
        self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str, duration_us: u64, status: SpanStatus) -> SpanRecord {
        SpanRecord {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            parent_id: None,
            node: 2,
            name: name.into(),
            start_unix_us: duration_us,
            duration_us,
            status,
            error: (status == SpanStatus::Error).then(|| "no quorum".to_string()),
            attributes: Default::default(),
        }
    }

    #[test]
    fn only_failed_or_slow_client_requests_are_listed() {
        assert!(is_notable(&span("Files/Put", 10, SpanStatus::Error)));
        assert!(is_notable(&span("Files/Get", SLOW_REQUEST_US, SpanStatus::Ok)));
        assert!(!is_notable(&span("Files/Get", SLOW_REQUEST_US - 1, SpanStatus::Ok)), "fast and fine");
        assert!(!is_notable(&span("Storage/PrepareChunk", 10, SpanStatus::Error)), "a node's call, not a client's");
        assert!(!is_notable(&span("prepare_chunk", 10, SpanStatus::Error)), "a step inside a request");
        assert!(!is_notable(&span("Cluster/Status", SLOW_REQUEST_US * 4, SpanStatus::Ok)), "the dashboard itself");
    }

    #[test]
    fn the_list_is_bounded_and_newest_first() {
        let recent = RecentRequests::default();
        for i in 0..(RECENT_REQUESTS_MAX as u64 + 10) {
            recent.offer(&span("Files/Put", SLOW_REQUEST_US + i, SpanStatus::Ok));
        }
        let list = recent.list();
        assert_eq!(list.len(), RECENT_REQUESTS_MAX);
        assert_eq!(list[0].duration_us, SLOW_REQUEST_US + RECENT_REQUESTS_MAX as u64 + 9);
        assert_eq!(list.last().map(|r| r.duration_us), Some(SLOW_REQUEST_US + 10));
    }
}
