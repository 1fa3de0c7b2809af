//! README "The normalised event", rule by rule, plus every fixture in `tests/fixtures/`.

use super::*;
use chrono::TimeZone;
use serde_json::json;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn received() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 17, 2, 11).unwrap()
}

fn opts(zone: &str, codes: &[i64]) -> NormaliseOptions {
    NormaliseOptions { source_timezone: zone.parse().unwrap(), legacy_send_status_codes: codes.to_vec() }
}

fn norm_bytes(body: &[u8], org: Option<&str>, o: &NormaliseOptions) -> Result<Event, BodyError> {
    normalise(body, org.map(str::to_owned), o, received())
}

fn norm_with(v: &Value, o: &NormaliseOptions) -> Event {
    norm_bytes(&serde_json::to_vec(v).unwrap(), None, o).unwrap_or_else(|e| panic!("{v} refused: {e}"))
}

fn norm(v: Value) -> Event {
    norm_with(&v, &NormaliseOptions::default())
}

fn id_of(v: Value) -> String {
    norm(v).id
}

/// The event as JSON without the fields a fixture leaves out.
fn comparable(ev: &Event) -> Value {
    let mut v = serde_json::to_value(ev).unwrap();
    let obj = v.as_object_mut().unwrap();
    for k in ["id", "receivedAt", "organisationId"] {
        obj.remove(k);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Fixtures

#[test]
fn every_webio_fixture_normalises_to_its_expected_json() {
    let dir = fixtures().join("webio");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".json") || name.ends_with(".expected.json") {
            continue;
        }
        let expected_path = dir.join(name.replace(".json", ".expected.json"));
        let mut expected: Value = serde_json::from_slice(&std::fs::read(&expected_path).unwrap()).unwrap();
        for k in ["id", "receivedAt", "organisationId"] {
            expected.as_object_mut().unwrap().remove(k);
        }
        let body = std::fs::read(&path).unwrap();
        let ev = norm_bytes(&body, Some("1234"), &NormaliseOptions::default())
            .unwrap_or_else(|e| panic!("{name} refused: {e}"));
        assert_eq!(comparable(&ev), expected, "{name}");
        assert_eq!(ev.organisation_id.as_deref(), Some("1234"), "{name}");
        assert_eq!(ev.received_at, "2026-11-27T17:02:11.000Z", "{name}");
        assert_valid_id(&ev.id);
        seen += 1;
    }
    assert!(seen >= 7, "only {seen} fixtures found in {}", dir.display());
}

#[test]
fn every_bad_fixture_is_refused_with_the_right_reason() {
    let dir = fixtures().join("bad");
    let cases: &[(&str, &str)] = &[
        ("empty.txt", "not_json"),
        ("form-encoded.txt", "not_json"),
        ("missing-type.json", "missing_type"),
        ("not-an-object.json", "not_object"),
        ("truncated.json", "not_json"),
        ("type-not-a-string.json", "type_not_string"),
    ];
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    for file in &files {
        let body = std::fs::read(dir.join(file)).unwrap();
        let err = norm_bytes(&body, None, &NormaliseOptions::default()).expect_err(&format!("{file} must be refused"));
        if let Some((_, reason)) = cases.iter().find(|(f, _)| f == file) {
            assert_eq!(err.reason(), *reason, "{file}: {err}");
        }
    }
    assert!(files.len() >= cases.len(), "missing bad fixtures in {}", dir.display());
}

#[test]
fn bodies_that_are_not_an_object_with_a_string_type_are_refused() {
    let cases: &[(&str, &[u8], BodyError)] = &[
        ("json null", b"null", BodyError::NotObject),
        ("a number", b"42", BodyError::NotObject),
        ("a string", br#""inboundMessage""#, BodyError::NotObject),
        ("a boolean", b"true", BodyError::NotObject),
        ("an array", br#"[{"type":"inboundMessage"}]"#, BodyError::NotObject),
        ("an empty object", b"{}", BodyError::MissingType),
        ("type null", br#"{"type":null}"#, BodyError::TypeNotString),
        ("type empty", br#"{"type":""}"#, BodyError::EmptyType),
        ("type blank", br#"{"type":"   "}"#, BodyError::EmptyType),
        ("type a number", br#"{"type":42}"#, BodyError::TypeNotString),
        ("type an object", br#"{"type":{"name":"inboundMessage"}}"#, BodyError::TypeNotString),
        ("type an array", br#"{"type":["inboundMessage"]}"#, BodyError::TypeNotString),
        ("type a boolean", br#"{"type":true}"#, BodyError::TypeNotString),
    ];
    for (name, body, want) in cases {
        let got = norm_bytes(body, None, &NormaliseOptions::default());
        assert_eq!(got.as_ref().err(), Some(want), "{name}: {got:?}");
    }
    let not_json: &[(&str, &[u8])] = &[
        ("empty body", b""),
        ("whitespace", b"  \n"),
        ("form encoding", b"type=inboundMessage"),
        ("truncated", br#"{"type":"inboundMessage""#),
        ("trailing garbage", br#"{"type":"inboundMessage"} x"#),
        ("invalid utf-8", b"{\"type\":\"\xff\"}"),
    ];
    for (name, body) in not_json {
        let got = norm_bytes(body, None, &NormaliseOptions::default());
        assert!(matches!(got, Err(BodyError::NotJson(_))), "{name}: {got:?}");
    }
}

#[test]
fn body_error_reasons_are_bounded_labels() {
    let cases = [
        (BodyError::NotJson("x".into()), "not_json"),
        (BodyError::NotObject, "not_object"),
        (BodyError::MissingType, "missing_type"),
        (BodyError::TypeNotString, "type_not_string"),
        (BodyError::EmptyType, "empty_type"),
    ];
    for (err, reason) in cases {
        assert_eq!(err.reason(), reason);
        assert!(!err.to_string().is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// type and shape

#[test]
fn shape_is_legacy_only_for_core_types_without_a_communication_action_id() {
    let cases: &[(&str, Value, Shape)] = &[
        (
            "status update with id",
            json!({"type":"messageStatusUpdate","communicationActionId":"1","statusCode":2}),
            Shape::Current,
        ),
        ("status update without id", json!({"type":"messageStatusUpdate","statusCode":2}), Shape::Legacy),
        ("inbound with id", json!({"type":"inboundMessage","communicationActionId":"1"}), Shape::Current),
        ("inbound without id", json!({"type":"inboundMessage","conversationId":"1"}), Shape::Legacy),
        ("send with id", json!({"type":"messageSend","communicationActionId":"1"}), Shape::Current),
        ("send without id", json!({"type":"messageSend"}), Shape::Legacy),
        ("numeric id", json!({"type":"inboundMessage","communicationActionId":220859}), Shape::Current),
        ("misspelt id key", json!({"type":"inboundMessage","comunicationActionId":"5"}), Shape::Current),
        ("upper-case id key", json!({"type":"inboundMessage","COMMUNICATIONACTIONID":"5"}), Shape::Current),
        ("empty id counts as none", json!({"type":"inboundMessage","communicationActionId":""}), Shape::Legacy),
        ("null id counts as none", json!({"type":"inboundMessage","communicationActionId":null}), Shape::Legacy),
        ("payment without id", json!({"type":"payment"}), Shape::Current),
        ("closed without id", json!({"type":"conversationClosed"}), Shape::Current),
        ("made-up type", json!({"type":"somethingNew2030"}), Shape::Current),
    ];
    for (name, body, shape) in cases {
        assert_eq!(norm(body.clone()).shape, *shape, "{name}");
    }
}

#[test]
fn legacy_status_updates_with_a_send_code_become_message_sends() {
    // (name, body, legacy_send_status_codes, expected type)
    let cases: &[(&str, Value, &[i64], &str)] = &[
        ("legacy code 1 string", json!({"type":"messageStatusUpdate","statusCode":"1"}), &[1], "messageSend"),
        ("legacy code 1 number", json!({"type":"messageStatusUpdate","statusCode":1}), &[1], "messageSend"),
        ("legacy code 2", json!({"type":"messageStatusUpdate","statusCode":2}), &[1], "messageStatusUpdate"),
        ("legacy no code", json!({"type":"messageStatusUpdate"}), &[1], "messageStatusUpdate"),
        ("legacy bad code", json!({"type":"messageStatusUpdate","statusCode":"x"}), &[1], "messageStatusUpdate"),
        ("configured 5", json!({"type":"messageStatusUpdate","statusCode":5}), &[1, 5], "messageSend"),
        ("configured 1 of 1,5", json!({"type":"messageStatusUpdate","statusCode":1}), &[1, 5], "messageSend"),
        ("not configured", json!({"type":"messageStatusUpdate","statusCode":1}), &[5], "messageStatusUpdate"),
        ("empty list", json!({"type":"messageStatusUpdate","statusCode":1}), &[], "messageStatusUpdate"),
        (
            "current code 1 stays",
            json!({"type":"messageStatusUpdate","communicationActionId":"9","statusCode":1}),
            &[1],
            "messageStatusUpdate",
        ),
        (
            "current code 1 misspelt id stays",
            json!({"type":"messageStatusUpdate","comunicationActionId":"9","statusCode":"1"}),
            &[1],
            "messageStatusUpdate",
        ),
        ("legacy inbound code 1 stays", json!({"type":"inboundMessage","statusCode":1}), &[1], "inboundMessage"),
        ("legacy send stays", json!({"type":"messageSend","statusCode":1}), &[1], "messageSend"),
        ("other type code 1 stays", json!({"type":"payment","statusCode":1}), &[1], "payment"),
    ];
    for (name, body, codes, want) in cases {
        let ev = norm_with(body, &opts("UTC", codes));
        assert_eq!(ev.event_type, *want, "{name}");
    }
    // The converted event is still recognisably legacy and keeps its status code.
    let ev = norm(json!({"type":"messageStatusUpdate","statusCode":"1"}));
    assert_eq!((ev.shape, ev.status_code), (Shape::Legacy, Some(1)));
}

#[test]
fn the_type_is_kept_exactly_as_sent() {
    for t in ["payment", "setStatus", "moveToQueue", "conversationAssignment", "x.y-z", "Ünïcode"] {
        assert_eq!(norm(json!({ "type": t })).event_type, t);
    }
}

// ---------------------------------------------------------------------------------------------
// Field lookup

#[test]
fn known_fields_are_found_whatever_their_case() {
    // (key as sent, normalised field name)
    let cases: &[(&str, &str)] = &[
        ("conversationId", "conversationId"),
        ("ConversationID", "conversationId"),
        ("conversationid", "conversationId"),
        ("communicationActionId", "communicationActionId"),
        ("communicationActionID", "communicationActionId"),
        ("COMMUNICATIONACTIONID", "communicationActionId"),
        ("comunicationActionId", "communicationActionId"),
        ("ComunicationActionID", "communicationActionId"),
        ("outboundChannelAddress", "outboundChannelAddress"),
        ("OutboundChannelAddress", "outboundChannelAddress"),
        ("inboundChannelAddress", "inboundChannelAddress"),
        ("INBOUNDCHANNELADDRESS", "inboundChannelAddress"),
        ("customerUID", "customerUid"),
        ("customerUid", "customerUid"),
        ("CustomerUid", "customerUid"),
        ("customeruid", "customerUid"),
        ("body", "body"),
        ("Body", "body"),
    ];
    for (key, field) in cases {
        let mut body = json!({"type": "inboundMessage"});
        body[*key] = json!("v-1");
        let ev = norm(body);
        assert_eq!(ev.field(field), crate::event::FieldValue::Str("v-1"), "{key}");
        assert!(ev.extra.is_empty(), "{key} leaked into extra: {:?}", ev.extra);
    }
    for key in ["statusCode", "StatusCode", "STATUSCODE", "statuscode"] {
        let mut body = json!({"type": "messageStatusUpdate", "communicationActionId": "1"});
        body[key] = json!("3");
        let ev = norm(body);
        assert_eq!(ev.status_code, Some(3), "{key}");
        assert!(ev.extra.is_empty(), "{key}");
    }
    for key in ["dateCreated", "DateCreated", "DATECREATED", "datecreated"] {
        let mut body = json!({"type": "inboundMessage"});
        body[key] = json!("2021-01-28 12:22:15.397");
        let ev = norm(body);
        assert_eq!(ev.occurred_at.as_deref(), Some("2021-01-28T12:22:15.397Z"), "{key}");
        assert!(ev.extra.is_empty(), "{key}");
    }
    for key in ["type", "Type", "TYPE"] {
        let mut body = json!({});
        body[key] = json!("payment");
        assert_eq!(norm(body).event_type, "payment", "{key}");
    }
}

#[test]
fn a_second_spelling_of_the_same_field_is_kept_not_dropped() {
    let ev = norm(json!({"type":"inboundMessage","customerUID":"A","customerUid":"B"}));
    let mut seen = vec![ev.customer_uid.clone().unwrap()];
    seen.extend(ev.extra.values().map(|v| v.as_str().unwrap().to_owned()));
    seen.sort();
    assert_eq!(seen, ["A", "B"]);
    assert_eq!(ev.extra.len(), 1);
}

#[test]
fn ids_come_out_as_strings_and_empty_strings_as_null() {
    let fields = [
        ("conversationId", "conversationId"),
        ("communicationActionId", "communicationActionId"),
        ("outboundChannelAddress", "outboundChannelAddress"),
        ("inboundChannelAddress", "inboundChannelAddress"),
        ("customerUID", "customerUid"),
    ];
    // (value sent, expected text or None for null)
    let values: &[(Value, Option<&str>)] = &[
        (json!("97847"), Some("97847")),
        (json!(97847), Some("97847")),
        (json!(447717472695_i64), Some("447717472695")),
        (json!(0), Some("0")),
        (json!(-5), Some("-5")),
        (json!("WhatsApp QA Test"), Some("WhatsApp QA Test")),
        (json!(" "), Some(" ")),
        (json!(""), None),
        (json!(null), None),
    ];
    for (key, field) in fields {
        for (sent, want) in values {
            let mut body = json!({"type": "messageStatusUpdate"});
            body[key] = sent.clone();
            let ev = norm(body);
            let got = ev.field(field).to_text().map(|c| c.into_owned());
            assert_eq!(got.as_deref(), *want, "{key} = {sent}");
            assert!(ev.extra.is_empty(), "{key} = {sent}: extra {:?}", ev.extra);
        }
    }
    // Missing altogether → null too.
    let ev = norm(json!({"type":"payment"}));
    assert_eq!(
        [
            &ev.conversation_id,
            &ev.communication_action_id,
            &ev.outbound_channel_address,
            &ev.inbound_channel_address,
            &ev.customer_uid,
            &ev.body,
        ],
        [&None, &None, &None, &None, &None, &None]
    );
}

#[test]
fn values_that_cannot_be_mapped_are_kept_unchanged_in_extra() {
    // (key, value): none of these fits its slot, so the field is null and the value is in extra.
    let cases: &[(&str, &str, Value)] = &[
        ("conversationId", "conversationId", json!(true)),
        ("conversationId", "conversationId", json!({"id": 1})),
        ("communicationActionID", "communicationActionId", json!([1, 2])),
        ("outboundChannelAddress", "outboundChannelAddress", json!(false)),
        ("CustomerUid", "customerUid", json!({"uid": "x"})),
        ("body", "body", json!(42)),
        ("body", "body", json!({"text": "hi"})),
        ("dateCreated", "occurredAt", json!(1611836535)),
        ("dateCreated", "occurredAt", json!(["2021-01-28"])),
    ];
    for (key, field, value) in cases {
        let mut body = json!({"type": "messageStatusUpdate", "communicationActionId": "1"});
        if *key == "communicationActionID" {
            body = json!({"type": "inboundMessage"});
        }
        body[*key] = value.clone();
        let ev = norm(body);
        assert_eq!(ev.field(field), crate::event::FieldValue::Null, "{key} = {value}");
        assert_eq!(ev.extra.get(*key), Some(value), "{key} = {value}");
    }
}

// ---------------------------------------------------------------------------------------------
// statusCode

#[test]
fn status_codes_are_integers_from_strings_or_numbers_and_anything_else_goes_to_extra() {
    // (value sent or None for absent, expected statusCode, kept in extra)
    let cases: &[(&str, Option<Value>, Option<i64>, bool)] = &[
        ("string", Some(json!("2")), Some(2), false),
        ("number", Some(json!(2)), Some(2), false),
        ("zero", Some(json!(0)), Some(0), false),
        ("negative", Some(json!(-1)), Some(-1), false),
        ("negative string", Some(json!("-7")), Some(-7), false),
        ("padded string", Some(json!(" 4 ")), Some(4), false),
        ("large", Some(json!(1_000_000)), Some(1_000_000), false),
        ("absent", None, None, false),
        ("null", Some(json!(null)), None, false),
        ("letters", Some(json!("abc")), None, true),
        ("empty string", Some(json!("")), None, true),
        ("decimal string", Some(json!("2.5")), None, true),
        ("fraction", Some(json!(2.5)), None, true),
        ("boolean", Some(json!(true)), None, true),
        ("object", Some(json!({})), None, true),
        ("array", Some(json!([2])), None, true),
        ("beyond i64", Some(json!(u64::MAX)), None, true),
    ];
    for (name, sent, want, in_extra) in cases {
        let mut body = json!({"type": "messageStatusUpdate", "communicationActionId": "9"});
        if let Some(v) = sent {
            body["statusCode"] = v.clone();
        }
        let ev = norm(body);
        assert_eq!(ev.status_code, *want, "{name}");
        if *in_extra {
            assert_eq!(ev.extra.get("statusCode"), sent.as_ref(), "{name}: kept unchanged in extra");
        } else {
            assert!(ev.extra.is_empty(), "{name}: {:?}", ev.extra);
        }
    }
}

#[test]
fn a_non_integer_status_code_keeps_its_original_key_in_extra() {
    let ev = norm(json!({"type": "messageStatusUpdate", "StatusCode": "abc"}));
    assert_eq!(ev.status_code, None);
    assert_eq!(ev.extra.get("StatusCode"), Some(&json!("abc")));
}

// ---------------------------------------------------------------------------------------------
// occurredAt

#[test]
fn date_created_becomes_rfc3339_utc_with_milliseconds() {
    // (source_timezone, dateCreated, expected occurredAt)
    let cases: &[(&str, &str, &str)] = &[
        ("UTC", "2021-01-28 12:22:15.397", "2021-01-28T12:22:15.397Z"),
        ("UTC", "2021-01-28 12:22:15", "2021-01-28T12:22:15.000Z"),
        ("UTC", "2021-01-28 12:22:15.3", "2021-01-28T12:22:15.300Z"),
        ("UTC", "2021-01-28 12:22:15.397123", "2021-01-28T12:22:15.397Z"),
        // London is UTC in January and UTC+1 (BST) in summer.
        ("Europe/London", "2021-01-28 12:22:15.397", "2021-01-28T12:22:15.397Z"),
        ("Europe/London", "2021-07-01 12:00:00.000", "2021-07-01T11:00:00.000Z"),
        ("Europe/London", "2021-07-01T12:00:00", "2021-07-01T11:00:00.000Z"),
        ("America/New_York", "2021-07-01 12:00:00", "2021-07-01T16:00:00.000Z"),
        ("Asia/Kolkata", "2021-07-01 12:00:00", "2021-07-01T06:30:00.000Z"),
        // An explicit offset or Z wins over the source zone.
        ("Europe/London", "2021-07-01T12:00:00+02:00", "2021-07-01T10:00:00.000Z"),
        ("Europe/London", "2021-07-01T12:00:00.250-05:00", "2021-07-01T17:00:00.250Z"),
        ("Europe/London", "2021-07-01T12:00:00Z", "2021-07-01T12:00:00.000Z"),
        ("Europe/London", "2021-07-01T12:00:00.123Z", "2021-07-01T12:00:00.123Z"),
        ("America/New_York", "2021-07-01T12:00:00+0100", "2021-07-01T11:00:00.000Z"),
        ("UTC", "2021-01-28 12:22:15.397+01:00", "2021-01-28T11:22:15.397Z"),
        ("UTC", "2021-01-28T12:22:15+01", "2021-01-28T11:22:15.000Z"),
        ("UTC", "2021-01-28T12:22:15.5-0330", "2021-01-28T15:52:15.500Z"),
        ("UTC", "2021-01-28t12:22:15.397z", "2021-01-28T12:22:15.397Z"),
        ("UTC", " 2021-01-28 12:22:15.397 ", "2021-01-28T12:22:15.397Z"),
    ];
    for (zone, sent, want) in cases {
        let ev = norm_with(&json!({"type": "inboundMessage", "dateCreated": sent}), &opts(zone, &[1]));
        assert_eq!(ev.occurred_at.as_deref(), Some(*want), "{sent} in {zone}");
        assert!(ev.extra.is_empty(), "{sent} in {zone}: {:?}", ev.extra);
    }
}

#[test]
fn an_unparsable_date_is_null_and_kept_raw_in_extra() {
    for sent in ["yesterday", "", "28/01/2021 12:22", "2021-13-40 99:00:00", "2021-01-28T25:00:00Z", "1611836535"] {
        let ev = norm(json!({"type": "inboundMessage", "dateCreated": sent}));
        assert_eq!(ev.occurred_at, None, "{sent}");
        assert_eq!(ev.extra.get("dateCreated"), Some(&json!(sent)), "{sent}");
    }
    // A wall-clock time skipped by the spring-forward change does not exist in London.
    let ev = norm_with(
        &json!({"type": "inboundMessage", "DateCreated": "2021-03-28 01:30:00"}),
        &opts("Europe/London", &[1]),
    );
    assert_eq!(ev.occurred_at, None);
    assert_eq!(ev.extra.get("DateCreated"), Some(&json!("2021-03-28 01:30:00")));
}

#[test]
fn an_absent_or_null_date_is_null_and_not_in_extra() {
    for body in [json!({"type": "inboundMessage"}), json!({"type": "inboundMessage", "dateCreated": null})] {
        let ev = norm(body.clone());
        assert_eq!(ev.occurred_at, None, "{body}");
        assert!(ev.extra.is_empty(), "{body}");
    }
}

// ---------------------------------------------------------------------------------------------
// organisationId, extra, other types

#[test]
fn organisation_id_comes_from_the_argument_not_the_payload() {
    let body = br#"{"type":"inboundMessage","organisationId":"999"}"#;
    let ev = norm_bytes(body, Some("1234"), &NormaliseOptions::default()).unwrap();
    assert_eq!(ev.organisation_id.as_deref(), Some("1234"));
    // The payload's own value is not a mapped field: it is kept in extra.
    assert_eq!(ev.extra.get("organisationId"), Some(&json!("999")));
    let ev = norm_bytes(br#"{"type":"inboundMessage"}"#, None, &NormaliseOptions::default()).unwrap();
    assert_eq!(ev.organisation_id, None);
}

#[test]
fn extra_keeps_every_unmapped_field_unchanged() {
    let body = json!({
        "type": "payment",
        "conversationId": 5,
        "amount": 12.5,
        "currency": "GBP",
        "paid": true,
        "nothing": null,
        "items": [1, "two", {"three": [3]}],
        "customer": {"name": "Ann", "address": {"city": "Cork", "lines": ["a", "b"]}},
        "empty": "",
        "big": 12345678901234567_i64,
    });
    let ev = norm(body.clone());
    let mut want = body.as_object().unwrap().clone();
    want.remove("type");
    want.remove("conversationId");
    assert_eq!(ev.extra, want);
    assert_eq!(ev.conversation_id.as_deref(), Some("5"));
}

#[test]
fn other_event_types_pass_through_with_the_same_rules() {
    for t in ["payment", "setStatus", "moveToQueue", "conversationClosed", "conversationAssignment", "brandNewType"] {
        let ev = norm(json!({
            "type": t,
            "ConversationID": 97847,
            "communicationActionId": "",
            "statusCode": "7",
            "dateCreated": "2025-05-19 16:40:00.000",
            "agent": {"id": 17},
        }));
        assert_eq!(ev.event_type, t);
        assert_eq!(ev.shape, Shape::Current, "{t}");
        assert_eq!(ev.conversation_id.as_deref(), Some("97847"), "{t}");
        assert_eq!(ev.communication_action_id, None, "{t}");
        assert_eq!(ev.status_code, Some(7), "{t}");
        assert_eq!(ev.occurred_at.as_deref(), Some("2025-05-19T16:40:00.000Z"), "{t}");
        assert_eq!(Value::Object(ev.extra.to_map()), json!({"agent": {"id": 17}}), "{t}");
    }
}

// ---------------------------------------------------------------------------------------------
// id

fn assert_valid_id(id: &str) {
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')), "{id}");
}

#[test]
fn the_id_is_32_lowercase_hex_digits() {
    for body in [json!({"type": "x"}), json!({"type": "inboundMessage", "conversationId": "1"})] {
        assert_valid_id(&norm(body).id);
    }
}

#[test]
fn the_same_body_gives_the_same_id_whatever_its_layout_or_arrival_time() {
    let a = br#"{"type":"inboundMessage","conversationId":"97847","body":"hi","meta":{"a":1,"b":[1,2]}}"#;
    let b = b"{\n  \"meta\": { \"b\": [1, 2], \"a\": 1 },\n  \"body\": \"hi\",\n  \"conversationId\": \"97847\",\n  \"type\": \"inboundMessage\"\n}\n";
    let o = NormaliseOptions::default();
    let ea = norm_bytes(a, Some("1"), &o).unwrap();
    let eb = normalise(b, Some("1".into()), &o, received() + chrono::Duration::hours(3)).unwrap();
    assert_eq!(ea.id, eb.id);
    assert_ne!(ea.received_at, eb.received_at);
    // And it is stable from one call to the next.
    assert_eq!(norm_bytes(a, Some("1"), &o).unwrap().id, ea.id);
}

#[test]
fn events_differing_in_any_mapped_field_get_different_ids() {
    let base = json!({
        "type": "messageStatusUpdate",
        "conversationId": "1",
        "communicationActionId": "2",
        "outboundChannelAddress": "3",
        "inboundChannelAddress": "4",
        "customerUID": "5",
        "body": "6",
        "statusCode": 2,
        "dateCreated": "2021-01-28 12:22:15.397",
        "note": "x",
    });
    let base_id = id_of(base.clone());
    let changes: &[(&str, Value)] = &[
        ("type", json!("inboundMessage")),
        ("conversationId", json!("10")),
        ("communicationActionId", json!("20")),
        ("outboundChannelAddress", json!("30")),
        ("inboundChannelAddress", json!("40")),
        ("customerUID", json!("50")),
        ("body", json!("60")),
        ("statusCode", json!(3)),
        ("dateCreated", json!("2021-01-28 12:22:15.398")),
        ("note", json!("y")),
        ("note", json!({"x": 1})),
        ("added", json!(1)),
    ];
    let mut ids = std::collections::HashSet::new();
    ids.insert(base_id.clone());
    for (key, value) in changes {
        let mut body = base.clone();
        body[*key] = value.clone();
        let id = id_of(body);
        assert_ne!(id, base_id, "changing {key} to {value}");
        assert!(ids.insert(id), "changing {key} to {value} collides with another case");
    }
    // A field moved between a slot and extra changes the id too.
    let mut body = base.clone();
    body.as_object_mut().unwrap().remove("note");
    assert_ne!(id_of(body), base_id, "removing an extra field");
    // Legacy vs current (communication action id removed).
    let mut body = base.clone();
    body.as_object_mut().unwrap().remove("communicationActionId");
    assert_ne!(id_of(body), base_id);
}

#[test]
fn the_organisation_is_part_of_the_id() {
    let body = br#"{"type":"inboundMessage","conversationId":"1"}"#;
    let o = NormaliseOptions::default();
    let ids: Vec<String> =
        [None, Some("1"), Some("2")].into_iter().map(|org| norm_bytes(body, org, &o).unwrap().id).collect();
    assert_ne!(ids[0], ids[1]);
    assert_ne!(ids[1], ids[2]);
    assert_ne!(ids[0], ids[2]);
}

#[test]
fn the_id_depends_on_the_normalised_value_not_the_spelling() {
    // The same normalised event, whatever key case or id type was sent.
    let a = id_of(json!({"type":"inboundMessage","conversationId":"97847","customerUID":""}));
    let b = id_of(json!({"type":"inboundMessage","ConversationId":97847}));
    assert_eq!(a, b);
}

// ---------------------------------------------------------------------------------------------
// Output shape

#[test]
fn every_field_is_always_present_in_the_json_output() {
    let want: std::collections::BTreeSet<&str> =
        crate::event::FIELDS.iter().copied().chain(std::iter::once("extra")).collect();
    for body in [
        json!({"type": "x"}),
        json!({"type": "inboundMessage"}),
        json!({"type": "messageStatusUpdate", "communicationActionId": 1, "statusCode": "2", "dateCreated": "2021-01-28 12:22:15"}),
    ] {
        let ev = norm(body.clone());
        let v: Value = serde_json::from_slice(&ev.to_json()).unwrap();
        let obj = v.as_object().unwrap();
        let keys: std::collections::BTreeSet<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(keys, want, "{body}");
        assert_eq!(obj["schema"], json!("webio.event/v1"));
        assert!(obj["extra"].is_object(), "{body}");
        // It reads back into the same event.
        let back: Event = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, ev);
    }
    let v: Value = serde_json::from_slice(&norm(json!({"type": "x"})).to_json()).unwrap();
    for k in [
        "organisationId",
        "conversationId",
        "communicationActionId",
        "outboundChannelAddress",
        "inboundChannelAddress",
        "customerUid",
        "body",
        "statusCode",
        "occurredAt",
    ] {
        assert_eq!(v[k], Value::Null, "{k}");
    }
    assert_eq!(v["extra"], json!({}));
}

#[test]
fn received_at_is_rfc3339_utc_with_milliseconds() {
    let at = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap() + chrono::Duration::milliseconds(67);
    let ev = normalise(br#"{"type":"x"}"#, None, &NormaliseOptions::default(), at).unwrap();
    assert_eq!(ev.received_at, "2026-01-02T03:04:05.067Z");
}

#[test]
fn default_options_are_utc_and_send_code_one() {
    let o = NormaliseOptions::default();
    assert_eq!(o.source_timezone, Tz::UTC);
    assert_eq!(o.legacy_send_status_codes, vec![1]);
}

// ---------------------------------------------------------------------------------------------
// The request path's short cuts (slot names by exact spelling, strings known to be plain)

#[test]
fn the_exact_spellings_name_the_slots_the_case_insensitive_search_names() {
    for key in [
        "type",
        "conversationId",
        "communicationActionId",
        "outboundChannelAddress",
        "inboundChannelAddress",
        "customerUID",
        "customerUid",
        "body",
        "statusCode",
        "dateCreated",
    ] {
        let exact = slot_of(key);
        assert!(exact.is_some(), "{key}");
        // The same key in other cases takes the search, and finds the same slot.
        for other in [key.to_uppercase(), key.to_lowercase()] {
            assert!(slot_of(&other) == exact, "{other} against {key}");
        }
    }
    for key in ["Type ", "conversation", "closedBy", ""] {
        assert!(slot_of(key).is_none(), "{key}");
    }
}

/// The envelope's JSON, checked against serde_json's writing of the event.
fn envelope_json_is_serdes(body: &[u8], org: Option<&str>) {
    let env = normalise_envelope(
        Bytes::copy_from_slice(body),
        org.map(str::to_owned),
        &NormaliseOptions::default(),
        received(),
    )
    .unwrap_or_else(|e| panic!("{} refused: {e}", String::from_utf8_lossy(body)));
    assert_eq!(
        String::from_utf8_lossy(env.json()),
        String::from_utf8(serde_json::to_vec(&env.event).unwrap()).unwrap(),
        "{}",
        String::from_utf8_lossy(body)
    );
}

#[test]
fn the_organisation_is_escaped_in_the_event_line_even_when_the_body_has_nothing_to_escape() {
    // The organisation comes from the token, not from the body: a body without escapes says
    // nothing about it.
    let body = br#"{"type":"inboundMessage","conversationId":"c1","body":"plain text"}"#;
    for org in [None, Some("1234"), Some("a\"b"), Some("back\\slash"), Some("tab\there"), Some("\u{1}")] {
        envelope_json_is_serdes(body, org);
    }
}

#[test]
fn escaped_and_plain_strings_in_the_body_are_written_as_serde_json_writes_them() {
    for body in [
        &br#"{"type":"inboundMessage","conversationId":"c1","body":"No I don't, thanks","dateCreated":"2021-01-28 12:21:28.373"}"#[..],
        br#"{"type":"inboundMessage","conversationId":"c\"1","body":"a \\ b \n c \u0001 \u00e9"}"#,
        br#"{"type":"in\u0062oundMessage","customerUID":"x\ty","statusCode":"2","body":"\"quoted\""}"#,
        br#"{"type":"messageStatusUpdate","conversationId":12,"communicationActionId":"a\/b","customerUid":"","statusCode":1}"#,
        br#"{"type":"x","nested":{"k":"v\"w"},"body":"plain"}"#,
        br#"{"type":"x","TYPE":"y","body":"p\\q","Body":"r"}"#,
    ] {
        envelope_json_is_serdes(body, Some("1234"));
    }
}
