//! `POST {server.path}`: authenticate, read the body, normalise, then [`State::route`] (route
//! and hand to delivery). `GET {server.path}`: a Custom Value Request ([`custom_values`]), when
//! configured; the same token check.

pub mod custom_values;

use super::error::RequestError;
use super::Body;
use crate::event::normalise;
use crate::metrics;
use crate::state::{State, Taken};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    // Every log line about this request carries its request id and, once known, the event id.
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:x}", NEXT_REQUEST.fetch_add(1, Ordering::Relaxed)));
    let span = tracing::info_span!("request", request_id = %request_id, event_id = tracing::field::Empty);
    let resp = match accept(&state, req).instrument(span).await {
        Ok(resp) => resp,
        Err(e) => {
            match &e {
                RequestError::Auth(a) => metrics::auth_failure(a.reason()),
                RequestError::Unavailable { reason, .. } => tracing::warn!(%reason, "webhook refused with 503"),
                _ => {}
            }
            e.into_response()
        }
    };
    metrics::request(resp.status().as_u16(), started.elapsed());
    tracing::debug!(request_id = %request_id, status = resp.status().as_u16(), "webhook answered");
    resp
}

async fn accept(state: &State, req: Request<Incoming>) -> Result<Response<Body>, RequestError> {
    if req.uri().path() != state.path {
        return Err(RequestError::NotFound);
    }
    let custom_values = state.custom_values.as_ref();
    let get = match (req.method(), custom_values) {
        (&Method::POST, _) => None,
        (&Method::GET, Some(cv)) => Some(cv),
        (_, Some(_)) => return Err(RequestError::MethodNotAllowed { allow: "GET, POST" }),
        (_, None) => return Err(RequestError::MethodNotAllowed { allow: "POST" }),
    };
    let verified = state
        .verifier()
        .verify(req.headers().get(&state.auth_header).map(|v| v.as_bytes()))
        .map_err(RequestError::Auth)?;
    metrics::auth_secret_used(verified.secret_index);
    if let Some(cv) = get {
        return cv.answer(verified.organisation_id, req.uri().query()).await;
    }

    let body = read_body(state, req).await?;
    let received_at = chrono::Utc::now();
    let event = match normalise(&body, verified.organisation_id, &state.normalise, received_at) {
        Ok(ev) => ev,
        Err(e) => {
            state.reject(&body, &e, received_at).await?;
            return Err(RequestError::BadBody(e));
        }
    };
    let id = event.id.clone();
    match state.route(event, body).await {
        Ok(Taken::Accepted { routes }) => Ok(accepted(&id, routes)),
        Ok(Taken::Duplicate) => Ok(ok_json(StatusCode::OK, &Answer { status: "duplicate", id: &id, routes: None })),
        Err(refused) => Err(RequestError::Unavailable { reason: refused.reason, retry_after: refused.retry_after }),
    }
}

/// Success answers, with `status` first for people reading them.
#[derive(serde::Serialize)]
struct Answer<'a> {
    status: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    routes: Option<usize>,
}

fn accepted(id: &str, routes: usize) -> Response<Body> {
    ok_json(StatusCode::ACCEPTED, &Answer { status: "accepted", id, routes: Some(routes) })
}

fn ok_json(status: StatusCode, answer: &Answer<'_>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(Bytes::from(serde_json::to_vec(answer).expect("answers serialise"))))
        .expect("static response parts are valid")
}

async fn read_body(state: &State, req: Request<Incoming>) -> Result<Bytes, RequestError> {
    let max = state.max_body_bytes;
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(RequestError::TooLarge(max));
    }
    let collect = Limited::new(req.into_body(), max).collect();
    match tokio::time::timeout(state.request_timeout, collect).await {
        Err(_) => Err(RequestError::Timeout),
        // A copy of its own: the collected body is usually a slice of the connection's read
        // buffer (8 KiB or more), which an event waiting in the spool's queue would otherwise
        // keep alive, and which hyper must then reallocate for the next request.
        Ok(Ok(c)) => Ok(Bytes::copy_from_slice(&c.to_bytes())),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(RequestError::TooLarge(max)),
        Ok(Err(e)) => Err(RequestError::BodyRead(e.to_string())),
    }
}
