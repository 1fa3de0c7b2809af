//! Per-sink backlogs and their drain tasks. Each sink has its own queue and its own task, so
//! a slow or dead sink only ever delays itself.
//!
//! A queue holds a window of the sink's pending work in memory (with the envelope, for work
//! that arrived while the daemon runs); beyond the window, and after a restart, the work is
//! only on disk and the drain task reads it back in seq order ("spilled"). The window is
//! bounded by bytes as well as by count, and so is what is read back ahead: a backlog of
//! large bodies waits on disk, not in memory.

use super::dead::DeadLetter;
use super::memtable;
use super::ops::{Bookkeeping, Op};
use super::order::{Gate, Key};
use super::record;
use super::store;
use super::Shared;
use crate::delivery::observe;
use crate::event::Envelope;
use crate::sinks::{SinkError, SinkOrdering};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Deliveries of one sink in flight at once.
pub const CONCURRENCY: usize = 16;
/// Pending items of one sink kept in memory; the rest is read back from disk when needed.
#[cfg(not(test))]
pub const WINDOW: usize = 4096;
/// Small in unit tests, so that they go through the spill path.
#[cfg(test)]
pub const WINDOW: usize = 32;
/// Memory the envelopes of one sink's window may take (see [`record::weight`]); one item is
/// always allowed, however large. 4 MiB: ~2000 Webio events (a window of ~2 KiB each). The
/// window is full only at the start of a backlog (afterwards new work waits on disk until the
/// sink catches up), so this bounds a burst's memory, not the drain's speed
/// (docs/performance.md "Memory").
#[cfg(not(test))]
pub const WINDOW_BYTES: u64 = 4 << 20;
#[cfg(test)]
pub const WINDOW_BYTES: u64 = 32 << 10;
/// Events read from disk at once for a sink whose backlog is only on disk, and the memory
/// they may take beyond the batch being delivered.
pub const READ_AHEAD: usize = 256;
pub const READ_AHEAD_BYTES: u64 = WINDOW_BYTES / 2;
/// Deliveries done that a drain may hold before it tells the writer, while its rounds follow
/// each other with every event confirmed. 1: every round is reported at its end. Holding up to
/// 64 (to spare the writer's wake-ups) was measured against this in the eighth round
/// (docs/performance.md "The memtable's bound and held reports, eighth round"): more CPU per
/// event on the workers and the writer, fewer req/s and a higher half-rate p99 in every pair,
/// so the hold is off; the mechanism (a report before the drain waits for anything, and when it
/// stops) stays for a value above 1. Held deliveries are in hand ([`Shared::in_hand`]): the
/// memtable's bound ([`super::writer::CHECKPOINT_EVENTS`]) does not count them.
pub const HOLD_DONE: usize = 1;
/// A `Retry-After` longer than this is capped (a misconfigured sink must not park work for days).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What a drain task is doing, for shutdown: it waits while any sink is [`BUSY`].
pub const IDLE: u8 = 0;
pub const BUSY: u8 = 1;
pub const FAILING: u8 = 2;
pub const PARKED: u8 = 3;
/// Paused by the operator (`webio-router pause`): no attempts, its work stays pending.
pub const PAUSED: u8 = 4;

#[derive(Clone)]
pub(crate) struct Item {
    pub seq: u64,
    pub attempts: u32,
    pub env: Option<Arc<Envelope>>,
    /// Memory `env` takes (0 without one).
    pub weight: u64,
}

impl Item {
    /// The conversation that orders this item on a sink with `ordering = "conversation"`
    /// (none for an event without one, or with an empty one).
    fn conversation(&self) -> Option<&str> {
        self.env.as_ref()?.event.conversation_id.as_deref().filter(|c| !c.is_empty())
    }

    fn key(&self) -> Key<'_> {
        match self.env {
            Some(_) => Key::Known { seq: self.seq, conversation: self.conversation() },
            None => Key::Unknown,
        }
    }
}

struct QState {
    mem: VecDeque<Item>,
    /// Sum of the weights of `mem`.
    mem_bytes: u64,
    /// Highest seq ever placed in `mem` (work at or below it is not loaded again).
    cursor: Option<u64>,
    /// Some pending work is only on disk.
    spilled: bool,
    /// Bumped whenever work goes to disk only; a load that raced with that must not clear `spilled`.
    spill_gen: u64,
    /// Pending pairs: those on disk at the start, plus those the writer counted since
    /// ([`SinkQueue::enqueue`], [`SinkQueue::add_on_disk`]), less those finished. Signed: the
    /// writer counts a pair just after its commit, and a drain reading the backlog back from
    /// disk in between may deliver and finish it first, so this dips below 0 until the count
    /// arrives (read as 0; clamping it instead left it 1 above the rows on disk for good).
    pending: i64,
}

impl QState {
    fn pending(&self) -> u64 {
        self.pending.max(0) as u64
    }
}

pub(crate) struct SinkQueue {
    pub name: Arc<str>,
    state: Mutex<QState>,
    wake: Notify,
    status: AtomicU8,
    /// Set by `webio-router pause` (persisted in the spool's `paused` table first).
    paused: AtomicBool,
    /// The last delivery error since the sink last confirmed one (for `webio-router sinks`).
    last_error: Mutex<Option<String>>,
}

impl SinkQueue {
    fn new(name: &str, on_disk: u64, paused: bool) -> Self {
        crate::metrics::spool_pending(name, on_disk);
        if paused {
            crate::metrics::sink_paused(name, true);
        }
        SinkQueue {
            name: Arc::from(name),
            state: Mutex::new(QState {
                mem: VecDeque::new(),
                mem_bytes: 0,
                cursor: None,
                spilled: on_disk > 0,
                spill_gen: 0,
                pending: on_disk as i64,
            }),
            wake: Notify::new(),
            status: AtomicU8::new(if on_disk > 0 { BUSY } else { IDLE }),
            paused: AtomicBool::new(paused),
            last_error: Mutex::new(None),
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Pauses or resumes the drain (a resumed one is woken to deliver its backlog).
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
        crate::metrics::sink_paused(&self.name, paused);
        self.wake.notify_one();
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("last error lock").clone()
    }

    /// After a batch: its last error, or none once a delivery was confirmed without one.
    fn note_outcome(&self, error: Option<String>, confirmed: bool) {
        if error.is_some() || confirmed {
            *self.last_error.lock().expect("last error lock") = error;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QState> {
        self.state.lock().expect("sink queue lock")
    }

    /// New durable work (called by the writer after the commit); `weight`: see [`record::weight`].
    pub fn enqueue(&self, seq: u64, env: Arc<Envelope>, weight: u64) {
        {
            let mut s = self.lock();
            s.pending += 1;
            crate::metrics::spool_pending(&self.name, s.pending());
            let full = !s.mem.is_empty() && (s.mem.len() >= WINDOW || s.mem_bytes + weight > WINDOW_BYTES);
            if s.spilled || full {
                s.spilled = true;
                s.spill_gen += 1;
            } else if !matches!(s.cursor, Some(c) if seq <= c) {
                s.mem.push_back(Item { seq, attempts: 0, env: Some(env), weight });
                s.mem_bytes += weight;
                s.cursor = Some(seq);
            }
        }
        self.work_arrived();
    }

    /// Wakes the drain for new work. An idle drain counts as busy from now on, so that a
    /// shutdown waits for work accepted just before it. A drain in its backoff after a failure
    /// (or paused, or parked) stays as it is: it takes the new work at its next attempt, and a
    /// shutdown must not wait for that attempt (it waited its whole deadline when a webhook
    /// came in while the only sink was down).
    fn work_arrived(&self) {
        let _ = self.status.compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Acquire);
        self.wake.notify_one();
    }

    /// `n` more pending pairs that are only on disk (found after a reopen of the file).
    pub fn add_on_disk(&self, n: u64) {
        {
            let mut s = self.lock();
            s.pending += n as i64;
            crate::metrics::spool_pending(&self.name, s.pending());
            s.spilled = true;
            s.spill_gen += 1;
        }
        self.work_arrived();
    }

    pub fn pending(&self) -> u64 {
        self.lock().pending()
    }

    pub fn status(&self) -> u8 {
        self.status.load(Ordering::Acquire)
    }

    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn take(&self, n: usize) -> Vec<Item> {
        let mut s = self.lock();
        let n = n.min(s.mem.len());
        let items: Vec<Item> = s.mem.drain(..n).collect();
        s.mem_bytes -= items.iter().map(|it| it.weight).sum::<u64>();
        items
    }

    /// For a sink with ordering: at most `n` items the conversation gate lets go now, in
    /// their order (see [`super::order`]).
    fn take_ordered(&self, n: usize, gate: &mut Gate<Item>) -> Vec<Item> {
        let mut s = self.lock();
        let picked = gate.pick(&s.mem, n, Item::key);
        let mut items: Vec<Item> = picked.iter().rev().filter_map(|&i| s.mem.remove(i)).collect();
        items.reverse();
        s.mem_bytes -= items.iter().map(|it| it.weight).sum::<u64>();
        items
    }

    /// Seqs of the first `limit` items in memory that have no envelope yet, and how much
    /// memory may still be filled with theirs.
    fn missing_ahead(&self, limit: usize) -> (Vec<u64>, u64) {
        let s = self.lock();
        let seqs = s.mem.iter().take(limit).filter(|it| it.env.is_none()).map(|it| it.seq).collect();
        (seqs, READ_AHEAD_BYTES.saturating_sub(s.mem_bytes))
    }

    /// Read-ahead records: whatever decodes is kept with its item; the rest is handled (and
    /// checked again) when its item comes up.
    fn fill_records(&self, recs: impl IntoIterator<Item = (u64, Option<Vec<u8>>)>) {
        let envs = recs
            .into_iter()
            .filter_map(|(seq, rec)| {
                let rec = rec?;
                let env = record::decode(&rec).ok()?;
                Some((seq, (Arc::new(env), record::weight(&rec))))
            })
            .collect();
        self.fill(envs);
    }

    fn fill(&self, mut envs: HashMap<u64, (Arc<Envelope>, u64)>) {
        if envs.is_empty() {
            return;
        }
        let mut s = self.lock();
        let mut added = 0;
        for it in s.mem.iter_mut().filter(|it| it.env.is_none()) {
            if let Some((env, weight)) = envs.remove(&it.seq) {
                it.env = Some(env);
                it.weight = weight;
                added += weight;
            }
        }
        s.mem_bytes += added;
    }

    fn put_back(&self, items: Vec<Item>) {
        let mut s = self.lock();
        for it in items.into_iter().rev() {
            s.mem_bytes += it.weight;
            s.mem.push_front(it);
        }
    }

    fn finished(&self, n: u64) {
        let mut s = self.lock();
        s.pending -= n as i64;
        crate::metrics::spool_pending(&self.name, s.pending());
    }

    /// When work is waiting on disk: (load after this seq, spill generation).
    fn needs_load(&self) -> Option<(Option<u64>, u64)> {
        let s = self.lock();
        (s.mem.is_empty() && s.spilled).then_some((s.cursor, s.spill_gen))
    }

    fn loaded(&self, rows: Vec<(u64, u32)>, gen: u64, complete: bool) {
        let mut s = self.lock();
        for (seq, attempts) in rows {
            if !matches!(s.cursor, Some(c) if seq <= c) {
                s.mem.push_back(Item { seq, attempts, env: None, weight: 0 });
                s.cursor = Some(seq);
            }
        }
        if complete && s.spill_gen == gen {
            s.spilled = false;
        }
    }

    #[cfg(test)]
    fn mem_bytes(&self) -> u64 {
        self.lock().mem_bytes
    }
}

/// All queues, by sink name; creating one starts its drain task.
pub(crate) struct Registry {
    shared: Arc<Shared>,
    queues: Mutex<HashMap<String, Arc<SinkQueue>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    runtime: tokio::runtime::Handle,
}

impl Registry {
    pub fn new(shared: Arc<Shared>, runtime: tokio::runtime::Handle) -> Arc<Self> {
        Arc::new(Registry { shared, queues: Mutex::default(), tasks: Mutex::default(), runtime })
    }

    /// The queue of `name`, created (with `on_disk` pending rows) and started if new.
    pub fn queue_with(&self, name: &str, on_disk: u64) -> Arc<SinkQueue> {
        self.queue_at_start(name, on_disk, false)
    }

    /// [`Registry::queue_with`], the queue paused from the start when it is new (a pause read
    /// from the spool holds before its drain task runs at all).
    pub fn queue_at_start(&self, name: &str, on_disk: u64, paused: bool) -> Arc<SinkQueue> {
        let mut queues = self.queues.lock().expect("queues lock");
        if let Some(q) = queues.get(name) {
            return q.clone();
        }
        let q = Arc::new(SinkQueue::new(name, on_disk, paused));
        queues.insert(name.to_owned(), q.clone());
        let task = self.runtime.spawn(drain(self.shared.clone(), q.clone()));
        self.tasks.lock().expect("tasks lock").push(task);
        q
    }

    pub fn queue(&self, name: &str) -> Arc<SinkQueue> {
        self.queue_with(name, 0)
    }

    pub fn all(&self) -> Vec<Arc<SinkQueue>> {
        self.queues.lock().expect("queues lock").values().cloned().collect()
    }

    /// Holds the registry's lock: the writer then stops between a commit and counting its
    /// new pending pairs (for tests of that moment).
    #[cfg(test)]
    pub fn hold(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<SinkQueue>>> {
        self.queues.lock().expect("queues lock")
    }

    pub fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *self.tasks.lock().expect("tasks lock"))
    }
}

/// Exponential backoff with jitter: uniform between `initial` and
/// `min(max, initial * 2^(failures-1))`.
pub fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    let initial = initial.max(Duration::from_millis(1));
    let exp = failures.saturating_sub(1).min(30);
    let cap = initial.saturating_mul(1u32 << exp).min(max).max(initial);
    let (lo, hi) = (initial.as_millis() as u64, cap.as_millis() as u64);
    Duration::from_millis(fastrand::u64(lo..=hi))
}

enum Outcome {
    Ok,
    Retry(SinkError),
    Dead(String),
}

/// One sink's drain loop, until the spool stops.
async fn drain(shared: Arc<Shared>, q: Arc<SinkQueue>) {
    let mut stop = shared.stop.subscribe();
    let cfg = &shared.cfg;
    let mut failures: u32 = 0;
    // Consecutive failed reads of the spool (logged at 1, 2, 4, … so that a disk in trouble
    // does not fill the log).
    let mut read_failures: u32 = 0;
    let mut parked_warned = false;
    // With `ordering = "conversation"`: which conversations have an event in flight or
    // waiting for its retry.
    let mut gate: Gate<Item> = Gate::new();
    // Deliveries done and not reported to the writer yet (see [`HOLD_DONE`]): reported before
    // the drain waits for anything but its next round's delivery, and when it stops.
    let mut held: Vec<u64> = Vec::new();
    loop {
        if *stop.borrow() {
            break;
        }
        let sink = shared.sinks.read().expect("sinks lock").get(&*q.name).cloned();
        let Some(sink) = sink else {
            report(&shared, &q, &mut held);
            if !parked_warned && q.pending() > 0 {
                tracing::warn!(sink = %q.name, pending = q.pending(), "sink is not in routes.toml any more; its pending deliveries stay in the spool until it comes back");
                parked_warned = true;
            }
            q.status.store(PARKED, Ordering::Release);
            tokio::select! {
                _ = q.wake.notified() => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        if parked_warned {
            tracing::info!(sink = %q.name, pending = q.pending(), "sink is back in routes.toml; delivering its pending work");
            parked_warned = false;
        }
        if q.is_paused() {
            report(&shared, &q, &mut held);
        }
        if held_paused(&q, &mut stop).await {
            continue;
        }

        // The round: `concurrency` when set, else the sink's own round (a file sink's is one
        // group, one sync), else 16.
        let limit = sink.concurrency().or_else(|| sink.round()).unwrap_or(CONCURRENCY);
        let ordered = sink.ordering() == SinkOrdering::Conversation;
        let mut batch = if ordered {
            let due = gate.take_due(Instant::now());
            if !due.is_empty() {
                q.put_back(due);
            }
            // The gate must see the conversations of the events read back from disk.
            read_ahead(&shared, &q).await;
            q.take_ordered(limit, &mut gate)
        } else {
            if gate.held() > 0 {
                // Ordering was switched off by a reload.
                q.put_back(gate.clear());
            }
            let due = gate.take_due(Instant::now());
            if !due.is_empty() {
                q.put_back(due);
            }
            q.take(limit)
        };
        if batch.is_empty() {
            report(&shared, &q, &mut held);
            if let Some((after, gen)) = q.needs_load() {
                q.status.store(BUSY, Ordering::Release);
                let (sh, name) = (shared.clone(), q.name.clone());
                let rows = blocking(move || memtable::load_pending(&sh, &name, after, WINDOW)).await;
                match rows {
                    Ok(rows) => {
                        read_failures = 0;
                        let complete = rows.len() < WINDOW;
                        q.loaded(rows, gen, complete);
                    }
                    Err(e) => {
                        read_failed(&shared, &q, &mut read_failures, &e);
                        sleep_or_stop(Duration::from_secs(1), &mut stop).await;
                    }
                }
                continue;
            }
            if let Some(due) = gate.next_due() {
                // Only events waiting for their retry in the conversation gate (and those of
                // their conversations) are left.
                q.status.store(FAILING, Ordering::Release);
                tokio::select! {
                    _ = q.wake.notified() => {}
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep_until(due.into()) => {}
                }
                continue;
            }
            q.status.store(IDLE, Ordering::Release);
            tokio::select! {
                _ = q.wake.notified() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        q.status.store(BUSY, Ordering::Release);
        // In the sink's hands from now until reported (or put back): not counted by the
        // memtable's bound.
        let taken = batch.len();
        shared.in_hand.fetch_add(taken, Ordering::Relaxed);

        // Work read back from disk: fetch its events, and those of the next items too (one
        // read transaction per chunk, not per batch), as far as the read-ahead budget goes.
        let mut done: Vec<u64> = Vec::new();
        let mut unreadable: Vec<(Item, Vec<u8>, record::RecordError)> = Vec::new();
        if batch.iter().any(|it| it.env.is_none()) {
            let must: Vec<u64> = batch.iter().filter(|it| it.env.is_none()).map(|it| it.seq).collect();
            let (ahead, budget) = q.missing_ahead(READ_AHEAD);
            let sh = shared.clone();
            let loaded = blocking(move || memtable::load_events(&sh, &must, &ahead, budget)).await;
            let mut recs: HashMap<u64, Option<Vec<u8>>> = match loaded {
                Ok(recs) => {
                    read_failures = 0;
                    recs.into_iter().collect()
                }
                Err(e) => {
                    read_failed(&shared, &q, &mut read_failures, &e);
                    q.put_back(batch);
                    shared.in_hand.fetch_sub(taken, Ordering::Relaxed);
                    sleep_or_stop(Duration::from_secs(1), &mut stop).await;
                    continue;
                }
            };
            let mut kept = Vec::with_capacity(batch.len());
            for mut it in batch {
                if it.env.is_some() {
                    kept.push(it);
                    continue;
                }
                match recs.remove(&it.seq).flatten() {
                    // The event row is gone: nothing to deliver; drop the stale pending row.
                    None => done.push(it.seq),
                    Some(rec) => match record::decode(&rec) {
                        Ok(env) => {
                            it.env = Some(Arc::new(env));
                            kept.push(it);
                        }
                        Err(e) => unreadable.push((it, rec, e)),
                    },
                }
            }
            batch = kept;
            q.fill_records(recs);
        }
        let mut unwritten = Vec::new();
        let unreadable_done = !unreadable.is_empty();
        for (it, rec, e) in unreadable {
            tracing::error!(sink = %q.name, seq = it.seq, file = %shared.path.display(), error = %e, "damaged spool record: not delivered; moving it to the dead-letter file as stored");
            let letter = DeadLetter::unreadable(&q.name, &e.to_string(), it.attempts, &rec);
            match shared.dead.append(&letter).await {
                Ok(()) => {
                    observe(&q.name, "dead", Instant::now());
                    done.push(it.seq)
                }
                Err(err) => {
                    tracing::error!(file = %shared.dead.path().display(), error = %err, "cannot write the dead-letter file; the record stays in the spool");
                    unwritten.push(it);
                }
            }
        }
        if !unwritten.is_empty() {
            q.put_back(unwritten);
            if batch.is_empty() {
                report(&shared, &q, &mut held);
                sleep_or_stop(Duration::from_secs(1), &mut stop).await;
            }
        }

        let started = Instant::now();
        let outcomes = {
            // The round goes to the sink at once: one result per event, in order (each in its
            // own `delivery` span; a file sink writes the round as one group, one sync).
            let envs: Vec<&Envelope> = batch.iter().map(|it| &**it.env.as_ref().expect("filled above")).collect();
            let deliveries = sink.deliver_many(&envs);
            tokio::select! {
                r = deliveries => r,
                _ = stop.changed() => {
                    // Shutdown: what is in flight stays pending (at least once).
                    q.put_back(batch);
                    shared.in_hand.fetch_sub(taken - done.len(), Ordering::Relaxed);
                    if !done.is_empty() {
                        q.finished(done.len() as u64);
                        held.append(&mut done);
                    }
                    break;
                }
            }
        };

        let mut retry = Vec::new();
        let mut retry_after: Option<Duration> = None;
        let mut last_error = String::new();
        let mut batch_error = None;
        let mut attempts_update = Vec::new();
        let mut confirmed = 0usize;
        let attempted = batch.len();
        let elapsed = started.elapsed();
        // A sink that answered for fewer events than it was given has lost the others: they
        // are retried, never taken as delivered.
        let outcomes = outcomes
            .into_iter()
            .chain(std::iter::repeat_with(|| Err(SinkError::retryable("the sink gave no result for this delivery"))));
        for (mut it, r) in batch.into_iter().zip(outcomes) {
            let attempts = it.attempts.saturating_add(1);
            let outcome = match r {
                Ok(()) => Outcome::Ok,
                Err(e) if e.is_permanent() => Outcome::Dead(e.message),
                Err(e) if attempts >= cfg.max_attempts => {
                    Outcome::Dead(format!("{} (gave up after {attempts} attempts)", e.message))
                }
                Err(e) => Outcome::Retry(e),
            };
            match outcome {
                Outcome::Ok => {
                    // Counted in the metrics once for the round, below.
                    confirmed += 1;
                    gate.release(it.conversation(), it.seq);
                    done.push(it.seq);
                }
                Outcome::Retry(e) => {
                    observe(&q.name, "retry", started);
                    batch_error = Some(e.message.clone());
                    retry_after = retry_after.max(e.retry_after);
                    last_error = e.message;
                    it.attempts = attempts;
                    attempts_update.push((it.seq, attempts));
                    retry.push(it);
                }
                Outcome::Dead(reason) => {
                    observe(&q.name, "dead", started);
                    batch_error = Some(reason.clone());
                    let env = it.env.as_ref().expect("filled above");
                    tracing::warn!(sink = %q.name, event_id = %env.event.id, traceparent = %env.trace, attempts, %reason, "delivery abandoned; writing a dead letter");
                    let letter = DeadLetter::new(&q.name, &reason, attempts, env);
                    match shared.dead.append(&letter).await {
                        Ok(()) => {
                            // A dead letter releases the conversation's next event.
                            gate.release(it.conversation(), it.seq);
                            done.push(it.seq)
                        }
                        Err(err) => {
                            tracing::error!(file = %shared.dead.path().display(), error = %err, "cannot write the dead-letter file; the delivery stays in the spool");
                            it.attempts = attempts.saturating_sub(1);
                            retry.push(it);
                        }
                    }
                }
            }
        }
        crate::metrics::deliveries(&q.name, "ok", elapsed, confirmed);
        q.note_outcome(batch_error, confirmed > 0);
        // What is not done goes back to the queue or waits in the gate: out of the sink's hands.
        shared.in_hand.fetch_sub(taken - done.len(), Ordering::Relaxed);
        if !done.is_empty() {
            q.finished(done.len() as u64);
            held.append(&mut done);
        }
        // Held only while every event of the round was confirmed (and no damaged record was
        // dead-lettered): a failure, a dead letter or a retry is reported at once.
        if confirmed < attempted || unreadable_done || held.len() >= HOLD_DONE {
            report(&shared, &q, &mut held);
        }
        if confirmed > 0 && retry_after.is_none() && !retry.is_empty() {
            // The sink is up and only these events fail: each waits for its own retry in the
            // gate (with ordering, its conversation stays held), and the sink's other events
            // go on meanwhile, rather than the whole sink backing off for a few failures.
            shared.send(Op::Book(Bookkeeping::Attempts {
                sink: q.name.clone(),
                items: std::mem::take(&mut attempts_update),
            }));
            defer(&q, &mut gate, std::mem::take(&mut retry), &last_error, cfg, ordered);
        }
        if retry.is_empty() {
            if failures > 0 {
                tracing::info!(sink = %q.name, "sink accepts deliveries again");
            }
            failures = 0;
            continue;
        }
        if !attempts_update.is_empty() {
            shared.send(Op::Book(Bookkeeping::Attempts { sink: q.name.clone(), items: attempts_update }));
        }
        // An event back from the gate's own backoff is not retried sooner than its attempts
        // call for (a success of others in between reset `failures`).
        let own = retry.iter().map(|it| it.attempts).max().unwrap_or(0);
        q.put_back(retry);
        failures = failures.saturating_add(1);
        let mut delay = backoff(cfg.retry_initial, cfg.retry_max, failures.max(own));
        if let Some(ra) = retry_after {
            delay = delay.max(ra.min(MAX_RETRY_AFTER));
        }
        if failures == 1 || failures.is_power_of_two() {
            tracing::warn!(sink = %q.name, pending = q.pending(), error = %last_error, retry_in = ?delay, failures, "delivery failed; retrying");
        }
        q.status.store(FAILING, Ordering::Release);
        sleep_or_stop(delay, &mut stop).await;
    }
    // The writer records what was delivered before it stops (the shutdown waits for the
    // drains first).
    report(&shared, &q, &mut held);
    tracing::debug!(sink = %q.name, "drain stopped");
}

/// Tells the writer about the deliveries done that `held` holds (see [`HOLD_DONE`]).
fn report(shared: &Shared, q: &SinkQueue, held: &mut Vec<u64>) {
    if held.is_empty() {
        return;
    }
    #[cfg(test)]
    shared.done_reports.fetch_add(1, Ordering::AcqRel);
    let n = held.len();
    shared.send(Op::Book(Bookkeeping::Done { sink: q.name.clone(), seqs: std::mem::take(held) }));
    // Out of hand once sent: the writer counts them until it applies the report, and a full
    // memtable takes the reports it holds first (`Writer::settles`).
    shared.in_hand.fetch_sub(n, Ordering::Relaxed);
}

/// The gate before an attempt: while the sink is paused, waits (for a resume, new work or
/// the stop) and returns true, so that the drain looks again; false when it may deliver.
async fn held_paused(q: &SinkQueue, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    if !q.is_paused() {
        return false;
    }
    q.status.store(PAUSED, Ordering::Release);
    tokio::select! {
        _ = q.wake.notified() => {}
        _ = stop.changed() => {}
    }
    true
}

/// When the sink's other deliveries of the round went through: each failed event waits in the
/// gate for its own backoff (with ordering, its conversation stays held), so a few failures do
/// not put the whole sink into backoff.
fn defer(
    q: &SinkQueue,
    gate: &mut Gate<Item>,
    retry: Vec<Item>,
    error: &str,
    cfg: &crate::config::DeliveryConfig,
    ordered: bool,
) {
    let now = Instant::now();
    for it in retry {
        let delay = backoff(cfg.retry_initial, cfg.retry_max, it.attempts);
        // Without ordering nothing is held: the event only waits for its own retry.
        let conversation = if ordered { it.conversation().map(str::to_owned) } else { None };
        if it.attempts == 1 || it.attempts.is_power_of_two() {
            let event_id = it.env.as_ref().map_or("", |e| e.event.id.as_str());
            tracing::warn!(sink = %q.name, event_id, conversation = conversation.as_deref().unwrap_or(""), attempts = it.attempts, retry_in = ?delay, %error, "delivery failed; it waits for its retry, the sink's other events go on");
        }
        gate.defer(conversation.as_deref(), it.seq, it, now + delay);
    }
}

/// For a sink with ordering: reads back the events of the next items that are only on disk
/// (the first one whatever its size, the others as far as the read-ahead budget goes), so
/// that the gate knows their conversations and one stuck conversation does not hold back the
/// events behind it. Best effort: what is not read here is read when its item comes up.
async fn read_ahead(shared: &Arc<Shared>, q: &SinkQueue) {
    let (mut ahead, budget) = q.missing_ahead(READ_AHEAD);
    if ahead.is_empty() {
        return;
    }
    let front = q.lock().mem.front().filter(|it| it.env.is_none()).map(|it| it.seq);
    let must: Vec<u64> = front.into_iter().collect();
    ahead.retain(|seq| !must.contains(seq));
    if must.is_empty() && budget == 0 {
        return;
    }
    let sh = shared.clone();
    if let Ok(recs) = blocking(move || memtable::load_events(&sh, &must, &ahead, budget)).await {
        q.fill_records(recs);
    }
}

/// Runs a read of the spool on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, store::StoreError> + Send + 'static,
) -> Result<T, ReadError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ReadError::Store),
        Err(e) => Err(ReadError::Task(e)),
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Store(store::StoreError),
    #[error("spool read task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

fn read_failed(shared: &Shared, q: &SinkQueue, failures: &mut u32, e: &ReadError) {
    *failures = failures.saturating_add(1);
    let quiet = matches!(e, ReadError::Store(store::StoreError::Reopening));
    if !quiet && (*failures == 1 || failures.is_power_of_two()) {
        tracing::error!(sink = %q.name, file = %shared.path.display(), error = %e, failures = *failures, "cannot read pending work from the spool; retrying");
    }
}

async fn sleep_or_stop(d: Duration, stop: &mut tokio::sync::watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.changed() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_in_memory_is_bounded_by_bytes_as_well_as_by_count() {
        let body = br#"{"type":"payment"}"#;
        let ev = crate::event::normalise(body, None, &Default::default(), chrono::Utc::now()).unwrap();
        let env = Arc::new(Envelope::new(ev, bytes::Bytes::from_static(body)));
        let q = SinkQueue::new("s", 0, false);
        for seq in 0..10 {
            q.enqueue(seq, env.clone(), WINDOW_BYTES / 4 + 1);
        }
        assert_eq!(q.lock().mem.len(), 3, "the rest waits on disk");
        assert!(q.mem_bytes() <= WINDOW_BYTES && q.lock().spilled);
        assert_eq!(q.pending(), 10);
        let taken = q.take(2);
        assert_eq!(q.mem_bytes(), WINDOW_BYTES / 4 + 1);
        q.put_back(taken);
        assert_eq!(q.mem_bytes(), 3 * (WINDOW_BYTES / 4 + 1));
        // One item is always held, however large.
        let big = SinkQueue::new("t", 0, false);
        big.enqueue(0, env, WINDOW_BYTES * 4);
        assert_eq!(big.lock().mem.len(), 1);
    }

    /// The writer counts a new pending pair (`enqueue`) just after its commit; a drain that
    /// reads the sink's backlog back from disk in between sees the row already, and may
    /// deliver and finish it first. The count must come out exact all the same (it once
    /// stayed above 0 for good: a finish below 0 was clamped, the late count was not).
    #[test]
    fn a_pair_finished_before_the_writer_counts_it_leaves_the_count_exact() {
        let body = br#"{"type":"payment"}"#;
        let ev = crate::event::normalise(body, None, &Default::default(), chrono::Utc::now()).unwrap();
        let env = Arc::new(Envelope::new(ev, bytes::Bytes::from_static(body)));
        // One pair on disk at the start; seq 1 committed meanwhile, not counted yet.
        let q = SinkQueue::new("s", 1, false);
        let (after, gen) = q.needs_load().unwrap();
        assert_eq!(after, None);
        q.loaded(vec![(0, 0), (1, 0)], gen, true);
        let batch = q.take(CONCURRENCY);
        assert_eq!(batch.iter().map(|it| it.seq).collect::<Vec<_>>(), [0, 1]);
        q.finished(batch.len() as u64);
        // The writer's count of seq 1 arrives now: not queued again, and nothing is left.
        q.enqueue(1, env, 10);
        assert_eq!(q.pending(), 0);
        assert!(q.lock().mem.is_empty() && q.needs_load().is_none());
    }

    #[test]
    fn backoff_grows_between_the_bounds() {
        let (lo, hi) = (Duration::from_millis(200), Duration::from_secs(30));
        for failures in 0..40 {
            for _ in 0..50 {
                let d = backoff(lo, hi, failures);
                assert!(d >= lo && d <= hi, "{failures}: {d:?}");
                let cap = lo.saturating_mul(1 << failures.saturating_sub(1).min(30)).min(hi);
                assert!(d <= cap.max(lo), "{failures}: {d:?} > {cap:?}");
            }
        }
        // With many failures the jitter spans the whole range.
        let spread: Vec<_> = (0..200).map(|_| backoff(lo, hi, 20)).collect();
        assert!(spread.iter().any(|d| *d < Duration::from_secs(10)));
        assert!(spread.iter().any(|d| *d > Duration::from_secs(20)));
    }
}
