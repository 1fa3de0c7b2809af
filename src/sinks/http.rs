//! `http` sink: POSTs each event to a URL with a pooled hyper client (https via rustls).
//! 2xx = delivered; 408, 429, 5xx and connection errors = retryable; other 4xx = permanent.

use super::{check_template, BoxFuture, OptionError, Sink, SinkError};
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

fn default_timeout() -> String {
    "5s".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub url: String,
    #[serde(default = "default_timeout")]
    pub timeout: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub format: Format,
}

impl HttpConfig {
    pub fn validate(&self) -> Vec<OptionError> {
        let mut errs = Vec::new();
        check_template(&mut errs, "url", &self.url, Escape::Url);
        match Template::parse(&self.url, Escape::Url) {
            Ok(t) if t.is_constant() => {
                if let Err(e) = parse_url(&self.url) {
                    errs.push(("url".into(), e));
                }
            }
            // A templated URL must still name a scheme and host before the first field.
            Ok(_) if !(self.url.starts_with("http://") || self.url.starts_with("https://")) => {
                errs.push(("url".into(), "must start with http:// or https://".into()));
            }
            _ => {}
        }
        if let Err(e) = humantime::parse_duration(&self.timeout) {
            errs.push(("timeout".into(), format!("invalid duration {:?}: {e}", self.timeout)));
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

fn parse_url(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.host().is_some() => Ok(uri),
        _ => Err("must be an absolute http:// or https:// URL".into()),
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
}

impl HttpSink {
    pub fn new(name: &str, c: &HttpConfig) -> Result<Self, SinkError> {
        let bad = |e: String| SinkError::permanent(format!("sink {name}: {e}"));
        let url = Template::parse(&c.url, Escape::Url).map_err(|e| bad(e.to_string()))?;
        let timeout = humantime::parse_duration(&c.timeout).map_err(|e| bad(e.to_string()))?;
        let headers = c
            .headers
            .iter()
            .map(|(k, v)| {
                let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| bad(e.to_string()))?;
                Ok((name, Template::parse(v, Escape::None).map_err(|e| bad(e.to_string()))?))
            })
            .collect::<Result<_, SinkError>>()?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let https =
            hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(https);
        Ok(HttpSink { name: name.to_owned(), url, headers, timeout, format: c.format, client })
    }

    fn request(&self, env: &Envelope) -> Result<Request<Full<Bytes>>, SinkError> {
        let url = self.url.render(&env.event);
        let uri = parse_url(&url).map_err(|e| SinkError::permanent(format!("rendered URL {url:?}: {e}")))?;
        let ev = &env.event;
        let mut req = Request::post(uri)
            .header(http::header::CONTENT_TYPE, self.format.content_type())
            .header("idempotency-key", ev.id.as_str())
            .header("x-webio-event-id", ev.id.as_str())
            .body(Full::new(self.format.encode(env)))
            .map_err(|e| SinkError::permanent(e.to_string()))?;
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

    fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let req = self.request(env)?;
            let exchange = async {
                let resp =
                    self.client.request(req).await.map_err(|e| SinkError::retryable(format!("request failed: {e}")))?;
                let status = resp.status();
                let retry_after = resp.headers().get(http::header::RETRY_AFTER).cloned();
                // Read the (small) answer so the connection goes back to the pool.
                let _ = resp.into_body().collect().await;
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
            timeout: "soon".into(),
            headers: [("bad header".to_owned(), "v".to_owned())].into(),
            format: Format::Event,
        };
        let keys: Vec<_> = c.validate().into_iter().map(|(k, _)| k).collect();
        assert!(keys.contains(&"url".to_owned()));
        assert!(keys.contains(&"timeout".to_owned()));
        assert!(keys.contains(&"headers.bad header".to_owned()));
    }
}
