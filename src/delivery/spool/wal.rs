//! The write-ahead file in front of the redb file (`spool.wal` beside `spool.redb`).
//!
//! Each writer batch that accepts events is made durable by **one append of one checksummed
//! frame** to this file and one `fdatasync`; the batch's redb transaction is committed without
//! fsync (`Durability::None`). About once a second (or when this file passes
//! [`CHECKPOINT_BYTES`]) a durable redb commit is the **checkpoint**: it records in the `meta`
//! table ([`CHECKPOINT`]) the seq below which redb holds everything durably, and the next frame
//! is written at the start of the file again (nothing is truncated or synced for it: replay
//! skips what the checkpoint covers).
//!
//! The file is **preallocated** ([`PREALLOC`] bytes of zeros, written once): an append then
//! neither changes the file's size nor its block map, so its `fdatasync` flushes the data
//! without a journal commit for the inode (measured: docs/performance.md). Each append writes
//! the frame followed by [`END`] (12 zero bytes, the header of no frame), which marks the end of
//! the log whatever older frames follow it.
//!
//! A frame: magic (4 bytes, [`MAGIC`]), payload length (u32 LE), CRC-32C of the length and the
//! payload (u32 LE), then the payload: accepted at (unix ms, u64), the seq of the batch's first
//! event (u64: with the time, the key of its `dedup_batches` row), the dedup ids (u32 count,
//! 16 bytes each), the events (u32 count; each: seq u64, record length u32, the stored record,
//! sink count u32, each sink as u32 length + UTF-8). All integers little-endian. The seqs of a
//! file's frames only grow: they are its frame counter.
//!
//! **Replay** ([`recover`], at every open of the spool, and [`Wal::replay_into`] in the writer's
//! heal) reads frames while they check out; a zero header is the clean end, and the first frame
//! that does not check out (a torn tail: its `fdatasync` never completed, so it was never
//! acknowledged) ends the log too, with a warning. The events of the frames newer than the checkpoint that redb does not hold
//! (with their pending rows and dedup row) are written in one durable commit that moves the
//! checkpoint past them; then the file is truncated.

use super::guard;
use super::store::{Op as _, StoreError, DEDUP_BATCHES, EVENTS, META, PENDING};
use redb::{Database, ReadableTable};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "spool.wal";
/// `meta` key: every event with a lower seq is in redb durably (the write-ahead file's frames
/// below it are covered).
pub const CHECKPOINT: &str = "wal_checkpoint";
/// A checkpoint is due once the file holds this many bytes, whatever the time.
pub const CHECKPOINT_BYTES: u64 = 4 << 20;
/// The file's preallocated size (a batch that goes past it grows the file, until the
/// checkpoint that follows brings the next frames back to its start).
pub const PREALLOC: u64 = CHECKPOINT_BYTES + (1 << 20);
pub const MAGIC: [u8; 4] = *b"WwA1";
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

/// What one batch's transaction wrote that must survive a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub at: u64,
    pub first_seq: u64,
    pub ids: Vec<u128>,
    pub events: Vec<WalEvent>,
}

/// Appends the frame of one batch to `buf`.
pub fn encode<'a>(
    buf: &mut Vec<u8>,
    at: u64,
    first_seq: u64,
    ids: &[u128],
    events: impl Iterator<Item = (u64, &'a [u8], &'a [String])>,
) {
    let start = buf.len();
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&[0; 8]);
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
            // The seqs of a log only grow: an older frame is what an earlier log left behind.
            Some((f, _)) if !out.frames.is_empty() && f.events.first().is_some_and(|e| e.seq < next_seq) => {
                return out;
            }
            Some((f, used)) if !f.events.is_empty() => {
                next_seq = f.events.last().map_or(next_seq, |e| e.seq + 1);
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
    if b.len() < HEADER || b[..4] != MAGIC {
        return None;
    }
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
    if !r.0.is_empty() {
        return None;
    }
    Some((Frame { at, first_seq, ids, events }, HEADER + n))
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

/// CRC-32C (Castagnoli), table-driven: a few lines instead of a dependency.
pub fn crc32c(crc: u32, data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    let mut c = !crc;
    for b in data {
        c = TABLE[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The checkpoint recorded in redb (0 when none yet).
pub fn checkpoint(tx: &redb::ReadTransaction) -> Result<u64, StoreError> {
    let meta = tx.open_table(META).op("open meta")?;
    Ok(meta.get(CHECKPOINT).op("read meta")?.map_or(0, |v| v.value()))
}

/// What replaying a file's frames into redb did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Replayed {
    pub frames: usize,
    /// Events found in the frames newer than the checkpoint, and of those the ones written
    /// into redb now (the others were there already).
    pub newer: u64,
    pub written: u64,
    /// The log ended in a torn or damaged frame at this offset (dropped).
    pub torn: Option<u64>,
}

/// Writes the events of `decoded` newer than the checkpoint that redb does not hold yet, with
/// their pending rows and dedup rows, in one durable commit that also moves the checkpoint past
/// every frame (and past `at_least`, the writer's next seq).
pub fn apply(db: &Database, decoded: &Decoded, at_least: u64) -> Result<Replayed, StoreError> {
    guard::catch(|| {
        let tx = db.begin_write().op("begin")?;
        let torn = decoded.torn.then_some(decoded.good);
        let mut r = Replayed { frames: decoded.frames.len(), torn, ..Default::default() };
        {
            let mut meta = tx.open_table(META).op("open meta")?;
            let checkpoint = meta.get(CHECKPOINT).op("read meta")?.map_or(0, |v| v.value());
            let mut events = tx.open_table(EVENTS).op("open events")?;
            let mut pending = tx.open_table(PENDING).op("open pending")?;
            let mut dedup = tx.open_table(DEDUP_BATCHES).op("open dedup")?;
            let mut next = checkpoint.max(at_least);
            if let Some((k, _)) = events.last().op("read events")? {
                next = next.max(k.value() + 1);
            }
            for f in &decoded.frames {
                if f.events.last().is_none_or(|e| e.seq < checkpoint) {
                    continue;
                }
                for e in f.events.iter().filter(|e| e.seq >= checkpoint) {
                    r.newer += 1;
                    next = next.max(e.seq + 1);
                    if events.get(e.seq).op("read events")?.is_some() {
                        continue;
                    }
                    events.insert(e.seq, e.rec.as_slice()).op("write event")?;
                    for sink in &e.sinks {
                        pending.insert((sink.as_str(), e.seq), 0u32).op("write pending")?;
                    }
                    r.written += 1;
                }
                if !f.ids.is_empty() && dedup.get((f.at, f.first_seq)).op("read dedup")?.is_none() {
                    dedup
                        .insert((f.at, f.first_seq), super::store::dedup_batch(&f.ids).as_slice())
                        .op("write dedup")?;
                }
            }
            meta.insert(CHECKPOINT, next).op("write meta")?;
        }
        tx.commit().op("commit")?;
        Ok(r)
    })?
}

/// Reads the write-ahead file beside a spool (absent: nothing). Its first 64 KiB only, when
/// the log ends there (the rest of the preallocated file is not read at each start, and no
/// large buffer raises the allocator's mmap threshold, which would keep later allocations
/// resident).
pub fn read(dir: &Path) -> std::io::Result<Decoded> {
    use std::io::Read;
    let f = match File::open(dir.join(FILE_NAME)) {
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

/// At an open of the spool: replays the write-ahead file beside `db` into it (durably), then
/// empties the log (an end marker at its start). Logs what it found.
pub fn recover(db: &Database, dir: &Path) -> Result<Replayed, StoreError> {
    let path = dir.join(FILE_NAME);
    let decoded = read(dir).map_err(|source| StoreError::Wal { op: "read", source })?;
    if decoded.frames.is_empty() && !decoded.torn {
        return Ok(Replayed::default());
    }
    let r = apply(db, &decoded, 0)?;
    log(&path, &r);
    let f =
        std::fs::OpenOptions::new().write(true).open(&path).map_err(|source| StoreError::Wal { op: "open", source })?;
    f.write_all_at(&END, 0).map_err(|source| StoreError::Wal { op: "write", source })?;
    Ok(r)
}

fn log(path: &Path, r: &Replayed) {
    if let Some(at) = r.torn {
        tracing::warn!(file = %path.display(), frames = r.frames, torn_at = at, "spool: the write-ahead file ends in a torn or damaged frame (its batch was never acknowledged); the frames before it are kept, the tail is dropped");
    }
    if r.written > 0 {
        tracing::info!(file = %path.display(), frames = r.frames, events = r.written, "spool: events of the write-ahead file replayed into the spool");
    }
}

/// The writer's handle on the file: appends at the last good offset, never after a partial
/// frame.
pub(crate) struct Wal {
    file: File,
    pub path: PathBuf,
    /// End of the last frame made durable (where the next one goes).
    pub len: u64,
    /// A failed append could not be cut back: no append until [`Wal::probe`] succeeds.
    pub stuck: bool,
    /// The frame being built (kept from one batch to the next).
    pub buf: Vec<u8>,
}

impl Wal {
    /// Opens (creating) the file of `dir`, whose log [`recover`] has emptied, and preallocates
    /// it (once; on a disk without room for it the file simply grows with its frames).
    pub fn open(dir: &Path) -> std::io::Result<Wal> {
        let path = dir.join(FILE_NAME);
        let existed = path.exists();
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
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
        Ok(Wal { file, path, len: 0, stuck: false, buf: Vec::new() })
    }

    /// Appends `self.buf` (one frame; the end marker is added here) and makes it durable. On
    /// failure the end marker is written back at the last good frame's end; when even that
    /// fails, the file takes no append until [`Wal::probe`] succeeds.
    pub fn append(&mut self) -> Result<(), StoreError> {
        if self.stuck {
            return Err(StoreError::Wal {
                op: "append",
                source: std::io::Error::other("a failed append could not be cut back yet"),
            });
        }
        let frame = self.buf.len();
        self.buf.extend_from_slice(&END);
        let written =
            self.file.write_all_at(&self.buf, self.len).map_err(|source| StoreError::Wal { op: "write", source });
        self.buf.truncate(frame);
        let synced =
            written.and_then(|()| self.file.sync_data().map_err(|source| StoreError::Wal { op: "fdatasync", source }));
        match synced {
            Ok(()) => {
                self.len += frame as u64;
                crate::metrics::spool_wal_bytes(self.len);
                Ok(())
            }
            Err(e) => {
                if self.file.write_all_at(&END, self.len).is_err() {
                    self.stuck = true;
                }
                Err(e)
            }
        }
    }

    /// After a checkpoint: the next frame goes to the start of the file (no write, no fsync
    /// needed: replay skips the frames the checkpoint covers).
    pub fn reset(&mut self) -> Result<(), StoreError> {
        self.len = 0;
        crate::metrics::spool_wal_bytes(0);
        Ok(())
    }

    /// Proves the file takes writes: zeros (an empty log) at its start, fdatasynced. Call
    /// after a checkpoint covered everything it held.
    pub fn probe(&mut self) -> Result<(), StoreError> {
        let zeros = vec![0u8; PROBE_BYTES];
        self.file
            .write_all_at(&zeros, 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| StoreError::Wal { op: "probe", source })?;
        self.len = 0;
        self.stuck = false;
        Ok(())
    }

    /// After the redb file was reopened (rolled back to its last durable commit): writes the
    /// frames of this file into it, durably.
    pub fn replay_into(&self, db: &Database, at_least: u64) -> Result<Replayed, StoreError> {
        let size = self.file.metadata().map_err(|source| StoreError::Wal { op: "read", source })?.len();
        // The log, not the whole preallocated file (a failed append may have left a partial
        // frame past it: read a little more than the log).
        let want = size.min(self.len + FIRST_READ);
        let mut bytes = vec![0u8; want as usize];
        self.file.read_exact_at(&mut bytes, 0).map_err(|source| StoreError::Wal { op: "read", source })?;
        let mut decoded = decode(&bytes);
        // What lies past the last good frame is the rest of a failed append: expected here.
        if decoded.good <= self.len {
            decoded.torn = false;
        }
        let r = apply(db, &decoded, at_least)?;
        log(&self.path, &r);
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
        encode(&mut buf, 1234, first, &[7, u128::MAX], recs.iter().map(|(s, r, k)| (*s, r.as_slice(), k.as_slice())));
        buf
    }

    fn real_frame(first: u64, n: u64) -> Vec<u8> {
        let recs: Vec<(u64, Vec<u8>, Vec<String>)> = (first..first + n)
            .map(|s| {
                let body = format!(r#"{{"type":"payment","amount":{s}}}"#);
                let ev =
                    crate::event::normalise(body.as_bytes(), None, &Default::default(), chrono::Utc::now()).unwrap();
                (s, super::super::record::encode(&crate::event::Envelope::new(ev, body.into())), vec!["a".to_owned()])
            })
            .collect();
        let mut buf = Vec::new();
        encode(
            &mut buf,
            5000 + first,
            first,
            &[u128::from(first)],
            recs.iter().map(|(s, r, k)| (*s, r.as_slice(), k.as_slice())),
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

        // A newer frame after them, and a torn tail: the frame is written, the tail dropped.
        bytes.extend(real_frame(5, 1));
        bytes.extend(&real_frame(6, 1)[..20]);
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let r = recover(&db, dir.path()).unwrap();
        assert_eq!((r.frames, r.newer, r.written), (3, 1, 1));
        assert_eq!(r.torn, Some((bytes.len() - 20) as u64));
        assert_eq!(super::super::store::next_seq(&db).unwrap(), 6);
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
        assert_eq!((f.at, f.first_seq, f.ids.clone()), (1234, 3, vec![7, u128::MAX]));
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
}
