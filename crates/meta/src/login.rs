//! One-time login links for the web dashboard.
//!
//! `mendfs auth login-link` (and `local up`, `demo --keep`) print a URL whose fragment holds a
//! login code: 256 random bits that the metadata keeps only as a hash, valid for a few minutes
//! and for one use. The page sends it once to `/api/login`; the node redeems it through Raft,
//! which in one entry removes the code and creates a session token with the code's role and an
//! expiry. A link that leaks after it was opened (browser history, a screenshot, a shared
//! terminal) is worth nothing; the session token lives only in the tab's sessionStorage.
//!
//! Pure: the apply functions take the state clock; the expiry of sessions is checked again by
//! every node against its wall clock when it admits a call (`auth::TokenTable`).

use serde::{Deserialize, Serialize};

use crate::auth::{Role, TokenRecord};
use crate::schema::{decode, encode, CommandError, CommandResult, Outcome, StateStore, StoreError, Table};

/// Login codes start with this, so that a leaked one is recognizable (secret scanners).
pub const LOGIN_CODE_PREFIX: &str = "mendfs_login_";
/// Session tokens a login creates are named this and 16 hex digits (`auth token list` shows
/// them; `auth token revoke` ends one).
pub const SESSION_NAME_PREFIX: &str = "dashboard-login-";
/// Unused codes kept at once: each is one row, and an admin asking for more than this many
/// links that nobody opens is a mistake worth an error.
pub const LOGIN_CODES_MAX: usize = 64;
/// Live login sessions at once. Each is a token every node keeps in memory; expired ones are
/// pruned by every login, so only sessions opened within their lifetime count.
pub const LOGIN_SESSIONS_MAX: usize = 1_024;
/// The longest a code may wait to be used, and the longest a session may last.
pub const LOGIN_CODE_TTL_MAX_MS: u64 = 24 * 3_600_000;
pub const LOGIN_SESSION_TTL_MAX_MS: u64 = 7 * 24 * 3_600_000;

/// A login code as the metadata keeps it (in `Table::LoginCodes`, by the code's hash).
/// Encoded with postcard, by position: append new fields at the end, never reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginCodeRecord {
    pub role: Role,
    pub created_unix_ms: u64,
    /// Unused after this (state clock), the code is refused and removed.
    pub expires_unix_ms: u64,
    /// How long the session it opens lasts.
    pub session_ttl_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoginCommand {
    /// Records a new code (only its hash), usable for `code_ttl_ms` from this entry's time and
    /// opening a session of `session_ttl_ms`. Lifetimes, not dates: the times come from the
    /// state clock at the apply, not from the proposing node's clock.
    CreateCode { hash: [u8; 32], role: Role, code_ttl_ms: u64, session_ttl_ms: u64 },
    /// Uses the code up and opens a session: the token `session_name` with the code's role,
    /// stored as `session_hash`, expiring `session_ttl_ms` after this entry's time.
    Redeem { code_hash: [u8; 32], session_name: String, session_hash: [u8; 32] },
}

impl LoginCommand {
    pub(crate) fn approximate_bytes(&self) -> usize {
        match self {
            LoginCommand::CreateCode { .. } => 64,
            LoginCommand::Redeem { session_name, .. } => 64 + session_name.len(),
        }
    }
}

/// A new login code: the prefix and 256 random bits.
pub fn generate_login_code() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{LOGIN_CODE_PREFIX}{}", mendfs_types::hex(&bytes))
}

/// Whether `text` has the shape of a login code (checked before anything is looked up, so a
/// stranger's garbage costs nothing).
pub fn is_login_code(text: &str) -> bool {
    text.strip_prefix(LOGIN_CODE_PREFIX)
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The name of the session token a login opens.
pub fn session_name() -> String {
    format!("{SESSION_NAME_PREFIX}{:016x}", rand::random::<u64>())
}

/// Whether a login code with this hash is waiting to be used (expired or not: the apply decides).
pub fn code_exists(store: &impl StateStore, hash: &[u8; 32]) -> Result<bool, StoreError> {
    Ok(store.get(Table::LoginCodes, hash)?.is_some())
}

/// When the token `name` expires, if it does (tokens made by `auth token create` do not).
pub fn token_expiry(store: &impl StateStore, name: &[u8]) -> Result<Option<u64>, StoreError> {
    store.get(Table::TokenExpiries, name)?.map(|bytes| decode_ms(&bytes)).transpose()
}

fn decode_ms(bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| StoreError("token expiry: not a u64".into()))?;
    Ok(u64::from_be_bytes(array))
}

pub(crate) fn apply(
    store: &mut impl StateStore,
    command: &LoginCommand,
    clock_ms: u64,
) -> Result<CommandResult, StoreError> {
    match command {
        LoginCommand::CreateCode { hash, role, code_ttl_ms, session_ttl_ms } => {
            let record = LoginCodeRecord {
                role: *role,
                created_unix_ms: clock_ms,
                expires_unix_ms: clock_ms.saturating_add(*code_ttl_ms),
                session_ttl_ms: *session_ttl_ms,
            };
            create_code(store, hash, &record, clock_ms)
        }
        LoginCommand::Redeem { code_hash, session_name, session_hash } => {
            redeem(store, code_hash, session_name, session_hash, clock_ms)
        }
    }
}

fn create_code(
    store: &mut impl StateStore,
    hash: &[u8; 32],
    record: &LoginCodeRecord,
    clock_ms: u64,
) -> Result<CommandResult, StoreError> {
    let code_ttl_ms = record.expires_unix_ms.saturating_sub(record.created_unix_ms);
    if code_ttl_ms == 0
        || code_ttl_ms > LOGIN_CODE_TTL_MAX_MS
        || record.session_ttl_ms == 0
        || record.session_ttl_ms > LOGIN_SESSION_TTL_MAX_MS
        // The dashboard only reads: a link never opens a session that could mint tokens.
        || record.role != Role::Read
    {
        return Ok(Err(CommandError::InvalidRequest {
            why: format!(
                "a login link opens a read session; the link lasts 1 ms to {} h and its session 1 ms to {} h",
                LOGIN_CODE_TTL_MAX_MS / 3_600_000,
                LOGIN_SESSION_TTL_MAX_MS / 3_600_000
            ),
        }));
    }
    let mut waiting = 0;
    // The table holds at most LOGIN_CODES_MAX rows: reading it whole is cheap.
    for (key, value) in store.range(Table::LoginCodes, &[], None, LOGIN_CODES_MAX + 1)? {
        let code: LoginCodeRecord = decode(&value)?;
        if code.expires_unix_ms <= clock_ms {
            store.remove(Table::LoginCodes, &key)?;
        } else if key.as_slice() != hash {
            waiting += 1;
        }
    }
    if waiting >= LOGIN_CODES_MAX {
        return Ok(Err(CommandError::TooMany {
            what: "unused login links".into(),
            limit: LOGIN_CODES_MAX as u64,
            hint: "wait for some to expire".into(),
        }));
    }
    store.put(Table::LoginCodes, hash, &encode(record)?)?;
    Ok(Ok(Outcome::Noop))
}

fn redeem(
    store: &mut impl StateStore,
    code_hash: &[u8; 32],
    session_name: &str,
    session_hash: &[u8; 32],
    clock_ms: u64,
) -> Result<CommandResult, StoreError> {
    let Some(bytes) = store.get(Table::LoginCodes, code_hash)? else {
        return Ok(Err(CommandError::LoginCodeInvalid));
    };
    let code: LoginCodeRecord = decode(&bytes)?;
    if code.expires_unix_ms <= clock_ms {
        store.remove(Table::LoginCodes, code_hash)?;
        return Ok(Err(CommandError::LoginCodeInvalid));
    }
    if !session_name.starts_with(SESSION_NAME_PREFIX) || store.get(Table::Tokens, session_name.as_bytes())?.is_some() {
        return Ok(Err(CommandError::InvalidRequest {
            why: format!("session name {session_name:?} is taken or not a login's"),
        }));
    }
    // A login refused for want of room keeps its code: the link works once sessions expire.
    let live = prune_expired_sessions(store, clock_ms)?;
    if live >= LOGIN_SESSIONS_MAX {
        return Ok(Err(CommandError::TooMany {
            what: "dashboard login sessions".into(),
            limit: LOGIN_SESSIONS_MAX as u64,
            hint: "revoke some with `mendfs auth token revoke dashboard-login-…`".into(),
        }));
    }
    store.remove(Table::LoginCodes, code_hash)?;
    let expires_unix_ms = clock_ms.saturating_add(code.session_ttl_ms);
    let record = TokenRecord { hash: *session_hash, role: code.role, created_unix_ms: clock_ms };
    store.put(Table::Tokens, session_name.as_bytes(), &encode(&record)?)?;
    store.put(Table::TokenExpiries, session_name.as_bytes(), &expires_unix_ms.to_be_bytes())?;
    Ok(Ok(Outcome::LoginSession { role: code.role, expires_unix_ms }))
}

/// Removes the sessions that expired by `clock_ms` (their tokens too); returns how many live.
/// Bounded: the table never holds more than `LOGIN_SESSIONS_MAX` rows plus the expired ones
/// since the last login, and each login prunes them all.
fn prune_expired_sessions(store: &mut impl StateStore, clock_ms: u64) -> Result<usize, StoreError> {
    let mut live = 0;
    let mut start = Vec::new();
    loop {
        let rows = store.range(Table::TokenExpiries, &start, None, 256)?;
        let Some((last, _)) = rows.last() else { break };
        start = last.clone();
        start.push(0);
        for (name, value) in rows {
            if decode_ms(&value)? <= clock_ms {
                store.remove(Table::TokenExpiries, &name)?;
                store.remove(Table::Tokens, &name)?;
            } else {
                live += 1;
            }
        }
    }
    Ok(live)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::MemoryStore;

    const MINUTE: u64 = 60_000;

    fn code(role: Role) -> LoginCommand {
        create(7, role)
    }

    fn create(byte: u8, role: Role) -> LoginCommand {
        LoginCommand::CreateCode { hash: [byte; 32], role, code_ttl_ms: 10 * MINUTE, session_ttl_ms: 60 * MINUTE }
    }

    fn redeem_at(store: &mut MemoryStore, code_hash: [u8; 32], name: &str, now: u64) -> CommandResult {
        let command =
            LoginCommand::Redeem { code_hash, session_name: name.into(), session_hash: [name.len() as u8; 32] };
        apply(store, &command, now).unwrap()
    }

    #[test]
    fn a_code_opens_one_session_with_its_role_and_then_is_gone() {
        let mut store = MemoryStore::default();
        let now = 1_000_000;
        apply(&mut store, &code(Role::Read), now).unwrap().unwrap();
        assert!(code_exists(&store, &[7; 32]).unwrap());

        let outcome = redeem_at(&mut store, [7; 32], "dashboard-login-1", now + MINUTE).unwrap();
        assert_eq!(outcome, Outcome::LoginSession { role: Role::Read, expires_unix_ms: now + 61 * MINUTE });
        let token: TokenRecord = decode(&store.get(Table::Tokens, b"dashboard-login-1").unwrap().unwrap()).unwrap();
        assert_eq!(token.role, Role::Read);
        assert_eq!(token_expiry(&store, b"dashboard-login-1").unwrap(), Some(now + 61 * MINUTE));

        // The same link again, even at once: refused, and no second session.
        assert_eq!(
            redeem_at(&mut store, [7; 32], "dashboard-login-2", now + MINUTE),
            Err(CommandError::LoginCodeInvalid)
        );
        assert!(store.get(Table::Tokens, b"dashboard-login-2").unwrap().is_none());
        assert!(!code_exists(&store, &[7; 32]).unwrap());
    }

    #[test]
    fn an_expired_code_is_refused_and_removed() {
        let mut store = MemoryStore::default();
        let now = 1_000_000;
        apply(&mut store, &create(1, Role::Read), now).unwrap().unwrap();
        assert_eq!(
            redeem_at(&mut store, [1; 32], "dashboard-login-1", now + 10 * MINUTE),
            Err(CommandError::LoginCodeInvalid)
        );
        assert!(!code_exists(&store, &[1; 32]).unwrap());
        assert!(store.get(Table::Tokens, b"dashboard-login-1").unwrap().is_none());
    }

    #[test]
    fn unknown_codes_and_foreign_session_names_change_nothing() {
        let mut store = MemoryStore::default();
        assert_eq!(redeem_at(&mut store, [9; 32], "dashboard-login-1", 5), Err(CommandError::LoginCodeInvalid));
        let now = 1_000_000;
        apply(&mut store, &create(2, Role::Read), now).unwrap().unwrap();
        // A session may not take the name of an operator's token.
        assert!(matches!(redeem_at(&mut store, [2; 32], "admin", now), Err(CommandError::InvalidRequest { .. })));
        assert!(store.get(Table::Tokens, b"admin").unwrap().is_none());
    }

    #[test]
    fn codes_and_sessions_are_bounded_and_expired_ones_make_room() {
        let mut store = MemoryStore::default();
        let now = 1_000_000;
        for i in 0..LOGIN_CODES_MAX {
            apply(&mut store, &create(i as u8, Role::Read), now).unwrap().unwrap();
        }
        let one_more = create(200, Role::Read);
        assert!(matches!(apply(&mut store, &one_more, now).unwrap(), Err(CommandError::TooMany { .. })));
        // Once they expired, there is room again.
        apply(&mut store, &one_more, now + 10 * MINUTE).unwrap().unwrap();
        assert_eq!(store.range(Table::LoginCodes, &[], None, usize::MAX).unwrap().len(), 1);

        // Sessions: fill to the limit, then the next login is refused until they expire.
        for i in 0..LOGIN_SESSIONS_MAX {
            store
                .put(
                    Table::TokenExpiries,
                    format!("dashboard-login-{i:05}").as_bytes(),
                    &(now + 20 * MINUTE).to_be_bytes(),
                )
                .unwrap();
        }
        assert!(matches!(
            redeem_at(&mut store, [200; 32], "dashboard-login-x", now + 11 * MINUTE),
            Err(CommandError::TooMany { .. })
        ));
        assert!(code_exists(&store, &[200; 32]).unwrap(), "a login refused for want of room keeps its code");
        apply(&mut store, &create(201, Role::Read), now + 15 * MINUTE).unwrap().unwrap();
        redeem_at(&mut store, [201; 32], "dashboard-login-y", now + 21 * MINUTE).unwrap();
        assert_eq!(store.range(Table::TokenExpiries, &[], None, usize::MAX).unwrap().len(), 1);
    }

    #[test]
    fn codes_are_read_only_and_their_lifetimes_bounded() {
        let mut store = MemoryStore::default();
        let bad = [
            LoginCommand::CreateCode {
                hash: [3; 32],
                role: Role::Read,
                code_ttl_ms: LOGIN_CODE_TTL_MAX_MS + 1,
                session_ttl_ms: 1,
            },
            LoginCommand::CreateCode { hash: [3; 32], role: Role::Read, code_ttl_ms: 0, session_ttl_ms: 1 },
            LoginCommand::CreateCode {
                hash: [3; 32],
                role: Role::Read,
                code_ttl_ms: 1,
                session_ttl_ms: LOGIN_SESSION_TTL_MAX_MS + 1,
            },
            create(3, Role::Admin),
            create(3, Role::Write),
        ];
        for command in bad {
            assert!(
                matches!(apply(&mut store, &command, 5).unwrap(), Err(CommandError::InvalidRequest { .. })),
                "{command:?}"
            );
        }
        assert!(!code_exists(&store, &[3; 32]).unwrap());
    }

    #[test]
    fn a_codes_times_are_the_state_clocks() {
        let mut store = MemoryStore::default();
        apply(&mut store, &create(4, Role::Read), 1_000).unwrap().unwrap();
        let record: LoginCodeRecord = decode(&store.get(Table::LoginCodes, &[4; 32]).unwrap().unwrap()).unwrap();
        assert_eq!((record.created_unix_ms, record.expires_unix_ms), (1_000, 1_000 + 10 * MINUTE));
    }

    #[test]
    fn codes_have_a_recognizable_shape() {
        let code = generate_login_code();
        assert!(is_login_code(&code));
        assert!(!is_login_code(&code[..code.len() - 1]));
        assert!(!is_login_code("mendfs_0000"));
        assert!(!is_login_code(&code.replace(LOGIN_CODE_PREFIX, "mendfs_")));
    }
}
