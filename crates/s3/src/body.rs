//! A request body as an upload: streamed into the data plane a piece at a time, hashed as it
//! passes, and verified against what the client declared (its length, `Content-MD5`, its
//! `x-amz-checksum-*` headers or trailers) before the write may commit.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use futures::StreamExt;
use md5::Digest as _;
use mendfs_data::coordinator::UploadSource;
use s3s::checksum::ChecksumHasher;
use s3s::dto::{Checksum, ChecksumAlgorithm, StreamingBlob};
use s3s::{S3Error, S3ErrorCode};

/// The largest object one PUT (or one part) may carry: S3's limit.
pub(crate) const PUT_BYTES_MAX: u64 = 5 << 30;

/// What the client declared about its body.
#[derive(Debug, Default, Clone)]
pub(crate) struct Declared {
    pub length: Option<u64>,
    /// `Content-MD5`, base64.
    pub md5: Option<String>,
    /// Checksums in headers (base64), and the algorithm of one that comes as a trailer.
    pub checksum: Checksum,
    pub algorithm: Option<String>,
}

/// What the body turned out to be, once read whole and verified.
#[derive(Debug, Default, Clone)]
pub(crate) struct Verified {
    pub md5_hex: String,
    /// The checksums the client asked for, as (header algorithm, base64 value).
    pub checksums: Vec<(String, String)>,
}

/// Shared between the upload source (which the data plane consumes) and the operation, which
/// needs the outcome: the exact S3 error of a failed body, or the verified digests.
pub(crate) type Outcome = Arc<Mutex<Result<Verified, S3Error>>>;

pub(crate) struct BodyUpload {
    body: StreamingBlob,
    declared: Declared,
    trailers: Option<s3s::TrailingHeaders>,
    received: u64,
    md5: md5::Md5,
    checksums: ChecksumHasher,
    outcome: Outcome,
}

impl BodyUpload {
    pub(crate) fn new(
        body: StreamingBlob,
        declared: Declared,
        trailers: Option<s3s::TrailingHeaders>,
    ) -> Result<(Self, Outcome), S3Error> {
        if declared.length.is_some_and(|length| length > PUT_BYTES_MAX) {
            return Err(S3Error::with_message(
                S3ErrorCode::EntityTooLarge,
                format!("one PUT carries at most {PUT_BYTES_MAX} bytes; use a multipart upload"),
            ));
        }
        let mut checksums = ChecksumHasher::default();
        let c = &declared.checksum;
        let wanted = |header: &Option<String>, name: &str| {
            header.is_some() || declared.algorithm.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(name))
        };
        if wanted(&c.checksum_crc32, ChecksumAlgorithm::CRC32) {
            checksums.crc32 = Some(Default::default());
        }
        if wanted(&c.checksum_crc32c, ChecksumAlgorithm::CRC32C) {
            checksums.crc32c = Some(Default::default());
        }
        if wanted(&c.checksum_sha1, ChecksumAlgorithm::SHA1) {
            checksums.sha1 = Some(Default::default());
        }
        if wanted(&c.checksum_sha256, ChecksumAlgorithm::SHA256) {
            checksums.sha256 = Some(Default::default());
        }
        if wanted(&c.checksum_crc64nvme, ChecksumAlgorithm::CRC64NVME) {
            checksums.crc64nvme = Some(Default::default());
        }
        let outcome: Outcome = Arc::new(Mutex::new(Err(S3Error::with_message(
            S3ErrorCode::IncompleteBody,
            "the body was not read to its end",
        ))));
        let upload = BodyUpload {
            body,
            declared,
            trailers,
            received: 0,
            md5: md5::Md5::new(),
            checksums,
            outcome: outcome.clone(),
        };
        Ok((upload, outcome))
    }

    fn fail(&self, error: S3Error) -> tonic::Status {
        let status = tonic::Status::aborted(error.message().unwrap_or("the request body was refused").to_string());
        if let Ok(mut outcome) = self.outcome.lock() {
            *outcome = Err(error);
        }
        status
    }

    /// At the body's end: every declared length and digest must match.
    fn verify(&mut self) -> Result<Verified, S3Error> {
        if let Some(length) = self.declared.length.filter(|length| *length != self.received) {
            return Err(S3Error::with_message(
                S3ErrorCode::IncompleteBody,
                format!("the body has {} bytes, not the {length} declared", self.received),
            ));
        }
        let md5 = std::mem::take(&mut self.md5).finalize();
        if let Some(declared) = &self.declared.md5 {
            let decoded = base64::engine::general_purpose::STANDARD.decode(declared.trim()).ok();
            match decoded {
                Some(bytes) if bytes.len() == 16 => {
                    if bytes.as_slice() != md5.as_slice() {
                        return Err(S3Error::with_message(
                            S3ErrorCode::BadDigest,
                            "the Content-MD5 you specified did not match what we received",
                        ));
                    }
                }
                _ => return Err(S3Error::with_message(S3ErrorCode::InvalidDigest, "Content-MD5 is not a base64 MD5")),
            }
        }
        let computed = std::mem::take(&mut self.checksums).finalize();
        let trailers = self.trailers.as_ref().and_then(|trailers| trailers.take());
        let from_trailer =
            |name: &str| trailers.as_ref().and_then(|t| t.get(name)).and_then(|v| v.to_str().ok()).map(str::to_string);
        let c = &self.declared.checksum;
        let pairs = [
            ("CRC32", &c.checksum_crc32, &computed.checksum_crc32, "x-amz-checksum-crc32"),
            ("CRC32C", &c.checksum_crc32c, &computed.checksum_crc32c, "x-amz-checksum-crc32c"),
            ("SHA1", &c.checksum_sha1, &computed.checksum_sha1, "x-amz-checksum-sha1"),
            ("SHA256", &c.checksum_sha256, &computed.checksum_sha256, "x-amz-checksum-sha256"),
            ("CRC64NVME", &c.checksum_crc64nvme, &computed.checksum_crc64nvme, "x-amz-checksum-crc64nvme"),
        ];
        let mut checksums = Vec::new();
        for (algorithm, header, computed, trailer) in pairs {
            let Some(computed) = computed else { continue };
            let expected = header.clone().or_else(|| from_trailer(trailer));
            match expected {
                Some(expected) if expected != *computed => {
                    return Err(S3Error::with_message(
                        S3ErrorCode::BadDigest,
                        format!("the {algorithm} checksum you specified did not match what we received"),
                    ));
                }
                Some(_) => checksums.push((algorithm.to_string(), computed.clone())),
                // Asked for by algorithm, but the trailer never came.
                None => {
                    return Err(S3Error::with_message(
                        S3ErrorCode::InvalidRequest,
                        format!("the {algorithm} checksum was announced but not sent"),
                    ))
                }
            }
        }
        Ok(Verified { md5_hex: mendfs_types::hex(&md5), checksums })
    }
}

impl UploadSource for &mut BodyUpload {
    fn remaining_hint(&self) -> Option<u64> {
        self.declared.length.map(|length| length.saturating_sub(self.received))
    }

    async fn next_data(&mut self) -> Result<Option<bytes::Bytes>, tonic::Status> {
        match self.body.next().await {
            Some(Ok(bytes)) => {
                self.received += bytes.len() as u64;
                // A body longer than declared is refused as soon as its excess arrives, as
                // the client's error: the data plane sized the chunk it is streaming by the
                // declared length, and its replicas would refuse the excess first, which
                // would read as a failed node (503) instead of a bad request.
                if let Some(length) = self.declared.length.filter(|length| self.received > *length) {
                    let error = S3Error::with_message(
                        S3ErrorCode::IncompleteBody,
                        format!("the body has more than the {length} bytes declared"),
                    );
                    return Err(self.fail(error));
                }
                if self.received > PUT_BYTES_MAX {
                    let error = S3Error::with_message(
                        S3ErrorCode::EntityTooLarge,
                        format!("one PUT carries at most {PUT_BYTES_MAX} bytes; use a multipart upload"),
                    );
                    return Err(self.fail(error));
                }
                self.md5.update(&bytes);
                self.checksums.update(&bytes);
                Ok(Some(bytes))
            }
            Some(Err(e)) => Err(self.fail(body_error(e))),
            None => match self.verify() {
                Ok(verified) => {
                    if let Ok(mut outcome) = self.outcome.lock() {
                        *outcome = Ok(verified);
                    }
                    Ok(None)
                }
                Err(error) => Err(self.fail(error)),
            },
        }
    }
}

/// A body stream's failure as the S3 error it means. `s3s` keeps its error types private, so
/// the kind is read from the message: a payload hash or chunk signature that does not match
/// is the client's signing error, anything else a body that broke off.
fn body_error(error: s3s::StdError) -> S3Error {
    let text = error.to_string();
    if text.contains("Sha256Mismatch") || text.contains("sha256") {
        let code = S3ErrorCode::Custom("XAmzContentSHA256Mismatch".into());
        let mut error = S3Error::with_message(code, "the body does not match x-amz-content-sha256");
        error.set_status_code(http::StatusCode::BAD_REQUEST);
        error
    } else if text.contains("Signature") {
        S3Error::with_message(S3ErrorCode::SignatureDoesNotMatch, "a chunk signature of the body does not match")
    } else {
        S3Error::with_message(S3ErrorCode::IncompleteBody, format!("the request body broke off: {text}"))
    }
}

/// The outcome of a body that the data plane consumed: the S3 error if the body itself was
/// at fault, else `status` (the data plane's own failure) as an S3 error.
pub(crate) fn failure(outcome: &Outcome, status: tonic::Status) -> S3Error {
    match outcome.lock() {
        Ok(guard) => match &*guard {
            Err(error) if error.code() != &S3ErrorCode::IncompleteBody || status.code() == tonic::Code::Aborted => {
                S3Error::with_message(error.code().clone(), error.message().unwrap_or_default().to_string())
            }
            _ => crate::errors::from_status(status),
        },
        Err(_) => crate::errors::from_status(status),
    }
}

pub(crate) fn verified(outcome: &Outcome) -> Result<Verified, S3Error> {
    match outcome.lock() {
        Ok(guard) => match &*guard {
            Ok(verified) => Ok(verified.clone()),
            Err(error) => {
                Err(S3Error::with_message(error.code().clone(), error.message().unwrap_or_default().to_string()))
            }
        },
        Err(_) => Err(S3Error::with_message(S3ErrorCode::InternalError, "the body's outcome was lost")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(pieces: &[&'static [u8]]) -> StreamingBlob {
        let pieces: Vec<Result<bytes::Bytes, std::io::Error>> =
            pieces.iter().map(|piece| Ok(bytes::Bytes::from_static(piece))).collect();
        StreamingBlob::wrap(futures::stream::iter(pieces))
    }

    #[tokio::test]
    async fn a_body_longer_than_declared_is_refused_at_its_excess_as_the_clients_error() {
        let declared = Declared { length: Some(4), ..Declared::default() };
        let (mut upload, outcome) = BodyUpload::new(body_of(&[b"abc", b"de", b"fgh"]), declared, None).unwrap();
        let mut source = &mut upload;
        assert_eq!(source.next_data().await.unwrap().as_deref(), Some(&b"abc"[..]));
        let refused = source.next_data().await.expect_err("the fifth byte is over the declared four");
        assert_eq!(refused.code(), tonic::Code::Aborted);
        let error = verified(&outcome).expect_err("the body failed");
        assert_eq!(error.code(), &S3ErrorCode::IncompleteBody);
        assert!(error.message().unwrap_or_default().contains("more than the 4 bytes declared"));
    }

    #[tokio::test]
    async fn a_body_of_exactly_the_declared_length_is_verified() {
        let declared = Declared { length: Some(5), ..Declared::default() };
        let (mut upload, outcome) = BodyUpload::new(body_of(&[b"abc", b"de"]), declared, None).unwrap();
        let mut source = &mut upload;
        let mut received = Vec::new();
        while let Some(piece) = source.next_data().await.unwrap() {
            received.extend_from_slice(&piece);
        }
        assert_eq!(received, b"abcde");
        assert!(verified(&outcome).is_ok());
    }
}
