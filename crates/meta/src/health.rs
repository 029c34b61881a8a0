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

/// What a node reported about itself in its latest heartbeat: the wire message itself.
pub type NodeHealthReport = pb::NodeHealth;

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
