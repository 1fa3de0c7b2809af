//! `file` sink: JSON Lines, one event a line, written and flushed per delivery.
//! The path may be a template (`var/{type}.jsonl`); each rendered value is one safe path
//! component.

use super::{check_template, BoxFuture, OptionError, Sink, SinkError};
use crate::event::Envelope;
use crate::format::Format;
use crate::template::{Escape, Template};
use bytes::Bytes;
use serde::Deserialize;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use tokio::sync::oneshot;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub path: String,
    #[serde(default)]
    pub format: Format,
    /// fsync after each line (slower; the default flushes to the OS, which survives a
    /// crash of the process but not of the host).
    #[serde(default)]
    pub fsync: bool,
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
/// Lines written (and flushed, and fsynced when asked) together at most.
const MAX_BATCH: usize = 512;

/// One line to append (the writer adds its newline); `done` hears whether it reached the OS (and the disk with `fsync`).
struct Job {
    path: Arc<Path>,
    line: Bytes,
    done: oneshot::Sender<Result<(), String>>,
}

/// Writes go to one thread per sink that owns the files: no async worker ever blocks on the
/// disk, and no delivery waits on another's lock. Lines that arrive while a write is in
/// progress go out together with one `write` per file (and one `fdatasync` with `fsync`:
/// group commit); each delivery is confirmed only once its own line was written and
/// flushed to the OS, as before.
pub struct FileSink {
    name: String,
    path: Template,
    /// The rendered path, once, when the template has no field.
    constant: Option<OnceLock<Arc<Path>>>,
    format: Format,
    jobs: std::sync::mpsc::Sender<Job>,
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
            .map_err(|e| SinkError::permanent(format!("cannot start the writer thread: {e}")))?;
        Ok(FileSink { name: name.to_owned(), path, constant, format: c.format, jobs })
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
            match result.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(SinkError::retryable(e)),
                Err(_) => Err(SinkError::retryable("the file writer has stopped")),
            }
        })
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path)
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
        // One write per file, lines in arrival order.
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

/// Once this many bytes were appended to a file, its write-back is started (without waiting
/// for it). Left to the kernel's own schedule, dirty pages pile up to hundreds of MiB; an
/// `fsync` of another file on the same ext4 filesystem (the spool's commit, before every 202)
/// may then have to wait for all of them to reach the disk.
const WRITEBACK_EVERY: u64 = 4 << 20;

struct Open {
    file: File,
    unflushed: u64,
}

fn write(files: &mut HashMap<Arc<Path>, Open>, path: &Arc<Path>, bytes: &[u8], fsync: bool) -> Result<(), String> {
    if !files.contains_key(path) {
        if files.len() >= MAX_OPEN_FILES {
            // A templated path can name many files; keep the descriptor count bounded.
            files.clear();
        }
        let file = open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
        files.insert(path.clone(), Open { file, unflushed: 0 });
    }
    let f = files.get_mut(path).expect("inserted above");
    // `File` has no user-space buffer: once `write_all` returns the lines are with the OS.
    let res = f.file.write_all(bytes).and_then(|()| if fsync { f.file.sync_data() } else { Ok(()) });
    if res.is_ok() && !fsync {
        f.unflushed += bytes.len() as u64;
        if f.unflushed >= WRITEBACK_EVERY {
            f.unflushed = 0;
            start_writeback(&f.file);
        }
    }
    res.map_err(|e| {
        // Reopen next time (the file may have been rotated or the disk remounted).
        files.remove(path);
        format!("write {}: {e}", path.display())
    })
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

    #[tokio::test]
    async fn every_line_is_whole_past_the_write_back_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let config = FileConfig { path: path.display().to_string(), format: Format::Event, fsync: false };
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
        let config = FileConfig { path: path.display().to_string(), format: Format::Raw, fsync: true };
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
