//! Lock exclusivity and fencing, per lock name.
//!
//! Every hold that certainly happened (an `Ok` `LockHold`) reports when its client held the lock
//! and under which fencing token. Two holds of one lock must never overlap, and tokens must rise
//! strictly in the order the lock was acquired, so a resource guarded by the token can refuse a
//! stale holder. Failed and Unknown holds say nothing certain and are ignored.
//!
//! A hold ended by a lost session counts like any other: its client believed it held the lock
//! until `released_us`, so a newer holder before then is two clients acting as holders at once.

use std::collections::BTreeMap;

use crate::check::format::ms;
use crate::check::Violation;
use crate::history::{Call, Micros, Operation, Outcome, Returned};

pub const WORKLOAD: &str = "lock";

/// One hold as its client saw it.
struct Hold<'a> {
    operation: &'a Operation,
    token: u64,
    acquired_us: Micros,
    released_us: Micros,
}

/// Checks every `LockHold` in `operations` (other calls are ignored), lock by lock.
pub fn check_locks(operations: &[Operation]) -> Vec<Violation> {
    let mut holds_by_lock: BTreeMap<&str, Vec<Hold>> = BTreeMap::new();
    let mut violations = Vec::new();
    for operation in operations {
        let Call::LockHold { lock } = &operation.call else { continue };
        let Outcome::Ok { returned: Returned::LockHeld { token, acquired_us, released_us, .. } } = &operation.outcome
        else {
            continue;
        };
        let hold = Hold { operation, token: *token, acquired_us: *acquired_us, released_us: *released_us };
        if let Some(reason) = malformed(&hold) {
            violations.push(violation(lock, reason, &[&hold]));
            continue;
        }
        holds_by_lock.entry(lock).or_default().push(hold);
    }

    for (lock, mut holds) in holds_by_lock {
        holds.sort_by_key(|hold| (hold.acquired_us, hold.token, hold.operation.id));

        let mut highest_token: Option<&Hold> = None;
        for hold in &holds {
            if let Some(highest) = highest_token.filter(|highest| hold.token <= highest.token) {
                let message = if hold.token == highest.token {
                    format!("fencing token {} was handed out twice", hold.token)
                } else {
                    format!(
                        "fencing token went backwards: {} acquired at {} ms after {} acquired at {} ms",
                        hold.token,
                        ms(hold.acquired_us),
                        highest.token,
                        ms(highest.acquired_us)
                    )
                };
                violations.push(violation(lock, message, &[highest, hold]));
            }
            if highest_token.is_none_or(|highest| hold.token > highest.token) {
                highest_token = Some(hold);
            }
        }

        // Holds sorted by acquisition overlap exactly when one is acquired before the latest
        // release among those acquired before it. Touching at one microsecond is a handover,
        // not an overlap: both instants are read from one clock at that resolution.
        let mut latest_release: Option<&Hold> = None;
        for hold in &holds {
            if let Some(earlier) = latest_release.filter(|earlier| hold.acquired_us < earlier.released_us) {
                let message = format!(
                    "two holds overlap by {} µs: token {} held until {} ms, token {} acquired at {} ms{}",
                    earlier.released_us - hold.acquired_us,
                    earlier.token,
                    ms(earlier.released_us),
                    hold.token,
                    ms(hold.acquired_us),
                    lost_note(earlier)
                );
                violations.push(violation(lock, message, &[earlier, hold]));
            }
            if latest_release.is_none_or(|latest| hold.released_us > latest.released_us) {
                latest_release = Some(hold);
            }
        }
    }
    violations
}

fn malformed(hold: &Hold) -> Option<String> {
    let operation = hold.operation;
    if hold.released_us < hold.acquired_us {
        Some(format!(
            "malformed hold: released at {} ms, before it was acquired at {} ms",
            ms(hold.released_us),
            ms(hold.acquired_us)
        ))
    } else if hold.acquired_us < operation.invoked_us || hold.released_us > operation.completed_us {
        Some(format!(
            "malformed hold: held {}–{} ms, outside its operation's {}–{} ms",
            ms(hold.acquired_us),
            ms(hold.released_us),
            ms(operation.invoked_us),
            ms(operation.completed_us)
        ))
    } else {
        None
    }
}

fn lost_note(hold: &Hold) -> String {
    match &hold.operation.outcome {
        Outcome::Ok { returned: Returned::LockHeld { lost: Some(reason), .. } } => {
            format!(" (the first hold ended with its session lost: {reason})")
        }
        _ => String::new(),
    }
}

fn violation(lock: &str, message: String, holds: &[&Hold]) -> Violation {
    Violation {
        workload: WORKLOAD.to_string(),
        subject: lock.to_string(),
        message,
        operations: holds.iter().map(|hold| hold.operation.clone()).collect(),
    }
}
