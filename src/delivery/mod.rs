//! Between the router and the sinks. [`Delivery`] takes an accepted event and the sinks it
//! must reach, and answers when the 202 may be sent:
//!
//! - [`direct::Direct`]: after every sink confirmed;
//! - [`spool::Spool`]: after the event is durably on disk; sinks are fed from there;
//! - [`shared::SharedWindow`]: either of them, with the dedup window shared through Redis.
//!
//! Dedup lives here too, because "seen" must mean "safely taken", which only the delivery
//! layer knows.

pub mod direct;
pub mod shared;
pub mod spool;

use crate::event::Envelope;
use crate::sinks::{BoxFuture, Sink};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Taken: delivered (direct) or durably spooled.
    New,
    /// Same event id inside the dedup window: acknowledged, nothing re-sent.
    Duplicate,
}

/// One sink's delivery state, for `webio-router sinks` and `GET /sinks`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SinkState {
    pub paused: bool,
    pub pending: u64,
    /// When the oldest pending event was accepted.
    pub oldest_pending: Option<std::time::SystemTime>,
    pub last_error: Option<String>,
}

/// What a `replay` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayOutcome {
    /// Re-injected (event, sink) pairs, by sink.
    pub injected: BTreeMap<String, u64>,
    /// Lines not re-injected because that (event, sink) pair was already pending.
    pub already_pending: u64,
    /// Lines that could not be replayed: (line number, why).
    pub skipped: Vec<(usize, String)>,
}

/// Why an operator's request (pause, resume, replay) was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ControlRefused {
    #[error("no sink named {0:?} in routes.toml")]
    UnknownSink(String),
    #[error("delivery.mode = \"direct\" keeps no spool: pausing and replaying need delivery.mode = \"spool\"")]
    NoSpool,
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Spool(#[from] spool::SpoolError),
}

/// Why an event was not taken; the sender should retry after `retry_after`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    pub reason: String,
    pub retry_after: Duration,
}

pub trait Delivery: Send + Sync + 'static {
    /// Takes `env` for `sinks` (never empty). Resolves when the 202 may be sent.
    fn submit(&self, env: Envelope, sinks: Vec<Arc<dyn Sink>>) -> BoxFuture<'_, Result<Accepted, Refused>>;

    /// The set of sinks changed (routes reloaded).
    fn sinks_changed(&self, _sinks: &HashMap<String, Arc<dyn Sink>>) {}

    /// Ready to take events (spool open, …).
    fn is_ready(&self) -> bool {
        true
    }

    /// Delivery state by sink name (sinks with nothing to report may be absent).
    fn sink_states(&self) -> HashMap<String, SinkState> {
        HashMap::new()
    }

    /// Pauses or resumes `sink` (known to routes.toml or to the spool); the state outlives a
    /// restart.
    fn set_paused(&self, _sink: &str, _paused: bool) -> BoxFuture<'_, Result<(), ControlRefused>> {
        Box::pin(async { Err(ControlRefused::NoSpool) })
    }

    /// Re-injects dead-letter `lines` (JSON Lines) as new pending work, for `only` or each
    /// line's own sink, which must be among `known`.
    fn replay(
        &self,
        _lines: Vec<String>,
        _only: Option<String>,
        _known: std::collections::BTreeSet<String>,
    ) -> BoxFuture<'_, Result<ReplayOutcome, ControlRefused>> {
        Box::pin(async { Err(ControlRefused::NoSpool) })
    }

    /// Why it is not ready, when that is not just the shutdown (for `/readyz`): e.g. the
    /// spool cannot commit.
    fn unready_reason(&self) -> Option<String> {
        None
    }

    /// Stop: flush what can be flushed before `deadline` (the shutdown's one deadline).
    fn shutdown(&self, deadline: tokio::time::Instant) -> BoxFuture<'_, ()>;
}

/// Records one attempt's outcome in the metrics and the log. `outcome` is `ok`, `retry` or `dead`.
pub fn observe(sink: &str, outcome: &'static str, started: std::time::Instant) {
    crate::metrics::delivery(sink, outcome, started.elapsed());
}
