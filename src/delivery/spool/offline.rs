//! `webio-router spool check` and `webio-router spool salvage`, run while the daemon is
//! stopped (redb's lock makes them fail with "in use" otherwise, rather than race it).
//!
//! - **check** opens the spool as a start would, reads every row and checks every event
//!   record: healthy or damaged, pending deliveries per sink, the oldest pending event, the
//!   size. Nothing is changed (beyond redb's own recovery of an interrupted commit).
//! - **salvage** moves the spool file aside (`spool.redb.damaged-<time>`, never deleted) and
//!   copies every readable pending record into a fresh spool, so that the next start
//!   delivers them. When redb can still read the file's index, each record keeps the sinks it
//!   was pending for. When it cannot (zeroed pages, a torn index), the file's bytes are
//!   scanned for intact records, which are queued for the sinks their routes match now: the
//!   index no longer says which were still pending, so some may be delivered a second time
//!   (at least once; sinks dedupe by event id). A record that fails its check is written to
//!   the dead-letter file as stored, so that nothing disappears without a trace. The
//!   write-ahead file's events newer than the old file's checkpoint are saved too, and (through
//!   the index) its bookkeeping since that checkpoint is applied as a start would: a delivery
//!   done or dead-lettered is not queued again, and every pair keeps its attempt count.

use super::dead::DeadLetter;
use super::guard;
use super::record;
use super::store::{self, Op as _, SpoolError, StoreError, EVENTS, PENDING};
use super::wal;
use super::writer::append_offline;
use crate::config::DeliveryConfig;
use crate::event::Event;
use redb::{ReadableDatabase, ReadableTable};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Records per transaction when filling the fresh spool.
const BATCH: usize = 512;

#[derive(Debug, Default)]
pub struct CheckReport {
    pub path: PathBuf,
    /// No spool file yet (and none expected): nothing pending.
    pub absent: bool,
    pub size: u64,
    pub events: u64,
    pub event_bytes: u64,
    pub pending: BTreeMap<String, u64>,
    /// The oldest pending work: (sink, event id, received at).
    pub oldest: Option<(String, String, String)>,
    pub dedup_ids: usize,
    /// Sinks paused by `webio-router pause` (they stay paused at the next start).
    pub paused: Vec<String>,
    /// Event records that fail their check: (seq, why).
    pub damaged: Vec<(u64, String)>,
    /// Events of the write-ahead file newer than the checkpoint (acknowledged, not yet in
    /// `spool.redb` durably: the next start writes them in).
    pub wal_events: u64,
    /// Bookkeeping of the write-ahead file's current frames (applied, not yet in redb
    /// durably): deliveries done or dead-lettered, attempt counts.
    pub wal_done: u64,
    pub wal_attempts: u64,
    /// Where the write-ahead file's log ends in a torn or damaged frame (dropped by the next
    /// start), and the intact frames before it.
    pub wal_torn: Option<u64>,
    pub wal_frames: usize,
}

impl CheckReport {
    pub fn healthy(&self) -> bool {
        self.damaged.is_empty()
    }
}

/// Checks the spool of `cfg`. An `Err` is a spool that cannot be opened (damaged, missing,
/// in use): its message says what to do.
pub fn check(cfg: &DeliveryConfig) -> Result<CheckReport, SpoolError> {
    let dir = &cfg.spool_dir;
    let path = dir.join(store::FILE_NAME);
    if !path.exists() && !dir.join(store::MARKER).exists() {
        return Ok(CheckReport { path, absent: true, ..Default::default() });
    }
    // The write-ahead file is read, not replayed: check writes nothing.
    let (db, path) = store::open_db_unreplayed(dir)?;
    let since = crate::dedup::now_millis().saturating_sub(cfg.dedup_window.as_millis() as u64);
    let rec = store::recover(&db, since).map_err(|e| SpoolError::from_store(&path, e))?;
    let log = wal::read(dir).map_err(|source| SpoolError::Io {
        path: dir.join(wal::FILE_NAME),
        what: "cannot read the write-ahead file",
        source,
    })?;
    let (checkpoint, generation) = guard::catch(|| -> Result<(u64, u64), StoreError> {
        let tx = db.begin_read().op("begin read")?;
        Ok((wal::checkpoint(&tx)?, wal::generation(&tx)?))
    })
    .map_err(StoreError::from)
    .and_then(|r| r)
    .map_err(|e| SpoolError::from_store(&path, e))?;
    let wal_events = log
        .frames
        .iter()
        .filter(|f| wal::live(f.gen, generation))
        .flat_map(|f| &f.events)
        .filter(|e| e.seq >= checkpoint)
        .count() as u64;
    let (wal_done, wal_attempts) = log.book_rows(generation);
    let oldest = match &rec.oldest {
        Some((seq, sink)) => {
            let found = store::load_events(&db, &[*seq], &[], 0).map_err(|e| SpoolError::from_store(&path, e))?;
            let event = found.into_iter().next().and_then(|(_, r)| record::decode(&r?).ok());
            Some(match event {
                Some(env) => (sink.clone(), env.event.id, env.event.received_at),
                None => (sink.clone(), format!("(seq {seq}, unreadable)"), "?".into()),
            })
        }
        None => None,
    };
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    Ok(CheckReport {
        path,
        absent: false,
        size,
        events: rec.events,
        event_bytes: rec.bytes,
        pending: rec.pending,
        oldest,
        dedup_ids: rec.dedup.len(),
        paused: rec.paused.into_keys().collect(),
        damaged: rec.unreadable,
        wal_events,
        wal_done,
        wal_attempts,
        wal_torn: log.torn.then_some(log.good),
        wal_frames: log.frames.len(),
    })
}

/// How salvage read the old file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// There was nothing to read (the file was missing or empty).
    #[default]
    Nothing,
    /// Through redb: every record keeps the sinks it was pending for.
    Index,
    /// redb could not open it: its bytes were scanned for intact records.
    Scan,
}

#[derive(Debug, Default)]
pub struct SalvageReport {
    pub source: Source,
    /// Why redb could not read the file (with [`Source::Scan`]), or what stopped the reading part way.
    pub index_error: Option<String>,
    /// Where the old file went.
    pub moved_to: Option<PathBuf>,
    pub fresh: PathBuf,
    /// Events copied into the fresh spool, and the (event, sink) pairs by sink.
    pub saved: u64,
    pub pairs: BTreeMap<String, u64>,
    /// Records that failed their check: written to the dead-letter file as stored.
    pub damaged: u64,
    /// Pending rows whose event row could not be found or read.
    pub lost: u64,
    /// Scanned events that no route matches now (not queued).
    pub unrouted: u64,
    /// Sinks paused in the old file (read through its index), still paused in the fresh one.
    pub paused: Vec<String>,
    /// Where the old write-ahead file went, and the events of it copied into the fresh spool.
    pub wal_moved_to: Option<PathBuf>,
    pub wal_saved: u64,
    /// The write-ahead file's log ended in a torn or damaged frame (not copied).
    pub wal_torn: bool,
    /// (event, sink) pairs that the write-ahead file's bookkeeping (since the old file's last
    /// checkpoint) records as delivered or dead-lettered: not pending again.
    pub wal_done: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SalvageError {
    #[error("{0}")]
    Spool(#[from] SpoolError),
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the fresh spool {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
}

/// One record found in the old file and where it goes.
struct Found {
    /// Its seq in the old file or the write-ahead file (`None`: found by a scan).
    seq: Option<u64>,
    rec: Vec<u8>,
    /// The sinks it is pending for, each with the attempts made so far.
    sinks: Vec<(String, u32)>,
}

/// Salvages the spool of `cfg` (see the module doc). `route` gives the sinks an event
/// matches now (used only when the file's index is unreadable).
pub fn salvage(cfg: &DeliveryConfig, route: &dyn Fn(&Event) -> Vec<String>) -> Result<SalvageReport, SalvageError> {
    let dir = &cfg.spool_dir;
    let path = dir.join(store::FILE_NAME);
    let mut report = SalvageReport { fresh: path.clone(), ..Default::default() };
    let size = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(source) => return Err(SalvageError::Io { what: "cannot read", path, source }),
    };
    let mut found: Vec<Found> = Vec::new();
    let mut damaged: Vec<DeadLetter> = Vec::new();
    let mut paused = BTreeMap::new();
    let wal_path = dir.join(wal::FILE_NAME);
    let log =
        wal::read(dir).map_err(|source| SalvageError::Io { what: "cannot read", path: wal_path.clone(), source })?;
    // Frames the old file's checkpoint covers are in it already (0 when it cannot be read).
    let mut checkpoint = 0;
    // The frames of this generation hold the bookkeeping done since that checkpoint (`None`:
    // unknown, none is applied).
    let mut generation = None;
    if size > 0 {
        match store::open_file(&path) {
            Ok(db) => {
                report.source = Source::Index;
                // A pause the operator set stays set (unreadable: the sinks start unpaused).
                paused = store::paused(&db).unwrap_or_default();
                let marks = guard::catch(|| -> Result<(u64, u64), StoreError> {
                    let tx = db.begin_read().op("begin read")?;
                    Ok((wal::checkpoint(&tx)?, wal::generation(&tx)?))
                })
                .ok()
                .and_then(Result::ok);
                checkpoint = marks.map_or(0, |m| m.0);
                generation = marks.map(|m| m.1);
                if let Err(e) = read_index(&db, &mut found, &mut damaged, &mut report) {
                    report.index_error = Some(e.to_string());
                }
                // Keeps redb's lock until the file is moved aside.
                move_aside(&path, &mut report)?;
                drop(db);
            }
            Err(StoreError::Redb { source, .. }) if matches!(*source, redb::Error::DatabaseAlreadyOpen) => {
                return Err(SpoolError::InUse { path }.into())
            }
            Err(e) => {
                report.source = Source::Scan;
                report.index_error = Some(e.to_string());
                scan(&path, route, &mut found, &mut report)?;
                move_aside(&path, &mut report)?;
            }
        }
    } else if path.exists() {
        move_aside(&path, &mut report)?;
    }
    // The write-ahead file: its intact events newer than the checkpoint (acknowledged, maybe
    // not in the old file), each for the sinks it was accepted for; it goes aside as well.
    let known: std::collections::HashSet<String> = found.iter().filter_map(|f| record::stored_id(&f.rec)).collect();
    report.wal_torn = log.torn;
    for e in log.frames.iter().flat_map(|f| &f.events).filter(|e| e.seq >= checkpoint) {
        if record::stored_id(&e.rec).is_some_and(|id| known.contains(&id)) {
            continue;
        }
        match record::decode(&e.rec) {
            Ok(_) => {
                let sinks = e.sinks.iter().map(|s| (s.clone(), 0)).collect();
                found.push(Found { seq: Some(e.seq), rec: e.rec.clone(), sinks });
                report.wal_saved += 1;
            }
            Err(err) => {
                for sink in &e.sinks {
                    damaged.push(DeadLetter::unreadable(sink, &err.to_string(), 0, &e.rec));
                }
            }
        }
    }
    if let Some(generation) = generation {
        apply_book(&log, generation, &mut found, &mut report);
    }
    // Both write-ahead files go aside (the first one's new name is reported).
    for name in wal::FILE_NAMES.iter().rev() {
        let wal_path = dir.join(name);
        if !wal_path.exists() {
            continue;
        }
        let aside = report
            .moved_to
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().replacen(store::FILE_NAME, name, 1))
            .unwrap_or_else(|| format!("{name}.damaged-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")));
        let aside = dir.join(aside);
        std::fs::rename(&wal_path, &aside).map_err(|source| SalvageError::Io {
            what: "cannot move aside",
            path: wal_path.clone(),
            source,
        })?;
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        report.wal_moved_to = Some(aside);
    }

    let (db, fresh) = store::create_fresh(dir)?;
    report.fresh = fresh.clone();
    let mut next = 0;
    for chunk in found.chunks(BATCH) {
        let batch: Vec<(Vec<u8>, Vec<String>)> =
            chunk.iter().map(|f| (f.rec.clone(), f.sinks.iter().map(|(s, _)| s.clone()).collect())).collect();
        let first = next;
        next =
            append_offline(&db, next, &batch).map_err(|source| SalvageError::Write { path: fresh.clone(), source })?;
        keep_attempts(&db, first, chunk).map_err(|source| SalvageError::Write { path: fresh.clone(), source })?;
    }
    for (sink, at) in &paused {
        store::set_paused(&db, sink, true, *at, None)
            .map_err(|source| SalvageError::Write { path: fresh.clone(), source })?;
    }
    report.paused = paused.into_keys().collect();
    report.saved = found.len() as u64;
    for f in &found {
        for (s, _) in &f.sinks {
            *report.pairs.entry(s.clone()).or_default() += 1;
        }
    }
    if !damaged.is_empty() {
        append_letters(&cfg.dead_letter_file, &damaged).map_err(|source| SalvageError::Io {
            what: "cannot write",
            path: cfg.dead_letter_file.clone(),
            source,
        })?;
        report.damaged = damaged.len() as u64;
    }
    Ok(report)
}

/// Reads every pending row and its event through redb, each read guarded so that one damaged
/// page costs what it holds, not the rest. Stops at the first unreadable stretch of the
/// pending table (the error says so in the report).
fn read_index(
    db: &redb::Database,
    found: &mut Vec<Found>,
    damaged: &mut Vec<DeadLetter>,
    report: &mut SalvageReport,
) -> Result<(), StoreError> {
    // (seq → sinks), in seq order.
    let mut pending: BTreeMap<u64, Vec<(String, u32)>> = BTreeMap::new();
    let listed = guard::catch(|| -> Result<(), StoreError> {
        let tx = db.begin_read().op("begin read")?;
        let table = tx.open_table(PENDING).op("open pending")?;
        for row in table.iter().op("read pending")? {
            let (k, v) = row.op("read pending")?;
            let (sink, seq) = k.value();
            pending.entry(seq).or_default().push((sink.to_owned(), v.value()));
        }
        Ok(())
    });
    let listed = listed.map_err(StoreError::from).and_then(|r| r);
    for (seq, sinks) in &pending {
        let read = guard::catch(|| -> Result<Option<Vec<u8>>, StoreError> {
            let tx = db.begin_read().op("begin read")?;
            let events = tx.open_table(EVENTS).op("open events")?;
            Ok(events.get(*seq).op("read event")?.map(|v| v.value().to_vec()))
        });
        match read.map_err(StoreError::from).and_then(|r| r) {
            Ok(Some(rec)) => match record::decode(&rec) {
                Ok(_) => found.push(Found { seq: Some(*seq), rec, sinks: sinks.clone() }),
                Err(e) => {
                    for (sink, attempts) in sinks {
                        damaged.push(DeadLetter::unreadable(sink, &e.to_string(), *attempts, &rec));
                    }
                }
            },
            Ok(None) | Err(_) => report.lost += sinks.len() as u64,
        }
    }
    listed
}

/// Applies the bookkeeping of the write-ahead file's frames of `generation` (what the writer
/// did since the old file's last checkpoint, which the old file does not hold) to what was
/// found by seq, as the next start's replay would have: a (sink, seq) pair delivered or
/// dead-lettered is not pending again (an event no sink needs any more is not saved), and an
/// attempt count replaces the one found. Records found by a scan have no seq: nothing applies.
fn apply_book(log: &wal::Decoded, generation: u64, found: &mut Vec<Found>, report: &mut SalvageReport) {
    let by_seq: std::collections::HashMap<u64, usize> =
        found.iter().enumerate().filter_map(|(i, f)| f.seq.map(|seq| (seq, i))).collect();
    for op in log.frames.iter().filter(|f| f.gen.is_some() && wal::live(f.gen, generation)).flat_map(|f| &f.book) {
        match op {
            wal::Bookkeeping::Done { sink, seqs } => {
                for &i in seqs.iter().filter_map(|seq| by_seq.get(seq)) {
                    let f = &mut found[i];
                    let before = f.sinks.len();
                    f.sinks.retain(|(s, _)| **s != **sink);
                    report.wal_done += (before - f.sinks.len()) as u64;
                }
            }
            wal::Bookkeeping::Attempts { sink, items } => {
                for (seq, n) in items {
                    let Some(&i) = by_seq.get(seq) else { continue };
                    for (_, attempts) in found[i].sinks.iter_mut().filter(|(s, _)| **s == **sink) {
                        *attempts = *n;
                    }
                }
            }
        }
    }
    found.retain(|f| !f.sinks.is_empty());
}

/// Writes the attempt counts of `chunk`, whose records [`append_offline`] gave the seqs from
/// `first` on (it writes 0 for each pending row), so that a salvage does not reset them.
fn keep_attempts(db: &redb::Database, first: u64, chunk: &[Found]) -> Result<(), StoreError> {
    if chunk.iter().all(|f| f.sinks.iter().all(|(_, n)| *n == 0)) {
        return Ok(());
    }
    guard::catch(|| {
        let tx = db.begin_write().op("begin")?;
        {
            let mut pending = tx.open_table(PENDING).op("open pending")?;
            for (seq, f) in (first..).zip(chunk) {
                for (sink, n) in f.sinks.iter().filter(|(_, n)| *n > 0) {
                    pending.insert((sink.as_str(), seq), *n).op("write pending")?;
                }
            }
        }
        tx.commit().op("commit")
    })?
}

/// Scans the bytes of an unreadable file for intact records.
fn scan(
    path: &Path,
    route: &dyn Fn(&Event) -> Vec<String>,
    found: &mut Vec<Found>,
    report: &mut SalvageReport,
) -> Result<(), SalvageError> {
    let map =
        Mapped::open(path).map_err(|source| SalvageError::Io { what: "cannot read", path: path.to_owned(), source })?;
    for env in record::scan(map.bytes()) {
        let sinks = route(&env.event);
        if sinks.is_empty() {
            report.unrouted += 1;
            continue;
        }
        found.push(Found { seq: None, rec: record::encode(&env), sinks: sinks.into_iter().map(|s| (s, 0)).collect() });
    }
    Ok(())
}

/// Renames the old file to `spool.redb.damaged-<UTC time>` beside it (durably).
fn move_aside(path: &Path, report: &mut SalvageReport) -> Result<(), SalvageError> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let aside = path.with_file_name(format!("{}.damaged-{stamp}", store::FILE_NAME));
    std::fs::rename(path, &aside).map_err(|source| SalvageError::Io {
        what: "cannot move aside",
        path: path.to_owned(),
        source,
    })?;
    if let Some(dir) = path.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    report.moved_to = Some(aside);
    Ok(())
}

/// Appends `letters` to the dead-letter file and makes them durable.
fn append_letters(file: &Path, letters: &[DeadLetter]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file)?;
    let mut out = Vec::new();
    for l in letters {
        serde_json::to_writer(&mut out, l).map_err(std::io::Error::other)?;
        out.push(b'\n');
    }
    f.write_all(&out)?;
    f.sync_data()
}

/// A read-only memory map of a file (the spool may be larger than memory).
struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapped {
    fn open(path: &Path) -> std::io::Result<Mapped> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path)?;
        let len = usize::try_from(f.metadata()?.len()).map_err(std::io::Error::other)?;
        if len == 0 {
            return Ok(Mapped { ptr: std::ptr::null_mut(), len: 0 });
        }
        // SAFETY: a private read-only mapping of a file we opened; the pointer is checked
        // against MAP_FAILED and unmapped in Drop. The file is not modified while mapped
        // (the daemon is stopped; salvage renames it only after the scan).
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping made in `open`.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
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

    fn config(dir: &Path) -> DeliveryConfig {
        DeliveryConfig { spool_dir: dir.join("spool"), dead_letter_file: dir.join("dead.jsonl"), ..Default::default() }
    }

    fn fill(cfg: &DeliveryConfig, n: u32) {
        let (db, _) = store::open_db(&cfg.spool_dir).unwrap();
        let recs: Vec<_> = (0..n).map(|i| (record::encode(&env(i)), vec!["a".to_owned(), "b".to_owned()])).collect();
        append_offline(&db, 0, &recs).unwrap();
    }

    #[test]
    fn check_reports_pending_per_sink_the_oldest_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        assert!(check(&cfg).unwrap().absent, "no spool yet: nothing pending, nothing created");
        assert!(!cfg.spool_dir.join(store::FILE_NAME).exists());
        fill(&cfg, 5);
        let r = check(&cfg).unwrap();
        assert!(r.healthy());
        assert_eq!((r.events, r.pending["a"], r.pending["b"]), (5, 5, 5));
        assert_eq!(r.oldest.as_ref().map(|o| o.1.clone()), Some(env(0).event.id));
        assert!(r.size > 0);

        store::damage_event(&store::open_db(&cfg.spool_dir).unwrap().0, 3);
        let r = check(&cfg).unwrap();
        assert!(!r.healthy());
        assert_eq!(r.damaged.len(), 1, "{:?}", r.damaged);
    }

    #[test]
    fn salvage_through_the_index_keeps_each_records_sinks_and_dead_letters_the_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        fill(&cfg, 4);
        {
            let (db, _) = store::open_db(&cfg.spool_dir).unwrap();
            store::set_paused(&db, "b", true, 7, None).unwrap();
            store::damage_event(&db, 2);
        }

        let r = salvage(&cfg, &|_| panic!("not routed again")).unwrap();
        assert_eq!(r.source, Source::Index);
        assert_eq!((r.saved, r.damaged, r.lost), (3, 2, 0), "{r:?}");
        assert_eq!(r.pairs["a"], 3);
        assert!(r.moved_to.as_ref().unwrap().exists());
        let letters = std::fs::read_to_string(&cfg.dead_letter_file).unwrap();
        assert_eq!(letters.lines().count(), 2, "one per sink it was pending for");
        let after = check(&cfg).unwrap();
        assert!(after.healthy());
        assert_eq!((after.events, after.pending["a"], after.pending["b"]), (3, 3, 3));
        assert_eq!((r.paused.clone(), after.paused), (vec!["b".to_owned()], vec!["b".to_owned()]), "the pause is kept");
    }

    /// The (sink, seq) → attempts rows of the spool under `cfg` (seqs renumbered by salvage:
    /// keyed by the amount of the event instead).
    fn pending_attempts(cfg: &DeliveryConfig) -> BTreeMap<(String, i64), u32> {
        let (db, _) = store::open_db(&cfg.spool_dir).unwrap();
        let tx = db.begin_read().unwrap();
        let (pending, events) = (tx.open_table(PENDING).unwrap(), tx.open_table(EVENTS).unwrap());
        let mut out = BTreeMap::new();
        for row in pending.iter().unwrap() {
            let (k, v) = row.unwrap();
            let (sink, seq) = k.value();
            let rec = events.get(seq).unwrap().unwrap().value().to_vec();
            let amount = record::decode(&rec).unwrap().event.extra["amount"].as_i64().unwrap();
            out.insert((sink.to_owned(), amount), v.value());
        }
        out
    }

    #[test]
    fn salvage_applies_the_write_ahead_files_bookkeeping_and_keeps_attempt_counts() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        // Events 0..3 (amounts 0..3) in the file, pending for a and b; (a, 1) tried 5 times.
        fill(&cfg, 4);
        let generation = {
            let (db, _) = store::open_db(&cfg.spool_dir).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(PENDING).unwrap().insert(("a", 1), 5u32).unwrap();
            tx.commit().unwrap();
            wal::current_generation(&db).unwrap()
        };
        // Since the last checkpoint, in the write-ahead file: event 4 accepted for a and b; then
        // event 0 done for both sinks (delivered, or dead-lettered), event 4 done for a, and
        // (b, 2) tried 3 times.
        let rec = record::encode(&env(4));
        let sinks = vec!["a".to_owned(), "b".to_owned()];
        let book = vec![
            wal::Bookkeeping::Done { sink: "a".into(), seqs: vec![0, 4] },
            wal::Bookkeeping::Done { sink: "b".into(), seqs: vec![0] },
            wal::Bookkeeping::Attempts { sink: "b".into(), items: vec![(2, 3)] },
        ];
        let mut frame = Vec::new();
        wal::encode(&mut frame, generation, 1, 4, &[], std::iter::once((4, rec.as_slice(), sinks.as_slice())), &book);
        frame.extend_from_slice(&wal::END);
        std::fs::write(cfg.spool_dir.join(wal::FILE_NAME), frame).unwrap();

        let r = salvage(&cfg, &|_| panic!("not routed again")).unwrap();
        assert_eq!(r.source, Source::Index);
        assert_eq!((r.saved, r.wal_saved, r.wal_done), (4, 1, 3), "{r:?}");
        let want: BTreeMap<(String, i64), u32> =
            [(("a", 1), 5), (("a", 2), 0), (("a", 3), 0), (("b", 1), 0), (("b", 2), 3), (("b", 3), 0), (("b", 4), 0)]
                .into_iter()
                .map(|((s, n), a)| ((s.to_owned(), n), a))
                .collect();
        assert_eq!(pending_attempts(&cfg), want, "delivered pairs stay delivered, attempts stay counted");
    }

    /// A crash while a checkpoint's durable commit ran behind the webhooks leaves frames in
    /// both write-ahead files: the checkpoint's generation in one, the next one in the
    /// other. `check` counts both, and `salvage` keeps both (events and bookkeeping, in
    /// generation order) and moves both aside.
    #[test]
    fn check_and_salvage_read_both_write_ahead_files() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        // Events 0..3 in the file, pending for a and b.
        fill(&cfg, 4);
        let generation = {
            let (db, _) = store::open_db(&cfg.spool_dir).unwrap();
            wal::current_generation(&db).unwrap()
        };
        let sinks = vec!["a".to_owned(), "b".to_owned()];
        let frame = |gen: u64, seq: u64, book: &[wal::Bookkeeping]| {
            let rec = record::encode(&env(seq as u32));
            let mut frame = Vec::new();
            wal::encode(&mut frame, gen, 1, seq, &[], std::iter::once((seq, rec.as_slice(), sinks.as_slice())), book);
            frame.extend_from_slice(&wal::END);
            frame
        };
        // The second file, the checkpoint's generation: event 4, and event 0 done for a. The
        // first file, the next generation (written after the switch): event 5, event 0 done
        // for b, event 4 done for a, (b, 2) tried 3 times.
        let older = frame(generation, 4, &[wal::Bookkeeping::Done { sink: "a".into(), seqs: vec![0] }]);
        let newer = frame(
            generation + 1,
            5,
            &[
                wal::Bookkeeping::Done { sink: "b".into(), seqs: vec![0] },
                wal::Bookkeeping::Done { sink: "a".into(), seqs: vec![4] },
                wal::Bookkeeping::Attempts { sink: "b".into(), items: vec![(2, 3)] },
            ],
        );
        std::fs::write(cfg.spool_dir.join(wal::SECOND_NAME), older).unwrap();
        std::fs::write(cfg.spool_dir.join(wal::FILE_NAME), newer).unwrap();

        let c = check(&cfg).unwrap();
        assert_eq!((c.wal_frames, c.wal_events, c.wal_done, c.wal_attempts), (2, 2, 3, 1), "{c:?}");
        let r = salvage(&cfg, &|_| panic!("not routed again")).unwrap();
        assert_eq!((r.saved, r.wal_saved, r.wal_done), (5, 2, 3), "{r:?}");
        for name in wal::FILE_NAMES {
            assert!(!cfg.spool_dir.join(name).exists(), "{name} moved aside");
        }
        let aside = std::fs::read_dir(&cfg.spool_dir).unwrap().filter_map(|e| e.ok()).filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(wal::FILE_NAME) && n.contains("damaged")
        });
        assert_eq!(aside.count(), 2, "both files kept aside");
        let want: BTreeMap<(String, i64), u32> = [
            (("a", 1), 0),
            (("a", 2), 0),
            (("a", 3), 0),
            (("a", 5), 0),
            (("b", 1), 0),
            (("b", 2), 3),
            (("b", 3), 0),
            (("b", 4), 0),
            (("b", 5), 0),
        ]
        .into_iter()
        .map(|((s, n), a)| ((s.to_owned(), n), a))
        .collect();
        assert_eq!(pending_attempts(&cfg), want, "both files' events and bookkeeping");
    }

    #[test]
    fn salvage_scans_a_file_redb_cannot_open_and_routes_what_it_finds() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        fill(&cfg, 60);
        let path = cfg.spool_dir.join(store::FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        // The header: redb cannot open the file at all.
        bytes[..4096].fill(0);
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(check(&cfg), Err(SpoolError::Damaged { .. })));

        let r = salvage(&cfg, &|ev| if ev.extra["amount"] == 7 { vec![] } else { vec!["a".into()] }).unwrap();
        assert_eq!(r.source, Source::Scan);
        assert_eq!((r.saved, r.unrouted), (59, 1), "{r:?}");
        let after = check(&cfg).unwrap();
        assert_eq!(after.pending["a"], 59);
    }
}
