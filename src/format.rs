//! How a sink encodes an event: the normalised JSON, CloudEvents 1.0 structured JSON, or
//! the body exactly as Webio sent it.

use crate::event::Envelope;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Event,
    Cloudevents,
    Raw,
}

pub const CLOUDEVENTS_SOURCE: &str = "webio-router";

impl Format {
    /// As written in `routes.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Event => "event",
            Format::Cloudevents => "cloudevents",
            Format::Raw => "raw",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Event | Format::Raw => "application/json",
            Format::Cloudevents => "application/cloudevents+json",
        }
    }

    /// The payload a sink sends for this event.
    pub fn encode(self, env: &Envelope) -> Bytes {
        match self {
            Format::Event => env.json().clone(),
            Format::Raw => env.raw.clone(),
            Format::Cloudevents => {
                // Keys in sorted order (as this encoding always wrote them); `data` is the
                // event's own JSON, shared with the other formats, so `extra` stays exact.
                #[derive(serde::Serialize)]
                struct CloudEvent<'a> {
                    data: &'a RawValue,
                    datacontenttype: &'static str,
                    dataschema: &'static str,
                    id: &'a str,
                    source: &'a str,
                    specversion: &'static str,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    subject: Option<&'a str>,
                    time: &'a str,
                    #[serde(rename = "type")]
                    event_type: &'a str,
                }
                let ev = &env.event;
                let source = match &ev.organisation_id {
                    Some(org) => format!("{CLOUDEVENTS_SOURCE}/organisations/{org}"),
                    None => CLOUDEVENTS_SOURCE.to_owned(),
                };
                let data: &RawValue = std::str::from_utf8(env.json())
                    .ok()
                    .and_then(|json| serde_json::from_str(json).ok())
                    .expect("an event's JSON is one JSON value");
                let ce = CloudEvent {
                    data,
                    datacontenttype: "application/json",
                    dataschema: crate::event::SCHEMA,
                    id: &ev.id,
                    source: &source,
                    specversion: "1.0",
                    subject: ev.conversation_id.as_deref(),
                    time: ev.occurred_at.as_deref().unwrap_or(&ev.received_at),
                    event_type: &ev.event_type,
                };
                Bytes::from(serde_json::to_vec(&ce).expect("a CloudEvent serialises"))
            }
        }
    }
}
