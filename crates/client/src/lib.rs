//! The MendFS client library: the one way to talk to a cluster, used by the CLI, the benchmarks
//! and the tests.
//!
//! A [`Client`] holds several endpoints and fails over between them by itself. Every call has
//! a per-attempt timeout and an overall deadline; errors the server marks retryable (no leader
//! yet, node unreachable, quorum not reached in time) are retried on the next endpoint with
//! jittered backoff. Writes carry a request id that stays the same across retries, so a write
//! whose first attempt was applied but not acknowledged is not applied twice.

mod batch;
pub mod jobs;
pub mod lock;

use futures::future::Either;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mendfs_proto::v1 as pb;
use mendfs_proto::v1::auth_client::AuthClient;
use mendfs_proto::v1::cluster_client::ClusterClient;
use mendfs_proto::v1::kv_client::KvClient;
use mendfs_proto::v1::policy_client::PolicyClient;
use mendfs_proto::v1::s3_admin_client::S3AdminClient;
use mendfs_proto::{
    AUTHORIZATION_HEADER, ERROR_ACTUAL_VERSION_HEADER, ERROR_EXPECTED_VERSION_HEADER, ERROR_KIND_HEADER,
    LEADER_HINT_HEADER, SECRET_HEADER,
};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use mendfs_proto::v1::telemetry_client::TelemetryClient;
pub use mendfs_telemetry::context::{TraceContext, TraceId};
pub use mendfs_telemetry::record::{Level, LogRecord, SpanRecord, SpanStatus};
pub use mendfs_telemetry::store::LogQuery;

pub use mendfs_proto::v1::{KeyValue, NodeStatus, StatusReply, WatchEvent, WatchReply};
pub use pb::EventKind;

/// Errors a caller sees. [`Error::is_retryable`] tells whether trying again later may help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("key already exists (version {version})")]
    KeyExists { version: u64 },
    #[error("version mismatch: expected version {expected}, actual version {actual}")]
    VersionMismatch { expected: u64, actual: u64 },
    #[error("session {0} not found (expired or closed)")]
    SessionNotFound(u64),
    /// The client gave the session up: no keep-alive was acknowledged in time, so the cluster
    /// may expire it soon (see [`Session::keep_alive_in_background`]).
    #[error(
        "session {session_id} given up: no keep-alive acknowledged for {silent_for:.1?} (the limit is 2/3 of its \
         {ttl:?} TTL), so the cluster may expire it at any moment; last error: {last_error}"
    )]
    SessionLost { session_id: u64, ttl: Duration, silent_for: Duration, last_error: String },
    /// A lock's session ended, or was given up, while the lock was wanted or held
    /// ([`lock::HeldLock::lost`]).
    #[error("lock lost: {0}")]
    LockLost(String),
    #[error("{0}")]
    NotFound(String),
    /// Something other than a key of the coordination keyspace already exists (a bucket, an
    /// access key); the server's message says what.
    #[error("{0}")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("refused: {0}")]
    Unauthenticated(String),
    /// The caller is known but its role does not allow the call.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("history compacted: {0}")]
    Compacted(String),
    #[error("timed out after {elapsed:?}: {last_error}")]
    Timeout { elapsed: Duration, last_error: String },
    #[error("{0}")]
    Server(String),
    #[error("client configuration: {0}")]
    Config(String),
    /// A job checkpoint or result under a lease that is no longer the task's: the attempt
    /// must stop (its task went to another worker, was won elsewhere, or the job was cancelled).
    #[error("{0}")]
    LeaseLost(String),
    /// The node does not know the call (a version older than this client).
    #[error("not implemented by the server: {0}")]
    Unimplemented(String),
}

impl Error {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}

/// How a client reaches the cluster.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `HOST:PORT` of any nodes of the cluster; the client finds the rest by itself.
    pub endpoints: Vec<String>,
    /// The cluster secret: a node's credential, also usable by an operator on a node's machine.
    pub secret: Option<String>,
    /// A client token (`mendfs auth token create`), sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// TLS: the CA the nodes' certificates must chain to (PEM). Set, or an `https://`
    /// endpoint, and every connection is TLS.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and key (PEM) to present under TLS; tokens still decide rights.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Longest wait for one attempt on one endpoint.
    pub attempt_timeout: Duration,
    /// Longest wait for a whole call, retries included.
    pub deadline: Duration,
    /// The trace every call of this client joins (`mendfs --trace-id`). Without one, a call
    /// made inside a traced span joins that span's trace, and any other call starts its own.
    pub trace: Option<TraceContext>,
    /// Send key writes made concurrently from tasks sharing this client together, in one call
    /// (see `batch`). On by default; off, every write is a call of its own.
    pub batch_writes: bool,
}

impl ClientConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            secret: None,
            token: None,
            ca_pem: None,
            identity_pem: None,
            attempt_timeout: Duration::from_secs(7),
            deadline: Duration::from_secs(20),
            trace: None,
            batch_writes: true,
        }
    }
}

impl ClientConfig {
    /// A lazily connected channel to `addr` (`HOST:PORT`, `http://…` or `https://…`), over TLS
    /// when the address says `https://` or a CA is configured.
    fn endpoint(&self, addr: &str) -> Result<Endpoint, Error> {
        let (tls, host_port) = match addr.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            Some((scheme, _)) => return Err(Error::Config(format!("endpoint {addr:?}: unknown scheme {scheme:?}"))),
            None => (self.ca_pem.is_some(), addr),
        };
        if tls && self.ca_pem.is_none() {
            return Err(Error::Config(format!(
                "endpoint {addr:?} is https: give the cluster CA (--ca FILE or MENDFS_CA)"
            )));
        }
        if !tls && self.ca_pem.is_some() {
            return Err(Error::Config(format!("endpoint {addr:?} is plain http, but a CA for TLS is given")));
        }
        let scheme = if tls { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host_port}"))
            .map_err(|e| Error::Config(format!("bad endpoint {addr:?}: {e}")))?;
        if let Some(ca) = &self.ca_pem {
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = &self.identity_pem {
                config = config.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint.tls_config(config).map_err(|e| Error::Config(format!("TLS to {addr:?}: {e}")))?;
        }
        Ok(endpoint.connect_timeout(Duration::from_millis(1_000)).tcp_nodelay(true))
    }
}

/// Adds what every call carries: the credential (token or secret) and a W3C `traceparent`.
#[derive(Clone)]
struct RequestInterceptor {
    secret: Option<tonic::metadata::AsciiMetadataValue>,
    authorization: Option<tonic::metadata::AsciiMetadataValue>,
    trace: Option<TraceContext>,
}

impl Interceptor for RequestInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert(AUTHORIZATION_HEADER, authorization.clone());
        } else if let Some(secret) = &self.secret {
            request.metadata_mut().insert(SECRET_HEADER, secret.clone());
        }
        let context = self.trace.or_else(|| CALL_TRACE.try_with(|context| *context).ok());
        mendfs_telemetry::grpc::inject(request.metadata_mut(), context);
        if let Ok(deadline) = ATTEMPT_DEADLINE.try_with(|deadline| *deadline) {
            request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        Ok(request)
    }
}

/// What a call answers with, which decides whether its attempts send a deadline.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Unary,
    Stream,
}

tokio::task_local! {
    /// The trace of the call in progress, so that its retries on other endpoints stay in one
    /// trace instead of each starting its own.
    static CALL_TRACE: TraceContext;
    /// When the attempt in progress gives up, sent as `grpc-timeout`: a node that forwards the
    /// request to the leader then never lets it outlive this client's wait, so a request
    /// reported as timed out cannot be applied later by a leader that was paused.
    static ATTEMPT_DEADLINE: Instant;
}

type Intercepted = InterceptedService<Channel, RequestInterceptor>;

struct Inner {
    config: ClientConfig,
    channels: Vec<Channel>,
    interceptor: RequestInterceptor,
    /// The endpoint that answered last; tried first next time.
    preferred: AtomicUsize,
    client_id: u64,
    sequence: AtomicU64,
    batcher: batch::Batcher,
}

/// A handle to a cluster; cheap to clone and safe to share between tasks.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What a failed attempt means for the call.
enum Attempt {
    /// Try the next endpoint (after a pause).
    Retry(String),
    Fail(Error),
}

fn classify(status: &tonic::Status) -> Attempt {
    let kind = status.metadata().get(ERROR_KIND_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    let header_u64 = |name: &str| {
        status.metadata().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    };
    let actual = header_u64(ERROR_ACTUAL_VERSION_HEADER);
    let message = status.message().to_string();
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown => {
            Attempt::Retry(if message.is_empty() { status.code().to_string() } else { message })
        }
        tonic::Code::AlreadyExists if !kind.is_empty() && kind != "key-exists" => {
            Attempt::Fail(Error::AlreadyExists(message))
        }
        tonic::Code::AlreadyExists => Attempt::Fail(Error::KeyExists { version: actual }),
        tonic::Code::FailedPrecondition if kind == "version-mismatch" => {
            let expected = header_u64(ERROR_EXPECTED_VERSION_HEADER);
            Attempt::Fail(Error::VersionMismatch { expected, actual })
        }
        tonic::Code::FailedPrecondition if kind == "lease-lost" => Attempt::Fail(Error::LeaseLost(message)),
        tonic::Code::NotFound if kind == "session-not-found" => {
            let id = message.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            Attempt::Fail(Error::SessionNotFound(id))
        }
        tonic::Code::NotFound => Attempt::Fail(Error::NotFound(message)),
        tonic::Code::InvalidArgument => Attempt::Fail(Error::InvalidArgument(message)),
        tonic::Code::Unauthenticated => Attempt::Fail(Error::Unauthenticated(message)),
        tonic::Code::PermissionDenied => Attempt::Fail(Error::PermissionDenied(message)),
        tonic::Code::OutOfRange => Attempt::Fail(Error::Compacted(message)),
        tonic::Code::Unimplemented => Attempt::Fail(Error::Unimplemented(message)),
        code => Attempt::Fail(Error::Server(format!("{code}: {message}"))),
    }
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self, Error> {
        if config.endpoints.is_empty() {
            return Err(Error::Config(
                "no endpoints: pass --endpoints HOST:PORT[,HOST:PORT...] or set MENDFS_ENDPOINTS".into(),
            ));
        }
        let mut channels = Vec::with_capacity(config.endpoints.len());
        for endpoint in &config.endpoints {
            let channel = config
                .endpoint(endpoint)?
                // Streams (uploads, downloads, watches) have no overall deadline; keep-alives
                // notice a dead server instead.
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
                .connect_lazy();
            channels.push(channel);
        }
        let secret = config
            .secret
            .as_deref()
            .map(|s| s.parse().map_err(|_| Error::Config("the secret must be printable ASCII".into())))
            .transpose()?;
        let authorization = config
            .token
            .as_deref()
            .map(|token| {
                format!("Bearer {}", token.trim())
                    .parse()
                    .map_err(|_| Error::Config("the token must be printable ASCII".into()))
            })
            .transpose()?;
        let trace = config.trace;
        Ok(Client {
            inner: Arc::new(Inner {
                config,
                channels,
                interceptor: RequestInterceptor { secret, authorization, trace },
                preferred: AtomicUsize::new(0),
                client_id: rand::random::<u64>() | 1,
                sequence: AtomicU64::new(1),
                batcher: batch::Batcher::default(),
            }),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    fn next_request_id(&self) -> Option<pb::RequestId> {
        Some(pb::RequestId {
            client_id: self.inner.client_id,
            sequence: self.inner.sequence.fetch_add(1, Ordering::Relaxed),
        })
    }

    fn kv(&self, index: usize) -> KvClient<Intercepted> {
        KvClient::with_interceptor(self.inner.channels[index].clone(), self.inner.interceptor.clone())
            .max_decoding_message_size(usize::MAX)
    }

    fn cluster(&self, index: usize) -> ClusterClient<Intercepted> {
        ClusterClient::with_interceptor(self.inner.channels[index].clone(), self.inner.interceptor.clone())
    }

    fn auth(&self, index: usize) -> AuthClient<Intercepted> {
        AuthClient::with_interceptor(self.inner.channels[index].clone(), self.inner.interceptor.clone())
    }

    /// Creates a client token with `role` (read, write or admin); the reply holds the token,
    /// which cannot be shown again. Needs an admin token.
    pub async fn create_token(&self, name: &str, role: &str) -> Result<pb::CreateTokenReply, Error> {
        let request = pb::CreateTokenRequest { name: name.to_string(), role: role.to_string() };
        self.call("create token", |i| {
            let request = request.clone();
            let mut auth = self.auth(i);
            async move { auth.create_token(request).await }
        })
        .await
    }

    /// Creates a one-time dashboard login link for `role`: the reply holds the code and the
    /// answering node's dashboard address. Needs an admin token.
    pub async fn create_login_link(
        &self,
        role: &str,
        link_ttl: Duration,
        session_ttl: Duration,
    ) -> Result<pb::CreateLoginLinkReply, Error> {
        let request = pb::CreateLoginLinkRequest {
            role: role.to_string(),
            link_ttl_secs: link_ttl.as_secs(),
            session_ttl_secs: session_ttl.as_secs(),
        };
        self.call("create login link", |i| {
            let request = request.clone();
            let mut auth = self.auth(i);
            async move { auth.create_login_link(request).await }
        })
        .await
    }

    pub async fn list_tokens(&self) -> Result<Vec<pb::TokenInfo>, Error> {
        self.call("list tokens", |i| {
            let mut auth = self.auth(i);
            async move { auth.list_tokens(pb::ListTokensRequest {}).await }
        })
        .await
        .map(|reply| reply.tokens)
    }

    /// Revokes the token named `name`; false if there was none.
    pub async fn revoke_token(&self, name: &str) -> Result<bool, Error> {
        let request = pb::RevokeTokenRequest { name: name.to_string() };
        self.call("revoke token", |i| {
            let request = request.clone();
            let mut auth = self.auth(i);
            async move { auth.revoke_token(request).await }
        })
        .await
        .map(|reply| reply.revoked)
    }

    fn s3_admin(&self, index: usize) -> S3AdminClient<Intercepted> {
        S3AdminClient::with_interceptor(self.inner.channels[index].clone(), self.inner.interceptor.clone())
            .max_decoding_message_size(usize::MAX)
    }

    /// Creates an S3 access key named `name` (a label); the reply holds its id and its secret,
    /// which cannot be shown again. With `create_buckets` the key may create buckets (and owns
    /// those it creates). Needs an admin token.
    pub async fn s3_create_key(&self, name: &str, create_buckets: bool) -> Result<pb::S3CreateKeyReply, Error> {
        let request = pb::S3CreateKeyRequest { name: name.to_string(), create_buckets };
        self.call("create S3 key", |i| {
            let request = request.clone();
            let mut admin = self.s3_admin(i);
            async move { admin.create_key(request).await }
        })
        .await
    }

    /// Every S3 access key with its grants (never the secrets).
    pub async fn s3_list_keys(&self) -> Result<Vec<pb::S3KeyInfo>, Error> {
        self.call("list S3 keys", |i| {
            let mut admin = self.s3_admin(i);
            async move { admin.list_keys(pb::S3ListKeysRequest {}).await }
        })
        .await
        .map(|reply| reply.keys)
    }

    /// Deletes an S3 access key and its grants; [`Error::NotFound`] if there is none.
    pub async fn s3_delete_key(&self, key_id: &str) -> Result<(), Error> {
        let request = pb::S3DeleteKeyRequest { key_id: key_id.to_string() };
        self.call("delete S3 key", |i| {
            let request = request.clone();
            let mut admin = self.s3_admin(i);
            async move { admin.delete_key(request).await }
        })
        .await
        .map(drop)
    }

    /// Sets what `key_id` may do in `bucket`, exactly; all false revokes the grant.
    pub async fn s3_allow(
        &self,
        key_id: &str,
        bucket: &str,
        read: bool,
        write: bool,
        owner: bool,
    ) -> Result<(), Error> {
        let request = pb::S3AllowRequest { key_id: key_id.to_string(), bucket: bucket.to_string(), read, write, owner };
        self.call("set S3 grant", |i| {
            let request = request.clone();
            let mut admin = self.s3_admin(i);
            async move { admin.allow(request).await }
        })
        .await
        .map(drop)
    }

    /// Creates a bucket, owned by the access key `owner` if given; [`Error::AlreadyExists`]
    /// if it exists.
    pub async fn s3_create_bucket(&self, bucket: &str, owner: Option<&str>) -> Result<(), Error> {
        let request = pb::S3CreateBucketRequest { bucket: bucket.to_string(), owner: owner.map(str::to_string) };
        self.call("create bucket", |i| {
            let request = request.clone();
            let mut admin = self.s3_admin(i);
            async move { admin.create_bucket(request).await }
        })
        .await
        .map(drop)
    }

    pub async fn s3_list_buckets(&self) -> Result<Vec<pb::S3BucketInfo>, Error> {
        self.call("list buckets", |i| {
            let mut admin = self.s3_admin(i);
            async move { admin.list_buckets(pb::S3ListBucketsRequest {}).await }
        })
        .await
        .map(|reply| reply.buckets)
    }

    /// Deletes an empty bucket (no objects, no multipart uploads) and its grants.
    pub async fn s3_delete_bucket(&self, bucket: &str) -> Result<(), Error> {
        let request = pb::S3DeleteBucketRequest { bucket: bucket.to_string() };
        self.call("delete bucket", |i| {
            let request = request.clone();
            let mut admin = self.s3_admin(i);
            async move { admin.delete_bucket(request).await }
        })
        .await
        .map(drop)
    }

    fn policy(&self, index: usize) -> PolicyClient<Intercepted> {
        PolicyClient::with_interceptor(self.inner.channels[index].clone(), self.inner.interceptor.clone())
            .max_decoding_message_size(usize::MAX)
    }

    /// Sets (or replaces) the redundancy policy of a path prefix or a bucket: `replicate` or
    /// `ec:K+M`. Answers the target as stored (a prefix without its trailing `/`) and the
    /// policy it replaced, if any. Needs an admin token.
    pub async fn set_policy(&self, target: &PolicyTarget, redundancy: &str) -> Result<PolicyChange, Error> {
        let request = pb::PolicySetRequest { target: Some(target.to_pb()), redundancy: redundancy.to_string() };
        let reply = self
            .call("set policy", |i| {
                let request = request.clone();
                let mut policy = self.policy(i);
                async move { policy.set(request).await }
            })
            .await?;
        Ok(PolicyChange {
            target: PolicyTarget::from_pb(reply.target, target),
            before: non_empty(reply.previous),
            after: non_empty(reply.redundancy),
        })
    }

    /// Removes the redundancy policy of a path prefix or a bucket; `before` is the one
    /// removed (None: there was none). Needs an admin token.
    pub async fn unset_policy(&self, target: &PolicyTarget) -> Result<PolicyChange, Error> {
        let request = pb::PolicyUnsetRequest { target: Some(target.to_pb()) };
        let reply = self
            .call("unset policy", |i| {
                let request = request.clone();
                let mut policy = self.policy(i);
                async move { policy.unset(request).await }
            })
            .await?;
        Ok(PolicyChange {
            target: PolicyTarget::from_pb(reply.target, target),
            before: non_empty(reply.removed),
            after: None,
        })
    }

    /// Every redundancy policy: path prefixes in path order, then buckets.
    pub async fn list_policies(&self) -> Result<Vec<Policy>, Error> {
        let reply = self
            .call("list policies", |i| {
                let mut policy = self.policy(i);
                async move { policy.list(pb::PolicyListRequest {}).await }
            })
            .await?;
        let mut policies = Vec::with_capacity(reply.policies.len());
        for info in reply.policies {
            let target = match info.target.and_then(|target| target.target) {
                Some(pb::policy_target::Target::Prefix(prefix)) => PolicyTarget::Prefix(prefix),
                Some(pb::policy_target::Target::Bucket(bucket)) => PolicyTarget::Bucket(bucket),
                None => return Err(Error::Server("a listed policy names no target".into())),
            };
            policies.push(Policy { target, redundancy: info.redundancy, set_ms: info.set_ms });
        }
        Ok(policies)
    }

    /// Who the cluster takes this client for, and its role.
    pub async fn who_am_i(&self) -> Result<pb::WhoAmIReply, Error> {
        self.call("who am i", |i| {
            let mut auth = self.auth(i);
            async move { auth.who_am_i(pb::WhoAmIRequest {}).await }
        })
        .await
    }

    /// Runs one unary call with failover: endpoints in turn, starting with the last that
    /// answered, until success, a definite error, or the deadline. Every attempt carries the
    /// same trace, and its own deadline as `grpc-timeout`.
    async fn call<T, F, Fut>(&self, what: &str, attempt: F) -> Result<T, Error>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_with_failover(what, Reply::Unary, attempt).await
    }

    /// Opens a server stream (a watch, a download) with failover, like `call`. No
    /// `grpc-timeout` is sent: the server would end the stream when the opening attempt's time
    /// is up, and a stream lives as long as its reader wants.
    async fn open_stream<T, F, Fut>(&self, what: &str, attempt: F) -> Result<T, Error>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_with_failover(what, Reply::Stream, attempt).await
    }

    /// `call`, but giving up at `deadline` rather than after the configured deadline.
    async fn call_until<T, F, Fut>(&self, what: &str, deadline: Instant, attempt: F) -> Result<T, Error>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let context = self.inner.config.trace.unwrap_or_else(mendfs_telemetry::grpc::outgoing_context);
        CALL_TRACE.scope(context, self.attempts(what, Reply::Unary, deadline, attempt)).await
    }

    /// Every attempt of one call runs in one trace: the configured one, or the caller's.
    async fn call_with_failover<T, F, Fut>(&self, what: &str, reply: Reply, attempt: F) -> Result<T, Error>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let context = self.inner.config.trace.unwrap_or_else(mendfs_telemetry::grpc::outgoing_context);
        let deadline = Instant::now() + self.inner.config.deadline;
        CALL_TRACE.scope(context, self.attempts(what, reply, deadline, attempt)).await
    }

    /// The endpoint a reply names as the leader (a node that forwarded to it), if it is one of
    /// this client's.
    fn leader_named(&self, metadata: &tonic::metadata::MetadataMap) -> Option<usize> {
        let addr = metadata.get(LEADER_HINT_HEADER).and_then(|value| value.to_str().ok())?;
        self.inner.config.endpoints.iter().position(|e| e.trim_start_matches("http://") == addr)
    }

    async fn attempts<T, F, Fut>(&self, what: &str, reply: Reply, deadline: Instant, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let n_endpoints = self.inner.channels.len();
        let mut index = self.inner.preferred.load(Ordering::Relaxed) % n_endpoints;
        let mut backoff = Duration::from_millis(10);
        let mut last_error: Option<String> = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                let last_error = last_error.unwrap_or_else(|| "no attempt made".into());
                return Err(Error::Timeout { elapsed: started.elapsed(), last_error: format!("{what}: {last_error}") });
            }
            let budget = remaining.min(self.inner.config.attempt_timeout);
            let answer = match reply {
                Reply::Unary => Either::Left(ATTEMPT_DEADLINE.scope(Instant::now() + budget, attempt(index))),
                Reply::Stream => Either::Right(attempt(index)),
            };
            let outcome = tokio::time::timeout(budget, answer).await;
            // An attempt cut short by the call's own deadline says less than what a node
            // answered before it: that answer is the one reported.
            let keep_earlier = last_error.is_some() && Instant::now() >= deadline;
            match outcome {
                Ok(Ok(response)) => {
                    // A node that had to forward to the leader names it: go there directly
                    // next time, saving a hop, if it is one of our endpoints.
                    let leader_index = self.leader_named(response.metadata());
                    self.inner.preferred.store(leader_index.unwrap_or(index), Ordering::Relaxed);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => match classify(&status) {
                    Attempt::Fail(error) => {
                        self.inner.preferred.store(index, Ordering::Relaxed);
                        return Err(error);
                    }
                    Attempt::Retry(_) if keep_earlier => {}
                    Attempt::Retry(message) => {
                        last_error = Some(format!("{}: {message}", self.inner.config.endpoints[index]));
                    }
                },
                Err(_) if keep_earlier => {}
                Err(_) => {
                    last_error = Some(format!("{}: no answer within {budget:?}", self.inner.config.endpoints[index]));
                }
            }
            tracing::debug!(what, last_error = last_error.as_deref().unwrap_or(""), "retrying on the next endpoint");
            index = (index + 1) % n_endpoints;
            let pause = backoff.mul_f64(0.5 + rand::random::<f64>());
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    /// Creates `key`; fails with [`Error::KeyExists`] if it is already there.
    pub async fn create(&self, key: &[u8], value: &[u8], session_id: Option<u64>) -> Result<KeyValue, Error> {
        let request = pb::PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            expected_version: None,
            session_id,
            request_id: self.next_request_id(),
        };
        let reply = self.write(pb::BatchOp { op: Some(pb::batch_op::Op::Create(request)) }).await?;
        reply.kv.ok_or_else(|| Error::Server("create answered without the key".into()))
    }

    /// Sets `key`; with `expected_version`, only if the key is at that version (0: absent).
    pub async fn set(
        &self,
        key: &[u8],
        value: &[u8],
        expected_version: Option<u64>,
        session_id: Option<u64>,
    ) -> Result<KeyValue, Error> {
        let request = pb::PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            expected_version,
            session_id,
            request_id: self.next_request_id(),
        };
        let reply = self.write(pb::BatchOp { op: Some(pb::batch_op::Op::Set(request)) }).await?;
        reply.kv.ok_or_else(|| Error::Server("set answered without the key".into()))
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: &[u8], expected_version: Option<u64>) -> Result<bool, Error> {
        let request = pb::DeleteRequest { key: key.to_vec(), expected_version, request_id: self.next_request_id() };
        let reply = self.write(pb::BatchOp { op: Some(pb::batch_op::Op::Delete(request)) }).await?;
        Ok(reply.deleted)
    }

    /// Drops the key history up to and including `revision` (0: the current revision), the way
    /// to give the kv quota back what old values hold; returns the revision compacted through.
    pub async fn compact(&self, revision: u64) -> Result<u64, Error> {
        let request = pb::CompactRequest { revision };
        let reply = self
            .call("compact", |i| {
                let mut kv = self.kv(i);
                async move { kv.compact(request).await }
            })
            .await?;
        Ok(reply.compacted_revision)
    }

    /// A linearizable read of `key`.
    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, Error> {
        let request = pb::GetRequest { key: key.to_vec() };
        let reply = self
            .call("get", |i| {
                let request = request.clone();
                let mut kv = self.kv(i);
                async move { kv.get(request).await }
            })
            .await?;
        Ok(reply.kv)
    }

    /// Keys starting with `prefix`, in order, at most `limit` (0: the server's maximum); the
    /// flag says whether more remain (see [`Client::list_pages`] for all of them).
    pub async fn list(&self, prefix: &[u8], limit: u32) -> Result<(Vec<KeyValue>, bool), Error> {
        self.list_from(prefix, &[], limit).await
    }

    /// [`Client::list`] from `start_key` on (inclusive): one page of a longer listing.
    pub async fn list_from(&self, prefix: &[u8], start_key: &[u8], limit: u32) -> Result<(Vec<KeyValue>, bool), Error> {
        let request = pb::ListRequest { prefix: prefix.to_vec(), limit, start_key: start_key.to_vec() };
        let reply = self
            .call("list", |i| {
                let request = request.clone();
                let mut kv = self.kv(i);
                async move { kv.list(request).await }
            })
            .await?;
        Ok((reply.kvs, reply.truncated))
    }

    /// Every key under `prefix`, page by page (`page_limit` keys each, 0: the server's
    /// maximum); see [`ListPages`] for what paging promises.
    pub fn list_pages(&self, prefix: &[u8], page_limit: u32) -> ListPages {
        ListPages { client: self.clone(), prefix: prefix.to_vec(), page_limit, start_key: Vec::new(), done: false }
    }

    /// Every key under `prefix`, however many, read page by page ([`ListPages`]).
    pub async fn list_all(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, Error> {
        let mut pages = self.list_pages(prefix, 0);
        let mut all = Vec::new();
        while let Some(page) = pages.next_page().await? {
            all.extend(page);
        }
        Ok(all)
    }

    /// Opens a session with the given TTL; keep it alive with [`Session::keep_alive_in_background`].
    pub async fn open_session(&self, ttl: Duration) -> Result<Session, Error> {
        let deadline = Instant::now() + self.inner.config.deadline;
        // The cluster starts the session's clock when the open commits, after this.
        let mut sent = Instant::now();
        let request = pb::SessionOpenRequest { ttl_ms: ttl.as_millis() as u64, request_id: self.next_request_id() };
        let reply = self
            .call("open session", |i| {
                let mut kv = self.kv(i);
                async move { kv.session_open(request).await }
            })
            .await?;
        let ttl = Duration::from_millis(reply.ttl_ms);
        // The client counts the session's life from the call's start, the safe side of when
        // its clock started. After a slow open (retried through an election, say) little of
        // that is left, and the session would be given up at once: a keep-alive starts afresh.
        while sent.elapsed() > ttl / 3 {
            sent = Instant::now();
            self.keep_alive(reply.session_id, deadline).await?;
        }
        Ok(Session { client: self.clone(), id: reply.session_id, ttl, renewed_sent_at: sent })
    }

    /// One keep-alive, retried on other endpoints until `deadline`.
    async fn keep_alive(&self, session_id: u64, deadline: Instant) -> Result<(), Error> {
        self.call_until("keep-alive", deadline, |i| {
            let mut kv = self.kv(i);
            async move { kv.session_keep_alive(pb::SessionKeepAliveRequest { session_id }).await }
        })
        .await
        .map(|_| ())
    }

    async fn close_session(&self, session_id: u64) -> Result<(), Error> {
        let request = pb::SessionCloseRequest { session_id, request_id: self.next_request_id() };
        self.call("close session", |i| {
            let mut kv = self.kv(i);
            async move { kv.session_close(request).await }
        })
        .await
        .map(|_| ())
    }

    /// Watches `key` (or every key under it, with `prefix`) from `start_revision` (0: from now).
    pub fn watch(&self, key: &[u8], prefix: bool, start_revision: u64) -> Watch {
        Watch { client: self.clone(), key: key.to_vec(), prefix, next_revision: start_revision, stream: None }
    }

    pub async fn status(&self) -> Result<StatusReply, Error> {
        self.call("cluster status", |i| {
            let mut cluster = self.cluster(i);
            async move { cluster.status(pb::StatusRequest {}).await }
        })
        .await
    }

    /// Adds node `id` at `addr`: as a voter, or with `learner` as a non-voting member.
    pub async fn add_node(&self, id: u64, addr: &str, learner: bool) -> Result<pb::MembershipReply, Error> {
        let request = pb::AddNodeRequest { id, addr: addr.to_string(), learner };
        self.call("add node", |i| {
            let request = request.clone();
            let mut cluster = self.cluster(i);
            async move { cluster.add_node(request).await }
        })
        .await
    }

    pub async fn remove_node(&self, id: u64) -> Result<pb::MembershipReply, Error> {
        self.call("remove node", |i| {
            let mut cluster = self.cluster(i);
            async move { cluster.remove_node(pb::RemoveNodeRequest { id }).await }
        })
        .await
    }

    /// Drains storage node `id` (repair moves its copies elsewhere; it gets no new ones), or
    /// with `undrain` makes it an ordinary node again.
    pub async fn drain(&self, id: u64, undrain: bool) -> Result<(), Error> {
        self.call(if undrain { "undrain node" } else { "drain node" }, |i| {
            let mut cluster = self.cluster(i);
            async move { cluster.drain(pb::DrainRequest { id, undrain }).await }
        })
        .await
        .map(|_| ())
    }
}

/// Every key under a prefix, one page (a linearizable read) at a time, each page starting just
/// after the last key of the one before. Pages are read at different revisions: a key that
/// exists throughout the listing is listed exactly once; one created or deleted meanwhile may
/// or may not be.
pub struct ListPages {
    client: Client,
    prefix: Vec<u8>,
    page_limit: u32,
    start_key: Vec<u8>,
    done: bool,
}

impl ListPages {
    /// The next page, in key order; None once the prefix is exhausted.
    pub async fn next_page(&mut self) -> Result<Option<Vec<KeyValue>>, Error> {
        if self.done {
            return Ok(None);
        }
        let (kvs, truncated) = self.client.list_from(&self.prefix, &self.start_key, self.page_limit).await?;
        match kvs.last() {
            // The smallest key after the last one listed.
            Some(last) if truncated => self.start_key = [last.key.as_slice(), &[0]].concat(),
            None if truncated => return Err(Error::Server("a list page was cut short before its first key".into())),
            _ => self.done = true,
        }
        Ok(Some(kvs))
    }
}

/// A session: keys created with its id are deleted when it is closed or expires.
pub struct Session {
    client: Client,
    id: u64,
    ttl: Duration,
    /// When the last call that restarted the session's TTL (its open, or a keep-alive) was
    /// sent: where the client starts counting toward giving the session up.
    renewed_sent_at: Instant,
}

/// Pause before another keep-alive after one failed without the cluster's retry hint (a
/// refused token, say), so a hopeless session is not a busy loop until it is given up.
const KEEP_ALIVE_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// When a session's keep-alives go out, and when the client gives the session up. Pure: the
/// caller reads the clock.
///
/// The client gives a session up once no keep-alive has been acknowledged for 2/3 of the TTL,
/// counted from when the last acknowledged one was *sent*. Why that is safe: a leader
/// acknowledges a keep-alive only after a quorum confirmed its leadership in a round that
/// started after the keep-alive arrived, and then counts the TTL from that moment; a leader
/// elected later gives every session a full TTL from its election, which came after that
/// confirmation. Either way the cluster cannot expire the session before TTL after the send.
/// Giving up at 2/3 leaves a third of the TTL for the holder to stop what the session
/// protects (`kv lock` stops its command), for a busy client's scheduling delays, and for the
/// two machines' monotonic clocks to run at slightly different rates. Keep-alives go out every
/// TTL/3, so a session survives one whole interval of failed attempts, retried all the while.
#[derive(Debug, Clone, Copy)]
struct KeepAlivePlan {
    ttl: Duration,
    acknowledged_sent_at: Instant,
}

impl KeepAlivePlan {
    fn new(ttl: Duration, renewed_sent_at: Instant) -> Self {
        Self { ttl, acknowledged_sent_at: renewed_sent_at }
    }

    /// When the next keep-alive is due (in the past after a failed one: at once).
    fn next_send_at(&self) -> Instant {
        self.acknowledged_sent_at + self.ttl / 3
    }

    /// When the client gives the session up, unless another keep-alive is acknowledged first.
    fn give_up_at(&self) -> Instant {
        self.acknowledged_sent_at + self.ttl * 2 / 3
    }

    /// A keep-alive sent at `sent_at` was acknowledged.
    fn acknowledged(&mut self, sent_at: Instant) {
        self.acknowledged_sent_at = self.acknowledged_sent_at.max(sent_at);
    }
}

impl Session {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// One keep-alive now, retried within the client's deadline: Ok once a leader that has
    /// just confirmed it still leads has restarted the session's TTL. It does not move the
    /// give-up time of a [`Session::keep_alive_in_background`] task, which counts its own.
    pub async fn keep_alive(&self) -> Result<(), Error> {
        self.client.keep_alive(self.id, Instant::now() + self.client.inner.config.deadline).await
    }

    /// Sends keep-alives every third of the TTL until the returned handle is dropped or
    /// aborted. The handle resolves with the error that ended the session: the cluster said
    /// it is gone ([`Error::SessionNotFound`]), or the client gave it up
    /// ([`Error::SessionLost`]) because no keep-alive was acknowledged for 2/3 of the TTL
    /// since the last acknowledged one was sent (the reasoning is at `KeepAlivePlan`). From
    /// then on the session must be treated as over, whatever the cluster still thinks.
    pub fn keep_alive_in_background(&self) -> tokio::task::JoinHandle<Error> {
        let client = self.client.clone();
        let id = self.id;
        let mut plan = KeepAlivePlan::new(self.ttl, self.renewed_sent_at);
        tokio::spawn(async move {
            let mut last_error = String::from("none");
            loop {
                tokio::time::sleep_until(plan.next_send_at().into()).await;
                let sent_at = Instant::now();
                let give_up_at = plan.give_up_at();
                if sent_at >= give_up_at {
                    let silent_for = sent_at.saturating_duration_since(plan.acknowledged_sent_at);
                    tracing::warn!(session = id, ?silent_for, "session given up: {last_error}");
                    return Error::SessionLost { session_id: id, ttl: plan.ttl, silent_for, last_error };
                }
                match client.keep_alive(id, give_up_at).await {
                    Ok(()) => plan.acknowledged(sent_at),
                    Err(error @ Error::SessionNotFound(_)) => return error,
                    Err(error) => {
                        tracing::warn!(session = id, "keep-alive failed: {error}");
                        last_error = match error {
                            Error::Timeout { last_error, .. } => last_error,
                            other => other.to_string(),
                        };
                        let pause = KEEP_ALIVE_RETRY_PAUSE.min(give_up_at.saturating_duration_since(Instant::now()));
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        })
    }

    /// Ends the session now: its ephemeral keys are deleted.
    pub async fn close(self) -> Result<(), Error> {
        self.client.close_session(self.id).await
    }
}

/// A stream of changes that survives node failures: on a broken stream it reconnects to the
/// next endpoint and resumes from the revision after the last one delivered, so every change
/// arrives exactly once and in order.
pub struct Watch {
    client: Client,
    key: Vec<u8>,
    prefix: bool,
    next_revision: u64,
    stream: Option<tonic::Streaming<WatchReply>>,
}

impl Watch {
    /// The next batch of changes (one revision), waiting as long as it takes. Fails only when
    /// no endpoint could be reached within the client's deadline or history was compacted.
    pub async fn next(&mut self) -> Result<WatchReply, Error> {
        if self.next_revision == 0 {
            // "From now" is pinned to a revision before the first stream opens, so that a
            // reconnection before the first event cannot silently skip changes.
            let client = self.client.clone();
            let reply = client
                .call("watch", |i| {
                    let mut kv = client.kv(i);
                    let request = pb::ListRequest { prefix: self.key.clone(), limit: 1, start_key: Vec::new() };
                    async move { kv.list(request).await }
                })
                .await?;
            self.next_revision = reply.revision + 1;
        }
        loop {
            if self.stream.is_none() {
                let request =
                    pb::WatchRequest { key: self.key.clone(), prefix: self.prefix, start_revision: self.next_revision };
                let client = self.client.clone();
                let stream = client
                    .open_stream("watch", |i| {
                        let request = request.clone();
                        let mut kv = client.kv(i);
                        async move { kv.watch(request).await }
                    })
                    .await?;
                self.stream = Some(stream);
            }
            let Some(stream) = self.stream.as_mut() else { continue };
            match stream.message().await {
                Ok(Some(reply)) => {
                    self.next_revision = reply.revision + 1;
                    return Ok(reply);
                }
                Ok(None) => self.stream = None,
                Err(status) => {
                    self.stream = None;
                    if let Attempt::Fail(error) = classify(&status) {
                        return Err(error);
                    }
                    // Move on to another endpoint for the reconnection.
                    let n = self.client.inner.channels.len();
                    let next = (self.client.inner.preferred.load(Ordering::Relaxed) + 1) % n;
                    self.client.inner.preferred.store(next, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The first revision not yet delivered.
    pub fn next_revision(&self) -> u64 {
        self.next_revision
    }
}

/// What a redundancy policy governs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyTarget {
    /// The files at or under an absolute path.
    Prefix(String),
    /// The objects of an S3 bucket.
    Bucket(String),
}

impl PolicyTarget {
    fn to_pb(&self) -> pb::PolicyTarget {
        let target = match self {
            PolicyTarget::Prefix(prefix) => pb::policy_target::Target::Prefix(prefix.clone()),
            PolicyTarget::Bucket(bucket) => pb::policy_target::Target::Bucket(bucket.clone()),
        };
        pb::PolicyTarget { target: Some(target) }
    }

    /// The target a reply names, or the one asked about if it names none.
    fn from_pb(target: Option<pb::PolicyTarget>, asked: &PolicyTarget) -> Self {
        match target.and_then(|target| target.target) {
            Some(pb::policy_target::Target::Prefix(prefix)) => PolicyTarget::Prefix(prefix),
            Some(pb::policy_target::Target::Bucket(bucket)) => PolicyTarget::Bucket(bucket),
            None => asked.clone(),
        }
    }
}

impl std::fmt::Display for PolicyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyTarget::Prefix(prefix) => f.write_str(prefix),
            PolicyTarget::Bucket(bucket) => write!(f, "bucket {bucket}"),
        }
    }
}

/// A policy set or unset: the target as stored, and the policy it had before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyChange {
    pub target: PolicyTarget,
    /// `replicate` or `ec:K+M`; None if it had none.
    pub before: Option<String>,
    /// The policy it has now, as stored; None after an unset.
    pub after: Option<String>,
}

/// A redundancy policy as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub target: PolicyTarget,
    /// `replicate` or `ec:K+M`.
    pub redundancy: String,
    /// When it was set, on the cluster's state clock.
    pub set_ms: u64,
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

pub use mendfs_proto::v1::{ChunkInfo, FileChunksReply, FileInfo, PutFileReply};

/// Bytes per upload message. The coordinator decodes each message into a buffer of its own,
/// freed once its bytes are in a chunk; at 1 MiB those were allocations the allocator hands back
/// to the OS only after a delay, and 32 concurrent 64 MiB uploads took a coordinator to 202 MiB,
/// 8 to 110–132 MiB. At 256 KiB: 170 and 109 MiB, at the same rate (alternated runs of `mendfs
/// bench files --sizes 1048576,67108864 --clients 32,1,8`). 64 KiB went lower still (106 and
/// 88 MiB) but cost a single upload a fifth of its rate in per-message work.
const UPLOAD_MESSAGE_BYTES: usize = 256 << 10;
/// Upload messages read ahead of the network.
const UPLOAD_QUEUE_MESSAGES: usize = 4;

type FilesRpc = mendfs_proto::v1::files_client::FilesClient<Intercepted>;

impl Client {
    fn files(&self, index: usize) -> FilesRpc {
        mendfs_proto::v1::files_client::FilesClient::with_interceptor(
            self.inner.channels[index].clone(),
            self.inner.interceptor.clone(),
        )
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20)
    }

    /// Uploads `reader` as `path`. With `size`, a stream that ends short is refused; without
    /// it (stdin), the upload ends at end of input. A failed read cancels the upload, and the
    /// server then commits nothing. `progress` hears the bytes sent so far.
    pub async fn put_file<R>(
        &self,
        path: &str,
        reader: R,
        size: Option<u64>,
        expected_version: Option<u64>,
        progress: impl Fn(u64) + Send + 'static,
    ) -> Result<PutFileReply, Error>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        self.put_file_with(path, reader, size, expected_version, "", progress).await
    }

    /// [`Client::put_file`] with a redundancy: `replicate` or `ec:K+M`; empty leaves it to the
    /// policy of the path's longest matching prefix (`replicate` if none has one).
    pub async fn put_file_with<R>(
        &self,
        path: &str,
        mut reader: R,
        size: Option<u64>,
        expected_version: Option<u64>,
        redundancy: &str,
        progress: impl Fn(u64) + Send + 'static,
    ) -> Result<PutFileReply, Error>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        use tokio::io::AsyncReadExt;
        let (tx, rx) = tokio::sync::mpsc::channel(UPLOAD_QUEUE_MESSAGES);
        let header = pb::PutFileHeader {
            path: path.to_string(),
            expected_version,
            size,
            mtime_ms: 0,
            redundancy: redundancy.to_string(),
        };
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
        let reading = tokio::spawn(async move {
            if tx.send(pb::PutFileRequest { part: Some(pb::put_file_request::Part::Header(header)) }).await.is_err() {
                return;
            }
            let mut sent = 0u64;
            loop {
                // No bigger than what the declared size leaves (a small file's message is its
                // size, not a zeroed MiB), but at least a byte: a reader with more than it
                // declared must still be seen, so the server refuses the mismatch.
                let left = size.map_or(UPLOAD_MESSAGE_BYTES as u64, |size| size.saturating_sub(sent));
                let mut buffer = vec![0u8; left.clamp(1, UPLOAD_MESSAGE_BYTES as u64) as usize];
                let mut filled = 0;
                // Fill whole messages: readers (pipes) often return small pieces.
                while filled < buffer.len() {
                    match reader.read(&mut buffer[filled..]).await {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => {
                            let _ = failed_tx.send(format!("reading the input: {e}"));
                            // Keep the stream open until the call is dropped: ending it here
                            // would look like a complete upload to the server.
                            std::future::pending::<()>().await;
                            return;
                        }
                    }
                }
                if filled == 0 {
                    // Only a clean end of input says so; any other way the stream stops, the
                    // server commits nothing.
                    let end = pb::PutFileEnd { size: sent };
                    let _ = tx.send(pb::PutFileRequest { part: Some(pb::put_file_request::Part::End(end)) }).await;
                    return;
                }
                buffer.truncate(filled);
                sent += filled as u64;
                if tx.send(pb::PutFileRequest { part: Some(pb::put_file_request::Part::Data(buffer)) }).await.is_err() {
                    return;
                }
                progress(sent);
            }
        });
        let index = self.inner.preferred.load(Ordering::Relaxed) % self.inner.channels.len();
        let mut files = self.files(index);
        let mut upload = Box::pin(files.put(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let failure = tokio::select! {
            reply = &mut upload => {
                reading.abort();
                let result = reply;
                return match result {
                    Ok(reply) => Ok(reply.into_inner()),
                    Err(status) => Err(match classify(&status) {
                        Attempt::Fail(error) => error,
                        Attempt::Retry(message) => Error::Server(format!("{}: {message}", self.inner.config.endpoints[index])),
                    }),
                };
            }
            Ok(message) = failed_rx => message,
        };
        // Dropping the call first resets the stream, so the server sees a broken upload and
        // commits nothing; only then may the reader (which holds the stream open) go.
        drop(upload);
        reading.abort();
        Err(Error::Server(format!("upload cancelled: {failure}")))
    }

    /// Downloads `path` into `writer`, checking the size and the content hash end to end.
    /// `progress` hears the file's info and the bytes received so far.
    pub async fn get_file<W>(
        &self,
        path: &str,
        writer: &mut W,
        mut progress: impl FnMut(&FileInfo, u64),
    ) -> Result<FileInfo, Error>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::AsyncWriteExt;
        let request = pb::GetFileRequest { path: path.to_string() };
        let mut stream = self
            .open_stream("get file", |i| {
                let request = request.clone();
                let mut files = self.files(i);
                async move { files.get(request).await }
            })
            .await?;
        let stream_error = |status: tonic::Status| match classify(&status) {
            Attempt::Fail(error) => error,
            Attempt::Retry(message) => Error::Server(message),
        };
        let info = match stream.message().await.map_err(stream_error)? {
            Some(pb::GetFileReply { part: Some(pb::get_file_reply::Part::Info(info)) }) => info,
            _ => return Err(Error::Server("the download did not start with the file's info".into())),
        };
        progress(&info, 0);
        let mut hasher = blake3::Hasher::new();
        let mut received = 0u64;
        while let Some(reply) = stream.message().await.map_err(stream_error)? {
            let Some(pb::get_file_reply::Part::Data(data)) = reply.part else {
                return Err(Error::Server("unexpected message in a download".into()));
            };
            hasher.update(&data);
            received += data.len() as u64;
            writer.write_all(&data).await.map_err(|e| Error::Server(format!("writing the output: {e}")))?;
            progress(&info, received);
        }
        writer.flush().await.map_err(|e| Error::Server(format!("writing the output: {e}")))?;
        if received != info.size {
            return Err(Error::Server(format!("download ended after {received} of {} bytes", info.size)));
        }
        if hasher.finalize().as_bytes().as_slice() != info.content_hash.as_slice() {
            return Err(Error::Server("the downloaded bytes do not match the file's content hash".into()));
        }
        Ok(info)
    }

    /// A file's summary (`n_chunks` says how many chunks it has) and the first page of its
    /// chunk list; [`Client::chunk_pages`] gives the rest.
    pub async fn stat_file(&self, path: &str) -> Result<FileInfo, Error> {
        let request = pb::StatFileRequest { path: path.to_string() };
        self.call("stat", |i| {
            let request = request.clone();
            let mut files = self.files(i);
            async move { files.stat(request).await }
        })
        .await
    }

    /// One page of a file version's chunk list from `from_index` (at most `limit` chunks, 0 for
    /// a full page; the server caps a page at 8 192 chunks and about 1 MiB). `version` 0: the
    /// current one; otherwise `VersionMismatch` once that version was replaced or deleted.
    pub async fn file_chunks(
        &self,
        path: &str,
        version: u64,
        from_index: u64,
        limit: u32,
    ) -> Result<FileChunksReply, Error> {
        let request = pb::FileChunksRequest { path: path.to_string(), version, from_index, limit };
        self.call("file chunks", |i| {
            let request = request.clone();
            let mut files = self.files(i);
            async move { files.chunks(request).await }
        })
        .await
    }

    /// Pages through the chunk list of `file`'s version, from chunk `from_index` on (say,
    /// `file.chunks.len()` after a stat): memory is one page, whatever the file's size.
    pub fn chunk_pages(&self, file: &FileInfo, from_index: u64) -> ChunkPages<'_> {
        ChunkPages {
            client: self,
            path: file.path.clone(),
            version: file.version,
            next_index: from_index,
            n_chunks: file.n_chunks,
        }
    }

    /// Files whose path starts with `prefix`, as summaries without chunk lists; the flag says
    /// whether more remain.
    pub async fn list_files(&self, prefix: &str, limit: u32) -> Result<(Vec<FileInfo>, bool), Error> {
        let request = pb::ListFilesRequest { prefix: prefix.to_string(), limit };
        let reply = self
            .call("list files", |i| {
                let request = request.clone();
                let mut files = self.files(i);
                async move { files.list(request).await }
            })
            .await?;
        Ok((reply.files, reply.truncated))
    }

    pub async fn delete_file(&self, path: &str, expected_version: Option<u64>) -> Result<(), Error> {
        let request =
            pb::DeleteFileRequest { path: path.to_string(), expected_version, request_id: self.next_request_id() };
        self.call("delete file", |i| {
            let request = request.clone();
            let mut files = self.files(i);
            async move { files.delete(request).await }
        })
        .await
        .map(|_| ())
    }
}

/// A file version's chunk list, a page at a time (see [`Client::chunk_pages`]).
pub struct ChunkPages<'a> {
    client: &'a Client,
    path: String,
    version: u64,
    next_index: u64,
    n_chunks: u64,
}

impl ChunkPages<'_> {
    /// The next page, or None after the last chunk. `VersionMismatch` if the file changed.
    pub async fn next_page(&mut self) -> Result<Option<Vec<ChunkInfo>>, Error> {
        if self.next_index >= self.n_chunks {
            return Ok(None);
        }
        let page = self.client.file_chunks(&self.path, self.version, self.next_index, 0).await?;
        if page.chunks.is_empty() {
            return Err(Error::Server(format!(
                "{}: an empty chunk page at chunk {} of {}",
                self.path, self.next_index, self.n_chunks
            )));
        }
        self.next_index += page.chunks.len() as u64;
        Ok(Some(page.chunks))
    }

    /// The index of the next page's first chunk.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }
}

/// What one node recorded, for `mendfs trace` and `mendfs logs`. These calls go to the node
/// named, not to any endpoint: each node answers only for itself.
impl Client {
    fn telemetry_at(&self, addr: &str) -> Result<TelemetryClient<Intercepted>, Error> {
        let channel = self.inner.config.endpoint(addr)?.timeout(self.inner.config.attempt_timeout).connect_lazy();
        Ok(TelemetryClient::with_interceptor(channel, self.inner.interceptor.clone())
            .max_decoding_message_size(64 << 20))
    }

    /// One call to the node at `addr`, within the attempt timeout, with no failover: another
    /// node cannot answer for this one.
    async fn ask_node<T>(
        &self,
        addr: &str,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        let timeout = self.inner.config.attempt_timeout;
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(Error::Timeout { elapsed: timeout, last_error: format!("{addr}: no answer") }),
            Ok(Err(status)) => Err(Error::Server(format!("{addr}: {}: {}", status.code(), status.message()))),
            Ok(Ok(reply)) => Ok(reply.into_inner()),
        }
    }

    /// The spans of trace `trace_id` that the node at `addr` recorded, and that node's id.
    pub async fn trace_spans(&self, addr: &str, trace_id: &TraceId) -> Result<(u64, Vec<SpanRecord>), Error> {
        let mut telemetry = self.telemetry_at(addr)?;
        let request = pb::TraceSpansRequest { trace_id: trace_id.to_string() };
        let reply = self.ask_node(addr, telemetry.trace_spans(request)).await?;
        Ok((reply.node_id, parse_records(addr, &reply.spans_json)?))
    }

    /// Log lines of the node at `addr` matching `query`, oldest first, and that node's id.
    pub async fn query_logs(&self, addr: &str, query: &LogQuery) -> Result<(u64, Vec<LogRecord>), Error> {
        let mut telemetry = self.telemetry_at(addr)?;
        let request = pb::QueryLogsRequest {
            trace_id: query.trace_id.clone().unwrap_or_default(),
            since_unix_us: query.since_unix_us.unwrap_or(0),
            min_level: query.min_level.map(|level| level.as_str().to_string()).unwrap_or_default(),
            limit: query.limit.min(u32::MAX as usize) as u32,
        };
        let reply = self.ask_node(addr, telemetry.query_logs(request)).await?;
        Ok((reply.node_id, parse_records(addr, &reply.lines_json)?))
    }
}

/// Records a node sent as JSON lines; a malformed one fails the answer, naming the node.
fn parse_records<R: serde::de::DeserializeOwned>(addr: &str, lines: &[String]) -> Result<Vec<R>, Error> {
    lines
        .iter()
        .map(|line| serde_json::from_str(line).map_err(|e| Error::Server(format!("{addr}: malformed record: {e}"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_given_up_two_thirds_of_its_ttl_after_the_last_acknowledged_send() {
        let opened = Instant::now();
        let ttl = Duration::from_secs(3);
        let mut plan = KeepAlivePlan::new(ttl, opened);
        assert_eq!(plan.next_send_at(), opened + Duration::from_secs(1));
        assert_eq!(plan.give_up_at(), opened + Duration::from_secs(2));
        // Acknowledged: both move on from the send, not from the answer.
        plan.acknowledged(opened + Duration::from_millis(1_100));
        assert_eq!(plan.next_send_at(), opened + Duration::from_millis(2_100));
        assert_eq!(plan.give_up_at(), opened + Duration::from_millis(3_100));
        // A late answer to an earlier send never moves them back.
        plan.acknowledged(opened + Duration::from_millis(500));
        assert_eq!(plan.give_up_at(), opened + Duration::from_millis(3_100));
        // The client gives up strictly before the cluster may expire the session (TTL after
        // the send), with a third of the TTL to spare.
        assert!(plan.give_up_at() + ttl / 3 <= plan.acknowledged_sent_at + ttl);
    }
}
