//! One event row of the spool: the normalised event, the body exactly as Webio sent it and
//! the event's trace context, checked whenever it is read back from disk.
//!
//! | version | layout |
//! | --- | --- |
//! | 3 (written) | `3`, JSON length (u32 LE), body length (u32 LE), event JSON, raw body, trace context (25 bytes: trace id, parent id, flags; [`TraceParent::to_bytes`]), first 16 bytes of the SHA-256 of everything before |
//! | 2 (read only) | `2`, JSON length (u32 LE), body length (u32 LE), event JSON, raw body, first 16 bytes of the SHA-256 of everything before |
//! | 1 (read only, older spools) | `1`, JSON length (u32 LE), event JSON, raw body |
//!
//! A v1 or v2 record has no stored trace context: it is given [`TraceParent::for_old_event`],
//! the same at every read. A v3 record's context is covered by its checksum.
//!
//! A record read back is delivered only when it is intact: its checksum matches (v2), its
//! event parses, and its id is the hash of its content ([`crate::event::event_id`], the one
//! place the id is computed). A record changed on disk is never delivered under its original
//! id; the drain dead-letters it as stored, with the reason.
//!
//! v2 and v3 records carry both lengths so that [`scan`] can find them in a file whose index
//! is unreadable (`webio-router spool salvage`).

use crate::event::trace::{self, TraceParent};
use crate::event::{Envelope, Event};
use sha2::{Digest, Sha256};

const V1: u8 = 1;
const V2: u8 = 2;
const V3: u8 = 3;
/// The head of v2 and v3 records: version, JSON length, body length.
const V2_HEAD: usize = 9;
const SUM: usize = 16;
/// How every event JSON begins (the `schema` field comes first); what [`scan`] looks for.
const JSON_START: &[u8] = b"{\"schema\":\"webio.event/v1\"";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("empty record")]
    Empty,
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("truncated record ({0} bytes)")]
    Truncated(usize),
    #[error("checksum mismatch: the record was damaged or altered on disk")]
    Checksum,
    #[error("invalid trace context")]
    Trace,
    #[error("event JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error(
        "the event's content does not match its id {stored} (it hashes to {computed}): the record was altered on disk"
    )]
    IdMismatch { stored: String, computed: String },
}

/// The encoded row (version 3).
pub fn encode(env: &Envelope) -> Vec<u8> {
    let json = env.json();
    let mut out = Vec::with_capacity(V2_HEAD + json.len() + env.raw.len() + trace::LEN + SUM);
    out.push(V3);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&(env.raw.len() as u32).to_le_bytes());
    out.extend_from_slice(json);
    out.extend_from_slice(&env.raw);
    out.extend_from_slice(&env.trace.to_bytes());
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum[..SUM]);
    out
}

/// Memory an envelope decoded from a record of `len` bytes takes, roughly (the event JSON,
/// the body, and the parsed event, which holds about the JSON again).
pub fn weight(len: usize) -> u64 {
    2 * len as u64
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

/// Decodes and checks a stored record.
pub fn decode(rec: &[u8]) -> Result<Envelope, RecordError> {
    let truncated = || RecordError::Truncated(rec.len());
    match *rec.first().ok_or(RecordError::Empty)? {
        version @ (V2 | V3) => {
            let trace_len = if version == V3 { trace::LEN } else { 0 };
            let json_len = u32_at(rec, 1).ok_or_else(truncated)?;
            let raw_len = u32_at(rec, 5).ok_or_else(truncated)?;
            let end = V2_HEAD
                .checked_add(json_len)
                .and_then(|n| n.checked_add(raw_len))
                .and_then(|n| n.checked_add(trace_len))
                .ok_or_else(truncated)?;
            if rec.len() != end.checked_add(SUM).ok_or_else(truncated)? {
                return Err(truncated());
            }
            let raw_end = V2_HEAD + json_len + raw_len;
            let (json, raw) = (&rec[V2_HEAD..V2_HEAD + json_len], &rec[V2_HEAD + json_len..raw_end]);
            let intact = Sha256::digest(&rec[..end])[..SUM] == rec[end..];
            let checked = checked(json, raw).and_then(|env| match version {
                V3 => TraceParent::from_bytes(&rec[raw_end..end]).map(|t| env.with_trace(t)).ok_or(RecordError::Trace),
                _ => Ok(old_trace(env)),
            });
            match (intact, checked) {
                (true, result) => result,
                // Name the more telling fault: content that no longer matches its id.
                (false, Err(e @ RecordError::IdMismatch { .. })) => Err(e),
                (false, _) => Err(RecordError::Checksum),
            }
        }
        V1 => {
            let json_len = u32_at(rec, 1).ok_or_else(truncated)?;
            let json = rec.get(5..5 + json_len).ok_or_else(truncated)?;
            checked(json, &rec[5 + json_len..]).map(old_trace)
        }
        v => Err(RecordError::Version(v)),
    }
}

/// The event id a record says it holds, read without checking the record (to compare ids
/// cheaply, e.g. whether a replayed event is already pending); `None` when unreadable.
pub fn stored_id(rec: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    let json = match *rec.first()? {
        V2 | V3 => rec.get(V2_HEAD..V2_HEAD.checked_add(u32_at(rec, 1)?)?)?,
        V1 => rec.get(5..5usize.checked_add(u32_at(rec, 1)?)?)?,
        _ => return None,
    };
    serde_json::from_slice::<Id>(json).ok().map(|i| i.id)
}

/// An event stored without a trace context gets the same one at every read.
fn old_trace(env: Envelope) -> Envelope {
    let t = TraceParent::for_old_event(&env.event.id);
    env.with_trace(t)
}

fn checked(json: &[u8], raw: &[u8]) -> Result<Envelope, RecordError> {
    let event: Event = serde_json::from_slice(json).map_err(RecordError::Json)?;
    let computed = crate::event::event_id(&event);
    if computed != event.id {
        return Err(RecordError::IdMismatch { stored: event.id, computed });
    }
    Ok(Envelope::with_json(event, bytes::Bytes::copy_from_slice(raw), bytes::Bytes::copy_from_slice(json)))
}

/// Intact version-2 records found anywhere in `bytes` (the raw file of a spool redb cannot
/// open), once per event id, in file order.
pub fn scan(bytes: &[u8]) -> Vec<Envelope> {
    let mut found = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut from = V2_HEAD;
    while let Some(pos) = find(&bytes[from..], JSON_START) {
        let json_at = from + pos;
        from = json_at + 1;
        let start = json_at - V2_HEAD;
        let trace_len = match bytes[start] {
            V2 => 0,
            V3 => trace::LEN,
            _ => continue,
        };
        let (Some(json_len), Some(raw_len)) = (u32_at(bytes, start + 1), u32_at(bytes, start + 5)) else { continue };
        let Some(end) = json_at
            .checked_add(json_len)
            .and_then(|n| n.checked_add(raw_len))
            .and_then(|n| n.checked_add(trace_len))
            .and_then(|n| n.checked_add(SUM))
        else {
            continue;
        };
        let Some(rec) = bytes.get(start..end) else { continue };
        if let Ok(env) = decode(rec) {
            if seen.insert(env.event.id.clone()) {
                found.push(env);
            }
            from = end;
        }
    }
    found
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: u32) -> Envelope {
        let body = format!(r#"{{"type":"payment","amount":{n},"body":"hello {n}"}}"#);
        let ev = crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
        Envelope::new(ev, body.into())
    }

    /// A version-1 record, as older builds wrote them.
    fn v1(env: &Envelope) -> Vec<u8> {
        let json = env.json();
        let mut out = vec![V1];
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(json);
        out.extend_from_slice(&env.raw);
        out
    }

    /// A version-2 record, as the releases before trace contexts wrote them.
    fn v2(env: &Envelope) -> Vec<u8> {
        let json = env.json();
        let mut out = vec![V2];
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&(env.raw.len() as u32).to_le_bytes());
        out.extend_from_slice(json);
        out.extend_from_slice(&env.raw);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum[..SUM]);
        out
    }

    fn replace(rec: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = find(rec, from).expect("present");
        let mut out = rec.to_vec();
        out[at..at + to.len()].copy_from_slice(to);
        out
    }

    #[test]
    fn records_of_every_version_round_trip() {
        let e = env(3);
        for rec in [encode(&e), v2(&e), v1(&e)] {
            let back = decode(&rec).unwrap();
            assert_eq!(back.event, e.event);
            assert_eq!(back.raw, e.raw);
        }
    }

    #[test]
    fn the_trace_context_is_stored_and_old_records_get_a_stable_one() {
        let e = env(5);
        assert_eq!(decode(&encode(&e)).unwrap().trace, e.trace, "a restart delivers the same traceparent");
        for old in [v2(&e), v1(&e)] {
            let (a, b) = (decode(&old).unwrap().trace, decode(&old).unwrap().trace);
            assert_eq!(a, b, "the same at every read");
            assert_eq!(a, TraceParent::for_old_event(&e.event.id));
        }
        // The context is covered by the checksum.
        let mut rec = encode(&e);
        let at = rec.len() - SUM - 1;
        rec[at] ^= 1;
        assert!(matches!(decode(&rec), Err(RecordError::Checksum)));
        // A version-2 record is found by a scan too.
        let ids: Vec<_> = scan(&[v2(&e), encode(&env(6))].concat()).into_iter().map(|e| e.event.id).collect();
        assert_eq!(ids, vec![e.event.id.clone(), env(6).event.id]);
    }

    #[test]
    fn a_record_altered_anywhere_is_refused() {
        let rec = encode(&env(3));
        // In the event: the content no longer hashes to the id.
        let err = decode(&replace(&rec, b"\"body\":\"hello 3\"", b"\"body\":\"HELLO 3\"")).unwrap_err();
        assert!(matches!(err, RecordError::IdMismatch { .. }), "{err}");
        // In the raw body only: the checksum tells.
        let err = decode(&replace(&rec, b"{\"type\":\"payment\",\"amount\"", b"{\"type\":\"payment\",\"AMOUNT\""))
            .unwrap_err();
        assert!(matches!(err, RecordError::Checksum), "{err}");
        assert!(decode(&rec[..rec.len() - 1]).is_err());
        assert!(decode(&rec[..3]).is_err());
        assert!(matches!(decode(&[9, 0, 0, 0, 0]), Err(RecordError::Version(9))));
        assert!(matches!(decode(&[]), Err(RecordError::Empty)));
    }

    #[test]
    fn an_old_record_whose_event_was_altered_is_refused_by_its_id() {
        let rec = v1(&env(4));
        let err = decode(&replace(&rec, b"\"body\":\"hello 4\"", b"\"body\":\"HELLO 4\"")).unwrap_err();
        assert!(err.to_string().contains("does not match its id"), "{err}");
    }

    #[test]
    fn a_scan_finds_intact_records_in_noise_once_each() {
        let (a, b, c) = (env(1), env(2), env(3));
        let mut file: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        file.extend_from_slice(&encode(&a));
        file.extend_from_slice(&[0; 100]);
        file.extend_from_slice(&encode(&b));
        file.extend_from_slice(&encode(&a)); // an older copy of the same row
        let damaged = encode(&c);
        file.extend_from_slice(&damaged[..damaged.len() - 3]);
        file.extend_from_slice(&[0; 4096]);
        let ids: Vec<_> = scan(&file).into_iter().map(|e| e.event.id).collect();
        assert_eq!(ids, vec![a.event.id, b.event.id]);
    }
}
