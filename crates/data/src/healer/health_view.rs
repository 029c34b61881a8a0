//! The leader's view of the cluster's health: liveness from the failure detector, the health
//! each node reports in its heartbeats, and the latest repair scan. Soft state, rebuilt by each
//! new leader; only the decisions drawn from it (a node down, a replica dropped) go through Raft.

use mendfs_heal::detector::Liveness;
use mendfs_heal::repair::{RepairJob, ScanSummary};
use mendfs_proto::v1 as pb;
use mendfs_types::NodeId;

#[derive(Debug, Clone, PartialEq)]
pub struct NodeHealthView {
    pub node_id: NodeId,
    pub liveness: Liveness,
    pub phi: f64,
    /// None: no heartbeat since this leader started listening.
    pub heartbeat_age_ms: Option<u64>,
    pub reason: String,
    /// What the node reported about itself in its latest heartbeat.
    pub health: Option<pb::NodeHealth>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthSnapshot {
    pub nodes: Vec<NodeHealthView>,
    pub scan: ScanSummary,
    /// Repair copy throughput over the last few seconds.
    pub repair_bytes_per_sec: f64,
    /// The committed repair job, as the leader last applied it.
    pub repair_job: Option<RepairJob>,
    /// The repair bandwidth cap (0: none).
    pub repair_throttle_bytes_per_sec: u64,
}
