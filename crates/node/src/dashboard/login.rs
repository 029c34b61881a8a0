//! `POST /api/login`: exchanges a one-time login code (from a link `mendfs auth login-link`,
//! `local up` or `demo --keep` printed) for a session token, which the page keeps in its
//! tab's sessionStorage. The code is the credential, so this is the one API call without a
//! token; what a stranger can do with it is bounded: a body of at most a few hundred bytes, a
//! code of the wrong shape refused before anything is looked up, a well-formed unknown code
//! costs one read on the leader and never a log entry, and few logins run at once.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use mendfs_meta::{CommandError, Origin};

use crate::http::HttpState;

/// Logins served at once by one node; more wait for none and get a 429 (a person opens one
/// link at a time; only a script tries many).
pub(crate) const LOGINS_AT_ONCE: usize = 4;
/// A login body is `{"code":"mendfs_login_…"}`: under a hundred bytes.
pub(crate) const LOGIN_BODY_BYTES_MAX: usize = 1_024;

#[derive(serde::Deserialize)]
struct LoginRequest {
    code: String,
}

pub(super) async fn login(State(state): State<Arc<HttpState>>, headers: HeaderMap, body: Bytes) -> Response {
    // JSON only: a cross-site form or `text/plain` post (sent without a preflight) must not
    // spend someone's code.
    let json = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).is_some_and(|value| {
        value.split(';').next().is_some_and(|kind| kind.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json {
        return answer(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            serde_json::json!({ "error": "send the code as Content-Type: application/json" }),
        );
    }
    if body.len() > LOGIN_BODY_BYTES_MAX {
        return answer(StatusCode::PAYLOAD_TOO_LARGE, serde_json::json!({ "error": "a login body is at most 1 KiB" }));
    }
    let Ok(request) = serde_json::from_slice::<LoginRequest>(&body) else {
        return answer(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "send {\"code\": \"mendfs_login_…\"}" }));
    };
    let Ok(_permit) = state.logins.try_acquire() else {
        return answer(
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({ "error": "too many logins at once; try again" }),
        );
    };
    match state.node.redeem_login_code(Origin::LOCAL, request.code.trim()).await {
        Ok(session) => {
            tracing::info!(session = %session.name, role = session.role.as_str(), "a login link opened a dashboard session");
            answer(
                StatusCode::OK,
                serde_json::json!({
                    "token": session.token,
                    "name": session.name,
                    "role": session.role.as_str(),
                    "expires_unix_ms": session.expires_unix_ms,
                }),
            )
        }
        Err(mendfs_meta::ApiError::Command(error @ CommandError::LoginCodeInvalid)) => {
            answer(StatusCode::UNAUTHORIZED, serde_json::json!({ "error": error.to_string() }))
        }
        Err(mendfs_meta::ApiError::Command(error @ CommandError::TooMany { .. })) => {
            answer(StatusCode::TOO_MANY_REQUESTS, serde_json::json!({ "error": error.to_string() }))
        }
        Err(error) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": format!("the login could not be completed: {error}") }),
        ),
    }
}

/// A JSON answer for this page only: no CORS header (a login is never made from another
/// origin), never cached (it holds a token).
fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
