//! One event row of the spool: the normalised event, the body exactly as Webio sent it and
//! the event's trace context, checked whenever it is read back from disk.
//!
//! | version | layout |
//! | --- | --- |
//! | 4 (written) | `4`, `Wz` (what [`scan`] looks for), dictionary id (u8), event JSON length, raw body length and frame length (LEB128 varints), the zstd frame of the raw body then the event JSON (compressed with that dictionary, without zstd's 4-byte frame magic, content size, dictionary id or checksum), trace context (25 bytes), first 16 bytes of the SHA-256 of everything before |
//! | 3 (read only) | `3`, JSON length (u32 LE), body length (u32 LE), event JSON, raw body, trace context (25 bytes: trace id, parent id, flags; [`TraceParent::to_bytes`]), first 16 bytes of the SHA-256 of everything before |
//! | 2 (read only) | `2`, JSON length (u32 LE), body length (u32 LE), event JSON, raw body, first 16 bytes of the SHA-256 of everything before |
//! | 1 (read only, older spools) | `1`, JSON length (u32 LE), event JSON, raw body |
//!
//! A v4 record is a v3 record compressed: zstd with a dictionary built into the binary and
//! trained on Webio's shapes ([`DICTIONARIES`]), so that the keys every event repeats, and
//! the body's values the event JSON repeats, cost a few bytes. A record names the dictionary
//! it was written with: a shipped dictionary never changes (a test pins each one's hash); a
//! new one is added under the next id, and every earlier one stays for the records that name
//! it. The checksum covers the stored bytes and is checked before anything is decompressed.
//! Should compression fail, [`encode`] writes a v3 record instead.
//!
//! A v1 or v2 record has no stored trace context: it is given [`TraceParent::for_old_event`],
//! the same at every read. A v3 record's context is covered by its checksum.
//!
//! A record read back is delivered only when it is intact: its checksum matches (v2), its
//! event parses, and its id is the hash of its content ([`crate::event::event_id`], the one
//! place the id is computed). A record changed on disk is never delivered under its original
//! id; the drain dead-letters it as stored, with the reason.
//!
//! v2, v3 and v4 records carry their lengths so that [`scan`] can find them in a file whose
//! index is unreadable (`webio-router spool salvage`): v2 and v3 by the start of their event
//! JSON, v4 by its head.

use crate::event::trace::{self, TraceParent};
use crate::event::{Envelope, Event};
use sha2::{Digest, Sha256};

const V1: u8 = 1;
const V2: u8 = 2;
const V3: u8 = 3;
const V4: u8 = 4;
/// What follows the version byte of a v4 record; `4Wz` is what [`scan`] looks for.
const V4_MAGIC: [u8; 2] = *b"Wz";
/// Version, magic, dictionary id.
const V4_HEAD: usize = 4;
/// The magic every zstd frame begins with (RFC 8878): left out of a v4 record, put back to
/// decompress.
const FRAME_MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();
/// zstd's compression level for v4 records (see docs/performance.md, "Restart with a
/// backlog", for the sizes and times of the others).
const LEVEL: i32 = 3;
/// The dictionaries v4 records may name, by id. Never change a shipped one (records name it
/// on disk): add a new file under the next id and write with that. A test pins each hash.
pub const DICTIONARIES: [(u8, &[u8]); 1] = [(1, include_bytes!("dict/webio-1.zdict"))];
/// The dictionary new records are written with.
const WRITE_DICTIONARY: u8 = 1;
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
    #[error("not a compressed record (its head is damaged)")]
    Head,
    #[error("compressed with dictionary {0}, which this build does not have (written by a newer release?)")]
    Dictionary(u8),
    #[error("compressed data: {0}")]
    Decompress(#[source] std::io::Error),
    #[error("the compressed data decodes to {got} bytes, not {want}")]
    Size { got: usize, want: usize },
    #[error("event JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error(
        "the event's content does not match its id {stored} (it hashes to {computed}): the record was altered on disk"
    )]
    IdMismatch { stored: String, computed: String },
}

/// The encoded row: version 4 (compressed), or version 3 should compression fail.
pub fn encode(env: &Envelope) -> Vec<u8> {
    codec::encode_v4(env).unwrap_or_else(|| encode_v3(env))
}

/// A version-3 record (uncompressed).
pub fn encode_v3(env: &Envelope) -> Vec<u8> {
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

/// Memory an envelope decoded from `rec` takes, roughly (the event JSON, the body, and the
/// parsed event, which holds about the JSON again): from the decoded lengths a compressed
/// record names, not from its stored size.
pub fn weight(rec: &[u8]) -> u64 {
    match V4Head::parse(rec) {
        // As much as the same record uncompressed (v3).
        Some(h) => 2 * (h.json_len as u64 + h.raw_len as u64 + (V2_HEAD + trace::LEN + SUM) as u64),
        None => 2 * rec.len() as u64,
    }
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
        V4 => decode_v4(rec),
        V1 => {
            let json_len = u32_at(rec, 1).ok_or_else(truncated)?;
            let json = rec.get(5..5 + json_len).ok_or_else(truncated)?;
            checked(json, &rec[5 + json_len..]).map(old_trace)
        }
        v => Err(RecordError::Version(v)),
    }
}

/// The head of a v4 record: where its parts are.
#[derive(Debug, Clone, Copy)]
struct V4Head {
    dictionary: u8,
    json_len: usize,
    raw_len: usize,
    /// Where the frame (less its magic) begins, and its length.
    frame_at: usize,
    frame_len: usize,
}

impl V4Head {
    /// Reads the head at the start of `b` (which may go on past the record, for [`scan`]).
    fn parse(b: &[u8]) -> Option<V4Head> {
        if b.first() != Some(&V4) || b.get(1..3) != Some(&V4_MAGIC[..]) {
            return None;
        }
        let dictionary = *b.get(3)?;
        let mut at = V4_HEAD;
        let json_len = varint(b, &mut at)?;
        let raw_len = varint(b, &mut at)?;
        let frame_len = varint(b, &mut at)?;
        Some(V4Head { dictionary, json_len, raw_len, frame_at: at, frame_len })
    }

    /// Where the trace context begins.
    fn trace_at(&self) -> Option<usize> {
        self.frame_at.checked_add(self.frame_len)
    }

    /// The record's whole length.
    fn len(&self) -> Option<usize> {
        self.trace_at()?.checked_add(trace::LEN + SUM)
    }

    fn plain_len(&self) -> Option<usize> {
        self.json_len.checked_add(self.raw_len)
    }
}

/// Appends `n` as a LEB128 varint.
fn put_varint(out: &mut Vec<u8>, mut n: u32) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads a LEB128 varint of at most 32 bits at `*at`, and moves past it.
fn varint(b: &[u8], at: &mut usize) -> Option<usize> {
    let mut n: u64 = 0;
    for i in 0..5 {
        let byte = *b.get(*at + i)?;
        n |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *at += i + 1;
            return u32::try_from(n).ok().map(|n| n as usize);
        }
    }
    None
}

fn decode_v4(rec: &[u8]) -> Result<Envelope, RecordError> {
    let head = V4Head::parse(rec).ok_or(RecordError::Head)?;
    let trace_at = head.trace_at().ok_or(RecordError::Truncated(rec.len()))?;
    if head.len() != Some(rec.len()) {
        return Err(RecordError::Truncated(rec.len()));
    }
    let end = rec.len() - SUM;
    // The checksum first: the lengths that size what is decompressed are then known intact.
    if Sha256::digest(&rec[..end])[..SUM] != rec[end..] {
        return Err(RecordError::Checksum);
    }
    let plain = codec::decompress(&head, &rec[head.frame_at..trace_at])?;
    let mut plain = bytes::Bytes::from(plain);
    let raw = plain.split_to(head.raw_len);
    let json = plain;
    let env = checked_bytes(json, raw)?;
    TraceParent::from_bytes(&rec[trace_at..end]).map(|t| env.with_trace(t)).ok_or(RecordError::Trace)
}

/// The per-thread zstd contexts, with the prepared dictionaries they share.
mod codec {
    use super::{RecordError, V4Head, DICTIONARIES, FRAME_MAGIC, LEVEL, SUM, V4, V4_MAGIC, WRITE_DICTIONARY};
    use crate::event::{trace, Envelope};
    use sha2::{Digest, Sha256};
    use std::cell::RefCell;
    use std::sync::LazyLock;
    use zstd::bulk::{Compressor, Decompressor};
    use zstd::dict::{DecoderDictionary, EncoderDictionary};
    use zstd::zstd_safe::CParameter;

    /// The dictionary new records are written with, prepared once (`None`: zstd refused it,
    /// and records are written as v3).
    static ENCODER: LazyLock<Option<EncoderDictionary<'static>>> = LazyLock::new(|| {
        let (_, bytes) = DICTIONARIES.iter().find(|(id, _)| *id == WRITE_DICTIONARY)?;
        EncoderDictionary::try_copy(bytes, LEVEL).ok()
    });

    /// Every dictionary, prepared for reading once first needed.
    static DECODERS: LazyLock<Vec<(u8, Option<DecoderDictionary<'static>>)>> = LazyLock::new(|| {
        DICTIONARIES.iter().map(|(id, bytes)| (*id, DecoderDictionary::try_copy(bytes).ok())).collect()
    });

    thread_local! {
        static COMPRESSOR: RefCell<Option<Compressor<'static>>> = const { RefCell::new(None) };
        static DECOMPRESSORS: RefCell<Vec<(u8, Decompressor<'static>)>> = const { RefCell::new(Vec::new()) };
        static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    fn compressor() -> Option<Compressor<'static>> {
        let mut c = Compressor::with_prepared_dictionary(ENCODER.as_ref()?).ok()?;
        // Every byte counts: the record has its own lengths, dictionary id and checksum.
        c.set_parameter(CParameter::ChecksumFlag(false)).ok()?;
        c.set_parameter(CParameter::ContentSizeFlag(false)).ok()?;
        c.set_parameter(CParameter::DictIdFlag(false)).ok()?;
        Some(c)
    }

    /// A v4 record of `env`; `None` when compression fails (the caller writes v3 instead).
    pub(super) fn encode_v4(env: &Envelope) -> Option<Vec<u8>> {
        let json = env.json();
        let raw = &env.raw;
        let json_len = u32::try_from(json.len()).ok()?;
        let raw_len = u32::try_from(raw.len()).ok()?;
        SCRATCH.with(|scratch| {
            let (plain, frame) = &mut *scratch.try_borrow_mut().ok()?;
            plain.clear();
            plain.extend_from_slice(raw);
            plain.extend_from_slice(json);
            frame.clear();
            frame.reserve(zstd::zstd_safe::compress_bound(plain.len()));
            COMPRESSOR.with(|cell| {
                let mut cell = cell.try_borrow_mut().ok()?;
                if cell.is_none() {
                    *cell = Some(compressor()?);
                }
                cell.as_mut()?.compress_to_buffer(plain.as_slice(), frame).ok()
            })?;
            let body = frame.strip_prefix(&FRAME_MAGIC[..])?;
            let frame_len = u32::try_from(body.len()).ok()?;
            let mut out = Vec::with_capacity(super::V4_HEAD + 15 + body.len() + trace::LEN + SUM);
            out.push(V4);
            out.extend_from_slice(&V4_MAGIC);
            out.push(WRITE_DICTIONARY);
            super::put_varint(&mut out, json_len);
            super::put_varint(&mut out, raw_len);
            super::put_varint(&mut out, frame_len);
            out.extend_from_slice(body);
            out.extend_from_slice(&env.trace.to_bytes());
            let sum = Sha256::digest(&out);
            out.extend_from_slice(&sum[..SUM]);
            Some(out)
        })
    }

    /// More than zstd's format can expand a frame by (see [`decompress`]).
    const MAX_RATIO: usize = 1 << 16;

    /// The raw body then the event JSON, from a frame (less its magic) of `head`'s record.
    pub(super) fn decompress(head: &V4Head, frame: &[u8]) -> Result<Vec<u8>, RecordError> {
        // A zstd block yields at most 128 KiB and takes at least 3 bytes, so a frame can never
        // give more than ~43,700 bytes per byte of it: a head asking for more is damaged (up to
        // 8 GiB for a damaged length varint), and is refused before its buffer is allocated
        // (`stored_id` reads heads before any checksum).
        let most = (frame.len() + FRAME_MAGIC.len()).saturating_mul(MAX_RATIO);
        let want = head.plain_len().filter(|n| *n <= most).ok_or(RecordError::Head)?;
        let mut src = Vec::with_capacity(FRAME_MAGIC.len() + frame.len());
        src.extend_from_slice(&FRAME_MAGIC);
        src.extend_from_slice(frame);
        let mut out = Vec::with_capacity(want);
        DECOMPRESSORS.with(|cell| {
            let mut all = cell.try_borrow_mut().map_err(|_| RecordError::Dictionary(head.dictionary))?;
            let at = match all.iter().position(|(id, _)| *id == head.dictionary) {
                Some(at) => at,
                None => {
                    let dict = DECODERS
                        .iter()
                        .find(|(id, _)| *id == head.dictionary)
                        .and_then(|(_, d)| d.as_ref())
                        .ok_or(RecordError::Dictionary(head.dictionary))?;
                    let d = Decompressor::with_prepared_dictionary(dict).map_err(RecordError::Decompress)?;
                    all.push((head.dictionary, d));
                    all.len() - 1
                }
            };
            all[at].1.decompress_to_buffer(src.as_slice(), &mut out).map_err(RecordError::Decompress)
        })?;
        if out.len() != want {
            return Err(RecordError::Size { got: out.len(), want });
        }
        Ok(out)
    }
}

/// The event id a record says it holds, read without checking the record (to compare ids
/// cheaply, e.g. whether a replayed event is already pending); `None` when unreadable.
pub fn stored_id(rec: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    let id = |json: &[u8]| serde_json::from_slice::<Id>(json).ok().map(|i| i.id);
    match *rec.first()? {
        V2 | V3 => id(rec.get(V2_HEAD..V2_HEAD.checked_add(u32_at(rec, 1)?)?)?),
        V1 => id(rec.get(5..5usize.checked_add(u32_at(rec, 1)?)?)?),
        V4 => {
            let head = V4Head::parse(rec).filter(|h| h.len() == Some(rec.len()))?;
            let plain = codec::decompress(&head, rec.get(head.frame_at..head.trace_at()?)?).ok()?;
            id(plain.get(head.raw_len..)?)
        }
        _ => None,
    }
}

/// An event stored without a trace context gets the same one at every read.
fn old_trace(env: Envelope) -> Envelope {
    let t = TraceParent::for_old_event(&env.event.id);
    env.with_trace(t)
}

fn checked(json: &[u8], raw: &[u8]) -> Result<Envelope, RecordError> {
    checked_bytes(bytes::Bytes::copy_from_slice(json), bytes::Bytes::copy_from_slice(raw))
}

/// The envelope of an event JSON and its raw body, when the event parses and its id is the
/// hash of its content.
fn checked_bytes(json: bytes::Bytes, raw: bytes::Bytes) -> Result<Envelope, RecordError> {
    let event: Event = serde_json::from_slice(&json).map_err(RecordError::Json)?;
    let computed = crate::event::event_id(&event);
    if computed != event.id {
        return Err(RecordError::IdMismatch { stored: event.id, computed });
    }
    Ok(Envelope::with_json(event, raw, json))
}

/// Intact records of version 2, 3 or 4 found anywhere in `bytes` (the raw file of a spool
/// redb cannot open), once per event id, in file order.
pub fn scan(bytes: &[u8]) -> Vec<Envelope> {
    let mut found = scan_plain(bytes);
    found.extend(scan_compressed(bytes));
    found.sort_by_key(|(at, _)| *at);
    let mut seen = std::collections::HashSet::new();
    found.into_iter().filter(|(_, env)| seen.insert(env.event.id.clone())).map(|(_, env)| env).collect()
}

/// Intact v2 and v3 records, by the start of their event JSON, with where each begins.
fn scan_plain(bytes: &[u8]) -> Vec<(usize, Envelope)> {
    let mut found = Vec::new();
    let mut from = V2_HEAD;
    while let Some(pos) = bytes.get(from..).and_then(|rest| find(rest, JSON_START)) {
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
            found.push((start, env));
            from = end;
        }
    }
    found
}

/// Intact v4 records, by their head, with where each begins.
fn scan_compressed(bytes: &[u8]) -> Vec<(usize, Envelope)> {
    const HEAD: [u8; 3] = [V4, V4_MAGIC[0], V4_MAGIC[1]];
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(pos) = bytes.get(from..).and_then(|rest| find(rest, &HEAD)) {
        let start = from + pos;
        from = start + 1;
        let Some(end) = V4Head::parse(&bytes[start..]).and_then(|h| h.len()).and_then(|n| n.checked_add(start)) else {
            continue;
        };
        let Some(rec) = bytes.get(start..end) else { continue };
        if let Ok(env) = decode(rec) {
            found.push((start, env));
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

    #[test]
    fn a_damaged_head_asking_for_more_than_its_frame_can_hold_is_refused_before_allocating() {
        let rec = encode(&env(7));
        let mut head = V4Head::parse(&rec).unwrap();
        let frame = &rec[head.frame_at..head.trace_at().unwrap()];
        assert!(codec::decompress(&head, frame).is_ok());
        // A damaged varint: 4 GiB of JSON claimed by a frame of a few hundred bytes.
        head.json_len = u32::MAX as usize;
        assert!(matches!(codec::decompress(&head, frame), Err(RecordError::Head)));
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

    /// A Webio-shaped envelope (bench/webio.lua's inbound message).
    fn webio(n: u32) -> Envelope {
        let body = format!(
            r#"{{"type":"inboundMessage","conversationId":"{n}","communicationActionId":"r1-{n}","outboundChannelAddress":"447717472695","inboundChannelAddress":"WhatsApp QA Test","customerUID":"","body":"No I don't, thanks","dateCreated":"2021-01-28 12:21:28.373"}}"#
        );
        let ev = crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
        Envelope::new(ev, body.into())
    }

    #[test]
    fn records_of_every_version_round_trip() {
        let e = env(3);
        assert_eq!(encode(&e)[0], V4, "written compressed");
        for rec in [encode(&e), encode_v3(&e), v2(&e), v1(&e)] {
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
        // The context is covered by the checksum (compressed or not).
        let mut plain = encode_v3(&e);
        let at = plain.len() - SUM - 1;
        plain[at] ^= 1;
        assert!(matches!(decode(&plain), Err(RecordError::Checksum)));
        let mut rec = encode(&e);
        let at = rec.len() - SUM - 1;
        rec[at] ^= 1;
        assert!(matches!(decode(&rec), Err(RecordError::Checksum)));
        // A version-2 record is found by a scan too.
        let ids: Vec<_> = scan(&[v2(&e), encode(&env(6))].concat()).into_iter().map(|e| e.event.id).collect();
        assert_eq!(ids, vec![e.event.id.clone(), env(6).event.id]);
    }

    #[test]
    fn a_compressed_record_round_trips_smaller_and_weighs_what_it_decodes_to() {
        for e in [webio(1), webio(123_456_789), env(7)] {
            let rec = encode(&e);
            let back = decode(&rec).unwrap();
            assert_eq!((&back.event, &back.raw, back.json(), back.trace), (&e.event, &e.raw, e.json(), e.trace));
            assert_eq!(stored_id(&rec), Some(e.event.id.clone()));
            let plain = encode_v3(&e);
            assert!(rec.len() < plain.len(), "{} bytes compressed, {} not", rec.len(), plain.len());
            assert_eq!(weight(&rec), weight(&plain), "the decoded size, not the stored one");
        }
        // Bodies that do not compress, large ones, an empty one.
        let noise: String =
            (0..20_000u32).map(|i| char::from(b'a' + ((i.wrapping_mul(2654435761) >> 7) % 26) as u8)).collect();
        for text in [noise.clone(), "x".repeat(300_000), String::new()] {
            let body = serde_json::json!({"type": "inboundMessage", "body": text}).to_string();
            let ev = crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
            let e = Envelope::new(ev, body.into());
            let rec = encode(&e);
            assert_eq!(rec[0], V4);
            let back = decode(&rec).unwrap();
            assert_eq!((&back.event, &back.raw), (&e.event, &e.raw));
        }
    }

    #[test]
    fn a_damaged_compressed_record_is_refused() {
        let e = webio(42);
        let rec = encode(&e);
        let head = V4Head::parse(&rec).unwrap();
        // Every single byte flipped, one at a time: never delivered, never a panic.
        for at in 0..rec.len() {
            let mut bad = rec.clone();
            bad[at] ^= 0x01;
            assert!(decode(&bad).is_err(), "byte {at} flipped");
        }
        let mut bad = rec.clone();
        bad[head.frame_at + 3] ^= 0x40;
        assert!(matches!(decode(&bad), Err(RecordError::Checksum)));
        assert!(matches!(decode(&rec[..rec.len() - 1]), Err(RecordError::Truncated(_))));
        assert!(decode(&rec[..2]).is_err());
        // A dictionary this build does not have (a record of a newer release), checksum intact.
        let mut newer = rec[..rec.len() - SUM].to_vec();
        newer[3] = 200;
        let sum = Sha256::digest(&newer);
        newer.extend_from_slice(&sum[..SUM]);
        assert!(matches!(decode(&newer), Err(RecordError::Dictionary(200))));
        // Compressed data that does not decode, checksum intact.
        let mut garbled = rec[..rec.len() - SUM].to_vec();
        for b in &mut garbled[head.frame_at..head.frame_at + head.frame_len] {
            *b = !*b;
        }
        let sum = Sha256::digest(&garbled);
        garbled.extend_from_slice(&sum[..SUM]);
        assert!(decode(&garbled).is_err());
    }

    #[test]
    fn shipped_dictionaries_never_change() {
        // A record names its dictionary on disk: a shipped one is read forever. Add a new
        // one under the next id instead of changing these.
        let pinned = [(1u8, "532f6997b970ba39f9a427631c53c2516f2dd21fe4585fa9e236acf20acdaef2")];
        assert_eq!(DICTIONARIES.len(), pinned.len(), "a new dictionary: pin its hash here");
        for ((id, bytes), (pinned_id, sha)) in DICTIONARIES.iter().zip(pinned) {
            assert_eq!((*id, hex::encode(Sha256::digest(bytes))), (pinned_id, sha.to_owned()));
        }
        assert!(DICTIONARIES.iter().any(|(id, _)| *id == WRITE_DICTIONARY));
    }

    #[test]
    fn varints_round_trip() {
        for n in [0u32, 1, 127, 128, 300, 16_383, 16_384, u32::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, n);
            let mut at = 0;
            assert_eq!(varint(&b, &mut at), Some(n as usize));
            assert_eq!(at, b.len());
        }
        assert_eq!(varint(&[0x80, 0x80], &mut 0), None, "cut short");
        assert_eq!(varint(&[0xff, 0xff, 0xff, 0xff, 0x7f], &mut 0), None, "above 32 bits");
    }

    #[test]
    fn a_scan_finds_compressed_and_plain_records_in_noise() {
        let (a, b, c, d) = (webio(1), webio(2), env(3), webio(4));
        let mut file: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        file.extend_from_slice(&encode(&a));
        file.extend_from_slice(b"4Wz\x01\x05\x05\x7f"); // a head alone
        file.extend_from_slice(&encode_v3(&b));
        file.extend_from_slice(&[0; 77]);
        file.extend_from_slice(&encode(&c));
        file.extend_from_slice(&encode(&a)); // an older copy of the same row
        let damaged = encode(&d);
        file.extend_from_slice(&damaged[..damaged.len() - 5]);
        file.extend_from_slice(&[0; 4096]);
        let ids: Vec<_> = scan(&file).into_iter().map(|e| e.event.id).collect();
        assert_eq!(ids, vec![a.event.id, b.event.id, c.event.id]);
    }

    #[test]
    fn a_record_altered_anywhere_is_refused() {
        let rec = encode_v3(&env(3));
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

    /// Sets the last 16 bytes to the checksum of the rest, so that damage reaches the parser.
    fn resummed(mut rec: Vec<u8>) -> Vec<u8> {
        if rec.len() >= SUM {
            let end = rec.len() - SUM;
            let sum = Sha256::digest(&rec[..end]);
            rec[end..].copy_from_slice(&sum[..SUM]);
        }
        rec
    }

    #[test]
    fn mutations_of_real_records_never_panic_the_decoder() {
        let (e, w) = (env(6), webio(7));
        let valid = [encode(&e), encode(&w), encode_v3(&e), encode_v3(&w), v2(&e), v1(&w)];
        let mut rng = fastrand::Rng::with_seed(1414);
        let mut decoded = 0;
        for i in 0..4000 {
            let mut rec = valid[i % valid.len()].clone();
            for _ in 0..rng.usize(1..3) {
                match rng.u8(..4) {
                    0 if !rec.is_empty() => {
                        let at = rng.usize(..rec.len());
                        rec[at] ^= 1 << rng.u8(..8);
                    }
                    1 => rec.truncate(rng.usize(..=rec.len())),
                    2 if !rec.is_empty() => {
                        // The head (versions, lengths, dictionary id) is where damage misleads.
                        let at = rng.usize(..rec.len().min(12));
                        rec[at] = [0, 0xff, 0x7f, 0x80, 1, 2, 3, 4][rng.usize(..8)];
                    }
                    _ => rec.insert(rng.usize(..=rec.len()), rng.u8(..)),
                }
            }
            if i % 3 != 0 {
                rec = resummed(rec);
            }
            let _ = weight(&rec);
            let id = stored_id(&rec);
            if let Ok(env) = decode(&rec) {
                decoded += 1;
                assert_eq!(id.as_deref(), Some(env.event.id.as_str()));
                let again = decode(&encode(&env)).unwrap();
                assert_eq!((again.event, again.raw, again.trace), (env.event, env.raw, env.trace));
            }
        }
        // Some damage is harmless (a v1 record's body, a flipped bit put back), most is not.
        assert!(decoded > 0 && decoded < 2000, "{decoded}");
        let mut file = Vec::new();
        for rec in &valid {
            file.extend_from_slice(rec);
        }
        for _ in 0..200 {
            let mut f = file.clone();
            for _ in 0..4 {
                let at = rng.usize(..f.len());
                f[at] ^= 1 << rng.u8(..8);
            }
            f.truncate(rng.usize(f.len() / 2..=f.len()));
            assert!(scan(&f).len() <= 2);
        }
    }
}
