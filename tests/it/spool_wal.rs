//! The spool's write-ahead file (`spool.wal`, issue 14): a batch is made durable by one frame
//! appended to it and one fdatasync and kept in memory (the memtable); redb gets it at the
//! checkpoint, about once a second. The real binary, real kill -9; no timing assertion.

use crate::helpers::spool::*;
use crate::helpers::tmpfs::Tmpfs;
use std::collections::BTreeSet;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// Bytes of the write-ahead file since its last checkpoint.
fn wal_bytes(router: &Router) -> f64 {
    router.metric("webio_router_spool_wal_bytes").unwrap_or(0.0)
}

/// The frames of the write-ahead file's log (start, end), walked by their headers (magic,
/// length, checksum) up to the end marker.
fn frames(setup: &Setup) -> Vec<(usize, usize)> {
    let bytes = std::fs::read(setup.path("spool/spool.wal")).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() >= at + 12 && bytes[at..at + 4] == *b"WwA2" {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        out.push((at, at + 12 + len));
        at += 12 + len;
    }
    out
}

/// Posts webhooks one after the other (a frame each) until the last few are in the
/// write-ahead file only (not checkpointed); returns the bodies and ids accepted.
fn post_into_the_wal(router: &Router, tag: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..2000 {
        let body = payload(tag, i);
        let a = router.post(&body);
        assert_eq!(a.status, 202, "{}", a.body);
        out.push((body, a.id()));
        // A checkpoint empties the file; keep going until the last few posts are only in it.
        if out.len() >= 10 && wal_bytes(router) > 0.0 {
            let before = wal_bytes(router);
            let mut tail = Vec::new();
            for j in 0..5 {
                let body = payload(&format!("{tag}-tail"), i * 10 + j);
                let a = router.post(&body);
                assert_eq!(a.status, 202, "{}", a.body);
                tail.push((body, a.id()));
            }
            out.extend(tail);
            if wal_bytes(router) > before {
                return out;
            }
        }
    }
    panic!("the write-ahead file never held events");
}

#[test]
fn events_only_in_the_write_ahead_file_are_delivered_after_kill_9_and_their_ids_stay_duplicates() {
    let port = free_port(); // the sink is down: nothing is delivered before the crash
    let setup = Setup::new(&http_routes(&[("crm", port.url("/hook"))]), "dedup_window = \"10m\"");
    let router = setup.start();
    let posted = post_into_the_wal(&router, "walkill");
    router.kill9();
    assert!(!frames(&setup).is_empty(), "the crash left events in the write-ahead file");

    let sink = SinkServer::start_on(port, 200);
    let router = setup.start();
    let ids: BTreeSet<String> = posted.iter().map(|(_, id)| id.clone()).collect();
    wait_for("every 202'd event at the sink after the restart", LIMIT, || sink.received_set().is_superset(&ids));
    let (body, id) = posted.last().unwrap();
    let again = router.post(body);
    assert_eq!(again.status, 200, "the last event's id survived the crash: {}", again.body);
    assert!(again.body.contains("duplicate") && again.id() == *id, "{}", again.body);
    assert!(router.log().contains("write-ahead file replayed"), "{}", router.log());
    wait_for("the backlog to be empty", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="crm"}"#) == Some(0.0)
    });
}

#[test]
fn a_torn_write_ahead_tail_is_dropped_with_a_warning_and_the_frames_before_it_are_kept() {
    for damage in ["truncate", "flip"] {
        let port = free_port();
        let setup = Setup::new(&http_routes(&[("crm", port.url("/hook"))]), "");
        let router = setup.start();
        let posted = post_into_the_wal(&router, damage);
        router.kill9();
        let wal = setup.path("spool/spool.wal");
        let mut bytes = std::fs::read(&wal).unwrap();
        let (_, end) = *frames(&setup).last().unwrap();
        // The last frame (the last webhook's) loses its end (the preallocated zeros are left
        // where its write stopped), or one of its bytes: as if its fdatasync had never
        // completed, so it was never acknowledged.
        match damage {
            "truncate" => bytes[end - 5..end].fill(0),
            _ => bytes[end - 3] ^= 0x40,
        }
        std::fs::write(&wal, &bytes).unwrap();

        let sink = SinkServer::start_on(port, 200);
        let router = setup.start();
        let (last, earlier) = posted.split_last().unwrap();
        let want: BTreeSet<String> = earlier.iter().map(|(_, id)| id.clone()).collect();
        wait_for("every earlier event at the sink", LIMIT, || sink.received_set().is_superset(&want));
        let log = router.log();
        assert!(log.contains("torn") && log.contains("WARN"), "{damage}: {log}");
        // The dropped one was "never acknowledged": its sender re-sends it, and it is new
        // (200 duplicate only if a checkpoint slipped in between the 202 and the kill).
        let again = router.post(&last.0);
        assert!(again.status == 202 || again.status == 200, "{damage}: {}", again.body);
        wait_for("the re-sent event", LIMIT, || sink.received_set().contains(&last.1));
        wait_for("the write-ahead file emptied by a checkpoint", LIMIT, || wal_bytes(&router) == 0.0);
    }
}

#[test]
fn spool_check_reports_the_write_ahead_events_without_writing_and_salvage_keeps_them() {
    let port = free_port();
    let setup = Setup::new(&http_routes(&[("crm", port.url("/hook"))]), "");
    let router = setup.start();
    let posted = post_into_the_wal(&router, "walcheck");
    router.kill9();
    let before = std::fs::read(setup.path("spool/spool.wal")).unwrap();
    assert!(!frames(&setup).is_empty());

    let (code, out, err) = setup.run(&["spool", "check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("write-ahead file: ") && out.contains("events not yet checkpointed"), "{out}");
    assert_eq!(std::fs::read(setup.path("spool/spool.wal")).unwrap(), before, "check writes nothing");

    let (code, out, err) = setup.run(&["spool", "salvage"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("moved the write-ahead file aside"), "{out}");
    assert!(!setup.path("spool/spool.wal").exists() || frames(&setup).is_empty());
    let aside: Vec<_> = std::fs::read_dir(setup.path("spool"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("spool.wal.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "kept beside the old spool file");

    let sink = SinkServer::start_on(port, 200);
    let router = setup.start();
    let ids: BTreeSet<String> = posted.iter().map(|(_, id)| id.clone()).collect();
    wait_for("every 202'd event delivered from the salvaged spool", LIMIT, || sink.received_set().is_superset(&ids));
    wait_for("the backlog to be empty", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="crm"}"#) == Some(0.0)
    });
}

#[test]
fn a_checkpoint_empties_the_write_ahead_file() {
    let sink = SinkServer::start(200);
    let setup = Setup::new(&http_routes(&[("crm", sink.url("/hook"))]), "");
    let router = setup.start();
    let mut ids = BTreeSet::new();
    let mut grew = false;
    for i in 0..200 {
        let a = router.post(&payload("ckpt", i));
        assert_eq!(a.status, 202, "{}", a.body);
        ids.insert(a.id());
        grew |= wal_bytes(&router) > 0.0;
    }
    assert!(grew, "batches went through the write-ahead file");
    wait_for("every event at the sink", LIMIT, || sink.received_set().is_superset(&ids));
    // Idle: the checkpoint about a second after the last commit without fsync empties it.
    wait_for("an empty write-ahead file", LIMIT, || wal_bytes(&router) == 0.0);
    let status = router.terminate();
    assert!(status.success(), "{status}");
    let (code, out, err) = setup.run(&["spool", "check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("write-ahead file"), "{out}");
}

#[test]
fn a_write_ahead_append_on_a_full_disk_answers_503_heals_and_loses_nothing() {
    let fs = Tmpfs::mount("4m");
    let sink = SinkServer::start(503);
    let setup = Setup::with(&http_routes(&[("crm", sink.url("/hook"))]), "", "", Some(&fs.path().join("spool")));
    let router = setup.start();
    let mut accepted = post_all(&router, "before", 5);
    // Right after a checkpoint, so that the next ones (a second away) do not come first: the
    // posts below then go through the write-ahead file, whose append meets the full disk.
    wait_for("a checkpoint", LIMIT, || wal_bytes(&router) == 0.0);
    fs.fill();
    let mut refused = None;
    for i in 0..5000 {
        let a = router.post(&payload("full", i));
        match a.status {
            202 => {
                accepted.insert(a.id());
            }
            503 => {
                refused = Some(a);
                break;
            }
            s => panic!("unexpected {s}: {}", a.body),
        }
    }
    let refused = refused.expect("the spool never refused on a full disk");
    assert!(refused.header("retry-after").is_some(), "{}", refused.head);
    let (code, ready) = router.readyz();
    assert_eq!(code, 503, "{ready}");
    // The writer logs the failed commit after it answered the refusal: wait for the line.
    wait_for("the failed write-ahead append in the log", LIMIT, || {
        let log = router.log();
        log.contains("write-ahead file write") || log.contains("write-ahead file fdatasync")
    });

    fs.free();
    accepted_again(&router, &mut accepted, LIMIT);
    // The heal wrote what the reopen rolled back (acknowledged through the write-ahead file)
    // back into redb: a crash now loses none of it.
    router.kill9();
    let router = setup.start();
    all_delivered(&setup, &router, &sink, &accepted, LIMIT);
}

#[test]
fn a_full_disk_under_a_preallocated_write_ahead_file_fails_the_checkpoint_heals_and_loses_nothing() {
    // Room for the preallocation: the appends keep working on the full disk; redb's durable
    // commits (the checkpoints) are what fail. The heal reopens redb (rolled back to its last
    // checkpoint) and must write back what only the write-ahead file held.
    let fs = Tmpfs::mount("16m");
    let sink = SinkServer::start(503);
    let setup = Setup::with(&http_routes(&[("crm", sink.url("/hook"))]), "", "", Some(&fs.path().join("spool")));
    let router = setup.start();
    let mut accepted = post_all(&router, "before", 5);
    fs.fill();
    let mut refused = false;
    for i in 0..20000 {
        let a = router.post(&payload("full", i));
        match a.status {
            202 => {
                accepted.insert(a.id());
            }
            503 => {
                refused = true;
                break;
            }
            s => panic!("unexpected {s}: {}", a.body),
        }
        if i % 200 == 199 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    assert!(refused, "the spool never refused on a full disk");
    assert_eq!(router.readyz().0, 503);
    fs.free();
    accepted_again(&router, &mut accepted, LIMIT);
    router.kill9();
    let router = setup.start();
    all_delivered(&setup, &router, &sink, &accepted, LIMIT);
}

/// Deliveries done (rows of `Done` bookkeeping) in the write-ahead file's log, whether `seq`
/// is one of them, and the generation of its frames.
fn logged_deliveries(setup: &Setup, seq: u64) -> (u64, bool, Option<u64>) {
    use webio_router::delivery::spool::wal::{self, Bookkeeping};
    let d = wal::read(&setup.path("spool")).unwrap();
    let done = d.frames.iter().map(|f| f.book_rows().0).sum();
    let has = d
        .frames
        .iter()
        .flat_map(|f| &f.book)
        .any(|b| matches!(b, Bookkeeping::Done { seqs, .. } if seqs.contains(&seq)));
    (done, has, d.frames.first().and_then(|f| f.gen))
}

#[test]
fn deliveries_recorded_only_in_the_write_ahead_file_are_not_repeated_after_kill_9() {
    const N: usize = 40;
    let out = tempfile::tempdir().unwrap();
    let lines_path = out.path().join("events.jsonl");
    let routes = format!(
        "[sinks.archive]\ntype = \"file\"\npath = \"{}\"\n\n[[routes]]\nname = \"all\"\nto = [\"archive\"]\n",
        lines_path.display()
    );
    let lines = || std::fs::read_to_string(&lines_path).map(|s| s.lines().count()).unwrap_or(0);
    let setup = Setup::new(&routes, "");
    let router = setup.start();
    post_all(&router, "walbook", N);
    wait_for("every event in the file sink", LIMIT, || lines() == N);
    // The deliveries are recorded (about DEFER_FOR later) by frames of the write-ahead file,
    // and in redb durably only at the next checkpoint (about a second later): kill -9 as soon
    // as the last one (seq N - 1, a new spool starts at 0) is in a frame. A checkpoint
    // slipping in between changes nothing below (the frame stays in the file: nothing
    // overwrites it while nothing happens).
    let last = N as u64 - 1;
    wait_for("the last delivery in the write-ahead file", LIMIT, || logged_deliveries(&setup, last).1);
    router.kill9();

    // `spool check` reports them, unless a checkpoint covered them before the kill.
    let (done, _, gen) = logged_deliveries(&setup, last);
    let current = {
        let (db, _) = webio_router::delivery::spool::store::open_db_unreplayed(&setup.path("spool")).unwrap();
        webio_router::delivery::spool::wal::current_generation(&db).unwrap()
    };
    let (code, report, err) = setup.run(&["spool", "check"]);
    assert_eq!(code, 0, "{report}{err}");
    if gen == Some(current) {
        assert!(report.contains(&format!("write-ahead file: {done} deliveries and ")), "{report}");
    }

    let router = setup.start();
    // Give a repeat every chance to show: the backlog is empty, and an event posted after
    // the restart comes after any repeat in the file.
    wait_for("the backlog to be empty", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="archive"}"#).unwrap_or(0.0) == 0.0
    });
    let more = post_all(&router, "walbook-after", 1);
    assert_eq!(more.len(), 1);
    wait_for("the event posted after the restart", LIMIT, || lines() > N);
    assert_eq!(lines(), N + 1, "every event exactly once: nothing delivered twice after the kill");
    router.terminate();
}

#[test]
fn an_event_delivered_to_one_sink_before_a_crash_goes_to_the_other_after_it_and_not_twice_to_the_first() {
    // Each event is for a file sink (up) and an HTTP sink (down): since the last checkpoint
    // it lives in the memtable and the write-ahead file only, the file sink's deliveries
    // remove its row there, the other row stays. After kill -9 the replay rebuilds exactly
    // that: the HTTP sink gets every event, the file sink none again.
    const N: usize = 30;
    let out = tempfile::tempdir().unwrap();
    let lines_path = out.path().join("events.jsonl");
    let port = free_port();
    let routes = format!(
        "[sinks.archive]\ntype = \"file\"\npath = \"{}\"\n\n[sinks.crm]\ntype = \"http\"\nurl = \"{}\"\ntimeout = \"2s\"\n\n[[routes]]\nname = \"all\"\nto = [\"archive\", \"crm\"]\n",
        lines_path.display(),
        port.url("/hook")
    );
    let lines = || std::fs::read_to_string(&lines_path).map(|s| s.lines().count()).unwrap_or(0);
    let setup = Setup::new(&routes, "");
    let router = setup.start();
    let ids = post_all(&router, "walboth", N);
    wait_for("every event in the file sink", LIMIT, || lines() == N);
    let last = N as u64 - 1;
    wait_for("the last file delivery in the write-ahead file", LIMIT, || logged_deliveries(&setup, last).1);
    router.kill9();

    let sink = SinkServer::start_on(port, 200);
    let router = setup.start();
    wait_for("every event at the HTTP sink after the restart", LIMIT, || sink.received_set().is_superset(&ids));
    wait_for("the backlog to be empty", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="crm"}"#).unwrap_or(0.0) == 0.0
            && router.metric(r#"webio_router_spool_pending{sink="archive"}"#).unwrap_or(0.0) == 0.0
    });
    let more = post_all(&router, "walboth-after", 1);
    wait_for("the event posted after the restart", LIMIT, || lines() > N);
    assert_eq!(lines(), N + 1, "the file sink got every event exactly once");
    wait_for("the HTTP sink's last event", LIMIT, || sink.received_set().is_superset(&more));
    router.terminate();
}

#[test]
fn the_writers_series_count_every_event_and_frame_and_follow_the_write_ahead_file() {
    // The writer keeps its metric handles (made once, not per batch): the series still move
    // with every event, every frame and every checkpoint, and two sinks' pending gauges each
    // follow their own queue.
    const N: usize = 40;
    let (a, b) = (SinkServer::start(200), SinkServer::start(200));
    let setup = Setup::new(&http_routes(&[("crm", a.url("/hook")), ("erp", b.url("/hook"))]), "");
    let router = setup.start();
    assert_eq!(router.metric("webio_router_spool_appends_total"), Some(0.0));
    let ids = post_all(&router, "series", N);
    wait_for("every event at both sinks", LIMIT, || {
        a.received_set().is_superset(&ids) && b.received_set().is_superset(&ids)
    });
    assert_eq!(router.metric("webio_router_spool_appends_total"), Some(N as f64));
    let flushes = router.metric("webio_router_spool_flushes_total").unwrap_or(0.0);
    assert!((1.0..=N as f64 + 50.0).contains(&flushes), "{flushes}");
    wait_for("both sinks' pending gauges at zero", LIMIT, || {
        router.metric(r#"webio_router_spool_pending{sink="crm"}"#) == Some(0.0)
            && router.metric(r#"webio_router_spool_pending{sink="erp"}"#) == Some(0.0)
    });
    wait_for("an empty write-ahead file after the checkpoint", LIMIT, || wal_bytes(&router) == 0.0);
    wait_for("the spool's bytes back to zero", LIMIT, || router.metric("webio_router_spool_bytes") == Some(0.0));
    router.terminate();
}
