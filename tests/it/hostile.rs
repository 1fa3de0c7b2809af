//! Hostile input: property tests for the three parsers that face the outside world (the
//! normaliser, the JWT check, the routes parser), and a test with many slow clients and
//! oversized bodies against the real binary. The same three parsers have cargo-fuzz targets
//! under `fuzz/` (see docs/performance.md).

use crate::helpers::*;
use chrono::TimeZone;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{json, Map, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;
use webio_router::auth::{AuthError, Verifier};
use webio_router::event::{normalise, BodyError, Event, NormaliseOptions};
use webio_router::routes::Routes;

const CASES: u32 = 384;

fn config() -> ProptestConfig {
    // Failures print the minimal input; nothing is written next to the sources.
    ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() }
}

/// JSON equality, except that a float may differ in its last digits: serde_json (without its
/// `float_roundtrip` feature) parses some extreme floats to a neighbouring value, so an
/// `extra` float can come out one ulp off what was sent (e.g. -1.415462317338288e-308).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            x == y || (x - y).abs() <= f64::EPSILON * 4.0 * x.abs().max(y.abs()) || (x - y).abs() < 1e-300
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

// ------------------------------------------------------------------ generators

/// Payload keys the normaliser maps (in any letter case), as Webio spells them.
const KNOWN_KEYS: &[&str] = &[
    "type",
    "conversationId",
    "communicationActionId",
    "comunicationActionId",
    "outboundChannelAddress",
    "inboundChannelAddress",
    "customerUID",
    "body",
    "statusCode",
    "dateCreated",
];

fn is_known_key(k: &str) -> bool {
    KNOWN_KEYS.iter().any(|known| known.eq_ignore_ascii_case(k))
}

/// A known key with its letters' case flipped at random, or any short string.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        (prop::sample::select(KNOWN_KEYS), prop::collection::vec(any::<bool>(), 24)).prop_map(|(k, flips)| {
            k.chars()
                .zip(flips.iter().cycle())
                .map(|(c, f)| if *f { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
                .collect()
        }),
        Just("type".to_owned()),
        ".{0,12}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|u| json!(u)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        ".{0,24}".prop_map(Value::String),
        // Things that look like the values Webio sends, and their near misses.
        " ?-?[0-9]{0,21}(\\.[0-9]{0,3})? ?".prop_map(Value::String),
        "[+-]?[0-9]{1,6}-[0-9]{1,2}-[0-9]{1,2}[ T][0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}(\\.[0-9]{0,12})?(Z|[+-][0-9]{2}:?[0-9]{2})?"
            .prop_map(Value::String),
        prop::sample::select(&["messageStatusUpdate", "inboundMessage", "messageSend", "payment", "", " "][..])
            .prop_map(|s| Value::String(s.to_owned())),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Mostly objects with a `type`, so that most cases get past the first checks.
fn payload() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => (leaf(), prop::collection::btree_map(key(), value(), 0..12)).prop_map(|(t, fields)| {
            let mut o: Map<String, Value> = fields.into_iter().collect();
            o.entry("type".to_owned()).or_insert(t);
            Value::Object(o)
        }),
        1 => value(),
    ]
}

fn zone() -> impl Strategy<Value = chrono_tz::Tz> {
    prop::sample::select(
        &[
            chrono_tz::Tz::UTC,
            chrono_tz::Tz::Europe__London,
            chrono_tz::Tz::America__New_York,
            chrono_tz::Tz::Australia__Lord_Howe,
            chrono_tz::Tz::Pacific__Chatham,
        ][..],
    )
}

fn options() -> impl Strategy<Value = NormaliseOptions> {
    (zone(), prop::collection::vec(-3i64..8, 0..3)).prop_map(|(source_timezone, legacy_send_status_codes)| {
        NormaliseOptions { source_timezone, legacy_send_status_codes }
    })
}

fn fixture_bodies() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for dir in ["webio", "bad"] {
        let Ok(entries) = std::fs::read_dir(fixtures().join(dir)) else { continue };
        for e in entries.flatten() {
            if !e.path().to_string_lossy().ends_with(".expected.json") {
                out.push(std::fs::read(e.path()).unwrap());
            }
        }
    }
    if out.is_empty() {
        out.push(br#"{"type":"inboundMessage","conversationId":"1","communicationActionId":"2","body":"hi"}"#.to_vec());
    }
    out
}

/// A fixture body with a few random byte edits (insert, delete, replace).
fn mutated_fixture() -> impl Strategy<Value = Vec<u8>> {
    let bodies = fixture_bodies();
    (prop::sample::select(bodies), prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..6))
        .prop_map(|(mut body, edits)| {
            for (at, op, byte) in edits {
                if body.is_empty() {
                    body.push(byte);
                    continue;
                }
                let i = at.index(body.len());
                match op {
                    0 => body.insert(i, byte),
                    1 => {
                        body.remove(i);
                    }
                    _ => body[i] = byte,
                }
            }
            body
        })
}

fn received_at() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc.with_ymd_and_hms(2026, 11, 27, 17, 2, 11).unwrap()
}

// ------------------------------------------------------------------ normaliser checks

/// What must hold for every body: no panic (the caller), Ok with a well-formed event, or a
/// refusal with a clear message.
fn check_normalised(body: &[u8], opts: &NormaliseOptions) -> Result<Event, BodyError> {
    let result = normalise(body, Some("42".into()), opts, received_at());
    match &result {
        Ok(ev) => {
            let text = ev.to_json();
            let back: Value = serde_json::from_slice(&text).expect("the event is JSON");
            let obj = back.as_object().expect("the event is an object");
            assert_eq!(obj.len(), 15, "every field is always present: {back}");
            assert_eq!(ev.schema, "webio.event/v1");
            assert_eq!(ev.id.len(), 32, "id {:?}", ev.id);
            assert!(ev.id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "id {:?}", ev.id);
            assert!(!ev.event_type.trim().is_empty());
            let again: Event = serde_json::from_slice(&text).expect("the event reads back");
            assert!(same_json(&serde_json::to_value(&again).unwrap(), &serde_json::to_value(ev).unwrap()));
            if let Some(t) = &ev.occurred_at {
                assert!(chrono::DateTime::parse_from_rfc3339(t).is_ok(), "occurredAt {t:?}");
            }
            // The id is the documented hash: SHA-256 of the event's JSON with `id` and
            // `receivedAt` empty and `extra` as serde_json writes the map it reads from it,
            // first 128 bits in hex. (`extra` itself keeps the sender's text, which may spell
            // a number differently: an event read back through a `Value` has serde_json's.)
            let mut canon = ev.clone();
            canon.id.clear();
            canon.received_at.clear();
            let canon: Event = serde_json::from_value(serde_json::to_value(&canon).unwrap()).unwrap();
            let digest = <sha2::Sha256 as sha2::Digest>::digest(canon.to_json());
            assert_eq!(ev.id, hex::encode(&digest[..16]));
            // Deterministic: the same body later gives the same id.
            let later = normalise(body, Some("42".into()), opts, received_at() + chrono::Duration::hours(1)).unwrap();
            assert_eq!(later.id, ev.id);
        }
        Err(e) => {
            assert!(!e.to_string().trim().is_empty());
            assert!(!e.reason().is_empty());
        }
    }
    result
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_normaliser_accepts_or_refuses_any_json_value_clearly_and_drops_no_unmapped_field(
        v in payload(),
        opts in options(),
    ) {
        let body = serde_json::to_vec(&v).unwrap();
        match check_normalised(&body, &opts) {
            Ok(ev) => {
                let obj = v.as_object().expect("only objects are accepted");
                for (k, val) in obj {
                    if !is_known_key(k) {
                        let kept = ev.extra.get(k);
                        prop_assert!(kept.is_some_and(|kept| same_json(kept, val)), "unmapped key {:?} must be kept in extra: {:?} vs {:?}", k, kept, val);
                    }
                }
            }
            Err(BodyError::NotJson(m)) => prop_assert!(false, "serde_json output refused as not JSON: {}", m),
            Err(e) => {
                if !v.is_object() {
                    prop_assert_eq!(e, BodyError::NotObject);
                }
            }
        }
    }

    #[test]
    fn the_normaliser_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = check_normalised(&body, &NormaliseOptions::default());
    }

    #[test]
    fn the_normaliser_never_panics_on_json_like_text(body in "[\\[\\]{}\":,0-9a-zA-Z .eE+\\-\\\\/u]{0,300}") {
        let _ = check_normalised(body.as_bytes(), &NormaliseOptions::default());
    }

    #[test]
    fn the_normaliser_never_panics_on_mutated_webio_fixtures(body in mutated_fixture(), opts in options()) {
        let _ = check_normalised(&body, &opts);
    }
}

#[test]
fn deeply_nested_bodies_are_refused_as_not_json_rather_than_overflowing_the_stack() {
    for open in ["[", "{\"a\":"] {
        let body = open.repeat(100_000);
        let err = normalise(body.as_bytes(), None, &NormaliseOptions::default(), received_at()).unwrap_err();
        assert!(matches!(err, BodyError::NotJson(_)), "{err:?}");
    }
    let body = format!("{{\"type\":\"payment\",\"x\":{}{}}}", "[".repeat(120), "]".repeat(120));
    let ev = normalise(body.as_bytes(), None, &NormaliseOptions::default(), received_at()).unwrap();
    assert!(!ev.to_json().is_empty());
}

// ------------------------------------------------------------------ JWT checks

const ALLOWED: &[&str] = &["HS256", "HS384"];

/// A verifier loaded the way the daemon loads it: from a config file.
fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("webio-router.toml");
        std::fs::write(
            &path,
            format!("[auth]\nsecrets = [\"{SECRET}\", \"{SECRET2}\"]\nalgorithms = [\"HS256\", \"HS384\"]\nleeway = \"5s\"\n"),
        )
        .unwrap();
        let loaded = webio_router::config::Config::load(Some(&path), None).expect("test config loads");
        Verifier::new(&loaded)
    })
}

fn b64(bytes: &[u8]) -> String {
    use base64::engine::{general_purpose::URL_SAFE_NO_PAD, Engine};
    URL_SAFE_NO_PAD.encode(bytes)
}

fn hmac_signature(alg: &str, secret: &str, input: &str) -> Option<String> {
    let alg = match alg {
        "HS256" => jsonwebtoken::Algorithm::HS256,
        "HS384" => jsonwebtoken::Algorithm::HS384,
        "HS512" => jsonwebtoken::Algorithm::HS512,
        _ => return None,
    };
    jsonwebtoken::crypto::sign(input.as_bytes(), &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()), alg).ok()
}

#[derive(Debug, Clone)]
enum Signer {
    Right,
    Rotated,
    Wrong,
    Garbage(String),
}

fn claim_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        leaf(),
        (-10_000i64..10_000).prop_map(|d| json!(jsonwebtoken::get_current_timestamp() as i64 + d)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
    ]
}

fn token_parts() -> impl Strategy<Value = (Value, Value, Signer)> {
    let alg = prop_oneof![
        prop::sample::select(&["HS256", "HS384", "HS512", "none", "None", "RS256", "ES256", ""][..])
            .prop_map(|s| json!(s)),
        leaf(),
    ];
    let header = (alg, prop::option::of(leaf()), prop::collection::btree_map(".{0,6}", leaf(), 0..3)).prop_map(
        |(alg, typ, extra)| {
            let mut h: Map<String, Value> = extra.into_iter().collect();
            h.insert("alg".into(), alg);
            if let Some(t) = typ {
                h.insert("typ".into(), t);
            }
            Value::Object(h)
        },
    );
    let claims = prop_oneof![
        prop::collection::btree_map(
            prop::sample::select(&["exp", "nbf", "iat", "organisationId", "aud", "sub"][..]).prop_map(str::to_owned),
            claim_value(),
            0..6,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect())),
        value(),
    ];
    let signer = prop_oneof![
        3 => Just(Signer::Right),
        1 => Just(Signer::Rotated),
        1 => Just(Signer::Wrong),
        1 => "[A-Za-z0-9_=+/.-]{0,60}".prop_map(Signer::Garbage),
    ];
    (header, claims, signer)
}

fn check_verified(token: &[u8]) -> Result<webio_router::auth::Verified, AuthError> {
    let v = verifier();
    let first = v.verify(Some(token));
    if let Err(e) = first {
        assert!(!e.to_string().is_empty());
        assert!(!e.reason().is_empty());
        if token.len() >= 8 {
            let text = e.to_string();
            assert!(!text.as_bytes().windows(token.len()).any(|w| w == token), "the error names the token");
        }
    }
    // A second look (now possibly from the cache) says the same.
    assert_eq!(v.verify(Some(token)), first, "cached and fresh verification disagree");
    first
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_jwt_check_refuses_arbitrary_bytes_with_an_auth_error(token in prop::collection::vec(any::<u8>(), 0..300)) {
        prop_assert!(check_verified(&token).is_err());
    }

    #[test]
    fn the_jwt_check_refuses_arbitrary_dotted_text(token in "(Bearer )?[A-Za-z0-9_=+/ -]{0,40}(\\.[A-Za-z0-9_=+/-]{0,60}){0,4}") {
        prop_assert!(check_verified(token.as_bytes()).is_err());
    }

    #[test]
    fn the_jwt_check_accepts_only_allowed_algorithms_signed_with_a_configured_secret(
        (header, claims, signer) in token_parts(),
        bearer in any::<bool>(),
    ) {
        let input = format!("{}.{}", b64(&serde_json::to_vec(&header).unwrap()), b64(&serde_json::to_vec(&claims).unwrap()));
        let alg = header["alg"].as_str().unwrap_or("").to_owned();
        let sig = match &signer {
            Signer::Right => hmac_signature(&alg, SECRET, &input),
            Signer::Rotated => hmac_signature(&alg, SECRET2, &input),
            Signer::Wrong => hmac_signature(&alg, "another-secret-0123456789-0123456789-0", &input),
            Signer::Garbage(g) => Some(g.clone()),
        }
        .unwrap_or_default();
        let token = format!("{}{input}.{sig}", if bearer { "Bearer " } else { "" });
        let result = check_verified(token.as_bytes());
        if let Ok(v) = &result {
            prop_assert!(ALLOWED.contains(&alg.as_str()), "accepted alg {:?}", alg);
            prop_assert!(matches!(signer, Signer::Right | Signer::Rotated), "accepted a token signed with {:?}", signer);
            prop_assert_eq!(v.secret_index, if matches!(signer, Signer::Right) { 0 } else { 1 });
        }
        if !ALLOWED.contains(&alg.as_str()) {
            prop_assert!(result.is_err());
        }
    }
}

// ------------------------------------------------------------------ routes parser checks

fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        ".{0,16}".prop_map(toml::Value::String),
        "[a-z{}$.*/_ -]{0,24}".prop_map(toml::Value::String),
        prop::sample::select(
            &[
                "{type}",
                "var/{type}.jsonl",
                "{extra.x}",
                "{nope}",
                "{{",
                "}}",
                "${HOME}",
                "${UNSET_FOR_SURE_123}",
                "$$",
                "${",
                "{",
                "http://127.0.0.1:9/{conversationId}",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "5s",
                "lz4",
                "event",
                "raw",
                "cloudevents",
                "*",
                "message*",
            ][..],
        )
        .prop_map(|s| toml::Value::String(s.to_owned())),
        any::<i64>().prop_map(toml::Value::Integer),
        any::<bool>().prop_map(toml::Value::Boolean),
        any::<f64>().prop_map(toml::Value::Float),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z._-]{0,8}", inner, 0..3)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

const SINK_KEYS: &[&str] = &[
    "type",
    "path",
    "format",
    "fsync",
    "url",
    "timeout",
    "headers",
    "exchange",
    "exchange_type",
    "routing_key",
    "mandatory",
    "declare",
    "brokers",
    "topic",
    "key",
    "properties",
    "bogus",
];
const SINK_TYPES: &[&str] = &["file", "http", "amqp", "kafka", "ftp", ""];
const WHEN_KEYS: &[&str] =
    &["type", "statusCode", "shape", "extra.x", "extra.", "conversationId", "nope", "receivedAt"];

/// A syntactically valid routes file with arbitrary (often wrong) contents, so that the
/// validation behind the TOML parser is exercised too.
fn routes_file() -> impl Strategy<Value = String> {
    let sink = (
        prop::sample::select(SINK_TYPES),
        prop::collection::btree_map(prop::sample::select(SINK_KEYS), toml_value(), 0..5),
    )
        .prop_map(|(t, mut opts)| {
            opts.entry("type").or_insert_with(|| toml::Value::String(t.to_owned()));
            toml::Value::Table(opts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        });
    let sinks = prop::collection::btree_map(prop::sample::select(&["a", "b", "archive", ""][..]), sink, 0..4);
    let route = (
        prop::option::of(".{0,8}"),
        prop::collection::btree_map(prop::sample::select(WHEN_KEYS), toml_value(), 0..3),
        prop_oneof![
            prop::sample::select(&["a", "b", "archive", "missing", ""][..]).prop_map(|s| toml::Value::String(s.into())),
            toml_value()
        ],
        prop::option::of(toml_value()),
    )
        .prop_map(|(name, when, to, stop)| {
            let mut r = toml::Table::new();
            if let Some(n) = name {
                r.insert("name".into(), toml::Value::String(n));
            }
            if !when.is_empty() {
                r.insert("when".into(), toml::Value::Table(when.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
            }
            r.insert("to".into(), to);
            if let Some(s) = stop {
                r.insert("stop".into(), s);
            }
            toml::Value::Table(r)
        });
    (sinks, prop::collection::vec(route, 0..4)).prop_map(|(sinks, routes)| {
        let mut doc = toml::Table::new();
        doc.insert("sinks".into(), toml::Value::Table(sinks.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
        doc.insert("routes".into(), toml::Value::Array(routes));
        toml::to_string(&doc).unwrap_or_default()
    })
}

fn env(name: &str) -> Option<String> {
    (name == "HOME").then(|| "/home/webio".to_owned())
}

/// Parses; a refusal names the file in every diagnostic; an accepted file matches events.
fn check_routes(text: &str) {
    match Routes::parse("routes.toml", text, env) {
        Ok(routes) => {
            let ev = normalise(
                br#"{"type":"messageStatusUpdate","conversationId":"1","communicationActionId":"2","statusCode":"3","x":"y"}"#,
                None,
                &NormaliseOptions::default(),
                received_at(),
            )
            .unwrap();
            let m = routes.matching(&ev);
            for s in &m.sinks {
                assert!(routes.sinks.contains_key(*s), "matched an undefined sink {s:?}");
            }
        }
        Err(e) => {
            assert!(!e.0.is_empty(), "an error without a diagnostic");
            for d in &e.0 {
                assert!(d.to_string().starts_with("routes.toml"), "{d}");
                assert!(!d.message.trim().is_empty());
                if let Some((line, col)) = d.line {
                    assert!(line >= 1 && col >= 1);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_routes_parser_never_panics_on_arbitrary_text(text in ".{0,400}") {
        check_routes(&text);
    }

    #[test]
    fn the_routes_parser_never_panics_on_toml_like_text(text in "(\\[\\[?[a-z.]{0,12}\\]\\]?\n|[a-z_.\"]{1,12} ?= ?(\"[^\"\n]{0,16}\"|[0-9]{1,4}|true|\\[[^\n]{0,12}\\]|\\{[^\n]{0,16}\\})\n|#[^\n]{0,8}\n){0,12}") {
        check_routes(&text);
    }

    #[test]
    fn the_routes_parser_reports_every_problem_of_a_well_formed_file_with_its_location(text in routes_file()) {
        check_routes(&text);
    }
}

// ------------------------------------------------------------------ slow clients

const ARCHIVE: &str = r#"
[sinks.archive]
type = "file"
path = "{dir}/var/events.jsonl"

[[routes]]
name = "everything"
to = ["archive"]
"#;

/// Reads until the peer closes; the bytes read, or the bytes read so far when the
/// connection was reset. Panics only when nothing happened for a long time.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => return got,
            Err(e) => panic!("a slow connection was never cut: {e}"),
        }
    }
}

/// Still connected, nothing to read yet (never blocks).
fn is_open(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let open = matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

fn status_of(raw: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(raw);
    text.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|s| s.parse().ok())
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Slow {
    /// Connects and sends nothing.
    Idle,
    /// Sends a request line and trickles header bytes, never ending the headers.
    Headers,
    /// Sends complete headers, then trickles the body, never finishing it.
    Body,
}

#[test]
fn a_hundred_slow_clients_and_oversized_bodies_do_not_stop_normal_requests_and_slow_ones_are_cut_after_the_request_timeout(
) {
    let r = router("[server]\nrequest_timeout = \"2s\"\nmax_body_bytes = 65536\n", ARCHIVE).spawn();
    let token = token();

    // 1. A hundred slow clients, all open at once.
    let mut slow = Vec::new();
    for i in 0..100 {
        let kind = [Slow::Idle, Slow::Headers, Slow::Body][i % 3];
        let mut s = TcpStream::connect(r.addr).unwrap();
        match kind {
            Slow::Idle => {}
            Slow::Headers => s.write_all(format!("POST {PATH} HTTP/1.1\r\nhost: x\r\nx-slow: ").as_bytes()).unwrap(),
            Slow::Body => s
                .write_all(
                    format!(
                        "POST {PATH} HTTP/1.1\r\nhost: x\r\nx-webio-token: {token}\r\ncontent-length: 4000\r\n\r\n{{\"type\":"
                    )
                    .as_bytes(),
                )
                .unwrap(),
        }
        slow.push((kind, s));
    }
    // One more byte on each trickling connection every 100 ms, until the server cut them all
    // (bounded: at most 60 s).
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> =
        slow.iter().filter(|(k, _)| *k != Slow::Idle).map(|(k, s)| (*k, s.try_clone().unwrap())).collect();
    let trickler = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut writers = writers;
            for _ in 0..600 {
                if stop.load(Ordering::Relaxed) || writers.is_empty() {
                    break;
                }
                writers.retain_mut(|(k, s)| s.write_all(if *k == Slow::Headers { b"a" } else { b" " }).is_ok());
                thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // 2. Oversized bodies: declared too large (answered without reading), and streamed
    //    chunked past the limit.
    let declared: Vec<_> = (0..4)
        .map(|_| {
            let addr = r.addr;
            let token = token.clone();
            thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(
                    format!(
                        "POST {PATH} HTTP/1.1\r\nhost: x\r\nx-webio-token: {token}\r\ncontent-length: 10000000\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .unwrap();
                status_of(&read_until_closed(&mut s))
            })
        })
        .collect();
    let streamed: Vec<_> = (0..3)
        .map(|_| {
            let addr = r.addr;
            let token = token.clone();
            thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let head = format!(
                    "POST {PATH} HTTP/1.1\r\nhost: x\r\nx-webio-token: {token}\r\ntransfer-encoding: chunked\r\n\r\n"
                );
                s.write_all(head.as_bytes()).unwrap();
                let chunk = format!("2000\r\n{}\r\n", " ".repeat(0x2000));
                // 80 KiB of whitespace, then silence (the body never ends by itself).
                for _ in 0..10 {
                    if s.write_all(chunk.as_bytes()).is_err() {
                        break;
                    }
                }
                status_of(&read_until_closed(&mut s))
            })
        })
        .collect();

    // 3. Meanwhile, normal requests are answered.
    for i in 0..30 {
        let body = format!(r#"{{"type":"inboundMessage","conversationId":"{i}","communicationActionId":"slow-{i}"}}"#);
        let resp = r.post(body.as_bytes());
        assert_eq!(resp.status, 202, "normal request {i} while slow clients are connected: {}", resp.body);
    }
    // For the record only (no timing assertion): how many slow ones were still connected.
    let open_when_served = slow.iter().filter(|(_, s)| is_open(s)).count();

    // 4. The oversized ones were refused with 413 (a streamed one may instead see the
    //    connection reset when the server closes with its excess unread).
    for h in declared {
        assert_eq!(h.join().unwrap(), Some(413));
    }
    for h in streamed {
        let status = h.join().unwrap();
        assert!(matches!(status, Some(413) | None), "streamed oversized body answered {status:?}");
    }

    // 5. Every slow client is cut (after request_timeout); a body cut short gets 408.
    let mut cut = 0;
    for (kind, mut s) in slow {
        let got = read_until_closed(&mut s);
        match (kind, status_of(&got)) {
            (_, None) => {
                assert!(got.is_empty() || kind == Slow::Body, "{kind:?} got {:?}", String::from_utf8_lossy(&got))
            }
            (Slow::Body, Some(408)) | (Slow::Headers, Some(408)) => {}
            (k, other) => panic!("{k:?} slow client answered {other:?}: {}", String::from_utf8_lossy(&got)),
        }
        cut += 1;
    }
    stop.store(true, Ordering::Relaxed);
    trickler.join().unwrap();
    assert_eq!(cut, 100);
    eprintln!("slow connections still open when the 30 normal requests had been answered: {open_when_served}/100");

    // 6. And the listener still serves afterwards.
    let resp = r.post(br#"{"type":"payment","conversationId":"after"}"#);
    assert_eq!(resp.status, 202, "{}", resp.body);
    assert_eq!(r.jsonl("var/events.jsonl").len(), 31);
    assert!(r.metric("webio_router_requests_total{status=\"413\"}") >= 4.0);
}

#[test]
fn a_client_that_pipelines_requests_and_never_reads_the_answers_is_cut_after_the_request_timeout() {
    let r = router("[server]\nrequest_timeout = \"2s\"\n", ARCHIVE).spawn();
    let mut s = TcpStream::connect(r.addr).unwrap();
    // Liveness bound only: a write blocked this long means the server never cut us.
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let batch = "GET /elsewhere HTTP/1.1\r\nhost: x\r\n\r\n".repeat(1000);
    let mut sent = 0usize;
    let outcome = loop {
        // Bounded: at most 4 GB, far more than any socket buffers hold.
        assert!(sent < 4 << 30, "sent {sent} bytes without the connection being cut or blocked");
        match s.write_all(batch.as_bytes()) {
            Ok(()) => sent += batch.len(),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(outcome.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted),
        "the connection of a client that stopped reading was not cut ({outcome}) after {sent} bytes"
    );
    // The listener still serves others.
    let resp = r.post(br#"{"type":"payment","conversationId":"after"}"#);
    assert_eq!(resp.status, 202, "{}", resp.body);
}
