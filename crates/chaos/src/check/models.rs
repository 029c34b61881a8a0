//! The sequential specifications the linearizability checker replays histories against: a
//! versioned kv register (one coordination key) and a file register (one path).

use std::collections::HashSet;

use crate::check::linear::Model;
use crate::history::{Call, Operation, Outcome, Returned, Versioned};

/// One coordination key: absent, or a value with a version that every applied write raises
/// by one (the first write makes version 1). Reads, writes and compare-and-set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvRegister {
    /// Writes absent from the history may have happened between operations: a write may
    /// raise the version by more than one, a CAS may find the version it expected after a
    /// gap, and any CAS may be refused.
    allows_unseen_writes: bool,
}

impl KvRegister {
    pub fn new() -> KvRegister {
        KvRegister::default()
    }
}

impl Model for KvRegister {
    type State = Option<Versioned>;

    fn init(&self) -> Option<Versioned> {
        None
    }

    fn step(&self, state: &Option<Versioned>, call: &Call, returned: Option<&Returned>) -> Option<Option<Versioned>> {
        let current_version = state.map_or(0, |current| current.version);
        // None only past u64::MAX, which no write can reach.
        let next_version = current_version.checked_add(1);
        match (call, returned) {
            (Call::KvRead { .. }, None) => Some(*state),
            (Call::KvRead { .. }, Some(Returned::KvRead { found })) => (found == state).then_some(*state),
            (Call::KvWrite { value, .. }, None) => Some(Some(Versioned { value: *value, version: next_version? })),
            (Call::KvWrite { value, .. }, Some(Returned::KvWritten { version })) => {
                let next_version = next_version?;
                let possible =
                    if self.allows_unseen_writes { *version >= next_version } else { *version == next_version };
                possible.then_some(Some(Versioned { value: *value, version: *version }))
            }
            (Call::KvCas { expected_version, value, .. }, None) => {
                if current_version == *expected_version {
                    Some(Some(Versioned { value: *value, version: next_version? }))
                } else {
                    Some(*state)
                }
            }
            (Call::KvCas { expected_version, value, .. }, Some(Returned::KvWritten { version })) => {
                let expected_found = if self.allows_unseen_writes {
                    current_version <= *expected_version
                } else {
                    current_version == *expected_version
                };
                let possible = expected_found && expected_version.checked_add(1) == Some(*version);
                possible.then_some(Some(Versioned { value: *value, version: *version }))
            }
            (Call::KvCas { expected_version, .. }, Some(Returned::CasRefused)) => {
                // With unseen writes, one may have moved the version just before.
                (self.allows_unseen_writes || current_version != *expected_version).then_some(*state)
            }
            _ => None,
        }
    }

    fn is_read(&self, call: &Call) -> bool {
        matches!(call, Call::KvRead { .. })
    }

    fn value_written(&self, call: &Call) -> Option<String> {
        match call {
            Call::KvWrite { value, .. } | Call::KvCas { value, .. } => Some(value.to_string()),
            _ => None,
        }
    }

    fn value_read(&self, returned: &Returned) -> Option<String> {
        match returned {
            Returned::KvRead { found: Some(found) } => Some(found.value.to_string()),
            _ => None,
        }
    }

    fn merge_unread_values(&self, operations: &[Operation]) -> Vec<Call> {
        let read: HashSet<u64> = operations
            .iter()
            .filter_map(|operation| match &operation.outcome {
                Outcome::Ok { returned: Returned::KvRead { found: Some(found) } } => Some(found.value),
                _ => None,
            })
            .collect();
        // At most `read.len()` candidates are taken, so one is free.
        let stand_in = (0..=read.len() as u64).map(|k| u64::MAX - k).find(|v| !read.contains(v)).unwrap_or(u64::MAX);
        operations
            .iter()
            .map(|operation| match &operation.call {
                Call::KvWrite { key, value } if !read.contains(value) => {
                    Call::KvWrite { key: key.clone(), value: stand_in }
                }
                Call::KvCas { key, expected_version, value } if !read.contains(value) => {
                    Call::KvCas { key: key.clone(), expected_version: *expected_version, value: stand_in }
                }
                call => call.clone(),
            })
            .collect()
    }

    fn allowing_unseen_writes(&self) -> Option<KvRegister> {
        Some(KvRegister { allows_unseen_writes: true })
    }
}

/// One file path: absent, or a file whose whole content hashes to the content held. Put
/// replaces it, delete removes it, get reads it whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileRegister {
    /// Puts and deletes absent from the history may have happened between operations: a get
    /// may find nothing, and a delete may have found anything.
    allows_unseen_writes: bool,
}

impl FileRegister {
    pub fn new() -> FileRegister {
        FileRegister::default()
    }
}

impl Model for FileRegister {
    type State = Option<String>;

    fn init(&self) -> Option<String> {
        None
    }

    fn step(&self, state: &Option<String>, call: &Call, returned: Option<&Returned>) -> Option<Option<String>> {
        match (call, returned) {
            (Call::FilePut { content, .. }, None | Some(Returned::FilePut)) => Some(Some(content.clone())),
            (Call::FileGet { .. }, None) => Some(state.clone()),
            (Call::FileGet { .. }, Some(Returned::FileRead { content })) => {
                if content == state {
                    Some(state.clone())
                } else if self.allows_unseen_writes && content.is_none() {
                    // An unseen delete just before.
                    Some(None)
                } else {
                    None
                }
            }
            (Call::FileDelete { .. }, None) => Some(None),
            (Call::FileDelete { .. }, Some(Returned::FileDeleted { existed })) => {
                (self.allows_unseen_writes || *existed == state.is_some()).then_some(None)
            }
            _ => None,
        }
    }

    fn is_read(&self, call: &Call) -> bool {
        matches!(call, Call::FileGet { .. })
    }

    fn value_written(&self, call: &Call) -> Option<String> {
        match call {
            Call::FilePut { content, .. } => Some(content.clone()),
            _ => None,
        }
    }

    fn value_read(&self, returned: &Returned) -> Option<String> {
        match returned {
            Returned::FileRead { content: Some(content) } => Some(content.clone()),
            _ => None,
        }
    }

    fn merge_unread_values(&self, operations: &[Operation]) -> Vec<Call> {
        let read: HashSet<&str> = operations
            .iter()
            .filter_map(|operation| match &operation.outcome {
                Outcome::Ok { returned: Returned::FileRead { content: Some(content) } } => Some(content.as_str()),
                _ => None,
            })
            .collect();
        let stand_in = (0..=read.len())
            .map(|k| format!("unread content {k}"))
            .find(|candidate| !read.contains(candidate.as_str()))
            .unwrap_or_default();
        operations
            .iter()
            .map(|operation| match &operation.call {
                Call::FilePut { path, content } if !read.contains(content.as_str()) => {
                    Call::FilePut { path: path.clone(), content: stand_in.clone() }
                }
                call => call.clone(),
            })
            .collect()
    }

    fn allowing_unseen_writes(&self) -> Option<FileRegister> {
        Some(FileRegister { allows_unseen_writes: true })
    }
}
