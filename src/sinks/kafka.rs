//! `kafka` sink (rdkafka). Placeholder until the broker-sinks work lands.

use super::{check_template, BoxFuture, OptionError, Sink, SinkError};
use crate::event::Envelope;
use crate::format::Format;
use crate::template::Escape;
use serde::Deserialize;
use std::collections::BTreeMap;

fn default_key() -> String {
    "{conversationId}".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    #[serde(default = "default_key")]
    pub key: String,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[serde(default)]
    pub format: Format,
}

impl KafkaConfig {
    pub fn validate(&self) -> Vec<OptionError> {
        let mut errs = Vec::new();
        check_template(&mut errs, "topic", &self.topic, Escape::Topic);
        check_template(&mut errs, "key", &self.key, Escape::None);
        errs
    }
}

pub struct KafkaSink {
    name: String,
}

impl KafkaSink {
    pub fn new(name: &str, _c: &KafkaConfig) -> Result<Self, SinkError> {
        Ok(KafkaSink { name: name.to_owned() })
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.name
    }
    fn deliver<'a>(&'a self, _env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async { Err(SinkError::retryable("kafka sink not implemented yet")) })
    }
}
