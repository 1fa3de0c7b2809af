//! Event ids are stable across releases: dedup windows, dead letters and spools written by an
//! older build carry them. These ids were computed by the build before the request path was
//! rewritten (the `serde_json::Value` tree, serialised and hashed); every change to the
//! normaliser must keep them.

use super::*;
use chrono::TimeZone;

fn received() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 17, 2, 11).unwrap()
}

/// (body, organisation, source zone, legacy send codes) → id, as the previous build made it.
type Pinned = (&'static str, Option<&'static str>, &'static str, &'static [i64], &'static str);
const PINNED: &[Pinned] = &[
    // Webio's own shapes (the benchmark's four, and variants).
    (
        r#"{"type":"messageStatusUpdate","conversationId":"1000000001","communicationActionId":"a-1-1","outboundChannelAddress":"447717472695","inboundChannelAddress":"WhatsApp QA Test","customerUID":"","dateCreated":"2021-01-28 12:22:15.397","statusCode":"2"}"#,
        Some("1234"),
        "UTC",
        &[1],
        "152a5c9b6ee966f9376f44aad3bcf87b",
    ),
    (
        r#"{"type":"inboundMessage","conversationId":"1000000002","communicationActionId":"a-1-2","outboundChannelAddress":"447717472695","inboundChannelAddress":"WhatsApp QA Test","customerUID":"","body":"No I don't, thanks","dateCreated":"2021-01-28 12:21:28.373"}"#,
        Some("1234"),
        "UTC",
        &[1],
        "17025d39163af964e2c2df27f4480f19",
    ),
    (
        r#"{"type":"messageStatusUpdate","conversationId":"1000000003","outboundChannelAddress":"447700900123","inboundChannelAddress":"SMS Longcode","customerUID":"CUST-a-1-3","dateCreated":"2020-11-03 09:15:40.005","statusCode":"1"}"#,
        Some("1234"),
        "UTC",
        &[1],
        "3ca65d423fd85d3e8115470bddf06ab0",
    ),
    (
        r#"{"type":"conversationClosed","conversationId":"1000000004","closedBy":"agent-a-1-4","dateCreated":"2025-05-19 16:40:00.000"}"#,
        Some("1234"),
        "UTC",
        &[1],
        "f8668c18ac929c515b3d20ff0d9d23e0",
    ),
    (
        r#"{"type":"conversationClosed","conversationId":"1000000004","closedBy":"agent-a-1-4","dateCreated":"2025-05-19 16:40:00.000"}"#,
        None,
        "UTC",
        &[1],
        "89fc7d7974242d15c780544575900491",
    ),
    (
        r#"{"type":"messageStatusUpdate","conversationId":"1","outboundChannelAddress":"2","statusCode":3}"#,
        Some("7"),
        "Europe/London",
        &[3],
        "9c84159be0bc179441ffe8f13f8c6979",
    ),
    (
        r#"{"type":"inboundMessage","ConversationID":97847,"comunicationActionId":220860,"CUSTOMERUID":12.5,"body":"héllo \"world\"\n\t\u0001 \/ \u00e9","dateCreated":"2021-07-01T12:00:00+02:00"}"#,
        Some("1"),
        "Europe/London",
        &[1],
        "18566d419918ee5def92fd341541e559",
    ),
    (
        r#"{"type":"x","dateCreated":"2021-07-01 12:00:00","statusCode":" 4 "}"#,
        None,
        "America/New_York",
        &[1],
        "38ad5fa0fc45c48f02c91cd9045daebd",
    ),
    // Second spellings, unmappable values, extra with every kind of value.
    (
        r#"{"type":"inboundMessage","customerUID":"A","customerUid":"B","Body":"b1","body":"b2"}"#,
        None,
        "UTC",
        &[1],
        "886722afa751c3e04b2a8529e2e9feb7",
    ),
    (r#"{"Type":"payment","type":"other","TYPE":"third"}"#, None, "UTC", &[1], "047f030d22b1a7887c04a1216dbf7f50"),
    (r#"{"type":"payment","type":"again","note":1,"note":2}"#, None, "UTC", &[1], "bf6710661b8474b7dffef5f87617b6bc"),
    (
        r#"{"type":"messageStatusUpdate","communicationActionId":"1","conversationId":true,"body":42,"statusCode":"abc","dateCreated":1611836535,"customerUID":{"uid":"x"},"outboundChannelAddress":[1,2]}"#,
        None,
        "UTC",
        &[1],
        "3dd40f61a5e1e71285814586cfda9552",
    ),
    (
        r#"{"type":"messageStatusUpdate","communicationActionId":"9","statusCode":2.5}"#,
        None,
        "UTC",
        &[1],
        "12060f1b2e4a9584c6c8af22090fb5b2",
    ),
    (
        r#"{"type":"messageStatusUpdate","communicationActionId":"9","statusCode":18446744073709551615}"#,
        None,
        "UTC",
        &[1],
        "c151c1437f2af7637b040727aa99bc40",
    ),
    (
        r#"{"type":"payment","conversationId":5,"amount":12.5,"currency":"GBP","paid":true,"nothing":null,"items":[1,"two",{"three":[3]}],"customer":{"name":"Ann","address":{"city":"Cork","lines":["a","b"]}},"empty":"","big":12345678901234567}"#,
        Some("1234"),
        "UTC",
        &[1],
        "52cd20d977cb8bf798849052071a6685",
    ),
    // Extra values whose text serde_json writes differently from how they were sent.
    (
        r#"{"type":"x","a":1E2,"b":1.50,"c":-0,"d":0.1e-2,"e":123456789012345678901234567890,"f":-9223372036854775809,"g":18446744073709551615,"h":-1.415462317338288e-308,"i":1e22,"j":5e-324}"#,
        None,
        "UTC",
        &[1],
        "072423efdb3b8be3c258d5ff395ee345",
    ),
    (
        r#"{"type":"x","s":"\u00e9\/\u0041\uD83D\uDE00\u001f\u007f","t":"tab\there","k\u0065y":"escaped key","é":"unicode key"}"#,
        None,
        "UTC",
        &[1],
        "b37a2f2fd77bfa350c7ac59ca02006a5",
    ),
    (
        r#"{ "type" : "x" , "meta" : { "b" : [ 1 , 2 ] , "a" : 1 , "a" : { "z" : null , "y" : true } } , "list" : [ ] , "obj" : { } }"#,
        Some("9"),
        "UTC",
        &[1],
        "0df413f33392432cddfde3c4494cf282",
    ),
    (
        r#"{"type":"x","conversationId":1.0,"communicationActionId":1e2,"inboundChannelAddress":-0,"outboundChannelAddress":123456789012345678901234567890,"customerUID":-5}"#,
        None,
        "UTC",
        &[1],
        "218b49c9d81ee62620710dada128000b",
    ),
    (
        r#"{"type":"messageStatusUpdate","conversationId":"","communicationActionId":"","customerUID":null,"body":null,"statusCode":null,"dateCreated":null}"#,
        None,
        "UTC",
        &[1],
        "3574e6290f9deb85c48255f50e714464",
    ),
];

#[test]
fn ids_are_the_ones_the_previous_build_gave() {
    let mut wrong = Vec::new();
    for (body, org, zone, codes, want) in PINNED {
        let o = NormaliseOptions { source_timezone: zone.parse().unwrap(), legacy_send_status_codes: codes.to_vec() };
        let ev = normalise(body.as_bytes(), org.map(str::to_owned), &o, received())
            .unwrap_or_else(|e| panic!("{body}: {e}"));
        if ev.id != *want {
            wrong.push(format!("{body}: {} (pinned {want})", ev.id));
        }
    }
    assert!(wrong.is_empty(), "ids changed:\n{}", wrong.join("\n"));
}

#[test]
fn fixture_ids_are_the_ones_the_previous_build_gave() {
    // (fixture, organisation) → id
    const FIXTURES: &[(&str, Option<&str>, &str)] = &[
        ("current-inbound-message.json", None, "bb6821051e9f6ec3713468d0cb49dc96"),
        ("current-inbound-message.json", Some("1234"), "14564aba2bdc37e20f70a5d743ef789a"),
        ("current-message-send.json", None, "098f9a42d905982f521e078a4cd187be"),
        ("current-message-send.json", Some("1234"), "425a6cf51b95544574c4ce79270278be"),
        ("current-message-status-update.json", None, "060e4954aa4344f5e7cd2ad6f7ea08fb"),
        ("current-message-status-update.json", Some("1234"), "ca48bc2a76e35c4956b32edb8e8c8005"),
        ("legacy-inbound-message.json", None, "bbc48d6420d69cc02a419095381630a7"),
        ("legacy-inbound-message.json", Some("1234"), "82d46a94022187c3d8c6e8bc50e23b5c"),
        ("legacy-message-send.json", None, "3b1f171559fd86825e5ec3857b3ecfae"),
        ("legacy-message-send.json", Some("1234"), "0b80411066dad470c775e2bba76d5199"),
        ("legacy-message-status-update.json", None, "047a9c24af345f9ecb5a636af0b3b75a"),
        ("legacy-message-status-update.json", Some("1234"), "0a6557966793e6fa19609a5de100d349"),
        ("other-conversation-closed.json", None, "16ffdd3cc025c0117fe190fc405c3ee2"),
        ("other-conversation-closed.json", Some("1234"), "18985974d7c6dd4df66d50b1257cb242"),
    ];
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webio");
    let mut wrong = Vec::new();
    for (name, org, want) in FIXTURES {
        let body = std::fs::read(dir.join(name)).unwrap();
        let ev = normalise(&body, org.map(str::to_owned), &NormaliseOptions::default(), received()).unwrap();
        if ev.id != *want {
            wrong.push(format!("(\"{name}\", {org:?}, \"{}\"),", ev.id));
        }
    }
    assert!(wrong.is_empty(), "ids changed:\n{}", wrong.join("\n"));
}

// ------------------------------------------------------------------ against the previous build

mod against_reference {
    use super::super::reference::normalise_old;
    use super::*;
    use proptest::prelude::*;

    const KEYS: &[&str] = &[
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
        "closedBy",
        "agent",
        "a",
        "é",
    ];

    fn ws() -> impl Strategy<Value = String> {
        prop_oneof![8 => Just(String::new()), 1 => "[ \t\r\n]{1,3}"]
    }

    /// A JSON string literal for `s`, each character written plainly or escaped at random.
    fn string_literal() -> impl Strategy<Value = String> {
        prop::collection::vec((any::<char>(), 0u8..6), 0..10).prop_map(|chars| {
            let mut out = String::from("\"");
            for (c, how) in chars {
                match (c, how) {
                    ('"', _) => out.push_str("\\\""),
                    ('\\', _) => out.push_str("\\\\"),
                    ('/', 0) => out.push_str("\\/"),
                    ('\n', 1) => out.push_str("\\n"),
                    (c, _) if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    (c, 2) if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04X}", c as u32)),
                    (c, 3) if (c as u32) >= 0x10000 => {
                        let mut units = [0u16; 2];
                        for u in c.encode_utf16(&mut units) {
                            out.push_str(&format!("\\u{:04x}", u));
                        }
                    }
                    (c, _) => out.push(c),
                }
            }
            out.push('"');
            out
        })
    }

    fn number_literal() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|i| i.to_string()),
            any::<u64>().prop_map(|u| u.to_string()),
            "-?[1-9][0-9]{18,40}",
            Just("-0".to_owned()),
            Just("0".to_owned()),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| format!("{f:?}")),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| format!("{f:e}")),
            "-?(0|[1-9][0-9]{0,3})(\\.[0-9]{1,4})?[eE][+-]?[0-9]{1,3}",
            "-?[1-9][0-9]{0,3}\\.[0-9]{0,3}0",
        ]
    }

    fn leaf() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            number_literal(),
            string_literal(),
            "\"(2021-01-28 12:22:15.397|2021-07-01T12:00:00\\+02:00| ?-?[0-9]{1,4} ?|)\"",
            prop::sample::select(
                &["\"messageStatusUpdate\"", "\"inboundMessage\"", "\"payment\"", "\"\"", "\" \""][..]
            )
            .prop_map(str::to_owned),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            (prop::sample::select(KEYS), any::<u32>()).prop_map(|(k, flips)| {
                let k: String = k
                    .chars()
                    .enumerate()
                    .map(|(i, c)| if flips >> (i % 32) & 1 == 1 { c.to_ascii_uppercase() } else { c })
                    .collect();
                serde_json::to_string(&k).unwrap()
            }),
            string_literal(),
            Just("\"t\\u0079pe\"".to_owned()),
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                (prop::collection::vec((inner.clone(), ws()), 0..4)).prop_map(|items| {
                    let items: Vec<String> = items.into_iter().map(|(v, w)| format!("{w}{v}{w}")).collect();
                    format!("[{}]", items.join(","))
                }),
                (prop::collection::vec((key(), inner, ws()), 0..4)).prop_map(|members| {
                    let m: Vec<String> = members.into_iter().map(|(k, v, w)| format!("{w}{k}{w}:{v}")).collect();
                    format!("{{{}}}", m.join(","))
                }),
            ]
        })
    }

    fn body() -> impl Strategy<Value = String> {
        (leaf(), prop::collection::vec((key(), value(), ws()), 0..10), any::<bool>()).prop_map(|(t, members, typed)| {
            let mut m: Vec<String> = members.into_iter().map(|(k, v, w)| format!("{w}{k}{w}:{w}{v}")).collect();
            if typed {
                m.insert(0, format!("\"type\":{t}"));
            }
            format!("{{{}}}", m.join(","))
        })
    }

    fn options() -> impl Strategy<Value = NormaliseOptions> {
        (
            prop::sample::select(&["UTC", "Europe/London", "Australia/Lord_Howe"][..]),
            prop::collection::vec(-1i64..4, 0..3),
        )
            .prop_map(|(z, codes)| NormaliseOptions {
                source_timezone: z.parse().unwrap(),
                legacy_send_status_codes: codes,
            })
    }

    fn same(body: &[u8], org: Option<&str>, o: &NormaliseOptions) -> Result<(), TestCaseError> {
        let new = normalise(body, org.map(str::to_owned), o, received());
        let old = normalise_old(body, org.map(str::to_owned), o, received());
        // The envelope's JSON, written once with the id hashed from it, is the event's JSON.
        let env = normalise_envelope(bytes::Bytes::copy_from_slice(body), org.map(str::to_owned), o, received());
        match (&env, &new) {
            (Ok(env), Ok(n)) => {
                prop_assert_eq!(&env.event.id, &n.id);
                prop_assert_eq!(&env.event, n);
                prop_assert_eq!(&env.json()[..], &n.to_json()[..]);
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            _ => prop_assert!(false, "normalise and normalise_envelope disagree"),
        }
        let text = String::from_utf8_lossy(body);
        match (new, old) {
            (Ok(n), Ok(o)) => {
                prop_assert_eq!(&n.id, &o.id, "id of {}", text);
                prop_assert_eq!(&n.event_type, &o.event_type);
                prop_assert_eq!(n.shape, o.shape);
                prop_assert_eq!(&n.organisation_id, &o.organisation_id);
                prop_assert_eq!(&n.conversation_id, &o.conversation_id);
                prop_assert_eq!(&n.communication_action_id, &o.communication_action_id);
                prop_assert_eq!(&n.outbound_channel_address, &o.outbound_channel_address);
                prop_assert_eq!(&n.inbound_channel_address, &o.inbound_channel_address);
                prop_assert_eq!(&n.customer_uid, &o.customer_uid);
                prop_assert_eq!(&n.body, &o.body);
                prop_assert_eq!(n.status_code, o.status_code);
                prop_assert_eq!(&n.occurred_at, &o.occurred_at);
                prop_assert_eq!(&n.received_at, &o.received_at);
                prop_assert_eq!(&*n.extra, &o.extra, "extra of {}", text);
                // One line of JSON that reads back to the same event and id.
                let json = n.to_json();
                prop_assert!(!json.contains(&b'\n'));
                let by_serde = serde_json::to_vec(&n).unwrap();
                prop_assert_eq!(
                    String::from_utf8_lossy(&json),
                    String::from_utf8_lossy(&by_serde),
                    "hand-written JSON"
                );
                let back: Event = serde_json::from_slice(&json).unwrap();
                prop_assert_eq!(event_id(&back), n.id.clone());
            }
            (Err(n), Err(o)) => prop_assert_eq!(n, o, "error of {}", text),
            (n, o) => prop_assert!(false, "{}: new {:?}, old {:?}", text, n.map(|e| e.id), o.map(|e| e.id)),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Generated JSON text with every spelling serde_json does not write itself (escapes,
        /// exponents, big integers, whitespace, repeated and case-variant keys): the same id,
        /// fields and refusals as the previous build.
        #[test]
        fn the_normaliser_agrees_with_the_previous_build(body in body(), o in options(), org in prop::option::of("[0-9]{1,4}")) {
            same(body.as_bytes(), org.as_deref(), &o)?;
        }

        #[test]
        fn the_normaliser_agrees_with_the_previous_build_on_mutated_text(body in body(), edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
            let mut b = body.into_bytes();
            for (at, byte) in edits {
                if !b.is_empty() {
                    let i = at.index(b.len());
                    b[i] = byte;
                }
            }
            same(&b, Some("1"), &NormaliseOptions::default())?;
        }
    }

    #[test]
    fn refusals_match_the_previous_build() {
        let deep = format!("{{\"type\":\"x\",\"a\":{}{}}}", "[".repeat(126), "]".repeat(126));
        let deeper = format!("{{\"type\":\"x\",\"a\":{}{}}}", "[".repeat(127), "]".repeat(127));
        let deep_dup = format!("{{\"type\":\"x\",\"a\":{}{},\"a\":1}}", "[".repeat(127), "]".repeat(127));
        for body in [
            "",
            "[1,2]",
            "5",
            "{\"type\":\"x\",}",
            "{\"type\":\"x\",\"a\":1e400}",
            "{\"type\":\"x\",\"a\":[1e400]}",
            "{\"type\":\"x\",\"a\":1,\"a\":-1e999}",
            "{\"type\":1e400}",
            "{\"statusCode\":1e400,\"type\":\"x\"}",
            "{\"conversationId\":1e400,\"type\":\"x\"}",
            "{\"type\":\"x\",\"a\":\"\\ud800\"}",
            "{\"type\":\"\\ud800\"}",
            "{\"body\":\"\\udc00x\",\"type\":\"x\"}",
            &format!("{{\"type\":\"x\",\"big\":1{}}}", "0".repeat(400)),
            &deep,
            &deeper,
            &deep_dup,
            "{\"type\":\"x\"} x",
            // Near misses for the flat reader: each must be read, or refused, as serde_json does.
            "{\"type\":\"x\",\"a\":01}",
            "{\"type\":\"x\",\"a\":truex}",
            "{\"type\":\"x\",\"a\":nul}",
            "{\"type\":\"x\",\"a\":\"\\x\"}",
            "{\"type\":\"x\",\"a\":\"tab\there\"}",
            "{\"type\":\"x\",\"a\":\"\\\u{1}\"}",
            "{\"type\":\"x\",\"a\":1.}",
            "{\"type\":\"x\",\"a\":1.5e}",
            "{\"type\":\"x\",\"a\":-}",
            "{\"type\":\"x\",\"a\":-0.0e+0}",
            " \n{ \"type\" : \"x\" , \"a\" : 1 }\t",
            "{\"type\":\"x\"}}",
            "{\"type\":\"x\",}",
            "{\"type\":\"x\" \"a\":1}",
            "{\"type\" \"x\"}",
            "{\"ty\\pe\":\"x\"}",
            "{\"type\":\"x\",\"\u{7}\":1}",
            "{\"type\":\"x\",\"a\":\"\\ud83d\\ude00\"}",
            "{\"type\":\"\\u0078\"}",
            "{\"type\":\"x\",\"conversationId\":\"\\u0031\"}",
            "{\"type\":5}",
            "{\"type\":\"\"}",
            "{}",
        ] {
            let o = NormaliseOptions::default();
            let new = normalise(body.as_bytes(), None, &o, received()).map(|e| e.id);
            let old = normalise_old(body.as_bytes(), None, &o, received()).map(|e| e.id);
            assert_eq!(new, old, "{body}");
        }
    }
}
