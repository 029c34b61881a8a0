//! `mendfs demo`: a local cluster, filled with files, broken and healed in front of you.
//!
//! Starts real `mendfs server` processes on free 127.0.0.1 ports in a temporary directory
//! (three metadata voters and storage-only nodes), writes sample files, SIGKILLs nodes that
//! hold copies, shows the leader's failure detector mark them `suspect` then `down` (with phi),
//! shows repair restore full redundancy from the survivors, verifies every file byte for byte,
//! restarts the nodes and shows them rejoin, and cleans up. Exit 0 only if every file verified.
//! Works without a terminal: progress bars become plain lines.
//!
//! Replicated (the default): 4 nodes, 3 copies of every chunk, one node killed. Erasure-coded
//! (`--redundancy ec:K+M`): K + 2M nodes, chunks striped into K + M shards on distinct nodes,
//! M nodes killed at once; every file still reads (decoded from parity) while they are dead, and
//! the M nodes beyond the K + M a stripe spans are what lets repair put each rebuilt shard on
//! a live node that holds no other shard of its stripe.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::cmp::Reverse;
use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mendfs_client::{Client, ClientConfig, StatusReply};
use mendfs_node::{Redundancy, EC_CHUNK_BYTES_MIN};
use mendfs_testkit::{mixed_bytes, Cluster, ClusterOptions};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Leave the cluster running and print how to use it.
    #[arg(long)]
    pub keep: bool,
    /// Sample files to write.
    #[arg(long, default_value_t = 24)]
    pub files: u32,
    /// Size of the largest sample file in MiB (sizes range from 1 KiB up to it).
    #[arg(long, default_value_t = 8)]
    pub max_file_mib: u64,
    /// How the sample files are kept: `replicate` (3 copies of every chunk, on 4 nodes, one
    /// killed) or `ec:K+M` (chunks of 64 KiB or more as K data and M parity shards, on K + 2M
    /// nodes, M killed at once).
    #[arg(long, default_value = "replicate")]
    pub redundancy: Redundancy,
}

/// The cluster's copies of a replicated chunk (the servers' default replication factor).
const REPLICAS: u64 = 3;
/// Nodes 1 to 3 vote on the metadata; the rest are storage-only learners.
const VOTERS: u64 = 3;
/// The most server processes the demo starts (ec:K+M needs K + 2M).
const NODES_MAX: u64 = 20;

const CHUNK_BYTES: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(90);
/// Detection and repair scans shortened so that a SIGKILLed node is `down` about 6 s later
/// and its repair starts within half a second, not after 15 s: heartbeats every 500 ms, `down`
/// 4 s after suspicion (the defaults are 1 s and 10 s), a repair scan every 500 ms (default
/// 1 s). The demo and `bench ec-cluster` run with them.
pub(crate) const QUICK_HEALING_ARGS: &[&str] = &[
    "--health-interval-ms",
    "500",
    "--acceptable-pause-ms",
    "1500",
    "--down-after-ms",
    "4000",
    "--repair-scan-interval-ms",
    "500",
];
/// The demo's own settings: 1 MiB chunks, so sample files span several; repair throttled to
/// 8 MiB/s so its progress can be watched: about 3 s for the default files.
const DEMO_SERVER_ARGS: &[&str] = &["--chunk-size-bytes", "1048576", "--repair-bytes-per-sec", "8388608"];

fn step(text: &str) {
    println!("\n== {text}");
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A progress bar on a terminal; elsewhere, a line at every 25 %.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    reported_quarter: u64,
    label: &'static str,
}

impl Progress {
    fn new(total: u64, label: &'static str) -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_message(label);
            bar
        });
        Progress { bar, total: total.max(1), reported_quarter: 0, label }
    }

    fn set(&mut self, done: u64, total: u64) {
        self.total = total.max(1);
        match &self.bar {
            Some(bar) => {
                bar.set_length(self.total);
                bar.set_position(done);
            }
            None => {
                let quarter = (done.min(self.total) * 4) / self.total;
                if quarter > self.reported_quarter {
                    self.reported_quarter = quarter;
                    println!("{}: {} of {} MiB ({}%)", self.label, mib(done), mib(self.total), quarter * 25);
                }
            }
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1 << 20) as f64)
}

/// Sample file sizes: from 1 KiB up to `max`, some on chunk boundaries, deterministic.
fn file_sizes(count: u32, max: u64) -> Vec<u64> {
    (0..count as u64)
        .map(|i| match i % 4 {
            0 => 1024 + i * 37,
            1 => CHUNK_BYTES * (1 + i % 3),
            2 => (max * (i + 1) / count as u64).max(4096) + 123,
            _ => CHUNK_BYTES / 2 + i * 1000,
        })
        .map(|size| size.min(max.max(1024)))
        .collect()
}

fn node_state(status: &StatusReply, id: u64) -> (String, f64) {
    status.nodes.iter().find(|n| n.id == id).map_or((String::new(), 0.0), |n| (n.state.clone(), n.phi))
}

/// A sample file's content. Pseudo-random rather than patterned: the parity shards of
/// patterned stripes can coincide, and a node stores identical shards once, which would make
/// the bytes on disk undercount.
fn sample_bytes(file_idx: usize, size: u64) -> Vec<u8> {
    mixed_bytes(file_idx as u32, 0, size as usize)
}

fn sample_path(file_idx: usize) -> String {
    format!("/demo/file-{file_idx:03}")
}

/// "node 4", "nodes 6 and 8", "nodes 5, 6 and 8".
fn nodes_phrase(ids: &[u64]) -> String {
    match ids {
        [one] => format!("node {one}"),
        [rest @ .., last] => {
            let rest: Vec<String> = rest.iter().map(u64::to_string).collect();
            format!("nodes {} and {last}", rest.join(", "))
        }
        [] => "no node".to_string(),
    }
}

/// What the demo does for a redundancy: how many nodes it starts and how many it kills.
struct Plan {
    redundancy: Redundancy,
    /// Nodes that hold one chunk: its copies, or its stripe's shards.
    width: u64,
    /// Nodes killed at once: as many as the redundancy survives (one, for replication: the
    /// demo of old, unchanged).
    victims: usize,
}

impl Plan {
    fn new(redundancy: Redundancy) -> Result<Self> {
        let (width, victims) = match redundancy {
            Redundancy::Replicate => (REPLICAS, 1),
            Redundancy::Erasure(scheme) => (scheme.total_shards() as u64, scheme.parity_shards()),
        };
        let plan = Plan { redundancy, width, victims };
        anyhow::ensure!(
            plan.nodes() <= NODES_MAX,
            "{redundancy} would need {} nodes ({width} for a stripe, {victims} more to lose); the demo starts at most \
             {NODES_MAX}: choose K + 2M <= {NODES_MAX}",
            plan.nodes()
        );
        Ok(plan)
    }

    /// Every chunk spans `width` nodes; `victims` more mean that once they die, the live nodes
    /// can again hold a whole stripe, one shard each (a rebuilt shard must go to a node that
    /// holds no shard of its stripe). For 3 copies and one victim, the 4 nodes of old.
    fn nodes(&self) -> u64 {
        self.width + self.victims as u64
    }

    fn scheme(&self) -> Option<mendfs_erasure::Scheme> {
        self.redundancy.scheme()
    }
}

/// Where the sample files' bytes go: inline in the metadata, striped, or replicated.
#[derive(Debug, Default, PartialEq, Eq)]
struct Layout {
    inline_files: usize,
    striped_files: usize,
    stripes: u64,
    replicated_chunks: u64,
}

impl Layout {
    /// As the coordinator cuts them: chunks of `CHUNK_BYTES`; with a scheme, each of at least
    /// `EC_CHUNK_BYTES_MIN` a stripe and smaller ones copies; files up to `inline_max` inline.
    fn of(sizes: &[u64], scheme: Option<mendfs_erasure::Scheme>, inline_max: u64) -> Self {
        let mut layout = Layout::default();
        for &size in sizes {
            if size <= inline_max {
                layout.inline_files += 1;
                continue;
            }
            let chunks = (0..size.div_ceil(CHUNK_BYTES)).map(|i| (size - i * CHUNK_BYTES).min(CHUNK_BYTES));
            let striped = chunks.filter(|len| scheme.is_some() && *len >= EC_CHUNK_BYTES_MIN as u64).count() as u64;
            layout.stripes += striped;
            layout.replicated_chunks += size.div_ceil(CHUNK_BYTES) - striped;
            layout.striped_files += usize::from(striped > 0);
        }
        layout
    }

    fn chunks(&self) -> u64 {
        self.stripes + self.replicated_chunks
    }

    /// Chunk records on the nodes: a copy each, or a shard each.
    fn records(&self, width: u64) -> u64 {
        REPLICAS * self.replicated_chunks + width * self.stripes
    }
}

/// Bytes in the chunk files of every node's store, shards and copies alike.
fn bytes_on_disk(cluster: &Cluster) -> u64 {
    cluster.nodes.values().map(|node| mendfs_testkit::chunk_bytes(&node.data_dir)).sum()
}

/// "12 with 4/6 shards, 20 with 5/6 shards": fewest live shards first.
fn stripe_counts(status: &StatusReply) -> String {
    let mut counts = status.stripes.clone();
    counts.sort_by_key(|c| c.live_shards);
    let counts: Vec<String> =
        counts.iter().map(|c| format!("{} with {}/{} shards", c.stripes, c.live_shards, c.total_shards)).collect();
    if counts.is_empty() {
        "none".to_string()
    } else {
        counts.join(", ")
    }
}

fn stripes_whole(status: &StatusReply) -> bool {
    status.stripes.iter().all(|c| c.live_shards == c.total_shards)
}

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    anyhow::ensure!(args.files >= 1, "--files must be at least 1");
    anyhow::ensure!((1..=1024).contains(&args.max_file_mib), "--max-file-mib must be within 1 ..= 1024");
    let plan = Plan::new(args.redundancy)?;
    let binary = std::env::current_exe().context("locate the mendfs binary")?;
    let demo_started = Instant::now();

    let demo = DemoCluster::start(&binary, &plan, args.keep).await?;
    let DemoCluster { mut cluster, client, s3_args, dashboard_addrs, token_file } = demo;
    print_status(&cluster);

    let sizes = file_sizes(args.files, args.max_file_mib << 20);
    let total: u64 = sizes.iter().sum();
    let inline_max = mendfs_node::NodeConfig::default().inline_max_bytes as u64;
    let layout = Layout::of(&sizes, plan.scheme(), inline_max);
    let how = match plan.scheme() {
        None => "1 MiB chunks, 3 copies of each".to_string(),
        Some(scheme) => format!(
            "as {scheme}: 1 MiB chunks, each of {} KiB or more a stripe of {} data and {} parity shards on {} \
             nodes, smaller ones 3 copies",
            EC_CHUNK_BYTES_MIN >> 10,
            scheme.data_shards(),
            scheme.parity_shards(),
            scheme.total_shards()
        ),
    };
    step(&format!(
        "Writing {} sample files, {} MiB in all ({how}; files up to 16 KiB kept inline in the metadata)",
        sizes.len(),
        mib(total)
    ));
    write_files(&client, &sizes, plan.redundancy).await?;
    if plan.scheme().is_some() {
        println!(
            "{} of {} files striped into {} stripes; {} small chunks replicated; {} files inline",
            layout.striped_files,
            sizes.len(),
            layout.stripes,
            layout.replicated_chunks,
            layout.inline_files
        );
    }
    // The leader's counts come from its repair scan and the nodes' heartbeats, each some hundreds
    // of milliseconds behind: wait until both have seen every chunk, so the victims are chosen,
    // and their copies counted, on what the nodes really hold.
    wait_status(&client, "the leader to count every chunk written", |status| {
        let storage = status.nodes.iter().filter(|n| n.storage);
        status.chunks == layout.chunks()
            && storage.clone().map(|n| n.chunks_listed).sum::<u64>() == layout.records(plan.width)
            && storage.clone().all(|n| n.health.as_ref().is_some_and(|h| h.chunk_count == n.chunks_listed))
    })
    .await?;
    let on_disk = bytes_on_disk(&cluster);
    let disk_ratio = on_disk as f64 / total.max(1) as f64;
    let expected_ratio = match plan.scheme() {
        None => "3 copies".to_string(),
        Some(scheme) => format!(
            "{scheme}: ({} + {}) / {} = {:.2} per striped byte",
            scheme.data_shards(),
            scheme.parity_shards(),
            scheme.data_shards(),
            scheme.overhead()
        ),
    };
    println!(
        "on disk: {} MiB of chunk files for {} MiB of files = {disk_ratio:.2} bytes per file byte ({expected_ratio}; \
         inline files are in the metadata)",
        mib(on_disk),
        mib(total)
    );
    let status = client.status().await?;
    let leader = status.leader.context("no leader")?;
    let victims = choose_victims(&status, leader, plan.victims);
    anyhow::ensure!(victims.len() == plan.victims, "found {} nodes to kill, not {}", victims.len(), plan.victims);
    let held: u64 = victims.iter().map(|(_, held)| held).sum();
    let victims: Vec<u64> = victims.into_iter().map(|(id, _)| id).collect();
    let victims_text = nodes_phrase(&victims);
    print_status(&cluster);

    match plan.scheme() {
        None => step(&format!("SIGKILL {victims_text}: it holds {held} chunk copies")),
        Some(_) => step(&format!("SIGKILL {victims_text} at once: they hold {held} shards and chunk copies")),
    }
    for id in &victims {
        blocking(|| cluster.kill(*id))?;
    }
    // With a stripe, the dead nodes' shards are missing at once: read everything back while the
    // detector is still making up its mind, concurrently, so that its timings stay true.
    let degraded_read = plan.scheme().map(|_| {
        println!("reading every file back meanwhile: stripes that lost shards are decoded from the others");
        let (client, sizes) = (client.clone(), sizes.clone());
        tokio::spawn(async move { verify_files(&client, &sizes).await })
    });
    let detection = watch_detection(&client, &victims, degraded_read).await?;

    match plan.scheme() {
        None => step(&format!(
            "Repairing: the leader re-creates {victims_text}'s copies from the survivors (throttled to 8 MiB/s)"
        )),
        Some(scheme) => step(&format!(
            "Repairing: the leader rebuilds each shard {victims_text} held from {} others, on a live node that holds \
             no shard of its stripe (throttled to 8 MiB/s)",
            scheme.data_shards()
        )),
    }
    let repair = watch_repair(&client, &victims, plan.scheme().is_some()).await?;
    let copies = if plan.scheme().is_some() { "shards and chunk copies" } else { "copies" };
    println!(
        "full redundancy again {:.1?} after `down`: {} {copies}, {} MiB",
        repair.healed_after,
        repair.copies,
        mib(repair.bytes)
    );
    let rebuilt = match plan.scheme() {
        None => None,
        Some(scheme) => Some(rebuild_counters(&client, &victims, repair.copies, scheme.data_shards()).await?),
    };
    print_status(&cluster);

    let one = victims.len() == 1;
    let is = if one { "is" } else { "are" };
    step(&format!("Verifying every file byte for byte ({victims_text} {is} still dead)"));
    let (verified, wrong) = verify_files(&client, &sizes).await;
    println!("{verified} of {} files read back identical", sizes.len());

    let rejoins = if one { "it replays its log and rejoins" } else { "they replay their logs and rejoin" };
    step(&format!("Restarting {victims_text}: {rejoins}"));
    for id in &victims {
        blocking(|| cluster.restart(*id))?;
    }
    let restarted_at = Instant::now();
    wait_status(&client, &format!("{victims_text} up again"), |s| {
        victims.iter().all(|id| node_state(s, *id).0 == "up")
    })
    .await?;
    let copies = if one { "its copies" } else { "their copies and shards" };
    println!(
        "{victims_text} {is} up again after {:.1?}; {copies} that are now surplus are trimmed later",
        restarted_at.elapsed()
    );
    print_status(&cluster);

    step("Summary");
    println!("files verified:     {verified} of {} ({} MiB)", sizes.len(), mib(total));
    if let Some((read_back, _)) = &detection.degraded_read {
        println!("degraded reads:     {read_back} of {} files read back with {victims_text} dead", sizes.len());
    }
    println!("on disk:            {disk_ratio:.2} bytes per file byte ({expected_ratio})");
    println!(
        "time to detect:     suspect {:.1}s, down {:.1}s after SIGKILL",
        detection.suspect_after.as_secs_f64(),
        detection.down_after.as_secs_f64()
    );
    println!("time to heal:       {:.1}s from down to full redundancy", repair.healed_after.as_secs_f64());
    match &rebuilt {
        None => println!("bytes repaired:     {} MiB in {} chunk copies", mib(repair.bytes), repair.copies),
        Some(rebuilt) => {
            println!(
                "bytes repaired:     {} MiB in {} shards and chunk copies ({} shards rebuilt, {} chunks copied)",
                mib(repair.bytes),
                repair.copies,
                rebuilt.shards,
                rebuilt.copies
            );
            println!(
                "repair reads:       {:.2} bytes read per byte rebuilt (each shard from K = {} others)",
                rebuilt.read_per_byte(),
                rebuilt.data_shards
            );
        }
    }
    println!("{:<19} {:.1}s after restart", format!("{victims_text} rejoined:"), restarted_at.elapsed().as_secs_f64());
    println!("demo took:          {:.1}s", demo_started.elapsed().as_secs_f64());
    let wrong: Vec<String> =
        wrong.into_iter().chain(detection.degraded_read.into_iter().flat_map(|(_, w)| w)).collect();
    if !wrong.is_empty() {
        eprintln!("error: {} files did not verify: {}", wrong.len(), wrong.join("; "));
        return Ok(ExitCode::FAILURE);
    }
    if args.keep {
        let s3_key = client.s3_create_key("demo", true).await?;
        // A fresh one: the first link may have been opened already.
        let login = client.create_login_link("read", LOGIN_LINK_TTL, LOGIN_SESSION_TTL).await?;
        let dashboard_url = crate::auth_cmd::login_link(&dashboard_addrs[&1], &login.code);
        println!("\nThe cluster keeps running. Try:");
        println!("  export MENDFS_ENDPOINTS={}", cluster.endpoints());
        println!("  export MENDFS_TOKEN=$(cat {})", token_file.display());
        println!("  export AWS_ENDPOINT_URL=http://{}", s3_args[&1][1]);
        println!("  export AWS_ACCESS_KEY_ID={}", s3_key.key_id);
        println!("  export AWS_SECRET_ACCESS_KEY={}", s3_key.secret);
        println!("  export AWS_DEFAULT_REGION=us-east-1");
        println!("  aws s3 mb s3://demo && aws s3 cp FILE s3://demo/ && aws s3 ls s3://demo");
        println!("  mendfs cluster status");
        println!("  open {dashboard_url}   # the dashboard, a one-time login link (new ones: mendfs auth login-link)");
        println!("  mendfs ls /demo -l");
        println!("  mendfs get /demo/file-000 -");
        println!("Stop it with: pkill -f 'mendfs server.*{}'", cluster.root().display());
        cluster.detach();
    }
    Ok(ExitCode::SUCCESS)
}

/// The demo's cluster, up, with an admin client and what `--keep` prints.
struct DemoCluster {
    cluster: Cluster,
    client: Client,
    /// Each node's `--s3 ADDR --http ADDR`.
    s3_args: BTreeMap<u64, Vec<String>>,
    dashboard_addrs: BTreeMap<u64, String>,
    token_file: std::path::PathBuf,
}

impl DemoCluster {
    async fn start(binary: &std::path::Path, plan: &Plan, keep: bool) -> Result<Self> {
        let nodes = plan.nodes();
        let learners = nodes - VOTERS;
        let plural = if learners == 1 { "node" } else { "nodes" };
        step(&format!("Starting a local {nodes}-node cluster: 3 metadata voters and {learners} storage-only {plural}"));
        println!("(real `mendfs server` processes on 127.0.0.1; detector timings shortened for the demo)");
        if let Some(scheme) = plan.scheme() {
            println!(
                "({scheme} puts a stripe's {} shards on {} distinct nodes; {nodes} nodes leave {} alive when {} are \
                 killed, so repair can restore every stripe to {} shards on distinct live nodes)",
                plan.width,
                plan.width,
                nodes - plan.victims as u64,
                plan.victims,
                plan.width
            );
        }
        // Every node serves S3 too (what `--keep` leaves running for an S3 client to try), and
        // HTTP: the dashboard to watch the demo in.
        let mut s3_args = BTreeMap::new();
        let mut dashboard_addrs = BTreeMap::new();
        for id in 1..=nodes {
            let addr = format!("127.0.0.1:{}", mendfs_testkit::free_port()?);
            let http = format!("127.0.0.1:{}", mendfs_testkit::free_port()?);
            s3_args.insert(id, vec!["--s3".to_string(), addr, "--http".to_string(), http.clone()]);
            dashboard_addrs.insert(id, http);
        }
        let options = ClusterOptions {
            nodes: VOTERS as usize,
            keep_dir: keep,
            server_args: QUICK_HEALING_ARGS.iter().chain(DEMO_SERVER_ARGS).map(|s| s.to_string()).collect(),
            node_args: s3_args.iter().filter(|(id, _)| **id <= VOTERS).map(|(id, a)| (*id, a.clone())).collect(),
            ..ClusterOptions::default()
        };
        let mut cluster = blocking(|| Cluster::start(binary, options))?;
        println!("directory: {}", cluster.root().display());
        let leader = blocking(|| cluster.wait_for_leader(DEADLINE))?;
        for id in VOTERS + 1..=nodes {
            blocking(|| cluster.add_storage_learner_with(id, &s3_args[&id]))?;
        }
        let learner_ids: Vec<u64> = (VOTERS + 1..=nodes).collect();
        let joined = if learners == 1 { "joined as a storage-only learner" } else { "joined as storage-only learners" };
        println!("node {leader} was elected leader; {} {joined}", nodes_phrase(&learner_ids));

        // The secret is the nodes' credential; the demo's client, like any user, gets a token.
        let mut config = ClientConfig::new(cluster.endpoint_list());
        config.secret = cluster.secret();
        config.deadline = Duration::from_secs(60);
        let admin = Client::new(config.clone())?.create_token("demo-admin", "admin").await?;
        let token_file = cluster.root().join("admin.token");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&token_file)?;
            writeln!(file, "{}", admin.token)?;
        }
        println!("created an admin token for the demo's client ({})", token_file.display());
        // A one-time link that opens a read session (its code rides in the fragment, which
        // browsers never send): the demo's output can be shared without sharing a credential.
        let login = Client::new(config.clone())?.create_login_link("read", LOGIN_LINK_TTL, LOGIN_SESSION_TTL).await?;
        println!(
            "watch it in a browser (a one-time link, valid for {}): {}",
            humantime::format_duration(LOGIN_LINK_TTL),
            crate::auth_cmd::login_link(&dashboard_addrs[&1], &login.code)
        );
        config.secret = None;
        config.token = Some(admin.token);
        let client = Client::new(config)?;
        wait_status(&client, &format!("all {nodes} nodes up and storing"), |s| {
            s.nodes.iter().filter(|n| n.storage && n.state == "up").count() as u64 == nodes
        })
        .await?;
        Ok(DemoCluster { cluster, client, s3_args, dashboard_addrs, token_file })
    }
}

async fn write_files(client: &Client, sizes: &[u64], redundancy: Redundancy) -> Result<()> {
    let total: u64 = sizes.iter().sum();
    let redundancy = redundancy.to_string();
    let mut progress = Progress::new(total, "written");
    let mut written = 0u64;
    let started = Instant::now();
    for (i, size) in sizes.iter().enumerate() {
        let path = sample_path(i);
        let data = std::io::Cursor::new(sample_bytes(i, *size));
        client
            .put_file_with(&path, data, Some(*size), None, &redundancy, |_| {})
            .await
            .with_context(|| format!("writing {path}"))?;
        written += size;
        progress.set(written, total);
    }
    progress.finish();
    println!("{} files in {:.1?}", sizes.len(), started.elapsed());
    Ok(())
}

/// Reads every sample file back and compares it with what was written: how many matched, and
/// what was wrong with the others.
async fn verify_files(client: &Client, sizes: &[u64]) -> (usize, Vec<String>) {
    let mut verified = 0usize;
    let mut wrong = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let path = sample_path(i);
        let mut got = Vec::with_capacity(*size as usize);
        match client.get_file(&path, &mut got, |_, _| {}).await {
            Ok(_) if got == sample_bytes(i, *size) => verified += 1,
            Ok(_) => wrong.push(format!("{path}: content differs")),
            Err(e) => wrong.push(format!("{path}: {e}")),
        }
    }
    (verified, wrong)
}

/// Storage nodes to kill: those holding the most chunk records, never the leader, and at most
/// one metadata voter (two of three dead would leave the metadata without a quorum).
fn choose_victims(status: &StatusReply, leader: u64, count: usize) -> Vec<(u64, u64)> {
    let mut candidates: Vec<(u64, u64)> =
        status.nodes.iter().filter(|n| n.storage && n.id != leader).map(|n| (n.id, n.chunks_listed)).collect();
    candidates.sort_by_key(|(id, held)| (Reverse(*held), *id));
    let voters_max = (VOTERS - 1) / 2;
    let mut voters = 0;
    let mut victims = Vec::new();
    for (id, held) in candidates {
        if victims.len() == count {
            break;
        }
        if id <= VOTERS {
            if voters == voters_max {
                continue;
            }
            voters += 1;
        }
        victims.push((id, held));
    }
    victims
}

/// What the failure detector showed after the SIGKILL, and the degraded read done meanwhile.
struct Detection {
    /// The first victim suspected.
    suspect_after: Duration,
    /// Every victim down.
    down_after: Duration,
    /// Files read back identical, and the others.
    degraded_read: Option<(usize, Vec<String>)>,
}

/// Prints each victim's state changes as the leader's detector reports them, until all are
/// `down`; and the degraded read's result when it is in.
async fn watch_detection(
    client: &Client,
    victims: &[u64],
    mut degraded_read: Option<tokio::task::JoinHandle<(usize, Vec<String>)>>,
) -> Result<Detection> {
    let killed_at = Instant::now();
    let mut last_states: BTreeMap<u64, String> = victims.iter().map(|id| (*id, "up".to_string())).collect();
    let mut suspect_after = None;
    let mut down_after = None;
    let mut read_result = None;
    let victims_text = nodes_phrase(victims);
    while down_after.is_none() || degraded_read.is_some() {
        if killed_at.elapsed() > DEADLINE {
            bail!("{victims_text} not declared down, or the files not read back, within {DEADLINE:?}");
        }
        if degraded_read.as_ref().is_some_and(|task| task.is_finished()) {
            if let Some(task) = degraded_read.take() {
                let (verified, wrong) = task.await.context("the degraded read")?;
                println!(
                    "{:>6.1}s  {verified} of {} files read back identical with {victims_text} dead",
                    killed_at.elapsed().as_secs_f64(),
                    verified + wrong.len()
                );
                read_result = Some((verified, wrong));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if down_after.is_some() {
            continue;
        }
        let Ok(status) = client.status().await else { continue };
        for (id, last_state) in &mut last_states {
            let (state, phi) = node_state(&status, *id);
            if state == *last_state || state.is_empty() {
                continue;
            }
            let at = killed_at.elapsed();
            println!("{:>6.1}s  node {id}: {last_state} -> {state} (phi {phi:.1})", at.as_secs_f64());
            if state == "suspect" || state == "down" {
                suspect_after.get_or_insert(at);
            }
            *last_state = state;
        }
        if last_states.values().all(|state| state == "down") {
            down_after = Some(killed_at.elapsed());
        }
    }
    Ok(Detection {
        suspect_after: suspect_after.unwrap_or_default(),
        down_after: down_after.unwrap_or_default(),
        degraded_read: read_result,
    })
}

/// The repair job as the demo watched it.
struct RepairSeen {
    healed_after: Duration,
    bytes: u64,
    copies: u64,
}

/// Follows the repair job from `down` to full redundancy: no chunk short of copies or shards,
/// and nothing listed on the dead nodes any more. For stripes, prints their counts by live
/// shards each time a scan changes them.
async fn watch_repair(client: &Client, victims: &[u64], striped: bool) -> Result<RepairSeen> {
    let down_at = Instant::now();
    // Created once the leader reports the job, so the bar starts at its real total.
    let mut repair_progress: Option<Progress> = None;
    let mut seen = RepairSeen { healed_after: Duration::ZERO, bytes: 0, copies: 0 };
    let mut stripes_shown = String::new();
    loop {
        if down_at.elapsed() > DEADLINE {
            bail!("repair did not finish within {DEADLINE:?}");
        }
        let Ok(status) = client.status().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let stripes = stripe_counts(&status);
        if striped && stripes != stripes_shown {
            println!("stripes by live shards: {stripes}");
            stripes_shown = stripes;
        }
        if let Some(repair) = &status.repair {
            seen.bytes = repair.done_bytes;
            seen.copies = repair.done_copies;
            repair_progress
                .get_or_insert_with(|| Progress::new(repair.total_bytes, "repaired"))
                .set(repair.done_bytes, repair.total_bytes);
        }
        let finished = status.repair.as_ref().is_some_and(|r| r.finished_unix_ms.is_some());
        let unlisted = victims.iter().all(|id| status.nodes.iter().any(|n| n.id == *id && n.chunks_listed == 0));
        if finished && status.under_replicated_chunks == 0 && status.chunks > 0 && stripes_whole(&status) && unlisted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(progress) = repair_progress {
        progress.finish();
    }
    seen.healed_after = down_at.elapsed();
    Ok(seen)
}

/// The survivors' repair counters: shards rebuilt and the shard bytes read to rebuild them.
struct Rebuilt {
    shards: u64,
    copies: u64,
    written_bytes: u64,
    read_bytes: u64,
    data_shards: usize,
}

impl Rebuilt {
    fn read_per_byte(&self) -> f64 {
        self.read_bytes as f64 / self.written_bytes.max(1) as f64
    }
}

/// Waits until the live nodes' counters (sent with their heartbeats) account for all `copies`
/// the job did, then prints what rebuilding cost.
async fn rebuild_counters(client: &Client, victims: &[u64], copies: u64, data_shards: usize) -> Result<Rebuilt> {
    let sum = |status: &StatusReply, field: fn(&mendfs_proto::v1::NodeHealth) -> u64| -> u64 {
        let live = status.nodes.iter().filter(|n| !victims.contains(&n.id));
        live.filter_map(|n| n.health.as_ref()).map(field).sum()
    };
    let mut counted = None;
    wait_status(client, "the rebuilds in the nodes' counters", |status| {
        let done = sum(status, |h| h.repair_rebuilt_shards) + sum(status, |h| h.repair_copied_chunks);
        (done >= copies)
            .then(|| {
                counted = Some(Rebuilt {
                    shards: sum(status, |h| h.repair_rebuilt_shards),
                    copies: sum(status, |h| h.repair_copied_chunks),
                    written_bytes: sum(status, |h| h.repair_rebuilt_bytes),
                    read_bytes: sum(status, |h| h.repair_rebuild_read_bytes),
                    data_shards,
                })
            })
            .is_some()
    })
    .await?;
    let rebuilt = counted.context("no counters")?;
    println!(
        "rebuilt {} shards ({} MiB) reading {} MiB of other shards: {:.2} bytes read per byte rebuilt (K = {}); \
         {} small chunks copied",
        rebuilt.shards,
        mib(rebuilt.written_bytes),
        mib(rebuilt.read_bytes),
        rebuilt.read_per_byte(),
        data_shards,
        rebuilt.copies
    );
    Ok(rebuilt)
}

/// How long the demo's dashboard login links stay usable, and the sessions they open last.
const LOGIN_LINK_TTL: Duration = Duration::from_secs(3_600);
const LOGIN_SESSION_TTL: Duration = Duration::from_secs(12 * 3_600);

async fn wait_status(client: &Client, what: &str, mut done: impl FnMut(&StatusReply) -> bool) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(status) = client.status().await {
            if done(&status) {
                return Ok(());
            }
        }
        if started.elapsed() > DEADLINE {
            bail!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_status(cluster: &Cluster) {
    match blocking(|| cluster.run_cli(&["cluster", "status"])) {
        Ok(text) => print!("{text}"),
        Err(e) => println!("(status unavailable: {e:#})"),
    }
}

#[cfg(test)]
mod tests {
    use mendfs_client::NodeStatus;

    use super::*;

    fn ec(text: &str) -> Redundancy {
        text.parse().expect("a scheme")
    }

    #[test]
    fn a_scheme_starts_k_plus_2m_nodes_and_kills_m_and_replication_keeps_its_4_and_1() {
        let plan = Plan::new(ec("ec:4+2")).unwrap();
        assert_eq!((plan.nodes(), plan.victims, plan.width), (8, 2, 6));
        let plan = Plan::new(ec("ec:8+3")).unwrap();
        assert_eq!((plan.nodes(), plan.victims), (14, 3));
        let plan = Plan::new(Redundancy::Replicate).unwrap();
        assert_eq!((plan.nodes(), plan.victims), (4, 1));
        let refused = Plan::new(ec("ec:16+4")).err().expect("24 nodes refused").to_string();
        assert!(refused.contains("would need 24 nodes"), "{refused}");
    }

    #[test]
    fn chunks_of_64_kib_or_more_are_striped_smaller_ones_replicated_small_files_inline() {
        let sizes = [1000, 65_536, 65_535, CHUNK_BYTES + 123, CHUNK_BYTES * 5 / 2];
        let layout = Layout::of(&sizes, ec("ec:4+2").scheme(), 16_384);
        assert_eq!(layout, Layout { inline_files: 1, striped_files: 3, stripes: 5, replicated_chunks: 2 });
        assert_eq!(layout.records(6), 5 * 6 + 2 * 3);
        let replicated = Layout::of(&sizes, None, 16_384);
        assert_eq!(replicated, Layout { inline_files: 1, striped_files: 0, stripes: 0, replicated_chunks: 7 });
        // The default sample files are mostly striped: all but the inline quarter.
        let defaults = Layout::of(&file_sizes(24, 8 << 20), ec("ec:4+2").scheme(), 16_384);
        assert_eq!((defaults.striped_files, defaults.inline_files), (18, 6));
    }

    #[test]
    fn victims_hold_the_most_records_but_never_the_leader_nor_a_second_voter() {
        let node = |id: u64, chunks_listed: u64| NodeStatus { id, storage: true, chunks_listed, ..Default::default() };
        let status = StatusReply {
            nodes: vec![node(1, 90), node(2, 80), node(3, 70), node(4, 10), node(5, 20), node(6, 5)],
            ..Default::default()
        };
        assert_eq!(choose_victims(&status, 1, 1), [(2, 80)]);
        assert_eq!(choose_victims(&status, 1, 3), [(2, 80), (5, 20), (4, 10)]);
        assert_eq!(nodes_phrase(&[4]), "node 4");
        assert_eq!(nodes_phrase(&[6, 8]), "nodes 6 and 8");
        assert_eq!(nodes_phrase(&[5, 6, 8]), "nodes 5, 6 and 8");
    }
}
