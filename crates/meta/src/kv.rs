//! Coordination keys (etcd v3's model): per key a version (1 on create, +1 per set), a create
//! and a modify revision, and an optional session (etcd's lease) whose end deletes the key.
//! Every change is an event in the bounded history that watchers read.

use serde::{Deserialize, Serialize};

use crate::schema::{
    add_to_counter, commit_revision, compact_history, current_revision, decode, encode, get_u64, kv_usage, limits,
    prefix_end, put_u64, settle_quota_alarm, CommandError, CommandResult, Event, EventKind, KeyRecord, KeyValue,
    Outcome, StateStore, StoreError, Table, META_KEY_BYTES, META_NEXT_SESSION_ID, META_QUOTA_ALARM, META_SESSION_COUNT,
};

/// A list answer stops adding keys past this many bytes of keys and values (it always holds at
/// least one key), and says it was truncated: the caller continues after its last key.
pub const LIST_BYTES_MAX: usize = 4 << 20;

/// A watch step reads at most this many bytes of history (at least one revision) at a time.
pub const WATCH_STEP_BYTES_MAX: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub ttl_ms: u64,
}

pub fn get_key(store: &impl StateStore, key: &[u8]) -> Result<Option<KeyRecord>, StoreError> {
    store.get(Table::Keys, key)?.map(|bytes| decode(&bytes)).transpose()
}

pub fn get_session(store: &impl StateStore, session_id: u64) -> Result<Option<SessionRecord>, StoreError> {
    store.get(Table::Sessions, &session_id.to_be_bytes())?.map(|bytes| decode(&bytes)).transpose()
}

/// All live sessions, for a new leader to start tracking their keep-alives.
pub fn list_sessions(store: &impl StateStore) -> Result<Vec<(u64, SessionRecord)>, StoreError> {
    let mut sessions = Vec::new();
    for (key, value) in store.range(Table::Sessions, &[], None, usize::MAX)? {
        let id =
            u64::from_be_bytes(key.as_slice().try_into().map_err(|_| StoreError("session id is not a u64".into()))?);
        sessions.push((id, decode(&value)?));
    }
    Ok(sessions)
}

/// Keys starting with `prefix`, from `start` on (when it is within the prefix), in order, at
/// most `limit` of them and about [`LIST_BYTES_MAX`] bytes; the flag says whether the list was
/// cut short, and the caller continues after the last key.
pub fn list_keys(
    store: &impl StateStore,
    prefix: &[u8],
    start: &[u8],
    limit: usize,
) -> Result<(Vec<KeyValue>, bool), StoreError> {
    const ROWS_PER_READ: usize = 256;
    let end = prefix_end(prefix);
    let mut from = prefix.max(start).to_vec();
    if end.as_deref().is_some_and(|end| from.as_slice() >= end) {
        // Past the prefix's keys (and a range whose start passes its end is not asked of the store).
        return Ok((Vec::new(), false));
    }
    let mut kvs = Vec::new();
    let mut bytes = 0usize;
    loop {
        let rows = store.range(Table::Keys, &from, end.as_deref(), ROWS_PER_READ)?;
        let exhausted = rows.len() < ROWS_PER_READ;
        for (key, value) in rows {
            if kvs.len() == limit || (!kvs.is_empty() && bytes + key.len() + value.len() > LIST_BYTES_MAX) {
                return Ok((kvs, true));
            }
            bytes += key.len() + value.len();
            from = key.clone();
            from.push(0);
            kvs.push(KeyValue { key, record: decode(&value)? });
        }
        if exhausted {
            return Ok((kvs, false));
        }
    }
}

/// Events of the revisions from `from` on, at most `max_revisions` of them and about
/// [`WATCH_STEP_BYTES_MAX`] bytes (at least one revision), filtered by key or prefix. A
/// revision with no matching event comes back with an empty list, so that a watcher still
/// advances past it.
pub fn events_between(
    store: &impl StateStore,
    from: u64,
    max_revisions: usize,
    key: &[u8],
    is_prefix: bool,
) -> Result<Vec<(u64, Vec<Event>)>, StoreError> {
    const ROWS_PER_READ: usize = 16;
    let mut out = Vec::new();
    let mut next = from;
    let mut bytes = 0usize;
    while out.len() < max_revisions && (out.is_empty() || bytes < WATCH_STEP_BYTES_MAX) {
        let rows =
            store.range(Table::Events, &next.to_be_bytes(), None, ROWS_PER_READ.min(max_revisions - out.len()))?;
        if rows.is_empty() {
            break;
        }
        for (revision_bytes, value) in rows {
            if out.len() == max_revisions || (!out.is_empty() && bytes >= WATCH_STEP_BYTES_MAX) {
                break;
            }
            let revision = u64::from_be_bytes(
                revision_bytes.as_slice().try_into().map_err(|_| StoreError("event revision is not a u64".into()))?,
            );
            bytes += value.len();
            let events: Vec<Event> = decode(&value)?;
            let matching: Vec<Event> = events
                .into_iter()
                .filter(|event| if is_prefix { event.key.starts_with(key) } else { event.key == key })
                .collect();
            out.push((revision, matching));
            next = revision + 1;
        }
    }
    Ok(out)
}

/// Drops the event history up to and including `revision` (etcd's compaction): the way to
/// give the quota back the bytes that deleted and overwritten values still hold in history.
pub(crate) fn compact(store: &mut impl StateStore, revision: u64) -> Result<CommandResult, StoreError> {
    let current = current_revision(store)?;
    if revision > current {
        return Ok(Err(CommandError::CompactBeyondCurrent { requested: revision, current }));
    }
    compact_history(store, |oldest, _| oldest <= revision)?;
    Ok(Ok(Outcome::Compacted { revision: crate::schema::compacted_revision(store)? }))
}

/// The bytes a live key counts for against the quota.
fn key_bytes(key: &[u8], encoded_record: &[u8]) -> i64 {
    (key.len() + encoded_record.len()) as i64
}

fn session_key_entry(session_id: u64, key: &[u8]) -> Vec<u8> {
    let mut entry = session_id.to_be_bytes().to_vec();
    entry.extend_from_slice(key);
    entry
}

/// Creates `key`; refused if it exists.
pub(crate) fn create(
    store: &mut impl StateStore,
    key: &[u8],
    value: &[u8],
    session_id: Option<u64>,
) -> Result<CommandResult, StoreError> {
    if let Some(existing) = get_key(store, key)? {
        return Ok(Err(CommandError::KeyExists { version: existing.version }));
    }
    put_key(store, key, value, None, session_id)
}

/// The refusal of a write that expected another version of the key (0: absent).
fn version_mismatch(existing: Option<&KeyRecord>, expected_version: Option<u64>) -> Option<CommandError> {
    let actual = existing.map_or(0, |record| record.version);
    expected_version
        .filter(|expected| *expected != actual)
        .map(|expected| CommandError::VersionMismatch { expected, actual })
}

/// Sets `key`, if its version is still `expected_version` when one is given (0: absent).
pub(crate) fn set(
    store: &mut impl StateStore,
    key: &[u8],
    value: &[u8],
    expected_version: Option<u64>,
    session_id: Option<u64>,
) -> Result<CommandResult, StoreError> {
    let existing = get_key(store, key)?;
    if let Some(refused) = version_mismatch(existing.as_ref(), expected_version) {
        return Ok(Err(refused));
    }
    put_key(store, key, value, existing, session_id)
}

/// Deletes `key`, if its version is still `expected_version` when one is given.
pub(crate) fn delete(
    store: &mut impl StateStore,
    key: &[u8],
    expected_version: Option<u64>,
) -> Result<CommandResult, StoreError> {
    let existing = get_key(store, key)?;
    if let Some(refused) = version_mismatch(existing.as_ref(), expected_version) {
        return Ok(Err(refused));
    }
    match existing {
        None => Ok(Ok(Outcome::Written { revision: current_revision(store)?, kv: None, deleted: false })),
        Some(record) => {
            let event = delete_key(store, key, record)?;
            let revision = commit_revision(store, &[event])?;
            settle_quota_alarm(store)?;
            Ok(Ok(Outcome::Written { revision, kv: None, deleted: true }))
        }
    }
}

pub(crate) fn open_session(store: &mut impl StateStore, ttl_ms: u64) -> Result<CommandResult, StoreError> {
    let open = get_u64(store, Table::Meta, META_SESSION_COUNT)?;
    let limit = limits(store)?.max_sessions;
    if open >= limit {
        return Ok(Err(CommandError::TooManySessions { open, limit }));
    }
    put_u64(store, Table::Meta, META_SESSION_COUNT, open + 1)?;
    let session_id = get_u64(store, Table::Meta, META_NEXT_SESSION_ID)?.max(1);
    put_u64(store, Table::Meta, META_NEXT_SESSION_ID, session_id + 1)?;
    store.put(Table::Sessions, &session_id.to_be_bytes(), &encode(&SessionRecord { ttl_ms })?)?;
    Ok(Ok(Outcome::SessionOpened { session_id, ttl_ms }))
}

/// Ends a session (closed by its client or expired by the leader) and deletes its keys.
pub(crate) fn close_session(store: &mut impl StateStore, session_id: u64) -> Result<CommandResult, StoreError> {
    if get_session(store, session_id)?.is_none() {
        return Ok(Ok(Outcome::SessionClosed { revision: current_revision(store)?, found: false }));
    }
    store.remove(Table::Sessions, &session_id.to_be_bytes())?;
    add_to_counter(store, META_SESSION_COUNT, -1)?;
    let prefix = session_id.to_be_bytes();
    let end = prefix_end(&prefix);
    let owned = store.range(Table::SessionKeys, &prefix, end.as_deref(), usize::MAX)?;
    let mut events = Vec::with_capacity(owned.len());
    for (entry, _) in owned {
        store.remove(Table::SessionKeys, &entry)?;
        let key = &entry[8..];
        if let Some(record) = get_key(store, key)? {
            // A key re-attached to another session (or none) since is no longer ours.
            if record.session_id == session_id {
                events.push(delete_key(store, key, record)?);
            }
        }
    }
    let revision = if events.is_empty() { current_revision(store)? } else { commit_revision(store, &events)? };
    settle_quota_alarm(store)?;
    Ok(Ok(Outcome::SessionClosed { revision, found: true }))
}

fn put_key(
    store: &mut impl StateStore,
    key: &[u8],
    value: &[u8],
    existing: Option<KeyRecord>,
    session_id: Option<u64>,
) -> Result<CommandResult, StoreError> {
    let session_id = session_id.unwrap_or(0);
    if session_id != 0 && get_session(store, session_id)?.is_none() {
        return Ok(Err(CommandError::SessionNotFound { session_id }));
    }
    let revision = current_revision(store)? + 1;
    let previous_bytes = match &existing {
        Some(previous) => key_bytes(key, &encode(previous)?),
        None => 0,
    };
    let record = match existing {
        Some(previous) => {
            if previous.session_id != 0 && previous.session_id != session_id {
                store.remove(Table::SessionKeys, &session_key_entry(previous.session_id, key))?;
            }
            KeyRecord {
                value: value.to_vec(),
                version: previous.version + 1,
                create_revision: previous.create_revision,
                modify_revision: revision,
                session_id,
            }
        }
        None => KeyRecord {
            value: value.to_vec(),
            version: 1,
            create_revision: revision,
            modify_revision: revision,
            session_id,
        },
    };
    let encoded = encode(&record)?;
    let event = Event { kind: EventKind::Put, key: key.to_vec(), record };
    // The write adds its key's growth and one history row (about the record again).
    let needed_bytes = (key_bytes(key, &encoded) - previous_bytes).max(0) as u64 + 8 + encoded.len() as u64 + 16;
    let usage = kv_usage(store)?;
    if usage.alarm || usage.used_bytes().saturating_add(needed_bytes) > usage.quota_bytes {
        put_u64(store, Table::Meta, META_QUOTA_ALARM, 1)?;
        return Ok(Err(CommandError::QuotaExceeded {
            used_bytes: usage.used_bytes(),
            quota_bytes: usage.quota_bytes,
            needed_bytes,
        }));
    }
    if session_id != 0 {
        store.put(Table::SessionKeys, &session_key_entry(session_id, key), &[])?;
    }
    store.put(Table::Keys, key, &encoded)?;
    add_to_counter(store, META_KEY_BYTES, key_bytes(key, &encoded) - previous_bytes)?;
    // The outcome carries the key's new version and revisions, not its value: the writer has
    // the value, and the outcome is kept for deduplication, which must not hold values.
    let kv = KeyValue { key: key.to_vec(), record: KeyRecord { value: Vec::new(), ..event.record.clone() } };
    let committed = commit_revision(store, &[event])?;
    debug_assert_eq!(committed, revision);
    Ok(Ok(Outcome::Written { revision, kv: Some(kv), deleted: false }))
}

fn delete_key(store: &mut impl StateStore, key: &[u8], record: KeyRecord) -> Result<Event, StoreError> {
    store.remove(Table::Keys, key)?;
    add_to_counter(store, META_KEY_BYTES, -key_bytes(key, &encode(&record)?))?;
    if record.session_id != 0 {
        store.remove(Table::SessionKeys, &session_key_entry(record.session_id, key))?;
    }
    Ok(Event { kind: EventKind::Delete, key: key.to_vec(), record: KeyRecord { value: Vec::new(), ..record } })
}
