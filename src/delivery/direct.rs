//! Direct delivery: the 202 waits for every matched sink. A sink either confirms, or refuses
//! for good (a permanent error: its (event, sink) pair goes to the dead-letter file, in the
//! spool's line format, before the 202), or fails in a way that may pass (a retryable error:
//! the answer is 503 so that Webio retries, and sinks that had confirmed may then see the
//! event twice).
//!
//! Only a fully taken event (every sink confirmed or dead-lettered) enters the dedup window,
//! so a retry after a 503 goes out again, and a retry after a 202 is a 200 duplicate.

use super::spool::dead::DeadLetter;
use super::{observe, Accepted, Delivery, Refused};
use crate::config::DeliveryConfig;
use crate::dedup::Dedup;
use crate::event::Envelope;
use crate::jsonl::JsonlFile;
use crate::sinks::{BoxFuture, Sink, SinkError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Direct {
    dedup: Dedup,
    dead: JsonlFile,
}

impl Direct {
    pub fn new(cfg: &DeliveryConfig) -> Self {
        Direct { dedup: Dedup::new(cfg.dedup_window), dead: JsonlFile::new(&cfg.dead_letter_file) }
    }
}

const RETRY_AFTER: Duration = Duration::from_secs(5);

/// One sink's delivery of `env`: the sink's name, its answer, and when it started.
async fn deliver<'a>(sink: &'a dyn Sink, env: &Envelope) -> (&'a str, Result<(), SinkError>, Instant) {
    let started = Instant::now();
    let span = tracing::debug_span!("delivery", event_id = %env.event.id, traceparent = %env.trace);
    let r = if span.is_disabled() {
        sink.deliver(env).await
    } else {
        tracing::Instrument::instrument(sink.deliver(env), span).await
    };
    (sink.name(), r, started)
}

impl Delivery for Direct {
    fn submit(&self, env: Envelope, sinks: Vec<Arc<dyn Sink>>) -> BoxFuture<'_, Result<Accepted, Refused>> {
        Box::pin(async move {
            // The id's key once, for the check and for the record.
            let key = crate::dedup::key(&env.event.id);
            if self.dedup.contains_key_at(key, crate::dedup::now_millis()) {
                return Ok(Accepted::Duplicate);
            }
            let results = match &sinks[..] {
                // One sink (the usual case): no join.
                [sink] => vec![deliver(&**sink, &env).await],
                _ => futures_util::future::join_all(sinks.iter().map(|sink| deliver(&**sink, &env))).await,
            };
            let mut refused: Vec<(&str, SinkError, Instant)> = Vec::new();
            let mut failed: Vec<(&str, SinkError, Instant)> = Vec::new();
            for (name, r, started) in results {
                match r {
                    Ok(()) => observe(name, "ok", started),
                    Err(e) if e.is_permanent() => refused.push((name, e, started)),
                    Err(e) => failed.push((name, e, started)),
                }
            }
            if !failed.is_empty() {
                // Webio sends the whole event again: every failure, permanent ones too, is tried
                // again then (and dead-lettered once the event can be taken).
                for (name, e, started) in refused.iter().chain(&failed) {
                    observe(name, "retry", *started);
                    tracing::warn!(sink = name, event_id = %env.event.id, traceparent = %env.trace, error = %e, permanent = e.is_permanent(), "direct delivery failed; answering 503");
                }
                let retry_after = failed
                    .iter()
                    .filter_map(|(_, e, _)| e.retry_after)
                    .max()
                    .unwrap_or(RETRY_AFTER)
                    .max(Duration::from_secs(1));
                let names: Vec<_> = failed.iter().map(|(n, _, _)| *n).collect();
                return Err(Refused { reason: format!("sink delivery failed: {}", names.join(", ")), retry_after });
            }
            for (name, e, started) in &refused {
                tracing::warn!(sink = name, event_id = %env.event.id, traceparent = %env.trace, error = %e, "sink refused the event for good; writing a dead letter");
                // The 202 comes only once the dead letter is on disk: otherwise the pair could
                // be lost with nobody told.
                if let Err(err) = self.dead.append(&DeadLetter::new(name, &e.message, 1, &env)).await {
                    tracing::error!(file = %self.dead.path().display(), error = %err, "cannot write the dead-letter file; answering 503");
                    observe(name, "retry", *started);
                    return Err(Refused {
                        reason: "cannot write the dead-letter file".into(),
                        retry_after: Duration::from_secs(30),
                    });
                }
                observe(name, "dead", *started);
            }
            // Only a fully taken event counts as seen: a retry after a 503 must go out again.
            self.dedup.record_key_at(key, crate::dedup::now_millis());
            Ok(Accepted::New)
        })
    }

    fn shutdown(&self, _deadline: tokio::time::Instant) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::file::{FileConfig, FileSink};

    fn envelope(n: usize) -> Envelope {
        let body = format!(r#"{{"type":"inboundMessage","conversationId":"c-{n}","n":{n}}}"#);
        let event = crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
        Envelope::new(event, body.into())
    }

    #[tokio::test]
    async fn a_failed_fdatasync_answers_503_to_every_event_of_the_group_and_takes_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let cfg = DeliveryConfig { dead_letter_file: dir.path().join("dead-letter.jsonl"), ..Default::default() };
        let direct = Direct::new(&cfg);
        let file = FileConfig {
            path: path.display().to_string(),
            format: Default::default(),
            fsync: true,
            ordering: Default::default(),
        };
        let sink = Arc::new(FileSink::new("out", &file).unwrap());
        let sinks: Vec<Arc<dyn Sink>> = vec![sink.clone()];

        sink.fail_syncs(true);
        let answers = futures_util::future::join_all((0..24).map(|n| direct.submit(envelope(n), sinks.clone()))).await;
        for a in &answers {
            let refused = a.as_ref().expect_err("503: the line is not known to be on disk");
            assert!(refused.reason.contains("out"), "{}", refused.reason);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"", "nothing half-acknowledged is left in the file");
        assert!(!dir.path().join("dead-letter.jsonl").exists(), "a retryable failure is no dead letter");

        // Webio's retries go out again (nothing entered the dedup window), and now land.
        sink.fail_syncs(false);
        let answers = futures_util::future::join_all((0..24).map(|n| direct.submit(envelope(n), sinks.clone()))).await;
        assert!(answers.iter().all(|a| matches!(a, Ok(Accepted::New))), "{answers:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 24);
    }
}
