//! The spool's event records (`record::decode`: versions 1 to 4, v4 zstd with a dictionary)
//! and the salvage scan on arbitrary bytes: never panic, never an unbounded allocation; a
//! record that decodes re-encodes to one that decodes to the same envelope, and its
//! `stored_id` is its id.
//!
//! The first byte picks a mode: 0 the bytes as they are (also given to `scan`, `stored_id`
//! and `weight`); 1 the same with the last 16 bytes set to the record's checksum (random
//! bytes never pass it, damage behind a matching checksum is what the decoder must survive
//! then); 2 the rest is a body: normalised, encoded (v4 and v3), decoded back, equal.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "capped_alloc.rs"]
mod capped_alloc;
#[global_allocator]
static ALLOC: capped_alloc::Capped = capped_alloc::Capped;
use sha2::{Digest, Sha256};
use webio_router::delivery::spool::record;
use webio_router::event::{normalise, Envelope, NormaliseOptions};

fn same(a: &Envelope, b: &Envelope) {
    assert_eq!(a.event, b.event);
    assert_eq!(a.raw, b.raw);
    assert_eq!(a.trace, b.trace);
}

fn check(rec: &[u8]) {
    let _ = record::weight(rec);
    let id = record::stored_id(rec);
    if let Ok(env) = record::decode(rec) {
        assert_eq!(id.as_deref(), Some(env.event.id.as_str()));
        for again in [record::encode(&env), record::encode_v3(&env)] {
            same(&record::decode(&again).expect("a re-encoded record decodes"), &env);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            check(rest);
            for env in record::scan(rest) {
                assert!(record::decode(&record::encode(&env)).is_ok());
            }
        }
        1 => {
            let mut rec = rest.to_vec();
            if rec.len() >= 16 {
                let end = rec.len() - 16;
                let sum = Sha256::digest(&rec[..end]);
                rec[end..].copy_from_slice(&sum[..16]);
            }
            check(&rec);
        }
        _ => {
            let at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
            let Ok(ev) = normalise(rest, Some("42".into()), &NormaliseOptions::default(), at) else { return };
            let env = Envelope::new(ev, bytes::Bytes::copy_from_slice(rest));
            for rec in [record::encode(&env), record::encode_v3(&env)] {
                same(&record::decode(&rec).expect("an encoded record decodes"), &env);
                assert_eq!(record::stored_id(&rec).as_deref(), Some(env.event.id.as_str()));
            }
        }
    }
});
