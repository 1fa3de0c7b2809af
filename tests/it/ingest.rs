//! README "Custom Value Requests and SFTP hooks", SFTP hooks: `*.json` files in `ingest.dir` (one call, or an array of calls) are
//! routed like POSTs with `auth.organisation_id`, moved to `done/` once taken, to `rejected/`
//! when they are not webhook calls, and read only once complete. Behaviour in-process;
//! metrics against the real binary.

use crate::helpers::*;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

const ARCHIVE: &str = r#"
[sinks.archive]
type = "file"
path = "{dir}/var/events.jsonl"

[[routes]]
to = ["archive"]
"#;

/// A full configuration (its own `[auth]`, so the helpers do not add theirs).
fn config(mode: &str, poll: &str) -> String {
    format!(
        r#"
routes_file = "{{dir}}/routes.toml"
[auth]
secrets = ["{SECRET}"]
organisation_id = "42"
[delivery]
mode = "{mode}"
spool_dir = "{{dir}}/spool"
dead_letter_file = "{{dir}}/var/dead-letter.jsonl"
[ingest]
dir = "{{dir}}/inbox"
poll = "{poll}"
"#
    )
}

const ONE: &str = r#"{"type":"inboundMessage","conversationId":"97847","communicationActionId":"220859","body":"hi","dateCreated":"2021-01-28 12:21:28.373"}"#;
const SENT: &str =
    r#"{"type":"messageSend","conversationId":"97847","communicationActionId":"220860","statusCode":"1"}"#;
const DELIVERED: &str =
    r#"{"type":"messageStatusUpdate","conversationId":"97847","communicationActionId":"220860","statusCode":"2"}"#;

/// File names in `dir` (none when it does not exist), sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    n.sort();
    n
}

/// The `*.json` files still waiting in the inbox.
fn waiting(inbox: &Path) -> Vec<String> {
    names(inbox).into_iter().filter(|n| n.ends_with(".json") && !n.starts_with('.')).collect()
}

#[test]
fn sftp_hook_files_become_events_with_the_configured_organisation_and_leave_the_inbox() {
    let app = spawn_app(&config("direct", "100ms"), ARCHIVE);
    let inbox = app.path("inbox");
    // Names that are never read, there before the calls arrive.
    for ignored in [".hidden.json", "upload.json.part", "upload.json.filepart", "upload.json.tmp", "notes.txt"] {
        fs::write(inbox.join(ignored), ONE).unwrap();
    }
    // One call renamed into place (as SFTP clients do), an array written in place, a bad file.
    fs::write(inbox.join("one.json.part"), ONE).unwrap();
    fs::rename(inbox.join("one.json.part"), inbox.join("one.json")).unwrap();
    fs::write(inbox.join("many.json"), format!("[\n  {SENT},\n  {DELIVERED}\n]\n")).unwrap();
    fs::write(inbox.join("bad.json"), "this is not JSON").unwrap();

    wait_until("the inbox empties", Duration::from_secs(20), || waiting(&inbox).is_empty());
    let events = app.jsonl("var/events.jsonl");
    let types: Vec<_> = events.iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect();
    assert_eq!(events.len(), 3, "{types:?}");
    for t in ["inboundMessage", "messageSend", "messageStatusUpdate"] {
        assert!(types.iter().any(|x| x == t), "{t} in {types:?}");
    }
    assert!(events.iter().all(|e| e["organisationId"] == "42"), "{events:?}");
    assert_eq!(names(&inbox.join("done")), ["many.json", "one.json"]);
    assert_eq!(names(&inbox.join("rejected")), ["bad.json"]);
    assert_eq!(fs::read_to_string(inbox.join("rejected/bad.json")).unwrap(), "this is not JSON", "kept as it was");
    for ignored in [".hidden.json", "upload.json.part", "upload.json.filepart", "upload.json.tmp", "notes.txt"] {
        assert!(inbox.join(ignored).exists(), "{ignored} was left alone");
    }

    // The same calls POSTed afterwards are the same events: duplicates.
    for call in [ONE, SENT] {
        let resp = app.post(call.as_bytes());
        assert_eq!((resp.status, resp.json()["status"].as_str()), (200, Some("duplicate")), "{}", resp.body);
    }
    let inbound = events.iter().find(|e| e["type"] == "inboundMessage").unwrap();
    assert_eq!(app.post(ONE.as_bytes()).json()["id"], inbound["id"]);
    assert_eq!(app.jsonl("var/events.jsonl").len(), 3, "nothing sent twice");
}

#[test]
fn a_file_still_being_written_is_not_read_early() {
    let app = spawn_app(&config("direct", "1s"), ARCHIVE);
    let inbox = app.path("inbox");
    let mut slow = fs::File::create(inbox.join("slow.json")).unwrap();
    slow.write_all(format!("[{SENT}").as_bytes()).unwrap();
    // The writer keeps adding (whitespace) while two other files are taken, each after at
    // least one full poll interval: the poller looked at the unfinished file more than once.
    for marker in ["marker-1.json", "marker-2.json"] {
        fs::write(inbox.join(marker), format!(r#"{{"type":"payment","marker":"{marker}"}}"#)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !inbox.join("done").join(marker).exists() {
            assert!(std::time::Instant::now() < deadline, "{marker} was not taken");
            slow.write_all(b" ").unwrap();
            // The pace of a slow upload, well inside one poll interval.
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(inbox.join("slow.json").exists(), "the unfinished file is still waiting");
        assert!(names(&inbox.join("rejected")).is_empty(), "the unfinished file was not read");
    }
    assert_eq!(app.jsonl("var/events.jsonl").len(), 2, "only the markers so far");
    slow.write_all(format!(",{DELIVERED}]").as_bytes()).unwrap();
    drop(slow);
    wait_until("the finished file is taken", Duration::from_secs(20), || inbox.join("done/slow.json").exists());
    assert_eq!(app.jsonl("var/events.jsonl").len(), 4);
    assert!(names(&inbox.join("rejected")).is_empty());
}

#[test]
fn a_file_whose_delivery_is_refused_stays_and_is_taken_at_a_later_poll() {
    let sink = Capture::start(503);
    let routes = format!("[sinks.crm]\ntype = \"http\"\nurl = \"{}\"\n[[routes]]\nto = [\"crm\"]\n", sink.url("/in"));
    let app = spawn_app(&config("direct", "100ms"), &routes);
    let inbox = app.path("inbox");
    fs::write(inbox.join("call.json"), format!("[{SENT},{DELIVERED}]")).unwrap();
    wait_until("the delivery is tried again at a later poll", Duration::from_secs(20), || sink.received().len() >= 2);
    assert_eq!(waiting(&inbox), ["call.json"], "the refused file stays in the inbox");
    assert!(names(&inbox.join("done")).is_empty());
    sink.set_status(200);
    wait_until("the file is taken once the sink accepts", Duration::from_secs(20), || {
        inbox.join("done/call.json").exists()
    });
    let got = sink.received();
    let last_two: Vec<_> = got[got.len() - 2..].iter().map(|c| c.json()["type"].as_str().unwrap().to_owned()).collect();
    assert_eq!(last_two, ["messageSend", "messageStatusUpdate"], "the calls go out in file order");
    assert!(names(&inbox.join("rejected")).is_empty());
}

#[test]
fn ingested_files_are_spooled_and_counted_by_outcome() {
    let r = router(&config("spool", "100ms"), ARCHIVE).spawn();
    let metric = |o: &str| r.metric(&format!("webio_router_ingested_files_total{{outcome=\"{o}\"}}"));
    assert!(r.metrics().contains("webio_router_ingested_files_total{outcome=\"rejected\"} 0"), "pre-set");
    let inbox = r.path("inbox");
    fs::write(inbox.join("a.json"), ONE).unwrap();
    fs::write(inbox.join("b.json"), r#"[{"type":"payment"}, {"notype":1}]"#).unwrap();
    wait_until("both files are handled", Duration::from_secs(20), || metric("ok") + metric("rejected") >= 2.0);
    assert_eq!((metric("ok"), metric("rejected")), (1.0, 1.0));
    wait_until("the spooled event reaches the sink", Duration::from_secs(20), || {
        r.jsonl("var/events.jsonl").len() == 1
    });
    assert_eq!(r.jsonl("var/events.jsonl")[0]["organisationId"], "42");
    assert_eq!(names(&inbox.join("rejected")), ["b.json"], "a file with one bad call is refused whole");
    r.wait_log("call 1: body has no `type` field", Duration::from_secs(5));
}

#[test]
fn check_lists_the_custom_values_and_ingest_sections() {
    let cfg = format!(
        "{}[custom_values]\nupstream = \"http://127.0.0.1:9000/values\"\nheaders = {{ \"x-api-key\" = \"${{CHECK_TEST_KEY}}\" }}\n",
        config("direct", "2s")
    );
    let (dir, cfg, _) = router(&cfg, ARCHIVE).write();
    let out = std::process::Command::new(bin())
        .arg("--config")
        .arg(&cfg)
        .arg("check")
        .current_dir(dir.path())
        .env("CHECK_TEST_KEY", "s3cr3t-value")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains(
            "custom values: GET /webhooks/webio -> http://127.0.0.1:9000/values (timeout 2s, cache 30s, 1 header(s))"
        ),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("ingest: {}/inbox every 2s", dir.path().display())), "{stdout}");
    assert!(!stdout.contains("s3cr3t-value"));
}
