//! One MendFS node, assembled: [`Node::start`] takes a [`NodeConfig`] and returns a
//! [`NodeHandle`] that stops it cleanly.
//!
//! API boundary: the binary, the tests and anything that embeds a node start it here, and
//! nothing else wires services together. A node is the metadata node (`mendfs_meta`), the data
//! plane's services and workers (`mendfs_data`), its telemetry and its HTTP side, on one gRPC
//! listener. Every background loop runs as a named worker of the node's `Background`
//! (`mendfs_worker`), so [`NodeHandle::stop`] ends all of them, and a worker the node cannot do
//! without that fails stops the node instead of vanishing.
//!
//! Architecture invariant: this crate parses no command line and reads no environment; the
//! binary turns flags, environment and files into a [`NodeConfig`].

mod config;
mod dashboard;
mod faults;
mod http;
mod listener;
mod telemetry;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mendfs_chunkstore::{ChunkStore, FaultState};
use mendfs_data::chunk_service::{ChunkService, LocalChunks};
use mendfs_data::cluster_service::ClusterApi;
use mendfs_data::coordinator::Coordinator;
use mendfs_data::gc::GcWorker;
use mendfs_data::healer::{Healer, HealthApi};
use mendfs_data::heartbeat::{HealthSampler, HeartbeatWorker};
use mendfs_data::registration::RegistrationWorker;
use mendfs_data::scrub::ScrubWorker;
use mendfs_meta::auth::AuthLayer;
use mendfs_meta::MetaNode;
use mendfs_proto::v1::files_server::FilesServer;
use mendfs_proto::v1::health_server::HealthServer;
use mendfs_proto::v1::storage_server::StorageServer;
use mendfs_proto::v1::telemetry_server::TelemetryServer;
use mendfs_telemetry::grpc::RpcTraceLayer;
use mendfs_telemetry::metrics::RequestMetrics;
use mendfs_telemetry::service::TelemetryApi;
use mendfs_types::NodeId;
use mendfs_worker::{Background, OnFailure, WorkerStatus};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{ConfigError, NodeConfig};
/// How a write keeps its chunks, and the smallest chunk a stripe is made of: what the demo and
/// the bench need to plan erasure-coded files and count what they should find on disk.
pub use mendfs_data::coordinator::{Redundancy, EC_CHUNK_BYTES_MIN};
pub use mendfs_meta::DEFAULT_LOG_FILTER;
pub use telemetry::Telemetry;

/// Why a node could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Start(String),
    /// A worker the node cannot run without failed, and the node stopped.
    #[error("{0}")]
    Failed(String),
}

/// How long [`NodeHandle::stop`] waits for in-flight requests and workers before it gives up
/// on them (a client streaming a watch, say).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Starts nodes.
pub struct Node;

impl Node {
    /// Checks `config`, opens the node's stores, binds its listeners and starts everything.
    /// A taken port or a bad setting fails here, before Raft starts.
    pub async fn start(config: NodeConfig, telemetry: Telemetry) -> Result<NodeHandle, NodeError> {
        let mut parts = config.parts()?;
        // TLS material is read before anything starts: a bad file fails the start cleanly.
        let (grpc_tls, http_tls) = match &parts.tls {
            Some(files) => (
                Some(tls::ServerTls::load(&files.cert, &files.key, &files.ca, &[b"h2"])?),
                Some(tls::ServerTls::load(&files.cert, &files.key, &files.ca, &[b"http/1.1"])?),
            ),
            None => (None, None),
        };
        if let Some(files) = &parts.tls {
            let read = |path: &std::path::Path| {
                std::fs::read(path)
                    .map_err(|e| NodeError::Io { context: format!("cannot read {}", path.display()), source: e })
            };
            parts.meta.peer_tls = Some(mendfs_meta::PeerTls {
                ca_pem: read(&files.ca)?,
                cert_pem: read(&files.cert)?,
                key_pem: read(&files.key)?,
            });
        }
        // Fault injection (for `mendfs chaos` only): without the switch there is no fault state,
        // no control file is read and the chunk store has no fault hooks.
        let fault_control = parts.allow_fault_injection.then(|| {
            let mut control = faults::FaultControl::new(&config.data_dir, Arc::new(FaultState::new()));
            tracing::warn!(
                file = %control.path().display(),
                "FAULT INJECTION IS ALLOWED (--allow-fault-injection): this node obeys its fault control \
                 file; for `mendfs chaos` only, never in production"
            );
            // Once now, so faults written before the start are in force from the first request.
            let polled = control.poll();
            faults::log_polled(control.path(), &polled);
            control
        });
        if parts.meta.unsafe_local_reads {
            tracing::warn!(
                "UNSAFE LOCAL READS (--unsafe-local-reads): this node answers key reads from its own, \
                 possibly stale state, without the leader or read-index. Reads are NOT linearizable. \
                 This mode is deliberately broken, for testing `mendfs chaos` only"
            );
        }
        let chunks = if parts.storage_role {
            let mut store = ChunkStore::open(&config.data_dir.join("chunks"), mendfs_data::CHUNK_BYTES_MAX)
                .map_err(|e| NodeError::Start(format!("open the chunk store in {}: {e}", config.data_dir.display())))?;
            match store.write_mode() {
                mendfs_chunkstore::WriteMode::Direct => tracing::info!("chunk files are written with direct I/O"),
                mendfs_chunkstore::WriteMode::Buffered => tracing::info!(
                    "chunk files are written through the page cache: the data directory's file system refuses \
                     direct I/O"
                ),
            }
            if let Some(control) = &fault_control {
                store = store.with_faults(control.faults().clone());
            }
            Some(Arc::new(LocalChunks::new(Arc::new(store), parts.data.orphan_grace, config.storage_capacity_bytes)))
        } else {
            None
        };
        let listener = tokio::net::TcpListener::bind(parts.listen)
            .await
            .map_err(|e| NodeError::Io { context: format!("cannot listen on {}", parts.listen), source: e })?;
        let addr =
            listener.local_addr().map_err(|e| NodeError::Io { context: "listener address".into(), source: e })?;
        if config.advertise.is_none() && parts.listen.port() == 0 {
            // Asked for any free port: others reach the one the system gave.
            parts.meta.advertise_addr = addr.to_string();
        }
        let http_listener = match &config.http {
            Some(http) => Some(http::bind("--http", http).await?),
            None => None,
        };
        let http_addr = http_listener.as_ref().and_then(|listener| listener.local_addr().ok());
        if let Some(http_addr) = http_addr {
            parts.meta.http_addr = http::advertised_http_addr(http_addr, &parts.meta.advertise_addr);
        }
        let s3_listener = match &config.s3 {
            Some(s3) => Some(http::bind("--s3", s3).await?),
            None => None,
        };
        let s3_addr = s3_listener.as_ref().and_then(|listener| listener.local_addr().ok());

        let background = Background::new();
        // Stopping serving comes first and apart from the rest: in-flight calls still need Raft
        // and the workers to finish (see `NodeHandle::stop`).
        let serving = CancellationToken::new();
        let stop_serving = || {
            let (serving, stopping) = (serving.clone(), background.stopping());
            async move {
                tokio::select! {
                    _ = serving.cancelled() => {}
                    _ = stopping => {}
                }
            }
        };
        let meta = match MetaNode::start(parts.meta.clone(), &background).await {
            Ok(meta) => meta,
            Err(e) => {
                // Whatever of the node had started (its group-commit worker) goes with it.
                background.stop(STOP_GRACE).await;
                return Err(NodeError::Start(e));
            }
        };
        let (node_service, kv_service, auth_service, s3_admin_service) = mendfs_meta::services(&meta, serving.clone());
        let jobs_service = mendfs_meta::jobs_service(&meta);
        let policy_service = mendfs_meta::policy_service(&meta);
        let authenticator = mendfs_meta::authenticator(&meta);

        if let Some(control) = fault_control {
            background.spawn_worker(faults::FaultControlWorker::new(control), OnFailure::Restart);
        }
        let healer = Healer::new(meta.clone(), parts.healer.clone());
        healer.spawn_workers(&background);
        let sampler = HealthSampler::new(&config.data_dir, chunks.clone());
        background.spawn_worker(
            HeartbeatWorker::new(meta.clone(), healer.clone(), sampler, parts.health_interval),
            OnFailure::Restart,
        );
        let storage_service = chunks.as_ref().map(|chunks| {
            background.spawn_worker(RegistrationWorker::new(meta.clone(), &parts.data), OnFailure::Restart);
            background
                .spawn_worker(ScrubWorker::new(meta.clone(), chunks.clone(), parts.scrub.clone()), OnFailure::Restart);
            background.spawn_worker(
                GcWorker::new(meta.clone(), chunks.clone(), parts.data.orphan_grace, parts.data.gc_interval),
                OnFailure::Restart,
            );
            StorageServer::new(ChunkService::new(chunks.clone(), meta.peers().clone()))
                .max_decoding_message_size(mendfs_data::CHUNK_BYTES_MAX + 1024)
                .max_encoding_message_size(mendfs_data::CHUNK_BYTES_MAX + 1024)
        });
        let health_service = HealthServer::new(HealthApi { healer: healer.clone() });
        let cluster_service = ClusterApi::new(meta.clone(), healer.clone());
        let telemetry_service = TelemetryServer::new(TelemetryApi {
            node_id: config.node_id,
            spans: telemetry.spans.clone(),
            logs: telemetry.logs.clone(),
        })
        .max_encoding_message_size(64 << 20);
        // One coordinator for files and S3: its bound on the bytes being prepared is the node's.
        let coordinator = Coordinator::new(meta.clone(), parts.data.clone(), chunks.clone());
        let files_service = FilesServer::new(coordinator.clone())
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20);

        if let Some(export) = telemetry.take_export() {
            let stopping = background.stopping();
            // Spans still queued at the stop are dropped: each is in the node's own store.
            background.spawn(async move {
                tokio::select! {
                    _ = export => {}
                    _ = stopping => {}
                }
            });
        }
        let requests = Arc::new(RequestMetrics::new());
        let mut servers = Vec::new();
        if let Some(listener) = http_listener {
            let (connections, accept_loop) =
                listener::incoming(listener, parts.limits, http_tls.clone(), stop_serving());
            background.spawn(accept_loop);
            let state = Arc::new(http::HttpState {
                node: meta.clone(),
                healer: healer.clone(),
                storage: chunks,
                coordinator: coordinator.clone(),
                requests: requests.clone(),
                telemetry,
                background: background.clone(),
                metrics_token: config.metrics_token.clone(),
                replication_factor: parts.data.replication_factor,
                authenticator: authenticator.clone(),
                cluster: ClusterApi::unserved(meta.clone(), healer.clone()),
                http_addr: parts.meta.http_addr.clone(),
                status_cache: Default::default(),
                logins: tokio::sync::Semaphore::new(dashboard::login::LOGINS_AT_ONCE),
            });
            servers.push(tokio::spawn(http::serve(connections, http_addr, state, stop_serving())));
        }
        if let Some(listener) = s3_listener {
            let settings = mendfs_s3::S3Settings {
                region: config.s3_region.clone(),
                domains: config.s3_domains.clone(),
                min_part_bytes: config.s3_min_part_bytes,
            };
            let gateway = mendfs_s3::S3Gateway::new(meta.clone(), coordinator.clone(), settings, requests.clone())
                .map_err(|e| NodeError::Config(ConfigError(e)))?;
            let (connections, accept_loop) =
                listener::incoming(listener, parts.limits, http_tls.clone(), stop_serving());
            background.spawn(accept_loop);
            let stop = stop_serving();
            let (serving, stopper) = (serving.clone(), background.clone());
            background.spawn(async move {
                use tokio_stream::StreamExt;
                let mut connections = connections;
                tokio::pin!(stop);
                loop {
                    let connection = tokio::select! {
                        _ = &mut stop => break,
                        next = connections.next() => match next {
                            Some(Ok(connection)) => connection,
                            Some(Err(_)) => continue,
                            None => break,
                        },
                    };
                    let (serving, stopping) = (serving.clone(), stopper.stopping());
                    let stop = async move {
                        tokio::select! {
                            _ = serving.cancelled() => {}
                            _ = stopping => {}
                        }
                    };
                    tokio::spawn(gateway.clone().serve_connection(connection, stop));
                }
            });
            tracing::info!(addr = ?s3_addr, "serving S3");
        }
        let admits: mendfs_telemetry::grpc::Admits = {
            let authenticator = authenticator.clone();
            Arc::new(move |path, headers, extensions| authenticator.admits(path, headers, extensions))
        };
        let (grpc_connections, accept_loop) = listener::incoming(listener, parts.limits, grpc_tls, stop_serving());
        background.spawn(accept_loop);
        let serve = tonic::transport::Server::builder()
            // Outermost first: every call is counted (refused ones too), then authorized.
            .layer(
                tower::ServiceBuilder::new()
                    .layer(RpcTraceLayer::new(requests).admitting(admits))
                    .layer(AuthLayer::new(authenticator)),
            )
            .add_service(node_service)
            .add_service(kv_service)
            .add_service(auth_service)
            .add_service(s3_admin_service)
            .add_service(jobs_service)
            .add_service(policy_service)
            .add_service(cluster_service)
            .add_optional_service(storage_service)
            .add_service(health_service)
            .add_service(files_service)
            .add_service(telemetry_service)
            .serve_with_incoming_shutdown(grpc_connections, stop_serving());
        let (served, stopped_serving) = (background.clone(), serving.clone());
        servers.push(tokio::spawn(async move {
            let result = serve.await;
            // The node cannot work without its server: whatever ended it ends the node.
            if !stopped_serving.is_cancelled() && !served.is_stopping() {
                served.fail(format!("the gRPC server ended: {result:?}"));
            } else if let Err(e) = result {
                tracing::error!("gRPC server: {e}");
            }
        }));
        tracing::info!(%addr, "serving");
        Ok(NodeHandle { id: config.node_id, addr, http_addr, meta, background, serving, servers })
    }
}

/// A running node. Dropping it leaves the node running; [`NodeHandle::stop`] ends it.
pub struct NodeHandle {
    id: NodeId,
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    meta: MetaNode,
    background: Background,
    /// Cancelled first on a stop: the servers stop accepting and drain their calls.
    serving: CancellationToken,
    servers: Vec<JoinHandle<()>>,
}

impl NodeHandle {
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The gRPC address the node listens on (the real port when the config asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn is_leader(&self) -> bool {
        self.meta.is_leader()
    }

    pub fn leader_id(&self) -> Option<NodeId> {
        self.meta.leader_id()
    }

    /// What each background worker is doing.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        self.background.workers()
    }

    /// Tasks of this node still running: its workers, its servers and their helpers.
    pub fn tasks_running(&self) -> usize {
        self.background.running()
    }

    /// Returns when the node stopped itself (a worker it cannot do without failed), with why.
    pub async fn stopped(&self) -> NodeError {
        self.background.stopping().await;
        NodeError::Failed(self.background.fatal_error().unwrap_or_else(|| "the node stopped".into()))
    }

    /// Stops the node in two phases. First the servers stop accepting and finish the calls in
    /// flight, with Raft and the workers still running, so a client's upload or write that
    /// arrived before the stop completes (bounded by a grace period: a watch streams forever).
    /// Then every worker ends and Raft stops. Returns once nothing of the node runs, or after
    /// a grace period, with why the node had stopped itself if it had.
    pub async fn stop(mut self) -> Result<(), NodeError> {
        tracing::info!(node = self.id, "stopping");
        let fatal = self.background.fatal_error();
        self.serving.cancel();
        let servers = &mut self.servers;
        let drained = tokio::time::timeout(STOP_GRACE, async {
            for server in servers.iter_mut() {
                let _ = server.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(node = self.id, "calls still in flight {STOP_GRACE:?} after the stop; cut off");
        }
        for server in &self.servers {
            server.abort();
        }
        self.background.request_stop();
        self.meta.shutdown().await;
        if !self.background.stop(STOP_GRACE).await {
            tracing::warn!(
                node = self.id,
                running = self.background.running(),
                "some tasks were still running {STOP_GRACE:?} after the stop"
            );
        }
        // Returns once the data directory can be opened again: the last handles to its
        // databases may still be dropping (a connection task draining, one of openraft's).
        let files = self.meta.files_in_use();
        let NodeHandle { meta, background, servers, .. } = self;
        drop((meta, background, servers));
        let released_by = tokio::time::Instant::now() + STOP_GRACE;
        while !files.released() {
            if tokio::time::Instant::now() >= released_by {
                tracing::warn!("the data directory's databases were still open {STOP_GRACE:?} after the stop");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        match fatal {
            Some(why) => Err(NodeError::Failed(why)),
            None => Ok(()),
        }
    }
}
