//! `amqp` sink (RabbitMQ, lapin).
//!
//! - One connection and one channel in publisher-confirm mode, owned by a background task that
//!   connects, declares the exchange (durable, unless `declare = false`) and, when the
//!   connection or the channel is lost, reconnects with exponential backoff and jitter. Building
//!   the sink never waits for the broker.
//! - A delivery counts only when its publisher confirm (`basic.ack`) arrived. A `basic.nack`, a
//!   lost connection or a confirm that does not arrive within `confirm_timeout` is retryable;
//!   a mandatory message returned as unroutable (`basic.return`) is permanent.
//! - Publishes are pipelined: the channel lock covers only handing the frames to lapin, never
//!   the wait for the confirm, so many confirms are in flight at once.
//!
//! Returned messages: lapin hands a `basic.return` to the first confirm it resolves after the
//! return arrived, which under pipelining (and multiple-acks) is not necessarily the confirm of
//! the returned message. So one collector task per connection owns every pending confirm and
//! matches returns to publishes by `message_id` (the event id) before answering. RabbitMQ sends
//! a message's return before its ack, so the confirm carrying it is resolved no later than the
//! message's own; confirms are registered with the collector under the publish lock, and the
//! collector takes that lock before answering a batch, so the carrier is always known by then.

use super::{check_template, BoxFuture, OptionError, Sink, SinkError};
use crate::event::Envelope;
use crate::format::Format;
use crate::template::{Escape, Template};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind, PublisherConfirm};
use serde::Deserialize;
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Mutex, Notify};

fn default_exchange_type() -> String {
    "topic".into()
}
fn yes() -> bool {
    true
}
fn default_routing_key() -> String {
    "webio.{type}".into()
}
fn default_confirm_timeout() -> String {
    "10s".into()
}
fn default_connect_wait() -> String {
    "1s".into()
}
fn default_reconnect_max() -> String {
    "10s".into()
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
    /// How long one publish may wait for its publisher confirm before it counts as failed
    /// (retryable; the event may then reach the broker twice).
    #[serde(default = "default_confirm_timeout")]
    pub confirm_timeout: String,
    /// How long a delivery waits for the connection when the sink is (re)connecting before
    /// failing with a retryable error.
    #[serde(default = "default_connect_wait")]
    pub connect_wait: String,
    /// Upper bound of the reconnect backoff (it starts at 200 ms and doubles, with jitter).
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: String,
}

const EXCHANGE_TYPES: &[&str] = &["direct", "fanout", "topic", "headers"];

impl AmqpConfig {
    pub fn validate(&self) -> Vec<OptionError> {
        let mut errs = Vec::new();
        if let Err(e) = parse_url(&self.url) {
            errs.push(("url".into(), e));
        }
        if exchange_kind(&self.exchange_type).is_none() {
            errs.push((
                "exchange_type".into(),
                format!("unknown exchange type {:?} (one of: {})", self.exchange_type, EXCHANGE_TYPES.join(", ")),
            ));
        }
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
        for (key, value) in [
            ("confirm_timeout", &self.confirm_timeout),
            ("connect_wait", &self.connect_wait),
            ("reconnect_max", &self.reconnect_max),
        ] {
            if let Err(e) = humantime::parse_duration(value) {
                errs.push((key.into(), format!("invalid duration {value:?}: {e}")));
            }
        }
        errs
    }
}

fn exchange_kind(t: &str) -> Option<ExchangeKind> {
    Some(match t {
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "topic" => ExchangeKind::Topic,
        "headers" => ExchangeKind::Headers,
        _ => return None,
    })
}

/// `frame_max` asked for when the URL names none. lapin keeps two I/O buffers of 32 frames
/// each, sized by the negotiated frame size: with RabbitMQ's default (128 KiB) that is 8 MiB
/// of resident memory per connection, for events of a few KiB. A larger message is simply
/// sent as several body frames.
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// Parses an `amqp://` or `amqps://` URL with lapin's own parser; `frame_max` defaults to
/// [`DEFAULT_FRAME_MAX`].
pub(crate) fn parse_url(url: &str) -> Result<AMQPUri, String> {
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err("must start with amqp:// or amqps://".into());
    }
    let mut uri: AMQPUri = url.parse().map_err(|e: String| format!("invalid AMQP URL: {e}"))?;
    // amq-protocol-uri only keeps host *names* and turns an IP address into "localhost";
    // put the address back.
    let parsed = url::Url::parse(url).map_err(|e| format!("invalid AMQP URL: {e}"))?;
    match parsed.host() {
        Some(url::Host::Ipv4(ip)) => uri.authority.host = ip.to_string(),
        Some(url::Host::Ipv6(ip)) => uri.authority.host = ip.to_string(),
        Some(url::Host::Domain(_)) => {}
        None => return Err("invalid AMQP URL: no host".into()),
    }
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    Ok(uri)
}

fn duration(name: &str, key: &str, value: &str) -> Result<Duration, SinkError> {
    humantime::parse_duration(value).map_err(|e| SinkError::permanent(format!("sink {name}: {key}: {e}")))
}

pub struct AmqpSink {
    shared: Arc<Shared>,
    exchange: ShortString,
    routing_key: Template,
    mandatory: bool,
    format: Format,
    confirm_timeout: Duration,
    connect_wait: Duration,
    /// Dropped with the sink: tells the connection task to close the connection and end.
    _closed: watch::Sender<()>,
}

/// State shared between the sink and its connection task.
struct Shared {
    name: String,
    /// The live channel, `None` while (re)connecting.
    live: watch::Sender<Option<Live>>,
    up: AtomicBool,
    /// A delivery saw a channel error: the connection task should look at the connection now.
    kick: Notify,
}

#[derive(Clone)]
struct Live {
    channel: Channel,
    connection: lapin::ConnectionStatus,
    /// Held only while handing one publish's frames to lapin, so that delivery tags (assigned
    /// by lapin at publish time) follow the order in which the frames go out.
    publish: Arc<Mutex<()>>,
    confirms: mpsc::UnboundedSender<Pending>,
}

struct Pending {
    message_id: String,
    confirm: PublisherConfirm,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Debug)]
enum Outcome {
    Ack,
    Nack,
    Returned { code: u16, text: String },
    Lost(String),
}

struct ConnectParams {
    uri: AMQPUri,
    exchange: ShortString,
    kind: ExchangeKind,
    declare: bool,
    reconnect_max: Duration,
}

impl AmqpSink {
    /// Returns at once; the connection is made by a background task on the current runtime.
    pub fn new(name: &str, c: &AmqpConfig) -> Result<Self, SinkError> {
        let bad = |e: String| SinkError::permanent(format!("sink {name}: {e}"));
        let uri = parse_url(&c.url).map_err(|e| bad(format!("url: {e}")))?;
        let kind =
            exchange_kind(&c.exchange_type).ok_or_else(|| bad(format!("exchange_type {:?}", c.exchange_type)))?;
        let routing_key =
            Template::parse(&c.routing_key, Escape::None).map_err(|e| bad(format!("routing_key: {e}")))?;
        let exchange = ShortString::try_new(c.exchange.as_str()).map_err(|e| bad(format!("exchange: {e}")))?;
        let confirm_timeout = duration(name, "confirm_timeout", &c.confirm_timeout)?;
        let connect_wait = duration(name, "connect_wait", &c.connect_wait)?;
        let reconnect_max = duration(name, "reconnect_max", &c.reconnect_max)?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| bad("the amqp sink must be built inside the tokio runtime".into()))?;

        let shared = Arc::new(Shared {
            name: name.to_owned(),
            live: watch::Sender::new(None),
            up: AtomicBool::new(false),
            kick: Notify::new(),
        });
        crate::metrics::sink_up(name, false);
        let (closed_tx, closed_rx) = watch::channel(());
        let params = ConnectParams {
            uri,
            exchange: exchange.clone(),
            kind,
            declare: c.declare && !c.exchange.is_empty(),
            reconnect_max,
        };
        runtime.spawn(supervise(shared.clone(), params, closed_rx));
        Ok(AmqpSink {
            shared,
            exchange,
            routing_key,
            mandatory: c.mandatory,
            format: c.format,
            confirm_timeout,
            connect_wait,
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
        let properties = BasicProperties::default()
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

impl Shared {
    fn set_live(&self, live: Option<Live>) {
        let up = live.is_some();
        self.live.send_replace(live);
        if self.up.swap(up, Ordering::AcqRel) != up {
            crate::metrics::sink_up(&self.name, up);
        }
    }
}

/// Exponential backoff from 200 ms up to `max`, with jitter (50–100 % of the step).
fn backoff(failures: u32, max: Duration) -> Duration {
    let step = Duration::from_millis(200).saturating_mul(1 << failures.saturating_sub(1).min(16)).min(max);
    step.mul_f64(0.5 + fastrand::f64() * 0.5)
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The connection task: connect, serve until the connection or channel is lost, back off,
/// reconnect; until the sink is dropped.
async fn supervise(shared: Arc<Shared>, params: ConnectParams, mut closed: watch::Receiver<()>) {
    let name = shared.name.clone();
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect(&name, &params)) => r,
            _ = closed.changed() => return,
        };
        match attempt {
            Ok(Ok((connection, live))) => {
                failures = 0;
                let channel = live.channel.clone();
                shared.set_live(Some(live));
                tracing::info!(sink = %name, host = %params.uri.authority.host, port = params.uri.authority.port, "connected to the AMQP broker");
                let reason = tokio::select! {
                    reason = wait_until_lost(&shared, &connection, &channel) => reason,
                    _ = closed.changed() => {
                        // The sink is gone (a reload may already run its successor under the
                        // same name): no metric from here on.
                        shared.live.send_replace(None);
                        let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "OK".into())).await;
                        return;
                    }
                };
                shared.set_live(None);
                tracing::warn!(sink = %name, %reason, "AMQP connection lost; reconnecting");
                let _ = tokio::time::timeout(Duration::from_secs(1), connection.close(200, "OK".into())).await;
            }
            Ok(Err(e)) => tracing::warn!(sink = %name, error = %e, "cannot connect to the AMQP broker"),
            Err(_) => tracing::warn!(sink = %name, "connecting to the AMQP broker timed out"),
        }
        failures = failures.saturating_add(1);
        let delay = backoff(failures, params.reconnect_max);
        tracing::debug!(sink = %name, delay = ?delay, "next AMQP connection attempt");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = closed.changed() => return,
        }
    }
}

async fn connect(name: &str, p: &ConnectParams) -> Result<(Connection, Live), lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(format!("webio-router/{name}").into());
    let connection = Connection::connect_uri(p.uri.clone(), properties).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    if p.declare {
        let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        channel.exchange_declare(p.exchange.clone(), p.kind.clone(), options, FieldTable::default()).await?;
    }
    let (confirms, rx) = mpsc::unbounded_channel();
    let publish = Arc::new(Mutex::new(()));
    tokio::spawn(collect_confirms(rx, publish.clone()));
    let live = Live { channel, connection: connection.status().clone(), publish, confirms };
    Ok((connection, live))
}

/// Resolves when the connection or the channel is no longer usable; says why.
async fn wait_until_lost(shared: &Shared, connection: &Connection, channel: &Channel) -> String {
    let mut events = connection.events_listener();
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(lapin::Event::Error(e)) => return e.to_string(),
                None => return "connection closed".into(),
                Some(_) => {}
            },
            _ = shared.kick.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if !connection.status().connected() {
            return "connection closed".into();
        }
        if !channel.status().connected() {
            return "channel closed".into();
        }
    }
}

const RETURN_TTL: Duration = Duration::from_secs(120);

type Resolved = (Pending, lapin::Result<Confirmation>);

/// Takes the resolved confirms out of `pending`.
fn poll_pending(pending: &mut Vec<Pending>, cx: &mut std::task::Context<'_>) -> Vec<Resolved> {
    let mut done = Vec::new();
    let mut i = 0;
    while i < pending.len() {
        match Pin::new(&mut pending[i].confirm).poll(cx) {
            Poll::Ready(r) => done.push((pending.swap_remove(i), r)),
            Poll::Pending => i += 1,
        }
    }
    done
}

/// Owns every pending confirm of one connection and answers each publish once its confirm
/// resolved, with returned messages matched by `message_id` (see the module comment).
async fn collect_confirms(mut rx: mpsc::UnboundedReceiver<Pending>, publish: Arc<Mutex<()>>) {
    let mut pending: Vec<Pending> = Vec::new();
    // Returns seen (carried by some confirm) whose own confirm was not answered yet. A return
    // whose publish was somehow never registered here would stay, so they expire.
    let mut returned: HashMap<String, Vec<(u16, String, Instant)>> = HashMap::new();
    let mut open = true;
    loop {
        let batch = poll_fn(|cx| {
            while open {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(p)) => pending.push(p),
                    Poll::Ready(None) => open = false,
                    Poll::Pending => break,
                }
            }
            let done = poll_pending(&mut pending, cx);
            if !done.is_empty() {
                Poll::Ready(Some(done))
            } else if !open && pending.is_empty() {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await;
        let Some(mut batch) = batch else { return };
        // The confirm carrying one of these messages' return may belong to a later publish
        // whose frames are out but which is not registered here yet: it holds the publish
        // lock until it is. Wait for it, take what was registered meanwhile and include what
        // resolved.
        {
            let _quiet = publish.lock().await;
            while let Ok(p) = rx.try_recv() {
                pending.push(p);
            }
        }
        batch.extend(poll_fn(|cx| Poll::Ready(poll_pending(&mut pending, cx))).await);

        // First every return carried by this batch, then the answers.
        let mut answers = Vec::with_capacity(batch.len());
        for (p, result) in batch {
            let outcome = match result {
                Ok(confirmation) => {
                    let ack = matches!(confirmation, Confirmation::Ack(_));
                    let nack = matches!(confirmation, Confirmation::Nack(_));
                    if let Some(m) = confirmation.take_message() {
                        if let Some(id) = m.delivery.properties.message_id() {
                            returned.entry(id.as_str().to_owned()).or_default().push((
                                m.reply_code,
                                m.reply_text.as_str().to_owned(),
                                Instant::now(),
                            ));
                        }
                    }
                    if ack {
                        Outcome::Ack
                    } else if nack {
                        Outcome::Nack
                    } else {
                        Outcome::Lost("publisher confirms are not enabled on the channel".into())
                    }
                }
                Err(e) => Outcome::Lost(e.to_string()),
            };
            answers.push((p, outcome));
        }
        for (p, outcome) in answers {
            let outcome = match returned.get_mut(&p.message_id).and_then(Vec::pop) {
                Some((code, text, _)) => Outcome::Returned { code, text },
                None => outcome,
            };
            let _ = p.reply.send(outcome);
        }
        // A return nobody claimed (its publish was cancelled before reaching this task).
        returned.retain(|_, v| {
            v.retain(|(_, _, at)| at.elapsed() < RETURN_TTL);
            !v.is_empty()
        });
    }
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
    fn backoff_grows_up_to_the_cap_with_jitter() {
        let max = Duration::from_secs(10);
        let first = backoff(1, max);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200), "{first:?}");
        for n in [10, 20, 40, u32::MAX] {
            let d = backoff(n, max);
            assert!(d >= Duration::from_secs(5) && d <= max, "{n}: {d:?}");
        }
    }
}
