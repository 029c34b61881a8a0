//! `mendfs server`: settings from flags and an optional TOML file (flags win), then a node.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use std::sync::Arc;
use std::time::Duration;

use mendfs_chunkstore::ChunkStore;
use mendfs_data::coordinator::Coordinator;
use mendfs_data::healer::Healer;
use mendfs_data::healer::{HealerConfig, HealthApi};
use mendfs_data::heartbeat::HealthSampler;
use mendfs_data::scrub::ScrubConfig;
use mendfs_data::storage::{StorageApi, StorageState};
use mendfs_data::DataConfig;
use mendfs_meta::files::StorageNode;
use mendfs_meta::state::Command;
use mendfs_meta::{MetaNode, NodeConfig};
use mendfs_proto::v1::files_server::FilesServer;
use mendfs_proto::v1::health_server::HealthServer;
use mendfs_proto::v1::storage_server::StorageServer;
use mendfs_proto::v1::telemetry_server::TelemetryServer;
use mendfs_telemetry::grpc::RpcTraceLayer;
use mendfs_telemetry::layer::{Sinks, TelemetryLayer};
use mendfs_telemetry::metrics::RequestMetrics;
use mendfs_telemetry::otlp::OtlpExporter;
use mendfs_telemetry::service::TelemetryApi;
use mendfs_telemetry::store::{LogStore, SpanStore};
use serde::Deserialize;
use std::sync::atomic::AtomicU64;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

#[derive(Args, Debug, Default)]
pub struct ServerArgs {
    /// TOML file with any of the settings below (same names, with underscores); flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's id (1 or more), unique in the cluster and stable across restarts.
    #[arg(long)]
    pub node_id: Option<u64>,
    /// Address to listen on for peers and clients, HOST:PORT.
    #[arg(long)]
    pub listen: Option<String>,
    /// Address others use to reach this node, if not the listen address.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Directory for the Raft log, the state machine and snapshots.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The initial voters: ID=HOST:PORT separated by commas. The lowest id bootstraps the cluster, once.
    #[arg(long)]
    pub peers: Option<String>,
    /// File holding the cluster secret (else MENDFS_SECRET).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Run without a cluster secret: anyone who reaches the port can read and write. Local trials only.
    #[arg(long)]
    pub insecure_dev: bool,
    /// Address for HTTP: Prometheus `/metrics`, `/healthz` and `/readyz` (IP:PORT; off if unset).
    #[arg(long)]
    pub http: Option<String>,
    /// Take a snapshot and compact the Raft log every this many entries.
    #[arg(long)]
    pub snapshot_every_entries: Option<u64>,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long)]
    pub heartbeat_interval_ms: Option<u64>,
    /// Lower bound of the randomized election timeout in milliseconds (the upper bound is twice it).
    #[arg(long)]
    pub election_timeout_ms: Option<u64>,
    /// Largest key accepted, in bytes.
    #[arg(long)]
    pub max_key_bytes: Option<usize>,
    /// Largest value accepted, in bytes.
    #[arg(long)]
    pub max_value_bytes: Option<usize>,
    /// How long a write may wait for a quorum before failing, in milliseconds.
    #[arg(long)]
    pub write_timeout_ms: Option<u64>,
    /// Log format on stderr: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Size of the chunks files are cut into, in bytes (default 4 MiB).
    #[arg(long)]
    pub chunk_size_bytes: Option<usize>,
    /// Copies of every chunk (default 3). The same on every node.
    #[arg(long)]
    pub replication_factor: Option<usize>,
    /// How long prepared chunks are protected from collection, in milliseconds (default 10 min).
    /// The same on every node.
    #[arg(long)]
    pub orphan_grace_ms: Option<u64>,
    /// How often this node looks for orphaned chunk copies, in milliseconds (default 60 s).
    #[arg(long)]
    pub gc_interval_ms: Option<u64>,
    /// Failure domain of this node (rack, room); replicas go to distinct zones where possible.
    #[arg(long)]
    pub zone: Option<String>,
    /// Relative capacity of this node for placement (100 = a default node).
    #[arg(long)]
    pub weight: Option<u32>,
    /// What this node does: `meta` (a Raft voter for the metadata) and/or `storage` (holds
    /// chunks). A storage-only node joins as a non-voting learner (`cluster add-node --learner`).
    #[arg(long, value_delimiter = ',')]
    pub roles: Option<Vec<String>>,
    /// Cap on the chunk bytes this node stores (default: the filesystem's size). Fullness is
    /// then measured against the cap: a node whose room left (under the cap, or on the
    /// filesystem if that has less) falls below `1 - disk_full_ratio` of the cap is `degraded`
    /// and receives no new chunks. Without a cap it is the whole filesystem's fullness, which
    /// on a shared disk counts other programs' files too.
    #[arg(long)]
    pub storage_capacity_bytes: Option<u64>,
    /// How often this node sends the leader a heartbeat with its health, in milliseconds (default 1000).
    #[arg(long)]
    pub health_interval_ms: Option<u64>,
    /// Phi at which the leader suspects a node (default 8).
    #[arg(long)]
    pub phi_threshold: Option<f64>,
    /// Heartbeat delay tolerated before suspicion grows, in milliseconds (default 3000).
    #[arg(long)]
    pub acceptable_pause_ms: Option<u64>,
    /// How long a node stays suspect before it is declared down and repaired, in milliseconds (default 10000).
    #[arg(long)]
    pub down_after_ms: Option<u64>,
    /// Disk use (used/capacity) at which a node becomes degraded (default 0.9).
    #[arg(long)]
    pub disk_full_ratio: Option<f64>,
    /// Repair copy bandwidth across the cluster in bytes per second; 0 = unthrottled (default 128 MiB/s).
    #[arg(long)]
    pub repair_bytes_per_sec: Option<u64>,
    /// Repair copies in flight at once (default 8).
    #[arg(long)]
    pub repair_copies_in_flight: Option<usize>,
    /// How often the leader scans the chunk map for repair work, in milliseconds (default 1000).
    #[arg(long)]
    pub repair_scan_interval_ms: Option<u64>,
    /// Scrub read bandwidth in bytes per second; 0 = scrubbing off (default 32 MiB/s).
    #[arg(long)]
    pub scrub_bytes_per_sec: Option<u64>,
    /// Rest between two scrub passes, in milliseconds (default 1 hour).
    #[arg(long)]
    pub scrub_interval_ms: Option<u64>,
    /// Longest wait for one replica to answer a chunk prepare or read, in milliseconds, before
    /// the coordinator tries another (default 30000).
    #[arg(long)]
    pub chunk_rpc_timeout_ms: Option<u64>,
    /// Disk bytes kept of this node's recent spans (`mendfs trace`), oldest dropped first (default 64 MiB).
    #[arg(long)]
    pub span_store_bytes: Option<u64>,
    /// Disk bytes kept of this node's structured logs (`mendfs logs`), oldest dropped first (default 64 MiB).
    #[arg(long)]
    pub log_store_bytes: Option<u64>,
    /// Also export spans over OTLP/gRPC to this collector (Jaeger, OpenTelemetry Collector), e.g. http://127.0.0.1:4317.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
}

/// The same settings, as read from `--config`.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    node_id: Option<u64>,
    listen: Option<String>,
    advertise: Option<String>,
    data_dir: Option<PathBuf>,
    peers: Option<String>,
    secret_file: Option<PathBuf>,
    insecure_dev: Option<bool>,
    http: Option<String>,
    snapshot_every_entries: Option<u64>,
    heartbeat_interval_ms: Option<u64>,
    election_timeout_ms: Option<u64>,
    max_key_bytes: Option<usize>,
    max_value_bytes: Option<usize>,
    write_timeout_ms: Option<u64>,
    log_format: Option<String>,
    chunk_size_bytes: Option<usize>,
    replication_factor: Option<usize>,
    orphan_grace_ms: Option<u64>,
    gc_interval_ms: Option<u64>,
    zone: Option<String>,
    weight: Option<u32>,
    roles: Option<Vec<String>>,
    storage_capacity_bytes: Option<u64>,
    health_interval_ms: Option<u64>,
    phi_threshold: Option<f64>,
    acceptable_pause_ms: Option<u64>,
    down_after_ms: Option<u64>,
    disk_full_ratio: Option<f64>,
    repair_bytes_per_sec: Option<u64>,
    repair_copies_in_flight: Option<usize>,
    repair_scan_interval_ms: Option<u64>,
    scrub_bytes_per_sec: Option<u64>,
    scrub_interval_ms: Option<u64>,
    chunk_rpc_timeout_ms: Option<u64>,
    span_store_bytes: Option<u64>,
    log_store_bytes: Option<u64>,
    otlp_endpoint: Option<String>,
}

/// Parses `1=127.0.0.1:7001,2=node2.example:7002` (IP addresses or DNS names).
pub fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').with_context(|| format!("peer {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id.trim().parse().with_context(|| format!("peer id {id:?} is not a number"))?;
        anyhow::ensure!(id > 0, "peer id 0 is reserved; use 1 or more");
        let addr = addr.trim();
        mendfs_meta::network::validate_node_addr(addr).map_err(|e| anyhow::anyhow!("--peers: {e}"))?;
        if peers.insert(id, addr.to_string()).is_some() {
            bail!("peer id {id} appears twice in --peers");
        }
    }
    Ok(peers)
}

/// Default disk bound of each of the span and log stores.
const TELEMETRY_STORE_BYTES_DEFAULT: u64 = 64 << 20;

/// What the node records about its own work, and where it goes.
struct Telemetry {
    sinks: Arc<Sinks>,
    spans: Arc<SpanStore>,
    logs: Arc<LogStore>,
    otlp: Option<OtlpExporter>,
}

/// Logging to stderr (as `--log-format` and `RUST_LOG` say) plus the span and log stores under
/// `DATA_DIR/telemetry/`, which keep this crate's spans and INFO lines (WARN for the libraries)
/// whatever `RUST_LOG` says, so a trace is complete even when stderr is quiet.
fn init_telemetry(
    format: &str,
    node_id: u64,
    data_dir: &std::path::Path,
    span_bytes: u64,
    log_bytes: u64,
    otlp_endpoint: Option<&str>,
) -> Result<Telemetry> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let dir = data_dir.join("telemetry");
    let spans = Arc::new(SpanStore::open(&dir.join("spans"), span_bytes).context("open the span store")?);
    let logs = Arc::new(LogStore::open(&dir.join("logs"), log_bytes).context("open the log store")?);
    let mut sinks = Sinks::new(node_id, Some(spans.clone()), Some(logs.clone()));
    let otlp = match otlp_endpoint {
        Some(endpoint) => {
            let exporter = OtlpExporter::start(endpoint, node_id).map_err(|e| anyhow::anyhow!(e))?;
            let offered = exporter.clone();
            sinks.span_listeners.push(Box::new(move |span| offered.offer(span)));
            Some(exporter)
        }
        None => None,
    };
    let sinks = Arc::new(sinks);

    let env_filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let stderr = match format {
        "json" => stderr.json().boxed(),
        "text" => stderr.boxed(),
        other => bail!("--log-format {other:?}: use text or json"),
    };
    let recorded = tracing_subscriber::filter::filter_fn(|metadata| {
        let ours = metadata.target().starts_with("mendfs");
        *metadata.level() <= if ours { tracing::Level::INFO } else { tracing::Level::WARN }
    });
    tracing_subscriber::registry()
        .with(stderr.with_filter(env_filter))
        .with(TelemetryLayer::new(sinks.clone()).with_filter(recorded))
        .try_init()
        .map_err(|e| anyhow::anyhow!("logging: {e}"))?;
    tracing::info!(node_id, "mendfs {} starting", env!("CARGO_PKG_VERSION"));
    Ok(Telemetry { sinks, spans, logs, otlp })
}

pub async fn run(args: ServerArgs) -> Result<()> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str::<FileSettings>(&text).with_context(|| format!("bad config file {}", path.display()))?
        }
        None => FileSettings::default(),
    };
    let node_id = args.node_id.or(file.node_id).context("--node-id is required")?;
    anyhow::ensure!(node_id > 0, "--node-id 0 is reserved; use 1 or more");
    let listen = args.listen.or(file.listen).context("--listen HOST:PORT is required")?;
    let listen_addr: SocketAddr = listen.parse().with_context(|| format!("--listen {listen:?} is not IP:PORT"))?;
    let advertise = args.advertise.or(file.advertise).unwrap_or_else(|| listen.clone());
    let data_dir = args.data_dir.or(file.data_dir).context("--data-dir is required")?;
    let peers = match args.peers.or(file.peers) {
        Some(text) => parse_peers(&text)?,
        None => BTreeMap::new(),
    };
    if let Some(addr) = peers.get(&node_id) {
        anyhow::ensure!(
            *addr == advertise,
            "--peers gives node {node_id} the address {addr}, but this node advertises {advertise}"
        );
    }
    let roles = args.roles.or(file.roles).unwrap_or_else(|| vec!["meta".into(), "storage".into()]);
    for role in &roles {
        anyhow::ensure!(role == "meta" || role == "storage", "--roles {role:?}: use meta, storage or both");
    }
    let meta_role = roles.iter().any(|r| r == "meta");
    let storage_role = roles.iter().any(|r| r == "storage");
    if !meta_role {
        anyhow::ensure!(
            !peers.contains_key(&node_id),
            "a storage-only node (--roles storage) is not a voter: leave it out of --peers and add it with \
             `mendfs cluster add-node {node_id} ADDR --learner`"
        );
    }
    let insecure = args.insecure_dev || file.insecure_dev.unwrap_or(false);
    let secret = crate::cli::read_secret(args.secret_file.as_ref().or(file.secret_file.as_ref()))?;
    if secret.is_none() && !insecure {
        bail!("no cluster secret: pass --secret-file FILE or set MENDFS_SECRET (or --insecure-dev for a local trial)");
    }
    let span_store_bytes = args.span_store_bytes.or(file.span_store_bytes).unwrap_or(TELEMETRY_STORE_BYTES_DEFAULT);
    let log_store_bytes = args.log_store_bytes.or(file.log_store_bytes).unwrap_or(TELEMETRY_STORE_BYTES_DEFAULT);
    let otlp_endpoint = args.otlp_endpoint.or(file.otlp_endpoint);
    let telemetry = init_telemetry(
        args.log_format.or(file.log_format).as_deref().unwrap_or("text"),
        node_id,
        &data_dir,
        span_store_bytes,
        log_store_bytes,
        otlp_endpoint.as_deref(),
    )?;
    if insecure && secret.is_none() {
        tracing::warn!("running without a cluster secret (--insecure-dev): anyone who reaches this port can write");
    }
    let http_listener = match args.http.or(file.http) {
        Some(addr) => Some(crate::http::bind(&addr).await?),
        None => None,
    };

    let mut config = NodeConfig::new(node_id, advertise, data_dir);
    config.initial_peers = peers;
    config.secret = secret;
    if let Some(n) = args.snapshot_every_entries.or(file.snapshot_every_entries) {
        anyhow::ensure!(n > 0, "--snapshot-every-entries must be at least 1");
        config.snapshot_every_entries = n;
        config.log_entries_kept_after_snapshot = config.log_entries_kept_after_snapshot.min(n);
    }
    if let Some(ms) = args.heartbeat_interval_ms.or(file.heartbeat_interval_ms) {
        config.heartbeat_interval_ms = ms;
    }
    if let Some(ms) = args.election_timeout_ms.or(file.election_timeout_ms) {
        config.election_timeout_min_ms = ms;
        config.election_timeout_max_ms = ms * 2;
    }
    anyhow::ensure!(
        config.heartbeat_interval_ms > 0 && config.heartbeat_interval_ms < config.election_timeout_min_ms,
        "the heartbeat interval must be positive and shorter than the election timeout"
    );
    if let Some(n) = args.max_key_bytes.or(file.max_key_bytes) {
        config.max_key_bytes = n;
    }
    if let Some(n) = args.max_value_bytes.or(file.max_value_bytes) {
        config.max_value_bytes = n;
    }
    if let Some(ms) = args.write_timeout_ms.or(file.write_timeout_ms) {
        config.write_timeout_ms = ms;
    }

    let mut data_config = DataConfig::default();
    if let Some(n) = args.chunk_size_bytes.or(file.chunk_size_bytes) {
        anyhow::ensure!(
            (1..=mendfs_data::CHUNK_BYTES_MAX).contains(&n),
            "--chunk-size-bytes must be within 1 ..= {}",
            mendfs_data::CHUNK_BYTES_MAX
        );
        data_config.chunk_size_bytes = n;
    }
    if let Some(n) = args.replication_factor.or(file.replication_factor) {
        anyhow::ensure!(n >= 1, "--replication-factor must be at least 1");
        data_config.replication_factor = n;
    }
    if let Some(ms) = args.orphan_grace_ms.or(file.orphan_grace_ms) {
        anyhow::ensure!(ms >= 100, "--orphan-grace-ms must be at least 100: every write must commit within it");
        data_config.orphan_grace = Duration::from_millis(ms);
    }
    if let Some(ms) = args.gc_interval_ms.or(file.gc_interval_ms) {
        anyhow::ensure!(ms > 0, "--gc-interval-ms must be positive");
        data_config.gc_interval = Duration::from_millis(ms);
    }
    if let Some(ms) = args.chunk_rpc_timeout_ms.or(file.chunk_rpc_timeout_ms) {
        anyhow::ensure!(ms > 0, "--chunk-rpc-timeout-ms must be positive");
        data_config.chunk_rpc_timeout = Duration::from_millis(ms);
    }
    if let Some(zone) = args.zone.or(file.zone) {
        data_config.zone = zone;
    }
    if let Some(weight) = args.weight.or(file.weight) {
        data_config.weight = weight;
    }
    let health_interval = Duration::from_millis(args.health_interval_ms.or(file.health_interval_ms).unwrap_or(1_000));
    anyhow::ensure!(!health_interval.is_zero(), "--health-interval-ms must be positive");
    let mut healer_config = HealerConfig {
        replication_factor: data_config.replication_factor,
        orphan_grace: data_config.orphan_grace,
        ..HealerConfig::default()
    };
    // The detector's first guess of the rhythm is the configured interval.
    healer_config.detector.phi.first_interval_estimate_ms = health_interval.as_millis() as f64;
    if let Some(phi) = args.phi_threshold.or(file.phi_threshold) {
        anyhow::ensure!(phi > 0.0 && phi.is_finite(), "--phi-threshold must be a positive number");
        healer_config.detector.phi.threshold = phi;
    }
    if let Some(ms) = args.acceptable_pause_ms.or(file.acceptable_pause_ms) {
        healer_config.detector.phi.acceptable_pause_ms = ms as f64;
    }
    if let Some(ms) = args.down_after_ms.or(file.down_after_ms) {
        healer_config.detector.down_after_ms = ms;
    }
    if let Some(ratio) = args.disk_full_ratio.or(file.disk_full_ratio) {
        anyhow::ensure!(ratio > 0.0 && ratio <= 1.0, "--disk-full-ratio must be within (0, 1]");
        healer_config.detector.disk_full_ratio = ratio;
    }
    if let Some(rate) = args.repair_bytes_per_sec.or(file.repair_bytes_per_sec) {
        healer_config.repair_bytes_per_sec = rate;
    }
    if let Some(n) = args.repair_copies_in_flight.or(file.repair_copies_in_flight) {
        anyhow::ensure!(n >= 1, "--repair-copies-in-flight must be at least 1");
        healer_config.repair_copies_in_flight = n;
    }
    if let Some(ms) = args.repair_scan_interval_ms.or(file.repair_scan_interval_ms) {
        anyhow::ensure!(ms > 0, "--repair-scan-interval-ms must be positive");
        healer_config.scan_interval = Duration::from_millis(ms);
    }
    let mut scrub_config = ScrubConfig::default();
    if let Some(rate) = args.scrub_bytes_per_sec.or(file.scrub_bytes_per_sec) {
        scrub_config.bytes_per_sec = rate;
    }
    if let Some(ms) = args.scrub_interval_ms.or(file.scrub_interval_ms) {
        scrub_config.pause_between_passes = Duration::from_millis(ms);
    }
    let storage_capacity = args.storage_capacity_bytes.or(file.storage_capacity_bytes);

    let chunk_store = if storage_role {
        Some(Arc::new(
            ChunkStore::open(&config.data_dir.join("chunks"), mendfs_data::CHUNK_BYTES_MAX)
                .with_context(|| format!("open the chunk store in {}", config.data_dir.display()))?,
        ))
    } else {
        None
    };

    // Bind before starting Raft so that a taken port fails fast with a clear message.
    let listener =
        tokio::net::TcpListener::bind(listen_addr).await.with_context(|| format!("cannot listen on {listen_addr}"))?;
    let node = MetaNode::start(config).await.map_err(|e| anyhow::anyhow!(e))?;
    let (node_service, kv_service, cluster_service) = mendfs_meta::service::services(&node);
    let (client_gate, node_gate) = mendfs_meta::service::gates(&node);
    let healer = Healer::new(node.clone(), healer_config);
    tokio::spawn(healer.clone().run());
    let health_service =
        InterceptedService::new(HealthServer::new(HealthApi { healer: healer.clone() }), node_gate.clone());
    let storage_state = chunk_store
        .map(|chunk_store| Arc::new(StorageState::new(chunk_store, data_config.orphan_grace, storage_capacity)));
    let sampler = HealthSampler::new(&node.config.data_dir, storage_state.clone());
    tokio::spawn(mendfs_data::heartbeat::run(node.clone(), healer, sampler, health_interval));
    let request_metrics = Arc::new(RequestMetrics::new());
    if let Some(listener) = http_listener {
        let leader_changes = Arc::new(AtomicU64::new(0));
        tokio::spawn(crate::http::count_leader_changes(node.clone(), leader_changes.clone()));
        let state = Arc::new(crate::http::HttpState {
            node: node.clone(),
            storage: storage_state.clone(),
            requests: request_metrics.clone(),
            sinks: telemetry.sinks.clone(),
            spans: telemetry.spans.clone(),
            logs: telemetry.logs.clone(),
            otlp: telemetry.otlp.clone(),
            leader_changes,
        });
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(listener, state).await {
                tracing::error!("{e:#}");
            }
        });
    }
    let telemetry_service = InterceptedService::new(
        TelemetryServer::new(TelemetryApi { node_id, spans: telemetry.spans.clone(), logs: telemetry.logs.clone() })
            .max_encoding_message_size(64 << 20),
        client_gate.clone(),
    );
    let storage_service = match storage_state {
        Some(storage_state) => {
            tokio::spawn(register_storage(node.clone(), data_config.clone()));
            tokio::spawn(mendfs_data::scrub::run(node.clone(), storage_state.clone(), scrub_config));
            tokio::spawn(mendfs_data::gc::run(
                node.clone(),
                storage_state.clone(),
                data_config.orphan_grace,
                data_config.gc_interval,
            ));
            Some(InterceptedService::new(
                StorageServer::new(StorageApi::new(storage_state, node.peers.clone()))
                    .max_decoding_message_size(mendfs_data::CHUNK_BYTES_MAX + 1024)
                    .max_encoding_message_size(mendfs_data::CHUNK_BYTES_MAX + 1024),
                node_gate,
            ))
        }
        None => None,
    };
    let files_service = InterceptedService::new(
        FilesServer::new(Coordinator::new(node.clone(), data_config.clone()))
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20),
        client_gate,
    );
    tracing::info!(%listen_addr, "serving");
    let serve = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .layer(RpcTraceLayer::new(request_metrics))
        .add_service(node_service)
        .add_service(kv_service)
        .add_service(cluster_service)
        .add_optional_service(storage_service)
        .add_service(health_service)
        .add_service(files_service)
        .add_service(telemetry_service)
        .serve_with_incoming_shutdown(
            // TCP_NODELAY on every accepted connection: replies are small, and Nagle's
            // algorithm against the peer's delayed ACK would hold each one for ~40 ms.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown_signal(),
        );
    let result = serve.await.context("gRPC server");
    tracing::info!("shutting down");
    if let Err(e) = node.raft.shutdown().await {
        tracing::warn!("raft shutdown: {e}");
    }
    result
}

/// Announces this node's storage to the cluster, retrying until the metadata accepts it.
async fn register_storage(node: MetaNode, data: DataConfig) {
    let storage_node = StorageNode {
        id: node.config.node_id,
        addr: node.config.advertise_addr.clone(),
        zone: data.zone,
        weight: data.weight,
        draining: false,
        liveness: mendfs_heal::detector::Liveness::Up,
    };
    loop {
        let command = Command::RegisterStorageNode { node: storage_node.clone() };
        match node.execute(None, command).await {
            Ok(_) => {
                tracing::info!("storage registered");
                return;
            }
            Err(e) => tracing::debug!("storage registration will be retried: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn shutdown_signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
