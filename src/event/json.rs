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
    out.extend_from_slice(b"{\"schema\":");
    write_str(out, &ev.schema);
    out.extend_from_slice(b",\"id\":");
    let id_at = out.len() + 1;
    write_str(out, id);
    let id_span = id_at..out.len() - 1;
    out.extend_from_slice(b",\"type\":");
    write_str(out, &ev.event_type);
    out.extend_from_slice(match ev.shape {
        Shape::Legacy => b",\"shape\":\"legacy\",\"organisationId\":",
        Shape::Current => b",\"shape\":\"current\",\"organisationId\":",
    });
    // From the token, not from the body: looked at whatever `plain` says.
    self::write_opt(out, &ev.organisation_id);
    for (member, value) in [
        (&b",\"conversationId\":"[..], &ev.conversation_id),
        (b",\"communicationActionId\":", &ev.communication_action_id),
        (b",\"outboundChannelAddress\":", &ev.outbound_channel_address),
        (b",\"inboundChannelAddress\":", &ev.inbound_channel_address),
        (b",\"customerUid\":", &ev.customer_uid),
        (b",\"body\":", &ev.body),
    ] {
        out.extend_from_slice(member);
        write_opt(out, value);
    }
    out.extend_from_slice(b",\"statusCode\":");
    match ev.status_code {
        Some(code) => serde_json::to_writer(&mut *out, &code).expect("an integer serialises"),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"occurredAt\":");
    write_opt(out, &ev.occurred_at);
    out.extend_from_slice(b",\"receivedAt\":");
    let received_at_at = out.len() + 1;
    write_str(out, received_at);
    let received_at_span = received_at_at..out.len() - 1;
    out.extend_from_slice(b",\"extra\":");
    out.extend_from_slice(extra.as_bytes());
    out.push(b'}');
    Spans { id: id_span, received_at: received_at_span }
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
