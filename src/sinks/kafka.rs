//! `kafka` sink (rdkafka / librdkafka).
//!
//! - One idempotent `FutureProducer` (`enable.idempotence=true`, `acks=all`), created at once:
//!   librdkafka connects in the background, so a broker that is down at start only delays the
//!   first deliveries.
//! - A delivery counts only when its delivery report says the broker acknowledged it; the
//!   report's error is classified retryable (timeouts, transport errors, leader changes, …) or
//!   permanent (message too large, invalid message, authorization failures, …).
//! - When librdkafka's queue is full (`queue.buffering.max.messages` / `.kbytes`, e.g. while
//!   the brokers are away), a delivery waits up to `queue_timeout` for room instead of
//!   dropping the message or growing memory without bound; then it fails as retryable.
//! - After a fatal idempotent-producer error the producer is replaced by a fresh one.

use super::{check_template, BoxFuture, OptionError, Sink, SinkError};
use crate::event::Envelope;
use crate::format::Format;
use crate::template::{Escape, Template};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

fn default_key() -> String {
    "{conversationId}".into()
}
fn default_queue_timeout() -> String {
    "10s".into()
}

/// A librdkafka property value as written in `routes.toml`: a string, an integer, a float or
/// a boolean (`"linger.ms" = 5`, `"enable.ssl.certificate.verification" = false`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl std::fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropertyValue::Bool(b) => write!(f, "{b}"),
            PropertyValue::Int(i) => write!(f, "{i}"),
            PropertyValue::Float(x) => write!(f, "{x}"),
            PropertyValue::Str(s) => f.write_str(s),
        }
    }
}

impl From<&str> for PropertyValue {
    fn from(s: &str) -> Self {
        PropertyValue::Str(s.to_owned())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    #[serde(default = "default_key")]
    pub key: String,
    #[serde(default)]
    pub properties: BTreeMap<String, PropertyValue>,
    #[serde(default)]
    pub format: Format,
    /// How long a delivery waits for room in librdkafka's queue when it is full.
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout: String,
}

/// Defaults the sink sets before the user's `properties` (which may override them).
const DEFAULTS: &[(&str, &str)] = &[
    // A delivery report (success or failure) within 30 s, rather than hanging forever.
    ("message.timeout.ms", "30000"),
    // Feeds is_up (see KafkaContext::stats_raw).
    ("statistics.interval.ms", "5000"),
    ("client.id", "webio-router"),
];

/// Set last, after the user's `properties`; `validate` refuses values that contradict them.
const ENFORCED: &[(&str, &str)] = &[("enable.idempotence", "true"), ("acks", "all")];

impl KafkaConfig {
    /// Every option checked, including librdkafka's cross-property checks (which need a
    /// throwaway client, offline).
    pub fn validate(&self) -> Vec<OptionError> {
        let mut errs = self.validate_options();
        if errs.is_empty() {
            // Cross-property checks happen when a client is created. Without bootstrap.servers
            // the client has nobody to connect to, so this stays offline.
            let mut cfg = self.client_config();
            cfg.remove("bootstrap.servers");
            cfg.set("statistics.interval.ms", "0");
            cfg.set_log_level(RDKafkaLogLevel::Emerg);
            if let Err(e) = cfg.create::<BaseProducer>() {
                errs.push(("properties".into(), librdkafka_message(&e)));
            }
        }
        errs
    }

    /// Each option on its own, without creating a client.
    fn validate_options(&self) -> Vec<OptionError> {
        let mut errs = Vec::new();
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            errs.push(("brokers".into(), "must name at least one broker (host:port[,host:port…])".into()));
        } else if self.brokers.split(',').any(|b| b.trim().is_empty()) {
            errs.push(("brokers".into(), "empty entry in the broker list".into()));
        }
        check_template(&mut errs, "topic", &self.topic, Escape::Topic);
        if let Err(e) = check_topic_literals(&self.topic) {
            errs.push(("topic".into(), e));
        }
        check_template(&mut errs, "key", &self.key, Escape::None);
        if let Err(e) = humantime::parse_duration(&self.queue_timeout) {
            errs.push(("queue_timeout".into(), format!("invalid duration {:?}: {e}", self.queue_timeout)));
        }
        errs.extend(self.check_properties());
        errs
    }

    fn check_properties(&self) -> Vec<OptionError> {
        let mut errs = Vec::new();
        for (k, v) in &self.properties {
            let key = format!("properties.{k}");
            let value = v.to_string();
            match k.as_str() {
                "bootstrap.servers" | "metadata.broker.list" => {
                    errs.push((key, "set the brokers with the sink's `brokers` option".into()));
                    continue;
                }
                "acks" | "request.required.acks" if !matches!(value.as_str(), "all" | "-1") => {
                    errs.push((
                        key,
                        "must be \"all\": a delivery counts only when every in-sync replica has it".into(),
                    ));
                    continue;
                }
                "enable.idempotence" if value != "true" => {
                    errs.push((key, "must stay true: retries must not duplicate or reorder events".into()));
                    continue;
                }
                "transactional.id" => {
                    errs.push((key, "transactions are not supported by this sink".into()));
                    continue;
                }
                _ => {}
            }
            // librdkafka's own check of the name and the value.
            if let Err(e) = ClientConfig::new().set(k.as_str(), value).create_native_config() {
                errs.push((key, librdkafka_message(&e)));
            }
        }
        errs
    }

    /// The librdkafka configuration: defaults, then `properties`, then the enforced settings.
    fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        for (k, v) in DEFAULTS {
            cfg.set(*k, *v);
        }
        cfg.set("bootstrap.servers", self.brokers.trim());
        for (k, v) in &self.properties {
            cfg.set(k.as_str(), v.to_string());
        }
        for (k, v) in ENFORCED {
            cfg.set(*k, *v);
        }
        cfg
    }
}

fn librdkafka_message(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, desc, _, _) => desc.clone(),
        KafkaError::ClientCreation(msg) => msg.clone(),
        other => other.to_string(),
    }
}

/// The literal parts of a topic template must be valid topic-name characters (the fields are
/// escaped at render time).
fn check_topic_literals(text: &str) -> Result<(), String> {
    let mut in_field = false;
    for c in text.chars() {
        match c {
            '{' => in_field = true,
            '}' => in_field = false,
            c if !(in_field || c.is_ascii_alphanumeric() || "._-".contains(c)) => {
                return Err(format!("{c:?} cannot appear in a Kafka topic name (allowed: A-Z a-z 0-9 . _ -)"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A rendered topic name Kafka accepts.
fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic == "." || topic == ".." {
        return Err(format!("rendered topic {topic:?} is not a valid topic name"));
    }
    if topic.len() > 249 {
        return Err(format!("rendered topic is {} characters long (Kafka allows 249)", topic.len()));
    }
    Ok(())
}

/// Is this delivery error worth retrying?
pub fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::UnsupportedForMessageFormat
            | C::PolicyViolation
            | C::InvalidRequiredAcks
            | C::InvalidArgument
            | C::UnknownPartition
            | C::KeySerialization
            | C::ValueSerialization
    )
}

/// Shared between the sink and librdkafka's callbacks.
struct Status {
    name: String,
    up: AtomicBool,
    /// The sink was dropped (a reload may run its successor under the same name): callbacks
    /// that still fire while the producer shuts down must not touch the metric.
    retired: AtomicBool,
}

impl Status {
    fn set_up(&self, up: bool) {
        if self.retired.load(Ordering::Acquire) {
            return;
        }
        if self.up.swap(up, Ordering::AcqRel) != up {
            crate::metrics::sink_up(&self.name, up);
            if up {
                tracing::info!(sink = %self.name, "Kafka brokers reachable");
            } else {
                tracing::warn!(sink = %self.name, "Kafka brokers unreachable");
            }
        }
    }
}

/// librdkafka callbacks: logs go to tracing; errors and statistics drive `is_up`.
struct KafkaContext {
    status: Arc<Status>,
}

#[derive(Deserialize)]
struct Stats {
    #[serde(default)]
    brokers: BTreeMap<String, BrokerStats>,
}

#[derive(Deserialize)]
struct BrokerStats {
    state: String,
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let sink = self.status.name.as_str();
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(sink, facility = fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(sink, facility = fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(sink, facility = fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(sink, facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.status.set_up(false);
        }
        tracing::warn!(sink = %self.status.name, error = %error, "librdkafka: {reason}");
    }

    fn stats_raw(&self, statistics: &[u8]) {
        if let Ok(stats) = serde_json::from_slice::<Stats>(statistics) {
            if !stats.brokers.is_empty() {
                self.status.set_up(stats.brokers.values().any(|b| b.state == "UP"));
            }
        }
    }
}

type Kp = FutureProducer<KafkaContext>;

/// A producer that is dropped on a blocking thread: librdkafka's destructor purges, flushes
/// for up to 500 ms and joins its threads.
struct ProducerHandle(Option<Kp>);

impl ProducerHandle {
    fn get(&self) -> &Kp {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for ProducerHandle {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(move || drop(p))),
                Err(_) => drop(p),
            }
        }
    }
}

pub struct KafkaSink {
    status: Arc<Status>,
    config: ClientConfig,
    producer: RwLock<Arc<ProducerHandle>>,
    topic: Template,
    key: Template,
    format: Format,
    queue_timeout: Duration,
}

impl KafkaSink {
    /// Creates the producer; librdkafka connects in the background (never waits here).
    pub fn new(name: &str, c: &KafkaConfig) -> Result<Self, SinkError> {
        let bad = |e: String| SinkError::permanent(format!("sink {name}: {e}"));
        // The cross-property checks are made by creating the producer below, not by a
        // throwaway client as in `validate` (routes.toml was validated before this).
        if let Some((key, msg)) = c.validate_options().into_iter().next() {
            return Err(bad(format!("{key}: {msg}")));
        }
        let topic = Template::parse(&c.topic, Escape::Topic).map_err(|e| bad(format!("topic: {e}")))?;
        let key = Template::parse(&c.key, Escape::None).map_err(|e| bad(format!("key: {e}")))?;
        let queue_timeout =
            humantime::parse_duration(&c.queue_timeout).map_err(|e| bad(format!("queue_timeout: {e}")))?;
        let status =
            Arc::new(Status { name: name.to_owned(), up: AtomicBool::new(false), retired: AtomicBool::new(false) });
        crate::metrics::sink_up(name, false);
        let config = c.client_config();
        let producer =
            create_producer(&config, &status).map_err(|e| bad(format!("properties: {}", librdkafka_message(&e))))?;
        Ok(KafkaSink {
            status,
            config,
            producer: RwLock::new(Arc::new(producer)),
            topic,
            key,
            format: c.format,
            queue_timeout,
        })
    }

    fn producer(&self) -> Arc<ProducerHandle> {
        self.producer.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// After a fatal error librdkafka refuses every further message: start a new producer
    /// (once, however many deliveries noticed).
    fn replace_fatal(&self, failed: &Arc<ProducerHandle>, code: RDKafkaErrorCode, reason: &str) {
        let mut current = self.producer.write().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&current, failed) {
            return;
        }
        tracing::error!(sink = %self.status.name, error = %code, reason, "fatal Kafka producer error; starting a new producer");
        match create_producer(&self.config, &self.status) {
            Ok(p) => *current = Arc::new(p),
            Err(e) => tracing::error!(sink = %self.status.name, error = %e, "cannot create a new Kafka producer"),
        }
    }

    async fn send(&self, env: &Envelope) -> Result<(), SinkError> {
        let ev = &env.event;
        let topic = self.topic.render(ev);
        check_topic(&topic).map_err(SinkError::permanent)?;
        let key = self.key.render(ev);
        let payload = self.format.encode(env);
        let headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header { key: "webio-event-id", value: Some(ev.id.as_str()) })
            .insert(Header { key: "webio-event-type", value: Some(ev.event_type.as_str()) })
            .insert(Header { key: "webio-shape", value: Some(ev.shape.as_str()) });
        let mut record = FutureRecord::to(&topic).payload(&payload[..]).headers(headers);
        if !key.is_empty() {
            record = record.key(key.as_str());
        }
        let producer = self.producer();
        match producer.get().send(record, Timeout::After(self.queue_timeout)).await {
            Ok(_) => {
                self.status.set_up(true);
                Ok(())
            }
            Err((e, _)) => {
                let code = e.rdkafka_error_code();
                if let Some((fatal, reason)) = producer.get().client().fatal_error() {
                    self.replace_fatal(&producer, fatal, &reason);
                    return Err(SinkError::retryable(format!("Kafka producer failed fatally ({fatal}: {reason})")));
                }
                let message = match code {
                    Some(RDKafkaErrorCode::QueueFull) => format!(
                        "librdkafka's queue stayed full for {} (brokers unreachable or too slow)",
                        humantime::format_duration(self.queue_timeout)
                    ),
                    Some(c) => format!("Kafka delivery to topic {topic:?} failed: {c}"),
                    None => format!("Kafka delivery to topic {topic:?} failed: {e}"),
                };
                Err(if code.is_some_and(is_permanent) {
                    SinkError::permanent(message)
                } else {
                    SinkError::retryable(message)
                })
            }
        }
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        self.status.retired.store(true, Ordering::Release);
    }
}

fn create_producer(config: &ClientConfig, status: &Arc<Status>) -> Result<ProducerHandle, KafkaError> {
    let producer: Kp = config.create_with_context(KafkaContext { status: status.clone() })?;
    Ok(ProducerHandle(Some(producer)))
}

impl Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.status.name
    }

    fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.send(env))
    }

    fn is_up(&self) -> bool {
        self.status.up.load(Ordering::Acquire)
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        let producer = self.producer();
        let name = self.status.name.clone();
        Box::pin(async move {
            let flushed = tokio::task::spawn_blocking(move || producer.get().flush(Timeout::After(timeout))).await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!(sink = %name, error = %e, "Kafka producer not fully flushed");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_literals_and_rendered_topics_are_checked() {
        assert!(check_topic_literals("webio.{type}-{extra.x y}").is_ok());
        assert!(check_topic_literals("webio/{type}").is_err());
        assert!(check_topic("..").is_err());
        assert!(check_topic("").is_err());
        assert!(check_topic(&"x".repeat(250)).is_err());
        assert!(check_topic("webio.inboundMessage").is_ok());
    }

    #[test]
    fn classification_of_delivery_errors() {
        assert!(is_permanent(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(is_permanent(RDKafkaErrorCode::TopicAuthorizationFailed));
        assert!(!is_permanent(RDKafkaErrorCode::MessageTimedOut));
        assert!(!is_permanent(RDKafkaErrorCode::NotLeaderForPartition));
        assert!(!is_permanent(RDKafkaErrorCode::UnknownTopicOrPartition));
        assert!(!is_permanent(RDKafkaErrorCode::QueueFull));
    }
}
