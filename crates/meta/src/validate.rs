//! The limits every command must keep, checked on the leader before it is proposed, whoever
//! sent it: a client through a node's own checks, or a peer's forwarded request, which no
//! other check has seen. Refusing here keeps oversized or malformed records out of the log,
//! where every replica would have to store and apply them forever.

use crate::error::ApiError;
use crate::files::{committed_chunk_bytes, validate_path, CommittedChunk, SEGMENT_BYTES_MAX, SEGMENT_CHUNKS_MAX};
use crate::node::MetaConfig;
use crate::s3;
use crate::state::Command;

/// Sessions live at least this long and at most this long.
pub const SESSION_TTL_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;
/// Replicas listed for one chunk, and nodes in one drop's `keep`.
const REPLICAS_MAX: usize = 64;
/// Entries in one repair checkpoint or drop batch.
const BATCH_ENTRIES_MAX: usize = 65_536;
/// Shard records one repair checkpoint changes: each rewrites a stripe record, so fewer than
/// replica records.
const SHARD_RECORDS_PER_ENTRY_MAX: usize = 4_096;
/// Short strings: a cluster id, a zone, a repair job's reason.
const LABEL_BYTES_MAX: usize = 1_024;

fn invalid(message: String) -> ApiError {
    ApiError::InvalidArgument(message)
}

pub(crate) fn check_key(config: &MetaConfig, key: &[u8]) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(invalid("the key is empty".into()));
    }
    if key.len() > config.max_key_bytes {
        return Err(invalid(format!(
            "the key is {} bytes; the limit is {} bytes (max_key_bytes)",
            key.len(),
            config.max_key_bytes
        )));
    }
    Ok(())
}

pub(crate) fn check_value(config: &MetaConfig, value: &[u8]) -> Result<(), ApiError> {
    if value.len() > config.max_value_bytes {
        return Err(invalid(format!(
            "the value is {} bytes; the limit is {} bytes (max_value_bytes)",
            value.len(),
            config.max_value_bytes
        )));
    }
    Ok(())
}

fn check_len(what: &str, len: usize, max: usize) -> Result<(), ApiError> {
    if len > max {
        return Err(invalid(format!("{what}: {len} is more than the limit of {max}")));
    }
    Ok(())
}

/// Checks one segment of a chunk list (what one entry may carry); returns its bytes. A chunk
/// without replicas is a repeat of one the write listed before, which `apply` checks.
fn check_segment(chunks: &[CommittedChunk]) -> Result<u64, ApiError> {
    check_len("chunks in one segment", chunks.len(), SEGMENT_CHUNKS_MAX)?;
    let (mut size, mut bytes) = (0u64, 0usize);
    for chunk in chunks {
        check_len("replicas of one chunk", chunk.replicas.len(), REPLICAS_MAX)?;
        size = size.saturating_add(chunk.size);
        bytes += committed_chunk_bytes(chunk);
    }
    check_len("proposal bytes of one segment", bytes, SEGMENT_BYTES_MAX)?;
    Ok(size)
}

/// Checks `command` against the limits of `config`; says what is wrong.
pub(crate) fn check_command(config: &MetaConfig, command: &Command) -> Result<(), ApiError> {
    match command {
        Command::InitCluster { cluster_id } => check_len("cluster id bytes", cluster_id.len(), LABEL_BYTES_MAX),
        Command::Create { key, value, .. } | Command::Set { key, value, .. } => {
            check_key(config, key)?;
            check_value(config, value)
        }
        Command::Delete { key, .. } => check_key(config, key),
        Command::SessionOpen { ttl_ms } => {
            if SESSION_TTL_MS.contains(ttl_ms) {
                Ok(())
            } else {
                Err(invalid(format!("session TTL {ttl_ms} ms is outside 100 ms ..= 1 h")))
            }
        }
        Command::SessionClose { .. } | Command::SessionExpire { .. } => Ok(()),
        Command::Job(job) => job.check().map_err(invalid),
        Command::Policy(policy) => policy.check().map_err(invalid),
        Command::RegisterStorageNode { node } => {
            crate::network::validate_node_addr(&node.addr).map_err(invalid)?;
            check_len("zone bytes", node.zone.len(), LABEL_BYTES_MAX)
        }
        Command::CommitFile(commit) => {
            validate_path(&commit.path).map_err(invalid)?;
            if commit.content_hash.len() != 32 {
                return Err(invalid(format!("a content hash is 32 bytes, not {}", commit.content_hash.len())));
            }
            let size = check_segment(&commit.chunks)?;
            match commit.upload_id {
                None if commit.first_index != 0 => {
                    Err(invalid(format!("a commit without an upload starts at chunk 0, not {}", commit.first_index)))
                }
                None if size != commit.size => {
                    Err(invalid(format!("the chunks add up to {size} bytes, the file says {}", commit.size)))
                }
                Some(_) if size > commit.size => {
                    Err(invalid(format!("the last chunks alone are {size} bytes, the file says {}", commit.size)))
                }
                _ => Ok(()),
            }
        }
        Command::StageSegment(stage) => {
            validate_path(&stage.path).map_err(invalid)?;
            if stage.chunks.is_empty() {
                return Err(invalid("a staged segment has no chunk".into()));
            }
            check_segment(&stage.chunks).map(drop)
        }
        Command::AbortUpload { .. } | Command::ReleaseChunks => Ok(()),
        Command::DeleteFile { path, .. } => validate_path(path).map_err(invalid),
        Command::DropReplica { .. }
        | Command::SetNodeLiveness { .. }
        | Command::SetDraining { .. }
        | Command::UnregisterStorageNode { .. } => Ok(()),
        Command::AddReplicas { added, .. } => check_len("replicas added in one entry", added.len(), BATCH_ENTRIES_MAX),
        Command::DropReplicas { drops } => {
            check_len("replicas dropped in one entry", drops.len(), BATCH_ENTRIES_MAX)?;
            for drop in drops {
                check_len("nodes one drop keeps", drop.keep.len(), REPLICAS_MAX)?;
            }
            Ok(())
        }
        Command::RecordRepairJob(job) => check_len("repair reason bytes", job.reason.len(), LABEL_BYTES_MAX),
        Command::CreateToken { name, .. } | Command::RevokeToken { name } => {
            crate::auth::validate_token_name(name).map_err(invalid)
        }
        Command::Compact { .. } => Ok(()),
        Command::SetLimits(limits) => {
            if limits.kv_quota_bytes == 0 || limits.max_sessions == 0 {
                return Err(invalid("the kv quota and the session limit must be at least 1".into()));
            }
            Ok(())
        }
        Command::S3CreateBucket { bucket, owner } => {
            s3::validate_bucket_name(bucket).map_err(invalid)?;
            owner.as_deref().map_or(Ok(()), check_access_key_id)
        }
        Command::S3DeleteBucket { bucket } => check_bucket(bucket),
        Command::S3PutAccessKey { key_id, record } => {
            check_access_key_id(key_id)?;
            check_len("access key name bytes", record.name.len(), LABEL_BYTES_MAX)?;
            check_len("secret key bytes", record.secret.len(), LABEL_BYTES_MAX)
        }
        Command::S3DeleteAccessKey { key_id } => check_access_key_id(key_id),
        Command::S3SetGrant { key_id, bucket, .. } => {
            check_access_key_id(key_id)?;
            check_bucket(bucket)
        }
        Command::S3PutObject(put) => {
            check_bucket(&put.bucket)?;
            s3::validate_object_key(&put.key).map_err(invalid)?;
            check_etag(&put.etag)?;
            check_object_meta(&put.meta)?;
            check_precondition(&put.condition)?;
            check_s3_content(&put.content)
        }
        Command::S3CopyObject(copy) => {
            check_bucket(&copy.source_bucket)?;
            check_bucket(&copy.bucket)?;
            s3::validate_object_key(&copy.source_key).map_err(invalid)?;
            s3::validate_object_key(&copy.key).map_err(invalid)?;
            check_precondition(&copy.source_condition)?;
            check_precondition(&copy.condition)?;
            copy.meta.as_ref().map_or(Ok(()), check_object_meta)
        }
        Command::S3DeleteObjects { bucket, keys } => {
            check_bucket(bucket)?;
            check_len("keys deleted at once", keys.len(), s3::DELETE_KEYS_MAX)?;
            keys.iter().try_for_each(|key| s3::validate_object_key(key).map_err(invalid))
        }
        Command::S3CreateMultipart(upload) => {
            check_bucket(&upload.bucket)?;
            s3::validate_object_key(&upload.key).map_err(invalid)?;
            check_object_meta(&upload.meta)
        }
        Command::S3PutPart(put) => {
            check_bucket(&put.bucket)?;
            s3::validate_object_key(&put.key).map_err(invalid)?;
            check_etag(&put.etag)?;
            check_s3_content(&put.content)
        }
        Command::S3CompleteMultipart(complete) => {
            check_bucket(&complete.bucket)?;
            s3::validate_object_key(&complete.key).map_err(invalid)?;
            check_len("parts of one upload", complete.parts.len(), s3::PARTS_MAX as usize)?;
            check_precondition(&complete.condition)?;
            complete.parts.iter().try_for_each(|(_, etag)| check_len("ETag bytes", etag.len(), ETAG_BYTES_MAX))
        }
        Command::S3AbortMultipart { bucket, key, .. } => {
            check_bucket(bucket)?;
            s3::validate_object_key(key).map_err(invalid)
        }
        Command::S3ExpireMultipart { .. } => Ok(()),
        Command::WithInlineChunks { inline, command } => {
            let Some(listed) = command.written_chunks() else {
                return Err(invalid("inline chunks come only with a file, object or part write".into()));
            };
            check_len("inline chunks in one entry", inline.len(), crate::files::INLINE_CHUNKS_PER_ENTRY_MAX)?;
            for chunk in inline {
                check_len("bytes of an inline chunk", chunk.data.len(), crate::files::INLINE_CHUNK_BYTES_MAX)?;
                let hash = mendfs_types::ChunkHash::of(&chunk.data);
                if !listed.iter().any(|entry| entry.hash == hash && entry.replicas.is_empty()) {
                    return Err(invalid(format!("inline chunk {hash} is not in the write's chunk list")));
                }
            }
            check_command(config, command)
        }
        Command::Login(crate::login::LoginCommand::Redeem { session_name, .. }) => {
            check_len("bytes of a session name", session_name.len(), crate::auth::TOKEN_NAME_BYTES_MAX)
        }
        Command::Login(crate::login::LoginCommand::CreateCode { .. }) => Ok(()),
        Command::WithStripes { stripes, command } => {
            let Some(listed) = command.striped_chunks() else {
                return Err(invalid("stripes come only with a file, object, part or segment write".into()));
            };
            check_len("stripes in one entry", stripes.len(), crate::stripes::STRIPES_PER_ENTRY_MAX)?;
            // What a segment of chunk entries may weigh, the stripes beside it may too.
            let stripe_bytes: usize =
                stripes.iter().map(|stripe| crate::files::stripe_commit_bytes(stripe.shards.len())).sum();
            check_len("bytes of an entry's stripes", stripe_bytes, SEGMENT_BYTES_MAX)?;
            for stripe in stripes {
                check_len("shards of a stripe", stripe.shards.len(), stripe.scheme.total_shards())?;
                if !listed.iter().any(|entry| entry.hash == stripe.chunk && entry.replicas.is_empty()) {
                    return Err(invalid(format!("stripe {} is not in the write's chunk list", stripe.chunk)));
                }
            }
            check_command(config, command)
        }
        Command::RepairShards { added, drops, .. } => {
            check_len("shards added in one entry", added.len(), SHARD_RECORDS_PER_ENTRY_MAX)?;
            check_len("shard drops in one entry", drops.len(), SHARD_RECORDS_PER_ENTRY_MAX)
        }
        Command::RecordClusterEvents(events) => {
            check_len("events in one entry", events.len(), crate::files::CLUSTER_EVENTS_PER_ENTRY_MAX)?;
            events.iter().try_for_each(|event| {
                check_len(
                    "bytes of an event's detail",
                    event.detail.len(),
                    crate::files::CLUSTER_EVENT_DETAIL_BYTES_MAX,
                )
            })
        }
    }
}

/// ETags, access key ids: short by nature.
const ETAG_BYTES_MAX: usize = 128;
const ACCESS_KEY_ID_BYTES_MAX: usize = 128;
/// Standard headers stored with an object, each.
const OBJECT_HEADER_BYTES_MAX: usize = 8 * 1024;
/// ETags one precondition names.
const PRECONDITION_ETAGS_MAX: usize = 64;

fn check_bucket(bucket: &str) -> Result<(), ApiError> {
    // Existing buckets may predate a rule: only the length and the separator matter here.
    if bucket.is_empty() || bucket.len() > 63 || bucket.contains('\0') {
        return Err(invalid(format!("invalid bucket name {bucket:?}")));
    }
    Ok(())
}

fn check_access_key_id(key_id: &str) -> Result<(), ApiError> {
    check_len("access key id bytes", key_id.len(), ACCESS_KEY_ID_BYTES_MAX)?;
    if key_id.is_empty() || !key_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(invalid(format!("an access key id is letters and digits, not {key_id:?}")));
    }
    Ok(())
}

fn check_etag(etag: &str) -> Result<(), ApiError> {
    check_len("ETag bytes", etag.len(), ETAG_BYTES_MAX)
}

fn check_object_meta(meta: &s3::ObjectMeta) -> Result<(), ApiError> {
    let headers = [
        &meta.content_type,
        &meta.content_encoding,
        &meta.content_disposition,
        &meta.content_language,
        &meta.cache_control,
        &meta.expires,
    ];
    for header in headers.into_iter().flatten() {
        check_len("bytes of a stored header", header.len(), OBJECT_HEADER_BYTES_MAX)?;
    }
    check_len("bytes of user metadata", meta.user_bytes(), s3::USER_METADATA_BYTES_MAX)?;
    check_len("checksums", meta.checksums.len(), 8)?;
    for (algorithm, value) in &meta.checksums {
        check_len("checksum bytes", algorithm.len() + value.len(), 256)?;
    }
    Ok(())
}

fn check_precondition(condition: &s3::Precondition) -> Result<(), ApiError> {
    for tags in [&condition.etag_in, &condition.etag_not_in].into_iter().flatten() {
        check_len("ETags in one condition", tags.len(), PRECONDITION_ETAGS_MAX)?;
        tags.iter().try_for_each(|tag| check_etag(tag))?;
    }
    Ok(())
}

fn check_s3_content(content: &s3::S3Content) -> Result<(), ApiError> {
    let size = check_segment(&content.chunks)?;
    match content.upload_id {
        None if content.first_index != 0 => {
            Err(invalid(format!("a commit without an upload starts at chunk 0, not {}", content.first_index)))
        }
        None if size != content.size => {
            Err(invalid(format!("the chunks add up to {size} bytes, the content says {}", content.size)))
        }
        Some(_) if size > content.size => {
            Err(invalid(format!("the last chunks alone are {size} bytes, the content says {}", content.size)))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::{CommitFile, CommittedChunk, StorageNode};
    use crate::policy::{PolicyCommand, PolicyTarget};
    use mendfs_heal::detector::Liveness;
    use mendfs_types::ChunkHash;

    fn config() -> MetaConfig {
        MetaConfig::new(1, "127.0.0.1:1".into(), "/tmp/x".into())
    }

    fn commit(path: &str, chunks: Vec<CommittedChunk>, size: u64) -> Command {
        Command::CommitFile(CommitFile {
            path: path.into(),
            size,
            mtime_ms: 0,
            content_hash: vec![0; 32],
            chunks,
            upload_id: None,
            first_index: 0,
            expected_version: None,
            prepared_at_ms: 0,
            grace_ms: 1,
        })
    }

    fn stage(chunks: Vec<CommittedChunk>) -> Command {
        Command::StageSegment(crate::files::StageSegment {
            upload_id: 7,
            path: "/big".into(),
            first_index: 0,
            chunks,
            prepared_at_ms: 0,
            grace_ms: 1,
        })
    }

    fn policy(target: PolicyTarget) -> Command {
        Command::Policy(PolicyCommand::Set { target, redundancy: crate::policy::Redundancy::Replicate })
    }

    fn chunk(size: u64, replicas: Vec<u64>) -> CommittedChunk {
        CommittedChunk { hash: ChunkHash::of(b"c"), size, replicas }
    }

    #[test]
    fn commands_within_the_limits_pass() {
        let config = config();
        let good = [
            Command::Set { key: b"k".to_vec(), value: vec![0; 1 << 20], expected_version: None, session_id: None },
            Command::SessionOpen { ttl_ms: 100 },
            commit("/a/b", vec![chunk(3, vec![1, 2]), chunk(4, vec![2])], 7),
            commit("/a/b", vec![chunk(3, vec![1]); SEGMENT_CHUNKS_MAX], 3 * SEGMENT_CHUNKS_MAX as u64),
            stage(vec![chunk(3, vec![1, 2, 3]); SEGMENT_CHUNKS_MAX]),
            Command::DeleteFile { path: "/a".into(), expected_version: None },
            policy(PolicyTarget::Prefix("/".into())),
            policy(PolicyTarget::Prefix("/cold".into())),
            policy(PolicyTarget::Bucket("photos".into())),
        ];
        for command in good {
            assert_eq!(check_command(&config, &command), Ok(()), "{command:?}");
        }
    }

    /// What a forwarded request could otherwise put into the log: each is refused by name.
    #[test]
    fn commands_past_the_limits_are_refused_saying_why() {
        let config = config();
        let storage_node = |addr: &str, zone: String| StorageNode {
            id: 9,
            addr: addr.into(),
            zone,
            weight: 100,
            draining: false,
            liveness: Liveness::Up,
        };
        let bad = [
            (Command::Create { key: vec![], value: vec![], session_id: None }, "the key is empty"),
            (
                Command::Set { key: vec![1; 4_097], value: vec![], expected_version: None, session_id: None },
                "max_key_bytes",
            ),
            (
                Command::Set {
                    key: b"k".to_vec(),
                    value: vec![0; (1 << 20) + 1],
                    expected_version: None,
                    session_id: None,
                },
                "max_value_bytes",
            ),
            (Command::SessionOpen { ttl_ms: 0 }, "session TTL"),
            (commit("relative", vec![], 0), "invalid path"),
            (commit("/a/../b", vec![], 0), "invalid path"),
            (commit("/a", vec![chunk(3, vec![1])], 4), "add up to"),
            (
                commit("/a", vec![chunk(3, vec![1]); SEGMENT_CHUNKS_MAX + 1], 3 * (SEGMENT_CHUNKS_MAX as u64 + 1)),
                "chunks in one segment",
            ),
            (stage(vec![chunk(3, vec![1]); SEGMENT_CHUNKS_MAX + 1]), "chunks in one segment"),
            (stage(vec![]), "no chunk"),
            (stage(vec![chunk(3, vec![1; 65])]), "replicas of one chunk"),
            (stage(vec![chunk(3, vec![1; 20]); SEGMENT_CHUNKS_MAX]), "proposal bytes of one segment"),
            (Command::RegisterStorageNode { node: storage_node("not an address", "z".into()) }, "HOST:PORT"),
            (Command::RegisterStorageNode { node: storage_node("127.0.0.1:1", "z".repeat(2_000)) }, "zone bytes"),
            (policy(PolicyTarget::Prefix("cold".into())), "not an absolute path"),
            (policy(PolicyTarget::Prefix("/cold/".into())), "normal form"),
            (policy(PolicyTarget::Prefix(format!("/{}", "x".repeat(5_000)))), "longer than"),
            (policy(PolicyTarget::Bucket("b".repeat(64))), "invalid bucket name"),
        ];
        for (command, why) in bad {
            let refused = check_command(&config, &command).expect_err(why);
            assert!(matches!(refused, ApiError::InvalidArgument(_)), "{refused:?}");
            assert!(refused.to_string().contains(why), "{refused} should say {why:?}");
        }
    }
}
