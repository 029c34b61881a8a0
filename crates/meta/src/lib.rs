//! MendFS metadata: the Raft-replicated state machine, its redb storage, the Raft network over
//! gRPC, and a running metadata node with its client-facing key-value service.
//!
//! API boundary: other crates use [`MetaNode`]'s typed methods, the record types re-exported
//! here, [`ApiError`] and [`Origin`]; the modules are private.
//!
//! - `schema`: the ordered byte tables, the store trait, encoding, revisions, outcomes, errors;
//! - `kv` (keys, sessions, events) and `files` (namespace, chunk lists in segments, uploads,
//!   chunk map, storage nodes, repair job) on top of it, and `state`, which turns a committed proposal into their changes. All
//!   four are pure: no Raft, no disk, no clock;
//! - `raft_store` and `network` adapt the state machine to openraft (redb files, gRPC);
//! - `node` decides what only the leader may do and forwards the rest; `service` serves the
//!   `Node` (peers) and `Kv` (clients) gRPC services.
//!
//! Architecture invariant: this is the only crate that names openraft. Nothing outside it sees
//! Raft metrics, log entries or the state store.

pub mod auth;
pub mod blocking_work;
mod clock;
#[doc(hidden)]
pub mod crafted;
mod error;
mod files;
pub mod jobs;
mod jobs_service;
mod kv;
pub mod login;
mod network;
mod node;
pub mod policy;
mod policy_service;
mod raft_store;
pub mod s3;
mod schema;
mod segment_log;
mod service;
mod snapshot_file;
mod state;
pub mod stripes;
mod validate;
mod write_metrics;

pub use mendfs_types::NodeId;

/// The log filter a process embedding a metadata node starts from when `RUST_LOG` is unset:
/// openraft reports every election and replication step at INFO, which drowns the node's own.
pub const DEFAULT_LOG_FILTER: &str = "info,openraft=warn";

openraft::declare_raft_types!(
    /// The openraft type configuration of the metadata cluster.
    pub(crate) TypeConfig:
        D = state::ProposalBatch,
        R = Vec<schema::CommandResult>,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub(crate) type Raft = openraft::Raft<TypeConfig>;

pub use error::ApiError;
pub use files::{
    segment_chunks_for, segment_stripes_for, validate_path, ChunkRecord, CommitFile, CommittedChunk, FileChunk,
    FileRecord, InlineChunk, RepairJob, ReplicaAdded, ReplicaDrop, StageSegment, StorageNode, INLINE_CHUNK_BYTES_MAX,
    PATH_BYTES_MAX, PREPARE_GRACE_MS, SEGMENT_CHUNKS_MAX,
};
pub use jobs_service::{jobs_service, JobsApi};
pub use network::{validate_node_addr, PeerInterceptor, Peers};
pub use node::{
    AccessKeyView, Carried, ChunkPage, ChunkRef, FileCommitted, FileView, FilesInUse, LoginSession, Membership,
    MetaConfig, MetaNode, Origin, PeerTls, RaftStatus, Role, BUCKETS_LISTED_MAX, CHUNK_PAGE_CHUNKS_MAX,
    OBJECTS_LISTED_MAX,
};
pub use node::{ClaimAnswer, JobView};
pub use policy_service::{policy_service, PolicyApi};
pub use schema::{CommandError, KvUsage, Limits};
pub use service::{authenticator, request_origin, services, AuthApi, KvApi, NodeApi, S3AdminApi};
pub use state::RequestId;
pub use write_metrics::WriteMetrics;
