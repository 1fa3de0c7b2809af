//! `GET {server.path}`: Webio's Custom Value Request (README "Custom Value Requests and SFTP hooks"). A bot asks for live values with
//! a GET; an authenticated one is forwarded as a GET to `custom_values.upstream` with the query
//! string exactly as received and the configured headers — never the Webio token. A 2xx answer
//! comes back as is (status, content type, body); anything else is an [`UpstreamError`], which
//! [`crate::server::error`] turns into 502 or 504 so that the bot takes its failure branch.
//!
//! 2xx answers are cached per (organisation from the token, query string) for `cache_ttl`, in a
//! bounded cache (entries, bytes, and a largest cacheable body). An upstream answering
//! `Cache-Control: no-store` is not cached. This path never touches the spool or the dedup
//! window: a Custom Value Request is a question, not an event.

use crate::config::custom_values::{CustomValuesConfig, Headers};
use crate::config::Diagnostic;
use crate::metrics;
use crate::server::error::RequestError;
use crate::server::Body;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An upstream answer larger than this is a 502 (a Custom Value answer is a few fields).
pub const MAX_UPSTREAM_BODY: usize = 1 << 20;
/// Cache bounds: entries, total bytes (bodies and keys), and the largest body kept.
const MAX_CACHE_ENTRIES: usize = 1024;
const MAX_CACHE_BYTES: usize = 16 << 20;
const MAX_CACHED_BODY: usize = 64 << 10;

/// Why the upstream gave no usable answer. Logged with detail; the client gets `Display`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("custom value upstream answered {0}")]
    Status(StatusCode),
    #[error("custom value upstream unreachable")]
    Unreachable,
    #[error("custom value upstream answer larger than {0} bytes")]
    TooLarge(usize),
    #[error("custom value upstream did not answer within {0:?}")]
    Timeout(Duration),
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A 2xx answer, as passed back and cached.
#[derive(Clone)]
struct Answer {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

impl Answer {
    fn response(&self) -> Response<Body> {
        let mut resp = Response::new(Full::new(self.body.clone()));
        *resp.status_mut() = self.status;
        if let Some(ct) = &self.content_type {
            resp.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
        }
        resp
    }
}

/// The forwarder, built once at start when `custom_values.upstream` is set.
pub struct CustomValues {
    upstream: String,
    timeout: Duration,
    cache_ttl: Duration,
    headers: Headers,
    client: HttpsClient,
    cache: Mutex<Cache>,
}

impl CustomValues {
    /// `None` when off. Errors were already reported by [`CustomValuesConfig::validate`] at load.
    pub fn new(cfg: &CustomValuesConfig) -> Result<Option<CustomValues>, Diagnostic> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let (uri, headers) =
            cfg.resolve(|k| std::env::var(k).ok()).map_err(|e| Diagnostic::new("configuration", e.join("; ")))?;
        // The same client set-up as the HTTP sink: pooled, https via rustls and Mozilla's roots.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let https =
            hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(https);
        metrics::register_custom_values();
        Ok(Some(CustomValues {
            upstream: uri.to_string(),
            timeout: cfg.timeout,
            cache_ttl: cfg.cache_ttl,
            headers,
            client,
            cache: Mutex::new(Cache::default()),
        }))
    }

    /// Answers one authenticated Custom Value Request.
    pub async fn answer(
        &self,
        organisation: Option<String>,
        query: Option<&str>,
    ) -> Result<Response<Body>, RequestError> {
        let key = Key { organisation, query: query.map(str::to_owned) };
        let caching = !self.cache_ttl.is_zero();
        if caching {
            if let Some(hit) = self.cache.lock().expect("custom value cache lock").get(&key, Instant::now()) {
                metrics::custom_value_request("cached");
                return Ok(hit.response());
            }
        }
        match self.fetch(query).await {
            Ok((answer, no_store)) => {
                metrics::custom_value_request("ok");
                if caching && !no_store {
                    let now = Instant::now();
                    self.cache.lock().expect("custom value cache lock").insert(
                        key,
                        answer.clone(),
                        now,
                        now + self.cache_ttl,
                    );
                }
                Ok(answer.response())
            }
            Err(e) => {
                metrics::custom_value_request(if matches!(e, UpstreamError::Timeout(_)) { "timeout" } else { "error" });
                Err(RequestError::Upstream(e))
            }
        }
    }

    /// One GET to the upstream, bounded by `timeout` as a whole (headers and body).
    async fn fetch(&self, query: Option<&str>) -> Result<(Answer, bool), UpstreamError> {
        let url = match query {
            Some(q) => format!("{}?{q}", self.upstream),
            None => self.upstream.clone(),
        };
        // The query was already parsed as part of the request target: it parses again.
        let uri: Uri = url.parse().map_err(|e| {
            tracing::warn!(error = %e, "custom value request: cannot build the upstream URL");
            UpstreamError::Unreachable
        })?;
        let mut req = Request::get(uri).body(Full::new(Bytes::new())).expect("a GET with a parsed URI is valid");
        let h = req.headers_mut();
        h.insert(header::USER_AGENT, HeaderValue::from_static(concat!("webio-router/", env!("CARGO_PKG_VERSION"))));
        for (name, value) in &self.headers {
            h.insert(name.clone(), value.clone());
        }
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                tracing::warn!(error = %error_chain(&e), "custom value request: upstream unreachable");
                UpstreamError::Unreachable
            })?;
            let status = resp.status();
            if !status.is_success() {
                tracing::warn!(status = status.as_u16(), "custom value request: upstream answered an error");
                return Err(UpstreamError::Status(status));
            }
            let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
            let no_store = resp
                .headers()
                .get_all(header::CACHE_CONTROL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.split(',').any(|d| d.trim().eq_ignore_ascii_case("no-store")));
            let body = match Limited::new(resp.into_body(), MAX_UPSTREAM_BODY).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    tracing::warn!(limit = MAX_UPSTREAM_BODY, "custom value request: upstream answer too large");
                    return Err(UpstreamError::TooLarge(MAX_UPSTREAM_BODY));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "custom value request: cannot read the upstream answer");
                    return Err(UpstreamError::Unreachable);
                }
            };
            Ok((Answer { status, content_type, body }, no_store))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(timeout = ?self.timeout, "custom value request: upstream did not answer in time");
                Err(UpstreamError::Timeout(self.timeout))
            }
        }
    }
}

/// `client error (Connect): tcp connect error: Connection refused`: hyper's own text is short.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    organisation: Option<String>,
    query: Option<String>,
}

impl Key {
    fn bytes(&self) -> usize {
        self.organisation.as_ref().map_or(0, String::len) + self.query.as_ref().map_or(0, String::len)
    }
}

struct Cached {
    answer: Answer,
    expires: Instant,
}

/// Bounded by entries and bytes; when full, expired entries go first, then those expiring
/// soonest (all share one TTL, so that is the oldest).
#[derive(Default)]
struct Cache {
    entries: HashMap<Key, Cached>,
    bytes: usize,
}

impl Cache {
    fn get(&mut self, key: &Key, now: Instant) -> Option<Answer> {
        match self.entries.get(key) {
            Some(c) if c.expires > now => Some(c.answer.clone()),
            Some(_) => {
                self.remove(key);
                None
            }
            None => None,
        }
    }

    fn remove(&mut self, key: &Key) {
        if let Some(c) = self.entries.remove(key) {
            self.bytes -= key.bytes() + c.answer.body.len();
        }
    }

    fn insert(&mut self, key: Key, answer: Answer, now: Instant, expires: Instant) {
        let size = key.bytes() + answer.body.len();
        if answer.body.len() > MAX_CACHED_BODY || size > MAX_CACHE_BYTES {
            return;
        }
        self.remove(&key);
        if self.entries.len() >= MAX_CACHE_ENTRIES || self.bytes + size > MAX_CACHE_BYTES {
            let expired: Vec<Key> =
                self.entries.iter().filter(|(_, c)| c.expires <= now).map(|(k, _)| k.clone()).collect();
            for k in &expired {
                self.remove(k);
            }
        }
        while self.entries.len() >= MAX_CACHE_ENTRIES || self.bytes + size > MAX_CACHE_BYTES {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, c)| c.expires).map(|(k, _)| k.clone()) else {
                break;
            };
            self.remove(&oldest);
        }
        self.bytes += size;
        self.entries.insert(key, Cached { answer, expires });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(q: &str) -> Key {
        Key { organisation: Some("42".into()), query: Some(q.into()) }
    }

    fn answer(len: usize) -> Answer {
        Answer { status: StatusCode::OK, content_type: None, body: Bytes::from(vec![b'x'; len]) }
    }

    #[test]
    fn cached_answers_expire_and_are_kept_per_organisation_and_query() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        c.insert(key("a=1"), answer(3), t0, t0 + Duration::from_secs(30));
        assert!(c.get(&key("a=1"), t0).is_some());
        assert!(c.get(&key("a=2"), t0).is_none());
        assert!(c.get(&Key { organisation: Some("7".into()), query: Some("a=1".into()) }, t0).is_none());
        assert!(c.get(&key("a=1"), t0 + Duration::from_secs(30)).is_none(), "expired at its deadline");
        assert_eq!((c.entries.len(), c.bytes), (0, 0), "an expired entry is dropped when met");
    }

    #[test]
    fn the_cache_is_bounded_by_entries_and_evicts_the_oldest() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        for i in 0..MAX_CACHE_ENTRIES + 10 {
            let expires = t0 + Duration::from_secs(60) + Duration::from_millis(i as u64);
            c.insert(key(&i.to_string()), answer(1), t0, expires);
        }
        assert_eq!(c.entries.len(), MAX_CACHE_ENTRIES);
        assert!(c.get(&key("0"), t0).is_none(), "the oldest went first");
        assert!(c.get(&key(&(MAX_CACHE_ENTRIES + 9).to_string()), t0).is_some());
        // Once full, expired entries make room before live ones are evicted.
        let later = t0 + Duration::from_secs(62);
        c.insert(key("fresh"), answer(1), later, later + Duration::from_secs(60));
        assert_eq!(c.entries.len(), 1, "every other entry had expired");
    }

    #[test]
    fn the_cache_is_bounded_by_bytes_and_skips_large_bodies() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        let expires = t0 + Duration::from_secs(60);
        c.insert(key("big"), answer(MAX_CACHED_BODY + 1), t0, expires);
        assert!(c.entries.is_empty(), "a body over the cacheable size is not kept");
        for i in 0..(MAX_CACHE_BYTES / MAX_CACHED_BODY) + 5 {
            c.insert(key(&i.to_string()), answer(MAX_CACHED_BODY), t0, expires + Duration::from_millis(i as u64));
            assert!(c.bytes <= MAX_CACHE_BYTES);
        }
        let total: usize = c.entries.iter().map(|(k, v)| k.bytes() + v.answer.body.len()).sum();
        assert_eq!(total, c.bytes, "the byte count follows the entries");
    }
}
