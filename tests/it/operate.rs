//! Operating a running daemon (README "Operating it", issue 12): pause and resume through the
//! control socket (kept across a restart), `sinks --json` and `GET /sinks`, an admin listener
//! that changes nothing, `replay` while the daemon runs, and per-sink `rate_limit` and
//! `concurrency`. Real processes: the daemon and the CLI talking to it.
//!
//! Waits are generous; the only timing asserted is a lower bound the rate limit guarantees.

use crate::helpers::spool::*;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);
/// Long enough for an unpaused drain to have delivered (it starts at once): a paused sink
/// that got nothing in this time was held back, not slow.
const QUIET: Duration = Duration::from_millis(700);

/// `webio-router ARGS` that must succeed; its stdout.
fn ok(setup: &Setup, args: &[&str]) -> String {
    let (code, out, err) = setup.run(args);
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    out
}

/// One sink of `sinks --json`.
fn sink_json(setup: &Setup, name: &str) -> serde_json::Value {
    let doc: serde_json::Value = serde_json::from_str(&ok(setup, &["sinks", "--json"])).unwrap();
    doc["sinks"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned().unwrap_or_else(|| panic!("{doc}"))
}

/// One sink of `GET /sinks` on the admin listener.
fn sink_http(router: &Router, name: &str) -> serde_json::Value {
    let a = http(router.admin, "GET", "/sinks", &[], b"");
    assert_eq!(a.status, 200, "{}", a.body);
    let doc: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    doc["sinks"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned().unwrap_or_else(|| panic!("{doc}"))
}

#[test]
fn a_paused_sink_gets_nothing_even_after_a_restart_and_resume_delivers_the_backlog() {
    let sink = SinkServer::start(200);
    let setup = Setup::new(&http_routes(&[("crm", sink.url("/hook")), ("archive", sink.url("/archive"))]), "");
    let router = setup.start();
    assert!(ok(&setup, &["pause", "crm"]).contains("paused crm"));
    assert_eq!(router.metric(r#"webio_router_sink_paused{sink="crm"}"#), Some(1.0));
    assert_eq!(router.metric(r#"webio_router_sink_paused{sink="archive"}"#), Some(0.0));

    let mut ids = post_all(&router, "held", 5);
    // The other sink is not held: it gets every event (twice the ids: one request per sink).
    wait_for("the unpaused sink", LIMIT, || sink.attempts() >= 5);
    std::thread::sleep(QUIET);
    assert_eq!(sink.attempts(), 5, "the paused sink got an attempt");
    let crm = sink_json(&setup, "crm");
    assert_eq!((crm["paused"].as_bool(), crm["pending"].as_u64()), (Some(true), Some(5)), "{crm}");
    assert!(crm["oldest_pending_seconds"].as_f64().is_some_and(|s| s >= 0.0), "{crm}");

    // A restart keeps the pause: the backlog waits, and so does what arrives meanwhile.
    assert!(router.terminate().success());
    let check = ok(&setup, &["spool", "check"]);
    assert!(check.contains("  crm: 5 (paused)"), "{check}");
    let router = setup.start();
    assert!(router.log().contains("sink is paused"), "{}", router.log());
    assert_eq!(router.metric(r#"webio_router_sink_paused{sink="crm"}"#), Some(1.0));
    ids.extend(post_all(&router, "during", 2));
    wait_for("the unpaused sink", LIMIT, || sink.attempts() >= 7);
    std::thread::sleep(QUIET);
    assert_eq!(sink.attempts(), 7, "the paused sink got an attempt after the restart");
    assert_eq!(sink_http(&router, "crm")["pending"].as_u64(), Some(7));

    assert!(ok(&setup, &["resume", "crm"]).contains("resumed crm"));
    wait_for("the backlog at the sink", LIMIT, || sink.attempts() >= 14);
    assert_eq!(sink.received_set(), ids);
    wait_for("an empty backlog", LIMIT, || sink_json(&setup, "crm")["pending"].as_u64() == Some(0));
    let crm = sink_json(&setup, "crm");
    assert_eq!(crm["paused"], false, "{crm}");
    assert!(crm["oldest_pending_seconds"].is_null(), "{crm}");
    assert_eq!(router.metric(r#"webio_router_sink_paused{sink="crm"}"#), Some(0.0));
    // An unknown sink is refused by name.
    let (code, _, err) = setup.run(&["pause", "crn"]);
    assert_eq!(code, 1);
    assert!(err.contains("no sink named \"crn\""), "{err}");
}

#[test]
fn sinks_and_get_sinks_show_the_state_and_the_admin_listener_changes_nothing() {
    let sink = SinkServer::start(503);
    let setup = Setup::new(&http_routes(&[("crm", sink.url("/hook"))]), "");
    let router = setup.start();
    post_all(&router, "failing", 2);
    wait_for("the last error", LIMIT, || {
        sink_json(&setup, "crm")["last_error"].as_str().is_some_and(|e| e.contains("503"))
    });
    for s in [sink_json(&setup, "crm"), sink_http(&router, "crm")] {
        assert_eq!(s["type"], "http", "{s}");
        assert_eq!((s["paused"].as_bool(), s["pending"].as_u64()), (Some(false), Some(2)), "{s}");
        assert!(s["oldest_pending_seconds"].as_f64().is_some(), "{s}");
        assert!(s["last_error"].as_str().unwrap().contains("503"), "{s}");
        assert!(s["up"].is_boolean(), "{s}");
    }
    let table = ok(&setup, &["sinks"]);
    assert!(table.lines().any(|l| l.starts_with("crm") && l.contains("503")), "{table}");

    // Nothing on the TCP admin listener changes a sink, whatever is asked.
    let pause = br#"{"cmd":"pause","sink":"crm"}"#;
    for (method, path) in [("POST", "/sinks"), ("POST", "/sinks/crm/pause"), ("PUT", "/sinks/crm"), ("POST", "/pause")]
    {
        let a = http(router.admin, method, path, &[("content-type", "application/json")], pause);
        assert!((400..500).contains(&a.status), "{method} {path}: {} {}", a.status, a.body);
    }
    assert_eq!(sink_http(&router, "crm")["paused"], false);
    assert_eq!(router.metric(r#"webio_router_sink_paused{sink="crm"}"#), Some(0.0));

    // Once the sink answers, the error is gone with the backlog.
    sink.set_status(200);
    wait_for("the backlog delivered", LIMIT, || sink_http(&router, "crm")["pending"].as_u64() == Some(0));
    assert!(sink_http(&router, "crm")["last_error"].is_null());
}

#[test]
fn replay_while_the_daemon_runs_delivers_the_dead_letter_once() {
    let sink = SinkServer::start(422);
    let setup = Setup::new(&http_routes(&[("crm", sink.url("/hook"))]), "");
    let router = setup.start();
    let id = router.post(&payload("refused", 1)).id();
    wait_for("a dead letter", LIMIT, || !setup.dead_letters().is_empty());
    wait_for("the pair to leave the spool", LIMIT, || sink_http(&router, "crm")["pending"].as_u64() == Some(0));
    assert!(sink_http(&router, "crm")["last_error"].as_str().is_some_and(|e| e.contains("422")));
    sink.set_status(200);
    std::fs::rename(setup.path("dead-letter.jsonl"), setup.path("fixed.jsonl")).unwrap();

    // Held by a pause, so that the second replay finds the first one still pending.
    ok(&setup, &["pause", "crm"]);
    let out = ok(&setup, &["replay", "fixed.jsonl"]);
    assert!(out.contains("replayed 1 dead letter(s) through the running daemon (crm: 1)"), "{out}");
    let out = ok(&setup, &["replay", "fixed.jsonl"]);
    assert!(out.contains("replayed 0") && out.contains("skipped 1 already pending"), "{out}");
    assert_eq!(sink_json(&setup, "crm")["pending"].as_u64(), Some(1));
    // A line for a sink routes.toml does not have is reported, not guessed at.
    let (code, _, err) = setup.run(&["replay", "fixed.jsonl", "--sink", "nope"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no sink named \"nope\""), "{err}");

    ok(&setup, &["resume", "crm"]);
    wait_for("the replayed event at the sink", LIMIT, || sink.received_set().contains(&id));
    wait_for("an empty spool", LIMIT, || sink_json(&setup, "crm")["pending"].as_u64() == Some(0));
    assert_eq!(sink.received(), vec![id], "delivered once");
    assert!(setup.dead_letters().is_empty(), "no new dead letter");
}

#[test]
fn sixty_events_through_a_sink_limited_to_20_per_second_take_at_least_2_s_and_none_is_lost() {
    let sink = SinkServer::start(200);
    let routes = format!(
        "[sinks.crm]\ntype = \"http\"\nurl = \"{}\"\nrate_limit = \"20/s\"\n\n[[routes]]\nname = \"all\"\nto = [\"crm\"]\n",
        sink.url("/hook")
    );
    let setup = Setup::new(&routes, "");
    let router = setup.start();
    // All 60 wait in the spool first, so that the sink, not the posting, sets the pace.
    ok(&setup, &["pause", "crm"]);
    let ids = post_all(&router, "paced", 60);
    let resumed = Instant::now();
    ok(&setup, &["resume", "crm"]);
    wait_for("all 60 at the sink", LIMIT, || sink.received().len() >= 60);
    let took = resumed.elapsed();
    // A burst of one second's worth (20), then 40 more 50 ms apart.
    assert!(took >= Duration::from_secs(2), "60 events at 20/s in {took:?}");
    assert_eq!(sink.received_set(), ids, "none lost");
    assert_eq!(sink.received().len(), 60, "none twice");
}

#[test]
fn concurrency_1_keeps_one_delivery_in_flight_where_an_unlimited_sink_has_many() {
    let (one, many) = (SinkServer::start(200), SinkServer::start(200));
    // Answers held long enough that deliveries allowed to overlap do.
    one.set_delay_ms(50);
    many.set_delay_ms(50);
    let routes = format!(
        "[sinks.one]\ntype = \"http\"\nurl = \"{}\"\nconcurrency = 1\n\n[sinks.many]\ntype = \"http\"\nurl = \"{}\"\n\n[[routes]]\nname = \"all\"\nto = [\"one\", \"many\"]\n",
        one.url("/one"),
        many.url("/many")
    );
    let setup = Setup::new(&routes, "");
    let router = setup.start();
    ok(&setup, &["pause", "one"]);
    ok(&setup, &["pause", "many"]);
    let ids = post_all(&router, "one-by-one", 30);
    ok(&setup, &["resume", "one"]);
    ok(&setup, &["resume", "many"]);
    wait_for("everything at both sinks", LIMIT, || one.received_set() == ids && many.received_set() == ids);
    assert_eq!(one.max_in_flight(), 1);
    // The check can see overlap: the sink without a limit gets a batch at once.
    assert!(many.max_in_flight() > 1, "{}", many.max_in_flight());
}

#[test]
fn check_and_explain_show_the_limits_and_a_bad_one_is_reported_at_its_line() {
    let routes = "[sinks.crm]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/x\"\nrate_limit = \"600/m\"\nconcurrency = 4\n\n[sinks.archive]\ntype = \"file\"\npath = \"var/x.jsonl\"\nconcurrency = 1\n\n[[routes]]\nname = \"all\"\nto = [\"crm\", \"archive\"]\n";
    let setup = Setup::new(routes, "");
    let out = ok(&setup, &["check"]);
    assert!(out.contains("sink crm: http (format event, rate limit 600/m, concurrency 4)"), "{out}");
    assert!(out.contains("sink archive: file (format event, concurrency 1)"), "{out}");
    std::fs::write(setup.path("in.json"), payload("x", 1)).unwrap();
    let out = ok(&setup, &["explain", "in.json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let crm = v["sinks"].as_array().unwrap().iter().find(|s| s["name"] == "crm").unwrap().clone();
    assert_eq!((crm["rate_limit"].as_str(), crm["concurrency"].as_u64()), (Some("600/m"), Some(4)), "{v}");

    let bad = routes.replace("\"600/m\"", "\"fast\"").replace("concurrency = 1", "concurrency = 0");
    std::fs::write(setup.path("routes.toml"), bad).unwrap();
    let (code, _, err) = setup.run(&["check"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("routes.toml:4:14: sinks.crm.rate_limit: invalid rate \"fast\""), "{err}");
    assert!(err.contains("routes.toml:10:15: sinks.archive.concurrency: must be between 1 and"), "{err}");
}

#[test]
fn direct_mode_honours_concurrency_too() {
    let sink = SinkServer::start(200);
    sink.set_delay_ms(20);
    let routes = format!(
        "[sinks.crm]\ntype = \"http\"\nurl = \"{}\"\nconcurrency = 1\n\n[[routes]]\nname = \"all\"\nto = [\"crm\"]\n",
        sink.url("/hook")
    );
    // The helpers' base configuration is direct mode: each webhook waits for its delivery.
    let router = crate::helpers::router("", &routes).spawn();
    let addr = router.addr;
    let posts: Vec<_> = (0..8)
        .map(|i| std::thread::spawn(move || crate::helpers::post(addr, payload("direct", i).as_bytes()).status))
        .collect();
    let statuses: Vec<u16> = posts.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    assert_eq!(sink.received().len(), 8);
    assert_eq!(sink.max_in_flight(), 1);
}
