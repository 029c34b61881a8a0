//! The `Health` service: heartbeats arrive here on the leader and feed its detector.

use mendfs_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::Healer;

pub struct HealthApi {
    pub healer: Healer,
}

#[tonic::async_trait]
impl pb::health_server::Health for HealthApi {
    async fn heartbeat(&self, request: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatReply>, Status> {
        let node = &self.healer.node;
        if !node.is_leader() {
            return Err(Status::failed_precondition(format!(
                "node {} is not the leader (leader: {:?})",
                node.id(),
                node.leader_id()
            )));
        }
        // A heartbeat keeps a node "up": only that node may send it, whatever the message says.
        let caller = mendfs_meta::auth::caller_of(&request);
        let request = request.into_inner();
        if !caller.speaks_for(request.node_id) {
            return Err(Status::permission_denied(format!(
                "permission denied: {} may not send heartbeats for node {}",
                caller.identity(),
                request.node_id
            )));
        }
        let health = request.health.unwrap_or_default();
        self.healer.record_heartbeat(request.node_id, &health);
        Ok(Response::new(pb::HeartbeatReply {}))
    }
}
