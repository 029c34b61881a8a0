//! Known-bad histories that must fail and known-good tricky ones that must pass: the checker is
//! checked. Times are microseconds; every helper takes (id, client, invoked, completed).

use super::*;
use crate::history::{Micros, Versioned};

fn op(id: u64, client: u64, invoked_us: Micros, completed_us: Micros, call: Call, outcome: Outcome) -> Operation {
    Operation { id, client, invoked_us, completed_us, call, outcome }
}

fn ok(returned: Returned) -> Outcome {
    Outcome::Ok { returned }
}

fn unknown() -> Outcome {
    Outcome::Unknown { error: "deadline exceeded".into() }
}

fn failed() -> Outcome {
    Outcome::Failed { error: "not leader".into() }
}

fn write(id: u64, client: u64, (invoked, completed): (Micros, Micros), value: u64, version: u64) -> Operation {
    let call = Call::KvWrite { key: "k".into(), value };
    op(id, client, invoked, completed, call, ok(Returned::KvWritten { version }))
}

fn write_unknown(id: u64, client: u64, (invoked, completed): (Micros, Micros), value: u64) -> Operation {
    op(id, client, invoked, completed, Call::KvWrite { key: "k".into(), value }, unknown())
}

fn cas(
    id: u64,
    client: u64,
    times: (Micros, Micros),
    expected_version: u64,
    value: u64,
    returned: Returned,
) -> Operation {
    let call = Call::KvCas { key: "k".into(), expected_version, value };
    op(id, client, times.0, times.1, call, ok(returned))
}

fn read(id: u64, client: u64, (invoked, completed): (Micros, Micros), found: Option<(u64, u64)>) -> Operation {
    let found = found.map(|(value, version)| Versioned { value, version });
    op(id, client, invoked, completed, Call::KvRead { key: "k".into() }, ok(Returned::KvRead { found }))
}

fn put(id: u64, client: u64, (invoked, completed): (Micros, Micros), content: &str, outcome: Outcome) -> Operation {
    op(id, client, invoked, completed, Call::FilePut { path: "/f".into(), content: content.into() }, outcome)
}

fn get(id: u64, client: u64, (invoked, completed): (Micros, Micros), content: Option<&str>) -> Operation {
    let returned = Returned::FileRead { content: content.map(String::from) };
    op(id, client, invoked, completed, Call::FileGet { path: "/f".into() }, ok(returned))
}

fn delete(id: u64, client: u64, (invoked, completed): (Micros, Micros), outcome: Outcome) -> Operation {
    op(id, client, invoked, completed, Call::FileDelete { path: "/f".into() }, outcome)
}

fn hold(id: u64, client: u64, token: u64, acquired_us: Micros, released_us: Micros) -> Operation {
    let returned = Returned::LockHeld { token, acquired_us, released_us, lost: None };
    op(id, client, acquired_us.saturating_sub(5), released_us + 5, Call::LockHold { lock: "l".into() }, ok(returned))
}

fn check_all(history: &[Operation]) -> CheckReport {
    check_history(history, &CheckOptions::default())
}

fn assert_passes(history: &[Operation]) {
    let report = check_all(history);
    assert!(report.passed(), "expected to pass:\n{report}");
}

/// Asserts the history shows exactly one violation, of `workload`, whose sub-history is itself
/// a violation of that workload; returns it.
fn assert_violation(history: &[Operation], workload: &str) -> Violation {
    let report = check_all(history);
    assert_eq!(report.violations.len(), 1, "expected one violation:\n{report}");
    assert!(report.inconclusive.is_empty(), "{report}");
    let violation = report.violations[0].clone();
    assert_eq!(violation.workload, workload, "{report}");
    let again = check_all(&violation.operations);
    assert!(
        again.violations.iter().any(|found| found.workload == workload),
        "the sub-history shown must itself be a violation:\n{violation}"
    );
    violation
}

fn ids(violation: &Violation) -> Vec<u64> {
    violation.operations.iter().map(|operation| operation.id).collect()
}

// ---- kv: must fail ----

#[test]
fn a_read_invoked_after_a_write_completed_must_not_return_the_older_value() {
    let history = [
        write(0, 1, (0, 10), 1, 1),
        read(1, 3, (12, 15), Some((1, 1))),
        write(2, 2, (20, 30), 2, 2),
        read(3, 3, (15, 18), Some((1, 1))),
        read(4, 3, (40, 50), Some((1, 1))),
    ];
    let violation = assert_violation(&history, KV);
    assert_eq!(ids(&violation), [0, 2, 4], "{violation}");
    assert!(violation.message.contains("#4"), "{violation}");
    assert!(violation.message.contains("even if writes not shown happened"), "{violation}");
}

#[test]
fn an_acknowledged_write_must_not_be_lost() {
    let history = [
        write(0, 1, (0, 10), 1, 1),
        write(1, 2, (20, 30), 2, 2),
        read(2, 2, (40, 50), Some((2, 2))),
        read(3, 1, (60, 70), None),
    ];
    let violation = assert_violation(&history, KV);
    assert!(violation.operations.len() <= 2, "{violation}");
}

#[test]
fn two_cas_expecting_the_same_version_must_not_both_apply() {
    let history = [
        write(0, 1, (0, 10), 1, 1),
        cas(1, 2, (20, 40), 1, 2, Returned::KvWritten { version: 2 }),
        cas(2, 3, (25, 45), 1, 3, Returned::KvWritten { version: 2 }),
    ];
    let violation = assert_violation(&history, KV);
    assert!(violation.operations.len() <= 3, "{violation}");
}

#[test]
fn a_read_must_not_return_a_value_never_written() {
    let history = [write(0, 1, (0, 10), 1, 1), read(1, 2, (20, 30), Some((99, 1)))];
    let violation = assert_violation(&history, KV);
    assert_eq!(ids(&violation), [1], "{violation}");
}

#[test]
fn a_read_must_not_see_a_failed_write() {
    let failed_write = op(0, 1, 0, 10, Call::KvWrite { key: "k".into(), value: 1 }, failed());
    assert_violation(&[failed_write, read(1, 2, (20, 30), Some((1, 1)))], KV);
}

#[test]
fn versions_seen_by_reads_must_not_go_backwards() {
    let history = [
        write(0, 1, (0, 10), 1, 1),
        write(1, 1, (20, 30), 2, 2),
        read(2, 2, (5, 35), Some((2, 2))),
        read(3, 2, (40, 50), Some((1, 1))),
    ];
    assert_violation(&history, KV);
}

#[test]
fn versions_returned_by_writes_must_not_go_backwards() {
    let history = [write(0, 1, (0, 10), 1, 1), write(1, 2, (20, 30), 2, 2), write(2, 1, (40, 50), 3, 2)];
    let violation = assert_violation(&history, KV);
    assert!(violation.operations.len() <= 3, "{violation}");
}

#[test]
fn once_a_read_saw_the_new_value_a_later_read_must_not_see_the_old() {
    let history = [
        write(0, 1, (0, 10), 1, 1),
        write(1, 1, (20, 100), 2, 2),
        read(2, 2, (30, 40), Some((2, 2))),
        read(3, 3, (50, 60), Some((1, 1))),
    ];
    let violation = assert_violation(&history, KV);
    assert_eq!(ids(&violation), [0, 1, 2, 3], "{violation}");
}

#[test]
fn a_cas_must_not_be_refused_when_nothing_else_wrote() {
    let history = [write(0, 1, (0, 10), 1, 1), cas(1, 2, (20, 30), 1, 2, Returned::CasRefused)];
    let violation = assert_violation(&history, KV);
    // Without every write, a refusal proves nothing: the sub-history is read as the whole.
    assert!(violation.message.contains("only operations"), "{violation}");
    assert_eq!(ids(&violation), [0, 1], "{violation}");
}

#[test]
fn a_cas_refused_at_the_current_version_shows_with_the_writes_around_it() {
    let mut history: Vec<Operation> = (0..50).map(|n| write(n, 1, (n * 100, n * 100 + 10), n, n + 1)).collect();
    history.push(cas(50, 2, (5_020, 5_030), 50, 999, Returned::CasRefused));
    history.push(write(51, 1, (5_040, 5_050), 51, 51));
    let violation = assert_violation(&history, KV);
    // An unseen write would explain the refusal, but then the next write would be version 52.
    assert_eq!(ids(&violation), [49, 50, 51], "{violation}");
    assert!(violation.message.contains("even if writes not shown happened"), "{violation}");
}

// ---- kv: must pass ----

#[test]
fn concurrent_writes_may_take_effect_in_either_order() {
    for (first, second) in [(1, 2), (2, 1)] {
        let last_value = if second == 2 { 2 } else { 1 };
        let history = [
            write(0, 1, (0, 100), 1, first),
            write(1, 2, (10, 90), 2, second),
            read(2, 3, (20, 30), Some((if first == 1 { 1 } else { 2 }, 1))),
            read(3, 3, (110, 120), Some((last_value, 2))),
        ];
        assert_passes(&history);
    }
}

#[test]
fn an_unknown_write_may_show_up_later() {
    let history = [
        write(0, 1, (0, 10), 1, 1),
        write_unknown(1, 2, (20, 30), 2),
        read(2, 3, (40, 50), Some((1, 1))),
        read(3, 3, (1000, 1010), Some((2, 2))),
    ];
    assert_passes(&history);
}

#[test]
fn an_unknown_write_may_never_show_up() {
    let history = [
        write(0, 1, (0, 10), 1, 1),
        write_unknown(1, 2, (20, 30), 2),
        read(2, 3, (40, 50), Some((1, 1))),
        write(3, 1, (60, 70), 3, 2),
        read(4, 3, (80, 90), Some((3, 2))),
    ];
    assert_passes(&history);
}

#[test]
fn an_unknown_write_may_take_effect_after_its_client_moved_on() {
    let history = [
        write(0, 1, (0, 10), 1, 1),
        write_unknown(1, 2, (20, 30), 2),
        write(2, 2, (40, 50), 3, 2),
        read(3, 3, (100, 110), Some((2, 3))),
    ];
    assert_passes(&history);
}

#[test]
fn a_cas_may_be_refused_because_of_a_concurrent_unknown_write() {
    let history =
        [write(0, 1, (0, 10), 1, 1), write_unknown(1, 2, (20, 30), 2), cas(2, 3, (25, 40), 1, 3, Returned::CasRefused)];
    assert_passes(&history);
    let mut shown_later = history.to_vec();
    shown_later.push(read(3, 3, (50, 60), Some((2, 2))));
    assert_passes(&shown_later);
}

#[test]
fn reads_concurrent_with_a_write_may_see_the_old_or_the_new_value() {
    let history = [
        write(0, 1, (0, 10), 1, 1),
        write(1, 1, (20, 100), 2, 2),
        read(2, 2, (30, 40), Some((1, 1))),
        read(3, 3, (35, 45), Some((2, 2))),
        read(4, 2, (50, 60), Some((2, 2))),
        read(5, 4, (20, 100), Some((1, 1))),
    ];
    assert_passes(&history);
}

#[test]
fn many_unknown_writes_that_never_show_up_stay_cheap() {
    // Twenty interchangeable Unknown writes; without treating them as twins the search would
    // try every subset of them.
    let mut history = vec![write(0, 1, (0, 10), 1, 1)];
    for n in 0..20 {
        history.push(write_unknown(1 + n, 100 + n, (20 + n, 30 + n), 100 + n));
    }
    history.push(read(50, 2, (1000, 1010), Some((1, 1))));
    history.push(write(51, 2, (1020, 1030), 2, 2));
    history.push(read(52, 2, (1040, 1050), Some((2, 2))));
    let judgement = linear::check(&KvRegister::new(), &history, 100_000);
    assert_eq!(judgement.verdict, Verdict::Linearizable);
    assert!(judgement.steps < 2_000, "took {} steps", judgement.steps);
}

#[test]
fn with_unseen_writes_an_unknown_write_may_land_at_any_later_version() {
    // The write of version 2 is left out: the Unknown write then made version 3, not 2.
    let sub_history =
        [write(0, 1, (0, 10), 1, 1), write_unknown(2, 3, (15, 25), 3), read(3, 1, (40, 50), Some((3, 3)))];
    let lenient = KvRegister::new().allowing_unseen_writes().unwrap();
    assert_eq!(linear::check(&lenient, &sub_history, 1_000).verdict, Verdict::Linearizable);
    assert!(matches!(linear::check(&KvRegister::new(), &sub_history, 1_000).verdict, Verdict::Violated { .. }));
}

// ---- files ----

#[test]
fn an_acknowledged_put_must_not_read_back_as_absent() {
    let history = [
        put(0, 1, (0, 10), "c0", ok(Returned::FilePut)),
        delete(1, 1, (20, 30), ok(Returned::FileDeleted { existed: true })),
        put(2, 1, (40, 50), "c1", ok(Returned::FilePut)),
        get(3, 2, (60, 70), None),
    ];
    let violation = assert_violation(&history, FILES);
    assert_eq!(ids(&violation), [2, 3], "{violation}");
}

#[test]
fn a_deleted_file_must_not_come_back() {
    let history = [
        put(0, 1, (0, 10), "c0", ok(Returned::FilePut)),
        delete(1, 2, (20, 30), ok(Returned::FileDeleted { existed: true })),
        get(2, 3, (40, 50), Some("c0")),
    ];
    let violation = assert_violation(&history, FILES);
    assert_eq!(ids(&violation), [0, 1, 2], "{violation}");
}

#[test]
fn a_get_must_not_return_content_never_put() {
    let history = [put(0, 1, (0, 10), "c0", ok(Returned::FilePut)), get(1, 2, (20, 30), Some("c0-torn"))];
    let violation = assert_violation(&history, FILES);
    assert_eq!(ids(&violation), [1], "{violation}");
}

#[test]
fn a_delete_must_say_whether_there_was_a_file() {
    let history = [
        put(0, 1, (0, 10), "c0", ok(Returned::FilePut)),
        delete(1, 2, (20, 30), ok(Returned::FileDeleted { existed: false })),
    ];
    assert_violation(&history, FILES);
}

/// The s3 workload's operations: the file calls on an `s3://` subject.
fn on_object(mut operation: Operation) -> Operation {
    operation.call = match operation.call {
        Call::FilePut { content, .. } => Call::FilePut { path: "s3://b/o".into(), content },
        Call::FileGet { .. } => Call::FileGet { path: "s3://b/o".into() },
        Call::FileDelete { .. } => Call::FileDelete { path: "s3://b/o".into() },
        call => call,
    };
    operation
}

#[test]
fn an_object_put_after_a_delete_must_not_read_back_as_absent_and_is_reported_as_s3() {
    let history = [
        put(0, 1, (0, 10), "c0", ok(Returned::FilePut)),
        delete(1, 1, (20, 30), ok(Returned::ObjectDeleted)),
        put(2, 1, (40, 50), "c1", ok(Returned::FilePut)),
        get(3, 2, (60, 70), None),
    ]
    .map(on_object);
    let violation = assert_violation(&history, S3);
    assert_eq!(ids(&violation), [2, 3], "{violation}");
    assert_eq!(violation.subject, "s3://b/o");
}

#[test]
fn an_object_delete_need_not_say_whether_there_was_one_but_a_deleted_object_must_not_come_back() {
    let deleted_twice = [
        delete(0, 1, (0, 10), ok(Returned::ObjectDeleted)),
        put(1, 1, (20, 30), "c0", ok(Returned::FilePut)),
        delete(2, 2, (40, 50), ok(Returned::ObjectDeleted)),
        get(3, 2, (60, 70), None),
    ]
    .map(on_object);
    assert_passes(&deleted_twice);
    let resurrected = [
        put(0, 1, (0, 10), "c0", ok(Returned::FilePut)),
        delete(1, 2, (20, 30), ok(Returned::ObjectDeleted)),
        get(2, 3, (40, 50), Some("c0")),
    ]
    .map(on_object);
    assert_violation(&resurrected, S3);
}

#[test]
fn unknown_puts_and_deletes_may_or_may_not_have_happened() {
    let history = [
        put(0, 1, (0, 10), "c0", ok(Returned::FilePut)),
        delete(1, 2, (20, 30), unknown()),
        get(2, 3, (40, 50), Some("c0")),
        get(3, 3, (60, 70), None),
        put(4, 1, (80, 90), "c1", unknown()),
        put(5, 2, (100, 110), "c2", unknown()),
        get(6, 3, (120, 130), Some("c2")),
        delete(7, 1, (140, 150), ok(Returned::FileDeleted { existed: true })),
        get(8, 3, (160, 170), None),
    ];
    assert_passes(&history);
}

#[test]
fn a_get_concurrent_with_a_put_may_see_either_content() {
    let history = [
        put(0, 1, (0, 10), "c0", ok(Returned::FilePut)),
        put(1, 1, (20, 100), "c1", ok(Returned::FilePut)),
        get(2, 2, (30, 40), Some("c0")),
        get(3, 3, (30, 40), Some("c1")),
        get(4, 2, (110, 120), Some("c1")),
    ];
    assert_passes(&history);
}

// ---- locks ----

#[test]
fn holds_of_one_lock_must_not_overlap() {
    let history = [hold(0, 1, 1, 100, 200), hold(1, 2, 2, 150, 300), hold(2, 3, 3, 300, 400)];
    let violation = assert_violation(&history, LOCKS);
    assert_eq!(ids(&violation), [0, 1]);
    assert!(violation.message.contains("overlap by 50 µs"), "{violation}");
}

#[test]
fn fencing_tokens_must_rise_in_acquisition_order() {
    let history = [hold(0, 1, 5, 100, 200), hold(1, 2, 4, 210, 300)];
    let violation = assert_violation(&history, LOCKS);
    assert!(violation.message.contains("went backwards"), "{violation}");
    let reused = [hold(0, 1, 5, 100, 200), hold(1, 2, 5, 210, 300)];
    assert!(assert_violation(&reused, LOCKS).message.contains("twice"));
}

#[test]
fn a_hold_released_before_it_was_acquired_is_malformed() {
    let mut bad = hold(0, 1, 1, 100, 200);
    bad.outcome = ok(Returned::LockHeld { token: 1, acquired_us: 150, released_us: 120, lost: None });
    let violation = assert_violation(&[bad], LOCKS);
    assert!(violation.message.contains("malformed"), "{violation}");
}

#[test]
fn failed_and_unknown_holds_and_handovers_are_fine() {
    let mut lost = hold(2, 3, 3, 300, 400);
    lost.outcome =
        ok(Returned::LockHeld { token: 3, acquired_us: 300, released_us: 400, lost: Some("expired".into()) });
    let history = [
        hold(0, 1, 1, 100, 200),
        hold(1, 2, 2, 200, 300),
        lost,
        op(3, 4, 150, 900, Call::LockHold { lock: "l".into() }, unknown()),
        op(4, 5, 150, 900, Call::LockHold { lock: "l".into() }, failed()),
        op(
            5,
            6,
            150,
            900,
            Call::LockHold { lock: "other".into() },
            ok(Returned::LockHeld { token: 1, acquired_us: 160, released_us: 800, lost: None }),
        ),
    ];
    assert_passes(&history);
}

// ---- the history's own rules ----

#[test]
fn an_operation_completed_before_it_was_invoked_is_malformed() {
    let history = [write(0, 1, (50, 10), 1, 1), read(1, 2, (60, 70), None)];
    let violation = assert_violation(&history, HISTORY);
    assert_eq!(violation.subject, "op #0");
}

#[test]
fn a_client_running_two_operations_at_once_is_malformed() {
    let history = [write(0, 1, (0, 50), 1, 1), read(1, 1, (40, 60), Some((1, 1)))];
    let violation = assert_violation(&history, HISTORY);
    assert_eq!(violation.subject, "client 1");
    assert!(violation.message.contains("10 µs"), "{violation}");
}

#[test]
fn a_result_that_does_not_fit_its_call_is_malformed() {
    let history = [op(0, 1, 0, 10, Call::KvRead { key: "k".into() }, ok(Returned::FilePut))];
    assert_violation(&history, HISTORY);
}

// ---- budgets and reports ----

#[test]
fn a_search_out_of_budget_is_inconclusive_never_passed() {
    let history: Vec<Operation> =
        (0..8).map(|n| write(n, n, (0, 100), n, n + 1)).chain([read(8, 9, (200, 210), Some((7, 8)))]).collect();
    let options = CheckOptions { search_steps_max: 3, ..CheckOptions::default() };
    let report = check_history(&history, &options);
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.inconclusive.len(), 1, "{report}");
    assert!(!report.passed());
    assert!(check_all(&history).passed());
}

#[test]
fn a_large_violation_is_shrunk_to_the_few_operations_that_show_it() {
    // A long, correct prefix on one key, then one stale read.
    let mut history: Vec<Operation> = Vec::new();
    for n in 0..300 {
        let at = n * 100;
        history.push(write(2 * n, n % 4, (at, at + 40), n, n + 1));
        history.push(read(2 * n + 1, 4 + n % 4, (at + 50, at + 90), Some((n, n + 1))));
    }
    history.push(read(600, 9, (40_000, 40_010), Some((250, 251))));
    let violation = assert_violation(&history, KV);
    // The write of the value read, any later write, and the read.
    let shown = ids(&violation);
    assert_eq!(shown.len(), 3, "{violation}");
    assert_eq!((shown[0], shown[2]), (500, 600), "{violation}");
    assert!(shown[1] > 500 && shown[1].is_multiple_of(2), "{violation}");
}

#[test]
fn when_the_search_gives_up_windows_of_the_history_may_still_prove_a_violation() {
    let mut history: Vec<Operation> = Vec::new();
    for n in 0..300 {
        let at = n * 100;
        history.push(write(2 * n, n % 4, (at, at + 40), n, n + 1));
        history.push(read(2 * n + 1, 4 + n % 4, (at + 50, at + 90), Some((n, n + 1))));
    }
    history[401].outcome = ok(Returned::KvRead { found: Some(Versioned { value: 150, version: 151 }) });
    let options = CheckOptions { search_steps_max: 100, ..CheckOptions::default() };
    let report = check_history(&history, &options);
    assert!(report.inconclusive.is_empty(), "{report}");
    assert_eq!(report.violations.len(), 1, "{report}");
    let violation = &report.violations[0];
    assert!(violation.message.contains("found in a window"), "{violation}");
    assert_eq!(violation.operations.len(), 3, "{violation}");
    assert_eq!(violation.operations.last().map(|operation| operation.id), Some(401), "{violation}");
}

#[test]
fn violations_display_one_operation_per_line_and_serialize() {
    let history = [write(0, 1, (1_500, 12_345), 1, 1), read(1, 2, (20_000, 20_007), Some((99, 1)))];
    let report = check_all(&history);
    let shown = report.violations[0].to_string();
    assert!(shown.starts_with("[kv] k: not linearizable"), "{shown}");
    assert!(
        shown.contains("\n    #1  client 2  20.000 → 20.007 ms  kv read \"k\"  →  ok: 99 at version 1\n"),
        "{shown}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["violations"][0]["workload"], "kv");
    assert_eq!(json["workloads"][0]["n_ok"], 2);
    assert_eq!(serde_json::from_value::<CheckReport>(json).unwrap(), report);
}

#[test]
fn violations_past_the_cap_are_counted_not_listed() {
    let history: Vec<Operation> = (0..5).map(|n| hold(n, n, 1, 100 + n, 200 + n)).collect();
    let options = CheckOptions { violations_per_subject_max: 2, ..CheckOptions::default() };
    let report = check_history(&history, &options);
    assert_eq!(report.violations.len(), 2);
    assert!(report.violations_omitted > 0);
    assert!(!report.passed());
}
