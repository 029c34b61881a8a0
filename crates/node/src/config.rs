//! Every setting of a node in one struct, with its default, its check, and the settings of the
//! parts it is made of. The binary fills it from a TOML file, then the environment, then flags;
//! a test builds it in code.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mendfs_data::healer::HealerConfig;
use mendfs_data::scrub::ScrubConfig;
use mendfs_data::DataConfig;
use mendfs_meta::MetaConfig;
use mendfs_types::NodeId;
use serde::{Deserialize, Serialize};

/// A setting that is missing or out of range, named as the operator spells it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

macro_rules! ensure {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(ConfigError(format!($($message)+)));
        }
    };
}

/// All of a node's settings. Field names are the TOML keys and, with dashes, the flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id (1 or more), unique in the cluster and stable across restarts.
    pub node_id: NodeId,
    /// Address to listen on for peers and clients, IP:PORT (port 0: any free port).
    pub listen: String,
    /// Address others use to reach this node, if not the listen address.
    pub advertise: Option<String>,
    /// Directory for the Raft log, the state machine, snapshots, chunks and telemetry.
    pub data_dir: PathBuf,
    /// The initial voters, `ID=HOST:PORT` separated by commas; the lowest id bootstraps the
    /// cluster, once.
    pub peers: Option<String>,
    /// File holding the cluster secret (the binary reads it into `secret`).
    pub secret_file: Option<PathBuf>,
    /// The cluster secret itself; never read from or written to a config file.
    #[serde(skip)]
    pub secret: Option<String>,
    /// Run without a cluster secret: anyone who reaches the port can read and write.
    pub insecure_dev: bool,
    /// Address for HTTP: `/metrics`, `/healthz`, `/readyz` (IP:PORT; off if unset).
    pub http: Option<String>,
    pub snapshot_every_entries: u64,
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomized election timeout (the upper bound is twice it).
    pub election_timeout_ms: u64,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub write_timeout_ms: u64,
    /// Byte quota of the coordination keyspace (live keys and their history). Cluster-wide:
    /// the leader's value applies, so set the same on every node.
    pub kv_quota_bytes: u64,
    /// Bytes of key history kept for watchers, beyond which the oldest revisions go. Cluster-wide.
    pub kv_history_bytes: u64,
    /// Most sessions open at once. Cluster-wide.
    pub max_sessions: u64,
    /// Log format on stderr: `text` or `json`.
    pub log_format: String,
    pub chunk_size_bytes: usize,
    pub replication_factor: usize,
    pub orphan_grace_ms: u64,
    pub gc_interval_ms: u64,
    pub zone: String,
    pub weight: u32,
    /// `meta` (a Raft voter) and/or `storage` (holds chunks).
    pub roles: Vec<String>,
    pub storage_capacity_bytes: Option<u64>,
    pub health_interval_ms: u64,
    pub phi_threshold: f64,
    pub acceptable_pause_ms: u64,
    pub down_after_ms: u64,
    pub disk_full_ratio: f64,
    pub repair_bytes_per_sec: u64,
    pub repair_copies_in_flight: usize,
    pub repair_scan_interval_ms: u64,
    pub scrub_bytes_per_sec: u64,
    pub scrub_interval_ms: u64,
    pub chunk_rpc_timeout_ms: u64,
    /// Chunk bytes held at once as a coordinator (`DataConfig::max_inflight_bytes`).
    pub max_inflight_bytes: usize,
    /// Content kept inline in the metadata up to this size (`DataConfig::inline_max_bytes`).
    pub inline_max_bytes: usize,
    /// What an `ec:K+M` put does when fewer than K + M storage nodes accept data: `fail` (the
    /// default: the put is refused, saying how many nodes there are) or `replicate` (it is
    /// kept as the cluster's copies, and the reply says why).
    pub ec_fallback: String,
    pub span_store_bytes: u64,
    pub log_store_bytes: u64,
    pub otlp_endpoint: Option<String>,
    /// When set, `/metrics` answers only `Authorization: Bearer <this>`.
    pub metrics_token: Option<String>,
    /// This node's TLS certificate (PEM, issued by `tls_ca`); with `tls_key` and `tls_ca`,
    /// every listener speaks only TLS and peers must present node certificates.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The cluster CA: peers' and clients' certificates must chain to it.
    pub tls_ca: Option<PathBuf>,
    /// Connections open at once on each listener; more are closed at once.
    pub max_connections: usize,
    /// Connections open at once from one IP address on each listener.
    pub max_connections_per_ip: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_ms: u64,
    /// Address for the S3 API (IP:PORT; off if unset); TLS when the node has TLS.
    pub s3: Option<String>,
    /// The region S3 clients sign for.
    pub s3_region: String,
    /// Base domains for virtual-hosted-style S3 requests (`BUCKET.DOMAIN[:PORT]`).
    pub s3_domains: Vec<String>,
    /// Every part of an S3 multipart upload but the last must be at least this big.
    pub s3_min_part_bytes: u64,
    /// An S3 multipart upload not completed this long after it began is aborted. Cluster-wide:
    /// the leader's value applies.
    pub s3_upload_expiry_ms: u64,
    /// Lets `mendfs chaos` inject faults into this node: it polls `<data_dir>/faults.json`
    /// (a slow or full chunk store), and the fault-only settings below are accepted. Never in
    /// production.
    pub allow_fault_injection: bool,
    /// Deliberately broken, for `mendfs chaos` only (needs `allow_fault_injection`): serves a
    /// key's Get from this node's own state, without the leader and without read-index, so a
    /// follower or a cut-off ex-leader answers stale values.
    pub unsafe_local_reads: bool,
}

/// Default disk bound of each of the span and log stores.
const TELEMETRY_STORE_BYTES_DEFAULT: u64 = 64 << 20;

impl Default for NodeConfig {
    fn default() -> Self {
        let meta = MetaConfig::new(0, String::new(), PathBuf::new());
        let data = DataConfig::default();
        let healer = HealerConfig::default();
        let scrub = ScrubConfig::default();
        Self {
            node_id: 0,
            listen: String::new(),
            advertise: None,
            data_dir: PathBuf::new(),
            peers: None,
            secret_file: None,
            secret: None,
            insecure_dev: false,
            http: None,
            snapshot_every_entries: meta.snapshot_every_entries,
            heartbeat_interval_ms: meta.heartbeat_interval_ms,
            election_timeout_ms: meta.election_timeout_min_ms,
            max_key_bytes: meta.max_key_bytes,
            max_value_bytes: meta.max_value_bytes,
            write_timeout_ms: meta.write_timeout_ms,
            kv_quota_bytes: meta.limits.kv_quota_bytes,
            kv_history_bytes: meta.limits.kv_history_bytes,
            max_sessions: meta.limits.max_sessions,
            log_format: "text".into(),
            chunk_size_bytes: data.chunk_size_bytes,
            replication_factor: data.replication_factor,
            orphan_grace_ms: data.orphan_grace.as_millis() as u64,
            gc_interval_ms: data.gc_interval.as_millis() as u64,
            zone: data.zone,
            weight: data.weight,
            roles: vec!["meta".into(), "storage".into()],
            storage_capacity_bytes: None,
            health_interval_ms: 1_000,
            phi_threshold: healer.detector.phi.threshold,
            acceptable_pause_ms: healer.detector.phi.acceptable_pause_ms as u64,
            down_after_ms: healer.detector.down_after_ms,
            disk_full_ratio: healer.detector.disk_full_ratio,
            repair_bytes_per_sec: healer.repair_bytes_per_sec,
            repair_copies_in_flight: healer.repair_copies_in_flight,
            repair_scan_interval_ms: healer.scan_interval.as_millis() as u64,
            scrub_bytes_per_sec: scrub.bytes_per_sec,
            scrub_interval_ms: scrub.pause_between_passes.as_millis() as u64,
            chunk_rpc_timeout_ms: data.chunk_rpc_timeout.as_millis() as u64,
            max_inflight_bytes: data.max_inflight_bytes,
            inline_max_bytes: data.inline_max_bytes,
            ec_fallback: if data.ec_fallback_replicate { "replicate" } else { "fail" }.into(),
            span_store_bytes: TELEMETRY_STORE_BYTES_DEFAULT,
            log_store_bytes: TELEMETRY_STORE_BYTES_DEFAULT,
            otlp_endpoint: None,
            metrics_token: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            max_connections: 4_096,
            max_connections_per_ip: 1_024,
            idle_timeout_ms: 300_000,
            s3: None,
            s3_region: "us-east-1".into(),
            s3_domains: Vec::new(),
            s3_min_part_bytes: 5 << 20,
            s3_upload_expiry_ms: meta.s3_upload_expiry_ms,
            allow_fault_injection: false,
            unsafe_local_reads: meta.unsafe_local_reads,
        }
    }
}

/// Parses `1=127.0.0.1:7001,2=node2.example:7002` (IP addresses or DNS names).
pub fn parse_peers(text: &str) -> Result<BTreeMap<NodeId, String>, ConfigError> {
    let mut peers = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) =
            part.split_once('=').ok_or_else(|| ConfigError(format!("peer {part:?} is not ID=HOST:PORT")))?;
        let id: NodeId = id.trim().parse().map_err(|_| ConfigError(format!("peer id {id:?} is not a number")))?;
        ensure!(id > 0, "peer id 0 is reserved; use 1 or more");
        let addr = addr.trim();
        mendfs_meta::validate_node_addr(addr).map_err(|e| ConfigError(format!("--peers: {e}")))?;
        ensure!(peers.insert(id, addr.to_string()).is_none(), "peer id {id} appears twice in --peers");
    }
    Ok(peers)
}

/// The settings of each part, derived from a checked [`NodeConfig`].
#[derive(Debug, Clone)]
pub(crate) struct Parts {
    pub listen: SocketAddr,
    pub meta: MetaConfig,
    pub data: DataConfig,
    pub healer: HealerConfig,
    pub scrub: ScrubConfig,
    pub health_interval: Duration,
    pub storage_role: bool,
    pub tls: Option<TlsFiles>,
    pub limits: crate::listener::ConnectionLimits,
    /// Whether the node polls its fault control file (see `crate::faults`).
    pub allow_fault_injection: bool,
}

/// Where a node's TLS material is.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl NodeConfig {
    /// The address others reach this node at.
    pub fn advertise_addr(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    /// Checks every setting; says which one is wrong.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.parts().map(drop)
    }

    /// Checks every setting and derives the parts' settings; says which setting is wrong.
    pub(crate) fn parts(&self) -> Result<Parts, ConfigError> {
        ensure!(self.node_id > 0, "--node-id is required (1 or more; 0 is reserved)");
        ensure!(!self.listen.is_empty(), "--listen HOST:PORT is required");
        let listen: SocketAddr =
            self.listen.parse().map_err(|_| ConfigError(format!("--listen {:?} is not IP:PORT", self.listen)))?;
        ensure!(!self.data_dir.as_os_str().is_empty(), "--data-dir is required");
        // Fault-only settings are refused, not ignored, without the switch: a node must never
        // run a broken mode because of a stray line in a config file.
        ensure!(
            !self.unsafe_local_reads || self.allow_fault_injection,
            "--unsafe-local-reads is a fault-injection mode for `mendfs chaos` and needs --allow-fault-injection \
             (never use either in production)"
        );
        let advertise = self.advertise_addr().to_string();
        let peers = match &self.peers {
            Some(text) => parse_peers(text)?,
            None => BTreeMap::new(),
        };
        if let Some(addr) = peers.get(&self.node_id) {
            ensure!(
                *addr == advertise,
                "--peers gives node {} the address {addr}, but this node advertises {advertise}",
                self.node_id
            );
        }
        for role in &self.roles {
            ensure!(role == "meta" || role == "storage", "--roles {role:?}: use meta, storage or both");
        }
        let meta_role = self.roles.iter().any(|r| r == "meta");
        let storage_role = self.roles.iter().any(|r| r == "storage");
        if !meta_role {
            ensure!(
                !peers.contains_key(&self.node_id),
                "a storage-only node (--roles storage) is not a voter: leave it out of --peers and add it with \
                 `mendfs cluster add-node {} ADDR --learner`",
                self.node_id
            );
        }
        ensure!(self.secret.as_ref().is_none_or(|secret| !secret.is_empty()), "the cluster secret is empty");
        ensure!(self.metrics_token.as_ref().is_none_or(|token| !token.is_empty()), "--metrics-token is empty");
        if let Some(http) = &self.http {
            ensure!(http.parse::<SocketAddr>().is_ok(), "--http {http:?} is not IP:PORT");
        }
        if let Some(s3) = &self.s3 {
            ensure!(s3.parse::<SocketAddr>().is_ok(), "--s3 {s3:?} is not IP:PORT");
        }
        ensure!(!self.s3_region.is_empty() && self.s3_region.len() <= 64, "--s3-region must be 1 to 64 characters");
        ensure!(self.s3_upload_expiry_ms >= 60_000, "--s3-upload-expiry-ms must be at least 60000");
        let tls = match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                Some(TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() })
            }
            (None, None, None) => None,
            _ => return Err(ConfigError("TLS needs all of --tls-cert, --tls-key and --tls-ca".into())),
        };
        ensure!(self.max_connections >= 1, "--max-connections must be at least 1");
        ensure!(self.max_connections_per_ip >= 1, "--max-connections-per-ip must be at least 1");
        ensure!(self.idle_timeout_ms >= 1_000, "--idle-timeout-ms must be at least 1000");
        let limits = crate::listener::ConnectionLimits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
        };
        ensure!(
            self.secret.is_some() || self.insecure_dev,
            "no cluster secret: pass --secret-file FILE or set MENDFS_SECRET (or --insecure-dev for a local trial)"
        );
        ensure!(
            self.log_format == "text" || self.log_format == "json",
            "--log-format {:?}: use text or json",
            self.log_format
        );

        let mut meta = MetaConfig::new(self.node_id, advertise, self.data_dir.clone());
        meta.initial_peers = peers;
        meta.secret = self.secret.clone();
        ensure!(self.snapshot_every_entries > 0, "--snapshot-every-entries must be at least 1");
        meta.snapshot_every_entries = self.snapshot_every_entries;
        meta.log_entries_kept_after_snapshot = meta.log_entries_kept_after_snapshot.min(self.snapshot_every_entries);
        meta.heartbeat_interval_ms = self.heartbeat_interval_ms;
        meta.election_timeout_min_ms = self.election_timeout_ms;
        meta.election_timeout_max_ms = self.election_timeout_ms.saturating_mul(2);
        ensure!(
            meta.heartbeat_interval_ms > 0 && meta.heartbeat_interval_ms < meta.election_timeout_min_ms,
            "the heartbeat interval must be positive and shorter than the election timeout"
        );
        meta.max_key_bytes = self.max_key_bytes;
        meta.max_value_bytes = self.max_value_bytes;
        meta.write_timeout_ms = self.write_timeout_ms;
        ensure!(
            (1..=8 << 20).contains(&self.max_value_bytes),
            "--max-value-bytes must be within 1 ..= 8388608 (8 MiB): every node-to-node message is bounded"
        );
        ensure!((1..=64 << 10).contains(&self.max_key_bytes), "--max-key-bytes must be within 1 ..= 65536");
        ensure!(
            self.kv_quota_bytes >= self.max_value_bytes as u64 * 2,
            "--kv-quota-bytes ({}) must hold at least two of the largest values (--max-value-bytes {})",
            self.kv_quota_bytes,
            self.max_value_bytes
        );
        ensure!(self.max_sessions >= 1, "--max-sessions must be at least 1");
        meta.s3_upload_expiry_ms = self.s3_upload_expiry_ms;
        meta.unsafe_local_reads = self.unsafe_local_reads;
        meta.limits = mendfs_meta::Limits {
            kv_quota_bytes: self.kv_quota_bytes,
            kv_history_bytes: self.kv_history_bytes,
            max_sessions: self.max_sessions,
        };

        ensure!(
            (1..=mendfs_data::CHUNK_BYTES_MAX).contains(&self.chunk_size_bytes),
            "--chunk-size-bytes must be within 1 ..= {}",
            mendfs_data::CHUNK_BYTES_MAX
        );
        ensure!(self.replication_factor >= 1, "--replication-factor must be at least 1");
        ensure!(
            self.orphan_grace_ms >= 100,
            "--orphan-grace-ms must be at least 100: every write must commit within it"
        );
        ensure!(self.gc_interval_ms > 0, "--gc-interval-ms must be positive");
        ensure!(self.chunk_rpc_timeout_ms > 0, "--chunk-rpc-timeout-ms must be positive");
        ensure!(
            self.max_inflight_bytes >= self.chunk_size_bytes,
            "--max-inflight-bytes must hold at least one chunk ({} bytes)",
            self.chunk_size_bytes
        );
        ensure!(
            self.inline_max_bytes <= mendfs_meta::INLINE_CHUNK_BYTES_MAX,
            "--inline-max-bytes must be at most {}",
            mendfs_meta::INLINE_CHUNK_BYTES_MAX
        );
        let data = DataConfig {
            chunk_size_bytes: self.chunk_size_bytes,
            replication_factor: self.replication_factor,
            orphan_grace: Duration::from_millis(self.orphan_grace_ms),
            gc_interval: Duration::from_millis(self.gc_interval_ms),
            zone: self.zone.clone(),
            weight: self.weight,
            chunk_rpc_timeout: Duration::from_millis(self.chunk_rpc_timeout_ms),
            max_inflight_bytes: self.max_inflight_bytes,
            inline_max_bytes: self.inline_max_bytes,
            ec_fallback_replicate: match self.ec_fallback.as_str() {
                "fail" => false,
                "replicate" => true,
                other => return Err(ConfigError(format!("--ec-fallback {other:?}: say fail or replicate"))),
            },
        };

        ensure!(self.health_interval_ms > 0, "--health-interval-ms must be positive");
        ensure!(
            self.phi_threshold > 0.0 && self.phi_threshold.is_finite(),
            "--phi-threshold must be a positive number"
        );
        ensure!(self.disk_full_ratio > 0.0 && self.disk_full_ratio <= 1.0, "--disk-full-ratio must be within (0, 1]");
        ensure!(self.repair_copies_in_flight >= 1, "--repair-copies-in-flight must be at least 1");
        ensure!(self.repair_scan_interval_ms > 0, "--repair-scan-interval-ms must be positive");
        let mut healer = HealerConfig {
            replication_factor: data.replication_factor,
            orphan_grace: data.orphan_grace,
            repair_bytes_per_sec: self.repair_bytes_per_sec,
            repair_copies_in_flight: self.repair_copies_in_flight,
            scan_interval: Duration::from_millis(self.repair_scan_interval_ms),
            ..HealerConfig::default()
        };
        // The detector's first guess of the rhythm is the configured interval.
        healer.detector.phi.first_interval_estimate_ms = self.health_interval_ms as f64;
        healer.detector.phi.threshold = self.phi_threshold;
        healer.detector.phi.acceptable_pause_ms = self.acceptable_pause_ms as f64;
        healer.detector.down_after_ms = self.down_after_ms;
        healer.detector.disk_full_ratio = self.disk_full_ratio;
        let scrub = ScrubConfig {
            bytes_per_sec: self.scrub_bytes_per_sec,
            pause_between_passes: Duration::from_millis(self.scrub_interval_ms),
        };
        Ok(Parts {
            listen,
            meta,
            data,
            healer,
            scrub,
            health_interval: Duration::from_millis(self.health_interval_ms),
            storage_role,
            tls,
            limits,
            allow_fault_injection: self.allow_fault_injection,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> NodeConfig {
        NodeConfig {
            node_id: 1,
            listen: "127.0.0.1:7001".into(),
            data_dir: "/tmp/x".into(),
            insecure_dev: true,
            ..NodeConfig::default()
        }
    }

    #[test]
    fn the_defaults_are_the_parts_own() {
        let parts = valid().parts().expect("valid");
        let meta = MetaConfig::new(1, "127.0.0.1:7001".into(), "/tmp/x".into());
        assert_eq!(parts.meta.election_timeout_max_ms, meta.election_timeout_max_ms);
        assert_eq!(parts.meta.heartbeat_interval_ms, meta.heartbeat_interval_ms);
        assert_eq!(parts.healer.detector, HealerConfig::default().detector);
        assert_eq!(parts.data.orphan_grace, DataConfig::default().orphan_grace);
        assert!(parts.storage_role);
    }

    #[test]
    fn every_missing_or_bad_setting_is_named() {
        type Spoil = fn(&mut NodeConfig);
        let cases: [(Spoil, &str); 13] = [
            (|c| c.node_id = 0, "--node-id"),
            (|c| c.listen = "nowhere".into(), "--listen"),
            (|c| c.insecure_dev = false, "no cluster secret"),
            (|c| c.peers = Some("1=127.0.0.1:9,1=127.0.0.1:8".into()), "twice"),
            (|c| c.peers = Some("1=127.0.0.1:9".into()), "advertises"),
            (|c| c.roles = vec!["cook".into()], "--roles"),
            (|c| c.election_timeout_ms = 10, "heartbeat interval"),
            (|c| c.chunk_size_bytes = 0, "--chunk-size-bytes"),
            (|c| c.max_inflight_bytes = c.chunk_size_bytes - 1, "--max-inflight-bytes"),
            (|c| c.inline_max_bytes = mendfs_meta::INLINE_CHUNK_BYTES_MAX + 1, "--inline-max-bytes"),
            (|c| c.kv_quota_bytes = 1_000, "--kv-quota-bytes"),
            (|c| c.max_sessions = 0, "--max-sessions"),
            (|c| c.unsafe_local_reads = true, "needs --allow-fault-injection"),
        ];
        for (spoil, named) in cases {
            let mut config = valid();
            spoil(&mut config);
            let error = config.parts().expect_err(named).to_string();
            assert!(error.contains(named), "{error:?} should name {named:?}");
        }
    }

    #[test]
    fn fault_injection_is_off_by_default_and_its_modes_are_accepted_only_with_it() {
        let defaults = valid().parts().expect("valid");
        assert!(!defaults.allow_fault_injection && !defaults.meta.unsafe_local_reads);
        let allowed = NodeConfig { allow_fault_injection: true, unsafe_local_reads: true, ..valid() };
        let parts = allowed.parts().expect("allowed");
        assert!(parts.allow_fault_injection && parts.meta.unsafe_local_reads);
        let parsed: NodeConfig =
            serde_json::from_str(r#"{"allow_fault_injection": true}"#).expect("a config file may allow it");
        assert!(parsed.allow_fault_injection && !parsed.unsafe_local_reads);
    }

    #[test]
    fn a_config_file_with_an_unknown_key_is_refused() {
        let parsed: Result<NodeConfig, _> = serde_json::from_str(r#"{"node_id": 2, "replication_factr": 3}"#);
        assert!(parsed.expect_err("unknown key").to_string().contains("replication_factr"));
        let parsed: NodeConfig = serde_json::from_str(r#"{"node_id": 2}"#).expect("defaults fill the rest");
        assert_eq!((parsed.node_id, parsed.replication_factor), (2, 3));
    }
}
