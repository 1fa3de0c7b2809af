//! routes.toml (README "Routes"): parsing with `file:line:col` diagnostics at the offending
//! option, `${NAME}` expansion, template validation and the matching semantics (order, stop,
//! fan-out, once per sink, any-of, wildcards, extra).

use super::*;
use crate::event::{normalise, NormaliseOptions};
use crate::format::Format;
use crate::sinks::{file::FileConfig, http::HttpConfig};
use serde_json::{json, Value};

const README_EXAMPLE: &str = r#"
[sinks.archive]
type = "file"
path = "var/events.jsonl"          # JSON Lines, one event a line

[sinks.crm]
type = "http"
url = "http://127.0.0.1:9000/webio"
timeout = "5s"
headers = { "x-api-key" = "${CRM_API_KEY}" }   # ${NAME}: from the environment at load; unset = load error

[sinks.bus]
type = "amqp"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
exchange = "webio"
exchange_type = "topic"            # declared (durable) at start unless declare = false
routing_key = "webio.{type}"
mandatory = true                   # an unroutable message is a failed delivery, not a silent drop

[sinks.stream]
type = "kafka"
brokers = "127.0.0.1:9092"
topic = "webio.{type}"
key = "{conversationId}"           # keeps a conversation's events in order on one partition
[sinks.stream.properties]          # passed to librdkafka as-is
"compression.type" = "lz4"

[[routes]]
name = "inbound-to-crm"
when = { type = ["inboundMessage"] }
to = ["crm", "stream"]

[[routes]]
name = "failed-deliveries"
when = { type = "messageStatusUpdate", statusCode = [3, 4] }
to = ["bus"]
stop = true                        # later routes are not tried for events that matched this one

[[routes]]
name = "everything"
to = ["archive"]                   # no `when`: matches every event
"#;

fn env(k: &str) -> Option<String> {
    match k {
        "CRM_API_KEY" => Some("k-123".into()),
        "HOST" => Some("crm.example".into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<Routes, ConfigError> {
    Routes::parse("routes.toml", text, env)
}

fn ok(text: &str) -> Routes {
    parse(text).unwrap_or_else(|e| panic!("{text}\n-> {e}"))
}

fn errs(text: &str) -> Vec<Diagnostic> {
    match parse(text) {
        Ok(r) => panic!("expected diagnostics for\n{text}\ngot {r:?}"),
        Err(e) => e.0,
    }
}

/// 1-based line and column of the first occurrence of `needle` in `text`.
fn pos(text: &str, needle: &str) -> (usize, usize) {
    let i = text.find(needle).unwrap_or_else(|| panic!("{needle:?} not in text"));
    crate::config::line_col(text, i)
}

fn ev_org(body: Value, org: Option<&str>) -> Event {
    normalise(
        &serde_json::to_vec(&body).unwrap(),
        org.map(Into::into),
        &NormaliseOptions::default(),
        chrono::Utc::now(),
    )
    .unwrap()
}

fn ev(body: Value) -> Event {
    ev_org(body, None)
}

const SINKS: &str = r#"
[sinks.a]
type = "file"
path = "a.jsonl"
[sinks.b]
type = "file"
path = "b.jsonl"
[sinks.c]
type = "file"
path = "c.jsonl"
[sinks.d]
type = "file"
path = "d.jsonl"
"#;

// ---------------------------------------------------------------------------------------------
// Parsing

#[test]
fn the_spec_example_parses_with_every_sink_type() {
    let r = ok(README_EXAMPLE);
    assert_eq!(r.sinks.keys().collect::<Vec<_>>(), ["archive", "bus", "crm", "stream"]);
    assert_eq!(
        r.sinks["archive"],
        SinkConfig::File(FileConfig {
            path: "var/events.jsonl".into(),
            format: Format::Event,
            fsync: true,
            ordering: Default::default()
        })
    );
    assert_eq!(
        r.sinks["crm"],
        SinkConfig::Http(HttpConfig {
            url: "http://127.0.0.1:9000/webio".into(),
            timeout: std::time::Duration::from_secs(5),
            headers: [("x-api-key".to_owned(), "k-123".to_owned())].into(),
            format: Format::Event,
            ordering: Default::default(),
        })
    );
    let SinkConfig::Amqp(bus) = &r.sinks["bus"] else { panic!("bus is not amqp: {:?}", r.sinks["bus"]) };
    assert_eq!(bus.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
    assert_eq!((bus.exchange.as_str(), bus.exchange_type.as_str()), ("webio", "topic"));
    assert_eq!(bus.routing_key, "webio.{type}");
    assert!(bus.declare && bus.mandatory);
    assert_eq!(bus.format, Format::Event);
    let SinkConfig::Kafka(stream) = &r.sinks["stream"] else { panic!("stream is not kafka") };
    assert_eq!(stream.brokers, "127.0.0.1:9092");
    assert_eq!((stream.topic.as_str(), stream.key.as_str()), ("webio.{type}", "{conversationId}"));
    assert_eq!(stream.properties["compression.type"].to_string(), "lz4");
    assert_eq!(stream.format, Format::Event);
    assert_eq!(
        r.routes,
        vec![
            Route {
                name: "inbound-to-crm".into(),
                when: vec![Condition { field: "type".into(), any_of: vec![Pattern::Text("inboundMessage".into())] }],
                to: vec!["crm".into(), "stream".into()],
                stop: false,
            },
            Route {
                name: "failed-deliveries".into(),
                when: vec![
                    Condition { field: "statusCode".into(), any_of: vec![Pattern::Int(3), Pattern::Int(4)] },
                    Condition { field: "type".into(), any_of: vec![Pattern::Text("messageStatusUpdate".into())] },
                ],
                to: vec!["bus".into()],
                stop: true,
            },
            Route { name: "everything".into(), when: vec![], to: vec!["archive".into()], stop: false },
        ]
    );
}

#[test]
fn the_spec_example_routes_as_documented() {
    let r = ok(README_EXAMPLE);
    let cases: &[(&str, Value, &[&str], &[&str])] = &[
        (
            "inbound goes to crm, stream and the archive",
            json!({"type":"inboundMessage","communicationActionId":"1"}),
            &["inbound-to-crm", "everything"],
            &["crm", "stream", "archive"],
        ),
        (
            "a failed delivery stops at the bus",
            json!({"type":"messageStatusUpdate","communicationActionId":"1","statusCode":"3"}),
            &["failed-deliveries"],
            &["bus"],
        ),
        (
            "a delivered status only reaches the archive",
            json!({"type":"messageStatusUpdate","communicationActionId":"1","statusCode":"2"}),
            &["everything"],
            &["archive"],
        ),
        ("anything else reaches the archive", json!({"type":"payment"}), &["everything"], &["archive"]),
    ];
    for (name, body, routes, sinks) in cases {
        let m = r.matching(&ev(body.clone()));
        assert_eq!((&m.routes[..], &m.sinks[..]), (*routes, *sinks), "{name}");
    }
}

#[test]
fn an_empty_file_has_no_sinks_and_no_routes() {
    let r = ok("");
    assert!(r.sinks.is_empty() && r.routes.is_empty());
    assert_eq!(r.matching(&ev(json!({"type":"x"}))), Matched::default());
}

#[test]
fn unnamed_routes_are_numbered_from_one() {
    let r =
        ok(&format!("{SINKS}[[routes]]\nto = \"a\"\n[[routes]]\nname = \"n\"\nto = \"b\"\n[[routes]]\nto = \"c\"\n"));
    assert_eq!(r.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["#1", "n", "#3"]);
}

#[test]
fn to_accepts_one_sink_or_a_list() {
    let r = ok(&format!("{SINKS}[[routes]]\nto = \"a\"\n[[routes]]\nto = [\"b\", \"c\"]\n"));
    assert_eq!(r.routes[0].to, ["a"]);
    assert_eq!(r.routes[1].to, ["b", "c"]);
}

#[test]
fn every_sink_accepts_the_three_formats() {
    for (format, want) in [("event", Format::Event), ("cloudevents", Format::Cloudevents), ("raw", Format::Raw)] {
        let text = format!(
            "[sinks.f]\ntype = \"file\"\npath = \"x\"\nformat = \"{format}\"\n\
             [sinks.h]\ntype = \"http\"\nurl = \"http://h/\"\nformat = \"{format}\"\n\
             [sinks.q]\ntype = \"amqp\"\nurl = \"amqp://h\"\nexchange = \"e\"\nformat = \"{format}\"\n\
             [sinks.k]\ntype = \"kafka\"\nbrokers = \"h:9092\"\ntopic = \"t\"\nformat = \"{format}\"\n"
        );
        let r = ok(&text);
        for (name, sink) in &r.sinks {
            assert_eq!(sink.format(), want, "{name} {format}");
        }
    }
    let d = errs("[sinks.f]\ntype = \"file\"\npath = \"x\"\nformat = \"xml\"\n");
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].message.contains("xml"), "{d:?}");
}

// ---------------------------------------------------------------------------------------------
// Diagnostics

#[test]
fn a_route_naming_an_undefined_sink_is_reported_at_its_to() {
    let text = format!("{SINKS}\n[[routes]]\nname = \"r\"\nto = [\"a\", \"nope\"]\n");
    let d = errs(&text);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].source, "routes.toml");
    assert_eq!(d[0].line, Some(pos(&text, "[\"a\", \"nope\"]")), "{}", d[0]);
    assert!(d[0].message.contains("\"nope\"") && d[0].message.contains("(r)"), "{}", d[0]);
    let (l, c) = pos(&text, "[\"a\", \"nope\"]");
    assert!(d[0].to_string().starts_with(&format!("routes.toml:{l}:{c}: ")), "{}", d[0]);
}

#[test]
fn every_undefined_sink_is_reported() {
    let text = "[[routes]]\nto = \"x\"\n[[routes]]\nto = [\"y\", \"z\"]\n";
    let d = errs(text);
    assert_eq!(d.len(), 3, "{d:?}");
    assert_eq!(d[0].line.unwrap().0, 2);
    assert_eq!(d[1].line.unwrap().0, 4);
}

#[test]
fn a_route_with_an_empty_to_is_refused() {
    let d = errs(&format!("{SINKS}[[routes]]\nto = []\n"));
    assert!(d[0].message.contains("names no sink"), "{d:?}");
}

#[test]
fn a_route_without_to_is_refused() {
    let text = format!("{SINKS}[[routes]]\nname = \"x\"\n");
    let d = errs(&text);
    assert!(d[0].message.contains("to"), "{d:?}");
    assert!(d[0].line.is_some(), "{d:?}");
}

#[test]
fn an_unknown_field_in_when_is_reported_at_the_key() {
    for (when, needle) in [
        ("{ nope = 1 }", "nope"),
        ("{ type = \"x\", statuscode = 1 }", "statuscode"),
        ("{ \"extra.\" = 1 }", "\"extra.\""),
        ("{ Type = \"x\" }", "Type"),
    ] {
        let text = format!("{SINKS}[[routes]]\nname = \"r\"\nwhen = {when}\nto = \"a\"\n");
        let d = errs(&text);
        assert_eq!(d.len(), 1, "{when}: {d:?}");
        assert_eq!(d[0].line, Some(pos(&text, &format!("{needle} ="))), "{when}: {}", d[0]);
        assert!(d[0].message.contains("unknown field"), "{when}: {}", d[0]);
    }
}

#[test]
fn a_near_miss_field_name_in_when_or_a_template_gets_a_did_you_mean() {
    for (written, meant) in [
        ("statuscode", "statusCode"),
        ("conversationID", "conversationId"),
        ("customerUID", "customerUid"),
        ("convrsationId", "conversationId"),
    ] {
        let text = format!("{SINKS}[[routes]]\nwhen = {{ {written} = 1 }}\nto = \"a\"\n");
        let d = errs(&text);
        assert!(d[0].message.contains(&format!("did you mean \"{meant}\"?")), "{written}: {}", d[0]);

        let text = format!("[sinks.s]\ntype = \"file\"\npath = \"var/{{{written}}}.jsonl\"\n");
        let d = errs(&text);
        assert!(d[0].message.contains(&format!("did you mean {{{meant}}}?")), "{written}: {}", d[0]);
    }
    let d = errs(&format!("{SINKS}[[routes]]\nwhen = {{ nothing_like_it = 1 }}\nto = \"a\"\n"));
    assert!(!d[0].message.contains("did you mean"), "{}", d[0]);
}

#[test]
fn a_misspelt_sink_in_to_and_a_misspelt_top_level_key_get_a_did_you_mean() {
    let d = errs("[sinks.archive]\ntype = \"file\"\npath = \"x\"\n[[routes]]\nto = \"archiv\"\n");
    assert!(d[0].message.contains("did you mean \"archive\"?"), "{}", d[0]);
    let d = errs("[[route]]\nto = \"a\"\n");
    assert_eq!(d[0].line, Some((1, 3)), "{}", d[0]);
    assert!(d[0].message.contains("did you mean `routes`?"), "{}", d[0]);
}

#[test]
fn every_normalised_field_and_extra_names_are_accepted_in_when() {
    for field in crate::event::FIELDS {
        ok(&format!("{SINKS}[[routes]]\nwhen = {{ {field} = \"x\" }}\nto = \"a\"\n"));
    }
    ok(&format!("{SINKS}[[routes]]\nwhen = {{ \"extra.closedBy\" = \"x\" }}\nto = \"a\"\n"));
}

#[test]
fn when_values_must_be_scalars_or_non_empty_lists() {
    for value in ["[]", "1.5", "[\"a\", 1.5]", "2021-01-01T00:00:00Z", "[[\"a\"]]"] {
        let text = format!("{SINKS}[[routes]]\nwhen = {{ type = {value} }}\nto = \"a\"\n");
        let d = errs(&text);
        assert_eq!(d.len(), 1, "{value}: {d:?}");
        assert_eq!(d[0].line.unwrap().0, pos(&text, "when").0, "{value}");
        assert!(d[0].message.contains("when.type"), "{value}: {}", d[0]);
    }
}

#[test]
fn an_unknown_template_field_is_reported_for_every_templated_option() {
    // (sink table, the option's text, the key named in the message)
    let cases: &[(&str, &str, &str)] = &[
        ("type = \"file\"\npath = \"var/{nope}.jsonl\"", "\"var/{nope}.jsonl\"", "sinks.s.path"),
        ("type = \"http\"\nurl = \"http://h/{nope}\"", "\"http://h/{nope}\"", "sinks.s.url"),
        (
            "type = \"http\"\nurl = \"http://h/\"\nheaders = { \"x-k\" = \"{nope}\" }",
            "\"{nope}\" }",
            "sinks.s.headers.x-k",
        ),
        (
            "type = \"amqp\"\nurl = \"amqp://h\"\nexchange = \"e\"\nrouting_key = \"webio.{nope}\"",
            "\"webio.{nope}\"",
            "sinks.s.routing_key",
        ),
        ("type = \"kafka\"\nbrokers = \"h:9092\"\ntopic = \"webio.{nope}\"", "\"webio.{nope}\"", "sinks.s.topic"),
        ("type = \"kafka\"\nbrokers = \"h:9092\"\ntopic = \"t\"\nkey = \"{nope}\"", "\"{nope}\"", "sinks.s.key"),
    ];
    for (table, needle, key) in cases {
        let text = format!("# routes\n[sinks.s]\n{table}\n");
        let d = errs(&text);
        assert_eq!(d.len(), 1, "{table}: {d:?}");
        assert_eq!(d[0].line, Some(pos(&text, needle)), "{table}: {}", d[0]);
        assert!(d[0].message.starts_with(&format!("{key}: ")), "{table}: {}", d[0]);
        assert!(d[0].message.contains("{nope}"), "{table}: {}", d[0]);
    }
}

#[test]
fn known_template_fields_are_accepted_everywhere() {
    ok(r#"
[sinks.f]
type = "file"
path = "var/{type}/{shape}-{extra.channel}.jsonl"
[sinks.h]
type = "http"
url = "https://h/{organisationId}/{conversationId}?s={statusCode}"
headers = { "x-conv" = "{conversationId}", "x-lit" = "{{literal}}" }
[sinks.q]
type = "amqp"
url = "amqp://h"
exchange = "e"
routing_key = "webio.{type}.{shape}"
[sinks.k]
type = "kafka"
brokers = "h:9092"
topic = "webio.{type}"
key = "{organisationId}:{conversationId}"
"#);
}

#[test]
fn malformed_templates_are_reported() {
    for path in ["var/{type.jsonl", "var/type}.jsonl", "var/{}.jsonl"] {
        let text = format!("[sinks.s]\ntype = \"file\"\npath = \"{path}\"\n");
        let d = errs(&text);
        assert_eq!(d[0].line.unwrap().0, 3, "{path}: {}", d[0]);
        assert!(d[0].message.starts_with("sinks.s.path: "), "{path}: {}", d[0]);
    }
}

#[test]
fn environment_variables_are_expanded_at_load() {
    let r = ok(r#"
[sinks.h]
type = "http"
url = "https://${HOST}/hook?price=$$5"
headers = { "x-api-key" = "${CRM_API_KEY}", "x-both" = "${HOST}:${CRM_API_KEY}" }
"#);
    let SinkConfig::Http(h) = &r.sinks["h"] else { panic!("{:?}", r.sinks["h"]) };
    assert_eq!(h.url, "https://crm.example/hook?price=$5");
    assert_eq!(h.headers["x-api-key"], "k-123");
    assert_eq!(h.headers["x-both"], "crm.example:k-123");
}

#[test]
fn environment_variables_are_expanded_in_nested_tables_too() {
    let r = ok(
        "[sinks.k]\ntype = \"kafka\"\nbrokers = \"${HOST}:9092\"\ntopic = \"t\"\n[sinks.k.properties]\n\"sasl.password\" = \"${CRM_API_KEY}\"\n",
    );
    let SinkConfig::Kafka(k) = &r.sinks["k"] else { panic!() };
    assert_eq!(k.brokers, "crm.example:9092");
    assert_eq!(k.properties["sasl.password"].to_string(), "k-123");
}

#[test]
fn an_unset_environment_variable_is_a_load_error_at_its_value() {
    let text = "[sinks.h]\ntype = \"http\"\nurl = \"http://h/\"\nheaders = { \"x-api-key\" = \"${MISSING_KEY}\" }\n";
    let d = errs(text);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].line.unwrap().0, 4, "{}", d[0]);
    assert!(d[0].message.contains("MISSING_KEY") && d[0].message.contains("sinks.h.headers"), "{}", d[0]);

    let d = errs("[sinks.h]\ntype = \"http\"\nurl = \"http://${NOPE}/\"\n");
    assert_eq!(d[0].line.unwrap().0, 3, "{}", d[0]);
    assert!(d[0].message.contains("NOPE"), "{}", d[0]);

    let d = errs("[sinks.h]\ntype = \"http\"\nurl = \"http://${HOST/\"\n");
    assert!(d[0].message.contains("sinks.h.url"), "{}", d[0]);
}

#[test]
fn the_environment_lookup_is_the_one_given() {
    let text = "[sinks.h]\ntype = \"http\"\nurl = \"http://${H}/\"\n";
    let r = Routes::parse("r.toml", text, |k| (k == "H").then(|| "x.example".to_owned())).unwrap();
    let SinkConfig::Http(h) = &r.sinks["h"] else { panic!() };
    assert_eq!(h.url, "http://x.example/");
    assert!(Routes::parse("r.toml", text, |_| None).is_err());
}

#[test]
fn an_unknown_sink_type_is_reported_at_its_type_with_the_nearest_type() {
    for (written, hint) in [("carrier-pigeon", None), ("fil", Some("\"file\"")), ("Kafka", Some("\"kafka\""))] {
        let text = format!("[sinks.s]\npath = \"x\"\ntype = \"{written}\"\n");
        let d = errs(&text);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].line, Some(pos(&text, &format!("\"{written}\""))), "{}", d[0]);
        assert!(d[0].message.starts_with("sinks.s.type: ") && d[0].message.contains(written), "{}", d[0]);
        match hint {
            Some(h) => assert!(d[0].message.contains(&format!("did you mean {h}?")), "{}", d[0]),
            None => assert!(!d[0].message.contains("did you mean"), "{}", d[0]),
        }
    }
}

#[test]
fn a_sink_without_a_type_is_refused() {
    let d = errs("[sinks.s]\npath = \"x\"\n");
    assert!(d[0].message.contains("type"), "{}", d[0]);
}

#[test]
fn an_unknown_sink_option_is_reported_at_its_own_line() {
    for (table, option) in [
        ("type = \"file\"\npath = \"x\"\nflush = true", "flush"),
        ("type = \"http\"\nurl = \"http://h/\"\nmethod = \"PUT\"", "method"),
        ("type = \"amqp\"\nurl = \"amqp://h\"\nexchange = \"e\"\nroutingkey = \"k\"", "routingkey"),
        ("type = \"kafka\"\nbrokers = \"h\"\ntopic = \"t\"\npartition = 1", "partition"),
    ] {
        let text = format!("\n[sinks.s]\n{table}\n");
        let d = errs(&text);
        assert_eq!(d.len(), 1, "{table}: {d:?}");
        assert_eq!(d[0].line, Some(pos(&text, &format!("{option} ="))), "{table}: {}", d[0]);
        assert!(d[0].message.starts_with("sinks.s: ") && d[0].message.contains(option), "{table}: {}", d[0]);
    }
}

#[test]
fn a_misspelt_sink_option_gets_a_did_you_mean() {
    for (table, written, meant) in [
        ("type = \"file\"\npath = \"x\"\nfsyn = true", "fsyn", "fsync"),
        ("type = \"http\"\nurl = \"http://h/\"\nheader = {}", "header", "headers"),
        ("type = \"amqp\"\nurl = \"amqp://h\"\nexchange = \"e\"\nrouting_keys = \"k\"", "routing_keys", "routing_key"),
    ] {
        let text = format!("[sinks.s]\n{table}\n");
        let d = errs(&text);
        assert_eq!(d[0].line, Some(pos(&text, &format!("{written} ="))), "{}", d[0]);
        assert!(d[0].message.contains(&format!("did you mean `{meant}`?")), "{}", d[0]);
    }
}

#[test]
fn a_badly_typed_sink_option_is_reported_at_its_value_naming_its_key() {
    let text = "[sinks.s]\ntype = \"http\"\nurl = \"http://h/\"\nheaders = { \"x-a\" = \"1\", \"x-b\" = 2 }\n[sinks.f]\ntype = \"file\"\npath = \"x\"\nfsync = \"yes\"\n";
    let d = errs(text);
    assert_eq!(d.len(), 2, "{d:?}");
    // In file order.
    assert_eq!(d[0].line, Some(pos(text, "2 }")), "{}", d[0]);
    assert!(d[0].message.starts_with("sinks.s.headers.x-b: "), "{}", d[0]);
    assert_eq!(d[1].line, Some(pos(text, "\"yes\"")), "{}", d[1]);
    assert!(d[1].message.starts_with("sinks.f.fsync: "), "{}", d[1]);
}

#[test]
fn sink_option_errors_name_the_option_once_and_durations_say_what_to_write() {
    let text = "[sinks.k]\ntype = \"kafka\"\nbrokers = \"h:9092\"\ntopic = \"t\"\nqueue_timeout = 5\n";
    let d = errs(text);
    assert_eq!(d[0].line, Some(pos(text, "5\n")), "{}", d[0]);
    assert!(d[0].message.starts_with("sinks.k.queue_timeout: ") && d[0].message.contains("write \"5s\""), "{}", d[0]);

    let text = "[sinks.q]\ntype = \"amqp\"\nurl = \"ftp://h\"\nexchange = \"e\"\n";
    let d = errs(text);
    assert_eq!(d[0].line.unwrap().0, 3, "{}", d[0]);
    assert!(d[0].message.starts_with("sinks.q.url: ") && !d[0].message.contains("url: url:"), "{}", d[0]);
}

#[test]
fn a_wrongly_typed_value_from_the_environment_is_not_echoed() {
    let text = "[sinks.f]\ntype = \"file\"\npath = \"x\"\nfsync = \"${CRM_API_KEY}\"\n";
    let d = errs(text);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].line.unwrap().0, 4, "{}", d[0]);
    assert!(!d[0].message.contains("k-123"), "the value leaked: {}", d[0]);
    assert!(d[0].message.contains("expected a boolean"), "{}", d[0]);
}

#[test]
fn each_bad_kafka_property_is_reported_at_its_own_line() {
    let text = "[sinks.k]\ntype = \"kafka\"\nbrokers = \"h:9092\"\ntopic = \"t\"\n[sinks.k.properties]\n\"linger.ms\" = 5\n\"compression.type\" = \"lz5\"\n\"no.such.property\" = 1\n";
    let d = errs(text);
    assert_eq!(d.len(), 2, "{d:?}");
    let compression = d.iter().find(|d| d.message.contains("compression.type")).expect("compression.type reported");
    assert_eq!(compression.line.unwrap().0, pos(text, "\"compression.type\"").0, "{compression}");
    let unknown = d.iter().find(|d| d.message.contains("no.such.property")).expect("unknown property reported");
    assert_eq!(unknown.line.unwrap().0, pos(text, "\"no.such.property\"").0, "{unknown}");
}

#[test]
fn a_missing_required_sink_option_is_reported() {
    for (table, option) in [
        ("type = \"file\"", "path"),
        ("type = \"http\"", "url"),
        ("type = \"amqp\"\nurl = \"amqp://h\"", "exchange"),
        ("type = \"kafka\"\nbrokers = \"h\"", "topic"),
    ] {
        let d = errs(&format!("[sinks.s]\n{table}\n"));
        assert!(d[0].message.contains(option), "{table}: {}", d[0]);
    }
}

#[test]
fn invalid_sink_option_values_are_reported() {
    for (table, key) in [
        ("type = \"http\"\nurl = \"ftp://h/\"", "sinks.s.url"),
        ("type = \"http\"\nurl = \"not a url\"", "sinks.s.url"),
        ("type = \"http\"\nurl = \"/{type}\"", "sinks.s.url"),
        ("type = \"http\"\nurl = \"http://h/\"\ntimeout = \"soon\"", "sinks.s.timeout"),
        ("type = \"http\"\nurl = \"http://h/\"\nheaders = { \"bad header\" = \"v\" }", "sinks.s.headers"),
        ("type = \"file\"\npath = \"\"", "sinks.s.path"),
    ] {
        let d = errs(&format!("[sinks.s]\n{table}\n"));
        assert!(d.iter().any(|d| d.message.starts_with(key) && d.line.is_some()), "{table}: {d:?}");
    }
}

#[test]
fn a_route_naming_a_broken_sink_is_not_reported_twice() {
    let d = errs("[sinks.s]\ntype = \"nope\"\n[[routes]]\nto = \"s\"\n");
    assert_eq!(d.len(), 1, "{d:?}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = "[sinks.s]\ntype = \"file\"\npath = \"{nope}\"\n[[routes]]\nwhen = { bogus = 1 }\nto = \"t\"\n";
    let d = errs(text);
    assert_eq!(d.len(), 3, "{d:?}");
}

#[test]
fn toml_syntax_errors_and_unknown_top_level_keys_have_a_position() {
    for (text, line) in [
        ("[sinks.s]\ntype = \n", 2),
        ("sinks = 1\n", 1),
        ("\n\nroute = []\n", 3),
        ("[[routes]]\nto = \"a\"\nstopp = true\n", 3),
    ] {
        let d = errs(text);
        assert_eq!(d.len(), 1, "{text:?}: {d:?}");
        assert_eq!(d[0].line.map(|l| l.0), Some(line), "{text:?}: {}", d[0]);
    }
}

#[test]
fn load_reads_the_file_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, format!("{SINKS}[[routes]]\nto = \"zz\"\n")).unwrap();
    let e = Routes::load(&path).unwrap_err();
    assert!(e.to_string().starts_with(&format!("{}:", path.display())), "{e}");
    let e = Routes::load(&dir.path().join("missing.toml")).unwrap_err();
    assert!(e.to_string().contains("missing.toml"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Matching

/// Does one route with this `when` match the event?
fn when_matches(when: &str, body: Value) -> bool {
    let text = format!("{SINKS}[[routes]]\nwhen = {when}\nto = \"a\"\n");
    let r = ok(&text);
    let m = r.matching(&ev_org(body, Some("1234")));
    !m.routes.is_empty()
}

#[test]
fn when_conditions_match_as_documented() {
    let inbound = json!({
        "type": "inboundMessage",
        "conversationId": "97847",
        "communicationActionId": 220859,
        "statusCode": "3",
        "channel": "sms",
        "count": 3,
        "countText": "7",
        "flag": true,
        "nested": {"a": 1},
        "nothing": null,
    });
    let legacy = json!({"type": "messageStatusUpdate", "statusCode": 2});
    let cases: &[(&str, &str, &Value, bool)] = &[
        ("exact type", r#"{ type = "inboundMessage" }"#, &inbound, true),
        ("other type", r#"{ type = "messageSend" }"#, &inbound, false),
        ("type is case-sensitive", r#"{ type = "inboundmessage" }"#, &inbound, false),
        ("any of a list", r#"{ type = ["messageSend", "inboundMessage"] }"#, &inbound, true),
        ("none of a list", r#"{ type = ["messageSend", "payment"] }"#, &inbound, false),
        ("prefix wildcard", r#"{ type = "inbound*" }"#, &inbound, true),
        ("suffix wildcard", r#"{ type = "*Message" }"#, &inbound, true),
        ("middle wildcard", r#"{ type = "in*Message" }"#, &inbound, true),
        ("wildcard alone", r#"{ type = "*" }"#, &inbound, true),
        ("two wildcards", r#"{ type = "*bound*" }"#, &inbound, true),
        ("wildcard that does not fit", r#"{ type = "message*" }"#, &inbound, false),
        ("wildcard in a list", r#"{ type = ["payment", "*Message"] }"#, &inbound, true),
        ("wildcard does not match null", r#"{ customerUid = "*" }"#, &inbound, false),
        ("wildcard matches a present id", r#"{ conversationId = "978*" }"#, &inbound, true),
        ("numeric id as text", r#"{ communicationActionId = "220859" }"#, &inbound, true),
        ("numeric id as integer", r#"{ communicationActionId = 220859 }"#, &inbound, true),
        ("integer status code", r#"{ statusCode = 3 }"#, &inbound, true),
        ("string status code", r#"{ statusCode = "3" }"#, &inbound, true),
        ("status code list", r#"{ statusCode = [3, 4] }"#, &inbound, true),
        ("status code mismatch", r#"{ statusCode = [4, 5] }"#, &inbound, false),
        ("status code absent", r#"{ statusCode = 3 }"#, &json!({"type": "payment"}), false),
        ("all keys hold", r#"{ type = "inboundMessage", conversationId = "97847" }"#, &inbound, true),
        ("one key fails", r#"{ type = "inboundMessage", conversationId = "1" }"#, &inbound, false),
        ("shape legacy", r#"{ shape = "legacy" }"#, &legacy, true),
        ("shape current", r#"{ shape = "current" }"#, &legacy, false),
        (
            "legacy send rewrite is seen",
            r#"{ type = "messageSend" }"#,
            &json!({"type": "messageStatusUpdate", "statusCode": 1}),
            true,
        ),
        ("organisation", r#"{ organisationId = "1234" }"#, &inbound, true),
        ("schema", r#"{ schema = "webio.event/v1" }"#, &inbound, true),
        ("extra string", r#"{ "extra.channel" = "sms" }"#, &inbound, true),
        ("extra string mismatch", r#"{ "extra.channel" = "email" }"#, &inbound, false),
        ("extra wildcard", r#"{ "extra.channel" = "s*" }"#, &inbound, true),
        ("extra integer", r#"{ "extra.count" = 3 }"#, &inbound, true),
        ("extra integer as text", r#"{ "extra.count" = "3" }"#, &inbound, true),
        ("extra text as integer", r#"{ "extra.countText" = 7 }"#, &inbound, true),
        ("extra boolean", r#"{ "extra.flag" = true }"#, &inbound, true),
        ("extra boolean mismatch", r#"{ "extra.flag" = false }"#, &inbound, false),
        ("extra missing", r#"{ "extra.absent" = "*" }"#, &inbound, false),
        ("extra null", r#"{ "extra.nothing" = "*" }"#, &inbound, false),
        ("extra object wildcard", r#"{ "extra.nested" = "*" }"#, &inbound, true),
        ("extra unmatched by a mapped field", r#"{ "extra.type" = "*" }"#, &inbound, false),
        ("extra dotted key", r#"{ extra.channel = "sms" }"#, &inbound, true),
        ("extra dotted key mismatch", r#"{ extra.channel = "fax" }"#, &inbound, false),
        ("empty when", r#"{}"#, &inbound, true),
    ];
    for (name, when, body, want) in cases {
        assert_eq!(when_matches(when, (*body).clone()), *want, "{name}: when = {when}");
    }
}

#[test]
fn a_when_table_written_as_a_section_works_like_an_inline_one() {
    let text = format!(
        "{SINKS}[[routes]]\nname = \"r\"\nto = \"a\"\n[routes.when]\ntype = \"inboundMessage\"\nextra.channel = [\"sms\", \"whatsapp\"]\n"
    );
    let r = ok(&text);
    assert!(r.routes[0].when.iter().any(|c| c.field == "extra.channel"), "{:?}", r.routes[0].when);
    let hit = ev(json!({"type": "inboundMessage", "channel": "whatsapp"}));
    let miss = ev(json!({"type": "inboundMessage", "channel": "email"}));
    assert_eq!(r.matching(&hit).routes, ["r"]);
    assert!(r.matching(&miss).routes.is_empty());
}

#[test]
fn a_dotted_key_that_is_not_extra_is_an_unknown_field() {
    let d = errs(&format!("{SINKS}[[routes]]\nwhen = {{ type.name = \"x\" }}\nto = \"a\"\n"));
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].message.contains("type.name"), "{}", d[0]);
}

#[test]
fn a_route_without_when_matches_every_event() {
    let r = ok(&format!("{SINKS}[[routes]]\nto = \"a\"\n"));
    for body in [json!({"type": "x"}), json!({"type": "inboundMessage"}), json!({"type": "payment", "a": [1]})] {
        assert_eq!(r.matching(&ev(body.clone())).sinks, ["a"], "{body}");
    }
}

const SEMANTICS: &str = r#"
[[routes]]
name = "inbound"
when = { type = "inboundMessage" }
to = ["a", "b"]

[[routes]]
name = "failed"
when = { type = "messageStatusUpdate", statusCode = [3, 4] }
to = "c"
stop = true

[[routes]]
name = "messages"
when = { type = "message*" }
to = ["b", "d"]

[[routes]]
name = "everything"
to = ["a"]

[[routes]]
name = "after-everything"
when = { type = "payment" }
to = ["c", "a"]
stop = true

[[routes]]
name = "never-after-stop"
when = { type = "payment" }
to = ["d"]
"#;

#[test]
fn routes_apply_in_order_with_fan_out_stop_and_one_delivery_per_sink() {
    let r = ok(&format!("{SINKS}{SEMANTICS}"));
    let cases: &[(&str, Value, &[&str], &[&str])] = &[
        (
            "fan-out, and `a` named twice is delivered once",
            json!({"type": "inboundMessage", "communicationActionId": "1"}),
            &["inbound", "everything"],
            &["a", "b"],
        ),
        (
            "a matching stop route ends the search",
            json!({"type": "messageStatusUpdate", "communicationActionId": "1", "statusCode": 4}),
            &["failed"],
            &["c"],
        ),
        (
            "a stop route that does not match does not stop",
            json!({"type": "messageStatusUpdate", "communicationActionId": "1", "statusCode": 2}),
            &["messages", "everything"],
            &["b", "d", "a"],
        ),
        ("sinks keep first-named order", json!({"type": "payment"}), &["everything", "after-everything"], &["a", "c"]),
        ("only the catch-all", json!({"type": "setStatus"}), &["everything"], &["a"]),
    ];
    for (name, body, routes, sinks) in cases {
        let m = r.matching(&ev(body.clone()));
        assert_eq!(m.routes, *routes, "{name}");
        assert_eq!(m.sinks, *sinks, "{name}");
    }
}

#[test]
fn stop_on_the_first_route_hides_every_later_one() {
    let r = ok(&format!("{SINKS}[[routes]]\nto = \"a\"\nstop = true\n[[routes]]\nto = \"b\"\n"));
    assert_eq!(r.matching(&ev(json!({"type": "x"}))).sinks, ["a"]);
}

#[test]
fn no_matching_route_means_no_sink() {
    let r = ok(&format!("{SINKS}[[routes]]\nwhen = {{ type = \"payment\" }}\nto = \"a\"\n"));
    assert_eq!(r.matching(&ev(json!({"type": "x"}))), Matched::default());
}

// ---------------------------------------------------------------------------------------------
// glob

#[test]
fn glob_matches_star_as_any_run_of_characters() {
    let cases: &[(&str, &str, bool)] = &[
        ("", "", true),
        ("", "a", false),
        ("abc", "abc", true),
        ("abc", "abcd", false),
        ("abc", "ab", false),
        ("*", "", true),
        ("*", "anything at all", true),
        ("**", "x", true),
        ("a*", "a", true),
        ("a*", "abc", true),
        ("a*", "ba", false),
        ("*a", "a", true),
        ("*a", "cba", true),
        ("*a", "ab", false),
        ("a*a", "a", false),
        ("a*a", "aa", true),
        ("a*a", "aba", true),
        ("a**b", "ab", true),
        ("a*b*c", "abc", true),
        ("a*b*c", "a-b-c", true),
        ("a*b*c", "acb", false),
        ("a*b*c", "abcabc", true),
        ("*b*", "abc", true),
        ("*b*", "ac", false),
        ("a*bc*bc", "abcbc", true),
        ("a*bc*bc", "abc", false),
        ("ab*ba", "aba", false),
        ("?", "a", false),
        ("a.c", "abc", false),
        ("[ab]", "a", false),
        ("é*", "éa", true),
        ("*é", "café", true),
        ("c*é", "café", true),
        ("*€*", "1€2", true),
        ("A*", "a", false),
    ];
    for (pattern, text, want) in cases {
        assert_eq!(glob(pattern, text), *want, "glob({pattern:?}, {text:?})");
    }
}

#[test]
fn environment_values_with_braces_are_literal_in_templates_and_untouched_elsewhere() {
    let text = r#"
[sinks.crm]
type = "http"
url = "http://127.0.0.1:9000/${PATH_PART}"
headers = { "x-api-key" = "${API_KEY}" }
[sinks.bus]
type = "amqp"
url = "amqp://guest:${AMQP_PASSWORD}@127.0.0.1:5672/%2f"
exchange = "webio"
[[routes]]
to = ["crm", "bus"]
"#;
    let env = |k: &str| match k {
        "API_KEY" => Some("s3cr{et}".to_owned()),
        "PATH_PART" => Some("a{b".to_owned()),
        "AMQP_PASSWORD" => Some("p{w}".to_owned()),
        _ => None,
    };
    let r = Routes::parse("routes.toml", text, env).unwrap_or_else(|e| panic!("{e}"));
    let SinkConfig::Http(crm) = &r.sinks["crm"] else { panic!("crm is not http") };
    assert_eq!(crm.headers["x-api-key"], "s3cr{{et}}", "escaped for the template parser");
    let key = crate::template::Template::parse(&crm.headers["x-api-key"], crate::template::Escape::None).unwrap();
    assert!(key.is_constant());
    let SinkConfig::Amqp(bus) = &r.sinks["bus"] else { panic!("bus is not amqp") };
    assert_eq!(bus.url, "amqp://guest:p{w}@127.0.0.1:5672/%2f", "a non-template option is taken as is");
}

#[test]
fn ordering_is_read_typed_on_every_sink_type_and_defaults_to_none() {
    let text = r#"
[sinks.f]
type = "file"
path = "x.jsonl"
ordering = "conversation"
[sinks.h]
type = "http"
url = "http://127.0.0.1:9/x"
ordering = "none"
[sinks.a]
type = "amqp"
url = "amqp://127.0.0.1:5672/%2f"
exchange = "webio"
ordering = "conversation"
[sinks.k]
type = "kafka"
brokers = "127.0.0.1:9092"
topic = "webio"
ordering = "conversation"
[sinks.plain]
type = "file"
path = "y.jsonl"
[[routes]]
to = ["f", "h", "a", "k", "plain"]
"#;
    let r = ok(text);
    let got: Vec<_> = ["f", "h", "a", "k", "plain"].iter().map(|s| r.sinks[*s].ordering().as_str()).collect();
    assert_eq!(got, ["conversation", "none", "conversation", "conversation", "none"]);
    assert!(r.check_delivery_mode(crate::config::DeliveryMode::Spool).is_ok());
}

#[test]
fn a_bad_ordering_is_reported_at_its_value_with_the_values_it_may_take() {
    for written in ["\"convo\"", "\"Conversation\"", "true", "[\"conversation\"]"] {
        let text = format!("[sinks.s]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/x\"\nordering = {written}\n");
        let d = errs(&text);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].line, Some(pos(&text, written)), "{}", d[0]);
        assert!(d[0].message.starts_with("sinks.s.ordering: "), "{}", d[0]);
        if written.starts_with('"') {
            assert!(d[0].message.contains("conversation"), "{}", d[0]);
        }
    }
    let d = errs("[sinks.s]\ntype = \"file\"\npath = \"x\"\nordering = \"convrsation\"\n");
    assert!(d[0].message.contains("did you mean `conversation`?"), "{}", d[0]);
}

#[test]
fn ordering_is_refused_in_direct_mode_at_the_option() {
    let text = "[sinks.s]\ntype = \"file\"\npath = \"x\"\nordering = \"conversation\"\n[sinks.t]\ntype = \"file\"\npath = \"y\"\nordering = \"none\"\n[[routes]]\nto = [\"s\", \"t\"]\n";
    let r = ok(text);
    let e = r.check_delivery_mode(crate::config::DeliveryMode::Direct).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert_eq!(e.0[0].line, Some(pos(text, "\"conversation\"")), "{e}");
    assert_eq!(e.0[0].source, "routes.toml");
    assert!(
        e.0[0].message.starts_with("sinks.s.ordering: ") && e.0[0].message.contains("delivery.mode = \"spool\""),
        "{e}"
    );
}
