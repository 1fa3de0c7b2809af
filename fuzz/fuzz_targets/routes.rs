//! The routes parser on arbitrary text: never panics; every refusal names the file; an
//! accepted file only ever matches sinks it defines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use webio_router::event::{normalise, NormaliseOptions};
use webio_router::routes::Routes;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Routes::parse("routes.toml", text, |k| (k == "HOME").then(|| "/home/webio".to_owned())) {
        Ok(routes) => {
            let body = br#"{"type":"messageStatusUpdate","conversationId":"1","statusCode":"3","x":"y"}"#;
            let at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
            let ev = normalise(body, None, &NormaliseOptions::default(), at).unwrap();
            for s in routes.matching(&ev).sinks {
                assert!(routes.sinks.contains_key(s));
            }
        }
        Err(e) => {
            for d in &e.0 {
                assert!(d.to_string().starts_with("routes.toml"));
            }
        }
    }
});
