//! `amqp` sink (RabbitMQ, lapin). Placeholder until the broker-sinks work lands.

use super::{check_template, BoxFuture, OptionError, Sink, SinkError};
use crate::event::Envelope;
use crate::format::Format;
use crate::template::Escape;
use serde::Deserialize;

fn default_exchange_type() -> String {
    "topic".into()
}
fn yes() -> bool {
    true
}
fn default_routing_key() -> String {
    "webio.{type}".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    pub url: String,
    pub exchange: String,
    #[serde(default = "default_exchange_type")]
    pub exchange_type: String,
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
    #[serde(default = "yes")]
    pub declare: bool,
    #[serde(default = "yes")]
    pub mandatory: bool,
    #[serde(default)]
    pub format: Format,
}

impl AmqpConfig {
    pub fn validate(&self) -> Vec<OptionError> {
        let mut errs = Vec::new();
        check_template(&mut errs, "routing_key", &self.routing_key, Escape::None);
        errs
    }
}

pub struct AmqpSink {
    name: String,
}

impl AmqpSink {
    pub fn new(name: &str, _c: &AmqpConfig) -> Result<Self, SinkError> {
        Ok(AmqpSink { name: name.to_owned() })
    }
}

impl Sink for AmqpSink {
    fn name(&self) -> &str {
        &self.name
    }
    fn deliver<'a>(&'a self, _env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async { Err(SinkError::retryable("amqp sink not implemented yet")) })
    }
}
