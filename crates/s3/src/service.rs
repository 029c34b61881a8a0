//! The gateway as a service: `s3s` with our auth, access and operations, wrapped so that every
//! request is a trace whose id is its `x-amz-request-id`, and is counted in the metrics.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use mendfs_data::coordinator::Coordinator;
use mendfs_meta::MetaNode;
use mendfs_telemetry::metrics::RequestMetrics;
use s3s::service::{S3Service, S3ServiceBuilder};
use tracing::Instrument;

use crate::access::{KeyAccess, KeyAuth, OperationSlot};
use crate::gateway::Gateway;

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// The region clients sign for and buckets report.
    pub region: String,
    /// Base domains for virtual-hosted-style requests (`BUCKET.DOMAIN`); empty: path style only.
    pub domains: Vec<String>,
    /// Every part of a multipart upload but the last must be at least this big.
    pub min_part_bytes: u64,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings { region: "us-east-1".into(), domains: Vec::new(), min_part_bytes: 5 << 20 }
    }
}

/// The S3 gateway of one node; cheap to clone.
#[derive(Clone)]
pub struct S3Gateway {
    service: S3Service,
    metrics: Arc<RequestMetrics>,
}

impl S3Gateway {
    pub fn new(
        node: MetaNode,
        coordinator: Coordinator,
        settings: S3Settings,
        metrics: Arc<RequestMetrics>,
    ) -> Result<Self, String> {
        let mut builder =
            S3ServiceBuilder::new(Gateway { node: node.clone(), coordinator, settings: Arc::new(settings.clone()) });
        builder.set_auth(KeyAuth { node: node.clone() });
        builder.set_access(KeyAccess { node });
        if !settings.domains.is_empty() {
            let host = s3s::host::MultiDomain::new(&settings.domains)
                .map_err(|e| format!("--s3-domain {:?}: {e}", settings.domains))?;
            builder.set_host(host);
        }
        let mut config = s3s::config::S3Config::default();
        // Browser form uploads are buffered whole before any check: not served.
        config.post_object_max_file_size = 0;
        // DeleteObjects of 1,000 keys of 1 KiB and CompleteMultipartUpload of 10,000 parts fit.
        config.xml_max_body_size = 4 << 20;
        builder.set_config(Arc::new(s3s::config::StaticConfigProvider::new(Arc::new(config))));
        Ok(S3Gateway { service: builder.build(), metrics })
    }

    /// Serves one request: in a span of its own (a new trace), answered with the trace id as
    /// its `x-amz-request-id`, and counted by operation and status.
    pub async fn call(&self, mut request: http::Request<s3s::Body>) -> http::Response<s3s::Body> {
        let started = Instant::now();
        let operation = OperationSlot(Arc::new(Mutex::new(None)));
        request.extensions_mut().insert(operation.clone());
        let span = tracing::info_span!("rpc", op = "S3", method = %request.method(), error = tracing::field::Empty);
        let request_id = span
            .in_scope(mendfs_telemetry::layer::current_context)
            .map(|context| context.trace_id.to_string())
            .unwrap_or_default();
        let sends_body = sends_body(&request);
        let refused = signature_v2(&request).then(|| {
            xml_error(
                http::StatusCode::FORBIDDEN,
                "AccessDenied",
                "Signature Version 2 is not accepted: sign with AWS Signature Version 4 (boto3: \
                 Config(signature_version='s3v4'))",
                &request_id,
            )
        });
        let served = match refused {
            Some(response) => Ok(response),
            None => self.service.call(request).instrument(span.clone()).await,
        };
        let mut response = match served {
            Ok(response) => response,
            Err(e) => {
                let error: s3s::StdError = e.into();
                span.record("error", error.to_string().as_str());
                let mut response = http::Response::new(s3s::Body::from(String::new()));
                *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                response
            }
        };
        if let Ok(value) = request_id.parse() {
            response.headers_mut().insert("x-amz-request-id", value);
        }
        let status = response.status();
        if status.is_server_error() || status.is_client_error() {
            span.record("error", status.as_str());
            // Refused before its body was read: the client may still send that body (after
            // `Expect: 100-continue` timed out, say) where the next request would start, and
            // the connection would be parsed out of step. Closing it is the one safe way.
            if sends_body {
                response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
        }
        let op = operation.0.lock().ok().and_then(|name| name.clone()).unwrap_or_else(|| "unknown".into());
        self.metrics.observe(&format!("S3/{op}"), status.as_str(), started.elapsed());
        response
    }

    /// Serves HTTP/1.1 on one accepted connection until it closes or `stop` resolves.
    pub async fn serve_connection<I>(self, io: I, stop: impl std::future::Future<Output = ()>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let gateway = self.clone();
            async move { Ok::<_, std::convert::Infallible>(gateway.call(request.map(s3s::Body::from)).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("S3 connection ended: {e}");
                }
            }
            _ = stop => connection.as_mut().graceful_shutdown(),
        }
    }
}

/// Whether a request comes with a body: a length over zero, chunked framing, or an
/// `Expect: 100-continue` that says one follows.
fn sends_body(request: &http::Request<s3s::Body>) -> bool {
    let headers = request.headers();
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<u64>().ok());
    length.is_some_and(|length| length > 0)
        || headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers.contains_key(http::header::EXPECT)
}

/// Whether a request is signed with AWS Signature Version 2 (headers or a presigned URL),
/// which the gateway refuses before `s3s` looks at it: its answer would be a confusing
/// `SignatureDoesNotMatch`.
fn signature_v2(request: &http::Request<s3s::Body>) -> bool {
    let header_v2 = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("AWS "));
    let query_v2 = request.uri().query().is_some_and(|query| {
        query.split('&').any(|pair| pair.starts_with("AWSAccessKeyId=")) && !query.contains("X-Amz-Signature=")
    });
    header_v2 || query_v2
}

/// An S3 error answer of our own.
fn xml_error(status: http::StatusCode, code: &str, message: &str, request_id: &str) -> http::Response<s3s::Body> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message>\
         <RequestId>{request_id}</RequestId></Error>"
    );
    let mut response = http::Response::new(s3s::Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/xml"));
    response
}
