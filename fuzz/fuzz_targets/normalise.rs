//! The normaliser on arbitrary bodies: never panics; an accepted body gives a well-formed
//! event with a 32-hex id, the same id again for the same body; a refusal has a message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use webio_router::event::{normalise, NormaliseOptions};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the source time zone (DST edge cases), the rest is the body.
    let (zone, body) = match data.split_first() {
        Some((z, rest)) => (*z, rest),
        None => (0, data),
    };
    let zones = [chrono_tz::Tz::UTC, chrono_tz::Tz::Europe__London, chrono_tz::Tz::Australia__Lord_Howe];
    let opts = NormaliseOptions { source_timezone: zones[zone as usize % zones.len()], ..NormaliseOptions::default() };
    let at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    match normalise(body, Some("42".into()), &opts, at) {
        Ok(ev) => {
            assert_eq!(ev.id.len(), 32);
            assert!(ev.id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            let json = ev.to_json();
            assert!(serde_json::from_slice::<serde_json::Value>(&json).is_ok());
            let again = normalise(body, Some("42".into()), &opts, at + chrono::Duration::seconds(5)).unwrap();
            assert_eq!(again.id, ev.id);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
