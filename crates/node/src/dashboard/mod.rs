//! The web dashboard, served by every node on its `--http` address: `/` is a single page
//! (plain HTML, CSS and JavaScript embedded in the binary, no build step) that polls the JSON
//! endpoints under `/api/` once a second and draws the cluster, its healing and its traces.
//!
//! Any node answers: the status is the leader's view, asked for the way `cluster status` asks
//! (see `mendfs_data::cluster_service`), and traces and logs are gathered from every member the
//! way `mendfs trace` and `mendfs logs` gather them. Each node's status entry carries its HTTP
//! address, so the page moves to another node when the one it was loaded from dies.
//!
//! Auth: the page itself holds no data and is served to anyone; every `/api/` call needs what
//! `Cluster/Status` needs over gRPC (a client token with role `read`, sent as
//! `Authorization: Bearer`), and a cluster without a secret is open. The token is never taken
//! from a query string (those land in access logs and browser history): a one-time login link
//! carries a code in the URL fragment, which browsers do not send, and the page trades it for
//! a session token (`login`) kept in sessionStorage.
//!
//! Cross-origin reads (a page whose node died reads another node's API; the recent requests
//! come from every node) are decided by `guard`: with a secret, any origin may read, because
//! the credential is a header, not a cookie, so another site's page holds nothing to act with.
//! Without a secret the API itself is the credential-free door, and a browser must not become
//! a way for a web page to reach it: only the cluster's own hosts may read it cross-origin, and
//! a request naming a host that is neither an IP address, `localhost` nor a member's host is
//! refused (a DNS-rebinding page names its own).

mod api;
pub(crate) mod login;
pub(crate) mod recent;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::http::HttpState;

/// How long one status answer serves every dashboard that asks: building it asks every member
/// (and the leader), so ten open tabs polling once a second cost what one does.
const STATUS_REUSE: Duration = Duration::from_millis(500);

/// The last status answer and when it was built.
#[derive(Default)]
pub(crate) struct StatusCache {
    last: Mutex<Option<(Instant, serde_json::Value)>>,
}

impl StatusCache {
    fn fresh(&self, now: Instant) -> Option<serde_json::Value> {
        let last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        last.as_ref().filter(|(built, _)| now.saturating_duration_since(*built) < STATUS_REUSE).map(|(_, s)| s.clone())
    }

    fn keep(&self, built: Instant, status: serde_json::Value) {
        *self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((built, status));
    }
}

const INDEX_HTML: &str = include_str!("index.html");
const DASHBOARD_CSS: &str = include_str!("dashboard.css");
const DASHBOARD_JS: &str = include_str!("dashboard.js");

/// The dashboard's page, its assets and its API.
pub(crate) fn routes(state: Arc<HttpState>) -> Router<Arc<HttpState>> {
    let api = Router::new()
        .route("/api/status", get(api::status).options(preflight))
        .route("/api/trace/{id}", get(api::trace).options(preflight))
        .route("/api/logs", get(api::logs).options(preflight))
        .route("/api/requests", get(api::requests).options(preflight))
        .route("/api/login", post(login::login).layer(DefaultBodyLimit::max(login::LOGIN_BODY_BYTES_MAX)))
        .layer(axum::middleware::from_fn_with_state(state, guard));
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/dashboard.css", get(|| async { asset("text/css; charset=utf-8", DASHBOARD_CSS) }))
        .route("/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", DASHBOARD_JS) }))
        .merge(api)
}

/// Decides who may read the API from where (see the module's comment) and says so in the
/// answer's `Access-Control-Allow-Origin`.
async fn guard(State(state): State<Arc<HttpState>>, request: Request, next: Next) -> Response {
    let open = state.authenticator.admits_anonymous();
    let origin = request.headers().get(header::ORIGIN).cloned();
    // A login answers with a session token: for the page of this node only, never another
    // origin's (a leaked link must not be redeemable by a page elsewhere that reads the token).
    let login = request.uri().path() == "/api/login";
    let hosts = open.then(|| member_hosts(&state));
    if let Some(hosts) = &hosts {
        let host = request.headers().get(header::HOST).and_then(|host| host.to_str().ok()).unwrap_or("");
        if !host_is_ours(host, hosts) {
            return api_error(
                StatusCode::FORBIDDEN,
                format!(
                    "this cluster has no secret, so its dashboard API answers only requests to an IP address, \
                     localhost or a member's host, not {:?}",
                    host.chars().take(64).collect::<String>()
                ),
            );
        }
    }
    let allowed_origin = if login {
        None
    } else if let Some(hosts) = &hosts {
        origin.filter(|origin| origin.to_str().is_ok_and(|origin| origin_is_ours(origin, hosts)))
    } else {
        Some(HeaderValue::from_static("*"))
    };
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    match allowed_origin {
        Some(value) => {
            let echoed = value != "*";
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
            if echoed {
                headers.insert(header::VARY, HeaderValue::from_static("origin"));
            }
        }
        // Not for other sites: the browser keeps the answer from the page that asked.
        None => {
            headers.remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
        }
    }
    response
}

/// The hosts (names or IP addresses) of the Raft members' addresses, and this node's.
fn member_hosts(state: &HttpState) -> Vec<String> {
    let mut hosts: Vec<String> =
        state.node.raft_status().members.values().map(|addr| host_of(addr).to_ascii_lowercase()).collect();
    hosts.push(host_of(&state.http_addr).to_ascii_lowercase());
    hosts
}

/// `host` of `host:port`, `[v6]:port` or a bare host.
fn host_of(authority: &str) -> &str {
    let authority = authority.split_once("://").map_or(authority, |(_, rest)| rest);
    let authority = authority.split('/').next().unwrap_or(authority);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// Whether a request's `Host` names this node the way nothing but the cluster would: an IP
/// address, localhost, or a member's host.
fn host_is_ours(host: &str, member_hosts: &[String]) -> bool {
    let host = host_of(host.trim()).to_ascii_lowercase();
    host.parse::<std::net::IpAddr>().is_ok() || host == "localhost" || member_hosts.contains(&host)
}

/// Whether a page at `origin` (`scheme://host:port`) is one of the cluster's own dashboards.
fn origin_is_ours(origin: &str, member_hosts: &[String]) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else { return false };
    matches!(scheme, "http" | "https") && member_hosts.contains(&host_of(authority).to_ascii_lowercase())
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The page is small and changes with the binary: always the running node's.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CONTENT_SECURITY_POLICY, "default-src 'self'; connect-src *; img-src 'self' data:"),
        ],
        body,
    )
        .into_response()
}

/// A browser asks before sending `Authorization` to another node's address (`guard` adds
/// whether the asking origin may).
async fn preflight() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_METHODS, "GET"),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, "authorization"),
            (header::ACCESS_CONTROL_MAX_AGE, "600"),
        ],
    )
        .into_response()
}

/// A JSON answer of the API, readable from any node's page and never cached.
fn api_json(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    // Which origins may read it is `guard`'s to say.
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn api_error(status: StatusCode, message: impl Into<String>) -> Response {
    api_json(status, serde_json::json!({ "error": message.into() }))
}

/// Checks the caller as gRPC checks a `Cluster/Status` call (role `read`): the dashboard shows
/// nothing that `cluster status`, `mendfs trace` and `mendfs logs` would not. Returns the
/// refusal to send, if the caller may not look.
async fn refusal(state: &HttpState, headers: &HeaderMap) -> Option<Response> {
    match state.authenticator.authorize_caught_up("/mendfs.v1.Cluster/Status", headers, None).await {
        Ok(_) => None,
        Err(status) => {
            let code = match status.code() {
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            Some(api_error(
                code,
                format!("{} (the dashboard needs a client token with role read or more)", status.message()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_clusters_hosts_are_trusted_without_a_secret() {
        let members = vec!["10.0.0.1".to_string(), "mendfs-2.internal".to_string(), "::1".to_string()];
        assert_eq!(host_of("10.0.0.1:9000"), "10.0.0.1");
        assert_eq!(host_of("[::1]:9000"), "::1");
        assert_eq!(host_of("example.com"), "example.com");
        assert_eq!(host_of("https://10.0.0.1:7000"), "10.0.0.1");
        for host in ["127.0.0.1:9000", "10.9.9.9", "[::1]:80", "localhost:9000", "MENDFS-2.internal:9000"] {
            assert!(host_is_ours(host, &members), "{host}");
        }
        for host in ["evil.example:9000", "", "localhost.evil.example", "10.0.0.1.evil.example:80"] {
            assert!(!host_is_ours(host, &members), "{host}");
        }
        for origin in ["http://10.0.0.1:9001", "https://mendfs-2.internal:9000", "http://[::1]:9000"] {
            assert!(origin_is_ours(origin, &members), "{origin}");
        }
        for origin in ["http://127.0.0.1:9000", "https://evil.example", "null", "file://10.0.0.1", "http://10.0.0.2"] {
            assert!(!origin_is_ours(origin, &members), "{origin}");
        }
    }

    #[test]
    fn a_status_answer_is_reused_only_while_fresh() {
        let cache = StatusCache::default();
        let start = Instant::now();
        assert_eq!(cache.fresh(start), None);
        cache.keep(start, serde_json::json!({"term": 3}));
        assert_eq!(cache.fresh(start + STATUS_REUSE / 2), Some(serde_json::json!({"term": 3})));
        assert_eq!(cache.fresh(start + STATUS_REUSE), None);
    }
}
