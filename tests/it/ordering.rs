//! `ordering = "conversation"` (issue 15, README "Ordering"): a conversation's events reach
//! the sink in acceptance order even through retries and a restart, while other
//! conversations flow on. The real binary, with its spool; the sink checks the order itself
//! (an event arriving before an earlier one of its conversation was confirmed is a violation,
//! whatever the timing), so nothing here depends on the machine's speed.

use crate::helpers::conversation_sink::ConversationSink;
use crate::helpers::spool::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn routes(url: &str) -> String {
    format!(
        "[sinks.crm]\ntype = \"http\"\nurl = \"{url}\"\ntimeout = \"2s\"\nordering = \"conversation\"\n\n[[routes]]\nname = \"all\"\nto = [\"crm\"]\n"
    )
}

/// An inbound message of conversation `conv-<letter>` whose body is `body` (`A1`, …).
fn message(body: &str) -> String {
    let letter = &body[..1];
    format!(
        r#"{{"type":"inboundMessage","conversationId":"conv-{letter}","communicationActionId":"{body}","body":"{body}","dateCreated":"2021-01-28 12:22:15.397"}}"#
    )
}

fn post_all(router: &Router, bodies: &[&str]) {
    for b in bodies {
        let a = router.post(&message(b));
        assert_eq!(a.status, 202, "{b}: {}", a.body);
    }
}

#[test]
fn a_conversation_arrives_in_order_through_retries_while_another_flows_on() {
    let sink = ConversationSink::start();
    // A1 is answered 500 three times, and then until B's events are in (B must not wait
    // for A: if it did, this would time out).
    sink.fail("A1", 3);
    sink.after("A1", &["B1", "B2"]);
    let setup = Setup::new(&routes(&sink.url()), "");
    let router = setup.start();

    post_all(&router, &["A1", "A2", "A3", "B1", "B2"]);
    sink.wait_confirmed(5, LIMIT);

    assert_eq!(sink.violations(), Vec::<String>::new());
    assert_eq!(sink.confirmed_of('A'), ["A1", "A2", "A3"]);
    assert_eq!(sink.confirmed_of('B'), ["B1", "B2"]);
    let confirmed = sink.confirmed();
    let at = |b: &str| confirmed.iter().position(|c| c == b).unwrap();
    assert!(at("B2") < at("A1"), "B before A1 succeeded: {confirmed:?}");
    assert!(sink.attempts("A1") >= 4, "A1 failed three times first: {:?}", sink.arrived());
    for later in ["A2", "A3"] {
        assert_eq!(sink.attempts(later), 1, "{later} waited for A1: {:?}", sink.arrived());
    }
    wait_for("an empty spool", LIMIT, || router.metric("webio_router_spool_pending{sink=\"crm\"}") == Some(0.0));
    assert!(setup.dead_letters().is_empty());
}

#[test]
fn the_order_holds_across_a_restart() {
    let port = free_port();
    let url = port.url("/hook");
    let setup = Setup::new(&routes(&url), "");
    let router = setup.start();
    // The sink is down: everything is accepted and waits in the spool.
    post_all(&router, &["A1", "B1", "A2", "A3", "B2"]);
    wait_for("the pending events", LIMIT, || router.metric("webio_router_spool_pending{sink=\"crm\"}") == Some(5.0));
    let status = router.terminate();
    assert!(status.success(), "{status}");

    // A new process reads the pending events back from disk; then the sink comes up, and
    // A1 still fails twice.
    let router = setup.start();
    let sink = ConversationSink::serve(port.listen());
    sink.fail("A1", 2);
    sink.wait_confirmed(5, LIMIT);
    assert_eq!(sink.violations(), Vec::<String>::new());
    assert_eq!(sink.confirmed_of('A'), ["A1", "A2", "A3"]);
    assert_eq!(sink.confirmed_of('B'), ["B1", "B2"]);
    wait_for("an empty spool", LIMIT, || router.metric("webio_router_spool_pending{sink=\"crm\"}") == Some(0.0));
}

#[test]
fn check_shows_the_ordering_and_direct_mode_refuses_it_at_the_option() {
    let setup = Setup::new(&routes("http://127.0.0.1:9/hook"), "");
    let (code, stdout, stderr) = setup.run(&["check"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("sink crm: http (format event, ordering conversation)"), "{stdout}");
    std::fs::write(setup.path("a1.json"), message("A1")).unwrap();
    let (code, stdout, stderr) = setup.run(&["explain", "a1.json"]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["sinks"][0]["ordering"], "conversation", "{stdout}");
    assert_eq!(v["event"]["conversationId"], "conv-A", "{stdout}");

    let direct = Setup::new(&routes("http://127.0.0.1:9/hook"), "");
    let config = std::fs::read_to_string(direct.path("webio-router.toml")).unwrap();
    let config = config.replacen("mode = \"spool\"", "mode = \"direct\"", 1);
    std::fs::write(direct.path("webio-router.toml"), config).unwrap();
    let (code, _, stderr) = direct.run(&["check"]);
    assert_eq!(code, 2, "{stderr}");
    let routes_file = direct.path("routes.toml").display().to_string();
    assert!(stderr.contains(&format!("{routes_file}:5:12: sinks.crm.ordering: ")), "{stderr}");
    assert!(stderr.contains("delivery.mode = \"spool\""), "{stderr}");
    let started = direct.try_start();
    assert!(started.is_err(), "serve refuses it too");
}

#[test]
fn a_reload_that_adds_ordering_in_direct_mode_is_refused_and_the_old_routes_stay() {
    use crate::helpers::{post, router};
    const ROUTES: &str = "[sinks.a]\ntype = \"file\"\npath = \"{dir}/a.jsonl\"\n[[routes]]\nto = [\"a\"]\n";
    // The helpers' base configuration is direct mode.
    let r = router("", ROUTES).spawn();
    let ordered = ROUTES.replace("a.jsonl\"\n", "a.jsonl\"\nordering = \"conversation\"\n");
    std::fs::write(r.path("routes.toml"), ordered.replace("{dir}", &r.dir.path().display().to_string())).unwrap();
    r.signal("HUP");
    r.wait_log("reload refused", Duration::from_secs(10));
    assert!(r.log_text().contains("sinks.a.ordering: "), "{}", r.log_text());
    assert_eq!(post(r.addr, message("A1").as_bytes()).status, 202, "the old routes stay in force");
}
