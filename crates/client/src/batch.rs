//! Key writes from many tasks sharing one [`Client`], sent together: the writes queued while
//! the batcher was busy go out as one `Kv/Batch` call instead of one call each.
//!
//! This is TiKV's client batching in its simplest form. A call costs both ends a gRPC stream
//! (HTTP/2 frames, a task, a socket read and write, the token check, a span); under many
//! concurrent writers that was most of a small write's CPU (`mendfs bench kv`). Nothing waits
//! to fill a batch: a write made while the client has no write call in flight goes out at once
//! in its writer's task, as before batching; the others queue for the batcher, which takes
//! whatever is queued when it wakes, so a batch forms only when writers queue up faster than
//! calls leave.
//!
//! Each write keeps its own request id, outcome and error, exactly as its own call would have
//! had them; a write whose result says "try again" (a node without a leader, say) and every
//! write of a batch a server of an older version does not know go through the ordinary one-write path, with its
//! failover. Neither the batch nor such a retry outlives the client's deadline counted from
//! when the write was made. A retried write cannot apply twice: the state machine
//! deduplicates request ids.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use mendfs_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};

use crate::{classify, Attempt, Client, Error, Inner};

/// Writes one batch carries at most (the server takes up to `BATCH_OPS_MAX`, 256).
const BATCH_OPS_MAX: usize = 128;
/// Key and value bytes one batch carries at most: well under the server's message limit,
/// which is one largest write.
const BATCH_BYTES_MAX: usize = 256 * 1024;
/// A write larger than this goes in a call of its own: batching saves per-call overhead, which
/// is nothing next to such a write's bytes.
const BATCHED_WRITE_BYTES_MAX: usize = 16 * 1024;
/// Writes waiting for the batcher at most; a writer that finds the queue full sends its own
/// call rather than wait.
const QUEUE_WRITES_MAX: usize = 4_096;

/// One write waiting for the batcher.
struct Queued {
    op: pb::BatchOp,
    bytes: usize,
    /// When its writer gives up: the client's deadline from the moment it was made, which its
    /// batch and any retry of it alone keep to.
    deadline: Instant,
    reply: oneshot::Sender<Result<pb::WriteReply, Error>>,
}

/// The queue to a client's batcher task, which starts with the first batched write.
#[derive(Default)]
pub(crate) struct Batcher {
    queue: std::sync::OnceLock<mpsc::Sender<Queued>>,
    /// Set once a node answered that it has no `Kv/Batch` (an older version): every write then
    /// goes in its own call.
    unsupported: AtomicBool,
    /// Calls of key writes this client has in flight. With none, a write goes out at once in
    /// its writer's task: a lone writer pays no hand-off to the batcher.
    in_flight: AtomicUsize,
    /// The `Kv/WriteStream` a lone writer's writes go on, while no write uses it.
    stream: std::sync::Mutex<Option<WriteStream>>,
    /// Set once a node answered that it has no `Kv/WriteStream`.
    stream_unsupported: AtomicBool,
}

/// An open `Kv/WriteStream`: writes go in one at a time, each answered before the next.
struct WriteStream {
    endpoint: usize,
    writes: mpsc::Sender<pb::StreamedWrite>,
    answers: tonic::Streaming<pb::BatchResult>,
}

/// Counts a call in [`Batcher::in_flight`] while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The key and value bytes of a write.
fn op_bytes(op: &pb::BatchOp) -> usize {
    match &op.op {
        Some(pb::batch_op::Op::Create(put) | pb::batch_op::Op::Set(put)) => put.key.len() + put.value.len(),
        Some(pb::batch_op::Op::Delete(delete)) => delete.key.len(),
        None => 0,
    }
}

impl Client {
    /// A key write, batched with others when that is allowed, else in its own call.
    pub(crate) async fn write(&self, op: pb::BatchOp) -> Result<pb::WriteReply, Error> {
        let bytes = op_bytes(&op);
        let deadline = Instant::now() + self.inner.config.deadline;
        // A write made in a trace (the client's, or the caller's span's) keeps its own call,
        // so that its trace shows its own hops; a batch starts a trace of its own.
        let traced = self.inner.config.trace.is_some() || mendfs_telemetry::layer::current_context().is_some();
        let batcher = &self.inner.batcher;
        if !self.inner.config.batch_writes
            || traced
            || bytes > BATCHED_WRITE_BYTES_MAX
            || batcher.unsupported.load(Ordering::Relaxed)
            || tokio::runtime::Handle::try_current().is_err()
        {
            return self.write_alone(op, deadline).await;
        }
        if batcher.in_flight.load(Ordering::Relaxed) == 0 {
            let _in_flight = InFlight::enter(&batcher.in_flight);
            if let Some(result) = self.write_streamed(&op, deadline).await {
                return result;
            }
            return self.write_alone(op, deadline).await;
        }
        let queue = batcher.queue.get_or_init(|| {
            let (queue, queued) = mpsc::channel(QUEUE_WRITES_MAX);
            tokio::spawn(run_batcher(Arc::downgrade(&self.inner), queued));
            queue
        });
        let (reply, answer) = oneshot::channel();
        match queue.try_send(Queued { op, bytes, deadline, reply }) {
            Ok(()) => match answer.await {
                Ok(result) => result,
                // The batcher's runtime shut down while the write was queued or in flight.
                Err(_) => Err(Error::Server(
                    "the client's write batcher stopped (its runtime shut down): the write may or may not have \
                     been applied"
                        .into(),
                )),
            },
            Err(mpsc::error::TrySendError::Full(queued) | mpsc::error::TrySendError::Closed(queued)) => {
                self.write_alone(queued.op, deadline).await
            }
        }
    }

    /// One write on the client's write stream, opened if it has none. None when the stream
    /// cannot take it (none could be opened, another write holds it, it broke, or the write
    /// must be tried elsewhere): the write then goes in a call of its own, with failover. A
    /// write that broke its stream may have been applied; trying it again is safe, as its
    /// request id is the same.
    async fn write_streamed(&self, op: &pb::BatchOp, deadline: Instant) -> Option<Result<pb::WriteReply, Error>> {
        let batcher = &self.inner.batcher;
        if batcher.stream_unsupported.load(Ordering::Relaxed) {
            return None;
        }
        let taken = batcher.stream.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        let mut stream = match taken {
            Some(stream) => stream,
            None => self.open_write_stream(deadline).await?,
        };
        let remaining = deadline.saturating_duration_since(Instant::now()).min(self.inner.config.attempt_timeout);
        let write = pb::StreamedWrite {
            op: Some(op.clone()),
            timeout_ms: remaining.as_millis() as u64,
            // Every write is a request of its own, with a trace of its own.
            traceparent: mendfs_telemetry::grpc::outgoing_context().to_traceparent(),
        };
        let answered = match stream.writes.send(write).await {
            Ok(()) => match tokio::time::timeout(remaining, stream.answers.message()).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(status)) => {
                    // The node ended the stream because the leader moved: the write was not
                    // served, and goes in a call of its own to the leader it names, where the
                    // next stream opens.
                    if let Some(leader) = self.leader_named(status.metadata()) {
                        self.inner.preferred.store(leader, Ordering::Relaxed);
                        return None;
                    }
                    None
                }
                Err(_) => None,
            },
            Err(_) => None,
        };
        let Some(answer) = answered else {
            // The stream broke or its node went silent (stopped, partitioned away): the write's
            // own call starts at the next endpoint, as a call's next attempt would, rather than
            // spend another attempt's time on this one.
            let next = (stream.endpoint + 1) % self.inner.channels.len();
            let _ = self.inner.preferred.compare_exchange(stream.endpoint, next, Ordering::Relaxed, Ordering::Relaxed);
            return None;
        };
        let outcome = match answer.result {
            Some(pb::batch_result::Result::Written(written)) => Ok(written),
            Some(pb::batch_result::Result::Error(error)) => match classify(&status_of(&error)) {
                Attempt::Fail(error) => Err(error),
                Attempt::Retry(_) => return None,
            },
            None => Err(Error::Server("a streamed write's answer was empty".into())),
        };
        // Kept for the next write, unless the client has since learnt of a better endpoint (the
        // leader, named by the node the stream was opened on): the next write opens one there.
        if self.inner.preferred.load(Ordering::Relaxed) % self.inner.channels.len() == stream.endpoint {
            *batcher.stream.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(stream);
        }
        Some(outcome)
    }

    async fn open_write_stream(&self, deadline: Instant) -> Option<WriteStream> {
        let endpoint = self.inner.preferred.load(Ordering::Relaxed) % self.inner.channels.len();
        let (writes, queued) = mpsc::channel(1);
        let mut kv = self.kv(endpoint);
        let remaining = deadline.saturating_duration_since(Instant::now()).min(self.inner.config.attempt_timeout);
        let opened =
            tokio::time::timeout(remaining, kv.write_stream(tokio_stream::wrappers::ReceiverStream::new(queued))).await;
        match opened {
            Ok(Ok(response)) => {
                // A node that forwards writes to the leader names it; this stream serves the
                // write at hand, and the next opens at the leader if it is one of the endpoints.
                if let Some(leader) = self.leader_named(response.metadata()) {
                    self.inner.preferred.store(leader, Ordering::Relaxed);
                }
                Some(WriteStream { endpoint, writes, answers: response.into_inner() })
            }
            Ok(Err(status)) => {
                if let Attempt::Fail(error) = classify(&status) {
                    if batch_unsupported(&error) {
                        self.inner.batcher.stream_unsupported.store(true, Ordering::Relaxed);
                    }
                }
                None
            }
            Err(_) => None,
        }
    }

    /// One write in a call of its own, with failover until `deadline`.
    pub(crate) async fn write_alone(&self, op: pb::BatchOp, deadline: Instant) -> Result<pb::WriteReply, Error> {
        match op.op {
            Some(pb::batch_op::Op::Create(request)) => {
                self.call_until("create", deadline, |i| {
                    let request = request.clone();
                    let mut kv = self.kv(i);
                    async move { kv.create(request).await }
                })
                .await
            }
            Some(pb::batch_op::Op::Set(request)) => {
                self.call_until("set", deadline, |i| {
                    let request = request.clone();
                    let mut kv = self.kv(i);
                    async move { kv.set(request).await }
                })
                .await
            }
            Some(pb::batch_op::Op::Delete(request)) => {
                self.call_until("delete", deadline, |i| {
                    let request = request.clone();
                    let mut kv = self.kv(i);
                    async move { kv.delete(request).await }
                })
                .await
            }
            None => Err(Error::InvalidArgument("a write names no operation".into())),
        }
    }

    /// Sends the queued writes: alone if there is one, else as one `Kv/Batch` call.
    async fn send_batch(self, batch: Vec<Queued>) {
        let inner = self.inner.clone();
        let _in_flight = InFlight::enter(&inner.batcher.in_flight);
        if batch.len() == 1 {
            let Some(queued) = batch.into_iter().next() else { return };
            let _ = queued.reply.send(self.write_alone(queued.op, queued.deadline).await);
            return;
        }
        let request = pb::BatchRequest { ops: batch.iter().map(|queued| queued.op.clone()).collect() };
        let Some(deadline) = batch.iter().map(|queued| queued.deadline).min() else { return };
        let answered = self
            .call_until("batch", deadline, |i| {
                let request = request.clone();
                let mut kv = self.kv(i);
                async move { kv.batch(request).await }
            })
            .await;
        let results = match answered {
            Ok(reply) if reply.results.len() == batch.len() => reply.results,
            Ok(reply) => {
                let error = Error::Server(format!(
                    "a batch of {} writes was answered with {} results",
                    batch.len(),
                    reply.results.len()
                ));
                for queued in batch {
                    let _ = queued.reply.send(Err(error.clone()));
                }
                return;
            }
            Err(error) if batch_unsupported(&error) => {
                self.inner.batcher.unsupported.store(true, Ordering::Relaxed);
                self.write_each_alone(batch).await;
                return;
            }
            Err(error) => {
                for queued in batch {
                    let _ = queued.reply.send(Err(error.clone()));
                }
                return;
            }
        };
        let mut retry = Vec::new();
        for (queued, result) in batch.into_iter().zip(results) {
            let outcome = match result.result {
                Some(pb::batch_result::Result::Written(written)) => Ok(written),
                Some(pb::batch_result::Result::Error(error)) => match classify(&status_of(&error)) {
                    Attempt::Fail(error) => Err(error),
                    Attempt::Retry(_) => {
                        retry.push(queued);
                        continue;
                    }
                },
                None => Err(Error::Server("a batch result was empty".into())),
            };
            let _ = queued.reply.send(outcome);
        }
        self.write_each_alone(retry).await;
    }

    async fn write_each_alone(&self, writes: Vec<Queued>) {
        futures::future::join_all(writes.into_iter().map(|queued| async move {
            let _ = queued.reply.send(self.write_alone(queued.op, queued.deadline).await);
        }))
        .await;
    }
}

/// Whether a node answered as one without `Kv/Batch` (a version before it): `Unimplemented` to
/// the cluster secret, and to a token, the refusal older nodes give every method they do not
/// know (`auth`), which a node that knows the method never gives a caller with the write role.
fn batch_unsupported(error: &Error) -> bool {
    match error {
        Error::Unimplemented(_) => true,
        Error::PermissionDenied(message) => message.contains("no such method"),
        _ => false,
    }
}

/// The status a write's own call would have failed with.
fn status_of(error: &pb::BatchError) -> tonic::Status {
    let mut status = tonic::Status::new(tonic::Code::from(error.code), error.message.clone());
    let mut header = |name: &'static str, value: String| {
        if let Ok(value) = value.parse() {
            status.metadata_mut().insert(name, value);
        }
    };
    if !error.kind.is_empty() {
        header(mendfs_proto::ERROR_KIND_HEADER, error.kind.clone());
    }
    if let Some(expected) = error.expected_version {
        header(mendfs_proto::ERROR_EXPECTED_VERSION_HEADER, expected.to_string());
    }
    if let Some(actual) = error.actual_version {
        header(mendfs_proto::ERROR_ACTUAL_VERSION_HEADER, actual.to_string());
    }
    status
}

/// Takes the queued writes in batches until the client is dropped. Every batch is sent in a
/// task of its own, so the next one gathers while it is in flight.
async fn run_batcher(client: Weak<Inner>, mut queued: mpsc::Receiver<Queued>) {
    while let Some(first) = queued.recv().await {
        // Writers woken together (by one batch's answers) queue their next writes now.
        tokio::task::yield_now().await;
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < BATCH_OPS_MAX && bytes < BATCH_BYTES_MAX {
            match queued.try_recv() {
                Ok(next) => {
                    bytes += next.bytes;
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        // A writer that gave up while its write waited here (its future dropped) is not sent:
        // as without batching, a write nobody awaits any more is never started.
        batch.retain(|queued| !queued.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let Some(inner) = client.upgrade() else { return };
        tokio::spawn(Client { inner }.send_batch(batch));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(code: tonic::Code, kind: &str, expected: Option<u64>, actual: Option<u64>) -> pb::BatchError {
        pb::BatchError {
            code: code as i32,
            message: "refused".into(),
            kind: kind.into(),
            expected_version: expected,
            actual_version: actual,
        }
    }

    #[test]
    fn a_failed_write_of_a_batch_is_the_error_its_own_call_would_have_given() {
        let mismatch = error(tonic::Code::FailedPrecondition, "version-mismatch", Some(5), Some(7));
        assert!(matches!(
            classify(&status_of(&mismatch)),
            Attempt::Fail(Error::VersionMismatch { expected: 5, actual: 7 })
        ));
        let exists = error(tonic::Code::AlreadyExists, "key-exists", None, Some(3));
        assert!(matches!(classify(&status_of(&exists)), Attempt::Fail(Error::KeyExists { version: 3 })));
        let refused = error(tonic::Code::InvalidArgument, "", None, None);
        assert!(matches!(classify(&status_of(&refused)), Attempt::Fail(Error::InvalidArgument(m)) if m == "refused"));
        // "Try again" stays a retry: such a write is sent again alone, with failover.
        let no_leader = error(tonic::Code::Unavailable, "", None, None);
        assert!(matches!(classify(&status_of(&no_leader)), Attempt::Retry(_)));
        // A code from a newer server is an error, not a panic.
        let unknown = pb::BatchError { code: 999, ..error(tonic::Code::Ok, "", None, None) };
        assert!(matches!(classify(&status_of(&unknown)), Attempt::Retry(_) | Attempt::Fail(_)));
    }

    #[test]
    fn a_node_without_batches_is_told_apart_from_a_refusal() {
        assert!(batch_unsupported(&Error::Unimplemented("Kv/Batch".into())));
        assert!(batch_unsupported(&Error::PermissionDenied("permission denied: no such method \"Kv/Batch\"".into())));
        assert!(!batch_unsupported(&Error::PermissionDenied("Kv/Batch needs role write".into())));
        assert!(!batch_unsupported(&Error::Timeout { elapsed: std::time::Duration::ZERO, last_error: String::new() }));
    }

    #[test]
    fn a_write_counts_its_key_and_value_bytes() {
        let put = pb::PutRequest { key: vec![0; 10], value: vec![0; 90], ..Default::default() };
        assert_eq!(op_bytes(&pb::BatchOp { op: Some(pb::batch_op::Op::Set(put)) }), 100);
        let delete = pb::DeleteRequest { key: vec![0; 7], ..Default::default() };
        assert_eq!(op_bytes(&pb::BatchOp { op: Some(pb::batch_op::Op::Delete(delete)) }), 7);
        assert_eq!(op_bytes(&pb::BatchOp { op: None }), 0);
    }
}
