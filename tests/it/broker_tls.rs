//! Secured brokers (README "Operating it"): Kafka over TLS and SASL with every compression codec, RabbitMQ
//! over `amqps://`, and one rustls crypto provider for the whole binary.
//!
//! No Kafka broker speaks TLS here, so the Kafka tests show what the producer really sends: a
//! TLS endpoint with a CA made by the test decrypts the producer's first request. RabbitMQ's
//! TLS is shown through a TLS-terminating proxy in front of the local RabbitMQ.

use crate::helpers::brokers::*;
use crate::helpers::tls::*;
use crate::helpers::{bin, router};
use lapin::options::{BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const RABBITMQ: &str = "127.0.0.1:5672";

/// `webio-router check` on `routes`: (exit code, stdout + stderr).
fn check(routes: &str) -> (Option<i32>, String) {
    let (dir, cfg, _) = router("", routes).write();
    let out = Command::new(bin()).args(["--config", cfg.to_str().unwrap(), "check"]).current_dir(dir.path()).output();
    let out = out.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[test]
fn check_accepts_kafka_over_sasl_ssl_with_scram_and_every_compression_codec() {
    let ca = TestCa::new();
    let ca_file = ca.ca_file.display();
    let sink = |name: &str, protocol: &str, mechanism: Option<&str>, codec: &str| {
        let sasl = mechanism
            .map(|m| {
                format!("\"sasl.mechanism\" = \"{m}\"\n\"sasl.username\" = \"webio\"\n\"sasl.password\" = \"pw\"\n")
            })
            .unwrap_or_default();
        format!(
            "[sinks.{name}]\ntype = \"kafka\"\nbrokers = \"kafka-1:9093\"\ntopic = \"webio.{{type}}\"\n\
             [sinks.{name}.properties]\n\"security.protocol\" = \"{protocol}\"\n\"ssl.ca.location\" = \"{ca_file}\"\n\
             \"compression.type\" = \"{codec}\"\n{sasl}\n"
        )
    };
    let mut routes = String::new();
    routes += &sink("scram256", "sasl_ssl", Some("SCRAM-SHA-256"), "gzip");
    routes += &sink("scram512", "sasl_ssl", Some("SCRAM-SHA-512"), "snappy");
    routes += &sink("plain", "sasl_ssl", Some("PLAIN"), "lz4");
    routes += &sink("tls", "ssl", None, "zstd");
    routes += "[[routes]]\nto = [\"scram256\", \"scram512\", \"plain\", \"tls\"]\n";
    let (code, out) = check(&routes);
    assert_eq!(code, Some(0), "{out}");
    for name in ["scram256", "scram512", "plain", "tls"] {
        assert!(out.contains(&format!("sink {name}: kafka")), "{name} missing:\n{out}");
    }
    assert!(!out.contains("not available at build time"), "{out}");

    // librdkafka still judges the values: an unknown codec and a missing CA file are refused.
    let (code, out) = check(
        "[sinks.k]\ntype = \"kafka\"\nbrokers = \"k:9093\"\ntopic = \"t\"\n[sinks.k.properties]\n\
         \"compression.type\" = \"brotli\"\n[[routes]]\nto = [\"k\"]\n",
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("sinks.k.properties.compression.type"), "{out}");
    let (code, out) = check(
        "[sinks.k]\ntype = \"kafka\"\nbrokers = \"k:9093\"\ntopic = \"t\"\n[sinks.k.properties]\n\
         \"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"/nonexistent/ca.pem\"\n[[routes]]\nto = [\"k\"]\n",
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("sinks.k.properties") && out.contains("ssl.ca.location"), "{out}");
}

/// A kafka sink whose producer talks to `endpoint` with `properties`.
fn kafka_sink_to(endpoint: &TlsEndpoint, properties: &str) -> std::sync::Arc<dyn webio_router::sinks::Sink> {
    let cfg = sink_config(&format!(
        "type = \"kafka\"\nbrokers = \"{}\"\ntopic = \"webio.{{type}}\"\n[properties]\n\"message.timeout.ms\" = 2000\n{properties}",
        endpoint.addr
    ));
    assert_eq!(cfg.validate(), vec![]);
    cfg.build("stream-tls").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_producer_over_ssl_and_sasl_ssl_sends_its_requests_inside_a_verified_tls_session() {
    let ca = TestCa::new();
    let ca_file = ca.ca_file.display().to_string();
    for extra in [
        format!("\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"{ca_file}\""),
        format!(
            "\"security.protocol\" = \"sasl_ssl\"\n\"ssl.ca.location\" = \"{ca_file}\"\n\
             \"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"webio\"\n\"sasl.password\" = \"pw\""
        ),
    ] {
        let endpoint = TlsEndpoint::start(ca.server.clone()).await;
        let sink = kafka_sink_to(&endpoint, &extra);
        // A delivery makes the producer fetch metadata; it cannot succeed (nobody answers).
        let delivery = tokio::spawn({
            let sink = sink.clone();
            async move { sink.deliver(&numbered("inboundMessage", 1)).await }
        });
        let requests = endpoint.requests.clone();
        eventually("a Kafka request arrives over TLS", Duration::from_secs(15), || {
            !requests.lock().unwrap().is_empty()
        })
        .await;
        let first = requests.lock().unwrap()[0].clone();
        let header = kafka_request_header(&first).unwrap_or_else(|| panic!("not a Kafka request: {first:?}"));
        assert_eq!(header.api_key, 18, "ApiVersions first ({extra}): {header:?}");
        assert_eq!(header.client_id, "webio-router", "{header:?}");
        assert_eq!(*endpoint.failed_handshakes.lock().unwrap(), 0);
        let err = delivery.await.unwrap().expect_err("no broker answered");
        assert!(!err.is_permanent(), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_producer_refuses_a_broker_certificate_that_its_ca_file_did_not_sign() {
    let (ca, other) = (TestCa::new(), TestCa::new());
    let endpoint = TlsEndpoint::start(ca.server.clone()).await;
    let sink = kafka_sink_to(
        &endpoint,
        &format!("\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"{}\"", other.ca_file.display()),
    );
    let delivery = tokio::spawn({
        let sink = sink.clone();
        async move { sink.deliver(&numbered("inboundMessage", 1)).await }
    });
    let failed = endpoint.failed_handshakes.clone();
    eventually("the producer aborts the handshake", Duration::from_secs(15), || *failed.lock().unwrap() > 0).await;
    assert!(endpoint.requests.lock().unwrap().is_empty(), "nothing is sent to an unverified broker");
    assert!(delivery.await.unwrap().is_err());
    assert!(!sink.is_up());
}

/// A durable exchange and an exclusive queue bound to it, on the local RabbitMQ.
async fn rabbit_queue() -> (Connection, lapin::Channel, String, String) {
    let conn = Connection::connect(&format!("amqp://guest:guest@{RABBITMQ}/%2f"), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ must be running on {RABBITMQ} (guest/guest): {e}"));
    let ch = conn.create_channel().await.unwrap();
    let (exchange, queue) = (unique("webio-test-x"), unique("webio-test-q"));
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare(exchange.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default()).await.unwrap();
    let exclusive = QueueDeclareOptions { exclusive: true, ..Default::default() };
    ch.queue_declare(queue.as_str().into(), exclusive, FieldTable::default()).await.unwrap();
    let (q, x) = (queue.as_str().into(), exchange.as_str().into());
    ch.queue_bind(q, x, "webio.#".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap();
    (conn, ch, exchange, queue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqps_sink_publishes_through_tls_with_confirms_and_the_message_is_consumed_back() {
    let ca = TestCa::new();
    let proxy = Proxy::start_tls(RABBITMQ.parse().unwrap(), ca.server.clone()).await;
    let (_conn, ch, exchange, queue) = rabbit_queue().await;
    let url = format!("amqps://guest:guest@{}/%2f", proxy.addr);
    let cfg = sink_config(&format!(
        "type = \"amqp\"\nurl = \"{url}\"\nexchange = \"{exchange}\"\ntls_ca_file = \"{}\"\nconfirm_timeout = \"3s\"",
        ca.ca_file.display()
    ));
    assert_eq!(cfg.validate(), vec![]);
    let sink = cfg.build("bus-tls").unwrap();
    let env = numbered("inboundMessage", 1);
    deliver_until_ok(sink.as_ref(), &env, Instant::now() + Duration::from_secs(15)).await.unwrap();
    assert!(sink.is_up());
    assert!(proxy.stats().sessions.load(Ordering::SeqCst) >= 1, "the sink's connection went through TLS");
    assert_eq!(proxy.stats().failed.load(Ordering::SeqCst), 0);

    let got = ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap();
    let got = got.expect("the event is on the queue");
    let id = got.delivery.properties.message_id().as_ref().map(|s| s.as_str().to_owned());
    assert_eq!(id.as_deref(), Some(env.event.id.as_str()));
    let _ = ch.exchange_delete(exchange.as_str().into(), Default::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqps_sink_without_the_private_ca_refuses_the_broker_and_stays_down() {
    let ca = TestCa::new();
    let proxy = Proxy::start_tls(RABBITMQ.parse().unwrap(), ca.server.clone()).await;
    let url = format!("amqps://guest:guest@{}/%2f", proxy.addr);
    let cfg = sink_config(&format!(
        "type = \"amqp\"\nurl = \"{url}\"\nexchange = \"webio\"\nconnect_wait = \"200ms\"\nreconnect_max = \"300ms\""
    ));
    let sink = cfg.build("bus-untrusted").unwrap();
    let stats = proxy.stats();
    eventually("the sink aborts the TLS handshake", Duration::from_secs(10), || {
        stats.failed.load(Ordering::SeqCst) > 0
    })
    .await;
    let err = sink.deliver(&numbered("inboundMessage", 1)).await.expect_err("the broker is not trusted");
    assert!(!err.is_permanent(), "{err}");
    assert!(!sink.is_up());
    assert_eq!(stats.sessions.load(Ordering::SeqCst), 0);
}

#[test]
fn check_reports_an_unreadable_ca_file_and_one_given_for_a_plain_amqp_url() {
    let (code, out) = check(
        "[sinks.bus]\ntype = \"amqp\"\nurl = \"amqps://rabbit.example/\"\nexchange = \"webio\"\n\
         tls_ca_file = \"/nonexistent/ca.pem\"\n[[routes]]\nto = [\"bus\"]\n",
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("sinks.bus.tls_ca_file") && out.contains("/nonexistent/ca.pem"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let (code, out) = check(&format!(
        "[sinks.bus]\ntype = \"amqp\"\nurl = \"amqp://rabbit.example/\"\nexchange = \"webio\"\n\
         tls_ca_file = \"{}\"\n[[routes]]\nto = [\"bus\"]\n",
        not_pem.display()
    ));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("only used with an amqps:// URL"), "{out}");
    assert!(out.contains("no PEM certificate"), "{out}");
}

#[test]
fn the_lockfile_holds_one_rustls_crypto_provider() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    let packages: Vec<&str> =
        lock.lines().filter_map(|l| l.strip_prefix("name = \"")).map(|l| l.trim_end_matches('"')).collect();
    assert!(packages.contains(&"ring"), "ring is the provider");
    for other in ["aws-lc-rs", "aws-lc-sys", "aws-lc-fips-sys"] {
        assert!(!packages.contains(&other), "{other} is in Cargo.lock: a second crypto provider");
    }
}
