//! The node's budget for chunk bytes that readers hold: fetched for a `Get` or an S3 GET and
//! not yet handed to the transport.
//!
//! A charge lives as long as the bytes it pays for, not as long as the fetch: it is attached to
//! the chunk's buffer ([`ReadCharge::attach`]), so the slices of a chunk queued for a slow
//! client go on counting until the last of them is encoded and dropped. A permit dropped when
//! the chunk was merely *queued* let every reader hold two whole chunks beyond the budget.
//!
//! Chunks fetched *ahead* of need are charged only while the budget has room. The chunk a
//! reader needs next may overdraw the budget, up to a hard cap of `OVERDRAW_FACTOR` times it,
//! so that up to the cap every reader moves on its own and none waits for another's client.
//! So with many readers the budget goes to the chunks they need now, and read-ahead stops.
//! Over the budget, a reader fetches its next chunk only once its previous one has gone out
//! ([`ReadCharge::on_release`]): it waits for its own client alone, and holds one chunk
//! instead of two. At the cap, readers wait for room, up to a deadline, and then fail as
//! unavailable: a node's read memory stays bounded however many readers come (a chunk per
//! reader would be 16 GiB at 4 096 connections), at the cost of failing reads when that many
//! stall.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

/// How far the chunks readers need next may take the budget past its limit.
pub(crate) const OVERDRAW_FACTOR: u64 = 4;

#[derive(Debug)]
pub(crate) struct ReadBudget {
    held: AtomicU64,
    limit: u64,
    /// Woken whenever a charge is given back, for readers waiting at the cap.
    released: Notify,
}

/// What a [`ReadBudget`] holds, at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadBudgetUsage {
    pub held_bytes: u64,
    pub limit_bytes: u64,
    pub cap_bytes: u64,
}

/// Bytes charged to a [`ReadBudget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct ReadCharge {
    budget: Arc<ReadBudget>,
    bytes: u64,
    released: Option<oneshot::Sender<()>>,
}

impl ReadBudget {
    pub(crate) fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self { held: AtomicU64::new(0), limit, released: Notify::new() })
    }

    /// Bytes charged now, the budget, and the hard cap the chunks readers need next may
    /// overdraw it to: for the node's metrics.
    pub(crate) fn usage(&self) -> ReadBudgetUsage {
        ReadBudgetUsage {
            held_bytes: self.held.load(Ordering::Acquire),
            limit_bytes: self.limit,
            cap_bytes: self.limit.saturating_mul(OVERDRAW_FACTOR),
        }
    }

    /// Charges the chunk a reader needs next: at once while what is held stays within the
    /// hard cap (or nothing is held, so that a chunk bigger than the cap is still readable);
    /// else once charges given back make room, waiting at most `patience`.
    pub(crate) async fn charge_due(self: &Arc<Self>, bytes: u64, patience: Duration) -> Result<ReadCharge, String> {
        let cap = self.limit.saturating_mul(OVERDRAW_FACTOR);
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            // Registered before the check, so a release between the two is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(charge) = self.try_charge(bytes, cap) {
                return Ok(charge);
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(format!(
                    "the node's read budget ({} MiB of chunks held for readers) stayed full for {patience:?}: \
                     too many reads at once, or readers that do not take their data",
                    cap >> 20
                ));
            }
        }
    }

    /// Charges `bytes` if what is held stays within `cap`, or if nothing is held.
    fn try_charge(self: &Arc<Self>, bytes: u64, cap: u64) -> Option<ReadCharge> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|after| *after <= cap || held == 0)
            })
            .ok()
            .map(|_| ReadCharge { budget: self.clone(), bytes, released: None })
    }

    /// Whether `bytes` more fit under the limit now.
    pub(crate) fn has_room_for(&self, bytes: u64) -> bool {
        self.held.load(Ordering::Acquire).saturating_add(bytes) <= self.limit
    }

    /// Charges a chunk fetched ahead of need, only if it fits under the limit with everything
    /// held now.
    pub(crate) fn try_charge_ahead(self: &Arc<Self>, bytes: u64) -> Option<ReadCharge> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|after| *after <= self.limit)
            })
            .ok()
            .map(|_| ReadCharge { budget: self.clone(), bytes, released: None })
    }

    /// Bytes charged now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for ReadCharge {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.released.notify_waiters();
        if let Some(released) = self.released.take() {
            let _ = released.send(());
        }
    }
}

/// A chunk's bytes with their charge: the charge goes when the last slice of them does.
struct Charged {
    data: Bytes,
    _charge: ReadCharge,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl ReadCharge {
    /// Resolves once this charge is given back (its bytes all dropped), replacing any earlier
    /// receiver.
    pub(crate) fn on_release(&mut self) -> oneshot::Receiver<()> {
        let (released, receiver) = oneshot::channel();
        self.released = Some(released);
        receiver
    }

    /// `data`, holding this charge until every slice of it is dropped.
    pub(crate) fn attach(self, data: Bytes) -> Bytes {
        Bytes::from_owner(Charged { data, _charge: self })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_PATIENCE: Duration = Duration::ZERO;

    #[tokio::test]
    async fn read_ahead_is_charged_only_within_the_limit_and_the_due_chunk_up_to_the_cap() {
        let budget = ReadBudget::new(10);
        let ahead = budget.try_charge_ahead(6).expect("fits");
        assert!(budget.try_charge_ahead(5).is_none(), "6 + 5 is over 10");
        let due = budget.charge_due(8, NO_PATIENCE).await.expect("within the cap of 40");
        assert_eq!(budget.held(), 14, "the due chunk overdraws the budget");
        assert!(budget.try_charge_ahead(1).is_none());
        drop(ahead);
        drop(due);
        assert_eq!(budget.held(), 0);
        assert!(budget.try_charge_ahead(10).is_some(), "a charge exactly at the limit fits");
        assert_eq!(budget.held(), 0, "a dropped charge gives its bytes back");
    }

    #[tokio::test]
    async fn an_attached_charge_lasts_until_the_last_slice_is_dropped() {
        let budget = ReadBudget::new(1 << 20);
        let data = budget.charge_due(4, NO_PATIENCE).await.unwrap().attach(Bytes::from_static(b"abcd"));
        let mut first = data.slice(0..2);
        let second = data.slice(2..4);
        drop(data);
        assert_eq!(budget.held(), 4, "slices still queued hold the charge");
        assert_eq!(first.split_to(1), Bytes::from_static(b"a"));
        drop(first);
        assert_eq!(budget.held(), 4);
        assert_eq!(&second[..], b"cd");
        drop(second);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn on_release_resolves_when_the_bytes_are_gone() {
        let budget = ReadBudget::new(8);
        let mut charge = budget.charge_due(8, NO_PATIENCE).await.unwrap();
        let mut released = charge.on_release();
        assert!(!budget.has_room_for(1));
        let data = charge.attach(Bytes::from(vec![7u8; 8]));
        let slice = data.slice(1..3);
        drop(data);
        assert!(released.try_recv().is_err(), "a slice is still out");
        drop(slice);
        assert!(released.try_recv().is_ok());
        assert!(budget.has_room_for(8));
    }

    #[tokio::test]
    async fn at_the_cap_a_due_chunk_waits_for_room_and_fails_after_its_patience() {
        let budget = ReadBudget::new(10);
        let held = budget.charge_due(35, NO_PATIENCE).await.unwrap();
        let refused = budget.charge_due(6, Duration::from_millis(50)).await.expect_err("35 + 6 is over the cap of 40");
        assert!(refused.contains("stayed full for 50ms"), "{refused}");
        assert_eq!(budget.held(), 35, "a refused charge takes nothing");
        // A charge given back while a reader waits lets it in.
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.charge_due(6, Duration::from_secs(30)).await.map(|charge| charge.bytes) }
        });
        // It cannot finish before the release below: nothing else makes room.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(held);
        assert_eq!(waiting.await.unwrap(), Ok(6));
        // A chunk bigger than the cap is readable when nothing else is held.
        assert!(budget.charge_due(100, NO_PATIENCE).await.is_ok());
    }
}
