//! The `[sinks.<name>]` table of a `kafka` sink and the librdkafka configuration made from it.
//!
//! `queue_timeout` is a [`Duration`] from load on; every other option is checked by
//! [`KafkaConfig::validate`] under its key, `properties` by librdkafka itself (names, values,
//! then the cross-property checks of an offline client), so `check` refuses what the producer
//! would refuse. The build links OpenSSL (TLS, SASL PLAIN/SCRAM) and every compression codec.

use super::super::{check_template, OptionError};
use crate::format::Format;
use crate::template::Escape;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::producer::BaseProducer;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

fn default_key() -> String {
    "{conversationId}".into()
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(10)
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

#[derive(Clone, PartialEq, Deserialize)]
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
    #[serde(default = "default_queue_timeout", with = "crate::sinks::duration")]
    pub queue_timeout: Duration,
    /// `"conversation"`: a conversation's events reach this sink in acceptance order.
    #[serde(default)]
    pub ordering: crate::sinks::SinkOrdering,
}

/// A property whose value is a secret (`sasl.password`, `ssl.key.password`, …): never shown.
fn is_secret(key: &str) -> bool {
    key.contains("password") || key.contains("secret") || key == "ssl.key.pem" || key == "sasl.oauthbearer.config"
}

/// `Debug` without the values of secret properties.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        struct Redacted<'a>(&'a BTreeMap<String, PropertyValue>);
        impl std::fmt::Debug for Redacted<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_map()
                    .entries(
                        self.0.iter().map(|(k, v)| (k, if is_secret(k) { "***".to_owned() } else { v.to_string() })),
                    )
                    .finish()
            }
        }
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("key", &self.key)
            .field("properties", &Redacted(&self.properties))
            .field("format", &self.format)
            .field("queue_timeout", &self.queue_timeout)
            .field("ordering", &self.ordering)
            .finish()
    }
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
    pub(super) fn validate_options(&self) -> Vec<OptionError> {
        let mut errs = Vec::new();
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            errs.push(("brokers".into(), "must name at least one broker (host:port[,host:port…])".into()));
        } else if self.brokers.split(',').any(|b| b.trim().is_empty()) {
            errs.push(("brokers".into(), "empty entry in the broker list".into()));
        }
        check_template(&mut errs, "topic", &self.topic, Escape::Topic);
        if let Err(e) = check_topic_literals(&self.topic) {
            errs.push(("topic".into(), e.to_string()));
        }
        check_template(&mut errs, "key", &self.key, Escape::None);
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
    pub(super) fn client_config(&self) -> ClientConfig {
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

pub(super) fn librdkafka_message(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, desc, _, _) => desc.clone(),
        KafkaError::ClientCreation(msg) => msg.clone(),
        other => other.to_string(),
    }
}

/// The literal parts of a topic template must be valid topic-name characters (the fields are
/// escaped at render time).
fn check_topic_literals(text: &str) -> Result<(), TopicError> {
    let mut in_field = false;
    for c in text.chars() {
        match c {
            '{' => in_field = true,
            '}' => in_field = false,
            c if !(in_field || c.is_ascii_alphanumeric() || "._-".contains(c)) => {
                return Err(TopicError::Character(c));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A rendered topic name Kafka accepts.
pub(super) fn check_topic(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() || topic == "." || topic == ".." {
        return Err(TopicError::Invalid(topic.to_owned()));
    }
    if topic.len() > 249 {
        return Err(TopicError::TooLong(topic.len()));
    }
    Ok(())
}

/// Why a topic name (a template's literal part, or a rendered name) is not one Kafka accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("{0:?} cannot appear in a Kafka topic name (allowed: A-Z a-z 0-9 . _ -)")]
    Character(char),
    #[error("rendered topic {0:?} is not a valid topic name")]
    Invalid(String),
    #[error("rendered topic is {0} characters long (Kafka allows 249)")]
    TooLong(usize),
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

    fn table(extra: &str) -> Result<KafkaConfig, toml::de::Error> {
        toml::from_str(&format!("brokers = \"k:9093\"\ntopic = \"t\"\n{extra}"))
    }

    #[test]
    fn queue_timeout_is_typed_at_load() {
        assert_eq!(table("").unwrap().queue_timeout, Duration::from_secs(10));
        assert_eq!(table("queue_timeout = \"300ms\"").unwrap().queue_timeout, Duration::from_millis(300));
        let e = table("queue_timeout = \"later\"").unwrap_err().to_string();
        assert!(e.contains("invalid duration \"later\""), "{e}");
    }

    #[test]
    fn secret_properties_never_show_in_debug_output() {
        let c = table("[properties]\n\"sasl.password\" = \"pw-123\"\n\"ssl.key.password\" = \"kp-456\"\n\"sasl.username\" = \"webio\"").unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("pw-123") && !shown.contains("kp-456"), "{shown}");
        assert!(shown.contains("webio") && shown.contains("***"), "{shown}");
    }
}
