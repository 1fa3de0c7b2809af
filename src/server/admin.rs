//! Admin listener, read-only: `GET /metrics`, `/healthz`, `/readyz`, `/sinks`. It is up before the webhook
//! listener, answering `/readyz` with 503 until the daemon is ready.

use super::{json, Body};
use crate::state::State;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::sync::{Arc, OnceLock};

pub struct Admin {
    metrics: PrometheusHandle,
    auth_disabled: bool,
    state: OnceLock<Arc<State>>,
}

impl Admin {
    pub fn new(metrics: PrometheusHandle, auth_disabled: bool) -> Self {
        Admin { metrics, auth_disabled, state: OnceLock::new() }
    }

    /// Called once the webhook listener is up.
    pub fn set_state(&self, state: Arc<State>) {
        let _ = self.state.set(state);
    }
}

pub async fn handle(admin: Arc<Admin>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = json(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "method not allowed"}));
        r.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let state = admin.state.get();
    match req.uri().path() {
        "/metrics" => {
            super::refresh_gauges();
            if let Some(s) = state {
                s.refresh_gauges();
            }
            Response::builder()
                .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
                .body(Full::new(Bytes::from(admin.metrics.render())))
                .expect("static response parts are valid")
        }
        "/healthz" => json(StatusCode::OK, json!({"status": "ok"})),
        // Read-only: changing a sink's state goes through the control socket only.
        "/sinks" => match state {
            Some(s) => json(StatusCode::OK, json!({ "sinks": s.sinks_status() })),
            None => json(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "starting"})),
        },
        "/readyz" => {
            let mut warnings = Vec::new();
            if admin.auth_disabled {
                warnings.push("auth is disabled: webhooks are not authenticated");
            }
            match state {
                Some(s) if s.is_ready() => json(StatusCode::OK, json!({"status": "ready", "warnings": warnings})),
                Some(s) => match s.delivery.unready_reason() {
                    // E.g. the spool cannot commit: every webhook would get 503.
                    Some(reason) => json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"status": "not ready", "reason": reason, "warnings": warnings}),
                    ),
                    None => {
                        json(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "shutting down", "warnings": warnings}))
                    }
                },
                None => json(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "starting", "warnings": warnings})),
            }
        }
        _ => json(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
}
