//! Erasure-coded files against six real `mendfs server` processes: `ec:4+2` puts of every
//! awkward size read back whole, take about 1.5 times their bytes on disk, still read with two
//! storage nodes SIGKILLed (decoded from parity), and fail with a clear "unrecoverable" error
//! once a third is gone (inline files still read); and, on eight nodes, lost shards rebuilt
//! from K others once two nodes are down, the old records trimmed when the nodes return, and
//! rotted shards found by the scrubber and rewritten; and `mendfs bench ec-cluster` measuring
//! replication and `ec:4+2` on one cluster, its JSON carrying the figures for both.
//!
//! Redundancy policies against the same kind of cluster: a prefix's policy stripes the puts
//! under it that do not say otherwise (`stat`, `ls -l` and the put's reply say so, and the disk
//! holds 1.5 times their bytes), elsewhere and with `--redundancy replicate` content stays
//! replicated, a bucket's policy stripes its S3 objects, and bad input is refused saying why.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use mendfs_client::{Client, ClientConfig};
use mendfs_testkit::{chunk_files, wait_for, Cluster, ClusterOptions};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(120);
const CHUNK: usize = 1 << 20;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

/// Content without structure (BLAKE3's output stream): the parity of patterned bytes such as
/// `stamped_bytes` coincides across stripes, and a node keeps identical shards once, which
/// would make the disk count below mean nothing.
fn random_bytes(seed: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new().update(&seed.to_be_bytes()).finalize_xof().fill(&mut out);
    out
}

/// `len` bytes of [`random_bytes`]-like content, produced as they are read; with `stall_at`,
/// the stream stops there and never ends (an upload cut short by its coordinator's death).
struct RandomReader {
    xof: blake3::OutputReader,
    left: u64,
    stall_at: Option<u64>,
    sent: u64,
}

impl RandomReader {
    fn new(seed: u32, len: u64, stall_at: Option<u64>) -> Self {
        let xof = blake3::Hasher::new().update(&seed.to_be_bytes()).finalize_xof();
        Self { xof, left: len, stall_at, sent: 0 }
    }

    fn hash_of(seed: u32, len: u64) -> blake3::Hash {
        let mut reader = blake3::Hasher::new().update(&seed.to_be_bytes()).finalize_xof();
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            reader.fill(&mut buf[..n]);
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        hasher.finalize()
    }
}

impl tokio::io::AsyncRead for RandomReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let mut n = (buf.remaining() as u64).min(self.left);
        if let Some(stall_at) = self.stall_at {
            if self.sent >= stall_at {
                // Never woken: the upload hangs here until its coordinator is gone.
                return std::task::Poll::Pending;
            }
            n = n.min(stall_at - self.sent);
        }
        let n = n as usize;
        let mut chunk = vec![0u8; n];
        self.xof.fill(&mut chunk);
        buf.put_slice(&chunk);
        self.left -= n as u64;
        self.sent += n as u64;
        std::task::Poll::Ready(Ok(()))
    }
}

/// Hashes what it is written: a download checked without holding it.
#[derive(Default)]
struct HashingWriter {
    hasher: blake3::Hasher,
    len: u64,
}

impl tokio::io::AsyncWrite for HashingWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

async fn put_stream(client: &Client, path: &str, reader: RandomReader) {
    let size = reader.left;
    client
        .put_file_with(path, reader, Some(size), None, "ec:4+2", |_| {})
        .await
        .unwrap_or_else(|e| panic!("put {path}: {e}"));
}

async fn get_hash(client: &Client, path: &str) -> (u64, blake3::Hash) {
    let mut writer = HashingWriter::default();
    client.get_file(path, &mut writer, |_, _| {}).await.unwrap_or_else(|e| panic!("get {path}: {e}"));
    (writer.len, writer.hasher.finalize())
}

fn client_of(cluster: &Cluster, ids: &[u64]) -> Client {
    let mut config = ClientConfig::new(ids.iter().map(|&id| cluster.addr(id)).collect());
    config.secret = cluster.secret();
    config.deadline = Duration::from_secs(60);
    Client::new(config).unwrap()
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn put(client: &Client, path: &str, data: &[u8], redundancy: &str) {
    let size = data.len() as u64;
    client
        .put_file_with(path, std::io::Cursor::new(data.to_vec()), Some(size), None, redundancy, |_| {})
        .await
        .unwrap_or_else(|e| panic!("put {path} ({redundancy}): {e}"));
}

async fn get(client: &Client, path: &str) -> Result<Vec<u8>, mendfs_client::Error> {
    let mut out = Vec::new();
    client.get_file(path, &mut out, |_, _| {}).await.map(|_| out)
}

/// Runs `write` and checks that it added `factor` (within 3 %) times `size` bytes to the disks.
fn stored_at(cluster: &Cluster, size: usize, factor: f64, what: &str, write: impl FnOnce()) {
    let before = disk_bytes(cluster, 1..=6);
    write();
    let added = disk_bytes(cluster, 1..=6) - before;
    let ratio = added as f64 / size as f64;
    println!("{what}: {added} bytes on disk for {size} ({ratio:.3}x)");
    assert!(ratio >= factor && ratio <= factor * 1.03, "{what}: {added} bytes on disk for {size} ({ratio:.3}x)");
}

/// The CLI as the operator (the cluster secret), expecting failure: its stderr.
fn refused(cluster: &Cluster, args: &[&str]) -> String {
    refused_output(args, cluster.cli().args(args).output().unwrap())
}

fn refused_output(args: &[&str], output: Output) -> String {
    assert!(
        !output.status.success(),
        "mendfs {} should fail; stdout: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn cli_json(cluster: &Cluster, args: &[&str]) -> Value {
    let out = cluster.run_cli(args).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("mendfs {} printed no JSON ({e}): {out}", args.join(" ")))
}

/// Six storage nodes (three voters, three storage-only learners), 1 MiB chunks and `extra`
/// flags, with `node_args` added to the voters' flags.
fn six_storage_nodes(extra: &[&str], node_args: std::collections::BTreeMap<u64, Vec<String>>) -> Cluster {
    let mut args = vec!["--chunk-size-bytes".to_string(), CHUNK.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let options = ClusterOptions { nodes: 3, server_args: args, node_args, ..ClusterOptions::default() };
    let mut cluster = Cluster::start(binary(), options).expect("start cluster");
    cluster.wait_for_leader(DEADLINE).unwrap();
    for id in 4..=6 {
        cluster.add_storage_learner(id).unwrap();
    }
    wait_for("six storage nodes up", DEADLINE, || {
        Ok(cluster.status().ok().filter(|s| storage_up(s, &[1, 2, 3, 4, 5, 6])))
    })
    .unwrap();
    cluster
}

fn storage_up(status: &Value, ids: &[u64]) -> bool {
    let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
    ids.iter().all(|id| nodes.iter().any(|n| n["id"] == *id && n["storage"] == true && n["state"] == "up"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec_4_2_files_read_back_at_one_and_a_half_times_their_bytes_and_survive_two_dead_nodes() {
    // A short orphan grace, so the shards of a put cut short are collected within the test.
    let extra = ["--orphan-grace-ms", "3000", "--gc-interval-ms", "500"];
    let mut cluster = blocking(|| six_storage_nodes(&extra, Default::default()));
    let mut config = ClientConfig::new(cluster.endpoint_list());
    config.secret = cluster.secret();
    config.deadline = Duration::from_secs(60);
    let client = Client::new(config).unwrap();

    // 0 and 1 byte: inline; just under 64 KiB: a replicated chunk (too small to stripe);
    // a stripe's edges; several stripes and a short tail.
    let sizes = [0, 1, 65_535, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 12_345];
    let mut files = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let data = random_bytes(i as u32 + 1, *size);
        let path = format!("/ec/{i}");
        put(&client, &path, &data, "ec:4+2").await;
        assert_eq!(get(&client, &path).await.unwrap(), data, "{path} ({size} bytes)");
        files.push((path, data));
    }
    // A bad scheme is refused with the reason.
    let refused = client
        .put_file_with("/ec/bad", std::io::Cursor::new(vec![1u8; 10]), Some(10), None, "ec:4+0", |_| {})
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("e.g. ec:4+2"), "{refused}");

    // Disk: every byte of a chunk of 64 KiB or more is stored 1.5 times (plus each shard's
    // rounding to an even size); smaller chunks are three copies; inline ones none.
    let striped: u64 =
        sizes.iter().map(|&s| (s / CHUNK * CHUNK + if s % CHUNK >= 65_536 { s % CHUNK } else { 0 }) as u64).sum();
    let replicated: u64 =
        sizes.iter().map(|&s| s % CHUNK).filter(|&tail| tail > 1 && tail < 65_536).sum::<usize>() as u64;
    let on_disk = disk_bytes(&cluster, 1..=6);
    let bound = striped as f64 * 1.55 + replicated as f64 * 3.0;
    println!("striped {striped} B, replicated {replicated} B, on disk {on_disk} B (bound {bound:.0})");
    assert!(on_disk as f64 <= bound, "{on_disk} bytes on disk for {striped} striped and {replicated} replicated");
    assert!(on_disk as f64 >= striped as f64 * 1.5, "fewer bytes than the shards need: {on_disk}");

    // A coordinator SIGKILLed mid-put: the old version stays, the new one's shards are orphans
    // that the collectors delete once the grace period passes.
    let crash_path = "/ec/crash";
    put(&client, crash_path, &random_bytes(40, 3 * CHUNK), "ec:4+2").await;
    // Nothing was deleted yet, so no collection is pending: this is what the disk must hold
    // again once the cut-short put's orphans are collected.
    let mut before: Vec<PathBuf> = (1..=6).flat_map(|id| chunk_files(&cluster.nodes[&id].data_dir)).collect();
    before.sort();
    let via_node_6 = client_of(&cluster, &[6]);
    let stall_at = 8 * CHUNK as u64;
    let cut_short = tokio::spawn(async move {
        let reader = RandomReader::new(41, 64 * CHUNK as u64, Some(stall_at));
        via_node_6.put_file_with(crash_path, reader, Some(64 * CHUNK as u64), None, "ec:4+2", |_| {}).await
    });
    // Polled without blocking a runtime thread: the put runs on this test's runtime.
    let give_up = std::time::Instant::now() + DEADLINE;
    loop {
        let now = (1..=6).flat_map(|id| chunk_files(&cluster.nodes[&id].data_dir)).count();
        if now >= before.len() + 6 * 6 {
            break;
        }
        assert!(!cut_short.is_finished(), "the put ended before it stalled");
        if std::time::Instant::now() >= give_up {
            let status = cluster.status().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            panic!("no shards of the new version prepared: {now} files; status {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.kill(6).unwrap();
    let outcome = tokio::time::timeout(DEADLINE, cut_short).await.expect("the put ends").unwrap();
    assert!(outcome.is_err(), "a put whose coordinator died cannot have committed");
    assert_eq!(get(&client, crash_path).await.unwrap(), random_bytes(40, 3 * CHUNK), "the old version reads");
    cluster.restart(6).unwrap();
    wait_status(&cluster, "node 6 back", |s| storage_up(s, &[6]));
    blocking(|| {
        wait_for("the cut-short put's shards collected", DEADLINE, || {
            let mut now: Vec<PathBuf> = (1..=6).flat_map(|id| chunk_files(&cluster.nodes[&id].data_dir)).collect();
            now.sort();
            Ok((now == before).then_some(()))
        })
    })
    .unwrap();
    client.delete_file(crash_path, None).await.unwrap();

    // 300 MiB streamed in and out (never whole in memory here), compared by hash.
    let big = 300 * CHUNK as u64;
    put_stream(&client, "/ec/big", RandomReader::new(7, big, None)).await;
    let (got_len, got_hash) = get_hash(&client, "/ec/big").await;
    assert_eq!((got_len, got_hash), (big, RandomReader::hash_of(7, big)), "300 MiB round trip");
    client.delete_file("/ec/big", None).await.unwrap();

    // Two storage-only nodes die: every file still reads, stripes decoded from parity.
    cluster.kill(5).unwrap();
    cluster.kill(6).unwrap();
    for (path, data) in &files {
        assert_eq!(&get(&client, path).await.unwrap(), data, "{path} with two nodes down");
    }

    // A third: stripes that lost three shards fail, saying so; nothing reads wrong bytes.
    cluster.kill(4).unwrap();
    let error = get(&client, &files[6].0).await.unwrap_err().to_string();
    assert!(error.contains("unrecoverable: 3 of 6 shards lost, at most 2 may be"), "{error}");
    assert_eq!(get(&client, &files[1].0).await.unwrap(), files[1].1, "an inline file needs no storage node");
}

fn node(status: &Value, id: u64) -> Value {
    status["nodes"].as_array().and_then(|nodes| nodes.iter().find(|n| n["id"] == id).cloned()).unwrap_or(Value::Null)
}

fn u64_of(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

/// Stripes by live shards, as `cluster status --json` counts them: (live, total) -> stripes.
fn stripe_counts(status: &Value) -> Vec<(u64, u64, u64)> {
    let counts = status["stripes"].as_array().cloned().unwrap_or_default();
    counts.iter().map(|c| (u64_of(&c["live_shards"]), u64_of(&c["total_shards"]), u64_of(&c["stripes"]))).collect()
}

/// Polls `cluster status --json` until `check` holds on a status carrying the leader's view.
fn wait_status(cluster: &Cluster, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    blocking(|| {
        wait_for(what, DEADLINE, || {
            let Ok(status) = cluster.status() else { return Ok(None) };
            if !status["health_error"].is_null() {
                return Ok(None);
            }
            Ok(check(&status).then_some(status))
        })
    })
    .unwrap_or_else(|e| {
        let last = cluster.status().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        panic!("{e}; last status: {last}")
    })
}

/// Shard files on `ids` whose bytes hash to their name, and all of them.
fn shard_files(cluster: &Cluster, ids: impl IntoIterator<Item = u64>) -> (Vec<PathBuf>, usize) {
    let all: Vec<PathBuf> = ids.into_iter().flat_map(|id| chunk_files(&cluster.nodes[&id].data_dir)).collect();
    let total = all.len();
    let good = all
        .into_iter()
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            std::fs::read(path).is_ok_and(|bytes| blake3::hash(&bytes).to_hex().as_str() == name)
        })
        .collect();
    (good, total)
}

fn disk_bytes(cluster: &Cluster, ids: impl IntoIterator<Item = u64>) -> u64 {
    ids.into_iter()
        .flat_map(|id| chunk_files(&cluster.nodes[&id].data_dir))
        .map(|path| std::fs::metadata(path).map_or(0, |m| m.len()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_shards_are_rebuilt_from_k_others_trimmed_on_return_and_rotted_ones_rewritten() {
    // Detection and repair scaled down as in `self_healing.rs`; the scrubber re-reads often.
    let args: Vec<String> = [
        "--chunk-size-bytes",
        &CHUNK.to_string(),
        "--health-interval-ms",
        "250",
        "--acceptable-pause-ms",
        "1500",
        "--down-after-ms",
        "4000",
        "--repair-scan-interval-ms",
        "300",
        "--repair-bytes-per-sec",
        "0",
        "--orphan-grace-ms",
        "3000",
        "--gc-interval-ms",
        "500",
        "--scrub-bytes-per-sec",
        "104857600",
        "--scrub-interval-ms",
        "500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Eight nodes: after two die, six are left to hold each stripe's six shards, one each.
    let options = ClusterOptions { nodes: 3, server_args: args, ..ClusterOptions::default() };
    let mut cluster = Cluster::start(binary(), options).expect("start cluster");
    blocking(|| cluster.wait_for_leader(DEADLINE)).unwrap();
    for id in 4..=8 {
        blocking(|| cluster.add_storage_learner(id)).unwrap();
    }
    wait_status(&cluster, "eight storage nodes up", |s| storage_up(s, &[1, 2, 3, 4, 5, 6, 7, 8]));
    let mut config = ClientConfig::new(cluster.endpoint_list());
    config.secret = cluster.secret();
    config.deadline = Duration::from_secs(60);
    let client = Client::new(config).unwrap();

    // Twelve stripes: six files of two whole chunks, nothing else on disk.
    let mut files = Vec::new();
    for i in 0..6u32 {
        let data = random_bytes(100 + i, 2 * CHUNK);
        let path = format!("/heal/{i}");
        put(&client, &path, &data, "ec:4+2").await;
        files.push((path, data));
    }
    let status = wait_status(&cluster, "12 whole stripes", |s| stripe_counts(s) == [(6, 6, 12)]);
    let striped = (files.len() * 2 * CHUNK) as u64;
    let whole_disk = disk_bytes(&cluster, 1..=8);
    let lost_shards = u64_of(&node(&status, 7)["chunks"]) + u64_of(&node(&status, 8)["chunks"]);
    assert!(lost_shards > 0, "nodes 7 and 8 hold shards: {status}");

    // Two nodes die: reads decode around them; once they are down, repair rebuilds every
    // shard they held on the six left, each from four others.
    cluster.kill(7).unwrap();
    cluster.kill(8).unwrap();
    for (path, data) in &files {
        assert_eq!(&get(&client, path).await.unwrap(), data, "{path} with two nodes dead");
    }
    let status = wait_status(&cluster, "nodes 7 and 8 down and every stripe whole again", |s| {
        let job = &s["repair"];
        node(s, 7)["state"] == "down"
            && node(s, 8)["state"] == "down"
            && job["reason"].as_str().is_some_and(|reason| reason.contains("node 7 down"))
            && !job["finished_unix_ms"].is_null()
            && stripe_counts(s) == [(6, 6, 12)]
    });
    assert_eq!(u64_of(&status["under_replicated_chunks"]), 0, "{status}");
    assert_eq!(u64_of(&status["repair"]["done_copies"]), lost_shards, "the job counts each shard: {status}");
    // The nodes' counters arrive with their next heartbeats.
    let sum = |status: &Value, field: &str| (1..=6).map(|id| u64_of(&node(status, id)["health"][field])).sum::<u64>();
    let status = wait_status(&cluster, "the rebuilds in the nodes' counters", |s| {
        sum(s, "repair_rebuilt_shards") >= lost_shards
    });
    let total = |field: &str| sum(&status, field);
    let (rebuilt, written, read) =
        (total("repair_rebuilt_shards"), total("repair_rebuilt_bytes"), total("repair_rebuild_read_bytes"));
    println!(
        "rebuilt {rebuilt} shards ({written} B) reading {read} B from other nodes: {:.2} B moved per B repaired",
        read as f64 / written.max(1) as f64
    );
    assert_eq!(rebuilt, lost_shards, "exactly the shards on the dead nodes are rebuilt: {status}");
    assert_eq!(read, 4 * written, "K = 4 shards read per shard rebuilt");
    for (path, data) in &files {
        assert_eq!(&get(&client, path).await.unwrap(), data, "{path} after the rebuild");
    }

    // They come back: their old shards are no longer listed, so their collectors delete them,
    // and the disk holds one copy of every shard again.
    cluster.restart(7).unwrap();
    cluster.restart(8).unwrap();
    wait_status(&cluster, "nodes 7 and 8 up again", |s| storage_up(s, &[7, 8]));
    blocking(|| {
        wait_for("the returned nodes' surplus shards collected", DEADLINE, || {
            Ok((disk_bytes(&cluster, 1..=8) == whole_disk).then_some(()))
        })
    })
    .unwrap();
    assert!(whole_disk as f64 <= striped as f64 * 1.55, "{whole_disk} B on disk for {striped} B");

    // Rot: a byte flipped in every shard node 4 holds. Reads still succeed; the scrubber
    // finds each, the metadata stops listing it, and repair rewrites it from the others.
    let (rotted, _) = shard_files(&cluster, [4]);
    assert!(!rotted.is_empty(), "node 4 holds shards");
    for path in &rotted {
        let mut bytes = std::fs::read(path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x5a;
        std::fs::write(path, bytes).unwrap();
    }
    for (path, data) in &files {
        assert_eq!(&get(&client, path).await.unwrap(), data, "{path} with rotted shards");
    }
    wait_status(&cluster, "node 4's scrubber finds every rotted shard", |s| {
        u64_of(&node(s, 4)["health"]["checksum_errors"]) >= rotted.len() as u64
    });
    wait_status(&cluster, "every stripe whole again", |s| {
        stripe_counts(s) == [(6, 6, 12)] && u64_of(&s["under_replicated_chunks"]) == 0
    });
    blocking(|| {
        wait_for("every shard on disk good, once", DEADLINE, || {
            let (good, total) = shard_files(&cluster, 1..=8);
            Ok((good.len() == 12 * 6 && total == 12 * 6).then_some(()))
        })
    })
    .unwrap();
    for (path, data) in &files {
        assert_eq!(&get(&client, path).await.unwrap(), data, "{path} after the rot was repaired");
    }

    // Drained: node 5's shards move (one read each, no decoding) to nodes holding none of
    // their stripe, and it ends with nothing.
    blocking(|| cluster.run_cli(&["cluster", "drain", "5"])).expect("drain");
    wait_status(&cluster, "node 5 drained of shards, every stripe whole", |s| {
        let n = node(s, 5);
        n["draining"] == true
            && u64_of(&n["chunks"]) == 0
            && n["health"]["chunk_count"] == 0
            && stripe_counts(s) == [(6, 6, 12)]
    });
    assert!(chunk_files(&cluster.nodes[&5].data_dir).is_empty());
    let (good, total) = shard_files(&cluster, 1..=8);
    assert_eq!((good.len(), total), (12 * 6, 12 * 6), "one good copy of every shard");
    for (path, data) in &files {
        assert_eq!(&get(&client, path).await.unwrap(), data, "{path} after the drain");
    }
}

/// `mendfs policy` end to end: a prefix's policy chooses how puts that do not say are kept,
/// an explicit `--redundancy` wins, a bucket's policy stripes its objects, `stat` and `ls -l`
/// show each version's redundancy, and bad input is refused with its reason.
#[test]
fn policies_choose_the_redundancy_of_puts_that_do_not_say() {
    let s3_addr = format!("127.0.0.1:{}", mendfs_testkit::free_port().unwrap());
    // Node 2 replicates an ec:K+M put it cannot stripe (too few nodes) instead of refusing it.
    let node_args = [
        (1, vec!["--s3".to_string(), s3_addr.clone()]),
        (2, vec!["--ec-fallback".to_string(), "replicate".to_string()]),
    ];
    let cluster = six_storage_nodes(&[], node_args.into());
    let every_node = [1, 2, 3, 4, 5, 6];
    let local = |name: &str, seed: u32, size: usize| {
        let data = random_bytes(seed, size);
        let path = cluster.root().join(name);
        std::fs::write(&path, &data).unwrap();
        (path.to_str().unwrap().to_string(), data)
    };
    let size = 3 * CHUNK;

    // A policy on /cold (given with a trailing / and as K+M, stored as /cold and ec:K+M), listed.
    let set = cluster.run_cli(&["policy", "set", "/cold/", "4+2"]).unwrap();
    assert!(set.contains("policy of /cold: ec:4+2 (was none)"), "{set}");
    let listed = cli_json(&cluster, &["policy", "list", "--json"]);
    assert_eq!(
        listed,
        serde_json::json!([{"kind": "prefix", "name": "/cold", "redundancy": "ec:4+2",
                                           "set_ms": listed[0]["set_ms"]}])
    );
    assert!(listed[0]["set_ms"].as_u64().unwrap() > 0, "{listed}");
    let text = cluster.run_cli(&["policy", "list"]).unwrap();
    assert!(text.lines().any(|l| l.starts_with("prefix") && l.contains("/cold") && l.contains("ec:4+2")), "{text}");
    // Every node reads the policy from its own state: let each apply it, so that whichever
    // coordinates the puts below knows it.
    cluster.wait_for_caught_up(&every_node, DEADLINE).unwrap();

    // Under /cold without --redundancy: striped, 1.5 times its bytes, and said so.
    let (cold, cold_data) = local("cold.bin", 101, size);
    stored_at(&cluster, size, 1.5, "/cold/a (the policy's ec:4+2)", || {
        let put = cluster.run_cli(&["put", &cold, "/cold/a"]).unwrap();
        assert!(put.contains("ec:4+2 (policy of /cold)"), "{put}");
    });
    let stat = cli_json(&cluster, &["stat", "/cold/a", "--json"]);
    assert_eq!(stat["redundancy"], "ec:4+2", "{stat}");
    assert!(stat["chunks"].as_array().unwrap().iter().all(|c| c["striped"] == true && c["inline"] == false), "{stat}");
    let stat = cluster.run_cli(&["stat", "/cold/a"]).unwrap();
    assert!(stat.contains("redundancy: ec:4+2") && stat.contains("striped ec:4+2"), "{stat}");
    let back = cluster.root().join("cold.back");
    cluster.run_cli(&["get", "/cold/a", back.to_str().unwrap()]).unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), cold_data, "a striped file reads back whole");

    // Elsewhere: replicated, three copies.
    let (warm, _) = local("warm.bin", 102, size);
    stored_at(&cluster, size, 3.0, "/warm/b (no policy)", || {
        let put = cluster.run_cli(&["put", &warm, "/warm/b"]).unwrap();
        assert!(put.contains("replicate:3") && !put.contains("policy of"), "{put}");
    });
    // Not on a component boundary: /coldish is not under /cold.
    let (coldish, _) = local("coldish.bin", 103, 100_000);
    assert!(cluster.run_cli(&["put", &coldish, "/coldish"]).unwrap().contains("replicate:3"));
    // An explicit --redundancy wins over the policy.
    let (explicit, _) = local("explicit.bin", 104, size);
    stored_at(&cluster, size, 3.0, "/cold/c (--redundancy replicate)", || {
        let put = cluster.run_cli(&["put", "--redundancy", "replicate", &explicit, "/cold/c"]).unwrap();
        assert!(put.contains("replicate:3") && !put.contains("policy of"), "{put}");
    });
    // Small files keep today's ways: inline, or a chunk under 64 KiB replicated.
    let (tiny, _) = local("tiny.bin", 105, 1_000);
    assert!(cluster.run_cli(&["put", &tiny, "/cold/tiny"]).unwrap().contains("inline (policy of /cold)"));
    let (small, _) = local("small.bin", 106, 30_000);
    assert!(cluster.run_cli(&["put", &small, "/cold/small"]).unwrap().contains("replicate:3 (policy of /cold)"));

    // `ls -l` and `ls --json` say how each version is kept.
    let ls = cli_json(&cluster, &["ls", "/", "--json"]);
    let kept: std::collections::BTreeMap<String, String> = ls["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f["redundancy"].as_str().unwrap().to_string()))
        .collect();
    let expected: std::collections::BTreeMap<String, String> = [
        ("/cold/a", "ec:4+2"),
        ("/cold/c", "replicate:3"),
        ("/cold/small", "replicate:3"),
        ("/cold/tiny", "inline"),
        ("/coldish", "replicate:3"),
        ("/warm/b", "replicate:3"),
    ]
    .into_iter()
    .map(|(path, kept)| (path.to_string(), kept.to_string()))
    .collect();
    assert_eq!(kept, expected);
    let long = cluster.run_cli(&["ls", "-l", "/cold"]).unwrap();
    let line = |path: &str| long.lines().find(|l| l.ends_with(path)).unwrap_or_else(|| panic!("{path}: {long}"));
    assert!(line("/cold/a").contains(" ec:4+2 "), "{long}");
    assert!(line("/cold/c").contains(" replicate:3 "), "{long}");

    // Bad input, each refused with its reason, and nothing changed.
    for (args, why) in [
        (vec!["policy", "set", "/cold", "ec:0+2"], "invalid erasure scheme"),
        (vec!["policy", "set", "/cold", "ec:4"], "e.g. ec:4+2"),
        (vec!["policy", "set", "/cold", "replicate:2"], "replication factor"),
        (vec!["policy", "set", "cold", "ec:4+2"], "not an absolute path"),
        (vec!["policy", "set", "/a/../b", "ec:4+2"], "contains . or .."),
        (vec!["policy", "set", "--bucket", "no-such-bucket", "ec:4+2"], "bucket no-such-bucket does not exist"),
        (vec!["policy", "set", "ec:4+2"], "a prefix and a redundancy"),
    ] {
        let stderr = refused(&cluster, &args);
        assert!(stderr.contains(why), "mendfs {}: {stderr} should say {why:?}", args.join(" "));
    }
    let token = cluster.run_cli(&["auth", "token", "create", "writer", "--role", "write"]).unwrap();
    let as_writer = |args: &[&str]| {
        let output =
            cluster.cli().env_remove("MENDFS_SECRET").env("MENDFS_TOKEN", token.trim()).args(args).output().unwrap();
        refused_output(args, output)
    };
    for args in [&["policy", "set", "/cold", "replicate"][..], &["policy", "unset", "/cold"], &["policy", "list"]] {
        let stderr = as_writer(args);
        assert!(stderr.contains("permission denied: role write"), "mendfs {}: {stderr}", args.join(" "));
    }
    assert_eq!(cli_json(&cluster, &["policy", "list", "--json"]).as_array().unwrap().len(), 1, "nothing changed");

    // A bucket's policy stripes its S3 objects.
    let key = cluster.run_cli(&["s3", "key", "create", "archiver", "--create-buckets"]).unwrap();
    let signer = mendfs_chaos::s3_client::Signer::from_exports(&key).unwrap();
    let key_id = key.lines().find_map(|l| l.strip_prefix("export AWS_ACCESS_KEY_ID=")).unwrap().trim();
    cluster.run_cli(&["s3", "bucket", "create", "cold-objects", "--owner", key_id]).unwrap();
    let set = cluster.run_cli(&["policy", "set", "--bucket", "cold-objects", "ec:4+2"]).unwrap();
    assert!(set.contains("policy of bucket cold-objects: ec:4+2 (was none)"), "{set}");
    let listed = cli_json(&cluster, &["policy", "list", "--json"]);
    assert_eq!(listed[1]["kind"], "bucket", "paths first, then buckets: {listed}");
    assert_eq!(listed[1]["name"], "cold-objects", "{listed}");
    cluster.wait_for_caught_up(&every_node, DEADLINE).unwrap();
    let object = random_bytes(107, size);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    stored_at(&cluster, size, 1.5, "s3://cold-objects/big.bin (the bucket's ec:4+2)", || {
        runtime.block_on(async {
            let mut connection = connect(&s3_addr).await;
            let put = connection
                .request(
                    &signer,
                    http::Method::PUT,
                    "/cold-objects/big.bin",
                    bytes::Bytes::from(object.clone()),
                    |_| {},
                )
                .await
                .unwrap();
            assert!(put.status.is_success(), "{put:?}");
            let mut back = Vec::new();
            let get = connection
                .request(&signer, http::Method::GET, "/cold-objects/big.bin", bytes::Bytes::new(), |data| {
                    back.extend_from_slice(data)
                })
                .await
                .unwrap();
            assert!(get.status.is_success(), "{get:?}");
            assert_eq!(back, object, "a striped object reads back whole");
        })
    });

    // Unset: gone from the list, and new puts under /cold are replicated again.
    // ec:4+3 wants seven nodes, one per shard; there are six. Node 3 refuses the put, saying
    // so; node 2, configured to fall back, keeps three copies and says why.
    let (wide, wide_data) = local("wide.bin", 109, size);
    let refused_put = refused_output(
        &["put"],
        cluster.cli_at(&cluster.addr(3)).args(["put", &wide, "/wide/a", "--redundancy", "ec:4+3"]).output().unwrap(),
    );
    assert!(
        refused_put.contains("ec:4+3 needs 7 storage nodes that accept data, one per shard; 6 do"),
        "{refused_put}"
    );
    stored_at(&cluster, size, 3.0, "/wide/b (ec:4+3 fallen back)", || {
        let output = cluster
            .cli_at(&cluster.addr(2))
            .args(["put", &wide, "/wide/b", "--redundancy", "ec:4+3"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(stdout.contains("replicate:3"), "{stdout}");
        assert!(
            stderr.contains("ec:4+3 needs 7 storage nodes") && stderr.contains("--ec-fallback replicate"),
            "{stderr}"
        );
    });
    let back = cluster.root().join("wide.back");
    cluster.run_cli(&["get", "/wide/b", back.to_str().unwrap()]).unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), wide_data);

    let unset = cluster.run_cli(&["policy", "unset", "/cold"]).unwrap();
    assert!(unset.contains("removed the policy of /cold (it was ec:4+2)"), "{unset}");
    let again = cluster.run_cli(&["policy", "unset", "/cold"]).unwrap();
    assert!(again.contains("/cold had no policy; nothing to remove"), "{again}");
    let listed = cli_json(&cluster, &["policy", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "only the bucket's is left: {listed}");
    cluster.wait_for_caught_up(&every_node, DEADLINE).unwrap();
    let (later, _) = local("later.bin", 108, size);
    stored_at(&cluster, size, 3.0, "/cold/d (policy unset)", || {
        let put = cluster.run_cli(&["put", &later, "/cold/d"]).unwrap();
        assert!(put.contains("replicate:3") && !put.contains("policy of"), "{put}");
    });
    assert_eq!(cli_json(&cluster, &["stat", "/cold/a", "--json"])["redundancy"], "ec:4+2", "what was stored stays");
}

/// A connection to the S3 gateway at `addr`, which started with its node.
async fn connect(addr: &str) -> mendfs_chaos::s3_client::Connection {
    let give_up = std::time::Instant::now() + DEADLINE;
    loop {
        match mendfs_chaos::s3_client::Connection::open(addr).await {
            Ok(connection) => return connection,
            Err(e) if std::time::Instant::now() < give_up => {
                println!("the S3 gateway at {addr} does not answer yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the S3 gateway at {addr}: {e:#}"),
        }
    }
}

#[test]
fn bench_ec_cluster_compares_both_redundancies_on_one_cluster_and_reports_them_as_json() {
    // Short rows of 1 MiB files keep the debug build quick; the phases are those of a real run.
    let output = std::process::Command::new(binary())
        .args(["bench", "ec-cluster", "--seconds", "1", "--mib", "16", "--size", "1048576", "--json", "-"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: not JSON:\n{stdout}"));
    assert_eq!(report["bench"], "ec-cluster");
    // A put and a get row for each redundancy, tagged with it, none failed; ec's against replicate's.
    let rows = report["rows"].as_array().unwrap();
    let tagged: Vec<(String, String)> = rows
        .iter()
        .map(|row| (row["redundancy"].as_str().unwrap().to_string(), row["op"].as_str().unwrap().to_string()))
        .collect();
    let expected = [
        ("replicate", "put"),
        ("replicate", "get"),
        ("replicate", "get-degraded"),
        ("ec:4+2", "put"),
        ("ec:4+2", "get"),
        ("ec:4+2", "get-degraded"),
    ];
    assert_eq!(tagged, expected.map(|(r, op)| (r.to_string(), op.to_string())), "{report}");
    assert!(rows.iter().all(|row| row["errors"] == 0 && row["mb_per_sec"].as_f64().unwrap() > 0.0), "{report}");
    // Every row of ec:4+2 against the same row of replicate, the degraded gets included.
    assert!(rows[3..].iter().all(|row| row["ratios"]["over_first_redundancy"].as_f64().is_some()), "{report}");
    // Three copies against 4 + 2 shards on disk; repair reads a copy's bytes, or 4 shards per shard.
    let figures = report["redundancies"].as_array().unwrap();
    for (figure, disk, read) in [(&figures[0], 3.0, 1.0), (&figures[1], 1.5, 4.0)] {
        let per_file_byte = figure["disk_bytes_per_file_byte"].as_f64().unwrap();
        assert!((per_file_byte - disk).abs() < 0.01, "{disk} expected: {figure}");
        assert_eq!(figure["read_bytes_per_repaired_byte"].as_f64(), Some(read), "{figure}");
        assert_eq!(figure["killed_nodes"], serde_json::json!([7, 8]), "{figure}");
        assert!(figure["repaired_bytes"].as_u64().unwrap() > 0, "{figure}");
        assert!(figure["down_to_full_redundancy_s"].as_f64().unwrap() > 0.0, "{figure}");
    }
    assert_eq!(figures[0]["rebuilt_shards"], 0, "replication copies, never rebuilds");
    assert_eq!(figures[1]["copied_chunks"], 0, "every chunk of a 1 MiB file is striped");
    assert_eq!(report["nodes"].as_array().unwrap().len(), 8, "a peak RSS for each node");
}
