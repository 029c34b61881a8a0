//! The S3 keyspace inside the metadata state machine, free of I/O: buckets, objects,
//! multipart uploads and their parts, access keys and what each key may do.
//!
//! S3 is a keyspace of its own, beside the file namespace: bucket and key rules are S3's (a key
//! is 1 to 1,024 bytes of UTF-8 with `//`, `..` and a trailing `/` allowed), and nothing here
//! is reachable by a file path. The data is shared: an object's content is chunk sets in the
//! same `Segments` table, referencing the same chunk records, so repair, scrub and garbage
//! collection treat S3 data exactly like file data.
//!
//! **Objects are lists of pieces.** An object's content is a *piece list*: one piece (a chunk
//! set) for a single-part upload, one per part for a multipart upload, so completing an upload
//! of 10,000 parts moves 10,000 small rows instead of rewriting its chunk lists. A piece list
//! is reference-counted, so a server-side copy is a new object record naming the same list: no
//! data and no chunk list is copied. When the last object naming a list goes, its pieces' chunk
//! sets are queued for `ReleaseChunks`, a bounded amount of work per apply.
//!
//! **Conditions are checked in the apply.** `If-None-Match: *` and `If-Match` on a put, and a
//! copy's source conditions, are decided by the replicated state machine in the same entry that
//! writes, so two racing conditional writers cannot both win.

use serde::{Deserialize, Serialize};

use crate::files::{
    chunk_list_page, install_chunk_list, queue_chunk_set_release, stamped, u64_at, CommittedChunk, FileChunk,
    NewChunkList,
};
use crate::schema::{
    decode, encode, get_u64, prefix_end, put_u64, CommandError, CommandResult, Outcome, StateStore, StoreError, Table,
};

/// The longest object key, in bytes (S3's limit).
pub const OBJECT_KEY_BYTES_MAX: usize = 1_024;
/// The most parts a multipart upload may have (S3's limit), and so the most pieces of a list.
pub const PARTS_MAX: u32 = 10_000;
/// The most keys one `DeleteObjects` names (S3's limit).
pub const DELETE_KEYS_MAX: usize = 1_000;
/// User metadata, all names and values together, at most (S3's limit: 2 KiB).
pub const USER_METADATA_BYTES_MAX: usize = 2_048;
/// Uploads `S3ExpireUploads` aborts per apply: bounded work, the rest with the next one.
const UPLOADS_EXPIRED_PER_APPLY: usize = 64;

const META_NEXT_PIECE_LIST: &[u8] = b"s3_next_piece_list";
const META_NEXT_MULTIPART: &[u8] = b"s3_next_multipart";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRecord {
    pub created_ms: u64,
}

/// An S3 access key. The secret is stored as is: AWS Signature V4 is an HMAC keyed by it, so
/// every node must be able to compute it (as in AWS, Garage and MinIO). The metadata's Raft
/// traffic and files are as sensitive as the keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKeyRecord {
    pub name: String,
    pub secret: String,
    /// May create buckets (and becomes their owner).
    pub create_buckets: bool,
    pub created_ms: u64,
}

/// What one access key may do in one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub read: bool,
    pub write: bool,
    /// May delete the bucket.
    pub owner: bool,
}

impl Grant {
    pub const ALL: Grant = Grant { read: true, write: true, owner: true };

    pub fn is_empty(&self) -> bool {
        !self.read && !self.write && !self.owner
    }
}

/// The headers S3 stores with an object and returns with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub content_disposition: Option<String>,
    pub content_language: Option<String>,
    pub cache_control: Option<String>,
    /// The `Expires` header as the client sent it.
    pub expires: Option<String>,
    /// `x-amz-meta-*`, names without the prefix, in lower case.
    pub user: Vec<(String, String)>,
    /// Checksums the client sent and the gateway verified: (algorithm, base64 value).
    pub checksums: Vec<(String, String)>,
}

impl ObjectMeta {
    /// Bytes of user metadata, counted as S3 counts them (names and values).
    pub fn user_bytes(&self) -> usize {
        self.user.iter().map(|(name, value)| name.len() + value.len()).sum()
    }

    fn approximate_bytes(&self) -> usize {
        let optional = [
            &self.content_type,
            &self.content_encoding,
            &self.content_disposition,
            &self.content_language,
            &self.cache_control,
            &self.expires,
        ];
        optional.iter().map(|field| field.as_ref().map_or(0, String::len)).sum::<usize>()
            + self.user_bytes()
            + self.checksums.iter().map(|(a, v)| a.len() + v.len()).sum::<usize>()
    }
}

/// An object's current (and only: buckets are unversioned) version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub size: u64,
    /// The ETag without quotes: the MD5 of the content in hex, or for a multipart upload the
    /// MD5 of the parts' MD5s followed by `-` and the number of parts.
    pub etag: String,
    pub last_modified_ms: u64,
    /// The piece list holding the content; also what identifies this version for a reader
    /// that pages through it.
    pub pieces: u64,
    pub n_chunks: u64,
    /// 0 for a single-part upload.
    pub parts: u32,
    pub meta: ObjectMeta,
}

/// What a listing shows of an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectSummary {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub last_modified_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PieceList {
    /// Objects naming this list.
    refs: u64,
}

/// One piece of an object: a chunk set holding the chunks from `first_index` on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Piece {
    chunk_set: u64,
    first_index: u64,
    n_chunks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultipartUpload {
    pub bucket: String,
    pub key: String,
    /// When the upload began, on the state clock, which its expiry is measured on. The gateway
    /// sends 0, and the apply records the state clock; a gateway's date would tie the expiry to
    /// one node's clock. (Entries from before this rule carry the gateway's date, kept.)
    pub initiated_ms: u64,
    pub meta: ObjectMeta,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    /// The MD5 of the part in hex, without quotes.
    pub etag: String,
    pub size: u64,
    pub last_modified_ms: u64,
    chunk_set: u64,
    n_chunks: u64,
}

/// The content an S3 write commits, as prepared by its coordinator (see
/// [`crate::files::NewChunkList`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Content {
    pub size: u64,
    pub chunks: Vec<CommittedChunk>,
    /// The upload whose segments were staged (with [`object_label`] or [`part_label`] as
    /// their path) before `chunks`.
    pub upload_id: Option<u64>,
    pub first_index: u64,
    /// As in [`crate::files::CommitFile`]: filled in by the leader.
    pub prepared_at_ms: u64,
    pub grace_ms: u64,
}

impl S3Content {
    fn as_list<'a>(&'a self, label: &'a str) -> NewChunkList<'a> {
        NewChunkList {
            label,
            size: self.size,
            chunks: &self.chunks,
            upload_id: self.upload_id,
            first_index: self.first_index,
            prepared_at_ms: self.prepared_at_ms,
            grace_ms: self.grace_ms,
        }
    }

    pub fn approximate_bytes(&self) -> usize {
        self.chunks.iter().map(crate::files::committed_chunk_bytes).sum::<usize>() + 48
    }
}

/// Conditions on the current version of the key a write replaces (or a copy reads).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Precondition {
    /// `If-None-Match: *`: the key must not exist.
    pub must_not_exist: bool,
    /// `If-Match`: the current ETag must be one of these (`*`: any existing object).
    pub etag_in: Option<Vec<String>>,
    /// `If-None-Match` with ETags: the current ETag must be none of these.
    pub etag_not_in: Option<Vec<String>>,
    /// `If-Modified-Since` (ms): modified strictly after.
    pub modified_since_ms: Option<u64>,
    /// `If-Unmodified-Since` (ms): not modified after.
    pub unmodified_since_ms: Option<u64>,
}

impl Precondition {
    fn approximate_bytes(&self) -> usize {
        let tags = |tags: &Option<Vec<String>>| tags.as_ref().map_or(0, |t| t.iter().map(String::len).sum());
        16 + tags(&self.etag_in) + tags(&self.etag_not_in)
    }
}

/// Why `condition` fails against `current` (None: the key does not exist), if it does. A
/// missing key fails `If-Match` (S3 answers 412 there too, not 404, for a conditional write).
pub fn precondition_failure(condition: &Precondition, current: Option<&ObjectRecord>) -> Option<String> {
    let matches = |tags: &[String], etag: &str| tags.iter().any(|tag| tag == "*" || tag.trim_matches('"') == etag);
    if condition.must_not_exist && current.is_some() {
        return Some("the key already exists (If-None-Match: *)".into());
    }
    if let Some(tags) = &condition.etag_in {
        match current {
            Some(object) if matches(tags, &object.etag) => {}
            Some(object) => return Some(format!("the ETag is \"{}\", not one If-Match names", object.etag)),
            None => return Some("the key does not exist (If-Match)".into()),
        }
    }
    if let (Some(tags), Some(object)) = (&condition.etag_not_in, current) {
        if matches(tags, &object.etag) {
            return Some(format!("the ETag is \"{}\", which If-None-Match names", object.etag));
        }
    }
    if let (Some(since), Some(object)) = (condition.unmodified_since_ms, current) {
        // HTTP dates have whole seconds.
        if object.last_modified_ms / 1000 > since / 1000 {
            return Some("the object was modified after If-Unmodified-Since".into());
        }
    }
    if let (Some(since), Some(object)) = (condition.modified_since_ms, current) {
        if object.last_modified_ms / 1000 <= since / 1000 {
            return Some("the object was not modified after If-Modified-Since".into());
        }
    }
    None
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutObject {
    pub bucket: String,
    pub key: String,
    pub content: S3Content,
    pub etag: String,
    pub meta: ObjectMeta,
    /// 0: stamped with the state clock at the apply (`files::stamped`), as the gateway sends
    /// it; likewise for a copy, a part and a completion.
    pub mtime_ms: u64,
    pub condition: Precondition,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyObject {
    pub source_bucket: String,
    pub source_key: String,
    pub source_condition: Precondition,
    pub bucket: String,
    pub key: String,
    pub condition: Precondition,
    /// None: keep the source's metadata (`x-amz-metadata-directive: COPY`).
    pub meta: Option<ObjectMeta>,
    pub mtime_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutPart {
    pub upload_id: u64,
    /// The bucket and key the request named: an upload is only continued through its own.
    pub bucket: String,
    pub key: String,
    pub part_number: u32,
    pub content: S3Content,
    pub etag: String,
    pub mtime_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteUpload {
    pub upload_id: u64,
    pub bucket: String,
    pub key: String,
    /// (part number, ETag) as the client listed them.
    pub parts: Vec<(u32, String)>,
    /// Every part but the last must be at least this big (S3: 5 MiB).
    pub min_part_bytes: u64,
    pub condition: Precondition,
    pub mtime_ms: u64,
}

impl PutObject {
    pub fn approximate_bytes(&self) -> usize {
        self.bucket.len()
            + self.key.len()
            + self.etag.len()
            + self.content.approximate_bytes()
            + self.meta.approximate_bytes()
            + self.condition.approximate_bytes()
    }
}

/// The path a write of `key` stages its segments under (`StageSegment` wants a valid path;
/// this one names no file, and the hex keeps any key valid).
pub fn object_label(bucket: &str, key: &str) -> String {
    format!("/.s3/{bucket}/{}", mendfs_types::hex(key.as_bytes()))
}

/// The path a part's write stages its segments under.
pub fn part_label(upload_id: u64, part_number: u32) -> String {
    format!("/.s3-part/{upload_id:016x}/{part_number}")
}

/// Checks a bucket name against S3's rules for new buckets; says what is wrong.
pub fn validate_bucket_name(name: &str) -> Result<(), String> {
    let fail = |why: &str| Err(format!("invalid bucket name {name:?}: {why}"));
    if !(3..=63).contains(&name.len()) {
        return fail("must be 3 to 63 characters long");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-') {
        return fail("may hold only lower-case letters, digits, dots and hyphens");
    }
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !edge_ok(name.as_bytes()[0]) || !edge_ok(name.as_bytes()[name.len() - 1]) {
        return fail("must begin and end with a letter or a digit");
    }
    if name.contains("..") || name.contains(".-") || name.contains("-.") {
        return fail("no two adjacent dots, and no dot next to a hyphen");
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return fail("must not look like an IP address");
    }
    if name.starts_with("xn--")
        || name.starts_with("sthree-")
        || name.ends_with("-s3alias")
        || name.ends_with("--ol-s3")
    {
        return fail("uses a prefix or suffix S3 reserves");
    }
    Ok(())
}

/// Checks an object key: 1 to 1,024 bytes (it is UTF-8 by type); any characters.
pub fn validate_object_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > OBJECT_KEY_BYTES_MAX {
        return Err(format!("an object key is 1 to {OBJECT_KEY_BYTES_MAX} bytes long; this one has {}", key.len()));
    }
    Ok(())
}

fn object_row(bucket: &str, key: &str) -> Vec<u8> {
    let mut row = Vec::with_capacity(bucket.len() + 1 + key.len());
    row.extend_from_slice(bucket.as_bytes());
    row.push(0);
    row.extend_from_slice(key.as_bytes());
    row
}

fn bucket_prefix(bucket: &str) -> Vec<u8> {
    object_row(bucket, "")
}

fn grant_row(key_id: &str, bucket: &str) -> Vec<u8> {
    let mut row = key_id.as_bytes().to_vec();
    row.push(0);
    row.extend_from_slice(bucket.as_bytes());
    row
}

fn upload_by_object_row(bucket: &str, key: &str, upload_id: u64) -> Vec<u8> {
    let mut row = object_row(bucket, key);
    row.push(0);
    row.extend_from_slice(&upload_id.to_be_bytes());
    row
}

fn upload_by_time_row(initiated_ms: u64, upload_id: u64) -> [u8; 16] {
    let mut row = [0u8; 16];
    row[..8].copy_from_slice(&initiated_ms.to_be_bytes());
    row[8..].copy_from_slice(&upload_id.to_be_bytes());
    row
}

fn part_row(upload_id: u64, part_number: u32) -> [u8; 12] {
    let mut row = [0u8; 12];
    row[..8].copy_from_slice(&upload_id.to_be_bytes());
    row[8..].copy_from_slice(&part_number.to_be_bytes());
    row
}

fn piece_row(list: u64, last_index: u64) -> [u8; 16] {
    let mut row = [0u8; 16];
    row[..8].copy_from_slice(&list.to_be_bytes());
    row[8..].copy_from_slice(&last_index.to_be_bytes());
    row
}

fn utf8(bytes: Vec<u8>, what: &str) -> Result<String, StoreError> {
    String::from_utf8(bytes).map_err(|e| StoreError(format!("{what} is not UTF-8: {e}")))
}

pub fn get_bucket(store: &impl StateStore, bucket: &str) -> Result<Option<BucketRecord>, StoreError> {
    store.get(Table::S3Buckets, bucket.as_bytes())?.map(|bytes| decode(&bytes)).transpose()
}

/// Every bucket, in name order, up to `limit`.
pub fn list_buckets(store: &impl StateStore, limit: usize) -> Result<Vec<(String, BucketRecord)>, StoreError> {
    store
        .range(Table::S3Buckets, &[], None, limit)?
        .into_iter()
        .map(|(name, value)| Ok((utf8(name, "a bucket name")?, decode(&value)?)))
        .collect()
}

pub fn get_object(store: &impl StateStore, bucket: &str, key: &str) -> Result<Option<ObjectRecord>, StoreError> {
    store.get(Table::S3Objects, &object_row(bucket, key))?.map(|bytes| decode(&bytes)).transpose()
}

pub fn get_access_key(store: &impl StateStore, key_id: &str) -> Result<Option<AccessKeyRecord>, StoreError> {
    store.get(Table::S3Keys, key_id.as_bytes())?.map(|bytes| decode(&bytes)).transpose()
}

/// Every access key (id and record), in id order, up to `limit`.
pub fn list_access_keys(store: &impl StateStore, limit: usize) -> Result<Vec<(String, AccessKeyRecord)>, StoreError> {
    store
        .range(Table::S3Keys, &[], None, limit)?
        .into_iter()
        .map(|(id, value)| Ok((utf8(id, "an access key id")?, decode(&value)?)))
        .collect()
}

pub fn get_grant(store: &impl StateStore, key_id: &str, bucket: &str) -> Result<Grant, StoreError> {
    Ok(store
        .get(Table::S3Grants, &grant_row(key_id, bucket))?
        .map(|bytes| decode(&bytes))
        .transpose()?
        .unwrap_or_default())
}

/// The buckets `key_id` has a grant in, with the grants.
pub fn grants_of(store: &impl StateStore, key_id: &str, limit: usize) -> Result<Vec<(String, Grant)>, StoreError> {
    let prefix = grant_row(key_id, "");
    let end = prefix_end(&prefix);
    store
        .range(Table::S3Grants, &prefix, end.as_deref(), limit)?
        .into_iter()
        .map(|(row, value)| Ok((utf8(row[prefix.len()..].to_vec(), "a bucket name")?, decode(&value)?)))
        .collect()
}

pub fn get_multipart(store: &impl StateStore, upload_id: u64) -> Result<Option<MultipartUpload>, StoreError> {
    store.get(Table::S3Uploads, &upload_id.to_be_bytes())?.map(|bytes| decode(&bytes)).transpose()
}

pub(crate) fn create_bucket(
    store: &mut impl StateStore,
    bucket: &str,
    owner: Option<&str>,
    clock_ms: u64,
) -> Result<CommandResult, StoreError> {
    if get_bucket(store, bucket)?.is_some() {
        let yours = match owner {
            Some(owner) => get_grant(store, owner, bucket)?.owner,
            None => true,
        };
        return Ok(Err(CommandError::BucketExists { bucket: bucket.to_string(), yours }));
    }
    store.put(Table::S3Buckets, bucket.as_bytes(), &encode(&BucketRecord { created_ms: clock_ms })?)?;
    if let Some(owner) = owner {
        store.put(Table::S3Grants, &grant_row(owner, bucket), &encode(&Grant::ALL)?)?;
    }
    Ok(Ok(Outcome::Noop))
}

pub(crate) fn delete_bucket(store: &mut impl StateStore, bucket: &str) -> Result<CommandResult, StoreError> {
    if get_bucket(store, bucket)?.is_none() {
        return Ok(Err(CommandError::NoSuchBucket { bucket: bucket.to_string() }));
    }
    let prefix = bucket_prefix(bucket);
    let end = prefix_end(&prefix);
    let has_objects = !store.range(Table::S3Objects, &prefix, end.as_deref(), 1)?.is_empty();
    let has_uploads = !store.range(Table::S3UploadsByObject, &prefix, end.as_deref(), 1)?.is_empty();
    if has_objects || has_uploads {
        return Ok(Err(CommandError::BucketNotEmpty { bucket: bucket.to_string() }));
    }
    store.remove(Table::S3Buckets, bucket.as_bytes())?;
    crate::policy::remove_bucket_policy(store, bucket)?;
    // Grants of the bucket go with it, so a bucket created later under the same name starts
    // with none. A scan of the grants table: buckets are few and deleting one is rare.
    let mut start = Vec::new();
    loop {
        let rows = store.range(Table::S3Grants, &start, None, 1_024)?;
        let full = rows.len() == 1_024;
        for (row, _) in &rows {
            if row.split(|b| *b == 0).nth(1) == Some(bucket.as_bytes()) {
                store.remove(Table::S3Grants, row)?;
            }
        }
        match rows.last() {
            Some((last, _)) if full => {
                start = last.clone();
                start.push(0);
            }
            _ => break,
        }
    }
    Ok(Ok(Outcome::Noop))
}

pub(crate) fn put_access_key(
    store: &mut impl StateStore,
    key_id: &str,
    record: &AccessKeyRecord,
) -> Result<CommandResult, StoreError> {
    if let Some(existing) = get_access_key(store, key_id)? {
        // The same key proposed again (a retry whose first attempt applied) is no conflict.
        if existing.secret != record.secret {
            return Ok(Err(CommandError::AccessKeyExists { key_id: key_id.to_string() }));
        }
    }
    store.put(Table::S3Keys, key_id.as_bytes(), &encode(record)?)?;
    Ok(Ok(Outcome::Noop))
}

pub(crate) fn delete_access_key(store: &mut impl StateStore, key_id: &str) -> Result<CommandResult, StoreError> {
    if get_access_key(store, key_id)?.is_none() {
        return Ok(Err(CommandError::NoSuchAccessKey { key_id: key_id.to_string() }));
    }
    store.remove(Table::S3Keys, key_id.as_bytes())?;
    for (bucket, _) in grants_of(store, key_id, usize::MAX)? {
        store.remove(Table::S3Grants, &grant_row(key_id, &bucket))?;
    }
    Ok(Ok(Outcome::Noop))
}

pub(crate) fn set_grant(
    store: &mut impl StateStore,
    key_id: &str,
    bucket: &str,
    grant: Grant,
) -> Result<CommandResult, StoreError> {
    if get_access_key(store, key_id)?.is_none() {
        return Ok(Err(CommandError::NoSuchAccessKey { key_id: key_id.to_string() }));
    }
    if get_bucket(store, bucket)?.is_none() {
        return Ok(Err(CommandError::NoSuchBucket { bucket: bucket.to_string() }));
    }
    if grant.is_empty() {
        store.remove(Table::S3Grants, &grant_row(key_id, bucket))?;
    } else {
        store.put(Table::S3Grants, &grant_row(key_id, bucket), &encode(&grant)?)?;
    }
    Ok(Ok(Outcome::Noop))
}

fn new_id(store: &mut impl StateStore, counter: &[u8]) -> Result<u64, StoreError> {
    let id = get_u64(store, Table::Meta, counter)?.max(1);
    put_u64(store, Table::Meta, counter, id + 1)?;
    Ok(id)
}

/// A new piece list of `pieces` (chunk set, chunk count), named by one object.
fn new_piece_list(store: &mut impl StateStore, pieces: &[(u64, u64)]) -> Result<(u64, u64), StoreError> {
    let list = new_id(store, META_NEXT_PIECE_LIST)?;
    let mut first_index = 0u64;
    for &(chunk_set, n_chunks) in pieces {
        if n_chunks == 0 {
            // An empty piece holds nothing to read: its (empty) chunk set is released now.
            queue_chunk_set_release(store, chunk_set)?;
            continue;
        }
        let piece = Piece { chunk_set, first_index, n_chunks };
        store.put(Table::S3Pieces, &piece_row(list, first_index + n_chunks - 1), &encode(&piece)?)?;
        first_index += n_chunks;
    }
    store.put(Table::S3PieceLists, &list.to_be_bytes(), &encode(&PieceList { refs: 1 })?)?;
    Ok((list, first_index))
}

/// One object fewer names `list`; the last one releases its chunk sets.
fn drop_piece_list(store: &mut impl StateStore, list: u64) -> Result<(), StoreError> {
    let Some(bytes) = store.get(Table::S3PieceLists, &list.to_be_bytes())? else {
        return Err(StoreError(format!("an object names piece list {list}, which does not exist")));
    };
    let mut record: PieceList = decode(&bytes)?;
    record.refs = record.refs.saturating_sub(1);
    if record.refs > 0 {
        return store.put(Table::S3PieceLists, &list.to_be_bytes(), &encode(&record)?);
    }
    store.remove(Table::S3PieceLists, &list.to_be_bytes())?;
    let start = list.to_be_bytes();
    let end = prefix_end(&start);
    // At most `PARTS_MAX` pieces: bounded work, and their chunk references are dropped later.
    for (row, value) in store.range(Table::S3Pieces, &start, end.as_deref(), usize::MAX)? {
        let piece: Piece = decode(&value)?;
        queue_chunk_set_release(store, piece.chunk_set)?;
        store.remove(Table::S3Pieces, &row)?;
    }
    Ok(())
}

/// Installs `record` at `bucket`/`key`, releasing the version it replaces.
fn replace_object(
    store: &mut impl StateStore,
    bucket: &str,
    key: &str,
    existing: Option<ObjectRecord>,
    record: &ObjectRecord,
) -> Result<(), StoreError> {
    store.put(Table::S3Objects, &object_row(bucket, key), &encode(record)?)?;
    if let Some(old) = existing {
        drop_piece_list(store, old.pieces)?;
    }
    Ok(())
}

fn no_bucket(bucket: &str) -> CommandResult {
    Err(CommandError::NoSuchBucket { bucket: bucket.to_string() })
}

fn refused(why: String) -> CommandResult {
    Err(CommandError::PreconditionFailed { why })
}

pub(crate) fn put_object(
    store: &mut impl StateStore,
    put: &PutObject,
    clock_ms: u64,
) -> Result<CommandResult, StoreError> {
    if get_bucket(store, &put.bucket)?.is_none() {
        return Ok(no_bucket(&put.bucket));
    }
    let existing = get_object(store, &put.bucket, &put.key)?;
    if let Some(why) = precondition_failure(&put.condition, existing.as_ref()) {
        return Ok(refused(why));
    }
    let label = object_label(&put.bucket, &put.key);
    let (chunk_set, n_chunks) = match install_chunk_list(store, &put.content.as_list(&label), clock_ms)? {
        Ok(installed) => installed,
        Err(refused) => return Ok(Err(refused)),
    };
    let (pieces, n_chunks) = new_piece_list(store, &[(chunk_set, n_chunks)])?;
    let record = ObjectRecord {
        size: put.content.size,
        etag: put.etag.clone(),
        last_modified_ms: stamped(put.mtime_ms, clock_ms),
        pieces,
        n_chunks,
        parts: 0,
        meta: put.meta.clone(),
    };
    replace_object(store, &put.bucket, &put.key, existing, &record)?;
    Ok(Ok(Outcome::ObjectWritten { etag: record.etag, last_modified_ms: record.last_modified_ms }))
}

pub(crate) fn copy_object(
    store: &mut impl StateStore,
    copy: &CopyObject,
    clock_ms: u64,
) -> Result<CommandResult, StoreError> {
    if get_bucket(store, &copy.source_bucket)?.is_none() {
        return Ok(no_bucket(&copy.source_bucket));
    }
    if get_bucket(store, &copy.bucket)?.is_none() {
        return Ok(no_bucket(&copy.bucket));
    }
    let Some(source) = get_object(store, &copy.source_bucket, &copy.source_key)? else {
        return Ok(Err(CommandError::NoSuchKey { bucket: copy.source_bucket.clone(), key: copy.source_key.clone() }));
    };
    if let Some(why) = precondition_failure(&copy.source_condition, Some(&source)) {
        return Ok(refused(format!("copy source: {why}")));
    }
    let existing = get_object(store, &copy.bucket, &copy.key)?;
    if let Some(why) = precondition_failure(&copy.condition, existing.as_ref()) {
        return Ok(refused(why));
    }
    let same_key = copy.source_bucket == copy.bucket && copy.source_key == copy.key;
    if same_key && copy.meta.is_none() {
        return Ok(Err(CommandError::InvalidRequest {
            why: "an object copied onto itself must change its metadata (x-amz-metadata-directive: REPLACE)".into(),
        }));
    }
    // The copy names the source's piece list: one more reference, no data copied.
    let list_row = source.pieces.to_be_bytes();
    let Some(bytes) = store.get(Table::S3PieceLists, &list_row)? else {
        return Err(StoreError(format!("object names piece list {}, which does not exist", source.pieces)));
    };
    let mut list: PieceList = decode(&bytes)?;
    list.refs += 1;
    store.put(Table::S3PieceLists, &list_row, &encode(&list)?)?;
    let record = ObjectRecord {
        last_modified_ms: stamped(copy.mtime_ms, clock_ms),
        meta: copy.meta.clone().unwrap_or_else(|| source.meta.clone()),
        ..source
    };
    replace_object(store, &copy.bucket, &copy.key, existing, &record)?;
    Ok(Ok(Outcome::ObjectWritten { etag: record.etag, last_modified_ms: record.last_modified_ms }))
}

/// Deletes each key that exists (a missing key is no error in S3); answers which existed.
pub(crate) fn delete_objects(
    store: &mut impl StateStore,
    bucket: &str,
    keys: &[String],
) -> Result<CommandResult, StoreError> {
    if get_bucket(store, bucket)?.is_none() {
        return Ok(no_bucket(bucket));
    }
    let mut found = Vec::with_capacity(keys.len());
    for key in keys {
        match get_object(store, bucket, key)? {
            Some(existing) => {
                store.remove(Table::S3Objects, &object_row(bucket, key))?;
                drop_piece_list(store, existing.pieces)?;
                found.push(true);
            }
            None => found.push(false),
        }
    }
    Ok(Ok(Outcome::ObjectsDeleted { found }))
}

/// The upload `upload_id` if it exists and writes `bucket`/`key`: a request that names another
/// object's upload (ids are small numbers, easily guessed) finds none, so a key allowed to
/// write one bucket cannot complete an upload into another.
fn upload_for(
    store: &impl StateStore,
    upload_id: u64,
    bucket: &str,
    key: &str,
) -> Result<Option<MultipartUpload>, StoreError> {
    Ok(get_multipart(store, upload_id)?.filter(|upload| upload.bucket == bucket && upload.key == key))
}

pub(crate) fn create_multipart(
    store: &mut impl StateStore,
    upload: &MultipartUpload,
    clock_ms: u64,
) -> Result<CommandResult, StoreError> {
    if get_bucket(store, &upload.bucket)?.is_none() {
        return Ok(no_bucket(&upload.bucket));
    }
    let stamped;
    let upload = if upload.initiated_ms == 0 {
        stamped = MultipartUpload { initiated_ms: clock_ms, ..upload.clone() };
        &stamped
    } else {
        upload
    };
    let upload_id = new_id(store, META_NEXT_MULTIPART)?;
    store.put(Table::S3Uploads, &upload_id.to_be_bytes(), &encode(upload)?)?;
    store.put(Table::S3UploadsByObject, &upload_by_object_row(&upload.bucket, &upload.key, upload_id), &[])?;
    store.put(Table::S3UploadsByTime, &upload_by_time_row(upload.initiated_ms, upload_id), &[])?;
    Ok(Ok(Outcome::MultipartCreated { upload_id }))
}

pub fn get_part(store: &impl StateStore, upload_id: u64, part_number: u32) -> Result<Option<PartRecord>, StoreError> {
    store.get(Table::S3Parts, &part_row(upload_id, part_number))?.map(|bytes| decode(&bytes)).transpose()
}

/// The parts of an upload from `after` on (exclusive), in part order, up to `limit`.
pub fn list_parts(
    store: &impl StateStore,
    upload_id: u64,
    after: u32,
    limit: usize,
) -> Result<Vec<(u32, PartRecord)>, StoreError> {
    let start = part_row(upload_id, after.saturating_add(1));
    let end = prefix_end(&upload_id.to_be_bytes());
    let mut parts = Vec::new();
    for (row, value) in store.range(Table::S3Parts, &start, end.as_deref(), limit)? {
        let number = row.get(8..12).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
        let number = number.ok_or_else(|| StoreError("a part row without a part number".into()))?;
        parts.push((number, decode(&value)?));
    }
    Ok(parts)
}

pub(crate) fn put_part(store: &mut impl StateStore, put: &PutPart, clock_ms: u64) -> Result<CommandResult, StoreError> {
    if upload_for(store, put.upload_id, &put.bucket, &put.key)?.is_none() {
        return Ok(Err(CommandError::NoSuchUpload { upload_id: put.upload_id }));
    }
    if !(1..=PARTS_MAX).contains(&put.part_number) {
        return Ok(Err(CommandError::InvalidRequest {
            why: format!("part numbers are 1 to {PARTS_MAX}, not {}", put.part_number),
        }));
    }
    let label = part_label(put.upload_id, put.part_number);
    let (chunk_set, n_chunks) = match install_chunk_list(store, &put.content.as_list(&label), clock_ms)? {
        Ok(installed) => installed,
        Err(refused) => return Ok(Err(refused)),
    };
    if let Some(replaced) = get_part(store, put.upload_id, put.part_number)? {
        queue_chunk_set_release(store, replaced.chunk_set)?;
    }
    let part = PartRecord {
        etag: put.etag.clone(),
        size: put.content.size,
        last_modified_ms: stamped(put.mtime_ms, clock_ms),
        chunk_set,
        n_chunks,
    };
    store.put(Table::S3Parts, &part_row(put.upload_id, put.part_number), &encode(&part)?)?;
    Ok(Ok(Outcome::ObjectWritten { etag: part.etag, last_modified_ms: part.last_modified_ms }))
}

/// Forgets an upload and releases every part it has (or every part but those in `kept`,
/// whose chunk sets the caller took over).
fn end_multipart(
    store: &mut impl StateStore,
    upload_id: u64,
    upload: &MultipartUpload,
    kept: &std::collections::HashSet<u32>,
) -> Result<(), StoreError> {
    for (number, part) in list_parts(store, upload_id, 0, usize::MAX)? {
        if !kept.contains(&number) {
            queue_chunk_set_release(store, part.chunk_set)?;
        }
        store.remove(Table::S3Parts, &part_row(upload_id, number))?;
    }
    store.remove(Table::S3Uploads, &upload_id.to_be_bytes())?;
    store.remove(Table::S3UploadsByObject, &upload_by_object_row(&upload.bucket, &upload.key, upload_id))?;
    store.remove(Table::S3UploadsByTime, &upload_by_time_row(upload.initiated_ms, upload_id))
}

pub(crate) fn complete_multipart(
    store: &mut impl StateStore,
    complete: &CompleteUpload,
    clock_ms: u64,
) -> Result<CommandResult, StoreError> {
    use md5::Digest;
    let upload_id = complete.upload_id;
    let Some(upload) = upload_for(store, upload_id, &complete.bucket, &complete.key)? else {
        return Ok(Err(CommandError::NoSuchUpload { upload_id }));
    };
    if get_bucket(store, &upload.bucket)?.is_none() {
        return Ok(no_bucket(&upload.bucket));
    }
    if complete.parts.is_empty() {
        return Ok(Err(CommandError::InvalidRequest { why: "a completed upload lists at least one part".into() }));
    }
    if complete.parts.windows(2).any(|pair| pair[0].0 >= pair[1].0) {
        return Ok(Err(CommandError::InvalidPartOrder));
    }
    let mut pieces = Vec::with_capacity(complete.parts.len());
    let mut md5_of_md5s = md5::Md5::new();
    let mut size = 0u64;
    for (index, (number, etag)) in complete.parts.iter().enumerate() {
        let Some(part) = get_part(store, upload_id, *number)? else {
            return Ok(Err(CommandError::InvalidPart { why: format!("part {number} was not uploaded") }));
        };
        if etag.trim_matches('"') != part.etag {
            return Ok(Err(CommandError::InvalidPart {
                why: format!("part {number} has ETag \"{}\", not {etag}", part.etag),
            }));
        }
        let last = index + 1 == complete.parts.len();
        if !last && part.size < complete.min_part_bytes {
            return Ok(Err(CommandError::EntityTooSmall {
                why: format!(
                    "part {number} has {} bytes; every part but the last needs at least {}",
                    part.size, complete.min_part_bytes
                ),
            }));
        }
        let Some(digest) = md5_bytes(&part.etag) else {
            return Err(StoreError(format!("part {number} of upload {upload_id} has a malformed ETag")));
        };
        md5_of_md5s.update(digest);
        size = size.saturating_add(part.size);
        pieces.push((part.chunk_set, part.n_chunks));
    }
    let existing = get_object(store, &upload.bucket, &upload.key)?;
    if let Some(why) = precondition_failure(&complete.condition, existing.as_ref()) {
        return Ok(refused(why));
    }
    let kept = complete.parts.iter().map(|(number, _)| *number).collect();
    end_multipart(store, upload_id, &upload, &kept)?;
    let (list, n_chunks) = new_piece_list(store, &pieces)?;
    let record = ObjectRecord {
        size,
        etag: format!("{}-{}", mendfs_types::hex(&md5_of_md5s.finalize()), complete.parts.len()),
        last_modified_ms: stamped(complete.mtime_ms, clock_ms),
        pieces: list,
        n_chunks,
        parts: complete.parts.len() as u32,
        meta: upload.meta.clone(),
    };
    replace_object(store, &upload.bucket, &upload.key, existing, &record)?;
    Ok(Ok(Outcome::ObjectWritten { etag: record.etag, last_modified_ms: record.last_modified_ms }))
}

pub(crate) fn abort_multipart(
    store: &mut impl StateStore,
    upload_id: u64,
    bucket: &str,
    key: &str,
) -> Result<CommandResult, StoreError> {
    let Some(upload) = upload_for(store, upload_id, bucket, key)? else {
        return Ok(Err(CommandError::NoSuchUpload { upload_id }));
    };
    end_multipart(store, upload_id, &upload, &Default::default())?;
    Ok(Ok(Outcome::Noop))
}

/// Aborts uploads initiated before `initiated_before_ms` (abandoned), a bounded number per
/// apply; the leader proposes this while [`expired_multipart_pending`] says there are some.
pub(crate) fn expire_multipart(
    store: &mut impl StateStore,
    initiated_before_ms: u64,
) -> Result<CommandResult, StoreError> {
    let due = store.range(
        Table::S3UploadsByTime,
        &[],
        Some(&initiated_before_ms.to_be_bytes()),
        UPLOADS_EXPIRED_PER_APPLY,
    )?;
    for (row, _) in due {
        let Some(upload_id) = u64_at(&row, 8) else {
            store.remove(Table::S3UploadsByTime, &row)?;
            continue;
        };
        match get_multipart(store, upload_id)? {
            Some(upload) => end_multipart(store, upload_id, &upload, &Default::default())?,
            None => store.remove(Table::S3UploadsByTime, &row)?,
        }
    }
    Ok(Ok(Outcome::Noop))
}

/// Whether some multipart upload was initiated before `initiated_before_ms`.
pub fn expired_multipart_pending(store: &impl StateStore, initiated_before_ms: u64) -> Result<bool, StoreError> {
    Ok(!store.range(Table::S3UploadsByTime, &[], Some(&initiated_before_ms.to_be_bytes()), 1)?.is_empty())
}

/// The 16 bytes of an MD5 given in hex.
pub fn md5_bytes(hex: &str) -> Option<[u8; 16]> {
    let mut bytes = [0u8; 16];
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}

/// Up to `limit` chunks of an object's content from `from_index` on, across its pieces.
pub fn object_chunk_page(
    store: &impl StateStore,
    object: &ObjectRecord,
    from_index: u64,
    limit: usize,
) -> Result<Vec<FileChunk>, StoreError> {
    let end = prefix_end(&object.pieces.to_be_bytes());
    let mut page = Vec::new();
    let mut index = from_index;
    while page.len() < limit && index < object.n_chunks {
        let rows = store.range(Table::S3Pieces, &piece_row(object.pieces, index), end.as_deref(), 1)?;
        let broken = || StoreError(format!("piece list {} has no piece holding chunk {index}", object.pieces));
        let (_, value) = rows.into_iter().next().ok_or_else(broken)?;
        let piece: Piece = decode(&value)?;
        if piece.first_index > index {
            return Err(broken());
        }
        let within =
            chunk_list_page(store, piece.chunk_set, piece.n_chunks, index - piece.first_index, limit - page.len())?;
        if within.is_empty() {
            return Err(broken());
        }
        index += within.len() as u64;
        page.extend(within);
    }
    Ok(page)
}

/// One page of a bucket listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectListing {
    pub objects: Vec<ObjectSummary>,
    /// Prefixes up to and including the first delimiter after `prefix`, each once.
    pub common_prefixes: Vec<String>,
    pub truncated: bool,
    /// The last key or common prefix returned: where the next page starts (exclusive).
    pub last: Option<String>,
}

/// Objects of `bucket` whose keys start with `prefix` and come after `after`, in UTF-8 byte
/// order, with keys that hold `delimiter` after the prefix rolled up into common prefixes;
/// `max` entries (objects and prefixes) at most. A rolled-up group costs one seek, not a scan
/// of its keys.
pub fn list_objects(
    store: &impl StateStore,
    bucket: &str,
    prefix: &str,
    delimiter: Option<&str>,
    after: Option<&str>,
    max: usize,
) -> Result<ObjectListing, StoreError> {
    const ROWS_PER_READ: usize = 256;
    let bucket_row = bucket_prefix(bucket);
    let full_prefix = object_row(bucket, prefix);
    let end = prefix_end(&full_prefix);
    let delimiter = delimiter.filter(|d| !d.is_empty());
    let mut start = full_prefix.clone();
    if let Some(after) = after.filter(|after| after.as_bytes() >= prefix.as_bytes()) {
        // A position inside (or at) a rolled-up group is past the whole group: it was listed
        // as one common prefix.
        let group = delimiter
            .filter(|_| after.starts_with(prefix))
            .and_then(|d| after[prefix.len()..].find(d).map(|at| &after[..prefix.len() + at + d.len()]));
        start = match group.and_then(|group| prefix_end(&object_row(bucket, group))) {
            Some(past_group) => past_group,
            None => {
                let mut start = object_row(bucket, after);
                start.push(0);
                start
            }
        };
    }
    let mut listing = ObjectListing::default();
    loop {
        let rows = store.range(Table::S3Objects, &start, end.as_deref(), ROWS_PER_READ)?;
        if rows.is_empty() {
            return Ok(listing);
        }
        let mut next_start = None;
        for (row, value) in &rows {
            let key = std::str::from_utf8(&row[bucket_row.len()..])
                .map_err(|e| StoreError(format!("an object key is not UTF-8: {e}")))?;
            if listing.objects.len() + listing.common_prefixes.len() == max {
                listing.truncated = true;
                return Ok(listing);
            }
            let group = delimiter
                .and_then(|d| key[prefix.len()..].find(d).map(|at| key[..prefix.len() + at + d.len()].to_string()));
            match group {
                Some(group) => {
                    // Skip every key of the group with one seek.
                    let mut skip_to = prefix_end(&object_row(bucket, &group));
                    if let Some(end) = &end {
                        skip_to = skip_to.filter(|to| to < end);
                    }
                    listing.last = Some(group.clone());
                    listing.common_prefixes.push(group);
                    match skip_to {
                        Some(to) => {
                            next_start = Some(to);
                            break;
                        }
                        None => return Ok(listing),
                    }
                }
                None => {
                    let object: ObjectRecord = decode(value)?;
                    listing.last = Some(key.to_string());
                    listing.objects.push(ObjectSummary {
                        key: key.to_string(),
                        size: object.size,
                        etag: object.etag,
                        last_modified_ms: object.last_modified_ms,
                    });
                }
            }
        }
        start = match next_start {
            Some(to) => to,
            None if rows.len() < ROWS_PER_READ => return Ok(listing),
            None => {
                let mut after_last = rows.last().map(|(row, _)| row.clone()).unwrap_or_default();
                after_last.push(0);
                after_last
            }
        };
    }
}

/// A multipart upload as listings show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadSummary {
    pub upload_id: u64,
    pub key: String,
    pub initiated_ms: u64,
}

/// Multipart uploads in `bucket` whose keys start with `prefix`, by key then upload id, from
/// after (`key_marker`, `upload_marker`) on; `max` at most, and whether there are more.
pub fn list_multipart(
    store: &impl StateStore,
    bucket: &str,
    prefix: &str,
    key_marker: Option<&str>,
    upload_marker: Option<u64>,
    max: usize,
) -> Result<(Vec<UploadSummary>, bool), StoreError> {
    let bucket_row = bucket_prefix(bucket);
    let full_prefix = object_row(bucket, prefix);
    let end = prefix_end(&full_prefix);
    let start = match key_marker.filter(|marker| marker.as_bytes() >= prefix.as_bytes()) {
        Some(marker) => {
            let mut start = object_row(bucket, marker);
            start.push(0);
            match upload_marker {
                Some(id) => start.extend_from_slice(&(id.saturating_add(1)).to_be_bytes()),
                // Past every upload of the marker key.
                None => start.push(0xff),
            }
            start
        }
        None => full_prefix,
    };
    let rows = store.range(Table::S3UploadsByObject, &start, end.as_deref(), max.saturating_add(1))?;
    let truncated = rows.len() > max;
    let mut uploads = Vec::with_capacity(rows.len().min(max));
    for (row, _) in rows.into_iter().take(max) {
        let Some(key_end) = row.len().checked_sub(9) else { continue };
        let Some(upload_id) = u64_at(&row, key_end + 1) else { continue };
        let key = utf8(row[bucket_row.len()..key_end].to_vec(), "an object key")?;
        let Some(upload) = get_multipart(store, upload_id)? else { continue };
        uploads.push(UploadSummary { upload_id, key, initiated_ms: upload.initiated_ms });
    }
    Ok((uploads, truncated))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mendfs_types::ChunkHash;
    use proptest::prelude::*;

    use super::*;
    use crate::files::{get_chunk, release_chunks};
    use crate::schema::MemoryStore;

    const NOW: u64 = 1_000_000;

    fn chunk(byte: u8, size: u64) -> CommittedChunk {
        CommittedChunk { hash: ChunkHash::from_bytes([byte; 32]), size, replicas: vec![1, 2, 3] }
    }

    fn content(chunks: Vec<CommittedChunk>) -> S3Content {
        let size = chunks.iter().map(|c| c.size).sum();
        S3Content { size, chunks, upload_id: None, first_index: 0, prepared_at_ms: NOW, grace_ms: 60_000 }
    }

    fn put(bucket: &str, key: &str, chunks: Vec<CommittedChunk>, etag: &str) -> PutObject {
        PutObject {
            bucket: bucket.into(),
            key: key.into(),
            content: content(chunks),
            etag: etag.into(),
            meta: ObjectMeta::default(),
            mtime_ms: NOW,
            condition: Precondition::default(),
        }
    }

    fn ok(result: Result<CommandResult, StoreError>) -> Outcome {
        result.expect("memory store").expect("command applies")
    }

    fn refused(result: Result<CommandResult, StoreError>) -> CommandError {
        result.expect("memory store").expect_err("command is refused")
    }

    fn refs(store: &MemoryStore, byte: u8) -> u64 {
        get_chunk(store, &ChunkHash::from_bytes([byte; 32])).unwrap().map_or(0, |c| c.refs)
    }

    fn release_all(store: &mut MemoryStore) {
        for _ in 0..100 {
            ok(release_chunks(store, NOW, 1_000));
        }
    }

    fn store_with_bucket(bucket: &str) -> MemoryStore {
        let mut store = MemoryStore::default();
        ok(create_bucket(&mut store, bucket, Some("KEY1"), NOW));
        store
    }

    fn chunks_of(store: &MemoryStore, bucket: &str, key: &str) -> Vec<u8> {
        let object = get_object(store, bucket, key).unwrap().expect("object exists");
        object_chunk_page(store, &object, 0, usize::MAX).unwrap().iter().map(|c| c.hash.as_ref()[0]).collect()
    }

    #[test]
    fn bucket_names_follow_s3_rules() {
        for good in ["abc", "my-bucket.2", "a".repeat(63).as_str(), "1bucket"] {
            assert!(validate_bucket_name(good).is_ok(), "{good}");
        }
        for bad in ["ab", "Upper", "a_b", "-ab", "ab-", "a..b", "a.-b", "192.168.1.1", "xn--ab", &"a".repeat(64)] {
            assert!(validate_bucket_name(bad).is_err(), "{bad}");
        }
        assert!(validate_object_key("a//b/../c/").is_ok());
        assert!(validate_object_key("").is_err());
        assert!(validate_object_key(&"k".repeat(1025)).is_err());
    }

    #[test]
    fn a_bucket_is_created_once_and_deleted_only_when_empty() {
        let mut store = store_with_bucket("photos");
        assert_eq!(get_grant(&store, "KEY1", "photos").unwrap(), Grant::ALL);
        let again = refused(create_bucket(&mut store, "photos", Some("KEY1"), NOW));
        assert_eq!(again, CommandError::BucketExists { bucket: "photos".into(), yours: true });
        let theirs = refused(create_bucket(&mut store, "photos", Some("KEY2"), NOW));
        assert_eq!(theirs, CommandError::BucketExists { bucket: "photos".into(), yours: false });

        ok(put_object(&mut store, &put("photos", "a", vec![chunk(1, 10)], "e1"), NOW));
        assert!(matches!(refused(delete_bucket(&mut store, "photos")), CommandError::BucketNotEmpty { .. }));
        ok(delete_objects(&mut store, "photos", &["a".into()]));
        let upload =
            MultipartUpload { bucket: "photos".into(), key: "m".into(), initiated_ms: NOW, meta: Default::default() };
        let Outcome::MultipartCreated { upload_id } = ok(create_multipart(&mut store, &upload, NOW)) else { panic!() };
        assert!(matches!(refused(delete_bucket(&mut store, "photos")), CommandError::BucketNotEmpty { .. }));
        ok(abort_multipart(&mut store, upload_id, "photos", "m"));
        ok(delete_bucket(&mut store, "photos"));
        assert_eq!(get_grant(&store, "KEY1", "photos").unwrap(), Grant::default(), "grants go with the bucket");
        assert!(matches!(refused(delete_bucket(&mut store, "photos")), CommandError::NoSuchBucket { .. }));
    }

    #[test]
    fn overwrites_and_deletes_release_the_old_content() {
        let mut store = store_with_bucket("b");
        ok(put_object(&mut store, &put("b", "k", vec![chunk(1, 10), chunk(2, 10)], "e1"), NOW));
        assert_eq!((refs(&store, 1), refs(&store, 2)), (1, 1));
        ok(put_object(&mut store, &put("b", "k", vec![chunk(2, 10), chunk(3, 5)], "e2"), NOW));
        release_all(&mut store);
        assert_eq!((refs(&store, 1), refs(&store, 2), refs(&store, 3)), (0, 1, 1));
        let object = get_object(&store, "b", "k").unwrap().unwrap();
        assert_eq!((object.size, object.etag.as_str(), object.n_chunks), (15, "e2", 2));
        let Outcome::ObjectsDeleted { found } = ok(delete_objects(&mut store, "b", &["k".into(), "nope".into()]))
        else {
            panic!()
        };
        assert_eq!(found, vec![true, false]);
        release_all(&mut store);
        assert_eq!((refs(&store, 2), refs(&store, 3)), (0, 0));
        assert!(store.range(Table::S3Pieces, &[], None, 1).unwrap().is_empty());
        assert!(store.range(Table::S3PieceLists, &[], None, 1).unwrap().is_empty());
        assert!(store.range(Table::Segments, &[], None, 1).unwrap().is_empty());
    }

    #[test]
    fn conditional_puts_are_decided_in_the_apply() {
        let mut store = store_with_bucket("b");
        let mut first = put("b", "k", vec![chunk(1, 10)], "e1");
        first.condition.must_not_exist = true;
        ok(put_object(&mut store, &first, NOW));
        // The racing second writer with the same condition loses, and leaves no reference.
        let mut second = put("b", "k", vec![chunk(2, 10)], "e2");
        second.condition.must_not_exist = true;
        assert!(matches!(refused(put_object(&mut store, &second, NOW)), CommandError::PreconditionFailed { .. }));
        assert_eq!(refs(&store, 2), 0);
        let mut matching = put("b", "k", vec![chunk(2, 10)], "e2");
        matching.condition.etag_in = Some(vec!["\"e1\"".into()]);
        ok(put_object(&mut store, &matching, NOW));
        matching.condition.etag_in = Some(vec!["e1".into()]);
        assert!(matches!(refused(put_object(&mut store, &matching, NOW)), CommandError::PreconditionFailed { .. }));
        let mut missing = put("b", "other", vec![chunk(2, 10)], "e3");
        missing.condition.etag_in = Some(vec!["*".into()]);
        assert!(matches!(refused(put_object(&mut store, &missing, NOW)), CommandError::PreconditionFailed { .. }));
        let into_nothing = put("nobucket", "k", vec![], "e");
        assert!(matches!(refused(put_object(&mut store, &into_nothing, NOW)), CommandError::NoSuchBucket { .. }));
    }

    #[test]
    fn a_copy_shares_the_content_and_outlives_its_source() {
        let mut store = store_with_bucket("b");
        ok(create_bucket(&mut store, "c", None, NOW));
        ok(put_object(&mut store, &put("b", "src", vec![chunk(1, 10), chunk(2, 10)], "e1"), NOW));
        let copy = CopyObject {
            source_bucket: "b".into(),
            source_key: "src".into(),
            source_condition: Precondition { etag_in: Some(vec!["e1".into()]), ..Default::default() },
            bucket: "c".into(),
            key: "dst".into(),
            condition: Precondition::default(),
            meta: Some(ObjectMeta { content_type: Some("text/plain".into()), ..Default::default() }),
            mtime_ms: NOW + 5,
        };
        ok(copy_object(&mut store, &copy, NOW));
        let copied = get_object(&store, "c", "dst").unwrap().unwrap();
        assert_eq!((copied.etag.as_str(), copied.size, copied.last_modified_ms), ("e1", 20, NOW + 5));
        assert_eq!(copied.meta.content_type.as_deref(), Some("text/plain"));
        assert_eq!((refs(&store, 1), refs(&store, 2)), (1, 1), "no chunk reference was copied");
        ok(delete_objects(&mut store, "b", &["src".into()]));
        release_all(&mut store);
        assert_eq!(chunks_of(&store, "c", "dst"), vec![1, 2]);
        assert_eq!((refs(&store, 1), refs(&store, 2)), (1, 1));
        ok(delete_objects(&mut store, "c", &["dst".into()]));
        release_all(&mut store);
        assert_eq!((refs(&store, 1), refs(&store, 2)), (0, 0));

        let onto_itself = CopyObject { source_bucket: "c".into(), source_key: "x".into(), ..copy.clone() };
        assert!(matches!(refused(copy_object(&mut store, &onto_itself, NOW)), CommandError::NoSuchKey { .. }));
        let failing = CopyObject {
            source_condition: Precondition { etag_in: Some(vec!["other".into()]), ..Default::default() },
            ..copy
        };
        ok(put_object(&mut store, &put("b", "src", vec![chunk(1, 10)], "e1"), NOW));
        assert!(matches!(refused(copy_object(&mut store, &failing, NOW)), CommandError::PreconditionFailed { .. }));
    }

    fn upload_part(store: &mut MemoryStore, upload_id: u64, number: u32, chunks: Vec<CommittedChunk>, etag: &str) {
        let (bucket, key) = get_multipart(store, upload_id).unwrap().map(|u| (u.bucket, u.key)).unwrap();
        let part = PutPart {
            upload_id,
            bucket,
            key,
            part_number: number,
            content: content(chunks),
            etag: etag.into(),
            mtime_ms: NOW,
        };
        ok(put_part(store, &part, NOW));
    }

    const MD5_A: &str = "0cc175b9c0f1b6a831c399e269772661";
    const MD5_B: &str = "92eb5ffee6ae2fec3ad71c777531578f";
    const MD5_C: &str = "4a8a08f09d37b73795649038408b5f33";

    #[test]
    fn a_multipart_upload_completes_atomically_from_its_listed_parts() {
        let mut store = store_with_bucket("b");
        let upload =
            MultipartUpload { bucket: "b".into(), key: "big".into(), initiated_ms: NOW, meta: Default::default() };
        let Outcome::MultipartCreated { upload_id } = ok(create_multipart(&mut store, &upload, NOW)) else { panic!() };
        upload_part(&mut store, upload_id, 2, vec![chunk(3, 10)], MD5_B);
        upload_part(&mut store, upload_id, 1, vec![chunk(1, 10), chunk(2, 10)], "ffffffffffffffffffffffffffffffff");
        // Part 1 again: the first upload of it is replaced and released.
        upload_part(&mut store, upload_id, 1, vec![chunk(4, 10), chunk(5, 10)], MD5_A);
        upload_part(&mut store, upload_id, 3, vec![chunk(6, 10)], MD5_C);
        assert!(get_object(&store, "b", "big").unwrap().is_none(), "nothing is visible before completion");
        // The upload is only reachable through its own bucket and key.
        ok(create_bucket(&mut store, "elsewhere", None, NOW));
        let stray = PutPart {
            upload_id,
            bucket: "elsewhere".into(),
            key: "big".into(),
            part_number: 9,
            content: content(vec![chunk(9, 10)]),
            etag: MD5_A.into(),
            mtime_ms: NOW,
        };
        assert!(matches!(refused(put_part(&mut store, &stray, NOW)), CommandError::NoSuchUpload { .. }));
        assert!(matches!(
            refused(abort_multipart(&mut store, upload_id, "b", "other")),
            CommandError::NoSuchUpload { .. }
        ));

        let complete = |parts: Vec<(u32, &str)>, min| CompleteUpload {
            upload_id,
            bucket: "b".into(),
            key: "big".into(),
            parts: parts.into_iter().map(|(n, e)| (n, e.to_string())).collect(),
            min_part_bytes: min,
            condition: Precondition::default(),
            mtime_ms: NOW,
        };
        let stray = CompleteUpload { key: "other".into(), ..complete(vec![(1, MD5_A)], 0) };
        assert!(matches!(refused(complete_multipart(&mut store, &stray, NOW)), CommandError::NoSuchUpload { .. }));
        let order = complete(vec![(2, MD5_B), (1, MD5_A)], 0);
        assert_eq!(refused(complete_multipart(&mut store, &order, NOW)), CommandError::InvalidPartOrder);
        let wrong_tag = complete(vec![(1, MD5_B), (2, MD5_B)], 0);
        assert!(matches!(refused(complete_multipart(&mut store, &wrong_tag, NOW)), CommandError::InvalidPart { .. }));
        let missing = complete(vec![(1, MD5_A), (4, MD5_B)], 0);
        assert!(matches!(refused(complete_multipart(&mut store, &missing, NOW)), CommandError::InvalidPart { .. }));
        let small = complete(vec![(1, MD5_A), (2, MD5_B)], 25);
        assert!(matches!(refused(complete_multipart(&mut store, &small, NOW)), CommandError::EntityTooSmall { .. }));

        // Part 3 is left out: released with the upload.
        let Outcome::ObjectWritten { etag, .. } =
            ok(complete_multipart(&mut store, &complete(vec![(1, &format!("\"{MD5_A}\"")), (2, MD5_B)], 10), NOW))
        else {
            panic!()
        };
        let expected = {
            use md5::Digest;
            let mut md5 = md5::Md5::new();
            md5.update(md5_bytes(MD5_A).unwrap());
            md5.update(md5_bytes(MD5_B).unwrap());
            format!("{}-2", mendfs_types::hex(&md5.finalize()))
        };
        assert_eq!(etag, expected);
        release_all(&mut store);
        assert_eq!(chunks_of(&store, "b", "big"), vec![4, 5, 3]);
        let object = get_object(&store, "b", "big").unwrap().unwrap();
        assert_eq!((object.size, object.parts), (30, 2));
        assert_eq!(object_chunk_page(&store, &object, 1, 1).unwrap()[0].hash.as_ref()[0], 5);
        assert_eq!(object_chunk_page(&store, &object, 2, 5).unwrap().len(), 1);
        assert_eq!([1, 2, 6].map(|b| refs(&store, b)), [0, 0, 0], "replaced and unused parts are released");
        assert!(get_multipart(&store, upload_id).unwrap().is_none());
        assert!(matches!(
            refused(complete_multipart(&mut store, &complete(vec![(1, MD5_A)], 0), NOW)),
            CommandError::NoSuchUpload { .. }
        ));
        ok(delete_objects(&mut store, "b", &["big".into()]));
        release_all(&mut store);
        assert_eq!([3, 4, 5].map(|b| refs(&store, b)), [0, 0, 0]);
        ok(delete_bucket(&mut store, "b"));
    }

    #[test]
    fn abandoned_uploads_expire_a_bounded_number_at_a_time() {
        let mut store = store_with_bucket("b");
        for i in 0..(UPLOADS_EXPIRED_PER_APPLY as u64 + 5) {
            let upload = MultipartUpload {
                bucket: "b".into(),
                key: format!("k{i}"),
                initiated_ms: NOW + i,
                meta: Default::default(),
            };
            let Outcome::MultipartCreated { upload_id } = ok(create_multipart(&mut store, &upload, NOW)) else {
                panic!()
            };
            upload_part(&mut store, upload_id, 1, vec![chunk(i as u8, 1)], MD5_A);
        }
        assert!(!expired_multipart_pending(&store, NOW).unwrap());
        let cutoff = NOW + 1_000;
        ok(expire_multipart(&mut store, cutoff));
        assert!(expired_multipart_pending(&store, cutoff).unwrap());
        ok(expire_multipart(&mut store, cutoff));
        assert!(!expired_multipart_pending(&store, cutoff).unwrap());
        release_all(&mut store);
        assert!(store.range(Table::Chunks, &[], None, 1).unwrap().is_empty());
        assert!(store.range(Table::S3Parts, &[], None, 1).unwrap().is_empty());
        ok(delete_bucket(&mut store, "b"));
    }

    /// A write the gateway sends with mtime 0 is stamped with the state clock at its apply, so a
    /// gateway whose date is off cannot make an overwrite look older than what it replaced; a
    /// time the writer set is kept.
    #[test]
    fn objects_are_stamped_with_the_state_clock_unless_the_writer_set_a_time() {
        let mut store = store_with_bucket("b");
        let unstamped = PutObject { mtime_ms: 0, ..put("b", "k", vec![chunk(1, 10)], "e1") };
        ok(put_object(&mut store, &unstamped, NOW + 3));
        assert_eq!(get_object(&store, "b", "k").unwrap().unwrap().last_modified_ms, NOW + 3);
        let copy = CopyObject {
            source_bucket: "b".into(),
            source_key: "k".into(),
            source_condition: Precondition::default(),
            bucket: "b".into(),
            key: "copy".into(),
            condition: Precondition::default(),
            meta: None,
            mtime_ms: 0,
        };
        let Outcome::ObjectWritten { last_modified_ms, .. } = ok(copy_object(&mut store, &copy, NOW + 9)) else {
            panic!()
        };
        assert_eq!(last_modified_ms, NOW + 9);
        ok(put_object(&mut store, &put("b", "k", vec![chunk(2, 10)], "e2"), NOW + 20));
        assert_eq!(get_object(&store, "b", "k").unwrap().unwrap().last_modified_ms, NOW);
    }

    /// The gateway's date plays no part: an upload begins at the state clock of its apply, and
    /// expires by the state clock.
    #[test]
    fn an_upload_begins_and_expires_by_the_state_clock() {
        let mut store = store_with_bucket("b");
        let upload = MultipartUpload { bucket: "b".into(), key: "k".into(), initiated_ms: 0, meta: Default::default() };
        let Outcome::MultipartCreated { upload_id } = ok(create_multipart(&mut store, &upload, NOW + 7)) else {
            panic!()
        };
        assert_eq!(get_multipart(&store, upload_id).unwrap().unwrap().initiated_ms, NOW + 7);
        assert!(!expired_multipart_pending(&store, NOW + 7).unwrap());
        assert!(expired_multipart_pending(&store, NOW + 8).unwrap());
        // An entry from before the rule keeps the date it carries.
        let old = MultipartUpload { initiated_ms: 5, ..upload };
        let Outcome::MultipartCreated { upload_id } = ok(create_multipart(&mut store, &old, NOW)) else { panic!() };
        assert_eq!(get_multipart(&store, upload_id).unwrap().unwrap().initiated_ms, 5);
    }

    #[test]
    fn uploads_are_listed_by_key_then_id() {
        let mut store = store_with_bucket("b");
        let mut ids = Vec::new();
        for key in ["a/1", "a/1", "a/2", "b"] {
            let upload =
                MultipartUpload { bucket: "b".into(), key: key.into(), initiated_ms: NOW, meta: Default::default() };
            let Outcome::MultipartCreated { upload_id } = ok(create_multipart(&mut store, &upload, NOW)) else {
                panic!()
            };
            ids.push(upload_id);
        }
        let (all, truncated) = list_multipart(&store, "b", "a/", None, None, 10).unwrap();
        assert!(!truncated);
        assert_eq!(all.iter().map(|u| u.upload_id).collect::<Vec<_>>(), ids[..3]);
        let (page, truncated) = list_multipart(&store, "b", "", Some("a/1"), Some(ids[0]), 1).unwrap();
        assert!(truncated);
        assert_eq!(page[0].upload_id, ids[1]);
        let (rest, _) = list_multipart(&store, "b", "", Some("a/1"), None, 10).unwrap();
        assert_eq!(rest.iter().map(|u| u.key.as_str()).collect::<Vec<_>>(), ["a/2", "b"]);
    }

    /// What S3 answers for a listing, computed naively over every key.
    fn model_listing(
        keys: &[String],
        prefix: &str,
        delimiter: Option<&str>,
        after: Option<&str>,
    ) -> Vec<(bool, String)> {
        let mut entries: Vec<(bool, String)> = Vec::new();
        for key in keys.iter().filter(|k| k.starts_with(prefix)) {
            let entry = match delimiter.and_then(|d| key[prefix.len()..].find(d).map(|at| (d, at))) {
                Some((d, at)) => (true, key[..prefix.len() + at + d.len()].to_string()),
                None => (false, key.clone()),
            };
            if after.is_some_and(|after| entry.1.as_str() <= after) {
                continue;
            }
            if entries.last() != Some(&entry) {
                entries.push(entry);
            }
        }
        entries
    }

    proptest! {
        #[test]
        fn listing_page_by_page_matches_the_naive_model(
            keys in proptest::collection::btree_set("[ab/]{1,6}", 0..40),
            prefix in "[ab/]{0,2}",
            delimiter in proptest::option::of(prop_oneof![Just("/".to_string()), Just("ab".to_string())]),
            page in 1usize..7,
        ) {
            let mut store = store_with_bucket("b");
            ok(create_bucket(&mut store, "a", None, NOW));
            ok(create_bucket(&mut store, "c", None, NOW));
            let keys: Vec<String> = keys.into_iter().collect();
            for key in &keys {
                ok(put_object(&mut store, &put("b", key, vec![], "e"), NOW));
                // Neighbouring buckets must never leak into the listing.
                ok(put_object(&mut store, &put("a", key, vec![], "e"), NOW));
                ok(put_object(&mut store, &put("c", key, vec![], "e"), NOW));
            }
            let expected = model_listing(&keys, &prefix, delimiter.as_deref(), None);
            let mut listed = Vec::new();
            let mut after: Option<String> = None;
            for _ in 0..100 {
                let listing = list_objects(&store, "b", &prefix, delimiter.as_deref(), after.as_deref(), page).unwrap();
                prop_assert!(listing.objects.len() + listing.common_prefixes.len() <= page);
                let mut got: Vec<(bool, String)> = listing.objects.iter().map(|o| (false, o.key.clone())).collect();
                got.extend(listing.common_prefixes.iter().map(|p| (true, p.clone())));
                got.sort_by(|a, b| a.1.cmp(&b.1));
                listed.extend(got);
                if !listing.truncated {
                    break;
                }
                after = listing.last.clone();
            }
            prop_assert_eq!(listed, expected);
        }

        #[test]
        fn chunk_references_always_equal_the_live_content(ops in proptest::collection::vec((0u8..4, 0u8..3, 0u8..6), 1..40)) {
            let mut store = store_with_bucket("b");
            for (op, key, byte) in ops {
                let key = format!("k{key}");
                match op {
                    0 => { ok(put_object(&mut store, &put("b", &key, vec![chunk(byte, 1), chunk(byte + 1, 1)], "e"), NOW)); }
                    1 => { ok(delete_objects(&mut store, "b", &[key])); }
                    2 => {
                        let copy = CopyObject {
                            source_bucket: "b".into(), source_key: key, source_condition: Default::default(),
                            bucket: "b".into(), key: format!("k{}", byte % 3), condition: Default::default(),
                            meta: Some(Default::default()), mtime_ms: NOW,
                        };
                        let _ = copy_object(&mut store, &copy, NOW).unwrap();
                    }
                    _ => release_all(&mut store),
                }
            }
            release_all(&mut store);
            let mut expected: BTreeMap<u8, u64> = BTreeMap::new();
            // Each live piece list holds its chunks once, however many objects name it.
            let mut lists = std::collections::BTreeSet::new();
            for key in ["k0", "k1", "k2"] {
                if let Some(object) = get_object(&store, "b", key).unwrap() {
                    if lists.insert(object.pieces) {
                        for byte in chunks_of(&store, "b", key) {
                            *expected.entry(byte).or_default() += 1;
                        }
                    }
                }
            }
            for byte in 0u8..8 {
                prop_assert_eq!(refs(&store, byte), expected.get(&byte).copied().unwrap_or(0), "chunk {}", byte);
            }
        }
    }
}
