//! The MendFS wire protocol: generated gRPC services and messages, plus the metadata keys
//! every call carries. Every other crate speaks to the network through these types.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("mendfs.v1");
}

/// etcd v3's KV.Put, for benchmarking against a reference etcd cluster.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// gRPC metadata key carrying the cluster secret on every call, node-to-node and client.
pub const SECRET_HEADER: &str = "x-mendfs-secret";
/// gRPC metadata key carrying the sender's cluster id on node-to-node calls, so that a node
/// whose data directory belongs to another cluster is refused instead of mixing two clusters.
pub const CLUSTER_ID_HEADER: &str = "x-mendfs-cluster-id";
/// gRPC metadata key set on a request a node forwards to the leader, so that it is never
/// forwarded twice (no forwarding loops while leadership moves).
pub const FORWARDED_HEADER: &str = "x-mendfs-forwarded";
/// gRPC metadata key on a reply from a node that is not the leader: the leader's address, so
/// that clients send the next request straight there.
pub const LEADER_HINT_HEADER: &str = "x-mendfs-leader";
/// gRPC metadata keys describing a domain error in machine-readable form.
pub const ERROR_KIND_HEADER: &str = "x-mendfs-error-kind";
pub const ERROR_ACTUAL_VERSION_HEADER: &str = "x-mendfs-actual-version";
pub const ERROR_EXPECTED_VERSION_HEADER: &str = "x-mendfs-expected-version";
