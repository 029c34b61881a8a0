use proptest::prelude::*;

use super::*;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// A date in 2026, in ms since 1970.
const DATE_MS: u64 = 1_780_000_000_000;

fn after(start: Instant, ms: u64) -> Instant {
    start + Duration::from_millis(ms)
}

#[test]
fn a_new_cluster_starts_at_the_leaders_date() {
    let now = Instant::now();
    assert_eq!(next_stamp(None, DATE_MS, now), ClockReading { clock_ms: DATE_MS, at: now });
    let zero = ClockReading { clock_ms: 0, at: now };
    assert_eq!(next_stamp(Some(zero), DATE_MS, now).clock_ms, DATE_MS, "a state without a clock yet");
}

#[test]
fn a_correct_date_is_followed() {
    let start = Instant::now();
    let reference = ClockReading { clock_ms: DATE_MS, at: start };
    let next = next_stamp(Some(reference), DATE_MS + 1_000, after(start, 1_000));
    assert_eq!(next.clock_ms, DATE_MS + 1_000);
    // A wall clock a little slow for the state clock: followed, since that is no faster than real time.
    let next = next_stamp(Some(reference), DATE_MS + 400, after(start, 1_000));
    assert_eq!(next.clock_ms, DATE_MS + 400);
}

#[test]
fn a_date_that_leaps_ahead_moves_the_state_clock_by_the_real_time_only() {
    let start = Instant::now();
    let reference = ClockReading { clock_ms: DATE_MS, at: start };
    let next = next_stamp(Some(reference), DATE_MS + DAY_MS, after(start, 1_500));
    assert_eq!(next, ClockReading { clock_ms: DATE_MS + 1_500, at: after(start, 1_500) });
    let later = next_stamp(Some(next), DATE_MS + DAY_MS + 10, after(start, 2_000));
    assert_eq!(later.clock_ms, DATE_MS + 2_000, "and goes on at real speed");
}

#[test]
fn a_date_behind_slows_the_state_clock_but_never_stops_or_reverses_it() {
    let start = Instant::now();
    let reference = ClockReading { clock_ms: DATE_MS, at: start };
    let next = next_stamp(Some(reference), DATE_MS - DAY_MS, after(start, 1_000));
    assert_eq!(next.clock_ms, DATE_MS + 500, "half speed");
    // Stamps a fraction of a millisecond apart accumulate: the moment moves only with the clock.
    let mut reading = next;
    for i in 1..=10 {
        reading = next_stamp(Some(reading), DATE_MS - DAY_MS, after(start, 1_000 + i));
    }
    assert_eq!(reading.clock_ms, DATE_MS + 505);
}

#[test]
fn quick_stamps_lose_no_time() {
    let start = Instant::now();
    let mut reading = ClockReading { clock_ms: DATE_MS, at: start };
    // A date far ahead, stamps every 0.3 ms: the state clock still advances at real speed.
    for i in 1..=10_000u64 {
        reading = next_stamp(Some(reading), DATE_MS + DAY_MS, start + Duration::from_micros(300 * i));
    }
    assert_eq!(reading.clock_ms, DATE_MS + 3_000);
}

#[test]
fn a_new_leader_continues_from_the_applied_clock_whatever_its_date() {
    let start = Instant::now();
    for wall_ms in [DATE_MS - DAY_MS, DATE_MS + 2_000, DATE_MS + DAY_MS] {
        let leader = StateClock::default();
        // The old leader's last stamp, applied here at `start`.
        leader.applied(DATE_MS, start);
        let stamp = leader.stamp(wall_ms, after(start, 2_000));
        assert!((DATE_MS..=DATE_MS + 2_000).contains(&stamp), "wall {wall_ms}: stamp {stamp}");
        let next = leader.stamp(wall_ms + 1_000, after(start, 3_000));
        assert!(next > stamp && next - stamp <= 1_000, "then at most real speed: {stamp} then {next}");
    }
}

#[test]
fn the_later_of_an_own_stamp_and_an_applied_clock_is_the_reference() {
    let start = Instant::now();
    let clock = StateClock::default();
    assert_eq!(clock.stamp(DATE_MS, start), DATE_MS);
    // Another leader moved the clock further meanwhile (a term this node did not lead).
    clock.applied(DATE_MS + 5_000, after(start, 1_000));
    assert_eq!(clock.peek(DATE_MS + DAY_MS, after(start, 1_000)), DATE_MS + 5_000);
    assert_eq!(clock.stamp(DATE_MS + DAY_MS, after(start, 1_250)), DATE_MS + 5_250);
    // An older applied clock (this node's own stamp, applied) changes nothing.
    clock.applied(DATE_MS + 5_100, after(start, 1_300));
    assert_eq!(clock.stamp(DATE_MS + DAY_MS, after(start, 1_500)), DATE_MS + 5_500);
}

#[derive(Debug, Clone)]
enum Event {
    /// Real time passes.
    Wait {
        ms: u64,
    },
    /// This node's wall clock steps to `offset_ms` (signed) from the true time.
    Step {
        offset_ms: i64,
    },
    /// Another leader's stamp, `ahead_ms` past this node's last, is applied here.
    OtherLeader {
        ahead_ms: u64,
    },
    Stamp,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (0u64..5_000).prop_map(|ms| Event::Wait { ms }),
        prop_oneof![Just(0i64), -(DAY_MS as i64)..(DAY_MS as i64), -5_000i64..5_000]
            .prop_map(|offset_ms| Event::Step { offset_ms }),
        (0u64..2_000).prop_map(|ahead_ms| Event::OtherLeader { ahead_ms }),
        Just(Event::Stamp),
        Just(Event::Stamp),
    ]
}

proptest! {
    /// Whatever the wall clock does: stamps never go back, and between any two the state clock
    /// advanced by at most the real time between them, give or take the millisecond the clock
    /// stands still while less than two have passed at half speed (each value counts from the
    /// first moment it held; another leader's stamps, themselves no faster, from when they were
    /// applied here).
    #[test]
    fn stamps_never_go_back_and_never_outrun_real_time(events in prop::collection::vec(event(), 1..200)) {
        let start = Instant::now();
        let clock = StateClock::default();
        let mut true_ms = 0u64;
        let mut offset_ms = 0i64;
        let mut stamps: Vec<(u64, u64)> = Vec::new();
        for event in events {
            match event {
                Event::Wait { ms } => true_ms += ms,
                Event::Step { offset_ms: to } => offset_ms = to,
                Event::OtherLeader { ahead_ms } => {
                    let base = stamps.last().map_or(DATE_MS, |(stamp, _)| *stamp);
                    // Another leader stamps no faster than real time either: `ahead_ms` of its
                    // stamp were real time that passed before this node applied it.
                    let stamped_ms = base + ahead_ms.min(true_ms - stamps.last().map_or(0, |(_, at)| *at));
                    clock.applied(stamped_ms, after(start, true_ms));
                    if stamps.last().is_none_or(|(last, _)| stamped_ms > *last) {
                        stamps.push((stamped_ms, true_ms));
                    }
                }
                Event::Stamp => {
                    let wall_ms = (DATE_MS as i64 + true_ms as i64 + offset_ms) as u64;
                    let stamp = clock.stamp(wall_ms, after(start, true_ms));
                    if let Some((previous, _)) = stamps.last() {
                        prop_assert!(stamp >= *previous, "back from {previous} to {stamp}");
                    }
                    for (earlier, earlier_at) in &stamps {
                        prop_assert!(
                            stamp.saturating_sub(*earlier) <= true_ms - earlier_at + 1,
                            "{stamp} is {} ms past {earlier} after {} ms", stamp - earlier, true_ms - earlier_at
                        );
                    }
                    if stamps.last().is_none_or(|(last, _)| stamp > *last) {
                        stamps.push((stamp, true_ms));
                    }
                }
            }
        }
    }
}
#[test]
fn peer_clocks_bound_the_time_a_message_was_on_its_way() {
    let clocks = PeerClocks::default();
    let now = Instant::now() + Duration::from_secs(3_600);
    // The peer's clock is 10 s ahead of ours; its messages take 3 ms, then 1 ms, then 40 ms.
    let ours = monotonic_ms(now);
    let peer = |ms: u64| PeerInstant { incarnation: 7, monotonic_ms: ours + 10_000 + ms };
    clocks.observe(2, peer(0), after(now, 3));
    clocks.observe(2, peer(10), after(now, 11));
    clocks.observe(2, peer(20), after(now, 60));
    let on_peer = clocks.on_peer_clock(2, after(now, 100)).expect("a reading");
    assert_eq!(on_peer.incarnation, 7);
    assert_eq!(on_peer.monotonic_ms, ours + 10_000 + 99, "early by the fastest message's delay, never late");
    assert!(clocks.on_peer_clock(3, now).is_none(), "no reading of a node never heard from");
    assert!(clocks.on_peer_clock(2, after(now, 60_000)).is_none(), "nor of one not heard from lately");
    // A restart: a new incarnation replaces every sample.
    clocks.observe(2, PeerInstant { incarnation: 8, monotonic_ms: 5 }, after(now, 200));
    assert_eq!(clocks.on_peer_clock(2, after(now, 200)).map(|at| (at.incarnation, at.monotonic_ms)), Some((8, 5)));
}

#[test]
fn old_samples_leave_the_bound() {
    let clocks = PeerClocks::default();
    let now = Instant::now() + Duration::from_secs(3_600);
    let ours = monotonic_ms(now) as i64;
    let at = |peer_ms: i64| PeerInstant { incarnation: 1, monotonic_ms: (ours + 1_000_000 + peer_ms) as u64 };
    // A fast sample, then the peer's clock drifts 20 ms back over two windows.
    clocks.observe(4, at(0), now);
    let window = PEER_SAMPLE_WINDOW.as_millis() as u64;
    clocks.observe(4, at(window as i64 - 10), after(now, window));
    clocks.observe(4, at(2 * window as i64 - 20), after(now, 2 * window));
    let on_peer = clocks.on_peer_clock(4, after(now, 2 * window)).unwrap();
    assert_eq!(
        on_peer.monotonic_ms as i64,
        ours + 1_000_000 + 2 * window as i64 - 10,
        "the window before still counts"
    );
    clocks.observe(4, at(3 * window as i64 - 30), after(now, 3 * window));
    let on_peer = clocks.on_peer_clock(4, after(now, 3 * window)).unwrap();
    assert_eq!(on_peer.monotonic_ms as i64, ours + 1_000_000 + 3 * window as i64 - 20);
}

#[test]
fn clock_headers_round_trip_and_refuse_garbage() {
    // Well after this process's origin, however early the test runs.
    let now = Instant::now() + Duration::from_secs(3_600);
    let value = header_value(now);
    assert_eq!(parse_header(&value), Some((incarnation(), monotonic_ms(now))));
    for bad in ["", ".", "1.", ".1", "x.1", "1.x", "1.2.3", "11111111111111111.1", "1.-2"] {
        assert_eq!(parse_header(bad), None, "{bad:?}");
    }
    let sent = PeerInstant { incarnation: incarnation(), monotonic_ms: monotonic_ms(now) };
    assert_eq!(elapsed_since(sent, after(now, 250)), Some(Duration::from_millis(250)));
    assert_eq!(elapsed_since(PeerInstant { incarnation: incarnation() ^ 2, ..sent }, now), None, "another process");
}
