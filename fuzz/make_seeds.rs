//! Writes the seeds of the `wal`, `record` and `dead` targets from the real encoders:
//! `make-seeds DIR` fills DIR/wal, DIR/record, DIR/dead (fuzz/run.sh runs it into fuzz/seeds).
use std::path::Path;
use webio_router::delivery::spool::dead::DeadLetter;
use webio_router::delivery::spool::record;
use webio_router::delivery::spool::wal::{self, Bookkeeping};
use webio_router::event::{normalise, Envelope};

const BODIES: [&str; 4] = [
    r#"{"type":"inboundMessage","conversationId":"7","communicationActionId":"r1-7","outboundChannelAddress":"447717472695","inboundChannelAddress":"WhatsApp QA Test","customerUID":"","body":"No I don't, thanks","dateCreated":"2021-01-28 12:21:28.373"}"#,
    r#"{"type":"messageStatusUpdate","conversationId":"1","statusCode":"3","x":"y"}"#,
    r#"{"type":"payment","amount":12,"body":"hello 12"}"#,
    "type=inboundMessage&body=hi",
];

fn envelopes() -> Vec<Envelope> {
    let at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    BODIES
        .iter()
        .filter_map(|b| {
            let ev = normalise(b.as_bytes(), Some("42".into()), &Default::default(), at).ok()?;
            Some(Envelope::new(ev, bytes::Bytes::from_static(b.as_bytes())))
        })
        .collect()
}

fn write(dir: &Path, name: &str, mode: Option<u8>, bytes: &[u8]) {
    let mut out = mode.map(|m| vec![m]).unwrap_or_default();
    out.extend_from_slice(bytes);
    std::fs::write(dir.join(name), out).unwrap();
}

fn main() {
    let root = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: make-seeds DIR"));
    let envs = envelopes();
    let sinks = vec!["file".to_owned(), "crm".to_owned()];

    let dir = root.join("record");
    std::fs::create_dir_all(&dir).unwrap();
    let mut salvage = b"junk before".to_vec();
    for (i, env) in envs.iter().enumerate() {
        write(&dir, &format!("v4-{i}"), Some(0), &record::encode(env));
        write(&dir, &format!("v4-{i}-sum"), Some(1), &record::encode(env));
        write(&dir, &format!("v3-{i}"), Some(0), &record::encode_v3(env));
        write(&dir, &format!("body-{i}"), Some(2), env.raw.as_ref());
        salvage.extend(record::encode(env));
        salvage.extend(record::encode_v3(env));
        salvage.extend_from_slice(b"\0\0\xff");
    }
    write(&dir, "salvage", Some(0), &salvage);

    let dir = root.join("wal");
    std::fs::create_dir_all(&dir).unwrap();
    let recs: Vec<Vec<u8>> = envs.iter().map(record::encode).collect();
    let book = [
        Bookkeeping::Done { sink: "file".into(), seqs: vec![1, 2] },
        Bookkeeping::Attempts { sink: "crm".into(), items: vec![(1, 3), (3, 1)] },
    ];
    let mut log = Vec::new();
    let events = recs.iter().enumerate().map(|(i, r)| (i as u64 + 1, r.as_slice(), sinks.as_slice()));
    wal::encode(&mut log, 5, 1_800_000_000_000, 1, &[7, u128::MAX], events, &[]);
    let first = log.len();
    wal::encode(&mut log, 5, 1_800_000_000_100, 0, &[], std::iter::empty(), &book);
    let mut file = log.clone();
    file.extend_from_slice(&wal::END);
    file.extend(vec![0; 64]);
    write(&dir, "log", Some(0), &file);
    write(&dir, "log-replay", Some(4), &file);
    write(&dir, "log-torn", Some(0), &log[..log.len() - 3]);
    // The framed modes take each payload as u16 LE length + bytes (the target adds headers).
    let mut payloads = Vec::new();
    for frame in [&log[..first], &log[first..]] {
        let p = &frame[12..];
        payloads.extend_from_slice(&(p.len() as u16).to_le_bytes());
        payloads.extend_from_slice(p);
    }
    write(&dir, "framed", Some(1), &payloads);
    write(&dir, "framed-replay", Some(5), &payloads);

    let dir = root.join("dead");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, env) in envs.iter().enumerate() {
        let line = serde_json::to_string(&DeadLetter::new("crm", "HTTP 422", 3, env)).unwrap();
        write(&dir, &format!("letter-{i}"), None, line.as_bytes());
    }
    let mut binary = envs[0].clone();
    binary.raw = bytes::Bytes::from_static(&[0xff, 0, 0x7b]);
    let line = serde_json::to_string(&DeadLetter::new("crm", "gone", 1, &binary)).unwrap();
    write(&dir, "letter-hex", None, line.as_bytes());
    let line = serde_json::to_string(&DeadLetter::unreadable("crm", "checksum", 0, &recs[0])).unwrap();
    write(&dir, "letter-unreadable", None, line.as_bytes());
}
