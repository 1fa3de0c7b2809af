//! One line of the dead-letter file (`delivery.dead_letter_file`, JSON Lines): which sink
//! gave up on which event, why, after how many attempts, with the event and the body exactly
//! as Webio sent it — enough for `webio-router replay` to re-inject it.

use crate::event::trace::TraceParent;
use crate::event::{Envelope, Event};
use crate::jsonl::body_fields;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub dead_at: String,
    pub sink: String,
    pub reason: String,
    pub attempts: u32,
    pub event_id: Option<String>,
    /// The normalised event; absent only for an unreadable spool record (see `record_hex`).
    pub event: Option<Event>,
    /// The body as Webio sent it, when it is UTF-8 …
    #[serde(default)]
    pub raw: Option<String>,
    /// … otherwise in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_hex: Option<String>,
    /// A spool record that could not be decoded, as stored (hex), so that nothing is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_hex: Option<String>,
    /// The event's W3C trace context, kept by `replay` (absent in older lines: a new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

fn now() -> String {
    crate::event::format_time(chrono::Utc::now())
}

impl DeadLetter {
    pub fn new(sink: &str, reason: &str, attempts: u32, env: &Envelope) -> Self {
        let (raw, raw_hex) = body_fields(&env.raw);
        DeadLetter {
            dead_at: now(),
            sink: sink.to_owned(),
            reason: reason.to_owned(),
            attempts,
            event_id: Some(env.event.id.clone()),
            event: Some(env.event.clone()),
            raw,
            raw_hex,
            record_hex: None,
            traceparent: Some(env.trace.to_string()),
        }
    }

    /// A spool record that failed its check (damaged or altered on disk): kept as stored,
    /// never delivered, never replayed as an event.
    pub fn unreadable(sink: &str, error: &str, attempts: u32, record: &[u8]) -> Self {
        DeadLetter {
            dead_at: now(),
            sink: sink.to_owned(),
            reason: format!("damaged spool record, not delivered: {error}"),
            attempts,
            event_id: None,
            event: None,
            raw: None,
            raw_hex: None,
            record_hex: Some(hex::encode(record)),
            traceparent: None,
        }
    }

    /// The envelope to deliver again.
    pub fn envelope(&self) -> Result<Envelope, LetterError> {
        let event = self.event.clone().ok_or(LetterError::NoEvent)?;
        let raw = match (&self.raw, &self.raw_hex) {
            (Some(text), _) => text.clone().into_bytes(),
            (None, Some(h)) => hex::decode(h).map_err(LetterError::RawHex)?,
            (None, None) => Vec::new(),
        };
        let env = Envelope::new(event, raw.into());
        match self.traceparent.as_deref().and_then(|t| TraceParent::parse(t.as_bytes())) {
            Some(t) => Ok(env.with_trace(t)),
            None => Ok(env),
        }
    }
}

/// Why a dead letter cannot be delivered again.
#[derive(Debug, thiserror::Error)]
pub enum LetterError {
    #[error("no event in this line (a damaged spool record, kept as stored in recordHex)")]
    NoEvent,
    #[error("rawHex: {0}")]
    RawHex(#[source] hex::FromHexError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_line_gives_back_the_envelope() {
        let body = br#"{"type":"inboundMessage","body":"hi"}"#;
        let ev = crate::event::normalise(body, Some("42".into()), &Default::default(), chrono::Utc::now()).unwrap();
        let env = Envelope::new(ev, bytes::Bytes::from_static(body));
        let line = serde_json::to_string(&DeadLetter::new("crm", "HTTP 422", 1, &env)).unwrap();
        assert!(line.contains(r#""sink":"crm""#) && line.contains(r#""reason":"HTTP 422""#), "{line}");
        let back: DeadLetter = serde_json::from_str(&line).unwrap();
        let again = back.envelope().unwrap();
        assert_eq!(again.event, env.event);
        assert_eq!(again.raw, env.raw);
    }

    #[test]
    fn binary_bodies_travel_as_hex() {
        let ev = crate::event::normalise(br#"{"type":"x"}"#, None, &Default::default(), chrono::Utc::now()).unwrap();
        let env = Envelope::new(ev, bytes::Bytes::from_static(&[0xff, 0x00, 0x7b]));
        let d = DeadLetter::new("s", "r", 3, &env);
        assert!(d.raw.is_none());
        assert_eq!(d.envelope().unwrap().raw, env.raw);
    }
}
