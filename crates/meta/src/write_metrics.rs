//! Where a metadata write spends its time, stage by stage, as histograms `/metrics` shows:
//! waiting to join a batch and being committed, the batch's trip through Raft, a follower's
//! round trip, the Raft log's fsyncs and the state machine's applies. A write that is slow is
//! slow in one of these; etcd's `wal_fsync`, `backend_commit` and `peer_round_trip_time`
//! histograms answer the same question for etcd, and `mendfs bench kv` prints these beside its
//! rows.
//!
//! Every observation is of a stage that already costs a task wake-up or more: once per batch,
//! per message or per fsync, and once per write for the proposal's own time.

use std::time::Duration;

use mendfs_telemetry::metrics::{latency_histogram, latency_histogram_family, Histogram, HistogramFamily, Scrape};

use crate::NodeId;

/// Batch sizes: 1 to 512 proposals (the batch limit) in doublings.
fn batch_size_histogram() -> Histogram {
    Histogram::new((0..10).map(|exponent| f64::from(1u32 << exponent)))
}

pub struct WriteMetrics {
    /// A proposal made on this node while it leads: from joining the group-commit queue to its
    /// outcome (the wait for a batch, the batch's commit and apply).
    proposal_seconds: Histogram,
    /// Proposals in one batch, which is one Raft entry.
    batch_proposals: Histogram,
    /// One batch: handed to Raft, replicated to a quorum, applied on this node.
    batch_seconds: Histogram,
    /// An AppendEntries with entries, sent by this node as leader, until the follower's answer
    /// (which it gives after its fsync), by follower.
    peer_append_seconds: HistogramFamily,
    /// One fsync of the Raft log: a leader's flush of its own entries (all appended since the
    /// last), or a follower's append of a leader's entries (the write and its fsync).
    log_fsync_seconds: Histogram,
    /// One apply of committed entries to the state machine.
    apply_seconds: Histogram,
}

impl Default for WriteMetrics {
    fn default() -> Self {
        Self {
            proposal_seconds: latency_histogram(),
            batch_proposals: batch_size_histogram(),
            batch_seconds: latency_histogram(),
            peer_append_seconds: latency_histogram_family(),
            log_fsync_seconds: latency_histogram(),
            apply_seconds: latency_histogram(),
        }
    }
}

impl WriteMetrics {
    pub(crate) fn proposal(&self, elapsed: Duration) {
        self.proposal_seconds.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn batch(&self, proposals: usize, elapsed: Duration) {
        self.batch_proposals.observe(proposals as f64);
        self.batch_seconds.observe(elapsed.as_secs_f64());
    }

    /// The histogram of AppendEntries round trips to `peer`, for its connection to keep.
    pub(crate) fn peer_append(&self, peer: NodeId) -> Histogram {
        self.peer_append_seconds.get_or_create(&vec![("peer".to_string(), peer.to_string())]).clone()
    }

    pub(crate) fn log_fsync_histogram(&self) -> Histogram {
        self.log_fsync_seconds.clone()
    }

    pub(crate) fn apply(&self, elapsed: Duration) {
        self.apply_seconds.observe(elapsed.as_secs_f64());
    }

    /// Adds every histogram to `scrape`.
    pub fn export(&self, scrape: &mut Scrape) {
        scrape.histogram(
            "mendfs_raft_proposal_seconds",
            "A write proposed on this node as leader: from joining a batch to its outcome",
            &self.proposal_seconds,
        );
        scrape.histogram(
            "mendfs_raft_batch_proposals",
            "Proposals committed together in one Raft entry (group commit)",
            &self.batch_proposals,
        );
        scrape.histogram(
            "mendfs_raft_batch_seconds",
            "One batch of proposals: handed to Raft, replicated to a quorum, applied on the leader",
            &self.batch_seconds,
        );
        scrape.histogram_family(
            "mendfs_raft_peer_append_seconds",
            "Round trip of an AppendEntries with entries to a follower, its fsync included, by peer",
            &self.peer_append_seconds,
        );
        scrape.histogram(
            "mendfs_raft_log_fsync_seconds",
            "One fsync of the Raft log (a leader's flush, or a follower's append with its fsync)",
            &self.log_fsync_seconds,
        );
        scrape.histogram(
            "mendfs_raft_apply_seconds",
            "One apply of committed Raft entries to the state machine",
            &self.apply_seconds,
        );
    }
}
