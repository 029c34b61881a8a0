//! The S3-compatible gateway: the S3 API served by every node, over the same data plane as
//! files (two-phase writes, verified reads with replica fallback, repair) and the S3 keyspace
//! of the metadata (`mendfs_meta::s3`).
//!
//! `s3s` does the protocol: routing, AWS Signature V4 (headers, presigned URLs, `aws-chunked`
//! bodies, signed or not, with trailers), the DTOs and their XML. This crate does the rest:
//! who may do what ([`access`]), the operations ([`gateway`]), and what `s3s` only parses: the
//! `Content-MD5` and `x-amz-checksum-*` of a body are verified here before anything commits.
//!
//! Every request is a trace: its `x-amz-request-id` is its trace id, so `mendfs trace ID`
//! shows an S3 request's hops like any other.

mod access;
mod body;
mod errors;
mod gateway;
mod listing;
mod service;

pub use service::{S3Gateway, S3Settings};
