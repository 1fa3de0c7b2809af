//! Admin listener: `GET /metrics`, `/healthz`, `/readyz`.

use super::{json, Body};
use crate::app::State;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use std::sync::Arc;

pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = json(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "method not allowed"}));
        r.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            state.refresh_gauges();
            Response::builder()
                .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
                .body(Full::new(Bytes::from(state.metrics.render())))
                .expect("static response parts are valid")
        }
        "/healthz" => json(StatusCode::OK, json!({"status": "ok"})),
        "/readyz" => {
            let mut warnings = Vec::new();
            if state.verifier.is_disabled() {
                warnings.push("auth is disabled: webhooks are not authenticated");
            }
            if state.is_ready() {
                json(StatusCode::OK, json!({"status": "ready", "warnings": warnings}))
            } else {
                json(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "not ready", "warnings": warnings}))
            }
        }
        _ => json(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
}
