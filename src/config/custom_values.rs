//! `[custom_values]`: where Webio's Custom Value Requests are forwarded (README, "Custom Value
//! Requests"). The forwarder itself is [`crate::server::webhook::custom_values`]; this file holds
//! the settings and their validation, so that loading a configuration needs nothing of the server.

use crate::template::expand_env;
use http::{HeaderName, HeaderValue, Uri};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Upstream headers, values expanded and marked sensitive.
pub type Headers = Vec<(HeaderName, HeaderValue)>;

/// `[custom_values]`. `Debug` prints header names only: values may hold API keys.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CustomValuesConfig {
    /// `""`: off (a GET stays 405).
    pub upstream: String,
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
    /// `"0s"`: no cache.
    #[serde(with = "crate::config::duration")]
    pub cache_ttl: Duration,
    /// Values may use `${NAME}` from the environment, expanded at start.
    pub headers: BTreeMap<String, String>,
}

impl Default for CustomValuesConfig {
    fn default() -> Self {
        CustomValuesConfig {
            upstream: String::new(),
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(30),
            headers: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for CustomValuesConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomValuesConfig")
            .field("upstream", &self.upstream)
            .field("timeout", &self.timeout)
            .field("cache_ttl", &self.cache_ttl)
            .field("headers", &self.headers.keys().map(|k| (k, "[redacted]")).collect::<BTreeMap<_, _>>())
            .finish()
    }
}

impl CustomValuesConfig {
    pub fn enabled(&self) -> bool {
        !self.upstream.is_empty()
    }

    /// Problems as `custom_values.<key>: …` messages; header values are never quoted.
    pub fn validate(&self) -> Vec<String> {
        self.resolve(|k| std::env::var(k).ok()).err().unwrap_or_default()
    }

    /// The upstream URI and the headers with `${NAME}` expanded, or every problem found.
    pub(crate) fn resolve(&self, env: impl Fn(&str) -> Option<String>) -> Result<(Uri, Headers), Vec<String>> {
        let mut errs = Vec::new();
        let upstream = match parse_upstream(&self.upstream) {
            Ok(u) => Some(u),
            Err(e) => {
                errs.push(format!("custom_values.upstream: {e}"));
                None
            }
        };
        if self.timeout.is_zero() {
            errs.push("custom_values.timeout: must be greater than 0".into());
        }
        let mut headers = Vec::new();
        for (k, v) in &self.headers {
            let Ok(name) = HeaderName::from_bytes(k.as_bytes()) else {
                errs.push(format!("custom_values.headers.{k}: not a valid header name"));
                continue;
            };
            match expand_env(v, &env) {
                Ok(v) => match HeaderValue::from_str(&v) {
                    Ok(mut v) => {
                        v.set_sensitive(true);
                        headers.push((name, v));
                    }
                    Err(_) => {
                        errs.push(format!("custom_values.headers.{k}: not a valid header value (value not shown)"))
                    }
                },
                Err(e) => errs.push(format!("custom_values.headers.{k}: {e}")),
            }
        }
        match upstream {
            Some(u) if errs.is_empty() => Ok((u, headers)),
            _ => Err(errs),
        }
    }
}

/// Why `custom_values.upstream` is not usable.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamUrlError {
    #[error("invalid URL {url:?}: {source}")]
    Invalid { url: String, source: http::uri::InvalidUri },
    #[error("must be an absolute http:// or https:// URL")]
    NotHttp,
    #[error("must not hold credentials (user:password@); put them in custom_values.headers")]
    Credentials,
    #[error("{0:?} must not have a query string: the request's query is forwarded as is")]
    Query(String),
}

fn parse_upstream(url: &str) -> Result<Uri, UpstreamUrlError> {
    let uri: Uri = url.parse().map_err(|source| UpstreamUrlError::Invalid { url: url.to_owned(), source })?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.host().is_some() => {}
        _ => return Err(UpstreamUrlError::NotHttp),
    }
    // hyper would silently drop `user:password@`: credentials go in `headers`.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(UpstreamUrlError::Credentials);
    }
    if uri.query().is_some() {
        return Err(UpstreamUrlError::Query(url.to_owned()));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_problems_are_reported_without_header_values() {
        let cfg = CustomValuesConfig {
            upstream: "ftp://h/x?y=1".into(),
            timeout: Duration::ZERO,
            cache_ttl: Duration::ZERO,
            headers: [
                ("x-api-key".to_owned(), "${MISSING_KEY}".to_owned()),
                ("bad header".to_owned(), "v".to_owned()),
                ("x-bad-value".to_owned(), "secret\nvalue".to_owned()),
            ]
            .into(),
        };
        let errs = cfg.resolve(|_| None).unwrap_err().join("\n");
        for want in [
            "custom_values.upstream",
            "custom_values.timeout",
            "custom_values.headers.x-api-key: environment variable MISSING_KEY is not set",
            "custom_values.headers.bad header",
            "custom_values.headers.x-bad-value: not a valid header value (value not shown)",
        ] {
            assert!(errs.contains(want), "{want} in {errs}");
        }
        assert!(!errs.contains("secret"), "{errs}");
        let with_query = CustomValuesConfig { upstream: "http://h/x?y=1".into(), ..Default::default() };
        assert!(with_query.resolve(|_| None).unwrap_err()[0].contains("query"));
        let with_password = CustomValuesConfig { upstream: "http://u:pw@h/x".into(), ..Default::default() };
        let e = with_password.resolve(|_| None).unwrap_err().join("");
        assert!(e.contains("credentials") && !e.contains("pw"), "{e}");
    }

    #[test]
    fn header_values_are_expanded_from_the_environment_and_never_debug_printed() {
        let cfg = CustomValuesConfig {
            upstream: "http://127.0.0.1:9000/values".into(),
            headers: [("x-api-key".to_owned(), "k-${KEY}".to_owned())].into(),
            ..Default::default()
        };
        let (uri, headers) = cfg.resolve(|k| (k == "KEY").then(|| "s3cr3t".to_owned())).unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:9000/values");
        assert_eq!(headers[0].1, "k-s3cr3t");
        assert!(headers[0].1.is_sensitive());
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("${KEY}") && shown.contains("x-api-key"), "{shown}");
    }
}
