//! A cluster of real `mendfs server` processes on 127.0.0.1, for tests, the demo and the
//! benchmarks: start on free ports in a temporary directory, SIGKILL, SIGSTOP/SIGCONT,
//! restart, read a node's log, run the CLI against the cluster, and poll for a state with a
//! deadline (never sleep-and-hope).
//!
//! Every child is killed when the [`Cluster`] is dropped, including on a test's panic.
//!
//! For partition tests, [`netns::Lab`] puts each node (and the CLI) in a network namespace of
//! its own, and [`ClusterOptions::placement`] starts them there.
//!
//! For clock-skew tests, [`ClusterOptions::clock_control`] starts the nodes under libfaketime,
//! and [`Cluster::set_clock_offset`] moves one node's wall clock (only the wall clock: the
//! monotonic clock, which timeouts, elections and leases use, stays true).

pub mod netns;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The cap each node gets unless a test says otherwise: far above what any test or the demo
/// stores, so a node is degraded only when the host's disk has less than a tenth of it left.
pub const DEFAULT_STORAGE_CAPACITY_BYTES: u64 = 8 << 30;

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// Extra flags for every `mendfs server`.
    pub server_args: Vec<String>,
    /// Run with a cluster secret (the default) or `--insecure-dev`.
    pub secure: bool,
    /// Keep the directory (for `--keep` in the demo); otherwise it is removed on drop.
    pub keep_dir: bool,
    /// Where to put the cluster's directory; a fresh temporary one if None.
    pub dir: Option<PathBuf>,
    /// Give each node's chunk store a filesystem of this many bytes (a tmpfs mount, which
    /// needs root), to test full disks.
    pub chunk_store_bytes_max: Option<u64>,
    /// Extra flags for particular nodes, after `server_args`.
    pub node_args: BTreeMap<u64, Vec<String>>,
    /// `--storage-capacity-bytes` for every node whose flags do not set it (and none when
    /// `chunk_store_bytes_max` gives the nodes filesystems of their own). With a cap a node is
    /// degraded by its own use, not by how full the host's shared filesystem happens to be:
    /// without one a build machine whose disk is 90 % full would refuse every put.
    pub storage_capacity_bytes: Option<u64>,
    /// Start each node in a process group of its own, so a Ctrl-C in the terminal that
    /// started it does not reach it (`mendfs local up`, whose nodes outlive the command).
    pub detached: bool,
    /// Run with TLS: `mendfs cert init` makes a CA and certificates for node ids
    /// 1..=`TLS_NODE_CERTIFICATES` in `ROOT/tls`, the nodes get `--tls-*`, the CLI `MENDFS_CA`.
    pub tls: bool,
    /// Environment variables for every `mendfs server` (test hooks such as
    /// `MENDFS_TEST_SNAPSHOT_BUILD_PAUSE_MS`); no other `MENDFS_*` variable reaches a node.
    pub server_env: Vec<(String, String)>,
    /// Where the nodes and the CLI run (by default: 127.0.0.1, in this process's network).
    pub placement: Placement,
    /// Start every node under libfaketime ([`faketime_library`]; `Cluster::start` fails
    /// saying so when it is missing), so that [`Cluster::set_clock_offset`] can move its wall
    /// clock. The CLI and the test itself keep the true clock.
    pub clock_control: bool,
}

/// Where nodes and the CLI run, for partition tests ([`netns::Lab::placement`]).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Per node: the network namespace it runs in (`ip netns exec`) and its IP address there.
    /// Other nodes run on 127.0.0.1 here.
    pub nodes: BTreeMap<u64, (String, String)>,
    /// The network namespace the CLI runs in ([`Cluster::cli`], [`Cluster::status`], ...).
    pub cli_netns: Option<String>,
}

/// Node certificates a TLS cluster's CA issues up front (nodes added later use them too).
pub const TLS_NODE_CERTIFICATES: u64 = 16;

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            server_args: Vec::new(),
            secure: true,
            keep_dir: false,
            dir: None,
            chunk_store_bytes_max: None,
            node_args: BTreeMap::new(),
            storage_capacity_bytes: Some(DEFAULT_STORAGE_CAPACITY_BYTES),
            detached: false,
            tls: false,
            server_env: Vec::new(),
            placement: Placement::default(),
            clock_control: false,
        }
    }
}

pub struct Node {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    stopped: bool,
    /// Flags of this node alone (a storage-only learner's `--roles storage`).
    extra_args: Option<Vec<String>>,
}

impl Node {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

pub struct Cluster {
    binary: PathBuf,
    root: PathBuf,
    _temp: Option<tempfile::TempDir>,
    secret_file: Option<PathBuf>,
    options: ClusterOptions,
    pub nodes: BTreeMap<u64, Node>,
    /// Filesystems mounted for the nodes, unmounted on drop.
    mounts: Vec<PathBuf>,
}

/// Ports handed out by [`free_port`] are drawn from here: below Linux's ephemeral range
/// (32768–60999), so the local ends of outgoing connections, which the kernel picks from that
/// range, never take a node's port between its choice and its bind. (A port of 0's choosing
/// comes from the ephemeral range, and a busy test run lost a node that way.)
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port that was free a moment ago and that this process has not handed out before.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..1_000 {
        let port = TEST_PORTS.start + (random_u64() % u64::from(TEST_PORTS.end - TEST_PORTS.start)) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return Ok(port);
        }
    }
    bail!("no free port found in {TEST_PORTS:?} after 1000 tries")
}

/// 64 random bits from the standard library's per-process random hash keys and the clock.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    hasher.finish()
}

/// libfaketime's preload library, where Debian's `libfaketime` package (`apt-get install
/// faketime`) and a `make install` from source put it; None if it is in neither.
pub fn faketime_library() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    // Debian's multiarch directories: /usr/lib/x86_64-linux-gnu/faketime/, and so on.
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        candidates.extend(entries.flatten().map(|entry| entry.path().join("faketime")));
    }
    candidates.extend(["/usr/lib/faketime", "/usr/lib64/faketime", "/usr/local/lib/faketime"].map(PathBuf::from));
    candidates.into_iter().map(|dir| dir.join("libfaketime.so.1")).find(|library| library.is_file())
}

/// Polls `check` until it returns Some, or fails after `deadline` naming `what` and the last
/// observation.
pub fn wait_for<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let started = Instant::now();
    let mut last;
    loop {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => last = "not yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        if started.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what} (last: {last})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 128 random bits in hex, from the standard library's per-process random hash keys (the
/// secret guards local clusters on loopback; no cryptographic strength is claimed).
fn random_secret() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: i32) -> Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    let rc = unsafe_kill(pid, signal);
    if rc != 0 {
        bail!("kill({pid}, {signal}) failed: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_kill(pid: i32, signal: i32) -> i32 {
    // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) }
}

impl Cluster {
    /// Starts `options.nodes` nodes with ids 1..=n as the initial voters.
    pub fn start(binary: &Path, options: ClusterOptions) -> Result<Self> {
        let (temp, root) = match &options.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
                (None, dir.clone())
            }
            None => {
                let temp = tempfile::Builder::new().prefix("mendfs-cluster-").tempdir().context("temp dir")?;
                let root = temp.path().to_path_buf();
                (Some(temp), root)
            }
        };
        if options.clock_control && faketime_library().is_none() {
            bail!(
                "clock_control needs libfaketime (libfaketime.so.1), which is not installed: apt-get install faketime"
            );
        }
        let secret_file = if options.secure {
            let path = root.join("secret");
            // Readable by this user only: whoever reads it can do anything to the cluster.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("create the secret file {}", path.display()))?;
            writeln!(file, "{}", random_secret()).context("write the secret file")?;
            Some(path)
        } else {
            None
        };
        if options.tls {
            let output = Command::new(binary)
                .args(["cert", "init"])
                .arg(root.join("tls"))
                .args(["--nodes", &TLS_NODE_CERTIFICATES.to_string(), "--clients", "test"])
                .output()
                .context("run mendfs cert init")?;
            output_result(&["cert", "init"], output)?;
        }
        // MENDFS_KEEP_TEST_DIRS=1 keeps every cluster's directory (data and logs) for a post-mortem.
        let keep = options.keep_dir || std::env::var_os("MENDFS_KEEP_TEST_DIRS").is_some();
        let temp = if keep { temp.map(|t| t.keep()).and(None) } else { temp };
        let mut cluster = Cluster {
            binary: binary.to_path_buf(),
            root,
            _temp: temp,
            secret_file,
            options: options.clone(),
            nodes: BTreeMap::new(),
            mounts: Vec::new(),
        };
        for id in 1..=options.nodes as u64 {
            cluster.add_node_entry(id)?;
            if let Some(bytes) = options.chunk_store_bytes_max {
                let mount_point = cluster.nodes[&id].data_dir.join("chunks");
                std::fs::create_dir_all(&mount_point).context("create the chunk store mount point")?;
                let status = Command::new("mount")
                    .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
                    .arg(&mount_point)
                    .status()
                    .context("run mount")?;
                if !status.success() {
                    bail!("mounting a {bytes}-byte tmpfs at {} failed (root needed)", mount_point.display());
                }
                cluster.mounts.push(mount_point);
            }
        }
        for id in 1..=options.nodes as u64 {
            cluster.spawn(id, true)?;
        }
        Ok(cluster)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn secret_file(&self) -> Option<&Path> {
        self.secret_file.as_deref()
    }

    /// Where a TLS cluster's CA and certificates are (`cert init`'s directory).
    pub fn tls_dir(&self) -> Option<PathBuf> {
        self.options.tls.then(|| self.root.join("tls"))
    }

    /// The options the cluster was started with (a node's extra flags, say).
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    pub fn secret(&self) -> Option<String> {
        self.secret_file.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).map(|s| s.trim().to_string())
    }

    /// Reserves an id, a port and directories for a node, without starting it.
    pub fn add_node_entry(&mut self, id: u64) -> Result<&Node> {
        let host = self.options.placement.nodes.get(&id).map_or("127.0.0.1", |(_, ip)| ip.as_str());
        // In a namespace of its own every port is free; one free here is as good as any.
        let addr = format!("{host}:{}", free_port()?);
        let data_dir = self.root.join(format!("node-{id}"));
        let log_path = self.root.join(format!("node-{id}.log"));
        self.nodes.insert(id, Node { id, addr, data_dir, log_path, child: None, stopped: false, extra_args: None });
        if self.options.clock_control {
            write_clock_offset(&self.clock_offset_path(id), 0)?;
        }
        Ok(&self.nodes[&id])
    }

    fn initial_peers(&self) -> String {
        (1..=self.options.nodes as u64)
            .filter_map(|id| self.nodes.get(&id).map(|n| format!("{id}={}", n.addr)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The command line that starts node `id`.
    pub fn server_command(&self, id: u64, with_peers: bool) -> Result<Command> {
        let node = self.nodes.get(&id).with_context(|| format!("no node {id}"))?;
        let netns = self.options.placement.nodes.get(&id).map(|(netns, _)| netns.as_str());
        let mut command = self.binary_in(netns);
        command
            .arg("server")
            .args(["--node-id", &id.to_string()])
            .args(["--listen", &node.addr])
            .arg("--data-dir")
            .arg(&node.data_dir);
        if with_peers {
            command.args(["--peers", &self.initial_peers()]);
        }
        match &self.secret_file {
            Some(path) => {
                command.arg("--secret-file").arg(path);
            }
            None => {
                command.arg("--insecure-dev");
            }
        }
        if let Some(tls) = self.tls_dir() {
            command
                .arg("--tls-cert")
                .arg(tls.join(format!("node-{id}.pem")))
                .arg("--tls-key")
                .arg(tls.join(format!("node-{id}.key")))
                .arg("--tls-ca")
                .arg(tls.join("ca.pem"));
        }
        command.args(&self.options.server_args);
        let node_args = self.options.node_args.get(&id).or(node.extra_args.as_ref());
        if let Some(args) = node_args {
            command.args(args);
        }
        let sets_capacity = |args: &[String]| args.iter().any(|a| a.starts_with("--storage-capacity-bytes"));
        if let Some(bytes) = self.options.storage_capacity_bytes {
            let already_set = sets_capacity(&self.options.server_args) || node_args.is_some_and(|a| sets_capacity(a));
            if !already_set && self.options.chunk_store_bytes_max.is_none() {
                command.args(["--storage-capacity-bytes", &bytes.to_string()]);
            }
        }
        // The node's settings are exactly the flags above: none leak in from the test's own
        // environment (a `MENDFS_*` variable is a server setting, RUST_LOG its log filter).
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(|name| name.starts_with("MENDFS_")) {
                command.env_remove(&name);
            }
        }
        command.env_remove("RUST_LOG");
        command.envs(self.options.server_env.iter().map(|(name, value)| (name, value)));
        if self.options.clock_control {
            let library = faketime_library().context("libfaketime is not installed: apt-get install faketime")?;
            command
                .env("LD_PRELOAD", library)
                .env("FAKETIME_TIMESTAMP_FILE", self.clock_offset_path(id))
                // Timeouts, Raft elections and session leases run on the monotonic clock,
                // which no real skew moves either. (With this, libfaketime 0.9.10 fails
                // clock_nanosleep with TIMER_ABSTIME, which Python's time.sleep uses; Rust's
                // sleeps and tokio's timers do not.)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                // The file is read at every wall-clock read (some microseconds each; the
                // monotonic clock, read far more often, stays fast), so a new offset holds
                // from the next read on. libfaketime's cache would delay it by up to 2 s.
                .env("FAKETIME_NO_CACHE", "1");
        }
        Ok(command)
    }

    /// The file libfaketime reads node `id`'s clock offset from: beside its log rather than in
    /// its data directory, so a test that wipes a node's disk does not reset its clock too.
    fn clock_offset_path(&self, id: u64) -> PathBuf {
        self.root.join(format!("node-{id}.faketime"))
    }

    /// Sets node `id`'s wall clock `seconds` away from the true time (negative: behind), for
    /// every wall-clock read the node starts after this returns, and across its restarts: a
    /// step, as NTP makes when it finds a clock far off. Needs [`ClusterOptions::clock_control`].
    pub fn set_clock_offset(&self, id: u64, seconds: i64) -> Result<()> {
        if !self.options.clock_control {
            bail!("set_clock_offset needs a cluster started with ClusterOptions::clock_control");
        }
        if !self.nodes.contains_key(&id) {
            bail!("no node {id}");
        }
        write_clock_offset(&self.clock_offset_path(id), seconds)
    }

    /// Starts node `id` (which must not be running), its output appended to its log.
    /// Starts node `id` as a storage-only node (`--roles storage`) and adds it to the cluster as
    /// a non-voting learner.
    pub fn add_storage_learner(&mut self, id: u64) -> Result<()> {
        self.add_storage_learner_with(id, &[])
    }

    /// [`Cluster::add_storage_learner`] with more flags for that node.
    pub fn add_storage_learner_with(&mut self, id: u64, extra: &[String]) -> Result<()> {
        self.add_node_entry(id)?;
        if let Some(node) = self.nodes.get_mut(&id) {
            let mut args = vec!["--roles".to_string(), "storage".to_string()];
            args.extend(extra.iter().cloned());
            node.extra_args = Some(args);
        }
        self.spawn(id, false)?;
        let addr = self.addr(id);
        let id_text = id.to_string();
        wait_for(&format!("node {id} joins as a learner"), Duration::from_secs(90), || {
            Ok(self.run_cli(&["cluster", "add-node", &id_text, &addr, "--learner"]).ok())
        })?;
        Ok(())
    }

    pub fn spawn(&mut self, id: u64, with_peers: bool) -> Result<()> {
        let mut command = self.server_command(id, with_peers)?;
        let node = self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))?;
        if node.child.is_some() {
            bail!("node {id} is already running");
        }
        let log = OpenOptions::new().create(true).append(true).open(&node.log_path).context("open node log")?;
        let log_err = log.try_clone()?;
        if self.options.detached {
            use std::os::unix::process::CommandExt;
            command.process_group(0);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("start node {id}"))?;
        node.child = Some(child);
        node.stopped = false;
        Ok(())
    }

    /// Lets the running nodes go on after this `Cluster` is dropped; returns each one's pid.
    pub fn detach(&mut self) -> BTreeMap<u64, u32> {
        let mut pids = BTreeMap::new();
        for node in self.nodes.values_mut() {
            // Dropping a `Child` neither kills nor waits for it.
            if let Some(child) = node.child.take() {
                pids.insert(node.id, child.id());
            }
        }
        pids
    }

    /// SIGKILL: the node dies at once, with no chance to flush anything.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        let node = self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))?;
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        node.stopped = false;
        Ok(())
    }

    /// SIGSTOP: the node freezes, its sockets open, like a long GC pause or a hung disk.
    pub fn pause(&mut self, id: u64) -> Result<()> {
        let node = self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))?;
        let pid = node.pid().with_context(|| format!("node {id} is not running"))?;
        signal(pid, libc::SIGSTOP)?;
        node.stopped = true;
        Ok(())
    }

    /// SIGCONT after [`Cluster::pause`].
    pub fn resume(&mut self, id: u64) -> Result<()> {
        let node = self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))?;
        let pid = node.pid().with_context(|| format!("node {id} is not running"))?;
        signal(pid, libc::SIGCONT)?;
        node.stopped = false;
        Ok(())
    }

    /// Starts a killed node again with the same flags.
    pub fn restart(&mut self, id: u64) -> Result<()> {
        self.kill(id)?;
        self.spawn(id, id <= self.options.nodes as u64)
    }

    pub fn log(&self, id: u64) -> String {
        self.nodes.get(&id).and_then(|n| std::fs::read_to_string(&n.log_path).ok()).unwrap_or_default()
    }

    /// The last `lines` lines of node `id`'s log.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let log = self.log(id);
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn addr(&self, id: u64) -> String {
        self.nodes.get(&id).map(|n| n.addr.clone()).unwrap_or_default()
    }

    /// Endpoints of the given nodes, comma-separated.
    pub fn endpoints_of(&self, ids: &[u64]) -> String {
        ids.iter().map(|id| self.addr(*id)).collect::<Vec<_>>().join(",")
    }

    /// Endpoints of every node.
    pub fn endpoints(&self) -> String {
        self.nodes.values().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",")
    }

    pub fn endpoint_list(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.addr.clone()).collect()
    }

    /// A `mendfs` CLI command aimed at this cluster (all endpoints, the secret).
    pub fn cli(&self) -> Command {
        self.cli_at(&self.endpoints())
    }

    /// A `mendfs` CLI command aimed at the given endpoints.
    pub fn cli_at(&self, endpoints: &str) -> Command {
        self.cli_in(self.options.placement.cli_netns.as_deref(), endpoints)
    }

    /// A `mendfs` CLI command run in network namespace `netns` (None: this process's own),
    /// aimed at the given endpoints.
    pub fn cli_in(&self, netns: Option<&str>, endpoints: &str) -> Command {
        let mut command = self.binary_in(netns);
        command.env("MENDFS_ENDPOINTS", endpoints);
        for name in ["MENDFS_SECRET", "MENDFS_TOKEN", "MENDFS_CA", "MENDFS_CLIENT_CERT", "MENDFS_CLIENT_KEY"] {
            command.env_remove(name);
        }
        if let Some(secret) = self.secret() {
            command.env("MENDFS_SECRET", secret);
        }
        if let Some(tls) = self.tls_dir() {
            command.env("MENDFS_CA", tls.join("ca.pem"));
        }
        command.stdin(Stdio::null());
        command
    }

    /// The binary, to be run in network namespace `netns` when one is given. `ip netns exec`
    /// execs it in place, so the child's pid is the binary's own (signals reach it).
    fn binary_in(&self, netns: Option<&str>) -> Command {
        match netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        }
    }

    /// Runs the CLI with `args`; Ok(stdout) on success, Err with stderr otherwise.
    pub fn run_cli(&self, args: &[&str]) -> Result<String> {
        let output = self.cli().args(args).output().context("run mendfs")?;
        output_result(args, output)
    }

    /// `cluster status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = self.run_cli(&["cluster", "status", "--json", "--timeout", "5"])?;
        serde_json::from_str(&out).context("parse cluster status JSON")
    }

    /// Waits until a leader is elected that every running, unpaused node agrees on, and returns it.
    pub fn wait_for_leader(&self, deadline: Duration) -> Result<u64> {
        let running: Vec<u64> = self.nodes.values().filter(|n| n.is_running() && !n.stopped).map(|n| n.id).collect();
        wait_for("a leader", deadline, || {
            let status = self.status()?;
            let Some(leader) = status["leader"].as_u64() else { return Ok(None) };
            if !running.contains(&leader) {
                return Ok(None);
            }
            let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
            let leader_ok = nodes.iter().any(|n| n["id"].as_u64() == Some(leader) && n["role"] == "leader");
            Ok(leader_ok.then_some(leader))
        })
    }

    /// Waits until every running member has applied the leader's whole log.
    pub fn wait_for_caught_up(&self, ids: &[u64], deadline: Duration) -> Result<()> {
        wait_for("followers to catch up", deadline, || {
            let status = self.status()?;
            let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
            let leader_last = nodes
                .iter()
                .find(|n| n["role"] == "leader")
                .and_then(|n| n["last_log_index"].as_u64())
                .unwrap_or(u64::MAX);
            let all = ids.iter().all(|id| {
                nodes.iter().any(|n| n["id"].as_u64() == Some(*id) && n["applied_index"].as_u64() >= Some(leader_last))
            });
            if !all {
                let unreachable: Vec<String> = nodes
                    .iter()
                    .filter(|n| n["role"] == "unreachable")
                    .filter_map(|n| n["id"].as_u64())
                    .map(|id| format!("node {id} log tail:\n{}", self.log_tail(id, 8)))
                    .collect();
                bail!("not caught up: {status}\n{}", unreachable.join("\n"));
            }
            Ok(Some(()))
        })
    }
}

/// Writes a libfaketime offset ("+3600", "-60", "+0") to `path` in one piece: a temporary file
/// renamed over it, so a node never reads a half-written offset.
fn write_clock_offset(path: &Path, seconds: i64) -> Result<()> {
    let temporary = path.with_extension("faketime.tmp");
    std::fs::write(&temporary, format!("{seconds:+}\n")).with_context(|| format!("write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("rename {} over {}", temporary.display(), path.display()))
}

pub fn output_result(args: &[&str], output: Output) -> Result<String> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        bail!(
            "mendfs {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                if node.stopped {
                    let _ = signal(child.id(), libc::SIGCONT);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for mount_point in &self.mounts {
            let _ = Command::new("umount").arg(mount_point).status();
        }
        // A failing test keeps its nodes' data and logs for the post-mortem.
        if std::thread::panicking() {
            if let Some(temp) = self._temp.take() {
                eprintln!("cluster directory kept for inspection: {}", temp.keep().display());
            }
        }
    }
}

/// Opens a file for appending (for callers that collect a child's output).
pub fn append_file(path: &Path) -> Result<File> {
    OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("open {}", path.display()))
}

/// Every chunk file a node's chunk store holds (not its temporary or quarantined files), sorted.
pub fn chunk_files(data_dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&data_dir.join("chunks").join("chunks"), &mut out);
    out.sort();
    out
}

/// The bytes of every chunk file a node's chunk store holds (copies and shards alike).
pub fn chunk_bytes(data_dir: &Path) -> u64 {
    chunk_files(data_dir).iter().map(|path| std::fs::metadata(path).map_or(0, |m| m.len())).sum()
}

/// Bytes `start..start + len` of the deterministic content named `stamp`: every 8-byte word is
/// (stamp, word index), big-endian. Distinct stamps share no chunk (nothing deduplicates), and a
/// mix of two versions or a shifted chunk is detected, not just a changed hash.
pub fn stamped_bytes(stamp: u32, start: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    let first_word = start / 8;
    let mut word = first_word;
    while out.len() < len + (start % 8) as usize {
        out.extend_from_slice(&stamp.to_be_bytes());
        out.extend_from_slice(&(word as u32).to_be_bytes());
        word += 1;
    }
    out.drain(..(start % 8) as usize);
    out.truncate(len);
    out
}

/// Bytes `start..start + len` of the pseudo-random content named `seed`: every 8-byte word is
/// SplitMix64 of the word index mixed with the seed's own SplitMix64. Like [`stamped_bytes`] it
/// is readable from any offset and no word repeats within a seed; unlike it, it has no linear
/// structure. Erasure coding is linear: the parity shards of two stamped stripes can coincide,
/// and a node keeps identical shards once, so bytes on disk would undercount. A measurement of
/// striped files wants this content. (Two seeds share a word only if their keys agree in all
/// the high bits a word index leaves alone: about 2^-24 for a pair of 1 TiB contents.)
pub fn mixed_bytes(seed: u32, start: u64, len: usize) -> Vec<u8> {
    let key = splitmix64(u64::from(seed));
    let words = (start / 8)..(start + len as u64).div_ceil(8);
    let mut out: Vec<u8> = words.flat_map(|word| splitmix64(key ^ word).to_be_bytes()).collect();
    out.drain(..(start % 8) as usize);
    out.truncate(len);
    out
}

/// SplitMix64's output function: a bijection on u64 whose output bits each depend on every
/// input bit.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    #[test]
    fn stamped_bytes_at_any_offset_match_the_whole() {
        let whole = super::stamped_bytes(7, 0, 100);
        assert_eq!(&whole[..8], &[0, 0, 0, 7, 0, 0, 0, 0]);
        assert_eq!(&whole[8..16], &[0, 0, 0, 7, 0, 0, 0, 1]);
        for start in 0..30u64 {
            for len in [0usize, 1, 7, 8, 9, 50] {
                let part = super::stamped_bytes(7, start, len);
                assert_eq!(part, whole[start as usize..start as usize + len], "start {start} len {len}");
            }
        }
        assert_ne!(super::stamped_bytes(8, 0, 64), super::stamped_bytes(7, 0, 64));
    }

    #[test]
    fn mixed_bytes_at_any_offset_match_the_whole_and_differ_by_seed() {
        let whole = super::mixed_bytes(7, 0, 100);
        assert_eq!(whole.len(), 100);
        for start in 0..30u64 {
            for len in [0usize, 1, 7, 8, 9, 50] {
                let part = super::mixed_bytes(7, start, len);
                assert_eq!(part, whole[start as usize..start as usize + len], "start {start} len {len}");
            }
        }
        assert_ne!(super::mixed_bytes(8, 0, 64), super::mixed_bytes(7, 0, 64));
        // No 8-byte word repeats within a seed's first MiB (SplitMix64 is a bijection).
        let words: std::collections::HashSet<Vec<u8>> =
            super::mixed_bytes(7, 0, 1 << 20).chunks(8).map(<[u8]>::to_vec).collect();
        assert_eq!(words.len(), (1 << 20) / 8);
    }
}
