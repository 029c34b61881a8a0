//! Node-to-node transport: openraft's RPCs and forwarded requests over gRPC.
//!
//! Raft messages are postcard-encoded openraft structures inside a protobuf `RaftPayload`;
//! every call carries the cluster secret, this node's id and its cluster id (see `service` for the
//! checks on the receiving side).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mendfs_proto::v1::node_client::NodeClient;
use mendfs_proto::v1::RaftPayload;
use mendfs_proto::{CLUSTER_ID_HEADER, NODE_ID_HEADER, SECRET_HEADER};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{AnyError, BasicNode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::raft_store::StateReader;
use crate::schema::{decode, encode};
use crate::{NodeId, TypeConfig};

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
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerConnection {
            target,
            client: self.peers.client(&node.addr),
            durable_log: self.durable_log.clone(),
            retry_unreachable_every: self.retry_unreachable_every,
        }
    }
}

/// How long into an outage an unreachable peer is still tried every heartbeat interval.
const FAST_RETRY_FOR: Duration = Duration::from_secs(2);
/// How often an unreachable peer is tried after that (openraft's own default).
const SLOW_RETRY_EVERY: Duration = Duration::from_millis(500);

pub struct PeerConnection {
    target: NodeId,
    client: Result<PeerClient, String>,
    durable_log: tokio::sync::watch::Receiver<crate::raft_store::DurableLog>,
    retry_unreachable_every: Duration,
}

fn any_error(message: impl std::fmt::Display) -> AnyError {
    AnyError::error(message.to_string())
}

impl PeerConnection {
    /// One Raft RPC: encode, send within the deadline openraft gives, decode the remote result.
    async fn call<Req, Resp, E>(
        &mut self,
        request: &Req,
        option: &RPCOption,
        send: impl AsyncFnOnce(PeerClient, RaftPayload) -> Result<tonic::Response<RaftPayload>, tonic::Status>,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &self.client {
            Ok(client) => client.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&any_error(e)))),
        };
        let data = encode(request).map_err(|e| RPCError::Network(NetworkError::new(&any_error(e))))?;
        let reply = tokio::time::timeout(option.hard_ttl(), send(client, RaftPayload { data })).await;
        let reply = match reply {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&any_error(format!(
                    "no answer from node {} within {:?}",
                    self.target,
                    option.hard_ttl()
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
                    "node {}: {}",
                    self.target,
                    status.message()
                )))))
            }
            Ok(Err(status)) => {
                return Err(RPCError::Network(NetworkError::new(&any_error(format!(
                    "node {}: {}: {}",
                    self.target,
                    status.code(),
                    status.message()
                )))))
            }
            Ok(Ok(reply)) => reply.into_inner(),
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&any_error(e))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
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
        // Read as the message leaves: a commit that became durable since it was queued goes out.
        rpc.leader_commit = crate::raft_store::commit_to_announce(rpc.leader_commit, &self.durable_log.borrow());
        self.call(&rpc, &option, async |mut client, payload| client.append_entries(payload).await).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(&rpc, &option, async |mut client, payload| client.install_snapshot(payload).await).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(&rpc, &option, async |mut client, payload| client.vote(payload).await).await
    }
}
