//! `POST {server.path}`: authenticate, read the body, normalise, then [`State::route`] (route
//! and hand to delivery). `GET {server.path}`: a Custom Value Request ([`custom_values`]), when
//! configured; the same token check.

pub mod custom_values;

use super::error::RequestError;
use super::Body;
use crate::event::normalise_envelope;
use crate::event::trace::{TraceParent, HEADER as TRACEPARENT};
use crate::metrics;
use crate::state::{State, Taken};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT_NAME: HeaderName = HeaderName::from_static(TRACEPARENT);

/// The request headers the handler reads, found in one walk over the few headers a webhook
/// has (a lookup by name hashes the name: four of them cost more). Each is the first value of
/// its name, as `HeaderMap::get` gives.
#[derive(Default)]
struct Heads<'a> {
    request_id: Option<&'a HeaderValue>,
    auth: Option<&'a HeaderValue>,
    traceparent: Option<&'a HeaderValue>,
    content_length: Option<&'a HeaderValue>,
}

impl<'a> Heads<'a> {
    fn of(headers: &'a HeaderMap, auth: &HeaderName) -> Self {
        let mut h = Heads::default();
        for (name, value) in headers {
            let first = |slot: &mut Option<&'a HeaderValue>| {
                if slot.is_none() {
                    *slot = Some(value);
                }
            };
            // Not `else if`: the token's header name is configured, and may be any of these.
            if name == auth {
                first(&mut h.auth);
            }
            if name == http::header::CONTENT_LENGTH {
                first(&mut h.content_length);
            }
            if name == TRACEPARENT_NAME {
                first(&mut h.traceparent);
            }
            if name == X_REQUEST_ID {
                first(&mut h.request_id);
            }
        }
        h
    }
}

/// The request id of log lines: the client's `x-request-id` (up to 64 characters), else a
/// counter in hex. Written only when a line needs it.
struct RequestId {
    given: Option<HeaderValue>,
    seq: u64,
}

impl RequestId {
    fn of(given: Option<&HeaderValue>) -> Self {
        let given = given.filter(|v| v.len() <= 64 && v.to_str().is_ok()).cloned();
        RequestId { given, seq: NEXT_REQUEST.fetch_add(1, Ordering::Relaxed) }
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.given.as_ref().and_then(|v| v.to_str().ok()) {
            Some(v) => f.write_str(v),
            None => write!(f, "{:x}", self.seq),
        }
    }
}

pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let (head, body) = req.into_parts();
    let heads = Heads::of(&head.headers, &state.auth_header);
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
    let accepted = accept(&state, &head, &heads, body, &span, &mut event_id, &mut trace).instrument(span.clone()).await;
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
    head: &http::request::Parts,
    heads: &Heads<'_>,
    body: Incoming,
    span: &tracing::Span,
    event_id: &mut Option<String>,
    trace: &mut Option<TraceParent>,
) -> Result<Response<Body>, RequestError> {
    if head.uri.path() != state.path {
        return Err(RequestError::NotFound);
    }
    let custom_values = state.custom_values.as_ref();
    let get = match (&head.method, custom_values) {
        (&Method::POST, _) => None,
        (&Method::GET, Some(cv)) => Some(cv),
        (_, Some(_)) => return Err(RequestError::MethodNotAllowed { allow: "GET, POST" }),
        (_, None) => return Err(RequestError::MethodNotAllowed { allow: "POST" }),
    };
    let verified = state.verifier().verify(heads.auth.map(|v| v.as_bytes())).map_err(RequestError::Auth)?;
    metrics::auth_secret_used(verified.secret_index);
    if let Some(cv) = get {
        // Boxed, as the other rare paths below: what a webhook's task holds (and moves) is
        // sized for the usual path only.
        return Box::pin(cv.answer(verified.organisation_id, head.uri.query())).await;
    }

    // The request's W3C trace context, or a new one: it travels with the event to every sink.
    let context = TraceParent::from_header(heads.traceparent.map(|v| v.as_bytes()));
    let body = read_body(state, heads.content_length, body).await?;
    let received_at = chrono::Utc::now();
    // What is held across the awaits below is kept small (the task's future is moved whole
    // before it runs): the envelope moves into routing before anything is awaited, and a
    // refusal keeps only the reason and the body.
    let routed = normalise_envelope(body, verified.organisation_id, &state.normalise, received_at, context)
        .map(|env| route(state, span, env));
    let (accepted, routing) = match routed {
        Ok(routing) => routing,
        Err((e, body)) => {
            Box::pin(state.reject(&body, &e, received_at)).await?;
            return Err(RequestError::BadBody(e));
        }
    };
    let taken = routing.await;
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

/// Routes `env` (see [`State::route_envelope`]); the answer is written before the event moves
/// on, so no copy of the id is kept for it.
fn route<'a>(
    state: &'a State,
    span: &tracing::Span,
    env: crate::event::Envelope,
) -> (Answer, impl std::future::Future<Output = Result<Taken, crate::delivery::Refused>> + Send + 'a) {
    if !span.is_disabled() {
        span.record("event_id", tracing::field::display(&env.event.id));
        span.record("traceparent", tracing::field::display(&env.trace));
    }
    (Answer::new(&env.event.id), state.route_envelope(env))
}

/// The success answers, `{"status":"accepted","id":"…","routes":N}` and
/// `{"status":"duplicate","id":"…"}` (`status` first for people reading them), written from a
/// template around the id (32 hex digits: nothing to escape) into a buffer of exactly their
/// length, allocated once the answer is known (a `Bytes` made from a full `Vec` needs no
/// allocation of its own).
struct Answer {
    id: AnswerId,
}

/// The event id, kept without an allocation when it is the usual 32 hex digits.
enum AnswerId {
    Hex([u8; 32]),
    Other(String),
}

const ACCEPTED: &[u8] = br#"{"status":"accepted","id":""#;
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
        std::str::from_utf8(self.id_bytes()).unwrap_or_default()
    }

    /// The id's bytes (made from a `str`: UTF-8, not checked again).
    fn id_bytes(&self) -> &[u8] {
        match &self.id {
            AnswerId::Hex(hex) => hex,
            AnswerId::Other(id) => id.as_bytes(),
        }
    }

    fn accepted(self, routes: usize) -> Response<Body> {
        // `routes` in decimal, as serde_json writes an integer.
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
        respond(StatusCode::ACCEPTED, &[ACCEPTED, self.id_bytes(), br#"","routes":"#, &digits[at..], b"}"])
    }

    fn duplicate(self) -> Response<Body> {
        respond(StatusCode::OK, &[DUPLICATE, self.id_bytes(), br#""}"#])
    }
}

/// An answer whose body is `parts` one after the other.
fn respond(status: StatusCode, parts: &[&[u8]]) -> Response<Body> {
    let mut body = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        body.extend_from_slice(part);
    }
    let mut resp = Response::new(http_body_util::Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

async fn read_body(state: &State, content_length: Option<&HeaderValue>, body: Incoming) -> Result<Bytes, RequestError> {
    let max = state.max_body_bytes;
    let declared = content_length.and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(RequestError::TooLarge(max));
    }
    let mut collect = std::pin::pin!(collect(Limited::new(body, max)));
    // A small body usually came with the head: take it without arming a timer.
    let collected = match futures_util::FutureExt::now_or_never(&mut collect) {
        Some(done) => Ok(done),
        None => Box::pin(tokio::time::timeout(state.request_timeout, collect)).await,
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
async fn collect(mut body: Limited<Incoming>) -> Result<Bytes, Box<dyn std::error::Error + Send + Sync>> {
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
