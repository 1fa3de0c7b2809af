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
//! - TLS and SASL (PLAIN, SCRAM-SHA-256/512) and the gzip, snappy, lz4 and zstd codecs are
//!   librdkafka's, set through `properties`; the build links the system OpenSSL for them.
//!
//! `config.rs` turns the sink table into librdkafka's configuration; `context.rs` holds
//! librdkafka's callbacks (logs, errors, statistics → `is_up`).

mod config;
mod context;

pub use config::{KafkaConfig, PropertyValue};

use super::{BoxFuture, Sink, SinkError};
use crate::event::Envelope;
use crate::format::Format;
use crate::template::{Escape, Template};
use config::{check_topic, librdkafka_message};
use context::{KafkaContext, Status};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

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
    ordering: crate::sinks::SinkOrdering,
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
        let queue_timeout = c.queue_timeout;
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
            ordering: c.ordering,
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
        check_topic(&topic).map_err(|e| SinkError::permanent(e.to_string()))?;
        let key = self.key.render(ev);
        let payload = self.format.encode(env);
        let traceparent = env.trace.to_string();
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header { key: "webio-event-id", value: Some(ev.id.as_str()) })
            .insert(Header { key: "webio-event-type", value: Some(ev.event_type.as_str()) })
            .insert(Header { key: "webio-shape", value: Some(ev.shape.as_str()) })
            .insert(Header { key: crate::event::trace::HEADER, value: Some(traceparent.as_str()) });
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

    fn ordering(&self) -> crate::sinks::SinkOrdering {
        self.ordering
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
    fn classification_of_delivery_errors() {
        assert!(is_permanent(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(is_permanent(RDKafkaErrorCode::TopicAuthorizationFailed));
        assert!(!is_permanent(RDKafkaErrorCode::MessageTimedOut));
        assert!(!is_permanent(RDKafkaErrorCode::NotLeaderForPartition));
        assert!(!is_permanent(RDKafkaErrorCode::UnknownTopicOrPartition));
        assert!(!is_permanent(RDKafkaErrorCode::QueueFull));
    }
}
