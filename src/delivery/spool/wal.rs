//! The write-ahead file in front of the redb file (`spool.wal` beside `spool.redb`).
//!
//! Each writer batch that accepts events or records deliveries (bookkeeping) is made durable by
//! **one append of one checksummed frame** to this file and one `fdatasync`; the batch's effects
//! then wait in memory (the writer's memtable, [`super::memtable`]). About once a second (or
//! when this file passes [`CHECKPOINT_BYTES`]) a redb commit of the memtable is the
//! **checkpoint**: it records in the `meta` table the seq below which redb holds everything
//! ([`CHECKPOINT`]) and the next generation ([`GENERATION`]), and the next frame is written at
//! the start of the *other* file ([`SECOND_NAME`]; nothing is truncated or synced for it:
//! replay takes only the live generations' frames, [`live`]). The checkpoint's durable commit
//! runs behind the webhooks ([`super::behind`]); until it ends, the frames of the file before
//! the switch are still needed, and the writer starts no other checkpoint.
//!
//! The file is **preallocated** ([`PREALLOC`] bytes of zeros, written once): an append then
//! neither changes the file's size nor its block map, so its `fdatasync` flushes the data
//! without a journal commit for the inode (measured: docs/performance.md). Each append writes
//! the frame followed by [`END`] (12 zero bytes, the header of no frame), which marks the end of
//! the log whatever older frames follow it.
//!
//! A frame: magic (4 bytes, [`MAGIC`]), payload length (u32 LE), CRC-32C of the length and the
//! payload (u32 LE), then the payload: the checkpoint generation it was written under (u64,
//! [`GENERATION`]), accepted at (unix ms, u64), the seq of the batch's first event (u64: with
//! the time, the key of its `dedup_batches` row), the dedup ids (u32 count, 16 bytes each), the
//! events (u32 count; each: seq u64, record length u32, the stored record, sink count u32, each
//! sink as u32 length + UTF-8), then the bookkeeping applied in the same transaction (u32
//! count; each: kind u8 (0 done, 1 attempts), sink as u32 length + UTF-8, u32 count, then the
//! seqs (u64) or the (seq u64, attempts u32) pairs). All integers little-endian. A batch with
//! only bookkeeping writes a frame too (no event). The frames of a log share one generation
//! and their seqs only grow. Frames of the first format ([`MAGIC_V1`]: no generation, no
//! bookkeeping) are still read.
//!
//! **Replay** ([`recover`], at every open of the spool, and [`Wal::replay_into`] in the writer's
//! heal) reads frames while they check out; a zero header is the clean end, and so is a frame
//! of another generation (behind a lost end marker), and the first frame that does not check
//! out (a torn tail: its `fdatasync` never completed, so it was never acknowledged) ends the
//! log too, with a warning. Both files are read, the lower generation first. Of the live
//! frames (redb's generation and the next one), the events redb does not hold (with their
//! pending rows and dedup row) are written, then each frame's bookkeeping is applied,
//! idempotently, in one durable commit that moves the checkpoint past them and the generation
//! two on (past any frame either file holds); then the logs are emptied.

use super::guard;
use super::store::{Op as _, StoreError, DEDUP_BATCHES, EVENTS, META, PENDING};
use redb::{Database, ReadableDatabase, ReadableTable};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const FILE_NAME: &str = "spool.wal";
/// The second write-ahead file: at each checkpoint the writer switches files, so that new
/// frames go on while the checkpoint's durable commit of the first file's frames runs behind
/// the webhooks (see [`super::writer`]). A release before it ignores this file (see
/// docs/spool.md, "Compatibility").
pub const SECOND_NAME: &str = "spool.wal.1";
/// Both files, in the order the writer uses them after an open.
pub const FILE_NAMES: [&str; 2] = [FILE_NAME, SECOND_NAME];
/// `meta` key: every event with a lower seq is in redb durably (the write-ahead file's frames
/// below it are covered).
pub const CHECKPOINT: &str = "wal_checkpoint";
/// `meta` key: the checkpoint generation, one more at every checkpoint. Frames carry the
/// generation they were written under; replay takes only the current one's (the frames of an
/// older one are covered, whatever they hold).
pub const GENERATION: &str = "wal_generation";
/// A checkpoint is due once the file holds this many bytes, whatever the time.
pub const CHECKPOINT_BYTES: u64 = 4 << 20;
/// The file's preallocated size (a batch that goes past it grows the file, until the
/// checkpoint that follows brings the next frames back to its start).
pub const PREALLOC: u64 = CHECKPOINT_BYTES + (1 << 20);
pub const MAGIC: [u8; 4] = *b"WwA2";
/// The frames of the first release of this file (no generation, no bookkeeping): still read,
/// so that an upgrade after a crash loses nothing.
pub const MAGIC_V1: [u8; 4] = *b"WwA1";
const HEADER: usize = 12;
/// Written after every frame: the end of the log.
pub const END: [u8; HEADER] = [0; HEADER];
/// No batch comes near this (the writer takes at most 16 MiB of events, plus one record).
const MAX_PAYLOAD: usize = 256 << 20;
/// What [`read`] reads first.
const FIRST_READ: u64 = 64 << 10;
/// Bytes written (zeros: a clean end if they stay) and fdatasynced to prove the file takes writes.
const PROBE_BYTES: usize = 16 << 10;

/// One accepted event of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalEvent {
    pub seq: u64,
    pub rec: Vec<u8>,
    pub sinks: Vec<String>,
}

/// Delivery bookkeeping. Applying one twice is harmless, which replay and the writer's heal
/// rely on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bookkeeping {
    /// These (sink, seq) pairs are delivered or dead-lettered: drop them (and the event when
    /// no other sink still needs it).
    Done { sink: Arc<str>, seqs: Vec<u64> },
    /// Attempts made so far, so that a restart does not start counting again.
    Attempts { sink: Arc<str>, items: Vec<(u64, u32)> },
}

impl Bookkeeping {
    pub fn rows(&self) -> usize {
        match self {
            Bookkeeping::Done { seqs, .. } => seqs.len(),
            Bookkeeping::Attempts { items, .. } => items.len(),
        }
    }
}

/// What one batch's transaction wrote that must survive a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The checkpoint generation it was written under (`None`: a frame of the first format,
    /// which has neither generation nor bookkeeping).
    pub gen: Option<u64>,
    pub at: u64,
    pub first_seq: u64,
    pub ids: Vec<u128>,
    pub events: Vec<WalEvent>,
    /// The bookkeeping applied in the same transaction, after the events.
    pub book: Vec<Bookkeeping>,
}

impl Frame {
    /// Rows of bookkeeping: (deliveries done or dead-lettered, attempt counts).
    pub fn book_rows(&self) -> (u64, u64) {
        let mut out = (0, 0);
        for op in &self.book {
            match op {
                Bookkeeping::Done { seqs, .. } => out.0 += seqs.len() as u64,
                Bookkeeping::Attempts { items, .. } => out.1 += items.len() as u64,
            }
        }
        out
    }
}

/// Appends the frame of one batch (written under checkpoint generation `gen`) to `buf`.
pub fn encode<'a>(
    buf: &mut Vec<u8>,
    gen: u64,
    at: u64,
    first_seq: u64,
    ids: &[u128],
    events: impl Iterator<Item = (u64, &'a [u8], &'a [String])>,
    book: &[Bookkeeping],
) {
    let start = buf.len();
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&[0; 8]);
    buf.extend_from_slice(&gen.to_le_bytes());
    buf.extend_from_slice(&at.to_le_bytes());
    buf.extend_from_slice(&first_seq.to_le_bytes());
    buf.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    for id in ids {
        buf.extend_from_slice(&id.to_le_bytes());
    }
    let count_at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let mut count = 0u32;
    for (seq, rec, sinks) in events {
        count += 1;
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&(rec.len() as u32).to_le_bytes());
        buf.extend_from_slice(rec);
        buf.extend_from_slice(&(sinks.len() as u32).to_le_bytes());
        for s in sinks {
            buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
            buf.extend_from_slice(s.as_bytes());
        }
    }
    buf[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    buf.extend_from_slice(&(book.len() as u32).to_le_bytes());
    for op in book {
        let (kind, sink, n) = match op {
            Bookkeeping::Done { sink, seqs } => (0u8, sink, seqs.len()),
            Bookkeeping::Attempts { sink, items } => (1u8, sink, items.len()),
        };
        buf.push(kind);
        buf.extend_from_slice(&(sink.len() as u32).to_le_bytes());
        buf.extend_from_slice(sink.as_bytes());
        buf.extend_from_slice(&(n as u32).to_le_bytes());
        match op {
            Bookkeeping::Done { seqs, .. } => {
                for seq in seqs {
                    buf.extend_from_slice(&seq.to_le_bytes());
                }
            }
            Bookkeeping::Attempts { items, .. } => {
                for (seq, n) in items {
                    buf.extend_from_slice(&seq.to_le_bytes());
                    buf.extend_from_slice(&n.to_le_bytes());
                }
            }
        }
    }
    let len = (buf.len() - start - HEADER) as u32;
    buf[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c(crc32c(0, &len.to_le_bytes()), &buf[start + HEADER..]);
    buf[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

/// What [`decode`] found in a file's bytes.
#[derive(Debug, Default)]
pub struct Decoded {
    pub frames: Vec<Frame>,
    /// Bytes of the intact frames (where the log ends for replay).
    pub good: u64,
    /// The log ends in a frame that does not check out (torn: never acknowledged; or damaged),
    /// at `good`, instead of a zero header.
    pub torn: bool,
}

impl Decoded {
    pub fn events(&self) -> u64 {
        self.frames.iter().map(|f| f.events.len() as u64).sum()
    }

    /// Rows of bookkeeping of the frames still to be replayed when redb's generation is
    /// `gen` ([`live`]): (deliveries done or dead-lettered, attempt counts).
    pub fn book_rows(&self, gen: u64) -> (u64, u64) {
        self.frames
            .iter()
            .filter(|f| f.gen.is_some() && live(f.gen, gen))
            .map(Frame::book_rows)
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }
}

/// Whether a frame written under `gen` is still to be replayed when redb's durable
/// checkpoint generation is `current`: the frames of `current` (written since that checkpoint,
/// in one file) and of `current + 1` (written in the other file after a checkpoint whose
/// durable commit had not ended: the writer starts the next one only once it has). Frames of
/// the first format have no generation (events only, filtered by the checkpoint's seq).
pub fn live(gen: Option<u64>, current: u64) -> bool {
    gen.is_none_or(|g| g == current || g == current.wrapping_add(1))
}

/// The logs of both files as one: the frames of the lower generation first (each file holds
/// one generation's run: [`decode`] stops at another one). Torn if either is; `good` is where
/// the torn one (or the first) ends.
pub fn combine(a: Decoded, b: Decoded) -> Decoded {
    let key = |d: &Decoded| d.frames.first().map(|f| f.gen);
    let (first, second) =
        if b.frames.is_empty() || (!a.frames.is_empty() && key(&a) <= key(&b)) { (a, b) } else { (b, a) };
    let good = if second.torn && !first.torn { second.good } else { first.good };
    let torn = first.torn || second.torn;
    let mut frames = first.frames;
    frames.extend(second.frames);
    Decoded { frames, good, torn }
}

/// Reads the frames of `bytes` up to the end marker, or up to the first one that does not
/// check out.
pub fn decode(bytes: &[u8]) -> Decoded {
    let mut out = Decoded::default();
    let mut at = 0usize;
    let mut next_seq = 0u64;
    loop {
        let rest = &bytes[at..];
        out.good = at as u64;
        if rest[..rest.len().min(HEADER)].iter().all(|b| *b == 0) {
            return out;
        }
        match parse(rest) {
            // The frames of a log share one generation and their seqs only grow: a frame of
            // another generation, or an older one, is what an earlier log left behind.
            Some((f, _))
                if out.frames.first().is_some_and(|first| first.gen != f.gen)
                    || (!out.frames.is_empty() && f.events.first().is_some_and(|e| e.seq < next_seq)) =>
            {
                return out;
            }
            Some((f, used)) if !f.events.is_empty() || !f.book.is_empty() => {
                // The writer never reaches seq u64::MAX (it would take 2^64 events): a frame
                // that claims it is damage behind a matching CRC, and ends the log as torn.
                let Some(next) = f.events.last().map_or(Some(next_seq), |e| e.seq.checked_add(1)) else {
                    out.torn = true;
                    return out;
                };
                next_seq = next;
                out.frames.push(f);
                at += used;
            }
            _ => {
                out.torn = true;
                return out;
            }
        }
    }
}

/// One frame at the start of `b` and its size, if it checks out.
fn parse(b: &[u8]) -> Option<(Frame, usize)> {
    if b.len() < HEADER || (b[..4] != MAGIC && b[..4] != MAGIC_V1) {
        return None;
    }
    let v1 = b[..4] == MAGIC_V1;
    let len = u32::from_le_bytes(b[4..8].try_into().ok()?);
    let crc = u32::from_le_bytes(b[8..12].try_into().ok()?);
    let n = len as usize;
    if n > MAX_PAYLOAD || b.len() - HEADER < n {
        return None;
    }
    let payload = &b[HEADER..HEADER + n];
    if crc32c(crc32c(0, &len.to_le_bytes()), payload) != crc {
        return None;
    }
    let mut r = Reader(payload);
    let gen = if v1 { None } else { Some(r.u64()?) };
    let at = r.u64()?;
    let first_seq = r.u64()?;
    let n_ids = r.u32()? as usize;
    let mut ids = Vec::with_capacity(n_ids.min(r.0.len() / 16));
    for _ in 0..n_ids {
        ids.push(u128::from_le_bytes(r.take(16)?.try_into().ok()?));
    }
    let n_events = r.u32()? as usize;
    let mut events = Vec::with_capacity(n_events.min(r.0.len() / 14));
    let mut last: Option<u64> = None;
    for _ in 0..n_events {
        let seq = r.u64()?;
        if last.is_some_and(|l| seq <= l) {
            return None;
        }
        last = Some(seq);
        let rl = r.u32()? as usize;
        let rec = r.take(rl)?.to_vec();
        let ns = r.u32()? as usize;
        let mut sinks = Vec::with_capacity(ns.min(r.0.len() / 4));
        for _ in 0..ns {
            let sl = r.u32()? as usize;
            sinks.push(std::str::from_utf8(r.take(sl)?).ok()?.to_owned());
        }
        events.push(WalEvent { seq, rec, sinks });
    }
    let mut book = Vec::new();
    if !v1 {
        let n_ops = r.u32()? as usize;
        book.reserve(n_ops.min(r.0.len() / 9));
        for _ in 0..n_ops {
            let kind = r.take(1)?[0];
            let sl = r.u32()? as usize;
            let sink: Arc<str> = std::str::from_utf8(r.take(sl)?).ok()?.into();
            let count = r.u32()? as usize;
            match kind {
                0 => {
                    let mut seqs = Vec::with_capacity(count.min(r.0.len() / 8));
                    for _ in 0..count {
                        seqs.push(r.u64()?);
                    }
                    book.push(Bookkeeping::Done { sink, seqs });
                }
                1 => {
                    let mut items = Vec::with_capacity(count.min(r.0.len() / 12));
                    for _ in 0..count {
                        items.push((r.u64()?, r.u32()?));
                    }
                    book.push(Bookkeeping::Attempts { sink, items });
                }
                _ => return None,
            }
        }
    }
    if !r.0.is_empty() {
        return None;
    }
    Some((Frame { gen, at, first_seq, ids, events, book }, HEADER + n))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// CRC-32C (Castagnoli) of `data`, continuing `crc` (0 to start): the `crc32c` crate (SSE4.2
/// or ARMv8 CRC instructions when the CPU has them, a table otherwise).
pub fn crc32c(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// The checkpoint recorded in redb (0 when none yet).
pub fn checkpoint(tx: &redb::ReadTransaction) -> Result<u64, StoreError> {
    let meta = tx.open_table(META).op("open meta")?;
    Ok(meta.get(CHECKPOINT).op("read meta")?.map_or(0, |v| v.value()))
}

/// The checkpoint generation recorded in redb (0 when none yet): the one new frames are
/// written under.
pub fn generation(tx: &redb::ReadTransaction) -> Result<u64, StoreError> {
    let meta = tx.open_table(META).op("open meta")?;
    Ok(meta.get(GENERATION).op("read meta")?.map_or(0, |v| v.value()))
}

/// [`generation`] of `db`.
pub fn current_generation(db: &Database) -> Result<u64, StoreError> {
    guard::catch(|| {
        let tx = db.begin_read().op("begin read")?;
        generation(&tx)
    })?
}

/// What replaying a file's frames into redb did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Replayed {
    pub frames: usize,
    /// Events found in the frames newer than the checkpoint, and of those the ones written
    /// into redb now (the others were there already).
    pub newer: u64,
    pub written: u64,
    /// Rows of bookkeeping of the current generation's frames applied (again, harmlessly,
    /// when redb had them already).
    pub book: u64,
    /// The checkpoint generation after the replay (its commit starts a new one).
    pub generation: u64,
    /// The log ended in a torn or damaged frame at this offset (dropped).
    pub torn: Option<u64>,
}

/// Writes the events of `decoded` newer than the checkpoint that redb does not hold yet, with
/// their pending rows and dedup rows, and then each frame's bookkeeping, frame by frame, in
/// one durable commit that also moves the checkpoint past every frame (and past `at_least`,
/// the writer's next seq) and starts a new generation. Only the frames of the current
/// generation are taken (and those of the first format, which have none: events only).
pub fn apply(db: &Database, decoded: &Decoded, at_least: u64) -> Result<Replayed, StoreError> {
    guard::catch(|| {
        let tx = db.begin_write().op("begin")?;
        let torn = decoded.torn.then_some(decoded.good);
        let mut r = Replayed { frames: decoded.frames.len(), torn, ..Default::default() };
        {
            let mut meta = tx.open_table(META).op("open meta")?;
            let checkpoint = meta.get(CHECKPOINT).op("read meta")?.map_or(0, |v| v.value());
            let generation = meta.get(GENERATION).op("read meta")?.map_or(0, |v| v.value());
            let mut events = tx.open_table(EVENTS).op("open events")?;
            let mut pending = tx.open_table(PENDING).op("open pending")?;
            let mut dedup = tx.open_table(DEDUP_BATCHES).op("open dedup")?;
            let mut next = checkpoint.max(at_least);
            if let Some((k, _)) = events.last().op("read events")? {
                next = next.max(k.value().saturating_add(1));
            }
            let mut names: Option<BTreeSet<String>> = None;
            for f in &decoded.frames {
                if !live(f.gen, generation) {
                    continue;
                }
                if f.events.last().is_some_and(|e| e.seq >= checkpoint) {
                    for e in f.events.iter().filter(|e| e.seq >= checkpoint) {
                        r.newer += 1;
                        next = next.max(e.seq.saturating_add(1));
                        if events.get(e.seq).op("read events")?.is_some() {
                            continue;
                        }
                        events.insert(e.seq, e.rec.as_slice()).op("write event")?;
                        for sink in &e.sinks {
                            pending.insert((sink.as_str(), e.seq), 0u32).op("write pending")?;
                            if let Some(n) = &mut names {
                                n.insert(sink.clone());
                            }
                        }
                        r.written += 1;
                    }
                    if !f.ids.is_empty() && dedup.get((f.at, f.first_seq)).op("read dedup")?.is_none() {
                        dedup
                            .insert((f.at, f.first_seq), super::store::dedup_batch(&f.ids).as_slice())
                            .op("write dedup")?;
                    }
                }
                if !f.book.is_empty() {
                    let names = match &mut names {
                        Some(n) => n,
                        None => names.insert(sink_names(&pending)?),
                    };
                    apply_book(&mut events, &mut pending, names, &f.book)?;
                    r.book += f.book.iter().map(|op| op.rows() as u64).sum::<u64>();
                }
            }
            meta.insert(CHECKPOINT, next).op("write meta")?;
            // Past every generation a frame may carry (`generation + 1` at most, see [`live`]):
            // whatever either file holds is covered from now on.
            r.generation = generation + 2;
            meta.insert(GENERATION, r.generation).op("write meta")?;
        }
        tx.commit().op("commit")?;
        Ok(r)
    })?
}

/// Every sink that has pending rows (one lookup per sink, not a scan of the rows).
fn sink_names(pending: &impl ReadableTable<(&'static str, u64), u32>) -> Result<BTreeSet<String>, StoreError> {
    let mut names = BTreeSet::new();
    let mut first = pending.first().op("read pending")?.map(|(k, _)| k.value().0.to_owned());
    while let Some(name) = first.take() {
        let after = pending.range((name.as_str(), u64::MAX)..).op("read pending")?;
        names.insert(name.clone());
        for row in after {
            let (k, _) = row.op("read pending")?;
            let sink = k.value().0;
            if sink != name {
                first = Some(sink.to_owned());
                break;
            }
        }
    }
    Ok(names)
}

/// Applies bookkeeping to the open tables; returns the bytes of event rows freed. A missing
/// row is left missing (a row removed twice, an attempt count for a row that is gone), and
/// an event row goes when its last pending row (of any of `names`) does.
pub(crate) fn apply_book(
    events: &mut redb::Table<u64, &[u8]>,
    pending: &mut redb::Table<(&str, u64), u32>,
    names: &BTreeSet<String>,
    book: &[Bookkeeping],
) -> Result<u64, StoreError> {
    let mut freed = 0u64;
    for op in book {
        match op {
            Bookkeeping::Done { sink, seqs } => {
                for seq in seqs {
                    if pending.remove((&**sink, *seq)).op("remove pending")?.is_none() {
                        continue;
                    }
                    let mut needed = false;
                    for name in names {
                        if pending.get((name.as_str(), *seq)).op("read pending")?.is_some() {
                            needed = true;
                            break;
                        }
                    }
                    if !needed {
                        if let Some(v) = events.remove(*seq).op("remove event")? {
                            freed += v.value().len() as u64;
                        }
                    }
                }
            }
            Bookkeeping::Attempts { sink, items } => {
                for (seq, n) in items {
                    let exists = pending.get((&**sink, *seq)).op("read pending")?.is_some();
                    if exists {
                        pending.insert((&**sink, *seq), *n).op("write pending")?;
                    }
                }
            }
        }
    }
    Ok(freed)
}

/// Reads both write-ahead files beside a spool (absent: nothing) as one log ([`combine`]).
/// The first 64 KiB of each only, when its log ends there (the rest of the preallocated file
/// is not read at each start, and no large buffer raises the allocator's mmap threshold,
/// which would keep later allocations resident).
pub fn read(dir: &Path) -> std::io::Result<Decoded> {
    Ok(combine(read_file(&dir.join(FILE_NAME))?, read_file(&dir.join(SECOND_NAME))?))
}

/// [`read`] of one file.
pub fn read_file(path: &Path) -> std::io::Result<Decoded> {
    use std::io::Read;
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Decoded::default()),
        Err(e) => return Err(e),
    };
    let size = f.metadata()?.len();
    let mut bytes = Vec::new();
    (&f).take(FIRST_READ).read_to_end(&mut bytes)?;
    let decoded = decode(&bytes);
    if !decoded.torn || bytes.len() as u64 >= size {
        return Ok(decoded);
    }
    // A frame runs past the first read: read the whole file.
    (&f).read_to_end(&mut bytes)?;
    Ok(decode(&bytes))
}

/// At an open of the spool: replays the write-ahead files beside `db` into it (durably), then
/// empties their logs (an end marker at the start of each). Logs what it found.
pub fn recover(db: &Database, dir: &Path) -> Result<Replayed, StoreError> {
    let path = dir.join(FILE_NAME);
    let decoded = read(dir).map_err(|source| StoreError::Wal { op: "read", source })?;
    if decoded.frames.is_empty() && !decoded.torn {
        return Ok(Replayed::default());
    }
    let r = apply(db, &decoded, 0)?;
    log_replayed(&path, &r);
    for name in FILE_NAMES {
        let f = match std::fs::OpenOptions::new().write(true).open(dir.join(name)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(StoreError::Wal { op: "open", source }),
        };
        f.write_all_at(&END, 0).map_err(|source| StoreError::Wal { op: "write", source })?;
    }
    Ok(r)
}

fn log_replayed(path: &Path, r: &Replayed) {
    if let Some(at) = r.torn {
        tracing::warn!(file = %path.display(), frames = r.frames, torn_at = at, "spool: the write-ahead file ends in a torn or damaged frame (its batch was never acknowledged); the frames before it are kept, the tail is dropped");
    }
    if r.written > 0 {
        tracing::info!(file = %path.display(), frames = r.frames, events = r.written, "spool: events of the write-ahead file replayed into the spool");
    }
}

/// The writer's handle on the two files: appends at the last good offset of the current one,
/// never after a partial frame; a checkpoint switches to the other one ([`Wal::switch`]).
pub(crate) struct Wal {
    files: [File; 2],
    /// The paths of both files (index as `files`).
    pub paths: [PathBuf; 2],
    /// The file new frames go to (index into `files`), and its path.
    pub cur: usize,
    pub path: PathBuf,
    /// End of the last frame made durable (in the current file).
    pub len: u64,
    /// End of the last frame written (where the next one goes): past `len` while frames wait
    /// for their `fdatasync`.
    pub tail: u64,
    /// End of the other file's log: the frames written there before the last switch (all
    /// durable: the writer switches with no frame in flight), until a checkpoint covers them.
    pub other_len: u64,
    /// A failed append could not be cut back: no append until [`Wal::probe`] succeeds.
    pub stuck: bool,
    /// The frame being built (kept from one batch to the next).
    pub buf: Vec<u8>,
}

/// Opens (creating) one file, preallocated (once; on a disk without room for it the file
/// simply grows with its frames), with an empty log.
fn open_file(dir: &Path, path: &Path) -> std::io::Result<File> {
    let existed = path.exists();
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    let size = file.metadata()?.len();
    if size < PREALLOC {
        // Zeros written, not fallocate(): unwritten extents would turn into written ones
        // at each append, a metadata change that fdatasync must journal.
        let zeros = vec![0u8; 64 << 10];
        let mut at = size;
        let filled = loop {
            if at >= PREALLOC {
                break file.sync_all();
            }
            let n = (PREALLOC - at).min(zeros.len() as u64) as usize;
            if let Err(e) = file.write_all_at(&zeros[..n], at) {
                break Err(e);
            }
            at += n as u64;
        };
        if let Err(e) = filled {
            tracing::warn!(file = %path.display(), error = %e, "spool: cannot preallocate the write-ahead file; it grows with its frames instead");
            let _ = file.set_len(size);
        }
    }
    if !existed {
        // The directory entry of a new file, durably (once).
        File::open(dir)?.sync_all()?;
    }
    file.write_all_at(&END, 0)?;
    Ok(file)
}

impl Wal {
    /// Opens (creating) both files of `dir`, whose logs [`recover`] has emptied, and
    /// preallocates them; new frames go to the first.
    pub fn open(dir: &Path) -> std::io::Result<Wal> {
        let paths = FILE_NAMES.map(|n| dir.join(n));
        let files = [open_file(dir, &paths[0])?, open_file(dir, &paths[1])?];
        let path = paths[0].clone();
        Ok(Wal { files, paths, cur: 0, path, len: 0, tail: 0, other_len: 0, stuck: false, buf: Vec::new() })
    }

    fn file(&self) -> &File {
        &self.files[self.cur]
    }

    /// At a checkpoint (no frame in flight): the next frames go to the start of the other
    /// file, whose frames an earlier checkpoint covers durably; this file's frames stay until
    /// the checkpoint just made is durable (replay takes both files' live generations).
    pub fn switch(&mut self) {
        self.other_len = self.len;
        self.cur ^= 1;
        self.path = self.paths[self.cur].clone();
        self.len = 0;
        self.tail = 0;
        crate::metrics::spool_wal_bytes(0);
    }

    /// Appends `self.buf` (one frame; the end marker is added here) and makes it durable. On
    /// failure the end marker is written back at the last good frame's end; when even that
    /// fails, the file takes no append until [`Wal::probe`] succeeds.
    #[cfg(test)]
    pub fn append(&mut self) -> Result<(), StoreError> {
        let end = self.write()?;
        match self.file().sync_data() {
            Ok(()) => {
                self.synced(end);
                Ok(())
            }
            Err(source) => {
                self.unwrite();
                Err(StoreError::Wal { op: "fdatasync", source })
            }
        }
    }

    /// Writes `self.buf` (one frame; the end marker is added here) after the frames written
    /// so far, without syncing it; returns where it ends. It is durable once an `fdatasync`
    /// that started after this write succeeds ([`Wal::synced`]); until then [`Wal::len`]
    /// stays where it was. On failure the end marker is written back where the frame began.
    pub fn write(&mut self) -> Result<u64, StoreError> {
        if self.stuck {
            return Err(StoreError::Wal {
                op: "append",
                source: std::io::Error::other("a failed append could not be cut back yet"),
            });
        }
        let frame = self.buf.len();
        self.buf.extend_from_slice(&END);
        let written = self.files[self.cur].write_all_at(&self.buf, self.tail);
        self.buf.truncate(frame);
        match written {
            Ok(()) => {
                self.tail += frame as u64;
                Ok(self.tail)
            }
            Err(source) => {
                if self.file().write_all_at(&END, self.tail).is_err() {
                    self.stuck = true;
                }
                Err(StoreError::Wal { op: "write", source })
            }
        }
    }

    /// `fdatasync` of the file (through the writer's own description).
    pub fn sync(&self) -> std::io::Result<()> {
        self.file().sync_data()
    }

    /// The frames written up to `end` are durable.
    pub fn synced(&mut self, end: u64) {
        self.len = self.len.max(end);
        crate::metrics::spool_wal_bytes(self.len);
    }

    /// A sync failed: every frame written after the last durable one is taken back (the end
    /// marker goes at [`Wal::len`]; when it cannot be written, no append until
    /// [`Wal::probe`] succeeds).
    pub fn unwrite(&mut self) {
        self.tail = self.len;
        if self.file().write_all_at(&END, self.len).is_err() {
            self.stuck = true;
        }
    }

    /// Takes back the frames from `at` on (a frame whose transaction failed after its append):
    /// the next frame goes there, and an end marker hides what was cut (when it cannot be
    /// written, no append until [`Wal::probe`] succeeds). Not synced: the writer's replay
    /// reads the log up to `len` only, and after a crash the cut frame is at worst replayed,
    /// as if its transaction had succeeded.
    #[cfg(test)]
    pub fn cut(&mut self, at: u64) {
        if at >= self.len {
            return;
        }
        self.len = at;
        self.tail = at;
        crate::metrics::spool_wal_bytes(self.len);
        if self.file().write_all_at(&END, at).is_err() {
            self.stuck = true;
        }
    }

    /// After a checkpoint that covers both files: the next frame goes to the start of the
    /// current one (no write, no fsync needed: replay skips the frames the checkpoint covers).
    pub fn reset(&mut self) -> Result<(), StoreError> {
        self.len = 0;
        self.tail = 0;
        self.other_len = 0;
        crate::metrics::spool_wal_bytes(0);
        Ok(())
    }

    /// Proves the file takes writes: zeros (an empty log) at its start, fdatasynced. Call
    /// after a checkpoint covered everything it held.
    pub fn probe(&mut self) -> Result<(), StoreError> {
        let zeros = vec![0u8; PROBE_BYTES];
        self.file()
            .write_all_at(&zeros, 0)
            .and_then(|()| self.file().sync_data())
            .map_err(|source| StoreError::Wal { op: "probe", source })?;
        self.len = 0;
        self.tail = 0;
        self.stuck = false;
        Ok(())
    }

    /// After the redb file was reopened (rolled back to its last durable commit): writes the
    /// frames of both files into it, durably.
    pub fn replay_into(&self, db: &Database, at_least: u64) -> Result<Replayed, StoreError> {
        // The logs: the frames made durable, not the whole preallocated files, nor what a
        // failed append (or a cut frame) left past them.
        let log = |file: &File, len: u64| -> Result<Decoded, StoreError> {
            let mut bytes = vec![0u8; len as usize + HEADER];
            file.read_exact_at(&mut bytes[..len as usize], 0)
                .map_err(|source| StoreError::Wal { op: "read", source })?;
            Ok(decode(&bytes))
        };
        let decoded = combine(log(self.file(), self.len)?, log(&self.files[self.cur ^ 1], self.other_len)?);
        let r = apply(db, &decoded, at_least)?;
        log_replayed(&self.path, &r);
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(first: u64, n: u64) -> Vec<u8> {
        let recs: Vec<(u64, Vec<u8>, Vec<String>)> = (first..first + n)
            .map(|s| (s, vec![s as u8; 30 + s as usize], vec!["a".to_owned(), "bb".to_owned()]))
            .collect();
        let mut buf = Vec::new();
        encode(
            &mut buf,
            0,
            1234,
            first,
            &[7, u128::MAX],
            recs.iter().map(|(s, r, k)| (*s, r.as_slice(), k.as_slice())),
            &[],
        );
        buf
    }

    fn real_frame(first: u64, n: u64) -> Vec<u8> {
        real_frame_with(0, first, n, &["a"], &[])
    }

    fn real_frame_with(gen: u64, first: u64, n: u64, sinks: &[&str], book: &[Bookkeeping]) -> Vec<u8> {
        let recs: Vec<(u64, Vec<u8>, Vec<String>)> = (first..first + n)
            .map(|s| {
                let body = format!(r#"{{"type":"payment","amount":{s}}}"#);
                let ev =
                    crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
                let sinks = sinks.iter().map(|s| s.to_string()).collect();
                (s, super::super::record::encode(&crate::event::Envelope::new(ev, body.into())), sinks)
            })
            .collect();
        let mut buf = Vec::new();
        let ids = if n == 0 { vec![] } else { vec![u128::from(first)] };
        encode(
            &mut buf,
            gen,
            5000 + first,
            first,
            &ids,
            recs.iter().map(|(s, r, k)| (*s, r.as_slice(), k.as_slice())),
            book,
        );
        buf
    }

    #[test]
    fn replay_writes_what_redb_lacks_once_moves_the_checkpoint_and_empties_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = super::super::store::open_db(dir.path()).unwrap();
        let mut bytes = real_frame(0, 3);
        bytes.extend(real_frame(3, 2));
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let r = recover(&db, dir.path()).unwrap();
        assert_eq!((r.frames, r.newer, r.written, r.torn), (2, 5, 5, None));
        assert_eq!(read(dir.path()).unwrap().frames.len(), 0, "emptied");
        let rec = super::super::store::recover(&db, 0).unwrap();
        assert_eq!((rec.events, rec.pending["a"], rec.next_seq, rec.dedup.len()), (5, 5, 5, 2));
        assert!(rec.unreadable.is_empty());

        // The same frames again (an end marker that did not reach the disk): covered, nothing
        // written twice, even once the events were delivered and removed.
        let tx = db.begin_write().unwrap();
        tx.open_table(PENDING).unwrap().remove(("a", 1u64)).unwrap();
        tx.open_table(EVENTS).unwrap().remove(1u64).unwrap();
        tx.commit().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let r = recover(&db, dir.path()).unwrap();
        assert_eq!((r.frames, r.newer, r.written), (2, 0, 0));
        assert_eq!(super::super::store::recover(&db, 0).unwrap().events, 4);

        // A frame of the current generation (4: each replay moved it two on, past any frame
        // either file may hold), and a torn tail: the frame is written, the tail dropped.
        let mut bytes = real_frame_with(4, 5, 1, &["a"], &[]);
        bytes.extend(&real_frame_with(4, 6, 1, &["a"], &[])[..20]);
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let r = recover(&db, dir.path()).unwrap();
        assert_eq!((r.frames, r.newer, r.written, r.generation), (1, 1, 1, 6));
        assert_eq!(r.torn, Some((bytes.len() - 20) as u64));
        assert_eq!(super::super::store::next_seq(&db).unwrap(), 6);
    }

    fn done(sink: &str, seqs: &[u64]) -> Bookkeeping {
        Bookkeeping::Done { sink: sink.into(), seqs: seqs.to_vec() }
    }

    fn attempts(sink: &str, items: &[(u64, u32)]) -> Bookkeeping {
        Bookkeeping::Attempts { sink: sink.into(), items: items.to_vec() }
    }

    /// (seq, sink, attempts) of every pending row, and the seqs of the event rows.
    fn rows(db: &Database) -> (Vec<(u64, String, u32)>, Vec<u64>) {
        let tx = db.begin_read().unwrap();
        let pending = tx.open_table(PENDING).unwrap();
        let mut p: Vec<(u64, String, u32)> = pending
            .iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k.value().1, k.value().0.to_owned(), v.value())
            })
            .collect();
        p.sort();
        let events = tx.open_table(EVENTS).unwrap();
        let e = events.iter().unwrap().map(|r| r.unwrap().0.value()).collect();
        (p, e)
    }

    #[test]
    fn bookkeeping_of_the_current_generation_is_replayed_after_the_events_and_twice_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = super::super::store::open_db(dir.path()).unwrap();
        // Generation 0: events 0..4 for sinks a and b; then a bookkeeping-only frame: a has
        // delivered 0, 1 and 2, b has delivered 0 and tried 1 three times; then a frame with
        // event 4 and more bookkeeping (b delivered 2, an attempt count for a row already
        // gone, a removal of a row that never was).
        let mut bytes = real_frame_with(0, 0, 4, &["a", "b"], &[]);
        bytes.extend(real_frame_with(
            0,
            4,
            0,
            &[],
            &[done("a", &[0, 1, 2]), done("b", &[0]), attempts("b", &[(1, 3)])],
        ));
        bytes.extend(real_frame_with(
            0,
            4,
            1,
            &["a"],
            &[done("b", &[2]), attempts("a", &[(0, 9)]), done("zz", &[1]), attempts("zz", &[(3, 1)])],
        ));
        let d = decode(&bytes);
        assert_eq!((d.frames.len(), d.torn, d.book_rows(0), d.book_rows(1)), (3, false, (6, 3), (0, 0)));
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let r = recover(&db, dir.path()).unwrap();
        assert_eq!((r.frames, r.written, r.book, r.generation), (3, 5, 9, 2));
        let want = (
            vec![(1, "b".to_owned(), 3), (3, "a".to_owned(), 0), (3, "b".to_owned(), 0), (4, "a".to_owned(), 0)],
            vec![1, 3, 4],
        );
        assert_eq!(rows(&db), want, "0 and 2 are gone (every sink done), 1 kept for b with its count");
        assert!(super::super::store::recover(&db, 0).unwrap().unreadable.is_empty());

        // The same frames again: of an older generation now (the replay started a new one),
        // so nothing is applied — not even the events delivered since.
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let r = recover(&db, dir.path()).unwrap();
        assert_eq!((r.frames, r.newer, r.written, r.book, r.generation), (3, 0, 0, 0, 4));
        assert_eq!(rows(&db), want);

        // Applied twice within one generation (a replay whose commit was lost, then the
        // heal's redo): the same result; attempts never bring a row back.
        let tx = db.begin_write().unwrap();
        tx.open_table(META).unwrap().insert(GENERATION, 0u64).unwrap();
        tx.open_table(META).unwrap().insert(CHECKPOINT, 0u64).unwrap();
        tx.commit().unwrap();
        let r = apply(&db, &d, 0).unwrap();
        // 0 and 2, gone, are written again, and removed again by the bookkeeping after them.
        assert_eq!((r.written, r.book, r.generation), (2, 9, 2));
        assert_eq!(rows(&db), want);
        let tx = db.begin_write().unwrap();
        tx.open_table(META).unwrap().insert(GENERATION, 1u64).unwrap();
        tx.commit().unwrap();
        let mut twice = bytes.clone();
        for f in &d.frames {
            let mut b = Vec::new();
            let ev: Vec<(u64, &[u8], &[String])> =
                f.events.iter().map(|e| (e.seq, e.rec.as_slice(), e.sinks.as_slice())).collect();
            encode(&mut b, 1, f.at, f.first_seq, &f.ids, ev.into_iter(), &f.book);
            twice.extend(b);
        }
        twice.drain(..bytes.len());
        twice.extend(twice.clone());
        let d2 = decode(&twice);
        assert_eq!(d2.frames.len(), 3, "a frame's seqs older than the one before end the log");
        let r = apply(&db, &d2, 0).unwrap();
        assert_eq!((r.written, r.book), (0, 9));
        assert_eq!(rows(&db), want);
    }

    #[test]
    fn a_frame_of_another_generation_ends_the_log_and_first_format_frames_are_still_read() {
        // A bookkeeping-only frame has no seq: behind a torn end, an older generation's frame
        // of the same size would otherwise pass for the next one.
        let mut bytes = real_frame_with(5, 4, 0, &[], &[done("a", &[1])]);
        let one = bytes.len() as u64;
        bytes.extend(real_frame_with(4, 4, 0, &[], &[done("a", &[2])]));
        let d = decode(&bytes);
        assert_eq!((d.frames.len(), d.good, d.torn), (1, one, false));
        // A frame of the first format (magic WwA1: no generation, no bookkeeping).
        let mut v1 = Vec::new();
        v1.extend_from_slice(&MAGIC_V1);
        v1.extend_from_slice(&[0; 8]);
        v1.extend_from_slice(&77u64.to_le_bytes());
        v1.extend_from_slice(&3u64.to_le_bytes());
        v1.extend_from_slice(&0u32.to_le_bytes());
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&3u64.to_le_bytes());
        v1.extend_from_slice(&2u32.to_le_bytes());
        v1.extend_from_slice(b"hi");
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(b"a");
        let len = (v1.len() - HEADER) as u32;
        v1[4..8].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c(crc32c(0, &len.to_le_bytes()), &v1[HEADER..]);
        v1[8..12].copy_from_slice(&crc.to_le_bytes());
        let d = decode(&v1);
        assert_eq!(d.frames.len(), 1);
        let f = &d.frames[0];
        assert_eq!((f.gen, f.at, f.first_seq, f.book.len()), (None, 77, 3, 0));
        assert_eq!(f.events, vec![WalEvent { seq: 3, rec: b"hi".to_vec(), sinks: vec!["a".into()] }]);
    }

    #[test]
    fn appends_go_into_the_preallocated_file_and_a_checkpoint_starts_the_log_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open(dir.path()).unwrap();
        let size = || std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
        assert_eq!(size(), PREALLOC);
        w.buf = frame(0, 2);
        w.append().unwrap();
        w.buf = frame(2, 1);
        w.append().unwrap();
        assert_eq!(size(), PREALLOC, "appends do not change the file's size");
        assert_eq!(read(dir.path()).unwrap().events(), 3);
        // After a checkpoint the next frame overwrites the start; its end marker hides the
        // older frames behind it.
        w.reset().unwrap();
        w.buf = frame(3, 1);
        w.append().unwrap();
        let d = read(dir.path()).unwrap();
        assert_eq!((d.frames.len(), d.frames[0].first_seq, d.torn), (1, 3, false));
        w.reset().unwrap();
        w.probe().unwrap();
        assert_eq!((read(dir.path()).unwrap().frames.len(), w.len), (0, 0));
    }

    #[test]
    fn a_cut_frame_is_not_replayed_and_the_next_append_takes_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = super::super::store::open_db(dir.path()).unwrap();
        let mut w = Wal::open(dir.path()).unwrap();
        w.buf = real_frame(0, 2);
        w.append().unwrap();
        let good = w.len;
        // Its redb transaction failed: refused, taken back.
        w.buf = real_frame_with(0, 2, 1, &["a"], &[done("a", &[0])]);
        w.append().unwrap();
        w.cut(good);
        assert_eq!((w.len, w.stuck), (good, false));
        assert_eq!(read(dir.path()).unwrap().frames.len(), 1, "an end marker hides it");
        w.buf = real_frame_with(0, 2, 1, &["a"], &[]);
        w.append().unwrap();
        let d = read(dir.path()).unwrap();
        assert_eq!((d.frames.len(), d.frames[1].first_seq, d.frames[1].book.len(), d.torn), (2, 2, 0, false));
        // Cut again: the writer's replay reads the log up to its length only (even where the
        // end marker could not be written).
        w.cut(good);
        std::fs::OpenOptions::new().write(true).open(&w.path).unwrap().write_all_at(&real_frame(2, 1), good).unwrap();
        let r = w.replay_into(&db, 0).unwrap();
        assert_eq!((r.frames, r.written, r.book), (1, 2, 0));
        let (pending, events) = rows(&db);
        assert_eq!((pending.len(), events), (2, vec![0, 1]));
    }

    #[test]
    fn an_append_that_fails_on_a_full_disk_is_cut_back_and_the_next_one_follows_the_last_good_frame() {
        let fs = super::super::tests::Tmpfs::mount("1m");
        let mut w = Wal::open(fs.0.path()).unwrap();
        w.buf = frame(0, 2);
        w.append().unwrap();
        let good = w.len;
        fs.fill();
        w.buf = frame(2, 300);
        let err = w.append().unwrap_err();
        assert!(err.to_string().starts_with("write-ahead file "), "{err}");
        assert_eq!((w.len, w.stuck), (good, false));
        let d = decode(&std::fs::read(&w.path).unwrap());
        assert_eq!((d.frames.len(), d.good, d.torn), (1, good, false), "the partial frame was cut away");
        fs.free();
        w.append().unwrap();
        let d = decode(&std::fs::read(&w.path).unwrap());
        assert_eq!((d.frames.len(), d.events(), d.torn), (2, 302, false));
    }

    #[test]
    fn a_log_longer_than_the_first_read_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = frame(0, 1500);
        assert!(bytes.len() > 1 << 20);
        bytes.extend(frame(1500, 2));
        bytes.extend(vec![0u8; 4096]);
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let d = read(dir.path()).unwrap();
        assert_eq!((d.frames.len(), d.events(), d.torn), (2, 1502, false));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder() {
        let mut rng = fastrand::Rng::with_seed(14);
        let valid = frame(0, 4);
        for i in 0..3000 {
            let mut b: Vec<u8> = if i % 2 == 0 {
                let n = rng.usize(0..300);
                (0..n).map(|_| rng.u8(..)).collect()
            } else {
                let mut b = valid.clone();
                for _ in 0..rng.usize(1..4) {
                    let at = rng.usize(..b.len());
                    b[at] = rng.u8(..);
                }
                b
            };
            if i % 3 == 0 {
                b.splice(0..0, MAGIC);
            }
            let d = decode(&b);
            assert!(d.good as usize <= b.len());
        }
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(0, b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(crc32c(0, b"12345"), b"6789"), 0xE306_9283);
    }

    #[test]
    fn frames_round_trip() {
        let mut bytes = frame(0, 3);
        bytes.extend(frame(3, 2));
        let d = decode(&bytes);
        assert_eq!((d.frames.len(), d.events(), d.good, d.torn), (2, 5, bytes.len() as u64, false));
        let f = &d.frames[1];
        assert_eq!((f.gen, f.at, f.first_seq, f.ids.clone()), (Some(0), 1234, 3, vec![7, u128::MAX]));
        assert_eq!(f.events[1], WalEvent { seq: 4, rec: vec![4; 34], sinks: vec!["a".into(), "bb".into()] });
    }

    #[test]
    fn a_torn_tail_ends_the_file_and_keeps_the_frames_before_it() {
        let first = frame(0, 3);
        let mut bytes = first.clone();
        bytes.extend(frame(3, 2));
        for cut in first.len() + 1..bytes.len() {
            let d = decode(&bytes[..cut]);
            assert_eq!((d.frames.len(), d.good, d.torn), (1, first.len() as u64, true), "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_in_a_frame_ends_the_file_there() {
        let first = frame(0, 3);
        let mut bytes = first.clone();
        bytes.extend(frame(3, 2));
        for i in first.len()..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            let d = decode(&b);
            assert_eq!((d.frames.len(), d.good), (1, first.len() as u64), "byte {i}");
            assert!(d.torn);
        }
    }

    #[test]
    fn trailing_zeros_are_a_clean_end_and_stale_frames_are_not_read() {
        let mut bytes = frame(10, 3);
        let good = bytes.len() as u64;
        bytes.extend(vec![0u8; 4096]);
        let d = decode(&bytes);
        assert_eq!((d.frames.len(), d.good, d.torn), (1, good, false));
        // The end marker hides whatever follows it; an older frame right after a newer one
        // (an end marker lost) ends the log as well.
        let mut bytes = frame(10, 3);
        bytes.extend(END);
        bytes.extend(frame(13, 3));
        assert_eq!(decode(&bytes).frames.len(), 1);
        let mut bytes = frame(10, 3);
        bytes.extend(frame(2, 3));
        let d = decode(&bytes);
        assert_eq!((d.frames.len(), d.good, d.torn), (1, good, false));
        assert_eq!(decode(&[]).frames.len(), 0);
        assert!(!decode(&[0; 7]).torn);
    }

    /// `payload` behind a valid header (length and CRC), so that damage reaches the parser.
    fn with_header(magic: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_le_bytes();
        let mut out = magic.to_vec();
        out.extend_from_slice(&len);
        out.extend_from_slice(&crc32c(crc32c(0, &len), payload).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// What every decode must give: `good` inside the bytes, and the frames kept re-encode to
    /// exactly the bytes they were read from.
    fn check_decoded(bytes: &[u8]) -> Decoded {
        let d = decode(bytes);
        assert!(d.good as usize <= bytes.len());
        let mut again = Vec::new();
        for f in &d.frames {
            let events = f.events.iter().map(|e| (e.seq, e.rec.as_slice(), e.sinks.as_slice()));
            encode(&mut again, f.gen.unwrap_or(0), f.at, f.first_seq, &f.ids, events, &f.book);
        }
        if d.frames.iter().all(|f| f.gen.is_some()) {
            assert_eq!(&again[..], &bytes[..d.good as usize]);
        }
        d
    }

    #[test]
    fn a_frame_that_claims_the_largest_seq_ends_the_log_as_torn_instead_of_overflowing() {
        let body = r#"{"type":"payment","amount":1}"#;
        let ev = crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
        let rec = super::super::record::encode(&crate::event::Envelope::new(ev, body.into()));
        let sinks = vec!["a".to_string()];
        let mut bytes = real_frame_with(4, 1, 2, &["a"], &[]);
        let good = bytes.len() as u64;
        let last = std::iter::once((u64::MAX, rec.as_slice(), sinks.as_slice()));
        encode(&mut bytes, 4, 6000, u64::MAX, &[], last, &[]);
        let d = decode(&bytes);
        assert_eq!(d.frames.len(), 1, "the first, whole frame is kept");
        assert!(d.torn, "the frame claiming seq u64::MAX is damage");
        assert_eq!(d.good, good);
    }

    #[test]
    fn mutations_of_real_frames_never_panic_the_decoder() {
        let book = [
            Bookkeeping::Done { sink: "a".into(), seqs: vec![1, 2] },
            Bookkeeping::Attempts { sink: "bb".into(), items: vec![(3, 2)] },
        ];
        let first = real_frame_with(4, 1, 3, &["a", "bb"], &book);
        let second = real_frame_with(4, 4, 2, &["a"], &[]);
        let mut rng = fastrand::Rng::with_seed(1414);
        let mut kept = [0usize; 3];
        for i in 0..4000 {
            // The first frame's payload, damaged: bit flips, a byte set, cut, cut out, put in.
            let mut p = first[HEADER..].to_vec();
            for _ in 0..rng.usize(1..4) {
                match rng.u8(..5) {
                    0 => {
                        let at = rng.usize(..p.len());
                        p[at] ^= 1 << rng.u8(..8);
                    }
                    1 => {
                        let at = rng.usize(..p.len());
                        p[at] = [0, 0xff, 1, 0x7f, 0x80][rng.usize(..5)];
                    }
                    2 => p.truncate(rng.usize(..=p.len())),
                    3 if !p.is_empty() => {
                        p.remove(rng.usize(..p.len()));
                    }
                    _ => p.insert(rng.usize(..=p.len()), rng.u8(..)),
                }
                if p.is_empty() {
                    p.push(0);
                }
            }
            // Mostly behind a valid header (the parser sees the damage); else as damaged on disk.
            let mut bytes = match i % 4 {
                0 => {
                    let mut b = first.clone();
                    b.truncate(HEADER);
                    b.extend_from_slice(&p);
                    b
                }
                1 => with_header(MAGIC_V1, &p),
                _ => with_header(MAGIC, &p),
            };
            bytes.extend_from_slice(&second);
            if i % 5 == 0 {
                bytes.truncate(rng.usize(..=bytes.len()));
            }
            kept[check_decoded(&bytes).frames.len().min(2)] += 1;
        }
        // The damage did reach past the checks some of the time.
        assert!(kept.iter().all(|n| *n > 0), "{kept:?}");
    }
}
