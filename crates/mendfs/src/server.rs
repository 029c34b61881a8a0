//! `mendfs server`: turns the `--config` file, `MENDFS_*` environment variables and flags (each
//! overriding the one before) into a `NodeConfig`, installs logging, and runs the node until
//! SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use mendfs_node::{Node, NodeConfig, Telemetry};
use mendfs_telemetry::layer::{Sinks, TelemetryLayer};
use serde::Serialize;
use std::sync::Arc;

/// Every setting of `mendfs server`. Precedence: the `--config` file, then `MENDFS_*` environment
/// variables, then flags; what none sets keeps its default (see `mendfs_node::NodeConfig`).
/// Serialized only to be merged over the file's settings.
#[derive(Args, Debug, Default, Serialize)]
pub struct ServerArgs {
    /// TOML file with any of the settings below (same names, with underscores).
    #[serde(skip)]
    #[arg(long, env = "MENDFS_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id (1 or more), unique in the cluster and stable across restarts.
    #[arg(long, env = "MENDFS_NODE_ID")]
    pub node_id: Option<u64>,
    /// Address to listen on for peers and clients, HOST:PORT.
    #[arg(long, env = "MENDFS_LISTEN")]
    pub listen: Option<String>,
    /// Address others use to reach this node, if not the listen address.
    #[arg(long, env = "MENDFS_ADVERTISE")]
    pub advertise: Option<String>,
    /// Directory for the Raft log, the state machine and snapshots.
    #[arg(long, env = "MENDFS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The initial voters: ID=HOST:PORT separated by commas. The lowest id bootstraps the cluster, once.
    #[arg(long, env = "MENDFS_PEERS")]
    pub peers: Option<String>,
    /// File holding the cluster secret (else MENDFS_SECRET).
    #[arg(long, env = "MENDFS_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Run without a cluster secret: anyone who reaches the port can read and write. Local trials only.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[arg(long, env = "MENDFS_INSECURE_DEV")]
    pub insecure_dev: bool,
    /// Address for HTTP: Prometheus `/metrics`, `/healthz` and `/readyz` (IP:PORT; off if unset).
    #[arg(long, env = "MENDFS_HTTP")]
    pub http: Option<String>,
    /// Take a snapshot and compact the Raft log every this many entries.
    #[arg(long, env = "MENDFS_SNAPSHOT_EVERY_ENTRIES")]
    pub snapshot_every_entries: Option<u64>,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, env = "MENDFS_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Lower bound of the randomized election timeout in milliseconds (the upper bound is twice it).
    #[arg(long, env = "MENDFS_ELECTION_TIMEOUT_MS")]
    pub election_timeout_ms: Option<u64>,
    /// Largest key accepted, in bytes.
    #[arg(long, env = "MENDFS_MAX_KEY_BYTES")]
    pub max_key_bytes: Option<usize>,
    /// Largest value accepted, in bytes.
    #[arg(long, env = "MENDFS_MAX_VALUE_BYTES")]
    pub max_value_bytes: Option<usize>,
    /// How long a write may wait for a quorum before failing, in milliseconds.
    #[arg(long, env = "MENDFS_WRITE_TIMEOUT_MS")]
    pub write_timeout_ms: Option<u64>,
    /// Byte quota of the coordination keyspace, keys and history (default 2GiB); writes beyond
    /// it are refused until keys are deleted and history compacted. Accepts 64MiB, 2GiB, ...
    /// Cluster-wide: the leader's value applies, so set the same on every node.
    #[arg(long, env = "MENDFS_KV_QUOTA_BYTES", value_parser = parse_byte_size)]
    pub kv_quota_bytes: Option<u64>,
    /// Bytes of key history kept for watchers (default 512MiB); beyond, the oldest revisions go.
    /// Cluster-wide.
    #[arg(long, env = "MENDFS_KV_HISTORY_BYTES", value_parser = parse_byte_size)]
    pub kv_history_bytes: Option<u64>,
    /// Most coordination sessions open at once (default 1000000). Cluster-wide.
    #[arg(long, env = "MENDFS_MAX_SESSIONS")]
    pub max_sessions: Option<u64>,
    /// Log format on stderr: text or json.
    #[arg(long, env = "MENDFS_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Size of the chunks files are cut into, in bytes (default 4 MiB).
    #[arg(long, env = "MENDFS_CHUNK_SIZE_BYTES")]
    pub chunk_size_bytes: Option<usize>,
    /// Copies of every chunk (default 3). The same on every node.
    #[arg(long, env = "MENDFS_REPLICATION_FACTOR")]
    pub replication_factor: Option<usize>,
    /// How long prepared chunks are protected from collection, in milliseconds (default 10 min).
    /// The same on every node.
    #[arg(long, env = "MENDFS_ORPHAN_GRACE_MS")]
    pub orphan_grace_ms: Option<u64>,
    /// How often this node looks for orphaned chunk copies, in milliseconds (default 60 s).
    #[arg(long, env = "MENDFS_GC_INTERVAL_MS")]
    pub gc_interval_ms: Option<u64>,
    /// Failure domain of this node (rack, room); replicas go to distinct zones where possible.
    #[arg(long, env = "MENDFS_ZONE")]
    pub zone: Option<String>,
    /// Relative capacity of this node for placement (100 = a default node).
    #[arg(long, env = "MENDFS_WEIGHT")]
    pub weight: Option<u32>,
    /// What this node does: `meta` (a Raft voter for the metadata) and/or `storage` (holds
    /// chunks). A storage-only node joins as a non-voting learner (`cluster add-node --learner`).
    #[arg(long, value_delimiter = ',', env = "MENDFS_ROLES")]
    pub roles: Option<Vec<String>>,
    /// Cap on the chunk bytes this node stores (default: the filesystem's size). Fullness is
    /// then measured against the cap: a node whose room left (under the cap, or on the
    /// filesystem if that has less) falls below `1 - disk_full_ratio` of the cap is `degraded`
    /// and receives no new chunks. Without a cap it is the whole filesystem's fullness, which
    /// on a shared disk counts other programs' files too.
    #[arg(long, env = "MENDFS_STORAGE_CAPACITY_BYTES")]
    pub storage_capacity_bytes: Option<u64>,
    /// How often this node sends the leader a heartbeat with its health, in milliseconds (default 1000).
    #[arg(long, env = "MENDFS_HEALTH_INTERVAL_MS")]
    pub health_interval_ms: Option<u64>,
    /// Phi at which the leader suspects a node (default 8).
    #[arg(long, env = "MENDFS_PHI_THRESHOLD")]
    pub phi_threshold: Option<f64>,
    /// Heartbeat delay tolerated before suspicion grows, in milliseconds (default 3000).
    #[arg(long, env = "MENDFS_ACCEPTABLE_PAUSE_MS")]
    pub acceptable_pause_ms: Option<u64>,
    /// How long a node stays suspect before it is declared down and repaired, in milliseconds (default 10000).
    #[arg(long, env = "MENDFS_DOWN_AFTER_MS")]
    pub down_after_ms: Option<u64>,
    /// Disk use (used/capacity) at which a node becomes degraded (default 0.9).
    #[arg(long, env = "MENDFS_DISK_FULL_RATIO")]
    pub disk_full_ratio: Option<f64>,
    /// Repair copy bandwidth across the cluster in bytes per second; 0 = unthrottled (default 128 MiB/s).
    #[arg(long, env = "MENDFS_REPAIR_BYTES_PER_SEC")]
    pub repair_bytes_per_sec: Option<u64>,
    /// Repair copies in flight at once (default 8).
    #[arg(long, env = "MENDFS_REPAIR_COPIES_IN_FLIGHT")]
    pub repair_copies_in_flight: Option<usize>,
    /// How often the leader scans the chunk map for repair work, in milliseconds (default 1000).
    #[arg(long, env = "MENDFS_REPAIR_SCAN_INTERVAL_MS")]
    pub repair_scan_interval_ms: Option<u64>,
    /// Scrub read bandwidth in bytes per second; 0 = scrubbing off (default 32 MiB/s).
    #[arg(long, env = "MENDFS_SCRUB_BYTES_PER_SEC")]
    pub scrub_bytes_per_sec: Option<u64>,
    /// Rest between two scrub passes, in milliseconds (default 1 hour).
    #[arg(long, env = "MENDFS_SCRUB_INTERVAL_MS")]
    pub scrub_interval_ms: Option<u64>,
    /// Longest wait for one replica to answer a chunk prepare or read, in milliseconds, before
    /// the coordinator tries another (default 30000).
    #[arg(long, env = "MENDFS_CHUNK_RPC_TIMEOUT_MS")]
    pub chunk_rpc_timeout_ms: Option<u64>,
    /// Chunk bytes this node holds for replicas at once as a coordinator, across all the
    /// uploads it serves (default 32 MiB, at least one chunk): received bytes that a replica's
    /// stream has not yet taken (erasure-coded puts: whole chunks being encoded and sent),
    /// however many clients upload. A budget of the same size, apart, bounds the chunks its
    /// readers fetch ahead.
    #[arg(long, env = "MENDFS_MAX_INFLIGHT_BYTES")]
    pub max_inflight_bytes: Option<usize>,
    /// Files and objects up to this size are stored inline in the metadata, replicated by
    /// Raft, in one step instead of a prepare on each replica and a commit (default 16384;
    /// at most 65536; 0 turns it off).
    #[arg(long, env = "MENDFS_INLINE_MAX_BYTES")]
    pub inline_max_bytes: Option<usize>,
    /// What an `ec:K+M` put does when fewer than K + M storage nodes accept data: `fail`
    /// (default) refuses it; `replicate` keeps it as the cluster's copies and says so.
    #[arg(long, env = "MENDFS_EC_FALLBACK", value_parser = ["fail", "replicate"])]
    pub ec_fallback: Option<String>,
    /// Disk bytes kept of this node's recent spans (`mendfs trace`), oldest dropped first (default 64 MiB).
    #[arg(long, env = "MENDFS_SPAN_STORE_BYTES")]
    pub span_store_bytes: Option<u64>,
    /// Disk bytes kept of this node's structured logs (`mendfs logs`), oldest dropped first (default 64 MiB).
    #[arg(long, env = "MENDFS_LOG_STORE_BYTES")]
    pub log_store_bytes: Option<u64>,
    /// Also export spans over OTLP/gRPC to this collector (Jaeger, OpenTelemetry Collector), e.g. http://127.0.0.1:4317.
    #[arg(long, env = "MENDFS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Require `Authorization: Bearer TOKEN` on `/metrics` (`/healthz` and `/readyz` stay open).
    /// Prefer the environment or the config file: a flag shows in the process list.
    #[arg(long, env = "MENDFS_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// This node's TLS certificate (PEM, from `mendfs cert init` or your CA). With --tls-key
    /// and --tls-ca, every listener speaks only TLS, and peers must present node certificates.
    #[arg(long, env = "MENDFS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This node's TLS private key (PEM).
    #[arg(long, env = "MENDFS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA certificate (PEM): peers' and clients' certificates must chain to it.
    #[arg(long, env = "MENDFS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Connections open at once on each listener; more are closed at once (default 4096).
    #[arg(long, env = "MENDFS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections open at once from one IP address on each listener (default 1024).
    #[arg(long, env = "MENDFS_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Close a connection that sent nothing for this long, in milliseconds (default 300000).
    #[arg(long, env = "MENDFS_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Address for the S3 API (IP:PORT; off if unset). TLS when the node has TLS. Access keys
    /// and buckets: `mendfs s3`.
    #[arg(long, env = "MENDFS_S3")]
    pub s3: Option<String>,
    /// The region S3 clients sign for (default us-east-1).
    #[arg(long, env = "MENDFS_S3_REGION")]
    pub s3_region: Option<String>,
    /// A base domain for virtual-hosted-style S3 requests (BUCKET.DOMAIN[:PORT]); repeat for
    /// several. Path-style requests always work.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[arg(long = "s3-domain", env = "MENDFS_S3_DOMAINS", value_delimiter = ',')]
    pub s3_domains: Vec<String>,
    /// Every part of an S3 multipart upload but the last must be at least this many bytes
    /// (default 5 MiB, as S3).
    #[arg(long, env = "MENDFS_S3_MIN_PART_BYTES")]
    pub s3_min_part_bytes: Option<u64>,
    /// Abort S3 multipart uploads not completed this long after they began, in milliseconds
    /// (default 1 day). Cluster-wide: the leader's value applies.
    #[arg(long, env = "MENDFS_S3_UPLOAD_EXPIRY_MS")]
    pub s3_upload_expiry_ms: Option<u64>,
    /// FOR `mendfs chaos` ONLY, never in production: obey the fault control file
    /// DATA_DIR/faults.json (polled every 200 ms; a slow or full chunk store) and accept the
    /// fault-only flags below. Off by default.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[arg(long, env = "MENDFS_ALLOW_FAULT_INJECTION")]
    pub allow_fault_injection: bool,
    /// DELIBERATELY BROKEN, for `mendfs chaos` only (needs --allow-fault-injection): answer key
    /// reads from this node's own state without the leader or read-index, so they can be stale.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[arg(long, env = "MENDFS_UNSAFE_LOCAL_READS")]
    pub unsafe_local_reads: bool,
}

impl ServerArgs {
    /// The node's settings: the file's, overridden by those given in the environment or as
    /// flags (clap has already let flags override the environment).
    pub fn node_config(&self) -> Result<NodeConfig> {
        // Merged as JSON maps: JSON numbers hold every u64 a flag may give (TOML's stop at i64).
        let mut settings = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
                let table: toml::Table = text.parse().with_context(|| format!("bad config file {}", path.display()))?;
                serde_json::to_value(table)?
            }
            None => serde_json::json!({}),
        };
        if let (Some(settings), serde_json::Value::Object(given)) =
            (settings.as_object_mut(), serde_json::to_value(self)?)
        {
            // A flag or variable not given is null here, and leaves the file's setting alone.
            settings.extend(given.into_iter().filter(|(_, value)| !value.is_null()));
        }
        let mut config: NodeConfig = serde_json::from_value(settings).with_context(|| match &self.config {
            Some(path) => format!("bad config file {}", path.display()),
            None => "bad settings".to_string(),
        })?;
        config.secret = crate::cli::read_secret(config.secret_file.as_ref())?;
        config.check()?;
        Ok(config)
    }
}

pub async fn run(args: ServerArgs) -> Result<()> {
    let config = args.node_config()?;
    let telemetry = Telemetry::open(&config)?;
    init_logging(&config.log_format, config.node_id, telemetry.sinks.clone())?;
    if config.secret.is_none() {
        tracing::warn!("running without a cluster secret (--insecure-dev): anyone who reaches this port can write");
    }
    let node = Node::start(config, telemetry).await?;
    let stopped_itself = tokio::select! {
        _ = shutdown_signal() => None,
        why = node.stopped() => Some(why),
    };
    tracing::info!("shutting down");
    node.stop().await?;
    match stopped_itself {
        Some(why) => Err(why.into()),
        None => Ok(()),
    }
}

/// Logging to stderr (as `--log-format` and `RUST_LOG` say) plus the node's span and log
/// stores, which keep this crate's spans and INFO lines (WARN for the libraries) whatever
/// `RUST_LOG` says, so a trace is complete even when stderr is quiet.
fn init_logging(format: &str, node_id: u64, sinks: Arc<Sinks>) -> Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let env_filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(mendfs_node::DEFAULT_LOG_FILTER));
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let stderr = if format == "json" { stderr.json().boxed() } else { stderr.boxed() };
    let recorded = tracing_subscriber::filter::filter_fn(|metadata| {
        let ours = metadata.target().starts_with("mendfs");
        *metadata.level() <= if ours { tracing::Level::INFO } else { tracing::Level::WARN }
    });
    tracing_subscriber::registry()
        .with(stderr.with_filter(env_filter))
        .with(TelemetryLayer::new(sinks).with_filter(recorded))
        .try_init()
        .map_err(|e| anyhow::anyhow!("logging: {e}"))?;
    tracing::info!(node_id, "mendfs {} starting", env!("CARGO_PKG_VERSION"));
    Ok(())
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

/// A size as operators write it: `67108864`, `64MiB`, `2GiB`, `500MB`.
fn parse_byte_size(text: &str) -> Result<u64, String> {
    byte_unit::Byte::parse_str(text, true)
        .map(|size| size.as_u64())
        .map_err(|e| format!("{text:?} is not a size like 64MiB or 2GiB: {e}"))
}
