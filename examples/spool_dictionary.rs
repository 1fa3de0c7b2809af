//! Trains a zstd dictionary for the spool's compressed records (record v4) on Webio's shapes,
//! and writes it to the path given:
//!
//! ```text
//! cargo run --release --example spool_dictionary -- src/delivery/spool/dict/webio-2.zdict
//! ```
//!
//! A shipped dictionary never changes (records name theirs on disk): a new one goes under the
//! next id, added to `record::DICTIONARIES` and written with from then on; every earlier one
//! stays. The samples are what a record compresses (the raw body, then the event JSON) for
//! each fixture in tests/fixtures/webio/ and for bench/webio.lua's four shapes with varying
//! ids. It also prints the mean record size, compressed and not, on shapes it did not train on.

use webio_router::delivery::spool::record;
use webio_router::event::{normalise, Envelope};

/// The shapes of bench/webio.lua (`%s`: conversation id, `%a`: a second id).
const SHAPES: [&str; 4] = [
    r#"{"type":"messageStatusUpdate","conversationId":"%s","communicationActionId":"%a","outboundChannelAddress":"447717472695","inboundChannelAddress":"WhatsApp QA Test","customerUID":"","dateCreated":"2021-01-28 12:22:15.397","statusCode":"2"}"#,
    r#"{"type":"inboundMessage","conversationId":"%s","communicationActionId":"%a","outboundChannelAddress":"447717472695","inboundChannelAddress":"WhatsApp QA Test","customerUID":"","body":"No I don't, thanks","dateCreated":"2021-01-28 12:21:28.373"}"#,
    r#"{"type":"messageStatusUpdate","conversationId":"%s","outboundChannelAddress":"447700900123","inboundChannelAddress":"SMS Longcode","customerUID":"CUST-%a","dateCreated":"2020-11-03 09:15:40.005","statusCode":"1"}"#,
    r#"{"type":"conversationClosed","conversationId":"%s","closedBy":"agent-%a","dateCreated":"2025-05-19 16:40:00.000"}"#,
];
const SIZE: usize = 4096;

fn envelope(body: &[u8], org: Option<&str>) -> Option<Envelope> {
    let ev = normalise(body, org.map(str::to_owned), &Default::default(), chrono::Utc::now()).ok()?;
    Some(Envelope::new(ev, body.to_vec().into()))
}

fn shaped(run: &str, tid: u32, counter: u32, org: Option<&str>) -> Envelope {
    let body = SHAPES[counter as usize % SHAPES.len()]
        .replace("%s", &format!("{run}{tid}{counter:09}"))
        .replace("%a", &format!("r{run}-{tid}-{counter}"));
    envelope(body.as_bytes(), org).expect("a valid shape")
}

/// What a v4 record compresses.
fn sample(e: &Envelope) -> Vec<u8> {
    [&e.raw[..], &e.json()[..]].concat()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).ok_or("usage: spool_dictionary OUT.zdict")?;
    let orgs = [None, Some("org-1"), Some("3f2c9a10-7d41-4c8e-9b0a-5e6f7a8b9c0d")];
    let mut samples = Vec::new();
    let mut dir: Vec<_> = std::fs::read_dir("tests/fixtures/webio")?.filter_map(|e| Some(e.ok()?.path())).collect();
    dir.sort();
    for path in dir {
        let name = path.to_string_lossy();
        if name.ends_with(".expected.json") || !name.ends_with(".json") {
            continue;
        }
        // As Webio sends it: compact.
        let body = serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(&std::fs::read(&path)?)?)?;
        for org in orgs {
            if let Some(e) = envelope(&body, org) {
                samples.extend(std::iter::repeat_n(sample(&e), 40));
            }
        }
    }
    for i in 0..4000u32 {
        samples.push(sample(&shaped("7", 1 + i % 4, i * 37, orgs[i as usize % orgs.len()])));
    }
    let dict = zstd::dict::from_samples(&samples, SIZE)?;
    std::fs::write(&out, &dict)?;
    println!("{out}: {} bytes, trained on {} samples", dict.len(), samples.len());
    // Sizes on ids it did not see (the records are written with the build's dictionary).
    let test: Vec<Envelope> = (0..10_000).map(|i| shaped("1000000", 1 + i % 2, 100_000 + i, None)).collect();
    let mean = |f: &dyn Fn(&Envelope) -> usize| test.iter().map(f).sum::<usize>() as f64 / test.len() as f64;
    println!(
        "bench shapes: body {:.0} + event JSON {:.0} bytes; record v3 {:.0} bytes, v4 {:.0} bytes (with this build's dictionary)",
        mean(&|e| e.raw.len()),
        mean(&|e| e.json().len()),
        mean(&|e| record::encode_v3(e).len()),
        mean(&|e| record::encode(e).len()),
    );
    Ok(())
}
