//! One [`Sink`] trait; one module per sink type; one factory from the `type`-tagged
//! `routes.toml` table. Adding a sink = one new module + one [`SinkConfig`] variant.
//!
//! Every delivery outcome is classified once, in the sink: [`SinkError::retryable`] or
//! [`SinkError::permanent`]. The options every type shares (`rate_limit`, `concurrency`) are
//! [`limit`]'s: a built sink is wrapped in them, so both delivery modes honour them.

pub mod amqp;
pub(crate) mod duration;
pub mod file;
pub mod http;
pub mod kafka;
pub mod limit;

use crate::event::Envelope;
use crate::format::Format;
use serde::Deserialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A destination for events. `deliver` resolves once the destination has *confirmed* the
/// event (broker confirm, delivery report, 2xx, flushed write).
pub trait Sink: Send + Sync + 'static {
    fn name(&self) -> &str;

    fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>>;

    /// Delivers a round of events at once (the spool's drain): one result per event, in the
    /// order of `envs`, each exactly what [`Sink::deliver`] of that event would give. The
    /// default delivers them all concurrently, each in its own `delivery` span (see
    /// [`delivery_span`]); a sink that can take a round together (the file sink: one group,
    /// one `fdatasync`) overrides it.
    fn deliver_many<'a>(&'a self, envs: &'a [&'a Envelope]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(futures_util::future::join_all(envs.iter().map(|env| deliver_in_span(self, env))))
    }

    /// Whether the sink believes its destination is reachable (`webio_router_sink_up`).
    fn is_up(&self) -> bool {
        true
    }

    /// Flushes buffered output before shutdown, for at most `timeout`.
    fn flush(&self, _timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Deliveries it takes at once (its `concurrency` option, see [`limit`]); `None`: no bound.
    fn concurrency(&self) -> Option<usize> {
        None
    }

    /// How many deliveries the spool's drain hands the sink at once ([`Sink::deliver_many`])
    /// when its `concurrency` is not set; `None`: the spool's default (16).
    fn round(&self) -> Option<usize> {
        None
    }

    /// The sink's `ordering` option: whether the spool must hold a conversation's later events
    /// back until the earlier ones are delivered or dead-lettered.
    fn ordering(&self) -> SinkOrdering {
        SinkOrdering::None
    }
}

/// The span of one event's delivery: the sink's own log lines carry the event's trace
/// context (at debug: a span per delivery is not made at info).
pub fn delivery_span(env: &Envelope) -> tracing::Span {
    tracing::debug_span!("delivery", event_id = %env.event.id, traceparent = %env.trace)
}

/// `sink.deliver(env)` in the event's [`delivery_span`].
pub async fn deliver_in_span<S: Sink + ?Sized>(sink: &S, env: &Envelope) -> Result<(), SinkError> {
    let span = delivery_span(env);
    if span.is_disabled() {
        sink.deliver(env).await
    } else {
        tracing::Instrument::instrument(sink.deliver(env), span).await
    }
}

/// A sink's `ordering` option (README "Ordering"), parsed once with the sink's table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkOrdering {
    /// No ordering (the default): events are attempted as they come, many at once.
    #[default]
    None,
    /// A conversation's events (same `conversationId`) reach the sink in acceptance order,
    /// even through retries; events without a conversation id are not ordered.
    Conversation,
}

impl SinkOrdering {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkOrdering::None => "none",
            SinkOrdering::Conversation => "conversation",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Worth trying again later (timeouts, 5xx, 408/429, connection errors, broker nacks).
    Retryable,
    /// Will fail the same way every time (4xx, unroutable, message too large): dead letter now.
    Permanent,
}

/// A failed delivery, classified once, in the sink.
///
/// `message` is the whole sentence for a log line or a dead letter's `reason`, cause included
/// (`write var/x.jsonl: No space left on device (os error 28)`), so every reader of it sees the
/// chain. `source` keeps the cause itself, typed, for code that must look into it (an
/// [`std::io::Error`]'s errno) and for error reporters that walk [`std::error::Error::source`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub kind: ErrorKind,
    pub message: String,
    /// The destination asked for this pause (HTTP `Retry-After`).
    pub retry_after: Option<Duration>,
    #[source]
    pub source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl PartialEq for SinkError {
    /// The cause is compared by what it says (errors are not comparable values).
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.message == other.message && self.retry_after == other.retry_after
    }
}

impl Eq for SinkError {}

impl SinkError {
    pub fn retryable(message: impl Into<String>) -> Self {
        SinkError { kind: ErrorKind::Retryable, message: message.into(), retry_after: None, source: None }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        SinkError { kind: ErrorKind::Permanent, message: message.into(), retry_after: None, source: None }
    }

    /// `kind` because of `cause`, which is kept: the message reads `{context}: {cause}: …`,
    /// down the cause's own chain (hyper's "client error (Connect)" says little without the
    /// "Connection refused" under it).
    pub fn caused_by(
        kind: ErrorKind,
        context: impl std::fmt::Display,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let mut message = format!("{context}: {cause}");
        let mut next = cause.source();
        while let Some(e) = next {
            let text = e.to_string();
            // Some errors already print their source.
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            next = e.source();
        }
        SinkError { kind, message, retry_after: None, source: Some(Arc::new(cause)) }
    }

    pub fn is_permanent(&self) -> bool {
        self.kind == ErrorKind::Permanent
    }

    /// The I/O error at the root of this one, if any (to read its errno).
    pub fn io_error(&self) -> Option<&std::io::Error> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = self.source.as_deref().map(|e| e as _);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return Some(io);
            }
            cause = e.source();
        }
        None
    }
}

/// A sink table of `routes.toml`, tagged on `type`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    File(file::FileConfig),
    Http(http::HttpConfig),
    Amqp(amqp::AmqpConfig),
    Kafka(kafka::KafkaConfig),
}

/// The `type` values of a sink table, as [`SinkConfig`] spells them.
pub const TYPES: &[&str] = &["file", "http", "amqp", "kafka"];

impl SinkConfig {
    /// The options of a sink whose `type` is `sink_type`, from its table without the `type`
    /// key; `None` for an unknown type. Unlike the `type`-tagged enum, which buffers the table
    /// first, this keeps the deserializer's position of each error (a misspelt option is
    /// reported at its own line, not at the table header).
    pub fn deserialize_typed<'de, D: serde::Deserializer<'de>>(
        sink_type: &str,
        d: D,
    ) -> Result<Option<SinkConfig>, D::Error> {
        Ok(Some(match sink_type {
            "file" => SinkConfig::File(Deserialize::deserialize(d)?),
            "http" => SinkConfig::Http(Deserialize::deserialize(d)?),
            "amqp" => SinkConfig::Amqp(Deserialize::deserialize(d)?),
            "kafka" => SinkConfig::Kafka(Deserialize::deserialize(d)?),
            _ => return Ok(None),
        }))
    }
}

/// A problem with one option of a sink: `(key, message)`.
pub type OptionError = (String, String);

impl SinkConfig {
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkConfig::File(_) => "file",
            SinkConfig::Http(_) => "http",
            SinkConfig::Amqp(_) => "amqp",
            SinkConfig::Kafka(_) => "kafka",
        }
    }

    pub fn format(&self) -> Format {
        match self {
            SinkConfig::File(c) => c.format,
            SinkConfig::Http(c) => c.format,
            SinkConfig::Amqp(c) => c.format,
            SinkConfig::Kafka(c) => c.format,
        }
    }

    pub fn ordering(&self) -> SinkOrdering {
        match self {
            SinkConfig::File(c) => c.ordering,
            SinkConfig::Http(c) => c.ordering,
            SinkConfig::Amqp(c) => c.ordering,
            SinkConfig::Kafka(c) => c.ordering,
        }
    }

    /// Checks every option (templates, URLs, properties) without connecting anywhere.
    pub fn validate(&self) -> Vec<OptionError> {
        match self {
            SinkConfig::File(c) => c.validate(),
            SinkConfig::Http(c) => c.validate(),
            SinkConfig::Amqp(c) => c.validate(),
            SinkConfig::Kafka(c) => c.validate(),
        }
    }

    /// Builds the sink. Never waits for a broker: a sink whose destination is down starts
    /// anyway, reports itself down and reconnects in the background.
    pub fn build(&self, name: &str) -> Result<Arc<dyn Sink>, SinkError> {
        Ok(match self {
            SinkConfig::File(c) => Arc::new(file::FileSink::new(name, c)?),
            SinkConfig::Http(c) => Arc::new(http::HttpSink::new(name, c)?),
            SinkConfig::Amqp(c) => Arc::new(amqp::AmqpSink::new(name, c)?),
            SinkConfig::Kafka(c) => Arc::new(kafka::KafkaSink::new(name, c)?),
        })
    }
}

/// The options of a sink type that are `{field}` templates.
pub fn template_options(sink_type: &str) -> &'static [&'static str] {
    match sink_type {
        "file" => &["path"],
        "http" => &["url", "headers"],
        "amqp" => &["routing_key"],
        "kafka" => &["topic", "key"],
        _ => &[],
    }
}

/// A duration option of a sink (`"5s"`, `"250ms"`), parsed once at load so that a built sink
/// cannot hold an invalid one. Its errors start with the option's name (`timeout: …`), which
/// routes.toml's diagnostics use to point at that option.
pub(crate) fn duration_option<'de, D: serde::Deserializer<'de>>(key: &str, d: D) -> Result<Duration, D::Error> {
    use serde::de::Error;
    let text = String::deserialize(d).map_err(|e| D::Error::custom(format!("{key}: {e}")))?;
    humantime::parse_duration(text.trim()).map_err(|e| {
        D::Error::custom(format!("{key}: invalid duration {text:?} ({e}); write e.g. \"250ms\", \"10s\", \"5m\""))
    })
}

/// Validates a template option, collecting the error under `key`.
pub(crate) fn check_template(errs: &mut Vec<OptionError>, key: &str, text: &str, escape: crate::template::Escape) {
    if let Err(e) = crate::template::Template::parse(text, escape) {
        errs.push((key.to_owned(), e.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot append")]
    struct Wrapper(#[source] std::io::Error);

    #[test]
    fn a_sink_error_keeps_its_cause_and_says_the_whole_chain() {
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = SinkError::caused_by(ErrorKind::Retryable, "write var/x.jsonl", Wrapper(enospc));
        assert!(!e.is_permanent());
        assert!(e.message.starts_with("write var/x.jsonl: cannot append: No space left on device"), "{e}");
        assert_eq!(e.to_string(), e.message);
        assert_eq!(e.io_error().and_then(std::io::Error::raw_os_error), Some(libc::ENOSPC));
        let source = std::error::Error::source(&e).expect("the cause is the error's source");
        assert_eq!(source.to_string(), "cannot append");
        // The plain constructors stay as they were.
        assert_eq!(SinkError::permanent("HTTP 422").source.is_none(), SinkError::retryable("x").io_error().is_none());
    }
}
