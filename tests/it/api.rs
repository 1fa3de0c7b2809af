//! The HTTP contract of README "HTTP answers", the normalised output of every fixture, authentication,
//! routing semantics, direct delivery and signals. In-process ([`spawn_app`]) where HTTP is
//! the point; the real binary where metrics, signals or log lines are.

use crate::helpers::*;
use serde_json::{json, Value};
use std::time::Duration;

const ARCHIVE: &str = r#"
[sinks.archive]
type = "file"
path = "{dir}/var/events.jsonl"

[[routes]]
name = "everything"
to = ["archive"]
"#;

const INBOUND: &[u8] = br#"{"type":"inboundMessage","conversationId":"97847","communicationActionId":"220859","body":"hi","dateCreated":"2021-01-28 12:21:28.373"}"#;

fn strip_volatile(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    for k in ["id", "receivedAt", "organisationId"] {
        o.remove(k);
    }
    v
}

#[test]
fn a_valid_token_and_object_body_are_accepted_with_202_and_the_event_id() {
    let r = spawn_app("", ARCHIVE);
    let resp = r.post(INBOUND);
    assert_eq!(resp.status, 202, "{}", resp.body);
    let body = resp.json();
    assert_eq!(body["status"], "accepted");
    assert_eq!(body["routes"], 1);
    let id = body["id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    let events = r.jsonl("var/events.jsonl");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["id"], id);
    assert_eq!(events[0]["organisationId"], "42");
    assert_eq!(events[0]["schema"], "webio.event/v1");
}

#[test]
fn every_webio_fixture_is_normalised_to_its_expected_event() {
    let r = spawn_app("", ARCHIVE);
    let dir = fixtures().join("webio");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json") && !p.to_string_lossy().ends_with(".expected.json"))
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 7, "fixtures missing in {}", dir.display());
    for input in &inputs {
        let body = std::fs::read(input).unwrap();
        let resp = r.post(&body);
        assert_eq!(resp.status, 202, "{}: {}", input.display(), resp.body);
        let id = resp.json()["id"].as_str().unwrap().to_owned();
        let got = r.jsonl("var/events.jsonl").into_iter().find(|e| e["id"] == id.as_str()).unwrap();
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(input.with_extension("expected.json")).unwrap()).unwrap();
        assert_eq!(strip_volatile(got), strip_volatile(expected), "{}", input.display());
    }
}

#[test]
fn bad_bodies_are_refused_with_400_and_kept_in_rejected_jsonl_with_the_reason() {
    let r = spawn_app("", ARCHIVE);
    let dir = fixtures().join("bad");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let body = std::fs::read(&path).unwrap();
        let resp = r.post(&body);
        assert_eq!(resp.status, 400, "{}: {}", path.display(), resp.body);
        assert!(resp.json()["error"].is_string());
        n += 1;
        let rejected = r.jsonl("var/rejected.jsonl");
        assert_eq!(rejected.len(), n, "{}", path.display());
        let last = rejected.last().unwrap();
        assert!(last["reason"].is_string());
        assert_eq!(last["body"].as_str().unwrap().as_bytes(), &body[..], "{}", path.display());
    }
    assert!(r.jsonl("var/events.jsonl").is_empty());
}

#[test]
fn the_content_type_is_not_trusted_and_json_is_parsed_whatever_it_says() {
    let r = spawn_app("", ARCHIVE);
    let t = token();
    for (i, ct) in ["text/plain", "application/x-www-form-urlencoded", "application/octet-stream"].iter().enumerate() {
        let body = format!(r#"{{"type":"inboundMessage","conversationId":"{i}"}}"#);
        let resp = request(r.addr, "POST", PATH, &[("x-webio-token", &t), ("content-type", ct)], body.as_bytes());
        assert_eq!(resp.status, 202, "{ct}: {}", resp.body);
    }
}

fn crafted(header: Value, claims: Value, secret: &str) -> String {
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let signing_input = format!("{}.{}", b64(&header), b64(&claims));
    let alg = match header["alg"].as_str() {
        Some("HS384") => jsonwebtoken::Algorithm::HS384,
        Some("HS512") => jsonwebtoken::Algorithm::HS512,
        _ => jsonwebtoken::Algorithm::HS256,
    };
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    let sig = jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, alg).unwrap();
    format!("{signing_input}.{sig}")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[test]
fn every_auth_refusal_class_is_a_401_naming_the_reason_never_the_token() {
    let r = router("", ARCHIVE).env("WEBIO_ROUTER_AUTH__ORGANISATION_ID", "42").spawn();
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing", None, "missing"),
        ("malformed", Some("not-a-jwt".into()), "malformed"),
        ("malformed", Some("a.b.c".into()), "malformed"),
        ("bad_signature", Some(signed_token("some-other-secret-that-is-long-enough-xx", Some("42"))), "signature"),
        (
            "expired",
            Some(crafted(hs256.clone(), json!({"organisationId": "42", "exp": now() - 3600}), SECRET)),
            "expired",
        ),
        (
            "not_yet_valid",
            Some(crafted(hs256.clone(), json!({"organisationId": "42", "nbf": now() + 3600}), SECRET)),
            "not yet valid",
        ),
        ("algorithm", Some(crafted(json!({"alg": "none"}), json!({"organisationId": "42"}), SECRET)), "algorithm"),
        ("algorithm", Some(crafted(json!({"alg": "HS512"}), json!({"organisationId": "42"}), SECRET)), "algorithm"),
        ("organisation", Some(signed_token(SECRET, Some("43"))), "organisation"),
        ("organisation", Some(signed_token(SECRET, None)), "organisation"),
    ];
    for (reason, tok, words) in &cases {
        let mut headers = vec![];
        if let Some(t) = tok {
            headers.push(("x-webio-token", t.as_str()));
        }
        let resp = request(r.addr, "POST", PATH, &headers, INBOUND);
        assert_eq!(resp.status, 401, "{reason}: {}", resp.body);
        let err = resp.json()["error"].as_str().unwrap().to_owned();
        assert!(err.contains(words), "{reason}: {err}");
        if let Some(t) = tok {
            assert!(!resp.body.contains(t.as_str()), "the token leaked into the answer");
            for part in t.split('.').filter(|p| p.len() > 8) {
                assert!(!r.log_text().contains(part), "the token leaked into the log");
            }
        }
    }
    for reason in ["missing", "malformed", "bad_signature", "expired", "not_yet_valid", "algorithm", "organisation"] {
        let n = r.metric(&format!("webio_router_auth_failures_total{{reason=\"{reason}\"}}"));
        assert!(n >= 1.0, "no auth failure counted for {reason}");
    }
    assert!(r.jsonl("var/events.jsonl").is_empty());
}

#[test]
fn a_token_with_no_expiry_is_accepted_and_one_within_the_leeway_too() {
    let r = spawn_app("", ARCHIVE);
    let hs256 = json!({"alg": "HS256"});
    for (i, claims) in
        [json!({"organisationId": 42}), json!({"organisationId": "42", "exp": now() - 10})].into_iter().enumerate()
    {
        let t = crafted(hs256.clone(), claims, SECRET);
        let body = format!(r#"{{"type":"inboundMessage","conversationId":"{i}"}}"#);
        let resp = request(r.addr, "POST", PATH, &[("x-webio-token", &t)], body.as_bytes());
        assert_eq!(resp.status, 202, "{}", resp.body);
    }
}

#[test]
fn during_a_rotation_both_secrets_are_accepted_and_counted_by_index() {
    let config = format!(
        "routes_file = \"{{dir}}/routes.toml\"\n[auth]\nsecrets = [\"{SECRET}\", \"{SECRET2}\"]\n[delivery]\nmode = \"direct\"\ndead_letter_file = \"{{dir}}/var/dead.jsonl\"\n"
    );
    let r = router(&config, ARCHIVE).spawn();
    for (secret, conv) in [(SECRET, "1"), (SECRET2, "2")] {
        let t = signed_token(secret, Some("42"));
        let body = format!(r#"{{"type":"inboundMessage","conversationId":"{conv}"}}"#);
        let resp = request(r.addr, "POST", PATH, &[("x-webio-token", &t)], body.as_bytes());
        assert_eq!(resp.status, 202, "{}", resp.body);
    }
    assert_eq!(r.metric("webio_router_auth_secret_used_total{index=\"0\"}"), 1.0);
    assert_eq!(r.metric("webio_router_auth_secret_used_total{index=\"1\"}"), 1.0);
}

#[test]
fn a_body_over_max_body_bytes_gets_413() {
    let r = spawn_app("[server]\nmax_body_bytes = 1024\n", ARCHIVE);
    let big = format!(r#"{{"type":"inboundMessage","body":"{}"}}"#, "x".repeat(4096));
    assert_eq!(r.post(big.as_bytes()).status, 413);
    // Without a content-length (chunked), the limit still holds.
    let t = token();
    let mut s = std::net::TcpStream::connect(r.addr).unwrap();
    use std::io::{Read, Write};
    let chunk = format!("{:x}\r\n{big}\r\n0\r\n\r\n", big.len());
    let head = format!("POST {PATH} HTTP/1.1\r\nhost: x\r\nx-webio-token: {t}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(chunk.as_bytes());
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert_eq!(parse_response(&raw).status, 413);
    // A body just under the limit is fine.
    assert_eq!(r.post(INBOUND).status, 202);
}

#[test]
fn other_methods_get_405_with_allow_post_and_other_paths_404() {
    let r = spawn_app("", ARCHIVE);
    for m in ["GET", "PUT", "DELETE", "PATCH"] {
        let resp = request(r.addr, m, PATH, &[], b"");
        assert_eq!(resp.status, 405, "{m}");
        assert_eq!(resp.header("allow"), Some("POST"));
    }
    let t = token();
    assert_eq!(request(r.addr, "POST", "/elsewhere", &[("x-webio-token", &t)], INBOUND).status, 404);
    assert_eq!(request(r.addr, "POST", "/webhooks/webio/extra", &[("x-webio-token", &t)], INBOUND).status, 404);
    // The query string is not part of the path.
    assert_eq!(request(r.addr, "POST", "/webhooks/webio?x=1", &[("x-webio-token", &t)], INBOUND).status, 202);
}

#[test]
fn the_same_event_again_inside_the_dedup_window_is_a_200_duplicate_and_not_resent() {
    let r = spawn_router(ARCHIVE);
    let first = r.post(INBOUND);
    assert_eq!(first.status, 202);
    // Same content, different formatting: the same event.
    let again = r.post(b"{ \"conversationId\": \"97847\", \"type\": \"inboundMessage\", \"communicationActionId\": \"220859\", \"body\": \"hi\", \"dateCreated\": \"2021-01-28 12:21:28.373\" }");
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json(), json!({"status": "duplicate", "id": first.json()["id"]}));
    assert_eq!(r.jsonl("var/events.jsonl").len(), 1);
    assert_eq!(r.metric("webio_router_duplicates_total"), 1.0);
}

#[test]
fn an_event_that_matches_no_route_is_accepted_with_zero_routes_and_counted() {
    let routes = r#"
[sinks.archive]
type = "file"
path = "{dir}/var/events.jsonl"
[[routes]]
when = { type = "payment" }
to = ["archive"]
"#;
    let r = spawn_router(routes);
    let resp = r.post(INBOUND);
    assert_eq!(resp.status, 202);
    assert_eq!(resp.json()["routes"], 0);
    assert_eq!(r.metric("webio_router_unrouted_total{type=\"inboundMessage\"}"), 1.0);
    assert!(r.jsonl("var/events.jsonl").is_empty());
}

const ROUTING: &str = r#"
[sinks.a]
type = "file"
path = "{dir}/a.jsonl"
[sinks.b]
type = "file"
path = "{dir}/b.jsonl"
[sinks.c]
type = "file"
path = "{dir}/c.jsonl"
[sinks.typed]
type = "file"
path = "{dir}/by-type/{type}.jsonl"

[[routes]]
name = "failures-stop"
when = { type = "messageStatusUpdate", statusCode = [3, 4] }
to = ["a"]
stop = true

[[routes]]
name = "message-wildcard"
when = { type = "message*" }
to = ["a", "b"]

[[routes]]
name = "closed-by-agent"
when = { "extra.closedBy" = "agent-*" }
to = ["c", "a"]

[[routes]]
name = "all"
to = ["b", "typed"]
"#;

fn ids(r: &TestApp, file: &str) -> Vec<String> {
    r.jsonl(file).iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn routes_apply_in_order_with_stop_fan_out_wildcards_and_one_delivery_per_sink() {
    let r = spawn_app("", ROUTING);
    let failed = r.post(br#"{"type":"messageStatusUpdate","communicationActionId":"1","statusCode":"3"}"#);
    let delivered = r.post(br#"{"type":"messageStatusUpdate","communicationActionId":"2","statusCode":"2"}"#);
    let closed = r.post(br#"{"type":"conversationClosed","conversationId":"9","closedBy":"agent-17"}"#);
    let payment = r.post(br#"{"type":"payment","amount":12}"#);
    let id = |resp: &Response| resp.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(failed.json()["routes"], 1, "stop ends the walk");
    assert_eq!(delivered.json()["routes"], 2);
    assert_eq!(closed.json()["routes"], 2);
    assert_eq!(payment.json()["routes"], 1);

    let (a, b, c) = (ids(&r, "a.jsonl"), ids(&r, "b.jsonl"), ids(&r, "c.jsonl"));
    assert_eq!(a, vec![id(&failed), id(&delivered), id(&closed)]);
    // `delivered` matches two routes naming b, and b gets it once.
    assert_eq!(b, vec![id(&delivered), id(&closed), id(&payment)]);
    assert_eq!(c, vec![id(&closed)]);
    assert_eq!(ids(&r, "by-type/payment.jsonl"), vec![id(&payment)]);
    assert_eq!(ids(&r, "by-type/messageStatusUpdate.jsonl"), vec![id(&delivered)]);
}

#[test]
fn the_http_sink_receives_the_event_with_its_metadata_headers_and_formats() {
    let cap = Capture::start(200);
    let routes = format!(
        r#"
[sinks.crm]
type = "http"
url = "{}"
headers = {{ "x-api-key" = "${{TEST_CRM_KEY}}", "x-conversation" = "{{conversationId}}" }}
[sinks.ce]
type = "http"
url = "{}"
format = "cloudevents"
[sinks.raw]
type = "http"
url = "{}"
format = "raw"
[[routes]]
to = ["crm", "ce", "raw"]
"#,
        cap.url("/event"),
        cap.url("/ce"),
        cap.url("/raw")
    );
    let r = router("", &routes).env("TEST_CRM_KEY", "k-123").spawn();
    let resp = r.post(INBOUND);
    assert_eq!(resp.status, 202, "{}", resp.body);
    let id = resp.json()["id"].as_str().unwrap().to_owned();
    let got = cap.wait_for(3, Duration::from_secs(5));
    let by_path = |p: &str| got.iter().find(|c| c.path == p).unwrap_or_else(|| panic!("nothing at {p}")).clone();

    let ev = by_path("/event");
    assert_eq!(ev.method, "POST");
    assert_eq!(ev.headers["idempotency-key"], id);
    assert_eq!(ev.headers["x-webio-event-id"], id);
    assert_eq!(ev.headers["x-webio-event-type"], "inboundMessage");
    assert_eq!(ev.headers["x-api-key"], "k-123");
    assert_eq!(ev.headers["x-conversation"], "97847");
    assert_eq!(ev.json()["id"], id.as_str());
    assert_eq!(ev.json()["body"], "hi");

    let ce = by_path("/ce");
    assert_eq!(ce.headers["content-type"], "application/cloudevents+json");
    let ce = ce.json();
    assert_eq!(ce["specversion"], "1.0");
    assert_eq!(ce["id"], id.as_str());
    assert_eq!(ce["type"], "inboundMessage");
    assert!(ce["source"].as_str().unwrap().starts_with("webio-router"));
    assert_eq!(ce["time"], "2021-01-28T12:21:28.373Z");
    assert_eq!(ce["data"]["id"], id.as_str());

    assert_eq!(by_path("/raw").body, INBOUND);
}

#[test]
fn in_direct_mode_a_failing_sink_answers_503_with_retry_after_and_the_retry_goes_out_again() {
    let cap = Capture::start(500);
    let routes = format!("[sinks.crm]\ntype = \"http\"\nurl = \"{}\"\n[[routes]]\nto = [\"crm\"]\n", cap.url("/hook"));
    let r = spawn_router(&routes);
    let resp = r.post(INBOUND);
    assert_eq!(resp.status, 503, "{}", resp.body);
    assert!(resp.header("retry-after").is_some());
    // (A permanent refusal, 4xx other than 408/429, is dead-lettered instead: tests/it/direct_mode.rs.)
    // Once the sink is back the sender's retry is delivered, not taken for a duplicate.
    cap.set_status(200);
    let resp = r.post(INBOUND);
    assert_eq!(resp.status, 202, "{}", resp.body);
    assert_eq!(cap.received().len(), 2);
    assert_eq!(r.metric("webio_router_deliveries_total{sink=\"crm\",outcome=\"ok\"}"), 1.0);

    // A sink nobody listens on.
    let dead = dead_addr();
    let routes =
        format!("[sinks.crm]\ntype = \"http\"\nurl = \"http://{}/x\"\n[[routes]]\nto = [\"crm\"]\n", dead.addr);
    let r = spawn_router(&routes);
    let resp = r.post(INBOUND);
    assert_eq!(resp.status, 503);
    assert!(resp.header("retry-after").is_some());
}

#[test]
fn health_readiness_and_metrics_are_served_on_the_admin_listener() {
    let r = spawn_router(ARCHIVE);
    assert_eq!(get(r.admin, "/healthz").status, 200);
    let ready = get(r.admin, "/readyz");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready");
    r.post(INBOUND);
    let m = r.metrics();
    for name in [
        "webio_router_requests_total{status=\"202\"}",
        "webio_router_request_duration_seconds_bucket",
        "webio_router_events_total{type=\"inboundMessage\",shape=\"current\"}",
        "webio_router_deliveries_total{sink=\"archive\",outcome=\"ok\"}",
        "webio_router_delivery_duration_seconds_bucket{sink=\"archive\"",
        "webio_router_sink_up{sink=\"archive\"} 1",
        "webio_router_build_info{version=",
    ] {
        assert!(m.contains(name), "{name} missing from\n{m}");
    }
    assert_eq!(get(r.admin, "/nope").status, 404);
    assert_eq!(get(r.addr, "/metrics").status, 404, "metrics are not on the webhook listener");
}

#[test]
fn the_metrics_output_passes_promtool_check_metrics() {
    let r = spawn_router(ARCHIVE);
    r.post(INBOUND);
    r.post(b"nope");
    request(r.addr, "POST", PATH, &[], INBOUND);
    promtool_check_metrics(&r.metrics());
}

#[test]
fn auth_disabled_accepts_without_a_token_and_warns_on_readyz() {
    let config = "routes_file = \"{dir}/routes.toml\"\n[auth]\ndisabled = true\n[delivery]\nmode = \"direct\"\ndead_letter_file = \"{dir}/var/dead.jsonl\"\n";
    let r = router(config, ARCHIVE).spawn();
    assert_eq!(request(r.addr, "POST", PATH, &[], INBOUND).status, 202);
    let ready = get(r.admin, "/readyz").json();
    assert!(ready["warnings"][0].as_str().unwrap().contains("auth"));
    assert!(r.log_text().contains("NOT authenticated"));
}

#[test]
fn sighup_reloads_routes_and_a_bad_file_keeps_the_old_routes() {
    let r = spawn_router(ARCHIVE);
    assert_eq!(r.post(INBOUND).json()["routes"], 1);

    std::fs::write(r.path("routes.toml"), "[[routes]]\nto = [\"missing-sink\"]\n").unwrap();
    r.signal("HUP");
    r.wait_log("reload refused", Duration::from_secs(10));
    let resp = r.post(br#"{"type":"inboundMessage","conversationId":"2"}"#);
    assert_eq!(resp.json()["routes"], 1, "old routes stay after a bad reload");
    assert_eq!(r.jsonl("var/events.jsonl").len(), 2);
    assert_eq!(r.metric("webio_router_config_reloads_total{outcome=\"error\"}"), 1.0);

    let d = r.dir.path().display().to_string();
    std::fs::write(
        r.path("routes.toml"),
        format!("[sinks.other]\ntype = \"file\"\npath = \"{d}/other.jsonl\"\n[[routes]]\nto = [\"other\"]\n[[routes]]\nto = [\"other\"]\n"),
    )
    .unwrap();
    r.signal("HUP");
    r.wait_log("configuration reloaded", Duration::from_secs(10));
    let resp = r.post(br#"{"type":"inboundMessage","conversationId":"3"}"#);
    assert_eq!(resp.json()["routes"], 2);
    assert_eq!(r.jsonl("other.jsonl").len(), 1);
    assert_eq!(r.jsonl("var/events.jsonl").len(), 2);
}

#[test]
fn sigterm_finishes_in_flight_requests_and_exits_0() {
    let cap = Capture::start(200);
    cap.delay_ms.store(1500, std::sync::atomic::Ordering::SeqCst);
    let routes =
        format!("[sinks.slow]\ntype = \"http\"\nurl = \"{}\"\n[[routes]]\nto = [\"slow\"]\n", cap.url("/slow"));
    let mut r = spawn_router(&routes);
    let addr = r.addr;
    let in_flight = std::thread::spawn(move || post(addr, INBOUND));
    cap.wait_for(1, Duration::from_secs(5));
    r.signal("TERM");
    let resp = in_flight.join().unwrap();
    assert_eq!(resp.status, 202, "the in-flight request finished: {}", resp.body);
    let status = r.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "log:\n{}", r.log_text());
    assert!(std::net::TcpStream::connect(addr).is_err(), "the listener is closed");
}

#[test]
fn readyz_turns_503_while_shutting_down() {
    let cap = Capture::start(200);
    // The sink holds its answer until the test releases it: the daemon is still stopping
    // (an in-flight request) for as long as the test looks at /readyz.
    cap.delay_ms.store(60_000, std::sync::atomic::Ordering::SeqCst);
    let routes =
        format!("[sinks.slow]\ntype = \"http\"\nurl = \"{}\"\n[[routes]]\nto = [\"slow\"]\n", cap.url("/slow"));
    let mut r = router("", &routes).env("WEBIO_ROUTER_DELIVERY__SHUTDOWN_TIMEOUT", "60s").spawn();
    assert_eq!(get(r.admin, "/readyz").status, 200);
    let addr = r.addr;
    let in_flight = std::thread::spawn(move || post(addr, INBOUND));
    cap.wait_for(1, Duration::from_secs(5));
    r.signal("TERM");
    wait_until("/readyz answers 503", Duration::from_secs(10), || get(r.admin, "/readyz").status == 503);
    assert!(!in_flight.is_finished(), "the request was still in flight while /readyz said 503");
    cap.delay_ms.store(0, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(in_flight.join().unwrap().status, 202);
    assert_eq!(r.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn a_slow_client_is_cut_off_after_request_timeout_while_others_are_served() {
    let r = router("[server]\nrequest_timeout = \"1s\"\n", ARCHIVE).spawn();
    use std::io::{Read, Write};
    // Headers that never finish.
    let mut slow_headers = std::net::TcpStream::connect(r.addr).unwrap();
    slow_headers.write_all(b"POST /webhooks/webio HTTP/1.1\r\nhost: x\r\n").unwrap();
    // A body that never comes.
    let mut slow_body = std::net::TcpStream::connect(r.addr).unwrap();
    let t = token();
    slow_body
        .write_all(
            format!("POST {PATH} HTTP/1.1\r\nhost: x\r\nx-webio-token: {t}\r\ncontent-length: 500\r\n\r\n{{")
                .as_bytes(),
        )
        .unwrap();
    assert_eq!(r.post(INBOUND).status, 202, "a normal request is served meanwhile");
    for (name, s) in [("headers", &mut slow_headers), ("body", &mut slow_body)] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(started.elapsed() < Duration::from_secs(8), "slow {name} client was not cut off");
        if !buf.is_empty() {
            let status = parse_response(&buf).status;
            assert!(status == 408 || status == 400, "slow {name}: {status}");
        }
    }
}

#[test]
fn json_logs_are_one_object_per_line_and_request_lines_carry_request_and_event_ids() {
    let r = router("[log]\nformat = \"json\"\nlevel = \"debug\"\n", ARCHIVE).spawn();
    let resp = r.post(INBOUND);
    let id = resp.json()["id"].as_str().unwrap().to_owned();
    r.wait_log("event accepted", Duration::from_secs(5));
    let lines = r.log.lock().unwrap().clone();
    let mut about_request = 0;
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["timestamp", "level", "message"] {
            assert!(v.get(key).is_some(), "{key} missing: {line}");
        }
        if v["message"] == "event accepted" {
            about_request += 1;
            assert_eq!(v["span"]["event_id"], id.as_str(), "{line}");
            assert!(v["span"]["request_id"].is_string(), "{line}");
        }
    }
    assert_eq!(about_request, 1);
}
