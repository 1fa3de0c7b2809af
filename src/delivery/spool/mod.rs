//! The crash-safe on-disk spool (`delivery.mode = "spool"`, the default). See docs/spool.md.
//!
//! - [`store`]: the redb file and its tables; opening it (refusing damage with a way out).
//! - [`record`]: one event row, checked when read back (checksum, id = hash of the content).
//! - [`ops`]: what the submit path and the drains hand to the writer.
//! - [`writer`]: the single writer thread; group commit (many requests, one fsync); heals
//!   after a failed commit (full disk) without a restart.
//! - [`queue`]: one backlog and one drain task per sink; retries with backoff; dead letters.
//! - [`order`]: the conversation gate of a sink with `ordering = "conversation"`.
//! - [`dead`]: the dead-letter line.
//! - [`replay`]: `webio-router replay`, re-injecting dead letters while the daemon is stopped.
//! - [`operate`]: what the control socket asks of the running spool: pause/resume (kept in
//!   the `paused` table, so a pause outlives a restart), each sink's state, online replay.
//! - [`offline`]: `webio-router spool check` and `spool salvage`.
//! - [`guard`]: turns redb's panics on damaged files into errors.
//!
//! A webhook's 202 is sent once its event and one pending row per matched sink are committed
//! (with its id in the dedup table, in the same transaction). Each sink's drain task delivers
//! its rows; a delivered or dead-lettered row is removed, and the event row with the last one.
//!
//! A start reads counts, not records ([`store::recover_for_start`]): the daemon is ready
//! without decoding the backlog. The records found at the start are then checked by the
//! `spool-audit` thread, in short snapshots, for the log only; the drain checks every record
//! it reads whatever the audit found, so correctness never waits for it.

mod behind;
pub mod dead;
mod guard;
mod lanes;
mod memtable;
pub mod offline;
mod operate;
mod ops;
mod order;
mod queue;
pub mod record;
pub mod replay;
pub mod store;
pub mod wal;
mod writer;

pub use store::{SpoolError, StoreError};

use crate::config::DeliveryConfig;
use crate::dedup::Dedup;
use crate::delivery::{Accepted, ControlRefused, Delivery, Refused, ReplayOutcome, SinkState};
use crate::event::Envelope;
use crate::jsonl::JsonlFile;
use crate::sinks::{BoxFuture, Sink};
use ops::{Append, Op};
use queue::Registry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use writer::Writer;

/// What a webhook refused for a full spool is told to wait.
const FULL_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Of the shutdown deadline, what is kept for the writer's last commit after the drains.
const LAST_COMMIT: Duration = Duration::from_millis(500);

/// State shared by the submit path, the writer thread and the drain tasks.
pub(crate) struct Shared {
    /// The open file; `None` while the writer reopens it after a failed commit.
    db: RwLock<Option<Arc<redb::Database>>>,
    pub path: PathBuf,
    pub cfg: DeliveryConfig,
    pub dedup: Dedup,
    /// Bytes of event rows on disk plus those reserved by requests waiting for the writer.
    pub used: AtomicU64,
    pub sinks: RwLock<HashMap<String, Arc<dyn Sink>>>,
    pub dead: JsonlFile,
    pub stop: watch::Sender<bool>,
    /// The writer's queue (`None` once the spool closes). A read lock to send: the webhooks
    /// and the drains send at once, and a send may wake the writer, which can take the CPU
    /// from the sender right there; under a mutex every other sender then waited for it
    /// (docs/performance.md, "Spool mode on the tokio workers, seventh round").
    writer: RwLock<Option<mpsc::Sender<Op>>>,
    /// Why the spool cannot commit right now (`None`: it can). Shown by `/readyz`.
    trouble: RwLock<Option<String>>,
    /// What the writer accepted since the last checkpoint (see [`memtable`]).
    mem: Mutex<memtable::Memtable>,
    /// Deliveries the drains have taken from their queues and not reported to the writer yet
    /// (in a sink's hands, or done and held: [`queue::HOLD_DONE`]). The memtable's bound does
    /// not count them ([`writer::CHECKPOINT_EVENTS`]): a checkpoint would write them to redb
    /// only for their report to remove them right after.
    pub in_hand: AtomicUsize,
    /// Reports of deliveries done sent by the drains (tests).
    #[cfg(test)]
    pub done_reports: AtomicU64,
    /// Checkpoints that came because the memtable reached its bound (tests).
    #[cfg(test)]
    pub bound_checkpoints: AtomicU64,
    /// Batches that found the memtable at its bound and wait for the frames in flight before
    /// the bound is taken again (tests).
    #[cfg(test)]
    pub bound_waits: AtomicU64,
    /// Held or failed syncs of the write-ahead file (tests).
    #[cfg(test)]
    pub wal_faults: Arc<lanes::Faults>,
    /// Held or failed durable commits of checkpoints, and their counts (tests).
    #[cfg(test)]
    pub behind: Arc<behind::Hooks>,
}

impl Shared {
    /// Hands `op` to the writer; false once the spool is closed.
    pub fn send(&self, op: Op) -> bool {
        match &*self.writer.read().expect("writer lock") {
            Some(tx) => tx.send(op).is_ok(),
            None => false,
        }
    }

    /// A sender to the writer (for its sync lanes, to wake it when a sync ends), while the
    /// spool is open. Not to be kept: the writer stops once every sender is gone.
    fn waker(&self) -> Option<mpsc::Sender<Op>> {
        self.writer.read().expect("writer lock").clone()
    }

    /// The open file, for one read or one transaction (do not keep it: the writer may need
    /// to close it).
    pub fn db(&self) -> Result<Arc<redb::Database>, StoreError> {
        self.db.read().expect("db lock").clone().ok_or(StoreError::Reopening)
    }

    /// Replaces the handle; returns the previous one.
    fn set_db(&self, db: Option<Arc<redb::Database>>) -> Option<Arc<redb::Database>> {
        std::mem::replace(&mut *self.db.write().expect("db lock"), db)
    }

    /// The memtable (held briefly: the writer and the readers share it). A panic while it
    /// was held leaves it as it was: every change to it is made after the fallible part.
    fn mem(&self) -> std::sync::MutexGuard<'_, memtable::Memtable> {
        self.mem.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_trouble(&self, reason: Option<String>) {
        *self.trouble.write().expect("trouble lock") = reason;
    }

    fn trouble(&self) -> Option<String> {
        self.trouble.read().expect("trouble lock").clone()
    }
}

pub struct Spool {
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    closing: AtomicBool,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Resolves when the writer thread has returned.
    writer_done: Mutex<Option<oneshot::Receiver<()>>>,
    /// Resolves when the `spool-audit` thread has returned and let go of the file.
    audit_done: Mutex<Option<oneshot::Receiver<()>>>,
}

/// Opens the spool under `cfg.spool_dir`, resumes what it holds, and starts a drain task per sink.
pub async fn open(
    cfg: &DeliveryConfig,
    sinks: &HashMap<String, Arc<dyn Sink>>,
) -> Result<Arc<dyn Delivery>, SpoolError> {
    Ok(Spool::open(cfg, sinks).await?)
}

impl Spool {
    pub async fn open(cfg: &DeliveryConfig, sinks: &HashMap<String, Arc<dyn Sink>>) -> Result<Arc<Spool>, SpoolError> {
        let dir = cfg.spool_dir.clone();
        let window = cfg.dedup_window;
        let opened = tokio::task::spawn_blocking(move || -> Result<_, SpoolError> {
            let (db, path) = store::open_db(&dir)?;
            let since = crate::dedup::now_millis().saturating_sub(window.as_millis() as u64);
            // The newest ids only: the in-memory window holds no more than this (loading more
            // would only evict them again).
            let cap = crate::dedup::MAX_ENTRIES - 1;
            let recovered = store::recover_for_start(&db, since, cap).map_err(|e| SpoolError::from_store(&path, e))?;
            let wal = wal::Wal::open(&dir).map_err(|source| SpoolError::Io {
                path: dir.join(wal::FILE_NAME),
                what: "cannot open the write-ahead file",
                source,
            })?;
            let gen = wal::current_generation(&db).map_err(|e| SpoolError::from_store(&path, e))?;
            Ok((db, path, recovered, wal, gen))
        })
        .await
        .map_err(|e| SpoolError::Io {
            path: cfg.spool_dir.join(store::FILE_NAME),
            what: "the task opening it failed",
            source: std::io::Error::other(e),
        })?;
        let (db, path, rec, wal, gen) = opened?;

        let dedup = Dedup::new(cfg.dedup_window);
        for (at, key) in &rec.dedup {
            dedup.record_key_at(*key, *at);
        }
        let total: u64 = rec.pending.values().sum();
        tracing::info!(file = %path.display(), pending = total, events = rec.events, bytes = rec.bytes, dedup_ids = rec.dedup.len(), "spool opened");
        for (name, n) in &rec.pending {
            if !sinks.contains_key(name) {
                tracing::warn!(sink = %name, pending = n, "spool holds deliveries for a sink that is not in routes.toml; they stay until it comes back");
            }
        }
        crate::metrics::spool_bytes(rec.bytes);

        let (stop, _) = watch::channel(false);
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(Arc::new(db))),
            path,
            cfg: cfg.clone(),
            dedup,
            used: AtomicU64::new(rec.bytes),
            sinks: RwLock::new(sinks.clone()),
            dead: JsonlFile::new(&cfg.dead_letter_file),
            stop,
            writer: RwLock::new(Some(tx)),
            trouble: RwLock::new(None),
            mem: Mutex::new(memtable::Memtable::default()),
            in_hand: AtomicUsize::new(0),
            #[cfg(test)]
            done_reports: AtomicU64::new(0),
            #[cfg(test)]
            bound_checkpoints: AtomicU64::new(0),
            #[cfg(test)]
            bound_waits: AtomicU64::new(0),
            #[cfg(test)]
            wal_faults: Default::default(),
            #[cfg(test)]
            behind: Default::default(),
        });
        let registry = Registry::new(shared.clone(), tokio::runtime::Handle::current());
        for (name, since) in &rec.paused {
            let since = std::time::UNIX_EPOCH + Duration::from_millis(*since);
            let since = crate::event::format_time(chrono::DateTime::<chrono::Utc>::from(since));
            tracing::warn!(sink = %name, since = %since, pending = rec.pending.get(name).copied().unwrap_or(0), "sink is paused; its events wait in the spool until `webio-router resume {name}`");
        }
        let paused = |name: &str| rec.paused.contains_key(name);
        for (name, n) in &rec.pending {
            registry.queue_at_start(name, *n, paused(name));
        }
        for name in sinks.keys().chain(rec.paused.keys()) {
            registry.queue_at_start(name, 0, paused(name));
        }
        let writer = Writer {
            shared: shared.clone(),
            registry: registry.clone(),
            next_seq: rec.next_seq,
            committed_bytes: rec.bytes,
            names: rec.pending.keys().cloned().chain(sinks.keys().cloned()).collect(),
            last_prune: 0,
            last_fsync: Instant::now(),
            unsynced: false,
            full: false,
            pipe: Default::default(),
            closing: None,
            scratch: Default::default(),
            wal,
            gen,
            behind: None,
            lost_checkpoint: false,
        };
        let audit_sinks: Vec<String> = rec.pending.keys().cloned().collect();
        let audited = rec.next_seq;
        let (done_tx, done_rx) = oneshot::channel();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                // A bug, not the disk (redb's panics are caught inside): say so on /readyz
                // rather than answer 503 with no reason.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run(rx)));
                if run.is_err() {
                    sh.set_trouble(Some(
                        "the spool writer stopped on an internal error (see the log); restart the daemon".into(),
                    ));
                }
                let _ = done_tx.send(());
            })
            .map_err(|source| SpoolError::Io {
                path: shared.path.clone(),
                what: "cannot start the writer thread",
                source,
            })?;
        let sh = shared.clone();
        let (audit_tx, audit_rx) = oneshot::channel();
        if let Err(e) = std::thread::Builder::new().name("spool-audit".into()).spawn(move || {
            audit(&sh, &audit_sinks, audited);
            // The file is let go of before the shutdown is told.
            drop(sh);
            let _ = audit_tx.send(());
        }) {
            tracing::warn!(error = %e, "spool: cannot start the check of the event records; damaged records are still found when their sink reaches them");
        }
        Ok(Arc::new(Spool {
            shared,
            registry,
            closing: AtomicBool::new(false),
            writer_thread: Mutex::new(Some(thread)),
            writer_done: Mutex::new(Some(done_rx)),
            audit_done: Mutex::new(Some(audit_rx)),
        }))
    }

    /// Pending (event, sink) pairs, by sink.
    pub fn pending(&self) -> BTreeMap<String, u64> {
        self.registry.all().iter().map(|q| (q.name.to_string(), q.pending())).collect()
    }

    /// Pending pairs of the sinks that can drain (those still in routes.toml, not paused).
    fn drainable(&self) -> u64 {
        let sinks = self.shared.sinks.read().expect("sinks lock");
        self.registry.all().iter().filter(|q| sinks.contains_key(&*q.name) && !q.is_paused()).map(|q| q.pending()).sum()
    }
}

/// Event records checked per snapshot by [`audit`] (a few tens of milliseconds each).
const AUDIT_CHUNK: usize = 8192;

/// Checks every event record found at the start (seqs below `end`), in short snapshots beside
/// the running daemon, and logs what a start used to report before it was ready: damaged
/// records (kept, never delivered, dead-lettered as stored when their sink reaches them) and
/// records no sink refers to. Gives up quietly when the spool closes.
fn audit(shared: &Shared, sinks: &[String], end: u64) {
    #[cfg(test)]
    tests::late_audit(shared);
    let started = Instant::now();
    let (mut from, mut first, mut unreadable, mut orphans) = (0u64, None, 0usize, 0usize);
    loop {
        if *shared.stop.borrow() {
            return;
        }
        let Ok(db) = shared.db() else {
            // The writer is reopening the file after a failed commit.
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        match store::audit(&db, from..end, AUDIT_CHUNK, sinks) {
            Ok(a) => {
                unreadable += a.unreadable.len();
                if first.is_none() {
                    first = a.unreadable.into_iter().next();
                }
                orphans += a.orphans.len();
                match a.next {
                    Some(next) => from = next,
                    None => break,
                }
            }
            Err(e) => {
                tracing::warn!(file = %shared.path.display(), error = %e, "spool: the check of the event records stopped; damaged records are still found when their sink reaches them");
                return;
            }
        }
    }
    let path = shared.path.display();
    if let Some((seq, why)) = first {
        tracing::error!(file = %path, records = unreadable, first_seq = seq, first_error = %why, "spool: some event records are damaged; they are kept, never delivered, and go to the dead-letter file as stored when their sink reaches them");
    }
    if orphans > 0 {
        tracing::warn!(file = %path, records = orphans, "spool: some event records are not pending for any sink; they are kept");
    }
    tracing::debug!(file = %path, took_ms = started.elapsed().as_millis() as u64, "spool: event records checked");
}

impl Delivery for Spool {
    fn submit(&self, env: Envelope, sinks: Vec<Arc<dyn Sink>>) -> BoxFuture<'_, Result<Accepted, Refused>> {
        Box::pin(async move {
            if self.closing.load(Ordering::Acquire) {
                return Err(Refused { reason: "shutting down".into(), retry_after: FULL_RETRY_AFTER });
            }
            if self.shared.dedup.contains(&env.event.id) {
                return Ok(Accepted::Duplicate);
            }
            let rec = store::encode(&env);
            let size = rec.len() as u64;
            let max = self.shared.cfg.max_spool_bytes;
            let before = self.shared.used.fetch_add(size, Ordering::AcqRel);
            if before + size > max {
                self.shared.used.fetch_sub(size, Ordering::AcqRel);
                return Err(Refused {
                    reason: format!("spool full ({before} of {max} bytes used)"),
                    retry_after: FULL_RETRY_AFTER,
                });
            }
            let mut names: Vec<String> = sinks.iter().map(|s| s.name().to_owned()).collect();
            names.sort();
            names.dedup();
            let (reply, answer) = oneshot::channel();
            let id = env.event.id.clone();
            let op = Op::Append(Append { rec, id, sinks: names, env: Arc::new(env), dedup: true, reply });
            if !self.shared.send(op) {
                self.shared.used.fetch_sub(size, Ordering::AcqRel);
                return Err(Refused { reason: "the spool is closed".into(), retry_after: FULL_RETRY_AFTER });
            }
            answer.await.unwrap_or_else(|_| {
                Err(Refused { reason: "the spool writer stopped".into(), retry_after: FULL_RETRY_AFTER })
            })
        })
    }

    fn sinks_changed(&self, sinks: &HashMap<String, Arc<dyn Sink>>) {
        *self.shared.sinks.write().expect("sinks lock") = sinks.clone();
        for name in sinks.keys() {
            self.registry.queue(name);
        }
        for q in self.registry.all() {
            if !sinks.contains_key(&*q.name) && q.pending() > 0 {
                tracing::warn!(sink = %q.name, pending = q.pending(), "sink removed from routes.toml; its pending deliveries stay in the spool until it comes back");
            }
            q.wake();
        }
    }

    fn is_ready(&self) -> bool {
        !self.closing.load(Ordering::Acquire) && self.shared.trouble().is_none()
    }

    fn sink_states(&self) -> HashMap<String, SinkState> {
        self.states()
    }

    fn set_paused(&self, sink: &str, paused: bool) -> BoxFuture<'_, Result<(), ControlRefused>> {
        let sink = sink.to_owned();
        Box::pin(async move { self.pause(&sink, paused).await })
    }

    fn replay(
        &self,
        lines: Vec<String>,
        only: Option<String>,
        known: BTreeSet<String>,
    ) -> BoxFuture<'_, Result<ReplayOutcome, ControlRefused>> {
        Box::pin(self.replay_lines(lines, only, known))
    }

    fn unready_reason(&self) -> Option<String> {
        self.shared.trouble()
    }

    fn shutdown(&self, deadline: tokio::time::Instant) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.closing.store(true, Ordering::Release);
            // Leave a little of the deadline for the writer's last commit.
            let drain_until = deadline.checked_sub(LAST_COMMIT).unwrap_or(deadline);
            if self.shared.cfg.drain_on_shutdown {
                // Wait until every sink that can drain has (for a spool that will not outlive
                // the process, such as a pod's emptyDir); failing sinks keep retrying.
                let left = self.drainable();
                if left > 0 {
                    tracing::info!(pending = left, "drain_on_shutdown: waiting until the spool is empty");
                }
                loop {
                    let left = self.drainable();
                    if left == 0 {
                        break;
                    }
                    if tokio::time::Instant::now() >= drain_until {
                        tracing::error!(pending = left, file = %self.shared.path.display(), "drain_on_shutdown: the shutdown deadline came first; these deliveries stay in the spool (and are lost if it does not outlive the process)");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } else {
                // Let the sinks drain while any of them is making progress.
                loop {
                    let busy = self.registry.all().into_iter().any(|q| q.status() == queue::BUSY);
                    if !busy || tokio::time::Instant::now() >= drain_until {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let _ = self.shared.stop.send(true);
            for task in self.registry.take_tasks() {
                let _ = tokio::time::timeout_at(deadline, task).await;
            }
            // The writer commits what the drains reported, then stops. A disk that hangs must
            // not hold the process past the deadline: the thread is then left behind (what it
            // did not commit repeats after the restart, which at-least-once allows).
            self.shared.writer.write().expect("writer lock").take();
            let done = self.writer_done.lock().expect("writer done lock").take();
            if let Some(done) = done {
                if tokio::time::timeout_at(deadline, done).await.is_err() {
                    tracing::error!(file = %self.shared.path.display(), "spool writer did not stop before the shutdown deadline; leaving it");
                } else if let Some(thread) = self.writer_thread.lock().expect("writer thread lock").take() {
                    let _ = thread.join();
                }
            }
            // After the writer's last commit, which comes first: the audit returns at its next
            // snapshot (on a loaded machine it may not even have started); until then it holds
            // the file, and a spool opened again on it right after this returns would find it
            // in use.
            let audit = self.audit_done.lock().expect("audit done lock").take();
            if let Some(done) = audit {
                if tokio::time::timeout_at(deadline, done).await.is_err() {
                    tracing::warn!(file = %self.shared.path.display(), "spool: the check of the event records did not stop before the shutdown deadline; leaving it");
                }
            }
            let left: BTreeMap<String, u64> = self.pending().into_iter().filter(|(_, n)| *n > 0).collect();
            if left.is_empty() {
                tracing::info!(file = %self.shared.path.display(), "spool closed, nothing pending");
            } else {
                tracing::info!(file = %self.shared.path.display(), pending = ?left, "spool closed; pending deliveries resume at the next start");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::SinkError;
    use std::sync::atomic::AtomicUsize;

    /// A sink that fails (retryably) until told otherwise, and records what it got.
    struct Fake {
        name: String,
        ok: AtomicBool,
        got: Mutex<Vec<String>>,
        calls: AtomicUsize,
        /// Deliveries wait while this is set.
        hold: AtomicBool,
    }

    impl Sink for Fake {
        fn name(&self) -> &str {
            &self.name
        }
        fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::AcqRel);
                while self.hold.load(Ordering::Acquire) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if self.ok.load(Ordering::Acquire) {
                    self.got.lock().unwrap().push(env.event.id.clone());
                    Ok(())
                } else {
                    Err(SinkError::retryable("down"))
                }
            })
        }
    }

    fn fake(name: &str, ok: bool) -> Arc<Fake> {
        Arc::new(Fake {
            name: name.into(),
            ok: AtomicBool::new(ok),
            got: Mutex::default(),
            calls: AtomicUsize::new(0),
            hold: AtomicBool::new(false),
        })
    }

    fn envelope(n: usize) -> Envelope {
        let body = format!(r#"{{"type":"payment","n":{n}}}"#);
        let event = crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
        Envelope::new(event, body.into())
    }

    fn config(dir: &std::path::Path) -> DeliveryConfig {
        DeliveryConfig {
            spool_dir: dir.join("spool"),
            dead_letter_file: dir.join("dead.jsonl"),
            retry_initial: Duration::from_millis(5),
            retry_max: Duration::from_millis(20),
            max_attempts: 100_000,
            ..Default::default()
        }
    }

    pub(super) async fn wait(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..6000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out: {what}");
    }

    /// A sink with `ordering = "conversation"` that fails chosen events, records what it
    /// confirmed (conversation, body) in order, and notes any event it got while an earlier
    /// event of the same conversation was not confirmed yet.
    struct Ordered {
        /// Body → answers still to fail (`u32::MAX`: until `hold` is false).
        fail: Mutex<HashMap<String, u32>>,
        /// While true, events failing "until released" keep failing.
        hold: AtomicBool,
        /// Body → permanent failure.
        refuse: Vec<String>,
        up: AtomicBool,
        got: Mutex<Vec<(String, String)>>,
        offered: Mutex<Vec<String>>,
        violations: Mutex<Vec<String>>,
    }

    impl Ordered {
        fn new(fail: &[(&str, u32)], refuse: &[&str], up: bool) -> Arc<Ordered> {
            Arc::new(Ordered {
                fail: Mutex::new(fail.iter().map(|(b, n)| (b.to_string(), *n)).collect()),
                hold: AtomicBool::new(true),
                refuse: refuse.iter().map(|b| b.to_string()).collect(),
                up: AtomicBool::new(up),
                got: Mutex::default(),
                offered: Mutex::default(),
                violations: Mutex::default(),
            })
        }

        fn bodies(&self, conversation: &str) -> Vec<String> {
            self.got.lock().unwrap().iter().filter(|(c, _)| c == conversation).map(|(_, b)| b.clone()).collect()
        }
    }

    impl Sink for Ordered {
        fn name(&self) -> &str {
            "ordered"
        }
        fn ordering(&self) -> crate::sinks::SinkOrdering {
            crate::sinks::SinkOrdering::Conversation
        }
        fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async move {
                let conv = env.event.conversation_id.clone().unwrap_or_default();
                let body = env.event.body.clone().unwrap_or_default();
                if !conv.is_empty() {
                    // Every earlier body of this conversation (same prefix, smaller number)
                    // must be confirmed or refused already.
                    let n: u32 = body[1..].parse().unwrap();
                    let done: Vec<String> = self.bodies(&conv);
                    for k in 1..n {
                        let earlier = format!("{}{k}", &body[..1]);
                        if !done.contains(&earlier) && !self.refuse.contains(&earlier) {
                            self.violations.lock().unwrap().push(format!("{body} before {earlier}"));
                        }
                    }
                }
                self.offered.lock().unwrap().push(body.clone());
                // Long enough for events attempted together to overlap.
                tokio::time::sleep(Duration::from_millis(3)).await;
                if !self.up.load(Ordering::Acquire) {
                    return Err(SinkError::retryable("down"));
                }
                if self.refuse.contains(&body) {
                    return Err(SinkError::permanent("refused"));
                }
                if let Some(left) = self.fail.lock().unwrap().get_mut(&body) {
                    if *left == u32::MAX && self.hold.load(Ordering::Acquire) {
                        return Err(SinkError::retryable("not yet"));
                    }
                    if *left > 0 && *left != u32::MAX {
                        *left -= 1;
                        return Err(SinkError::retryable("not yet"));
                    }
                }
                self.got.lock().unwrap().push((conv, body));
                Ok(())
            })
        }
    }

    /// An inbound message of conversation `conv` whose body is `body` (`A1`, `B2`, …).
    fn message(conv: Option<&str>, body: &str) -> Envelope {
        let c = conv.map_or(String::new(), |c| format!(r#""conversationId":"{c}","#));
        let text = format!(r#"{{"type":"inboundMessage",{c}"body":"{body}"}}"#);
        let event = crate::event::normalise(text.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
        Envelope::new(event, text.into())
    }

    fn expected(prefix: &str, n: usize) -> Vec<String> {
        (1..=n).map(|k| format!("{prefix}{k}")).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conversation_reaches_an_ordered_sink_in_acceptance_order_through_retries_while_others_flow_on() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        // A1 fails until every event of B and C is confirmed.
        let sink = Ordered::new(&[("A1", u32::MAX), ("B2", 2)], &[], true);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("ordered".to_string(), sink.clone() as Arc<dyn Sink>)].into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let t: Vec<Arc<dyn Sink>> = vec![sink.clone()];
        for k in 1..=5 {
            for c in ["A", "B", "C"] {
                let env = message(Some(c), &format!("{c}{k}"));
                assert_eq!(spool.submit(env, t.clone()).await, Ok(Accepted::New));
            }
            // Events without a conversation are not ordered (and not held back by A).
            assert_eq!(spool.submit(message(None, &format!("N{k}")), t.clone()).await, Ok(Accepted::New));
        }
        wait("B and C while A1 fails", || sink.bodies("B").len() == 5 && sink.bodies("C").len() == 5).await;
        wait("events without a conversation", || sink.bodies("").len() == 5).await;
        assert!(sink.bodies("A").is_empty(), "A2.. wait for A1");
        assert!(!sink.offered.lock().unwrap().iter().any(|b| b.starts_with('A') && b != "A1"), "only A1 was tried");
        sink.hold.store(false, Ordering::Release);
        wait("A", || sink.bodies("A").len() == 5).await;
        assert_eq!(sink.bodies("A"), expected("A", 5));
        assert_eq!(sink.bodies("B"), expected("B", 5));
        assert_eq!(sink.bodies("C"), expected("C", 5));
        assert_eq!(*sink.violations.lock().unwrap(), Vec::<String>::new());
        wait("an empty spool", || spool.pending().values().all(|p| *p == 0)).await;
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_an_event_waits_for_its_retry_the_other_conversations_do_not_wait_for_its_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        // A backoff far longer than the test may take.
        cfg.retry_initial = Duration::from_secs(60);
        cfg.retry_max = Duration::from_secs(60);
        let sink = Ordered::new(&[("A1", u32::MAX)], &[], true);
        // Everything is accepted before the sink is known, so that the first round holds A1
        // and B1 together.
        let spool = Spool::open(&cfg, &HashMap::new()).await.unwrap();
        let t: Vec<Arc<dyn Sink>> = vec![sink.clone()];
        assert_eq!(spool.submit(message(Some("A"), "A1"), t.clone()).await, Ok(Accepted::New));
        assert_eq!(spool.submit(message(Some("A"), "A2"), t.clone()).await, Ok(Accepted::New));
        for k in 1..=20 {
            assert_eq!(spool.submit(message(Some("B"), &format!("B{k}")), t.clone()).await, Ok(Accepted::New));
        }
        spool.sinks_changed(&[("ordered".to_string(), sink.clone() as Arc<dyn Sink>)].into());
        // One event of B at a time, each after the previous one: without A1 waiting in the
        // gate, the sink would back off a minute after each round.
        wait("B", || sink.bodies("B").len() == 20).await;
        assert_eq!(sink.bodies("B"), expected("B", 20));
        assert_eq!(sink.offered.lock().unwrap().iter().filter(|b| b.starts_with('A')).count(), 1, "A1 once, A2 never");
        assert_eq!(*sink.violations.lock().unwrap(), Vec::<String>::new());
        // The sink has seen B20 before the drain counts it as finished.
        wait("A1 and A2 left", || spool.pending()["ordered"] == 2).await;
        spool.shutdown(tokio::time::Instant::now() + Duration::from_millis(300)).await;
    }

    /// The same sink without ordering.
    struct Unordered(Arc<Ordered>);

    impl Sink for Unordered {
        fn name(&self) -> &str {
            "unordered"
        }
        fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
            self.0.deliver(env)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_without_ordering_does_not_back_off_whole_for_one_failing_event() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        // A backoff far longer than the test may take.
        cfg.retry_initial = Duration::from_secs(600);
        cfg.retry_max = Duration::from_secs(600);
        let inner = Ordered::new(&[("A1", u32::MAX)], &[], true);
        let sink: Arc<dyn Sink> = Arc::new(Unordered(inner.clone()));
        // Accepted before the sink is known, so that the first round holds A1 and 15 others.
        let spool = Spool::open(&cfg, &HashMap::new()).await.unwrap();
        let t = vec![sink.clone()];
        assert_eq!(spool.submit(message(Some("A"), "A1"), t.clone()).await, Ok(Accepted::New));
        for k in 1..=40 {
            assert_eq!(spool.submit(message(None, &format!("N{k}")), t.clone()).await, Ok(Accepted::New));
        }
        spool.sinks_changed(&[("unordered".to_string(), sink.clone())].into());
        // Without A1 waiting for its own retry, the sink would back off ten minutes after the
        // first round and the rest would wait that long.
        wait("every other event", || inner.bodies("").len() == 40).await;
        assert_eq!(inner.offered.lock().unwrap().iter().filter(|b| *b == "A1").count(), 1, "A1 waits for its backoff");
        wait("A1 left", || spool.pending()["unordered"] == 1).await;
        spool.shutdown(tokio::time::Instant::now() + Duration::from_millis(300)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_lettered_event_releases_the_next_event_of_its_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_attempts = 3;
        let sink = Ordered::new(&[("A1", 5)], &["A3"], true);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("ordered".to_string(), sink.clone() as Arc<dyn Sink>)].into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let t: Vec<Arc<dyn Sink>> = vec![sink.clone()];
        for k in 1..=4 {
            assert_eq!(spool.submit(message(Some("A"), &format!("A{k}")), t.clone()).await, Ok(Accepted::New));
        }
        wait("the rest of A", || sink.bodies("A").len() == 2).await;
        // A1 gave up after 3 attempts, A3 was refused: both dead letters, in that order.
        assert_eq!(sink.bodies("A"), ["A2", "A4"]);
        let text = std::fs::read_to_string(&cfg.dead_letter_file).unwrap();
        let dead: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<dead::DeadLetter>(l).unwrap().envelope().unwrap().event.body.unwrap())
            .collect();
        assert_eq!(dead, ["A1", "A3"]);
        let offered = sink.offered.lock().unwrap().clone();
        assert_eq!(offered, ["A1", "A1", "A1", "A2", "A3", "A4"]);
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_order_survives_a_restart_with_a_backlog_beyond_the_memory_window() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let down = Ordered::new(&[], &[], false);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("ordered".to_string(), down.clone() as Arc<dyn Sink>)].into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let t: Vec<Arc<dyn Sink>> = vec![down.clone()];
        let n = queue::WINDOW; // per conversation: three times the window in all
        for k in 1..=n {
            for c in ["A", "B", "C"] {
                let env = message(Some(c), &format!("{c}{k}"));
                assert_eq!(spool.submit(env, t.clone()).await, Ok(Accepted::New));
            }
        }
        wait("attempts while down", || down.offered.lock().unwrap().len() >= 3).await;
        spool.shutdown(tokio::time::Instant::now() + Duration::from_millis(300)).await;
        drop(spool);

        // After the restart the backlog is read back from disk; B2 fails a few times first.
        let up = Ordered::new(&[("B2", 3)], &[], true);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("ordered".to_string(), up.clone() as Arc<dyn Sink>)].into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        wait("the backlog", || up.got.lock().unwrap().len() == 3 * n).await;
        for c in ["A", "B", "C"] {
            assert_eq!(up.bodies(c), expected(c, n), "{c}");
        }
        assert_eq!(*up.violations.lock().unwrap(), Vec::<String>::new());
        assert_eq!(*down.violations.lock().unwrap(), Vec::<String>::new());
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_ids_of_a_batch_checked_and_recorded_at_once_are_on_disk_once_and_stay_duplicates_after_a_restart() {
        // Concurrent submits share commits: the writer asks the window once per batch and
        // records the batch's ids once it is durable; a stop right after must keep them all.
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let down = fake("down", false);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("down".to_string(), down.clone() as Arc<dyn Sink>)].into();
        let targets: Vec<Arc<dyn Sink>> = sinks.values().cloned().collect();
        let n = 40;
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let answers = futures_util::future::join_all((0..n).map(|i| spool.submit(envelope(i), targets.clone()))).await;
        assert!(answers.iter().all(|a| *a == Ok(Accepted::New)), "{answers:?}");
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(2)).await;
        drop(spool);

        {
            // The drain tasks may still hold the file for a moment after the stop.
            let mut opened = store::open_db(&cfg.spool_dir);
            for _ in 0..500 {
                if !matches!(opened, Err(store::SpoolError::InUse { .. })) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                opened = store::open_db(&cfg.spool_dir);
            }
            let (db, _) = opened.unwrap();
            let mut ids: Vec<u128> = store::recover(&db, 0).unwrap().dedup.into_iter().map(|(_, k)| k).collect();
            ids.sort_unstable();
            let mut want: Vec<u128> = (0..n).map(|i| crate::dedup::key(&envelope(i).event.id)).collect();
            want.sort_unstable();
            assert_eq!(ids, want, "every accepted id is on disk, once");
        }
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        for i in [0, n / 2, n - 1] {
            assert_eq!(spool.submit(envelope(i), targets.clone()).await, Ok(Accepted::Duplicate), "event {i}");
        }
        assert_eq!(spool.submit(envelope(n), targets.clone()).await, Ok(Accepted::New));
        assert_eq!(spool.pending()["down"], n as u64 + 1);
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spool_of_the_previous_build_opens_keeps_its_dedup_window_and_drains() {
        // As the build before record v4 and `dedup_batches` left it: v3 records, a dedup row
        // per event.
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let n = 50;
        {
            let (db, _) = store::open_db(&cfg.spool_dir).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut events = tx.open_table(store::EVENTS).unwrap();
                let mut pending = tx.open_table(store::PENDING).unwrap();
                let mut dedup = tx.open_table(store::DEDUP).unwrap();
                let now = crate::dedup::now_millis();
                for i in 0..n {
                    let env = envelope(i);
                    events.insert(i as u64, record::encode_v3(&env).as_slice()).unwrap();
                    pending.insert(("up", i as u64), 0u32).unwrap();
                    dedup.insert((now, crate::dedup::key(&env.event.id)), ()).unwrap();
                }
            }
            tx.commit().unwrap();
        }
        let up = fake("up", false);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("up".to_string(), up.clone() as Arc<dyn Sink>)].into();
        let targets: Vec<Arc<dyn Sink>> = sinks.values().cloned().collect();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        assert_eq!(spool.pending()["up"], n as u64);
        assert_eq!(spool.submit(envelope(7), targets.clone()).await, Ok(Accepted::Duplicate), "the old dedup rows");
        assert_eq!(spool.submit(envelope(n), targets.clone()).await, Ok(Accepted::New));
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        drop(spool);

        // Again: the ids of both dedup tables are read back; then everything drains.
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        assert_eq!(spool.submit(envelope(7), targets.clone()).await, Ok(Accepted::Duplicate));
        assert_eq!(spool.submit(envelope(n), targets.clone()).await, Ok(Accepted::Duplicate), "the new dedup row");
        up.ok.store(true, Ordering::Release);
        wait("the old and the new events", || up.got.lock().unwrap().len() > n).await;
        let got: std::collections::HashSet<_> = up.got.lock().unwrap().iter().cloned().collect();
        assert_eq!(got, (0..=n).map(|i| envelope(i).event.id).collect());
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backlog_larger_than_the_memory_window_is_delivered_whole_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (down, up) = (fake("down", false), fake("up", true));
        let sinks: HashMap<String, Arc<dyn Sink>> =
            [("down".to_string(), down.clone() as Arc<dyn Sink>), ("up".to_string(), up.clone() as Arc<dyn Sink>)]
                .into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let n = queue::WINDOW * 5 + 7;
        let targets: Vec<Arc<dyn Sink>> = sinks.values().cloned().collect();
        let answers = futures_util::future::join_all((0..n).map(|i| spool.submit(envelope(i), targets.clone()))).await;
        assert!(answers.iter().all(|a| *a == Ok(Accepted::New)), "{answers:?}");
        // A re-delivery is a duplicate.
        assert_eq!(spool.submit(envelope(3), targets.clone()).await, Ok(Accepted::Duplicate));
        wait("the healthy sink", || up.got.lock().unwrap().len() >= n).await;
        assert_eq!(spool.pending()["down"], n as u64);
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        drop(spool);

        // Restart: the backlog is only on disk now; more arrives while it is read back.
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        assert_eq!(spool.submit(envelope(3), targets.clone()).await, Ok(Accepted::Duplicate), "dedup survived");
        down.ok.store(true, Ordering::Release);
        let more = futures_util::future::join_all(
            (n..n + queue::WINDOW * 2).map(|i| spool.submit(envelope(i), targets.clone())),
        )
        .await;
        assert!(more.iter().all(|a| *a == Ok(Accepted::New)));
        let total = n + queue::WINDOW * 2;
        wait("the recovered sink", || {
            let got: std::collections::HashSet<_> = down.got.lock().unwrap().iter().cloned().collect();
            got.len() == total
        })
        .await;
        for _ in 0..1500 {
            if spool.pending().values().all(|p| *p == 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !spool.pending().values().all(|p| *p == 0) {
            let db = spool.shared.db().unwrap();
            let rows = store::pending_len(&db).unwrap();
            let up_got = up.got.lock().unwrap().len();
            let down_got = down.got.lock().unwrap().len();
            panic!(
                "timed out: an empty spool: pending {:?}, rows on disk {rows}, up got {up_got}, down got {down_got}, total {total}, n {n}",
                spool.pending()
            );
        }
        wait("no event data left", || spool.shared.used.load(Ordering::Acquire) == 0).await;
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        drop(spool);
        let (db, _) = store::open_db(&cfg.spool_dir).unwrap();
        assert_eq!(store::pending_len(&db).unwrap(), 0);
        assert_eq!(store::recover(&db, 0).unwrap().events, 0, "every event row is gone");
        assert_eq!(store::next_seq(&db).unwrap(), total as u64, "seqs are not reused after the checkpoint");
    }

    /// The writer counts an event's pending pairs just after its commit. A drain reading the
    /// sink's backlog back from disk at that moment sees the new row, and may deliver and
    /// finish it before it is counted: the count must still come out at the rows on disk (it
    /// stayed 1 above them for good, and the wait for an empty spool timed out under load).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delivery_read_back_before_the_writer_counts_it_leaves_the_pending_count_exact() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let sink = fake("s", true);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), sink.clone() as Arc<dyn Sink>)].into();
        let t: Vec<Arc<dyn Sink>> = vec![sink.clone()];
        // A backlog on disk for a paused sink: after the restart its drain reads it back.
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        spool.set_paused("s", true).await.unwrap();
        assert_eq!(spool.submit(envelope(0), t.clone()).await, Ok(Accepted::New));
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        drop(spool);
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let q = spool.registry.queue("s");
        assert_eq!(q.pending(), 1);

        // The writer commits event 1, then waits for the registry before counting it.
        let (release, released) = mpsc::channel::<()>();
        let (holding, held) = mpsc::channel();
        let registry = spool.registry.clone();
        let holder = std::thread::spawn(move || {
            let _lock = registry.hold();
            holding.send(()).unwrap();
            let _ = released.recv();
        });
        held.recv().unwrap();
        let submit = tokio::spawn({
            let (spool, t) = (spool.clone(), t.clone());
            async move { spool.submit(envelope(1), t).await }
        });
        // Pending pairs as the drains see them: redb's rows and the memtable's.
        let rows = || memtable::pending_ids(&spool.shared, "s").unwrap().len();
        wait("the commit of event 1", || rows() == 2).await;
        // Meanwhile the drain reads both rows back and delivers them (resumed in memory only:
        // the writer, which would record the resume, is waiting).
        q.set_paused(false);
        wait("both deliveries", || sink.got.lock().unwrap().len() == 2).await;
        release.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(submit.await.unwrap(), Ok(Accepted::New));
        wait("the deliveries recorded", || rows() == 0).await;
        assert_eq!(spool.pending()["s"], 0, "the count matches the rows on disk");
        assert_eq!(*sink.got.lock().unwrap(), [envelope(0).event.id, envelope(1).event.id], "each once");
        spool.set_paused("s", false).await.unwrap();
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        drop(spool);
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        assert_eq!(spool.pending()["s"], 0);
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }

    /// Spool files whose `spool-audit` thread runs late: not before the spool stops (as a
    /// thread the scheduler left waiting under load), and a little after.
    static LATE_AUDIT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub(super) fn late_audit(shared: &Shared) {
        if !LATE_AUDIT.lock().unwrap().contains(&shared.path) {
            return;
        }
        while !*shared.stop.borrow() {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    /// Under load the `spool-audit` thread may not run at all before the spool stops, and it
    /// holds the file until it returns: a shutdown that returned first left the file open, and
    /// a reopen right after was refused as in use (the tests that restart a spool, in CI and
    /// in loops under load).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spool_opens_again_right_after_its_shutdown_even_when_its_audit_runs_late() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let sink = fake("s", false);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), sink.clone() as Arc<dyn Sink>)].into();
        LATE_AUDIT.lock().unwrap().push(cfg.spool_dir.join(store::FILE_NAME));
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        assert_eq!(spool.submit(envelope(0), vec![sink.clone()]).await, Ok(Accepted::New));
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        drop(spool);
        let spool = Spool::open(&cfg, &sinks).await.expect("opens again at once");
        assert_eq!(spool.pending()["s"], 1);
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
    }

    /// A small tmpfs (the tests run as root, as `.ci/run` does), unmounted when dropped.
    pub(super) struct Tmpfs(pub(super) tempfile::TempDir);

    impl Tmpfs {
        pub(super) fn mount(size: &str) -> Tmpfs {
            let dir = tempfile::tempdir().unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "cannot mount a tmpfs (run the tests as root, as .ci/run does)");
            Tmpfs(dir)
        }

        pub(super) fn fill(&self) {
            use std::io::Write;
            let mut f = std::fs::File::create(self.0.path().join("filler")).unwrap();
            while f.write(&[0u8; 4096]).is_ok_and(|n| n > 0) {}
            while f.write(&[0u8]).is_ok_and(|n| n > 0) {}
        }

        pub(super) fn free(&self) {
            std::fs::remove_file(self.0.path().join("filler")).unwrap();
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_full_disk_the_spool_heals_by_itself_and_its_accounts_stay_exact() {
        let fs = Tmpfs::mount("2m");
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.spool_dir = fs.0.path().join("spool");
        let sink = fake("s", false);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), sink.clone() as Arc<dyn Sink>)].into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let t: Vec<Arc<dyn Sink>> = vec![sink.clone()];
        let mut accepted = 0;
        for i in 0..5 {
            assert_eq!(spool.submit(envelope(i), t.clone()).await, Ok(Accepted::New));
            accepted += 1;
        }
        wait("attempts recorded", || sink.calls.load(Ordering::Acquire) >= 3).await;

        fs.fill();
        let refused = loop {
            match spool.submit(envelope(accepted + 100), t.clone()).await {
                Ok(_) => accepted += 1,
                Err(r) => break r,
            }
            assert!(accepted < 5000, "never refused");
        };
        assert_eq!(refused.reason, "the spool cannot be written");
        assert!(!spool.is_ready());
        let why = spool.unready_reason().unwrap();
        assert!(why.contains("No space left on device"), "{why}");
        // Deliveries go on from memory meanwhile; their bookkeeping waits for the disk.
        sink.ok.store(true, Ordering::Release);
        wait("deliveries while the disk is full", || sink.got.lock().unwrap().len() == accepted).await;
        assert!(!spool.is_ready(), "still full");

        fs.free();
        wait("the spool to heal", || spool.is_ready()).await;
        for i in 0..3 {
            assert_eq!(spool.submit(envelope(10_000 + i), t.clone()).await, Ok(Accepted::New));
        }
        wait("everything delivered", || sink.got.lock().unwrap().len() == accepted + 3).await;
        drained_and_empty(spool, &cfg, Duration::from_secs(5)).await;
    }

    /// Waits until nothing is pending and no event data is counted, stops the spool, and
    /// checks that its file holds no pending row and no event row.
    async fn drained_and_empty(spool: Arc<Spool>, cfg: &DeliveryConfig, within: Duration) {
        wait("an empty spool", || spool.pending().values().all(|p| *p == 0)).await;
        wait("no event data left", || spool.shared.used.load(Ordering::Acquire) == 0).await;
        spool.shutdown(tokio::time::Instant::now() + within).await;
        drop(spool);
        let (db, _) = store::open_db(&cfg.spool_dir).unwrap();
        assert_eq!(store::pending_len(&db).unwrap(), 0);
        assert_eq!(store::recover(&db, 0).unwrap().events, 0, "every event row is gone");
    }

    /// The disk fills while a checkpoint's durable commit runs behind the webhooks: the
    /// commit fails after its non-durable one emptied the memtable, and after deliveries of
    /// half its events (their bookkeeping in the second write-ahead file). The spool refuses
    /// (503, Retry-After) until space is back, then heals by itself: redb, back at the
    /// checkpoint before, gets both files replayed (the other half, still pending, is only in
    /// the first), every event is delivered once, none stays pending, and the spool's byte
    /// count comes back to zero.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_during_a_checkpoints_durable_commit_heals_and_loses_nothing() {
        let fs = Tmpfs::mount("32m");
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.spool_dir = fs.0.path().join("spool");
        let (up, down) = (fake("up", false), fake("down", false));
        let sinks: HashMap<String, Arc<dyn Sink>> =
            [("up".to_string(), up.clone() as Arc<dyn Sink>), ("down".to_string(), down.clone() as Arc<dyn Sink>)]
                .into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let hooks = spool.shared.behind.clone();
        hooks.hold.store(true, Ordering::Release);
        let to_up: Vec<Arc<dyn Sink>> = vec![up.clone()];
        let to_down: Vec<Arc<dyn Sink>> = vec![down.clone()];
        let per_sink = 150;
        for chunk in 0..5 {
            let r = futures_util::future::join_all((0..30).flat_map(|i| {
                let n = chunk * 30 + i;
                [spool.submit(envelope(n), to_up.clone()), spool.submit(envelope(10_000 + n), to_down.clone())]
            }))
            .await;
            assert!(r.iter().all(|r| *r == Ok(Accepted::New)));
        }
        wait("a checkpoint's durable commit handed over", || hooks.started.load(Ordering::Acquire) == 1).await;
        fs.fill();
        // One sink's events delivered from memory; the bookkeeping goes to the second
        // write-ahead file (preallocated: it takes frames on a full disk).
        up.ok.store(true, Ordering::Release);
        wait("deliveries of the checkpointed events", || up.got.lock().unwrap().len() == per_sink).await;
        let done = || {
            let mem = spool.shared.mem();
            mem.book
                .iter()
                .map(|b| if let ops::Bookkeeping::Done { seqs, .. } = b { seqs.len() } else { 0 })
                .sum::<usize>()
        };
        wait("their bookkeeping framed", || done() == per_sink).await;
        for i in 0..3 {
            assert_eq!(spool.submit(envelope(1000 + i), to_up.clone()).await, Ok(Accepted::New));
        }
        hooks.hold.store(false, Ordering::Release);
        wait("the checkpoint's durable commit", || hooks.ended.load(Ordering::Acquire) == 1).await;
        wait("the spool to stop accepting", || !spool.is_ready()).await;
        let why = spool.unready_reason().unwrap();
        assert!(why.contains("No space left on device"), "{why}");
        let refused = spool.submit(envelope(2000), to_up.clone()).await.unwrap_err();
        assert_eq!(
            (refused.reason.as_str(), refused.retry_after),
            ("the spool cannot be written", Duration::from_secs(5))
        );

        fs.free();
        wait("the spool to heal", || spool.is_ready()).await;
        {
            let db = spool.shared.db().unwrap();
            let on_disk = store::load_pending(&db, "down", None, 1000).unwrap().len();
            assert_eq!(on_disk, per_sink, "the events only the first write-ahead file held are back in redb");
        }
        assert_eq!(spool.submit(envelope(3000), to_up.clone()).await, Ok(Accepted::New));
        wait("the first sink's events", || up.got.lock().unwrap().len() == per_sink + 4).await;
        down.ok.store(true, Ordering::Release);
        wait("the second sink's events", || down.got.lock().unwrap().len() == per_sink).await;
        for sink in [&up, &down] {
            let got = sink.got.lock().unwrap();
            assert_eq!(got.iter().collect::<std::collections::HashSet<_>>().len(), got.len(), "each once");
        }
        drained_and_empty(spool, &cfg, Duration::from_secs(5)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliveries_of_checkpointed_events_waiting_in_the_memtable_are_counted_by_the_heal() {
        // Events in redb (a pause's commit is a checkpoint), delivered on a full disk: their
        // bookkeeping waits in the memtable (and the write-ahead file, preallocated: appends
        // work), the checkpoint fails, and the heal applies it and frees their bytes. (Room
        // for the preallocated file, and, once freed, for the replay of a full one.)
        let fs = Tmpfs::mount("32m");
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.spool_dir = fs.0.path().join("spool");
        let sink = fake("s", false);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), sink.clone() as Arc<dyn Sink>)].into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let t: Vec<Arc<dyn Sink>> = vec![sink.clone()];
        for i in 0..5 {
            assert_eq!(spool.submit(envelope(i), t.clone()).await, Ok(Accepted::New));
        }
        spool.set_paused("s", true).await.unwrap();
        {
            let db = spool.shared.db().unwrap();
            assert_eq!(store::load_pending(&db, "s", None, 100).unwrap().len(), 5, "the pause checkpointed them");
            assert!(spool.shared.mem().is_empty());
        }
        spool.set_paused("s", false).await.unwrap();
        fs.fill();
        sink.ok.store(true, Ordering::Release);
        wait("the checkpointed events delivered", || sink.got.lock().unwrap().len() == 5).await;
        sink.ok.store(false, Ordering::Release);
        let mut accepted = 5;
        let refused = loop {
            match spool.submit(envelope(accepted + 100), t.clone()).await {
                Ok(_) => accepted += 1,
                Err(r) => break r,
            }
            assert!(accepted < 50_000, "never refused");
        };
        assert_eq!(refused.reason, "the spool cannot be written");
        sink.ok.store(true, Ordering::Release);
        fs.free();
        wait("the spool to heal", || spool.is_ready()).await;
        wait("everything delivered", || sink.got.lock().unwrap().len() == accepted).await;
        drained_and_empty(spool, &cfg, Duration::from_secs(2)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_accepted_since_the_checkpoint_is_read_back_from_the_memtable_and_reaches_redb_only_undelivered() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (down, up) = (fake("down", false), fake("up", true));
        let sinks: HashMap<String, Arc<dyn Sink>> =
            [("down".to_string(), down.clone() as Arc<dyn Sink>), ("up".to_string(), up.clone() as Arc<dyn Sink>)]
                .into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        // Each event checked at once after its 202: a reader sees it whether or not a
        // checkpoint came in between (redb and the memtable are read as one).
        for i in 0..50 {
            assert_eq!(spool.submit(envelope(i), vec![down.clone() as Arc<dyn Sink>]).await, Ok(Accepted::New));
            let rows =
                memtable::load_pending(&spool.shared, "down", Some(i as u64).filter(|_| i > 0).map(|s| s - 1), 10)
                    .unwrap();
            assert_eq!(rows.first().map(|r| r.0), Some(i as u64), "event {i} is visible");
            let recs = memtable::load_events(&spool.shared, &[i as u64], &[], 0).unwrap();
            assert!(recs[0].1.is_some(), "the record of event {i}");
            assert!(memtable::pending_ids(&spool.shared, "down").unwrap().len() == i + 1);
        }
        for i in 50..80 {
            assert_eq!(spool.submit(envelope(i), vec![up.clone() as Arc<dyn Sink>]).await, Ok(Accepted::New));
        }
        wait("the live sink", || up.got.lock().unwrap().len() == 30).await;
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
        drop(spool);
        let (db, _) = store::open_db(&cfg.spool_dir).unwrap();
        assert_eq!(store::load_pending(&db, "down", None, 1000).unwrap().len(), 50);
        assert_eq!(store::load_pending(&db, "up", None, 1000).unwrap().len(), 0);
        assert_eq!(store::recover(&db, 0).unwrap().events, 50, "the delivered events are gone");
    }

    /// A sink behind its load leaves its events in the memtable until the checkpoint, which
    /// writes them to redb while every webhook waits: a second's worth held the answers for
    /// ~50 ms (p99 at half rate 40-55 ms in the broker and HTTP rows). The checkpoint comes
    /// as soon as the memtable holds `CHECKPOINT_EVENTS`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_memtable_of_pending_events_is_checkpointed_before_it_grows_past_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let down = fake("down", false);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("down".to_string(), down.clone() as Arc<dyn Sink>)].into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let bound = writer::CHECKPOINT_EVENTS;
        let started = std::time::Instant::now();
        for i in 0..bound * 3 {
            assert_eq!(spool.submit(envelope(i), vec![down.clone() as Arc<dyn Sink>]).await, Ok(Accepted::New));
            let held = spool.shared.mem().events.len();
            // One batch may pass the bound before its checkpoint (a batch is one submit here).
            assert!(held <= bound, "the memtable holds {held} events after {i} submits");
        }
        tracing::debug!(took = ?started.elapsed(), "submits");
        assert_eq!(memtable::pending_ids(&spool.shared, "down").unwrap().len(), bound * 3);
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        drop(spool);
        let (db, _) = store::open_db(&cfg.spool_dir).unwrap();
        assert_eq!(store::load_pending(&db, "down", None, 10_000).unwrap().len(), bound * 3);
    }

    /// A sink that keeps up reports its deliveries up to `DEFER_FOR` late: at tens of
    /// thousands of events a second the memtable held more than its bound of events already
    /// delivered, and a checkpoint came every ~15 ms while the webhooks waited. Only the
    /// events still pending once the deliveries that wait are applied count.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_already_delivered_do_not_count_towards_the_memtables_bound() {
        let bound = writer::CHECKPOINT_EVENTS;
        // The memtable filled to its bound with events whose deliveries are held back, all of
        // them in the memtable (a checkpoint on time while it fills moves some to redb: then
        // again, with a new spool).
        let mut attempt = 0;
        let (spool, s, _dir) = loop {
            attempt += 1;
            assert!(attempt <= 10, "a checkpoint on time came during every fill");
            let dir = tempfile::tempdir().unwrap();
            let cfg = config(dir.path());
            let s = fake("s", true);
            s.hold.store(true, Ordering::Release);
            let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), s.clone() as Arc<dyn Sink>)].into();
            let spool = Spool::open(&cfg, &sinks).await.unwrap();
            let t: Vec<Arc<dyn Sink>> = vec![s.clone()];
            // Below the bound at once (concurrently: fast), then the one that reaches it.
            let below =
                futures_util::future::join_all((0..bound - 1).map(|n| spool.submit(envelope(n), t.clone()))).await;
            assert!(below.iter().all(|r| *r == Ok(Accepted::New)));
            assert_eq!(spool.submit(envelope(bound), t.clone()).await, Ok(Accepted::New));
            if spool.shared.mem().events.len() == bound {
                break (spool, s, dir);
            }
            spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        };
        let before = spool.shared.bound_checkpoints.load(Ordering::Acquire);
        // Every event is delivered; the writer learns it (up to `DEFER_FOR` later) in a batch
        // of bookkeeping, which the full memtable made a checkpoint.
        s.hold.store(false, Ordering::Release);
        wait("the deliveries", || s.got.lock().unwrap().len() == bound).await;
        wait("the memtable's bookkeeping", || spool.shared.mem().events.is_empty()).await;
        assert_eq!(
            spool.shared.bound_checkpoints.load(Ordering::Acquire),
            before,
            "no checkpoint for the memtable's bound: its events were delivered"
        );
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
    }

    /// The frames of the write-ahead file written so far (a new spool's file is zeros).
    fn frames_written(cfg: &DeliveryConfig) -> usize {
        wal::decode(&std::fs::read(cfg.spool_dir.join(wal::FILE_NAME)).unwrap()).frames.len()
    }

    /// The writer writes the next batch's frame while the last one's `fdatasync` is in flight
    /// (pipelined syncs): a webhook that comes during a sync waits for one sync, not for that
    /// one and then its own. Neither is answered before its own sync ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frame_is_written_while_the_last_ones_sync_is_in_flight_and_answered_after_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let s = fake("s", true);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), s.clone() as Arc<dyn Sink>)].into();
        let spool = Arc::new(Spool::open(&cfg, &sinks).await.unwrap());
        let faults = spool.shared.wal_faults.clone();
        faults.hold.store(true, Ordering::Release);
        let submit = |n: usize| {
            let (spool, s) = (spool.clone(), s.clone());
            tokio::spawn(async move { spool.submit(envelope(n), vec![s as Arc<dyn Sink>]).await })
        };
        let first = submit(1);
        wait("the first frame", || frames_written(&cfg) == 1).await;
        let second = submit(2);
        wait("the second frame, written while the first one's sync waits", || frames_written(&cfg) == 2).await;
        assert!(!first.is_finished() && !second.is_finished(), "answered before its sync");
        assert!(spool.shared.mem().events.is_empty(), "nothing is visible before its sync");
        faults.hold.store(false, Ordering::Release);
        assert_eq!(first.await.unwrap(), Ok(Accepted::New));
        assert_eq!(second.await.unwrap(), Ok(Accepted::New));
        wait("the deliveries", || s.got.lock().unwrap().len() == 2).await;
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
    }

    /// A failed `fdatasync` fails its frame's batch and every later one in flight (each is
    /// refused: none was acknowledged), their seqs and dedup keys are given back, and the
    /// spool heals by itself; the refused events are accepted again when re-sent, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_refuses_its_batch_and_every_later_one_in_flight_and_the_spool_heals() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let s = fake("s", true);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), s.clone() as Arc<dyn Sink>)].into();
        let spool = Arc::new(Spool::open(&cfg, &sinks).await.unwrap());
        let t: Vec<Arc<dyn Sink>> = vec![s.clone()];
        assert_eq!(spool.submit(envelope(0), t.clone()).await, Ok(Accepted::New));
        wait("the first delivery", || s.got.lock().unwrap().len() == 1).await;
        let written = frames_written(&cfg);
        let faults = spool.shared.wal_faults.clone();
        faults.hold.store(true, Ordering::Release);
        let submit = |n: usize| {
            let (spool, t) = (spool.clone(), t.clone());
            tokio::spawn(async move { spool.submit(envelope(n), t).await })
        };
        let first = submit(1);
        wait("the first frame", || frames_written(&cfg) > written).await;
        let second = submit(2);
        wait("the second frame", || frames_written(&cfg) > written + 1).await;
        faults.fail.store(true, Ordering::Release);
        faults.hold.store(false, Ordering::Release);
        assert!(first.await.unwrap().is_err(), "the failed sync's batch is refused");
        assert!(second.await.unwrap().is_err(), "a later batch in flight is refused too");
        faults.fail.store(false, Ordering::Release);
        // Healed: the refused events are new (their dedup keys were given back), once.
        let mut healed = false;
        for _ in 0..3000 {
            if spool.submit(envelope(1), t.clone()).await.is_ok() {
                healed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(healed, "the spool did not heal");
        assert_eq!(spool.submit(envelope(2), t.clone()).await, Ok(Accepted::New));
        assert_eq!(spool.submit(envelope(2), t.clone()).await, Ok(Accepted::Duplicate));
        wait("the deliveries", || s.got.lock().unwrap().len() == 3).await;
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        drop(spool);
        let got = s.got.lock().unwrap().clone();
        let ids: Vec<String> = (0..3).map(|n| envelope(n).event.id.clone()).collect();
        assert_eq!(got, ids, "each event once, in order");
        let (db, _) = store::open_db(&cfg.spool_dir).unwrap();
        assert!(store::load_pending(&db, "s", None, 100).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_full_spool_refuses_and_accepts_again_once_drained() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        let size = store::encode(&envelope(1)).len() as u64;
        cfg.max_spool_bytes = size * 3 + size / 2;
        let sink = fake("s", false);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), sink.clone() as Arc<dyn Sink>)].into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let t: Vec<Arc<dyn Sink>> = vec![sink.clone()];
        for i in 0..3 {
            assert_eq!(spool.submit(envelope(i), t.clone()).await, Ok(Accepted::New));
        }
        let refused = spool.submit(envelope(9), t.clone()).await.unwrap_err();
        assert!(refused.reason.contains("spool full"), "{refused:?}");
        sink.ok.store(true, Ordering::Release);
        wait("the drain", || sink.got.lock().unwrap().len() == 3).await;
        wait("space", || spool.shared.used.load(Ordering::Acquire) == 0).await;
        assert_eq!(spool.submit(envelope(9), t).await, Ok(Accepted::New));
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }

    /// A webhook accepted while the only sink is down and its drain sleeps in its backoff
    /// does not hold the shutdown until its deadline: nothing can be delivered before the
    /// next attempt, so the stop comes at once (the event stays pending, on disk).
    #[tokio::test]
    async fn a_shutdown_does_not_wait_for_the_backoff_of_a_sink_that_is_down_when_work_came_in_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        // After its first failure the drain sleeps for a minute.
        cfg.retry_initial = Duration::from_secs(60);
        cfg.retry_max = Duration::from_secs(60);
        let sink = fake("s", false);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), sink.clone() as Arc<dyn Sink>)].into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let t: Vec<Arc<dyn Sink>> = vec![sink.clone()];
        assert_eq!(spool.submit(envelope(1), t.clone()).await, Ok(Accepted::New));
        let status = || spool.registry.all().iter().map(|q| q.status()).collect::<Vec<_>>();
        wait("the drain's backoff", || sink.calls.load(Ordering::Acquire) == 1 && status() == [queue::FAILING]).await;
        // New work while the drain sleeps (queued before submit answers).
        assert_eq!(spool.submit(envelope(2), t).await, Ok(Accepted::New));

        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        spool.shutdown(deadline).await;
        // Without the fix the stop came when the drains' share of the deadline ran out.
        assert!(
            tokio::time::Instant::now() < deadline - LAST_COMMIT,
            "the shutdown waited for the down sink's backoff until its deadline"
        );
        assert_eq!(sink.calls.load(Ordering::Acquire), 1, "no attempt before the backoff ended");
        drop(spool);
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        assert_eq!(spool.registry.queue("s").pending(), 2, "both events stay pending");
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn after_max_attempts_the_pair_goes_to_the_dead_letter_file_with_the_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_attempts = 3;
        let (bad, good) = (fake("bad", false), fake("good", true));
        let sinks: HashMap<String, Arc<dyn Sink>> =
            [("bad".to_string(), bad.clone() as Arc<dyn Sink>), ("good".to_string(), good.clone() as Arc<dyn Sink>)]
                .into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let env = envelope(1);
        let id = env.event.id.clone();
        assert_eq!(spool.submit(env, sinks.values().cloned().collect()).await, Ok(Accepted::New));
        wait("the dead letter", || spool.pending()["bad"] == 0).await;
        assert_eq!(bad.calls.load(Ordering::Acquire), 3);
        assert_eq!(*good.got.lock().unwrap(), vec![id.clone()]);
        let text = std::fs::read_to_string(&cfg.dead_letter_file).unwrap();
        let letter: dead::DeadLetter = serde_json::from_str(text.trim()).unwrap();
        assert_eq!((letter.sink.as_str(), letter.attempts), ("bad", 3));
        assert!(letter.reason.contains("down") && letter.reason.contains("3 attempts"), "{}", letter.reason);
        assert_eq!(letter.envelope().unwrap().event.id, id);
        wait("the event row to go", || spool.shared.used.load(Ordering::Acquire) == 0).await;
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_sink_gets_no_attempt_stays_paused_across_a_restart_and_delivers_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let sink = fake("s", true);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), sink.clone() as Arc<dyn Sink>)].into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        spool.set_paused("s", true).await.unwrap();
        let t: Vec<Arc<dyn Sink>> = vec![sink.clone()];
        for i in 0..3 {
            assert_eq!(spool.submit(envelope(i), t.clone()).await, Ok(Accepted::New));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(sink.calls.load(Ordering::Acquire), 0);
        let st = &spool.sink_states()["s"];
        assert!(st.paused && st.pending == 3 && st.oldest_pending.is_some(), "{st:?}");
        // A paused sink does not hold the shutdown.
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        drop(spool);

        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(sink.calls.load(Ordering::Acquire), 0, "still paused after the restart");
        assert!(spool.sink_states()["s"].paused);
        spool.set_paused("s", false).await.unwrap();
        wait("the backlog", || sink.got.lock().unwrap().len() == 3).await;
        wait("an empty spool", || spool.pending()["s"] == 0).await;
        assert_eq!(spool.sink_states()["s"], SinkState::default());
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        drop(spool);
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        assert!(!spool.sink_states()["s"].paused, "the resume was kept too");
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_online_replay_delivers_the_dead_letter_again_and_skips_what_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_attempts = 1;
        let bad = fake("bad", false);
        let sinks: HashMap<String, Arc<dyn Sink>> = [("bad".to_string(), bad.clone() as Arc<dyn Sink>)].into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        let env = envelope(1);
        let id = env.event.id.clone();
        assert_eq!(spool.submit(env, vec![bad.clone()]).await, Ok(Accepted::New));
        wait("the dead letter", || std::fs::read_to_string(&cfg.dead_letter_file).is_ok_and(|t| t.ends_with('\n')))
            .await;
        wait("no pending work", || spool.pending()["bad"] == 0).await;
        assert_eq!(spool.sink_states()["bad"].last_error.as_deref(), Some("down (gave up after 1 attempts)"));
        let lines: Vec<String> =
            std::fs::read_to_string(&cfg.dead_letter_file).unwrap().lines().map(str::to_owned).collect();
        let known: BTreeSet<String> = ["bad".to_string()].into();

        spool.set_paused("bad", true).await.unwrap();
        let mut with_junk = lines.clone();
        with_junk.push("not json".into());
        let first = spool.replay(with_junk, None, known.clone()).await.unwrap();
        assert_eq!(first.injected, [("bad".to_string(), 1)].into());
        assert_eq!((first.already_pending, first.skipped.len()), (0, 1), "{first:?}");
        assert_eq!(first.skipped[0].0, 2);
        let second = spool.replay(lines.clone(), None, known.clone()).await.unwrap();
        assert_eq!((second.injected.len(), second.already_pending), (0, 1), "{second:?}");
        assert_eq!(spool.pending()["bad"], 1);
        let unknown = spool.replay(lines, Some("nowhere".into()), known).await.unwrap();
        assert!(unknown.skipped[0].1.contains("not in routes.toml"), "{unknown:?}");

        bad.ok.store(true, Ordering::Release);
        spool.set_paused("bad", false).await.unwrap();
        wait("the replayed event", || bad.got.lock().unwrap().len() == 1).await;
        assert_eq!(*bad.got.lock().unwrap(), vec![id]);
        wait("no error once delivered", || spool.sink_states()["bad"].last_error.is_none()).await;
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }

    /// A webhook's send to the writer can be taken off the CPU in the middle (the writer it
    /// wakes may take its core): the other webhooks' and the drains' sends must not queue
    /// behind it (they did, behind a mutex around the writer's queue).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_to_the_writer_does_not_wait_for_another_send_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let spool = Spool::open(&cfg, &HashMap::new()).await.unwrap();
        let shared = spool.shared.clone();
        let (sent_tx, sent) = mpsc::channel();
        {
            // Another sender, in the middle of its send.
            let _sending = shared.writer.read().unwrap();
            let sh = shared.clone();
            std::thread::spawn(move || sent_tx.send(sh.send(Op::Synced)).unwrap());
            assert_eq!(sent.recv_timeout(Duration::from_secs(60)), Ok(true), "the second send went through meanwhile");
        }
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
        assert!(!shared.send(Op::Synced), "closed: nothing reaches the writer any more");
    }

    /// A sink that takes four events a round.
    struct Small(Arc<Fake>);

    impl Sink for Small {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn round(&self) -> Option<usize> {
            Some(4)
        }
        fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
            self.0.deliver(env)
        }
    }

    /// Every round's deliveries are reported to the writer at its end (`queue::HOLD_DONE` = 1:
    /// holding them over several rounds cost more than it saved, docs/performance.md "The
    /// memtable's bound and held reports, eighth round"); all of them are recorded, and nothing
    /// is delivered again after a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliveries_of_every_round_are_reported_at_its_end_and_all_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let inner = fake("s", true);
        inner.hold.store(true, Ordering::Release);
        let sink: Arc<dyn Sink> = Arc::new(Small(inner.clone()));
        let sinks: HashMap<String, Arc<dyn Sink>> = [("s".to_string(), sink.clone())].into();
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        // Within the memory window: the rounds are taken from memory, one after the other.
        let n = queue::WINDOW - 2;
        for i in 0..n {
            assert_eq!(spool.submit(envelope(i), vec![sink.clone()]).await, Ok(Accepted::New));
        }
        wait("the first round in flight", || inner.calls.load(Ordering::Acquire) > 0).await;
        inner.hold.store(false, Ordering::Release);
        wait("every delivery", || inner.got.lock().unwrap().len() == n).await;
        // Pending pairs as the writer records them (the memtable's and redb's).
        wait("every delivery recorded", || memtable::pending_ids(&spool.shared, "s").unwrap().is_empty()).await;
        let reports = spool.shared.done_reports.load(Ordering::Acquire);
        // At least 8 rounds of at most 4, each reported at its end.
        assert!(reports as usize >= n.div_ceil(4), "{reports} reports for {n} deliveries in rounds of 4");
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(2)).await;
        drop(spool);
        let spool = Spool::open(&cfg, &sinks).await.unwrap();
        assert_eq!(spool.pending()["s"], 0, "every delivery was recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(inner.got.lock().unwrap().len(), n, "nothing delivered again");
        spool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }
}
