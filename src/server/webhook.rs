//! `POST {server.path}`: authenticate, read the body, normalise, then [`State::route`] (route
//! and hand to delivery). `GET {server.path}`: a Custom Value Request ([`custom_values`]), when
//! configured; the same token check.

pub mod custom_values;
#[cfg(test)]
mod tests;

use super::error::RequestError;
use super::Body;
use crate::event::normalise_envelope_or_back;
use crate::event::trace::{TraceParent, HEADER as TRACEPARENT};
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

/// The request id of log lines: the client's `x-request-id` (up to 64 characters), else a
/// counter in hex. Written only when a line needs it.
struct RequestId<'a> {
    given: Option<&'a http::HeaderValue>,
    seq: u64,
}

impl<'a> RequestId<'a> {
    fn of(given: Option<&'a http::HeaderValue>) -> Self {
        let given = given.filter(|v| v.len() <= 64 && v.to_str().is_ok());
        RequestId { given, seq: NEXT_REQUEST.fetch_add(1, Ordering::Relaxed) }
    }
}

impl std::fmt::Display for RequestId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.given.and_then(|v| v.to_str().ok()) {
            Some(v) => f.write_str(v),
            None => write!(f, "{:x}", self.seq),
        }
    }
}

/// The request headers the webhook reads, found in one walk over the few a webhook has (each
/// `HeaderMap::get` hashes its name); each is the first value of its name, as `get` gives.
#[derive(Default)]
struct Heads<'a> {
    request_id: Option<&'a http::HeaderValue>,
    token: Option<&'a http::HeaderValue>,
    traceparent: Option<&'a http::HeaderValue>,
    content_length: Option<&'a http::HeaderValue>,
}

impl<'a> Heads<'a> {
    fn of(headers: &'a http::HeaderMap, auth_header: &http::HeaderName) -> Self {
        const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
        const TRACE: http::HeaderName = http::HeaderName::from_static(TRACEPARENT);
        let mut h = Heads::default();
        for (name, value) in headers {
            let slot = if name == auth_header {
                &mut h.token
            } else if name == http::header::CONTENT_LENGTH {
                &mut h.content_length
            } else if name == X_REQUEST_ID {
                &mut h.request_id
            } else if name == TRACE {
                &mut h.traceparent
            } else {
                continue;
            };
            if slot.is_none() {
                *slot = Some(value);
            }
        }
        h
    }
}

pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let heads = Heads::of(&parts.headers, &state.auth_header);
    let request_id = RequestId::of(heads.request_id);
    // Log lines inside the request carry its request id and, once known, the event id. The
    // span is at debug level: at info and above it is never made (a span costs as much as a
    // third of the request path); the warn lines below name both ids themselves.
    let span = tracing::debug_span!(
        "request",
        request_id = %request_id,
        event_id = tracing::field::Empty,
        traceparent = tracing::field::Empty
    );
    let mut event_id = None;
    let mut trace = None;
    // Not wrapped in the span when it is off (the usual case at info): `Instrumented` would
    // move the whole `accept` future once more and enter/exit the span at each poll.
    let accepted = if span.is_disabled() {
        accept(&state, &parts, &heads, body, &span, &mut event_id, &mut trace).await
    } else {
        accept(&state, &parts, &heads, body, &span, &mut event_id, &mut trace).instrument(span.clone()).await
    };
    let resp = match accepted {
        Ok(resp) => resp,
        Err(e) => {
            match &e {
                RequestError::Auth(a) => metrics::auth_failure(a.reason()),
                RequestError::Unavailable { reason, .. } => {
                    tracing::warn!(request_id = %request_id, event_id = event_id.as_deref().unwrap_or(""), traceparent = trace.map(|t| t.to_string()).unwrap_or_default(), %reason, "webhook refused with 503")
                }
                _ => {}
            }
            e.into_response()
        }
    };
    metrics::request(resp.status().as_u16(), started.elapsed());
    tracing::debug!(request_id = %request_id, status = resp.status().as_u16(), "webhook answered");
    resp
}

async fn accept(
    state: &State,
    parts: &http::request::Parts,
    heads: &Heads<'_>,
    body: Incoming,
    span: &tracing::Span,
    event_id: &mut Option<String>,
    trace: &mut Option<TraceParent>,
) -> Result<Response<Body>, RequestError> {
    if parts.uri.path() != state.path {
        return Err(RequestError::NotFound);
    }
    let custom_values = state.custom_values.as_ref();
    let get = match (&parts.method, custom_values) {
        (&Method::POST, _) => None,
        (&Method::GET, Some(cv)) => Some(cv),
        (_, Some(_)) => return Err(RequestError::MethodNotAllowed { allow: "GET, POST" }),
        (_, None) => return Err(RequestError::MethodNotAllowed { allow: "POST" }),
    };
    let verified = state.verifier().verify(heads.token.map(|v| v.as_bytes())).map_err(RequestError::Auth)?;
    metrics::auth_secret_used(verified.secret_index);
    if let Some(cv) = get {
        return cv.answer(verified.organisation_id, parts.uri.query()).await;
    }

    // The request's W3C trace context, or a new one: it travels with the event to every sink.
    let context = TraceParent::from_header(heads.traceparent.map(|v| v.as_bytes()));
    let body = read_body(state, heads.content_length, body).await?;
    let received_at = chrono::Utc::now();
    let env = match normalise_envelope_or_back(body, verified.organisation_id, &state.normalise, received_at) {
        Ok(env) => env.with_trace(context),
        Err((e, body)) => {
            state.reject(&body, &e, received_at).await?;
            return Err(RequestError::BadBody(e));
        }
    };
    if !span.is_disabled() {
        span.record("event_id", tracing::field::display(&env.event.id));
        span.record("traceparent", tracing::field::display(&env.trace));
    }
    // The answer is written before the event moves on: no copy of the id is kept for it.
    let accepted = Answer::new(&env.event.id);
    let taken = state.route_envelope(env).await;
    match taken {
        Ok(Taken::Accepted { routes }) => Ok(accepted.accepted(routes)),
        Ok(Taken::Duplicate) => Ok(accepted.duplicate()),
        Err(refused) => {
            *event_id = Some(accepted.id().to_owned());
            *trace = Some(context);
            Err(RequestError::Unavailable { reason: refused.reason, retry_after: refused.retry_after })
        }
    }
}

/// The success answers, `{"status":"accepted","id":"…","routes":N}` and
/// `{"status":"duplicate","id":"…"}` (`status` first for people reading them), written from a
/// template around the id (32 hex digits: nothing to escape). The id is kept on the stack until
/// the answer is known, then the body is written once into a buffer of its exact length (a
/// `Vec` with spare room would cost `Bytes::from` an allocation of its own).
struct Answer {
    id: AnswerId,
}

enum AnswerId {
    /// The usual id: 32 hex digits.
    Hex([u8; 32]),
    /// Any other (not made today).
    Other(String),
}

const ACCEPTED: &[u8] = br#"{"status":"accepted","id":""#;
const ROUTES: &[u8] = br#"","routes":"#;
const DUPLICATE: &[u8] = br#"{"status":"duplicate","id":""#;

impl Answer {
    fn new(id: &str) -> Self {
        let id = match <[u8; 32]>::try_from(id.as_bytes()) {
            Ok(hex) => AnswerId::Hex(hex),
            Err(_) => AnswerId::Other(id.to_owned()),
        };
        Answer { id }
    }

    fn id(&self) -> &str {
        match &self.id {
            AnswerId::Hex(hex) => std::str::from_utf8(hex).unwrap_or_default(),
            AnswerId::Other(id) => id,
        }
    }

    /// The id's bytes for the body, without [`Answer::id`]'s UTF-8 check (the hex digits came
    /// from a `str`).
    fn id_bytes(&self) -> &[u8] {
        match &self.id {
            AnswerId::Hex(hex) => hex,
            AnswerId::Other(id) => id.as_bytes(),
        }
    }

    fn accepted(self, routes: usize) -> Response<Body> {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut n = routes;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let id = self.id_bytes();
        let mut buf = Vec::with_capacity(ACCEPTED.len() + id.len() + ROUTES.len() + (digits.len() - at) + 1);
        buf.extend_from_slice(ACCEPTED);
        buf.extend_from_slice(id);
        buf.extend_from_slice(ROUTES);
        buf.extend_from_slice(&digits[at..]);
        buf.push(b'}');
        respond(StatusCode::ACCEPTED, buf)
    }

    fn duplicate(self) -> Response<Body> {
        let id = self.id_bytes();
        let mut buf = Vec::with_capacity(DUPLICATE.len() + id.len() + 2);
        buf.extend_from_slice(DUPLICATE);
        buf.extend_from_slice(id);
        buf.extend_from_slice(br#""}"#);
        respond(StatusCode::OK, buf)
    }
}

fn respond(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(http_body_util::Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

async fn read_body(
    state: &State,
    content_length: Option<&http::HeaderValue>,
    body: Incoming,
) -> Result<Bytes, RequestError> {
    let max = state.max_body_bytes;
    let declared = content_length.and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(RequestError::TooLarge(max));
    }
    let mut collect = std::pin::pin!(collect(Limited::new(body, max)));
    // A small body usually came with the head: take it without arming a timer.
    let collected = match futures_util::FutureExt::now_or_never(&mut collect) {
        Some(done) => Ok(done),
        None => tokio::time::timeout(state.request_timeout, collect).await,
    };
    match collected {
        Err(_) => Err(RequestError::Timeout),
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(RequestError::TooLarge(max)),
        Ok(Err(e)) => Err(RequestError::BodyRead(e.to_string())),
    }
}

/// The whole body in a buffer of its own: a copy, since a frame is usually a slice of the
/// connection's read buffer (8 KiB or more), which an event waiting in the spool's queue would
/// otherwise keep alive, and which hyper must then reallocate for the next request. The usual
/// single frame is copied once, without `Collected`'s list of frames.
async fn collect(body: Limited<Incoming>) -> Result<Bytes, Box<dyn std::error::Error + Send + Sync>> {
    let mut body = std::pin::pin!(body);
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if buf.is_empty() {
                // Exactly the first frame (usually the whole body): not what the client
                // declared, which a slow sender could make us hold for nothing.
                buf.reserve_exact(data.len());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}
