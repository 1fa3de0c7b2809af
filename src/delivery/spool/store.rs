//! The spool's on-disk layout, on redb (one file, `spool.redb` under `delivery.spool_dir`).
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `meta` | name | u64 (`format` = [`FORMAT`]) |
//! | `events` | seq (u64, assigned by the writer) | a [`record`](super::record) (event JSON + raw body, checked when read) |
//! | `pending` | (sink name, seq) | attempts made so far (u32) |
//! | `dedup_batches` | (accepted at, unix ms; seq of the batch's first event) | the id keys of the events of one commit (u128 LE each) |
//! | `dedup` | (accepted at, unix ms; event id key) | () (written by builds before `dedup_batches`; still read and pruned) |
//! | `probe` | 0 | a few KiB rewritten to prove that a commit can allocate space again |
//! | `paused` | sink name | paused since, unix ms (`webio-router pause`; a row per paused sink) |
//!
//! An event row lives as long as at least one `pending` row names its seq. Everything that
//! changes these tables goes through one write transaction at a time (the writer thread, or
//! `replay`/`salvage` while the daemon is stopped); readers use snapshots.
//!
//! Beside the file, [`MARKER`] (`spool.id`) records that a spool was created here: a spool
//! file that is then missing or empty is refused instead of silently starting empty.
//!
//! Every call into redb that reads the file runs under [`guard::catch`]: a damaged file is an
//! error naming it and the way out, never a panic.

use super::guard::{self, Panicked};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use super::record::{decode, encode};

pub const FILE_NAME: &str = "spool.redb";
/// Written beside [`FILE_NAME`] when a spool is created there.
pub const MARKER: &str = "spool.id";
/// Version of the layout above; a spool written by a newer layout is refused, not guessed at.
pub const FORMAT: u64 = 1;

pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
pub const PENDING: TableDefinition<(&str, u64), u32> = TableDefinition::new("pending");
/// Dedup ids one row per event: written by builds before [`DEDUP_BATCHES`], still read (and
/// pruned) so that an upgrade keeps the window.
pub const DEDUP: TableDefinition<(u64, u128), ()> = TableDefinition::new("dedup");
/// Added in place to format 1: the dedup ids of one commit in one row (16 bytes an event
/// instead of ~45 with a row each). An older build ignores it (and does not recognise those
/// events as duplicates: at least once still holds).
pub const DEDUP_BATCHES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("dedup_batches");
pub const PROBE: TableDefinition<u8, &[u8]> = TableDefinition::new("probe");
/// Added in place to format 1: an older build ignores it (and does not honour the pause).
pub const PAUSED: TableDefinition<&str, u64> = TableDefinition::new("paused");

/// Size of the [`probe`] value: enough to need pages of its own.
const PROBE_BYTES: usize = 16 << 10;
/// redb page cache size (read cache and write buffer together; the write buffer takes at most
/// half). The writer touches only the ends of its tables; 4 MiB holds those with room to
/// spare (docs/performance.md "Memory").
const CACHE_BYTES: usize = 4 << 20;

/// A failure of the redb file underneath, typed so that a log line shows the whole chain
/// (what failed → redb → I/O → e.g. ENOSPC).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op}: I/O error: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: the file is corrupted: {detail}")]
    Corrupted { op: &'static str, detail: String },
    #[error("{op}: {source}")]
    Redb {
        op: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error(transparent)]
    Panicked(#[from] Panicked),
    #[error("the spool file is being reopened after a write error")]
    Reopening,
    #[error("no space left on the spool's filesystem ({free} bytes free)")]
    NoSpace { free: u64 },
    #[error("write-ahead file {op}: I/O error: {source}")]
    Wal {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    pub fn at(op: &'static str) -> impl Fn(redb::Error) -> StoreError {
        move |e| match e {
            redb::Error::Io(source) => StoreError::Io { op, source },
            redb::Error::Corrupted(detail) => StoreError::Corrupted { op, detail },
            source => StoreError::Redb { op, source: Box::new(source) },
        }
    }

    /// Damage in the file (as opposed to the disk or the system refusing an operation).
    pub fn is_damage(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => {
                matches!(source.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof)
            }
            StoreError::Corrupted { .. } | StoreError::Panicked(_) => true,
            StoreError::Redb { source, .. } => matches!(**source, redb::Error::UpgradeRequired(_)),
            StoreError::Reopening | StoreError::NoSpace { .. } | StoreError::Wal { .. } => false,
        }
    }
}

/// `result.op("commit")?`: a redb result with what was being done.
pub trait Op<T> {
    fn op(self, op: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> Op<T> for Result<T, E> {
    fn op(self, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::at(op)(e.into()))
    }
}

/// Why the spool cannot be opened. Each message names the file and the way out.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {}: in use by another process (is webio-router already running with this spool_dir?)", .path.display())]
    InUse { path: PathBuf },
    #[error("spool {}: cannot create its directory: {source}", .path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool {}: damaged: {source}. The file was left untouched: run `webio-router spool check` to see what is readable, then `webio-router spool salvage` (daemon stopped) to move it aside and keep every readable record", .path.display())]
    Damaged {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("spool {}: {what}, but {} says a spool was created here ({created}): its pending deliveries would be lost. Restore the file, or run `webio-router spool salvage` to accept the loss and start a fresh spool", .path.display(), .marker.display())]
    Lost { path: PathBuf, what: &'static str, marker: PathBuf, created: String },
    #[error("spool {}: written by a newer webio-router (format {found}, this build reads {FORMAT})", .path.display())]
    NewerFormat { path: PathBuf, found: u64 },
    #[error("spool {}: {source}; check the disk, its free space and the file's permissions, then run `webio-router spool check`", .path.display())]
    Storage {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("spool {}: {what}: {source}", .path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl SpoolError {
    /// A failure while reading or writing an opened spool: damage, or the disk.
    pub fn from_store(path: &Path, source: StoreError) -> SpoolError {
        if source.is_damage() {
            SpoolError::Damaged { path: path.to_owned(), source }
        } else {
            SpoolError::Storage { path: path.to_owned(), source }
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            SpoolError::InUse { path }
            | SpoolError::Dir { path, .. }
            | SpoolError::Damaged { path, .. }
            | SpoolError::Lost { path, .. }
            | SpoolError::NewerFormat { path, .. }
            | SpoolError::Storage { path, .. }
            | SpoolError::Io { path, .. } => path,
        }
    }
}

/// Opens the redb file (creating it when missing or empty), under the panic guard.
pub fn open_file(path: &Path) -> Result<Database, StoreError> {
    // redb caches up to 1 GiB of pages by default; the spool's working set is the recent
    // backlog, so a small cache keeps a sidecar's memory flat (see docs/performance.md).
    guard::catch(|| Database::builder().set_cache_size(CACHE_BYTES).create(path))?.op("open")
}

/// Opens the redb file again after a failure; a file that vanished meanwhile is an error,
/// not a new empty spool.
pub fn reopen_file(path: &Path) -> Result<Database, StoreError> {
    guard::catch(|| Database::builder().set_cache_size(CACHE_BYTES).open(path))?.op("reopen")
}

/// Opens the spool under `dir`: refuses a missing or emptied file where [`MARKER`] says a
/// spool existed, creates a new one otherwise, and takes redb's exclusive lock on it; then
/// replays the write-ahead file ([`super::wal`]) into it and empties that file.
pub fn open_db(dir: &Path) -> Result<(Database, PathBuf), SpoolError> {
    let (db, path) = open_db_unreplayed(dir)?;
    super::wal::recover(&db, dir).map_err(|e| SpoolError::from_store(&path, e))?;
    Ok((db, path))
}

/// [`open_db`] without touching the write-ahead file (`spool check` reads it apart).
pub fn open_db_unreplayed(dir: &Path) -> Result<(Database, PathBuf), SpoolError> {
    std::fs::create_dir_all(dir).map_err(|source| SpoolError::Dir { path: dir.to_owned(), source })?;
    let path = dir.join(FILE_NAME);
    let marker = dir.join(MARKER);
    let size = match std::fs::metadata(&path) {
        Ok(m) => Some(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(SpoolError::Io { path, what: "cannot read its metadata", source }),
    };
    if matches!(size, None | Some(0)) {
        if let Some(created) = read_marker(&marker) {
            let what = if size.is_none() { "the file is missing" } else { "the file is empty (0 bytes)" };
            return Err(SpoolError::Lost { path, what, marker, created });
        }
    }
    let db = init(&path)?;
    if !marker.exists() {
        write_marker(dir).map_err(|source| SpoolError::Io {
            path: path.clone(),
            what: "cannot write spool.id",
            source,
        })?;
    }
    Ok((db, path))
}

/// Starts a new, empty spool in `dir` where none is (`salvage`, after moving the old file
/// aside); the marker is (re)written.
pub fn create_fresh(dir: &Path) -> Result<(Database, PathBuf), SpoolError> {
    std::fs::create_dir_all(dir).map_err(|source| SpoolError::Dir { path: dir.to_owned(), source })?;
    let path = dir.join(FILE_NAME);
    let db = init(&path)?;
    write_marker(dir).map_err(|source| SpoolError::Io { path: path.clone(), what: "cannot write spool.id", source })?;
    Ok((db, path))
}

/// Opens the file and makes sure its tables exist and its format is one this build reads.
fn init(path: &Path) -> Result<Database, SpoolError> {
    let db = match open_file(path) {
        Ok(db) => db,
        Err(StoreError::Redb { source, .. }) if matches!(*source, redb::Error::DatabaseAlreadyOpen) => {
            return Err(SpoolError::InUse { path: path.to_owned() })
        }
        Err(e) => return Err(SpoolError::from_store(path, e)),
    };
    let found = guard::catch(|| -> Result<Option<u64>, StoreError> {
        let tx = db.begin_write().op("begin")?;
        let found;
        {
            let mut meta = tx.open_table(META).op("open meta")?;
            found = meta.get("format").op("read meta")?.map(|v| v.value());
            if found.is_none() {
                meta.insert("format", FORMAT).op("write meta")?;
            }
            tx.open_table(EVENTS).op("open events")?;
            tx.open_table(PENDING).op("open pending")?;
            tx.open_table(DEDUP).op("open dedup")?;
            tx.open_table(DEDUP_BATCHES).op("open dedup")?;
            tx.open_table(PAUSED).op("open paused")?;
        }
        if found.is_some_and(|f| f > FORMAT) {
            tx.abort().op("abort")?;
        } else {
            tx.commit().op("commit")?;
        }
        Ok(found)
    })
    .map_err(StoreError::from)
    .and_then(|r| r)
    .map_err(|e| SpoolError::from_store(path, e))?;
    match found {
        Some(f) if f > FORMAT => Err(SpoolError::NewerFormat { path: path.to_owned(), found: f }),
        _ => Ok(db),
    }
}

fn read_marker(marker: &Path) -> Option<String> {
    let text = std::fs::read_to_string(marker).ok()?;
    Some(
        text.lines()
            .find_map(|l| l.strip_prefix("created: "))
            .map_or_else(|| "date unknown".to_owned(), |d| format!("on {}", d.trim())),
    )
}

/// Writes [`MARKER`] durably (file and directory entry).
fn write_marker(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let text = format!(
        "webio-router spool\ncreated: {}\n\n\
         spool.redb in this directory holds deliveries not yet confirmed. While this file\n\
         exists, webio-router refuses to start when spool.redb is missing or empty (its\n\
         pending deliveries would be lost silently). `webio-router spool salvage` starts a\n\
         fresh spool once that loss is accepted.\n",
        crate::event::format_time(chrono::Utc::now())
    );
    let tmp = dir.join(format!("{MARKER}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(MARKER))?;
    std::fs::File::open(dir)?.sync_all()
}

/// What a start finds in the spool.
#[derive(Debug, Default)]
pub struct Recovered {
    pub next_seq: u64,
    /// (event, sink) pairs still to deliver, by sink.
    pub pending: BTreeMap<String, u64>,
    pub events: u64,
    pub bytes: u64,
    /// Dedup entries still inside the window: (accepted at, id key).
    pub dedup: Vec<(u64, u128)>,
    /// Event rows that are damaged (checked as they are read): kept in place, reported,
    /// dead-lettered as stored when their sink reaches them, never delivered.
    pub unreadable: Vec<(u64, String)>,
    /// Event rows no pending row refers to (left by an older bug or a manual edit).
    pub orphans: Vec<u64>,
    /// The pending pair with the lowest seq (the oldest work), if any.
    pub oldest: Option<(u64, String)>,
    /// Paused sinks (`webio-router pause`), with the time they were paused (unix ms).
    pub paused: BTreeMap<String, u64>,
}

/// Reads everything `spool check` reports from one snapshot, checking every event record.
pub fn recover(db: &Database, dedup_since: u64) -> Result<Recovered, StoreError> {
    guard::catch(|| recover_inner(db, dedup_since, usize::MAX, true))?
}

/// Reads what a start needs from one snapshot, without decoding the event records (their
/// lengths only): `unreadable` and `orphans` are left empty, for [`audit`] to fill in after
/// the start. Of the dedup ids inside the window, only the newest `dedup_max` are read (the
/// in-memory window keeps no more). This keeps a restart with a large backlog fast: the
/// check of a record (checksum, JSON, id hash) was most of the time it took.
pub fn recover_for_start(db: &Database, dedup_since: u64, dedup_max: usize) -> Result<Recovered, StoreError> {
    guard::catch(|| recover_inner(db, dedup_since, dedup_max, false))?
}

fn recover_inner(db: &Database, dedup_since: u64, dedup_max: usize, check: bool) -> Result<Recovered, StoreError> {
    let tx = db.begin_read().op("begin read")?;
    let mut r = Recovered::default();
    let pending = tx.open_table(PENDING).op("open pending")?;
    let mut referenced = std::collections::HashSet::new();
    for row in pending.iter().op("read pending")? {
        let (k, _) = row.op("read pending")?;
        let (sink, seq) = k.value();
        match r.pending.get_mut(sink) {
            Some(n) => *n += 1,
            None => {
                r.pending.insert(sink.to_owned(), 1);
            }
        }
        if check {
            referenced.insert(seq);
        }
        if r.oldest.as_ref().is_none_or(|(s, _)| seq < *s) {
            r.oldest = Some((seq, sink.to_owned()));
        }
    }
    let events = tx.open_table(EVENTS).op("open events")?;
    for row in events.iter().op("read events")? {
        let (k, v) = row.op("read events")?;
        let seq = k.value();
        let rec = v.value();
        r.events += 1;
        r.bytes += rec.len() as u64;
        r.next_seq = r.next_seq.max(seq + 1);
        if !check {
            continue;
        }
        if let Err(e) = decode(rec) {
            r.unreadable.push((seq, e.to_string()));
        } else if !referenced.contains(&seq) {
            r.orphans.push(seq);
        }
    }
    r.next_seq = r.next_seq.max(super::wal::checkpoint(&tx)?);
    r.dedup = dedup_ids(&tx, dedup_since, dedup_max)?;
    r.paused = paused_sinks(&tx)?;
    Ok(r)
}

/// The newest `max` dedup ids accepted at `since` or later, oldest first (the order the
/// in-memory window is filled in), from both dedup tables.
fn dedup_ids(tx: &redb::ReadTransaction, since: u64, max: usize) -> Result<Vec<(u64, u128)>, StoreError> {
    // Newest first from each table, then merged.
    let mut rows = Vec::new();
    let dedup = tx.open_table(DEDUP).op("open dedup")?;
    for row in dedup.range((since, 0u128)..).op("read dedup")?.rev().take(max) {
        rows.push(row.op("read dedup")?.0.value());
    }
    let mut batched = Vec::new();
    match tx.open_table(DEDUP_BATCHES) {
        Ok(batches) => {
            for row in batches.range((since, 0u64)..).op("read dedup")?.rev() {
                if batched.len() >= max {
                    break;
                }
                let (k, v) = row.op("read dedup")?;
                let at = k.value().0;
                // Newest first within the batch too.
                for key in v.value().chunks_exact(16).rev() {
                    let key = u128::from_le_bytes(key.try_into().unwrap_or_default());
                    batched.push((at, key));
                }
            }
        }
        // A spool created before the table: the ids are all in `dedup`.
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(StoreError::at("open dedup")(e.into())),
    }
    rows.extend(batched);
    // Newest first (stable: each table's own order is kept among equal times), then the
    // newest `max`, oldest first.
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    rows.truncate(max);
    rows.reverse();
    Ok(rows)
}

/// The dedup row of one commit: the id keys of its new events, in order.
pub fn dedup_batch(keys: &[u128]) -> Vec<u8> {
    keys.iter().flat_map(|k| k.to_le_bytes()).collect()
}

/// Removes the dedup ids accepted before `cutoff` (unix ms), from both tables.
pub fn prune_dedup(tx: &redb::WriteTransaction, cutoff: u64) -> Result<(), StoreError> {
    tx.open_table(DEDUP).op("open dedup")?.retain_in(..(cutoff, 0u128), |_, _| false).op("prune dedup")?;
    tx.open_table(DEDUP_BATCHES).op("open dedup")?.retain_in(..(cutoff, 0u64), |_, _| false).op("prune dedup")?;
    Ok(())
}

/// What [`audit`] found in one stretch of the event table.
#[derive(Debug, Default)]
pub struct Audit {
    /// Damaged records: (seq, why).
    pub unreadable: Vec<(u64, String)>,
    /// Records no pending row of `sinks` refers to.
    pub orphans: Vec<u64>,
    /// Where the next stretch begins; `None` when `seqs` is done.
    pub next: Option<u64>,
}

/// Checks at most `max` event records with a seq in `seqs` (each decoded: checksum, JSON, id
/// hash), and whether a pending row of one of `sinks` still refers to each. One short
/// snapshot per call, so that a check of a large backlog, run beside the daemon after its
/// start, neither holds old pages from reuse nor the file from the writer for long.
pub fn audit(db: &Database, seqs: std::ops::Range<u64>, max: usize, sinks: &[String]) -> Result<Audit, StoreError> {
    guard::catch(|| {
        let tx = db.begin_read().op("begin read")?;
        let events = tx.open_table(EVENTS).op("open events")?;
        let pending = tx.open_table(PENDING).op("open pending")?;
        let mut a = Audit::default();
        let end = seqs.end;
        for (i, row) in events.range(seqs).op("read events")?.enumerate() {
            let (k, v) = row.op("read events")?;
            let seq = k.value();
            if i == max {
                a.next = Some(seq);
                break;
            }
            if let Err(e) = decode(v.value()) {
                a.unreadable.push((seq, e.to_string()));
                continue;
            }
            let mut referenced = false;
            for sink in sinks {
                if pending.get((sink.as_str(), seq)).op("read pending")?.is_some() {
                    referenced = true;
                    break;
                }
            }
            if !referenced {
                a.orphans.push(seq);
            }
        }
        if a.next.is_some_and(|n| n >= end) {
            a.next = None;
        }
        Ok(a)
    })?
}

/// The `paused` table (a spool created before it existed has none: nothing paused).
fn paused_sinks(tx: &redb::ReadTransaction) -> Result<BTreeMap<String, u64>, StoreError> {
    let table = match tx.open_table(PAUSED) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
        Err(e) => return Err(StoreError::at("open paused")(e.into())),
    };
    let mut out = BTreeMap::new();
    for row in table.iter().op("read paused")? {
        let (k, v) = row.op("read paused")?;
        out.insert(k.value().to_owned(), v.value());
    }
    Ok(out)
}

/// The paused sinks, with the time each was paused (unix ms).
pub fn paused(db: &Database) -> Result<BTreeMap<String, u64>, StoreError> {
    guard::catch(|| {
        let tx = db.begin_read().op("begin read")?;
        paused_sinks(&tx)
    })?
}

/// Records `sink` as paused (since `at`, unix ms) or not, durably; with `checkpoint` (seq,
/// generation), the commit is also a checkpoint of the write-ahead file (every seq below it
/// is in redb, and the frames written so far are of an older generation).
pub fn set_paused(
    db: &Database,
    sink: &str,
    paused: bool,
    at: u64,
    checkpoint: Option<(u64, u64)>,
) -> Result<(), StoreError> {
    guard::catch(|| {
        let tx = db.begin_write().op("begin")?;
        if let Some((seq, generation)) = checkpoint {
            let mut meta = tx.open_table(META).op("open meta")?;
            meta.insert(super::wal::CHECKPOINT, seq).op("write meta")?;
            meta.insert(super::wal::GENERATION, generation).op("write meta")?;
        }
        {
            let mut t = tx.open_table(PAUSED).op("open paused")?;
            if paused {
                t.insert(sink, at).op("write paused")?;
            } else {
                t.remove(sink).op("write paused")?;
            }
        }
        tx.commit().op("commit")
    })?
}

/// The stored record of `sink`'s oldest pending event (lowest seq), if any.
pub fn oldest_pending(db: &Database, sink: &str) -> Result<Option<Vec<u8>>, StoreError> {
    guard::catch(|| oldest_pending_in(&db.begin_read().op("begin read")?, sink))?
}

/// [`oldest_pending`] in a read transaction of the caller's.
pub fn oldest_pending_in(tx: &redb::ReadTransaction, sink: &str) -> Result<Option<Vec<u8>>, StoreError> {
    {
        let pending = tx.open_table(PENDING).op("open pending")?;
        let first = pending.range((sink, 0u64)..=(sink, u64::MAX)).op("read pending")?.next();
        let Some(row) = first else { return Ok(None) };
        let seq = row.op("read pending")?.0.value().1;
        let events = tx.open_table(EVENTS).op("open events")?;
        let rec = events.get(seq).op("read events")?.map(|v| v.value().to_vec());
        Ok(rec)
    }
}

/// The event ids pending for `sink` (records that cannot be read are left out).
pub fn pending_ids(db: &Database, sink: &str) -> Result<std::collections::HashSet<String>, StoreError> {
    guard::catch(|| pending_ids_in(&db.begin_read().op("begin read")?, sink))?
}

/// [`pending_ids`] in a read transaction of the caller's.
pub fn pending_ids_in(tx: &redb::ReadTransaction, sink: &str) -> Result<std::collections::HashSet<String>, StoreError> {
    {
        let pending = tx.open_table(PENDING).op("open pending")?;
        let events = tx.open_table(EVENTS).op("open events")?;
        let mut out = std::collections::HashSet::new();
        for row in pending.range((sink, 0u64)..=(sink, u64::MAX)).op("read pending")? {
            let seq = row.op("read pending")?.0.value().1;
            if let Some(rec) = events.get(seq).op("read events")? {
                if let Some(id) = super::record::stored_id(rec.value()) {
                    out.insert(id);
                }
            }
        }
        Ok(out)
    }
}

/// The next free seq (for `replay`, and the writer after a reopen).
pub fn next_seq(db: &Database) -> Result<u64, StoreError> {
    guard::catch(|| {
        let tx = db.begin_read().op("begin read")?;
        let events = tx.open_table(EVENTS).op("open events")?;
        let last = events.last().op("read events")?;
        Ok(last.map_or(0, |(k, _)| k.value() + 1).max(super::wal::checkpoint(&tx)?))
    })?
}

/// Up to `limit` pending (seq, attempts) of `sink` with seq > `after`, in seq order.
pub fn load_pending(
    db: &Database,
    sink: &str,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<(u64, u32)>, StoreError> {
    guard::catch(|| load_pending_in(&db.begin_read().op("begin read")?, sink, after, limit))?
}

/// [`load_pending`] in a read transaction of the caller's.
pub fn load_pending_in(
    tx: &redb::ReadTransaction,
    sink: &str,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<(u64, u32)>, StoreError> {
    if after == Some(u64::MAX) {
        return Ok(Vec::new());
    }
    let pending = tx.open_table(PENDING).op("open pending")?;
    let start = after.map_or(0, |a| a + 1);
    let mut out = Vec::new();
    for row in pending.range((sink, start)..=(sink, u64::MAX)).op("read pending")? {
        let (k, v) = row.op("read pending")?;
        out.push((k.value().1, v.value()));
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// A seq and its stored record (`None` when the row is gone).
pub type Loaded = (u64, Option<Vec<u8>>);

/// The stored record of each seq of `must` (`None` when it is gone), then of `ahead` while
/// their total stays within `budget` bytes (those left out are simply absent).
pub fn load_events(db: &Database, must: &[u64], ahead: &[u64], budget: u64) -> Result<Vec<Loaded>, StoreError> {
    guard::catch(|| load_events_in(&db.begin_read().op("begin read")?, must, ahead, budget))?
}

/// [`load_events`] in a read transaction of the caller's.
pub fn load_events_in(
    tx: &redb::ReadTransaction,
    must: &[u64],
    ahead: &[u64],
    budget: u64,
) -> Result<Vec<Loaded>, StoreError> {
    {
        let events = tx.open_table(EVENTS).op("open events")?;
        let mut out = Vec::with_capacity(must.len() + ahead.len());
        for seq in must {
            out.push((*seq, events.get(*seq).op("read events")?.map(|v| v.value().to_vec())));
        }
        let mut used = 0u64;
        for seq in ahead {
            let Some(v) = events.get(*seq).op("read events")? else { continue };
            used += super::record::weight(v.value());
            if used > budget {
                break;
            }
            out.push((*seq, Some(v.value().to_vec())));
        }
        Ok(out)
    }
}

/// Total of pending rows (for tests and `replay`'s summary).
pub fn pending_len(db: &Database) -> Result<u64, StoreError> {
    guard::catch(|| {
        let tx = db.begin_read().op("begin read")?;
        let pending = tx.open_table(PENDING).op("open pending")?;
        pending.len().op("read pending")
    })?
}

/// Pending rows of `sinks` with seq ≥ `from`, by sink, and the bytes of event rows with
/// seq ≥ `from` (what a commit reported as failed may still have written).
pub fn written_since(
    db: &Database,
    from: u64,
    sinks: &BTreeSet<String>,
) -> Result<(BTreeMap<String, u64>, u64), StoreError> {
    guard::catch(|| {
        let tx = db.begin_read().op("begin read")?;
        let pending = tx.open_table(PENDING).op("open pending")?;
        let mut counts = BTreeMap::new();
        for sink in sinks {
            let n = pending.range((sink.as_str(), from)..=(sink.as_str(), u64::MAX)).op("read pending")?.count();
            if n > 0 {
                counts.insert(sink.clone(), n as u64);
            }
        }
        let events = tx.open_table(EVENTS).op("open events")?;
        let mut bytes = 0;
        for row in events.range(from..).op("read events")? {
            bytes += row.op("read events")?.1.value().len() as u64;
        }
        Ok((counts, bytes))
    })?
}

/// A durable commit that needs fresh pages: succeeds only once the disk takes writes again.
pub fn probe(db: &Database) -> Result<(), StoreError> {
    guard::catch(|| {
        let tx = db.begin_write().op("begin probe")?;
        {
            let mut t = tx.open_table(PROBE).op("open probe")?;
            let stamp = crate::dedup::now_millis().to_le_bytes();
            let value: Vec<u8> = stamp.iter().copied().cycle().take(PROBE_BYTES).collect();
            t.insert(0u8, value.as_slice()).op("write probe")?;
        }
        tx.commit().op("commit probe")
    })?
}

/// Alters one byte in the middle of the record of `seq`, as damage on disk would (tests).
#[cfg(test)]
pub(crate) fn damage_event(db: &Database, seq: u64) {
    let tx = db.begin_write().unwrap();
    {
        let mut events = tx.open_table(EVENTS).unwrap();
        let mut rec = events.get(seq).unwrap().unwrap().value().to_vec();
        let mid = rec.len() / 2;
        rec[mid] ^= 0x20;
        events.insert(seq, rec.as_slice()).unwrap();
    }
    tx.commit().unwrap();
}

/// Free bytes on the filesystem of `dir` (what this process may still write), if known.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    let blocks = if unsafe { libc::geteuid() } == 0 { st.f_bfree } else { st.f_bavail };
    Some(blocks as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Envelope;

    fn env(n: u32) -> Envelope {
        let body = format!(r#"{{"type":"payment","amount":{n}}}"#);
        let ev = crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
        Envelope::new(ev, body.into())
    }

    /// A spool holding `n` events pending for sink "s" (written as the daemon would).
    fn spool_with(dir: &Path, n: u32) -> PathBuf {
        let (db, path) = open_db(dir).unwrap();
        let recs: Vec<_> = (0..n).map(|i| (encode(&env(i)), vec!["s".to_owned()])).collect();
        super::super::writer::append_offline(&db, 0, &recs).unwrap();
        path
    }

    #[test]
    fn a_second_open_of_the_same_spool_is_refused_as_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open_db(dir.path()).unwrap();
        let err = open_db(dir.path()).unwrap_err();
        assert!(matches!(err, SpoolError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("spool.redb"));
    }

    #[test]
    fn a_file_that_is_not_a_spool_is_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), vec![0x5a; 8192]).unwrap();
        let err = open_db(dir.path()).unwrap_err();
        assert!(matches!(err, SpoolError::Damaged { .. }), "{err}");
        assert!(err.to_string().contains(FILE_NAME) && err.to_string().contains("spool salvage"), "{err}");
        assert_eq!(std::fs::read(dir.path().join(FILE_NAME)).unwrap().len(), 8192, "left untouched");
    }

    #[test]
    fn zeroed_pages_are_a_damaged_spool_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = spool_with(dir.path(), 300);
        let clean = std::fs::read(&path).unwrap();
        let mut refused = 0;
        // Every page that held data, zeroed in turn: an error or a clean open, never a panic.
        for page in (1..clean.len() / 4096).filter(|p| clean[p * 4096..(p + 1) * 4096].iter().any(|b| *b != 0)) {
            let mut bytes = clean.clone();
            bytes[page * 4096..(page + 1) * 4096].fill(0);
            std::fs::write(&path, &bytes).unwrap();
            let opened =
                open_db(dir.path()).and_then(|(db, p)| recover(&db, 0).map_err(|e| SpoolError::from_store(&p, e)));
            if let Err(e) = opened {
                assert!(matches!(e, SpoolError::Damaged { .. }), "page {page}: {e}");
                refused += 1;
            }
        }
        assert!(refused > 0);
    }

    #[test]
    fn a_missing_or_emptied_spool_is_refused_where_one_was_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = spool_with(dir.path(), 3);
        assert!(dir.path().join(MARKER).exists());
        std::fs::write(&path, b"").unwrap();
        let err = open_db(dir.path()).unwrap_err();
        assert!(matches!(err, SpoolError::Lost { .. }) && err.to_string().contains("empty"), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "not initialised");
        std::fs::remove_file(&path).unwrap();
        let err = open_db(dir.path()).unwrap_err();
        assert!(err.to_string().contains("missing") && err.to_string().contains("spool salvage"), "{err}");
        // Without the marker (a new directory, or a spool from before markers): a new spool.
        std::fs::remove_file(dir.path().join(MARKER)).unwrap();
        open_db(dir.path()).unwrap();
    }

    #[test]
    fn recovery_lists_damaged_records_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        spool_with(dir.path(), 3);
        let (db, _) = open_db(dir.path()).unwrap();
        damage_event(&db, 1);
        let r = recover(&db, 0).unwrap();
        assert_eq!((r.events, r.pending["s"]), (3, 3));
        assert_eq!(r.unreadable.len(), 1, "{:?}", r.unreadable);
        assert_eq!(r.oldest.map(|(seq, _)| seq), Some(0));
    }

    #[test]
    fn dedup_ids_of_both_tables_are_read_back_in_time_order_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = open_db(dir.path()).unwrap();
        let tx = db.begin_write().unwrap();
        {
            // A row per event (older builds) and a row per commit (this one).
            let mut old = tx.open_table(DEDUP).unwrap();
            for i in 0..5u64 {
                old.insert((1000 + 10 * i, u128::from(i)), ()).unwrap();
            }
            let mut batches = tx.open_table(DEDUP_BATCHES).unwrap();
            batches.insert((1005, 0u64), dedup_batch(&[u128::MAX, 101]).as_slice()).unwrap();
            batches.insert((1045, 2u64), dedup_batch(&[104, 102, 103]).as_slice()).unwrap();
        }
        tx.commit().unwrap();
        let all = recover(&db, 0).unwrap().dedup;
        let want = [(1000, 0), (1005, u128::MAX), (1005, 101), (1010, 1), (1020, 2), (1030, 3), (1040, 4)];
        let want: Vec<(u64, u128)> = want.into_iter().chain([(1045, 104), (1045, 102), (1045, 103)]).collect();
        assert_eq!(all, want);
        assert_eq!(recover_for_start(&db, 0, 4).unwrap().dedup, want[6..], "the newest four, oldest first");
        assert_eq!(recover_for_start(&db, 1010, 100).unwrap().dedup, want[3..], "inside the window only");
        let tx = db.begin_write().unwrap();
        prune_dedup(&tx, 1030).unwrap();
        tx.commit().unwrap();
        assert_eq!(recover(&db, 0).unwrap().dedup, want[5..]);
    }

    #[test]
    fn a_start_reads_the_same_counts_without_checking_and_the_audit_finds_what_the_check_finds() {
        let dir = tempfile::tempdir().unwrap();
        spool_with(dir.path(), 20);
        let (db, _) = open_db(dir.path()).unwrap();
        damage_event(&db, 13);
        // Event 4 is no longer pending for any sink: an orphan.
        let tx = db.begin_write().unwrap();
        tx.open_table(PENDING).unwrap().remove(("s", 4u64)).unwrap();
        {
            let mut dedup = tx.open_table(DEDUP).unwrap();
            for i in 0..20u64 {
                dedup.insert((1000 + i, u128::from(i)), ()).unwrap();
            }
        }
        tx.commit().unwrap();

        let full = recover(&db, 0).unwrap();
        let start = recover_for_start(&db, 0, 5).unwrap();
        assert_eq!(
            (start.events, start.bytes, start.next_seq, &start.pending, &start.oldest),
            (full.events, full.bytes, full.next_seq, &full.pending, &full.oldest)
        );
        assert!(start.unreadable.is_empty() && start.orphans.is_empty(), "left to the audit");
        assert_eq!(full.dedup.len(), 20);
        assert_eq!(start.dedup, full.dedup[15..], "the newest five, oldest first");

        let sinks = vec!["s".to_owned()];
        let (mut from, mut unreadable, mut orphans, mut calls) = (0, Vec::new(), Vec::new(), 0);
        loop {
            let a = audit(&db, from..start.next_seq, 3, &sinks).unwrap();
            calls += 1;
            unreadable.extend(a.unreadable.into_iter().map(|(seq, _)| seq));
            orphans.extend(a.orphans);
            match a.next {
                Some(n) => from = n,
                None => break,
            }
        }
        assert_eq!(calls, 7, "20 records, 3 per snapshot");
        assert_eq!(unreadable, full.unreadable.iter().map(|(seq, _)| *seq).collect::<Vec<_>>());
        assert_eq!(unreadable, vec![13]);
        assert_eq!(orphans, full.orphans);
        assert_eq!(orphans, vec![4]);
    }
}
