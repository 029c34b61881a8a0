//! MendFS metadata: the Raft-replicated state machine (`state`, pure), its redb storage
//! (`storage`), the Raft network over gRPC (`network`), and a running metadata node with its
//! client-facing services (`node`, `service`).
//!
//! `state` knows nothing about Raft, disks or the network; `storage` and `network` adapt it to
//! openraft; `node` decides what only the leader may do and forwards the rest.

pub mod error;
pub mod files;
pub mod health;
pub mod network;
pub mod node;
pub mod service;
pub mod state;
pub mod storage;

pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The openraft type configuration of the metadata cluster.
    pub TypeConfig:
        D = state::ProposalBatch,
        R = Vec<state::CommandResult>,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;

pub use error::ApiError;
pub use node::{MetaNode, NodeConfig, Origin};
