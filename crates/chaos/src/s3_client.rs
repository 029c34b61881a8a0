//! A small S3 client that speaks to the gateway as S3 SDKs do, for `mendfs chaos`'s s3
//! workload and `mendfs bench s3`: SigV4-signed (`UNSIGNED-PAYLOAD`) HTTP/1.1 requests, one in
//! flight on a keep-alive connection, answers streamed to the caller (a GET of a large object
//! is never held whole).
//!
//! The answer's status is the caller's to judge: a 404 is what a read of a missing object
//! returns, not an error of the transport.

use std::time::SystemTime;

use anyhow::{Context, Result};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;

/// The gateway's default region, the one its clients sign for.
pub const DEFAULT_REGION: &str = "us-east-1";

/// An error body is kept up to this many bytes (S3's XML errors are far smaller).
const ERROR_BODY_BYTES_MAX: usize = 64 << 10;

/// What signs requests: an access key (`mendfs s3 key create`).
pub struct Signer {
    identity: Identity,
    region: String,
}

impl Signer {
    pub fn new(key_id: &str, secret: &str) -> Self {
        let credentials = Credentials::new(key_id, secret, None, None, "mendfs");
        Signer { identity: credentials.into(), region: DEFAULT_REGION.to_string() }
    }

    /// The key in `mendfs s3 key create`'s `export AWS_...=` lines.
    pub fn from_exports(output: &str) -> Result<Self> {
        let exported = |name: &str| {
            let prefix = format!("export {name}=");
            output
                .lines()
                .find_map(|line| line.trim().strip_prefix(&prefix))
                .map(|value| value.trim_matches('\'').trim_matches('"').to_string())
                .with_context(|| format!("no `export {name}=` in `mendfs s3 key create`'s output"))
        };
        Ok(Signer::new(&exported("AWS_ACCESS_KEY_ID")?, &exported("AWS_SECRET_ACCESS_KEY")?))
    }

    /// Signs `request` in place as S3 SDKs do: SigV4 in the Authorization header, the path
    /// encoded once and not normalized, and `x-amz-content-sha256: UNSIGNED-PAYLOAD`. The
    /// signing time is this process's wall clock.
    fn sign(&self, authority: &str, request: &mut http::Request<Full<Bytes>>) -> Result<()> {
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .context("SigV4 signing parameters")?
            .into();
        let url = format!("http://{authority}{}", request.uri());
        let headers = request.headers().iter().filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
        let signable = SignableRequest::new(request.method().as_str(), url, headers, SignableBody::UnsignedPayload)?;
        let (instructions, _signature) = sign(signable, &params)?.into_parts();
        instructions.apply_to_request_http1x(request);
        Ok(())
    }
}

/// How the gateway answered a request that reached it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: http::StatusCode,
    /// The body's length when the status is a success (the bytes went to the caller's sink);
    /// otherwise 0.
    pub body_bytes: u64,
    /// The error body (S3's XML), when the status is not a success; at most 64 KiB of it.
    pub error_body: String,
}

/// One keep-alive HTTP/1.1 connection to a node's gateway. After a transport error it is
/// spent: open another.
pub struct Connection {
    authority: String,
    send: SendRequest<Full<Bytes>>,
}

impl Connection {
    pub async fn open(authority: &str) -> Result<Self> {
        let stream = tokio::net::TcpStream::connect(authority).await.with_context(|| format!("connect {authority}"))?;
        stream.set_nodelay(true)?;
        let (send, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        // Drives the connection; it ends when `send` is dropped or the peer closes.
        tokio::spawn(connection);
        Ok(Connection { authority: authority.to_string(), send })
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Sends one signed request and reads its whole answer, handing a successful answer's
    /// body to `sink` as it arrives. An error is a transport failure (no answer, or an answer
    /// cut off mid-body); a status the gateway sent, whatever it is, is an [`Answer`].
    pub async fn request(
        &mut self,
        signer: &Signer,
        method: http::Method,
        path: &str,
        body: Bytes,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<Answer> {
        let mut request = http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(Full::new(body))?;
        signer.sign(&self.authority, &mut request)?;
        self.send.ready().await.with_context(|| format!("connection to {}", self.authority))?;
        let response = self
            .send
            .send_request(request)
            .await
            .with_context(|| format!("S3 {method} {path} to {}", self.authority))?;
        let status = response.status();
        let mut body = response.into_body();
        let mut answer = Answer { status, body_bytes: 0, error_body: String::new() };
        let mut error_body = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.with_context(|| format!("S3 {method} {path}: the answer's body"))?;
            let Some(data) = frame.data_ref() else { continue };
            if status.is_success() {
                answer.body_bytes += data.len() as u64;
                sink(data);
            } else if error_body.len() < ERROR_BODY_BYTES_MAX {
                let room = ERROR_BODY_BYTES_MAX - error_body.len();
                error_body.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
        answer.error_body = String::from_utf8_lossy(&error_body).trim().to_string();
        Ok(answer)
    }
}
