//! `mendfs chaos`: runs workloads against a real local cluster while a seeded schedule injects
//! faults, then removes every fault and checks what survived.
//!
//! - [`history`]: what the workloads did, operation by operation (pure data, JSON lines).
//! - [`check`]: the checkers that judge a history (pure: linearizability per key, lock
//!   exclusivity and fencing, files).

pub mod check;
pub mod history;
pub mod nemesis;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod workload;
