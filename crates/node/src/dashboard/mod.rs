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
//! from a query string (those land in access logs and browser history): a login link carries
//! it in the URL fragment, which browsers do not send, and the page moves it into
//! sessionStorage. Because the credential is a header, not a cookie, the API can be read from
//! another node's page (CORS `*`) without letting other sites act as the user.

mod api;
pub(crate) mod login;
pub(crate) mod recent;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
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
pub(crate) fn routes() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/dashboard.css", get(|| async { asset("text/css; charset=utf-8", DASHBOARD_CSS) }))
        .route("/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", DASHBOARD_JS) }))
        .route("/api/status", get(api::status).options(preflight))
        .route("/api/trace/{id}", get(api::trace).options(preflight))
        .route("/api/logs", get(api::logs).options(preflight))
        .route("/api/requests", get(api::requests).options(preflight))
        .route("/api/login", post(login::login).layer(DefaultBodyLimit::max(login::LOGIN_BODY_BYTES_MAX)))
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

/// A browser asks before sending `Authorization` to another node's address.
async fn preflight() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
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
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn api_error(status: StatusCode, message: impl Into<String>) -> Response {
    api_json(status, serde_json::json!({ "error": message.into() }))
}

/// Checks the caller as gRPC checks a `Cluster/Status` call (role `read`): the dashboard shows
/// nothing that `cluster status`, `mendfs trace` and `mendfs logs` would not. Returns the
/// refusal to send, if the caller may not look.
fn refusal(state: &HttpState, headers: &HeaderMap) -> Option<Response> {
    match state.authenticator.authorize("/mendfs.v1.Cluster/Status", headers, None) {
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
    fn a_status_answer_is_reused_only_while_fresh() {
        let cache = StatusCache::default();
        let start = Instant::now();
        assert_eq!(cache.fresh(start), None);
        cache.keep(start, serde_json::json!({"term": 3}));
        assert_eq!(cache.fresh(start + STATUS_REUSE / 2), Some(serde_json::json!({"term": 3})));
        assert_eq!(cache.fresh(start + STATUS_REUSE), None);
    }
}
