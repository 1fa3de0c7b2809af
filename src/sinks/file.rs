//! `file` sink: JSON Lines, one event a line. The path may be a template
//! (`var/{type}.jsonl`); each rendered value is one safe path component.
//!
//! A delivery is confirmed once its line is durable (`fdatasync`, shared by the lines of a
//! batch; a new file's and new directories' entries fsynced too), unless `fsync = false`,
//! which confirms once the line is with the OS (the last moments may be lost on a host
//! crash). A failed write never leaves part of a line behind (see [`crate::jsonl`]).

use super::{check_template, BoxFuture, ErrorKind, OptionError, Sink, SinkError};
use crate::event::Envelope;
use crate::format::Format;
use crate::jsonl::open_append;
use crate::template::{Escape, Template};
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Poll, Waker};

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub path: String,
    #[serde(default)]
    pub format: Format,
    /// Confirm a line only once it is on disk (one `fdatasync` per batch of lines per file).
    /// `false`: once it is with the OS, which survives a crash of the process but not of the
    /// host (the last moments may be lost).
    #[serde(default = "yes")]
    pub fsync: bool,
    /// `"conversation"`: a conversation's events reach this sink in acceptance order.
    #[serde(default)]
    pub ordering: crate::sinks::SinkOrdering,
}

impl FileConfig {
    pub fn validate(&self) -> Vec<OptionError> {
        let mut errs = Vec::new();
        if self.path.trim().is_empty() {
            errs.push(("path".into(), "must not be empty".into()));
        }
        check_template(&mut errs, "path", &self.path, Escape::PathSegment);
        errs
    }
}

const MAX_OPEN_FILES: usize = 64;
/// The spool's round for a file sink without `concurrency`: a round is one group (one `write`
/// and one `fdatasync` per file), so a backlog drains in fewer, larger syncs (16 lines a sync
/// drained ~10k events/s on the reference machine, 256 ~60k/s; docs/performance.md).
pub const ROUND: usize = 256;
/// A group's buffer at most this large is kept for a later group (cleared), not freed.
const KEEP_BUFFER: usize = 1 << 20;

/// Writes go to one thread per sink that owns the files: no async worker ever blocks on the
/// disk (a stalled disk stalls this sink, not `/healthz`), and no delivery waits on another's
/// lock. Deliveries append their line to the *open group* (one buffer per file, lines in
/// arrival order); the writer takes the whole group at once, writes each file's buffer with
/// one `write` and one `fdatasync` (group commit), and only then confirms every delivery of
/// the group with that file's result: all of them, or none. Lines that arrive meanwhile form
/// the next group. With `fsync = true` the `fdatasync`s run on sync threads, up to
/// `SYNCS_IN_FLIGHT` (2) groups at once, so the writer writes the next group while the earlier
/// ones sync; groups are still confirmed in order.
pub struct FileSink {
    name: String,
    path: Template,
    /// The rendered path, once, when the template has no field.
    constant: Option<OnceLock<Arc<Path>>>,
    format: Format,
    queue: Arc<Queue>,
    ordering: crate::sinks::SinkOrdering,
    /// With `fsync = false`: a delivery that finds the writer waiting wakes it only once its
    /// tokio worker has run its other ready tasks (see [`FileSink::deliver`]).
    defer_wake: bool,
}

/// What the deliveries and the writer thread share. The lock is held only to add a line or to
/// take the open group, never across I/O.
struct Queue {
    pending: Mutex<Pending>,
    /// The writer waits here while there is nothing to write.
    work: Condvar,
    /// Groups written (see [`FileSink::groups_written`]).
    groups: std::sync::atomic::AtomicU64,
    /// Groups written and being synced (`fsync = true`).
    flight: Mutex<Flight>,
    /// Signalled whenever a sync of a group in flight ends.
    synced: Condvar,
    /// A sync failed: the writer settles it before it writes anything more.
    failing: std::sync::atomic::AtomicBool,
    /// With `fsync = true`: half the lines of the youngest group in flight (0: none). While a
    /// group syncs, the open group gathers up to that many lines before it is written (see
    /// [`gathered`]). Changed under the `flight` lock, read under the `pending` one.
    gather_to: std::sync::atomic::AtomicUsize,
    /// Tests: make every `fdatasync` fail (EIO).
    #[cfg(test)]
    fail_sync: std::sync::atomic::AtomicBool,
    /// Tests: while `true`, the sync threads wait before each `fdatasync`.
    #[cfg(test)]
    hold_syncs: (Mutex<bool>, Condvar),
}

struct Pending {
    open: Group,
    /// The writer is waiting on `work` (and no delivery has woken it since, or taken on to).
    writer_idle: bool,
    /// A delivery found the writer waiting and will wake it once its tokio worker has run
    /// the other ready tasks ([`FileSink::deliver`]): the lines those add join the group.
    wake_owed: bool,
    /// While the writer waits: the open group's lines that make it worth waking (1, or more
    /// while a group syncs, see [`gathered`]).
    wake_at: usize,
    /// The sink was dropped: the writer ends once the open group is written.
    closed: bool,
    /// The writer has stopped (it panicked): deliveries fail at once.
    stopped: bool,
    /// Cleared buffers of written groups, for the next groups.
    spare: Vec<Vec<u8>>,
}

impl Pending {
    fn lock(queue: &Queue) -> MutexGuard<'_, Pending> {
        // Nothing here can be left half-updated by a panic: take the state as it is.
        queue.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The lines a write will take together: one buffer per file.
#[derive(Default)]
struct Group {
    files: Vec<(Arc<Path>, Vec<u8>)>,
    /// Lines in `files`, all files together.
    lines: usize,
    done: Arc<Done>,
}

/// A group's outcome, one result per file of the group, and the deliveries waiting for it.
#[derive(Default)]
struct Done(Mutex<Outcome>);

#[derive(Default)]
struct Outcome {
    results: Option<Vec<Result<(), SinkError>>>,
    waiting: Vec<Waker>,
}

impl Done {
    fn lock(&self) -> MutexGuard<'_, Outcome> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn finish(&self, results: Vec<Result<(), SinkError>>) {
        let waiting = {
            let mut o = self.lock();
            o.results = Some(results);
            std::mem::take(&mut o.waiting)
        };
        for w in waiting {
            w.wake();
        }
    }

    /// Resolves, once the writer is done with the group, with what `take` reads from the
    /// group's results (one per file of the group).
    async fn wait<R>(&self, take: impl Fn(&[Result<(), SinkError>]) -> R) -> R {
        let mut slot: Option<usize> = None;
        std::future::poll_fn(|cx| {
            let mut o = self.lock();
            if let Some(results) = &o.results {
                return Poll::Ready(take(results));
            }
            match slot {
                Some(i) if o.waiting[i].will_wake(cx.waker()) => {}
                Some(i) => o.waiting[i] = cx.waker().clone(),
                None => {
                    slot = Some(o.waiting.len());
                    o.waiting.push(cx.waker().clone());
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// File `file`'s result in a finished group.
fn result_of(results: &[Result<(), SinkError>], file: usize) -> Result<(), SinkError> {
    results.get(file).cloned().unwrap_or_else(|| Err(stopped()))
}

fn stopped() -> SinkError {
    SinkError::retryable("the file writer has stopped")
}

impl FileSink {
    pub fn new(name: &str, c: &FileConfig) -> Result<Self, SinkError> {
        Self::with_syncs(name, c, SYNCS_IN_FLIGHT)
    }

    /// [`FileSink::new`] with up to `syncs` groups syncing at once (with `fsync = true`; at
    /// least one).
    fn with_syncs(name: &str, c: &FileConfig, syncs: usize) -> Result<Self, SinkError> {
        let path = Template::parse(&c.path, Escape::PathSegment).map_err(|e| SinkError::permanent(e.to_string()))?;
        let constant = path.is_constant().then(OnceLock::new);
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending {
                open: Group::default(),
                writer_idle: false,
                wake_owed: false,
                wake_at: 1,
                closed: false,
                stopped: false,
                spare: Vec::new(),
            }),
            work: Condvar::new(),
            groups: Default::default(),
            flight: Default::default(),
            synced: Condvar::new(),
            failing: Default::default(),
            gather_to: Default::default(),
            #[cfg(test)]
            fail_sync: Default::default(),
            #[cfg(test)]
            hold_syncs: Default::default(),
        });
        let (writer, fsync) = (queue.clone(), c.fsync);
        let start_error = |e| SinkError::caused_by(ErrorKind::Permanent, "cannot start the writer thread", e);
        let mut lanes = Vec::new();
        for lane in 0..if fsync { syncs.max(1) } else { 0 } {
            let (tx, rx) = std::sync::mpsc::channel();
            let q = queue.clone();
            std::thread::Builder::new()
                .name(format!("file-sync-{lane}-{name}"))
                .spawn(move || sync_loop(&q, rx))
                .map_err(start_error)?;
            lanes.push(tx);
        }
        std::thread::Builder::new()
            .name(format!("file-sink-{name}"))
            .spawn(move || write_loop(&writer, fsync, lanes))
            .map_err(start_error)?;
        Ok(FileSink {
            name: name.to_owned(),
            path,
            constant,
            format: c.format,
            queue,
            ordering: c.ordering,
            defer_wake: !c.fsync,
        })
    }

    /// Makes every `fdatasync` of this sink fail (or succeed again).
    #[cfg(test)]
    pub(crate) fn fail_syncs(&self, fail: bool) {
        self.queue.fail_sync.store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    /// Makes the sync threads wait before each `fdatasync` (or go on again).
    #[cfg(test)]
    pub(crate) fn hold_syncs(&self, hold: bool) {
        let (held, changed) = &self.queue.hold_syncs;
        *held.lock().unwrap() = hold;
        changed.notify_all();
    }

    /// Appends the line for `env` and its newline to `buf`: the event's JSON as the envelope
    /// holds it (or the configured format; `encoded` is that encoding when made already).
    fn put_line(&self, env: &Envelope, encoded: Option<&[u8]>, buf: &mut Vec<u8>) {
        match (self.format, encoded) {
            (_, Some(bytes)) => buf.extend_from_slice(bytes),
            (Format::Raw, None) => {
                // The body as Webio sent it, byte for byte, unless it is pretty-printed: JSON
                // Lines needs one line. A JSON text can hold a raw line break only as
                // whitespace between tokens (inside strings it must be escaped), so turning
                // each into a space changes nothing else: same keys, same order, same numbers.
                let raw = &env.raw[..];
                if raw.iter().any(|b| matches!(b, b'\n' | b'\r')) {
                    buf.extend(raw.iter().map(|&b| if matches!(b, b'\n' | b'\r') { b' ' } else { b }));
                } else {
                    buf.extend_from_slice(raw);
                }
            }
            (_, None) => buf.extend_from_slice(env.json()),
        }
        buf.push(b'\n');
    }

    /// The file `env`'s line goes to.
    fn path_of(&self, env: &Envelope) -> Arc<Path> {
        let render = || Arc::from(Path::new(&self.path.render(&env.event)));
        match &self.constant {
            Some(once) => once.get_or_init(render).clone(),
            None => render(),
        }
    }

    /// Adds the line of `env` to the open group; returns the group's outcome, the line's file
    /// in it, and whether the caller owes the writer its wake (see [`FileSink::deliver`]).
    /// (Direct mode's path, once per request: no collection is built.)
    fn enqueue_one(&self, env: &Envelope) -> Result<(Arc<Done>, usize, bool), SinkError> {
        let (path, encoded) = self.prepare(env);
        let mut p = Pending::lock(&self.queue);
        if p.stopped {
            return Err(stopped());
        }
        let file = self.put(&mut p, path, env, encoded.as_deref());
        let done = p.open.done.clone();
        let mut owed = false;
        let mut now = false;
        if p.writer_idle && p.open.lines >= p.wake_at {
            p.writer_idle = false;
            if self.defer_wake {
                p.wake_owed = true;
                owed = true;
            } else {
                now = true;
            }
        } else if p.wake_owed && p.open.lines >= DEFER_UP_TO {
            // Enough lines for a group of their own: no need to wait for that worker.
            p.wake_owed = false;
            now = true;
        }
        drop(p);
        if now {
            self.queue.work.notify_one();
        }
        Ok((done, file, owed))
    }

    /// Adds the lines of `envs` to the open group, all under one lock (so that they are
    /// written together, with one `fdatasync` per file) and wakes the writer once; returns the
    /// group's outcome and each line's file in it.
    fn enqueue(&self, envs: &[&Envelope]) -> Result<(Arc<Done>, Vec<usize>), SinkError> {
        let lines: Vec<_> = envs.iter().map(|env| self.prepare(env)).collect();
        let mut p = Pending::lock(&self.queue);
        if p.stopped {
            return Err(stopped());
        }
        let files = envs
            .iter()
            .zip(lines)
            .map(|(env, (path, encoded))| self.put(&mut p, path, env, encoded.as_deref()))
            .collect();
        let done = p.open.done.clone();
        // A round is a group of its own: the writer is woken now (after the lock is released,
        // so that it does not wake only to wait for the lock).
        let wake = (p.writer_idle && p.open.lines >= p.wake_at) || p.wake_owed;
        if wake {
            p.writer_idle = false;
            p.wake_owed = false;
        }
        drop(p);
        if wake {
            self.queue.work.notify_one();
        }
        Ok((done, files))
    }

    /// What is done before the lock is taken: the line's path rendered and, for CloudEvents,
    /// the line serialised (the other formats are copies).
    fn prepare(&self, env: &Envelope) -> (Arc<Path>, Option<bytes::Bytes>) {
        (self.path_of(env), (self.format == Format::Cloudevents).then(|| self.format.encode(env)))
    }

    /// Appends a line to its file's buffer in the open group; returns that file's index.
    fn put(&self, p: &mut Pending, path: Arc<Path>, env: &Envelope, encoded: Option<&[u8]>) -> usize {
        let file = match p.open.files.iter().position(|(f, _)| Arc::ptr_eq(f, &path) || *f == path) {
            Some(i) => i,
            None => {
                let buf = p.spare.pop().unwrap_or_default();
                p.open.files.push((path, buf));
                p.open.files.len() - 1
            }
        };
        self.put_line(env, encoded, &mut p.open.files[file].1);
        p.open.lines += 1;
        file
    }

    /// Groups written so far (one `write` and, with `fsync`, one `fdatasync` per file of a
    /// group): tests and benchmarks count them.
    pub fn groups_written(&self) -> u64 {
        self.queue.groups.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Lines in the open group that make a delivery wake the writer even while another delivery
/// owes it its wake (see [`FileSink::deliver`]).
const DEFER_UP_TO: usize = 16;

/// A delivery's duty to wake the writer, paid when dropped (after the yield, or when the
/// delivery is dropped before) unless the writer was woken or took the group meanwhile.
struct OwedWake<'a>(&'a Queue);

impl Drop for OwedWake<'_> {
    fn drop(&mut self) {
        let owed = std::mem::take(&mut Pending::lock(self.0).wake_owed);
        if owed {
            self.0.work.notify_one();
        }
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        Pending::lock(&self.queue).closed = true;
        self.queue.work.notify_one();
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn ordering(&self) -> crate::sinks::SinkOrdering {
        self.ordering
    }

    fn round(&self) -> Option<usize> {
        Some(ROUND)
    }

    /// The line joins the open group. With `fsync = false`, a delivery that finds the writer
    /// waiting does not wake it at once: it yields first, and wakes it once its tokio worker
    /// has run its other ready tasks (tokio wakes a yielded task after those, and after
    /// polling for I/O; at the latest after 61 tasks), so that the lines those tasks add are
    /// written with it: one group, one wake-up of the writer and one `write` for all of them,
    /// rather than the first line alone (groups of ~12 lines instead of ~3 under load, the
    /// writer's CPU per event −60 %: docs/performance.md, "Direct mode and the file sink,
    /// seventh round"). Should the delivery be dropped meanwhile, the writer is woken then.
    /// Every other delivery only waits, unless the open group reaches [`DEFER_UP_TO`] lines:
    /// then it wakes the writer. With `fsync = true` the writer is woken at once (the groups
    /// gather while a sync is in flight instead, see [`gathered`]): deferring there made
    /// fewer `fdatasync`s but fewer requests a second in 3 of 3 alternating runs.
    fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let (done, file, owed) = self.enqueue_one(env)?;
            if owed {
                let wake = OwedWake(&self.queue);
                tokio::task::yield_now().await;
                drop(wake);
            }
            done.wait(|results| result_of(results, file)).await
        })
    }

    /// The whole round in one group: one `write` and one `fdatasync` per file, rather than a
    /// group taken by the writer after the round's first line or first few lines. Each line
    /// gets its file's result, as with [`Sink::deliver`]. (Nothing here logs per event, so no
    /// `delivery` span is entered.)
    fn deliver_many<'a>(&'a self, envs: &'a [&'a Envelope]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            if envs.is_empty() {
                // No line: no group to wait for.
                return Vec::new();
            }
            match self.enqueue(envs) {
                Ok((done, files)) => done.wait(|results| files.iter().map(|&f| result_of(results, f)).collect()).await,
                Err(e) => vec![Err(e); envs.len()],
            }
        })
    }
}

/// With `fsync = true`, groups whose `fdatasync` may run at the same time, each on its own
/// sync thread and its own open file description of the file. On this VM's ext4 disk
/// concurrent `fdatasync`s of one file finished several times as many syncs a second as
/// one after the other (docs/performance.md, "Direct mode and the file sink, fourth round: pipelined syncs"):
/// while group N syncs, the writer writes group N+1 and hands it to the next sync thread.
///
/// Two, not three: in alternating runs of the `direct-file` row on a loaded machine two
/// finished more requests a second than three in 10 pairs of 10 (fifth round, same document):
/// the syncs are as many per event either way, with one thread fewer competing for the CPU.
const SYNCS_IN_FLIGHT: usize = 2;

/// Groups written with `fsync = true` and not answered yet, oldest first. A group is answered
/// only once its own syncs have ended *and* every older group was answered: its lines were
/// written after theirs, so a failure of theirs (which cuts the file back to before them)
/// takes its lines too.
#[derive(Default)]
struct Flight {
    /// The sequence number of `slots[0]`.
    first: u64,
    slots: VecDeque<Slot>,
    /// Files whose sync failed, with the oldest group whose sync of it failed: every line of
    /// that file from that group on fails (and is cut back). While this is not empty no group
    /// is answered by the sync threads; the writer waits for every sync in flight, cuts the
    /// files back and answers them all ([`settle`]).
    failed: HashMap<Arc<Path>, u64>,
}

impl Flight {
    fn lock(queue: &Queue) -> MutexGuard<'_, Flight> {
        queue.flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the groups at the front that can be answered now.
    fn answerable(&mut self, queue: &Queue) -> Vec<Slot> {
        let mut ready = Vec::new();
        while self.failed.is_empty() && self.slots.front().is_some_and(|s| s.remaining == 0) {
            ready.extend(self.slots.pop_front());
            self.first += 1;
        }
        if !ready.is_empty() {
            self.gather_to(queue);
        }
        ready
    }

    /// Publishes half the youngest group in flight's lines as [`Queue::gather_to`].
    fn gather_to(&self, queue: &Queue) {
        let lines = self.slots.back().map_or(0, |s| s.lines / 2);
        queue.gather_to.store(lines, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Whether the writer takes the open group now. It needs a line; with `fsync = true`, while
/// a group syncs, the open group first gathers half as many lines as the youngest group in
/// flight holds, or until no group syncs any more (then it is taken as it is): each `fdatasync`
/// costs ~100-200 µs of CPU on the reference VM, and without this, when a sync slot freed,
/// the writer took whatever was open: half the groups were one line (docs/performance.md,
/// "Direct mode and the file sink, fifth round"). The wait is bounded by the sync in flight.
/// Half, not as many: in alternating runs half finished the most requests a second, gathering
/// as many made the fewest syncs but longer waits (sixth round, same document). A closing
/// sink or a failed sync does not wait.
fn gathered(queue: &Queue, p: &Pending, fsync: bool) -> bool {
    if p.open.files.is_empty() {
        return false;
    }
    p.closed
        || !fsync
        || queue.failing.load(std::sync::atomic::Ordering::SeqCst)
        || p.open.lines >= queue.gather_to.load(std::sync::atomic::Ordering::SeqCst)
}

/// The open group's lines that make [`gathered`] true (a delivery wakes the writer then).
fn wake_at(queue: &Queue, fsync: bool) -> usize {
    if fsync {
        queue.gather_to.load(std::sync::atomic::Ordering::SeqCst).max(1)
    } else {
        1
    }
}

/// A group in flight.
struct Slot {
    done: Arc<Done>,
    /// One per file of the group, once known.
    results: Vec<Option<Result<(), SinkError>>>,
    /// Per file of the group that was written and is being synced: the file and where the
    /// group's bytes start in it.
    spans: Vec<Option<Span>>,
    /// Syncs of this group not ended yet.
    remaining: usize,
    /// The group's lines.
    lines: usize,
}

impl Slot {
    fn answer(self) {
        self.done.finish(self.results.into_iter().map(|r| r.unwrap_or_else(|| Err(stopped()))).collect());
    }
}

/// A group's bytes in one file: the file (the writer's open file description) and how many.
#[derive(Clone)]
struct Span {
    path: Arc<Path>,
    file: Arc<File>,
    bytes: u64,
}

/// One `fdatasync` for a sync thread: file `file` of group `seq`, on that thread's own open
/// file description of it.
struct SyncJob {
    seq: u64,
    file: usize,
    fd: Arc<File>,
    fail: bool,
}

/// The writer thread: runs until the sink is dropped and its last group is written (and, with
/// `fsync`, synced and answered).
fn write_loop(queue: &Queue, fsync: bool, lanes: Vec<std::sync::mpsc::Sender<SyncJob>>) {
    // Should this thread ever panic, no delivery waits for ever: the group being written,
    // the groups in flight and every later one fail (retryable), as when the writer had
    // stopped.
    struct Stop<'a>(&'a Queue, Option<Arc<Done>>);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                return;
            }
            let open = {
                let mut p = Pending::lock(self.0);
                p.stopped = true;
                std::mem::take(&mut p.open)
            };
            let slots = {
                let mut f = Flight::lock(self.0);
                f.first += f.slots.len() as u64;
                std::mem::take(&mut f.slots)
            };
            for done in self.1.take().into_iter().chain([open.done]).chain(slots.into_iter().map(|s| s.done)) {
                done.finish(Vec::new());
            }
        }
    }
    let mut stop = Stop(queue, None);
    let syncs = lanes.len();
    let mut files: HashMap<Arc<Path>, Open> = HashMap::new();
    let mut written: Vec<Vec<u8>> = Vec::new();
    let mut seq: u64 = 0;
    loop {
        if fsync {
            // Room for one more group in flight (a failed sync is settled first).
            let mut f = Flight::lock(queue);
            loop {
                if !f.failed.is_empty() {
                    f = settle(queue, f, &mut files);
                } else if f.slots.len() < syncs {
                    break;
                } else {
                    f = queue.synced.wait(f).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            }
        }
        // The next open group, made before the lock is taken.
        let fresh = Group::default();
        let group = {
            let mut p = Pending::lock(queue);
            // The buffers of the last group go back for the next ones.
            p.spare.append(&mut written);
            while !gathered(queue, &p, fsync) {
                if p.open.files.is_empty() && p.closed {
                    drop(p);
                    // Every group in flight is answered before the thread ends.
                    let mut f = Flight::lock(queue);
                    while !f.slots.is_empty() {
                        f = if f.failed.is_empty() {
                            queue.synced.wait(f).unwrap_or_else(std::sync::PoisonError::into_inner)
                        } else {
                            settle(queue, f, &mut files)
                        };
                    }
                    return;
                }
                if queue.failing.load(std::sync::atomic::Ordering::SeqCst) {
                    // A sync failed: settle it (above) without waiting for more lines.
                    break;
                }
                // A delivery that owes the writer its wake pays it; no other needs to.
                p.writer_idle = !p.wake_owed;
                p.wake_at = wake_at(queue, fsync);
                p = queue.work.wait(p).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            p.writer_idle = false;
            p.wake_owed = false;
            std::mem::replace(&mut p.open, fresh)
        };
        if group.files.is_empty() {
            continue;
        }
        stop.1 = Some(group.done.clone());
        #[cfg(test)]
        let fail_sync = queue.fail_sync.load(std::sync::atomic::Ordering::SeqCst);
        #[cfg(not(test))]
        let fail_sync = false;
        let lane = if fsync { (seq % syncs as u64) as usize } else { 0 };
        let mut results = Vec::with_capacity(group.files.len());
        let mut spans = Vec::with_capacity(group.files.len());
        let mut jobs = Vec::new();
        for (i, (path, bytes)) in group.files.iter().enumerate() {
            match write(&mut files, path, bytes, syncs, lane) {
                Ok(Some(w)) => {
                    jobs.push(SyncJob { seq, file: i, fd: w.sync, fail: fail_sync });
                    spans.push(Some(Span { path: path.clone(), file: w.file, bytes: w.bytes }));
                    results.push(None);
                }
                Ok(None) => {
                    spans.push(None);
                    results.push(Some(Ok(())));
                }
                Err(e) => {
                    spans.push(None);
                    results.push(Some(Err(e)));
                }
            }
        }
        queue.groups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if fsync {
            let ready = {
                let mut f = Flight::lock(queue);
                f.slots.push_back(Slot { done: group.done, results, spans, remaining: jobs.len(), lines: group.lines });
                f.gather_to(queue);
                f.answerable(queue)
            };
            seq += 1;
            for job in jobs {
                if let Err(std::sync::mpsc::SendError(job)) = lanes[lane].send(job) {
                    // The sync thread is gone (it cannot end on its own): fail the line.
                    complete(queue, job.seq, job.file, Err(stopped()));
                }
            }
            for slot in ready {
                slot.answer();
            }
        } else {
            group.done.finish(results.into_iter().map(|r| r.unwrap_or_else(|| Err(stopped()))).collect());
        }
        stop.1 = None;
        for (_, mut buf) in group.files {
            if buf.capacity() <= KEEP_BUFFER && written.len() < 4 {
                buf.clear();
                written.push(buf);
            }
        }
    }
}

/// A sync thread: `fdatasync`s the groups of its lane, one after the other, each on the
/// lane's own open file description of the file, so that every writeback error of the file
/// is reported to this lane's next sync (the kernel reports such an error once per open file
/// description: sharing one between concurrent syncs could let one of them miss it).
fn sync_loop(queue: &Queue, jobs: std::sync::mpsc::Receiver<SyncJob>) {
    while let Ok(job) = jobs.recv() {
        #[cfg(test)]
        {
            let (held, changed) = &queue.hold_syncs;
            let mut h = held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            while *h {
                h = changed.wait(h).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
        let r = if job.fail { Err(io::Error::from_raw_os_error(libc::EIO)) } else { job.fd.sync_data() };
        complete(queue, job.seq, job.file, r.map_err(|e| SinkError::caused_by(ErrorKind::Retryable, "fdatasync", e)));
    }
}

/// Records the end of a sync of file `file` of group `seq` and answers the groups that can be
/// answered now; a failure is left to the writer to settle.
fn complete(queue: &Queue, seq: u64, file: usize, r: Result<(), SinkError>) {
    let failed = r.is_err();
    let ready = {
        let mut f = Flight::lock(queue);
        let first = f.first;
        let Some(slot) = seq.checked_sub(first).and_then(|i| f.slots.get_mut(usize::try_from(i).ok()?)) else {
            // Answered already (the writer stopped).
            return;
        };
        let span = slot.spans.get(file).cloned().flatten();
        let r = r.map_err(|e| match &span {
            Some(span) => SinkError { message: format!("write {}: {}", span.path.display(), e.message), ..e },
            None => e,
        });
        if let Some(res) = slot.results.get_mut(file) {
            *res = Some(r);
        }
        slot.remaining = slot.remaining.saturating_sub(1);
        if let (true, Some(span)) = (failed, span) {
            let oldest = f.failed.entry(span.path).or_insert(seq);
            if seq < *oldest {
                *oldest = seq;
            }
            queue.failing.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        queue.synced.notify_all();
        f.answerable(queue)
    };
    let wake = if failed {
        // The writer may be waiting for lines: it settles the failure first.
        Pending::lock(queue).writer_idle = false;
        true
    } else if !ready.is_empty() {
        // Groups left the flight: the open group may have waited for them (see [`gathered`]).
        let mut p = Pending::lock(queue);
        p.writer_idle && {
            p.wake_at = wake_at(queue, true);
            let wake = p.open.lines >= p.wake_at;
            p.writer_idle = !wake;
            wake
        }
    } else {
        false
    };
    if wake {
        queue.work.notify_one();
    }
    for slot in ready {
        slot.answer();
    }
}

/// After a failed sync: waits until every sync in flight has ended, cuts each failed file back
/// to the start of its oldest failed group's bytes (so nothing unconfirmed stays in it), and
/// answers every group in flight, oldest first: a line of a failed file from that group on
/// fails, whatever its own sync said; every other line gets its own result. The failed files
/// are opened afresh for the next group.
///
/// The cut is counted back from the file's end as it is now ([`cut_back`]): the bytes of
/// those groups are the last ones in the file (nothing is written while this waits), even
/// if someone else cut the file meanwhile (`copytruncate`), when the offset a group started
/// at no longer means anything.
fn settle<'a>(
    queue: &'a Queue,
    mut f: MutexGuard<'a, Flight>,
    files: &mut HashMap<Arc<Path>, Open>,
) -> MutexGuard<'a, Flight> {
    while f.slots.iter().any(|s| s.remaining > 0) {
        f = queue.synced.wait(f).unwrap_or_else(std::sync::PoisonError::into_inner);
    }
    let failed = std::mem::take(&mut f.failed);
    let slots = std::mem::take(&mut f.slots);
    f.first += slots.len() as u64;
    f.gather_to(queue);
    queue.failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let first = f.first;
    drop(f);
    let seqs = first - slots.len() as u64..;
    let cut = |path: &Path, seq: u64| failed.get(path).is_some_and(|&oldest| seq >= oldest);
    // The bytes to cut, per open file description written through (a group written after
    // the file was opened afresh went through another one), oldest first.
    let mut cuts: Vec<(Arc<File>, u64)> = Vec::new();
    for (slot, seq) in slots.iter().zip(seqs.clone()) {
        for Span { path, file, bytes } in slot.spans.iter().flatten() {
            if cut(path, seq) {
                match cuts.iter_mut().find(|(f, _)| Arc::ptr_eq(f, file)) {
                    Some((_, n)) => *n += bytes,
                    None => cuts.push((file.clone(), *bytes)),
                }
            }
        }
    }
    for path in failed.keys() {
        files.remove(path);
    }
    for (file, bytes) in &cuts {
        // If even the cut fails, the next open finds no final newline and adds one.
        let _ = cut_back(file, *bytes, true);
    }
    for (mut slot, seq) in slots.into_iter().zip(seqs) {
        for (res, span) in slot.results.iter_mut().zip(&slot.spans) {
            let Some(Span { path, .. }) = span else { continue };
            if cut(path, seq) && !matches!(res, Some(Err(_))) {
                *res = Some(Err(SinkError::retryable(format!(
                    "write {}: the sync of lines written before these failed; cut back",
                    path.display()
                ))));
            }
        }
        slot.answer();
    }
    Flight::lock(queue)
}

/// With `fsync = false`, once this many bytes were appended to a file its write-back is
/// started (without waiting for it). Left to the kernel's own schedule, dirty pages pile up
/// to hundreds of MiB; an `fsync` of another file on the same ext4 filesystem (the spool's
/// commit, before every 202) may then have to wait for all of them to reach the disk. With
/// `fsync = true` every batch is synced anyway, so nothing piles up and no hint is needed.
const WRITEBACK_EVERY: u64 = 4 << 20;

struct Open {
    file: Arc<File>,
    /// With `fsync`: one more open file description of the file per sync lane, opened before
    /// anything is written through `file` (see [`sync_loop`]).
    lanes: Vec<Arc<File>>,
    /// A pipe or a terminal (`/dev/stdout`), which can be neither reserved, synced nor cut back.
    stream: bool,
    /// The file's length as this sink knows it: found by an `fstat` when the file was opened
    /// or last reserved ahead, plus what it appended since. No `fstat` per group: someone else
    /// may have cut the file meanwhile (`copytruncate`), so this may be too large; that costs
    /// only the blocks reserved ahead (see [`append`]), never the cut-back offset, which is
    /// counted back from the file's end ([`cut_back`]).
    len: u64,
    /// Blocks are reserved up to this offset (`FALLOC_FL_KEEP_SIZE`: past the file's end), as
    /// far as this sink knows (see [`crate::jsonl::Tail`]).
    reserved: u64,
    unflushed: u64,
}

/// A group's bytes written to a regular file, to be synced.
struct Written {
    file: Arc<File>,
    /// The lane's own open file description of the file.
    sync: Arc<File>,
    /// How many bytes of the group went to the file.
    bytes: u64,
}

/// Writes `bytes` to the file at `path` (opened when needed), without a sync; with `fsync`
/// (`syncs` sync lanes, 0 without) returns what the lane's sync needs (`None` for a stream,
/// which cannot be synced).
fn write(
    files: &mut HashMap<Arc<Path>, Open>,
    path: &Arc<Path>,
    bytes: &[u8],
    syncs: usize,
    lane: usize,
) -> Result<Option<Written>, SinkError> {
    let fsync = syncs > 0;
    if !files.contains_key(path) {
        if files.len() >= MAX_OPEN_FILES {
            // A templated path can name many files; keep the descriptor count bounded.
            files.clear();
        }
        let open = |path: &Path| -> io::Result<Open> {
            let file = open_append(path, fsync)?;
            let meta = file.metadata()?;
            let stream = !meta.is_file();
            let lanes = if fsync && !stream {
                (0..syncs).map(|_| reopen(&file, path).map(Arc::new)).collect::<io::Result<_>>()?
            } else {
                Vec::new()
            };
            Ok(Open { file: Arc::new(file), lanes, stream, len: meta.len(), reserved: 0, unflushed: 0 })
        };
        let o = open(path)
            .map_err(|e| SinkError::caused_by(open_error_kind(&e), format_args!("open {}", path.display()), e))?;
        files.insert(path.clone(), o);
    }
    let Some(f) = files.get_mut(path) else {
        return Err(stopped());
    };
    if let Err(e) = append(f, bytes) {
        // Open afresh next time (the file may have been rotated or the disk remounted).
        files.remove(path);
        // A full disk or an I/O error may pass; the write was rolled back, so the retry
        // appends whole lines.
        return Err(SinkError::caused_by(ErrorKind::Retryable, format_args!("write {}", path.display()), e));
    }
    if f.stream {
        return Ok(None);
    }
    if !fsync {
        f.unflushed += bytes.len() as u64;
        if f.unflushed >= WRITEBACK_EVERY {
            f.unflushed = 0;
            start_writeback(&f.file);
        }
        return Ok(None);
    }
    Ok(f.lanes.get(lane).map(|sync| Written { file: f.file.clone(), sync: sync.clone(), bytes: bytes.len() as u64 }))
}

/// Appends `bytes` to an open file as one piece: blocks first, reserved ahead of the file's
/// end (an eighth of its length, at most 1 MiB, as [`crate::jsonl::Tail`]: on a full disk the
/// append fails before a byte is written), then one `write`. The file's length is this sink's
/// own count ([`Open::len`]): an `fstat` only when blocks must be reserved (every eighth of
/// the file, at most every MiB), which also notices a file cut by someone else meanwhile,
/// and when a write fails. (It was one `statx` per group, ~3 lines, before:
/// docs/performance.md, "Direct mode and the file sink, seventh round".) Should the write
/// fail, what it wrote of `bytes` is cut off again ([`cut_back`]), so no partial line stays.
fn append(o: &mut Open, bytes: &[u8]) -> io::Result<()> {
    if o.stream {
        return (&*o.file).write_all(bytes);
    }
    let n = bytes.len() as u64;
    if o.len.saturating_add(n) > o.reserved {
        let len = o.file.metadata()?.len();
        if len < o.len {
            // Cut by someone else: the blocks past its end went with it.
            o.reserved = 0;
        }
        o.len = len;
        let end = len.saturating_add(n);
        if end > o.reserved {
            let more = (len / 8).min(crate::jsonl::RESERVE_AHEAD);
            match crate::jsonl::reserve(&o.file, len, n + more) {
                Ok(()) => o.reserved = end + more,
                // Not enough room to reserve ahead: what this write needs may still fit.
                Err(e) if more > 0 && e.raw_os_error() == Some(libc::ENOSPC) => {
                    crate::jsonl::reserve(&o.file, len, n)?;
                    o.reserved = end;
                }
                Err(e) => return Err(e),
            }
        }
    }
    let mut written = 0;
    while written < bytes.len() {
        match (&*o.file).write(&bytes[written..]) {
            Ok(0) => return Err(failed_append(o, written, io::ErrorKind::WriteZero.into())),
            Ok(k) => written += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed_append(o, written, e)),
        }
    }
    o.len = o.len.saturating_add(n);
    Ok(())
}

/// After a failed write that had written `written` bytes: cuts them off (the file is opened
/// afresh for the next group), returns the write's error.
fn failed_append(o: &mut Open, written: usize, e: io::Error) -> io::Error {
    o.reserved = 0;
    // If even the cut fails, the next open finds no final newline and adds one.
    let _ = cut_back(&o.file, written as u64, false);
    e
}

/// Cuts the last `bytes` bytes off `file`: what this sink appended and must take back (a
/// failed write's part, or the groups from a failed sync's on; then `sync`ed). Counted back
/// from the file's end as it is now, not from an offset remembered at write time: a file cut
/// by someone else meanwhile (`copytruncate`) is never extended with zeros, and its new
/// lines are not cut. The bytes past the end reserved ahead go with it.
fn cut_back(file: &File, bytes: u64, sync: bool) -> io::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let len = file.metadata()?.len();
    file.set_len(len.saturating_sub(bytes))?;
    if sync {
        file.sync_data()?;
    }
    Ok(())
}

/// Another open file description of `file` (not a `dup`, which shares one): on Linux through
/// `/proc/self/fd`, so it is the same file even if `path` was renamed meanwhile.
fn reopen(file: &File, path: &Path) -> io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        match opts.open(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
    }
    let _ = file;
    opts.open(path)
}

/// Errors that opening this path will give every time: the rendered name is too long or not
/// valid, or a part of the path is not a directory (or the file is one). Dead-lettered at
/// once. Everything else (a full disk, EIO, permissions an operator can fix) may pass.
fn open_error_kind(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENAMETOOLONG | libc::EINVAL | libc::ENOTDIR | libc::EISDIR | libc::ELOOP | libc::EILSEQ) => {
            ErrorKind::Permanent
        }
        _ => ErrorKind::Retryable,
    }
}

/// Asks the kernel to start writing the file's dirty pages out now; returns at once. Only a
/// hint: an error changes nothing about what was already written.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call only starts write-back of its pages.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(n: usize, pad: usize) -> Envelope {
        let body = format!(r#"{{"type":"payment","n":{n},"pad":"{}"}}"#, "x".repeat(pad));
        let event = crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
        Envelope::new(event, body.into())
    }

    fn config(toml_text: &str) -> FileConfig {
        toml::from_str(toml_text).unwrap()
    }

    /// `path`'s pages in the page cache that are not on disk yet (dirty or being written), as
    /// `cachestat(2)` counts them (Linux 6.5); `None` where that call does not exist.
    fn unwritten_pages(path: &Path) -> Option<u64> {
        use std::os::fd::AsRawFd;
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            cache: u64,
            dirty: u64,
            writeback: u64,
            evicted: u64,
            recently_evicted: u64,
        }
        const SYS_CACHESTAT: libc::c_long = 451;
        let f = File::open(path).unwrap();
        let (range, mut stat) = (Range { off: 0, len: 0 }, Stat::default());
        // SAFETY: a valid descriptor and pointers to structs laid out as the kernel's.
        let rc = unsafe { libc::syscall(SYS_CACHESTAT, f.as_raw_fd(), &range, &mut stat, 0) };
        if rc != 0 {
            assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::ENOSYS));
            return None;
        }
        assert!(stat.cache > 0, "the file was just written: some of it is cached");
        Some(stat.dirty + stat.writeback)
    }

    #[tokio::test]
    async fn by_default_a_confirmed_line_is_on_disk_not_only_in_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/dir/out.jsonl");
        let sink = FileSink::new("out", &config(&format!("path = {:?}", path.display().to_string()))).unwrap();
        // 2 MiB in lines of ~8 KiB, all confirmed.
        let envs: Vec<_> = (0..256).map(|i| envelope(i, 8000)).collect();
        let results = futures_util::future::join_all(envs.iter().map(|e| sink.deliver(e))).await;
        assert!(results.iter().all(Result::is_ok), "{:?}", results.iter().find(|r| r.is_err()));
        match unwritten_pages(&path) {
            Some(n) => assert_eq!(n, 0, "{n} pages were not on disk when their lines were confirmed"),
            None => eprintln!("cachestat(2) is not available on this kernel: not checked"),
        }
    }

    #[tokio::test]
    async fn a_name_the_filesystem_cannot_hold_is_a_permanent_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plain-file"), "").unwrap();
        let long = format!(r#"{{"type":"payment","conversationId":"{}"}}"#, "c".repeat(10_000));
        let event = crate::event::normalise(long.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
        let env = Envelope::new(event, long.into());
        for template in ["{conversationId}.jsonl", "{conversationId}/x.jsonl", "plain-file/{type}.jsonl"] {
            let path = dir.path().join(template).display().to_string();
            let sink = FileSink::new("out", &config(&format!("path = {path:?}"))).unwrap();
            let err = sink.deliver(&env).await.unwrap_err();
            assert!(err.is_permanent(), "{template}: {err}");
            assert!(err.io_error().is_some(), "{template}: the cause is kept: {err:?}");
        }
    }

    #[tokio::test]
    async fn every_line_is_whole_past_the_write_back_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, path) = unsynced_sink_in(&dir);
        // ~6 MiB in lines of ~8 KiB: write-back is started at least once on the way.
        let n = (WRITEBACK_EVERY as usize * 3 / 2) / 8192;
        let envs: Vec<_> = (0..n).map(|i| envelope(i, 8000)).collect();
        let results = futures_util::future::join_all(envs.iter().map(|e| sink.deliver(e))).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), n);
        let mut seen: Vec<i64> = lines
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["extra"]["n"].as_i64().unwrap())
            .collect();
        seen.sort();
        assert_eq!(seen, (0..n as i64).collect::<Vec<_>>());
        // The line is the envelope's own JSON, byte for byte.
        assert!(lines.iter().any(|l| l.as_bytes() == &envs[0].json()[..]));
    }

    #[tokio::test]
    async fn raw_lines_are_the_body_as_sent_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw.jsonl");
        let config = FileConfig {
            path: path.display().to_string(),
            format: Format::Raw,
            fsync: true,
            ordering: Default::default(),
        };
        let sink = FileSink::new("raw", &config).unwrap();
        let body = "{\n  \"type\": \"payment\",\n  \"amount\": 5\n}";
        let event = crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
        sink.deliver(&Envelope::new(event, body.into())).await.unwrap();
        // Kept as sent on one line: key order and number spelling untouched.
        let compact = r#"{"type":"payment","amount":1.10,"z":1e2,"a":"line\nbreak"}"#;
        let event = crate::event::normalise(compact.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
        sink.deliver(&Envelope::new(event, compact.into())).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines, ["{   \"type\": \"payment\",   \"amount\": 5 }", compact]);
        for l in lines {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
    }

    #[tokio::test]
    async fn a_failed_fdatasync_fails_every_line_of_its_group_and_leaves_none_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let sink = FileSink::new("out", &config(&format!("path = {:?}", path.display().to_string()))).unwrap();
        let first: Vec<_> = (0..3).map(|i| envelope(i, 10)).collect();
        for e in &first {
            sink.deliver(e).await.unwrap();
        }
        let before = std::fs::read(&path).unwrap();

        sink.fail_syncs(true);
        let envs: Vec<_> = (3..35).map(|i| envelope(i, 100)).collect();
        let results = futures_util::future::join_all(envs.iter().map(|e| sink.deliver(e))).await;
        for r in &results {
            let err = r.as_ref().expect_err("no line is confirmed when its sync failed");
            assert!(!err.is_permanent(), "{err}");
            assert!(err.message.contains("write"), "{err}");
        }
        assert_eq!(std::fs::read(&path).unwrap(), before, "the file is cut back: nothing half-written stays");

        sink.fail_syncs(false);
        let results = futures_util::future::join_all(envs.iter().map(|e| sink.deliver(e))).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 35);
        assert!(text.as_bytes().starts_with(&before));
        for l in text.lines() {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
    }

    #[tokio::test]
    async fn a_failed_fdatasync_fails_every_line_of_a_round_and_leaves_none_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let sink = FileSink::new("out", &config(&format!("path = {:?}", path.display().to_string()))).unwrap();
        sink.deliver(&envelope(0, 10)).await.unwrap();
        let before = std::fs::read(&path).unwrap();

        sink.fail_syncs(true);
        let envs: Vec<_> = (1..33).map(|i| envelope(i, 100)).collect();
        let refs: Vec<&Envelope> = envs.iter().collect();
        let groups = sink.groups_written();
        let results = sink.deliver_many(&refs).await;
        assert_eq!(sink.groups_written() - groups, 1, "the round is one group");
        assert_eq!(results.len(), 32);
        for r in &results {
            let err = r.as_ref().expect_err("no line is confirmed when its sync failed");
            assert!(!err.is_permanent() && err.message.contains("write"), "{err}");
        }
        assert_eq!(std::fs::read(&path).unwrap(), before, "the file is cut back: nothing half-written stays");

        sink.fail_syncs(false);
        let results = sink.deliver_many(&refs).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 33);
    }

    #[tokio::test]
    async fn a_round_after_the_writer_stopped_fails_every_line_instead_of_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let sink =
            FileSink::new("out", &config(&format!("path = {:?}", dir.path().join("o.jsonl").display().to_string())))
                .unwrap();
        Pending::lock(&sink.queue).stopped = true;
        let envs: Vec<_> = (0..3).map(|i| envelope(i, 1)).collect();
        let refs: Vec<&Envelope> = envs.iter().collect();
        let results = sink.deliver_many(&refs).await;
        assert_eq!(results.len(), 3);
        assert!(results.iter().all(|r| r.as_ref().is_err_and(|e| e.message.contains("stopped"))), "{results:?}");
        assert!(sink.deliver_many(&[]).await.is_empty());
        Pending::lock(&sink.queue).stopped = false;
        let empty = tokio::time::timeout(std::time::Duration::from_secs(5), sink.deliver_many(&[])).await;
        assert_eq!(empty.expect("an empty round does not wait for a group"), Vec::new());
    }

    #[tokio::test]
    async fn lines_for_several_files_in_one_group_go_each_to_its_own_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("{conversationId}.jsonl").display().to_string();
        let sink = FileSink::new("out", &config(&format!("path = {template:?}"))).unwrap();
        let envs: Vec<_> = (0..60)
            .map(|n| {
                let body = format!(r#"{{"type":"payment","conversationId":"c{}","n":{n}}}"#, n % 3);
                let event =
                    crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
                Envelope::new(event, body.into())
            })
            .collect();
        let results = futures_util::future::join_all(envs.iter().map(|e| sink.deliver(e))).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        for c in 0..3 {
            let text = std::fs::read_to_string(dir.path().join(format!("c{c}.jsonl"))).unwrap();
            let ns: Vec<i64> = text
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["extra"]["n"].as_i64().unwrap())
                .collect();
            assert_eq!(ns, (0..60).filter(|n| n % 3 == c).collect::<Vec<_>>(), "c{c}: arrival order");
        }
    }

    /// Waits (without a deadline of its own) until the sink has written `n` groups.
    /// A sink writing `out.jsonl` in `dir` with `syncs` groups in flight, and that file's path.
    fn sink_in(dir: &tempfile::TempDir, syncs: usize) -> (Arc<FileSink>, std::path::PathBuf) {
        let path = dir.path().join("out.jsonl");
        let c = config(&format!("path = {:?}", path.display().to_string()));
        (Arc::new(FileSink::with_syncs("out", &c, syncs).unwrap()), path)
    }

    /// A sink writing `out.jsonl` in `dir` with `fsync = false`.
    fn unsynced_sink_in(dir: &tempfile::TempDir) -> (FileSink, std::path::PathBuf) {
        let path = dir.path().join("out.jsonl");
        let c = config(&format!("path = {:?}\nfsync = false", path.display().to_string()));
        (FileSink::new("out", &c).unwrap(), path)
    }

    /// Delivers event `n` in a task of its own.
    fn spawn_deliver(sink: &Arc<FileSink>, n: usize) -> tokio::task::JoinHandle<Result<(), SinkError>> {
        let sink = sink.clone();
        tokio::spawn(async move { sink.deliver(&envelope(n, 10)).await })
    }

    /// Delivers events `ns` as one round in a task of its own.
    fn spawn_round(
        sink: &Arc<FileSink>,
        ns: std::ops::RangeInclusive<usize>,
    ) -> tokio::task::JoinHandle<Vec<Result<(), SinkError>>> {
        let sink = sink.clone();
        let envs: Vec<Envelope> = ns.map(|n| envelope(n, 10)).collect();
        tokio::spawn(async move { sink.deliver_many(&envs.iter().collect::<Vec<_>>()).await })
    }

    async fn groups_reach(sink: &FileSink, n: u64) {
        while sink.groups_written() < n {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn groups_are_written_while_earlier_ones_sync_and_a_failed_sync_fails_its_lines_and_the_later_ones_only() {
        let dir = tempfile::tempdir().unwrap();
        // Three groups in flight (the default is two: see the next test).
        let (sink, path) = sink_in(&dir, 3);
        let deliver = |n: usize| spawn_deliver(&sink, n);
        deliver(0).await.unwrap().unwrap();
        let confirmed = std::fs::read(&path).unwrap();

        sink.hold_syncs(true);
        let g = sink.groups_written();
        // Group 1 syncs fine, group 2's sync fails, group 3 (written after it) syncs fine.
        let one = deliver(1);
        tokio::time::timeout(std::time::Duration::from_secs(10), groups_reach(&sink, g + 1)).await.unwrap();
        sink.fail_syncs(true);
        let two = deliver(2);
        tokio::time::timeout(std::time::Duration::from_secs(10), groups_reach(&sink, g + 2)).await.unwrap();
        sink.fail_syncs(false);
        let three = deliver(3);
        // Written while the syncs before it are held: the writer does not wait for them.
        tokio::time::timeout(std::time::Duration::from_secs(10), groups_reach(&sink, g + 3)).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 4, "all three groups are written");
        tokio::task::yield_now().await;
        assert!(
            !one.is_finished() && !two.is_finished() && !three.is_finished(),
            "nothing is confirmed before its sync"
        );

        sink.hold_syncs(false);
        let (one, two, three) = (one.await.unwrap(), two.await.unwrap(), three.await.unwrap());
        one.expect("the group synced before the failed one is confirmed");
        let err = two.expect_err("its own sync failed");
        assert!(!err.is_permanent() && err.message.contains("fdatasync"), "{err}");
        let err = three.expect_err("written after the failed group: cut back with it");
        assert!(!err.is_permanent() && err.message.contains("write"), "{err}");
        let text = std::fs::read_to_string(&path).unwrap();
        let ns: Vec<i64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["extra"]["n"].as_i64().unwrap())
            .collect();
        assert_eq!(ns, [0, 1], "cut back to the failed group's start: the confirmed lines stay, no other");
        assert!(text.as_bytes().starts_with(&confirmed));

        // The retries land after the confirmed lines.
        for n in [2, 3] {
            deliver(n).await.unwrap().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
    }

    #[tokio::test]
    async fn with_the_default_syncs_in_flight_a_group_written_after_a_failed_one_is_cut_back_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, path) = sink_in(&dir, SYNCS_IN_FLIGHT);
        const _: () = assert!(SYNCS_IN_FLIGHT >= 2, "this test needs two groups in flight");
        let deliver = |n: usize| spawn_deliver(&sink, n);
        deliver(0).await.unwrap().unwrap();
        let confirmed = std::fs::read(&path).unwrap();

        sink.hold_syncs(true);
        let g = sink.groups_written();
        // Group 1's sync fails; group 2 is written while it is held and syncs fine.
        sink.fail_syncs(true);
        let one = deliver(1);
        tokio::time::timeout(std::time::Duration::from_secs(10), groups_reach(&sink, g + 1)).await.unwrap();
        sink.fail_syncs(false);
        let two = deliver(2);
        tokio::time::timeout(std::time::Duration::from_secs(10), groups_reach(&sink, g + 2)).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3, "both groups are written");
        tokio::task::yield_now().await;
        assert!(!one.is_finished() && !two.is_finished(), "nothing is confirmed before its sync");

        sink.hold_syncs(false);
        let err = one.await.unwrap().expect_err("its own sync failed");
        assert!(!err.is_permanent() && err.message.contains("fdatasync"), "{err}");
        let err = two.await.unwrap().expect_err("written after the failed group: cut back with it");
        assert!(!err.is_permanent() && err.message.contains("write"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), confirmed, "cut back to the failed group's start");

        for n in [1, 2] {
            deliver(n).await.unwrap().unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    #[tokio::test]
    async fn while_a_group_syncs_the_next_one_gathers_half_as_many_lines_before_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, path) = sink_in(&dir, SYNCS_IN_FLIGHT);
        let deliver = |n: usize| spawn_deliver(&sink, n);
        deliver(0).await.unwrap().unwrap();
        let g = sink.groups_written();

        sink.hold_syncs(true);
        // A group of eight lines in flight: the next one gathers four.
        let round = spawn_round(&sink, 1..=8);
        tokio::time::timeout(std::time::Duration::from_secs(10), groups_reach(&sink, g + 1)).await.unwrap();
        // One line, then (a moment later, so that a writer that takes whatever is open would
        // have taken it alone) three more: written together, as one group of four.
        let mut singles = vec![deliver(9)];
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        singles.extend((10..=12).map(deliver));
        tokio::time::timeout(std::time::Duration::from_secs(10), groups_reach(&sink, g + 2)).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 13, "both groups are written");

        sink.hold_syncs(false);
        assert!(round.await.unwrap().iter().all(Result::is_ok));
        for s in singles {
            s.await.unwrap().unwrap();
        }
        assert_eq!(sink.groups_written(), g + 2, "the four single lines took one group, one fdatasync");
    }

    #[tokio::test]
    async fn a_gathering_group_is_written_once_the_sync_in_flight_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, path) = sink_in(&dir, SYNCS_IN_FLIGHT);
        sink.hold_syncs(true);
        let round = spawn_round(&sink, 1..=4);
        tokio::time::timeout(std::time::Duration::from_secs(10), groups_reach(&sink, 1)).await.unwrap();
        // One line, fewer than half the group in flight: it waits for that group's sync, not
        // longer.
        let single = spawn_deliver(&sink, 5);
        tokio::task::yield_now().await;
        sink.hold_syncs(false);
        assert!(round.await.unwrap().iter().all(Result::is_ok));
        tokio::time::timeout(std::time::Duration::from_secs(10), single).await.unwrap().unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 5);
    }

    #[tokio::test]
    async fn lines_that_the_same_worker_delivers_before_it_idles_are_written_as_one_group() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, path) = unsynced_sink_in(&dir);
        let sink = Arc::new(sink);
        spawn_deliver(&sink, 0).await.unwrap().unwrap();
        while !Pending::lock(&sink.queue).writer_idle {
            tokio::task::yield_now().await;
        }
        let g = sink.groups_written();
        // The first delivery finds the writer waiting; the worker (this test's one thread)
        // then runs the other ready tasks, each busy for a while before it delivers, as a
        // worker with many requests is: a writer woken by the first line would take it alone.
        let mut tasks = vec![spawn_deliver(&sink, 1)];
        for n in 2..=4 {
            let sink = sink.clone();
            tasks.push(tokio::spawn(async move {
                std::thread::sleep(std::time::Duration::from_millis(20));
                sink.deliver(&envelope(n, 10)).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(sink.groups_written() - g, 1, "the four lines went in one group, one write");
        assert_eq!(ns_in(&path), [0, 1, 2, 3, 4]);
    }

    /// What logrotate's `copytruncate` does: copies the file aside, then cuts it to nothing
    /// under the writer's feet.
    fn copytruncate(path: &Path) {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".1");
        std::fs::copy(path, &aside).unwrap();
        std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(0).unwrap();
    }

    /// The `n`s of a file's lines, each line parsed whole (a NUL byte or a torn line fails).
    fn ns_in(path: &Path) -> Vec<i64> {
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("not a whole JSON line ({e}): {l:?}"));
                v["extra"]["n"].as_i64().unwrap()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_file_cut_by_copytruncate_between_groups_takes_the_next_lines_from_its_start_and_a_failed_sync_cuts_only_those(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (sink, path) = sink_in(&dir, SYNCS_IN_FLIGHT);
        let deliver = |n: usize| spawn_deliver(&sink, n);
        // Long enough that the blocks reserved ahead and the sink's own count of the length
        // are well past what the file holds once it is cut.
        for n in 0..40 {
            deliver(n).await.unwrap().unwrap();
        }
        copytruncate(&path);
        for n in 40..43 {
            deliver(n).await.unwrap().unwrap();
        }
        assert_eq!(ns_in(&path), [40, 41, 42], "appended from the start of the cut file, no gap");

        // A group whose sync fails is cut back to the file's end before it, not to where the
        // file ended before it was cut.
        sink.fail_syncs(true);
        let err = deliver(43).await.unwrap().expect_err("its sync failed");
        assert!(!err.is_permanent(), "{err}");
        sink.fail_syncs(false);
        assert_eq!(ns_in(&path), [40, 41, 42], "only the failed line is cut back");
        deliver(43).await.unwrap().unwrap();
        assert_eq!(ns_in(&path), [40, 41, 42, 43]);
    }

    #[tokio::test]
    async fn a_file_cut_by_copytruncate_while_a_failing_group_syncs_is_not_extended_with_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, path) = sink_in(&dir, SYNCS_IN_FLIGHT);
        let deliver = |n: usize| spawn_deliver(&sink, n);
        for n in 0..3 {
            deliver(n).await.unwrap().unwrap();
        }
        sink.hold_syncs(true);
        sink.fail_syncs(true);
        let g = sink.groups_written();
        let failing = deliver(3);
        tokio::time::timeout(std::time::Duration::from_secs(10), groups_reach(&sink, g + 1)).await.unwrap();
        sink.fail_syncs(false);
        // Cut under the writer's feet after the group was written, before its sync ends.
        copytruncate(&path);
        sink.hold_syncs(false);
        let err = failing.await.unwrap().expect_err("its sync failed");
        assert!(!err.is_permanent(), "{err}");
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.contains(&0), "the cut back made a hole of {} bytes: {bytes:?}", bytes.len());
        assert!(bytes.is_empty(), "the failed line was all the cut file held: {:?}", String::from_utf8_lossy(&bytes));
        deliver(3).await.unwrap().unwrap();
        assert_eq!(ns_in(&path), [3], "the retry starts the file");
    }

    #[tokio::test]
    async fn without_fsync_a_file_cut_by_copytruncate_takes_whole_lines_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, path) = unsynced_sink_in(&dir);
        for n in 0..40 {
            sink.deliver(&envelope(n, 1000)).await.unwrap();
        }
        copytruncate(&path);
        // Past the blocks reserved before the cut: the sink counts the file afresh then.
        for n in 40..60 {
            sink.deliver(&envelope(n, 1000)).await.unwrap();
        }
        assert_eq!(ns_in(&path), (40..60).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_delivery_after_the_writer_stopped_fails_instead_of_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let sink =
            FileSink::new("out", &config(&format!("path = {:?}", dir.path().join("o.jsonl").display().to_string())))
                .unwrap();
        Pending::lock(&sink.queue).stopped = true;
        let err = sink.deliver(&envelope(1, 1)).await.unwrap_err();
        assert!(!err.is_permanent() && err.message.contains("stopped"), "{err}");
    }
}
