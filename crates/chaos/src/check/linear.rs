//! Linearizability of one register's history (one kv key, one file path).
//!
//! A history is linearizable when every operation can be given one instant inside its real-time
//! interval such that, replayed in that order, a sequential [`Model`] returns exactly what each
//! operation returned. Registers are independent, so a run's history is checked one register at
//! a time (P-compositionality): the search is exponential in concurrency, never in history length.
//!
//! The search is Lowe's just-in-time linearization, as Porcupine implements it. Invocations and
//! completions sit in one list in time order. Walking it, the search tries to linearize each
//! invoked operation whose completion it has not passed yet (its effect happens "now"); reaching
//! a completion of an operation it has not linearized means the choices so far were wrong, so it
//! backtracks. Linearized operations are lifted out of the list, so the walk restarts cheaply
//! from the head. A cache of (set of linearized operations, model state) pairs already explored
//! keeps it from exploring the same situation twice; the set is kept as a 128-bit Zobrist key
//! (an XOR of one random key per operation, updated in O(1)), so a cache entry costs tens of
//! bytes whatever the history's length, and two different sets collide with probability 2^-128.
//!
//! Outcomes decide what an operation may do:
//! - `Failed`: it did not happen, so it is left out.
//! - `Ok`: it happened inside its interval and returned what it returned.
//! - `Unknown`: it may have happened at any instant after its invocation, even long after its
//!   client stopped waiting, or never. It has no completion in the list, and the search succeeds
//!   as soon as every operation that is not Unknown is linearized, so an Unknown operation left
//!   over simply never happened. Its output was never seen, so the model steps it with
//!   `returned: None` and must accept any output. An Unknown read changes nothing and says
//!   nothing, so it is left out.
//!
//! Three refinements keep Unknown writes, which pile up over a long run with faults, from making
//! the search exponential or quadratic. Unknown operations whose calls are equal are
//! interchangeable, so they are only linearized in invocation order: a later twin waits until
//! its earlier twin is placed. A model may rewrite the values nobody read to one shared stand-in
//! ([`Model::merge_unread_values`]), which makes most Unknown writes twins of each other. And an
//! Unknown operation that can no longer take effect ([`Model::can_no_longer_apply`]) is set
//! aside until the search backtracks past the state that made it so.
//!
//! The search is exhaustive only when it fails: a linearizable history is usually decided in a
//! few steps per operation, while proving that no order works can take far more. Every step
//! counts against a budget; a search that runs out reports [`Verdict::Inconclusive`].
//!
//! When a history is not linearizable, [`shrink`] looks for a small sub-history that still is
//! not, to show a human; when the search ran out, [`find_local_violation`] looks for one in
//! windows of the history.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;

use crate::history::{Call, Micros, Operation, Outcome, Returned};

/// The sequential specification of one register.
pub trait Model {
    /// What the register holds between operations.
    type State: Clone + Eq + Hash;

    /// The register before any operation.
    fn init(&self) -> Self::State;

    /// The state after `call` takes effect in `state` and returns `returned`, or None when it
    /// could not have returned that in that state. `returned` is None when the operation's
    /// outcome is Unknown: then any output is possible and only the effect is applied, which
    /// must never be refused.
    fn step(&self, state: &Self::State, call: &Call, returned: Option<&Returned>) -> Option<Self::State>;

    /// Whether the call only observes (an Unknown read is left out: it says nothing).
    fn is_read(&self, call: &Call) -> bool;

    /// What the call writes, as a token a read's [`Model::value_read`] can be compared with.
    fn value_written(&self, _call: &Call) -> Option<String> {
        None
    }

    /// What a read returned, as a token comparable with [`Model::value_written`].
    fn value_read(&self, _returned: &Returned) -> Option<String> {
        None
    }

    /// The calls the search uses in place of `operations`' own calls, one per operation. A
    /// model may replace a written value that no operation in `operations` read by a stand-in
    /// shared by all such writes: nothing can tell those writes apart, and once they are equal
    /// the search treats them as interchangeable. It must change nothing else.
    fn merge_unread_values(&self, operations: &[Operation]) -> Vec<Call> {
        operations.iter().map(|operation| operation.call.clone()).collect()
    }

    /// Whether an Unknown `call` can change neither `state` nor any state that can follow it
    /// (a CAS expecting a version the register has passed: versions never go back). The search
    /// then sets it aside until it backtracks past `state`. Default: never.
    fn can_no_longer_apply(&self, _state: &Self::State, _call: &Call) -> bool {
        false
    }

    /// The same register where, between any two operations, writes absent from the history
    /// may also have happened (writes of values no operation in the history read). A
    /// sub-history that is not linearizable even so shows its violation without the
    /// operations left out of it. It must accept everything [`Model::step`] accepts. None when
    /// the model has no such reading.
    fn allowing_unseen_writes(&self) -> Option<Self>
    where
        Self: Sized,
    {
        None
    }
}

/// How a register's history was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order works. `culprit` indexes the operation whose completion the search could never
    /// get past: every order of the operations before it fails to place it (or something
    /// concurrent with it) in time.
    Violated {
        culprit: usize,
    },
    /// The search used up its step budget before deciding.
    Inconclusive,
}

/// A verdict and what it cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    /// Search steps taken: list entries visited, each costing at most one model step.
    pub steps: u64,
}

/// What the search did on its current path, undone in reverse when it backtracks.
enum Move<S> {
    /// Linearized the operation of this invocation entry; the state before it.
    Placed(usize, S),
    /// Set aside this Unknown operation's invocation entry: in the state reached it can no
    /// longer take effect ([`Model::can_no_longer_apply`]).
    SetAside(usize),
}

/// Judges one register's history (operations in any order, any outcomes), taking at most
/// `search_steps_max` search steps.
pub fn check<M: Model>(model: &M, operations: &[Operation], search_steps_max: u64) -> Judgement {
    let (ops, mut entries) = prepare(model, operations);
    let zobrist: Vec<u128> = (0..ops.len()).map(zobrist_key).collect();

    let mut definite_left = ops.iter().filter(|op| op.returned.is_some()).count();
    let mut linearized = vec![false; ops.len()];
    let mut linearized_key: u128 = 0;
    let mut state = model.init();
    let mut explored: HashSet<(u128, M::State)> = HashSet::new();
    let mut path: Vec<Move<M::State>> = Vec::new();
    let mut steps: u64 = 0;
    // The latest completion entry the search had to stop at.
    let mut stuck_at: Option<usize> = None;
    let mut entry = entries[HEAD].next;

    loop {
        if definite_left == 0 {
            return Judgement { verdict: Verdict::Linearizable, steps };
        }
        if steps >= search_steps_max {
            return Judgement { verdict: Verdict::Inconclusive, steps };
        }
        steps += 1;

        if entry == NONE || !entries[entry].is_call {
            if entry != NONE {
                stuck_at = stuck_at.max(Some(entry));
            }
            // Undo moves up to and including the latest placement, then try what follows it.
            let undone = loop {
                match path.pop() {
                    Some(Move::SetAside(set_aside)) => restore(&mut entries, set_aside),
                    Some(Move::Placed(call_entry, state_before)) => break Some((call_entry, state_before)),
                    None => break None,
                }
            };
            let Some((call_entry, state_before)) = undone else {
                let culprit = stuck_at
                    .map(|stuck| ops[entries[stuck].op].original)
                    .or_else(|| ops.iter().find(|op| op.returned.is_some()).map(|op| op.original))
                    .unwrap_or(0);
                return Judgement { verdict: Verdict::Violated { culprit }, steps };
            };
            let op = entries[call_entry].op;
            linearized[op] = false;
            linearized_key ^= zobrist[op];
            if ops[op].returned.is_some() {
                definite_left += 1;
            }
            state = state_before;
            relink(&mut entries, call_entry);
            entry = entries[call_entry].next;
            continue;
        }

        let op_idx = entries[entry].op;
        let op = &ops[op_idx];
        if op.returned.is_none() && model.can_no_longer_apply(&state, &op.call) {
            // Pending Unknown operations pile up over a long run; without this, each would be
            // retried after every placement. Setting one aside changes neither the state nor
            // the linearized set, so the cache stays exact.
            remove(&mut entries, entry);
            path.push(Move::SetAside(entry));
            entry = entries[entry].next;
            continue;
        }
        if op.earlier_twin.is_some_and(|twin| !linearized[twin]) {
            entry = entries[entry].next;
            continue;
        }
        if let Some(next_state) = model.step(&state, &op.call, op.returned.as_ref()) {
            // An Unknown operation that changes nothing here is better left unplaced: placing
            // it constrains nothing that leaving it for later does not.
            let useless = op.returned.is_none() && next_state == state;
            let next_key = linearized_key ^ zobrist[op_idx];
            if !useless && explored.insert((next_key, next_state.clone())) {
                path.push(Move::Placed(entry, std::mem::replace(&mut state, next_state)));
                linearized[op_idx] = true;
                linearized_key = next_key;
                if op.returned.is_some() {
                    definite_left -= 1;
                }
                unlink(&mut entries, entry);
                entry = entries[HEAD].next;
                continue;
            }
        }
        entry = entries[entry].next;
    }
}

/// A sub-history that shows a violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    /// Indices into the operations given to [`shrink`], in invocation order.
    pub operations: Vec<usize>,
    /// The operation the witness's own search could not place.
    pub culprit: usize,
    /// The witness fails even if writes left out of it happened: it stands on its own. When
    /// false it fails read as the register's whole history, and it keeps the original culprit
    /// so its failure is the original one, not one made by leaving writes out.
    pub stands_alone: bool,
    /// Shrinking finished: removing any one operation (other than a write one of the kept
    /// reads returned) makes it linearizable. When false the budget ran out first.
    pub minimal: bool,
    /// The witness was judged a violation by the search. False only when the budget ran out
    /// before any small enough one was found: then it holds the operations around the
    /// culprit, for a human to start from.
    pub verified: bool,
}

/// Operations shown around the culprit when no witness could be found in budget.
const AROUND_CULPRIT_OPS_MAX: usize = 16;

/// Windows of the history checked on their own, smallest first: a violation is usually
/// visible among the last few operations before it, and checks of small sub-histories are
/// cheap whether they pass or fail, while a failing check of a long history must rule out
/// every order of it.
const WINDOW_OPS_MIN: usize = 4;
const WINDOW_GROWTH: usize = 4;

/// Operations per window, and the stride between windows, when [`find_local_violation`] scans
/// a whole history.
const SCAN_WINDOW_OPS: usize = 32;

/// Finds a small sub-history of a history that [`check`] found `Violated { culprit }` that is
/// still not linearizable, spending at most `witness_steps_max` search steps in all.
///
/// A sub-history always keeps the writes its reads returned (a read of a value whose write was
/// left out would fail for a reason of our making). It is judged, when possible, by the model
/// [allowing unseen writes](Model::allowing_unseen_writes), so it needs no write that only its
/// versions imply. Otherwise it is read as the register's whole history and must keep failing
/// at the original culprit.
///
/// Windows around the culprit are tried first, growing until one fails; then operations are
/// removed from it while it keeps failing. When the budget runs out before any window fails,
/// the witness holds the operations around the culprit, unverified.
pub fn shrink<M: Model>(model: &M, operations: &[Operation], culprit: usize, witness_steps_max: u64) -> Witness {
    let mut shrinker = Shrinker::new(model, operations, witness_steps_max);
    if let Some(lenient) = model.allowing_unseen_writes() {
        // Keep half of the budget for the stricter reading, in case this one needs it all.
        let reserve = shrinker.steps_left / 2;
        shrinker.steps_left -= reserve;
        let found = shrinker.first_failing_window(&lenient, culprit, None);
        shrinker.steps_left += reserve;
        if let Some((window, found_culprit)) = found {
            return shrinker.minimize(&lenient, window, found_culprit, true);
        }
    }
    match shrinker.first_failing_window(model, culprit, Some(culprit)) {
        Some((window, found_culprit)) => shrinker.minimize(model, window, found_culprit, false),
        None => shrinker.around_culprit(culprit),
    }
}

/// Looks for a violation in windows of a history, each judged on its own by the model
/// [allowing unseen writes](Model::allowing_unseen_writes), and shrinks the first it finds.
/// For a history too long for [`check`] to decide: a window that fails even though any write
/// outside it may have happened proves the whole history is not linearizable.
pub fn find_local_violation<M: Model>(model: &M, operations: &[Operation], witness_steps_max: u64) -> Option<Witness> {
    let lenient = model.allowing_unseen_writes()?;
    let mut shrinker = Shrinker::new(model, operations, witness_steps_max);
    let mut by_completion: Vec<usize> = (0..operations.len()).collect();
    by_completion.sort_by_key(|&i| (operations[i].completed_us, i));
    let mut start = 0;
    while start < by_completion.len() && shrinker.steps_left > 0 {
        let end = (start + SCAN_WINDOW_OPS).min(by_completion.len());
        let window = shrinker.with_writers_read(by_completion[start..end].iter().copied());
        if let Some(Verdict::Violated { culprit }) = shrinker.judge(&lenient, &window) {
            return Some(shrinker.minimize(&lenient, window, culprit, true));
        }
        if end == by_completion.len() {
            break;
        }
        start += SCAN_WINDOW_OPS / 2;
    }
    None
}

struct Shrinker<'a> {
    operations: &'a [Operation],
    /// For each operation, the writes whose value it read.
    writers_read: Vec<Vec<usize>>,
    steps_left: u64,
}

impl<'a> Shrinker<'a> {
    fn new<M: Model>(model: &M, operations: &'a [Operation], steps_max: u64) -> Shrinker<'a> {
        Shrinker { operations, writers_read: writers_read(model, operations), steps_left: steps_max }
    }

    /// The verdict on `subset` (culprit as an index into all operations), or None once the
    /// budget is spent.
    fn judge<M: Model>(&mut self, model: &M, subset: &[usize]) -> Option<Verdict> {
        if self.steps_left == 0 {
            return None;
        }
        let sub_history: Vec<Operation> = subset.iter().map(|&i| self.operations[i].clone()).collect();
        let judgement = check(model, &sub_history, self.steps_left);
        // Every judgement costs at least one step, so the budget also bounds their number.
        self.steps_left = self.steps_left.saturating_sub(judgement.steps.max(1));
        match judgement.verdict {
            Verdict::Violated { culprit } => Some(Verdict::Violated { culprit: subset[culprit] }),
            verdict => Some(verdict),
        }
    }

    /// The culprit of `subset` when it fails (at `must_fail_at`, when given).
    fn fails<M: Model>(&mut self, model: &M, subset: &[usize], must_fail_at: Option<usize>) -> Option<usize> {
        match self.judge(model, subset)? {
            Verdict::Violated { culprit } if must_fail_at.is_none_or(|expected| expected == culprit) => Some(culprit),
            _ => None,
        }
    }

    /// `subset` plus every write a kept read returned, in invocation order.
    fn with_writers_read(&self, subset: impl IntoIterator<Item = usize>) -> Vec<usize> {
        let mut kept: BTreeSet<usize> = subset.into_iter().collect();
        let mut to_visit: Vec<usize> = kept.iter().copied().collect();
        while let Some(op) = to_visit.pop() {
            for &writer in &self.writers_read[op] {
                if kept.insert(writer) {
                    to_visit.push(writer);
                }
            }
        }
        invocation_order(self.operations, kept)
    }

    /// The smallest window around `culprit` that fails, and its culprit: the culprit, what was
    /// still running when it completed, the operations that completed last before it, and
    /// (with `must_fail_at` None) as many of those that were invoked after it completed, where
    /// a more lenient reading may only fail later; growing until it holds them all. Read as a
    /// whole history, operations invoked after the culprit completed cannot matter to it.
    fn first_failing_window<M: Model>(
        &mut self,
        model: &M,
        culprit: usize,
        must_fail_at: Option<usize>,
    ) -> Option<(Vec<usize>, usize)> {
        let culprit_completed_us = self.operations[culprit].completed_us;
        let mut completed_before: Vec<usize> = Vec::new();
        let mut running_at_completion: Vec<usize> = Vec::new();
        let mut invoked_after: Vec<usize> = Vec::new();
        for (i, op) in self.operations.iter().enumerate() {
            if i == culprit {
                continue;
            }
            if op.invoked_us > culprit_completed_us {
                if must_fail_at.is_none() {
                    invoked_after.push(i);
                }
            } else if op.completed_us <= culprit_completed_us {
                completed_before.push(i);
            } else {
                running_at_completion.push(i);
            }
        }
        completed_before.sort_by_key(|&i| (self.operations[i].completed_us, i));
        invoked_after.sort_by_key(|&i| (self.operations[i].invoked_us, i));

        let mut previous_len = 0;
        let mut window_ops = WINDOW_OPS_MIN;
        loop {
            let latest_before = completed_before.iter().rev().take(window_ops);
            let first_after = invoked_after.iter().take(window_ops);
            let around = latest_before.chain(&running_at_completion).chain(first_after).copied();
            let window = self.with_writers_read(around.chain([culprit]));
            if window.len() > previous_len {
                previous_len = window.len();
                if let Some(found) = self.fails(model, &window, must_fail_at) {
                    return Some((window, found));
                }
            }
            let covered_all = window_ops >= completed_before.len() && window_ops >= invoked_after.len();
            if covered_all || self.steps_left == 0 {
                return None;
            }
            window_ops = window_ops.saturating_mul(WINDOW_GROWTH);
        }
    }

    /// Removes halves of `kept`, then quarters, and so on down to single operations, keeping
    /// every removal after which it still fails; ends with passes of single removals until
    /// none succeeds, or the budget runs out.
    fn minimize<M: Model>(
        &mut self,
        model: &M,
        mut kept: Vec<usize>,
        mut culprit: usize,
        stands_alone: bool,
    ) -> Witness {
        let must_fail_at = |culprit: usize| if stands_alone { None } else { Some(culprit) };
        let mut chunk = (kept.len() / 2).max(1);
        loop {
            let mut removed_any = false;
            let mut start = 0;
            while start < kept.len() {
                let end = (start + chunk).min(kept.len());
                let rest = kept[..start].iter().chain(&kept[end..]).copied();
                let candidate = self.with_writers_read(rest);
                if candidate.len() < kept.len() {
                    if let Some(found) = self.fails(model, &candidate, must_fail_at(culprit)) {
                        (kept, culprit) = (candidate, found);
                        removed_any = true;
                        continue;
                    }
                }
                if self.steps_left == 0 {
                    return Witness { operations: kept, culprit, stands_alone, minimal: false, verified: true };
                }
                start = end;
            }
            if chunk == 1 && !removed_any {
                return Witness { operations: kept, culprit, stands_alone, minimal: true, verified: true };
            }
            chunk = (chunk / 2).max(1);
        }
    }

    /// The culprit, what ran concurrently with it, the operations that completed just before
    /// it and the writes they read: where a human should look when no witness was found.
    fn around_culprit(&self, culprit: usize) -> Witness {
        let culprit_op = &self.operations[culprit];
        let mut by_completion: Vec<usize> = (0..self.operations.len()).collect();
        by_completion.sort_by_key(|&i| (self.operations[i].completed_us, i));
        let concurrent = (0..self.operations.len()).filter(|&i| {
            let op = &self.operations[i];
            op.invoked_us <= culprit_op.completed_us && op.completed_us >= culprit_op.invoked_us
        });
        let before = by_completion
            .iter()
            .copied()
            .filter(|&i| self.operations[i].completed_us < culprit_op.invoked_us)
            .rev()
            .take(AROUND_CULPRIT_OPS_MAX / 2);
        let around = [culprit].into_iter().chain(concurrent.take(AROUND_CULPRIT_OPS_MAX / 2)).chain(before);
        Witness {
            operations: self.with_writers_read(around),
            culprit,
            stands_alone: false,
            minimal: false,
            verified: false,
        }
    }
}

/// For each operation that read a value, the operations (not Failed) that wrote it.
fn writers_read<M: Model>(model: &M, operations: &[Operation]) -> Vec<Vec<usize>> {
    let mut writers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, op) in operations.iter().enumerate() {
        if matches!(op.outcome, Outcome::Failed { .. }) {
            continue;
        }
        if let Some(value) = model.value_written(&op.call) {
            writers.entry(value).or_default().push(i);
        }
    }
    operations
        .iter()
        .map(|op| match &op.outcome {
            Outcome::Ok { returned } => {
                model.value_read(returned).and_then(|value| writers.get(&value).cloned()).unwrap_or_default()
            }
            _ => Vec::new(),
        })
        .collect()
}

fn invocation_order(operations: &[Operation], indices: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut ordered: Vec<usize> = indices.into_iter().collect();
    ordered.sort_by_key(|&i| (operations[i].invoked_us, i));
    ordered
}

const HEAD: usize = 0;
const NONE: usize = usize::MAX;

/// One invocation or completion in the search's doubly linked list.
struct Entry {
    /// Index into the search's operations.
    op: usize,
    is_call: bool,
    /// For an invocation, its operation's completion entry (NONE when Unknown).
    completion: usize,
    prev: usize,
    next: usize,
}

/// An operation as the search sees it.
struct SearchOp {
    /// Index into the operations given to `check`.
    original: usize,
    call: Call,
    /// None when Unknown.
    returned: Option<Returned>,
    /// The latest Unknown operation invoked before this one (this one being Unknown) with an
    /// equal call.
    earlier_twin: Option<usize>,
}

fn prepare<M: Model>(model: &M, operations: &[Operation]) -> (Vec<SearchOp>, Vec<Entry>) {
    let calls = model.merge_unread_values(operations);
    let mut ops: Vec<SearchOp> = Vec::new();
    // (time, 0 for an invocation and 1 for a completion, op): at equal times invocations come
    // first, so operations that merely touch count as concurrent, the lenient reading.
    let mut events: Vec<(Micros, u8, usize)> = Vec::new();
    let mut latest_unknown_twin: HashMap<String, usize> = HashMap::new();

    for original in invocation_order(operations, 0..operations.len()) {
        let operation = &operations[original];
        let returned = match &operation.outcome {
            Outcome::Ok { returned } => Some(returned.clone()),
            Outcome::Failed { .. } => continue,
            Outcome::Unknown { .. } if model.is_read(&operation.call) => continue,
            Outcome::Unknown { .. } => None,
        };
        let call = calls.get(original).cloned().unwrap_or_else(|| operation.call.clone());
        let op = ops.len();
        let earlier_twin = match returned {
            Some(_) => None,
            None => latest_unknown_twin.insert(format!("{call:?}"), op),
        };
        events.push((operation.invoked_us, 0, op));
        if returned.is_some() {
            // A completion before its invocation is a malformed history; clamping keeps the
            // search well defined (the history checks report it).
            events.push((operation.completed_us.max(operation.invoked_us), 1, op));
        }
        ops.push(SearchOp { original, call, returned, earlier_twin });
    }
    events.sort_unstable();

    let mut entries: Vec<Entry> = Vec::with_capacity(events.len() + 1);
    entries.push(Entry { op: NONE, is_call: false, completion: NONE, prev: NONE, next: NONE });
    let mut call_entry_of = vec![NONE; ops.len()];
    for (position, &(_, kind, op)) in events.iter().enumerate() {
        let index = position + 1;
        let next = if position + 1 < events.len() { index + 1 } else { NONE };
        entries.push(Entry { op, is_call: kind == 0, completion: NONE, prev: index - 1, next });
        if kind == 0 {
            call_entry_of[op] = index;
        } else if let Some(call_entry) = entries.get_mut(call_entry_of[op]) {
            call_entry.completion = index;
        }
    }
    entries[HEAD].next = if events.is_empty() { NONE } else { 1 };
    (ops, entries)
}

/// Takes a linearized operation's invocation and completion out of the list.
fn unlink(entries: &mut [Entry], call_entry: usize) {
    remove(entries, call_entry);
    let completion = entries[call_entry].completion;
    if completion != NONE {
        remove(entries, completion);
    }
}

/// Undoes [`unlink`]; entries are relinked in the reverse order of their unlinking.
fn relink(entries: &mut [Entry], call_entry: usize) {
    let completion = entries[call_entry].completion;
    if completion != NONE {
        restore(entries, completion);
    }
    restore(entries, call_entry);
}

fn remove(entries: &mut [Entry], entry: usize) {
    let (prev, next) = (entries[entry].prev, entries[entry].next);
    entries[prev].next = next;
    if next != NONE {
        entries[next].prev = prev;
    }
}

fn restore(entries: &mut [Entry], entry: usize) {
    let (prev, next) = (entries[entry].prev, entries[entry].next);
    entries[prev].next = entry;
    if next != NONE {
        entries[next].prev = entry;
    }
}

/// One operation's random key: the key of a set of operations is the XOR of its members'.
fn zobrist_key(op: usize) -> u128 {
    let op = op as u64;
    let high = splitmix64(op.wrapping_mul(2));
    let low = splitmix64(op.wrapping_mul(2).wrapping_add(1));
    (u128::from(high) << 64) | u128::from(low)
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
