//! How a sink encodes an event: the normalised JSON, CloudEvents 1.0 structured JSON, or
//! the body exactly as Webio sent it.

use crate::event::Envelope;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

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
                let ev = &env.event;
                let source = match &ev.organisation_id {
                    Some(org) => format!("{CLOUDEVENTS_SOURCE}/organisations/{org}"),
                    None => CLOUDEVENTS_SOURCE.to_owned(),
                };
                let mut ce = json!({
                    "specversion": "1.0",
                    "id": ev.id,
                    "type": ev.event_type,
                    "source": source,
                    "time": ev.occurred_at.as_deref().unwrap_or(&ev.received_at),
                    "datacontenttype": "application/json",
                    "dataschema": crate::event::SCHEMA,
                    "data": ev,
                });
                if let Some(c) = &ev.conversation_id {
                    ce["subject"] = json!(c);
                }
                Bytes::from(serde_json::to_vec(&ce).expect("JSON values serialise"))
            }
        }
    }
}
