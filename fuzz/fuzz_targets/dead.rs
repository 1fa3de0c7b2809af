//! A line of the dead-letter file (what `webio-router replay` reads back) on arbitrary text:
//! never panics; a line that parses gives an envelope or a typed error, and writing the letter
//! out again parses back to the same letter.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "capped_alloc.rs"]
mod capped_alloc;
#[global_allocator]
static ALLOC: capped_alloc::Capped = capped_alloc::Capped;
use webio_router::delivery::spool::dead::DeadLetter;

fuzz_target!(|data: &[u8]| {
    let Ok(letter) = serde_json::from_slice::<DeadLetter>(data) else { return };
    if let Ok(env) = letter.envelope() {
        assert_eq!(Some(&env.event), letter.event.as_ref());
    }
    let line = serde_json::to_string(&letter).unwrap();
    let back: DeadLetter = serde_json::from_str(&line).unwrap();
    assert_eq!(back, letter);
});
