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

impl Delivery for Direct {
    fn submit(&self, env: Envelope, sinks: Vec<Arc<dyn Sink>>) -> BoxFuture<'_, Result<Accepted, Refused>> {
        Box::pin(async move {
            if self.dedup.contains(&env.event.id) {
                return Ok(Accepted::Duplicate);
            }
            let results = futures_util::future::join_all(sinks.iter().map(|sink| {
                let env = &env;
                async move {
                    let started = Instant::now();
                    let span = tracing::debug_span!("delivery", event_id = %env.event.id, traceparent = %env.trace);
                    let r = tracing::Instrument::instrument(sink.deliver(env), span).await;
                    (sink.name(), r, started)
                }
            }))
            .await;
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
            self.dedup.record(&env.event.id);
            Ok(Accepted::New)
        })
    }

    fn shutdown(&self, _deadline: tokio::time::Instant) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
