//! The files the daemon appends to — a file sink's, the dead letters, `rejected.jsonl` — at
//! the edges (README "Delivery"): a full disk loses nothing, leaves no torn line and stops nothing for
//! good; a name the filesystem cannot hold is dead-lettered at once; `rejected.jsonl` stays
//! bounded. The real binary in spool mode; small tmpfs mounts play the full disk.

use crate::helpers::spool::*;
use crate::helpers::tmpfs::Tmpfs;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

/// Fills `fs` but for about `bytes` (whole pages): a write larger than that lands in part
/// before ENOSPC, the case that tears a line.
fn fill_leaving(fs: &Tmpfs, bytes: usize) {
    let slack = fs.path().join(".slack");
    std::fs::write(&slack, vec![0u8; bytes]).unwrap();
    fs.fill();
    std::fs::remove_file(slack).unwrap();
    assert!(fs.available() > 0);
}

/// Every line of a JSON Lines file, parsed; panics naming the first line that is not JSON.
fn parsed_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}:{}: not a whole JSON line ({e}): {:.120}…", path.display(), i + 1, l))
        })
        .collect()
}

/// A distinct event with about `pad` bytes of padding.
/// Posts `payloads` (each accepted: the spool takes the event whatever the sink's disk) while
/// the sink's disk is full, waits until the sink fails for want of space with whole lines only
/// in the file (fewer than all of them), frees the space and waits until the file holds as
/// many lines as were posted. Returns the accepted ids and the file's lines.
fn post_through_a_full_disk(
    router: &Router,
    fs: &Tmpfs,
    out: &Path,
    payloads: impl Iterator<Item = usize>,
) -> (BTreeSet<String>, Vec<serde_json::Value>) {
    let ids: BTreeSet<String> = payloads
        .map(|i| {
            let a = router.post(&big_payload(i, 3000));
            assert_eq!(a.status, 202, "the spool takes the event whatever the sink's disk: {}", a.body);
            a.id()
        })
        .collect();
    let n = ids.len();
    wait_for("the sink to fail for want of space", LIMIT, || {
        router.metric(r#"webio_router_deliveries_total{sink="out",outcome="retry"}"#).unwrap_or(0.0) >= 3.0
    });
    // While the disk is full, the file holds whole lines only.
    let before = parsed_lines(out).len();
    assert!(before < n, "{before} of {n} lines fit in 8 KiB");

    fs.free();
    wait_for("every event in the file", LIMIT, || {
        std::fs::read_to_string(out).unwrap_or_default().lines().count() >= n
    });
    (ids, parsed_lines(out))
}

fn big_payload(n: usize, pad: usize) -> String {
    format!(r#"{{"type":"inboundMessage","conversationId":"c-{n}","body":"{}","n":{n}}}"#, "x".repeat(pad))
}

fn file_routes(path: &Path) -> String {
    format!("[sinks.out]\ntype = \"file\"\npath = \"{}\"\n\n[[routes]]\nto = [\"out\"]\n", path.display())
}

/// Points `delivery.dead_letter_file` (and so `rejected.jsonl`, beside it) elsewhere.
fn move_dead_letters(setup: &Setup, to: &Path) {
    let config = setup.path("webio-router.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let from = format!("dead_letter_file = \"{}\"", setup.path("dead-letter.jsonl").display());
    assert!(text.contains(&from));
    std::fs::write(&config, text.replace(&from, &format!("dead_letter_file = \"{}\"", to.display()))).unwrap();
}

#[test]
fn a_full_sink_disk_loses_no_event_and_leaves_no_torn_line() {
    let fs = Tmpfs::mount("1m");
    let out = fs.path().join("out/events.jsonl");
    let setup = Setup::new(&file_routes(&out), "");
    let router = setup.start();
    fill_leaving(&fs, 8192);

    let n = 40;
    let (ids, lines) = post_through_a_full_disk(&router, &fs, &out, 0..n);
    let got: BTreeSet<String> = lines.iter().map(|l| l["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, ids, "every event arrived once space was freed, without a restart");
    assert_eq!(lines.len(), n, "and each exactly once");
    wait_for("the backlog to be empty", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="out"}"#) == Some(0.0)
    });
    assert!(setup.dead_letters().is_empty());
}

#[test]
fn a_file_name_too_long_for_the_filesystem_is_dead_lettered_at_once() {
    let setup = Setup::new(&file_routes(Path::new("{conversationId}.jsonl")), "");
    // A relative path: under the router's working directory (the test directory).
    let router = setup.start();
    let body = format!(r#"{{"type":"inboundMessage","conversationId":"{}"}}"#, "c".repeat(10_000));
    let a = router.post(&body);
    assert_eq!(a.status, 202, "{}", a.body);
    // Setup allows 1000 attempts: only a permanent error gets here within the limit.
    wait_for("a dead letter", Duration::from_secs(10), || !setup.dead_letters().is_empty());
    let letters = setup.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["attempts"], 1, "dead-lettered at the first attempt: {}", letters[0]["reason"]);
    assert_eq!(letters[0]["sink"], "out");
    assert_eq!(letters[0]["eventId"], a.id());
    assert!(letters[0]["reason"].as_str().unwrap().contains("File name too long"), "{}", letters[0]["reason"]);
    assert_eq!(router.metric(r#"webio_router_deliveries_total{sink="out",outcome="retry"}"#).unwrap_or(0.0), 0.0);
    wait_for("the backlog to be empty", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="out"}"#) == Some(0.0)
    });
}

#[test]
fn a_dead_letter_on_a_full_disk_stays_pending_until_space_is_freed_and_is_never_torn() {
    let fs = Tmpfs::mount("1m");
    let crm = SinkServer::start(422);
    let setup = Setup::new(&http_routes(&[("crm", crm.url("/hook"))]), "");
    let dead = fs.path().join("var/dead-letter.jsonl");
    move_dead_letters(&setup, &dead);
    let router = setup.start();
    fill_leaving(&fs, 8192);

    // The dead letter holds the event and the body: ~40 KiB, more than the space left.
    let a = router.post(&big_payload(1, 20_000));
    assert_eq!(a.status, 202, "{}", a.body);
    wait_for("the dead letter to fail for want of space", LIMIT, || {
        crm.attempts() >= 2 && router.log().contains("cannot write the dead-letter file")
    });
    assert_eq!(router.metric(r#"webio_router_spool_pending{sink="crm"}"#), Some(1.0), "the pair stays in the spool");
    assert!(parsed_lines(&dead).is_empty(), "no part of the dead letter is left behind");

    fs.free();
    wait_for("the dead letter", LIMIT, || !parsed_lines(&dead).is_empty());
    wait_for("the backlog to be empty", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="crm"}"#) == Some(0.0)
    });
    let letters = parsed_lines(&dead);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["eventId"], a.id());
    assert_eq!(letters[0]["sink"], "crm");
    assert!(letters[0]["reason"].as_str().unwrap().contains("422"), "{}", letters[0]["reason"]);
}

#[test]
fn a_rejected_body_that_cannot_be_recorded_gets_503_and_400_once_space_is_freed() {
    let fs = Tmpfs::mount("1m");
    let setup = Setup::new(&file_routes(Path::new("out.jsonl")), "");
    move_dead_letters(&setup, &fs.path().join("var/dead-letter.jsonl"));
    let rejected = fs.path().join("var/rejected.jsonl");
    let router = setup.start();
    fill_leaving(&fs, 8192);

    let bad = format!("not json {}", "y".repeat(20_000));
    let a = router.post(&bad);
    assert_eq!(a.status, 503, "a body that cannot be kept is refused for now: {}", a.body);
    assert!(a.header("retry-after").is_some());
    assert!(parsed_lines(&rejected).is_empty(), "no part of the record is left behind");

    fs.free();
    let a = router.post(&bad);
    assert_eq!(a.status, 400, "{}", a.body);
    let records = parsed_lines(&rejected);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["body"], bad.as_str());
}

#[test]
fn rejected_jsonl_is_rotated_at_max_rejected_bytes() {
    let setup = Setup::new(&file_routes(Path::new("out.jsonl")), "max_rejected_bytes = 65536");
    let router = setup.start();
    let (rejected, previous) = (setup.path("rejected.jsonl"), setup.path("rejected.jsonl.1"));
    // ~2 KiB records: 200 of them are ~400 KiB, six times the cap.
    for i in 0..200 {
        let a = router.post(&format!("not json {i} {}", "z".repeat(2000)));
        assert_eq!(a.status, 400, "{}", a.body);
    }
    let (now, before) = (std::fs::metadata(&rejected).unwrap().len(), std::fs::metadata(&previous).unwrap().len());
    assert!(now <= 65536 && before <= 65536, "rejected.jsonl {now} bytes, rejected.jsonl.1 {before} bytes");
    assert!(!setup.path("rejected.jsonl.2").exists(), "one previous generation only");
    // The newest records are kept, whole.
    let newest = parsed_lines(&rejected);
    assert!(newest.last().unwrap()["body"].as_str().unwrap().starts_with("not json 199 "));
    assert!(parsed_lines(&previous).len() > 20);
}

#[test]
fn a_file_cut_by_copytruncate_then_a_full_disk_loses_no_event_and_leaves_no_torn_line() {
    // The sink counts its file's length itself (no `fstat` per write): after a copytruncate
    // it believes the file long and its blocks reserved ahead, so its next writes meet the full
    // disk unreserved, and one lands in part; that part must be cut off again.
    let fs = Tmpfs::mount("12m");
    let out = fs.path().join("events.jsonl");
    // 8 MiB of whole lines before the router starts: the sink reserves 1 MiB ahead of them.
    let old = "{\"old\":true}\n";
    std::fs::write(&out, old.repeat((8 << 20) / old.len())).unwrap();
    let setup = Setup::new(&file_routes(&out), "");
    let router = setup.start();
    let a = router.post(&big_payload(0, 3000));
    assert_eq!(a.status, 202, "{}", a.body);
    wait_for("the first line", LIMIT, || parsed_lines(&out).last().is_some_and(|l| l["id"] == a.id()));
    // copytruncate (the copy goes elsewhere: this filesystem is small).
    std::fs::OpenOptions::new().write(true).open(&out).unwrap().set_len(0).unwrap();
    fill_leaving(&fs, 8192);

    let n = 40;
    let (ids, lines) = post_through_a_full_disk(&router, &fs, &out, 1..=n);
    let got: BTreeSet<String> = lines.iter().map(|l| l["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, ids, "every event after the cut arrived, from the start of the cut file");
    assert_eq!(lines.len(), n, "and each exactly once");
    assert!(setup.dead_letters().is_empty());
}
