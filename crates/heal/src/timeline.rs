//! What the leader's healer saw happen, as events: node 2 suspect at …, down at …, repair job
//! 3 started …, full redundancy at …. The leader commits them through Raft, so every node
//! holds the same bounded timeline (`cluster status` carries it, the dashboard draws it) and a
//! new leader continues it instead of starting over.
//!
//! Pure: the healer feeds it what each detector tick produced (the nodes' liveness, the
//! committed repair job, the latest scan) with the wall-clock time, and the timeline turns
//! the differences from the previous tick into pending events for the healer to commit. A new
//! term starts from the committed timeline (each node's last state, whether redundancy was
//! full) and the committed job, so a new leader records only what changed since its
//! predecessor's last event, not the whole state again.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::detector::Liveness;
use crate::repair::{RepairJob, ScanSummary};
use crate::NodeId;

/// Events kept in the committed timeline (and pending at most); the oldest go first. A few
/// hundred cover hours of an eventful cluster and keep the status reply small.
pub const TIMELINE_EVENTS_MAX: usize = 256;

/// Stored in the metadata with postcard, by position: append new kinds at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A node's liveness changed (`state` in the event).
    NodeState(Liveness),
    RepairStarted,
    RepairFinished,
    /// Some chunks have fewer copies than the replication factor, or none readable.
    RedundancyLost,
    /// Every chunk has its copies again.
    RedundancyRestored,
    /// This node started leading (and listening to heartbeats).
    Leading,
}

impl EventKind {
    /// The name the status reply and the dashboard use.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::NodeState(_) => "node_state",
            EventKind::RepairStarted => "repair_started",
            EventKind::RepairFinished => "repair_finished",
            EventKind::RedundancyLost => "redundancy_lost",
            EventKind::RedundancyRestored => "redundancy_restored",
            EventKind::Leading => "leader",
        }
    }
}

/// Stored in the metadata with postcard, by position: append new fields at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEvent {
    pub unix_ms: u64,
    pub kind: EventKind,
    pub node: Option<NodeId>,
    /// A sentence for people.
    pub detail: String,
}

/// One node's liveness as a detector tick saw it.
pub struct NodeObservation<'a> {
    pub node: NodeId,
    pub liveness: Liveness,
    pub phi: f64,
    pub reason: &'a str,
}

/// Appends `new` to the committed timeline `ring`, dropping the oldest beyond the bound.
pub fn append_events(ring: &mut Vec<ClusterEvent>, new: impl IntoIterator<Item = ClusterEvent>) {
    ring.extend(new);
    if ring.len() > TIMELINE_EVENTS_MAX {
        ring.drain(..ring.len() - TIMELINE_EVENTS_MAX);
    }
}

#[derive(Debug, Default)]
pub struct Timeline {
    /// Observed, not yet handed to the healer to commit.
    pending: VecDeque<ClusterEvent>,
    /// What the previous tick of the current term saw; cleared when a term starts.
    seen_term: Option<u64>,
    seen_liveness: BTreeMap<NodeId, Liveness>,
    /// The job id and whether it had finished.
    seen_job: Option<(u64, bool)>,
    /// Whether every chunk had its copies.
    seen_full_redundancy: Option<bool>,
}

impl Timeline {
    fn push(&mut self, unix_ms: u64, kind: EventKind, node: Option<NodeId>, detail: String) {
        // Commits that keep failing (no quorum) must not grow this without bound.
        if self.pending.len() == TIMELINE_EVENTS_MAX {
            self.pending.pop_front();
        }
        self.pending.push_back(ClusterEvent { unix_ms, kind, node, detail });
    }

    /// Whether `term` is not the one this timeline follows: the caller then reads the
    /// committed timeline and job for [`Timeline::observe_term`].
    pub fn is_new_term(&self, term: u64) -> bool {
        self.seen_term != Some(term)
    }

    /// Called on every tick while leading. A new term forgets what this node saw and starts
    /// from what was committed: each node's last recorded state, whether redundancy was last
    /// recorded full, and the committed repair job (whose start and finish its leader
    /// recorded). Events of an earlier term not yet committed are dropped: they belong to a
    /// leadership that ended.
    pub fn observe_term(
        &mut self,
        unix_ms: u64,
        node: NodeId,
        term: u64,
        committed: &[ClusterEvent],
        committed_job: Option<&RepairJob>,
    ) {
        if self.seen_term == Some(term) {
            return;
        }
        self.seen_term = Some(term);
        self.pending.clear();
        self.seen_liveness.clear();
        self.seen_full_redundancy = None;
        for event in committed {
            match (event.kind, event.node) {
                (EventKind::NodeState(liveness), Some(node)) => {
                    self.seen_liveness.insert(node, liveness);
                }
                (EventKind::RedundancyLost, _) => self.seen_full_redundancy = Some(false),
                (EventKind::RedundancyRestored, _) => self.seen_full_redundancy = Some(true),
                _ => {}
            }
        }
        self.seen_job = committed_job.map(|job| (job.id, job.finished_ms.is_some()));
        self.push(unix_ms, EventKind::Leading, Some(node), format!("node {node} leads (term {term})"));
    }

    pub fn observe_nodes<'a>(&mut self, unix_ms: u64, nodes: impl IntoIterator<Item = NodeObservation<'a>>) {
        for seen in nodes {
            let before = self.seen_liveness.insert(seen.node, seen.liveness);
            // A node first seen up is the normal case, not news.
            let changed = match before {
                Some(before) => before != seen.liveness,
                None => seen.liveness != Liveness::Up,
            };
            if !changed {
                continue;
            }
            let mut detail = format!("node {} {} (phi {:.1})", seen.node, seen.liveness, seen.phi);
            if !seen.reason.is_empty() && seen.liveness != Liveness::Up {
                detail.push_str(&format!(": {}", seen.reason));
            }
            self.push(unix_ms, EventKind::NodeState(seen.liveness), Some(seen.node), detail);
        }
    }

    pub fn observe_job(&mut self, unix_ms: u64, job: Option<&RepairJob>) {
        let Some(job) = job else { return };
        let finished = job.finished_ms.is_some();
        let before = self.seen_job.replace((job.id, finished));
        let new_job = before.is_none_or(|(id, _)| id != job.id);
        if new_job && !finished {
            self.push(
                unix_ms,
                EventKind::RepairStarted,
                None,
                format!("repair job {} running: {} ({} copies planned)", job.id, job.reason, job.total_copies),
            );
        }
        let was_finished = before.is_some_and(|(id, done)| id == job.id && done);
        // A job that had finished before this term began is old news.
        if finished && !was_finished && before.is_some() {
            self.push(
                unix_ms,
                EventKind::RepairFinished,
                None,
                format!("repair job {} finished: {} copies, {} bytes", job.id, job.done_copies, job.done_bytes),
            );
        }
    }

    pub fn observe_scan(&mut self, unix_ms: u64, scan: &ScanSummary) {
        let full = scan.under_replicated == 0 && scan.lost == 0;
        let before = self.seen_full_redundancy.replace(full);
        match (before, full) {
            (Some(true) | None, false) => self.push(
                unix_ms,
                EventKind::RedundancyLost,
                None,
                format!("{} chunks under-replicated, {} lost", scan.under_replicated, scan.lost),
            ),
            (Some(false), true) => self.push(
                unix_ms,
                EventKind::RedundancyRestored,
                None,
                format!("full redundancy: all {} chunks have their copies", scan.chunks),
            ),
            _ => {}
        }
    }

    /// The events observed since the last call, oldest first, for the healer to commit.
    pub fn take_pending(&mut self) -> Vec<ClusterEvent> {
        self.pending.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(node: NodeId, liveness: Liveness) -> NodeObservation<'static> {
        NodeObservation { node, liveness, phi: 1.0, reason: "no heartbeat for 3s" }
    }

    fn job(id: u64, finished: bool) -> RepairJob {
        RepairJob {
            id,
            started_ms: 1,
            reason: "node 4 down".into(),
            total_copies: 10,
            total_bytes: 100,
            done_copies: if finished { 10 } else { 3 },
            done_bytes: if finished { 100 } else { 30 },
            finished_ms: finished.then_some(9),
        }
    }

    fn kinds(timeline: &Timeline) -> Vec<(EventKind, Option<NodeId>)> {
        timeline.pending.iter().map(|e| (e.kind, e.node)).collect()
    }

    #[test]
    fn a_node_dying_and_being_healed_reads_as_one_story() {
        let mut t = Timeline::default();
        assert!(t.is_new_term(5));
        t.observe_term(0, 1, 5, &[], None);
        assert!(!t.is_new_term(5));
        t.observe_nodes(10, [seen(1, Liveness::Up), seen(2, Liveness::Up)]);
        t.observe_scan(10, &ScanSummary { chunks: 8, ..ScanSummary::default() });
        t.observe_job(10, None);
        // Nothing new on a quiet tick.
        t.observe_nodes(20, [seen(1, Liveness::Up), seen(2, Liveness::Up)]);
        assert_eq!(kinds(&t), [(EventKind::Leading, Some(1))]);

        t.observe_nodes(30, [seen(1, Liveness::Up), seen(2, Liveness::Suspect)]);
        t.observe_nodes(40, [seen(1, Liveness::Up), seen(2, Liveness::Down)]);
        t.observe_scan(40, &ScanSummary { chunks: 8, under_replicated: 8, ..ScanSummary::default() });
        t.observe_job(50, Some(&job(7, false)));
        t.observe_job(60, Some(&job(7, false)));
        t.observe_job(70, Some(&job(7, true)));
        t.observe_scan(70, &ScanSummary { chunks: 8, ..ScanSummary::default() });
        assert_eq!(
            kinds(&t),
            [
                (EventKind::Leading, Some(1)),
                (EventKind::NodeState(Liveness::Suspect), Some(2)),
                (EventKind::NodeState(Liveness::Down), Some(2)),
                (EventKind::RedundancyLost, None),
                (EventKind::RepairStarted, None),
                (EventKind::RepairFinished, None),
                (EventKind::RedundancyRestored, None),
            ]
        );
        let events = t.take_pending();
        assert_eq!(events[2].unix_ms, 40);
        assert!(events[2].detail.starts_with("node 2 down"), "{}", events[2].detail);
        assert!(t.take_pending().is_empty(), "taken once");
    }

    #[test]
    fn a_first_term_records_only_what_is_not_normal() {
        let mut t = Timeline::default();
        t.observe_term(0, 3, 9, &[], None);
        t.observe_nodes(1, [seen(1, Liveness::Up), seen(2, Liveness::Down)]);
        // A job that finished under an earlier leader is not news.
        t.observe_job(1, Some(&job(4, true)));
        t.observe_scan(1, &ScanSummary { chunks: 2, ..ScanSummary::default() });
        assert_eq!(kinds(&t), [(EventKind::Leading, Some(3)), (EventKind::NodeState(Liveness::Down), Some(2))]);
        // The same term again changes nothing.
        t.observe_term(2, 3, 9, &[], None);
        assert_eq!(kinds(&t).len(), 2);
    }

    #[test]
    fn a_new_leader_continues_the_committed_story() {
        // What the previous leader committed: node 2 died, a repair of it is running.
        let mut old = Timeline::default();
        old.observe_term(0, 1, 4, &[], None);
        old.observe_nodes(1, [seen(1, Liveness::Up), seen(2, Liveness::Up), seen(3, Liveness::Up)]);
        old.observe_scan(1, &ScanSummary { chunks: 8, ..ScanSummary::default() });
        old.observe_nodes(2, [seen(1, Liveness::Up), seen(2, Liveness::Suspect), seen(3, Liveness::Up)]);
        old.observe_nodes(3, [seen(1, Liveness::Up), seen(2, Liveness::Down), seen(3, Liveness::Up)]);
        old.observe_scan(3, &ScanSummary { chunks: 8, under_replicated: 8, ..ScanSummary::default() });
        old.observe_job(3, Some(&job(7, false)));
        let mut committed = Vec::new();
        append_events(&mut committed, old.take_pending());
        assert_eq!(committed.len(), 5);

        // Node 1 dies too; node 3 leads. It sees what was committed, so it repeats none of it.
        let mut new = Timeline::default();
        new.observe_term(10, 3, 5, &committed, Some(&job(7, false)));
        new.observe_nodes(11, [seen(2, Liveness::Down), seen(3, Liveness::Up)]);
        new.observe_scan(11, &ScanSummary { chunks: 8, under_replicated: 8, ..ScanSummary::default() });
        new.observe_job(11, Some(&job(7, false)));
        assert_eq!(kinds(&new), [(EventKind::Leading, Some(3))]);
        // What changes from there is news: node 1 (first seen here) down, the job finishing.
        new.observe_nodes(12, [seen(1, Liveness::Down), seen(2, Liveness::Down), seen(3, Liveness::Up)]);
        new.observe_job(13, Some(&job(7, true)));
        new.observe_scan(13, &ScanSummary { chunks: 8, ..ScanSummary::default() });
        assert_eq!(
            kinds(&new),
            [
                (EventKind::Leading, Some(3)),
                (EventKind::NodeState(Liveness::Down), Some(1)),
                (EventKind::RepairFinished, None),
                (EventKind::RedundancyRestored, None),
            ]
        );
    }

    #[test]
    fn a_lost_term_drops_what_it_did_not_commit() {
        let mut t = Timeline::default();
        t.observe_term(0, 1, 1, &[], None);
        t.observe_nodes(1, [seen(2, Liveness::Down)]);
        t.observe_term(5, 1, 3, &[], None);
        assert_eq!(kinds(&t), [(EventKind::Leading, Some(1))]);
    }

    #[test]
    fn pending_and_committed_events_are_bounded_newest_kept() {
        let mut t = Timeline::default();
        t.observe_term(0, 1, 1, &[], None);
        for i in 0..(TIMELINE_EVENTS_MAX as u64 + 50) {
            let liveness = if i % 2 == 0 { Liveness::Down } else { Liveness::Up };
            t.observe_nodes(i + 1, [seen(2, liveness)]);
        }
        let pending = t.take_pending();
        assert_eq!(pending.len(), TIMELINE_EVENTS_MAX);
        assert_eq!(pending.last().map(|e| e.unix_ms), Some(TIMELINE_EVENTS_MAX as u64 + 50));

        let mut ring = Vec::new();
        append_events(&mut ring, pending.clone());
        append_events(&mut ring, pending[..10].to_vec());
        assert_eq!(ring.len(), TIMELINE_EVENTS_MAX);
        assert_eq!(ring[..TIMELINE_EVENTS_MAX - 10], pending[10..], "the oldest went first");
    }
}
