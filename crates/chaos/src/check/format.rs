//! Operations as a human reads them in a violation: one line each, times in milliseconds.

use crate::history::{Call, Micros, Operation, Outcome, Returned};

/// Content hashes are 64 hex digits; this many tell them apart in a report.
const CONTENT_SHOWN_CHARS: usize = 16;

/// Microseconds as milliseconds with three decimals.
pub fn ms(us: Micros) -> String {
    format!("{}.{:03}", us / 1000, us % 1000)
}

/// `#id  client c  invoked → completed ms  call  →  outcome`.
pub fn operation_line(operation: &Operation) -> String {
    format!(
        "#{}  client {}  {} → {} ms  {}  →  {}",
        operation.id,
        operation.client,
        ms(operation.invoked_us),
        ms(operation.completed_us),
        call(&operation.call),
        outcome(&operation.outcome)
    )
}

pub fn call(call: &Call) -> String {
    match call {
        Call::KvRead { key } => format!("kv read {key:?}"),
        Call::KvWrite { key, value } => format!("kv write {key:?} := {value}"),
        Call::KvCas { key, expected_version, value } => {
            format!("kv cas {key:?} := {value} if version {expected_version}")
        }
        Call::FilePut { path, content } => format!("file put {path:?} content {}", short(content)),
        Call::FileGet { path } => format!("file get {path:?}"),
        Call::FileDelete { path } => format!("file delete {path:?}"),
        Call::LockHold { lock } => format!("lock hold {lock:?}"),
    }
}

pub fn outcome(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ok { returned } => format!("ok: {}", self::returned(returned)),
        Outcome::Failed { error } => format!("failed: {error}"),
        Outcome::Unknown { error } => format!("unknown: {error}"),
    }
}

fn returned(returned: &Returned) -> String {
    match returned {
        Returned::KvRead { found: None } | Returned::FileRead { content: None } => "absent".to_string(),
        Returned::KvRead { found: Some(found) } => format!("{} at version {}", found.value, found.version),
        Returned::KvWritten { version } => format!("version {version}"),
        Returned::CasRefused => "refused (version differs)".to_string(),
        Returned::FilePut => "put".to_string(),
        Returned::FileRead { content: Some(content) } => format!("content {}", short(content)),
        Returned::FileDeleted { existed: true } => "deleted".to_string(),
        Returned::FileDeleted { existed: false } => "nothing to delete".to_string(),
        Returned::ObjectDeleted => "deleted (if there was one)".to_string(),
        Returned::LockHeld { token, acquired_us, released_us, lost } => {
            let lost = lost.as_ref().map(|reason| format!(", lost: {reason}")).unwrap_or_default();
            format!("token {token} held {} → {} ms{lost}", ms(*acquired_us), ms(*released_us))
        }
    }
}

fn short(content: &str) -> String {
    match content.char_indices().nth(CONTENT_SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", &content[..cut]),
        None => content.to_string(),
    }
}
