//! `mendfs local up` / `mendfs local down`: a persistent cluster on this machine for trying the
//! CLI. `up` starts the nodes in the background (each in a process group of its own, so a
//! Ctrl-C in the terminal does not reach them) and records them, command lines included, in
//! `DIR/local.json`; `down` stops exactly the processes recorded there; `up` again restarts
//! them on their data with the same ports.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mendfs_testkit::{free_port, wait_for, Cluster, ClusterOptions};
use serde::{Deserialize, Serialize};

#[derive(Subcommand, Debug)]
pub enum LocalCommand {
    /// Start a local cluster in the background and print the line to export.
    Up(UpArgs),
    /// Stop the local cluster started by `local up` (its data stays unless --purge).
    Down(DownArgs),
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Nodes to start: up to 3 are metadata voters, the rest storage-only learners.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Where the nodes keep their data, logs and the cluster secret.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run with TLS: a cluster CA and certificates are made in DIR/tls (`mendfs cert init`).
    /// Without it the cluster is plaintext, on 127.0.0.1 only.
    #[arg(long)]
    pub tls: bool,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// The directory given to `local up`.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also delete the directory: data, logs, secret.
    #[arg(long)]
    pub purge: bool,
}

/// What `up` leaves for `down` (and for the curious).
#[derive(Serialize, Deserialize, Debug)]
struct LocalState {
    endpoints: String,
    secret_file: Option<PathBuf>,
    /// The admin token made at the first `up` (0600).
    #[serde(default)]
    token_file: Option<PathBuf>,
    /// The cluster CA, when the cluster runs with TLS.
    #[serde(default)]
    ca_file: Option<PathBuf>,
    /// An S3 access key allowed to create buckets: its id and secret (0600), made by `up`.
    #[serde(default)]
    s3_key_file: Option<PathBuf>,
    nodes: Vec<LocalNode>,
}

#[derive(Serialize, Deserialize, Debug)]
struct LocalNode {
    id: u64,
    addr: String,
    http: String,
    /// The node's S3 listener.
    #[serde(default)]
    s3: Option<String>,
    pid: u32,
    log: PathBuf,
    /// The `mendfs` arguments that start this node again.
    args: Vec<String>,
}

const STATE_FILE: &str = "local.json";
const VOTERS_MAX: usize = 3;

/// A per-user directory: the runtime directory when the session has one, else under the
/// home directory. Never a shared, predictable name in /tmp, where another user could plant
/// a `local.json` that `up` would run.
fn default_dir() -> Result<PathBuf> {
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|p| p.is_absolute()) {
        return Ok(runtime.join("mendfs-local"));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).filter(|p| p.is_absolute());
    let home = home.context("neither XDG_RUNTIME_DIR nor HOME is set: pass --dir")?;
    Ok(home.join(".local/share/mendfs/local"))
}

/// Refuses a path that another user owns or could change: `up` runs what `local.json` says
/// and keeps the secret beside it.
fn check_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::symlink_metadata(path).with_context(|| format!("cannot inspect {}", path.display()))?;
    let me = rustix::process::geteuid().as_raw();
    anyhow::ensure!(
        metadata.uid() == me,
        "{} belongs to user {}, not to you (user {me}): refusing to use it",
        path.display(),
        metadata.uid()
    );
    anyhow::ensure!(
        metadata.mode() & 0o022 == 0,
        "{} can be changed by other users (mode {:o}): refusing to use it",
        path.display(),
        metadata.mode() & 0o7777
    );
    Ok(())
}

/// Creates the cluster directory (0700) or checks that an existing one is private to this user.
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    check_private(dir)?;
    let state = dir.join(STATE_FILE);
    if std::fs::symlink_metadata(&state).is_ok() {
        check_private(&state)?;
    }
    Ok(())
}

/// Whether `pid` is a `mendfs server` of the cluster in `dir` (not a recycled pid).
fn is_our_node(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let dir = dir.to_string_lossy();
    // A stopped but unreaped process has an empty command line: not running anything.
    args.iter().any(|a| a == "server") && args.iter().any(|a| a.starts_with(dir.as_ref()))
}

fn read_state(dir: &Path) -> Result<Option<LocalState>> {
    let path = dir.join(STATE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a local cluster's state", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub async fn run(command: LocalCommand) -> Result<ExitCode> {
    tokio::task::block_in_place(|| match command {
        LocalCommand::Up(args) => up(args),
        LocalCommand::Down(args) => down(args),
    })
}

fn up(args: UpArgs) -> Result<ExitCode> {
    anyhow::ensure!((1..=16).contains(&args.nodes), "--nodes must be within 1 ..= 16");
    let dir = match args.dir {
        Some(dir) => dir,
        None => default_dir()?,
    };
    let dir = if dir.is_absolute() { dir } else { std::env::current_dir()?.join(dir) };
    private_dir(&dir)?;
    if let Some(state) = read_state(&dir)? {
        if state.nodes.iter().any(|n| is_our_node(n.pid, &dir)) {
            bail!(
                "a local cluster is already running in {}; stop it with `mendfs local down --dir {}`",
                dir.display(),
                dir.display()
            );
        }
        return restart(&dir, state);
    }
    let binary = std::env::current_exe().context("locate the mendfs binary")?;
    let voters = args.nodes.min(VOTERS_MAX);
    let mut http = std::collections::BTreeMap::new();
    let mut s3 = std::collections::BTreeMap::new();
    let mut http_args = std::collections::BTreeMap::new();
    for id in 1..=args.nodes as u64 {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let s3_addr = format!("127.0.0.1:{}", free_port()?);
        http_args.insert(id, vec!["--http".to_string(), addr.clone(), "--s3".to_string(), s3_addr.clone()]);
        http.insert(id, addr);
        s3.insert(id, s3_addr);
    }
    let node_args = http_args.iter().filter(|(id, _)| **id <= voters as u64).map(|(id, a)| (*id, a.clone())).collect();
    let options = ClusterOptions {
        nodes: voters,
        dir: Some(dir.clone()),
        keep_dir: true,
        detached: true,
        node_args,
        tls: args.tls,
        ..ClusterOptions::default()
    };
    println!("starting {} nodes in {}", args.nodes, dir.display());
    let started = Instant::now();
    let mut cluster = Cluster::start(&binary, options)?;
    let leader = cluster.wait_for_leader(Duration::from_secs(60))?;
    for id in voters as u64 + 1..=args.nodes as u64 {
        cluster.add_storage_learner_with(id, &http_args[&id])?;
    }
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    cluster.wait_for_caught_up(&ids, Duration::from_secs(60))?;
    // Storage registered on every node: the cluster takes a file.
    wait_for("every node's storage to register", Duration::from_secs(60), || {
        let status = cluster.status()?;
        let registered =
            status["nodes"].as_array().map_or(0, |nodes| nodes.iter().filter(|n| n["storage"] == true).count());
        Ok((registered == args.nodes).then_some(()))
    })?;
    let mut nodes = Vec::new();
    for node in cluster.nodes.values() {
        // A voter restarts with `--peers` too: harmless once the cluster exists (only an empty
        // log bootstraps), and it names the node's own address.
        let command = cluster.server_command(node.id, node.id <= voters as u64)?;
        let args = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        nodes.push(LocalNode {
            id: node.id,
            addr: node.addr.clone(),
            http: http[&node.id].clone(),
            s3: Some(s3[&node.id].clone()),
            pid: 0,
            log: node.log_path.clone(),
            args,
        });
    }
    // The admin token clients use; the secret stays the nodes' own credential.
    let token = cluster.run_cli(&["auth", "token", "create", "local-admin", "--role", "admin"])?;
    let token_file = dir.join("admin.token");
    write_private(&token_file, token.trim())?;
    // Read is all the dashboard needs: its one-time link opens a read session.
    let dashboard_link = cluster.run_cli(&["auth", "login-link", "--ttl", LOGIN_LINK_TTL])?;
    // An S3 key that may create buckets, for the AWS CLI, SDKs and rclone.
    let s3_key = cluster.run_cli(&["s3", "key", "create", "local", "--create-buckets"])?;
    let s3_key_file = dir.join("s3.env");
    let exports: Vec<&str> = s3_key.lines().filter(|line| line.starts_with("export AWS_")).collect();
    write_private(&s3_key_file, &exports.join("\n"))?;
    let pids = cluster.detach();
    for node in &mut nodes {
        node.pid = pids.get(&node.id).copied().unwrap_or(0);
    }
    let state = LocalState {
        endpoints: cluster.endpoints(),
        secret_file: cluster.secret_file().map(Path::to_path_buf),
        token_file: Some(token_file),
        ca_file: cluster.tls_dir().map(|tls| tls.join("ca.pem")),
        s3_key_file: Some(s3_key_file),
        nodes,
    };
    write_state(&dir, &state)?;
    println!("{} nodes up in {:.1?}; node {leader} leads", args.nodes, started.elapsed());
    print_usage(&dir, &state, Some(dashboard_link.trim()));
    Ok(ExitCode::SUCCESS)
}

/// Writes a new file readable by this user only (never through an existing file or symlink).
fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{contents}").with_context(|| format!("cannot write {}", path.display()))
}

fn write_state(dir: &Path, state: &LocalState) -> Result<()> {
    let path = dir.join(STATE_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(state)?).with_context(|| format!("write {}", path.display()))
}

/// Starts the recorded nodes again, on their data and ports.
fn restart(dir: &Path, mut state: LocalState) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let binary = std::env::current_exe().context("locate the mendfs binary")?;
    println!("restarting the {} nodes recorded in {}", state.nodes.len(), dir.display());
    let started = Instant::now();
    for node in &mut state.nodes {
        let log = mendfs_testkit::append_file(&node.log)?;
        let mut command = std::process::Command::new(&binary);
        // The recorded flags are the node's settings: no MENDFS_* variable of this shell may
        // change them.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MENDFS_") {
                command.env_remove(name);
            }
        }
        let child = command
            .args(&node.args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start node {}", node.id))?;
        node.pid = child.id();
    }
    write_state(dir, &state)?;
    let mut config = mendfs_client::ClientConfig::new(state.endpoints.split(',').map(str::to_string).collect());
    config.secret = crate::cli::read_secret(state.secret_file.as_ref())?;
    if let Some(ca) = &state.ca_file {
        config.ca_pem = Some(std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?);
    }
    let client = mendfs_client::Client::new(config)?;
    let runtime = tokio::runtime::Handle::current();
    let leader = wait_for("a leader", Duration::from_secs(60), || Ok(runtime.block_on(client.status())?.leader))?;
    println!("{} nodes up in {:.1?}; node {leader} leads", state.nodes.len(), started.elapsed());
    let link = runtime.block_on(client.create_login_link(
        "read",
        humantime::parse_duration(LOGIN_LINK_TTL)?,
        std::time::Duration::from_secs(12 * 3_600),
    ));
    let link = match link {
        Ok(reply) if !reply.http_addr.is_empty() => {
            let scheme = if state.ca_file.is_some() { "https" } else { "http" };
            Some(crate::auth_cmd::login_link(&format!("{scheme}://{}", reply.http_addr), &reply.code))
        }
        Ok(_) => None,
        Err(e) => {
            eprintln!("no dashboard login link: {e}");
            None
        }
    };
    print_usage(dir, &state, link.as_deref());
    Ok(ExitCode::SUCCESS)
}

/// How long the login link `up` prints stays usable (`mendfs auth login-link` makes more).
const LOGIN_LINK_TTL: &str = "1h";

fn print_usage(dir: &Path, state: &LocalState, dashboard_link: Option<&str>) {
    let scheme = if state.ca_file.is_some() { "https" } else { "http" };
    for node in &state.nodes {
        println!(
            "  node {}  {}  metrics {scheme}://{}/metrics  log {}",
            node.id,
            node.addr,
            node.http,
            node.log.display()
        );
    }
    match (dashboard_link, state.nodes.first()) {
        (Some(link), _) => println!(
            "\ndashboard (a one-time login link, valid for {LOGIN_LINK_TTL}; `mendfs auth login-link` makes more):\n  {link}"
        ),
        (None, Some(node)) => println!("\ndashboard: {scheme}://{}/", node.http),
        (None, None) => {}
    }
    println!("\nUse it from this shell:\n");
    println!("export MENDFS_ENDPOINTS={}", state.endpoints);
    match (&state.token_file, &state.secret_file) {
        (Some(token), _) => println!("export MENDFS_TOKEN=$(cat {})   # an admin token", token.display()),
        (None, Some(secret)) => println!("export MENDFS_SECRET=$(cat {})", secret.display()),
        (None, None) => {}
    }
    if let Some(ca) = &state.ca_file {
        println!("export MENDFS_CA={}", ca.display());
    }
    if let (Some(s3), Some(key_file)) = (state.nodes.first().and_then(|n| n.s3.as_ref()), &state.s3_key_file) {
        // The first node's; every node serves the same buckets.
        println!("export AWS_ENDPOINT_URL={scheme}://{s3}");
        // The key's own lines (from a file only this user reads): a key that may create buckets.
        match std::fs::read_to_string(key_file) {
            Ok(exports) => exports.lines().for_each(|line| println!("{line}")),
            Err(e) => println!("# cannot read the S3 key in {}: {e}", key_file.display()),
        }
        println!("export AWS_DEFAULT_REGION=us-east-1");
    }
    println!("\nthen try `mendfs cluster status`, `mendfs put FILE /f`, `mendfs get /f -`,");
    println!("or S3: `aws s3 mb s3://photos`, `aws s3 cp FILE s3://photos/`, `aws s3 ls s3://photos`.");
    println!("Stop it with `mendfs local down --dir {}`.", dir.display());
}

fn down(args: DownArgs) -> Result<ExitCode> {
    let dir = match args.dir {
        Some(dir) => dir,
        None => default_dir()?,
    };
    let dir = if dir.is_absolute() { dir } else { std::env::current_dir()?.join(dir) };
    if dir.exists() {
        // `down` signals the pids `local.json` names: only a file of this user's is believed.
        private_dir(&dir)?;
    }
    let Some(state) = read_state(&dir)? else {
        if args.purge && dir.exists() {
            bail!("{} has no {STATE_FILE}: not a local cluster's directory; not deleting it", dir.display());
        }
        bail!("no local cluster in {} (no {STATE_FILE})", dir.display());
    };
    let running: Vec<&LocalNode> = state.nodes.iter().filter(|n| is_our_node(n.pid, &dir)).collect();
    for node in &running {
        // SIGTERM: the node shuts its server and Raft down cleanly.
        let _ = mendfs_testkit::signal(node.pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while running.iter().any(|n| is_our_node(n.pid, &dir)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for node in running.iter().filter(|n| is_our_node(n.pid, &dir)) {
        eprintln!("node {} did not stop within 15 s of SIGTERM; SIGKILL", node.id);
        let _ = mendfs_testkit::signal(node.pid, libc::SIGKILL);
    }
    let left: Vec<u64> = state.nodes.iter().filter(|n| is_our_node(n.pid, &dir)).map(|n| n.id).collect();
    if !left.is_empty() {
        bail!("nodes {left:?} are still running");
    }
    println!("stopped {} nodes", running.len());
    if args.purge {
        std::fs::remove_dir_all(&dir).with_context(|| format!("delete {}", dir.display()))?;
        println!("deleted {}", dir.display());
    } else {
        println!(
            "their data stays in {}: `mendfs local up --dir {}` starts them again, `--purge` deletes it",
            dir.display(),
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
