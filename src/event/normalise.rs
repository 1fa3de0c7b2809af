//! Payload → [`Event`]. The rules are README "The normalised event"; each has a unit test below.
//!
//! One pass of serde_json reads the top-level object into (key, raw value) pairs borrowed from
//! the body; a mapped value is read from its raw text, an unmapped one is kept as that text in
//! [`Extra`] (numbers exactly as sent). What the previous `serde_json::Value` tree did, and
//! this keeps:
//! - members are taken in sorted key order, a repeated key's last value winning (a `Value`
//!   map's behaviour), so when two spellings differ only in case the first in sorted order fills
//!   the slot and the other is kept in `extra`;
//! - a body the `Value` parser refuses (a number beyond f64, nesting deeper than 127) is
//!   refused with the same message, found by that parser;
//! - the id hashes the same bytes ([`event_id`]), so ids never change.

use super::time::{format_utc, occurred_at};
use super::{Envelope, Event, Extra, Shape, CORE_TYPES, SCHEMA};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::fmt;

/// Why a body is refused with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    #[error("body is JSON but not an object")]
    NotObject,
    #[error("body has no `type` field")]
    MissingType,
    #[error("`type` is not a string")]
    TypeNotString,
    #[error("`type` is empty")]
    EmptyType,
}

impl BodyError {
    /// Bounded label for metrics and the rejected file.
    pub fn reason(&self) -> &'static str {
        match self {
            BodyError::NotJson(_) => "not_json",
            BodyError::NotObject => "not_object",
            BodyError::MissingType => "missing_type",
            BodyError::TypeNotString => "type_not_string",
            BodyError::EmptyType => "empty_type",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NormaliseOptions {
    pub source_timezone: Tz,
    pub legacy_send_status_codes: Vec<i64>,
}

impl Default for NormaliseOptions {
    fn default() -> Self {
        NormaliseOptions { source_timezone: Tz::UTC, legacy_send_status_codes: vec![1] }
    }
}

/// The payload keys we map, lowercased, and the slot each fills.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Type,
    Conversation,
    CommunicationAction,
    Outbound,
    Inbound,
    Customer,
    Body,
    Status,
    Date,
}

fn slot_of(key: &str) -> Option<Slot> {
    // Webio's own spellings first: one comparison of lengths and bytes each, where the
    // case-insensitive search below compares byte by byte.
    let exact = match key {
        "type" => Some(Slot::Type),
        "conversationId" => Some(Slot::Conversation),
        "communicationActionId" => Some(Slot::CommunicationAction),
        "outboundChannelAddress" => Some(Slot::Outbound),
        "inboundChannelAddress" => Some(Slot::Inbound),
        "customerUID" | "customerUid" => Some(Slot::Customer),
        "body" => Some(Slot::Body),
        "statusCode" => Some(Slot::Status),
        "dateCreated" => Some(Slot::Date),
        _ => None,
    };
    if exact.is_some() {
        return exact;
    }
    // Case-insensitive without lowercasing a copy of every key.
    const SLOTS: &[(&str, Slot)] = &[
        ("type", Slot::Type),
        ("conversationid", Slot::Conversation),
        // Webio's own announcement also spells it with one `m`.
        ("communicationactionid", Slot::CommunicationAction),
        ("comunicationactionid", Slot::CommunicationAction),
        ("outboundchanneladdress", Slot::Outbound),
        ("inboundchanneladdress", Slot::Inbound),
        ("customeruid", Slot::Customer),
        ("body", Slot::Body),
        ("statuscode", Slot::Status),
        ("datecreated", Slot::Date),
    ];
    SLOTS.iter().find(|(name, _)| name.len() == key.len() && name.eq_ignore_ascii_case(key)).map(|(_, slot)| *slot)
}

// ------------------------------------------------------------------------------ reading

/// A key of the top-level object: borrowed from the body unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// The top-level object's members in body order, values as raw text, whether two of them
/// name the same slot (a repeated key, or two spellings of one field), and whether a string
/// value may hold an escape (false only when the flat reader saw none: then no string value
/// holds a `"`, a `\\` or a control character either, and needs no escape when written).
struct Members<'a>(Vec<(Key<'a>, &'a str, Option<Slot>)>, bool, bool);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut out = Vec::with_capacity(16);
                let (mut slots, mut shared) = (0u16, false);
                while let Some(member) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    let slot = slot_of(&member.0 .0);
                    if let Some(slot) = slot {
                        shared |= slots & (1 << slot as u16) != 0;
                        slots |= 1 << slot as u16;
                    }
                    out.push((member.0, member.1.get(), slot));
                }
                Ok(Members(out, shared, true))
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

/// Reads the usual webhook in one pass of its own: an object whose keys have no escapes and
/// whose values are strings, numbers, `true`, `false` or `null`. It checks the JSON syntax of
/// what it takes (an escape inside a string value is checked where the value is read:
/// [`classify`], [`check_value`]); anything else (an escape in a key, an array or object value,
/// any doubt) is `None`, and serde_json reads the body instead.
fn read_flat(text: &str) -> Option<Members<'_>> {
    let b = text.as_bytes();
    let ws = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t' | b'\n' | b'\r') {
            *i += 1;
        }
    };
    // The end of the string starting at `i` (its opening quote), after its closing quote,
    // and whether it held an escape.
    let string = |i: usize, escapes: bool| -> Option<(usize, bool)> {
        let mut j = i + 1;
        let mut escaped = false;
        loop {
            match *b.get(j)? {
                b'"' => return Some((j + 1, escaped)),
                b'\\' if escapes => {
                    escaped = true;
                    j += 2
                }
                b'\\' => return None,
                c if c < 0x20 => return None,
                _ => j += 1,
            }
        }
    };
    let digits = |i: &mut usize| -> bool {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    let mut i = 0;
    ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut out = Vec::with_capacity(16);
    let (mut slots, mut shared, mut escapes) = (0u16, false, false);
    ws(&mut i);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let (key_end, _) = string(i, false)?;
            let key = &text[i + 1..key_end - 1];
            i = key_end;
            ws(&mut i);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i += 1;
            ws(&mut i);
            let start = i;
            match *b.get(i)? {
                b'"' => {
                    let (end, escaped) = string(i, true)?;
                    i = end;
                    escapes |= escaped;
                }
                b'-' | b'0'..=b'9' => {
                    if b[i] == b'-' {
                        i += 1;
                    }
                    match b.get(i) {
                        Some(b'0') => i += 1,
                        Some(b'1'..=b'9') => {
                            digits(&mut i);
                        }
                        _ => return None,
                    }
                    if b.get(i) == Some(&b'.') {
                        i += 1;
                        if !digits(&mut i) {
                            return None;
                        }
                    }
                    if matches!(b.get(i), Some(b'e' | b'E')) {
                        i += 1;
                        if matches!(b.get(i), Some(b'+' | b'-')) {
                            i += 1;
                        }
                        if !digits(&mut i) {
                            return None;
                        }
                    }
                }
                b't' if b[i..].starts_with(b"true") => i += 4,
                b'f' if b[i..].starts_with(b"false") => i += 5,
                b'n' if b[i..].starts_with(b"null") => i += 4,
                _ => return None,
            }
            let value = &text[start..i];
            let slot = slot_of(key);
            if let Some(slot) = slot {
                shared |= slots & (1 << slot as u16) != 0;
                slots |= 1 << slot as u16;
            }
            out.push((Key(Cow::Borrowed(key)), value, slot));
            ws(&mut i);
            match b.get(i)? {
                b',' => {
                    i += 1;
                    ws(&mut i);
                }
                b'}' => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    ws(&mut i);
    (i == b.len()).then_some(Members(out, shared, escapes))
}

/// The refusal for a body the fast reader did not take: the `Value` parser's verdict, so that
/// the message is the one it always was.
fn refusal(body: &[u8], fallback: impl fmt::Display) -> BodyError {
    match serde_json::from_slice::<Value>(body) {
        Err(e) => BodyError::NotJson(e.to_string()),
        Ok(Value::Object(_)) => BodyError::NotJson(fallback.to_string()),
        Ok(_) => BodyError::NotObject,
    }
}

/// Nesting the `Value` parser allows inside a top-level member (it allows 127 levels in all).
const MAX_MEMBER_DEPTH: usize = 126;

/// One raw value, classified by its first byte.
enum Raw<'a> {
    Null,
    /// A string; `Cow::Borrowed` when it had no escapes.
    Str(Cow<'a, str>),
    /// A number; `canonical` when serde_json writes exactly this text for it (an integer in
    /// i64/u64 range).
    Num {
        text: &'a str,
        canonical: bool,
    },
    /// `true`, `false`, an array or an object.
    Other,
}

/// `escapes` is false when no string value of the body holds an escape (see [`Members`]): a
/// string is then not scanned for one.
fn classify_in(text: &str, escapes: bool) -> Raw<'_> {
    match text.as_bytes()[0] {
        b'n' => Raw::Null,
        b'"' => {
            let inner = &text[1..text.len() - 1];
            if escapes && inner.as_bytes().contains(&b'\\') {
                // An escape the `Value` parser refuses (a lone surrogate) leaves it unmapped,
                // where `check_value` refuses the body.
                match serde_json::from_str::<String>(text) {
                    Ok(s) => Raw::Str(Cow::Owned(s)),
                    Err(_) => Raw::Other,
                }
            } else {
                Raw::Str(Cow::Borrowed(inner))
            }
        }
        b'-' | b'0'..=b'9' => Raw::Num { text, canonical: canonical_integer(text) },
        _ => Raw::Other,
    }
}

/// Is `text` (valid JSON number syntax) an integer serde_json reads as i64/u64 and writes
/// back unchanged? (`-0`, fractions, exponents and integers beyond 64 bits are not.)
fn canonical_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    if text.starts_with('-') {
        digits != "0" && text.parse::<i64>().is_ok()
    } else {
        digits.len() < 20 || text.parse::<u64>().is_ok()
    }
}

/// A number as serde_json reads it; `None` when it refuses it (beyond f64's range).
fn read_number(text: &str) -> Option<serde_json::Number> {
    serde_json::from_str(text).ok()
}

/// Ids arrive as strings or numbers; both come out as strings, and "" as null.
enum IdText {
    Null,
    Text(String),
    Unmapped,
}

/// Where a byte of JSON text stands: inside a string (its quotes and escapes included) or not.
#[derive(Default)]
struct Strings {
    inside: bool,
    escaped: bool,
}

impl Strings {
    /// Takes the next byte; true when it belongs to a string.
    fn step(&mut self, c: u8) -> bool {
        if self.inside {
            if self.escaped {
                self.escaped = false;
            } else if c == b'\\' {
                self.escaped = true;
            } else if c == b'"' {
                self.inside = false;
            }
            true
        } else {
            self.inside = c == b'"';
            self.inside
        }
    }
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

/// `text` without whitespace outside strings, and the deepest nesting of arrays and objects.
fn compact_depth(text: &str) -> (Cow<'_, str>, usize) {
    let b = text.as_bytes();
    let has_space = {
        let mut strings = Strings::default();
        b.iter().any(|&c| !strings.step(c) && is_space(c))
    };
    let mut strings = Strings::default();
    let (mut depth, mut max) = (0usize, 0usize);
    let mut out = if has_space { Some(Vec::with_capacity(b.len())) } else { None };
    for &c in b {
        if !strings.step(c) {
            match c {
                b'[' | b'{' => {
                    depth += 1;
                    max = max.max(depth);
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                c if is_space(c) => continue,
                _ => {}
            }
        }
        if let Some(out) = &mut out {
            out.push(c);
        }
    }
    let text = match out {
        // Only ASCII whitespace outside strings was removed: still UTF-8.
        Some(out) => Cow::Owned(String::from_utf8(out).expect("removing ASCII keeps UTF-8")),
        None => Cow::Borrowed(text),
    };
    (text, max)
}

/// `text` without whitespace outside strings.
pub(crate) fn compact(text: &str) -> Cow<'_, str> {
    compact_depth(text).0
}

/// Is the compact object `text` byte for byte what serde_json writes for the map it reads?
/// Conservative: true only for sorted, unique, escape-free keys and values that are
/// escape-free strings, canonical integers, `true`, `false` or `null`.
pub(crate) fn object_is_canonical(text: &str) -> bool {
    let Ok(members) = serde_json::from_str::<Members<'_>>(text) else { return false };
    let mut previous: Option<&str> = None;
    for (Key(key), raw, _) in &members.0 {
        let Cow::Borrowed(key) = key else { return false };
        if key.contains('\\') || previous.is_some_and(|p| p >= *key) {
            return false;
        }
        previous = Some(key);
        if !scalar_is_canonical(raw) {
            return false;
        }
    }
    true
}

fn scalar_is_canonical(raw: &str) -> bool {
    classify_cheap(raw).unwrap_or_default()
}

/// Canonical-ness of a scalar from its text alone; `None` for arrays and objects.
fn classify_cheap(text: &str) -> Option<bool> {
    match text.as_bytes()[0] {
        b'n' | b't' | b'f' => Some(true),
        b'"' => Some(!text.as_bytes().contains(&b'\\')),
        b'-' | b'0'..=b'9' => Some(canonical_integer(text)),
        _ => None,
    }
}

// ------------------------------------------------------------------------------ normalise

/// Parses and normalises one webhook body. `organisation_id` comes from the verified token.
pub fn normalise(
    body: &[u8],
    organisation_id: Option<String>,
    opts: &NormaliseOptions,
    received_at: DateTime<Utc>,
) -> Result<Event, BodyError> {
    let mut ev = normalise_fields(body, organisation_id, opts, received_at)?;
    ev.id = event_id(&ev);
    Ok(ev)
}

/// [`normalise`], and the event's JSON for the spool and the sinks, written once: the id is
/// hashed from that same writing (less `id` and `receivedAt`), then put in place.
pub fn normalise_envelope(
    body: Bytes,
    organisation_id: Option<String>,
    opts: &NormaliseOptions,
    received_at: DateTime<Utc>,
) -> Result<Envelope, BodyError> {
    normalise_envelope_or_back(body, organisation_id, opts, received_at).map_err(|(e, _)| e)
}

/// [`normalise_envelope`], giving the body back with a refusal (the rejected-events file
/// wants it): the caller keeps no second handle to it, which would turn the body's buffer
/// into a shared one (an allocation and two atomic counts per request).
pub fn normalise_envelope_or_back(
    body: Bytes,
    organisation_id: Option<String>,
    opts: &NormaliseOptions,
    received_at: DateTime<Utc>,
) -> Result<Envelope, (BodyError, Bytes)> {
    const PENDING_ID: &str = "00000000000000000000000000000000";
    let (mut ev, plain) = match normalise_fields_plain(&body, organisation_id, opts, received_at) {
        Ok(ev) => ev,
        Err(e) => return Err((e, body)),
    };
    // With plain strings, the line's exact length: a buffer without spare room becomes `Bytes`
    // without an allocation of its own (one with spare room costs one, and atomic counts).
    let exact = plain.then(|| super::json::plain_len(&ev, PENDING_ID, &ev.received_at, ev.extra.json())).flatten();
    let mut json = Vec::with_capacity(exact.unwrap_or(320 + ev.text_len()));
    let at = super::json::write_event_plain(&mut json, &ev, PENDING_ID, &ev.received_at, ev.extra.json(), plain);
    debug_assert!(exact.is_none_or(|n| n == json.len()), "plain_len {exact:?}, written {}", json.len());
    ev.id = if ev.extra.is_canonical() {
        // The hashed bytes: this JSON with `id` and `receivedAt` empty (see `event_id`).
        let mut sha = Sha256::new();
        sha.update(&json[..at.id.start]);
        sha.update(&json[at.id.end..at.received_at.start]);
        sha.update(&json[at.received_at.end..]);
        super::json::hex128(&sha.finalize())
    } else {
        event_id(&ev)
    };
    json[at.id].copy_from_slice(ev.id.as_bytes());
    Ok(Envelope::with_json(ev, body, Bytes::from(json)))
}

fn normalise_fields(
    body: &[u8],
    organisation_id: Option<String>,
    opts: &NormaliseOptions,
    received_at: DateTime<Utc>,
) -> Result<Event, BodyError> {
    normalise_fields_plain(body, organisation_id, opts, received_at).map(|(ev, _)| ev)
}

/// [`normalise_fields`], and whether every string field taken from the body is plain text
/// (nothing in it that JSON escapes: the body's string values had no escape, see [`Members`]).
fn normalise_fields_plain(
    body: &[u8],
    organisation_id: Option<String>,
    opts: &NormaliseOptions,
    received_at: DateTime<Utc>,
) -> Result<(Event, bool), BodyError> {
    // UTF-8 checked once for the whole body (fast for ASCII), not string by string.
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(e) => return Err(refusal(body, e)),
    };
    let (mut members, shared, escapes) =
        match read_flat(text).map_or_else(|| serde_json::from_str::<Members<'_>>(text), Ok) {
            Ok(Members(m, shared, escapes)) => (m, shared, escapes),
            Err(e) => return Err(refusal(body, e)),
        };
    // When two members name one slot, which fills it depends on order: take them sorted by
    // key (stable: a repeated key keeps body order), the last of each repeated key kept, as a
    // `Value` map did. Otherwise body order fills the same slots, and only `extra` is sorted.
    if shared {
        members.sort_by(|a, b| a.0 .0.cmp(&b.0 .0));
        let mut deduped: Vec<(Key<'_>, &str, Option<Slot>)> = Vec::with_capacity(members.len());
        let mut checked = Vec::new();
        for m in members {
            if let Some(last) = deduped.last_mut() {
                if last.0 .0 == m.0 .0 {
                    // The overridden value still had to be valid for the `Value` parser.
                    checked.push(last.1);
                    *last = m;
                    continue;
                }
            }
            deduped.push(m);
        }
        for raw in checked {
            check_value(body, raw)?;
        }
        members = deduped;
    }

    let mut ev = Event {
        schema: SCHEMA.to_owned(),
        id: String::new(),
        event_type: String::new(),
        shape: Shape::Current,
        organisation_id,
        conversation_id: None,
        communication_action_id: None,
        outbound_channel_address: None,
        inbound_channel_address: None,
        customer_uid: None,
        body: None,
        status_code: None,
        occurred_at: None,
        received_at: format_utc(received_at),
        extra: Extra::empty(),
    };
    let mut event_type: Option<Result<String, ()>> = None;
    let mut filled: [bool; 9] = [false; 9];
    let mut extra: Vec<(&Cow<'_, str>, &str)> = Vec::new();

    for (Key(key), raw, slot) in &members {
        let slot = match *slot {
            // A second spelling of a field already seen is kept in `extra`, not dropped.
            Some(slot) if !filled[slot as usize] => slot,
            _ => {
                check_value(body, raw)?;
                extra.push((key, raw));
                continue;
            }
        };
        filled[slot as usize] = true;
        let mapped = match slot {
            Slot::Type => {
                event_type = Some(match classify_in(raw, escapes) {
                    Raw::Str(s) => Ok(s.into_owned()),
                    _ => {
                        check_value(body, raw)?;
                        Err(())
                    }
                });
                true
            }
            Slot::Conversation | Slot::CommunicationAction | Slot::Outbound | Slot::Inbound | Slot::Customer => {
                match id_text(body, raw, escapes)? {
                    IdText::Unmapped => false,
                    id => {
                        let id = match id {
                            IdText::Text(t) => Some(t),
                            _ => None,
                        };
                        match slot {
                            Slot::Conversation => ev.conversation_id = id,
                            Slot::CommunicationAction => ev.communication_action_id = id,
                            Slot::Outbound => ev.outbound_channel_address = id,
                            Slot::Inbound => ev.inbound_channel_address = id,
                            _ => ev.customer_uid = id,
                        }
                        true
                    }
                }
            }
            Slot::Body => match classify_in(raw, escapes) {
                Raw::Null => true,
                Raw::Str(s) => {
                    ev.body = Some(s.into_owned());
                    true
                }
                _ => false,
            },
            Slot::Status => match status_code(body, raw, escapes)? {
                Some(code) => {
                    ev.status_code = code;
                    true
                }
                None => false,
            },
            Slot::Date => {
                let parsed = match classify_in(raw, escapes) {
                    Raw::Null => Some(None),
                    Raw::Str(s) => occurred_at(&s, opts.source_timezone).map(Some),
                    _ => None,
                };
                match parsed {
                    Some(occurred_at) => {
                        ev.occurred_at = occurred_at;
                        true
                    }
                    None => false,
                }
            }
        };
        if !mapped {
            // A value we cannot map is kept, unchanged, under its original key.
            check_value(body, raw)?;
            extra.push((key, raw));
        }
    }

    ev.event_type = match event_type {
        None => return Err(BodyError::MissingType),
        Some(Err(())) => return Err(BodyError::TypeNotString),
        Some(Ok(t)) if t.trim().is_empty() => return Err(BodyError::EmptyType),
        Some(Ok(t)) => t,
    };
    if CORE_TYPES.contains(&ev.event_type.as_str()) && ev.communication_action_id.is_none() {
        ev.shape = Shape::Legacy;
        // Before February 2021 message-send updates arrived as messageStatusUpdate posts.
        if ev.event_type == "messageStatusUpdate"
            && ev.status_code.is_some_and(|c| opts.legacy_send_status_codes.contains(&c))
        {
            ev.event_type = "messageSend".to_owned();
        }
    }
    if !extra.is_empty() {
        // The members' text was checked as JSON already; should the assembled object not
        // read, the body is refused rather than an event line written wrong.
        ev.extra = extra_of(extra).map_err(|e| refusal(body, e))?;
    }
    Ok((ev, !escapes))
}

/// Checks a value the way the `Value` parser would have (numbers within f64, nesting), for
/// values whose text is kept or looked at no further.
fn check_value(body: &[u8], raw: &str) -> Result<(), BodyError> {
    match classify_cheap(raw) {
        Some(true) => Ok(()),
        Some(false) => {
            let text = raw;
            let reads = match text.as_bytes()[0] {
                b'"' => serde_json::from_str::<String>(text).is_ok(),
                _ => read_number(text).is_some(),
            };
            if reads {
                Ok(())
            } else {
                Err(refusal(body, "invalid value"))
            }
        }
        None => {
            let (_, depth) = compact_depth(raw);
            if depth > MAX_MEMBER_DEPTH || serde_json::from_str::<Value>(raw).is_err() {
                return match serde_json::from_slice::<Value>(body) {
                    Ok(_) => Ok(()),
                    Err(e) => Err(BodyError::NotJson(e.to_string())),
                };
            }
            Ok(())
        }
    }
}

/// `extra` from the members kept (values checked already): sorted by key, the last of a
/// repeated key kept (a `Value` map's view), each value's text as sent but compacted.
fn extra_of(mut members: Vec<(&Cow<'_, str>, &str)>) -> Result<Extra, serde_json::Error> {
    if !members.windows(2).all(|w| w[0].0 < w[1].0) {
        members.sort_by(|a, b| a.0.cmp(b.0));
        members.reverse();
        // Reversed, the first of each run of equal keys is the last sent: keep it.
        members.dedup_by(|later, first| later.0 == first.0);
        members.reverse();
    }
    let mut text = String::with_capacity(2 + members.iter().map(|(k, v)| k.len() + v.len() + 4).sum::<usize>());
    let mut canonical = true;
    for (key, raw) in members {
        text.push(if text.is_empty() { '{' } else { ',' });
        match key {
            // A key read without escapes holds nothing serde_json would escape.
            Cow::Borrowed(k) => {
                text.push('"');
                text.push_str(k);
                text.push('"');
            }
            // One that had escapes is written as serde_json writes it (still canonical: the
            // order is that of the keys read, as in a map).
            Cow::Owned(k) => text.push_str(&serde_json::to_string(k).expect("a string serialises")),
        }
        text.push(':');
        let value = raw;
        match classify_cheap(value) {
            Some(c) => {
                canonical &= c;
                text.push_str(value);
            }
            None => {
                canonical = false;
                text.push_str(&compact(value));
            }
        }
    }
    text.push('}');
    Extra::from_compact(text, canonical)
}

fn id_text(body: &[u8], raw: &str, escapes: bool) -> Result<IdText, BodyError> {
    Ok(match classify_in(raw, escapes) {
        Raw::Null => IdText::Null,
        Raw::Str(s) if s.is_empty() => IdText::Null,
        Raw::Str(s) => IdText::Text(s.into_owned()),
        Raw::Num { text, canonical: true } => IdText::Text(text.to_owned()),
        Raw::Num { text, canonical: false } => match read_number(text) {
            Some(n) => IdText::Text(n.to_string()),
            None => return Err(refusal(body, "number out of range")),
        },
        Raw::Other => IdText::Unmapped,
    })
}

/// `Some(code)` when the value maps (`None` inside for null), `None` when it goes to `extra`.
fn status_code(body: &[u8], raw: &str, escapes: bool) -> Result<Option<Option<i64>>, BodyError> {
    Ok(match classify_in(raw, escapes) {
        Raw::Null => Some(None),
        Raw::Num { text, canonical: true } => text.parse::<i64>().ok().map(Some),
        Raw::Num { text, canonical: false } => match read_number(text) {
            Some(n) => n.as_i64().map(Some),
            None => return Err(refusal(body, "number out of range")),
        },
        Raw::Str(s) => s.trim().parse::<i64>().ok().map(Some),
        Raw::Other => None,
    })
}

// ------------------------------------------------------------------------------ id

/// Deterministic id: a hash of every normalised field except `id` and `receivedAt`, so the
/// same body gives the same id and events differing in any mapped field differ. The one
/// function that makes an event's id (the spool checks stored events against it).
///
/// The hashed bytes are the event's JSON with `id` and `receivedAt` empty and `extra` as
/// serde_json writes the map it reads from it (keys sorted, numbers as f64/i64/u64): what the
/// first releases hashed, so ids made by any release agree.
pub fn event_id(ev: &Event) -> String {
    let mut bytes = Vec::with_capacity(320 + ev.text_len());
    super::json::write_event(&mut bytes, ev, "", "", &ev.extra.canonical_json());
    super::json::hex128(&Sha256::digest(&bytes))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod pinned_ids;

#[cfg(test)]
mod reference;
