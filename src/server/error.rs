//! Every HTTP status decision of the webhook listener, in one place. The client gets a
//! short reason; the log gets the detail.

use super::webhook::custom_values::UpstreamError;
use super::{json, Body};
use crate::auth::AuthError;
use crate::event::BodyError;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("not found")]
    NotFound,
    /// `allow` is what the path does take: `POST`, or `GET, POST` with Custom Value Requests on.
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("{0}")]
    Auth(AuthError),
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("body not received in time")]
    Timeout,
    #[error("could not read the body: {0}")]
    BodyRead(String),
    #[error("{0}")]
    BadBody(BodyError),
    #[error("{reason}")]
    Unavailable { reason: String, retry_after: Duration },
    /// A Custom Value Request the upstream did not answer usefully.
    #[error("{0}")]
    Upstream(UpstreamError),
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::NotFound => StatusCode::NOT_FOUND,
            RequestError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RequestError::Auth(_) => StatusCode::UNAUTHORIZED,
            RequestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RequestError::Timeout => StatusCode::REQUEST_TIMEOUT,
            RequestError::BodyRead(_) | RequestError::BadBody(_) => StatusCode::BAD_REQUEST,
            RequestError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            // Webio's bot takes its failure branch on either.
            RequestError::Upstream(UpstreamError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            RequestError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut resp = json(self.status(), json!({ "error": self.to_string() }));
        let h = resp.headers_mut();
        match &self {
            RequestError::MethodNotAllowed { allow } => {
                h.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            RequestError::Auth(_) => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            RequestError::TooLarge(_) | RequestError::Timeout => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            RequestError::Unavailable { retry_after, .. } => {
                let secs = retry_after.as_secs().max(1);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            _ => {}
        }
        resp
    }
}
