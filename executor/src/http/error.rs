//! The API's one error shape: `{"error": {"code", "message", "field"?}}`
//! with the HTTP status that fits, so that clients can branch on `code` and
//! people can read `message`, which names the wrong input.

use hyper::{Response, StatusCode};
use serde_json::json;

use super::body::Body;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// An invalid request field: 400 naming it.
    pub fn field(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        let field = field.into();
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_field",
            message: format!("{field}: {message}"),
            field: Some(field),
            retry_after: None,
        }
    }

    /// The body is not JSON at all (`400 malformed_json`, field `body`).
    pub fn malformed_json(why: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {why}"),
        );
        e.field = Some("body".into());
        e
    }

    /// Parses a JSON body into `T`: bytes that are not JSON answer
    /// [`ApiError::malformed_json`], JSON of the wrong shape an
    /// `invalid_field` error naming `field`.
    pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], field: &str) -> Result<T, Self> {
        serde_json::from_slice(body).map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                Self::malformed_json(e)
            } else {
                Self::field(field, e)
            }
        })
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    pub fn into_response(self) -> Response<Body> {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(f) = &self.field {
            e["field"] = json!(f);
        }
        let mut r = super::json_response(self.status, &json!({ "error": e }));
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from(s),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}
