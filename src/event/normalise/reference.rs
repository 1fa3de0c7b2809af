//! The normaliser as it was before the request path was rewritten (a `serde_json::Value`
//! tree, serialised again for the id): the reference the new one must agree with, id for id.

use super::super::time::{format_utc, parse_date};
use super::super::{Shape, CORE_TYPES, SCHEMA};
use super::{BodyError, NormaliseOptions};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The event as the old normaliser built it.
#[derive(Debug, Clone, PartialEq)]
pub struct OldEvent {
    pub schema: String,
    pub id: String,
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
    pub extra: Map<String, Value>,
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

/// Ids arrive as strings or numbers; both come out as strings, and "" as null. A value of
/// any other kind is handed back (it is kept in `extra`).
fn id_text(v: Value) -> Result<Option<String>, Value> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        other => Err(other),
    }
}

fn status_code(v: &Value) -> Result<Option<i64>, ()> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n.as_i64().map(Some).ok_or(()),
        Value::String(s) => s.trim().parse::<i64>().map(Some).map_err(|_| ()),
        _ => Err(()),
    }
}

/// Parses and normalises one webhook body. `organisation_id` comes from the verified token.
pub fn normalise_old(
    body: &[u8],
    organisation_id: Option<String>,
    opts: &NormaliseOptions,
    received_at: DateTime<Utc>,
) -> Result<OldEvent, BodyError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| BodyError::NotJson(e.to_string()))?;
    let Value::Object(payload) = value else {
        return Err(BodyError::NotObject);
    };

    let mut ev = OldEvent {
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
        extra: Map::new(),
    };
    let mut event_type: Option<Result<String, ()>> = None;
    let mut filled: Vec<Slot> = Vec::with_capacity(9);

    for (key, value) in payload {
        let slot = match slot_of(&key) {
            // A second spelling of a field already seen is kept in `extra`, not dropped.
            Some(slot) if !filled.contains(&slot) => slot,
            _ => {
                ev.extra.insert(key, value);
                continue;
            }
        };
        filled.push(slot);
        // The payload is owned: mapped strings move into the event instead of being copied.
        let unmapped: Option<Value> = match slot {
            Slot::Type => {
                event_type = Some(match value {
                    Value::String(s) => Ok(s),
                    _ => Err(()),
                });
                None
            }
            Slot::Conversation => id_text(value).map(|v| ev.conversation_id = v).err(),
            Slot::CommunicationAction => id_text(value).map(|v| ev.communication_action_id = v).err(),
            Slot::Outbound => id_text(value).map(|v| ev.outbound_channel_address = v).err(),
            Slot::Inbound => id_text(value).map(|v| ev.inbound_channel_address = v).err(),
            Slot::Customer => id_text(value).map(|v| ev.customer_uid = v).err(),
            Slot::Body => match value {
                Value::Null => None,
                Value::String(s) => {
                    ev.body = Some(s);
                    None
                }
                other => Some(other),
            },
            Slot::Status => match status_code(&value) {
                Ok(v) => {
                    ev.status_code = v;
                    None
                }
                Err(()) => Some(value),
            },
            Slot::Date => {
                let parsed = match &value {
                    Value::Null => Some(None),
                    Value::String(s) => parse_date(s, opts.source_timezone).map(|dt| Some(format_utc(dt))),
                    _ => None,
                };
                match parsed {
                    Some(occurred_at) => {
                        ev.occurred_at = occurred_at;
                        None
                    }
                    None => Some(value),
                }
            }
        };
        if let Some(value) = unmapped {
            // A value we cannot map is kept, unchanged, under its original key.
            ev.extra.insert(key, value);
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
    ev.id = event_id(&ev);
    Ok(ev)
}

/// Deterministic id: a hash of every normalised field except `id` and `receivedAt`, so the
/// same body gives the same id and events differing in any mapped field differ.
///
/// The hashed bytes are exactly the event's JSON with `id` and `receivedAt` empty; they are
/// serialised from a borrowed view instead of a clone of the event.
fn event_id(ev: &OldEvent) -> String {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Canonical<'a> {
        schema: &'a str,
        id: &'a str,
        #[serde(rename = "type")]
        event_type: &'a str,
        shape: Shape,
        organisation_id: &'a Option<String>,
        conversation_id: &'a Option<String>,
        communication_action_id: &'a Option<String>,
        outbound_channel_address: &'a Option<String>,
        inbound_channel_address: &'a Option<String>,
        customer_uid: &'a Option<String>,
        body: &'a Option<String>,
        status_code: Option<i64>,
        occurred_at: &'a Option<String>,
        received_at: &'a str,
        // serde_json's Map is ordered by key, so this serialisation is canonical.
        extra: &'a Map<String, Value>,
    }
    let canon = Canonical {
        schema: &ev.schema,
        id: "",
        event_type: &ev.event_type,
        shape: ev.shape,
        organisation_id: &ev.organisation_id,
        conversation_id: &ev.conversation_id,
        communication_action_id: &ev.communication_action_id,
        outbound_channel_address: &ev.outbound_channel_address,
        inbound_channel_address: &ev.inbound_channel_address,
        customer_uid: &ev.customer_uid,
        body: &ev.body,
        status_code: ev.status_code,
        occurred_at: &ev.occurred_at,
        received_at: "",
        extra: &ev.extra,
    };
    let mut bytes = Vec::with_capacity(512);
    serde_json::to_writer(&mut bytes, &canon).expect("an Event always serialises");
    let digest = Sha256::digest(&bytes);
    hex::encode(&digest[..16])
}
