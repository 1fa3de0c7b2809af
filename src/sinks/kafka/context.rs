//! librdkafka's callbacks for a `kafka` sink: its log lines go to tracing (with the sink's
//! name), and its errors and statistics drive `is_up` / `webio_router_sink_up`.

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Shared between the sink and librdkafka's callbacks.
pub(super) struct Status {
    pub name: String,
    pub up: AtomicBool,
    /// The sink was dropped (a reload may run its successor under the same name): callbacks
    /// that still fire while the producer shuts down must not touch the metric.
    pub retired: AtomicBool,
}

impl Status {
    pub fn set_up(&self, up: bool) {
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
pub(super) struct KafkaContext {
    pub status: Arc<Status>,
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
