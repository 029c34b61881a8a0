//! How MendFS finds faults and decides repairs, free of I/O and clocks: callers pass the time
//! and the cluster's state in, and get decisions out, so tests can feed synthetic histories and
//! assert exact outcomes.
//!
//! - `detector`: phi-accrual failure detection over heartbeat arrivals, plus health thresholds,
//!   giving each node a liveness (`up`, `suspect`, `down`, `degraded`).
//! - `planner`: from a chunk's recorded replicas and the nodes' states, the copies that restore
//!   its redundancy and the replicas that may be dropped (down, drained, or surplus).
//! - `repair`: one scan's summary and its most urgent copies, the checkpointed repair job's
//!   transitions, and the throttle that paces copies.
//! - `stripe`: the same for erasure-coded chunks: which shards of a stripe to rebuild from K
//!   others, which to move, which records may go.
//! - `timeline`: what the leader's detection ticks saw change, as events for people (node 2
//!   suspect, down, repair started, full redundancy again).

pub mod detector;
pub mod planner;
pub mod repair;
pub mod stripe;
pub mod timeline;

pub use mendfs_types::NodeId;
