//! The S3 operations.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mendfs_data::coordinator::{ContentRef, Coordinator, DataMessages};
use mendfs_meta::s3::{
    self as meta_s3, CompleteUpload, CopyObject, MultipartUpload, ObjectMeta, ObjectRecord, Precondition, PutObject,
    PutPart, S3Content,
};
use mendfs_meta::{ApiError, MetaNode, Origin, CHUNK_PAGE_CHUNKS_MAX};
use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Request, S3Response, S3Result, S3};
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::body::{self, BodyUpload, Declared};
use crate::errors::{from_api, invalid_argument};
use crate::listing::{encode, millis, position_of, timestamp, token_after};
use crate::service::S3Settings;

/// How long a write waits for enough storage nodes before it fails.
const PLACEMENT_WAIT: Duration = Duration::from_secs(10);
/// Messages of object data buffered per reader before the gateway waits for the client.
const READ_QUEUE_MESSAGES: usize = 8;
/// Size of the pieces of object data handed to the HTTP body. HTTP/1.1 writes them as they
/// are, slices of the chunk, with no copy (unlike gRPC's messages, see the coordinator's
/// `GRPC_READ_MESSAGE_BYTES`): there is no per-piece buffer to keep small, and bigger pieces
/// mean fewer writes.
const READ_PIECE_BYTES: usize = 256 << 10;

#[derive(Clone)]
pub(crate) struct Gateway {
    pub node: MetaNode,
    pub coordinator: Coordinator,
    pub settings: Arc<S3Settings>,
}

fn origin() -> Origin {
    Origin::LOCAL
}

fn check_key(key: &str) -> S3Result<()> {
    meta_s3::validate_object_key(key).map_err(|why| S3Error::with_message(S3ErrorCode::KeyTooLongError, why))
}

fn etag(value: &str) -> ETag {
    ETag::Strong(value.to_string())
}

/// The request id of a completion: the same for the same upload, parts and conditions, so a
/// client's retry of a completion that applied (its answer lost) gets the same ETag back
/// instead of `NoSuchUpload`; another parts list is another request.
fn completion_id(complete: &CompleteUpload) -> mendfs_meta::RequestId {
    use md5::Digest;
    let mut digest = md5::Md5::new();
    digest.update(complete.upload_id.to_be_bytes());
    for (number, tag) in &complete.parts {
        digest.update(number.to_be_bytes());
        digest.update(tag.as_bytes());
        digest.update([0]);
    }
    digest.update(format!("{:?}", complete.condition).as_bytes());
    let sum = digest.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&sum[..8]);
    mendfs_meta::RequestId { client_id: u64::from_le_bytes(first), sequence: 1 }
}

fn upload_id_text(id: u64) -> String {
    format!("{id:016x}")
}

fn parse_upload_id(text: &str) -> S3Result<u64> {
    u64::from_str_radix(text, 16)
        .map_err(|_| S3Error::with_message(S3ErrorCode::NoSuchUpload, format!("upload {text:?} does not exist")))
}

/// The stored metadata of a new object from its request's headers.
#[allow(clippy::too_many_arguments)]
fn object_meta(
    content_type: Option<String>,
    content_encoding: Option<String>,
    content_disposition: Option<String>,
    content_language: Option<String>,
    cache_control: Option<String>,
    expires: Option<Timestamp>,
    metadata: Option<HashMap<String, String>>,
) -> S3Result<ObjectMeta> {
    let mut user: Vec<(String, String)> =
        metadata.unwrap_or_default().into_iter().map(|(name, value)| (name.to_ascii_lowercase(), value)).collect();
    user.sort();
    // `aws-chunked` describes the request's framing, not the object.
    let content_encoding = content_encoding
        .map(|encoding| {
            encoding
                .split(',')
                .map(str::trim)
                .filter(|part| !part.eq_ignore_ascii_case("aws-chunked") && !part.is_empty())
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|encoding| !encoding.is_empty());
    let meta = ObjectMeta {
        content_type,
        content_encoding,
        content_disposition,
        content_language,
        cache_control,
        expires: expires.map(|at| {
            let mut text = Vec::new();
            let _ = at.format(TimestampFormat::HttpDate, &mut text);
            String::from_utf8_lossy(&text).into_owned()
        }),
        user,
        checksums: Vec::new(),
    };
    if meta.user_bytes() > meta_s3::USER_METADATA_BYTES_MAX {
        return Err(S3Error::with_message(
            S3ErrorCode::MetadataTooLarge,
            format!("user metadata is limited to {} bytes", meta_s3::USER_METADATA_BYTES_MAX),
        ));
    }
    Ok(meta)
}

fn etag_list(condition: &Option<ETagCondition>) -> Option<Vec<String>> {
    condition.as_ref().map(|condition| match condition.as_etag() {
        Some(tag) => vec![tag.value().to_string()],
        None => vec!["*".to_string()],
    })
}

/// A write's conditions on the key it replaces (`If-Match`, `If-None-Match`).
fn write_condition(if_match: &Option<ETagCondition>, if_none_match: &Option<ETagCondition>) -> S3Result<Precondition> {
    let mut condition = Precondition { etag_in: etag_list(if_match), ..Default::default() };
    match if_none_match {
        None => {}
        Some(any) if any.is_any() => condition.must_not_exist = true,
        Some(_) => {
            return Err(S3Error::with_message(S3ErrorCode::NotImplemented, "a write's If-None-Match may only be *"))
        }
    }
    Ok(condition)
}

/// A read's conditions, in the order RFC 9110 evaluates them: a failed `If-Match` or
/// `If-Unmodified-Since` is 412; a matching `If-None-Match` or an unmodified
/// `If-Modified-Since` is 304.
fn check_read_conditions(
    object: &ObjectRecord,
    if_match: &Option<ETagCondition>,
    if_none_match: &Option<ETagCondition>,
    if_modified_since: &Option<Timestamp>,
    if_unmodified_since: &Option<Timestamp>,
) -> S3Result<()> {
    let seconds = |ms: u64| ms / 1000;
    let hit = |condition: &ETagCondition| condition.as_etag().is_none_or(|tag| tag.value() == object.etag);
    if let Some(condition) = if_match {
        if !hit(condition) {
            return Err(S3Error::with_message(S3ErrorCode::PreconditionFailed, "If-Match does not match the ETag"));
        }
    } else if let Some(since) = if_unmodified_since {
        if seconds(object.last_modified_ms) > seconds(millis(since)) {
            return Err(S3Error::with_message(
                S3ErrorCode::PreconditionFailed,
                "the object was modified after If-Unmodified-Since",
            ));
        }
    }
    let not_modified = || {
        let mut error = S3Error::new(S3ErrorCode::NotModified);
        let mut headers = http::HeaderMap::new();
        if let Ok(value) = format!("\"{}\"", object.etag).parse() {
            headers.insert(http::header::ETAG, value);
        }
        error.set_headers(headers);
        error
    };
    if let Some(condition) = if_none_match {
        if hit(condition) {
            return Err(not_modified());
        }
    } else if let Some(since) = if_modified_since {
        if seconds(object.last_modified_ms) <= seconds(millis(since)) {
            return Err(not_modified());
        }
    }
    Ok(())
}

fn user_metadata(meta: &ObjectMeta) -> Option<HashMap<String, String>> {
    (!meta.user.is_empty()).then(|| meta.user.iter().cloned().collect())
}

fn checksum_of(meta: &ObjectMeta, algorithm: &str) -> Option<String> {
    meta.checksums.iter().find(|(name, _)| name == algorithm).map(|(_, value)| value.clone())
}

/// Where a write's ApiError goes while the data plane carries only a gRPC status.
type Refusal = Arc<Mutex<Option<ApiError>>>;

/// What a write's commit needs besides its content: the request id that makes a retry apply
/// once, and when its (last segment's) chunks began preparing, on this node's monotonic clock,
/// from which the leader reckons the write's age; and the content itself when it is small
/// enough to be kept inline in the metadata.
#[derive(Debug, Clone)]
struct Committing {
    request_id: mendfs_meta::RequestId,
    prepare_started: std::time::Instant,
    carried: mendfs_meta::Carried,
}

fn refuse(slot: &Refusal, error: ApiError) -> tonic::Status {
    let status = tonic::Status::from(error.clone());
    if let Ok(mut refusal) = slot.lock() {
        *refusal = Some(error);
    }
    status
}

/// Phase two of a part's write (UploadPart and UploadPartCopy), retried with its request id:
/// the part's ETag and modification time.
async fn commit_part(
    node: &MetaNode,
    coordinator: &Coordinator,
    put: PutPart,
    committing: Committing,
    refusal: &Refusal,
) -> Result<(String, u64), tonic::Status> {
    let Committing { request_id, prepare_started, carried } = committing;
    coordinator
        .propose_retrying(|| node.s3_put_part(request_id, put.clone(), carried.clone(), prepare_started))
        .await
        .map_err(|e| refuse(refusal, e))
}

impl Gateway {
    /// Streams `range` of an object into a body, from a task that keeps the request's span.
    fn stream(
        &self,
        bucket: String,
        key: String,
        object: &ObjectRecord,
        first: mendfs_meta::ChunkPage,
        range: std::ops::Range<u64>,
    ) -> StreamingBlob {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, tonic::Status>>(READ_QUEUE_MESSAGES);
        let content = ContentRef::Object { bucket, key, pieces: object.pieces };
        let (coordinator, n_chunks) = (self.coordinator.clone(), object.n_chunks);
        tokio::spawn(
            async move {
                let streamed = coordinator
                    .stream_content(
                        &content,
                        n_chunks,
                        first,
                        range,
                        &tx,
                        DataMessages { piece_bytes: READ_PIECE_BYTES, wrap: Bytes::from },
                    )
                    .await;
                if let Err(status) = streamed {
                    tracing::Span::current().record("error", status.message());
                    let _ = tx.send(Err(status)).await;
                }
            }
            .in_current_span(),
        );
        let stream = futures::StreamExt::map(ReceiverStream::new(rx), |item| {
            item.map_err(|status| std::io::Error::other(status.message().to_string()))
        });
        StreamingBlob::wrap(stream)
    }

    /// Fails fast, before a part's data is streamed, unless the upload exists and writes
    /// `bucket`/`key` (the commit checks again).
    async fn upload_must_exist(&self, upload_id: u64, bucket: &str, key: &str) -> S3Result<()> {
        let found = self.node.s3_list_parts(origin(), upload_id, 0, 0).await.map_err(from_api)?;
        match found {
            Some((upload, _)) if upload.bucket == bucket && upload.key == key => Ok(()),
            _ => Err(S3Error::with_message(
                S3ErrorCode::NoSuchUpload,
                format!("upload {} of {bucket}/{key} does not exist", upload_id_text(upload_id)),
            )),
        }
    }

    /// An object's record and first page; `NoSuchKey` if it does not exist.
    async fn object(&self, bucket: &str, key: &str, limit: u32) -> S3Result<(ObjectRecord, mendfs_meta::ChunkPage)> {
        check_key(key)?;
        match self.node.s3_object(origin(), bucket.to_string(), key.to_string(), limit).await {
            Ok(Some(found)) => Ok(found),
            Ok(None) => {
                Err(S3Error::with_message(S3ErrorCode::NoSuchKey, format!("{key:?} does not exist in {bucket}")))
            }
            Err(e) => Err(from_api(e)),
        }
    }

    /// Writes a body as new content of `bucket` labelled `label`, then commits it with
    /// `commit`. The bucket's redundancy policy decides how its chunks are kept (read from
    /// this node's applied state: a policy set a moment ago may not be seen yet, and either
    /// way the content is durable); without one they are replicated.
    async fn write<T, F, Fut>(
        &self,
        bucket: &str,
        label: String,
        body: Option<StreamingBlob>,
        declared: Declared,
        trailers: Option<s3s::TrailingHeaders>,
        commit: F,
    ) -> S3Result<(T, body::Verified)>
    where
        F: FnOnce(S3Content, body::Verified, Committing, Refusal) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let body =
            body.unwrap_or_else(|| StreamingBlob::wrap(futures::stream::empty::<Result<Bytes, std::io::Error>>()));
        let (mut upload, outcome) = BodyUpload::new(body, declared, trailers)?;
        let refusal: Refusal = Arc::new(Mutex::new(None));
        let wait_until = Instant::now() + PLACEMENT_WAIT;
        let redundancy = self.node.policy_for_bucket(bucket).map_err(from_api)?.unwrap_or_default();
        let (outcome_for_commit, refusal_for_commit) = (outcome.clone(), refusal.clone());
        let written = Box::pin(self.coordinator.write_content(
            label,
            &mut upload,
            wait_until,
            redundancy,
            |written| async move {
                let verified =
                    body::verified(&outcome_for_commit).map_err(|e| tonic::Status::aborted(e.to_string()))?;
                let content = S3Content {
                    size: written.size,
                    chunks: written.chunks,
                    upload_id: written.upload_id,
                    first_index: written.first_index,
                    // Filled in by the leader, from `prepare_started`.
                    prepared_at_ms: 0,
                    grace_ms: written.grace_ms,
                };
                let committing = Committing {
                    request_id: written.request_id,
                    prepare_started: written.prepare_started,
                    carried: written.carried,
                };
                let committed = commit(content, verified.clone(), committing, refusal_for_commit).await?;
                Ok((committed, verified))
            },
        ))
        .await;
        match written {
            Ok(done) => Ok(done),
            Err(status) => {
                if let Some(error) = refusal.lock().ok().and_then(|mut slot| slot.take()) {
                    return Err(from_api(error));
                }
                Err(body::failure(&outcome, status))
            }
        }
    }

    fn declared(
        length: Option<i64>,
        md5: Option<String>,
        checksum: Checksum,
        algorithm: Option<ChecksumAlgorithm>,
    ) -> Declared {
        Declared {
            length: length.and_then(|length| u64::try_from(length).ok()),
            md5,
            checksum,
            algorithm: algorithm.map(|a| a.as_str().to_string()),
        }
    }

    async fn listing(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<String>,
        after: Option<String>,
        max_keys: Option<i32>,
    ) -> S3Result<(meta_s3::ObjectListing, i32)> {
        let max = max_keys.unwrap_or(1000).clamp(0, 1000);
        let listing = self
            .node
            .s3_list_objects(origin(), bucket.to_string(), prefix.to_string(), delimiter, after, max as u32)
            .await
            .map_err(from_api)?;
        Ok((listing, max))
    }
}

fn contents(listing: &meta_s3::ObjectListing, url: bool) -> (Option<Vec<Object>>, Option<Vec<CommonPrefix>>) {
    let objects: Vec<Object> = listing
        .objects
        .iter()
        .map(|object| Object {
            key: Some(encode(object.key.clone(), url)),
            size: Some(object.size as i64),
            e_tag: Some(etag(&object.etag)),
            last_modified: Some(timestamp(object.last_modified_ms)),
            storage_class: Some(ObjectStorageClass::from_static(ObjectStorageClass::STANDARD)),
            ..Default::default()
        })
        .collect();
    let prefixes: Vec<CommonPrefix> = listing
        .common_prefixes
        .iter()
        .map(|prefix| CommonPrefix { prefix: Some(encode(prefix.clone(), url)) })
        .collect();
    ((!objects.is_empty()).then_some(objects), (!prefixes.is_empty()).then_some(prefixes))
}

fn wants_url(encoding: &Option<EncodingType>) -> bool {
    encoding.as_ref().is_some_and(|e| e.as_str().eq_ignore_ascii_case(EncodingType::URL))
}

#[async_trait::async_trait]
impl S3 for Gateway {
    async fn list_buckets(&self, req: S3Request<ListBucketsInput>) -> S3Result<S3Response<ListBucketsOutput>> {
        let key_id = req.credentials.as_ref().map(|c| c.access_key.clone()).unwrap_or_default();
        let buckets = self.node.s3_buckets(origin()).await.map_err(from_api)?;
        // The grants are read locally, once this node has applied every grant acknowledged
        // before the listing: one given through another node a moment ago shows its bucket.
        self.node.catch_up().await.map_err(from_api)?;
        let mut visible = Vec::new();
        for (name, record) in buckets {
            let grant = self.node.s3_grant(&key_id, &name).map_err(from_api)?;
            if grant.read || grant.write || grant.owner {
                visible.push(Bucket {
                    name: Some(name),
                    creation_date: Some(timestamp(record.created_ms)),
                    bucket_region: Some(self.settings.region.clone()),
                });
            }
        }
        let output = ListBucketsOutput {
            buckets: Some(visible),
            owner: Some(Owner { id: Some(key_id.clone()), display_name: Some(key_id) }),
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }

    async fn create_bucket(&self, req: S3Request<CreateBucketInput>) -> S3Result<S3Response<CreateBucketOutput>> {
        let bucket = req.input.bucket.clone();
        meta_s3::validate_bucket_name(&bucket)
            .map_err(|why| S3Error::with_message(S3ErrorCode::InvalidBucketName, why))?;
        if let Some(constraint) = req
            .input
            .create_bucket_configuration
            .as_ref()
            .and_then(|c| c.location_constraint.as_ref())
            .filter(|c| c.as_str() != self.settings.region)
        {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidLocationConstraint,
                format!("this cluster's region is {}, not {}", self.settings.region, constraint.as_str()),
            ));
        }
        let owner = req.credentials.as_ref().map(|c| c.access_key.clone());
        self.node.s3_create_bucket(origin(), bucket.clone(), owner).await.map_err(from_api)?;
        Ok(S3Response::new(CreateBucketOutput { location: Some(format!("/{bucket}")) }))
    }

    async fn head_bucket(&self, req: S3Request<HeadBucketInput>) -> S3Result<S3Response<HeadBucketOutput>> {
        match self.node.s3_bucket(origin(), req.input.bucket.clone()).await.map_err(from_api)? {
            Some(_) => Ok(S3Response::new(HeadBucketOutput {
                bucket_region: Some(self.settings.region.clone()),
                ..Default::default()
            })),
            None => Err(S3Error::with_message(
                S3ErrorCode::NoSuchBucket,
                format!("bucket {} does not exist", req.input.bucket),
            )),
        }
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        if self.node.s3_bucket(origin(), req.input.bucket.clone()).await.map_err(from_api)?.is_none() {
            return Err(S3Error::with_message(
                S3ErrorCode::NoSuchBucket,
                format!("bucket {} does not exist", req.input.bucket),
            ));
        }
        // us-east-1 is answered as no constraint, as S3 does.
        let location =
            (self.settings.region != "us-east-1").then(|| BucketLocationConstraint::from(self.settings.region.clone()));
        Ok(S3Response::new(GetBucketLocationOutput { location_constraint: location }))
    }

    async fn delete_bucket(&self, req: S3Request<DeleteBucketInput>) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.node.s3_delete_bucket(origin(), req.input.bucket.clone()).await.map_err(from_api)?;
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        let S3Request { input, trailing_headers, .. } = req;
        let (bucket, key) = (input.bucket.clone(), input.key.clone());
        check_key(&key)?;
        let meta = object_meta(
            input.content_type.clone(),
            input.content_encoding.clone(),
            input.content_disposition.clone(),
            input.content_language.clone(),
            input.cache_control.clone(),
            input.expires.clone(),
            input.metadata.clone(),
        )?;
        let condition = write_condition(&input.if_match, &input.if_none_match)?;
        let checksum = Checksum {
            checksum_crc32: input.checksum_crc32.clone(),
            checksum_crc32c: input.checksum_crc32c.clone(),
            checksum_sha1: input.checksum_sha1.clone(),
            checksum_sha256: input.checksum_sha256.clone(),
            checksum_crc64nvme: input.checksum_crc64nvme.clone(),
            ..Default::default()
        };
        let declared =
            Self::declared(input.content_length, input.content_md5.clone(), checksum, input.checksum_algorithm.clone());
        let label = meta_s3::object_label(&bucket, &key);
        let node = self.node.clone();
        let coordinator = self.coordinator.clone();
        let (written, verified) = self
            .write(
                &input.bucket,
                label,
                input.body,
                declared,
                trailing_headers,
                |content, verified, committing, refusal| async move {
                    let mut meta = meta;
                    meta.checksums = verified.checksums.clone();
                    let put = PutObject {
                        bucket,
                        key,
                        content,
                        etag: verified.md5_hex.clone(),
                        meta,
                        // Stamped by the apply with the state clock: a node's date can be off.
                        mtime_ms: 0,
                        condition,
                    };
                    let Committing { request_id, prepare_started, carried } = committing;
                    coordinator
                        .propose_retrying(|| {
                            node.s3_put_object(request_id, put.clone(), carried.clone(), prepare_started)
                        })
                        .await
                        .map_err(|e| refuse(&refusal, e))
                },
            )
            .await?;
        let (etag_value, _) = written;
        let find = |name: &str| verified.checksums.iter().find(|(a, _)| a == name).map(|(_, v)| v.clone());
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(etag(&etag_value)),
            checksum_crc32: find("CRC32"),
            checksum_crc32c: find("CRC32C"),
            checksum_sha1: find("SHA1"),
            checksum_sha256: find("SHA256"),
            checksum_crc64nvme: find("CRC64NVME"),
            ..Default::default()
        }))
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        let (object, first) = self.object(&input.bucket, &input.key, CHUNK_PAGE_CHUNKS_MAX).await?;
        check_read_conditions(
            &object,
            &input.if_match,
            &input.if_none_match,
            &input.if_modified_since,
            &input.if_unmodified_since,
        )?;
        if input.part_number.is_some() {
            return Err(S3Error::with_message(
                S3ErrorCode::NotImplemented,
                "reading one part of an object is not supported",
            ));
        }
        let (range, content_range) = match &input.range {
            None => (0..object.size, None),
            Some(range) => {
                let within = range.check(object.size).map_err(|_| {
                    let mut error = S3Error::with_message(
                        S3ErrorCode::InvalidRange,
                        format!("the range is outside the object's {} bytes", object.size),
                    );
                    let mut headers = http::HeaderMap::new();
                    if let Ok(value) = format!("bytes */{}", object.size).parse() {
                        headers.insert(http::header::CONTENT_RANGE, value);
                    }
                    error.set_headers(headers);
                    error
                })?;
                let text = format!("bytes {}-{}/{}", within.start, within.end.saturating_sub(1), object.size);
                (within, Some(text))
            }
        };
        let length = range.end - range.start;
        let body = self.stream(input.bucket.clone(), input.key.clone(), &object, first, range);
        let meta = &object.meta;
        let checksummed = input.checksum_mode.as_ref().is_some_and(|m| m.as_str().eq_ignore_ascii_case("ENABLED"))
            && content_range.is_none();
        let output = GetObjectOutput {
            body: Some(body),
            content_length: Some(length as i64),
            content_range,
            accept_ranges: Some("bytes".into()),
            e_tag: Some(etag(&object.etag)),
            last_modified: Some(timestamp(object.last_modified_ms)),
            content_type: meta.content_type.clone().or_else(|| Some("binary/octet-stream".into())),
            content_encoding: meta.content_encoding.clone(),
            content_disposition: meta.content_disposition.clone(),
            content_language: meta.content_language.clone(),
            cache_control: meta.cache_control.clone(),
            metadata: user_metadata(meta),
            parts_count: (object.parts > 0).then_some(object.parts as i32),
            checksum_crc32: checksummed.then(|| checksum_of(meta, "CRC32")).flatten(),
            checksum_crc32c: checksummed.then(|| checksum_of(meta, "CRC32C")).flatten(),
            checksum_sha1: checksummed.then(|| checksum_of(meta, "SHA1")).flatten(),
            checksum_sha256: checksummed.then(|| checksum_of(meta, "SHA256")).flatten(),
            checksum_crc64nvme: checksummed.then(|| checksum_of(meta, "CRC64NVME")).flatten(),
            ..Default::default()
        };
        let mut response = S3Response::new(output);
        if let Some(expires) = &meta.expires {
            if let Ok(value) = expires.parse() {
                response.headers.insert(http::header::EXPIRES, value);
            }
        }
        Ok(response)
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        let input = req.input;
        let (object, _) = self.object(&input.bucket, &input.key, 0).await?;
        check_read_conditions(
            &object,
            &input.if_match,
            &input.if_none_match,
            &input.if_modified_since,
            &input.if_unmodified_since,
        )?;
        let meta = &object.meta;
        let output = HeadObjectOutput {
            content_length: Some(object.size as i64),
            accept_ranges: Some("bytes".into()),
            e_tag: Some(etag(&object.etag)),
            last_modified: Some(timestamp(object.last_modified_ms)),
            content_type: meta.content_type.clone().or_else(|| Some("binary/octet-stream".into())),
            content_encoding: meta.content_encoding.clone(),
            content_disposition: meta.content_disposition.clone(),
            content_language: meta.content_language.clone(),
            cache_control: meta.cache_control.clone(),
            metadata: user_metadata(meta),
            parts_count: (object.parts > 0).then_some(object.parts as i32),
            ..Default::default()
        };
        let mut response = S3Response::new(output);
        if let Some(expires) = &meta.expires {
            if let Ok(value) = expires.parse() {
                response.headers.insert(http::header::EXPIRES, value);
            }
        }
        Ok(response)
    }

    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        check_key(&req.input.key)?;
        self.node
            .s3_delete_objects(origin(), req.input.bucket.clone(), vec![req.input.key.clone()])
            .await
            .map_err(from_api)?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(&self, req: S3Request<DeleteObjectsInput>) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let input = req.input;
        let keys: Vec<String> = input.delete.objects.iter().map(|o| o.key.clone()).collect();
        if keys.len() > meta_s3::DELETE_KEYS_MAX {
            return Err(S3Error::with_message(
                S3ErrorCode::MalformedXML,
                format!("one request deletes at most {} keys", meta_s3::DELETE_KEYS_MAX),
            ));
        }
        let (valid, invalid): (Vec<String>, Vec<String>) =
            keys.into_iter().partition(|key| meta_s3::validate_object_key(key).is_ok());
        if !valid.is_empty() {
            self.node.s3_delete_objects(origin(), input.bucket.clone(), valid.clone()).await.map_err(from_api)?;
        }
        let quiet = input.delete.quiet.unwrap_or(false);
        let deleted = (!quiet)
            .then(|| valid.into_iter().map(|key| DeletedObject { key: Some(key), ..Default::default() }).collect());
        let errors: Vec<Error> = invalid
            .into_iter()
            .map(|key| Error {
                code: Some("KeyTooLongError".into()),
                message: Some("an object key is 1 to 1024 bytes".into()),
                key: Some(key),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted,
            errors: (!errors.is_empty()).then_some(errors),
            ..Default::default()
        }))
    }

    async fn copy_object(&self, req: S3Request<CopyObjectInput>) -> S3Result<S3Response<CopyObjectOutput>> {
        let input = req.input;
        let CopySource::Bucket { bucket: source_bucket, key: source_key, version_id } = &input.copy_source else {
            return Err(S3Error::with_message(S3ErrorCode::NotImplemented, "access points are not supported"));
        };
        if version_id.as_deref().is_some_and(|v| v != "null") {
            return Err(S3Error::with_message(S3ErrorCode::NoSuchVersion, "buckets are not versioned"));
        }
        check_key(source_key)?;
        check_key(&input.key)?;
        let replace = input.metadata_directive.as_ref().is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        let meta = if replace {
            Some(object_meta(
                input.content_type.clone(),
                input.content_encoding.clone(),
                input.content_disposition.clone(),
                input.content_language.clone(),
                input.cache_control.clone(),
                input.expires.clone(),
                input.metadata.clone(),
            )?)
        } else {
            None
        };
        let source_condition = Precondition {
            etag_in: etag_list(&input.copy_source_if_match),
            etag_not_in: etag_list(&input.copy_source_if_none_match),
            modified_since_ms: input.copy_source_if_modified_since.as_ref().map(millis),
            unmodified_since_ms: input.copy_source_if_unmodified_since.as_ref().map(millis),
            must_not_exist: false,
        };
        let copy = CopyObject {
            source_bucket: source_bucket.to_string(),
            source_key: source_key.to_string(),
            source_condition,
            bucket: input.bucket.clone(),
            key: input.key.clone(),
            condition: Precondition::default(),
            meta,
            mtime_ms: 0,
        };
        let (etag_value, modified_ms) = self.node.s3_copy_object(origin(), copy).await.map_err(from_api)?;
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(etag(&etag_value)),
                last_modified: Some(timestamp(modified_ms)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let after = match &input.continuation_token {
            Some(token) => {
                Some(position_of(token).ok_or_else(|| invalid_argument("the continuation token is not valid"))?)
            }
            None => input.start_after.clone(),
        };
        let (listing, max) =
            self.listing(&input.bucket, &prefix, input.delimiter.clone(), after, input.max_keys).await?;
        let url = wants_url(&input.encoding_type);
        let (objects, prefixes) = contents(&listing, url);
        let count = listing.objects.len() + listing.common_prefixes.len();
        let next = listing.truncated.then(|| listing.last.as_deref().map(token_after)).flatten();
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(encode(prefix, url)),
            delimiter: input.delimiter.map(|d| encode(d, url)),
            max_keys: Some(max),
            key_count: Some(count as i32),
            is_truncated: Some(listing.truncated),
            continuation_token: input.continuation_token,
            next_continuation_token: next,
            start_after: input.start_after.map(|s| encode(s, url)),
            encoding_type: input.encoding_type,
            contents: objects,
            common_prefixes: prefixes,
            ..Default::default()
        }))
    }

    async fn list_objects(&self, req: S3Request<ListObjectsInput>) -> S3Result<S3Response<ListObjectsOutput>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let (listing, max) =
            self.listing(&input.bucket, &prefix, input.delimiter.clone(), input.marker.clone(), input.max_keys).await?;
        let url = wants_url(&input.encoding_type);
        let (objects, prefixes) = contents(&listing, url);
        let next_marker = listing.truncated.then(|| listing.last.clone().map(|last| encode(last, url))).flatten();
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(encode(prefix, url)),
            delimiter: input.delimiter.map(|d| encode(d, url)),
            marker: Some(input.marker.map(|m| encode(m, url)).unwrap_or_default()),
            next_marker,
            max_keys: Some(max),
            is_truncated: Some(listing.truncated),
            encoding_type: input.encoding_type,
            contents: objects,
            common_prefixes: prefixes,
            ..Default::default()
        }))
    }

    async fn list_object_versions(
        &self,
        req: S3Request<ListObjectVersionsInput>,
    ) -> S3Result<S3Response<ListObjectVersionsOutput>> {
        // Buckets are unversioned: every object is its only, latest, "null" version.
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let (listing, max) = self
            .listing(&input.bucket, &prefix, input.delimiter.clone(), input.key_marker.clone(), input.max_keys)
            .await?;
        let url = wants_url(&input.encoding_type);
        let (objects, prefixes) = contents(&listing, url);
        let versions = objects.map(|objects| {
            objects
                .into_iter()
                .map(|object| ObjectVersion {
                    key: object.key,
                    version_id: Some("null".into()),
                    is_latest: Some(true),
                    last_modified: object.last_modified,
                    e_tag: object.e_tag,
                    size: object.size,
                    storage_class: Some(ObjectVersionStorageClass::from_static(ObjectVersionStorageClass::STANDARD)),
                    ..Default::default()
                })
                .collect()
        });
        let next = listing.truncated.then(|| listing.last.clone().map(|last| encode(last, url))).flatten();
        Ok(S3Response::new(ListObjectVersionsOutput {
            name: Some(input.bucket),
            prefix: Some(encode(prefix, url)),
            delimiter: input.delimiter.map(|d| encode(d, url)),
            key_marker: input.key_marker.map(|m| encode(m, url)),
            next_key_marker: next.clone(),
            next_version_id_marker: next.map(|_| "null".into()),
            max_keys: Some(max),
            is_truncated: Some(listing.truncated),
            encoding_type: input.encoding_type,
            versions,
            common_prefixes: prefixes,
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let input = req.input;
        check_key(&input.key)?;
        let meta = object_meta(
            input.content_type.clone(),
            input.content_encoding.clone(),
            input.content_disposition.clone(),
            input.content_language.clone(),
            input.cache_control.clone(),
            input.expires.clone(),
            input.metadata.clone(),
        )?;
        let upload =
            // Initiated at the state clock when it applies (0): its expiry is measured on it.
            MultipartUpload { bucket: input.bucket.clone(), key: input.key.clone(), initiated_ms: 0, meta };
        let upload_id = self.node.s3_create_multipart(origin(), upload).await.map_err(from_api)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload_id_text(upload_id)),
            ..Default::default()
        }))
    }

    async fn upload_part(&self, req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        let S3Request { input, trailing_headers, .. } = req;
        let upload_id = parse_upload_id(&input.upload_id)?;
        let part_number = u32::try_from(input.part_number)
            .ok()
            .filter(|n| (1..=meta_s3::PARTS_MAX).contains(n))
            .ok_or_else(|| invalid_argument(format!("part numbers are 1 to {}", meta_s3::PARTS_MAX)))?;
        let checksum = Checksum {
            checksum_crc32: input.checksum_crc32.clone(),
            checksum_crc32c: input.checksum_crc32c.clone(),
            checksum_sha1: input.checksum_sha1.clone(),
            checksum_sha256: input.checksum_sha256.clone(),
            checksum_crc64nvme: input.checksum_crc64nvme.clone(),
            ..Default::default()
        };
        let declared =
            Self::declared(input.content_length, input.content_md5.clone(), checksum, input.checksum_algorithm.clone());
        let (bucket, key) = (input.bucket.clone(), input.key.clone());
        self.upload_must_exist(upload_id, &bucket, &key).await?;
        let label = meta_s3::part_label(upload_id, part_number);
        let node = self.node.clone();
        let coordinator = self.coordinator.clone();
        let (etag_value, verified) = self
            .write(
                &input.bucket,
                label,
                input.body,
                declared,
                trailing_headers,
                |content, verified, committing, refusal| async move {
                    let put = PutPart {
                        upload_id,
                        bucket,
                        key,
                        part_number,
                        content,
                        etag: verified.md5_hex.clone(),
                        mtime_ms: 0,
                    };
                    commit_part(&node, &coordinator, put, committing, &refusal).await.map(|(etag, _)| etag)
                },
            )
            .await?;
        let find = |name: &str| verified.checksums.iter().find(|(a, _)| a == name).map(|(_, v)| v.clone());
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(etag(&etag_value)),
            checksum_crc32: find("CRC32"),
            checksum_crc32c: find("CRC32C"),
            checksum_sha1: find("SHA1"),
            checksum_sha256: find("SHA256"),
            checksum_crc64nvme: find("CRC64NVME"),
            ..Default::default()
        }))
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        let input = req.input;
        let upload_id = parse_upload_id(&input.upload_id)?;
        let part_number = u32::try_from(input.part_number)
            .ok()
            .filter(|n| (1..=meta_s3::PARTS_MAX).contains(n))
            .ok_or_else(|| invalid_argument(format!("part numbers are 1 to {}", meta_s3::PARTS_MAX)))?;
        let CopySource::Bucket { bucket: source_bucket, key: source_key, version_id } = &input.copy_source else {
            return Err(S3Error::with_message(S3ErrorCode::NotImplemented, "access points are not supported"));
        };
        if version_id.as_deref().is_some_and(|v| v != "null") {
            return Err(S3Error::with_message(S3ErrorCode::NoSuchVersion, "buckets are not versioned"));
        }
        self.upload_must_exist(upload_id, &input.bucket, &input.key).await?;
        let (source, first) = self.object(source_bucket, source_key, CHUNK_PAGE_CHUNKS_MAX).await?;
        let condition = Precondition {
            etag_in: etag_list(&input.copy_source_if_match),
            etag_not_in: etag_list(&input.copy_source_if_none_match),
            modified_since_ms: input.copy_source_if_modified_since.as_ref().map(millis),
            unmodified_since_ms: input.copy_source_if_unmodified_since.as_ref().map(millis),
            must_not_exist: false,
        };
        if let Some(why) = meta_s3::precondition_failure(&condition, Some(&source)) {
            return Err(S3Error::with_message(S3ErrorCode::PreconditionFailed, format!("copy source: {why}")));
        }
        let range = match &input.copy_source_range {
            None => 0..source.size,
            Some(text) => match Range::parse(text) {
                Ok(range @ Range::Int { last: Some(last), .. }) if last < source.size => {
                    range.check(source.size).map_err(|_| {
                        S3Error::with_message(S3ErrorCode::InvalidRange, format!("{text} is outside the source"))
                    })?
                }
                _ => {
                    return Err(S3Error::with_message(
                        S3ErrorCode::InvalidRange,
                        format!(
                            "x-amz-copy-source-range {text:?} must be bytes=FIRST-LAST within the source's {} bytes",
                            source.size
                        ),
                    ))
                }
            },
        };
        let length = range.end - range.start;
        // The source's bytes flow through this node into new chunks: a part is its own chunk
        // list (whole chunks that match the source's are stored once, by their hash).
        let body = self.stream(source_bucket.to_string(), source_key.to_string(), &source, first, range);
        let declared = Declared { length: Some(length), ..Default::default() };
        let (bucket, key) = (input.bucket.clone(), input.key.clone());
        let label = meta_s3::part_label(upload_id, part_number);
        let node = self.node.clone();
        let coordinator = self.coordinator.clone();
        let ((etag_value, modified_ms), _) = self
            .write(
                &input.bucket,
                label,
                Some(body),
                declared,
                None,
                |content, verified, committing, refusal| async move {
                    let put = PutPart {
                        upload_id,
                        bucket,
                        key,
                        part_number,
                        content,
                        etag: verified.md5_hex.clone(),
                        mtime_ms: 0,
                    };
                    commit_part(&node, &coordinator, put, committing, &refusal).await
                },
            )
            .await?;
        Ok(S3Response::new(UploadPartCopyOutput {
            copy_part_result: Some(CopyPartResult {
                e_tag: Some(etag(&etag_value)),
                last_modified: Some(timestamp(modified_ms)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let input = req.input;
        let upload_id = parse_upload_id(&input.upload_id)?;
        let listed = input.multipart_upload.and_then(|upload| upload.parts).unwrap_or_default();
        let mut parts = Vec::with_capacity(listed.len());
        for part in listed {
            let number = part.part_number.and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                S3Error::with_message(S3ErrorCode::InvalidPart, "every listed part needs a part number")
            })?;
            let tag = part.e_tag.map(|tag| tag.value().to_string()).ok_or_else(|| {
                S3Error::with_message(S3ErrorCode::InvalidPart, format!("part {number} is listed without its ETag"))
            })?;
            parts.push((number, tag));
        }
        let condition = write_condition(&input.if_match, &input.if_none_match)?;
        let complete = CompleteUpload {
            upload_id,
            bucket: input.bucket.clone(),
            key: input.key.clone(),
            parts,
            min_part_bytes: self.settings.min_part_bytes,
            condition,
            mtime_ms: 0,
        };
        let request_id = completion_id(&complete);
        let (etag_value, _) = self
            .coordinator
            .propose_retrying(|| self.node.s3_complete_multipart(origin(), request_id, complete.clone()))
            .await
            .map_err(from_api)?;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket.clone()),
            key: Some(input.key.clone()),
            e_tag: Some(etag(&etag_value)),
            location: Some(format!("/{}/{}", input.bucket, input.key)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let upload_id = parse_upload_id(&req.input.upload_id)?;
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        self.node.s3_abort_multipart(origin(), upload_id, bucket, key).await.map_err(from_api)?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max = input.max_uploads.unwrap_or(1000).clamp(0, 1000);
        let upload_marker = match &input.upload_id_marker {
            Some(marker) if input.key_marker.is_some() => Some(parse_upload_id(marker)?),
            _ => None,
        };
        let (uploads, truncated) = self
            .node
            .s3_list_uploads(
                origin(),
                input.bucket.clone(),
                prefix.clone(),
                input.key_marker.clone(),
                upload_marker,
                max as u32,
            )
            .await
            .map_err(from_api)?;
        let url = wants_url(&input.encoding_type);
        let last = uploads.last().map(|u| (u.key.clone(), upload_id_text(u.upload_id)));
        let uploads: Vec<s3s::dto::MultipartUpload> = uploads
            .into_iter()
            .map(|upload| s3s::dto::MultipartUpload {
                key: Some(encode(upload.key, url)),
                upload_id: Some(upload_id_text(upload.upload_id)),
                initiated: Some(timestamp(upload.initiated_ms)),
                storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: Some(encode(prefix, url)),
            key_marker: input.key_marker.map(|m| encode(m, url)),
            upload_id_marker: input.upload_id_marker,
            next_key_marker: truncated.then(|| last.as_ref().map(|(key, _)| encode(key.clone(), url))).flatten(),
            next_upload_id_marker: truncated.then(|| last.map(|(_, id)| id)).flatten(),
            max_uploads: Some(max),
            is_truncated: Some(truncated),
            encoding_type: input.encoding_type,
            uploads: Some(uploads),
            ..Default::default()
        }))
    }

    async fn list_parts(&self, req: S3Request<ListPartsInput>) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        let upload_id = parse_upload_id(&input.upload_id)?;
        let max = input.max_parts.unwrap_or(1000).clamp(0, 1000);
        let after = input.part_number_marker.and_then(|m| u32::try_from(m).ok()).unwrap_or(0);
        let found = self.node.s3_list_parts(origin(), upload_id, after, max as u32 + 1).await.map_err(from_api)?;
        let Some((upload, mut parts)) =
            found.filter(|(upload, _)| upload.bucket == input.bucket && upload.key == input.key)
        else {
            return Err(S3Error::with_message(
                S3ErrorCode::NoSuchUpload,
                format!("upload {} does not exist", input.upload_id),
            ));
        };
        let truncated = parts.len() > max as usize;
        parts.truncate(max as usize);
        let next = truncated.then(|| parts.last().map(|(n, _)| *n as i32)).flatten();
        let parts = parts
            .into_iter()
            .map(|(number, part)| Part {
                part_number: Some(number as i32),
                e_tag: Some(etag(&part.etag)),
                size: Some(part.size as i64),
                last_modified: Some(timestamp(part.last_modified_ms)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(upload.bucket),
            key: Some(upload.key),
            upload_id: Some(input.upload_id),
            part_number_marker: input.part_number_marker,
            next_part_number_marker: next,
            max_parts: Some(max),
            is_truncated: Some(truncated),
            parts: Some(parts),
            storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
            ..Default::default()
        }))
    }
}
