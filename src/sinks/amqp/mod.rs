//! `amqp` sink (RabbitMQ, lapin).
//!
//! - One connection and one channel in publisher-confirm mode, owned by a background task
//!   (`connection.rs`) that connects (over TLS for `amqps://`), declares the exchange (durable,
//!   unless `declare = false`) and, when the connection or the channel is lost, reconnects with
//!   exponential backoff and jitter. Building the sink never waits for the broker.
//! - A delivery counts only when its publisher confirm (`basic.ack`) arrived. A `basic.nack`, a
//!   lost connection or a confirm that does not arrive within `confirm_timeout` is retryable;
//!   a mandatory message returned as unroutable (`basic.return`) is permanent.
//! - Publishes are pipelined: the channel lock covers only handing the frames to lapin, never
//!   the wait for the confirm, so many confirms are in flight at once; `confirms.rs` answers
//!   each publish with its own outcome.
//! - TLS uses the binary's one rustls provider ([`crate::tls`]) and trusts the public roots
//!   plus the `tls_ca_file` certificates.

mod config;
mod confirms;
mod connection;

pub use config::{AmqpConfig, AmqpUrl, ExchangeType, DEFAULT_FRAME_MAX};

use super::{BoxFuture, Sink, SinkError};
use crate::event::Envelope;
use crate::format::Format;
use crate::template::{Escape, Template};
use confirms::{Outcome, Pending};
use connection::{ConnectParams, Live, Shared};
use lapin::options::BasicPublishOptions;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::ShortString;
use lapin::BasicProperties;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

pub struct AmqpSink {
    shared: Arc<Shared>,
    exchange: ShortString,
    routing_key: Template,
    mandatory: bool,
    format: Format,
    confirm_timeout: Duration,
    connect_wait: Duration,
    ordering: crate::sinks::SinkOrdering,
    /// Dropped with the sink: tells the connection task to close the connection and end.
    _closed: watch::Sender<()>,
}

impl AmqpSink {
    /// Returns at once; the connection is made by a background task on the current runtime.
    pub fn new(name: &str, c: &AmqpConfig) -> Result<Self, SinkError> {
        let bad = |e: String| SinkError::permanent(format!("sink {name}: {e}"));
        if let Some((key, msg)) = c.check_options().into_iter().next() {
            return Err(bad(format!("{key}: {msg}")));
        }
        let routing_key =
            Template::parse(&c.routing_key, Escape::None).map_err(|e| bad(format!("routing_key: {e}")))?;
        let exchange = ShortString::try_new(c.exchange.as_str()).map_err(|e| bad(format!("exchange: {e}")))?;
        let mut tls = OwnedTLSConfig::default();
        if let Some(path) = &c.tls_ca_file {
            tls.cert_chain = Some(config::read_ca_file(path).map_err(|e| bad(format!("tls_ca_file: {e}")))?);
        }
        if c.url.is_tls() {
            // Before lapin builds its TLS connector, so that it takes this provider.
            crate::tls::provider();
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| bad("the amqp sink must be built inside the tokio runtime".into()))?;

        let shared = Arc::new(Shared::new(name));
        crate::metrics::sink_up(name, false);
        let (closed_tx, closed_rx) = watch::channel(());
        let params = ConnectParams {
            uri: c.url.uri().clone(),
            tls,
            exchange: exchange.clone(),
            kind: c.exchange_type.kind(),
            declare: c.declare && !c.exchange.is_empty(),
            reconnect_max: c.reconnect_max,
        };
        runtime.spawn(connection::supervise(shared.clone(), params, closed_rx));
        Ok(AmqpSink {
            shared,
            exchange,
            routing_key,
            mandatory: c.mandatory,
            format: c.format,
            confirm_timeout: c.confirm_timeout,
            connect_wait: c.connect_wait,
            ordering: c.ordering,
            _closed: closed_tx,
        })
    }

    /// The live channel, waiting at most `connect_wait` for one.
    async fn live(&self) -> Result<Live, SinkError> {
        let mut rx = self.shared.live.subscribe();
        let live = match tokio::time::timeout(self.connect_wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(live)) => live.clone(),
            _ => None,
        };
        live.ok_or_else(|| SinkError::retryable("not connected to the AMQP broker (reconnecting)"))
    }

    async fn publish(&self, env: &Envelope) -> Result<(), SinkError> {
        let ev = &env.event;
        let routing_key = self.routing_key.render(ev);
        let routing_key = ShortString::try_new(routing_key)
            .map_err(|e| SinkError::permanent(format!("rendered routing key is too long: {e}")))?;
        let message_id =
            ShortString::try_new(ev.id.as_str()).map_err(|e| SinkError::permanent(format!("event id: {e}")))?;
        let kind = ShortString::try_new(ev.event_type.as_str())
            .map_err(|e| SinkError::permanent(format!("event type does not fit the AMQP `type` property: {e}")))?;
        let timestamp = chrono::Utc::now().timestamp().max(0) as u64;
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            crate::event::trace::HEADER.into(),
            lapin::types::AMQPValue::LongString(env.trace.to_string().into()),
        );
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_message_id(message_id)
            .with_type(kind)
            .with_content_type(self.format.content_type().into())
            .with_delivery_mode(2)
            .with_timestamp(timestamp);
        let payload = self.format.encode(env);

        let live = self.live().await?;
        if live.connection.blocked() {
            return Err(SinkError::retryable("the AMQP broker has blocked publishing (resource alarm)"));
        }
        let options = BasicPublishOptions { mandatory: self.mandatory, immediate: false };
        let (reply, outcome) = oneshot::channel();
        let pending_id = ev.id.clone();
        let exchange = self.exchange.clone();
        // In a task of its own so that a cancelled delivery cannot leave a publish half done
        // (a confirm nobody watches could carry another publish's return). The lock covers
        // handing the frames to lapin *and* registering the confirm with the collector, so
        // the collector learns of confirms in delivery-tag order; it never covers the wait
        // for the confirm itself.
        let published = tokio::spawn(async move {
            let _order = live.publish.lock().await;
            let confirm = live
                .channel
                .basic_publish(exchange, routing_key, options, &payload, properties)
                .await
                .map_err(|e| e.to_string())?;
            live.confirms
                .send(Pending { message_id: pending_id, confirm, reply })
                .map_err(|_| "connection lost before the publisher confirm".to_owned())
        })
        .await;
        if let Err(e) = published.unwrap_or_else(|e| Err(e.to_string())) {
            self.shared.kick.notify_one();
            return Err(SinkError::retryable(format!("publish failed: {e}")));
        }
        match outcome.await {
            Ok(Outcome::Ack) => Ok(()),
            Ok(Outcome::Nack) => Err(SinkError::retryable("the broker refused the message (basic.nack)")),
            Ok(Outcome::Returned { code, text }) => Err(SinkError::permanent(format!(
                "unroutable: the broker returned the message ({code} {text}): no queue is bound for routing key {:?} on exchange {:?}",
                self.routing_key.render(ev),
                self.exchange.as_str()
            ))),
            Ok(Outcome::Lost(e)) => {
                self.shared.kick.notify_one();
                Err(SinkError::retryable(format!("no publisher confirm: {e}")))
            }
            Err(_) => Err(SinkError::retryable("connection lost before the publisher confirm")),
        }
    }
}

impl Sink for AmqpSink {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn ordering(&self) -> crate::sinks::SinkOrdering {
        self.ordering
    }

    fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            match tokio::time::timeout(self.confirm_timeout, self.publish(env)).await {
                Ok(r) => r,
                Err(_) => Err(SinkError::retryable(format!(
                    "no publisher confirm within {}",
                    humantime::format_duration(self.confirm_timeout)
                ))),
            }
        })
    }

    fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Acquire)
    }
}
