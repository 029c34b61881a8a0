//! The `Policy` gRPC service: the operator sets, unsets and lists redundancy policies of path
//! prefixes and buckets. Every method needs the admin role (`auth::required_access`). Input is
//! checked and normalized here, with a clear answer, and checked again on the leader
//! (`validate`) and by the apply (a bucket must exist).

use mendfs_proto::v1 as pb;
use mendfs_proto::v1::policy_server::{Policy, PolicyServer};
use tonic::{Request, Response, Status};

use crate::node::MetaNode;
use crate::policy::{normalize_prefix, PolicyTarget, Redundancy};
use crate::service::request_origin;

/// The `Policy` service of a node. Its messages are a path and a scheme, and a list of at most
/// `policy::POLICIES_MAX` of them.
pub fn policy_service(node: &MetaNode) -> PolicyServer<PolicyApi> {
    PolicyServer::new(PolicyApi { node: node.clone() })
        .max_decoding_message_size(64 * 1024)
        .max_encoding_message_size(usize::MAX)
}

pub struct PolicyApi {
    node: MetaNode,
}

/// The target a request names, normalized (a prefix loses its trailing `/`).
fn target_from_pb(target: Option<pb::PolicyTarget>) -> Result<PolicyTarget, Status> {
    let target = match target.and_then(|target| target.target) {
        Some(pb::policy_target::Target::Prefix(prefix)) => {
            PolicyTarget::Prefix(normalize_prefix(&prefix).map_err(Status::invalid_argument)?)
        }
        Some(pb::policy_target::Target::Bucket(bucket)) => PolicyTarget::Bucket(bucket),
        None => return Err(Status::invalid_argument("a policy names a path prefix or a bucket")),
    };
    target.check().map_err(Status::invalid_argument)?;
    Ok(target)
}

fn target_to_pb(target: PolicyTarget) -> pb::PolicyTarget {
    let target = match target {
        PolicyTarget::Prefix(prefix) => pb::policy_target::Target::Prefix(prefix),
        PolicyTarget::Bucket(bucket) => pb::policy_target::Target::Bucket(bucket),
    };
    pb::PolicyTarget { target: Some(target) }
}

fn named(redundancy: Option<Redundancy>) -> String {
    redundancy.map(|redundancy| redundancy.to_string()).unwrap_or_default()
}

#[tonic::async_trait]
impl Policy for PolicyApi {
    async fn set(&self, request: Request<pb::PolicySetRequest>) -> Result<Response<pb::PolicySetReply>, Status> {
        let origin = request_origin(&request);
        let request = request.into_inner();
        let target = target_from_pb(request.target)?;
        let redundancy: Redundancy = request.redundancy.parse().map_err(Status::invalid_argument)?;
        let previous = self.node.set_policy(origin, target.clone(), redundancy).await?;
        tracing::info!(%target, %redundancy, previous = %named(previous), "set a redundancy policy");
        Ok(Response::new(pb::PolicySetReply {
            target: Some(target_to_pb(target)),
            previous: named(previous),
            redundancy: redundancy.to_string(),
        }))
    }

    async fn unset(&self, request: Request<pb::PolicyUnsetRequest>) -> Result<Response<pb::PolicyUnsetReply>, Status> {
        let origin = request_origin(&request);
        let target = target_from_pb(request.into_inner().target)?;
        let removed = self.node.unset_policy(origin, target.clone()).await?;
        tracing::info!(%target, removed = %named(removed), "unset a redundancy policy");
        Ok(Response::new(pb::PolicyUnsetReply { target: Some(target_to_pb(target)), removed: named(removed) }))
    }

    async fn list(&self, request: Request<pb::PolicyListRequest>) -> Result<Response<pb::PolicyListReply>, Status> {
        let policies = self.node.policies(request_origin(&request)).await?;
        let policies = policies
            .into_iter()
            .map(|(target, record)| pb::PolicyInfo {
                target: Some(target_to_pb(target)),
                redundancy: record.redundancy().to_string(),
                set_ms: record.set_ms(),
            })
            .collect();
        Ok(Response::new(pb::PolicyListReply { policies }))
    }
}
