//! Coordination keys (etcd v3's model): per key a version (1 on create, +1 per set), a create
//! and a modify revision, and an optional session (etcd's lease) whose end deletes the key.
//! Every change is an event in the bounded history that watchers read.

use serde::{Deserialize, Serialize};

use crate::schema::{
    commit_revision, current_revision, decode, encode, get_u64, prefix_end, put_u64, CommandError, CommandResult,
    Event, EventKind, KeyRecord, KeyValue, Outcome, StateStore, StoreError, Table, META_NEXT_SESSION_ID,
};

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

/// Keys starting with `prefix`, in order, from `start_key` on (when it lies past the prefix's
/// first key; a continuation); the flag says whether `limit` cut the list short.
pub fn list_keys(
    store: &impl StateStore,
    prefix: &[u8],
    start_key: &[u8],
    limit: usize,
) -> Result<(Vec<KeyValue>, bool), StoreError> {
    let end = prefix_end(prefix);
    let start = prefix.max(start_key);
    if end.as_deref().is_some_and(|end| start >= end) {
        // Past the prefix's keys (and a range whose start passes its end is not asked of the store).
        return Ok((Vec::new(), false));
    }
    let rows = store.range(Table::Keys, start, end.as_deref(), limit.saturating_add(1))?;
    let truncated = rows.len() > limit;
    let kvs = rows
        .into_iter()
        .take(limit)
        .map(|(key, value)| Ok(KeyValue { key, record: decode(&value)? }))
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok((kvs, truncated))
}

/// Events of the revisions from `from` on, at most `max_revisions` of them, filtered by
/// key or prefix. A revision with no matching event comes back with an empty list, so that a
/// watcher still advances past it.
pub fn events_between(
    store: &impl StateStore,
    from: u64,
    max_revisions: usize,
    key: &[u8],
    is_prefix: bool,
) -> Result<Vec<(u64, Vec<Event>)>, StoreError> {
    let rows = store.range(Table::Events, &from.to_be_bytes(), None, max_revisions)?;
    let mut out = Vec::with_capacity(rows.len());
    for (revision_bytes, value) in rows {
        let revision = u64::from_be_bytes(
            revision_bytes.as_slice().try_into().map_err(|_| StoreError("event revision is not a u64".into()))?,
        );
        let events: Vec<Event> = decode(&value)?;
        let matching: Vec<Event> = events
            .into_iter()
            .filter(|event| if is_prefix { event.key.starts_with(key) } else { event.key == key })
            .collect();
        out.push((revision, matching));
    }
    Ok(out)
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
            Ok(Ok(Outcome::Written { revision, kv: None, deleted: true }))
        }
    }
}

pub(crate) fn open_session(store: &mut impl StateStore, ttl_ms: u64) -> Result<CommandResult, StoreError> {
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
    if session_id != 0 {
        store.put(Table::SessionKeys, &session_key_entry(session_id, key), &[])?;
    }
    store.put(Table::Keys, key, &encode(&record)?)?;
    let kv = KeyValue { key: key.to_vec(), record: record.clone() };
    let committed = commit_revision(store, &[Event { kind: EventKind::Put, key: key.to_vec(), record }])?;
    debug_assert_eq!(committed, revision);
    Ok(Ok(Outcome::Written { revision, kv: Some(kv), deleted: false }))
}

fn delete_key(store: &mut impl StateStore, key: &[u8], record: KeyRecord) -> Result<Event, StoreError> {
    store.remove(Table::Keys, key)?;
    if record.session_id != 0 {
        store.remove(Table::SessionKeys, &session_key_entry(record.session_id, key))?;
    }
    Ok(Event { kind: EventKind::Delete, key: key.to_vec(), record: KeyRecord { value: Vec::new(), ..record } })
}
