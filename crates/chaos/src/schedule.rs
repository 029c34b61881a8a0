//! The fault schedule: which fault, on whom, when and for how long, derived from the seed alone
//! (pure: the same seed, node count, duration and fault list give the same schedule, so a run
//! can be replayed). Targets that depend on the cluster at the time ("the leader") are named
//! here as roles and resolved by the runner when the fault starts.
//!
//! One fault at a time, each followed by a quiet gap: the cluster is asked to survive any one
//! fault of the model and to heal between them, which is the promise MendFS makes (RF copies
//! survive RF-1 losses; Raft survives a minority). Overlapping faults would mostly test
//! quorum loss, where unavailability is the correct answer.

use serde::{Deserialize, Serialize};

/// A kind of fault, as named in `--faults`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL a node, restart it when the fault ends.
    Kill,
    /// SIGKILL the leader, restart it when the fault ends.
    KillLeader,
    /// SIGSTOP a node, SIGCONT it when the fault ends.
    Pause,
    /// SIGSTOP the leader.
    PauseLeader,
    /// Cut one node off from every other node (clients still reach it).
    Isolate,
    /// Cut the leader off from every other node.
    IsolateLeader,
    /// Split the nodes into a majority and a minority that holds the leader.
    MajorityMinority,
    /// Packets from one node to another are dropped, the other way they pass.
    OneWay,
    /// Two halves that cannot see each other, and one node that sees both.
    Bridge,
    /// A node loses a share of its packets to other nodes.
    Flaky,
    /// Flip bytes in some of a node's chunk files.
    CorruptChunks,
    /// Delete some of a node's chunk files.
    DeleteChunks,
    /// A node's chunk store behaves as if its disk were full.
    DiskFull,
    /// A node's chunk reads and writes are slow.
    SlowDisk,
    /// A node's wall clock jumps ahead or behind.
    ClockSkew,
    /// A spare storage node joins the cluster, or (when it is in) is drained and removed.
    Membership,
}

impl FaultKind {
    pub const ALL: [FaultKind; 16] = [
        FaultKind::Kill,
        FaultKind::KillLeader,
        FaultKind::Pause,
        FaultKind::PauseLeader,
        FaultKind::Isolate,
        FaultKind::IsolateLeader,
        FaultKind::MajorityMinority,
        FaultKind::OneWay,
        FaultKind::Bridge,
        FaultKind::Flaky,
        FaultKind::CorruptChunks,
        FaultKind::DeleteChunks,
        FaultKind::DiskFull,
        FaultKind::SlowDisk,
        FaultKind::ClockSkew,
        FaultKind::Membership,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::KillLeader => "kill-leader",
            FaultKind::Pause => "pause",
            FaultKind::PauseLeader => "pause-leader",
            FaultKind::Isolate => "isolate",
            FaultKind::IsolateLeader => "isolate-leader",
            FaultKind::MajorityMinority => "majority-minority",
            FaultKind::OneWay => "one-way",
            FaultKind::Bridge => "bridge",
            FaultKind::Flaky => "flaky",
            FaultKind::CorruptChunks => "corrupt-chunks",
            FaultKind::DeleteChunks => "delete-chunks",
            FaultKind::DiskFull => "disk-full",
            FaultKind::SlowDisk => "slow-disk",
            FaultKind::ClockSkew => "clock-skew",
            FaultKind::Membership => "membership",
        }
    }

    /// Faults that need each node in a network namespace of its own (root, nftables).
    pub fn needs_network_lab(self) -> bool {
        matches!(
            self,
            FaultKind::Isolate
                | FaultKind::IsolateLeader
                | FaultKind::MajorityMinority
                | FaultKind::OneWay
                | FaultKind::Bridge
                | FaultKind::Flaky
        )
    }

    /// Faults applied once and then left to the cluster to find and repair (no undo). A
    /// membership change is not undone either: it lasts as long as it takes.
    pub fn is_instant(self) -> bool {
        matches!(self, FaultKind::CorruptChunks | FaultKind::DeleteChunks | FaultKind::Membership)
    }

    /// Parses a `--faults` list: comma-separated names, `all`, or groups (`process`,
    /// `network`, `disk`, `clock`; `membership` is a name and a group of one).
    pub fn parse_list(list: &str) -> Result<Vec<FaultKind>, String> {
        let mut kinds = Vec::new();
        for name in list.split(',').map(str::trim).filter(|name| !name.is_empty()) {
            let group: Vec<FaultKind> = match name {
                "all" => FaultKind::ALL.to_vec(),
                "process" => vec![FaultKind::Kill, FaultKind::KillLeader, FaultKind::Pause, FaultKind::PauseLeader],
                "network" => FaultKind::ALL.iter().copied().filter(|k| k.needs_network_lab()).collect(),
                "disk" => {
                    vec![FaultKind::CorruptChunks, FaultKind::DeleteChunks, FaultKind::DiskFull, FaultKind::SlowDisk]
                }
                "clock" => vec![FaultKind::ClockSkew],
                other => match FaultKind::ALL.iter().find(|kind| kind.name() == other) {
                    Some(kind) => vec![*kind],
                    None => {
                        let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                        return Err(format!(
                            "unknown fault {other:?}: use all, process, network, disk, clock or any of {}",
                            names.join(", ")
                        ));
                    }
                },
            };
            for kind in group {
                if !kinds.contains(&kind) {
                    kinds.push(kind);
                }
            }
        }
        if kinds.is_empty() {
            return Err("no faults named".into());
        }
        kinds.sort();
        Ok(kinds)
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedFault {
    pub kind: FaultKind,
    /// When it starts, in milliseconds after the workloads started.
    pub at_ms: u64,
    /// How long it lasts (0 for instant faults).
    pub duration_ms: u64,
    /// A number the runner turns into the fault's particulars (which node when the role is
    /// "any node", how the nodes split, how many chunk files, the skew): drawn here so the
    /// whole run follows from the seed.
    pub pick: u64,
}

/// What a schedule is made from.
#[derive(Debug, Clone)]
pub struct ScheduleSpec {
    pub seed: u64,
    pub run_ms: u64,
    pub kinds: Vec<FaultKind>,
    /// Quiet time before the first fault, so the workloads have data to lose.
    pub warmup_ms: u64,
    pub fault_ms: (u64, u64),
    pub gap_ms: (u64, u64),
}

impl ScheduleSpec {
    pub fn new(seed: u64, run_ms: u64, kinds: Vec<FaultKind>) -> Self {
        Self { seed, run_ms, kinds, warmup_ms: 3_000, fault_ms: (2_000, 8_000), gap_ms: (1_000, 4_000) }
    }
}

/// The faults of a run, in time order, none overlapping, all over before `run_ms`.
pub fn plan(spec: &ScheduleSpec) -> Vec<PlannedFault> {
    let mut random = SplitMix64::new(spec.seed);
    let mut planned = Vec::new();
    if spec.kinds.is_empty() {
        return planned;
    }
    let mut at_ms = spec.warmup_ms;
    loop {
        let kind = spec.kinds[random.below(spec.kinds.len() as u64) as usize];
        let duration_ms = if kind.is_instant() { 0 } else { random.between(spec.fault_ms.0, spec.fault_ms.1) };
        let pick = random.next_u64();
        if at_ms + duration_ms >= spec.run_ms {
            break;
        }
        planned.push(PlannedFault { kind, at_ms, duration_ms, pick });
        at_ms += duration_ms + random.between(spec.gap_ms.0, spec.gap_ms.1);
    }
    planned
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny generator whose output depends on the seed
/// alone, whatever crate versions the build has, so a seed replays the same run.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; 0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Multiply-shift keeps the bias below 2^-64 per draw: plenty for a fault schedule.
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high.saturating_sub(low) + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fault_lists_parse_by_name_and_group_and_refuse_unknown_names() {
        assert_eq!(FaultKind::parse_list("kill,pause"), Ok(vec![FaultKind::Kill, FaultKind::Pause]));
        assert_eq!(FaultKind::parse_list("all").map(|k| k.len()), Ok(FaultKind::ALL.len()));
        assert_eq!(FaultKind::parse_list("network,isolate").map(|k| k.len()), Ok(6));
        assert!(FaultKind::parse_list("kill,explode").unwrap_err().contains("unknown fault \"explode\""));
        assert!(FaultKind::parse_list(" , ").is_err());
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let spec = |seed| ScheduleSpec::new(seed, 120_000, FaultKind::ALL.to_vec());
        assert_eq!(plan(&spec(7)), plan(&spec(7)));
        assert_ne!(plan(&spec(7)), plan(&spec(8)));
    }

    proptest! {
        #[test]
        fn faults_never_overlap_and_end_before_the_run_does(seed: u64, run_s in 1u64..600, n_kinds in 1usize..16) {
            let spec = ScheduleSpec::new(seed, run_s * 1000, FaultKind::ALL[..n_kinds].to_vec());
            let planned = plan(&spec);
            let mut free_from = spec.warmup_ms;
            for fault in &planned {
                prop_assert!(fault.at_ms >= free_from, "{fault:?} starts before {free_from}");
                prop_assert!(fault.at_ms + fault.duration_ms < spec.run_ms);
                prop_assert!(spec.kinds.contains(&fault.kind));
                prop_assert_eq!(fault.duration_ms == 0, fault.kind.is_instant());
                free_from = fault.at_ms + fault.duration_ms + spec.gap_ms.0;
            }
            // A 60 s run has room for several faults.
            if run_s >= 60 {
                prop_assert!(planned.len() >= 4, "{} faults in {run_s} s", planned.len());
            }
        }

        #[test]
        fn draws_stay_in_their_ranges(seed: u64, low in 0u64..1000, width in 0u64..1000) {
            let mut random = SplitMix64::new(seed);
            for _ in 0..100 {
                let drawn = random.between(low, low + width);
                prop_assert!((low..=low + width).contains(&drawn));
            }
        }
    }
}
