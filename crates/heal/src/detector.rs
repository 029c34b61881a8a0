//! Phi-accrual failure detection and node liveness (Hayashibara et al., as in Akka and
//! Cassandra), plus the health thresholds that mark a live node as degraded.
//!
//! Why phi instead of a fixed timeout: a fixed timeout is either too eager for a node on a
//! congested link or too slow for one on a quiet LAN. Phi measures how surprising the current
//! silence is given the rhythm this node has actually shown: it is `-log10` of the probability
//! that a heartbeat would still arrive this late if the inter-arrival times follow the normal
//! distribution fitted to the recent history. Phi 8 means "one chance in 10^8 that this is only
//! a late heartbeat", whatever the node's interval or jitter, so one threshold fits every node.
//!
//! Why an acceptable pause and a minimum standard deviation: heartbeats on a healthy cluster
//! are so regular that the fitted distribution becomes needle-thin, and a single GC pause, a
//! busy disk flush or a dropped packet would then look like a death. The acceptable pause is
//! added to the mean (the node may legitimately miss a few beats) and the standard deviation
//! is never taken below a floor, so detection stays a few seconds after the last beat instead
//! of collapsing onto the heartbeat interval.
//!
//! Why fresh windows give a grace period: the detector only knows arrivals it has seen itself.
//! A new leader starts a window per node at the moment it starts listening and treats that
//! moment as a virtual arrival seeded with the expected interval, so a node that never speaks is
//! suspected on roughly the same schedule as one that stopped, while a healthy node whose first
//! heartbeat to the new leader comes a couple of seconds late is never suspected: a leader change
//! cannot declare healthy nodes down. The gap between the virtual arrival and the first real one
//! is not a sample: it measures when we started listening, not the node's rhythm.
//!
//! Why outage-ending arrivals are not samples: the heartbeat that ends a suspicion measures the
//! length of the outage, not the rhythm. Recording it would inflate the mean and the deviation,
//! so every later failure of that node would be detected much more slowly, and a flapping node
//! would grow ever harder to detect.
//!
//! Everything here is pure: time is passed in as milliseconds on the caller's monotonic clock.

use std::collections::{BTreeMap, VecDeque};
use std::f64::consts::LN_10;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// What the cluster should believe about a node right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Liveness {
    /// Heartbeats arrive on rhythm and the last health report is fine.
    Up,
    /// The silence is improbable enough (phi at or above the threshold) to stop relying on it.
    Suspect,
    /// Suspect for longer than `down_after_ms`: its data should be repaired elsewhere.
    Down,
    /// Alive, but its disk is nearly full or it keeps reporting I/O errors.
    Degraded,
}

impl Liveness {
    /// The lowercase name used in status output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Up => "up",
            Liveness::Suspect => "suspect",
            Liveness::Down => "down",
            Liveness::Degraded => "degraded",
        }
    }
}

impl fmt::Display for Liveness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tuning of the phi-accrual detector; the defaults are Akka's cluster defaults for a 1 s
/// heartbeat interval.
#[derive(Debug, Clone, PartialEq)]
pub struct PhiConfig {
    /// Phi at or above which a node is suspected (8: one chance in 10^8 of a false suspicion
    /// under the fitted distribution).
    pub threshold: f64,
    /// Inter-arrival samples kept per node (at least 1; capped at 65 536 to keep the running
    /// sums exact).
    pub max_samples: usize,
    /// Floor of the standard deviation, in ms.
    pub min_std_dev_ms: f64,
    /// Added to the mean interval: silence the node may show without being suspected, in ms.
    pub acceptable_pause_ms: f64,
    /// The expected heartbeat interval, in ms. A fresh window is seeded, as in Akka, with two
    /// samples `estimate ± estimate / 4` so phi is meaningful before real samples arrive.
    pub first_interval_estimate_ms: f64,
}

impl Default for PhiConfig {
    fn default() -> Self {
        PhiConfig {
            threshold: 8.0,
            max_samples: 200,
            min_std_dev_ms: 100.0,
            acceptable_pause_ms: 3000.0,
            first_interval_estimate_ms: 1000.0,
        }
    }
}

/// Phi beyond this carries no extra meaning (it is reached tens of seconds into a silence);
/// capping keeps displays readable and every value finite.
const PHI_MAX: f64 = 1e6;
/// Keeps `y` finite when a configuration allows a zero standard deviation.
const STD_FLOOR_MS: f64 = 1e-3;
/// Intervals longer than this (about 35 years) are clamped, so squares and sums stay exact in
/// `u128`.
const MAX_INTERVAL_MS: u64 = 1 << 40;
/// With intervals below 2^40, `n * sum_sq` stays below 2^112 for this many samples.
const MAX_SAMPLES: usize = 1 << 16;

/// Inter-arrival statistics of one node's heartbeats: a ring buffer of intervals with a running
/// sum and sum of squares, so mean and deviation cost O(1) however long the history is.
///
/// The sums are integers (whole milliseconds) because a float running sum that adds and
/// subtracts forever drifts, and the drift would slowly bend every node's detection time.
#[derive(Debug, Clone)]
pub struct ArrivalWindow {
    intervals: VecDeque<u64>,
    capacity: usize,
    sum: u128,
    sum_sq: u128,
    last_arrival_ms: u64,
    /// False until the first real arrival: until then `last_arrival_ms` is the virtual one.
    heard: bool,
}

impl ArrivalWindow {
    /// A window seeded with the expected interval; `start_ms` acts as a virtual first arrival,
    /// so a node that never sends is suspected on the same schedule as one that stopped.
    pub fn new(config: &PhiConfig, start_ms: u64) -> Self {
        let capacity = config.max_samples.clamp(1, MAX_SAMPLES);
        let mut window = ArrivalWindow {
            intervals: VecDeque::with_capacity(capacity),
            capacity,
            sum: 0,
            sum_sq: 0,
            last_arrival_ms: start_ms,
            heard: false,
        };
        let estimate = config.first_interval_estimate_ms;
        let spread = estimate / 4.0;
        // `as` saturates (NaN and negatives become 0), which is all a nonsensical estimate deserves.
        window.push((estimate - spread).round() as u64);
        window.push((estimate + spread).round() as u64);
        window
    }

    /// One heartbeat arrival. The first arrival after `new` only replaces the virtual one (the
    /// gap says when we started listening, not how the node beats).
    pub fn record(&mut self, now_ms: u64) {
        if self.heard {
            self.push(now_ms.saturating_sub(self.last_arrival_ms));
        }
        self.arrive(now_ms);
    }

    /// An arrival that ends an outage: restarts the silence clock without taking the gap as a
    /// sample, because the gap measures the outage rather than the rhythm.
    pub fn resume(&mut self, now_ms: u64) {
        self.arrive(now_ms);
    }

    /// Suspicion level after the silence since the last arrival, using Akka's logistic
    /// approximation of the normal tail. Always finite, non-negative, non-decreasing in
    /// `now_ms`, and at most 1e6.
    pub fn phi(&self, config: &PhiConfig, now_ms: u64) -> f64 {
        let elapsed = now_ms.saturating_sub(self.last_arrival_ms) as f64;
        let mean = self.mean_ms() + config.acceptable_pause_ms;
        let std = self.std_dev_ms().max(config.min_std_dev_ms).max(STD_FLOOR_MS);
        let y = (elapsed - mean) / std;
        // Akka computes e = exp(-z) and phi = -log10(e / (1 + e)) (or the equal
        // -log10(1 - 1 / (1 + e)) below the mean). That equals log10(1 + exp(z)), evaluated
        // here as a softplus so neither branch can overflow exp or lose the tail to rounding.
        let z = y * (1.5976 + 0.070566 * y * y);
        let softplus = if z > 0.0 { z + (-z).exp().ln_1p() } else { z.exp().ln_1p() };
        let phi = softplus / LN_10;
        if phi.is_nan() {
            PHI_MAX
        } else {
            phi.clamp(0.0, PHI_MAX)
        }
    }

    /// The last arrival (real, or the virtual one at `start_ms`).
    pub fn last_arrival_ms(&self) -> u64 {
        self.last_arrival_ms
    }

    /// Mean inter-arrival time of the kept samples, in ms.
    pub fn mean_ms(&self) -> f64 {
        let n = self.intervals.len() as f64;
        if n == 0.0 {
            return 0.0;
        }
        self.sum as f64 / n
    }

    /// Population standard deviation of the kept samples, in ms (before the configured floor).
    pub fn std_dev_ms(&self) -> f64 {
        let n = self.intervals.len() as u128;
        if n == 0 {
            return 0.0;
        }
        // Exact in integers: no cancellation between two large, nearly equal floats.
        let scaled_variance = (n * self.sum_sq).saturating_sub(self.sum * self.sum);
        (scaled_variance as f64).sqrt() / n as f64
    }

    fn arrive(&mut self, now_ms: u64) {
        self.heard = true;
        self.last_arrival_ms = self.last_arrival_ms.max(now_ms);
    }

    fn push(&mut self, interval_ms: u64) {
        let interval = interval_ms.min(MAX_INTERVAL_MS);
        if self.intervals.len() >= self.capacity {
            if let Some(old) = self.intervals.pop_front() {
                self.sum -= u128::from(old);
                self.sum_sq -= u128::from(old) * u128::from(old);
            }
        }
        self.intervals.push_back(interval);
        self.sum += u128::from(interval);
        self.sum_sq += u128::from(interval) * u128::from(interval);
    }
}

/// What a node says about itself in each heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthReport {
    pub disk_used_bytes: u64,
    /// 0 = unknown (never degraded for disk).
    pub disk_capacity_bytes: u64,
    /// Cumulative since the reporter started; may reset to a lower value after a restart.
    pub io_errors: u64,
}

/// Tuning of liveness on top of phi.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorConfig {
    pub phi: PhiConfig,
    /// Suspect for longer than this, in ms -> down.
    pub down_after_ms: u64,
    /// `used / capacity >= this` -> degraded.
    pub disk_full_ratio: f64,
    /// At least this many new I/O errors (and at least one)...
    pub io_error_rise: u64,
    /// ...within this window, in ms -> degraded, until the window passes with fewer.
    pub io_error_window_ms: u64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            phi: PhiConfig::default(),
            down_after_ms: 10_000,
            disk_full_ratio: 0.90,
            io_error_rise: 5,
            io_error_window_ms: 60_000,
        }
    }
}

/// One node's liveness at one instant, with the evidence behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    pub node: NodeId,
    pub liveness: Liveness,
    pub phi: f64,
    /// None: no heartbeat since tracking began.
    pub last_heartbeat_age_ms: Option<u64>,
    /// Short human reason, e.g. "phi 9.3 >= 8", "suspect for 10.2 s", "disk 93% full",
    /// "7 I/O errors in 60 s"; empty for up.
    pub reason: String,
}

/// Recent rises of a node's cumulative I/O error counter.
#[derive(Debug, Clone, Default)]
struct IoErrors {
    /// Last counter value seen; None before the first report, whose errors predate tracking.
    baseline: Option<u64>,
    /// (arrival time, new errors), oldest first.
    rises: VecDeque<(u64, u64)>,
    total: u64,
}

impl IoErrors {
    fn report(&mut self, now_ms: u64, count: u64, window_ms: u64) {
        if let Some(prev) = self.baseline {
            // A lower value is a restarted reporter, not new errors: rebase on it.
            if count > prev {
                self.rises.push_back((now_ms, count - prev));
                self.total = self.total.saturating_add(count - prev);
            }
        }
        self.baseline = Some(count);
        self.prune(now_ms, window_ms);
    }

    fn prune(&mut self, now_ms: u64, window_ms: u64) {
        while let Some(&(at, n)) = self.rises.front() {
            if now_ms.saturating_sub(at) < window_ms {
                break;
            }
            self.rises.pop_front();
            self.total -= n;
        }
    }

    /// New errors within the window ending at `now_ms`, without pruning.
    fn recent(&self, now_ms: u64, window_ms: u64) -> u64 {
        let expired: u64 =
            self.rises.iter().take_while(|&&(at, _)| now_ms.saturating_sub(at) >= window_ms).map(|&(_, n)| n).sum();
        self.total - expired
    }
}

#[derive(Debug, Clone)]
struct NodeState {
    window: ArrivalWindow,
    /// When evaluation first saw phi at or above the threshold; cleared only by a heartbeat.
    suspect_since: Option<u64>,
    health: HealthReport,
    io: IoErrors,
}

impl NodeState {
    fn new(config: &DetectorConfig, now_ms: u64) -> Self {
        NodeState {
            window: ArrivalWindow::new(&config.phi, now_ms),
            suspect_since: None,
            health: HealthReport::default(),
            io: IoErrors::default(),
        }
    }

    fn assess(&self, config: &DetectorConfig, node: NodeId, now_ms: u64, phi: f64) -> Assessment {
        let threshold = config.phi.threshold;
        let suspect_since = self.suspect_since.or((phi >= threshold).then_some(now_ms));
        let (liveness, reason) = match suspect_since {
            Some(since) => {
                let suspect_for = now_ms.saturating_sub(since);
                if suspect_for > config.down_after_ms {
                    (Liveness::Down, format!("suspect for {:.1} s", suspect_for as f64 / 1000.0))
                } else if phi >= threshold {
                    (Liveness::Suspect, format!("phi {phi:.1} >= {threshold}"))
                } else {
                    // Only reachable if the caller's clock stepped back; suspicion waits for a heartbeat.
                    (Liveness::Suspect, "awaiting heartbeat".to_string())
                }
            }
            None => self.health_verdict(config, now_ms),
        };
        Assessment {
            node,
            liveness,
            phi,
            last_heartbeat_age_ms: self.window.heard.then(|| now_ms.saturating_sub(self.window.last_arrival_ms)),
            reason,
        }
    }

    fn health_verdict(&self, config: &DetectorConfig, now_ms: u64) -> (Liveness, String) {
        let mut reasons = Vec::new();
        let used = self.health.disk_used_bytes;
        let capacity = self.health.disk_capacity_bytes;
        if capacity > 0 && used as f64 / capacity as f64 >= config.disk_full_ratio {
            let percent = u128::from(used) * 100 / u128::from(capacity);
            reasons.push(format!("disk {percent}% full"));
        }
        let recent = self.io.recent(now_ms, config.io_error_window_ms);
        if recent > 0 && recent >= config.io_error_rise {
            reasons.push(format!("{recent} I/O errors in {}", format_secs(config.io_error_window_ms)));
        }
        if reasons.is_empty() {
            (Liveness::Up, String::new())
        } else {
            (Liveness::Degraded, reasons.join(", "))
        }
    }
}

fn format_secs(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// Liveness of every node the leader expects heartbeats from.
#[derive(Debug, Clone)]
pub struct Detector {
    config: DetectorConfig,
    /// Ordered so evaluation output comes out sorted by id without a sort per call.
    nodes: BTreeMap<NodeId, NodeState>,
}

impl Detector {
    pub fn new(config: DetectorConfig) -> Self {
        Detector { config, nodes: BTreeMap::new() }
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Start tracking a node expected to send heartbeats (no-op if tracked). A fresh window
    /// starting at `now_ms`: this is the grace period a new leader gives every node, so a leader
    /// change never declares healthy nodes down.
    pub fn watch(&mut self, node: NodeId, now_ms: u64) {
        let config = &self.config;
        self.nodes.entry(node).or_insert_with(|| NodeState::new(config, now_ms));
    }

    pub fn forget(&mut self, node: NodeId) {
        self.nodes.remove(&node);
    }

    /// Tracked nodes, in id order.
    pub fn tracked(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.keys().copied()
    }

    /// A heartbeat arrived (tracks the node if new). An arrival that ends a suspicion (the node
    /// was Suspect or Down, or phi at arrival >= threshold) is not added to the inter-arrival
    /// window: it measures the outage, not the rhythm, and would otherwise inflate the mean and
    /// slow every later detection.
    pub fn heartbeat(&mut self, node: NodeId, now_ms: u64, health: &HealthReport) {
        let config = &self.config;
        let state = self.nodes.entry(node).or_insert_with(|| NodeState::new(config, now_ms));
        let ends_outage =
            state.suspect_since.is_some() || state.window.phi(&config.phi, now_ms) >= config.phi.threshold;
        if ends_outage {
            state.window.resume(now_ms);
        } else {
            state.window.record(now_ms);
        }
        state.suspect_since = None;
        state.io.report(now_ms, health.io_errors, config.io_error_window_ms);
        state.health.clone_from(health);
    }

    /// Current liveness of every tracked node, sorted by node id; updates the internal
    /// suspect-since clocks.
    ///
    /// Phi >= threshold -> Suspect (remembering since when); Suspect for more than
    /// `down_after_ms` -> Down, which lasts until a heartbeat arrives (then Up or Degraded at
    /// once). Below the threshold: Degraded if the last health report crosses the disk or
    /// I/O-error thresholds, else Up. Suspicion and Down outrank Degraded.
    pub fn evaluate(&mut self, now_ms: u64) -> Vec<Assessment> {
        let config = &self.config;
        let mut out = Vec::with_capacity(self.nodes.len());
        for (&node, state) in &mut self.nodes {
            let phi = state.window.phi(&config.phi, now_ms);
            if phi >= config.phi.threshold && state.suspect_since.is_none() {
                state.suspect_since = Some(now_ms);
            }
            state.io.prune(now_ms, config.io_error_window_ms);
            out.push(state.assess(config, node, now_ms, phi));
        }
        out
    }

    /// Read-only view for status displays: what `evaluate` would say, without updating any
    /// state (a suspicion not yet seen by `evaluate` counts as starting now).
    pub fn assessment(&self, node: NodeId, now_ms: u64) -> Option<Assessment> {
        let state = self.nodes.get(&node)?;
        let phi = state.window.phi(&self.config.phi, now_ms);
        Some(state.assess(&self.config, node, now_ms, phi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const N: NodeId = 7;

    fn ok() -> HealthReport {
        HealthReport::default()
    }

    fn liveness_at(d: &mut Detector, node: NodeId, now: u64) -> Liveness {
        let all = d.evaluate(now);
        match all.iter().find(|a| a.node == node) {
            Some(a) => a.liveness,
            None => panic!("node {node} not tracked"),
        }
    }

    fn assess(d: &Detector, node: NodeId, now: u64) -> Assessment {
        match d.assessment(node, now) {
            Some(a) => a,
            None => panic!("node {node} not tracked"),
        }
    }

    /// Deterministic jitter in [-50, 50] ms.
    fn jitter(i: u64) -> i64 {
        ((i * 37 + 11) % 101) as i64 - 50
    }

    /// Watches `N` at 0 and sends exact 1 s beats at 1000, 2000, ..., `beats * 1000`.
    fn steady(beats: u64) -> Detector {
        steady_with(beats, &ok(), Liveness::Up)
    }

    fn steady_with(beats: u64, health: &HealthReport, expect: Liveness) -> Detector {
        let mut d = Detector::new(DetectorConfig::default());
        d.watch(N, 0);
        for i in 1..=beats {
            d.heartbeat(N, i * 1000, health);
            assert_eq!(liveness_at(&mut d, N, i * 1000), expect);
        }
        d
    }

    /// Evaluates every millisecond from `from` to `to` and returns the first time the node is
    /// not Up, asserting it is never Down before that.
    fn first_suspect(d: &mut Detector, from: u64, to: u64) -> Option<u64> {
        for t in from..=to {
            match liveness_at(d, N, t) {
                Liveness::Up => {}
                Liveness::Suspect => return Some(t),
                other => panic!("{other} at {t} before any suspicion"),
            }
        }
        None
    }

    fn window(d: &Detector) -> &ArrivalWindow {
        match d.nodes.get(&N) {
            Some(s) => &s.window,
            None => panic!("not tracked"),
        }
    }

    #[test]
    fn defaults_and_names() {
        let c = DetectorConfig::default();
        assert_eq!(c.phi.threshold, 8.0);
        assert_eq!(c.phi.max_samples, 200);
        assert_eq!(c.phi.min_std_dev_ms, 100.0);
        assert_eq!(c.phi.acceptable_pause_ms, 3000.0);
        assert_eq!(c.phi.first_interval_estimate_ms, 1000.0);
        assert_eq!(c.down_after_ms, 10_000);
        assert_eq!(c.disk_full_ratio, 0.90);
        assert_eq!(c.io_error_rise, 5);
        assert_eq!(c.io_error_window_ms, 60_000);
        let names: Vec<String> = [Liveness::Up, Liveness::Suspect, Liveness::Down, Liveness::Degraded]
            .iter()
            .map(|l| l.to_string())
            .collect();
        assert_eq!(names, ["up", "suspect", "down", "degraded"]);
        assert_eq!(Liveness::Degraded.as_str(), "degraded");
    }

    #[test]
    fn window_bootstrap_and_statistics() {
        let config = PhiConfig::default();
        let mut w = ArrivalWindow::new(&config, 500);
        assert_eq!(w.last_arrival_ms(), 500);
        assert_eq!(w.mean_ms(), 1000.0);
        assert_eq!(w.std_dev_ms(), 250.0);
        // The first real arrival replaces the virtual one and adds no sample.
        w.record(2000);
        assert_eq!((w.intervals.len(), w.last_arrival_ms()), (2, 2000));
        w.record(3000);
        w.record(4000);
        assert_eq!(w.intervals, [750, 1250, 1000, 1000]);
        assert_eq!(w.mean_ms(), 1000.0);
        assert!((w.std_dev_ms() - (125_000.0f64 / 4.0).sqrt()).abs() < 1e-9);
        w.resume(9000);
        assert_eq!((w.intervals.len(), w.last_arrival_ms()), (4, 9000));

        // The ring buffer evicts the oldest samples and keeps the sums exact.
        let small = PhiConfig { max_samples: 3, ..PhiConfig::default() };
        let mut w = ArrivalWindow::new(&small, 0);
        for t in [0, 100, 300, 600, 1000] {
            w.record(t);
        }
        assert_eq!(w.intervals, [200, 300, 400]);
        assert_eq!(w.mean_ms(), 300.0);
        assert!((w.std_dev_ms() - (20_000.0f64 / 3.0).sqrt()).abs() < 1e-9);
    }

    #[test]
    fn phi_matches_akka_formula() {
        let config = PhiConfig::default();
        let w = ArrivalWindow::new(&config, 0);
        // mean' = 1000 + 3000, std = 250.
        for elapsed in [0u64, 1000, 3999, 4000, 4001, 4500, 5000, 5300, 6000] {
            let y = (elapsed as f64 - 4000.0) / 250.0;
            let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
            let akka =
                if elapsed as f64 > 4000.0 { -(e / (1.0 + e)).log10() } else { -(1.0 - 1.0 / (1.0 + e)).log10() };
            let phi = w.phi(&config, elapsed);
            assert!((phi - akka).abs() < 1e-9 * akka.max(1.0), "elapsed {elapsed}: {phi} vs {akka}");
        }
        assert!((w.phi(&config, 4000) - 2f64.log10()).abs() < 1e-12);
    }

    #[test]
    fn steady_jittered_beats_stay_up() {
        let mut d = Detector::new(DetectorConfig::default());
        d.watch(N, 0);
        let beats: Vec<u64> = (1..=100).map(|i| (1000 * i as i64 + jitter(i)) as u64).collect();
        for (k, &at) in beats.iter().enumerate() {
            d.heartbeat(N, at, &ok());
            let a = assess(&d, N, at);
            assert!(a.phi < 1.0, "phi {} right after beat {k}", a.phi);
            assert_eq!(a.last_heartbeat_age_ms, Some(0));
            let next = beats.get(k + 1).copied().unwrap_or(at + 1000);
            let mut t = at;
            while t < next {
                let a = &d.evaluate(t)[0];
                assert_eq!(a.liveness, Liveness::Up, "at {t}");
                assert!(a.phi < 1.0, "phi {} at {t}", a.phi);
                assert_eq!(a.reason, "");
                t += 10;
            }
        }
        let w = window(&d);
        assert!((w.mean_ms() - 1000.0).abs() < 5.0, "mean {}", w.mean_ms());
        assert!(w.std_dev_ms() < 100.0);
    }

    #[test]
    fn stopped_node_is_suspected_then_down() {
        let full = HealthReport { disk_used_bytes: 99, disk_capacity_bytes: 100, io_errors: 0 };
        let mut d = steady_with(100, &full, Liveness::Degraded);
        let last = 100_000;
        // Phi reaches 8 at y = 5.2337 with std at the 100 ms floor: 1000 + 3000 + 523.4 ms.
        let mut suspect = None;
        for t in last..last + 10_000 {
            let a = d.evaluate(t).remove(0);
            if a.liveness != Liveness::Degraded {
                assert_eq!(a.liveness, Liveness::Suspect, "at {t}");
                suspect = Some(t);
                break;
            }
        }
        let Some(s) = suspect else { panic!("never suspected") };
        assert!(s - last >= 3000 && s - last < 5000, "suspected after {} ms", s - last);
        assert_eq!(s - last, 4523);
        let a = assess(&d, N, s);
        assert_eq!(a.liveness, Liveness::Suspect);
        assert!(a.phi >= 8.0 && a.phi < 8.1, "phi {}", a.phi);
        assert_eq!(a.reason, format!("phi {:.1} >= 8", a.phi));
        assert!(assess(&d, N, s - 1).phi < 8.0);
        // Suspicion outranks the full disk; Down only once suspect for strictly more than down_after.
        for t in s..=s + 10_000 {
            assert_eq!(liveness_at(&mut d, N, t), Liveness::Suspect, "at {t}");
        }
        let a = &d.evaluate(s + 10_001)[0];
        assert_eq!(a.liveness, Liveness::Down);
        assert_eq!(a.reason, "suspect for 10.0 s");
        assert_eq!(a.last_heartbeat_age_ms, Some(s + 10_001 - last));
        assert_eq!(d.evaluate(s + 10_200)[0].reason, "suspect for 10.2 s");
    }

    #[test]
    fn pause_shorter_than_down_after_recovers_without_inflating_window() {
        let mut d = steady(100);
        let last = 100_000;
        let Some(s0) = first_suspect(&mut d, last, last + 10_000) else { panic!("never suspected") };
        let before = (window(&d).mean_ms(), window(&d).std_dev_ms(), window(&d).intervals.len());
        // Suspected for about 3.5 s, well under down_after: never Down.
        let resume = last + 8000;
        for t in s0..resume {
            assert_eq!(liveness_at(&mut d, N, t), Liveness::Suspect, "at {t}");
        }
        d.heartbeat(N, resume, &ok());
        let a = &d.evaluate(resume)[0];
        assert_eq!((a.liveness, a.last_heartbeat_age_ms), (Liveness::Up, Some(0)));
        assert_eq!((window(&d).mean_ms(), window(&d).std_dev_ms(), window(&d).intervals.len()), before);
        for i in 1..=10 {
            d.heartbeat(N, resume + i * 1000, &ok());
        }
        let last1 = resume + 10_000;
        let Some(s1) = first_suspect(&mut d, last1, last1 + 10_000) else { panic!("never suspected again") };
        let (d0, d1) = (s0 - last, s1 - last1);
        assert!(d0.abs_diff(d1) <= 10, "detection took {d0} ms before the pause, {d1} ms after");
        assert_eq!(window(&d).mean_ms(), 1000.0);
    }

    #[test]
    fn outage_arrival_is_excluded_even_without_evaluation() {
        let mut d = steady(50);
        let len = window(&d).intervals.len();
        // Nobody evaluated during the silence, but phi at arrival is far above the threshold.
        d.heartbeat(N, 50_000 + 20_000, &ok());
        assert_eq!(window(&d).intervals.len(), len);
        assert_eq!(window(&d).mean_ms(), 1000.0);
        // An ordinary late-ish beat (phi < threshold) is a sample.
        d.heartbeat(N, 70_000 + 2000, &ok());
        assert_eq!(window(&d).intervals.len(), len + 1);
        assert_eq!(*window(&d).intervals.back().unwrap_or(&0), 2000);
    }

    #[test]
    fn never_heard_node_gets_a_grace_period() {
        let t0 = 50_000;
        let mut d = Detector::new(DetectorConfig::default());
        d.watch(N, t0);
        let a = &d.evaluate(t0)[0];
        assert_eq!((a.liveness, a.last_heartbeat_age_ms), (Liveness::Up, None));
        // Seeded window: mean 1000, std 250 (Akka's bootstrap), so phi reaches 8 at
        // 4000 + 5.2337 * 250 ms, i.e. 5.31 s (phi at 5 s is only 4.7).
        let Some(s) = first_suspect(&mut d, t0, t0 + 10_000) else { panic!("never suspected") };
        assert!(s >= t0 + 3000);
        assert_eq!(s - t0, 5307);
        assert!((assess(&d, N, t0 + 5000).phi - 4.74).abs() < 0.01);
        assert_eq!(assess(&d, N, s).last_heartbeat_age_ms, None);
        assert_eq!(liveness_at(&mut d, N, s + 10_000), Liveness::Suspect);
        assert_eq!(liveness_at(&mut d, N, s + 10_001), Liveness::Down);

        // A healthy node after a leader change: first beat 2.5 s in, then every second.
        let mut d = Detector::new(DetectorConfig::default());
        d.watch(N, t0);
        let mut next = t0 + 2500;
        for t in (t0..t0 + 40_000).step_by(10) {
            if t == next {
                d.heartbeat(N, t, &ok());
                next += 1000;
            }
            let a = &d.evaluate(t)[0];
            assert_eq!(a.liveness, Liveness::Up, "at {t}");
            assert!(a.phi < 1.0, "phi {} at {t}", a.phi);
        }
    }

    #[test]
    fn degraded_on_full_disk() {
        let mut d = steady(5);
        let disk = |used, capacity| HealthReport { disk_used_bytes: used, disk_capacity_bytes: capacity, io_errors: 0 };
        let mut t = 5000;
        let mut step = |d: &mut Detector, report: HealthReport| {
            t += 1000;
            d.heartbeat(N, t, &report);
            d.evaluate(t).remove(0)
        };
        let a = step(&mut d, disk(90, 100));
        assert_eq!((a.liveness, a.reason.as_str()), (Liveness::Degraded, "disk 90% full"));
        let a = step(&mut d, disk(93_999, 100_000));
        assert_eq!((a.liveness, a.reason.as_str()), (Liveness::Degraded, "disk 93% full"));
        let a = step(&mut d, disk(899, 1000));
        assert_eq!((a.liveness, a.reason.as_str()), (Liveness::Up, ""));
        let a = step(&mut d, disk(u64::MAX, 0));
        assert_eq!(a.liveness, Liveness::Up);
        let a = step(&mut d, disk(u64::MAX, u64::MAX));
        assert_eq!((a.liveness, a.reason.as_str()), (Liveness::Degraded, "disk 100% full"));
        let a = step(&mut d, disk(10, 100));
        assert_eq!(a.liveness, Liveness::Up);
    }

    #[test]
    fn degraded_on_io_error_rise_until_the_window_passes() {
        let mut d = Detector::new(DetectorConfig::default());
        d.watch(N, 0);
        let io = |n| HealthReport { io_errors: n, ..HealthReport::default() };
        let mut counter = 10; // errors from before tracking began are not a rise
        let mut seen = BTreeMap::new();
        for i in 1..=80u64 {
            let t = i * 1000;
            seen.insert(t - 1, d.evaluate(t - 1).remove(0));
            counter = match i {
                5 => 14, // +4
                6 => 15, // +1: five within the window
                70 => 2, // reporter restarted: a lower value, not a rise
                71 => 5, // +3
                72 => 6, // +1
                73 => 7, // +1: five since the restart
                _ => counter,
            };
            d.heartbeat(N, t, &io(counter));
            seen.insert(t, d.evaluate(t).remove(0));
        }
        let at = |t: u64| match seen.get(&t) {
            Some(a) => (a.liveness, a.reason.clone()),
            None => panic!("no evaluation at {t}"),
        };
        let up = (Liveness::Up, String::new());
        let degraded = (Liveness::Degraded, "5 I/O errors in 60 s".to_string());
        for t in [1000, 4000, 5000, 5999] {
            assert_eq!(at(t), up, "at {t}");
        }
        // Degraded from the fifth new error until 60 s after the first four.
        for t in [6000, 30_000, 64_000, 64_999] {
            assert_eq!(at(t), degraded, "at {t}");
        }
        for t in [65_000, 66_000, 69_000, 70_000, 71_000, 72_000, 72_999] {
            assert_eq!(at(t), up, "at {t}");
        }
        assert_eq!(at(73_000), degraded);
        assert_eq!(at(80_000), degraded);
    }

    #[test]
    fn io_window_boundary_is_exact() {
        let mut d = Detector::new(DetectorConfig::default());
        d.watch(N, 0);
        let io = |n| HealthReport { io_errors: n, ..HealthReport::default() };
        d.heartbeat(N, 1000, &io(0));
        d.heartbeat(N, 2000, &io(5));
        for i in 3..=61 {
            d.heartbeat(N, i * 1000, &io(5));
        }
        // The read-only view and evaluate agree on the boundary.
        assert_eq!(assess(&d, N, 61_999).liveness, Liveness::Degraded);
        assert_eq!(assess(&d, N, 62_000).liveness, Liveness::Up);
        assert_eq!(liveness_at(&mut d, N, 61_999), Liveness::Degraded);
        assert_eq!(assess(&d, N, 61_999).reason, "5 I/O errors in 60 s");
        assert_eq!(liveness_at(&mut d, N, 62_000), Liveness::Up);
        d.heartbeat(N, 62_000, &io(5));
        assert_eq!(liveness_at(&mut d, N, 62_000), Liveness::Up);
        // Both disk and I/O at once.
        let both = HealthReport { disk_used_bytes: 95, disk_capacity_bytes: 100, io_errors: 12 };
        d.heartbeat(N, 63_000, &both);
        let a = d.evaluate(63_000).remove(0);
        assert_eq!((a.liveness, a.reason.as_str()), (Liveness::Degraded, "disk 95% full, 7 I/O errors in 60 s"));
    }

    #[test]
    fn down_stays_down_until_a_heartbeat() {
        let mut d = steady(20);
        let last = 20_000;
        let Some(s) = first_suspect(&mut d, last, last + 10_000) else { panic!("never suspected") };
        assert_eq!(liveness_at(&mut d, N, s + 10_001), Liveness::Down);
        let ten_days = 10 * 24 * 3600 * 1000;
        for t in [s + 20_000, s + 3_600_000, last + ten_days] {
            let a = &d.evaluate(t)[0];
            assert_eq!(a.liveness, Liveness::Down, "at {t}");
            assert!(a.phi.is_finite() && a.phi >= 8.0);
        }
        let back = last + ten_days + 1;
        d.heartbeat(N, back, &ok());
        let a = &d.evaluate(back)[0];
        assert_eq!((a.liveness, a.last_heartbeat_age_ms, a.reason.as_str()), (Liveness::Up, Some(0), ""));
        assert!(a.phi < 1.0);
        assert_eq!(window(&d).mean_ms(), 1000.0);
    }

    #[test]
    fn watch_is_a_no_op_for_tracked_nodes() {
        let mut d = steady(10);
        d.watch(N, 50_000);
        assert_eq!(window(&d).last_arrival_ms(), 10_000);
        assert_eq!(assess(&d, N, 50_000).liveness, Liveness::Suspect);
    }

    #[test]
    fn forget_and_sorted_output() {
        let mut d = Detector::new(DetectorConfig::default());
        d.heartbeat(9, 0, &ok());
        d.watch(2, 0);
        d.heartbeat(7, 0, &ok());
        d.watch(2, 0);
        let ids: Vec<NodeId> = d.evaluate(100).iter().map(|a| a.node).collect();
        assert_eq!(ids, [2, 7, 9]);
        assert_eq!(d.tracked().collect::<Vec<_>>(), [2, 7, 9]);
        let heard: Vec<Option<u64>> = d.evaluate(100).iter().map(|a| a.last_heartbeat_age_ms).collect();
        assert_eq!(heard, [None, Some(100), Some(100)]);
        d.forget(7);
        d.forget(42);
        assert_eq!(d.evaluate(200).iter().map(|a| a.node).collect::<Vec<_>>(), [2, 9]);
        assert_eq!(d.tracked().collect::<Vec<_>>(), [2, 9]);
        assert_eq!(d.assessment(7, 200), None);
        d.heartbeat(7, 300, &ok());
        assert_eq!(d.tracked().collect::<Vec<_>>(), [2, 7, 9]);
    }

    #[test]
    fn read_only_assessment_does_not_start_suspicion() {
        let mut d = steady(10);
        let last = 10_000;
        // Viewed only: a suspicion seen for the first time counts as starting now.
        let late = last + 30_000;
        assert_eq!(assess(&d, N, late).liveness, Liveness::Suspect);
        assert_eq!(assess(&d, N, late).liveness, Liveness::Suspect);
        // evaluate records it; Down comes down_after later.
        assert_eq!(liveness_at(&mut d, N, late), Liveness::Suspect);
        assert_eq!(assess(&d, N, late + 10_000).liveness, Liveness::Suspect);
        assert_eq!(assess(&d, N, late + 10_001).liveness, Liveness::Down);
    }

    #[test]
    fn phi_huge_elapsed_is_finite() {
        let config = PhiConfig::default();
        let mut w = ArrivalWindow::new(&config, 0);
        for i in 1..=50 {
            w.record(i * 1000);
        }
        let ten_days = 10 * 24 * 3600 * 1000;
        for now in [50_000 + ten_days, u64::MAX] {
            let phi = w.phi(&config, now);
            assert!(phi.is_finite() && (8.0..=PHI_MAX).contains(&phi), "phi {phi}");
        }
        assert_eq!(w.phi(&config, u64::MAX), PHI_MAX);
        // Zero deviation allowed by config: still finite.
        let flat = PhiConfig { min_std_dev_ms: 0.0, acceptable_pause_ms: 0.0, max_samples: 10, ..PhiConfig::default() };
        let mut w = ArrivalWindow::new(&flat, 0);
        for i in 1..=20 {
            w.record(i * 1000);
        }
        assert_eq!(w.std_dev_ms(), 0.0);
        for now in [20_000, 21_000, 21_001, u64::MAX] {
            let phi = w.phi(&flat, now);
            assert!(phi.is_finite() && phi >= 0.0, "phi {phi} at {now}");
        }
    }

    proptest! {
        #[test]
        fn phi_is_finite_non_negative_and_monotonic(
            intervals in proptest::collection::vec(0u64..200_000, 0..60),
            min_std in prop_oneof![Just(0.0f64), 0.0f64..1000.0],
            pause in 0.0f64..10_000.0,
            estimate in 0.0f64..5000.0,
            max_samples in 0usize..300,
            start in 0u64..1_000_000,
            a in prop_oneof![0u64..100_000, any::<u64>()],
            b in prop_oneof![0u64..100_000, any::<u64>()],
        ) {
            let config = PhiConfig {
                threshold: 8.0,
                max_samples,
                min_std_dev_ms: min_std,
                acceptable_pause_ms: pause,
                first_interval_estimate_ms: estimate,
            };
            let mut w = ArrivalWindow::new(&config, start);
            let mut t = start;
            for i in intervals {
                t += i;
                w.record(t);
            }
            let (lo, hi) = (a.min(b), a.max(b));
            let p_lo = w.phi(&config, t.saturating_add(lo));
            let p_hi = w.phi(&config, t.saturating_add(hi));
            prop_assert!(p_lo.is_finite() && p_lo >= 0.0, "phi {}", p_lo);
            prop_assert!(p_hi.is_finite() && p_hi >= 0.0, "phi {}", p_hi);
            prop_assert!(p_lo <= p_hi, "phi {} at +{} > phi {} at +{}", p_lo, lo, p_hi, hi);
            prop_assert!(w.mean_ms().is_finite() && w.std_dev_ms().is_finite());
        }
    }
}
