//! MendFS errors as S3 errors: the code a client's SDK understands, with our message.

use mendfs_meta::{ApiError, CommandError};
use s3s::{S3Error, S3ErrorCode};

/// An error of the metadata as the S3 error a client expects.
pub(crate) fn from_api(error: ApiError) -> S3Error {
    let code = match &error {
        ApiError::Command(command) => match command {
            CommandError::NoSuchBucket { .. } => S3ErrorCode::NoSuchBucket,
            CommandError::BucketExists { yours: true, .. } => S3ErrorCode::BucketAlreadyOwnedByYou,
            CommandError::BucketExists { yours: false, .. } => S3ErrorCode::BucketAlreadyExists,
            CommandError::BucketNotEmpty { .. } => S3ErrorCode::BucketNotEmpty,
            CommandError::NoSuchKey { .. } => S3ErrorCode::NoSuchKey,
            CommandError::PreconditionFailed { .. } => S3ErrorCode::PreconditionFailed,
            CommandError::NoSuchUpload { .. } => S3ErrorCode::NoSuchUpload,
            CommandError::InvalidPart { .. } => S3ErrorCode::InvalidPart,
            CommandError::InvalidPartOrder => S3ErrorCode::InvalidPartOrder,
            CommandError::EntityTooSmall { .. } => S3ErrorCode::EntityTooSmall,
            CommandError::InvalidRequest { .. } => S3ErrorCode::InvalidRequest,
            CommandError::NoSuchAccessKey { .. } => S3ErrorCode::InvalidAccessKeyId,
            // A write whose chunks aged out, or whose upload expired, can simply be sent again.
            CommandError::PrepareExpired { .. } | CommandError::UploadNotFound { .. } => S3ErrorCode::SlowDown,
            _ => S3ErrorCode::InternalError,
        },
        ApiError::NotLeader { .. } | ApiError::Unavailable(_) | ApiError::Timeout(_) => S3ErrorCode::ServiceUnavailable,
        ApiError::InvalidArgument(_) => S3ErrorCode::InvalidArgument,
        ApiError::NotFound(_) => S3ErrorCode::NoSuchKey,
        ApiError::Internal(_) => S3ErrorCode::InternalError,
    };
    S3Error::with_message(code, error.to_string())
}

/// An error of the data plane (a gRPC status) as an S3 error.
pub(crate) fn from_status(status: tonic::Status) -> S3Error {
    let code = match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => S3ErrorCode::ServiceUnavailable,
        tonic::Code::ResourceExhausted => S3ErrorCode::SlowDown,
        tonic::Code::InvalidArgument => S3ErrorCode::InvalidRequest,
        tonic::Code::NotFound => S3ErrorCode::NoSuchKey,
        tonic::Code::FailedPrecondition => S3ErrorCode::PreconditionFailed,
        _ => S3ErrorCode::InternalError,
    };
    S3Error::with_message(code, mendfs_proto_message(&status))
}

fn mendfs_proto_message(status: &tonic::Status) -> String {
    status.message().to_string()
}

pub(crate) fn invalid_argument(message: impl Into<String>) -> S3Error {
    S3Error::with_message(S3ErrorCode::InvalidArgument, message.into())
}
