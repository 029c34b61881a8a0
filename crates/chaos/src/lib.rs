//! `mendfs chaos`: runs workloads against a real local cluster while a seeded schedule injects
//! faults, then removes every fault and checks what survived.
//!
//! - [`history`]: what the workloads did, operation by operation (pure data, JSON lines).
//! - [`check`]: the checkers that judge a history (pure: linearizability per key, lock
//!   exclusivity and fencing, files).
//! - [`s3_client`]: the SigV4 S3 client the s3 workload (and `mendfs bench s3`) speaks with.

pub mod check;
pub mod history;
pub mod nemesis;
pub mod report;
pub mod runner;
pub mod s3_client;
pub mod schedule;
pub mod workload;
