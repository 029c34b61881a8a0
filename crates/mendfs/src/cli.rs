//! Command-line parsing and dispatch.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::{
    auth_cmd, bench, chaos_cmd, client_cmd, demo, files_cmd, job_cmd, local_cmd, policy_cmd, s3_cmd, server,
    telemetry_cmd,
};

#[derive(Parser, Debug)]
#[command(name = "mendfs", version, about = "MendFS: a self-healing distributed file store")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node.
    Server(Box<server::ServerArgs>),
    /// The coordination keyspace: keys with versions, compare-and-set, watches, sessions, locks.
    Kv {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: client_cmd::KvCommand,
    },
    /// Files: put, get, ls, rm, stat.
    #[command(flatten)]
    Files(files_cmd::FileCommand),
    /// Cluster membership and health.
    Cluster {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: client_cmd::ClusterCommand,
    },
    /// Measure throughput, latency and failover on a local cluster (against etcd too, if installed).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Start a local cluster, write files, SIGKILL a node (M nodes with `--redundancy ec:K+M`),
    /// watch it heal, verify every file, and clean up.
    Demo(demo::DemoArgs),
    /// Inject faults (kills, pauses, partitions, disk and clock faults) into a local cluster
    /// under load, heal it, and check that no promise was broken.
    Chaos(chaos_cmd::ChaosArgs),
    /// A persistent cluster on this machine, for trying the CLI: `local up`, `local down`.
    Local {
        #[command(subcommand)]
        command: local_cmd::LocalCommand,
    },
    /// Show one request's path through the cluster: every node's spans of a trace, as a tree.
    Trace(telemetry_cmd::TraceArgs),
    /// Gather structured log lines from the nodes (filter by node, trace, time and level).
    Logs(telemetry_cmd::LogsArgs),
    /// Client tokens and their roles: `auth token create|list|revoke`, `auth whoami`.
    Auth {
        #[command(flatten)]
        connection: ClusterAddress,
        #[command(subcommand)]
        command: auth_cmd::AuthCommand,
    },
    /// S3 access keys, buckets and grants: `s3 key create|list|delete`, `s3 allow`,
    /// `s3 bucket create|list|delete`.
    S3 {
        #[command(flatten)]
        connection: ClusterAddress,
        #[command(subcommand)]
        command: s3_cmd::S3Command,
    },
    /// Redundancy policies by path prefix or bucket: `policy set /cold ec:4+2`,
    /// `policy set --bucket NAME ec:4+2`, `policy unset`, `policy list`.
    Policy {
        #[command(flatten)]
        connection: ClusterAddress,
        #[command(subcommand)]
        command: policy_cmd::PolicyCommand,
    },
    /// Fault-tolerant jobs: `job submit NAME --tasks N -- CMD...`, `status`, `results`, `wait`,
    /// `cancel`, `list`; `job checkpoint FILE` from a task's command.
    Job {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: job_cmd::JobCommand,
    },
    /// Take tasks of the cluster's jobs and run them (checkpoints, leases, retries).
    Worker(job_cmd::WorkerArgs),
    /// Certificates for a TLS cluster: `cert init DIR --nodes N`.
    Cert {
        #[command(subcommand)]
        command: auth_cmd::CertCommand,
    },
}

/// How the CLI reaches the cluster, and the trace its command runs in.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    #[command(flatten)]
    pub cluster: ClusterAddress,
    /// Print this command's trace id on stderr, for `mendfs trace ID` and `mendfs logs --trace ID`.
    #[arg(long, global = true)]
    pub trace: bool,
    /// Run this command in the given trace (32 hex digits) instead of a new one.
    #[arg(long, value_name = "HEX32", global = true)]
    pub trace_id: Option<String>,
}

/// Where the cluster is and how to get in (`mendfs logs` has its own `--trace ID` filter, so
/// it takes only this).
#[derive(Args, Debug, Clone)]
pub struct ClusterAddress {
    /// Nodes to talk to, HOST:PORT separated by commas; the client fails over between them.
    #[arg(long, env = "MENDFS_ENDPOINTS", value_delimiter = ',', default_value = "127.0.0.1:7001", global = true)]
    pub endpoints: Vec<String>,
    /// Client token (`mendfs auth token create`); prefer MENDFS_TOKEN: a flag shows in the
    /// process list.
    #[arg(long, env = "MENDFS_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// File holding the cluster secret (else MENDFS_SECRET): the nodes' credential, for an
    /// operator on a node's machine. Clients use tokens.
    #[arg(long, global = true)]
    pub secret_file: Option<PathBuf>,
    /// The cluster CA certificate (PEM): connect over TLS and check the nodes against it.
    #[arg(long, env = "MENDFS_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// A client certificate to present over TLS (PEM; with --client-key).
    #[arg(long, env = "MENDFS_CLIENT_CERT", global = true, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "MENDFS_CLIENT_KEY", global = true, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Give up on a call after this many seconds, retries included.
    #[arg(long, default_value_t = 20.0, global = true)]
    pub timeout: f64,
}

/// The cluster secret from `--secret-file`, else `MENDFS_SECRET`, else none.
pub fn read_secret(secret_file: Option<&PathBuf>) -> Result<Option<String>> {
    if let Some(path) = secret_file {
        let secret =
            std::fs::read_to_string(path).with_context(|| format!("cannot read the secret file {}", path.display()))?;
        let secret = secret.trim().to_string();
        anyhow::ensure!(!secret.is_empty(), "the secret file {} is empty", path.display());
        return Ok(Some(secret));
    }
    Ok(std::env::var("MENDFS_SECRET").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
}

impl ClusterAddress {
    pub fn config(&self) -> Result<mendfs_client::ClientConfig> {
        anyhow::ensure!(
            self.timeout > 0.0 && self.timeout.is_finite(),
            "--timeout must be a positive number of seconds"
        );
        let mut config = mendfs_client::ClientConfig::new(self.endpoints.clone());
        config.secret = read_secret(self.secret_file.as_ref())?;
        config.token = self.token.as_deref().map(str::trim).filter(|token| !token.is_empty()).map(str::to_string);
        let read = |path: &PathBuf| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
        config.ca_pem = self.ca.as_ref().map(read).transpose()?;
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            config.identity_pem = Some((read(cert)?, read(key)?));
        }
        config.deadline = Duration::from_secs_f64(self.timeout);
        config.attempt_timeout = config.attempt_timeout.min(config.deadline);
        Ok(config)
    }

    /// A client whose calls each start a trace of their own.
    pub fn client(&self) -> Result<mendfs_client::Client> {
        Ok(mendfs_client::Client::new(self.config()?)?)
    }
}

impl Connection {
    pub fn client(&self) -> Result<mendfs_client::Client> {
        let mut config = self.cluster.config()?;
        // One trace per command: every call it makes, retries included, lands in it.
        let trace_id = match &self.trace_id {
            Some(text) => text.parse::<mendfs_client::TraceId>().context("--trace-id")?,
            None => mendfs_client::TraceId::random(),
        };
        if self.trace {
            eprintln!("trace id: {trace_id}");
        }
        config.trace = Some(mendfs_client::TraceContext::new_root(trace_id));
        Ok(mendfs_client::Client::new(config)?)
    }
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Server(args) => server::run(*args).await.map(|()| ExitCode::SUCCESS),
        Command::Kv { connection, command } => client_cmd::run_kv(connection, command).await,
        Command::Files(command) => files_cmd::run(command).await,
        Command::Cluster { connection, command } => client_cmd::run_cluster(connection, command).await,
        Command::Bench { command } => bench::run(command).await.map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => demo::run(args).await,
        Command::Chaos(args) => chaos_cmd::run(args).await,
        Command::Local { command } => local_cmd::run(command).await,
        Command::Trace(args) => telemetry_cmd::trace(args).await,
        Command::Logs(args) => telemetry_cmd::logs(args).await,
        Command::Auth { connection, command } => auth_cmd::run_auth(connection, command).await,
        Command::S3 { connection, command } => s3_cmd::run_s3(connection, command).await,
        Command::Policy { connection, command } => policy_cmd::run_policy(connection, command).await,
        Command::Cert { command } => auth_cmd::run_cert(command),
        Command::Job { connection, command } => job_cmd::run_job(connection, command).await,
        Command::Worker(args) => job_cmd::run_worker(args).await,
    }
}
