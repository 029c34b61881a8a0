//! A chaos run's history: every operation a workload client invoked, when, and how it ended.
//!
//! Times are microseconds since the run started, all read from one monotonic clock in the one
//! process that runs every workload client, so they compare across clients. An operation's
//! real effect happened at some instant between its `invoked_us` and its `completed_us` (when
//! it took effect at all): that interval is what a linearizability checker works with.
//!
//! Pure data: no I/O. `history.jsonl` holds one [`Operation`] per line, as serde writes it.

use serde::{Deserialize, Serialize};

/// Microseconds since the run started.
pub type Micros = u64;

/// One operation of one workload client. A client runs one operation at a time, so a
/// client's operations never overlap each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// Unique in the run, in invocation order.
    pub id: u64,
    /// The workload client that ran it.
    pub client: u64,
    pub invoked_us: Micros,
    /// When the client saw the outcome; for [`Outcome::Unknown`], when it stopped waiting.
    pub completed_us: Micros,
    pub call: Call,
    pub outcome: Outcome,
}

/// Subjects of the s3 workload's objects start with this (`s3://BUCKET/KEY`); the file
/// calls stand for their S3 counterparts (PUT, GET, DELETE), which promise the same.
pub const S3_SUBJECT_PREFIX: &str = "s3://";

/// What the client asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    /// A linearizable read of a coordination key.
    KvRead { key: String },
    /// An unconditional write of `value` (unique in the run) to a coordination key.
    KvWrite { key: String, value: u64 },
    /// A write of `value` that applies only if the key's version is `expected_version`
    /// (0: the key must not exist).
    KvCas { key: String, expected_version: u64, value: u64 },
    /// Put a file whose whole content hashes to `content` (BLAKE3, hex).
    FilePut { path: String, content: String },
    /// Read a file whole, verified end to end.
    FileGet { path: String },
    /// Delete a file.
    FileDelete { path: String },
    /// Acquire the lock `lock`, hold it a while, release it.
    LockHold { lock: String },
}

impl Call {
    /// The register the call reads or writes (a kv key, a file path, a lock name).
    pub fn subject(&self) -> &str {
        match self {
            Call::KvRead { key } | Call::KvWrite { key, .. } | Call::KvCas { key, .. } => key,
            Call::FilePut { path, .. } | Call::FileGet { path } | Call::FileDelete { path } => path,
            Call::LockHold { lock } => lock,
        }
    }

    /// Whether the call is the s3 workload's (an object, not a file).
    pub fn is_s3(&self) -> bool {
        matches!(self, Call::FilePut { .. } | Call::FileGet { .. } | Call::FileDelete { .. })
            && self.subject().starts_with(S3_SUBJECT_PREFIX)
    }
}

/// How an operation ended, as far as its client can know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// It took effect and returned this.
    Ok { returned: Returned },
    /// It certainly did not take effect (refused before anything was proposed, say).
    Failed { error: String },
    /// It may or may not have taken effect (a timeout, a lost connection after sending).
    Unknown { error: String },
}

/// What a successful operation returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "returned", rename_all = "snake_case")]
pub enum Returned {
    /// `KvRead`: the key's value and version, or None when it does not exist.
    KvRead { found: Option<Versioned> },
    /// `KvWrite`, or a `KvCas` that applied: the key's version after the write.
    KvWritten { version: u64 },
    /// `KvCas` refused: the key's version was not the expected one.
    CasRefused,
    /// `FilePut` committed.
    FilePut,
    /// `FileGet`: the BLAKE3 (hex) of the bytes read, or None when the file does not exist.
    /// A read whose bytes fail verification is not `Ok`.
    FileRead { content: Option<String> },
    /// `FileDelete`: whether there was a file to delete.
    FileDeleted { existed: bool },
    /// `FileDelete` of an S3 object: done, and S3 does not say whether there was one.
    ObjectDeleted,
    /// `LockHold`: the lock was held with fencing token `token` from `acquired_us` (when
    /// the acquire returned) until `released_us` (when the client started to release it, or
    /// learned that its session was lost, whichever came first). `lost` says why a hold ended
    /// early.
    LockHeld { token: u64, acquired_us: Micros, released_us: Micros, lost: Option<String> },
}

/// A coordination key's value and version as a read saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Versioned {
    pub value: u64,
    pub version: u64,
}

/// Encodes a history as JSON lines.
pub fn to_jsonl(operations: &[Operation]) -> String {
    let mut out = String::new();
    for operation in operations {
        // Serializing these plain types cannot fail.
        out.push_str(&serde_json::to_string(operation).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// Decodes JSON lines written by [`to_jsonl`]; names the first line that does not decode.
pub fn from_jsonl(text: &str) -> Result<Vec<Operation>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| serde_json::from_str(line).map_err(|e| format!("history line {}: {e}", n + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_round_trips_through_json_lines() {
        let history = vec![
            Operation {
                id: 0,
                client: 1,
                invoked_us: 10,
                completed_us: 20,
                call: Call::KvCas { key: "k".into(), expected_version: 3, value: 7 },
                outcome: Outcome::Ok { returned: Returned::KvWritten { version: 4 } },
            },
            Operation {
                id: 1,
                client: 2,
                invoked_us: 15,
                completed_us: 900,
                call: Call::FileGet { path: "/a".into() },
                outcome: Outcome::Unknown { error: "deadline".into() },
            },
        ];
        assert_eq!(from_jsonl(&to_jsonl(&history)), Ok(history));
        assert!(from_jsonl("{\"id\": 1}\n").unwrap_err().starts_with("history line 1"));
    }
}
