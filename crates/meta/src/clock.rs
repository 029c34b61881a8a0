//! Clocks, and which of them the cluster trusts.
//!
//! Every node has two clocks. Its monotonic clock (`Instant`) only moves forward, at the rate
//! of real time, whatever NTP or an operator does to the date. Its wall clock (the date) can be
//! wrong by hours and can step either way at any moment. Nothing that decides correctness
//! compares two wall clocks, or a wall clock with a time taken on another node:
//!
//! - **The state clock** (`schema::META_CLOCK_MS`) is the time every replica's state machine
//!   sees: it is advanced by proposal stamps alone, and only the leader stamps
//!   ([`StateClock`]). A stamp follows the leader's wall clock where it can, but never goes back
//!   and never advances faster than the leader's monotonic clock ([`next_stamp`]): a leader
//!   whose date leaps a day ahead moves the state clock by the real time that passed, no more.
//!   So a duration measured on the state clock (the deduplication window, an upload's expiry, a
//!   multipart upload's expiry) is never shorter in real time than it says. Its absolute value
//!   (shown as creation and modification times) is only as good as the leaders' wall clocks.
//! - **Peer clocks.** Each node learns, from every call a peer makes to it, a lower bound on how
//!   far that peer's monotonic clock is ahead of its own ([`PeerClocks`]): the peer names its
//!   monotonic time in a header ([`CLOCK_HEADER`]), and the call cannot have arrived before it
//!   was sent. A follower that forwards a request to the leader states when it sent it in the
//!   leader's own monotonic time (early by at most a message delay), so the leader measures how
//!   long the request was on its way (in a socket of a paused process, say) on one clock: its
//!   own.
//!
//! Wall clocks still show: in the times people read, in the date a node stamps on what it hands
//! to a client, and in protocols that define themselves by dates (S3 signatures, TLS
//! certificates); see `docs/design/guarantees.md`.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::NodeId;

/// The header every call from one node to another carries: the caller's process (a random
/// incarnation number, in hex) and its monotonic time in milliseconds, as `INCARNATION.MS`.
pub(crate) const CLOCK_HEADER: &str = "x-mendfs-monotonic";

/// This process's monotonic origin and incarnation: monotonic times on the wire are counted
/// from the origin, and mean nothing to another process (even of the same node, after a
/// restart), which the incarnation tells apart.
struct Origin {
    at: Instant,
    incarnation: u64,
}

static ORIGIN: LazyLock<Origin> =
    LazyLock::new(|| Origin { at: Instant::now(), incarnation: rand::random::<u64>() | 1 });

/// This process's incarnation.
pub(crate) fn incarnation() -> u64 {
    ORIGIN.incarnation
}

/// `at` on this process's monotonic clock, in milliseconds from its origin (0 before it).
pub(crate) fn monotonic_ms(at: Instant) -> u64 {
    at.saturating_duration_since(ORIGIN.at).as_millis() as u64
}

/// The [`CLOCK_HEADER`] value for `at`.
pub(crate) fn header_value(at: Instant) -> String {
    format!("{:x}.{}", incarnation(), monotonic_ms(at))
}

/// A [`CLOCK_HEADER`] value: (incarnation, milliseconds); None if malformed.
pub(crate) fn parse_header(value: &str) -> Option<(u64, u64)> {
    let (incarnation, ms) = value.split_once('.')?;
    if incarnation.is_empty() || incarnation.len() > 16 || ms.is_empty() || ms.len() > 20 {
        return None;
    }
    Some((u64::from_str_radix(incarnation, 16).ok()?, ms.parse().ok()?))
}

/// A moment on one process's monotonic clock, as another process can name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PeerInstant {
    pub incarnation: u64,
    pub monotonic_ms: u64,
}

/// How long ago, on this process's clock, `sent` was; None if it names another process (a
/// restarted node, a sender that had no reading of this one).
pub(crate) fn elapsed_since(sent: PeerInstant, now: Instant) -> Option<Duration> {
    (sent.incarnation == incarnation())
        .then(|| Duration::from_millis(monotonic_ms(now).saturating_sub(sent.monotonic_ms)))
}

/// How long ago something began, as known at a moment on this process's monotonic clock. An
/// age crosses to another node as a number of milliseconds, never as a date, and the receiver
/// adds the time the message may have been on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Age {
    known_at: Instant,
    age: Duration,
}

impl Age {
    /// The age of something that began at `start`, on this process's clock.
    pub(crate) fn since(start: Instant) -> Self {
        Age { known_at: start, age: Duration::ZERO }
    }

    /// Something that was `age` old at `known_at`.
    pub(crate) fn of(age: Duration, known_at: Instant) -> Self {
        Age { known_at, age }
    }

    /// Its age at `now`.
    pub(crate) fn at(&self, now: Instant) -> Duration {
        self.age + now.saturating_duration_since(self.known_at)
    }
}

/// Samples older than this stop counting towards a peer's offset: the two monotonic clocks may
/// drift apart (NTP slews them by up to 500 ppm), and a bound older than twice this could be
/// off by more than 5 ms.
const PEER_SAMPLE_WINDOW: Duration = Duration::from_secs(5);

/// What this node knows of each peer's monotonic clock: a lower bound of `peer − own`.
#[derive(Default)]
pub(crate) struct PeerClocks {
    peers: Mutex<HashMap<NodeId, PeerOffset>>,
}

/// The best (largest) `sent − received` seen in the current window and in the one before: each
/// is a lower bound of the offset, and the largest is the tightest (the sample whose message
/// travelled fastest).
#[derive(Debug, Clone, Copy)]
struct PeerOffset {
    incarnation: u64,
    window_started: Instant,
    current_ms: i64,
    previous_ms: Option<i64>,
}

impl PeerOffset {
    fn best_ms(&self) -> i64 {
        self.previous_ms.map_or(self.current_ms, |previous| previous.max(self.current_ms))
    }
}

impl PeerClocks {
    /// A call from `peer` sent at `sent` (its clock) arrived at `received` (ours).
    pub(crate) fn observe(&self, peer: NodeId, sent: PeerInstant, received: Instant) {
        let sample_ms = sent.monotonic_ms as i64 - monotonic_ms(received) as i64;
        let mut peers = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let fresh = PeerOffset {
            incarnation: sent.incarnation,
            window_started: received,
            current_ms: sample_ms,
            previous_ms: None,
        };
        let entry = peers.entry(peer).or_insert(fresh);
        if entry.incarnation != sent.incarnation {
            // The peer restarted: its clock has a new origin.
            *entry = fresh;
        } else if received.saturating_duration_since(entry.window_started) >= PEER_SAMPLE_WINDOW {
            *entry = PeerOffset { previous_ms: Some(entry.current_ms), ..fresh };
        } else {
            entry.current_ms = entry.current_ms.max(sample_ms);
        }
    }

    /// `at` (our clock) on `peer`'s clock, never later than the truth (up to drift since the
    /// samples): None without a recent reading of that peer.
    pub(crate) fn on_peer_clock(&self, peer: NodeId, at: Instant) -> Option<PeerInstant> {
        let peers = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let offset = peers
            .get(&peer)
            .filter(|offset| at.saturating_duration_since(offset.window_started) < 2 * PEER_SAMPLE_WINDOW)?;
        let ms = (monotonic_ms(at) as i64).saturating_add(offset.best_ms()).max(0) as u64;
        Some(PeerInstant { incarnation: offset.incarnation, monotonic_ms: ms })
    }
}

/// A value of the state clock and the moment, on this node's monotonic clock, from which it is
/// known to hold: at or after the moment it was stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClockReading {
    pub clock_ms: u64,
    pub at: Instant,
}

impl ClockReading {
    /// The later reading of the two: the larger clock, and for equal clocks the earlier moment
    /// (both are true, and the earlier one lets more time count).
    pub(crate) fn latest(a: Option<ClockReading>, b: Option<ClockReading>) -> Option<ClockReading> {
        match (a, b) {
            (Some(a), Some(b)) if (a.clock_ms, std::cmp::Reverse(a.at)) >= (b.clock_ms, std::cmp::Reverse(b.at)) => {
                Some(a)
            }
            (Some(_), Some(b)) => Some(b),
            (a, b) => a.or(b),
        }
    }
}

/// The stamp a leader puts on proposals at `now`, given the latest state clock it knows of
/// (`reference`: its own last stamp or the clock its state machine applied, whichever is later)
/// and its wall clock `wall_ms`. Returns the new reading.
///
/// - The stamp never goes back: it is at least the reference.
/// - It never advances faster than real time: at most the reference plus the monotonic time
///   since it held. A wall clock ahead of that (a date stepped forward, a leader whose clock is
///   fast) is not followed; the state clock moves at real speed instead.
/// - Between those bounds it is the wall clock, so with good clocks the state clock is the date.
/// - A wall clock behind the reference (a leader whose date is late, or a state clock a fast
///   leader moved ahead) slows the state clock to half speed rather than stopping it, as
///   `adjtime` slews: what expires by the state clock still expires, and a state clock that is
///   ahead comes back to a correct wall clock.
/// - Without a reference (a new cluster's first proposal) it is the wall clock.
///
/// The returned moment is exactly as far past the reference's as the clock advanced at real
/// speed, so stamps in quick succession lose no fractions of a millisecond.
pub(crate) fn next_stamp(reference: Option<ClockReading>, wall_ms: u64, now: Instant) -> ClockReading {
    let Some(reference) = reference.filter(|reference| reference.clock_ms > 0) else {
        return ClockReading { clock_ms: wall_ms, at: now };
    };
    let elapsed_ms = now.saturating_duration_since(reference.at).as_millis() as u64;
    let real_speed = reference.clock_ms.saturating_add(elapsed_ms);
    if wall_ms >= real_speed {
        ClockReading { clock_ms: real_speed, at: reference.at + Duration::from_millis(elapsed_ms) }
    } else if wall_ms >= reference.clock_ms {
        ClockReading { clock_ms: wall_ms, at: now }
    } else {
        let half_ms = elapsed_ms / 2;
        ClockReading { clock_ms: reference.clock_ms + half_ms, at: reference.at + Duration::from_millis(2 * half_ms) }
    }
}

/// The leader's side of the state clock: its last stamp, and the latest clock its state machine
/// applied (another leader's stamps), kept by `raft_store` as entries are applied.
#[derive(Default)]
pub(crate) struct StateClock {
    last_stamp: Mutex<Option<ClockReading>>,
    applied: Mutex<Option<ClockReading>>,
}

impl StateClock {
    /// The state machine applied entries and its clock is now `clock_ms`: noted with the moment,
    /// if it is later than any noted before.
    pub(crate) fn applied(&self, clock_ms: u64, now: Instant) {
        let mut applied = self.applied.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if applied.is_none_or(|known| clock_ms > known.clock_ms) {
            *applied = Some(ClockReading { clock_ms, at: now });
        }
    }

    fn reference(&self) -> Option<ClockReading> {
        let applied = *self.applied.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let last = *self.last_stamp.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        ClockReading::latest(applied, last)
    }

    /// The stamp for proposals this node (as leader) commits now.
    pub(crate) fn stamp(&self, wall_ms: u64, now: Instant) -> u64 {
        let applied = *self.applied.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut last = self.last_stamp.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = next_stamp(ClockReading::latest(applied, *last), wall_ms, now);
        *last = Some(next);
        next.clock_ms
    }

    /// What a stamp taken now would be, without taking it: for the leader's decisions about
    /// what to propose (what has expired).
    pub(crate) fn peek(&self, wall_ms: u64, now: Instant) -> u64 {
        next_stamp(self.reference(), wall_ms, now).clock_ms
    }
}

#[cfg(test)]
mod tests;
