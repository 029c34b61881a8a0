//! What the leader's healer saw happen, as a bounded ring of events: node 2 suspect at …,
//! down at …, repair job 3 started …, full redundancy at …. `cluster status` carries it, so
//! the dashboard can draw the timeline from any node.
//!
//! Pure: the healer feeds it what each detector tick produced (the nodes' liveness, the
//! committed repair job, the latest scan) with the wall-clock time, and the timeline turns
//! the differences from the previous tick into events. It is soft state of the node, like the
//! detector: a new leader starts listening afresh, so its first observations only record what
//! is not already normal (a node not up, a running job, chunks short of copies), and a node
//! that has led before keeps its old events, which say when they happened.

use std::collections::{BTreeMap, VecDeque};

use mendfs_heal::detector::Liveness;
use mendfs_heal::repair::{RepairJob, ScanSummary};
use mendfs_types::NodeId;

/// Events kept; the oldest go first. A few hundred cover hours of an eventful cluster and
/// keep the status reply small.
pub const TIMELINE_EVENTS_MAX: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq)]
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

#[derive(Debug, Default)]
pub struct Timeline {
    events: VecDeque<ClusterEvent>,
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
        if self.events.len() == TIMELINE_EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back(ClusterEvent { unix_ms, kind, node, detail });
    }

    /// Called on every tick while leading: a new term forgets what the previous one saw.
    pub fn observe_term(&mut self, unix_ms: u64, node: NodeId, term: u64) {
        if self.seen_term == Some(term) {
            return;
        }
        self.seen_term = Some(term);
        self.seen_liveness.clear();
        self.seen_job = None;
        self.seen_full_redundancy = None;
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

    /// Oldest first.
    pub fn events(&self) -> Vec<ClusterEvent> {
        self.events.iter().cloned().collect()
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
        timeline.events().iter().map(|e| (e.kind, e.node)).collect()
    }

    #[test]
    fn a_node_dying_and_being_healed_reads_as_one_story() {
        let mut t = Timeline::default();
        t.observe_term(0, 1, 5);
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
        let events = t.events();
        assert_eq!(events[2].unix_ms, 40);
        assert!(events[2].detail.starts_with("node 2 down"), "{}", events[2].detail);
    }

    #[test]
    fn a_new_term_records_only_what_is_not_normal() {
        let mut t = Timeline::default();
        t.observe_term(0, 3, 9);
        t.observe_nodes(1, [seen(1, Liveness::Up), seen(2, Liveness::Down)]);
        // A job that finished under an earlier leader is not news; a running one is.
        t.observe_job(1, Some(&job(4, true)));
        t.observe_scan(1, &ScanSummary { chunks: 2, ..ScanSummary::default() });
        assert_eq!(kinds(&t), [(EventKind::Leading, Some(3)), (EventKind::NodeState(Liveness::Down), Some(2))]);
        // The same term again changes nothing; a new one starts afresh but keeps the events.
        t.observe_term(2, 3, 9);
        t.observe_term(3, 3, 10);
        t.observe_job(3, Some(&job(5, false)));
        assert_eq!(kinds(&t).len(), 4);
        assert_eq!(kinds(&t)[3], (EventKind::RepairStarted, None));
    }

    #[test]
    fn the_ring_keeps_the_newest_events_and_no_more() {
        let mut t = Timeline::default();
        for i in 0..(TIMELINE_EVENTS_MAX as u64 + 50) {
            t.observe_term(i, 1, i);
        }
        let events = t.events();
        assert_eq!(events.len(), TIMELINE_EVENTS_MAX);
        assert_eq!(events[0].unix_ms, 50, "the oldest went first");
        assert_eq!(events.last().map(|e| e.unix_ms), Some(TIMELINE_EVENTS_MAX as u64 + 49));
    }
}
