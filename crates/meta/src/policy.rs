//! Redundancy policies: how the content of a put that does not say (`--redundancy`) keeps its
//! chunks, chosen by the longest matching path prefix for a file and by its bucket for an S3
//! object (`docs/design/erasure-coding.md`). An operator sets them (`mendfs policy set`), and
//! they live in `Table::Policies`, replicated like the rest of the metadata.
//!
//! A prefix matches on path-component boundaries: `/a/b` governs `/a/b` and `/a/b/c`, never
//! `/a/bc`; `/` governs every path. The policy of a path is the one of its longest matching
//! prefix, found by probing the path itself and then each ancestor, longest first: as many
//! reads as the path has components, however many policies there are.
//!
//! Keys: a tag byte, then the name: [`PATH_TAG`] ++ prefix, [`BUCKET_TAG`] ++ bucket. A bucket
//! name and a path could be the same bytes (`a.b` is no path, but nothing should rest on that),
//! and the tags keep the two kinds apart whatever names they get.
//!
//! Also here: how a committed version's content is kept ([`StoredAs`]), for `stat` and
//! `ls -l`. It is derived from the table that holds the version's first chunk, not recorded:
//! file records and write commands are postcard-encoded by position, so a field added to them
//! would break the decoding of every stored row and logged entry, and the chunk's own record
//! already says, exactly, how its bytes are kept.
//!
//! Pure: no I/O, no clock.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use mendfs_erasure::Scheme;
use serde::{Deserialize, Serialize};

use crate::files::{FileChunk, FileRecord};
use crate::schema::{decode, encode, prefix_end, CommandError, CommandResult, Outcome, StateStore, StoreError, Table};

/// Policies the cluster keeps at most: each put probes only its path's ancestors, but `policy
/// list` answers all of them in one message, and an operator needs far fewer.
pub const POLICIES_MAX: usize = 1_024;
/// Key tag of a path prefix's policy.
pub const PATH_TAG: u8 = b'p';
/// Key tag of a bucket's policy.
pub const BUCKET_TAG: u8 = b'b';

/// How a write keeps its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Redundancy {
    /// The cluster's replication factor of copies of each chunk.
    #[default]
    Replicate,
    /// Each chunk big enough to be worth it as a stripe of K data and M parity shards on K + M
    /// distinct nodes (smaller ones stay replicated: the data plane decides the threshold).
    Erasure(Scheme),
}

impl Redundancy {
    /// The erasure-coding scheme, if chunks are striped.
    pub fn scheme(self) -> Option<Scheme> {
        match self {
            Redundancy::Replicate => None,
            Redundancy::Erasure(scheme) => Some(scheme),
        }
    }
}

impl fmt::Display for Redundancy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Redundancy::Replicate => f.write_str("replicate"),
            Redundancy::Erasure(scheme) => scheme.fmt(f),
        }
    }
}

impl FromStr for Redundancy {
    type Err = String;

    /// `replicate` or `ec:K+M`. No count after `replicate`: the number of copies is the
    /// cluster's replication factor, which repair keeps every replicated chunk at.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "replicate" {
            return Ok(Redundancy::Replicate);
        }
        if text.starts_with("replicate:") {
            return Err(format!(
                "invalid redundancy {text:?}: say `replicate`; the number of copies is the cluster's replication \
                 factor"
            ));
        }
        if text.starts_with("ec:") || text.contains('+') {
            return text.parse::<Scheme>().map(Redundancy::Erasure).map_err(|e| e.to_string());
        }
        Err(format!("invalid redundancy {:?}: `replicate` or `ec:K+M` (e.g. ec:4+2)", truncated(text)))
    }
}

fn truncated(text: &str) -> String {
    text.chars().take(32).collect()
}

/// What a policy governs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyTarget {
    /// Files at or under this absolute path (normalized: no trailing `/` but for `/` itself).
    Prefix(String),
    /// Objects of this S3 bucket.
    Bucket(String),
}

impl fmt::Display for PolicyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyTarget::Prefix(prefix) => f.write_str(prefix),
            PolicyTarget::Bucket(bucket) => write!(f, "bucket {bucket}"),
        }
    }
}

impl PolicyTarget {
    fn key(&self) -> Vec<u8> {
        let (tag, name) = match self {
            PolicyTarget::Prefix(prefix) => (PATH_TAG, prefix),
            PolicyTarget::Bucket(bucket) => (BUCKET_TAG, bucket),
        };
        let mut key = Vec::with_capacity(1 + name.len());
        key.push(tag);
        key.extend_from_slice(name.as_bytes());
        key
    }

    fn from_key(key: &[u8]) -> Result<Self, StoreError> {
        let broken = || StoreError(format!("policy key {key:?} is neither a path's nor a bucket's"));
        let (&tag, name) = key.split_first().ok_or_else(broken)?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| broken())?;
        match tag {
            PATH_TAG => Ok(PolicyTarget::Prefix(name)),
            BUCKET_TAG => Ok(PolicyTarget::Bucket(name)),
            _ => Err(broken()),
        }
    }

    /// Checks the target's shape (not that its bucket exists: the apply does).
    pub fn check(&self) -> Result<(), String> {
        match self {
            PolicyTarget::Prefix(prefix) => {
                let normalized = normalize_prefix(prefix)?;
                if normalized != *prefix {
                    return Err(format!("the policy prefix {prefix:?} is not in its normal form {normalized:?}"));
                }
                Ok(())
            }
            // Existing buckets may predate a naming rule, so only what no bucket can be is
            // refused here; the apply refuses a bucket that does not exist.
            PolicyTarget::Bucket(bucket) if bucket.is_empty() || bucket.len() > 63 || bucket.contains('\0') => {
                Err(format!("invalid bucket name {:?}", truncated(bucket)))
            }
            PolicyTarget::Bucket(_) => Ok(()),
        }
    }
}

/// A policy prefix in its stored form: an absolute path without `.`, `..` or empty components,
/// and without a trailing `/` (but `/` itself, which governs every file).
pub fn normalize_prefix(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err(format!("the policy prefix {:?} is not an absolute path: it must start with /", truncated(text)));
    }
    let trimmed = text.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".to_string());
    }
    crate::files::validate_path(trimmed).map_err(|why| format!("the policy prefix is {why}"))?;
    Ok(trimmed.to_string())
}

/// Whether the policy of `prefix` governs `path`: the same path, or one below it.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/" || path == prefix || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// The prefixes that could govern `path`, longest first: the path itself, then each ancestor,
/// ending with `/`. Nothing for a string that is no absolute path.
pub fn candidate_prefixes(path: &str) -> impl Iterator<Item = &str> {
    let mut next = path.starts_with('/').then_some(path);
    std::iter::from_fn(move || {
        let current = next?;
        next = match current.rfind('/') {
            _ if current == "/" => None,
            Some(0) => Some("/"),
            Some(at) => Some(&current[..at]),
            None => None,
        };
        Some(current)
    })
}

/// The longest prefix among `policies` that governs `path`, with its value.
pub fn longest_match<'a, T>(policies: &'a BTreeMap<String, T>, path: &str) -> Option<(&'a str, &'a T)> {
    candidate_prefixes(path).find_map(|prefix| policies.get_key_value(prefix)).map(|(k, v)| (k.as_str(), v))
}

/// A `Policies` row. An enum so that a later shape is a new variant: postcard encodes by
/// position, and a field added to a struct would make every stored row undecodable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyRecord {
    V1 {
        redundancy: Redundancy,
        /// When it was set, on the state clock.
        set_ms: u64,
    },
}

impl PolicyRecord {
    pub fn redundancy(&self) -> Redundancy {
        match self {
            PolicyRecord::V1 { redundancy, .. } => *redundancy,
        }
    }

    pub fn set_ms(&self) -> u64 {
        match self {
            PolicyRecord::V1 { set_ms, .. } => *set_ms,
        }
    }
}

/// A change of policy (`Command::Policy`): one wrapper variant in `Command`, so that what
/// policies need later moves the log's numbering of commands no further.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyCommand {
    /// Sets (or replaces) the policy of a prefix or a bucket.
    Set { target: PolicyTarget, redundancy: Redundancy },
    /// Removes it; puts under it fall back to a shorter prefix's policy, or replicate.
    Unset { target: PolicyTarget },
}

impl PolicyCommand {
    pub fn target(&self) -> &PolicyTarget {
        match self {
            PolicyCommand::Set { target, .. } | PolicyCommand::Unset { target } => target,
        }
    }

    /// Its shape, checked on the leader before it is proposed (`validate`). A scheme needs no
    /// check: decoding one checks its bounds.
    pub fn check(&self) -> Result<(), String> {
        self.target().check()
    }

    pub fn approximate_bytes(&self) -> usize {
        8 + match self.target() {
            PolicyTarget::Prefix(name) | PolicyTarget::Bucket(name) => name.len(),
        }
    }
}

pub fn get_policy(store: &impl StateStore, target: &PolicyTarget) -> Result<Option<PolicyRecord>, StoreError> {
    store.get(Table::Policies, &target.key())?.map(|bytes| decode(&bytes)).transpose()
}

/// Every policy, path prefixes first (in path order), then buckets; at most [`POLICIES_MAX`].
pub fn list_policies(store: &impl StateStore) -> Result<Vec<(PolicyTarget, PolicyRecord)>, StoreError> {
    store
        .range(Table::Policies, &[], None, POLICIES_MAX)?
        .into_iter()
        .map(|(key, value)| Ok((PolicyTarget::from_key(&key)?, decode(&value)?)))
        .collect::<Result<Vec<_>, StoreError>>()
        .map(|mut policies| {
            // Keys sort buckets ('b') first; paths first reads better.
            policies.sort_by_key(|(target, _)| matches!(target, PolicyTarget::Bucket(_)));
            policies
        })
}

/// The policy governing `path`: its longest matching prefix and that prefix's redundancy.
pub fn policy_for_path(store: &impl StateStore, path: &str) -> Result<Option<(String, Redundancy)>, StoreError> {
    for prefix in candidate_prefixes(path) {
        if let Some(record) = get_policy(store, &PolicyTarget::Prefix(prefix.to_string()))? {
            return Ok(Some((prefix.to_string(), record.redundancy())));
        }
    }
    Ok(None)
}

pub fn policy_for_bucket(store: &impl StateStore, bucket: &str) -> Result<Option<Redundancy>, StoreError> {
    Ok(get_policy(store, &PolicyTarget::Bucket(bucket.to_string()))?.map(|record| record.redundancy()))
}

/// Applies a policy change. A bucket's policy needs the bucket; a new policy beyond
/// [`POLICIES_MAX`] is refused. Answers the policy the target had before.
pub(crate) fn apply(
    store: &mut impl StateStore,
    command: &PolicyCommand,
    clock_ms: u64,
) -> Result<CommandResult, StoreError> {
    let target = command.target();
    let previous = get_policy(store, target)?.map(|record| record.redundancy());
    match command {
        PolicyCommand::Set { redundancy, .. } => {
            if let PolicyTarget::Bucket(bucket) = target {
                if crate::s3::get_bucket(store, bucket)?.is_none() {
                    return Ok(Err(CommandError::NoSuchBucket { bucket: bucket.clone() }));
                }
            }
            if previous.is_none() && store.range(Table::Policies, &[], None, POLICIES_MAX)?.len() >= POLICIES_MAX {
                return Ok(Err(CommandError::TooMany {
                    what: "redundancy policies".into(),
                    limit: POLICIES_MAX as u64,
                    hint: "unset the ones no longer needed (`mendfs policy list`, `mendfs policy unset`)".into(),
                }));
            }
            let record = PolicyRecord::V1 { redundancy: *redundancy, set_ms: clock_ms };
            store.put(Table::Policies, &target.key(), &encode(&record)?)?;
        }
        PolicyCommand::Unset { .. } => store.remove(Table::Policies, &target.key())?,
    }
    Ok(Ok(Outcome::PolicyChanged { previous }))
}

/// Drops a deleted bucket's policy, so that a bucket created later under the same name starts
/// without one (as it starts without grants).
pub(crate) fn remove_bucket_policy(store: &mut impl StateStore, bucket: &str) -> Result<(), StoreError> {
    store.remove(Table::Policies, &PolicyTarget::Bucket(bucket.to_string()).key())
}

/// How a committed version's content is kept, from its first chunk: the largest, since only a
/// file's last chunk may be shorter than the chunk size, and the only one that decides (the
/// data plane stripes every chunk big enough, and a small tail stays replicated). A chunk the
/// metadata already held another way when the write came keeps that way, and this says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredAs {
    /// In the metadata itself: a small file's one chunk, or nothing (an empty file).
    Inline,
    /// Copies on storage nodes, as many as the cluster's replication factor.
    Replicated,
    /// Stripes of this scheme.
    Striped(Scheme),
}

/// How `record`'s content is kept; None if this state does not hold its first chunk (a node
/// that has not applied the version yet, or one that already released it).
pub fn stored_as(store: &impl StateStore, record: &FileRecord) -> Result<Option<StoredAs>, StoreError> {
    if record.n_chunks == 0 {
        return Ok(Some(StoredAs::Inline));
    }
    let start = record.chunk_set.to_be_bytes();
    let end = prefix_end(&start);
    // Segments are keyed by their last index: the first row holds chunk 0.
    let Some((_, segment)) = store.range(Table::Segments, &start, end.as_deref(), 1)?.into_iter().next() else {
        return Ok(None);
    };
    let segment: Vec<FileChunk> = decode(&segment)?;
    let Some(first) = segment.first() else { return Ok(None) };
    chunk_stored_as(store, &first.hash)
}

/// How one chunk is kept; None if no table holds it.
pub fn chunk_stored_as(
    store: &impl StateStore,
    hash: &mendfs_types::ChunkHash,
) -> Result<Option<StoredAs>, StoreError> {
    if let Some(stripe) = crate::stripes::get_stripe(store, hash)? {
        return Ok(Some(StoredAs::Striped(stripe.scheme)));
    }
    if crate::files::get_chunk(store, hash)?.is_some() {
        return Ok(Some(StoredAs::Replicated));
    }
    Ok(crate::files::get_inline_chunk(store, hash)?.map(|_| StoredAs::Inline))
}

#[cfg(test)]
mod tests;
