//! The `amqp` sink against the RabbitMQ on 127.0.0.1:5672 (guest/guest). These tests fail,
//! rather than skip, when RabbitMQ is unreachable. Every test uses its own exchange and queue.

use crate::helpers::brokers::*;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use webio_router::sinks::Sink;

const RABBITMQ: &str = "127.0.0.1:5672";

/// A connection of the test's own, to set up and inspect exchanges and queues.
struct Rabbit {
    _conn: Connection,
    ch: Channel,
    exchange: String,
    queue: String,
}

impl Rabbit {
    /// Declares a durable exchange (as the sink does) and, when `binding` is given, an
    /// exclusive queue bound to it.
    async fn setup(kind: ExchangeKind, binding: Option<&str>) -> Rabbit {
        let url = format!("amqp://guest:guest@{RABBITMQ}/%2f");
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ must be running on {RABBITMQ} (guest/guest): {e}"));
        let ch = conn.create_channel().await.unwrap();
        let exchange = unique("webio-test-x");
        let queue = unique("webio-test-q");
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        ch.exchange_declare(exchange.as_str().into(), kind, durable, FieldTable::default()).await.unwrap();
        if let Some(key) = binding {
            let exclusive = QueueDeclareOptions { exclusive: true, ..Default::default() };
            ch.queue_declare(queue.as_str().into(), exclusive, FieldTable::default()).await.unwrap();
            ch.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        }
        Rabbit { _conn: conn, ch, exchange, queue }
    }

    /// Every message now on the queue (consumed).
    async fn drain(&self) -> Vec<lapin::message::BasicGetMessage> {
        let mut out = Vec::new();
        let opts = BasicGetOptions { no_ack: true };
        while let Some(m) = self.ch.basic_get(self.queue.as_str().into(), opts).await.unwrap() {
            out.push(m);
        }
        out
    }

    async fn cleanup(self) {
        let _ = self.ch.exchange_delete(self.exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
    }
}

fn amqp_sink(name: &str, url: &str, exchange: &str, extra: &str) -> Arc<dyn Sink> {
    let cfg = sink_config(&format!(
        "type = \"amqp\"\nurl = \"{url}\"\nexchange = \"{exchange}\"\nconfirm_timeout = \"3s\"\n{extra}"
    ));
    assert_eq!(cfg.validate(), vec![]);
    cfg.build(name).expect("the sink builds without waiting for the broker")
}

fn rabbit_url() -> String {
    format!("amqp://guest:guest@{RABBITMQ}/%2f")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_carry_the_amqp_properties_and_the_rendered_routing_key() {
    let rabbit = Rabbit::setup(ExchangeKind::Topic, Some("webio.#")).await;
    let url = rabbit_url();
    let plain = amqp_sink("bus", &url, &rabbit.exchange, "routing_key = \"webio.{type}.{conversationId}\"");
    let ce = amqp_sink("bus-ce", &url, &rabbit.exchange, "routing_key = \"webio.ce.{type}\"\nformat = \"cloudevents\"");
    let deadline = Instant::now() + Duration::from_secs(10);

    let first = numbered("inboundMessage", 1);
    let second = numbered("messageStatusUpdate", 2);
    let before = chrono::Utc::now().timestamp() as u64;
    deliver_until_ok(plain.as_ref(), &first, deadline).await.unwrap();
    deliver_until_ok(ce.as_ref(), &second, deadline).await.unwrap();
    assert!(plain.is_up() && ce.is_up());

    let got = rabbit.drain().await;
    assert_eq!(got.len(), 2, "both events are on the queue");
    let (m1, m2) = (&got[0].delivery, &got[1].delivery);

    assert_eq!(m1.routing_key.as_str(), "webio.inboundMessage.conv-1");
    assert_eq!(m1.exchange.as_str(), rabbit.exchange);
    let p = &m1.properties;
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some(first.event.id.as_str()));
    assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("inboundMessage"));
    assert_eq!(p.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    let traceparent = p.headers().as_ref().and_then(|h| h.inner().get("traceparent")).cloned();
    assert_eq!(
        traceparent,
        Some(lapin::types::AMQPValue::LongString(first.trace.to_string().into())),
        "the event's W3C trace context"
    );
    let ts = p.timestamp().expect("timestamp set");
    let now = chrono::Utc::now().timestamp() as u64;
    assert!(before.saturating_sub(1) <= ts && ts <= now + 1, "timestamp {ts} is the publish time (unix seconds)");
    let body: serde_json::Value = serde_json::from_slice(&m1.data).unwrap();
    assert_eq!(body["id"], first.event.id.as_str());
    assert_eq!(body["type"], "inboundMessage");

    assert_eq!(m2.routing_key.as_str(), "webio.ce.messageStatusUpdate");
    let p = &m2.properties;
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some(second.event.id.as_str()));
    assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("messageStatusUpdate"));
    assert_eq!(p.content_type().as_ref().map(|s| s.as_str()), Some("application/cloudevents+json"));
    assert_eq!(*p.delivery_mode(), Some(2));
    let ce_body: serde_json::Value = serde_json::from_slice(&m2.data).unwrap();
    assert_eq!(ce_body["specversion"], "1.0");
    assert_eq!(ce_body["id"], second.event.id.as_str());
    assert_eq!(ce_body["data"]["communicationActionId"], "2");
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mandatory_publish_with_no_bound_queue_is_a_permanent_failure() {
    let rabbit = Rabbit::setup(ExchangeKind::Topic, None).await;
    let sink = amqp_sink("bus", &rabbit_url(), &rabbit.exchange, "");
    let env = numbered("inboundMessage", 1);
    let err = deliver_until_ok(sink.as_ref(), &env, Instant::now() + Duration::from_secs(10))
        .await
        .expect_err("an unroutable mandatory message is not delivered");
    assert!(err.is_permanent(), "returned message must be permanent: {err:?}");
    let reason = err.to_string();
    assert!(reason.contains("unroutable") && reason.contains("NO_ROUTE"), "{reason}");

    // Without `mandatory`, RabbitMQ drops it and confirms: that is the documented trade-off.
    let lax = amqp_sink("bus-lax", &rabbit_url(), &rabbit.exchange, "mandatory = false");
    deliver_until_ok(lax.as_ref(), &env, Instant::now() + Duration::from_secs(10)).await.unwrap();
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_report_each_return_against_its_own_event() {
    // Only inboundMessage is bound: every messageSend comes back as unroutable while many
    // confirms are in flight on the same channel.
    let rabbit = Rabbit::setup(ExchangeKind::Topic, Some("webio.inboundMessage")).await;
    let sink = amqp_sink("bus", &rabbit_url(), &rabbit.exchange, "");
    let deadline = Instant::now() + Duration::from_secs(15);
    let envs: Vec<_> =
        (0..200).map(|n| numbered(if n % 3 == 0 { "messageSend" } else { "inboundMessage" }, n)).collect();
    // Wait for the connection so that the run below is pipelined, not a queue of waiters.
    deliver_until_ok(sink.as_ref(), &numbered("inboundMessage", 10_000), deadline).await.unwrap();

    let mut routed = HashSet::new();
    for _round in 0..3 {
        let results = futures_util::future::join_all(envs.iter().map(|env| sink.deliver(env))).await;
        for (env, r) in envs.iter().zip(&results) {
            match (env.event.event_type.as_str(), r) {
                ("inboundMessage", Ok(())) => {
                    routed.insert(env.event.id.clone());
                }
                ("messageSend", Err(e)) if e.is_permanent() => {}
                (t, r) => panic!("{t} event {}: unexpected outcome {r:?}", env.event.id),
            }
        }
    }
    let on_queue: HashSet<String> = rabbit
        .drain()
        .await
        .iter()
        .filter_map(|m| m.delivery.properties.message_id().as_ref().map(|s| s.as_str().to_owned()))
        .collect();
    assert_eq!(routed.len(), 133);
    assert!(routed.is_subset(&on_queue), "every confirmed event is on the queue");
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_run_loses_no_event() {
    let rabbit = Rabbit::setup(ExchangeKind::Topic, Some("webio.#")).await;
    let proxy = Proxy::start(RABBITMQ.parse().unwrap()).await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let sink = amqp_sink("bus", &url, &rabbit.exchange, "connect_wait = \"200ms\"\nreconnect_max = \"500ms\"");
    let envs: Arc<Vec<_>> = Arc::new((0..300).map(|n| numbered("inboundMessage", n)).collect());
    let deadline = Instant::now() + Duration::from_secs(25);
    let failures = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicU32::new(0));
    // Worker 0 stops after 5 events until the connection is cut, so the run cannot be over
    // before the cut, however fast the broker; the other workers deliver through the cut.
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);

    // Eight workers deliver the events in turn, each retrying until its event is confirmed.
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (sink, envs, failures, done) = (sink.clone(), envs.clone(), failures.clone(), done.clone());
            let mut cut = cut_rx.clone();
            tokio::spawn(async move {
                for (i, env) in envs.iter().skip(w).step_by(8).enumerate() {
                    if w == 0 && i == 5 {
                        cut.wait_for(|cut| *cut).await.unwrap();
                    }
                    loop {
                        match sink.deliver(env).await {
                            Ok(()) => break,
                            Err(e) if e.is_permanent() => panic!("event {}: {e}", env.event.id),
                            Err(e) => {
                                failures.fetch_add(1, Ordering::SeqCst);
                                assert!(Instant::now() < deadline, "event {} not delivered in time: {e}", env.event.id);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    eventually("a third of the events are confirmed", Duration::from_secs(10), || done.load(Ordering::SeqCst) >= 100)
        .await;
    proxy.cut().await;
    assert!(done.load(Ordering::SeqCst) < 300, "the cut happened mid-run");
    eventually("the sink reports itself down", Duration::from_secs(5), || !sink.is_up()).await;
    let before = failures.load(Ordering::SeqCst);
    cut_tx.send_replace(true);
    eventually("deliveries fail while the broker is cut off", Duration::from_secs(5), || {
        failures.load(Ordering::SeqCst) > before
    })
    .await;
    proxy.restore().await;
    for w in workers {
        w.await.unwrap();
    }
    assert!(sink.is_up());

    let messages = rabbit.drain().await;
    let ids: HashSet<String> = messages
        .iter()
        .filter_map(|m| m.delivery.properties.message_id().as_ref().map(|s| s.as_str().to_owned()))
        .collect();
    let missing: Vec<_> = envs.iter().filter(|e| !ids.contains(&e.event.id)).map(|e| e.event.id.clone()).collect();
    assert!(missing.is_empty(), "{} events lost: {missing:?}", missing.len());
    assert!(messages.len() >= envs.len(), "duplicates allowed, losses not");
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_built_while_the_broker_is_away_starts_down_and_connects_later() {
    let rabbit = Rabbit::setup(ExchangeKind::Direct, Some("webio.inboundMessage")).await;
    let proxy = Proxy::start(RABBITMQ.parse().unwrap()).await;
    proxy.cut().await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let started = Instant::now();
    let sink = amqp_sink(
        "bus",
        &url,
        &rabbit.exchange,
        "exchange_type = \"direct\"\nconnect_wait = \"100ms\"\nreconnect_max = \"300ms\"",
    );
    assert!(started.elapsed() < Duration::from_millis(500), "building does not wait for the broker");
    assert!(!sink.is_up());
    let env = numbered("inboundMessage", 1);
    let err = sink.deliver(&env).await.expect_err("no broker yet");
    assert!(!err.is_permanent(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "a delivery while down fails fast");

    proxy.restore().await;
    eventually("the sink connects", Duration::from_secs(5), || sink.is_up()).await;
    sink.deliver(&env).await.unwrap();
    assert_eq!(rabbit.drain().await.len(), 1);
    rabbit.cleanup().await;
}

/// Why a sink table is refused when it is read (typed options: URL, exchange type, durations).
fn refused(toml_text: &str) -> String {
    match toml::from_str::<webio_router::sinks::SinkConfig>(toml_text) {
        Ok(cfg) => panic!("accepted: {cfg:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn check_reports_a_bad_amqp_url_a_bad_exchange_type_a_bad_duration_and_a_bad_routing_key() {
    // Options with a type are refused as the table is read, each with what was wrong.
    let base = "type = \"amqp\"\nexchange = \"webio\"\n";
    let url = refused(&format!("{base}url = \"http://127.0.0.1:5672/\""));
    assert!(url.contains("url: must start with amqp:// or amqps://"), "{url}");
    let url = format!("{base}url = \"amqp://127.0.0.1/\"\n");
    let kind = refused(&format!("{url}exchange_type = \"topical\""));
    assert!(kind.contains("topical") && kind.contains("direct") && kind.contains("headers"), "{kind}");
    for key in ["confirm_timeout", "connect_wait", "reconnect_max"] {
        let e = refused(&format!("{url}{key} = \"soon\""));
        assert!(e.contains("invalid duration \"soon\""), "{key}: {e}");
    }
    for bad in ["amqp://", "amqp://host:port/", "amqp://h/?heartbeat=often", "rabbit.example:5672"] {
        let e = refused(&format!("type = \"amqp\"\nurl = \"{bad}\"\nexchange = \"x\""));
        assert!(e.contains("url: "), "{bad}: {e}");
    }

    // The others are checked together, each under its own key.
    let cfg = sink_config(
        r#"
        type = "amqp"
        url = "amqp://127.0.0.1:5672/"
        exchange = "amq.topic"
        routing_key = "webio.{nope}"
        "#,
    );
    let errs = cfg.validate();
    let keys: Vec<&str> = errs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["exchange", "routing_key"], "{errs:?}");
    assert!(errs[0].1.contains("declare = false"), "{errs:?}");

    let ok =
        sink_config("type = \"amqp\"\nurl = \"amqps://u:p@rabbit.example:5671/vh?heartbeat=10\"\nexchange = \"x\"");
    assert_eq!(ok.validate(), vec![]);

    // The same through `routes.toml`, as `webio-router check` reports them.
    let text = r#"
[sinks.bus]
type = "amqp"
url = "amqp//nowhere"
exchange = "webio"

[sinks.slow]
type = "amqp"
url = "amqp://127.0.0.1/"
exchange = "webio"
confirm_timeout = "10 parsecs"

[[routes]]
to = ["bus", "slow"]
"#;
    let err = webio_router::routes::Routes::parse("routes.toml", text, |_| None).expect_err("refused");
    let shown = err.to_string();
    // Each at its own line, the option named once.
    assert!(shown.contains("routes.toml:4:7: sinks.bus.url: must start with amqp://"), "{shown}");
    assert!(
        shown.contains("routes.toml:11:19: sinks.slow.confirm_timeout: invalid duration \"10 parsecs\""),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_closed_by_the_broker_is_retryable_and_the_sink_recovers() {
    // declare = false and no such exchange yet: RabbitMQ closes the channel (404 NOT_FOUND).
    let rabbit = Rabbit::setup(ExchangeKind::Topic, None).await;
    let missing = unique("webio-test-x");
    let sink = amqp_sink("bus", &rabbit_url(), &missing, "declare = false\nreconnect_max = \"300ms\"");
    let env = numbered("inboundMessage", 1);
    eventually("the sink connects", Duration::from_secs(5), || sink.is_up()).await;
    let err = sink.deliver(&env).await.expect_err("no such exchange");
    assert!(!err.is_permanent(), "{err:?}");

    // Once the exchange exists (and a queue is bound), the same event goes through.
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    rabbit
        .ch
        .exchange_declare(missing.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
        .await
        .unwrap();
    let exclusive = QueueDeclareOptions { exclusive: true, ..Default::default() };
    rabbit.ch.queue_declare(rabbit.queue.as_str().into(), exclusive, FieldTable::default()).await.unwrap();
    let bind = QueueBindOptions::default();
    let (q, x) = (rabbit.queue.as_str().into(), missing.as_str().into());
    rabbit.ch.queue_bind(q, x, "#".into(), bind, FieldTable::default()).await.unwrap();
    let failures = deliver_until_ok(sink.as_ref(), &env, Instant::now() + Duration::from_secs(10)).await.unwrap();
    println!("{failures} more failed attempts before the channel was back");
    assert_eq!(rabbit.drain().await.len(), 1);
    let _ = rabbit.ch.exchange_delete(missing.as_str().into(), ExchangeDeleteOptions::default()).await;
    rabbit.cleanup().await;
}
