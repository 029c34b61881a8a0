//! Random histories made linearizable by construction must pass; a mutation that no
//! linearization can explain must fail, with a small sub-history that fails on its own.
//!
//! A history is generated from a sequential execution: operation i takes effect at instant
//! `100 * (i + 1)` against a real register, and its real-time interval is drawn around that
//! instant, so overlaps are random while each client still runs one operation at a time. An
//! Unknown write's effect may land long after its client stopped waiting, even after the
//! client's next operation started.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::history::{Micros, Versioned};

/// Distance between consecutive effect instants.
const SPACING_US: Micros = 100;

/// One generated operation, before times and results are worked out.
#[derive(Debug, Clone)]
struct Draw {
    client: u64,
    key: usize,
    /// Which call (read, write, ...), modulo the calls of the workload.
    kind: u8,
    /// How long before its effect the operation was invoked, at most.
    before_us: Micros,
    /// How long after its effect it completed, at most (for Unknown: after its invocation).
    after_us: Micros,
    fate: Fate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Ok,
    /// Took effect, but its client never learned of it.
    UnknownApplied,
    /// Never took effect, and its client never learned that.
    UnknownNever,
    Failed,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        12 => Just(Fate::Ok),
        2 => Just(Fate::UnknownApplied),
        1 => Just(Fate::UnknownNever),
        1 => Just(Fate::Failed),
    ]
}

fn draws(n_clients: u64, n_keys: usize, n_ops_max: usize) -> impl Strategy<Value = Vec<Draw>> {
    let draw = (0..n_clients, 0..n_keys, any::<u8>(), 0..400u64, 0..400u64, fate()).prop_map(
        |(client, key, kind, before_us, after_us, fate)| Draw { client, key, kind, before_us, after_us, fate },
    );
    prop::collection::vec(draw, 1..n_ops_max)
}

/// The register a generated execution runs against.
trait Sequential {
    fn call_and_effect(&mut self, index: usize, draw: &Draw) -> (Call, Returned);
}

/// A real kv store of a few keys.
#[derive(Default)]
struct KvStore {
    keys: BTreeMap<usize, Versioned>,
}

impl Sequential for KvStore {
    fn call_and_effect(&mut self, index: usize, draw: &Draw) -> (Call, Returned) {
        let key = format!("k{}", draw.key);
        let value = 1_000 + index as u64;
        let current = self.keys.get(&draw.key).copied();
        let version = current.map_or(0, |current| current.version);
        let applies = matches!(draw.fate, Fate::Ok | Fate::UnknownApplied);
        match draw.kind % 4 {
            0 => (Call::KvRead { key }, Returned::KvRead { found: current }),
            1 => {
                if applies {
                    self.keys.insert(draw.key, Versioned { value, version: version + 1 });
                }
                (Call::KvWrite { key, value }, Returned::KvWritten { version: version + 1 })
            }
            kind => {
                // Half the CASes expect the current version, half the next one (refused).
                let expected_version = if kind == 2 { version } else { version + 1 };
                let call = Call::KvCas { key, expected_version, value };
                if expected_version == version {
                    if applies {
                        self.keys.insert(draw.key, Versioned { value, version: version + 1 });
                    }
                    (call, Returned::KvWritten { version: version + 1 })
                } else {
                    (call, Returned::CasRefused)
                }
            }
        }
    }
}

/// A real file store of a few paths.
#[derive(Default)]
struct FileStore {
    paths: BTreeMap<usize, String>,
}

impl Sequential for FileStore {
    fn call_and_effect(&mut self, index: usize, draw: &Draw) -> (Call, Returned) {
        let path = format!("/p{}", draw.key);
        let applies = matches!(draw.fate, Fate::Ok | Fate::UnknownApplied);
        match draw.kind % 3 {
            0 => (Call::FileGet { path }, Returned::FileRead { content: self.paths.get(&draw.key).cloned() }),
            1 => {
                let content = format!("c{index}");
                if applies {
                    self.paths.insert(draw.key, content.clone());
                }
                (Call::FilePut { path, content }, Returned::FilePut)
            }
            _ => {
                let existed = self.paths.contains_key(&draw.key);
                if applies {
                    self.paths.remove(&draw.key);
                }
                (Call::FileDelete { path }, Returned::FileDeleted { existed })
            }
        }
    }
}

/// A history whose every operation took effect (or not) as `draws` say, at its own instant.
fn execute(store: &mut impl Sequential, draws: &[Draw]) -> Vec<Operation> {
    let effect_us = |index: usize| SPACING_US * (index as u64 + 1);
    // The next effect instant of each operation's client: its interval must end before.
    let mut next_of_client: BTreeMap<u64, Micros> = BTreeMap::new();
    let mut next_effect_us = vec![Micros::MAX; draws.len()];
    for (index, draw) in draws.iter().enumerate().rev() {
        next_effect_us[index] = next_of_client.insert(draw.client, effect_us(index)).unwrap_or(Micros::MAX);
    }

    let mut client_free_us: BTreeMap<u64, Micros> = BTreeMap::new();
    let mut history = Vec::with_capacity(draws.len());
    for (index, draw) in draws.iter().enumerate() {
        let effect = effect_us(index);
        let free = client_free_us.get(&draw.client).copied().unwrap_or(0);
        let invoked_us = effect.saturating_sub(draw.before_us).max(free);
        let (call, returned) = store.call_and_effect(index, draw);
        let latest_completion = next_effect_us[index].saturating_sub(1);
        let (completed_us, outcome) = match draw.fate {
            Fate::Ok => ((effect + draw.after_us).min(latest_completion), Outcome::Ok { returned }),
            Fate::Failed => {
                ((effect + draw.after_us).min(latest_completion), Outcome::Failed { error: "refused".into() })
            }
            Fate::UnknownApplied | Fate::UnknownNever => {
                ((invoked_us + draw.after_us).min(latest_completion), Outcome::Unknown { error: "timeout".into() })
            }
        };
        client_free_us.insert(draw.client, completed_us);
        history.push(Operation { id: index as u64, client: draw.client, invoked_us, completed_us, call, outcome });
    }
    history
}

fn end_us(history: &[Operation]) -> Micros {
    history.iter().map(|operation| operation.completed_us).max().unwrap_or(0)
}

/// A read by a fresh client, after every operation completed.
fn final_operation(history: &[Operation], call: Call, returned: Returned) -> Operation {
    let invoked_us = end_us(history) + 10;
    Operation {
        id: history.len() as u64,
        client: u64::MAX,
        invoked_us,
        completed_us: invoked_us + 10,
        call,
        outcome: Outcome::Ok { returned },
    }
}

fn assert_fails_with_small_witness(history: &[Operation], workload: &str, witness_ops_max: usize) {
    let report = check_history(history, &CheckOptions::default());
    let violation = report.violations.iter().find(|violation| violation.workload == workload);
    let Some(violation) = violation else { panic!("expected a {workload} violation:\n{report}") };
    assert!(violation.operations.len() <= witness_ops_max, "witness too large:\n{violation}");
    let again = check_history(&violation.operations, &CheckOptions::default());
    assert!(again.violations.iter().any(|found| found.workload == workload), "the witness passes:\n{violation}");
}

/// The operations `kept` marks, plus every write a kept read returned: the sub-histories the
/// model with unseen writes judges, which must pass whenever the whole history does.
fn read_closed_part<M: Model>(model: &M, history: &[Operation], kept: &[bool]) -> Vec<Operation> {
    let values_read: Vec<String> = history
        .iter()
        .zip(kept.iter().chain(std::iter::repeat(&true)))
        .filter(|(_, kept)| **kept)
        .filter_map(|(operation, _)| match &operation.outcome {
            Outcome::Ok { returned } => model.value_read(returned),
            _ => None,
        })
        .collect();
    history
        .iter()
        .zip(kept.iter().chain(std::iter::repeat(&true)))
        .filter(|(operation, kept)| {
            **kept || model.value_written(&operation.call).is_some_and(|value| values_read.contains(&value))
        })
        .map(|(operation, _)| operation.clone())
        .collect()
}

fn is_ok(operation: &Operation) -> bool {
    matches!(operation.outcome, Outcome::Ok { .. })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, max_global_rejects: 100_000, ..ProptestConfig::default() })]

    #[test]
    fn generated_kv_histories_are_linearizable(draws in draws(4, 2, 40)) {
        let history = execute(&mut KvStore::default(), &draws);
        let report = check_history(&history, &CheckOptions::default());
        prop_assert!(report.passed(), "{}", report);
    }

    #[test]
    fn generated_file_histories_are_linearizable(draws in draws(4, 2, 40)) {
        let history = execute(&mut FileStore::default(), &draws);
        let report = check_history(&history, &CheckOptions::default());
        prop_assert!(report.passed(), "{}", report);
    }

    #[test]
    fn any_read_closed_part_of_a_linearizable_kv_history_passes_with_unseen_writes(
        draws in draws(4, 1, 40),
        kept in prop::collection::vec(any::<bool>(), 40),
    ) {
        let history = execute(&mut KvStore::default(), &draws);
        let part = read_closed_part(&KvRegister::new(), &history, &kept);
        let lenient = KvRegister::new().allowing_unseen_writes().unwrap();
        let judgement = linear::check(&lenient, &part, 1_000_000);
        prop_assert_eq!(judgement.verdict, Verdict::Linearizable, "{:#?}", part);
    }

    #[test]
    fn any_read_closed_part_of_a_linearizable_file_history_passes_with_unseen_writes(
        draws in draws(4, 1, 40),
        kept in prop::collection::vec(any::<bool>(), 40),
    ) {
        let history = execute(&mut FileStore::default(), &draws);
        let part = read_closed_part(&FileRegister::new(), &history, &kept);
        let lenient = FileRegister::new().allowing_unseen_writes().unwrap();
        let judgement = linear::check(&lenient, &part, 1_000_000);
        prop_assert_eq!(judgement.verdict, Verdict::Linearizable, "{:#?}", part);
    }

    #[test]
    fn a_kv_read_of_a_value_never_written_fails(draws in draws(4, 2, 40)) {
        let mut history = execute(&mut KvStore::default(), &draws);
        let found = Some(Versioned { value: 7, version: 1 });
        history.push(final_operation(&history, Call::KvRead { key: "k0".into() }, Returned::KvRead { found }));
        assert_fails_with_small_witness(&history, KV, 1);
    }

    #[test]
    fn a_kv_read_older_than_an_acknowledged_write_fails(draws in draws(4, 2, 40)) {
        let mut history = execute(&mut KvStore::default(), &draws);
        // Acknowledged writes pin their versions, so a value an acknowledged write replaced can
        // never be read after that write completed.
        let acknowledged_k0: Vec<Versioned> = history
            .iter()
            .filter(|operation| operation.call.subject() == "k0")
            .filter_map(|operation| match (&operation.call, &operation.outcome) {
                (
                    Call::KvWrite { value, .. } | Call::KvCas { value, .. },
                    Outcome::Ok { returned: Returned::KvWritten { version } },
                ) => Some(Versioned { value: *value, version: *version }),
                _ => None,
            })
            .collect();
        let newest_version = acknowledged_k0.iter().map(|written| written.version).max();
        let stale = acknowledged_k0.iter().find(|written| Some(written.version) < newest_version).copied();
        prop_assume!(stale.is_some());
        history.push(final_operation(&history, Call::KvRead { key: "k0".into() }, Returned::KvRead { found: stale }));
        assert_fails_with_small_witness(&history, KV, 4);
    }

    #[test]
    fn a_file_get_of_content_never_put_fails(draws in draws(4, 2, 40)) {
        let mut history = execute(&mut FileStore::default(), &draws);
        let content = Some("torn".to_string());
        history.push(final_operation(&history, Call::FileGet { path: "/p0".into() }, Returned::FileRead { content }));
        assert_fails_with_small_witness(&history, FILES, 1);
    }

    #[test]
    fn a_file_get_older_than_an_acknowledged_put_or_delete_fails(draws in draws(4, 2, 40)) {
        let mut history = execute(&mut FileStore::default(), &draws);
        let on_p0 = |operation: &&Operation| operation.call.subject() == "/p0";
        let last_acknowledged = history
            .iter()
            .rev()
            .filter(on_p0)
            .find(|operation| is_ok(operation) && matches!(operation.call, Call::FilePut { .. } | Call::FileDelete { .. }));
        // An acknowledged put that completed before it was invoked: no order can swap them.
        let older = last_acknowledged.and_then(|last| {
            history.iter().filter(on_p0).find(|operation| {
                is_ok(operation) && matches!(operation.call, Call::FilePut { .. }) && operation.completed_us < last.invoked_us
            })
        });
        let Some(Call::FilePut { content, .. }) = older.map(|operation| operation.call.clone()) else {
            return Err(TestCaseError::reject("no acknowledged put before the last acknowledged write"));
        };
        let returned = Returned::FileRead { content: Some(content) };
        history.push(final_operation(&history, Call::FileGet { path: "/p0".into() }, returned));
        assert_fails_with_small_witness(&history, FILES, 4);
    }
}

/// A deterministic stream of draws for the timing run (no proptest shrinking needed there).
fn bench_draws(n_ops: usize, n_clients: u64, n_keys: usize, seed: u64) -> Vec<Draw> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..n_ops)
        .map(|_| {
            let fate = match next() % 100 {
                0..=89 => Fate::Ok,
                90..=95 => Fate::UnknownApplied,
                96..=97 => Fate::UnknownNever,
                _ => Fate::Failed,
            };
            Draw {
                client: next() % n_clients,
                key: (next() % n_keys as u64) as usize,
                kind: (next() % 256) as u8,
                before_us: next() % 800,
                after_us: next() % 800,
                fate,
            }
        })
        .collect()
}

/// A chaos run's size of history is decided, not judged inconclusive. The time it takes is
/// printed, not asserted (`cargo test -p mendfs-chaos --release -- --nocapture twenty`).
#[test]
fn twenty_thousand_kv_operations_over_16_keys_and_8_clients_are_judged_linearizable() {
    let history = execute(&mut KvStore::default(), &bench_draws(20_000, 8, 16, 42));
    let started = std::time::Instant::now();
    let report = check_history(&history, &CheckOptions::default());
    let elapsed = started.elapsed();
    assert!(report.passed(), "{report}");

    let mut by_key: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    for operation in &history {
        by_key.entry(operation.call.subject()).or_default().push(operation.clone());
    }
    let steps: Vec<u64> = by_key.values().map(|ops| linear::check(&KvRegister::new(), ops, u64::MAX).steps).collect();
    let unknown = history.iter().filter(|operation| matches!(operation.outcome, Outcome::Unknown { .. })).count();
    println!(
        "checked {} kv operations ({unknown} unknown) over {} keys, 8 clients, in {:.3} s; search steps per key: max {}, total {}",
        history.len(),
        by_key.len(),
        elapsed.as_secs_f64(),
        steps.iter().max().unwrap_or(&0),
        steps.iter().sum::<u64>()
    );
}
