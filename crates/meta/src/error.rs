//! The errors a metadata node answers with, and how they cross the wire.

use mendfs_proto::{ERROR_ACTUAL_VERSION_HEADER, ERROR_EXPECTED_VERSION_HEADER, ERROR_KIND_HEADER};
use serde::{Deserialize, Serialize};

use crate::schema::CommandError;
use crate::NodeId;

/// An error answered to a client. [`ApiError::is_retryable`] says whether the same request may
/// be sent again (writes carry a request id, so a retried write is applied at most once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    #[error("node is not the leader (leader: {})", leader.map_or("unknown".to_string(), |id| id.to_string()))]
    NotLeader { leader: Option<NodeId> },
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    Command(#[from] CommandError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ApiError::NotLeader { .. } | ApiError::Unavailable(_) | ApiError::Timeout(_))
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        let message = error.to_string();
        let (code, kind) = match &error {
            ApiError::NotLeader { .. } => (tonic::Code::Unavailable, "not-leader"),
            ApiError::Unavailable(_) => (tonic::Code::Unavailable, "unavailable"),
            ApiError::Timeout(_) => (tonic::Code::DeadlineExceeded, "timeout"),
            ApiError::InvalidArgument(_) => (tonic::Code::InvalidArgument, "invalid-argument"),
            ApiError::NotFound(_) => (tonic::Code::NotFound, "not-found"),
            ApiError::Command(CommandError::KeyExists { .. }) => (tonic::Code::AlreadyExists, "key-exists"),
            ApiError::Command(CommandError::VersionMismatch { .. }) => {
                (tonic::Code::FailedPrecondition, "version-mismatch")
            }
            ApiError::Command(CommandError::SessionNotFound { .. }) => (tonic::Code::NotFound, "session-not-found"),
            ApiError::Command(CommandError::FileNotFound { .. }) => (tonic::Code::NotFound, "file-not-found"),
            ApiError::Command(CommandError::PrepareExpired { .. }) => (tonic::Code::Aborted, "prepare-expired"),
            ApiError::Command(CommandError::NodeNotFound { .. }) => (tonic::Code::NotFound, "node-not-found"),
            ApiError::Command(CommandError::TokenExists { .. }) => (tonic::Code::FailedPrecondition, "token-exists"),
            ApiError::Command(CommandError::QuotaExceeded { .. }) => (tonic::Code::ResourceExhausted, "quota-exceeded"),
            ApiError::Command(CommandError::TooManySessions { .. }) => {
                (tonic::Code::ResourceExhausted, "too-many-sessions")
            }
            ApiError::Command(CommandError::CompactBeyondCurrent { .. }) => {
                (tonic::Code::OutOfRange, "compact-beyond-current")
            }
            ApiError::Command(CommandError::UploadNotFound { .. }) => (tonic::Code::Aborted, "upload-not-found"),
            ApiError::Command(CommandError::UploadMismatch { .. }) => (tonic::Code::Internal, "upload-mismatch"),
            ApiError::Command(CommandError::UnknownChunk { .. }) => (tonic::Code::Internal, "unknown-chunk"),
            ApiError::Command(CommandError::NoSuchBucket { .. }) => (tonic::Code::NotFound, "no-such-bucket"),
            ApiError::Command(CommandError::BucketExists { .. }) => (tonic::Code::AlreadyExists, "bucket-exists"),
            ApiError::Command(CommandError::BucketNotEmpty { .. }) => {
                (tonic::Code::FailedPrecondition, "bucket-not-empty")
            }
            ApiError::Command(CommandError::NoSuchKey { .. }) => (tonic::Code::NotFound, "no-such-key"),
            ApiError::Command(CommandError::PreconditionFailed { .. }) => {
                (tonic::Code::FailedPrecondition, "precondition-failed")
            }
            ApiError::Command(CommandError::NoSuchUpload { .. }) => (tonic::Code::NotFound, "no-such-upload"),
            ApiError::Command(CommandError::InvalidPart { .. }) => (tonic::Code::InvalidArgument, "invalid-part"),
            ApiError::Command(CommandError::InvalidPartOrder) => (tonic::Code::InvalidArgument, "invalid-part-order"),
            ApiError::Command(CommandError::EntityTooSmall { .. }) => {
                (tonic::Code::InvalidArgument, "entity-too-small")
            }
            ApiError::Command(CommandError::AccessKeyExists { .. }) => {
                (tonic::Code::AlreadyExists, "access-key-exists")
            }
            ApiError::Command(CommandError::NoSuchAccessKey { .. }) => (tonic::Code::NotFound, "no-such-access-key"),
            ApiError::Command(CommandError::InvalidRequest { .. }) => (tonic::Code::InvalidArgument, "invalid-request"),
            ApiError::Command(CommandError::LoginCodeInvalid) => (tonic::Code::Unauthenticated, "login-code-invalid"),
            ApiError::Command(CommandError::TooMany { .. }) => (tonic::Code::ResourceExhausted, "too-many"),
            ApiError::Command(CommandError::JobNotFound { .. }) => (tonic::Code::NotFound, "job-not-found"),
            ApiError::Command(CommandError::JobExists { .. }) => (tonic::Code::AlreadyExists, "job-exists"),
            ApiError::Command(CommandError::LeaseLost { .. }) => (tonic::Code::FailedPrecondition, "lease-lost"),
            ApiError::Internal(_) => (tonic::Code::Internal, "internal"),
        };
        let mut status = tonic::Status::new(code, message);
        if let Ok(value) = kind.parse() {
            status.metadata_mut().insert(ERROR_KIND_HEADER, value);
        }
        let actual = match &error {
            ApiError::Command(CommandError::VersionMismatch { actual, .. }) => Some(*actual),
            ApiError::Command(CommandError::KeyExists { version }) => Some(*version),
            _ => None,
        };
        if let ApiError::Command(CommandError::VersionMismatch { expected, .. }) = &error {
            if let Ok(value) = expected.to_string().parse() {
                status.metadata_mut().insert(ERROR_EXPECTED_VERSION_HEADER, value);
            }
        }
        if let Some(actual) = actual {
            if let Ok(value) = actual.to_string().parse() {
                status.metadata_mut().insert(ERROR_ACTUAL_VERSION_HEADER, value);
            }
        }
        status
    }
}
