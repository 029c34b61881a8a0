//! The S3 gateway under crashes, against real `mendfs server` processes and the AWS CLI: the
//! node serving a single-part PUT or a multipart upload is SIGKILLed mid-upload (the old
//! version stays, whole, and nothing partial is listed or readable, before and after it comes
//! back), and a storage node is SIGKILLed while objects are read (every read succeeds and
//! matches, through detection and repair).
//!
//! Every S3 call is an `aws` subprocess with one attempt (`AWS_MAX_ATTEMPTS=1`), so a failed
//! request fails the test instead of being retried away; only a 503 ServiceUnavailable (no
//! metadata leader for a moment) is retried, by the test, and counted. Needs the AWS CLI
//! (`pip install -r crates/mendfs/tests/s3/requirements.txt`; `.ci/run` does).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mendfs_testkit::{chunk_files, free_port, stamped_bytes, wait_for, Cluster, ClusterOptions};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;
/// The big upload the serving node dies in: far longer than the few chunks the test waits for.
const BIG_MIB: u32 = 256;
const BUCKET: &str = "crash";
const KEY: &str = "dir/object.bin";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

/// The value of `export NAME=VALUE` in a command's output.
fn exported(output: &str, name: &str) -> String {
    let prefix = format!("export {name}=");
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix(&prefix))
        .map(|value| value.trim_matches('\'').trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no `export {name}=` in:\n{output}"))
}

/// A cluster whose voters 1-3 serve S3, an access key that may create buckets, and the bucket.
struct S3Cluster {
    cluster: Cluster,
    endpoints: BTreeMap<u64, String>,
    key_id: String,
    secret: String,
    /// The 503 answers [`S3Cluster::aws_ok`] retried.
    unavailable: std::sync::atomic::AtomicUsize,
}

impl S3Cluster {
    fn start(server_args: &[&str]) -> Self {
        let mut node_args = BTreeMap::new();
        let mut endpoints = BTreeMap::new();
        for id in 1..=3u64 {
            let addr = format!("127.0.0.1:{}", free_port().unwrap());
            endpoints.insert(id, format!("http://{addr}"));
            node_args.insert(id, vec!["--s3".to_string(), addr]);
        }
        let server_args = server_args.iter().map(|s| s.to_string()).collect();
        let options = ClusterOptions { server_args, node_args, ..ClusterOptions::default() };
        let cluster = Cluster::start(binary(), options).expect("start cluster");
        cluster.wait_for_leader(DEADLINE).expect("a leader");
        let created = cluster.run_cli(&["s3", "key", "create", "crash-tests", "--create-buckets"]).unwrap();
        let s3 = Self {
            key_id: exported(&created, "AWS_ACCESS_KEY_ID"),
            secret: exported(&created, "AWS_SECRET_ACCESS_KEY"),
            cluster,
            endpoints,
            unavailable: Default::default(),
        };
        s3.aws_ok(1, &["s3api", "create-bucket", "--bucket", BUCKET]);
        s3
    }

    fn report(&self, test: &str) {
        println!("{test}: {} requests answered 503 ServiceUnavailable and were retried", {
            self.unavailable.load(std::sync::atomic::Ordering::Relaxed)
        });
    }

    fn root(&self) -> &Path {
        self.cluster.root()
    }

    /// An `aws` command aimed at node `node`'s S3 endpoint, with one attempt per request and
    /// nothing of the machine's own AWS setup.
    fn aws(&self, node: u64, args: &[&str]) -> Command {
        let mut command = Command::new("aws");
        command
            .args(args)
            .env("AWS_ENDPOINT_URL", &self.endpoints[&node])
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", self.root().join("no-aws-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", self.root().join("no-aws-credentials"))
            .env("AWS_RETRY_MODE", "standard")
            .env("AWS_MAX_ATTEMPTS", "1")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .stdin(Stdio::null());
        command
    }

    /// Runs `aws ARGS` against node `node`: its stdout, or its exit status and stderr.
    fn aws_run(&self, node: u64, args: &[&str]) -> Result<String, String> {
        let output = self.aws(node, args).output().expect("run aws");
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!("aws {} via node {node}: {}: {}", args.join(" "), output.status, {
                String::from_utf8_lossy(&output.stderr).trim().to_string()
            }))
        }
    }

    /// Runs `aws ARGS` against node `node` and fails the test unless it succeeds. A 503
    /// ServiceUnavailable (the metadata had no leader for a moment: on a loaded machine its
    /// heartbeats time out now and then) is retried, as every S3 client does, up to 20 times
    /// in 60 s, and counted; any other failure fails at once.
    fn aws_ok(&self, node: u64, args: &[&str]) -> String {
        let by = Instant::now() + Duration::from_secs(60);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.aws_run(node, args) {
                Ok(out) => return out,
                Err(e) if only_unavailable(&e) && attempt < 20 && Instant::now() < by => {
                    self.unavailable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("{e}\nnode {node}'s log tail:\n{}", self.log_tail(node)),
            }
        }
    }

    fn aws_json(&self, node: u64, args: &[&str]) -> Value {
        let out = self.aws_ok(node, args);
        if out.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("aws {} printed no JSON ({e}): {out}", args.join(" ")))
    }

    /// Waits until node `node` answers S3 requests (after a start, or a leader change).
    fn wait_serving(&self, node: u64) {
        wait_for(&format!("node {node} serves S3"), DEADLINE, || {
            self.aws_run(node, &["s3api", "head-bucket", "--bucket", BUCKET]).map(Some).map_err(anyhow::Error::msg)
        })
        .unwrap_or_else(|e| panic!("{e}\nnode {node}'s log tail:\n{}", self.log_tail(node)));
    }

    fn log_tail(&self, node: u64) -> String {
        self.cluster.log_tail(node, 40)
    }

    fn total_chunk_files(&self) -> usize {
        self.cluster.nodes.values().map(|node| chunk_files(&node.data_dir).len()).sum()
    }

    /// Puts `path` as KEY through node 1 with one PUT; returns the ETag.
    fn put_object(&self, path: &Path) -> String {
        let reply = self
            .aws_json(1, &["s3api", "put-object", "--bucket", BUCKET, "--key", KEY, "--body", path.to_str().unwrap()]);
        reply["ETag"].as_str().unwrap_or_else(|| panic!("no ETag in {reply}")).to_string()
    }

    /// Through node `node`: KEY is exactly `old` (size, ETag, bytes) and the only key listed.
    fn assert_only_old_version(&self, node: u64, old: &[u8], old_etag: &str) {
        let head = self.aws_json(node, &["s3api", "head-object", "--bucket", BUCKET, "--key", KEY]);
        assert_eq!(head["ContentLength"].as_u64(), Some(old.len() as u64), "via node {node}: {head}");
        assert_eq!(head["ETag"].as_str(), Some(old_etag), "via node {node}: {head}");
        let back = self.root().join(format!("read-back-via-{node}"));
        let _ = std::fs::remove_file(&back);
        let reply =
            self.aws_json(node, &["s3api", "get-object", "--bucket", BUCKET, "--key", KEY, back.to_str().unwrap()]);
        assert_eq!(reply["ETag"].as_str(), Some(old_etag), "via node {node}: {reply}");
        assert!(
            std::fs::read(&back).unwrap() == old,
            "via node {node}: {KEY} read back other bytes than the old version"
        );
        let listing = self.aws_json(node, &["s3api", "list-objects-v2", "--bucket", BUCKET]);
        let listed: Vec<(String, u64)> = listing["Contents"]
            .as_array()
            .map(|objects| {
                objects
                    .iter()
                    .map(|o| (o["Key"].as_str().unwrap_or_default().to_string(), o["Size"].as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(listed, vec![(KEY.to_string(), old.len() as u64)], "via node {node}: {listing}");
    }

    /// The multipart uploads listed in BUCKET, as (key, upload id).
    fn multipart_uploads(&self, node: u64) -> Vec<(String, String)> {
        let listing = self.aws_json(node, &["s3api", "list-multipart-uploads", "--bucket", BUCKET]);
        listing["Uploads"]
            .as_array()
            .map(|uploads| {
                uploads
                    .iter()
                    .map(|u| {
                        (u["Key"].as_str().unwrap_or_default().to_string(), u["UploadId"].as_str().unwrap().to_string())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Whether every error an `aws` command reported is a 503 ServiceUnavailable.
fn only_unavailable(stderr: &str) -> bool {
    let errors = stderr.matches("An error occurred (").count();
    errors > 0 && errors == stderr.matches("An error occurred (ServiceUnavailable)").count()
}

/// A child process (an `aws` upload) killed on drop if it still runs, so a failing test
/// leaves nothing behind.
struct Background {
    child: Child,
    what: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Background {
    fn spawn(mut command: Command, what: &str, dir: &Path) -> Self {
        let name = what.replace(' ', "-");
        let (stdout, stderr) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
        let child = command
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        Self { child, what: what.to_string(), stdout, stderr }
    }

    fn output(&self) -> String {
        let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
        format!("stdout:\n{}\nstderr:\n{}", read(&self.stdout), read(&self.stderr))
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits (bounded) for the process to end; its exit status.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let what = self.what.clone();
        let child = &mut self.child;
        wait_for(&format!("{what} to end"), DEADLINE, || Ok(child.try_wait()?)).unwrap()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Writes `mib` MiB of distinct deterministic content to `path`; returns its blake3 hash.
fn write_big_file(path: &Path, first_stamp: u32, mib: u32) -> blake3::Hash {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut hasher = blake3::Hasher::new();
    for block in 0..mib {
        let bytes = stamped_bytes(first_stamp + block, 0, MIB);
        hasher.update(&bytes);
        file.write_all(&bytes).unwrap();
    }
    file.flush().unwrap();
    hasher.finalize()
}

fn hash_file(path: &Path) -> blake3::Hash {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; MIB];
    loop {
        let read = file.read(&mut buffer).unwrap();
        if read == 0 {
            return hasher.finalize();
        }
        hasher.update(&buffer[..read]);
    }
}

/// Starts `command` (an upload through node 2) and SIGKILLs node 2 once the upload is really
/// under way: the nodes' chunk stores hold several chunks more than before it, and the client
/// still runs. Returns once the client has ended, which it must have done with a failure.
fn kill_node_2_mid_upload(s3: &mut S3Cluster, command: Command, what: &str) {
    let before = s3.total_chunk_files();
    let mut upload = Background::spawn(command, what, s3.root());
    // Twelve chunk files: at least four of the 4 MiB chunks at three copies, of 64 in all.
    let grown = wait_for(&format!("{what} under way"), DEADLINE, || {
        if !upload.is_running() {
            panic!("{what} ended before node 2 was killed: {}", upload.output());
        }
        let now = s3.total_chunk_files();
        Ok((now >= before + 12).then_some(now))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\nnode 2's log tail:\n{}", upload.output(), s3.log_tail(2)));
    assert!(upload.is_running(), "{what} ended before node 2 was killed: {}", upload.output());
    s3.cluster.kill(2).unwrap();
    println!("{what}: node 2 killed with {} new chunk files on disk", grown - before);
    let status = upload.wait_exit();
    assert!(!status.success(), "{what} succeeded although node 2 died under it: {}", upload.output());
}

#[test]
fn a_put_whose_serving_node_is_killed_mid_upload_leaves_the_old_version() {
    // A short orphan grace, so the dead upload's chunk copies are collected within the test.
    let mut s3 = S3Cluster::start(&["--orphan-grace-ms", "15000", "--gc-interval-ms", "1000"]);
    let old = stamped_bytes(1, 0, MIB + 4321);
    let old_path = s3.root().join("old.bin");
    std::fs::write(&old_path, &old).unwrap();
    let old_etag = s3.put_object(&old_path);
    s3.assert_only_old_version(1, &old, &old_etag);
    let old_chunk_files = s3.total_chunk_files();

    let big = s3.root().join("big.bin");
    write_big_file(&big, 1_000, BIG_MIB);
    let put = s3.aws(2, &["s3api", "put-object", "--bucket", BUCKET, "--key", KEY, "--body", big.to_str().unwrap()]);
    kill_node_2_mid_upload(&mut s3, put, "put-object via node 2");

    // Node 1 may need a new leader (node 2 may have led) before it answers.
    s3.wait_serving(1);
    s3.assert_only_old_version(1, &old, &old_etag);
    assert_eq!(s3.multipart_uploads(1), vec![], "a single PUT leaves no upload behind");

    s3.cluster.restart(2).unwrap();
    s3.wait_serving(2);
    for node in [1, 2] {
        s3.assert_only_old_version(node, &old, &old_etag);
    }
    // The dead PUT's chunk copies are orphans, collected once their grace has passed.
    wait_for("the dead PUT's chunk copies are collected", DEADLINE, || {
        Ok((s3.total_chunk_files() == old_chunk_files).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {} chunk files, {old_chunk_files} before", s3.total_chunk_files()));
    s3.assert_only_old_version(2, &old, &old_etag);
    s3.report("single PUT");
}

#[test]
fn a_multipart_upload_whose_serving_node_is_killed_leaves_the_old_version_and_can_be_aborted() {
    let mut s3 = S3Cluster::start(&[]);
    let old = stamped_bytes(2, 0, 3 * MIB + 17);
    let old_path = s3.root().join("old.bin");
    std::fs::write(&old_path, &old).unwrap();
    let old_etag = s3.put_object(&old_path);

    let big = s3.root().join("big.bin");
    let big_hash = write_big_file(&big, 2_000, BIG_MIB);
    let target = format!("s3://{BUCKET}/{KEY}");
    // `aws s3 cp` uploads a file over 8 MiB in 8 MiB parts, ten at a time.
    let cp = s3.aws(2, &["s3", "cp", big.to_str().unwrap(), &target, "--no-progress"]);
    kill_node_2_mid_upload(&mut s3, cp, "s3 cp via node 2");

    s3.wait_serving(1);
    s3.assert_only_old_version(1, &old, &old_etag);
    // The abandoned upload may be listed (the client's abort went to the dead node), but only
    // as an upload of KEY.
    let abandoned = s3.multipart_uploads(1);
    println!("uploads listed after the kill: {abandoned:?}");
    assert!(abandoned.len() <= 1, "one upload was started: {abandoned:?}");
    assert!(abandoned.iter().all(|(key, _)| key == KEY), "{abandoned:?}");

    s3.cluster.restart(2).unwrap();
    s3.wait_serving(2);
    for node in [1, 2] {
        s3.assert_only_old_version(node, &old, &old_etag);
    }
    assert_eq!(s3.multipart_uploads(2), abandoned, "node 2 lists the same uploads");
    for (key, upload_id) in &abandoned {
        s3.aws_ok(1, &["s3api", "abort-multipart-upload", "--bucket", BUCKET, "--key", key, "--upload-id", upload_id]);
    }
    assert_eq!(s3.multipart_uploads(1), vec![], "aborted uploads are gone");
    s3.assert_only_old_version(2, &old, &old_etag);

    // A fresh upload of the same file through node 1 completes and reads back whole.
    s3.aws_ok(1, &["s3", "cp", big.to_str().unwrap(), &target, "--no-progress"]);
    let head = s3.aws_json(1, &["s3api", "head-object", "--bucket", BUCKET, "--key", KEY]);
    assert_eq!(head["ContentLength"].as_u64(), Some(u64::from(BIG_MIB) * MIB as u64), "{head}");
    for node in [2, 1] {
        let back = s3.root().join(format!("big-back-via-{node}.bin"));
        s3.aws_ok(node, &["s3", "cp", &target, back.to_str().unwrap(), "--no-progress"]);
        assert_eq!(hash_file(&back), big_hash, "the big object read back through node {node} differs");
        std::fs::remove_file(&back).unwrap();
    }
    assert_eq!(s3.multipart_uploads(1), vec![], "the completed upload is not listed");
    s3.report("multipart");
}

fn node(status: &Value, id: u64) -> Value {
    status["nodes"].as_array().and_then(|nodes| nodes.iter().find(|n| n["id"] == id).cloned()).unwrap_or(Value::Null)
}

fn u64_of(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

/// A status with the leader's liveness view, if one is to be had right now.
fn leader_status(cluster: &Cluster) -> Option<Value> {
    cluster.status().ok().filter(|status| status["health_error"].is_null())
}

/// Polls `cluster status --json` until `check` holds; returns that status.
fn wait_status(cluster: &Cluster, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, DEADLINE, || Ok(leader_status(cluster).filter(|status| check(status)))).unwrap_or_else(|e| {
        let last = cluster.status().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        panic!("{e}\nlast status: {last}")
    })
}

/// Node 3 is down and its copies have been re-created on the other nodes.
fn repaired(status: &Value, chunks: u64) -> bool {
    node(status, 3)["state"] == "down"
        && u64_of(&status["chunks"]) == chunks
        && u64_of(&status["under_replicated_chunks"]) == 0
        && u64_of(&node(status, 3)["chunks"]) == 0
}

/// Downloads every object under `objs/` through node `node` into a fresh directory with
/// `aws s3 sync` and checks each against `objects`. (`sync`, so a retry after a 503 fetches
/// only the objects that answered 503.)
fn read_all(s3: &S3Cluster, node: u64, objects: &BTreeMap<String, Vec<u8>>, round: usize) {
    let dir = s3.root().join(format!("read-{round}-via-{node}"));
    s3.aws_ok(node, &["s3", "sync", &format!("s3://{BUCKET}/objs/"), dir.to_str().unwrap(), "--no-progress"]);
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(found, objects.keys().cloned().collect::<Vec<_>>(), "round {round} via node {node}");
    for (name, bytes) in objects {
        assert!(std::fs::read(dir.join(name)).unwrap() == *bytes, "round {round}: {name} read via node {node} differs");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn objects_stay_readable_while_a_storage_node_is_killed_and_repaired() {
    const CHUNK: usize = MIB;
    // 1 MiB chunks, so every object spans several; a fast detector and unthrottled repair.
    let chunk_size = CHUNK.to_string();
    let mut s3 = S3Cluster::start(&[
        "--chunk-size-bytes",
        &chunk_size,
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
    ]);
    // A storage-only fourth node, so node 3's copies have somewhere to go.
    s3.cluster.add_storage_learner(4).unwrap();
    wait_status(&s3.cluster, "all four storage nodes up", |s| {
        (1..=4).all(|id| node(s, id)["storage"] == true && node(s, id)["state"] == "up")
    });

    let source = s3.root().join("objs");
    std::fs::create_dir(&source).unwrap();
    let mut objects = BTreeMap::new();
    for i in 0..20u32 {
        let bytes = stamped_bytes(3_000 + i, 0, 3 * MIB + i as usize * 1_000);
        let name = format!("object-{i:02}.bin");
        std::fs::write(source.join(&name), &bytes).unwrap();
        objects.insert(name, bytes);
    }
    let chunks: u64 = objects.values().map(|bytes| bytes.len().div_ceil(CHUNK) as u64).sum();
    let source_arg = format!("{}/", source.display());
    s3.aws_ok(1, &["s3", "cp", &source_arg, &format!("s3://{BUCKET}/objs/"), "--recursive", "--no-progress"]);
    let status = wait_status(&s3.cluster, "every chunk fully replicated", |s| {
        u64_of(&s["chunks"]) == chunks && u64_of(&s["under_replicated_chunks"]) == 0
    });
    assert!(u64_of(&node(&status, 3)["chunks"]) > 0, "node 3 holds copies: {status}");

    s3.cluster.kill(3).unwrap();
    let killed_at = Instant::now();
    // Read everything through nodes 1 and 2, round after round, while node 3 is detected and
    // repaired: until the repair is seen done, at most 30 rounds or 60 s.
    let mut rounds = 0;
    let mut repair_seen = None;
    while rounds < 30 {
        for via in [1, 2] {
            read_all(&s3, via, &objects, rounds);
        }
        rounds += 1;
        if repair_seen.is_none() && leader_status(&s3.cluster).is_some_and(|s| repaired(&s, chunks)) {
            repair_seen = Some(rounds);
        }
        if repair_seen.is_some() || killed_at.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    println!("{rounds} rounds of reads in {:?} after the kill; repair seen done after round {repair_seen:?}", {
        killed_at.elapsed()
    });
    let status = wait_status(&s3.cluster, "node 3 down and its copies repaired", |s| repaired(s, chunks));
    assert_eq!(u64_of(&status["lost_chunks"]), 0, "{status}");
    assert!(status["repair"]["job_id"].as_u64().is_some(), "a repair job was recorded: {status}");
    for via in [1, 2] {
        read_all(&s3, via, &objects, rounds);
    }
    s3.report("reads");
}
