//! The dedup window shared between replicas ([`crate::dedup::store`]), around either
//! delivery mode. The inner mode keeps its own local window, which also answers whenever
//! Redis cannot.
//!
//! Order of a submit: claim the id in Redis (pending) → the inner mode takes the event (its
//! own window first) → taken: confirm the key for the window; refused: delete it. So "seen"
//! in Redis means "safely taken" (or being taken right now: another replica then answers 503
//! with a short `Retry-After`, never a duplicate, so nothing is lost if the first one fails).

use super::{Accepted, ControlRefused, Delivery, Refused, SinkState};
use crate::dedup::store::{Claim, DedupStore};
use crate::event::Envelope;
use crate::sinks::{BoxFuture, Sink};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// What a webhook whose id another request is taking right now is told to wait.
const PENDING_RETRY_AFTER: Duration = Duration::from_secs(2);

pub struct SharedWindow {
    inner: Arc<dyn Delivery>,
    store: Arc<DedupStore>,
}

impl SharedWindow {
    pub fn new(inner: Arc<dyn Delivery>, store: Arc<DedupStore>) -> Self {
        SharedWindow { inner, store }
    }
}

// A method added to `Delivery` with a default must be forwarded here too (with the default,
// the shared window would silently hide the inner mode's: its sinks' states, a pause, a
// replay): the lint makes clippy (`-D warnings` in CI) refuse an impl that leaves one out.
#[deny(clippy::missing_trait_methods)]
impl Delivery for SharedWindow {
    fn submit(&self, env: Envelope, sinks: Vec<Arc<dyn Sink>>) -> BoxFuture<'_, Result<Accepted, Refused>> {
        Box::pin(async move {
            let id = env.event.id.clone();
            match self.store.claim(&id).await {
                Claim::Taken => return Ok(Accepted::Duplicate),
                Claim::Pending => {
                    return Err(Refused {
                        reason: "the same event is being taken by another request".into(),
                        retry_after: PENDING_RETRY_AFTER,
                    })
                }
                Claim::Unavailable => return self.inner.submit(env, sinks).await,
                Claim::New => {}
            }
            let answer = self.inner.submit(env, sinks).await;
            match &answer {
                // A local duplicate was taken before: the key may say so as well.
                Ok(_) => self.store.confirm(&id).await,
                Err(_) => self.store.release(&id).await,
            }
            answer
        })
    }

    fn sinks_changed(&self, sinks: &HashMap<String, Arc<dyn Sink>>) {
        self.inner.sinks_changed(sinks)
    }

    fn is_ready(&self) -> bool {
        self.inner.is_ready()
    }

    fn sink_states(&self) -> HashMap<String, SinkState> {
        self.inner.sink_states()
    }

    fn set_paused(&self, sink: &str, paused: bool) -> BoxFuture<'_, Result<(), ControlRefused>> {
        self.inner.set_paused(sink, paused)
    }

    fn replay(
        &self,
        lines: Vec<String>,
        only: Option<String>,
        known: BTreeSet<String>,
    ) -> BoxFuture<'_, Result<crate::control::ReplayOutcome, ControlRefused>> {
        self.inner.replay(lines, only, known)
    }

    fn unready_reason(&self) -> Option<String> {
        self.inner.unready_reason()
    }

    fn shutdown(&self, deadline: tokio::time::Instant) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.inner.shutdown(deadline).await;
            self.store.stop();
        })
    }
}
