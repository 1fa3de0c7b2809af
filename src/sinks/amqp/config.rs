//! The `[sinks.<name>]` table of an `amqp` sink.
//!
//! Typed at load: the URL is parsed (and its password kept out of `Debug`), the exchange type
//! is one of four, durations are [`Duration`]s. What needs the sink's rules (reserved exchange
//! names, the routing-key template, the CA file) is checked by [`AmqpConfig::validate`], which
//! reports each problem under its key.

use super::super::{check_template, OptionError};
use crate::format::Format;
use crate::template::Escape;
use lapin::types::ShortString;
use lapin::uri::AMQPUri;
use lapin::ExchangeKind;
use serde::{Deserialize, Deserializer};
use std::path::PathBuf;
use std::time::Duration;

pub(crate) use crate::tls::read_ca_file;

fn yes() -> bool {
    true
}
fn default_routing_key() -> String {
    "webio.{type}".into()
}
fn default_confirm_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_wait() -> Duration {
    Duration::from_secs(1)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    pub url: AmqpUrl,
    pub exchange: String,
    #[serde(default)]
    pub exchange_type: ExchangeType,
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
    #[serde(default = "yes")]
    pub declare: bool,
    #[serde(default = "yes")]
    pub mandatory: bool,
    #[serde(default)]
    pub format: Format,
    /// How long one publish may wait for its publisher confirm before it counts as failed
    /// (retryable; the event may then reach the broker twice).
    #[serde(default = "default_confirm_timeout", with = "crate::sinks::duration")]
    pub confirm_timeout: Duration,
    /// How long a delivery waits for the connection when the sink is (re)connecting before
    /// failing with a retryable error.
    #[serde(default = "default_connect_wait", with = "crate::sinks::duration")]
    pub connect_wait: Duration,
    /// Upper bound of the reconnect backoff (it starts at 200 ms and doubles, with jitter).
    #[serde(default = "default_reconnect_max", with = "crate::sinks::duration")]
    pub reconnect_max: Duration,
    /// PEM file of CA certificates trusted for `amqps://`, in addition to the public roots
    /// (webpki-roots): for a broker whose certificate a private CA signed.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// `"conversation"`: a conversation's events reach this sink in acceptance order.
    #[serde(default)]
    pub ordering: crate::sinks::SinkOrdering,
}

impl AmqpConfig {
    /// Every option checked, the CA file read; nothing connects.
    pub fn validate(&self) -> Vec<OptionError> {
        let mut errs = self.check_options();
        if let Some(path) = &self.tls_ca_file {
            if let Err(e) = read_ca_file(path) {
                errs.push(("tls_ca_file".into(), e.to_string()));
            }
        }
        errs
    }

    /// The options on their own, without reading files.
    pub(crate) fn check_options(&self) -> Vec<OptionError> {
        let mut errs = Vec::new();
        if ShortString::try_new(self.exchange.as_str()).is_err() {
            errs.push(("exchange".into(), "longer than 255 bytes".into()));
        }
        if self.declare && self.exchange.starts_with("amq.") {
            errs.push((
                "exchange".into(),
                "exchanges named amq.* are reserved to the broker and cannot be declared; set declare = false".into(),
            ));
        }
        check_template(&mut errs, "routing_key", &self.routing_key, Escape::None);
        if self.tls_ca_file.is_some() && !self.url.is_tls() {
            errs.push(("tls_ca_file".into(), "only used with an amqps:// URL".into()));
        }
        errs
    }
}

/// Why an AMQP URL is refused.
#[derive(Debug, thiserror::Error)]
pub enum AmqpUrlError {
    #[error("must start with amqp:// or amqps://")]
    Scheme,
    /// lapin's parser reports its reasons as text.
    #[error("invalid AMQP URL: {0}")]
    Lapin(String),
    #[error("invalid AMQP URL: {0}")]
    Url(#[from] url::ParseError),
    #[error("invalid AMQP URL: no host")]
    NoHost,
}

/// `exchange_type`: how the exchange routes, used when declaring it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    Direct,
    Fanout,
    #[default]
    Topic,
    Headers,
}

impl ExchangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Topic => "topic",
            ExchangeType::Headers => "headers",
        }
    }

    pub(crate) fn kind(self) -> ExchangeKind {
        match self {
            ExchangeType::Direct => ExchangeKind::Direct,
            ExchangeType::Fanout => ExchangeKind::Fanout,
            ExchangeType::Topic => ExchangeKind::Topic,
            ExchangeType::Headers => ExchangeKind::Headers,
        }
    }
}

/// An `amqp://` or `amqps://` URL, parsed at load. `Debug` hides the password.
#[derive(Clone, PartialEq)]
pub struct AmqpUrl {
    text: String,
    uri: AMQPUri,
}

impl AmqpUrl {
    pub fn parse(text: &str) -> Result<AmqpUrl, AmqpUrlError> {
        Ok(AmqpUrl { text: text.to_owned(), uri: parse_url(text)? })
    }

    pub fn uri(&self) -> &AMQPUri {
        &self.uri
    }

    pub fn is_tls(&self) -> bool {
        self.uri.scheme == lapin::uri::AMQPScheme::AMQPS
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match url::Url::parse(&self.text) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                write!(f, "{:?}", u.as_str())
            }
            _ => write!(f, "{:?}", self.text),
        }
    }
}

impl PartialEq<&str> for AmqpUrl {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl<'de> Deserialize<'de> for AmqpUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        AmqpUrl::parse(&text).map_err(|e| serde::de::Error::custom(format!("url: {e}")))
    }
}

/// `frame_max` asked for when the URL names none. lapin keeps two I/O buffers of 32 frames
/// each, sized by the negotiated frame size: with RabbitMQ's default (128 KiB) that is 8 MiB
/// of resident memory per connection, for events of a few KiB. A larger message is simply
/// sent as several body frames.
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// Parses an `amqp://` or `amqps://` URL with lapin's own parser; `frame_max` defaults to
/// [`DEFAULT_FRAME_MAX`].
pub(crate) fn parse_url(url: &str) -> Result<AMQPUri, AmqpUrlError> {
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(AmqpUrlError::Scheme);
    }
    let mut uri: AMQPUri = url.parse().map_err(AmqpUrlError::Lapin)?;
    // amq-protocol-uri only keeps host *names* and turns an IP address into "localhost";
    // put the address back.
    let parsed = url::Url::parse(url)?;
    match parsed.host() {
        Some(url::Host::Ipv4(ip)) => uri.authority.host = ip.to_string(),
        Some(url::Host::Ipv6(ip)) => uri.authority.host = ip.to_string(),
        Some(url::Host::Domain(_)) => {}
        None => return Err(AmqpUrlError::NoHost),
    }
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_ip_addresses_and_refuse_other_schemes() {
        let uri = parse_url("amqp://guest:guest@127.0.0.1:5673/%2f").unwrap();
        assert_eq!(uri.authority.host, "127.0.0.1");
        assert_eq!(uri.authority.port, 5673);
        assert_eq!(uri.vhost, "/");
        assert_eq!(parse_url("amqps://rabbit.example/").unwrap().authority.host, "rabbit.example");
        assert_eq!(parse_url("amqp://[::1]:5672/").unwrap().authority.host, "::1");
        assert!(parse_url("http://127.0.0.1/").is_err());
        assert!(parse_url("amqp://127.0.0.1:notaport/").is_err());
        assert!(parse_url("amqp://127.0.0.1/?heartbeat=soon").is_err());
    }

    #[test]
    fn frame_max_defaults_to_a_small_frame_unless_the_url_names_one() {
        assert_eq!(parse_url("amqp://127.0.0.1/").unwrap().query.frame_max, Some(DEFAULT_FRAME_MAX));
        assert_eq!(parse_url("amqp://127.0.0.1/?frame_max=131072").unwrap().query.frame_max, Some(131072));
    }

    #[test]
    fn the_url_password_never_shows_in_debug_output() {
        let url = AmqpUrl::parse("amqps://webio:s3cret-pw@rabbit.example:5671/%2f").unwrap();
        let shown = format!("{url:?}");
        assert!(!shown.contains("s3cret-pw") && shown.contains("webio:***@rabbit.example"), "{shown}");
        assert!(url.is_tls());
        assert!(!AmqpUrl::parse("amqp://h/").unwrap().is_tls());
    }

    fn table(extra: &str) -> Result<AmqpConfig, toml::de::Error> {
        toml::from_str(&format!("url = \"amqp://127.0.0.1/\"\nexchange = \"x\"\n{extra}"))
    }

    #[test]
    fn durations_and_the_exchange_type_are_typed_at_load() {
        let c = table("confirm_timeout = \"3s\"\nconnect_wait = \"250ms\"\nexchange_type = \"fanout\"").unwrap();
        assert_eq!(c.confirm_timeout, Duration::from_secs(3));
        assert_eq!(c.connect_wait, Duration::from_millis(250));
        assert_eq!(c.reconnect_max, Duration::from_secs(10));
        assert_eq!(c.exchange_type, ExchangeType::Fanout);

        let e = table("reconnect_max = \"often\"").unwrap_err().to_string();
        assert!(e.contains("invalid duration \"often\""), "{e}");
        let e = table("exchange_type = \"topical\"").unwrap_err().to_string();
        assert!(e.contains("direct") && e.contains("headers"), "{e}");
    }
}
