//! The normalised event (`webio.event/v1`) and the rules that build it from both
//! Webio payload shapes (before and after the February 2021 change).
//!
//! Invariants: an event's `id` is [`event_id`] of its other fields (the spool and dead letters
//! carry ids made by earlier builds, so the hashed bytes never change); `extra` holds the
//! unmapped fields as the sender wrote them (numbers exactly), compact, keys sorted.

mod extra;
mod json;
mod normalise;
mod time;
pub mod trace;

pub use extra::Extra;
pub use normalise::{event_id, normalise, normalise_envelope, normalise_envelope_or_back, BodyError, NormaliseOptions};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const SCHEMA: &str = "webio.event/v1";

/// The three core types whose shape can be legacy.
pub const CORE_TYPES: &[&str] = &["messageStatusUpdate", "inboundMessage", "messageSend"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Legacy,
    Current,
}

impl Shape {
    pub fn as_str(self) -> &'static str {
        match self {
            Shape::Legacy => "legacy",
            Shape::Current => "current",
        }
    }
}

/// One accepted webhook, normalised. Field order is the order of the JSON output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Event {
    pub schema: String,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub shape: Shape,
    pub organisation_id: Option<String>,
    pub conversation_id: Option<String>,
    pub communication_action_id: Option<String>,
    pub outbound_channel_address: Option<String>,
    pub inbound_channel_address: Option<String>,
    pub customer_uid: Option<String>,
    pub body: Option<String>,
    pub status_code: Option<i64>,
    pub occurred_at: Option<String>,
    pub received_at: String,
    /// Unmapped payload fields, as sent. Derefs to a `serde_json::Map` (read on first use).
    pub extra: Extra,
}

/// Normalised field names a route condition or a template may name (besides `extra.<name>`).
pub const FIELDS: &[&str] = &[
    "schema",
    "id",
    "type",
    "shape",
    "organisationId",
    "conversationId",
    "communicationActionId",
    "outboundChannelAddress",
    "inboundChannelAddress",
    "customerUid",
    "body",
    "statusCode",
    "occurredAt",
    "receivedAt",
];

/// Is `name` something [`Event::field`] can answer (`extra.<name>` included)?
pub fn is_field(name: &str) -> bool {
    FIELDS.contains(&name) || name.strip_prefix("extra.").is_some_and(|rest| !rest.is_empty())
}

/// A field's value, borrowed where possible.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue<'a> {
    Null,
    Str(&'a str),
    Int(i64),
    Json(&'a Value),
}

impl FieldValue<'_> {
    /// The value as text, for templates and string matching; `None` for null.
    pub fn to_text(&self) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        match self {
            FieldValue::Null => None,
            FieldValue::Str(s) => Some(Cow::Borrowed(s)),
            FieldValue::Int(i) => Some(Cow::Owned(i.to_string())),
            FieldValue::Json(Value::Null) => None,
            FieldValue::Json(Value::String(s)) => Some(Cow::Borrowed(s)),
            FieldValue::Json(v) => Some(Cow::Owned(v.to_string())),
        }
    }
}

impl Event {
    /// Looks up a normalised field by name (see [`FIELDS`]); unknown names are null.
    pub fn field(&self, name: &str) -> FieldValue<'_> {
        fn opt(v: &Option<String>) -> FieldValue<'_> {
            v.as_deref().map_or(FieldValue::Null, FieldValue::Str)
        }
        match name {
            "schema" => FieldValue::Str(&self.schema),
            "id" => FieldValue::Str(&self.id),
            "type" => FieldValue::Str(&self.event_type),
            "shape" => FieldValue::Str(self.shape.as_str()),
            "organisationId" => opt(&self.organisation_id),
            "conversationId" => opt(&self.conversation_id),
            "communicationActionId" => opt(&self.communication_action_id),
            "outboundChannelAddress" => opt(&self.outbound_channel_address),
            "inboundChannelAddress" => opt(&self.inbound_channel_address),
            "customerUid" => opt(&self.customer_uid),
            "body" => opt(&self.body),
            "statusCode" => self.status_code.map_or(FieldValue::Null, FieldValue::Int),
            "occurredAt" => opt(&self.occurred_at),
            "receivedAt" => FieldValue::Str(&self.received_at),
            other => match other.strip_prefix("extra.").and_then(|k| self.extra.get(k)) {
                Some(v) => FieldValue::Json(v),
                None => FieldValue::Null,
            },
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Sized for the fields and a little more: one allocation, no regrowth.
        let mut out = Vec::with_capacity(320 + self.text_len());
        json::write_event(&mut out, self, &self.id, &self.received_at, self.extra.json());
        out
    }

    /// Roughly the length of the variable text (for buffer sizes).
    pub(crate) fn text_len(&self) -> usize {
        let opt = |v: &Option<String>| v.as_ref().map_or(0, String::len);
        self.event_type.len()
            + self.organisation_id.as_ref().map_or(0, String::len)
            + opt(&self.conversation_id)
            + opt(&self.communication_action_id)
            + opt(&self.outbound_channel_address)
            + opt(&self.inbound_channel_address)
            + opt(&self.customer_uid)
            + opt(&self.body) * 9 / 8
            + self.extra.json().len()
    }
}

/// What travels from the router to the sinks: the event and the body exactly as Webio sent it.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub event: Event,
    pub raw: Bytes,
    /// The W3C trace context the sinks receive (not part of the event nor of its id).
    pub trace: trace::TraceParent,
    /// The event as JSON, made once and shared by the spool record and every sink.
    json: std::sync::OnceLock<Bytes>,
}

impl Envelope {
    pub fn new(event: Event, raw: Bytes) -> Self {
        Envelope { event, raw, trace: trace::TraceParent::generate(), json: std::sync::OnceLock::new() }
    }

    /// With the event's JSON already at hand (read back from the spool): `json` must be
    /// `event` serialised.
    pub(crate) fn with_json(event: Event, raw: Bytes, json: Bytes) -> Self {
        Envelope { event, raw, trace: trace::TraceParent::generate(), json: json.into() }
    }

    /// With `trace` as its trace context (the request's, or the stored one).
    pub fn with_trace(mut self, trace: trace::TraceParent) -> Self {
        self.trace = trace;
        self
    }

    /// The event as one line of JSON (no newline), serialised on first use. `event` must
    /// not change after this is first called.
    pub fn json(&self) -> &Bytes {
        self.json.get_or_init(|| Bytes::from(self.event.to_json()))
    }
}

/// RFC 3339 UTC with milliseconds, the format of every time in an event.
pub fn format_time(t: chrono::DateTime<chrono::Utc>) -> String {
    time::format_utc(t)
}
