//! The gRPC services a metadata node serves: `Node` (peers), `Kv` and `Cluster` (clients).
//!
//! Every call must carry the cluster secret; node-to-node calls from a node whose data belongs
//! to another cluster are refused. Input from the network is validated here and answered with
//! a clear error; nothing in this module panics on it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use mendfs_proto::v1 as pb;
use mendfs_proto::v1::cluster_server::{Cluster, ClusterServer};
use mendfs_proto::v1::kv_server::{Kv, KvServer};
use mendfs_proto::v1::node_server::{Node, NodeServer};
use mendfs_proto::{CLUSTER_ID_HEADER, FORWARDED_HEADER, LEADER_HINT_HEADER, SECRET_HEADER};
use openraft::ServerState;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::node::{now_ms, ForwardEnvelope, LeaderRequest, LeaderResponse, MetaNode, Origin};
use crate::state::{self, Command, CommandResult, EventKind, KeyValue, Outcome, RequestId};
use crate::storage::StateReader;

/// Revisions read from history per step of a watch, so one slow watcher never holds a large
/// batch in memory.
const WATCH_BATCH_REVISIONS: usize = 256;
/// Replies buffered per watcher before the watch stops reading history and waits for the
/// client to drain them.
const WATCH_QUEUE_REPLIES: usize = 64;

/// Refuses calls without the cluster secret, and node calls from another cluster.
#[derive(Clone)]
pub struct Gatekeeper {
    secret: Option<Arc<str>>,
    /// Set for the `Node` service only: its callers must belong to this node's cluster.
    state: Option<StateReader>,
}

/// Compares in time independent of where the first difference is.
fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for Gatekeeper {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(secret) = &self.secret {
            let given = request.metadata().get(SECRET_HEADER).map(|value| value.as_bytes());
            let remote = request.remote_addr().map_or("unknown".to_string(), |addr| addr.to_string());
            match given {
                None => {
                    tracing::warn!(%remote, "refused a call without the cluster secret");
                    return Err(Status::unauthenticated(
                        "the cluster secret is required (--secret-file or MENDFS_SECRET)",
                    ));
                }
                Some(given) if !secrets_equal(given, secret.as_bytes()) => {
                    tracing::warn!(%remote, "refused a call with a wrong cluster secret");
                    return Err(Status::unauthenticated("wrong cluster secret"));
                }
                Some(_) => {}
            }
        }
        if let Some(state) = &self.state {
            let theirs = request.metadata().get(CLUSTER_ID_HEADER).and_then(|value| value.to_str().ok());
            if let (Some(theirs), Some(ours)) = (theirs, state.cluster_id()) {
                if theirs != ours {
                    tracing::error!(
                        ours = %ours,
                        theirs = %theirs,
                        "refused a call from a node of another cluster: this node's data directory belongs to cluster {ours}, the caller's to cluster {theirs}"
                    );
                    return Err(Status::failed_precondition(format!(
                        "cluster id mismatch: this node belongs to cluster {ours}, the caller to cluster {theirs}"
                    )));
                }
            }
        }
        Ok(request)
    }
}

pub type NodeService = InterceptedService<NodeServer<NodeApi>, Gatekeeper>;
pub type KvService = InterceptedService<KvServer<KvApi>, Gatekeeper>;
pub type ClusterService = InterceptedService<ClusterServer<ClusterApi>, Gatekeeper>;

/// The gatekeepers for client-facing and for node-to-node services.
pub fn gates(node: &MetaNode) -> (Gatekeeper, Gatekeeper) {
    let secret: Option<Arc<str>> = node.config.secret.as_deref().map(Arc::from);
    (Gatekeeper { secret: secret.clone(), state: None }, Gatekeeper { secret, state: Some(node.state.clone()) })
}

/// The three services of a node, wrapped with their gatekeepers and message size limits.
pub fn services(node: &MetaNode) -> (NodeService, KvService, ClusterService) {
    let (client_gate, node_gate) = gates(node);
    // Client messages are bounded by the key and value limits (plus framing), so an oversized
    // message is refused before it is buffered.
    let client_message_max = node.config.max_key_bytes + node.config.max_value_bytes + 64 * 1024;
    (
        InterceptedService::new(
            NodeServer::new(NodeApi { node: node.clone() })
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            node_gate,
        ),
        InterceptedService::new(
            KvServer::new(KvApi { node: node.clone() })
                .max_decoding_message_size(client_message_max)
                .max_encoding_message_size(usize::MAX),
            client_gate.clone(),
        ),
        InterceptedService::new(ClusterServer::new(ClusterApi { node: node.clone() }), client_gate),
    )
}

fn encode_reply<T: Serialize>(value: &T) -> Result<Response<pb::RaftPayload>, Status> {
    let data = state::encode(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(pb::RaftPayload { data }))
}

fn decode_payload<T: for<'de> serde::Deserialize<'de>>(payload: &pb::RaftPayload, what: &str) -> Result<T, Status> {
    state::decode(&payload.data).map_err(|e| Status::invalid_argument(format!("malformed {what} payload: {e}")))
}

pub struct NodeApi {
    node: MetaNode,
}

#[tonic::async_trait]
impl Node for NodeApi {
    async fn append_entries(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        let rpc = decode_payload(request.get_ref(), "append-entries")?;
        encode_reply(&self.node.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        let rpc = decode_payload(request.get_ref(), "vote")?;
        encode_reply(&self.node.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        let rpc = decode_payload(request.get_ref(), "install-snapshot")?;
        encode_reply(&self.node.raft.install_snapshot(rpc).await)
    }

    async fn forward(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        let envelope: ForwardEnvelope = decode_payload(request.get_ref(), "forwarded request")?;
        // A request that waited past its sender's deadline (in a paused process's socket, say)
        // is refused: the sender has already reported a failure, so applying it now would turn
        // a reported failure into a silent success.
        let result = if now_ms() > envelope.deadline_unix_ms {
            let late_ms = now_ms().saturating_sub(envelope.deadline_unix_ms);
            tracing::warn!(late_ms, "refused a forwarded request that arrived after its deadline");
            Err(ApiError::Timeout(format!("the forwarded request arrived {late_ms} ms after its deadline")))
        } else {
            self.node.serve_on_leader(envelope.request, Origin::FORWARDED).await
        };
        encode_reply(&result)
    }

    async fn info(&self, _request: Request<pb::InfoRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        Ok(Response::new(local_info(&self.node)))
    }
}

fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

fn local_info(node: &MetaNode) -> pb::NodeInfo {
    let metrics = node.raft.metrics().borrow().clone();
    let revision = node.state.view().ok().and_then(|view| state::current_revision(&view).ok()).unwrap_or(0);
    pb::NodeInfo {
        id: node.config.node_id,
        addr: node.config.advertise_addr.clone(),
        role: role_name(metrics.state).to_string(),
        term: metrics.current_term,
        leader: metrics.current_leader,
        last_log_index: metrics.last_log_index.unwrap_or(0),
        applied_index: metrics.last_applied.map_or(0, |id| id.index),
        snapshot_index: metrics.snapshot.map_or(0, |id| id.index),
        purged_index: metrics.purged.map_or(0, |id| id.index),
        revision,
    }
}

/// Whether another node forwarded the request, and until when its caller waits (its
/// `grpc-timeout`, counted from now).
pub fn origin<T>(request: &Request<T>) -> Origin {
    let timeout =
        request.metadata().get("grpc-timeout").and_then(|value| value.to_str().ok()).and_then(parse_grpc_timeout);
    Origin {
        forwarded: request.metadata().get(FORWARDED_HEADER).is_some(),
        deadline: timeout.map(|timeout| Instant::now() + timeout),
    }
}

/// Parses a `grpc-timeout` header value: at most 8 digits and a unit (H, M, S, m, u, n), as
/// the gRPC over HTTP/2 specification defines it; None for anything else.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

pub struct KvApi {
    node: MetaNode,
}

fn to_pb_kv(kv: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: kv.key,
        value: kv.record.value,
        version: kv.record.version,
        create_revision: kv.record.create_revision,
        modify_revision: kv.record.modify_revision,
        session_id: kv.record.session_id,
    }
}

fn request_id(id: Option<pb::RequestId>) -> Option<RequestId> {
    id.map(|id| RequestId { client_id: id.client_id, sequence: id.sequence })
}

impl KvApi {
    /// Names the leader on a reply this node had to forward, so the client goes there next.
    fn hint<T>(&self, result: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
        let mut response = result?;
        if !self.node.is_leader() {
            if let Some(addr) = self.node.leader_addr().and_then(|addr| addr.parse().ok()) {
                response.metadata_mut().insert(LEADER_HINT_HEADER, addr);
            }
        }
        Ok(response)
    }

    fn check_key(&self, key: &[u8]) -> Result<(), ApiError> {
        if key.is_empty() {
            return Err(ApiError::InvalidArgument("the key is empty".into()));
        }
        if key.len() > self.node.config.max_key_bytes {
            return Err(ApiError::InvalidArgument(format!(
                "the key is {} bytes; the limit is {} bytes (max_key_bytes)",
                key.len(),
                self.node.config.max_key_bytes
            )));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), ApiError> {
        if value.len() > self.node.config.max_value_bytes {
            return Err(ApiError::InvalidArgument(format!(
                "the value is {} bytes; the limit is {} bytes (max_value_bytes)",
                value.len(),
                self.node.config.max_value_bytes
            )));
        }
        Ok(())
    }

    async fn command(&self, origin: Origin, id: Option<pb::RequestId>, command: Command) -> Result<Outcome, Status> {
        let proposal = MetaNode::proposal(request_id(id), command);
        match self.node.serve_on_leader(LeaderRequest::Propose(proposal), origin).await? {
            LeaderResponse::Command(result) => command_outcome(result),
            other => Err(Status::internal(format!("unexpected answer to a write: {other:?}"))),
        }
    }
}

fn command_outcome(result: CommandResult) -> Result<Outcome, Status> {
    result.map_err(|e| Status::from(ApiError::Command(e)))
}

fn write_reply(outcome: Outcome) -> Result<Response<pb::WriteReply>, Status> {
    match outcome {
        Outcome::Written { revision, kv, deleted } => {
            Ok(Response::new(pb::WriteReply { revision, kv: kv.map(to_pb_kv), deleted }))
        }
        Outcome::SessionClosed { revision, found } => {
            Ok(Response::new(pb::WriteReply { revision, kv: None, deleted: found }))
        }
        other => Err(Status::internal(format!("unexpected write outcome {other:?}"))),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchReply, Status>> + Send>>;

#[tonic::async_trait]
impl Kv for KvApi {
    async fn create(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::WriteReply>, Status> {
        let origin = origin(&request);
        let put = request.into_inner();
        self.check_key(&put.key)?;
        self.check_value(&put.value)?;
        let command = Command::Create { key: put.key, value: put.value, session_id: put.session_id };
        self.hint(write_reply(self.command(origin, put.request_id, command).await?))
    }

    async fn set(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::WriteReply>, Status> {
        let origin = origin(&request);
        let put = request.into_inner();
        self.check_key(&put.key)?;
        self.check_value(&put.value)?;
        let command = Command::Set {
            key: put.key,
            value: put.value,
            expected_version: put.expected_version,
            session_id: put.session_id,
        };
        self.hint(write_reply(self.command(origin, put.request_id, command).await?))
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::WriteReply>, Status> {
        let origin = origin(&request);
        let delete = request.into_inner();
        self.check_key(&delete.key)?;
        let command = Command::Delete { key: delete.key, expected_version: delete.expected_version };
        self.hint(write_reply(self.command(origin, delete.request_id, command).await?))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetReply>, Status> {
        let origin = origin(&request);
        let get = request.into_inner();
        self.check_key(&get.key)?;
        self.hint(match self.node.serve_on_leader(LeaderRequest::Get { key: get.key }, origin).await? {
            LeaderResponse::Get { revision, kv } => Ok(Response::new(pb::GetReply { revision, kv: kv.map(to_pb_kv) })),
            other => Err(Status::internal(format!("unexpected answer to a get: {other:?}"))),
        })
    }

    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListReply>, Status> {
        let origin = origin(&request);
        let list = request.into_inner();
        if !list.prefix.is_empty() {
            self.check_key(&list.prefix)?;
        }
        let leader_request = LeaderRequest::List { prefix: list.prefix, limit: list.limit };
        self.hint(match self.node.serve_on_leader(leader_request, origin).await? {
            LeaderResponse::List { revision, kvs, truncated } => {
                Ok(Response::new(pb::ListReply { revision, kvs: kvs.into_iter().map(to_pb_kv).collect(), truncated }))
            }
            other => Err(Status::internal(format!("unexpected answer to a list: {other:?}"))),
        })
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let watch = request.into_inner();
        if watch.key.len() > self.node.config.max_key_bytes || (watch.key.is_empty() && !watch.prefix) {
            return Err(Status::invalid_argument("a watch needs a key of at most max_key_bytes bytes (or a prefix)"));
        }
        let reader = self.node.state.clone();
        let view = reader.view().map_err(|e| Status::internal(e.to_string()))?;
        let current = state::current_revision(&view).map_err(|e| Status::internal(e.to_string()))?;
        let compacted = state::compacted_revision(&view).map_err(|e| Status::internal(e.to_string()))?;
        drop(view);
        let start = if watch.start_revision == 0 { current + 1 } else { watch.start_revision };
        if start <= compacted {
            return Err(Status::out_of_range(format!(
                "revision {start} has been compacted; the oldest revision still watchable is {}",
                compacted + 1
            )));
        }
        let (tx, rx) = mpsc::channel(WATCH_QUEUE_REPLIES);
        tokio::spawn(run_watch(reader, watch.key, watch.prefix, start, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn session_open(
        &self,
        request: Request<pb::SessionOpenRequest>,
    ) -> Result<Response<pb::SessionOpenReply>, Status> {
        let origin = origin(&request);
        let open = request.into_inner();
        if !(100..=3_600_000).contains(&open.ttl_ms) {
            return Err(Status::invalid_argument(format!("session TTL {} ms is outside 100 ms ..= 1 h", open.ttl_ms)));
        }
        match self.command(origin, open.request_id, Command::SessionOpen { ttl_ms: open.ttl_ms }).await? {
            Outcome::SessionOpened { session_id, ttl_ms } => {
                Ok(Response::new(pb::SessionOpenReply { session_id, ttl_ms }))
            }
            other => Err(Status::internal(format!("unexpected session outcome {other:?}"))),
        }
    }

    async fn session_keep_alive(
        &self,
        request: Request<pb::SessionKeepAliveRequest>,
    ) -> Result<Response<pb::SessionKeepAliveReply>, Status> {
        let origin = origin(&request);
        let session_id = request.into_inner().session_id;
        match self.node.serve_on_leader(LeaderRequest::KeepAlive { session_id }, origin).await? {
            LeaderResponse::KeepAlive { ttl_ms } => Ok(Response::new(pb::SessionKeepAliveReply { ttl_ms })),
            other => Err(Status::internal(format!("unexpected answer to a keep-alive: {other:?}"))),
        }
    }

    async fn session_close(
        &self,
        request: Request<pb::SessionCloseRequest>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        let origin = origin(&request);
        let close = request.into_inner();
        let command = Command::SessionClose { session_id: close.session_id };
        self.hint(write_reply(self.command(origin, close.request_id, command).await?))
    }
}

/// Streams every change from `next` on, in revision order, with no gaps and no repeats:
/// history first, then each new revision as it is applied. Ends when the client goes away.
async fn run_watch(
    reader: StateReader,
    key: Vec<u8>,
    is_prefix: bool,
    mut next: u64,
    tx: mpsc::Sender<Result<pb::WatchReply, Status>>,
) {
    let mut applied = reader.subscribe();
    loop {
        let batch = reader.view().map_err(|e| e.to_string()).and_then(|view| {
            let compacted = state::compacted_revision(&view).map_err(|e| e.to_string())?;
            if next <= compacted {
                return Err(format!(
                    "the watcher fell behind: revision {next} has been compacted (oldest kept: {})",
                    compacted + 1
                ));
            }
            state::events_between(&view, next, WATCH_BATCH_REVISIONS, &key, is_prefix).map_err(|e| e.to_string())
        });
        let batch = match batch {
            Ok(batch) => batch,
            Err(message) => {
                let _ = tx.send(Err(Status::out_of_range(message))).await;
                return;
            }
        };
        let full_batch = batch.len() == WATCH_BATCH_REVISIONS;
        for (revision, events) in batch {
            next = revision + 1;
            if events.is_empty() {
                continue;
            }
            let events = events
                .into_iter()
                .map(|event| pb::WatchEvent {
                    kind: match event.kind {
                        EventKind::Put => pb::EventKind::Put as i32,
                        EventKind::Delete => pb::EventKind::Delete as i32,
                    },
                    kv: Some(to_pb_kv(KeyValue { key: event.key, record: event.record })),
                })
                .collect();
            if tx.send(Ok(pb::WatchReply { revision, events })).await.is_err() {
                return;
            }
        }
        if full_batch {
            continue;
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
            // A periodic re-check bounds the damage of any missed notification.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

pub struct ClusterApi {
    node: MetaNode,
}

impl ClusterApi {
    fn membership_reply(response: LeaderResponse) -> Result<Response<pb::MembershipReply>, Status> {
        match response {
            LeaderResponse::Membership { voters, learners } => {
                Ok(Response::new(pb::MembershipReply { voters, learners }))
            }
            other => Err(Status::internal(format!("unexpected answer to a membership change: {other:?}"))),
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let node = &self.node;
        let metrics = node.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let members: Vec<(u64, String)> = membership.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();

        let asks = members.iter().map(|(id, addr)| {
            let node = node.clone();
            let (id, addr) = (*id, addr.clone());
            async move {
                if id == node.config.node_id {
                    return (id, addr, Ok(local_info(&node)));
                }
                let info = async {
                    let mut client = node.peers.client(&addr)?;
                    let mut request = Request::new(pb::InfoRequest {});
                    request.set_timeout(Duration::from_millis(1_500));
                    client.info(request).await.map(|r| r.into_inner()).map_err(|s| s.message().to_string())
                };
                let info = tokio::time::timeout(Duration::from_secs(2), info)
                    .await
                    .unwrap_or_else(|_| Err("no answer within 2s".to_string()));
                (id, addr, info)
            }
        });
        // The detector's view lives on the leader; ask it alongside the nodes.
        let health = async {
            match tokio::time::timeout(
                Duration::from_secs(3),
                node.serve_on_leader(LeaderRequest::Health, Origin::LOCAL),
            )
            .await
            {
                Err(_) => Err("the leader did not answer within 3s".to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(LeaderResponse::Health(snapshot))) => Ok(*snapshot),
                Ok(Ok(other)) => Err(format!("unexpected answer: {other:?}")),
            }
        };
        let (infos, health) = futures::future::join(futures::future::join_all(asks), health).await;
        let storage_nodes: std::collections::BTreeMap<u64, crate::files::StorageNode> =
            node.storage_nodes().unwrap_or_default().into_iter().map(|n| (n.id, n)).collect();

        let leader = metrics.current_leader;
        let leader_last_log = infos
            .iter()
            .find(|(id, _, _)| Some(*id) == leader)
            .and_then(|(_, _, info)| info.as_ref().ok())
            .map(|info| info.last_log_index);
        let term = infos
            .iter()
            .filter_map(|(_, _, info)| info.as_ref().ok().map(|info| info.term))
            .max()
            .unwrap_or(metrics.current_term);
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
        let snapshot = health.unwrap_or_default();
        let repair = snapshot.repair_job.as_ref().map(|job| {
            // A running job shows its current rate; a finished one its average.
            let bytes_per_sec = match job.finished_ms {
                None => snapshot.repair_bytes_per_sec,
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
            }
        });
        let revision = node.state.view().ok().and_then(|view| state::current_revision(&view).ok()).unwrap_or(0);
        Ok(Response::new(pb::StatusReply {
            leader,
            term,
            nodes,
            revision,
            cluster_id: node.state.cluster_id().unwrap_or_default(),
            under_replicated_chunks: snapshot.scan.under_replicated,
            lost_chunks: snapshot.scan.lost,
            unplaceable_copies: snapshot.scan.unplaceable,
            over_replicated_chunks: snapshot.scan.over_replicated,
            chunks: snapshot.scan.chunks,
            repair,
            health_error,
        }))
    }

    async fn drain(&self, request: Request<pb::DrainRequest>) -> Result<Response<pb::DrainReply>, Status> {
        let origin = origin(&request);
        let drain = request.into_inner();
        let request = LeaderRequest::Drain { id: drain.id, draining: !drain.undrain };
        self.node.serve_on_leader(request, origin).await?;
        Ok(Response::new(pb::DrainReply {}))
    }

    async fn add_node(&self, request: Request<pb::AddNodeRequest>) -> Result<Response<pb::MembershipReply>, Status> {
        let origin = origin(&request);
        let add = request.into_inner();
        if add.id == 0 {
            return Err(Status::invalid_argument("node id 0 is reserved; use 1 or more"));
        }
        let request = LeaderRequest::AddNode { id: add.id, addr: add.addr, learner: add.learner };
        let response = self.node.serve_on_leader(request, origin).await?;
        Self::membership_reply(response)
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let origin = origin(&request);
        let id = request.into_inner().id;
        let response = self.node.serve_on_leader(LeaderRequest::RemoveNode { id }, origin).await?;
        Self::membership_reply(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_garbage_is_refused() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("4999m"), Some(Duration::from_millis(4999)));
        assert_eq!(parse_grpc_timeout("12u"), Some(Duration::from_micros(12)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "5", "5s", "-5S", "123456789S", "5 S", "5SS", "é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_request_says_whether_it_was_forwarded_and_until_when_its_caller_waits() {
        let mut request = Request::new(());
        assert_eq!(origin(&request), Origin::LOCAL);
        request.set_timeout(Duration::from_secs(5));
        request.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::AsciiMetadataValue::from_static("1"));
        let before = Instant::now();
        let origin = origin(&request);
        assert!(origin.forwarded);
        let deadline = origin.deadline.expect("a deadline from grpc-timeout");
        assert!(deadline > before + Duration::from_secs(4) && deadline <= Instant::now() + Duration::from_secs(5));
    }
}
