//! `mendfs auth`: client tokens and their roles. `mendfs cert init`: a cluster CA and node and
//! client certificates, for operators without a PKI of their own.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::cli::ClusterAddress;

#[derive(Subcommand, Debug)]
pub enum AuthCommand {
    /// Client tokens: create, list, revoke (an admin token, or the cluster secret on a node).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Who the cluster takes this client for, and its role.
    Whoami,
    /// Print a one-time login link to the web dashboard: it opens a read session once, within
    /// --ttl, and is worth nothing after (the code is stored only as a hash).
    LoginLink {
        /// How long the link may wait to be opened (at most 24h).
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// How long the session it opens lasts (at most 7 days).
        #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
        session_ttl: std::time::Duration,
        /// The dashboard address to put in the link (default: the answering node's --http).
        #[arg(long)]
        dashboard: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print it (once: only its hash is stored).
    Create {
        /// A label for the token: 1–64 of A-Z a-z 0-9 . _ -
        name: String,
        /// read (get, ls, stat, kv get/watch, traces, logs), write (adds put, rm, kv writes,
        /// locks) or admin (adds membership, drain and tokens).
        #[arg(long)]
        role: String,
    },
    /// List the tokens: names, roles, creation times (never the tokens).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by name: every node refuses it as soon as it applies the revocation.
    Revoke { name: String },
}

pub async fn run_auth(connection: ClusterAddress, command: AuthCommand) -> Result<ExitCode> {
    // A cluster reached over TLS serves its dashboard over TLS too.
    let dashboard_scheme = if connection.ca.is_some() { "https" } else { "http" };
    let client = connection.client()?;
    match command {
        AuthCommand::Token { command: TokenCommand::Create { name, role } } => {
            let reply = client.create_token(&name, &role).await.context("create token")?;
            eprintln!("created token {:?} with role {}; it is shown only now:", reply.name, reply.role);
            println!("{}", reply.token);
        }
        AuthCommand::Token { command: TokenCommand::List { json } } => {
            let tokens = client.list_tokens().await.context("list tokens")?;
            if json {
                let tokens: Vec<_> = tokens
                    .iter()
                    .map(|t| {
                        serde_json::json!({"name": t.name, "role": t.role, "created_unix_ms": t.created_unix_ms,
                                           "expires_unix_ms": t.expires_unix_ms})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(tokens));
            } else {
                println!("{:<32} {:<6} {:<21} EXPIRES", "NAME", "ROLE", "CREATED");
                for token in tokens {
                    let time = |ms: u64| {
                        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
                        humantime::format_rfc3339_seconds(at).to_string()
                    };
                    let expires = token.expires_unix_ms.map_or_else(|| "never".to_string(), time);
                    println!("{:<32} {:<6} {:<21} {expires}", token.name, token.role, time(token.created_unix_ms));
                }
            }
        }
        AuthCommand::Token { command: TokenCommand::Revoke { name } } => {
            if client.revoke_token(&name).await.context("revoke token")? {
                println!("revoked token {name:?}");
            } else {
                eprintln!("no token named {name:?}");
                return Ok(ExitCode::FAILURE);
            }
        }
        AuthCommand::LoginLink { ttl, session_ttl, dashboard } => {
            let reply = client.create_login_link("read", ttl, session_ttl).await.context("create login link")?;
            let Some(addr) = dashboard.or((!reply.http_addr.is_empty()).then_some(reply.http_addr)) else {
                anyhow::bail!(
                    "the answering node serves no dashboard (no --http); pass --dashboard HOST:PORT \
                     (the code is valid on every node)"
                );
            };
            eprintln!(
                "a one-time login link to a read session, valid for {} (a session of {}):",
                humantime::format_duration(ttl),
                humantime::format_duration(session_ttl)
            );
            let addr = if addr.contains("://") { addr } else { format!("{dashboard_scheme}://{addr}") };
            println!("{}", login_link(&addr, &reply.code));
        }
        AuthCommand::Whoami => {
            let reply = client.who_am_i().await.context("who am i")?;
            println!("{} (role {})", reply.identity, reply.role);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The dashboard URL that logs in with `code`. The code rides in the fragment, which browsers
/// never send to a server (nor write to access logs); the page takes it out at once.
pub fn login_link(dashboard_addr: &str, code: &str) -> String {
    let base =
        if dashboard_addr.contains("://") { dashboard_addr.to_string() } else { format!("http://{dashboard_addr}") };
    format!("{}/#login={code}", base.trim_end_matches('/'))
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Make a cluster CA, one certificate per node (for both its server and its peer side) and
    /// client certificates, in DIR (created 0700; keys 0600). Never overwrites.
    Init {
        dir: PathBuf,
        /// How many node certificates (node ids 1..=N).
        #[arg(long)]
        nodes: u64,
        /// Names and IP addresses the nodes are reached at, comma-separated; every node
        /// certificate holds them all (default: localhost,127.0.0.1).
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        hosts: Vec<String>,
        /// Client certificates to make (optional for clients: tokens decide their rights).
        #[arg(long, value_delimiter = ',')]
        clients: Vec<String>,
        /// Days the node and client certificates are valid.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

pub fn run_cert(command: CertCommand) -> Result<ExitCode> {
    let CertCommand::Init { dir, nodes, hosts, clients, days } = command;
    anyhow::ensure!((1..=1_000).contains(&nodes), "--nodes must be within 1 ..= 1000");
    anyhow::ensure!(days >= 1, "--days must be at least 1");
    let written = init_certificates(&dir, nodes, &hosts, &clients, days)?;
    for path in &written {
        println!("{}", path.display());
    }
    eprintln!(
        "start node N with --tls-cert {d}/node-N.pem --tls-key {d}/node-N.key --tls-ca {d}/ca.pem;\n\
         clients use --ca {d}/ca.pem (MENDFS_CA) and https:// endpoints. Keep ca.key offline.",
        d = dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes the CA, node and client certificates into `dir`; returns the files written.
pub fn init_certificates(
    dir: &Path,
    nodes: u64,
    hosts: &[String],
    clients: &[String],
    days: u32,
) -> Result<Vec<PathBuf>> {
    crate::local_cmd::private_dir(dir)?;
    let ca_key_path = dir.join("ca.key");
    anyhow::ensure!(
        !ca_key_path.exists(),
        "{} already exists: not overwriting a CA (use another directory)",
        ca_key_path.display()
    );
    for client in clients {
        mendfs_meta::auth::validate_token_name(client).map_err(|e| anyhow::anyhow!("client name: {e}"))?;
    }
    let now = time::OffsetDateTime::now_utc();
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = name("MendFS cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = now - time::Duration::days(1);
    ca_params.not_after = now + time::Duration::days(3_650);
    let ca_key = KeyPair::generate().context("generate the CA key")?;
    let ca_cert = ca_params.self_signed(&ca_key).context("self-sign the CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut written = Vec::new();
    let mut write = |file: &str, contents: &str, private: bool| -> Result<()> {
        let path = dir.join(file);
        write_new(&path, contents.as_bytes(), private)?;
        written.push(path);
        Ok(())
    };
    write("ca.pem", &ca_cert.pem(), false)?;
    write("ca.key", &issuer.key().serialize_pem(), true)?;
    let leaf = |common_name: &str, uri: String, server: bool| -> Result<(String, String)> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(i64::from(days));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names.push(SanType::URI(uri.try_into().context("identity URI")?));
        if server {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
            for host in hosts {
                params.subject_alt_names.push(match host.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(
                        host.clone().try_into().with_context(|| format!("--hosts: {host:?} is not a DNS name"))?,
                    ),
                });
            }
        }
        let key = KeyPair::generate().context("generate a key")?;
        let certificate = params.signed_by(&key, &issuer).context("sign a certificate")?;
        Ok((certificate.pem(), key.serialize_pem()))
    };
    for id in 1..=nodes {
        let (cert, key) = leaf(&format!("MendFS node {id}"), format!("spiffe://mendfs/node/{id}"), true)?;
        write(&format!("node-{id}.pem"), &cert, false)?;
        write(&format!("node-{id}.key"), &key, true)?;
    }
    for client in clients {
        let (cert, key) = leaf(&format!("MendFS client {client}"), format!("spiffe://mendfs/client/{client}"), false)?;
        write(&format!("client-{client}.pem"), &cert, false)?;
        write(&format!("client-{client}.key"), &key, true)?;
    }
    Ok(written)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// Creates `path` (never over an existing file or through a symlink), 0600 when `private`.
fn write_new(path: &Path, contents: &[u8], private: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents).with_context(|| format!("cannot write {}", path.display()))?;
    // A key that is lost after a crash would leave a node that cannot start.
    file.sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}
