//! Unit and property tests of the metadata state machine, over [`MemoryStore`].

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::kv::*;
use crate::schema::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn proposal(command: Command) -> Proposal {
    Proposal { request_id: None, proposed_at_ms: 0, command }
}

fn proposal_with_id(client_id: u64, sequence: u64, proposed_at_ms: u64, command: Command) -> Proposal {
    Proposal { request_id: Some(RequestId { client_id, sequence }), proposed_at_ms, command }
}

/// Applies a command without request id at time 0; a `StoreError` fails the test.
fn run(store: &mut MemoryStore, command: Command) -> CommandResult {
    apply(store, &proposal(command)).expect("memory store never fails")
}

fn run_proposal(store: &mut MemoryStore, proposal: &Proposal) -> CommandResult {
    apply(store, proposal).expect("memory store never fails")
}

fn create(key: &[u8], value: &[u8]) -> Command {
    Command::Create { key: key.to_vec(), value: value.to_vec(), session_id: None }
}

fn create_in(key: &[u8], value: &[u8], session_id: u64) -> Command {
    Command::Create { key: key.to_vec(), value: value.to_vec(), session_id: Some(session_id) }
}

fn set(key: &[u8], value: &[u8], expected_version: Option<u64>) -> Command {
    Command::Set { key: key.to_vec(), value: value.to_vec(), expected_version, session_id: None }
}

fn set_in(key: &[u8], value: &[u8], session_id: u64) -> Command {
    Command::Set { key: key.to_vec(), value: value.to_vec(), expected_version: None, session_id: Some(session_id) }
}

fn delete(key: &[u8], expected_version: Option<u64>) -> Command {
    Command::Delete { key: key.to_vec(), expected_version }
}

fn revision(store: &MemoryStore) -> u64 {
    current_revision(store).expect("revision")
}

fn record(store: &MemoryStore, key: &[u8]) -> Option<KeyRecord> {
    get_key(store, key).expect("get_key")
}

fn open_session(store: &mut MemoryStore, ttl_ms: u64) -> u64 {
    match run(store, Command::SessionOpen { ttl_ms }) {
        Ok(Outcome::SessionOpened { session_id, ttl_ms: granted }) => {
            assert_eq!(granted, ttl_ms);
            session_id
        }
        other => panic!("unexpected session open result {other:?}"),
    }
}

/// The revision a successful write reports.
fn written_revision(result: &CommandResult) -> u64 {
    match result {
        Ok(Outcome::Written { revision, .. }) => *revision,
        other => panic!("expected a write, got {other:?}"),
    }
}

fn all_events(store: &MemoryStore) -> Vec<(u64, Vec<Event>)> {
    events_between(store, 0, usize::MAX, b"", true).expect("events")
}

fn events_at(store: &MemoryStore, revision: u64) -> Vec<Event> {
    let rows = events_between(store, revision, 1, b"", true).expect("events");
    assert_eq!(rows.len(), 1, "no events stored for revision {revision}");
    assert_eq!(rows[0].0, revision);
    rows[0].1.clone()
}

fn all_keys(store: &MemoryStore) -> BTreeMap<Vec<u8>, KeyRecord> {
    store
        .range(Table::Keys, &[], None, usize::MAX)
        .expect("keys")
        .into_iter()
        .map(|(key, value)| (key, decode(&value).expect("record")))
        .collect()
}

fn table_len(store: &MemoryStore, table: Table) -> usize {
    store.range(table, &[], None, usize::MAX).expect("range").len()
}

/// Checks the cross-table invariants: every session-owned key belongs to a live session and is
/// indexed under it, and every index entry points at a key the session still owns.
fn check_session_invariants(store: &MemoryStore) {
    let keys = all_keys(store);
    let live: BTreeSet<u64> = list_sessions(store).expect("sessions").into_iter().map(|(id, _)| id).collect();
    let index: BTreeSet<(u64, Vec<u8>)> = store
        .range(Table::SessionKeys, &[], None, usize::MAX)
        .expect("range")
        .into_iter()
        .map(|(entry, _)| {
            assert!(entry.len() >= 8, "malformed session key entry {entry:?}");
            let id = u64::from_be_bytes(entry[..8].try_into().expect("8 bytes"));
            (id, entry[8..].to_vec())
        })
        .collect();
    let owned: BTreeSet<(u64, Vec<u8>)> = keys
        .iter()
        .filter(|(_, record)| record.session_id != 0)
        .map(|(key, record)| (record.session_id, key.clone()))
        .collect();
    assert_eq!(index, owned, "session key index disagrees with the keys' session ids");
    for (session_id, key) in &owned {
        assert!(live.contains(session_id), "key {key:?} owned by dead session {session_id}");
    }
    check_usage_counters(store);
}

/// The quota's running counters equal what the tables hold, recounted.
fn check_usage_counters(store: &MemoryStore) {
    let usage = kv_usage(store).expect("usage");
    let key_bytes: u64 = store
        .range(Table::Keys, &[], None, usize::MAX)
        .expect("keys")
        .iter()
        .map(|(key, value)| (key.len() + value.len()) as u64)
        .sum();
    let history_bytes: u64 = store
        .range(Table::Events, &[], None, usize::MAX)
        .expect("events")
        .iter()
        .map(|(key, value)| (key.len() + value.len()) as u64)
        .sum();
    assert_eq!(usage.key_bytes, key_bytes, "the key byte counter drifted");
    assert_eq!(usage.history_bytes, history_bytes, "the history byte counter drifted");
    assert_eq!(usage.sessions, table_len(store, Table::Sessions) as u64, "the session counter drifted");
}

// ---------------------------------------------------------------------------------------------
// Create / Set: versions, revisions, CAS
// ---------------------------------------------------------------------------------------------

#[test]
fn create_new_key_starts_at_version_one() {
    let mut store = MemoryStore::default();
    assert_eq!(revision(&store), 0);
    let result = run(&mut store, create(b"a", b"1"));
    let expected =
        KeyRecord { value: b"1".to_vec(), version: 1, create_revision: 1, modify_revision: 1, session_id: 0 };
    assert_eq!(
        result,
        Ok(Outcome::Written {
            revision: 1,
            kv: Some(KeyValue { key: b"a".to_vec(), record: KeyRecord { value: Vec::new(), ..expected.clone() } }),
            deleted: false
        })
    );
    assert_eq!(revision(&store), 1);
    assert_eq!(record(&store, b"a"), Some(expected.clone()));
    assert_eq!(events_at(&store, 1), vec![Event { kind: EventKind::Put, key: b"a".to_vec(), record: expected }]);
}

#[test]
fn create_on_existing_key_fails_with_key_exists_and_changes_nothing() {
    let mut store = MemoryStore::default();
    run(&mut store, create(b"a", b"1")).expect("create");
    run(&mut store, set(b"a", b"2", None)).expect("set");
    let before = store.clone();
    assert_eq!(run(&mut store, create(b"a", b"3")), Err(CommandError::KeyExists { version: 2 }));
    assert_eq!(store, before);
    assert_eq!(record(&store, b"a").expect("a").value, b"2");
}

#[test]
fn versions_and_revisions_follow_etcd_semantics() {
    let mut store = MemoryStore::default();
    assert_eq!(written_revision(&run(&mut store, create(b"a", b"1"))), 1);
    assert_eq!(written_revision(&run(&mut store, create(b"b", b"1"))), 2);
    assert_eq!(written_revision(&run(&mut store, set(b"a", b"2", None))), 3);
    assert_eq!(written_revision(&run(&mut store, set(b"a", b"3", None))), 4);

    let a = record(&store, b"a").expect("a");
    assert_eq!((a.version, a.create_revision, a.modify_revision), (3, 1, 4));
    assert_eq!(a.value, b"3");
    let b = record(&store, b"b").expect("b");
    assert_eq!((b.version, b.create_revision, b.modify_revision), (1, 2, 2));

    // Set on a missing key creates it.
    let c = run(&mut store, set(b"c", b"1", None));
    assert_eq!(written_revision(&c), 5);
    let c = record(&store, b"c").expect("c");
    assert_eq!((c.version, c.create_revision, c.modify_revision), (1, 5, 5));

    // After a delete, the key starts over: version 1, new create revision.
    assert_eq!(written_revision(&run(&mut store, delete(b"a", None))), 6);
    assert_eq!(record(&store, b"a"), None);
    assert_eq!(written_revision(&run(&mut store, set(b"a", b"again", None))), 7);
    let a = record(&store, b"a").expect("a");
    assert_eq!((a.version, a.create_revision, a.modify_revision), (1, 7, 7));

    // The other keys are untouched by writes to a.
    assert_eq!(record(&store, b"b").expect("b").modify_revision, 2);
}

#[test]
fn set_outcome_carries_the_new_record_without_its_value() {
    let mut store = MemoryStore::default();
    run(&mut store, create(b"k", b"v1")).expect("create");
    let result = run(&mut store, set(b"k", b"v2", Some(1)));
    let expected =
        KeyRecord { value: b"v2".to_vec(), version: 2, create_revision: 1, modify_revision: 2, session_id: 0 };
    assert_eq!(
        result,
        Ok(Outcome::Written {
            revision: 2,
            kv: Some(KeyValue { key: b"k".to_vec(), record: KeyRecord { value: Vec::new(), ..expected.clone() } }),
            deleted: false
        })
    );
    assert_eq!(record(&store, b"k"), Some(expected));
}

#[test]
fn set_with_wrong_expected_version_names_both_versions() {
    let mut store = MemoryStore::default();
    run(&mut store, create(b"a", b"1")).expect("create");
    run(&mut store, set(b"a", b"2", None)).expect("set");
    let before = store.clone();

    let refused = run(&mut store, set(b"a", b"x", Some(5)));
    assert_eq!(refused, Err(CommandError::VersionMismatch { expected: 5, actual: 2 }));
    let message = refused.expect_err("refused").to_string();
    assert!(message.contains('5') && message.contains('2'), "message should name both versions: {message}");
    assert_eq!(store, before);

    // A missing key has version 0.
    assert_eq!(
        run(&mut store, set(b"missing", b"x", Some(1))),
        Err(CommandError::VersionMismatch { expected: 1, actual: 0 })
    );
    assert_eq!(store, before);

    // The right version goes through.
    assert_eq!(written_revision(&run(&mut store, set(b"a", b"3", Some(2)))), 3);
    assert_eq!(record(&store, b"a").expect("a").version, 3);
}

#[test]
fn expected_version_zero_means_must_not_exist() {
    let mut store = MemoryStore::default();
    // Set with expected 0 on a missing key creates it.
    assert_eq!(written_revision(&run(&mut store, set(b"a", b"1", Some(0)))), 1);
    assert_eq!(record(&store, b"a").expect("a").version, 1);
    // ... and is refused once the key exists.
    let before = store.clone();
    assert_eq!(
        run(&mut store, set(b"a", b"2", Some(0))),
        Err(CommandError::VersionMismatch { expected: 0, actual: 1 })
    );
    // Delete with expected 0 on an existing key is refused too.
    assert_eq!(run(&mut store, delete(b"a", Some(0))), Err(CommandError::VersionMismatch { expected: 0, actual: 1 }));
    assert_eq!(store, before);
    // Delete with expected 0 on a missing key is a successful no-op.
    assert_eq!(run(&mut store, delete(b"b", Some(0))), Ok(Outcome::Written { revision: 1, kv: None, deleted: false }));
    assert_eq!(store, before);
}

#[test]
fn revision_bumps_once_per_successful_mutation_and_never_on_refusal() {
    let mut store = MemoryStore::default();
    let session = open_session(&mut store, 1_000);
    let steps: Vec<(Command, u64)> = vec![
        (create(b"a", b"1"), 1),
        (create(b"a", b"1"), 0),                 // KeyExists
        (set(b"a", b"2", Some(7)), 0),           // VersionMismatch
        (set(b"a", b"2", Some(1)), 1),           // CAS ok
        (set(b"a", b"3", None), 1),              // blind set
        (create_in(b"e", b"1", 99), 0),          // SessionNotFound
        (set_in(b"e", b"1", 99), 0),             // SessionNotFound
        (create_in(b"e", b"1", session), 1),     // ephemeral key
        (delete(b"missing", None), 0),           // no-op
        (delete(b"a", Some(1)), 0),              // VersionMismatch
        (Command::SessionOpen { ttl_ms: 5 }, 0), // sessions are not keyspace revisions
        (Command::InitCluster { cluster_id: "c".into() }, 0),
        (Command::SessionClose { session_id: 12345 }, 0), // unknown session
        (delete(b"a", Some(3)), 1),
        (Command::SessionClose { session_id: session }, 1), // deletes "e"
    ];
    for (index, (command, bump)) in steps.into_iter().enumerate() {
        let before = revision(&store);
        let result = run(&mut store, command.clone());
        assert_eq!(revision(&store), before + bump, "step {index}: {command:?} -> {result:?}");
        match &result {
            Ok(Outcome::Written { revision: reported, .. }) | Ok(Outcome::SessionClosed { revision: reported, .. }) => {
                assert_eq!(*reported, before + bump, "step {index}: reported revision")
            }
            Err(_) => assert_eq!(bump, 0, "step {index}: refused command must not bump"),
            _ => {}
        }
    }
    // Exactly one history entry per revision, none for refused commands.
    let history = all_events(&store);
    let revisions: Vec<u64> = history.iter().map(|(revision, _)| *revision).collect();
    assert_eq!(revisions, (1..=revision(&store)).collect::<Vec<_>>());
    assert!(history.iter().all(|(_, events)| !events.is_empty()));
}

#[test]
fn refused_commands_leave_the_store_unchanged() {
    let mut store = MemoryStore::default();
    let session = open_session(&mut store, 1_000);
    run(&mut store, create(b"a", b"1")).expect("create");
    run(&mut store, create_in(b"e", b"1", session)).expect("create");
    let before = store.clone();
    for command in [
        create(b"a", b"x"),
        set(b"a", b"x", Some(2)),
        set(b"b", b"x", Some(1)),
        delete(b"a", Some(9)),
        delete(b"b", Some(1)),
        create_in(b"z", b"x", session + 1),
        set_in(b"a", b"x", session + 1),
        set_in(b"e", b"x", session + 1),
    ] {
        let result = run(&mut store, command.clone());
        assert!(result.is_err(), "{command:?} should be refused, got {result:?}");
        assert_eq!(store, before, "{command:?} changed the store");
    }
}

// ---------------------------------------------------------------------------------------------
// Delete
// ---------------------------------------------------------------------------------------------

#[test]
fn delete_without_expected_version() {
    let mut store = MemoryStore::default();
    run(&mut store, create(b"a", b"1")).expect("create");
    run(&mut store, set(b"a", b"2", None)).expect("set");
    let result = run(&mut store, delete(b"a", None));
    assert_eq!(result, Ok(Outcome::Written { revision: 3, kv: None, deleted: true }));
    assert_eq!(record(&store, b"a"), None);
    assert_eq!(revision(&store), 3);
    // The delete event carries the last record with an empty value.
    assert_eq!(
        events_at(&store, 3),
        vec![Event {
            kind: EventKind::Delete,
            key: b"a".to_vec(),
            record: KeyRecord { value: Vec::new(), version: 2, create_revision: 1, modify_revision: 2, session_id: 0 },
        }]
    );
}

#[test]
fn delete_with_expected_version() {
    let mut store = MemoryStore::default();
    run(&mut store, create(b"a", b"1")).expect("create");
    run(&mut store, set(b"a", b"2", None)).expect("set");
    let before = store.clone();
    assert_eq!(run(&mut store, delete(b"a", Some(1))), Err(CommandError::VersionMismatch { expected: 1, actual: 2 }));
    assert_eq!(store, before);
    assert_eq!(run(&mut store, delete(b"a", Some(2))), Ok(Outcome::Written { revision: 3, kv: None, deleted: true }));
    assert_eq!(record(&store, b"a"), None);
    // Deleting again with the old version: the key is gone, its version is 0.
    assert_eq!(run(&mut store, delete(b"a", Some(2))), Err(CommandError::VersionMismatch { expected: 2, actual: 0 }));
}

#[test]
fn delete_of_missing_key_is_a_noop_without_new_revision() {
    let mut store = MemoryStore::default();
    run(&mut store, create(b"a", b"1")).expect("create");
    let before = store.clone();
    assert_eq!(run(&mut store, delete(b"b", None)), Ok(Outcome::Written { revision: 1, kv: None, deleted: false }));
    assert_eq!(store, before);
    assert_eq!(revision(&store), 1);
    assert_eq!(all_events(&store).len(), 1);

    // Also on an empty store.
    let mut empty = MemoryStore::default();
    assert_eq!(run(&mut empty, delete(b"x", None)), Ok(Outcome::Written { revision: 0, kv: None, deleted: false }));
    assert_eq!(revision(&empty), 0);
    assert!(all_events(&empty).is_empty());
}

#[test]
fn init_cluster_keeps_the_first_id() {
    let mut store = MemoryStore::default();
    assert_eq!(cluster_id(&store).expect("cluster id"), None);
    assert_eq!(
        run(&mut store, Command::InitCluster { cluster_id: "first".into() }),
        Ok(Outcome::ClusterId { cluster_id: "first".into() })
    );
    assert_eq!(
        run(&mut store, Command::InitCluster { cluster_id: "second".into() }),
        Ok(Outcome::ClusterId { cluster_id: "first".into() })
    );
    assert_eq!(cluster_id(&store).expect("cluster id"), Some("first".into()));
    assert_eq!(revision(&store), 0);
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

#[test]
fn session_open_gives_increasing_ids() {
    let mut store = MemoryStore::default();
    let ids: Vec<u64> = (0..5).map(|i| open_session(&mut store, 1_000 + i)).collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "ids not increasing: {ids:?}");
    assert!(ids.iter().all(|id| *id != 0), "0 means no session and must never be handed out: {ids:?}");
    assert_eq!(get_session(&store, ids[2]).expect("session"), Some(SessionRecord { ttl_ms: 1_002 }));
    assert_eq!(
        list_sessions(&store).expect("sessions"),
        ids.iter().zip(0..).map(|(id, i)| (*id, SessionRecord { ttl_ms: 1_000 + i })).collect::<Vec<_>>()
    );
    // Ids are never reused, even after the newest session ends.
    let last = *ids.last().expect("ids");
    run(&mut store, Command::SessionClose { session_id: last }).expect("close");
    assert!(open_session(&mut store, 1) > last);
}

fn check_session_end_deletes_ephemeral_keys(end: fn(u64) -> Command) {
    let mut store = MemoryStore::default();
    let session = open_session(&mut store, 5_000);
    let other = open_session(&mut store, 5_000);
    run(&mut store, create_in(b"eph/2", b"x", session)).expect("create");
    run(&mut store, create(b"persistent", b"p")).expect("create");
    run(&mut store, set_in(b"eph/1", b"y", session)).expect("set");
    run(&mut store, set_in(b"eph/3", b"z", session)).expect("set");
    run(&mut store, set_in(b"eph/3", b"z2", session)).expect("set again in the same session");
    run(&mut store, create_in(b"other", b"o", other)).expect("create");
    let eph1 = record(&store, b"eph/1").expect("eph/1");
    let eph2 = record(&store, b"eph/2").expect("eph/2");
    let eph3 = record(&store, b"eph/3").expect("eph/3");
    assert_eq!(eph3.session_id, session);
    assert_eq!(eph3.version, 2);
    check_session_invariants(&store);

    let before = revision(&store);
    assert_eq!(run(&mut store, end(session)), Ok(Outcome::SessionClosed { revision: before + 1, found: true }));
    assert_eq!(revision(&store), before + 1, "all of a session's keys go in one revision");

    for key in [&b"eph/1"[..], b"eph/2", b"eph/3"] {
        assert_eq!(record(&store, key), None, "{key:?} survived its session");
    }
    assert!(record(&store, b"persistent").is_some());
    assert!(record(&store, b"other").is_some());
    assert_eq!(get_session(&store, session).expect("session"), None);
    assert!(get_session(&store, other).expect("session").is_some());

    let tombstone = |key: &[u8], record: KeyRecord| Event {
        kind: EventKind::Delete,
        key: key.to_vec(),
        record: KeyRecord { value: Vec::new(), ..record },
    };
    let mut events = events_at(&store, before + 1);
    events.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(events, vec![tombstone(b"eph/1", eph1), tombstone(b"eph/2", eph2), tombstone(b"eph/3", eph3)]);
    check_session_invariants(&store);

    // Ending it again finds nothing and changes nothing.
    let after = store.clone();
    assert_eq!(run(&mut store, end(session)), Ok(Outcome::SessionClosed { revision: before + 1, found: false }));
    assert_eq!(store, after);
    // Its id is now unknown to writes.
    assert_eq!(
        run(&mut store, create_in(b"late", b"x", session)),
        Err(CommandError::SessionNotFound { session_id: session })
    );
}

#[test]
fn session_close_deletes_ephemeral_keys_in_one_revision() {
    check_session_end_deletes_ephemeral_keys(|session_id| Command::SessionClose { session_id });
}

#[test]
fn session_expire_deletes_ephemeral_keys_in_one_revision() {
    check_session_end_deletes_ephemeral_keys(|session_id| Command::SessionExpire { session_id });
}

#[test]
fn session_without_keys_ends_without_new_revision() {
    let mut store = MemoryStore::default();
    run(&mut store, create(b"a", b"1")).expect("create");
    let session = open_session(&mut store, 1_000);
    assert_eq!(
        run(&mut store, Command::SessionExpire { session_id: session }),
        Ok(Outcome::SessionClosed { revision: 1, found: true })
    );
    assert_eq!(revision(&store), 1);
    assert_eq!(get_session(&store, session).expect("session"), None);
    // Unknown ids are reported as not found.
    assert_eq!(
        run(&mut store, Command::SessionClose { session_id: 777 }),
        Ok(Outcome::SessionClosed { revision: 1, found: false })
    );
    assert_eq!(revision(&store), 1);
}

#[test]
fn key_reset_without_session_survives_session_end() {
    let mut store = MemoryStore::default();
    let session = open_session(&mut store, 1_000);
    run(&mut store, create_in(b"detached", b"1", session)).expect("create");
    run(&mut store, create_in(b"attached", b"1", session)).expect("create");
    run(&mut store, set(b"detached", b"2", None)).expect("set");
    let detached = record(&store, b"detached").expect("detached");
    assert_eq!(detached.session_id, 0);
    assert_eq!(detached.version, 2);
    check_session_invariants(&store);

    let before = revision(&store);
    assert_eq!(
        run(&mut store, Command::SessionClose { session_id: session }),
        Ok(Outcome::SessionClosed { revision: before + 1, found: true })
    );
    assert_eq!(record(&store, b"detached"), Some(detached));
    assert_eq!(record(&store, b"attached"), None);
    let events = events_at(&store, before + 1);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].key, b"attached");
    assert_eq!(events[0].kind, EventKind::Delete);
    check_session_invariants(&store);
}

#[test]
fn key_moved_to_another_session_follows_the_new_one() {
    let mut store = MemoryStore::default();
    let first = open_session(&mut store, 1_000);
    let second = open_session(&mut store, 1_000);
    run(&mut store, create_in(b"k", b"1", first)).expect("create");
    run(&mut store, set_in(b"k", b"2", second)).expect("move");
    assert_eq!(record(&store, b"k").expect("k").session_id, second);
    check_session_invariants(&store);

    let before = revision(&store);
    // Only key was moved away: closing the first session deletes nothing, no revision.
    assert_eq!(
        run(&mut store, Command::SessionClose { session_id: first }),
        Ok(Outcome::SessionClosed { revision: before, found: true })
    );
    assert!(record(&store, b"k").is_some());
    assert_eq!(revision(&store), before);
    // Closing the second one does.
    assert_eq!(
        run(&mut store, Command::SessionExpire { session_id: second }),
        Ok(Outcome::SessionClosed { revision: before + 1, found: true })
    );
    assert_eq!(record(&store, b"k"), None);
    check_session_invariants(&store);
}

#[test]
fn ephemeral_key_deleted_and_recreated_persistent_survives_session_end() {
    let mut store = MemoryStore::default();
    let session = open_session(&mut store, 1_000);
    run(&mut store, create_in(b"k", b"1", session)).expect("create");
    run(&mut store, delete(b"k", None)).expect("delete");
    run(&mut store, create(b"k", b"2")).expect("recreate");
    check_session_invariants(&store);
    let before = store.clone();
    let rev = revision(&store);
    assert_eq!(
        run(&mut store, Command::SessionClose { session_id: session }),
        Ok(Outcome::SessionClosed { revision: rev, found: true })
    );
    assert_eq!(record(&store, b"k"), record(&before, b"k"));
    assert_eq!(revision(&store), rev);
}

#[test]
fn put_with_unknown_session_is_refused() {
    let mut store = MemoryStore::default();
    run(&mut store, create(b"a", b"1")).expect("create");
    let before = store.clone();
    assert_eq!(run(&mut store, create_in(b"b", b"1", 42)), Err(CommandError::SessionNotFound { session_id: 42 }));
    assert_eq!(run(&mut store, set_in(b"a", b"2", 42)), Err(CommandError::SessionNotFound { session_id: 42 }));
    assert_eq!(
        run(
            &mut store,
            Command::Set { key: b"a".to_vec(), value: b"2".to_vec(), expected_version: Some(1), session_id: Some(42) }
        ),
        Err(CommandError::SessionNotFound { session_id: 42 })
    );
    assert_eq!(store, before);
    assert_eq!(record(&store, b"a").expect("a").version, 1);
}

#[test]
fn session_end_only_touches_its_own_keys_across_byte_boundaries() {
    // Session ids 255 and 256 differ in two bytes of their big-endian prefix in SessionKeys.
    let mut store = MemoryStore::default();
    let mut ids = Vec::new();
    for _ in 0..257 {
        ids.push(open_session(&mut store, 1));
    }
    assert_eq!(&ids[254..], &[255, 256, 257]);
    for id in [255u64, 256, 257] {
        run(&mut store, create_in(format!("k{id}").as_bytes(), b"x", id)).expect("create");
        run(&mut store, create_in(format!("k{id}b").as_bytes(), b"x", id)).expect("create");
    }
    run(&mut store, Command::SessionExpire { session_id: 255 }).expect("expire");
    let remaining: Vec<Vec<u8>> = all_keys(&store).into_keys().collect();
    assert_eq!(remaining, vec![b"k256".to_vec(), b"k256b".to_vec(), b"k257".to_vec(), b"k257b".to_vec()]);
    run(&mut store, Command::SessionClose { session_id: 256 }).expect("close");
    let remaining: Vec<Vec<u8>> = all_keys(&store).into_keys().collect();
    assert_eq!(remaining, vec![b"k257".to_vec(), b"k257b".to_vec()]);
    check_session_invariants(&store);
}

#[test]
fn session_id_zero_means_no_session() {
    let mut store = MemoryStore::default();
    assert_eq!(written_revision(&run(&mut store, create_in(b"a", b"1", 0))), 1);
    assert_eq!(record(&store, b"a").expect("a").session_id, 0);
    assert_eq!(table_len(&store, Table::SessionKeys), 0);
}

// ---------------------------------------------------------------------------------------------
// Deduplication
// ---------------------------------------------------------------------------------------------

#[test]
fn same_proposal_twice_returns_same_result_and_changes_nothing() {
    let mut store = MemoryStore::default();
    let first = proposal_with_id(7, 1, 1_000, create(b"a", b"1"));
    let result = run_proposal(&mut store, &first);
    assert_eq!(written_revision(&result), 1);
    let after_first = store.clone();

    // The retry would fail with KeyExists if executed again; it gets the first answer instead.
    assert_eq!(run_proposal(&mut store, &first), result);
    assert_eq!(store, after_first);

    // A retry of a set would bump the version if executed again.
    let set_once = proposal_with_id(7, 2, 1_001, set(b"a", b"2", None));
    let set_result = run_proposal(&mut store, &set_once);
    let after_set = store.clone();
    assert_eq!(run_proposal(&mut store, &set_once), set_result);
    assert_eq!(store, after_set);
    assert_eq!(record(&store, b"a").expect("a").version, 2);
    assert_eq!(revision(&store), 2);
}

#[test]
fn dedup_remembers_refusals_and_session_opens() {
    let mut store = MemoryStore::default();
    run(&mut store, create(b"a", b"1")).expect("create");
    // A refused CAS is remembered as refused even if it would now succeed.
    let cas = proposal_with_id(1, 1, 10, set(b"a", b"x", Some(2)));
    let refused = run_proposal(&mut store, &cas);
    assert_eq!(refused, Err(CommandError::VersionMismatch { expected: 2, actual: 1 }));
    run(&mut store, set(b"a", b"2", None)).expect("set");
    let before = store.clone();
    assert_eq!(run_proposal(&mut store, &cas), refused);
    assert_eq!(store, before);

    // A retried session open does not open a second session.
    let open = proposal_with_id(1, 2, 10, Command::SessionOpen { ttl_ms: 500 });
    let opened = run_proposal(&mut store, &open);
    let before = store.clone();
    assert_eq!(run_proposal(&mut store, &open), opened);
    assert_eq!(store, before);
    assert_eq!(list_sessions(&store).expect("sessions").len(), 1);
}

#[test]
fn different_request_ids_are_executed_separately() {
    let mut store = MemoryStore::default();
    assert!(run_proposal(&mut store, &proposal_with_id(1, 1, 0, create(b"a", b"1"))).is_ok());
    // Same sequence, other client; same client, other sequence: both are new requests.
    assert_eq!(
        run_proposal(&mut store, &proposal_with_id(2, 1, 0, create(b"a", b"1"))),
        Err(CommandError::KeyExists { version: 1 })
    );
    assert_eq!(
        run_proposal(&mut store, &proposal_with_id(1, 2, 0, create(b"a", b"1"))),
        Err(CommandError::KeyExists { version: 1 })
    );
    // Proposals without request id are never deduplicated.
    run(&mut store, set(b"a", b"2", None)).expect("set");
    run(&mut store, set(b"a", b"2", None)).expect("set");
    assert_eq!(record(&store, b"a").expect("a").version, 3);
}

#[test]
fn dedup_records_expire_after_the_window() {
    let t0 = 1_000_000;
    let mut store = MemoryStore::default();
    let original = proposal_with_id(3, 9, t0, create(b"a", b"1"));
    let result = run_proposal(&mut store, &original);
    assert!(result.is_ok());

    // A retry proposed exactly at the end of the window is still deduplicated.
    let retry = |at: u64| Proposal { proposed_at_ms: at, ..original.clone() };
    assert_eq!(run_proposal(&mut store, &retry(t0 + DEDUP_WINDOW_MS)), result);
    assert_eq!(revision(&store), 1);
    // Past the window the record is gone and the command runs again.
    assert_eq!(run_proposal(&mut store, &retry(t0 + DEDUP_WINDOW_MS + 1)), Err(CommandError::KeyExists { version: 1 }));
    assert_eq!(revision(&store), 1);
    // The re-execution's outcome is remembered afresh.
    assert_eq!(run_proposal(&mut store, &retry(t0 + DEDUP_WINDOW_MS + 2)), Err(CommandError::KeyExists { version: 1 }));
    assert_eq!(table_len(&store, Table::Dedup), 1);
    assert_eq!(table_len(&store, Table::DedupByTime), 1);
}

#[test]
fn dedup_expiry_follows_the_newest_proposal_time_seen() {
    let t0 = 5_000;
    let mut store = MemoryStore::default();
    let original = proposal_with_id(1, 1, t0, set(b"a", b"1", None));
    let result = run_proposal(&mut store, &original);
    assert_eq!(written_revision(&result), 1);

    // Some other entry, proposed past the window, advances the clock and expires the record...
    run_proposal(
        &mut store,
        &Proposal { request_id: None, proposed_at_ms: t0 + DEDUP_WINDOW_MS + 1, command: create(b"b", b"1") },
    )
    .expect("create b");
    assert_eq!(table_len(&store, Table::Dedup), 0);
    assert_eq!(table_len(&store, Table::DedupByTime), 0);
    // ... so a retry carrying an old (skewed) timestamp is executed again.
    assert_eq!(written_revision(&run_proposal(&mut store, &original)), 3);
    assert_eq!(record(&store, b"a").expect("a").version, 2);
}

#[test]
fn expired_dedup_records_drain_over_later_applies() {
    let mut store = MemoryStore::default();
    for sequence in 0..200 {
        run_proposal(
            &mut store,
            &proposal_with_id(1, sequence, sequence, Command::InitCluster { cluster_id: "c".into() }),
        )
        .expect("init");
    }
    assert_eq!(table_len(&store, Table::Dedup), 200);
    let late = 200 + DEDUP_WINDOW_MS + 1;
    for _ in 0..10 {
        run_proposal(&mut store, &Proposal { request_id: None, proposed_at_ms: late, command: delete(b"x", None) })
            .expect("noop");
    }
    assert_eq!(table_len(&store, Table::Dedup), 0);
    assert_eq!(table_len(&store, Table::DedupByTime), 0);
}

// ---------------------------------------------------------------------------------------------
// Big files: staged segments, uploads, released chunk sets
// ---------------------------------------------------------------------------------------------

fn segment_chunks(first: u32, n: u32) -> Vec<crate::files::CommittedChunk> {
    (first..first + n)
        .map(|i| {
            let mut bytes = [7u8; 32];
            bytes[..4].copy_from_slice(&i.to_be_bytes());
            crate::files::CommittedChunk {
                hash: mendfs_types::ChunkHash::from_bytes(bytes),
                size: 2,
                replicas: vec![1, 2, 3],
            }
        })
        .collect()
}

fn stage_proposal(sequence: u64, at_ms: u64, first_index: u64, chunks: Vec<crate::files::CommittedChunk>) -> Proposal {
    let stage = crate::files::StageSegment {
        upload_id: 42,
        path: "/big".into(),
        first_index,
        chunks,
        prepared_at_ms: at_ms,
        grace_ms: 60_000,
    };
    proposal_with_id(9, sequence, at_ms, Command::StageSegment(stage))
}

fn chunk_records(store: &MemoryStore) -> usize {
    table_len(store, Table::Chunks)
}

#[test]
fn a_big_file_commits_through_bounded_entries_and_its_release_follows_the_state_clock() {
    let mut store = MemoryStore::default();
    let segment = crate::files::SEGMENT_CHUNKS_MAX as u32;
    let first = stage_proposal(2, 1_000, 0, segment_chunks(0, segment));
    let second = stage_proposal(3, 1_100, u64::from(segment), segment_chunks(segment, segment));
    for proposal in [&first, &second] {
        assert!(proposal.approximate_bytes() < 1 << 20, "a segment is a small entry");
        assert_eq!(run_proposal(&mut store, proposal), Ok(Outcome::Noop));
    }
    // A retried segment (its answer was lost) is deduplicated, not staged twice.
    let before = store.clone();
    assert_eq!(run_proposal(&mut store, &second), Ok(Outcome::Noop));
    assert_eq!(store, before);
    let commit = crate::files::CommitFile {
        path: "/big".into(),
        size: 2 * (2 * u64::from(segment) + 3),
        mtime_ms: 1,
        content_hash: vec![0; 32],
        chunks: segment_chunks(2 * segment, 3),
        upload_id: Some(42),
        first_index: 2 * u64::from(segment),
        expected_version: Some(0),
        prepared_at_ms: 1_200,
        grace_ms: 60_000,
    };
    let committed = run_proposal(&mut store, &proposal_with_id(9, 1, 1_200, Command::CommitFile(commit)));
    assert!(matches!(committed, Ok(Outcome::FileCommitted { version: 1, revision: 1 })), "{committed:?}");
    assert_eq!(revision(&store), 1, "the staged segments took no revision; the commit took one");
    assert_eq!(chunk_records(&store), 2 * segment as usize + 3);

    // Deleting drops a segment's references at once; ReleaseChunks, stamped by the leader,
    // drops the rest, a bounded step each.
    run(&mut store, Command::DeleteFile { path: "/big".into(), expected_version: None }).expect("delete");
    assert_eq!(chunk_records(&store), segment as usize + 3);
    let release = |at_ms: u64| Proposal { request_id: None, proposed_at_ms: at_ms, command: Command::ReleaseChunks };
    assert_eq!(run_proposal(&mut store, &release(1_300)), Ok(Outcome::Noop));
    assert_eq!(chunk_records(&store), 3, "a segment per step");
    run_proposal(&mut store, &release(1_300)).expect("release");
    assert_eq!(chunk_records(&store), 0);

    // An upload that is never committed is released once the state clock passes its expiry,
    // and not before.
    run_proposal(&mut store, &stage_proposal(4, 2_000, 0, segment_chunks(0, 10))).expect("stage");
    run_proposal(&mut store, &release(2_000 + 60_000)).expect("release");
    assert_eq!(chunk_records(&store), 10, "still within its grace");
    run_proposal(&mut store, &release(2_000 + 60_001)).expect("release");
    assert_eq!(chunk_records(&store), 0, "expired and released");
    assert_eq!(table_len(&store, Table::Uploads) + table_len(&store, Table::Segments), 0);
}

// ---------------------------------------------------------------------------------------------
// Event history
// ---------------------------------------------------------------------------------------------

/// rev 1: put a/1; rev 2: put a/2; rev 3: put b; rev 4: set a/1; rev 5: delete a/2;
/// rev 6: session end deletes a/3 and c.
fn history_fixture() -> MemoryStore {
    let mut store = MemoryStore::default();
    run(&mut store, create(b"a/1", b"1")).expect("rev 1");
    run(&mut store, create(b"a/2", b"1")).expect("rev 2");
    run(&mut store, create(b"b", b"1")).expect("rev 3");
    run(&mut store, set(b"a/1", b"2", Some(1))).expect("rev 4");
    run(&mut store, delete(b"a/2", None)).expect("rev 5");
    let session = open_session(&mut store, 1_000);
    run(&mut store, create_in(b"a/3", b"e", session)).expect("rev 6");
    run(&mut store, create_in(b"c", b"e", session)).expect("rev 7");
    run(&mut store, Command::SessionClose { session_id: session }).expect("rev 8");
    assert_eq!(revision(&store), 8);
    store
}

/// A revision's events reduced to (kind, key).
type EventSummary = (u64, Vec<(EventKind, Vec<u8>)>);

fn keys_of(rows: &[(u64, Vec<Event>)]) -> Vec<EventSummary> {
    rows.iter()
        .map(|(revision, events)| (*revision, events.iter().map(|e| (e.kind, e.key.clone())).collect()))
        .collect()
}

#[test]
fn events_between_returns_every_revision_in_order() {
    let store = history_fixture();
    use EventKind::{Delete, Put};
    let all = all_events(&store);
    assert_eq!(
        keys_of(&all),
        vec![
            (1, vec![(Put, b"a/1".to_vec())]),
            (2, vec![(Put, b"a/2".to_vec())]),
            (3, vec![(Put, b"b".to_vec())]),
            (4, vec![(Put, b"a/1".to_vec())]),
            (5, vec![(Delete, b"a/2".to_vec())]),
            (6, vec![(Put, b"a/3".to_vec())]),
            (7, vec![(Put, b"c".to_vec())]),
            (8, vec![(Delete, b"a/3".to_vec()), (Delete, b"c".to_vec())]),
        ]
    );
    // Put events carry the record as written.
    assert_eq!(
        all[3].1[0].record,
        KeyRecord { value: b"2".to_vec(), version: 2, create_revision: 1, modify_revision: 4, session_id: 0 }
    );

    // From 1 and from 0 are the same; windows are honoured.
    assert_eq!(events_between(&store, 1, usize::MAX, b"", true).expect("events"), all);
    let window = events_between(&store, 3, 2, b"", true).expect("events");
    assert_eq!(window.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(window, all[2..4].to_vec());
    assert!(events_between(&store, 9, usize::MAX, b"", true).expect("events").is_empty());
    assert!(events_between(&store, 1, 0, b"", true).expect("events").is_empty());
}

#[test]
fn events_between_filters_by_key_or_prefix() {
    let store = history_fixture();
    use EventKind::{Delete, Put};

    // Exact key: every revision is listed so a watcher can advance, but only matching events.
    let exact = events_between(&store, 1, usize::MAX, b"a/1", false).expect("events");
    assert_eq!(exact.iter().map(|(r, _)| *r).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    let matching: Vec<_> = keys_of(&exact).into_iter().filter(|(_, events)| !events.is_empty()).collect();
    assert_eq!(matching, vec![(1, vec![(Put, b"a/1".to_vec())]), (4, vec![(Put, b"a/1".to_vec())])]);

    // An exact key is not a prefix.
    let exact_a = events_between(&store, 1, usize::MAX, b"a", false).expect("events");
    assert!(exact_a.iter().all(|(_, events)| events.is_empty()));

    // Prefix.
    let prefix = events_between(&store, 1, usize::MAX, b"a/", true).expect("events");
    let matching: Vec<_> = keys_of(&prefix).into_iter().filter(|(_, events)| !events.is_empty()).collect();
    assert_eq!(
        matching,
        vec![
            (1, vec![(Put, b"a/1".to_vec())]),
            (2, vec![(Put, b"a/2".to_vec())]),
            (4, vec![(Put, b"a/1".to_vec())]),
            (5, vec![(Delete, b"a/2".to_vec())]),
            (6, vec![(Put, b"a/3".to_vec())]),
            (8, vec![(Delete, b"a/3".to_vec())]),
        ]
    );
    // A multi-event revision is filtered event by event.
    let c = events_between(&store, 8, usize::MAX, b"c", false).expect("events");
    assert_eq!(keys_of(&c), vec![(8, vec![(Delete, b"c".to_vec())])]);
}

#[test]
fn compaction_finds_the_oldest_row_by_a_scan_when_the_history_has_a_gap() {
    let mut store = MemoryStore::default();
    for i in 0u64..10 {
        run(&mut store, set(b"k", &i.to_be_bytes(), None)).expect("set");
    }
    // Rows are the revisions after the compacted one, unless something else removed one.
    store.remove(Table::Events, &1u64.to_be_bytes()).expect("remove");
    assert_eq!(run(&mut store, Command::Compact { revision: 5 }), Ok(Outcome::Compacted { revision: 5 }));
    let left: Vec<u64> = store
        .range(Table::Events, &[], None, usize::MAX)
        .expect("events")
        .iter()
        .map(|(key, _)| u64::from_be_bytes(key.as_slice().try_into().expect("revision key")))
        .collect();
    assert_eq!(left, (6..=10).collect::<Vec<u64>>());
    // The next compaction is back on the direct path and still finds the rows.
    assert_eq!(run(&mut store, Command::Compact { revision: 8 }), Ok(Outcome::Compacted { revision: 8 }));
    assert_eq!(table_len(&store, Table::Events), 2);
}

#[test]
fn history_is_compacted_after_the_retention_bound() {
    let extra = 25;
    let mut store = MemoryStore::default();
    let total = EVENT_HISTORY_REVISIONS + extra;
    let mut last = Vec::new();
    for i in 0..total {
        last = i.to_be_bytes().to_vec();
        run(&mut store, set(b"k", &last, None)).expect("set");
        if i + 1 == EVENT_HISTORY_REVISIONS {
            assert_eq!(compacted_revision(&store).expect("compacted"), 0);
            assert_eq!(table_len(&store, Table::Events) as u64, EVENT_HISTORY_REVISIONS);
        }
    }
    assert_eq!(revision(&store), total);
    assert_eq!(compacted_revision(&store).expect("compacted"), extra);
    assert_eq!(table_len(&store, Table::Events) as u64, EVENT_HISTORY_REVISIONS);

    let history = events_between(&store, 1, usize::MAX, b"", true).expect("events");
    assert_eq!(history.len() as u64, EVENT_HISTORY_REVISIONS);
    assert_eq!(history.first().expect("first").0, extra + 1);
    assert_eq!(history.last().expect("last").0, total);
    assert!(history.windows(2).all(|pair| pair[0].0 + 1 == pair[1].0));
    assert_eq!(history.last().expect("last").1[0].record.value, last);
    let k = record(&store, b"k").expect("k");
    assert_eq!((k.version, k.create_revision, k.modify_revision), (total, 1, total));
}

// ---------------------------------------------------------------------------------------------
// Keys: prefix_end and list_keys
// ---------------------------------------------------------------------------------------------

#[test]
fn prefix_end_edge_cases() {
    assert_eq!(prefix_end(b""), None);
    assert_eq!(prefix_end(&[0xff]), None);
    assert_eq!(prefix_end(&[0xff, 0xff, 0xff]), None);
    assert_eq!(prefix_end(b"a"), Some(b"b".to_vec()));
    assert_eq!(prefix_end(b"a/"), Some(b"a0".to_vec()));
    assert_eq!(prefix_end(&[0x00]), Some(vec![0x01]));
    assert_eq!(prefix_end(&[0x01, 0xff]), Some(vec![0x02]));
    assert_eq!(prefix_end(&[0x00, 0xff, 0xff]), Some(vec![0x01]));
    assert_eq!(prefix_end(&[0x12, 0xfe]), Some(vec![0x12, 0xff]));
    assert_eq!(prefix_end(&[0xff, 0x00]), Some(vec![0xff, 0x01]));
    assert_eq!(prefix_end(&[0xff, 0xfe, 0xff]), Some(vec![0xff, 0xff]));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// prefix_end(p) is the tight exclusive upper bound of the keys starting with p.
    #[test]
    fn prefix_end_bounds_exactly_the_prefixed_keys(
        prefix in prop::collection::vec(prop::sample::select(vec![0u8, 1, 0x7f, 0xfe, 0xff]), 0..5),
        key in prop::collection::vec(prop::sample::select(vec![0u8, 1, 0x7f, 0xfe, 0xff]), 0..7),
    ) {
        let in_range = key.as_slice() >= prefix.as_slice()
            && prefix_end(&prefix).is_none_or(|end| key.as_slice() < end.as_slice());
        prop_assert_eq!(in_range, key.starts_with(&prefix));
    }
}

fn list_fixture() -> MemoryStore {
    let mut store = MemoryStore::default();
    for key in [&b"a"[..], b"a/1", b"a/2", b"a/3", b"a0", b"b", &[b'a', 0xff], &[0xff], &[0xff, 0xff], &[0xff, 0x00]] {
        run(&mut store, create(key, key)).expect("create");
    }
    store
}

fn listed(store: &MemoryStore, prefix: &[u8], limit: usize) -> (Vec<Vec<u8>>, bool) {
    listed_from(store, prefix, b"", limit)
}

fn listed_from(store: &MemoryStore, prefix: &[u8], start_key: &[u8], limit: usize) -> (Vec<Vec<u8>>, bool) {
    let (kvs, truncated) = list_keys(store, prefix, start_key, limit).expect("list");
    for kv in &kvs {
        assert_eq!(kv.record, record(store, &kv.key).expect("listed key exists"));
    }
    (kvs.into_iter().map(|kv| kv.key).collect(), truncated)
}

#[test]
fn list_keys_by_prefix_with_limit_and_truncation() {
    let store = list_fixture();
    let a123 = vec![b"a/1".to_vec(), b"a/2".to_vec(), b"a/3".to_vec()];
    assert_eq!(listed(&store, b"a/", 10), (a123.clone(), false));
    assert_eq!(listed(&store, b"a/", 3), (a123.clone(), false));
    assert_eq!(listed(&store, b"a/", 2), (a123[..2].to_vec(), true));
    assert_eq!(listed(&store, b"a/", 1), (a123[..1].to_vec(), true));
    assert_eq!(listed(&store, b"a/", 0), (vec![], true));
    assert_eq!(listed(&store, b"a/", usize::MAX), (a123, false));

    // "a" covers itself, a/…, a0 and a\xff, but not b.
    let (keys, truncated) = listed(&store, b"a", usize::MAX);
    assert_eq!(
        keys,
        vec![b"a".to_vec(), b"a/1".to_vec(), b"a/2".to_vec(), b"a/3".to_vec(), b"a0".to_vec(), vec![b'a', 0xff]]
    );
    assert!(!truncated);

    // All-0xff prefixes have no end bound.
    assert_eq!(listed(&store, &[0xff], usize::MAX), (vec![vec![0xff], vec![0xff, 0x00], vec![0xff, 0xff]], false));
    assert_eq!(listed(&store, &[0xff, 0xff], usize::MAX), (vec![vec![0xff, 0xff]], false));

    // The empty prefix lists everything, in order.
    let (everything, truncated) = listed(&store, b"", usize::MAX);
    assert_eq!(everything.len(), 10);
    assert!(everything.windows(2).all(|pair| pair[0] < pair[1]));
    assert!(!truncated);
    assert_eq!(listed(&store, b"", 10), (everything.clone(), false));
    assert_eq!(listed(&store, b"", 9), (everything[..9].to_vec(), true));

    // No matches: never truncated, even with limit 0.
    assert_eq!(listed(&store, b"c", 5), (vec![], false));
    assert_eq!(listed(&store, b"c", 0), (vec![], false));
    assert_eq!(listed(&MemoryStore::default(), b"", 0), (vec![], false));
}

#[test]
fn list_keys_continues_from_a_start_key_within_the_prefix() {
    let store = list_fixture();
    let a = |keys: &[&[u8]]| keys.iter().map(|key| key.to_vec()).collect::<Vec<_>>();
    // The start key is inclusive; a page's last key followed by a zero byte starts the next.
    assert_eq!(listed_from(&store, b"a/", b"a/2", 10), (a(&[b"a/2", b"a/3"]), false));
    assert_eq!(listed_from(&store, b"a/", b"a/1\0", 1), (a(&[b"a/2"]), true));
    assert_eq!(listed_from(&store, b"a/", b"a/2\0", 1), (a(&[b"a/3"]), false));
    assert_eq!(listed_from(&store, b"a/", b"a/3\0", 1), (vec![], false), "past the last key");
    // A start key before the prefix's keys lists from the prefix; one after them lists nothing.
    assert_eq!(listed_from(&store, b"a/", b"", 10), listed(&store, b"a/", 10));
    assert_eq!(listed_from(&store, b"a/", b"a", 10), listed(&store, b"a/", 10));
    assert_eq!(listed_from(&store, b"a/", b"b", 10), (vec![], false));
    assert_eq!(listed_from(&store, b"a/", &[0xff, 0xff, 0xff], 10), (vec![], false));
    // Without an end bound (all-0xff prefix) the start key still counts.
    assert_eq!(listed_from(&store, &[0xff], &[0xff, 0x01], 10), (vec![vec![0xff, 0xff]], false));
    assert_eq!(listed_from(&store, b"", b"b", 10), (a(&[b"b", &[0xff], &[0xff, 0x00], &[0xff, 0xff]]), false));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Paging through a prefix (each page from the last key plus a zero byte) lists exactly
    /// what one unlimited list does, each key once, whatever the page size.
    #[test]
    fn paging_with_start_keys_lists_each_key_once(
        prefix in prop::collection::vec(prop::sample::select(vec![b'a', b'/', 0xff]), 0..3),
        page in 1usize..4,
    ) {
        let store = list_fixture();
        let (whole, _) = listed(&store, &prefix, usize::MAX);
        let mut paged = Vec::new();
        let mut start = Vec::new();
        loop {
            let (keys, truncated) = listed_from(&store, &prefix, &start, page);
            prop_assert!(keys.len() <= page);
            if let Some(last) = keys.last() {
                start = [last.as_slice(), &[0]].concat();
            }
            paged.extend(keys);
            if !truncated {
                break;
            }
        }
        prop_assert_eq!(paged, whole);
    }
}

// ---------------------------------------------------------------------------------------------
// Limits: the byte quota, history by bytes, sessions, bounded answers
// ---------------------------------------------------------------------------------------------

fn with_limits(kv_quota_bytes: u64, kv_history_bytes: u64, max_sessions: u64) -> MemoryStore {
    let mut store = MemoryStore::default();
    run(&mut store, Command::SetLimits(Limits { kv_quota_bytes, kv_history_bytes, max_sessions })).expect("limits");
    store
}

#[test]
fn writes_beyond_the_quota_are_refused_naming_it_and_reads_and_deletes_keep_working() {
    let value = vec![7u8; 1_000];
    let mut store = with_limits(200_000, 1 << 30, 10);
    let mut written = Vec::new();
    let refusal = loop {
        let key = format!("k{}", written.len()).into_bytes();
        match run(&mut store, create(&key, &value)) {
            Ok(_) => written.push(key),
            Err(refusal) => break refusal,
        }
        assert!(written.len() < 1_000, "the quota never refused");
    };
    let CommandError::QuotaExceeded { used_bytes, quota_bytes, needed_bytes } = refusal.clone() else {
        panic!("expected a quota refusal, got {refusal:?}");
    };
    assert_eq!(quota_bytes, 200_000);
    assert!(used_bytes <= 200_000 && used_bytes + needed_bytes > 200_000, "{refusal}");
    assert!(refusal.to_string().contains("quota"), "{refusal}");
    // Each key costs its bytes twice: once live, once in history.
    assert!((85..=100).contains(&written.len()), "{} keys fit", written.len());
    assert!(kv_usage(&store).expect("usage").alarm);
    check_usage_counters(&store);

    // Reads keep working, and the refused write changed nothing.
    let before = revision(&store);
    assert!(record(&store, &written[0]).is_some());
    // While the alarm is raised, even a small write is refused.
    assert!(matches!(run(&mut store, create(b"tiny", b"x")), Err(CommandError::QuotaExceeded { .. })));
    assert_eq!(revision(&store), before);

    // Deletes work. One delete frees too little to lower the alarm (it clears at 90%).
    written_revision(&run(&mut store, delete(&written[0], None)));
    assert!(kv_usage(&store).expect("usage").alarm);
    for key in &written[1..] {
        written_revision(&run(&mut store, delete(key, None)));
    }
    // Deleting leaves the history holding the values until compaction.
    let usage = kv_usage(&store).expect("usage");
    assert_eq!(usage.key_bytes, 0);
    assert!(usage.history_bytes > written.len() as u64 * 1_000, "{usage:?}");
    // Compaction gives the bytes back and clears the alarm.
    let current = revision(&store);
    assert_eq!(run(&mut store, Command::Compact { revision: current }), Ok(Outcome::Compacted { revision: current }));
    let usage = kv_usage(&store).expect("usage");
    assert!(!usage.alarm && usage.history_bytes == 0, "{usage:?}");
    written_revision(&run(&mut store, create(b"again", &value)));
    check_usage_counters(&store);
    assert_eq!(
        run(&mut store, Command::Compact { revision: current + 10 }),
        Err(CommandError::CompactBeyondCurrent { requested: current + 10, current: current + 1 })
    );
}

#[test]
fn overwriting_a_key_in_place_counts_only_its_growth() {
    let mut store = with_limits(1 << 20, 4_096, 10);
    for round in 0..1_000u32 {
        let value = round.to_be_bytes().repeat(100);
        written_revision(&run(&mut store, set(b"k", &value, None)));
    }
    let usage = kv_usage(&store).expect("usage");
    assert!(usage.history_bytes <= 4_096, "history is bounded by bytes: {usage:?}");
    assert!(usage.key_bytes < 1_000, "{usage:?}");
    check_usage_counters(&store);
}

#[test]
fn history_is_trimmed_by_bytes_but_always_keeps_the_latest_revision() {
    let mut store = with_limits(1 << 30, 10_000, 10);
    for i in 0..100u32 {
        written_revision(&run(&mut store, set(format!("k{i}").as_bytes(), &[1u8; 1_000], None)));
    }
    let usage = kv_usage(&store).expect("usage");
    assert!(usage.history_bytes <= 10_000, "{usage:?}");
    let history = all_events(&store);
    assert_eq!(history.last().expect("latest").0, 100);
    assert_eq!(compacted_revision(&store).expect("compacted") + history.len() as u64, 100);
    // One revision larger than the whole history bound is still kept (a watcher must see it).
    written_revision(&run(&mut store, set(b"big", &[2u8; 20_000], None)));
    assert_eq!(all_events(&store).iter().map(|(revision, _)| *revision).collect::<Vec<_>>(), vec![101]);
    check_usage_counters(&store);
}

#[test]
fn sessions_beyond_the_limit_are_refused_until_one_ends() {
    let mut store = with_limits(1 << 30, 1 << 20, 3);
    let ids: Vec<u64> = (0..3).map(|_| open_session(&mut store, 1_000)).collect();
    assert_eq!(
        run(&mut store, Command::SessionOpen { ttl_ms: 1_000 }),
        Err(CommandError::TooManySessions { open: 3, limit: 3 })
    );
    run(&mut store, Command::SessionExpire { session_id: ids[0] }).expect("expire");
    // Closing an unknown session does not free a slot twice.
    run(&mut store, Command::SessionClose { session_id: ids[0] }).expect("close again");
    open_session(&mut store, 1_000);
    assert!(matches!(
        run(&mut store, Command::SessionOpen { ttl_ms: 1_000 }),
        Err(CommandError::TooManySessions { .. })
    ));
    check_session_invariants(&store);
}

#[test]
fn deduplication_keeps_outcomes_not_values() {
    let mut store = MemoryStore::default();
    let value = vec![9u8; 10_000];
    let write = proposal_with_id(1, 1, 5, set(b"k", &value, None));
    let first = run_proposal(&mut store, &write);
    assert_eq!(run_proposal(&mut store, &write), first);
    let dedup_bytes: usize =
        store.range(Table::Dedup, &[], None, usize::MAX).expect("dedup").iter().map(|(_, v)| v.len()).sum();
    assert!(dedup_bytes < 200, "a dedup record of {dedup_bytes} bytes holds the value");
}

#[test]
fn list_answers_are_bounded_in_bytes_and_continue_after_the_last_key() {
    let mut store = MemoryStore::default();
    let value = vec![1u8; 1 << 20];
    for i in 0..10u8 {
        run(&mut store, create(&[b'k', i], &value)).expect("create");
    }
    let (first, truncated) = list_keys(&store, b"k", &[], usize::MAX).expect("list");
    assert!(truncated && first.len() == 3, "{} keys in one answer", first.len());
    let mut all: Vec<Vec<u8>> = first.iter().map(|kv| kv.key.clone()).collect();
    loop {
        let mut after = all.last().expect("a key").clone();
        after.push(0);
        let (page, truncated) = list_keys(&store, b"k", &after, usize::MAX).expect("list");
        all.extend(page.into_iter().map(|kv| kv.key));
        if !truncated {
            break;
        }
    }
    assert_eq!(all, (0..10u8).map(|i| vec![b'k', i]).collect::<Vec<_>>());
    // A start before the prefix lists from the prefix; one after its end lists nothing.
    assert_eq!(list_keys(&store, b"k", b"a", 1).expect("list").0[0].key, vec![b'k', 0]);
    assert_eq!(list_keys(&store, b"k", b"l", 1).expect("list"), (vec![], false));
    // One key larger than the bound still comes back alone.
    let mut big = MemoryStore::default();
    run(&mut big, create(b"big", &vec![0u8; LIST_BYTES_MAX + 1])).expect("create");
    run(&mut big, create(b"bih", b"x")).expect("create");
    let (page, truncated) = list_keys(&big, b"bi", &[], usize::MAX).expect("list");
    assert_eq!((page.len(), truncated), (1, true));
}

#[test]
fn a_watch_step_is_bounded_in_bytes() {
    let mut store = MemoryStore::default();
    for i in 0..10u8 {
        run(&mut store, set(b"k", &vec![i; 1 << 20], None)).expect("set");
    }
    let step = events_between(&store, 1, usize::MAX, b"k", false).expect("events");
    assert_eq!(step.iter().map(|(revision, _)| *revision).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    let rest = events_between(&store, 5, usize::MAX, b"k", false).expect("events");
    assert_eq!(rest.first().expect("next").0, 5);
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

fn key_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![b"a".to_vec(), b"b".to_vec(), b"a/1".to_vec(), b"a/2".to_vec(), vec![0xff]])
}

fn value_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..4)
}

fn version_strategy() -> impl Strategy<Value = Option<u64>> {
    prop::option::of(0u64..4)
}

fn session_strategy() -> impl Strategy<Value = Option<u64>> {
    prop::option::weighted(0.4, 0u64..5)
}

/// Any command, over a small key space and small session ids so that sessions collide.
fn command_strategy() -> impl Strategy<Value = Command> {
    prop_oneof![
        3 => (key_strategy(), value_strategy(), session_strategy())
            .prop_map(|(key, value, session_id)| Command::Create { key, value, session_id }),
        4 => (key_strategy(), value_strategy(), version_strategy(), session_strategy()).prop_map(
            |(key, value, expected_version, session_id)| Command::Set { key, value, expected_version, session_id }
        ),
        2 => (key_strategy(), version_strategy())
            .prop_map(|(key, expected_version)| Command::Delete { key, expected_version }),
        2 => (1u64..10_000).prop_map(|ttl_ms| Command::SessionOpen { ttl_ms }),
        1 => (0u64..5).prop_map(|session_id| Command::SessionClose { session_id }),
        1 => (0u64..5).prop_map(|session_id| Command::SessionExpire { session_id }),
        1 => "[a-c]{1,3}".prop_map(|cluster_id| Command::InitCluster { cluster_id }),
    ]
}

/// Proposals with colliding request ids (so some are deduplicated) and times that advance by
/// up to 40 s, sometimes backwards (clock skew between leaders), so dedup records expire.
fn proposals_strategy(max_len: usize) -> impl Strategy<Value = Vec<Proposal>> {
    let step = (prop::option::weighted(0.5, (1u64..3, 0u64..6)), -5_000i64..40_000, command_strategy());
    prop::collection::vec(step, 0..max_len).prop_map(|steps| {
        let mut now: u64 = 1_000_000;
        steps
            .into_iter()
            .map(|(request, delta, command)| {
                now = now.saturating_add_signed(delta);
                Proposal {
                    request_id: request.map(|(client_id, sequence)| RequestId { client_id, sequence }),
                    proposed_at_ms: now,
                    command,
                }
            })
            .collect()
    })
}

#[derive(Debug, Clone)]
enum ModelOp {
    Create(Vec<u8>, Vec<u8>),
    Set(Vec<u8>, Vec<u8>, Option<u64>),
    Delete(Vec<u8>, Option<u64>),
}

fn model_op_strategy() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        (key_strategy(), value_strategy()).prop_map(|(key, value)| ModelOp::Create(key, value)),
        (key_strategy(), value_strategy(), version_strategy())
            .prop_map(|(key, value, expected)| ModelOp::Set(key, value, expected)),
        (key_strategy(), version_strategy()).prop_map(|(key, expected)| ModelOp::Delete(key, expected)),
    ]
}

/// The reference: key → (value, version, create revision, modify revision), plus the revision.
#[derive(Debug, Default)]
struct Model {
    keys: BTreeMap<Vec<u8>, (Vec<u8>, u64, u64, u64)>,
    revision: u64,
}

impl Model {
    fn record(&self, key: &[u8]) -> Option<KeyRecord> {
        self.keys.get(key).map(|(value, version, create_revision, modify_revision)| KeyRecord {
            value: value.clone(),
            version: *version,
            create_revision: *create_revision,
            modify_revision: *modify_revision,
            session_id: 0,
        })
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> CommandResult {
        self.revision += 1;
        let revision = self.revision;
        let entry = match self.keys.get(key) {
            Some((_, version, create_revision, _)) => (value.to_vec(), version + 1, *create_revision, revision),
            None => (value.to_vec(), 1, revision, revision),
        };
        self.keys.insert(key.to_vec(), entry);
        let record = KeyRecord { value: Vec::new(), ..self.record(key).expect("just written") };
        Ok(Outcome::Written { revision, kv: Some(KeyValue { key: key.to_vec(), record }), deleted: false })
    }

    fn apply(&mut self, op: &ModelOp) -> CommandResult {
        let version_of = |keys: &BTreeMap<Vec<u8>, (Vec<u8>, u64, u64, u64)>, key: &[u8]| {
            keys.get(key).map_or(0, |(_, version, _, _)| *version)
        };
        match op {
            ModelOp::Create(key, value) => match version_of(&self.keys, key) {
                0 => self.put(key, value),
                version => Err(CommandError::KeyExists { version }),
            },
            ModelOp::Set(key, value, expected) => {
                let actual = version_of(&self.keys, key);
                match expected {
                    Some(expected) if *expected != actual => {
                        Err(CommandError::VersionMismatch { expected: *expected, actual })
                    }
                    _ => self.put(key, value),
                }
            }
            ModelOp::Delete(key, expected) => {
                let actual = version_of(&self.keys, key);
                match expected {
                    Some(expected) if *expected != actual => {
                        Err(CommandError::VersionMismatch { expected: *expected, actual })
                    }
                    _ if actual == 0 => Ok(Outcome::Written { revision: self.revision, kv: None, deleted: false }),
                    _ => {
                        self.keys.remove(key.as_slice());
                        self.revision += 1;
                        Ok(Outcome::Written { revision: self.revision, kv: None, deleted: true })
                    }
                }
            }
        }
    }
}

impl ModelOp {
    fn command(&self) -> Command {
        match self {
            ModelOp::Create(key, value) => create(key, value),
            ModelOp::Set(key, value, expected) => set(key, value, *expected),
            ModelOp::Delete(key, expected) => delete(key, *expected),
        }
    }
}

/// Rebuilds the keyspace from the event history alone.
fn replay(history: &[(u64, Vec<Event>)]) -> BTreeMap<Vec<u8>, KeyRecord> {
    let mut keys = BTreeMap::new();
    for (_, events) in history {
        for event in events {
            match event.kind {
                EventKind::Put => {
                    keys.insert(event.key.clone(), event.record.clone());
                }
                EventKind::Delete => {
                    keys.remove(&event.key);
                }
            }
        }
    }
    keys
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Two replicas applying the same entries (one of them after a serialization round trip, as
    /// through the Raft log) end in the same state with the same answers.
    #[test]
    fn apply_is_deterministic(proposals in proposals_strategy(80)) {
        let mut left = MemoryStore::default();
        let mut right = MemoryStore::default();
        for proposal in &proposals {
            let shipped: Proposal = decode(&encode(proposal).expect("encode")).expect("decode");
            prop_assert_eq!(&shipped, proposal);
            let left_result = run_proposal(&mut left, proposal);
            let right_result = run_proposal(&mut right, &shipped);
            prop_assert_eq!(left_result, right_result);
        }
        prop_assert_eq!(&left, &right);
        check_session_invariants(&left);
    }

    /// Create / Set (with optional CAS) / Delete on a few keys behave like a plain map with
    /// versions, and revisions advance exactly on successful writes.
    #[test]
    fn keyspace_matches_a_simple_model(ops in prop::collection::vec(model_op_strategy(), 0..100)) {
        let mut store = MemoryStore::default();
        let mut model = Model::default();
        for (index, op) in ops.iter().enumerate() {
            let expected = model.apply(op);
            let actual = run(&mut store, op.command());
            prop_assert_eq!(&actual, &expected, "op {} {:?}", index, op);
            prop_assert_eq!(revision(&store), model.revision);
        }
        let keys = all_keys(&store);
        let model_keys: BTreeMap<Vec<u8>, KeyRecord> =
            model.keys.keys().map(|key| (key.clone(), model.record(key).expect("model key"))).collect();
        prop_assert_eq!(keys, model_keys);
        // Simplified view asked for by the spec: key → (value, version).
        let simple: BTreeMap<Vec<u8>, (Vec<u8>, u64)> =
            all_keys(&store).into_iter().map(|(key, record)| (key, (record.value, record.version))).collect();
        let simple_model: BTreeMap<Vec<u8>, (Vec<u8>, u64)> =
            model.keys.iter().map(|(key, (value, version, _, _))| (key.clone(), (value.clone(), *version))).collect();
        prop_assert_eq!(simple, simple_model);
    }

    /// The event history from revision 1 is a complete log: every revision is there, each has
    /// events, each Put carries the record the keyspace held right after it, and replaying it
    /// rebuilds the final keyspace exactly.
    #[test]
    fn replaying_history_rebuilds_the_keyspace(proposals in proposals_strategy(80)) {
        let mut store = MemoryStore::default();
        for proposal in &proposals {
            let before = revision(&store);
            let result = run_proposal(&mut store, proposal);
            let after = revision(&store);
            prop_assert!(after == before || after == before + 1, "one apply bumped {} -> {}", before, after);
            if after == before + 1 {
                prop_assert!(result.is_ok(), "a refusal bumped the revision: {:?}", result);
                for event in events_at(&store, after) {
                    if event.kind == EventKind::Put {
                        prop_assert_eq!(record(&store, &event.key), Some(event.record.clone()));
                        prop_assert_eq!(event.record.modify_revision, after);
                    } else {
                        prop_assert_eq!(record(&store, &event.key), None);
                    }
                }
            }
        }
        let history = events_between(&store, 1, usize::MAX, b"", true).expect("events");
        prop_assert_eq!(
            history.iter().map(|(revision, _)| *revision).collect::<Vec<_>>(),
            (1..=revision(&store)).collect::<Vec<_>>()
        );
        prop_assert!(history.iter().all(|(_, events)| !events.is_empty()));
        prop_assert_eq!(replay(&history), all_keys(&store));
        check_session_invariants(&store);
    }
}
