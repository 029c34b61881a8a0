//! `mendfs bench ec-cluster`: erasure coding against replication on one cluster of real
//! processes, in one run.
//!
//! For each redundancy in turn, on the same nodes: a put row and a get row with concurrent
//! clients, the bytes those files added to the nodes' chunk stores, a short get row with
//! storage nodes SIGKILLed (restarted before they are declared down), then a SIGKILL of the
//! same nodes and the repair back to full redundancy: its time from `down`, its write rate, and the
//! bytes the repairing nodes read from others per byte they wrote (1 for a copy, K for a
//! rebuilt shard). Between two redundancies the killed nodes come back and the files are
//! deleted and collected, so every redundancy starts from the same empty cluster, and a repair
//! restores only the files of the redundancy it is measured for.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use mendfs_client::{Client, StatusReply};
use mendfs_node::Redundancy;
use mendfs_testkit::{Cluster, ClusterOptions};

use super::report::{NodeMemory, RedundancyFigures, Report, Row};
use super::{blocking, disk_fsync_rate, mb, ms, peak_rss_kib, run_load, token_client, wait_writable, UniqueReader};
use super::{EcClusterArgs, LoadResult};

/// Nodes 1 to 3 vote on the metadata; the rest are storage-only learners, and only those are
/// killed, so the metadata keeps its quorum and its leader.
const VOTERS: u64 = 3;
/// Copies of a replicated chunk: the servers' default replication factor.
const REPLICAS: u64 = 3;
const NODES_MAX: u64 = 32;
const CLIENTS_MAX: usize = 64;
/// A put row's file names carry the redundancy's index in 4 bits.
const REDUNDANCIES_MAX: usize = 16;
/// Files of at least 64 KiB, so that every chunk is striped under `ec:K+M`.
const FILE_BYTES_MIN: u64 = 64 << 10;
const FILE_BYTES_MAX: u64 = 64 << 20;
/// A put row's bytes at most: with 64 KiB files, 2^20 files, what a name's 20 bits number.
const ROW_MIB_MAX: u64 = 65_536;
/// How long a cluster may take to reach a state the bench waits for (all nodes up, a repair
/// finished, garbage collected).
const SETTLE_DEADLINE: Duration = Duration::from_secs(180);
const REPAIR_DEADLINE: Duration = Duration::from_secs(1_800);
const POLL_EVERY: Duration = Duration::from_millis(100);
/// The degraded get row runs while the killed nodes are still only suspected: well within the
/// 6 s or so the shortened detector takes to declare them `down`, so that no repair starts.
const DEGRADED_ROW_MAX: Duration = Duration::from_secs(3);

/// Settings every node gets beyond the demo's quick detection (`down` 4 s after suspicion,
/// repair scans every 500 ms): the repair figures run from `down`, and the wait for it is no
/// measurement. Collection is quick (a 10 s grace, a pass a second) so that one redundancy's
/// deleted files are gone before the next is measured; 10 s is still far longer than any put
/// here takes between its prepares and its commit, which is what the grace protects.
const SERVER_ARGS: &[&str] = &["--orphan-grace-ms", "10000", "--gc-interval-ms", "1000"];

/// Nodes one chunk spans: its copies, or its stripe's shards.
fn width(redundancy: Redundancy) -> u64 {
    match redundancy {
        Redundancy::Replicate => REPLICAS,
        Redundancy::Erasure(scheme) => scheme.total_shards() as u64,
    }
}

/// Nodes a chunk may lose and still be read.
fn losses_survived(redundancy: Redundancy) -> u64 {
    match redundancy {
        Redundancy::Replicate => REPLICAS - 1,
        Redundancy::Erasure(scheme) => scheme.parity_shards() as u64,
    }
}

/// Checks the options before any process starts: every redundancy must survive the kill, and
/// leave enough live nodes to restore each chunk to full width on distinct nodes.
fn parse_and_check(args: &EcClusterArgs) -> Result<Vec<Redundancy>> {
    let redundancies: Vec<Redundancy> = args
        .redundancies
        .iter()
        .map(|text| text.parse().map_err(|e| anyhow!("--redundancies {text:?}: {e}")))
        .collect::<Result<_>>()?;
    anyhow::ensure!(
        (1..=REDUNDANCIES_MAX).contains(&redundancies.len()),
        "--redundancies takes 1 to {REDUNDANCIES_MAX}"
    );
    anyhow::ensure!((1..=CLIENTS_MAX).contains(&args.clients), "--clients must be within 1 ..= {CLIENTS_MAX}");
    anyhow::ensure!(
        (FILE_BYTES_MIN..=FILE_BYTES_MAX).contains(&args.size),
        "--size must be within {FILE_BYTES_MIN} ..= {FILE_BYTES_MAX} bytes"
    );
    anyhow::ensure!(args.seconds > 0.0 && args.seconds <= 3_600.0, "--seconds must be within (0, 3600]");
    anyhow::ensure!((1..=ROW_MIB_MAX).contains(&args.mib), "--mib must be within 1 ..= {ROW_MIB_MAX}");
    anyhow::ensure!(args.nodes <= NODES_MAX, "--nodes must be at most {NODES_MAX}");
    let learners = args.nodes.saturating_sub(VOTERS);
    anyhow::ensure!(
        args.kill >= 1 && args.kill <= learners,
        "--kill must be within 1 ..= {learners}: only the storage-only nodes (all but the 3 voters) are killed"
    );
    for &redundancy in &redundancies {
        anyhow::ensure!(
            args.kill <= losses_survived(redundancy),
            "{redundancy} survives {} lost nodes, not --kill {}",
            losses_survived(redundancy),
            args.kill
        );
        let needed = width(redundancy) + args.kill;
        anyhow::ensure!(
            args.nodes >= needed,
            "{redundancy} with --kill {} needs --nodes {needed}: after the kill, every chunk must again fit on {} \
             distinct live nodes",
            args.kill,
            width(redundancy)
        );
    }
    Ok(redundancies)
}

/// What one repair took, from the leader's status and the live nodes' counters.
struct RepairMeasured {
    kill_to_down: Duration,
    down_to_full: Duration,
    counters: RepairCounters,
}

/// The live nodes' repair counters (sent with their heartbeats, counted since each started).
#[derive(Debug, Default, Clone, Copy)]
struct RepairCounters {
    copied_chunks: u64,
    copied_bytes: u64,
    rebuilt_shards: u64,
    rebuilt_bytes: u64,
    rebuild_read_bytes: u64,
}

impl RepairCounters {
    fn of(status: &StatusReply, nodes: &[u64]) -> Self {
        let mut sum = RepairCounters::default();
        let health = status.nodes.iter().filter(|n| nodes.contains(&n.id)).filter_map(|n| n.health.as_ref());
        for h in health {
            sum.copied_chunks += h.repair_copied_chunks;
            sum.copied_bytes += h.repair_copied_bytes;
            sum.rebuilt_shards += h.repair_rebuilt_shards;
            sum.rebuilt_bytes += h.repair_rebuilt_bytes;
            sum.rebuild_read_bytes += h.repair_rebuild_read_bytes;
        }
        sum
    }

    fn since(self, before: RepairCounters) -> Self {
        RepairCounters {
            copied_chunks: self.copied_chunks.saturating_sub(before.copied_chunks),
            copied_bytes: self.copied_bytes.saturating_sub(before.copied_bytes),
            rebuilt_shards: self.rebuilt_shards.saturating_sub(before.rebuilt_shards),
            rebuilt_bytes: self.rebuilt_bytes.saturating_sub(before.rebuilt_bytes),
            rebuild_read_bytes: self.rebuild_read_bytes.saturating_sub(before.rebuild_read_bytes),
        }
    }

    fn repairs(&self) -> u64 {
        self.copied_chunks + self.rebuilt_shards
    }

    fn written_bytes(&self) -> u64 {
        self.copied_bytes + self.rebuilt_bytes
    }

    /// A copy reads the bytes it writes, from one other node; a rebuild reads K shards.
    fn read_bytes(&self) -> u64 {
        self.copied_bytes + self.rebuild_read_bytes
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64)
}

fn stripes_whole(status: &StatusReply) -> bool {
    status.stripes.iter().all(|c| c.live_shards == c.total_shards)
}

fn all_up(status: &StatusReply, nodes: u64) -> bool {
    (1..=nodes).all(|id| status.nodes.iter().any(|n| n.id == id && n.storage && n.state == "up"))
}

/// Polls the leader's status until `check` holds; returns that status.
async fn wait_until(
    client: &Client,
    what: &str,
    deadline: Duration,
    check: impl Fn(&StatusReply) -> bool,
) -> Result<StatusReply> {
    let started = Instant::now();
    loop {
        let last = match client.status().await {
            Ok(status) if check(&status) => return Ok(status),
            Ok(status) => nodes_summary(&status),
            Err(e) => format!("no status: {e}"),
        };
        anyhow::ensure!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}; last: {last}");
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// "1 up storage, 2 suspect, ...; 3 under-replicated; repair running": what a wait saw last.
fn nodes_summary(status: &StatusReply) -> String {
    let nodes: Vec<String> = status
        .nodes
        .iter()
        .map(|n| format!("{} {}{}", n.id, n.state, if n.storage { " storage" } else { "" }))
        .collect();
    let repair = status.repair.as_ref().map_or("no repair", |job| {
        if job.finished_unix_ms.is_some() {
            "repair finished"
        } else {
            "repair running"
        }
    });
    format!("nodes {}; {} under-replicated; {repair}", nodes.join(", "), status.under_replicated_chunks)
}

fn disk_bytes(cluster: &Cluster) -> u64 {
    cluster.nodes.values().map(|node| mendfs_testkit::chunk_bytes(&node.data_dir)).sum()
}

/// Keeps each node's highest VmHWM seen: a killed node's process is gone after its kill, and a
/// restarted one starts counting again.
fn sample_peak_rss(cluster: &Cluster, peaks_kib: &mut BTreeMap<u64, u64>) {
    for (id, node) in &cluster.nodes {
        if let Some(rss) = node.pid().and_then(peak_rss_kib) {
            let peak = peaks_kib.entry(*id).or_default();
            *peak = (*peak).max(rss);
        }
    }
}

/// A row of the put and get table.
fn row_line(row: &Row) -> String {
    format!(
        "{:>10} {:>12} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7}",
        row.redundancy.as_deref().unwrap_or("-"),
        row.op,
        row.ops,
        row.ops_per_sec,
        row.mb_per_sec.unwrap_or(f64::NAN),
        ms(row.p50_ms),
        ms(row.p99_ms),
        row.errors
    )
}

pub(super) async fn bench_ec_cluster(report: &mut Report, args: &EcClusterArgs) -> Result<()> {
    let redundancies = parse_and_check(args)?;
    let binary = std::env::current_exe().context("locate the mendfs binary")?;
    let mut server_args: Vec<String> =
        crate::demo::QUICK_HEALING_ARGS.iter().chain(SERVER_ARGS).map(|s| s.to_string()).collect();
    server_args.extend(["--repair-bytes-per-sec".to_string(), args.repair_bytes_per_sec.to_string()]);
    // Last, so that a `--server-arg` overrides the bench's own settings.
    server_args.extend(args.settings.server_args.iter().cloned());
    let options = ClusterOptions { nodes: VOTERS as usize, server_args, ..ClusterOptions::default() };
    let mut cluster = blocking(|| Cluster::start(&binary, options))?;
    blocking(|| cluster.wait_for_leader(Duration::from_secs(60)))?;
    for id in VOTERS + 1..=args.nodes {
        blocking(|| cluster.add_storage_learner(id))?;
    }
    let client = token_client(&cluster).await?;
    wait_until(&client, "every node up and storing", SETTLE_DEADLINE, |s| all_up(s, args.nodes)).await?;
    wait_writable(&client).await?;
    let disk = blocking(|| disk_fsync_rate(cluster.root()))?;
    report.references.disk_fsync_mb_per_sec = Some(mb(disk));
    let repair_rate = match args.repair_bytes_per_sec {
        0 => "unthrottled".to_string(),
        rate => format!("throttled to {:.0} MB/s", mb(rate as f64)),
    };
    report.say(format!(
        "cluster: {} nodes on 127.0.0.1 ({VOTERS} metadata voters, {} storage-only), one disk (fsynced write {:.0} \
         MB/s), every chunk fsynced; {} clients, {}-byte files, rows of {} s or {} MiB; repair {repair_rate}; \
         detector shortened (down 4 s after suspicion), repair timed from `down`",
        args.nodes,
        args.nodes - VOTERS,
        mb(disk),
        args.clients,
        args.size,
        args.seconds,
        args.mib
    ));
    // The highest-numbered storage-only nodes: the same victims for every redundancy.
    let victims: Vec<u64> = (args.nodes + 1 - args.kill..=args.nodes).collect();
    let survivors: Vec<u64> = (1..=args.nodes).filter(|id| !victims.contains(id)).collect();
    let mut peaks_kib = BTreeMap::new();
    let mut measured = Vec::new();
    for (idx, &redundancy) in redundancies.iter().enumerate() {
        let name = redundancy.to_string();
        report.say(format!(
            "\n{name}: {} rows, then SIGKILL of nodes {victims:?} and repair",
            if redundancy == Redundancy::Replicate { "3 copies" } else { "striped" }
        ));
        report.say(format!(
            "{:>10} {:>12} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7}",
            "redundancy", "op", "files", "ops/s", "MB/s", "p50 ms", "p99 ms", "errors"
        ));
        let disk_before = disk_bytes(&cluster);
        let (load, paths) = put_files(&client, idx, redundancy, args).await?;
        let put = report.add_row(
            Row::measured("mendfs", "put", Some(args.size), args.clients, &load).with_redundancy(&name),
            row_line,
        );
        anyhow::ensure!(!paths.is_empty(), "{name}: no put succeeded");
        // Every put acknowledged has its copies or shards fsynced: the stores hold them all.
        let file_bytes = paths.len() as u64 * args.size;
        let added = disk_bytes(&cluster).saturating_sub(disk_before);
        let seconds = Duration::from_secs_f64(args.seconds);
        let load = get_files(&client, &paths, args, seconds).await?;
        let get = report.add_row(
            Row::measured("mendfs", "get", Some(args.size), args.clients, &load).with_redundancy(&name),
            row_line,
        );
        sample_peak_rss(&cluster, &mut peaks_kib);
        let load = degraded_get_files(&client, &mut cluster, &victims, &paths, args).await?;
        let degraded = report.add_row(
            Row::measured("mendfs", "get-degraded", Some(args.size), args.clients, &load).with_redundancy(&name),
            row_line,
        );
        let repair = measure_repair(&client, &mut cluster, &victims, &survivors).await?;
        sample_peak_rss(&cluster, &mut peaks_kib);
        let counters = repair.counters;
        let seconds = repair.down_to_full.as_secs_f64();
        let figures = RedundancyFigures {
            redundancy: name.clone(),
            files: paths.len() as u64,
            file_bytes,
            disk_bytes: added,
            disk_bytes_per_file_byte: added as f64 / file_bytes as f64,
            killed_nodes: victims.clone(),
            kill_to_down_s: repair.kill_to_down.as_secs_f64(),
            down_to_full_redundancy_s: seconds,
            copied_chunks: counters.copied_chunks,
            rebuilt_shards: counters.rebuilt_shards,
            repaired_bytes: counters.written_bytes(),
            repair_read_bytes: counters.read_bytes(),
            repair_mb_per_sec: mb(counters.written_bytes() as f64 / seconds.max(f64::MIN_POSITIVE)),
            read_bytes_per_repaired_byte: counters.read_bytes() as f64 / counters.written_bytes().max(1) as f64,
        };
        report.say(format!(
            "{name}: {} files, {:.0} MiB; {:.0} MiB added on disk = {:.3} bytes per file byte",
            figures.files,
            file_bytes as f64 / (1 << 20) as f64,
            added as f64 / (1 << 20) as f64,
            figures.disk_bytes_per_file_byte
        ));
        report.say(format!(
            "{name}: SIGKILL -> down {:.1} s; down -> full redundancy {:.1} s: {} copies + {} shards rebuilt, {:.0} MiB \
             written at {:.0} MB/s, {:.0} MiB read from other nodes = {:.2} bytes read per byte repaired",
            figures.kill_to_down_s,
            seconds,
            figures.copied_chunks,
            figures.rebuilt_shards,
            figures.repaired_bytes as f64 / (1 << 20) as f64,
            figures.repair_mb_per_sec,
            figures.repair_read_bytes as f64 / (1 << 20) as f64,
            figures.read_bytes_per_repaired_byte
        ));
        measured.push([put, get, degraded]);
        report.redundancies.push(figures);
        if idx + 1 < redundancies.len() {
            reset(&client, &mut cluster, &victims, &paths, args.nodes).await?;
        }
    }
    sample_peak_rss(&cluster, &mut peaks_kib);
    for (id, rss) in peaks_kib {
        let node = NodeMemory {
            system: "mendfs".to_string(),
            node: id.to_string(),
            tls: false,
            peak_rss_mib: rss as f64 / 1024.0,
        };
        report.say(format!("node {id}: peak RSS {:.1} MiB (highest over the run and its restarts)", node.peak_rss_mib));
        report.nodes.push(node);
    }
    compare(report, &measured);
    Ok(())
}

/// `clients` tasks putting `args.size`-byte files of unique content under unique names, until
/// `args.seconds` pass or `args.mib` are written: the load, and the files that were stored.
async fn put_files(
    client: &Client,
    redundancy_idx: usize,
    redundancy: Redundancy,
    args: &EcClusterArgs,
) -> Result<(LoadResult, Vec<String>)> {
    let stored = Arc::new(Mutex::new(Vec::new()));
    let (client, size, text) = (client.clone(), args.size, redundancy.to_string());
    let ops_max = ((args.mib << 20) / size).max(args.clients as u64);
    let stored_by_tasks = stored.clone();
    let load = run_load(args.clients, Duration::from_secs_f64(args.seconds), ops_max, move |task_idx, op_idx| {
        let (client, stored, text) = (client.clone(), stored_by_tasks.clone(), text.clone());
        async move {
            let path = format!("/bench/ec-cluster/{redundancy_idx}/{task_idx}/{op_idx}");
            // 4 bits of redundancy, 8 of task, 20 of operation: no two files share content.
            let file = ((redundancy_idx as u32) << 28) | ((task_idx as u32) << 20) | (op_idx as u32 & 0xf_ffff);
            let reader = UniqueReader { file, position: 0, remaining: size };
            let stored_ok = client.put_file_with(&path, reader, Some(size), None, &text, |_| {}).await.is_ok();
            if stored_ok {
                stored.lock().map_err(|_| anyhow!("a put task panicked"))?.push(path);
            }
            Ok(stored_ok)
        }
    })
    .await?;
    let paths = std::mem::take(&mut *stored.lock().map_err(|_| anyhow!("a put task panicked"))?);
    Ok((load, paths))
}

/// `clients` tasks getting the stored files round-robin, until `duration` passes or as many
/// bytes as a put row's bound are read.
async fn get_files(client: &Client, paths: &[String], args: &EcClusterArgs, duration: Duration) -> Result<LoadResult> {
    let (client, paths, clients) = (client.clone(), Arc::new(paths.to_vec()), args.clients);
    let ops_max = ((args.mib << 20) / args.size).max(clients as u64);
    run_load(clients, duration, ops_max, move |task_idx, op_idx| {
        let (client, paths) = (client.clone(), paths.clone());
        async move {
            let path = &paths[(task_idx + op_idx as usize * clients) % paths.len()];
            Ok(client.get_file(path, &mut tokio::io::sink(), |_, _| {}).await.is_ok())
        }
    })
    .await
}

/// The get row again with `victims` SIGKILLed: a replicated chunk is read from a surviving
/// copy, a stripe that lost data shards is decoded from parity. The victims come back before
/// the detector declares them down, so nothing is repaired, and the cluster is whole again for
/// the repair measurement.
async fn degraded_get_files(
    client: &Client,
    cluster: &mut Cluster,
    victims: &[u64],
    paths: &[String],
    args: &EcClusterArgs,
) -> Result<LoadResult> {
    for id in victims {
        blocking(|| cluster.kill(*id))?;
    }
    let load = get_files(client, paths, args, DEGRADED_ROW_MAX.min(Duration::from_secs_f64(args.seconds))).await;
    // Back before the load's outcome is looked at: a failed row must not leave nodes dead.
    for id in victims {
        blocking(|| cluster.restart(*id))?;
    }
    wait_until(client, "the killed nodes up again", SETTLE_DEADLINE, |s| all_up(s, args.nodes)).await?;
    load
}

/// SIGKILLs `victims` at once and follows the leader's status to full redundancy: every victim
/// `down`, a repair job started after the kill and finished, no chunk short of copies or
/// shards, none lost, and nothing listed on the victims any more.
async fn measure_repair(
    client: &Client,
    cluster: &mut Cluster,
    victims: &[u64],
    survivors: &[u64],
) -> Result<RepairMeasured> {
    // A repair still running (a trim after the last restart) would be extended, not started
    // anew, and blur this one's start.
    let settled = wait_until(client, "a healthy cluster with no repair running", SETTLE_DEADLINE, |s| {
        s.repair.as_ref().is_none_or(|job| job.finished_unix_ms.is_some())
            && s.under_replicated_chunks == 0
            && stripes_whole(s)
    })
    .await?;
    let before = RepairCounters::of(&settled, survivors);
    let killed_unix_ms = unix_ms();
    for id in victims {
        blocking(|| cluster.kill(*id))?;
    }
    let killed = Instant::now();
    let mut down_after = None;
    let full = loop {
        anyhow::ensure!(
            killed.elapsed() < REPAIR_DEADLINE,
            "no full redundancy within {REPAIR_DEADLINE:?} of the kill"
        );
        let Ok(status) = client.status().await else { continue };
        let down = victims.iter().all(|id| status.nodes.iter().any(|n| n.id == *id && n.state == "down"));
        if down && down_after.is_none() {
            down_after = Some(killed.elapsed());
        }
        let job_done = status
            .repair
            .as_ref()
            .is_some_and(|job| job.started_unix_ms >= killed_unix_ms && job.finished_unix_ms.is_some());
        let unlisted = victims.iter().all(|id| status.nodes.iter().any(|n| n.id == *id && n.chunks_listed == 0));
        if down_after.is_some()
            && job_done
            && unlisted
            && status.under_replicated_chunks == 0
            && status.lost_chunks == 0
            && stripes_whole(&status)
        {
            break status;
        }
        tokio::time::sleep(POLL_EVERY).await;
    };
    let full_after = killed.elapsed();
    let kill_to_down = down_after.unwrap_or_default();
    let job_repairs = full.repair.as_ref().map_or(0, |job| job.done_copies);
    // The counters ride on heartbeats, up to one interval behind the job's record.
    let counted = wait_until(client, "the repairs in the live nodes' counters", SETTLE_DEADLINE, |s| {
        RepairCounters::of(s, survivors).since(before).repairs() >= job_repairs
    })
    .await?;
    Ok(RepairMeasured {
        kill_to_down,
        down_to_full: full_after.saturating_sub(kill_to_down),
        counters: RepairCounters::of(&counted, survivors).since(before),
    })
}

/// Brings the victims back and removes this redundancy's files, then waits until the chunk
/// stores are empty: the next redundancy's disk figure counts only its own files, and its
/// repair restores only them.
async fn reset(client: &Client, cluster: &mut Cluster, victims: &[u64], paths: &[String], nodes: u64) -> Result<()> {
    for id in victims {
        blocking(|| cluster.restart(*id))?;
    }
    wait_until(client, "the killed nodes up again", SETTLE_DEADLINE, |s| all_up(s, nodes)).await?;
    for path in paths {
        client.delete_file(path, None).await.with_context(|| format!("delete {path}"))?;
    }
    let started = Instant::now();
    loop {
        let left = disk_bytes(cluster);
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < SETTLE_DEADLINE,
            "{left} bytes of deleted files still on disk after {SETTLE_DEADLINE:?}: the next redundancy's disk figure \
             would count them"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The figures side by side, each redundancy against the first (`replicate` by default).
/// `measured`: each redundancy's put, get and degraded get rows (indices in `report.rows`).
fn compare(report: &mut Report, measured: &[[usize; 3]]) {
    let figures = report.redundancies.clone();
    let Some(first) = figures.first() else { return };
    for later in &measured[1..] {
        for (&row, &base) in later.iter().zip(&measured[0]) {
            if let (Some(mb), Some(base)) = (report.rows[row].mb_per_sec, report.rows[base].mb_per_sec) {
                report.rows[row].ratios.insert("over_first_redundancy", mb / base);
            }
        }
    }
    let mut header = format!("\n{:<38}", "");
    for f in &figures {
        header += &format!(" {:>14}", f.redundancy);
    }
    for f in &figures[1..] {
        header += &format!(" {:>18}", format!("{} / {}", f.redundancy, first.redundancy));
    }
    report.say(header);
    let row_value = |idx: usize, pick: fn(&Row) -> Option<f64>| pick(&report.rows[idx]).unwrap_or(f64::NAN);
    let lines: Vec<(&str, Vec<f64>)> = vec![
        ("put MB/s", measured.iter().map(|m| row_value(m[0], |r| r.mb_per_sec)).collect()),
        ("put p50 ms", measured.iter().map(|m| row_value(m[0], |r| r.p50_ms)).collect()),
        ("put p99 ms", measured.iter().map(|m| row_value(m[0], |r| r.p99_ms)).collect()),
        ("get MB/s", measured.iter().map(|m| row_value(m[1], |r| r.mb_per_sec)).collect()),
        ("get p50 ms", measured.iter().map(|m| row_value(m[1], |r| r.p50_ms)).collect()),
        ("get p99 ms", measured.iter().map(|m| row_value(m[1], |r| r.p99_ms)).collect()),
        ("get MB/s, killed nodes dead", measured.iter().map(|m| row_value(m[2], |r| r.mb_per_sec)).collect()),
        ("get p99 ms, killed nodes dead", measured.iter().map(|m| row_value(m[2], |r| r.p99_ms)).collect()),
        ("disk bytes per file byte", figures.iter().map(|f| f.disk_bytes_per_file_byte).collect()),
        ("SIGKILL -> down s", figures.iter().map(|f| f.kill_to_down_s).collect()),
        ("down -> full redundancy s", figures.iter().map(|f| f.down_to_full_redundancy_s).collect()),
        ("repaired MiB (written)", figures.iter().map(|f| f.repaired_bytes as f64 / (1 << 20) as f64).collect()),
        ("repair MB/s (written)", figures.iter().map(|f| f.repair_mb_per_sec).collect()),
        ("bytes read per byte repaired", figures.iter().map(|f| f.read_bytes_per_repaired_byte).collect()),
    ];
    for (label, values) in lines {
        let mut line = format!("{label:<38}");
        for value in &values {
            line += &format!(" {value:>14.2}");
        }
        for value in &values[1..] {
            line += &format!(" {:>18.2}", value / values[0]);
        }
        report.say(line);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args(extra: &[&str]) -> EcClusterArgs {
        let mut line = vec!["mendfs", "bench", "ec-cluster"];
        line.extend(extra);
        match crate::cli::Cli::try_parse_from(line).expect("the command line parses").command {
            crate::cli::Command::Bench { command: crate::bench::BenchCommand::EcCluster(args) } => args,
            other => panic!("not bench ec-cluster: {other:?}"),
        }
    }

    fn refusal(extra: &[&str]) -> String {
        match parse_and_check(&args(extra)) {
            Ok(redundancies) => panic!("{extra:?} accepted: {redundancies:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_defaults_compare_replication_with_ec_4_2_on_enough_nodes_to_rebuild() {
        let redundancies = parse_and_check(&args(&[])).unwrap();
        assert_eq!(redundancies.iter().map(ToString::to_string).collect::<Vec<_>>(), ["replicate", "ec:4+2"]);
    }

    #[test]
    fn options_that_would_lose_data_or_leave_no_room_to_rebuild_are_refused_before_any_process_starts() {
        let too_few = refusal(&["--nodes", "7"]);
        assert!(too_few.contains("ec:4+2 with --kill 2 needs --nodes 8"), "{too_few}");
        let lossy = refusal(&["--redundancies", "ec:4+1", "--kill", "2"]);
        assert!(lossy.contains("ec:4+1 survives 1 lost nodes, not --kill 2"), "{lossy}");
        let copies = refusal(&["--redundancies", "replicate", "--kill", "3"]);
        assert!(copies.contains("replicate survives 2"), "{copies}");
        assert!(refusal(&["--redundancies", "ec:4+0"]).contains("\"ec:4+0\""));
        assert!(refusal(&["--size", "1000"]).contains("--size"));
        assert!(refusal(&["--clients", "0"]).contains("--clients"));
        assert!(refusal(&["--kill", "6"]).contains("--kill must be within 1 ..= 5"));
        assert!(refusal(&["--seconds", "0"]).contains("--seconds"));
    }
}
