//! The workloads: clients that run operations against the cluster one at a time and record
//! each in the history with its invocation and completion times.
//!
//! Whether a failed operation happened matters to the checkers: an error the cluster gives
//! before anything is proposed (a refused CAS, a missing file, a bad argument) is a definite
//! failure; a timeout or an internal error may come after the write was applied, so the
//! operation is recorded as unknown and the checker considers both ways.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mendfs_client::{Client, Error};
use serde::{Deserialize, Serialize};

use crate::history::{Call, Micros, Operation, Outcome, Returned, Versioned, S3_SUBJECT_PREFIX};
use crate::s3_client::{Answer, Connection, Signer};
use crate::schedule::SplitMix64;

/// A workload, as named in `--workloads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    Kv,
    Lock,
    Files,
    S3,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 4] = [WorkloadKind::Kv, WorkloadKind::Lock, WorkloadKind::Files, WorkloadKind::S3];

    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Kv => "kv",
            WorkloadKind::Lock => "lock",
            WorkloadKind::Files => "files",
            WorkloadKind::S3 => "s3",
        }
    }

    pub fn parse_list(list: &str) -> Result<Vec<WorkloadKind>, String> {
        let mut kinds = Vec::new();
        for name in list.split(',').map(str::trim).filter(|name| !name.is_empty()) {
            let group: Vec<WorkloadKind> = match name {
                "all" => WorkloadKind::ALL.to_vec(),
                other => match WorkloadKind::ALL.iter().find(|kind| kind.name() == other) {
                    Some(kind) => vec![*kind],
                    None => return Err(format!("unknown workload {other:?}: use all, kv, lock, files or s3")),
                },
            };
            for kind in group {
                if !kinds.contains(&kind) {
                    kinds.push(kind);
                }
            }
        }
        if kinds.is_empty() {
            return Err("no workloads named".into());
        }
        kinds.sort();
        Ok(kinds)
    }
}

/// The run's history as it is recorded, shared by every workload client.
pub struct Recorder {
    started: Instant,
    next_id: AtomicU64,
    operations: Mutex<Vec<Operation>>,
}

impl Recorder {
    pub fn new(started: Instant) -> Arc<Self> {
        Arc::new(Self { started, next_id: AtomicU64::new(0), operations: Mutex::new(Vec::new()) })
    }

    pub fn now_us(&self) -> Micros {
        self.started.elapsed().as_micros() as Micros
    }

    /// Runs one operation and records it.
    pub async fn record<F>(&self, client: u64, call: Call, run: F) -> Outcome
    where
        F: std::future::Future<Output = Outcome>,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let invoked_us = self.now_us();
        let outcome = run.await;
        let completed_us = self.now_us();
        let operation = Operation { id, client, invoked_us, completed_us, call, outcome: outcome.clone() };
        if let Ok(mut operations) = self.operations.lock() {
            operations.push(operation);
        }
        outcome
    }

    /// The history so far, in invocation order.
    pub fn history(&self) -> Vec<Operation> {
        let mut operations = self.operations.lock().map(|ops| ops.clone()).unwrap_or_default();
        operations.sort_by_key(|op| op.id);
        operations
    }
}

/// Whether `error` proves the operation did not take effect.
fn is_definite(error: &Error) -> bool {
    matches!(
        error,
        Error::KeyExists { .. }
            | Error::VersionMismatch { .. }
            | Error::SessionNotFound(_)
            | Error::NotFound(_)
            | Error::AlreadyExists(_)
            | Error::InvalidArgument(_)
            | Error::Unauthenticated(_)
            | Error::PermissionDenied(_)
            | Error::Compacted(_)
            | Error::Config(_)
    )
}

fn failed(error: &Error) -> Outcome {
    if is_definite(error) {
        Outcome::Failed { error: error.to_string() }
    } else {
        Outcome::Unknown { error: error.to_string() }
    }
}

fn ok(returned: Returned) -> Outcome {
    Outcome::Ok { returned }
}

/// What every workload client shares.
#[derive(Clone)]
pub struct WorkloadContext {
    pub recorder: Arc<Recorder>,
    /// Workload clients stop starting operations at this instant.
    pub stop_at: Instant,
    pub seed: u64,
}

/// Coordination keys the kv workload uses: few, so operations contend.
pub fn kv_keys() -> Vec<String> {
    (0..6).map(|i| format!("chaos/kv/{i}")).collect()
}

/// File paths the files workload uses.
pub fn file_paths() -> Vec<String> {
    (0..6).map(|i| format!("/chaos/file-{i}")).collect()
}

/// The lock the lock workload's clients contend for.
pub const LOCK_NAME: &str = "chaos";

/// One kv client: reads, writes and compare-and-sets on a few keys, until `stop_at`. Values
/// are unique in the run (client id in the high bits), so a read names the write it saw.
pub async fn run_kv_client(context: WorkloadContext, client_id: u64, client: Client) {
    let mut random = SplitMix64::new(context.seed ^ (client_id << 32) ^ 0x6b76);
    let keys = kv_keys();
    let mut last_version = vec![0u64; keys.len()];
    let mut written = 0u64;
    while Instant::now() < context.stop_at {
        let index = random.below(keys.len() as u64) as usize;
        let key = keys[index].clone();
        match random.below(4) {
            0 | 1 => {
                let outcome = context
                    .recorder
                    .record(client_id, Call::KvRead { key: key.clone() }, async {
                        match client.get(key.as_bytes()).await {
                            Ok(found) => match found {
                                None => ok(Returned::KvRead { found: None }),
                                Some(kv) => match parse_value(&kv.value) {
                                    Some(value) => {
                                        ok(Returned::KvRead { found: Some(Versioned { value, version: kv.version }) })
                                    }
                                    // A value no client wrote: recorded as one, so the checker
                                    // reports it.
                                    None => ok(Returned::KvRead {
                                        found: Some(Versioned { value: u64::MAX, version: kv.version }),
                                    }),
                                },
                            },
                            Err(e) => failed(&e),
                        }
                    })
                    .await;
                if let Outcome::Ok { returned: Returned::KvRead { found } } = outcome {
                    last_version[index] = found.map_or(0, |f| f.version);
                }
            }
            choice => {
                written += 1;
                let value = (client_id << 40) | written;
                let expected_version = (choice == 3).then_some(last_version[index]);
                let call = match expected_version {
                    Some(expected_version) => Call::KvCas { key: key.clone(), expected_version, value },
                    None => Call::KvWrite { key: key.clone(), value },
                };
                let outcome = context
                    .recorder
                    .record(client_id, call, async {
                        match client.set(key.as_bytes(), value.to_string().as_bytes(), expected_version, None).await {
                            Ok(kv) => ok(Returned::KvWritten { version: kv.version }),
                            Err(Error::VersionMismatch { .. }) if expected_version.is_some() => {
                                ok(Returned::CasRefused)
                            }
                            Err(e) => failed(&e),
                        }
                    })
                    .await;
                if let Outcome::Ok { returned: Returned::KvWritten { version } } = outcome {
                    last_version[index] = version;
                }
            }
        }
    }
}

fn parse_value(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// The largest file the files workload writes: a few chunks at the chaos cluster's chunk size,
/// small enough that many puts fit in a short run.
pub const MAX_FILE_BYTES: u64 = 600 << 10;

/// Random content for a put: empty to a few bytes a quarter of the time, otherwise up to
/// [`MAX_FILE_BYTES`], so that files and objects span zero, one and several chunks.
fn random_content(random: &mut SplitMix64) -> Vec<u8> {
    let size = match random.below(4) {
        0 => random.below(64),
        _ => random.below(MAX_FILE_BYTES + 1),
    };
    let mut content = vec![0u8; size as usize];
    for word in content.chunks_mut(8) {
        let bytes = random.next_u64().to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
    content
}

/// One files client: puts, reads back and deletes a few paths, until `stop_at`. Contents are
/// random and named by their BLAKE3, so a read names the put it saw (or no put at all, when
/// its bytes are a mix of versions).
pub async fn run_files_client(context: WorkloadContext, client_id: u64, client: Client) {
    let mut random = SplitMix64::new(context.seed ^ (client_id << 32) ^ 0x6669);
    let paths = file_paths();
    while Instant::now() < context.stop_at {
        let path = paths[random.below(paths.len() as u64) as usize].clone();
        match random.below(5) {
            0 | 1 => {
                let content = random_content(&mut random);
                let size = content.len() as u64;
                let hash = blake3::hash(&content).to_hex().to_string();
                let call = Call::FilePut { path: path.clone(), content: hash };
                context
                    .recorder
                    .record(client_id, call, async {
                        match client.put_file(&path, Cursor::new(content), Some(size), None, |_| {}).await {
                            Ok(_) => ok(Returned::FilePut),
                            Err(e) => failed(&e),
                        }
                    })
                    .await;
            }
            2 | 3 => {
                context
                    .recorder
                    .record(client_id, Call::FileGet { path: path.clone() }, read_file(&client, &path))
                    .await;
            }
            _ => {
                context
                    .recorder
                    .record(client_id, Call::FileDelete { path: path.clone() }, async {
                        match client.delete_file(&path, None).await {
                            Ok(()) => ok(Returned::FileDeleted { existed: true }),
                            Err(Error::NotFound(_)) => ok(Returned::FileDeleted { existed: false }),
                            Err(e) => failed(&e),
                        }
                    })
                    .await;
            }
        }
    }
}

/// Reads `path` whole (the client verifies every chunk and the whole content) and names the
/// content by its BLAKE3.
pub async fn read_file(client: &Client, path: &str) -> Outcome {
    let mut content = Vec::new();
    match client.get_file(path, &mut content, |_, _| {}).await {
        Ok(_) => ok(Returned::FileRead { content: Some(blake3::hash(&content).to_hex().to_string()) }),
        Err(Error::NotFound(_)) => ok(Returned::FileRead { content: None }),
        Err(e) => failed(&e),
    }
}

/// The lease of the lock workload's sessions. Longer than an election plus a restart's
/// catch-up on a busy machine, so a leader change alone does not cost the holder its lock.
pub const LOCK_TTL: Duration = Duration::from_secs(6);

/// One lock client: acquires the lock, holds it a short while, releases it, until `stop_at`.
/// A hold ends early when the client learns that its session is lost; the hold interval
/// recorded is what the client believed, which is what the checker judges.
pub async fn run_lock_client(context: WorkloadContext, client_id: u64, client: Client) {
    let mut random = SplitMix64::new(context.seed ^ (client_id << 32) ^ 0x6c6b);
    while Instant::now() < context.stop_at {
        let hold_for = Duration::from_millis(random.between(50, 400));
        let recorder = context.recorder.clone();
        let outcome = context
            .recorder
            .record(client_id, Call::LockHold { lock: LOCK_NAME.into() }, async {
                let mut held = match client.lock(LOCK_NAME, LOCK_TTL).await {
                    Ok(held) => held,
                    Err(e) => return failed(&e),
                };
                let acquired_us = recorder.now_us();
                let token = held.token();
                tokio::select! {
                    biased;
                    lost = held.lost() => {
                        let released_us = recorder.now_us();
                        held.abandon().await;
                        ok(Returned::LockHeld { token, acquired_us, released_us, lost: Some(lost.to_string()) })
                    }
                    () = tokio::time::sleep(hold_for) => {
                        let released_us = recorder.now_us();
                        // Whether the release reaches the cluster or not, the client stopped
                        // holding the lock here; an unreleased session expires on its own.
                        let _ = held.release().await;
                        ok(Returned::LockHeld { token, acquired_us, released_us, lost: None })
                    }
                }
            })
            .await;
        if !matches!(outcome, Outcome::Ok { .. }) {
            // Do not hammer a cluster that cannot give locks right now.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The bucket the s3 workload's objects live in.
pub const S3_BUCKET: &str = "chaos";

/// Object subjects the s3 workload uses (`s3://BUCKET/KEY`).
pub fn object_subjects() -> Vec<String> {
    (0..6).map(|i| format!("{S3_SUBJECT_PREFIX}{S3_BUCKET}/object-{i}")).collect()
}

/// Where the s3 workload's clients send requests, and as whom.
pub struct S3Target {
    pub signer: Signer,
    /// Every node's gateway, `IP:PORT`.
    pub gateways: Vec<String>,
    /// An operation that has not finished in this time is recorded as unknown.
    pub deadline: Duration,
}

/// One S3 client's connection: kept alive between requests to one gateway, and moved to the
/// next gateway after an answer that says this one cannot serve (a transport failure, a
/// timeout, a 5xx, a signature refused by a node whose clock is off), as an SDK configured
/// with several endpoints would.
pub struct S3Session {
    target: Arc<S3Target>,
    gateway: usize,
    connection: Option<Connection>,
}

/// What became of one S3 request.
enum S3Result {
    Answered(Answer),
    /// No answer, or an answer cut off: the request may or may not have taken effect.
    Lost(String),
}

impl S3Session {
    pub fn new(target: Arc<S3Target>, first_gateway: usize) -> Self {
        let gateway = first_gateway % target.gateways.len().max(1);
        S3Session { target, gateway, connection: None }
    }

    async fn request(&mut self, method: http::Method, subject: &str, body: Bytes, sink: impl FnMut(&[u8])) -> S3Result {
        let path = format!("/{}", subject.trim_start_matches(S3_SUBJECT_PREFIX));
        let Some(authority) = self.target.gateways.get(self.gateway).cloned() else {
            return S3Result::Lost("no S3 gateways".into());
        };
        let target = self.target.clone();
        let attempt = async {
            if self.connection.is_none() {
                self.connection = Some(Connection::open(&authority).await?);
            }
            let connection = self.connection.as_mut().ok_or_else(|| anyhow::anyhow!("no connection"))?;
            connection.request(&target.signer, method.clone(), &path, body, sink).await
        };
        let result = match tokio::time::timeout(target.deadline, attempt).await {
            Ok(Ok(answer)) => S3Result::Answered(answer),
            Ok(Err(e)) => S3Result::Lost(format!("{e:#}")),
            Err(_) => S3Result::Lost(format!("S3 {method} {path} to {authority}: no answer in {:?}", target.deadline)),
        };
        let keep_gateway = match &result {
            S3Result::Answered(answer) => answer.status.is_success() || answer.status == http::StatusCode::NOT_FOUND,
            S3Result::Lost(_) => false,
        };
        if !keep_gateway {
            self.connection = None;
            self.gateway = (self.gateway + 1) % target.gateways.len().max(1);
        }
        result
    }

    /// PUTs `content` as `subject`.
    pub async fn put(&mut self, subject: &str, content: Vec<u8>) -> Outcome {
        match self.request(http::Method::PUT, subject, Bytes::from(content), |_| {}).await {
            S3Result::Answered(answer) if answer.status.is_success() => ok(Returned::FilePut),
            S3Result::Answered(answer) => s3_refused(&answer),
            S3Result::Lost(error) => Outcome::Unknown { error },
        }
    }

    /// GETs `subject` whole and names its content by its BLAKE3 (None: no such key).
    pub async fn get(&mut self, subject: &str) -> Outcome {
        let mut hasher = blake3::Hasher::new();
        match self
            .request(http::Method::GET, subject, Bytes::new(), |data| {
                hasher.update(data);
            })
            .await
        {
            S3Result::Answered(answer) if answer.status.is_success() => {
                ok(Returned::FileRead { content: Some(hasher.finalize().to_hex().to_string()) })
            }
            S3Result::Answered(answer)
                if answer.status == http::StatusCode::NOT_FOUND && answer.error_body.contains("NoSuchKey") =>
            {
                ok(Returned::FileRead { content: None })
            }
            S3Result::Answered(answer) => s3_refused(&answer),
            S3Result::Lost(error) => Outcome::Unknown { error },
        }
    }

    /// DELETEs `subject` (S3 answers the same whether or not it existed).
    pub async fn delete(&mut self, subject: &str) -> Outcome {
        match self.request(http::Method::DELETE, subject, Bytes::new(), |_| {}).await {
            S3Result::Answered(answer) if answer.status.is_success() => ok(Returned::ObjectDeleted),
            S3Result::Answered(answer) => s3_refused(&answer),
            S3Result::Lost(error) => Outcome::Unknown { error },
        }
    }
}

/// A gateway's answer other than success: a 4xx is a refusal before anything was done (a bad
/// signature, a date too far from the node's clock, a denied key), except a timeout or a
/// throttle (408, 429), which like a 5xx may come after the write took effect.
fn s3_refused(answer: &Answer) -> Outcome {
    let error = format!("S3 answered {}: {}", answer.status, answer.error_body);
    let status = answer.status;
    if status.is_client_error()
        && status != http::StatusCode::REQUEST_TIMEOUT
        && status != http::StatusCode::TOO_MANY_REQUESTS
    {
        Outcome::Failed { error }
    } else {
        Outcome::Unknown { error }
    }
}

/// One s3 client: PUTs, GETs and DELETEs a few objects, until `stop_at`, as the files client
/// does with files; the same model judges them.
pub async fn run_s3_client(context: WorkloadContext, client_id: u64, target: Arc<S3Target>) {
    let mut random = SplitMix64::new(context.seed ^ (client_id << 32) ^ 0x7333);
    let subjects = object_subjects();
    let mut session = S3Session::new(target, client_id as usize);
    while Instant::now() < context.stop_at {
        let subject = subjects[random.below(subjects.len() as u64) as usize].clone();
        let outcome = match random.below(5) {
            0 | 1 => {
                let content = random_content(&mut random);
                let call =
                    Call::FilePut { path: subject.clone(), content: blake3::hash(&content).to_hex().to_string() };
                context.recorder.record(client_id, call, session.put(&subject, content)).await
            }
            2 | 3 => {
                context.recorder.record(client_id, Call::FileGet { path: subject.clone() }, session.get(&subject)).await
            }
            _ => {
                context
                    .recorder
                    .record(client_id, Call::FileDelete { path: subject.clone() }, session.delete(&subject))
                    .await
            }
        };
        if !matches!(outcome, Outcome::Ok { .. }) {
            // The next gateway may be the one that is down too: do not spin on refusals.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
