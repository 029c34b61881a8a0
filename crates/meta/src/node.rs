//! A running metadata node: openraft plus the storage and network adapters, the decisions only
//! the leader may take (writes, linearizable reads, session expiry, membership changes), and
//! forwarding of those requests from any node to the leader.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mendfs_proto::v1::RaftPayload;
use mendfs_proto::FORWARDED_HEADER;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::files::{self, FileRecord, StorageNode};
use crate::health::HealthSnapshot;
use crate::network::{NetworkFactory, Peers};
use crate::state::{self, Command, CommandResult, KeyValue, Proposal, ProposalBatch, RequestId};
use crate::storage::{LogStore, StateMachineStore, StateReader};
use crate::{NodeId, Raft};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Everything a metadata node needs to run. Defaults suit a local cluster on one machine.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: NodeId,
    /// The address peers and clients use to reach this node.
    pub advertise_addr: String,
    pub data_dir: PathBuf,
    /// The initial voter set; the node with the lowest id initializes the cluster, once.
    pub initial_peers: BTreeMap<NodeId, String>,
    /// None only with `--insecure-dev`.
    pub secret: Option<String>,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Take a snapshot (and compact the log) after this many entries since the last one.
    pub snapshot_every_entries: u64,
    /// Keep this many entries behind the last snapshot, for followers that are slightly behind.
    pub log_entries_kept_after_snapshot: u64,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// How long a write may wait for a quorum before the caller hears a timeout.
    pub write_timeout_ms: u64,
    pub list_limit_max: u32,
}

impl NodeConfig {
    pub fn new(node_id: NodeId, advertise_addr: String, data_dir: PathBuf) -> Self {
        Self {
            node_id,
            advertise_addr,
            data_dir,
            initial_peers: BTreeMap::new(),
            secret: None,
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            snapshot_every_entries: 10_000,
            log_entries_kept_after_snapshot: 1_000,
            max_key_bytes: 4_096,
            max_value_bytes: 1 << 20,
            write_timeout_ms: 5_000,
            list_limit_max: 10_000,
        }
    }
}

/// A request only the leader can serve; any other node forwards it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderRequest {
    Propose(Proposal),
    Get {
        key: Vec<u8>,
    },
    List {
        prefix: Vec<u8>,
        limit: u32,
    },
    KeepAlive {
        session_id: u64,
    },
    AddNode {
        id: NodeId,
        addr: String,
        learner: bool,
    },
    RemoveNode {
        id: NodeId,
    },
    GetFile {
        path: String,
    },
    ListFiles {
        prefix: String,
        limit: u32,
    },
    /// Which of these chunks no committed file lists on `node_id` (garbage collection).
    UnreferencedChunks {
        node_id: NodeId,
        hashes: Vec<Vec<u8>>,
    },
    /// The leader's health snapshot (liveness, node health, repair).
    Health,
    /// Drain or undrain a storage node.
    Drain {
        id: NodeId,
        draining: bool,
    },
}

/// A file version with the replica list of each of its chunks, from one consistent read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileView {
    pub path: String,
    pub record: FileRecord,
    pub chunk_replicas: Vec<Vec<NodeId>>,
}

/// Where a leader-only request comes from: whether it may still be forwarded, and until when
/// its caller waits for an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Origin {
    /// Already forwarded once by another node: never forwarded again.
    pub forwarded: bool,
    /// When the caller gives up (a client's `grpc-timeout`); None: this node's own timeouts.
    pub deadline: Option<Instant>,
}

impl Origin {
    /// This node's own work (repair, GC, a coordinator's lookups): its own timeouts apply.
    pub const LOCAL: Origin = Origin { forwarded: false, deadline: None };
    /// A request another node forwarded here, in an envelope with its deadline.
    pub const FORWARDED: Origin = Origin { forwarded: true, deadline: None };
}

/// A forwarded request with the wall-clock time after which its sender no longer waits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardEnvelope {
    pub deadline_unix_ms: u64,
    pub request: LeaderRequest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderResponse {
    Command(CommandResult),
    Get { revision: u64, kv: Option<KeyValue> },
    List { revision: u64, kvs: Vec<KeyValue>, truncated: bool },
    KeepAlive { ttl_ms: u64 },
    Membership { voters: Vec<NodeId>, learners: Vec<NodeId> },
    File(Option<FileView>),
    Files { files: Vec<FileView>, truncated: bool },
    Unreferenced(Vec<Vec<u8>>),
    Health(Box<HealthSnapshot>),
    Drained,
}

fn file_view(view: &crate::storage::ReadView, path: String, record: FileRecord) -> Result<FileView, ApiError> {
    let mut chunk_replicas = Vec::with_capacity(record.chunks.len());
    for chunk in &record.chunks {
        let replicas = files::get_chunk(view, &chunk.hash).map_err(ApiError::internal)?.map(|c| c.replicas);
        chunk_replicas.push(
            replicas.ok_or_else(|| {
                ApiError::Internal(format!("file {path} references a chunk missing from the chunk map"))
            })?,
        );
    }
    Ok(FileView { path, record, chunk_replicas })
}

/// Session liveness, kept by the leader alone (soft state, like etcd's lease keep-alives): a
/// new leader starts every session's clock afresh, so a leader change never expires a session
/// whose client is alive.
#[derive(Default)]
struct SessionClocks {
    deadlines: HashMap<u64, Instant>,
}

/// Proposals waiting to join a batch. Bounded: when Raft cannot keep up, callers wait here
/// (and time out) instead of growing memory.
const PROPOSAL_QUEUE_LEN_MAX: usize = 4_096;
/// Limits of one batch: entries stay small enough to replicate and apply quickly.
const BATCH_PROPOSALS_MAX: usize = 512;
const BATCH_BYTES_MAX: usize = 4 << 20;
/// Batches being committed at once. While they are, new proposals gather into the next batch;
/// more in flight would only make batches smaller.
const BATCHES_IN_FLIGHT_MAX: usize = 2;

struct PendingProposal {
    proposal: Proposal,
    reply: oneshot::Sender<Result<CommandResult, ApiError>>,
}

/// Group commit: turns concurrent proposals into few Raft entries. openraft 0.9 appends (and
/// fsyncs) each `client_write` on its own, so without this, write throughput would be bounded
/// by one fsync per write.
async fn run_proposer(raft: Raft, mut queue: mpsc::Receiver<PendingProposal>) {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT_MAX));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let mut bytes = first.proposal.approximate_bytes();
        let mut batch = vec![first];
        while batch.len() < BATCH_PROPOSALS_MAX && bytes < BATCH_BYTES_MAX {
            match queue.try_recv() {
                Ok(next) => {
                    bytes += next.proposal.approximate_bytes();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (proposals, replies): (Vec<Proposal>, Vec<_>) =
                batch.into_iter().map(|pending| (pending.proposal, pending.reply)).unzip();
            let outcome = raft.client_write(ProposalBatch { proposals }).await;
            match outcome {
                Ok(response) if response.data.len() == replies.len() => {
                    for (reply, result) in replies.into_iter().zip(response.data) {
                        let _ = reply.send(Ok(result));
                    }
                }
                Ok(response) => {
                    let error = ApiError::Internal(format!(
                        "a batch of {} proposals produced {} results",
                        replies.len(),
                        response.data.len()
                    ));
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
                Err(e) => {
                    let error = match e {
                        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                            ApiError::NotLeader { leader: forward.leader_id }
                        }
                        RaftError::APIError(e) => ApiError::Unavailable(e.to_string()),
                        RaftError::Fatal(e) => ApiError::Unavailable(format!("raft stopped: {e}")),
                    };
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        });
    }
}

#[derive(Clone)]
pub struct MetaNode {
    pub config: Arc<NodeConfig>,
    pub raft: Raft,
    pub state: StateReader,
    pub peers: Peers,
    sessions: Arc<Mutex<SessionClocks>>,
    proposer: mpsc::Sender<PendingProposal>,
    /// Published by the data plane's healer while this node leads; None otherwise.
    pub health: Arc<Mutex<Option<HealthSnapshot>>>,
    /// Raft's committed index on this node (for metrics).
    pub committed_index: Arc<std::sync::atomic::AtomicU64>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl MetaNode {
    pub async fn start(config: NodeConfig) -> Result<Self, String> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| format!("create data dir {}: {e}", config.data_dir.display()))?;
        let log_store = LogStore::open(&config.data_dir).map_err(|e| e.to_string())?;
        let committed_index = log_store.committed_index();
        let state_machine = StateMachineStore::open(&config.data_dir).map_err(|e| e.to_string())?;
        let state = state_machine.reader();
        let peers = Peers::new(config.secret.as_deref(), state.clone())?;

        let raft_config = Config {
            cluster_name: "mendfs".to_string(),
            heartbeat_interval: config.heartbeat_interval_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries),
            max_in_snapshot_log_to_keep: config.log_entries_kept_after_snapshot,
            purge_batch_size: 64,
            ..Default::default()
        };
        let raft_config = Arc::new(raft_config.validate().map_err(|e| format!("raft config: {e}"))?);
        let raft =
            Raft::new(config.node_id, raft_config, NetworkFactory { peers: peers.clone() }, log_store, state_machine)
                .await
                .map_err(|e| format!("start raft: {e}"))?;

        let (proposer, queue) = mpsc::channel(PROPOSAL_QUEUE_LEN_MAX);
        tokio::spawn(run_proposer(raft.clone(), queue));
        let node = MetaNode {
            config: Arc::new(config),
            raft,
            state,
            peers,
            sessions: Arc::default(),
            proposer,
            health: Arc::default(),
            committed_index,
        };
        node.initialize_once().await?;
        tokio::spawn(node.clone().leader_duties());
        Ok(node)
    }

    /// Bootstraps the cluster from `--peers` exactly once: only the lowest-id peer does it, only
    /// when its log is empty. A restarted node has a log and skips this, so a restart with the
    /// same flags never re-initializes.
    async fn initialize_once(&self) -> Result<(), String> {
        let Some((&first_id, _)) = self.config.initial_peers.iter().next() else {
            return Ok(());
        };
        if first_id != self.config.node_id {
            return Ok(());
        }
        if self.raft.is_initialized().await.map_err(|e| e.to_string())? {
            return Ok(());
        }
        let members: BTreeMap<NodeId, BasicNode> =
            self.config.initial_peers.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
        tracing::info!(?members, "initializing a new cluster");
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            // Another start already did it (the log is no longer empty): nothing to do.
            Err(RaftError::APIError(e)) => {
                tracing::info!("cluster already initialized: {e}");
                Ok(())
            }
            Err(e) => Err(format!("initialize cluster: {e}")),
        }
    }

    pub fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics.current_leader == Some(self.config.node_id) && metrics.state == ServerState::Leader
    }

    pub fn leader_id(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The current leader's address, if known.
    pub fn leader_addr(&self) -> Option<String> {
        self.member_addr(self.leader_id()?)
    }

    /// A member's address from the current membership (borrowed, not cloned: this runs on
    /// every forwarded request and every reply hint).
    fn member_addr(&self, id: NodeId) -> Option<String> {
        self.raft.metrics().borrow().membership_config.membership().get_node(&id).map(|node| node.addr.clone())
    }

    /// Serves a leader-only request here if this node leads, otherwise forwards it to the
    /// leader (once: a forwarded request is never forwarded again).
    pub async fn serve_on_leader(&self, request: LeaderRequest, origin: Origin) -> Result<LeaderResponse, ApiError> {
        match self.serve_locally(request.clone()).await {
            Err(ApiError::NotLeader { leader: Some(leader) }) if !origin.forwarded && leader != self.config.node_id => {
                self.forward(leader, &request, origin.deadline).await
            }
            other => other,
        }
    }

    /// Sends `request` to the leader in an envelope with a deadline, which the leader checks on
    /// arrival. The deadline is never later than the caller's own: a caller that has given up
    /// has reported a failure, and a request still waiting in a paused leader's socket must not
    /// turn that into a success when the leader resumes.
    async fn forward(
        &self,
        leader: NodeId,
        request: &LeaderRequest,
        caller_deadline: Option<Instant>,
    ) -> Result<LeaderResponse, ApiError> {
        let Some(addr) = self.member_addr(leader) else {
            return Err(ApiError::NotLeader { leader: Some(leader) });
        };
        let mut client = self.peers.client(&addr).map_err(ApiError::Unavailable)?;
        let own = Duration::from_millis(self.config.write_timeout_ms + 1_000);
        let timeout =
            caller_deadline.map_or(own, |deadline| own.min(deadline.saturating_duration_since(Instant::now())));
        if timeout.is_zero() {
            return Err(ApiError::Timeout("the caller's deadline passed before the request could be forwarded".into()));
        }
        let envelope =
            ForwardEnvelope { deadline_unix_ms: now_ms() + timeout.as_millis() as u64, request: request.clone() };
        let data = state::encode(&envelope).map_err(ApiError::internal)?;
        let mut grpc_request = tonic::Request::new(RaftPayload { data });
        grpc_request.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::AsciiMetadataValue::from_static("1"));
        grpc_request.set_timeout(timeout);
        let reply = tokio::time::timeout(timeout, client.forward(grpc_request))
            .await
            .map_err(|_| ApiError::Timeout(format!("leader {leader} at {addr} did not answer within {timeout:?}")))?
            .map_err(|status| match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                    ApiError::Unavailable(format!("leader {leader} at {addr}: {}", status.message()))
                }
                _ => ApiError::Internal(format!("leader {leader} at {addr}: {}", status.message())),
            })?;
        let result: Result<LeaderResponse, ApiError> =
            state::decode(&reply.into_inner().data).map_err(ApiError::internal)?;
        result
    }

    async fn serve_locally(&self, request: LeaderRequest) -> Result<LeaderResponse, ApiError> {
        match request {
            LeaderRequest::Propose(proposal) => Ok(LeaderResponse::Command(self.propose(proposal).await?)),
            LeaderRequest::Get { key } => {
                self.linearizable_barrier().await?;
                let view = self.state.view().map_err(ApiError::internal)?;
                let kv =
                    state::get_key(&view, &key).map_err(ApiError::internal)?.map(|record| KeyValue { key, record });
                Ok(LeaderResponse::Get { revision: state::current_revision(&view).map_err(ApiError::internal)?, kv })
            }
            LeaderRequest::List { prefix, limit } => {
                self.linearizable_barrier().await?;
                let limit = if limit == 0 { self.config.list_limit_max } else { limit.min(self.config.list_limit_max) };
                let view = self.state.view().map_err(ApiError::internal)?;
                let (kvs, truncated) = state::list_keys(&view, &prefix, limit as usize).map_err(ApiError::internal)?;
                Ok(LeaderResponse::List {
                    revision: state::current_revision(&view).map_err(ApiError::internal)?,
                    kvs,
                    truncated,
                })
            }
            LeaderRequest::KeepAlive { session_id } => {
                if !self.is_leader() {
                    return Err(ApiError::NotLeader { leader: self.leader_id() });
                }
                let view = self.state.view().map_err(ApiError::internal)?;
                let Some(session) = state::get_session(&view, session_id).map_err(ApiError::internal)? else {
                    return Err(ApiError::Command(state::CommandError::SessionNotFound { session_id }));
                };
                let mut clocks = self.sessions.lock().map_err(|_| ApiError::internal("session clocks poisoned"))?;
                clocks.deadlines.insert(session_id, Instant::now() + Duration::from_millis(session.ttl_ms));
                Ok(LeaderResponse::KeepAlive { ttl_ms: session.ttl_ms })
            }
            LeaderRequest::GetFile { path } => {
                self.linearizable_barrier().await?;
                let view = self.state.view().map_err(ApiError::internal)?;
                let file = files::get_file(&view, &path).map_err(ApiError::internal)?;
                Ok(LeaderResponse::File(file.map(|record| file_view(&view, path, record)).transpose()?))
            }
            LeaderRequest::ListFiles { prefix, limit } => {
                self.linearizable_barrier().await?;
                let limit = if limit == 0 { self.config.list_limit_max } else { limit.min(self.config.list_limit_max) };
                let view = self.state.view().map_err(ApiError::internal)?;
                let (found, truncated) =
                    files::list_files(&view, &prefix, limit as usize).map_err(ApiError::internal)?;
                let files = found
                    .into_iter()
                    .map(|(path, record)| file_view(&view, path, record))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(LeaderResponse::Files { files, truncated })
            }
            LeaderRequest::UnreferencedChunks { node_id, hashes } => {
                // Read-index: the answer reflects every commit acknowledged before it, so a
                // chunk reported unreferenced here was not referenced on this node by any
                // committed file at that moment.
                self.linearizable_barrier().await?;
                let view = self.state.view().map_err(ApiError::internal)?;
                let mut unreferenced = Vec::new();
                for hash in hashes {
                    let listed = files::get_chunk(&view, &hash)
                        .map_err(ApiError::internal)?
                        .is_some_and(|record| record.replicas.contains(&node_id));
                    if !listed {
                        unreferenced.push(hash);
                    }
                }
                Ok(LeaderResponse::Unreferenced(unreferenced))
            }
            LeaderRequest::Health => {
                // Only the leader's detector hears every heartbeat; a follower's view is empty.
                if !self.is_leader() {
                    return Err(ApiError::NotLeader { leader: self.leader_id() });
                }
                let snapshot = self.health.lock().map_err(|_| ApiError::internal("health snapshot poisoned"))?.clone();
                let Some(mut snapshot) = snapshot else {
                    return Err(ApiError::Unavailable(
                        "the leader has not finished its first failure-detection and repair scan yet (just elected?)"
                            .into(),
                    ));
                };
                let view = self.state.view().map_err(ApiError::internal)?;
                snapshot.repair_job = files::repair_job(&view).map_err(ApiError::internal)?;
                Ok(LeaderResponse::Health(Box::new(snapshot)))
            }
            LeaderRequest::Drain { id, draining } => {
                self.propose_here(Command::SetDraining { node_id: id, draining }).await?;
                Ok(LeaderResponse::Drained)
            }
            LeaderRequest::AddNode { id, addr, learner } => self.add_node(id, addr, learner).await,
            LeaderRequest::RemoveNode { id } => self.remove_node(id).await,
        }
    }

    /// Read-index: confirms leadership with a quorum and waits until the state machine has
    /// applied everything committed before the read arrived, so the read sees every write that
    /// completed before it (no clock assumption, unlike a leader lease).
    async fn linearizable_barrier(&self) -> Result<(), ApiError> {
        let timeout = Duration::from_millis(self.config.write_timeout_ms);
        match tokio::time::timeout(timeout, self.raft.ensure_linearizable()).await {
            Err(_) => Err(ApiError::Timeout(format!(
                "could not confirm leadership with a quorum within {timeout:?} (is a majority of nodes reachable?)"
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(forward)))) => {
                Err(ApiError::NotLeader { leader: forward.leader_id })
            }
            Ok(Err(RaftError::APIError(e))) => Err(ApiError::Unavailable(e.to_string())),
            Ok(Err(RaftError::Fatal(e))) => Err(ApiError::Unavailable(format!("raft stopped: {e}"))),
        }
    }

    async fn propose(&self, proposal: Proposal) -> Result<CommandResult, ApiError> {
        let timeout = Duration::from_millis(self.config.write_timeout_ms);
        let (reply, answer) = oneshot::channel();
        let queued = tokio::time::timeout(timeout, self.proposer.send(PendingProposal { proposal, reply })).await;
        match queued {
            Err(_) => return Err(ApiError::Unavailable(format!("the proposal queue stayed full for {timeout:?}"))),
            Ok(Err(_)) => return Err(ApiError::Unavailable("the node is shutting down".into())),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout(timeout, answer).await {
            Err(_) => Err(ApiError::Timeout(format!(
                "the write was not committed within {timeout:?}: no quorum reachable (the outcome is unknown; \
                 retrying with the same request id is safe)"
            ))),
            Ok(Err(_)) => Err(ApiError::Unavailable("the proposal was dropped: the node is shutting down".into())),
            Ok(Ok(result)) => result,
        }
    }

    /// Proposes a command on this node, which is serving a leader request.
    async fn propose_here(&self, command: Command) -> Result<state::Outcome, ApiError> {
        self.propose(Self::proposal(None, command)).await?.map_err(ApiError::Command)
    }

    fn membership(&self) -> (BTreeSet<NodeId>, BTreeMap<NodeId, BasicNode>) {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters = membership.voter_ids().collect();
        let nodes = membership.nodes().map(|(id, node)| (*id, node.clone())).collect();
        (voters, nodes)
    }

    fn membership_response(&self) -> LeaderResponse {
        let (voters, nodes) = self.membership();
        let learners = nodes.keys().filter(|id| !voters.contains(id)).copied().collect();
        LeaderResponse::Membership { voters: voters.into_iter().collect(), learners }
    }

    fn map_membership_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ApiError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                ApiError::NotLeader { leader: forward.leader_id }
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                ApiError::Unavailable(format!("membership change refused: {e}"))
            }
            RaftError::Fatal(e) => ApiError::Unavailable(format!("raft stopped: {e}")),
        }
    }

    /// Adds a node as a learner, waits for it to catch up, then promotes it to voter (unless
    /// it is to stay a learner).
    async fn add_node(&self, id: NodeId, addr: String, learner: bool) -> Result<LeaderResponse, ApiError> {
        crate::network::validate_node_addr(&addr).map_err(ApiError::InvalidArgument)?;
        if !self.is_leader() {
            return Err(ApiError::NotLeader { leader: self.leader_id() });
        }
        let (voters, nodes) = self.membership();
        if let Some(existing) = nodes.get(&id) {
            if existing.addr != addr {
                return Err(ApiError::InvalidArgument(format!(
                    "node {id} is already a member at {}; remove it first to change its address",
                    existing.addr
                )));
            }
        }
        if learner && voters.contains(&id) {
            return Err(ApiError::InvalidArgument(format!(
                "node {id} is a voter; remove it first to make it a learner"
            )));
        }
        if !voters.contains(&id) {
            let timeout = Duration::from_secs(60);
            tokio::time::timeout(timeout, self.raft.add_learner(id, BasicNode { addr }, true))
                .await
                .map_err(|_| ApiError::Timeout(format!("node {id} did not catch up as a learner within {timeout:?}")))?
                .map_err(|e| self.map_membership_error(e))?;
            if !learner {
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(|e| self.map_membership_error(e))?;
            }
        }
        Ok(self.membership_response())
    }

    async fn remove_node(&self, id: NodeId) -> Result<LeaderResponse, ApiError> {
        if !self.is_leader() {
            return Err(ApiError::NotLeader { leader: self.leader_id() });
        }
        let (voters, nodes) = self.membership();
        if !nodes.contains_key(&id) {
            let members: Vec<String> = nodes.keys().map(|id| id.to_string()).collect();
            return Err(ApiError::NotFound(format!("node {id} is not a member (members: {})", members.join(", "))));
        }
        if voters.contains(&id) && voters.len() == 1 {
            return Err(ApiError::InvalidArgument(format!("node {id} is the last voter; it cannot be removed")));
        }
        // Removing a node that still holds listed copies would make them unreadable at once;
        // drain it first (or let repair finish if it is down).
        let listed = {
            let view = self.state.view().map_err(ApiError::internal)?;
            files::chunks_listed_on(&view, id).map_err(ApiError::internal)?
        };
        if listed > 0 {
            return Err(ApiError::InvalidArgument(format!(
                "node {id} still holds {listed} listed chunk copies; run `mendfs cluster drain {id}` and wait for \
                 `cluster status` to show 0 chunks on it (or, if it is down, for repair to finish) before removing it"
            )));
        }
        if voters.contains(&id) {
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(|e| self.map_membership_error(e))?;
        }
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.map_membership_error(e))?;
        self.propose_here(Command::UnregisterStorageNode { node_id: id }).await?;
        Ok(self.membership_response())
    }

    /// What the leader does on its own: record the cluster id once, and expire sessions whose
    /// keep-alives stopped.
    async fn leader_duties(self) {
        const TICK: Duration = Duration::from_millis(100);
        let mut led_in_term: Option<u64> = None;
        loop {
            tokio::time::sleep(TICK).await;
            if self.raft.metrics().borrow().state == ServerState::Shutdown {
                return;
            }
            // Session clocks belong to one leadership term: losing leadership, even for less
            // than a tick (a new term), restarts every session's clock, so keep-alives sent to
            // an interim leader are never held against a client.
            let term = self.raft.metrics().borrow().current_term;
            if !self.is_leader() {
                led_in_term = None;
                continue;
            }
            if led_in_term != Some(term) {
                if let Ok(mut clocks) = self.sessions.lock() {
                    clocks.deadlines.clear();
                }
                led_in_term = Some(term);
            }
            if self.state.cluster_id().is_none() {
                let cluster_id = format!("{:032x}", rand::random::<u128>());
                let proposal = Proposal {
                    request_id: None,
                    proposed_at_ms: now_ms(),
                    command: Command::InitCluster { cluster_id },
                };
                if let Err(e) = self.propose(proposal).await {
                    tracing::warn!("recording the cluster id: {e}");
                }
            }
            if let Err(e) = self.expire_sessions().await {
                tracing::warn!("session expiry: {e}");
            }
        }
    }

    async fn expire_sessions(&self) -> Result<(), ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        let sessions = state::list_sessions(&view).map_err(ApiError::internal)?;
        let now = Instant::now();
        let expired: Vec<u64> = {
            let mut clocks = self.sessions.lock().map_err(|_| ApiError::internal("session clocks poisoned"))?;
            let live: BTreeSet<u64> = sessions.iter().map(|(id, _)| *id).collect();
            clocks.deadlines.retain(|id, _| live.contains(id));
            for (id, session) in &sessions {
                // A session this leader has not heard of yet (new, or opened under an earlier
                // leader) gets a full TTL from now.
                clocks.deadlines.entry(*id).or_insert(now + Duration::from_millis(session.ttl_ms));
            }
            clocks.deadlines.iter().filter(|(_, deadline)| **deadline <= now).map(|(id, _)| *id).collect()
        };
        for session_id in expired {
            tracing::info!(session_id, "session expired: no keep-alive within its TTL");
            let proposal =
                Proposal { request_id: None, proposed_at_ms: now_ms(), command: Command::SessionExpire { session_id } };
            let _outcome = self.propose(proposal).await?;
        }
        Ok(())
    }

    /// Storage nodes as this node's state machine knows them (may lag the leader slightly;
    /// good enough to choose where to write, since the commit records where copies went).
    pub fn storage_nodes(&self) -> Result<Vec<StorageNode>, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        files::list_storage_nodes(&view).map_err(ApiError::internal)
    }

    /// Proposes a command of this node's own through the leader and returns its outcome.
    pub async fn execute(&self, request_id: Option<RequestId>, command: Command) -> Result<state::Outcome, ApiError> {
        self.execute_for(Origin::LOCAL, request_id, command).await
    }

    /// Proposes a client's command through the leader, never outliving the client's deadline.
    pub async fn execute_for(
        &self,
        origin: Origin,
        request_id: Option<RequestId>,
        command: Command,
    ) -> Result<state::Outcome, ApiError> {
        match self.serve_on_leader(LeaderRequest::Propose(Self::proposal(request_id, command)), origin).await? {
            LeaderResponse::Command(result) => result.map_err(ApiError::Command),
            other => Err(ApiError::Internal(format!("unexpected answer to a command: {other:?}"))),
        }
    }

    /// Builds a proposal stamped with this node's clock.
    pub fn proposal(request_id: Option<RequestId>, command: Command) -> Proposal {
        Proposal { request_id, proposed_at_ms: now_ms(), command }
    }
}
