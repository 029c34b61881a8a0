//! The `Cluster` admin service: `status` (membership and Raft progress from the metadata,
//! liveness, health and repair from the leader's healer), membership changes and drains.
//!
//! The health view lives on the leader alone (only its detector hears every heartbeat), so a
//! node that does not lead forwards `status` to the leader once, and answers from what it knows
//! itself, saying why the liveness view is missing, when the leader cannot be asked.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use mendfs_heal::repair::RepairJob;
use mendfs_meta::{request_origin, MetaNode, StorageNode};
use mendfs_proto::v1 as pb;
use mendfs_proto::v1::cluster_server::{Cluster, ClusterServer};
use mendfs_proto::FORWARDED_HEADER;
use mendfs_types::NodeId;
use tonic::{Request, Response, Status};

use crate::healer::{ClusterEvent, EventKind, Healer, HealthSnapshot};

/// How long a member has to say how far its log is.
const INFO_TIMEOUT: Duration = Duration::from_millis(1_500);
/// How long the leader has to build the status for another node.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(4);
/// What building the status here takes at most (asking every member), kept in reserve when
/// the leader is asked first.
const LOCAL_STATUS_TIME: Duration = Duration::from_secs(2);

/// How long a follower waits for the leader's status when its caller has `left` (None: no
/// deadline): room is left to answer from its own view, but a caller with little time (a 2 s
/// attempt timeout, say) still gets the leader's view when the leader answers quickly: half of
/// what is left, not nothing. (`mendfs chaos` found that with a 2 s attempt timeout the leader
/// was given no time at all, so every status through a follower was its own partial view.)
fn forward_timeout(left: Option<Duration>) -> Duration {
    left.map_or(FORWARD_TIMEOUT, |left| FORWARD_TIMEOUT.min(left.saturating_sub(LOCAL_STATUS_TIME).max(left / 2)))
}

pub struct ClusterApi {
    node: MetaNode,
    healer: Healer,
}

impl ClusterApi {
    pub fn new(node: MetaNode, healer: Healer) -> ClusterServer<Self> {
        ClusterServer::new(Self::unserved(node, healer))
    }

    /// The same status, for callers in the node itself (the dashboard's `/api/status`).
    pub fn unserved(node: MetaNode, healer: Healer) -> Self {
        Self { node, healer }
    }

    /// The cluster's status as `cluster status` shows it: the leader's view, asked for once
    /// when this node does not lead, or this node's own (saying why the liveness view is
    /// missing) when the leader cannot be asked before `deadline`.
    pub async fn status_reply(&self, forwarded: bool, deadline: Option<Instant>) -> pb::StatusReply {
        let health = if self.node.is_leader() || forwarded {
            self.local_health()
        } else {
            match self.status_from_leader(deadline).await {
                Ok(reply) => return reply,
                Err(e) => Err(e),
            }
        };
        self.local_status(health).await
    }

    /// Asks the leader for the status, as one forwarded call, leaving room before the caller's
    /// deadline to answer from this node's own view if the leader does not.
    async fn status_from_leader(&self, deadline: Option<Instant>) -> Result<pb::StatusReply, String> {
        let timeout = forward_timeout(deadline.map(|deadline| deadline.saturating_duration_since(Instant::now())));
        let addr = self.node.leader_addr().ok_or("no leader is known")?;
        let peers = self.node.peers();
        let mut client =
            pb::cluster_client::ClusterClient::with_interceptor(peers.channel(&addr)?, peers.interceptor());
        let mut request = Request::new(pb::StatusRequest {});
        request.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::AsciiMetadataValue::from_static("1"));
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.status(request)).await {
            Err(_) => Err(format!("the leader at {addr} did not answer within {timeout:?}")),
            Ok(Err(status)) => Err(format!("the leader at {addr}: {}", status.message())),
            Ok(Ok(reply)) => Ok(reply.into_inner()),
        }
    }

    /// The leader's health view, or why there is none here.
    fn local_health(&self) -> Result<HealthSnapshot, String> {
        if !self.node.is_leader() {
            return Err(format!("node {} is not the leader (leader: {:?})", self.node.id(), self.node.leader_id()));
        }
        self.healer.health_view().map_err(|e| e.to_string())?.ok_or_else(|| {
            "the leader has not finished its first failure-detection and repair scan yet (just elected?)".to_string()
        })
    }

    /// The status as this node sees it: every member's progress, asked directly, and the
    /// liveness view if this node leads.
    async fn local_status(&self, health: Result<HealthSnapshot, String>) -> pb::StatusReply {
        let node = &self.node;
        let raft = node.raft_status();
        let voters: BTreeSet<NodeId> = raft.voters.clone();
        let asks = raft.members.iter().map(|(id, addr)| {
            let node = node.clone();
            let (id, addr) = (*id, addr.clone());
            async move {
                if id == node.id() {
                    return (id, addr, Ok(node.local_info()));
                }
                let info = node.ask_info(&addr, INFO_TIMEOUT).await;
                (id, addr, info)
            }
        });
        let infos = futures::future::join_all(asks).await;
        let storage_nodes: BTreeMap<NodeId, StorageNode> =
            node.storage_nodes().unwrap_or_default().into_iter().map(|n| (n.id, n)).collect();

        let leader = raft.leader;
        let leader_last_log = infos
            .iter()
            .find(|(id, _, _)| Some(*id) == leader)
            .and_then(|(_, _, info)| info.as_ref().ok())
            .map(|info| info.last_log_index);
        let term =
            infos.iter().filter_map(|(_, _, info)| info.as_ref().ok().map(|info| info.term)).max().unwrap_or(raft.term);
        let mut nodes: Vec<pb::NodeStatus> = infos
            .into_iter()
            .map(|(id, addr, info)| match info {
                Ok(info) => pb::NodeStatus {
                    id,
                    addr,
                    role: info.role,
                    voter: voters.contains(&id),
                    last_log_index: info.last_log_index,
                    applied_index: info.applied_index,
                    lag: leader_last_log.map_or(0, |last| last.saturating_sub(info.applied_index)),
                    error: String::new(),
                    snapshot_index: info.snapshot_index,
                    purged_index: info.purged_index,
                    revision: info.revision,
                    term: info.term,
                    http_addr: info.http_addr,
                    ..Default::default()
                },
                Err(error) => pb::NodeStatus {
                    id,
                    addr,
                    role: "unreachable".to_string(),
                    voter: voters.contains(&id),
                    last_log_index: 0,
                    applied_index: 0,
                    lag: 0,
                    error,
                    snapshot_index: 0,
                    purged_index: 0,
                    ..Default::default()
                },
            })
            .collect();
        let health_error = match &health {
            Ok(snapshot) => {
                for status in &mut nodes {
                    status.storage = storage_nodes.contains_key(&status.id);
                    status.draining = storage_nodes.get(&status.id).is_some_and(|n| n.draining);
                    status.chunks_listed = snapshot.scan.chunks_listed.get(&status.id).copied().unwrap_or(0);
                    if let Some(view) = snapshot.nodes.iter().find(|v| v.node_id == status.id) {
                        status.state = view.liveness.to_string();
                        status.phi = view.phi;
                        status.heartbeat_age_ms = view.heartbeat_age_ms;
                        status.state_reason = view.reason.clone();
                        status.health = view.health;
                    }
                }
                String::new()
            }
            Err(e) => {
                for status in &mut nodes {
                    status.storage = storage_nodes.contains_key(&status.id);
                    status.draining = storage_nodes.get(&status.id).is_some_and(|n| n.draining);
                    // The committed liveness is all a node knows without the leader.
                    if let Some(storage) = storage_nodes.get(&status.id) {
                        status.state = storage.liveness.to_string();
                    }
                }
                e.clone()
            }
        };
        // Committed, so any node can tell the story, and a new leader continues it.
        let events = node.cluster_events().unwrap_or_default().into_iter().map(event_message).collect();
        let snapshot = health.unwrap_or_default();
        let throttle = snapshot.repair_throttle_bytes_per_sec;
        let repair =
            snapshot.repair_job.as_ref().map(|job| repair_status(job, snapshot.repair_bytes_per_sec, throttle));
        // From this node's state, like the current job: the history is the same on every node.
        let recent_repairs =
            node.repair_history().unwrap_or_default().iter().map(|job| repair_status(job, 0.0, throttle)).collect();
        let revision = node.revision();
        let kv_usage = node.kv_usage().ok().map(|(usage, compacted_revision)| pb::KvUsage {
            key_bytes: usage.key_bytes,
            history_bytes: usage.history_bytes,
            quota_bytes: usage.quota_bytes,
            quota_alarm: usage.alarm,
            sessions: usage.sessions,
            max_sessions: usage.max_sessions,
            compacted_revision,
        });
        pb::StatusReply {
            leader,
            term,
            nodes,
            revision,
            cluster_id: node.cluster_id().unwrap_or_default(),
            under_replicated_chunks: snapshot.scan.under_replicated,
            lost_chunks: snapshot.scan.lost,
            unplaceable_copies: snapshot.scan.unplaceable,
            over_replicated_chunks: snapshot.scan.over_replicated,
            chunks: snapshot.scan.chunks,
            repair,
            health_error,
            kv_usage,
            events,
            recent_repairs,
            stripes: snapshot
                .scan
                .stripes_by_live
                .iter()
                .map(|(&(live_shards, total_shards), &stripes)| pb::StripeCount { live_shards, total_shards, stripes })
                .collect(),
        }
    }
}

/// A repair job as the status shows it. A running job shows `current_rate` (the leader's
/// measured rate) and an ETA; a finished or superseded one its average rate.
fn repair_status(job: &RepairJob, current_rate: f64, throttle_bytes_per_sec: u64) -> pb::RepairStatus {
    let bytes_per_sec = match job.finished_ms {
        None => current_rate,
        Some(finished_ms) => {
            let took_secs = finished_ms.saturating_sub(job.started_ms) as f64 / 1000.0;
            if took_secs > 0.0 {
                job.done_bytes as f64 / took_secs
            } else {
                0.0
            }
        }
    };
    let remaining = job.total_bytes.saturating_sub(job.done_bytes) as f64;
    let eta_secs = (job.finished_ms.is_none() && bytes_per_sec > 0.0).then(|| remaining / bytes_per_sec);
    pb::RepairStatus {
        job_id: job.id,
        reason: job.reason.clone(),
        started_unix_ms: job.started_ms,
        finished_unix_ms: job.finished_ms,
        done_bytes: job.done_bytes,
        total_bytes: job.total_bytes,
        done_copies: job.done_copies,
        total_copies: job.total_copies,
        bytes_per_sec,
        eta_secs,
        throttle_bytes_per_sec,
    }
}

fn event_message(event: ClusterEvent) -> pb::ClusterEvent {
    pb::ClusterEvent {
        unix_ms: event.unix_ms,
        kind: event.kind.as_str().to_string(),
        node: event.node,
        state: match event.kind {
            EventKind::NodeState(liveness) => liveness.to_string(),
            _ => String::new(),
        },
        detail: event.detail,
    }
}

fn membership_reply(membership: mendfs_meta::Membership) -> Response<pb::MembershipReply> {
    Response::new(pb::MembershipReply { voters: membership.voters, learners: membership.learners })
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let origin = request_origin(&request);
        Ok(Response::new(self.status_reply(origin.forwarded, origin.deadline).await))
    }

    async fn drain(&self, request: Request<pb::DrainRequest>) -> Result<Response<pb::DrainReply>, Status> {
        let origin = request_origin(&request);
        let drain = request.into_inner();
        self.node.set_draining(origin, drain.id, !drain.undrain).await?;
        Ok(Response::new(pb::DrainReply {}))
    }

    async fn add_node(&self, request: Request<pb::AddNodeRequest>) -> Result<Response<pb::MembershipReply>, Status> {
        let origin = request_origin(&request);
        let add = request.into_inner();
        if add.id == 0 {
            return Err(Status::invalid_argument("node id 0 is reserved; use 1 or more"));
        }
        Ok(membership_reply(self.node.add_member(origin, add.id, add.addr, add.learner).await?))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let origin = request_origin(&request);
        let id = request.into_inner().id;
        Ok(membership_reply(self.node.remove_member(origin, id).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_with_little_time_still_gives_the_leader_half_of_it() {
        assert_eq!(forward_timeout(Some(Duration::from_secs(2))), Duration::from_secs(1));
        assert_eq!(forward_timeout(Some(Duration::from_millis(500))), Duration::from_millis(250));
        assert_eq!(forward_timeout(Some(Duration::ZERO)), Duration::ZERO);
        // More time: all but the room for the local answer, capped.
        assert_eq!(forward_timeout(Some(Duration::from_secs(5))), Duration::from_secs(3));
        assert_eq!(forward_timeout(Some(Duration::from_secs(3600))), FORWARD_TIMEOUT);
        assert_eq!(forward_timeout(None), FORWARD_TIMEOUT);
    }
}
