//! The one writer: a thread that takes every queued change (new events from webhook
//! requests, deliveries done, attempt counts), makes the batch durable (one frame of the
//! write-ahead file, one fdatasync), and only then answers the waiting requests — group
//! commit: N concurrent requests share one flush.
//!
//! A batch is made durable by one frame appended to the write-ahead file ([`super::wal`])
//! and one `fdatasync` of it; its effects are then kept in memory, in the memtable
//! ([`super::memtable`]), with no redb transaction. About once a second (or when the
//! write-ahead file passes [`wal::CHECKPOINT_BYTES`], or the memtable its bound) the whole
//! memtable is committed to redb — the checkpoint: it records in `meta` the seq below which
//! redb holds everything, and the next frames go to the other write-ahead file. The commit is
//! made without durability on this thread (readers see it at once), and durable on the
//! checkpoint thread ([`super::behind`]) while the next batches are framed and answered.
//!
//! **When an append or a commit fails** (a full disk, an I/O error), redb refuses every later
//! transaction on that handle until the file is reopened. The writer then turns *broken*: new
//! events are refused at once (503 + `Retry-After`; `/readyz` says why), bookkeeping waits, and
//! at growing intervals it tries to heal — close the file, reopen it (redb rolls back to the
//! last checkpoint), apply the memtable's bookkeeping of redb's rows, replay the write-ahead
//! file (the memtable's events), and prove with a probe commit that the disk takes writes — so
//! the daemon resumes by itself once space is back. It never spins
//! on a failing commit: it waits for work or for the next attempt, and stops with the spool.

use super::behind::{Behind, Ended};
use super::lanes::{self, Lanes};
use super::memtable::Memtable;
use super::ops::{Append, Bookkeeping, Op, Pause};
use super::queue::{Registry, SinkQueue};
use super::record;
use super::store::{self, Op as _, StoreError, DEDUP_BATCHES, EVENTS, META, PENDING};
use super::wal::{self, apply_book, Wal};
use super::Shared;
use crate::dedup::{now_millis, KeySet};
use crate::delivery::{Accepted, Refused};
use redb::Database;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// At most this many operations, or this many bytes of new events, per transaction.
const MAX_OPS: usize = 4096;
const MAX_BATCH_BYTES: u64 = 16 << 20;
/// The checkpoint (a durable redb commit) follows the last one after this long, at the first
/// batch then (or at once when nothing comes), so that redb can reuse freed pages and the
/// write-ahead file starts again.
const ACK_FSYNC_EVERY: Duration = Duration::from_secs(1);

/// The checkpoint comes sooner once the memtable holds this many events still pending (a
/// sink behind its load): the checkpoint writes them to redb while every webhook waits, and a
/// second's worth of them (tens of thousands) held the answers for ~50 ms. The count is taken
/// after the batch's bookkeeping, and a memtable at its bound first takes the deliveries that
/// wait for their batch ([`Deferred`]): a sink that keeps up (whose deliveries reach the
/// writer up to `DEFER_FOR` late) does not reach it. Nor do the deliveries the drains have in
/// hand ([`Shared::in_hand`]: in a sink's hands, or done and held), up to twice the bound
/// ([`Writer::counted`]): the memtable holds at most `2 * CHECKPOINT_EVENTS` events (plus one
/// batch) before a bound checkpoint.
pub(super) const CHECKPOINT_EVENTS: usize = 512;

/// The write-ahead frame's buffer is kept from one batch to the next up to this size.
const WAL_BUF_KEEP: usize = 1 << 20;
/// A landed batch's buffers are kept for a later one while they hold at most this many
/// appends (a burst's larger ones are freed: memory stays flat between bursts).
const SPARE_KEEP: usize = 1024;

/// Bookkeeping ops applied together once this many rows are waiting, or this long after the
/// first one (each such batch is a frame and an fdatasync: at most about 1 / DEFER_FOR a
/// second when no new event comes).
const DEFER_ROWS: usize = 4096;
const DEFER_FOR: Duration = Duration::from_millis(50);

/// What a webhook refused because the spool cannot be written is told to wait.
const BROKEN_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Heal attempts: the first soon after the failure, then less and less often.
const HEAL_FIRST: Duration = Duration::from_millis(100);
const HEAL_MAX: Duration = Duration::from_secs(5);
/// Below this much free space a heal is not even tried (a reopen may read the whole file).
const MIN_FREE_BYTES: u64 = 256 << 10;
/// How long a heal waits for the drain tasks' reads of the old handle to finish.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Deferred {
    ops: Vec<Bookkeeping>,
    rows: usize,
    since: Option<Instant>,
}

impl Deferred {
    fn push(&mut self, op: Bookkeeping) {
        self.rows += op.rows();
        self.since.get_or_insert_with(Instant::now);
        self.ops.push(op);
    }

    fn due(&self) -> bool {
        self.rows >= DEFER_ROWS || self.since.is_some_and(|t| t.elapsed() >= DEFER_FOR)
    }

    /// How long until [`Deferred::due`] (when something waits).
    fn wait(&self) -> Option<Duration> {
        if self.rows >= DEFER_ROWS {
            return Some(Duration::ZERO);
        }
        self.since.map(|t| DEFER_FOR.saturating_sub(t.elapsed()))
    }

    fn take(&mut self) -> Vec<Bookkeeping> {
        self.rows = 0;
        self.since = None;
        std::mem::take(&mut self.ops)
    }
}

/// Buffers kept from one batch to the next, so that a commit allocates none of them.
#[derive(Default)]
pub(crate) struct Scratch {
    appends: Vec<Append>,
    pauses: Vec<Pause>,
    /// Each append's dedup key (when the window is on), and whether the window holds it.
    keys: Vec<u128>,
    seen: Vec<bool>,
    in_batch: KeySet,
    /// Each append's seq (`None`: a duplicate).
    seqs: Vec<Option<u64>>,
    /// The keys of the events a commit accepted that enter the dedup window.
    ids: Vec<u128>,
    /// Each append's memory weight (see [`record::weight`]), taken before its record goes
    /// into the memtable.
    weights: Vec<u64>,
    /// The sink queues the writer fills, by name (looked up in the [`Registry`] once: it
    /// never drops a queue), and for a landing batch the queues of each accepted append
    /// (indices into `queues`, `targets_end[i]`: where append i's end in `targets`).
    queues: Vec<(String, Arc<SinkQueue>)>,
    targets: Vec<u32>,
    targets_end: Vec<u32>,
}

impl Scratch {
    /// Fills `targets` and `targets_end` with the queues of each accepted append of
    /// `appends`; a queue not known yet is taken from `registry` (which may wait for its lock)
    /// and kept. Without a registry, false as soon as one is not known (`targets` is then
    /// incomplete).
    fn targets_for(&mut self, appends: &[Append], seqs: &[Option<u64>], registry: Option<&Registry>) -> bool {
        self.targets.clear();
        self.targets_end.clear();
        for (a, seq) in appends.iter().zip(seqs) {
            if seq.is_some() {
                for sink in &a.sinks {
                    let i = match self.queues.iter().position(|(n, _)| n == sink) {
                        Some(i) => i,
                        None => match registry {
                            Some(r) => {
                                self.queues.push((sink.clone(), r.queue(sink)));
                                self.queues.len() - 1
                            }
                            None => return false,
                        },
                    };
                    self.targets.push(i as u32);
                }
            }
            self.targets_end.push(self.targets.len() as u32);
        }
        true
    }
}

/// A landed batch's buffers, kept for a later one (see [`SPARE_KEEP`]).
#[derive(Default)]
struct Spare {
    appends: Vec<Append>,
    seqs: Vec<Option<u64>>,
    ids: Vec<u128>,
    weights: Vec<u64>,
}

/// A batch whose frame is written and whose `fdatasync` is in flight (or that waits for the
/// frames before it: a batch of duplicates only has no frame). Answered once every frame up
/// to its own is durable, in order.
struct Flight {
    ticket: u64,
    /// Where its frame ends in the write-ahead file.
    end: u64,
    appends: Vec<Append>,
    /// As [`Scratch`]'s, for this batch.
    seqs: Vec<Option<u64>>,
    ids: Vec<u128>,
    weights: Vec<u64>,
    book: Vec<Bookkeeping>,
    now: u64,
    first_seq: u64,
    accepted: u64,
    /// Bytes of the events it accepts, and of the duplicates it refuses.
    added: u64,
    duplicate: u64,
    /// The sync's result, once it ended.
    result: Option<std::io::Result<()>>,
}

/// The frames in flight (see [`super::lanes`]).
#[derive(Default)]
pub(crate) struct Pipeline {
    /// `None`: not started yet, or they could not start (each frame is then synced by the
    /// writer itself).
    lanes: Option<Lanes>,
    flights: VecDeque<Flight>,
    next_ticket: u64,
    /// The dedup keys of the events in flight: a re-send that comes meanwhile is a duplicate
    /// (answered after the first one's frame is durable, and refused if it fails).
    ids: KeySet,
    /// The buffers of landed batches, for the next ones.
    spare: Vec<Spare>,
    /// The writer's queue, for the sync lanes to wake it: taken from [`Shared`] (under the
    /// lock the webhooks' sends hold) when a frame goes out with none in flight, and let go
    /// once none is (the writer stops when every sender is gone).
    wake: Option<mpsc::Sender<Op>>,
}

/// The writer cannot commit: since when, why, and when it tries again.
struct Broken {
    since: Instant,
    reason: String,
    attempts: u32,
    next_try: Instant,
}

impl Pipeline {
    /// The sync of `ticket` ended.
    fn ended(&mut self, ticket: u64, result: std::io::Result<()>) {
        if let Some(f) = self.flights.iter_mut().find(|f| f.ticket == ticket) {
            f.result = Some(result);
        }
    }
}

impl Broken {
    /// Broken now, for `reason`; the first heal is tried `after` that.
    fn new(reason: String, after: Duration) -> Broken {
        let since = Instant::now();
        Broken { since, reason, attempts: 0, next_try: since + after }
    }

    fn delay(attempts: u32) -> Duration {
        HEAL_FIRST.saturating_mul(1u32 << attempts.min(16)).min(HEAL_MAX)
    }
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
    /// When the last checkpoint (durable redb commit) happened, and whether frames (and the
    /// memtable) wait for the next one.
    pub last_fsync: Instant,
    pub unsynced: bool,
    /// The memtable held [`CHECKPOINT_EVENTS`] events after the last batch (its bookkeeping
    /// applied): the next batch takes the deferred bookkeeping, and is the checkpoint when the
    /// memtable is still full after that and after the frames in flight are answered (their
    /// bookkeeping applied).
    pub full: bool,
    /// The frames whose `fdatasync` is in flight.
    pub pipe: Pipeline,
    /// A handle being closed whose readers had not finished yet.
    pub closing: Option<Arc<Database>>,
    pub scratch: Scratch,
    /// The write-ahead file.
    pub wal: Wal,
    /// The checkpoint generation new frames are written under (`meta.wal_generation`).
    pub gen: u64,
    /// The thread that makes checkpoints durable behind the webhooks (`None`: not started,
    /// or it could not start; each checkpoint is then a durable commit of the writer's own).
    pub behind: Option<Behind>,
    /// A checkpoint's durable commit failed after its non-durable one had emptied the
    /// memtable: the heal counts the spool's bytes again (see [`Writer::heal`]).
    pub lost_checkpoint: bool,
}

impl Writer {
    pub fn run(mut self, rx: mpsc::Receiver<Op>) {
        match Lanes::start(
            &self.wal.paths,
            #[cfg(test)]
            self.shared.wal_faults.clone(),
        ) {
            Ok(l) => self.pipe.lanes = Some(l),
            Err(e) => {
                tracing::warn!(file = %self.wal.path.display(), error = %e, "spool: cannot start the write-ahead file's sync threads; each frame is synced in turn");
            }
        }
        match Behind::start(
            #[cfg(test)]
            self.shared.behind.clone(),
        ) {
            Ok(b) => self.behind = Some(b),
            Err(e) => {
                tracing::warn!(file = %self.shared.path.display(), error = %e, "spool: cannot start the checkpoint thread; each checkpoint is committed by the writer");
            }
        }
        let mut carry: Vec<Bookkeeping> = Vec::new();
        // Bookkeeping (deliveries done, attempt counts) waits for a transaction of its own
        // while new events keep coming (at most DEFER_FOR): removing a run of rows at once
        // rewrites far fewer pages than touching both ends of the tables in every commit. It
        // is in the write-ahead file's frame of that transaction.
        let mut deferred = Deferred::default();
        let mut broken: Option<Broken> = None;
        let mut appends = std::mem::take(&mut self.scratch.appends);
        let mut pauses = std::mem::take(&mut self.scratch.pauses);
        loop {
            // Wait for work: without limit when idle, until the next heal attempt when
            // broken, not at all when bookkeeping handed back by a failed commit is waiting,
            // until deferred bookkeeping is due, until the checkpoint is due when frames (and
            // the memtable) are waiting for one.
            let checkpoint_in = self.unsynced.then(|| ACK_FSYNC_EVERY.saturating_sub(self.last_fsync.elapsed()));
            if self.pipe.flights.is_empty() {
                // No sync to wake us: the queue must be able to close.
                self.pipe.wake = None;
            }
            let wait = match &broken {
                Some(b) => Some(b.next_try.saturating_duration_since(Instant::now())),
                None if !carry.is_empty() => Some(Duration::ZERO),
                None => match (deferred.wait(), checkpoint_in) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
            };
            let first = match wait {
                None => match rx.recv() {
                    Ok(op) => Some(op),
                    Err(_) => break,
                },
                Some(d) => match rx.recv_timeout(d) {
                    Ok(op) => Some(op),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut bytes = 0u64;
            let mut next = first;
            while let Some(op) = next {
                match op {
                    Op::Append(a) => {
                        bytes += a.rec.len() as u64;
                        appends.push(a);
                    }
                    Op::Book(b) => deferred.push(b),
                    Op::Pause(p) => pauses.push(p),
                    Op::Synced => {}
                }
                if appends.len() + deferred.ops.len() >= MAX_OPS || bytes >= MAX_BATCH_BYTES {
                    break;
                }
                next = rx.try_recv().ok();
            }
            // Answer the batches whose frames are durable now.
            if let Err((e, rest)) = self.land(usize::MAX) {
                carry.extend(rest);
                broken = Some(self.broke(&e));
            }
            // A checkpoint's durable commit that ended behind the webhooks.
            if broken.is_none() {
                let ended = self.behind.as_mut().and_then(Behind::try_ended);
                if let Err(e) = self.ended(ended) {
                    broken = Some(self.broke(&e));
                }
            }

            if let Some(b) = &mut broken {
                if Instant::now() >= b.next_try {
                    match self.heal() {
                        Ok(()) => {
                            tracing::info!(file = %self.shared.path.display(), after = ?b.since.elapsed(), attempts = b.attempts + 1, "spool can be written again; accepting webhooks");
                            self.shared.set_trouble(None);
                            broken = None;
                        }
                        Err(e) => {
                            b.attempts += 1;
                            b.next_try = Instant::now() + Broken::delay(b.attempts);
                            let reason = e.to_string();
                            if reason != b.reason || b.attempts.is_power_of_two() {
                                tracing::warn!(file = %self.shared.path.display(), error = %chain(&e), attempts = b.attempts, "spool still cannot be written; webhooks get 503");
                            }
                            b.reason = reason;
                            self.shared.set_trouble(Some(format!("the spool cannot commit: {}", b.reason)));
                        }
                    }
                }
                if broken.is_some() {
                    self.refuse(&mut appends);
                    for p in pauses.drain(..) {
                        let _ = p.reply.send(Err(StoreError::Reopening));
                    }
                    continue;
                }
            }
            let mut book = Vec::new();
            // A pause or resume (an operator at work: `replay` reads the pending rows next)
            // sees every delivery recorded so far.
            // A memtable at its bound takes the deliveries that wait first (in this batch's
            // frame): the events they finish leave it, and only those still pending count.
            let settle = self.full && !deferred.ops.is_empty();
            if deferred.due() || (appends.is_empty() && !carry.is_empty()) || !pauses.is_empty() || settle {
                book = std::mem::take(&mut carry);
                book.extend(deferred.take());
            }
            // Nothing new, but frames wait for their checkpoint: make it now. A pause's commit
            // is a checkpoint too, so the memtable goes to redb first.
            let checkpoint_due = self.unsynced && self.last_fsync.elapsed() >= ACK_FSYNC_EVERY;
            let force = !pauses.is_empty();
            if !appends.is_empty() || !book.is_empty() || checkpoint_due || force {
                if let Err((e, rest)) = self.apply(&mut appends, book, force) {
                    carry.extend(rest);
                    broken = Some(self.broke(&e));
                }
            }
            if broken.is_some() {
                for p in pauses.drain(..) {
                    let _ = p.reply.send(Err(StoreError::Reopening));
                }
            } else {
                self.pause(&mut pauses);
            }
        }
        self.finish(carry, deferred, broken);
        tracing::debug!("spool writer stopped");
    }

    /// A commit failed: logged, and the writer broken until its first heal ([`HEAL_FIRST`]).
    fn broke(&self, e: &StoreError) -> Broken {
        tracing::error!(file = %self.shared.path.display(), error = %chain(e), "spool commit failed; webhooks get 503 until it works again");
        Broken::new(e.to_string(), HEAL_FIRST)
    }

    /// The spool is closing: record what the drains reported, durably, if the disk lets us —
    /// once, not in a loop (the shutdown deadline waits for this thread).
    fn finish(&mut self, mut carry: Vec<Bookkeeping>, mut deferred: Deferred, mut broken: Option<Broken>) {
        carry.extend(deferred.take());
        if let Err(e) = self.wait_behind() {
            broken.get_or_insert_with(|| Broken::new(e.to_string(), Duration::ZERO));
        }
        if let Err((e, rest)) = self.land(0) {
            carry.extend(rest);
            broken.get_or_insert_with(|| Broken::new(e.to_string(), Duration::ZERO));
        }
        if broken.is_some() {
            if let Err(e) = self.heal() {
                tracing::error!(file = %self.shared.path.display(), error = %chain(&e), "spool: still cannot write at shutdown; the last deliveries will repeat after the restart");
                return;
            }
        }
        if !carry.is_empty() || self.unsynced || self.wal.len > 0 {
            if let Err((e, _)) = self.apply(&mut Vec::new(), carry, true) {
                tracing::error!(file = %self.shared.path.display(), error = %chain(&e), "spool: the last deliveries could not be recorded; they will repeat after the restart");
            }
        }
    }

    /// Records pauses and resumes, each durably (a rare operator action: no batching); each
    /// such commit is a checkpoint too (the batch before was one: the memtable is empty).
    fn pause(&mut self, pauses: &mut Vec<Pause>) {
        for p in pauses.drain(..) {
            // Only with nothing in the memtable may the commit say that redb holds everything.
            let checkpoint = self.shared.mem().is_empty().then_some((self.next_seq, self.gen + 1));
            let result =
                self.shared.db().and_then(|db| store::set_paused(&db, &p.sink, p.paused, now_millis(), checkpoint));
            match &result {
                Ok(()) if checkpoint.is_some() => self.checkpointed(),
                Ok(()) => {}
                Err(_) => crate::metrics::spool_write_error(),
            }
            let _ = p.reply.send(result);
        }
    }

    /// A redb commit recorded the checkpoint (and the next generation): everything before it
    /// is in redb (durably, or once the durable commit behind it ends). The next frames go to
    /// the other write-ahead file, which the checkpoint before (durable by now: one in flight
    /// at most) covers.
    fn checkpointed(&mut self) {
        self.full = false;
        self.gen += 1;
        self.last_fsync = Instant::now();
        self.unsynced = false;
        self.wal.switch();
    }

    /// What a checkpoint's durable commit behind the webhooks ended with (`None`: it has not,
    /// or none was in flight). A failure turns the writer broken: its heal replays both
    /// write-ahead files into the reopened file.
    fn ended(&mut self, ended: Option<Ended>) -> Result<(), StoreError> {
        match ended {
            None => Ok(()),
            Some(Ended { result: Ok(()), took }) => {
                tracing::debug!(commit_us = took.as_micros() as u64, "spool: checkpoint durable");
                Ok(())
            }
            Some(Ended { result: Err(e), .. }) => {
                self.lost_checkpoint = true;
                crate::metrics::spool_write_error();
                self.shared.set_trouble(Some(format!("the spool cannot commit: {e}")));
                Err(e)
            }
        }
    }

    /// Waits for the checkpoint's durable commit in flight, if any (see [`Writer::ended`]).
    fn wait_behind(&mut self) -> Result<(), StoreError> {
        let ended = self.behind.as_mut().and_then(Behind::wait);
        self.ended(ended)
    }

    /// The checkpoint, behind the webhooks: the memtable is committed to redb without
    /// durability (readers see its rows there at once; the memtable's lock is held until it is
    /// empty, as for a durable one), the next frames go to the other write-ahead file, and
    /// the durable commit is handed to the checkpoint thread ([`super::behind`]). The
    /// batch that brought it is framed after it, as any other. Returns the bytes it freed.
    fn checkpoint_behind(&mut self, now: u64, prune: bool) -> Result<(usize, u64), StoreError> {
        let db = self.shared.db()?;
        let shared = self.shared.clone();
        let mut mem = shared.mem();
        let result = super::guard::catch(|| self.memtable_commit(&db, &mem, now, prune))
            .map_err(StoreError::from)
            .and_then(|r| r);
        let freed = match result {
            Ok(freed) => freed,
            Err(e) => {
                drop(mem);
                return Err(e);
            }
        };
        let held = mem.events.len();
        mem.clear();
        drop(mem);
        self.last_prune = if prune { now } else { self.last_prune };
        self.committed_bytes = self.committed_bytes.saturating_sub(freed);
        self.shared.used.fetch_sub(freed, Ordering::AcqRel);
        crate::metrics::spool_bytes(self.committed_bytes);
        crate::metrics::spool_flush(0);
        self.checkpointed();
        let wake = self.shared.waker();
        let submitted = self.behind.as_mut().is_some_and(|b| b.submit(db.clone(), wake));
        if !submitted {
            // No thread: made durable here.
            self.behind = None;
            let durable = super::guard::catch(|| -> Result<(), StoreError> {
                let tx = db.begin_write().op("begin")?;
                tx.commit().op("commit")
            })
            .map_err(StoreError::from)
            .and_then(|r| r);
            if let Err(e) = durable {
                self.lost_checkpoint = true;
                return Err(e);
            }
        }
        Ok((held, freed))
    }

    /// The non-durable commit of [`Writer::checkpoint_behind`]: the memtable, the checkpoint
    /// (every seq below the next one) and the next generation; returns the bytes freed (of
    /// rows redb held: the memtable's own were counted when they went).
    fn memtable_commit(&self, db: &Database, mem: &Memtable, now: u64, prune: bool) -> Result<u64, StoreError> {
        let mut tx = db.begin_write().op("begin")?;
        tx.set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Redb { op: "set durability", source: Box::new(e.into()) })?;
        let t0 = Instant::now();
        let freed = mem.write(&tx, &self.names)?;
        let t1 = t0.elapsed();
        {
            let mut meta = tx.open_table(META).op("open meta")?;
            meta.insert(wal::CHECKPOINT, self.next_seq).op("write meta")?;
            meta.insert(wal::GENERATION, self.gen + 1).op("write meta")?;
        }
        if prune {
            store::prune_dedup(&tx, now.saturating_sub(self.shared.dedup.window().as_millis() as u64))?;
        }
        let t2 = t0.elapsed();
        tx.commit().op("commit")?;
        tracing::debug!(
            write_us = t1.as_micros() as u64,
            prune_us = (t2 - t1).as_micros() as u64,
            commit_us = (t0.elapsed() - t2).as_micros() as u64,
            dedup_rows = mem.dedup.len(),
            book_ops = mem.book.len(),
            prune,
            "spool: memtable commit"
        );
        Ok(freed)
    }

    /// Whether the batch carrying `book` is the checkpoint because the memtable is at its
    /// bound ([`CHECKPOINT_EVENTS`]), as of the frames answered so far ([`Writer::apply`]
    /// asks again once every frame in flight is).
    fn at_bound(&self, book: &[Bookkeeping]) -> bool {
        self.full && !self.settles(book)
    }

    /// Whether `book` (the deliveries a batch of a full memtable carries) may bring it below
    /// its bound: then that batch is a frame and the count is taken again after it. Never once
    /// the memtable holds twice its bound (its size stays bounded whatever the deliveries).
    fn settles(&self, book: &[Bookkeeping]) -> bool {
        let mem = self.shared.mem();
        let held = mem.events.len();
        if held >= 2 * CHECKPOINT_EVENTS {
            return false;
        }
        let leaving = book
            .iter()
            .filter_map(|b| match b {
                Bookkeeping::Done { seqs, .. } => Some(seqs),
                Bookkeeping::Attempts { .. } => None,
            })
            .flatten()
            .filter(|seq| mem.events.contains_key(seq))
            .count();
        self.counted(held.saturating_sub(leaving)) < CHECKPOINT_EVENTS
    }

    /// Of the memtable's `held` events, those the bound counts: not the deliveries a drain has
    /// in hand ([`Shared::in_hand`]: in a sink's hands, or done and not reported yet), whose
    /// reports will take them out of the memtable. All of them once it holds twice its bound:
    /// its size stays bounded whatever the drains do (the count is per delivery, not per
    /// event: an event for two sinks, or work read back from redb, is subtracted too).
    fn counted(&self, held: usize) -> usize {
        if held >= 2 * CHECKPOINT_EVENTS {
            return held;
        }
        held.saturating_sub(self.shared.in_hand.load(Ordering::Relaxed))
    }

    fn refuse(&self, appends: &mut Vec<Append>) {
        let bytes: u64 = appends.iter().map(|a| a.rec.len() as u64).sum();
        self.shared.used.fetch_sub(bytes, Ordering::AcqRel);
        for a in appends.drain(..) {
            let _ = a
                .reply
                .send(Err(Refused { reason: "the spool cannot be written".into(), retry_after: BROKEN_RETRY_AFTER }));
        }
    }

    /// One batch: `appends` and `book` are made durable by one frame of the write-ahead file
    /// and kept in the memtable, or — at the checkpoint (about once a second, when the file
    /// is full, or `force_durable`) — written to redb with the whole memtable in one durable
    /// commit. On failure every waiting request is refused (nothing was accepted) and the
    /// bookkeeping is handed back to be applied once the spool heals. Either way `appends` is
    /// left empty (its buffer is kept for the next batch).
    fn apply(
        &mut self,
        appends: &mut Vec<Append>,
        book: Vec<Bookkeeping>,
        force_durable: bool,
    ) -> Result<(), (StoreError, Vec<Bookkeeping>)> {
        for name in appends.iter().flat_map(|a| &a.sinks) {
            if !self.names.contains(name) {
                self.names.insert(name.clone());
            }
        }
        // Room for one more frame in flight (the batches of the frames that are durable by now
        // are answered first).
        if let Err((e, mut rest)) = self.land(lanes::LANES - 1) {
            self.refuse(appends);
            rest.extend(book);
            return Err((e, rest));
        }
        let now = now_millis();
        let window = self.shared.dedup.window().as_millis() as u64;
        // Why this batch is the checkpoint, if it is one (logged at debug level).
        let reason = if force_durable {
            Some("forced")
        } else if self.last_fsync.elapsed() >= ACK_FSYNC_EVERY {
            Some("timer")
        } else if self.wal.tail >= wal::CHECKPOINT_BYTES {
            Some("size")
        } else {
            None
        };
        let due = reason.is_some();
        let mut durable = due || self.at_bound(&book);
        // How long the batch's webhooks wait for a checkpoint (logged at debug level).
        let started = durable.then(Instant::now);
        // The checkpoint covers every frame: none may be in flight.
        if durable {
            #[cfg(test)]
            if !due {
                self.shared.bound_waits.fetch_add(1, Ordering::AcqRel);
            }
            if let Err((e, mut rest)) = self.land(0) {
                self.refuse(appends);
                rest.extend(book);
                return Err((e, rest));
            }
            // The frames that were in flight are answered now and their bookkeeping is in the
            // memtable: the bound is taken again (their deliveries often emptied it), and a
            // memtable below it makes this batch an ordinary frame.
            if !due {
                durable = self.at_bound(&book);
                #[cfg(test)]
                if durable {
                    self.shared.bound_checkpoints.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        let prune = durable && window > 0 && now.saturating_sub(self.last_prune) >= (window / 10).max(1000);
        if durable {
            // One checkpoint in flight at most: the next one (and the file it switches to)
            // waits for the last one's durable commit, which has nearly always ended by now.
            let landed = started.map(|t| t.elapsed());
            let behind = self.wait_behind().and_then(|()| {
                if force_durable || self.behind.is_none() {
                    return Ok(None);
                }
                let waited = started.map(|t| t.elapsed());
                // (A failure of the last durable commit was counted where it was heard of.)
                self.checkpoint_behind(now, prune).map(|r| Some((r, landed, waited))).inspect_err(|_| {
                    crate::metrics::spool_write_error();
                })
            });
            match behind {
                Ok(None) => {}
                Ok(Some(((held, _), landed, waited))) => {
                    durable = false;
                    let empty = appends.is_empty() && book.is_empty();
                    if let Some(t) = started {
                        let us = |d: Option<Duration>| d.map_or(0, |d| d.as_micros() as u64);
                        tracing::debug!(
                            reason = reason.unwrap_or("bound"),
                            took_us = t.elapsed().as_micros() as u64,
                            landed_us = us(landed),
                            waited_us = us(waited),
                            memtable_events = held,
                            in_hand = self.shared.in_hand.load(Ordering::Relaxed),
                            waiting = appends.len(),
                            "spool: checkpoint"
                        );
                    }
                    if empty {
                        return Ok(());
                    }
                }
                Err(e) => {
                    self.shared.set_trouble(Some(format!("the spool cannot commit: {e}")));
                    self.refuse(appends);
                    return Err((e, book));
                }
            }
        }
        let prune = prune && durable;
        let mut scratch = std::mem::take(&mut self.scratch);
        // Each id's key once, and the window asked once for the whole batch.
        scratch.keys.clear();
        scratch.seen.clear();
        if window > 0 {
            scratch.keys.extend(appends.iter().map(|a| crate::dedup::key(&a.id)));
            self.shared.dedup.contains_keys_at(&scratch.keys, now, &mut scratch.seen);
        }
        self.plan(appends, &mut scratch);
        let accepted = scratch.seqs.iter().filter(|s| s.is_some()).count() as u64;
        let (mut added, mut duplicate) = (0u64, 0u64);
        scratch.weights.clear();
        for (a, seq) in appends.iter().zip(&scratch.seqs) {
            match seq {
                Some(_) => added += a.rec.len() as u64,
                None => duplicate += a.rec.len() as u64,
            }
            scratch.weights.push(record::weight(&a.rec));
        }
        let freed = if durable {
            // The checkpoint. The memtable's lock is held until it is empty again, so that a
            // reader sees it or redb's new rows, never neither.
            let shared = self.shared.clone();
            let mut mem = shared.mem();
            let result = self.shared.db().and_then(|db| {
                super::guard::catch(|| self.transaction(&db, &mem, appends, &mut scratch, &book, now, prune))?
            });
            match result {
                Ok(freed) => {
                    let held = mem.events.len();
                    mem.clear();
                    drop(mem);
                    self.checkpointed();
                    crate::metrics::spool_flush(accepted);
                    if let Some(t) = started {
                        tracing::debug!(
                            reason = reason.unwrap_or("bound"),
                            took_us = t.elapsed().as_micros() as u64,
                            memtable_events = held,
                            in_hand = self.shared.in_hand.load(Ordering::Relaxed),
                            waiting = appends.len(),
                            "spool: checkpoint"
                        );
                    }
                    freed
                }
                Err(e) => {
                    drop(mem);
                    return Err(self.failed(e, appends, scratch, book));
                }
            }
        } else {
            // The events and the bookkeeping are made durable by the write-ahead file, and
            // kept in memory until the checkpoint: the frame is written here, its sync runs
            // in a lane while the next batches come, and the batch is answered once it ends
            // (a batch of duplicates only has no frame: it waits for the frames before it).
            let end = if accepted > 0 || !book.is_empty() {
                let mut buf = std::mem::take(&mut self.wal.buf);
                buf.clear();
                let events = appends
                    .iter()
                    .zip(&scratch.seqs)
                    .filter_map(|(a, s)| s.map(|s| (s, a.rec.as_slice(), a.sinks.as_slice())));
                wal::encode(&mut buf, self.gen, now, self.next_seq, &scratch.ids, events, &book);
                self.wal.buf = buf;
                let result = self.wal.write();
                // A large batch's buffer is not kept (memory stays flat between bursts).
                if self.wal.buf.capacity() > WAL_BUF_KEEP {
                    self.wal.buf = Vec::new();
                }
                match result {
                    Ok(end) => Some(end),
                    Err(e) => {
                        // The frames before it are still answered (or fail) first.
                        let mut book = book;
                        if let Err((_, rest)) = self.land(0) {
                            book.extend(rest);
                        }
                        return Err(self.failed(e, appends, scratch, book));
                    }
                }
            } else {
                None
            };
            let ticket = self.pipe.next_ticket;
            self.pipe.next_ticket += 1;
            let mut result = None;
            if end.is_some() {
                if self.pipe.wake.is_none() && self.pipe.lanes.is_some() {
                    self.pipe.wake = self.shared.waker();
                }
                let submitted = match (&mut self.pipe.lanes, &self.pipe.wake) {
                    (Some(lanes), Some(wake)) => lanes.submit(ticket, self.wal.cur, wake.clone()),
                    _ => false,
                };
                // No lane (or the spool is closing): synced here.
                if !submitted {
                    result = Some(self.wal.sync());
                }
            } else {
                result = Some(Ok(()));
            }
            self.pipe.ids.extend(&scratch.ids);
            let spare = self.pipe.spare.pop().unwrap_or_default();
            self.pipe.flights.push_back(Flight {
                ticket,
                end: end.unwrap_or(self.wal.tail),
                appends: std::mem::replace(appends, spare.appends),
                seqs: std::mem::replace(&mut scratch.seqs, spare.seqs),
                ids: std::mem::replace(&mut scratch.ids, spare.ids),
                weights: std::mem::replace(&mut scratch.weights, spare.weights),
                book,
                now,
                first_seq: self.next_seq,
                accepted,
                added,
                duplicate,
                result,
            });
            self.next_seq += accepted;
            self.scratch = scratch;
            return self.land(usize::MAX);
        };
        self.last_prune = if prune { now } else { self.last_prune };
        self.committed_bytes = (self.committed_bytes + added).saturating_sub(freed);
        self.shared.used.fetch_sub(freed + duplicate, Ordering::AcqRel);
        self.next_seq += accepted;
        crate::metrics::spool_bytes(self.committed_bytes);
        // Into the window before any request is answered: a re-send that follows its 202 is
        // a duplicate.
        self.shared.dedup.record_keys_at(&scratch.ids, now);
        for ((a, seq), weight) in appends.drain(..).zip(&scratch.seqs).zip(&scratch.weights) {
            match seq {
                Some(seq) => {
                    // Queue before answering: once a request has its 202, its work is visible.
                    let weight = *weight;
                    for sink in &a.sinks {
                        self.registry.queue(sink).enqueue(*seq, a.env.clone(), weight);
                    }
                    let _ = a.reply.send(Ok(Accepted::New));
                }
                None => {
                    let _ = a.reply.send(Ok(Accepted::Duplicate));
                }
            }
        }
        self.scratch = scratch;
        Ok(())
    }

    /// Answers the batches whose frames are durable, oldest first, and waits until at most
    /// `room` frames are in flight. A failed sync fails its batch and every later one (each
    /// frame in flight waits for its sync to end first): they are refused, the frames taken
    /// back, and their bookkeeping handed back (to be applied once the spool heals).
    fn land(&mut self, room: usize) -> Result<(), (StoreError, Vec<Bookkeeping>)> {
        loop {
            while let Some((ticket, result)) = self.pipe.lanes.as_ref().and_then(Lanes::try_result) {
                self.pipe.ended(ticket, result);
            }
            while self.pipe.flights.front().is_some_and(|f| matches!(f.result, Some(Ok(())))) {
                if let Some(f) = self.pipe.flights.pop_front() {
                    self.complete(f);
                }
            }
            if self.pipe.flights.front().is_some_and(|f| matches!(f.result, Some(Err(_)))) {
                return Err(self.fail_flights());
            }
            if self.pipe.flights.len() <= room {
                return Ok(());
            }
            let next = self.pipe.lanes.as_ref().and_then(Lanes::result);
            match next {
                Some((ticket, result)) => self.pipe.ended(ticket, result),
                // The lanes are gone: no result will come.
                None => {
                    for f in self.pipe.flights.iter_mut().filter(|f| f.result.is_none()) {
                        f.result = Some(Err(std::io::Error::other("the write-ahead file's sync thread stopped")));
                    }
                }
            }
        }
    }

    /// The oldest frame in flight failed its sync: waits for every later one to end, then
    /// refuses them all (see [`Writer::land`]).
    fn fail_flights(&mut self) -> (StoreError, Vec<Bookkeeping>) {
        while self.pipe.flights.iter().any(|f| f.result.is_none()) {
            let next = self.pipe.lanes.as_ref().and_then(Lanes::result);
            match next {
                Some((ticket, result)) => self.pipe.ended(ticket, result),
                None => break,
            }
        }
        let mut flights = std::mem::take(&mut self.pipe.flights);
        let source = match flights.front_mut().and_then(|f| f.result.take()) {
            Some(Err(e)) => e,
            _ => std::io::Error::other("a sync failed"),
        };
        let e = StoreError::Wal { op: "fdatasync", source };
        // Nothing of them was answered, and nothing after them was written: the seqs are
        // given again, and the file continues after the last durable frame.
        if let Some(f) = flights.front() {
            self.next_seq = f.first_seq;
        }
        self.wal.unwrite();
        self.pipe.ids.clear();
        crate::metrics::spool_write_error();
        self.shared.set_trouble(Some(format!("the spool cannot commit: {e}")));
        let mut book = Vec::new();
        for mut f in flights {
            self.refuse(&mut f.appends);
            book.append(&mut f.book);
        }
        (e, book)
    }

    /// A batch whose frame is durable: its effects go into the memtable and its requests
    /// are answered.
    fn complete(&mut self, f: Flight) {
        let Flight {
            end,
            mut appends,
            mut seqs,
            mut ids,
            mut weights,
            book,
            now,
            first_seq,
            accepted,
            added,
            duplicate,
            ..
        } = f;
        self.wal.synced(end);
        crate::metrics::spool_flush(accepted);
        // Each accepted append's queues, before its sink list moves into the memtable: from
        // the writer's own list when it knows them all. A sink it meets for the first time is
        // looked up (or its queue made) in the registry only once the batch is in the
        // memtable, as before (the registry's lock may be held meanwhile).
        let known = self.scratch.targets_for(&appends, &seqs, None);
        let freed = if accepted > 0 || !book.is_empty() {
            self.unsynced = true;
            let mut mem = self.shared.mem();
            for (a, seq) in appends.iter_mut().zip(&seqs) {
                if let Some(seq) = seq {
                    let sinks = if known { std::mem::take(&mut a.sinks) } else { a.sinks.clone() };
                    mem.insert(*seq, std::mem::take(&mut a.rec), sinks);
                }
            }
            if !ids.is_empty() {
                mem.dedup.push((now, first_seq, ids.clone()));
            }
            let freed = mem.apply_book(book);
            self.full = self.counted(mem.events.len()) >= CHECKPOINT_EVENTS;
            freed
        } else {
            0
        };
        self.committed_bytes = (self.committed_bytes + added).saturating_sub(freed);
        self.shared.used.fetch_sub(freed + duplicate, Ordering::AcqRel);
        crate::metrics::spool_bytes(self.committed_bytes);
        // Into the window before any request is answered: a re-send that follows its 202 is
        // a duplicate.
        self.shared.dedup.record_keys_at(&ids, now);
        for id in &ids {
            self.pipe.ids.remove(id);
        }
        if !known {
            self.scratch.targets_for(&appends, &seqs, Some(&self.registry));
        }
        let Scratch { queues, targets, targets_end, .. } = &self.scratch;
        let mut start = 0usize;
        for (((a, seq), weight), end) in appends.drain(..).zip(&seqs).zip(&weights).zip(targets_end) {
            let end = *end as usize;
            match seq {
                Some(seq) => {
                    // Queue before answering: once a request has its 202, its work is visible.
                    if let Some((last, rest)) = targets[start..end].split_last() {
                        for q in rest {
                            queues[*q as usize].1.enqueue(*seq, a.env.clone(), *weight);
                        }
                        queues[*last as usize].1.enqueue(*seq, a.env, *weight);
                    }
                    let _ = a.reply.send(Ok(Accepted::New));
                }
                None => {
                    let _ = a.reply.send(Ok(Accepted::Duplicate));
                }
            }
            start = end;
        }
        // Its buffers serve a later batch.
        if self.pipe.spare.len() <= lanes::LANES && appends.capacity() <= SPARE_KEEP {
            seqs.clear();
            ids.clear();
            weights.clear();
            self.pipe.spare.push(Spare { appends, seqs, ids, weights });
        }
    }

    /// A batch that could not be made durable: refused, its bookkeeping handed back.
    fn failed(
        &mut self,
        e: StoreError,
        appends: &mut Vec<Append>,
        scratch: Scratch,
        book: Vec<Bookkeeping>,
    ) -> (StoreError, Vec<Bookkeeping>) {
        self.scratch = scratch;
        crate::metrics::spool_write_error();
        // Not ready before the first refusal is answered: a probe that follows a 503 sees why.
        self.shared.set_trouble(Some(format!("the spool cannot commit: {e}")));
        self.refuse(appends);
        (e, book)
    }

    /// Fills `scratch.seqs` (for each append its seq, `None`: a duplicate) and `scratch.ids`
    /// (the keys of the accepted events that enter the dedup window).
    fn plan(&self, appends: &[Append], scratch: &mut Scratch) {
        scratch.seqs.clear();
        scratch.ids.clear();
        scratch.in_batch.clear();
        let window = !scratch.keys.is_empty();
        let mut next = self.next_seq;
        for (i, a) in appends.iter().enumerate() {
            let checked = a.dedup && window;
            // Seen in the window, in a batch in flight, or earlier in this one.
            if checked
                && (scratch.seen[i]
                    || self.pipe.ids.contains(&scratch.keys[i])
                    || !scratch.in_batch.insert(scratch.keys[i]))
            {
                scratch.seqs.push(None);
                continue;
            }
            scratch.seqs.push(Some(next));
            next += 1;
            if checked {
                scratch.ids.push(scratch.keys[i]);
            }
        }
    }

    /// The checkpoint's commit: the memtable, then `appends` (with the seqs [`Writer::plan`]
    /// gave them) and `book`; returns the bytes freed (of rows redb held: the memtable's own
    /// were counted when they went).
    #[allow(clippy::too_many_arguments)]
    fn transaction(
        &self,
        db: &Database,
        mem: &Memtable,
        appends: &[Append],
        scratch: &mut Scratch,
        book: &[Bookkeeping],
        now: u64,
        prune: bool,
    ) -> Result<u64, StoreError> {
        let tx = db.begin_write().op("begin")?;
        let mut freed = mem.write(&tx, &self.names)?;
        {
            let mut events = tx.open_table(EVENTS).op("open events")?;
            let mut pending = tx.open_table(PENDING).op("open pending")?;
            let mut next = self.next_seq;
            for (a, seq) in appends.iter().zip(&scratch.seqs) {
                let Some(seq) = *seq else { continue };
                next = seq + 1;
                events.insert(seq, a.rec.as_slice()).op("write event")?;
                for sink in &a.sinks {
                    pending.insert((sink.as_str(), seq), 0u32).op("write pending")?;
                }
            }
            {
                // The checkpoint: every seq below `next` is in redb once this commit is, and
                // the frames written so far are of an older generation.
                let mut meta = tx.open_table(META).op("open meta")?;
                meta.insert(wal::CHECKPOINT, next).op("write meta")?;
                meta.insert(wal::GENERATION, self.gen + 1).op("write meta")?;
            }
            // One dedup row for the commit's ids, keyed by its first seq: in the same
            // transaction as the events, so that a re-send after a crash is still a duplicate.
            if !scratch.ids.is_empty() {
                let mut dedup = tx.open_table(DEDUP_BATCHES).op("open dedup")?;
                dedup.insert((now, self.next_seq), store::dedup_batch(&scratch.ids).as_slice()).op("write dedup")?;
            }
            if !book.is_empty() {
                freed += apply_book(&mut events, &mut pending, &self.names, book)?;
            }
        }
        if prune {
            store::prune_dedup(&tx, now.saturating_sub(self.shared.dedup.window().as_millis() as u64))?;
        }
        tx.commit().op("commit")?;
        Ok(freed)
    }

    /// Closes the broken handle, reopens the file, reconciles, and proves a commit works;
    /// only then are the drain tasks given the new handle.
    fn heal(&mut self) -> Result<(), StoreError> {
        let dir = self.shared.cfg.spool_dir.clone();
        // The checkpoint's commit in flight, if any, ends first (it holds the handle); a
        // failure is what this heal repairs.
        let _ = self.wait_behind();
        if let Some(free) = store::free_bytes(&dir).filter(|f| *f < MIN_FREE_BYTES) {
            return Err(StoreError::NoSpace { free });
        }
        self.close_db()?;
        let db = store::reopen_file(&self.shared.path)?;
        // Redb is as of its last durable checkpoint (the failed commit is rolled back, and so
        // is a checkpoint committed without durability whose durable commit failed: its rows
        // are in the write-ahead files, the other one's frames included). The bookkeeping of its rows that waited in the memtable is applied first, in
        // a durable commit of its own, and the bytes it frees counted (they were not yet).
        let redo = std::mem::take(&mut self.shared.mem().book);
        if !redo.is_empty() {
            let result =
                super::guard::catch(|| redo_book(&db, &self.names, &redo)).map_err(StoreError::from).and_then(|r| r);
            match result {
                Ok(freed) => {
                    self.committed_bytes = self.committed_bytes.saturating_sub(freed);
                    self.shared.used.fetch_sub(freed, Ordering::AcqRel);
                    crate::metrics::spool_bytes(self.committed_bytes);
                }
                Err(e) => {
                    crate::metrics::spool_write_error();
                    self.shared.mem().book = redo;
                    return Err(e);
                }
            }
        }
        // The events acknowledged since the checkpoint, and the bookkeeping of the memtable's
        // own events, are in the write-ahead file: written back (durably, a new generation)
        // before anything else; the bytes that bookkeeping frees were counted when it was
        // applied to the memtable (and the redo above left nothing for it to free again).
        match self.wal.replay_into(&db, self.next_seq) {
            Ok(r) => self.gen = r.generation,
            Err(e) => {
                crate::metrics::spool_write_error();
                return Err(e);
            }
        }
        self.reconcile(&db)?;
        if self.lost_checkpoint {
            // The bytes counted since the lost checkpoint (what it freed, and the bookkeeping
            // of its rows applied since) are not what redb holds after the replay: counted
            // again from redb, which holds everything now (the memtable is emptied below).
            let (_, bytes) = store::written_since(&db, 0, &BTreeSet::new())?;
            if bytes >= self.committed_bytes {
                self.shared.used.fetch_add(bytes - self.committed_bytes, Ordering::AcqRel);
            } else {
                self.shared.used.fetch_sub(self.committed_bytes - bytes, Ordering::AcqRel);
            }
            self.committed_bytes = bytes;
            crate::metrics::spool_bytes(bytes);
        }
        if let Err(e) = store::probe(&db) {
            crate::metrics::spool_write_error();
            return Err(e);
        }
        // Everything the write-ahead file held is in redb now: empty it, and prove it takes
        // writes again.
        if let Err(e) = self.wal.reset().and_then(|()| self.wal.probe()) {
            crate::metrics::spool_write_error();
            return Err(e);
        }
        self.last_fsync = Instant::now();
        self.unsynced = false;
        self.full = false;
        self.lost_checkpoint = false;
        // Redb holds all of it now (the readers wait for the handle meanwhile).
        self.shared.mem().clear();
        self.shared.set_db(Some(Arc::new(db)));
        for q in self.registry.all() {
            q.wake();
        }
        Ok(())
    }

    /// Takes the handle away from the drain tasks and closes it once their reads are done.
    fn close_db(&mut self) -> Result<(), StoreError> {
        let Some(mut db) = self.shared.set_db(None).or_else(|| self.closing.take()) else { return Ok(()) };
        let until = Instant::now() + CLOSE_WAIT;
        loop {
            match Arc::try_unwrap(db) {
                // Dropping closes the file (and releases its lock); errors are expected on a
                // handle that failed, and the reopen repairs what they left.
                Ok(db) => {
                    drop(db);
                    return Ok(());
                }
                Err(still) if Instant::now() < until => {
                    db = still;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(still) => {
                    self.closing = Some(still);
                    return Err(StoreError::Reopening);
                }
            }
        }
    }

    /// A commit reported as failed may have reached the disk all the same (its flush failed
    /// after the commit slot was written): keep and deliver what it wrote. Its senders were
    /// told to retry, so those events may arrive twice — never lost.
    fn reconcile(&mut self, db: &Database) -> Result<(), StoreError> {
        let on_disk = store::next_seq(db)?;
        if on_disk <= self.next_seq {
            return Ok(());
        }
        let (pending, bytes) = store::written_since(db, self.next_seq, &self.names)?;
        tracing::warn!(file = %self.shared.path.display(), events = on_disk - self.next_seq, "spool: a commit reported as failed reached the disk; its events are kept and delivered");
        for (sink, n) in pending {
            self.registry.queue(&sink).add_on_disk(n);
        }
        self.committed_bytes += bytes;
        self.shared.used.fetch_add(bytes, Ordering::AcqRel);
        self.next_seq = on_disk;
        Ok(())
    }
}

/// Applies `book` in a durable transaction of its own (after a reopen); returns the bytes
/// of event rows it freed.
fn redo_book(db: &Database, names: &BTreeSet<String>, book: &[Bookkeeping]) -> Result<u64, StoreError> {
    let tx = db.begin_write().op("begin")?;
    let freed = {
        let mut events = tx.open_table(EVENTS).op("open events")?;
        let mut pending = tx.open_table(PENDING).op("open pending")?;
        apply_book(&mut events, &mut pending, names, book)?
    };
    tx.commit().op("commit")?;
    Ok(freed)
}

/// An error and its causes, for a log line: "commit: I/O error: No space left on device …".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// Writes `records` ((encoded event, the sinks it is pending for)) as new pending work,
/// durably, from `next_seq` on; returns the next free seq. Used by `replay` and `salvage`
/// while the daemon is stopped.
pub fn append_offline(db: &Database, next_seq: u64, records: &[(Vec<u8>, Vec<String>)]) -> Result<u64, StoreError> {
    super::guard::catch(|| {
        let tx = db.begin_write().op("begin")?;
        let mut seq = next_seq;
        {
            let mut events = tx.open_table(EVENTS).op("open events")?;
            let mut pending = tx.open_table(PENDING).op("open pending")?;
            for (rec, sinks) in records {
                events.insert(seq, rec.as_slice()).op("write event")?;
                for sink in sinks {
                    pending.insert((sink.as_str(), seq), 0u32).op("write pending")?;
                }
                seq += 1;
            }
        }
        tx.commit().op("commit")?;
        Ok(seq)
    })?
}

#[cfg(test)]
mod tests {
    use super::super::tests::wait;
    use super::super::{wal, Spool};
    use super::*;
    use crate::config::DeliveryConfig;
    use crate::delivery::Delivery;
    use crate::event::Envelope;
    use crate::sinks::{BoxFuture, Sink, SinkError};
    use std::collections::HashMap;

    /// A sink whose deliveries never end (its events stay pending until the test reports them).
    struct Stuck;

    impl Sink for Stuck {
        fn name(&self) -> &str {
            "s"
        }
        fn deliver<'a>(&'a self, _env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(std::future::pending())
        }
    }

    fn envelope(n: usize) -> Envelope {
        let body = format!(r#"{{"type":"payment","n":{n}}}"#);
        let event = crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
        Envelope::new(event, body.into())
    }

    /// A new directory and the default delivery settings with the spool in it.
    fn fresh_spool_dir() -> (tempfile::TempDir, DeliveryConfig) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DeliveryConfig {
            spool_dir: dir.path().join("spool"),
            dead_letter_file: dir.path().join("dead.jsonl"),
            ..Default::default()
        };
        (dir, cfg)
    }

    fn frames_written(cfg: &DeliveryConfig) -> usize {
        wal::decode(&std::fs::read(cfg.spool_dir.join(wal::FILE_NAME)).unwrap()).frames.len()
    }

    /// At full rate about half the checkpoints for the memtable's bound committed only a few
    /// dozen events: the bound was taken before the frames in flight were answered, and their
    /// deliveries (applied to the memtable once their syncs end) had emptied it. The batch that
    /// finds the memtable at its bound waits for those frames anyway: the bound is taken again
    /// then, and the batch is an ordinary frame.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_memtable_at_its_bound_emptied_by_the_frames_in_flight_is_not_checkpointed() {
        let bound = CHECKPOINT_EVENTS;
        let s: Arc<dyn Sink> = Arc::new(Stuck);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), s.clone())].into();
        // The memtable filled to its bound as the bound counts it: beyond the deliveries the
        // stuck drain has in hand (a checkpoint on time while it fills moves some to redb:
        // then again, with a new spool).
        let mut attempt = 0;
        let (spool, cfg, _dir) = loop {
            attempt += 1;
            assert!(attempt <= 10, "a checkpoint on time came during every fill");
            let (dir, cfg) = fresh_spool_dir();
            let spool = Spool::open(&cfg, &sinks).await.unwrap();
            let t = vec![s.clone()];
            let below =
                futures_util::future::join_all((0..bound - 1).map(|n| spool.submit(envelope(n), t.clone()))).await;
            assert!(below.iter().all(|r| *r == Ok(Accepted::New)));
            // The drain's first round never ends: those deliveries stay in hand.
            wait("the drain's first round", || spool.shared.in_hand.load(Ordering::Acquire) > 0).await;
            let in_hand = spool.shared.in_hand.load(Ordering::Acquire);
            let more = futures_util::future::join_all(
                (bound - 1..bound - 1 + in_hand).map(|n| spool.submit(envelope(n), t.clone())),
            )
            .await;
            assert!(more.iter().all(|r| *r == Ok(Accepted::New)));
            assert_eq!(spool.submit(envelope(bound + in_hand), t.clone()).await, Ok(Accepted::New));
            if spool.shared.mem().events.len() == bound + in_hand {
                break (spool, cfg, dir);
            }
            spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        };
        let before = spool.shared.bound_checkpoints.load(Ordering::Acquire);
        let waits = spool.shared.bound_waits.load(Ordering::Acquire);
        // Every event delivered, in one report, whose frame's sync is held: the memtable is
        // still at its bound for the writer until that frame is answered.
        let faults = spool.shared.wal_faults.clone();
        faults.hold.store(true, Ordering::Release);
        let written = frames_written(&cfg);
        let seqs: Vec<u64> = spool.shared.mem().events.keys().copied().collect();
        assert!(spool.shared.send(Op::Book(Bookkeeping::Done { sink: "s".into(), seqs })));
        wait("the deliveries' frame", || frames_written(&cfg) > written).await;
        // A new event meanwhile: its batch finds the memtable at its bound and waits for the
        // frame in flight (seen in `bound_waits`); only then is the frame's sync let go. (Before
        // the change the writer counted the bound checkpoint before that wait.)
        let next = {
            let spool = spool.clone();
            let t = vec![s.clone()];
            tokio::spawn(async move { spool.submit(envelope(bound + 1 + bound), t).await })
        };
        wait("the new event's batch at the bound", || spool.shared.bound_waits.load(Ordering::Acquire) > waits).await;
        faults.hold.store(false, Ordering::Release);
        assert_eq!(next.await.unwrap(), Ok(Accepted::New));
        assert_eq!(
            spool.shared.bound_checkpoints.load(Ordering::Acquire),
            before,
            "no checkpoint for the memtable's bound: the frame in flight emptied it"
        );
        assert!(spool.shared.mem().events.len() <= 1, "only the new event waits in the memtable");
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
    }

    /// A named sink whose deliveries never end, `ROUND` of them at once.
    struct StuckRound(String);

    const ROUND: usize = 30;

    impl Sink for StuckRound {
        fn name(&self) -> &str {
            &self.0
        }
        fn round(&self) -> Option<usize> {
            Some(ROUND)
        }
        fn deliver<'a>(&'a self, _env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(std::future::pending())
        }
    }

    /// The memtable's bound counted every event it held, those in a sink's hands too (and
    /// those delivered but not reported yet): with a sink that keeps up at ~9,000 events/s,
    /// most checkpoints at half rate came from the bound. A checkpoint would write them to
    /// redb only for their reports to remove them: the bound counts only the events no drain
    /// has in hand.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_in_the_sinks_hands_do_not_bring_the_memtables_bound_checkpoint() {
        let bound = CHECKPOINT_EVENTS;
        // Enough sinks for more than the bound in their hands, one round each.
        let n_sinks = bound / ROUND + 2;
        let sinks: Vec<Arc<dyn Sink>> =
            (0..n_sinks).map(|i| Arc::new(StuckRound(format!("s{i}"))) as Arc<dyn Sink>).collect();
        let by_name: HashMap<String, Arc<dyn Sink>> = sinks.iter().map(|s| (s.name().to_string(), s.clone())).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            assert!(attempt <= 10, "a checkpoint on time came during every fill");
            let (_dir, cfg) = fresh_spool_dir();
            let spool = Spool::open(&cfg, &by_name).await.unwrap();
            let before = spool.shared.bound_checkpoints.load(Ordering::Acquire);
            let mut n = 0;
            // Each sink's events wait in its queue until they are all there, then its drain
            // takes them in one round that never ends.
            for (i, sink) in sinks.iter().enumerate() {
                let q = spool.registry.queue(sink.name());
                q.set_paused(true);
                let accepted = futures_util::future::join_all(
                    (n..n + ROUND).map(|k| spool.submit(envelope(k), vec![sink.clone()])),
                )
                .await;
                assert!(accepted.iter().all(|r| *r == Ok(Accepted::New)));
                n += ROUND;
                q.set_paused(false);
                wait("the sink's round", || spool.shared.in_hand.load(Ordering::Acquire) == (i + 1) * ROUND).await;
            }
            // One more event, not taken by any drain (its sink is busy with its round).
            assert_eq!(spool.submit(envelope(n), vec![sinks[0].clone()]).await, Ok(Accepted::New));
            assert_eq!(
                spool.shared.bound_checkpoints.load(Ordering::Acquire),
                before,
                "no checkpoint for the memtable's bound: its events are in the sinks' hands"
            );
            let held = spool.shared.mem().events.len();
            spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
            assert_eq!(spool.shared.in_hand.load(Ordering::Acquire), 0, "put back at the stop");
            if held > bound {
                break;
            }
        }
    }

    /// Copies the spool's files as they are now: what a `kill -9` at this point leaves.
    fn crash_copy(cfg: &DeliveryConfig) -> tempfile::TempDir {
        let to = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&cfg.spool_dir).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
        }
        to
    }

    /// The `n` of each event pending for sink "s" in the spool of `dir` once opened (its
    /// write-ahead files replayed), in seq order, and the number of event rows.
    fn pending_after_open(dir: &std::path::Path) -> (Vec<u64>, u64) {
        let (db, _) = super::super::store::open_db(dir).unwrap();
        let pending = super::super::store::load_pending(&db, "s", None, 1000).unwrap();
        let seqs: Vec<u64> = pending.iter().map(|p| p.0).collect();
        let mut ns = Vec::new();
        for (_, rec) in super::super::store::load_events(&db, &seqs, &[], 0).unwrap() {
            let env = record::decode(&rec.unwrap()).unwrap();
            ns.push(env.event.extra["n"].as_u64().unwrap());
        }
        (ns, super::super::store::recover(&db, 0).unwrap().events)
    }

    /// A new spool with one stuck sink ("s", in the returned targets) whose checkpoints'
    /// durable commits are held (`hooks.hold`) until the test lets them go.
    async fn held_commits(
    ) -> (tempfile::TempDir, DeliveryConfig, Arc<Spool>, Arc<super::super::behind::Hooks>, Vec<Arc<dyn Sink>>) {
        let s: Arc<dyn Sink> = Arc::new(Stuck);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), s.clone())].into();
        let (dir, cfg) = fresh_spool_dir();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let hooks = spool.shared.behind.clone();
        hooks.hold.store(true, Ordering::Release);
        (dir, cfg, spool, hooks, vec![s])
    }

    /// The checkpoint's durable commit (held here) no longer holds the webhooks that arrive
    /// meanwhile: before, the writer committed the memtable durably itself, and every
    /// webhook behind it waited for the commit's fdatasync (4–13 ms, the p99 at half rate).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_webhook_arriving_during_a_checkpoint_is_answered_before_the_checkpoints_commit_ends() {
        let (_dir, cfg, spool, hooks, t) = held_commits().await;
        assert_eq!(spool.submit(envelope(0), t.clone()).await, Ok(Accepted::New));
        // The checkpoint on time (a second after the first batch): its commit is held.
        wait("a checkpoint's durable commit handed over", || hooks.started.load(Ordering::Acquire) == 1).await;
        let answered = tokio::time::timeout(Duration::from_secs(30), spool.submit(envelope(1), t.clone())).await;
        assert_eq!(answered, Ok(Ok(Accepted::New)), "answered while the checkpoint's commit is held");
        assert_eq!(hooks.ended.load(Ordering::Acquire), 0, "the checkpoint's commit has not ended");
        hooks.hold.store(false, Ordering::Release);
        wait("the checkpoint's durable commit", || hooks.ended.load(Ordering::Acquire) == 1).await;
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        drop(spool);
        assert_eq!(pending_after_open(&cfg.spool_dir), (vec![0, 1], 2));
    }

    /// A crash at each step of a checkpoint made behind the webhooks loses nothing and
    /// brings nothing back twice: with its durable commit still held (redb is back at the
    /// checkpoint before; the events are in the first write-ahead file, what came after in
    /// the second), once it ended (the first file's frames are covered), and after the next
    /// checkpoint. Deliveries of events the checkpoint moved to redb (bookkeeping in the
    /// second file) stay delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_at_any_step_of_a_checkpoint_behind_the_webhooks_loses_nothing_and_repeats_nothing() {
        let (_dir, cfg, spool, hooks, t) = held_commits().await;
        for n in 0..5 {
            assert_eq!(spool.submit(envelope(n), t.clone()).await, Ok(Accepted::New));
        }
        let before = crash_copy(&cfg);
        wait("a checkpoint's durable commit handed over", || hooks.started.load(Ordering::Acquire) == 1).await;
        assert!(spool.shared.mem().is_empty(), "the checkpoint took the memtable");
        // Events 0 and 1 (seqs 0 and 1 of a new spool) delivered: their rows are in redb, not
        // durably yet; the deliveries go to the second file.
        assert!(spool.shared.send(Op::Book(Bookkeeping::Done { sink: "s".into(), seqs: vec![0, 1] })));
        wait("the deliveries' frame", || spool.shared.mem().book.len() == 1).await;
        for n in 5..7 {
            assert_eq!(spool.submit(envelope(n), t.clone()).await, Ok(Accepted::New));
        }
        assert_eq!(hooks.ended.load(Ordering::Acquire), 0, "the checkpoint's commit is still held");
        // Five frames in the first file; the deliveries and two events in the second.
        assert_eq!(wal::read(&cfg.spool_dir).unwrap().frames.len(), 5 + 1 + 2, "frames in both files");
        let held = crash_copy(&cfg);
        hooks.hold.store(false, Ordering::Release);
        wait("the checkpoint's durable commit", || hooks.ended.load(Ordering::Acquire) == 1).await;
        let ended = crash_copy(&cfg);
        wait("the next checkpoint", || hooks.ended.load(Ordering::Acquire) == 2).await;
        let next = crash_copy(&cfg);
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        drop(spool);

        assert_eq!(pending_after_open(before.path()), ((0..5).collect(), 5), "before the checkpoint");
        let want = (vec![2, 3, 4, 5, 6], 5);
        assert_eq!(pending_after_open(held.path()), want, "during the checkpoint's durable commit");
        assert_eq!(pending_after_open(ended.path()), want, "after it");
        assert_eq!(pending_after_open(next.path()), want, "after the next checkpoint");
        assert_eq!(pending_after_open(&cfg.spool_dir), want, "after a clean stop");
        // Opened twice (the replay's end markers lost): the same.
        assert_eq!(pending_after_open(held.path()), want);
    }
}
