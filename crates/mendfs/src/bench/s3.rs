//! `mendfs bench s3`: object PUT and GET through the S3 gateway against file put and get
//! through the MendFS client on the same cluster, in the same run.
//!
//! The S3 side sends what an S3 SDK sends (`mendfs_chaos::s3_client`): SigV4-signed (`UNSIGNED-PAYLOAD`) HTTP/1.1
//! requests, one in flight on each keep-alive connection, the connections spread over the
//! nodes' gateways. Every answer's status is checked: anything but 2xx ends the bench with the
//! gateway's error body.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use mendfs_chaos::s3_client::{Connection, Signer};
use mendfs_testkit::{Cluster, ClusterOptions};
use tokio::sync::Mutex;

use super::report::{Report, Row};
use super::{
    blocking, measure_file_references, ms, native_files_row, record_peak_rss, row_ops_max, run_load, token_client,
    wait_writable, FileOp, LoadResult,
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
    run_load(connections, duration, row_ops_max(size, connections), move |task_idx, op_idx| {
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

/// A row of the S3 tables: `path` is the row's system (native, s3; seaweedfs, seaweedfs-fsync).
fn s3_line(row: &Row, ratio_name: &str) -> String {
    format!(
        "{:>4} {:>10} {:>7} {:>6} {:>10.1} {:>9.1} {:>9.2} {:>9.2} {:>7} {:>10}",
        row.op,
        row.size_bytes.unwrap_or_default(),
        row.system,
        row.clients.unwrap_or_default(),
        row.ops_per_sec,
        row.mb_per_sec.unwrap_or(f64::NAN),
        ms(row.p50_ms),
        ms(row.p99_ms),
        row.errors,
        row.ratios.get(ratio_name).map_or(String::new(), |r| format!("{r:.2}"))
    )
}

/// MendFS's S3 row (its index in `report.rows`) of each op and size, in the order run.
type S3Rows = Vec<(FileOp, u64, usize)>;

pub(super) async fn bench_s3(report: &mut Report, sizes: &[u64], connections: usize, duration: Duration) -> Result<()> {
    anyhow::ensure!(connections >= 1, "--connections must be at least 1");
    anyhow::ensure!(sizes.iter().all(|s| (1..=1 << 30).contains(s)), "--sizes must be between 1 byte and 1 GiB");
    bench_mendfs_s3(report, sizes, connections, duration).await?;
    Ok(())
}

/// MendFS's rows, native and S3, on a cluster that is gone when this returns.
async fn bench_mendfs_s3(report: &mut Report, sizes: &[u64], connections: usize, duration: Duration) -> Result<S3Rows> {
    let binary = std::env::current_exe().context("locate the mendfs binary")?;
    let mut node_args = BTreeMap::new();
    let mut gateways = Vec::new();
    for id in 1..=3u64 {
        let addr = format!("127.0.0.1:{}", mendfs_testkit::free_port()?);
        node_args.insert(id, vec!["--s3".to_string(), addr.clone()]);
        gateways.push(addr);
    }
    let options = ClusterOptions { nodes: 3, node_args, ..ClusterOptions::default() };
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
        "{:>4} {:>10} {:>7} {:>6} {:>10} {:>9} {:>9} {:>9} {:>7} {:>10}",
        "op", "size", "path", "conns", "ops/s", "MB/s", "p50 ms", "p99 ms", "errors", "s3/native"
    ));
    let mut s3_rows = Vec::new();
    for &size in sizes {
        for op in [FileOp::Put, FileOp::Get] {
            let native = native_files_row(&client, op, size, connections, duration).await?;
            let native = report.add_row(Row::measured("native", op.name(), Some(size), connections, &native), |row| {
                s3_line(row, "s3_over_native")
            });
            let s3 = s3_row(&signer, &gateways, BUCKET, op, size, connections, duration).await?;
            let mut s3 = Row::measured("s3", op.name(), Some(size), connections, &s3);
            s3.ratios.insert("s3_over_native", s3.ops_per_sec / report.rows[native].ops_per_sec);
            s3_rows.push((op, size, report.add_row(s3, |row| s3_line(row, "s3_over_native"))));
        }
    }
    for &(op, size, s3) in &s3_rows {
        let ratio = report.rows[s3].ratios["s3_over_native"];
        report.say(format!("{} {size} B x {connections}: S3 / native = {ratio:.2}", op.name()));
    }
    record_peak_rss(report, &cluster, false);
    Ok(s3_rows)
}
