//! Direct delivery: the 202 waits for every matched sink's confirmation; any failure is a
//! 503 so that Webio retries (already-confirmed sinks may then see the event twice).

use super::{observe, Accepted, Delivery, Refused};
use crate::dedup::Dedup;
use crate::event::Envelope;
use crate::sinks::{BoxFuture, Sink};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Direct {
    dedup: Dedup,
}

impl Direct {
    pub fn new(dedup_window: Duration) -> Self {
        Direct { dedup: Dedup::new(dedup_window) }
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
                    let r = sink.deliver(env).await;
                    match &r {
                        Ok(()) => observe(sink.name(), "ok", started),
                        Err(e) => {
                            observe(sink.name(), if e.is_permanent() { "dead" } else { "retry" }, started);
                            tracing::warn!(sink = sink.name(), event_id = %env.event.id, error = %e, permanent = e.is_permanent(), "direct delivery failed");
                        }
                    }
                    r.map_err(|e| (sink.name().to_owned(), e))
                }
            }))
            .await;
            let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
            if failed.is_empty() {
                // Only a fully confirmed event counts as seen: a retry after a 503 must go out again.
                self.dedup.record(&env.event.id);
                return Ok(Accepted::New);
            }
            let retry_after = failed
                .iter()
                .filter_map(|(_, e)| e.retry_after)
                .max()
                .unwrap_or(RETRY_AFTER)
                .max(Duration::from_secs(1));
            let names: Vec<_> = failed.iter().map(|(n, _)| n.as_str()).collect();
            Err(Refused { reason: format!("sink delivery failed: {}", names.join(", ")), retry_after })
        })
    }

    fn shutdown(&self, _deadline: tokio::time::Instant) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
