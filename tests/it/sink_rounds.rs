//! A drain round handed to a sink at once (`Sink::deliver_many`): the file sink writes the
//! round as one group (one `write`, one `fdatasync` per file); the default gives each event
//! what `deliver` gives it; the `concurrency` wrapper passes a round through whole.

use std::sync::Arc;
use webio_router::event::{normalise, Envelope};
use webio_router::sinks::file::{FileConfig, FileSink};
use webio_router::sinks::limit::Limits;
use webio_router::sinks::{BoxFuture, Sink, SinkError};

fn envelope(body: String) -> Envelope {
    let event = normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
    Envelope::new(event, body.into())
}

fn numbered(n: usize) -> Envelope {
    envelope(format!(r#"{{"type":"payment","conversationId":"c{}","n":{n}}}"#, n % 3))
}

fn file_sink(path: &std::path::Path) -> FileSink {
    let config: FileConfig = toml::from_str(&format!("path = {:?}", path.display().to_string())).unwrap();
    FileSink::new("out", &config).unwrap()
}

fn numbers(path: &std::path::Path) -> Vec<i64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["extra"]["n"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_round_delivered_to_a_file_sink_is_one_group_with_one_sync() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let sink = file_sink(&path);
    // The file exists (and is open) before the round, as in a running router.
    sink.deliver(&numbered(0)).await.unwrap();
    assert_eq!(sink.groups_written(), 1);

    for round in 0..3 {
        let envs: Vec<Envelope> = (1..=64).map(|i| numbered(round * 100 + i)).collect();
        let refs: Vec<&Envelope> = envs.iter().collect();
        let before = sink.groups_written();
        let results = sink.deliver_many(&refs).await;
        assert_eq!(results.len(), 64);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(sink.groups_written() - before, 1, "round {round}: one group, one write and one fdatasync");
    }
    let mut want = vec![0];
    for round in 0..3 {
        want.extend((1..=64).map(|i| (round * 100 + i) as i64));
    }
    assert_eq!(numbers(&path), want, "every line once, in the round's order");
}

#[tokio::test]
async fn a_round_for_several_files_is_one_group_and_each_line_goes_to_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("{conversationId}.jsonl");
    let sink = file_sink(&template);
    let envs: Vec<Envelope> = (0..30).map(numbered).collect();
    let refs: Vec<&Envelope> = envs.iter().collect();
    let results = sink.deliver_many(&refs).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(sink.groups_written(), 1);
    for c in 0..3 {
        let want: Vec<i64> = (0..30).filter(|n| n % 3 == c).collect();
        assert_eq!(numbers(&dir.path().join(format!("c{c}.jsonl"))), want, "c{c}");
    }
}

#[tokio::test]
async fn a_file_that_cannot_be_opened_fails_only_its_own_lines_of_the_round() {
    let dir = tempfile::tempdir().unwrap();
    // `c1` is a directory: its file cannot be opened (permanent); c0 and c2 are fine.
    std::fs::create_dir(dir.path().join("c1.jsonl")).unwrap();
    let sink = file_sink(&dir.path().join("{conversationId}.jsonl"));
    let envs: Vec<Envelope> = (0..9).map(numbered).collect();
    let refs: Vec<&Envelope> = envs.iter().collect();
    let many = sink.deliver_many(&refs).await;
    for (n, r) in many.iter().enumerate() {
        match n % 3 {
            1 => assert!(r.as_ref().is_err_and(SinkError::is_permanent), "{n}: {r:?}"),
            _ => assert!(r.is_ok(), "{n}: {r:?}"),
        }
    }
    // Each line got what `deliver` gives it.
    for (env, r) in envs.iter().zip(&many) {
        assert_eq!(&sink.deliver(env).await, r);
    }
}

/// A sink with only `deliver`: the event's `n` decides its answer.
struct ByNumber;

impl Sink for ByNumber {
    fn name(&self) -> &str {
        "by-number"
    }

    fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let n = env.event.extra.get("n").and_then(serde_json::Value::as_i64).unwrap_or(-1);
            // Later events answer sooner: the results still come back in the round's order.
            tokio::time::sleep(std::time::Duration::from_millis(20 - (n as u64 % 20))).await;
            match n % 3 {
                0 => Ok(()),
                1 => Err(SinkError::retryable(format!("busy {n}"))),
                _ => Err(SinkError::permanent(format!("refused {n}"))),
            }
        })
    }
}

#[tokio::test]
async fn the_default_deliver_many_gives_each_event_what_deliver_gives_it() {
    let envs: Vec<Envelope> = (0..40).map(numbered).collect();
    let refs: Vec<&Envelope> = envs.iter().collect();
    let sinks: [(&str, Arc<dyn Sink>); 3] = [
        ("plain", Arc::new(ByNumber)),
        ("concurrency", Limits { concurrency: Some(8), rate_limit: None }.wrap(Arc::new(ByNumber))),
        (
            "rate limit",
            Limits { concurrency: None, rate_limit: Some("1000/s".parse().unwrap()) }.wrap(Arc::new(ByNumber)),
        ),
    ];
    for (what, sink) in sinks {
        let one_by_one: Vec<_> = futures_util::future::join_all(envs.iter().map(|e| sink.deliver(e))).await;
        // A round larger than `concurrency` too (it waits for slots in turn).
        let many = sink.deliver_many(&refs).await;
        assert_eq!(many, one_by_one, "{what}");
        assert_eq!(many.iter().filter(|r| r.is_ok()).count(), 14, "{what}");
    }
}

#[test]
fn a_file_sink_takes_rounds_of_256_unless_its_concurrency_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let file: Arc<dyn Sink> = Arc::new(file_sink(&dir.path().join("out.jsonl")));
    assert_eq!((file.concurrency(), file.round()), (None, Some(256)));
    // Behind a rate limit only: still its own round.
    let paced = Limits { concurrency: None, rate_limit: Some("50/s".parse().unwrap()) }.wrap(file.clone());
    assert_eq!((paced.concurrency(), paced.round()), (None, Some(256)));
    // `concurrency` is the round when set (the drain takes `concurrency` first).
    let bounded = Limits { concurrency: Some(4), rate_limit: None }.wrap(file);
    assert_eq!(bounded.concurrency(), Some(4));
    // Other sinks: the spool's default.
    assert_eq!(ByNumber.round(), None);
}

#[tokio::test]
async fn a_file_sink_behind_concurrency_still_writes_a_round_as_one_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let file = Arc::new(file_sink(&path));
    let sink = Limits { concurrency: Some(16), rate_limit: None }.wrap(file.clone());
    let envs: Vec<Envelope> = (0..16).map(numbered).collect();
    let refs: Vec<&Envelope> = envs.iter().collect();
    let results = sink.deliver_many(&refs).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(file.groups_written(), 1);
    assert_eq!(numbers(&path), (0..16).collect::<Vec<_>>());
}
