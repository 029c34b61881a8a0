//! Every decoder a node runs on a peer's `RaftPayload`: Raft RPCs and replies, forwarded
//! requests and answers, snapshots.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mendfs_meta::crafted::decode_peer_payloads(data);
});
