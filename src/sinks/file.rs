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
use crate::jsonl::{append_whole, open_append};
use crate::template::{Escape, Template};
use bytes::Bytes;
use serde::Deserialize;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use tokio::sync::oneshot;

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
/// Lines written (and synced) together at most.
const MAX_BATCH: usize = 512;

/// One line to append (the writer adds its newline); `done` hears whether it is durable (or,
/// with `fsync = false`, with the OS).
struct Job {
    path: Arc<Path>,
    line: Bytes,
    done: oneshot::Sender<Result<(), SinkError>>,
}

/// Writes go to one thread per sink that owns the files: no async worker ever blocks on the
/// disk, and no delivery waits on another's lock. Lines that arrive while a write or a sync
/// is in progress go out together: one `write` and one `fdatasync` per file for the whole
/// batch (group commit); each delivery is confirmed only once its own line is durable.
pub struct FileSink {
    name: String,
    path: Template,
    /// The rendered path, once, when the template has no field.
    constant: Option<OnceLock<Arc<Path>>>,
    format: Format,
    jobs: std::sync::mpsc::Sender<Job>,
    ordering: crate::sinks::SinkOrdering,
}

impl FileSink {
    pub fn new(name: &str, c: &FileConfig) -> Result<Self, SinkError> {
        let path = Template::parse(&c.path, Escape::PathSegment).map_err(|e| SinkError::permanent(e.to_string()))?;
        let constant = path.is_constant().then(OnceLock::new);
        let (jobs, rx) = std::sync::mpsc::channel();
        let fsync = c.fsync;
        std::thread::Builder::new()
            .name(format!("file-sink-{name}"))
            .spawn(move || write_loop(&rx, fsync))
            .map_err(|e| SinkError::caused_by(ErrorKind::Permanent, "cannot start the writer thread", e))?;
        Ok(FileSink { name: name.to_owned(), path, constant, format: c.format, jobs, ordering: c.ordering })
    }

    /// The line for `env`, without its newline: the event's JSON (or the configured format).
    fn line(&self, env: &Envelope) -> Bytes {
        match self.format {
            Format::Event => env.json().clone(),
            Format::Raw => {
                // The body as Webio sent it, byte for byte, unless it is pretty-printed: JSON
                // Lines needs one line. A JSON text can hold a raw line break only as
                // whitespace between tokens (inside strings it must be escaped), so turning
                // each into a space changes nothing else: same keys, same order, same numbers.
                if env.raw.iter().any(|b| matches!(b, b'\n' | b'\r')) {
                    Bytes::from(
                        env.raw.iter().map(|&b| if matches!(b, b'\n' | b'\r') { b' ' } else { b }).collect::<Vec<_>>(),
                    )
                } else {
                    env.raw.clone()
                }
            }
            Format::Cloudevents => self.format.encode(env),
        }
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn ordering(&self) -> crate::sinks::SinkOrdering {
        self.ordering
    }

    fn deliver<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let render = || Arc::from(Path::new(&self.path.render(&env.event)));
            let path = match &self.constant {
                Some(once) => once.get_or_init(render).clone(),
                None => render(),
            };
            let (done, result) = oneshot::channel();
            self.jobs
                .send(Job { path, line: self.line(env), done })
                .map_err(|_| SinkError::retryable("the file writer has stopped"))?;
            result.await.unwrap_or_else(|_| Err(SinkError::retryable("the file writer has stopped")))
        })
    }
}

/// The writer thread: runs until the sink is dropped (every sender gone).
fn write_loop(rx: &std::sync::mpsc::Receiver<Job>, fsync: bool) {
    let mut files: HashMap<Arc<Path>, Open> = HashMap::new();
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut buf: Vec<u8> = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // One write and one sync per file, lines in arrival order.
        while !batch.is_empty() {
            let path = batch[0].path.clone();
            let (same, rest): (Vec<Job>, Vec<Job>) = batch.drain(..).partition(|j| j.path == path);
            batch = rest;
            buf.clear();
            for j in &same {
                buf.extend_from_slice(&j.line);
                buf.push(b'\n');
            }
            let result = write(&mut files, &path, &buf, fsync);
            for j in same {
                let _ = j.done.send(result.clone());
            }
        }
        if buf.capacity() > 1 << 20 {
            buf = Vec::new();
        }
    }
}

/// With `fsync = false`, once this many bytes were appended to a file its write-back is
/// started (without waiting for it). Left to the kernel's own schedule, dirty pages pile up
/// to hundreds of MiB; an `fsync` of another file on the same ext4 filesystem (the spool's
/// commit, before every 202) may then have to wait for all of them to reach the disk. With
/// `fsync = true` every batch is synced anyway, so nothing piles up and no hint is needed.
const WRITEBACK_EVERY: u64 = 4 << 20;

struct Open {
    file: File,
    unflushed: u64,
}

fn write(files: &mut HashMap<Arc<Path>, Open>, path: &Arc<Path>, bytes: &[u8], fsync: bool) -> Result<(), SinkError> {
    if !files.contains_key(path) {
        if files.len() >= MAX_OPEN_FILES {
            // A templated path can name many files; keep the descriptor count bounded.
            files.clear();
        }
        let file = open_append(path, fsync)
            .map_err(|e| SinkError::caused_by(open_error_kind(&e), format_args!("open {}", path.display()), e))?;
        files.insert(path.clone(), Open { file, unflushed: 0 });
    }
    let f = files.get_mut(path).expect("inserted above");
    if let Err(e) = append_whole(&f.file, bytes, fsync) {
        // Open afresh next time (the file may have been rotated or the disk remounted).
        files.remove(path);
        // A full disk or an I/O error may pass; the batch was rolled back, so the retry
        // appends whole lines.
        return Err(SinkError::caused_by(ErrorKind::Retryable, format_args!("write {}", path.display()), e));
    }
    if !fsync {
        f.unflushed += bytes.len() as u64;
        if f.unflushed >= WRITEBACK_EVERY {
            f.unflushed = 0;
            start_writeback(&f.file);
        }
    }
    Ok(())
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
        let path = dir.path().join("out.jsonl");
        let config = FileConfig {
            path: path.display().to_string(),
            format: Format::Event,
            fsync: false,
            ordering: Default::default(),
        };
        let sink = FileSink::new("out", &config).unwrap();
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
}
