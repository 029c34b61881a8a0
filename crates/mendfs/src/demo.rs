//! `mendfs demo`: a local 4-node cluster, filled with files, broken and healed in front of you.
//!
//! Starts real `mendfs server` processes on free 127.0.0.1 ports in a temporary directory
//! (three metadata voters, one storage-only node), writes sample files, SIGKILLs a node that
//! holds copies, shows the leader's failure detector mark it `suspect` then `down` (with phi),
//! shows repair re-create its copies from the survivors, verifies every file byte for byte,
//! restarts the node and shows it rejoin, and cleans up. Exit 0 only if every file verified.
//! Works without a terminal: progress bars become plain lines.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mendfs_client::{Client, ClientConfig, StatusReply};
use mendfs_testkit::{stamped_bytes, Cluster, ClusterOptions};

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
}

const CHUNK_BYTES: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(90);
/// Detector and repair settings shortened so the demo takes a minute, not several: heartbeats
/// every 500 ms, `down` 4 s after suspicion (the defaults are 1 s and 10 s). Repair is
/// throttled to 8 MiB/s so its progress can be watched: about 3 s for the default files.
const DEMO_SERVER_ARGS: &[&str] = &[
    "--chunk-size-bytes",
    "1048576",
    "--health-interval-ms",
    "500",
    "--acceptable-pause-ms",
    "1500",
    "--down-after-ms",
    "4000",
    "--repair-scan-interval-ms",
    "500",
    "--repair-bytes-per-sec",
    "8388608",
];

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

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    anyhow::ensure!(args.files >= 1, "--files must be at least 1");
    anyhow::ensure!((1..=1024).contains(&args.max_file_mib), "--max-file-mib must be within 1 ..= 1024");
    let binary = std::env::current_exe().context("locate the mendfs binary")?;
    let demo_started = Instant::now();

    step("Starting a local 4-node cluster: 3 metadata voters and 1 storage-only node");
    println!("(real `mendfs server` processes on 127.0.0.1; detector timings shortened for the demo)");
    // Every node serves S3 too (what `--keep` leaves running for an S3 client to try), and
    // HTTP: the dashboard to watch the demo in.
    let mut s3_args = std::collections::BTreeMap::new();
    let mut dashboard_addrs = std::collections::BTreeMap::new();
    for id in 1..=4u64 {
        let addr = format!("127.0.0.1:{}", mendfs_testkit::free_port()?);
        let http = format!("127.0.0.1:{}", mendfs_testkit::free_port()?);
        s3_args.insert(id, vec!["--s3".to_string(), addr, "--http".to_string(), http.clone()]);
        dashboard_addrs.insert(id, http);
    }
    let options = ClusterOptions {
        nodes: 3,
        keep_dir: args.keep,
        server_args: DEMO_SERVER_ARGS.iter().map(|s| s.to_string()).collect(),
        node_args: s3_args.iter().filter(|(id, _)| **id <= 3).map(|(id, a)| (*id, a.clone())).collect(),
        ..ClusterOptions::default()
    };
    let mut cluster = blocking(|| Cluster::start(&binary, options))?;
    println!("directory: {}", cluster.root().display());
    let leader = blocking(|| cluster.wait_for_leader(DEADLINE))?;
    blocking(|| cluster.add_storage_learner_with(4, &s3_args[&4]))?;
    println!("node {leader} was elected leader; node 4 joined as a storage-only learner");

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
    wait_status(&client, "all 4 nodes up and storing", |s| {
        s.nodes.iter().filter(|n| n.storage && n.state == "up").count() == 4
    })
    .await?;
    print_status(&cluster);

    let sizes = file_sizes(args.files, args.max_file_mib << 20);
    let total: u64 = sizes.iter().sum();
    step(&format!(
        "Writing {} sample files, {} MiB in all (1 MiB chunks, 3 copies of each; files up to 16 KiB kept inline in \
         the metadata)",
        sizes.len(),
        mib(total)
    ));
    let mut progress = Progress::new(total, "written");
    let mut written = 0u64;
    let started = Instant::now();
    for (i, size) in sizes.iter().enumerate() {
        let data = stamped_bytes(i as u32, 0, *size as usize);
        client
            .put_file(&format!("/demo/file-{i:03}"), std::io::Cursor::new(data), Some(*size), None, |_| {})
            .await
            .with_context(|| format!("writing /demo/file-{i:03}"))?;
        written += size;
        progress.set(written, total);
    }
    progress.finish();
    println!("{} files in {:.1?}", sizes.len(), started.elapsed());
    // The leader's counts come from its repair scan and the nodes' heartbeats, each some hundreds
    // of milliseconds behind: wait until both have seen every chunk, so the victim is chosen,
    // and its copies counted, on what the nodes really hold.
    // Files up to the inline limit are kept in the metadata, not as chunks on the nodes.
    let inline_max = mendfs_node::NodeConfig::default().inline_max_bytes as u64;
    let expected_chunks: u64 =
        sizes.iter().filter(|size| **size > inline_max).map(|size| size.div_ceil(CHUNK_BYTES)).sum();
    wait_status(&client, "the leader to count every chunk written", |status| {
        let storage = status.nodes.iter().filter(|n| n.storage);
        status.chunks == expected_chunks
            && storage.clone().map(|n| n.chunks_listed).sum::<u64>() == 3 * expected_chunks
            && storage.clone().all(|n| n.health.as_ref().is_some_and(|h| h.chunk_count == n.chunks_listed))
    })
    .await?;
    let status = client.status().await?;
    let leader = status.leader.context("no leader")?;
    // The victim: the node other than the leader that holds the most copies.
    let victim = status
        .nodes
        .iter()
        .filter(|n| n.storage && n.id != leader)
        .max_by_key(|n| n.chunks_listed)
        .map(|n| (n.id, n.chunks_listed))
        .context("no storage node to kill")?;
    let (victim, victim_chunks) = victim;
    print_status(&cluster);

    step(&format!("SIGKILL node {victim}: it holds {victim_chunks} chunk copies"));
    blocking(|| cluster.kill(victim))?;
    let killed_at = Instant::now();
    let mut last_state = "up".to_string();
    let mut suspect_after = None;
    let mut down_after = None;
    while down_after.is_none() {
        if killed_at.elapsed() > DEADLINE {
            bail!("node {victim} was not declared down within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(status) = client.status().await else { continue };
        let (state, phi) = node_state(&status, victim);
        if state != last_state && !state.is_empty() {
            let at = killed_at.elapsed();
            println!("{:>6.1}s  node {victim}: {last_state} -> {state} (phi {phi:.1})", at.as_secs_f64());
            if state == "suspect" && suspect_after.is_none() {
                suspect_after = Some(at);
            }
            if state == "down" {
                suspect_after.get_or_insert(at);
                down_after = Some(at);
            }
            last_state = state;
        }
    }
    let down_after = down_after.unwrap_or_default();

    step(&format!("Repairing: the leader re-creates node {victim}'s copies from the survivors (throttled to 8 MiB/s)"));
    let down_at = Instant::now();
    // Created once the leader reports the job, so the bar starts at its real total.
    let mut repair_progress: Option<Progress> = None;
    let mut repaired_bytes = 0u64;
    let mut repaired_copies = 0u64;
    loop {
        if down_at.elapsed() > DEADLINE {
            bail!("repair did not finish within {DEADLINE:?}");
        }
        let Ok(status) = client.status().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if let Some(repair) = &status.repair {
            repaired_bytes = repair.done_bytes;
            repaired_copies = repair.done_copies;
            repair_progress
                .get_or_insert_with(|| Progress::new(repair.total_bytes, "repaired"))
                .set(repair.done_bytes, repair.total_bytes);
        }
        let finished = status.repair.as_ref().is_some_and(|r| r.finished_unix_ms.is_some());
        if finished && status.under_replicated_chunks == 0 && status.chunks > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(progress) = repair_progress {
        progress.finish();
    }
    let healed_after = down_at.elapsed();
    println!(
        "full redundancy again {healed_after:.1?} after `down`: {repaired_copies} copies, {} MiB",
        mib(repaired_bytes)
    );
    print_status(&cluster);

    step(&format!("Verifying every file byte for byte (node {victim} is still dead)"));
    let mut verified = 0usize;
    let mut wrong = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let path = format!("/demo/file-{i:03}");
        let mut got = Vec::with_capacity(*size as usize);
        match client.get_file(&path, &mut got, |_, _| {}).await {
            Ok(_) if got == stamped_bytes(i as u32, 0, *size as usize) => verified += 1,
            Ok(_) => wrong.push(format!("{path}: content differs")),
            Err(e) => wrong.push(format!("{path}: {e}")),
        }
    }
    println!("{verified} of {} files read back identical", sizes.len());

    step(&format!("Restarting node {victim}: it replays its log and rejoins"));
    blocking(|| cluster.restart(victim))?;
    let restarted_at = Instant::now();
    wait_status(&client, &format!("node {victim} up again"), |s| node_state(s, victim).0 == "up").await?;
    println!(
        "node {victim} is up again after {:.1?}; its copies that are now surplus are trimmed later",
        restarted_at.elapsed()
    );
    print_status(&cluster);

    step("Summary");
    println!("files verified:     {verified} of {} ({} MiB)", sizes.len(), mib(total));
    println!(
        "time to detect:     suspect {:.1}s, down {:.1}s after SIGKILL",
        suspect_after.unwrap_or_default().as_secs_f64(),
        down_after.as_secs_f64()
    );
    println!("time to heal:       {:.1}s from down to full redundancy", healed_after.as_secs_f64());
    println!("bytes repaired:     {} MiB in {repaired_copies} chunk copies", mib(repaired_bytes));
    println!("{:<20}{:.1}s after restart", format!("node {victim} rejoined:"), restarted_at.elapsed().as_secs_f64());
    println!("demo took:          {:.1}s", demo_started.elapsed().as_secs_f64());
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

/// How long the demo's dashboard login links stay usable, and the sessions they open last.
const LOGIN_LINK_TTL: Duration = Duration::from_secs(3_600);
const LOGIN_SESSION_TTL: Duration = Duration::from_secs(12 * 3_600);

async fn wait_status(client: &Client, what: &str, done: impl Fn(&StatusReply) -> bool) -> Result<()> {
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
