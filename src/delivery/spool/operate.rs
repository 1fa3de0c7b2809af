//! What the control socket asks of a running spool: pause and resume a sink, each sink's
//! state, and replay dead letters while the daemon runs.
//!
//! - A pause is committed to the `paused` table (through the writer, durably) before the
//!   drain is held, so a pause that was answered outlives a crash and a restart. A paused
//!   sink's drain makes no attempt (deliveries already in flight finish); its work stays
//!   pending and new work queues behind it.
//! - A replayed dead letter becomes new pending work for one sink, like a webhook's event but
//!   outside the dedup window (its id was seen: that is why it is a dead letter). A letter
//!   whose event is already pending for that sink (or that the same replay already took) is
//!   skipped and counted, so replaying a file twice does not deliver twice.

use super::memtable;
use super::ops::{Append, Op, Pause};
use super::replay::parse_line;
use super::store::{self, SpoolError, StoreError};
use super::Spool;
use crate::delivery::{Accepted, ControlRefused, ReplayOutcome, SinkState};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::oneshot;

impl Spool {
    fn refused(&self, e: StoreError) -> ControlRefused {
        ControlRefused::Spool(SpoolError::from_store(&self.shared.path, e))
    }

    pub(super) async fn pause(&self, sink: &str, paused: bool) -> Result<(), ControlRefused> {
        if self.closing.load(Ordering::Acquire) {
            return Err(ControlRefused::ShuttingDown);
        }
        let (reply, answer) = oneshot::channel();
        if !self.shared.send(Op::Pause(Pause { sink: sink.to_owned(), paused, reply })) {
            return Err(ControlRefused::ShuttingDown);
        }
        answer.await.map_err(|_| ControlRefused::ShuttingDown)?.map_err(|e| self.refused(e))?;
        self.registry.queue(sink).set_paused(paused);
        Ok(())
    }

    pub(super) fn states(&self) -> HashMap<String, SinkState> {
        self.registry
            .all()
            .into_iter()
            .map(|q| {
                let pending = q.pending();
                let oldest = if pending > 0 { oldest_accepted(&self.shared, &q.name) } else { None };
                let state =
                    SinkState { paused: q.is_paused(), pending, oldest_pending: oldest, last_error: q.last_error() };
                (q.name.to_string(), state)
            })
            .collect()
    }

    pub(super) async fn replay_lines(
        &self,
        lines: Vec<String>,
        only: Option<String>,
        known: BTreeSet<String>,
    ) -> Result<ReplayOutcome, ControlRefused> {
        if self.closing.load(Ordering::Acquire) {
            return Err(ControlRefused::ShuttingDown);
        }
        let mut outcome = ReplayOutcome::default();
        let mut wanted = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(line, only.as_deref(), &known) {
                Ok((sink, env)) => wanted.push((i + 1, sink, env)),
                Err(e) => outcome.skipped.push((i + 1, e.to_string())),
            }
        }
        // What each sink has pending already, read from one snapshot per sink.
        let sinks: BTreeSet<String> = wanted.iter().map(|(_, s, _)| s.clone()).collect();
        let shared = self.shared.clone();
        let mut pending: HashMap<String, HashSet<String>> =
            tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
                sinks.into_iter().map(|s| memtable::pending_ids(&shared, &s).map(|ids| (s, ids))).collect()
            })
            .await
            .map_err(|e| {
                ControlRefused::Spool(SpoolError::Io {
                    path: self.shared.path.clone(),
                    what: "the task reading it failed",
                    source: std::io::Error::other(e),
                })
            })?
            .map_err(|e| self.refused(e))?;

        let max = self.shared.cfg.max_spool_bytes;
        let mut answers = Vec::new();
        for (n, sink, env) in wanted {
            // Taken once per sink: a second line with the same event is "already pending".
            if !pending.entry(sink.clone()).or_default().insert(env.event.id.clone()) {
                outcome.already_pending += 1;
                continue;
            }
            let rec = store::encode(&env);
            let size = rec.len() as u64;
            let before = self.shared.used.fetch_add(size, Ordering::AcqRel);
            if before + size > max {
                self.shared.used.fetch_sub(size, Ordering::AcqRel);
                outcome.skipped.push((n, format!("spool full ({before} of {max} bytes used); replay it later")));
                continue;
            }
            let (reply, answer) = oneshot::channel();
            let id = env.event.id.clone();
            let op = Append { rec, id, sinks: vec![sink.clone()], env: Arc::new(env), dedup: false, reply };
            if !self.shared.send(Op::Append(op)) {
                self.shared.used.fetch_sub(size, Ordering::AcqRel);
                return Err(ControlRefused::ShuttingDown);
            }
            answers.push((n, sink, answer));
        }
        // Sent all at once: the writer commits them together.
        for (n, sink, answer) in answers {
            match answer.await {
                Ok(Ok(Accepted::New)) => *outcome.injected.entry(sink).or_default() += 1,
                Ok(Ok(Accepted::Duplicate)) => outcome.already_pending += 1,
                Ok(Err(refused)) => outcome.skipped.push((n, format!("not taken: {refused}"))),
                Err(_) => outcome.skipped.push((n, "not taken: the spool writer stopped".to_owned())),
            }
        }
        outcome.skipped.sort();
        Ok(outcome)
    }
}

/// When `sink`'s oldest pending event was accepted (its `receivedAt`); `None` when it cannot
/// be read (the drain deals with a damaged record).
fn oldest_accepted(shared: &super::Shared, sink: &str) -> Option<SystemTime> {
    let rec = memtable::oldest_pending(shared, sink).ok()??;
    let env = super::record::decode(&rec).ok()?;
    let at = chrono::DateTime::parse_from_rfc3339(&env.event.received_at).ok()?;
    Some(SystemTime::from(at.with_timezone(&chrono::Utc)))
}
