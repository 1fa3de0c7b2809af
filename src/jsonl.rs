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
    let meta = file.metadata()?;
    if !meta.is_file() {
        // A pipe or a terminal (`/dev/stdout`): a stream can be neither synced nor cut back.
        return (&*file).write_all(bytes);
    }
    let before = meta.len();
    // Blocks first: on a full disk this fails before a byte is written, so a reader never
    // sees a partial line, not even for a moment. The cut below stays for the other errors
    // and for filesystems without `fallocate`.
    reserve(file, before, bytes.len())?;
    let res = (&*file).write_all(bytes).and_then(|()| if sync { file.sync_data() } else { Ok(()) });
    if let Err(e) = res {
        // If even the cut fails, the next open finds no final newline and adds one.
        if file.set_len(before).is_ok() && sync {
            let _ = file.sync_data();
        }
        return Err(e);
    }
    Ok(())
}

/// Allocates the blocks that `len` bytes written at `offset` will need, without changing the
/// file's length (`FALLOC_FL_KEEP_SIZE`). Filesystems that cannot do it are let through.
#[cfg(target_os = "linux")]
fn reserve(file: &File, offset: u64, len: usize) -> io::Result<()> {
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
fn reserve(_file: &File, _offset: u64, _len: usize) -> io::Result<()> {
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
}
