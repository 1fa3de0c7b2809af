//! W3C `traceparent`: each event carries the request's valid trace context, or a new one,
//! to its sinks (here the HTTP sink's `traceparent` header), also after a restart (the
//! context is stored with the event in the spool).

use crate::helpers::{request, spawn_app, token, Capture, PATH, SECRET};
use std::time::Duration;

const GIVEN: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn routes(sink: &Capture) -> String {
    format!("[sinks.crm]\ntype = \"http\"\nurl = \"{}\"\n[[routes]]\nto = [\"crm\"]\n", sink.url("/events"))
}

fn post(addr: std::net::SocketAddr, body: &str, traceparent: Option<&str>) -> u16 {
    let t = token();
    let mut headers = vec![("x-webio-token", t.as_str()), ("content-type", "application/json")];
    if let Some(tp) = traceparent {
        headers.push(("traceparent", tp));
    }
    request(addr, "POST", PATH, &headers, body.as_bytes()).status
}

/// `00-<32 hex>-<16 hex>-<2 hex>`, lowercase, ids not all zeros.
fn assert_valid(tp: &str) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00", "{tp}");
    for (part, len) in parts[1..].iter().zip([32, 16, 2]) {
        assert_eq!(part.len(), len, "{tp}");
        assert!(part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{tp}");
    }
    assert!(parts[1].bytes().any(|b| b != b'0') && parts[2].bytes().any(|b| b != b'0'), "{tp}");
}

fn traceparent_of(c: &crate::helpers::Captured) -> String {
    c.headers.get("traceparent").cloned().unwrap_or_else(|| panic!("no traceparent header: {:?}", c.headers))
}

#[test]
fn the_requests_trace_context_reaches_the_http_sink_and_others_get_a_new_valid_one() {
    let sink = Capture::start(200);
    let app = spawn_app("", &routes(&sink));
    assert_eq!(post(app.addr, r#"{"type":"payment","conversationId":"t-1"}"#, Some(GIVEN)), 202);
    assert_eq!(post(app.addr, r#"{"type":"payment","conversationId":"t-2"}"#, None), 202);
    let bad = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    assert_eq!(post(app.addr, r#"{"type":"payment","conversationId":"t-3"}"#, Some(bad)), 202);
    let got = sink.wait_for(3, Duration::from_secs(10));
    let by_n = |n: i64| {
        let conversation = format!("t-{n}");
        got.iter()
            .find(|c| c.json()["conversationId"] == conversation.as_str())
            .unwrap_or_else(|| panic!("event {n} missing"))
    };
    let given = traceparent_of(by_n(1));
    assert_eq!(&given[3..35], "4bf92f3577b34da6a3ce929d0e0e4736", "the trace id is the request's");
    assert_eq!(given, GIVEN);
    let fresh = traceparent_of(by_n(2));
    assert_valid(&fresh);
    assert!(fresh.ends_with("-01"), "sampled: {fresh}");
    let replaced = traceparent_of(by_n(3));
    assert_valid(&replaced);
    assert_ne!(&replaced[3..35], "4bf92f3577b34da6a3ce929d0e0e4736", "an invalid header is replaced");
    assert_ne!(fresh, replaced);
}

#[test]
fn a_delivery_after_a_restart_carries_the_same_trace_context() {
    let spool = tempfile::tempdir().unwrap();
    let sink = Capture::start(503);
    let config = format!(
        "routes_file = \"{{dir}}/routes.toml\"\n[auth]\nsecrets = [\"{SECRET}\"]\n[delivery]\nmode = \"spool\"\nspool_dir = \"{}\"\ndead_letter_file = \"{{dir}}/dead.jsonl\"\nretry_initial = \"50ms\"\nretry_max = \"100ms\"\nmax_attempts = 1000\nshutdown_timeout = \"2s\"\n",
        spool.path().display()
    );
    let first = spawn_app(&config, &routes(&sink));
    assert_eq!(post(first.addr, r#"{"type":"payment","conversationId":"t-7"}"#, Some(GIVEN)), 202);
    assert!(!sink.wait_for(1, Duration::from_secs(10)).is_empty(), "a first attempt was refused");
    first.stop();

    sink.set_status(200);
    let before = sink.received().len();
    let second = spawn_app(&config, &routes(&sink));
    let got = sink.wait_for(before + 1, Duration::from_secs(10));
    assert!(got.len() > before, "delivered after the restart");
    for c in &got {
        assert_eq!(traceparent_of(c), GIVEN, "every attempt, before and after the restart");
    }
    drop(second);
}
