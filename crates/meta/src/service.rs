//! The gRPC services a metadata node serves: `Node` (peers), `Kv` and `Cluster` (clients),
//! `Auth` and `S3Admin` (the operator).
//!
//! Who may call what is decided before a call gets here (`auth`). Input from the network is
//! validated here and answered with a clear error; nothing in this module panics on it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use mendfs_proto::v1 as pb;
use mendfs_proto::v1::auth_server::{Auth as AuthService, AuthServer};
use mendfs_proto::v1::kv_server::{Kv, KvServer};
use mendfs_proto::v1::node_server::{Node, NodeServer};
use mendfs_proto::v1::s3_admin_server::{S3Admin, S3AdminServer};
use mendfs_proto::{CLUSTER_ID_HEADER, FORWARDED_HEADER, LEADER_HINT_HEADER, NODE_ID_HEADER};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::auth::{Authenticator, ConnectionInfo, Role};
use crate::clock;
use crate::error::ApiError;
use mendfs_telemetry::metrics::RequestMetrics;
use mendfs_types::unix_now_ms;

use crate::kv;
use crate::node::{ForwardEnvelope, MetaNode, Origin};
use crate::raft_store::StateReader;
use crate::schema::{self, EventKind, KeyValue, Outcome};
use crate::snapshot_file::SnapshotParser;
#[cfg(test)]
use crate::snapshot_file::SnapshotWriter;
use crate::state::{Command, RequestId};

/// Revisions read from history per step of a watch, so one slow watcher never holds a large
/// batch in memory.
const WATCH_BATCH_REVISIONS: usize = 256;
/// Replies buffered per watcher before the watch stops reading history and waits for the
/// client to drain them.
const WATCH_QUEUE_REPLIES: usize = 64;

/// The metadata services of a node, with their message size limits. Every call reaches them
/// through the node's [`crate::auth::AuthLayer`] (see [`authenticator`]).
/// `serving` is cancelled when the node stops serving: a follower then ends its append streams,
/// and every node its clients' write streams, which would otherwise hold the server's drain of
/// calls in flight until the grace ran out.
pub fn services(
    node: &MetaNode,
    serving: CancellationToken,
) -> (NodeServer<NodeApi>, KvServer<KvApi>, AuthServer<AuthApi>, S3AdminServer<S3AdminApi>) {
    // Client messages are bounded by the key and value limits (plus framing), so an oversized
    // message is refused before it is buffered.
    let client_message_max = node.config.max_key_bytes + node.config.max_value_bytes + 64 * 1024;
    (
        NodeServer::new(NodeApi {
            node: node.clone(),
            receiving: std::sync::Mutex::new(None),
            serving: serving.clone(),
        })
        .max_decoding_message_size(crate::network::PEER_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(crate::network::PEER_MESSAGE_BYTES_MAX),
        KvServer::new(KvApi { node: node.clone(), serving: serving.clone() })
            .max_decoding_message_size(client_message_max)
            .max_encoding_message_size(usize::MAX),
        AuthServer::new(AuthApi { node: node.clone() }).max_decoding_message_size(64 * 1024),
        S3AdminServer::new(S3AdminApi { node: node.clone() })
            .max_decoding_message_size(64 * 1024)
            .max_encoding_message_size(usize::MAX),
    )
}

/// The gate every call to this node passes: the cluster secret and node certificates for
/// peers, tokens for clients.
pub fn authenticator(node: &MetaNode) -> Authenticator {
    Authenticator::new(node.config.secret.as_deref(), node.state.clone(), node.catch_up_queue())
}

fn encode_reply<T: Serialize>(value: &T) -> Result<Response<pb::RaftPayload>, Status> {
    let data = schema::encode(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(pb::RaftPayload { data }))
}

fn decode_payload<T: for<'de> serde::Deserialize<'de>>(payload: &pb::RaftPayload, what: &str) -> Result<T, Status> {
    schema::decode(&payload.data).map_err(|e| Status::invalid_argument(format!("malformed {what} payload: {e}")))
}

pub struct NodeApi {
    node: MetaNode,
    /// The snapshot being received, checked as its chunks arrive.
    receiving: std::sync::Mutex<Option<SnapshotReceiver>>,
    /// Cancelled when the node stops serving (see [`services`]).
    serving: CancellationToken,
}

/// Largest snapshot a node accepts from a peer. The bytes go to a file as they arrive (openraft
/// writes them), and only one row is held in memory to check them, so this bounds the disk a
/// peer can make a node fill, not its memory.
const SNAPSHOT_BYTES_MAX: u64 = 64 << 30;

/// Checks the snapshot a peer is sending as its chunks arrive, so that its last chunk is handed
/// to openraft only once the whole snapshot parses and its hash matches: openraft treats a
/// snapshot that fails to install as a fatal storage error and stops Raft, so one bad snapshot
/// would stop the node.
pub(crate) struct SnapshotReceiver {
    id: String,
    received: u64,
    parser: SnapshotParser,
    /// The last chunk's offset and hash, to recognize it when it is sent again (a retry after
    /// a lost answer), since openraft then writes its bytes again.
    last_chunk: (u64, blake3::Hash),
}

/// What the receiver makes of one chunk.
#[derive(Debug, PartialEq)]
enum ChunkVerdict {
    /// More chunks are to come; hand this one to openraft.
    Continue,
    /// The last chunk of a snapshot that checked out whole.
    Complete,
}

/// Admits a snapshot chunk only where the bytes received so far end, as a resend of the last
/// chunk, or at 0 (a sender starting over), so the snapshot grows only by what a sender
/// actually sends, up to `SNAPSHOT_BYTES_MAX`, and every byte openraft writes is one checked
/// here. openraft seeks to any offset it is given: a chunk at 2^44 would make it write there.
fn receive_snapshot_chunk(
    receiving: &mut Option<SnapshotReceiver>,
    id: &str,
    offset: u64,
    chunk: &[u8],
    done: bool,
    max_bytes: u64,
) -> Result<ChunkVerdict, String> {
    let end =
        offset.checked_add(chunk.len() as u64).ok_or_else(|| format!("snapshot chunk at offset {offset} overflows"))?;
    if end > max_bytes {
        *receiving = None;
        return Err(format!("snapshot {id} would exceed the {max_bytes}-byte limit (a chunk ends at byte {end})"));
    }
    let chunk_hash = blake3::hash(chunk);
    let current = match receiving {
        Some(current) if current.id == id && offset != 0 => current,
        _ => {
            if offset != 0 {
                return Err(format!("snapshot {id}: its first chunk is at offset {offset}, not 0"));
            }
            receiving.insert(SnapshotReceiver {
                id: id.to_string(),
                received: 0,
                parser: SnapshotParser::default(),
                last_chunk: (u64::MAX, chunk_hash),
            })
        }
    };
    if offset == current.received {
        let checked = current.parser.feed(chunk, |_| Ok(()));
        if let Err(e) = checked {
            *receiving = None;
            return Err(format!("snapshot {id}: {e}"));
        }
        current.received = end;
        current.last_chunk = (offset, chunk_hash);
    } else if current.last_chunk != (offset, chunk_hash) || end != current.received {
        return Err(format!(
            "snapshot {id}: a chunk at offset {offset} is neither the next one (at {}) nor the last one again",
            current.received
        ));
    }
    if !done {
        return Ok(ChunkVerdict::Continue);
    }
    let finished = receiving.take().map(|receiver| receiver.parser.finish());
    match finished {
        Some(Ok(())) => Ok(ChunkVerdict::Complete),
        Some(Err(e)) => Err(format!("snapshot {id}: {e}")),
        None => Err(format!("snapshot {id}: nothing received")),
    }
}

/// The receiver with a 1 MiB limit, for `crafted`: the bytes received once the chunk is in.
pub(crate) fn receive_snapshot_chunk_for_tests(
    receiving: &mut Option<SnapshotReceiver>,
    offset: u64,
    chunk: &[u8],
    done: bool,
) -> Result<usize, String> {
    match receive_snapshot_chunk(receiving, "s", offset, chunk, done, 1 << 20)? {
        ChunkVerdict::Continue => Ok(receiving.as_ref().map_or(0, |receiver| receiver.received as usize)),
        ChunkVerdict::Complete => Ok(offset as usize + chunk.len()),
    }
}

impl NodeApi {
    /// Notes the caller's monotonic clock from its call (see `clock::PeerClocks`); returns the
    /// moment the call was received.
    fn observe_clock<T>(&self, request: &Request<T>) -> Instant {
        let received = Instant::now();
        let header = |name: &str| request.metadata().get(name).and_then(|value| value.to_str().ok());
        let peer = header(NODE_ID_HEADER).and_then(|id| id.parse::<crate::NodeId>().ok());
        let sent = header(clock::CLOCK_HEADER).and_then(clock::parse_header);
        if let (Some(peer), Some((incarnation, monotonic_ms))) = (peer, sent) {
            self.node.peer_clocks.observe(peer, clock::PeerInstant { incarnation, monotonic_ms }, received);
        }
        received
    }
}

/// A follower's answers on one `Node/AppendStream`, one per AppendEntries received.
type AppendStream = Pin<Box<dyn Stream<Item = Result<pb::RaftPayload, Status>> + Send>>;

/// Answers a leader's AppendEntries as they arrive on one stream, in order, each before the
/// next is read: what `append_entries` does for each unary call, with the leader's clock taken
/// from the message. The stream ends when the leader closes it, or after answering a message
/// that cannot be decoded with an error.
fn answer_appends(
    node: MetaNode,
    leader: crate::NodeId,
    inbound: Streaming<pb::AppendStreamRequest>,
    serving: CancellationToken,
) -> AppendStream {
    Box::pin(futures::stream::unfold(Some((node, inbound)), move |state| {
        let serving = serving.clone();
        async move {
            let (node, mut inbound) = state?;
            let message = tokio::select! {
                received = inbound.message() => received,
                // The node stops serving: the leader reopens the stream on another life of
                // this node, or sends unary calls meanwhile.
                () = serving.cancelled() => return None,
            };
            let message = match message {
                Ok(Some(message)) => message,
                // Closed by the leader, or broken (the leader went away): nothing to answer.
                Ok(None) | Err(_) => return None,
            };
            let received = Instant::now();
            let sent =
                clock::PeerInstant { incarnation: message.clock_incarnation, monotonic_ms: message.clock_monotonic_ms };
            node.peer_clocks.observe(leader, sent, received);
            let rpc = match schema::decode(&message.data) {
                Ok(rpc) => rpc,
                Err(e) => {
                    let refused = Status::invalid_argument(format!("malformed append-entries payload: {e}"));
                    return Some((Err(refused), None));
                }
            };
            let answer = encode_reply(&node.raft.append_entries(rpc).await).map(Response::into_inner);
            let next = answer.is_ok().then_some((node, inbound));
            Some((answer, next))
        }
    }))
}

#[tonic::async_trait]
impl Node for NodeApi {
    async fn append_entries(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        // Heartbeats included: a follower always has a fresh reading of its leader's clock.
        self.observe_clock(&request);
        let rpc = decode_payload(request.get_ref(), "append-entries")?;
        encode_reply(&self.node.raft.append_entries(rpc).await)
    }

    type AppendStreamStream = AppendStream;

    async fn append_stream(
        &self,
        request: Request<Streaming<pb::AppendStreamRequest>>,
    ) -> Result<Response<AppendStream>, Status> {
        // The caller's cluster id was checked against ours as the stream opened, and only then
        // (see `auth`); a check that found one of them missing proves nothing for what comes
        // later, so such a caller keeps to unary calls, each checked.
        let header = |name: &str| request.metadata().get(name).and_then(|value| value.to_str().ok());
        if header(CLUSTER_ID_HEADER).is_none() || self.node.state.cluster_id().is_none() {
            return Err(Status::failed_precondition(
                "an append stream needs the cluster id on both ends; send AppendEntries calls until then",
            ));
        }
        let leader = header(NODE_ID_HEADER)
            .and_then(|id| id.parse::<crate::NodeId>().ok())
            .ok_or_else(|| Status::invalid_argument("an append stream needs the caller's node id"))?;
        self.observe_clock(&request);
        Ok(Response::new(answer_appends(self.node.clone(), leader, request.into_inner(), self.serving.clone())))
    }

    async fn vote(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        self.observe_clock(&request);
        let rpc = decode_payload(request.get_ref(), "vote")?;
        encode_reply(&self.node.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        let rpc: openraft::raft::InstallSnapshotRequest<crate::TypeConfig> =
            decode_payload(request.get_ref(), "install-snapshot")?;
        let verdict = {
            let mut receiving = self.receiving.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            receive_snapshot_chunk(
                &mut receiving,
                rpc.meta.snapshot_id.as_str(),
                rpc.offset,
                &rpc.data,
                rpc.done,
                SNAPSHOT_BYTES_MAX,
            )
        };
        if let Err(refused) = verdict {
            tracing::warn!(snapshot = %rpc.meta.snapshot_id, "refused a snapshot chunk: {refused}");
            return Err(Status::invalid_argument(refused));
        }
        encode_reply(&self.node.raft.install_snapshot(rpc).await)
    }

    async fn forward(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        let received = self.observe_clock(&request);
        let envelope = ForwardEnvelope::decode(&request.get_ref().data)
            .map_err(|e| Status::invalid_argument(format!("malformed forwarded request payload: {e}")))?;
        // A request that waited past its sender's deadline (in a paused process's socket, say)
        // is refused: the sender has already reported a failure, so applying it now would turn
        // a reported failure into a silent success.
        let result = match envelope.arrival(received) {
            Err(late_ms) => {
                tracing::warn!(late_ms, "refused a forwarded request that arrived after its deadline");
                Err(ApiError::Timeout(format!("the forwarded request arrived {late_ms} ms after its deadline")))
            }
            Ok(arrival) => {
                let origin = Origin { deadline: Some(arrival.deadline), ..Origin::FORWARDED };
                self.node.serve_on_leader_aged(envelope.request, origin, arrival.prepare_age).await
            }
        };
        encode_reply(&result)
    }

    async fn info(&self, _request: Request<pb::InfoRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        Ok(Response::new(self.node.local_info()))
    }
}

impl MetaNode {
    /// This node's Raft progress, as `Node.Info` answers it.
    pub fn local_info(&self) -> pb::NodeInfo {
        let status = self.raft_status();
        pb::NodeInfo {
            id: self.config.node_id,
            addr: self.config.advertise_addr.clone(),
            role: status.role.as_str().to_string(),
            term: status.term,
            leader: status.leader,
            last_log_index: status.last_log_index,
            applied_index: status.applied_index,
            snapshot_index: status.snapshot_index,
            purged_index: status.purged_index,
            revision: self.revision(),
            http_addr: self.config.http_addr.clone(),
        }
    }

    /// Asks the member at `addr` for its Raft progress, waiting at most `timeout`.
    pub async fn ask_info(&self, addr: &str, timeout: Duration) -> Result<pb::NodeInfo, String> {
        let ask = async {
            let mut client = self.peers.client(addr)?;
            let mut request = Request::new(pb::InfoRequest {});
            request.set_timeout(timeout);
            client.info(request).await.map(|r| r.into_inner()).map_err(|s| s.message().to_string())
        };
        // The call's own timeout covers the answer; this one covers connecting as well.
        let limit = timeout + Duration::from_millis(500);
        tokio::time::timeout(limit, ask).await.unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
    }
}

/// Whether another node forwarded the request, and until when its caller waits (its
/// `grpc-timeout`, counted from now).
pub fn request_origin<T>(request: &Request<T>) -> Origin {
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
    /// Cancelled when the node stops serving: its write streams then end between writes.
    serving: CancellationToken,
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

    /// Refused here, where the client enters, before anything is forwarded; the leader checks
    /// again (`validate`), since a forwarded request may come from elsewhere.
    fn check_key(&self, key: &[u8]) -> Result<(), ApiError> {
        crate::validate::check_key(&self.node.config, key)
    }

    fn check_value(&self, value: &[u8]) -> Result<(), ApiError> {
        crate::validate::check_value(&self.node.config, value)
    }

    async fn command(&self, origin: Origin, id: Option<pb::RequestId>, command: Command) -> Result<Outcome, Status> {
        Ok(self.node.client_command(origin, request_id(id), command).await?)
    }
}

/// The most writes one `Kv/Batch` call may carry. Its bytes are bounded by the message limit,
/// the same as one write's; this bounds the proposals one call queues at the leader.
pub const BATCH_OPS_MAX: usize = 256;

impl KvApi {
    /// A key write, checked as it enters, and the command that proposes it.
    fn write_command(&self, op: pb::batch_op::Op) -> Result<(Option<pb::RequestId>, Command), Status> {
        Ok(match op {
            pb::batch_op::Op::Create(put) => {
                self.check_key(&put.key)?;
                self.check_value(&put.value)?;
                (put.request_id, Command::Create { key: put.key, value: put.value, session_id: put.session_id })
            }
            pb::batch_op::Op::Set(put) => {
                self.check_key(&put.key)?;
                self.check_value(&put.value)?;
                let command = Command::Set {
                    key: put.key,
                    value: put.value,
                    expected_version: put.expected_version,
                    session_id: put.session_id,
                };
                (put.request_id, command)
            }
            pb::batch_op::Op::Delete(delete) => {
                self.check_key(&delete.key)?;
                (delete.request_id, Command::Delete { key: delete.key, expected_version: delete.expected_version })
            }
        })
    }

    /// A key write through the leader: its reply, or the status its call fails with.
    async fn write(&self, origin: Origin, op: pb::batch_op::Op) -> Result<Response<pb::WriteReply>, Status> {
        let (request_id, command) = self.write_command(op)?;
        write_reply(self.command(origin, request_id, command).await?)
    }

    /// One write of a batch, checked and proposed as its own call would be.
    async fn batch_op(&self, origin: Origin, op: pb::BatchOp) -> Result<pb::WriteReply, Status> {
        let op = op.op.ok_or_else(|| Status::invalid_argument("a batch op names no write (create, set or delete)"))?;
        Ok(self.write(origin, op).await?.into_inner())
    }
}

/// One write's outcome as `Kv/Batch` and `Kv/WriteStream` answer it: the reply, or the error
/// its own call would have failed with.
fn batch_result(outcome: Result<pb::WriteReply, Status>) -> pb::BatchResult {
    pb::BatchResult {
        result: Some(match outcome {
            Ok(written) => pb::batch_result::Result::Written(written),
            Err(status) => pb::batch_result::Result::Error(batch_error(&status)),
        }),
    }
}

/// A failed op of a batch as its own call's status would have carried it.
fn batch_error(status: &Status) -> pb::BatchError {
    let header = |name: &str| status.metadata().get(name).and_then(|value| value.to_str().ok());
    let version = |name: &str| header(name).and_then(|value| value.parse().ok());
    pb::BatchError {
        code: status.code() as i32,
        message: status.message().to_string(),
        kind: header(mendfs_proto::ERROR_KIND_HEADER).unwrap_or_default().to_string(),
        expected_version: version(mendfs_proto::ERROR_EXPECTED_VERSION_HEADER),
        actual_version: version(mendfs_proto::ERROR_ACTUAL_VERSION_HEADER),
    }
}

/// What serves the writes of one `Kv/WriteStream`.
struct StreamedWrites {
    api: KvApi,
    auth: Authenticator,
    /// The node's request counters, which the server layer hands the stream: each write is
    /// counted under its own op, as its own call would have been.
    metrics: Option<Arc<RequestMetrics>>,
    /// The leader this node knew of when the stream opened (itself, if it led).
    opened_under: Option<String>,
}

/// The path a streamed write is authorized as, like its stream.
const WRITE_STREAM_PATH: &str = "/mendfs.v1.Kv/WriteStream";

impl StreamedWrites {
    /// Once this node follows a leader other than the one it knew when the stream opened (it
    /// stepped down, or the leader it forwarded to was replaced without the forwards failing,
    /// as after a pause), the stream ends with a status naming the new leader: every write on
    /// it would take one hop more than it needs, for as long as the client keeps it open.
    fn leader_moved(&self) -> Option<Status> {
        let node = &self.api.node;
        let leader = node.leader_addr()?;
        if node.is_leader() || Some(&leader) == self.opened_under.as_ref() {
            return None;
        }
        let mut status = Status::unavailable(format!(
            "the leader is now {leader}: this write stream ends, and the client opens its next one there"
        ));
        if let Ok(value) = leader.parse() {
            status.metadata_mut().insert(LEADER_HINT_HEADER, value);
        }
        Some(status)
    }

    async fn serve(
        &self,
        write: pb::StreamedWrite,
        forwarded: bool,
        headers: &tonic::codegen::http::HeaderMap,
        connection: Option<&ConnectionInfo>,
    ) -> pb::BatchResult {
        let op = match &write.op.as_ref().and_then(|op| op.op.as_ref()) {
            Some(pb::batch_op::Op::Create(_)) => "Kv/Create",
            Some(pb::batch_op::Op::Set(_)) => "Kv/Set",
            Some(pb::batch_op::Op::Delete(_)) => "Kv/Delete",
            None => "Kv/WriteStream",
        };
        let traceparent = (!write.traceparent.is_empty()).then_some(write.traceparent.as_str());
        let span = tracing::info_span!("rpc", op, traceparent, error = tracing::field::Empty);
        let started = Instant::now();
        let origin = Origin {
            forwarded,
            deadline: (write.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(write.timeout_ms)),
        };
        let result = async {
            self.auth.authorize_caught_up(WRITE_STREAM_PATH, headers, connection).await?;
            match write.op {
                Some(op) => self.api.batch_op(origin, op).await,
                None => Err(Status::invalid_argument("a streamed write names no write (create, set or delete)")),
            }
        }
        .instrument(span.clone())
        .await;
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(status) => {
                span.record("error", format!("{:?}: {}", status.code(), status.message()));
                format!("{:?}", status.code())
            }
        };
        if let Some(metrics) = &self.metrics {
            metrics.observe_streamed(op, &outcome, started.elapsed());
        }
        batch_result(result)
    }
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
        let origin = request_origin(&request);
        self.hint(self.write(origin, pb::batch_op::Op::Create(request.into_inner())).await)
    }

    async fn set(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::WriteReply>, Status> {
        let origin = request_origin(&request);
        self.hint(self.write(origin, pb::batch_op::Op::Set(request.into_inner())).await)
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::WriteReply>, Status> {
        let origin = request_origin(&request);
        self.hint(self.write(origin, pb::batch_op::Op::Delete(request.into_inner())).await)
    }

    async fn batch(&self, request: Request<pb::BatchRequest>) -> Result<Response<pb::BatchReply>, Status> {
        let origin = request_origin(&request);
        let ops = request.into_inner().ops;
        if ops.len() > BATCH_OPS_MAX {
            return Err(Status::invalid_argument(format!(
                "a batch holds {} writes; the limit is {BATCH_OPS_MAX}",
                ops.len()
            )));
        }
        // All proposed at once, so that they reach the proposer together and share its next
        // Raft entry; each is answered on its own, and none waits for another to fail.
        let outcomes = futures::future::join_all(ops.into_iter().map(|op| self.batch_op(origin, op))).await;
        let results = outcomes.into_iter().map(batch_result).collect();
        self.hint(Ok(Response::new(pb::BatchReply { results })))
    }

    type WriteStreamStream = Pin<Box<dyn Stream<Item = Result<pb::BatchResult, Status>> + Send>>;

    /// Each write on the stream is served as a call of its own would be: authorized again with
    /// the credentials the stream was opened with (a token revoked meanwhile stops the next
    /// write, with the same freshness as a call's check), in a span of its own under the trace
    /// it names, with its own deadline. One at a time: a write is read only once the one before
    /// it is answered, so a stream holds one write's memory, however fast its client sends.
    async fn write_stream(
        &self,
        request: Request<Streaming<pb::StreamedWrite>>,
    ) -> Result<Response<Self::WriteStreamStream>, Status> {
        let forwarded = request.metadata().get(FORWARDED_HEADER).is_some();
        let connection = request.extensions().get::<ConnectionInfo>().cloned();
        let headers = request.metadata().clone().into_headers();
        let stopping = self.serving.clone();
        let serving = StreamedWrites {
            api: KvApi { node: self.node.clone(), serving: self.serving.clone() },
            auth: authenticator(&self.node),
            metrics: request.extensions().get::<Arc<RequestMetrics>>().cloned(),
            opened_under: self.node.leader_addr(),
        };
        let incoming = request.into_inner();
        let answers = futures::stream::unfold((serving, incoming), move |(serving, mut incoming)| {
            let (headers, connection, stopping) = (headers.clone(), connection.clone(), stopping.clone());
            async move {
                // Checked before the next write is read, so the write it refuses was never
                // served: the client sends it again, to the leader. Ending with an error ends
                // the stream.
                if let Some(moved) = serving.leader_moved() {
                    return Some((Err(moved), (serving, incoming)));
                }
                let next = tokio::select! {
                    next = incoming.message() => next,
                    // The node stops serving: the stream ends between writes (a write under way
                    // is answered first), so a graceful stop does not wait out its grace for a
                    // stream its client keeps open. The client opens its next one elsewhere.
                    () = stopping.cancelled() => return None,
                };
                let write = match next {
                    Ok(Some(write)) => write,
                    Ok(None) => return None,
                    // A broken or malformed stream ends here; its client retries the write.
                    Err(status) => return Some((Err(status), (serving, incoming))),
                };
                let answer = serving.serve(write, forwarded, &headers, connection.as_ref()).await;
                Some((Ok(answer), (serving, incoming)))
            }
        });
        self.hint(Ok(Response::new(Box::pin(answers) as Self::WriteStreamStream)))
    }

    async fn compact(&self, request: Request<pb::CompactRequest>) -> Result<Response<pb::CompactReply>, Status> {
        let origin = request_origin(&request);
        let revision = match request.into_inner().revision {
            0 => self.node.revision(),
            revision => revision,
        };
        match self.command(origin, None, Command::Compact { revision }).await? {
            Outcome::Compacted { revision } => {
                self.hint(Ok(Response::new(pb::CompactReply { compacted_revision: revision })))
            }
            other => Err(Status::internal(format!("unexpected compact outcome {other:?}"))),
        }
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetReply>, Status> {
        let origin = request_origin(&request);
        let get = request.into_inner();
        self.check_key(&get.key)?;
        let (revision, kv) = self.node.get_key(origin, get.key).await?;
        self.hint(Ok(Response::new(pb::GetReply { revision, kv: kv.map(to_pb_kv) })))
    }

    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListReply>, Status> {
        let origin = request_origin(&request);
        let list = request.into_inner();
        if !list.prefix.is_empty() {
            self.check_key(&list.prefix)?;
        }
        // A continuation is the last key listed plus a zero byte: one byte over the key limit.
        if list.start_key.len() > self.node.config.max_key_bytes + 1 {
            return Err(Status::invalid_argument(format!(
                "the start key is {} bytes; the limit is max_key_bytes + 1 ({} bytes)",
                list.start_key.len(),
                self.node.config.max_key_bytes + 1
            )));
        }
        let (revision, kvs, truncated) = self.node.list_keys(origin, list.prefix, list.start_key, list.limit).await?;
        self.hint(Ok(Response::new(pb::ListReply {
            revision,
            kvs: kvs.into_iter().map(to_pb_kv).collect(),
            truncated,
        })))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let watch = request.into_inner();
        if watch.key.len() > self.node.config.max_key_bytes || (watch.key.is_empty() && !watch.prefix) {
            return Err(Status::invalid_argument("a watch needs a key of at most max_key_bytes bytes (or a prefix)"));
        }
        let reader = self.node.state.clone();
        let view = reader.view().map_err(|e| Status::internal(e.to_string()))?;
        let current = schema::current_revision(&view).map_err(|e| Status::internal(e.to_string()))?;
        let compacted = schema::compacted_revision(&view).map_err(|e| Status::internal(e.to_string()))?;
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
        let origin = request_origin(&request);
        let open = request.into_inner();
        crate::validate::check_command(&self.node.config, &Command::SessionOpen { ttl_ms: open.ttl_ms })?;
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
        let origin = request_origin(&request);
        let session_id = request.into_inner().session_id;
        let ttl_ms = self.node.keep_alive(origin, session_id).await?;
        Ok(Response::new(pb::SessionKeepAliveReply { ttl_ms }))
    }

    async fn session_close(
        &self,
        request: Request<pb::SessionCloseRequest>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        let origin = request_origin(&request);
        let close = request.into_inner();
        let command = Command::SessionClose { session_id: close.session_id };
        self.hint(write_reply(self.command(origin, close.request_id, command).await?))
    }
}

/// Streams every change from `next` on, in revision order, with no gaps and no repeats:
/// history first, then each new revision as it is applied. Ends when the client goes away.
pub struct AuthApi {
    node: MetaNode,
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenReply>, Status> {
        let origin = request_origin(&request);
        let request = request.into_inner();
        let role: Role = request.role.parse().map_err(Status::invalid_argument)?;
        let token = self.node.create_token(origin, request.name.clone(), role).await?;
        tracing::info!(name = %request.name, role = role.as_str(), "created a token");
        Ok(Response::new(pb::CreateTokenReply { name: request.name, role: role.as_str().into(), token }))
    }

    async fn list_tokens(
        &self,
        _request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensReply>, Status> {
        let tokens = self.node.list_tokens().await?;
        Ok(Response::new(pb::ListTokensReply {
            tokens: tokens
                .into_iter()
                .map(|(name, record, expires_unix_ms)| pb::TokenInfo {
                    name,
                    role: record.role.as_str().into(),
                    created_unix_ms: record.created_unix_ms,
                    expires_unix_ms,
                })
                .collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenReply>, Status> {
        let origin = request_origin(&request);
        let name = request.into_inner().name;
        let revoked = self.node.revoke_token(origin, name.clone()).await?;
        tracing::info!(%name, revoked, "revoked a token");
        Ok(Response::new(pb::RevokeTokenReply { revoked }))
    }

    async fn create_login_link(
        &self,
        request: Request<pb::CreateLoginLinkRequest>,
    ) -> Result<Response<pb::CreateLoginLinkReply>, Status> {
        let origin = request_origin(&request);
        let request = request.into_inner();
        // A link opens a read session (the dashboard only reads); the apply refuses others.
        let role: Role = if request.role.is_empty() {
            Role::Read
        } else {
            request.role.parse().map_err(Status::invalid_argument)?
        };
        let secs = |secs: u64, max_ms: u64, what: &str| {
            if secs == 0 || secs.saturating_mul(1_000) > max_ms {
                Err(Status::invalid_argument(format!("{what} must be 1 s to {} h", max_ms / 3_600_000)))
            } else {
                Ok(Duration::from_secs(secs))
            }
        };
        let link_ttl = secs(request.link_ttl_secs, crate::login::LOGIN_CODE_TTL_MAX_MS, "the link's lifetime")?;
        let session_ttl =
            secs(request.session_ttl_secs, crate::login::LOGIN_SESSION_TTL_MAX_MS, "the session's lifetime")?;
        let code = self.node.create_login_code(origin, role, link_ttl, session_ttl).await?;
        let expires_unix_ms = mendfs_types::unix_now_ms().saturating_add(link_ttl.as_millis() as u64);
        tracing::info!(role = role.as_str(), link_ttl_secs = request.link_ttl_secs, "created a dashboard login link");
        Ok(Response::new(pb::CreateLoginLinkReply {
            code,
            http_addr: self.node.config().http_addr.clone(),
            expires_unix_ms,
        }))
    }

    async fn who_am_i(&self, request: Request<pb::WhoAmIRequest>) -> Result<Response<pb::WhoAmIReply>, Status> {
        let caller = crate::auth::caller_of(&request);
        Ok(Response::new(pb::WhoAmIReply { identity: caller.identity(), role: caller.role_name().into() }))
    }
}

/// S3 access keys and buckets, for the operator. Every method needs the admin role (see
/// `auth::required_access`).
pub struct S3AdminApi {
    node: MetaNode,
}

/// Access key ids: `MK` and 18 more of upper-case letters and digits (AWS's are `AKIA...`).
pub const ACCESS_KEY_ID_LEN: usize = 20;
pub const ACCESS_KEY_ID_PREFIX: &str = "MK";
/// Secret access keys: 40 of `A-Z a-z 0-9`, about 238 random bits.
pub const SECRET_KEY_LEN: usize = 40;

/// A new random access key id.
pub fn generate_access_key_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    let mut id = String::with_capacity(ACCESS_KEY_ID_LEN);
    id.push_str(ACCESS_KEY_ID_PREFIX);
    while id.len() < ACCESS_KEY_ID_LEN {
        id.push(char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]));
    }
    id
}

/// A new random secret access key.
pub fn generate_secret_key() -> String {
    use rand::Rng;
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(SECRET_KEY_LEN).map(char::from).collect()
}

/// Access key names are labels an operator types, like token names: 1–64 of
/// `A-Z a-z 0-9 . _ -`.
pub fn validate_access_key_name(name: &str) -> Result<(), String> {
    crate::auth::validate_token_name(name).map_err(|_| {
        format!("access key name {name:?} must be 1 to {} of A-Z a-z 0-9 . _ -", crate::auth::TOKEN_NAME_BYTES_MAX)
    })
}

#[tonic::async_trait]
impl S3Admin for S3AdminApi {
    async fn create_key(
        &self,
        request: Request<pb::S3CreateKeyRequest>,
    ) -> Result<Response<pb::S3CreateKeyReply>, Status> {
        let origin = request_origin(&request);
        let request = request.into_inner();
        validate_access_key_name(&request.name).map_err(Status::invalid_argument)?;
        let (key_id, secret) = (generate_access_key_id(), generate_secret_key());
        let record = crate::s3::AccessKeyRecord {
            name: request.name.clone(),
            secret: secret.clone(),
            create_buckets: request.create_buckets,
            created_ms: unix_now_ms(),
        };
        self.node.s3_put_access_key(origin, key_id.clone(), record).await?;
        tracing::info!(%key_id, name = %request.name, create_buckets = request.create_buckets, "created an S3 access key");
        Ok(Response::new(pb::S3CreateKeyReply { key_id, secret }))
    }

    async fn list_keys(
        &self,
        request: Request<pb::S3ListKeysRequest>,
    ) -> Result<Response<pb::S3ListKeysReply>, Status> {
        let keys = self.node.s3_access_keys(request_origin(&request)).await?;
        let keys = keys
            .into_iter()
            .map(|key| pb::S3KeyInfo {
                key_id: key.key_id,
                name: key.name,
                create_buckets: key.create_buckets,
                created_ms: key.created_ms,
                grants: key
                    .grants
                    .into_iter()
                    .map(|(bucket, grant)| pb::S3BucketGrant {
                        bucket,
                        read: grant.read,
                        write: grant.write,
                        owner: grant.owner,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::S3ListKeysReply { keys }))
    }

    async fn delete_key(
        &self,
        request: Request<pb::S3DeleteKeyRequest>,
    ) -> Result<Response<pb::S3DeleteKeyReply>, Status> {
        let origin = request_origin(&request);
        let key_id = request.into_inner().key_id;
        self.node.s3_delete_access_key(origin, key_id.clone()).await?;
        tracing::info!(%key_id, "deleted an S3 access key");
        Ok(Response::new(pb::S3DeleteKeyReply {}))
    }

    async fn allow(&self, request: Request<pb::S3AllowRequest>) -> Result<Response<pb::S3AllowReply>, Status> {
        let origin = request_origin(&request);
        let allow = request.into_inner();
        let grant = crate::s3::Grant { read: allow.read, write: allow.write, owner: allow.owner };
        self.node.s3_set_grant(origin, allow.key_id.clone(), allow.bucket.clone(), grant).await?;
        tracing::info!(key_id = %allow.key_id, bucket = %allow.bucket, ?grant, "set an S3 grant");
        Ok(Response::new(pb::S3AllowReply {}))
    }

    async fn create_bucket(
        &self,
        request: Request<pb::S3CreateBucketRequest>,
    ) -> Result<Response<pb::S3CreateBucketReply>, Status> {
        let origin = request_origin(&request);
        let create = request.into_inner();
        crate::s3::validate_bucket_name(&create.bucket).map_err(Status::invalid_argument)?;
        let owner = create.owner.filter(|owner| !owner.is_empty());
        if let Some(owner) = &owner {
            // The state machine would grant a key that does not exist; an operator's typo is
            // refused instead.
            if self.node.s3_access_key(owner).await?.is_none() {
                return Err(
                    ApiError::from(crate::schema::CommandError::NoSuchAccessKey { key_id: owner.clone() }).into()
                );
            }
        }
        self.node.s3_create_bucket(origin, create.bucket.clone(), owner.clone()).await?;
        tracing::info!(bucket = %create.bucket, owner = owner.as_deref().unwrap_or(""), "created an S3 bucket");
        Ok(Response::new(pb::S3CreateBucketReply {}))
    }

    async fn list_buckets(
        &self,
        request: Request<pb::S3ListBucketsRequest>,
    ) -> Result<Response<pb::S3ListBucketsReply>, Status> {
        let buckets = self.node.s3_buckets(request_origin(&request)).await?;
        let buckets = buckets
            .into_iter()
            .map(|(name, record)| pb::S3BucketInfo { name, created_ms: record.created_ms })
            .collect();
        Ok(Response::new(pb::S3ListBucketsReply { buckets }))
    }

    async fn delete_bucket(
        &self,
        request: Request<pb::S3DeleteBucketRequest>,
    ) -> Result<Response<pb::S3DeleteBucketReply>, Status> {
        let origin = request_origin(&request);
        let bucket = request.into_inner().bucket;
        self.node.s3_delete_bucket(origin, bucket.clone()).await?;
        tracing::info!(%bucket, "deleted an S3 bucket");
        Ok(Response::new(pb::S3DeleteBucketReply {}))
    }
}

async fn run_watch(
    reader: StateReader,
    key: Vec<u8>,
    is_prefix: bool,
    mut next: u64,
    tx: mpsc::Sender<Result<pb::WatchReply, Status>>,
) {
    let mut applied = reader.subscribe();
    loop {
        // Reading up to 4 MiB of history is disk work: off the async workers.
        let (step_reader, step_key) = (reader.clone(), key.clone());
        let batch = tokio::task::spawn_blocking(move || {
            let view = step_reader.view().map_err(|e| e.to_string())?;
            let compacted = schema::compacted_revision(&view).map_err(|e| e.to_string())?;
            if next <= compacted {
                return Err(format!(
                    "the watcher fell behind: revision {next} has been compacted (oldest kept: {})",
                    compacted + 1
                ));
            }
            kv::events_between(&view, next, WATCH_BATCH_REVISIONS, &step_key, is_prefix).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("reading the history failed: {e}")));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_bytes(rows: usize) -> Vec<u8> {
        let mut writer = SnapshotWriter::new(Vec::new(), b"meta").expect("header");
        for row in 0..rows {
            writer.row(crate::schema::Table::Keys, &row.to_be_bytes(), &[row as u8; 40]).expect("row");
        }
        writer.finish().expect("end")
    }

    #[test]
    fn snapshot_chunks_must_follow_the_bytes_received() {
        use ChunkVerdict::*;
        let max = 1 << 20;
        let data = snapshot_bytes(10);
        let mut receiving = None;
        let chunk = |receiving: &mut Option<SnapshotReceiver>, id: &str, offset: usize, end: usize, done: bool| {
            receive_snapshot_chunk(receiving, id, offset as u64, &data[offset..end], done, max)
        };
        assert!(chunk(&mut receiving, "s1", 5, 10, false).unwrap_err().contains("not 0"));
        assert_eq!(chunk(&mut receiving, "s1", 0, 100, false), Ok(Continue));
        assert_eq!(chunk(&mut receiving, "s1", 100, 200, false), Ok(Continue), "the next chunk");
        assert_eq!(chunk(&mut receiving, "s1", 100, 200, false), Ok(Continue), "a resent chunk");
        let refused = chunk(&mut receiving, "s1", 150, 250, false).unwrap_err();
        assert!(refused.contains("neither the next"), "an overlapping chunk: {refused}");
        let refused = receive_snapshot_chunk(&mut receiving, "s1", 100, &[9; 100], false, max).unwrap_err();
        assert!(refused.contains("neither the next"), "a resend with other bytes: {refused}");
        // The crafted chunk: same snapshot, far past what arrived.
        let refused = receive_snapshot_chunk(&mut receiving, "s1", 1 << 44, &[1], false, max).unwrap_err();
        assert!(refused.contains("limit"), "{refused}");
        assert!(receiving.is_none());
        assert_eq!(chunk(&mut receiving, "s1", 0, 100, false), Ok(Continue));
        assert!(chunk(&mut receiving, "s1", 300, 400, false).unwrap_err().contains("neither the next"));
        assert!(receive_snapshot_chunk(&mut receiving, "s1", u64::MAX, &[1, 2], false, max)
            .unwrap_err()
            .contains("overflows"));
        // Starting over at 0 is allowed (a sender that retries the whole snapshot).
        assert_eq!(chunk(&mut receiving, "s1", 0, 50, false), Ok(Continue));
        assert_eq!(chunk(&mut receiving, "s1", 50, data.len(), true), Ok(Complete));
        assert!(receiving.is_none(), "a completed snapshot is no longer tracked");
        // A snapshot cut short, or damaged, is refused at its last chunk.
        assert_eq!(chunk(&mut receiving, "s2", 0, 100, false), Ok(Continue));
        assert!(chunk(&mut receiving, "s2", 100, data.len() - 1, true).unwrap_err().contains("cut short"));
        let mut damaged = data.clone();
        damaged[60] ^= 1;
        let refused = receive_snapshot_chunk(&mut receiving, "s3", 0, &damaged, true, max).unwrap_err();
        assert!(refused.contains("hash"), "{refused}");
        let refused = receive_snapshot_chunk(&mut receiving, "s4", 0, &[7; 30], true, max).unwrap_err();
        assert!(refused.contains("magic"), "{refused}");
    }

    #[test]
    fn a_snapshot_in_any_chunks_with_resends_is_accepted_whole() {
        proptest::proptest!(|(rows in 0usize..60, cuts in proptest::collection::vec(1usize..300, 0..12),
                              resend in proptest::collection::vec(proptest::bool::ANY, 12))| {
            let data = snapshot_bytes(rows);
            let mut receiving = None;
            let mut sent = 0usize;
            for (index, cut) in cuts.iter().enumerate() {
                let end = (sent + cut).min(data.len() - 1);
                if end <= sent { break; }
                for _ in 0..=usize::from(resend[index]) {
                    let verdict = receive_snapshot_chunk(&mut receiving, "s", sent as u64, &data[sent..end], false, 1 << 20);
                    proptest::prop_assert_eq!(verdict, Ok(ChunkVerdict::Continue));
                }
                sent = end;
            }
            let verdict = receive_snapshot_chunk(&mut receiving, "s", sent as u64, &data[sent..], true, 1 << 20);
            proptest::prop_assert_eq!(verdict, Ok(ChunkVerdict::Complete));
        });
    }

    #[test]
    fn access_key_ids_and_secrets_are_random_and_well_formed() {
        let (a, b) = (generate_access_key_id(), generate_access_key_id());
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert_eq!(id.len(), ACCESS_KEY_ID_LEN, "{id}");
            assert!(id.starts_with(ACCESS_KEY_ID_PREFIX), "{id}");
            assert!(id.bytes().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()), "{id}");
        }
        let (a, b) = (generate_secret_key(), generate_secret_key());
        assert_ne!(a, b);
        for secret in [&a, &b] {
            assert_eq!(secret.len(), SECRET_KEY_LEN, "{secret}");
            assert!(secret.bytes().all(|c| c.is_ascii_alphanumeric()), "{secret}");
        }
        assert!(validate_access_key_name("backup-job.1").is_ok());
        for bad in ["", "a b", "x/y", &"n".repeat(65)] {
            let refused = validate_access_key_name(bad).unwrap_err();
            assert!(refused.contains("access key name"), "{refused}");
        }
    }

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
        assert_eq!(request_origin(&request), Origin::LOCAL);
        request.set_timeout(Duration::from_secs(5));
        request.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::AsciiMetadataValue::from_static("1"));
        let before = Instant::now();
        let origin = request_origin(&request);
        assert!(origin.forwarded);
        let deadline = origin.deadline.expect("a deadline from grpc-timeout");
        assert!(deadline > before + Duration::from_secs(4) && deadline <= Instant::now() + Duration::from_secs(5));
    }
}
