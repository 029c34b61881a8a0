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

include!(concat!(env!("OUT_DIR"), "/operations.rs"));

/// gRPC metadata key carrying the cluster secret, the peers' credential (and an operator's on
/// a node's own machine); clients use tokens instead.
pub const SECRET_HEADER: &str = "x-mendfs-secret";
/// gRPC metadata key carrying the calling node's id on node-to-node calls. A node presenting
/// a certificate must name the node the certificate was issued to.
pub const NODE_ID_HEADER: &str = "x-mendfs-node";
/// gRPC metadata key carrying a client's bearer token (`Bearer TOKEN`).
pub const AUTHORIZATION_HEADER: &str = "authorization";
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

/// A peer call's status with the chain of errors behind it: tonic says only "http2 error" when
/// a silent peer's connection is dropped, and the cause ("keep-alive timed out") is what tells
/// an operator the node stopped answering rather than refused.
pub fn status_with_cause(status: &tonic::Status) -> String {
    let mut text = format!("{}: {}", status.code(), status.message());
    let mut cause = std::error::Error::source(status);
    while let Some(error) = cause {
        let message = error.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        cause = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::status_with_cause;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|layer| layer as &(dyn std::error::Error + 'static))
        }
    }

    #[test]
    fn the_causes_behind_a_status_are_named_once_each() {
        let cause = Layer("transport error", Some(Box::new(Layer("keep-alive timed out", None))));
        let mut status = tonic::Status::unavailable("http2 error");
        status.set_source(std::sync::Arc::new(cause));
        assert_eq!(
            status_with_cause(&status),
            "The service is currently unavailable: http2 error: transport error: keep-alive timed out"
        );
        // A cause already in the message is not repeated.
        let status = tonic::Status::from_error(Box::new(Layer("disk full", None)));
        assert_eq!(status_with_cause(&status).matches("disk full").count(), 1);
    }

    #[test]
    fn every_service_method_is_a_known_operation() {
        for operation in [
            "Node/AppendEntries",
            "Kv/Watch",
            "Cluster/Drain",
            "Files/Put",
            "Storage/ReplicateChunk",
            "Health/Heartbeat",
            "Telemetry/QueryLogs",
            "S3Admin/CreateKey",
            "S3Admin/DeleteBucket",
            "KV/Put",
        ] {
            assert!(crate::OPERATIONS.contains(&operation), "{operation}");
        }
        assert!(crate::OPERATIONS.len() >= 30, "{:?}", crate::OPERATIONS);
    }
}
