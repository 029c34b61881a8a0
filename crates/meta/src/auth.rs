//! Who may call what.
//!
//! Two kinds of callers reach a node. **Peers** (other nodes, and an operator holding the
//! cluster secret on a node's machine) prove themselves with the cluster secret or, under TLS,
//! with a node certificate from the cluster's CA; only they may call the node-to-node RPCs
//! (Raft, forwarding, chunk preparation and replication, heartbeats). **Clients** present a
//! bearer token; each token has a role (`read` < `write` < `admin`) that bounds what it may
//! call, and tokens are stored in the metadata only as their BLAKE3 hash.
//!
//! Every call passes through [`AuthLayer`] (a tower layer around all of a node's gRPC
//! services), which decides from the method path, the headers and the connection alone, before
//! any message is decoded, and hands the [`Caller`] to the handler in the request's extensions.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mendfs_proto::{AUTHORIZATION_HEADER, CLUSTER_ID_HEADER, NODE_ID_HEADER, SECRET_HEADER};
// The operation a path names, `/mendfs.v1.Kv/Set` → `Kv/Set`, as metrics and traces name it.
use mendfs_telemetry::grpc::operation_name as operation;
use mendfs_types::NodeId;
use serde::{Deserialize, Serialize};
use tonic::codegen::http;
use tonic::Status;

use crate::node::{CatchUpQueue, RIGHTS_STATE_MAX_AGE};
use crate::raft_store::StateReader;
use crate::schema::{decode, StateStore, StoreError, Table};

/// What a client token may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// get, ls, stat, kv get/list/watch, cluster status, traces and logs.
    Read,
    /// Adds put, rm, kv writes, sessions and locks.
    Write,
    /// Adds membership, drain, token management and S3 keys and buckets.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?}: one of read, write, admin")),
        }
    }
}

/// What a call requires of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Node-to-node: the cluster secret or a node certificate.
    Peer,
    /// A client token with at least this role (peers may call these too).
    Client(Role),
}

/// What each RPC (`Service/Method`) requires. `None` for a method no proto defines: the router
/// answers it `Unimplemented`, and only peers get that far.
pub fn required_access(op: &str) -> Option<Access> {
    use Access::{Client, Peer};
    use Role::{Admin, Read, Write};
    Some(match op {
        "Node/AppendEntries" | "Node/AppendStream" | "Node/Vote" | "Node/InstallSnapshot" | "Node/Forward" => Peer,
        "Health/Heartbeat" => Peer,
        "Storage/PrepareChunk" | "Storage/PrepareChunkStream" => Peer,
        "Storage/ReadChunk" | "Storage/ReplicateChunk" | "Storage/RebuildShard" => Peer,
        "Node/Info" => Client(Read),
        "Kv/Get" | "Kv/List" | "Kv/Watch" => Client(Read),
        "Kv/Create" | "Kv/Set" | "Kv/Delete" | "Kv/Batch" | "Kv/WriteStream" | "Kv/Compact" => Client(Write),
        "Kv/SessionOpen" | "Kv/SessionKeepAlive" | "Kv/SessionClose" => Client(Write),
        "Files/Get" | "Files/Stat" | "Files/List" | "Files/Chunks" => Client(Read),
        "Files/Put" | "Files/Delete" => Client(Write),
        "Cluster/Status" => Client(Read),
        "Cluster/AddNode" | "Cluster/RemoveNode" | "Cluster/Drain" => Client(Admin),
        "Telemetry/TraceSpans" | "Telemetry/QueryLogs" => Client(Read),
        "Auth/WhoAmI" => Client(Read),
        "Auth/CreateToken" | "Auth/ListTokens" | "Auth/RevokeToken" | "Auth/CreateLoginLink" => Client(Admin),
        "S3Admin/CreateKey" | "S3Admin/ListKeys" | "S3Admin/DeleteKey" | "S3Admin/Allow" => Client(Admin),
        "S3Admin/CreateBucket" | "S3Admin/ListBuckets" | "S3Admin/DeleteBucket" => Client(Admin),
        "Policy/Set" | "Policy/Unset" | "Policy/List" => Client(Admin),
        "Jobs/Status" | "Jobs/List" | "Jobs/Results" | "Jobs/Lease" | "Jobs/ReadCheckpoint" => Client(Read),
        "Jobs/Submit" | "Jobs/Cancel" | "Jobs/Claim" | "Jobs/Checkpoint" | "Jobs/Complete" | "Jobs/Release" => {
            Client(Write)
        }
        _ => return None,
    })
}

/// Who made a call, as [`AuthLayer`] established it; handlers find it in the request's
/// extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A node (by certificate, or by the secret and the node id it names) or, with `node`
    /// `None`, an operator holding the cluster secret.
    Peer {
        node: Option<NodeId>,
    },
    Client {
        token: String,
        role: Role,
    },
    /// The cluster runs without a secret (`--insecure-dev`): everyone may do everything.
    Anonymous,
}

impl Caller {
    pub fn may(&self, access: Access) -> bool {
        match (self, access) {
            (Caller::Peer { .. } | Caller::Anonymous, _) => true,
            (Caller::Client { .. }, Access::Peer) => false,
            (Caller::Client { role, .. }, Access::Client(needed)) => *role >= needed,
        }
    }

    /// For `WhoAmI` and log lines.
    pub fn identity(&self) -> String {
        match self {
            Caller::Peer { node: Some(node) } => format!("node {node}"),
            Caller::Peer { node: None } => "cluster secret".into(),
            Caller::Client { token, .. } => format!("token {token}"),
            Caller::Anonymous => "anonymous".into(),
        }
    }

    pub fn role_name(&self) -> &'static str {
        match self {
            Caller::Peer { .. } => "peer",
            Caller::Client { role, .. } => role.as_str(),
            Caller::Anonymous => "admin",
        }
    }

    /// The node a peer call comes from, which a heartbeat must describe. `Anonymous` (no
    /// secret at all) may speak for any node.
    pub fn speaks_for(&self, node: NodeId) -> bool {
        match self {
            Caller::Peer { node: Some(peer) } => *peer == node,
            Caller::Anonymous => true,
            _ => false,
        }
    }
}

/// What the connection a call arrived on proved, set by the node's listener (see
/// `mendfs_node`) and found in every request's extensions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub remote: Option<SocketAddr>,
    /// The identity in the TLS client certificate the CA verified, if one was presented.
    pub certificate: Option<CertifiedIdentity>,
}

/// The identity a verified client certificate names (in its `spiffe://mendfs/...` URI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertifiedIdentity {
    Node(NodeId),
    Client(String),
}

// --- tokens ---------------------------------------------------------------------------------

/// Every token starts with this, so that a leaked one is recognizable (secret scanners).
pub const TOKEN_PREFIX: &str = "mendfs_";
/// Longest token name.
pub const TOKEN_NAME_BYTES_MAX: usize = 64;

/// A token as the metadata keeps it (in `Table::Tokens`, by name): only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub hash: [u8; 32],
    pub role: Role,
    pub created_unix_ms: u64,
}

/// A new bearer token: the prefix and 256 random bits.
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{TOKEN_PREFIX}{}", mendfs_types::hex(&bytes))
}

/// What the metadata stores of a token. A fast hash is enough: the token is 256 random bits,
/// not a password to stretch.
pub fn token_hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

/// Token names are labels an operator types: 1–64 of `A-Z a-z 0-9 . _ -`.
pub fn validate_token_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= TOKEN_NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("token name {name:?} must be 1 to {TOKEN_NAME_BYTES_MAX} of A-Z a-z 0-9 . _ -"))
    }
}

/// The tokens the state machine holds, by hash: every call's token is looked up here, so it
/// is kept in memory and replaced whenever a token is created or revoked, or a login opens a
/// session.
#[derive(Debug, Default)]
pub struct TokenTable {
    by_hash: HashMap<[u8; 32], KnownToken>,
}

#[derive(Debug)]
struct KnownToken {
    name: String,
    role: Role,
    /// Refused from then on (wall clock), for the sessions logins open.
    expires_unix_ms: Option<u64>,
}

impl TokenTable {
    pub fn load(store: &impl StateStore) -> Result<Self, StoreError> {
        let mut by_hash = HashMap::new();
        let mut start = Vec::new();
        loop {
            let rows = store.range(Table::Tokens, &start, None, 1_024)?;
            let Some((last, _)) = rows.last() else { break };
            start = last.clone();
            start.push(0);
            for (name, value) in &rows {
                let record: TokenRecord = decode(value)?;
                let expires_unix_ms = crate::login::token_expiry(store, name)?;
                let name = String::from_utf8_lossy(name).into_owned();
                by_hash.insert(record.hash, KnownToken { name, role: record.role, expires_unix_ms });
            }
        }
        Ok(Self { by_hash })
    }

    /// Whether this node has a record of `token`, expired or not.
    fn knows(&self, token: &str) -> bool {
        self.by_hash.contains_key(&token_hash(token))
    }

    fn find(&self, token: &str, now_unix_ms: u64) -> Option<(String, Role)> {
        let known = self.by_hash.get(&token_hash(token))?;
        // An expired session is refused by every node at once, whatever its state machine
        // has pruned yet.
        if known.expires_unix_ms.is_some_and(|expires| now_unix_ms >= expires) {
            return None;
        }
        Some((known.name.clone(), known.role))
    }
}

pub type SharedTokens = Arc<RwLock<TokenTable>>;

// --- the gate -------------------------------------------------------------------------------

/// Refusals are logged at most once per this long, with how many there were: a stranger's
/// calls must not flood the log, nor push real lines out of the node's bounded log store.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// When the next refusal line is due (for refused calls here, refused connections in the
/// node's listener).
#[derive(Debug, Default)]
pub struct RefusalLog {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// Counts a refusal at `now`; when a line is due, returns how many refusals it reports
    /// (this one and those since the last line).
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self.last_line.is_some_and(|last| now.saturating_duration_since(last) < REFUSAL_LOG_EVERY) {
            return None;
        }
        self.last_line = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Decides every call: identifies the caller, checks what the method requires, and for peer
/// calls that the caller's data belongs to this cluster.
#[derive(Clone)]
pub struct Authenticator {
    secret: Option<Arc<str>>,
    tokens: SharedTokens,
    state: StateReader,
    refusals: Arc<Mutex<RefusalLog>>,
    /// Waits for this node's state to reach the leader's, before a token it does not know is
    /// refused.
    catch_up: CatchUpQueue,
}

impl Authenticator {
    /// Whether callers without credentials are admitted (a cluster started without a secret).
    pub fn admits_anonymous(&self) -> bool {
        self.secret.is_none()
    }
}

/// Compares in time independent of where the first difference is.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator {
    pub(crate) fn new(secret: Option<&str>, state: StateReader, catch_up: CatchUpQueue) -> Self {
        Self { secret: secret.map(Arc::from), tokens: state.tokens(), state, refusals: Arc::default(), catch_up }
    }

    /// Whether the call presents a bearer token this node has no record of at all (not one it
    /// knows to have expired). Such a token may have been created through another node a
    /// moment ago, acknowledged there before this node applied it.
    fn token_unknown_here(&self, headers: &http::HeaderMap) -> bool {
        let Some(token) = headers
            .get(AUTHORIZATION_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
        else {
            return false;
        };
        !self.tokens.read().unwrap_or_else(|poisoned| poisoned.into_inner()).knows(token.trim())
    }

    /// [`Authenticator::authorize`], except that a token this node does not know is looked
    /// for again once this node has applied every write acknowledged before the call: a token
    /// created through one node works on every node as soon as its creation returns, as a
    /// client that was told "created" expects. The catch-up rounds are shared by every caller
    /// waiting (see `StateCatchUp`), so strangers' made-up tokens cost the leader one call per
    /// round trip however many they send; a refusal is only delayed by that round trip.
    pub async fn authorize_caught_up(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        connection: Option<&ConnectionInfo>,
    ) -> Result<Caller, Status> {
        let refused = match self.authorize(path, headers, connection) {
            Ok(Caller::Client { .. }) => {
                // Admitted on this node's view of the tokens: a view old enough to miss a
                // revocation acknowledged through another node must be brought up first.
                if let Err(e) = self.catch_up.caught_up_within(RIGHTS_STATE_MAX_AGE).await {
                    return Err(Status::unavailable(format!(
                        "cannot confirm with the leader that the token is still valid: {e}"
                    )));
                }
                return self.authorize(path, headers, connection);
            }
            Err(refused) if self.token_unknown_here(headers) => refused,
            decided => return decided,
        };
        if let Err(e) = self.catch_up.catch_up().await {
            tracing::debug!("an unknown token is refused without catching up: {e}");
            return Err(refused);
        }
        self.authorize(path, headers, connection)
    }

    /// Who the caller is, from its credentials alone.
    fn identify(&self, headers: &http::HeaderMap, connection: Option<&ConnectionInfo>) -> Result<Caller, Status> {
        let header = |name: &str| headers.get(name).map(|value| value.as_bytes());
        let claimed_node = || {
            header(NODE_ID_HEADER).map(|id| {
                std::str::from_utf8(id)
                    .ok()
                    .and_then(|id| id.parse::<NodeId>().ok())
                    .ok_or_else(|| Status::unauthenticated("the node id header is not a number"))
            })
        };
        match connection.and_then(|connection| connection.certificate.as_ref()) {
            Some(CertifiedIdentity::Node(node)) => {
                // The certificate is the credential; a node id header, if any, must agree.
                if let Some(claimed) = claimed_node().transpose()? {
                    if claimed != *node {
                        return Err(Status::unauthenticated(format!(
                            "the certificate belongs to node {node}, the call claims node {claimed}"
                        )));
                    }
                }
                return Ok(Caller::Peer { node: Some(*node) });
            }
            Some(CertifiedIdentity::Client(_)) | None => {}
        }
        if let Some(authorization) = header(AUTHORIZATION_HEADER) {
            let token = std::str::from_utf8(authorization)
                .ok()
                .and_then(|value| value.strip_prefix("Bearer "))
                .ok_or_else(|| Status::unauthenticated("the authorization header must be `Bearer TOKEN`"))?;
            let now_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as u64);
            let found =
                self.tokens.read().unwrap_or_else(|poisoned| poisoned.into_inner()).find(token.trim(), now_unix_ms);
            return match found {
                Some((name, role)) => Ok(Caller::Client { token: name, role }),
                None => Err(Status::unauthenticated("unknown, revoked or expired token")),
            };
        }
        match (&self.secret, header(SECRET_HEADER)) {
            (Some(secret), Some(given)) if secrets_equal(given, secret.as_bytes()) => {
                Ok(Caller::Peer { node: claimed_node().transpose()? })
            }
            (Some(_), Some(_)) => Err(Status::unauthenticated("wrong cluster secret")),
            (Some(_), None) => Err(Status::unauthenticated(
                "a token is required (--token or MENDFS_TOKEN; `mendfs auth token create`)",
            )),
            (None, _) => Ok(Caller::Anonymous),
        }
    }

    /// Decides a call to `path`: the caller, or the status that refuses it.
    pub fn authorize(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        connection: Option<&ConnectionInfo>,
    ) -> Result<Caller, Status> {
        let caller = self.identify(headers, connection)?;
        let op = operation(path);
        match required_access(op) {
            None if matches!(caller, Caller::Client { .. }) => {
                return Err(Status::permission_denied(format!("permission denied: no such method {op:?}")))
            }
            None => {}
            Some(access) if !caller.may(access) => {
                let needed = match access {
                    Access::Peer => "peer-only method".to_string(),
                    Access::Client(role) => format!("{op} needs role {}", role.as_str()),
                };
                return Err(Status::permission_denied(format!(
                    "permission denied: role {} ({needed})",
                    caller.role_name()
                )));
            }
            Some(_) => {}
        }
        if let Caller::Peer { .. } = caller {
            let theirs = headers.get(CLUSTER_ID_HEADER).and_then(|value| value.to_str().ok());
            if let (Some(theirs), Some(ours)) = (theirs, self.state.cluster_id()) {
                if theirs != ours {
                    return Err(Status::failed_precondition(format!(
                        "cluster id mismatch: this node belongs to cluster {ours}, the caller to cluster {theirs}"
                    )));
                }
            }
        }
        Ok(caller)
    }

    /// Whether a call would be admitted (the trace layer opens no span for refused calls).
    pub fn admits(&self, path: &str, headers: &http::HeaderMap, extensions: &http::Extensions) -> bool {
        self.authorize(path, headers, extensions.get::<ConnectionInfo>()).is_ok()
    }

    /// Logs a refusal, at most one line per `REFUSAL_LOG_EVERY` with the count since the last.
    fn log_refusal(&self, path: &str, connection: Option<&ConnectionInfo>, status: &Status) {
        let due = self.refusals.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).note(Instant::now());
        if let Some(refused) = due {
            let remote = connection.and_then(|c| c.remote).map_or("unknown".to_string(), |addr| addr.to_string());
            // Only a defined method's name is logged: a stranger's made-up paths are not echoed.
            let op = required_access(operation(path)).map_or("unknown", |_| operation(path));
            if status.code() == tonic::Code::FailedPrecondition {
                tracing::error!(%remote, op, refused, "refused a call from a node of another cluster: {}", status.message());
            } else {
                tracing::warn!(%remote, op, refused, "refused a call: {}", status.message());
            }
        }
    }
}

/// Wraps every gRPC service of a node with its [`Authenticator`].
#[derive(Clone)]
pub struct AuthLayer {
    authenticator: Authenticator,
}

impl AuthLayer {
    pub fn new(authenticator: Authenticator) -> Self {
        Self { authenticator }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, authenticator: self.authenticator.clone() }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Authenticator,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, RequestBody, ResponseBody> tower::Service<http::Request<RequestBody>> for AuthService<S>
where
    S: tower::Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RequestBody: Send + 'static,
    ResponseBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<RequestBody>) -> Self::Future {
        let connection = request.extensions().get::<ConnectionInfo>();
        let decided = self.authenticator.authorize(request.uri().path(), request.headers(), connection);
        // The instance that was polled ready serves this call; a fresh clone stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let token_state_stale = matches!(decided, Ok(Caller::Client { .. }))
            && !self.authenticator.catch_up.fresh_within(RIGHTS_STATE_MAX_AGE);
        match decided {
            Ok(caller) if !token_state_stale => {
                request.extensions_mut().insert(caller);
                Box::pin(inner.call(request))
            }
            Err(status) if !self.authenticator.token_unknown_here(request.headers()) => {
                self.authenticator.log_refusal(request.uri().path(), connection, &status);
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
            _ => {
                // A token admitted on a view too old to trust, or perhaps one created through
                // another node a moment ago: decided again once this node has caught up
                // (`authorize_caught_up`).
                let authenticator = self.authenticator.clone();
                Box::pin(async move {
                    let connection = request.extensions().get::<ConnectionInfo>();
                    let path = request.uri().path().to_string();
                    let decided = authenticator.authorize_caught_up(&path, request.headers(), connection).await;
                    match decided {
                        Ok(caller) => {
                            request.extensions_mut().insert(caller);
                            inner.call(request).await
                        }
                        Err(status) => {
                            authenticator.log_refusal(&path, request.extensions().get::<ConnectionInfo>(), &status);
                            Ok(status.into_http())
                        }
                    }
                })
            }
        }
    }
}

/// The caller a handler serves, as [`AuthLayer`] established it. A request that did not pass
/// the layer (a unit test calling a handler directly) has none, and is treated as a client
/// without rights.
pub fn caller_of<T>(request: &tonic::Request<T>) -> Caller {
    request.extensions().get::<Caller>().cloned().unwrap_or(Caller::Client { token: String::new(), role: Role::Read })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_defined_method_says_what_it_requires() {
        for op in mendfs_proto::OPERATIONS {
            if op.starts_with("KV/") {
                continue; // etcd's, for the benchmark client; not served
            }
            assert!(required_access(op).is_some(), "{op} has no access rule");
        }
        assert_eq!(required_access("Files/Putt"), None);
    }

    #[test]
    fn roles_include_the_ones_below_and_never_peer_methods() {
        let reader = Caller::Client { token: "r".into(), role: Role::Read };
        let writer = Caller::Client { token: "w".into(), role: Role::Write };
        let admin = Caller::Client { token: "a".into(), role: Role::Admin };
        let peer = Caller::Peer { node: Some(2) };
        for op in ["Files/Get", "Files/Chunks", "Kv/Watch", "Cluster/Status", "Telemetry/TraceSpans"] {
            let access = required_access(op).expect("defined");
            assert!(reader.may(access) && writer.may(access) && admin.may(access), "{op}");
        }
        for op in [
            "Files/Put",
            "Files/Delete",
            "Kv/Set",
            "Kv/Batch",
            "Kv/WriteStream",
            "Kv/SessionOpen",
            "Jobs/Submit",
            "Jobs/Claim",
            "Jobs/Complete",
        ] {
            let access = required_access(op).expect("defined");
            assert!(!reader.may(access) && writer.may(access) && admin.may(access), "{op}");
        }
        for op in [
            "Cluster/Drain",
            "Cluster/AddNode",
            "Auth/CreateToken",
            "Auth/RevokeToken",
            "S3Admin/CreateKey",
            "S3Admin/ListKeys",
            "S3Admin/DeleteKey",
            "S3Admin/Allow",
            "S3Admin/CreateBucket",
            "S3Admin/ListBuckets",
            "S3Admin/DeleteBucket",
            "Policy/Set",
            "Policy/Unset",
            "Policy/List",
        ] {
            let access = required_access(op).expect("defined");
            assert!(!reader.may(access) && !writer.may(access) && admin.may(access), "{op}");
        }
        for op in [
            "Node/AppendEntries",
            "Node/AppendStream",
            "Node/InstallSnapshot",
            "Node/Forward",
            "Health/Heartbeat",
            "Storage/PrepareChunk",
            "Storage/PrepareChunkStream",
        ] {
            let access = required_access(op).expect("defined");
            assert!(!admin.may(access) && peer.may(access), "{op}");
        }
    }

    #[test]
    fn a_heartbeat_speaks_only_for_the_node_that_sends_it() {
        assert!(Caller::Peer { node: Some(3) }.speaks_for(3));
        assert!(!Caller::Peer { node: Some(3) }.speaks_for(2));
        assert!(!Caller::Peer { node: None }.speaks_for(2), "the operator's secret is no node");
        assert!(!Caller::Client { token: "a".into(), role: Role::Admin }.speaks_for(2));
    }

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let (a, b) = (generate_token(), generate_token());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), token_hash(&b));
        assert!(validate_token_name("ci-runner.2").is_ok());
        for bad in ["", "a b", "x/y", "é", &"n".repeat(65)] {
            assert!(validate_token_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!("write".parse::<Role>(), Ok(Role::Write));
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn refusals_are_logged_at_once_then_at_most_once_per_interval_with_their_count() {
        let start = Instant::now();
        let mut log = RefusalLog::default();
        assert_eq!(log.note(start), Some(1), "the first refusal is logged at once");
        for i in 1..=999u64 {
            assert_eq!(log.note(start + Duration::from_millis(i)), None);
        }
        assert_eq!(log.note(start + REFUSAL_LOG_EVERY), Some(1_000), "then one line counts them all");
        assert_eq!(log.note(start + REFUSAL_LOG_EVERY + Duration::from_secs(1)), None);
    }
}
