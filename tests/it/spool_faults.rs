//! Fault tests of the spool (issue 4): the real binary, real sockets, real kill -9.
//! No timing assertions: "promptly" means "before the generous deadline of `wait_for`".

use crate::helpers::spool::*;
use std::collections::BTreeSet;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn events_accepted_while_a_sink_answers_503_all_arrive_once_it_answers_200() {
    let sink = SinkServer::start(503);
    let setup = Setup::new(&http_routes(&[("crm", sink.url("/hook"))]), "");
    let router = setup.start();
    let ids = post_all(&router, "flaky", 20);
    wait_for("the sink to be tried", LIMIT, || sink.attempts() >= 3);
    assert!(sink.received().is_empty());
    sink.set_status(200);
    wait_for("every accepted event at the sink", LIMIT, || sink.received_set() == ids);
    wait_for("the backlog to be empty", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="crm"}"#) == Some(0.0)
    });
    assert!(router.metric(r#"webio_router_deliveries_total{sink="crm",outcome="retry"}"#).unwrap_or(0.0) >= 1.0);
    assert!(setup.dead_letters().is_empty());
}

#[test]
fn every_event_that_got_202_arrives_after_kill_9_while_the_sink_was_down() {
    let port = free_port(); // nothing listens: connection refused
    let setup = Setup::new(&http_routes(&[("crm", port.url("/hook"))]), "");
    let router = setup.start();
    // Concurrent webhooks, so that several share a commit.
    let ids: BTreeSet<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let router = &router;
                s.spawn(move || {
                    (0..10)
                        .filter_map(|i| {
                            let a = router.post(&payload(&format!("crash{t}"), i));
                            (a.status == 202).then(|| a.id())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(ids.len(), 80, "every webhook was accepted");
    router.kill9();

    let sink = SinkServer::start_on(port, 200);
    let router = setup.start();
    wait_for("every 202'd event at the sink after the restart", LIMIT, || sink.received_set().is_superset(&ids));
    wait_for("the backlog to be empty", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="crm"}"#) == Some(0.0)
    });
}

#[test]
fn three_kill_9_during_load_lose_no_event_that_got_202() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    let sink = SinkServer::start(200);
    let setup = Setup::new(&http_routes(&[("crm", sink.url("/hook"))]), "");
    let mut router = setup.start();
    let hook = Mutex::new(router.hook);
    let accepted = Mutex::new(BTreeSet::new());
    let stop = AtomicBool::new(false);
    let accepted_len = || accepted.lock().unwrap().len();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (hook, accepted, stop) = (&hook, &accepted, &stop);
            s.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Acquire) {
                    let addr = *hook.lock().unwrap();
                    match try_post(addr, &payload(&format!("load{t}"), i)) {
                        Some(a) if a.status == 202 => {
                            accepted.lock().unwrap().insert(a.id());
                        }
                        // Killed mid-request, or not up yet: the sender would retry later.
                        _ => std::thread::sleep(Duration::from_millis(10)),
                    }
                    i += 1;
                }
            });
        }
        for _ in 0..3 {
            let before = accepted_len();
            wait_for("webhooks accepted under load", LIMIT, || accepted_len() >= before + 300);
            router.kill9_in_place();
            router = setup.start();
            *hook.lock().unwrap() = router.hook;
        }
        let before = accepted_len();
        wait_for("webhooks accepted after the last restart", LIMIT, || accepted_len() >= before + 300);
        stop.store(true, Ordering::Release);
    });
    let accepted = accepted.into_inner().unwrap();
    wait_for("every event that got 202 at the sink", LIMIT, || sink.received_set().is_superset(&accepted));
    wait_for("the backlog to be empty", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="crm"}"#) == Some(0.0)
    });
}

#[test]
fn a_dead_sink_does_not_delay_a_healthy_one() {
    let dead_port = free_port();
    let live = SinkServer::start(200);
    let setup = Setup::new(&http_routes(&[("dead", dead_port.url("/x")), ("live", live.url("/y"))]), "");
    let router = setup.start();
    let ids = post_all(&router, "split", 40);
    wait_for("the healthy sink to have everything", LIMIT, || live.received_set() == ids);
    wait_for("the dead sink's backlog to show", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="dead"}"#) == Some(40.0)
    });
    // The live sink has every event, but its drain may not have taken the last round's answers
    // yet: wait for its gauge (it reaches 0 while the dead sink's backlog stays).
    wait_for("the healthy sink's pending count to reach 0", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="live"}"#) == Some(0.0)
    });
    assert!(router.metric(r#"webio_router_deliveries_total{sink="dead",outcome="retry"}"#).unwrap_or(0.0) >= 1.0);
}

#[test]
fn a_sink_answering_422_gets_a_dead_letter_with_the_reason_and_replay_delivers_it_after_the_fix() {
    let sink = SinkServer::start(422);
    let setup = Setup::new(&http_routes(&[("crm", sink.url("/hook"))]), "");
    let router = setup.start();
    let id = router.post(&payload("refused", 1)).id();
    wait_for("a dead letter", LIMIT, || !setup.dead_letters().is_empty());
    let letters = setup.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert_eq!(l["sink"], "crm");
    assert_eq!(l["attempts"], 1, "a permanent error is not retried");
    assert!(l["reason"].as_str().unwrap().contains("422"), "{l}");
    assert_eq!(l["event"]["id"], id.as_str());
    assert!(l["raw"].as_str().unwrap().contains("hello refused 1"));
    wait_for("the pair to leave the spool", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="crm"}"#) == Some(0.0)
    });
    assert_eq!(router.metric(r#"webio_router_deliveries_total{sink="crm",outcome="dead"}"#), Some(1.0));

    // Replay while the daemon runs (through its control socket): tests/it/operate.rs.
    assert!(router.terminate().success());
    sink.set_status(200);
    std::fs::rename(setup.path("dead-letter.jsonl"), setup.path("fixed.jsonl")).unwrap();
    let (code, out, err) = setup.run(&["replay", "fixed.jsonl"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("replayed 1"), "{out}");
    let (code, _, err) = setup.run(&["replay", "fixed.jsonl", "--sink", "nope"]);
    assert_eq!(code, 2, "{err}");

    let _router = setup.start();
    wait_for("the replayed event at the sink", LIMIT, || sink.received_set().contains(&id));
}

#[test]
fn over_max_spool_bytes_webhooks_get_503_with_retry_after_then_are_accepted_once_the_sink_drains() {
    let sink = SinkServer::start(503);
    let setup = Setup::new(&http_routes(&[("crm", sink.url("/hook"))]), "max_spool_bytes = 6000");
    let router = setup.start();
    let mut accepted = BTreeSet::new();
    let mut refused = None;
    for i in 0..200 {
        let a = router.post(&payload("full", i));
        if a.status == 503 {
            refused = Some(a);
            break;
        }
        assert_eq!(a.status, 202, "{}", a.body);
        accepted.insert(a.id());
    }
    let refused = refused.expect("the spool filled up");
    assert!(refused.header("retry-after").is_some(), "{}", refused.head);
    assert!(!accepted.is_empty());

    sink.set_status(200);
    wait_for("everything accepted to arrive", LIMIT, || sink.received_set() == accepted);
    let mut n = 1000;
    wait_for("new webhooks to be accepted again", LIMIT, || {
        n += 1;
        router.post(&payload("full", n)).status == 202
    });
}

#[test]
fn a_redelivery_after_a_crash_and_restart_is_still_a_duplicate() {
    let sink = SinkServer::start(200);
    let setup = Setup::new(&http_routes(&[("crm", sink.url("/hook"))]), "dedup_window = \"10m\"");
    let router = setup.start();
    let body = payload("again", 7);
    let first = router.post(&body);
    assert_eq!(first.status, 202);
    router.kill9();

    let router = setup.start();
    let again = router.post(&body);
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(again.body.contains("duplicate"), "{}", again.body);
    assert_eq!(again.id(), first.id());
}

#[test]
fn sigterm_with_a_sink_down_exits_0_and_the_next_start_delivers_the_rest() {
    let port = free_port();
    let setup = Setup::new(&http_routes(&[("crm", port.url("/hook"))]), "");
    let router = setup.start();
    let ids = post_all(&router, "term", 5);
    let status = router.terminate();
    assert!(status.success(), "exit status {status}");

    let sink = SinkServer::start_on(port, 200);
    let _router = setup.start();
    wait_for("the events kept over the restart", LIMIT, || sink.received_set() == ids);
}

#[test]
fn a_damaged_spool_file_stops_the_start_with_a_message_naming_it() {
    let setup = Setup::new(&http_routes(&[("crm", "http://127.0.0.1:9/x".into())]), "");
    std::fs::create_dir_all(setup.path("spool")).unwrap();
    let garbage: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(setup.path("spool/spool.redb"), &garbage).unwrap();
    let err = match setup.try_start() {
        Ok(r) => panic!("started on a damaged spool:\n{}", r.log()),
        Err(e) => e,
    };
    assert!(err.contains("spool.redb") && err.contains("damaged"), "{err}");
    assert!(!err.contains("exited with exit status: 0"), "{err}");
    assert_eq!(std::fs::read(setup.path("spool/spool.redb")).unwrap(), garbage, "the file is left untouched");
}

#[test]
fn a_sink_removed_by_a_reload_keeps_its_pending_work_until_it_comes_back() {
    let port = free_port();
    let other = SinkServer::start(200);
    let both = http_routes(&[("crm", port.url("/hook")), ("other", other.url("/o"))]);
    let setup = Setup::new(&both, "");
    let router = setup.start();
    let ids = post_all(&router, "reload", 5);
    wait_for("the other sink to have everything", LIMIT, || other.received_set() == ids);

    std::fs::write(setup.path("routes.toml"), http_routes(&[("other", other.url("/o"))])).unwrap();
    let hup = |r: &Router| {
        assert!(std::process::Command::new("kill")
            .arg("-HUP")
            .arg(r.child.id().to_string())
            .status()
            .unwrap()
            .success())
    };
    hup(&router);
    wait_for("a warning about the removed sink", LIMIT, || {
        router.log().contains("pending deliveries stay in the spool")
    });
    assert_eq!(router.metric(r#"webio_router_spool_pending{sink="crm"}"#), Some(5.0));

    let crm = SinkServer::start_on(port, 200);
    std::fs::write(setup.path("routes.toml"), &both).unwrap();
    hup(&router);
    wait_for("the kept work at the sink once it is back", LIMIT, || crm.received_set() == ids);
}
