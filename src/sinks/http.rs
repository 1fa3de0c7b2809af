//! `http` sink: POSTs each event to a URL with a pooled hyper client (https via rustls).
//! 2xx = delivered; 408, 429, 5xx and connection errors = retryable; other 4xx = permanent.
//! The answer's body is read up to [`MAX_ANSWER_BYTES`] and discarded: only the status
//! counts, and a huge answer must cost neither memory nor time.

use super::{check_template, BoxFuture, ErrorKind, OptionError, Sink, SinkError};
use crate::event::Envelope;
use crate::format::Format;
use crate::template::{Escape, Template};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub url: String,
    /// The whole exchange: connect, send, status line (`"5s"`, `"250ms"`).
    #[serde(default = "default_timeout", deserialize_with = "timeout_option")]
    pub timeout: Duration,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub format: Format,
    /// `"conversation"`: a conversation's events reach this sink in acceptance order.
    #[serde(default)]
    pub ordering: crate::sinks::SinkOrdering,
}

impl HttpConfig {
    pub fn validate(&self) -> Vec<OptionError> {
        let mut errs = Vec::new();
        check_template(&mut errs, "url", &self.url, Escape::Url);
        match Template::parse(&self.url, Escape::Url) {
            Ok(t) if t.is_constant() => {
                if let Err(e) = parse_url(&self.url) {
                    errs.push(("url".into(), e.to_string()));
                }
            }
            // A templated URL must still name a scheme and host before the first field.
            Ok(_) if !(self.url.starts_with("http://") || self.url.starts_with("https://")) => {
                errs.push(("url".into(), "must start with http:// or https://".into()));
            }
            _ => {}
        }
        if self.timeout.is_zero() {
            errs.push(("timeout".into(), "must be greater than 0".into()));
        }
        for (k, v) in &self.headers {
            if HeaderName::from_bytes(k.as_bytes()).is_err() {
                errs.push((format!("headers.{k}"), "not a valid header name".into()));
            }
            check_template(&mut errs, &format!("headers.{k}"), v, Escape::None);
        }
        errs
    }
}

/// `timeout`, parsed once at load; its errors name the option.
fn timeout_option<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    super::duration_option("timeout", d)
}

/// Why a (rendered) sink URL is refused.
#[derive(Debug, thiserror::Error)]
enum UrlError {
    #[error("invalid URL: {0}")]
    Invalid(#[from] http::uri::InvalidUri),
    #[error("must be an absolute http:// or https:// URL")]
    NotHttp,
}

fn parse_url(url: &str) -> Result<http::Uri, UrlError> {
    let uri: http::Uri = url.parse()?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.host().is_some() => Ok(uri),
        _ => Err(UrlError::NotHttp),
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct HttpSink {
    name: String,
    url: Template,
    headers: Vec<(HeaderName, Template)>,
    timeout: Duration,
    format: Format,
    client: HttpsClient,
    ordering: crate::sinks::SinkOrdering,
}

impl HttpSink {
    pub fn new(name: &str, c: &HttpConfig) -> Result<Self, SinkError> {
        let bad = |e: String| SinkError::permanent(format!("sink {name}: {e}"));
        let url = Template::parse(&c.url, Escape::Url).map_err(|e| bad(e.to_string()))?;
        let headers = c
            .headers
            .iter()
            .map(|(k, v)| {
                let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| bad(e.to_string()))?;
                Ok((name, Template::parse(v, Escape::None).map_err(|e| bad(e.to_string()))?))
            })
            .collect::<Result<_, SinkError>>()?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(crate::tls::provider())
            .map_err(|e| bad(format!("TLS: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(https);
        Ok(HttpSink {
            name: name.to_owned(),
            url,
            headers,
            timeout: c.timeout,
            format: c.format,
            client,
            ordering: c.ordering,
        })
    }

    fn request(&self, env: &Envelope) -> Result<Request<Full<Bytes>>, SinkError> {
        let url = self.url.render(&env.event);
        let uri = parse_url(&url).map_err(|e| SinkError::permanent(format!("rendered URL {url:?}: {e}")))?;
        let ev = &env.event;
        let mut req = Request::post(uri)
            .header(http::header::CONTENT_TYPE, self.format.content_type())
            .header("idempotency-key", ev.id.as_str())
            .header("x-webio-event-id", ev.id.as_str())
            .header(crate::event::trace::HEADER, env.trace.to_string())
            .body(Full::new(self.format.encode(env)))
            .map_err(|e| SinkError::caused_by(ErrorKind::Permanent, "request", e))?;
        let h = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&ev.event_type) {
            h.insert("x-webio-event-type", v);
        }
        for (name, value) in &self.headers {
            let v = HeaderValue::from_str(&value.render(ev)).map_err(|_| {
                SinkError::permanent(format!("header {name}: rendered value is not a valid header value"))
            })?;
            h.insert(name.clone(), v);
        }
        Ok(req)
    }
}

/// Bytes of an answer's body read (and discarded) at most. Reading a small answer to its end
/// lets the connection go back to the pool; a longer one is cut off, and its connection
/// closed, rather than read whole.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Reads and drops up to [`MAX_ANSWER_BYTES`] of `body`, frame by frame (never held whole).
async fn discard<B: hyper::body::Body + Unpin>(mut body: B) {
    let mut read = 0usize;
    while read <= MAX_ANSWER_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, bytes::Buf::remaining),
            // The end, or a broken answer: the status has already decided.
            _ => return,
        }
    }
}

/// 2xx ok; 408/429/5xx retryable; every other status permanent.
pub fn classify(status: StatusCode, retry_after: Option<&HeaderValue>) -> Result<(), SinkError> {
    if status.is_success() {
        return Ok(());
    }
    let message = format!("HTTP {status}");
    let mut err =
        if status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
        {
            SinkError::retryable(message)
        } else {
            SinkError::permanent(message)
        };
    err.retry_after = retry_after.and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
    Err(err)
}

/// `Retry-After` in seconds or as an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v.trim()).ok()?;
    (when.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok()
}

impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn ordering(&self) -> crate::sinks::SinkOrdering {
        self.ordering
    }

    fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let req = self.request(env)?;
            let exchange = async {
                let resp = self
                    .client
                    .request(req)
                    .await
                    .map_err(|e| SinkError::caused_by(ErrorKind::Retryable, "request failed", e))?;
                let status = resp.status();
                let retry_after = resp.headers().get(http::header::RETRY_AFTER).cloned();
                let announced =
                    resp.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                // A body announced too long is not read at all: dropping it closes the connection.
                if !matches!(announced, Some(n) if n > MAX_ANSWER_BYTES as u64) {
                    discard(resp.into_body()).await;
                }
                classify(status, retry_after.as_ref())
            };
            match tokio::time::timeout(self.timeout, exchange).await {
                Ok(r) => r,
                Err(_) => Err(SinkError::retryable(format!("no answer within {:?}", self.timeout))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert!(classify(StatusCode::OK, None).is_ok());
        assert!(classify(StatusCode::NO_CONTENT, None).is_ok());
        for s in [408, 429, 500, 502, 503] {
            let e = classify(StatusCode::from_u16(s).unwrap(), None).unwrap_err();
            assert!(!e.is_permanent(), "{s}");
        }
        for s in [400, 401, 404, 410, 422] {
            let e = classify(StatusCode::from_u16(s).unwrap(), None).unwrap_err();
            assert!(e.is_permanent(), "{s}");
        }
    }

    #[test]
    fn retry_after_is_read() {
        let e = classify(StatusCode::SERVICE_UNAVAILABLE, Some(&HeaderValue::from_static("7"))).unwrap_err();
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
    }

    #[test]
    fn bad_options_are_reported() {
        let c = HttpConfig {
            url: "ftp://x/{nope}".into(),
            timeout: Duration::ZERO,
            headers: [("bad header".to_owned(), "v".to_owned())].into(),
            format: Format::Event,
            ordering: Default::default(),
        };
        let keys: Vec<_> = c.validate().into_iter().map(|(k, _)| k).collect();
        assert!(keys.contains(&"url".to_owned()));
        assert!(keys.contains(&"timeout".to_owned()));
        assert!(keys.contains(&"headers.bad header".to_owned()));
    }

    #[test]
    fn the_timeout_is_parsed_once_at_load_and_a_bad_one_names_the_option() {
        let c: HttpConfig = toml::from_str("url = \"http://h/\"\ntimeout = \"250ms\"").unwrap();
        assert_eq!(c.timeout, Duration::from_millis(250));
        let c: HttpConfig = toml::from_str("url = \"http://h/\"").unwrap();
        assert_eq!(c.timeout, Duration::from_secs(5));
        let e = toml::from_str::<HttpConfig>("url = \"http://h/\"\ntimeout = \"soon\"").unwrap_err();
        assert!(e.message().starts_with("timeout: invalid duration \"soon\""), "{}", e.message());
    }
}
