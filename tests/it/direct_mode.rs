//! Direct mode and permanent refusals (README "Delivery"): a sink that refuses an event for good gets
//! a dead letter (the spool's line format) and the webhook its 202 once every other sink
//! confirmed; only a retryable failure makes Webio retry.

use crate::helpers::tmpfs::Tmpfs;
use crate::helpers::*;
use webio_router::delivery::spool::dead::DeadLetter;

/// Sinks `healthy` and `crm`, both matched by every event.
fn two_http_sinks(healthy: &Capture, crm: &Capture) -> String {
    format!(
        "[sinks.healthy]\ntype = \"http\"\nurl = \"{}\"\n[sinks.crm]\ntype = \"http\"\nurl = \"{}\"\n[[routes]]\nto = [\"healthy\", \"crm\"]\n",
        healthy.url("/healthy"),
        crm.url("/crm")
    )
}

const BODY: &[u8] = br#"{"type":"inboundMessage","conversationId":"c-1","body":"hello"}"#;

#[test]
fn a_sink_answering_422_is_dead_lettered_and_the_webhook_gets_202_then_200_duplicate() {
    let (ok, crm) = (Capture::start(200), Capture::start(422));
    let r = router("", &two_http_sinks(&ok, &crm)).spawn();
    let a = r.post(BODY);
    assert_eq!(a.status, 202, "the other sink confirmed: {}", a.body);
    let id = a.json()["id"].as_str().unwrap().to_owned();

    let letters = r.jsonl("var/dead-letter.jsonl");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["sink"], "crm");
    assert_eq!(letters[0]["eventId"], id.as_str());
    assert_eq!(letters[0]["attempts"], 1);
    assert!(letters[0]["reason"].as_str().unwrap().contains("422"), "{}", letters[0]["reason"]);
    // The spool's format: `replay` reads it back into the same event and body.
    let letter: DeadLetter = serde_json::from_value(letters[0].clone()).unwrap();
    let env = letter.envelope().unwrap();
    assert_eq!(env.event.id, id);
    assert_eq!(&env.raw[..], BODY);

    // Webio retries the same body: taken already, nothing goes out again.
    let again = r.post(BODY);
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["status"], "duplicate");
    assert_eq!(ok.received().len(), 1, "the healthy sink got the event once");
    assert_eq!(crm.received().len(), 1);
    assert_eq!(r.jsonl("var/dead-letter.jsonl").len(), 1);
    assert_eq!(r.metric(r#"webio_router_deliveries_total{sink="crm",outcome="dead"}"#), 1.0);
}

#[test]
fn a_retryable_failure_beside_a_permanent_one_answers_503_without_a_dead_letter_yet() {
    let (down, crm) = (Capture::start(503), Capture::start(422));
    let r = router("", &two_http_sinks(&down, &crm)).spawn();
    let a = r.post(BODY);
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.body.contains("healthy"), "names the sink that may recover: {}", a.body);
    assert!(r.jsonl("var/dead-letter.jsonl").is_empty(), "Webio sends the event again: decided then");

    down.set_status(200);
    let a = r.post(BODY);
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(r.jsonl("var/dead-letter.jsonl").len(), 1);
}

#[test]
fn a_dead_letter_that_cannot_be_written_answers_503_until_space_is_freed() {
    let fs = Tmpfs::mount("256k");
    let (ok, crm) = (Capture::start(200), Capture::start(422));
    let dead = fs.path().join("dead-letter.jsonl");
    let config = format!(
        "routes_file = \"{{dir}}/routes.toml\"\n[auth]\nsecrets = [\"{SECRET}\"]\n[delivery]\nmode = \"direct\"\ndead_letter_file = \"{}\"\n",
        dead.display()
    );
    let r = router(&config, &two_http_sinks(&ok, &crm)).spawn();
    fs.fill();
    let a = r.post(BODY);
    assert_eq!(a.status, 503, "the refusal could not be recorded: {}", a.body);
    assert!(a.header("retry-after").is_some());

    fs.free();
    let a = r.post(BODY);
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(read_jsonl(&dead).len(), 1);
    assert_eq!(ok.received().len(), 2, "at least once: the healthy sink got the event on each try");
}
