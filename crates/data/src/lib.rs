//! The MendFS data plane, on top of the metadata cluster.
//!
//! - `chunk_service`: each node's chunks ([`chunk_service::LocalChunks`]) behind the `Storage`
//!   gRPC service; prepared chunks are protected from garbage collection for the write's grace
//!   period.
//! - `coordinator`: the `Files` service. Any node coordinates a write: it cuts the upload into
//!   chunks, prepares each on its replicas (fsynced there), stages a big file's chunk list in
//!   bounded segments, and only then commits the file's metadata through Raft. Reads page
//!   through the chunk list, fetch chunks from recorded replicas, verify their hash, and fall
//!   back to the next replica on any error.
//! - `gc`: each storage node deletes copies that no committed file lists on it, after asking
//!   the leader and only past the grace period.
//! - `heartbeat`: every node reports its health to the leader once per interval.
//! - `healer`: on the leader, the failure detector and checkpointed, throttled repair, and the
//!   leader's health view that `cluster status` shows.
//! - `cluster_service`: the `Cluster` admin service: status built on the leader from the
//!   metadata's membership and the healer's view, membership changes and drains.
//! - `chunk_work`: the data plane's blocking work (chunk file I/O, erasure coding) on a
//!   bounded number of threads.
//! - `scrub`: every storage node re-hashes its copies and reports the bad and the missing.
//! - `registration`: a storage node announces itself to the metadata until it is recorded.
//!
//! Architecture invariant: the data plane knows nothing about Raft. It reads and changes the
//! metadata only through `mendfs_meta::MetaNode`'s typed methods.

mod buffer_pool;
pub mod chunk_service;
pub mod chunk_work;
pub mod cluster_service;
pub mod coordinator;
pub mod gc;
pub mod healer;
pub mod heartbeat;
mod read_budget;
pub use read_budget::ReadBudgetUsage;
pub mod registration;
pub mod scrub;

use std::time::Duration;

/// Data-plane settings of a node.
#[derive(Debug, Clone)]
pub struct DataConfig {
    pub chunk_size_bytes: usize,
    pub replication_factor: usize,
    /// How long prepared chunks are protected from collection, and so how long a write may
    /// take between a segment's first prepare and the entry that lists it (its staging, or the
    /// commit); also how long a big upload lives without a new segment. The same on every node.
    pub orphan_grace: Duration,
    /// How often a storage node looks for orphaned copies.
    pub gc_interval: Duration,
    pub zone: String,
    pub weight: u32,
    /// Longest wait for one chunk RPC to one replica (prepare or read) before the coordinator
    /// counts that replica failed and tries the next.
    pub chunk_rpc_timeout: Duration,
    /// Chunk bytes this node holds for replicas at once as a coordinator, across every upload
    /// it serves: for replicated puts, bytes received that some replica's stream has not yet
    /// taken (each upload also holds at most one client message while it waits for this, and
    /// each remote replica's stream one 256 KiB slice beside its HTTP/2 window); for
    /// erasure-coded puts, whole chunks being encoded and sent (each upload also holds the one
    /// chunk it is filling). A budget of the same size, apart, bounds what readers fetch ahead;
    /// each reader also holds the chunk it is due to send.
    pub max_inflight_bytes: usize,
    /// Content up to this size is written inline: it travels in the commit and is kept in
    /// the metadata, replicated by Raft, instead of being prepared on storage nodes (0: never).
    /// At most `mendfs_meta::INLINE_CHUNK_BYTES_MAX`; content larger than a chunk is never
    /// inline.
    pub inline_max_bytes: usize,
    /// An erasure-coded put when fewer than K + M storage nodes accept data: replicate it
    /// instead and say so in the reply (true), or refuse it (false, the default).
    pub ec_fallback_replicate: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            chunk_size_bytes: 4 << 20,
            replication_factor: 3,
            orphan_grace: Duration::from_millis(mendfs_meta::PREPARE_GRACE_MS),
            gc_interval: Duration::from_secs(60),
            zone: "default".into(),
            weight: 100,
            chunk_rpc_timeout: Duration::from_secs(30),
            max_inflight_bytes: 32 << 20,
            inline_max_bytes: 16 << 10,
            ec_fallback_replicate: false,
        }
    }
}

/// A registered storage node as the planner sees it: its committed liveness and admin state.
pub fn node_state(node: &mendfs_meta::StorageNode) -> mendfs_heal::planner::NodeState {
    mendfs_heal::planner::NodeState {
        id: node.id,
        zone: node.zone.clone(),
        weight: node.weight,
        liveness: node.liveness,
        draining: node.draining,
    }
}

/// The largest chunk any node accepts: the chunk size setting may differ between nodes, so
/// storage accepts up to this and coordinators cut at their own setting.
pub const CHUNK_BYTES_MAX: usize = 64 << 20;
