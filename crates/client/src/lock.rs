//! The lock recipe (etcd's mutex), for the CLI's `kv lock`, `mendfs chaos` and any program.
//!
//! Each contender creates an ephemeral key under the lock's prefix; the one with the lowest
//! create revision holds the lock; the others wait for the key just before theirs to go. The
//! holder's create revision is the fencing token: it only grows, so a resource that remembers
//! the highest token it saw can refuse a stale holder whose session expired while it was
//! paused. A lease-based lock alone cannot promise mutual exclusion (a paused holder may
//! resume after its session expired); the token is what lets the protected resource enforce
//! it.
//!
//! A [`HeldLock`] is held only while its session is known to be alive: once the client gives
//! the session up (no keep-alive acknowledged for 2/3 of the TTL) or hears that it is gone,
//! [`HeldLock::lost`] resolves, before the cluster can expire the session and let the next
//! contender in (the reasoning is at `KeepAlivePlan`).

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::{Client, Error, EventKind, KeyValue, Session};

/// The key prefix under which lock `name`'s contenders queue.
pub fn lock_prefix(name: &str) -> String {
    format!("__lock/{name}/")
}

/// A lock this client holds; see the module doc. Dropping it without [`HeldLock::release`]
/// stops the keep-alives, so the cluster frees the lock when the session's TTL runs out.
pub struct HeldLock {
    session: Option<Session>,
    keep_alive: JoinHandle<Error>,
    token: u64,
    name: String,
    /// Why the lock was lost, once [`HeldLock::lost`] has seen it.
    lost_because: Option<String>,
}

impl Client {
    /// Waits until this client holds lock `name`, under a session of `ttl`. Fails with
    /// [`Error::LockLost`] when the session ends while waiting (a lock acquired after that
    /// would not be held at all).
    pub async fn lock(&self, name: &str, ttl: Duration) -> Result<HeldLock, Error> {
        let prefix = lock_prefix(name);
        let session = self.open_session(ttl).await?;
        let key = format!("{prefix}{:016x}", session.id());
        let mut keep_alive = session.keep_alive_in_background();
        let acquired = async {
            let mine = self.create(key.as_bytes(), b"", Some(session.id())).await?;
            // Biased: a session given up at the moment the lock comes is not taken as held.
            tokio::select! {
                biased;
                ended = &mut keep_alive => Err(Error::LockLost(format!("while waiting for it: {}", session_end(ended)))),
                token = acquire(self, &prefix, &mine) => token,
            }
        }
        .await;
        match acquired {
            Ok(token) => {
                Ok(HeldLock { session: Some(session), keep_alive, token, name: name.to_string(), lost_because: None })
            }
            Err(error) => {
                keep_alive.abort();
                // Closing lets the next contender in at once, should the cluster still have
                // the session; it may be unreachable, so this is brief.
                let _ = tokio::time::timeout(ttl / 3, session.close()).await;
                Err(error)
            }
        }
    }
}

impl HeldLock {
    /// The fencing token: the holder's create revision, larger than any earlier holder's.
    pub fn token(&self) -> u64 {
        self.token
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The session's TTL.
    pub fn ttl(&self) -> Duration {
        self.session.as_ref().map(Session::ttl).unwrap_or_default()
    }

    /// Resolves when the lock is lost: the session was given up or is gone. From then on
    /// whatever the lock protects must stop; the returned error says why. Cancel-safe: it
    /// can be polled in a `select!` and polled again.
    pub async fn lost(&mut self) -> Error {
        if let Some(reason) = &self.lost_because {
            return Error::LockLost(reason.clone());
        }
        let reason = session_end((&mut self.keep_alive).await);
        // A finished JoinHandle must not be polled again: the reason is kept instead.
        self.lost_because = Some(reason.clone());
        Error::LockLost(reason)
    }

    /// Releases the lock: the session ends and its key is deleted, so the next contender
    /// gets the lock at once.
    pub async fn release(mut self) -> Result<(), Error> {
        self.keep_alive.abort();
        match self.session.take() {
            Some(session) => session.close().await,
            None => Ok(()),
        }
    }

    /// Ends a lost lock's session if the cluster still has it, waiting at most a third of the
    /// TTL (the cluster may well be unreachable).
    pub async fn abandon(mut self) {
        self.keep_alive.abort();
        if let Some(session) = self.session.take() {
            let ttl = session.ttl();
            let _ = tokio::time::timeout(ttl / 3, session.close()).await;
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        self.keep_alive.abort();
    }
}

fn session_end(ended: Result<Error, tokio::task::JoinError>) -> String {
    match ended {
        Ok(error) => error.to_string(),
        Err(e) => format!("the keep-alive task failed: {e}"),
    }
}

/// Waits until `mine` is the oldest contender under `prefix`; returns its fencing token.
/// Contenders are listed whole, page by page: keys are ordered by session id, not by age, so
/// the one just ahead can be on any page (with more contenders than one list returns, a
/// first page alone could show no one ahead, and two would hold the lock).
async fn acquire(client: &Client, prefix: &str, mine: &KeyValue) -> Result<u64, Error> {
    loop {
        let mut pages = client.list_pages(prefix.as_bytes(), 0);
        let mut listed = false;
        let mut before: Option<KeyValue> = None;
        while let Some(page) = pages.next_page().await? {
            for kv in page {
                if kv.key == mine.key {
                    listed = kv.create_revision == mine.create_revision;
                } else if kv.create_revision < mine.create_revision
                    && before.as_ref().is_none_or(|b| kv.create_revision > b.create_revision)
                {
                    before = Some(kv);
                }
            }
        }
        if !listed {
            return Err(Error::LockLost(format!(
                "while waiting for it: the lock key {} is gone (its session ended)",
                String::from_utf8_lossy(&mine.key)
            )));
        }
        let Some(before) = before else { return Ok(mine.create_revision) };
        // Wait for the contender just ahead of us to release (or lose) the lock.
        let mut watch = client.watch(&before.key, false, before.modify_revision + 1);
        loop {
            let reply = watch.next().await?;
            if reply.events.iter().any(|event| event.kind == EventKind::Delete as i32) {
                break;
            }
        }
    }
}
