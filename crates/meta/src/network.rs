//! Node-to-node transport: openraft's RPCs and forwarded requests over gRPC.
//!
//! Raft messages are postcard-encoded openraft structures inside a protobuf `RaftPayload`;
//! every call carries the cluster secret, this node's id and its cluster id (see `service` for the
//! checks on the receiving side).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mendfs_proto::v1::node_client::NodeClient;
use mendfs_proto::v1::{AppendStreamRequest, RaftPayload};
use mendfs_proto::{CLUSTER_ID_HEADER, NODE_ID_HEADER, SECRET_HEADER};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{AnyError, BasicNode, LogId, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::raft_store::StateReader;
use crate::schema::{decode, encode};
use crate::write_metrics::WriteMetrics;
use crate::{NodeId, TypeConfig};
use mendfs_telemetry::metrics::Histogram;

/// How long to wait for a TCP connection to a peer before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1_000);

/// Checks that a node address is `HOST:PORT`, where HOST is an IP address or a DNS name
/// (containers and Kubernetes pods are reached by stable names, not by IPs that change on
/// restart). The name is resolved when a connection is made, again on every reconnect.
pub fn validate_node_addr(addr: &str) -> Result<(), String> {
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("node address {addr:?} is not HOST:PORT"))?;
    port.parse::<u16>().map_err(|_| format!("node address {addr:?}: port {port:?} is not a number from 0 to 65535"))?;
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !name_ok {
        return Err(format!("node address {addr:?}: {host:?} is neither an IP address nor a DNS name"));
    }
    Ok(())
}

/// Adds the cluster secret, this node's id and its cluster id to every outgoing call.
#[derive(Clone)]
pub struct PeerInterceptor {
    secret: Option<tonic::metadata::AsciiMetadataValue>,
    node_id: tonic::metadata::AsciiMetadataValue,
    state: StateReader,
}

impl Interceptor for PeerInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(secret) = &self.secret {
            request.metadata_mut().insert(SECRET_HEADER, secret.clone());
        }
        request.metadata_mut().insert(NODE_ID_HEADER, self.node_id.clone());
        // So that the callee learns this process's monotonic clock (see `clock::PeerClocks`).
        if let Ok(value) = crate::clock::header_value(std::time::Instant::now()).parse() {
            request.metadata_mut().insert(crate::clock::CLOCK_HEADER, value);
        }
        if let Some(cluster_id) = self.state.cluster_id().and_then(|id| id.parse().ok()) {
            request.metadata_mut().insert(CLUSTER_ID_HEADER, cluster_id);
        }
        // Only calls made while serving a traced request (or a traced repair or scrub) carry a
        // context; Raft's own replication and elections run outside any span and stay untraced.
        if let Some(context) = mendfs_telemetry::layer::current_context() {
            mendfs_telemetry::grpc::inject(request.metadata_mut(), Some(context));
        }
        Ok(request)
    }
}

pub(crate) type PeerClient = NodeClient<InterceptedService<Channel, PeerInterceptor>>;

/// Lazily connected channels to peers, one per address, shared by Raft replication and
/// request forwarding (gRPC multiplexes calls over one HTTP/2 connection).
#[derive(Clone)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    interceptor: PeerInterceptor,
    /// With TLS, peers are reached over `https://` and this node shows its certificate.
    tls: Option<ClientTlsConfig>,
}

impl Peers {
    pub fn new(
        node_id: NodeId,
        secret: Option<&str>,
        tls: Option<&crate::node::PeerTls>,
        state: StateReader,
    ) -> Result<Self, String> {
        let secret = secret
            .map(|secret| secret.parse().map_err(|_| "the cluster secret must be printable ASCII".to_string()))
            .transpose()?;
        let node_id = tonic::metadata::AsciiMetadataValue::from(node_id);
        let tls = tls.map(|tls| {
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
        });
        Ok(Self { channels: Arc::default(), interceptor: PeerInterceptor { secret, node_id, state }, tls })
    }

    /// The shared channel to `addr`, for other node-to-node services.
    pub fn channel(&self, addr: &str) -> Result<Channel, String> {
        let channel = {
            let mut channels = self.channels.lock().map_err(|_| "peer table poisoned".to_string())?;
            match channels.get(addr) {
                Some(channel) => channel.clone(),
                None => {
                    let scheme = if self.tls.is_some() { "https" } else { "http" };
                    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
                        .map_err(|e| format!("bad peer address {addr:?}: {e}"))?;
                    if let Some(tls) = &self.tls {
                        endpoint = endpoint.tls_config(tls.clone()).map_err(|e| format!("TLS to {addr}: {e}"))?;
                    }
                    let endpoint = endpoint
                        .connect_timeout(CONNECT_TIMEOUT)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(5))
                        .keep_alive_timeout(Duration::from_secs(5));
                    let channel = endpoint.connect_lazy();
                    channels.insert(addr.to_string(), channel.clone());
                    channel
                }
            }
        };
        Ok(channel)
    }

    /// Adds the secret and cluster id to calls on a channel from [`Peers::channel`].
    pub fn interceptor(&self) -> PeerInterceptor {
        self.interceptor.clone()
    }

    pub(crate) fn client(&self, addr: &str) -> Result<PeerClient, String> {
        let channel = self.channel(addr)?;
        Ok(NodeClient::with_interceptor(channel, self.interceptor.clone())
            .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX))
    }
}

/// The largest message between two nodes, either way. What travels is bounded below it: an
/// `AppendEntries` holds at most 4 entries of 1 MiB plus one proposal (a value is at most
/// 8 MiB, `--max-value-bytes`), a snapshot chunk is 3 MiB, a
/// forwarded proposal is one client write or one segment of a file's chunk list, and a leader's
/// answer is a page. A peer (or a bug) that sends more is refused before the bytes are buffered
/// (an unbounded 64 MiB forward once took a leader long enough to decode that it lost its term).
pub const PEER_MESSAGE_BYTES_MAX: usize = 64 << 20;

pub struct NetworkFactory {
    pub peers: Peers,
    /// This node's log durability: a leader announces no commit beyond it.
    pub durable_log: tokio::sync::watch::Receiver<crate::raft_store::DurableLog>,
    /// How soon openraft tries an unreachable peer again (see `PeerConnection::backoff`).
    pub retry_unreachable_every: Duration,
    pub metrics: Arc<WriteMetrics>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerConnection {
            target,
            client: self.peers.client(&node.addr),
            durable_log: self.durable_log.clone(),
            retry_unreachable_every: self.retry_unreachable_every,
            confirmed: None,
            deferred: None,
            stream: None,
            unary_until: None,
            append_seconds: self.metrics.peer_append(target),
        }
    }
}

/// How long an AppendEntries that carries no entries may wait for a message with entries to
/// the same follower, which would carry its commit index too (see
/// [`PeerConnection::append_entries`]). This is how much later, at most, a follower of an idle
/// leader learns a commit: its applies, watches and reads lag the leader by that much more.
const EMPTY_APPEND_DELAY: Duration = Duration::from_millis(2);

/// How long into an outage an unreachable peer is still tried every heartbeat interval.
const FAST_RETRY_FOR: Duration = Duration::from_secs(2);
/// How often an unreachable peer is tried after that (openraft's own default).
const SLOW_RETRY_EVERY: Duration = Duration::from_millis(500);

pub struct PeerConnection {
    target: NodeId,
    client: Result<PeerClient, String>,
    durable_log: tokio::sync::watch::Receiver<crate::raft_store::DurableLog>,
    retry_unreachable_every: Duration,
    /// What the follower has confirmed it holds, on this connection: the vote and last log id
    /// of the last AppendEntries sent, if it was answered with success (and no deferred one
    /// failed since). See [`may_answer_early`].
    confirmed: Option<Confirmed>,
    /// The empty AppendEntries deferred last, if any, and the task that sends it.
    deferred: Option<(tokio::task::JoinHandle<()>, Arc<DeferredAppend>)>,
    /// The follower's append stream, once open and while it works (see [`AppendStream`]).
    stream: Option<AppendStream>,
    /// Until when AppendEntries go as unary calls, after the follower did not open a stream.
    unary_until: Option<std::time::Instant>,
    /// Round trips of the AppendEntries with entries sent on this connection.
    append_seconds: Histogram,
}

/// How long AppendEntries go as unary calls after a follower did not open an append stream
/// (a node of an older version, one that has no cluster id yet, one unreachable) before the
/// stream is tried again.
const STREAM_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A leader's `Node/AppendStream` to one follower. One AppendEntries as a unary call costs both
/// ends a new HTTP/2 stream with its headers (the secret, ids and clock, encoded and checked),
/// a task on the follower and a hop through the channel's buffer task on the leader; on the
/// stream it is one message each way. Under a single writer a set waits for exactly one such
/// round trip to a follower (`mendfs bench kv --clients 1`).
///
/// Messages are answered in order, and this end sends the next only once the last is
/// answered, so an answer always belongs to the last message sent.
struct AppendStream {
    requests: tokio::sync::mpsc::Sender<AppendStreamRequest>,
    answers: tonic::Streaming<RaftPayload>,
}

impl AppendStream {
    /// Opens a stream: the follower has checked this node's secret and cluster id once it
    /// answers.
    async fn open(mut client: PeerClient) -> Result<Self, tonic::Status> {
        // One message in the channel at a time: the exchange waits for its answer anyway.
        let (requests, outgoing) = tokio::sync::mpsc::channel(1);
        let answers = client.append_stream(tokio_stream::wrappers::ReceiverStream::new(outgoing)).await?.into_inner();
        Ok(Self { requests, answers })
    }

    /// Sends one encoded AppendEntries and waits for its answer.
    async fn exchange(&mut self, data: Vec<u8>) -> Result<RaftPayload, String> {
        let sent_at = std::time::Instant::now();
        let request = AppendStreamRequest {
            data,
            clock_incarnation: crate::clock::incarnation(),
            clock_monotonic_ms: crate::clock::monotonic_ms(sent_at),
        };
        self.requests.send(request).await.map_err(|_| "the append stream closed".to_string())?;
        match self.answers.message().await {
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => Err("the append stream ended".to_string()),
            Err(status) => Err(format!("append stream: {}: {}", status.code(), status.message())),
        }
    }
}

/// How an AppendEntries went on the stream.
enum Streamed<T> {
    /// Answered, or failed in a way a unary call would not mend (no answer in time).
    Done(T),
    /// Not sent, or sent on a stream that broke before its answer: send it as a unary call.
    SendUnary,
}

/// A vote and the last log id a follower said it holds under it.
type Confirmed = (Vote<NodeId>, Option<LogId<NodeId>>);

/// An empty AppendEntries waiting for [`EMPTY_APPEND_DELAY`], shared with the task that sends it.
struct DeferredAppend {
    /// How far it got (`DEFERRED_*`). It leaves `DEFERRED_WAITING` for `DEFERRED_SENT` only
    /// under `request`'s lock.
    state: AtomicU8,
    /// What goes out: the last empty AppendEntries deferred while it waited. A later one
    /// replaces an earlier one (its commit is at least as high) but keeps its time, so that
    /// empty messages coming faster than the delay (a heartbeat interval below it) still go out.
    request: Mutex<AppendEntriesRequest<TypeConfig>>,
}

impl DeferredAppend {
    /// Moves it out of `DEFERRED_WAITING` to `to`, or says where it already is.
    fn leave_waiting(&self, to: u8) -> Result<(), u8> {
        self.state.compare_exchange(DEFERRED_WAITING, to, Ordering::AcqRel, Ordering::Acquire).map(|_| ())
    }

    /// Puts `rpc` in place of the waiting request; gives it back if this one has left.
    fn absorb(&self, rpc: AppendEntriesRequest<TypeConfig>) -> Result<(), AppendEntriesRequest<TypeConfig>> {
        let mut request = self.request.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.state.load(Ordering::Acquire) != DEFERRED_WAITING {
            return Err(rpc);
        }
        *request = rpc;
        Ok(())
    }
}

/// How far a deferred empty AppendEntries got.
const DEFERRED_WAITING: u8 = 0;
const DEFERRED_CANCELLED: u8 = 1;
const DEFERRED_SENT: u8 = 2;
const DEFERRED_SUCCEEDED: u8 = 3;
const DEFERRED_FAILED: u8 = 4;

/// Whether `rpc` may be answered with success before it is sent: it carries no entries and asks
/// the follower about exactly the log id the follower has already confirmed, under the same
/// vote. Such an answer tells openraft nothing it does not know: its matching index for the
/// follower is already there, so neither it nor the commit can move on it.
fn may_answer_early(confirmed: Option<&Confirmed>, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
    rpc.entries.is_empty() && confirmed == Some(&(rpc.vote, rpc.prev_log_id))
}

/// What a success to `rpc` confirms: the follower holds its last entry (or, without entries,
/// the entry it was asked about).
fn confirmed_by(rpc: &AppendEntriesRequest<TypeConfig>) -> Confirmed {
    (rpc.vote, rpc.entries.last().map(|entry| entry.log_id).or(rpc.prev_log_id))
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        // A replication stream ends when this node stops leading or the membership changes:
        // a message of the old stream not yet sent has nothing to say.
        if let Some((task, deferred)) = self.deferred.take() {
            if deferred.leave_waiting(DEFERRED_CANCELLED).is_ok() {
                task.abort();
            }
        }
    }
}

fn any_error(message: impl std::fmt::Display) -> AnyError {
    AnyError::error(message.to_string())
}

impl PeerConnection {
    /// Sends `rpc`, an AppendEntries without entries, after [`EMPTY_APPEND_DELAY`] unless a
    /// later message on this connection replaces it first.
    fn defer_empty_append(&mut self, rpc: AppendEntriesRequest<TypeConfig>, ttl: Duration) {
        let (target, client, durable_log) = (self.target, self.client.clone(), self.durable_log.clone());
        let deferred = Arc::new(DeferredAppend { state: AtomicU8::new(DEFERRED_WAITING), request: Mutex::new(rpc) });
        let progress = deferred.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(EMPTY_APPEND_DELAY).await;
            let mut rpc = {
                let request = progress.request.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if progress.leave_waiting(DEFERRED_SENT).is_err() {
                    return;
                }
                request.clone()
            };
            rpc.leader_commit = crate::raft_store::commit_to_announce(rpc.leader_commit, &durable_log.borrow());
            let outcome: Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> =
                call_peer(target, &client, &rpc, ttl, async |mut client, payload| client.append_entries(payload).await)
                    .await;
            let done = match outcome {
                Ok(AppendEntriesResponse::Success) => DEFERRED_SUCCEEDED,
                _ => DEFERRED_FAILED,
            };
            progress.state.store(done, Ordering::Release);
        });
        self.deferred = Some((task, deferred));
    }

    /// Sends `rpc` on the follower's append stream, opening one if none is open, all within
    /// `ttl`.
    async fn append_on_stream(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        ttl: Duration,
    ) -> Streamed<Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>>> {
        // Only entries travel on the stream. An empty AppendEntries sent now (not deferred) is
        // a probe or openraft's leadership check for a linearizable read, which makes a new
        // connection for each round: opening a stream would add a round trip to the read.
        if rpc.entries.is_empty() || self.unary_until.is_some_and(|until| std::time::Instant::now() < until) {
            return Streamed::SendUnary;
        }
        let Ok(client) = &self.client else { return Streamed::SendUnary };
        let deadline = tokio::time::Instant::now() + ttl;
        let no_answer = || {
            let target = self.target;
            Streamed::Done(Err(RPCError::Network(NetworkError::new(&any_error(format!(
                "no answer from node {target} within {ttl:?}"
            ))))))
        };
        // Taken out for the exchange and put back only once it is answered: if openraft drops
        // this call halfway (its replication to the follower stops), the stream goes with it,
        // and no later message can take this one's answer for its own.
        let mut stream = match self.stream.take() {
            Some(stream) => stream,
            None => match tokio::time::timeout_at(deadline, AppendStream::open(client.clone())).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(status)) => {
                    tracing::debug!(
                        target_node = self.target,
                        "no append stream ({}: {}); unary calls for {STREAM_RETRY_AFTER:?}",
                        status.code(),
                        status.message()
                    );
                    self.unary_until = Some(std::time::Instant::now() + STREAM_RETRY_AFTER);
                    return Streamed::SendUnary;
                }
                Err(_) => return no_answer(),
            },
        };
        let data = match encode(rpc) {
            Ok(data) => data,
            Err(e) => return Streamed::Done(Err(RPCError::Network(NetworkError::new(&any_error(e))))),
        };
        match tokio::time::timeout_at(deadline, stream.exchange(data)).await {
            Err(_) => no_answer(),
            // The stream broke (the follower restarted, say); the unary call says what the
            // follower's state now is, and the next message opens a new stream.
            Ok(Err(broken)) => {
                tracing::debug!(target_node = self.target, "{broken}; sending the message as a unary call");
                Streamed::SendUnary
            }
            Ok(Ok(answer)) => {
                self.stream = Some(stream);
                Streamed::Done(decode_answer(self.target, &answer))
            }
        }
    }

    /// Settles the deferred AppendEntries, if any, before the next message: cancels it if it
    /// has not left (the next message carries a commit at least as high: commits only grow,
    /// and the vote is this stream's), and forgets what the follower confirmed if it failed.
    /// Whether the next message may be answered early: not while the deferred one is still
    /// on its way, since whether the follower still answers is then unknown.
    fn settle_deferred(&mut self) -> bool {
        let Some((task, deferred)) = self.deferred.take() else { return true };
        match deferred.leave_waiting(DEFERRED_CANCELLED) {
            Ok(_) => {
                task.abort();
                true
            }
            // Left to finish on its own; its answer no longer matters.
            Err(DEFERRED_SENT) => false,
            Err(DEFERRED_SUCCEEDED) => true,
            Err(_) => {
                self.confirmed = None;
                false
            }
        }
    }
}

/// One Raft RPC to `target`: encode, send within `ttl` (the deadline openraft gives), decode the
/// remote result.
async fn call_peer<Req, Resp, E>(
    target: NodeId,
    client: &Result<PeerClient, String>,
    request: &Req,
    ttl: Duration,
    send: impl AsyncFnOnce(PeerClient, RaftPayload) -> Result<tonic::Response<RaftPayload>, tonic::Status>,
) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
where
    Req: Serialize,
    Resp: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    let client = match client {
        Ok(client) => client.clone(),
        Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&any_error(e)))),
    };
    let data = encode(request).map_err(|e| RPCError::Network(NetworkError::new(&any_error(e))))?;
    let reply = tokio::time::timeout(ttl, send(client, RaftPayload { data })).await;
    let reply = match reply {
        Err(_) => {
            return Err(RPCError::Network(NetworkError::new(&any_error(format!(
                "no answer from node {target} within {ttl:?}"
            )))))
        }
        // Unreachable makes openraft back off before retrying: right for a node that is
        // down, and for one that refuses us (wrong secret, another cluster's data), which
        // would otherwise be hammered in a tight loop.
        Ok(Err(status))
            if matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unauthenticated | tonic::Code::FailedPrecondition
            ) =>
        {
            return Err(RPCError::Unreachable(Unreachable::new(&any_error(format!(
                "node {target}: {}",
                status.message()
            )))))
        }
        Ok(Err(status)) => {
            return Err(RPCError::Network(NetworkError::new(&any_error(format!(
                "node {target}: {}: {}",
                status.code(),
                status.message()
            )))))
        }
        Ok(Ok(reply)) => reply.into_inner(),
    };
    decode_answer(target, &reply)
}

/// A follower's answer to a Raft RPC: its result, or a malformed answer as a network error.
// The error is openraft's own type, which its `RaftNetwork` methods return as it is.
#[allow(clippy::result_large_err)]
fn decode_answer<Resp, E>(
    target: NodeId,
    reply: &RaftPayload,
) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
where
    Resp: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    let result: Result<Resp, RaftError<NodeId, E>> =
        decode(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&any_error(e))))?;
    result.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    /// openraft's default waits 500 ms between tries of an unreachable peer. A node restarting
    /// after a crash then hears nothing from the leader for longer than its election timeout,
    /// campaigns, and is refused for its shorter log, which openraft remembers by adding twice
    /// the maximum election timeout to that node's next campaign: the next leader failover
    /// took about 1.1 s instead of 0.5 (`bench kv --failovers`). So for the first
    /// `FAST_RETRY_FOR` of an outage (a crash and an automatic restart) a peer is tried at the
    /// heartbeat's pace; after that at openraft's, since every failed try logs a few lines and
    /// a dead peer must not flood the log store.
    fn backoff(&self) -> openraft::network::Backoff {
        let fast_tries = (FAST_RETRY_FOR.as_millis() / self.retry_unreachable_every.as_millis().max(1)) as usize;
        openraft::network::Backoff::new(
            std::iter::repeat_n(self.retry_unreachable_every, fast_tries).chain(std::iter::repeat(SLOW_RETRY_EVERY)),
        )
    }

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // openraft 0.9 sends every follower an AppendEntries without entries as soon as an
        // entry commits, only to carry the new commit index, and then one more with the next
        // entries: under a single writer, half of all Raft messages, and a quarter of a set's
        // CPU on the three nodes (`mendfs bench kv --clients 1`). So an empty one is answered
        // here at once and sent after a short delay, unless a message with entries, which
        // carries the commit too, goes first. Nothing is lost: the follower hears every commit
        // at most `EMPTY_APPEND_DELAY` later, or at once with the next entries. Heartbeats take
        // the same path and still arrive (within the delay).
        //
        // The early answer claims nothing new. It is given only when the follower has already
        // confirmed, on this connection, under this vote, that it holds the very log id the
        // message asks about (`confirmed`), so openraft's matching index, and with it the
        // commit, cannot move on it; a probe for where the logs meet is never answered early.
        // Besides that openraft takes only the leader's liveness time from it, which this node
        // shows in metrics and uses for nothing else. Whatever the follower really answers (a
        // higher vote, a conflict, silence) reaches openraft with the next message, sent for
        // real because this one failed. And only a connection with history answers early:
        // openraft's leadership check for linearizable reads (`ensure_linearizable`) makes a new
        // connection for each round and sends one empty AppendEntries on it, whose real answer
        // is the whole point.
        //
        // One that comes while another still waits takes its place and its time: a stream of
        // them faster than the delay (heartbeats at a shorter interval) still goes out.
        if rpc.entries.is_empty() && may_answer_early(self.confirmed.as_ref(), &rpc) {
            if let Some((_, waiting)) = &self.deferred {
                match waiting.absorb(rpc) {
                    Ok(()) => return Ok(AppendEntriesResponse::Success),
                    Err(back) => rpc = back,
                }
            }
        }
        let may_defer = self.settle_deferred();
        if may_defer && may_answer_early(self.confirmed.as_ref(), &rpc) {
            self.defer_empty_append(rpc, option.hard_ttl());
            return Ok(AppendEntriesResponse::Success);
        }
        // Read as the message leaves: a commit that became durable since it was queued goes out.
        rpc.leader_commit = crate::raft_store::commit_to_announce(rpc.leader_commit, &self.durable_log.borrow());
        let started = std::time::Instant::now();
        let ttl = option.hard_ttl();
        let outcome = match self.append_on_stream(&rpc, ttl).await {
            Streamed::Done(outcome) => outcome,
            Streamed::SendUnary => {
                let ttl = ttl.saturating_sub(started.elapsed());
                call_peer(self.target, &self.client, &rpc, ttl, async |mut client, payload| {
                    client.append_entries(payload).await
                })
                .await
            }
        };
        // Empty ones (heartbeats, commit notices) are not a write's round trip.
        if !rpc.entries.is_empty() && matches!(outcome, Ok(AppendEntriesResponse::Success)) {
            self.append_seconds.observe(started.elapsed().as_secs_f64());
        }
        self.confirmed = matches!(outcome, Ok(AppendEntriesResponse::Success)).then(|| confirmed_by(&rpc));
        outcome
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        call_peer(self.target, &self.client, &rpc, option.hard_ttl(), async |mut client, payload| {
            client.install_snapshot(payload).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        call_peer(self.target, &self.client, &rpc, option.hard_ttl(), async |mut client, payload| {
            client.vote(payload).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload};

    use super::*;

    fn log_id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn append(
        vote: Vote<NodeId>,
        prev: Option<LogId<NodeId>>,
        entries: &[LogId<NodeId>],
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote,
            prev_log_id: prev,
            entries: entries.iter().map(|id| Entry { log_id: *id, payload: EntryPayload::Blank }).collect(),
            leader_commit: prev,
        }
    }

    #[test]
    fn only_an_empty_append_about_the_confirmed_entry_under_the_same_vote_is_answered_early() {
        let vote = Vote::new_committed(2, 1);
        let sent = append(vote, Some(log_id(2, 4)), &[log_id(2, 5), log_id(2, 6)]);
        let confirmed = confirmed_by(&sent);
        assert_eq!(confirmed, (vote, Some(log_id(2, 6))), "a success confirms the last entry sent");

        // A commit notice or heartbeat right after: prev is the confirmed entry.
        assert!(may_answer_early(Some(&confirmed), &append(vote, Some(log_id(2, 6)), &[])));
        // Entries always travel.
        assert!(!may_answer_early(Some(&confirmed), &append(vote, Some(log_id(2, 6)), &[log_id(2, 7)])));
        // A probe for where the logs meet asks about another entry: its answer is news.
        assert!(!may_answer_early(Some(&confirmed), &append(vote, Some(log_id(2, 5)), &[])));
        assert!(!may_answer_early(Some(&confirmed), &append(vote, Some(log_id(1, 6)), &[])));
        assert!(!may_answer_early(Some(&confirmed), &append(vote, None, &[])));
        // Another vote (another leadership) never leans on this one's confirmation.
        assert!(!may_answer_early(Some(&confirmed), &append(Vote::new_committed(3, 1), Some(log_id(2, 6)), &[])));
        // Nothing confirmed (a new connection, as a leadership check makes, or a failure since).
        assert!(!may_answer_early(None, &append(vote, Some(log_id(2, 6)), &[])));

        // An empty append that succeeded confirms the entry it asked about.
        assert_eq!(confirmed_by(&append(vote, Some(log_id(2, 6)), &[])), confirmed);
        assert_eq!(confirmed_by(&append(vote, None, &[])), (vote, None));
    }

    #[test]
    fn a_waiting_empty_append_takes_the_place_of_a_later_one_until_it_leaves() {
        let vote = Vote::new_committed(2, 1);
        let mut first = append(vote, Some(log_id(2, 6)), &[]);
        first.leader_commit = Some(log_id(2, 5));
        let deferred = DeferredAppend { state: AtomicU8::new(DEFERRED_WAITING), request: Mutex::new(first) };
        let mut later = append(vote, Some(log_id(2, 6)), &[]);
        later.leader_commit = Some(log_id(2, 6));
        assert!(deferred.absorb(later.clone()).is_ok(), "a waiting one takes the later one");
        assert_eq!(deferred.request.lock().expect("lock").leader_commit, Some(log_id(2, 6)), "and sends its commit");
        for gone in [DEFERRED_CANCELLED, DEFERRED_SENT, DEFERRED_SUCCEEDED, DEFERRED_FAILED] {
            deferred.state.store(gone, Ordering::Release);
            let back = deferred.absorb(later.clone()).expect_err("one that left takes nothing");
            assert_eq!(back.leader_commit, later.leader_commit, "the later one comes back whole");
        }
    }
}
