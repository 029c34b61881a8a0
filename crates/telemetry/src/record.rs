//! The records a node keeps about its own work: finished spans and log lines. Both are stored
//! as one JSON object per line, and served to `mendfs trace` and `mendfs logs` as such.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a span ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SpanStatus {
    Ok,
    Error,
}

/// One finished span: an operation on one node, within one trace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SpanRecord {
    /// 32 lowercase hex digits (W3C trace-id).
    pub trace_id: String,
    /// 16 lowercase hex digits (W3C parent-id of this span's children).
    pub span_id: String,
    /// The span this one runs under, possibly on another node; `None` for a trace's root.
    pub parent_id: Option<String>,
    /// The node that recorded the span.
    pub node: u64,
    /// The operation: an RPC (`Files/Put`, `Storage/PrepareChunk`) or a step inside one
    /// (`prepare_chunk`, `raft_commit`).
    pub name: String,
    /// Wall-clock start, microseconds since the Unix epoch.
    pub start_unix_us: u64,
    pub duration_us: u64,
    pub status: SpanStatus,
    /// Why the span failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the operation worked on: `peer` (the node an outgoing call went to), `path`,
    /// `chunk`, `bytes`, ...
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// Severity of a log line, ordered from least to most severe.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// One structured log line.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LogRecord {
    /// Microseconds since the Unix epoch.
    pub time_unix_us: u64,
    pub level: Level,
    /// The node that wrote the line.
    pub node: u64,
    /// The Rust module that wrote it.
    pub target: String,
    pub message: String,
    /// The trace the line was written in, when it was written while serving one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    /// The event's other fields, as text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "TRACE",
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Level {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_uppercase().as_str() {
            "TRACE" => Ok(Level::Trace),
            "DEBUG" => Ok(Level::Debug),
            "INFO" => Ok(Level::Info),
            "WARN" | "WARNING" => Ok(Level::Warn),
            "ERROR" => Ok(Level::Error),
            _ => Err(format!("log level {text:?}: use trace, debug, info, warn or error")),
        }
    }
}
