//! The leader's view of the cluster's health: liveness from the failure detector, the health
//! each node reports in its heartbeats, and the latest repair scan. Soft state: the data plane's
//! healer publishes it on the leader (see `MetaNode::health`); `cluster status` reads it
//! through the leader. Only the decisions drawn from it (a node down, a replica dropped) go
//! through Raft.

use std::collections::BTreeMap;

use mendfs_heal::detector::Liveness;
use mendfs_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::files::RepairJob;
use crate::NodeId;

/// What a node reported about itself in its latest heartbeat (mirrors `pb::NodeHealth`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeHealthReport {
    pub disk_used_bytes: u64,
    pub disk_capacity_bytes: u64,
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub rss_bytes: u64,
    pub chunk_count: u64,
    pub chunk_bytes: u64,
    pub io_errors: u64,
    pub checksum_errors: u64,
    pub scrub_passes: u64,
    pub scrub_checked_chunks: u64,
    pub scrub_checked_bytes: u64,
    pub repair_copied_chunks: u64,
    pub repair_copied_bytes: u64,
}

impl From<&pb::NodeHealth> for NodeHealthReport {
    fn from(h: &pb::NodeHealth) -> Self {
        Self {
            disk_used_bytes: h.disk_used_bytes,
            disk_capacity_bytes: h.disk_capacity_bytes,
            cpu_percent: h.cpu_percent,
            memory_used_bytes: h.memory_used_bytes,
            memory_total_bytes: h.memory_total_bytes,
            rss_bytes: h.rss_bytes,
            chunk_count: h.chunk_count,
            chunk_bytes: h.chunk_bytes,
            io_errors: h.io_errors,
            checksum_errors: h.checksum_errors,
            scrub_passes: h.scrub_passes,
            scrub_checked_chunks: h.scrub_checked_chunks,
            scrub_checked_bytes: h.scrub_checked_bytes,
            repair_copied_chunks: h.repair_copied_chunks,
            repair_copied_bytes: h.repair_copied_bytes,
        }
    }
}

impl From<&NodeHealthReport> for pb::NodeHealth {
    fn from(h: &NodeHealthReport) -> Self {
        Self {
            disk_used_bytes: h.disk_used_bytes,
            disk_capacity_bytes: h.disk_capacity_bytes,
            cpu_percent: h.cpu_percent,
            memory_used_bytes: h.memory_used_bytes,
            memory_total_bytes: h.memory_total_bytes,
            rss_bytes: h.rss_bytes,
            chunk_count: h.chunk_count,
            chunk_bytes: h.chunk_bytes,
            io_errors: h.io_errors,
            checksum_errors: h.checksum_errors,
            scrub_passes: h.scrub_passes,
            scrub_checked_chunks: h.scrub_checked_chunks,
            scrub_checked_bytes: h.scrub_checked_bytes,
            repair_copied_chunks: h.repair_copied_chunks,
            repair_copied_bytes: h.repair_copied_bytes,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeHealthView {
    pub node_id: NodeId,
    pub liveness: Liveness,
    pub phi: f64,
    /// None: no heartbeat since this leader started listening.
    pub heartbeat_age_ms: Option<u64>,
    pub reason: String,
    pub health: Option<NodeHealthReport>,
}

/// Counts from the leader's latest full scan of the chunk map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanSummary {
    pub chunks: u64,
    pub under_replicated: u64,
    pub over_replicated: u64,
    pub lost: u64,
    pub unplaceable: u64,
    /// Chunk records listing each node.
    pub chunks_listed: BTreeMap<NodeId, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthSnapshot {
    pub nodes: Vec<NodeHealthView>,
    pub scan: ScanSummary,
    /// Repair copy throughput over the last few seconds.
    pub repair_bytes_per_sec: f64,
    /// Filled in when the snapshot is served, from the committed state.
    pub repair_job: Option<RepairJob>,
}
