//! The node's budget for chunk bytes that readers hold: fetched for a `Get` or an S3 GET and
//! not yet handed to the transport.
//!
//! A charge lives as long as the bytes it pays for, not as long as the fetch: it is attached to
//! the chunk's buffer ([`ReadCharge::attach`]), so the slices of a chunk queued for a slow
//! client go on counting until the last of them is encoded and dropped. A permit dropped when
//! the chunk was merely *queued* let every reader hold two whole chunks beyond the budget.
//!
//! The chunk a reader needs next is charged whatever the budget holds (it may overdraw it), so
//! every reader moves on its own and none waits for another's client; chunks fetched *ahead*
//! of it are charged only while the budget has room. So with many readers the budget goes to
//! the chunks they need now, and read-ahead stops. Over the budget, a reader fetches its next
//! chunk only once its previous one has gone out ([`ReadCharge::on_release`]): it waits for
//! its own client alone, and holds one chunk instead of two.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

#[derive(Debug)]
pub(crate) struct ReadBudget {
    held: AtomicU64,
    limit: u64,
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
        Arc::new(Self { held: AtomicU64::new(0), limit })
    }

    /// Charges the chunk a reader needs next: never refused, never waits.
    pub(crate) fn charge_due(self: &Arc<Self>, bytes: u64) -> ReadCharge {
        self.held.fetch_add(bytes, Ordering::AcqRel);
        ReadCharge { budget: self.clone(), bytes, released: None }
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

    #[test]
    fn read_ahead_is_charged_only_within_the_limit_and_the_due_chunk_always() {
        let budget = ReadBudget::new(10);
        let ahead = budget.try_charge_ahead(6).expect("fits");
        assert!(budget.try_charge_ahead(5).is_none(), "6 + 5 is over 10");
        let due = budget.charge_due(8);
        assert_eq!(budget.held(), 14, "the due chunk overdraws the budget");
        assert!(budget.try_charge_ahead(1).is_none());
        drop(ahead);
        drop(due);
        assert_eq!(budget.held(), 0);
        assert!(budget.try_charge_ahead(10).is_some(), "a charge exactly at the limit fits");
        assert_eq!(budget.held(), 0, "a dropped charge gives its bytes back");
    }

    #[test]
    fn an_attached_charge_lasts_until_the_last_slice_is_dropped() {
        let budget = ReadBudget::new(1 << 20);
        let data = budget.charge_due(4).attach(Bytes::from_static(b"abcd"));
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

    #[test]
    fn on_release_resolves_when_the_bytes_are_gone() {
        let budget = ReadBudget::new(8);
        let mut charge = budget.charge_due(8);
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
}
