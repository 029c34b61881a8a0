//! Checkers that judge a chaos history (pure: no I/O).
//!
//! [`check_history`] first checks that the history itself is well formed (an operation that
//! completed before it was invoked, a result that does not fit its call, a client running two
//! operations at once: the recorder is wrong, not the cluster, and it says so as a violation of
//! workload `"history"`). It then judges each workload on its own:
//! - kv: every coordination key must be linearizable against [`KvRegister`];
//! - files: every path must be linearizable against [`FileRegister`];
//! - locks: holds of one lock never overlap and fencing tokens rise ([`lock`]).
//!
//! A register whose search runs out of budget is reported inconclusive, never passed. Each
//! linearizability violation comes with a small sub-history that still shows it ([`linear::shrink`]).

pub mod format;
pub mod linear;
pub mod lock;
pub mod models;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

pub use linear::{check, find_local_violation, shrink, Judgement, Model, Verdict, Witness};
pub use lock::check_locks;
pub use models::{FileRegister, KvRegister, KvState};

use crate::history::{Call, Operation, Outcome, Returned};

/// The kv workload's name in reports.
pub const KV: &str = "kv";
/// The files workload's name in reports.
pub const FILES: &str = "files";
/// The s3 workload: objects, checked with the files model.
pub const S3: &str = "s3";
/// The locks workload's name in reports.
pub const LOCKS: &str = lock::WORKLOAD;
/// Violations of the history's own rules (a recorder bug, not a cluster bug).
pub const HISTORY: &str = "history";

/// Budgets that keep a check bounded whatever the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckOptions {
    /// Steps one register's linearizability search may take before the register is reported
    /// inconclusive (a step visits one invocation or completion, and costs at most one model
    /// step). Its time and memory grow with its steps: tens of bytes each, at most.
    pub search_steps_max: u64,
    /// Search steps, over all the searches it runs, that finding a small sub-history that
    /// shows one violation may take (and, for a register the search could not decide, looking
    /// for a violation in windows of its history).
    pub witness_steps_max: u64,
    /// Violations reported per workload and subject; the rest are only counted.
    pub violations_per_subject_max: usize,
}

impl Default for CheckOptions {
    fn default() -> CheckOptions {
        CheckOptions { search_steps_max: 10_000_000, witness_steps_max: 2_000_000, violations_per_subject_max: 10 }
    }
}

/// What a check found, as `report.json` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// One per workload (kv, files, locks), even when it ran no operation.
    pub workloads: Vec<WorkloadSummary>,
    pub violations: Vec<Violation>,
    /// Violations past `violations_per_subject_max`, counted but not listed.
    pub violations_omitted: u64,
    /// Registers the search could not decide in budget, one sentence each.
    pub inconclusive: Vec<String>,
}

impl CheckReport {
    /// No violation and nothing left undecided.
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.violations_omitted == 0 && self.inconclusive.is_empty()
    }
}

/// How many operations of one workload ended each way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSummary {
    pub workload: String,
    /// Keys, paths or locks the workload touched.
    pub n_subjects: u64,
    pub n_ok: u64,
    pub n_failed: u64,
    pub n_unknown: u64,
}

/// One thing the history shows went wrong, with the operations that show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// `kv`, `files`, `locks` or `history`.
    pub workload: String,
    /// The key, path or lock, or for `history` the client or operation.
    pub subject: String,
    pub message: String,
    /// A small sub-history that shows it, in invocation order.
    pub operations: Vec<Operation>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "[{}] {}: {}", self.workload, self.subject, self.message)?;
        for operation in &self.operations {
            writeln!(f, "    {}", format::operation_line(operation))?;
        }
        Ok(())
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for summary in &self.workloads {
            writeln!(
                f,
                "{}: {} subjects, {} ok, {} failed, {} unknown",
                summary.workload, summary.n_subjects, summary.n_ok, summary.n_failed, summary.n_unknown
            )?;
        }
        let verdict = if self.passed() { "passed" } else { "FAILED" };
        writeln!(
            f,
            "{verdict}: {} violations ({} more not listed), {} inconclusive",
            self.violations.len(),
            self.violations_omitted,
            self.inconclusive.len()
        )?;
        for violation in &self.violations {
            write!(f, "{violation}")?;
        }
        for undecided in &self.inconclusive {
            writeln!(f, "inconclusive: {undecided}")?;
        }
        Ok(())
    }
}

/// Judges a whole history: see the module documentation.
pub fn check_history(operations: &[Operation], options: &CheckOptions) -> CheckReport {
    let mut violations = Vec::new();
    let checkable = well_formed(operations, &mut violations);

    let mut kv_keys: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    let mut file_paths: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    let mut objects: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    let mut lock_holds: Vec<Operation> = Vec::new();
    for operation in &checkable {
        let subject = operation.call.subject();
        match workload_of(&operation.call) {
            KV => kv_keys.entry(subject).or_default().push((*operation).clone()),
            FILES => file_paths.entry(subject).or_default().push((*operation).clone()),
            S3 => objects.entry(subject).or_default().push((*operation).clone()),
            _ => lock_holds.push((*operation).clone()),
        }
    }

    let mut inconclusive = Vec::new();
    for (key, history) in &kv_keys {
        let register = Register { workload: KV, noun: "key", subject: key, history };
        register.check(&KvRegister::new(), options, &mut violations, &mut inconclusive);
    }
    for (path, history) in &file_paths {
        let register = Register { workload: FILES, noun: "path", subject: path, history };
        register.check(&FileRegister::new(), options, &mut violations, &mut inconclusive);
    }
    for (object, history) in &objects {
        let register = Register { workload: S3, noun: "object", subject: object, history };
        register.check(&FileRegister::new(), options, &mut violations, &mut inconclusive);
    }
    violations.extend(lock::check_locks(&lock_holds));

    let (violations, violations_omitted) = cap_per_subject(violations, options.violations_per_subject_max);
    CheckReport { workloads: summaries(operations), violations, violations_omitted, inconclusive }
}

/// One register's history and how reports name it.
struct Register<'a> {
    workload: &'static str,
    noun: &'static str,
    subject: &'a str,
    history: &'a [Operation],
}

impl Register<'_> {
    fn check<M: Model>(
        &self,
        model: &M,
        options: &CheckOptions,
        violations: &mut Vec<Violation>,
        inconclusive: &mut Vec<String>,
    ) {
        let judgement = linear::check(model, self.history, options.search_steps_max);
        match judgement.verdict {
            Verdict::Linearizable => {}
            Verdict::Violated { culprit } => {
                let witness = linear::shrink(model, self.history, culprit, options.witness_steps_max);
                violations.push(self.violation(&witness, ""));
            }
            Verdict::Inconclusive => {
                if let Some(witness) = linear::find_local_violation(model, self.history, options.witness_steps_max) {
                    let note = " (found in a window of the history: the whole was too long to search)";
                    violations.push(self.violation(&witness, note));
                    return;
                }
                inconclusive.push(format!(
                    "{} {} {:?}: the linearizability search gave up after {} steps on {} operations \
                 (raise search_steps_max, or spread the workload over more {}s)",
                    self.workload,
                    self.noun,
                    self.subject,
                    judgement.steps,
                    self.history.len(),
                    self.noun
                ));
            }
        }
    }

    fn violation(&self, witness: &Witness, note: &str) -> Violation {
        let culprit = &self.history[witness.culprit];
        let shown = witness.operations.len();
        let mut message = format!(
            "not linearizable: no order of the operations on this {} consistent with their real times \
             explains #{} ({} → {}). ",
            self.noun,
            culprit.id,
            format::call(&culprit.call),
            format::outcome(&culprit.outcome)
        );
        if !witness.verified {
            message.push_str(&format!(
                "Shrinking ran out of budget: shown are {shown} of the {} operations, those around #{} where the \
                 search got stuck.",
                self.history.len(),
                culprit.id
            ));
        } else {
            let reading = if witness.stands_alone {
                "fail even if writes not shown happened between them"
            } else {
                "fail as if they were the only operations on it"
            };
            message.push_str(&format!("These {shown} of its {} operations {reading}", self.history.len()));
            message.push_str(if witness.minimal { "" } else { " (shrinking ran out of budget: not minimal)" });
            message.push_str(note);
            message.push('.');
        }
        Violation {
            workload: self.workload.to_string(),
            subject: self.subject.to_string(),
            message,
            operations: witness.operations.iter().map(|&i| self.history[i].clone()).collect(),
        }
    }
}

pub fn workload_of(call: &Call) -> &'static str {
    match call {
        Call::KvRead { .. } | Call::KvWrite { .. } | Call::KvCas { .. } => KV,
        _ if call.is_s3() => S3,
        Call::FilePut { .. } | Call::FileGet { .. } | Call::FileDelete { .. } => FILES,
        Call::LockHold { .. } => LOCKS,
    }
}

/// Reports what breaks the history's own rules and returns the operations fit to be judged:
/// all but those that completed before they were invoked or returned what their call cannot.
fn well_formed<'a>(operations: &'a [Operation], violations: &mut Vec<Violation>) -> Vec<&'a Operation> {
    let malformed = |operation: &Operation, message: String| Violation {
        workload: HISTORY.to_string(),
        subject: format!("op #{}", operation.id),
        message,
        operations: vec![operation.clone()],
    };
    let mut checkable = Vec::with_capacity(operations.len());
    let mut first_with_id: HashMap<u64, &Operation> = HashMap::new();
    for operation in operations {
        if let Some(first) = first_with_id.insert(operation.id, operation) {
            violations.push(Violation {
                workload: HISTORY.to_string(),
                subject: format!("op #{}", operation.id),
                message: "two operations share one id".to_string(),
                operations: vec![first.clone(), operation.clone()],
            });
        }
        if operation.completed_us < operation.invoked_us {
            violations
                .push(malformed(operation, "completed before it was invoked; left out of the checks".to_string()));
        } else if matches!(&operation.outcome, Outcome::Ok { returned } if !returned_fits(&operation.call, returned)) {
            violations.push(malformed(operation, "returned what its call cannot; left out of the checks".to_string()));
        } else {
            checkable.push(operation);
        }
    }

    // A client runs one operation at a time; the runner's clock and bookkeeping depend on it.
    let mut by_client: BTreeMap<u64, Vec<&Operation>> = BTreeMap::new();
    for operation in &checkable {
        by_client.entry(operation.client).or_default().push(operation);
    }
    for (client, mut own) in by_client {
        own.sort_by_key(|operation| (operation.invoked_us, operation.id));
        for pair in own.windows(2) {
            let (earlier, later) = (pair[0], pair[1]);
            if later.invoked_us < earlier.completed_us {
                violations.push(Violation {
                    workload: HISTORY.to_string(),
                    subject: format!("client {client}"),
                    message: format!(
                        "client ran two operations at once: #{} was invoked {} µs before #{} completed",
                        later.id,
                        earlier.completed_us - later.invoked_us,
                        earlier.id
                    ),
                    operations: vec![earlier.clone(), later.clone()],
                });
            }
        }
    }
    checkable
}

fn returned_fits(call: &Call, returned: &Returned) -> bool {
    matches!(
        (call, returned),
        (Call::KvRead { .. }, Returned::KvRead { .. })
            | (Call::KvWrite { .. }, Returned::KvWritten { .. })
            | (Call::KvCas { .. }, Returned::KvWritten { .. } | Returned::CasRefused)
            | (Call::FilePut { .. }, Returned::FilePut)
            | (Call::FileGet { .. }, Returned::FileRead { .. })
            | (Call::FileDelete { .. }, Returned::FileDeleted { .. } | Returned::ObjectDeleted)
            | (Call::LockHold { .. }, Returned::LockHeld { .. })
    )
}

fn summaries(operations: &[Operation]) -> Vec<WorkloadSummary> {
    [KV, FILES, S3, LOCKS]
        .into_iter()
        .map(|workload| {
            let own = operations.iter().filter(|operation| workload_of(&operation.call) == workload);
            let mut subjects = std::collections::BTreeSet::new();
            let mut summary =
                WorkloadSummary { workload: workload.to_string(), n_subjects: 0, n_ok: 0, n_failed: 0, n_unknown: 0 };
            for operation in own {
                subjects.insert(operation.call.subject());
                match operation.outcome {
                    Outcome::Ok { .. } => summary.n_ok += 1,
                    Outcome::Failed { .. } => summary.n_failed += 1,
                    Outcome::Unknown { .. } => summary.n_unknown += 1,
                }
            }
            summary.n_subjects = subjects.len() as u64;
            summary
        })
        .collect()
}

/// Keeps the first `per_subject_max` violations of each workload and subject; counts the rest.
fn cap_per_subject(violations: Vec<Violation>, per_subject_max: usize) -> (Vec<Violation>, u64) {
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut kept = Vec::new();
    let mut omitted = 0;
    for violation in violations {
        let count = seen.entry((violation.workload.clone(), violation.subject.clone())).or_default();
        *count += 1;
        if *count <= per_subject_max {
            kept.push(violation);
        } else {
            omitted += 1;
        }
    }
    (kept, omitted)
}
