//! The detector loop on the leader: every tick it evaluates each node's phi and health,
//! publishes the health view, and commits the liveness transitions that start work.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use mendfs_heal::detector::Liveness;
use mendfs_meta::StorageNode;
use mendfs_types::NodeId;
use mendfs_worker::{Step, Worker, WorkerError};

use super::{Healer, HealthSnapshot, NodeHealthView};
use mendfs_heal::timeline::NodeObservation;

const TICK: Duration = Duration::from_millis(100);

pub(super) struct DetectionWorker {
    pub(super) healer: Healer,
}

impl Worker for DetectionWorker {
    fn name(&self) -> String {
        "healer.detection".into()
    }

    async fn work(&mut self) -> Result<Step, WorkerError> {
        if !self.healer.node.is_leader() {
            let mut shared = self.healer.shared();
            shared.term = None;
            shared.published = None;
            return Ok(Step::Idle(TICK));
        }
        // A failed round (no quorum for a commit, say) is retried on the next tick.
        if let Err(e) = self.healer.detect_once().await {
            tracing::warn!("failure detection: {e}");
        }
        Ok(Step::Idle(TICK))
    }
}

impl Healer {
    async fn detect_once(&self) -> Result<(), String> {
        let term = self.node.term();
        let members = self.node.member_ids();
        let storage: BTreeMap<NodeId, StorageNode> =
            self.node.storage_nodes().map_err(|e| e.to_string())?.into_iter().map(|n| (n.id, n)).collect();
        let now = self.now_ms();
        // Read before the lock: the timeline notes when a job starts and finishes, and a new
        // term continues the committed timeline.
        let repair_job = self.node.repair_job().map_err(|e| e.to_string())?;
        let committed_events = if self.shared().timeline.is_new_term(term) {
            self.node.cluster_events().map_err(|e| e.to_string())?
        } else {
            Vec::new()
        };
        let now_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        let assessments = {
            let mut shared = self.shared();
            let scan = match &shared.scan {
                Some((scanned_term, scan)) if *scanned_term == term => Some(scan.clone()),
                _ => None,
            };
            let rate = shared.repaired.bytes_per_sec(Instant::now());
            let state = self.term_state(&mut shared, term);
            let expected: BTreeSet<NodeId> = members.iter().chain(storage.keys()).copied().collect();
            for id in &expected {
                state.detector.watch(*id, now);
            }
            let gone: Vec<NodeId> = state.detector.tracked().filter(|id| !expected.contains(id)).collect();
            for id in gone {
                state.detector.forget(id);
                state.reports.remove(&id);
            }
            let assessments = state.detector.evaluate(now);
            let nodes: Vec<NodeHealthView> = assessments
                .iter()
                .map(|a| NodeHealthView {
                    node_id: a.node,
                    // A node this leader has not heard from keeps its committed `down` until
                    // it is heard: a fresh window must not make a dead node look alive.
                    liveness: match storage.get(&a.node) {
                        Some(n) if n.liveness == Liveness::Down && a.last_heartbeat_age_ms.is_none() => Liveness::Down,
                        _ => a.liveness,
                    },
                    phi: a.phi,
                    heartbeat_age_ms: a.last_heartbeat_age_ms,
                    reason: a.reason.clone(),
                    health: state.reports.get(&a.node).copied(),
                })
                .collect();
            shared.timeline.observe_term(now_unix_ms, self.node.id(), term, &committed_events, repair_job.as_ref());
            if let Some(scan) = &scan {
                // Only once the first scan of the term is in: until then the view is not
                // published either.
                shared.timeline.observe_nodes(
                    now_unix_ms,
                    nodes.iter().map(|n| NodeObservation {
                        node: n.node_id,
                        liveness: n.liveness,
                        phi: n.phi,
                        reason: &n.reason,
                    }),
                );
                shared.timeline.observe_scan(now_unix_ms, scan);
                shared.timeline.observe_job(now_unix_ms, repair_job.as_ref());
            }
            shared.published = scan.map(|scan| HealthSnapshot {
                nodes,
                scan,
                repair_bytes_per_sec: rate,
                repair_job: None,
                repair_throttle_bytes_per_sec: 0,
            });
            (assessments, shared.timeline.take_pending())
        };
        let (assessments, events) = assessments;
        if !events.is_empty() {
            // Dropped if the commit fails: re-proposing after an ambiguous failure could
            // record them twice, and an event is a note for people, not state to converge on.
            if let Err(e) = self.node.record_cluster_events(events).await {
                tracing::debug!("timeline events not committed: {e}");
            }
        }
        for assessment in assessments {
            let Some(node) = storage.get(&assessment.node) else { continue };
            let decided = match assessment.liveness {
                Liveness::Suspect => continue,
                // `up` needs evidence: a heartbeat this leader received.
                Liveness::Up if assessment.last_heartbeat_age_ms.is_none() => continue,
                other => other,
            };
            if decided == node.liveness {
                continue;
            }
            match decided {
                Liveness::Down => tracing::warn!(node = node.id, reason = %assessment.reason, "storage node down"),
                Liveness::Degraded => {
                    tracing::warn!(node = node.id, reason = %assessment.reason, "storage node degraded")
                }
                _ => tracing::info!(node = node.id, was = %node.liveness, "storage node up"),
            }
            self.node.set_liveness(node.id, decided).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
