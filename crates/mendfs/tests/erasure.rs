//! Erasure-coded files against six real `mendfs server` processes: `ec:4+2` puts of every
//! awkward size read back whole, take about 1.5 times their bytes on disk, still read with two
//! storage nodes SIGKILLed (decoded from parity), and fail with a clear "unrecoverable" error
//! once a third is gone (inline files still read).
//!
//! Not yet covered because not yet built: rebuilding lost shards (the repair executor).

#![allow(clippy::unwrap_used)]

use std::path::Path;
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
