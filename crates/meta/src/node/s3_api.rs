//! `MetaNode`'s S3 face: typed writes through Raft and linearizable reads on the leader, for
//! the S3 gateway and the S3 admin service.

use serde::{Deserialize, Serialize};

use super::{
    unexpected, ChunkPage, ChunkRef, LeaderRequest, LeaderResponse, MetaNode, Origin, CHUNK_PAGE_BYTES_MAX,
    CHUNK_PAGE_CHUNKS_MAX,
};
use std::time::Instant;

use crate::clock::Age;
use crate::error::ApiError;
use crate::files;
use crate::s3::{
    self, AccessKeyRecord, BucketRecord, CompleteUpload, CopyObject, Grant, MultipartUpload, ObjectListing,
    ObjectRecord, PartRecord, PutObject, PutPart, UploadSummary,
};
use crate::schema::{CommandError, Outcome, StateStore};
use crate::state::{Command, RequestId};

/// Buckets one listing returns at most.
pub const BUCKETS_LISTED_MAX: usize = 10_000;
/// Entries one object listing returns at most (S3's own maximum for max-keys).
pub const OBJECTS_LISTED_MAX: usize = 1_000;

/// A linearizable S3 read the leader serves; travels inside `LeaderRequest::S3`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum S3Read {
    /// An object's record and a page of its chunks (limit 0: the record alone); with
    /// `pieces`, refused unless that is still the object's content.
    Object {
        bucket: String,
        key: String,
        pieces: Option<u64>,
        from_index: u64,
        limit: u32,
    },
    List {
        bucket: String,
        prefix: String,
        delimiter: Option<String>,
        after: Option<String>,
        max: u32,
    },
    Buckets,
    Bucket {
        bucket: String,
    },
    Uploads {
        bucket: String,
        prefix: String,
        key_marker: Option<String>,
        upload_marker: Option<u64>,
        max: u32,
    },
    Parts {
        upload_id: u64,
        after: u32,
        max: u32,
    },
    AccessKey {
        key_id: String,
    },
    AccessKeys,
    Grant {
        key_id: String,
        bucket: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum S3Answer {
    Object(Option<(ObjectRecord, ChunkPage)>),
    List(ObjectListing),
    Buckets(Vec<(String, BucketRecord)>),
    Bucket(Option<BucketRecord>),
    Uploads { uploads: Vec<UploadSummary>, truncated: bool },
    Parts(Option<(MultipartUpload, Vec<(u32, PartRecord)>)>),
    AccessKey(Option<AccessKeyRecord>),
    AccessKeys(Vec<AccessKeyView>),
    Grant(Grant),
}

/// An access key as the admin lists it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKeyView {
    pub key_id: String,
    pub name: String,
    pub create_buckets: bool,
    pub created_ms: u64,
    pub grants: Vec<(String, Grant)>,
}

/// Answers `read` from `view` (on the leader, behind its read-index barrier).
pub(crate) fn answer(view: &impl StateStore, read: S3Read) -> Result<S3Answer, ApiError> {
    let internal = ApiError::internal;
    Ok(match read {
        S3Read::Object { bucket, key, pieces, from_index, limit } => {
            if s3::get_bucket(view, &bucket).map_err(internal)?.is_none() {
                return Err(CommandError::NoSuchBucket { bucket }.into());
            }
            let object = s3::get_object(view, &bucket, &key).map_err(internal)?;
            if let Some(expected) = pieces {
                if object.as_ref().map(|o| o.pieces) != Some(expected) {
                    return Err(CommandError::PreconditionFailed {
                        why: format!("{key:?} changed while it was read (overwritten or deleted); read it again"),
                    }
                    .into());
                }
            }
            let Some(object) = object else { return Ok(S3Answer::Object(None)) };
            let limit = limit.min(CHUNK_PAGE_CHUNKS_MAX) as usize;
            let listed = s3::object_chunk_page(view, &object, from_index, limit).map_err(internal)?;
            let chunks = with_replicas(view, listed, &key)?;
            let page = ChunkPage { version: object.pieces, n_chunks: object.n_chunks, from_index, chunks };
            S3Answer::Object(Some((object, page)))
        }
        S3Read::List { bucket, prefix, delimiter, after, max } => {
            if s3::get_bucket(view, &bucket).map_err(internal)?.is_none() {
                return Err(CommandError::NoSuchBucket { bucket }.into());
            }
            let max = (max as usize).min(OBJECTS_LISTED_MAX);
            S3Answer::List(
                s3::list_objects(view, &bucket, &prefix, delimiter.as_deref(), after.as_deref(), max)
                    .map_err(internal)?,
            )
        }
        S3Read::Buckets => S3Answer::Buckets(s3::list_buckets(view, BUCKETS_LISTED_MAX).map_err(internal)?),
        S3Read::Bucket { bucket } => S3Answer::Bucket(s3::get_bucket(view, &bucket).map_err(internal)?),
        S3Read::Uploads { bucket, prefix, key_marker, upload_marker, max } => {
            if s3::get_bucket(view, &bucket).map_err(internal)?.is_none() {
                return Err(CommandError::NoSuchBucket { bucket }.into());
            }
            let max = (max as usize).min(OBJECTS_LISTED_MAX);
            let (uploads, truncated) =
                s3::list_multipart(view, &bucket, &prefix, key_marker.as_deref(), upload_marker, max)
                    .map_err(internal)?;
            S3Answer::Uploads { uploads, truncated }
        }
        S3Read::Parts { upload_id, after, max } => {
            let upload = s3::get_multipart(view, upload_id).map_err(internal)?;
            match upload {
                None => S3Answer::Parts(None),
                Some(upload) => {
                    let max = (max as usize).min(OBJECTS_LISTED_MAX);
                    let parts = s3::list_parts(view, upload_id, after, max).map_err(internal)?;
                    S3Answer::Parts(Some((upload, parts)))
                }
            }
        }
        S3Read::Grant { key_id, bucket } => S3Answer::Grant(s3::get_grant(view, &key_id, &bucket).map_err(internal)?),
        S3Read::AccessKey { key_id } => S3Answer::AccessKey(s3::get_access_key(view, &key_id).map_err(internal)?),
        S3Read::AccessKeys => {
            let keys = s3::list_access_keys(view, BUCKETS_LISTED_MAX).map_err(internal)?;
            let mut views = Vec::with_capacity(keys.len());
            for (key_id, record) in keys {
                let grants = s3::grants_of(view, &key_id, BUCKETS_LISTED_MAX).map_err(internal)?;
                views.push(AccessKeyView {
                    key_id,
                    name: record.name,
                    create_buckets: record.create_buckets,
                    created_ms: record.created_ms,
                    grants,
                });
            }
            S3Answer::AccessKeys(views)
        }
    })
}

/// The chunks of a page with where their copies are, within a page's byte budget.
fn with_replicas(view: &impl StateStore, listed: Vec<files::FileChunk>, what: &str) -> Result<Vec<ChunkRef>, ApiError> {
    let mut chunks = Vec::with_capacity(listed.len());
    let mut bytes = 0;
    for chunk in listed {
        let replicas = files::chunk_replicas(view, &chunk.hash).map_err(ApiError::internal)?;
        let replicas = replicas.ok_or_else(|| {
            ApiError::Internal(format!("object {what:?} references chunk {} missing from the chunk map", chunk.hash))
        })?;
        bytes += 48 + 8 * replicas.len();
        // Always at least one chunk, so a reader makes progress.
        if bytes > CHUNK_PAGE_BYTES_MAX && !chunks.is_empty() {
            break;
        }
        chunks.push(ChunkRef { hash: chunk.hash, size: chunk.size, replicas });
    }
    Ok(chunks)
}

fn written(outcome: Outcome) -> Result<(String, u64), ApiError> {
    match outcome {
        Outcome::ObjectWritten { etag, last_modified_ms } => Ok((etag, last_modified_ms)),
        other => Err(unexpected("an S3 write", other)),
    }
}

impl MetaNode {
    async fn s3_read(&self, origin: Origin, read: S3Read) -> Result<S3Answer, ApiError> {
        match self.serve_on_leader(LeaderRequest::S3(read), origin).await? {
            LeaderResponse::S3(answer) => Ok(answer),
            other => Err(unexpected("an S3 read", other)),
        }
    }

    pub async fn s3_create_bucket(
        &self,
        origin: Origin,
        bucket: String,
        owner: Option<String>,
    ) -> Result<(), ApiError> {
        self.execute(origin, None, Command::S3CreateBucket { bucket, owner }).await.map(drop)
    }

    pub async fn s3_delete_bucket(&self, origin: Origin, bucket: String) -> Result<(), ApiError> {
        self.execute(origin, None, Command::S3DeleteBucket { bucket }).await.map(drop)
    }

    pub async fn s3_put_access_key(
        &self,
        origin: Origin,
        key_id: String,
        record: AccessKeyRecord,
    ) -> Result<(), ApiError> {
        self.execute(origin, None, Command::S3PutAccessKey { key_id, record }).await.map(drop)
    }

    pub async fn s3_delete_access_key(&self, origin: Origin, key_id: String) -> Result<(), ApiError> {
        self.execute(origin, None, Command::S3DeleteAccessKey { key_id }).await?;
        self.rights_reduced().await;
        Ok(())
    }

    pub async fn s3_set_grant(
        &self,
        origin: Origin,
        key_id: String,
        bucket: String,
        grant: Grant,
    ) -> Result<(), ApiError> {
        let reduces = !(grant.read && grant.write && grant.owner);
        self.execute(origin, None, Command::S3SetGrant { key_id, bucket, grant }).await?;
        // A grant without every right may be taking some away.
        if reduces {
            self.rights_reduced().await;
        }
        Ok(())
    }

    /// Phase two of an object write; `request_id` makes a retry return the first outcome.
    /// Returns the ETag and the modification time.
    /// `prepare_started` as for [`MetaNode::commit_file`].
    pub async fn s3_put_object(
        &self,
        request_id: RequestId,
        put: PutObject,
        carried: super::Carried,
        prepare_started: Instant,
    ) -> Result<(String, u64), ApiError> {
        let command = super::with_carried(carried, Command::S3PutObject(Box::new(put)));
        written(self.execute_aged(Origin::LOCAL, Some(request_id), command, Some(Age::since(prepare_started))).await?)
    }

    pub async fn s3_copy_object(&self, origin: Origin, copy: CopyObject) -> Result<(String, u64), ApiError> {
        written(self.execute(origin, None, Command::S3CopyObject(Box::new(copy))).await?)
    }

    /// Deletes keys (at most [`s3::DELETE_KEYS_MAX`]); answers which existed.
    pub async fn s3_delete_objects(
        &self,
        origin: Origin,
        bucket: String,
        keys: Vec<String>,
    ) -> Result<Vec<bool>, ApiError> {
        match self.execute(origin, None, Command::S3DeleteObjects { bucket, keys }).await? {
            Outcome::ObjectsDeleted { found } => Ok(found),
            other => Err(unexpected("an S3 delete", other)),
        }
    }

    pub async fn s3_create_multipart(&self, origin: Origin, upload: MultipartUpload) -> Result<u64, ApiError> {
        match self.execute(origin, None, Command::S3CreateMultipart(Box::new(upload))).await? {
            Outcome::MultipartCreated { upload_id } => Ok(upload_id),
            other => Err(unexpected("a multipart creation", other)),
        }
    }

    /// Returns the part's ETag and modification time.
    /// `prepare_started` as for [`MetaNode::commit_file`].
    pub async fn s3_put_part(
        &self,
        request_id: RequestId,
        put: PutPart,
        carried: super::Carried,
        prepare_started: Instant,
    ) -> Result<(String, u64), ApiError> {
        let command = super::with_carried(carried, Command::S3PutPart(Box::new(put)));
        written(self.execute_aged(Origin::LOCAL, Some(request_id), command, Some(Age::since(prepare_started))).await?)
    }

    pub async fn s3_complete_multipart(
        &self,
        origin: Origin,
        request_id: RequestId,
        complete: CompleteUpload,
    ) -> Result<(String, u64), ApiError> {
        written(self.execute(origin, Some(request_id), Command::S3CompleteMultipart(Box::new(complete))).await?)
    }

    pub async fn s3_abort_multipart(
        &self,
        origin: Origin,
        upload_id: u64,
        bucket: String,
        key: String,
    ) -> Result<(), ApiError> {
        self.execute(origin, None, Command::S3AbortMultipart { upload_id, bucket, key }).await.map(drop)
    }

    /// An object's record and its first `limit` chunks; None if it does not exist.
    /// `NoSuchBucket` if the bucket does not.
    pub async fn s3_object(
        &self,
        origin: Origin,
        bucket: String,
        key: String,
        limit: u32,
    ) -> Result<Option<(ObjectRecord, ChunkPage)>, ApiError> {
        match self.s3_read(origin, S3Read::Object { bucket, key, pieces: None, from_index: 0, limit }).await? {
            S3Answer::Object(found) => Ok(found),
            other => Err(unexpected("an S3 object read", other)),
        }
    }

    /// The page of an object's content from `from_index`, while `pieces` is still its content.
    pub async fn s3_object_page(
        &self,
        bucket: String,
        key: String,
        pieces: u64,
        from_index: u64,
        limit: u32,
    ) -> Result<ChunkPage, ApiError> {
        let read = S3Read::Object { bucket, key, pieces: Some(pieces), from_index, limit };
        match self.s3_read(Origin::LOCAL, read).await? {
            S3Answer::Object(Some((_, page))) => Ok(page),
            other => Err(unexpected("an S3 object page", other)),
        }
    }

    pub async fn s3_list_objects(
        &self,
        origin: Origin,
        bucket: String,
        prefix: String,
        delimiter: Option<String>,
        after: Option<String>,
        max: u32,
    ) -> Result<ObjectListing, ApiError> {
        match self.s3_read(origin, S3Read::List { bucket, prefix, delimiter, after, max }).await? {
            S3Answer::List(listing) => Ok(listing),
            other => Err(unexpected("an S3 listing", other)),
        }
    }

    pub async fn s3_buckets(&self, origin: Origin) -> Result<Vec<(String, BucketRecord)>, ApiError> {
        match self.s3_read(origin, S3Read::Buckets).await? {
            S3Answer::Buckets(buckets) => Ok(buckets),
            other => Err(unexpected("the bucket list", other)),
        }
    }

    pub async fn s3_bucket(&self, origin: Origin, bucket: String) -> Result<Option<BucketRecord>, ApiError> {
        match self.s3_read(origin, S3Read::Bucket { bucket }).await? {
            S3Answer::Bucket(found) => Ok(found),
            other => Err(unexpected("a bucket", other)),
        }
    }

    pub async fn s3_list_uploads(
        &self,
        origin: Origin,
        bucket: String,
        prefix: String,
        key_marker: Option<String>,
        upload_marker: Option<u64>,
        max: u32,
    ) -> Result<(Vec<UploadSummary>, bool), ApiError> {
        match self.s3_read(origin, S3Read::Uploads { bucket, prefix, key_marker, upload_marker, max }).await? {
            S3Answer::Uploads { uploads, truncated } => Ok((uploads, truncated)),
            other => Err(unexpected("the upload list", other)),
        }
    }

    pub async fn s3_list_parts(
        &self,
        origin: Origin,
        upload_id: u64,
        after: u32,
        max: u32,
    ) -> Result<Option<(MultipartUpload, Vec<(u32, PartRecord)>)>, ApiError> {
        match self.s3_read(origin, S3Read::Parts { upload_id, after, max }).await? {
            S3Answer::Parts(found) => Ok(found),
            other => Err(unexpected("the part list", other)),
        }
    }

    /// Every access key with its grants, without secrets.
    pub async fn s3_access_keys(&self, origin: Origin) -> Result<Vec<AccessKeyView>, ApiError> {
        match self.s3_read(origin, S3Read::AccessKeys).await? {
            S3Answer::AccessKeys(keys) => Ok(keys),
            other => Err(unexpected("the access keys", other)),
        }
    }

    /// An access key, from this node's state, or from the leader's when this node has not
    /// applied it yet (a key created a moment ago, a node catching up).
    pub async fn s3_access_key(&self, key_id: &str) -> Result<Option<AccessKeyRecord>, ApiError> {
        // A key deleted a moment ago must not sign requests here on an old view.
        self.rights_state_fresh().await?;
        let local = self.state.view().and_then(|view| s3::get_access_key(&view, key_id)).map_err(ApiError::internal)?;
        if local.is_some() {
            return Ok(local);
        }
        match self.s3_read(Origin::LOCAL, S3Read::AccessKey { key_id: key_id.to_string() }).await? {
            S3Answer::AccessKey(found) => Ok(found),
            other => Err(unexpected("an access key", other)),
        }
    }

    /// What `key_id` may do in `bucket`, from this node's state (a grant changed a moment ago
    /// may show after a short lag; a refusal the caller wants to be sure of can ask
    /// [`MetaNode::s3_grant_from_leader`]).
    pub fn s3_grant(&self, key_id: &str, bucket: &str) -> Result<Grant, ApiError> {
        self.state.view().and_then(|view| s3::get_grant(&view, key_id, bucket)).map_err(ApiError::internal)
    }

    /// What `key_id` may do in `bucket`, as the leader knows it.
    pub async fn s3_grant_from_leader(&self, key_id: &str, bucket: &str) -> Result<Grant, ApiError> {
        let read = S3Read::Grant { key_id: key_id.to_string(), bucket: bucket.to_string() };
        match self.s3_read(Origin::LOCAL, read).await? {
            S3Answer::Grant(grant) => Ok(grant),
            other => Err(unexpected("a grant", other)),
        }
    }
}
