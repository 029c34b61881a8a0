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

/// A key as [`KvRegister`] holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct KvState {
    /// None while the key does not exist.
    pub current: Option<Versioned>,
    /// The version is only a lower bound: with unseen writes, any number of them may have
    /// happened just before the Unknown write that set the value. The next operation that
    /// returns a version settles it.
    pub version_at_least: bool,
    /// The value is one an unseen write wrote, which no read can return.
    pub value_unseen: bool,
}

impl KvRegister {
    pub fn new() -> KvRegister {
        KvRegister::default()
    }
}

impl Model for KvRegister {
    type State = KvState;

    fn init(&self) -> KvState {
        KvState::default()
    }

    fn step(&self, state: &KvState, call: &Call, returned: Option<&Returned>) -> Option<KvState> {
        let version = state.current.map_or(0, |current| current.version);
        let known = |value: u64, version: u64| KvState {
            current: Some(Versioned { value, version }),
            version_at_least: false,
            value_unseen: false,
        };
        match (call, returned) {
            (Call::KvRead { .. }, None) => Some(*state),
            (Call::KvRead { .. }, Some(Returned::KvRead { found })) => match (found, state.current) {
                (None, None) => Some(*state),
                (Some(found), Some(current)) => {
                    let value_fits = found.value == current.value && !state.value_unseen;
                    let version_fits = found.version == current.version
                        || (state.version_at_least && found.version >= current.version);
                    (value_fits && version_fits).then(|| known(found.value, found.version))
                }
                _ => None,
            },
            (Call::KvWrite { value, .. }, None) => Some(KvState {
                current: Some(Versioned { value: *value, version: version.checked_add(1)? }),
                version_at_least: self.allows_unseen_writes,
                value_unseen: false,
            }),
            (Call::KvWrite { value, .. }, Some(Returned::KvWritten { version: written })) => {
                let possible = if self.allows_unseen_writes {
                    *written > version
                } else {
                    version.checked_add(1) == Some(*written)
                };
                possible.then(|| known(*value, *written))
            }
            (Call::KvCas { expected_version, value, .. }, None) => {
                // With unseen writes it may also have been refused: that is the same as
                // leaving it unplaced.
                let applies =
                    if self.allows_unseen_writes { version <= *expected_version } else { version == *expected_version };
                if applies {
                    Some(known(*value, expected_version.checked_add(1)?))
                } else {
                    Some(*state)
                }
            }
            (Call::KvCas { expected_version, value, .. }, Some(Returned::KvWritten { version: written })) => {
                let expected_found =
                    if self.allows_unseen_writes { version <= *expected_version } else { version == *expected_version };
                let possible = expected_found && expected_version.checked_add(1) == Some(*written);
                possible.then(|| known(*value, *written))
            }
            (Call::KvCas { expected_version, .. }, Some(Returned::CasRefused)) => {
                if version != *expected_version || state.version_at_least {
                    // Refused as it should be; or, above a lower bound, possibly so (keeping
                    // the state is the more lenient of the two readings).
                    Some(*state)
                } else if self.allows_unseen_writes {
                    // Only an unseen write just before explains it: it moved the version on
                    // and left a value no read can return.
                    Some(KvState {
                        current: Some(Versioned { value: 0, version: expected_version.checked_add(1)? }),
                        version_at_least: true,
                        value_unseen: true,
                    })
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    fn is_read(&self, call: &Call) -> bool {
        matches!(call, Call::KvRead { .. })
    }

    fn can_no_longer_apply(&self, state: &KvState, call: &Call) -> bool {
        // Versions never go back, not even a lower bound.
        let version = state.current.map_or(0, |current| current.version);
        matches!(call, Call::KvCas { expected_version, .. } if *expected_version < version)
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
            (Call::FileDelete { .. }, Some(Returned::ObjectDeleted)) => Some(None),
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
