//! The data plane against real `mendfs server` processes: round trips, corrupted and missing
//! replicas, nodes killed mid-write, concurrent overwrites, orphan collection, bad input.

#![allow(clippy::unwrap_used)]

use mendfs_types::hex;
use std::path::Path;
use std::time::{Duration, Instant};

use mendfs_client::{Client, ClientConfig, Error};
use mendfs_testkit::{chunk_files, wait_for, Cluster, ClusterOptions};

const DEADLINE: Duration = Duration::from_secs(90);
const CHUNK: usize = 1 << 20;
/// The default `--inline-max-bytes`.
const INLINE_MAX: usize = 16 << 10;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

fn options(extra: &[&str]) -> ClusterOptions {
    let mut server_args: Vec<String> = vec!["--chunk-size-bytes".into(), CHUNK.to_string()];
    server_args.extend(extra.iter().map(|s| s.to_string()));
    ClusterOptions { server_args, ..ClusterOptions::default() }
}

fn start(options: ClusterOptions) -> Cluster {
    let cluster = Cluster::start(binary(), options).expect("start cluster");
    cluster.wait_for_leader(DEADLINE).expect("a leader");
    // Every node has registered its storage once a file can be written.
    cluster
}

fn client_at(cluster: &Cluster, endpoints: Vec<String>) -> Client {
    let mut config = ClientConfig::new(endpoints);
    config.secret = cluster.secret();
    config.deadline = Duration::from_secs(60);
    Client::new(config).unwrap()
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Deterministic content, distinct per stamp (see `stamped_bytes`).
fn content(stamp: u32, len: usize) -> Vec<u8> {
    mendfs_testkit::stamped_bytes(stamp, 0, len)
}

async fn put(client: &Client, path: &str, data: Vec<u8>) -> Result<mendfs_client::PutFileReply, Error> {
    let size = data.len() as u64;
    client.put_file(path, std::io::Cursor::new(data), Some(size), None, |_| {}).await
}

async fn get(client: &Client, path: &str) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    client.get_file(path, &mut out, |_, _| {}).await?;
    Ok(out)
}

/// Puts, retrying a write that a busy machine made slower than the (deliberately tiny) grace
/// period: the cluster refuses such a commit, which is right, but not what the test is about.
/// Bounded by time, not by a count of attempts: while the 420,000-chunk test shares the
/// machine, ten attempts in a row could all take longer than 200 ms.
async fn put_within_grace(client: &Client, path: &str, data: &[u8]) {
    let by = Instant::now() + DEADLINE;
    loop {
        match put(client, path, data.to_vec()).await {
            Ok(_) => return,
            Err(e) if e.to_string().contains("grace period") && Instant::now() < by => continue,
            Err(e) => panic!("put {path}: {e}"),
        }
    }
}

/// Waits until every storage node has registered (a put no longer fails for lack of nodes).
async fn wait_until_writable(client: &Client) {
    let by = Instant::now() + DEADLINE;
    loop {
        match put(client, "/.probe", b"probe".to_vec()).await {
            Ok(_) => return,
            Err(e) => assert!(Instant::now() < by, "the cluster never accepted a file: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_round_trip_byte_for_byte_at_chunk_boundaries_and_300_mib() {
    let cluster = start(options(&[]));
    let client = client_at(&cluster, cluster.endpoint_list());
    wait_until_writable(&client).await;
    // Up to the inline limit (16 KiB by default) the content is kept in the metadata: its one
    // chunk has no copies on storage nodes. A later chunk with the same bytes (a big file's
    // short tail) shares that inline chunk rather than getting copies of its own.
    let mut inline_chunks = std::collections::HashSet::new();
    for (stamp, len) in [0, 1, INLINE_MAX, INLINE_MAX + 1, CHUNK - 1, CHUNK, CHUNK + 1].into_iter().enumerate() {
        let path = format!("/sizes/{len}");
        let data = content(stamp as u32, len);
        let reply = put(&client, &path, data.clone()).await.unwrap_or_else(|e| panic!("put {len}: {e}"));
        assert_eq!(reply.chunks as usize, len.div_ceil(CHUNK));
        assert!(get(&client, &path).await.unwrap() == data, "{len} bytes read back differently");
        let info = client.stat_file(&path).await.unwrap();
        for chunk in &info.chunks {
            let copies = if len <= INLINE_MAX || inline_chunks.contains(&chunk.hash) { 0 } else { 3 };
            assert_eq!(chunk.replicas.len(), copies, "{len} bytes: copies of a chunk of {} bytes", chunk.size);
        }
        if len <= INLINE_MAX {
            inline_chunks.extend(info.chunks.iter().map(|chunk| chunk.hash.clone()));
        }
    }
    // 300 MiB, streamed from a file and into a file: neither side holds it whole.
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("big");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&source).unwrap();
        for block in 0..300 {
            file.write_all(&content(1_000 + block, CHUNK)).unwrap();
        }
    }
    let file = tokio::fs::File::open(&source).await.unwrap();
    let reply = client.put_file("/big", file, Some(300 * CHUNK as u64), None, |_| {}).await.expect("put 300 MiB");
    assert_eq!(reply.size, 300 * CHUNK as u64);
    let mut out = tokio::fs::File::create(dir.path().join("back")).await.unwrap();
    client.get_file("/big", &mut out, |_, _| {}).await.expect("get 300 MiB");
    drop(out);
    assert!(files_equal(&source, &dir.path().join("back")), "300 MiB read back differently");
}

fn files_equal(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (mut a, mut b) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = a.read(&mut x).unwrap();
        let mut filled = 0;
        while filled < n {
            let m = b.read(&mut y[filled..n]).unwrap();
            if m == 0 {
                return false;
            }
            filled += m;
        }
        if n == 0 {
            return b.read(&mut y).unwrap() == 0;
        }
        if x[..n] != y[..n] {
            return false;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_survives_one_corrupted_or_deleted_copy_of_each_chunk() {
    let cluster = start(options(&[]));
    // Reads through node 1, which tries its own copy first: every bad copy is met and reported.
    let victim = 1;
    let client = client_at(&cluster, vec![cluster.addr(victim)]);
    wait_until_writable(&client).await;
    let data = content(7, 6 * CHUNK + 123);
    put(&client, "/precious", data.clone()).await.unwrap();
    let info = client.stat_file("/precious").await.unwrap();
    for (index, chunk) in info.chunks.iter().enumerate() {
        assert!(chunk.replicas.contains(&victim), "RF=3 on 3 nodes puts a copy everywhere");
        let hash = hex(&chunk.hash);
        let path = cluster.nodes[&victim].data_dir.join("chunks/chunks").join(&hash[..2]).join(&hash[2..4]).join(&hash);
        if index % 2 == 0 {
            let mut bytes = std::fs::read(&path).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xff;
            std::fs::write(&path, bytes).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
    for _ in 0..3 {
        assert!(get(&client, "/precious").await.expect("still readable") == data, "the bytes are right");
    }
    // The bad copies were reported and dropped from the chunk map, and repair then copied good
    // ones back to the victim (the only node that can hold a third copy). Both steps may be
    // done before the first look, so check where they end: every chunk listed on 3 nodes, and
    // a verified copy on the victim's disk where the corrupt or missing one was.
    let by = Instant::now() + DEADLINE;
    loop {
        let info = client.stat_file("/precious").await.unwrap();
        let restored = info.chunks.iter().all(|chunk| {
            let hash = hex(&chunk.hash);
            let path =
                cluster.nodes[&victim].data_dir.join("chunks/chunks").join(&hash[..2]).join(&hash[2..4]).join(&hash);
            chunk.replicas.len() == 3
                && chunk.replicas.contains(&victim)
                && std::fs::read(&path).is_ok_and(|bytes| blake3::hash(&bytes).as_bytes().as_slice() == chunk.hash)
        });
        if restored {
            break;
        }
        assert!(Instant::now() < by, "bad copies not replaced: {info:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_mid_put_fails_cleanly_or_stores_the_whole_file() {
    let mut cluster = start(options(&[]));
    let coordinator = cluster.wait_for_leader(DEADLINE).unwrap();
    let client = client_at(&cluster, vec![cluster.addr(coordinator)]);
    wait_until_writable(&client).await;
    let victim = (1..=3).find(|id| *id != coordinator).unwrap();
    let data = content(9, 48 * CHUNK);
    let upload = {
        let client = client.clone();
        let data = data.clone();
        tokio::spawn(async move { put(&client, "/during-kill", data).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocking(|| cluster.kill(victim)).unwrap();
    match upload.await.unwrap() {
        Ok(reply) => {
            assert_eq!(reply.size, data.len() as u64);
            assert!(get(&client, "/during-kill").await.unwrap() == data, "a successful put reads back whole");
        }
        Err(e) => {
            assert!(matches!(client.stat_file("/during-kill").await, Err(Error::NotFound(_))), "failed put: {e}");
        }
    }
}

/// A replica frozen (SIGSTOP: its sockets stay open, it answers nothing) while a big put streams
/// chunks to it. The coordinator gives up on it within the chunk RPC timeout, finishes each
/// chunk with the surviving replicas, copies the chunk from one of them to a stand-in (4 nodes,
/// RF 3), and sends later chunks elsewhere; the put commits with 3 fsynced, verified copies of
/// every chunk, none of them counted on the frozen node unless it acknowledged it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_frozen_mid_put_is_replaced_and_every_chunk_keeps_three_verified_copies() {
    let mut cluster = start(ClusterOptions { nodes: 4, ..options(&["--chunk-rpc-timeout-ms", "1500"]) });
    let coordinator = cluster.wait_for_leader(DEADLINE).unwrap();
    let client = client_at(&cluster, vec![cluster.addr(coordinator)]);
    wait_until_writable(&client).await;
    let victim = (1..=4).find(|id| *id != coordinator).unwrap();
    let data = content(11, 64 * CHUNK + 4321);
    let upload = {
        let client = client.clone();
        let data = data.clone();
        tokio::spawn(async move { put(&client, "/frozen-replica", data).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocking(|| cluster.pause(victim)).unwrap();
    let reply = upload.await.unwrap().expect("a put survives one frozen replica when a stand-in exists");
    assert_eq!(reply.size, data.len() as u64);
    assert!(
        cluster.log(coordinator).contains("chunk stream to a replica failed"),
        "the put ended before the pause reached it; the test saw nothing"
    );
    let info = client.stat_file("/frozen-replica").await.unwrap();
    assert_eq!(info.chunks.len(), 65);
    for (index, chunk) in info.chunks.iter().enumerate() {
        let mut nodes = chunk.replicas.clone();
        nodes.sort_unstable();
        nodes.dedup();
        assert_eq!(nodes.len(), 3, "chunk {index}: {:?}", chunk.replicas);
        let hash = hex(&chunk.hash);
        for node in &nodes {
            let path =
                cluster.nodes[node].data_dir.join("chunks/chunks").join(&hash[..2]).join(&hash[2..4]).join(&hash);
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("chunk {index} on node {node}: {e}"));
            assert_eq!(blake3::hash(&bytes).as_bytes().as_slice(), chunk.hash, "chunk {index} on node {node}");
        }
    }
    blocking(|| cluster.resume(victim)).unwrap();
    assert!(get(&client, "/frozen-replica").await.unwrap() == data, "read back whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_coordinator_mid_put_keeps_the_old_version_and_orphans_are_collected() {
    let mut cluster = start(options(&["--orphan-grace-ms", "3000", "--gc-interval-ms", "500"]));
    let all = client_at(&cluster, cluster.endpoint_list());
    wait_until_writable(&all).await;
    all.delete_file("/.probe", None).await.unwrap();
    let old = content(1, 3 * CHUNK);
    put(&all, "/doc", old.clone()).await.unwrap();

    let coordinator = 3;
    let through_coordinator = client_at(&cluster, vec![cluster.addr(coordinator)]);
    let upload = tokio::spawn(async move {
        // Slow, endless input: the coordinator dies while it is still receiving.
        let (mut writer, reader) = tokio::io::duplex(1 << 20);
        let feeder = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for block in 0..10_000u32 {
                if writer.write_all(&content(500 + block, CHUNK)).await.is_err() {
                    return;
                }
            }
        });
        let result = through_coordinator.put_file("/doc", reader, None, None, |_| {}).await;
        feeder.abort();
        result
    });
    // Let several chunks reach the replicas first.
    let chunks_before: usize = (1..=3).map(|id| chunk_files(&cluster.nodes[&id].data_dir).len()).sum();
    blocking(|| {
        wait_for("chunks of the new version to be prepared", DEADLINE, || {
            let now: usize = (1..=3).map(|id| chunk_files(&cluster.nodes[&id].data_dir).len()).sum();
            Ok((now >= chunks_before + 6).then_some(()))
        })
    })
    .unwrap();
    blocking(|| cluster.kill(coordinator)).unwrap();
    assert!(upload.await.unwrap().is_err(), "the put cannot succeed without its coordinator");

    let survivors = client_at(&cluster, vec![cluster.addr(1), cluster.addr(2)]);
    let info = survivors.stat_file("/doc").await.unwrap();
    assert_eq!(info.version, 1, "no partial version became visible");
    assert!(get(&survivors, "/doc").await.unwrap() == old, "the previous version still reads");
    // After the grace period the orphans are gone: each survivor holds exactly the copies the
    // chunk map lists on it.
    for id in [1u64, 2] {
        let expected = info.chunks.iter().filter(|c| c.replicas.contains(&id)).count();
        let dir = cluster.nodes[&id].data_dir.clone();
        blocking(|| {
            wait_for(&format!("node {id}'s orphans to be collected"), DEADLINE, || {
                let n = chunk_files(&dir).len();
                if n == expected {
                    Ok(Some(()))
                } else {
                    anyhow::bail!("{n} chunk files, {expected} referenced")
                }
            })
        })
        .unwrap();
    }
    assert!(get(&survivors, "/doc").await.unwrap() == old, "collection never touches live data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_overwrites_are_atomic_for_readers() {
    let cluster = start(options(&[]));
    let client = client_at(&cluster, cluster.endpoint_list());
    wait_until_writable(&client).await;
    put(&client, "/contended", content(0, 3 * CHUNK + 17)).await.unwrap();
    let mut writers = Vec::new();
    for writer in 1..=2u32 {
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            for round in 0..12u32 {
                let stamp = writer * 1_000 + round;
                put(&client, "/contended", content(stamp, 3 * CHUNK + 17)).await.unwrap();
            }
        }));
    }
    let reader = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut reads = 0;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(120) && reads < 40 {
                let data = get(&client, "/contended").await.expect("every read succeeds");
                let stamp = u32::from_be_bytes(data[..4].try_into().unwrap());
                assert!(data == content(stamp, 3 * CHUNK + 17), "read {reads} mixes versions");
                reads += 1;
            }
            reads
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(reader.await.unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_racing_deletes_and_rewrites_of_the_same_content_never_loses_data() {
    let cluster = start(options(&["--orphan-grace-ms", "200", "--gc-interval-ms", "100"]));
    let client = client_at(&cluster, cluster.endpoint_list());
    wait_until_writable(&client).await;
    let data = content(42, 2 * CHUNK);
    for round in 0..15 {
        put_within_grace(&client, "/a", &data).await;
        client.delete_file("/a", None).await.unwrap();
        // The chunks are unreferenced now; a collection pass may be running. Re-use them.
        tokio::time::sleep(Duration::from_millis(50 * (round % 5))).await;
        put_within_grace(&client, "/b", &data).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(get(&client, "/b").await.unwrap() == data, "round {round}: a committed chunk was collected");
        client.delete_file("/b", None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_file_input_gets_clean_errors() {
    let cluster = start(options(&[]));
    let client = client_at(&cluster, cluster.endpoint_list());
    wait_until_writable(&client).await;
    for bad in ["/a/../b", "relative", "/a\0b", "/", "/a//b", "/trailing/"] {
        let err = put(&client, bad, b"x".to_vec()).await.expect_err(bad);
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err}");
    }
    let err = get(&client, "/missing").await.expect_err("missing");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    // A truncated upload: 10 MiB declared, 3 MiB sent, then the stream ends.
    let data = content(3, 3 * CHUNK);
    let err = client
        .put_file("/truncated", std::io::Cursor::new(data), Some(10 * CHUNK as u64), None, |_| {})
        .await
        .expect_err("truncated");
    assert!(err.to_string().contains("truncated"), "{err}");
    assert!(matches!(client.stat_file("/truncated").await, Err(Error::NotFound(_))), "no partial file");
    // An input that fails midway, with no declared size (like a broken pipe into stdin): the
    // upload is cancelled, never committed as a short file.
    let failing = FailingReader { remaining: 3 * CHUNK as u64 };
    let err = client.put_file("/cut", failing, None, None, |_| {}).await.expect_err("the input failed");
    assert!(err.to_string().contains("cancelled"), "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(matches!(client.stat_file("/cut").await, Err(Error::NotFound(_))), "no partial file from a failed input");
    // A stale overwrite is refused and changes nothing.
    put(&client, "/v", b"one".to_vec()).await.unwrap();
    let err = client.put_file("/v", std::io::Cursor::new(b"two".to_vec()), Some(3), Some(9), |_| {}).await;
    assert!(matches!(err, Err(Error::VersionMismatch { expected: 9, actual: 1 })), "{err:?}");
    assert_eq!(get(&client, "/v").await.unwrap(), b"one");
    blocking(|| the_cli_downloads_into_pipes_and_directories_without_replacing_them(&cluster));
}

/// `mendfs get` into a FIFO streams into the pipe and leaves it a pipe (renaming a finished
/// download over it, as for a regular file, once replaced /dev/null with a regular file), also
/// when the FIFO is the file a download into a directory names; into a directory it writes a
/// file named after the remote one, like cp.
fn the_cli_downloads_into_pipes_and_directories_without_replacing_them(cluster: &Cluster) {
    let dir = tempfile::tempdir().unwrap();
    let data = content(9, 2 * CHUNK + 7);
    let source = dir.path().join("source");
    std::fs::write(&source, &data).unwrap();
    cluster.run_cli(&["put", source.to_str().unwrap(), "/pipe/stream"]).expect("put");

    let fifo = dir.path().join("fifo");
    let bytes = download_into_fifo(cluster, &fifo, &fifo);
    assert!(bytes == data, "the FIFO carried {} bytes, not the file's {}", bytes.len(), data.len());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary file left beside the FIFO: {leftovers:?}");

    let into = dir.path().join("into");
    std::fs::create_dir(&into).unwrap();
    cluster.run_cli(&["get", "/pipe/stream", into.to_str().unwrap()]).expect("get into a directory");
    assert!(std::fs::read(into.join("stream")).unwrap() == data, "the directory holds the file under its own name");

    let pipes = dir.path().join("pipes");
    std::fs::create_dir(&pipes).unwrap();
    let bytes = download_into_fifo(cluster, &pipes.join("stream"), &pipes);
    assert!(bytes == data, "the FIFO in the directory carried {} bytes", bytes.len());
}

/// Makes a FIFO at `fifo`, runs `mendfs get /pipe/stream TARGET` and returns what a reader of
/// the FIFO got, once the download succeeded and left the FIFO a FIFO.
fn download_into_fifo(cluster: &Cluster, fifo: &Path, target: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileTypeExt;
    rustix::fs::mkfifoat(rustix::fs::CWD, fifo, rustix::fs::Mode::from_raw_mode(0o600)).expect("mkfifo");
    let (sender, received) = std::sync::mpsc::channel();
    let reader_path = fifo.to_path_buf();
    std::thread::spawn(move || {
        // Opening blocks until the CLI opens the other end.
        let _ = sender.send(std::fs::read(&reader_path));
    });
    let mut get = cluster.cli().args(["get", "/pipe/stream", target.to_str().unwrap()]).spawn().unwrap();
    let bytes = received.recv_timeout(DEADLINE).expect("the reader of the FIFO got to its end").unwrap();
    let status = get.wait().unwrap();
    assert!(status.success(), "get into a FIFO: {status}");
    assert!(std::fs::symlink_metadata(fifo).unwrap().file_type().is_fifo(), "the FIFO is still a FIFO");
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_larger_than_the_free_space_fails_cleanly_and_frees_the_disk() {
    if !can_mount_tmpfs() {
        eprintln!("SKIPPED: this test needs root to mount a size-capped tmpfs for the chunk stores");
        return;
    }
    let options = ClusterOptions {
        chunk_store_bytes_max: Some(8 << 20),
        ..options(&["--orphan-grace-ms", "3000", "--gc-interval-ms", "300"])
    };
    let cluster = start(options);
    let client = client_at(&cluster, cluster.endpoint_list());
    wait_until_writable(&client).await;
    client.delete_file("/.probe", None).await.unwrap();
    put(&client, "/small", content(1, CHUNK)).await.expect("a file that fits");

    let err = put(&client, "/huge", content(2, 20 * CHUNK)).await.expect_err("20 MiB cannot fit in 8 MiB");
    assert!(err.to_string().contains("disk") || err.to_string().contains("full"), "a clear error: {err}");
    let root = cluster.root().to_string_lossy().into_owned();
    assert!(!err.to_string().contains(&root), "the error names no server path: {err}");
    assert!(matches!(client.stat_file("/huge").await, Err(Error::NotFound(_))), "no partial file");
    assert!(get(&client, "/small").await.unwrap() == content(1, CHUNK), "nothing lost");
    // The copies the failed put left are collected: each node is back to the one chunk of /small.
    for id in 1..=3u64 {
        let dir = cluster.nodes[&id].data_dir.clone();
        blocking(|| {
            wait_for(&format!("node {id}'s disk to be freed"), DEADLINE, || {
                let n = chunk_files(&dir).len();
                if n == 1 {
                    Ok(Some(()))
                } else {
                    anyhow::bail!("{n} chunk files")
                }
            })
        })
        .unwrap();
    }
    // A node whose disk filled was degraded; it takes chunks again once a heartbeat reports the
    // freed room and the leader commits it up.
    let by = Instant::now() + DEADLINE;
    while let Err(e) = put(&client, "/after", content(3, 2 * CHUNK)).await {
        assert!(Instant::now() < by, "the freed space is never usable again: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(get(&client, "/after").await.unwrap() == content(3, 2 * CHUNK));
}

/// Whether this process may mount a tmpfs (root in the sandbox and on CI; not on a laptop).
fn can_mount_tmpfs() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if mounted {
        let _ = std::process::Command::new("umount").arg(dir.path()).status();
    }
    mounted
}

/// Yields `remaining` bytes of zeros, then an I/O error.
struct FailingReader {
    remaining: u64,
}

impl tokio::io::AsyncRead for FailingReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::other("the input broke")));
        }
        let n = (buf.remaining() as u64).min(self.remaining) as usize;
        buf.put_slice(&vec![0u8; n]);
        self.remaining -= n as u64;
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_only_node_joins_as_a_learner_and_receives_chunks() {
    let mut cluster = start(options(&[]));
    let client = client_at(&cluster, cluster.endpoint_list());
    wait_until_writable(&client).await;
    cluster.add_node_entry(4).unwrap();
    // A storage-only node cannot be an initial voter.
    let peers_with_4 =
        format!("1={},2={},3={},4={}", cluster.addr(1), cluster.addr(2), cluster.addr(3), cluster.addr(4));
    let refused = cluster
        .server_command(4, false)
        .unwrap()
        .args(["--peers", &peers_with_4, "--roles", "storage"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a voter"));

    let mut command = cluster.server_command(4, false).unwrap();
    command.args(["--roles", "storage"]);
    let log = mendfs_testkit::append_file(&cluster.nodes[&4].log_path).unwrap();
    let mut child = command.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    let addr = cluster.addr(4);
    let out = blocking(|| cluster.run_cli(&["cluster", "add-node", "4", &addr, "--learner"])).expect("add a learner");
    assert!(out.contains("voters: [1, 2, 3]") && out.contains("learners: [4]"), "{out}");

    // Chunks land on it once it has registered: with 4 nodes and RF=3 it gets about 3/4 of them.
    let by = Instant::now() + DEADLINE;
    let mut round = 0u32;
    loop {
        put(&client, &format!("/spread/{round}"), content(round, 4 * CHUNK)).await.unwrap();
        let info = client.stat_file(&format!("/spread/{round}")).await.unwrap();
        if info.chunks.iter().any(|c| c.replicas.contains(&4)) {
            break;
        }
        assert!(Instant::now() < by, "the storage-only node never received a chunk");
        round += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = blocking(|| cluster.status()).unwrap();
    let node4 = status["nodes"].as_array().unwrap().iter().find(|n| n["id"] == 4).cloned().unwrap();
    assert_eq!(node4["voter"], false, "{node4}");
    assert_eq!(node4["role"], "learner", "{node4}");
    // Its copies are readable through it.
    let through_4 = client_at(&cluster, vec![addr]);
    assert!(get(&through_4, &format!("/spread/{round}")).await.unwrap() == content(round, 4 * CHUNK));
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_uploads_all_complete() {
    let cluster = start(options(&[]));
    let client = client_at(&cluster, vec![cluster.addr(1)]);
    wait_until_writable(&client).await;
    // More chunks in flight than a node allows at once (24): uploads must wait for slots
    // without ever waiting on each other forever.
    let uploads: Vec<_> = (0..16u32)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { put(&client, &format!("/many/{i}"), content(i, 4 * CHUNK)).await })
        })
        .collect();
    for upload in uploads {
        tokio::time::timeout(DEADLINE, upload).await.expect("no upload hangs").unwrap().expect("put");
    }
    for i in 0..16u32 {
        assert!(get(&client, &format!("/many/{i}")).await.unwrap() == content(i, 4 * CHUNK));
    }
}

/// The leader dies after every chunk of an upload is durable and before the client ends the
/// upload: the commit meets an election. The coordinator keeps trying until a new leader takes
/// it, and the file is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_whose_commit_meets_a_leader_election_still_commits() {
    use tokio::io::AsyncWriteExt;
    let mut cluster = start(options(&[]));
    let leader = blocking(|| cluster.wait_for_leader(DEADLINE)).unwrap();
    let coordinator = (1..=3u64).find(|id| *id != leader).unwrap();
    let client = client_at(&cluster, vec![cluster.addr(coordinator)]);
    wait_until_writable(&client).await;
    let held_before: Vec<usize> = (1..=3u64).map(|id| chunk_files(&cluster.nodes[&id].data_dir).len()).collect();

    let data = content(11, 3 * CHUNK);
    let (mut input, reader) = tokio::io::duplex(64 << 10);
    let upload = {
        let client = client.clone();
        let size = data.len() as u64;
        tokio::spawn(async move { client.put_file("/elected", reader, Some(size), None, |_| {}).await })
    };
    input.write_all(&data).await.unwrap();
    // Every chunk is prepared on all three nodes before the leader dies (with it gone, no
    // new chunk could reach three copies).
    let dirs: Vec<_> = (1..=3u64).map(|id| cluster.nodes[&id].data_dir.clone()).collect();
    blocking(|| {
        wait_for("the upload's 3 chunks on every node", DEADLINE, || {
            let held: Vec<usize> = dirs.iter().map(|dir| chunk_files(dir).len()).collect();
            Ok(held.iter().zip(&held_before).all(|(now, before)| *now >= before + 3).then_some(()))
        })
    })
    .unwrap();
    blocking(|| cluster.kill(leader)).unwrap();
    drop(input);

    let reply = tokio::time::timeout(DEADLINE, upload).await.expect("the put ends").unwrap();
    let reply = reply.expect("the commit waits for the new leader instead of failing");
    assert_eq!(reply.size, 3 * CHUNK as u64);
    let new_leader = blocking(|| cluster.wait_for_leader(DEADLINE)).unwrap();
    assert_ne!(new_leader, leader);
    assert!(get(&client, "/elected").await.unwrap() == data, "the file is whole");
}

/// A new user's first put, sent the moment the cluster has a leader (before the storage nodes
/// may have registered), waits for them instead of failing; `/readyz` then says ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_put_on_a_fresh_cluster_waits_for_the_storage_nodes() {
    let http = format!("127.0.0.1:{}", mendfs_testkit::free_port().unwrap());
    let mut options = options(&[]);
    options.node_args.insert(1, vec!["--http".to_string(), http.clone()]);
    let cluster = blocking(|| start(options));
    let client = client_at(&cluster, cluster.endpoint_list());
    let data = content(7, 3 * CHUNK + 5);
    let reply = put(&client, "/first", data.clone()).await.expect("the first put succeeds");
    assert_eq!(reply.size, data.len() as u64);
    assert_eq!(get(&client, "/first").await.unwrap(), data);
    let ready = blocking(|| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&http).unwrap();
        write!(stream, "GET /readyz HTTP/1.0\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    });
    assert!(ready.starts_with("HTTP/1.0 200") || ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains("\"storage_nodes\":3"), "{ready}");
}

/// Chunk size of the big-file test: tiny, so that a file of hundreds of thousands of chunks is
/// only tens of MB.
const SMALL_CHUNK: usize = 64;

/// Streams `n_chunks` chunks of `SMALL_CHUNK` bytes, chunk `i` being distinct chunk
/// `i % distinct` (`stamped_bytes` of that stamp), without ever holding the file.
struct PatternReader {
    next_chunk: u64,
    n_chunks: u64,
    distinct: u64,
    /// The unread rest of the chunk being read.
    pending: Vec<u8>,
}

impl tokio::io::AsyncRead for PatternReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while buf.remaining() > 0 {
            if self.pending.is_empty() {
                if self.next_chunk == self.n_chunks {
                    break;
                }
                let stamp = (self.next_chunk % self.distinct) as u32;
                self.pending = content(stamp, SMALL_CHUNK);
                self.next_chunk += 1;
            }
            let n = buf.remaining().min(self.pending.len());
            buf.put_slice(&self.pending[..n]);
            self.pending.drain(..n);
        }
        std::task::Poll::Ready(Ok(()))
    }
}

/// Hashes and counts what is written to it, holding none of it.
#[derive(Default)]
struct HashingWriter {
    hasher: blake3::Hasher,
    len: u64,
}

impl tokio::io::AsyncWrite for HashingWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
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

/// Waits (up to `deadline`) until the leader's latest repair scan counts `n` chunk records.
fn wait_for_chunk_records(cluster: &Cluster, what: &str, n: u64, deadline: Duration) {
    blocking(|| {
        wait_for(what, deadline, || {
            let status = cluster.status()?;
            match status["chunks"].as_u64() {
                Some(counted) if counted == n => Ok(Some(())),
                counted => anyhow::bail!("{counted:?} chunk records"),
            }
        })
    })
    .unwrap();
}

/// Files of any size (issue 13): a file of 420,000 chunks, whose chunk list no message and no
/// Raft entry could hold whole (it was once one `FileInfo` under a 16 MiB cap, and one
/// `CommitFile`), is put (its list staged in segments), stat'ed (the chunk count, and the list
/// paged through to the end), listed, read back byte for byte (BLAKE3 end to end), and
/// deleted, after which none of its chunks is referenced.
///
/// The content is a repeating pattern of 4,096 distinct 64-byte chunks. Identical chunks all
/// the way would test the chunk list (one entry per chunk, in segments and pages) but store
/// and read one chunk; 420,000 distinct chunks would make the test mostly 1.3 million tiny
/// fsyncs (about 150 chunks a second on a busy 2-core machine: tens of minutes). The pattern
/// keeps every chunk-list entry real and every read real (each of the 420,000 chunks is read
/// from a chunk store and verified), stores and prepares each distinct chunk once (the rest go
/// into the list as repeats: several per segment, and across segments), and makes each chunk
/// record count about a hundred references, which the delete must drop to zero.
///
/// Raft gets a 100 ms heartbeat and a 1 s election timeout: the test is about file size, and on
/// a loaded machine the default 50 ms deadlines would add leader changes it does not need
/// (which puts survive anyway, by retrying). Measured on a shared 2-core machine under load
/// (load average 8-10): put 63 s, stat and 52 pages 7 s, get 85 s, delete until unreferenced
/// 35 s; about 3.5 min in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_420_000_chunks_is_put_stated_read_back_and_deleted() {
    const N_CHUNKS: u64 = 420_000;
    const DISTINCT: u64 = 4_096;
    /// For the waits on the leader's scans and on the release of 420,000 references.
    const SLOW_DEADLINE: Duration = Duration::from_secs(300);
    let size = N_CHUNKS * SMALL_CHUNK as u64;
    let cluster = start(ClusterOptions {
        server_args: [
            "--chunk-size-bytes",
            &SMALL_CHUNK.to_string(),
            "--heartbeat-interval-ms",
            "100",
            "--election-timeout-ms",
            "1000",
        ]
        .map(String::from)
        .to_vec(),
        ..ClusterOptions::default()
    });
    let client = client_at(&cluster, cluster.endpoint_list());
    wait_until_writable(&client).await;
    client.delete_file("/.probe", None).await.unwrap();
    wait_for_chunk_records(&cluster, "no chunk record left from the probe", 0, SLOW_DEADLINE);

    let started = Instant::now();
    let reader = PatternReader { next_chunk: 0, n_chunks: N_CHUNKS, distinct: DISTINCT, pending: Vec::new() };
    let reply = client.put_file("/big", reader, Some(size), None, |_| {}).await.expect("put");
    let put_time = started.elapsed();
    assert_eq!((reply.size, reply.chunks), (size, N_CHUNKS));
    let mut expected = blake3::Hasher::new();
    for i in 0..N_CHUNKS {
        expected.update(&content((i % DISTINCT) as u32, SMALL_CHUNK));
    }
    assert_eq!(reply.content_hash, expected.finalize().as_bytes().to_vec());

    let started = Instant::now();
    let info = client.stat_file("/big").await.expect("stat");
    assert_eq!((info.size, info.n_chunks, info.version), (size, N_CHUNKS, 1));
    assert!((info.chunks.len() as u64) < N_CHUNKS, "a stat answers with the first page only");
    let mut index = 0u64;
    let mut check = |page: &[mendfs_client::ChunkInfo]| {
        for chunk in page {
            let data = content((index % DISTINCT) as u32, SMALL_CHUNK);
            assert_eq!(chunk.hash, blake3::hash(&data).as_bytes().to_vec(), "chunk {index}");
            assert_eq!(chunk.replicas.len(), 3, "chunk {index}");
            index += 1;
        }
    };
    check(&info.chunks);
    let mut pages = client.chunk_pages(&info, info.chunks.len() as u64);
    let mut n_pages = 1;
    while let Some(page) = pages.next_page().await.expect("a chunk page") {
        check(&page);
        n_pages += 1;
    }
    assert_eq!(index, N_CHUNKS, "the pages list every chunk once");
    let stat_time = started.elapsed();
    let (listed, _) = client.list_files("/big", 0).await.unwrap();
    assert_eq!((listed.len(), listed[0].n_chunks, listed[0].chunks.len()), (1, N_CHUNKS, 0), "ls: a summary");

    let started = Instant::now();
    let mut back = HashingWriter::default();
    let got = client.get_file("/big", &mut back, |_, _| {}).await.expect("get");
    let get_time = started.elapsed();
    assert_eq!(back.len, size);
    assert_eq!(back.hasher.finalize().as_bytes().to_vec(), got.content_hash, "read back byte for byte");
    assert_eq!(got.content_hash, reply.content_hash);

    // One record per distinct chunk, each referenced about a hundred times.
    wait_for_chunk_records(&cluster, "a record per distinct chunk", DISTINCT, SLOW_DEADLINE);
    let started = Instant::now();
    client.delete_file("/big", None).await.expect("delete");
    assert!(matches!(client.stat_file("/big").await, Err(Error::NotFound(_))));
    wait_for_chunk_records(&cluster, "every chunk of the file to be unreferenced", 0, SLOW_DEADLINE);
    let delete_time = started.elapsed();
    eprintln!(
        "{N_CHUNKS} chunks: put {put_time:.1?}, stat and {n_pages} pages {stat_time:.1?}, get {get_time:.1?}, \
         delete until unreferenced {delete_time:.1?}"
    );
}

/// Yields `chunks` chunks of the pattern `PatternReader` makes, then waits forever: an upload
/// whose client stalls midway.
struct StallingReader(PatternReader);

impl tokio::io::AsyncRead for StallingReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let inner = std::pin::Pin::new(&mut self.0);
        match inner.poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) if buf.filled().len() == before => std::task::Poll::Pending,
            other => other,
        }
    }
}

/// A big upload that never commits gives back what it staged: at once when its client goes
/// away (the coordinator aborts it), and after the grace period when its coordinator dies (the
/// upload expires by the replicated clock, and the new leader releases it). Also the CLI's
/// `stat --json` and `ls --json` of a file that spans pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_big_upload_gives_back_its_staged_segments() {
    const DISTINCT: u64 = 16;
    // Long enough for a segment's new chunks to be prepared on a loaded machine.
    let grace_ms = 8_000;
    let cluster = start(ClusterOptions {
        server_args: [
            "--chunk-size-bytes",
            &SMALL_CHUNK.to_string(),
            "--orphan-grace-ms",
            &grace_ms.to_string(),
            "--heartbeat-interval-ms",
            "100",
            "--election-timeout-ms",
            "1000",
        ]
        .map(String::from)
        .to_vec(),
        ..ClusterOptions::default()
    });
    let client = client_at(&cluster, cluster.endpoint_list());
    wait_until_writable(&client).await;
    client.delete_file("/.probe", None).await.unwrap();

    // The CLI pages through a file of 20,000 chunks (three pages).
    let n_chunks = 20_000;
    let reader = PatternReader { next_chunk: 0, n_chunks, distinct: 50, pending: Vec::new() };
    client.put_file("/pages", reader, Some(n_chunks * SMALL_CHUNK as u64), None, |_| {}).await.unwrap();
    let stat: serde_json::Value =
        serde_json::from_str(&cluster.run_cli(&["stat", "/pages", "--json"]).unwrap()).unwrap();
    assert_eq!(stat["n_chunks"], n_chunks);
    assert_eq!(stat["chunks"].as_array().map(Vec::len), Some(n_chunks as usize), "every chunk, a page at a time");
    assert_eq!(stat["chunks"][19_999]["hash"], hex(blake3::hash(&content(49, SMALL_CHUNK)).as_bytes()));
    let ls: serde_json::Value = serde_json::from_str(&cluster.run_cli(&["ls", "/", "--json"]).unwrap()).unwrap();
    assert_eq!(ls["files"][0]["n_chunks"], n_chunks);
    assert!(ls["files"][0].get("chunks").is_none(), "ls lists summaries");
    client.delete_file("/pages", None).await.unwrap();
    wait_for_chunk_records(&cluster, "the paged file's chunks to be unreferenced", 0, DEADLINE);

    // A client that stalls after two full segments, then goes away: the staged segments are
    // referenced while the upload lives, and released as soon as the coordinator gives up.
    let stalled =
        |n_chunks| StallingReader(PatternReader { next_chunk: 0, n_chunks, distinct: DISTINCT, pending: Vec::new() });
    let upload = {
        let client = client_at(&cluster, vec![cluster.addr(1)]);
        tokio::spawn(async move { client.put_file("/never", stalled(20_000), None, None, |_| {}).await })
    };
    wait_for_chunk_records(&cluster, "the staged segments' chunks to be referenced", DISTINCT, DEADLINE);
    upload.abort();
    let started = Instant::now();
    wait_for_chunk_records(&cluster, "the aborted upload's chunks to be unreferenced", 0, DEADLINE);
    let aborted_after = started.elapsed();

    // The same, but the coordinator dies: nobody aborts, the upload expires after its grace.
    let client_of_2 = client_at(&cluster, vec![cluster.addr(2)]);
    let upload_started = Instant::now();
    let upload = tokio::spawn(async move { client_of_2.put_file("/never", stalled(20_000), None, None, |_| {}).await });
    wait_for_chunk_records(&cluster, "the staged segments' chunks to be referenced", DISTINCT, DEADLINE);
    let mut cluster = cluster;
    cluster.kill(2).unwrap();
    let started = Instant::now();
    wait_for_chunk_records(&cluster, "the expired upload's chunks to be unreferenced", 0, DEADLINE);
    let expired_after = started.elapsed();
    // It expires a grace period after its last segment, which came after the upload began.
    let lived = upload_started.elapsed();
    assert!(lived >= Duration::from_millis(grace_ms), "released {lived:?} after it began: before it expired");
    assert!(upload.await.unwrap().is_err(), "the upload never committed");
    assert!(matches!(client.stat_file("/never").await, Err(Error::NotFound(_))));
    eprintln!("released {aborted_after:.1?} after the abort, {expired_after:.1?} after the coordinator died");
}
