//! The spool at the edges real deployments hit (issue 11, README "Delivery"): a full disk, a sink that
//! never answers at shutdown, large bodies waiting for a dead sink, a damaged spool file.
//! The real binary, real signals; "within the deadline" is the only timing asserted, because
//! the contract itself is a deadline.

use crate::helpers::spool::*;
use crate::helpers::tmpfs::Tmpfs;
use std::collections::BTreeSet;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
/// `shutdown_timeout` of these tests (the helpers' default) and the contract's margin.
const SHUTDOWN: Duration = Duration::from_secs(3);
const MARGIN: Duration = Duration::from_secs(1);

/// Posts until the spool refuses; returns the ids accepted on the way and the refusal.
fn post_until_refused(router: &Router, tag: &str, accepted: &mut BTreeSet<String>) -> Answer {
    for i in 0..5000 {
        let a = router.post(&payload(tag, i));
        match a.status {
            202 => {
                accepted.insert(a.id());
            }
            503 => return a,
            s => panic!("unexpected {s}: {}", a.body),
        }
    }
    panic!("the spool never refused on a full disk");
}

/// routes.toml with one HTTP sink that waits `timeout` for an answer.
fn slow_routes(url: &str, timeout: &str) -> String {
    format!("[sinks.crm]\ntype = \"http\"\nurl = \"{url}\"\ntimeout = \"{timeout}\"\n\n[[routes]]\nname = \"all\"\nto = [\"crm\"]\n")
}

// ---------------------------------------------------------------------------------------------
// A full spool disk

#[test]
fn a_full_spool_disk_answers_503_and_readyz_says_why_then_everything_resumes_without_a_restart() {
    let fs = Tmpfs::mount("4m");
    let sink = SinkServer::start(503);
    let setup = Setup::with(&http_routes(&[("crm", sink.url("/hook"))]), "", "", Some(&fs.path().join("spool")));
    let router = setup.start();
    let mut accepted = post_all(&router, "before", 5);

    fs.fill();
    let refused = post_until_refused(&router, "full", &mut accepted);
    assert!(refused.header("retry-after").is_some(), "{}", refused.head);
    assert_eq!(router.post(&payload("still-full", 0)).status, 503, "refused while the disk stays full");
    let (code, ready) = router.readyz();
    assert_eq!(code, 503, "{ready}");
    let reason = ready["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("spool"), "/readyz gives the reason: {ready}");
    assert!(router.metric("webio_router_spool_write_errors_total").unwrap_or(0.0) >= 1.0, "{}", router.metrics());

    fs.free();
    let mut n = 0;
    wait_for("webhooks accepted again, without a restart", LIMIT, || {
        n += 1;
        let a = router.post(&payload("freed", n));
        (a.status == 202).then(|| accepted.insert(a.id())).is_some()
    });
    wait_for("/readyz to say ready again", LIMIT, || router.readyz().0 == 200);
    accepted.extend(post_all(&router, "after", 5));

    all_delivered(&setup, &router, &sink, &accepted, LIMIT);
}

#[test]
fn sigterm_while_the_spool_disk_is_full_exits_0_within_the_deadline_and_loses_nothing() {
    let fs = Tmpfs::mount("4m");
    let port = free_port();
    let setup = Setup::with(&http_routes(&[("crm", port.url("/hook"))]), "", "", Some(&fs.path().join("spool")));
    let router = setup.start();
    let mut accepted = post_all(&router, "before", 5);
    fs.fill();
    post_until_refused(&router, "full", &mut accepted);

    let (status, took) = router.terminate_timed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(took <= SHUTDOWN + MARGIN, "SIGTERM took {took:?}");

    fs.free();
    let sink = SinkServer::start_on(port, 200);
    let _router = setup.start();
    wait_for("every accepted event at the sink after the restart", LIMIT, || {
        sink.received_set().is_superset(&accepted)
    });
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[test]
fn sigterm_with_a_sink_that_never_answers_exits_0_within_the_deadline_and_delivers_after_a_restart() {
    let sink = SinkServer::hanging();
    let setup = Setup::new(&slow_routes(&sink.url("/hook"), "1h"), "");
    let router = setup.start();
    let ids = post_all(&router, "hang", 5);
    wait_for("a delivery in flight", LIMIT, || sink.attempts() >= 1);

    let (status, took) = router.terminate_timed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(took <= SHUTDOWN + MARGIN, "SIGTERM took {took:?}");

    sink.set_status(200);
    let _router = setup.start();
    wait_for("the events kept over the restart", LIMIT, || sink.received_set().is_superset(&ids));
}

#[test]
fn drain_on_shutdown_makes_sigterm_wait_until_the_spool_is_empty() {
    let sink = SinkServer::start(503);
    // Retries 2 s apart: when SIGTERM comes the sink is in its backoff, not delivering.
    let setup = Setup::new(
        &http_routes(&[("crm", sink.url("/hook"))]),
        "drain_on_shutdown = true\nretry_initial = \"2s\"\nretry_max = \"2s\"\nshutdown_timeout = \"8s\"",
    );
    let router = setup.start();
    let ids = post_all(&router, "drain", 40);
    wait_for("the sink to be tried", LIMIT, || sink.attempts() >= 1);
    sink.set_status(200);

    let (status, took) = router.terminate_timed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(took <= Duration::from_secs(8) + MARGIN, "SIGTERM took {took:?}");
    assert!(sink.received_set().is_superset(&ids), "every event delivered before the exit");
    let (code, out, err) = setup.run(&["spool", "check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("pending deliveries: 0"), "{out}");
}

#[test]
fn drain_on_shutdown_still_ends_at_the_deadline_when_a_sink_never_answers() {
    let sink = SinkServer::hanging();
    let setup = Setup::new(&slow_routes(&sink.url("/hook"), "1h"), "drain_on_shutdown = true");
    let router = setup.start();
    let ids = post_all(&router, "hang-drain", 3);
    wait_for("a delivery in flight", LIMIT, || sink.attempts() >= 1);
    let (status, took) = router.terminate_timed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(took <= SHUTDOWN + MARGIN, "SIGTERM took {took:?}");
    sink.set_status(200);
    let _router = setup.start();
    wait_for("the events kept over the restart", LIMIT, || sink.received_set().is_superset(&ids));
}

// ---------------------------------------------------------------------------------------------
// Memory

#[test]
fn resident_memory_stays_under_128_mib_with_1200_bodies_of_200_kb_waiting_for_a_dead_sink() {
    const MIB: u64 = 1 << 20;
    let port = free_port();
    let setup = Setup::with(&http_routes(&[("crm", port.url("/hook"))]), "", "max_body_bytes = 300000", None);
    let router = setup.start();
    let filler = "x".repeat(200_000);
    let ids: BTreeSet<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (router, filler) = (&router, &filler);
                s.spawn(move || {
                    (0..300)
                        .map(|i| {
                            let body = format!(
                                r#"{{"type":"inboundMessage","conversationId":"big-{t}-{i}","communicationActionId":"{i}","body":"{filler}"}}"#
                            );
                            let a = router.post(&body);
                            assert_eq!(a.status, 202, "{}", a.body);
                            a.id()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(ids.len(), 1200);
    let peak = router.peak_rss();
    assert!(peak < 128 * MIB, "peak resident memory {} MiB with the backlog waiting", peak / MIB);

    let sink = SinkServer::start_on(port, 200);
    wait_for("every event at the sink", Duration::from_secs(300), || sink.received_set() == ids);
    let peak = router.peak_rss();
    assert!(peak < 128 * MIB, "peak resident memory {} MiB after the backlog drained", peak / MIB);
}

// ---------------------------------------------------------------------------------------------
// A damaged spool

/// Zeroes every page of the file that holds `needle` — among them the live page of the
/// events table that holds the newest record, so the damage is certain to be read.
fn zero_pages_holding(path: &std::path::Path, needle: &[u8]) {
    let mut bytes = std::fs::read(path).unwrap();
    let pages: Vec<usize> = (0..bytes.len() / 4096)
        .filter(|p| bytes[p * 4096..(p + 1) * 4096].windows(needle.len()).any(|w| w == needle))
        .collect();
    assert!(!pages.is_empty(), "the record is in the file");
    for p in pages {
        bytes[p * 4096..(p + 1) * 4096].fill(0);
    }
    std::fs::write(path, bytes).unwrap();
}

/// The trace context of the newest record of the damaged spool below, and its trace id.
const TRACE: &str = "00-5e11d0a55e11d0a55e11d0a55e11d0a5-00f067aa0ba902b7-01";
const TRACE_ID: [u8; 16] =
    [0x5e, 0x11, 0xd0, 0xa5, 0x5e, 0x11, 0xd0, 0xa5, 0x5e, 0x11, 0xd0, 0xa5, 0x5e, 0x11, 0xd0, 0xa5];

/// Posts `body` with [`TRACE`] as its trace context: its record stores the trace id as is
/// (the event and the body are compressed), which is how a test finds the record's bytes.
fn post_traced(router: &Router, body: &str) -> Answer {
    let token = token();
    let headers = [("x-webio-token", token.as_str()), ("content-type", "application/json"), ("traceparent", TRACE)];
    http(router.hook, "POST", "/webhooks/webio", &headers, body.as_bytes())
}

fn refused_start(setup: &Setup) -> String {
    match setup.try_start() {
        Ok(r) => panic!("started on a damaged spool:\n{}", r.log()),
        Err(e) => e,
    }
}

#[test]
fn a_spool_with_zeroed_pages_is_refused_with_one_clear_message_then_checked_and_salvaged() {
    let port = free_port();
    let setup = Setup::new(&http_routes(&[("crm", port.url("/hook"))]), "");
    let router = setup.start();
    let mut ids = post_all(&router, "zeroed", 40);
    // The daemon holds the spool: both tools refuse (exit 2) and leave it alone.
    for tool in ["check", "salvage"] {
        let (code, out, err) = setup.run(&["spool", tool]);
        assert_eq!(code, 2, "{tool}: {out}{err}");
        assert!(err.contains("in use"), "{tool}: {err}");
    }
    // Sent with a known trace id: the pages holding this newest record are found by it below.
    let alive = post_traced(&router, &payload("still-running", 1));
    assert_eq!(alive.status, 202, "the daemon goes on");
    ids.insert(alive.id());
    assert!(router.terminate().success());

    let (code, out, err) = setup.run(&["spool", "check"]);
    assert_eq!(code, 0, "a healthy spool: {out}{err}");
    assert!(out.contains("healthy") && out.contains("crm: 41") && out.contains("oldest pending"), "{out}");

    zero_pages_holding(&setup.path("spool/spool.redb"), &TRACE_ID);
    let err = refused_start(&setup);
    assert!(err.contains("exit status: 1"), "exit 1, not a crash: {err}");
    assert!(!err.contains("panicked"), "no panic: {err}");
    assert!(err.contains("spool.redb") && err.contains("spool check") && err.contains("spool salvage"), "{err}");

    let (code, out, err) = setup.run(&["spool", "check"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(format!("{out}{err}").contains("damaged"), "{out}{err}");
    assert!(!err.contains("panicked"), "{err}");

    let (code, out, err) = setup.run(&["spool", "salvage"]);
    assert_eq!(code, 0, "{out}{err}");
    let saved: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("saved "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("a 'saved N' line: {out}"));
    assert!(saved > 0 && saved <= 41, "{out}");
    let aside: Vec<_> = std::fs::read_dir(setup.path("spool"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("spool.redb.damaged"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept aside");

    let sink = SinkServer::start_on(port, 200);
    let router = setup.start();
    wait_for("the salvaged events at the sink", LIMIT, || sink.received_set().len() >= saved);
    assert!(sink.received_set().is_subset(&ids));
    wait_for("the backlog to be empty", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="crm"}"#) == Some(0.0)
    });
}

#[test]
fn a_spool_emptied_or_removed_where_one_existed_is_refused_instead_of_starting_empty() {
    let port = free_port();
    let setup = Setup::new(&http_routes(&[("crm", port.url("/hook"))]), "");
    let router = setup.start();
    post_all(&router, "emptied", 3);
    assert!(router.terminate().success());

    let file = setup.path("spool/spool.redb");
    std::fs::write(&file, b"").unwrap();
    let err = refused_start(&setup);
    assert!(err.contains("exit status: 1") && !err.contains("panicked"), "{err}");
    assert!(err.contains("spool.redb") && err.contains("empty") && err.contains("spool salvage"), "{err}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0, "left as found");

    std::fs::remove_file(&file).unwrap();
    let err = refused_start(&setup);
    assert!(err.contains("spool.redb") && err.contains("missing"), "{err}");

    let (code, out, err) = setup.run(&["spool", "check"]);
    assert_eq!(code, 1, "{out}{err}");
    // The way out once the loss is accepted: a fresh spool.
    let (code, out, err) = setup.run(&["spool", "salvage"]);
    assert_eq!(code, 0, "{out}{err}");
    let router = setup.start();
    assert_eq!(router.post(&payload("fresh", 1)).status, 202);
}

#[test]
fn a_record_altered_on_disk_is_dead_lettered_with_the_reason_not_delivered_as_genuine() {
    let port = free_port();
    let setup = Setup::new(&http_routes(&[("crm", port.url("/hook"))]), "");
    let router = setup.start();
    let altered = post_traced(&router, &payload("altered", 1)).id();
    let intact = router.post(&payload("intact", 2)).id();
    assert!(router.terminate().success());

    // One byte, inside the stored record: the last byte of its compressed event and body,
    // just before its trace id.
    let file = setup.path("spool/spool.redb");
    let mut bytes = std::fs::read(&file).unwrap();
    let mut n = 0;
    for i in 1..bytes.len() - TRACE_ID.len() {
        if bytes[i..i + TRACE_ID.len()] == TRACE_ID {
            bytes[i - 1] ^= 0x20;
            n += 1;
        }
    }
    assert!(n > 0, "the record's bytes are in the file");
    std::fs::write(&file, bytes).unwrap();

    let sink = SinkServer::start_on(port, 200);
    let router = setup.start();
    wait_for("the intact event at the sink", LIMIT, || sink.received_set().contains(&intact));
    wait_for("a dead letter for the altered record", LIMIT, || !setup.dead_letters().is_empty());
    wait_for("the backlog to be empty", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="crm"}"#) == Some(0.0)
    });
    assert!(!sink.received_set().contains(&altered), "the altered event was delivered as genuine");
    assert!(sink.received().iter().all(|id| *id == intact), "{:?}", sink.received());
    let letters = setup.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let reason = letters[0]["reason"].as_str().unwrap();
    assert!(reason.contains("damaged") || reason.contains("does not match"), "{reason}");
    assert!(letters[0]["recordHex"].is_string(), "the record is kept as stored: {}", letters[0]);
}
