//! The one writer: a thread that takes every queued change (new events from webhook
//! requests, deliveries done, attempt counts), applies them in one redb write transaction,
//! commits it durably (one fsync), and only then answers the waiting requests — group commit:
//! N concurrent requests share one flush.

use super::queue::Registry;
use super::store::{DEDUP, EVENTS, PENDING};
use super::Shared;
use crate::dedup::now_millis;
use crate::delivery::{Accepted, Refused};
use crate::event::Envelope;
use redb::ReadableTable;
use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// At most this many operations, or this many bytes of new events, per transaction.
const MAX_OPS: usize = 4096;
const MAX_BATCH_BYTES: u64 = 32 << 20;
/// A transaction that only records deliveries (no new event) is committed without fsync —
/// losing it in a crash means a repeat delivery, which at-least-once allows — unless the last
/// fsync is older than this (so that redb can reuse freed pages and a clean stop loses nothing).
const ACK_FSYNC_EVERY: Duration = Duration::from_secs(1);

/// Bookkeeping ops applied together once this many rows are waiting, or this long after the
/// first one, or as soon as no new event is waiting.
const DEFER_ROWS: usize = 4096;
const DEFER_FOR: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Deferred {
    ops: Vec<Op>,
    rows: usize,
    since: Option<std::time::Instant>,
}

impl Deferred {
    fn push(&mut self, op: Op) {
        self.rows += match &op {
            Op::Done { seqs, .. } => seqs.len(),
            Op::Attempts { items, .. } => items.len(),
            Op::Append(_) => 0,
        };
        self.since.get_or_insert_with(std::time::Instant::now);
        self.ops.push(op);
    }

    fn due(&self) -> bool {
        self.rows >= DEFER_ROWS || self.since.is_some_and(|t| t.elapsed() >= DEFER_FOR)
    }

    fn take(&mut self) -> Vec<Op> {
        self.rows = 0;
        self.since = None;
        std::mem::take(&mut self.ops)
    }
}

pub(crate) enum Op {
    Append(Append),
    /// These (sink, seq) pairs are delivered or dead-lettered: drop them (and the event when
    /// no other sink still needs it).
    Done {
        sink: Arc<str>,
        seqs: Vec<u64>,
    },
    /// Attempts made so far, so that a restart does not start counting again.
    Attempts {
        sink: Arc<str>,
        items: Vec<(u64, u32)>,
    },
}

pub(crate) struct Append {
    pub rec: Vec<u8>,
    pub id: String,
    pub sinks: Vec<String>,
    pub env: Arc<Envelope>,
    pub reply: oneshot::Sender<Result<Accepted, Refused>>,
}

pub(crate) struct Writer {
    pub shared: Arc<Shared>,
    pub registry: Arc<Registry>,
    pub next_seq: u64,
    /// Bytes of event rows on disk.
    pub committed_bytes: u64,
    /// Every sink name that may have pending rows (to know when an event row is free).
    pub names: BTreeSet<String>,
    pub last_prune: u64,
    /// When the last durable (fsynced) commit happened, and whether one without fsync followed.
    pub last_fsync: std::time::Instant,
    pub unsynced: bool,
}

impl Writer {
    pub fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut carry: Vec<Op> = Vec::new();
        // Bookkeeping (deliveries done, attempt counts) waits for a transaction of its own
        // while new events keep coming: removing a run of rows at once rewrites far fewer
        // pages than touching both ends of the tables in every commit. Losing it in a crash
        // means repeat deliveries, as for any bookkeeping commit without fsync.
        let mut deferred = Deferred::default();
        loop {
            let mut ops = std::mem::take(&mut carry);
            if ops.is_empty() {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    // Nothing new: a good moment for the bookkeeping.
                    Err(mpsc::error::TryRecvError::Empty) if !deferred.ops.is_empty() => {}
                    Err(mpsc::error::TryRecvError::Empty) => match rx.blocking_recv() {
                        Some(op) => ops.push(op),
                        None => break,
                    },
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            }
            let mut bytes: u64 = ops.iter().map(op_bytes).sum();
            while ops.len() < MAX_OPS && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(op) => {
                        bytes += op_bytes(&op);
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            let mut batch = Vec::with_capacity(ops.len());
            for op in ops {
                match op {
                    Op::Append(_) => batch.push(op),
                    other => deferred.push(other),
                }
            }
            if batch.is_empty() || deferred.due() {
                batch.extend(deferred.take());
            }
            if batch.is_empty() {
                continue;
            }
            if let Err(left) = self.apply(batch) {
                // Deliveries already done must still be recorded: try again shortly.
                carry = left;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let mut left = deferred.take();
        for _ in 0..3 {
            if left.is_empty() {
                break;
            }
            left = self.apply(left).err().unwrap_or_default();
        }
        if !left.is_empty() {
            tracing::error!(file = %self.shared.path.display(), "spool: the last deliveries could not be recorded; they will repeat after the restart");
        }
        if self.unsynced {
            if let Err(e) = self.sync() {
                tracing::error!(file = %self.shared.path.display(), error = %e, "spool: final commit failed; some deliveries may repeat after the restart");
            }
        }
        tracing::debug!("spool writer stopped");
    }

    /// One transaction for `ops`. On failure every waiting request is refused (nothing was
    /// accepted) and the bookkeeping ops are handed back to be retried.
    fn apply(&mut self, ops: Vec<Op>) -> Result<(), Vec<Op>> {
        let mut appends = Vec::new();
        let mut rest = Vec::new();
        for op in ops {
            match op {
                Op::Append(a) => appends.push(a),
                other => rest.push(other),
            }
        }
        for name in appends.iter().flat_map(|a| &a.sinks) {
            if !self.names.contains(name) {
                self.names.insert(name.clone());
            }
        }
        let now = now_millis();
        let window = self.shared.dedup.window().as_millis() as u64;
        let prune = window > 0 && now.saturating_sub(self.last_prune) >= (window / 10).max(1000);
        let durable = !appends.is_empty() || self.last_fsync.elapsed() >= ACK_FSYNC_EVERY;
        let result = self.transaction(&appends, &rest, now, prune, durable);
        match result {
            Ok((seqs, freed)) => {
                if durable {
                    self.last_fsync = std::time::Instant::now();
                    self.unsynced = false;
                    crate::metrics::spool_flush(seqs.iter().filter(|s| s.is_some()).count() as u64);
                } else {
                    self.unsynced = true;
                }
                self.last_prune = if prune { now } else { self.last_prune };
                let added: u64 =
                    appends.iter().zip(&seqs).filter(|(_, s)| s.is_some()).map(|(a, _)| a.rec.len() as u64).sum();
                let duplicate: u64 =
                    appends.iter().zip(&seqs).filter(|(_, s)| s.is_none()).map(|(a, _)| a.rec.len() as u64).sum();
                self.committed_bytes = (self.committed_bytes + added).saturating_sub(freed);
                self.shared.used.fetch_sub(freed + duplicate, Ordering::AcqRel);
                self.next_seq += seqs.iter().filter(|s| s.is_some()).count() as u64;
                crate::metrics::spool_bytes(self.committed_bytes);
                for (a, seq) in appends.into_iter().zip(seqs) {
                    match seq {
                        Some(seq) => {
                            if window > 0 {
                                self.shared.dedup.record_at(&a.id, now);
                            }
                            // Queue before answering: once a request has its 202, its work is visible.
                            for sink in &a.sinks {
                                self.registry.queue(sink).enqueue(seq, a.env.clone());
                            }
                            let _ = a.reply.send(Ok(Accepted::New));
                        }
                        None => {
                            let _ = a.reply.send(Ok(Accepted::Duplicate));
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(file = %self.shared.path.display(), error = %e, "spool commit failed; webhooks get 503 until it works again");
                let refused: u64 = appends.iter().map(|a| a.rec.len() as u64).sum();
                self.shared.used.fetch_sub(refused, Ordering::AcqRel);
                for a in appends {
                    let _ = a.reply.send(Err(Refused {
                        reason: "the spool cannot be written".into(),
                        retry_after: Duration::from_secs(10),
                    }));
                }
                Err(rest)
            }
        }
    }

    /// Returns, for each append, its seq (`None`: a duplicate), and the bytes freed.
    fn transaction(
        &self,
        appends: &[Append],
        rest: &[Op],
        now: u64,
        prune: bool,
        durable: bool,
    ) -> Result<(Vec<Option<u64>>, u64), String> {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let mut tx = self.shared.db.begin_write().map_err(|x| e(&x))?;
        if !durable {
            tx.set_durability(redb::Durability::None).map_err(|x| e(&x))?;
        }
        let mut seqs = Vec::with_capacity(appends.len());
        let mut freed = 0u64;
        {
            let mut events = tx.open_table(EVENTS).map_err(|x| e(&x))?;
            let mut pending = tx.open_table(PENDING).map_err(|x| e(&x))?;
            let mut dedup = tx.open_table(DEDUP).map_err(|x| e(&x))?;
            let window = self.shared.dedup.window().as_millis() as u64;
            let mut in_batch = HashSet::new();
            let mut next = self.next_seq;
            for a in appends {
                let key = crate::dedup::key(&a.id);
                if window > 0 && (self.shared.dedup.contains_at(&a.id, now) || !in_batch.insert(key)) {
                    seqs.push(None);
                    continue;
                }
                let seq = next;
                next += 1;
                events.insert(seq, a.rec.as_slice()).map_err(|x| e(&x))?;
                for sink in &a.sinks {
                    pending.insert((sink.as_str(), seq), 0u32).map_err(|x| e(&x))?;
                }
                if window > 0 {
                    dedup.insert((now, key), ()).map_err(|x| e(&x))?;
                }
                seqs.push(Some(seq));
            }
            for op in rest {
                match op {
                    Op::Done { sink, seqs: done } => {
                        for seq in done {
                            if pending.remove((&**sink, *seq)).map_err(|x| e(&x))?.is_none() {
                                continue;
                            }
                            let mut needed = false;
                            for name in &self.names {
                                if pending.get((name.as_str(), *seq)).map_err(|x| e(&x))?.is_some() {
                                    needed = true;
                                    break;
                                }
                            }
                            if !needed {
                                if let Some(v) = events.remove(*seq).map_err(|x| e(&x))? {
                                    freed += v.value().len() as u64;
                                }
                            }
                        }
                    }
                    Op::Attempts { sink, items } => {
                        for (seq, n) in items {
                            let exists = pending.get((&**sink, *seq)).map_err(|x| e(&x))?.is_some();
                            if exists {
                                pending.insert((&**sink, *seq), *n).map_err(|x| e(&x))?;
                            }
                        }
                    }
                    Op::Append(_) => unreachable!("appends are split off"),
                }
            }
            if prune {
                let cutoff = now.saturating_sub(window);
                dedup.retain_in(..(cutoff, 0u128), |_, _| false).map_err(|x| e(&x))?;
            }
        }
        tx.commit().map_err(|x| e(&x))?;
        Ok((seqs, freed))
    }
}

impl Writer {
    /// An empty durable commit: makes the commits without fsync before it durable.
    fn sync(&mut self) -> Result<(), String> {
        let tx = self.shared.db.begin_write().map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
        crate::metrics::spool_flush(0);
        self.unsynced = false;
        self.last_fsync = std::time::Instant::now();
        Ok(())
    }
}

fn op_bytes(op: &Op) -> u64 {
    match op {
        Op::Append(a) => a.rec.len() as u64,
        _ => 64,
    }
}

/// Writes `records` ((encoded event, sink)) as new pending work, durably, from `next_seq` on;
/// returns the next free seq. Used by `replay` while the daemon is stopped.
pub fn append_offline(db: &redb::Database, next_seq: u64, records: &[(Vec<u8>, String)]) -> Result<u64, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let tx = db.begin_write().map_err(|x| e(&x))?;
    let mut seq = next_seq;
    {
        let mut events = tx.open_table(EVENTS).map_err(|x| e(&x))?;
        let mut pending = tx.open_table(PENDING).map_err(|x| e(&x))?;
        for (rec, sink) in records {
            events.insert(seq, rec.as_slice()).map_err(|x| e(&x))?;
            pending.insert((sink.as_str(), seq), 0u32).map_err(|x| e(&x))?;
            seq += 1;
        }
    }
    tx.commit().map_err(|x| e(&x))?;
    Ok(seq)
}
