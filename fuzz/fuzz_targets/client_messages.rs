//! The protobuf messages a node decodes from clients and peers (prost), and the decoders a
//! node runs on the fields inside them.
#![no_main]
use mendfs_proto::v1 as pb;
use prost::Message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = pb::PutRequest::decode(data);
    let _ = pb::ListRequest::decode(data);
    let _ = pb::WatchRequest::decode(data);
    let _ = pb::PutFileRequest::decode(data);
    let _ = pb::GetFileRequest::decode(data);
    let _ = pb::FileChunksRequest::decode(data);
    let _ = pb::PrepareChunkRequest::decode(data);
    let _ = pb::ReplicateChunkRequest::decode(data);
    let _ = pb::HeartbeatRequest::decode(data);
    let _ = pb::CreateTokenRequest::decode(data);
    if let Ok(payload) = pb::RaftPayload::decode(data) {
        mendfs_meta::crafted::decode_peer_payloads(&payload.data);
    }
});
