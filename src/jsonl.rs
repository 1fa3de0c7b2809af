//! Append-only JSON Lines files, and the durable append they share with the file sink.
//!
//! [`JsonlFile`] holds what must never be lost: bodies refused with 400 (`rejected.jsonl`,
//! rotated at `delivery.max_rejected_bytes`) and dead letters. An append returns `Ok` only
//! once its line is on disk (`fdatasync`), and a new file's (or directory's) entry too.
//!
//! Invariants of every append here (the file sink's too):
//! - a failed append leaves the file as it was: it is cut back to its length before, so a
//!   retry can never merge two records into one unparsable line;
//! - a file found without a final newline (a host crash mid-write, a failed cut) gets one
//!   before the next record, which therefore starts a line of its own.

use serde::Serialize;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct JsonlFile {
    path: PathBuf,
    /// Rotate to `<name>.1` before a line would take the file past this size.
    rotate_at: Option<u64>,
    /// The open file; the lock also keeps appends in order and whole, even when the caller
    /// is cancelled (the blocking write owns the guard until it is done).
    file: Arc<tokio::sync::Mutex<Option<File>>>,
}

impl JsonlFile {
    /// A file that only grows (dead letters).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        JsonlFile { path: path.into(), rotate_at: None, file: Arc::default() }
    }

    /// A file rotated to `<name>.1` (replacing the previous one) before it would grow past
    /// `max_bytes`: at most about twice `max_bytes` on disk, the newest records kept.
    pub fn rotated(path: impl Into<PathBuf>, max_bytes: u64) -> Self {
        JsonlFile { path: path.into(), rotate_at: Some(max_bytes), file: Arc::default() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The previous generation of a rotated file.
    pub fn previous(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    /// Appends one record as one line and makes it durable. On error the file is as before.
    pub async fn append<T: Serialize>(&self, record: &T) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut guard = self.file.clone().lock_owned().await;
        let (path, previous, rotate_at) = (self.path.clone(), self.previous(), self.rotate_at);
        tokio::task::spawn_blocking(move || {
            let slot = &mut *guard;
            if let (Some(max), Some(f)) = (rotate_at, slot.as_ref()) {
                let len = f.metadata()?.len();
                if len > 0 && len + line.len() as u64 > max {
                    *slot = None;
                    std::fs::rename(&path, &previous)?;
                    sync_parent(&path)?;
                    tracing::info!(file = %path.display(), previous = %previous.display(), bytes = len, "rotated");
                }
            }
            if slot.is_none() {
                *slot = Some(open_append(&path, true)?);
            }
            let res = append_whole(slot.as_ref().expect("opened above"), &line, true);
            if res.is_err() {
                // Open afresh next time (the disk may have been remounted, the file moved).
                *slot = None;
            }
            res
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// Appends `bytes` to `file` (opened for appending) as one piece, then `fdatasync`s when
/// `sync`. On any failure the file is cut back to its length before, so that no partial line
/// stays behind; the caller should open the file afresh before the next append.
pub fn append_whole(file: &File, bytes: &[u8], sync: bool) -> io::Result<()> {
    let sync_data: &SyncFn = &File::sync_data;
    Tail::default().append_reserving(file, bytes, sync.then_some(sync_data), false).map(drop)
}

/// How an append makes its bytes durable: [`File::sync_data`] (tests put a failing one).
pub type SyncFn = dyn Fn(&File) -> io::Result<()>;

/// Blocks reserved past a file's end at most: an eighth of its length, up to this.
pub(crate) const RESERVE_AHEAD: u64 = 1 << 20;

/// The appends to one open file that reserve blocks *ahead* of its end: an eighth of the
/// file's length, at most 1 MiB, so that a write seldom needs a new allocation (and the
/// `fdatasync` after it no extent allocation to commit; one `fallocate` per batch measured
/// about as slow again as the write and sync it guards). A small file reserves only what
/// each write takes, and what stays allocated past the end once the file is closed is at
/// most an eighth of it.
#[derive(Debug, Default)]
pub struct Tail {
    /// Blocks are allocated up to this offset (`FALLOC_FL_KEEP_SIZE`: past the file's end).
    reserved: u64,
    /// The file's length after the last append here; found shorter, it was cut by someone
    /// else, and the blocks past its end with it.
    len: u64,
}

impl Tail {
    /// [`append_whole`], with blocks reserved ahead, and `sync` (when given) as the sync.
    pub fn append(&mut self, file: &File, bytes: &[u8], sync: Option<&SyncFn>) -> io::Result<()> {
        self.append_reserving(file, bytes, sync, true).map(drop)
    }

    /// [`Tail::append`] without a sync: returns the offset the bytes start at in a regular
    /// file (the offset to [`Tail::cut`] back to should a later sync fail), `None` in a stream
    /// (`/dev/stdout`), which can be neither synced nor cut back.
    pub fn append_unsynced(&mut self, file: &File, bytes: &[u8]) -> io::Result<Option<u64>> {
        self.append_reserving(file, bytes, None, true)
    }

    /// Cuts `file` back to `len` (what an append that was not made durable had added, and
    /// everything after it) and syncs that; the blocks reserved past the end go with it.
    pub fn cut(&mut self, file: &File, len: u64) -> io::Result<()> {
        self.reserved = 0;
        self.len = len;
        file.set_len(len)?;
        file.sync_data()
    }

    fn append_reserving(
        &mut self,
        file: &File,
        bytes: &[u8],
        sync: Option<&SyncFn>,
        ahead: bool,
    ) -> io::Result<Option<u64>> {
        let meta = file.metadata()?;
        if !meta.is_file() {
            // A pipe or a terminal (`/dev/stdout`): a stream can be neither synced nor cut back.
            return (&*file).write_all(bytes).map(|()| None);
        }
        let before = meta.len();
        let end = before.saturating_add(bytes.len() as u64);
        if before < self.len {
            self.reserved = 0;
        }
        // Blocks first: on a full disk this fails before a byte is written, so a reader never
        // sees a partial line, not even for a moment. The cut below stays for the other errors
        // and for filesystems without `fallocate`.
        if end > self.reserved {
            let more = if ahead { (before / 8).min(RESERVE_AHEAD) } else { 0 };
            match reserve(file, before, bytes.len() as u64 + more) {
                Ok(()) => self.reserved = end + more,
                // Not enough room to reserve ahead: what this write needs may still fit.
                Err(e) if more > 0 && e.raw_os_error() == Some(libc::ENOSPC) => {
                    reserve(file, before, bytes.len() as u64)?;
                    self.reserved = end;
                }
                Err(e) => return Err(e),
            }
        }
        let res = (&*file).write_all(bytes).and_then(|()| sync.map_or(Ok(()), |sync| sync(file)));
        if let Err(e) = res {
            // If even the cut fails, the next open finds no final newline and adds one. The
            // cut frees the blocks reserved past the end too.
            self.reserved = 0;
            self.len = before;
            if file.set_len(before).is_ok() && sync.is_some() {
                let _ = file.sync_data();
            }
            return Err(e);
        }
        self.len = end;
        Ok(Some(before))
    }
}

/// Allocates the blocks that `len` bytes written at `offset` will need, without changing the
/// file's length (`FALLOC_FL_KEEP_SIZE`). Filesystems that cannot do it are let through.
#[cfg(target_os = "linux")]
pub(crate) fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Ok(());
    };
    if len == 0 {
        return Ok(());
    }
    // SAFETY: a valid open descriptor; the call only allocates blocks past the file's end.
    if unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset, len) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn reserve(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Ok(())
}

/// Opens `path` for appending (and reading its last byte), creating it and its directories
/// when missing. With `durable`, every directory entry created on the way is fsynced, so a
/// host crash cannot take away a file whose lines were confirmed. A file whose last line has
/// no newline gets one first.
pub fn open_append(path: &Path, durable: bool) -> io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).append(true);
    let file = match opts.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                create_dirs(dir, durable)?;
            }
            let f = opts.create(true).open(path)?;
            if durable {
                sync_parent(path)?;
            }
            f
        }
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let mut last = [0u8];
    if len > 0 && file.read_at(&mut last, len - 1)? == 1 && last[0] != b'\n' {
        tracing::warn!(file = %path.display(), "the last line has no newline (an interrupted write); starting a new line");
        append_whole(&file, b"\n", durable)?;
    }
    Ok(file)
}

/// `create_dir_all`, with each new directory's entry fsynced in its parent when `durable`.
fn create_dirs(dir: &Path, durable: bool) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    loop {
        match std::fs::metadata(d) {
            // Something that is not a directory: creating below it fails with ENOTDIR.
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(d);
                match d.parent() {
                    Some(p) if !p.as_os_str().is_empty() => d = p,
                    _ => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) if durable => sync_parent(d)?,
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes `path`'s directory entry durable: fsync of the directory that holds it.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// The body as a JSON value for a record: text when it is UTF-8, hex otherwise.
pub fn body_fields(body: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(body) {
        Ok(s) => (Some(s.to_owned()), None),
        Err(_) => (None, Some(hex::encode(body))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[tokio::test]
    async fn records_are_appended_one_a_line_in_new_directories() {
        let dir = tempfile::tempdir().unwrap();
        let f = JsonlFile::new(dir.path().join("a/b/dead.jsonl"));
        for n in 0..3 {
            f.append(&json!({ "n": n })).await.unwrap();
        }
        assert_eq!(lines(f.path()), [json!({"n": 0}), json!({"n": 1}), json!({"n": 2})]);
    }

    #[tokio::test]
    async fn a_file_without_a_final_newline_gets_one_before_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.jsonl");
        std::fs::write(&path, "{\"n\":0}\n{\"torn\":").unwrap();
        JsonlFile::new(&path).append(&json!({ "n": 1 })).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"n\":0}\n{\"torn\":\n{\"n\":1}\n");
    }

    #[test]
    fn a_stream_such_as_stdout_takes_lines_without_a_sync() {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors, each then owned by one `File`.
        let (read, write) = unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        let f = open_append(Path::new(&format!("/proc/self/fd/{}", fds[1])), true).unwrap();
        append_whole(&f, b"{}\n", true).unwrap();
        drop((f, write));
        assert_eq!(std::io::read_to_string(read).unwrap(), "{}\n");
    }

    #[tokio::test]
    async fn a_rotated_file_keeps_one_previous_generation_within_twice_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let f = JsonlFile::rotated(dir.path().join("rejected.jsonl"), 1000);
        let record = json!({ "body": "x".repeat(90) }); // ~100 bytes a line
        for _ in 0..55 {
            f.append(&record).await.unwrap();
        }
        let (now, before) =
            (std::fs::metadata(f.path()).unwrap().len(), std::fs::metadata(f.previous()).unwrap().len());
        assert!(now <= 1000 && before <= 1000 && before > 900, "{now} {before}");
        assert!(lines(f.path()).iter().chain(&lines(&f.previous())).all(|l| *l == record));
        assert!(!dir.path().join("rejected.jsonl.2").exists());
    }

    #[test]
    fn a_tail_reserves_ahead_in_proportion_and_notices_a_cut() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let file = open_append(&path, true).unwrap();
        let mut tail = Tail::default();
        let line = [b"x".repeat(999), b"\n".to_vec()].concat();
        for _ in 0..2000 {
            tail.append(&file, &line, Some(&File::sync_data)).unwrap();
        }
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 2_000_000);
        // Reserved ahead, but never more than an eighth of the file (plus block rounding).
        let allocated = meta.blocks() * 512;
        assert!(allocated <= 2_000_000 + 2_000_000 / 8 + 8192, "{allocated} bytes allocated");
        assert!(tail.reserved > meta.len() || allocated == 0, "{tail:?}");
        // Someone else cuts the file: the reservation is not trusted any more.
        file.set_len(10).unwrap();
        tail.append(&file, b"\n", Some(&File::sync_data)).unwrap();
        assert_eq!(tail.reserved, 11 + 10 / 8);
        assert_eq!(std::fs::read(&path).unwrap().len(), 11);
        assert!(std::fs::read(&path).unwrap().iter().take(10).all(|b| *b == b'x'));
    }

    #[test]
    fn a_failed_sync_cuts_the_file_back_and_drops_the_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let file = open_append(&path, true).unwrap();
        let mut tail = Tail::default();
        tail.append(&file, b"{}\n", Some(&File::sync_data)).unwrap();
        let failing: &SyncFn = &|_| Err(io::Error::from_raw_os_error(libc::EIO));
        let err = tail.append(&file, b"{\"torn\":1}\n", Some(failing)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(std::fs::read(&path).unwrap(), b"{}\n");
        assert_eq!(tail.reserved, 0);
        tail.append(&file, b"{\"n\":2}\n", Some(&File::sync_data)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}\n{\"n\":2}\n");
    }
}
