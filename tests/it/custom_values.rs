//! README "Custom Value Requests and SFTP hooks", Webio's Custom Value Request: an authenticated `GET {path}?…` is forwarded to
//! `custom_values.upstream` with the query intact and the configured headers (never the token);
//! 2xx answers come back as they are and are cached per (organisation, query); an upstream error
//! answers 502, a timeout 504. Behaviour in-process; metrics against the real binary.

use crate::helpers::app::try_spawn_app;
use crate::helpers::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

const ARCHIVE: &str = r#"
[sinks.archive]
type = "file"
path = "{dir}/var/events.jsonl"

[[routes]]
to = ["archive"]
"#;

/// What Webio's bot sends: customer UID (empty for inbound-initiated conversations), channel id
/// and field names, percent-encoded as it was.
const QUERY: &str = "customerUID=&channelId=%2B447700900123&fields=firstName,lastName&note=a%20b";

/// A request the upstream got: its target (path and query) and headers.
type Seen = (String, Vec<(String, String)>);

/// An upstream that answers every GET with `content_type` and `body`, and records the request
/// line and headers it got.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    fn start(content_type: &'static str, body: Vec<u8>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, body) = (seen.clone(), Arc::new(body));
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let (s, body) = (s.clone(), body.clone());
                std::thread::spawn(move || answer(conn, s, content_type, &body));
            }
        });
        Upstream { addr, seen }
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(conn: TcpStream, seen: Arc<Mutex<Vec<Seen>>>, ct: &str, body: &[u8]) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            match h.trim_end().split_once(':') {
                Some((k, v)) => headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned())),
                None => break,
            }
        }
        seen.lock().unwrap().push((target, headers));
        let head = format!("HTTP/1.1 200 OK\r\ncontent-type: {ct}\r\ncontent-length: {}\r\n\r\n", body.len());
        if conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(body)).is_err() {
            return;
        }
    }
}

fn custom_values(upstream: &str, rest: &str) -> String {
    format!("[custom_values]\nupstream = \"{upstream}\"\n{rest}\n")
}

fn get_values(addr: SocketAddr, query: &str, token: Option<&str>) -> Response {
    let path = format!("{PATH}?{query}");
    match token {
        Some(t) => request(addr, "GET", &path, &[("x-webio-token", t)], b""),
        None => request(addr, "GET", &path, &[], b""),
    }
}

#[test]
fn a_custom_value_get_is_answered_by_the_upstream_with_the_query_intact_then_from_the_cache() {
    let up =
        Upstream::start("application/json; charset=utf-8", br#"{"firstName":"Ada","lastName":"Lovelace"}"#.to_vec());
    let cfg = custom_values(
        &format!("http://{}/crm/values", up.addr),
        "cache_ttl = \"60s\"\nheaders = { \"x-api-key\" = \"key-${CV_TEST_API_KEY}\" }",
    );
    let r = router(&cfg, ARCHIVE).env("CV_TEST_API_KEY", "s3cr3t").spawn();
    assert_eq!(r.metric("webio_router_custom_value_requests_total{outcome=\"cached\"}"), 0.0);
    assert!(r.metrics().contains("webio_router_custom_value_requests_total{outcome=\"timeout\"} 0"), "pre-set");

    let t = token();
    let first = get_values(r.addr, QUERY, Some(&t));
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.header("content-type"), Some("application/json; charset=utf-8"));
    assert_eq!(first.body, r#"{"firstName":"Ada","lastName":"Lovelace"}"#);
    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    let (target, headers) = &seen[0];
    assert_eq!(target, &format!("/crm/values?{QUERY}"), "the query is forwarded unchanged");
    assert!(headers.contains(&("x-api-key".into(), "key-s3cr3t".into())), "{headers:?}");
    assert!(
        headers.iter().all(|(k, v)| k != "x-webio-token" && !v.contains(&t)),
        "the token never leaves: {headers:?}"
    );

    let second = get_values(r.addr, QUERY, Some(&t));
    assert_eq!((second.status, second.body.as_str()), (200, first.body.as_str()));
    assert_eq!(second.header("content-type"), Some("application/json; charset=utf-8"));
    assert_eq!(up.requests().len(), 1, "the second answer came from the cache");
    assert_eq!(r.metric("webio_router_custom_value_requests_total{outcome=\"ok\"}"), 1.0);
    assert_eq!(r.metric("webio_router_custom_value_requests_total{outcome=\"cached\"}"), 1.0);

    // Another query is another question; nothing of it reached a sink or the log.
    assert_eq!(get_values(r.addr, "customerUID=7", Some(&t)).status, 200);
    assert_eq!(up.requests().len(), 2);
    assert!(r.jsonl("var/events.jsonl").is_empty(), "a Custom Value Request is not an event");
    assert!(!r.log_text().contains("s3cr3t"), "header values are never logged");
}

#[test]
fn cached_answers_are_kept_per_organisation_and_not_at_all_with_a_zero_ttl() {
    let up = Upstream::start("application/json", b"{}".to_vec());
    let app = spawn_app(&custom_values(&format!("http://{}/v", up.addr), ""), ARCHIVE);
    let (org42, org7) = (token(), signed_token(SECRET, Some("7")));
    assert_eq!(get_values(app.addr, QUERY, Some(&org42)).status, 200);
    assert_eq!(get_values(app.addr, QUERY, Some(&org7)).status, 200);
    assert_eq!(get_values(app.addr, QUERY, Some(&org42)).status, 200);
    assert_eq!(up.requests().len(), 2, "one upstream call per organisation");

    let up = Upstream::start("application/json", b"{}".to_vec());
    let app = spawn_app(&custom_values(&format!("http://{}/v", up.addr), "cache_ttl = \"0s\""), ARCHIVE);
    for _ in 0..2 {
        assert_eq!(get_values(app.addr, QUERY, Some(&org42)).status, 200);
    }
    assert_eq!(up.requests().len(), 2, "no cache with cache_ttl = 0s");
}

#[test]
fn a_custom_value_get_without_a_valid_token_gets_401_as_a_post_does() {
    let up = Upstream::start("application/json", b"{}".to_vec());
    let app = spawn_app(&custom_values(&format!("http://{}/v", up.addr), ""), ARCHIVE);
    let missing = get_values(app.addr, QUERY, None);
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"], "missing token");
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    let forged = get_values(app.addr, QUERY, Some(&signed_token("another-secret-of-32-bytes-or-more-xyz", Some("42"))));
    assert_eq!(forged.status, 401);
    assert_eq!(forged.json()["error"], "invalid token signature");
    assert!(up.requests().is_empty(), "nothing reached the upstream");
}

#[test]
fn a_slow_upstream_answers_504() {
    let up = Capture::start(200);
    up.delay_ms.store(60_000, std::sync::atomic::Ordering::SeqCst);
    let app = spawn_app(&custom_values(&up.url("/v"), "timeout = \"300ms\""), ARCHIVE);
    let resp = get_values(app.addr, QUERY, Some(&token()));
    up.delay_ms.store(0, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(resp.status, 504, "{}", resp.body);
    assert!(resp.json()["error"].as_str().unwrap().contains("did not answer within"), "{}", resp.body);
    assert_eq!(resp.header("content-type"), Some("application/json"));
}

#[test]
fn an_upstream_error_status_answers_502_and_is_not_cached() {
    let up = Capture::start(500);
    let app = spawn_app(&custom_values(&up.url("/v"), ""), ARCHIVE);
    let t = token();
    let resp = get_values(app.addr, QUERY, Some(&t));
    assert_eq!(resp.status, 502, "{}", resp.body);
    assert!(resp.json()["error"].as_str().unwrap().contains("500"), "{}", resp.body);
    assert_eq!(up.received()[0].path, format!("/v?{QUERY}"));
    up.set_status(200);
    assert_eq!(get_values(app.addr, QUERY, Some(&t)).status, 200, "the error was not cached");
    assert_eq!(up.received().len(), 2);
}

#[test]
fn an_unreachable_or_oversized_upstream_answers_502() {
    let dead = dead_addr();
    let app = spawn_app(&custom_values(&format!("http://{}/v", dead.addr), ""), ARCHIVE);
    let resp = get_values(app.addr, QUERY, Some(&token()));
    assert_eq!(resp.status, 502, "{}", resp.body);
    assert_eq!(resp.json()["error"], "custom value upstream unreachable");

    let up = Upstream::start("application/json", vec![b' '; (1 << 20) + 1]);
    let app = spawn_app(&custom_values(&format!("http://{}/v", up.addr), ""), ARCHIVE);
    let resp = get_values(app.addr, QUERY, Some(&token()));
    assert_eq!(resp.status, 502);
    assert!(resp.json()["error"].as_str().unwrap().contains("larger than"), "{}", resp.body);
}

#[test]
fn with_custom_values_on_other_methods_get_405_allowing_get_and_post() {
    let up = Upstream::start("application/json", b"{}".to_vec());
    let app = spawn_app(&custom_values(&format!("http://{}/v", up.addr), ""), ARCHIVE);
    for m in ["PUT", "DELETE", "PATCH"] {
        let resp = request(app.addr, m, PATH, &[("x-webio-token", &token())], b"");
        assert_eq!(resp.status, 405, "{m}");
        assert_eq!(resp.header("allow"), Some("GET, POST"), "{m}");
    }
    assert_eq!(app.post(br#"{"type":"payment"}"#).status, 202, "POST still works");

    let off = spawn_app("", ARCHIVE);
    let resp = get_values(off.addr, QUERY, Some(&token()));
    assert_eq!((resp.status, resp.header("allow")), (405, Some("POST")), "off by default");
}

#[test]
fn a_bad_custom_values_section_stops_the_start_naming_the_key() {
    let e = try_spawn_app(&custom_values("ftp://crm/values", ""), ARCHIVE).err().expect("refused");
    assert!(e.contains("custom_values.upstream"), "{e}");
    let e = try_spawn_app(
        &custom_values("http://crm/values", "headers = { \"x-api-key\" = \"${CV_TEST_SURELY_UNSET}\" }"),
        ARCHIVE,
    )
    .err()
    .expect("refused");
    assert!(e.contains("custom_values.headers.x-api-key: environment variable CV_TEST_SURELY_UNSET is not set"), "{e}");
}
