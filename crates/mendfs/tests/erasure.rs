//! Erasure-coded files against six real `mendfs server` processes: `ec:4+2` puts of every
//! awkward size read back whole, take about 1.5 times their bytes on disk, still read with two
//! storage nodes SIGKILLed (decoded from parity), and fail with a clear "unrecoverable" error
//! once a third is gone (inline files still read); and, on eight nodes, lost shards rebuilt
//! from K others once two nodes are down, the old records trimmed when the nodes return, and
//! rotted shards found by the scrubber and rewritten; and `mendfs bench ec-cluster` measuring
//! replication and `ec:4+2` on one cluster, its JSON carrying the figures for both.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
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

fn storage_up(status: &Value, ids: &[u64]) -> bool {
    let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
    ids.iter().all(|id| nodes.iter().any(|n| n["id"] == *id && n["storage"] == true && n["state"] == "up"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec_4_2_files_read_back_at_one_and_a_half_times_their_bytes_and_survive_two_dead_nodes() {
    let args = vec!["--chunk-size-bytes".to_string(), CHUNK.to_string()];
    let options = ClusterOptions { nodes: 3, server_args: args, ..ClusterOptions::default() };
    let mut cluster = Cluster::start(binary(), options).expect("start cluster");
    blocking(|| cluster.wait_for_leader(DEADLINE)).unwrap();
    for id in 4..=6 {
        blocking(|| cluster.add_storage_learner(id)).unwrap();
    }
    blocking(|| {
        wait_for("six storage nodes up", DEADLINE, || {
            Ok(cluster.status().ok().filter(|s| storage_up(s, &[1, 2, 3, 4, 5, 6])))
        })
    })
    .unwrap();
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
    let on_disk: u64 = (1..=6u64)
        .flat_map(|id| chunk_files(&cluster.nodes[&id].data_dir))
        .map(|path| std::fs::metadata(path).map_or(0, |m| m.len()))
        .sum();
    let bound = striped as f64 * 1.55 + replicated as f64 * 3.0;
    println!("striped {striped} B, replicated {replicated} B, on disk {on_disk} B (bound {bound:.0})");
    assert!(on_disk as f64 <= bound, "{on_disk} bytes on disk for {striped} striped and {replicated} replicated");
    assert!(on_disk as f64 >= striped as f64 * 1.5, "fewer bytes than the shards need: {on_disk}");

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
