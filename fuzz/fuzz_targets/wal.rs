//! The write-ahead file's decoder (`wal::decode`, what start-up replay and `spool check`
//! read) on arbitrary bytes: never panics; `good` is inside the input; the frames it keeps
//! re-encode to exactly the bytes they came from (decode(encode(x)) == x); replaying them into
//! an empty spool (in memory) is Ok or a typed error, never a caught panic.
//!
//! The first byte picks a mode. Random bytes rarely pass a frame's CRC, so in the "framed"
//! modes the rest is cut into frames (u16 LE length, then that many payload bytes), each given
//! a valid header (magic, length, CRC-32C) by the target: the payload parser then sees
//! everything the fuzzer makes.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "capped_alloc.rs"]
mod capped_alloc;
#[global_allocator]
static ALLOC: capped_alloc::Capped = capped_alloc::Capped;
use webio_router::delivery::spool::wal::{self, Decoded};
use webio_router::delivery::spool::StoreError;

/// Gives each payload of `rest` (u16 LE length + bytes) a valid frame header.
fn framed(mut rest: &[u8], v1: bool) -> Vec<u8> {
    let mut out = Vec::new();
    while rest.len() >= 2 {
        let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let payload = &rest[2..2 + n];
        rest = &rest[2 + n..];
        out.extend_from_slice(if v1 { &wal::MAGIC_V1 } else { &wal::MAGIC });
        out.extend_from_slice(&(n as u32).to_le_bytes());
        let crc = wal::crc32c(wal::crc32c(0, &(n as u32).to_le_bytes()), payload);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(payload);
    }
    out.extend_from_slice(rest);
    out
}

fn check(bytes: &[u8], replay: bool) {
    let d: Decoded = wal::decode(bytes);
    assert!(d.good as usize <= bytes.len());
    // Every frame kept re-encodes to its own bytes (a first-format frame as the current format
    // decodes to the same frame, but for the generation).
    let mut again = Vec::new();
    for f in &d.frames {
        let events = f.events.iter().map(|e| (e.seq, e.rec.as_slice(), e.sinks.as_slice()));
        let mut one = Vec::new();
        wal::encode(&mut one, f.gen.unwrap_or(7), f.at, f.first_seq, &f.ids, events, &f.book);
        let back = wal::decode(&one);
        assert_eq!(back.frames.len(), 1);
        assert_eq!(back.good as usize, one.len());
        let mut expect = f.clone();
        expect.gen = Some(f.gen.unwrap_or(7));
        assert_eq!(back.frames[0], expect);
        again.extend(one);
    }
    if d.frames.iter().all(|f| f.gen.is_some()) {
        assert_eq!(&again[..], &bytes[..d.good as usize]);
    }
    if replay && !d.frames.is_empty() {
        let db = redb::Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).unwrap();
        match wal::apply(&db, &d, 0) {
            Err(StoreError::Panicked(p)) => panic!("replay panicked: {p}"),
            Ok(_) | Err(_) => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        check(data, false);
        return;
    };
    let replay = mode & 4 != 0;
    match mode & 3 {
        0 => check(rest, replay),
        1 => check(&framed(rest, false), replay),
        2 => check(&framed(rest, true), replay),
        _ => {
            // A valid log followed by damage: framed, then the raw tail as it is.
            let cut = rest.len() / 2;
            let mut b = framed(&rest[..cut], false);
            b.extend_from_slice(&rest[cut..]);
            check(&b, replay);
        }
    }
});
