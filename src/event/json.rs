//! The event's JSON, written by hand: exactly the bytes serde_json writes for [`Event`] (the
//! tests compare them), without serde's per-field dispatch, and strings that need no escape
//! (nearly all) copied whole. The event id hashes this writing with `id` and `receivedAt`
//! empty.

use super::{Event, Shape};

/// Where [`write_event`] put the text of `id` and of `receivedAt` (inside their quotes).
pub(crate) struct Spans {
    pub id: std::ops::Range<usize>,
    pub received_at: std::ops::Range<usize>,
}

/// Writes `ev` as one line of JSON with the given `id`, `receivedAt` and `extra` text.
pub(crate) fn write_event(out: &mut Vec<u8>, ev: &Event, id: &str, received_at: &str, extra: &str) -> Spans {
    write_event_plain(out, ev, id, received_at, extra, false)
}

/// [`write_event`]; with `plain`, the caller knows that no string of `ev` but
/// `organisationId` holds anything JSON escapes (the normaliser's fields from a body without
/// escapes, and its own writing of times and numbers): they are copied without a look.
pub(crate) fn write_event_plain(
    out: &mut Vec<u8>,
    ev: &Event,
    id: &str,
    received_at: &str,
    extra: &str,
    plain: bool,
) -> Spans {
    let write_str = |out: &mut Vec<u8>, s: &str| {
        if plain {
            debug_assert!(!needs_escape(s.as_bytes()), "{s:?} is not plain");
            write_plain(out, s)
        } else {
            write_str(out, s)
        }
    };
    let write_opt = |out: &mut Vec<u8>, v: &Option<String>| match v {
        Some(s) => write_str(out, s),
        None => out.extend_from_slice(b"null"),
    };
    out.extend_from_slice(SCHEMA);
    write_str(out, &ev.schema);
    out.extend_from_slice(ID);
    let id_at = out.len() + 1;
    write_str(out, id);
    let id_span = id_at..out.len() - 1;
    out.extend_from_slice(TYPE);
    write_str(out, &ev.event_type);
    out.extend_from_slice(shape(ev.shape));
    // From the token, not from the body: looked at whatever `plain` says.
    self::write_opt(out, &ev.organisation_id);
    for (member, value) in members(ev) {
        out.extend_from_slice(member);
        write_opt(out, value);
    }
    out.extend_from_slice(STATUS_CODE);
    match ev.status_code {
        Some(code) => serde_json::to_writer(&mut *out, &code).expect("an integer serialises"),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(OCCURRED_AT);
    write_opt(out, &ev.occurred_at);
    out.extend_from_slice(RECEIVED_AT);
    let received_at_at = out.len() + 1;
    write_str(out, received_at);
    let received_at_span = received_at_at..out.len() - 1;
    out.extend_from_slice(EXTRA);
    out.extend_from_slice(extra.as_bytes());
    out.push(b'}');
    Spans { id: id_span, received_at: received_at_span }
}

const SCHEMA: &[u8] = b"{\"schema\":";
const ID: &[u8] = b",\"id\":";
const TYPE: &[u8] = b",\"type\":";
const STATUS_CODE: &[u8] = b",\"statusCode\":";
const OCCURRED_AT: &[u8] = b",\"occurredAt\":";
const RECEIVED_AT: &[u8] = b",\"receivedAt\":";
const EXTRA: &[u8] = b",\"extra\":";

/// `shape`, then the name of `organisationId`.
fn shape(shape: Shape) -> &'static [u8] {
    match shape {
        Shape::Legacy => b",\"shape\":\"legacy\",\"organisationId\":",
        Shape::Current => b",\"shape\":\"current\",\"organisationId\":",
    }
}

/// The members from `conversationId` to `body`, each name with its value.
fn members(ev: &Event) -> [(&'static [u8], &Option<String>); 6] {
    [
        (b",\"conversationId\":", &ev.conversation_id),
        (b",\"communicationActionId\":", &ev.communication_action_id),
        (b",\"outboundChannelAddress\":", &ev.outbound_channel_address),
        (b",\"inboundChannelAddress\":", &ev.inbound_channel_address),
        (b",\"customerUid\":", &ev.customer_uid),
        (b",\"body\":", &ev.body),
    ]
}

/// The exact length [`write_event_plain`] writes with `plain` (its strings unescaped); `None`
/// when the organisation needs an escape (its escaped length is not worked out here).
pub(crate) fn plain_len(ev: &Event, id: &str, received_at: &str, extra: &str) -> Option<usize> {
    let opt = |v: &Option<String>| v.as_ref().map_or(4, |s| s.len() + 2);
    if ev.organisation_id.as_ref().is_some_and(|o| needs_escape(o.as_bytes())) {
        return None;
    }
    let status = match ev.status_code {
        None => 4,
        Some(code) => {
            let (mut n, mut digits) = (code.unsigned_abs(), 1);
            while n >= 10 {
                n /= 10;
                digits += 1;
            }
            digits + usize::from(code < 0)
        }
    };
    Some(
        SCHEMA.len()
            + ev.schema.len()
            + 2
            + ID.len()
            + id.len()
            + 2
            + TYPE.len()
            + ev.event_type.len()
            + 2
            + shape(ev.shape).len()
            + opt(&ev.organisation_id)
            + members(ev).iter().map(|(member, value)| member.len() + opt(value)).sum::<usize>()
            + STATUS_CODE.len()
            + status
            + OCCURRED_AT.len()
            + opt(&ev.occurred_at)
            + RECEIVED_AT.len()
            + received_at.len()
            + 2
            + EXTRA.len()
            + extra.len()
            + 1,
    )
}

fn write_opt(out: &mut Vec<u8>, v: &Option<String>) {
    match v {
        Some(s) => write_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string: copied whole when nothing in it needs an escape, else serde_json's writing.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        serde_json::to_writer(&mut *out, s).expect("a string serialises");
    } else {
        write_plain(out, s)
    }
}

/// A string with nothing to escape, in quotes.
fn write_plain(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// Any byte serde_json escapes: control characters, `"` and `\`. Checked 16 bytes at a time
/// without an early exit inside a block, which the compiler vectorises.
fn needs_escape(b: &[u8]) -> bool {
    let escape = |x: u8| (x < 0x20) | (x == b'"') | (x == b'\\');
    let mut blocks = b.chunks_exact(16);
    for block in &mut blocks {
        if block.iter().fold(false, |any, &x| any | escape(x)) {
            return true;
        }
    }
    blocks.remainder().iter().any(|&x| escape(x))
}

/// The first 128 bits of a digest in lowercase hex.
pub(crate) fn hex128(digest: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (i, b) in digest[..16].iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 15)];
    }
    String::from_utf8(out.to_vec()).expect("hex digits")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Extra;

    fn event() -> Event {
        Event {
            schema: crate::event::SCHEMA.to_owned(),
            id: String::new(),
            event_type: "inboundMessage".to_owned(),
            shape: Shape::Current,
            organisation_id: Some("1234".to_owned()),
            conversation_id: Some("c-1".to_owned()),
            communication_action_id: None,
            outbound_channel_address: Some("447717472695".to_owned()),
            inbound_channel_address: None,
            customer_uid: Some(String::new()),
            body: Some("No I don't, thanks".to_owned()),
            status_code: None,
            occurred_at: Some("2021-01-28T12:21:28.373Z".to_owned()),
            received_at: "2026-11-27T17:02:11.532Z".to_owned(),
            extra: Extra::empty(),
        }
    }

    /// What `plain_len` says, against what is written, with the same arguments.
    fn lengths(ev: &Event, extra: &str) -> (Option<usize>, usize) {
        let id = "0123456789abcdef0123456789abcdef";
        let mut out = Vec::new();
        write_event_plain(&mut out, ev, id, &ev.received_at, extra, true);
        (plain_len(ev, id, &ev.received_at, extra), out.len())
    }

    #[test]
    fn plain_len_is_the_length_written() {
        let mut cases = vec![event()];
        for code in [0, 1, 9, 10, 99, -1, -10, 1234567, i64::MAX, i64::MIN] {
            cases.push(Event { status_code: Some(code), ..event() });
        }
        cases.push(Event { shape: Shape::Legacy, organisation_id: None, body: None, occurred_at: None, ..event() });
        cases.push(Event { event_type: "é and ü".to_owned(), ..event() });
        for ev in &cases {
            for extra in ["{}", r#"{"closedBy":"agent-7","n":123456789012345678901234567890}"#] {
                let (said, written) = lengths(ev, extra);
                assert_eq!(said, Some(written), "{ev:?}");
            }
        }
    }

    #[test]
    fn plain_len_gives_up_on_an_organisation_that_needs_an_escape() {
        for org in ["a\"b", "back\\slash", "\n"] {
            let ev = Event { organisation_id: Some(org.to_owned()), ..event() };
            assert_eq!(lengths(&ev, "{}").0, None);
        }
    }
}
