//! Node-to-node messages as a faulty or hostile peer could send them, encoded exactly as they
//! cross the wire, and the decoders a node runs on them, for the bad-input tests (against real
//! `mendfs server` processes) and the fuzz targets (`fuzz/`). A node never calls these.

use mendfs_types::{unix_now_ms, ChunkHash, NodeId};
use openraft::{CommittedLeaderId, LogId, SnapshotMeta, StoredMembership, Vote};

use crate::files::{CommitFile, CommittedChunk};
use crate::node::{ForwardEnvelope, LeaderRequest, MetaNode};
use crate::schema::encode;
use crate::state::Command;

/// One `Node/InstallSnapshot` chunk from `leader` in `term`, claiming a snapshot far ahead of
/// any real log.
pub fn install_snapshot_chunk(term: u64, leader: NodeId, id: &str, offset: u64, data: Vec<u8>, done: bool) -> Vec<u8> {
    let request = openraft::raft::InstallSnapshotRequest::<crate::TypeConfig> {
        vote: Vote::new_committed(term, leader),
        meta: SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(term, leader), 1_000_000)),
            last_membership: StoredMembership::default(),
            snapshot_id: id.to_string(),
        },
        offset,
        data,
        done,
    };
    encode(&request).unwrap_or_default()
}

/// A `Node/Forward` of a file commit whose one chunk hash is `hash_len` bytes long instead of
/// 32: the encoding of a real commit with the hash cut (or padded) to that length.
pub fn forward_commit_with_hash_len(path: &str, hash_len: u8) -> Vec<u8> {
    let hash = ChunkHash::of(b"a crafted chunk");
    let now = unix_now_ms();
    let commit = CommitFile {
        path: path.to_string(),
        size: 1,
        mtime_ms: now,
        content_hash: vec![0; 32],
        chunks: vec![CommittedChunk { hash, size: 1, replicas: vec![1] }],
        upload_id: None,
        first_index: 0,
        expected_version: None,
        prepared_at_ms: now,
        grace_ms: 60_000,
    };
    let envelope = ForwardEnvelope::new(
        LeaderRequest::Propose(MetaNode::proposal(None, Command::CommitFile(commit))),
        std::time::Duration::from_secs(60),
        None,
        None,
    );
    let mut bytes = encode(&envelope).unwrap_or_default();
    // The hash is written as its length (32, one byte) and its bytes.
    let mut encoded_hash = vec![32u8];
    encoded_hash.extend_from_slice(hash.as_slice());
    if let Some(at) = bytes.windows(33).position(|window| window == encoded_hash.as_slice()) {
        let mut replacement = vec![hash_len];
        replacement.extend((0..hash_len).map(|i| i.wrapping_mul(7)));
        bytes.splice(at..at + 33, replacement);
    }
    bytes
}

/// A `Node/Forward` of a key/value write with a key and a value of the given sizes.
pub fn forward_set(key_bytes: usize, value_bytes: usize) -> Vec<u8> {
    let command = Command::Set {
        key: vec![b'k'; key_bytes],
        value: vec![0; value_bytes],
        expected_version: None,
        session_id: None,
    };
    let envelope = ForwardEnvelope::new(
        LeaderRequest::Propose(MetaNode::proposal(None, command)),
        std::time::Duration::from_secs(60),
        None,
        None,
    );
    encode(&envelope).unwrap_or_default()
}

/// What a node answered to a forwarded request: the error's text if it refused it.
pub fn forward_refusal(reply: &[u8]) -> Option<String> {
    let answer: Result<crate::node::LeaderResponse, crate::ApiError> = crate::schema::decode(reply).ok()?;
    answer.err().map(|error| error.to_string())
}

/// Runs every decoder a node applies to bytes from a peer: each Raft RPC and its reply, a
/// forwarded request and its answer, and a received snapshot. Must never panic.
pub fn decode_peer_payloads(data: &[u8]) {
    use crate::schema::decode;
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
        VoteResponse,
    };
    let _ = decode::<AppendEntriesRequest<crate::TypeConfig>>(data);
    let _ = decode::<VoteRequest<NodeId>>(data);
    let _ = decode::<InstallSnapshotRequest<crate::TypeConfig>>(data);
    let _ = ForwardEnvelope::decode(data);
    let _ = decode::<Result<AppendEntriesResponse<NodeId>, openraft::error::RaftError<NodeId>>>(data);
    let _ = decode::<Result<VoteResponse<NodeId>, openraft::error::RaftError<NodeId>>>(data);
    let _ = decode::<
        Result<
            InstallSnapshotResponse<NodeId>,
            openraft::error::RaftError<NodeId, openraft::error::InstallSnapshotError>,
        >,
    >(data);
    let _ = forward_refusal(data);
    let _ = crate::snapshot_file::SnapshotParser::default().feed(data, |_| Ok(()));
}

/// Feeds a peer's snapshot chunks, cut from `data` at `cuts`, through the receiver a node
/// runs; returns what it made of the last one. Must never panic or grow past the limit.
pub fn receive_snapshot(data: &[u8], cuts: &[(u64, u16)]) -> Result<usize, String> {
    let mut receiving = None;
    let mut last = Ok(0);
    for (i, (offset, len)) in cuts.iter().enumerate() {
        let start = (*offset as usize).min(data.len());
        let end = start.saturating_add(usize::from(*len)).min(data.len());
        let done = i + 1 == cuts.len();
        last = crate::service::receive_snapshot_chunk_for_tests(&mut receiving, *offset, &data[start..end], done);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn peer_payload_decoders_never_panic_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            decode_peer_payloads(&data);
        }

        #[test]
        fn peer_payload_decoders_never_panic_on_damaged_real_messages(
            seed in 0usize..3,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut data = match seed {
                0 => install_snapshot_chunk(3, 1, "s", 0, vec![7; 64], true),
                1 => forward_commit_with_hash_len("/a", 32),
                _ => forward_set(8, 8),
            };
            for (at, byte) in flips {
                let len = data.len();
                data[at % len] ^= byte;
            }
            data.truncate(cut % (data.len() + 1));
            decode_peer_payloads(&data);
        }

        #[test]
        fn the_snapshot_receiver_holds_no_more_than_its_limit(
            data in proptest::collection::vec(any::<u8>(), 0..4_096),
            cuts in proptest::collection::vec((prop_oneof![0u64..5_000, Just(1u64 << 44), Just(u64::MAX)], any::<u16>()), 1..10),
        ) {
            if let Ok(held) = receive_snapshot(&data, &cuts) {
                prop_assert!(held <= 1 << 20);
            }
        }
    }
}
